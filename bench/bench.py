#!/usr/bin/env python3
"""MCP server benchmark: mcp_server.py against the official SDK and FastMCP.

Run it through ``bash bench/run`` (which makes the venv with the peers and calls this file with
that venv's Python).  See bench/README.md for what it measures and how to read the table.

Only the standard library is used here; the peers (mcp, fastmcp, uvicorn) and redis-py are in the
venv because the *servers* import them.  Nothing is written into the repository except
bench/results/<date>.md and bench/results/<date>.json: the servers keep their byte code under
PYTHONPYCACHEPREFIX=<venv>/pycache, outside the repository.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import http.client
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.dont_write_bytecode = True

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
SERVERS = os.path.join(BENCH_DIR, "servers")
PY = sys.executable
TEXT = "bench-echo-7f3a"
CLK = os.sysconf("SC_CLK_TCK")
LEGACY = "2025-11-25"
MODERN = "2026-07-28"
META = {"io.modelcontextprotocol/protocolVersion": MODERN,
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "bench", "version": "1"}}
ACCEPT_BOTH = "application/json, text/event-stream"
PEERS = ("ours", "ours_inline", "ours_malloc", "sdk", "fastmcp")
PEER_SCRIPT = {"ours": "ours.py", "ours_inline": "ours.py", "ours_malloc": "ours.py", "sdk": "sdk.py",
               "fastmcp": "fastmcp_server.py",
               # workload r: calibration servers, not MCP (the "raw limit" column)
               "raw_protocol": "raw_protocol.py", "raw_asgi": "raw_asgi.py"}
RAW_ANCHOR_US = {"raw_protocol": 7, "raw_asgi": 19}  # the anchor machine, µs per request
TMP = tempfile.mkdtemp(prefix="mcp-bench-")
STARTED: list = []  # every process group this run started, for cleanup at exit
# Byte code of every server (ours and the peers alike) is cached here, outside the repository, so
# that each start loads compiled modules as a deployment would; a __pycache__ in the repository
# (fresh or stale) plays no part.
PYCACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(PY))), "pycache")


def log(*args):
    print(*args, file=sys.stderr, flush=True)


# ---- processes ------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def _tree(pid: int) -> list:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo += _children(p)
    return pids


def cpu_seconds(pid: int) -> float:
    """utime+stime of ``pid`` and its live descendants (the --workers supervisor's workers)."""
    total = 0
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
        except (OSError, IndexError, ValueError):
            pass
    return total / CLK


def rss_bytes(pid: int) -> int:
    total = 0
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def base_env(**extra) -> dict:
    env = dict(os.environ, PYTHONPYCACHEPREFIX=PYCACHE, PYTHONUNBUFFERED="1")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    for key in ("REDIS_URL", "MCP_REDIS_URL", "MCP_WORKERS", "MCP_RESPONSE_MODE", "MCP_PORT", "PYTHONMALLOC"):
        env.pop(key, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def ours_env(peer: str) -> dict:
    """What the harness sets for one of our variants (ours, ours_inline, ours_malloc)."""
    env = {"LOG_LEVEL": "warning", "MCP_ACCESS_LOG": "0", "BENCH_INLINE": "1" if peer == "ours_inline" else "0"}
    if peer == "ours_malloc":  # glibc malloc instead of pymalloc, as the Docker image and --workers run it
        env["PYTHONMALLOC"] = "malloc"
    return env


class StartError(Exception):
    pass


class Server:
    """One peer's HTTP server in its own process group, pinned with taskset."""

    def __init__(self, peer: str, *, sse: bool = False, cpus: str | None = "0", redis_url: str = "",
                 workers: int = 1, env: dict | None = None, label: str = "", default_logging: bool = False):
        self.peer, self.sse, self.cpus, self.redis_url, self.workers = peer, sse, cpus, redis_url, workers
        self.default_logging = default_logging  # workload h: each server logs as it does out of the box
        self.extra_env = env or {}
        self.label = label or f"{peer}{'-sse' if sse else ''}"
        self.port = free_port()
        self.proc = None
        self.log_path = os.path.join(TMP, f"{self.label}-{self.port}.log")

    def command(self) -> list:
        script = os.path.join(SERVERS, PEER_SCRIPT[self.peer])
        cmd = [PY, script, "--port", str(self.port)]
        if self.peer.startswith("ours"):
            cmd += ["--no-auth", "--response-mode", "sse" if self.sse else "auto"]
            if self.workers > 1:
                cmd += ["--workers", str(self.workers)]
        elif self.sse:
            cmd += ["--sse"]
        if self.default_logging and self.peer == "sdk":
            cmd += ["--default-logging"]
        return (["taskset", "-c", self.cpus] if self.cpus else []) + cmd

    def start(self, timeout: float = 60.0) -> "Server":
        env = base_env(**self.extra_env)
        if self.peer.startswith("ours"):
            env.update(ours_env(self.peer), MCP_SECRET="bench-only-secret-0123456789-abcdefghijkl")
            if self.default_logging:  # our defaults: level info, one JSON access log line a request
                env.update(LOG_LEVEL="info", MCP_ACCESS_LOG="1")
            if self.redis_url:
                env["REDIS_URL"] = self.redis_url
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.command(), env=env, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True, cwd=TMP)
        STARTED.append(self.proc)
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StartError(f"{self.label} exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                status, _h, body = post(self.port, modern_body(1), modern_headers(ACCEPT_BOTH), timeout=5)
                if status == 200 and TEXT.encode() in body:
                    if self.workers > 1:  # every worker listening
                        time.sleep(1.5)
                    return self
                last = f"HTTP {status}: {body[:200]!r}"
            except OSError as exc:
                last = repr(exc)
            time.sleep(0.1)
        self.stop()
        raise StartError(f"{self.label} not ready after {timeout}s ({last}): {self.log_tail()}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, n: int = 800) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()[-n:].strip()
        except OSError:
            return ""

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def cleanup():
    for proc in STARTED:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    shutil.rmtree(TMP, ignore_errors=True)


# ---- JSON-RPC bodies and one-off requests -------------------------------------------------------

def call_body(request_id, modern: bool) -> dict:
    params = {"name": "echo", "arguments": {"text": TEXT}}
    if modern:
        params["_meta"] = META
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}


def modern_body(request_id) -> bytes:
    return json.dumps(call_body(request_id, True), separators=(",", ":")).encode()


def modern_headers(accept: str) -> dict:
    return {"Content-Type": "application/json", "Accept": accept, "MCP-Protocol-Version": MODERN,
            "Mcp-Method": "tools/call", "Mcp-Name": "echo"}


def legacy_headers(accept: str, sid: str | None) -> dict:
    h = {"Content-Type": "application/json", "Accept": accept}
    if sid:
        h.update({"Mcp-Session-Id": sid, "MCP-Protocol-Version": LEGACY})
    return h


INIT = {"jsonrpc": "2.0", "id": 0, "method": "initialize",
        "params": {"protocolVersion": LEGACY, "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}}}
INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}


def post(port: int, body: bytes, headers: dict, timeout: float = 10, method: str = "POST", path: str = "/mcp"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def rpc_messages(content_type: str, body: bytes) -> list:
    """The JSON-RPC messages in a JSON or SSE body."""
    text = body.decode("utf-8", "replace")
    if "text/event-stream" in (content_type or ""):
        out, data = [], []
        for line in text.replace("\r\n", "\n").split("\n"):
            if line.startswith("data:"):
                data.append(line[5:].lstrip(" "))
            elif line == "" and data:
                try:
                    out.append(json.loads("\n".join(data)))
                except ValueError:
                    pass
                data = []
        if data:
            try:
                out.append(json.loads("\n".join(data)))
            except ValueError:
                pass
        return out
    try:
        return [json.loads(text)] if text.strip() else []
    except ValueError:
        return []


def rpc_result(content_type: str, body: bytes, request_id):
    for msg in rpc_messages(content_type, body):
        if isinstance(msg, dict) and msg.get("id") == request_id:
            if "error" in msg:
                raise ValueError(f"JSON-RPC error {msg['error']}")
            return msg.get("result")
    raise ValueError(f"no response to id {request_id} in {body[:300]!r}")


ODDITIES: list = []


def open_legacy_session(port: int, label: str = "") -> str:
    status, headers, body = post(port, json.dumps(INIT).encode(), legacy_headers(ACCEPT_BOTH, None))
    if status != 200:
        raise RuntimeError(f"initialize: HTTP {status} {body[:200]!r}")
    result = rpc_result(headers.get("content-type", ""), body, 0)
    sid = headers.get("mcp-session-id")
    if not sid:
        # Seen with ours under --response-mode sse: the SSE answer to initialize has no
        # Mcp-Session-Id header.  Open the session with a JSON-only Accept instead, and say so.
        note = (f"{label or port}: the SSE answer to initialize carried no Mcp-Session-Id header; the "
                f"benchmark session was opened with Accept: application/json instead")
        if note not in ODDITIES:
            ODDITIES.append(note)
            log("  NOTE:", note)
        status, headers, body = post(port, json.dumps(INIT).encode(),
                                     legacy_headers("application/json", None))
        result = rpc_result(headers.get("content-type", ""), body, 0)
        sid = headers.get("mcp-session-id")
    if not sid or result.get("protocolVersion") != LEGACY:
        raise RuntimeError(f"initialize: no session id or wrong version: {headers} {result}")
    status, _h, body = post(port, json.dumps(INITIALIZED).encode(), legacy_headers(ACCEPT_BOTH, sid))
    if status not in (200, 202, 204):
        raise RuntimeError(f"initialized: HTTP {status} {body[:200]!r}")
    return sid


# ---- wrk ------------------------------------------------------------------------------------------

LUA = r"""
wrk.method = "POST"
%(headers)s
local body_fmt = [==[%(body_fmt)s]==]
local needle = "%(needle)s"
local expect_sse = %(expect_sse)s
local threads = {}
local names = {"ok", "bad_status", "no_result", "rpc_error", "tool_error", "bad_text", "framing"}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

function init(args)
  counter = tid * 100000000
  ok = 0; bad_status = 0; no_result = 0; rpc_error = 0; tool_error = 0; bad_text = 0; framing = 0
end

function request()
  counter = counter + 1
  return wrk.format(nil, nil, nil, string.format(body_fmt, counter))
end

function response(status, headers, body)
  if status ~= 200 then bad_status = bad_status + 1; return end
  if not string.find(body, '"result"', 1, true) then no_result = no_result + 1; return end
  if string.find(body, '"error"', 1, true) then rpc_error = rpc_error + 1; return end
  if string.find(body, '"isError":true', 1, true) or string.find(body, '"isError": true', 1, true) then
    tool_error = tool_error + 1; return
  end
  if not string.find(body, needle, 1, true) then bad_text = bad_text + 1; return end
  local is_sse = string.sub(body, 1, 1) ~= "{"
  if is_sse ~= expect_sse then framing = framing + 1 end
  ok = ok + 1
end

function done(summary, latency, requests)
  local t = {}
  for _, name in ipairs(names) do t[name] = 0 end
  for _, th in ipairs(threads) do
    for _, name in ipairs(names) do t[name] = t[name] + (th:get(name) or 0) end
  end
  io.write(string.format('WRKJSON {"requests":%%d,"duration_us":%%d,"bytes":%%d,' ..
    '"connect_errors":%%d,"read_errors":%%d,"write_errors":%%d,"status_errors":%%d,"timeouts":%%d,' ..
    '"p50_us":%%.0f,"p90_us":%%.0f,"p99_us":%%.0f,"max_us":%%.0f,"mean_us":%%.1f,' ..
    '"ok":%%d,"bad_status":%%d,"no_result":%%d,"rpc_error":%%d,"tool_error":%%d,"bad_text":%%d,"framing":%%d}\n',
    summary.requests, summary.duration, summary.bytes,
    summary.errors.connect, summary.errors.read, summary.errors.write, summary.errors.status,
    summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean,
    t.ok, t.bad_status, t.no_result, t.rpc_error, t.tool_error, t.bad_text, t.framing))
end
"""


FOREIGN: list = []  # CPU (in cores) used by processes other than the server and wrk during each run


def proc_stat() -> tuple:
    """(busy jiffies, steal jiffies, total jiffies) over all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    return user + nice + system + irq + softirq, steal, sum(v[:8])


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def lua_script(headers: dict, body_fmt: str, expect_sse: bool) -> str:
    lines = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items())
    path = os.path.join(TMP, f"wrk-{time.monotonic_ns()}.lua")
    with open(path, "w") as f:
        f.write(LUA % {"headers": lines, "body_fmt": body_fmt, "needle": TEXT,
                       "expect_sse": "true" if expect_sse else "false"})
    return path


def body_format(modern: bool) -> str:
    """The tools/call body with %d where the request id goes (each request gets its own id)."""
    text = json.dumps(call_body(123456789, modern), separators=(",", ":"))
    return text.replace('"id":123456789', '"id":%d')


def wrk(server: Server, *, modern: bool, sid: str | None, expect_sse: bool, duration: float, warmup: float,
        connections: int = 64, cpus: str | None = "1", threads: int = 1) -> dict:
    headers = modern_headers(ACCEPT_BOTH) if modern else legacy_headers(ACCEPT_BOTH, sid)
    script = lua_script(headers, body_format(modern), expect_sse)
    url = f"http://127.0.0.1:{server.port}/mcp"

    def run(seconds):
        cmd = (["taskset", "-c", cpus] if cpus else []) + [
            "wrk", "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(seconds))}s", "--timeout", "5s",
            "--latency", "-s", script, url]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
        for line in out.stdout.splitlines():
            if line.startswith("WRKJSON "):
                return json.loads(line[8:])
        raise RuntimeError(f"wrk printed no result: {out.stdout[-500:]} {out.stderr[-500:]}")

    if warmup:
        run(warmup)
    sys0, kids0, t0 = proc_stat(), _children_cpu(), time.monotonic()
    cpu0 = cpu_seconds(server.pid)
    r = run(duration)
    cpu1 = cpu_seconds(server.pid)
    sys1, kids1, elapsed = proc_stat(), _children_cpu(), time.monotonic() - t0
    busy = (sys1[0] - sys0[0]) / CLK
    r["wrk_cpu_cores"] = (kids1 - kids0) / elapsed
    r["server_cpu_cores"] = (cpu1 - cpu0) / elapsed
    r["foreign_cpu_cores"] = max(0.0, busy - (cpu1 - cpu0) - (kids1 - kids0)) / elapsed
    r["steal_pct"] = 100.0 * (sys1[1] - sys0[1]) / max(1, (sys1[2] - sys0[2]))
    FOREIGN.append(r["foreign_cpu_cores"])
    n = max(r["requests"], 1)
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    r["cpu_us_per_call"] = (cpu1 - cpu0) / n * 1e6
    r["wrk_cpu_us_per_call"] = (kids1 - kids0) / n * 1e6
    r["errors"] = (r["requests"] - r["ok"]) + r["connect_errors"] + r["read_errors"] + r["write_errors"] \
        + r["timeouts"]
    r["sse_framing_ok"] = r["framing"] == 0
    return r


# ---- asyncio raw-socket HTTP client ------------------------------------------------------------------

class Conn:
    def __init__(self, port):
        self.port = port
        self.reader = self.writer = None

    async def open(self):
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    def close(self):
        if self.writer is not None:
            self.writer.close()

    async def send_head(self, method, headers, body=b""):
        lines = [f"{method} /mcp HTTP/1.1", f"Host: 127.0.0.1:{self.port}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if method in ("POST", "DELETE") or body:
            lines.append(f"Content-Length: {len(body)}")
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await self.writer.drain()

    async def read_head(self):
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        return status, headers

    async def read_body(self, headers) -> bytes:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
                if size == 0:
                    while (await self.reader.readuntil(b"\r\n")) != b"\r\n":
                        pass
                    return b"".join(chunks)
                chunks.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
        if "content-length" in headers:
            return await self.reader.readexactly(int(headers["content-length"]))
        return await self.reader.read()  # until the server closes

    async def request(self, method, headers, body=b""):
        await self.send_head(method, headers, body)
        status, rh = await self.read_head()
        data = b"" if status in (204, 304) else await self.read_body(rh)
        return status, rh, data


async def session_setup(port: int) -> None:
    """connect, initialize, initialized, tools/list, tools/call; every answer checked; then close."""
    c = await Conn(port).open()
    try:
        status, h, body = await c.request("POST", legacy_headers(ACCEPT_BOTH, None), json.dumps(INIT).encode())
        if status != 200:
            raise ValueError(f"initialize HTTP {status}")
        result = rpc_result(h.get("content-type"), body, 0)
        sid = h.get("mcp-session-id")
        if not sid or result.get("protocolVersion") != LEGACY or "capabilities" not in result:
            raise ValueError(f"initialize result {result}")
        hh = legacy_headers(ACCEPT_BOTH, sid)
        status, h, body = await c.request("POST", hh, json.dumps(INITIALIZED).encode())
        if status not in (200, 202, 204):
            raise ValueError(f"initialized HTTP {status}")
        status, h, body = await c.request(
            "POST", hh, b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}')
        tools = rpc_result(h.get("content-type"), body, 1)["tools"]
        if status != 200 or [t["name"] for t in tools] != ["echo"]:
            raise ValueError(f"tools/list {status} {tools}")
        status, h, body = await c.request("POST", hh, json.dumps(call_body(2, False)).encode())
        result = rpc_result(h.get("content-type"), body, 2)
        if status != 200 or result.get("isError") or result["content"][0]["text"] != TEXT:
            raise ValueError(f"tools/call {status} {result}")
    finally:
        c.close()


async def sessions_per_second(port: int, parallel: int, seconds: float) -> dict:
    done = errors = 0
    first_error = None
    deadline = time.perf_counter() + seconds
    cpu0 = time.process_time()

    async def worker():
        nonlocal done, errors, first_error
        while time.perf_counter() < deadline:
            try:
                await session_setup(port)
                done += 1
            except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                errors += 1
                first_error = first_error or repr(exc)[:300]
                await asyncio.sleep(0.01)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(parallel)))
    elapsed = time.perf_counter() - t0
    client_cpu = (time.process_time() - cpu0) / elapsed
    return {"sessions": done, "errors": errors, "seconds": elapsed, "sessions_per_s": done / elapsed,
            "client_cpu_fraction": client_cpu, "first_error": first_error}


async def open_stream(port: int) -> tuple:
    """A legacy session with its GET SSE stream open; returns (sid, Conn)."""
    c = await Conn(port).open()
    status, h, body = await c.request("POST", legacy_headers(ACCEPT_BOTH, None), json.dumps(INIT).encode())
    if status != 200:
        c.close()
        raise ValueError(f"initialize HTTP {status} {body[:100]!r}")
    rpc_result(h.get("content-type"), body, 0)
    sid = h["mcp-session-id"]
    status, h, body = await c.request("POST", legacy_headers(ACCEPT_BOTH, sid), json.dumps(INITIALIZED).encode())
    if status not in (200, 202, 204):
        c.close()
        raise ValueError(f"initialized HTTP {status}")
    await c.send_head("GET", {"Accept": "text/event-stream", "Mcp-Session-Id": sid, "MCP-Protocol-Version": LEGACY})
    status, h = await c.read_head()
    if status != 200 or "text/event-stream" not in h.get("content-type", ""):
        c.close()
        raise ValueError(f"GET stream HTTP {status} {h}")
    return sid, c


async def delete_session(port: int, sid: str) -> int:
    c = await Conn(port).open()
    try:
        status, _h, _b = await c.request("DELETE", {"Mcp-Session-Id": sid, "MCP-Protocol-Version": LEGACY})
        return status
    finally:
        c.close()


async def bounded(items, fn, parallel=32):
    sem = asyncio.Semaphore(parallel)

    async def one(item):
        async with sem:
            try:
                return await fn(item)
            except Exception as exc:  # noqa: BLE001
                return exc
    return await asyncio.gather(*(one(i) for i in items))


async def memory_test(server: Server, n: int, settle: float = 1.0, reopen: bool = True) -> dict:
    rss_start = rss_bytes(server.pid)
    warm = [r for r in await bounded(range(20), lambda _: open_stream(server.port)) if isinstance(r, tuple)]
    for _sid, c in warm:
        c.close()
    await bounded([sid for sid, _c in warm], lambda sid: delete_session(server.port, sid))
    await asyncio.sleep(settle)
    rss_base = rss_bytes(server.pid)
    t0 = time.perf_counter()
    results = await bounded(range(n), lambda _: open_stream(server.port))
    open_s = time.perf_counter() - t0
    streams = [r for r in results if isinstance(r, tuple)]
    errs = [r for r in results if not isinstance(r, tuple)]
    await asyncio.sleep(settle)
    # every stream still open: no EOF and nothing but SSE comments/events on it
    alive = sum(1 for _sid, c in streams if not c.reader.at_eof() and not c.writer.is_closing())
    rss_open = rss_bytes(server.pid)
    for _sid, c in streams:
        c.close()
    await asyncio.sleep(settle + 1)
    rss_closed = rss_bytes(server.pid)
    statuses = await bounded([sid for sid, _c in streams], lambda sid: delete_session(server.port, sid))
    delete_errors = sum(1 for s in statuses if not (isinstance(s, int) and s in (200, 202, 204)))
    await asyncio.sleep(settle + 1)
    rss_deleted = rss_bytes(server.pid)
    rss_reopen = None
    if reopen:  # the same again: does the freed memory get reused (no growth) or is it gone (leak)?
        again = await bounded(range(n), lambda _: open_stream(server.port))
        streams2 = [r for r in again if isinstance(r, tuple)]
        errs += [r for r in again if not isinstance(r, tuple)]
        await asyncio.sleep(settle)
        rss_reopen = rss_bytes(server.pid)
        for _sid, c in streams2:
            c.close()
        await bounded([sid for sid, _c in streams2], lambda sid: delete_session(server.port, sid))
    grown = rss_open - rss_base
    return {
        "n": n, "opened": len(streams), "open_errors": len(errs), "alive_at_end": alive,
        "first_error": repr(errs[0])[:300] if errs else None, "delete_errors": delete_errors,
        "open_seconds": open_s,
        "rss_start_mb": rss_start / 2**20, "rss_base_mb": rss_base / 2**20, "rss_open_mb": rss_open / 2**20,
        "rss_closed_mb": rss_closed / 2**20, "rss_deleted_mb": rss_deleted / 2**20,
        "kb_per_session": grown / max(len(streams), 1) / 1024,
        "returned_after_close_pct": 100.0 * (rss_open - rss_closed) / grown if grown > 0 else None,
        "returned_after_delete_pct": 100.0 * (rss_open - rss_deleted) / grown if grown > 0 else None,
        "rss_reopen_mb": None if rss_reopen is None else rss_reopen / 2**20,
        "regrowth_on_reopen_pct": 100.0 * (rss_reopen - rss_open) / grown
        if rss_reopen is not None and grown > 0 else None,
    }


# ---- stdio ------------------------------------------------------------------------------------------

def stdio_command(peer: str) -> list:
    return ["taskset", "-c", "0", PY, os.path.join(SERVERS, PEER_SCRIPT[peer]),
            *(["--no-auth"] if peer.startswith("ours") else []), "--stdio"]


def stdio_env(peer: str) -> dict:
    env = base_env()
    if peer.startswith("ours"):
        env.update(ours_env(peer))
    return env


def _spawn_stdio(peer, command: list | None = None, env: dict | None = None):
    proc = subprocess.Popen(command or stdio_command(peer), env=env or stdio_env(peer), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=TMP, start_new_session=True)
    STARTED.append(proc)
    return proc


def _end_stdio(proc):
    try:
        proc.stdin.close()
    except OSError:
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _read_response(proc, request_id, timeout=30.0):
    """Read stdout lines until the response to request_id (skipping notifications/logs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("stdio server closed stdout")
        msg = json.loads(line)
        if msg.get("id") == request_id:
            if "error" in msg:
                raise RuntimeError(f"JSON-RPC error {msg['error']}")
            return msg["result"]
    raise RuntimeError("timeout")


def stdio_cold_start(peer: str, samples: int, command: list | None = None, env: dict | None = None) -> dict:
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        proc = _spawn_stdio(peer, command, env)
        proc.stdin.write(json.dumps(INIT).encode() + b"\n")
        proc.stdin.flush()
        result = _read_response(proc, 0)
        times.append(time.perf_counter() - t0)
        if result.get("protocolVersion") != LEGACY:
            raise RuntimeError(f"initialize result {result}")
        _end_stdio(proc)
    return {"samples_ms": [t * 1000 for t in times], "median_ms": statistics.median(times) * 1000}


def _rss_when_healthy(command: list, env: dict, port: int, timeout: float = 60.0) -> float:
    """MB of RSS of an HTTP server started with ``command`` once /healthz answers."""
    proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=TMP, start_new_session=True)
    STARTED.append(proc)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{command} exited with {proc.returncode}")
            try:
                if post(port, b"", {}, timeout=2, method="GET", path="/healthz")[0] == 200:
                    time.sleep(0.5)  # what the first moments of serving add
                    return rss_bytes(proc.pid) / 2**20
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{command} not healthy after {timeout}s")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass  # it exited already (the error above says how)
        proc.wait(10)


def start_modes(samples: int) -> dict:
    """Ours started the two ways that cannot use cached byte code: the module compiled from source
    at import (PYTHONDONTWRITEBYTECODE, nothing cached), and ``python mcp_server.py`` (a script is
    compiled at every start, and Python keeps its syntax tree while it runs).  Stdio cold start
    as in stdio_cold_start; RSS of the HTTP server once it answers."""
    copy = tempfile.mkdtemp(prefix="uncached-", dir=TMP)  # a path with no byte code cached for it
    os.makedirs(os.path.join(copy, "bench", "servers"))
    shutil.copy(os.path.join(REPO, "mcp_server.py"), copy)
    shutil.copy(os.path.join(SERVERS, PEER_SCRIPT["ours"]), os.path.join(copy, "bench", "servers"))
    modes = {"source": (os.path.join(copy, "bench", "servers", PEER_SCRIPT["ours"]),
                        dict(stdio_env("ours"), PYTHONDONTWRITEBYTECODE="1")),
             "script": (os.path.join(REPO, "mcp_server.py"), stdio_env("ours"))}
    out = {}
    for mode, (path, env) in modes.items():
        cold = stdio_cold_start("ours", samples, ["taskset", "-c", "0", PY, path, "--no-auth", "--stdio"], env)
        port = free_port()
        out[f"{mode}_cold_ms"] = cold["median_ms"]
        out[f"{mode}_rss_mb"] = _rss_when_healthy(["taskset", "-c", "0", PY, path, "--no-auth", "--port", str(port)],
                                                  env, port)
    return out


def stdio_throughput(peer: str, n: int) -> dict:
    proc = _spawn_stdio(peer)
    try:
        proc.stdin.write(json.dumps(INIT).encode() + b"\n")
        proc.stdin.flush()
        _read_response(proc, 0)
        proc.stdin.write(json.dumps(INITIALIZED).encode() + b"\n")
        lines = b"".join(json.dumps(call_body(i, False), separators=(",", ":")).encode() + b"\n"
                         for i in range(1, n + 1))
        cpu0 = cpu_seconds(proc.pid)

        def writer():
            proc.stdin.write(lines)
            proc.stdin.flush()
        t0 = time.perf_counter()
        th = threading.Thread(target=writer, daemon=True)
        th.start()
        seen, errors = set(), 0
        while len(seen) + errors < n:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"stdout closed after {len(seen)} answers")
            msg = json.loads(line)
            if "id" not in msg or msg.get("method"):
                continue
            try:
                ok = (msg["result"]["content"][0]["text"] == TEXT and not msg["result"].get("isError"))
            except (KeyError, IndexError, TypeError):
                ok = False
            if ok and msg["id"] not in seen:
                seen.add(msg["id"])
            else:
                errors += 1
        elapsed = time.perf_counter() - t0
        cpu = cpu_seconds(proc.pid) - cpu0
        th.join(5)
    finally:
        _end_stdio(proc)
    return {"n": n, "ok": len(seen), "errors": errors, "seconds": elapsed, "msgs_per_s": len(seen) / elapsed,
            "cpu_us_per_call": cpu / n * 1e6}


# ---- redis --------------------------------------------------------------------------------------------

class Redis:
    def __init__(self, cpus: str | None):
        self.port = free_port()
        self.cpus = cpus
        self.proc = None

    def __enter__(self):
        cmd = (["taskset", "-c", self.cpus] if self.cpus else []) + [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--protected-mode", "yes", "--dir", TMP, "--logfile", ""]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        STARTED.append(self.proc)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise StartError("redis-server did not start")

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)


# ---- machine facts ------------------------------------------------------------------------------------

def _cmd_out(cmd) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_facts() -> dict:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = json.loads(_cmd_out([PY, "-c", (
        "import importlib.metadata as m, json\n"
        "out = {}\n"
        "for p in ('mcp','mcp-types','fastmcp','fastmcp-slim','uvicorn','starlette','sse-starlette','pydantic',"
        "'pydantic-core','anyio','redis','cryptography','h11','uvloop','httptools'):\n"
        "    try: out[p] = m.version(p)\n"
        "    except m.PackageNotFoundError: out[p] = None\n"
        "print(json.dumps(out))")]) or "{}")
    probe = _cmd_out(["env", "-u", "PYTHONDONTWRITEBYTECODE", f"PYTHONPYCACHEPREFIX={PYCACHE}", PY, "-c", (
        "import sys, inspect, json; sys.path.insert(0, sys.argv[1])\n"
        "import mcp_server\n"
        "print(json.dumps({'version': mcp_server.__version__, "
        "'inline': 'inline' in inspect.signature(mcp_server.MCPServer.tool).parameters}))"), REPO])
    if not probe:
        log("WARNING: could not import mcp_server to read its version and MCPServer.tool's signature; "
            "the inline=True variant is skipped")
    ours = json.loads(probe) if probe else {"version": None, "inline": False}
    with open(os.path.join(REPO, "mcp_server.py"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    head = _cmd_out(["git", "-C", REPO, "rev-parse", "--short", "HEAD"])
    dirty = _cmd_out(["git", "-C", REPO, "status", "--porcelain", "--", "mcp_server.py"])
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "nproc": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
        "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(), "python_executable": PY,
        "packages": versions, "wrk": [(_cmd_out(["wrk", "-v"]) or "").splitlines()[0].split(" Copyright")[0]],
        "redis_server": _cmd_out(["redis-server", "--version"]),
        "ours_version": ours["version"], "ours_inline_supported": ours["inline"],
        "ours_git_head": head, "ours_mcp_server_py_modified": bool(dirty), "ours_mcp_server_py_sha256": digest,
        "ulimit_nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "loadavg_start": open("/proc/loadavg").read().split()[:3],
    }


# ---- orchestration -------------------------------------------------------------------------------------

class Results:
    def __init__(self):
        self.raw: dict = {}  # key -> peer -> [round values (dict)]
        self.failures: list = []

    def add(self, key, peer, value):
        self.raw.setdefault(key, {}).setdefault(peer, []).append(value)

    def fail(self, what, peer, exc):
        msg = f"{what} [{peer}]: {exc}"
        log("  FAILED:", msg)
        self.failures.append(msg)


def run_http_json(res: Results, peer: str, args, workloads: set):
    """Workloads a (JSON, 64 connections), i (the same with one client) and c (session setup), those
    of them in ``workloads``, on one server start."""
    try:
        with Server(peer) as srv:
            sid = open_legacy_session(srv.port)
            for letter, connections in (("a", 64), ("i", 1)):
                if letter not in workloads:
                    continue
                for era, modern in (("legacy", False), ("modern", True)):
                    r = wrk(srv, modern=modern, sid=None if modern else sid, expect_sse=False,
                            duration=args.duration, warmup=args.warmup, connections=connections)
                    res.add(f"{letter}_{era}_json", peer, r)
                    log(f"  {peer:12s} {letter} {'2026' if modern else 'legacy':6s} JSON  {r['rps']:8.0f} req/s  "
                        f"p50 {r['p50_us']/1000:.2f} ms  cpu {r['cpu_us_per_call']:.0f} us/call  errors {r['errors']}")
            if "c" in workloads:
                for parallel in (1, 32):
                    s = asyncio.run(sessions_per_second(srv.port, parallel, args.session_seconds))
                    res.add(f"c_sessions_{parallel}", peer, s)
                    log(f"  {peer:12s} c sessions x{parallel:<3d} {s['sessions_per_s']:8.1f} /s  errors "
                        f"{s['errors']}  client cpu {s['client_cpu_fraction']:.0%}"
                        + (f"  first error {s['first_error']}" if s["first_error"] else ""))
    except Exception as exc:  # noqa: BLE001
        res.fail("HTTP JSON workloads", peer, exc)


def run_http_sse(res: Results, peer: str, args):
    try:
        with Server(peer, sse=True) as srv:
            sid = open_legacy_session(srv.port, f"{peer} (SSE mode)")
            for key, modern in (("b_legacy_sse", False), ("b_modern_sse", True)):
                r = wrk(srv, modern=modern, sid=None if modern else sid, expect_sse=True,
                        duration=args.duration, warmup=args.warmup)
                res.add(key, peer, r)
                log(f"  {peer:12s} b {'2026' if modern else 'legacy'} SSE {r['rps']:8.0f} req/s  p50 "
                    f"{r['p50_us']/1000:.2f} ms  cpu {r['cpu_us_per_call']:.0f} us/call  errors {r['errors']}"
                    + (f"  (answered JSON {r['framing']}x)" if r["framing"] else ""))
    except Exception as exc:  # noqa: BLE001
        res.fail("HTTP SSE workloads", peer, exc)


def run_default_logging(res: Results, peer: str, args):
    """Workload h: a (2026-07-28, JSON) with each server logging as it does out of the box, to a
    file (the harness's server log), as a deployment's log collector would take it."""
    try:
        with Server(peer, default_logging=True, label=f"{peer}-default-logging") as srv:
            r = wrk(srv, modern=True, sid=None, expect_sse=False, duration=args.duration, warmup=args.warmup)
            res.add("h_modern_json_default_logging", peer, r)
            log(f"  {peer:12s} h 2026 JSON, default logging {r['rps']:8.0f} req/s  cpu {r['cpu_us_per_call']:.0f} "
                f"us/call  errors {r['errors']}")
    except Exception as exc:  # noqa: BLE001
        res.fail("default logging", peer, exc)


def run_memory(res: Results, peer: str, args):
    try:
        with Server(peer) as srv:
            m = asyncio.run(memory_test(srv, args.mem_sessions))
            res.add("d_memory", peer, m)
            log(f"  {peer:12s} d memory start {m['rss_start_mb']:.1f} MB, {m['kb_per_session']:.1f} KB/session "
                f"({m['opened']}/{m['n']} streams, {m['open_errors']} errors), returned after close "
                f"{_pct(m['returned_after_close_pct'])}, after DELETE {_pct(m['returned_after_delete_pct'])}, "
                f"growth when the same N are opened again {_pct(m['regrowth_on_reopen_pct'])}"
                + (f"  first error {m['first_error']}" if m["first_error"] else ""))
    except Exception as exc:  # noqa: BLE001
        res.fail("memory", peer, exc)


def run_raw(res: Results, args):
    """Workload r: the floor servers (not MCP) under the same wrk run as a, to calibrate the machine."""
    for peer in RAW_ANCHOR_US:
        try:
            with Server(peer) as srv:
                r = wrk(srv, modern=False, sid="calibration", expect_sse=False, duration=args.duration,
                        warmup=args.warmup)
                res.add("r_raw", peer, r)
                log(f"  {peer:12s} r floor        {r['rps']:8.0f} req/s  cpu {r['cpu_us_per_call']:.1f} us/request  "
                    f"errors {r['errors']}")
        except Exception as exc:  # noqa: BLE001
            res.fail("raw floor", peer, exc)


def run_stdio(res: Results, peer: str, args):
    try:
        c = stdio_cold_start(peer, args.cold_starts)
        res.add("e_stdio_cold", peer, c)
        t = stdio_throughput(peer, args.stdio_messages)
        res.add("e_stdio_tput", peer, t)
        log(f"  {peer:12s} e stdio cold start {c['median_ms']:.0f} ms, {t['msgs_per_s']:.0f} msgs/s "
            f"({t['errors']} errors)")
        if peer == "ours":
            m = start_modes(args.cold_starts)
            res.add("e_start_modes", peer, m)
            log(f"  {peer:12s} e compiled from source: cold start {m['source_cold_ms']:.0f} ms, RSS "
                f"{m['source_rss_mb']:.1f} MB; as a script: {m['script_cold_ms']:.0f} ms, {m['script_rss_mb']:.1f} MB")
    except Exception as exc:  # noqa: BLE001
        res.fail("stdio", peer, exc)


def run_redis(res: Results, args):
    try:
        with Redis("0") as redis, Server("ours", redis_url=redis.url, label="ours-redis") as srv:
            sid = open_legacy_session(srv.port)
            for key, modern in (("f_redis_legacy_json", False), ("f_redis_modern_json", True)):
                r = wrk(srv, modern=modern, sid=None if modern else sid, expect_sse=False,
                        duration=args.duration, warmup=args.warmup)
                res.add(key, "ours", r)
                log(f"  ours-redis   f {'2026' if modern else 'legacy'} JSON {r['rps']:8.0f} req/s  "
                    f"cpu {r['cpu_us_per_call']:.0f} us/call  errors {r['errors']}")
    except Exception as exc:  # noqa: BLE001
        res.fail("redis", "ours", exc)


def run_workers(res: Results, args):
    for workers in (1, 2):
        try:
            # "unpinned" = both cores, said explicitly: this harness runs pinned to core 1, and a child
            # started without taskset would inherit that
            with Redis("0,1") as redis, Server("ours", redis_url=redis.url, workers=workers, cpus="0,1",
                                               label=f"ours-w{workers}") as srv:
                sid = open_legacy_session(srv.port)
                for key, modern in (("legacy", False), ("modern", True)):
                    r = wrk(srv, modern=modern, sid=None if modern else sid, expect_sse=False,
                            duration=args.duration, warmup=args.warmup, cpus="0,1", threads=2)
                    res.add(f"g_w{workers}_{key}_json", "ours", r)
                    log(f"  ours-w{workers}      g {key} JSON {r['rps']:8.0f} req/s  cpu "
                        f"{r['cpu_us_per_call']:.0f} us/call  errors {r['errors']}")
        except Exception as exc:  # noqa: BLE001
            res.fail(f"--workers {workers}", "ours", exc)


def run_10k(res: Results, args):
    try:
        with Server("ours", label="ours-10k") as srv:  # default limits (MCP_MAX_CONNECTIONS 10000)
            m = asyncio.run(memory_test(srv, args.big_streams, settle=2.0, reopen=False))
            res.add("d_streams_10k", "ours", m)
            log(f"  ours         d {m['n']} streams: opened {m['opened']}, alive {m['alive_at_end']}, "
                f"errors {m['open_errors']}, {m['kb_per_session']:.1f} KB/session, open took "
                f"{m['open_seconds']:.1f} s" + (f"  first error {m['first_error']}" if m["first_error"] else ""))
    except Exception as exc:  # noqa: BLE001
        res.fail("10k streams", "ours", exc)


def _pct(v):
    return "n/a" if v is None else f"{v:.0f}%"


# ---- the table -------------------------------------------------------------------------------------------

def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def build_rows(res: Results, peers: list, args) -> list:
    """(label, {peer: value}, fmt, higher_is_better, note) rows; medians over rounds."""
    raw = res.raw
    rows = []

    def metric(key, field, label, fmt, higher, peer_map=None, scale=1.0, note="", errors=False, ratio=True):
        values = {}
        for column in ("ours", "sdk", "fastmcp"):
            source = (peer_map or {}).get(column, column)
            runs = raw.get(key, {}).get(source, [])
            v = med([r.get(field) for r in runs])
            values[column] = None if v is None else v * scale
            if runs and (errors or field in ("rps", "sessions_per_s", "msgs_per_s")):
                values[column + "_errors"] = sum(r.get("errors", 0) or 0 for r in runs) + \
                    sum(r.get("open_errors", 0) for r in runs)
            if runs and key.startswith("b_") and field == "rps":
                values[column + "_json"] = sum(r.get("framing", 0) for r in runs) > 0
        values["ratio"] = ratio
        rows.append((label, values, fmt, higher, note))

    inline = {"ours": "ours_inline"}
    for key, title in (("a_legacy_json", "a. tools/call JSON, 2025-11-25 session"),
                       ("a_modern_json", "a. tools/call JSON, 2026-07-28 stateless")):
        metric(key, "rps", f"{title}: req/s", "int", True)
        metric(key, "p50_us", f"{title}: p50 ms", "ms", False, scale=1e-3)
        metric(key, "p99_us", f"{title}: p99 ms", "ms", False, scale=1e-3)
        metric(key, "cpu_us_per_call", f"{title}: server CPU µs/call", "int", False)
        if "ours_inline" in peers:
            metric(key, "rps", f"{title}: req/s [ours inline=True]", "int", True, inline)
            metric(key, "cpu_us_per_call", f"{title}: CPU µs/call [ours inline=True]", "int", False, inline)
    for key, title in (("b_legacy_sse", "b. tools/call SSE, 2025-11-25 session"),
                       ("b_modern_sse", "b. tools/call SSE, 2026-07-28 stateless")):
        metric(key, "rps", f"{title}: req/s", "int", True)
        metric(key, "p50_us", f"{title}: p50 ms", "ms", False, scale=1e-3)
        metric(key, "p99_us", f"{title}: p99 ms", "ms", False, scale=1e-3)
        metric(key, "cpu_us_per_call", f"{title}: server CPU µs/call", "int", False)
        if "ours_inline" in peers:
            metric(key, "rps", f"{title}: req/s [ours inline=True]", "int", True, inline)
    for key, title in (("i_legacy_json", "i. tools/call JSON, one client (1 connection), 2025-11-25 session"),
                       ("i_modern_json", "i. tools/call JSON, one client (1 connection), 2026-07-28 stateless")):
        metric(key, "rps", f"{title}: req/s", "int", True)
        metric(key, "p50_us", f"{title}: p50 ms", "ms", False, scale=1e-3)
    title = "h. tools/call JSON, 2026-07-28, each server's default logging (ours: info, access log; SDK: INFO, uvicorn's access log)"
    metric("h_modern_json_default_logging", "rps", f"{title}: req/s", "int", True)
    metric("h_modern_json_default_logging", "cpu_us_per_call", f"{title}: server CPU µs/call", "int", False)
    metric("c_sessions_1", "sessions_per_s", "c. session setup (init, initialized, list, call), 1 at a time: "
           "sessions/s", "f1", True)
    metric("c_sessions_32", "sessions_per_s", "c. session setup, 32 in parallel: sessions/s", "f1", True)
    metric("d_memory", "rss_start_mb", "d. RSS at start, MB", "f1", False)
    n_mem = (raw.get("d_memory", {}).get("ours") or raw.get("d_memory", {}).get("sdk") or [{"n": "?"}])[0]["n"]
    metric("d_memory", "kb_per_session", f"d. RSS per idle session with open GET stream (N={n_mem}), KB",
           "f1", False)
    metric("d_memory", "returned_after_close_pct", "d. RSS returned after closing the streams, %", "int", True,
           ratio=False)
    metric("d_memory", "returned_after_delete_pct", "d. RSS returned after DELETE of the sessions, %",
           "int", True, ratio=False)
    metric("d_memory", "regrowth_on_reopen_pct", "d. RSS growth when N more sessions are opened after "
           "that, % of the first growth (≈0: memory reused, ≈100: leaked)", "int", False, ratio=False)
    if "ours_malloc" in peers:
        malloc, tag = {"ours": "ours_malloc"}, "[ours PYTHONMALLOC=malloc]"
        metric("d_memory", "rss_start_mb", f"d. RSS at start, MB {tag}", "f1", False, malloc)
        metric("d_memory", "kb_per_session", f"d. RSS per idle session with open GET stream, KB {tag}", "f1",
               False, malloc)
        metric("d_memory", "returned_after_close_pct", f"d. RSS returned after closing the streams, % {tag}",
               "int", True, malloc, ratio=False)
        metric("d_memory", "returned_after_delete_pct", f"d. RSS returned after DELETE, % {tag}", "int", True,
               malloc, ratio=False)
        metric("d_memory", "regrowth_on_reopen_pct", f"d. RSS growth when N more are opened, % {tag}", "int",
               False, malloc, ratio=False)
    if "d_streams_10k" in raw:
        n = raw["d_streams_10k"]["ours"][0]["n"]
        metric("d_streams_10k", "alive_at_end", f"d. concurrent open GET streams held, of {n:,}", "int", True,
               errors=True)
        metric("d_streams_10k", "kb_per_session", f"d. RSS per session at {n:,} streams, KB", "f1", False)
    metric("e_stdio_cold", "median_ms", f"e. stdio cold start to initialize answer, ms (median of {args.cold_starts})", "int",
           False)
    for mode, tag in (("source", "[ours compiled from source at import: no cached byte code]"),
                      ("script", "[ours as a script: python mcp_server.py]")):
        metric("e_start_modes", f"{mode}_cold_ms", f"e. stdio cold start, ms {tag}", "int", False)
        metric("e_start_modes", f"{mode}_rss_mb", f"d. RSS at start, MB {tag}", "f1", False)
    metric("e_stdio_tput", "msgs_per_s", f"e. stdio tools/call throughput ({args.stdio_messages} piped), msgs/s",
           "int", True)
    metric("e_stdio_tput", "cpu_us_per_call", "e. stdio server CPU µs/call", "int", False)
    for key, title in (("f_redis_legacy_json", "f. Redis store: tools/call JSON, 2025-11-25 session"),
                       ("f_redis_modern_json", "f. Redis store: tools/call JSON, 2026-07-28")):
        metric(key, "rps", f"{title}: req/s", "int", True)
        metric(key, "cpu_us_per_call", f"{title}: server CPU µs/call", "int", False)
    for key, title in (("legacy", "2025-11-25 session"), ("modern", "2026-07-28")):
        metric(f"g_w1_{key}_json", "rps", f"g. Redis, 1 worker, unpinned, wrk -t2: {title} req/s", "int", True)
        metric(f"g_w2_{key}_json", "rps", f"g. Redis, --workers 2, unpinned, wrk -t2: {title} req/s", "int", True)
        metric(f"g_w1_{key}_json", "cpu_us_per_call", f"g. Redis, 1 worker: {title} server CPU µs/call", "int",
               False)
        metric(f"g_w2_{key}_json", "cpu_us_per_call", f"g. Redis, --workers 2: {title} server CPU µs/call "
               "(supervisor + workers)", "int", False)
        metric(f"g_w2_{key}_json", "wrk_cpu_us_per_call", f"g. Redis, --workers 2: {title} wrk's own CPU "
               "µs/request", "int", False)
    return rows


def fmt_value(v, fmt):
    if v is None:
        return "—"
    if fmt == "int":
        return f"{v:,.0f}"
    if fmt == "ms":
        return f"{v:.2f}"
    return f"{v:,.1f}"


def render_table(rows) -> str:
    out = ["| workload | ours | SDK | FastMCP | ours/SDK |", "|---|---:|---:|---:|---:|"]
    for label, values, fmt, higher, _note in rows:
        if all(values.get(c) is None for c in ("ours", "sdk", "fastmcp")):
            continue
        cells = []
        for c in ("ours", "sdk", "fastmcp"):
            cell = fmt_value(values.get(c), fmt)
            if values.get(c + "_errors"):
                cell += f" ({values[c + '_errors']} err)"
            if values.get(c + "_json"):
                cell += " †"
            cells.append(cell)
        ours, sdk = values.get("ours"), values.get("sdk")
        ratio = f"{ours / sdk:.2f}×" if values.get("ratio") and ours is not None and sdk and ours > 0 and sdk > 0 \
            else "—"
        arrow = "↑" if higher else "↓"
        out.append(f"| {label} {arrow} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(out)


def facts_md(f: dict) -> str:
    p = f["packages"]
    return "\n".join([
        f"- date: {f['date']}",
        f"- machine: {f['nproc']} cores ({f['cpu_model']}), {f['mem_total_gb']} GiB, Linux {f['kernel']}; "
        f"load average at start {' '.join(f['loadavg_start'])}"
        + (f", at end {' '.join(f['loadavg_end'])}" if f.get("loadavg_end") else ""),
        f"- Python {f['python']} ({f['python_executable']})",
        f"- ours: mcp_server.py {f['ours_version']} at git {f['ours_git_head']}"
        f"{' + uncommitted changes' if f['ours_mcp_server_py_modified'] else ''} "
        f"(sha256 {f['ours_mcp_server_py_sha256']}); inline=True supported: {f['ours_inline_supported']}",
        f"- peers: mcp {p.get('mcp')} (mcp-types {p.get('mcp-types')}), fastmcp {p.get('fastmcp')} "
        f"(fastmcp-slim {p.get('fastmcp-slim')}), uvicorn {p.get('uvicorn')} ("
        f"{'uvloop ' + p['uvloop'] + ' and httptools ' + str(p.get('httptools')) if p.get('uvloop') else 'h11 ' + str(p.get('h11')) + ', asyncio loop'}), "
        f"starlette {p.get('starlette')}, sse-starlette {p.get('sse-starlette')}, pydantic {p.get('pydantic')}, "
        f"anyio {p.get('anyio')}; redis-py {p.get('redis')}",
    ] + ([
        f"- other processes' CPU during the wrk runs: median {f['foreign_cpu_cores_median']} "
        f"cores, max {f['foreign_cpu_cores_max']} (about 0 on a quiet machine; see bench/README.md)"]
        if "foreign_cpu_cores_median" in f else []) + ([
        f"- WARNING: mcp_server.py changed during the run (sha256 {f['ours_mcp_server_py_sha256_end']} at the "
        f"end): rounds may mix versions"] if f.get("ours_mcp_server_py_sha256_end") not in
        (None, f["ours_mcp_server_py_sha256"]) else []) + [
        f"- load generator: {' '.join(f['wrk'])}; {f['redis_server'].split(' sha=')[0]}; ulimit -n "
        f"{f['ulimit_nofile']}",
    ])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5, help="seconds per measured wrk run")
    ap.add_argument("--warmup", type=float, default=1, help="seconds of unmeasured wrk before each run")
    ap.add_argument("--session-seconds", type=float, default=4)
    ap.add_argument("--mem-sessions", type=int, default=1000)
    ap.add_argument("--big-streams", type=int, default=10000)
    ap.add_argument("--cold-starts", type=int, default=10)
    ap.add_argument("--stdio-messages", type=int, default=2000)
    ap.add_argument("--peers", default="ours,ours_inline,ours_malloc,sdk,fastmcp",
                    help="servers to run, of " + ",".join(PEERS) + " (ours_inline runs a and b only, "
                    "ours_malloc d only)")
    ap.add_argument("--only", default="a,b,c,d,e,f,g,h,i,r,10k", help="workload letters to run (comma-separated)")
    ap.add_argument("--results-dir", default=os.path.join(BENCH_DIR, "results"))
    ap.add_argument("--no-write", action="store_true", help="print only; write no results files")
    args = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        os.sched_setaffinity(0, {1})  # this process is the asyncio load generator: core 1
    except OSError:
        log("warning: could not pin the harness to core 1")
    only = set(args.only.split(","))
    facts = machine_facts()
    peers = [p for p in args.peers.split(",") if p in PEERS]
    if "ours_inline" in peers and not facts["ours_inline_supported"]:
        log("MCPServer.tool has no inline parameter: skipping the inline=True variant")
        peers.remove("ours_inline")
    log(facts_md(facts))
    if float(facts["loadavg_start"][0]) > 0.5:
        log(f"WARNING: load average {facts['loadavg_start'][0]} at start: something else is using the CPU")
    for peer in peers:  # compile every server's modules into PYCACHE before anything is timed
        try:
            stdio_cold_start(peer, 1)
        except Exception as exc:  # noqa: BLE001 - the real runs report it
            log(f"warm-up start of {peer} failed: {exc}")
    res = Results()
    t_start = time.monotonic()
    for rnd in range(1, args.rounds + 1):
        log(f"== round {rnd}/{args.rounds} ({time.monotonic() - t_start:.0f} s)")
        for peer in peers:  # ours_inline: a and b only; ours_malloc: d only
            json_workloads = only & ({"a"} if peer == "ours_inline" else {"a", "c", "i"})
            if json_workloads and peer != "ours_malloc":
                run_http_json(res, peer, args, json_workloads)
            if "b" in only and peer != "ours_malloc":
                run_http_sse(res, peer, args)
            if "h" in only and peer in ("ours", "sdk"):
                run_default_logging(res, peer, args)
            if "d" in only and peer != "ours_inline":
                run_memory(res, peer, args)
            if "e" in only and peer not in ("ours_inline", "ours_malloc"):
                run_stdio(res, peer, args)
        if "r" in only:
            run_raw(res, args)
        if "f" in only and "ours" in peers:
            run_redis(res, args)
        if "g" in only and "ours" in peers:
            run_workers(res, args)
    if "10k" in only and "ours" in peers:
        log("== 10,000 open streams (ours)")
        run_10k(res, args)
    facts["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    with open(os.path.join(REPO, "mcp_server.py"), "rb") as fh:
        facts["ours_mcp_server_py_sha256_end"] = hashlib.sha256(fh.read()).hexdigest()[:16]
    if FOREIGN:
        facts["foreign_cpu_cores_median"] = round(statistics.median(FOREIGN), 3)
        facts["foreign_cpu_cores_max"] = round(max(FOREIGN), 3)
    facts["elapsed_s"] = round(time.monotonic() - t_start)
    rows = build_rows(res, peers, args)
    table = render_table(rows)
    command = "bash bench/run " + " ".join(sys.argv[1:])
    notes = notes_md(res, args, facts)
    print()
    print(facts_md(facts))
    print()
    print(table)
    print()
    print(notes)
    if not args.no_write:
        os.makedirs(args.results_dir, exist_ok=True)
        stem = datetime.date.today().isoformat()
        n = 1
        while os.path.exists(os.path.join(args.results_dir, stem + ".md")):
            n += 1
            stem = f"{datetime.date.today().isoformat()}-{n}"
        md_path = os.path.join(args.results_dir, stem + ".md")
        with open(md_path, "w") as f:
            f.write(f"# MCP server benchmark, {facts['date']}\n\nCommand: `{command.strip()}` "
                    f"({facts['elapsed_s']} s, {args.rounds} rounds, medians)\n\n{facts_md(facts)}\n\n"
                    f"{table}\n\n{notes}\n")
        with open(os.path.join(args.results_dir, stem + ".json"), "w") as f:
            json.dump({"facts": facts, "args": vars(args), "command": command.strip(), "raw": res.raw,
                       "failures": res.failures, "oddities": ODDITIES}, f, indent=1, default=str)
        log(f"wrote {md_path} and {stem}.json")
    return 1 if res.failures else 0


def calibration_notes(res: Results) -> list:
    """Workload r in words: this machine against the issue's anchor machine, and every server's CPU
    per call in units of the asyncio floor (which cancels most of the machine's speed out)."""
    raw = res.raw.get("r_raw", {})
    floors = {peer: med([r.get("cpu_us_per_call") for r in runs]) for peer, runs in raw.items()}
    if not floors.get("raw_protocol"):
        return []
    parts = []
    for peer, label in (("raw_protocol", "the 60-line asyncio.Protocol server with a fixed body"),
                        ("raw_asgi", "a raw ASGI app under uvicorn")):
        if floors.get(peer):
            rps = med([r.get("rps") for r in raw[peer]])
            parts.append(f"{label}: {rps:,.0f} req/s, {floors[peer]:.1f} µs/request "
                         f"(the issue's anchor machine: {RAW_ANCHOR_US[peer]} µs)")
    line = "r. machine calibration (not MCP servers; the issue's \"raw limit\" column): " + "; ".join(parts) + "."
    calls = res.raw.get("a_legacy_json", {})
    per_floor = []
    for peer, name in (("ours", "ours"), ("sdk", "SDK"), ("fastmcp", "FastMCP")):
        cpu = med([r.get("cpu_us_per_call") for r in calls.get(peer, [])])
        if cpu:
            per_floor.append(f"{name} {cpu / floors['raw_protocol']:.1f}")
    if per_floor:
        line += (" Server CPU per tools/call (a, 2025-11-25), in units of that asyncio floor: "
                 + ", ".join(per_floor) + ".")
    return [line]


def workers_notes(res: Results) -> list:
    """What --workers 2 can reach when wrk shares the two cores: 2 cores / (server + wrk CPU per
    request) against 1 worker's 1 core / server CPU per request, i.e. at most 2s/(s+w)."""
    lines = []
    for key, title in (("legacy", "2025-11-25"), ("modern", "2026-07-28")):
        one, two = res.raw.get(f"g_w1_{key}_json", {}).get("ours"), res.raw.get(f"g_w2_{key}_json", {}).get("ours")
        if not one or not two:
            continue
        s, w = med([r.get("cpu_us_per_call") for r in two]), med([r.get("wrk_cpu_us_per_call") for r in two])
        r1, r2 = med([r.get("rps") for r in one]), med([r.get("rps") for r in two])
        if s and w and r1 and r2:
            lines.append(f"{title}: measured {r2 / r1:.2f}x; with wrk spending {w:.0f} µs and the server {s:.0f} µs "
                         f"of CPU per request on the same two cores, two workers can reach at most "
                         f"2*{s:.0f}/({s:.0f}+{w:.0f}) = {2 * s / (s + w):.2f}x")
    return ["g. --workers 2 against 1 worker: " + "; ".join(lines) + "."] if lines else []


def notes_md(res: Results, args, facts: dict | None = None) -> str:
    facts = facts or {}
    lines = [
        "↑ higher is better, ↓ lower is better; ours/SDK is the plain ratio of the two medians.",
        f"Medians of {args.rounds} interleaved rounds; wrk -t1 -c64 (i: -c1) -d{args.duration:g}s (after a "
        f"{args.warmup:g}s warm-up) pinned to core 1, each server pinned to core 0 (g: server, redis-server and wrk -t2 all on both cores).",
        "† the peer answered JSON although the request allowed SSE and the server was in its SSE mode "
        "(the SDK's 2026-07-28 path commits to SSE only when the handler sends a notification).",
        "(N err) sums errors over all rounds: non-200, no \"result\", an \"error\", isError, wrong echo text, "
        "socket errors or wrk timeouts.",
        "g runs the server, redis-server and wrk -t2 together on both cores (taskset -c 0,1), so wrk and redis "
        "take part of the CPU the second worker could use; a 1-worker server that may migrate between cores "
        "is also slower than the pinned one in a.",
    ]
    lines += calibration_notes(res)
    lines += workers_notes(res)
    if "ours_malloc" in res.raw.get("d_memory", {}):
        lines.append("[ours PYTHONMALLOC=malloc]: ours with glibc malloc instead of pymalloc, as the Docker image "
                     "and --workers run it; the server's malloc_trim can then hand freed memory back.")
    foreign = facts.get("foreign_cpu_cores_median")
    if foreign is not None and foreign > 0.1:
        lines.append(f"WARNING: other processes used a median {foreign} cores (max "
                     f"{facts.get('foreign_cpu_cores_max')}) during the wrk runs: req/s and latency are "
                     "understated for every server; CPU µs/call is the steadier figure.")
    if ODDITIES:
        lines.append("")
        lines.append("Oddities seen:")
        lines += [f"- {o}" for o in ODDITIES]
    if res.failures:
        lines.append("")
        lines.append("Failures:")
        lines += [f"- {f}" for f in res.failures]
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        code = main()
    finally:
        cleanup()
    sys.exit(code)
