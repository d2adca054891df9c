"""Sign in through each kind of upstream provider in a real browser (headless Chromium).

    npm install playwright-core                 # in some directory, e.g. /tmp/pw; plus: apt-get install chromium
    python examples/provider_browser_check.py --playwright-dir /tmp/pw

For each provider kind it starts ``mcp_server.py --no-auth --port 0`` configured for it, opens an MCP
session, calls ``login``, lets examples/browser_login_check.mjs walk the link in Chromium (pairing
code, the provider's sign-in page, /redirect), then calls ``profile`` and checks that the answer
came from the provider and is masked.  The kinds:

- ``sandbox``: OAuth 2 with PKCE against the built-in sandbox (UPSTREAM_PROVIDER=sandbox);
- ``sandbox-kite``: the Kite Connect exchange (request_token, checksum, ``token`` header);
- ``oidc``: OpenID Connect discovery and a signed ID token, against the local fake OpenID
  provider of the test suite (``_prov_FakeOIDC`` in test_mcp_server.py, which needs pytest).

Nothing leaves the machine.  Exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MASKED = ("asha.rao@example.com", "ABCPR1234K", "AB1234")  # raw identifiers that must not come back


@contextlib.contextmanager
def server(env: dict):
    """mcp_server.py on a free port with ``env``: yields its base URL."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MCP_", "UPSTREAM_", "REDIS_"))}
    proc = subprocess.Popen([sys.executable, str(ROOT / "mcp_server.py"), "--no-auth", "--port", "0"],
                            env={**clean, "ENCRYPTION_KEY": "cd" * 32, **env}, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(50):
            match = re.search(r"listening on (http://127\.0\.0\.1:\d+)/", proc.stderr.readline())
            if match:
                yield match.group(1)
                return
        raise RuntimeError("the server did not start")
    finally:
        proc.terminate()
        proc.wait(10)


def rpc(base: str, session: dict, method: str, params: dict) -> dict:
    body = json.dumps({"jsonrpc": "2.0", "id": session.setdefault("n", 1), "method": method, "params": params})
    session["n"] += 1
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
               "MCP-Protocol-Version": "2025-11-25", **({"Mcp-Session-Id": session["id"]} if "id" in session else {})}
    with urllib.request.urlopen(urllib.request.Request(base + "/mcp", body.encode(), headers), timeout=30) as answer:
        session.setdefault("id", answer.headers.get("mcp-session-id"))
        text = answer.read().decode()
    if text.startswith("{"):
        return json.loads(text)
    return [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")][-1]


def walk(base: str, playwright_dir: str) -> str:
    session: dict = {}
    rpc(base, session, "initialize", {"protocolVersion": "2025-11-25", "capabilities": {},
                                      "clientInfo": {"name": "provider-browser-check", "version": "1"}})
    started = rpc(base, session, "tools/call", {"name": "login", "arguments": {}})["result"]["structuredContent"]
    pages = chromium_walk(started["url"], started["pairing_code"], playwright_dir)
    profile = rpc(base, session, "tools/call", {"name": "profile", "arguments": {}})["result"]
    text = json.dumps(profile)
    assert not profile.get("isError"), text
    assert not [raw for raw in MASKED if raw in text], f"unmasked: {text}"
    return pages


def chromium_walk(url: str, code: str, playwright_dir: str) -> str:
    """browser_login_check.mjs on a login link, run from the directory that holds
    node_modules/playwright-core (an ES module resolves its imports next to its own file):
    the titles of the pages it went through."""
    script = Path(playwright_dir) / "browser_login_check.mjs"
    shutil.copyfile(HERE / "browser_login_check.mjs", script)
    run = subprocess.run(["node", str(script), url, code], capture_output=True, text=True, timeout=120,
                         cwd=playwright_dir)
    assert run.returncode == 0, f"the browser walk failed: {run.stdout}{run.stderr}"
    return " / ".join(line for line in run.stdout.splitlines() if line[:2] in ("1.", "2.", "3."))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--playwright-dir", default=".", help="where node_modules/playwright-core is")
    parser.add_argument("--only", default="sandbox,sandbox-kite,oidc")
    args = parser.parse_args()
    failures = 0
    for kind in args.only.split(","):
        try:
            with contextlib.ExitStack() as stack:
                env = {"UPSTREAM_PROVIDER": kind}
                if kind == "oidc":
                    sys.path.insert(0, str(ROOT))
                    from test_mcp_server import _prov_FakeOIDC
                    fake = stack.enter_context(_prov_FakeOIDC())
                    env.update(UPSTREAM_ISSUER=fake.issuer, UPSTREAM_CLIENT_ID=fake.CLIENT,
                               UPSTREAM_CLIENT_SECRET=fake.SECRET, UPSTREAM_API_BASE=fake.url + "/api",
                               MCP_ALLOW_PRIVATE_FETCH="1")
                base = stack.enter_context(server(env))
                print(f"{kind:13} ok    {walk(base, args.playwright_dir)}")
        except Exception as exc:  # noqa: BLE001 - reported, then the next kind
            failures += 1
            print(f"{kind:13} FAIL  {type(exc).__name__}: {exc}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
