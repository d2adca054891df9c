"""Drive examples/everything_server.py with the official MCP Python SDK client.

This is an interoperability check, not a unit test: it shows that a real client (the `mcp`
package, version 2.3.0) works against this server over every transport and protocol mode that
client offers. Run it with a Python that has the SDK installed::

    pip install mcp==2.3.0
    python examples/sdk_client_check.py                  # everything: a table; exit 1 on any FAIL
    python examples/sdk_client_check.py --only stdio,http --modes legacy,auto
    python examples/sdk_client_check.py --capture DIR    # also record the SDK's raw traffic in DIR
    python examples/sdk_client_check.py -v               # every cell's detail as it runs

The script starts everything_server.py itself (``--server-script`` names another file with the
same tools; ``--server-python`` another interpreter; it needs ``cryptography``, which the SDK pulls
in): once with ``--port 0`` for Streamable HTTP (``/mcp``) and the legacy HTTP+SSE transport
(``/sse`` + ``/messages``), once more with ``MCP_AUTH=builtin MCP_CONSENT=never`` for the OAuth
rows, and as a ``--stdio`` subprocess for every stdio connection. Everything stays on loopback.

Transports, as the first column:

- ``stdio``: ``stdio_client(StdioServerParameters(...))``;
- ``http``: ``streamable_http_client(url)``;
- ``sse``: ``sse_client(url + "/sse")``;
- ``http+oauth``, ``sse+oauth``: the same with the SDK's ``OAuthClientProvider`` (discovery,
  dynamic registration, PKCE, token; a headless "browser" follows the /authorize redirect).

Modes, as rows of the table:

- ``legacy``: ``Client(mode="legacy")``, the SDK's own handshake (it always offers 2025-11-25).
- ``legacy@<version>``: the same handshake offering an older revision. ``Client`` has no option
  for that, so these rows use the SDK's lower-level ``ClientSession`` (public API:
  ``send_request(InitializeRequest)``, ``adopt``, ``send_notification(InitializedNotification)``).
- ``auto``: ``Client(mode="auto")``: ``server/discover`` first, 2026-07-28 if the server has it.
- ``2026-07-28``: ``Client(mode="2026-07-28")``: stateless from the first request.

Each cell is one of:

- ``ok``;
- ``FAIL``, explained under the table (the exit status is 1 when there is any);
- ``n/a (rev)``: the negotiated revision has no such feature (``ping`` on 2026-07-28; elicitation
  before 2025-06-18, where the server must answer the tool call with ``isError`` instead);
- ``n/a (server)``: a pinned 2026-07-28 client on the legacy ``/sse`` transport, which the server
  does not serve at that revision, *and* the server said so with a JSON-RPC error. A hang or a
  dropped connection there is a FAIL.

Every transport x mode combination can be made with SDK 2.3.0 (its own server serves 2026-07-28
over SSE too), so no cell is "n/a (client)".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import shlex
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import anyio

try:
    import httpx2
    import mcp_types as types
    from mcp import Client, ClientSession, StdioServerParameters
    from mcp.client.auth import AuthorizationCodeResult, OAuthClientProvider
    from mcp.client.sse import sse_client
    from mcp.client.stdio import stdio_client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared.auth import OAuthClientMetadata
    from mcp.shared.exceptions import MCPDeprecationWarning, MCPError
except ImportError:  # pragma: no cover - a hint instead of a traceback
    sys.exit("this check needs the official MCP SDK: pip install mcp==2.3.0")

warnings.filterwarnings("ignore", category=MCPDeprecationWarning)  # ping, logging: deprecated in 2026, still tested

HERE = Path(__file__).resolve().parent
SERVER = HERE / "everything_server.py"
LEGACY_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
MODERN = "2026-07-28"
OP_TIMEOUT = 20.0
MODES = ("legacy", *(f"legacy@{v}" for v in LEGACY_VERSIONS), "auto", MODERN)
TRANSPORTS = ("stdio", "http", "sse", "http+oauth", "sse+oauth")


class NotApplicable(Exception):
    """The negotiated revision (or the client) has no such operation."""


# ---------------------------------------------------------------------------------------------
# Callbacks: a fake user and a fake LLM
# ---------------------------------------------------------------------------------------------


@dataclass
class Recorder:
    """What the server sent to the client during one connection."""

    logs: list = field(default_factory=list)
    elicitations: list = field(default_factory=list)  # (request_id, message)
    samplings: list = field(default_factory=list)
    roots_asked: int = 0
    notifications: list = field(default_factory=list)  # server notifications outside any request

    async def on_message(self, message) -> None:
        if not isinstance(message, Exception):
            self.notifications.append(message.method)

    async def on_log(self, params: types.LoggingMessageNotificationParams) -> None:
        self.logs.append((params.level, params.data))

    async def on_elicit(self, ctx, params: types.ElicitRequestParams) -> types.ElicitResult:
        self.elicitations.append((ctx.request_id, params.message))
        schema = getattr(params, "requested_schema", None) or {}
        schema = schema if isinstance(schema, dict) else schema.model_dump(by_alias=True)
        content = {}
        for name, prop in (schema.get("properties") or {}).items():
            kind = prop.get("type")
            content[name] = True if kind == "boolean" else 7 if kind in ("integer", "number") else f"sdk-{name}"
        return types.ElicitResult(action="accept", content=content)

    async def on_sample(self, ctx, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        self.samplings.append(ctx.request_id)
        return types.CreateMessageResult(role="assistant", model="sdk-check-model",
                                         content=types.TextContent(type="text", text="Paris"))

    async def on_roots(self, ctx) -> types.ListRootsResult:
        self.roots_asked += 1
        return types.ListRootsResult(roots=[types.Root(uri="file:///tmp/sdk-check", name="scratch")])


# ---------------------------------------------------------------------------------------------
# Servers and transports
# ---------------------------------------------------------------------------------------------


def server_env() -> dict:
    """The caller's environment without MCP_/REDIS_ settings, so the server runs on defaults."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("MCP_", "MASK_MCP_", "REDIS_"))}


class HttpServer:
    """everything_server.py on a free loopback port, as a subprocess."""

    def __init__(self, python: str, workdir: str, name: str = "http-server", env: dict | None = None,
                 script: Path = SERVER):
        self.log_path = Path(workdir) / f"{name}.log"
        self.log = open(self.log_path, "wb")
        self.proc, self.script = None, script
        self.python, self.workdir, self.env = python, workdir, {**server_env(), **(env or {})}
        self.port = None

    async def __aenter__(self) -> "HttpServer":
        self.proc = await asyncio.create_subprocess_exec(
            self.python, str(self.script), "--port", "0", "--log-level", "warning", "--log-format", "text",
            stdin=asyncio.subprocess.DEVNULL, stdout=self.log, stderr=self.log, cwd=self.workdir, env=self.env)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            match = re.search(rb"listening on http://127\.0\.0\.1:(\d+)/mcp", self.log_path.read_bytes())
            if match:
                self.port = int(match.group(1))
                return self
            if self.proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        raise RuntimeError(f"the HTTP server did not start: {self.log_path.read_text(errors='replace')}")

    async def __aexit__(self, *exc) -> None:
        if self.proc and self.proc.returncode is None:
            self.proc.terminate()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 10)
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
        self.log.close()


@dataclass
class Target:
    """Where and how to connect: a transport factory per connection."""

    python: str
    workdir: str
    http_port: int | None = None
    oauth_port: int | None = None  # the same server with MCP_AUTH=builtin, MCP_CONSENT=never
    stdio_wrapper: str | None = None  # a shell command template around the stdio server (capture)
    errlog: Any = None

    def transport(self, kind: str, port: int | None = None):
        if kind.endswith("+oauth"):
            return oauth_transport(kind.split("+")[0], self.oauth_port)
        port = port or self.http_port
        if kind == "stdio":
            if self.stdio_wrapper:
                command = self.stdio_wrapper.format(server=shlex.quote(self.python) + " " + shlex.quote(str(SERVER)))
                params = StdioServerParameters(command="sh", args=["-c", command], cwd=self.workdir, env=server_env())
            else:
                params = StdioServerParameters(command=self.python, args=[str(SERVER), "--stdio"],
                                               cwd=self.workdir, env=server_env())
            return stdio_client(params, errlog=self.errlog)
        if kind == "http":
            return streamable_http_client(f"http://127.0.0.1:{port}/mcp")
        if kind == "sse":
            return sse_client(f"http://127.0.0.1:{port}/sse")
        raise ValueError(kind)


class MemoryTokenStorage:
    """The SDK's TokenStorage protocol, in memory: one OAuth client and its tokens."""

    def __init__(self):
        self.tokens = self.client_info = None

    async def get_tokens(self):
        return self.tokens

    async def set_tokens(self, tokens) -> None:
        self.tokens = tokens

    async def get_client_info(self):
        return self.client_info

    async def set_client_info(self, client_info) -> None:
        self.client_info = client_info


def oauth_provider(url: str, storage: "MemoryTokenStorage | None" = None) -> OAuthClientProvider:
    """The SDK's OAuth client with a headless "browser": it opens /authorize (the server runs with
    MCP_CONSENT=never, so the answer is the redirect at once) and hands the code back."""
    redirect = {}

    async def open_browser(authorize_url: str) -> None:
        async with httpx2.AsyncClient() as browser:
            answer = await browser.get(authorize_url)
        assert answer.status_code in (302, 303), f"/authorize answered {answer.status_code}: {answer.text[:200]}"
        query = parse_qs(urlparse(answer.headers["location"]).query)
        assert "code" in query, f"/authorize redirected without a code: {answer.headers['location']}"
        redirect["result"] = AuthorizationCodeResult(code=query["code"][0], state=query.get("state", [None])[0],
                                                     iss=query.get("iss", [None])[0])

    async def wait_for_callback() -> AuthorizationCodeResult:
        return redirect.pop("result")

    metadata = OAuthClientMetadata(client_name="sdk-client-check", redirect_uris=["http://127.0.0.1:33418/callback"],
                                   grant_types=["authorization_code", "refresh_token"],
                                   token_endpoint_auth_method="none")
    return OAuthClientProvider(server_url=url, client_metadata=metadata, storage=storage or MemoryTokenStorage(),
                               redirect_handler=open_browser, callback_handler=wait_for_callback)


@contextlib.asynccontextmanager
async def oauth_transport(kind: str, port: int):
    """Streamable HTTP or HTTP+SSE with a fresh OAuth client: every connection registers, gets
    consent, exchanges the code and sends the bearer token, all through the SDK."""
    if kind == "http":
        url = f"http://127.0.0.1:{port}/mcp"
        async with httpx2.AsyncClient(auth=oauth_provider(url), timeout=httpx2.Timeout(30, read=300)) as http:
            async with streamable_http_client(url, http_client=http) as streams:
                yield streams
    else:
        url = f"http://127.0.0.1:{port}/sse"
        async with sse_client(url, auth=oauth_provider(url)) as streams:
            yield streams


def client_capabilities(version: str) -> types.ClientCapabilities:
    """What a client with these callbacks declares; elicitation exists from 2025-06-18 on."""
    elicitation = None
    if version >= "2025-06-18":
        url = types.UrlElicitationCapability() if version >= "2025-11-25" else None
        elicitation = types.ElicitationCapability(form=types.FormElicitationCapability(), url=url)
    return types.ClientCapabilities(sampling=types.SamplingCapability(), elicitation=elicitation,
                                    roots=types.RootsCapability(list_changed=True))


@contextlib.asynccontextmanager
async def connect(target: Target, kind: str, mode: str, rec: Recorder, *, port: int | None = None):
    """An entered client object (a ``Client``, or a ``ClientSession`` for pinned legacy versions)."""
    callbacks = dict(sampling_callback=rec.on_sample, elicitation_callback=rec.on_elicit,
                     list_roots_callback=rec.on_roots, logging_callback=rec.on_log, message_handler=rec.on_message)
    if mode.startswith("legacy@"):
        version = mode.split("@", 1)[1]
        async with target.transport(kind, port) as (read, write):
            async with ClientSession(read, write, read_timeout_seconds=OP_TIMEOUT, **callbacks) as session:
                init = types.InitializeRequest(params=types.InitializeRequestParams(
                    protocol_version=version, capabilities=client_capabilities(version),
                    client_info=types.Implementation(name="sdk-client-check", version="1.0")))
                with anyio.fail_after(OP_TIMEOUT):
                    result = await session.send_request(init, types.InitializeResult)
                if result.protocol_version != version:
                    raise RuntimeError(f"offered {version}, the server answered {result.protocol_version}")
                session.adopt(result)
                await session.send_notification(types.InitializedNotification())
                yield session
        return
    # A log level opts 2026-07-28 requests in to notifications/message (no effect on legacy).
    # read_timeout_seconds bounds the handshake too (a cancel scope cannot span __aenter__).
    async with Client(target.transport(kind, port), mode=mode, log_level="debug",
                      read_timeout_seconds=OP_TIMEOUT, **callbacks) as client:
        yield client


def negotiated(c) -> str:
    return c.protocol_version


def modern(c) -> bool:
    return negotiated(c) == MODERN


def low_level(c) -> ClientSession:
    return c.session if isinstance(c, Client) else c


# ---------------------------------------------------------------------------------------------
# The operations
# ---------------------------------------------------------------------------------------------


def text_of(result: types.CallToolResult) -> str:
    assert not result.is_error, f"isError: {result.content}"
    texts = [block.text for block in result.content if getattr(block, "type", None) == "text"]
    assert texts, f"no text content: {result.content}"
    return texts[0]


def expect(actual, wanted) -> str:
    assert actual == wanted, f"expected {wanted!r}, got {actual!r}"
    return str(actual)


async def op_ping(c, rec):
    if modern(c):
        raise NotApplicable("ping is not part of 2026-07-28")
    await low_level(c).send_ping()
    return "pong"


async def op_list_tools(c, rec):
    tools = {tool.name: tool for tool in (await c.list_tools()).tools}
    assert {"test_simple_text", "test_elicitation", "test_sampling", "greet"} <= set(tools), sorted(tools)
    return f"{len(tools)} tools"


async def op_simple_text(c, rec):
    return expect(text_of(await c.call_tool("test_simple_text", {})), "This is a simple text response for testing.")


async def op_tool_args(c, rec):
    return expect(text_of(await c.call_tool("greet", {"name": "SDK"})), "Hello, SDK!")


async def op_param_header(c, rec):
    # On 2026-07-28 the SDK mirrors the argument into an Mcp-Param-Region header (x-mcp-header).
    return expect(text_of(await c.call_tool("test_x_mcp_header", {"region": "eu-west-1"})), "region=eu-west-1")


async def op_elicitation(c, rec):
    before = len(rec.elicitations)
    if negotiated(c) < "2025-06-18":
        # No elicitation in this revision (whatever the client declares): the tool must say so, and
        # which revision it needs, with an isError result instead of sending elicitation/create.
        result = await c.call_tool("test_elicitation", {"message": "Your answer?"})
        assert result.is_error, f"expected isError, got {result.content}"
        assert len(rec.elicitations) == before, "the server sent elicitation/create anyway"
        raise NotApplicable(f"{negotiated(c)} has no elicitation; isError: {result.content[0].text}")
    how = ""
    if modern(c):
        # Show the first leg is an input_required result (no server-to-client request on 2026-07-28);
        # Client.call_tool below then drives the rounds itself.
        first = await low_level(c).call_tool("test_elicitation", {"message": "Your answer?"},
                                             allow_input_required=True)
        assert isinstance(first, types.InputRequiredResult), f"first leg: {type(first).__name__}"
        how = f"input_required keys={sorted(first.input_requests or {})}; "
    text = text_of(await c.call_tool("test_elicitation", {"message": "Your answer?"}))
    expect(text, 'User response: action=accept, content={"response":"sdk-response"}')
    assert len(rec.elicitations) == before + 1, f"callback ran {len(rec.elicitations) - before} times"
    request_id = rec.elicitations[-1][0]
    return how + f"callback request_id={request_id!r}"


async def op_sampling(c, rec):
    before = len(rec.samplings)
    expect(text_of(await c.call_tool("test_sampling", {"prompt": "Capital of France?"})), "LLM response: Paris")
    assert len(rec.samplings) == before + 1
    return f"callback request_id={rec.samplings[-1]!r}"


async def op_roots(c, rec):
    tool = "test_input_required_result_list_roots"
    return expect(text_of(await c.call_tool(tool, {})), "Found 1 root(s)")


async def op_logging(c, rec):
    if not modern(c):
        await low_level(c).set_logging_level("debug")
    before = len(rec.logs)
    expect(text_of(await c.call_tool("test_tool_with_logging", {})), "Tool with logging executed successfully")
    for _ in range(50):  # notifications may trail the result by a scheduling step
        if len(rec.logs) - before >= 3:
            break
        await anyio.sleep(0.02)
    got = [data for _, data in rec.logs[before:]]
    expect(got, ["Tool execution started", "Tool processing data", "Tool execution completed"])
    return "3 log notifications" + (" (setLevel)" if not modern(c) else " (_meta logLevel opt-in)")


async def op_progress(c, rec):
    seen = []

    async def on_progress(progress, total, message):
        seen.append((progress, total))

    result = await c.call_tool("test_tool_with_progress", {}, progress_callback=on_progress)
    token = text_of(result)
    assert token not in ("None", ""), f"the tool saw no progressToken: {token!r}"
    expect(seen, [(0, 100), (50, 100), (100, 100)])
    return f"3 progress notifications, token {token}"


async def op_resources(c, rec):
    listed = {str(r.uri) for r in (await c.list_resources()).resources}
    assert {"test://static-text", "test://static-binary"} <= listed, listed
    read = await c.read_resource("test://static-text")
    expect(read.contents[0].text, "This is the content of the static text resource.")
    binary = await c.read_resource("test://static-binary")
    assert getattr(binary.contents[0], "blob", None), binary
    return f"{len(listed)} resources, read text + blob"


async def op_templates(c, rec):
    templates = [t.uri_template for t in (await c.list_resource_templates()).resource_templates]
    assert "test://template/{id}/data" in templates, templates
    read = await c.read_resource("test://template/42/data")
    expect(json.loads(read.contents[0].text)["id"], "42")
    return f"{len(templates)} template(s), read test://template/42/data"


async def op_prompts(c, rec):
    names = {p.name for p in (await c.list_prompts()).prompts}
    assert {"test_simple_prompt", "test_prompt_with_arguments"} <= names, names
    got = await c.get_prompt("test_prompt_with_arguments", {"arg1": "a", "arg2": "b"})
    expect(got.messages[0].content.text, "Prompt with arguments: arg1='a', arg2='b'")
    return f"{len(names)} prompts, got one"


async def op_complete(c, rec):
    ref = types.PromptReference(type="ref/prompt", name="test_prompt_with_arguments")
    session = low_level(c)
    # The capabilities come from initialize or server/discover; a pinned 2026-07-28 client asks neither.
    known = session.initialize_result or (session.discover_result if getattr(c, "mode", "") == "auto" else None)
    if known is not None:
        # completion/complete exists in 2024-11-05 already; the `completions` capability came in 2025-03-26.
        announced = known.capabilities.completions is not None
        assert announced == (negotiated(c) >= "2025-03-26"), f"completions capability announced={announced}"
    result = await c.complete(ref, {"name": "arg1", "value": "x"})
    assert isinstance(result.completion.values, list), result
    return f"values={result.completion.values}"


async def op_changes(c, rec):
    """A tools/list_changed the server announces reaches the client: on 2026-07-28 through a
    subscriptions/listen stream, on legacy revisions as a plain notification (stdio, the GET
    stream of Streamable HTTP, the /sse stream); legacy also subscribes to a resource."""
    if modern(c):
        if not isinstance(c, Client):
            raise NotApplicable("listen() is a Client method")
        async with c.listen(tools_list_changed=True, resource_subscriptions=["test://watched-resource"]) as sub:
            await c.call_tool("test_trigger_tool_change", {})
            with anyio.fail_after(5):
                event = await sub.__anext__()
            assert type(event).__name__ == "ToolsListChanged", event
            return f"listen: {type(event).__name__}, honored={sub.honored.model_dump(exclude_none=True)}"
    await low_level(c).subscribe_resource("test://watched-resource")
    before = len(rec.notifications)
    await c.call_tool("test_trigger_tool_change", {})
    with anyio.fail_after(5):
        while "notifications/tools/list_changed" not in rec.notifications[before:]:
            await anyio.sleep(0.02)
    await low_level(c).unsubscribe_resource("test://watched-resource")
    return "notifications/tools/list_changed received; resources/subscribe + unsubscribe ok"


OPERATIONS = [
    ("ping", op_ping),
    ("tools/list", op_list_tools),
    ("simple", op_simple_text),
    ("args", op_tool_args),
    ("param-hdr", op_param_header),
    ("elicit", op_elicitation),
    ("sampling", op_sampling),
    ("roots", op_roots),
    ("logging", op_logging),
    ("progress", op_progress),
    ("resources", op_resources),
    ("templates", op_templates),
    ("prompts", op_prompts),
    ("complete", op_complete),
    ("changes", op_changes),
]


# ---------------------------------------------------------------------------------------------
# Running the matrix
# ---------------------------------------------------------------------------------------------


@dataclass
class Cell:
    status: str  # ok, FAIL, n/a (rev), n/a (server)
    detail: str = ""


def describe(exc: BaseException) -> str:
    if isinstance(exc, MCPError):
        return f"MCPError {exc.error.code}: {exc.error.message}"
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(e) for e in exc.exceptions)
    if isinstance(exc, TimeoutError):
        return f"timed out after {OP_TIMEOUT:g}s"
    return f"{type(exc).__name__}: {exc}".strip()


# JSON-RPC refusals (invalid request, method not found, header mismatch, unsupported version): an
# answer, as opposed to a hang, a dropped connection or a malformed result.
REFUSALS = (-32600, -32601, -32020, -32022)


def classify(kind: str, version: str, exc: Exception) -> Cell:
    """2026-07-28 over the legacy HTTP+SSE transport is outside what the server documents (it
    serves 2026-07-28 on /mcp, /http and stdio): a clean JSON-RPC refusal there is "n/a (server)".
    A hang or a dead transport is still a FAIL."""
    if kind.startswith("sse") and version == MODERN and isinstance(exc, MCPError) and exc.error.code in REFUSALS:
        return Cell("n/a (server)", f"2026-07-28 is not served on /sse: {describe(exc)}")
    return Cell("FAIL", describe(exc))


async def run_combination(target: Target, kind: str, mode: str) -> tuple[str, dict[str, Cell]]:
    """Connect once, run every operation; returns (negotiated version, cells)."""
    rec = Recorder()
    cells: dict[str, Cell] = {}
    version = "-"
    try:
        async with connect(target, kind, mode, rec) as c:
            version = negotiated(c)
            cells["connect"] = Cell("ok", version)
            for name, op in OPERATIONS:
                try:
                    with anyio.fail_after(OP_TIMEOUT):
                        cells[name] = Cell("ok", await op(c, rec))
                except NotApplicable as exc:
                    cells[name] = Cell("n/a (rev)", str(exc))
                except Exception as exc:  # noqa: BLE001 - every failure goes in the table
                    cells[name] = classify(kind, version, exc)
                    logging.getLogger("sdk_client_check").exception("%s / %s / %s", kind, mode, name)
    except Exception as exc:  # noqa: BLE001
        detail = describe(exc)
        cells.setdefault("connect", Cell("FAIL", detail))
        for name, _ in OPERATIONS:
            cells.setdefault(name, Cell("FAIL", f"not connected: {detail}"))
        logging.getLogger("sdk_client_check").exception("%s / %s: connect", kind, mode)
    return version, cells


def print_table(rows: list) -> int:
    """A Markdown table, then one line per distinct failure; returns the number of FAIL cells."""
    columns = ["connect"] + [name for name, _ in OPERATIONS]
    header = ["transport", "mode", "version", *columns]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    failed, notes = 0, []
    for kind, mode, version, cells in rows:
        print("| " + " | ".join([kind, mode, version, *(cells[column].status for column in columns)]) + " |")
        by_detail: dict = {}
        for column in columns:
            cell = cells[column]
            if cell.status == "FAIL":
                failed += 1
            if cell.status != "ok":
                by_detail.setdefault((cell.status, cell.detail), []).append(column)
        for (status, detail), names in by_detail.items():
            notes.append(f"{kind} / {mode} / {', '.join(names)}: {status}: {detail}")
    if notes:
        print("\nCells that are not ok:")
        for note in notes:
            print("  - " + note)
    return failed


async def main_async(args) -> int:
    workdir = tempfile.mkdtemp(prefix="sdk-client-check-")  # no stray .env in the server's cwd
    # The SDK logs transport errors with tracebacks; they go to a file, the table says what failed.
    logging.basicConfig(filename=str(Path(workdir) / "client.log"), level=logging.INFO, force=True)
    errlog = open(Path(workdir) / "stdio-servers.log", "w")
    rows = []
    oauth_env = {"MCP_AUTH": "builtin", "MCP_CONSENT": "never"}
    async with HttpServer(args.server_python, workdir) as http_server, \
            HttpServer(args.server_python, workdir, "oauth-server", oauth_env) as oauth_server:
        target = Target(python=args.server_python, workdir=workdir, http_port=http_server.port,
                        oauth_port=oauth_server.port, errlog=errlog)
        for kind in args.only:
            for mode in args.modes:
                version, cells = await run_combination(target, kind, mode)
                rows.append((kind, mode, version, cells))
                if args.verbose:
                    for name, cell in cells.items():
                        print(f"  {kind:10} {mode:18} {name:10} {cell.status:12} {cell.detail}", file=sys.stderr)
        if args.capture:
            from_capture = await capture_all(target, Path(args.capture))
            print(f"captured client traffic in {args.capture}: {', '.join(from_capture)}", file=sys.stderr)
    errlog.close()
    print(f"SDK: mcp {sdk_version()}; server: {SERVER.name}; logs in {workdir}\n")
    failed = print_table(rows)
    print(f"\n{len(rows)} combinations, {failed} failed operations")
    return 1 if failed else 0


def sdk_version() -> str:
    from importlib.metadata import version

    return version("mcp")


# ---------------------------------------------------------------------------------------------
# --capture: the raw bytes the SDK sends (fixtures for replay tests)
# ---------------------------------------------------------------------------------------------


class RecordingProxy:
    """A TCP proxy on a free loopback port that records both directions of every connection."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.chunks: list = []  # (connection number, "c2s" or "s2c", monotonic time, bytes)
        self.server = None
        self.port = None
        self._count = 0

    async def __aenter__(self) -> "RecordingProxy":
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, reader, writer) -> None:
        self._count += 1
        number = self._count
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pump(src, dst, direction):
            try:
                while data := await src.read(65536):
                    self.chunks.append((number, direction, time.monotonic(), data))
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    dst.close()

        await asyncio.gather(pump(reader, up_writer, "c2s"), pump(up_reader, writer, "s2c"))

    def requests(self) -> list:
        """The client's HTTP requests, in the order their first byte arrived."""
        streams: dict = {}
        for number, direction, at, data in self.chunks:
            if direction == "c2s":
                streams.setdefault(number, []).append((at, data))
        found = []
        for number, pieces in streams.items():
            buf, offsets, total = b"", [], 0
            for at, data in pieces:
                offsets.append((total, at))
                buf += data
                total += len(data)
            pos = 0
            while pos < len(buf):
                head_end = buf.index(b"\r\n\r\n", pos)
                head = buf[pos:head_end].decode("latin-1").split("\r\n")
                method, path, _ = head[0].split(" ", 2)
                headers = [tuple(part.strip() for part in line.split(":", 1)) for line in head[1:]]
                length = int(next((v for n, v in headers if n.lower() == "content-length"), "0"))
                assert not any(n.lower() == "transfer-encoding" for n, _ in headers), "chunked upload not handled"
                body = buf[head_end + 4:head_end + 4 + length]
                at = max(a for off, a in offsets if off <= pos)
                found.append({"at": at, "connection": number, "method": method, "path": path,
                              "headers": [list(h) for h in headers], "body": body.decode("utf-8")})
                pos = head_end + 4 + length
        found.sort(key=lambda r: r["at"])
        start = found[0]["at"] if found else 0
        for request in found:
            request["at"] = round(request["at"] - start, 4)
        return found

    def raw(self) -> bytes:
        out = []
        for number, direction, at, data in self.chunks:
            out.append(f"### connection {number} {direction} t={at:.4f} {len(data)} bytes\n".encode() + data + b"\n")
        return b"".join(out)


CAPTURE_OPS = ["tools/list", "simple", "args", "param-hdr", "elicit", "sampling", "roots", "logging", "progress",
               "resources", "templates", "prompts", "complete", "changes"]


async def run_ops(c, rec, names) -> None:
    ops = dict(OPERATIONS)
    for name in names:
        with anyio.fail_after(OP_TIMEOUT):
            await ops[name](c, rec)


async def capture_all(target: Target, outdir: Path) -> list:
    outdir.mkdir(parents=True, exist_ok=True)
    written = []
    # (a) stdio, Client(mode="legacy"): tee the subprocess's stdin and stdout.
    stdio_in, stdio_out = outdir / "stdio-legacy.in.jsonl", outdir / "stdio-legacy.out.jsonl"
    wrapper = Target(python=target.python, workdir=target.workdir, errlog=target.errlog,
                     stdio_wrapper=f"tee {shlex.quote(str(stdio_in))} | {{server}} --stdio | "
                                   f"tee {shlex.quote(str(stdio_out))}")
    rec = Recorder()
    async with connect(wrapper, "stdio", "legacy", rec) as c:
        await run_ops(c, rec, ["ping", *CAPTURE_OPS])
        await asyncio.sleep(0.2)  # the last notifications reach the tee
    written += [stdio_in.name, stdio_out.name]
    # (b) Streamable HTTP, Client(mode="legacy"); (c) Client(mode="auto"), which lands on 2026-07-28.
    for mode, stem in (("legacy", "http-legacy"), ("auto", "http-modern")):
        async with RecordingProxy(target.http_port) as proxy:
            rec = Recorder()
            async with connect(target, "http", mode, rec, port=proxy.port) as c:
                await run_ops(c, rec, ["ping", *CAPTURE_OPS] if mode == "legacy" else CAPTURE_OPS)
            await asyncio.sleep(0.2)  # let the DELETE / last bytes pass the proxy
        (outdir / f"{stem}.requests.json").write_text(json.dumps(proxy.requests(), indent=1))
        (outdir / f"{stem}.raw.txt").write_bytes(proxy.raw())
        written += [f"{stem}.requests.json", f"{stem}.raw.txt"]
    return written


def main() -> int:
    global SERVER
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(TRANSPORTS),
                        help="comma-separated transports: " + ",".join(TRANSPORTS))
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated modes (see the docstring)")
    parser.add_argument("--server-python", default=sys.executable, help="the Python that runs the server")
    parser.add_argument("--server-script", default=str(SERVER),
                        help="a server with everything_server.py's tools (default: that file)")
    parser.add_argument("--capture", metavar="DIR", help="also record the SDK's raw traffic into DIR")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every cell's detail as it runs")
    args = parser.parse_args()
    args.only = [t for t in args.only.split(",") if t]
    args.modes = [m for m in args.modes.split(",") if m]
    SERVER = Path(args.server_script).resolve()
    return anyio.run(main_async, args)


if __name__ == "__main__":
    sys.exit(main())
