# mcp_server.py in a container: one file, the four runtime dependencies, a non-root user.
#   docker build -t mcp-server .
#   docker run -p 6901:6901 -e ENCRYPTION_KEY=... -e MCP_SECRET=... mcp-server
# Everything is configured by environment (see docs/configuration.md).
FROM python:3.12-slim

# PYTHONMALLOC=malloc: memory that ended sessions used goes back to the OS (the server trims
# after a wave of closed connections); Python's own allocator would keep it for reuse.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONMALLOC=malloc \
    MCP_HOST=0.0.0.0 \
    MCP_PORT=6901 \
    LOG_FORMAT=json

WORKDIR /app
RUN useradd --create-home --uid 10001 mcp
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY mcp_server.py .
# compiled once at build time, and run as a module so that the compiled code is what runs: a
# script path is compiled anew at every start, and Python keeps its syntax tree (~18 MB) for as
# long as the script runs
RUN python -m compileall -q mcp_server.py
USER mcp

EXPOSE 6901
HEALTHCHECK --interval=30s --timeout=3s --start-period=5s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('MCP_PORT', '6901'), timeout=2)"

CMD ["python", "-m", "mcp_server"]
