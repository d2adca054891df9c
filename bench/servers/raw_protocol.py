"""Calibration server, not MCP: the issue's "60-line asyncio.Protocol server with a fixed body".

It reads HTTP/1.1 requests (Content-Length bodies, keep-alive) and answers every one with the same
JSON-RPC tools/call result, so that the harness's wrk script accepts it.  Its CPU per request is
what the event loop and the kernel cost on this machine before any MCP work: the floor that every
server in the table sits on, and a way to compare one machine with another.

    raw_protocol.py --port P
"""
import argparse
import asyncio

TEXT = "bench-echo-7f3a"  # the harness's echo text (bench.py TEXT)
BODY = ('{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"%s"}],"isError":false}}'
        % TEXT).encode()
RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (len(BODY), BODY))


class FixedAnswer(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.buffer = b""

    def data_received(self, data):
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            length = 0
            for line in self.buffer[:end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length:]
            self.transport.write(RESPONSE)


async def main(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(FixedAnswer, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8000)
    asyncio.run(main(parser.parse_args().port))
