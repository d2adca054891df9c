"""Tests of mcp_server.py, one class per section of the module (its docstring has the map).

How these tests work:

- The sans-IO core is driven directly: build a ``Context`` and ``await server._respond(ctx)``.
- Everything on the wire goes through real sockets (a raw HTTP/1.1 client below: status, headers,
  Content-Length and chunked bodies, SSE events) against the bundled HTTP server, run in a
  background thread with its own event loop, or through real subprocesses (stdio, the CLI).
- There are no sleeps and no timed assertions.  Cross-thread facts travel on ``threading.Event``s
  set by the tools themselves; every wait is bounded by ``WAIT`` only so that a hang fails
  instead of blocking the run (a passing test never comes near it).  Timeouts configured on a
  server (``header_timeout=0.3``) are limits under test, not assertions about duration.
- Random inputs are seeded, so a failure reproduces.
"""

import asyncio
import atexit
import base64
import collections
import contextlib
import dataclasses
import datetime
import enum
import hashlib
import http.client as http_client
import importlib.util
import io
import json
import logging
import os
import queue
import random
import re
import select
import selectors
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import textwrap
import threading
import weakref
import time
import uuid
from typing import Annotated, Literal, Optional, TypedDict, Union

import pytest

import mcp_server
from mcp_server import RedisStore, StoreUnavailable
from mcp_server import (
    Audio,
    Context,
    EmbeddedResource,
    Image,
    MCPServer,
    MemoryStore,
    Param,
    ResourceLink,
    RpcError,
    Settings,
    ToolError,
)

# Every log line the suite produces (in-process records and subprocess stderr), for the final
# check that none of them carries a secret (TestLogHygiene, last in this file).
_LOG_LINES: list = []


def _record_log(record: logging.LogRecord) -> bool:
    _LOG_LINES.append(record.getMessage() + " " + json.dumps(getattr(record, "fields", None) or {}, default=str)
                      + (" " + repr(record.exc_info[1]) if record.exc_info else ""))
    return True


mcp_server.log.addFilter(_record_log)  # a logger filter survives handler reconfiguration

ROOT = os.path.dirname(os.path.abspath(__file__))
NEUTRAL_CWD = tempfile.mkdtemp(prefix="mcp-test-cwd-")  # subprocesses run here: no stray .env
atexit.register(shutil.rmtree, NEUTRAL_CWD, True)
SERVER_FILE = os.path.join(ROOT, "mcp_server.py")
EVERYTHING_FILE = os.path.join(ROOT, "examples", "everything_server.py")
WAIT = 10.0  # the bound of every wait: reached only when something hangs
# Python 3.11 has no eager tasks: a request starts on the loop's next pass there, so what these
# tests pin down (answered within the callback that read it) is a 3.12+ behaviour.
EAGER_ONLY = pytest.mark.skipif(sys.version_info < (3, 12), reason="eager tasks need Python 3.12+")
LEGACY = "2025-11-25"
MODERN = "2026-07-28"
ACCEPT_BOTH = "application/json, text/event-stream"
META_VERSION = "io.modelcontextprotocol/protocolVersion"
META_CAPS = "io.modelcontextprotocol/clientCapabilities"
META_CLIENT = "io.modelcontextprotocol/clientInfo"
META_SERVERINFO = "io.modelcontextprotocol/serverInfo"
VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")
ERROR_ID = re.compile(r"error id ([0-9a-f]{6,})")


# =================================================================================================
# Shared fixtures and helpers
# =================================================================================================

# ---- probes: how a tool running in the server tells the test what happened ----------------------


class Probe:
    def __init__(self):
        self.started = threading.Event()
        self.finished = threading.Event()
        self.gate_ready = threading.Event()
        self.gate: asyncio.Event | None = None
        self.cancelled = None


_PROBES: dict = {}
_PROBES_LOCK = threading.Lock()


def probe(token: str) -> Probe:
    with _PROBES_LOCK:
        return _PROBES.setdefault(token, Probe())


def new_token(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


NAME_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


def build_server(store=None, **settings) -> MCPServer:
    """The server most tests talk to: a tool for every behaviour under test."""
    settings = {"auth": "none", **settings}  # transports under test; bearer tokens are section 7's
    server = MCPServer("test-server", version="9.9.9", instructions="Test instructions.",
                       title="Test Server", settings=Settings(**settings), store=store)

    @server.tool(title="Echo", annotations={"readOnlyHint": True},
                 icons=[{"src": "https://example.com/echo.png"}])
    def echo(text: str) -> str:
        """Echo the text back.

        Args:
            text: what to echo
        """
        return text

    @server.tool()
    def add(a: int, b: int = 3) -> dict:
        """Add two integers."""
        return {"sum": a + b}

    @server.tool()
    async def progress(steps: int = 3, ctx: Context = None) -> str:
        """Report progress, then finish."""
        for i in range(1, steps + 1):
            await ctx.report_progress(i, steps, f"step {i}")
        return "progress done"

    @server.tool()
    async def ask_name(ctx: Context) -> str:
        """Ask the user for a name."""
        answer = await ctx.elicit("What is your name?", NAME_SCHEMA, key="who")
        if answer.get("action") != "accept":
            return f"no name ({answer.get('action')})"
        return f"Hello, {answer['content']['name']}!"

    @server.tool()
    async def ask_two(ctx: Context) -> str:
        """Ask two questions, one round each."""
        first = await ctx.elicit("First name?", NAME_SCHEMA, key="first")
        second = await ctx.elicit("Second name?", NAME_SCHEMA, key="second")
        return f"{first['content']['name']} and {second['content']['name']}"

    @server.tool()
    async def hang(token: str, ctx: Context) -> str:
        """Wait forever (until cancelled)."""
        p = probe(token)
        p.started.set()
        try:
            await asyncio.Event().wait()
        finally:
            p.cancelled = ctx.cancelled
            p.finished.set()
        return "unreachable"

    @server.tool()
    async def reconnect(token: str, ctx: Context) -> str:
        """Close the SSE stream (2025-11-25 polling), then finish; gated tokens wait for the test."""
        await ctx.close_sse_stream()
        if token.startswith("gated"):
            p = probe(token)
            p.gate = asyncio.Event()
            p.gate_ready.set()
            await p.gate.wait()
        return f"resumed {token}"

    @server.tool()
    def boom() -> str:
        """Fail with an unexpected exception."""
        raise ValueError("secret-detail-xyz")

    @server.tool()
    def refuse() -> str:
        """Fail on purpose."""
        raise ToolError("nope, not today")

    @server.tool()
    def where_sync() -> dict:
        """Report the thread a sync tool runs on."""
        return {"thread": threading.get_ident()}

    @server.tool()
    async def where_async() -> dict:
        """Report the thread an async tool runs on."""
        return {"thread": threading.get_ident()}

    @server.resource("test://static", name="static", mime_type="text/plain")
    def static() -> str:
        return "static text"

    @server.resource("test://items/{id}", name="item", mime_type="text/plain")
    def item(id: str) -> str:
        if id == "missing":
            raise KeyError(id)
        return f"item {id}"

    @server.prompt(title="Greeting")
    def greeting(name: str, style: str = "plain") -> str:
        """Greet someone."""
        return f"Greet {name} in a {style} way."

    return server


# ---- an in-process server on a free port --------------------------------------------------------


class ServerThread:
    """``mcp_server._serve_http`` on its own event loop in a background thread."""

    def __init__(self, server: MCPServer):
        self.server = server
        server.settings.host = "127.0.0.1"
        server.settings.port = 0
        self.settings = server.settings
        self.loop = None
        self.stop = None
        self.port = None
        self.error = None
        self.thread = None

    def start(self) -> "ServerThread":
        ready = threading.Event()

        def on_ready(port):
            self.port = port
            ready.set()

        async def main():
            self.loop = asyncio.get_running_loop()
            self.stop = asyncio.Event()
            await mcp_server._serve_http(self.server.asgi, self.settings, self.server, ready=on_ready,
                                         stop=self.stop)

        def run():
            try:
                asyncio.run(main())
            except BaseException as exc:  # noqa: BLE001 - reported to the test thread
                self.error = exc
                ready.set()

        self.thread = threading.Thread(target=run, name="test-http-server", daemon=True)
        self.thread.start()
        assert ready.wait(WAIT), "server did not start"
        if self.error is not None:
            raise self.error
        return self

    def run(self, coro):
        """Run a coroutine on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT)

    def call_soon(self, fn, *args) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def close(self) -> None:
        if self.loop is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.stop.set)
            self.thread.join(WAIT + 12)


@pytest.fixture(scope="module")
def srv():
    st = ServerThread(build_server()).start()
    yield st
    st.close()


@pytest.fixture
def live(srv):
    """The shared server; after the test (whatever it sent) it must still answer normally."""
    yield srv
    assert_alive(srv.port)


@pytest.fixture
def make_server():
    started = []

    def make(server: MCPServer | None = None, **settings) -> ServerThread:
        st = ServerThread(server or build_server(**settings)).start()
        started.append(st)
        return st

    yield make
    for st in started:
        st.close()


def assert_alive(port: int) -> None:
    r = http(port, "POST", "/http", body={"method": "tools/call",
                                          "params": {"name": "echo", "arguments": {"text": "still here"}}})
    assert r.status == 200, r.body
    assert r.json()["content"] == [{"type": "text", "text": "still here"}]


# ---- a raw HTTP/1.1 client ------------------------------------------------------------------------


class Response:
    def __init__(self, status: int, reason: str, headers: list):
        self.status, self.reason, self.headers = status, reason, headers  # headers: [(lower name, value)]
        self.body = b""

    def header(self, name: str) -> str | None:
        values = [v for n, v in self.headers if n == name.lower()]
        return ", ".join(values) if values else None

    @property
    def content_type(self) -> str:
        return (self.header("content-type") or "").split(";")[0].strip().lower()

    def json(self):
        return json.loads(self.body)

    def events(self) -> list:
        return parse_sse(self.body.decode("utf-8"))

    def messages(self) -> list:
        """The JSON-RPC messages of the body: the JSON value, or the data of each SSE event."""
        if self.content_type == "text/event-stream":
            return [json.loads(e["data"]) for e in self.events() if e.get("data")]
        value = self.json()
        return value if isinstance(value, list) else [value]

    def __repr__(self):
        return f"<Response {self.status} {self.headers} {self.body[:300]!r}>"


def parse_sse(text: str) -> list:
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        event = parse_sse_block(block)
        if event is not None:
            events.append(event)
    return events


def parse_sse_block(block: str) -> dict | None:
    event, data = {}, []
    for line in block.split("\n"):
        if not line or line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        else:
            event[name] = value
    if not event and not data:
        return None
    if data:
        event["data"] = "\n".join(data)
    return event


class Conn:
    """One client connection; reads responses incrementally."""

    def __init__(self, port: int, timeout: float = WAIT):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = bytearray()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, method, path, headers=None, body=None) -> None:
        self.send(raw_request(method, path, headers, body))

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buf += data
        return True

    def read_line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[:end + 2]
                return line
            if not self._fill():
                raise EOFError("connection closed in the middle of a line")

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise EOFError("connection closed in the middle of a body")
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def read_head(self) -> Response:
        status_line = self.read_line()
        match = re.fullmatch(rb"HTTP/1\.[01] (\d{3}) ?(.*)", status_line)
        assert match, f"not an HTTP status line: {status_line!r}"
        headers = []
        while True:
            line = self.read_line()
            if not line:
                break
            name, _, value = line.partition(b":")
            headers.append((name.decode("latin-1").strip().lower(), value.decode("latin-1").strip()))
        return Response(int(match.group(1)), match.group(2).decode("latin-1"), headers)

    def iter_body(self, resp: Response, method: str = "GET"):
        if resp.status < 200 or resp.status in (204, 304) or method == "HEAD":
            return
        if "chunked" in (resp.header("transfer-encoding") or "").lower():
            while True:
                size = int(self.read_line().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.read_line():
                        pass  # trailers
                    return
                data = self.read_exact(size)
                assert self.read_exact(2) == b"\r\n", "chunk not followed by CRLF"
                yield data
        elif resp.header("content-length") is not None:
            n = int(resp.header("content-length"))
            if n:
                yield self.read_exact(n)
        else:
            if self.buf:
                yield bytes(self.buf)
                self.buf.clear()
            while self._fill():
                yield bytes(self.buf)
                self.buf.clear()

    def read_response(self) -> Response:
        resp = self.read_head()
        resp.body = b"".join(self.iter_body(resp))
        return resp

    def at_eof(self) -> bool:
        """True when the server closed the connection (after what was already read)."""
        if self.buf:
            return False
        try:
            return not self._fill()
        except ConnectionResetError:
            return True


class SSEStream:
    """Events of a streamed response, as they arrive."""

    def __init__(self, conn: Conn, resp: Response):
        assert resp.content_type == "text/event-stream", resp
        self.resp = resp
        self.pieces = conn.iter_body(resp)
        self.text = ""
        self.ended = False

    def next_event(self) -> dict | None:
        while True:
            normalized = self.text.replace("\r\n", "\n")
            end = normalized.find("\n\n")
            if end >= 0:
                block, self.text = normalized[:end], normalized[end + 2:]
                event = parse_sse_block(block)
                if event is not None:
                    return event
                continue
            if self.ended:
                return None
            try:
                self.text += next(self.pieces).decode("utf-8")
            except StopIteration:
                self.ended = True

    def next_message(self) -> dict | None:
        """The next event that carries a JSON-RPC message (priming events are skipped)."""
        while True:
            event = self.next_event()
            if event is None:
                return None
            if event.get("data"):
                return json.loads(event["data"])


def raw_request(method: str, path: str, headers=None, body=None, host: str = "localhost") -> bytes:
    pairs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    names = {n.lower() for n, _ in pairs}  # (a header given as None is left out, even a default one)
    pairs = [(n, v) for n, v in pairs if v is not None]
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    elif isinstance(body, str):
        body = body.encode()
    if body is not None and "content-type" not in names:
        pairs.append(("Content-Type", "application/json"))
    if "host" not in names:
        pairs.insert(0, ("Host", host))
    if body is not None and "content-length" not in names and "transfer-encoding" not in names:
        pairs.append(("Content-Length", str(len(body))))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in pairs) + "\r\n"
    return head.encode("latin-1") + (body or b"")


def http(port: int, method: str, path: str, headers=None, body=None) -> Response:
    with Conn(port) as conn:
        conn.request(method, path, headers, body)
        return conn.read_response()


def final_message(resp: Response, request_id) -> dict:
    """The JSON-RPC response to ``request_id`` in a JSON or SSE answer."""
    for message in resp.messages():
        if message.get("id") == request_id and ("result" in message or "error" in message):
            return message
    raise AssertionError(f"no response to {request_id!r} in {resp!r}")


def merge_headers(base: dict, overrides: dict | None) -> dict:
    merged = {k.lower(): (k, v) for k, v in base.items()}
    for k, v in (overrides or {}).items():
        merged[k.lower()] = (k, v)
    return {k: v for k, v in merged.values() if v is not None}


# ---- Streamable HTTP clients ------------------------------------------------------------------


class Session:
    """A legacy Streamable HTTP client session."""

    def __init__(self, port: int, version: str = LEGACY, capabilities: dict | None = None):
        self.port, self.version = port, version
        self.capabilities = capabilities or {}
        self.sid = None
        self._id = 0
        self.init_result = None

    def next_id(self) -> int:
        self._id += 1
        return self._id

    def headers(self, extra: dict | None = None) -> dict:
        base = {"Content-Type": "application/json", "Accept": ACCEPT_BOTH}
        if self.sid:
            base["Mcp-Session-Id"] = self.sid
            if self.version >= "2025-06-18":
                base["MCP-Protocol-Version"] = self.version
        return merge_headers(base, extra)

    def post(self, message, headers: dict | None = None) -> Response:
        return http(self.port, "POST", "/mcp", self.headers(headers), message)

    def body(self, method: str, params: dict | None = None, request_id=None) -> dict:
        message = {"jsonrpc": "2.0", "id": self.next_id() if request_id is None else request_id, "method": method}
        if params is not None:
            message["params"] = params
        return message

    def initialize(self) -> Response:
        r = self.post(self.body("initialize", {"protocolVersion": self.version, "capabilities": self.capabilities,
                                               "clientInfo": {"name": "pytest", "version": "1.0"}}))
        assert r.status == 200, r
        self.sid = r.header("mcp-session-id")
        self.init_result = final_message(r, self._id)["result"]
        n = self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})
        assert n.status == 202, n
        return r

    def request(self, method: str, params: dict | None = None, headers: dict | None = None) -> dict:
        message = self.body(method, params)
        r = self.post(message, headers)
        assert r.status == 200, r
        return final_message(r, message["id"])

    def call(self, name: str, arguments: dict | None = None) -> dict:
        reply = self.request("tools/call", {"name": name, "arguments": arguments or {}})
        assert "result" in reply, reply
        return reply["result"]

    def delete(self) -> Response:
        return http(self.port, "DELETE", "/mcp", self.headers())


def modern_body(method: str, params: dict | None = None, request_id=1, caps: dict | None = None) -> dict:
    params = dict(params or {})
    params["_meta"] = {META_VERSION: MODERN, META_CAPS: caps or {},
                       META_CLIENT: {"name": "pytest", "version": "1.0"}, **params.get("_meta", {})}
    return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}


def modern_headers(body: dict, overrides: dict | None = None) -> dict:
    base = {"Content-Type": "application/json", "Accept": ACCEPT_BOTH, "MCP-Protocol-Version": MODERN,
            "Mcp-Method": body.get("method")}
    field = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}.get(body.get("method"))
    if field:
        base["Mcp-Name"] = body["params"][field]
    return merge_headers(base, overrides)


def modern_post(port: int, method: str, params: dict | None = None, *, caps=None, request_id=1,
                headers: dict | None = None, body=None) -> Response:
    body = body if body is not None else modern_body(method, params, request_id, caps)
    return http(port, "POST", "/mcp", modern_headers(body, headers), body)


def assert_rpc_error(resp: Response, status: int, code: int) -> dict:
    assert resp.status == status, resp
    assert resp.content_type == "application/json", resp
    body = resp.json()
    assert body["jsonrpc"] == "2.0" and body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


# ---- sans-IO core calls ------------------------------------------------------------------------


def core(server: MCPServer, method: str, params: dict | None = None, *, request_id=1, version=LEGACY,
         modern=False, caps=None, session=None) -> tuple:
    """(response, status) of one request through ``MCPServer._respond``."""
    async def go():
        ctx = Context(server, method, params or {}, request_id, version=version, modern=modern,
                      capabilities=caps, session=session)
        return await server._respond(ctx)
    return asyncio.run(go())


async def _threads_of(server, tool_name: str, count: int) -> list:
    """The thread each of ``count`` calls of a tool that returns {"thread": ...} ran on."""
    ctx = mcp_server.Context(server, "tools/call", {})
    return [(await server._tools[tool_name].invoke({}, ctx))["thread"] for _ in range(count)]


def core_result(server, method, params=None, **kw) -> dict:
    response, status = core(server, method, params, **kw)
    assert status == 200 and "result" in response, (status, response)
    return response["result"]


def core_error(server, method, params=None, **kw) -> tuple:
    response, status = core(server, method, params, **kw)
    assert "error" in response, response
    return response["error"], status


def modern_core(server, method, params=None, caps=None, **kw) -> tuple:
    return core(server, method, params, version=MODERN, modern=True, caps=caps or {}, **kw)


# ---- subprocesses --------------------------------------------------------------------------------


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MCP_", "MASK_MCP_", "REDIS_"))
           and k not in ("LOG_LEVEL", "SESSION_TTL", "APP_VERSION", "TOKEN_PARAMETER")}
    env["MCP_DRAIN_SECONDS"] = "0"  # the suite's SIGTERMs stop at once; TestDrainAndDeploy sets its own
    env.update(extra)
    return env


class Proc:
    """A subprocess whose stdout lines and stderr are collected by threads (bounded reads)."""

    def __init__(self, argv: list, cwd: str = NEUTRAL_CWD, env: dict | None = None):
        self.proc = subprocess.Popen([sys.executable, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, cwd=cwd, env=env or clean_env())
        self.out_lines: queue.Queue = queue.Queue()
        self.err_lines: queue.Queue = queue.Queue()
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.notifications: list = []
        self._threads = [threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout, self.out_lines),
                                          daemon=True),
                         threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr, self.err_lines),
                                          daemon=True)]
        for t in self._threads:
            t.start()
        self._id = 0

    @staticmethod
    def _pump(stream, sink: bytearray, lines: queue.Queue) -> None:
        for line in stream:
            sink.extend(line)
            lines.put(line)
        lines.put(None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(WAIT)
        for t in self._threads:
            t.join(WAIT)
        _LOG_LINES.extend(bytes(self.stderr).decode("utf-8", "replace").splitlines())

    def send(self, message) -> None:
        data = message if isinstance(message, bytes) else (json.dumps(message) + "\n").encode()
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def recv(self) -> dict:
        line = self.out_lines.get(timeout=WAIT)
        if line is None:
            raise EOFError(f"stdout closed; stderr: {bytes(self.stderr)[-2000:]!r}")
        return json.loads(line)

    def err_line(self) -> str | None:
        line = self.err_lines.get(timeout=WAIT)
        return None if line is None else line.decode("utf-8", "replace")

    def request(self, method: str, params: dict | None = None, request_id=None) -> dict:
        if request_id is None:
            self._id += 1
            request_id = self._id
        message = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        self.send(message)
        while True:
            reply = self.recv()
            if reply.get("id") == request_id and ("result" in reply or "error" in reply):
                return reply
            self.notifications.append(reply)

    def initialize(self, version: str = LEGACY, capabilities: dict | None = None) -> dict:
        reply = self.request("initialize", {"protocolVersion": version, "capabilities": capabilities or {},
                                            "clientInfo": {"name": "pytest", "version": "1.0"}})
        self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return reply

    def finish(self) -> int:
        """Close stdin (EOF) and wait for the exit; returns the exit code."""
        self.proc.stdin.close()
        code = self.proc.wait(WAIT)
        for t in self._threads:
            t.join(WAIT)
        return code


def run_cli(args: list, env: dict | None = None, cwd: str = NEUTRAL_CWD) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SERVER_FILE, *args], capture_output=True, text=True,
                          timeout=WAIT * 3, env=env or clean_env(), cwd=cwd, stdin=subprocess.DEVNULL)


PRINTER_SCRIPT = textwrap.dedent('''
    import os, sys
    sys.path.insert(0, {root!r})
    from mcp_server import MCPServer

    server = MCPServer("printer", version="1.0.0")

    @server.tool()
    def noisy(text: str) -> str:
        """A tool that prints."""
        print("NOISE from print()", text)
        sys.stdout.write("more noise\\n")
        sys.stdout.flush()
        os.write(1, b"raw fd noise\\n")
        return "quiet " + text

    @server.tool()
    async def noisy_async() -> str:
        print("async noise")
        return "ok"

    @server.tool()
    def boom() -> str:
        raise ValueError("secret-detail-xyz")

    if __name__ == "__main__":
        server.run()
''')


@pytest.fixture
def printer_script(tmp_path):
    path = tmp_path / "printer_server.py"
    path.write_text(PRINTER_SCRIPT.format(root=ROOT))
    return str(path)


class FakeClock:
    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# =================================================================================================
# 1. Settings and errors
# =================================================================================================


class TestSettings:
    @pytest.fixture(autouse=True)
    def _isolated_cwd(self, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)  # no stray .env

    def test_defaults(self):
        s = Settings.load([], environ={})
        assert (s.host, s.port, s.stdio, s.mcp_path, s.response_mode) == ("127.0.0.1", 6901, False, "/mcp", "auto")

    def test_canonical_environment_names(self):
        s = Settings.load([], environ={"MCP_HOST": "0.0.0.0", "MCP_PORT": "7001", "MCP_STDIO": "yes",
                                       "MCP_ALLOWED_ORIGINS": "https://a.example, https://b.example",
                                       "MCP_HEADER_TIMEOUT": "2.5", "MCP_EXPOSE_ERRORS": "true"})
        assert s.host == "0.0.0.0" and s.port == 7001 and s.stdio is True
        assert s.allowed_origins == ("https://a.example", "https://b.example")
        assert s.header_timeout == 2.5 and s.expose_errors is True

    def test_seed_environment_names(self):
        s = Settings.load([], environ={"MASK_MCP_HOST": "0.0.0.0", "MASK_MCP_PORT": "7002",
                                       "SESSION_TTL": "99", "LOG_LEVEL": "debug"})
        assert (s.host, s.port, s.session_ttl, s.log_level) == ("0.0.0.0", 7002, 99, "debug")

    def test_canonical_name_wins_over_seed_name(self):
        s = Settings.load([], environ={"MASK_MCP_PORT": "7002", "MCP_PORT": "7003"})
        assert s.port == 7003

    def test_empty_environment_value_means_unset(self):
        assert Settings.load([], environ={"MCP_PORT": ""}).port == 6901

    def test_dotenv_in_cwd(self, tmp_path):
        (tmp_path / ".env").write_text(textwrap.dedent("""\
            # a comment
            export MCP_PORT=7010
            MCP_HOST="0.0.0.0"
            MCP_PATH='/rpc'

            NOT A SETTING LINE
        """))
        s = Settings.load([], environ={})
        assert (s.port, s.host, s.mcp_path) == (7010, "0.0.0.0", "/rpc")

    def test_environment_overrides_dotenv_and_flags_override_environment(self, tmp_path):
        (tmp_path / ".env").write_text("MCP_PORT=7010\nMCP_HOST=10.0.0.1\nMCP_PATH=/x\n")
        s = Settings.load([], environ={"MCP_PORT": "7020", "MCP_HOST": "10.0.0.2"})
        assert (s.port, s.host, s.mcp_path) == (7020, "10.0.0.2", "/x")
        s = Settings.load(["--port", "7030", "--stdio", "--path", "/y/"], environ={"MCP_PORT": "7020"})
        assert (s.port, s.stdio, s.mcp_path) == (7030, True, "/y")

    def test_flags_parse_their_types(self):
        s = Settings.load(["--allowed-origins", "https://a.example,https://b.example", "--max-body", "10",
                           "--response-mode", "json", "--session-ttl", "5"], environ={})
        assert s.allowed_origins == ("https://a.example", "https://b.example")
        assert (s.max_body, s.response_mode, s.session_ttl) == (10, "json", 5)

    @pytest.mark.parametrize("argv, environ, fragment", [
        (["--bogus"], {}, "--bogus"),
        (["--port", "abc"], {}, "--port"),
        (["--port", "70000"], {}, "70000"),
        (["--response-mode", "xml"], {}, "xml"),
        (["--log-level", "loud"], {}, "loud"),
        (["--path", "mcp"], {}, "must start with /"),
        ([], {"MCP_PORT": "abc"}, "MCP_PORT"),
        ([], {"MASK_MCP_PORT": "12x"}, "MASK_MCP_PORT"),
        ([], {"MCP_STDIO": "maybe"}, "MCP_STDIO"),
        ([], {"MCP_MAX_BODY": "0"}, "max_body"),
        ([], {"MCP_HEADER_TIMEOUT": "soon"}, "MCP_HEADER_TIMEOUT"),
        ([], {"MCP_BUSY_POLL_US": "-1"}, "MCP_BUSY_POLL_US"),
        ([], {"MCP_BUSY_POLL_US": "20000"}, "MCP_BUSY_POLL_US"),
    ])
    def test_bad_input_is_one_line_system_exit(self, argv, environ, fragment, capsys):
        with pytest.raises(SystemExit) as info:
            Settings.load(argv, environ=environ)
        message = info.value.code
        assert isinstance(message, str), message
        assert "\n" not in message and message.startswith("mcp_server.py: error:")
        assert fragment in message
        assert capsys.readouterr().err == ""  # argparse printed no usage block

    def test_bad_dotenv_value_names_the_variable(self, tmp_path):
        (tmp_path / ".env").write_text("MCP_PORT=eighty\n")
        with pytest.raises(SystemExit) as info:
            Settings.load([], environ={})
        assert "MCP_PORT" in info.value.code and "\n" not in info.value.code

    def test_help_lists_every_flag_and_environment_variable(self, capsys):
        with pytest.raises(SystemExit) as info:
            Settings.load(["--help"], environ={})
        assert info.value.code in (0, None)
        text = capsys.readouterr().out
        for _attr, flag, names, *_rest in mcp_server._SETTING_SPECS:
            if flag:
                assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), flag
            for name in names:
                assert re.search(rf"\b{name}\b", text), name

    def test_rpc_error_shape(self):
        err = RpcError(-32602, "Bad thing.", {"field": "x"}, 400)
        assert err.to_dict() == {"code": -32602, "message": "Bad thing.", "data": {"field": "x"}}
        assert err.status == 400
        assert RpcError(-32601, "No.").to_dict() == {"code": -32601, "message": "No."}


class _Writes:
    """A text stream that remembers each write (what a handler hands the operating system)."""

    def __init__(self):
        self.writes = []

    def write(self, text):
        self.writes.append(text)

    def flush(self):
        pass

    def lines(self):
        return "".join(self.writes).splitlines()


class TestConcurrency:
    """The concurrency helpers of section 1, on asyncio and on trio (through anyio)."""

    BACKENDS = ["asyncio", pytest.param("trio", marks=pytest.mark.skipif(
        importlib.util.find_spec("trio") is None, reason="trio is not installed"))]

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_a_cancel_scope_takes_back_its_own_cancellation_and_no_other(self, backend):
        import anyio

        async def main():
            outcomes = []
            with mcp_server._cancel_scope() as scope:
                async def cancel_soon():
                    scope.cancel()
                async with anyio.create_task_group() as group:
                    group.start_soon(cancel_soon)
                    await anyio.sleep_forever()
            outcomes.append(scope.cancelled_caught)
            with mcp_server._cancel_scope(0.01) as limited:
                await anyio.sleep_forever()
            outcomes.append(limited.cancelled_caught)
            with mcp_server._cancel_scope(5) as untouched:
                await anyio.sleep(0)
            outcomes.append(untouched.cancelled_caught)
            with anyio.CancelScope() as outer:  # someone else's cancellation goes through an inner scope
                with mcp_server._cancel_scope() as inner:
                    outer.cancel()
                    await anyio.sleep_forever()
            outcomes.append((inner.cancelled_caught, outer.cancelled_caught))
            await anyio.sleep(0)  # nothing is left pending on the task
            return outcomes
        assert anyio.run(main, backend=backend) == [True, True, False, (False, True)]

    def test_a_deadline_reached_during_an_outer_cancellation_does_not_swallow_it(self):
        """asyncio folds cancellations into one CancelledError: a tool's deadline that passes
        while the client's cancellation is still unwinding must let that one go on out."""
        import anyio

        async def main():
            after = []
            with mcp_server._cancel_scope() as outer:
                with mcp_server._cancel_scope(60) as inner:
                    try:
                        outer.cancel()
                        await anyio.sleep_forever()
                    finally:
                        inner.cancel()  # the deadline, reached while the cleanup still waits
                        await anyio.sleep(0)
                after.append("ran on after the inner scope")
            return outer.cancelled_caught, inner.cancelled_caught, after
        assert asyncio.run(main()) == (True, False, [])

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_a_thread_keeps_its_slot_until_it_ends_though_its_caller_gave_up(self, backend):
        """MCP_TOOL_THREADS caps threads: a call that timed out leaves its thread running, and
        that thread keeps its slot (anyio's limiter on asyncio gives it back at once)."""
        import anyio
        release, lock, state = threading.Event(), threading.Lock(), {"running": 0, "peak": 0}

        def blocked():
            with lock:
                state["running"] += 1
                state["peak"] = max(state["peak"], state["running"])
            release.wait(WAIT)
            with lock:
                state["running"] -= 1
            return "done"

        async def main():
            limiter = anyio.CapacityLimiter(2)
            for _ in range(3):  # three waves of callers that give up: two threads at most
                async with anyio.create_task_group() as group:
                    for _ in range(3):
                        group.start_soon(gives_up, limiter)
            assert limiter.borrowed_tokens == 2  # the two blocked threads hold theirs
            release.set()
            with anyio.fail_after(WAIT):
                while limiter.borrowed_tokens:  # (given back as each thread ends)
                    await anyio.sleep(0.01)
            with anyio.fail_after(WAIT):
                return await mcp_server._in_thread(lambda: "after", limiter)

        async def gives_up(limiter):
            with anyio.move_on_after(0.05):
                await mcp_server._in_thread(blocked, limiter)
        assert anyio.run(main, backend=backend) == "after"
        assert state["peak"] == 2

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_an_inbox_ends_when_its_reader_falls_too_far_behind(self, backend):
        import anyio

        async def main():
            inbox = mcp_server._Inbox(3)
            quiet = await inbox.get(0.01)
            for item in range(5):  # two past the bound: the inbox closes
                inbox.put(item)
            got = [await inbox.get(1) for _ in range(4)]
            return quiet is inbox.QUIET, inbox.overflowed, got
        assert anyio.run(main, backend=backend) == (True, True, [0, 1, 2, None])

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_background_jobs_fail_alone_and_end_when_cancelled(self, backend, caplog):
        import anyio

        async def main():
            background, ran = mcp_server._Background(), []

            async def fails():
                raise ValueError("boom")

            async def waits():
                try:
                    await anyio.sleep_forever()
                finally:
                    ran.append("cancelled")
            async with background.serving():
                background.spawn(fails())
                job = background.spawn(waits())
                await anyio.sleep(0.01)
                assert not job.done
                job.cancel()
                await job.ended.wait()
                background.spawn(waits())  # still running at shutdown: cancelled then
            return ran, background.jobs
        with caplog.at_level(logging.ERROR, logger="mcp_server"):
            ran, left = anyio.run(main, backend=backend)
        assert ran == ["cancelled", "cancelled"] and not left
        assert any("background task failed" in r.getMessage() for r in caplog.records)

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_gather_keeps_order_and_raises_the_first_failure_itself(self, backend):
        import anyio

        async def value(v, delay):
            await anyio.sleep(delay)
            return v

        async def fails():
            raise ToolError("no")

        async def main():
            results = await mcp_server._gather(value("a", 0.02), value("b", 0))
            try:
                await mcp_server._gather(value("c", 5), fails())
            except ToolError as exc:
                return results, str(exc)
        assert anyio.run(main, backend=backend) == (["a", "b"], "no")

    def test_trio_without_a_lifespan_is_refused_before_anything_is_held(self):
        """Without lifespan events on trio nothing could run in the background: every request is
        a 503 that says so, before it takes a stream or a fetch slot."""
        trio = pytest.importorskip("trio")
        server = build_server()
        sent = []

        async def main():
            async def receive():
                return {"type": "http.request", "body": b"", "more_body": False}

            async def send(message):
                sent.append(message)
            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
                     "scheme": "http", "path": "/mcp", "raw_path": b"/mcp", "query_string": b"", "root_path": "",
                     "headers": [(b"host", b"localhost"), (b"accept", b"text/event-stream")],
                     "client": ("127.0.0.1", 5555), "server": ("127.0.0.1", 8000)}
            await server.asgi(scope, receive, send)
        trio.run(main)
        body = json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))
        assert sent[0]["status"] == 503 and "lifespan" in body["error"]["message"]
        assert not server._live_runtime.session_streams and not server._live_runtime.held

    def test_trio_without_a_lifespan_cannot_start_background_work(self):
        trio = pytest.importorskip("trio")

        async def main():
            async def nothing():
                return None
            with pytest.raises(RuntimeError, match="needs the ASGI lifespan"):
                mcp_server._Background().spawn(nothing())
        trio.run(main)

    def test_a_session_stream_that_falls_behind_ends(self):
        server = build_server(stream_buffer=4)

        async def main():
            stream = mcp_server._SessionStream(server._runtime(), None, "sid", LEGACY, False)
            for n in range(10):
                stream.put({"n": n})
            return stream.overflowed, stream._items
        overflowed, items = asyncio.run(main())
        assert overflowed and items == [{"n": 0}, {"n": 1}, {"n": 2}, {"n": 3}, None]


class TestLogLines:
    @pytest.fixture
    def logger(self):
        stream = _Writes()
        handler = mcp_server._StderrLog(stream)
        handler.setFormatter(mcp_server._JsonFormatter())
        logger = logging.Logger("test-log-lines")
        logger.addHandler(handler)
        logger.setLevel("INFO")
        return logger, handler, stream

    def test_stamps_match_datetime_across_seconds_days_and_years(self):
        rng = random.Random(20261124)
        json_formatter, text_formatter = mcp_server._JsonFormatter(), mcp_server._TextFormatter()
        created = 1.7e9
        for _ in range(3000):  # ascending, mostly within the second just stamped, now and then far on
            created = int(created + (rng.choice((0.0, 0.0, 1.0, 86400.0 * rng.randint(1, 900))))) \
                + rng.randint(0, 999) / 1000 + 0.0004  # (mid-millisecond: no rounding at the edge)
            made = json.loads(json_formatter.line(created, "info", "e", {}))["time"]
            assert made == datetime.datetime.fromtimestamp(created, datetime.timezone.utc).isoformat(
                timespec="milliseconds").replace("+00:00", "Z")
            assert text_formatter.line(created, "info", "e", {}).split(" ")[0] == \
                time.strftime("%H:%M:%S", time.localtime(created))

    def test_a_record_and_a_line_made_from_its_parts_read_the_same(self):
        formatter = mcp_server._JsonFormatter()
        record = logging.makeLogRecord({"msg": "request", "levelname": "INFO", "levelno": 20,
                                        "fields": {"status": 200, "route": "/mcp", "odd": object}})
        assert formatter.format(record) == formatter.line(record.created, "info", "request",
                                                          {"status": 200, "route": "/mcp", "odd": object})
        assert json.loads(formatter.format(record))["odd"] == str(object)  # any type: its str()
        try:
            raise ValueError('a "quoted" failure')
        except ValueError:
            failed = logging.makeLogRecord({"msg": "it \"broke\"", "levelname": "ERROR", "exc_info": sys.exc_info(),
                                            "fields": {"tool": "t"}})
        entry = json.loads(formatter.format(failed))
        assert list(entry) == ["time", "level", "event", "tool", "error"] and entry["event"] == 'it "broke"'
        assert entry["level"] == "error" and entry["error"].endswith('ValueError: a "quoted" failure')

    def test_an_access_line_reads_as_the_general_line_of_the_same_fields(self):
        rng = random.Random(7)
        texts = ["POST", "/mcp", "127.0.0.1", "-", 'a "quoted" \\ one', "é\u2028\x01", "0123abcd"]

        async def lines():  # (the request and trace ids are the context's, as in a request)
            made = []
            for n in range(300):
                mcp_server._request_id.set(rng.choice([None, "req-1", 'id"with\\quote']))
                mcp_server._trace_id.set(rng.choice([None, "4bf92f3577b34da6a3ce929d0e0e4736"]))
                values = (rng.choice(texts), rng.choice(texts), rng.choice([200, 404, 500]),
                          rng.choice([0.0, 0.12, 15.5, 1234.57]), rng.choice([None, "3f2a9c1b7e4d"]),
                          rng.choice(texts))
                if n % 50 == 0:  # another type than a request's: the general way, the same text
                    values = values[:5] + ((rng.choice(texts), 1),)
                created = 1.7e9 + rng.random() * 1e6
                for formatter in (mcp_server._JsonFormatter(), mcp_server._TextFormatter()):
                    fields = mcp_server._log_fields(dict(zip(mcp_server._ACCESS_FIELDS, values)))
                    made.append((formatter.access_line(created, values),
                                 formatter.line(created, "info", "request", fields)))
            return made
        for fast, general in asyncio.run(lines()):
            assert fast == general

    def test_the_event_loops_lines_leave_together_at_the_end_of_its_iteration(self, logger):
        log, _handler, stream = logger

        async def go():
            for n in range(3):
                log.info("line %d", n)
            assert stream.writes == []  # still inside this iteration
            await asyncio.sleep(0)
            assert len(stream.writes) == 1 and [json.loads(s)["event"] for s in stream.lines()] == \
                ["line 0", "line 1", "line 2"]
            log.info("before")
            log.warning("at once")  # a warning does not wait, and what waited goes first
            assert [json.loads(s)["event"] for s in stream.lines()[3:]] == ["before", "at once"]
        asyncio.run(go())

    def test_writes_wait_for_the_end_of_the_pass_unless_the_last_pass_had_one_sender(self):
        """A held pass (a connection's data arriving) that writes goes at once while the last pass
        wrote for at most one connection (one client waiting for each answer); a second sender in
        the same pass waits for the end of the pass, and so does every sender in the pass after."""
        async def go():
            loop = asyncio.get_running_loop()
            end = mcp_server._end_of_pass_writes(loop)
            assert mcp_server._end_of_pass_writes(loop) is end
            done = []
            end.add(lambda: done.append("a"))
            end.add(lambda: done.append("b"))
            assert done == []
            await asyncio.sleep(0)
            assert done == ["a", "b"]  # one callback, in the order added
            end.hold()  # (as while a connection's data arrives)
            end.add(lambda: done.append("c"))
            assert done == ["a", "b"]
            end.release()  # the last pass had no sender: this one goes now
            assert done == ["a", "b", "c"]
            loop.call_soon(lambda: done.append("other"))
            end.hold()
            end.add(lambda: done.append("d"))
            end.release()  # a second sender in this pass: it waits for the end of the pass
            assert done == ["a", "b", "c"]
            await asyncio.sleep(0)
            assert done[3:] == ["d", "other"]  # (the end of the pass was scheduled by "c")
            end.hold()
            end.add(lambda: done.append("e"))
            end.release()  # the last pass had two senders: this one waits too
            assert done[5:] == []
            await asyncio.sleep(0)
            assert done[5:] == ["e"]
            end.hold()
            end.add(lambda: done.append("f"))
            end.release()  # the last pass had one: at once again
            assert done[6:] == ["f"]
            errors = []
            loop.set_exception_handler(lambda _loop, context: errors.append(context["exception"]))

            def fail():
                raise OSError("the disk is full")
            end.add(fail)
            end.add(lambda: done.append("g"))
            await asyncio.sleep(0)
            assert done[-1] == "g" and [type(e) for e in errors] == [OSError]  # the others still ran
            return end
        first = asyncio.run(go())
        assert asyncio.run(go()) is not first  # each loop has its own

    def test_lines_from_another_thread_and_outside_a_loop_are_written_at_once(self, logger):
        log, _handler, stream = logger
        log.info("no loop")
        assert len(stream.writes) == 1

        async def go():
            thread = threading.Thread(target=log.info, args=("from a thread",))
            thread.start()
            thread.join(WAIT)
            assert [json.loads(s)["event"] for s in stream.lines()] == ["no loop", "from a thread"]
        asyncio.run(go())

    def test_what_waits_is_written_when_logging_shuts_down(self, logger):
        log, handler, stream = logger

        async def go():
            log.info("last words")
            logging.shutdown([weakref.ref(handler)])
            assert [json.loads(s)["event"] for s in stream.lines()] == ["last words"]
        asyncio.run(go())

    def test_access_lines_reach_anyone_elses_handler_the_standard_way(self, monkeypatch):
        stderr, records = _Writes(), []
        monkeypatch.setattr(sys, "stderr", stderr)
        logger = mcp_server.log
        saved = logger.handlers[:], logger.level, logger.propagate
        call = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping"}).encode()

        async def ping(server, request_id):
            headers = {"content-type": "application/json", "accept": ACCEPT_BOTH, "x-request-id": request_id}
            status, _h, _b = await asgi_request(server.asgi, "POST", "/http", headers=headers, body=call)
            assert status == 200
        try:
            mcp_server._configure_logging("info", "json")
            server = build_server(access_log=True)
            asyncio.run(ping(server, "ours-only"))
            collector = logging.Handler()
            collector.emit = records.append
            logger.addHandler(collector)
            asyncio.run(ping(server, "and-theirs"))
            logger.removeHandler(collector)
            logger.handlers[0].setFormatter(logging.Formatter("%(levelname)s %(message)s"))  # their format
            asyncio.run(ping(server, "their-format"))
        finally:
            logger.handlers[:] = saved[0]
            logger.setLevel(saved[1])
            logger.propagate = saved[2]
        assert stderr.lines()[2:] == ["INFO request"]
        lines = [json.loads(line) for line in stderr.lines()[:2]]
        assert [(e["event"], e["request_id"], e["route"], e["status"]) for e in lines] == \
            [("request", "ours-only", "/http", 200), ("request", "and-theirs", "/http", 200)]
        assert list(lines[0]) == list(lines[1]) == ["time", "level", "event", "request_id", "method", "route",
                                                    "status", "duration_ms", "session", "client"]
        assert [(r.getMessage(), r.fields["route"]) for r in records] == [("request", "/http")]


# =================================================================================================
# 2. Store
# =================================================================================================


def arun(coro):
    return asyncio.run(coro)


class TestStore:
    def test_ttl_expiry_with_a_fake_clock(self):
        clock = FakeClock()
        store = MemoryStore(clock=clock)

        async def go():
            await store.set("k", {"v": 1}, ttl=10)
            await store.set("forever", 1)
            clock.advance(9.9)
            assert await store.get("k") == {"v": 1}
            clock.advance(0.1)
            assert await store.get("k") is None
            clock.advance(10 ** 6)
            assert await store.get("forever") == 1
        arun(go())
        assert len(store) == 1

    def test_len_counts_only_live_entries(self):
        clock = FakeClock()
        store = MemoryStore(clock=clock)

        async def go():
            for i in range(5):
                await store.set(f"k{i}", i, ttl=i + 1)
        arun(go())
        assert len(store) == 5
        clock.advance(2.5)
        assert len(store) == 3
        clock.advance(100)
        assert len(store) == 0

    def test_get_touch_slides_the_expiry(self):
        clock = FakeClock()
        store = MemoryStore(clock=clock)

        async def go():
            await store.set("s", "session", ttl=10)
            clock.advance(8)
            assert await store.get_refreshed("s", 10) == "session"
            clock.advance(8)  # 16 s after set, 8 after the touch
            assert await store.get("s") == "session"
            clock.advance(2)  # 10 s after the touch
            assert await store.get_refreshed("s", 10) is None
            assert await store.get_refreshed("never-set", 10) is None
        arun(go())

    def test_lru_eviction_past_max_keys(self):
        store = MemoryStore(max_keys=3)

        async def go():
            for key in "abc":
                await store.set(key, key)
            assert await store.get("a") == "a"  # a is now the most recently used
            await store.set("d", "d")
            assert await store.get("b") is None  # the least recently used went
            assert [await store.get(k) for k in "acd"] == ["a", "c", "d"]
            await store.set("c", "c2")  # an overwrite is a use, not a new key
            await store.set("e", "e")
            assert await store.get("a") is None
            assert await store.get("c") == "c2"
        arun(go())
        assert len(store) == 3

    def test_take_is_single_use(self):
        store = MemoryStore()

        async def go():
            await store.set("code", {"x": 1}, ttl=60)
            assert await store.pop("code") == {"x": 1}
            assert await store.pop("code") is None
            assert await store.get("code") is None
        arun(go())

    def test_take_of_an_expired_value_is_none(self):
        clock = FakeClock()
        store = MemoryStore(clock=clock)

        async def go():
            await store.set("code", 1, ttl=1)
            clock.advance(1)
            assert await store.pop("code") is None
        arun(go())

    def test_add_only_if_absent(self):
        clock = FakeClock()
        store = MemoryStore(clock=clock)

        async def go():
            assert await store.add("nonce", 1, ttl=5) is True
            assert await store.add("nonce", 2, ttl=5) is False
            assert await store.get("nonce") == 1
            clock.advance(5)
            assert await store.add("nonce", 3, ttl=5) is True  # the old one expired
            assert await store.get("nonce") == 3
        arun(go())

    def test_delete_reports_whether_a_live_key_went(self):
        store = MemoryStore()

        async def go():
            await store.set("k", 1)
            assert await store.delete("k") is True
            assert await store.delete("k") is False
        arun(go())

    def test_delete_of_an_expired_key_reports_false(self):
        # An expired key is gone as far as every reader can tell; deleting it deletes nothing.
        clock = FakeClock()
        store = MemoryStore(clock=clock)

        async def go():
            await store.set("k", 1, ttl=5)
            clock.advance(6)
            return await store.delete("k")
        assert arun(go()) is False
        assert len(store) == 0

    def test_incr(self):
        store = MemoryStore()

        async def go():
            assert [await store.incr("n", 60) for _ in range(3)] == [1, 2, 3]
        arun(go())

    def test_append_and_read_after_a_bounded_log(self):
        clock = FakeClock()
        store = MemoryStore(clock=clock)

        async def go():
            seqs = [await store.append("log", {"n": i}, 3, 60) for i in range(5)]
            assert seqs == [1, 2, 3, 4, 5]
            assert await store.read_after("log", 0) == [(3, {"n": 2}), (4, {"n": 3}), (5, {"n": 4})]
            assert await store.read_after("log", 4) == [(5, {"n": 4})]
            assert await store.read_after("log", 5) == []
            assert await store.read_after("missing", 0) == []
            clock.advance(50)
            await store.append("log", {"n": 5}, 3, 60)  # an append extends the log's life
            clock.advance(50)
            assert [s for s, _ in await store.read_after("log", 0)] == [4, 5, 6]
            clock.advance(10)
            assert await store.read_after("log", 0) == []
        arun(go())

    def test_publish_subscribe_and_unsubscribe(self):
        store = MemoryStore()
        got_a, got_b = [], []

        async def go():
            unsub_a = store.subscribe("chan", got_a.append)
            unsub_b = store.subscribe("chan", got_b.append)
            await store.publish("chan", 1)
            unsub_a()
            await store.publish("chan", 2)
            await store.publish("other", 3)
            unsub_b()
            unsub_b()  # twice is harmless
            await store.publish("chan", 4)
        arun(go())
        assert got_a == [1] and got_b == [1, 2]
        assert store._channels == {}  # no empty channel left behind

    def test_a_failing_subscriber_does_not_stop_the_others(self):
        store = MemoryStore()
        got = []

        def bad(_message):
            raise RuntimeError("subscriber bug")

        async def go():
            store.subscribe("chan", bad)
            store.subscribe("chan", got.append)
            await store.publish("chan", "m")
        arun(go())
        assert got == ["m"]

    # -- the store as the server uses it: sessions must really go away --------------------------

    def test_session_delete_leaves_the_store_empty(self, make_server):
        store = MemoryStore()
        st = make_server(build_server(store=store))
        s = Session(st.port)
        s.initialize()
        assert s.call("echo", {"text": "x"})["content"][0]["text"] == "x"
        assert len(store) >= 1
        assert s.delete().status == 200
        assert len(store) == 0

    def test_session_delete_also_removes_its_stream_logs(self, make_server):
        # A 2025-11-25 session logs its SSE events for Last-Event-ID resumption; once the
        # session is deleted nobody can resume, so nothing of it may stay in the store.
        store = MemoryStore()
        st = make_server(build_server(store=store))
        s = Session(st.port)
        s.initialize()
        reply = s.request("tools/call", {"name": "progress", "arguments": {"steps": 2},
                                         "_meta": {"progressToken": "p"}})
        assert reply["result"]["content"][0]["text"] == "progress done"
        assert s.delete().status == 200
        assert len(store) == 0, list(store._data)

    def test_session_expiry_leaves_the_store_empty(self, make_server):
        clock = FakeClock()
        store = MemoryStore(clock=clock)
        st = make_server(build_server(store=store, session_ttl=60))
        s = Session(st.port)
        s.initialize()
        s.request("tools/call", {"name": "progress", "arguments": {"steps": 1}, "_meta": {"progressToken": 1}})
        clock.advance(59)
        assert s.call("echo", {"text": "alive"})["content"][0]["text"] == "alive"  # touched: slides
        clock.advance(59)
        assert s.call("echo", {"text": "alive"})["content"][0]["text"] == "alive"
        clock.advance(61)
        assert len(store) == 0
        r = s.post(s.body("tools/list"))
        assert r.status == 404


# =================================================================================================
# 3. Crypto and tokens
# =================================================================================================


def flip(token: str, index: int = -5) -> str:
    chars = list(token)
    chars[index] = "A" if chars[index] != "A" else "B"
    return "".join(chars)


class TestCrypto:
    def test_seal_unseal_roundtrip(self):
        ring = mcp_server._KeyRing("s3cret")
        payload = {"m": "tools/call", "a": {"k": [1, 2, "three"]}, "n": "ü"}
        token = ring.seal(payload)
        assert VISIBLE_ASCII.fullmatch(token) and "s3cret" not in token and "tools/call" not in token
        assert ring.unseal(token) == payload
        assert ring.seal(payload) != token  # a fresh nonce every time

    def test_the_same_secret_opens_the_tokens_of_another_instance(self):
        assert mcp_server._KeyRing("shared").unseal(mcp_server._KeyRing("shared").seal({"x": 1})) == {"x": 1}

    @pytest.mark.parametrize("mangle", [
        lambda t: flip(t),
        lambda t: flip(t, 3),
        lambda t: t[:-2],
        lambda t: t + "AA",
        lambda t: "",
        lambda t: "not base64 !",
        lambda t: None,
        lambda t: 12345,
        lambda t: t[:20],
    ])
    def test_tampered_tokens_are_refused(self, mangle):
        ring = mcp_server._KeyRing("s3cret")
        assert ring.unseal(mangle(ring.seal({"x": 1}))) is None

    def test_foreign_tokens_are_refused(self):
        token = mcp_server._KeyRing("one").seal({"x": 1})
        assert mcp_server._KeyRing("two").unseal(token) is None
        assert mcp_server._KeyRing(None).unseal(token) is None
        # two servers without a configured secret get different ephemeral keys
        assert mcp_server._KeyRing("").unseal(mcp_server._KeyRing("").seal({"x": 1})) is None

    def test_purpose_binds_the_token(self):
        ring = mcp_server._KeyRing("s3cret")
        token = ring.seal({"x": 1}, purpose="request_state")
        assert ring.unseal(token, purpose="cursor") is None

    def test_sign_verify(self):
        ring = mcp_server._KeyRing("s3cret")
        token = ring.sign("tools:200")
        assert VISIBLE_ASCII.fullmatch(token)
        assert ring.verify(token) == "tools:200"
        body, mac = token.split(".")
        forged = mcp_server._b64url(b"tools:0") + "." + mac
        for bad in (forged, flip(token), body + "." + flip(mac, 0), body, token + ".x", "", None, 7,
                    mcp_server._KeyRing("other").sign("tools:200")):
            assert ring.verify(bad) is None, bad
        assert ring.verify(token, purpose="request_state") is None

    def test_hkdf_matches_the_reference_implementation(self):
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF
        for label in mcp_server._KEY_LABELS.values():
            expected = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"mcp_server hkdf salt",
                            info=label).derive(b"master secret")
            assert mcp_server._hkdf(b"master secret", label) == expected
        labels = list(mcp_server._KEY_LABELS.values())
        assert len(set(labels)) == len(labels)  # one key per purpose
        ring = mcp_server._KeyRing("s")
        assert ring.key("cursor") != ring.key("request_state")


# =================================================================================================
# 4. Registry and schemas
# =================================================================================================


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Movie(TypedDict):
    title: str
    year: int


class PartialMovie(TypedDict, total=False):
    title: str


@dataclasses.dataclass
class Point:
    """A point on the plane."""

    x: float
    y: float = 0.0
    tags: list = dataclasses.field(default_factory=list)


def tool_definition(fn, **kwargs) -> dict:
    server = MCPServer("schemas")
    server.tool(**kwargs)(fn)
    return server._tools[kwargs.get("name") or fn.__name__].definition


def input_schema(fn) -> dict:
    return tool_definition(fn)["inputSchema"]


def props(fn) -> dict:
    return input_schema(fn)["properties"]


class TestRegistry:
    # -- JSON Schema from type hints -----------------------------------------------------------

    def test_primitives_defaults_and_required(self):
        def f(s: str, i: int, x: float, b: bool, n: int = 5, flag: bool = False, label: str = "hi"):
            pass
        schema = input_schema(f)
        assert schema["type"] == "object"
        assert schema["properties"] == {
            "s": {"type": "string"}, "i": {"type": "integer"}, "x": {"type": "number"},
            "b": {"type": "boolean"}, "n": {"type": "integer", "default": 5},
            "flag": {"type": "boolean", "default": False}, "label": {"type": "string", "default": "hi"}}
        assert schema["required"] == ["s", "i", "x", "b"]

    def test_containers(self):
        def f(a: list[str], b: dict[str, int], c: tuple[int, str], d: tuple[float, ...], e: set[int],
              f_: list, g: dict):
            pass
        p = props(f)
        assert p["a"] == {"type": "array", "items": {"type": "string"}}
        assert p["b"] == {"type": "object", "additionalProperties": {"type": "integer"}}
        assert p["c"] == {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}],
                          "minItems": 2, "maxItems": 2}
        assert p["d"] == {"type": "array", "items": {"type": "number"}}
        assert p["e"] == {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}
        assert p["f_"] == {"type": "array"} and p["g"] == {"type": "object"}

    def test_optional_and_unions(self):
        def f(a: Optional[int] = None, b: Union[str, int] = "x", c: str | None = None,
              d: Union[list[int], str] = "y"):
            pass
        p = props(f)
        assert p["a"] == {"type": ["integer", "null"], "default": None}
        assert p["b"] == {"type": ["string", "integer"], "default": "x"}
        assert p["c"] == {"type": ["string", "null"], "default": None}
        assert p["d"] == {"anyOf": [{"type": "array", "items": {"type": "integer"}}, {"type": "string"}],
                          "default": "y"}
        assert "required" not in input_schema(f)

    def test_literal_and_enum(self):
        def f(mode: Literal["fast", "slow"], n: Literal[1, 2, 3], color: Color = Color.GREEN):
            pass
        p = props(f)
        assert p["mode"] == {"enum": ["fast", "slow"], "type": "string"}
        assert p["n"] == {"enum": [1, 2, 3], "type": "integer"}
        assert p["color"] == {"enum": ["red", "green"], "type": "string", "default": "green"}

    def test_typeddict_and_dataclass(self):
        def f(movie: Movie, partial: PartialMovie, point: Point):
            pass
        p = props(f)
        assert p["movie"] == {"type": "object", "properties": {"title": {"type": "string"},
                                                                "year": {"type": "integer"}},
                              "required": ["title", "year"]}
        assert p["partial"] == {"type": "object", "properties": {"title": {"type": "string"}}}
        assert p["point"]["type"] == "object" and p["point"]["required"] == ["x"]
        assert p["point"]["properties"]["x"] == {"type": "number"}
        assert p["point"]["properties"]["y"] == {"type": "number", "default": 0.0}
        assert p["point"]["description"] == "A point on the plane."

    def test_annotated_descriptions_and_param(self):
        def f(city: Annotated[str, "The city"],
              region: Annotated[str, Param(description="Cloud region", title="Region", header="Region")],
              days: Annotated[int, "How many days"] = 3):
            pass
        p = props(f)
        assert p["city"] == {"type": "string", "description": "The city"}
        assert p["region"] == {"type": "string", "description": "Cloud region", "title": "Region",
                               "x-mcp-header": "Region"}
        assert p["days"] == {"type": "integer", "description": "How many days", "default": 3}

    def test_param_schema_extends_the_derived_schema(self):
        def f(days: Annotated[int, Param(schema={"minimum": 1, "maximum": 14})] = 3):
            pass
        assert props(f)["days"] == {"type": "integer", "minimum": 1, "maximum": 14, "default": 3}

    def test_docstring_description_and_args(self):
        def forecast(city: str, days: int = 3) -> str:
            """Forecast for a city.

            More detail that is not part of the description.

            Args:
                city: the city to forecast
                days (int): how many days ahead
            """
        definition = tool_definition(forecast)
        assert definition["description"] == "Forecast for a city."
        assert definition["inputSchema"]["properties"]["city"]["description"] == "the city to forecast"
        assert definition["inputSchema"]["properties"]["days"]["description"] == "how many days ahead"

    def test_context_parameter_is_injected_not_described(self):
        def f(a: str, ctx: Context):
            pass

        def g(a: str, ctx: Context | None = None):
            pass

        def h(ctx: Optional[Context], a: str):
            pass
        for fn in (f, g, h):
            assert input_schema(fn) == {"type": "object", "properties": {"a": {"type": "string"}},
                                        "required": ["a"]}, fn.__name__

    def test_explicit_schema_is_used_verbatim_and_definition_fields(self):
        schema = {"type": "object", "properties": {"q": {"type": "string"}}, "additionalProperties": False}

        def search(**kwargs) -> str:
            return "x"
        d = tool_definition(search, name="web.search", title="Search", input_schema=schema,
                            annotations={"readOnlyHint": True}, icons=[{"src": "https://x/i.png"}],
                            meta={"k": "v"})
        assert d == {"name": "web.search", "title": "Search", "description": "web.search", "inputSchema": schema,
                     "annotations": {"readOnlyHint": True}, "icons": [{"src": "https://x/i.png"}], "_meta": {"k": "v"}}

    def test_output_schema_from_return_annotation(self):
        def movie() -> Movie:
            return {"title": "x", "year": 1}

        def point() -> Point:
            return Point(1.0)

        def text() -> str:
            return "x"

        def mapping() -> dict[str, int]:
            return {}
        assert tool_definition(movie)["outputSchema"]["required"] == ["title", "year"]
        assert tool_definition(point)["outputSchema"]["properties"]["x"] == {"type": "number"}
        assert tool_definition(mapping)["outputSchema"] == {"type": "object", "additionalProperties": {"type": "integer"}}
        assert "outputSchema" not in tool_definition(text)
        explicit = {"type": "object", "properties": {"n": {"type": "integer"}}}
        assert tool_definition(text, output_schema=explicit)["outputSchema"] == explicit

    @pytest.mark.parametrize("name", ["has space", "", "x" * 129, "semi;colon"])
    def test_bad_tool_names_are_refused(self, name):
        with pytest.raises(ValueError):
            tool_definition(lambda: None, name=name)

    def test_non_object_input_schema_is_refused(self):
        with pytest.raises(ValueError):
            tool_definition(lambda: None, name="t", input_schema={"type": "array"})

    def test_underivable_type_is_a_clear_error(self):
        class Opaque:
            pass

        def f(x: Opaque):
            pass
        with pytest.raises(TypeError, match="JSON Schema"):
            input_schema(f)

    # -- the validator --------------------------------------------------------------------------

    SCHEMA_2020 = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "$defs": {"address": {"type": "object", "properties": {"street": {"type": "string"},
                                                                "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                              "required": ["street"]}},
        "properties": {"name": {"type": "string", "minLength": 1},
                       "address": {"$ref": "#/$defs/address"},
                       "contact": {"type": "string", "enum": ["phone", "email"]},
                       "phone": {"type": "string"}, "email": {"type": "string"},
                       "age": {"type": "integer", "minimum": 0, "maximum": 150},
                       "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True, "maxItems": 3}},
        "anyOf": [{"required": ["phone"]}, {"required": ["email"]}],
        "if": {"properties": {"contact": {"const": "phone"}}, "required": ["contact"]},
        "then": {"required": ["phone"]},
        "else": {"required": ["email"]},
        "additionalProperties": False,
    }

    @pytest.mark.parametrize("instance", [
        {"name": "Ada", "email": "a@example.com"},
        {"name": "Ada", "contact": "phone", "phone": "123"},
        {"name": "Ada", "email": "e", "address": {"street": "Main", "zip": "12345"}, "age": 36,
         "tags": ["a", "b"]},
        {"email": "e", "age": 3.0},  # an integral float is an integer
    ])
    def test_validator_accepts_good_input(self, instance):
        assert mcp_server._validate(instance, self.SCHEMA_2020) is None

    @pytest.mark.parametrize("instance, fragment", [
        ({"name": "Ada"}, "arguments"),  # neither phone nor email (anyOf)
        ({"name": "Ada", "contact": "phone", "email": "e"}, "'phone'"),  # if/then
        ({"email": "e", "nickname": "x"}, "'nickname'"),  # additionalProperties false
        ({"email": "e", "address": {"zip": "12345"}}, "arguments.address"),  # $ref: street missing
        ({"email": "e", "address": {"street": "s", "zip": "1234"}}, "arguments.address.zip"),
        ({"email": "e", "age": -1}, "arguments.age"),
        ({"email": "e", "age": 1.5}, "arguments.age"),
        ({"email": "e", "age": True}, "arguments.age"),  # a boolean is not an integer
        ({"email": "e", "contact": "fax"}, "arguments.contact"),
        ({"email": "e", "name": ""}, "arguments.name"),
        ({"email": "e", "tags": ["a", "a"]}, "arguments.tags"),
        ({"email": "e", "tags": ["a", "b", "c", "d"]}, "arguments.tags"),
        ({"email": "e", "tags": ["a", 2]}, "arguments.tags[1]"),
        ({"email": 5}, "arguments.email"),
    ])
    def test_validator_names_the_failing_field(self, instance, fragment):
        problem = mcp_server._validate(instance, self.SCHEMA_2020)
        assert problem is not None and fragment in problem, problem

    def test_validator_keywords(self):
        v = mcp_server._validate
        assert v(5, {"oneOf": [{"type": "integer"}, {"minimum": 0}]}) is not None  # matches both
        assert v(-5, {"oneOf": [{"type": "integer"}, {"minimum": 0}]}) is None
        assert v("x", {"not": {"type": "string"}}) is not None
        assert v({"a": 1}, {"dependentRequired": {"a": ["b"]}}) is not None
        assert v({"x-1": "s"}, {"patternProperties": {"^x-": {"type": "integer"}}}) is not None
        assert v([1, "a"], {"prefixItems": [{"type": "integer"}], "items": {"type": "string"}}) is None
        assert v(7, {"multipleOf": 2}) is not None and v(8, {"multipleOf": 2}) is None
        assert v(5, {"exclusiveMaximum": 5}) is not None
        assert v({"a": {"a": {"a": 1}}}, {"$ref": "#/$defs/n", "$defs": {"n": {"type": "object", "properties": {
            "a": {"anyOf": [{"$ref": "#/$defs/n"}, {"type": "integer"}]}}}}}) is None
        assert v({"a": 1}, {"$ref": "#/$defs/missing"}) is not None
        assert v(1, {"$ref": "https://example.com/remote.json"}) is not None  # never fetched
        assert v("x", {"$ref": "#thing", "$defs": {"t": {"$anchor": "thing", "type": "integer"}}}) is not None
        assert v(None, True) is None and v(None, False) is not None

    def test_validator_equality_keeps_booleans_and_numbers_apart_at_any_depth(self):
        assert mcp_server._validate(True, {"enum": [1]}) is not None
        assert mcp_server._validate([True], {"enum": [[1]]}) is not None
        assert mcp_server._validate({"a": True}, {"const": {"a": 1}}) is not None

    def test_validator_fuzz_never_raises(self):
        rng = random.Random(20240611)
        for _ in range(400):
            instance = random_json(rng, 4)
            problem = mcp_server._validate(instance, self.SCHEMA_2020)
            assert problem is None or (isinstance(problem, str) and problem.startswith("at "))

    def test_invalid_arguments_are_a_tool_error_naming_the_field(self):
        server = build_server()
        result = core_result(server, "tools/call", {"name": "add", "arguments": {"a": "one"}})
        assert result["isError"] is True
        assert "arguments.a" in result["content"][0]["text"]
        result = core_result(server, "tools/call", {"name": "add", "arguments": {}})
        assert result["isError"] is True and "'a'" in result["content"][0]["text"]

    def test_arguments_are_converted_to_annotated_types(self):
        server = MCPServer("convert")
        seen = {}

        @server.tool()
        def f(color: Color, point: Point, pair: tuple[int, int], ratio: float, tags: set[str]) -> str:
            seen.update(color=color, point=point, pair=pair, ratio=ratio, tags=tags)
            return "ok"
        result = core_result(server, "tools/call", {"name": "f", "arguments": {
            "color": "red", "point": {"x": 1, "y": 2}, "pair": [1, 2], "ratio": 2, "tags": ["a", "b"]}})
        assert result == {"content": [{"type": "text", "text": "ok"}]}
        assert seen == {"color": Color.RED, "point": Point(1, 2), "pair": (1, 2), "ratio": 2.0, "tags": {"a", "b"}}
        assert isinstance(seen["ratio"], float)

    # -- return values ---------------------------------------------------------------------------

    PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 8
    WAV = b"RIFF\x00\x00\x00\x00WAVEfmt "

    @pytest.mark.parametrize("value, expected", [
        ("hi", {"content": [{"type": "text", "text": "hi"}]}),
        (None, {"content": []}),
        (42, {"content": [{"type": "text", "text": "42"}]}),
        ({"a": 1}, {"content": [{"type": "text", "text": '{"a":1}'}], "structuredContent": {"a": 1}}),
        (Point(1.0, 2.0, ["t"]), {"content": [{"type": "text", "text": '{"x":1.0,"y":2.0,"tags":["t"]}'}],
                                  "structuredContent": {"x": 1.0, "y": 2.0, "tags": ["t"]}}),
        (Image(b"\x89PNG"), {"content": [{"type": "image", "data": base64.b64encode(b"\x89PNG").decode(),
                                          "mimeType": "image/png"}]}),
        (Audio(base64="UklG", mime_type="audio/mpeg"),
         {"content": [{"type": "audio", "data": "UklG", "mimeType": "audio/mpeg"}]}),
        (EmbeddedResource("test://r", text="t", mime_type="text/plain"),
         {"content": [{"type": "resource", "resource": {"uri": "test://r", "mimeType": "text/plain", "text": "t"}}]}),
        (EmbeddedResource("test://b", blob=b"\x00\x01"),
         {"content": [{"type": "resource", "resource": {"uri": "test://b", "blob": "AAE="}}]}),
        (ResourceLink("test://x", "x", mime_type="text/plain", size=3),
         {"content": [{"type": "resource_link", "uri": "test://x", "name": "x", "mimeType": "text/plain",
                       "size": 3}]}),
        (["a", Image(base64="AA=="), {"type": "text", "text": "raw"}],
         {"content": [{"type": "text", "text": "a"}, {"type": "image", "data": "AA==", "mimeType": "image/png"},
                      {"type": "text", "text": "raw"}]}),
    ])
    def test_return_value_mapping(self, value, expected):
        server = MCPServer("returns")

        @server.tool()
        def f():
            return value
        assert core_result(server, "tools/call", {"name": "f"}) == expected

    def test_bytes_become_image_audio_or_blob(self):
        server = MCPServer("bytes")
        values = {"png": self.PNG, "wav": self.WAV, "other": b"\x00\x01\x02"}

        @server.tool()
        def f(kind: str) -> bytes:
            return values[kind]
        png = core_result(server, "tools/call", {"name": "f", "arguments": {"kind": "png"}})["content"][0]
        assert png == {"type": "image", "data": base64.b64encode(self.PNG).decode(), "mimeType": "image/png"}
        wav = core_result(server, "tools/call", {"name": "f", "arguments": {"kind": "wav"}})["content"][0]
        assert wav["type"] == "audio" and wav["mimeType"] == "audio/wav"
        other = core_result(server, "tools/call", {"name": "f", "arguments": {"kind": "other"}})["content"][0]
        assert other["type"] == "resource" and other["resource"]["blob"] == "AAEC"

    def test_content_helpers_refuse_ambiguous_input(self):
        with pytest.raises(ValueError):
            Image()
        with pytest.raises(ValueError):
            Image(b"x", base64="eA==")
        with pytest.raises(ValueError):
            EmbeddedResource("test://x")

    def test_structured_result_with_output_schema(self):
        result = core_result(build_server(), "tools/call", {"name": "add", "arguments": {"a": 2, "b": 5}})
        assert result == {"content": [{"type": "text", "text": '{"sum":7}'}], "structuredContent": {"sum": 7}}

    # -- how tools run -----------------------------------------------------------------------------

    def test_sync_tools_run_in_a_worker_thread_and_async_ones_on_the_loop(self):
        server = build_server()
        loop_thread = threading.get_ident()  # asyncio.run runs the loop on this thread
        sync = core_result(server, "tools/call", {"name": "where_sync"})["structuredContent"]["thread"]
        async_ = core_result(server, "tools/call", {"name": "where_async"})["structuredContent"]["thread"]
        assert sync != loop_thread
        assert async_ == loop_thread

    def test_inline_true_runs_on_the_loop_from_the_first_call(self):
        server = mcp_server.MCPServer("inline")

        @server.tool(inline=True)
        def where() -> dict:
            return {"thread": threading.get_ident()}

        async def scenario():
            ctx = mcp_server.Context(server, "tools/call", {})
            assert (await server._tools["where"].invoke({}, ctx))["thread"] == threading.get_ident()
        asyncio.run(scenario())

    def test_tool_error_becomes_is_error_with_its_message(self):
        result = core_result(build_server(), "tools/call", {"name": "refuse"})
        assert result == {"content": [{"type": "text", "text": "nope, not today"}], "isError": True}

    def test_unexpected_exception_is_generic_with_an_error_id_that_is_logged(self, caplog):
        caplog.set_level(logging.ERROR, logger="mcp_server")
        result = core_result(build_server(), "tools/call", {"name": "boom"})
        assert result["isError"] is True
        text = result["content"][0]["text"]
        assert "secret-detail-xyz" not in text and "ValueError" not in text
        error_id = ERROR_ID.search(text).group(1)
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert error_id in logged

    def test_expose_errors_shows_the_exception(self):
        result = core_result(build_server(expose_errors=True), "tools/call", {"name": "boom"})
        assert "secret-detail-xyz" in result["content"][0]["text"]

    def test_unexpected_exception_id_reaches_the_stderr_log(self, printer_script):
        with Proc([printer_script, "--stdio"]) as p:
            p.initialize()
            reply = p.request("tools/call", {"name": "boom", "arguments": {}})
            text = reply["result"]["content"][0]["text"]
            assert reply["result"]["isError"] is True and "secret-detail-xyz" not in text
            error_id = ERROR_ID.search(text).group(1)
            assert p.finish() == 0
        assert error_id in p.stderr.decode()

    def test_tool_timeout_ends_the_call_as_an_error(self):
        server = build_server(tool_timeout=0.05)
        token = new_token()
        result = core_result(server, "tools/call", {"name": "hang", "arguments": {"token": token}})
        assert result["isError"] is True and "did not finish" in result["content"][0]["text"]
        assert probe(token).finished.is_set()

    # -- resources and templates -------------------------------------------------------------------

    @pytest.mark.parametrize("template, uri, expected", [
        ("test://items/{id}", "test://items/42", {"id": "42"}),
        ("test://items/{id}", "test://items/a%20b", {"id": "a b"}),
        ("test://items/{id}", "test://items/4/2", None),
        ("test://items/{id}", "test://other/42", None),
        ("test://template/{id}/data", "test://template/7/data", {"id": "7"}),
        ("test://{a}/{b}", "test://x/y", {"a": "x", "b": "y"}),
        ("file:///{+path}", "file:///etc/hosts", {"path": "etc/hosts"}),
        ("test://search{?q,lang}", "test://search?q=cats&lang=en", {"q": "cats", "lang": "en"}),
        ("test://search{?q,lang}", "test://search?q=cats", {"q": "cats"}),
        ("test://search{?q,lang}", "test://search", {}),
        ("test://doc{#section}", "test://doc#intro", {"section": "intro"}),
    ])
    def test_rfc6570_template_matching(self, template, uri, expected):
        server = MCPServer("templates")
        variables = re.findall(r"\{[+#?]?([^}]*)\}", template)
        names = [n for group in variables for n in group.split(",")]
        fn = eval(f"lambda {', '.join(names)}: 'x'")  # noqa: S307 - a parameter per variable
        server.resource(template, name="t")(fn)
        assert server._templates[0].match(uri) == expected

    def test_template_variables_reach_the_function(self):
        result = core_result(build_server(), "resources/read", {"uri": "test://items/abc"})
        assert result == {"contents": [{"uri": "test://items/abc", "text": "item abc", "mimeType": "text/plain"}]}

    def test_template_needs_a_parameter_per_variable(self):
        server = MCPServer("t")
        with pytest.raises(TypeError, match="id"):
            server.resource("test://items/{id}")(lambda: "x")

    def test_resource_return_values(self):
        server = MCPServer("resources")
        server.resource("test://text", mime_type="text/plain")(lambda: "hello")
        server.resource("test://bin")(lambda: b"\x00\xff")
        server.resource("test://json")(lambda: {"a": 1})
        assert core_result(server, "resources/read", {"uri": "test://text"})["contents"] == [
            {"uri": "test://text", "text": "hello", "mimeType": "text/plain"}]
        assert core_result(server, "resources/read", {"uri": "test://bin"})["contents"] == [
            {"uri": "test://bin", "blob": "AP8="}]
        assert core_result(server, "resources/read", {"uri": "test://json"})["contents"] == [
            {"uri": "test://json", "text": '{"a":1}', "mimeType": "application/json"}]

    def test_prompt_arguments_and_messages(self):
        server = build_server()
        listed = core_result(server, "prompts/list")["prompts"]
        assert listed == [{"name": "greeting", "title": "Greeting", "description": "Greet someone.",
                           "arguments": [{"name": "name", "required": True}, {"name": "style", "required": False}]}]
        got = core_result(server, "prompts/get", {"name": "greeting", "arguments": {"name": "Ada"}})
        assert got == {"messages": [{"role": "user", "content": {"type": "text", "text": "Greet Ada in a plain way."}}],
                       "description": "Greet someone."}
        error, _ = core_error(server, "prompts/get", {"name": "greeting", "arguments": {}})
        assert error["code"] == -32602 and "name" in error["message"]

    def test_a_sync_tool_fast_many_times_never_moves_onto_the_loop_so_its_stall_blocks_no_one(self, make_server):
        # issue 19, defect 6: a sync tool was moved onto the event loop after 16 fast calls, and
        # its next slow call (a network stall, a lock) then blocked every client of the process.
        # The stalled call waits on an event that is set only once another client's ping was
        # answered: with the loop blocked, that ping can never be answered.
        server = build_server()
        calls, entered, released = [0], threading.Event(), threading.Event()

        @server.tool()
        def usually_fast() -> dict:
            calls[0] += 1
            if calls[0] <= 30:
                return {"thread": threading.get_ident()}
            entered.set()
            return {"released": released.wait(WAIT)}

        st = make_server(server)
        stalled_client, other_client = Session(st.port), Session(st.port)
        stalled_client.initialize()
        other_client.initialize()
        for _ in range(30):
            assert "thread" in stalled_client.call("usually_fast")["structuredContent"]
        outcome = {}
        stalled = threading.Thread(target=lambda: outcome.update(stalled_client.call("usually_fast")), daemon=True)
        stalled.start()
        assert entered.wait(WAIT), "the slow call never started"
        assert other_client.request("ping") == {"jsonrpc": "2.0", "id": other_client._id, "result": {}}
        assert "tools" in other_client.request("tools/list")["result"]
        released.set()
        stalled.join(WAIT)
        assert outcome.get("structuredContent") == {"released": True}, outcome


def random_json(rng: random.Random, depth: int):
    kind = rng.randrange(9 if depth > 0 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.randint(-10 ** 6, 10 ** 6)
    if kind == 3:
        return rng.choice([0.5, -1e300, 3.0, float(rng.randint(0, 9))])
    if kind in (4, 5):
        return "".join(rng.choice("ab\u00e9\u2603 \"\\\n{}[]:,0") for _ in range(rng.randint(0, 8)))
    if kind == 6:
        return rng.choice(["phone", "email", "name", "tools/call", "2.0", ""])
    if kind == 7:
        return [random_json(rng, depth - 1) for _ in range(rng.randint(0, 4))]
    keys = ["name", "email", "phone", "contact", "address", "age", "tags", "jsonrpc", "id", "method",
            "params", "result", "error", "_meta", "x"]
    return {rng.choice(keys): random_json(rng, depth - 1) for _ in range(rng.randint(0, 5))}


# =================================================================================================
# 5. MCP core (sans-IO)
# =================================================================================================


class TestCore:
    @pytest.fixture
    def server(self):
        return build_server()

    # -- initialize and version negotiation --------------------------------------------------------

    @pytest.mark.parametrize("requested", ["2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"])
    def test_initialize_echoes_a_supported_version(self, server, requested):
        result = core_result(server, "initialize", {"protocolVersion": requested, "capabilities": {},
                                                    "clientInfo": {"name": "c", "version": "1"}})
        assert result["protocolVersion"] == requested
        assert result["serverInfo"]["name"] == "test-server" and result["serverInfo"]["version"] == "9.9.9"
        assert result["instructions"] == "Test instructions."
        assert set(result["capabilities"]) >= {"tools", "resources", "prompts"}
        assert "resultType" not in result and "_meta" not in result

    @pytest.mark.parametrize("requested", ["2026-07-28", "1999-01-01", "2099-12-31", "latest"])
    def test_initialize_counter_offers_the_latest_legacy_version(self, server, requested):
        result = core_result(server, "initialize", {"protocolVersion": requested, "capabilities": {}})
        assert result["protocolVersion"] == "2025-11-25"

    def test_initialize_capabilities_per_revision(self, server):
        old = core_result(server, "initialize", {"protocolVersion": "2024-11-05"})
        assert "completions" not in old["capabilities"]
        assert "title" not in old["serverInfo"]
        new = core_result(server, "initialize", {"protocolVersion": "2025-06-18"})
        assert "completions" in new["capabilities"] and new["serverInfo"]["title"] == "Test Server"

    def test_initialize_needs_a_version_string(self, server):
        error, _ = core_error(server, "initialize", {"capabilities": {}})
        assert error["code"] == -32602 and "protocolVersion" in error["message"]

    def test_ping_and_set_level_answer_exactly_an_empty_object(self, server):
        assert core(server, "ping") == ({"jsonrpc": "2.0", "id": 1, "result": {}}, 200)
        assert core(server, "logging/setLevel", {"level": "debug"}) == ({"jsonrpc": "2.0", "id": 1, "result": {}}, 200)

    def test_set_level_refuses_an_unknown_level(self, server):
        error, _ = core_error(server, "logging/setLevel", {"level": "loud"})
        assert error["code"] == -32602 and "loud" in error["message"]

    def test_unknown_method(self, server):
        error, status = core_error(server, "tools/destroy")
        assert error["code"] == -32601 and "tools/destroy" in error["message"] and status == 200

    def test_unknown_notification_is_ignored(self, server):
        assert core(server, "notifications/whatever", request_id=None) == (None, 202)

    @pytest.mark.parametrize("method, params, field", [
        ("tools/call", {}, "name"),
        ("tools/call", {"name": "echo", "arguments": [1]}, "arguments"),
        ("resources/read", {}, "uri"),
        ("prompts/get", {"name": 5}, "name"),
        ("completion/complete", {"ref": {"type": "ref/prompt", "name": "greeting"}}, "argument"),
        ("resources/subscribe", {"uri": 1}, "uri"),
    ])
    def test_invalid_params_name_the_field(self, server, method, params, field):
        error, _ = core_error(server, method, params)
        assert error["code"] == -32602 and field in error["message"], error

    def test_tools_call_unknown_tool(self, server):
        error, _ = core_error(server, "tools/call", {"name": "nope"})
        assert error["code"] == -32602 and "nope" in error["message"]

    def test_resource_not_found_legacy_vs_modern(self, server):
        for uri in ("test://missing", "test://items/missing"):
            legacy, _ = core_error(server, "resources/read", {"uri": uri})
            assert legacy["code"] == -32002 and legacy["data"] == {"uri": uri}
            response, status = modern_core(server, "resources/read", {"uri": uri})
            assert response["error"]["code"] == -32602 and response["error"]["data"] == {"uri": uri}

    def test_modern_results_carry_result_type_cache_hints_and_server_info(self, server):
        response, status = modern_core(server, "tools/list")
        result = response["result"]
        assert status == 200 and result["resultType"] == "complete"
        assert isinstance(result["ttlMs"], int) and result["ttlMs"] >= 0 and result["cacheScope"] in ("public", "private")
        assert result["_meta"][META_SERVERINFO]["name"] == "test-server"
        read = modern_core(server, "resources/read", {"uri": "test://static"})[0]["result"]
        assert read["resultType"] == "complete" and "ttlMs" in read and "cacheScope" in read
        call = modern_core(server, "tools/call", {"name": "echo", "arguments": {"text": "x"}})[0]["result"]
        assert call["resultType"] == "complete" and "ttlMs" not in call
        discover = modern_core(server, "server/discover")[0]["result"]
        assert discover["supportedVersions"][0] == MODERN and "2024-11-05" in discover["supportedVersions"]
        assert discover["cacheScope"] == "public" and discover["_meta"][META_SERVERINFO]["version"] == "9.9.9"

    def test_legacy_results_carry_no_modern_fields(self, server):
        result = core_result(server, "tools/list")
        assert not {"resultType", "ttlMs", "cacheScope"} & set(result)

    def test_methods_removed_in_2026_are_not_found_there(self, server):
        for method in ("initialize", "ping", "logging/setLevel", "resources/subscribe"):
            response, status = modern_core(server, method, {"level": "info", "uri": "x", "protocolVersion": MODERN})
            assert response["error"]["code"] == -32601 and status == 404, method

    # -- shaping per revision ----------------------------------------------------------------------

    def shaping_server(self) -> MCPServer:
        server = MCPServer("shape")

        @server.tool(title="Rich", icons=[{"src": "https://x/i.png"}], annotations={"readOnlyHint": True},
                     meta={"k": 1})
        def rich() -> Movie:
            return {"title": "Up", "year": 2009}

        @server.tool()
        def media() -> list:
            return [Audio(base64="UklG"), ResourceLink("test://doc", "doc", title="Doc"), "text",
                    Image(base64="AA==", annotations={"audience": ["user"], "lastModified": "2025-01-01T00:00:00Z"})]
        return server

    def test_a_2024_11_05_client_sees_only_what_it_knows(self):
        server = self.shaping_server()
        v = "2024-11-05"
        tools = core_result(server, "tools/list", version=v)["tools"]
        rich = next(t for t in tools if t["name"] == "rich")
        assert set(rich) == {"name", "description", "inputSchema"}
        result = core_result(server, "tools/call", {"name": "rich"}, version=v)
        assert "structuredContent" not in result
        assert result["content"] == [{"type": "text", "text": '{"title":"Up","year":2009}'}]
        media = core_result(server, "tools/call", {"name": "media"}, version=v)["content"]
        assert [b["type"] for b in media] == ["text", "text", "text", "image"]
        assert "doc" in media[1]["text"] and "test://doc" in media[1]["text"]
        assert media[3]["annotations"] == {"audience": ["user"]}
        text = json.dumps([tools, result, media])
        for word in ('"title"', '"icons"', '"outputSchema"', '"structuredContent"', '"audio"', '"resource_link"',
                     '"_meta"', '"annotations": {"readOnlyHint"'):
            assert word not in text, word

    def test_newer_clients_see_the_new_fields(self):
        server = self.shaping_server()
        tools = core_result(server, "tools/list", version="2025-06-18")["tools"]
        rich = next(t for t in tools if t["name"] == "rich")
        assert rich["title"] == "Rich" and "outputSchema" in rich and "icons" not in rich
        assert rich["annotations"] == {"readOnlyHint": True}
        tools = core_result(server, "tools/list", version="2025-11-25")["tools"]
        assert next(t for t in tools if t["name"] == "rich")["icons"] == [{"src": "https://x/i.png"}]
        result = core_result(server, "tools/call", {"name": "rich"}, version="2025-06-18")
        assert result["structuredContent"] == {"title": "Up", "year": 2009}
        media = core_result(server, "tools/call", {"name": "media"}, version="2025-03-26")["content"]
        assert [b["type"] for b in media] == ["audio", "text", "text", "image"]
        media = core_result(server, "tools/call", {"name": "media"}, version="2025-06-18")["content"]
        assert media[1] == {"type": "resource_link", "uri": "test://doc", "name": "doc", "title": "Doc"}

    # -- pagination --------------------------------------------------------------------------------

    def test_pagination_with_signed_cursors(self):
        server = build_server(page_size=3)
        everything = [t["name"] for t in core_result(build_server(), "tools/list")["tools"]]
        names, cursor, cursors = [], None, []
        while True:
            result = core_result(server, "tools/list", {"cursor": cursor} if cursor else {})
            assert len(result["tools"]) <= 3
            names += [t["name"] for t in result["tools"]]
            cursor = result.get("nextCursor")
            if cursor is None:
                break
            assert isinstance(cursor, str) and cursor not in cursors
            cursors.append(cursor)
        assert names == everything and len(cursors) == (len(everything) - 1) // 3
        assert core_result(server, "tools/list", {"cursor": ""})["tools"] == core_result(server, "tools/list")["tools"]

    @pytest.mark.parametrize("make_cursor", [
        lambda c: flip(c),
        lambda c: "garbage",
        lambda c: mcp_server._b64url(b"tools:0") + ".AAAAAAAAAAAAAAAA",
        lambda c: 5,
    ])
    def test_tampered_cursor_is_invalid_params(self, make_cursor):
        server = build_server(page_size=3)
        cursor = core_result(server, "tools/list")["nextCursor"]
        error, status = core_error(server, "tools/list", {"cursor": make_cursor(cursor)})
        assert error["code"] == -32602 and status == 200
        response, status = modern_core(server, "tools/list", {"cursor": make_cursor(cursor)})
        assert response["error"]["code"] == -32602

    def test_a_cursor_of_one_list_is_refused_by_another(self):
        server = build_server(page_size=1)
        server.prompt()(lambda: "a")
        cursor = core_result(server, "tools/list")["nextCursor"]
        error, _ = core_error(server, "prompts/list", {"cursor": cursor})
        assert error["code"] == -32602

    def test_a_cursor_of_another_server_is_refused(self):
        cursor = core_result(build_server(page_size=2), "tools/list")["nextCursor"]
        error, _ = core_error(build_server(page_size=2), "tools/list", {"cursor": cursor})
        assert error["code"] == -32602

    # -- MRTR (2026-07-28) -------------------------------------------------------------------------

    CAPS = {"elicitation": {}}

    def test_input_required_round_then_retry_completes(self, server):
        first, status = modern_core(server, "tools/call", {"name": "ask_name", "arguments": {}}, caps=self.CAPS)
        result = first["result"]
        assert status == 200 and result["resultType"] == "input_required"
        assert result["inputRequests"] == {"who": {"method": "elicitation/create", "params": {
            "message": "What is your name?", "requestedSchema": NAME_SCHEMA}}}
        state = result["requestState"]
        assert isinstance(state, str) and VISIBLE_ASCII.fullmatch(state)
        assert "ttlMs" not in result and "content" not in result
        retry, status = modern_core(server, "tools/call", {
            "name": "ask_name", "arguments": {}, "requestState": state,
            "inputResponses": {"who": {"action": "accept", "content": {"name": "Ada"}}}}, caps=self.CAPS, request_id=2)
        assert retry["id"] == 2 and retry["result"]["resultType"] == "complete"
        assert retry["result"]["content"] == [{"type": "text", "text": "Hello, Ada!"}]

    def test_request_state_carries_earlier_answers_across_rounds(self, server):
        r1 = modern_core(server, "tools/call", {"name": "ask_two"}, caps=self.CAPS)[0]["result"]
        assert list(r1["inputRequests"]) == ["first"]
        r2 = modern_core(server, "tools/call", {
            "name": "ask_two", "requestState": r1["requestState"],
            "inputResponses": {"first": {"action": "accept", "content": {"name": "Ada"}}}}, caps=self.CAPS)[0]["result"]
        assert r2["resultType"] == "input_required" and list(r2["inputRequests"]) == ["second"]
        r3 = modern_core(server, "tools/call", {
            "name": "ask_two", "requestState": r2["requestState"],
            "inputResponses": {"second": {"action": "accept", "content": {"name": "Bob"}}}}, caps=self.CAPS)[0]["result"]
        assert r3["resultType"] == "complete" and r3["content"][0]["text"] == "Ada and Bob"

    def test_tampered_or_misused_request_state_is_invalid_params(self, server):
        state = modern_core(server, "tools/call", {"name": "ask_name", "arguments": {}},
                            caps=self.CAPS)[0]["result"]["requestState"]
        answer = {"who": {"action": "accept", "content": {"name": "Ada"}}}
        for params in ({"name": "ask_name", "arguments": {}, "requestState": flip(state)},
                       {"name": "ask_name", "arguments": {}, "requestState": "garbage"},
                       {"name": "ask_name", "arguments": {"x": 1}, "requestState": state},  # other arguments
                       {"name": "ask_two", "arguments": {}, "requestState": state}):  # other tool
            response, status = modern_core(server, "tools/call", {**params, "inputResponses": answer}, caps=self.CAPS)
            assert response["error"]["code"] == -32602, params
        foreign = build_server()
        response, status = modern_core(foreign, "tools/call", {"name": "ask_name", "arguments": {},
                                                               "requestState": state, "inputResponses": answer},
                                       caps=self.CAPS)
        assert response["error"]["code"] == -32602

    def test_malformed_input_response_is_invalid_params(self, server):
        state = modern_core(server, "tools/call", {"name": "ask_name"}, caps=self.CAPS)[0]["result"]["requestState"]
        response, status = modern_core(server, "tools/call", {
            "name": "ask_name", "requestState": state, "inputResponses": {"who": {"nonsense": True}}}, caps=self.CAPS)
        assert response["error"]["code"] == -32602 and "who" in response["error"]["message"]

    def test_answers_without_request_state_complete_an_ordinary_ask_and_extra_keys_are_ignored(self, server):
        # (the spec: ignore what you do not recognize; a confirmation, asked_only, is stricter: TestOrderReview)
        response, _ = modern_core(server, "tools/call", {"name": "ask_name", "inputResponses": {
            "who": {"action": "accept", "content": {"name": "Ada"}},
            "unknown_extra_key": {"action": "accept", "content": {"x": 1}}}}, caps=self.CAPS)
        assert response["result"]["resultType"] == "complete", response

    def test_missing_capability_modern_is_32021(self, server):
        response, status = modern_core(server, "tools/call", {"name": "ask_name"}, caps={})
        assert status == 400 and response["error"]["code"] == -32021
        assert response["error"]["data"]["requiredCapabilities"] == {"elicitation": {}}

    def test_missing_capability_legacy_is_a_tool_error(self, server):
        result = core_result(server, "tools/call", {"name": "ask_name"}, caps={})
        assert result["isError"] is True and "elicitation" in result["content"][0]["text"]

    def test_input_required_only_on_the_three_mrtr_methods(self, server):
        server.completion("ref/prompt", "greeting")(self._asking_completion)
        response, _ = modern_core(server, "completion/complete", {
            "ref": {"type": "ref/prompt", "name": "greeting"}, "argument": {"name": "name", "value": "A"}},
            caps=self.CAPS)
        assert "result" not in response and response["error"]["code"] == -32603

    @staticmethod
    async def _asking_completion(argument: str, value: str, context: dict, ctx: Context) -> list:
        await ctx.elicit("?", NAME_SCHEMA)
        return []

    def test_progress_and_log_notifications_follow_the_revision_and_level(self, server):
        sent = []

        class Out:
            async def send(self, message):
                sent.append(message)

        async def run(version, session, meta):
            ctx = Context(server, "tools/call", {"_meta": meta}, 1, version=version, session=session, out=Out())
            await ctx.report_progress(1, 10, "one")
            await ctx.report_progress(1, 10, "same again")  # progress must increase: dropped
            await ctx.report_progress(2, None, "two")
            await ctx.log("info", "info line")
            await ctx.log("error", "error line")
            with pytest.raises(ValueError):
                await ctx.log("loud", "x")
        asyncio.run(run("2024-11-05", {"log": "error"}, {"progressToken": "p"}))
        assert sent == [
            {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": "p", "progress": 1,
                                                                             "total": 10}},
            {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": "p", "progress": 2}},
            {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "error", "data": "error line"}}]
        sent.clear()
        asyncio.run(run("2025-03-26", {"log": "debug"}, {}))  # no progressToken: no progress
        assert [m["params"]["data"] for m in sent] == ["info line", "error line"]

    def test_middleware_wraps_every_request(self, server):
        seen = []

        async def middleware(ctx, call_next):
            seen.append(ctx.method)
            result = await call_next()
            return {**result, "_meta": {"wrapped": True}} if isinstance(result, dict) else result
        server.add_middleware(middleware)
        assert core_result(server, "ping") == {"_meta": {"wrapped": True}}
        assert seen == ["ping"]

    def test_classify_fuzz_never_raises_anything_but_rpc_error(self):
        rng = random.Random(7)
        for _ in range(1000):
            message = random_json(rng, 3)
            if isinstance(message, dict) and rng.random() < 0.5:
                message["jsonrpc"] = "2.0"
                message.setdefault("method", rng.choice(["ping", "tools/call", 5]))
            try:
                kind = mcp_server._classify(message)
            except RpcError as exc:
                assert exc.code == -32600 and exc.status == 400
            else:
                assert kind in ("request", "notification", "response")

    def test_asking_for_what_the_revision_lacks_names_the_revision_not_the_capability(self, make_server):
        # issue 19, defect 7: on 2024-11-05 and 2025-03-26 a tool asking for elicitation was told
        # "the client did not declare the elicitation capability" although it had: those revisions
        # have no elicitation.  Same for URL mode and sampling with tools (2025-11-25).
        server = MCPServer("revisions", settings=Settings(auth="none"))
        asks = {"form": lambda ctx: ctx.elicit("Name?", NAME_SCHEMA),
                "url": lambda ctx: ctx.elicit_url("Sign in", "https://example.com/sign-in"),
                "sampling_tools": lambda ctx: ctx.sample("Hi", tools=[{"name": "t", "inputSchema": NAME_SCHEMA}]),
                "sampling_context": lambda ctx: ctx.sample("Hi", include_context="thisServer")}

        @server.tool()
        async def ask(what: str, ctx: Context) -> str:
            await asks[what](ctx)
            return "asked"

        @server.tool()
        async def supported(ctx: Context) -> dict:
            features = ("elicitation", "elicitation.url", "sampling", "sampling.tools", "roots")
            return {feature: ctx.supports(feature) for feature in features}

        everything = {"elicitation": {"form": {}, "url": {}}, "sampling": {"tools": {}}, "roots": {}}
        st = make_server(server)
        form = ("Elicitation is not part of MCP {v}, the revision this client speaks; "
                "it needs 2025-06-18 or later, so the client cannot be asked.")
        url = ("URL-mode elicitation is not part of MCP {v}, the revision this client speaks; "
               "it needs 2025-11-25 or later, so the client cannot be asked.")
        tools = ("Sampling with tools is not part of MCP {v}, the revision this client speaks; "
                 "it needs 2025-11-25 or later, so the client cannot be asked.")
        expected = {"2024-11-05": {"form": form, "url": url, "sampling_tools": tools},
                    "2025-03-26": {"form": form, "url": url, "sampling_tools": tools},
                    "2025-06-18": {"url": url, "sampling_tools": tools}}
        for version, refusals in expected.items():
            session = Session(st.port, version, everything)
            session.initialize()
            for what, text in refusals.items():
                reply = session.post(session.body("tools/call", {"name": "ask", "arguments": {"what": what}}))
                assert reply.content_type == "application/json", reply  # no request went to the client
                result = final_message(reply, session._id)["result"]
                assert result["isError"] is True and result["content"][0]["text"] == text.format(v=version), result
            assert json.loads(session.call("supported")["content"][0]["text"]) == {
                "elicitation": version >= "2025-06-18", "elicitation.url": False, "sampling": True,
                "sampling.tools": False, "roots": True}
        # a revision that has the feature, a client that did not declare it: that is what it hears
        bare = Session(st.port, "2025-11-25", {"sampling": {}})
        bare.initialize()
        for what, need in (("form", "elicitation"), ("url", "elicitation.url"), ("sampling_tools", "sampling.tools"),
                           ("sampling_context", "sampling.context")):
            result = bare.call("ask", {"what": what})
            assert result["content"][0]["text"] == (
                f"The client did not declare the {need} capability, so it cannot be asked."), result
        # 2026-07-28 has them all: an undeclared one is -32021 with what it needs
        asked = {"name": "ask", "arguments": {"what": "sampling_context"}}
        error = assert_rpc_error(modern_post(st.port, "tools/call", asked, caps={"sampling": {}}), 400, -32021)
        assert error["data"]["requiredCapabilities"] == {"sampling": {"context": {}}}

    def test_a_failure_while_building_an_input_round_is_an_error_answer_not_an_escape(self):
        # The round was built inside _respond's handler for _InputRequired, where nothing caught
        # what failed: on stdio the process ended (here: a value requestState cannot carry)
        server = MCPServer("rounds")

        @server.tool()
        async def ask(ctx: Context) -> str:
            ctx.round_state["handle"] = object()
            await ctx.elicit("Name?", NAME_SCHEMA)
            return "asked"

        response, status = modern_core(server, "tools/call", {"name": "ask"}, caps={"elicitation": {}})
        assert status == 500 and response["error"]["code"] == -32603, response
        assert ERROR_ID.search(response["error"]["message"]), response

    def test_tasks_methods_on_2025_11_25_say_the_server_offers_no_tasks_there_not_that_the_revision_lacks_them(
            self, make_server):
        # 2025-11-25 defines tasks/* (experimental); this server declares no tasks capability
        # there.  "not part of protocol version 2025-11-25" was untrue; on 2025-06-18 it is true.
        st = make_server()
        current = Session(st.port, "2025-11-25")
        current.initialize()
        assert "tasks" not in current.init_result["capabilities"]
        for method in ("tasks/get", "tasks/list"):
            error = current.request(method, {"taskId": "x"})["error"]
            assert error["code"] == -32601 and error["message"] == (
                f"Method not found: {method}: this server declared no tasks capability for 2025-11-25; it runs "
                "tasks for 2026-07-28 clients, as the io.modelcontextprotocol/tasks extension."), error
        older = Session(st.port, "2025-06-18")
        older.initialize()
        error = older.request("tasks/get", {"taskId": "x"})["error"]
        assert error["message"] == "Method not found: tasks/get is not part of protocol version 2025-06-18.", error


# =================================================================================================
# 6. Transports: Streamable HTTP
# =================================================================================================


class TestStreamableHTTP:
    def test_initialize_mints_a_session_and_initialized_is_accepted(self, live):
        s = Session(live.port)
        r = s.initialize()
        assert r.content_type == "application/json"
        assert VISIBLE_ASCII.fullmatch(s.sid) and len(s.sid) >= 16
        assert s.init_result["protocolVersion"] == LEGACY
        assert Session(live.port).initialize().header("mcp-session-id") != s.sid

    def test_tools_list_and_call_in_a_session(self, live):
        s = Session(live.port)
        s.initialize()
        names = [t["name"] for t in s.request("tools/list")["result"]["tools"]]
        assert {"echo", "add", "progress", "hang"} <= set(names)
        assert s.call("echo", {"text": "héllo"}) == {"content": [{"type": "text", "text": "héllo"}]}
        assert s.call("add", {"a": 1})["structuredContent"] == {"sum": 4}

    def test_each_legacy_version_gets_its_own_session(self, live):
        for version in ("2025-06-18", "2025-03-26"):
            s = Session(live.port, version)
            s.initialize()
            assert s.init_result["protocolVersion"] == version
            assert s.call("add", {"a": 1, "b": 1})["content"][0]["text"] == '{"sum":2}'

    def test_missing_session_is_400_and_unknown_session_is_404(self, live):
        r = http(live.port, "POST", "/mcp", {"Accept": ACCEPT_BOTH},
                 {"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
        assert r.status == 400 and r.json()["error"]["code"] == -32600
        r = http(live.port, "POST", "/mcp", {"Accept": ACCEPT_BOTH, "Mcp-Session-Id": "no-such-session"},
                 {"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
        assert r.status == 404 and r.json()["id"] == 1

    def test_delete_ends_the_session(self, live):
        s = Session(live.port)
        s.initialize()
        assert s.delete().status == 200
        assert s.delete().status == 404
        assert s.post(s.body("tools/list")).status == 404

    def test_delete_after_expiry_is_404(self, make_server):
        clock = FakeClock()
        st = make_server(build_server(store=MemoryStore(clock=clock), session_ttl=30))
        s = Session(st.port)
        s.initialize()
        clock.advance(31)
        assert s.delete().status == 404

    def test_plain_call_answers_json(self, live):
        s = Session(live.port)
        s.initialize()
        r = s.post(s.body("tools/call", {"name": "echo", "arguments": {"text": "x"}}))
        assert r.status == 200 and r.content_type == "application/json"
        assert r.json()["result"]["content"][0]["text"] == "x"

    def test_progress_streams_sse_with_notifications_before_the_result(self, live):
        s = Session(live.port)
        s.initialize()
        message = s.body("tools/call", {"name": "progress", "arguments": {"steps": 3},
                                        "_meta": {"progressToken": "tok-1"}})
        r = s.post(message)
        assert r.status == 200 and r.content_type == "text/event-stream"
        assert r.header("cache-control") == "no-cache"
        messages = r.messages()
        assert [m.get("method") for m in messages] == ["notifications/progress"] * 3 + [None]
        assert [m["params"]["progress"] for m in messages[:3]] == [1, 2, 3]
        assert all(m["params"]["progressToken"] == "tok-1" and m["params"]["total"] == 3 for m in messages[:3])
        assert messages[0]["params"]["message"] == "step 1"
        assert messages[-1]["id"] == message["id"] and messages[-1]["result"]["content"][0]["text"] == "progress done"
        events = [e for e in r.events() if e.get("data")]
        assert all(e.get("event", "message") == "message" for e in events)
        ids = [e["id"] for e in events]
        assert len(set(ids)) == len(ids)  # 2025-11-25: resumable ids, unique in the session

    def test_progress_without_sse_accept_answers_json(self, live):
        s = Session(live.port)
        s.initialize()
        message = s.body("tools/call", {"name": "progress", "arguments": {}, "_meta": {"progressToken": 1}})
        r = s.post(message, {"Accept": "application/json"})
        assert r.content_type == "application/json" and r.json()["result"]["content"][0]["text"] == "progress done"

    @pytest.mark.parametrize("accept", [None, "*/*", "application/json", "application/json;q=0.9", ACCEPT_BOTH])
    def test_accept_headers_that_get_json(self, live, accept):
        s = Session(live.port)
        s.initialize()
        r = s.post(s.body("tools/list"), {"Accept": accept})
        assert r.status == 200 and r.content_type == "application/json"
        assert "tools" in r.json()["result"]

    def test_accept_html_only_is_406(self, live):
        s = Session(live.port)
        s.initialize()
        r = s.post(s.body("tools/list"), {"Accept": "text/html"})
        assert r.status == 406 and r.json()["error"]["code"] == -32600

    @pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "application/jsonx"])
    def test_wrong_content_type_is_415(self, live, content_type):
        s = Session(live.port)
        s.initialize()
        r = s.post(s.body("tools/list"), {"Content-Type": content_type})
        assert r.status == 415

    def test_content_type_with_charset_is_fine(self, live):
        s = Session(live.port)
        s.initialize()
        assert s.post(s.body("ping"), {"Content-Type": "application/json; charset=utf-8"}).status == 200

    @pytest.mark.parametrize("body", [b"{not json", b"", b"\xff\xfe", b'{"jsonrpc": "2.0", "id": 1,'])
    def test_invalid_json_is_400_parse_error(self, live, body):
        s = Session(live.port)
        s.initialize()
        r = s.post(body)
        assert_rpc_error(r, 400, -32700)
        assert r.json()["id"] is None

    @pytest.mark.parametrize("message", [
        {"jsonrpc": "1.0", "id": 1, "method": "ping"},
        {"jsonrpc": "2.0", "id": None, "method": "ping"},
        {"jsonrpc": "2.0", "id": True, "method": "ping"},
        {"jsonrpc": "2.0", "id": 1, "method": 5},
        {"jsonrpc": "2.0", "id": 1, "method": "ping", "params": [1]},
        {"jsonrpc": "2.0"},
        b'"just a string"',
        b"[]",
    ])
    def test_invalid_request_is_400(self, live, message):
        s = Session(live.port)
        s.initialize()
        assert_rpc_error(s.post(message), 400, -32600)

    def test_array_body_in_a_2025_11_25_session_is_400(self, live):
        s = Session(live.port)
        s.initialize()
        r = s.post([s.body("ping"), s.body("tools/list")])
        assert_rpc_error(r, 400, -32600)

    def test_batch_in_a_2025_03_26_session(self, live):
        s = Session(live.port, "2025-03-26")
        s.initialize()
        r = s.post([{"jsonrpc": "2.0", "id": "a", "method": "ping"},
                    {"jsonrpc": "2.0", "method": "notifications/initialized"},
                    {"jsonrpc": "2.0", "id": "b", "method": "tools/call", "params": {"name": "echo",
                                                                                     "arguments": {"text": "t"}}},
                    {"jsonrpc": "2.0", "id": "c", "method": "initialize", "params": {"protocolVersion": "2025-03-26"}}])
        assert r.status == 200 and r.content_type == "application/json"
        answers = {a["id"]: a for a in r.json()}
        assert answers["a"]["result"] == {}
        assert answers["b"]["result"]["content"][0]["text"] == "t"
        assert answers["c"]["error"]["code"] == -32600  # initialize must not be batched
        assert len(answers) == 3
        only_notifications = s.post([{"jsonrpc": "2.0", "method": "notifications/initialized"}])
        assert only_notifications.status == 202 and only_notifications.body == b""

    # -- 2026-07-28 requests ---------------------------------------------------------------------

    def test_modern_request_is_served_statelessly(self, live):
        r = modern_post(live.port, "tools/call", {"name": "echo", "arguments": {"text": "m"}}, request_id="r1")
        assert r.status == 200 and r.header("mcp-session-id") is None
        body = r.json()
        assert body["id"] == "r1" and body["result"]["resultType"] == "complete"
        assert body["result"]["content"] == [{"type": "text", "text": "m"}]
        assert body["result"]["_meta"][META_SERVERINFO]["name"] == "test-server"

    def test_modern_discover_and_lists(self, live):
        r = modern_post(live.port, "server/discover")
        assert r.status == 200 and r.json()["result"]["supportedVersions"][0] == MODERN
        tools = modern_post(live.port, "tools/list").json()["result"]
        assert tools["cacheScope"] == "public" and any(t["name"] == "echo" for t in tools["tools"])

    def test_modern_missing_version_header_is_32020(self, live):
        assert_rpc_error(modern_post(live.port, "tools/list", headers={"MCP-Protocol-Version": None}), 400, -32020)

    def test_modern_header_without_meta_is_32602(self, live):
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
        error = assert_rpc_error(modern_post(live.port, "tools/list", body=body), 400, -32602)
        assert "_meta" in error["message"]
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": {META_VERSION: MODERN}}}
        error = assert_rpc_error(modern_post(live.port, "tools/list", body=body), 400, -32602)
        assert "clientCapabilities" in error["message"]

    def test_modern_version_mismatch_is_32020(self, live):
        assert_rpc_error(modern_post(live.port, "tools/list", headers={"MCP-Protocol-Version": "2025-11-25"}),
                         400, -32020)

    def test_modern_unsupported_version_is_32022_with_the_supported_list(self, live):
        body = modern_body("tools/list")
        body["params"]["_meta"][META_VERSION] = "2099-01-01"
        error = assert_rpc_error(modern_post(live.port, "tools/list", body=body,
                                             headers={"MCP-Protocol-Version": "2099-01-01"}), 400, -32022)
        assert error["data"]["requested"] == "2099-01-01"
        assert error["data"]["supported"][0] == MODERN and "2024-11-05" in error["data"]["supported"]

    def test_modern_unknown_method_is_404_32601(self, live):
        assert_rpc_error(modern_post(live.port, "tools/destroy"), 404, -32601)
        assert_rpc_error(modern_post(live.port, "initialize", {"protocolVersion": MODERN}), 404, -32601)

    @pytest.mark.parametrize("method, params, headers", [
        ("tools/list", None, {"Mcp-Method": None}),
        ("tools/list", None, {"Mcp-Method": "prompts/list"}),
        ("tools/call", {"name": "echo", "arguments": {"text": "x"}}, {"Mcp-Name": None}),
        ("tools/call", {"name": "echo", "arguments": {"text": "x"}}, {"Mcp-Name": "add"}),
        ("resources/read", {"uri": "test://static"}, {"Mcp-Name": "test://other"}),
        ("tools/call", {"name": "echo", "arguments": {"text": "x"}}, {"Mcp-Name": "=?base64?!!!?="}),
    ])
    def test_modern_header_mismatch_is_32020(self, live, method, params, headers):
        assert_rpc_error(modern_post(live.port, method, params, headers=headers), 400, -32020)

    def test_modern_base64_sentinel_name_is_decoded(self, live):
        encoded = "=?base64?" + base64.b64encode(b"echo").decode() + "?="
        r = modern_post(live.port, "tools/call", {"name": "echo", "arguments": {"text": "b64"}},
                        headers={"Mcp-Name": encoded})
        assert r.status == 200 and r.json()["result"]["content"][0]["text"] == "b64"

    def test_modern_missing_capability_is_400_32021(self, live):
        error = assert_rpc_error(modern_post(live.port, "tools/call", {"name": "ask_name"}), 400, -32021)
        assert error["data"]["requiredCapabilities"] == {"elicitation": {}}

    def test_modern_mrtr_round_trip_over_http(self, live):
        caps = {"elicitation": {}}
        first = modern_post(live.port, "tools/call", {"name": "ask_name"}, caps=caps).json()["result"]
        assert first["resultType"] == "input_required"
        second = modern_post(live.port, "tools/call", {
            "name": "ask_name", "requestState": first["requestState"],
            "inputResponses": {"who": {"action": "accept", "content": {"name": "Eve"}}}}, caps=caps, request_id=2)
        assert second.json()["result"]["content"][0]["text"] == "Hello, Eve!"

    def test_modern_progress_streams_without_event_ids(self, live):
        params = {"name": "progress", "arguments": {"steps": 2}, "_meta": {"progressToken": 9}}
        r = modern_post(live.port, "tools/call", params, request_id=5)
        assert r.content_type == "text/event-stream"
        events = [e for e in r.events() if e.get("data")]
        assert all("id" not in e for e in events)
        messages = r.messages()
        assert [m.get("method") for m in messages] == ["notifications/progress"] * 2 + [None]
        assert messages[-1]["result"]["resultType"] == "complete"

    def test_modern_get_and_delete_are_405(self, live):
        for method in ("GET", "DELETE"):
            r = http(live.port, method, "/mcp", {"MCP-Protocol-Version": MODERN, "Accept": "text/event-stream"})
            assert r.status == 405 and "POST" in r.header("allow")

    def test_modern_notification_is_202(self, live):
        body = modern_body("notifications/cancelled", {"requestId": 99})
        del body["id"]
        r = http(live.port, "POST", "/mcp", modern_headers(body), body)
        assert r.status == 202 and r.body == b""

    # -- Origin, Host, CORS ------------------------------------------------------------------------

    def test_foreign_origin_is_403_naming_the_setting(self, live):
        r = http(live.port, "POST", "/mcp", {"Origin": "https://evil.example", "Accept": ACCEPT_BOTH},
                 {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": LEGACY}})
        assert r.status == 403 and "MCP_ALLOWED_ORIGINS" in r.json()["error"]["message"]
        assert r.header("mcp-session-id") is None

    def test_null_origin_is_403(self, live):
        r = http(live.port, "POST", "/mcp", {"Origin": "null"}, modern_body("tools/list"))
        assert r.status == 403

    def test_loopback_origin_is_allowed_with_cors_headers(self, live):
        r = http(live.port, "POST", "/mcp", {"Origin": "http://localhost:5173", "Accept": ACCEPT_BOTH},
                 {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": LEGACY}})
        assert r.status == 200
        assert r.header("access-control-allow-origin") == "http://localhost:5173"
        assert "mcp-session-id" in r.header("access-control-expose-headers").lower()

    def test_allow_listed_origin(self, make_server):
        st = make_server(allowed_origins=("https://app.example",))
        assert http(st.port, "POST", "/http", {"Origin": "https://app.example"}, {"method": "ping"}).status == 200
        assert http(st.port, "POST", "/http", {"Origin": "https://other.example"}, {"method": "ping"}).status == 403

    @pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "127.0.0.1.evil.example"])
    def test_foreign_host_is_403(self, live, host):
        r = http(live.port, "POST", "/http", {"Host": host}, {"method": "ping"})
        assert r.status == 403 and "MCP_ALLOWED_HOSTS" in r.json()["error"]["message"]

    @pytest.mark.parametrize("origin", ["http://127.0.0.1.evil.example", "http://127.evil.example:8080",
                                        "http://localhost.evil.example", "http://evil.example/localhost"])
    def test_origins_that_only_look_like_loopback_are_403(self, live, origin):
        r = http(live.port, "POST", "/http", {"Origin": origin}, {"method": "ping"})
        assert r.status == 403, (origin, r)

    @pytest.mark.parametrize("host", ["localhost", "127.0.0.1:1234", "127.1.2.3", "[::1]:80", "app.localhost"])
    def test_loopback_hosts_are_allowed(self, live, host):
        assert http(live.port, "POST", "/http", {"Host": host}, {"method": "ping"}).status == 200

    def test_cors_preflight(self, live):
        r = http(live.port, "OPTIONS", "/mcp", {
            "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, mcp-session-id, mcp-protocol-version"})
        assert r.status == 204
        assert r.header("access-control-allow-origin") == "http://localhost:3000"
        assert "POST" in r.header("access-control-allow-methods")
        assert "mcp-session-id" in r.header("access-control-allow-headers")
        bad = http(live.port, "OPTIONS", "/mcp", {"Origin": "https://evil.example",
                                                  "Access-Control-Request-Method": "POST"})
        assert bad.status == 403

    # -- server-to-client requests and notifications on streams --------------------------------

    def test_legacy_elicitation_round_trip(self, live):
        s = Session(live.port, capabilities={"elicitation": {}})
        s.initialize()
        call = s.body("tools/call", {"name": "ask_name", "arguments": {}})
        with Conn(live.port) as conn:
            conn.request("POST", "/mcp", s.headers(), call)
            resp = conn.read_head()
            assert resp.status == 200
            stream = SSEStream(conn, resp)
            ask = stream.next_message()
            assert ask["method"] == "elicitation/create" and "id" in ask
            assert ask["params"]["requestedSchema"] == NAME_SCHEMA
            answer = s.post({"jsonrpc": "2.0", "id": ask["id"],
                             "result": {"action": "accept", "content": {"name": "Ada"}}})
            assert answer.status == 202 and answer.body == b""
            final = stream.next_message()
            assert final["id"] == call["id"] and final["result"]["content"][0]["text"] == "Hello, Ada!"
            assert stream.next_event() is None  # the stream ends after the response

    def test_legacy_elicitation_declined(self, live):
        s = Session(live.port, capabilities={"elicitation": {}})
        s.initialize()
        call = s.body("tools/call", {"name": "ask_name"})
        with Conn(live.port) as conn:
            conn.request("POST", "/mcp", s.headers(), call)
            stream = SSEStream(conn, conn.read_head())
            ask = stream.next_message()
            assert s.post({"jsonrpc": "2.0", "id": ask["id"], "result": {"action": "decline"}}).status == 202
            assert stream.next_message()["result"]["content"][0]["text"] == "no name (decline)"

    def test_get_stream_receives_list_changed(self, live):
        s = Session(live.port)
        s.initialize()
        with Conn(live.port) as conn:
            conn.request("GET", "/mcp", s.headers({"Accept": "text/event-stream", "Content-Type": None}))
            resp = conn.read_head()
            assert resp.status == 200
            stream = SSEStream(conn, resp)
            priming = stream.next_event()  # 2025-11-25: the stream is open and registered
            assert "id" in priming and not priming.get("data")
            live.run(live.server.notify_tools_changed())
            assert stream.next_message() == {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}
            live.run(live.server.notify_prompts_changed())
            assert stream.next_message()["method"] == "notifications/prompts/list_changed"
            assert s.delete().status == 200
            assert stream.next_event() is None  # DELETE ends the session's stream

    def test_idle_streams_get_keep_alive_comments_and_still_deliver(self, make_server):
        st = make_server(sse_keepalive=0.2)
        sessions = [Session(st.port) for _ in range(3)]
        conns = [Conn(st.port) for _ in sessions]
        try:
            streams = []
            for s, conn in zip(sessions, conns):
                s.initialize()
                conn.request("GET", "/mcp", s.headers({"Accept": "text/event-stream", "Content-Type": None}))
                streams.append((conn, conn.iter_body(conn.read_head())))
            for conn, pieces in streams:  # each idle stream gets comments (one ticker wakes them all)
                text = b""
                while text.count(b": keep-alive\n\n") < 2:
                    text += next(pieces)
            st.run(st.server.notify_tools_changed())  # and a waiting stream still delivers at once
            for conn, pieces in streams:
                text = b""
                while b"notifications/tools/list_changed" not in text:
                    text += next(pieces)
        finally:
            for conn in conns:
                conn.close()

    def test_get_stream_needs_sse_accept_and_a_session(self, live):
        s = Session(live.port)
        s.initialize()
        assert http(live.port, "GET", "/mcp", s.headers({"Accept": "application/json"})).status == 406
        assert http(live.port, "GET", "/mcp", {"Accept": "text/event-stream"}).status == 400
        assert http(live.port, "GET", "/mcp", {"Accept": "text/event-stream", "Mcp-Session-Id": "nope"}).status == 404

    def test_resource_updated_reaches_a_subscribed_session_only(self, live):
        s = Session(live.port)
        s.initialize()
        assert s.request("resources/subscribe", {"uri": "test://static"})["result"] == {}
        with Conn(live.port) as conn:
            conn.request("GET", "/mcp", s.headers({"Accept": "text/event-stream"}))
            stream = SSEStream(conn, conn.read_head())
            stream.next_event()  # priming
            live.run(live.server.notify_resource_updated("test://other"))
            live.run(live.server.notify_resource_updated("test://static"))
            assert stream.next_message() == {"jsonrpc": "2.0", "method": "notifications/resources/updated",
                                             "params": {"uri": "test://static"}}

    def test_last_event_id_resume_after_the_server_closed_the_stream(self, live):
        s = Session(live.port)
        s.initialize()
        token = new_token("plain")
        call = s.body("tools/call", {"name": "reconnect", "arguments": {"token": token}})
        r = s.post(call)
        assert r.status == 200 and r.content_type == "text/event-stream"
        events = r.events()
        assert events and all(not e.get("data") for e in events)  # closed before the result
        assert "retry" in events[0]
        last_id = events[-1]["id"]
        g = http(live.port, "GET", "/mcp", s.headers({"Accept": "text/event-stream", "Last-Event-ID": last_id}))
        assert g.status == 200
        final = final_message(g, call["id"])
        assert final["result"]["content"][0]["text"] == f"resumed {token}"

    def test_last_event_id_resume_follows_a_running_request(self, live):
        s = Session(live.port)
        s.initialize()
        token = new_token("gated")
        call = s.body("tools/call", {"name": "reconnect", "arguments": {"token": token}})
        r = s.post(call)
        last_id = r.events()[-1]["id"]
        p = probe(token)
        assert p.gate_ready.wait(WAIT)
        with Conn(live.port) as conn:
            conn.request("GET", "/mcp", s.headers({"Accept": "text/event-stream", "Last-Event-ID": last_id}))
            live.call_soon(p.gate.set)
            g = conn.read_response()
        assert final_message(g, call["id"])["result"]["content"][0]["text"] == f"resumed {token}"

    # -- cancellation ------------------------------------------------------------------------------

    def test_legacy_cancelled_notification_stops_the_tool(self, live):
        s = Session(live.port)
        s.initialize()
        token = new_token()
        call = s.body("tools/call", {"name": "hang", "arguments": {"token": token}}, request_id=77)
        with Conn(live.port) as conn:
            conn.request("POST", "/mcp", s.headers(), call)
            p = probe(token)
            assert p.started.wait(WAIT)
            note = s.post({"jsonrpc": "2.0", "method": "notifications/cancelled",
                           "params": {"requestId": 77, "reason": "test"}})
            assert note.status == 202
            resp = conn.read_response()  # the POST ends without a result
            assert resp.status in (200, 202, 204), resp
            if resp.body:
                assert all("result" not in m for m in resp.messages())
        assert p.finished.wait(WAIT)
        assert p.cancelled is True

    def test_cancelling_an_unknown_request_is_ignored(self, live):
        s = Session(live.port)
        s.initialize()
        note = s.post({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": "nope"}})
        assert note.status == 202

    def test_modern_disconnect_cancels_the_tool(self, live):
        token = new_token()
        conn = Conn(live.port)
        body = modern_body("tools/call", {"name": "hang", "arguments": {"token": token}})
        conn.request("POST", "/mcp", modern_headers(body), body)
        p = probe(token)
        assert p.started.wait(WAIT)
        conn.close()
        assert p.finished.wait(WAIT)
        assert p.cancelled is True

    # -- robustness -------------------------------------------------------------------------------

    def test_json_body_fuzz_never_answers_500(self, live):
        rng = random.Random(99)
        s = Session(live.port)
        s.initialize()
        for _ in range(150):
            message = random_json(rng, 3)
            if isinstance(message, dict) and rng.random() < 0.6:
                message["jsonrpc"] = "2.0"
                message["method"] = rng.choice(["tools/call", "tools/list", "ping", "resources/read",
                                                "prompts/get", "completion/complete", "logging/setLevel"])
                if rng.random() < 0.5:
                    message["id"] = rng.randint(1, 10 ** 6)
                if rng.random() < 0.3:
                    message["params"] = {"_meta": {META_VERSION: MODERN, META_CAPS: {}}}
            headers = {"MCP-Protocol-Version": MODERN} if rng.random() < 0.2 else None
            r = s.post(json.dumps(message).encode(), headers)
            assert r.status < 500, (message, r)
            if r.status >= 400:
                assert r.json()["error"]["code"] in (-32700, -32600, -32601, -32602, -32020, -32021, -32022), r

    def test_unknown_path_and_method(self, live):
        r = http(live.port, "GET", "/nope")
        assert r.status == 404 and "/mcp" in r.json()["error"]["message"]
        r = http(live.port, "PUT", "/mcp", body=b"{}")
        assert r.status == 405 and "POST" in r.header("allow")
        assert http(live.port, "GET", "/healthz").json() == {"status": "ok"}
        index = http(live.port, "GET", "/").json()
        assert index["mcp"] == "/mcp" and MODERN in index["protocolVersions"]


# =================================================================================================
# 6. Transports: legacy HTTP+SSE
# =================================================================================================

    def test_an_sse_only_initialize_still_gets_its_session_id(self, live):
        body = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                "params": {"protocolVersion": LEGACY, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
        r = http(live.port, "POST", "/mcp", {"Content-Type": "application/json", "Accept": "text/event-stream"}, body)
        assert r.status == 200 and r.content_type == "text/event-stream", r
        assert r.header("mcp-session-id") and final_message(r, 1)["result"]["protocolVersion"] == LEGACY

    def test_a_client_that_accepts_only_sse_gets_sse(self, live):
        session = Session(live.port)
        session.initialize()
        body = session.body("tools/list")
        r = session.post(body, {"Accept": "text/event-stream"})
        assert r.status == 200 and r.content_type == "text/event-stream", r
        assert "tools" in final_message(r, body["id"])["result"]
        modern = modern_body("tools/list", request_id=7)
        r = http(live.port, "POST", "/mcp", modern_headers(modern, {"Accept": "text/event-stream"}), modern)
        assert r.status == 200 and r.content_type == "text/event-stream", r
        assert final_message(r, 7)["result"]["resultType"] == "complete"


class LegacySSEClient:
    def __init__(self, port: int, path: str = "/sse"):
        self.port = port
        self.conn = Conn(port)
        self.conn.request("GET", path, {"Accept": "text/event-stream"})
        self.resp = self.conn.read_head()
        self.status = self.resp.status
        if self.status == 200:
            self.stream = SSEStream(self.conn, self.resp)
            endpoint = self.stream.next_event()
            assert endpoint["event"] == "endpoint", endpoint
            self.endpoint = endpoint["data"]

    def post(self, message) -> Response:
        return http(self.port, "POST", self.endpoint, {"Content-Type": "application/json"}, message)

    def next_message(self) -> dict:
        return self.stream.next_message()

    def close(self):
        self.conn.close()


class TestLegacySSE:
    def test_endpoint_event_then_initialize_over_the_stream(self, live):
        c = LegacySSEClient(live.port)
        try:
            assert re.fullmatch(r"/messages\?session_id=[\x21-\x7e]+", c.endpoint)
            r = c.post({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                        "params": {"protocolVersion": "2024-11-05", "capabilities": {}}})
            assert r.status == 202 and r.body == b""
            reply = c.next_message()
            assert reply["id"] == 1 and reply["result"]["protocolVersion"] == "2024-11-05"
            assert c.post({"jsonrpc": "2.0", "method": "notifications/initialized"}).status == 202
            assert c.post({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                           "params": {"name": "add", "arguments": {"a": 1}}}).status == 202
            reply = c.next_message()
            assert reply["id"] == 2 and reply["result"] == {"content": [{"type": "text", "text": '{"sum":4}'}]}
        finally:
            c.close()

    def test_a_listen_over_messages_is_refused_it_would_outlive_its_request(self, live):
        """subscriptions/listen POSTed to /messages (answered 202) would hold a stream slot with no
        response of its own to end it: refused on the session's stream (review of issue 20)."""
        c = LegacySSEClient(live.port)
        try:
            listen = modern_body("subscriptions/listen", {"notifications": {"toolsListChanged": True}}, request_id=9)
            assert c.post(listen).status == 202
            reply = c.next_message()
            assert reply["id"] == 9 and reply["error"]["code"] == -32600, reply
            assert "response stream of its own" in reply["error"]["message"]  # (refused before a slot is held)
        finally:
            c.close()

    def test_events_are_message_events(self, live):
        c = LegacySSEClient(live.port)
        try:
            c.post({"jsonrpc": "2.0", "id": 1, "method": "ping"})
            event = c.stream.next_event()
            assert event["event"] == "message" and json.loads(event["data"]) == {"jsonrpc": "2.0", "id": 1, "result": {}}
        finally:
            c.close()

    def test_unknown_or_missing_session_id(self, live):
        body = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
        assert http(live.port, "POST", "/messages?session_id=nope", body=body).status == 404
        assert http(live.port, "POST", "/messages", body=body).status == 400
        assert http(live.port, "GET", "/sse?session_id=nope", {"Accept": "text/event-stream"}).status == 404

    def test_requests_before_initialize_are_refused_on_the_stream(self, live):
        """The POST is accepted (202); the refusal is the answer on the stream, as every answer
        there is: dual-era clients probing first (server/discover) then read it and fall back."""
        c = LegacySSEClient(live.port)
        try:
            r = c.post({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
            assert r.status == 202
            answer = c.next_message()
            assert answer["id"] == 1 and answer["error"]["code"] == mcp_server.INVALID_REQUEST
            assert "initialize" in answer["error"]["message"]
        finally:
            c.close()

    def test_a_2026_request_on_the_stream_is_served_statelessly(self, live):
        c = LegacySSEClient(live.port)
        try:
            r = c.post(modern_body("server/discover", request_id=5))
            assert r.status == 202
            answer = c.next_message()
            assert answer["id"] == 5 and "2026-07-28" in answer["result"]["supportedVersions"]
            bad = dict(modern_body("tools/list", request_id=6))
            bad["params"] = {"_meta": {"io.modelcontextprotocol/protocolVersion": "2099-01-01",
                                       "io.modelcontextprotocol/clientCapabilities": {}}}
            c.post(bad)
            answer = c.next_message()
            assert answer["id"] == 6 and answer["error"]["code"] == mcp_server.UNSUPPORTED_VERSION
        finally:
            c.close()

    def test_reattach_with_session_id(self, live):
        c = LegacySSEClient(live.port)
        c.post({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2024-11-05"}})
        assert c.next_message()["id"] == 1
        session_id = c.endpoint.split("session_id=")[1]
        c.close()
        again = LegacySSEClient(live.port, f"/sse?session_id={session_id}")
        try:
            assert again.status == 200 and again.endpoint == c.endpoint
            assert again.post({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}).status == 202
            reply = again.next_message()
            assert reply["id"] == 2 and any(t["name"] == "echo" for t in reply["result"]["tools"])
        finally:
            again.close()

    def test_list_changed_reaches_the_sse_stream(self, live):
        c = LegacySSEClient(live.port)
        try:
            c.post({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2024-11-05"}})
            c.next_message()
            live.run(live.server.notify_resources_changed())
            assert c.next_message() == {"jsonrpc": "2.0", "method": "notifications/resources/list_changed"}
        finally:
            c.close()

    def test_bad_json_on_messages_is_400(self, live):
        c = LegacySSEClient(live.port)
        try:
            r = c.post(b"{oops")
            assert_rpc_error(r, 400, -32700)
        finally:
            c.close()


# =================================================================================================
# 6. Transports: direct JSON (/http)
# =================================================================================================


class TestDirectHTTP:
    def test_full_json_rpc(self, live):
        r = http(live.port, "POST", "/http", body={"jsonrpc": "2.0", "id": 7, "method": "tools/list"})
        assert r.status == 200
        body = r.json()
        assert body["id"] == 7 and any(t["name"] == "echo" for t in body["result"]["tools"])

    def test_short_form(self, live):
        r = http(live.port, "POST", "/http", body={"method": "tools/list"})
        assert r.status == 200 and "tools" in r.json() and "jsonrpc" not in r.json()
        r = http(live.port, "POST", "/http", body={"method": "tools/call",
                                                   "params": {"name": "add", "arguments": {"a": 2}}})
        assert r.json() == {"content": [{"type": "text", "text": '{"sum":5}'}], "structuredContent": {"sum": 5}}

    def test_short_form_error(self, live):
        r = http(live.port, "POST", "/http", body={"method": "no/such"})
        assert r.status == 400 and r.json()["error"]["code"] == -32601

    def test_full_form_error_keeps_json_rpc_framing(self, live):
        r = http(live.port, "POST", "/http", body={"jsonrpc": "2.0", "id": 1, "method": "resources/read",
                                                   "params": {"uri": "test://missing"}})
        assert r.json()["error"]["code"] == -32002 and r.json()["id"] == 1

    def test_modern_request_on_http(self, live):
        r = http(live.port, "POST", "/http", body=modern_body("tools/list"))
        assert r.status == 200 and r.json()["result"]["resultType"] == "complete"

    def test_notifications_and_garbage_are_400(self, live):
        assert http(live.port, "POST", "/http", body={"jsonrpc": "2.0", "method": "ping"}).status == 400
        assert_rpc_error(http(live.port, "POST", "/http", body=b"[1,"), 400, -32700)
        assert http(live.port, "GET", "/http").status == 405


# =================================================================================================
# 6. Transports: stdio
# =================================================================================================


class TestStdio:
    def test_builtin_server_initialize_and_call(self):
        with Proc([SERVER_FILE, "--stdio"]) as p:
            init = p.initialize()
            assert init["result"]["protocolVersion"] == LEGACY
            assert init["result"]["serverInfo"]["name"] == "mcp_server"
            tools = p.request("tools/list")["result"]["tools"]
            assert "server_info" in [t["name"] for t in tools]
            info = p.request("tools/call", {"name": "server_info", "arguments": {}})["result"]
            assert info["structuredContent"]["protocolVersion"] == LEGACY
            assert info["structuredContent"]["store"] == "memory"
            assert p.finish() == 0

    def test_everything_server_initialize_and_call(self):
        with Proc([EVERYTHING_FILE, "--stdio"]) as p:
            assert p.initialize()["result"]["serverInfo"]["name"] == "mcp-conformance-test-server"
            result = p.request("tools/call", {"name": "test_simple_text", "arguments": {}})["result"]
            assert result["content"] == [{"type": "text", "text": "This is a simple text response for testing."}]
            assert p.finish() == 0

    def test_a_line_beyond_the_body_limit_is_refused_and_the_next_one_served(self):
        with Proc([EVERYTHING_FILE, "--stdio"], env=clean_env(MCP_MAX_BODY="100000")) as p:
            p.initialize()
            huge = {"jsonrpc": "2.0", "id": 99, "method": "tools/call",
                    "params": {"name": "greet", "arguments": {"name": "x" * 300000}}}
            p.send(huge)
            refused = p.recv()
            assert refused["id"] is None and refused["error"]["code"] == -32600, refused
            assert "larger than the limit of 100000 bytes" in refused["error"]["message"]
            # many requests written at once are all answered, in order for the ordered methods
            p.send(b"".join((json.dumps({"jsonrpc": "2.0", "id": 1000 + i, "method": "ping"}) + "\n").encode()
                            for i in range(200)))
            assert [p.recv()["id"] for _ in range(200)] == list(range(1000, 1200))
            assert p.request("ping")["result"] == {}
            assert p.finish() == 0

    def test_discover_before_initialize(self):
        with Proc([EVERYTHING_FILE, "--stdio"]) as p:
            legacy = p.request("server/discover", {})
            assert MODERN in legacy["result"]["supportedVersions"]
            modern = p.request("server/discover", {"_meta": {META_VERSION: MODERN, META_CAPS: {}}})
            assert modern["result"]["resultType"] == "complete"
            assert p.request("tools/list")["error"]["code"] == -32600  # legacy before initialize
            assert p.request("ping")["result"] == {}
            modern_call = p.request("tools/call", {"name": "greet", "arguments": {"name": "stdio"},
                                                   "_meta": {META_VERSION: MODERN, META_CAPS: {}}})
            assert modern_call["result"]["content"][0]["text"] == "Hello, stdio!"
            assert p.finish() == 0

    def test_printing_tools_do_not_corrupt_stdout(self, printer_script):
        with Proc([printer_script, "--stdio"]) as p:
            p.initialize()
            assert p.request("tools/call", {"name": "noisy", "arguments": {"text": "t"}})["result"]["content"][0][
                "text"] == "quiet t"
            assert p.request("tools/call", {"name": "noisy_async"})["result"]["content"][0]["text"] == "ok"
            assert p.finish() == 0
        for line in bytes(p.stdout).splitlines():
            json.loads(line)  # every stdout line is one JSON-RPC message
        err = p.stderr.decode()
        assert "NOISE from print() t" in err and "more noise" in err and "raw fd noise" in err
        assert "async noise" in err

    def test_a_tools_child_process_cannot_read_the_clients_messages(self, tmp_path):
        # The child inherits fd 0: on the client's pipe it would take the next message (here the
        # ping), which the server then never answers.  It must find stdin empty instead.
        script = tmp_path / "child_server.py"
        script.write_text(textwrap.dedent(f'''
            import subprocess, sys
            sys.path.insert(0, {ROOT!r})
            from mcp_server import MCPServer
            server = MCPServer("children", version="1.0.0")

            @server.tool()
            def child_reads_stdin() -> str:
                """Run a child that reads one line of its inherited stdin."""
                done = subprocess.run([sys.executable, "-c", "import sys; print(repr(sys.stdin.readline()))"],
                                      stdout=subprocess.PIPE, text=True, timeout=30)
                return done.stdout.strip()

            if __name__ == "__main__":
                server.run()
        '''))
        with Proc([str(script), "--stdio"]) as p:
            p.initialize()
            p.send({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                    "params": {"name": "child_reads_stdin", "arguments": {}}})
            p.send({"jsonrpc": "2.0", "id": 8, "method": "ping"})
            answers = {}
            while len(answers) < 2:
                reply = p.recv()
                if "id" in reply:
                    answers[reply["id"]] = reply
            assert answers[7]["result"]["content"][0]["text"] == "''"  # end of file at once
            assert answers[8]["result"] == {}
            assert p.finish() == 0

    def test_parse_error_then_keeps_serving(self):
        with Proc([SERVER_FILE, "--stdio"]) as p:
            p.send(b"this is not json\n")
            error = p.recv()
            assert error["error"]["code"] == -32700 and error["id"] is None
            p.send(b"\n")  # blank lines are ignored
            p.send(b"[]\n")
            assert p.recv()["error"]["code"] == -32600
            p.send(b'{"jsonrpc":"2.0","id":1,"method":5}\n')
            invalid = p.recv()
            assert invalid["id"] == 1 and invalid["error"]["code"] == -32600
            assert p.initialize()["result"]["protocolVersion"] == LEGACY
            assert p.request("ping")["result"] == {}
            assert p.finish() == 0

    def test_clean_exit_on_eof_and_stdout_is_only_json(self):
        with Proc([EVERYTHING_FILE, "--stdio"]) as p:
            p.initialize("2025-06-18")
            p.request("tools/list")
            p.request("prompts/list")
            p.request("resources/read", {"uri": "test://static-text"})
            assert p.finish() == 0
        lines = bytes(p.stdout).splitlines()
        assert len(lines) == 4
        assert all(json.loads(line)["jsonrpc"] == "2.0" for line in lines)

    def test_cancel_on_stdio(self, tmp_path):
        script = tmp_path / "hang_server.py"
        script.write_text(textwrap.dedent(f'''
            import asyncio, sys
            sys.path.insert(0, {ROOT!r})
            from mcp_server import MCPServer, Context
            server = MCPServer("hang")

            @server.tool()
            async def hang(ctx: Context) -> str:
                await ctx.log("info", "started")
                try:
                    await asyncio.Event().wait()
                finally:
                    print("cancelled=" + str(ctx.cancelled), file=sys.stderr, flush=True)
                return "never"

            server.run()
        '''))
        with Proc([str(script), "--stdio"]) as p:
            p.initialize()
            p.send({"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "hang"}})
            started = p.recv()
            assert started["method"] == "notifications/message" and started["params"]["data"] == "started"
            p.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 5}})
            while True:
                line = p.err_line()
                assert line is not None
                if line.startswith("cancelled="):
                    assert line.strip() == "cancelled=True"
                    break
            assert p.request("ping")["result"] == {}  # no response for 5 came before this one
            assert p.finish() == 0

    def test_batch_on_stdio_in_a_2025_03_26_session(self):
        with Proc([SERVER_FILE, "--stdio"]) as p:
            p.initialize("2025-03-26")
            p.send([{"jsonrpc": "2.0", "id": "x", "method": "ping"},
                    {"jsonrpc": "2.0", "id": "y", "method": "tools/list"}])
            answers = p.recv()
            assert isinstance(answers, list) and {a["id"] for a in answers} == {"x", "y"}
            assert p.finish() == 0

    @pytest.mark.parametrize("transport", ["stdio", "http"])
    def test_sys_exit_or_keyboard_interrupt_in_a_tool_fails_that_call_and_the_server_keeps_serving(
            self, tmp_path, transport):
        # issue 19: SystemExit and KeyboardInterrupt pass through asyncio's tasks and out of the
        # event loop, so one tool calling sys.exit() (its own, or a library's) ended the process
        script = tmp_path / "exiting_server.py"
        script.write_text(textwrap.dedent(f'''
            import asyncio, sys
            sys.path.insert(0, {ROOT!r})
            from mcp_server import MCPServer
            server = MCPServer("exits")

            @server.tool()
            def exit_in_thread() -> str:
                sys.exit(3)

            @server.tool(inline=True)
            def exit_inline() -> str:
                sys.exit(3)

            @server.tool()
            async def exit_async() -> str:
                await asyncio.sleep(0)
                sys.exit(3)

            @server.tool()
            def interrupt_in_thread() -> str:
                raise KeyboardInterrupt

            @server.tool()
            async def interrupt_async() -> str:
                raise KeyboardInterrupt

            @server.resource("test://exit")
            def exit_resource() -> str:
                sys.exit(4)

            async def exit_on_prompts(ctx, call_next):
                if ctx.method == "prompts/list":
                    raise SystemExit(5)
                return await call_next()
            server.add_middleware(exit_on_prompts)

            server.run()
        '''))
        tools = ("exit_in_thread", "exit_inline", "exit_async", "interrupt_in_thread", "interrupt_async")
        argv = [str(script), "--stdio"] if transport == "stdio" else [str(script), "--port", "0", "--no-auth"]
        with Proc(argv) as p:
            if transport == "stdio":
                p.initialize()
                ask = p.request
            else:
                session = Session(_login_port_of(p))
                session.initialize()

                def ask(method, params=None):
                    message = session.body(method, params)
                    return final_message(session.post(message), message["id"])
            for name in tools:
                result = ask("tools/call", {"name": name, "arguments": {}})["result"]
                assert result["isError"] is True and ERROR_ID.search(result["content"][0]["text"]), result
                assert ask("ping")["result"] == {}
            for method, params in (("resources/read", {"uri": "test://exit"}), ("prompts/list", {})):
                error = ask(method, params)["error"]
                assert error["code"] == -32603 and ERROR_ID.search(error["message"]), error
            assert ask("ping")["result"] == {}
            if transport == "stdio":
                assert p.finish() == 0
            else:
                p.proc.send_signal(signal.SIGTERM)
                assert p.proc.wait(WAIT) == 0
        for line in bytes(p.stdout).splitlines():
            json.loads(line)  # stdout carried nothing but JSON-RPC messages
        assert "raised SystemExit(3)" in p.stderr.decode() and "KeyboardInterrupt" in p.stderr.decode()

    def test_a_tool_whose_package_is_missing_answers_a_tool_error_naming_it_and_stdout_stays_clean(self, tmp_path):
        # issue 19, defect 5: without cryptography, asking a 2026-07-28 client for input (the
        # answers travel sealed) was a -32603 with an error id; now the call says what is missing
        script = tmp_path / "asking_server.py"
        script.write_text(textwrap.dedent(f'''
            import sys
            sys.path.insert(0, {ROOT!r})
            from mcp_server import MCPServer, Context
            server = MCPServer("asking")

            @server.tool()
            async def ask(ctx: Context) -> str:
                answer = await ctx.elicit("Name?", {{"type": "object", "properties": {{}}}})
                return answer["action"]

            server.run()
        '''))
        env = TestCLI.without_packages(tmp_path, "cryptography", "jwt", "redis")
        with Proc([str(script), "--stdio"], env=env) as p:  # (stdio needs none of the three to start)
            p.initialize()
            modern = {"_meta": {META_VERSION: MODERN, META_CAPS: {"elicitation": {}}}}
            result = p.request("tools/call", {"name": "ask", "arguments": {}, **modern})["result"]
            assert result["isError"] is True, result
            text = result["content"][0]["text"]
            assert "needs the Python package cryptography, which is not installed" in text, text
            assert text.endswith("pip install -r requirements.txt")
            assert p.request("ping")["result"] == {}
            assert p.finish() == 0
        for line in bytes(p.stdout).splitlines():
            json.loads(line)  # stdout carried nothing but JSON-RPC messages


# =================================================================================================
# 8. ASGI app
# =================================================================================================


async def asgi_request(app, method: str, path: str, *, root_path: str = "", headers=None, body: bytes = b"",
                       disconnect_after_first_chunk: bool = False, query: bytes = b""):
    """Drive an ASGI app by hand: (status, headers dict, body bytes)."""
    sent = []
    done = asyncio.Event()
    body_given = False

    async def receive():
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        if message["type"] == "http.response.body":
            if not message.get("more_body") or (disconnect_after_first_chunk and message.get("body")):
                done.set()

    pairs = [(b"host", b"localhost")] + [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query,
             "root_path": root_path, "headers": pairs, "client": ("127.0.0.1", 5555),
             "server": ("127.0.0.1", 8000)}
    await asyncio.wait_for(app(scope, receive, send), WAIT)
    start = next(m for m in sent if m["type"] == "http.response.start")
    data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, data


def init_body(version: str = LEGACY) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                       "params": {"protocolVersion": version, "capabilities": {}}}).encode()


class TestASGI:
    def test_mounted_under_a_root_path_without_lifespan(self):
        server = build_server()

        async def go():
            headers = {"content-type": "application/json", "accept": ACCEPT_BOTH}
            results = []
            for path in ("/prefix/mcp", "/prefix/mcp/"):
                status, h, body = await asgi_request(server.asgi, "POST", path, root_path="/prefix",
                                                     headers=headers, body=init_body())
                results.append((status, h, json.loads(body)))
            status, _h, index = await asgi_request(server.asgi, "GET", "/prefix/", root_path="/prefix")
            return results, json.loads(index)
        results, index = asyncio.run(go())
        for status, headers, body in results:
            assert status == 200 and VISIBLE_ASCII.fullmatch(headers["mcp-session-id"])
            assert body["result"]["protocolVersion"] == LEGACY
        assert index["mcp"] == "/prefix/mcp" and index["sse"] == "/prefix/sse"

    def test_session_works_across_calls(self):
        server = build_server()

        async def go():
            headers = {"content-type": "application/json", "accept": ACCEPT_BOTH}
            _s, h, _b = await asgi_request(server.asgi, "POST", "/mcp", headers=headers, body=init_body())
            headers["mcp-session-id"] = h["mcp-session-id"]
            call = json.dumps({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                               "params": {"name": "echo", "arguments": {"text": "asgi"}}}).encode()
            return await asgi_request(server.asgi, "POST", "/mcp", headers=headers, body=call)
        status, _h, body = asyncio.run(go())
        assert status == 200 and json.loads(body)["result"]["content"][0]["text"] == "asgi"

    def test_sse_endpoint_names_the_prefix_and_ends_on_disconnect(self):
        server = build_server()

        async def go():
            return await asgi_request(server.asgi, "GET", "/api/sse", root_path="/api",
                                      headers={"accept": "text/event-stream"}, disconnect_after_first_chunk=True)
        status, headers, body = asyncio.run(go())
        assert status == 200 and headers["content-type"] == "text/event-stream"
        event = parse_sse(body.decode())[0]
        assert event["event"] == "endpoint" and event["data"].startswith("/api/messages?session_id=")

    def test_lifespan_startup_and_shutdown(self):
        server = build_server()

        async def go():
            inbox = asyncio.Queue()
            out = []
            for message in ({"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}):
                inbox.put_nowait(message)

            async def send(message):
                out.append(message["type"])
            await asyncio.wait_for(server.asgi({"type": "lifespan", "asgi": {"version": "3.0"}}, inbox.get, send), WAIT)
            return out
        assert asyncio.run(go()) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]

    def test_origin_check_applies_under_asgi(self):
        server = build_server()
        status, _h, body = asyncio.run(asgi_request(server.asgi, "POST", "/http",
                                                    headers={"origin": "https://evil.example"},
                                                    body=b'{"method":"ping"}'))
        assert status == 403 and b"MCP_ALLOWED_ORIGINS" in body

    def test_modern_disconnect_cancels_under_a_foreign_asgi_server(self):
        # Without the bundled server's disconnect extension the app watches receive() itself.
        server = build_server()
        token = new_token()
        p = probe(token)
        message = modern_body("tools/call", {"name": "hang", "arguments": {"token": token}})
        headers = [(k.lower().encode(), v.encode()) for k, v in modern_headers(message).items()]
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/mcp", "raw_path": b"/mcp", "query_string": b"", "root_path": "",
                 "headers": [(b"host", b"localhost")] + headers, "client": ("127.0.0.1", 5555),
                 "server": ("127.0.0.1", 8000)}
        sent = []

        async def go():
            given = False

            async def receive():
                nonlocal given
                if not given:
                    given = True
                    return {"type": "http.request", "body": json.dumps(message).encode(), "more_body": False}
                await asyncio.to_thread(p.started.wait, WAIT)
                return {"type": "http.disconnect"}

            async def send(msg):
                sent.append(msg)
            await asyncio.wait_for(server.asgi(scope, receive, send), WAIT)
        asyncio.run(go())
        assert p.finished.is_set() and p.cancelled is True
        assert not any(m.get("body") for m in sent)  # nothing more is sent for a cancelled request

    def test_uvicorn_smoke(self):
        uvicorn = pytest.importorskip("uvicorn")
        server = build_server()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(server.asgi, log_level="warning", lifespan="on")
        userver = uvicorn.Server(config)
        thread = threading.Thread(target=userver.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + WAIT
            while not userver.started:
                assert time.monotonic() < deadline, "uvicorn did not start"
                time.sleep(0.01)  # polling a readiness flag, not a timed assertion
            s = Session(port)
            s.initialize()
            assert s.call("echo", {"text": "uv"})["content"][0]["text"] == "uv"
            r = modern_post(port, "tools/call", {"name": "progress", "arguments": {"steps": 2},
                                                 "_meta": {"progressToken": 1}})
            assert r.content_type == "text/event-stream" and r.messages()[-1]["result"]["resultType"] == "complete"
        finally:
            userver.should_exit = True
            thread.join(WAIT)


# ---- server.asgi on trio: hypercorn's trio worker, real sockets -----------------------------------


def _trio_build_server(**settings) -> MCPServer:
    """Tools that wait the way code meant for any backend does: through anyio."""
    import anyio
    server = MCPServer("trio-server", version="1.0.0", settings=Settings(auth="none", **settings))

    @server.tool()
    async def nap(token: str, ctx: Context) -> str:
        """Sleep until cancelled (or the tool timeout)."""
        p = probe(token)
        p.started.set()
        try:
            await anyio.sleep_forever()
        finally:
            p.cancelled = ctx.cancelled
            p.finished.set()
        return "unreachable"

    @server.tool()
    async def steps(count: int, ctx: Context) -> str:
        """Report progress ``count`` times."""
        for i in range(1, count + 1):
            await ctx.report_progress(i, count)
        return f"{count} steps"

    @server.tool()
    async def ask_name(ctx: Context) -> str:
        """Ask the client for a name (elicitation)."""
        answer = await ctx.elicit("Your name?", NAME_SCHEMA, key="who")
        return f"Hello, {answer['content']['name']}!"

    @server.tool()
    def thread_name() -> str:
        """A sync tool: it runs on a worker thread."""
        return threading.current_thread().name

    @server.tool()
    async def announce() -> str:
        """Tell every client the tool list changed."""
        await server.notify_tools_changed()
        return "announced"

    @server.tool(task="optional")
    async def later(text: str) -> str:
        """Runs as a task when asked."""
        await anyio.sleep(0)
        return f"later {text}"

    return server


@contextlib.contextmanager
def trio_server(server: MCPServer):
    """``server.asgi`` under hypercorn's trio worker, in a thread; yields the port."""
    trio = pytest.importorskip("trio")
    hypercorn_trio = pytest.importorskip("hypercorn.trio")
    from hypercorn.config import Config
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]  # (hypercorn closes it)
    config.loglevel = "WARNING"
    running: dict = {}
    failure: list = []

    async def main():
        running["token"], running["stop"] = trio.lowlevel.current_trio_token(), trio.Event()
        await hypercorn_trio.serve(server.asgi, config, shutdown_trigger=running["stop"].wait)

    def run():
        try:
            trio.run(main)
        except BaseException as exc:  # (reported by the test, not lost in the thread)
            failure.append(exc)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + WAIT
        while True:  # polling readiness, not a timed assertion
            assert not failure and time.monotonic() < deadline, f"hypercorn (trio) did not start: {failure}"
            try:
                if http(port, "GET", "/healthz").status == 200:
                    break
            except OSError:
                time.sleep(0.02)
        yield port
    finally:
        if "token" in running:
            running["token"].run_sync_soon(running["stop"].set)
        thread.join(WAIT)
    assert not thread.is_alive() and not failure, failure


class TestTrio:
    """``server.asgi`` on trio (hypercorn's trio worker) does what it does on asyncio: sessions,
    streams, server-to-client requests, cancellation, threads, deadlines and background tasks."""

    def test_a_legacy_session_streams_progress_and_asks_the_client(self):
        with trio_server(_trio_build_server()) as port:
            s = Session(port, capabilities={"elicitation": {}})
            s.initialize()
            call = s.body("tools/call", {"name": "steps", "arguments": {"count": 3},
                                         "_meta": {"progressToken": "p"}})
            messages = s.post(call, {"Accept": "text/event-stream"}).messages()
            assert [m["params"]["progress"] for m in messages if m.get("method") == "notifications/progress"] == [1, 2, 3]
            assert messages[-1]["result"]["content"][0]["text"] == "3 steps"
            ask_call = s.body("tools/call", {"name": "ask_name", "arguments": {}})
            with Conn(port) as conn:
                conn.request("POST", "/mcp", s.headers(), ask_call)
                stream = SSEStream(conn, conn.read_head())
                ask = stream.next_message()
                assert ask["method"] == "elicitation/create"
                assert s.post({"jsonrpc": "2.0", "id": ask["id"],
                               "result": {"action": "accept", "content": {"name": "Ada"}}}).status == 202
                assert stream.next_message()["result"]["content"][0]["text"] == "Hello, Ada!"

    def test_cancellation_by_notification_and_by_a_closed_2026_stream(self):
        with trio_server(_trio_build_server()) as port:
            s = Session(port)
            s.initialize()
            token = new_token("trio")
            call = s.body("tools/call", {"name": "nap", "arguments": {"token": token}})
            with Conn(port) as conn:
                conn.request("POST", "/mcp", s.headers(), call)
                assert probe(token).started.wait(WAIT)
                s.post({"jsonrpc": "2.0", "method": "notifications/cancelled",
                        "params": {"requestId": call["id"]}})
                assert probe(token).finished.wait(WAIT) and probe(token).cancelled is True
                resp = conn.read_response()
                assert resp.status == 200 and not any("result" in m for m in resp.messages())
            token = new_token("trio")
            body = modern_body("tools/call", {"name": "nap", "arguments": {"token": token}})
            with Conn(port) as conn:
                conn.request("POST", "/mcp", modern_headers(body), body)
                assert probe(token).started.wait(WAIT)
            assert probe(token).finished.wait(WAIT) and probe(token).cancelled is True
            assert Session(port).initialize().status == 200  # and the server goes on

    def test_sync_tools_run_on_worker_threads_and_slow_tools_meet_their_deadline(self):
        with trio_server(_trio_build_server(tool_timeout=0.2)) as port:
            s = Session(port)
            s.initialize()
            assert s.call("thread_name")["content"][0]["text"] != "MainThread"
            token = new_token("trio")
            result = s.call("nap", {"token": token})
            assert result["isError"] and "did not finish within 0.2 seconds" in result["content"][0]["text"]
            assert probe(token).cancelled is False
            assert not s.call("thread_name").get("isError")

    def test_list_changes_reach_a_get_stream_and_a_listen_stream(self):
        server = _trio_build_server()
        with trio_server(server) as port:
            s = Session(port)
            s.initialize()
            with Conn(port) as get_conn, Conn(port) as listen_conn:
                get_conn.request("GET", "/mcp", s.headers({"Accept": "text/event-stream"}))
                get_stream = SSEStream(get_conn, get_conn.read_head())
                listen = modern_body("subscriptions/listen", {"notifications": {"toolsListChanged": True}})
                listen_conn.request("POST", "/mcp", modern_headers(listen), listen)
                listen_stream = SSEStream(listen_conn, listen_conn.read_head())
                assert listen_stream.next_message()["method"] == "notifications/subscriptions/acknowledged"
                assert Session(port).initialize() and s.call("announce")["content"][0]["text"] == "announced"
                assert listen_stream.next_message()["method"] == "notifications/tools/list_changed"
                assert get_stream.next_message()["method"] == "notifications/tools/list_changed"

    def test_a_task_runs_in_the_lifespan_task_group(self):
        with trio_server(_trio_build_server()) as port:
            created = _task_create(port, "later", {"text": "x"})
            done = _task_poll(port, created["taskId"], lambda r: r["status"] == "completed", "completion")
            assert done["result"]["content"] == [{"type": "text", "text": "later x"}]

    def test_the_redis_store_refuses_trio_with_a_clear_message(self):
        trio = pytest.importorskip("trio")
        server = MCPServer("redis-on-trio", settings=Settings(auth="none", redis_url="redis://127.0.0.1:1/0",
                                                              secret="s" * 40))
        sent = []

        async def main():
            messages = [{"type": "lifespan.startup"}]

            async def receive():
                return messages.pop(0)

            async def send(message):
                sent.append(message)
            await server.asgi({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
        trio.run(main)
        assert sent[0]["type"] == "lifespan.startup.failed"
        assert "needs asyncio" in sent[0]["message"] and "trio without REDIS_URL" in sent[0]["message"]


# =================================================================================================
# 9. HTTP server
# =================================================================================================


def ping_http(i: int = 1) -> dict:
    return {"jsonrpc": "2.0", "id": i, "method": "ping"}


class _RecordingTransport:
    """Stands in for asyncio's socket transport under ``_HttpConnection``: records what is written."""

    def __init__(self):
        self.writes = []
        self.closed = False

    def get_extra_info(self, name):
        return ("127.0.0.1", 40000)

    def write(self, data):
        self.writes.append(bytes(data))

    def close(self):
        self.closed = True

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass


class TestHTTPServer:
    def test_timeouts_entered_before_a_request_waits_still_fire_and_the_connection_goes_on(self, make_server):
        server = build_server()

        @server.tool()
        async def bounded(seconds: float) -> str:
            try:
                async with asyncio.timeout(0.05):  # entered while the request still runs eagerly
                    await asyncio.sleep(seconds)
                return "finished"
            except TimeoutError:
                return "timed out"
        st = make_server(server)
        with Conn(st.port) as conn:
            for seconds, expected in ((0, "finished"), (30, "timed out"), (0, "finished")):
                conn.request("POST", "/http", body={"method": "tools/call", "params": {
                    "name": "bounded", "arguments": {"seconds": seconds}}})
                answer = conn.read_response()
                assert answer.status == 200 and answer.json()["content"][0]["text"] == expected, answer

    @EAGER_ONLY
    def test_an_answer_written_in_one_go_leaves_in_one_write(self):
        """An SSE answer (head, event, end) and a JSON answer are each one write to the socket, made
        in the callback that received the request (eagerly, before any trip through the loop) and,
        this client being alone, sent before that callback returns."""
        server = build_server(response_mode="sse")
        server._tools["echo"].inline = True  # answered without waiting (a pool hand-off would flush the head)

        async def scenario():
            state = mcp_server._ServerState(server.asgi, server.settings)
            transport = _RecordingTransport()
            protocol = mcp_server._HttpConnection(state)
            protocol.connection_made(transport)
            body = modern_body("tools/call", {"name": "echo", "arguments": {"text": "one write"}})
            loop = asyncio.get_running_loop()
            for accept in (ACCEPT_BOTH, "application/json"):
                transport.writes.clear()
                data = raw_request("POST", "/mcp", modern_headers(body, {"Accept": accept}), body)
                seen = []  # (writes made, an answer waiting) by the time the receiving callback returned
                loop.call_soon(lambda: (protocol.data_received(data),
                                        seen.append((len(transport.writes), bool(protocol.unsent)))))
                for _ in range(20):  # let anything scheduled run
                    await asyncio.sleep(0)
                assert seen == [(1, False)], seen  # answered eagerly, inside the callback that received it
                assert len(transport.writes) == 1, transport.writes
                assert b"one write" in transport.writes[0]
                assert (b"text/event-stream" in transport.writes[0]) == (accept == ACCEPT_BOTH)
            await server._live_runtime.close()
        asyncio.run(scenario())

    @EAGER_ONLY
    def test_answers_made_in_one_pass_of_the_loop_leave_together_and_in_order(self):
        """Answers to several connections wait for the end of the loop pass that made them, then
        leave one write each; a connection that closes sends what waits first."""
        server = build_server()
        server._tools["echo"].inline = True

        async def scenario():
            state = mcp_server._ServerState(server.asgi, server.settings)
            pairs = []
            for _ in range(3):
                transport, protocol = _RecordingTransport(), mcp_server._HttpConnection(state)
                protocol.connection_made(transport)
                pairs.append((transport, protocol))

            def request(text):
                return raw_request("POST", "/http", {"Host": "127.0.0.1"}, {
                    "method": "tools/call", "params": {"name": "echo", "arguments": {"text": text}}})
            during = []

            def one_pass():
                for i, (transport, protocol) in enumerate(pairs):
                    protocol.data_received(request(f"answer {i}"))
                during.append([len(t.writes) for t, _ in pairs])
            for _ in range(2):
                for transport, _protocol in pairs:
                    transport.writes.clear()
                asyncio.get_running_loop().call_soon(one_pass)
                for _ in range(5):
                    await asyncio.sleep(0)
                for i, (transport, protocol) in enumerate(pairs):
                    assert len(transport.writes) == 1 and f"answer {i}".encode() in transport.writes[0]
                    assert protocol.unsent is None and not transport.closed
                assert state.end_of_pass.writes == []
            # all three answered in each pass; the first pass's first answer went at once (the pass
            # before had no other sender), the second pass's all waited for its end
            assert during == [[1, 0, 0], [0, 0, 0]]
            # an answer, then (pipelined behind it) a head the server refuses: 200, then 400, then close
            transport, protocol = pairs[0]
            transport.writes.clear()
            protocol.data_received(request("before the refusal") + b"BROKEN\r\n\r\n")
            for _ in range(5):
                await asyncio.sleep(0)
            sent = b"".join(transport.writes)
            assert sent.startswith(b"HTTP/1.1 200 OK") and sent.index(b"before the refusal") < sent.index(
                b"HTTP/1.1 400 Bad Request") and transport.closed
            # a connection closed while its answer waits sends it before closing (the answer waits:
            # another connection sent in this pass)
            pairs[2][1].data_received(request("another sender"))
            transport, protocol = pairs[1]
            transport.writes.clear()
            protocol.data_received(request("sent before close"))
            assert transport.writes == [] and protocol.unsent
            protocol.close()
            assert len(transport.writes) == 1 and b"sent before close" in transport.writes[0] and transport.closed
            await asyncio.sleep(0)
            assert len(transport.writes) == 1  # not sent twice
            await server._live_runtime.close()
        asyncio.run(scenario())

    @EAGER_ONLY
    def test_a_lone_request_is_answered_then_logged_before_its_data_callback_returns(self, monkeypatch):
        """A lone client's answer, then its access line, leave as data_received returns, not after
        another pass; when another connection already sent in this pass, both wait for the end
        of the pass."""
        events = []

        class Stream:
            def write(self, text):
                events.append(("log", text))

            def flush(self):
                pass
        monkeypatch.setattr(sys, "stderr", Stream())
        logger = mcp_server.log
        saved = logger.handlers[:], logger.level, logger.propagate

        async def scenario(server):
            state = mcp_server._ServerState(server.asgi, server.settings)
            transport, protocol = _RecordingTransport(), mcp_server._HttpConnection(state)
            transport.write = lambda data: events.append(("answer", bytes(data)))
            protocol.connection_made(transport)

            def request(text):
                return raw_request("POST", "/http", {"Host": "127.0.0.1"}, {
                    "method": "tools/call", "params": {"name": "echo", "arguments": {"text": text}}})
            protocol.data_received(request("alone"))
            assert [kind for kind, _ in events] == ["answer", "log"]
            assert b'"text":"alone"' in events[0][1] and json.loads(events[1][1])["status"] == 200
            events.clear()
            asyncio.get_running_loop().call_soon(lambda: events.append(("other", None)))
            protocol.data_received(request("not alone"))
            assert events == []
            await asyncio.sleep(0)
            assert [kind for kind, _ in events] == ["answer", "log", "other"]  # (the end of the pass came first)
            assert b'"text":"not alone"' in events[0][1]
            await server._live_runtime.close()
        try:
            mcp_server._configure_logging("info", "json")
            server = build_server(access_log=True)
            server._tools["echo"].inline = True
            asyncio.run(scenario(server))
        finally:
            logger.handlers[:] = saved[0]
            logger.setLevel(saved[1])
            logger.propagate = saved[2]

    @EAGER_ONLY
    def test_a_request_that_had_to_wait_is_one_task_from_the_start_and_answered_at_the_end_of_the_pass(self):
        """A request runs as a real task from its first step (eagerly, inside data_received): the
        task the tool sees is the one that goes on after it waited, and its answer leaves at the
        end of the pass that finished it."""
        server = build_server()

        async def scenario():
            gate = asyncio.Event()
            tasks_seen = []

            @server.tool()
            async def gated(text: str) -> str:
                tasks_seen.append(asyncio.current_task())
                await gate.wait()
                tasks_seen.append(asyncio.current_task())
                return text
            state = mcp_server._ServerState(server.asgi, server.settings)
            transport, protocol = _RecordingTransport(), mcp_server._HttpConnection(state)
            written_in = []

            def write(data):
                written_in.append(asyncio.current_task())
                transport.writes.append(bytes(data))
            transport.write = write
            protocol.connection_made(transport)
            protocol.data_received(raw_request("POST", "/http", {"Host": "127.0.0.1"}, {
                "method": "tools/call", "params": {"name": "gated", "arguments": {"text": "after the gate"}}}))
            task = protocol.cycle.task
            assert isinstance(task, asyncio.Task) and transport.writes == [] and tasks_seen == [task]
            gate.set()
            await task
            await asyncio.sleep(0)  # (the end of that pass)
            assert tasks_seen == [task, task] and b'"text":"after the gate"' in transport.writes[0]
            assert written_in == [None]  # written by the pass's end, not inside the task's step
            await server._live_runtime.close()
        asyncio.run(scenario())

    def test_the_loop_polls_before_sleeping_only_while_its_waits_are_short(self):
        """``_BusyPollSelector``: polls first while the last wait was short; a wait its window would
        not have covered turns polling off, and the next short wait turns it on again.  (A 0.2 s
        window: long enough that an answer already there is always "short".)"""
        selector = mcp_server._BusyPollSelector(0.2)
        reader, writer = socket.socketpair()
        try:
            selector.register(reader, selectors.EVENT_READ)
            assert selector.polling
            writer.send(b"x")
            assert [key.fileobj for key, _ in selector.select(5)] == [reader]
            assert selector.polling  # found at once
            reader.recv(16)
            assert selector.select(0) == [] and selector.polling  # a look without waiting changes nothing
            assert selector.select(0.3) == []  # polled the window, then slept out the rest: nothing came
            assert not selector.polling
            assert selector.select(0.01) == [] and not selector.polling  # (a timer, not I/O)
            writer.send(b"y")
            assert [key.fileobj for key, _ in selector.select(5)] == [reader]
            assert selector.polling  # a short wait again
        finally:
            selector.close()
            reader.close()
            writer.close()

    def test_the_servers_loop_polls_only_when_asked_to(self):
        settings = Settings.load([], environ={})
        assert settings.busy_poll_us == 0
        assert mcp_server._http_loop_factory(settings) is None  # asyncio's default loop
        factory = mcp_server._http_loop_factory(Settings.load([], environ={"MCP_BUSY_POLL_US": "100"}))
        assert factory.args == (1e-4,)  # the window, in seconds
        loop = factory()
        try:
            assert isinstance(loop, asyncio.SelectorEventLoop)
            assert loop.run_until_complete(asyncio.sleep(0, "runs")) == "runs"
        finally:
            loop.close()

    def test_a_repeated_head_is_parsed_once_and_a_refused_one_is_not_remembered(self, make_server):
        st = make_server()
        body = {"method": "tools/call", "params": {"name": "echo", "arguments": {"text": "same head"}}}
        data = raw_request("POST", "/http", {"Host": f"127.0.0.1:{st.port}", "X-Head-Test": "repeat"}, body)
        head = data[:data.index(b"\r\n\r\n")]
        with Conn(st.port) as conn:
            for _ in range(3):  # the same bytes each time: the second and third come from the cache
                conn.sock.sendall(data)
                answer = conn.read_response()
                assert answer.status == 200 and answer.json()["content"][0]["text"] == "same head", answer
        fields = mcp_server._REQUEST_HEADS[head][2]
        assert fields["x-head-test"] == "repeat" and fields["content-length"] == str(len(json.dumps(body)))
        bad = (b"POST /http HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n"
               b"Transfer-Encoding: chunked\r\nX-Head-Test: refused\r\n\r\n")
        for _ in range(2):
            with Conn(st.port) as conn:
                conn.sock.sendall(bad)
                assert conn.read_response().status == 400
        assert not any(b"X-Head-Test: refused" in key for key in mcp_server._REQUEST_HEADS)

    def test_forwarded_headers_count_only_from_a_trusted_proxy_and_never_reach_another_request(
            self, make_server):
        proxied = make_server(trusted_proxies=("127.0.0.1",), allowed_hosts=("mcp.example.com",))
        direct = make_server(allowed_hosts=("mcp.example.com",))
        body = {"method": "tools/call", "params": {"name": "echo", "arguments": {"text": "via proxy"}}}
        # identical bytes to both servers: the Host is not allowed, the forwarded one is
        headers = {"Host": "evil.example", "X-Forwarded-Host": "mcp.example.com", "X-Forwarded-For": "203.0.113.9"}
        assert http(proxied.port, "POST", "/http", headers, body).status == 200  # believed from 127.0.0.1
        data = raw_request("POST", "/http", headers, body)
        head = data[:data.index(b"\r\n\r\n")]
        assert mcp_server._REQUEST_HEADS[head][2]["host"] == "evil.example"  # the shared parse is untouched
        assert http(direct.port, "POST", "/http", headers, body).status == 403  # not believed here
        assert http(direct.port, "POST", "/http", {"Host": "mcp.example.com"}, body).status == 200

    def test_memory_is_given_back_once_a_wave_of_connections_has_ended(self):
        ready = mcp_server._time_to_trim
        assert ready(1000, 1000, 0, 60.0, 0.01)
        assert not ready(999, 999, 0, 60.0, 0.01)  # not enough ended
        assert not ready(1500, 1400, 0, 60.0, 0.01)  # still ending: wait for the wave to pass
        assert not ready(2500, 2500, 2000, 60.0, 0.01)  # 500 since the last trim
        assert not ready(3000, 3000, 1000, 0.5, 0.01)  # the last trim was 1 s of every 100 s
        assert ready(3000, 3000, 1000, 1.0, 0.01)

        class Node:
            pass
        node = Node()
        node.loop = node  # garbage only the collector frees
        gone = weakref.ref(node)
        del node
        mcp_server._give_back_memory()  # a full collection, then malloc_trim where glibc has it
        assert gone() is None

    @pytest.mark.parametrize("transport", ["http", "stdio"])
    def test_a_start_from_source_settles_in_about_the_memory_of_a_start_from_cached_byte_code(self, tmp_path,
                                                                                             transport):
        # With no cached byte code (PYTHONDONTWRITEBYTECODE, a fresh checkout) the import compiles
        # the module, and the compiler's freed work space (~17 MB) would stay in RSS: serve() hands
        # it back before it listens over HTTP, and over stdio once the opening exchange is over.
        if mcp_server._malloc_trim() is None:
            pytest.skip("no glibc malloc_trim here")
        env = clean_env(MCP_ACCESS_LOG="0", PYTHONDONTWRITEBYTECODE="1")
        for name in ("PYTHONPYCACHEPREFIX", "PYTHONMALLOC"):
            env.pop(name, None)
        source, cached = tmp_path / "source", tmp_path / "cached"
        for folder in (source, cached):
            folder.mkdir()
            shutil.copy(SERVER_FILE, folder)
        subprocess.run([sys.executable, "-m", "compileall", "-q", "mcp_server.py"], cwd=cached, env=env,
                       check=True, timeout=WAIT)
        assert (cached / "__pycache__").exists()
        start = ["-c", "import mcp_server; mcp_server.main()"] + (
            ["--stdio"] if transport == "stdio" else ["--port", "0", "--no-auth"])

        def rss(proc: Proc) -> int:
            with open(f"/proc/{proc.proc.pid}/status") as f:
                return int(f.read().split("VmRSS:")[1].split()[0])  # KB
        with Proc(start, cwd=str(source), env=env) as from_source, Proc(start, cwd=str(cached), env=env) as from_cache:
            for proc in (from_source, from_cache):
                if transport == "stdio":
                    assert proc.initialize()["result"]["protocolVersion"] == LEGACY
                else:
                    line = proc.err_line()
                    assert line is not None and "listening on" in line, proc.stderr
            _redis_wait(lambda: rss(from_source) - rss(from_cache) < 8 * 1024,
                        "the start from source to settle within 8 MB of the cached one (~17 MB apart without "
                        "the give-back)")
        assert not (source / "__pycache__").exists()  # it really was compiled from source

    def test_disconnect_callbacks_and_2026_cancels_fire_before_the_response_ends_even_when_registered_late(self):
        class _SocketStandIn(asyncio.Transport):  # what the event loop would hand the protocol
            def get_extra_info(self, name, default=None):
                return ("127.0.0.1", 9) if name in ("peername", "sockname") else default

            def write(self, data):
                pass

            def close(self):
                pass

        async def go():
            state = mcp_server._ServerState(build_server().asgi, Settings(auth="none"))

            def exchange():
                protocol = mcp_server._HttpConnection(state)
                protocol.connection_made(_SocketStandIn())
                cycle = mcp_server._BundledExchange(protocol, True, False, True)
                cycle.more_body = False
                return cycle, mcp_server._HttpRequest({}, {}, cycle)
            fired = []
            cycle, early = exchange()  # registered, then the client goes: at once
            early.on_disconnect(lambda: fired.append("early"))
            cycle.lost()
            assert fired == ["early"] and early.ended
            cycle, late = exchange()  # the client went first: it still runs, on the next pass
            cycle.lost()
            gone = asyncio.Event()
            late.on_disconnect(gone.set)
            await asyncio.wait_for(gone.wait(), WAIT)
            cycle, answered = exchange()  # the response ended first: never
            answered.on_disconnect(lambda: fired.append("answered"))
            await answered.respond(204)
            cycle.lost()
            await asyncio.sleep(0)
            assert fired == ["early"]

            class Running:  # the cancel scope a 2026 request runs in
                cancelled = 0

                def cancel(self):
                    self.cancelled += 1
            for late in (False, True):  # a 2026 request ends with its stream, registered before or after
                cycle, modern = exchange()
                ctx = mcp_server.Context(state.app.server, "tools/call", {}, 1, modern=True)
                ctx._scope = Running()
                if late:
                    cycle.lost()
                modern.cancel_on_disconnect(ctx)
                if not late:
                    cycle.lost()
                await asyncio.sleep(0)
                assert ctx.cancelled and ctx._scope.cancelled == 1
            cycle, finished = exchange()  # the handler had finished (stop_watching): left alone
            ctx = mcp_server.Context(state.app.server, "tools/call", {}, 1, modern=True)
            ctx._scope = Running()
            finished.cancel_on_disconnect(ctx)
            finished.stop_watching()
            cycle.lost()
            await asyncio.sleep(0)
            assert not ctx.cancelled and ctx._scope.cancelled == 0
        asyncio.run(go())

    def test_keep_alive_two_requests_on_one_connection(self, live):
        with Conn(live.port) as conn:
            conn.request("POST", "/http", body=ping_http(1))
            first = conn.read_response()
            conn.request("POST", "/http", body={"method": "tools/call",
                                                "params": {"name": "echo", "arguments": {"text": "second"}}})
            second = conn.read_response()
        assert first.status == 200 and first.json()["id"] == 1 and first.header("connection") is None
        assert second.status == 200 and second.json()["content"][0]["text"] == "second"

    def test_pipelined_requests_are_answered_in_order(self, live):
        data = b"".join(raw_request("POST", "/http", body={"jsonrpc": "2.0", "id": i, "method": "tools/call",
                                                           "params": {"name": "echo", "arguments": {"text": "x" * (4000 - i * 900)}}})
                        for i in range(4))
        data += raw_request("GET", "/healthz")
        with Conn(live.port) as conn:
            conn.send(data)
            ids = [conn.read_response().json()["id"] for _ in range(4)]
            assert conn.read_response().json() == {"status": "ok"}
        assert ids == [0, 1, 2, 3]

    def test_a_head_response_has_no_body_so_pipelined_responses_stay_in_step(self, live):
        """HEAD gets GET's head, Content-Length included, and no body: a body would be read as
        the start of the next response (a desync a pipelining client or proxy would act on)."""
        data = raw_request("HEAD", "/healthz") + raw_request("HEAD", "/no-such-page") + raw_request("GET", "/healthz")
        with Conn(live.port) as conn:
            conn.send(data)
            first, second = conn.read_head(), conn.read_head()  # each must start right after the last
            third = conn.read_response()
            assert (first.status, second.status, third.status) == (200, 404, 200)
            assert third.json() == {"status": "ok"}
            assert first.header("content-length") == str(len(third.body))
            assert int(second.header("content-length")) > 0
            conn.request("GET", "/healthz")
            assert conn.read_response().json() == {"status": "ok"} and not conn.buf

    def test_both_exchanges_give_a_transport_the_same_body_response_and_disconnect(self):
        """``_HttpRequest`` runs over one exchange interface with two adapters: the bundled server's
        ``_BundledExchange`` and ``_AsgiExchange`` over plain ASGI.  The same steps over each: the body
        read whole and in chunks, a streamed response (head, then body, then its end), and the
        client going before the response ended (the callback runs once), or after it (never)."""
        server = build_server()

        async def over_asgi(chunks: list):
            sent, inbox = [], [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
                               for i, c in enumerate(chunks)]
            gone = asyncio.Event()

            async def receive():
                if inbox:
                    return inbox.pop(0)
                await gone.wait()
                return {"type": "http.disconnect"}

            async def send(message):
                sent.append(message)
            exchange = mcp_server._AsgiExchange({"type": "http"}, receive, send, server._runtime().spawn)

            def output():
                return b"".join(m.get("body", b"") for m in sent), [m.get("status") for m in sent]
            return exchange, output, gone.set

        async def over_the_bundled_server(chunks: list):
            state = mcp_server._ServerState(server.asgi, server.settings)
            transport, protocol = _RecordingTransport(), mcp_server._HttpConnection(state)
            protocol.connection_made(transport)
            cycle = mcp_server._BundledExchange(protocol, True, False, True)
            protocol.cycle = cycle
            cycle.body += chunks[0]
            cycle.more_body = len(chunks) > 1

            async def feed_the_rest():
                for i, chunk in enumerate(chunks[1:], 2):
                    await asyncio.sleep(0)
                    cycle.body += chunk
                    cycle.more_body = i < len(chunks)
                    cycle.body_event.set()
            asyncio.get_running_loop().create_task(feed_the_rest())

            def output():
                protocol.send_now()
                sent = b"".join(transport.writes)
                head, _, body = sent.partition(b"\r\n\r\n")
                chunked = b"transfer-encoding: chunked" in head
                text = re.sub(rb"(?:^|\r\n)[0-9a-f]+\r\n", b"", body) if chunked else body
                return text.replace(b"\r\n", b""), [int(head.split(b" ")[1])] if head else []
            return cycle, output, lambda: protocol.connection_lost(None)

        async def scenario(make):
            for chunks in ([b'{"a": 1}'], [b'{"a"', b': 1', b"}"]):
                exchange, output, client_goes = await make(chunks)
                http = mcp_server._HttpRequest({"type": "http"}, {}, exchange)
                assert await http.read_body(1000) == b'{"a": 1}'
                http.start(200, [(b"content-type", b"text/plain")])
                await http.write(b"first ")
                await http.end(b"last")
                body, statuses = output()
                assert body == b"first last" and 200 in statuses, (body, statuses)
                fired = []
                http.on_disconnect(lambda: fired.append("gone"))  # after the end: never called
                client_goes()
                await asyncio.sleep(0)
                assert fired == []
            exchange, output, client_goes = await make([b"{}"])
            http = mcp_server._HttpRequest({"type": "http"}, {}, exchange)
            http.start(200, [])
            await http.write(b"streaming")
            http.on_disconnect(lambda: fired.append("gone"))
            client_goes()
            for _ in range(5):
                await asyncio.sleep(0)
            assert fired == ["gone"] and http.ended
        for make in (over_asgi, over_the_bundled_server):
            asyncio.run(scenario(make))

    def test_chunked_request_body(self, live):
        body = json.dumps({"jsonrpc": "2.0", "id": "c", "method": "tools/call",
                           "params": {"name": "echo", "arguments": {"text": "chunked!"}}}).encode()
        parts = [body[:10], body[10:11], body[11:]]
        chunked = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\nX-Trailer: yes\r\n\r\n"
        with Conn(live.port) as conn:
            conn.request("POST", "/http", {"Transfer-Encoding": "chunked", "Content-Type": "application/json"}, chunked)
            r = conn.read_response()
            assert r.status == 200 and r.json()["result"]["content"][0]["text"] == "chunked!"
            conn.request("GET", "/healthz")  # the framing held: the connection is reusable
            assert conn.read_response().status == 200

    def test_malformed_chunked_body_is_400(self, live):
        with Conn(live.port) as conn:
            conn.request("POST", "/http", {"Transfer-Encoding": "chunked"}, b"zz\r\nabc\r\n0\r\n\r\n")
            r = conn.read_response()
            assert r.status == 400 and conn.at_eof()

    def test_expect_100_continue(self, live):
        body = json.dumps(ping_http(3)).encode()
        with Conn(live.port) as conn:
            conn.send(raw_request("POST", "/http", {"Expect": "100-continue", "Content-Type": "application/json",
                                                    "Content-Length": str(len(body))}))
            interim = conn.read_head()
            assert interim.status == 100
            conn.send(body)
            r = conn.read_response()
        assert r.status == 200 and r.json()["id"] == 3

    def test_declared_body_over_the_limit_is_413_before_the_body(self, live):
        with Conn(live.port) as conn:
            conn.send(raw_request("POST", "/mcp", {"Expect": "100-continue", "Content-Type": "application/json",
                                                   "Content-Length": str(10 ** 9)}))
            r = conn.read_response()  # no body was sent: the answer cannot wait for it
            assert r.status == 413 and "MCP_MAX_BODY" in r.json()["error"]["message"]
            assert conn.at_eof()

    def test_chunked_body_over_the_limit_is_413(self, make_server):
        st = make_server(max_body=1000)
        with Conn(st.port) as conn:
            conn.send(raw_request("POST", "/http", {"Transfer-Encoding": "chunked",
                                                    "Content-Type": "application/json"}))
            conn.send(b"%x\r\n%s\r\n" % (1500, b"x" * 1500))
            assert conn.read_response().status == 413

    def test_oversized_head_is_431(self, make_server):
        st = make_server(max_header=2048)
        headers = {f"X-Pad-{i}": "v" * 500 for i in range(6)}
        with Conn(st.port) as conn:
            conn.request("GET", "/healthz", headers)
            r = conn.read_response()
            assert r.status == 431 and conn.at_eof()
        assert http(st.port, "GET", "/healthz").status == 200

    def test_oversized_head_without_an_end_is_431(self, make_server):
        st = make_server(max_header=2048)
        with Conn(st.port) as conn:
            conn.send(b"GET /healthz HTTP/1.1\r\n" + b"X-Pad: " + b"v" * 3000)
            assert conn.read_response().status == 431

    def test_request_line_too_long_is_414(self, live):
        with Conn(live.port) as conn:
            conn.send(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert conn.read_response().status == 414

    def test_content_length_with_transfer_encoding_is_400_and_closes(self, live):
        with Conn(live.port) as conn:
            conn.send(b"POST /http HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
            r = conn.read_response()
            assert r.status == 400 and r.header("connection") == "close"
            assert conn.at_eof()

    @pytest.mark.parametrize("lines", [
        [b"Content-Length: 2", b"Content-Length: 2"],  # duplicate, even identical
        [b"Content-Length: 2, 2"],
        [b"Content-Length: 12abc"],
        [b"Content-Length: -1"],
        [b"Content-Length: +2"],
        [b"Content-Length: 0x2"],
        [b"Content-Length:"],
        [b"Transfer-Encoding: gzip"],
        [b"Transfer-Encoding: gzip, chunked"],
        [b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"],
        [b"X-Folded: first", b" continued"],  # obsolete line folding
        [b"X-Folded: first", b"\tcontinued"],
        [b"Bad Header: x"],
        [b"NoColon"],
        [b": empty-name"],
    ])
    def test_smuggling_shapes_are_400(self, live, lines):
        head = b"POST /http HTTP/1.1\r\nHost: localhost\r\n" + b"".join(l + b"\r\n" for l in lines) + b"\r\n"
        with Conn(live.port) as conn:
            conn.send(head + b"{}")
            r = conn.read_response()
            assert r.status == 400, r
            assert conn.at_eof()

    @pytest.mark.parametrize("request_line", [
        b"GET /healthz HTTP/2.0", b"GET  /healthz HTTP/1.1", b"GET /healthz", b"G(T /healthz HTTP/1.1",
        b"GET healthz HTTP/1.1", b"GET /\xff HTTP/1.1",
    ])
    def test_malformed_request_line_is_400(self, live, request_line):
        with Conn(live.port) as conn:
            conn.send(request_line + b"\r\nHost: localhost\r\n\r\n")
            assert conn.read_response().status == 400

    def test_http_1_0_closes_after_the_response(self, live):
        with Conn(live.port) as conn:
            conn.send(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")
            r = conn.read_response()
            assert r.status == 200 and r.json() == {"status": "ok"}
            assert conn.at_eof()

    def test_connection_close_is_honoured(self, live):
        with Conn(live.port) as conn:
            conn.request("GET", "/healthz", {"Connection": "close"})
            r = conn.read_response()
            assert r.header("connection") == "close" and conn.at_eof()

    def test_header_timeout_with_a_trickling_client_is_408(self, make_server):
        st = make_server(header_timeout=0.3, idle_timeout=30)
        with Conn(st.port) as conn:
            r = trickle_until_response(conn, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"s" * 5000)
            assert r.status == 408 and conn.at_eof()

    def test_header_timeout_applies_to_the_next_request_on_a_kept_alive_connection(self, make_server):
        st = make_server(header_timeout=0.3, idle_timeout=30)
        with Conn(st.port) as conn:
            conn.request("GET", "/healthz")
            assert conn.read_response().status == 200
            r = trickle_until_response(conn, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"s" * 5000,
                                       bound=5.0)
            assert r.status == 408

    def test_max_connections_is_503(self, make_server):
        st = make_server(max_connections=2)
        held = [Conn(st.port), Conn(st.port)]
        try:
            for conn in held:  # each is accepted and registered once it has been answered
                conn.request("GET", "/healthz")
                assert conn.read_response().status == 200
            with Conn(st.port) as third:
                third.request("GET", "/healthz")
                r = third.read_response()
                assert r.status == 503 and third.at_eof()
        finally:
            for conn in held:
                conn.close()

    def test_streamed_response_is_chunked(self, live):
        s = Session(live.port)
        s.initialize()
        with Conn(live.port) as conn:
            conn.request("POST", "/mcp", s.headers(), s.body("tools/call", {
                "name": "progress", "arguments": {"steps": 1}, "_meta": {"progressToken": 1}}))
            resp = conn.read_head()
            assert resp.header("transfer-encoding") == "chunked" and resp.header("content-length") is None
            resp.body = b"".join(conn.iter_body(resp))
            conn.request("GET", "/healthz")  # the chunked framing ended cleanly
            assert conn.read_response().status == 200

    def test_fuzzed_request_heads_never_crash_the_server(self, live, caplog):
        caplog.set_level(logging.ERROR, logger="mcp_server")
        rng = random.Random(0xC0FFEE)
        base = [b"POST /mcp HTTP/1.1", b"Host: localhost", b"Content-Type: application/json",
                b"Accept: application/json, text/event-stream", b"Content-Length: 2",
                b"Mcp-Session-Id: abc", b"Transfer-Encoding: chunked", b"Expect: 100-continue",
                b"Origin: http://localhost", b"MCP-Protocol-Version: 2026-07-28", b"Connection: keep-alive"]
        alphabet = b"\x00\r\n :\t\x7f\xff\xc3\xa9/?%#=,;" + bytes(range(0x20, 0x7f))
        statuses = set()
        for _ in range(250):
            lines = [base[0]] + rng.sample(base[1:], rng.randint(0, len(base) - 1))
            for _m in range(rng.randint(1, 4)):
                op = rng.randrange(6)
                i = rng.randrange(len(lines))
                line = bytearray(lines[i])
                if op == 0 and line:
                    line[rng.randrange(len(line))] = rng.choice(alphabet)
                elif op == 1:
                    pos = rng.randint(0, len(line))
                    line[pos:pos] = bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 6)))
                elif op == 2 and line:
                    a = rng.randrange(len(line))
                    del line[a:a + rng.randint(1, 8)]
                elif op == 3:
                    lines.insert(i, lines[i])
                elif op == 4:
                    lines.append(bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 40))))
                else:
                    line = bytearray(line.upper() if rng.random() < 0.5 else line.lower())
                if op not in (3, 4):
                    lines[i] = bytes(line)
            data = b"\r\n".join(lines) + b"\r\n\r\n" + rng.choice([b"{}", b"", b"0\r\n\r\n", b"[1]"])
            with Conn(live.port) as conn:
                conn.send(data)
                conn.sock.shutdown(socket.SHUT_WR)
                received = bytearray()
                try:
                    while True:
                        chunk = conn.sock.recv(65536)
                        if not chunk:
                            break
                        received += chunk
                except ConnectionResetError:
                    pass
            if received:
                match = re.match(rb"HTTP/1\.1 (\d{3}) ", bytes(received))
                assert match, (data, bytes(received[:200]))
                statuses.add(int(match.group(1)))
        assert 500 not in statuses, statuses
        assert statuses & {400}, statuses  # the fuzzer did reach the parser's refusals
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert not errors, [r.getMessage() for r in errors]


def trickle_until_response(conn: Conn, data: bytes, bound: float = WAIT) -> Response:
    """Send ``data`` a byte at a time while the server says nothing; return its answer."""
    deadline = time.monotonic() + bound
    sent = 0
    while time.monotonic() < deadline:
        readable, _, _ = select.select([conn.sock], [], [], 0.02)
        if readable:
            return conn.read_response()
        if sent < len(data):
            try:
                conn.sock.send(data[sent:sent + 1])
            except OSError:
                return conn.read_response()
            sent += 1
    pytest.fail(f"no response within the {bound} s bound ({sent} bytes trickled)")


# =================================================================================================
# 10. Built-in tools and CLI
# =================================================================================================


class TestCLI:
    def test_port_zero_prints_one_line_with_the_url_and_store(self):
        with Proc([SERVER_FILE, "--port", "0", "--no-auth"]) as p:
            line = p.err_line()
            match = re.fullmatch(r"mcp_server: listening on (http://127\.0\.0\.1:(\d+)/mcp) .*; store: memory\n", line)
            assert match, line
            port = int(match.group(2))
            r = http(port, "POST", "/http", body={"method": "tools/call", "params": {"name": "server_info"}})
            assert r.status == 200 and r.json()["structuredContent"]["store"] == "memory"
            p.proc.send_signal(signal.SIGTERM)
            assert p.proc.wait(WAIT) == 0
            for t in p._threads:
                t.join(WAIT)
        lines = p.stderr.decode().splitlines()
        # one startup line; everything else is a structured JSON log line (the access log)
        assert lines[0] == line.rstrip("\n")
        for extra in lines[1:]:
            entry = json.loads(extra)
            assert entry["event"] == "request" and entry["route"] == "/http" and entry["status"] == 200

    def test_stdio_says_its_http_listener_is_for_the_login_pages_not_a_second_mcp_endpoint(self):
        with Proc([SERVER_FILE, "--stdio", "--port", "0"]) as p:
            line = p.err_line()
            match = re.fullmatch(r"mcp_server: login pages listening on (http://127\.0\.0\.1:(\d+))/login/ "
                                 r"\(for the login tool's browser sign-in; MCP itself is on stdio\)\n", line or "")
            assert match, line
            assert p.initialize()["result"]["protocolVersion"] == LEGACY  # MCP: on stdio
            call = p.request("tools/call", {"name": "login", "arguments": {}})
            link = call["result"]["structuredContent"]["url"]
            assert link.startswith(match.group(1) + "/login/")  # the pages it names are the ones it serves
            assert http(int(match.group(2)), "GET", link[len(match.group(1)):]).status == 200

    def test_as_a_script_the_server_runs_as_started(self, tmp_path):
        """``python mcp_server.py`` serves HTTP in the process the operator started, with the
        command line they typed: no exec into another command (``ps`` and ``pkill -f`` see it)."""
        shutil.copy(SERVER_FILE, tmp_path)
        script = str(tmp_path / "mcp_server.py")
        env = clean_env(MCP_ACCESS_LOG="0", PYTHONDONTWRITEBYTECODE="1")

        def argv_of(proc: Proc) -> list:
            with open(f"/proc/{proc.proc.pid}/cmdline", "rb") as f:
                return [a.decode() for a in f.read().split(b"\0")[:-1]]
        http_argv = ["--port", "0", "--no-auth"]
        with Proc(["-X", "utf8", script, *http_argv], env=env) as as_script:
            line = as_script.err_line()
            assert line is not None and "listening on" in line, as_script.stderr
            port = int(re.search(r":(\d+)/mcp ", line).group(1))
            r = http(port, "POST", "/http", body={"method": "tools/call", "params": {"name": "server_info"}})
            assert r.status == 200 and r.json()["structuredContent"]["store"] == "memory"
            assert argv_of(as_script)[1:] == ["-X", "utf8", script, *http_argv]
        with Proc([script, "--stdio"], env=env) as over_stdio:
            assert over_stdio.initialize()["result"]["protocolVersion"] == LEGACY
            assert argv_of(over_stdio)[1:] == [script, "--stdio"]

    def test_environment_configures_the_cli(self):
        env = clean_env(MASK_MCP_PORT="0", MCP_PATH="/rpc", APP_VERSION="7.7.7", MCP_NO_AUTH="1")
        with Proc([SERVER_FILE], env=env) as p:
            line = p.err_line()
            port = int(re.search(r":(\d+)/rpc ", line).group(1))
            r = http(port, "POST", "/rpc", {"Accept": ACCEPT_BOTH},
                     {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": LEGACY}})
            assert r.json()["result"]["serverInfo"]["version"] == "7.7.7"
            p.proc.send_signal(signal.SIGTERM)
            assert p.proc.wait(WAIT) == 0

    def test_http_is_protected_by_default(self):
        with Proc([SERVER_FILE, "--port", "0"]) as p:
            port = int(re.search(r":(\d+)/mcp ", p.err_line()).group(1))
            r = http(port, "POST", "/mcp", {"Accept": ACCEPT_BOTH},
                     {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": LEGACY}})
            assert r.status == 401 and r.header("www-authenticate").startswith("Bearer ")
            assert r.header("mcp-session-id") is None
            p.proc.send_signal(signal.SIGTERM)
            assert p.proc.wait(WAIT) == 0

    @pytest.mark.parametrize("args, env, fragment", [
        (["--bogus"], {}, "--bogus"),
        (["--port", "http"], {}, "--port"),
        (["--port", "99999"], {}, "99999"),
        ([], {"MCP_PORT": "abc"}, "MCP_PORT"),
        ([], {"MCP_RESPONSE_MODE": "xml"}, "xml"),
    ])
    def test_bad_input_exits_2_with_one_line(self, args, env, fragment):
        result = run_cli(args, env=clean_env(**env))
        assert result.returncode == 2
        assert result.stdout == ""
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("mcp_server.py: error:") and fragment in lines[0]
        assert "Traceback" not in result.stderr

    def test_port_in_use_is_one_line(self):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            result = run_cli(["--port", str(sock.getsockname()[1])])
        assert result.returncode != 0
        assert "Traceback" not in result.stderr
        assert "cannot listen" in result.stderr.strip().splitlines()[-1]

    def test_help(self):
        result = run_cli(["--help"])
        assert result.returncode == 0
        for _attr, flag, names, *_rest in mcp_server._SETTING_SPECS:
            if flag:
                assert flag in result.stdout
            for name in names:
                assert name in result.stdout

    def test_everything_server_bad_flag(self):
        result = subprocess.run([sys.executable, EVERYTHING_FILE, "--nope"], capture_output=True, text=True,
                                timeout=WAIT * 3, env=clean_env(), cwd=NEUTRAL_CWD)
        assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
        assert "--nope" in result.stderr

    @staticmethod
    def without_packages(tmp_path, *packages: str, **extra) -> dict:
        """An environment whose Python cannot import ``packages``: a ``sitecustomize`` on
        PYTHONPATH puts a finder first on sys.meta_path that refuses them, as if not installed."""
        shim = tmp_path / "no-packages"
        shim.mkdir(exist_ok=True)
        (shim / "sitecustomize.py").write_text(textwrap.dedent('''
            import os, sys

            class _NotInstalled:
                blocked = set(os.environ["TEST_BLOCKED_PACKAGES"].split(","))

                def find_spec(self, name, path=None, target=None):
                    if name.partition(".")[0] in self.blocked:
                        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                    return None

            sys.meta_path.insert(0, _NotInstalled())
        '''))
        env = clean_env(TEST_BLOCKED_PACKAGES=",".join(packages), **extra)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim), env.get("PYTHONPATH")]))
        return env

    @pytest.mark.parametrize("blocked, args, env, package", [
        ("cryptography", ["--stdio"], {}, "cryptography"),  # the built-in server has the login tools
        ("jwt", ["--port", "0"], {}, "pyjwt"),  # OAuth (the default over HTTP)
        ("redis", ["--port", "0", "--no-auth"], {"REDIS_URL": "redis://127.0.0.1:1", "ENCRYPTION_KEY": "11" * 32,
                                                 "MCP_SECRET": "missing-package-test-secret-0123456789"}, "redis"),
        ("cryptography", ["encrypt", "--setting", "MCP_SECRET", "secret"], {"ENCRYPTION_KEY": "11" * 32},
         "cryptography"),
        ("cryptography", ["--port", "0"], {"MCP_AUTH": "external", "MCP_AUTH_ISSUER": "https://issuer.example",
                                           "MCP_AUTH_JWKS_URL": "https://issuer.example/jwks",
                                           "MCP_PUBLIC_URL": "https://mcp.example"}, "cryptography"),
        ("cryptography", ["--stdio"], {"ENCRYPTION_KEY": "11" * 32, "MCP_PUBLIC_URL": "enc:v1.x.y"}, "cryptography"),
    ])
    def test_a_missing_package_the_configuration_needs_refuses_the_start_naming_it(
            self, tmp_path, blocked, args, env, package):
        # issue 19, defect 5: a missing optional package surfaced later as a traceback, a 500 or a
        # login that stopped halfway; now the start is refused with the package and the command
        result = run_cli(args, env=self.without_packages(tmp_path, blocked, **env))
        assert result.returncode != 0 and result.stdout == "", result
        assert "Traceback" not in result.stderr, result.stderr
        line = result.stderr.strip().splitlines()[-1]
        assert f"needs the Python package {package}, which is not installed" in line, result.stderr
        assert line.endswith("pip install -r requirements.txt"), result.stderr

    def test_a_login_tool_without_cryptography_is_a_tool_error_not_a_link_to_a_500(self, tmp_path):
        # An application that mounts server.asgi itself runs no start-up check: the login tool
        # must refuse before it hands out a link whose /redirect could not store the credentials
        script = tmp_path / "login_app.py"
        script.write_text(textwrap.dedent(f'''
            import asyncio, sys
            sys.path.insert(0, {ROOT!r})
            import mcp_server
            server = mcp_server.MCPServer("login-app", settings=mcp_server.Settings(auth="none", port=0))
            server.add_login_tools()
            asyncio.run(mcp_server._serve_http(server.asgi, server.settings, server))
        '''))
        with Proc([str(script)], env=self.without_packages(tmp_path, "cryptography")) as p:
            session = Session(_login_port_of(p))
            session.initialize()
            result = session.call("login")
            assert result["isError"] is True, result
            assert "needs the Python package cryptography, which is not installed" in result["content"][0]["text"]
            assert "pip install -r requirements.txt" in result["content"][0]["text"]
            assert session.request("ping")["result"] == {}

    def test_a_request_whose_package_is_missing_is_503_naming_it_not_a_500(self, tmp_path):
        # Over stdio OAuth is not needed to start, but the login's loopback listener still serves
        # /mcp behind bearer tokens: without pyjwt a token there is refused naming the package
        env = self.without_packages(tmp_path, "jwt", MCP_PORT="0")
        with Proc([SERVER_FILE, "--stdio"], env=env) as p:
            port = _login_port_of(p)
            r = http(port, "POST", "/mcp", {"Authorization": "Bearer not-checked", "Accept": ACCEPT_BOTH},
                     {"jsonrpc": "2.0", "id": 1, "method": "ping"})
            assert r.status == 503, r
            assert "needs the Python package pyjwt, which is not installed" in r.json()["error"]["message"], r.body
            assert p.initialize()["result"]["protocolVersion"] == LEGACY  # stdio serves on
            assert p.finish() == 0


# ==== 2 and 6 across instances: the Redis store, scale-out, revisions, tasks ==================

# =================================================================================================
# Redis: throwaway servers, and waits on facts Redis can report
# =================================================================================================
#
# The Redis tests start their own ``redis-server`` processes (from PATH, no persistence) on free
# ports: one standalone server per module, a three-master Redis Cluster per module, and a private
# server for the tests that stop and restart Redis.  A server is ready when it logs "Ready to
# accept connections" (read from its stdout, not guessed with a sleep).
#
# Redis SUBSCRIBE completes asynchronously: an instance that has just opened a stream may not be
# subscribed to its channel yet.  Where a test must know that an instance listens before it makes
# another instance publish, it waits (bounded) until ``PUBSUB NUMSUB`` reports the subscriber:
# a fact the Redis server states, not a guess about timing.

_REDIS_SERVER = shutil.which("redis-server")
_REDIS_CLI = shutil.which("redis-cli")
try:
    import redis as _redis_py  # the client library RedisStore uses
except ImportError:  # pragma: no cover - requirements.txt lists it
    _redis_py = None


def _redis_skip_reason() -> str | None:
    if _REDIS_SERVER is None:
        return "redis-server is not on PATH (install Redis 6.2+ to run the Redis and scale-out tests)"
    if _redis_py is None:
        return "the redis Python package is not installed (pip install -r requirements.txt)"
    return None


def _redis_free_port(cluster: bool = False) -> int:
    """A free TCP port; for a cluster node, one whose bus port (+10000) is free too."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if not cluster:
            return port
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def _redis_wait(predicate, what: str, bound: float = WAIT):
    """Poll ``predicate`` until it returns something truthy; fail after ``bound`` (a hang detector)."""
    deadline = time.monotonic() + bound
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what} after {bound} s")
        time.sleep(0.01)


class _redis_Server:
    """One redis-server process (no RDB, no AOF) whose log is read to know when it is ready."""

    def __init__(self, workdir: str, port: int | None = None, cluster: bool = False, head: tuple = (),
                 extra: tuple = (), ready: bytes = b"Ready to accept connections"):
        self.workdir, self.cluster = workdir, cluster
        self.port = port or _redis_free_port(cluster)
        self.proc = None
        self.log = bytearray()
        # head: what goes before the options (a config file, --sentinel); extra: more options;
        # ready: the log line that says it serves (a sentinel's is "+monitor master")
        self.head, self.extra, self.ready = head, extra, ready

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "_redis_Server":
        argv = [_REDIS_SERVER, *self.head, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", self.workdir, "--logfile", "", "--daemonize", "no", *self.extra]
        if self.cluster:
            argv += ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{self.port}.conf",
                     "--cluster-node-timeout", "1000"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, cwd=self.workdir)
        lines: queue.Queue = queue.Queue()

        def pump(stream):
            for line in stream:
                self.log.extend(line)
                lines.put(line)
            lines.put(None)
        threading.Thread(target=pump, args=(self.proc.stdout,), daemon=True).start()
        deadline = time.monotonic() + WAIT
        while True:
            try:
                line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                pytest.fail(f"redis-server on {self.port} did not get ready: {bytes(self.log)[-1500:]!r}")
            if line is None:
                pytest.fail(f"redis-server on {self.port} exited: {bytes(self.log)[-1500:]!r}")
            if self.ready in line:
                return self

    def client(self):
        return _redis_py.Redis(host="127.0.0.1", port=self.port, socket_timeout=WAIT)

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(WAIT)


def _redis_numsub(url: str, channel: str) -> int:
    client = _redis_py.Redis.from_url(url, socket_timeout=WAIT)
    try:
        return int(dict(client.pubsub_numsub(channel)).get(channel.encode(), 0))
    finally:
        client.close()


def _redis_wait_subscribed(url: str, channel: str, count: int = 1) -> None:
    """Wait until ``count`` connections subscribe to ``channel`` (Redis's own word for it)."""
    _redis_wait(lambda: _redis_numsub(url, channel) >= count, f"{count} subscriber(s) of {channel}")


@pytest.fixture(scope="module")
def redis_workdir():
    path = tempfile.mkdtemp(prefix="mcp-redis-test-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def redis_server(redis_workdir):
    """A throwaway standalone redis-server for this module."""
    reason = _redis_skip_reason()
    if reason:
        pytest.skip(reason)
    server = _redis_Server(redis_workdir).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_url(redis_server) -> str:
    return redis_server.url


@pytest.fixture(scope="module")
def redis_cluster_url(redis_workdir) -> str:
    """A three-master Redis Cluster (no replicas); the URL names one node, the client finds the rest."""
    reason = _redis_skip_reason() or (None if _REDIS_CLI else "redis-cli is not on PATH (needed to create a cluster)")
    if reason:
        pytest.skip(reason)
    nodes = [_redis_Server(redis_workdir, cluster=True) for _ in range(3)]
    try:
        for node in nodes:
            node.start()
        created = subprocess.run([_REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
                                  "--cluster-replicas", "0", "--cluster-yes"],
                                 capture_output=True, text=True, timeout=WAIT * 3, stdin=subprocess.DEVNULL)
        assert created.returncode == 0, created.stdout + created.stderr

        def all_ok():
            for node in nodes:
                client = node.client()
                try:
                    info = client.execute_command("CLUSTER INFO")
                finally:
                    client.close()
                text = info.decode() if isinstance(info, bytes) else str(info)
                if "cluster_state:ok" not in text and not (isinstance(info, dict) and info.get("cluster_state") == "ok"):
                    return False
            return True
        _redis_wait(all_ok, "cluster_state:ok on every node")
        yield nodes[0].url
    finally:
        for node in nodes:
            node.stop()


# =================================================================================================
# 2. Store: one contract, three stores
# =================================================================================================


def _redis_key(name: str) -> str:
    """A key unique to one test; the hash tag keeps a test's keys in one cluster slot."""
    return f"t:{{{uuid.uuid4().hex[:12]}}}:{name}"


@pytest.fixture(params=["memory", "redis", "cluster"])
def redis_store_factory(request):
    """Makes the store under test inside the running event loop (a RedisStore binds to its loop)."""
    if request.param == "memory":
        return MemoryStore
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        return lambda: RedisStore(url, timeout=WAIT / 4)
    url = request.getfixturevalue("redis_cluster_url")
    return lambda: RedisStore(url, cluster=True, timeout=WAIT / 4)


def _redis_run(factory, body):
    """Run ``body(store)`` on a fresh event loop with a fresh store; close the store after."""
    async def main():
        store = factory()
        try:
            async with asyncio.timeout(WAIT * 2):
                return await body(store)
        finally:
            await store.close()
    return asyncio.run(main())


async def _redis_until(predicate, what: str, bound: float = WAIT):
    """Await ``predicate()`` until truthy (a real TTL running out); bounded."""
    deadline = time.monotonic() + bound
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {bound} s")
        await asyncio.sleep(0.01)


class _redis_Inbox:
    """A subscriber that files what it receives, with a way to know its subscription is live."""

    def __init__(self, store, channel: str):
        self.store, self.channel = store, channel
        self.queue: asyncio.Queue = asyncio.Queue()
        self.received: list = []
        self._probes = 0

    def __call__(self, message):
        self.received.append(message)
        self.queue.put_nowait(message)

    async def next(self):
        return await self.queue.get()

    async def ready(self, *others: "_redis_Inbox") -> None:
        """Publish numbered probes until one arrives (Redis subscribes asynchronously), then drain
        every probe sent, here and in ``others`` on the same channel: later messages arrive clean."""
        while True:
            self._probes += 1
            await self.store.publish(self.channel, {"probe": self._probes})
            try:
                first = await asyncio.wait_for(self.queue.get(), 0.05)
            except TimeoutError:
                continue
            assert isinstance(first, dict) and "probe" in first, first
            break
        last = {"probe": self._probes}
        while first != last:
            first = await self.queue.get()
        for other in others:
            while (await other.queue.get()) != last:
                pass


class TestRedisStore:
    """The Store contract, run against MemoryStore, RedisStore and RedisStore on a cluster."""

    def test_set_get_delete_and_ttl_expiry(self, redis_store_factory):
        async def body(store):
            k, forever, short = _redis_key("k"), _redis_key("forever"), _redis_key("short")
            assert await store.get(k) is None
            await store.set(k, {"v": [1, "two", None, True]}, ttl=60)
            assert await store.get(k) == {"v": [1, "two", None, True]}
            await store.set(k, {"v": 2}, ttl=60)  # overwrite
            assert await store.get(k) == {"v": 2}
            await store.set(forever, "no ttl")
            await store.set(short, "soon gone", ttl=0.05)
            await _redis_until(lambda: _redis_is_none(store.get(short)), "the short TTL to expire")
            assert await store.get(forever) == "no ttl"
            assert await store.delete(k) is True
            assert await store.delete(k) is False
            assert await store.get(k) is None
            await store.delete(forever)
        _redis_run(redis_store_factory, body)

    def test_get_touch_slides_the_expiry(self, redis_store_factory):
        async def body(store):
            touched, witness = _redis_key("touched"), _redis_key("witness")
            await store.set(touched, "session", ttl=0.3)
            await store.set(witness, "w", ttl=0.3)  # set after: it expires no earlier than the first TTL
            assert await store.get_refreshed(touched, 60) == "session"
            await _redis_until(lambda: _redis_is_none(store.get(witness)), "the witness to expire")
            assert await store.get(touched) == "session"  # the touch gave it a new TTL
            assert await store.get_refreshed(_redis_key("never-set"), 60) is None
            await store.delete(touched)
        _redis_run(redis_store_factory, body)

    def test_add_only_if_absent(self, redis_store_factory):
        async def body(store):
            k = _redis_key("lock")
            assert await store.add(k, {"owner": 1}, ttl=60) is True
            assert await store.add(k, {"owner": 2}, ttl=60) is False
            assert await store.get(k) == {"owner": 1}
            short = _redis_key("short-lock")
            assert await store.add(short, 1, ttl=0.05) is True
            await _redis_until(lambda: _redis_is_none(store.get(short)), "the lock to expire")
            assert await store.add(short, 2, ttl=60) is True  # absent again once expired
            assert await store.get(short) == 2
            for key in (k, short):
                await store.delete(key)
        _redis_run(redis_store_factory, body)

    def test_take_is_single_use(self, redis_store_factory):
        async def body(store):
            k = _redis_key("code")
            await store.set(k, {"code": "abc"}, ttl=60)
            assert await store.pop(k) == {"code": "abc"}
            assert await store.pop(k) is None
            assert await store.get(k) is None
            assert await store.pop(_redis_key("never-set")) is None
        _redis_run(redis_store_factory, body)

    def test_incr_counts_and_its_ttl_starts_with_the_first_increment(self, redis_store_factory):
        async def body(store):
            k = _redis_key("count")
            assert [await store.incr(k, 60) for _ in range(3)] == [1, 2, 3]
            short = _redis_key("window")
            assert await store.incr(short, 0.05) == 1
            await _redis_until(lambda: _redis_is_none(store.get(short)), "the counter window to expire")
            assert await store.incr(short, 60) == 1  # a new window counts from one
            for key in (k, short):
                await store.delete(key)
        _redis_run(redis_store_factory, body)

    def test_append_and_read_after_a_bounded_log_then_delete_log(self, redis_store_factory):
        async def body(store):
            k = _redis_key("events")  # on a cluster the log and its counter share the hash tag
            seqs = [await store.append(k, {"n": i}, maxlen=3, ttl=60) for i in range(1, 6)]
            assert seqs == [1, 2, 3, 4, 5]
            assert await store.read_after(k, 0) == [(3, {"n": 3}), (4, {"n": 4}), (5, {"n": 5})]
            assert await store.read_after(k, 4) == [(5, {"n": 5})]
            assert await store.read_after(k, 5) == []
            assert await store.read_after(_redis_key("no-log"), 0) == []
            await store.delete_log(k)
            assert await store.read_after(k, 0) == []
            assert await store.append(k, "again", maxlen=3, ttl=60) == 1  # the numbering went with it
            short = _redis_key("short-log")
            await store.append(short, "x", maxlen=3, ttl=0.05)
            await _redis_until(lambda: _redis_is_empty(store.read_after(short, 0)), "the log to expire")
            await store.delete_log(k)
        _redis_run(redis_store_factory, body)

    def test_publish_subscribe_and_unsubscribe(self, redis_store_factory):
        async def body(store):
            channel = _redis_key("chan")
            leaving, staying = _redis_Inbox(store, channel), _redis_Inbox(store, channel)
            unsubscribe_leaving = store.subscribe(channel, leaving)
            unsubscribe_staying = store.subscribe(channel, staying)
            await staying.ready(leaving)
            await store.publish(channel, {"n": 1, "nested": {"list": [1, 2]}})
            assert await leaving.next() == {"n": 1, "nested": {"list": [1, 2]}}
            assert await staying.next() == {"n": 1, "nested": {"list": [1, 2]}}
            await store.publish(_redis_key("other"), {"n": "elsewhere"})
            unsubscribe_leaving()
            unsubscribe_leaving()  # twice is harmless
            await store.publish(channel, {"n": 2})
            assert await staying.next() == {"n": 2}
            # both callbacks of a channel are fed by the same dispatch: the one that left got nothing
            assert {"n": 2} not in leaving.received and {"n": "elsewhere"} not in leaving.received
            unsubscribe_staying()  # the channel has no subscriber left
            again = _redis_Inbox(store, channel)
            unsubscribe_again = store.subscribe(channel, again)  # and can be subscribed anew
            await again.ready()
            await store.publish(channel, "third")
            assert await again.next() == "third"
            assert "third" not in staying.received
            unsubscribe_again()
        _redis_run(redis_store_factory, body)

    def test_store_unavailable_is_raised_within_a_bounded_time(self):
        if _redis_py is None:
            pytest.skip(_redis_skip_reason())
        port = _redis_free_port()  # nothing listens there

        async def body():
            store = RedisStore(f"redis://127.0.0.1:{port}/0", timeout=0.2)
            try:
                for operation in (lambda: store.get("k"), lambda: store.set("k", 1, ttl=5),
                                  lambda: store.append("l", 1, 3, 5), lambda: store.publish("c", 1)):
                    with pytest.raises(StoreUnavailable) as caught:
                        await asyncio.wait_for(operation(), WAIT)
                    assert caught.value.status == 503 and "session store" in caught.value.message
                assert await asyncio.wait_for(store.ping(), WAIT) is False
            finally:
                await store.close()
        asyncio.run(body())

    def test_ping(self, redis_store_factory):
        assert _redis_run(redis_store_factory, lambda store: store.ping()) is True


async def _redis_is_none(awaitable) -> bool:
    return (await awaitable) is None


async def _redis_is_empty(awaitable) -> bool:
    return (await awaitable) == []


# =================================================================================================
# Scale-out: several server processes on one Redis (any instance serves any request)
# =================================================================================================

_REDIS_SECRET = "scale-out-test-secret-0123456789abcdef"  # shared MCP_SECRET: sealed state opens anywhere
_REDIS_LISTENING = re.compile(r"mcp_server: listening on http://127\.0\.0\.1:(\d+)/mcp ")


class _redis_Instance:
    """``examples/everything_server.py`` as a process on a free port, its state in Redis."""

    def __init__(self, redis_url: str, **env):
        settings = {"REDIS_URL": redis_url, "MCP_SECRET": _REDIS_SECRET, "MCP_SSE_KEEPALIVE": "0.5", **env}
        self.proc = Proc([EVERYTHING_FILE, "--port", "0", "--host", "127.0.0.1"], env=clean_env(**settings))
        self.port = None
        self.lines: list = []

    def wait_listening(self) -> "_redis_Instance":
        while self.port is None:
            line = self.proc.err_line()
            if line is None:
                pytest.fail(f"the server exited before listening: {''.join(self.lines)}")
            self.lines.append(line)
            match = _REDIS_LISTENING.search(line)
            if match:
                assert "store: redis" in line, line
                self.port = int(match.group(1))
        return self

    def kill(self) -> None:
        self.proc.proc.kill()
        self.proc.proc.wait(WAIT)

    def stop(self) -> None:
        if self.proc.proc.poll() is None:
            self.proc.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.proc.wait(WAIT + 12)
            except subprocess.TimeoutExpired:
                self.proc.proc.kill()
                self.proc.proc.wait(WAIT)


def _redis_instances(redis_url: str, count: int, **env) -> list:
    started = [_redis_Instance(redis_url, **env) for _ in range(count)]  # they start in parallel
    try:
        return [instance.wait_listening() for instance in started]
    except BaseException:
        for instance in started:
            instance.stop()
        raise


@pytest.fixture(scope="module")
def redis_trio(redis_url):
    """Three instances of the everything server sharing the module's Redis: A, B and C."""
    trio = _redis_instances(redis_url, 3)
    # every instance subscribes to the server-wide channel at startup; wait until Redis says so
    _redis_wait_subscribed(redis_url, "mcp:bus", 3)
    yield [instance.port for instance in trio]
    for instance in trio:
        instance.stop()


def _redis_on(session: Session, port: int) -> Session:
    """The next requests of ``session`` go to another instance (a round-robin load balancer)."""
    session.port = port
    return session


def _redis_text(result: dict) -> str:
    return result["content"][0]["text"]


def _redis_modern_call(port: int, name: str, arguments: dict | None = None, **kw) -> Response:
    return modern_post(port, "tools/call", {"name": name, "arguments": arguments or {}}, **kw)


_TASK_EXTENSION = "io.modelcontextprotocol/tasks"
_TASK_CAPS = {"extensions": {_TASK_EXTENSION: {}}}


def _task_post(port: int, method: str, task_id: str, params: dict | None = None, caps=_TASK_CAPS) -> Response:
    """tasks/get, tasks/update or tasks/cancel (Mcp-Name carries the task id)."""
    return modern_post(port, method, {"taskId": task_id, **(params or {})}, caps=caps,
                       headers={"Mcp-Name": task_id})


def _task_result(resp: Response) -> dict:
    assert resp.status == 200, resp
    body = resp.json()
    assert "result" in body, body
    return body["result"]


def _task_poll(port: int, task_id: str, until, what: str) -> dict:
    """tasks/get until ``until(record)`` (the protocol's own way to follow a task); bounded, and
    a task that ended otherwise fails at once."""
    deadline = time.monotonic() + WAIT
    while True:
        record = _task_result(_task_post(port, "tasks/get", task_id))
        if until(record):
            return record
        if record["status"] in ("completed", "failed", "cancelled"):
            pytest.fail(f"the task ended before {what}: {record}")
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what} after {WAIT} s: {record}")
        time.sleep(0.01)


class TestScaleOut:
    """Round-robin any request of a client to any instance: sessions, streams, answers to server
    requests, sealed MRTR state and tasks all live in Redis or travel on its channels."""

    def test_a_session_started_on_one_instance_is_served_by_the_others(self, redis_trio, redis_url):
        a, b, c = redis_trio
        s = Session(a)
        s.initialize()
        assert s.sid
        _redis_on(s, b)
        names = [t["name"] for t in s.request("tools/list")["result"]["tools"]]
        assert "test_simple_text" in names and "slow_compute" in names
        assert _redis_text(s.call("greet", {"name": "Ada"})) == "Hello, Ada!"
        _redis_on(s, c)
        assert s.request("logging/setLevel", {"level": "debug"})["result"] == {}
        assert s.request("ping")["result"] == {}
        # a GET stream held on A ends when the session is deleted on C
        with Conn(a) as conn:
            conn.request("GET", "/mcp", s.headers({"Accept": "text/event-stream", "Content-Type": None}))
            stream = SSEStream(conn, conn.read_head())
            assert not stream.next_event().get("data")  # the priming event
            _redis_wait_subscribed(redis_url, mcp_server._session_channel(s.sid))
            assert s.delete().status == 200  # on C
            assert stream.next_message() is None  # the stream on A ended
        # the instances that served the session drop their copies when C's message arrives
        for port in (a, b, c):
            _redis_wait(lambda: _redis_on(s, port).post(s.body("tools/list")).status == 404,
                        f"the deleted session to be gone on port {port}")
        assert s.delete().status == 404

    def test_a_known_session_costs_no_redis_round_trip(self, redis_url):
        """Requests in a session an instance holds a copy of read nothing from Redis; with
        MCP_SESSION_CACHE=0 every request reads it (and slides the expiry)."""
        client = _redis_py.Redis.from_url(redis_url)

        def getex_calls() -> int:
            return int(client.info("commandstats").get("cmdstat_getex", {}).get("calls", 0))
        for cache, expected in (("5", (0, 1)), ("0", (20,))):  # (a copy older than 5 s is read again)
            instance = _redis_instances(redis_url, 1, MCP_SESSION_CACHE=cache)[0]
            try:
                _redis_wait_subscribed(redis_url, "mcp:sessions", 1) if cache != "0" else None
                s = Session(instance.port)
                s.initialize()
                before = getex_calls()
                for i in range(20):
                    assert _redis_text(s.call("greet", {"name": f"n{i}"})) == f"Hello, n{i}!"
                assert getex_calls() - before in expected, cache
            finally:
                instance.stop()

    def test_a_session_changed_on_one_instance_is_read_again_by_the_others(self, redis_trio, redis_url):
        a, b, _c = redis_trio
        _redis_wait_subscribed(redis_url, "mcp:sessions", 3)
        s = Session(a)
        s.initialize()
        assert _redis_text(_redis_on(s, b).call("greet", {"name": "Ada"})) == "Hello, Ada!"  # B copies it
        assert _redis_on(s, a).request("logging/setLevel", {"level": "error"})["result"] == {}
        client = _redis_py.Redis.from_url(redis_url)
        # B dropped its copy: its next request reads the changed session from Redis
        before = int(client.info("commandstats").get("cmdstat_getex", {}).get("calls", 0))
        _redis_wait(lambda: _redis_on(s, b).request("ping")["result"] == {} and int(
            client.info("commandstats").get("cmdstat_getex", {}).get("calls", 0)) > before,
            "B to read the changed session again")

    def test_list_changed_from_a_call_on_one_instance_reaches_a_stream_on_another(self, redis_trio, redis_url):
        a, b, c = redis_trio
        s = Session(a)
        s.initialize()
        with Conn(c) as conn:
            conn.request("GET", "/mcp", s.headers({"Accept": "text/event-stream", "Content-Type": None}))
            resp = conn.read_head()
            assert resp.status == 200
            stream = SSEStream(conn, resp)
            assert not stream.next_event().get("data")  # priming: the stream is open on C
            r = _redis_modern_call(a, "test_trigger_tool_change")  # a 2026 call on A announces the change
            assert r.status == 200 and _redis_text(r.json()["result"]) == "Tool list change announced"
            assert stream.next_message() == {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}
            _redis_on(s, b).call("test_trigger_prompt_change")  # and a legacy call on B
            assert stream.next_message() == {"jsonrpc": "2.0", "method": "notifications/prompts/list_changed"}

    def test_subscriptions_listen_on_one_instance_hears_a_change_made_on_another(self, redis_trio):
        a, b, _c = redis_trio
        body = modern_body("subscriptions/listen", {"notifications": {"toolsListChanged": True}}, request_id="L1")
        with Conn(b) as conn:
            conn.request("POST", "/mcp", modern_headers(body), body)
            stream = SSEStream(conn, conn.read_head())
            ack = stream.next_message()
            assert ack["method"] == "notifications/subscriptions/acknowledged"
            assert ack["params"]["notifications"] == {"toolsListChanged": True}
            assert _redis_modern_call(a, "test_trigger_tool_change").status == 200
            note = stream.next_message()
            assert note["method"] == "notifications/tools/list_changed"
            assert note["params"]["_meta"] == {"io.modelcontextprotocol/subscriptionId": "L1"}

    def test_legacy_elicitation_answered_through_another_instance(self, redis_trio, redis_url):
        a, b, _c = redis_trio
        s = Session(a, capabilities={"elicitation": {}})
        s.initialize()
        call = s.body("tools/call", {"name": "test_elicitation", "arguments": {"message": "Your name?"}})
        with Conn(a) as conn:
            conn.request("POST", "/mcp", s.headers(), call)
            resp = conn.read_head()
            assert resp.status == 200
            stream = SSEStream(conn, resp)
            ask = stream.next_message()
            assert ask["method"] == "elicitation/create" and ask["params"]["message"] == "Your name?"
            # A waits for the answer on the session's reply channel; the answer goes to B
            _redis_wait_subscribed(redis_url, mcp_server._reply_channel(s.sid))
            answer = _redis_on(s, b).post({"jsonrpc": "2.0", "id": ask["id"],
                                           "result": {"action": "accept", "content": {"response": "Ada"}}})
            assert answer.status == 202 and answer.body == b""
            final = stream.next_message()
            assert final["id"] == call["id"], final
            assert _redis_text(final["result"]) == 'User response: action=accept, content={"response":"Ada"}'

    def test_a_2026_input_round_started_on_one_instance_completes_on_others(self, redis_trio):
        a, b, c = redis_trio
        caps = {"elicitation": {}}
        name = "test_input_required_result_multi_round"
        first = _redis_modern_call(a, name, caps=caps).json()["result"]
        assert first["resultType"] == "input_required" and set(first["inputRequests"]) == {"step1"}
        body = modern_body("tools/call", {"name": name, "arguments": {}, "requestState": first["requestState"],
                                          "inputResponses": {"step1": {"action": "accept",
                                                                       "content": {"name": "Ada"}}}}, caps=caps)
        second = http(b, "POST", "/mcp", modern_headers(body), body).json()["result"]
        assert second["resultType"] == "input_required" and set(second["inputRequests"]) == {"step2"}
        body = modern_body("tools/call", {"name": name, "arguments": {}, "requestState": second["requestState"],
                                          "inputResponses": {"step2": {"action": "accept",
                                                                       "content": {"color": "teal"}}}}, caps=caps)
        done = http(c, "POST", "/mcp", modern_headers(body), body).json()["result"]
        assert done["resultType"] == "complete"
        assert _redis_text(done) == "Multi-round complete for Ada who likes teal"

    def test_a_task_created_on_one_instance_is_polled_and_cancelled_on_others(self, redis_trio, redis_url):
        a, b, c = redis_trio
        created = _task_result(_redis_modern_call(a, "slow_compute", {"seconds": 60, "label": "x"}, caps=_TASK_CAPS))
        assert created["resultType"] == "task" and created["status"] == "working"
        task_id = created["taskId"]
        seen = _task_result(_task_post(b, "tasks/get", task_id))
        assert seen["taskId"] == task_id and seen["status"] == "working"
        _redis_wait_subscribed(redis_url, mcp_server._task_channel(task_id))  # A listens for control messages
        assert _task_result(_task_post(c, "tasks/cancel", task_id))["resultType"] == "complete"
        for port in (a, b, c):
            record = _task_result(_task_post(port, "tasks/get", task_id))
            assert record["status"] == "cancelled", record
        # a finished task is polled anywhere too
        quick = _task_result(_redis_modern_call(b, "slow_compute", {"seconds": 0, "label": "q"}, caps=_TASK_CAPS))
        done = _task_poll(c, quick["taskId"], lambda r: r["status"] == "completed", "the quick task to complete")
        assert done["result"]["resultType"] == "complete"
        assert _redis_text(done["result"]) == "Computed q after 0.0 seconds"

    def test_a_stream_closed_by_the_server_is_resumed_on_another_instance(self, redis_trio):
        a, b, _c = redis_trio
        s = Session(a)
        s.initialize()
        call = s.body("tools/call", {"name": "test_reconnection", "arguments": {}})
        r = s.post(call)
        assert r.status == 200 and r.content_type == "text/event-stream"
        events = r.events()
        assert events and all(not e.get("data") for e in events)  # closed before the result
        g = http(b, "GET", "/mcp", s.headers({"Accept": "text/event-stream", "Content-Type": None,
                                              "Last-Event-ID": events[-1]["id"]}))
        assert g.status == 200, g
        final = final_message(g, call["id"])
        assert _redis_text(final["result"]) == "Reconnection test completed successfully"

    def test_kill_9_of_an_instance_mid_stream_the_client_resumes_elsewhere(self, redis_trio, redis_url):
        _a, b, c = redis_trio
        doomed = _redis_instances(redis_url, 1)[0]
        try:
            s = Session(doomed.port, capabilities={"elicitation": {}})
            s.initialize()
            call = s.body("tools/call", {"name": "test_elicitation", "arguments": {"message": "Still there?"}})
            replies = mcp_server._reply_channel(s.sid)
            with Conn(doomed.port) as post_conn, Conn(doomed.port) as get_conn:
                post_conn.request("POST", "/mcp", s.headers(), call)
                post_stream = SSEStream(post_conn, post_conn.read_head())
                priming = post_stream.next_event()
                assert not priming.get("data") and priming["id"].endswith(":0")
                asked = post_stream.next_event()
                ask = json.loads(asked["data"])
                assert ask["method"] == "elicitation/create"
                get_conn.request("GET", "/mcp", s.headers({"Accept": "text/event-stream", "Content-Type": None}))
                get_stream = SSEStream(get_conn, get_conn.read_head())
                assert not get_stream.next_event().get("data")
                doomed.kill()  # kill -9: no goodbye on either stream
                for stream in (post_stream, get_stream):
                    with pytest.raises((EOFError, ConnectionError)):
                        while stream.next_event() is not None:
                            pass
            _redis_wait(lambda: _redis_numsub(redis_url, replies) == 0, "Redis to drop the dead instance's subscription")
            # the client resumes the dropped POST stream on B: it gets what it missed, from the log
            resumed = http(b, "GET", "/mcp", _redis_on(s, b).headers({"Accept": "text/event-stream", "Content-Type": None,
                                                                      "Last-Event-ID": priming["id"]}))
            assert resumed.status == 200, resumed
            assert [(e["id"], json.loads(e["data"])) for e in resumed.events() if e.get("data")] == [(asked["id"], ask)]
            # nobody will answer on that stream any more (its instance is gone): the client retries on B
            with Conn(b) as conn:
                conn.request("POST", "/mcp", s.headers(), call)
                stream = SSEStream(conn, conn.read_head())
                again = stream.next_message()
                assert again["method"] == "elicitation/create" and again["params"]["message"] == "Still there?"
                _redis_wait_subscribed(redis_url, replies)
                assert _redis_on(s, c).post({"jsonrpc": "2.0", "id": again["id"], "result": {
                    "action": "accept", "content": {"response": "yes"}}}).status == 202
                final = stream.next_message()
                assert final["id"] == call["id"]
                assert _redis_text(final["result"]) == 'User response: action=accept, content={"response":"yes"}'
            # and its session stream reopens on B, where notifications from anywhere reach it
            with Conn(b) as conn:
                conn.request("GET", "/mcp", _redis_on(s, b).headers({"Accept": "text/event-stream", "Content-Type": None}))
                stream = SSEStream(conn, conn.read_head())
                assert not stream.next_event().get("data")
                assert _redis_modern_call(c, "test_trigger_tool_change").status == 200
                assert stream.next_message() == {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}
        finally:
            doomed.stop()

    def test_workers_2_with_redis_serve_one_port_from_two_processes(self, redis_url):
        port = _redis_free_port()
        env = clean_env(REDIS_URL=redis_url, MCP_SECRET=_REDIS_SECRET)
        argv = ["-X", "utf8", EVERYTHING_FILE, "--port", str(port), "--workers", "2"]
        with Proc(argv, env=env) as supervisor:
            try:
                lines = []
                while not any("listening on" in line for line in lines):
                    line = supervisor.err_line()
                    assert line is not None, "".join(lines)
                    lines.append(line)
                assert any("supervising 2 workers" in line for line in lines), lines
                workers = _redis_wait(lambda: _redis_listening_workers(supervisor.proc.pid, port, 2),
                                      "both workers to listen on the port")
                assert len(workers) == 2 and len(set(workers.values())) == 2  # two processes, one port each
                for pid in workers.values():  # each runs the supervisor's own command, interpreter options too
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        assert f.read().split(b"\0")[1:-1] == [a.encode() for a in argv]
                for _ in range(10):
                    ready = http(port, "GET", "/readyz")
                    assert ready.status == 200 and ready.json() == {"status": "ready", "store": "redis"}
                s = Session(port)
                s.initialize()
                for i in range(12):  # each request on a new connection: the kernel spreads them over both
                    assert _redis_text(s.call("greet", {"name": f"n{i}"})) == f"Hello, n{i}!"
            finally:
                supervisor.proc.send_signal(signal.SIGTERM)
                assert supervisor.proc.wait(WAIT + 20) == 0
        assert "Traceback" not in supervisor.stderr.decode()

    @pytest.mark.parametrize("script", [EVERYTHING_FILE, SERVER_FILE], ids=["everything_server", "mcp_server"])
    def test_workers_without_redis_are_refused_with_one_line(self, script):
        result = subprocess.run([sys.executable, script, "--port", str(_redis_free_port()), "--workers", "2"],
                                capture_output=True, text=True, timeout=WAIT * 3, env=clean_env(MCP_NO_AUTH="1"),
                                cwd=NEUTRAL_CWD, stdin=subprocess.DEVNULL)
        assert result.returncode == 2, result
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert "--workers" in lines[0] and "Redis" in lines[0] and "REDIS_URL" in lines[0]
        assert result.stdout == ""

    def test_redis_down_means_503_and_redis_back_means_service_without_a_restart(self, redis_workdir):
        if _redis_skip_reason():
            pytest.skip(_redis_skip_reason())
        store = _redis_Server(redis_workdir).start()
        instance = None
        try:
            instance = _redis_instances(store.url, 1, MCP_STORE_TIMEOUT="0.5")[0]
            port = instance.port
            assert http(port, "GET", "/readyz").json() == {"status": "ready", "store": "redis"}
            s = Session(port)
            s.initialize()
            store.stop()
            ready = http(port, "GET", "/readyz")
            assert ready.status == 503 and ready.json()["status"] == "unavailable", ready
            r = s.post(s.body("tools/list"))
            assert r.status == 503, r
            assert r.header("retry-after") is not None
            error = r.json()["error"]
            assert error["code"] == -32603 and "session store" in error["message"], error
            r = Session(port).post(Session(port).body("initialize", {"protocolVersion": LEGACY}))
            assert r.status == 503 and "session store" in r.json()["error"]["message"], r
            # a 2026 request keeps no state: it is served while the store is down
            modern = _redis_modern_call(port, "greet", {"name": "stateless"})
            assert modern.status == 200 and _redis_text(modern.json()["result"]) == "Hello, stateless!"
            # Redis comes back on the same address (empty: it kept nothing); the server reconnects
            store = _redis_Server(redis_workdir, port=store.port).start()
            _redis_wait(lambda: http(port, "GET", "/readyz").status == 200, "/readyz to answer 200 again")
            assert s.post(s.body("tools/list")).status == 404  # that session died with Redis's memory
            fresh = Session(port)
            fresh.initialize()
            assert _redis_text(fresh.call("greet", {"name": "again"})) == "Hello, again!"
            # and its pub/sub connection resubscribed on its own
            _redis_wait_subscribed(store.url, "mcp:bus")
            with Conn(port) as conn:
                conn.request("GET", "/mcp", fresh.headers({"Accept": "text/event-stream", "Content-Type": None}))
                stream = SSEStream(conn, conn.read_head())
                assert not stream.next_event().get("data")
                assert _redis_modern_call(port, "test_trigger_tool_change").status == 200
                assert stream.next_message() == {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}
        finally:
            if instance is not None:
                instance.stop()
            store.stop()


    def test_a_resumed_stream_delivers_what_reached_the_log_while_its_subscription_was_down(self, redis_workdir):
        """B follows a stream that lives on A.  Its pub/sub connection drops (B frozen meanwhile),
        and A's final response is logged and published to nobody: B must still deliver it, from
        the log, once it runs again."""
        if _redis_skip_reason():
            pytest.skip(_redis_skip_reason())
        store = _redis_Server(redis_workdir).start()
        instances = []
        frozen = None
        try:
            instances = _redis_instances(store.url, 2)
            a, b = (instance.port for instance in instances)
            s = Session(a, capabilities={"elicitation": {}})
            s.initialize()
            call = s.body("tools/call", {"name": "test_elicitation", "arguments": {"message": "Name?"}})
            with Conn(a) as conn:  # the client starts the call on A, then loses that connection
                conn.request("POST", "/mcp", s.headers(), call)
                stream = SSEStream(conn, conn.read_head())
                priming = stream.next_event()
                ask = stream.next_message()
            stream_id = priming["id"].rpartition(":")[0]
            with Conn(b) as resumed:
                resumed.request("GET", "/mcp", _redis_on(s, b).headers(
                    {"Accept": "text/event-stream", "Content-Type": None, "Last-Event-ID": priming["id"]}))
                follow = SSEStream(resumed, resumed.read_head())
                assert follow.next_message() == ask  # replayed from the log
                _redis_wait_subscribed(store.url, mcp_server._stream_channel(s.sid, stream_id))  # B follows
                frozen = instances[1].proc.proc
                frozen.send_signal(signal.SIGSTOP)
                client = store.client()
                try:
                    client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")  # B's subscription is gone
                    events_key = mcp_server._events_key(s.sid, stream_id)
                    logged = client.llen(events_key)  # (sealed: counted, not read)
                    answer = _redis_on(s, a).post({"jsonrpc": "2.0", "id": ask["id"], "result": {
                        "action": "accept", "content": {"response": "Ada"}}})
                    assert answer.status == 202
                    _redis_wait(lambda: client.llen(events_key) > logged, "A's final response in the stream's log")
                finally:
                    client.close()
                frozen.send_signal(signal.SIGCONT)
                frozen = None
                final = _redis_read_until_response(resumed, follow, call["id"], WAIT / 2)
                assert _redis_text(final["result"]) == 'User response: action=accept, content={"response":"Ada"}'
        finally:
            if frozen is not None:
                frozen.send_signal(signal.SIGCONT)
            for instance in instances:
                instance.stop()
            store.stop()


def _redis_read_until_response(conn: Conn, stream: SSEStream, request_id, bound: float) -> dict:
    """Read a stream that sends keep-alive comments until the response to ``request_id``; fail
    after ``bound`` seconds (a hang detector: keep-alives would otherwise keep it waiting)."""
    deadline = time.monotonic() + bound
    conn.sock.settimeout(bound)
    while True:
        text = stream.text.replace("\r\n", "\n")
        while "\n\n" in text:
            block, text = text.split("\n\n", 1)
            event = parse_sse_block(block)
            if event and event.get("data"):
                message = json.loads(event["data"])
                if message.get("id") == request_id and ("result" in message or "error" in message):
                    stream.text = text
                    return message
        stream.text = text
        if time.monotonic() > deadline:
            pytest.fail(f"no response to {request_id!r} within {bound} s, although it is in the stream's log")
        try:
            stream.text += next(stream.pieces).decode("utf-8")
        except StopIteration:
            pytest.fail(f"the stream ended without the response to {request_id!r}")


def _redis_listening_workers(supervisor_pid: int, port: int, count: int) -> dict | None:
    """{socket inode: worker pid} of the LISTEN sockets on ``port`` owned by the supervisor's
    children, once there are ``count`` of them (read from /proc, Linux)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    owners = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != supervisor_pid:
                continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    owners[target[8:-1]] = int(pid)
        except OSError:
            continue
    return owners if len(owners) >= count else None


# =================================================================================================
# Revisions: every message a client of each revision receives, against that revision's schema
# =================================================================================================
#
# The official JSON Schemas (shared/spec/schema/<revision>.json beside the repository) allow
# properties they do not declare.  This validator does not: in an object definition that lists
# its ``properties`` and says nothing about ``additionalProperties``, an undeclared property is a
# failure, so a field a revision does not define fails the test.  Definitions that say
# ``additionalProperties`` explicitly keep their openness (capabilities, ``arguments``,
# ``structuredContent``), and so do two kinds of value whose keys are free by definition: ``_meta``
# objects (MetaObject: any key with a valid name) and a tool's ``inputSchema``/``outputSchema``
# (JSON Schema documents: any JSON Schema keyword).

# MCP_SCHEMA_DIR points at another folder of <revision>.json files (no published package ships them)
_REV_SCHEMA_DIR = (os.environ.get("MCP_SCHEMA_DIR")
                   or os.path.normpath(os.path.join(ROOT, "..", "shared", "spec", "schema")))
_REV_OPEN_PROPERTIES = ("_meta", "inputSchema", "outputSchema")
_REV_TYPES = {
    "null": lambda v: v is None,
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool)
    or (isinstance(v, float) and v.is_integer()),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


def _rev_equal(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_rev_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_rev_equal(a[k], b[k]) for k in a)
    return a == b


class _rev_Schema:
    """One revision's schema file with a strict validator (see above)."""

    def __init__(self, revision: str):
        self.revision = revision
        with open(os.path.join(_REV_SCHEMA_DIR, f"{revision}.json")) as f:
            self.root = json.load(f)
        self.defs = self.root.get("definitions") or self.root.get("$defs")

    def has(self, name: str) -> bool:
        return name in self.defs

    def resolve(self, ref: str) -> dict:
        assert ref.startswith("#/"), f"only local references are used: {ref}"
        node = self.root
        for part in ref[2:].split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        return node

    def errors(self, instance, name: str, path: str = "") -> list:
        """Every problem of ``instance`` as the definition ``name``; [] when it conforms."""
        return self._check(instance, self.defs[name], path or name, open_object=False)

    def _declared(self, schema: dict) -> tuple:
        """(property names, open?) of an object schema, through $ref and allOf."""
        names, is_open = set(schema.get("properties", ())), False
        if "additionalProperties" in schema and schema["additionalProperties"] is not False:
            is_open = True
        if "properties" not in schema and "additionalProperties" not in schema and "allOf" not in schema \
                and "$ref" not in schema:
            is_open = True  # a bare {"type": "object"} is a free map
        if "$ref" in schema:
            more, more_open = self._declared(self.resolve(schema["$ref"]))
            names |= more
            is_open = is_open or more_open
        for branch in schema.get("allOf", ()):
            more, more_open = self._declared(branch)
            names |= more
            is_open = is_open or more_open
        return names, is_open

    def _check(self, value, schema, path: str, open_object: bool, in_all_of: bool = False) -> list:
        if schema is True or schema == {}:
            return []
        if schema is False:
            return [f"{path}: no value is allowed here"]
        problems = []
        if "$ref" in schema:
            problems += self._check(value, self.resolve(schema["$ref"]), path, open_object, in_all_of=True)
        types = schema.get("type")
        if types is not None:
            names = types if isinstance(types, list) else [types]
            if not any(_REV_TYPES[t](value) for t in names):
                return problems + [f"{path}: expected {'/'.join(names)}, got {json.dumps(value)[:80]}"]
        if "const" in schema and not _rev_equal(value, schema["const"]):
            problems.append(f"{path}: must be {json.dumps(schema['const'])}, got {json.dumps(value)[:80]}")
        if "enum" in schema and not any(_rev_equal(value, option) for option in schema["enum"]):
            problems.append(f"{path}: {json.dumps(value)[:80]} is not one of {schema['enum']}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if "minimum" in schema and value < schema["minimum"]:
                problems.append(f"{path}: {value} is below the minimum {schema['minimum']}")
            if "maximum" in schema and value > schema["maximum"]:
                problems.append(f"{path}: {value} is above the maximum {schema['maximum']}")
        if isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"], value):
            problems.append(f"{path}: {value!r} does not match {schema['pattern']}")
        if isinstance(value, list):
            if "maxItems" in schema and len(value) > schema["maxItems"]:
                problems.append(f"{path}: more than {schema['maxItems']} items")
            if "minItems" in schema and len(value) < schema["minItems"]:
                problems.append(f"{path}: fewer than {schema['minItems']} items")
            if isinstance(schema.get("items"), dict):
                for i, item in enumerate(value):
                    problems += self._check(item, schema["items"], f"{path}[{i}]", False)
        if isinstance(value, dict):
            properties = schema.get("properties", {})
            for key in schema.get("required", ()):
                if key not in value:
                    problems.append(f"{path}: the required property {key!r} is missing")
            extra = schema.get("additionalProperties")
            for key, item in value.items():
                if key in properties:
                    problems += self._check(item, properties[key], f"{path}.{key}", key in _REV_OPEN_PROPERTIES)
                elif extra is False:
                    problems.append(f"{path}: the property {key!r} is not allowed")
                elif isinstance(extra, dict) and extra:
                    problems += self._check(item, extra, f"{path}.{key}", False)
            if not in_all_of and not open_object and ("properties" in schema or "allOf" in schema
                                                       or "$ref" in schema):
                declared, is_open = self._declared(schema)
                if not is_open:
                    for key in value:
                        if key not in declared:
                            problems.append(f"{path}: the property {key!r} is not defined by {self.revision}")
        for branch in schema.get("allOf", ()):
            problems += self._check(value, branch, path, open_object, in_all_of=True)
        if "anyOf" in schema or "oneOf" in schema:
            branches = schema.get("anyOf") or schema.get("oneOf")
            results = [self._check(value, branch, path, open_object) for branch in branches]
            passing = sum(1 for r in results if not r)
            if passing == 0:
                best = min(results, key=len)
                problems.append(f"{path}: matches none of {len(branches)} forms; the closest: {'; '.join(best)}")
            elif "oneOf" in schema and passing > 1:
                problems.append(f"{path}: matches {passing} forms of a oneOf")
        return problems


_REV_SCHEMAS: dict = {}


def _rev_schema(revision: str) -> _rev_Schema:
    if not os.path.isdir(_REV_SCHEMA_DIR):
        pytest.skip(f"the MCP specification's schema files (<revision>.json) are not at {_REV_SCHEMA_DIR}: no "
                    "published package ships them and the repository keeps no copy; put them in "
                    "../shared/spec/schema beside the repository, or name their folder in MCP_SCHEMA_DIR")
    if revision not in _REV_SCHEMAS:
        _REV_SCHEMAS[revision] = _rev_Schema(revision)
    return _REV_SCHEMAS[revision]


_REV_RESULTS = {
    "initialize": "InitializeResult", "ping": "EmptyResult", "logging/setLevel": "EmptyResult",
    "resources/subscribe": "EmptyResult", "resources/unsubscribe": "EmptyResult",
    "tools/list": "ListToolsResult", "tools/call": "CallToolResult", "resources/list": "ListResourcesResult",
    "resources/templates/list": "ListResourceTemplatesResult", "resources/read": "ReadResourceResult",
    "prompts/list": "ListPromptsResult", "prompts/get": "GetPromptResult", "completion/complete": "CompleteResult",
    "server/discover": "DiscoverResult", "subscriptions/listen": "SubscriptionsListenResult",
}
_REV_NOTIFICATIONS = {
    "notifications/progress": "ProgressNotification", "notifications/message": "LoggingMessageNotification",
    "notifications/tools/list_changed": "ToolListChangedNotification",
    "notifications/prompts/list_changed": "PromptListChangedNotification",
    "notifications/resources/list_changed": "ResourceListChangedNotification",
    "notifications/resources/updated": "ResourceUpdatedNotification",
    "notifications/subscriptions/acknowledged": "SubscriptionsAcknowledgedNotification",
    "notifications/cancelled": "CancelledNotification",
}
_REV_REQUESTS = {"elicitation/create": "ElicitRequest", "sampling/createMessage": "CreateMessageRequest",
                 "roots/list": "ListRootsRequest", "ping": "PingRequest"}


def _rev_problems(revision: str, message: dict, answering: str | None) -> list:
    """Problems of one message a server sent to a client of ``revision``.  ``answering`` is the
    method of the request a response answers."""
    schema = _rev_schema(revision)

    def first(*names):
        return next(n for n in names if schema.has(n))

    def body_of(definition: str) -> dict:  # 2024-2025-06-18 definitions leave the envelope out
        declared = schema.defs[definition].get("properties", {})
        return {k: v for k, v in message.items() if k in declared or k not in ("jsonrpc", "id")}

    if "method" in message:
        method = message["method"]
        envelope = "JSONRPCRequest" if "id" in message else "JSONRPCNotification"
        table = _REV_REQUESTS if "id" in message else _REV_NOTIFICATIONS
        problems = schema.errors(message, envelope)
        definition = table.get(method)
        if definition is None or not schema.has(definition):
            return problems + [f"{method} is not a {'request' if 'id' in message else 'notification'} "
                               f"{revision} defines"]
        return problems + schema.errors(body_of(definition), definition)
    if "error" in message:
        return schema.errors(message, first("JSONRPCErrorResponse", "JSONRPCError"))
    problems = schema.errors(message, first("JSONRPCResultResponse", "JSONRPCResponse"))
    result = message.get("result")
    if not isinstance(result, dict):
        return problems + ["the result is not an object"]
    definition = _REV_RESULTS.get(answering)
    if isinstance(result.get("resultType"), str) and result["resultType"] == "input_required":
        definition = "InputRequiredResult"
    if definition is None or not schema.has(definition):
        return problems + [f"{answering} has no result type in {revision}"]
    if definition == "EmptyResult":  # EmptyResult is Result, which is open; empty means empty
        allowed = set(schema.defs["Result"].get("properties", ()))
        problems += [f"EmptyResult: the property {k!r} is not defined by {revision}" for k in result
                     if k not in allowed]
        definition = "Result"
    return problems + schema.errors(result, definition, f"{definition}")


# ---- a server with every kind of thing a revision may or may not define --------------------------

_REV_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
_REV_WAV = "UklGRiYAAABXQVZFZm10IBAAAAABAAEAQB8AAAB9AAACABAAZGF0YQIAAAA="
_REV_ICONS = [{"src": "https://example.com/icon.png", "mimeType": "image/png", "sizes": ["48x48"]}]
_REV_ANNOTATIONS = {"audience": ["user", "assistant"], "priority": 0.5, "lastModified": "2025-01-01T00:00:00Z"}
_REV_NAME_FORM = {"type": "object", "properties": {"name": {"type": "string", "title": "Name"}}, "required": ["name"]}


class _rev_Point(TypedDict):
    x: int
    y: int


def _rev_link() -> ResourceLink:
    return ResourceLink("test://static", "static", title="Static", description="The static resource",
                        mime_type="text/plain", size=11, annotations=_REV_ANNOTATIONS)


def _rev_build_server() -> MCPServer:
    server = MCPServer("rev-server", version="1.2.3", title="Revision Server", description="Serves every revision",
                       website_url="https://example.com", icons=_REV_ICONS, instructions="Call the rev_* tools.",
                       settings=Settings(auth="none"))

    @server.tool(title="Text tool", icons=_REV_ICONS, meta={"com.example/kind": "text"},
                 annotations={"title": "Text", "readOnlyHint": True, "destructiveHint": False,
                              "idempotentHint": True, "openWorldHint": False})
    def rev_text(word: Annotated[str, Param(title="Word", description="A word to echo")] = "hi") -> str:
        """Echo a word."""
        return f"text {word}"

    @server.tool(title="Image tool")
    def rev_image() -> Image:
        """An image with annotations."""
        return Image(base64=_REV_PNG, mime_type="image/png", annotations=_REV_ANNOTATIONS)

    @server.tool(title="Audio tool")
    def rev_audio() -> Audio:
        """An audio clip."""
        return Audio(base64=_REV_WAV, mime_type="audio/wav", annotations=_REV_ANNOTATIONS)

    @server.tool(title="Link tool")
    def rev_link() -> ResourceLink:
        """A link to a resource."""
        return _rev_link()

    @server.tool(title="Embedded tool")
    def rev_embedded() -> list:
        """Embedded text and blob resources."""
        return [EmbeddedResource("test://static", text="static text", mime_type="text/plain",
                                 annotations=_REV_ANNOTATIONS),
                EmbeddedResource("test://binary", blob=b"\x00\x01\x02", mime_type="application/octet-stream")]

    @server.tool(title="Mixed tool")
    def rev_mixed() -> list:
        """Every kind of content block at once."""
        return ["some text", Image(base64=_REV_PNG), Audio(base64=_REV_WAV), _rev_link(),
                EmbeddedResource("test://static", text="static text", mime_type="text/plain")]

    @server.tool(title="Point tool")
    def rev_point() -> _rev_Point:
        """Structured content with an output schema."""
        return {"x": 1, "y": 2}

    @server.tool()
    def rev_dict() -> dict:
        """A dict: structured content."""
        return {"a": 1, "b": [1, 2]}

    @server.tool()
    def rev_array() -> list[int]:
        """A list: array structured content."""
        return [1, 2, 3]

    @server.tool(output_schema={"type": "array", "items": {"type": "integer"}})
    def rev_array_schema() -> list:
        """A list with an array output schema."""
        return [4, 5]

    @server.tool()
    def rev_error() -> str:
        """Fails as a tool error."""
        raise ToolError("rev_error failed on purpose")

    @server.tool(task="optional")
    def rev_task() -> str:
        """May run as a task (2026 tasks extension)."""
        return "task-capable"

    @server.tool()
    async def rev_notify(ctx: Context) -> str:
        """Progress and log notifications."""
        for step in (1, 2, 3):
            await ctx.report_progress(step, 3, f"step {step}")
        await ctx.log("debug", "debug line")
        await ctx.log("info", "info line", logger="rev")
        await ctx.log("warning", {"structured": True, "n": 1})
        return "notified"

    @server.tool()
    async def rev_elicit(ctx: Context) -> str:
        """Asks the user for a name."""
        answer = await ctx.elicit("Your name?", _REV_NAME_FORM, key="who")
        return f"Hello, {(answer.get('content') or {}).get('name')}"

    @server.tool()
    async def rev_sample(ctx: Context) -> str:
        """Asks the client's model."""
        answer = await ctx.sample("Say hi", max_tokens=10, key="llm")
        return f"model said {answer['content']['text']}"

    @server.tool()
    async def rev_roots(ctx: Context) -> str:
        """Asks the client for its roots."""
        return f"{len(await ctx.list_roots(key='roots'))} root(s)"

    @server.resource("test://static", name="static", title="Static", description="A static resource",
                     mime_type="text/plain", size=11, annotations=_REV_ANNOTATIONS, icons=_REV_ICONS,
                     meta={"com.example/x": 1})
    def static() -> str:
        return "static text"

    @server.resource("test://binary", name="binary", description="Some bytes", mime_type="application/octet-stream")
    def binary() -> bytes:
        return b"\x00\x01\x02"

    @server.resource("test://items/{id}", name="item", title="Item", description="An item by id",
                     mime_type="text/plain", icons=_REV_ICONS, annotations=_REV_ANNOTATIONS)
    def item(id: str) -> str:
        return f"item {id}"

    @server.prompt(title="City prompt", icons=_REV_ICONS)
    def rev_prompt(city: Annotated[str, Param(title="City", description="The city")],
                   style: Annotated[str, Param(title="Style", description="How to write")] = "plain") -> str:
        """Describe a city."""
        return f"Describe {city} in a {style} style."

    @server.prompt(title="Rich prompt")
    def rev_rich_prompt() -> list:
        """A prompt with every kind of content."""
        return [Image(base64=_REV_PNG), Audio(base64=_REV_WAV),
                EmbeddedResource("test://static", text="static text", mime_type="text/plain"), _rev_link(),
                "Please look at the above.", {"role": "assistant", "content": {"type": "text", "text": "Sure."}}]

    @server.completion("ref/prompt", "rev_prompt")
    def complete_city(argument: str, value: str, context: dict) -> list:
        return [c for c in ("Paris", "Perth", "Oslo") if c.startswith(value)]

    @server.completion("ref/resource", "test://items/{id}")
    def complete_item(argument: str, value: str, context: dict) -> list:
        return ["1", "2", "3"]

    return server


@pytest.fixture(scope="module")
def redis_rev_server():
    st = ServerThread(_rev_build_server()).start()
    st.transcripts = {}
    yield st
    st.close()


# ---- clients that record every message they receive -------------------------------------------


def _rev_answer(request: dict) -> dict:
    """What the client answers to a server request (or an MRTR input request)."""
    method = request["method"]
    if method == "elicitation/create":
        return {"action": "accept", "content": {"name": "Ada"}}
    if method == "sampling/createMessage":
        return {"role": "assistant", "content": {"type": "text", "text": "hi"}, "model": "test-model",
                "stopReason": "endTurn"}
    if method == "roots/list":
        return {"roots": [{"uri": "file:///tmp/project", "name": "project"}]}
    raise AssertionError(f"unexpected server request {method}")


class _rev_Legacy:
    """A Streamable HTTP client of a legacy revision; answers server requests on the side."""

    def __init__(self, port: int, revision: str, transcript: list):
        caps = {"sampling": {}, "roots": {"listChanged": True}}
        if revision >= "2025-06-18":
            caps["elicitation"] = {}
        self.session = Session(port, revision, caps)
        self.port, self.revision, self.transcript = port, revision, transcript

    def initialize(self) -> dict:
        final, resp = self._exchange("initialize", {"protocolVersion": self.revision,
                                                    "capabilities": self.session.capabilities,
                                                    "clientInfo": {"name": "pytest", "version": "1.0"}})
        self.session.sid = resp.header("mcp-session-id")
        assert self.session.sid, resp
        assert self.session.post({"jsonrpc": "2.0", "method": "notifications/initialized"}).status == 202
        return final

    def request(self, method: str, params: dict | None = None) -> dict:
        return self._exchange(method, params)[0]

    def _exchange(self, method: str, params: dict | None) -> tuple:
        body = self.session.body(method, params)
        with Conn(self.port) as conn:
            conn.request("POST", "/mcp", self.session.headers(), body)
            resp = conn.read_head()
            assert resp.status == 200, (method, resp, b"".join(conn.iter_body(resp)))
            if resp.content_type != "text/event-stream":
                resp.body = b"".join(conn.iter_body(resp))
                final = resp.json()
                self.transcript.append((final, method))
                return final, resp
            stream = SSEStream(conn, resp)
            while True:
                message = stream.next_message()
                assert message is not None, f"the {method} stream ended without a response"
                if "method" in message:
                    self.transcript.append((message, None))
                    if "id" in message:
                        answer = self.session.post({"jsonrpc": "2.0", "id": message["id"],
                                                    "result": _rev_answer(message)})
                        assert answer.status == 202, answer
                    continue
                self.transcript.append((message, method))
                if message.get("id") == body["id"]:
                    return message, resp

    def listen(self, trigger, count: int, registered) -> None:
        """Open the session's GET stream, run ``trigger()``, record ``count`` notifications."""
        with Conn(self.port) as conn:
            conn.request("GET", "/mcp", self.session.headers({"Accept": "text/event-stream", "Content-Type": None}))
            # before 2025-11-25 the stream starts with no event: ask the in-process server whether the
            # stream is registered before causing notifications
            _redis_wait(lambda: registered(self.session.sid), "the GET stream to be registered")
            trigger()
            resp = conn.read_head()
            assert resp.status == 200, resp
            stream = SSEStream(conn, resp)
            for _ in range(count):
                message = stream.next_message()
                assert message is not None
                self.transcript.append((message, None))


class _rev_HttpSSE:
    """A 2024-11-05 client on the HTTP+SSE transport: every answer arrives on the /sse stream."""

    def __init__(self, port: int, transcript: list):
        self.client = LegacySSEClient(port)
        assert self.client.status == 200
        self.transcript, self._id = transcript, 0
        self.capabilities = {"sampling": {}, "roots": {"listChanged": True}}

    def initialize(self) -> dict:
        final = self.request("initialize", {"protocolVersion": "2024-11-05", "capabilities": self.capabilities,
                                            "clientInfo": {"name": "pytest", "version": "1.0"}})
        assert self.client.post({"jsonrpc": "2.0", "method": "notifications/initialized"}).status == 202
        return final

    def request(self, method: str, params: dict | None = None) -> dict:
        self._id += 1
        message = {"jsonrpc": "2.0", "id": self._id, "method": method}
        if params is not None:
            message["params"] = params
        assert self.client.post(message).status == 202
        while True:
            received = self.client.next_message()
            assert received is not None, f"the /sse stream ended before the answer to {method}"
            if "method" in received:
                self.transcript.append((received, None))
                if "id" in received:
                    answer = {"jsonrpc": "2.0", "id": received["id"], "result": _rev_answer(received)}
                    assert self.client.post(answer).status == 202
                continue
            self.transcript.append((received, method))
            if received.get("id") == self._id:
                return received

    def listen(self, trigger, count: int, registered) -> None:
        trigger()  # the /sse stream is registered: its endpoint event came first
        for _ in range(count):
            message = self.client.next_message()
            assert message is not None
            self.transcript.append((message, None))

    def close(self) -> None:
        self.client.close()


class _rev_Modern:
    """A 2026-07-28 client: stateless requests, MRTR rounds answered and retried."""

    caps = {"elicitation": {}, "sampling": {}, "roots": {}}

    def __init__(self, port: int, transcript: list):
        self.port, self.transcript, self._id = port, transcript, 0

    def request(self, method: str, params: dict | None = None) -> dict:
        params = dict(params or {})
        params["_meta"] = {"io.modelcontextprotocol/logLevel": "debug", **params.get("_meta", {})}
        while True:
            self._id += 1
            body = modern_body(method, params, request_id=self._id, caps=self.caps)
            resp = http(self.port, "POST", "/mcp", modern_headers(body), body)
            assert resp.status == 200, (method, resp)
            final = None
            for message in resp.messages():
                self.transcript.append((message, None if "method" in message else method))
                if "method" not in message:
                    final = message
            assert final is not None and final.get("id") == self._id, resp
            result = final.get("result") or {}
            if result.get("resultType") != "input_required":
                return final
            params = {**params, "requestState": result["requestState"],
                      "inputResponses": {k: _rev_answer(r) for k, r in result["inputRequests"].items()}}

    def listen(self, trigger, count: int, registered) -> None:
        self._id += 1
        body = modern_body("subscriptions/listen", {"notifications": {
            "toolsListChanged": True, "promptsListChanged": True, "resourcesListChanged": True,
            "resourceSubscriptions": ["test://static"]}}, request_id=self._id, caps=self.caps)
        with Conn(self.port) as conn:
            conn.request("POST", "/mcp", modern_headers(body), body)
            resp = conn.read_head()
            assert resp.status == 200, resp
            stream = SSEStream(conn, resp)
            ack = stream.next_message()  # the listener is registered when the acknowledgement is sent
            self.transcript.append((ack, None))
            trigger()
            for _ in range(count):
                message = stream.next_message()
                assert message is not None
                self.transcript.append((message, None))


_REV_CLIENTS = [("2024-11-05", "sse"), ("2024-11-05", "mcp"), ("2025-03-26", "mcp"), ("2025-06-18", "mcp"),
                ("2025-11-25", "mcp"), ("2026-07-28", "mcp")]
_REV_IDS = [f"{rev}-{transport}" for rev, transport in _REV_CLIENTS]


def _rev_transcript(st, revision: str, transport: str) -> list:
    """Drive one client of ``revision`` through everything the server offers; every message it
    received, as (message, method answered or None).  Cached per module server."""
    key = (revision, transport)
    if key in st.transcripts:
        return st.transcripts[key]
    _rev_schema(revision)  # skip early when the schemas are absent
    transcript: list = []
    modern = revision >= "2026-07-28"
    if modern:
        client = _rev_Modern(st.port, transcript)
        client.request("server/discover")
    elif transport == "sse":
        client = _rev_HttpSSE(st.port, transcript)
        client.initialize()
    else:
        client = _rev_Legacy(st.port, revision, transcript)
        client.initialize()
    try:
        if not modern:
            client.request("ping")
            client.request("logging/setLevel", {"level": "debug"})
        tools = client.request("tools/list")["result"]["tools"]
        for tool in tools:
            params = {"name": tool["name"], "arguments": {"word": "hello"} if tool["name"] == "rev_text" else {}}
            if tool["name"] == "rev_notify":
                params["_meta"] = {"progressToken": f"progress-{revision}"}
            client.request("tools/call", params)
        client.request("tools/call", {"name": "rev_text", "arguments": {"word": 42}})  # invalid: a tool error
        resources = client.request("resources/list")["result"]["resources"]
        client.request("resources/templates/list")
        for uri in [r["uri"] for r in resources] + ["test://items/7"]:
            client.request("resources/read", {"uri": uri})
        for prompt in client.request("prompts/list")["result"]["prompts"]:
            arguments = {"city": "Paris"} if prompt["name"] == "rev_prompt" else {}
            client.request("prompts/get", {"name": prompt["name"], "arguments": arguments})
        client.request("completion/complete", {"ref": {"type": "ref/prompt", "name": "rev_prompt"},
                                               "argument": {"name": "city", "value": "P"}})
        client.request("completion/complete", {"ref": {"type": "ref/resource", "uri": "test://items/{id}"},
                                               "argument": {"name": "id", "value": ""}})
        if not modern:
            client.request("resources/subscribe", {"uri": "test://static"})

        def trigger():
            st.run(st.server.notify_tools_changed())
            st.run(st.server.notify_resource_updated("test://static"))
        client.listen(trigger, 2, lambda sid: _rev_stream_registered(st, sid))
    finally:
        if transport == "sse" and not modern:
            client.close()
    st.transcripts[key] = transcript
    return transcript


def _rev_stream_registered(st, sid: str) -> bool:
    async def check():
        return sid in st.server._live_runtime.session_streams
    return st.run(check())


def _rev_walk(value, path: str = ""):
    """(path, key, value) of every object member, outside tools' JSON Schema documents."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield path, key, item
            if key not in ("inputSchema", "outputSchema", "requestedSchema"):
                yield from _rev_walk(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _rev_walk(item, f"{path}[{i}]")


def _rev_results(transcript: list, method: str) -> list:
    return [m["result"] for m, answering in transcript if answering == method and "result" in m]


def _rev_call_results(transcript: list) -> dict:
    """{tool name: CallToolResult} of the calls in order (the invalid rev_text call excluded)."""
    results = _rev_results(transcript, "tools/call")
    tools = _rev_results(transcript, "tools/list")[0]["tools"]
    return {tool["name"]: result for tool, result in zip(tools, results)}


class TestRevisions:
    """Revision-shaped results, validated against the official schemas with undeclared fields
    refused: what a client of one revision receives is exactly what that revision defines."""

    @pytest.mark.parametrize("revision, transport", _REV_CLIENTS, ids=_REV_IDS)
    def test_every_message_conforms_to_the_revision_schema(self, redis_rev_server, revision, transport):
        transcript = _rev_transcript(redis_rev_server, revision, transport)
        problems = []
        for message, answering in transcript:
            for problem in _rev_problems(revision, message, answering):
                problems.append(f"{answering or message.get('method')}: {problem}")
        assert not problems, "\n".join(dict.fromkeys(problems))
        # and the transcript covers what it must: nothing vacuous passes
        answered = {answering for _m, answering in transcript if answering}
        expected = {"tools/list", "tools/call", "resources/list", "resources/templates/list", "resources/read",
                    "prompts/list", "prompts/get", "completion/complete"}
        expected |= {"server/discover"} if revision >= "2026" else {"initialize", "ping", "logging/setLevel",
                                                                      "resources/subscribe"}
        assert expected <= answered, expected - answered
        sent = {m["method"] for m, answering in transcript if answering is None}
        assert {"notifications/progress", "notifications/message", "notifications/tools/list_changed",
                "notifications/resources/updated"} <= sent, sent
        if revision < "2026":
            assert {"sampling/createMessage", "roots/list"} <= sent, sent
            assert ("elicitation/create" in sent) == (revision >= "2025-06-18"), sent
        else:
            rounds = [m["result"] for m, a in transcript if a == "tools/call"
                      and m["result"].get("resultType") == "input_required"]
            asked = {r["method"] for result in rounds for r in result["inputRequests"].values()}
            assert asked == {"elicitation/create", "sampling/createMessage", "roots/list"}, asked

    @pytest.mark.parametrize("transport", ["sse", "mcp"])
    def test_a_2024_11_05_client_never_sees_newer_fields(self, redis_rev_server, transport):
        transcript = _rev_transcript(redis_rev_server, "2024-11-05", transport)
        newer = {"title", "icons", "structuredContent", "outputSchema", "resultType", "websiteUrl",
                 "lastModified", "execution"}
        found = []
        for message, _answering in transcript:
            for path, key, value in _rev_walk(message):
                if key in newer or (key == "type" and value in ("audio", "resource_link")):
                    found.append(f"{path}.{key}={json.dumps(value)[:60]}")
        assert not found, found
        results = _rev_call_results(transcript)
        assert results["rev_audio"]["content"][0]["type"] == "text"  # audio became a placeholder text
        assert results["rev_link"]["content"][0]["type"] == "text"
        assert "Resource: static <test://static>" in results["rev_link"]["content"][0]["text"]

    @pytest.mark.parametrize("revision", ["2025-03-26", "2025-06-18", "2025-11-25"])
    def test_a_2025_client_never_receives_array_structured_content(self, redis_rev_server, revision):
        transcript = _rev_transcript(redis_rev_server, revision, "mcp")
        structured = [(path, value) for message, _a in transcript for path, key, value in _rev_walk(message)
                      if key == "structuredContent"]
        assert all(isinstance(value, dict) for _path, value in structured), structured
        results = _rev_call_results(transcript)
        assert "structuredContent" not in results["rev_array"] and "structuredContent" not in results["rev_array_schema"]
        assert results["rev_array"]["content"] == [{"type": "text", "text": "[1,2,3]"}]
        tools = {t["name"]: t for t in _rev_results(transcript, "tools/list")[0]["tools"]}
        assert "outputSchema" not in tools["rev_array_schema"]  # legacy output schemas are objects
        if revision >= "2025-06-18":  # the positive control: dicts do arrive
            assert results["rev_point"]["structuredContent"] == {"x": 1, "y": 2}
            assert tools["rev_point"]["outputSchema"]["type"] == "object"

    def test_a_2026_client_receives_array_structured_content_and_result_types(self, redis_rev_server):
        transcript = _rev_transcript(redis_rev_server, "2026-07-28", "mcp")
        results = _rev_call_results(transcript)
        assert results["rev_array"]["structuredContent"] == [1, 2, 3]
        assert results["rev_array_schema"]["structuredContent"] == [4, 5]
        tools = {t["name"]: t for t in _rev_results(transcript, "tools/list")[0]["tools"]}
        assert tools["rev_array_schema"]["outputSchema"] == {"type": "array", "items": {"type": "integer"}}
        assert "execution" not in tools["rev_task"]  # 2026 has no Tool.execution
        for message, answering in transcript:
            if answering and "result" in message:
                assert message["result"]["resultType"] in ("complete", "input_required"), message
                assert message["result"]["_meta"][META_SERVERINFO]["name"] == "rev-server"

    @pytest.mark.parametrize("revision, fields", [
        ("2025-03-26", {"tool": {"annotations"}, "block": {"audio"}}),
        ("2025-06-18", {"tool": {"annotations", "title", "outputSchema", "_meta"},
                        "block": {"audio", "resource_link"}}),
        ("2025-11-25", {"tool": {"annotations", "title", "outputSchema", "_meta", "icons", "execution"},
                        "block": {"audio", "resource_link"}}),
        ("2026-07-28", {"tool": {"annotations", "title", "outputSchema", "_meta", "icons"},
                        "block": {"audio", "resource_link"}}),
    ])
    def test_newer_fields_reach_the_revisions_that_define_them(self, redis_rev_server, revision, fields):
        transcript = _rev_transcript(redis_rev_server, revision, "mcp")
        tools = {t["name"]: t for t in _rev_results(transcript, "tools/list")[0]["tools"]}
        seen = set(tools["rev_text"]) | set(tools["rev_point"]) | set(tools["rev_task"])
        assert fields["tool"] <= seen, fields["tool"] - seen
        blocks = {b["type"] for b in _rev_call_results(transcript)["rev_mixed"]["content"]}
        assert fields["block"] <= blocks, blocks
        info = (_rev_results(transcript, "initialize") or _rev_results(transcript, "server/discover"))[0]
        if revision >= "2025-11-25" and revision < "2026":
            assert info["serverInfo"]["icons"] == _REV_ICONS and info["serverInfo"]["websiteUrl"]

    def test_prompt_argument_titles_reach_2025_06_18_and_later(self, redis_rev_server):
        for revision in ("2025-06-18", "2025-11-25", "2026-07-28"):
            prompts = _rev_results(_rev_transcript(redis_rev_server, revision, "mcp"), "prompts/list")[0]["prompts"]
            arguments = {a["name"]: a for p in prompts if p["name"] == "rev_prompt" for a in p["arguments"]}
            assert arguments["city"].get("title") == "City", (revision, arguments)
            assert arguments["style"].get("title") == "Style", (revision, arguments)

    @pytest.mark.parametrize("revision", ["2024-11-05", "2025-03-26"])
    def test_resource_annotations_are_shaped_for_older_revisions(self, redis_rev_server, revision):
        transcript = _rev_transcript(redis_rev_server, revision, "mcp")
        listed = _rev_results(transcript, "resources/list")[0]["resources"] + \
            _rev_results(transcript, "resources/templates/list")[0]["resourceTemplates"]
        for entry in listed:
            assert set(entry.get("annotations", {})) <= {"audience", "priority"}, entry

    @pytest.mark.parametrize("revision", ["2025-03-26", "2025-06-18"])
    def test_a_get_stream_answers_its_head_before_the_first_event(self, redis_rev_server, revision):
        """Before 2025-11-25 a GET stream opens without an event; its 200 must still reach the
        client at once, or the client cannot tell that the stream is open."""
        st = redis_rev_server
        client = _rev_Legacy(st.port, revision, [])
        client.initialize()
        with Conn(st.port) as conn:
            conn.request("GET", "/mcp", client.session.headers({"Accept": "text/event-stream", "Content-Type": None}))
            _redis_wait(lambda: _rev_stream_registered(st, client.session.sid), "the GET stream to be registered")
            # the stream is registered and its handler waits for events: everything it wrote is on the
            # wire now (loopback delivers during the write), so a zero-timeout select tells the truth
            readable, _w, _x = select.select([conn.sock], [], [], 0)
            assert readable, "the server holds the GET response head back until the first event or keep-alive"
            resp = conn.read_head()
            assert resp.status == 200 and resp.content_type == "text/event-stream"

    def test_the_validator_refuses_what_a_revision_does_not_define(self):
        old, new = _rev_schema("2024-11-05"), _rev_schema("2026-07-28")
        assert old.errors({"name": "s", "version": "1"}, "Implementation") == []
        assert old.errors({"name": "s", "version": "1", "title": "T"}, "Implementation") == [
            "Implementation: the property 'title' is not defined by 2024-11-05"]
        assert old.errors({"content": [{"type": "audio", "data": "", "mimeType": "audio/wav"}]}, "CallToolResult")
        assert old.errors({"content": []}, "CallToolResult") == []
        assert old.errors({}, "CallToolResult") == ["CallToolResult: the required property 'content' is missing"]
        assert old.errors({"content": [], "structuredContent": {}}, "CallToolResult")
        assert old.errors({"tools": [{"name": "t", "inputSchema": {"type": "object", "$defs": {}, "anyOf": []}}]},
                          "ListToolsResult") == []  # a tool's JSON Schema may use any keyword
        assert new.errors({"resultType": "complete", "content": [], "_meta": {"com.example/any": 1}},
                          "CallToolResult") == []
        assert new.errors({"resultType": "complete", "content": [], "_meta": {META_SERVERINFO: {
            "name": "s", "version": "1", "extra": 1}}}, "CallToolResult")
        assert new.errors({"resultType": "complete", "content": [], "ttlMs": 5}, "CallToolResult")
        assert new.errors({"jsonrpc": "2.0", "id": 1, "error": {"code": -32021, "message": "m", "data": {
            "requiredCapabilities": {"extensions": {}}}}}, "MissingRequiredClientCapabilityError") == []
        assert new.errors({"type": "text", "text": 1}, "TextContent") == ["TextContent.text: expected string, got 1"]
        assert new.errors({"type": "image", "data": "", "mimeType": "x", "annotations": {"priority": 2}},
                          "ImageContent") == ["ImageContent.annotations.priority: 2 is above the maximum 1"]


# =================================================================================================
# Tasks: the io.modelcontextprotocol/tasks extension over the 2026 wire
# =================================================================================================

_TASK_FORM = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


def _task_build_server() -> MCPServer:
    server = MCPServer("task-server", version="1.0.0", settings=Settings(auth="none"))

    @server.tool(task="optional")
    async def task_gated(token: str, ctx: Context) -> str:
        """Runs until the test opens its gate."""
        p = probe(token)
        p.gate = asyncio.Event()
        p.gate_ready.set()
        try:
            await p.gate.wait()
        finally:
            p.cancelled = ctx.cancelled
            p.finished.set()
        return f"done {token}"

    @server.tool(task="optional")
    async def task_tool_error() -> str:
        """Ends with a tool error."""
        raise ToolError("the task tool failed")

    @server.tool(task="optional")
    async def task_rpc_error() -> str:
        """Ends with a protocol error."""
        raise RpcError(-32001, "protocol-level failure", {"why": "testing"})

    @server.tool(task="optional")
    async def task_two_questions(ctx: Context) -> str:
        """Asks two questions at once."""
        answers = await ctx.ask({
            "first": {"method": "elicitation/create", "params": {"message": "First?", "requestedSchema": _TASK_FORM}},
            "second": {"method": "elicitation/create", "params": {"message": "Second?", "requestedSchema": _TASK_FORM}},
        })
        return f"{answers['first']['content']['name']} and {answers['second']['content']['name']}"

    @server.tool(task="optional")
    async def task_two_at_once(ctx: Context) -> str:
        """Asks two questions from two concurrent waits (each answered on its own)."""
        first, second = await mcp_server._gather(ctx.elicit("First?", _TASK_FORM, key="first"),
                                                 ctx.elicit("Second?", _TASK_FORM, key="second"))
        return f"{first['content']['name']} and {second['content']['name']}"

    @server.tool(task="required")
    async def task_required() -> str:
        """Runs only as a task."""
        return "required ran"

    @server.tool(task="required", task_start="explicit")
    async def task_explicit(ctx: Context) -> str:
        """Asks over MRTR, then becomes a task."""
        answer = await ctx.elicit("Who?", _TASK_FORM, key="who")
        await ctx.run_as_task()
        return f"explicit for {answer['content']['name']}"

    @server.tool()
    def task_never(text: str) -> str:
        """No task support."""
        return f"plain {text}"

    return server


@pytest.fixture(scope="module")
def redis_task_server():
    st = ServerThread(_task_build_server()).start()
    yield st
    st.close()


def _task_iso(text: str) -> datetime.datetime:
    assert isinstance(text, str) and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", text), text
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _task_create(port: int, name: str, arguments: dict | None = None, caps=_TASK_CAPS) -> dict:
    result = _task_result(_redis_modern_call(port, name, arguments, caps=caps))
    assert result["resultType"] == "task", result
    return result


class TestTasks:
    """Tasks end to end over real HTTP: create, poll, results, errors, cancel, input, refusals."""

    def test_a_task_is_created_polled_and_completes_with_the_result_inlined(self, redis_task_server):
        st = redis_task_server
        discover = _task_result(modern_post(st.port, "server/discover", caps=_TASK_CAPS))
        assert _TASK_EXTENSION in discover["capabilities"]["extensions"]
        token = new_token("task")
        created = _task_create(st.port, "task_gated", {"token": token})
        assert created["status"] == "working" and isinstance(created["taskId"], str) and created["taskId"]
        assert isinstance(created["ttlMs"], int) and created["ttlMs"] > 0
        assert isinstance(created["pollIntervalMs"], int) and created["pollIntervalMs"] > 0
        created_at = _task_iso(created["createdAt"])
        assert created_at.tzinfo is not None
        assert not {"sub", "tool", "result", "error"} & set(created), created
        p = probe(token)
        assert p.gate_ready.wait(WAIT)  # the tool runs in the background after the handle was sent
        working = _task_result(_task_post(st.port, "tasks/get", created["taskId"]))
        assert working["status"] == "working" and working["taskId"] == created["taskId"]
        assert working["createdAt"] == created["createdAt"] and "result" not in working
        st.call_soon(p.gate.set)
        done = _task_poll(st.port, created["taskId"], lambda r: r["status"] == "completed", "completion")
        assert done["result"] == {"resultType": "complete", "content": [{"type": "text", "text": f"done {token}"}]}
        assert _task_iso(done["lastUpdatedAt"]) >= created_at and done["createdAt"] == created["createdAt"]
        assert not {"sub", "tool"} & set(done)

    def test_a_tool_error_completes_the_task_with_is_error(self, redis_task_server):
        st = redis_task_server
        created = _task_create(st.port, "task_tool_error")
        done = _task_poll(st.port, created["taskId"], lambda r: r["status"] != "working", "the task to end")
        assert done["status"] == "completed", done
        assert done["result"]["isError"] is True
        assert done["result"]["content"] == [{"type": "text", "text": "the task tool failed"}]

    def test_a_protocol_error_fails_the_task_with_the_error(self, redis_task_server):
        st = redis_task_server
        created = _task_create(st.port, "task_rpc_error")
        done = _task_poll(st.port, created["taskId"], lambda r: r["status"] != "working", "the task to end")
        assert done["status"] == "failed", done
        assert done["error"] == {"code": -32001, "message": "protocol-level failure", "data": {"why": "testing"}}
        assert "result" not in done

    def test_cancel_stops_the_tool_and_the_task_stays_cancelled(self, redis_task_server):
        st = redis_task_server
        token = new_token("cancel")
        created = _task_create(st.port, "task_gated", {"token": token})
        p = probe(token)
        assert p.gate_ready.wait(WAIT)
        cancel = _task_result(_task_post(st.port, "tasks/cancel", created["taskId"]))
        assert set(cancel) <= {"resultType", "_meta"}, cancel
        assert p.finished.wait(WAIT) and p.cancelled is True  # the running tool was cancelled
        record = _task_result(_task_post(st.port, "tasks/get", created["taskId"]))
        assert record["status"] == "cancelled" and "result" not in record, record
        assert _task_result(_task_post(st.port, "tasks/cancel", created["taskId"]))  # again: harmless
        assert _task_result(_task_post(st.port, "tasks/get", created["taskId"]))["status"] == "cancelled"

    def test_input_required_answered_in_parts_with_tasks_update(self, redis_task_server):
        st = redis_task_server
        created = _task_create(st.port, "task_two_questions", caps={**_TASK_CAPS, "elicitation": {}})
        task_id = created["taskId"]
        asking = _task_poll(st.port, task_id, lambda r: r["status"] == "input_required", "the questions")
        assert set(asking["inputRequests"]) == {"first", "second"}
        assert asking["inputRequests"]["first"]["method"] == "elicitation/create"
        assert asking["inputRequests"]["first"]["params"]["message"] == "First?"
        ack = _task_result(_task_post(st.port, "tasks/update", task_id, {"inputResponses": {
            "first": {"action": "accept", "content": {"name": "Ada"}}, "unknown-key": {"action": "decline"}}}))
        assert set(ack) <= {"resultType", "_meta"}
        # the update is acknowledged once the still-pending question is stored
        partial = _task_result(_task_post(st.port, "tasks/get", task_id))
        assert partial["status"] == "input_required" and set(partial["inputRequests"]) == {"second"}, partial
        _task_result(_task_post(st.port, "tasks/update", task_id, {"inputResponses": {
            "second": {"action": "accept", "content": {"name": "Grace"}}}}))
        done = _task_poll(st.port, task_id, lambda r: r["status"] == "completed", "completion")
        assert _redis_text(done["result"]) == "Ada and Grace"
        assert "inputRequests" not in done

    def test_questions_asked_at_once_are_each_answered_whatever_the_order(self, redis_task_server):
        """Two waits for input at the same time: an answer to either wakes both to look, so
        neither is left waiting for a delivery that already came (review of issue 20)."""
        st = redis_task_server
        created = _task_create(st.port, "task_two_at_once", caps={**_TASK_CAPS, "elicitation": {}})
        task_id = created["taskId"]
        _task_poll(st.port, task_id, lambda r: set(r.get("inputRequests", ())) == {"first", "second"},
                   "both questions")
        for key, name in (("second", "Grace"), ("first", "Ada")):  # (the later question first)
            _task_result(_task_post(st.port, "tasks/update", task_id, {"inputResponses": {
                key: {"action": "accept", "content": {"name": name}}}}))
        done = _task_poll(st.port, task_id, lambda r: r["status"] == "completed", "completion")
        assert _redis_text(done["result"]) == "Ada and Grace"

    def test_explicit_start_asks_over_mrtr_then_runs_as_a_task(self, redis_task_server):
        st = redis_task_server
        caps = {**_TASK_CAPS, "elicitation": {}}
        first = _task_result(_redis_modern_call(st.port, "task_explicit", caps=caps))
        assert first["resultType"] == "input_required" and set(first["inputRequests"]) == {"who"}
        body = modern_body("tools/call", {"name": "task_explicit", "arguments": {},
                                          "requestState": first["requestState"],
                                          "inputResponses": {"who": {"action": "accept", "content": {"name": "Ada"}}}},
                           caps=caps)
        created = _task_result(http(st.port, "POST", "/mcp", modern_headers(body), body))
        assert created["resultType"] == "task", created
        done = _task_poll(st.port, created["taskId"], lambda r: r["status"] == "completed", "completion")
        assert _redis_text(done["result"]) == "explicit for Ada"

    def test_unknown_task_id_is_invalid_params(self, redis_task_server):
        for method, params in (("tasks/get", None), ("tasks/cancel", None),
                               ("tasks/update", {"inputResponses": {}})):
            r = _task_post(redis_task_server.port, method, "no-such-task", params)
            assert r.status == 200, r
            error = r.json()["error"]
            assert error["code"] == -32602 and "no-such-task" in error["message"], error

    def test_tasks_methods_without_the_capability_are_32021(self, redis_task_server):
        created = _task_create(redis_task_server.port, "task_tool_error")
        for method, params in (("tasks/get", None), ("tasks/cancel", None),
                               ("tasks/update", {"inputResponses": {}})):
            r = _task_post(redis_task_server.port, method, created["taskId"], params, caps={})
            error = assert_rpc_error(r, 400, -32021)
            assert error["data"]["requiredCapabilities"] == {"extensions": {_TASK_EXTENSION: {}}}, error

    def test_a_required_task_tool_needs_the_capability(self, redis_task_server):
        r = _redis_modern_call(redis_task_server.port, "task_required", caps={})
        error = assert_rpc_error(r, 400, -32021)
        assert error["data"]["requiredCapabilities"] == {"extensions": {_TASK_EXTENSION: {}}}, error
        created = _task_create(redis_task_server.port, "task_required")
        done = _task_poll(redis_task_server.port, created["taskId"], lambda r: r["status"] == "completed", "completion")
        assert _redis_text(done["result"]) == "required ran"

    def test_optional_and_plain_tools_answer_directly_without_a_task(self, redis_task_server):
        port = redis_task_server.port
        plain = _task_result(_redis_modern_call(port, "task_never", {"text": "x"}, caps=_TASK_CAPS))
        assert plain["resultType"] == "complete" and _redis_text(plain) == "plain x"
        token = new_token("direct")
        with Conn(port) as conn:  # an optional task tool called without the extension: an ordinary call
            body = modern_body("tools/call", {"name": "task_gated", "arguments": {"token": token}}, caps={})
            conn.request("POST", "/mcp", modern_headers(body), body)
            p = probe(token)
            assert p.gate_ready.wait(WAIT)
            redis_task_server.call_soon(p.gate.set)
            result = conn.read_response().json()["result"]
        assert result["resultType"] == "complete" and _redis_text(result) == f"done {token}"


# ---- extensions, skills, apps and the test client (issue 22) --------------------------------


def _with_client(server: MCPServer, check, era: str = LEGACY, **handlers):
    """Run ``await check(client)`` with ``server.test_client(era, **handlers)``; its result."""
    async def go():
        async with server.test_client(era, **handlers) as client:
            return await check(client)
    return asyncio.run(go())


def _client_error(server: MCPServer, method: str, params: dict | None = None, era: str = LEGACY) -> RpcError:
    async def check(client):
        with pytest.raises(RpcError) as caught:
            await client.request(method, params)
        return caught.value
    return _with_client(server, check, era)


def _echo_extension(seen: list, **options) -> mcp_server.Extension:
    async def reverse(ctx: Context) -> dict:
        return {"reversed": str(ctx.params.get("text", ""))[::-1], "era": ctx.protocol_version}

    async def poked(ctx: Context) -> None:
        seen.append(ctx.params.get("n"))
    return mcp_server.Extension("com.example/echo", {"level": 2}, methods={"echo/reverse": reverse},
                                notifications={"notifications/echo/poke": poked}, **options)


class TestExtensions:
    """One declaration puts an extension in capabilities.extensions of both eras and its methods
    in the method tables; core methods stay the core's."""

    def test_a_declared_extension_is_in_both_eras_and_its_method_answers_over_http(self, make_server):
        server = build_server()
        server.add_extension(_echo_extension([]))
        st = make_server(server)
        session = Session(st.port)
        session.initialize()
        assert session.init_result["capabilities"]["extensions"]["com.example/echo"] == {"level": 2}
        legacy = session.request("echo/reverse", {"text": "abc"})["result"]
        assert legacy == {"reversed": "cba", "era": LEGACY}
        discover = modern_post(st.port, "server/discover").json()["result"]
        assert discover["capabilities"]["extensions"]["com.example/echo"] == {"level": 2}
        modern = modern_post(st.port, "echo/reverse", {"text": "xyz"}).json()["result"]
        assert modern["reversed"] == "zyx" and modern["era"] == MODERN and modern["resultType"] == "complete"

    def test_an_extension_is_absent_from_revisions_before_its_own(self):
        server = build_server()
        server.add_extension(_echo_extension([], since=MODERN))
        init = core_result(server, "initialize", {"protocolVersion": LEGACY, "capabilities": {}})
        assert "extensions" not in init["capabilities"]  # (2025-11-25 declares extensions only when any)
        error = _client_error(server, "echo/reverse", {"text": "a"})
        assert error.code == -32601 and f"not part of protocol version {LEGACY}" in error.message
        old = core_result(server, "initialize", {"protocolVersion": "2025-06-18", "capabilities": {}})
        assert "extensions" not in old["capabilities"]
        result = _with_client(server, lambda c: c.request("echo/reverse", {"text": "ab"}), MODERN)
        assert result["reversed"] == "ba"

    def test_an_extension_cannot_take_over_a_core_or_another_extensions_method(self):
        server = build_server()

        async def hijack(ctx):
            return {"content": [{"type": "text", "text": "hijacked"}]}
        for method in ("tools/call", "initialize", "resources/read", "tasks/get"):
            with pytest.raises(ValueError, match="already has a handler"):
                server.add_extension(mcp_server.Extension("evil.example/x", methods={method: hijack}))
        server.add_extension(_echo_extension([]))
        with pytest.raises(ValueError, match="echo/reverse already has a handler"):
            server.add_extension(mcp_server.Extension("evil.example/y", methods={"echo/reverse": hijack}))
        result = _with_client(server, lambda c: c.call_tool("echo", {"text": "core"}))
        assert result["content"] == [{"type": "text", "text": "core"}]
        # declaring the same identifier again replaces it (its old methods go)
        server.add_extension(mcp_server.Extension("com.example/echo", {"level": 3}))
        assert _client_error(server, "echo/reverse").code == -32601
        init = core_result(server, "initialize", {"protocolVersion": LEGACY, "capabilities": {}})
        assert init["capabilities"]["extensions"]["com.example/echo"] == {"level": 3}
        with pytest.raises(ValueError, match="<prefix>/<name>"):
            mcp_server.Extension("no-prefix")

    def test_extension_notifications_reach_their_handler(self):
        seen: list = []
        server = build_server()
        server.add_extension(_echo_extension(seen))
        response, status = core(server, "notifications/echo/poke", {"n": 7}, request_id=None)
        assert response is None and status == 202 and seen == [7]
        response, status = modern_core(server, "notifications/echo/poke", {"n": 8}, request_id=None)
        assert response is None and seen == [7, 8]

    def test_the_tasks_extension_is_declared_through_the_api_once_a_tool_runs_as_a_task(self):
        server = build_server()
        task_ext = mcp_server._TASKS_EXTENSION
        assert task_ext in server.extensions.by_id
        discover = _with_client(server, lambda c: c.request("server/discover"), MODERN)
        assert discover["capabilities"]["extensions"] == {}
        error = _client_error(server, "tasks/get", {"taskId": "x"}, MODERN)
        assert error.code == -32021  # (its methods answer whatever the tools)

        @server.tool(task="optional")
        async def slow() -> str:
            return "done"
        discover = _with_client(server, lambda c: c.request("server/discover"), MODERN)
        assert discover["capabilities"]["extensions"] == {task_ext: {}}
        init = core_result(server, "initialize", {"protocolVersion": LEGACY, "capabilities": {}})
        assert "extensions" not in init["capabilities"]  # tasks are a 2026-07-28 extension here
        assert _client_error(server, "tasks/get", {"taskId": "x"}).code == -32601


def _write(path, text) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))


_PDF_SKILL_MD = """---
name: pdf-forms
description: Fill PDF forms from the templates
license: Apache-2.0
compatibility: any
metadata:
  version: "2.1"
  owner: docs-team
  retries: 3
  beta: true
tags:
  - pdf
  - forms
---

# PDF forms

Pick a template from `templates/`; the fields are in `references/FIELDS.md`.
"""


@pytest.fixture
def skills_folder(tmp_path):
    root = tmp_path / "skills"
    _write(root / "pdf-forms" / "SKILL.md", _PDF_SKILL_MD)
    _write(root / "pdf-forms" / "references" / "FIELDS.md", "# Fields\n\nname, date\n")
    _write(root / "pdf-forms" / "templates" / "invoice.md", "# Invoice\r\nwith CRLF\r\n")
    _write(root / "pdf-forms" / "templates" / "regional" / "eu invoice.md", "# EU invoice\n")
    _write(root / "pdf-forms" / "assets" / "logo.png", bytes(range(256)) * 3)
    _write(root / "acme" / "billing" / "refunds" / "SKILL.md",
           "---\nname: refunds\ndescription: Handle refunds\n---\n\nRead policy.md.\n")
    _write(root / "acme" / "billing" / "refunds" / "policy.md", "30 days.\n")
    # what must never be published: a dot-file, a dot-directory, a link out of the folder
    secret = tmp_path / "secret.txt"
    _write(secret, "TOP-SECRET-VALUE")
    _write(root / "pdf-forms" / ".env", "API_KEY=TOP-SECRET-VALUE")
    _write(root / "pdf-forms" / ".git" / "config", "TOP-SECRET-VALUE")
    os.symlink(secret, root / "pdf-forms" / "references" / "linked.md")
    os.symlink(tmp_path, root / "pdf-forms" / "outside")
    return root


def _skills_server(folder) -> MCPServer:
    server = build_server()
    server.add_skills(str(folder))
    return server


def _read_bytes(contents: list) -> bytes:
    (item,) = contents
    return item["text"].encode("utf-8") if "text" in item else base64.b64decode(item["blob"])


class TestSkills:
    """SEP-2640: skills from a folder and from code, listed, got, read and verified."""

    def test_every_listed_file_reads_back_as_exactly_its_digest_and_size(self, skills_folder):
        server = _skills_server(skills_folder)

        async def check(client):
            skills = await client.list_skills()
            reads = {}
            for skill in skills:
                for file in skill["resources"]:
                    reads[file["uri"]] = (file, _read_bytes(await client.read_resource(file["uri"])))
            return skills, reads
        skills, reads = _with_client(server, check)
        assert [s["uri"] for s in skills] == ["skill://acme/billing/refunds/SKILL.md", "skill://pdf-forms/SKILL.md"]
        pdf = skills[1]
        assert {f["uri"] for f in pdf["resources"]} == {
            "skill://pdf-forms/SKILL.md", "skill://pdf-forms/references/FIELDS.md",
            "skill://pdf-forms/templates/invoice.md", "skill://pdf-forms/templates/regional/eu%20invoice.md",
            "skill://pdf-forms/assets/logo.png"}
        for uri, (file, data) in reads.items():
            assert file["digest"] == "sha256:" + hashlib.sha256(data).hexdigest(), uri
            assert file["size"] == len(data), uri
        assert reads["skill://pdf-forms/templates/invoice.md"][1] == b"# Invoice\r\nwith CRLF\r\n"
        assert reads["skill://pdf-forms/assets/logo.png"][1] == bytes(range(256)) * 3

    def test_frontmatter_passes_through_verbatim_as_json(self, skills_folder):
        server = _skills_server(skills_folder)
        entry = _with_client(server, lambda c: c.request("skills/get", {"uri": "skill://pdf-forms/SKILL.md"}))
        assert entry["skill"]["frontmatter"] == {
            "name": "pdf-forms", "description": "Fill PDF forms from the templates", "license": "Apache-2.0",
            "compatibility": "any", "metadata": {"version": "2.1", "owner": "docs-team", "retries": 3, "beta": True},
            "tags": ["pdf", "forms"]}
        assert "nextCursor" not in entry and "ttlMs" not in entry  # (cache hints: 2026-07-28 only)

    def test_links_dot_files_and_paths_out_of_the_skill_are_never_served(self, skills_folder):
        """A skill folder with a link to a file outside it, a .env and a .git directory: none is
        published (entry, listing, read), and no URI spelling reaches outside the snapshot."""
        server = _skills_server(skills_folder)

        async def check(client):
            listed = json.dumps(await client.list_skills()) + json.dumps(await client.list_resources())
            errors = []
            for uri in ("skill://pdf-forms/references/linked.md", "skill://pdf-forms/.env",
                        "skill://pdf-forms/.git/config", "skill://pdf-forms/outside/secret.txt",
                        "skill://pdf-forms/../secret.txt", "skill://pdf-forms/references/../../../secret.txt",
                        "skill://pdf-forms/%2e%2e/secret.txt", "skill://pdf-forms/SKILL.md/../.env"):
                with pytest.raises(RpcError) as caught:
                    await client.read_resource(uri)
                errors.append(caught.value.code)
            return listed, errors
        listed, errors = _with_client(server, check)
        assert "TOP-SECRET" not in listed and "linked" not in listed and ".env" not in listed
        assert "outside" not in listed and ".git" not in listed
        assert set(errors) == {-32002}  # (resource not found, the 2025-11-25 code)
        with pytest.raises(ValueError, match="dot-files"):
            server.add_skill("---\nname: sneaky\ndescription: d\n---\n", {"../../etc/passwd": "x"})
        with pytest.raises(ValueError, match="dot-files"):
            server.add_skill("---\nname: sneaky\ndescription: d\n---\n", {"a/.env": "x"})

    def test_skills_get_and_directory_read_answer_and_refuse_with_invalid_params(self, skills_folder):
        server = _skills_server(skills_folder)
        for era in (LEGACY, MODERN):
            for method, uri in (("skills/get", "skill://nope/SKILL.md"), ("skills/get", "skill://pdf-forms"),
                                ("resources/directory/read", "skill://pdf-forms/SKILL.md"),
                                ("resources/directory/read", "skill://nope")):
                error = _client_error(server, method, {"uri": uri}, era)
                assert error.code == -32602 and uri in error.message, (era, method, error.message)
            assert _client_error(server, "skills/get", {}, era).code == -32602

        async def check(client):
            return {uri: (await client.request("resources/directory/read", {"uri": uri}))["resources"]
                    for uri in ("skill://pdf-forms", "skill://pdf-forms/templates", "skill://acme",
                                "skill://acme/billing")}
        dirs = _with_client(server, check, MODERN)
        assert [(r["name"], r["mimeType"]) for r in dirs["skill://pdf-forms"]] == [
            ("SKILL.md", "text/markdown"), ("assets", "inode/directory"),
            ("references", "inode/directory"), ("templates", "inode/directory")]
        assert [r["uri"] for r in dirs["skill://pdf-forms/templates"]] == [
            "skill://pdf-forms/templates/invoice.md", "skill://pdf-forms/templates/regional"]
        assert [r["uri"] for r in dirs["skill://acme"]] == ["skill://acme/billing"]
        assert [r["uri"] for r in dirs["skill://acme/billing"]] == ["skill://acme/billing/refunds"]

    def test_frontmatter_a_yaml_parser_would_read_differently_is_refused_at_registration(self, tmp_path):
        server = build_server()
        for frontmatter, why in (
                ("name: a-b\ndescription: &x anchored", "anchors"),
                ("name: a-b\ndescription: d\ntags: [a, b]", "flow"),
                ("name: a-b\ndescription: |\n  block", "block scalars"),
                ("name: a-b\ndescription: d: e", "': '"),
                ("name: a-b\nname: c\ndescription: d", "duplicate key"),
                ("name: a-b", "'description'"),
                ("name: A_B\ndescription: d", "naming rules"),
                ("name: a--b\ndescription: d", "naming rules"),
                ("name: a-b\ndescription: 'it's'", "stray quote")):
            with pytest.raises(ValueError, match=re.escape(why)):
                server.add_skill(f"---\n{frontmatter}\n---\nbody\n")
        with pytest.raises(ValueError, match="must begin with YAML frontmatter"):
            server.add_skill("# no frontmatter\n")
        _write(tmp_path / "s" / "folder-name" / "SKILL.md", "---\nname: other-name\ndescription: d\n---\n")
        with pytest.raises(ValueError, match="must equal the frontmatter name"):
            server.add_skills(str(tmp_path / "s"))
        with pytest.raises(ValueError, match="512 files"):
            server.add_skill("---\nname: big\ndescription: d\n---\n", {f"f{i}.md": "x" for i in range(512)})
        with pytest.raises(ValueError, match="already served"):
            server.add_skill("---\nname: twice\ndescription: d\n---\n")
            server.add_skill("---\nname: twice\ndescription: d\n---\n")

    def test_skill_md_is_a_listed_resource_and_supporting_files_are_not(self, skills_folder):
        server = _skills_server(skills_folder)
        listed = {r["uri"]: r for r in _with_client(server, lambda c: c.list_resources())}
        assert listed["skill://pdf-forms/SKILL.md"] == {
            "uri": "skill://pdf-forms/SKILL.md", "name": "pdf-forms", "mimeType": "text/markdown",
            "description": "Fill PDF forms from the templates"}
        assert not [uri for uri in listed if uri.startswith("skill://") and not uri.endswith("/SKILL.md")]

    def test_listing_pages_with_signed_cursors_and_cache_hints_on_2026(self, skills_folder):
        server = MCPServer("paged", settings=Settings(page_size=1))
        server.add_skills(str(skills_folder))

        async def check(client):
            first = await client.request("skills/list")
            second = await client.request("skills/list", {"cursor": first["nextCursor"]})
            return first, second, await client.list_skills()
        first, second, walked = _with_client(server, check, MODERN)
        assert len(first["skills"]) == 1 and len(second["skills"]) == 1 and "nextCursor" not in second
        assert first["ttlMs"] >= 0 and first["cacheScope"] in ("public", "private")
        assert [s["uri"] for s in walked] == [first["skills"][0]["uri"], second["skills"][0]["uri"]]
        forged = first["nextCursor"][:-2] + ("AA" if not first["nextCursor"].endswith("AA") else "BB")
        assert _client_error(server, "skills/list", {"cursor": forged}, MODERN).code == -32602
        legacy = _with_client(server, lambda c: c.request("skills/list"))
        assert "ttlMs" not in legacy and "cacheScope" not in legacy

    def test_over_http_in_both_eras_and_not_for_an_older_revision(self, make_server, skills_folder):
        st = make_server(_skills_server(skills_folder))
        session = Session(st.port)
        session.initialize()
        assert session.init_result["capabilities"]["extensions"] == {
            "io.modelcontextprotocol/skills": {"directoryRead": True}}
        assert "resources" in session.init_result["capabilities"]
        legacy = session.request("skills/list")["result"]["skills"]
        modern = modern_post(st.port, "skills/list").json()["result"]
        assert modern["skills"] == legacy and modern["resultType"] == "complete"
        old = Session(st.port, version="2025-06-18")
        old.initialize()
        assert "extensions" not in old.init_result["capabilities"]
        assert old.request("skills/list")["error"]["code"] == -32601

    def test_the_built_in_server_serves_skills_for_its_own_tools(self):
        server = mcp_server._builtin_server(Settings())

        async def check(client):
            skills = {s["frontmatter"]["name"]: s for s in await client.list_skills()}
            texts = {name: (await client.read_resource(s["uri"]))[0]["text"] for name, s in skills.items()}
            return skills, texts, {t["name"] for t in await client.list_tools()}
        skills, texts, tools = _with_client(server, check)
        assert set(skills) == {"upstream-login", "account-tools"}
        mentioned = set(re.findall(r"`([a-z_]+)`", texts["account-tools"] + texts["upstream-login"]))
        assert {"login", "logout", "profile", "holdings", "orders", "service", "server_info"} <= tools
        assert mentioned & tools >= {"login", "logout", "profile", "holdings", "orders", "service", "server_info"}
        assert "pairing code" in texts["upstream-login"] and "masked" in texts["account-tools"]


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _host_page(app_html: str, tool_result: dict, next_result: dict) -> str:
    """A minimal MCP Apps host: renders the view in a sandboxed iframe, answers ui/initialize,
    sends the tool result, answers the view's tools/call, and writes what it saw into its page."""
    import html as html_lib
    return f"""<!DOCTYPE html><html><body><pre id="log"></pre>
<iframe id="view" sandbox="allow-scripts allow-same-origin" srcdoc="{html_lib.escape(app_html, quote=True)}"></iframe>
<script>
const log = document.getElementById("log"), view = document.getElementById("view");
const toolResult = {json.dumps(tool_result)}, nextResult = {json.dumps(next_result)};
window.addEventListener("message", (e) => {{
  const m = e.data;
  log.textContent += m.method + (m.method === "tools/call" ? " " + JSON.stringify(m.params) : "") + "\\n";
  const reply = (r) => view.contentWindow.postMessage({{jsonrpc: "2.0", id: m.id, result: r}}, "*");
  if (m.method === "ui/initialize") reply({{protocolVersion: "2026-01-26", hostInfo: {{name: "pytest-host",
      version: "1"}}, hostCapabilities: {{serverTools: {{}}}}, hostContext: {{theme: "dark"}}}});
  else if (m.method === "ui/notifications/initialized") view.contentWindow.postMessage(
      {{jsonrpc: "2.0", method: "ui/notifications/tool-result", params: toolResult}}, "*");
  else if (m.method === "tools/call") reply(nextResult);
  else if (m.method === "ui/notifications/size-changed") {{
    const d = view.contentDocument;
    log.textContent += "shown " + d.body.dataset.state + " " + d.getElementById("count").textContent + "\\n";
    if (!window.clicked) {{ window.clicked = true; d.getElementById("increment").click(); }}
  }}
}});
</script></body></html>"""


def _chromium_dom(path) -> str:
    profile = tempfile.mkdtemp(prefix="mcp-test-chromium-")
    try:
        run = subprocess.run([_CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                              "--no-first-run", "--disable-background-networking", "--disable-component-update",
                              "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=5000",
                              "--dump-dom", f"file://{path}"],
                             capture_output=True, text=True, timeout=WAIT * 6, stdin=subprocess.DEVNULL)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


class TestApps:
    """MCP Apps: ui:// resources with the app profile, tools pointing at them, the extension
    declared when a server registers one; the example app runs in a real browser."""

    def test_the_example_app_is_advertised_linked_and_served(self):
        server = _load_example("apps_server").server

        async def check(client):
            return (await client.request("server/discover"), await client.list_tools(),
                    await client.list_resources(), await client.read_resource("ui://counter/view"),
                    await client.call_tool("show_counter", {"start": 5}))
        discover, tools, resources, contents, result = _with_client(server, check, MODERN)
        assert discover["capabilities"]["extensions"][mcp_server.APPS_EXTENSION] == {
            "mimeTypes": ["text/html;profile=mcp-app"]}
        meta = {t["name"]: t["_meta"]["ui"] for t in tools}
        assert meta == {"show_counter": {"resourceUri": "ui://counter/view"},
                        "increment": {"resourceUri": "ui://counter/view", "visibility": ["app"]}}
        (listed,) = [r for r in resources if r["uri"] == "ui://counter/view"]
        assert listed["mimeType"] == "text/html;profile=mcp-app" and listed["_meta"] == {"ui": {"prefersBorder": True}}
        (content,) = contents
        assert content["mimeType"] == "text/html;profile=mcp-app" and content["text"].startswith("<!DOCTYPE html>")
        assert content["_meta"] == {"ui": {"prefersBorder": True}}
        assert result["structuredContent"] == {"count": 5} and result["content"][0]["type"] == "text"

    def test_no_app_no_extension_and_an_app_is_a_fixed_ui_uri_returning_html(self):
        server = build_server()
        init = core_result(server, "initialize", {"protocolVersion": LEGACY, "capabilities": {}})
        assert mcp_server.APPS_EXTENSION not in init["capabilities"].get("extensions", {})
        for uri in ("https://example.com/app", "ui://apps/{id}", "file:///etc/passwd"):
            with pytest.raises(ValueError, match="ui://"):
                server.app(uri)(lambda: "<html></html>")

        @server.app("ui://bad/view")
        def bad() -> dict:
            return {"not": "html"}
        error = _client_error(server, "resources/read", {"uri": "ui://bad/view"})
        assert error.code == -32603 and "must return its HTML" in error.message
        init = core_result(server, "initialize", {"protocolVersion": LEGACY, "capabilities": {}})
        assert init["capabilities"]["extensions"][mcp_server.APPS_EXTENSION]["mimeTypes"] == [mcp_server.APP_MIME_TYPE]

    @pytest.mark.skipif(_CHROMIUM is None, reason="needs chromium on PATH (apt-get install chromium) for the "
                                                  "headless browser check of the example MCP App")
    def test_the_counter_app_renders_and_calls_its_tool_in_headless_chromium(self, tmp_path):
        server = _load_example("apps_server").server

        async def check(client):
            html = (await client.read_resource("ui://counter/view"))[0]["text"]
            return html, await client.call_tool("show_counter", {"start": 41}), await client.call_tool(
                "increment", {"count": 41})
        html, first, second = _with_client(server, check)
        (tmp_path / "app.html").write_text(html, encoding="utf-8")
        (tmp_path / "host.html").write_text(_host_page(html, first, second), encoding="utf-8")
        hosted = _chromium_dom(tmp_path / "host.html")
        log = re.search(r'<pre id="log">(.*?)</pre>', hosted, re.S).group(1)
        assert log.splitlines() == [
            "ui/initialize", "ui/notifications/initialized", "ui/notifications/size-changed", "shown ready 41",
            'tools/call {"name":"increment","arguments":{"count":41}}',
            "ui/notifications/size-changed", "shown ready 42"], log
        alone = _chromium_dom(tmp_path / "app.html")  # no host: the page says so
        assert 'data-state="no-host"' in alone and "No MCP host" in alone


class TestTestClient:
    """``server.test_client()``: the real dispatch in-process, both eras, client handlers."""

    def test_every_helper_on_both_eras(self):
        server = build_server()

        @server.completion("ref/prompt", "greeting")
        def styles(argument, value, context):
            return [s for s in ("plain", "pirate") if s.startswith(value)]

        async def check(client):
            return ({t["name"] for t in await client.list_tools()}, await client.call_tool("add", {"a": 2, "b": 5}),
                    [r["uri"] for r in await client.list_resources()], await client.read_resource("test://items/7"),
                    [p["name"] for p in await client.list_prompts()],
                    await client.get_prompt("greeting", {"name": "Ada"}),
                    await client.complete({"type": "ref/prompt", "name": "greeting"}, "style", "pi"),
                    [t["uriTemplate"] for t in await client.list_resource_templates()])
        for era in (LEGACY, MODERN):
            tools, added, resources, item, prompts, prompt, completion, templates = _with_client(server, check, era)
            assert {"echo", "add", "ask_name"} <= tools
            assert added["structuredContent"] == {"sum": 7} and not added.get("isError"), added
            assert "test://static" in resources and templates == ["test://items/{id}"]
            assert item[0]["uri"] == "test://items/7"
            assert "greeting" in prompts and prompt["messages"][0]["role"] == "user"
            assert completion["values"] == ["pirate"]

    def test_elicitation_sampling_and_roots_handlers_answer_the_server_in_both_eras(self):
        server = build_server()

        @server.tool()
        async def consult(ctx: Context) -> str:
            roots = await ctx.list_roots(key="roots")
            sampled = await ctx.sample("Say hi", key="sample")
            return f"{roots[0]['uri']} {sampled['content']['text']}"
        asked = []

        def elicitation(params):
            asked.append(params["message"])
            return {"action": "accept", "content": {"name": "Ada"}}

        async def sampling(params):
            return {"role": "assistant", "model": "test", "content": {"type": "text", "text": "hi"}}
        for era in (LEGACY, MODERN):
            async def check(client):
                return await client.call_tool("ask_name"), await client.call_tool("consult")
            named, consulted = _with_client(server, check, era, elicitation=elicitation, sampling=sampling,
                                            roots=[{"uri": "file:///work", "name": "work"}])
            assert named["content"] == [{"type": "text", "text": "Hello, Ada!"}], (era, named)
            assert consulted["content"] == [{"type": "text", "text": "file:///work hi"}], (era, consulted)
        assert asked == ["What is your name?", "What is your name?"]
        declined = _with_client(server, lambda c: c.call_tool("ask_name"), MODERN,
                                elicitation=lambda p: {"action": "decline"})
        assert declined["content"] == [{"type": "text", "text": "no name (decline)"}]
        without = _with_client(server, lambda c: c.call_tool("ask_name"))  # no handler: no capability
        assert without["isError"] and "elicitation" in without["content"][0]["text"]

    def test_errors_notifications_and_middleware_go_through_the_real_dispatch(self):
        server = build_server()
        seen = []

        async def hook(ctx, call_next):
            seen.append(ctx.method)
            return await call_next()
        server.add_middleware(hook)

        async def check(client):
            with pytest.raises(RpcError) as unknown:
                await client.call_tool("no_such_tool")
            refused = await client.call_tool("add", {"a": "two"})
            await client.request("logging/setLevel", {"level": "debug"})
            done = await client.request("tools/call", {"name": "progress", "arguments": {"steps": 2},
                                                       "_meta": {"progressToken": "p1"}})
            return unknown.value, refused, done, list(client.notifications)
        unknown, refused, done, notes = _with_client(server, check)
        assert unknown.code == -32602 and "no_such_tool" in unknown.message
        assert refused["isError"] and "arguments.a" in refused["content"][0]["text"]
        assert done["content"] == [{"type": "text", "text": "progress done"}]
        assert [n["params"]["progress"] for n in notes if n["method"] == "notifications/progress"] == [1, 2]
        assert seen[:2] == ["initialize", "notifications/initialized"] and "tools/call" in seen
        assert server._live_runtime is None or not server._live_runtime.started  # no listener, no runtime running
        with pytest.raises(ValueError, match="era"):
            server.test_client("1999-01-01")


# ==== 7. OAuth and login =====================================================================

# =================================================================================================
# 7. OAuth and login
# =================================================================================================

import html as _auth_html  # noqa: E402
import http.cookiejar as _login_cookiejar  # noqa: E402  (never rebind the suite's ``http`` helper)
import http.server as _auth_httpserver  # noqa: E402
import secrets  # noqa: E402
import urllib.error  # noqa: E402
import urllib.parse  # noqa: E402
import urllib.request  # noqa: E402

_AUTH_CB = "http://127.0.0.1:9/cb"  # a native client's loopback redirect (never contacted)


def _auth_b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _auth_pkce() -> tuple:
    verifier = secrets.token_urlsafe(48)
    return verifier, _auth_b64url(hashlib.sha256(verifier.encode()).digest())


def _auth_base(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def _auth_headers(port: int, extra: dict | None = None) -> dict:
    """What a client sends: a real Host (the issuer and audience derive from it)."""
    return merge_headers({"Host": f"127.0.0.1:{port}"}, extra)


def _auth_get(port: int, path_or_url: str, headers: dict | None = None) -> Response:
    if path_or_url.startswith("http"):
        parts = urllib.parse.urlsplit(path_or_url)
        assert parts.netloc == f"127.0.0.1:{port}", f"{path_or_url} is not on this server"
        path_or_url = parts.path + (f"?{parts.query}" if parts.query else "")
    return http(port, "GET", path_or_url, _auth_headers(port, headers))


def _auth_post_form(port: int, path: str, fields: dict, headers: dict | None = None) -> Response:
    body = urllib.parse.urlencode({k: v for k, v in fields.items() if v is not None})
    return http(port, "POST", path, _auth_headers(port, {"Content-Type": "application/x-www-form-urlencoded",
                                                         **(headers or {})}), body)


def _auth_post_json(port: int, path: str, body, headers: dict | None = None) -> Response:
    return http(port, "POST", path, _auth_headers(port, headers), body)


def _auth_cookies(resp: Response) -> dict:
    """name -> value of the Set-Cookie headers of a response."""
    cookies = {}
    for name, value in resp.headers:
        if name == "set-cookie":
            pair = value.split(";", 1)[0]
            key, _, val = pair.partition("=")
            cookies[key.strip()] = val.strip()
    return cookies


def _auth_location(resp: Response, expected_target: str) -> dict:
    """The query parameters of a redirect to ``expected_target`` (scheme, host, port and path)."""
    assert resp.status == 302, resp
    location = resp.header("location")
    parts, target = urllib.parse.urlsplit(location), urllib.parse.urlsplit(expected_target)
    assert (parts.scheme, parts.netloc, parts.path) == (target.scheme, target.netloc, target.path), location
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    assert all(len(v) == 1 for v in query.values()), location
    return {k: v[0] for k, v in query.items()}


def _auth_assert_page(resp: Response, status: int = 400) -> str:
    """An HTML page (never a redirect) with the headers every page of the server carries."""
    assert resp.status == status, resp
    assert resp.header("location") is None, resp
    assert resp.content_type == "text/html", resp
    _auth_assert_page_headers(resp)
    return resp.body.decode("utf-8")


def _auth_assert_page_headers(resp) -> None:
    csp = resp.header("content-security-policy") or ""
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp, resp
    assert resp.header("x-frame-options") == "DENY", resp
    assert "no-store" in (resp.header("cache-control") or ""), resp
    assert resp.header("referrer-policy") == "same-origin", resp


def _auth_hidden_fields(page: str) -> dict:
    fields = re.findall(r"<input type=hidden name=['\"]?([\w-]+)['\"]? value=['\"]([^'\"]*)['\"]", page)
    return {name: _auth_html.unescape(value) for name, value in fields}


def _auth_register(port: int, redirect_uris=(_AUTH_CB,), **metadata) -> dict:
    r = _auth_post_json(port, "/register", {"redirect_uris": list(redirect_uris), "client_name": "Pytest Client",
                                            **metadata})
    assert r.status == 201, r
    return r.json()


def _auth_authorize(port: int, client_id: str, redirect_uri: str | None, challenge: str | None,
                    method: str | None = "S256", headers: dict | None = None, **extra) -> Response:
    params = {"response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri,
              "code_challenge": challenge, "code_challenge_method": method, **extra}
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    return _auth_get(port, "/authorize?" + query, headers)


def _auth_exchange(port: int, client_id: str, code: str, verifier: str, redirect_uri: str = _AUTH_CB,
                   headers: dict | None = None, **extra) -> Response:
    return _auth_post_form(port, "/token", {"grant_type": "authorization_code", "code": code,
                                            "redirect_uri": redirect_uri, "code_verifier": verifier,
                                            "client_id": client_id, **extra}, headers)


def _auth_refresh(port: int, client_id: str, refresh_token: str) -> Response:
    return _auth_post_form(port, "/token", {"grant_type": "refresh_token", "refresh_token": refresh_token,
                                            "client_id": client_id})


def _auth_code(port: int, client: dict, redirect_uri: str = _AUTH_CB, **extra) -> tuple:
    """(code, verifier) from an /authorize that needs no consent."""
    verifier, challenge = _auth_pkce()
    state = secrets.token_urlsafe(8)
    r = _auth_authorize(port, client["client_id"], redirect_uri, challenge, state=state, **extra)
    query = _auth_location(r, redirect_uri)
    assert query["state"] == state and query["iss"] == _auth_base(port), query
    return query["code"], verifier


def _auth_login(port: int, client: dict | None = None, redirect_uri: str = _AUTH_CB) -> dict:
    """Register (unless given a client), authorize and exchange the code: the token response."""
    client = client or _auth_register(port, [redirect_uri])
    code, verifier = _auth_code(port, client, redirect_uri)
    r = _auth_exchange(port, client["client_id"], code, verifier, redirect_uri)
    assert r.status == 200, r
    return {**r.json(), "client": client, "code": code, "verifier": verifier}


def _auth_claims(token: str) -> dict:
    import jwt
    return jwt.decode(token, options={"verify_signature": False})


def _auth_mint(key, claims: dict, **changes) -> str:
    import jwt
    now = int(time.time())
    claims = {**claims, "jti": secrets.token_urlsafe(12), "iat": now, "nbf": now, **changes}
    return jwt.encode(claims, key, algorithm="HS256", headers={"typ": "at+jwt"})


def _auth_call(port: int, token: str | None, name: str = "echo", arguments: dict | None = None) -> Response:
    """A tools/call on /http as a client holding ``token``."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return _auth_post_json(port, "/http", {"method": "tools/call",
                                           "params": {"name": name, "arguments": arguments or {"text": "hi"}}},
                           headers)


def _auth_assert_ok(port: int, token: str) -> None:
    r = _auth_call(port, token, "echo", {"text": "authorized"})
    assert r.status == 200, r
    assert r.json()["content"] == [{"type": "text", "text": "authorized"}]


def _auth_assert_refused(port: int, token: str | None, error: str | None = "invalid_token",
                         tool: str = "echo") -> None:
    r = _auth_call(port, token, tool)
    assert r.status == 401, r
    challenge = r.header("www-authenticate") or ""
    assert challenge.startswith("Bearer ") and "resource_metadata=" in challenge, r
    if error:
        assert f'error="{error}"' in challenge, r


class _auth_Session(Session):
    """A legacy Streamable HTTP session that sends a real Host and, when given, a bearer token."""

    def __init__(self, port: int, token: str | None = None, **kwargs):
        super().__init__(port, **kwargs)
        self.token = token

    def headers(self, extra: dict | None = None) -> dict:
        base = {"Host": f"127.0.0.1:{self.port}"}
        if self.token:
            base["Authorization"] = f"Bearer {self.token}"
        return super().headers(merge_headers(base, extra))


class _auth_Stub:
    """A tiny HTTP server on 127.0.0.1 in a thread: ``routes`` maps (method, path) to a function of
    the recorded request returning (status, headers, body); every request is recorded."""

    def __init__(self, routes: dict | None = None):
        self.routes = dict(routes or {})
        self.requests: list = []

    def __enter__(self) -> "_auth_Stub":
        stub = self

        class Handler(_auth_httpserver.BaseHTTPRequestHandler):
            def _serve(self):
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                path, _, query = self.path.partition("?")
                request = {"method": self.command, "path": path, "query": query,
                           "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body}
                stub.requests.append(request)
                route = stub.routes.get((self.command, path))
                status, headers, payload = route(request) if route else (404, {}, b"not found")
                headers = dict(headers)
                if isinstance(payload, (dict, list)):
                    payload = json.dumps(payload).encode()
                    headers.setdefault("Content-Type", "application/json")
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _serve

            def log_message(self, *args):
                pass

        self.httpd = _auth_httpserver.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="test-stub", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(WAIT)

    def hits(self, path: str) -> list:
        return [r for r in self.requests if r["path"] == path]


def _auth_closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _auth_SharedStore(mcp_server.Store):
    """Another instance's view of one shared store (as with Redis): not a MemoryStore, so the
    server takes its shared-store paths; pub/sub stays local to the instance."""

    name = "shared"

    def __init__(self, inner: MemoryStore):
        self.inner = inner
        for method in ("get", "get_refreshed", "set", "add", "delete", "pop", "incr", "append", "read_after",
                       "delete_log"):
            setattr(self, method, getattr(inner, method))

    async def publish(self, channel, message):
        pass

    def subscribe(self, channel, callback):
        return lambda: None

    async def ping(self):
        return True

    async def close(self):
        pass


class TestOAuth:
    """The built-in authorization server and the bearer checks, as an OAuth client sees them."""

    @pytest.fixture
    def oauth(self, make_server):
        """A protected server that approves without a consent page; no rate limit in the way."""
        return make_server(auth="builtin", consent="never", auth_rate_limit=0)

    # -- discovery ---------------------------------------------------------------------------------

    def test_discovery_starts_from_the_401_challenge(self, oauth):
        port, base = oauth.port, _auth_base(oauth.port)
        r = _auth_Session(port).post({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                                      "params": {"protocolVersion": LEGACY, "capabilities": {}}})
        assert r.status == 401 and r.header("mcp-session-id") is None, r
        challenge = r.header("www-authenticate")
        match = re.fullmatch(r'Bearer resource_metadata="([^"]+)", scope="([^"]*)"', challenge)
        assert match, challenge
        assert match.group(2) == "mcp"
        prm_url = match.group(1)
        assert prm_url == base + "/.well-known/oauth-protected-resource/mcp"
        prm = _auth_get(port, prm_url)
        assert prm.status == 200, prm
        metadata = prm.json()
        assert metadata["resource"] == base + "/mcp"
        assert metadata["bearer_methods_supported"] == ["header"]
        assert "mcp" in metadata["scopes_supported"]
        assert _auth_get(port, "/.well-known/oauth-protected-resource").json() == metadata  # root form too
        issuer = metadata["authorization_servers"][0]
        assert issuer == base
        # RFC 8414: the well-known segment goes between the origin and the issuer's path
        parts = urllib.parse.urlsplit(issuer)
        as_meta = _auth_get(port, f"{parts.scheme}://{parts.netloc}/.well-known/oauth-authorization-server"
                                  f"{parts.path}")
        assert as_meta.status == 200, as_meta
        meta = as_meta.json()
        assert meta["issuer"] == issuer
        assert meta["code_challenge_methods_supported"] == ["S256"]
        assert meta["authorization_response_iss_parameter_supported"] is True
        assert meta["client_id_metadata_document_supported"] is True
        assert meta["response_types_supported"] == ["code"]
        assert {"authorization_code", "refresh_token"} <= set(meta["grant_types_supported"])
        for field, path in (("authorization_endpoint", "/authorize"), ("token_endpoint", "/token"),
                            ("registration_endpoint", "/register"), ("revocation_endpoint", "/revoke")):
            assert meta[field] == issuer + path
        oidc = _auth_get(port, "/.well-known/openid-configuration")
        assert oidc.status == 200 and oidc.json()["issuer"] == issuer

    # -- registration ------------------------------------------------------------------------------

    def test_registration_returns_201_with_a_client_id(self, oauth):
        r = _auth_post_json(oauth.port, "/register", {"redirect_uris": [_AUTH_CB, "https://app.example.com/cb",
                                                                          "com.example.app:/oauth"],
                                                      "client_name": "Pytest Client"})
        assert r.status == 201, r
        assert "no-store" in r.header("cache-control")
        body = r.json()
        assert body["client_id"] and body["token_endpoint_auth_method"] == "none"
        assert "client_secret" not in body
        assert body["redirect_uris"] == [_AUTH_CB, "https://app.example.com/cb", "com.example.app:/oauth"]

    @pytest.mark.parametrize("uri", [
        "http://app.example.com/cb",          # plain http off loopback
        "javascript:alert(1)",                # script scheme
        "https://app.example.com/cb#frag",    # fragment
        "data:text/html,hi",
        "/relative/cb",
    ])
    def test_registration_refuses_unsafe_redirect_uris(self, oauth, uri):
        r = _auth_post_json(oauth.port, "/register", {"redirect_uris": [_AUTH_CB, uri]})
        assert r.status == 400, r
        assert r.json()["error"] == "invalid_redirect_uri"

    @pytest.mark.parametrize("body", [[], {"redirect_uris": []}, {"redirect_uris": "https://a.example/cb"},
                                      {"redirect_uris": [_AUTH_CB], "token_endpoint_auth_method": "private_key_jwt"},
                                      {"redirect_uris": [_AUTH_CB], "grant_types": ["password"]}])
    def test_registration_refuses_bad_metadata(self, oauth, body):
        r = _auth_post_json(oauth.port, "/register", body)
        assert r.status == 400, r
        assert r.json()["error"] in ("invalid_client_metadata", "invalid_redirect_uri")

    # -- the code flow -------------------------------------------------------------------------------

    def test_code_flow_issues_a_bound_jwt_that_opens_mcp_and_http(self, oauth):
        import jwt
        port, base = oauth.port, _auth_base(oauth.port)
        client = _auth_register(port)
        code, verifier = _auth_code(port, client)
        r = _auth_exchange(port, client["client_id"], code, verifier)
        assert r.status == 200, r
        assert "no-store" in r.header("cache-control")
        tokens = r.json()
        assert tokens["token_type"] == "Bearer" and tokens["expires_in"] > 0 and tokens["refresh_token"]
        header = jwt.get_unverified_header(tokens["access_token"])
        assert header["alg"] == "HS256" and header["typ"] == "at+jwt"
        claims = _auth_claims(tokens["access_token"])
        assert claims["iss"] == base and claims["aud"] == base + "/mcp"
        assert claims["sub"] and claims["sid"] and claims["jti"]
        assert claims["exp"] > claims["iat"]
        assert claims["scope"] == "mcp" and claims["client_id"] == client["client_id"]
        # the token opens /mcp (a legacy session) and /http
        s = _auth_Session(port, tokens["access_token"])
        s.initialize()
        assert s.sid
        assert s.call("echo", {"text": "via mcp"})["content"] == [{"type": "text", "text": "via mcp"}]
        _auth_assert_ok(port, tokens["access_token"])
        # and nothing works without it
        _auth_assert_refused(port, None, error=None)

    def test_consent_page_form_with_csrf_cookie_approves(self, make_server):
        st = make_server(auth="builtin", consent="always", auth_rate_limit=0)
        port = st.port
        client = _auth_register(port)
        verifier, challenge = _auth_pkce()
        r = _auth_authorize(port, client["client_id"], _AUTH_CB, challenge, state="s-1")
        page = _auth_assert_page(r, 200)
        assert "Pytest Client" in page and "test-server" in page and "loopback" in page
        fields = _auth_hidden_fields(page)
        assert set(fields) == {"request", "csrf"}
        cookies = _auth_cookies(r)
        assert cookies["mcp_csrf"] == fields["csrf"]
        assert "HttpOnly" in r.header("set-cookie") and "SameSite=Strict" in r.header("set-cookie")
        answer = _auth_post_form(port, "/authorize", {**fields, "decision": "approve"},
                                 {"Cookie": f"mcp_csrf={cookies['mcp_csrf']}", "Origin": _auth_base(port)})
        query = _auth_location(answer, _AUTH_CB)
        assert query["state"] == "s-1" and query["iss"] == _auth_base(port)
        assert "mcp_browser" not in _auth_cookies(answer)  # no signed session id left in the browser
        t = _auth_exchange(port, client["client_id"], query["code"], verifier)
        assert t.status == 200, t
        _auth_assert_ok(port, t.json()["access_token"])

    @pytest.mark.parametrize("case", ["no cookie", "wrong cookie", "wrong field", "no request", "forged request"])
    def test_consent_post_without_matching_csrf_is_an_error_page(self, make_server, case):
        st = make_server(auth="builtin", consent="always", auth_rate_limit=0)
        port = st.port
        client = _auth_register(port)
        _verifier, challenge = _auth_pkce()
        r = _auth_authorize(port, client["client_id"], _AUTH_CB, challenge)
        fields = {**_auth_hidden_fields(r.body.decode()), "decision": "approve"}
        cookie = f"mcp_csrf={fields['csrf']}"
        if case == "no cookie":
            cookie = None
        elif case == "wrong cookie":
            cookie = "mcp_csrf=" + secrets.token_urlsafe(24)
        elif case == "wrong field":
            fields["csrf"] = secrets.token_urlsafe(24)
            cookie = f"mcp_csrf={fields['csrf']}"
        elif case == "no request":
            del fields["request"]
        else:
            fields["request"] = flip(fields["request"], 20)
        answer = _auth_post_form(port, "/authorize", fields, {"Cookie": cookie})
        page = _auth_assert_page(answer, 400)
        assert "expired" in page

    def test_consent_deny_redirects_with_access_denied_and_iss(self, make_server):
        st = make_server(auth="builtin", consent="always", auth_rate_limit=0)
        port = st.port
        client = _auth_register(port)
        _verifier, challenge = _auth_pkce()
        r = _auth_authorize(port, client["client_id"], _AUTH_CB, challenge, state="deny-me")
        fields = _auth_hidden_fields(r.body.decode())
        answer = _auth_post_form(port, "/authorize", {**fields, "decision": "deny"},
                                 {"Cookie": f"mcp_csrf={fields['csrf']}"})
        query = _auth_location(answer, _AUTH_CB)
        assert query["error"] == "access_denied" and query["state"] == "deny-me"
        assert query["iss"] == _auth_base(port) and "code" not in query

    def test_consent_remember_skips_the_page_for_an_approved_client(self, make_server):
        st = make_server(auth="builtin", consent="remember", auth_rate_limit=0)
        port = st.port
        client = _auth_register(port)
        _verifier, challenge = _auth_pkce()
        first = _auth_authorize(port, client["client_id"], _AUTH_CB, challenge)
        fields = _auth_hidden_fields(first.body.decode())
        answer = _auth_post_form(port, "/authorize", {**fields, "decision": "approve"},
                                 {"Cookie": f"mcp_csrf={fields['csrf']}"})
        remembered = _auth_cookies(answer)["mcp_consent"]
        again = _auth_authorize(port, client["client_id"], _AUTH_CB, challenge,
                                headers={"Cookie": f"mcp_consent={remembered}"})
        assert "code" in _auth_location(again, _AUTH_CB)
        other = _auth_register(port)
        page = _auth_authorize(port, other["client_id"], _AUTH_CB, challenge,
                               headers={"Cookie": f"mcp_consent={remembered}"})
        _auth_assert_page(page, 200)  # another client still asks
        forged = _auth_authorize(port, other["client_id"], _AUTH_CB, challenge,
                                 headers={"Cookie": f"mcp_consent={flip(remembered)}"})
        _auth_assert_page(forged, 200)

    # -- refresh and revocation ----------------------------------------------------------------------

    def test_refresh_rotates_and_keeps_the_mcp_session(self, oauth):
        port = oauth.port
        first = _auth_login(port)
        client_id = first["client"]["client_id"]
        s = _auth_Session(port, first["access_token"])
        s.initialize()
        r = _auth_refresh(port, client_id, first["refresh_token"])
        assert r.status == 200, r
        assert "no-store" in r.header("cache-control")
        second = r.json()
        assert second["refresh_token"] != first["refresh_token"]
        assert second["access_token"] != first["access_token"]
        assert _auth_claims(second["access_token"])["sid"] == _auth_claims(first["access_token"])["sid"]
        s.token = second["access_token"]  # same grant: the legacy session stays the caller's
        assert s.call("echo", {"text": "refreshed"})["content"][0]["text"] == "refreshed"
        _auth_assert_ok(port, second["access_token"])

    def test_refresh_grace_for_the_just_rotated_token(self, oauth):
        port = oauth.port
        first = _auth_login(port)
        client_id = first["client"]["client_id"]
        lost = _auth_refresh(port, client_id, first["refresh_token"])  # the client never saw this answer
        assert lost.status == 200, lost
        retry = _auth_refresh(port, client_id, first["refresh_token"])
        assert retry.status == 200, retry
        current = retry.json()
        # (presenting the lost answer's token now would be reuse and revoke the family: see
        # test_replacement_superseded_by_a_retry_is_detected_as_reuse)
        nxt = _auth_refresh(port, client_id, current["refresh_token"])
        assert nxt.status == 200, nxt
        _auth_assert_ok(port, nxt.json()["access_token"])

    def test_reuse_of_an_older_refresh_token_revokes_the_family(self, oauth):
        port = oauth.port
        first = _auth_login(port)
        client_id = first["client"]["client_id"]
        second = _auth_refresh(port, client_id, first["refresh_token"]).json()
        third = _auth_refresh(port, client_id, second["refresh_token"]).json()
        _auth_assert_ok(port, third["access_token"])
        stolen = _auth_refresh(port, client_id, first["refresh_token"])  # two generations old
        assert stolen.status == 400 and stolen.json()["error"] == "invalid_grant", stolen
        for token in (third["refresh_token"], second["refresh_token"]):
            again = _auth_refresh(port, client_id, token)
            assert again.status == 400 and again.json()["error"] == "invalid_grant", again
        _auth_assert_refused(port, third["access_token"])
        _auth_assert_refused(port, first["access_token"])

    def test_refresh_token_of_another_client_is_refused(self, oauth):
        port = oauth.port
        first = _auth_login(port)
        other = _auth_register(port)
        r = _auth_refresh(port, other["client_id"], first["refresh_token"])
        assert r.status == 400 and r.json()["error"] == "invalid_grant"
        assert _auth_refresh(port, first["client"]["client_id"], first["refresh_token"]).status == 200

    def test_revoking_the_access_token_ends_it(self, oauth):
        port = oauth.port
        first = _auth_login(port)
        _auth_assert_ok(port, first["access_token"])
        r = _auth_post_form(port, "/revoke", {"token": first["access_token"],
                                              "client_id": first["client"]["client_id"]})
        assert r.status == 200, r
        _auth_assert_refused(port, first["access_token"])
        # the grant itself lives on: a refresh gives a working token
        fresh = _auth_refresh(port, first["client"]["client_id"], first["refresh_token"])
        assert fresh.status == 200, fresh
        _auth_assert_ok(port, fresh.json()["access_token"])

    def test_revoking_the_refresh_token_ends_the_grant(self, oauth):
        port = oauth.port
        first = _auth_login(port)
        client_id = first["client"]["client_id"]
        r = _auth_post_form(port, "/revoke", {"token": first["refresh_token"], "client_id": client_id,
                                              "token_type_hint": "refresh_token"})
        assert r.status == 200, r
        again = _auth_refresh(port, client_id, first["refresh_token"])
        assert again.status == 400 and again.json()["error"] == "invalid_grant"
        _auth_assert_refused(port, first["access_token"])  # RFC 7009 2.1: its access tokens go too

    def test_revoking_an_unknown_token_is_200(self, oauth):
        port = oauth.port
        client = _auth_register(port)
        r = _auth_post_form(port, "/revoke", {"token": "not-a-token", "client_id": client["client_id"]})
        assert r.status == 200, r

    # -- confidential clients --------------------------------------------------------------------------

    @pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
    def test_confidential_client_authenticates_at_the_token_endpoint(self, oauth, method):
        port = oauth.port
        client = _auth_register(port, token_endpoint_auth_method=method)
        assert client["client_secret"] and client["token_endpoint_auth_method"] == method
        client_id, secret = client["client_id"], client["client_secret"]

        def credentials(the_secret):
            if method == "client_secret_basic":
                pair = f"{urllib.parse.quote(client_id, safe='')}:{urllib.parse.quote(the_secret, safe='')}"
                return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}, {}
            return {}, {"client_secret": the_secret}

        code, verifier = _auth_code(port, client)
        headers, extra = credentials(secret[:-1] + ("A" if secret[-1] != "A" else "B"))
        wrong = _auth_exchange(port, client_id, code, verifier, headers=headers, **extra)
        assert wrong.status == 401 and wrong.json()["error"] == "invalid_client", wrong
        assert "no-store" in wrong.header("cache-control")
        missing = _auth_exchange(port, client_id, code, verifier)
        assert missing.status == 401 and missing.json()["error"] == "invalid_client", missing
        headers, extra = credentials(secret)
        ok = _auth_exchange(port, client_id, code, verifier, headers=headers, **extra)
        assert ok.status == 200, ok
        tokens = ok.json()
        _auth_assert_ok(port, tokens["access_token"])
        refreshed = _auth_post_form(port, "/token", {"grant_type": "refresh_token", "client_id": client_id,
                                                     "refresh_token": tokens["refresh_token"], **extra}, headers)
        assert refreshed.status == 200, refreshed
        unauth = _auth_refresh(port, client_id, refreshed.json()["refresh_token"])
        assert unauth.status == 401 and unauth.json()["error"] == "invalid_client"

    # -- attacks on /authorize and /token ----------------------------------------------------------------

    @pytest.mark.parametrize("challenge, method", [(None, None), ("from-verifier", None),
                                                   ("from-verifier", "plain"), ("short", "S256")])
    def test_authorize_without_s256_pkce_redirects_invalid_request(self, oauth, challenge, method):
        port = oauth.port
        client = _auth_register(port)
        verifier, s256 = _auth_pkce()
        challenge = {"from-verifier": verifier[:43], "short": "abc"}.get(challenge, challenge)
        r = _auth_authorize(port, client["client_id"], _AUTH_CB, challenge, method=method, state="pk")
        query = _auth_location(r, _AUTH_CB)
        assert query["error"] == "invalid_request" and query["state"] == "pk" and "code" not in query
        assert query["iss"] == _auth_base(port)

    def test_wrong_verifier_is_invalid_grant(self, oauth):
        port = oauth.port
        client = _auth_register(port)
        code, verifier = _auth_code(port, client)
        other_verifier, _ = _auth_pkce()
        r = _auth_exchange(port, client["client_id"], code, other_verifier)
        assert r.status == 400 and r.json()["error"] == "invalid_grant", r
        none = _auth_exchange(port, client["client_id"], code, "")
        assert none.status == 400 and none.json()["error"] == "invalid_grant", none

    @pytest.mark.parametrize("presented", ["http://127.0.0.1:9/other", "https://evil.example/cb",
                                           "http://127.0.0.1.evil.example:9/cb", "http://localhost:9/cb"])
    def test_unregistered_redirect_uri_is_an_error_page_never_a_redirect(self, oauth, presented):
        port = oauth.port
        client = _auth_register(port)
        _verifier, challenge = _auth_pkce()
        r = _auth_authorize(port, client["client_id"], presented, challenge)
        page = _auth_assert_page(r, 400)
        assert "redirect" in page.lower() and "evil" not in (r.header("location") or "")

    def test_unknown_client_is_an_error_page(self, oauth):
        _verifier, challenge = _auth_pkce()
        r = _auth_authorize(oauth.port, "no-such-client", _AUTH_CB, challenge)
        assert "not registered" in _auth_assert_page(r, 400)
        # a bad request that would otherwise redirect still does not, for an unknown client
        r = _auth_authorize(oauth.port, "no-such-client", _AUTH_CB, None)
        _auth_assert_page(r, 400)

    def test_duplicate_parameter_is_an_error_page(self, oauth):
        client = _auth_register(oauth.port)
        _verifier, challenge = _auth_pkce()
        query = urllib.parse.urlencode([("response_type", "code"), ("client_id", client["client_id"]),
                                        ("redirect_uri", _AUTH_CB), ("redirect_uri", "https://evil.example/cb"),
                                        ("code_challenge", challenge), ("code_challenge_method", "S256")])
        _auth_assert_page(_auth_get(oauth.port, "/authorize?" + query), 400)

    def test_loopback_redirect_may_change_its_port(self, oauth):
        port = oauth.port
        client = _auth_register(port, ["http://127.0.0.1:1234/cb"])
        moved = "http://127.0.0.1:5555/cb"
        code, verifier = _auth_code(port, client, moved)
        r = _auth_exchange(port, client["client_id"], code, verifier, moved)
        assert r.status == 200, r
        # the path must still match exactly
        _verifier, challenge = _auth_pkce()
        _auth_assert_page(_auth_authorize(port, client["client_id"], "http://127.0.0.1:5555/other", challenge), 400)

    def test_token_redirect_uri_must_match_the_authorization_request(self, oauth):
        port = oauth.port
        client = _auth_register(port, [_AUTH_CB, "http://127.0.0.1:9/cb2"])
        code, verifier = _auth_code(port, client)
        r = _auth_exchange(port, client["client_id"], code, verifier, "http://127.0.0.1:9/cb2")
        assert r.status == 400 and r.json()["error"] == "invalid_grant", r

    def test_code_issued_to_another_client_is_refused(self, oauth):
        port = oauth.port
        client, other = _auth_register(port), _auth_register(port)
        code, verifier = _auth_code(port, client)
        r = _auth_exchange(port, other["client_id"], code, verifier)
        assert r.status == 400 and r.json()["error"] == "invalid_grant", r

    def test_replayed_code_is_refused_and_revokes_what_it_issued(self, oauth):
        port = oauth.port
        first = _auth_login(port)
        client_id = first["client"]["client_id"]
        _auth_assert_ok(port, first["access_token"])
        replay = _auth_exchange(port, client_id, first["code"], first["verifier"])
        assert replay.status == 400 and replay.json()["error"] == "invalid_grant", replay
        _auth_assert_refused(port, first["access_token"])
        r = _auth_refresh(port, client_id, first["refresh_token"])
        assert r.status == 400 and r.json()["error"] == "invalid_grant", r

    def test_expired_code_is_invalid_grant(self, make_server):
        clock = FakeClock()
        st = make_server(build_server(store=MemoryStore(clock=clock), auth="builtin", consent="never",
                                      auth_rate_limit=0))
        port = st.port
        client = _auth_register(port)
        code, verifier = _auth_code(port, client)
        clock.advance(601)  # codes live 10 minutes
        r = _auth_exchange(port, client["client_id"], code, verifier)
        assert r.status == 400 and r.json()["error"] == "invalid_grant", r
        code, verifier = _auth_code(port, client)
        clock.advance(599)
        assert _auth_exchange(port, client["client_id"], code, verifier).status == 200

    def test_unsupported_grant_type(self, oauth):
        client = _auth_register(oauth.port)
        r = _auth_post_form(oauth.port, "/token", {"grant_type": "password", "client_id": client["client_id"],
                                                   "username": "u", "password": "p"})
        assert r.status == 400 and r.json()["error"] == "unsupported_grant_type"

    def test_resource_of_another_server_redirects_invalid_target(self, oauth):
        port = oauth.port
        client = _auth_register(port)
        _verifier, challenge = _auth_pkce()
        r = _auth_authorize(port, client["client_id"], _AUTH_CB, challenge, state="rs",
                            resource="http://other.example/mcp")
        query = _auth_location(r, _AUTH_CB)
        assert query["error"] == "invalid_target" and query["iss"] == _auth_base(port) and query["state"] == "rs"
        code, verifier = _auth_code(port, client, resource=_auth_base(port) + "/mcp")  # its own: fine
        bad = _auth_exchange(port, client["client_id"], code, verifier, resource="http://other.example/mcp")
        assert bad.status == 400 and bad.json()["error"] == "invalid_target", bad

    def test_unknown_scope_redirects_invalid_scope(self, oauth):
        client = _auth_register(oauth.port)
        _verifier, challenge = _auth_pkce()
        r = _auth_authorize(oauth.port, client["client_id"], _AUTH_CB, challenge, scope="mcp admin")
        assert _auth_location(r, _AUTH_CB)["error"] == "invalid_scope"

    # -- attacks on the bearer -----------------------------------------------------------------------

    def test_token_for_another_audience_is_refused(self, oauth):
        port = oauth.port
        tokens = _auth_login(port)
        claims = _auth_claims(tokens["access_token"])
        key = oauth.server.keys.token_key
        _auth_assert_ok(port, _auth_mint(key, claims))  # the minting is right: same claims pass
        _auth_assert_refused(port, _auth_mint(key, claims, aud="http://other/mcp"))
        _auth_assert_refused(port, _auth_mint(key, claims, iss="http://other"))

    def test_tampered_expired_and_unsigned_tokens_are_refused(self, oauth):
        import jwt
        port = oauth.port
        tokens = _auth_login(port)
        access = tokens["access_token"]
        claims = _auth_claims(access)
        key = oauth.server.keys.token_key
        head, payload, signature = access.split(".")
        _auth_assert_refused(port, f"{head}.{payload}.{flip(signature, 3)}")
        widened = _auth_b64url(json.dumps({**claims, "scope": "mcp admin"}).encode())
        _auth_assert_refused(port, f"{head}.{widened}.{signature}")
        now = int(time.time())
        _auth_assert_refused(port, _auth_mint(key, claims, iat=now - 7200, nbf=now - 7200, exp=now - 3600))
        unsigned_head = _auth_b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
        _auth_assert_refused(port, f"{unsigned_head}.{payload}.")
        _auth_assert_refused(port, jwt.encode({**claims, "jti": "x"}, "another-key-of-32-bytes-or-more!", "HS256"))
        _auth_assert_refused(port, "not-a-jwt")
        no_exp = {k: v for k, v in claims.items() if k != "exp"}
        _auth_assert_refused(port, jwt.encode({**no_exp, "jti": "y"}, key, "HS256"))
        _auth_assert_ok(port, access)

    def test_token_of_an_unknown_session_is_refused(self, oauth):
        port = oauth.port
        claims = _auth_claims(_auth_login(port)["access_token"])
        ghost = _auth_mint(oauth.server.keys.token_key, claims, sid="no-such-session", sub="no-such-session")
        _auth_assert_refused(port, ghost)

    def test_legacy_session_belongs_to_the_token_that_created_it(self, oauth):
        port = oauth.port
        alice, mallory = _auth_login(port), _auth_login(port)
        s = _auth_Session(port, alice["access_token"])
        s.initialize()
        assert s.call("echo", {"text": "mine"})["content"][0]["text"] == "mine"
        s.token = mallory["access_token"]
        r = s.post(s.body("tools/call", {"name": "echo", "arguments": {"text": "theirs"}}))
        assert r.status == 404, r
        s.token = None
        assert s.post(s.body("tools/list")).status == 401
        s.token = alice["access_token"]
        assert s.call("echo", {"text": "still mine"})["content"][0]["text"] == "still mine"

    def test_insufficient_scope_is_403(self, oauth):
        port = oauth.port
        claims = _auth_claims(_auth_login(port)["access_token"])
        r = _auth_call(port, _auth_mint(oauth.server.keys.token_key, claims, scope="other"))
        assert r.status == 403, r
        assert 'error="insufficient_scope"' in r.header("www-authenticate")

    def test_every_transport_needs_the_bearer(self, oauth):
        port = oauth.port
        for method, path in (("POST", "/mcp"), ("GET", "/mcp"), ("DELETE", "/mcp"), ("GET", "/sse"),
                             ("POST", "/messages"), ("POST", "/http")):
            r = http(port, method, path, _auth_headers(port, {"Accept": ACCEPT_BOTH}),
                     b"{}" if method == "POST" else None)
            assert r.status == 401 and r.header("www-authenticate").startswith("Bearer "), (method, path, r)
        token = _auth_login(port)["access_token"]
        with Conn(port) as conn:
            conn.request("GET", "/sse", _auth_headers(port, {"Accept": "text/event-stream",
                                                             "Authorization": f"Bearer {token}"}))
            head = conn.read_head()
            assert head.status == 200 and head.content_type == "text/event-stream", head

    def test_duplicate_form_parameters_are_refused_not_a_server_error(self, oauth):
        """A repeated form parameter is a 400 (invalid_request, or an error page), never a 500
        (bugs-auth.md #1)."""
        port = oauth.port
        client = _auth_register(port)
        code, verifier = _auth_code(port, client)
        body = urllib.parse.urlencode([("grant_type", "authorization_code"), ("client_id", client["client_id"]),
                                       ("code", code), ("code", "another"), ("code_verifier", verifier)])
        r = http(port, "POST", "/token", _auth_headers(port, {"Content-Type": "application/x-www-form-urlencoded"}),
                 body)
        assert r.status == 400 and r.json()["error"] == "invalid_request", r
        consent = _auth_post_form(port, "/authorize", {"csrf": "a"})  # a well-formed post: the page
        _auth_assert_page(consent, 400)
        r = http(port, "POST", "/authorize", _auth_headers(port, {"Content-Type": "application/x-www-form-urlencoded",
                                                                  "Cookie": "mcp_csrf=a"}), "csrf=a&csrf=a")
        _auth_assert_page(r, 400)
        r = http(port, "POST", "/revoke", _auth_headers(port, {"Content-Type": "application/x-www-form-urlencoded"}),
                 f"token=a&token=b&client_id={client['client_id']}")
        assert r.status == 400 and r.json()["error"] == "invalid_request", r

    def test_revoke_by_another_client_leaves_the_tokens_alone(self, oauth):
        """RFC 7009 2.1: a client may revoke only tokens issued to it (bugs-auth.md #2)."""
        port = oauth.port
        victim = _auth_login(port)
        intruder = _auth_register(port)
        for token in (victim["access_token"], victim["refresh_token"]):
            r = _auth_post_form(port, "/revoke", {"token": token, "client_id": intruder["client_id"]})
            assert r.status in (200, 400), r
        _auth_assert_ok(port, victim["access_token"])
        assert _auth_refresh(port, victim["client"]["client_id"], victim["refresh_token"]).status == 200

    def test_refresh_token_outlives_an_idle_period_longer_than_the_session_ttl(self, make_server):
        """MCP_REFRESH_TTL applies even when the session idled out after SESSION_TTL (bugs-auth.md #3)."""
        clock = FakeClock()
        st = make_server(build_server(store=MemoryStore(clock=clock), auth="builtin", consent="never",
                                      auth_rate_limit=0))
        first = _auth_login(st.port)
        clock.advance(st.server.settings.session_ttl + 60)  # the access token (1 hour) expired too
        r = _auth_refresh(st.port, first["client"]["client_id"], first["refresh_token"])
        assert r.status == 200, r
        _auth_assert_ok(st.port, r.json()["access_token"])

    def test_revoked_access_token_stays_revoked_when_a_refresh_restarts_an_idle_session(self, make_server):
        """A revoked access token that has not expired (MCP_TOKEN_TTL above SESSION_TTL) stays
        revoked when a refresh restarts the idled-out session (bugs-auth.md #9)."""
        clock = FakeClock()  # the store's clock: the session idles out, the JWT's exp is real time
        st = make_server(build_server(store=MemoryStore(clock=clock), auth="builtin", consent="never",
                                      auth_rate_limit=0, token_ttl=7200, session_ttl=3600))
        first = _auth_login(st.port)
        client_id = first["client"]["client_id"]
        r = _auth_post_form(st.port, "/revoke", {"token": first["access_token"], "client_id": client_id})
        assert r.status == 200, r
        _auth_assert_refused(st.port, first["access_token"])
        clock.advance(3601)
        fresh = _auth_refresh(st.port, client_id, first["refresh_token"])
        assert fresh.status == 200, fresh
        _auth_assert_ok(st.port, fresh.json()["access_token"])
        _auth_assert_refused(st.port, first["access_token"])

    def test_replacement_superseded_by_a_retry_is_detected_as_reuse(self, oauth):
        """The replacement a grace retry cancelled is reuse when presented: two holders exist, so
        the family is revoked (bugs-auth.md #4)."""
        port = oauth.port
        first = _auth_login(port)
        client_id = first["client"]["client_id"]
        rotated = _auth_refresh(port, client_id, first["refresh_token"]).json()  # holder A
        retried = _auth_refresh(port, client_id, first["refresh_token"]).json()  # holder B, via the grace
        r = _auth_refresh(port, client_id, rotated["refresh_token"])
        assert r.status == 400 and r.json()["error"] == "invalid_grant", r
        again = _auth_refresh(port, client_id, retried["refresh_token"])
        assert again.status == 400 and again.json()["error"] == "invalid_grant", again
        _auth_assert_refused(port, retried["access_token"])

    @pytest.mark.parametrize("returning_browser", [False, True])
    def test_instances_sharing_a_store_agree_on_the_token_key_only_through_their_secret(self, make_server,
                                                                                         returning_browser):
        """Instances on a shared store agree on the keys through MCP_SECRET, whatever request first
        needs a key (a returning browser's consent cookie: bugs-auth.md #6).  Without a secret they
        refuse (503) and keep none in the store: the secret once generated into the store let a
        copy of it mint tokens (issue 18 #6)."""
        inner = MemoryStore()
        bare = make_server(build_server(store=_auth_SharedStore(inner), auth="builtin", consent="remember",
                                        auth_rate_limit=0, public_url="http://mcp.example"))
        _verifier, challenge = _auth_pkce()
        refused = _auth_authorize(bare.port, _auth_register(bare.port)["client_id"], _AUTH_CB, challenge)
        assert refused.status == 503 and b"MCP_SECRET" in refused.body, refused
        assert not [key for key in inner._data if "secret" in key], list(inner._data)
        first, second = (make_server(build_server(store=_auth_SharedStore(inner), auth="builtin",
                                                  consent="remember", auth_rate_limit=0,
                                                  public_url="http://mcp.example",
                                                  secret="shared-test-secret-0123456789abcdefgh"))
                         for _ in range(2))
        client = _auth_register(first.port)
        verifier, challenge = _auth_pkce()
        cookie = {"Cookie": "mcp_consent=" + _auth_b64url(b"someone-else") + ".AAAA"} if returning_browser else {}
        page = _auth_authorize(first.port, client["client_id"], _AUTH_CB, challenge, headers=cookie)
        fields = _auth_hidden_fields(_auth_assert_page(page, 200))
        answer = _auth_post_form(first.port, "/authorize", {**fields, "decision": "approve"},
                                 {"Cookie": f"mcp_csrf={fields['csrf']}"})
        code = _auth_location(answer, _AUTH_CB)["code"]
        tokens = _auth_exchange(first.port, client["client_id"], code, verifier)
        assert tokens.status == 200, tokens
        access = tokens.json()["access_token"]
        assert _auth_claims(access)["aud"] == "http://mcp.example/mcp"
        _auth_assert_ok(first.port, access)
        _auth_assert_ok(second.port, access)

    def test_html_pages_have_one_content_type(self, make_server):
        """Content-Type is a singleton header (bugs-auth.md #7)."""
        server = build_server(auth="builtin", consent="always", auth_rate_limit=0)
        server.add_login_tools()  # the sandbox provider too
        st = make_server(server)
        port = st.port
        client = _auth_register(port)
        _verifier, challenge = _auth_pkce()
        pages = [_auth_authorize(port, client["client_id"], _AUTH_CB, challenge),  # consent
                 _auth_authorize(port, "nobody", _AUTH_CB, challenge),  # error page
                 _auth_get(port, "/login/never-issued"), _auth_get(port, "/redirect?state=x&code=y"),
                 _auth_get(port, "/sandbox/authorize?state=x&redirect_uri=http://127.0.0.1:9/cb")]
        for page in pages:
            assert page.content_type == "text/html", page
            _auth_assert_page_headers(page)
            assert [n for n, _v in page.headers].count("content-type") == 1, page

    # -- Client ID Metadata Documents -------------------------------------------------------------------

    @staticmethod
    def _cimd_stub(document_for):
        def serve(request):
            return 200, {"Cache-Control": "no-store"}, document_for(request)
        return _auth_Stub({("GET", "/client.json"): serve})

    def test_metadata_document_client_authorizes_and_is_named(self, make_server):
        st = make_server(auth="builtin", consent="always", allow_private_fetch=True, auth_rate_limit=0)
        port = st.port
        with self._cimd_stub(lambda r: {"client_id": f"http://127.0.0.1:{stub.port}/client.json",
                                        "client_name": "Doc Client <b>", "redirect_uris": [_AUTH_CB]}) as stub:
            client_id = stub.url + "/client.json"
            verifier, challenge = _auth_pkce()
            r = _auth_authorize(port, client_id, _AUTH_CB, challenge, state="doc")
            page = _auth_assert_page(r, 200)
            assert "Doc Client &lt;b&gt;" in page and "verified" in page
            assert stub.hits("/client.json")
            fields = _auth_hidden_fields(page)
            answer = _auth_post_form(port, "/authorize", {**fields, "decision": "approve"},
                                     {"Cookie": f"mcp_csrf={fields['csrf']}"})
            query = _auth_location(answer, _AUTH_CB)
            t = _auth_exchange(port, client_id, query["code"], verifier)
            assert t.status == 200, t
            assert _auth_claims(t.json()["access_token"])["client_id"] == client_id
            _auth_assert_ok(port, t.json()["access_token"])
            # a redirect URI the document does not list is refused with a page
            _auth_assert_page(_auth_authorize(port, client_id, "http://127.0.0.1:9/elsewhere", challenge), 400)

    @pytest.mark.parametrize("document", [
        {"client_id": "http://127.0.0.1:1/someone-else.json", "redirect_uris": [_AUTH_CB]},
        {"redirect_uris": [_AUTH_CB]},
        {"client_id": "SELF", "redirect_uris": ["javascript:alert(1)"]},
        {"client_id": "SELF"},
        ["not", "an", "object"],
    ])
    def test_invalid_metadata_document_is_an_error_page(self, make_server, document):
        st = make_server(auth="builtin", consent="never", allow_private_fetch=True, auth_rate_limit=0)
        with self._cimd_stub(lambda r: {**document, "client_id": stub.url + "/client.json"}
                             if isinstance(document, dict) and document.get("client_id") == "SELF"
                             else document) as stub:
            _verifier, challenge = _auth_pkce()
            r = _auth_authorize(st.port, stub.url + "/client.json", _AUTH_CB, challenge)
            assert "not registered" in _auth_assert_page(r, 400)
            assert stub.hits("/client.json")

    def test_metadata_document_on_a_private_address_is_not_fetched(self, oauth):
        with self._cimd_stub(lambda r: {"client_id": stub.url + "/client.json",
                                        "redirect_uris": [_AUTH_CB]}) as stub:
            _verifier, challenge = _auth_pkce()
            for client_id in (stub.url + "/client.json", f"https://127.0.0.1:{stub.port}/client.json",
                              f"https://localhost:{stub.port}/client.json"):
                r = _auth_authorize(oauth.port, client_id, _AUTH_CB, challenge)
                _auth_assert_page(r, 400)
            assert stub.requests == []
            with pytest.raises(ValueError, match="non-public"):
                mcp_server._fetch_json_document(f"https://127.0.0.1:{stub.port}/client.json", False)
            with pytest.raises(ValueError, match="https"):
                mcp_server._fetch_json_document(stub.url + "/client.json", False)
            assert stub.requests == []

    # -- limits and modes ---------------------------------------------------------------------------------

    def test_registration_rate_limit_answers_429_with_retry_after(self, make_server, monkeypatch):
        frozen = 1_700_000_010.0  # one fixed minute window, whatever the wall clock does
        monkeypatch.setattr(mcp_server, "_now", lambda: frozen)
        st = make_server(auth="builtin", consent="never", auth_rate_limit=3)
        for _ in range(3):
            _auth_register(st.port)
        r = _auth_post_json(st.port, "/register", {"redirect_uris": [_AUTH_CB]})
        assert r.status == 429, r
        assert r.header("retry-after") == str(60 - int(frozen) % 60)
        # other routes count on their own
        t = _auth_post_form(st.port, "/token", {"grant_type": "refresh_token", "refresh_token": "x",
                                                "client_id": "nobody"})
        assert t.status == 401, t

    def test_auth_none_has_no_metadata_and_no_token_checks(self, make_server):
        st = make_server(auth="none")
        port = st.port
        for path in ("/.well-known/oauth-protected-resource", "/.well-known/oauth-protected-resource/mcp",
                     "/.well-known/oauth-authorization-server"):
            assert _auth_get(port, path).status == 404, path
        assert _auth_post_json(port, "/register", {"redirect_uris": [_AUTH_CB]}).status == 404
        s = _auth_Session(port)
        s.initialize()
        assert s.call("echo", {"text": "open"})["content"][0]["text"] == "open"
        assert _auth_call(port, None).status == 200

    def test_token_parameter_signs_the_tokens(self, make_server):
        import jwt
        seed_key = "seed-signing-key-0123456789abcdef"
        st = make_server(auth="builtin", consent="never", auth_rate_limit=0, token_parameter=seed_key)
        port, base = st.port, _auth_base(st.port)
        access = _auth_login(port)["access_token"]
        claims = jwt.decode(access, seed_key, algorithms=["HS256"], audience=base + "/mcp", issuer=base)
        assert claims["scope"] == "mcp"
        with pytest.raises(jwt.InvalidSignatureError):
            jwt.decode(access, mcp_server._KeyRing("").key("token"), algorithms=["HS256"], audience=base + "/mcp")
        _auth_assert_ok(port, access)
        _auth_assert_ok(port, _auth_mint(seed_key, claims))  # what the seed signs is accepted

    def test_tokens_of_the_previous_secret_stay_valid(self, make_server):
        import jwt
        st = make_server(auth="builtin", consent="never", auth_rate_limit=0, secret="new-secret",
                         previous_secret="old-secret")
        port = st.port
        access = _auth_login(port)["access_token"]
        new_key = mcp_server._KeyRing("new-secret").token_key
        old_key = mcp_server._KeyRing("old-secret").token_key
        claims = jwt.decode(access, new_key, algorithms=["HS256"], audience=_auth_base(port) + "/mcp")
        _auth_assert_ok(port, _auth_mint(old_key, claims))
        _auth_assert_refused(port, _auth_mint(mcp_server._KeyRing("unrelated").token_key, claims))
        _auth_assert_ok(port, access)


# =================================================================================================
# The upstream login flow (against the sandbox provider run as a separate process)
# =================================================================================================

_LOGIN_KEY_1 = "11" * 32
_LOGIN_KEY_2 = "22" * 32
_LOGIN_KEY_3 = "33" * 32
_LOGIN_RAW_ASHA = ("asha.rao@example.com", "+91-98765-43210", "ABCPR1234K", "ACC-00012345", "001234567890",
                   "IN30012345678901", "AB1234")


def _login_port_of(proc: Proc) -> int:
    """The port a ``mcp_server.py --port 0`` process listens on (from its first lines)."""
    for _ in range(50):
        line = proc.err_line()
        assert line is not None, bytes(proc.stderr)
        match = re.search(r"listening on http://127\.0\.0\.1:(\d+)/", line)
        if match:
            return int(match.group(1))
    raise AssertionError(f"no listening line: {bytes(proc.stderr)!r}")


def _login_raw_values() -> set:
    """Every value of a masked field in the sandbox's demo data."""
    found = set()

    def walk(value):
        if isinstance(value, dict):
            for key, item in value.items():
                if key.lower() in mcp_server._DEFAULT_MASK_FIELDS and not isinstance(item, (dict, list)):
                    found.add(str(item))
                else:
                    walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(mcp_server._SANDBOX_USERS)
    return found


class _login_NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # the test looks at every 302 itself


class _login_Browser:
    """A browser: a cookie jar, no automatic redirects, an Origin on form posts; every HTML page it
    sees must carry the page security headers."""

    def __init__(self):
        self.jar = _login_cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar), _login_NoRedirect)
        self.pages: list = []

    def open(self, url: str, form: dict | None = None) -> Response:
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        headers = {}
        if form is not None:
            parts = urllib.parse.urlsplit(url)
            headers["Origin"] = f"{parts.scheme}://{parts.netloc}"
        request = urllib.request.Request(url, data=data, headers=headers)
        try:
            raw = self.opener.open(request, timeout=WAIT)
        except urllib.error.HTTPError as exc:
            raw = exc
        with raw:
            resp = Response(raw.status if hasattr(raw, "status") else raw.code, raw.reason,
                            [(k.lower(), v) for k, v in raw.headers.items()])
            resp.body = raw.read()
        if resp.content_type == "text/html":
            _auth_assert_page_headers(resp)
            self.pages.append(resp)
        if resp.status in (301, 302, 303, 307):
            assert "no-store" in (resp.header("cache-control") or ""), resp
        return resp

    def cookie(self, name: str) -> str | None:
        for cookie in self.jar:
            if cookie.name == name:
                return cookie.value
        return None

    def pair(self, url: str, code: str) -> Response:
        """Open the login link and enter the pairing code (as typed by a person)."""
        page = self.open(url)
        assert page.status == 200, page
        fields = _auth_hidden_fields(page.body.decode())
        return self.open(url, {"csrf": fields["csrf"], "code": code})


def _login_text(result: dict) -> str:
    return "".join(block.get("text", "") for block in result.get("content", []))


def _login_assert_not_logged_in(session, *names) -> None:
    for name in names or ("profile", "holdings", "orders"):
        result = session.call(name)
        assert result.get("isError") is True, result
        assert "Not logged in" in _login_text(result), result
    result = session.call("service", {"path": "holdings"})
    assert result.get("isError") is True and "Not logged in" in _login_text(result), result


class TestLogin:
    """The seed's login flow through the generic UPSTREAM_* path, with a real browser's cookies."""

    @pytest.fixture(scope="class")
    @classmethod  # a class-scoped fixture as an instance method is deprecated (pytest 10)
    def provider(cls):
        """The sandbox provider: ``mcp_server.py --no-auth`` in its own process."""
        with Proc([SERVER_FILE, "--no-auth", "--port", "0"]) as proc:
            port = _login_port_of(proc)
            yield {"base": f"http://127.0.0.1:{port}/sandbox", "port": port, "proc": proc}
            proc.proc.send_signal(signal.SIGTERM)
            proc.proc.wait(WAIT)

    @staticmethod
    def _settings(base: str, **overrides) -> Settings:
        values = {"auth": "none", "upstream_authorize_url": base + "/authorize",
                  "upstream_token_url": base + "/token",
                  "upstream_revoke_url": base + "/revoke", "upstream_api_base": base + "/api",
                  "upstream_client_id": "sandbox-client", "upstream_client_secret": "sandbox-secret",
                  "encryption_key": _LOGIN_KEY_1, **overrides}
        return Settings(**values)

    @pytest.fixture
    def start(self, make_server, provider):
        """start(**settings) -> a running MCP server under test configured for the provider."""
        def make(store=None, base=None, **overrides):
            server = mcp_server._builtin_server(self._settings(base or provider["base"], **overrides))
            if store is not None:
                server.store = store
            return make_server(server)
        return make

    @staticmethod
    def _begin(st, session=None) -> tuple:
        """(session, login result) after the login tool ran."""
        if session is None:
            session = _auth_Session(st.port)
            session.initialize()
        result = session.call("login")
        assert not result.get("isError"), result
        return session, result["structuredContent"]

    def _sign_in(self, st, browser=None, session=None, user="asha") -> tuple:
        """The whole login as a person does it: (session, browser, redirect URL used)."""
        browser = browser or _login_Browser()
        session, started = self._begin(st, session)
        to_provider = browser.pair(started["url"], started["pairing_code"])
        assert to_provider.status == 302, to_provider
        sign_in_page = browser.open(to_provider.header("location"))
        assert sign_in_page.status == 200 and b"SANDBOX" in sign_in_page.body, sign_in_page
        fields = _auth_hidden_fields(sign_in_page.body.decode())
        back = browser.open(to_provider.header("location"), {**fields, "user": user})
        assert back.status == 302, back
        redirect_url = back.header("location")
        assert redirect_url.startswith(_auth_base(st.port) + "/redirect?"), redirect_url
        done = browser.open(redirect_url)
        assert done.status == 200 and b"You are signed in" in done.body, done
        return session, browser, redirect_url

    def _stored_credentials(self, st, session) -> dict:
        uid = "session:" + session.sid
        record = st.run(st.server.store.get(mcp_server._user_key(uid)))
        return json.loads(st.server._login.vault().decrypt(record["cred"], mcp_server._credentials_ad(uid)))

    # -- the login tool and the pairing page -----------------------------------------------------------

    def test_login_tool_returns_a_link_and_a_pairing_code(self, start):
        st = start()
        session, started = self._begin(st)
        assert re.fullmatch(re.escape(_auth_base(st.port)) + r"/login/[A-Za-z0-9_-]{20,}", started["url"]), started
        assert re.fullmatch(r"[A-HJ-NP-Z2-9]{4}-[A-HJ-NP-Z2-9]{4}", started["pairing_code"]), started
        assert started["expires_in"] == 600
        result = session.call("login")
        text = _login_text(result)
        assert result["structuredContent"]["url"] in text and result["structuredContent"]["pairing_code"] in text
        assert result["structuredContent"]["url"] != started["url"]  # a fresh link every time

    def test_tools_before_login_say_not_logged_in(self, start):
        st = start()
        session = _auth_Session(st.port)
        session.initialize()
        _login_assert_not_logged_in(session)
        assert session.call("logout")["content"][0]["text"] == "You were not logged in."

    def test_wrong_pairing_code_shows_the_form_again_and_five_burn_the_link(self, start):
        st = start()
        session, started = self._begin(st)
        browser = _login_Browser()
        form = browser.open(started["url"])
        assert form.status == 200 and b"pairing code" in form.body
        assert browser.cookie("mcp_csrf")
        for attempt in range(1, 5):
            again = browser.pair(started["url"], "WRONG-CODE")
            assert again.status == 200 and b"not right" in again.body, (attempt, again)
        burnt = browser.pair(started["url"], "ZZZZ-ZZZZ")
        assert burnt.status == 400 and b"Too many wrong codes" in burnt.body, burnt
        gone = browser.open(started["url"])
        assert gone.status == 400 and b"expired" in gone.body, gone
        right = browser.open(started["url"], {"csrf": browser.cookie("mcp_csrf") or "",
                                              "code": started["pairing_code"]})
        assert right.status == 400 and right.header("location") is None, right
        _login_assert_not_logged_in(session)

    def test_pairing_post_needs_the_csrf_cookie(self, start):
        st = start()
        _session, started = self._begin(st)
        browser = _login_Browser()
        fields = _auth_hidden_fields(browser.open(started["url"]).body.decode())
        stranger = _login_Browser()  # a cross-site post carries no cookie of ours
        r = stranger.open(started["url"], {"csrf": fields["csrf"], "code": started["pairing_code"]})
        assert r.status == 400 and r.header("location") is None, r
        ok = browser.open(started["url"], {"csrf": fields["csrf"], "code": started["pairing_code"]})
        assert ok.status == 302, ok  # the failed post did not use up the link

    def test_right_code_redirects_to_the_provider_with_state_and_s256(self, start, provider):
        st = start()
        _session, started = self._begin(st)
        browser = _login_Browser()
        typed = started["pairing_code"].lower().replace("-", " ")  # people type it loosely
        r = browser.pair(started["url"], typed)
        query = _auth_location(r, provider["base"] + "/authorize")
        assert query["response_type"] == "code" and query["client_id"] == "sandbox-client"
        assert query["redirect_uri"] == _auth_base(st.port) + "/redirect"
        assert len(query["state"]) >= 32
        assert query["code_challenge_method"] == "S256"
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", query["code_challenge"])
        assert browser.cookie("mcp_login")

    # -- signed in ---------------------------------------------------------------------------------------

    def test_full_login_gives_masked_data_and_never_the_raw_identifiers(self, start):
        st = start()
        session, _browser, _url = self._sign_in(st)
        raw = _login_raw_values()
        assert set(_LOGIN_RAW_ASHA) <= raw
        bodies = []
        for name, arguments in (("profile", {}), ("holdings", {}), ("orders", {}),
                                ("service", {"path": "positions"}), ("service", {"path": "/profile"})):
            message = session.body("tools/call", {"name": name, "arguments": arguments})
            r = session.post(message)
            assert r.status == 200, r
            bodies.append(r.body)
            result = final_message(r, message["id"])["result"]
            assert not result.get("isError"), (name, result)
            assert result["structuredContent"]["sandbox"] is True
        everything = b"".join(bodies).decode("utf-8")
        for value in raw:
            assert value not in everything, value
        profile = session.call("profile")["structuredContent"]["data"]
        assert profile["name"] == "Asha Rao (sandbox)"
        assert profile["email"] == "X" * 16 + ".com" and profile["pan"] == "XXXXXX234K"
        assert profile["bank_account"].endswith("7890") and set(profile["bank_account"][:-4]) == {"X"}
        holdings = session.call("holdings")["structuredContent"]["data"]
        assert [h["symbol"] for h in holdings] == ["INFY", "TCS"] and holdings[0]["quantity"] == 40
        orders = session.call("orders")["structuredContent"]["data"]
        assert {o["order_id"] for o in orders} == {"SBX-1001", "SBX-1002"}
        assert all(o["account_id"] == "XXXXXXXX2345" for o in orders)

    @pytest.mark.parametrize("path", ["../x", "profile/../../admin", "//evil.com/x", "http://evil",
                                      "https://evil.com/profile",
                                      "secret", "profiles", "profile\\..\\x", "", "holdings?x=1", "%2e%2e/x"])
    def test_service_refuses_paths_outside_the_allowed_ones(self, start, path):
        st = start()
        session, _browser, _url = self._sign_in(st)
        result = session.call("service", {"path": path})
        assert result.get("isError") is True, (path, result)
        text = _login_text(result)
        # refused by the server before any call to the provider (which would answer with an HTTP status)
        assert "is not an API path" in text or "is not one of the allowed API paths" in text, (path, text)

    def test_logout_revokes_upstream_and_forgets_the_login(self, start, provider):
        st = start()
        session, _browser, _url = self._sign_in(st)
        cred = self._stored_credentials(st, session)
        api = provider["base"] + "/api/profile"
        check = urllib.request.Request(api, headers={"Authorization": f"Bearer {cred['access_token']}"})
        with urllib.request.urlopen(check, timeout=WAIT) as r:
            assert r.status == 200
        assert session.call("logout")["content"][0]["text"].startswith("Logged out")
        _login_assert_not_logged_in(session)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(check, timeout=WAIT)
        assert refused.value.code == 401  # the provider revoked the token
        record = st.run(st.server.store.get(mcp_server._user_key("session:" + session.sid)))
        assert "cred" not in record and record["state"] == "ANONYMOUS"

    def test_each_session_has_its_own_login(self, start):
        st = start()
        session, _browser, _url = self._sign_in(st)
        other = _auth_Session(st.port)
        other.initialize()
        _login_assert_not_logged_in(other)
        assert not session.call("holdings").get("isError")

    def test_expired_upstream_access_token_is_refreshed_once(self, start, provider):
        st = start()
        session, _browser, _url = self._sign_in(st)
        before = self._stored_credentials(st, session)
        urllib.request.urlopen(urllib.request.Request(provider["base"] + "/revoke", data=urllib.parse.urlencode(
            {"token": before["access_token"]}).encode()), timeout=WAIT).close()
        result = session.call("holdings")
        assert not result.get("isError"), result
        after = self._stored_credentials(st, session)
        assert after["access_token"] != before["access_token"]
        # both tokens gone upstream: the login ends, with a clear message
        for token in (after["access_token"], after["refresh_token"]):
            urllib.request.urlopen(urllib.request.Request(provider["base"] + "/revoke", data=urllib.parse.urlencode(
                {"token": token}).encode()), timeout=WAIT).close()
        result = session.call("holdings")
        assert result.get("isError") is True and "no longer accepts" in _login_text(result), result
        _login_assert_not_logged_in(session)

    def test_even_the_browser_that_authorized_the_client_must_enter_the_pairing_code(self, start, provider):
        """The ``mcp_browser`` cookie once skipped the pairing code; an attacker could plant one
        (issue 18 #2), so no cookie skips it now: the user of the token pairs, then is signed in."""
        st = start(auth="builtin", consent="never", auth_rate_limit=0)
        port = st.port
        browser = _login_Browser()
        client = _auth_register(port)
        verifier, challenge = _auth_pkce()
        query = urllib.parse.urlencode({"response_type": "code", "client_id": client["client_id"],
                                        "redirect_uri": _AUTH_CB, "code_challenge": challenge,
                                        "code_challenge_method": "S256"})
        approved = browser.open(f"{_auth_base(port)}/authorize?{query}")
        code = _auth_location(approved, _AUTH_CB)["code"]
        tokens = _auth_exchange(port, client["client_id"], code, verifier).json()
        session = _auth_Session(port, tokens["access_token"])
        session.initialize()
        _session, started = self._begin(st, session)
        form = browser.open(started["url"])
        assert form.status == 200 and b"pairing code" in form.body and b"Never enter a code" in form.body, form
        direct = browser.pair(started["url"], started["pairing_code"])
        _auth_location(direct, provider["base"] + "/authorize")
        page = browser.open(direct.header("location"))
        back = browser.open(direct.header("location"), {**_auth_hidden_fields(page.body.decode()), "user": "ben"})
        assert browser.open(back.header("location")).status == 200
        profile = session.call("profile")
        assert profile["structuredContent"]["data"]["name"] == "Ben Okafor (sandbox)"
        assert "ben.okafor@example.com" not in json.dumps(profile)

    def test_login_completing_after_revocation_does_not_revive_the_session(self, start, provider):
        """A sign-in that completes after the OAuth grant was revoked must not recreate the revoked
        session (bugs-auth.md #8)."""
        st = start(auth="builtin", consent="never", auth_rate_limit=0)
        port = st.port
        tokens = _auth_login(port)
        session = _auth_Session(port, tokens["access_token"])
        session.initialize()
        _session, started = self._begin(st, session)
        browser = _login_Browser()
        to_provider = browser.pair(started["url"], started["pairing_code"])
        page = browser.open(to_provider.header("location"))
        back = browser.open(to_provider.header("location"), {**_auth_hidden_fields(page.body.decode()),
                                                             "user": "asha"})
        revoked = _auth_post_form(port, "/revoke", {"token": tokens["refresh_token"],
                                                    "client_id": tokens["client"]["client_id"]})
        assert revoked.status == 200
        _auth_assert_refused(port, tokens["access_token"], tool="server_info")
        browser.open(back.header("location"))  # the sign-in finishes after the revocation
        _auth_assert_refused(port, tokens["access_token"], tool="server_info")

    # -- attacks on /redirect ----------------------------------------------------------------------------

    def test_replayed_redirect_is_an_error_page(self, start):
        st = start()
        session, browser, redirect_url = self._sign_in(st)
        again = browser.open(redirect_url)
        assert again.status == 400 and b"expired" in again.body, again
        assert not session.call("holdings").get("isError")  # the first sign-in stands

    @pytest.mark.parametrize("query", ["?code=abc&state=never-issued", "?code=abc", "", "?state=&code=abc"])
    def test_unknown_state_is_an_error_page(self, start, query):
        st = start()
        r = _login_Browser().open(_auth_base(st.port) + "/redirect" + query)
        assert r.status == 400 and b"expired" in r.body, r

    def test_expired_state_is_an_error_page(self, start):
        clock = FakeClock()
        st = start(store=MemoryStore(clock=clock))
        session, started = self._begin(st)
        browser = _login_Browser()
        to_provider = browser.pair(started["url"], started["pairing_code"])
        page = browser.open(to_provider.header("location"))
        back = browser.open(to_provider.header("location"), {**_auth_hidden_fields(page.body.decode()), "user": "asha"})
        clock.advance(601)  # states live 10 minutes
        late = browser.open(back.header("location"))
        assert late.status == 400 and b"expired" in late.body, late
        _login_assert_not_logged_in(session)

    def test_redirect_in_another_browser_is_refused(self, start):
        st = start()
        session, started = self._begin(st)
        browser = _login_Browser()
        to_provider = browser.pair(started["url"], started["pairing_code"])
        page = browser.open(to_provider.header("location"))
        back = browser.open(to_provider.header("location"), {**_auth_hidden_fields(page.body.decode()), "user": "asha"})
        stolen = _login_Browser().open(back.header("location"))
        assert stolen.status == 400 and b"same browser" in stolen.body, stolen
        _login_assert_not_logged_in(session)

    def test_provider_error_is_shown_escaped(self, start):
        st = start()
        session, started = self._begin(st)
        browser = _login_Browser()
        to_provider = browser.pair(started["url"], started["pairing_code"])
        state = _auth_location(to_provider, to_provider.header("location"))["state"]
        r = browser.open(_auth_base(st.port) + "/redirect?" + urllib.parse.urlencode(
            {"state": state, "code": "c0de", "error": "access_denied", "error_description": "<script>x</script>"}))
        assert r.status == 400 and b"not completed" in r.body and b"<script>" not in r.body, r
        _login_assert_not_logged_in(session)

    # -- the credentials at rest ------------------------------------------------------------------------

    def test_tampered_credentials_in_the_store_are_refused(self, start):
        st = start()
        session, _browser, _url = self._sign_in(st)
        key = mcp_server._user_key("session:" + session.sid)
        record = st.run(st.server.store.get(key))
        assert record["cred"].startswith("v1.")
        assert "access_token" not in record["cred"]
        st.run(st.server.store.set(key, {**record, "cred": flip(record["cred"], 30)}, 3600))
        result = session.call("holdings")
        assert result.get("isError") is True and "cannot be decrypted" in _login_text(result), result
        assert session.call("logout")["content"][0]["text"].startswith("Logged out")  # still possible
        _login_assert_not_logged_in(session)

    def test_credentials_are_bound_to_their_session(self, start):
        st = start()
        session, _browser, _url = self._sign_in(st)
        other = _auth_Session(st.port)
        other.initialize()
        store = st.server.store
        mine = st.run(store.get(mcp_server._user_key("session:" + session.sid)))
        st.run(store.set(mcp_server._user_key("session:" + other.sid), dict(mine), 3600))  # copied ciphertext
        result = other.call("holdings")
        assert result.get("isError") is True and "cannot be decrypted" in _login_text(result), result

    def test_restart_with_another_key_refuses_and_the_previous_key_list_decrypts(self, start):
        store = MemoryStore()
        first = start(store=store, encryption_key=_LOGIN_KEY_1)
        session, _browser, _url = self._sign_in(first)
        first.close()
        second = start(store=store, encryption_key=_LOGIN_KEY_2)
        moved = _auth_Session(second.port)
        moved.sid, moved._id = session.sid, 100
        result = moved.call("holdings")
        assert result.get("isError") is True and "cannot be decrypted" in _login_text(result), result
        second.close()
        third = start(store=store, encryption_key=_LOGIN_KEY_3, previous_encryption_keys=(_LOGIN_KEY_2, _LOGIN_KEY_1))
        moved.port = third.port
        assert not moved.call("holdings").get("isError")

    def test_vault_keys(self):
        sealed = mcp_server._Vault(_LOGIN_KEY_1).encrypt("secret-value", b"session:a")
        assert "secret-value" not in sealed
        assert mcp_server._Vault(_LOGIN_KEY_1).decrypt(sealed, b"session:a") == "secret-value"
        assert mcp_server._Vault(_LOGIN_KEY_2).decrypt(sealed, b"session:a") is None
        assert mcp_server._Vault(_LOGIN_KEY_1).decrypt(sealed, b"session:b") is None
        assert mcp_server._Vault(_LOGIN_KEY_2, [_LOGIN_KEY_1]).decrypt(sealed, b"session:a") == "secret-value"
        b64_key = base64.b64encode(bytes.fromhex(_LOGIN_KEY_1)).decode()
        assert mcp_server._Vault(b64_key).decrypt(sealed, b"session:a") == "secret-value"  # same key, base64
        assert mcp_server._Vault(_LOGIN_KEY_1).decrypt(flip(sealed), b"session:a") is None
        with pytest.raises(ValueError):  # not SystemExit: it may run inside a request (issue 18 #5)
            mcp_server._Vault("too-short")

    # -- the provider misbehaving -----------------------------------------------------------------------

    def _to_redirect(self, st, browser=None) -> tuple:
        """Pair, then stop where the provider would take over: (session, browser, state, its URL)."""
        session, started = self._begin(st)
        browser = browser or _login_Browser()
        to_provider = browser.pair(started["url"], started["pairing_code"])
        assert to_provider.status == 302, to_provider
        state = urllib.parse.parse_qs(urllib.parse.urlsplit(to_provider.header("location")).query)["state"][0]
        return session, browser, state, to_provider.header("location")

    def test_provider_down_is_an_error_page_and_the_server_keeps_serving(self, start, provider):
        closed = f"http://127.0.0.1:{_auth_closed_port()}"
        st = start(upstream_token_url=closed + "/token")
        session, browser, state, _location = self._to_redirect(st)
        r = browser.open(_auth_base(st.port) + "/redirect?" + urllib.parse.urlencode({"code": "c0de", "state": state}))
        assert r.status == 502 and b"did not answer" in r.body, r
        _login_assert_not_logged_in(session)
        assert session.call("server_info")["structuredContent"]["name"] == "mcp_server"
        assert not session.call("login").get("isError")

    @pytest.mark.parametrize("status", [500, 401, 200])
    def test_provider_refusing_the_code_is_an_error_page(self, start, status):
        body = {"error": "server_error"} if status != 200 else {"token_type": "Bearer"}  # 200 without a token
        with _auth_Stub({("POST", "/token"): lambda r: (status, {}, body)}) as stub:
            st = start(base=stub.url)
            session, browser, state, _location = self._to_redirect(st)
            r = browser.open(_auth_base(st.port) + "/redirect?" + urllib.parse.urlencode(
                {"code": "c0de", "state": state}))
            assert r.status == 502 and f"HTTP {status}".encode() in r.body, r
            assert len(stub.hits("/token")) == 1
        _login_assert_not_logged_in(session)
        assert session.call("server_info")["structuredContent"]["name"] == "mcp_server"

    def test_provider_api_errors_are_tool_errors(self, start):
        tokens = {"access_token": "stub-at-" + secrets.token_hex(8),
                  "refresh_token": "stub-rt-" + secrets.token_hex(8),
                  "expires_in": 3600}
        with _auth_Stub({("POST", "/token"): lambda r: (200, {}, tokens),
                         ("GET", "/api/holdings"): lambda r: (503, {}, {"error": "maintenance"}),
                         ("GET", "/api/profile"): lambda r: (200, {}, b"not json")}) as stub:
            st = start(base=stub.url)
            session, browser, state, _location = self._to_redirect(st)
            done = browser.open(_auth_base(st.port) + "/redirect?" + urllib.parse.urlencode(
                {"code": "c", "state": state}))
            assert done.status == 200, done
            result = session.call("holdings")
            assert result.get("isError") is True and "HTTP 503" in _login_text(result), result
            orders = session.call("orders")  # no such API path at the provider: 404
            assert orders.get("isError") is True and "HTTP 404" in _login_text(orders), orders
            profile = session.call("profile")  # 200, but not JSON: the model must not see an empty success
            assert profile.get("isError") is True, profile
            assert "stub-at-" not in json.dumps(profile)

    # -- enc: settings ----------------------------------------------------------------------------------

    def test_encrypt_command_and_enc_settings(self, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)  # no stray .env
        done = run_cli(["encrypt", "--setting", "UPSTREAM_CLIENT_SECRET", "sandbox-secret"],
                       env=clean_env(ENCRYPTION_KEY=_LOGIN_KEY_1))
        assert done.returncode == 0, done.stderr
        value = done.stdout.strip()
        assert value.startswith("enc:v1.") and "sandbox-secret" not in value
        settings = Settings.load([], environ={"ENCRYPTION_KEY": _LOGIN_KEY_1, "UPSTREAM_CLIENT_SECRET": value})
        assert settings.upstream_client_secret == "sandbox-secret"
        rotated = Settings.load([], environ={"ENCRYPTION_KEY": _LOGIN_KEY_2, "ENCRYPTION_KEY_PREVIOUS": _LOGIN_KEY_1,
                                             "UPSTREAM_CLIENT_SECRET": value})
        assert rotated.upstream_client_secret == "sandbox-secret"
        with pytest.raises(SystemExit) as missing:
            Settings.load([], environ={"UPSTREAM_CLIENT_SECRET": value})
        assert "ENCRYPTION_KEY" in str(missing.value.code) and "\n" not in str(missing.value.code)
        with pytest.raises(SystemExit) as wrong:
            Settings.load([], environ={"ENCRYPTION_KEY": _LOGIN_KEY_2, "UPSTREAM_CLIENT_SECRET": value})
        assert "does not decrypt" in str(wrong.value.code) and "sandbox-secret" not in str(wrong.value.code)

    def test_enc_setting_without_key_exits_with_one_line(self):
        value = "enc:" + mcp_server._Vault(_LOGIN_KEY_1).encrypt(
            "sandbox-secret", mcp_server._setting_ad("UPSTREAM_CLIENT_SECRET"))
        result = run_cli(["--no-auth"], env=clean_env(UPSTREAM_CLIENT_SECRET=value))
        assert result.returncode == 2 and result.stdout == ""
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and "ENCRYPTION_KEY" in lines[0] and "Traceback" not in result.stderr, result.stderr
        no_key = run_cli(["encrypt", "--setting", "MCP_SECRET", "x"], env=clean_env())
        assert no_key.returncode == 2 and len(no_key.stderr.splitlines()) == 1 and "ENCRYPTION_KEY" in no_key.stderr

    def test_enc_client_secret_reaches_the_provider_decrypted(self, start, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)
        value = "enc:" + mcp_server._Vault(_LOGIN_KEY_1).encrypt(
            "sandbox-secret", mcp_server._setting_ad("UPSTREAM_CLIENT_SECRET"))
        tokens = {"access_token": "stub-at-" + secrets.token_hex(8), "expires_in": 60}
        with _auth_Stub({("POST", "/token"): lambda r: (200, {}, tokens)}) as stub:
            loaded = Settings.load([], environ={"ENCRYPTION_KEY": _LOGIN_KEY_1, "UPSTREAM_CLIENT_SECRET": value})
            st = start(base=stub.url, upstream_client_secret=loaded.upstream_client_secret)
            _session, browser, state, _location = self._to_redirect(st)
            r = browser.open(_auth_base(st.port) + "/redirect?" + urllib.parse.urlencode(
                {"code": "c", "state": state}))
            assert r.status == 200, r
            basic = stub.hits("/token")[0]["headers"]["authorization"]
            assert base64.b64decode(basic[6:]).decode() == "sandbox-client:sandbox-secret"

    def test_duplicate_form_parameters_on_login_pages_are_refused_not_a_server_error(self, start, provider):
        """Repeated form parameters on the login and sandbox forms are a 400, not a 500 (bugs-auth.md #1)."""
        st = start()
        _session, started = self._begin(st)
        browser = _login_Browser()
        csrf = _auth_hidden_fields(browser.open(started["url"]).body.decode())["csrf"]
        request = urllib.request.Request(started["url"], data=urllib.parse.urlencode(
            [("csrf", csrf), ("code", "AAAA-AAAA"), ("code", started["pairing_code"])]).encode())
        with pytest.raises(urllib.error.HTTPError) as refused:
            browser.opener.open(request, timeout=WAIT)
        assert refused.value.code == 400, refused.value.read()
        sandbox = http(provider["port"], "POST", "/sandbox/token",
                       {"Host": f"127.0.0.1:{provider['port']}", "Content-Type": "application/x-www-form-urlencoded"},
                       "grant_type=authorization_code&code=a&code=b")
        assert sandbox.status == 400, sandbox

    # -- pages and logs ---------------------------------------------------------------------------------

    def test_every_page_carries_the_security_headers(self, start, provider):
        st = start()
        base = _auth_base(st.port)
        browser = _login_Browser()
        self._sign_in(st, browser)
        _session, started = self._begin(st)
        browser.pair(started["url"], "WRONG-CODE")
        browser.open(base + "/redirect?state=nope&code=x")
        browser.open(base + "/login/never-issued")
        titles = {re.search(rb"<title>(.*?)</title>", page.body).group(1) for page in browser.pages}
        assert {b"Enter your pairing code", b"You are signed in", b"This sign-in has expired",
                b"This sign-in link has expired", b"Sandbox Securities - sign in"} <= titles, titles
        # the MCP server under test runs no sandbox: the generic provider path is what ran
        assert _auth_get(st.port, "/sandbox/authorize?state=x&redirect_uri=y").status == 404

    def test_logs_hold_no_codes_or_tokens(self, tmp_path):
        secret_bits = {"at": "stub-at-" + secrets.token_hex(12), "rt": "stub-rt-" + secrets.token_hex(12),
                       "code": "stub-code-" + secrets.token_hex(12)}
        tokens = {"access_token": secret_bits["at"], "refresh_token": secret_bits["rt"], "expires_in": 3600}

        def api(request):
            ok = request["headers"].get("authorization") == f"Bearer {secret_bits['at']}"
            return (200, {}, {"data": [{"symbol": "INFY", "account_id": "ACC-99991234"}]}) if ok else (401, {}, {})

        with _auth_Stub({("POST", "/token"): lambda r: (200, {}, tokens), ("GET", "/api/holdings"): api,
                         ("POST", "/revoke"): lambda r: (200, {}, b"")}) as stub:
            env = clean_env(UPSTREAM_AUTHORIZE_URL=stub.url + "/authorize", UPSTREAM_TOKEN_URL=stub.url + "/token",
                            UPSTREAM_REVOKE_URL=stub.url + "/revoke", UPSTREAM_API_BASE=stub.url + "/api",
                            UPSTREAM_CLIENT_ID="sandbox-client", UPSTREAM_CLIENT_SECRET="sandbox-secret",
                            ENCRYPTION_KEY=_LOGIN_KEY_1, ENCRYPTION_IV="00" * 16, LOG_LEVEL="debug")
            with Proc([SERVER_FILE, "--no-auth", "--port", "0"], env=env) as proc:
                port = _login_port_of(proc)
                session = _auth_Session(port)
                session.initialize()
                started = session.call("login")["structuredContent"]
                browser = _login_Browser()
                assert browser.pair(started["url"], "WRONG-CODE").status == 200
                to_provider = browser.pair(started["url"], started["pairing_code"])
                query = _auth_location(to_provider, stub.url + "/authorize")
                done = browser.open(f"{_auth_base(port)}/redirect?" + urllib.parse.urlencode(
                    {"code": secret_bits["code"], "state": query["state"]}))
                assert done.status == 200, done
                # PKCE on the generic path: the verifier sent matches the challenge shown to the provider
                form = dict(urllib.parse.parse_qsl(stub.hits("/token")[0]["body"].decode()))
                assert form["code"] == secret_bits["code"] and form["redirect_uri"] == query["redirect_uri"]
                verifier_digest = hashlib.sha256(form["code_verifier"].encode()).digest()
                assert _auth_b64url(verifier_digest) == query["code_challenge"]
                holdings = session.call("holdings")
                assert holdings["structuredContent"]["data"][0]["account_id"] == "XXXXXXXX1234", holdings
                assert session.call("logout")["content"][0]["text"].startswith("Logged out")
                revoked = {dict(urllib.parse.parse_qsl(r["body"].decode()))["token"] for r in stub.hits("/revoke")}
                assert revoked == {secret_bits["at"], secret_bits["rt"]}
                proc.proc.send_signal(signal.SIGTERM)
                assert proc.proc.wait(WAIT) == 0
                for thread in proc._threads:
                    thread.join(WAIT)
            stderr = bytes(proc.stderr).decode("utf-8", "replace")
        assert "ENCRYPTION_IV is ignored" in stderr, stderr  # accepted, with a warning
        assert "upstream login completed" in stderr  # the log is there, and says what happened
        tx = started["url"].rsplit("/", 1)[1]
        pairing = started["pairing_code"]
        for secret in (*secret_bits.values(), tx, pairing, pairing.replace("-", ""), query["state"],
                       form["code_verifier"], "sandbox-secret", _LOGIN_KEY_1):
            assert secret not in stderr, f"{secret!r} reached the log"


class TestLoginRounds:
    """The login tool offers its link as a URL-mode elicitation where the client supports it."""

    def _server(self):
        server = mcp_server._builtin_server(Settings(auth="none"))
        server._local_base = "http://127.0.0.1:9"
        return server

    def _call(self, server, params, caps):
        async def go():
            ctx = Context(server, "tools/call", params, 1, version=MODERN, modern=True, capabilities=caps,
                          principal="user-1", base_url="https://mcp.example.com")
            return await server._respond(ctx)
        return asyncio.run(go())

    def test_a_2026_client_gets_an_input_round_and_its_retry_keeps_the_same_link(self):
        server = self._server()
        caps = {"elicitation": {"url": {}}}
        first, _ = self._call(server, {"name": "login", "arguments": {}}, caps)
        result = first["result"]
        assert result["resultType"] == "input_required"
        ask = result["inputRequests"]["login"]
        assert ask["method"] == "elicitation/create" and ask["params"]["mode"] == "url"
        assert ask["params"]["url"].startswith("https://mcp.example.com/login/")
        assert "pairing code" in ask["params"]["message"]
        second, _ = self._call(server, {"name": "login", "arguments": {}, "requestState": result["requestState"],
                                        "inputResponses": {"login": {"action": "accept"}}}, caps)
        done = second["result"]
        assert done["resultType"] == "complete"
        assert done["structuredContent"]["url"] == ask["params"]["url"]  # the same transaction
        assert done["structuredContent"]["pairing_code"] in ask["params"]["message"]

    def test_without_url_elicitation_the_link_comes_at_once(self):
        done, _ = self._call(self._server(), {"name": "login", "arguments": {}}, {"elicitation": {}})
        assert done["result"]["resultType"] == "complete"
        assert done["result"]["structuredContent"]["url"].startswith("https://mcp.example.com/login/")


class TestBrowserForms:
    """What a real browser sends: a form POST from a page with Referrer-Policy: same-origin carries
    the page's real Origin (Fetch spec), so the login, consent and sandbox forms accept exactly their
    own origin and refuse ``Origin: null`` (what a sandboxed iframe or data: URL of an attacker
    sends; under the old no-referrer policy browsers sent it too, which is why it used to pass)."""

    def _asgi(self, app, method, path, headers, body=b""):
        sent = []

        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": method, "path": path, "root_path": "", "query_string": b"",
                 "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
                 "server": ("127.0.0.1", 6901), "client": ("127.0.0.1", 5000), "scheme": "http",
                 "http_version": "1.1"}
        asyncio.run(app(scope, receive, send))
        return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])

    def test_origin_null_is_refused_by_the_browser_forms_and_the_mcp_endpoint(self):
        """(This test asserted the opposite for the login form before issue 18: null reached it.)"""
        server = mcp_server._builtin_server(Settings(auth="builtin", auth_rate_limit=0))
        form = {"Host": "127.0.0.1:6901", "Content-Type": "application/x-www-form-urlencoded"}
        for origin in ("null", "http://localhost:6902", "https://evil.example"):
            for path in ("/login/unknown-transaction", "/authorize", "/sandbox/authorize"):
                status, body = self._asgi(server.asgi, "POST", path, {**form, "Origin": origin}, b"csrf=x&code=y")
                assert status == 403 and b"Origin" in body, (origin, path, status, body)
        status, body = self._asgi(server.asgi, "POST", "/mcp", {**form, "Origin": "null",
                                                                "Content-Type": "application/json"},
                                  b'{"jsonrpc":"2.0","id":1,"method":"ping"}')
        assert status == 403 and b"Origin" in body
        # the page's own origin reaches the form, which answers for itself
        status, body = self._asgi(server.asgi, "POST", "/login/unknown-transaction",
                                  {**form, "Origin": "http://127.0.0.1:6901"}, b"csrf=x&code=y")
        assert status == 400 and b"expired" in body


# ---- providers (issue 24): Kite Connect, OpenID Connect, plugged-in providers, confirmed orders ----


def _prov_query(url: str) -> dict:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))


class _prov_FakeOIDC(_auth_Stub):
    """A local OpenID Connect provider that speaks the real protocol: discovery, JWKS (RS256), an
    authorize page whose form redirects with ``code``, ``state`` and ``iss`` (RFC 9207), a token
    endpoint that checks PKCE and the client's secret and returns an ID token with the login's
    nonce, and a bearer API.  ``flaw`` makes it misbehave the way an attacker's provider would."""

    CLIENT, SECRET = "fake-client", "fake-secret-0123456789"

    def __init__(self, flaw: str = ""):
        super().__init__()
        from cryptography.hazmat.primitives.asymmetric import rsa
        self.flaw = flaw
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.codes: dict = {}
        self.tokens: set = set()
        self.routes.update({
            ("GET", "/.well-known/openid-configuration"): self._discovery, ("GET", "/jwks"): self._jwks,
            ("GET", "/authorize"): self._page, ("POST", "/authorize"): self._approve,
            ("POST", "/token"): self._token, ("GET", "/api/profile"): self._profile})

    @property
    def issuer(self) -> str:
        return self.url

    def _discovery(self, request):
        return 200, {}, {"issuer": self.issuer + ("/other" if self.flaw == "discovery_issuer" else ""),
                         "authorization_endpoint": self.url + "/authorize", "token_endpoint": self.url + "/token",
                         "jwks_uri": self.url + "/jwks", "response_types_supported": ["code"],
                         "authorization_response_iss_parameter_supported": True,
                         "id_token_signing_alg_values_supported": ["RS256"]}

    def _jwks(self, request):
        import jwt
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        return 200, {}, {"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "RS256"}]}

    def _page(self, request):
        query = dict(urllib.parse.parse_qsl(request["query"]))
        assert query["client_id"] == self.CLIENT and query["code_challenge_method"] == "S256", query
        hidden = "".join(f"<input type=hidden name={k} value='{v}'>" for k, v in query.items())
        return 200, {k.decode(): v.decode() for k, v in mcp_server._HTML_HEADERS} | {"Content-Type": "text/html"}, (
            f"<title>Fake IdP</title><form method=post>{hidden}<button>Sign in</button></form>").encode()

    def _approve(self, request):
        fields = dict(urllib.parse.parse_qsl(request["body"].decode()))
        code = secrets.token_urlsafe(16)
        self.codes[code] = fields
        answer = {"code": code, "state": fields["state"], "iss": self.issuer}
        answer.update({"iss_param": {"iss": self.issuer + "/evil"}, "no_iss": {"iss": None}}.get(self.flaw, {}))
        location = fields["redirect_uri"] + "?" + urllib.parse.urlencode({k: v for k, v in answer.items() if v})
        return 302, {"Location": location, "Cache-Control": "no-store"}, b""

    def _token(self, request):
        import jwt
        fields = dict(urllib.parse.parse_qsl(request["body"].decode()))
        asked = self.codes.pop(fields.get("code"), None)
        basic = base64.b64encode(f"{self.CLIENT}:{self.SECRET}".encode()).decode()
        verifier = fields.get("code_verifier", "")
        if (asked is None or request["headers"].get("authorization") != "Basic " + basic
                or _auth_b64url(hashlib.sha256(verifier.encode()).digest()) != asked["code_challenge"]
                or fields.get("redirect_uri") != asked["redirect_uri"]):
            return 400, {}, {"error": "invalid_grant"}
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": "user-42", "aud": self.CLIENT, "iat": now, "exp": now + 300,
                  "nonce": asked.get("nonce"), "email": "asha.rao@example.com"}
        claims.update({"wrong_nonce": {"nonce": "not-this-login"}, "wrong_aud": {"aud": "another-client"},
                       "expired": {"exp": now - 120, "iat": now - 600},
                       "wrong_iss": {"iss": "https://evil.example"}}.get(self.flaw, {}))
        key = self.other_key if self.flaw == "foreign_key" else self.key
        access = secrets.token_urlsafe(16)
        self.tokens.add(access)
        return 200, {}, {"access_token": access, "token_type": "Bearer", "expires_in": 300,
                         "id_token": jwt.encode(claims, key, algorithm="RS256", headers={"kid": "k1"})}

    def _profile(self, request):
        token = request["headers"].get("authorization", "")[7:]
        if token not in self.tokens:
            return 401, {}, {"error": "invalid_token"}
        return 200, {}, {"sub": "user-42", "name": "Asha", "email": "asha.rao@example.com"}


class _prov_Legacy(_auth_Session):
    """A legacy session that answers the server's elicitation requests with ``answer`` and
    records them; ``call`` may resend a request id (a client's retry)."""

    def __init__(self, port: int, answer=None, **kwargs):
        super().__init__(port, **kwargs)
        self.answer, self.asked = answer, []

    def call(self, name: str, arguments: dict | None = None) -> dict:
        return self.call_with_id(name, arguments or {}, self.next_id())

    def call_with_id(self, name: str, arguments: dict, request_id) -> dict:
        body = self.body("tools/call", {"name": name, "arguments": arguments}, request_id)
        with Conn(self.port) as conn:
            conn.request("POST", "/mcp", self.headers(), body)
            resp = conn.read_head()
            assert resp.status == 200, resp
            if resp.content_type != "text/event-stream":
                resp.body = b"".join(conn.iter_body(resp))
                return resp.json()["result"]
            stream = SSEStream(conn, resp)
            while True:
                message = stream.next_message()
                assert message is not None, "the stream ended without a response"
                if "method" in message and "id" in message:
                    self.asked.append(message)
                    reply = self.post({"jsonrpc": "2.0", "id": message["id"], "result": self.answer(message)})
                    assert reply.status == 202, reply
                elif message.get("id") == request_id:
                    return message["result"]


_PROV_CONFIRM = {"action": "accept", "content": {"confirm": True}}


class TestProviders:
    """Issue 24: the upstream login through each provider kind (against local fakes of the real
    protocols, in a browser with cookies), a provider plugged in from the docs, and the tools that
    change the account (confirmed through elicitation at both eras, never twice)."""

    @staticmethod
    def _settings(**overrides) -> Settings:
        return Settings(**{"auth": "none", "encryption_key": _LOGIN_KEY_1, **overrides})

    def _start(self, make_server, provider=None, **overrides):
        if provider is None:
            return make_server(mcp_server._builtin_server(self._settings(**overrides)))
        server = MCPServer("providers", settings=self._settings(**overrides))
        server.add_login_tools(provider=provider)
        return make_server(server)

    @staticmethod
    def _to_provider(st, session=None, browser=None) -> tuple:
        """(session, browser, redirect to the provider) after the login tool and the pairing code."""
        if session is None:
            session = _auth_Session(st.port)
            session.initialize()
        started = session.call("login")["structuredContent"]
        browser = browser or _login_Browser()
        to_provider = browser.pair(started["url"], started["pairing_code"])
        assert to_provider.status == 302, to_provider
        return session, browser, to_provider.header("location")

    @staticmethod
    def _sandbox_sign_in(browser, location: str, user: str = "asha") -> str:
        page = browser.open(location)
        assert page.status == 200 and b"SANDBOX" in page.body, page
        back = browser.open(location, {**_auth_hidden_fields(page.body.decode()), "user": user})
        assert back.status == 302, back
        return back.header("location")

    def _sandbox_login(self, st, session=None) -> tuple:
        session, browser, location = self._to_provider(st, session)
        callback = self._sandbox_sign_in(browser, location)
        done = browser.open(callback)
        assert done.status == 200 and b"You are signed in" in done.body, done
        return session, browser

    @staticmethod
    def _stored(st, uid: str) -> dict:
        record = st.run(st.server._runtime().store.get(mcp_server._user_key(uid)))
        return json.loads(st.server._login.vault().decrypt(record["cred"], mcp_server._credentials_ad(uid)))

    # -- Kite Connect -----------------------------------------------------------------------------------

    def test_kite_login_is_the_real_kite_exchange_and_binds_the_callback_to_the_browser(self, make_server):
        st = self._start(make_server, upstream_provider="sandbox-kite")
        session, browser, location = self._to_provider(st)
        parts, query = urllib.parse.urlsplit(location), _prov_query(location)
        assert parts.path == "/sandbox/kite/connect/login" and set(query) == {"v", "api_key", "redirect_params"}
        assert query["v"] == "3" and query["api_key"] == "sandbox-kite-key", query
        state = dict(urllib.parse.parse_qsl(query["redirect_params"]))["state"]
        callback = self._sandbox_sign_in(browser, location)
        answer = _prov_query(callback)
        assert answer["status"] == "success" and answer["request_token"] and answer["state"] == state
        assert "code" not in answer
        # a stranger's browser (no nonce cookie) can neither finish nor use up the login
        stranger = _login_Browser().open(callback)
        assert stranger.status == 400 and b"another browser" in stranger.body, stranger
        done = browser.open(callback)
        assert done.status == 200 and b"You are signed in" in done.body, done
        replay = browser.open(callback)
        assert replay.status == 400 and b"expired" in replay.body, replay
        cred = self._stored(st, "session:" + session.sid)
        assert set(cred) == {"access_token", "expires_at"}, cred  # Kite's profile in the session answer is not kept
        holdings = session.call("holdings")
        assert not holdings.get("isError") and "INFY" in json.dumps(holdings), holdings
        profile = json.dumps(session.call("profile"))
        assert "Asha Rao" in profile and not [raw for raw in _LOGIN_RAW_ASHA if raw in profile], profile
        assert session.call("logout")["content"][0]["text"].startswith("Logged out")
        token_key = "mcp:sandbox:at:" + hashlib.sha256(cred["access_token"].encode()).hexdigest()
        assert st.run(st.server._runtime().store.get(token_key)) is None  # DELETE /session/token reached Kite
        _login_assert_not_logged_in(session)

    def test_the_kite_api_takes_only_its_token_header_and_version(self, make_server):
        st = self._start(make_server, upstream_provider="sandbox-kite")
        session, _browser = self._sandbox_login(st)
        token = self._stored(st, "session:" + session.sid)["access_token"]
        base = f"/sandbox/kite/portfolio/holdings"
        for headers, status in (({"Authorization": f"Bearer {token}", "X-Kite-Version": "3"}, 403),
                                ({"Authorization": f"token sandbox-kite-key:{token}"}, 400),
                                ({"Authorization": f"token another-key:{token}", "X-Kite-Version": "3"}, 403),
                                ({"Authorization": f"token sandbox-kite-key:{token}", "X-Kite-Version": "3"}, 200)):
            r = _auth_get(st.port, base, headers)
            assert r.status == status, (headers, r)

    def test_the_kite_sign_in_form_takes_posts_only_from_its_own_origin(self, make_server):
        st = self._start(make_server, upstream_provider="sandbox-kite")
        for origin in ("null", "https://evil.example", f"http://localhost:{st.port}"):
            r = _auth_post_form(st.port, "/sandbox/kite/connect/login", {"user": "asha", "request": "x"},
                                {"Origin": origin})
            assert r.status == 403 and b"Origin" in r.body, (origin, r)

    def test_a_wrong_kite_checksum_is_refused_and_nothing_is_stored(self, make_server):
        provider = mcp_server.KiteProvider(api_key="sandbox-kite-key", api_secret="not-the-secret",
                                           login_url="{base}/sandbox/kite/connect/login",
                                           api_base="{local}/sandbox/kite")
        provider.sandbox = True
        st = self._start(make_server, provider)
        session, browser, location = self._to_provider(st)
        failed = browser.open(self._sandbox_sign_in(browser, location))
        assert failed.status == 502 and b"Kite refused the session" in failed.body, failed
        _login_assert_not_logged_in(session, "holdings")

    def test_a_kite_callback_without_success_says_so(self, make_server):
        st = self._start(make_server, upstream_provider="sandbox-kite")
        session, browser, location = self._to_provider(st)
        state = dict(urllib.parse.parse_qsl(_prov_query(location)["redirect_params"]))["state"]
        page = browser.open(f"{_auth_base(st.port)}/redirect?" + urllib.parse.urlencode(
            {"state": state, "status": "cancelled", "action": "login"}))
        assert page.status == 400 and b"Sign-in was not completed" in page.body, page

    def test_the_settings_choose_the_preset(self):
        kite = mcp_server._provider_from_settings(Settings(upstream_provider="kite", upstream_client_id="k",
                                                           upstream_client_secret="s"))
        assert isinstance(kite, mcp_server.KiteProvider) and not kite.sandbox
        assert kite.login_url == "https://kite.zerodha.com/connect/login" and kite.api_base == "https://api.kite.trade"
        oidc = mcp_server._provider_from_settings(Settings(upstream_issuer="https://id.example", upstream_client_id="c"))
        assert isinstance(oidc, mcp_server.OIDCProvider) and oidc.scopes == "openid"
        assert mcp_server._provider_from_settings(Settings()).sandbox
        for env, needs in (({"UPSTREAM_PROVIDER": "kite"}, "UPSTREAM_CLIENT_SECRET"),
                           ({"UPSTREAM_PROVIDER": "oidc"}, "UPSTREAM_ISSUER"),
                           ({"UPSTREAM_PROVIDER": "saml"}, "is not oauth2")):
            with pytest.raises(SystemExit) as stopped:
                Settings.load([], env)
            assert needs in str(stopped.value), (env, stopped.value)

    # -- OpenID Connect ---------------------------------------------------------------------------------

    def _oidc(self, make_server, fake, **overrides):
        return self._start(make_server, upstream_issuer=fake.issuer, upstream_client_id=fake.CLIENT,
                           upstream_client_secret=fake.SECRET, upstream_api_base=fake.url + "/api",
                           allow_private_fetch=True, **overrides)

    def test_oidc_discovery_fills_the_endpoints_and_the_id_token_is_checked(self, make_server):
        with _prov_FakeOIDC() as fake:
            st = self._oidc(make_server, fake)
            session, browser, location = self._to_provider(st)
            query = _prov_query(location)
            assert location.startswith(fake.url + "/authorize?") and query["scope"] == "openid", location
            assert query["nonce"] and query["code_challenge_method"] == "S256"
            page = browser.open(location)
            back = browser.open(location, _auth_hidden_fields(page.body.decode()))
            done = browser.open(back.header("location"))
            assert done.status == 200 and b"You are signed in" in done.body, done
            profile = session.call("profile")
            assert not profile.get("isError") and "asha.rao@example.com" not in json.dumps(profile), profile
            assert len(fake.hits("/.well-known/openid-configuration")) == 1  # cached

    @pytest.mark.parametrize("flaw", ["wrong_nonce", "wrong_aud", "expired", "wrong_iss", "foreign_key", "iss_param",
                                      "no_iss"])
    def test_a_bad_id_token_or_a_mixed_up_answer_is_refused(self, make_server, flaw):
        with _prov_FakeOIDC(flaw) as fake:
            st = self._oidc(make_server, fake)
            session, browser, location = self._to_provider(st)
            page = browser.open(location)
            back = browser.open(location, _auth_hidden_fields(page.body.decode()))
            failed = browser.open(back.header("location"))
            assert failed.status == 502 and b"Sign-in failed" in failed.body, (flaw, failed)
            _login_assert_not_logged_in(session, "profile")

    def test_a_discovery_document_for_another_issuer_is_refused(self, make_server):
        with _prov_FakeOIDC("discovery_issuer") as fake:
            st = self._oidc(make_server, fake)
            _session, browser, _ = self._to_provider_failing(st)
            assert fake.hits("/authorize") == []

    def test_discovery_follows_the_ssrf_rules(self, make_server):
        with _prov_FakeOIDC() as fake:
            st = self._start(make_server, upstream_issuer=f"https://127.0.0.1:{fake.port}",
                             upstream_client_id=fake.CLIENT)
            self._to_provider_failing(st, b"non-public")
            st2 = self._start(make_server, upstream_issuer=fake.issuer, upstream_client_id=fake.CLIENT)
            self._to_provider_failing(st2, b"https")
            assert fake.requests == []

    def _to_provider_failing(self, st, why: bytes = b"issuer") -> tuple:
        session = _auth_Session(st.port)
        session.initialize()
        started = session.call("login")["structuredContent"]
        browser = _login_Browser()
        page = browser.pair(started["url"], started["pairing_code"])
        assert page.status == 502 and why in page.body and page.header("location") is None, page
        return session, browser, page

    # -- a provider plugged in from the docs ------------------------------------------------------------

    def test_the_custom_provider_of_the_docs_works(self, make_server):
        """The Python block of docs/login.md's "Providers" section, run as written against a fake
        upstream that speaks what that block says (an API key header, a POSTed query)."""
        with open(os.path.join(ROOT, "docs", "login.md"), encoding="utf-8") as page:
            text = page.read()
        section = text[text.index("## Providers"):]
        block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
        seen = []

        def token(request):
            fields = dict(urllib.parse.parse_qsl(request["body"].decode()))
            return (200, {}, {"token": "tok-" + fields["ticket"]}) if fields.get("app") == "demo-app" \
                else (400, {}, {"error": "bad app"})

        def search(request):
            seen.append(request)
            if request["headers"].get("x-api-key") != "tok-T1":
                return 401, {}, {"error": "who are you"}
            return 200, {}, {"results": [{"symbol": "INFY", "email": "asha.rao@example.com"}]}

        with _auth_Stub({("POST", "/v1/session"): token, ("POST", "/v1/search"): search}) as upstream:
            namespace = {}
            exec(compile(block.replace("https://upstream.example", upstream.url), "docs/login.md", "exec"), namespace)
            namespace["server"].settings = self._settings()
            st = make_server(namespace["server"])
            session, browser, location = self._to_provider(st)
            assert location.startswith(upstream.url + "/signin?"), location
            state = _prov_query(location)["return_state"]
            done = browser.open(f"{_auth_base(st.port)}/redirect?" + urllib.parse.urlencode(
                {"return_state": state, "ticket": "T1"}))
            assert done.status == 200 and b"You are signed in" in done.body, done
            result = session.call("search", {"query": "infy"})
            assert not result.get("isError") and "INFY" in json.dumps(result), result
            assert "asha.rao@example.com" not in json.dumps(result)  # masked like every login tool
            assert seen[-1]["method"] == "POST" and json.loads(seen[-1]["body"]) == {"query": "infy"}

    # -- tools that change the account ------------------------------------------------------------------

    def test_trading_tools_are_off_unless_enabled(self):
        for trading, present in ((False, False), (True, True)):
            names = set(mcp_server._builtin_server(self._settings(upstream_trading=trading))._tools)
            assert {"place_order", "cancel_order"} & names == ({"place_order", "cancel_order"} if present else set())

    def _orders(self, session) -> list:
        result = session.call("orders")
        assert not result.get("isError"), result
        return result["structuredContent"]["data"]

    def test_a_session_client_confirms_in_a_form_and_a_resent_request_is_not_placed_twice(self, make_server):
        st = self._start(make_server, upstream_trading=True)
        session = _prov_Legacy(st.port, answer=lambda ask: _PROV_CONFIRM, capabilities={"elicitation": {}})
        session.initialize()
        session, _browser = self._sandbox_login(st, session)
        before = len(self._orders(session))
        order = {"symbol": "infy", "side": "BUY", "quantity": 3, "price": 1500}
        first = session.call_with_id("place_order", order, 900)
        assert not first.get("isError") and first["structuredContent"]["done"] is True, first
        ask = session.asked[-1]["params"]
        assert ask["requestedSchema"]["properties"]["confirm"]["type"] == "boolean"
        assert "buy 3 INFY at 1500" in ask["message"], ask
        again = session.call_with_id("place_order", order, 900)  # the client resends the same request
        assert again["structuredContent"]["replayed"] is True and len(session.asked) == 1, again
        assert again["structuredContent"]["result"] == first["structuredContent"]["result"]
        orders = self._orders(session)
        assert len(orders) == before + 1 and orders[-1]["symbol"] == "INFY" and orders[-1]["status"] == "OPEN"
        # a new request is a new confirmation: cancelling asks again
        order_id = orders[-1]["order_id"]
        cancelled = session.call_with_id("cancel_order", {"order_id": order_id}, 901)
        assert cancelled["structuredContent"]["done"] is True and len(session.asked) == 2, cancelled
        assert self._orders(session)[-1]["status"] == "CANCELLED"

    @pytest.mark.parametrize("answer", [{"action": "decline"}, {"action": "cancel"},
                                        {"action": "accept", "content": {"confirm": False}}])
    def test_without_a_yes_nothing_is_placed(self, make_server, answer):
        st = self._start(make_server, upstream_trading=True, upstream_provider="sandbox-kite")
        session = _prov_Legacy(st.port, answer=lambda ask: answer, capabilities={"elicitation": {}})
        session.initialize()
        self._sandbox_login(st, session)
        before = self._orders(session)
        result = session.call_with_id("place_order", {"symbol": "TCS", "side": "SELL", "quantity": 1}, 50)
        assert result["structuredContent"]["done"] is False and "did not confirm" in _login_text(result), result
        assert self._orders(session) == before

    def test_a_client_that_cannot_ask_is_refused_before_anything_happens(self, make_server):
        st = self._start(make_server, upstream_trading=True)
        for caps in ({}, {"elicitation": {"url": {}}}):
            session = _prov_Legacy(st.port, answer=lambda ask: {"action": "accept"}, capabilities=caps)
            session.initialize()
            self._sandbox_login(st, session)
            before = self._orders(session)
            result = session.call_with_id("place_order", {"symbol": "INFY", "side": "BUY", "quantity": 1}, 7)
            assert result.get("isError") is True and "elicitation" in _login_text(result), result
            assert "Nothing was done" in _login_text(result) and self._orders(session) == before
            assert [ask["params"].get("mode") for ask in session.asked] == (["url"] if caps else [])

    def test_a_2026_client_confirms_through_an_input_round_and_a_retry_places_once(self, make_server):
        st = self._start(make_server, upstream_trading=True, upstream_provider="sandbox-kite", auth="builtin",
                         consent="never", auth_rate_limit=0)
        token = _auth_login(st.port)["access_token"]
        session = _auth_Session(st.port, token)
        session.initialize()
        self._sandbox_login(st, session)
        bearer = {"Authorization": f"Bearer {token}", "Host": f"127.0.0.1:{st.port}"}
        caps = {"elicitation": {"form": {}}}

        def call(name, arguments, **extra):
            r = modern_post(st.port, "tools/call", {"name": name, "arguments": arguments, **extra}, caps=caps,
                            headers=bearer)
            assert r.status == 200, r
            return r.json()["result"]

        before = call("orders", {})["structuredContent"]["data"]
        order = {"symbol": "TCS", "side": "BUY", "quantity": 2}
        first = call("place_order", order)
        assert first["resultType"] == "input_required", first
        ask = first["inputRequests"]["confirm"]
        assert ask["method"] == "elicitation/create" and "buy 2 TCS at market price" in ask["params"]["message"]
        answered = {"requestState": first["requestState"], "inputResponses": {"confirm": _PROV_CONFIRM}}
        placed = call("place_order", order, **answered)
        assert placed["resultType"] == "complete" and placed["structuredContent"]["done"] is True, placed
        retried = call("place_order", order, **answered)  # the client did not see the answer and retries
        assert retried["structuredContent"]["replayed"] is True, retried
        assert retried["structuredContent"]["result"] == placed["structuredContent"]["result"]
        after = call("orders", {})["structuredContent"]["data"]
        assert len(after) == len(before) + 1 and after[-1]["symbol"] == "TCS"
        # a fresh call is a fresh confirmation, and a client that cannot ask gets nothing placed
        assert call("place_order", order)["resultType"] == "input_required"
        refused = modern_post(st.port, "tools/call", {"name": "place_order", "arguments": order}, caps={},
                              headers=bearer).json()["result"]
        assert refused["isError"] is True and "elicitation" in _login_text(refused), refused
        assert len(call("orders", {})["structuredContent"]["data"]) == len(after)


class _orders_Broker(mcp_server.Provider):
    """A broker that takes every order it is sent, but whose gateway answers ``answer``
    (status, parsed body) to it, or raises ``answer`` (an exception)."""

    def __init__(self, answer):
        self.answer, self.placed = answer, []

    async def authorize_url(self, login):
        return "https://broker.example/signin?" + urllib.parse.urlencode({"state": login["state"]})

    async def exchange(self, query, login):
        return {"access_token": "AT-" + query["code"]}

    def request(self, cred, method, path, params=None, body=None):
        return {"method": method, "url": "https://broker.example/api/" + path, "json": body, "headers": {}}

    async def fetch(self, method, url, *, form=None, json=None, headers=None):
        if method != "POST":
            return 200, {"data": self.placed}
        self.placed.append(json)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


class TestOrderReview:
    """The third review of the order tools: an unclear broker answer is never followed by a second
    order, answers count only for questions this server asked (and once), the stored outcome is
    sealed under a hashed key, the confirmation shows what is sent, and order ids stay whole."""

    _settings = staticmethod(TestProviders._settings)  # TestProviders' helpers, not its tests
    _start = TestProviders._start
    _to_provider = staticmethod(TestProviders._to_provider)
    _sandbox_sign_in = staticmethod(TestProviders._sandbox_sign_in)
    _sandbox_login = TestProviders._sandbox_login

    def _modern_caller(self, make_server, **overrides):
        st = self._start(make_server, upstream_trading=True, auth="builtin", consent="never", auth_rate_limit=0,
                         **overrides)
        token = _auth_login(st.port)["access_token"]
        session = _auth_Session(st.port, token)
        session.initialize()
        bearer = {"Authorization": f"Bearer {token}", "Host": f"127.0.0.1:{st.port}"}

        def call(name, arguments, **extra):
            r = modern_post(st.port, "tools/call", {"name": name, "arguments": arguments, **extra},
                            caps={"elicitation": {"form": {}}}, headers=bearer)
            assert r.status == 200, r
            return r.json()["result"]
        return st, session, call

    @pytest.mark.parametrize("answer", [(502, None), (504, {"error": "upstream timed out"}), (200, None),
                                        (302, None), RuntimeError("gateway reset")],
                             ids=["502", "504-json", "200-not-json", "302", "exception"])
    def test_an_unclear_broker_answer_is_never_followed_by_a_second_order(self, make_server, answer):
        broker = _orders_Broker(answer)
        st, session, call = self._modern_caller(make_server, provider=broker)
        session, browser, location = self._to_provider(st, session)
        state = urllib.parse.parse_qs(urllib.parse.urlsplit(location).query)["state"][0]
        done = browser.open(f"{_auth_base(st.port)}/redirect?" + urllib.parse.urlencode({"state": state, "code": "c1"}))
        assert b"You are signed in" in done.body, done
        order = {"symbol": "INFY", "side": "BUY", "quantity": 100}
        first = call("place_order", order)
        answered = {"requestState": first["requestState"], "inputResponses": {"confirm": _PROV_CONFIRM}}
        unclear = call("place_order", order, **answered)
        assert unclear["isError"] is True and "unknown" in _login_text(unclear), unclear
        assert "try again" not in _login_text(unclear), unclear
        for _ in range(2):  # the client's retries of the same request
            again = call("place_order", order, **answered)
            assert again["isError"] is True and "check your orders" in _login_text(again), again
        assert len(broker.placed) == 1

    def test_a_refusal_frees_the_confirmation(self, make_server):
        broker = _orders_Broker((400, {"error": "insufficient funds"}))
        st, session, call = self._modern_caller(make_server, provider=broker)
        session, browser, location = self._to_provider(st, session)
        state = urllib.parse.parse_qs(urllib.parse.urlsplit(location).query)["state"][0]
        browser.open(f"{_auth_base(st.port)}/redirect?" + urllib.parse.urlencode({"state": state, "code": "c1"}))
        order = {"symbol": "INFY", "side": "BUY", "quantity": 1}
        first = call("place_order", order)
        answered = {"requestState": first["requestState"], "inputResponses": {"confirm": _PROV_CONFIRM}}
        refused = call("place_order", order, **answered)
        assert refused["isError"] is True and "refused" in _login_text(refused), refused
        broker.answer = (200, {"order_id": "250101000123456"})
        placed = call("place_order", order, **answered)  # nothing happened: the same yes may go through
        assert placed["structuredContent"]["done"] is True, placed
        assert placed["structuredContent"]["result"] == {"order_id": "250101000123456"}  # whole: cancel needs it
        assert len(broker.placed) == 2

    def test_input_responses_without_request_state_ask_instead_of_placing(self, make_server):
        st, session, call = self._modern_caller(make_server, upstream_provider="sandbox-kite")
        self._sandbox_login(st, session)
        before = call("orders", {})["structuredContent"]["data"]
        order = {"symbol": "TCS", "side": "BUY", "quantity": 500}
        for _ in range(2):
            forged = call("place_order", order, inputResponses={"confirm": _PROV_CONFIRM})  # never asked
            assert forged["resultType"] == "input_required" and "confirm" in forged["inputRequests"], forged
        assert len(call("orders", {})["structuredContent"]["data"]) == len(before)

    def test_a_decline_cannot_be_turned_into_a_yes(self, make_server):
        st, session, call = self._modern_caller(make_server, upstream_provider="sandbox-kite")
        self._sandbox_login(st, session)
        before = call("orders", {})["structuredContent"]["data"]
        order = {"symbol": "INFY", "side": "SELL", "quantity": 40}
        first = call("place_order", order)
        declined = call("place_order", order, requestState=first["requestState"],
                        inputResponses={"confirm": {"action": "decline"}})
        assert declined["structuredContent"]["done"] is False, declined
        later = call("place_order", order, requestState=first["requestState"],
                     inputResponses={"confirm": _PROV_CONFIRM})
        assert later["structuredContent"]["done"] is False and later["structuredContent"]["replayed"], later
        assert len(call("orders", {})["structuredContent"]["data"]) == len(before)

    def test_an_answer_counts_only_for_the_question_asked(self):
        server = build_server()
        state = modern_core(server, "tools/call", {"name": "ask_name"}, caps=TestCore.CAPS)[0]["result"]["requestState"]
        other = {"name": "ask_two", "requestState": state,  # a state of ask_name cannot carry ask_two's answers
                 "inputResponses": {"first": {"action": "accept", "content": {"name": "Eve"}}}}
        assert modern_core(server, "tools/call", other, caps=TestCore.CAPS)[0]["error"]["code"] == -32602
        ctx = mcp_server.Context(server, "tools/call", {"name": "ask_name"}, 1, modern=True,
                                 capabilities=TestCore.CAPS)
        ctx._asked = {"who": mcp_server._question_digest({"method": "elicitation/create",
                                                          "params": {"message": "Another question?"}})}
        ctx._responses = {"who": {"action": "accept", "content": {"name": "Eve"}}}
        with pytest.raises(mcp_server._InputRequired):  # the answer was to another question: asked anew
            asyncio.run(ctx.elicit("Your name?", {"type": "object", "properties": {}}, key="who"))

    def test_the_confirmation_shows_the_exact_price_sent(self, make_server):
        st, session, call = self._modern_caller(make_server, upstream_provider="sandbox-kite")
        self._sandbox_login(st, session)
        first = call("place_order", {"symbol": "TCS", "side": "BUY", "quantity": 1, "price": 1234.56789})
        assert "buy 1 TCS at 1234.56789" in first["inputRequests"]["confirm"]["params"]["message"], first

    def test_the_outcome_is_sealed_under_a_hashed_key(self, make_server, redis_server, redis_url):
        own_db = redis_url.rsplit("/", 1)[0] + "/9"
        r = _redis_py.Redis(host="127.0.0.1", port=redis_server.port, db=9)
        r.flushdb()
        st = self._start(make_server, upstream_trading=True, redis_url=own_db, secret=_REDIS_SECRET)
        victim = _prov_Legacy(st.port, answer=lambda ask: _PROV_CONFIRM, capabilities={"elicitation": {}})
        victim.initialize()
        victim, _browser = self._sandbox_login(st, victim)
        placed = victim.call_with_id("place_order", {"symbol": "INFY", "side": "BUY", "quantity": 1}, 77)
        assert placed["structuredContent"]["done"], placed
        changes = [k for k in r.scan_iter("*") if b":change:" in k]
        assert changes and all(victim.sid.encode() not in k for k in changes), changes
        stored = r.get(changes[0])
        assert stored and b"done" not in stored and b"INFY" not in stored, stored
        again = victim.call_with_id("place_order", {"symbol": "INFY", "side": "BUY", "quantity": 1}, 77)
        assert again["structuredContent"]["replayed"] is True, again  # the sealed outcome reads back

    def test_order_ids_stay_whole_and_placed_by_is_masked(self):
        result = mcp_server._mask({"data": [{"order_id": "250101000123456", "exchange_order_id": "1100000012345678",
                                             "parentOrderId": 250101000123455, "placed_by": "AB1234",
                                             "note": "call 9876543210"}]}, frozenset())
        order = result["data"][0]
        assert order["order_id"] == "250101000123456" and order["exchange_order_id"] == "1100000012345678"
        assert order["parentOrderId"] == 250101000123455
        assert order["placed_by"] == "XXXXXX" and "9876543210" not in order["note"]
        assert mcp_server._mask({"order_id": "250101000123456"}, frozenset({"order_id"}))["order_id"] != \
            "250101000123456"  # MASK_FIELDS still wins

    def test_a_forwarded_address_that_is_not_an_ip_is_not_the_rate_limit_key(self, make_server):
        st = make_server(trusted_proxies=("127.0.0.1",), rate_limit=2)
        statuses = [modern_post(st.port, "tools/list", {}, headers={"X-Forwarded-For": f"10.0.0.1, garbage-{i}"}).status
                    for i in range(3)]
        assert statuses == [200, 200, 429], statuses  # every garbage hop counted as the proxy itself
        assert modern_post(st.port, "tools/list", {}, headers={"X-Forwarded-For": "203.0.113.7"}).status == 200


# ==== Attacks: the chains of the security review (issue 18), one class per surface =============
#
# Each test here is an attack that worked against main at 15f6fa4 (or a member of the same class),
# driven through real HTTP (and a real redis-server where the store matters).  A test names what the
# attacker does and asserts what the server refuses.


class TestAttackExternalIssuer:
    """MCP_AUTH=external: tokens of another identity provider; the audience is configuration."""

    ISSUER = "https://idp.example"
    AUDIENCE = "https://mcp.example/mcp"
    SECRET = "external-issuer-shared-secret-0123456789-abcdefghij"

    def _server(self, make_server, **settings):
        return make_server(auth="external", auth_issuer=self.ISSUER, auth_secret=self.SECRET,
                           auth_audience=self.AUDIENCE, allowed_hosts=("*",), **settings)

    def _token(self, key=None, algorithm="HS256", **claims):
        import jwt
        now = int(time.time())
        body = {"iss": self.ISSUER, "aud": self.AUDIENCE, "sub": "alice", "iat": now, "nbf": now,
                "exp": now + 300, **claims}
        return jwt.encode({k: v for k, v in body.items() if v is not None}, key or self.SECRET,
                          algorithm=algorithm)

    def test_a_token_for_another_resource_server_is_refused_whatever_host_the_request_names(self, make_server):
        st = self._server(make_server)
        _auth_assert_ok(st.port, self._token())
        for audience, host in (("http://other-rs.example/mcp", "other-rs.example"),
                               ("http://127.0.0.1/mcp", "127.0.0.1"),
                               (f"http://127.0.0.1:{st.port}/mcp", f"127.0.0.1:{st.port}")):
            token = self._token(aud=audience)
            r = _auth_post_json(st.port, "/http", {"method": "tools/call", "params": {
                "name": "echo", "arguments": {"text": "x"}}}, {"Authorization": f"Bearer {token}", "Host": host})
            assert r.status == 401, (audience, r)

    def test_forged_expired_and_foreign_tokens_are_refused(self, make_server):
        st = self._server(make_server)
        past = int(time.time()) - 3600
        for token in (self._token(iss="https://evil.example"), self._token(aud=None), self._token(exp=past),
                      self._token(exp=None), self._token(nbf=int(time.time()) + 3600),
                      self._token(key="another-secret-of-thirty-two-bytes-or-more", sub="admin"),
                      self._token(algorithm="HS384"), self._token(sub=""), self._token(sub="  "),
                      self._token(sub=None), _auth_retyped(self._token(), "id_token+jwt", self.SECRET),
                      self._token().rsplit(".", 1)[0] + ".",  # the signature removed
                      _auth_unsigned({"iss": self.ISSUER, "aud": self.AUDIENCE, "sub": "alice",
                                      "exp": int(time.time()) + 300})):
            _auth_assert_refused(st.port, token)

    def test_the_audience_cannot_come_from_the_host_header(self):
        with pytest.raises(SystemExit, match="MCP_PUBLIC_URL"):
            Settings.load([], environ={"MCP_AUTH": "external", "MCP_AUTH_ISSUER": self.ISSUER,
                                       "MCP_AUTH_SECRET": self.SECRET})
        with pytest.raises(SystemExit, match="at least 32 bytes"):
            Settings.load([], environ={"MCP_AUTH": "external", "MCP_AUTH_ISSUER": self.ISSUER,
                                       "MCP_AUTH_SECRET": "short", "MCP_PUBLIC_URL": "https://mcp.example"})
        settings = Settings.load([], environ={"MCP_AUTH": "external", "MCP_AUTH_ISSUER": self.ISSUER,
                                              "MCP_AUTH_SECRET": self.SECRET,
                                              "MCP_PUBLIC_URL": "https://mcp.example"})
        assert settings.auth == "external" and settings.auth_audience == ""

    def test_keys_from_a_jwks_url_and_no_refetch_storm_for_unknown_key_ids(self, make_server):
        import jwt
        from cryptography.hazmat.primitives.asymmetric import rsa
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
        jwks = {"keys": [{**public_jwk, "kid": "k1", "use": "sig", "alg": "RS256"}]}
        with _auth_Stub({("GET", "/jwks"): lambda request: (200, {}, jwks)}) as idp:
            st = make_server(auth="external", auth_issuer=self.ISSUER, auth_jwks_url=idp.url + "/jwks",
                             auth_audience=self.AUDIENCE)
            now = int(time.time())
            claims = {"iss": self.ISSUER, "aud": self.AUDIENCE, "sub": "bob", "iat": now, "exp": now + 300}
            _auth_assert_ok(st.port, jwt.encode(claims, private, algorithm="RS256", headers={"kid": "k1"}))
            # the public key used as an HMAC secret (algorithm confusion) is no key at all
            pem = private.public_key().public_bytes(
                encoding=__import__("cryptography.hazmat.primitives.serialization", fromlist=["x"]).Encoding.PEM,
                format=__import__("cryptography.hazmat.primitives.serialization", fromlist=["x"])
                .PublicFormat.SubjectPublicKeyInfo)
            confused = _auth_unsigned(claims, header={"alg": "HS256", "kid": "k1"}, hmac_key=pem)
            _auth_assert_refused(st.port, confused)
            for i in range(20):  # every token names a key id the issuer never had
                _auth_assert_refused(st.port, jwt.encode(claims, private, algorithm="RS256",
                                                         headers={"kid": f"unknown-{i}"}))
            assert len(idp.hits("/jwks")) <= 2, len(idp.hits("/jwks"))


class TestAttackStoreCopy:
    """Someone with a copy of Redis: the event logs of resumable streams hold nothing readable."""

    def test_a_stream_log_in_redis_is_sealed_and_still_resumes_on_another_instance(self, redis_trio, redis_url):
        a, b, _c = redis_trio
        s = Session(a)
        s.initialize()
        call = s.body("tools/call", {"name": "test_reconnection", "arguments": {}})
        events = s.post(call).events()
        assert events and all(not e.get("data") for e in events)  # closed before the result
        copy = _attack_redis_dump(redis_url)
        assert f":events:" in copy and "sealed:" in copy  # the log is there, sealed
        assert "Reconnection test completed" not in copy and '"jsonrpc"' not in copy
        assert s.sid not in copy  # without authorization the session id is the credential
        g = http(b, "GET", "/mcp", s.headers({"Accept": "text/event-stream", "Content-Type": None,
                                              "Last-Event-ID": events[-1]["id"]}))
        assert g.status == 200, g
        assert _redis_text(final_message(g, call["id"])["result"]) == "Reconnection test completed successfully"

    def test_a_task_record_in_redis_is_sealed_and_polled_anywhere(self, redis_trio, redis_url):
        a, b, _c = redis_trio
        quick = _task_result(_redis_modern_call(a, "slow_compute", {"seconds": 0, "label": "sealed-label-77"},
                                                caps=_TASK_CAPS))
        done = _task_poll(b, quick["taskId"], lambda r: r["status"] == "completed", "the task to complete")
        assert _redis_text(done["result"]) == "Computed sealed-label-77 after 0.0 seconds"
        copy = _attack_redis_dump(redis_url)
        assert "sealed-label-77" not in copy and quick["taskId"] not in copy

    def test_a_sealed_event_cannot_be_moved_to_another_log(self):
        ring = mcp_server._KeyRing("a-secret-that-is-long-enough-for-the-test-0123")
        token = ring.seal_text('{"jsonrpc":"2.0","method":"x"}', "events", "mcp:{s1}:events:1")
        assert ring.unseal_text(token, "events", "mcp:{s1}:events:1") == '{"jsonrpc":"2.0","method":"x"}'
        assert ring.unseal_text(token, "events", "mcp:{s2}:events:1") is None
        assert ring.unseal_text(token, "request_state", "mcp:{s1}:events:1") is None


class TestAttackRefreshRace:
    """A stolen refresh token used at the same moment as the real client's, on two instances."""

    def test_concurrent_refreshes_with_one_token_get_at_most_the_grace_and_then_revoke(self, make_server,
                                                                                       redis_server, redis_url):
        own_db = redis_url.rsplit("/", 1)[0] + "/8"
        _redis_py.Redis(host="127.0.0.1", port=redis_server.port, db=8).flushdb()
        settings = dict(auth="builtin", consent="never", auth_rate_limit=0, redis_url=own_db,
                        secret=_REDIS_SECRET)
        a, b = make_server(**settings), make_server(**settings)
        first = _auth_login(a.port)
        client_id, stolen = first["client"]["client_id"], first["refresh_token"]
        start, answers = threading.Barrier(8), []

        def refresh(port):
            start.wait(WAIT)
            answers.append(_auth_refresh(port, client_id, stolen))

        threads = [threading.Thread(target=refresh, args=((a, b)[i % 2].port,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        issued = [r.json()["refresh_token"] for r in answers if r.status == 200]
        # one rotation and one grace at most; the other six are reuse, which revokes the family, so
        # even those two may end refused, and whatever was issued is dead afterwards
        assert len(answers) == 8 and len(issued) <= 2, [r.status for r in answers]
        assert _auth_refresh(a.port, client_id, stolen).status == 400  # reuse: the family is gone
        later = [_auth_refresh(b.port, client_id, token) for token in issued]
        assert all(r.status == 400 for r in later), [(r.status, r.body) for r in later]


class TestAttackCachedHeads:
    """The parsed-head cache is module-wide: it must never hold a bearer token or a cookie."""

    def test_a_head_with_credentials_is_not_kept(self):
        plain = b"POST /mcp HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json"
        secret = plain + b"\r\nAuthorization: Bearer kept-secret-token-0123456789"
        cookie = plain + b"\r\nCookie: mcp_login=kept-secret-cookie"
        for head in (plain, secret, cookie):
            mcp_server._parse_request_head(head)
        assert plain in mcp_server._REQUEST_HEADS
        assert secret not in mcp_server._REQUEST_HEADS and cookie not in mcp_server._REQUEST_HEADS
        assert not any(b"kept-secret" in head for head in mcp_server._REQUEST_HEADS)


class TestAttackNumbersAndOrigins:
    """Digits that are not ASCII, and origins that only parse as loopback."""

    def test_unicode_digits_in_numeric_headers_are_refused_not_a_500(self, live):
        with Conn(live.port) as conn:
            conn.sock.sendall(b"POST /http HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                              b"Content-Length: \xb2\r\n\r\n")
            assert conn.read_response().status == 400
        s = Session(live.port)
        s.initialize()
        for last in ("s1:\u00b2", "get:\u00b2", "get:" + "9" * 5000, "s1:" + "9" * 5000):
            with Conn(live.port) as conn:  # (a GET stream that opens stays open: the head says enough)
                conn.request("GET", "/mcp", s.headers({"Accept": "text/event-stream", "Content-Type": None,
                                                       "Last-Event-ID": last}))
                head = conn.read_head()
                assert head.status < 500, (last[:12], head)

    @pytest.mark.parametrize("origin", [
        "http://127.0.0.1:{port}.evil", "http://evil.com@127.0.0.1", "http://evil.com\\@localhost",
        "http://[::1]x", "http://127.0.0.1:99999", "file://localhost", "chrome-extension://localhost",
        "javascript://localhost", "http://localhost/path", "http://localhost:80/", "null"])
    def test_an_origin_that_only_parses_as_loopback_is_foreign(self, live, origin):
        r = http(live.port, "POST", "/mcp", {"Origin": origin.format(port=live.port), "Content-Type": "application/json",
                                            "Accept": ACCEPT_BOTH},
                 {"jsonrpc": "2.0", "id": 1, "method": "ping"})
        assert r.status == 403 and r.header("access-control-allow-origin") is None, r

    def test_a_loopback_origin_in_its_proper_form_is_allowed(self, live):
        for origin in (f"http://127.0.0.1:{live.port}", "http://localhost", "https://[::1]:8443", "http://app.localhost:3000"):
            r = http(live.port, "POST", "/http", {"Origin": origin, "Content-Type": "application/json"},
                     {"method": "ping"})
            assert r.status == 200 and r.header("access-control-allow-origin") == origin, (origin, r)


class TestAttackMaskingVariants:
    """Identifiers an upstream returns in shapes the first masking rules missed (second review)."""

    @pytest.mark.parametrize("shape, raw", [
        ({"contact": 9876543210}, "9876543"), ({"data": {"value": 919876543210}}, "91987654"),
        ({"x": 9876543210.0}, "987654"), ({"upi_id": "rahul@okicici"}, "rahul"), ({"vpa": "asha@ybl"}, "asha"),
        ({"note": "pay to rahul@okicici now"}, "rahul@"), ({"dob": "1990-01-01"}, "1990"),
        ({"date_of_birth": "1990-01-01"}, "1990"), ({"address": "12 MG Road, Pune"}, "MG Road"),
        ({"holderName": "Asha Rao"}, "Asha"), ({"username": "asharao"}, "asharao"), ({"user_name": "asharao"}, "asharao"),
        ({"login": "asharao"}, "asharao"), ({"nominee": "Ben Okafor"}, "Okafor"), ({"ucc": "AB1234"}, "AB1234"),
        ({"p": "pan abcde1234f"}, "abcde1234"), ({"p": "AbCdE1234F"}, "AbCdE1234"),
        ({"rows": [{"Permanent-Address": {"line1": "7 Hill St"}}]}, "Hill")])
    def test_the_shape_is_masked(self, shape, raw):
        assert raw not in json.dumps(mcp_server._mask(shape, frozenset()))

    def test_what_a_trader_needs_to_read_stays(self):
        row = {"symbol": "INFY", "quantity": 40, "average_price": 1450.5, "last_price": 1532.25, "pnl": -1875.0,
               "status": "COMPLETE", "name": "Infosys", "exchange": "NSE", "order_id": "SBX-1001"}
        assert mcp_server._mask(row, frozenset()) == row


class TestAttackSandboxFlood:
    """Anyone may sign in at the demo provider: what that stores must not push out real sign-ins."""

    def _sign_ins(self, port: int, count: int) -> dict:
        query = urllib.parse.urlencode({"client_id": "sandbox-client", "redirect_uri": "http://127.0.0.1:1/cb",
                                        "state": "s", "code_challenge": "A" * 43, "code_challenge_method": "S256",
                                        "response_type": "code"})
        page = _auth_get(port, "/sandbox/authorize?" + query)
        assert page.status == 200, page
        fields = {**_auth_hidden_fields(page.body.decode()), "user": "asha"}
        statuses: dict = collections.Counter()
        with Conn(port) as conn:
            for _ in range(count):
                conn.request("POST", "/sandbox/authorize", {
                    "Host": f"127.0.0.1:{port}", "Origin": f"http://127.0.0.1:{port}",
                    "Content-Type": "application/x-www-form-urlencoded"}, urllib.parse.urlencode(fields))
                statuses[conn.read_response().status] += 1
        return statuses

    def _builtin(self, make_server, **settings):
        return make_server(mcp_server._builtin_server(Settings(auth="builtin", consent="never", **settings)))

    def test_a_flood_of_sandbox_sign_ins_does_not_evict_a_signed_in_user(self, make_server):
        st = self._builtin(make_server, auth_rate_limit=0, max_sessions=200)
        token = _auth_login(st.port)["access_token"]
        assert self._sign_ins(st.port, 1000)[302] == 1000  # 1000 codes stored, past 4 x MCP_MAX_SESSIONS
        assert _auth_call(st.port, token, "server_info", {}).status == 200

    def test_sandbox_sign_ins_are_rate_limited_per_address(self, make_server):
        st = self._builtin(make_server, auth_rate_limit=10)
        statuses = self._sign_ins(st.port, 12)
        assert statuses[429] >= 2 and statuses[302] <= 10, statuses


def _auth_retyped(token: str, typ: str, key: str) -> str:
    """The same claims, signed again with another ``typ`` header."""
    import jwt
    return jwt.encode(jwt.decode(token, options={"verify_signature": False}), key, algorithm="HS256",
                      headers={"typ": typ})


def _auth_unsigned(claims: dict, header: dict | None = None, hmac_key: bytes | None = None) -> str:
    """A JWT built by hand: ``alg: none`` with no signature, or HS256 under ``hmac_key``."""
    def part(value) -> str:
        raw = value if isinstance(value, bytes) else json.dumps(value).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    head = part(header or {"alg": "none", "typ": "JWT"}) + "." + part(claims)
    if hmac_key is None:
        return head + "."
    import hmac as _hmac
    return head + "." + part(_hmac.new(hmac_key, head.encode(), hashlib.sha256).digest())

# ---- attacks on the authorization server (redirect URIs, cookies, refresh tokens, redirects, CIMD)

class _attack_DripServer:
    """A client-metadata host that answers every request one byte at a time, forever (until the
    test ends), counting the connections it holds at once and in all."""

    def __init__(self):
        self.stop = threading.Event()
        self.lock = threading.Condition()
        self.open = self.peak = self.total = 0

    def wait_for(self, connections: int) -> None:
        with self.lock:
            assert self.lock.wait_for(lambda: self.total >= connections, WAIT), self.total

    def __enter__(self) -> "_attack_DripServer":
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, name="test-drip", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.sock.close()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.open += 1
                self.total += 1
                self.peak = max(self.peak, self.open)
                self.lock.notify_all()
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn) -> None:
        try:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.0 200 OK\r\nX-Drip: ")
            while not self.stop.wait(0.05):  # the attacker's pace, not a test assertion
                conn.sendall(b"a")
        except OSError:
            pass
        finally:
            conn.close()
            with self.lock:
                self.open -= 1


def _attack_consent_cookie(value: str) -> list:
    """The client ids a signed consent cookie lists (its text half, decoded)."""
    kind, *approved = mcp_server._unb64url(value.split(".")[0]).decode().split(" ")
    assert kind == "consent:", kind
    return approved


class TestAttackOAuth:
    """The authorization server as an attacker sees it: another registrant, a page in the victim's
    browser, a hostile metadata host."""

    CALLBACK = "http://127.0.0.1:9999/callback"

    @pytest.fixture
    def oauth(self, make_server):
        return make_server(auth="builtin", consent="never", auth_rate_limit=0)

    # -- redirect URIs are strings -------------------------------------------------------------------

    @pytest.mark.parametrize("presented", [
        "http://evil.test:8181\\@127.0.0.1:9999/callback",  # urlsplit: 127.0.0.1; a browser: evil.test
        "http://evil.test@127.0.0.1:9999/callback",
        "http://127.0.0.1:9999/callback#frag",
        "http://127.0.0.1:9999/callback\t",
        "http://127.0.0.1:9999/caf\u00e9",
        "http://127.0.0.1:9999/Callback",
        "http://localhost:9999/callback",
        "http://127.0.0.1:9999/callback?extra=1",
        "HTTP://127.0.0.1:9999/callback",
    ])
    def test_authorize_compares_the_redirect_uri_as_a_string(self, oauth, presented):
        client = _auth_register(oauth.port, [self.CALLBACK])
        _verifier, challenge = _auth_pkce()
        r = _auth_authorize(oauth.port, client["client_id"], presented, challenge)
        assert "did not register" in _auth_assert_page(r, 400)

    def test_no_string_but_the_registered_one_matches(self):
        """Seeded: strings near a registered URI (a character inserted, replaced or removed) match
        only when they are that URI, or the loopback URI with another port."""
        rng = random.Random(18)
        alphabet = "\\@#:/?.%\t\r\n aA1\u00e9[]"
        registered = [self.CALLBACK, "https://app.example/cb", "com.example.app:/cb"]
        for _ in range(3000):
            base = rng.choice(registered)
            i = rng.randrange(len(base) + 1)
            text = base[:i] + rng.choice(alphabet) * rng.randint(0, 2) + base[i + rng.randint(0, 1):]
            if mcp_server._redirect_matches(text, registered):
                assert text in registered or re.fullmatch(r"http://127\.0\.0\.1(:[0-9]{1,5})?/callback", text), text

    def test_a_browser_cookie_cannot_stand_in_for_the_consent_cookie(self, make_server):
        st = make_server(auth="builtin", consent="remember", auth_rate_limit=0)
        client = _auth_register(st.port)
        keys = st.run(st.server._keyring())
        _verifier, challenge = _auth_pkce()
        forged = keys.sign(client["client_id"], "cookie")  # what an mcp_browser cookie looks like
        r = _auth_authorize(st.port, client["client_id"], _AUTH_CB, challenge, headers={"Cookie": f"mcp_consent={forged}"})
        _auth_assert_page(r, 200)

    def test_only_the_port_of_a_loopback_redirect_may_differ(self, oauth):
        client = _auth_register(oauth.port, [self.CALLBACK, "https://app.example/cb"])
        code, _verifier = _auth_code(oauth.port, client, "http://127.0.0.1:4321/callback")
        assert code
        _verifier, challenge = _auth_pkce()
        for presented in ("https://app.example:8443/cb", "http://127.0.0.1:4321\\@app.example/cb"):
            r = _auth_authorize(oauth.port, client["client_id"], presented, challenge)
            _auth_assert_page(r, 400)

    @pytest.mark.parametrize("uri", [
        "https://evil.example@app.example/cb", "https://app.example\\@evil.example/cb",
        "http://evil.test:8181\\@127.0.0.1:9999/callback", "https://app.example/cb#x",
        "https://app.example/c b", "https://app.example/cb\r\nSet-Cookie: a=b", "https://app.ex\u00e4mple/cb",
        "https://app%2eexample/cb", "com.example.app://evil@host/cb", "http://127.0.0.1.evil.example/cb",
    ])
    def test_registration_refuses_userinfo_backslash_fragment_and_odd_characters(self, oauth, uri):
        r = _auth_post_json(oauth.port, "/register", {"redirect_uris": [uri]})
        assert r.status == 400 and r.json()["error"] == "invalid_redirect_uri", r

    def test_consent_page_names_the_host_that_receives_the_code(self, make_server):
        st = make_server(auth="builtin", consent="always", auth_rate_limit=0)
        client = _auth_register(st.port, ["https://app.example:8443/cb"], client_name="Trusted \u202eelpmaxe")
        _verifier, challenge = _auth_pkce()
        page = _auth_assert_page(_auth_authorize(st.port, client["client_id"], None, challenge), 200)
        assert "<code>app.example:8443</code>" in page, page
        assert "\u202e" not in page and "its own name for itself" in page

    def test_metadata_document_names_its_host_and_may_not_list_tricky_redirects(self, make_server):
        st = make_server(auth="builtin", consent="always", allow_private_fetch=True, auth_rate_limit=0)
        documents = {"/good.json": [self.CALLBACK], "/bad.json": ["https://evil.example@app.example/cb"]}
        with _auth_Stub({("GET", path): (lambda r, uris=uris: (200, {}, {
                "client_id": f"http://127.0.0.1:{stub.port}{r['path']}", "client_name": "Official App",
                "redirect_uris": uris})) for path, uris in documents.items()}) as stub:
            _verifier, challenge = _auth_pkce()
            page = _auth_assert_page(_auth_authorize(st.port, stub.url + "/good.json", self.CALLBACK, challenge), 200)
            assert f"verified as <code>127.0.0.1:{stub.port}</code>" in page and "Official App" in page, page
            bad = _auth_authorize(st.port, stub.url + "/bad.json", "https://evil.example@app.example/cb", challenge)
            assert "not registered" in _auth_assert_page(bad, 400)

    # -- open redirects --------------------------------------------------------------------------------

    def test_an_error_never_bounces_the_browser_to_an_unapproved_web_client(self, make_server):
        st = make_server(auth="builtin", auth_rate_limit=0)  # consent: remember (the default)
        evil = _auth_register(st.port, ["https://evil.example/landing"])
        r = _auth_get(st.port, "/authorize?" + urllib.parse.urlencode({
            "client_id": evil["client_id"], "response_type": "x", "state": "<b>"}))
        page = _auth_assert_page(r, 400)
        assert "evil.example" in page and "response_type" in page and "<b>" not in page
        # the person may follow the link; it goes to the registered URI with the error
        link = _auth_html.unescape(re.search(r"href='([^']+)'", page).group(1))
        assert link.startswith("https://evil.example/landing?error=unsupported_response_type&"), link

    def test_error_redirects_go_to_the_registered_uri_of_an_approved_client(self, make_server):
        st = make_server(auth="builtin", auth_rate_limit=0)
        client = _auth_register(st.port, ["https://app.example/cb"])
        _verifier, challenge = _auth_pkce()
        page = _auth_authorize(st.port, client["client_id"], None, challenge)
        fields = _auth_hidden_fields(page.body.decode())
        answer = _auth_post_form(st.port, "/authorize", {**fields, "decision": "approve"},
                                 {"Cookie": f"mcp_csrf={fields['csrf']}", "Origin": _auth_base(st.port)})
        remembered = _auth_cookies(answer)["mcp_consent"]
        r = _auth_get(st.port, "/authorize?" + urllib.parse.urlencode({
            "client_id": client["client_id"], "response_type": "x", "state": "s\r\nX: y"}),
            {"Cookie": f"mcp_consent={remembered}"})
        query = _auth_location(r, "https://app.example/cb")
        assert query["error"] == "unsupported_response_type" and query["state"] == "s\r\nX: y"
        assert "\r" not in r.header("location") and "\n" not in r.header("location")

    @pytest.fixture
    def sandbox(self, make_server):
        server = build_server(auth="builtin", consent="never", auth_rate_limit=0)
        server.add_login_tools()
        return make_server(server)

    def test_the_sandbox_sign_in_redirects_only_where_its_page_was_asked_to(self, sandbox):
        port = sandbox.port
        direct = _auth_post_form(port, "/sandbox/authorize", {
            "user": "asha", "redirect_uri": "https://evil.example/x", "state": "s", "client_id": "sandbox-client"},
            {"Origin": _auth_base(port)})
        assert direct.status == 400 and direct.header("location") is None, direct
        for query in ("redirect_uri=javascript:alert(1)", "redirect_uri=https://a@evil.example/",
                      "redirect_uri=https://ok.example/cb&client_id=other"):
            r = _auth_get(port, f"/sandbox/authorize?state=s&code_challenge={'a' * 43}&client_id=sandbox-client&"
                          + query)
            _auth_assert_page(r, 400)

    def test_the_sandbox_code_is_bound_to_its_client_and_redirect_uri(self, sandbox):
        port = sandbox.port
        verifier, challenge = _auth_pkce()
        target = "https://app.example/redirect"
        query = urllib.parse.urlencode({"state": "s", "code_challenge": challenge, "client_id": "sandbox-client",
                                        "redirect_uri": target})
        page = _auth_get(port, "/sandbox/authorize?" + query)
        assert "app.example" in _auth_assert_page(page, 200)
        fields = _auth_hidden_fields(page.body.decode())
        back = _auth_post_form(port, "/sandbox/authorize?" + query.replace("app.example", "evil.example"),
                               {**fields, "user": "asha", "redirect_uri": "https://evil.example/"},
                               {"Origin": _auth_base(port)})
        code = _auth_location(back, target)["code"]
        token = {"grant_type": "authorization_code", "code": code, "redirect_uri": target, "code_verifier": verifier}
        assert _auth_post_form(port, "/sandbox/token", {**token, "client_id": "someone-else"}).status == 400

    # -- cookies and Origin ----------------------------------------------------------------------------

    def test_the_whole_sandbox_login_works_from_its_own_origin_and_not_from_null(self, sandbox):
        port = sandbox.port
        token = _auth_login(port)["access_token"]
        session = _auth_Session(port, token)
        session.initialize()
        started = session.call("login")["structuredContent"]
        page = _auth_get(port, started["url"])
        csrf = _auth_hidden_fields(page.body.decode())["csrf"]
        assert "SameSite=Strict" in page.header("set-cookie")
        form = {"csrf": csrf, "code": started["pairing_code"]}
        null = _auth_post_form(port, started["url"][len(_auth_base(port)):], form,
                               {"Cookie": f"mcp_csrf={csrf}", "Origin": "null"})
        assert null.status == 403, null
        to_provider = _auth_post_form(port, started["url"][len(_auth_base(port)):], form,
                                      {"Cookie": f"mcp_csrf={csrf}", "Origin": _auth_base(port)})
        assert to_provider.status == 302, to_provider
        # the nonce must come back on the provider's top-level redirect: Lax, the only one
        assert "mcp_login=" in to_provider.header("set-cookie") and "SameSite=Lax" in to_provider.header("set-cookie")
        sign_in = _auth_get(port, to_provider.header("location"))
        fields = _auth_hidden_fields(sign_in.body.decode())
        back = _auth_post_form(port, to_provider.header("location")[len(_auth_base(port)):],
                               {**fields, "user": "asha"}, {"Origin": _auth_base(port)})
        done = _auth_get(port, back.header("location"),
                         {"Cookie": "mcp_login=" + _auth_cookies(to_provider)["mcp_login"]})
        assert b"You are signed in" in done.body, done
        assert session.call("profile").get("isError") is not True

    def test_an_https_issuer_reads_only_host_prefixed_cookies(self, make_server):
        st = make_server(auth="builtin", auth_rate_limit=0, public_url="https://mcp.example")
        port = st.port
        client = _auth_register(port)
        _verifier, challenge = _auth_pkce()
        page = _auth_authorize(port, client["client_id"], _AUTH_CB, challenge)
        assert "__Host-mcp_csrf=" in page.header("set-cookie") and "Secure" in page.header("set-cookie")
        fields = _auth_hidden_fields(page.body.decode())
        origin = {"Origin": "https://mcp.example"}
        tossed = _auth_post_form(port, "/authorize", {**fields, "decision": "approve"},
                                 {"Cookie": f"mcp_csrf={fields['csrf']}", **origin})
        assert "expired" in _auth_assert_page(tossed, 400)  # a plain name is someone else's cookie
        answer = _auth_post_form(port, "/authorize", {**fields, "decision": "approve"},
                                 {"Cookie": f"__Host-mcp_csrf={fields['csrf']}", **origin})
        assert answer.status == 302, answer
        cookies = [v for n, v in answer.headers if n == "set-cookie"]
        assert all(c.startswith("__Host-") and "SameSite=Strict" in c and "; Secure" in c for c in cookies), cookies
        remembered = _auth_cookies(answer)["__Host-mcp_consent"]
        plain = _auth_authorize(port, client["client_id"], _AUTH_CB, challenge,
                                headers={"Cookie": f"mcp_consent={remembered}"})
        _auth_assert_page(plain, 200)  # not skipped by a cookie any sibling host could have set
        prefixed = _auth_authorize(port, client["client_id"], _AUTH_CB, challenge,
                                   headers={"Cookie": f"__Host-mcp_consent={remembered}"})
        assert "code" in _auth_location(prefixed, _AUTH_CB)

    def test_an_http_issuer_reads_only_plain_cookies(self, make_server):
        st = make_server(auth="builtin", consent="always", auth_rate_limit=0)
        client = _auth_register(st.port)
        _verifier, challenge = _auth_pkce()
        fields = _auth_hidden_fields(_auth_authorize(st.port, client["client_id"], _AUTH_CB, challenge).body.decode())
        answer = _auth_post_form(st.port, "/authorize", {**fields, "decision": "approve"},
                                 {"Cookie": f"__Host-mcp_csrf={fields['csrf']}"})
        _auth_assert_page(answer, 400)

    @pytest.mark.parametrize("origin", ["null", "http://localhost:1", "https://evil.example"])
    def test_a_consent_form_posted_from_another_origin_is_refused(self, make_server, origin):
        st = make_server(auth="builtin", consent="always", auth_rate_limit=0)
        client = _auth_register(st.port)
        _verifier, challenge = _auth_pkce()
        fields = _auth_hidden_fields(_auth_authorize(st.port, client["client_id"], _AUTH_CB, challenge).body.decode())
        answer = _auth_post_form(st.port, "/authorize", {**fields, "decision": "approve"},
                                 {"Cookie": f"mcp_csrf={fields['csrf']}", "Origin": origin})
        assert answer.status == 403 and answer.header("location") is None, answer

    def test_consent_remembers_the_newest_twenty_clients_in_order(self, make_server):
        st = make_server(auth="builtin", auth_rate_limit=0, registrations_per_hour=0)
        cookie, approved = "", []
        for _ in range(22):
            client = _auth_register(st.port)
            _verifier, challenge = _auth_pkce()
            page = _auth_authorize(st.port, client["client_id"], _AUTH_CB, challenge,
                                   headers={"Cookie": cookie} if cookie else None)
            fields = _auth_hidden_fields(page.body.decode())
            answer = _auth_post_form(st.port, "/authorize", {**fields, "decision": "approve"},
                                     {"Cookie": f"mcp_csrf={fields['csrf']}" + (f"; {cookie}" if cookie else "")})
            cookie = "mcp_consent=" + _auth_cookies(answer)["mcp_consent"]
            approved.append(client["client_id"])
        assert _attack_consent_cookie(cookie.partition("=")[2]) == approved[-20:]

    # -- refresh tokens --------------------------------------------------------------------------------

    def test_a_replaced_refresh_token_works_once_then_revokes_the_family(self, oauth):
        port = oauth.port
        first = _auth_login(port)
        client_id = first["client"]["client_id"]
        assert _auth_refresh(port, client_id, first["refresh_token"]).status == 200  # the answer is lost
        retry = _auth_refresh(port, client_id, first["refresh_token"])
        assert retry.status == 200, retry
        again = _auth_refresh(port, client_id, first["refresh_token"])
        assert again.status == 400 and again.json()["error"] == "invalid_grant", again
        assert _auth_refresh(port, client_id, retry.json()["refresh_token"]).status == 400  # family revoked
        _auth_assert_refused(port, retry.json()["access_token"])

    def test_a_replaced_refresh_token_is_dead_after_the_grace_window(self, oauth, monkeypatch):
        port = oauth.port
        first = _auth_login(port)
        client_id = first["client"]["client_id"]
        second = _auth_refresh(port, client_id, first["refresh_token"])
        assert second.status == 200, second
        later = time.time() + mcp_server._REFRESH_GRACE + 1
        monkeypatch.setattr(mcp_server, "_now", lambda: later)
        late = _auth_refresh(port, client_id, first["refresh_token"])
        assert late.status == 400 and late.json()["error"] == "invalid_grant", late
        assert _auth_refresh(port, client_id, second.json()["refresh_token"]).status == 400

    def test_a_refresh_cannot_change_the_resource(self, oauth):
        first = _auth_login(oauth.port)
        r = _auth_post_form(oauth.port, "/token", {
            "grant_type": "refresh_token", "refresh_token": first["refresh_token"],
            "client_id": first["client"]["client_id"], "resource": _auth_base(oauth.port) + "/sse"})
        assert r.status == 400 and r.json()["error"] == "invalid_target", r

    # -- registrations -----------------------------------------------------------------------------------

    def test_registrations_are_capped_per_address(self, make_server):
        st = make_server(auth="builtin", auth_rate_limit=0, registrations_per_hour=3)
        for _ in range(3):
            _auth_register(st.port)
        r = _auth_post_json(st.port, "/register", {"redirect_uris": [_AUTH_CB]})
        assert r.status == 429 and "registrations" in r.json()["error"]["message"], r
        assert int(r.header("retry-after")) <= 3600
        bad = _auth_post_json(st.port, "/register", {"redirect_uris": ["https://a@b.example/"]})
        assert bad.status == 400, bad  # an invalid one is answered as such, and not counted

    def test_unused_registrations_expire_and_use_keeps_them(self, make_server):
        clock = FakeClock()
        st = make_server(build_server(store=MemoryStore(clock=clock), auth="builtin", consent="never",
                                      auth_rate_limit=0, client_ttl=1000))
        used, unused = _auth_register(st.port), _auth_register(st.port)
        for _ in range(3):
            clock.advance(600)
            assert _auth_code(st.port, used)[0]
        _verifier, challenge = _auth_pkce()
        assert "not registered" in _auth_assert_page(_auth_authorize(st.port, unused["client_id"], _AUTH_CB, challenge))

    def test_in_redis_registrations_expire_and_the_refresh_grace_is_single_use(self, make_server, redis_server,
                                                                              redis_url):
        own_db = redis_url.rsplit("/", 1)[0] + "/9"  # counters of its own (other tests register too)
        _redis_py.Redis(host="127.0.0.1", port=redis_server.port, db=9).flushdb()
        st = make_server(auth="builtin", consent="never", auth_rate_limit=0, redis_url=own_db,
                         secret="attack-oauth", client_ttl=5000, registrations_per_hour=2)
        first = _auth_login(st.port)
        ttl = _redis_py.Redis(host="127.0.0.1", port=redis_server.port, db=9).ttl(f"mcp:oauth:client:{first['client']['client_id']}")
        assert 0 < ttl <= 5000, ttl  # no registration lives forever in Redis
        client_id = first["client"]["client_id"]
        assert _auth_refresh(st.port, client_id, first["refresh_token"]).status == 200
        assert _auth_refresh(st.port, client_id, first["refresh_token"]).status == 200
        assert _auth_refresh(st.port, client_id, first["refresh_token"]).status == 400
        _auth_register(st.port)
        assert _auth_post_json(st.port, "/register", {"redirect_uris": [_AUTH_CB]}).status == 429

    # -- client metadata documents ------------------------------------------------------------------------

    def test_slow_metadata_documents_get_a_deadline_and_a_fetch_cap(self, make_server):
        st = make_server(auth="builtin", consent="never", auth_rate_limit=0, allow_private_fetch=True,
                         client_fetch_timeout=1.0)
        token = _auth_login(st.port)["access_token"]
        with _attack_DripServer() as drip:
            answers: list = []
            _verifier, challenge = _auth_pkce()

            def authorize(i):
                answers.append((i, _auth_authorize(st.port, f"http://127.0.0.1:{drip.port}/c{i}.json", _AUTH_CB,
                                                   challenge)))

            threads = [threading.Thread(target=authorize, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            drip.wait_for(mcp_server._CIMD_MAX_FETCHES)
            _auth_assert_ok(st.port, token)  # tools do not wait for the fetches
            for t in threads:
                t.join(WAIT)
            fetched = [i for i, a in answers if a.status == 400]  # (which four got a place is a race)
            answers = [a for _i, a in answers]
            assert len(answers) == 8 and all(a.status in (400, 503) for a in answers), answers
            assert all(a.content_type == "text/html" and a.header("location") is None for a in answers)
            assert all(b"could not be fetched in time" in a.body for a in answers if a.status == 400)
            busy = [a for a in answers if a.status == 503]
            assert all(b"try again" in a.body for a in busy)
            assert drip.total == 8 - len(busy) and drip.peak <= mcp_server._CIMD_MAX_FETCHES, (drip.total, drip.peak)
            # a document that failed is remembered: no second fetch
            total = drip.total
            _auth_assert_page(_auth_authorize(st.port, f"http://127.0.0.1:{drip.port}/c{fetched[0]}.json", _AUTH_CB,
                                              challenge))
            assert drip.total == total

    def test_a_failed_metadata_document_is_not_fetched_again(self, make_server):
        st = make_server(auth="builtin", consent="never", auth_rate_limit=0, allow_private_fetch=True)
        with _auth_Stub() as stub:  # every path: 404
            _verifier, challenge = _auth_pkce()
            for _ in range(3):
                _auth_assert_page(_auth_authorize(st.port, stub.url + "/client.json", _AUTH_CB, challenge))
                _auth_post_form(st.port, "/revoke", {"token": "x", "client_id": stub.url + "/client.json"})
            assert len(stub.hits("/client.json")) == 1

    def test_a_metadata_document_larger_than_the_cap_is_refused(self, make_server):
        st = make_server(auth="builtin", consent="never", auth_rate_limit=0, allow_private_fetch=True)
        with _auth_Stub({("GET", "/big.json"): lambda r: (200, {}, {
                "client_id": stub.url + "/big.json", "redirect_uris": [_AUTH_CB],
                "padding": "x" * mcp_server._CIMD_LIMIT})}) as stub:
            _verifier, challenge = _auth_pkce()
            page = _auth_assert_page(_auth_authorize(st.port, stub.url + "/big.json", _AUTH_CB, challenge))
            assert "not registered" in page and stub.hits("/big.json")

    @pytest.mark.parametrize("address", ["100.64.0.1", "[2002:7f00:1::1]", "[::ffff:127.0.0.1]",
                                         "[64:ff9b::7f00:1]", "[2001:0:4136:e378:8000:63bf:3fff:fdd2]",
                                         "169.254.169.254", "[fd00::1]", "0.0.0.0"])
    def test_metadata_documents_are_fetched_only_from_global_addresses(self, address):
        with pytest.raises(ValueError, match="non-public"):
            mcp_server._fetch_json_document(f"https://{address}/client.json", False)

    def test_every_endpoint_that_may_fetch_is_rate_limited(self, make_server, monkeypatch):
        frozen = 1_700_000_010.0
        monkeypatch.setattr(mcp_server, "_now", lambda: frozen)
        st = make_server(auth="builtin", consent="never", auth_rate_limit=2)
        for path in ("/revoke", "/token"):
            answers = [_auth_post_form(st.port, path, {"token": "x", "client_id": "nobody"}) for _ in range(3)]
            assert [a.status for a in answers] == [401, 401, 429], (path, answers)
            assert answers[2].header("retry-after") == str(60 - int(frozen) % 60)

    # -- what the server says about itself ------------------------------------------------------------

    def test_metadata_claims_no_openid_connect_features(self, oauth):
        document = _auth_get(oauth.port, "/.well-known/oauth-authorization-server").json()
        assert "id_token_signing_alg_values_supported" not in document
        assert "subject_types_supported" not in document
        assert document["code_challenge_methods_supported"] == ["S256"]



# ---- attacks on the upstream login (pairing, masking, keys and secrets)


_ATTACK_SECRET = "attack-test-secret-0123456789-abcdefghij"  # a shared MCP_SECRET of 40 characters
# The 14 shapes of issue 18 #8 (one raw value each), and values a trading tool must show as they are.
_ATTACK_SHAPES = {
    "panNumber": "ABCPR1234K", "phoneNumber": "+91-98765-43210", "dematId": "IN30012345678901",
    "bankAccountNumber": "001234567890", "emailId": "asha.rao@example.com", "mobileNo": "9876543210",
    "access_token": "at-5f1e2d3c4b5a69788796a5b4", "email": ["first.mail@example.org", "second@example.net"],
    "account_id": {"primary": "ACC-00012345", "linked": [{"no": "ACC-00067890"}]},
    "Customer-ID": "CUST99881234", "user.id": "AB1234XY77", "DP_ID": "IN300123",
    "note": "Call +44-7700-900123 or write to ben.okafor@example.com; PAN BQKPO5678M, account 009876543210, "
            "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhc2hhIn0.c2lnbmF0dXJlLXZhbHVl",
    "secrets": "api_key=9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
}
_ATTACK_RAW = ("ABCPR1234K", "+91-98765-43210", "IN30012345678901", "001234567890", "asha.rao@example.com",
               "9876543210", "at-5f1e2d3c4b5a69788796a5b4", "first.mail@example.org", "second@example.net",
               "ACC-00012345", "ACC-00067890", "CUST99881234", "AB1234XY77", "IN300123", "+44-7700-900123",
               "ben.okafor@example.com", "BQKPO5678M", "009876543210",
               "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhc2hhIn0.c2lnbmF0dXJlLXZhbHVl",
               "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08")
_ATTACK_ORDINARY = {"symbol": "INFY", "quantity": 40, "price": 1532.25, "status": "COMPLETE", "side": "BUY",
                    "order_id": "SBX-1001", "exchange": "NSE", "company": "Infosys", "placed_at": "2026-12-07T09:15:02Z",
                    "summary": "Bought 40 INFY at 1532.25 on 2026-12-07; order SBX-1001 COMPLETE, 2 of 3 filled"}


def _attack_spellings(words: list, rng: random.Random) -> str:
    """One spelling of a key made of ``words``: snake, camel, Pascal, kebab, dotted, SHOUTING,
    spaced or run together."""
    style = rng.randrange(8)
    if style == 0:
        return "_".join(words)
    if style == 1:
        return words[0] + "".join(w.title() for w in words[1:])
    if style == 2:
        return "".join(w.title() for w in words)
    if style == 3:
        return "-".join(words)
    if style == 4:
        return ".".join(words)
    if style == 5:
        return "_".join(words).upper()
    if style == 6:
        return " ".join(w.title() for w in words)
    return "".join(words)


_ATTACK_KEYS = (["pan"], ["pan", "number"], ["phone"], ["phone", "number"], ["mobile", "no"], ["email"],
                ["email", "id"], ["mail"], ["bank", "account", "number"], ["account", "no"], ["account", "id"],
                ["demat", "id"], ["dp", "id"], ["aadhaar"], ["ssn"], ["access", "token"], ["refresh", "token"],
                ["api", "key"], ["password"], ["client", "secret"], ["user", "id"], ["client", "id"],
                ["customer", "id"], ["tel"])


def _attack_free_text(rng: random.Random, raw: list) -> str:
    """A sentence carrying identifiers a provider might put in free text (each added to ``raw``)."""
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    found = [f"{''.join(rng.choices('abcdefghij', k=7))}.{rng.randrange(10, 99)}@mail{rng.randrange(9)}.example.com",
             f"+91-9{rng.randrange(1000, 9999)}-{rng.randrange(10000, 99999)}",
             str(rng.randrange(10 ** 8, 10 ** 12)),
             "".join(rng.choices(letters, k=5)) + str(rng.randrange(1000, 9999)) + rng.choice(letters),
             "eyJ" + "".join(rng.choices("abcdefghijkLMNOP0123", k=20)) + ".eyJ" +
             "".join(rng.choices("qrstuvwxyz45678", k=24)) + "." + "".join(rng.choices("ABCxyz019_-", k=30)),
             secrets.token_hex(20) + "a1"]
    rng.shuffle(found)
    raw.extend(found)
    return "; ".join(f"{rng.choice(('see', 'ref', 'contact', 'id was', 'value'))} {item}" for item in found)


def _attack_nest(rng: random.Random, depth: int, raw: list, ordinary: list, under: bool = False):
    """A random result: dicts and lists, sensitive keys in random spellings with values (nested
    too) recorded in ``raw``, free text with identifiers, and ordinary trading fields (recorded,
    as (key, value), in ``ordinary``)."""
    if under and (depth == 0 or rng.random() < 0.4):
        value = rng.choice([f"S{secrets.token_hex(6)}", rng.randrange(10 ** 9, 10 ** 11)])
        raw.append(str(value))
        return value
    if not under and (depth == 0 or rng.random() < 0.2):
        pick = rng.randrange(3)
        if pick == 0:
            return _attack_free_text(rng, raw)
        if pick == 1:
            return {"comment": _attack_free_text(rng, raw)}
        key = rng.choice(sorted(_ATTACK_ORDINARY))
        ordinary.append((key, _ATTACK_ORDINARY[key]))
        return {key: _ATTACK_ORDINARY[key]}
    if rng.random() < 0.3:
        return [_attack_nest(rng, depth - 1, raw, ordinary, under) for _ in range(rng.randrange(1, 4))]
    result = {}
    for _ in range(rng.randrange(1, 5)):
        if rng.random() < 0.5:
            result[_attack_spellings(rng.choice(_ATTACK_KEYS), rng)] = _attack_nest(rng, depth - 1, raw, ordinary, True)
        elif under:  # an ordinary name under a sensitive key: masked all the same
            result[rng.choice(sorted(_ATTACK_ORDINARY))] = _attack_nest(rng, depth - 1, raw, ordinary, True)
        else:
            key = rng.choice(sorted(_ATTACK_ORDINARY))
            ordinary.append((key, _ATTACK_ORDINARY[key]))
            result[key] = _ATTACK_ORDINARY[key]
    return result


def _attack_pairs(value, found: list) -> list:
    """Every (key, value) pair of scalars anywhere in ``value``."""
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, (dict, list)):
                _attack_pairs(item, found)
            else:
                found.append((key, item))
    elif isinstance(value, list):
        for item in value:
            _attack_pairs(item, found)
    return found


def _attack_redis_dump(redis_url: str) -> str:
    """Every key and string/hash/list value in the Redis database, as one text (what a stolen copy gives)."""
    client = _redis_py.Redis.from_url(redis_url)
    parts = []
    try:
        for key in client.scan_iter(count=1000):
            kind = client.type(key)
            parts.append(key.decode("utf-8", "replace"))
            if kind == b"string":
                parts.append((client.get(key) or b"").decode("utf-8", "replace"))
            elif kind == b"hash":
                parts.extend(f"{k!r}={v!r}" for k, v in client.hgetall(key).items())
            elif kind == b"list":
                parts.extend(v.decode("utf-8", "replace") for v in client.lrange(key, 0, -1))
    finally:
        client.close()
    return "\n".join(parts)


class TestAttackLogin:
    """The upstream login as an attacker sees it: another user of the server, a page in the
    victim's browser, someone holding a copy of Redis, an operator's slip in the settings."""

    @staticmethod
    def _serve(make_server, store=None, **settings) -> ServerThread:
        """The built-in server with its login tools and the sandbox provider, in this process."""
        values = {"auth": "none", "encryption_key": _LOGIN_KEY_1, "auth_rate_limit": 0, **settings}
        server = mcp_server._builtin_server(Settings(**values))
        if store is not None:
            server.store = store
        return make_server(server)

    @staticmethod
    def _to_sandbox(browser, st, started: dict, user: str = "asha") -> str:
        """Pair, sign in at the sandbox: the /redirect URL the provider sends the browser to."""
        to_provider = browser.pair(started["url"], started["pairing_code"])
        assert to_provider.status == 302, to_provider
        page = browser.open(to_provider.header("location"))
        back = browser.open(to_provider.header("location"), {**_auth_hidden_fields(page.body.decode()), "user": user})
        assert back.status == 302 and back.header("location").startswith(_auth_base(st.port) + "/redirect?"), back
        return back.header("location")

    # -- #2: a planted cookie once skipped the pairing code -----------------------------------------------

    def test_a_planted_browser_cookie_does_not_skip_the_pairing_code(self, make_server):
        """The attacker sends the victim's browser through /authorize of the attacker's own client
        (MCP_CONSENT=never: no click), which planted the cookie that skipped pairing; the attacker
        keeps the code, signs in as that session, and sends the victim its login link."""
        st = self._serve(make_server, auth="builtin", consent="never")
        client = _auth_register(st.port)
        verifier, challenge = _auth_pkce()
        victim = _login_Browser()
        planted = victim.open(f"{_auth_base(st.port)}/authorize?" + urllib.parse.urlencode({
            "response_type": "code", "client_id": client["client_id"], "redirect_uri": _AUTH_CB,
            "code_challenge": challenge, "code_challenge_method": "S256"}))
        code = _auth_location(planted, _AUTH_CB)["code"]  # reaches the attacker's redirect URI
        tokens = _auth_exchange(st.port, client["client_id"], code, verifier).json()
        attacker = _auth_Session(st.port, tokens["access_token"])
        attacker.initialize()
        _attacker, started = TestLogin._begin(st, attacker)
        page = victim.open(started["url"])
        assert page.status == 200 and b"Enter your pairing code" in page.body, page  # not a 302 to the provider
        assert b"Never enter a code that someone else gave you" in page.body
        guess = victim.pair(started["url"], "AAAA-AAAA")  # the victim has no code to enter
        assert guess.status == 200 and guess.header("location") is None, guess
        _login_assert_not_logged_in(attacker)

    def test_external_mode_pairs_every_browser_too(self, make_server):
        """MCP_AUTH=external: the principal comes from another issuer's token, and the pairing
        code is asked all the same, whatever cookies the browser brings."""
        import jwt
        issuer, key = "https://idp.example", "external-test-secret-0123456789-abcdefgh"
        st = self._serve(make_server, auth="external", auth_issuer=issuer, auth_secret=key)
        token = jwt.encode({"iss": issuer, "sub": "alice", "aud": _auth_base(st.port) + "/mcp",
                            "exp": int(time.time()) + 600}, key, algorithm="HS256")
        session = _auth_Session(st.port, token)
        session.initialize()
        _session, started = TestLogin._begin(st, session)
        browser = _login_Browser()
        browser.jar.set_cookie(_login_cookiejar.Cookie(
            0, "mcp_browser", "YWxpY2U.AAAAAAAAAAAAAAAA", None, False, "127.0.0.1", False, False, "/", True,
            False, None, False, None, None, {}))  # whatever an attacker planted
        page = browser.open(started["url"])
        assert page.status == 200 and b"Enter your pairing code" in page.body, page
        to_provider = browser.pair(started["url"], started["pairing_code"])
        assert to_provider.status == 302, to_provider
        _login_assert_not_logged_in(session)

    def test_a_login_link_completes_once_in_one_browser(self, make_server):
        st = self._serve(make_server)
        session, started = TestLogin._begin(st)
        first = _login_Browser().pair(started["url"], started["pairing_code"])
        assert first.status == 302, first
        second = _login_Browser().open(started["url"])  # the link, forwarded to or found by another browser
        assert second.status == 400 and b"expired" in second.body, second
        csrf = secrets.token_urlsafe(12)
        paired_again = http(st.port, "POST", urllib.parse.urlsplit(started["url"]).path, {
            "Host": f"127.0.0.1:{st.port}", "Cookie": f"mcp_csrf={csrf}",
            "Content-Type": "application/x-www-form-urlencoded"},
            urllib.parse.urlencode({"csrf": csrf, "code": started["pairing_code"]}))
        assert paired_again.status == 400 and paired_again.header("location") is None, paired_again
        _login_assert_not_logged_in(session)

    def test_a_stranger_opening_the_redirect_url_does_not_use_up_the_sign_in(self, make_server):
        st = self._serve(make_server)
        session, started = TestLogin._begin(st)
        browser = _login_Browser()
        redirect_url = self._to_sandbox(browser, st, started)
        stranger = _login_Browser().open(redirect_url)  # the URL leaked (history, a proxy log, a shoulder)
        assert stranger.status == 400 and b"same browser" in stranger.body, stranger
        done = browser.open(redirect_url)
        assert done.status == 200 and b"You are signed in" in done.body, done
        assert not session.call("holdings").get("isError")
        assert browser.open(redirect_url).status == 400  # and it is single use

    # -- #14: pairing guesses counted atomically -----------------------------------------------------------

    def test_forty_concurrent_pairing_guesses_on_redis_evaluate_at_most_five(self, make_server, redis_url):
        st = self._serve(make_server, redis_url=redis_url, secret=_ATTACK_SECRET)
        _session, started = TestLogin._begin(st)
        path = urllib.parse.urlsplit(started["url"]).path
        csrf = secrets.token_urlsafe(12)  # double-submit: the attacker sets both halves itself
        headers = {"Host": f"127.0.0.1:{st.port}", "Cookie": f"mcp_csrf={csrf}",
                   "Content-Type": "application/x-www-form-urlencoded"}
        alphabet = mcp_server._PAIRING_ALPHABET
        rng = random.Random(1814)
        guesses = []
        while len(guesses) < 40:
            guess = "".join(rng.choice(alphabet) for _ in range(8))
            if guess != started["pairing_code"].replace("-", ""):
                guesses.append(guess)
        answers: list = [None] * len(guesses)
        gate = threading.Barrier(len(guesses))

        def guess_at(i):
            with Conn(st.port) as conn:
                gate.wait(WAIT)
                conn.request("POST", path, headers, urllib.parse.urlencode({"csrf": csrf, "code": guesses[i]}))
                answers[i] = conn.read_response()

        threads = [threading.Thread(target=guess_at, args=(i,)) for i in range(len(guesses))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT * 2)
        assert all(answer is not None for answer in answers)
        evaluated = [a for a in answers if a.status == 200 and b"not right" in a.body]
        assert len(evaluated) <= mcp_server._PAIRING_TRIES - 1, len(evaluated)  # the 5th burns the link
        assert all(a.status in (200, 400) for a in answers), [a.status for a in answers]
        right = http(st.port, "POST", path, headers, urllib.parse.urlencode(
            {"csrf": csrf, "code": started["pairing_code"]}))
        assert right.status == 400 and right.header("location") is None, right  # the transaction is dead

    # -- #6 and the store: what a copy of Redis gives --------------------------------------------------------

    def test_a_copy_of_redis_holds_no_usable_login_secret(self, make_server, redis_url):
        st = self._serve(make_server, redis_url=redis_url, secret=_ATTACK_SECRET)
        session, started = TestLogin._begin(st)
        tx = started["url"].rsplit("/", 1)[1]
        code = started["pairing_code"].replace("-", "")
        dumps = [_attack_redis_dump(redis_url)]
        browser = _login_Browser()
        to_provider = browser.pair(started["url"], started["pairing_code"])
        query = _auth_location(to_provider, to_provider.header("location"))
        dumps.append(_attack_redis_dump(redis_url))
        page = browser.open(to_provider.header("location"))
        back = browser.open(to_provider.header("location"), {**_auth_hidden_fields(page.body.decode()), "user": "asha"})
        assert browser.open(back.header("location")).status == 200
        dumps.append(_attack_redis_dump(redis_url))
        record = st.run(st.server.store.get(mcp_server._user_key("session:" + session.sid)))
        cred = json.loads(st.server._login.vault().decrypt(record["cred"], mcp_server._credentials_ad(
            "session:" + session.sid)))
        everything = "\n".join(dumps)
        for secret in (tx, code, hashlib.sha256(code.encode()).hexdigest(), query["state"], cred["access_token"],
                       cred["refresh_token"], _ATTACK_SECRET, _LOGIN_KEY_1, browser.cookie("mcp_login")):
            assert secret not in everything, f"a copy of Redis holds {secret!r}"
        assert "mcp:server-secret" not in everything
        # the PKCE verifier: no string in the copy hashes to the challenge the provider saw
        for candidate in set(re.findall(r"[A-Za-z0-9_-]{43,128}", everything)):
            assert _auth_b64url(hashlib.sha256(candidate.encode()).digest()) != query["code_challenge"], candidate

    def test_redis_without_a_secret_refuses_to_start_and_keeps_none(self, redis_url):
        result = run_cli(["--port", "0"], env=clean_env(REDIS_URL=redis_url, ENCRYPTION_KEY=_LOGIN_KEY_1))
        assert result.returncode == 2 and result.stdout == "", result
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and "MCP_SECRET" in lines[0] and "REDIS_URL" in lines[0], result.stderr
        assert "mcp:server-secret" not in _attack_redis_dump(redis_url)

    # -- #5: keys and secrets checked before anything is served -----------------------------------------------

    @pytest.mark.parametrize("name, value", [
        ("ENCRYPTION_KEY", "not-a-32-byte-key"), ("ENCRYPTION_KEY", "change-me-to-64-hex-digits"),
        ("ENCRYPTION_KEY_PREVIOUS", "abcd"), ("MCP_SECRET", "s3cret-value"),
        ("MCP_SECRET", "change-me-to-a-long-random-string"), ("MCP_PREVIOUS_SECRET", "old-secret"),
        ("TOKEN_PARAMETER", "seed-key"), ("MCP_SECRET", "a" * 40),
        ("MCP_SECRET", "shared-hs256-secret-for-demo-only-32b")])  # the documentation's own examples
    def test_bad_keys_and_weak_secrets_are_refused_at_start_up(self, name, value):
        env = {"ENCRYPTION_KEY": _LOGIN_KEY_1, name: value}
        result = run_cli(["--port", "0", "--no-auth"], env=clean_env(**env))
        assert result.returncode == 2 and result.stdout == "", result
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and name in lines[0] and "Traceback" not in result.stderr, result.stderr
        assert value not in result.stderr  # the message names the setting, never its value

    def test_development_mode_accepts_a_weak_secret(self):
        env = clean_env(MCP_SECRET="dev-secret", MCP_DEV="1", ENCRYPTION_KEY=_LOGIN_KEY_1)
        with Proc([SERVER_FILE, "--no-auth", "--port", "0"], env=env) as proc:
            port = _login_port_of(proc)
            health = http(port, "GET", "/healthz", {"Host": f"127.0.0.1:{port}"})
            assert health.status == 200, health
            proc.proc.send_signal(signal.SIGTERM)
            assert proc.proc.wait(WAIT) == 0

    def test_a_bad_key_in_a_server_built_in_code_fails_the_request_not_the_process(self, make_server):
        """Settings built in code skip Settings.load: the bad key reaches the first login, which
        once raised SystemExit inside the request and ended the process."""
        server = build_server(encryption_key="not-a-32-byte-key")
        server.add_login_tools()
        st = make_server(server)
        session = _auth_Session(st.port)
        session.initialize()
        for _ in range(2):  # the login refuses (its credentials could not be stored), and again
            message = session.body("tools/call", {"name": "login", "arguments": {}})
            failed = session.post(message)
            assert failed.status == 503 and b"ENCRYPTION_KEY" in failed.body, failed
            assert b"not-a-32" not in failed.body
            assert_alive(st.port)
        with pytest.raises(SystemExit) as refused:
            mcp_server.serve(mcp_server.MCPServer("x", settings=Settings(encryption_key="not-a-32-byte-key")))
        assert "ENCRYPTION_KEY" in str(refused.value.code)

    # -- #15: enc: values bound to their setting; the .env file named ------------------------------------------

    def test_enc_values_are_bound_to_their_setting(self, tmp_path):
        env = clean_env(ENCRYPTION_KEY=_LOGIN_KEY_1)
        made = subprocess.run([sys.executable, SERVER_FILE, "encrypt", "--setting", "UPSTREAM_CLIENT_SECRET", "-"],
                              input="sandbox-secret\n", capture_output=True, text=True, timeout=WAIT * 3,
                              env=env, cwd=str(tmp_path))
        assert made.returncode == 0, made.stderr
        value = made.stdout.strip()
        assert value.startswith("enc:v1.") and "sandbox-secret" not in value
        loaded = Settings.load([], environ={"ENCRYPTION_KEY": _LOGIN_KEY_1, "UPSTREAM_CLIENT_SECRET": value})
        assert loaded.upstream_client_secret == "sandbox-secret"
        with pytest.raises(SystemExit) as moved:  # the same ciphertext moved into another setting
            Settings.load([], environ={"ENCRYPTION_KEY": _LOGIN_KEY_1, "MCP_METRICS_TOKEN": value})
        assert "MCP_METRICS_TOKEN" in str(moved.value.code) and "does not decrypt" in str(moved.value.code)
        unbound = "enc:" + mcp_server._Vault(_LOGIN_KEY_1).encrypt("sandbox-secret", b"config")  # the old format
        with pytest.raises(SystemExit) as old:
            Settings.load([], environ={"ENCRYPTION_KEY": _LOGIN_KEY_1, "UPSTREAM_CLIENT_SECRET": unbound})
        assert "encrypt --setting UPSTREAM_CLIENT_SECRET" in str(old.value.code), old.value.code
        bare = run_cli(["encrypt", "sandbox-secret"], env=env)
        assert bare.returncode == 2 and "--setting" in bare.stderr, bare

    def test_the_dotenv_file_read_is_named_at_start_up_without_its_values(self, tmp_path):
        token = "metrics-" + secrets.token_hex(16)
        (tmp_path / ".env").write_text(f"MCP_METRICS_TOKEN={token}\nAPP_VERSION=7.7.7\n", encoding="utf-8")
        with Proc([SERVER_FILE, "--no-auth", "--port", "0"], cwd=str(tmp_path), env=clean_env()) as proc:
            _login_port_of(proc)
            proc.proc.send_signal(signal.SIGTERM)
            proc.proc.wait(WAIT)
            for thread in proc._threads:
                thread.join(WAIT)
        stderr = bytes(proc.stderr).decode("utf-8", "replace")
        assert str(tmp_path / ".env") in stderr and "MCP_METRICS_TOKEN" in stderr, stderr
        assert token not in stderr and "7.7.7" not in stderr

    # -- #8: masking by key patterns and by value patterns -----------------------------------------------------

    def test_masking_catches_sensitive_keys_in_any_spelling_and_identifiers_in_free_text(self):
        rng = random.Random(20261207)
        names = mcp_server._DEFAULT_MASK_FIELDS
        for round_ in range(300):
            raw, ordinary = [], []
            value = _attack_nest(rng, rng.randrange(1, 6), raw, ordinary)
            masked = mcp_server._mask(value, names)
            text = json.dumps(masked)
            for item in raw:
                assert item not in text, (round_, item, value, masked)
            kept = _attack_pairs(masked, [])
            assert not [pair for pair in ordinary if pair not in kept], (round_, value, masked)
        shapes = mcp_server._mask({**_ATTACK_SHAPES, **_ATTACK_ORDINARY}, names)
        text = json.dumps(shapes)
        assert not [raw for raw in _ATTACK_RAW if raw in text], text
        assert {k: shapes[k] for k in _ATTACK_ORDINARY} == _ATTACK_ORDINARY  # ordinary values untouched
        assert mcp_server._mask({"nomineeName": "R. Rao"}, names | {"nominee_name"}) == {"nomineeName": "XXXXXX"}

    def test_a_login_tool_masks_its_result_its_errors_and_its_log(self, make_server):
        tokens = {"access_token": "stub-at-" + secrets.token_hex(8), "expires_in": 3600}
        with _auth_Stub({("POST", "/token"): lambda r: (200, {}, tokens),
                         ("GET", "/api/holdings"): lambda r: (200, {}, {"data": {**_ATTACK_SHAPES,
                                                                                **_ATTACK_ORDINARY}})}) as stub:
            server = mcp_server._builtin_server(Settings(
                auth="none", encryption_key=_LOGIN_KEY_1, expose_errors=True,
                upstream_authorize_url=stub.url + "/authorize", upstream_token_url=stub.url + "/token",
                upstream_api_base=stub.url + "/api", upstream_client_id="c"))

            @server.tool(mask=True)
            def lookup(kind: str) -> str:
                """A tool of the application, masked like a login tool."""
                if kind == "tool-error":
                    raise ToolError("no account ACC-00012345 for asha.rao@example.com (+91-98765-43210)")
                raise ValueError("lookup failed for panNumber=ABCPR1234K, mail ben.okafor@example.com")

            lines = []
            handler = logging.Handler(logging.ERROR)
            handler.emit = lambda record: lines.append(record.getMessage() + (
                "".join(__import__("traceback").format_exception(*record.exc_info)) if record.exc_info else ""))
            mcp_server.log.addHandler(handler)
            try:
                st = make_server(server)
                session, started = TestLogin._begin(st)
                browser = _login_Browser()
                to_provider = browser.pair(started["url"], started["pairing_code"])
                state = _auth_location(to_provider, stub.url + "/authorize")["state"]
                assert browser.open(_auth_base(st.port) + "/redirect?" + urllib.parse.urlencode(
                    {"code": "c0de", "state": state})).status == 200
                message = session.body("tools/call", {"name": "holdings", "arguments": {}})
                answer = session.post(message)
                result = final_message(answer, message["id"])["result"]
                errors = [session.call("lookup", {"kind": kind}) for kind in ("tool-error", "crash")]
            finally:
                mcp_server.log.removeHandler(handler)
        body = answer.body.decode("utf-8")
        assert not [raw for raw in _ATTACK_RAW if raw in body], body
        data = result["structuredContent"]["data"]
        assert {k: data[k] for k in _ATTACK_ORDINARY} == _ATTACK_ORDINARY
        assert all(e.get("isError") is True for e in errors), errors
        shown = json.dumps(errors) + "\n".join(lines)
        for raw in ("ACC-00012345", "asha.rao@example.com", "+91-98765-43210", "ABCPR1234K", "ben.okafor@example.com"):
            assert raw not in shown, (raw, shown)
        assert any("lookup" in line for line in lines), lines  # the failure was logged, masked



# ---- attacks on sessions and quotas (owners on every route and instance, caps per principal)
#
# The attacker holds a token of their own (the built-in authorization server hands them out to
# anyone) and learns the victim's session id (a log line, a proxy, a shared screen).  A session id
# alone proves nothing: every route that names a session answers 404 unless the token that made it
# comes with it.  With MCP_AUTH=none there is no principal: the session id is then the whole
# credential (192 random bits), and still names one transport only.


def _sess_login(port: int) -> str:
    """An access token from the built-in authorization server (no consent page): what any
    visitor gets.  The issuer may be a shared MCP_PUBLIC_URL, so the redirect is read as is."""
    client = _auth_register(port)
    verifier, challenge = _auth_pkce()
    r = _auth_authorize(port, client["client_id"], _AUTH_CB, challenge, state="s")
    assert r.status == 302, r
    code = urllib.parse.parse_qs(urllib.parse.urlsplit(r.header("location")).query)["code"][0]
    r = _auth_exchange(port, client["client_id"], code, verifier)
    assert r.status == 200, r
    return r.json()["access_token"]


def _sess_headers(port: int, token: str | None, extra: dict | None = None) -> dict:
    base = {"Host": f"127.0.0.1:{port}", "Content-Type": "application/json", "Accept": ACCEPT_BOTH}
    if token:
        base["Authorization"] = f"Bearer {token}"
    return merge_headers(base, extra)


class _SessSSE:
    """An HTTP+SSE client that sends a bearer token: GET /sse, then POST /messages."""

    def __init__(self, port: int, token: str | None, path: str = "/sse"):
        self.port, self.token = port, token
        self.conn = Conn(port)
        self.conn.request("GET", path, _sess_headers(port, token, {"Accept": "text/event-stream",
                                                                   "Content-Type": None}))
        self.resp = self.conn.read_head()
        self.stream = SSEStream(self.conn, self.resp) if self.resp.status == 200 else None
        if self.stream is not None:
            event = self.stream.next_event()
            assert event["event"] == "endpoint", event
            self.endpoint = event["data"]
            self.sid = self.endpoint.split("session_id=")[1]

    def post(self, message, port: int | None = None, token: str | None = "") -> Response:
        port = port or self.port
        return http(port, "POST", self.endpoint, _sess_headers(port, self.token if token == "" else token), message)

    def next_message(self) -> dict:
        message = self.stream.next_message()
        assert message is not None, "the /sse stream ended"
        return message

    def initialize(self, capabilities: dict | None = None, port: int | None = None) -> dict:
        r = self.post({"jsonrpc": "2.0", "id": "init", "method": "initialize",
                       "params": {"protocolVersion": LEGACY, "capabilities": capabilities or {},
                                  "clientInfo": {"name": "pytest", "version": "1"}}}, port)
        assert r.status == 202, r
        reply = self.next_message()
        assert reply["id"] == "init" and "result" in reply, reply
        assert self.post({"jsonrpc": "2.0", "method": "notifications/initialized"}, port).status == 202
        return reply

    def close(self) -> None:
        self.conn.close()


def _sess_refused(resp: Response) -> None:
    """The 404 a session of someone else gets: the same as an unknown one (nothing leaks)."""
    assert resp.status == 404, resp
    assert "not found" in resp.json()["error"]["message"].lower(), resp


def _sess_attempts_on_messages(sse: _SessSSE, port: int, token: str | None) -> None:
    """Everything an attacker can send to /messages naming the victim's session: each one 404."""
    for message in ({"jsonrpc": "2.0", "id": 1, "method": "ping"},
                    {"jsonrpc": "2.0", "id": 2, "method": "initialize",
                     "params": {"protocolVersion": "2024-11-05", "capabilities": {}}},
                    {"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                     "params": {"name": "echo", "arguments": {"text": "injected"}}},
                    {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}},
                    {"jsonrpc": "2.0", "id": "s0-1", "result": {"action": "accept", "content": {"name": "M"}}}):
        _sess_refused(sse.post(message, port, token))
    r = http(port, "GET", f"/sse?session_id={sse.sid}",
             _sess_headers(port, token, {"Accept": "text/event-stream", "Content-Type": None}))
    _sess_refused(r)


class TestAttackSessions:
    """Sessions belong to the token that made them, on every route, transport and instance."""

    @pytest.fixture
    def guarded(self, make_server):
        return make_server(auth="builtin", consent="never", auth_rate_limit=0)

    def test_a_live_sse_stream_is_not_taken_over_with_another_token(self, guarded):
        port = guarded.port
        victim_token, attacker_token = _sess_login(port), _sess_login(port)
        victim = _SessSSE(port, victim_token)
        try:
            victim.initialize({"elicitation": {}})
            # the victim's tool waits on an elicitation, the attacker tries every message on the session
            assert victim.post({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                                "params": {"name": "ask_name", "arguments": {}}}).status == 202
            asked = victim.next_message()
            assert asked["method"] == "elicitation/create", asked
            _sess_attempts_on_messages(victim, port, attacker_token)
            forged = {"jsonrpc": "2.0", "id": asked["id"], "result": {"action": "accept", "content": {"name": "M"}}}
            _sess_refused(victim.post(forged, port, attacker_token))
            # the victim's stream is still theirs: their answer completes their call
            answer = {"jsonrpc": "2.0", "id": asked["id"], "result": {"action": "accept", "content": {"name": "V"}}}
            assert victim.post(answer).status == 202
            reply = victim.next_message()
            assert reply["id"] == 7 and reply["result"]["content"][0]["text"] == "Hello, V!", reply
        finally:
            victim.close()

    def test_an_sse_session_belongs_to_its_opener_before_initialize(self, guarded):
        port = guarded.port
        victim_token, attacker_token = _sess_login(port), _sess_login(port)
        victim = _SessSSE(port, victim_token)
        try:
            _sess_attempts_on_messages(victim, port, attacker_token)
            victim.initialize()
            assert victim.post({"jsonrpc": "2.0", "id": 2, "method": "ping"}).status == 202
            assert victim.next_message() == {"jsonrpc": "2.0", "id": 2, "result": {}}
        finally:
            victim.close()
        # and once the stream is gone, the session still is not the attacker's to reattach
        _sess_refused(http(port, "GET", f"/sse?session_id={victim.sid}",
                           _sess_headers(port, attacker_token, {"Accept": "text/event-stream"})))

    def test_every_streamable_route_checks_the_owner(self, guarded):
        port = guarded.port
        victim_token, attacker_token = _sess_login(port), _sess_login(port)
        victim = _auth_Session(port, victim_token)
        victim.initialize()
        attacker = _auth_Session(port, attacker_token)
        attacker.sid = victim.sid
        for message in (attacker.body("ping"), {"jsonrpc": "2.0", "method": "notifications/cancelled",
                                                "params": {"requestId": 1}},
                        {"jsonrpc": "2.0", "id": "s0-1", "result": {}}):
            _sess_refused(attacker.post(message))
        # initialize ignores the id it is sent with: it makes the attacker a session of their own
        fresh = attacker.post(attacker.body("initialize", {"protocolVersion": LEGACY}))
        assert fresh.status == 200 and fresh.header("mcp-session-id") not in (None, victim.sid), fresh
        _sess_refused(attacker.post([attacker.body("ping")], {"MCP-Protocol-Version": "2025-03-26"}))
        for last_event in (None, "get:0", "abcdef012345:1"):
            _sess_refused(http(port, "GET", "/mcp", attacker.headers({"Accept": "text/event-stream",
                                                                      "Last-Event-ID": last_event})))
        _sess_refused(attacker.delete())
        assert victim.request("ping")["result"] == {}  # still the victim's, still alive

    def test_a_session_id_names_one_transport(self, guarded):
        """A Streamable HTTP session (with a live GET stream) is not reachable on /messages or
        /sse, and an /sse session is not one on /mcp, even for the token that made both."""
        port = guarded.port
        token = _sess_login(port)
        s = _auth_Session(port, token)
        s.initialize()
        with Conn(port) as conn:
            conn.request("GET", "/mcp", s.headers({"Accept": "text/event-stream", "Content-Type": None}))
            stream = SSEStream(conn, conn.read_head())
            assert not stream.next_event().get("data")  # the GET stream is live
            r = http(port, "POST", f"/messages?session_id={s.sid}", _sess_headers(port, token),
                     {"jsonrpc": "2.0", "id": 1, "method": "ping"})
            _sess_refused(r)
            _sess_refused(http(port, "GET", f"/sse?session_id={s.sid}",
                               _sess_headers(port, token, {"Accept": "text/event-stream"})))
        sse = _SessSSE(port, token)
        try:
            sse.initialize()
            other = _auth_Session(port, token)
            other.sid = sse.sid
            _sess_refused(other.post(other.body("ping")))
            _sess_refused(http(port, "GET", "/mcp", other.headers({"Accept": "text/event-stream"})))
            _sess_refused(other.delete())
            assert sse.post({"jsonrpc": "2.0", "id": 5, "method": "ping"}).status == 202
            assert sse.next_message() == {"jsonrpc": "2.0", "id": 5, "result": {}}
        finally:
            sse.close()

    def test_without_auth_a_session_id_is_the_whole_credential(self, make_server):
        """MCP_AUTH=none: no principal, so the unguessable id is what a session is; it still names
        one transport, and ids never repeat."""
        st = make_server()
        ids = set()
        for _ in range(20):
            s = Session(st.port)
            s.initialize()
            assert len(base64.urlsafe_b64decode(s.sid + "=" * (-len(s.sid) % 4))) >= 16, s.sid  # >= 128 bits
            ids.add(s.sid)
        assert len(ids) == 20
        _sess_refused(http(st.port, "POST", f"/messages?session_id={s.sid}", body={"jsonrpc": "2.0", "id": 1,
                                                                                 "method": "ping"}))

    @pytest.fixture(scope="class")
    @classmethod  # a class-scoped fixture as an instance method is deprecated (pytest 10)
    def guarded_pair(cls, redis_url):
        """Two instances on one Redis with the built-in authorization server (one issuer URL, so
        a token of either is good on both), at most 3 sessions per principal."""
        pair = _redis_instances(redis_url, 2, MCP_AUTH="builtin", MCP_CONSENT="never", MCP_AUTH_RATE_LIMIT="0",
                                MCP_PUBLIC_URL="http://127.0.0.1:6901", MCP_MAX_SESSIONS_PER_PRINCIPAL="3")
        _redis_wait_subscribed(redis_url, "mcp:bus", 2)
        yield [instance.port for instance in pair]
        for instance in pair:
            instance.stop()

    def test_across_instances_every_route_checks_the_owner(self, guarded_pair):
        a, b = guarded_pair
        victim_token, attacker_token = _sess_login(a), _sess_login(b)
        victim = _SessSSE(a, victim_token)
        try:
            victim.initialize(port=b)
            for port in (a, b):
                _sess_attempts_on_messages(victim, port, attacker_token)
            assert victim.post({"jsonrpc": "2.0", "id": 9, "method": "ping"}, b).status == 202
            assert victim.next_message() == {"jsonrpc": "2.0", "id": 9, "result": {}}
        finally:
            victim.close()
        s = _auth_Session(a, victim_token)
        s.initialize()
        attacker = _auth_Session(b, attacker_token)
        attacker.sid = s.sid
        _sess_refused(attacker.post(attacker.body("ping")))
        _sess_refused(http(b, "GET", "/mcp", attacker.headers({"Accept": "text/event-stream"})))
        _sess_refused(attacker.delete())
        assert _redis_on(s, b).request("ping")["result"] == {}

    def test_a_task_of_another_principal_is_unknown_on_every_instance(self, guarded_pair):
        a, b = guarded_pair
        victim_token, attacker_token = _sess_login(a), _sess_login(b)

        def post(port, token, method, task_id, params=None):
            return modern_post(port, method, {"taskId": task_id, **(params or {})}, caps=_TASK_CAPS,
                               headers={"Mcp-Name": task_id, **_sess_headers(port, token)})
        r = _redis_modern_call(a, "slow_compute", {"seconds": 60}, caps=_TASK_CAPS,
                               headers=_sess_headers(a, victim_token))
        task_id = _task_result(r)["taskId"]
        try:
            for port in (a, b):
                for method, params in (("tasks/get", None), ("tasks/cancel", None),
                                       ("tasks/update", {"inputResponses": {"x": {"action": "accept"}}})):
                    r = post(port, attacker_token, method, task_id, params)
                    error = r.json().get("error")
                    assert error and "Unknown task" in error["message"], (port, method, r)
            assert _task_result(post(b, victim_token, "tasks/get", task_id))["status"] == "working"
        finally:
            post(a, victim_token, "tasks/cancel", task_id)

    # -- quotas: what one token holder can make the server hold ------------------------------------

    def test_a_flood_of_sessions_never_evicts_authorization_state(self, make_server):
        """2,500 initialize calls used to push another user's client, refresh token and user session
        out of the in-memory LRU; sessions now only ever push out sessions."""
        store = MemoryStore(max_keys=40)
        st = make_server(build_server(store=store, auth="builtin", consent="never", auth_rate_limit=0,
                                      max_sessions_per_principal=0, max_sessions_per_address=0))
        victim = _auth_login(st.port)
        attacker = _sess_login(st.port)
        for _ in range(120):
            _auth_Session(st.port, attacker).initialize()
        _auth_assert_ok(st.port, victim["access_token"])  # the user session (mcp:{sid}:user) is there
        r = _auth_refresh(st.port, victim["client"]["client_id"], victim["refresh_token"])
        assert r.status == 200, r  # the client, the refresh token and its family are there
        _auth_assert_ok(st.port, r.json()["access_token"])

    def test_a_quota_set_counts_only_live_members_on_every_store(self, redis_store_factory):
        async def body(store):
            quota, tag = _redis_key("quota"), uuid.uuid4().hex[:12]

            def live(member):
                return f"t:{{{tag}-{member}}}:live"  # (a slot of its own, as a session's key has)
            for member in "ab":
                await store.set(live(member), 1, 60)
                assert await store.admit(quota, member, 2, 60, live)
            assert await store.admit(quota, "a", 2, 60, live)  # already in
            await store.set(live("c"), 1, 60)
            assert not await store.admit(quota, "c", 2, 60, live)  # full of live members
            await store.delete(live("b"))  # b's session ended: it stops counting
            assert await store.admit(quota, "c", 2, 60, live)
            assert not await store.admit(quota, "d", 2, 60, live)
            await store.discard(quota, "a", 60)
            await store.touch([quota], 60)
            assert await store.admit(quota, "d", 2, 60, live)
        _redis_run(redis_store_factory, body)

    def test_sessions_per_principal_are_capped_across_instances(self, guarded_pair):
        a, b = guarded_pair  # MCP_MAX_SESSIONS_PER_PRINCIPAL=3 on both
        token, other = _sess_login(a), _sess_login(a)
        first = _auth_Session(a, token)
        first.initialize()
        _auth_Session(b, token).initialize()
        sse = _SessSSE(b, token)  # an /sse stream is a session too
        try:
            assert sse.resp.status == 200
            for port in (a, b):
                s = _auth_Session(port, token)
                r = s.post(s.body("initialize", {"protocolVersion": LEGACY, "capabilities": {}}))
                error = assert_rpc_error(r, 429, mcp_server.INVALID_REQUEST)
                assert "MCP_MAX_SESSIONS_PER_PRINCIPAL" in error["message"] and r.header("retry-after"), r
                assert r.header("mcp-session-id") is None
                refused = _SessSSE(port, token)
                assert refused.resp.status == 429, refused.resp
                refused.close()
            _auth_Session(b, other).initialize()  # another principal is not affected
        finally:
            sse.close()
        assert _redis_on(first, b).delete().status == 200  # ending one (anywhere) frees its place
        _auth_Session(a, token).initialize()

    def test_sessions_per_address_are_capped_and_expired_ones_stop_counting(self, make_server):
        clock = FakeClock()
        st = make_server(build_server(store=MemoryStore(clock=clock), max_sessions_per_address=3, session_ttl=60))
        sessions = [Session(st.port) for _ in range(3)]
        for s in sessions:
            s.initialize()
        r = Session(st.port).post(Session(st.port).body("initialize", {"protocolVersion": LEGACY}))
        error = assert_rpc_error(r, 429, mcp_server.INVALID_REQUEST)
        assert "MCP_MAX_SESSIONS_PER_ADDRESS" in error["message"], error
        assert http(st.port, "GET", "/sse", {"Accept": "text/event-stream"}).status == 429
        assert sessions[0].delete().status == 200
        Session(st.port).initialize()
        clock.advance(61)  # every session expired: nothing counts any more
        for _ in range(3):
            Session(st.port).initialize()

    def test_an_sse_stream_closed_before_initialize_frees_its_session(self, make_server):
        """A client that opens /sse and goes (a probe, a flapping network) leaves nothing that
        counts against its caps; an initialized session stays for the client to reattach."""
        st = make_server(max_sessions_per_address=2)
        kept = _SessSSE(st.port, None)
        kept.initialize()
        kept.close()
        for _ in range(5):
            probe_stream = _SessSSE(st.port, None)
            assert probe_stream.resp.status == 200, probe_stream.resp
            probe_stream.close()
            _redis_wait(lambda: http(st.port, "POST", probe_stream.endpoint, body={
                "jsonrpc": "2.0", "id": 1, "method": "ping"}).status == 404, "the unused session to end")
        again = _SessSSE(st.port, None, f"/sse?session_id={kept.sid}")
        try:
            assert again.resp.status == 200
        finally:
            again.close()

    def test_open_streams_are_capped_per_principal_and_per_address(self, make_server):
        st = make_server(auth="builtin", consent="never", auth_rate_limit=0, max_streams_per_principal=2,
                         max_streams_per_address=3)
        port = st.port
        alice, bob = _sess_login(port), _sess_login(port)
        held = []

        def open_stream(token):
            s = _auth_Session(port, token)
            s.initialize()
            conn = Conn(port)
            conn.request("GET", "/mcp", s.headers({"Accept": "text/event-stream", "Content-Type": None}))
            head = conn.read_head()
            if head.status == 200:
                held.append(conn)
            else:
                head.body = b"".join(conn.iter_body(head))
                conn.close()
            return head
        try:
            assert open_stream(alice).status == 200 and open_stream(alice).status == 200
            refused = open_stream(alice)
            error = assert_rpc_error(refused, 429, mcp_server.INVALID_REQUEST)
            assert "MCP_MAX_STREAMS_PER_PRINCIPAL" in error["message"] and refused.header("retry-after"), refused
            sse = _SessSSE(port, alice)
            assert sse.resp.status == 429, sse.resp  # /sse counts the same
            sse.close()
            listen = modern_body("subscriptions/listen", {"notifications": {"toolsListChanged": True}})
            r = http(port, "POST", "/mcp", modern_headers(listen, _sess_headers(port, alice)), listen)
            assert "MCP_MAX_STREAMS_PER_PRINCIPAL" in assert_rpc_error(r, 429, mcp_server.INVALID_REQUEST)["message"]
            assert open_stream(bob).status == 200
            error = assert_rpc_error(open_stream(bob), 429, mcp_server.INVALID_REQUEST)
            assert "MCP_MAX_STREAMS_PER_ADDRESS" in error["message"], error
            held.pop(0).close()  # a stream that ends gives its place back
            _redis_wait(lambda: open_stream(alice).status == 200, "the closed stream's place")
        finally:
            for conn in held:
                conn.close()

    def test_connections_per_address_are_capped(self, make_server):
        st = make_server(max_connections_per_address=3)
        conns = [Conn(st.port) for _ in range(3)]
        try:
            for conn in conns:  # each answered once, so each is surely counted
                conn.request("GET", "/healthz")
                assert conn.read_response().status == 200
            with Conn(st.port) as extra:
                r = extra.read_response()
                assert r.status == 429 and r.header("retry-after"), r
                assert "MCP_MAX_CONNECTIONS_PER_ADDRESS" in r.json()["error"]["message"], r
            conns.pop().close()

            def served():
                with Conn(st.port) as conn:
                    conn.request("GET", "/healthz")
                    return conn.read_response().status == 200
            _redis_wait(served, "the closed connection's place")
        finally:
            for conn in conns:
                conn.close()

    def test_what_a_client_makes_its_session_keep_is_bounded(self, live):
        huge = {"experimental": {"x": "y" * 9000}}
        s = Session(live.port, capabilities=huge)
        r = s.post(s.body("initialize", {"protocolVersion": LEGACY, "capabilities": huge}))
        error = assert_rpc_error(r, 400, mcp_server.INVALID_PARAMS)
        assert "8192" in error["message"], error
        assert r.header("mcp-session-id") is None
        r = s.post(s.body("initialize", {"protocolVersion": LEGACY, "clientInfo": {"name": "n" * 9000}}))
        assert_rpc_error(r, 400, mcp_server.INVALID_PARAMS)
        c = _SessSSE(live.port, None)
        try:
            c.post({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                    "params": {"protocolVersion": LEGACY, "capabilities": huge}})
            answer = c.next_message()
            assert answer["id"] == 1 and answer["error"]["code"] == mcp_server.INVALID_PARAMS, answer
        finally:
            c.close()
        s = Session(live.port)
        s.initialize()
        for i in range(200):
            message = s.body("resources/subscribe", {"uri": f"test://items/{i:04d}-" + "u" * 100})
            reply = final_message(s.post(message), message["id"])
            if "error" in reply:
                break
        assert reply["error"]["code"] == mcp_server.INVALID_PARAMS and "unsubscribe" in reply["error"]["message"]
        assert 40 < i < 200, i

    def test_running_tasks_are_capped_per_principal(self, make_server):
        server = _task_build_server()
        server.settings = Settings(auth="builtin", consent="never", auth_rate_limit=0, max_tasks_per_principal=2)
        st = make_server(server)
        alice, bob = _sess_login(st.port), _sess_login(st.port)
        tokens = []

        def start(token):
            tokens.append(new_token("quota-task"))
            return _redis_modern_call(st.port, "task_gated", {"token": tokens[-1]}, caps=_TASK_CAPS,
                                      headers=_sess_headers(st.port, token))
        try:
            assert _task_result(start(alice))["resultType"] == "task"
            assert _task_result(start(alice))["resultType"] == "task"
            error = assert_rpc_error(start(alice), 429, mcp_server.INVALID_REQUEST)
            assert "MCP_MAX_TASKS_PER_PRINCIPAL" in error["message"], error
            assert _task_result(start(bob))["resultType"] == "task"  # another principal is not affected
            first = probe(tokens[0])
            assert first.gate_ready.wait(WAIT)
            st.call_soon(first.gate.set)
            assert first.finished.wait(WAIT)
            _redis_wait(lambda: start(alice).status == 200, "the ended task's place")
        finally:
            for token in tokens:
                p = probe(token)
                if p.gate_ready.is_set() and p.gate is not None:
                    st.call_soon(p.gate.set)

    def test_a_session_keeps_the_event_logs_of_its_last_streams_only(self, make_server):
        """Every streamed POST of a 2025-11-25 session is logged for resumption; streaming more
        no longer piles up logs: the session keeps those of its last MCP_REPLAY_EVENTS streams."""
        store = MemoryStore()
        st = make_server(build_server(store=store, replay_events=3))
        s = Session(st.port)
        s.initialize()

        def stream_once():
            reply = s.request("tools/call", {"name": "progress", "arguments": {"steps": 1},
                                             "_meta": {"progressToken": "p"}})
            assert reply["result"]["content"][0]["text"] == "progress done"
        for _ in range(4):
            stream_once()
        held = len(store)
        for _ in range(10):
            stream_once()
        assert len(store) == held
        assert s.delete().status == 200
        assert len(store) == 0

    def test_requests_in_flight_on_messages_are_bounded_per_token(self, guarded):
        """Each POST /messages runs as a task that holds no connection: a token may have 100."""
        port = guarded.port
        token, other = _sess_login(port), _sess_login(port)
        c = _SessSSE(port, token)
        try:
            c.initialize()
            prefix = new_token("flight")
            with Conn(port) as conn:
                for i in range(100):
                    conn.request("POST", c.endpoint, _sess_headers(port, token), {
                        "jsonrpc": "2.0", "id": i, "method": "tools/call",
                        "params": {"name": "hang", "arguments": {"token": f"{prefix}-{i}"}}})
                    assert conn.read_response().status == 202
            _redis_wait(lambda: all(probe(f"{prefix}-{i}").started.is_set() for i in range(100)), "100 calls running")
            r = c.post({"jsonrpc": "2.0", "id": 100, "method": "ping"})
            error = assert_rpc_error(r, 429, mcp_server.INVALID_REQUEST)
            assert "in flight" in error["message"] and r.header("retry-after"), r
            d = _SessSSE(port, other)  # another token is not affected
            try:
                assert d.post({"jsonrpc": "2.0", "id": 1, "method": "ping"}).status == 202
                assert d.next_message() == {"jsonrpc": "2.0", "id": 1, "result": {}}
            finally:
                d.close()
            # a cancellation still gets through, and the cancelled call gives its place back
            cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 0}}
            assert c.post(cancel).status == 202
            assert probe(f"{prefix}-0").finished.wait(WAIT)
            _redis_wait(lambda: c.post({"jsonrpc": "2.0", "id": 101, "method": "ping"}).status == 202,
                        "the cancelled call's place")
        finally:
            c.close()


# ==== Hostile input (issue 19): bad bytes, bad JSON, bad headers, across instances =============

class TestLegacyAcrossInstances:
    """HTTP+SSE behind a round-robin balancer: the /sse stream on one instance, every POST on any
    instance, from the first one on (issue 19, defect 3)."""

    def test_every_message_kind_posted_anywhere_is_answered_on_the_stream(self, redis_trio):
        a, b, c = redis_trio
        sse = _SessSSE(a, None)
        try:
            assert sse.post({"jsonrpc": "2.0", "id": 1, "method": "ping"}, b).status == 202  # before initialize
            assert sse.next_message() == {"jsonrpc": "2.0", "id": 1, "result": {}}
            assert sse.post({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, c).status == 202
            refused = sse.next_message()
            assert refused["id"] == 2 and "initialize" in refused["error"]["message"], refused
            assert sse.initialize({"elicitation": {}}, port=b)["result"]["protocolVersion"] == LEGACY
            assert sse.post({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                             "params": {"name": "greet", "arguments": {"name": "Ada"}}}, c).status == 202
            reply = sse.next_message()
            assert reply["id"] == 3 and _redis_text(reply["result"]) == "Hello, Ada!", reply
            # a server request raised on B reaches the stream on A; its answer, posted to C, reaches B
            assert sse.post({"jsonrpc": "2.0", "id": 4, "method": "tools/call",
                             "params": {"name": "test_elicitation", "arguments": {"message": "ok?"}}}, b).status == 202
            asked = sse.next_message()
            assert asked["method"] == "elicitation/create", asked
            answer = {"jsonrpc": "2.0", "id": asked["id"], "result": {"action": "accept", "content": {"response": "y"}}}
            assert sse.post(answer, c).status == 202
            reply = sse.next_message()
            assert reply["id"] == 4 and "action=accept" in _redis_text(reply["result"]), reply
        finally:
            sse.close()

    def test_reattaching_on_another_instance_keeps_the_session(self, redis_trio):
        a, b, _c = redis_trio
        sse = _SessSSE(a, None)
        sse.initialize(port=b)
        sse.close()
        again = _SessSSE(b, None, f"/sse?session_id={sse.sid}")
        try:
            assert again.resp.status == 200 and again.sid == sse.sid
            assert again.post({"jsonrpc": "2.0", "id": 5, "method": "ping"}, a).status == 202
            assert again.next_message() == {"jsonrpc": "2.0", "id": 5, "result": {}}
        finally:
            again.close()


def hostile_server(**settings) -> MCPServer:
    """The test server, plus tools that end with what must never end the process."""
    server = build_server(**settings)

    @server.tool()
    def sys_exit() -> str:
        """Call sys.exit() (in a worker thread)."""
        sys.exit(3)

    @server.tool(inline=True)
    def sys_exit_inline() -> str:
        """Call sys.exit() on the event loop."""
        raise SystemExit(4)

    @server.tool()
    async def interrupt() -> str:
        """Raise KeyboardInterrupt on the event loop."""
        raise KeyboardInterrupt

    @server.tool()
    async def progress_then_hang(token: str, ctx: Context) -> str:
        """Report progress (the answer becomes a stream), then wait until cancelled."""
        await ctx.report_progress(1, 2)
        probe(token).started.set()
        await asyncio.Event().wait()

    @server.resource("test://exit", name="exit", mime_type="text/plain")
    def exit_resource() -> str:
        raise SystemExit(5)

    return server


@pytest.fixture(scope="module")
def hostile():
    st = ServerThread(hostile_server()).start()
    yield st
    st.close()


def deep_json(levels: int, inner: str = "1") -> bytes:
    return ("[" * levels + inner + "]" * levels).encode()


def errors_logged(caplog) -> list:
    """What the server logged at ERROR or above, or with a traceback."""
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def read_to_close(conn: Conn) -> bytes:
    """Everything the server sends until it closes (the request was sent and SHUT_WR'd)."""
    received = bytearray()
    try:
        while True:
            chunk = conn.sock.recv(65536)
            if not chunk:
                return bytes(received)
            received += chunk
    except ConnectionResetError:
        return bytes(received)


def status_of(data: bytes) -> int | None:
    """The status of the first response in ``data`` (None: the server only closed)."""
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", data)
    assert match or not data, data[:200]
    return int(match.group(1)) if match else None


def send_raw(port: int, data: bytes, half_close: bool = True) -> int | None:
    """The status the server answers ``data`` with (None: it only closed).  ``half_close``: the
    client then says it sends no more, which the server takes as the client gone (as any ASGI
    server does): a request still waiting (on a worker thread, say) is dropped.  Without it the
    request must end the connection itself (``Connection: close``)."""
    with Conn(port) as conn:
        conn.send(data)
        if half_close:
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the server answered and closed first: what it sent is still there to read
        return status_of(read_to_close(conn))


class TestHostileInput:
    """What an outside reviewer throws at the server: every case is a 4xx or a clean close, never
    a 5xx or a traceback in the log, and the server goes on serving."""

    @pytest.fixture(autouse=True)
    def _quiet_and_alive(self, hostile, caplog):
        caplog.set_level(logging.WARNING, logger="mcp_server")
        yield
        assert_alive(hostile.port)
        assert not errors_logged(caplog)

    # -- ids a client answers or cancels with (review of issue 20) ------------------------------------

    @pytest.mark.parametrize("bad_id", [[1], {"a": 1}, 1.5, True])
    def test_an_answer_or_a_cancellation_naming_no_valid_id_is_refused_or_ignored(self, hostile, bad_id):
        """A response's id and a cancellation's requestId are a string or an integer: anything
        else is a 400 (a response) or ignored (a notification), never a 500 from a lookup."""
        s = Session(hostile.port)
        s.initialize()
        assert_rpc_error(s.post({"jsonrpc": "2.0", "id": bad_id, "result": {}}), 400, -32600)
        cancel = s.post({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": bad_id}})
        assert cancel.status == 202, cancel
        assert s.call("echo", {"text": "still here"})["content"][0]["text"] == "still here"

    # -- issue 19 defect 1: deeply nested JSON -------------------------------------------------------

    @pytest.mark.parametrize("transport", ["modern", "legacy", "messages", "http"])
    def test_deeply_nested_json_is_a_parse_error_on_every_http_transport(self, hostile, transport):
        port = hostile.port
        headers = {"Content-Type": "application/json", "Accept": ACCEPT_BOTH}
        path = {"modern": "/mcp", "legacy": "/mcp", "http": "/http"}.get(transport)
        if transport == "modern":
            headers["MCP-Protocol-Version"] = MODERN
        elif transport == "legacy":
            session = Session(port)
            session.initialize()
            headers = session.headers()
        client = LegacySSEClient(port) if transport == "messages" else None
        try:
            path = path or client.endpoint
            for levels in (65, 5000, 100000):
                error = assert_rpc_error(http(port, "POST", path, headers, deep_json(levels)), 400, -32700)
                assert "deeper than 64" in error["message"] and "MCP_MAX_JSON_DEPTH" in error["message"]
            objects = ('{"a":' * 3000 + "1" + "}" * 3000).encode()
            assert_rpc_error(http(port, "POST", path, headers, objects), 400, -32700)
        finally:
            if client is not None:
                client.close()

    def test_deeply_nested_json_on_stdio_is_a_parse_error(self):
        with Proc([SERVER_FILE, "--stdio"]) as proc:
            proc.send(deep_json(5000) + b"\n")
            reply = proc.recv()
            assert reply["id"] is None and reply["error"]["code"] == -32700, reply
            assert "MCP_MAX_JSON_DEPTH" in reply["error"]["message"]
            assert "result" in proc.request("ping")  # still serving
            assert proc.finish() == 0
        assert b"Traceback" not in proc.stderr and b'"level":"error"' not in proc.stderr

    def test_the_depth_limit_is_a_setting_and_json_as_deep_as_it_passes(self, make_server):
        st = make_server(max_json_depth=3)
        ok = {"method": "tools/call", "params": {"name": "echo", "arguments": {"text": "x"}}}  # depth 3
        assert http(st.port, "POST", "/http", body=ok).status == 200
        deeper = {"method": "tools/call", "params": {"name": "echo", "arguments": {"text": ["x"]}}}
        assert_rpc_error(http(st.port, "POST", "/http", body=deeper), 400, -32700)
        assert Settings.load([], environ={"MCP_MAX_JSON_DEPTH": "100"}).max_json_depth == 100
        for bad in ("0", "100000"):
            with pytest.raises(SystemExit, match="MCP_MAX_JSON_DEPTH"):
                Settings.load([], environ={"MCP_MAX_JSON_DEPTH": bad})

    def test_the_json_reader_measures_depth_outside_strings_only(self):
        loads = mcp_server._loads
        assert loads(deep_json(64)) is not None
        with pytest.raises(ValueError, match="deeper than 64"):
            loads(deep_json(65))
        brackets = '"' + "[{" * 5000 + '"'
        assert loads(f'[{brackets}, "\\"[[[[", "\\\\"]') == ["[{" * 5000, '"[[[[', "\\"]
        assert loads(deep_json(10, "[]")) and loads("[" + "[]," * 5000 + "[]]")  # wide, not deep
        assert loads(deep_json(3), max_depth=3) == [[[1]]]
        with pytest.raises(ValueError):
            loads(deep_json(4), max_depth=3)
        with pytest.raises(ValueError):
            loads('{"a": [' + '{"b": [' * 40 + "]}" * 40 + "]}")  # 82 levels of mixed kinds
        for text in ("NaN", "[Infinity]", "-Infinity", "1e999", "[-1e400]", '"\\ud800"', '["\\udfff x"]',
                     b"\xff", b'"\xed\xa0\x80"', "\ufeff{}", "[1,]", ""):
            with pytest.raises(ValueError):
                loads(text)
        assert loads('"\\ud83d\\ude00"') == "\U0001F600" and loads("1e308") == 1e308

    def test_every_json_the_server_reads_goes_through_the_guarded_reader(self, tmp_path):
        source = open(SERVER_FILE, encoding="utf-8").read()
        assert not re.search(r"\bjson\.loads?\(", source.replace("``json.loads``", ""))
        # sealed state, upstream answers, stored values: deep JSON is refused, not a RecursionError
        ring = mcp_server._KeyRing("k" * 32)
        assert ring.unseal(ring.seal({"deep": json.loads(deep_json(600))})) is None
        with pytest.raises(ValueError):
            mcp_server.RedisStore._load(deep_json(5000))
        assert mcp_server.RedisStore._load(deep_json(300)) is not None  # what the server may have stored

        from http import server as http_server

        class Deep(http_server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = deep_json(5000)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        upstream = http_server.ThreadingHTTPServer(("127.0.0.1", 0), Deep)
        threading.Thread(target=upstream.serve_forever, daemon=True).start()
        try:
            status, parsed = mcp_server._http_call("GET", f"http://127.0.0.1:{upstream.server_port}/x")
            assert status == 200 and parsed is None
        finally:
            upstream.shutdown()

    def test_oauth_json_bodies_refuse_deep_json(self, make_server):
        st = make_server(auth="builtin", consent="never", auth_rate_limit=0)
        for path in ("/register", "/token"):
            r = http(st.port, "POST", path, {"Content-Type": "application/json"}, deep_json(5000))
            assert r.status == 400 and r.json()["error"] in ("invalid_client_metadata", "invalid_request"), r

    # -- issue 19 defect 2: Content-Type ----------------------------------------------------------

    @pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                              "application/jsonx", ""])
    def test_a_post_not_declared_json_is_415_on_every_endpoint(self, hostile, content_type):
        session = Session(hostile.port)
        session.initialize()
        client = LegacySSEClient(hostile.port)
        try:
            for path, headers in (("/mcp", session.headers()), ("/http", {}), (client.endpoint, {})):
                headers = {**headers, "Content-Type": content_type}
                r = http(hostile.port, "POST", path, headers, {"jsonrpc": "2.0", "id": 1, "method": "ping"})
                assert r.status == 415 and "application/json" in r.json()["error"]["message"], (path, r)
        finally:
            client.close()

    def test_json_with_parameters_is_json(self, hostile):
        r = http(hostile.port, "POST", "/http", {"Content-Type": "Application/JSON; charset=utf-8"},
                 {"method": "ping"})
        assert r.status == 200, r

    # -- issue 19 defect 4: a cancelled request's answer has a content type -----------------------

    @pytest.mark.parametrize("accept", [ACCEPT_BOTH, "application/json"])
    def test_a_cancelled_request_is_answered_with_json_or_sse(self, hostile, accept):
        s = Session(hostile.port)
        s.initialize()
        token = new_token()
        call = s.body("tools/call", {"name": "hang", "arguments": {"token": token}}, request_id=91)
        with Conn(hostile.port) as conn:
            conn.request("POST", "/mcp", s.headers({"Accept": accept}), call)
            assert probe(token).started.wait(WAIT)
            note = s.post({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 91}})
            assert note.status == 202
            resp = conn.read_response()
        assert resp.status == 200 and resp.content_type in ("application/json", "text/event-stream"), resp
        if resp.content_type == "text/event-stream":
            assert accept == ACCEPT_BOTH and resp.messages() == []  # the stream ends without a response
        else:
            assert resp.json()["id"] == 91 and resp.json()["error"]["code"] == -32800, resp.body
        assert probe(token).finished.wait(WAIT) and probe(token).cancelled is True

    def test_a_cancelled_stream_that_a_client_resumes_has_ended(self, hostile):
        s = Session(hostile.port)  # 2025-11-25: the stream is logged, and clients resume it
        s.initialize()
        token = new_token()
        call = s.body("tools/call", {"name": "progress_then_hang", "arguments": {"token": token},
                                     "_meta": {"progressToken": "p"}}, request_id=92)
        with Conn(hostile.port) as conn:
            conn.request("POST", "/mcp", s.headers(), call)
            stream = SSEStream(conn, conn.read_head())
            priming = stream.next_event()
            assert priming["id"] and stream.next_message()["method"] == "notifications/progress"
            assert probe(token).started.wait(WAIT)
            s.post({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 92}})
            assert stream.next_message()["error"]["code"] == -32800 and stream.next_event() is None
        resumed = http(hostile.port, "GET", "/mcp", s.headers({"Last-Event-ID": priming["id"]}))
        assert resumed.status == 200 and final_message(resumed, 92)["error"]["code"] == -32800

    # -- issue 18 finding 12: Host -------------------------------------------------------------

    @pytest.mark.parametrize("host", [b"127.0.0.1:7101@evil.com", b"localhost/path", b"local host",
                                      b"localhost:80:80", b"localhost:99999", b"[::1", b"[::1]x",
                                      b"localhost, evil.com", b"evil.com\x01", b"localhost:", b""])
    def test_a_malformed_host_is_400(self, hostile, host):
        data = b"GET /healthz HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
        assert send_raw(hostile.port, data) == 400

    def test_two_host_headers_are_400_and_a_missing_one_too(self, hostile):
        two = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nHost: evil.com\r\n\r\n"
        assert send_raw(hostile.port, two) == 400
        assert send_raw(hostile.port, two.replace(b"evil.com", b"localhost")) == 400
        assert send_raw(hostile.port, b"GET /healthz HTTP/1.1\r\n\r\n") == 400
        # HTTP/1.0 may omit it: then the app judges (on a loopback bind, no Host is no loopback Host)
        assert send_raw(hostile.port, b"GET /healthz HTTP/1.0\r\n\r\n") == 403
        for good in (b"localhost", b"127.0.0.1:1", b"[::1]:8080", b"LOCALHOST"):
            # (Connection: close: the answer ends the connection; a half-close before it would be
            # a client gone, as it is to any ASGI server, and a request not yet started is then dropped)
            with Conn(hostile.port) as conn:
                conn.send(b"GET /healthz HTTP/1.1\r\nConnection: close\r\nHost: " + good + b"\r\n\r\n")
                assert status_of(read_to_close(conn)) == 200, good

    @staticmethod
    def _asgi(app, headers: list, server=("127.0.0.1", 6901), path="/.well-known/oauth-authorization-server"):
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "query_string": b"",
                 "headers": [(k.encode(), v.encode()) for k, v in headers], "server": server,
                 "client": ("127.0.0.1", 5000), "scheme": "http", "http_version": "1.1"}
        asyncio.run(app(scope, receive, send))
        return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])

    def test_under_another_asgi_server_a_repeated_or_malformed_host_is_400(self):
        server = build_server(auth="builtin", secret="s" * 32)
        status, body = self._asgi(server.asgi, [("host", "127.0.0.1:6901"), ("host", "evil.com")])
        assert status == 400 and b"Host" in body
        status, body = self._asgi(server.asgi, [("host", "127.0.0.1:7101@evil.com")])
        assert status == 400 and b"issuer" not in body
        status, body = self._asgi(server.asgi, [("host", "")])  # (the foreign server let it through)
        assert status == 400 and b"issuer" not in body
        status, body = self._asgi(server.asgi, [("host", "127.0.0.1:6901")])
        assert status == 200 and json.loads(body)["issuer"] == "http://127.0.0.1:6901"

    def test_a_forwarded_host_from_a_trusted_proxy_is_validated_too(self):
        server = build_server(auth="builtin", secret="s" * 32, trusted_proxies=("127.0.0.1",))
        status, _ = self._asgi(server.asgi, [("host", "localhost"), ("x-forwarded-host", "a@evil.com")])
        assert status == 400

    def test_allowed_hosts_are_enforced_on_a_public_listener(self):
        server = build_server(allowed_hosts=("mcp.example.com",))
        public = ("10.0.0.5", 443)
        assert self._asgi(server.asgi, [("host", "evil.example")], public, "/healthz")[0] == 403
        assert self._asgi(server.asgi, [("host", "mcp.example.com")], public, "/healthz")[0] == 200
        assert self._asgi(server.asgi, [("host", "mcp.example.com:8443")], public, "/healthz")[0] == 200
        open_server = build_server()  # nothing listed: a public listener takes any well-formed Host
        assert self._asgi(open_server.asgi, [("host", "evil.example")], public, "/healthz")[0] == 200
        assert self._asgi(open_server.asgi, [("host", "evil.example/x")], public, "/healthz")[0] == 400

    # -- issue 18 finding 13: log lines ------------------------------------------------------------

    def test_no_log_format_lets_a_value_forge_a_line(self):
        forged = "x\r\n12:00:01 info    request  method=GET\x1b[2J\x85\u2028\u202e\x7f"
        text = mcp_server._TextFormatter().line(1.7e9, "info", "event " + forged, {"client": forged},
                                                "Traceback (most recent call last):\nValueError: " + forged)
        lines = text.split("\n")
        assert all(line.isprintable() for line in lines), text
        assert all(line.startswith("    ") for line in lines[1:]), text  # the traceback, indented
        assert "\\r\\n12:00:01" in lines[0] and "\\x1b[2J" in lines[0] and "\\u2028" in lines[0]
        fmt = mcp_server._JsonFormatter()
        for line in (fmt.line(1.7e9, "info", forged, {"client": forged, "n": [forged]}, forged),
                     fmt.access_line(1.7e9, ("GET", "/mcp", 200, 1.5, None, forged)),
                     mcp_server._LineFormatter.access_line(fmt, 1.7e9, ("GET", "/mcp", 200, 1.5, None, forged))):
            assert line.isascii() and line.isprintable(), line  # one line, nothing a terminal acts on
            parsed = json.loads(line)  # the same JSON
            assert parsed.get("client") == forged and parsed.get("error", forged) == forged, parsed

    def test_a_forwarded_client_address_cannot_forge_an_access_log_line(self, make_server, caplog):
        caplog.set_level(logging.INFO, logger="mcp_server")
        st = make_server(trusted_proxies=("127.0.0.1",))
        lines = []
        handler = logging.Handler()
        handler.setFormatter(mcp_server._TextFormatter())
        handler.emit = lambda record: lines.append(handler.format(record))
        mcp_server.log.addHandler(handler)
        try:
            r = http(st.port, "GET", "/healthz", {"X-Forwarded-For": "1.2.3.4\x1b[1A\x0b\x0c\x85 forged"})
            assert r.status == 200
            assert_alive(st.port)
        finally:
            mcp_server.log.removeHandler(handler)
        access = [line for line in lines if "/healthz" in line]  # a hop that is not an IP is not believed
        assert access and all(line.isprintable() and "forged" not in line for line in access), access

    # -- SystemExit and KeyboardInterrupt end only their request ------------------------------------

    @pytest.mark.parametrize("tool", ["sys_exit", "sys_exit_inline", "interrupt"])
    def test_a_tool_that_exits_fails_alone(self, hostile, tool, caplog):
        r = modern_post(hostile.port, "tools/call", {"name": tool, "arguments": {}})
        result = final_message(r, 1)["result"]
        assert result["isError"] is True, result
        error_id = ERROR_ID.search(result["content"][0]["text"]).group(1)
        logged = [rec for rec in caplog.records if error_id in rec.getMessage()]
        assert len(logged) == 1 and logged[0].levelno == logging.ERROR and logged[0].exc_info
        caplog.clear()  # (expected: the autouse check looks for errors nobody expected)
        r = http(hostile.port, "POST", "/http", body={"method": "tools/call", "params": {"name": tool}})
        assert r.status == 200 and r.json()["isError"] is True
        caplog.clear()

    def test_a_resource_that_exits_is_an_internal_error_with_an_id(self, hostile, caplog):
        r = http(hostile.port, "POST", "/http", body={"jsonrpc": "2.0", "id": 5, "method": "resources/read",
                                                      "params": {"uri": "test://exit"}})
        assert r.status == 500 and r.json()["error"]["code"] == -32603, r
        error_id = ERROR_ID.search(r.json()["error"]["message"]).group(1)
        assert [rec.levelno for rec in caplog.records if error_id in rec.getMessage()] == [logging.ERROR]
        caplog.clear()

    # -- the reviewer's list: smuggling, sizes, slowness, bad JSON, bad headers, disconnects ----------

    @pytest.mark.parametrize("head", [
        b"Content-Length: 2\r\nTransfer-Encoding: chunked",
        b"Transfer-Encoding: chunked\r\nContent-Length: 2",
        b"Content-Length: 2\r\nContent-Length: 2",
        b"Content-Length: 2\r\nContent-Length: 3",
        b"Content-Length: 2, 2",
        b"Content-Length: +2",
        b"Content-Length: 0x2",
        b"Content-Length: 99999999999999999999",
        b"Transfer-Encoding: chunked, identity",
        b"Transfer-Encoding: gzip, chunked",
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
        b"Transfer-Encoding : chunked",
        b"Transfer-Encoding:\x0bchunked",
        b"X-Folded: a\r\n b",
        b"X-Bare: a\nContent-Length: 2",
        b"X-Bare-CR: a\rContent-Length: 2",
        b"X-Nul: a\x00b",
        b"Bad Name: x",
        b": no name",
    ])
    def test_smuggling_shapes_are_400(self, hostile, head):
        data = b"POST /http HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n" + head + \
            b"\r\n\r\n{}"
        assert send_raw(hostile.port, data) == 400

    PING_CHUNK = b'11\r\n{"method":"ping"}\r\n'  # (a valid request: only the framing is wrong)

    @pytest.mark.parametrize("body", [b"11;" + b"x" * 5000 + PING_CHUNK[2:] + b"0\r\n\r\n", b"zz\r\n", b"-1\r\n",
                                      b"1\r\nab\r\n0\r\n\r\n", b"fffffffffffffffff\r\n", b"5\nhello\n0\n\n" * 300,
                                      PING_CHUNK + b"0\r\n" + b"X-Trailer: " + b"a" * 5000 + b"\r\n\r\n"])
    def test_bad_chunked_bodies_are_400(self, hostile, body):
        data = (b"POST /http HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n" + body)
        assert send_raw(hostile.port, data) == 400

    @pytest.mark.parametrize("line", [b"G\xc3\xa9T / HTTP/1.1", b"GET /caf\xc3\xa9 HTTP/1.1", b"GET / HTTP/2.0",
                                      b"GET  / HTTP/1.1", b"GET / HTTP/1.1 x", b"GET\t/ HTTP/1.1", b"/ HTTP/1.1",
                                      b"GET x HTTP/1.1", b"\x00GET / HTTP/1.1"])
    def test_malformed_request_lines_are_400(self, hostile, line):
        assert send_raw(hostile.port, line + b"\r\nHost: localhost\r\n\r\n") == 400

    def test_oversized_heads_and_bodies_are_refused_before_they_are_read(self, hostile):
        huge_line = b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n"
        assert send_raw(hostile.port, huge_line) == 414
        huge_head = b"GET / HTTP/1.1\r\nHost: localhost\r\n" + b"X-Pad: " + b"a" * 20000 + b"\r\n\r\n"
        assert send_raw(hostile.port, huge_head) == 431
        declared = b"POST /http HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n" \
                   b"Content-Length: 999999999\r\n\r\n{"
        assert send_raw(hostile.port, declared) == 413
        many = b"GET / HTTP/1.1\r\nHost: localhost\r\n" + b"X-A: b\r\n" * 3000 + b"\r\n"
        assert send_raw(hostile.port, many) == 431

    def test_a_slow_head_and_a_slow_body_get_408(self, make_server):
        st = make_server(header_timeout=0.3, body_timeout=0.3)
        with Conn(st.port) as conn:
            conn.send(b"POST /http HTTP/1.1\r\nHost: local")
            assert conn.read_response().status == 408
        with Conn(st.port) as conn:
            conn.send(b"POST /http HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 50\r\n\r\n{")
            assert conn.read_response().status == 408
        assert_alive(st.port)

    BAD_BODIES = [b"", b" ", b"null", b"1", b'"ping"', b"true", b"[]", b"[1, 2]", b'["x"]', b"[[]]", b"{",
                  b"\xff\xfe{}", b"\xef\xbb\xbf{}", b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}\x00',
                  b'{"jsonrpc":"2.0","id":1,"method":"\xc3"}', b'{"jsonrpc":"2.0","id":"\\ud800","method":"ping"}',
                  b'{"jsonrpc":"2.0","id":NaN,"method":"ping"}', b'{"jsonrpc":"2.0","id":Infinity,"method":"ping"}',
                  b'{"jsonrpc":"2.0","id":1e999999,"method":"ping"}', b'{"jsonrpc":"2.0","id":' + b"9" * 5000 + b',"method":"ping"}',
                  b'{"jsonrpc":"2.0","id":1,"id":{},"method":"ping"}', b'{"jsonrpc":"2.0","id":[1],"method":"ping"}',
                  b'{"jsonrpc":"2.0","id":1,"method":"ping","method":7}', b'{"jsonrpc":"1.0","id":1,"method":"ping"}',
                  b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":[]}',
                  b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":{"a":1}}}',
                  b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":"x"}}',
                  b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add","arguments":{"a":1e308,"b":1e308}}}',
                  b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add","arguments":{"a":' + b"9" * 4000 + b'}}}',
                  b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"\\u0000\\u2028\\ud83d\\ude00"}}}',
                  b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":["x"],"capabilities":7}}',
                  b'{"jsonrpc":"2.0","id":1,"result":{}}', b'{"jsonrpc":"2.0","id":1,"error":"x"}',
                  b'{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":{"x":[]}}}']

    @pytest.mark.parametrize("transport", ["modern", "legacy", "http", "batch"])
    def test_bad_json_of_every_shape_is_a_4xx(self, hostile, transport):
        headers = {"Content-Type": "application/json", "Accept": ACCEPT_BOTH}
        if transport == "modern":
            headers["MCP-Protocol-Version"] = MODERN
        elif transport in ("legacy", "batch"):
            session = Session(hostile.port, "2025-03-26" if transport == "batch" else LEGACY)
            session.initialize()
            headers = session.headers()
        path = "/http" if transport == "http" else "/mcp"
        for body in self.BAD_BODIES:
            if transport == "batch" and body[:1] == b"{":
                body = b"[" + body + b", " + body + b"]"
            r = http(hostile.port, "POST", path, headers, body)
            assert r.status < 500, (body, r)
            if r.status >= 400:
                assert r.content_type == "application/json" and "error" in r.json(), (body, r)

    @pytest.mark.parametrize("headers", [
        {"Accept": None}, {"Accept": "text/html"}, {"Accept": "application/json;q=0, text/event-stream;q=0"},
        {"Accept": "\x01\x7f"}, {"MCP-Protocol-Version": "1999-01-01"}, {"MCP-Protocol-Version": "\x7f"},
        {"MCP-Protocol-Version": "2025-11-25, 2025-06-18"}, {"Mcp-Session-Id": "\x01\x1b[2J"},
        {"Mcp-Session-Id": "x" * 8000}, {"Mcp-Session-Id": "a, b"}, {"Mcp-Method": "\x85"},
        {"Mcp-Name": "=?base64?" + "A" * 50 + "?="}, {"Origin": "http://evil.example"}, {"Origin": "\x00"},
        {"Last-Event-ID": "\x1b:99999999999999999999"}, {"X-Request-Id": "\x1b[2J"}, {"traceparent": "\x85" * 55},
    ])
    def test_wrong_headers_are_a_4xx_or_ignored(self, hostile, headers):
        session = Session(hostile.port)
        session.initialize()
        for method in ("POST", "DELETE"):  # (a GET that works would be a stream that never ends)
            body = session.body("tools/call", {"name": "echo", "arguments": {"text": "x"}}) if method == "POST" else None
            r = http(hostile.port, method, "/mcp", session.headers(headers), body)
            assert r.status < 500, (method, r)
            if r.status >= 400:
                assert r.content_type == "application/json", r
        modern = modern_body("tools/call", {"name": "echo", "arguments": {"text": "x"}})
        assert modern_post(hostile.port, "tools/call", body=modern, headers=headers).status < 500

    def test_a_client_that_goes_mid_body_or_mid_head_leaves_no_trace(self, hostile):
        for data in (b"POST /http HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"method\":",
                     b"POST /http HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
                     b"POST /mcp HTTP/1.1\r\nHost: loc"):
            with Conn(hostile.port) as conn:
                conn.send(data)
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            assert send_raw(hostile.port, data) in (None, 400, 415)  # the same, half-closed: a clean close

    def test_a_client_that_goes_while_its_tool_runs_leaves_no_trace(self, hostile):
        token = new_token()
        body = modern_body("tools/call", {"name": "hang", "arguments": {"token": token}})
        with Conn(hostile.port) as conn:
            conn.request("POST", "/mcp", modern_headers(body), body)
            assert probe(token).started.wait(WAIT)
        assert probe(token).finished.wait(WAIT)


FUZZ_CASES = int(os.environ.get("MCP_FUZZ_CASES", "1500"))  # per fuzzer; MCP_FUZZ_CASES=100000 for a long run


class TestParserFuzz:
    """Seeded fuzzers over the HTTP parser and the JSON-RPC layer (mutations of real requests), and
    the request-head parser held against the standard library's."""

    SEED_HEADS = [
        b"POST /mcp HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Accept: application/json, text/event-stream\r\nMCP-Protocol-Version: 2026-07-28\r\n"
        b"Mcp-Method: tools/call\r\nMcp-Name: echo\r\nContent-Length: %d\r\n\r\n",
        b"POST /http HTTP/1.1\r\nHost: 127.0.0.1:6901\r\nContent-Type: application/json; charset=utf-8\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: [::1]:80\r\nConnection: close\r\nX-Request-Id: abc\r\n\r\n",
        b"POST /messages?session_id=x HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n",
    ]
    BODY = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": "echo", "arguments": {"text": "hi"}, "_meta": {
            "io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {}}}}).encode()
    SMUGGLE = [b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n", b"Content-Length: 0\r\nContent-Length: 0\r\n",
               b"Transfer-Encoding: chunked, gzip\r\n", b" folded\r\n", b"X: a\nY: b\r\n", b"X: a\rb\r\n",
               b"Host: evil.com\r\n", b"X: \x00\r\n", b"\xc3\xa9: x\r\n", b"X-Big: " + b"a" * 20000 + b"\r\n",
               b"Content-Length: -1\r\n", b"Content-Length: 1e3\r\n", b"Transfer-Encoding: \x0bchunked\r\n"]
    CHUNKS = [b"5\r\nhello\r\n0\r\n\r\n", b"5;" + b"e" * 3000 + b"\r\nhello\r\n0\r\n\r\n", b"z\r\n", b"0\r\n\r\n",
              b"ffffffffffffffffff\r\n", b"5\r\nhello0\r\n\r\n", b"3\nabc\n0\n\n", b"\x00\r\n"]

    def _mutate_head(self, rng: random.Random) -> bytes:
        head = bytearray(rng.choice(self.SEED_HEADS))
        body = self.BODY
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(9)
            if op == 0 and head:  # flip a byte
                head[rng.randrange(len(head))] = rng.randrange(256)
            elif op == 1:  # insert smuggling or malformed header lines
                at = head.find(b"\r\n") + 2
                head[at:at] = rng.choice(self.SMUGGLE)
            elif op == 2:  # bare LF / bare CR / NUL somewhere
                pos = rng.randrange(len(head) + 1)
                head[pos:pos] = rng.choice([b"\n", b"\r", b"\x00", b"\r\n", b" ", b"\t"])
            elif op == 3:  # non-ASCII in the method or target
                pos = rng.randrange(min(len(head), 20) + 1)
                head[pos:pos] = rng.choice(["é".encode(), b"\xff", "☃".encode(), b"%00", b"%0d%0a"])
            elif op == 4 and len(head) > 4:  # cut
                del head[rng.randrange(len(head) - 4):]
            elif op == 5:  # repeat a line
                lines = bytes(head).split(b"\r\n")
                line = rng.choice(lines[1:-2] or lines)
                head = bytearray(b"\r\n".join(lines[:1] + [line] + lines[1:]))
            elif op == 6:  # the body: another size, encoding, depth
                body = rng.choice([b"", b"{", deep_json(rng.choice([63, 65, 3000])), body * rng.randint(1, 3),
                                   body.replace(b"hi", "\u2028\ud7ff\U0001F600".encode()), b"\xef\xbb\xbf" + body,
                                   body.replace(b"1,", b"1e999999,"), rng.choice(self.CHUNKS)])
            elif op == 7:  # case games
                head = bytearray(head.upper() if rng.random() < 0.5 else head.lower())
            else:  # a long value
                at = head.find(b"\r\n") + 2
                head[at:at] = b"X-Long: " + b"v" * rng.choice([100, 5000, 17000]) + b"\r\n"
        if b"%d" in head:
            head = bytearray(bytes(head).replace(b"%d", str(len(body)).encode(), 1))
        return bytes(head) + body

    def _mutate_message(self, rng: random.Random) -> tuple:
        """(path, headers, body bytes) of a mutated JSON-RPC request."""
        method = rng.choice(["tools/call", "tools/list", "ping", "resources/read", "prompts/get", "initialize",
                             "completion/complete", "logging/setLevel", "server/discover", "nope", ""])
        params = {"name": rng.choice(["echo", "add", "refuse", "greeting", "missing"]),
                  "arguments": rng.choice([{"text": "x"}, {"a": 1, "b": 2}, {"name": "n"}, {}]),
                  "uri": rng.choice(["test://static", "test://items/1", "x"]),
                  "_meta": {META_VERSION: MODERN, META_CAPS: {}}}
        message = {"jsonrpc": "2.0", "id": rng.choice([1, "a", 0, -1, 2 ** 70, 1.5]), "method": method,
                   "params": params}
        for _ in range(rng.randint(0, 3)):
            target = rng.choice([message, params] + [v for v in params.values() if isinstance(v, dict)])
            key = rng.choice(list(target) + ["extra"]) if target else "extra"
            op = rng.randrange(4)
            if op == 0:
                target[key] = random_json(rng, 3)
            elif op == 1:
                target.pop(key, None)
            elif op == 2:
                target[key] = json.loads(deep_json(rng.choice([10, 40, 60])))
            else:
                target[key] = rng.choice(["\u0000", "\ud7ff\ue000\uffff", "é" * 1000, 10 ** 300, -0.0, 1e308,
                                          [None] * 100, {"k" * 300: 1}])
        body = json.dumps(message).encode()
        op = rng.randrange(8)
        if op == 0:
            body = rng.choice([b"[" + body + b"]", b"[" + body + b"," + body + b"]", b"[]"])
        elif op == 1 and body:
            pos = rng.randrange(len(body))
            body = body[:pos] + bytes([rng.randrange(256)]) + body[pos + 1:]
        elif op == 2:
            body = body[:rng.randrange(len(body) + 1)]
        elif op == 3:
            body = body.replace(b'"2.0"', rng.choice([b"NaN", b"Infinity", b"1e999999", b'"\\ud800"', b"9" * 5000]), 1)
        elif op == 4:
            body = deep_json(rng.choice([64, 65, 10 ** 4]), body.decode())
        path = rng.choice(["/mcp", "/mcp", "/http"])
        headers = {"Content-Type": rng.choice(["application/json", "application/json; charset=utf-8"]),
                   "Accept": rng.choice([ACCEPT_BOTH, "application/json", "text/event-stream", None, "*/*"]),
                   "MCP-Protocol-Version": rng.choice([MODERN, LEGACY, None, "x", "2026-07-28\x01"]),
                   "Mcp-Method": rng.choice([method, None, "other", "\x85"]),
                   "Mcp-Name": rng.choice([params.get("name") if isinstance(params.get("name"), str) else None,
                                           None, "=?base64?*?="])}
        if headers["Mcp-Name"] and not headers["Mcp-Name"].isascii():  # (as a client sends it)
            headers["Mcp-Name"] = "=?base64?" + base64.b64encode(headers["Mcp-Name"].encode()).decode() + "?="
        return path, headers, body

    def _run_cases(self, port: int, make_case, caplog, half_close: bool = True) -> collections.Counter:
        statuses = collections.Counter()
        with Conn(port) as health:
            for i in range(FUZZ_CASES):
                status = send_raw(port, make_case(), half_close)
                assert status is None or status < 500, (i, status)
                statuses[status] += 1
                health.request("GET", "/healthz")  # still serving, after every case
                assert health.read_response().status == 200, i
        assert not errors_logged(caplog)
        return statuses

    def test_fuzzed_requests_never_get_a_5xx(self, hostile, caplog):
        caplog.set_level(logging.WARNING, logger="mcp_server")
        rng = random.Random(0x19_0001)
        statuses = self._run_cases(hostile.port, lambda: self._mutate_head(rng), caplog)
        assert statuses[400] and statuses[431] and (statuses[200] or statuses[202]), statuses  # it reached them
        assert_alive(hostile.port)

    def test_fuzzed_json_rpc_never_gets_a_5xx(self, hostile, caplog):
        caplog.set_level(logging.WARNING, logger="mcp_server")
        rng = random.Random(0x19_0002)

        def case() -> bytes:  # (whole requests that end their connection: a tool may run on a thread)
            path, headers, body = self._mutate_message(rng)
            return raw_request("POST", path, {**headers, "Connection": "close"}, body)
        statuses = self._run_cases(hostile.port, case, caplog, half_close=False)
        assert statuses[200] and statuses[400], statuses
        assert_alive(hostile.port)

    def test_the_depth_limit_is_exact_whatever_the_strings_hold(self):
        rng = random.Random(0x19_0005)

        def depth(value) -> int:
            if isinstance(value, (list, dict)):
                items = value.values() if isinstance(value, dict) else value
                return 1 + max((depth(item) for item in items), default=0)
            return 0

        def tricky() -> str:
            return "".join(rng.choice('[]{}"\\ a\u00e9:,') for _ in range(rng.randint(0, 12)))
        for _ in range(FUZZ_CASES):
            value = rng.choice([tricky(), 1, None, [], {}])
            for _level in range(rng.randint(0, 90)):
                siblings = [rng.choice([tricky(), random_json(rng, 2)]) for _ in range(rng.randint(0, 2))]
                value = rng.choice([[*siblings, value], {tricky(): value, **{tricky(): v for v in siblings}}])
            text = json.dumps(value, indent=rng.choice([None, 1]), ensure_ascii=rng.random() < 0.5)
            limit = rng.randint(1, 96)
            if depth(value) > limit:
                with pytest.raises(ValueError, match="deeper than"):
                    mcp_server._loads(text.encode(), limit)
            else:
                assert mcp_server._loads(text.encode(), limit) == value

    # -- the request-head parser against the standard library's --------------------------------------

    TCHAR = "!#$%&'*+-.^_`|~" + string.ascii_letters + string.digits
    VCHAR = "".join(chr(c) for c in range(0x21, 0x7f)) + "\t \x80\xa0\xe9\xff"

    @staticmethod
    def _stdlib_head(head: bytes):
        """(method, target, version, [(name, value)]) as the standard library reads ``head``, or
        None where it finds it malformed (http.server's request-line checks, the email parser's
        defects, which h11 also treats as errors)."""
        line, _, block = head.partition(b"\r\n")
        words = line.decode("latin-1").split(" ")
        if len(words) != 3 or not words[2].startswith("HTTP/") or not words[0] or not words[1]:
            return None
        try:
            message = http_client.parse_headers(io.BytesIO(block + b"\r\n\r\n"))
        except http_client.HTTPException:
            return None
        if message.defects or message.get_payload():
            return None
        return words[0], words[1], words[2], [(k.lower(), v.strip(" \t")) for k, v in message.items()]

    def _valid_head(self, rng: random.Random) -> bytes:
        lines = [f"{rng.choice(['GET', 'POST', 'DELETE', 'X-Y'])} /{rng.choice(['', 'mcp', 'a/b?c=d', '%41'])} "
                 f"HTTP/1.{rng.randint(0, 1)}", "Host: localhost"]
        for _ in range(rng.randint(0, 8)):
            name = "".join(rng.choice(self.TCHAR) for _ in range(rng.randint(1, 12)))
            if name.lower() in ("host", "content-length", "transfer-encoding"):
                continue
            value = "".join(rng.choice(self.VCHAR) for _ in range(rng.randint(0, 20)))
            lines.append(f"{name}:{rng.choice(['', ' ', '  ', chr(9)])}{value.strip(' ' + chr(9))}"
                         f"{rng.choice(['', ' ', chr(9)])}")
        return "\r\n".join(lines).encode("latin-1")

    def test_valid_heads_parse_as_the_standard_library_parses_them(self):
        rng = random.Random(0x19_0003)
        for _ in range(FUZZ_CASES):
            head = self._valid_head(rng)
            expected = self._stdlib_head(head)
            assert expected is not None, head
            template, _h11, _fields, pairs, *_ = mcp_server._parse_request_head(head)
            method, target, _version, headers = expected
            assert (template["method"], template["raw_path"] + (b"?" + template["query_string"]
                    if template["query_string"] else b"")) == (method, target.encode("latin-1")), head
            assert list(pairs) == headers, head

    def test_heads_the_standard_library_finds_malformed_are_400(self, hostile):
        rng = random.Random(0x19_0004)
        refused = 0
        for _ in range(FUZZ_CASES // 2):
            head = bytearray(self._valid_head(rng))
            for _m in range(rng.randint(1, 3)):
                pos = rng.randrange(head.find(b"\r\n") + 1, len(head) + 1)
                head[pos:pos] = rng.choice([b"\r\n ", b"\r\n\t", b"\r\nno colon", b"\r\n: v", b"\n", b"\r",
                                            b"\r\nBad Name: v", b"\r\n\x00: v"])
            if self._stdlib_head(bytes(head)) is not None:
                continue
            refused += 1
            with pytest.raises(mcp_server._BadRequest) as caught:
                mcp_server._parse_request_head(bytes(head))
            assert caught.value.status == 400, head
        assert refused > FUZZ_CASES // 8
        assert send_raw(hostile.port, b"GET / HTTP/1.1\r\nHost: localhost\r\n folded\r\n\r\n") == 400


# ==== Real clients: the official SDK's own message sequences, replayed ========================
#
# Replays of what a real client sends: the official MCP Python SDK (`mcp` 2.3.0, `mcp.Client`).
#
# The sequences below were recorded by `examples/sdk_client_check.py --capture DIR` (a logging TCP
# proxy in front of examples/everything_server.py for HTTP; `tee` on the stdio subprocess's stdin)
# and are embedded verbatim, so these tests need no SDK. Each test replays the same bytes against
# a fresh everything_server and checks every answer the way the SDK would have. Replaying changes
# only what the server chooses anew on each run:
#   - the Host header (the proxy's port becomes the test server's),
#   - the Mcp-Session-Id (taken from the replayed initialize answer),
#   - the id of a JSON-RPC response to a server request (taken from that request),
#   - a 2026-07-28 requestState (taken from the input_required result it answers).
# A body that changes gets a matching Content-Length; nothing else is touched.

SDK_CLIENT_INFO = {'name': 'mcp', 'version': '0.1.0'}  # what mcp.Client sends unless told otherwise

# (a) stdio, Client(mode="legacy") at 2025-11-25: every line written to the server's stdin.
SDK_STDIO_LEGACY_LINES = [
    '{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{"sampling":{},"elicitation":{"form":{},"url":{}},"roots":{"listChanged":true}},"clientInfo":{"name":"mcp","version":"0.1.0"}}}',
    '{"jsonrpc":"2.0","method":"notifications/initialized"}',
    '{"jsonrpc":"2.0","id":2,"method":"ping"}',
    '{"jsonrpc":"2.0","id":3,"method":"tools/list"}',
    '{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"test_simple_text","arguments":{}}}',
    '{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"greet","arguments":{"name":"SDK"}}}',
    '{"jsonrpc":"2.0","id":6,"method":"tools/call","params":{"name":"test_x_mcp_header","arguments":{"region":"eu-west-1"}}}',
    '{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"test_elicitation","arguments":{"message":"Your answer?"}}}',
    '{"jsonrpc":"2.0","id":"sbc7de9-1","result":{"action":"accept","content":{"response":"sdk-response"}}}',
    '{"jsonrpc":"2.0","id":8,"method":"tools/call","params":{"name":"test_sampling","arguments":{"prompt":"Capital of France?"}}}',
    '{"jsonrpc":"2.0","id":"sbc7de9-2","result":{"role":"assistant","content":{"type":"text","text":"Paris"},"model":"sdk-check-model"}}',
    '{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"test_input_required_result_list_roots","arguments":{}}}',
    '{"jsonrpc":"2.0","id":"sbc7de9-3","result":{"roots":[{"uri":"file:///tmp/sdk-check","name":"scratch"}]}}',
    '{"jsonrpc":"2.0","id":10,"method":"logging/setLevel","params":{"level":"debug"}}',
    '{"jsonrpc":"2.0","id":11,"method":"tools/call","params":{"name":"test_tool_with_logging","arguments":{}}}',
    '{"jsonrpc":"2.0","id":12,"method":"tools/call","params":{"name":"test_tool_with_progress","arguments":{},"_meta":{"progressToken":12}}}',
    '{"jsonrpc":"2.0","id":13,"method":"resources/list"}',
    '{"jsonrpc":"2.0","id":14,"method":"resources/read","params":{"uri":"test://static-text"}}',
    '{"jsonrpc":"2.0","id":15,"method":"resources/read","params":{"uri":"test://static-binary"}}',
    '{"jsonrpc":"2.0","id":16,"method":"resources/templates/list"}',
    '{"jsonrpc":"2.0","id":17,"method":"resources/read","params":{"uri":"test://template/42/data"}}',
    '{"jsonrpc":"2.0","id":18,"method":"prompts/list"}',
    '{"jsonrpc":"2.0","id":19,"method":"prompts/get","params":{"name":"test_prompt_with_arguments","arguments":{"arg1":"a","arg2":"b"}}}',
    '{"jsonrpc":"2.0","id":20,"method":"completion/complete","params":{"ref":{"type":"ref/prompt","name":"test_prompt_with_arguments"},"argument":{"name":"arg1","value":"x"}}}',
    '{"jsonrpc":"2.0","id":21,"method":"resources/subscribe","params":{"uri":"test://watched-resource"}}',
    '{"jsonrpc":"2.0","id":22,"method":"tools/call","params":{"name":"test_trigger_tool_change","arguments":{}}}',
    '{"jsonrpc":"2.0","id":23,"method":"resources/unsubscribe","params":{"uri":"test://watched-resource"}}',
]

# (b) Streamable HTTP, Client(mode="legacy"): every request, in the order its first byte arrived.
SDK_HTTP_LEGACY = [
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:38217'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('Content-Length', '229'),
        ],
        "body": '{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{"sampling":{},"elicitation":{"form":{},"url":{}},"roots":{"listChanged":true}},"clientInfo":{"name":"mcp","version":"0.1.0"}}}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:38217'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-session-id', 'Xzd1ouP7RKjxzMpVS6oKdNUokRv1u7xp'),
            ('mcp-protocol-version', '2025-11-25'),
            ('Content-Length', '54'),
        ],
        "body": '{"jsonrpc":"2.0","method":"notifications/initialized"}',
    },
    {
        "method": 'GET', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:38217'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('Cache-Control', 'no-store'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-session-id', 'Xzd1ouP7RKjxzMpVS6oKdNUokRv1u7xp'),
            ('mcp-protocol-version', '2025-11-25'),
        ],
        "body": '',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:38217'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-session-id', 'Xzd1ouP7RKjxzMpVS6oKdNUokRv1u7xp'),
            ('mcp-protocol-version', '2025-11-25'),
            ('Content-Length', '40'),
        ],
        "body": '{"jsonrpc":"2.0","id":2,"method":"ping"}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:38217'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-session-id', 'Xzd1ouP7RKjxzMpVS6oKdNUokRv1u7xp'),
            ('mcp-protocol-version', '2025-11-25'),
            ('Content-Length', '46'),
        ],
        "body": '{"jsonrpc":"2.0","id":3,"method":"tools/list"}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:38217'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-session-id', 'Xzd1ouP7RKjxzMpVS6oKdNUokRv1u7xp'),
            ('mcp-protocol-version', '2025-11-25'),
            ('Content-Length', '98'),
        ],
        "body": '{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"test_simple_text","arguments":{}}}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:38217'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-session-id', 'Xzd1ouP7RKjxzMpVS6oKdNUokRv1u7xp'),
            ('mcp-protocol-version', '2025-11-25'),
            ('Content-Length', '99'),
        ],
        "body": '{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"greet","arguments":{"name":"SDK"}}}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:38217'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-session-id', 'Xzd1ouP7RKjxzMpVS6oKdNUokRv1u7xp'),
            ('mcp-protocol-version', '2025-11-25'),
            ('Content-Length', '119'),
        ],
        "body": '{"jsonrpc":"2.0","id":6,"method":"tools/call","params":{"name":"test_x_mcp_header","arguments":{"region":"eu-west-1"}}}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:38217'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-session-id', 'Xzd1ouP7RKjxzMpVS6oKdNUokRv1u7xp'),
            ('mcp-protocol-version', '2025-11-25'),
            ('Content-Length', '122'),
        ],
        "body": '{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"test_elicitation","arguments":{"message":"Your answer?"}}}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:38217'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-session-id', 'Xzd1ouP7RKjxzMpVS6oKdNUokRv1u7xp'),
            ('mcp-protocol-version', '2025-11-25'),
            ('Content-Length', '101'),
        ],
        "body": '{"jsonrpc":"2.0","id":"s23fb51-1","result":{"action":"accept","content":{"response":"sdk-response"}}}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:38217'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-session-id', 'Xzd1ouP7RKjxzMpVS6oKdNUokRv1u7xp'),
            ('mcp-protocol-version', '2025-11-25'),
            ('Content-Length', '124'),
        ],
        "body": '{"jsonrpc":"2.0","id":8,"method":"tools/call","params":{"name":"test_sampling","arguments":{"prompt":"Capital of France?"}}}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:38217'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-session-id', 'Xzd1ouP7RKjxzMpVS6oKdNUokRv1u7xp'),
            ('mcp-protocol-version', '2025-11-25'),
            ('Content-Length', '131'),
        ],
        "body": '{"jsonrpc":"2.0","id":"s23fb51-2","result":{"role":"assistant","content":{"type":"text","text":"Paris"},"model":"sdk-check-model"}}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:38217'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-session-id', 'Xzd1ouP7RKjxzMpVS6oKdNUokRv1u7xp'),
            ('mcp-protocol-version', '2025-11-25'),
            ('Content-Length', '119'),
        ],
        "body": '{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"test_input_required_result_list_roots","arguments":{}}}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:38217'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-session-id', 'Xzd1ouP7RKjxzMpVS6oKdNUokRv1u7xp'),
            ('mcp-protocol-version', '2025-11-25'),
            ('Content-Length', '104'),
        ],
        "body": '{"jsonrpc":"2.0","id":"s23fb51-3","result":{"roots":[{"uri":"file:///tmp/sdk-check","name":"scratch"}]}}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:38217'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-session-id', 'Xzd1ouP7RKjxzMpVS6oKdNUokRv1u7xp'),
            ('mcp-protocol-version', '2025-11-25'),
            ('Content-Length', '80'),
        ],
        "body": '{"jsonrpc":"2.0","id":10,"method":"logging/setLevel","params":{"level":"debug"}}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:38217'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-session-id', 'Xzd1ouP7RKjxzMpVS6oKdNUokRv1u7xp'),
            ('mcp-protocol-version', '2025-11-25'),
            ('Content-Length', '105'),
        ],
        "body": '{"jsonrpc":"2.0","id":11,"method":"tools/call","params":{"name":"test_tool_with_logging","arguments":{}}}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:38217'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-session-id', 'Xzd1ouP7RKjxzMpVS6oKdNUokRv1u7xp'),
            ('mcp-protocol-version', '2025-11-25'),
            ('Content-Length', '135'),
        ],
        "body": '{"jsonrpc":"2.0","id":12,"method":"tools/call","params":{"name":"test_tool_with_progress","arguments":{},"_meta":{"progressToken":12}}}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:38217'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-session-id', 'Xzd1ouP7RKjxzMpVS6oKdNUokRv1u7xp'),
            ('mcp-protocol-version', '2025-11-25'),
            ('Content-Length', '51'),
        ],
        "body": '{"jsonrpc":"2.0","id":13,"method":"resources/list"}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:38217'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-session-id', 'Xzd1ouP7RKjxzMpVS6oKdNUokRv1u7xp'),
            ('mcp-protocol-version', '2025-11-25'),
            ('Content-Length', '89'),
        ],
        "body": '{"jsonrpc":"2.0","id":14,"method":"resources/read","params":{"uri":"test://static-text"}}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:38217'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-session-id', 'Xzd1ouP7RKjxzMpVS6oKdNUokRv1u7xp'),
            ('mcp-protocol-version', '2025-11-25'),
            ('Content-Length', '91'),
        ],
        "body": '{"jsonrpc":"2.0","id":15,"method":"resources/read","params":{"uri":"test://static-binary"}}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:38217'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-session-id', 'Xzd1ouP7RKjxzMpVS6oKdNUokRv1u7xp'),
            ('mcp-protocol-version', '2025-11-25'),
            ('Content-Length', '61'),
        ],
        "body": '{"jsonrpc":"2.0","id":16,"method":"resources/templates/list"}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:38217'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-session-id', 'Xzd1ouP7RKjxzMpVS6oKdNUokRv1u7xp'),
            ('mcp-protocol-version', '2025-11-25'),
            ('Content-Length', '94'),
        ],
        "body": '{"jsonrpc":"2.0","id":17,"method":"resources/read","params":{"uri":"test://template/42/data"}}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:38217'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-session-id', 'Xzd1ouP7RKjxzMpVS6oKdNUokRv1u7xp'),
            ('mcp-protocol-version', '2025-11-25'),
            ('Content-Length', '49'),
        ],
        "body": '{"jsonrpc":"2.0","id":18,"method":"prompts/list"}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:38217'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-session-id', 'Xzd1ouP7RKjxzMpVS6oKdNUokRv1u7xp'),
            ('mcp-protocol-version', '2025-11-25'),
            ('Content-Length', '131'),
        ],
        "body": '{"jsonrpc":"2.0","id":19,"method":"prompts/get","params":{"name":"test_prompt_with_arguments","arguments":{"arg1":"a","arg2":"b"}}}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:38217'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-session-id', 'Xzd1ouP7RKjxzMpVS6oKdNUokRv1u7xp'),
            ('mcp-protocol-version', '2025-11-25'),
            ('Content-Length', '170'),
        ],
        "body": '{"jsonrpc":"2.0","id":20,"method":"completion/complete","params":{"ref":{"type":"ref/prompt","name":"test_prompt_with_arguments"},"argument":{"name":"arg1","value":"x"}}}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:38217'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-session-id', 'Xzd1ouP7RKjxzMpVS6oKdNUokRv1u7xp'),
            ('mcp-protocol-version', '2025-11-25'),
            ('Content-Length', '99'),
        ],
        "body": '{"jsonrpc":"2.0","id":21,"method":"resources/subscribe","params":{"uri":"test://watched-resource"}}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:38217'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-session-id', 'Xzd1ouP7RKjxzMpVS6oKdNUokRv1u7xp'),
            ('mcp-protocol-version', '2025-11-25'),
            ('Content-Length', '107'),
        ],
        "body": '{"jsonrpc":"2.0","id":22,"method":"tools/call","params":{"name":"test_trigger_tool_change","arguments":{}}}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:38217'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-session-id', 'Xzd1ouP7RKjxzMpVS6oKdNUokRv1u7xp'),
            ('mcp-protocol-version', '2025-11-25'),
            ('Content-Length', '101'),
        ],
        "body": '{"jsonrpc":"2.0","id":23,"method":"resources/unsubscribe","params":{"uri":"test://watched-resource"}}',
    },
    {
        "method": 'DELETE', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:38217'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-session-id', 'Xzd1ouP7RKjxzMpVS6oKdNUokRv1u7xp'),
            ('mcp-protocol-version', '2025-11-25'),
        ],
        "body": '',
    },
]

# (c) Streamable HTTP, Client(mode="auto") -> server/discover -> 2026-07-28: every request.
SDK_HTTP_MODERN = [
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:37837'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-protocol-version', '2026-07-28'),
            ('mcp-method', 'server/discover'),
            ('Content-Length', '322'),
        ],
        "body": '{"jsonrpc":"2.0","id":1,"method":"server/discover","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"mcp","version":"0.1.0"},"io.modelcontextprotocol/clientCapabilities":{"sampling":{},"elicitation":{"form":{},"url":{}},"roots":{"listChanged":true}}}}}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:37837'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-protocol-version', '2026-07-28'),
            ('mcp-method', 'tools/list'),
            ('Content-Length', '360'),
        ],
        "body": '{"jsonrpc":"2.0","id":2,"method":"tools/list","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"mcp","version":"0.1.0"},"io.modelcontextprotocol/clientCapabilities":{"sampling":{},"elicitation":{"form":{},"url":{}},"roots":{"listChanged":true}},"io.modelcontextprotocol/logLevel":"debug"}}}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:37837'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-protocol-version', '2026-07-28'),
            ('mcp-method', 'tools/call'),
            ('mcp-name', 'test_simple_text'),
            ('Content-Length', '401'),
        ],
        "body": '{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"test_simple_text","arguments":{},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"mcp","version":"0.1.0"},"io.modelcontextprotocol/clientCapabilities":{"sampling":{},"elicitation":{"form":{},"url":{}},"roots":{"listChanged":true}},"io.modelcontextprotocol/logLevel":"debug"}}}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:37837'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-protocol-version', '2026-07-28'),
            ('mcp-method', 'tools/call'),
            ('mcp-name', 'greet'),
            ('Content-Length', '402'),
        ],
        "body": '{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"greet","arguments":{"name":"SDK"},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"mcp","version":"0.1.0"},"io.modelcontextprotocol/clientCapabilities":{"sampling":{},"elicitation":{"form":{},"url":{}},"roots":{"listChanged":true}},"io.modelcontextprotocol/logLevel":"debug"}}}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:37837'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-protocol-version', '2026-07-28'),
            ('mcp-method', 'tools/call'),
            ('mcp-name', 'test_x_mcp_header'),
            ('Mcp-Param-Region', 'eu-west-1'),
            ('Content-Length', '422'),
        ],
        "body": '{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"test_x_mcp_header","arguments":{"region":"eu-west-1"},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"mcp","version":"0.1.0"},"io.modelcontextprotocol/clientCapabilities":{"sampling":{},"elicitation":{"form":{},"url":{}},"roots":{"listChanged":true}},"io.modelcontextprotocol/logLevel":"debug"}}}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:37837'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-protocol-version', '2026-07-28'),
            ('mcp-method', 'tools/call'),
            ('mcp-name', 'test_elicitation'),
            ('Content-Length', '425'),
        ],
        "body": '{"jsonrpc":"2.0","id":6,"method":"tools/call","params":{"name":"test_elicitation","arguments":{"message":"Your answer?"},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"mcp","version":"0.1.0"},"io.modelcontextprotocol/clientCapabilities":{"sampling":{},"elicitation":{"form":{},"url":{}},"roots":{"listChanged":true}},"io.modelcontextprotocol/logLevel":"debug"}}}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:37837'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-protocol-version', '2026-07-28'),
            ('mcp-method', 'tools/call'),
            ('mcp-name', 'test_elicitation'),
            ('Content-Length', '425'),
        ],
        "body": '{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"test_elicitation","arguments":{"message":"Your answer?"},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"mcp","version":"0.1.0"},"io.modelcontextprotocol/clientCapabilities":{"sampling":{},"elicitation":{"form":{},"url":{}},"roots":{"listChanged":true}},"io.modelcontextprotocol/logLevel":"debug"}}}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:37837'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-protocol-version', '2026-07-28'),
            ('mcp-method', 'tools/call'),
            ('mcp-name', 'test_elicitation'),
            ('Content-Length', '738'),
        ],
        "body": '{"jsonrpc":"2.0","id":8,"method":"tools/call","params":{"inputResponses":{"ask1":{"action":"accept","content":{"response":"sdk-response"}}},"requestState":"hMumt5S0W5OdZlZE2EsgLZ7stNgGgV7SGpAIPJMsstffCfMaK-OIse33jykORmddTMpoLQcH6JrfyJ4B3KORyoTc7QTKyyVXzRB4GQugdGw2mp7e4SIQiM4Lz9z9aWcbow96TYxy8Eo6w41FSb55_biIAKUoe83n6pQ0BByRCJqyF0Xm6kMHlFm8X2wH9lKMuIq7X4q9asXJT9U81Dk","name":"test_elicitation","arguments":{"message":"Your answer?"},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"mcp","version":"0.1.0"},"io.modelcontextprotocol/clientCapabilities":{"sampling":{},"elicitation":{"form":{},"url":{}},"roots":{"listChanged":true}},"io.modelcontextprotocol/logLevel":"debug"}}}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:37837'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-protocol-version', '2026-07-28'),
            ('mcp-method', 'tools/call'),
            ('mcp-name', 'test_sampling'),
            ('Content-Length', '427'),
        ],
        "body": '{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"test_sampling","arguments":{"prompt":"Capital of France?"},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"mcp","version":"0.1.0"},"io.modelcontextprotocol/clientCapabilities":{"sampling":{},"elicitation":{"form":{},"url":{}},"roots":{"listChanged":true}},"io.modelcontextprotocol/logLevel":"debug"}}}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:37837'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-protocol-version', '2026-07-28'),
            ('mcp-method', 'tools/call'),
            ('mcp-name', 'test_sampling'),
            ('Content-Length', '767'),
        ],
        "body": '{"jsonrpc":"2.0","id":10,"method":"tools/call","params":{"inputResponses":{"ask1":{"role":"assistant","content":{"type":"text","text":"Paris"},"model":"sdk-check-model"}},"requestState":"KX9yN5fRQ8DnTYlq2TNGw28fmL_0FMrEYnP0W7MFprcEALVhfMB4QCkL_NBN1RGo85yJJeANkFJH7M-eafMKq-hjRIF4GjodK4nZADlqWS5bucZP0p6599MgAl8YZTPE1-iY2nSiVfVJ5-v-XXnA7IKfU4Wty7_FJrGfbjFJTnmKsxHdA1F0FBJiOgkfrCe-9BGadCcFyospDms","name":"test_sampling","arguments":{"prompt":"Capital of France?"},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"mcp","version":"0.1.0"},"io.modelcontextprotocol/clientCapabilities":{"sampling":{},"elicitation":{"form":{},"url":{}},"roots":{"listChanged":true}},"io.modelcontextprotocol/logLevel":"debug"}}}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:37837'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-protocol-version', '2026-07-28'),
            ('mcp-method', 'tools/call'),
            ('mcp-name', 'test_input_required_result_list_roots'),
            ('Content-Length', '423'),
        ],
        "body": '{"jsonrpc":"2.0","id":11,"method":"tools/call","params":{"name":"test_input_required_result_list_roots","arguments":{},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"mcp","version":"0.1.0"},"io.modelcontextprotocol/clientCapabilities":{"sampling":{},"elicitation":{"form":{},"url":{}},"roots":{"listChanged":true}},"io.modelcontextprotocol/logLevel":"debug"}}}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:37837'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-protocol-version', '2026-07-28'),
            ('mcp-method', 'tools/call'),
            ('mcp-name', 'test_input_required_result_list_roots'),
            ('Content-Length', '775'),
        ],
        "body": '{"jsonrpc":"2.0","id":12,"method":"tools/call","params":{"inputResponses":{"client_roots":{"roots":[{"uri":"file:///tmp/sdk-check","name":"scratch"}]}},"requestState":"lm8cE0D3j6d6o2AMNgD2yES-YCDrk6ddP1uT0a2YQcdNUiWgbM_d2NJqRUDBBLsHoHpClBFulkTLsUXbfbKGkYerkJN-gbzUGRWFMIJtN3ynblcvAoIEp4xGIlg_NyrGwveY2OxH0SvvSE09FB2_60TFl56X-yHfs-fyHaN3RPRgfdyiEWQ8kKYRDjSXHFeTmZ6StLIxqj2AydO5ZbWJ3OE-DOmPRGSIbDVlFOvuKagcWRA","name":"test_input_required_result_list_roots","arguments":{},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"mcp","version":"0.1.0"},"io.modelcontextprotocol/clientCapabilities":{"sampling":{},"elicitation":{"form":{},"url":{}},"roots":{"listChanged":true}},"io.modelcontextprotocol/logLevel":"debug"}}}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:37837'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-protocol-version', '2026-07-28'),
            ('mcp-method', 'tools/call'),
            ('mcp-name', 'test_tool_with_logging'),
            ('Content-Length', '408'),
        ],
        "body": '{"jsonrpc":"2.0","id":13,"method":"tools/call","params":{"name":"test_tool_with_logging","arguments":{},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"mcp","version":"0.1.0"},"io.modelcontextprotocol/clientCapabilities":{"sampling":{},"elicitation":{"form":{},"url":{}},"roots":{"listChanged":true}},"io.modelcontextprotocol/logLevel":"debug"}}}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:37837'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-protocol-version', '2026-07-28'),
            ('mcp-method', 'tools/call'),
            ('mcp-name', 'test_tool_with_progress'),
            ('Content-Length', '428'),
        ],
        "body": '{"jsonrpc":"2.0","id":14,"method":"tools/call","params":{"name":"test_tool_with_progress","arguments":{},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"mcp","version":"0.1.0"},"io.modelcontextprotocol/clientCapabilities":{"sampling":{},"elicitation":{"form":{},"url":{}},"roots":{"listChanged":true}},"io.modelcontextprotocol/logLevel":"debug","progressToken":14}}}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:37837'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-protocol-version', '2026-07-28'),
            ('mcp-method', 'resources/list'),
            ('Content-Length', '365'),
        ],
        "body": '{"jsonrpc":"2.0","id":15,"method":"resources/list","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"mcp","version":"0.1.0"},"io.modelcontextprotocol/clientCapabilities":{"sampling":{},"elicitation":{"form":{},"url":{}},"roots":{"listChanged":true}},"io.modelcontextprotocol/logLevel":"debug"}}}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:37837'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-protocol-version', '2026-07-28'),
            ('mcp-method', 'resources/read'),
            ('mcp-name', 'test://static-text'),
            ('Content-Length', '392'),
        ],
        "body": '{"jsonrpc":"2.0","id":16,"method":"resources/read","params":{"uri":"test://static-text","_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"mcp","version":"0.1.0"},"io.modelcontextprotocol/clientCapabilities":{"sampling":{},"elicitation":{"form":{},"url":{}},"roots":{"listChanged":true}},"io.modelcontextprotocol/logLevel":"debug"}}}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:37837'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-protocol-version', '2026-07-28'),
            ('mcp-method', 'resources/read'),
            ('mcp-name', 'test://static-binary'),
            ('Content-Length', '394'),
        ],
        "body": '{"jsonrpc":"2.0","id":17,"method":"resources/read","params":{"uri":"test://static-binary","_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"mcp","version":"0.1.0"},"io.modelcontextprotocol/clientCapabilities":{"sampling":{},"elicitation":{"form":{},"url":{}},"roots":{"listChanged":true}},"io.modelcontextprotocol/logLevel":"debug"}}}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:37837'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-protocol-version', '2026-07-28'),
            ('mcp-method', 'resources/templates/list'),
            ('Content-Length', '375'),
        ],
        "body": '{"jsonrpc":"2.0","id":18,"method":"resources/templates/list","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"mcp","version":"0.1.0"},"io.modelcontextprotocol/clientCapabilities":{"sampling":{},"elicitation":{"form":{},"url":{}},"roots":{"listChanged":true}},"io.modelcontextprotocol/logLevel":"debug"}}}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:37837'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-protocol-version', '2026-07-28'),
            ('mcp-method', 'resources/read'),
            ('mcp-name', 'test://template/42/data'),
            ('Content-Length', '397'),
        ],
        "body": '{"jsonrpc":"2.0","id":19,"method":"resources/read","params":{"uri":"test://template/42/data","_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"mcp","version":"0.1.0"},"io.modelcontextprotocol/clientCapabilities":{"sampling":{},"elicitation":{"form":{},"url":{}},"roots":{"listChanged":true}},"io.modelcontextprotocol/logLevel":"debug"}}}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:37837'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-protocol-version', '2026-07-28'),
            ('mcp-method', 'prompts/list'),
            ('Content-Length', '363'),
        ],
        "body": '{"jsonrpc":"2.0","id":20,"method":"prompts/list","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"mcp","version":"0.1.0"},"io.modelcontextprotocol/clientCapabilities":{"sampling":{},"elicitation":{"form":{},"url":{}},"roots":{"listChanged":true}},"io.modelcontextprotocol/logLevel":"debug"}}}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:37837'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-protocol-version', '2026-07-28'),
            ('mcp-method', 'prompts/get'),
            ('mcp-name', 'test_prompt_with_arguments'),
            ('Content-Length', '434'),
        ],
        "body": '{"jsonrpc":"2.0","id":21,"method":"prompts/get","params":{"name":"test_prompt_with_arguments","arguments":{"arg1":"a","arg2":"b"},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"mcp","version":"0.1.0"},"io.modelcontextprotocol/clientCapabilities":{"sampling":{},"elicitation":{"form":{},"url":{}},"roots":{"listChanged":true}},"io.modelcontextprotocol/logLevel":"debug"}}}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:37837'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-protocol-version', '2026-07-28'),
            ('mcp-method', 'completion/complete'),
            ('Content-Length', '473'),
        ],
        "body": '{"jsonrpc":"2.0","id":22,"method":"completion/complete","params":{"ref":{"type":"ref/prompt","name":"test_prompt_with_arguments"},"argument":{"name":"arg1","value":"x"},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"mcp","version":"0.1.0"},"io.modelcontextprotocol/clientCapabilities":{"sampling":{},"elicitation":{"form":{},"url":{}},"roots":{"listChanged":true}},"io.modelcontextprotocol/logLevel":"debug"}}}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:37837'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-protocol-version', '2026-07-28'),
            ('mcp-method', 'subscriptions/listen'),
            ('Content-Length', '473'),
        ],
        "body": '{"jsonrpc":"2.0","id":"listen-1","method":"subscriptions/listen","params":{"notifications":{"toolsListChanged":true,"resourceSubscriptions":["test://watched-resource"]},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"mcp","version":"0.1.0"},"io.modelcontextprotocol/clientCapabilities":{"sampling":{},"elicitation":{"form":{},"url":{}},"roots":{"listChanged":true}},"io.modelcontextprotocol/logLevel":"debug"}}}',
    },
    {
        "method": 'POST', "path": '/mcp',
        "headers": [
            ('Host', '127.0.0.1:37837'),
            ('Accept-Encoding', 'gzip, deflate'),
            ('Connection', 'keep-alive'),
            ('User-Agent', 'python-httpx2/2.16.2'),
            ('accept', 'application/json, text/event-stream'),
            ('content-type', 'application/json'),
            ('mcp-protocol-version', '2026-07-28'),
            ('mcp-method', 'tools/call'),
            ('mcp-name', 'test_trigger_tool_change'),
            ('Content-Length', '410'),
        ],
        "body": '{"jsonrpc":"2.0","id":23,"method":"tools/call","params":{"name":"test_trigger_tool_change","arguments":{},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"mcp","version":"0.1.0"},"io.modelcontextprotocol/clientCapabilities":{"sampling":{},"elicitation":{"form":{},"url":{}},"roots":{"listChanged":true}},"io.modelcontextprotocol/logLevel":"debug"}}}',
    },
]

EXPECTED_TEXT = {
    "test_simple_text": "This is a simple text response for testing.",
    "greet": "Hello, SDK!",
    "test_x_mcp_header": "region=eu-west-1",
    "test_elicitation": 'User response: action=accept, content={"response":"sdk-response"}',
    "test_sampling": "LLM response: Paris",
    "test_input_required_result_list_roots": "Found 1 root(s)",
    "test_tool_with_logging": "Tool with logging executed successfully",
    "test_trigger_tool_change": "Tool list change announced",
}
LOG_LINES = ["Tool execution started", "Tool processing data", "Tool execution completed"]


def _load_everything():
    spec = importlib.util.spec_from_file_location("everything_server_under_replay", EVERYTHING_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.server


def _is_answer(message: dict) -> bool:
    """A JSON-RPC response the client sends to a server request."""
    return "method" not in message and "id" in message and ("result" in message or "error" in message)


def _check_result(request: dict, result: dict, notifications: list, modern: bool) -> None:
    """What the SDK relies on in each answer (its result models, and the texts it got)."""
    method, params = request["method"], request.get("params") or {}
    if modern:
        assert result["resultType"] in ("complete", "input_required"), result
        assert result["_meta"][META_SERVERINFO]["name"] == "mcp-conformance-test-server", result
    if method == "initialize":
        assert result["protocolVersion"] == params["protocolVersion"]
        assert result["serverInfo"]["name"] == "mcp-conformance-test-server"
        assert {"tools", "resources", "prompts", "logging", "completions"} <= set(result["capabilities"])
    elif method == "server/discover":
        assert MODERN in result["supportedVersions"] and LEGACY in result["supportedVersions"]
        assert isinstance(result["capabilities"], dict) and result["ttlMs"] >= 0
    elif method in ("ping", "logging/setLevel", "resources/subscribe", "resources/unsubscribe"):
        assert result == {}, result
    elif method == "tools/list":
        names = {tool["name"] for tool in result["tools"]}
        assert {"test_simple_text", "test_elicitation", "test_sampling", "greet"} <= names
        assert all(isinstance(tool["inputSchema"], dict) for tool in result["tools"])
    elif method == "tools/call":
        if result.get("resultType") == "input_required":
            assert result["inputRequests"] and isinstance(result["requestState"], str), result
            return
        assert result.get("isError") is not True, result
        text = result["content"][0]["text"]
        name = params["name"]
        if name == "test_tool_with_progress":
            token = params["_meta"]["progressToken"]
            assert text == str(token)
            progress = [n["params"] for n in notifications if n["method"] == "notifications/progress"]
            assert [(p["progressToken"], p["progress"], p["total"]) for p in progress] == [
                (token, 0, 100), (token, 50, 100), (token, 100, 100)], progress
        else:
            assert text == EXPECTED_TEXT[name], (name, text)
        if name == "test_tool_with_logging":
            logs = [n["params"]["data"] for n in notifications if n["method"] == "notifications/message"]
            assert logs == LOG_LINES, logs
    elif method == "resources/list":
        assert {"test://static-text", "test://static-binary"} <= {r["uri"] for r in result["resources"]}
    elif method == "resources/read":
        content = result["contents"][0]
        assert content["uri"] == params["uri"] and ("text" in content or "blob" in content), content
    elif method == "resources/templates/list":
        assert "test://template/{id}/data" in {t["uriTemplate"] for t in result["resourceTemplates"]}
    elif method == "prompts/list":
        assert "test_prompt_with_arguments" in {p["name"] for p in result["prompts"]}
    elif method == "prompts/get":
        assert result["messages"][0]["content"]["text"] == "Prompt with arguments: arg1='a', arg2='b'"
    elif method == "completion/complete":
        assert isinstance(result["completion"]["values"], list)
    else:
        raise AssertionError(f"no check for {method}")


# ---- HTTP replay ----------------------------------------------------------------------------------


class _Background:
    """A long-lived response (the GET stream, a subscriptions/listen POST) read by a thread."""

    def __init__(self, port: int, raw: bytes):
        self.conn = Conn(port)
        self.conn.send(raw)
        self.head = self.conn.read_head()
        self.messages: list = []
        self.arrived = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        with contextlib.suppress(OSError, EOFError, AssertionError, ValueError):
            stream = SSEStream(self.conn, self.head)
            while (message := stream.next_message()) is not None:
                with self.arrived:
                    self.messages.append(message)
                    self.arrived.notify_all()

    def wait_for(self, predicate) -> dict:
        with self.arrived:
            assert self.arrived.wait_for(lambda: any(predicate(m) for m in self.messages), WAIT), self.messages
            return next(m for m in self.messages if predicate(m))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader blocked in recv()
        self.conn.close()
        self.thread.join(WAIT)
        assert not self.thread.is_alive()


class _HttpReplay:
    def __init__(self, port: int, captured: list, modern: bool):
        self.port, self.modern = port, modern
        self.pending = collections.deque(captured)
        self.sid = None
        self.request_state = {}  # tool name -> the latest requestState the server handed out
        self.background: list = []
        self.checked: list = []  # methods whose answers were checked, in order

    def build(self, captured: dict, body: str | None = None) -> bytes:
        body = captured["body"] if body is None else body
        data = body.encode()
        lines = [f"{captured['method']} {captured['path']} HTTP/1.1"]
        for name, value in captured["headers"]:
            if name.lower() == "host":
                value = f"127.0.0.1:{self.port}"
            elif name.lower() == "mcp-session-id":
                assert self.sid, "a session header before initialize"
                value = self.sid
            elif name.lower() == "content-length":
                value = str(len(data))
            lines.append(f"{name}: {value}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data

    def body_of(self, captured: dict) -> str:
        body = captured["body"]
        message = json.loads(body) if body else None
        if isinstance(message, dict) and "requestState" in (message.get("params") or {}):
            old = message["params"]["requestState"]
            body = body.replace(old, self.request_state[message["params"]["name"]])
        return body

    def answer(self, server_request: dict) -> None:
        """Send the client's captured answer to this server request, with the server's new id."""
        captured = self.pending.popleft()
        message = json.loads(captured["body"])
        assert _is_answer(message), f"expected the client's answer to {server_request}, got {message}"
        old_id, new_id = json.dumps(message["id"]), json.dumps(server_request["id"])
        body = captured["body"].replace(f'"id":{old_id}', f'"id":{new_id}', 1)
        with Conn(self.port) as conn:
            conn.send(self.build(captured, body))
            resp = conn.read_response()
        assert resp.status == 202 and resp.body == b"", resp

    def run(self) -> None:
        while self.pending:
            self.step(self.pending.popleft())

    def close(self) -> None:
        for stream in self.background:
            stream.close()

    def step(self, captured: dict) -> None:
        body = self.body_of(captured)
        message = json.loads(body) if body else None
        raw = self.build(captured, body)
        if captured["method"] == "GET":  # the legacy GET stream
            self.background.append(_Background(self.port, raw))
            head = self.background[-1].head
            assert head.status == 200 and head.content_type == "text/event-stream", head
            return
        if captured["method"] == "DELETE":
            with Conn(self.port) as conn:
                conn.send(raw)
                resp = conn.read_response()
            assert resp.status == 200, resp
            self.checked.append("DELETE")
            return
        assert not _is_answer(message), f"an answer nobody asked for: {message}"
        if message.get("method") == "subscriptions/listen":
            stream = _Background(self.port, raw)
            self.background.append(stream)
            assert stream.head.status == 200 and stream.head.content_type == "text/event-stream", stream.head
            stream.wait_for(lambda m: m.get("method") == "notifications/subscriptions/acknowledged")
            self.checked.append("subscriptions/listen")
            return
        with Conn(self.port) as conn:
            conn.send(raw)
            resp = conn.read_head()
            if "id" not in message:  # a notification
                resp.body = b"".join(conn.iter_body(resp))
                assert resp.status == 202 and resp.body == b"", resp
                return
            assert resp.status == 200, resp
            notifications, final = [], None
            if resp.content_type == "text/event-stream":
                stream = SSEStream(conn, resp)
                while final is None:
                    incoming = stream.next_message()
                    assert incoming is not None, f"the stream ended without an answer to {message['id']}"
                    if "method" in incoming and "id" in incoming:
                        self.answer(incoming)
                    elif "method" in incoming:
                        notifications.append(incoming)
                    else:
                        final = incoming
            else:
                assert resp.content_type == "application/json", resp
                resp.body = b"".join(conn.iter_body(resp))
                final = resp.json()
        assert final.get("jsonrpc") == "2.0" and final.get("id") == message["id"], final
        assert "result" in final, final
        result = final["result"]
        if message["method"] == "initialize":
            self.sid = resp.header("mcp-session-id")
            assert self.sid and VISIBLE_ASCII.fullmatch(self.sid), resp
        if message["method"] == "tools/call" and result.get("resultType") == "input_required":
            self.request_state[message["params"]["name"]] = result["requestState"]
        _check_result(message, result, notifications, self.modern)
        self.checked.append(message["method"])


# ---- stdio replay ---------------------------------------------------------------------------------


def _replay_stdio(lines: list) -> tuple[list, list]:
    """Send the captured lines to a fresh `everything_server.py --stdio`; returns (checked, notifications)."""
    pending = collections.deque(lines)
    checked, notifications = [], []
    with Proc([EVERYTHING_FILE, "--stdio"]) as proc:
        while pending:
            line = pending.popleft()
            message = json.loads(line)
            assert not _is_answer(message), f"an answer nobody asked for: {message}"
            proc.send(line + b"\n")  # the SDK ends every message with one newline
            if "id" not in message:
                continue
            mine = []
            while True:
                incoming = proc.recv()
                if "method" in incoming and "id" in incoming:  # the server asks the client
                    answer_line = pending.popleft()
                    answer = json.loads(answer_line)
                    assert _is_answer(answer), f"expected the client's answer to {incoming}, got {answer}"
                    old_id, new_id = json.dumps(answer["id"]), json.dumps(incoming["id"])
                    proc.send(answer_line.replace(f'"id":{old_id}'.encode(), f'"id":{new_id}'.encode(), 1) + b"\n")
                elif "method" in incoming:
                    mine.append(incoming)
                else:
                    break
            assert incoming.get("jsonrpc") == "2.0" and incoming["id"] == message["id"], incoming
            assert "result" in incoming, incoming
            _check_result(message, incoming["result"], mine, modern=False)
            checked.append(message["method"])
            notifications += mine
        assert proc.finish() == 0, bytes(proc.stderr)[-2000:]
        stderr = bytes(proc.stderr)
    while not proc.out_lines.empty():  # anything after the last answer (a late notification)
        line = proc.out_lines.get()
        if line is not None:
            notifications.append(json.loads(line))
    assert b"Traceback" not in stderr, stderr[-2000:]
    return checked, notifications


def _answered_methods(captured: list) -> list:
    """The requests of a capture that get an answer of their own, in order (DELETE included)."""
    methods = []
    for request in captured:
        if request["method"] == "DELETE":
            methods.append("DELETE")
        elif request["body"]:
            message = json.loads(request["body"])
            if "method" in message and "id" in message:
                methods.append(message["method"])
    return methods


class TestRealClients:
    """Byte-for-byte replays of the official Python SDK client (mcp 2.3.0) against everything_server."""

    @pytest.fixture(scope="class")
    @classmethod  # a class-scoped fixture as an instance method is deprecated (pytest 10)
    def everything(cls):
        st = ServerThread(_load_everything()).start()
        yield st
        st.close()

    def test_captures_are_sdk_traffic(self):
        """The fixtures are what the SDK sends, not hand-written: its identity and its headers."""
        init = json.loads(SDK_STDIO_LEGACY_LINES[0])
        assert init["method"] == "initialize" and init["params"]["protocolVersion"] == LEGACY
        assert init["params"]["clientInfo"] == SDK_CLIENT_INFO
        for captured in SDK_HTTP_LEGACY + SDK_HTTP_MODERN:
            headers = {name.lower(): value for name, value in captured["headers"]}
            assert headers["user-agent"].startswith("python-httpx2/"), headers
            assert headers["accept"] == ACCEPT_BOTH, headers
        assert json.loads(SDK_HTTP_MODERN[0]["body"])["method"] == "server/discover"
        # The SDK mirrors the x-mcp-header argument into Mcp-Param-Region on 2026-07-28.
        region = next(c for c in SDK_HTTP_MODERN if '"test_x_mcp_header"' in c["body"])
        assert ("Mcp-Param-Region", "eu-west-1") in [tuple(h) for h in region["headers"]]

    def test_stdio_legacy_session(self):
        """(a) One stdio session at 2025-11-25, every line the SDK wrote, in order."""
        checked, notifications = _replay_stdio([line.encode() for line in SDK_STDIO_LEGACY_LINES])
        sent = [json.loads(line) for line in SDK_STDIO_LEGACY_LINES]
        assert checked == [m["method"] for m in sent if "method" in m and "id" in m]
        # Server requests were answered in-band (elicitation, sampling, roots); the tool-list change
        # the client subscribed to arrived as a notification.
        assert "notifications/tools/list_changed" in [n["method"] for n in notifications]

    def test_http_legacy_session(self, everything):
        """(b) One Streamable HTTP session at 2025-11-25: initialize, GET stream, calls, DELETE."""
        replay = _HttpReplay(everything.port, SDK_HTTP_LEGACY, modern=False)
        try:
            replay.run()
            assert replay.checked == _answered_methods(SDK_HTTP_LEGACY)
            assert replay.checked[0] == "initialize" and replay.checked[-1] == "DELETE"
            assert "resources/subscribe" in replay.checked and "completion/complete" in replay.checked
            # The tools/list_changed notification travelled on the session's GET stream.
            get_stream = replay.background[0]
            get_stream.wait_for(lambda m: m.get("method") == "notifications/tools/list_changed")
        finally:
            replay.close()

    def test_http_modern_exchange(self, everything):
        """(c) mode="auto": server/discover, then stateless 2026-07-28 requests, input_required
        rounds for elicitation, sampling and roots, and a subscriptions/listen stream."""
        replay = _HttpReplay(everything.port, SDK_HTTP_MODERN, modern=True)
        try:
            replay.run()
            assert replay.checked == _answered_methods(SDK_HTTP_MODERN)
            assert replay.checked[0] == "server/discover"
            assert replay.checked.count("tools/call") >= 10
            listen = next(s for s in replay.background if s.head.status == 200)
            event = listen.wait_for(lambda m: m.get("method") == "notifications/tools/list_changed")
            assert event["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"] == "listen-1", event
        finally:
            replay.close()
        assert replay.sid is None  # no session on 2026-07-28

    def test_http_modern_requests_carry_no_session(self):
        """The modern capture is stateless: no Mcp-Session-Id, the version in every request."""
        for captured in SDK_HTTP_MODERN:
            headers = {name.lower(): value for name, value in captured["headers"]}
            assert "mcp-session-id" not in headers
            assert headers["mcp-protocol-version"] == MODERN
            assert json.loads(captured["body"])["params"]["_meta"][META_VERSION] == MODERN


# ==== Operations: request ids, logs, metrics, health, rate limits, graceful shutdown ==============


EXAMPLE_FILE = os.path.join(ROOT, "examples", "everything_server.py")


def _ops_start(env_extra: dict | None = None, args: tuple = ()) -> tuple:
    """``examples/everything_server.py --port 0`` as a subprocess; (Proc, port) once it listens."""
    proc = Proc([EXAMPLE_FILE, "--port", "0", *args], env=clean_env(**(env_extra or {})))
    line = proc.err_line()
    match = re.search(r"listening on http://127\.0\.0\.1:(\d+)/mcp", line or "")
    assert match, line
    return proc, int(match.group(1))


class TestOperations:
    def test_request_id_is_echoed_or_made(self, live):
        mine = http(live.port, "GET", "/healthz", {"X-Request-Id": "req-abc-123"})
        assert mine.status == 200 and mine.header("x-request-id") == "req-abc-123"
        made = http(live.port, "GET", "/healthz")
        other = http(live.port, "GET", "/healthz")
        assert made.header("x-request-id") and made.header("x-request-id") != other.header("x-request-id")
        junk = http(live.port, "GET", "/healthz", {"X-Request-Id": "has space"})
        assert junk.header("x-request-id") != "has space"  # not a token: replaced, never reflected

    def test_json_access_log_lines_carry_the_request_id_and_a_session_hash(self):
        proc, port = _ops_start({"LOG_FORMAT": "json"})
        with proc:
            session = Session(port)
            session.initialize()
            r = session.post(session.body("tools/list"), {"X-Request-Id": "trace-me-1"})
            assert r.status == 200
            proc.proc.send_signal(signal.SIGTERM)
            assert proc.proc.wait(WAIT) == 0
            for t in proc._threads:
                t.join(WAIT)
        entries = [json.loads(line) for line in proc.stderr.decode().splitlines()[1:] if line.startswith("{")]
        mine = [e for e in entries if e.get("request_id") == "trace-me-1"]
        assert mine and mine[0]["event"] == "request" and mine[0]["status"] == 200 and mine[0]["route"] == "/mcp"
        assert mine[0]["session"] == hashlib.sha256(session.sid.encode()).hexdigest()[:12]
        assert session.sid not in proc.stderr.decode()  # the session id itself never reaches a log

    def test_metrics_are_off_unless_a_token_is_set(self, live):
        assert http(live.port, "GET", "/metrics").status == 404

    def test_metrics_need_the_token_and_count_requests_and_tools(self):
        proc, port = _ops_start({"MCP_METRICS_TOKEN": "scrape-secret"})
        with proc:
            session = Session(port)
            session.initialize()
            assert session.call("test_simple_text")["content"][0]["type"] == "text"
            assert http(port, "GET", "/metrics").status == 401
            assert http(port, "GET", "/metrics", {"Authorization": "Bearer wrong"}).status == 401
            r = http(port, "GET", "/metrics", {"Authorization": "Bearer scrape-secret"})
            assert r.status == 200 and r.content_type == "text/plain"
            text = r.body.decode()
            assert '# TYPE mcp_http_requests_total counter' in text
            assert re.search(r'mcp_http_requests_total\{route="/mcp",method="POST",status="200"\} [1-9]', text)
            assert re.search(r'mcp_tool_calls_total\{tool="test_simple_text",outcome="ok"\} 1\b', text)
            assert 'mcp_tool_duration_seconds_bucket{tool="test_simple_text",le="+Inf"} 1' in text
            assert re.search(r'mcp_sessions_created_total [1-9]', text)

    def test_nothing_is_counted_until_a_server_that_serves_metrics_starts(self, monkeypatch):
        monkeypatch.setattr(mcp_server._metrics, "on", False)
        monkeypatch.setattr(mcp_server._metrics, "values", collections.defaultdict(float))
        monkeypatch.setattr(mcp_server._metrics, "histograms", {})
        call = json.dumps({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                           "params": {"name": "echo", "arguments": {"text": "count me"}}}).encode()

        async def one_call(server):
            headers = {"content-type": "application/json", "accept": ACCEPT_BOTH}
            _s, h, _b = await asgi_request(server.asgi, "POST", "/mcp", headers=headers, body=init_body())
            headers["mcp-session-id"] = h["mcp-session-id"]
            status, _h, body = await asgi_request(server.asgi, "POST", "/mcp", headers=headers, body=call)
            assert status == 200 and json.loads(body)["result"]["content"][0]["text"] == "count me"
        asyncio.run(one_call(build_server()))
        assert not mcp_server._metrics.values and not mcp_server._metrics.histograms
        asyncio.run(one_call(build_server(metrics_token="scrape-secret")))
        text = mcp_server._metrics.render()
        assert re.search(r'mcp_tool_calls_total\{tool="echo",outcome="ok"\} 1\b', text)
        assert re.search(r'mcp_http_requests_total\{route="/mcp",method="POST",status="200"\} 2\b', text)  # initialize, call

    def test_readyz_reports_the_store(self, live):
        r = http(live.port, "GET", "/readyz")
        assert r.status == 200 and r.json() == {"status": "ready", "store": "memory"}

    def test_rate_limit_answers_429_with_retry_after(self):
        proc, port = _ops_start({"MCP_RATE_LIMIT": "3"})
        with proc:
            statuses = []
            for _ in range(4):
                r = http(port, "POST", "/http", {"Content-Type": "application/json"},
                         {"method": "tools/list"})
                statuses.append(r.status)
            assert statuses[:3] == [200, 200, 200] and statuses[3] == 429
            assert 1 <= int(r.header("retry-after")) <= 60
            assert http(port, "GET", "/healthz").status == 200  # health is never limited

    def test_sigterm_lets_an_in_flight_stream_finish(self):
        proc, port = _ops_start()
        with proc:
            session = Session(port)
            session.initialize()
            with Conn(port) as conn:
                body = session.body("tools/call", {"name": "test_tool_with_progress", "arguments": {},
                                                   "_meta": {"progressToken": "drain-1"}})
                conn.request("POST", "/mcp", session.headers(), body)
                stream = SSEStream(conn, conn.read_head())
                first = None
                while first is None:
                    event = stream.next_event()
                    assert event is not None, "the stream ended before any progress"
                    if event.get("data"):
                        first = json.loads(event["data"])
                assert first["method"] == "notifications/progress"
                proc.proc.send_signal(signal.SIGTERM)  # the tool is running now
                messages = [first]
                while (event := stream.next_event()) is not None:
                    if event.get("data"):
                        messages.append(json.loads(event["data"]))
            final = [m for m in messages if m.get("id") == body["id"]]
            assert final and final[0]["result"]["content"], messages
            assert proc.proc.wait(WAIT) == 0


# ---- issue 23: graceful drain (SIGTERM) and the deploy kit -------------------------------------

_DRAIN_SCRIPT = textwrap.dedent('''
    import os, sys
    sys.path.insert(0, {root!r})
    from mcp_server import Context, MCPServer, Settings

    server = MCPServer("drain", version="1.0.0", settings=Settings(auth="none"))

    @server.tool()
    async def numbered(ctx: Context) -> str:
        """Progress 1 and 2, a question; 3 and 4, another question; 5 and 6."""
        step = 0
        for question in ("first", "second", None):
            for _ in range(2):
                step += 1
                await ctx.report_progress(step, 6)
            if question:
                await ctx.elicit(question, {{"type": "object", "properties": {{}}}})
        return "done"

    if __name__ == "__main__":
        server.run()
''')


def _drain_start(script: str, redis_url: str, **env) -> tuple:
    """``script`` on a free port with its state in Redis; (Proc, port) once it listens."""
    proc = Proc([script, "--port", "0", "--host", "127.0.0.1"],
                env=clean_env(REDIS_URL=redis_url, MCP_SECRET=_REDIS_SECRET, **env))
    lines = []
    while True:
        line = proc.err_line()
        if line is None:
            proc.__exit__()
            pytest.fail(f"the server exited before listening: {''.join(lines)}")
        lines.append(line)
        match = _REDIS_LISTENING.search(line)
        if match:
            return proc, int(match.group(1))


def _drain_read_until_ask(stream: SSEStream, seen: list) -> dict:
    """Collect ``stream``'s messages as (event id, message) into ``seen`` up to a server request."""
    while True:
        event = stream.next_event()
        assert event is not None, f"the stream ended early; seen: {seen}"
        if event.get("data"):
            message = json.loads(event["data"])
            seen.append((event["id"], message))
            if message.get("method") == "elicitation/create":
                return message


def _drain_rest(stream: SSEStream) -> list:
    """What a stream sends until the server ends it (keep-alive comments aside)."""
    rest = []
    while (event := stream.next_event()) is not None:
        rest.append(event)
    return rest


def _deploy_file(*parts: str) -> str:
    with open(os.path.join(ROOT, "deploy", *parts), encoding="utf-8") as f:
        return f.read()


class TestDrainAndDeploy:
    """SIGTERM: /readyz says 503 while the instance still serves, then it stops accepting, ends its
    streams with a retry hint and lets requests in flight finish; clients resume elsewhere."""

    def test_sigterm_drains_and_the_client_resumes_on_another_instance_losing_nothing(self, tmp_path, redis_url):
        script = tmp_path / "drain_server.py"
        script.write_text(_DRAIN_SCRIPT.format(root=ROOT))
        proc_a, a = _drain_start(str(script), redis_url, MCP_DRAIN_SECONDS="600", MCP_DRAIN_GRACE="60")
        proc_b, b = _drain_start(str(script), redis_url)
        with proc_a, proc_b:
            s = Session(a, capabilities={"elicitation": {}})
            s.initialize()
            call = s.body("tools/call", {"name": "numbered", "arguments": {}, "_meta": {"progressToken": "n"}})
            seen: list = []  # (event id, message), in the order the client got them, from A then B
            with Conn(a) as post_conn, Conn(a) as get_conn, Conn(a) as sse_conn:
                post_conn.request("POST", "/mcp", s.headers(), call)
                post = SSEStream(post_conn, post_conn.read_head())
                priming = post.next_event()
                assert priming["id"].endswith(":0") and not priming.get("data"), priming
                first_ask = _drain_read_until_ask(post, seen)
                get_conn.request("GET", "/mcp", s.headers({"Accept": "text/event-stream", "Content-Type": None}))
                get = SSEStream(get_conn, get_conn.read_head())
                assert get.next_event()["id"] == "get:0"
                sse_conn.request("GET", "/sse", {"Accept": "text/event-stream"})
                legacy = SSEStream(sse_conn, sse_conn.read_head())
                assert legacy.next_event()["event"] == "endpoint"

                proc_a.proc.send_signal(signal.SIGTERM)
                _redis_wait(lambda: http(a, "GET", "/readyz").status == 503, "A's /readyz to answer 503")
                assert http(a, "GET", "/healthz").status == 200  # alive: not a reason to restart it
                assert http(b, "GET", "/readyz").status == 200
                # A still serves: the first question is answered through B and A's stream goes on
                assert _redis_on(s, b).post({"jsonrpc": "2.0", "id": first_ask["id"],
                                             "result": {"action": "accept", "content": {}}}).status == 202
                second_ask = _drain_read_until_ask(post, seen)

                proc_a.proc.send_signal(signal.SIGTERM)  # a second one ends the readiness wait
                assert _drain_rest(post) == [{"retry": "1000"}]  # reconnect (elsewhere) in 1 s
                assert _drain_rest(get) == [{"retry": "1000"}]
                assert _drain_rest(legacy) == []  # HTTP+SSE cannot resume: it just ends
                with pytest.raises(OSError):
                    http(a, "GET", "/readyz")  # A accepts no more connections...
                assert proc_a.proc.poll() is None  # ...and waits for the question it asked
            # the client resumes the POST stream on B; the rest of the call (after the drain) follows
            with Conn(b) as conn:
                conn.request("GET", "/mcp", s.headers({"Accept": "text/event-stream", "Content-Type": None,
                                                       "Last-Event-ID": seen[-1][0]}))
                resumed = SSEStream(conn, conn.read_head())
                assert s.post({"jsonrpc": "2.0", "id": second_ask["id"],
                               "result": {"action": "accept", "content": {}}}).status == 202
                while not seen or seen[-1][1].get("id") != call["id"]:
                    event = resumed.next_event()
                    assert event is not None, f"the resumed stream ended early; seen: {seen}"
                    if event.get("data"):
                        seen.append((event["id"], json.loads(event["data"])))
            stream_ids = {event_id.rpartition(":")[0] for event_id, _ in seen}
            assert stream_ids == {priming["id"].rpartition(":")[0]}
            assert [int(event_id.rpartition(":")[2]) for event_id, _ in seen] == list(range(1, len(seen) + 1))
            progress = [m["params"]["progress"] for _, m in seen if m.get("method") == "notifications/progress"]
            assert progress == [1, 2, 3, 4, 5, 6]  # none lost, none repeated
            assert seen[-1][1]["result"]["content"] == [{"type": "text", "text": "done"}]
            assert proc_a.proc.wait(WAIT) == 0  # its request done, A exits cleanly
            # the session's GET stream reopens on B too
            with Conn(b) as conn:
                conn.request("GET", "/mcp", s.headers({"Accept": "text/event-stream", "Content-Type": None,
                                                       "Last-Event-ID": "get:0"}))
                assert conn.read_head().status == 200

    def test_the_deploy_kit_gives_the_drain_its_time_and_the_balancer_no_affinity(self):
        k8s = _deploy_file("kubernetes", "mcp-server.yaml")
        env = {name: float(value) for name, value in re.findall(r'\{name: (MCP_DRAIN_\w+), value: "([\d.]+)"\}', k8s)}
        pre_stop = int(re.search(r'preStop:\s+exec:\s+command: \["sleep", "(\d+)"\]', k8s).group(1))
        grace = int(re.search(r"terminationGracePeriodSeconds: (\d+)", k8s).group(1))
        assert env["MCP_DRAIN_SECONDS"] > 0 and grace > pre_stop + env["MCP_DRAIN_SECONDS"] + env["MCP_DRAIN_GRACE"]
        assert re.search(r"readinessProbe:.*\n\s+httpGet: \{path: /readyz,", k8s)
        assert re.search(r"livenessProbe:.*\n\s+httpGet: \{path: /healthz,", k8s)
        for needed in ("kind: PodDisruptionBudget", "kind: Service", "sessionAffinity: None", "secretRef:",
                       "requests: {cpu:", "replicas: 3", "kind: NetworkPolicy"):
            assert needed in k8s, needed
        # the kubelet's default Host (the pod's IP) fails the Host check: the probes name a loopback one
        assert len(re.findall(r"httpGet: \{path: /\w+z, port: http, httpHeaders: \[\{name: Host, value: localhost\}\]\}",
                              k8s)) == 3
        compose = _deploy_file("compose.yaml")
        assert len(re.findall(r"(?m)^  mcp\d: \*mcp-server$", compose)) == 3
        stop_grace = int(re.search(r"stop_grace_period: (\d+)s", compose).group(1))
        drain = {name: float(value) for name, value in re.findall(r'(MCP_DRAIN_\w+): "([\d.]+)"', compose)}
        assert stop_grace > drain["MCP_DRAIN_SECONDS"] + drain["MCP_DRAIN_GRACE"]
        for needed in ("--appendonly yes", "--requirepass", "env_file: .env", "./nginx.conf:/etc/nginx/nginx.conf"):
            assert needed in compose, needed
        balancer = re.sub(r"#.*", "", _deploy_file("nginx.conf") + _deploy_file("mcp-upstream.conf"))
        for needed in ("proxy_buffering off;", "proxy_read_timeout 1h;", "include mcp-upstream.conf;"):
            assert needed in balancer, needed
        assert not re.search(r"\b(ip_hash|hash|sticky|least_conn)\b", balancer)  # round-robin, no affinity
        example = _deploy_file(".env.example")
        secrets_set = dict(re.findall(r"(?m)^(MCP_SECRET|ENCRYPTION_KEY|REDIS_PASSWORD)=(.*)$", example))
        assert len(secrets_set) == 3 and all(v.startswith("CHANGE_ME_") for v in secrets_set.values())
        assert "python -c 'import secrets; print(secrets.token_urlsafe(48))'" in example
        assert ".env" in _deploy_file(".gitignore").split()
        assert "deploy/check.py" in _doc(".ci/run")

    def test_sigint_stops_at_once_and_bad_drain_settings_are_refused(self):
        proc, port = _ops_start({"MCP_DRAIN_SECONDS": "600"})
        with proc:
            assert http(port, "GET", "/readyz").status == 200
            proc.proc.send_signal(signal.SIGINT)  # a person's Ctrl-C: no readiness wait
            assert proc.proc.wait(WAIT) == 0
        for name in ("MCP_DRAIN_SECONDS", "MCP_DRAIN_GRACE"):
            with pytest.raises(SystemExit, match="MCP_DRAIN_SECONDS and MCP_DRAIN_GRACE must be 0 or more"):
                Settings.load([], environ={name: "-1"})


def _doc(name: str) -> str:
    """A page of the repository: README.md or docs/<page>.md."""
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def _doc_blocks(text: str, lang: str, start: str, end: str | None = None) -> list:
    """The ``lang`` code blocks of ``text`` between the headings ``start`` and ``end``."""
    part = text[text.index(start):]
    part = part[:part.index(end)] if end else part
    return re.findall(rf"```{lang}\n(.*?)```", part, re.S)


def _doc_run(script: str, port: int, workdir) -> subprocess.CompletedProcess:
    """A page's shell commands, as printed, against the server on ``port`` (files in ``workdir``)."""
    script = script.replace("127.0.0.1:6901", f"127.0.0.1:{port}").replace("/tmp/", f"{workdir}/")
    run = subprocess.run(["bash", "-c", "set -e\n" + script], capture_output=True, text=True, timeout=WAIT * 3,
                         cwd=str(workdir), stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr
    return run


def _doc_port(proc: Proc) -> int:
    line = proc.err_line()
    return int(re.search(r"listening on http://127\.0\.0\.1:(\d+)/mcp", line or "").group(1))


def _doc_slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _doc_outside_code(text: str) -> str:
    return re.sub(r"(?ms)^```.*?^```", "", text)


class TestShipping:
    """The README, the Dockerfile and the code agree."""

    def test_every_setting_is_one_field_with_one_default(self):
        fields = {f.name: f.default for f in dataclasses.fields(Settings)}
        specs = {attr: default for attr, _flag, _names, _parse, default, _help in mcp_server._SETTING_SPECS}
        assert fields == specs  # the dataclass and the table (flags, env, --help, README) never drift

    def test_the_configuration_page_is_the_code(self):
        page = _doc("docs/configuration.md")
        start, end = "<!-- settings-table:start -->", "<!-- settings-table:end -->"
        table = page[page.index(start) + len(start):page.index(end)].strip()
        assert table == mcp_server._settings_table(), \
            "regenerate it: python mcp_server.py settings --write docs/configuration.md"
        for _attr, _flag, names, *_ in mcp_server._SETTING_SPECS:
            assert f"`{names[0]}`" in table

    def test_one_command_regenerates_a_stale_configuration_page(self, tmp_path):
        page = _doc("docs/configuration.md")
        stale = tmp_path / "configuration.md"
        port_row = next(line for line in page.splitlines() if line.startswith("| `--port` |"))
        stale.write_text(page.replace(port_row + "\n", "").replace("| `--host` |", "| `--old-host` |"),
                         encoding="utf-8")  # a setting gone from the code, one not yet in the table
        done = run_cli(["settings", "--write", str(stale)])
        assert done.returncode == 0 and done.stdout == "", done.stderr
        assert stale.read_text(encoding="utf-8") == page  # only the table changed, and back to the code's
        unmarked = tmp_path / "unmarked.md"
        unmarked.write_text("# no markers\n", encoding="utf-8")
        refused = run_cli(["settings", "--write", str(unmarked)])
        assert refused.returncode == 2 and "has no <!-- settings-table:start -->" in refused.stderr
        assert unmarked.read_text(encoding="utf-8") == "# no markers\n"

    def test_the_seed_setting_names_are_accepted(self, tmp_path):
        settings = Settings.load([], environ={
            "MASK_MCP_HOST": "127.0.0.2", "MASK_MCP_PORT": "7001", "APP_VERSION": "9.1",
            "REDIS_HOST": "cache", "REDIS_PORT": "6380", "REDIS_P": "p@ss", "REDIS_DB": "3",
            "ENCRYPTION_KEY": "00" * 32, "ENCRYPTION_IV": "legacy", "LOG_FILE": str(tmp_path / "x.log"),
            "TOKEN_PARAMETER": "seed-key-" + "0123456789abcdefghijklmnopqrstuv", "ENCRYPTION_KEY_PREVIOUS": ""})
        assert (settings.host, settings.port, settings.app_version) == ("127.0.0.2", 7001, "9.1")
        assert settings.redis_url == "redis://:p%40ss@cache:6380/3"
        assert settings.token_parameter.startswith("seed-key-") and settings.log_file.endswith("x.log")

    def _dockerfile(self) -> str:
        return open(os.path.join(ROOT, "Dockerfile"), encoding="utf-8").read()

    def test_the_dockerfile_installs_the_requirements_and_runs_the_documented_command(self):
        docker, readme, operations = self._dockerfile(), _doc("README.md"), _doc("docs/operations.md")
        assert re.search(r"^FROM python:3\.\d+\.\d+-slim-\w+$", docker, re.M)  # an exact version
        assert "COPY requirements.txt" in docker
        assert "RUN grep -v '^pytest' requirements.txt > /tmp/runtime.txt && pip install --no-cache-dir -r /tmp/runtime.txt" in docker
        # only the runtime: no test packages, nothing but the two files (no secrets, no .env)
        assert re.findall(r"(?m)^(?:COPY|ADD) (.*)$", docker) == ["requirements.txt .", "mcp_server.py ."]
        names = re.findall(r"(?m)^([a-z]+)", _doc("requirements.txt").lower())
        assert names == ["redis", "cryptography", "pyjwt", "anyio", "pytest"]  # the image takes the first four
        assert re.search(r'^CMD \["python", "-m", "mcp_server"\]$', docker, re.M)
        assert "RUN python -m compileall -q mcp_server.py" in docker  # the byte code that command loads
        assert re.search(r"^USER (?!root)\w+", docker, re.M) and "EXPOSE 6901" in docker
        assert "HEALTHCHECK" in docker and "/healthz" in docker
        assert "pip install -r requirements.txt" in readme and "python mcp_server.py" in readme
        assert "docker build -t mcp-server ." in operations and "docker run" in operations
        assert "services:" in operations

    def test_the_image_command_serves_with_the_image_environment(self):
        docker = self._dockerfile()
        env_block = re.search(r"^ENV ((?:.*\\\n)*.*)$", docker, re.M).group(1)
        image_env = dict(re.findall(r"(\w+)=(\S+)", env_block))
        assert image_env["MCP_HOST"] == "0.0.0.0" and image_env["MCP_PORT"] == "6901"
        command = json.loads(re.search(r"^CMD (\[.*\])$", docker, re.M).group(1))
        env = clean_env(**{**image_env, "MCP_PORT": "0"})  # any free port: the rest as in the image
        proc = Proc(command[1:], cwd=ROOT, env=env)
        with proc:
            line = proc.err_line()
            match = re.search(r"listening on http://0\.0\.0\.0:(\d+)/mcp .*store: memory", line or "")
            assert match, line
            port = match.group(1)
            assert http(int(port), "GET", "/healthz").status == 200
            probe = re.search(r'CMD python -c "(.*)"$', docker, re.M).group(1)
            check = subprocess.run([sys.executable, "-c", probe], env={**env, "MCP_PORT": port},
                                   timeout=WAIT, capture_output=True)
            assert check.returncode == 0, check.stderr
            unauthenticated = http(int(port), "POST", "/mcp", {"Content-Type": "application/json"},
                                   {"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
            assert unauthenticated.status == 401  # the image serves with OAuth on


class TestDocsExamples:
    """The README's and the manual's examples run as printed, and their links lead somewhere."""

    PAGES = ["README.md", *sorted(f"docs/{name}" for name in os.listdir(os.path.join(ROOT, "docs"))
                                  if name.endswith(".md"))]

    @staticmethod
    def _need(*tools: str) -> None:
        for tool in tools:
            if shutil.which(tool) is None:
                pytest.skip(f"{tool} is not installed")

    def test_the_readme_is_a_readme(self):
        readme = _doc("README.md")
        assert len(readme.splitlines()) <= 300
        assert "pip install -r requirements.txt && python mcp_server.py" in readme  # the server
        assert "pip install -r requirements.txt && python -m pytest -q" in readme  # the tests
        assert "bench/RESULTS.md" in readme and '"mcpServers"' in readme

    def test_every_link_of_the_readme_and_the_manual_leads_to_a_page_and_a_heading(self):
        headings = {page: {_doc_slug(h) for h in re.findall(r"(?m)^#{1,6} (.+)$", _doc_outside_code(_doc(page)))}
                    for page in self.PAGES}
        broken = []
        for page in self.PAGES:
            for target in re.findall(r"\]\(([^)\s]+)\)", _doc_outside_code(_doc(page))):
                if re.match(r"[a-z]+:", target):
                    continue  # an outside address
                path, _, anchor = target.partition("#")
                name = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
                if not os.path.exists(os.path.join(ROOT, name)):
                    broken.append(f"{page}: {target} (no such file)")
                elif anchor and anchor not in headings.get(name, set()):
                    broken.append(f"{page}: {target} (no such heading)")
        assert not broken, broken
        assert set(headings) - {"README.md"} == {f"docs/{name}" for name in (
            "README.md", "writing-servers.md", "protocol.md", "oauth.md", "login.md", "scaling.md",
            "operations.md", "configuration.md", "security.md", "troubleshooting.md", "testing.md")}

    def test_the_readme_first_tool_runs_as_printed(self, tmp_path):
        readme = _doc("README.md")
        blocks = _doc_blocks(readme, "python", "## Your first tool", "## How it compares")
        assert len(blocks) == 2 and len([line for line in blocks[0].splitlines() if line.strip()]) <= 10
        (tmp_path / "hello_server.py").write_text(blocks[0], encoding="utf-8")
        (tmp_path / "test_hello.py").write_text(blocks[1], encoding="utf-8")  # the README's test, as printed
        tested = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_hello.py"],
                                cwd=str(tmp_path), env=clean_env(PYTHONPATH=ROOT), capture_output=True, text=True,
                                timeout=WAIT * 6, stdin=subprocess.DEVNULL)
        assert tested.returncode == 0 and "1 passed" in tested.stdout, tested.stdout + tested.stderr
        with Proc(["hello_server.py", "--stdio"], cwd=str(tmp_path), env=clean_env(PYTHONPATH=ROOT)) as proc:
            assert proc.initialize()["result"]["serverInfo"]["name"] == "hello"
            (tool,) = proc.request("tools/list")["result"]["tools"]
            assert tool["name"] == "add" and tool["description"] == "Add two integers."
            assert tool["inputSchema"]["required"] == ["a", "b"]
            assert tool["inputSchema"]["properties"]["a"]["type"] == "integer"
            added = proc.request("tools/call", {"name": "add", "arguments": {"a": 2, "b": 3}})["result"]
            assert added["content"] == [{"type": "text", "text": "5"}] and not added.get("isError")
            refused = proc.request("tools/call", {"name": "add", "arguments": {"a": "two", "b": 3}})["result"]
            assert refused["isError"] and "arguments.a" in refused["content"][0]["text"]
            assert proc.finish() == 0

    def test_the_claude_desktop_entries_start_a_server_that_answers(self):
        entries = [json.loads(block)["mcpServers"]["mcp_server"]
                   for page in ("README.md", "docs/operations.md")
                   for block in re.findall(r"```json\n(.*?)```", _doc(page), re.S) if "mcpServers" in block]
        assert len(entries) == 2 and {tuple(e["args"]) for e in entries} == {
            ("/absolute/path/to/mcp_server.py", "--stdio"), ("-m", "mcp_server", "--stdio")}
        for entry in entries:
            assert entry["command"] == "python"  # (the test runs its own interpreter)
            args = [SERVER_FILE if a == "/absolute/path/to/mcp_server.py" else a for a in entry["args"]]
            env = {k: ROOT if v == "/absolute/path/to/the/folder/of/mcp_server.py" else v
                   for k, v in entry.get("env", {}).items()}
            with Proc([*args, "--port", "0"], env=clean_env(**env)) as proc:
                assert proc.initialize()["result"]["serverInfo"]["name"] == "mcp_server"
                info = proc.request("tools/call", {"name": "server_info", "arguments": {}})["result"]
                assert info["structuredContent"]["protocolVersion"] == LEGACY
                assert proc.finish() == 0

    def test_the_protocol_pages_curl_walk_through_works(self, tmp_path):
        self._need("curl")
        page = _doc("docs/protocol.md")
        blocks = _doc_blocks(page, "sh", "### Talking to it with curl", "## How the era of a request is decided")
        assert len(blocks) >= 6, blocks
        with Proc([SERVER_FILE, "--port", "0", "--no-auth"], env=clean_env(MCP_ACCESS_LOG="0")) as proc:
            out = _doc_run("\n".join(blocks), _doc_port(proc), tmp_path).stdout
        assert re.search(r"(?i)^mcp-session-id: [\x21-\x7e]+", out, re.M)  # initialize
        assert re.search(r"(^|[}\n])202\n", out)  # notifications/initialized (curl -w after a body)
        assert '"name":"server_info"' in out and '"tools":[' in out  # tools/list
        assert '"protocolVersion":"2025-11-25"' in out  # tools/call server_info
        assert re.search(r"HTTP/1.1 200 OK\r?\ncontent-length: 0", out)  # DELETE
        assert '"protocolVersion":"2026-07-28"' in out and '"resultType":"complete"' in out  # stateless call
        assert '"supportedVersions":["2026-07-28"' in out  # server/discover
        assert '{"error":{"code":-32601,"message":"Method not found: nope."}}' in out  # /http short form

    def test_the_notes_server_of_writing_servers_serves_what_the_page_shows(self, tmp_path):
        self._need("curl")
        page = _doc("docs/writing-servers.md")
        source = _doc_blocks(page, "python", "# Writing servers", "## Tools")[0]
        (tmp_path / "notes_server.py").write_text(source, encoding="utf-8")
        spec = importlib.util.spec_from_file_location("notes_server_of_the_docs", tmp_path / "notes_server.py")
        notes = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(notes)
        notes.server.settings = Settings(auth="none")  # as `python notes_server.py --no-auth`
        st = ServerThread(notes.server).start()
        try:
            session = Session(st.port)
            session.initialize()
            names = {tool["name"] for tool in session.request("tools/list")["result"]["tools"]}
            assert names == {"list_notes", "add_note", "delete_note", "summarize", "file_into_workspace",
                             "reindex", "thumbnail"}
            assert session.call("list_notes")["structuredContent"] == {"titles": ["welcome"], "count": 1}
            added = session.call("add_note", {"title": "todo", "body": "buy milk"})
            assert added["content"] == [{"type": "text", "text": "Added todo."}]
            assert session.call("add_note", {"title": "todo", "body": "again"})["isError"]
            index = session.request("resources/read", {"uri": "notes://index"})["result"]
            assert index["contents"][0]["text"] == "todo\nwelcome"
            completion = session.request("completion/complete", {"ref": {"type": "ref/prompt", "name": "review"},
                                                                 "argument": {"name": "title", "value": "w"}})
            assert completion["result"]["completion"]["values"] == ["welcome"]
            # the page's two MRTR rounds of delete_note, as printed
            rounds = [b for b in _doc_blocks(page, "sh", "## Asking the client", "## Notifications")
                      if "delete_note" in b]
            assert len(rounds) == 2, rounds
            first = json.loads(_doc_run(rounds[0], st.port, tmp_path).stdout)["result"]
            assert first["resultType"] == "input_required" and "confirm" in first["inputRequests"]
            second = _doc_run(f"STATE='{first['requestState']}'\n" + rounds[1], st.port, tmp_path).stdout
            assert json.loads(second)["result"]["content"] == [{"type": "text", "text": "Deleted welcome."}]
            assert notes.NOTES == {"todo": "buy milk"}
        finally:
            st.close()

    def test_the_oauth_pages_whole_flow_with_curl_works(self, tmp_path):
        self._need("curl", "openssl")
        page = _doc("docs/oauth.md")
        blocks = _doc_blocks(page, "bash", "## The whole flow with curl", "## Tokens")
        assert len(blocks) == 2, blocks
        with Proc([SERVER_FILE, "--port", "0"], env=clean_env(MCP_CONSENT="never", MCP_ACCESS_LOG="0")) as proc:
            port = _doc_port(proc)
            out = _doc_run("\n".join(blocks), port, tmp_path).stdout
        assert '"token_endpoint_auth_method":"none"' in out  # 1. registered
        assert "HTTP/1.1 302 Found" in out and "location: http://127.0.0.1:9999/callback?code=" in out  # 3.
        assert '"token_type":"Bearer"' in out and '"refresh_token":' in out  # 4. and the refresh
        assert '"protocolVersion":"2025-11-25"' in out  # 5. the token works
        assert "\n200\n" in out and "Unauthorized: the token was revoked or its session ended" in out

    def test_the_login_pages_sandbox_walk_through_works(self, tmp_path):
        self._need("curl")
        page = _doc("docs/login.md")
        blocks = _doc_blocks(page, "bash", "## Walk-through: the sandbox with curl", "## The sandbox's demo data")
        assert len(blocks) == 3, blocks
        with Proc([SERVER_FILE, "--port", "0", "--no-auth"], env=clean_env(MCP_ACCESS_LOG="0")) as proc:
            port = _doc_port(proc)
            out = _doc_run("\n".join(blocks), port, tmp_path).stdout
        assert "Not logged in: call the login tool" in out
        assert '"pairing_code":' in out and "<h1>Enter your pairing code</h1>" in out
        assert f"http://127.0.0.1:{port}/sandbox/authorize?response_type=code" in out
        assert "<option value='asha'>Asha Rao (sandbox)</option>" in out
        assert "<h1>You are signed in</h1>" in out
        assert '"demat_id":"XXXXXXXXXXXX8901"' in out and "IN30012345678901" not in out


class TestSentinel:
    """REDIS_URL=redis+sentinel://...: the primary is the one Redis Sentinel names, and a failover
    under load loses no session and needs no restart (a real primary, replica and sentinel)."""

    def test_sentinel_urls_are_checked_at_start_with_the_password_hidden(self):
        ok = Settings(redis_url="redis+sentinel://:pw@h1:26379,[::1],h2:1/svc/3?sentinel_password=sp",
                      secret=_REDIS_SECRET)
        ok.validate()
        assert mcp_server._sentinel_parts(ok.redis_url) == {
            "sentinels": [("h1", 26379), ("::1", 26379), ("h2", 1)], "service": "svc", "db": 3,
            "username": None, "password": "pw", "sentinel_password": "sp"}
        for url, words in (("redis+sentinel://:pw@h1:26379/", "must name the service"),
                           ("redis+sentinel://:pw@h1/svc/zero", "must name the service"),
                           ("redis+sentinel://:pw@h1:port/svc?sentinel_password=sp", "Port")):
            with pytest.raises(SystemExit) as refused:
                Settings(redis_url=url, secret=_REDIS_SECRET).validate()
            message = str(refused.value.code)
            assert words in message and "redis+sentinel://:***@h1" in message, message
            assert "pw" not in message.replace("password", "") and "sp" not in message.split("?")[-1].replace("***", "")
        with pytest.raises(SystemExit) as refused:
            Settings(redis_url="redis+sentinel://h1/svc", redis_cluster=True, secret=_REDIS_SECRET).validate()
        assert "REDIS_CLUSTER" in str(refused.value.code)

    def test_a_failover_under_load_loses_no_session_and_needs_no_restart(self, redis_workdir):
        if _redis_skip_reason():
            pytest.skip(_redis_skip_reason())
        primary = _redis_Server(redis_workdir).start()
        replica = sentinel = instance = None
        try:
            replica = _redis_Server(redis_workdir, extra=("--replicaof", "127.0.0.1", str(primary.port))).start()
            sentinel = self._sentinel(redis_workdir, primary.port)
            _redis_wait(lambda: self._replica_known(sentinel, replica.port), "the sentinel to see the synced replica")
            instance = _redis_instances(f"redis+sentinel://127.0.0.1:{sentinel.port}/svc/0", 1,
                                        MCP_SESSION_CACHE="0")[0]  # every request reads and touches Redis
            sessions = [Session(instance.port) for _ in range(4)]
            for s in sessions:
                s.initialize()
                assert _redis_text(s.call("greet", {"name": "before"})) == "Hello, before!"
            self._command(primary, "WAIT", 1, int(WAIT * 1000))  # the replica has every session
            seen, stop = [], threading.Event()
            load = threading.Thread(target=self._load, args=(sessions, seen, stop), daemon=True)
            load.start()
            try:
                _redis_wait(lambda: len(seen) >= 8, "requests before the failover")
                before = len(seen)
                assert self._command(sentinel, "SENTINEL", "FAILOVER", "svc") == b"OK"
                _redis_wait(lambda: self._command(sentinel, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", "svc")
                            == [b"127.0.0.1", str(replica.port).encode()], "the sentinel to name the replica")
                switched = b"has a new primary; every connection to the old one closed"
                _redis_wait(lambda: switched in instance.proc.stderr, "the server to hear of the new primary")
                _redis_wait(lambda: len(seen) >= before + 8 and seen[-1] == 200, "requests after the switch")
            finally:
                stop.set()
                load.join(WAIT)
            assert set(seen) <= {200, 503}, seen  # a clean 503 while it switches, else an answer
            for s in sessions:  # no session lost, and the same process serves them from the new primary
                assert _redis_text(s.call("greet", {"name": "after"})) == "Hello, after!"
                assert self._command(replica, "EXISTS", mcp_server._session_key(s.sid)) == 1
            # a demoted primary takes writes until the sentinels reconfigure it (seconds later), then
            # drops them: every session made from now on must be on the new primary, none there
            for _ in range(5):
                assert self._new_session_on(replica, instance.port)
            assert instance.proc.proc.poll() is None
        finally:
            if instance is not None:
                instance.stop()
                assert "Traceback" not in bytes(instance.proc.stderr).decode(), bytes(instance.proc.stderr)[-3000:]
            for node in (sentinel, replica, primary):
                if node is not None:
                    node.stop()

    @staticmethod
    def _sentinel(workdir: str, primary_port: int) -> "_redis_Server":
        port = _redis_free_port()
        config = os.path.join(workdir, f"sentinel-{port}.conf")  # (a sentinel rewrites its config file)
        with open(config, "w") as f:
            f.write(f"sentinel monitor svc 127.0.0.1 {primary_port} 1\n"
                    "sentinel down-after-milliseconds svc 2000\nsentinel failover-timeout svc 10000\n")
        return _redis_Server(workdir, port, head=(config, "--sentinel"), ready=b"+monitor master").start()

    @staticmethod
    def _command(node: "_redis_Server", *args):
        client = node.client()
        try:
            return client.execute_command(*args)
        finally:
            client.close()

    @classmethod
    def _replica_known(cls, sentinel: "_redis_Server", port: int) -> bool:
        for row in cls._command(sentinel, "SENTINEL", "REPLICAS", "svc"):
            fields = dict(zip(row[::2], row[1::2])) if isinstance(row, list) else row
            fields = {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v
                      for k, v in fields.items()}
            if (fields.get("port") == str(port) and fields.get("master-link-status") == "ok"
                    and "disconnected" not in fields.get("flags", "")):
                return True
        return False

    @staticmethod
    def _new_session_on(node: "_redis_Server", port: int) -> bool:
        """A new session answers a call; whether it is kept on ``node``."""
        s = Session(port)
        s.initialize()
        assert _redis_text(s.call("greet", {"name": "new"})) == "Hello, new!"
        return TestSentinel._command(node, "EXISTS", mcp_server._session_key(s.sid)) == 1

    @staticmethod
    def _load(sessions: list, seen: list, stop: threading.Event) -> None:
        """tools/call on every session in turn until told to stop (bounded: 5000 requests)."""
        for i in range(5000):
            if stop.is_set():
                return
            s = sessions[i % len(sessions)]
            message = s.body("tools/call", {"name": "greet", "arguments": {"name": f"n{i}"}})
            r = s.post(message)
            if r.status == 200:
                assert _redis_text(final_message(r, message["id"])["result"]) == f"Hello, n{i}!"
            elif r.status == 503:
                assert "store is unavailable" in r.json()["error"]["message"], r
            seen.append(r.status)


def _otel_sdk():
    """(span exporter, metric reader) of the OpenTelemetry SDK, installed once in this process as
    the global providers (OpenTelemetry allows one of each); skips when the SDK is missing."""
    global _OTEL_SDK
    if _OTEL_SDK is None:
        try:
            from opentelemetry import metrics, trace
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.metrics.export import InMemoryMetricReader
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import SimpleSpanProcessor
            from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        except ImportError as exc:
            pytest.skip(f"the OpenTelemetry SDK is not installed ({exc.name}): pip install -r "
                        "deploy/requirements-test.txt (.ci/run does)")
        exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        _OTEL_SDK = (exporter, reader)
    _OTEL_SDK[0].clear()
    return _OTEL_SDK


_OTEL_SDK = None
_OTEL_PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
_OTEL_HEADER_PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class TestTelemetry:
    """OpenTelemetry (semantic conventions for MCP): spans, their parents, errors, histograms;
    read from the SDK's in-memory exporter and reader, the server over real HTTP."""

    @staticmethod
    def _spans(exporter, count: int) -> list:
        return _redis_wait(lambda: (lambda s: s if len(s) >= count else None)(exporter.get_finished_spans()),
                           f"{count} finished span(s)")

    @staticmethod
    def _points(reader, name: str) -> list:
        found = []
        for resource in reader.get_metrics_data().resource_metrics:
            for scope in resource.scope_metrics:
                found += [p for m in scope.metrics if m.name == name and m.unit == "s" for p in m.data.data_points]
        return found

    def test_a_tool_call_span_follows_the_conventions_and_its_meta_parent(self, make_server):
        exporter, _ = _otel_sdk()
        port = make_server().port
        s = Session(port)
        s.initialize()
        exporter.clear()
        message = s.body("tools/call", {"name": "echo", "arguments": {"text": "hi"},
                                        "_meta": {"traceparent": _OTEL_PARENT, "tracestate": "rojo=00f067aa0ba902b7"}})
        assert s.post(message, {"traceparent": _OTEL_HEADER_PARENT}).status == 200
        span, = self._spans(exporter, 1)
        from opentelemetry.trace import SpanKind
        assert span.name == "tools/call echo" and span.kind == SpanKind.SERVER
        assert dict(span.attributes) == {
            "mcp.method.name": "tools/call", "mcp.protocol.version": LEGACY, "network.transport": "tcp",
            "network.protocol.name": "http", "jsonrpc.request.id": str(message["id"]),
            "mcp.session.id": hashlib.sha256(s.sid.encode()).hexdigest()[:12],  # never the id itself
            "gen_ai.tool.name": "echo", "gen_ai.operation.name": "execute_tool"}
        assert f"{span.parent.trace_id:032x}" == _OTEL_PARENT[3:35] and span.parent.is_remote
        assert f"{span.parent.span_id:016x}" == _OTEL_PARENT[36:52]
        assert span.context.trace_state.get("rojo") == "00f067aa0ba902b7"
        link, = span.links  # the HTTP request's context, as the conventions say
        assert f"{link.context.trace_id:032x}" == _OTEL_HEADER_PARENT[3:35]
        assert span.status.is_ok or span.status.status_code.name == "UNSET"

    def test_without_meta_the_http_traceparent_is_the_parent_and_nothing_leaks(self, make_server):
        exporter, _ = _otel_sdk()
        port = make_server().port
        with Conn(port) as conn:  # one keep-alive connection: a context must not outlive its request
            for i, (headers, meta) in enumerate(((None, {"traceparent": _OTEL_PARENT}),
                                                 ({"traceparent": _OTEL_HEADER_PARENT}, None), (None, None))):
                params = {"name": "where_sync", "arguments": {}, **({"_meta": meta} if meta else {})}
                body = modern_body("tools/call", params, request_id=i)
                conn.request("POST", "/mcp", modern_headers(body, headers), body)
                assert conn.read_response().status == 200
        meta_span, header_span, plain = self._spans(exporter, 3)
        assert f"{meta_span.parent.trace_id:032x}" == _OTEL_PARENT[3:35]
        assert f"{header_span.parent.trace_id:032x}" == _OTEL_HEADER_PARENT[3:35] and not header_span.links
        assert header_span.attributes["mcp.protocol.version"] == MODERN
        assert "mcp.session.id" not in header_span.attributes  # (2026-07-28: no sessions)
        assert plain.parent is None and plain.context.trace_id not in (
            meta_span.context.trace_id, header_span.context.trace_id)

    def test_failures_carry_error_type_and_an_error_status(self, make_server):
        exporter, _ = _otel_sdk()
        port = make_server().port
        s = Session(port)
        s.initialize()
        exporter.clear()
        assert s.call("refuse")["isError"] is True
        assert s.call("boom")["isError"] is True
        assert "error" in s.request("nope/nothing")
        made_up = [s.request("tools/call", {"name": f"no-such-tool-{i}", "arguments": {}}) for i in range(3)]
        assert all("error" in reply or reply["result"]["isError"] for reply in made_up)
        refused, boom, unknown, *missing = self._spans(exporter, 6)
        for span in (refused, boom):
            assert span.attributes["error.type"] == "tool_error" and span.status.status_code.name == "ERROR"
        assert unknown.name == "nope/nothing" and unknown.attributes["error.type"] == str(mcp_server.METHOD_NOT_FOUND)
        assert "Method not found" in unknown.status.description
        for span in missing:  # a name the client made up names no span and no measurement
            assert span.name == "tools/call" and "gen_ai.tool.name" not in span.attributes
            assert "error.type" in span.attributes

    def test_prompts_and_resources_and_a_tools_own_spans_nest(self, make_server):
        exporter, _ = _otel_sdk()
        from opentelemetry import trace
        server = build_server()

        @server.tool()
        async def traced(ctx: Context) -> str:
            """Makes a span of its own across an await."""
            with trace.get_tracer("a-tool").start_as_current_span("tool work"):
                await asyncio.sleep(0.001)
                with trace.get_tracer("a-tool").start_as_current_span("after the await"):
                    return "done"
        port = make_server(server).port
        s = Session(port)
        s.initialize()
        exporter.clear()
        s.request("prompts/get", {"name": "greeting", "arguments": {"name": "Ada"}})
        s.request("resources/read", {"uri": "test://items/7"})
        s.call("traced")
        spans = {span.name: span for span in self._spans(exporter, 5)}
        assert spans["prompts/get greeting"].attributes["gen_ai.prompt.name"] == "greeting"
        read = spans["resources/read"]  # (a URI is no span name: too many of them)
        assert read.attributes["mcp.resource.uri"] == "test://items/7" and "error.type" not in read.attributes
        call, work, after = spans["tools/call traced"], spans["tool work"], spans["after the await"]
        assert work.parent.span_id == call.context.span_id and after.parent.span_id == work.context.span_id

    @pytest.mark.parametrize("package", ["absent", "api without an SDK"])
    def test_without_the_package_or_an_sdk_nothing_is_wrapped(self, package):
        _otel_sdk()  # (the API is installed where the SDK is)
        code = textwrap.dedent(f"""
            import asyncio, sys
            if {package == "absent"}:
                sys.modules["opentelemetry"] = None  # (what an absent package looks like to import)
            import mcp_server
            server = mcp_server.MCPServer("t", settings=mcp_server.Settings(auth="none"))
            asyncio.run(server._started_runtime())
            print("_respond" in vars(server), mcp_server._telemetry.on,
                  sorted({{m.partition(".")[0] for m in sys.modules if m.startswith("opentelemetry")}}))
        """)
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT * 3,
                                cwd=ROOT, env=clean_env(), stdin=subprocess.DEVNULL)
        assert result.stdout.split("\n")[0] == "False False ['opentelemetry']", result

    def test_operation_and_session_durations_are_histograms_in_seconds(self, make_server):
        _, reader = _otel_sdk()
        port = make_server().port
        before = sum(p.count for p in self._points(reader, "mcp.server.session.duration"))
        s = Session(port)
        s.initialize()
        s.call("echo", {"text": "a"})
        s.call("refuse")
        assert s.delete().status == 200
        calls = [p for p in self._points(reader, "mcp.server.operation.duration")
                 if p.attributes.get("gen_ai.tool.name") in ("echo", "refuse")]
        ok = [p for p in calls if p.attributes["gen_ai.tool.name"] == "echo"]
        failed = [p for p in calls if p.attributes["gen_ai.tool.name"] == "refuse"]
        assert ok and all("error.type" not in p.attributes for p in ok)
        assert failed and failed[0].attributes["error.type"] == "tool_error" and failed[0].count >= 1
        assert ok[0].attributes["mcp.method.name"] == "tools/call" and "mcp.session.id" not in ok[0].attributes
        assert list(ok[0].explicit_bounds)[:3] == [0.01, 0.02, 0.05]
        sessions = self._points(reader, "mcp.server.session.duration")
        assert sum(p.count for p in sessions) == before + 1
        assert any(p.attributes.get("mcp.protocol.version") == LEGACY for p in sessions)


class TestWorkerMetrics:
    """--workers N: one scrape of the shared port shows the whole process group's counters."""

    def test_one_scrape_sums_the_workers(self, redis_url):
        port = _redis_free_port()
        env = clean_env(REDIS_URL=redis_url, MCP_SECRET=_REDIS_SECRET, MCP_METRICS_TOKEN="scrape-secret")
        with Proc(["-X", "utf8", EVERYTHING_FILE, "--port", str(port), "--workers", "2"], env=env) as supervisor:
            try:
                workers = _redis_wait(lambda: _redis_listening_workers(supervisor.proc.pid, port, 2),
                                      "both workers to listen on the port", bound=WAIT * 3)
                with open(f"/proc/{next(iter(workers.values()))}/environ", "rb") as f:
                    shared = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
                directory = shared[b"MCP_WORKER_METRICS_DIR"].decode()
                assert os.stat(directory).st_mode & 0o777 == 0o700  # the supervisor's, no one else's
                s = Session(port)
                s.initialize()
                calls = 30
                for i in range(calls):  # each on a new connection: the kernel spreads them over both
                    assert _redis_text(s.call("greet", {"name": f"n{i}"})) == f"Hello, n{i}!"

                def per_worker():
                    counts = {}
                    for name in (n for n in os.listdir(directory) if n.endswith(".json")):
                        with open(os.path.join(directory, name)) as f:
                            counts[name] = sum(v for metric, pairs, v in json.load(f)["values"]
                                               if metric == "mcp_tool_calls_total" and ["tool", "greet"] in pairs)
                    return counts if len(counts) == 2 and sum(counts.values()) == calls else None
                spread = _redis_wait(per_worker, "both workers to write their counters")
                assert all(spread.values()), spread  # both served some: no single worker saw them all
                for _ in range(6):  # whichever worker answers, the scrape shows the group
                    text = http(port, "GET", "/metrics", {"Authorization": "Bearer scrape-secret"}).body.decode()
                    assert f'mcp_tool_calls_total{{tool="greet",outcome="ok"}} {calls}\n' in text, text
                    assert f'mcp_tool_duration_seconds_count{{tool="greet"}} {calls}\n' in text
            finally:
                supervisor.proc.send_signal(signal.SIGTERM)
                assert supervisor.proc.wait(WAIT + 20) == 0
        assert not os.path.exists(directory)  # the supervisor took its directory with it
        assert "Traceback" not in supervisor.stderr.decode()


class TestLogHygiene:
    """Last in the file: no log line of the whole suite carries a secret or an unmasked value."""

    SECRET_PATTERNS = (
        re.compile(r"eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\."),  # a JWT
        re.compile(r"[Bb]earer [A-Za-z0-9._~+/=-]{12,}"),
        re.compile(r"(?:access_token|refresh_token|client_secret|code_verifier|id_token)[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9._~-]{8,}"),
        re.compile(r"[?&](?:code|state)=[A-Za-z0-9._~-]{8,}"),
        re.compile(r"enc:v1\.[0-9a-f]{8}\.[A-Za-z0-9_-]{20,}"),
    )

    def test_no_log_line_carries_a_secret(self):
        assert _LOG_LINES, "the suite produced no log line to check"
        raw_values = [v for user in mcp_server._SANDBOX_USERS.values() for v in (
            user["profile"]["email"], user["profile"]["phone"], user["profile"]["pan"],
            user["profile"]["bank_account"], user["profile"]["account_id"])]
        leaks = []
        for line in _LOG_LINES:
            for pattern in self.SECRET_PATTERNS:
                if pattern.search(line):
                    leaks.append(line[:300])
            leaks.extend(line[:300] for value in raw_values if value in line)
        assert not leaks, "\n".join(dict.fromkeys(leaks))
