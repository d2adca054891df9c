"""Where the time of one session setup goes, one session at a time (workload c, step by step).

    python bench/session_steps.py PORT [--seconds 3] [--pid PID] [--floor]

A blocking-socket client (cheaper than the harness's asyncio one) opens a connection, sends
initialize, notifications/initialized, tools/list and tools/call on it, and closes it, again and
again; it prints sessions/s and the median time of each step.  With ``--pid`` it also prints the
server's CPU per session (user and system, from /proc/PID/stat).  ``--floor`` is for
``servers/raw_protocol.py``, which answers every request with the same bytes: the same round trips
with no MCP work, i.e. what one-at-a-time session setup can reach on this machine at all.

Run each server pinned to core 0 and this client to core 1, as the harness does:

    taskset -c 0 python bench/servers/ours.py --port 7201 --no-auth &
    taskset -c 0 python bench/servers/raw_protocol.py --port 7202 &
    taskset -c 1 python bench/session_steps.py 7201 --pid <ours' pid>
    taskset -c 1 python bench/session_steps.py 7202 --floor

The official SDK's server (``servers/sdk.py`` in the bench venv) takes the same client.
"""
import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import time

sys.dont_write_bytecode = True  # no __pycache__ in the repository
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (the harness's request bodies and headers)

STEPS = ("connect", "initialize", "initialized", "tools/list", "tools/call", "close")


def exchange(sock: socket.socket, headers: dict, body: bytes) -> tuple:
    """One POST /mcp on ``sock``: (response head, response body).  ``headers`` include Host."""
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    sock.sendall(f"POST /mcp HTTP/1.1\r\n{lines}Content-Length: {len(body)}\r\n\r\n"
                 .encode() + body)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(header(head, b"content-length"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection in the middle of a body")
        rest += chunk
    return head, rest


def header(head: bytes, name: bytes) -> bytes:
    """A response header's value (names match in any case; values keep theirs)."""
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    raise KeyError(name.decode())


def one_session(port: int, floor: bool) -> list:
    """Seconds each step took."""
    marks = [time.perf_counter()]
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    marks.append(time.perf_counter())
    host = {"Host": f"127.0.0.1:{port}"}  # with the port, as clients send it (the SDK refuses it without)
    head, body = exchange(sock, {**host, **bench.legacy_headers(bench.ACCEPT_BOTH, None)},
                          json.dumps(bench.INIT).encode())
    marks.append(time.perf_counter())
    if floor:
        session_id = "floor"
    else:
        if b" 200 " not in head.split(b"\r\n")[0] or b'"protocolVersion"' not in body:
            raise RuntimeError(f"initialize answered {head[:200]!r} {body[:200]!r}")
        session_id = header(head, b"mcp-session-id").decode()
    headers = {**host, **bench.legacy_headers(bench.ACCEPT_BOTH, session_id)}
    for body, expected in ((json.dumps(bench.INITIALIZED).encode(), b"HTTP/1.1 202"),
                           (b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}', b'"name":"echo"'),
                           (json.dumps(bench.call_body(2, False)).encode(), bench.TEXT.encode())):
        head, answer = exchange(sock, headers, body)
        marks.append(time.perf_counter())
        if not floor and expected not in head + answer:
            raise RuntimeError(f"{body[:40]!r} answered {head[:200]!r} {answer[:200]!r}")
    sock.close()
    marks.append(time.perf_counter())
    return [b - a for a, b in zip(marks, marks[1:])]


def cpu_jiffies(pid: int) -> tuple:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])  # utime, stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--pid", type=int, help="the server's pid, for its CPU per session")
    parser.add_argument("--floor", action="store_true", help="the server is servers/raw_protocol.py")
    args = parser.parse_args()
    one_session(args.port, args.floor)  # warm up
    times: list = []
    cpu0 = cpu_jiffies(args.pid) if args.pid else None
    started = time.perf_counter()
    while time.perf_counter() - started < args.seconds:
        times.append(one_session(args.port, args.floor))
    elapsed = time.perf_counter() - started
    print(f"{len(times) / elapsed:,.0f} sessions/s, one at a time; median µs per step: " + ", ".join(
        f"{name} {statistics.median(t[i] for t in times) * 1e6:.0f}" for i, name in enumerate(STEPS)))
    if cpu0 is not None:
        user, system = (b - a for a, b in zip(cpu0, cpu_jiffies(args.pid)))
        tick = os.sysconf("SC_CLK_TCK")
        print(f"server CPU per session: user {user / tick / len(times) * 1e6:.0f} µs, "
              f"system {system / tick / len(times) * 1e6:.0f} µs")


if __name__ == "__main__":
    try:
        main()
    finally:
        shutil.rmtree(bench.TMP, ignore_errors=True)  # made when bench is imported
