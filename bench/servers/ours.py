"""Benchmark server: mcp_server.py (this repository) with one sync tool, echo(text) -> str.

All flags are mcp_server's own (--port, --response-mode, --no-auth, --stdio, --workers,
--redis-url ...).  The tool is registered with inline=True (it never waits): the runs in
RESULTS.md measured it on the event loop, where mcp_server used to move a sync tool by itself
after 16 fast calls; a sync tool now runs in a worker thread unless it says inline=True.
BENCH_INLINE=1 (the "ours inline=True" rows) is therefore the same server now.
"""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from mcp_server import MCPServer  # noqa: E402

server = MCPServer("bench-ours", version="1.0.0")


@server.tool(inline=True)
def echo(text: str) -> str:
    """Echo the text back."""
    return text


if __name__ == "__main__":
    server.run()
