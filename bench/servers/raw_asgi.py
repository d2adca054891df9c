"""Calibration server, not MCP: the issue's "raw ASGI app under uvicorn".

A bare ASGI callable that reads the request body and answers with a fixed JSON-RPC tools/call
result, run by uvicorn exactly as the SDK and FastMCP are run here (uvicorn's defaults, which are the
plain asyncio loop and h11 when uvloop and httptools are not installed; access log off).  Its CPU per request is what uvicorn itself costs the peers before their own work.

    raw_asgi.py --port P
"""
import argparse

import uvicorn

TEXT = "bench-echo-7f3a"  # the harness's echo text (bench.py TEXT)
BODY = ('{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"%s"}],"isError":false}}'
        % TEXT).encode()
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8000)
    uvicorn.run(app, host="127.0.0.1", port=parser.parse_args().port, access_log=False, log_level="warning")
