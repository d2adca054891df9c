"""Benchmark server: mcp_server.py (this repository) with one sync tool, echo(text) -> str.

All flags are mcp_server's own (--port, --response-mode, --no-auth, --stdio, --workers,
--redis-url ...).  BENCH_INLINE=1 registers the tool with inline=True (the harness sets it only
when MCPServer.tool accepts ``inline``).
"""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from mcp_server import MCPServer  # noqa: E402

server = MCPServer("bench-ours", version="1.0.0")
options = {"inline": True} if os.environ.get("BENCH_INLINE") == "1" else {}


@server.tool(**options)
def echo(text: str) -> str:
    """Echo the text back."""
    return text


if __name__ == "__main__":
    server.run()
