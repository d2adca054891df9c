"""Benchmark server: the official MCP Python SDK (mcp 2.x MCPServer, formerly FastMCP) with one
sync tool, echo(text) -> str.

    sdk.py --port P [--sse] [--stateless]   streamable HTTP app under uvicorn (access log off)
    sdk.py --port P --default-logging      the same with the SDK's and uvicorn's default logging
                                           (INFO, uvicorn's access log on)
    sdk.py --stdio                          stdio transport
"""
import argparse
import logging
import sys

from mcp.server.mcpserver import MCPServer

DEFAULT_LOGGING = "--default-logging" in sys.argv
server = MCPServer("bench-sdk", version="1.0.0") if DEFAULT_LOGGING else \
    MCPServer("bench-sdk", version="1.0.0", log_level="WARNING")


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
    parser.add_argument("--default-logging", action="store_true")
    args = parser.parse_args()
    if not args.default_logging:
        logging.basicConfig(level=logging.WARNING)
    if args.stdio:
        server.run("stdio")
    else:
        import uvicorn
        app = server.streamable_http_app(json_response=not args.sse, stateless_http=args.stateless,
                                         host="127.0.0.1")
        if args.default_logging:
            uvicorn.run(app, host="127.0.0.1", port=args.port)  # uvicorn's defaults: info, access log on
        else:
            uvicorn.run(app, host="127.0.0.1", port=args.port, access_log=False, log_level="warning")
