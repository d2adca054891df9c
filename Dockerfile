# mcp_server.py in a container: one file, the four runtime dependencies, a non-root user.
#   docker build -t mcp-server .
#   docker run -p 6901:6901 --env-file deploy/.env mcp-server
# Everything is configured by environment (see docs/configuration.md); secrets come at run time
# (deploy/.env.example), never into the image: only requirements.txt and mcp_server.py are copied.
# Three replicas behind nginx with Redis: deploy/compose.yaml; Kubernetes: deploy/kubernetes/.
#
# The base is pinned by its exact version tag.  Pin it by digest in your own registry
# (FROM registry.example.com/python@sha256:...) once you mirror it: a tag can be re-pointed.
FROM python:3.12.8-slim-bookworm

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
# runtime packages only: requirements.txt without the tests' pytest
RUN grep -v '^pytest' requirements.txt > /tmp/runtime.txt && pip install --no-cache-dir -r /tmp/runtime.txt
COPY mcp_server.py .
# compiled once at build time, and run as a module so that the compiled code is what runs: a
# script path is compiled anew at every start, and Python keeps its syntax tree (~18 MB) for as
# long as the script runs
RUN python -m compileall -q mcp_server.py
USER mcp

EXPOSE 6901
# SIGTERM drains (MCP_DRAIN_SECONDS, MCP_DRAIN_GRACE): give `docker stop -t` more than their sum
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=3s --start-period=5s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('MCP_PORT', '6901'), timeout=2)"

CMD ["python", "-m", "mcp_server"]
