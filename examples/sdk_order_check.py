"""Place and cancel orders through the official MCP Python SDK client, at both eras (issue 24).

    pip install mcp==2.3.0                     # the SDK, as for sdk_client_check.py
    python examples/sdk_order_check.py         # the sandbox broker speaking Kite Connect
    python examples/sdk_order_check.py --provider sandbox --browser chromium --playwright-dir /tmp/pw

It starts ``mcp_server.py`` with OAuth (MCP_AUTH=builtin, MCP_CONSENT=never), UPSTREAM_TRADING=1
and a sandbox provider, and for ``Client(mode="legacy")`` (2025-11-25: ``elicitation/create``)
and ``Client(mode="2026-07-28")`` (an ``input_required`` round) it:

1. signs in upstream: the ``login`` tool, then a browser that opens the link, enters the pairing
   code and signs in as the demo user asha (``--browser chromium`` drives a real Chromium with
   examples/browser_login_check.mjs; the default is a small cookie-keeping HTTP browser);
2. places an order, confirmed by the SDK's elicitation callback, and sees it in ``orders``;
3. (2026-07-28) answers the same input round twice, as a client that lost the first answer
   retries: the second gets the first's outcome, and ``orders`` grows by one only;
4. reconnects with the same OAuth tokens but without the elicitation capability: ``place_order``
   is refused with a tool error and nothing is placed;
5. cancels the order (confirmed again).

Exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import http.cookiejar
import json
import re
import shutil
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import sdk_client_check as sdk  # noqa: E402  (the SDK imports, the server runner, the OAuth client)
from provider_browser_check import chromium_walk  # noqa: E402

types = sdk.types


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def http_browser_sign_in(url: str, code: str, user: str = "asha") -> str:
    """The pairing page, the sandbox sign-in form, /redirect: as a browser with cookies would."""
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()), NoRedirect)

    def open_(target: str, form: dict | None = None):
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        parts = urllib.parse.urlsplit(target)
        headers = {"Origin": f"{parts.scheme}://{parts.netloc}"} if form is not None else {}
        try:
            answer = opener.open(urllib.request.Request(target, data=data, headers=headers), timeout=20)
        except urllib.error.HTTPError as exc:
            answer = exc
        with answer:
            return answer.status if hasattr(answer, "status") else answer.code, answer.headers, answer.read().decode()

    def hidden(page: str) -> dict:
        return dict(re.findall(r"<input type=hidden name=(\w+) value='([^']*)'>", page))

    _, _, page = open_(url)
    status, headers, _ = open_(url, {"csrf": hidden(page)["csrf"], "code": code})
    assert status == 302, f"the pairing code was not taken ({status})"
    provider = headers["location"]
    _, _, page = open_(provider)
    status, headers, _ = open_(provider, {**hidden(page), "user": user})
    assert status == 302, f"the sandbox sign-in answered {status}"
    status, _, page = open_(headers["location"])
    assert status == 200 and "You are signed in" in page, f"/redirect answered {status}"
    return "signed in (HTTP browser)"


@contextlib.asynccontextmanager
async def connect(port: int, mode: str, storage, rec: sdk.Recorder | None):
    url = f"http://127.0.0.1:{port}/mcp"
    callbacks = {"elicitation_callback": rec.on_elicit} if rec is not None else {}
    async with sdk.httpx2.AsyncClient(auth=sdk.oauth_provider(url, storage),
                                      timeout=sdk.httpx2.Timeout(30, read=120)) as client_http:
        async with sdk.Client(sdk.streamable_http_client(url, http_client=client_http), mode=mode,
                              read_timeout_seconds=sdk.OP_TIMEOUT, **callbacks) as client:
            yield client


def data(result) -> dict:
    assert not result.is_error, f"isError: {result.content}"
    return result.structured_content


async def check_mode(port: int, mode: str, browser) -> list:
    steps, storage, rec = [], sdk.MemoryTokenStorage(), sdk.Recorder()
    order = {"symbol": "INFY", "side": "BUY", "quantity": 2, "price": 1500}
    async with connect(port, mode, storage, rec) as c:
        started = data(await c.call_tool("login", {}))
        steps.append(await asyncio.to_thread(browser, started["url"], started["pairing_code"]))
        before = len(data(await c.call_tool("orders", {}))["data"])
        placed = data(await c.call_tool("place_order", order))
        assert placed["done"] is True, placed
        steps.append(f"placed {placed['result']['data']['order_id']} after {rec.elicitations[-1][1]!r}")
        expected = before + 1
        if mode == sdk.MODERN:
            first = await sdk.low_level(c).call_tool("place_order", order, allow_input_required=True)
            assert isinstance(first, types.InputRequiredResult), type(first).__name__
            yes = {"confirm": types.ElicitResult(action="accept", content={"confirm": True})}
            once = await sdk.low_level(c).call_tool("place_order", order, input_responses=yes,
                                                    request_state=first.request_state)
            twice = await sdk.low_level(c).call_tool("place_order", order, input_responses=yes,
                                                     request_state=first.request_state)
            assert data(twice).get("replayed") is True and data(twice)["result"] == data(once)["result"], data(twice)
            expected += 1
            steps.append("a retried input round returned the first outcome (replayed), not a second order")
        orders = data(await c.call_tool("orders", {}))["data"]
        assert len(orders) == expected, f"{len(orders)} orders, expected {expected}"
    async with connect(port, mode, storage, None) as c:  # the same user, a client that cannot ask
        refused = await c.call_tool("place_order", order)
        text = refused.content[0].text
        assert refused.is_error and "elicitation" in text, text
        assert len(data(await c.call_tool("orders", {}))["data"]) == expected
        steps.append("without the elicitation capability: refused (" + text[:60] + "...)")
    async with connect(port, mode, storage, rec) as c:
        cancelled = data(await c.call_tool("cancel_order", {"order_id": orders[-1]["order_id"]}))
        assert cancelled["done"] is True and data(await c.call_tool("orders", {}))["data"][-1]["status"] == "CANCELLED"
        steps.append("cancelled after a second confirmation")
    return steps


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--provider", default="sandbox-kite", choices=["sandbox", "sandbox-kite"])
    parser.add_argument("--browser", default="http", choices=["http", "chromium"])
    parser.add_argument("--playwright-dir", default=".", help="where node_modules/playwright-core is (--browser chromium)")
    parser.add_argument("--server-python", default=sys.executable)
    args = parser.parse_args()
    browser = http_browser_sign_in
    if args.browser == "chromium":
        browser = functools.partial(chromium_walk, playwright_dir=args.playwright_dir)
    failures = 0
    with tempfile.TemporaryDirectory() as workdir:
        env = {"MCP_AUTH": "builtin", "MCP_CONSENT": "never", "UPSTREAM_TRADING": "1",
               "UPSTREAM_PROVIDER": args.provider, "ENCRYPTION_KEY": "ab" * 32, "MCP_AUTH_RATE_LIMIT": "0"}
        async with sdk.HttpServer(args.server_python, workdir, env=env, script=HERE.parent / "mcp_server.py") as server:
            for mode in ("legacy", sdk.MODERN):
                try:
                    for step in await check_mode(server.port, mode, browser):
                        print(f"{mode:11} ok    {step}")
                except Exception as exc:  # noqa: BLE001 - reported, then the next mode
                    failures += 1
                    print(f"{mode:11} FAIL  {type(exc).__name__}: {exc}")
    return 1 if failures else 0


if __name__ == "__main__":
    if shutil.which("node") is None and "chromium" in sys.argv:
        sys.exit("--browser chromium needs node and playwright-core (see browser_login_check.mjs)")
    sys.exit(asyncio.run(main()))
