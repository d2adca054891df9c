"""Benchmark server: FastMCP (PrefectHQ fastmcp) with one sync tool, echo(text) -> str.

    fastmcp_server.py --port P [--sse] [--stateless]   http_app() under uvicorn (access log off)
    fastmcp_server.py --stdio                          stdio transport
"""
import argparse
import logging
import os

os.environ.setdefault("FASTMCP_LOG_LEVEL", "WARNING")
os.environ.setdefault("FASTMCP_SHOW_SERVER_BANNER", "false")

from fastmcp import FastMCP  # noqa: E402

server = FastMCP("bench-fastmcp")


@server.tool()
def echo(text: str) -> str:
    """Echo the text back."""
    return text


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--sse", action="store_true", help="json_response=False (SSE answers)")
    parser.add_argument("--stateless", action="store_true", help="stateless_http=True")
    parser.add_argument("--stdio", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.stdio:
        server.run("stdio", show_banner=False)
    else:
        import uvicorn
        app = server.http_app(path="/mcp", json_response=not args.sse, stateless_http=args.stateless)
        uvicorn.run(app, host="127.0.0.1", port=args.port, access_log=False, log_level="warning")
