#!/usr/bin/env python3
"""deploy/check.py - the deploy kit, run for real: deploy/nginx.conf in front of three server
processes on one Redis (password, AOF, as deploy/compose.yaml has it), driven through the
balancer by the official MCP Python SDK.

    python deploy/check.py      # needs nginx and redis-server on PATH and deploy/requirements-test.txt

.ci/run runs it (its own step, after the unit suite) with the SDK installed in a venv under the CI
cache; the servers run on MCP_CHECK_SERVER_PYTHON (default: python3 on PATH, which has
requirements.txt).  nginx runs in the foreground with `-p <tmpdir> -c <tmpdir>/nginx.conf`: that
file is deploy/nginx.conf with only its `listen` line changed, next to an upstream list of the
three local ports (deploy/mcp-upstream.conf names the compose replicas instead).

The servers are examples/everything_server.py (mcp_server.py's HTTP server with the conformance
tools: elicitation, notifications, a stream that the server closes mid-call) with OAuth ON
(MCP_AUTH=builtin, MCP_CONSENT=never: /authorize approves at once, and a redirect handler that
reads the Location header completes the SDK's authorization-code flow without a browser).

Drives: OAuth + initialize, tools/list and tools/call; the GET stream (a notification raised by a
call that another instance may serve); an elicitation answered through the balancer (round-robin:
the answer's POST is another request); a stream the server ends mid-call, resumed with
Last-Event-ID; legacy HTTP+SSE (the SDK's sse_client); and SIGTERM of one instance mid-session
(it drains; nginx moves on, the session goes on).  Every instance must have served MCP requests.
The last line is `deploy check: N passed, N failed`; the exit status is 0 only if none failed.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.parse

import anyio
import httpx2
import mcp_types as types
from mcp.client.auth import AuthorizationCodeResult, OAuthClientProvider
from mcp.client.session import ClientSession
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import OAuthClientInformationFull, OAuthClientMetadata, OAuthToken

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WAIT = 20.0  # the bound of every wait: reached only when something hangs
RESULTS: list = []  # (name, ok, detail)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, what: str, bound: float = WAIT):
    deadline = time.monotonic() + bound
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what} after {bound} s")
        time.sleep(0.05)


def read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def step(name: str, ok: bool, detail: str = "") -> None:
    RESULTS.append((name, ok, detail))
    print(f"[deploy] {'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)


# ---- the processes ----------------------------------------------------------------------------


class Stack:
    """redis-server, three servers and nginx, in a temporary directory; stopped on exit."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.procs: dict = {}
        self.redis_password = secrets.token_urlsafe(32)
        self.redis_port = free_port()
        self.server_ports = [free_port() for _ in range(3)]
        self.nginx_port = free_port()
        self.url = f"http://127.0.0.1:{self.nginx_port}"

    def spawn(self, name: str, argv: list, env: dict | None = None) -> subprocess.Popen:
        log = open(os.path.join(self.workdir, f"{name}.log"), "wb")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=self.workdir, start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return read(os.path.join(self.workdir, f"{name}.log"))

    def start_redis(self) -> None:
        self.spawn("redis", ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
                             "--requirepass", self.redis_password, "--appendonly", "yes",
                             "--appendfsync", "everysec", "--save", "", "--dir", self.workdir])
        wait_for(lambda: "Ready to accept connections" in self.log("redis"), "redis-server")

    def start_servers(self) -> None:
        python = os.environ.get("MCP_CHECK_SERVER_PYTHON") or shutil.which("python3") or sys.executable
        common = {k: v for k, v in os.environ.items() if not k.startswith(("MCP_", "REDIS_"))}
        common.update({
            "REDIS_URL": f"redis://:{self.redis_password}@127.0.0.1:{self.redis_port}/0",
            "MCP_SECRET": secrets.token_urlsafe(48), "ENCRYPTION_KEY": secrets.token_hex(32),
            "MCP_AUTH": "builtin", "MCP_CONSENT": "never", "MCP_TRUSTED_PROXIES": "127.0.0.1",
            "MCP_DRAIN_SECONDS": "0", "LOG_FORMAT": "text", "PYTHONUNBUFFERED": "1"})
        for index, port in enumerate(self.server_ports):
            self.spawn(f"server{index}", [python, os.path.join(ROOT, "examples", "everything_server.py"),
                                          "--port", str(port), "--host", "127.0.0.1"], common)
        for index in range(3):
            wait_for(lambda: "store: redis" in self.log(f"server{index}")
                     or self.procs[f"server{index}"].poll() is not None, f"server{index} to listen")
            if self.procs[f"server{index}"].poll() is not None:
                raise RuntimeError(f"server{index} exited:\n{self.log(f'server{index}')[-3000:]}")

    def start_nginx(self) -> None:
        """deploy/nginx.conf as it is, but for its listen port; the upstream list: our servers."""
        conf = read(os.path.join(HERE, "nginx.conf"))
        conf, count = re.subn(r"(?m)^(\s*)listen\s+8080;", rf"\g<1>listen 127.0.0.1:{self.nginx_port};", conf)
        if count != 1 or "include mcp-upstream.conf;" not in conf:
            raise RuntimeError("deploy/nginx.conf must have one `listen 8080;` and include mcp-upstream.conf")
        servers = "".join(f"    server 127.0.0.1:{port};\n" for port in self.server_ports)
        with open(os.path.join(self.workdir, "mcp-upstream.conf"), "w") as f:
            f.write(f"upstream mcp_servers {{\n{servers}    keepalive 32;\n}}\n")
        with open(os.path.join(self.workdir, "nginx.conf"), "w") as f:
            f.write(conf)
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        argv = [nginx, "-p", self.workdir + "/", "-c", os.path.join(self.workdir, "nginx.conf"),
                "-g", f"daemon off; pid {self.workdir}/nginx.pid; error_log stderr notice;"]
        test = subprocess.run([*argv[:-2], "-t", "-g", argv[-1]], capture_output=True, text=True, timeout=WAIT)
        if test.returncode != 0:
            raise RuntimeError(f"nginx -t refused the configuration:\n{test.stderr}")
        self.spawn("nginx", argv)

        def answers():
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.nginx_port), 1):
                return True
        wait_for(answers, "nginx to listen")

    def served(self, index: int) -> int:
        """MCP requests (POST/GET/DELETE /mcp, /sse, /messages) instance ``index`` has answered."""
        return len(re.findall(r"method=(?:POST|GET|DELETE) route=/(?:mcp|sse|messages)", self.log(f"server{index}")))

    def session_streams(self) -> list:
        """The sessions' channels someone subscribes to (an open GET stream, per Redis)."""
        answer = subprocess.run(["redis-cli", "-p", str(self.redis_port), "--no-auth-warning", "PUBSUB",
                                 "CHANNELS", "mcp:*:chan"], capture_output=True, text=True, timeout=WAIT,
                                env={**os.environ, "REDISCLI_AUTH": self.redis_password})
        return answer.stdout.split()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(WAIT)


# ---- the SDK client ---------------------------------------------------------------------------


class MemoryTokens:
    def __init__(self):
        self.tokens: OAuthToken | None = None
        self.client: OAuthClientInformationFull | None = None

    async def get_tokens(self):
        return self.tokens

    async def set_tokens(self, tokens):
        self.tokens = tokens

    async def get_client_info(self):
        return self.client

    async def set_client_info(self, client_info):
        self.client = client_info


def oauth(base: str, path: str) -> OAuthClientProvider:
    """The SDK's OAuth client, completed without a browser: MCP_CONSENT=never makes /authorize
    redirect at once, and the redirect handler reads the code from that redirect."""
    redirected: dict = {}
    callback = "http://127.0.0.1:9/callback"  # never contacted: the code is read from Location

    async def redirect_handler(authorize_url: str) -> None:
        async with httpx2.AsyncClient() as client:
            answer = await client.get(authorize_url)
        location = answer.headers.get("location", "")
        if answer.status_code not in (302, 303) or not location.startswith(callback):
            raise RuntimeError(f"/authorize answered {answer.status_code} {location!r}: {answer.text[:300]}")
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(location).query)
        redirected.update({k: v[0] for k, v in query.items()})

    async def callback_handler() -> AuthorizationCodeResult:
        return AuthorizationCodeResult(code=redirected["code"], state=redirected.get("state"),
                                       iss=redirected.get("iss"))

    metadata = OAuthClientMetadata(client_name="deploy-check", redirect_uris=[callback],
                                   grant_types=["authorization_code", "refresh_token"],
                                   response_types=["code"], token_endpoint_auth_method="none")
    # (one per endpoint: the protected resource is the endpoint itself, /mcp or /sse)
    return OAuthClientProvider(base + path, metadata, MemoryTokens(), redirect_handler, callback_handler)


async def answer_elicitation(context, params) -> types.ElicitResult:
    return types.ElicitResult(action="accept", content={"response": "yes"})


def text_of(result) -> str:
    return result.content[0].text


ELICITED = 'User response: action=accept, content={"response":"yes"}'


async def drive_streamable(stack: Stack, auth) -> None:
    changed = {"event": anyio.Event()}

    async def on_message(message) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            changed["event"].set()

    async with httpx2.AsyncClient(auth=auth, timeout=httpx2.Timeout(30, read=300)) as client, \
            streamable_http_client(stack.url + "/mcp", http_client=client) as (read_stream, write_stream), \
            ClientSession(read_stream, write_stream, elicitation_callback=answer_elicitation,
                          message_handler=on_message) as session:
        with anyio.fail_after(WAIT):
            info = await session.initialize()
        step("streamable HTTP: OAuth (built-in AS, headless) + initialize through nginx", True,
             f"protocol {info.protocol_version}")
        with anyio.fail_after(WAIT):
            names = {tool.name for tool in (await session.list_tools()).tools}
            simple = await session.call_tool("test_simple_text", {})
        step("tools/list and tools/call", {"test_elicitation", "test_reconnection"} <= names
             and "simple" in text_of(simple).lower(), text_of(simple))
        with anyio.fail_after(WAIT):  # raised by a call, delivered on the GET stream, wherever each is
            await session.call_tool("test_trigger_tool_change", {})
            await changed["event"].wait()
        step("GET stream: notifications/tools/list_changed arrives", True)
        with anyio.fail_after(WAIT):
            elicited = await session.call_tool("test_elicitation", {"message": "Deploy check?"})
        step("elicitation answered through the balancer", text_of(elicited) == ELICITED, text_of(elicited))
        with anyio.fail_after(WAIT):
            resumed = await session.call_tool("test_reconnection", {})
        step("stream closed by the server mid-call, resumed with Last-Event-ID",
             text_of(resumed) == "Reconnection test completed successfully", text_of(resumed))
        await drain_one(stack, session, changed)


async def drain_one(stack: Stack, session: ClientSession, changed: dict) -> None:
    """SIGTERM one instance mid-session: it drains and exits; nginx sends the rest elsewhere."""
    victim = stack.procs["server0"]
    victim.send_signal(signal.SIGTERM)
    await anyio.to_thread.run_sync(lambda: victim.wait(WAIT))
    step("SIGTERM: an instance drains and exits 0", victim.returncode == 0, f"exit {victim.returncode}")
    with anyio.fail_after(WAIT):
        calls = [text_of(await session.call_tool("test_simple_text", {})) for _ in range(4)]
        elicited = await session.call_tool("test_elicitation", {"message": "Still there?"})
    step("the session goes on through the other instances", text_of(elicited) == ELICITED
         and all("simple" in c.lower() for c in calls), text_of(elicited))
    # the GET stream, if the drained instance held it, ended with a retry hint; the SDK reopens it
    # (through nginx: elsewhere) after that many ms.  Redis says when it listens again.
    await anyio.to_thread.run_sync(lambda: wait_for(stack.session_streams, "the GET stream to reopen"))
    changed["event"] = anyio.Event()
    with anyio.fail_after(WAIT):
        await session.call_tool("test_trigger_tool_change", {})
        await changed["event"].wait()
    step("GET stream after the drain: notifications still arrive", True)


async def drive_legacy_sse(stack: Stack, auth) -> None:
    async with sse_client(stack.url + "/sse", auth=auth) as (read_stream, write_stream), \
            ClientSession(read_stream, write_stream, elicitation_callback=answer_elicitation) as session:
        with anyio.fail_after(WAIT):
            info = await session.initialize()
            names = {tool.name for tool in (await session.list_tools()).tools}
            simple = await session.call_tool("test_simple_text", {})
            elicited = await session.call_tool("test_elicitation", {"message": "Over /sse?"})
        step("legacy HTTP+SSE (sse_client): initialize, tools/list, tools/call, elicitation",
             "test_simple_text" in names and "simple" in text_of(simple).lower() and text_of(elicited) == ELICITED,
             f"protocol {info.protocol_version}")


async def drive(stack: Stack) -> None:
    before = [stack.served(i) for i in range(3)]
    await drive_legacy_sse(stack, oauth(stack.url, "/sse"))
    await drive_streamable(stack, oauth(stack.url, "/mcp"))
    served = [stack.served(i) - before[i] for i in range(3)]
    step("round-robin: every instance served MCP requests", all(served), f"requests per instance {served}")


def main() -> int:
    for tool in ("nginx", "redis-server"):
        if not (shutil.which(tool) or os.path.exists(f"/usr/sbin/{tool}")):
            step(f"{tool} on PATH", False, "install it (.ci/run does: apt-get install nginx-light / redis-server)")
            print(f"deploy check: 0 passed, {len(RESULTS)} failed")
            return 1
    workdir = tempfile.mkdtemp(prefix="mcp-deploy-check.")
    stack = Stack(workdir)
    try:
        stack.start_redis()
        stack.start_servers()
        stack.start_nginx()
        step("nginx runs deploy/nginx.conf in front of 3 instances on Redis (password, AOF)", True,
             f"{stack.url} -> {stack.server_ports}")
        anyio.run(drive, stack)
    except BaseException as exc:  # noqa: BLE001 - every failure is reported, with the logs
        step("deploy check", False, f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
        for name in stack.procs:
            print(f"----- {name}.log (last 40 lines) -----")
            print("\n".join(stack.log(name).splitlines()[-40:]))
    finally:
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    passed = sum(1 for _, ok, _ in RESULTS if ok)
    print(f"deploy check: {passed} passed, {len(RESULTS) - passed} failed")
    return 0 if passed == len(RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
