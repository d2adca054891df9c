"""mcp_server.py - a complete Model Context Protocol server in one file.

It serves every MCP revision a client may speak (2024-11-05, 2025-03-26, 2025-06-18,
2025-11-25 with the ``initialize`` handshake, and the stateless 2026-07-28) on one endpoint,
over Streamable HTTP, the legacy HTTP+SSE transport, a direct JSON endpoint and stdio, under
its own asyncio HTTP/1.1 server or any ASGI server, on asyncio or trio.  Beyond the standard
library it always needs ``anyio`` (how everything ``server.asgi`` reaches waits and cancels);
the rest is imported when a feature first asks for it (``cryptography`` for sealed state,
``redis`` for the shared store, ``jwt`` for tokens).

Map of the file (search for ``# ==== N.``):

  1. Settings and errors   protocol constants, JSON-RPC errors, Settings (flags, env, .env, enc:),
                           JSON/text logs with request ids, Prometheus metrics (summed over
                           ``--workers``), OpenTelemetry spans and histograms (when installed);
                           concurrency through anyio (cancel scopes, background jobs, inboxes)
  2. Store                 the Store contract; the in-memory store (TTL, sliding expiry, LRU) and
                           the Redis store (strings, lists, pub/sub; Cluster-safe hash tags;
                           a primary found through Redis Sentinel)
  3. Crypto and tokens     the HKDF key ring, sealed state (AES-256-GCM), signed cursors, the
                           credential vault with key ids
  4. Registry and schemas  tools, resources, prompts, skills (SKILL.md frontmatter, file snapshots);
                           JSON Schema from type hints; a validator
  5. MCP core (sans-IO)    Context, era classification, masking, the runtime port the core talks
                           through, the registry, the protocol core and its method tables,
                           shaping per revision, Multi Round-Trip Requests, the extension API
                           and its extensions (tasks, skills, MCP Apps), the in-process test client
  6. Transports            the runtime (streams, pending answers, cancellation across instances),
                           Streamable HTTP, HTTP+SSE, /http, stdio
  7. OAuth and login       the OAuth 2.1 authorization server and resource checks; the upstream
                           login flow (pairing page, /redirect, masking), its providers (OAuth 2,
                           OpenID Connect, Kite Connect, your own) and the sandbox broker
  8. ASGI app              routing, Origin/Host checks, CORS, rate limits, health and metrics
  9. HTTP server           an asyncio HTTP/1.1 server that drives any ASGI 3 app
 10. MCPServer, CLI       ``MCPServer`` (the core wired to its runtime, app, login tools and
                           command line), the built-in server, ``serve`` (stdio, HTTP,
                           ``--workers``), ``main()``

Use it:

    python mcp_server.py              # HTTP on http://127.0.0.1:6901/mcp (+ /sse, /messages, /http), OAuth on
    python mcp_server.py --no-auth    # the same without bearer tokens (local development)
    python mcp_server.py --stdio      # stdio, for Claude Desktop and other local clients
    python mcp_server.py encrypt --setting NAME VAL  # VAL as an enc:... value of NAME (needs ENCRYPTION_KEY)
    python mcp_server.py settings     # every setting, as a Markdown table

    from mcp_server import MCPServer, Context
    server = MCPServer("weather", version="1.0.0")

    @server.tool()
    async def forecast(city: str, days: int = 3, ctx: Context | None = None) -> dict:
        "Forecast for a city."
        return {"city": city, "days": days}

    server.run()                      # same flags as the command line; or mount ``server.asgi``

The file has no sibling modules: copy it into a project and import it.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import collections
import collections.abc
import contextlib
import contextvars
import dataclasses
import datetime
import enum
import functools
import hashlib
import hmac
import importlib
import inspect
import itertools
import json
import logging
import math
import os
import re
import secrets
import selectors
import signal
import socket
import sys
import threading
import time
import types
import typing
import urllib.parse

import anyio

if sys.version_info < (3, 11):
    raise ImportError("mcp_server needs Python 3.11 or newer; this is Python %d.%d" % sys.version_info[:2])

__version__ = "0.1.0"

__all__ = [
    "MCPServer",
    "Context",
    "Extension",
    "TestClient",
    "ToolError",
    "RpcError",
    "Param",
    "Image",
    "Audio",
    "EmbeddedResource",
    "ResourceLink",
    "Settings",
    "Store",
    "MemoryStore",
    "RedisStore",
    "StoreUnavailable",
    "Provider",
    "OAuth2Provider",
    "OIDCProvider",
    "KiteProvider",
    "serve",
    "main",
]


# ==== 1. Settings and errors ====================================================================
#
# Rules:
# - Every revision the server speaks is listed once, here.  "Legacy" revisions have the
#   ``initialize`` handshake; the "modern" one (2026-07-28) is stateless and carries its version
#   and capabilities in every request's ``_meta``.
# - A protocol error is an ``RpcError``: JSON-RPC code, a message a person understands, optional
#   data, and the HTTP status the transport should use.  Nothing else is raised across the core.
# - Settings come from, in rising priority: defaults, a ``.env`` file, the environment, flags.
#   One table (``_SETTING_SPECS``) drives all three, the ``--help`` text and docs/configuration.md
#   (``python mcp_server.py settings --write docs/configuration.md``).
# - OpenTelemetry is never needed: ``_Telemetry`` imports ``opentelemetry`` when a server starts,
#   and instruments it only if the package is there and an SDK is set; otherwise no request
#   runs any of its code.
# - An optional package (``redis``, ``cryptography``, ``pyjwt``) is imported by ``_require(feature)``
#   only: a missing one refuses the start where the settings need it, else fails the one tool
#   call (a tool error) or request (-32603, HTTP 503) with the package's name and the install command.
# - Every JSON the server reads (requests, stored values, sealed state, upstream answers) goes
#   through ``_loads``: nesting deeper than MCP_MAX_JSON_DEPTH, NaN, Infinity and lone
#   surrogates are a ValueError there, never a RecursionError or a value no answer can carry.
# - A log line is one line: what a request put in it is escaped (``_escape_controls``).
# - Every key and secret is checked before anything is served (``Settings.check_secrets``, from
#   ``load`` and ``serve``): a key that does not parse, a short or placeholder secret (outside
#   MCP_DEV) and a shared store without MCP_SECRET end the start with one line naming the
#   setting, never its value.  An ``enc:`` value is bound to its setting's name.

LEGACY_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")
MODERN_VERSIONS = ("2026-07-28",)
SUPPORTED_VERSIONS = MODERN_VERSIONS + LEGACY_VERSIONS
LATEST_LEGACY = LEGACY_VERSIONS[0]

_META_VERSION = "io.modelcontextprotocol/protocolVersion"
_META_CAPS = "io.modelcontextprotocol/clientCapabilities"
_META_LOGLEVEL = "io.modelcontextprotocol/logLevel"
_META_SERVERINFO = "io.modelcontextprotocol/serverInfo"
_META_SUBSCRIPTION = "io.modelcontextprotocol/subscriptionId"
_TASKS_EXTENSION = "io.modelcontextprotocol/tasks"

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
RESOURCE_NOT_FOUND = -32002  # legacy revisions only
REQUEST_CANCELLED = -32800  # (as LSP numbers it) the answer to a cancelled request that must get one
HEADER_MISMATCH = -32020
MISSING_CAPABILITY = -32021
UNSUPPORTED_VERSION = -32022

_LOG_LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")
_LOG_RANK = {name: i for i, name in enumerate(_LOG_LEVELS)}

log = logging.getLogger("mcp_server")


class RpcError(Exception):
    """A JSON-RPC error: raise it from a tool, resource or prompt to answer with a protocol error
    (``code``, ``message``, ``data``) instead of a result.  ``status`` is the HTTP status to use."""

    def __init__(self, code: int, message: str, data: typing.Any = None, status: int = 200):
        super().__init__(message)
        self.code, self.message, self.data, self.status = code, message, data, status

    def to_dict(self) -> dict:
        err = {"code": self.code, "message": self.message}
        if self.data is not None:
            err["data"] = self.data
        return err


class ToolError(Exception):
    """Raise from a tool to end the call with ``isError: true`` and this message for the model."""


class _Cancelled(Exception):
    """The client cancelled this request: the transport sends nothing more for it."""


# What each feature that needs an optional package imports, and how a person would name it.
_FEATURE_MODULES = {
    "redis": ("redis.asyncio", "The Redis store (REDIS_URL)"),
    "tokens": ("jwt", "OAuth (MCP_AUTH=builtin or external; --no-auth turns it off)"),
    "sealing": ("cryptography.hazmat.primitives.ciphers.aead",
                "Sealed state (2026-07-28 input rounds, the OAuth consent page)"),
    "vault": ("cryptography.hazmat.primitives.ciphers.aead",
              "The credential vault (the upstream login, enc: settings)"),
    "jwks": ("cryptography.hazmat.primitives.asymmetric.rsa",
             "Checking tokens against MCP_AUTH_JWKS_URL (RS256, ES256, PS256, EdDSA)"),
}
_PIP_NAMES = {"redis": "redis", "jwt": "pyjwt", "cryptography": "cryptography"}


class _MissingPackage(ToolError, RpcError):
    """A feature's package is missing: a tool error inside a tool call, a JSON-RPC error
    (-32603 with this message; HTTP 503, as for a store that is down) for any other request."""

    def __init__(self, message: str):
        RpcError.__init__(self, INTERNAL_ERROR, message, status=503)


def _require(feature: str) -> types.ModuleType:
    """The module ``feature`` needs (``_FEATURE_MODULES``), imported; or ``_MissingPackage``
    naming the package to install."""
    module, what = _FEATURE_MODULES[feature]
    loaded = sys.modules.get(module)
    if loaded is not None:
        return loaded
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.partition(".")[0]
        absent = isinstance(exc, ModuleNotFoundError) and (exc.name or "").partition(".")[0] == top
        problem = "is not installed" if absent else f"does not load ({exc})"
        raise _MissingPackage(f"{what} needs the Python package {_PIP_NAMES[top]}, which {problem}; "
                              "install the server's packages with: pip install -r requirements.txt") from None


# What the code behind a request (a tool, a handler) may raise that must end only that request:
# every Exception, and the two BaseExceptions code raises on purpose (a tool calling sys.exit(),
# or raising KeyboardInterrupt).  The servers stop on signals through their own handlers, so a
# KeyboardInterrupt inside a request is never the user's Ctrl-C.  (Not CancelledError or
# GeneratorExit: they are how asyncio and Python end a coroutine.)
_REQUEST_ERRORS = (Exception, SystemExit, KeyboardInterrupt)


def _error_id() -> str:
    """Names one unexpected failure in the log and in what the client is told, so the two can be
    matched; 12 hex digits (secrets, not uuid: importing uuid lengthens a cold start)."""
    return secrets.token_hex(6)


def _invalid_params(message: str, data: typing.Any = None, status: int = 200) -> RpcError:
    return RpcError(INVALID_PARAMS, message, data, status)


def _unsupported_version(requested: typing.Any) -> RpcError:
    return RpcError(
        UNSUPPORTED_VERSION,
        f"Unsupported protocol version {requested!r}; this server speaks {', '.join(SUPPORTED_VERSIONS)}.",
        {"supported": list(SUPPORTED_VERSIONS), "requested": requested},
        400,
    )


def _missing_capability(capabilities: dict, what: str) -> RpcError:
    return RpcError(
        MISSING_CAPABILITY,
        f"This request needs the client capability {what}, which the request did not declare.",
        {"requiredCapabilities": capabilities},
        400,
    )


_UPSTREAM_PROVIDERS = ("oauth2", "oidc", "kite", "sandbox", "sandbox-kite")


def _truthy(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected a boolean (true/false), got {text!r}")


def _csv(text: str) -> tuple:
    return tuple(item.strip() for item in text.split(",") if item.strip())


# attribute, flag, environment names (first is canonical; later ones are the seed's names),
# parser, default, help.  A flag of None means "environment only".
_SETTING_SPECS = (
    ("host", "--host", ("MCP_HOST", "MASK_MCP_HOST"), str, "127.0.0.1", "interface to listen on"),
    ("port", "--port", ("MCP_PORT", "MASK_MCP_PORT"), int, 6901, "TCP port to listen on"),
    ("stdio", "--stdio", ("MCP_STDIO",), _truthy, False, "serve MCP on stdin/stdout instead of HTTP"),
    ("log_level", "--log-level", ("LOG_LEVEL", "MCP_LOG_LEVEL"), str, "info",
     "log threshold on stderr: debug, info, warning, error"),
    ("log_format", "--log-format", ("LOG_FORMAT", "MCP_LOG_FORMAT"), str, "auto",
     "log lines: json (one object per line), text, or auto (text on a terminal, else json)"),
    ("log_file", None, ("LOG_FILE",), str, "", "also append the log lines to this file"),
    ("access_log", None, ("MCP_ACCESS_LOG",), _truthy, True, "log one line per HTTP request"),
    ("metrics_token", None, ("MCP_METRICS_TOKEN",), str, "",
     "serve /metrics to requests bearing this token (\"public\": to anyone; unset: not served)"),
    ("rate_limit", None, ("MCP_RATE_LIMIT",), int, 0,
     "MCP requests per minute per client IP and per session, in the store (0: no limit)"),
    ("response_mode", "--response-mode", ("MCP_RESPONSE_MODE",), str, "auto",
     "POST answers: auto (JSON unless the request streams), json, or sse"),
    ("mcp_path", "--path", ("MCP_PATH",), str, "/mcp", "path of the Streamable HTTP endpoint"),
    ("allowed_origins", "--allowed-origins", ("MCP_ALLOWED_ORIGINS",), _csv, (),
     "comma-separated browser origins allowed besides loopback ones (* allows any)"),
    ("allowed_hosts", "--allowed-hosts", ("MCP_ALLOWED_HOSTS",), _csv, (),
     "comma-separated Host header values allowed besides loopback ones (* allows any)"),
    ("trusted_proxies", "--trusted-proxies", ("MCP_TRUSTED_PROXIES",), _csv, (),
     "comma-separated peer addresses whose X-Forwarded-* headers are believed"),
    ("max_body", "--max-body", ("MCP_MAX_BODY",), int, 4 * 1024 * 1024, "largest request body in bytes"),
    ("max_json_depth", None, ("MCP_MAX_JSON_DEPTH",), int, 64,
     "deepest nesting of arrays and objects in JSON the server reads (deeper: a parse error)"),
    ("max_header", None, ("MCP_MAX_HEADER",), int, 16 * 1024, "largest request head (line + headers) in bytes"),
    ("header_timeout", None, ("MCP_HEADER_TIMEOUT",), float, 10.0, "seconds to receive a request head"),
    ("body_timeout", None, ("MCP_BODY_TIMEOUT",), float, 30.0, "seconds to receive a request body"),
    ("idle_timeout", None, ("MCP_IDLE_TIMEOUT",), float, 30.0, "seconds a keep-alive connection may idle"),
    ("max_connections", None, ("MCP_MAX_CONNECTIONS",), int, 10000, "open connections at most"),
    ("max_connections_per_address", None, ("MCP_MAX_CONNECTIONS_PER_ADDRESS",), int, 1000,
     "open connections from one client address at most (trusted proxies are exempt; 0: no limit)"),
    ("busy_poll_us", None, ("MCP_BUSY_POLL_US",), int, 0,
     "µs the HTTP server polls for the next request before it sleeps, after a short wait (0: never, "
     "the default; it spends CPU to answer a client that sends one request at a time sooner)"),
    ("drain_seconds", None, ("MCP_DRAIN_SECONDS",), float, 5.0,
     "on SIGTERM, seconds /readyz answers 503 while the instance still serves, so balancers stop "
     "sending it new work before it stops accepting (0: no wait)"),
    ("drain_grace", None, ("MCP_DRAIN_GRACE",), float, 20.0,
     "then, seconds requests in flight may take to finish before their connections are cut"),
    ("session_ttl", "--session-ttl", ("SESSION_TTL", "MCP_SESSION_TTL"), int, 3600,
     "seconds a session lives after its last activity"),
    ("max_sessions", None, ("MCP_MAX_SESSIONS",), int, 100000,
     "sessions the in-memory store keeps before evicting the least recently used (authorization "
     "state has a budget of its own and is never evicted for sessions)"),
    ("max_sessions_per_principal", None, ("MCP_MAX_SESSIONS_PER_PRINCIPAL",), int, 100,
     "live MCP sessions one token's principal may hold, across instances (0: no limit)"),
    ("max_sessions_per_address", None, ("MCP_MAX_SESSIONS_PER_ADDRESS",), int, 1000,
     "live MCP sessions one client address may hold, across instances (0: no limit)"),
    ("max_streams_per_principal", None, ("MCP_MAX_STREAMS_PER_PRINCIPAL",), int, 20,
     "open GET /mcp and /sse streams one principal may hold on an instance (0: no limit)"),
    ("max_streams_per_address", None, ("MCP_MAX_STREAMS_PER_ADDRESS",), int, 200,
     "open GET /mcp and /sse streams one client address may hold on an instance (0: no limit)"),
    ("max_tasks_per_principal", None, ("MCP_MAX_TASKS_PER_PRINCIPAL",), int, 100,
     "tasks (tasks extension) one principal may have running on an instance (0: no limit)"),
    ("stream_buffer", None, ("MCP_STREAM_BUFFER",), int, 256,
     "messages a stream may hold for a client that reads too slowly; past it the stream ends "
     "(a resumable one is resumed from its log with Last-Event-ID)"),
    ("tool_threads", None, ("MCP_TOOL_THREADS",), int, 40,
     "worker threads sync tools, resources and prompts may occupy at once (the rest wait)"),
    ("sse_keepalive", None, ("MCP_SSE_KEEPALIVE",), float, 15.0, "seconds between SSE keep-alive comments"),
    ("sse_retry_ms", None, ("MCP_SSE_RETRY_MS",), int, 1000, "SSE retry hint for 2025-11-25 clients, in ms"),
    ("replay_events", None, ("MCP_REPLAY_EVENTS",), int, 256, "events kept per stream for Last-Event-ID resume"),
    ("tool_timeout", None, ("MCP_TOOL_TIMEOUT",), float, 300.0, "seconds a tool may run (0: no limit)"),
    ("client_timeout", None, ("MCP_CLIENT_TIMEOUT",), float, 300.0,
     "seconds to wait for a client's answer to a server request"),
    ("page_size", None, ("MCP_PAGE_SIZE",), int, 200, "items per page of tools/prompts/resources lists"),
    ("secret", None, ("MCP_SECRET",), str, "",
     "server secret for sealed state and signatures (32+ random characters; needed with Redis)"),
    ("dev", "--dev", ("MCP_DEV",), _truthy, False,
     "development mode: accept short or placeholder secrets (never in production)"),
    ("auth", None, ("MCP_AUTH",), str, "builtin",
     "who issues the bearer tokens HTTP requests need: builtin, external, or none"),
    ("no_auth", "--no-auth", ("MCP_NO_AUTH",), _truthy, False,
     "turn bearer-token checks off (local development; same as MCP_AUTH=none)"),
    ("public_url", "--public-url", ("MCP_PUBLIC_URL",), str, "",
     "the server's external base URL (e.g. https://mcp.example.com); default: from each request"),
    ("consent", None, ("MCP_CONSENT",), str, "remember",
     "consent page at /authorize: always, remember (a signed cookie skips it), or never"),
    ("scopes", None, ("MCP_SCOPES",), _csv, ("mcp",), "scopes this server grants"),
    ("token_ttl", None, ("MCP_TOKEN_TTL",), int, 3600, "access-token lifetime in seconds"),
    ("refresh_ttl", None, ("MCP_REFRESH_TTL",), int, 30 * 86400, "refresh-token lifetime in seconds"),
    ("client_ttl", None, ("MCP_CLIENT_TTL",), int, 30 * 86400,
     "seconds a dynamically registered client lives after its last use"),
    ("registrations_per_hour", None, ("MCP_REGISTRATIONS_PER_HOUR",), int, 20,
     "client registrations per hour per client IP, in the store (0: no limit)"),
    ("token_parameter", None, ("TOKEN_PARAMETER",), str, "",
     "the seed's HS256 token-signing key, used as is when set"),
    ("previous_secret", None, ("MCP_PREVIOUS_SECRET",), str, "",
     "the secret before a rotation: its tokens stay valid until they expire"),
    ("auth_issuer", None, ("MCP_AUTH_ISSUER",), str, "", "external mode: the issuer tokens must name"),
    ("auth_jwks_url", None, ("MCP_AUTH_JWKS_URL",), str, "", "external mode: the issuer's JWKS URL"),
    ("auth_secret", None, ("MCP_AUTH_SECRET",), str, "", "external mode: a shared HS256 secret instead of JWKS"),
    ("auth_audience", None, ("MCP_AUTH_AUDIENCE",), str, "",
     "external mode: the audience tokens must name (default: the resource URIs under MCP_PUBLIC_URL)"),
    ("allow_private_fetch", None, ("MCP_ALLOW_PRIVATE_FETCH",), _truthy, False,
     "let client metadata documents be fetched from private/loopback addresses and http (tests only)"),
    ("client_fetch_timeout", None, ("MCP_CLIENT_FETCH_TIMEOUT",), float, 5.0,
     "seconds a client metadata document fetch may take in all"),
    ("auth_rate_limit", None, ("MCP_AUTH_RATE_LIMIT",), int, 60,
     "requests per minute per client IP to /authorize, /token, /register and /revoke (0: no limit)"),
    ("upstream_provider", None, ("UPSTREAM_PROVIDER",), str, "",
     "login: oauth2, oidc, kite, sandbox or sandbox-kite (unset: oidc with UPSTREAM_ISSUER, oauth2 with "
     "UPSTREAM_AUTHORIZE_URL, else sandbox)"),
    ("upstream_issuer", None, ("UPSTREAM_ISSUER",), str, "",
     "login (oidc): the issuer whose discovery document gives the endpoints and keys"),
    ("upstream_authorize_url", None, ("UPSTREAM_AUTHORIZE_URL",), str, "",
     "login: the upstream provider's OAuth authorize URL (unset: the built-in sandbox provider)"),
    ("upstream_token_url", None, ("UPSTREAM_TOKEN_URL",), str, "", "login: the provider's token URL"),
    ("upstream_revoke_url", None, ("UPSTREAM_REVOKE_URL",), str, "", "login: the provider's revocation URL"),
    ("upstream_client_id", None, ("UPSTREAM_CLIENT_ID",), str, "", "login: this server's client id there"),
    ("upstream_client_secret", None, ("UPSTREAM_CLIENT_SECRET",), str, "",
     "login: this server's client secret there (may be enc:...)"),
    ("upstream_scopes", None, ("UPSTREAM_SCOPES",), str, "", "login: scopes to ask the provider for"),
    ("upstream_api_base", None, ("UPSTREAM_API_BASE",), str, "", "login: base URL of the provider's API"),
    ("upstream_trading", None, ("UPSTREAM_TRADING",), _truthy, False,
     "login: add place_order and cancel_order (each call asks the user to confirm)"),
    ("service_paths", None, ("SERVICE_PATHS",), _csv, ("profile", "holdings", "positions", "orders"),
     "API paths the service tool may call (GET), relative to UPSTREAM_API_BASE"),
    ("mask_fields", None, ("MASK_FIELDS",), _csv, (),
     "more field names to mask in login tools' results, in any spelling (added to the built-in patterns)"),
    ("encryption_key", None, ("ENCRYPTION_KEY",), str, "",
     "32-byte key (base64 or hex) for credentials at rest and enc: settings"),
    ("previous_encryption_keys", None, ("ENCRYPTION_KEY_PREVIOUS",), _csv, (),
     "older ENCRYPTION_KEY values, still accepted for decryption"),
    ("encryption_iv", None, ("ENCRYPTION_IV",), str, "", "the seed's fixed IV: accepted and ignored"),
    ("redis_url", "--redis-url", ("REDIS_URL", "MCP_REDIS_URL"), str, "",
     "keep state in Redis (redis://, rediss://, unix://, or redis+sentinel://host:26379,host2:26379/"
     "service_name/db for a primary found by Redis Sentinel); the seed's REDIS_HOST/REDIS_PORT/REDIS_P/"
     "REDIS_DB work too"),
    ("redis_cluster", None, ("REDIS_CLUSTER",), _truthy, False, "the Redis URL points at a Redis Cluster"),
    ("store_timeout", None, ("MCP_STORE_TIMEOUT",), float, 2.0,
     "seconds a store operation may take before the request fails with 503"),
    ("session_cache", None, ("MCP_SESSION_CACHE",), float, 5.0,
     "with Redis: seconds an instance may answer from its copy of a session (changes and ends "
     "reach every instance at once over pub/sub; this bounds staleness if pub/sub breaks; 0: "
     "read Redis on every request)"),
    ("workers", "--workers", ("MCP_WORKERS",), int, 1,
     "HTTP worker processes sharing the port (needs Redis when more than 1)"),
    ("expose_errors", None, ("MCP_EXPOSE_ERRORS",), _truthy, False,
     "show exception details of failing tools to the client (development only)"),
    ("app_version", None, ("APP_VERSION",), str, "", "version reported by the built-in server"),
)


@dataclasses.dataclass
class Settings:
    """Every knob of the server.  Build with ``Settings.load(argv)`` or set fields directly."""

    host: str = "127.0.0.1"
    port: int = 6901
    stdio: bool = False
    log_level: str = "info"
    log_format: str = "auto"
    log_file: str = ""
    access_log: bool = True
    metrics_token: str = ""
    rate_limit: int = 0
    response_mode: str = "auto"
    mcp_path: str = "/mcp"
    allowed_origins: tuple = ()
    allowed_hosts: tuple = ()
    trusted_proxies: tuple = ()
    max_body: int = 4 * 1024 * 1024
    max_json_depth: int = 64
    max_header: int = 16 * 1024
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    idle_timeout: float = 30.0
    max_connections: int = 10000
    max_connections_per_address: int = 1000
    busy_poll_us: int = 0
    drain_seconds: float = 5.0
    drain_grace: float = 20.0
    session_ttl: int = 3600
    max_sessions: int = 100000
    max_sessions_per_principal: int = 100
    max_sessions_per_address: int = 1000
    max_streams_per_principal: int = 20
    max_streams_per_address: int = 200
    max_tasks_per_principal: int = 100
    stream_buffer: int = 256
    tool_threads: int = 40
    sse_keepalive: float = 15.0
    sse_retry_ms: int = 1000
    replay_events: int = 256
    tool_timeout: float = 300.0
    client_timeout: float = 300.0
    page_size: int = 200
    secret: str = ""
    dev: bool = False
    auth: str = "builtin"
    no_auth: bool = False
    public_url: str = ""
    consent: str = "remember"
    scopes: tuple = ("mcp",)
    token_ttl: int = 3600
    refresh_ttl: int = 30 * 86400
    client_ttl: int = 30 * 86400
    registrations_per_hour: int = 20
    token_parameter: str = ""
    previous_secret: str = ""
    auth_issuer: str = ""
    auth_jwks_url: str = ""
    auth_secret: str = ""
    auth_audience: str = ""
    allow_private_fetch: bool = False
    client_fetch_timeout: float = 5.0
    auth_rate_limit: int = 60
    upstream_provider: str = ""
    upstream_issuer: str = ""
    upstream_authorize_url: str = ""
    upstream_token_url: str = ""
    upstream_revoke_url: str = ""
    upstream_client_id: str = ""
    upstream_client_secret: str = ""
    upstream_scopes: str = ""
    upstream_api_base: str = ""
    upstream_trading: bool = False
    service_paths: tuple = ("profile", "holdings", "positions", "orders")
    mask_fields: tuple = ()
    encryption_key: str = ""
    previous_encryption_keys: tuple = ()
    encryption_iv: str = ""
    redis_url: str = ""
    redis_cluster: bool = False
    store_timeout: float = 2.0
    session_cache: float = 5.0
    workers: int = 1
    expose_errors: bool = False
    app_version: str = ""

    @classmethod
    def load(cls, argv: list | None = None, environ: typing.Mapping | None = None,
             prog: str = "mcp_server.py", defaults: "Settings | None" = None) -> "Settings":
        """Defaults (``defaults``, e.g. what the code set) < ``.env`` < environment < flags.
        Raises ``SystemExit`` with one line on bad input.  The ``.env`` read is the one in the
        working directory; ``dotenv_file`` names it (``serve`` logs which, never its values)."""
        dotenv = dict(_read_dotenv(".env"))
        env = dict(dotenv)
        env.update(os.environ if environ is None else environ)
        values = dataclasses.asdict(defaults) if defaults is not None else {}
        for attr, _flag, names, parse, _default, _help in _SETTING_SPECS:
            for name in names:
                if env.get(name, "") != "":
                    try:
                        values[attr] = parse(env[name])
                    except ValueError as exc:
                        raise SystemExit(f"{prog}: error: {name}={env[name]!r}: {exc}") from None
                    break
        if not values.get("redis_url") and env.get("REDIS_HOST"):
            values["redis_url"] = _redis_url_from_parts(env)
        args = _argument_parser(prog).parse_args([] if argv is None else argv)
        for attr, flag, *_ in _SETTING_SPECS:
            if flag and getattr(args, attr, None) is not None:
                values[attr] = getattr(args, attr)
        encrypted = [a for a, v in values.items() if isinstance(v, str) and v.startswith("enc:")]
        if encrypted:
            if not values.get("encryption_key") or values["encryption_key"].startswith("enc:"):
                raise SystemExit(f"{prog}: error: {', '.join(encrypted)} is encrypted (enc:...) but "
                                 "ENCRYPTION_KEY is not set")
            try:
                vault = _Vault(values["encryption_key"], values.get("previous_encryption_keys", ()))
            except (ValueError, _MissingPackage) as exc:
                raise SystemExit(f"{prog}: error: {exc}") from None
            for attr in encrypted:
                values[attr] = _decrypt_setting(vault, _setting_name(attr), values[attr][4:], prog)
        settings = cls(**values)
        settings.dotenv_file = os.path.abspath(".env") if os.path.isfile(".env") else ""
        settings.dotenv_names = sorted(dotenv)
        settings.validate(prog)
        return settings

    def validate(self, prog: str = "mcp_server.py") -> None:
        """Refuse a configuration that cannot work (SystemExit naming the setting), then
        normalize what has one spelling (paths, URLs, --no-auth)."""
        if self.no_auth:
            self.auth = "none"
        for problems in (self._format_problems, self._auth_problems, self._upstream_problems,
                         self._store_problems, self._limit_problems):
            problem = next(problems(), None)
            if problem:
                raise SystemExit(f"{prog}: error: {problem}")
        self.public_url = self.public_url.rstrip("/")
        self.mcp_path = self.mcp_path.rstrip("/") or "/mcp"
        self.check_secrets(prog)

    def _format_problems(self) -> typing.Iterator[str]:
        if not 0 <= self.port <= 65535:
            yield f"port {self.port} is not between 0 and 65535"
        if self.log_format not in ("auto", "json", "text"):
            yield f"log format {self.log_format!r} is not auto, json or text"
        if self.response_mode not in ("auto", "json", "sse"):
            yield f"response mode {self.response_mode!r} is not auto, json or sse"
        if self.log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
            yield f"log level {self.log_level!r} is not debug, info, warning, error or critical"
        if not self.mcp_path.startswith("/"):
            yield f"path {self.mcp_path!r} must start with /"
        if self.public_url and not self.public_url.startswith(("http://", "https://")):
            yield f"MCP_PUBLIC_URL {self.public_url!r} must start with http:// or https://"

    def _auth_problems(self) -> typing.Iterator[str]:
        external = self.auth == "external"
        if self.auth not in ("builtin", "external", "none"):
            yield f"MCP_AUTH={self.auth!r} is not builtin, external or none"
        if external and not self.auth_issuer:
            yield "MCP_AUTH=external needs MCP_AUTH_ISSUER (and MCP_AUTH_JWKS_URL or MCP_AUTH_SECRET)"
        if external and not (self.auth_jwks_url or self.auth_secret):
            yield "MCP_AUTH=external needs MCP_AUTH_JWKS_URL or MCP_AUTH_SECRET to verify tokens"
        # The audience says which server a token is for; taken from the request's Host it would be
        # whatever the bearer of a token minted for another server claims this one is called.
        if external and not (self.public_url or self.auth_audience):
            yield ("MCP_AUTH=external needs MCP_PUBLIC_URL (or MCP_AUTH_AUDIENCE): the audience tokens must "
                   "name cannot come from the request's Host header")
        if external and self.auth_secret and len(self.auth_secret.encode()) < 32:
            yield "MCP_AUTH_SECRET must be at least 32 bytes (RFC 7518 3.2: an HS256 key is 256 bits or more)"
        if self.consent not in ("always", "remember", "never"):
            yield f"MCP_CONSENT={self.consent!r} is not always, remember or never"

    def _upstream_problems(self) -> typing.Iterator[str]:
        provider = self.upstream_provider
        if provider not in ("", *_UPSTREAM_PROVIDERS):
            yield f"UPSTREAM_PROVIDER={provider!r} is not {', '.join(_UPSTREAM_PROVIDERS)}"
        if (provider == "oidc" or self.upstream_issuer) and not (self.upstream_issuer and self.upstream_client_id):
            yield "UPSTREAM_PROVIDER=oidc needs UPSTREAM_ISSUER and UPSTREAM_CLIENT_ID"
        if provider == "kite" and not (self.upstream_client_id and self.upstream_client_secret):
            yield ("UPSTREAM_PROVIDER=kite needs UPSTREAM_CLIENT_ID (the api_key) and UPSTREAM_CLIENT_SECRET "
                   "(the api_secret)")
        if provider == "oauth2" and not (self.upstream_authorize_url and self.upstream_token_url):
            yield "UPSTREAM_PROVIDER=oauth2 needs UPSTREAM_AUTHORIZE_URL and UPSTREAM_TOKEN_URL"

    def _store_problems(self) -> typing.Iterator[str]:
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://", _SENTINEL_SCHEME)):
            yield (f"the Redis URL must start with redis://, rediss://, unix:// or {_SENTINEL_SCHEME} "
                   f"(got {_redact_url(self.redis_url)!r})")
        if self.redis_url.startswith(_SENTINEL_SCHEME):
            try:
                _sentinel_parts(self.redis_url)
            except ValueError as exc:
                yield f"the Redis Sentinel URL {_redact_url(self.redis_url)!r} is not usable: {exc}"
            if self.redis_cluster:
                yield "REDIS_CLUSTER and a redis+sentinel:// URL exclude each other: a cluster has no sentinels"
        if self.workers > 1 and not self.redis_url:
            yield "--workers above 1 needs Redis (REDIS_URL): separate processes cannot share sessions kept in memory"
        if self.workers > 1 and self.stdio:
            yield "--workers applies to HTTP, not --stdio"

    def _limit_problems(self) -> typing.Iterator[str]:
        if self.session_cache < 0:
            yield "session_cache must be 0 or more"
        if self.drain_seconds < 0 or self.drain_grace < 0:
            yield "MCP_DRAIN_SECONDS and MCP_DRAIN_GRACE must be 0 or more"
        if not 0 <= self.busy_poll_us <= 10000:
            yield f"MCP_BUSY_POLL_US={self.busy_poll_us} is not between 0 and 10000"
        if not 0 < self.max_json_depth <= _STORED_JSON_DEPTH:  # (deeper, the parser's recursion nears its limit)
            yield f"MCP_MAX_JSON_DEPTH={self.max_json_depth} is not between 1 and {_STORED_JSON_DEPTH}"
        for attr in ("max_body", "max_header", "max_connections", "session_ttl", "max_sessions",
                     "page_size", "replay_events", "workers", "store_timeout", "stream_buffer", "tool_threads"):
            if getattr(self, attr) <= 0:
                yield f"{attr} must be positive"
        if self.client_ttl <= 0 or self.client_fetch_timeout <= 0:
            yield "client_ttl and client_fetch_timeout must be positive"
        for attr in ("max_connections_per_address", "max_sessions_per_principal", "max_sessions_per_address",
                     "max_streams_per_principal", "max_streams_per_address", "max_tasks_per_principal"):
            if getattr(self, attr) < 0:
                yield f"{attr} must be 0 (no limit) or more"

    def check_secrets(self, prog: str = "mcp_server.py", shared_store: bool = False) -> None:
        """Refuse, before anything is served, every key and secret that would fail or be weak in
        use: a key that does not parse (else the first login would fail), a short or placeholder
        secret outside MCP_DEV, and a shared store without a secret of the operator's (the
        server would otherwise have to keep its own secret in the store, where a copy of the
        store is enough to mint tokens).  Messages name the setting, never its value."""
        def fail(message):
            raise SystemExit(f"{prog}: error: {message}")
        keys = [("ENCRYPTION_KEY", self.encryption_key)]
        keys += [("ENCRYPTION_KEY_PREVIOUS", value) for value in self.previous_encryption_keys]
        for name, value in keys:
            if value:
                try:
                    _parse_key(value, name)
                except ValueError as exc:
                    fail(str(exc))
        if not self.dev:
            for name, value in (("MCP_SECRET", self.secret), ("MCP_PREVIOUS_SECRET", self.previous_secret),
                                ("TOKEN_PARAMETER", self.token_parameter), ("MCP_AUTH_SECRET", self.auth_secret)):
                problem = _secret_problem(value) if value else None
                if problem:
                    fail(f"{name} {problem} (make one: python -c \"import secrets;print(secrets.token_urlsafe(32))\"; "
                         "MCP_DEV=1 accepts it for local development)")
        if (self.redis_url or shared_store) and not (self.secret or self.token_parameter):
            fail("REDIS_URL needs MCP_SECRET: every instance must share one secret, and keeping a generated "
                 "one in Redis would let anyone with a copy of Redis mint tokens "
                 "(make one: python -c \"import secrets;print(secrets.token_urlsafe(32))\")")


# Secrets of the documentation and of habit: refused outside MCP_DEV whatever their length.
_PLACEHOLDER_SECRET = re.compile(r"change[-_ ]?me|replace[-_ ]?me|your[-_ ]|not[-_ ]?for[-_ ]?prod|demo|example|"
                                 r"placeholder|<|\.\.\.", re.IGNORECASE)


def _secret_problem(value: str) -> str | None:
    """Why ``value`` is too weak to sign or seal with, or None."""
    if _PLACEHOLDER_SECRET.search(value):
        return "is a placeholder, not a secret"
    if len(value) < 32:
        return f"is {len(value)} characters long; a secret needs at least 32 random ones"
    if len(set(value)) < 10:
        return "repeats too few characters to be random"
    return None


def _parse_key(text: str, name: str = "ENCRYPTION_KEY") -> bytes:
    """A 32-byte key given as hex (64 characters) or base64 (standard or URL-safe); ValueError
    naming the setting otherwise (never a SystemExit: this also runs inside requests)."""
    text = text.strip()
    try:
        if re.fullmatch(r"[0-9a-fA-F]{64}", text):
            return bytes.fromhex(text)
        raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_" if ("-" in text or "_" in text) else None,
                               validate=True)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ValueError(f"{name} must be 32 bytes, as 64 hex digits or base64 "
                         "(make one: python -c \"import secrets;print(secrets.token_hex(32))\")")
    return raw


def _setting_name(attr: str) -> str:
    """The canonical environment name of a setting."""
    return next(names[0] for a, _flag, names, *_ in _SETTING_SPECS if a == attr)


def _setting_ad(name: str) -> bytes:
    """The associated data of an ``enc:`` value: its setting's name, so that a value encrypted for
    one setting cannot be moved into another (the model of ``python mcp_server.py encrypt``)."""
    return b"mcp_server/v1 setting " + name.encode()


def _decrypt_setting(vault, name: str, token: str, prog: str) -> str:
    plain = vault.decrypt(token, _setting_ad(name))
    if plain is not None:
        return plain
    if vault.decrypt(token, b"config") is not None:  # made by a version that bound no setting name
        raise SystemExit(f"{prog}: error: the encrypted value of {name} was made for no particular setting "
                         f"(an older version); encrypt it again: python mcp_server.py encrypt --setting {name} -")
    raise SystemExit(f"{prog}: error: the encrypted value of {name} does not decrypt with ENCRYPTION_KEY "
                     "(wrong key, made for another setting, or altered)")


def _redis_url_from_parts(env: typing.Mapping) -> str:
    """The seed's REDIS_HOST / REDIS_PORT / REDIS_P (password) / REDIS_DB as one URL."""
    password = env.get("REDIS_P", "")
    auth = f":{urllib.parse.quote(password, safe='')}@" if password else ""
    return f"redis://{auth}{env['REDIS_HOST']}:{env.get('REDIS_PORT') or 6379}/{env.get('REDIS_DB') or 0}"


_SENTINEL_SCHEME = "redis+sentinel://"


def _sentinel_parts(url: str) -> dict:
    """What ``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]
    [?sentinel_password=...]`` names: the sentinels (port 26379 by default), the service, the
    db, and the credentials of the data nodes (``sentinel_password``: the sentinels' own, when
    they ask for one).  ValueError says what is wrong with it."""
    parts = urllib.parse.urlsplit(url)
    sentinels = []
    for item in parts.netloc.rpartition("@")[2].split(","):
        node = urllib.parse.urlsplit("//" + item.strip())
        if not node.hostname:
            raise ValueError(f"sentinel address {item!r} has no host")
        sentinels.append((node.hostname, node.port or 26379))
    path = [urllib.parse.unquote(p) for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError("it must name the service, and may name a db: "
                         "redis+sentinel://host1:26379,host2:26379/service_name/0")
    query = dict(urllib.parse.parse_qsl(parts.query))
    unquote = urllib.parse.unquote
    return {"sentinels": sentinels, "service": path[0], "db": int(path[1]) if len(path) == 2 else 0,
            "username": unquote(parts.username) if parts.username else None,
            "password": unquote(parts.password) if parts.password else None,
            "sentinel_password": query.get("sentinel_password") or None}


def _redact_url(url: str) -> str:
    """A URL fit for logs: any password replaced by ***."""
    parts = original = urllib.parse.urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(":" + parts.password + "@", ":***@")
    else:
        netloc = parts.netloc
    query = re.sub(r"(password=)[^&]*", r"\1***", parts.query)  # a sentinel's (_sentinel_parts)
    if (netloc, query) == (original.netloc, original.query):
        return url
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _read_dotenv(path: str) -> typing.Iterator[tuple]:
    """KEY=VALUE lines of a .env file; comments, ``export`` and simple quotes allowed."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.strip().removeprefix("export ").strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        yield key, value


class _OneLineArgumentParser:
    """argparse, but a bad flag ends the program with one line instead of usage + error."""

    def __new__(cls, prog: str):
        import argparse

        class Parser(argparse.ArgumentParser):
            def error(self, message):
                raise SystemExit(f"{self.prog}: error: {message} (see --help)")

        return Parser(prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter)


def _argument_parser(prog: str):
    parser = _OneLineArgumentParser(prog)
    parser.description = "A Model Context Protocol server (every revision; HTTP or stdio)."
    lines = ["settings read only from the environment (or a .env file):"]
    for attr, flag, names, parse, default, help_text in _SETTING_SPECS:
        env_note = "env " + " / ".join(names)
        if flag is None:
            lines.append(f"  {names[0]:<22} {help_text} (default {default!r})")
        elif parse is _truthy:
            parser.add_argument(flag, dest=attr, action="store_const", const=True, default=None,
                                help=f"{help_text} [{env_note}]")
        else:
            metavar = attr.upper()
            kind = parse if parse in (int, float) else (_csv if parse is _csv else str)
            parser.add_argument(flag, dest=attr, type=kind, default=None, metavar=metavar,
                                help=f"{help_text} (default {default!r}) [{env_note}]")
    parser.epilog = "\n".join(lines)
    return parser


_request_id: contextvars.ContextVar = contextvars.ContextVar("mcp_request_id", default=None)
_trace_id: contextvars.ContextVar = contextvars.ContextVar("mcp_trace_id", default=None)


def _log_fields(extra: dict | None) -> dict:
    """A log line's fields: the request's id and trace id (when it has them), then ``extra``."""
    fields = {}
    request_id, trace_id = _request_id.get(), _trace_id.get()
    if request_id:
        fields["request_id"] = request_id
    if trace_id:
        fields["trace_id"] = trace_id
    if extra:
        fields.update(extra)
    return fields


class _LineFormatter(logging.Formatter):
    """What both log formats share: ``line()`` makes a line from its parts, for a LogRecord
    (``format``) and for ``_log_access``, which has no record.  Stamps are to the second as
    ``SECOND_FORMAT`` says, in ``CLOCK``'s time zone; the last second's text is kept (the access
    log writes a line a request, and formatting each stamp anew was a measurable part of it)."""

    SECOND_FORMAT, CLOCK = "%H:%M:%S", time.localtime
    _second: tuple = (None, "")  # (a second since the epoch, its text); one tuple, so threads agree

    def stamp(self, created: float) -> str:
        second = int(created)
        cached_second, text = self._second
        if cached_second != second:
            text = time.strftime(self.SECOND_FORMAT, self.CLOCK(second))
            self._second = (second, text)
        return text

    def format(self, record) -> str:
        return self.line(record.created, record.levelname.lower(), record.getMessage(),
                         _log_fields(getattr(record, "fields", None)),
                         self.formatException(record.exc_info) if record.exc_info else None)

    def line(self, created: float, level: str, event: str, fields: dict, error: str | None = None) -> str:
        raise NotImplementedError

    def access_line(self, created: float, values: tuple) -> str:
        """The access log's line for ``values`` (``_ACCESS_FIELDS``, in that order)."""
        return self.line(created, "info", "request", _log_fields(dict(zip(_ACCESS_FIELDS, values))))


_ACCESS_FIELDS = ("method", "route", "status", "duration_ms", "session", "client")


class _JsonFormatter(_LineFormatter):
    """One JSON object per line: time, level, event, the request's id, and the record's fields."""

    SECOND_FORMAT, CLOCK = "%Y-%m-%dT%H:%M:%S", time.gmtime

    def head(self, created: float, level: str, event: str) -> str:
        """The line up to its fields, without the closing brace."""
        return (f'{{"time":"{self.stamp(created)}.{int(created % 1 * 1000):03d}Z","level":{_json_string(level)},'
                f'"event":{_json_string(event)}')

    def line(self, created, level, event, fields, error=None):
        # (the fixed head as text, then the fields: a third cheaper than one dict for all of it)
        head = self.head(created, level, event)
        if error:
            fields = {**fields, "error": error}
        return _escape_controls(head + "," + _dumps_any(fields)[1:] if fields else head + "}", True)

    def access_line(self, created, values):
        # A line a request: written out field by field, a fraction of what line() costs with its
        # dicts (bench/RESULTS.md); a test holds it equal to line()'s.
        method, route, status, duration_ms, session, client = values
        request_id, trace_id = _request_id.get(), _trace_id.get()
        try:
            ids = (',"request_id":' + _json_string(request_id) if request_id else "") + (
                ',"trace_id":' + _json_string(trace_id) if trace_id else "")
            return _escape_controls(
                f'{self.head(created, "info", "request")}{ids},"method":{_json_string(method)},'
                f'"route":{_json_string(route)},"status":{status:d},"duration_ms":{float(duration_ms)!r},'
                f'"session":{"null" if session is None else _json_string(session)},'
                f'"client":{_json_string(client)}}}', True)
        except (TypeError, ValueError):  # a value of another type than a request's: the general way
            return super().access_line(created, values)


class _TextFormatter(_LineFormatter):
    """For a person at a terminal: ``12:00:01 info    event key=value ...``.  What a request put
    in a line cannot start another: control characters are escaped, and a traceback's lines are
    indented."""

    def line(self, created, level, event, fields, error=None):
        text = f"{self.stamp(created)} {level:<7} {event}"
        if fields:
            text += "  " + " ".join(f"{k}={v}" for k, v in fields.items())
        text = _escape_controls(text)
        if error:
            text += "".join("\n    " + _escape_controls(part) for part in error.split("\n"))
        return text


_CONTROL_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_controls(text: str, json_text: bool = False) -> str:
    """``text`` with what is not printable written as an escape: controls (C0, DEL, C1), line
    and paragraph separators, bidirectional overrides.  In a text line any of them could end
    the line, steer a terminal or reorder what a reader sees; in a JSON line the encoder
    escapes only C0.  JSON text (``json_text``) gets JSON's ``\\u`` escapes, which keep it the
    same JSON (such characters occur only inside its strings)."""
    if json_text and text.isascii() and "\x7f" not in text:  # (the common line: two fast checks)
        return text
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _control_escape(char, json_text) for char in text)


def _control_escape(char: str, json_text: bool) -> str:
    code = ord(char)
    if json_text:
        if code > 0xFFFF:  # (a surrogate pair, as JSON writes characters beyond the BMP)
            code -= 0x10000
            return "\\u%04x\\u%04x" % (0xD800 + (code >> 10), 0xDC00 + (code & 0x3FF))
        return "\\u%04x" % code
    return _CONTROL_ESCAPES.get(char) or ("\\x%02x" % code if code < 256 else
                                          "\\u%04x" % code if code <= 0xFFFF else "\\U%08x" % code)


class _EndOfPassWrites:
    """Writes that wait for the end of the event loop's current pass, so that what the pass's
    callbacks write leaves in one system call: the bundled server's answers (section 9) and the
    log lines of ``_Batching``.  One callback at the end of the pass (``call_soon``) runs them
    all, in the order they were added (answers before the lines that log them).  While a
    connection's data arrives nothing is scheduled (``hold``); as it returns (``release``), if
    the last pass wrote for at most one connection (``alone``: a client that sent one request
    and waits for it), the writes go at once, without waiting for another trip through the
    loop; while many connections are busy they wait, and leave together at the end of the pass.
    (Which callbacks remain in this pass is the loop's private business: the last pass is the
    public stand-in for it.)"""

    __slots__ = ("loop", "writes", "scheduled", "holding", "senders", "alone")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.writes: list = []
        self.scheduled = False
        self.holding = False
        self.senders = 0  # releases with something to write in this pass
        self.alone = True  # the last pass had at most one

    def add(self, write) -> None:
        """Call ``write`` at the end of this pass.  (Each writer adds itself when it first has
        something waiting, and again only after ``write`` ran.)"""
        self.writes.append(write)
        if not self.scheduled and not self.holding:
            self.scheduled = True
            self.loop.call_soon(self.run)

    def hold(self) -> None:
        self.holding = True

    def release(self) -> None:
        self.holding = False
        if self.writes:
            self.senders += 1
            if self.alone and self.senders == 1:
                self.write()
            if not self.scheduled:  # (even when nothing waits now: it ends the pass's count)
                self.scheduled = True
                self.loop.call_soon(self.run)

    def run(self) -> None:
        self.scheduled = False
        self.alone, self.senders = self.senders <= 1, 0
        self.write()

    def write(self) -> None:
        writes, self.writes = self.writes, []
        for write in writes:
            try:
                write()
            except Exception as exc:  # one failed write must not keep the others' bytes back
                self.loop.call_exception_handler({"message": "a deferred write failed", "exception": exc})


_END_OF_PASS_WRITES = threading.local()  # one event loop runs in a thread at a time: its _EndOfPassWrites


def _end_of_pass_writes(loop: asyncio.AbstractEventLoop) -> _EndOfPassWrites:
    """The ``_EndOfPassWrites`` of ``loop``, the loop running in this thread."""
    end = getattr(_END_OF_PASS_WRITES, "end", None)
    if end is None or end.loop is not loop:
        end = _END_OF_PASS_WRITES.end = _EndOfPassWrites(loop)
    return end


class _Batching:
    """A stream handler whose lines, when the event loop's thread writes them, wait for the end of
    that loop pass (``_EndOfPassWrites``) and leave in one write: one system call for every access log
    line the pass's requests wrote, not one each.  Lines from other threads, warnings and worse,
    and whatever waits when logging shuts down are written at once."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.waiting: list = []

    def emit(self, record) -> None:  # (called holding self.lock)
        if record.levelno < logging.WARNING:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                try:
                    self.queue(loop, self.format(record))
                except Exception:
                    self.handleError(record)
                return
        self.flush()
        super().emit(record)

    def queue(self, loop, line: str) -> None:
        with self.lock:
            if not self.waiting:
                _end_of_pass_writes(loop).add(self.flush)
            self.waiting.append(line + self.terminator)
            if len(self.waiting) >= 512:
                self.flush()

    def flush(self) -> None:
        with self.lock:
            if self.waiting:
                lines, self.waiting = self.waiting, []
                try:
                    self.stream.write("".join(lines))
                except Exception:
                    self.handleError(logging.makeLogRecord({"msg": "%d log lines lost", "args": (len(lines),)}))
            super().flush()


class _StderrLog(_Batching, logging.StreamHandler):
    pass


class _FileLog(_Batching, logging.FileHandler):
    pass


def _log_access(values: tuple) -> None:
    """The access log's line for a request (``values``: ``_ACCESS_FIELDS``, in that order), at
    level info.  Straight to this module's handlers when only they are set
    (``_configure_logging``), unfiltered and with this module's formats: ``log.info`` would cost
    several times as much (a LogRecord, the caller's frame, the filter passes; bench/RESULTS.md
    has the figures).  Anyone else's handler, filter or format
    gets it the standard way."""
    if not log.isEnabledFor(logging.INFO):
        return
    handlers = log.handlers
    direct = bool(handlers) and not log.filters and _on_asyncio()  # (the batching is asyncio's)
    for handler in handlers:
        if not isinstance(handler, _Batching) or handler.filters or not isinstance(handler.formatter, _LineFormatter):
            direct = False
            break
    if not direct:
        log.info("request", extra={"fields": dict(zip(_ACCESS_FIELDS, values))})
        return
    created, loop = time.time(), asyncio.get_running_loop()
    for handler in handlers:
        if handler.level <= logging.INFO:
            handler.queue(loop, handler.formatter.access_line(created, values))


def _configure_logging(level: str, fmt: str = "auto", path: str = "") -> None:
    """Logs go to stderr, always (stdout belongs to the protocol in stdio mode), and to LOG_FILE."""
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    formatter = _JsonFormatter() if fmt == "json" else _TextFormatter()
    handlers = [_StderrLog(sys.stderr)]
    if path:
        handlers.append(_FileLog(path, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(formatter)
    log.handlers[:] = handlers
    log.setLevel(level.upper())
    log.propagate = False


class _Metrics:
    """Process-local counters and histograms, rendered in the Prometheus text format.  Under
    ``--workers`` (``share``) a scrape of any worker shows the sum over the whole group."""

    BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)
    HELP = {
        "mcp_http_requests_total": ("counter", "HTTP requests by route, method and status"),
        "mcp_rpc_calls_total": ("counter", "JSON-RPC requests by method and outcome"),
        "mcp_tool_calls_total": ("counter", "tool calls by tool and outcome"),
        "mcp_tool_duration_seconds": ("histogram", "tool call duration by tool"),
        "mcp_open_streams": ("gauge", "open SSE streams by kind"),
        "mcp_sessions_created_total": ("counter", "legacy MCP sessions created"),
        "mcp_sessions_deleted_total": ("counter", "legacy MCP sessions ended by DELETE"),
        "mcp_session_cache_drops_total": ("counter", "session copies dropped because another instance "
                                          "changed or ended the session"),
        "mcp_store_errors_total": ("counter", "store operations that failed (the store was unavailable)"),
        "mcp_logins_total": ("counter", "upstream logins by outcome"),
        "mcp_rate_limited_total": ("counter", "requests refused by a rate limit"),
    }

    def __init__(self):
        self.values: dict = collections.defaultdict(float)
        self.histograms: dict = {}
        # Counting starts when a server that serves /metrics starts (MCP_METRICS_TOKEN; see
        # MCPServer._started_runtime): without it nobody can read them, and the counters of one
        # request are a measurable part of a tools/call.  Hot call sites test ``on`` before building keys.
        self.on = False
        self.shared: tuple | None = None  # (directory, this worker's file) under --workers

    def inc(self, name: str, amount: float = 1.0, **labels) -> None:
        if self.on:
            self.values[(name, tuple(labels.items()))] += amount  # call sites keep one label order

    def add(self, key: tuple) -> None:
        """``inc`` by one for a key built by the caller: ``(name, ((label, value), ...))``."""
        if self.on:
            self.values[key] += 1

    def observe(self, name: str, seconds: float, **labels) -> None:
        self.observe_key((name, tuple(labels.items())), seconds)

    def observe_key(self, key: tuple, seconds: float) -> None:
        """``observe`` for a key built by the caller: ``(name, ((label, value), ...))``."""
        if not self.on:
            return
        counts = self.histograms.get(key)
        if counts is None:  # per bucket (made cumulative when rendered), +Inf, sum
            counts = self.histograms[key] = [0] * (len(self.BUCKETS) + 1) + [0.0]
        counts[bisect.bisect_left(self.BUCKETS, seconds)] += 1
        counts[-1] += seconds

    # -- one scrape for the whole process group (--workers) ----------------------------------------

    SHARE_PERIOD = 1.0  # seconds between a worker's writes of its counters (what a scrape lags by)

    def share(self, directory: str, worker: str) -> None:
        """Write this worker's counters to ``directory`` (the supervisor's, private to the user)
        every ``SHARE_PERIOD`` seconds while they change, on a thread of their own (the event
        loop never waits on a disk), and add every other worker's file when rendered."""
        self.shared = (directory, os.path.join(directory, f"worker-{worker}.json"))
        threading.Thread(target=self._publish, name="mcp-metrics-share", daemon=True).start()

    def _snapshot(self) -> dict:
        # (list() of a dict's items is taken in one step under the GIL, the request thread may add keys)
        return {"values": [[name, pairs, value] for (name, pairs), value in list(self.values.items())],
                "histograms": [[name, pairs, list(counts)] for (name, pairs), counts in list(self.histograms.items())]}

    def _publish(self) -> None:
        written = None
        while True:
            snapshot = self._snapshot()
            if snapshot != written:
                path = self.shared[1]
                try:
                    with open(path + ".tmp", "w", encoding="utf-8") as f:
                        f.write(_dumps(snapshot))
                    os.replace(path + ".tmp", path)  # a reader sees the old file or the new, never half
                    written = snapshot
                except OSError as exc:
                    log.warning("cannot write this worker's metrics to %s: %s", path, exc.strerror or exc)
            time.sleep(self.SHARE_PERIOD)

    def _group(self) -> tuple:
        """(values, histograms): this process's, plus every other worker's last written ones."""
        if self.shared is None:
            return self.values, self.histograms
        values = collections.defaultdict(float, self.values)
        histograms = {key: list(counts) for key, counts in self.histograms.items()}
        directory, mine = self.shared
        for entry in os.listdir(directory):
            path = os.path.join(directory, entry)
            if not entry.endswith(".json") or path == mine:
                continue
            try:
                with open(path, encoding="utf-8") as f:
                    other = _loads(f.read())
            except (OSError, ValueError):
                continue  # a worker that never wrote, or is being replaced
            for name, pairs, value in other["values"]:
                values[(name, tuple(map(tuple, pairs)))] += value
            for name, pairs, counts in other["histograms"]:
                key = (name, tuple(map(tuple, pairs)))
                histograms[key] = [a + b for a, b in zip(histograms[key], counts)] if key in histograms else counts
        return values, histograms

    def render(self) -> str:
        values, histograms = self._group()

        def labels(pairs, extra=()):
            items = list(pairs) + list(extra)
            if not items:
                return ""
            return "{" + ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                                  for k, v in items) + "}"
        lines = []
        for name, (kind, text) in self.HELP.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            if kind == "histogram":
                for (metric, pairs), counts in sorted(histograms.items()):
                    if metric != name:
                        continue
                    cumulative = list(itertools.accumulate(counts[:-1]))
                    for i, bound in enumerate(self.BUCKETS):
                        lines.append(f"{name}_bucket{labels(pairs, [('le', bound)])} {cumulative[i]}")
                    lines.append(f"{name}_bucket{labels(pairs, [('le', '+Inf')])} {cumulative[-1]}")
                    lines.append(f"{name}_sum{labels(pairs)} {counts[-1]:.6f}")
                    lines.append(f"{name}_count{labels(pairs)} {cumulative[-1]}")
                continue
            for (metric, pairs), value in sorted(values.items()):
                if metric == name:
                    lines.append(f"{name}{labels(pairs)} {value:g}")
        return "\n".join(lines) + "\n"


_metrics = _Metrics()


class _InContext:
    """Await a coroutine with an OpenTelemetry context current during each of its steps, and
    only then: a request's first step runs in its caller's context (``_run_eagerly``), where an
    ``attach`` left across an ``await`` would leak into the next request, and its ``detach``, in
    the task the request became, would fail.  What the coroutine makes current itself (a span of
    a tool's) stays current across its awaits."""

    __slots__ = ("coroutine", "otel", "current")

    def __init__(self, coroutine, otel_context, otel):
        self.coroutine, self.current, self.otel = coroutine, otel_context, otel

    def _step(self, method, *args):
        token = self.otel.attach(self.current)
        try:
            return method(*args)
        finally:
            self.current = self.otel.get_current()
            self.otel.detach(token)

    def send(self, value):
        return self._step(self.coroutine.send, value)

    def throw(self, *exc):
        return self._step(self.coroutine.throw, *exc)

    def close(self):
        self.coroutine.close()

    def __await__(self):
        return self

    def __next__(self):
        return self.send(None)


class _Telemetry:
    """OpenTelemetry for MCP, after the semantic conventions for MCP (OpenTelemetry's
    gen-ai/mcp.md), when the ``opentelemetry-api`` package is installed: a SERVER span per request
    named ``{mcp.method.name} {tool or prompt name}``, whose parent is the trace context in
    ``params._meta`` (``traceparent``, ``tracestate``, ``baggage``), else the HTTP request's (its
    headers, or the span of an instrumented ASGI server around us); with both, the HTTP one is a
    link.  And the ``mcp.server.operation.duration`` and ``mcp.server.session.duration``
    histograms.  Exporting is the application's business (an SDK and its exporters, configured as
    OpenTelemetry says, before the server starts).  Without the package, or without an SDK,
    nothing runs: servers are left as they are (``instrument``)."""

    BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)  # (the conventions' advice)
    _CARRIED = ("traceparent", "tracestate", "baggage")

    def __init__(self):
        self.api = None  # the opentelemetry modules and instruments, once loaded
        self.on = False  # whether a server is instrumented (a plain attribute: read on every HTTP request)
        self._tried = False
        # the HTTP request's headers, for the request being served (set by the ASGI app)
        self.http_headers: contextvars.ContextVar = contextvars.ContextVar("mcp_otel_headers", default=None)

    def load(self) -> bool:
        if not self._tried:
            self._tried = True
            try:
                from opentelemetry import context, metrics, propagate, trace
            except ImportError:
                return False
            meter = metrics.get_meter("mcp_server", __version__)

            def histogram(name, description):
                try:
                    return meter.create_histogram(name, unit="s", description=description,
                                                  explicit_bucket_boundaries_advisory=list(self.BUCKETS))
                except TypeError:  # an API older than 1.23
                    return meter.create_histogram(name, unit="s", description=description)
            self.api = types.SimpleNamespace(
                context=context, propagate=propagate, trace=trace, metrics=metrics,
                tracer=trace.get_tracer("mcp_server", __version__),
                operation=histogram("mcp.server.operation.duration", "MCP request or notification duration"),
                session=histogram("mcp.server.session.duration", "MCP session duration"))
        return self.api is not None

    def instrument(self, server) -> None:
        """Trace every request ``server`` answers if, when it starts, the API is installed and an
        implementation (an SDK) is set as the tracer or meter provider: then its ``_respond`` is
        wrapped, once.  Otherwise the server runs exactly the code it always ran (the API alone
        would make spans and measurements nobody keeps, at a cost on every request)."""
        respond = server._respond
        if not self.load() or getattr(respond, "traced", False):
            return
        api = self.api
        providers = (api.trace.get_tracer_provider(), api.metrics.get_meter_provider())
        if all(type(p).__module__.startswith(("opentelemetry.trace", "opentelemetry.metrics")) for p in providers):
            return  # (the API's own stand-ins: no SDK was set)

        async def traced(ctx):
            return await self.respond(respond, ctx)
        traced.traced = True
        server._respond = traced
        self.on = True

    async def respond(self, respond, ctx) -> tuple:
        api = self.api
        attributes = self._attributes(ctx)
        name = attributes.get("gen_ai.tool.name") or attributes.get("gen_ai.prompt.name")
        parent, links = self._parent(ctx.meta)
        span = api.tracer.start_span(f"{ctx.method} {name}" if name else ctx.method, context=parent, links=links,
                                     kind=api.trace.SpanKind.SERVER, attributes=attributes)
        started = time.perf_counter()
        error = message = None
        try:
            response, status = await _InContext(respond(ctx), api.trace.set_span_in_context(span, parent),
                                                api.context)
            error, message = self._outcome(response, status)
            return response, status
        except BaseException as exc:  # (cancelled from outside: the task ends, the span too)
            error = type(exc).__qualname__
            raise
        finally:
            if error is not None:
                span.set_attribute("error.type", error)
                span.set_status(api.trace.StatusCode.ERROR, message)
            span.end()
            measured = {k: attributes[k] for k in ("mcp.method.name", "gen_ai.tool.name", "gen_ai.prompt.name",
                                                    "mcp.protocol.version", "network.transport") if k in attributes}
            if error is not None:
                measured["error.type"] = error
            api.operation.record(time.perf_counter() - started, measured)

    def _attributes(self, ctx) -> dict:
        method, params = ctx.method, ctx.params
        headers = self.http_headers.get()
        attributes = {"mcp.method.name": method, "mcp.protocol.version": ctx.protocol_version,
                      "network.transport": "pipe" if headers is None else "tcp"}
        if headers is not None:
            attributes["network.protocol.name"] = "http"
        if ctx.request_id is not None:
            attributes["jsonrpc.request.id"] = str(ctx.request_id)
        if ctx.session_id is not None:  # hashed as in the logs: the id itself opens the session
            attributes["mcp.session.id"] = _hash_id(ctx.session_id)
        # a name the server has, not any the client sends: it names spans and measurements,
        # which would otherwise have as many distinct values as a client cares to make up
        target = params.get("name")
        if method == "tools/call" and isinstance(target, str) and target in ctx.server._tools:
            attributes.update({"gen_ai.tool.name": target, "gen_ai.operation.name": "execute_tool"})
        elif method == "prompts/get" and isinstance(target, str) and target in ctx.server._prompts:
            attributes["gen_ai.prompt.name"] = target
        uri = params.get("uri")
        if isinstance(uri, str) and method in ("resources/read", "resources/subscribe", "resources/unsubscribe"):
            attributes["mcp.resource.uri"] = uri
        return attributes

    def _parent(self, meta: dict) -> tuple:
        """(parent context, links): ``_meta``'s trace context first, the HTTP request's as a link."""
        api = self.api
        ambient = api.context.get_current()
        headers = self.http_headers.get()
        if headers is not None and not api.trace.get_current_span(ambient).get_span_context().is_valid:
            ambient = api.propagate.extract(headers, context=ambient)
        carried = {k: meta[k] for k in self._CARRIED if isinstance(meta.get(k), str)} if meta else None
        if not carried or "traceparent" not in carried:
            return ambient, None
        link = api.trace.get_current_span(ambient).get_span_context()
        return api.propagate.extract(carried), [api.trace.Link(link)] if link.is_valid else None

    @staticmethod
    def _outcome(response, status: int) -> tuple:
        """(error.type, status description) of a response: the JSON-RPC error code, ``tool_error``
        for a tool's ``isError`` result, ``cancelled``, or (None, None)."""
        if response is None:
            return ("cancelled", None) if status == 0 else (None, None)
        error = response.get("error")
        if error is not None:
            return str(error.get("code")), error.get("message")
        result = response.get("result")
        if isinstance(result, dict) and result.get("isError") is True:
            return "tool_error", None
        return None, None

    def session_ended(self, started: float | None, version: str | None, transport: str) -> None:
        """``mcp.server.session.duration`` for a session that began at ``started`` (``_now()``)."""
        if not self.on or not isinstance(started, (int, float)):
            return
        attributes = {"network.transport": transport}
        if version:
            attributes["mcp.protocol.version"] = version
        self.api.session.record(max(0.0, _now() - started), attributes)


_telemetry = _Telemetry()


@functools.lru_cache(maxsize=4096)
def _address_block(address: str) -> str:
    """What a per-address limit counts: an IPv4 address, or the /64 an IPv6 address is in (one
    subscriber gets a whole /64, so counting single IPv6 addresses would limit nothing)."""
    if ":" not in address:
        return address
    import ipaddress
    try:
        return str(ipaddress.IPv6Network((address.split("%")[0], 64), strict=False))
    except ValueError:
        return address


@functools.lru_cache(maxsize=1024)  # (an access log line a request: a session's requests repeat its id)
def _hash_id(value: str | None) -> str | None:
    """A session id as logs show it: a short hash, useless to anyone who reads the log."""
    return hashlib.sha256(value.encode()).hexdigest()[:12] if value else None


def _json_encoder(default=None):
    """Compact JSON text, with the C encoder made once (``JSONEncoder.encode`` builds one per
    call); ``default`` turns what JSON has no type for into something it has.  Circular data
    raises RecursionError instead of ValueError."""
    encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=default)
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return encoder.encode
    iterate = make(None, encoder.default, json.encoder.encode_basestring, None, ":", ",", False, False, True)

    def dumps(value) -> str:
        return "".join(iterate(value, 0))
    return dumps


_dumps = _json_encoder()
_dumps_any = _json_encoder(default=str)  # log lines: a field of any type is written, as its str()
_json_string = json.encoder.encode_basestring  # a str as a JSON string (C), for _JsonFormatter.line


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (math.inf, -math.inf):  # 1e999: no JSON number stands for it, so none may be read as it
        raise ValueError(f"the number {text[:20]} is too large")
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


_json_decoder = json.JSONDecoder(parse_float=_finite_float, parse_constant=_no_constant)
_DECIMAL = re.compile(r"[0-9]{1,18}")  # a number a header or event id may carry (str.isdigit takes "²")
_JSON_DEPTH = 64  # MCP_MAX_JSON_DEPTH's default; JSON the server wrote itself may nest deeper
_STORED_JSON_DEPTH = 512  # (the C scanner's own limit, a RecursionError, is near 1000)
# (for _within_depth: both kinds of bracket as one, quotes kept, every other ASCII character dropped)
_DEPTH_CHARS = str.maketrans({"{": "[", "}": "]", **{chr(c): None for c in range(128) if chr(c) not in '[]{}"'}})
_LONE_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class _JsonTooDeep(ValueError):
    pass


_PATTERN_DEPTH = 64


@functools.lru_cache(maxsize=8)
def _depth_pattern(limit: int) -> "re.Pattern":
    """Matches runs of brackets (``[``/``]`` only) that pair up within ``limit`` levels; its
    quantifiers are possessive, so it never backtracks: linear time, whatever the input."""
    pattern = ""
    for _ in range(limit):
        pattern = r"(?:\[" + pattern + r"\])*+"
    return re.compile(pattern)


def _within_depth(text: str, limit: int) -> bool:
    """False if ``text`` nests arrays and objects deeper than ``limit`` (or its brackets do not
    pair: then the parser says what is wrong).  The C scanner recurses once a level, and a few
    thousand ``[`` would exhaust the stack.  Measured without a loop over the characters:
    escapes and strings out, brackets made one kind, one regular-expression match.  (``_loads``
    asks only about text with more brackets than the limit: other text cannot be too deep.)"""
    if "\\" in text:  # escaped backslashes, then escaped quotes: what is left of quotes delimits strings
        text = text.replace("\\\\", "").replace('\\"', "")
    brackets = "".join(text.translate(_DEPTH_CHARS).split('"')[::2])
    for _ in range(limit - _PATTERN_DEPTH):  # a deeper limit: peel the innermost levels off first,
        shorter = brackets.replace("[]", "")  # (a pattern nesting hundreds of groups would not compile)
        if len(shorter) == len(brackets):
            break
        brackets = shorter
    return _depth_pattern(min(limit, _PATTERN_DEPTH)).fullmatch(brackets) is not None


def _loads(data: bytes | str, max_depth: int = _JSON_DEPTH):
    """JSON from UTF-8 bytes (what MCP sends): the C scanner straight away, skipping
    ``json.loads``'s encoding detection and whitespace passes; anything unusual (white space
    around it, an error) goes to the full decoder, which says what is wrong.  Every JSON the
    server reads comes through here: ValueError (or UnicodeDecodeError) for text nested deeper
    than ``max_depth``, NaN, Infinity, a number too large for a float, a lone surrogate."""
    text = data.decode("utf-8") if isinstance(data, (bytes, bytearray, memoryview)) else data
    within = text.count("[") + text.count("{") <= max_depth or _within_depth(text, max_depth)
    try:  # (text too deep, or malformed: the parser tells which; beyond ~1000 levels, RecursionError)
        try:
            value, end = _json_decoder.scan_once(text, 0)
        except (StopIteration, ValueError):
            value, end = _json_decoder.decode(text), len(text)
        if end != len(text):
            value = _json_decoder.decode(text)
    except RecursionError:
        within = False
    if not within:
        raise _JsonTooDeep(f"the JSON nests arrays and objects deeper than {max_depth} levels")
    if "\\" in text and _LONE_SURROGATE_ESCAPE.search(text):
        try:
            _dumps(value).encode("utf-8")
        except UnicodeEncodeError:  # no UTF-8 text (nor answer) could carry it
            raise ValueError("the JSON has a lone surrogate (\\ud800-\\udfff) in a string") from None
    return value


def _parse_error_text(exc: ValueError, what: str = "body") -> str:
    """What a client is told about JSON it sent (its ``what``) that ``_loads`` refused."""
    if isinstance(exc, _JsonTooDeep):
        return f"Parse error: {exc} (MCP_MAX_JSON_DEPTH)."
    return f"Parse error: the {what} is not valid JSON."


def _now() -> float:
    return time.time()


# ---- Concurrency: anyio, on asyncio or trio ------------------------------------------------------
#
# Rules:
# - What ``server.asgi`` reaches (sections 2-8, but the Redis store: redis-py's client is
#   asyncio's) runs on asyncio and on trio: it waits, sleeps, locks, hands work to threads and
#   cancels through anyio or the helpers here, never through asyncio directly.  The bundled HTTP
#   server and stdio (sections 9, 10 and the stdio transport) are asyncio's own.
# - A request's cancel scope (``_cancel_scope``) is, on asyncio, its task (``_TaskScope``): most
#   requests never wait, and anyio's scope would be most of what such a call costs.  On trio it
#   is anyio's.  Both are cancelled with ``cancel()`` and say ``cancelled_caught`` afterwards.
# - Work that outlives the request that started it runs in ``_Background``: the task group of
#   whoever serves the app (the ASGI lifespan, stdio), each job in its own cancel scope, its
#   failure logged and kept from its siblings.
# - What callbacks hand to one waiting stream goes through a bounded ``_Inbox``: a client that
#   reads too slowly ends its stream instead of making the server hold ever more for it.


def _on_asyncio() -> bool:
    """Whether this runs in an asyncio event loop (else trio, through anyio)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class _TaskScope:
    """A cancel scope over asyncio's running task, with an optional time limit: ``cancel()``
    cancels the task, and leaving the scope takes back that cancellation and no other (as
    ``asyncio.timeout`` does), so code outside it goes on; ``cancelled_caught`` says it did."""

    __slots__ = ("task", "limit", "timer", "requested", "cancelling", "cancelled_caught")

    def __init__(self, limit: float | None = None):
        self.limit = limit
        self.task = self.timer = None
        self.requested = self.cancelled_caught = False
        self.cancelling = 0

    def __enter__(self) -> "_TaskScope":
        task = self.task = asyncio.current_task()
        # (counted here, not when cancel() runs: asyncio folds cancellations into one
        # CancelledError, and one that an outer scope asked for meanwhile must go on out)
        self.cancelling = task.cancelling()
        if self.limit:
            self.timer = task.get_loop().call_later(self.limit, self.cancel)
        return self

    def cancel(self) -> None:
        task = self.task
        if not self.requested and task is not None and not task.done():
            self.requested = True
            task.cancel()

    def __exit__(self, kind, exc, traceback) -> bool:
        if self.timer is not None:
            self.timer.cancel()
        task, self.task = self.task, None  # (a late cancel() finds nothing to cancel)
        if self.requested and task.uncancel() <= self.cancelling and kind is asyncio.CancelledError:
            self.cancelled_caught = True
            return True
        return False


def _cancel_scope(limit: float | None = None):
    """A cancel scope for a request or a step of it, ended after ``limit`` seconds if given."""
    if _on_asyncio():
        return _TaskScope(limit)
    return anyio.CancelScope(deadline=anyio.current_time() + limit if limit else math.inf)


def _cancelled_class() -> type:
    """The exception that cancels a task here (in an ``except`` clause: evaluated only when
    something is raised)."""
    return anyio.get_cancelled_exc_class()


class _Answer:
    """A value one task waits for and another (or a callback) delivers once: a client's answer,
    a task's first outcome.  ``set``/``fail`` deliver, ``await wait()`` takes it."""

    __slots__ = ("event", "value", "error")

    def __init__(self):
        self.event = anyio.Event()
        self.value = self.error = None

    @property
    def done(self) -> bool:
        return self.event.is_set()

    def set(self, value) -> None:
        if not self.event.is_set():
            self.value = value
            self.event.set()

    def fail(self, error: BaseException) -> None:
        if not self.event.is_set():
            self.error = error
            self.event.set()

    async def wait(self):
        await self.event.wait()
        if self.error is not None:
            raise self.error
        return self.value


async def _in_thread(function: typing.Callable, limiter: "anyio.CapacityLimiter | None" = None):
    """``function()`` on a worker thread that holds one of ``limiter``'s slots until it ends.  A
    caller that is cancelled (a timeout, a client gone) stops waiting at once, but its thread
    runs on and keeps its slot (anyio's own limiter, on asyncio, would give it back at the
    cancellation), so the limiter caps threads, not waiters."""
    if limiter is None:
        return await anyio.to_thread.run_sync(function, abandon_on_cancel=True)
    holder, lock = object(), threading.Lock()
    state = {"started": False, "ended": False, "abandoned": False}
    await limiter.acquire_on_behalf_of(holder)

    def run():
        with lock:
            if state["abandoned"]:
                return None  # its caller gave up before it started: the slot went back then
            state["started"] = True
        try:
            return function()
        finally:
            with lock:
                state["ended"] = True
                give_back = state["abandoned"]
            if give_back:  # (its caller is gone: the thread gives the slot back itself)
                try:
                    anyio.from_thread.run_sync(limiter.release_on_behalf_of, holder)
                except Exception:  # the event loop has ended: so has the limiter
                    pass
    try:
        result = await anyio.to_thread.run_sync(run, abandon_on_cancel=True, limiter=anyio.CapacityLimiter(1))
    except BaseException:
        with lock:
            state["abandoned"] = True
            release_now = not state["started"] or state["ended"]
        if release_now:
            limiter.release_on_behalf_of(holder)
        raise
    limiter.release_on_behalf_of(holder)
    return result


async def _gather(*awaitables) -> list:
    """Run awaitables concurrently in a task group; their results in order.  The first failure
    cancels the others and is raised as it is (not in an exception group)."""
    results: list = [None] * len(awaitables)
    failures: list = []

    async def one(index, awaitable):
        try:
            results[index] = await awaitable
        except _REQUEST_ERRORS as exc:
            if not failures:
                failures.append(exc)
                group.cancel_scope.cancel()
    async with anyio.create_task_group() as group:
        for index, awaitable in enumerate(awaitables):
            group.start_soon(one, index, awaitable)
    if failures:
        raise failures[0]
    return results


class _Job:
    """A piece of background work: ``cancel()`` ends it, ``done`` says it ended."""

    __slots__ = ("scope", "ended")

    def __init__(self):
        self.scope = anyio.CancelScope()
        self.ended = anyio.Event()

    @property
    def done(self) -> bool:
        return self.ended.is_set()

    def cancel(self) -> None:
        self.scope.cancel()


class _Background:
    """Where work that outlives its request runs: the task group of whoever serves (``serving``,
    for the ASGI lifespan and stdio).  Outside one, on asyncio, a job is a task of its own (an
    ASGI server run without lifespan events); on trio it must be inside one."""

    def __init__(self):
        self.group = None
        self.jobs: set = set()

    @contextlib.asynccontextmanager
    async def serving(self):
        async with anyio.create_task_group() as group:
            self.group = group
            try:
                yield
            finally:
                self.group = None
                await self.close()

    def spawn(self, coroutine) -> _Job:
        job = _Job()
        self.jobs.add(job)
        if self.group is not None:
            self.group.start_soon(self._run, job, coroutine)
        elif _on_asyncio():
            asyncio.get_running_loop().create_task(self._run(job, coroutine))
        else:
            coroutine.close()
            self.jobs.discard(job)
            raise RuntimeError("mcp_server on trio needs the ASGI lifespan protocol (background work runs "
                               "in its task group): turn lifespan events on in the ASGI server")
        return job

    async def _run(self, job: _Job, coroutine) -> None:
        try:
            with job.scope:
                await coroutine
        except _REQUEST_ERRORS:
            log.error("background task failed (error id %s)", _error_id(), exc_info=True)
        finally:
            self.jobs.discard(job)
            job.ended.set()

    async def close(self) -> None:
        """Cancel every job and wait for them to end."""
        jobs = list(self.jobs)
        for job in jobs:
            job.cancel()
        with anyio.CancelScope(shield=True):
            for job in jobs:
                await job.ended.wait()


class _Inbox:
    """What callbacks (store subscriptions, the bus, a disconnect) hand to one waiting stream: a
    bounded anyio memory object stream.  ``put`` never waits: past ``size`` items the client is
    reading too slowly, the inbox closes (``overflowed``), and ``get`` returns None once it has
    handed out what it holds, which ends the stream."""

    __slots__ = ("sender", "receiver", "overflowed")

    QUIET = object()  # what ``get`` returns when nothing came within its time

    def __init__(self, size: int):
        self.sender, self.receiver = anyio.create_memory_object_stream(size)
        self.overflowed = False

    def put(self, item) -> None:
        try:
            self.sender.send_nowait(item)
        except anyio.WouldBlock:
            self.overflowed = True
            self.sender.close()
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass

    async def get(self, within: float):
        with anyio.move_on_after(within):
            try:
                return await self.receiver.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                return None
        return self.QUIET

    def close(self) -> None:
        self.sender.close()
        self.receiver.close()


# ==== 2. Store ==================================================================================
#
# Rules:
# - All state that must outlive one request lives behind ``Store``: legacy MCP sessions, the event
#   logs that make SSE streams resumable, and (later) OAuth state.  No module-level dicts of it.
# - Values are JSON-compatible Python objects.  Treat a value read from a store as immutable: to
#   change it, build a new one and ``set`` it (a Redis store hands out copies, this one does not).
# - Keys of one session share the hash tag ``{sid}`` (``mcp:{sid}:session``) so a Redis Cluster
#   keeps them in one slot.
#
# - Authorization state (OAuth clients, codes, refresh tokens and families, user sessions, logins,
#   quota counts) is never evicted to make room for MCP sessions: the in-memory store keeps it in
#   an LRU of its own (``_KEPT_PREFIXES``).  Anyone with a token can make sessions; the per-principal
#   and per-address caps of section 6 bound how many, and past ``max_keys`` the oldest session goes.
#
# Theory of operation: the in-memory store is two ``OrderedDict``s used as LRU lists, one for the
# kept keys and one for the rest, each with a budget of ``max_keys``.  Every entry carries its
# absolute expiry; reads drop expired entries lazily and a sweep on writes keeps the dead ones
# from piling up.  Past ``max_keys`` the least recently used entry of that list is evicted.  Pub/sub
# is a dict of callbacks called in the event loop, which is what a Redis subscriber does too.


class Store:
    """What the server needs from a store.  Every method but ``subscribe`` is a coroutine."""

    name = "abstract"
    # Whether published messages reach this process now, and a count of the times that link
    # broke (what others published meanwhile is lost): copies of shared state are kept only
    # while it holds.
    link_up = True
    link_epoch = 0

    async def get(self, key: str) -> typing.Any: raise NotImplementedError
    async def get_refreshed(self, key: str, ttl: float) -> typing.Any:
        """Read a value and restart its time to live (sliding expiry) in one step."""
        raise NotImplementedError
    async def set(self, key: str, value: typing.Any, ttl: float | None = None) -> None: raise NotImplementedError
    async def add(self, key: str, value: typing.Any, ttl: float | None = None) -> bool:
        """Set only if absent; True when this call created the key."""
        raise NotImplementedError
    async def delete(self, key: str) -> bool: raise NotImplementedError
    async def pop(self, key: str) -> typing.Any:
        """Get and delete atomically (single-use values: codes, states)."""
        raise NotImplementedError
    async def incr(self, key: str, ttl: float) -> int: raise NotImplementedError
    async def admit(self, key: str, member: str, limit: int, ttl: float, live: typing.Callable) -> bool:
        """Add ``member`` to the set ``key`` unless ``limit`` of its members are live, a member
        being live while the key ``live(member)`` exists (a quota on things that expire on their
        own, like sessions); True when it is in.  The set lives ``ttl`` after the last admission.
        (This version suits a store in one process; a shared store makes it one atomic step.)"""
        members = list(await self.get(key) or ())
        if member not in members and len(members) >= limit:
            members = [m for m in members if await self.get(live(m)) is not None]
            if len(members) >= limit:
                return False
        await self.set(key, members if member in members else members + [member], ttl)
        return True
    async def discard(self, key: str, member: str, ttl: float) -> None:
        """Remove ``member`` from a set made by ``admit``; the set goes with its last member."""
        members = await self.get(key)
        if members and member in members:
            rest = [m for m in members if m != member]
            await (self.set(key, rest, ttl) if rest else self.delete(key))
    async def touch(self, keys: list, ttl: float) -> None:
        """Restart the time to live of the keys that exist."""
        for key in keys:
            await self.get_refreshed(key, ttl)
    async def append(self, key: str, item: typing.Any, maxlen: int, ttl: float) -> int:
        """Append to a bounded log; returns the item's sequence number (1, 2, ...)."""
        raise NotImplementedError
    async def read_after(self, key: str, after: int) -> list:
        """Items of a log with a sequence number above ``after``, as ``(seq, item)`` pairs."""
        raise NotImplementedError
    async def delete_log(self, key: str) -> None:
        """Remove a log made by ``append``."""
        await self.delete(key)
    async def publish(self, channel: str, message: typing.Any) -> None: raise NotImplementedError
    def subscribe(self, channel: str, callback: typing.Callable) -> typing.Callable:
        """Call ``callback(message)`` for each message published on ``channel``; returns an unsubscribe."""
        raise NotImplementedError
    async def subscribed(self) -> None:
        """Return once every ``subscribe`` made so far is in effect (Redis subscribes in the background)."""
        return None
    async def ping(self) -> bool: return True
    async def close(self) -> None: return None


class _Log:
    __slots__ = ("items", "seq")

    def __init__(self, maxlen: int):
        self.items = collections.deque(maxlen=maxlen)
        self.seq = 0


# (not mcp:sandbox: the demo provider's codes and tokens are anyone's to make, so they may not
# crowd out what is kept)
_KEPT_PREFIXES = ("mcp:oauth:", "mcp:login:", "mcp:quota:")
_KEPT_SUFFIX = ":user"  # mcp:{sid}:user, a user's session with the authorization server


class MemoryStore(Store):
    """The embedded store: one process, TTLs, sliding expiry, an LRU cap per class of key."""

    name = "memory"

    def __init__(self, max_keys: int = 100000, clock: typing.Callable = time.monotonic):
        self._data: collections.OrderedDict = collections.OrderedDict()  # key -> [value, expires_at]
        self._kept: collections.OrderedDict = collections.OrderedDict()  # the same, authorization state
        self._max_keys = max_keys
        self._clock = clock
        self._channels: dict = {}
        self._writes = 0

    def _table(self, key: str) -> collections.OrderedDict:
        return self._kept if key.startswith(_KEPT_PREFIXES) or key.endswith(_KEPT_SUFFIX) else self._data

    def _live(self, key):
        table = self._table(key)
        entry = table.get(key)
        if entry is None:
            return None
        if entry[1] is not None and entry[1] <= self._clock():
            del table[key]
            return None
        table.move_to_end(key)
        return entry

    def _put(self, key, value, ttl):
        table = self._table(key)
        table[key] = [value, None if ttl is None else self._clock() + ttl]
        table.move_to_end(key)
        self._writes += 1
        if self._writes % 64 == 0:
            self._sweep(limit=256)  # a bounded slice: a full pass over a big store would stall the loop
        while len(table) > self._max_keys:
            table.popitem(last=False)

    def _sweep(self, limit: int | None = None):
        """Drop expired entries, starting with the least recently used (the likeliest to be)."""
        now = self._clock()
        for table in (self._data, self._kept):
            entries = table.items() if limit is None else itertools.islice(table.items(), limit)
            for key in [k for k, (_v, exp) in entries if exp is not None and exp <= now]:
                del table[key]

    def __len__(self):
        self._sweep()
        return len(self._data) + len(self._kept)

    async def get(self, key):
        entry = self._live(key)
        return None if entry is None else entry[0]

    async def get_refreshed(self, key, ttl):
        entry = self._live(key)
        if entry is None:
            return None
        entry[1] = self._clock() + ttl
        return entry[0]

    async def set(self, key, value, ttl=None):
        self._put(key, value, ttl)

    async def add(self, key, value, ttl=None):
        if self._live(key) is not None:
            return False
        self._put(key, value, ttl)
        return True

    async def delete(self, key):
        live = self._live(key) is not None
        self._table(key).pop(key, None)
        return live

    async def pop(self, key):
        entry = self._live(key)
        if entry is None:
            return None
        del self._table(key)[key]
        return entry[0]

    async def incr(self, key, ttl):
        entry = self._live(key)
        if entry is None:
            self._put(key, 1, ttl)
            return 1
        entry[0] += 1
        return entry[0]

    async def append(self, key, item, maxlen, ttl):
        entry = self._live(key)
        if entry is None:
            self._put(key, _Log(maxlen), ttl)
            entry = self._table(key)[key]
        else:
            entry[1] = self._clock() + ttl
        events = entry[0]
        events.seq += 1
        events.items.append((events.seq, item))
        return events.seq

    async def read_after(self, key, after):
        entry = self._live(key)
        if entry is None:
            return []
        return [(seq, item) for seq, item in entry[0].items if seq > after]

    async def publish(self, channel, message):
        for callback in list(self._channels.get(channel, ())):
            try:
                callback(message)
            except Exception:  # a subscriber's bug must not break the publisher
                log.exception("subscriber of %s failed", channel)

    def subscribe(self, channel, callback):
        self._channels.setdefault(channel, []).append(callback)

        def unsubscribe():
            callbacks = self._channels.get(channel)
            if callbacks and callback in callbacks:
                callbacks.remove(callback)
                if not callbacks:
                    del self._channels[channel]
        return unsubscribe


class StoreUnavailable(RpcError):
    """The store did not answer in time: the request fails with 503, the server keeps serving,
    and the store client reconnects on its own."""

    def __init__(self, detail: str = ""):
        super().__init__(INTERNAL_ERROR, "The session store is unavailable; retry in a few seconds."
                         + (f" ({detail})" if detail else ""), status=503)


# Append to a bounded log and number the item, in one round trip (KEYS[2] counts; both keys share
# the hash tag of KEYS[1], so a cluster keeps them in one slot).
_LUA_APPEND = """
local n = redis.call('INCR', KEYS[2])
redis.call('RPUSH', KEYS[1], n .. ' ' .. ARGV[1])
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return n
"""
_LUA_INCR = """
local v = redis.call('INCR', KEYS[1])
if v == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return v
"""
# Admit ARGV[1] to the set KEYS[1] of at most ARGV[2] members, after removing the dead ones the
# caller found (ARGV[4...]); one script, so that concurrent admissions never pass the limit.
_LUA_ADMIT = """
for i = 4, #ARGV do redis.call('SREM', KEYS[1], ARGV[i]) end
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 and redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""


def _sentinel_client(url: str, options: dict):
    """A client of the primary that Redis Sentinel names for ``url`` (``_sentinel_parts``).
    Every new connection asks the sentinels where the primary is, and redis-py drops a
    connection that finds its primary demoted (READONLY): a failover costs the operations in
    flight a ``StoreUnavailable`` (503), and the next ones reach the new primary."""
    from redis.asyncio.sentinel import Sentinel
    where = _sentinel_parts(url)
    sentinel_options = {k: options[k] for k in ("socket_timeout", "socket_connect_timeout")}
    if where["sentinel_password"]:
        sentinel_options["password"] = where["sentinel_password"]
    sentinel = Sentinel(where["sentinels"], sentinel_kwargs=sentinel_options, **options)
    return sentinel.master_for(where["service"], db=where["db"], username=where["username"],
                               password=where["password"])


class RedisStore(Store):
    """The shared store: plain Redis strings, lists and pub/sub (Redis 6.2+, Valkey, managed, or
    a primary found through Redis Sentinel: ``redis+sentinel://``).

    Every operation is bounded by ``timeout``; a store that does not answer raises
    ``StoreUnavailable`` (HTTP 503) and the next operation reconnects.  Pub/sub runs on one
    connection per process whose reader task resubscribes after a reconnect."""

    name = "redis"

    def __init__(self, url: str, *, cluster: bool = False, timeout: float = 2.0):
        self.url, self.cluster, self.timeout = url, cluster, timeout
        self.link_up = False  # until the pub/sub connection is subscribed
        self._client = None
        self._callbacks: dict = {}
        self._subscribed: set = set()
        self._kick: asyncio.Event | None = None
        self._pump_task = None
        self._synced: asyncio.Event | None = None  # set when Redis has every wanted subscription
        self._scripts: dict = {}
        self._errors = self._readonly = None
        self._follower = None  # with Sentinel: the task that hears of a new primary (_follow_sentinels)

    def _redis(self):
        if self._client is None:
            aioredis = _require("redis")
            import redis.exceptions
            from redis.asyncio.retry import Retry
            from redis.backoff import ExponentialBackoff
            self._errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError,
                            asyncio.TimeoutError)
            self._readonly = redis.exceptions.ReadOnlyError
            options = dict(socket_timeout=self.timeout, socket_connect_timeout=self.timeout,
                           retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 1), health_check_interval=15)
            if self.cluster:
                from redis.asyncio.cluster import RedisCluster
                self._client = RedisCluster.from_url(self.url, **options)
            elif self.url.startswith(_SENTINEL_SCHEME):
                self._client = _sentinel_client(self.url, options)
                self._follower = asyncio.get_running_loop().create_task(self._follow_sentinels())
            else:
                self._client = aioredis.Redis.from_url(self.url, **options)
        return self._client

    async def _run(self, operation):
        client = self._redis()
        try:
            async with asyncio.timeout(self.timeout * 2 + 0.5):
                return await operation(client)
        except self._errors as exc:
            _metrics.inc("mcp_store_errors_total", store="redis")
            raise StoreUnavailable(type(exc).__name__) from None
        except self._readonly as exc:  # a primary demoted under us (a script's write, on a replica)
            _metrics.inc("mcp_store_errors_total", store="redis")
            await client.connection_pool.disconnect()  # every connection asks the sentinels anew
            raise StoreUnavailable(type(exc).__name__) from None

    async def _script(self, name: str, source: str, keys: list, args: list):
        async def run(client):
            script = self._scripts.get(name)
            if script is None:
                script = self._scripts[name] = client.register_script(source)
            return await script(keys=keys, args=args)
        return await self._run(run)

    @staticmethod
    def _load(raw):
        return None if raw is None else _loads(raw, _STORED_JSON_DEPTH)

    async def get(self, key):
        return self._load(await self._run(lambda r: r.get(key)))

    async def get_refreshed(self, key, ttl):
        return self._load(await self._run(lambda r: r.getex(key, px=int(ttl * 1000))))

    async def set(self, key, value, ttl=None):
        data = _dumps(value)
        await self._run(lambda r: r.set(key, data, px=int(ttl * 1000) if ttl else None))

    async def add(self, key, value, ttl=None):
        data = _dumps(value)
        return bool(await self._run(lambda r: r.set(key, data, px=int(ttl * 1000) if ttl else None, nx=True)))

    async def delete(self, key):
        return bool(await self._run(lambda r: r.delete(key)))

    async def pop(self, key):
        return self._load(await self._run(lambda r: r.getdel(key)))

    async def incr(self, key, ttl):
        return int(await self._script("incr", _LUA_INCR, [key], [int(ttl * 1000)]))

    async def admit(self, key, member, limit, ttl, live):
        members = [m.decode() for m in await self._run(lambda r: r.smembers(key))]
        dead = []
        if member not in members and len(members) >= limit:  # full: are they all still there?
            async def exists(client):
                pipe = client.pipeline(transaction=False)  # (a cluster splits it by slot)
                for m in members:
                    pipe.exists(live(m))
                return await pipe.execute()
            dead = [m for m, found in zip(members, await self._run(exists)) if not found]
        return bool(await self._script("admit", _LUA_ADMIT, [key], [member, limit, int(ttl * 1000), *dead]))

    async def discard(self, key, member, ttl):
        await self._run(lambda r: r.srem(key, member))  # (an empty set is no key in Redis)

    async def touch(self, keys, ttl):
        async def expire(client):
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.pexpire(key, int(ttl * 1000))
            await pipe.execute()
        await self._run(expire)

    async def append(self, key, item, maxlen, ttl):
        return int(await self._script("append", _LUA_APPEND, [key, key + ":n"],
                                      [_dumps(item), maxlen, int(ttl * 1000)]))

    async def delete_log(self, key):
        await self._run(lambda r: r.delete(key, key + ":n"))

    async def read_after(self, key, after):
        rows = await self._run(lambda r: r.lrange(key, 0, -1))
        out = []
        for row in rows:
            seq, _, data = row.partition(b" ")
            if int(seq) > after:
                out.append((int(seq), _loads(data, _STORED_JSON_DEPTH)))
        return out

    async def publish(self, channel, message):
        data = _dumps(message)
        await self._run(lambda r: r.publish(channel, data))

    def subscribe(self, channel, callback):
        self._callbacks.setdefault(channel, []).append(callback)
        if channel not in self._subscribed and self._synced is not None:
            self._synced.clear()
        self._wake()

        def unsubscribe():
            callbacks = self._callbacks.get(channel)
            if callbacks and callback in callbacks:
                callbacks.remove(callback)
                if not callbacks:
                    del self._callbacks[channel]
                    self._wake()
        return unsubscribe

    def _wake(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop yet: the pump starts with the first subscription made in one
        if self._kick is None:
            self._kick = asyncio.Event()
            self._synced = asyncio.Event()
            if set(self._callbacks) <= self._subscribed:
                self._synced.set()
        self._kick.set()
        if self._pump_task is None or self._pump_task.done():
            self._pump_task = loop.create_task(self._pump())

    async def _pump(self) -> None:
        """Keep the pub/sub connection subscribed to what callbacks want, and dispatch messages."""
        backoff = 0.1
        pubsub = None
        while True:
            try:
                if pubsub is None:
                    client = self._redis()
                    if self.cluster:
                        await client.initialize()  # the slot map, which a cluster pubsub needs
                    pubsub = client.pubsub()
                    self._subscribed = set()
                wanted = set(self._callbacks)
                if wanted - self._subscribed:
                    await pubsub.subscribe(*(wanted - self._subscribed))
                if self._subscribed - wanted:
                    await pubsub.unsubscribe(*(self._subscribed - wanted))
                self._subscribed = wanted
                if set(self._callbacks) <= wanted:
                    self._synced.set()
                self.link_up = True
                if not wanted:
                    self._kick.clear()
                    await self._kick.wait()
                    continue
                self._kick.clear()
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.02)
                backoff = 0.1
                if message is None or message.get("type") != "message":
                    continue
                channel = message["channel"].decode() if isinstance(message["channel"], bytes) else message["channel"]
                payload = _loads(message["data"], _STORED_JSON_DEPTH)
                for callback in list(self._callbacks.get(channel, ())):
                    try:
                        callback(payload)
                    except Exception:
                        log.exception("subscriber of %s failed", channel)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.link_up = False  # what was published meanwhile is lost: copies are untrusted
                self.link_epoch += 1
                log.warning("redis pub/sub connection lost (%s); reconnecting in %.1fs", type(exc).__name__, backoff)
                try:
                    if pubsub is not None:
                        await pubsub.aclose()
                except Exception:
                    pass
                pubsub = None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _follow_sentinels(self) -> None:
        """Replace the client the moment a sentinel announces a new primary (``+switch-master``).
        A primary demoted by ``SENTINEL FAILOVER`` keeps taking writes until the sentinels
        reconfigure it, seconds later, and then discards them: a session made there would be lost.
        A new client, with a pool of its own, asks the sentinels anew for every connection; the
        old one is closed, so the operations in flight on it end with a 503, and no connection it
        was still opening is used again."""
        client = self._client
        pool = client.connection_pool
        backoff = 0.1
        while not await self._switch_announced(pool):
            await asyncio.sleep(backoff)  # every sentinel is unreachable: try them again
            backoff = min(backoff * 2, 2.0)
        self._client, self._scripts = None, {}
        self._redis()  # (synchronous: no operation starts between the two clients)
        await client.aclose()
        for node in pool.sentinel_manager.sentinels:
            await node.aclose()
        log.warning("redis sentinel: %s has a new primary; every connection to the old one closed",
                    pool.service_name)

    @staticmethod
    async def _switch_announced(pool) -> bool:
        """Listen to the sentinels, one after the other, until one announces a new primary of
        the pool's service (True), or none answers (False)."""
        service = pool.service_name.encode()
        for node in pool.sentinel_manager.sentinels:
            pubsub = node.pubsub()
            try:
                await pubsub.subscribe("+switch-master")
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message and message["type"] == "message" and message["data"].split()[:1] == [service]:
                        return True
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # this sentinel is gone: listen to the next one
                where = node.connection_pool.connection_kwargs
                log.warning("redis sentinel %s:%s unreachable (%s)", where.get("host"), where.get("port"),
                            type(exc).__name__)
            finally:
                await asyncio.shield(pubsub.aclose())
        return False

    async def subscribed(self):
        if self._synced is not None and not self._synced.is_set():
            try:
                async with asyncio.timeout(self.timeout * 2):
                    await self._synced.wait()
            except TimeoutError:
                raise StoreUnavailable("subscribe") from None

    async def ping(self):
        try:
            return bool(await self._run(lambda r: r.ping()))
        except StoreUnavailable:
            return False

    async def close(self):
        for task in (self._pump_task, self._follower):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._follower = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _store_id(identifier: str) -> str:
    """What a key or channel name holds of a session, task or user id: its SHA-256 (128 bits).
    Without authorization a session id is the whole credential, and a copy of the store, or a
    look at its channels, lists every key; the ids are random, so the digest gives none back."""
    return hashlib.sha256(identifier.encode()).hexdigest()[:32]


def _session_key(sid: str) -> str:
    return f"mcp:{{{_store_id(sid)}}}:session"


def _events_key(sid: str, stream_id: str) -> str:
    return f"mcp:{{{_store_id(sid)}}}:events:{stream_id}"


def _streams_key(sid: str) -> str:
    return f"mcp:{{{_store_id(sid)}}}:streams"


def _session_channel(sid: str) -> str:
    return f"mcp:{{{_store_id(sid)}}}:chan"


def _reply_channel(sid: str) -> str:
    return f"mcp:{{{_store_id(sid)}}}:replies"


_BUS_CHANNEL = "mcp:bus"  # server-wide notifications: list changes, resource updates
_CANCEL_CHANNEL = "mcp:cancel"  # notifications/cancelled for a request running on another instance
_SESSIONS_CHANNEL = "mcp:sessions"  # a legacy session changed or ended: instances drop their copy
_SESSION_CACHE_MAX = 50000  # sessions an instance keeps copies of (oldest dropped first)


def _stream_channel(sid: str, stream_id: str) -> str:
    return f"mcp:{{{_store_id(sid)}}}:stream:{stream_id}"


def _task_channel(task_id: str) -> str:
    return f"mcp:task:{{{_store_id(task_id)}}}:ctl"


def _quota_key(what: str, holder: str) -> str:
    """The set of things (sessions) a principal or a client address holds; the holder is hashed."""
    return f"mcp:quota:{what}:{_store_id(holder)}"


# ==== 3. Crypto and tokens ======================================================================
#
# Rules:
# - One server secret feeds a key ring: each purpose gets its own key, derived with HKDF-SHA256
#   and a label, so no key ever serves two purposes (labels are listed in docs/security.md).
# - State handed to a client and trusted when it comes back (``requestState``, cursors) is sealed
#   or signed; anything that fails verification is refused, never half-trusted.
# - Comparisons of secrets are constant-time (``hmac.compare_digest``).
# - ``cryptography`` is imported on first use (``_require``), so a stdio start does not pay for it.

_KEY_LABELS = {
    "request_state": b"mcp_server/v1 request-state AES-256-GCM",
    "cursor": b"mcp_server/v1 cursor HMAC-SHA256",
    "token": b"mcp_server/v1 access-token HS256",
    "cookie": b"mcp_server/v1 cookie HMAC-SHA256",
    "consent": b"mcp_server/v1 consent-request AES-256-GCM",
    "login": b"mcp_server/v1 login-state AES-256-GCM",
    "pairing": b"mcp_server/v1 pairing-code HMAC-SHA256",
    "events": b"mcp_server/v1 stream-event AES-256-GCM",
    "records": b"mcp_server/v1 stored-record AES-256-GCM",
}


def _hkdf(master: bytes, label: bytes, length: int = 32) -> bytes:
    """RFC 5869 HKDF-SHA256 with a fixed salt; ``label`` is the info string."""
    prk = hmac.new(b"mcp_server hkdf salt", master, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + label + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    if not isinstance(text, str) or not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class _KeyRing:
    """Per-purpose keys derived from one secret (``token_key`` may be the seed's TOKEN_PARAMETER,
    which, without a secret, is also the master the other keys derive from: instances that share
    it agree on every key).  Without either, a random master that lives only in this process."""

    def __init__(self, secret: str | bytes | None, token_parameter: str | None = None):
        shared = secret or token_parameter
        self.ephemeral = not shared
        master = secrets.token_bytes(32) if not shared else (
            shared.encode() if isinstance(shared, str) else shared)
        self._keys = {purpose: _hkdf(master, label) for purpose, label in _KEY_LABELS.items()}
        self.token_key = token_parameter.encode() if token_parameter else self._keys["token"]
        self.kid = hashlib.sha256(b"kid" + self.token_key).hexdigest()[:12]
        self._aead: dict = {}

    def key(self, purpose: str) -> bytes:
        return self._keys[purpose]

    def _cipher(self, purpose: str):
        cipher = self._aead.get(purpose)
        if cipher is None:
            cipher = self._aead[purpose] = _require("sealing").AESGCM(self._keys[purpose])
        return cipher

    def seal(self, payload: dict, purpose: str = "request_state") -> str:
        """Encrypt and authenticate a JSON payload (AES-256-GCM, random 96-bit nonce)."""
        return self.seal_text(_dumps(payload), purpose)

    def unseal(self, token: typing.Any, purpose: str = "request_state") -> dict | None:
        """The payload of a sealed token, or None when it is not one of ours or was altered."""
        text = self.unseal_text(token, purpose)
        try:
            payload = None if text is None else _loads(text, _STORED_JSON_DEPTH)
        except ValueError:
            return None
        return payload if isinstance(payload, dict) else None

    def seal_text(self, text: str, purpose: str, context: str = "") -> str:
        """``text`` encrypted and authenticated; ``context`` (associated data) binds it to its
        place, so that it cannot be moved elsewhere and read there."""
        nonce = secrets.token_bytes(12)
        aad = purpose.encode() + (b"\n" + context.encode() if context else b"")
        return _b64url(nonce + self._cipher(purpose).encrypt(nonce, text.encode(), aad))

    def unseal_text(self, token: typing.Any, purpose: str, context: str = "") -> str | None:
        cipher = self._cipher(purpose)  # (a missing package is no bad token: it is said so)
        aad = purpose.encode() + (b"\n" + context.encode() if context else b"")
        try:
            raw = _unb64url(token)
            return None if len(raw) < 28 else cipher.decrypt(raw[:12], raw[12:], aad).decode()
        except Exception:
            return None

    def sign(self, text: str, purpose: str = "cursor") -> str:
        mac = hmac.new(self._keys[purpose], text.encode(), hashlib.sha256).digest()[:12]
        return _b64url(text.encode()) + "." + _b64url(mac)

    def verify(self, token: typing.Any, purpose: str = "cursor") -> str | None:
        if not isinstance(token, str) or token.count(".") != 1:
            return None
        body, mac = token.split(".")
        try:
            text = _unb64url(body).decode()
            expected = hmac.new(self._keys[purpose], text.encode(), hashlib.sha256).digest()[:12]
            return text if hmac.compare_digest(expected, _unb64url(mac)) else None
        except Exception:
            return None


class _Vault:
    """Credentials at rest: AES-256-GCM, a random nonce per value, associated data that binds a
    ciphertext to its owner (a session id), and a key id so that old keys still decrypt."""

    def __init__(self, key: str | bytes | None, previous: typing.Iterable = ()):
        """ValueError naming the setting when a key does not parse (``Settings.check_secrets``
        finds that at start-up)."""
        aes_gcm = _require("vault").AESGCM
        self.ephemeral = not key
        raw = secrets.token_bytes(32) if not key else (key if isinstance(key, bytes) else _parse_key(key))
        self.kid = hashlib.sha256(b"kid" + raw).hexdigest()[:8]
        self._ciphers = {self.kid: aes_gcm(raw)}
        for old in previous:
            old_raw = _parse_key(old, "ENCRYPTION_KEY_PREVIOUS")
            self._ciphers.setdefault(hashlib.sha256(b"kid" + old_raw).hexdigest()[:8], aes_gcm(old_raw))

    def encrypt(self, plain: str, associated: bytes) -> str:
        nonce = secrets.token_bytes(12)
        return f"v1.{self.kid}.{_b64url(nonce + self._ciphers[self.kid].encrypt(nonce, plain.encode(), associated))}"

    def decrypt(self, token: str, associated: bytes) -> str | None:
        try:
            version, kid, body = token.split(".")
            raw = _unb64url(body)
            if version != "v1" or kid not in self._ciphers or len(raw) < 28:
                return None
            return self._ciphers[kid].decrypt(raw[:12], raw[12:], associated).decode()
        except Exception:
            return None


# ==== 4. Registry and schemas ===================================================================
#
# Rules:
# - A tool's ``inputSchema`` is JSON Schema 2020-12 derived from the function's type hints (or
#   given verbatim); arguments are validated against it before the function runs, and a failure
#   names the field.  Per the 2025-11-25 clarification that is a tool execution error
#   (``isError``), so the model can correct itself; a malformed request is a protocol error.
# - A parameter annotated ``Context`` is injected and never appears in a schema.
# - Return values become content blocks (``_to_call_result``); dict-like values also become
#   ``structuredContent``.  Revision-specific trimming happens later, in ``_shape_*`` (section 5).
# - A skill (SEP-2640) is a snapshot taken at registration: the bytes its entry's digests describe
#   are the bytes ``resources/read`` serves, and nothing outside the files given (or, from a
#   folder, its regular non-dot files, links never followed) is ever published.
# - Sync functions run in a worker thread: a slow tool never blocks the event loop.  Only one
#   registered with ``inline=True`` runs on the loop; nothing moves there by itself, because a
#   function fast a thousand times can still stall once (a network wait, a lock) and then stall
#   every client of the process.


@dataclasses.dataclass(frozen=True, eq=False)
class Param:
    """Extra schema facts for a parameter: ``Annotated[str, Param(description=..., header="Region")]``.

    ``header`` mirrors the argument into the ``Mcp-Param-<header>`` HTTP header (SEP-2243) for
    2026-07-28 clients; use it only for plain strings, integers and booleans, never for secrets."""

    description: str | None = None
    title: str | None = None
    header: str | None = None
    schema: dict | None = None


class _Content:
    """Something a tool or prompt can return that becomes one content block."""

    def to_content(self) -> dict:
        raise NotImplementedError


class _Binary(_Content):
    kind = "image"
    default_mime = "image/png"

    def __init__(self, data: bytes | None = None, *, base64: str | None = None,
                 mime_type: str | None = None, annotations: dict | None = None):
        if (data is None) == (base64 is None):
            raise ValueError(f"{type(self).__name__} needs exactly one of data= or base64=")
        self.b64 = base64 if base64 is not None else _std_b64(data)
        self.mime_type = mime_type or self.default_mime
        self.annotations = annotations

    def to_content(self) -> dict:
        block = {"type": self.kind, "data": self.b64, "mimeType": self.mime_type}
        if self.annotations:
            block["annotations"] = self.annotations
        return block


class Image(_Binary):
    """Image content: ``Image(png_bytes)`` or ``Image(base64=..., mime_type="image/jpeg")``."""


class Audio(_Binary):
    """Audio content: ``Audio(wav_bytes)`` or ``Audio(base64=..., mime_type="audio/mpeg")``."""

    kind = "audio"
    default_mime = "audio/wav"


class EmbeddedResource(_Content):
    """An embedded resource: text, or binary given as ``blob`` bytes or a base64 string."""

    def __init__(self, uri: str, text: str | None = None, blob: bytes | str | None = None,
                 mime_type: str | None = None, annotations: dict | None = None):
        if (text is None) == (blob is None):
            raise ValueError("EmbeddedResource needs exactly one of text= or blob=")
        self.contents = {"uri": uri}
        if mime_type:
            self.contents["mimeType"] = mime_type
        if text is not None:
            self.contents["text"] = text
        else:
            self.contents["blob"] = blob if isinstance(blob, str) else _std_b64(blob)
        self.annotations = annotations

    def to_content(self) -> dict:
        block = {"type": "resource", "resource": self.contents}
        if self.annotations:
            block["annotations"] = self.annotations
        return block


class ResourceLink(_Content):
    """A link to a resource the client may read or subscribe to (2025-06-18 and later)."""

    def __init__(self, uri: str, name: str, *, title: str | None = None, description: str | None = None,
                 mime_type: str | None = None, size: int | None = None, annotations: dict | None = None):
        self.block = {"type": "resource_link", "uri": uri, "name": name}
        for key, value in (("title", title), ("description", description), ("mimeType", mime_type),
                           ("size", size), ("annotations", annotations)):
            if value is not None:
                self.block[key] = value

    def to_content(self) -> dict:
        return dict(self.block)


def _std_b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


_MAGIC_MIME = ((b"\x89PNG", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"),
               (b"RIFF", "audio/wav"), (b"ID3", "audio/mpeg"), (b"OggS", "audio/ogg"))


def _bytes_content(data: bytes) -> dict:
    """Raw bytes from a tool: an image or audio block when the magic says so, else a blob."""
    for magic, mime in _MAGIC_MIME:
        if data.startswith(magic):
            if mime == "audio/wav" and data[8:12] == b"WEBP":
                mime = "image/webp"
            cls = Audio if mime.startswith("audio/") else Image
            return cls(data, mime_type=mime).to_content()
    return EmbeddedResource("data:application/octet-stream", blob=data,
                            mime_type="application/octet-stream").to_content()


# ---- JSON Schema from type hints -----------------------------------------------------------------

_PRIMITIVE_SCHEMAS = {str: {"type": "string"}, int: {"type": "integer"}, float: {"type": "number"},
                      bool: {"type": "boolean"}, type(None): {"type": "null"},
                      bytes: {"type": "string", "contentEncoding": "base64"}}
_FORMAT_BY_NAME = {"datetime": "date-time", "date": "date", "time": "time", "UUID": "uuid"}


class _Injected:
    """Base of what the registry passes a function instead of an argument: a parameter annotated
    with a subclass (``Context``, section 5) is filled in by the server and left out of schemas."""

    __slots__ = ()


def _is_injected(annotation: typing.Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, _Injected)


def _is_context_annotation(annotation: typing.Any) -> bool:
    if _is_injected(annotation):
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_is_injected(arg) for arg in typing.get_args(annotation))
    return False


def _schema_for(tp: typing.Any, _seen: frozenset = frozenset()) -> dict:
    """JSON Schema (2020-12) for a Python type annotation."""
    if tp is inspect.Parameter.empty or tp is typing.Any or tp is object:
        return {}
    if tp in _PRIMITIVE_SCHEMAS:
        return dict(_PRIMITIVE_SCHEMAS[tp])
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is not None:
        return _generic_schema(origin, args, _seen)
    if tp in (list, tuple, set, frozenset):
        return {"type": "array"}
    if tp is dict:
        return {"type": "object"}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _enum_schema([member.value for member in tp])
    if isinstance(tp, type) and tp in _seen:
        return {"type": "object"}  # a recursive type: stop here rather than loop
    if _is_typeddict(tp):
        hints = typing.get_type_hints(tp, include_extras=True)
        required = sorted(getattr(tp, "__required_keys__", hints))
        props = {name: _schema_for(hint, _seen | {tp}) for name, hint in hints.items()}
        return {"type": "object", "properties": props, **({"required": required} if required else {})}
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _dataclass_schema(tp, _seen)
    if isinstance(tp, type) and tp.__name__ in _FORMAT_BY_NAME:
        return {"type": "string", "format": _FORMAT_BY_NAME[tp.__name__]}
    raise TypeError(f"cannot derive a JSON Schema for {tp!r}; annotate with a JSON-compatible type")


def _generic_schema(origin, args: tuple, seen: frozenset) -> dict:
    """The schema of a parameterized type: Annotated, unions, Literal, sequences, tuples, maps."""
    if origin is typing.Annotated:
        return _annotated_schema(_schema_for(args[0], seen), args[1:])
    if origin in (typing.Union, types.UnionType):
        members = [_schema_for(a, seen) for a in args]
        simple = [m.get("type") for m in members if set(m) == {"type"} and isinstance(m["type"], str)]
        return {"type": simple} if len(simple) == len(members) else {"anyOf": members}
    if origin is typing.Literal:
        return _enum_schema(list(args))
    if origin in (list, set, frozenset, collections.abc.Sequence, collections.abc.Iterable,
                  collections.abc.Set, collections.abc.MutableSequence):
        schema = {"type": "array"}
        if args:
            schema["items"] = _schema_for(args[0], seen)
        if origin in (set, frozenset, collections.abc.Set):
            schema["uniqueItems"] = True
        return schema
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return {"type": "array", "items": _schema_for(args[0], seen)}
        if not args:
            return {"type": "array"}
        return {"type": "array", "prefixItems": [_schema_for(a, seen) for a in args],
                "minItems": len(args), "maxItems": len(args)}
    if origin in (dict, collections.abc.Mapping, collections.abc.MutableMapping):
        schema = {"type": "object"}
        if len(args) == 2:
            schema["additionalProperties"] = _schema_for(args[1], seen)
        return schema
    raise TypeError(f"cannot derive a JSON Schema for {origin!r}{list(args)}; annotate with a JSON-compatible type")


def _annotated_schema(schema: dict, extras: tuple) -> dict:
    """``Annotated[T, "description"]`` or ``Annotated[T, Param(...)]``: T's schema, described."""
    for extra in extras:
        if isinstance(extra, str):
            schema["description"] = extra
        elif isinstance(extra, Param):
            if extra.description:
                schema["description"] = extra.description
            if extra.title:
                schema["title"] = extra.title
            if extra.header:
                schema["x-mcp-header"] = extra.header
            if extra.schema:
                schema.update(extra.schema)
    return schema


def _enum_schema(values: list) -> dict:
    """An enum of ``values`` (a Literal's or an Enum's), typed when they share one JSON type."""
    schema = {"enum": values}
    kinds = {type(v) for v in values}
    if len(kinds) == 1 and next(iter(kinds)) in _PRIMITIVE_SCHEMAS:
        schema["type"] = _PRIMITIVE_SCHEMAS[next(iter(kinds))]["type"]
    return schema


def _dataclass_schema(tp: type, seen: frozenset) -> dict:
    hints = typing.get_type_hints(tp, include_extras=True)
    props, required = {}, []
    for field in dataclasses.fields(tp):
        props[field.name] = _schema_for(hints.get(field.name, typing.Any), seen | {tp})
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            required.append(field.name)
        elif field.default is not dataclasses.MISSING and _jsonable(field.default):
            props[field.name]["default"] = field.default
    schema = {"type": "object", "properties": props}
    if required:
        schema["required"] = required
    doc = _description(tp)
    if doc and not (tp.__doc__ or "").startswith(tp.__name__ + "("):
        schema["description"] = doc
    return schema


def _is_typeddict(tp) -> bool:
    return isinstance(tp, type) and issubclass(tp, dict) and hasattr(tp, "__total__")


def _is_object_type(tp) -> bool:
    if typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    origin = typing.get_origin(tp) or tp
    return (origin in (dict, collections.abc.Mapping) or _is_typeddict(tp)
            or (isinstance(tp, type) and dataclasses.is_dataclass(tp)))


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def _description(obj) -> str | None:
    doc = inspect.getdoc(obj)
    if not doc:
        return None
    return doc.split("\n\n")[0].strip() or None


_AS_IS = frozenset((str, int, bool, dict, list, typing.Any, inspect.Parameter.empty, object))


def _convert(value, tp):
    """Turn validated JSON into the annotated Python type (dataclasses, enums, tuples, sets)."""
    if value is None or tp in _AS_IS:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return _convert(value, args[0])
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if arg is type(None):
                continue
            try:
                if _validate(value, _schema_for(arg)) is None:
                    return _convert(value, arg)
            except TypeError:
                continue
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(value)
    if tp is float and isinstance(value, int):
        return float(value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp) and isinstance(value, dict):
        hints = typing.get_type_hints(tp)
        return tp(**{k: _convert(v, hints.get(k, typing.Any)) for k, v in value.items()
                     if k in {f.name for f in dataclasses.fields(tp)}})
    if origin in (list, collections.abc.Sequence) and args and isinstance(value, list):
        return [_convert(v, args[0]) for v in value]
    if origin in (set, frozenset) and isinstance(value, list):
        return origin(_convert(v, args[0]) if args else v for v in value)
    if origin is tuple and isinstance(value, list):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0]) for v in value)
        return tuple(_convert(v, a) for v, a in zip(value, args)) if args else tuple(value)
    if origin is dict and len(args) == 2 and isinstance(value, dict):
        return {k: _convert(v, args[1]) for k, v in value.items()}
    return value


# ---- A JSON Schema 2020-12 validator ------------------------------------------------------------
#
# Enough of 2020-12 for tool arguments: types, enum/const, objects, arrays (items, prefixItems),
# string/number bounds, pattern, the composition keywords, if/then/else and local $ref (JSON
# pointers and $anchor).  Network $refs are never fetched (2026 spec: MUST NOT).  It returns the
# first problem as "at <path>: <what>", or None.

_JSON_TYPES = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool))
    or (isinstance(v, float) and v.is_integer()),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


def _validate(instance, schema, root=None, path="arguments", _depth=0) -> str | None:
    """The first way ``instance`` breaks ``schema`` (JSON Schema 2020-12, the parts tools use), as
    a sentence naming where; None when it conforms."""
    if schema is True or schema == {}:
        return None
    if schema is False:
        return f"at {path}: no value is allowed here"
    if not isinstance(schema, dict):
        return None
    if _depth > 64:
        return f"at {path}: schema nests too deeply"
    root = schema if root is None else root
    check = functools.partial(_validate, root=root, _depth=_depth + 1)
    if "$ref" in schema:
        target = _resolve_ref(root, schema["$ref"])
        if target is None:
            return f"at {path}: unresolvable $ref {schema['$ref']!r}"
        problem = check(instance, target, path=path)
        if problem:
            return problem
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if not any(_JSON_TYPES.get(k, lambda v: True)(instance) for k in kinds):
            return f"at {path}: expected {' or '.join(kinds)}, got {_json_type_name(instance)}"
    if "enum" in schema and not any(_json_equal(instance, e) for e in schema["enum"]):
        return f"at {path}: {_preview(instance)} is not one of {_preview(schema['enum'])}"
    if "const" in schema and not _json_equal(instance, schema["const"]):
        return f"at {path}: must be {_preview(schema['const'])}"
    if isinstance(instance, dict):
        problem = _object_problem(instance, schema, path, check)
    elif isinstance(instance, list):
        problem = _array_problem(instance, schema, path, check)
    else:
        problem = _scalar_problem(instance, schema, path)
    return problem or _combined_problem(instance, schema, path, check)


def _scalar_problem(instance, schema: dict, path: str) -> str | None:
    """String lengths and patterns; number bounds and steps."""
    if isinstance(instance, str):
        if len(instance) < schema.get("minLength", 0):
            return f"at {path}: shorter than {schema['minLength']} characters"
        if "maxLength" in schema and len(instance) > schema["maxLength"]:
            return f"at {path}: longer than {schema['maxLength']} characters"
        if "pattern" in schema and not re.search(schema["pattern"], instance):
            return f"at {path}: does not match the pattern {schema['pattern']!r}"
    if isinstance(instance, (int, float)) and not isinstance(instance, bool):
        for key, test, words in (("minimum", lambda a, b: a < b, "less than"),
                                 ("maximum", lambda a, b: a > b, "greater than"),
                                 ("exclusiveMinimum", lambda a, b: a <= b, "at most"),
                                 ("exclusiveMaximum", lambda a, b: a >= b, "at least")):
            if key in schema and isinstance(schema[key], (int, float)) and test(instance, schema[key]):
                return f"at {path}: {instance} is {words} {schema[key]}"
        step = schema.get("multipleOf")
        if step and (instance / step) % 1:
            return f"at {path}: {instance} is not a multiple of {step}"
    return None


def _object_problem(instance: dict, schema: dict, path: str, check) -> str | None:
    for name in schema.get("required", ()):
        if name not in instance:
            return f"at {path}: the required field {name!r} is missing"
    props = schema.get("properties", {})
    patterns = schema.get("patternProperties", {})
    for name, value in instance.items():
        sub = f"{path}.{name}"
        schemas = [props[name]] if name in props else []
        schemas += [sub_schema for pattern, sub_schema in patterns.items() if re.search(pattern, name)]
        if not schemas and "additionalProperties" in schema:
            if schema["additionalProperties"] is False:
                return f"at {path}: unexpected field {name!r}"
            schemas = [schema["additionalProperties"]]
        for sub_schema in schemas:
            problem = check(value, sub_schema, path=sub)
            if problem:
                return problem
    if len(instance) < schema.get("minProperties", 0):
        return f"at {path}: fewer than {schema['minProperties']} fields"
    for name, needed in schema.get("dependentRequired", {}).items():
        if name in instance:
            for other in needed:
                if other not in instance:
                    return f"at {path}: {other!r} is required when {name!r} is present"
    return None


def _array_problem(instance: list, schema: dict, path: str, check) -> str | None:
    prefix = schema.get("prefixItems", [])
    for i, item in enumerate(instance):
        item_schema = prefix[i] if i < len(prefix) else schema.get("items")
        if item_schema is not None:
            problem = check(item, item_schema, path=f"{path}[{i}]")
            if problem:
                return problem
    if len(instance) < schema.get("minItems", 0):
        return f"at {path}: fewer than {schema['minItems']} items"
    if "maxItems" in schema and len(instance) > schema["maxItems"]:
        return f"at {path}: more than {schema['maxItems']} items"
    if schema.get("uniqueItems"):
        seen = []
        for item in instance:
            if any(_json_equal(item, other) for other in seen):
                return f"at {path}: items are not unique"
            seen.append(item)
    return None


def _combined_problem(instance, schema: dict, path: str, check) -> str | None:
    """allOf, anyOf, oneOf, not, if/then/else."""
    for sub_schema in schema.get("allOf", ()):
        problem = check(instance, sub_schema, path=path)
        if problem:
            return problem
    if "anyOf" in schema:
        problems = [check(instance, s, path=path) for s in schema["anyOf"]]
        if all(problems):
            return problems[0] if len(problems) == 1 else f"at {path}: matches none of the allowed forms ({problems[0]})"
    if "oneOf" in schema:
        passing = sum(1 for s in schema["oneOf"] if check(instance, s, path=path) is None)
        if passing != 1:
            return f"at {path}: must match exactly one allowed form, matches {passing}"
    if "not" in schema and check(instance, schema["not"], path=path) is None:
        return f"at {path}: matches a form that is not allowed"
    if "if" in schema:
        branch = "then" if check(instance, schema["if"], path=path) is None else "else"
        if branch in schema:
            problem = check(instance, schema[branch], path=path)
            if problem:
                return problem
    return None


_ANNOTATION_KEYWORDS = frozenset(("description", "title", "default", "examples", "x-mcp-header"))


def _compile_validator(schema: dict) -> typing.Callable:
    """A fast check for the common tool schema (an object of primitive-typed properties);
    anything else, and every failure (for its message), goes to ``_validate``."""
    def full(arguments):
        return _validate(arguments, schema)

    if set(schema) - {"type", "properties", "required", "$schema"} or schema.get("type") != "object":
        return full
    tests = []
    for name, spec in schema.get("properties", {}).items():
        kind = spec.get("type") if isinstance(spec, dict) else None
        if not isinstance(kind, str) or kind not in _JSON_TYPES or set(spec) - _ANNOTATION_KEYWORDS - {"type"}:
            return full
        tests.append((name, _JSON_TYPES[kind]))
    required = tuple(schema.get("required", ()))

    def fast(arguments):
        for name in required:
            if name not in arguments:
                return full(arguments)
        for name, test in tests:
            if name in arguments and not test(arguments[name]):
                return full(arguments)
        return None
    return fast


def _resolve_ref(root: dict, ref: str):
    if not isinstance(ref, str) or not ref.startswith("#"):
        return None  # only local references; never fetched
    if ref == "#":
        return root
    if not ref.startswith("#/"):
        return _find_anchor(root, ref[1:])
    node = root
    for part in ref[2:].split("/"):
        part = urllib.parse.unquote(part).replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and _DECIMAL.fullmatch(part) and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _find_anchor(node, anchor: str):
    if isinstance(node, dict):
        if node.get("$anchor") == anchor:
            return node
        children = node.values()
    elif isinstance(node, list):
        children = node
    else:
        return None
    for child in children:
        found = _find_anchor(child, anchor)
        if found is not None:
            return found
    return None


def _json_type_name(value) -> str:
    for name in ("null", "boolean", "integer", "number", "string", "array", "object"):
        if _JSON_TYPES[name](value):
            return name
    return type(value).__name__


def _json_equal(a, b) -> bool:
    """JSON equality: true is not 1, at any depth; 1 equals 1.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    return a == b


def _preview(value) -> str:
    text = _dumps(value) if _jsonable(value) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---- Registered objects -----------------------------------------------------------------------


def _signature_facts(fn):
    """(signature, hints, name of the Context parameter or None) for a user function."""
    signature = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception as exc:
        raise TypeError(f"cannot read the type hints of {fn.__qualname__}: {exc}") from None
    ctx_param = None
    for name, param in signature.parameters.items():
        if _is_context_annotation(hints.get(name, param.annotation)):
            ctx_param = name
    return signature, hints, ctx_param


def _param_descriptions(fn) -> dict:
    """``name: text`` lines from an ``Args:`` section of a Google-style docstring."""
    doc = inspect.getdoc(fn) or ""
    found, in_args = {}, False
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped in ("Args:", "Arguments:", "Parameters:"):
            in_args = True
            continue
        if in_args:
            match = re.match(r"(\w+)(?:\s*\([^)]*\))?\s*:\s*(.+)", stripped)
            if match:
                found[match.group(1)] = match.group(2)
            elif stripped and not line.startswith((" ", "\t")):
                in_args = False
    return found


class _Callable:
    """What tools, resources and prompts share: how to call the user's function."""

    def __init__(self, fn):
        self.fn = fn
        self.signature, self.hints, self.ctx_param = _signature_facts(fn)
        self.is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None))
        self.takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD
                                for p in self.signature.parameters.values())
        # sync functions: False in a worker thread; True on the event loop, only when declared
        # (``inline=True``): a call that stalls there, even once, stalls every client
        self.inline = False
        self.arg_names = [name for name, p in self.signature.parameters.items()
                          if name != self.ctx_param and p.kind in (
                              inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
        # (name, the type to convert to, or None for JSON values taken as they are)
        self.arg_types = tuple((name, None if self.hints.get(name, inspect.Parameter.empty) in _AS_IS
                                else self.hints[name]) for name in self.arg_names)

    @property
    def on_loop(self) -> bool:
        """A sync function declared to run on the event loop (``inline=True``)."""
        return self.inline and not self.is_async

    async def invoke(self, arguments: dict, ctx, threads: anyio.CapacityLimiter | None = None):
        """Call the function with ``arguments`` (and ``ctx``); a sync one on a worker thread, one
        of ``threads`` (anyio's default limiter without it), unless declared ``inline``."""
        kwargs = {name: arguments[name] if tp is None else _convert(arguments[name], tp)
                  for name, tp in self.arg_types if name in arguments}
        if self.takes_kwargs:
            kwargs.update({k: v for k, v in arguments.items() if k not in kwargs})
        if self.ctx_param:
            kwargs[self.ctx_param] = ctx
        try:
            if self.is_async:
                result = await self.fn(**kwargs)
            elif self.inline:
                result = self.fn(**kwargs)  # declared cheap: no thread hand-off
            else:  # (the thread runs in a copy of this context: contextvars reach it)
                result = await _in_thread(functools.partial(self.fn, **kwargs), threads)
            if result.__class__ not in _PLAIN_RESULTS and inspect.isawaitable(result):
                result = await result
        except (SystemExit, KeyboardInterrupt) as exc:
            # asyncio lets these two through every task and out of the event loop: one call
            # (a library's sys.exit(), say) would end the process for every client
            raise _FunctionExit(f"{getattr(self.fn, '__name__', 'the function')} raised {exc!r}") from exc
        return result


class _FunctionExit(Exception):
    """A tool, resource or prompt function raised SystemExit or KeyboardInterrupt: it fails that
    one request, like any other exception, and the server keeps serving."""


_PLAIN_RESULTS = frozenset((str, dict, list, int, float, bool, bytes, type(None)))  # never awaitable


class _Tool(_Callable):
    def __init__(self, fn, name, *, title=None, description=None, annotations=None, icons=None,
                 input_schema=None, output_schema=None, meta=None, task=None, task_start="call"):
        super().__init__(fn)
        self.name = name
        self.metric_keys = {outcome: ("mcp_tool_calls_total", (("tool", name), ("outcome", outcome)))
                            for outcome in ("ok", "error")}
        self.metric_keys["duration"] = ("mcp_tool_duration_seconds", (("tool", name),))
        if task_start not in ("call", "explicit"):
            raise ValueError(f"tool {name!r}: task_start must be 'call' or 'explicit'")
        self.task_start = task_start
        if not re.fullmatch(r"[A-Za-z0-9_.\-/]{1,128}", name):
            raise ValueError(f"tool name {name!r}: use 1-128 characters of A-Z a-z 0-9 _ . - /")
        if task not in (None, "optional", "required"):
            raise ValueError(f"tool {name!r}: task must be None, 'optional' or 'required'")
        self.task = task
        self.login_required = False
        self.mask = None  # None: no masking; else extra field names on top of the defaults
        self.input_schema = input_schema or self._derive_input_schema()
        if self.input_schema.get("type") != "object":
            raise ValueError(f"tool {name!r}: inputSchema must have type 'object' at its root")
        returns = self.hints.get("return", inspect.Parameter.empty)
        if output_schema is None and returns not in (inspect.Parameter.empty, None, type(None)):
            if _is_object_type(returns):
                output_schema = _schema_for(returns)
        self.output_schema = output_schema
        self.check = _compile_validator(self.input_schema)
        self.headers = {prop: spec["x-mcp-header"] for prop, spec in
                        self.input_schema.get("properties", {}).items()
                        if isinstance(spec, dict) and "x-mcp-header" in spec}
        definition = {"name": name}
        if title:
            definition["title"] = title
        definition["description"] = description or _description(fn) or name
        definition["inputSchema"] = self.input_schema
        if output_schema:
            definition["outputSchema"] = output_schema
        if annotations:
            definition["annotations"] = dict(annotations)
        if icons:
            definition["icons"] = list(icons)
        if meta:
            definition["_meta"] = dict(meta)
        if task:
            definition["execution"] = {"taskSupport": task}
        self.definition = definition

    def _derive_input_schema(self) -> dict:
        props, required = {}, []
        described = _param_descriptions(self.fn)
        for name in self.arg_names:
            param = self.signature.parameters[name]
            schema = _schema_for(self.hints.get(name, param.annotation))
            if name in described and "description" not in schema:
                schema["description"] = described[name]
            if param.default is inspect.Parameter.empty:
                required.append(name)
            elif _jsonable(param.default) and not isinstance(param.default, enum.Enum):
                schema["default"] = param.default
            elif isinstance(param.default, enum.Enum):
                schema["default"] = param.default.value
            props[name] = schema
        schema = {"type": "object", "properties": props}
        if required:
            schema["required"] = required
        return schema


class _Resource(_Callable):
    def __init__(self, fn, uri, *, name=None, title=None, description=None, mime_type=None,
                 size=None, annotations=None, icons=None, meta=None):
        super().__init__(fn)
        self.uri = uri
        self.mime_type = mime_type
        self.listed = True  # in resources/list (a skill's supporting files are read, not listed)
        self.template = "{" in uri
        definition = {("uriTemplate" if self.template else "uri"): uri, "name": name or fn.__name__}
        for key, value in (("title", title), ("description", description or _description(fn)),
                           ("mimeType", mime_type), ("size", size), ("annotations", annotations),
                           ("icons", icons), ("_meta", meta)):
            if value is not None:
                definition[key] = value
        self.definition = definition
        if self.template:
            self.variables, self.pattern = _compile_uri_template(uri)

    def match(self, uri: str) -> dict | None:
        found = self.pattern.fullmatch(uri)
        if not found:
            return None
        return {k: urllib.parse.unquote(v) for k, v in found.groupdict().items() if v is not None}

    def contents(self, value, uri: str) -> list:
        """A resource function's return value as ``resources/read`` contents."""
        items = value if isinstance(value, list) else [value]
        out = []
        for item in items:
            if isinstance(item, dict) and ("text" in item or "blob" in item):
                entry = {"uri": uri, **item}
            elif isinstance(item, str):
                entry = {"uri": uri, "text": item}
            elif isinstance(item, (bytes, bytearray)):
                entry = {"uri": uri, "blob": _std_b64(bytes(item))}
            elif isinstance(item, EmbeddedResource):
                entry = dict(item.contents)
            else:
                entry = {"uri": uri, "text": _dumps(_plain_json(item)), "mimeType": "application/json"}
            if self.mime_type and "mimeType" not in entry:
                entry["mimeType"] = self.mime_type
            out.append(entry)
        return out


def _compile_uri_template(template: str):
    """RFC 6570 level 1-2 (``{var}``, ``{+var}``, ``{#var}``) and path/query forms as a regex."""
    variables, parts, pos = [], [], 0
    for found in re.finditer(r"\{([+#/?&]?)([A-Za-z0-9_,.*]+)\}", template):
        parts.append(re.escape(template[pos:found.start()]))
        operator, names = found.group(1), [n.rstrip("*") for n in found.group(2).split(",")]
        variables.extend(names)
        if operator in ("", "/"):
            sep = "/" if operator == "/" else ""
            parts.append(sep + r"/?".join(f"(?P<{n}>[^/?#]*)" for n in names))
        elif operator in ("+", "#"):
            parts.append(("#" if operator == "#" else "") + ",".join(f"(?P<{n}>.*?)" for n in names))
        else:  # ? and &: optional query parameters in order
            lead = "\\?" if operator == "?" else "&"
            parts.append("(?:" + lead + "&?".join(f"(?:{n}=(?P<{n}>[^&#]*))?" for n in names) + ")?")
        pos = found.end()
    parts.append(re.escape(template[pos:]))
    return variables, re.compile("".join(parts))


class _Prompt(_Callable):
    def __init__(self, fn, name, *, title=None, description=None, icons=None, meta=None):
        super().__init__(fn)
        self.name = name
        described = _param_descriptions(fn)
        arguments = []
        for arg in self.arg_names:
            param = self.signature.parameters[arg]
            entry = {"name": arg}
            schema = _schema_for(self.hints.get(arg, param.annotation))
            if schema.get("title"):
                entry["title"] = schema["title"]
            text = schema.get("description") or described.get(arg)
            if text:
                entry["description"] = text
            entry["required"] = param.default is inspect.Parameter.empty
            arguments.append(entry)
        self.choices = {arg: [str(v) for v in _schema_for(self.hints.get(arg, str)).get("enum", ())]
                        for arg in self.arg_names}
        definition = {"name": name}
        if title:
            definition["title"] = title
        definition["description"] = description or _description(fn) or name
        definition["arguments"] = arguments
        for key, value in (("icons", icons), ("_meta", meta)):
            if value is not None:
                definition[key] = value
        self.definition = definition

    def messages(self, value) -> list:
        items = value if isinstance(value, (list, tuple)) else [value]
        out = []
        for item in items:
            if isinstance(item, dict) and "role" in item and "content" in item:
                content = item["content"]
                out.append({"role": item["role"],
                            "content": content.to_content() if isinstance(content, _Content) else content})
            elif isinstance(item, str):
                out.append({"role": "user", "content": {"type": "text", "text": item}})
            elif isinstance(item, _Content):
                out.append({"role": "user", "content": item.to_content()})
            else:
                raise TypeError(f"prompt {self.name!r} returned a {type(item).__name__}; return str, "
                                "content helpers or {'role', 'content'} dicts")
        return out


def _plain_json(value):
    """Dataclasses, enums and tuples as plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _plain_json(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): _plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain_json(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def _to_call_result(value, tool: _Tool) -> dict:
    """A tool's return value as a CallToolResult (newest shape)."""
    if isinstance(value, dict) and value.get("__mcp_result__") is True:
        return {k: v for k, v in value.items() if k != "__mcp_result__"}
    if value is None:
        return {"content": []}
    if isinstance(value, str):
        return {"content": [{"type": "text", "text": value}]}
    if isinstance(value, _Content):
        return {"content": [value.to_content()]}
    if isinstance(value, (bytes, bytearray)):
        return {"content": [_bytes_content(bytes(value))]}
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, (str, _Content, bytes)) or (isinstance(v, dict) and isinstance(v.get("type"), str))
            for v in value):
        blocks = []
        for item in value:
            if isinstance(item, str):
                blocks.append({"type": "text", "text": item})
            elif isinstance(item, _Content):
                blocks.append(item.to_content())
            elif isinstance(item, bytes):
                blocks.append(_bytes_content(item))
            else:
                blocks.append(item)
        return {"content": blocks}
    structured = _plain_json(value)
    result = {"content": [{"type": "text", "text": _dumps(structured)}]}
    if isinstance(structured, (dict, list)) or tool.output_schema:
        result["structuredContent"] = structured
    return result


# ---- Skills (SEP-2640): SKILL.md frontmatter and a skill's files ----------------------------------
#
# A skill is snapshotted when it is registered: its bytes are read once, its digests computed
# from those bytes, and ``resources/read`` serves exactly them, so an entry's digests always
# describe what is served.  A folder is read without following symbolic links and without
# dot-files (``.git``, ``.env``): only what an author placed in the skill is ever published.

_SKILL_NAME_RE = re.compile(r"(?!.*--)[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?")
_SKILL_SEGMENT_RE = re.compile(r"[A-Za-z0-9._~-]+")
_SKILL_MAX_FILES = 512
_SKILL_MAX_BYTES = 16 * 1024 * 1024
_YAML_KEY_RE = re.compile(r"([A-Za-z0-9_][A-Za-z0-9_.-]*):(?:[ \t]+(.*))?")
_YAML_INT_RE = re.compile(r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+")
_YAML_FLOAT_RE = re.compile(r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?")


def _yaml_scalar(text: str, where: str):
    """One YAML 1.2 core-schema scalar (plain or quoted), as a YAML parser types it."""
    text = text.strip()
    if text[:1] in ('"', "'"):
        quote = text[0]
        if len(text) < 2 or not text.endswith(quote):
            raise ValueError(f"{where}: unterminated quoted string")
        inner = text[1:-1]
        if quote == "'":
            if re.search(r"(?<!')'(?!')", inner.replace("''", "")):
                raise ValueError(f"{where}: stray quote inside a single-quoted string")
            return inner.replace("''", "'")
        if re.search(r'(?<!\\)"', inner) or re.search(r'\\[^"\\nt/]', inner):
            raise ValueError(f"{where}: only \\\" \\\\ \\n \\t \\/ escapes are supported")
        return _loads(f'"{inner}"')
    text = re.split(r"[ \t]#", text, maxsplit=1)[0].rstrip()
    if text[:1] in tuple("[]{}>|*&!%@`,?:-") and text not in ("-",) and not _YAML_FLOAT_RE.fullmatch(text):
        raise ValueError(f"{where}: flow collections, block scalars, anchors and tags are not supported; "
                         "quote the value")
    if ": " in text:
        raise ValueError(f"{where}: a plain value may not contain ': '; quote it")
    if text in ("", "~", "null", "Null", "NULL"):
        return None
    if text in ("true", "True", "TRUE", "false", "False", "FALSE"):
        return text.lower() == "true"
    if _YAML_INT_RE.fullmatch(text):
        return int(text, 0) if text[:2] in ("0o", "0x") else int(text)
    if _YAML_FLOAT_RE.fullmatch(text):
        return float(text)
    if text.lower() in (".inf", "+.inf", "-.inf", ".nan"):
        return float(text.replace(".", "", 1))
    return text


def _yaml_block(lines: list, start: int, indent: int, where: str) -> tuple:
    """(value, next line index) of the mapping or list whose lines are indented by ``indent``."""
    i = start
    is_list = lines[i][1].startswith("- ") or lines[i][1] == "-"
    value: typing.Any = [] if is_list else {}
    while i < len(lines):
        depth, text = lines[i][0], lines[i][1]
        if depth < indent:
            break
        if depth > indent:
            raise ValueError(f"{where}: line {lines[i][2]}: unexpected indentation")
        if is_list:
            if not (text.startswith("- ") or text == "-"):
                raise ValueError(f"{where}: line {lines[i][2]}: expected a '- ' list item")
            value.append(_yaml_scalar(text[2:], f"{where}: line {lines[i][2]}"))
            i += 1
            continue
        found = _YAML_KEY_RE.fullmatch(text)
        if not found:
            raise ValueError(f"{where}: line {lines[i][2]}: expected 'key: value'")
        key, rest = found.group(1), found.group(2)
        if key in value:
            raise ValueError(f"{where}: line {lines[i][2]}: duplicate key {key!r}")
        i += 1
        if rest is not None and rest.split("#")[0].strip():
            value[key] = _yaml_scalar(rest, f"{where}: line {lines[i - 1][2]}")
        elif i < len(lines) and (lines[i][0] > depth or (
                lines[i][0] == depth and lines[i][1].startswith("- "))):
            value[key], i = _yaml_block(lines, i, lines[i][0], where)
        else:
            value[key] = None
    return value, i


def _parse_frontmatter(text: str, where: str = "SKILL.md") -> tuple:
    """(frontmatter, body) of a SKILL.md: the leading ``---`` YAML block as JSON values.

    Block mappings, block lists and core-schema scalars only (what frontmatter uses); anything
    else is refused rather than guessed, because an entry's frontmatter MUST equal what a YAML
    parser reads from the file."""
    source = text[1:] if text.startswith("\ufeff") else text
    found = re.match(r"---\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|$)", source, re.S)
    if not found:
        raise ValueError(f"{where} must begin with YAML frontmatter between '---' lines")
    lines = []
    for number, raw in enumerate(found.group(1).splitlines(), start=2):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if "\t" in raw[:len(raw) - len(raw.lstrip())]:
            raise ValueError(f"{where}: line {number}: indent with spaces, not tabs")
        lines.append((len(raw) - len(raw.lstrip(" ")), raw.strip(), number))
    frontmatter = _yaml_block(lines, 0, 0, where)[0] if lines else {}
    if not isinstance(frontmatter, dict):
        raise ValueError(f"{where}: the frontmatter must be a mapping")
    for field in ("name", "description"):
        if not isinstance(frontmatter.get(field), str) or not frontmatter[field]:
            raise ValueError(f"{where}: the frontmatter needs a non-empty string {field!r}")
    return frontmatter, source[found.end():]


def _file_mime(path: str) -> str:
    import mimetypes
    if path.endswith(".md"):
        return "text/markdown"
    return mimetypes.guess_type(path)[0] or "application/octet-stream"


class _Skill:
    """One skill: its ``skill://`` URIs, verbatim frontmatter and the files it publishes."""

    def __init__(self, skill_md: str | bytes, files: dict | None = None, *, prefix: str = ""):
        raw = skill_md.encode("utf-8") if isinstance(skill_md, str) else bytes(skill_md)
        self.frontmatter, _ = _parse_frontmatter(raw.decode("utf-8"))
        name = self.frontmatter["name"]
        if not _SKILL_NAME_RE.fullmatch(name):
            raise ValueError(f"skill name {name!r}: 1-64 lowercase letters, digits and single hyphens, "
                             "starting and ending with a letter or digit (Agent Skills naming rules)")
        segments = [s for s in prefix.strip("/").split("/") if s]
        bad = [s for s in segments if not _SKILL_SEGMENT_RE.fullmatch(s)]
        if bad:
            raise ValueError(f"skill prefix segment(s) {bad}: use letters, digits and . _ ~ -")
        self.path = "/".join(segments + [name])
        self.root = f"skill://{self.path}"
        self.uri = f"{self.root}/SKILL.md"
        self.files = {"SKILL.md": raw}
        for rel, data in (files or {}).items():
            parts = rel.split("/")
            if rel == "SKILL.md" or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
                raise ValueError(f"skill {name}: file path {rel!r} must be relative, without '.', '..' or "
                                 "dot-files")
            self.files[rel] = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        if len(self.files) > _SKILL_MAX_FILES or sum(map(len, self.files.values())) > _SKILL_MAX_BYTES:
            raise ValueError(f"skill {name}: more than {_SKILL_MAX_FILES} files or 16 MiB, the limits every "
                             "host must accept (SEP-2640)")
        self.entry = {"uri": self.uri, "frontmatter": self.frontmatter, "resources": [
            {"uri": self.file_uri(rel), "digest": "sha256:" + hashlib.sha256(data).hexdigest(), "size": len(data)}
            for rel, data in self.files.items()]}

    def file_uri(self, rel: str) -> str:
        return f"{self.root}/{urllib.parse.quote(rel, safe='/')}"

    @classmethod
    def from_folder(cls, folder: str, prefix: str = "") -> "_Skill":
        """The skill in ``folder`` (its SKILL.md and every regular file below it)."""
        files = {}
        for base, dirs, names in os.walk(folder, followlinks=False):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not os.path.islink(os.path.join(base, d)))
            for filename in sorted(names):
                full = os.path.join(base, filename)
                if filename.startswith(".") or os.path.islink(full) or not os.path.isfile(full):
                    continue
                rel = os.path.relpath(full, folder).replace(os.sep, "/")
                with open(full, "rb") as f:
                    files[rel] = f.read()
        if "SKILL.md" not in files:
            raise ValueError(f"{folder} has no SKILL.md")
        skill_md = files.pop("SKILL.md")
        try:
            return cls(skill_md, files, prefix=prefix)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{os.path.join(folder, 'SKILL.md')}: {exc}") from None

    def directories(self) -> dict:
        """{directory URI: [child Resource]} for every directory level of the skill (and its prefix)."""
        tree: dict = {self.root: {}}
        segments = self.path.split("/")
        for depth in range(1, len(segments)):  # the prefix levels (acme, acme/billing) are directories too
            parent, child = "skill://" + "/".join(segments[:depth]), "skill://" + "/".join(segments[:depth + 1])
            tree[parent] = {child: {"uri": child, "name": segments[depth], "mimeType": "inode/directory"}}
        for rel, data in self.files.items():
            parts = rel.split("/")
            for depth in range(len(parts)):
                parent = "/".join([self.root] + [urllib.parse.quote(p) for p in parts[:depth]])
                tree.setdefault(parent, {})
                child_uri = f"{parent}/{urllib.parse.quote(parts[depth])}"
                if depth == len(parts) - 1:
                    tree[parent][child_uri] = {"uri": child_uri, "name": parts[depth],
                                               "mimeType": _file_mime(rel), "size": len(data)}
                else:
                    tree[parent][child_uri] = {"uri": child_uri, "name": parts[depth],
                                               "mimeType": "inode/directory"}
        return {uri: [children[k] for k in sorted(children)] for uri, children in tree.items()}


def _skills_under(folder: str) -> list:
    """Every skill under ``folder``: each directory holding a SKILL.md (links and dot-directories
    are not followed); its path below ``folder`` is its skill path."""
    skills = []
    for base, dirs, names in sorted(os.walk(folder, followlinks=False)):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if "SKILL.md" in names and os.path.realpath(base) != os.path.realpath(folder):
            rel = os.path.relpath(base, folder).replace(os.sep, "/")
            skill = _Skill.from_folder(base, prefix=rel.rpartition("/")[0])
            if skill.frontmatter["name"] != rel.rpartition("/")[2]:
                raise ValueError(f"{base}: the directory name must equal the frontmatter name "
                                 f"{skill.frontmatter['name']!r}")
            skills.append(skill)
    if not skills:
        raise ValueError(f"no skill (a directory with a SKILL.md) under {folder}")
    return skills


# ==== 5. MCP core (sans-IO) =====================================================================
#
# Rules:
# - The core never touches a socket, HTTP or a store.  A transport builds a ``Context`` (method,
#   params, revision, client capabilities, session record, and an outbound channel ``_out``),
#   calls ``_respond(ctx)`` and writes what comes back.  Whatever else the core needs (events to
#   every client, background work, sealed records, cancellation, a listen stream) it asks of its
#   ``_RuntimePort``; nothing in this section names a later one.
# - ``_Registry`` holds what is offered, ``_ProtocolCore`` serves requests, ``_CoreMethods``
#   has the handlers of the method tables; ``MCPServer`` (section 10) wires them to the world.
# - Era: a request whose ``params._meta`` names a protocol version is modern (2026-07-28,
#   stateless); ``initialize`` and everything else is legacy and belongs to a session.
# - Handlers build the newest result shape; ``_shape_*`` trims it for an older revision, and
#   ``_finish_modern`` adds what 2026-07-28 requires (``resultType``, cache hints, serverInfo).
# - Extensions are declared through ``Extension`` and held by the server's ``_Extensions``: that
#   one component puts them in ``capabilities.extensions`` (2026-07-28 always, 2025-11-25 when
#   any) and answers their methods after the core table; no extension replaces a core method.
#   Tasks, skills and apps are built on it, as any user's extension would be.
# - One tool API serves both eras: ``ctx.ask`` sends real server-to-client requests to a legacy
#   client and waits; for a modern client it ends the round with ``input_required`` and a sealed
#   ``requestState`` carrying the answers so far, and the tool runs again from the top on retry.
#   A tool therefore does its side effects after its asks.  An ``inputResponses`` answer counts
#   only for a key that requestState lists as asked, with a digest of that very question; answers
#   without a requestState are ignored (the question is asked).
#
# Theory of operation: ``_respond`` runs the middleware chain around ``_dispatch``, which looks the
# method up in the era's table.  Errors leave as ``RpcError`` (with an HTTP status for the
# transport), ``_InputRequired`` becomes an ``input_required`` result, ``_Cancelled`` means "say
# nothing", and anything else, SystemExit and KeyboardInterrupt included, is logged with a
# correlation id and reported as -32603 (a tool's, as an ``isError`` result): no request ends
# the process.


class _InputRequired(Exception):
    def __init__(self, requests: dict):
        self.requests = requests


_CAPABILITY_OF = {
    "elicitation/create": "elicitation",
    "sampling/createMessage": "sampling",
    "roots/list": "roots",
}
# What a client can be asked, by the revision whose ClientCapabilities added it (sampling and
# roots are in all of them): a client that speaks an older revision has no such thing, whatever
# its capabilities say, and is told which revision it would need.
_CLIENT_FEATURE_SINCE = {
    "elicitation": ("Elicitation", "2025-06-18"),
    "elicitation.form": ("Elicitation", "2025-06-18"),
    "elicitation.url": ("URL-mode elicitation", "2025-11-25"),
    "sampling.tools": ("Sampling with tools", "2025-11-25"),
    "sampling.context": ("The sampling.context capability", "2025-11-25"),
}
_MRTR_METHODS = ("tools/call", "prompts/get", "resources/read")
_TASKS_2025_11_25 = ("tasks/get", "tasks/result", "tasks/list", "tasks/cancel")  # (experimental there)
# What a client makes its session keep (capabilities and clientInfo; subscriptions), as JSON bytes:
# a session is stored whole and read on every request.
_MAX_CLIENT_STATE = 8192
_CACHEABLE = ("server/discover", "tools/list", "prompts/list", "resources/list",
              "resources/templates/list", "resources/read")


class Context(_Injected):
    """The request a tool, resource or prompt function is serving, and what it can do with it."""

    __slots__ = ("server", "method", "request_id", "params", "meta", "protocol_version", "modern",
                 "client_capabilities", "session_id", "session", "principal", "_out", "_answers",
                 "_responses", "_asked", "_ask_seq", "_cancelled", "_last_progress", "_session_changed",
                 "_scope", "_log_threshold", "_task_run", "base_url", "round_state")

    def __init__(self, server: _CoreMethods, method: str, params: dict, request_id=None, *,
                 version: str = LATEST_LEGACY, modern: bool = False, capabilities: dict | None = None,
                 session_id: str | None = None, session: dict | None = None, out=None,
                 principal: str | None = None, base_url: str | None = None):
        self.server = server
        self.method = method
        self.params = params
        self.request_id = request_id
        meta = params.get("_meta")
        self.meta = meta if isinstance(meta, dict) else {}
        self.protocol_version = version
        self.modern = modern
        self.client_capabilities = capabilities or {}
        self.session_id = session_id
        self.session = session
        self.principal = principal
        self.base_url = base_url  # this server's external address, for links a tool hands out
        # What a tool keeps across 2026-07-28 input rounds (sealed into requestState with the
        # answers): e.g. an id it made in round 1 that its retry must reuse, not make again.
        self.round_state: dict = {}
        self._out = out
        self._answers: dict = {}
        self._responses: dict = {}
        # key -> digest of the question asked under it (sealed in requestState): an answer counts
        # only for the very question this server asked, never for one it did not ask.
        self._asked: dict = {}
        self._ask_seq = 0
        self._cancelled = False
        self._last_progress = None
        self._session_changed = False
        self._scope = None  # the request's cancel scope (``_cancel_scope``): cancel() ends it
        self._task_run = None  # the _TaskRun when this call runs as a task (tasks extension)
        if modern:
            level = self.meta.get(_META_LOGLEVEL)
            self._log_threshold = _LOG_RANK.get(level) if isinstance(level, str) else None
        else:
            self._log_threshold = _LOG_RANK.get((session or {}).get("log") or "info")

    # -- facts about the client -----------------------------------------------------------------

    @property
    def cancelled(self) -> bool:
        """True once the client cancelled this request (or, on 2026 HTTP, went away)."""
        return self._cancelled

    def supports(self, capability: str) -> bool:
        """Whether the client declared a capability that its revision has: ``"sampling"``,
        ``"sampling.tools"``, ``"elicitation"`` (form mode), ``"elicitation.url"``, ``"roots"``..."""
        feature = _CLIENT_FEATURE_SINCE.get(capability)
        if feature is not None and self.protocol_version < feature[1]:
            return False
        head, _, sub = capability.partition(".")
        caps = self.client_capabilities
        if not isinstance(caps, dict) or head not in caps:
            return False
        value = caps[head]
        if not sub:
            if head == "elicitation" and isinstance(value, dict) and value and "form" not in value:
                return False  # {"url": {}} alone declares URL mode only
            return True
        if head == "elicitation" and sub == "form":
            return isinstance(value, dict) and (not value or "form" in value)
        return isinstance(value, dict) and sub in value

    # -- request-scoped notifications ------------------------------------------------------------

    async def report_progress(self, progress: float, total: float | None = None,
                              message: str | None = None) -> None:
        """Send ``notifications/progress`` if the client asked for progress (``progressToken``)."""
        token = self.meta.get("progressToken")
        if token is None or self._out is None:
            return
        if self._last_progress is not None and progress <= self._last_progress:
            return  # the spec requires progress to increase; drop a step backwards
        self._last_progress = progress
        params = {"progressToken": token, "progress": progress}
        if total is not None:
            params["total"] = total
        if message is not None and self.protocol_version >= "2025-03-26":
            params["message"] = message
        await self._out.send({"jsonrpc": "2.0", "method": "notifications/progress", "params": params})

    async def log(self, level: str, data: typing.Any, logger: str | None = None) -> None:
        """Send a ``notifications/message`` log line to the client, if its level allows it."""
        rank = _LOG_RANK.get(level)
        if rank is None:
            raise ValueError(f"unknown log level {level!r}; use one of {', '.join(_LOG_LEVELS)}")
        if self._log_threshold is None or rank < self._log_threshold or self._out is None:
            return
        params = {"level": level, "data": data}
        if logger:
            params["logger"] = logger
        await self._out.send({"jsonrpc": "2.0", "method": "notifications/message", "params": params})

    async def close_sse_stream(self) -> None:
        """End this request's SSE response now; the client resumes with ``Last-Event-ID`` and
        receives the rest (2025-11-25 polling).  Does nothing where resuming is impossible."""
        if self._out is not None and hasattr(self._out, "detach"):
            await self._out.detach()

    # -- asking the client ---------------------------------------------------------------------

    async def ask(self, requests: dict, *, asked_only: bool = False) -> dict:
        """Ask the client several things at once: ``{key: {"method": ..., "params": ...}}``.

        Returns ``{key: result}``.  Legacy clients get real requests; modern ones a round trip.
        ``asked_only``: on 2026-07-28 an answer counts only if the sealed requestState shows
        this very question was asked (for a confirmation: no answer made up in advance)."""
        for key, request in requests.items():
            self._require_capability(request)
        if not self.modern:
            if self._out is None or not hasattr(self._out, "request"):
                raise ToolError("This transport cannot carry requests to the client.")
            results = await _gather(*(self._out.request(r["method"], r.get("params", {}))
                                             for r in requests.values()))
            return dict(zip(requests, results))
        answers, missing = {}, {}
        for key, request in requests.items():
            question = {"method": request["method"], "params": request.get("params", {})}
            asked, digest = self._asked.get(key), _question_digest(question)
            if asked != digest and (asked is not None or asked_only):
                self._answers.pop(key, None)  # an answer to another question (or none asked): ask this one
                missing[key] = question
            elif key in self._answers:
                answers[key] = self._answers[key]
            elif key in self._responses:
                answers[key] = self._answers[key] = _checked_input_response(
                    key, request["method"], self._responses[key])
            else:
                missing[key] = question
        if missing and self._task_run is not None and self._task_run.started:
            for key, value in (await self._task_run.wait_input(missing)).items():
                answers[key] = self._answers[key] = _checked_input_response(key, missing[key]["method"], value)
                self._asked[key] = _question_digest(missing[key])
        elif missing:
            _require("sealing")  # the answers so far travel sealed: without it, a tool error now
            raise _InputRequired(missing)
        return answers

    async def credentials(self) -> dict:
        """The signed-in user's upstream tokens (decrypted), or a ToolError telling them to log in."""
        return await self.server._login_flow().credentials(self)

    async def upstream(self, path: str, params: dict | None = None, *, method: str = "GET",
                       body: dict | None = None):
        """Call ``path`` of the upstream API as the signed-in user (GET unless ``method`` says
        otherwise, with ``body``), through the login's provider, refreshing its login once."""
        return await self.server._login_flow().api(self, path, params, method=method, body=body)

    async def run_as_task(self) -> None:
        """Continue this call as a task (for tools registered with ``task_start="explicit"``).

        With the tasks extension negotiated, the client gets its task handle now and the rest of
        the function runs in the background; otherwise this does nothing."""
        if self._task_run is not None and not self._task_run.started:
            await self._task_run.start()

    async def _ask_one(self, method: str, params: dict, key: str | None, asked_only: bool = False):
        if key is None:
            self._ask_seq += 1
            key = f"ask{self._ask_seq}"
        answers = await self.ask({key: {"method": method, "params": params}}, asked_only=asked_only)
        return answers[key]

    async def elicit(self, message: str, schema: dict, *, key: str | None = None,
                     asked_only: bool = False) -> dict:
        """Ask the user for structured input (form mode).  Returns ``{"action", "content"?}``.
        ``asked_only``: see ``ask`` (a confirmation must not take an answer given in advance)."""
        params = {"message": message, "requestedSchema": schema}
        return await self._ask_one("elicitation/create", params, key, asked_only)

    async def elicit_url(self, message: str, url: str, *, elicitation_id: str | None = None,
                         key: str | None = None) -> dict:
        """Send the user to a URL (URL-mode elicitation, 2025-11-25 and later)."""
        params = {"mode": "url", "message": message, "url": url,
                  "elicitationId": elicitation_id or secrets.token_urlsafe(12)}
        return await self._ask_one("elicitation/create", params, key)

    async def sample(self, prompt: str | list, *, max_tokens: int = 1000, key: str | None = None,
                     **params) -> dict:
        """Ask the client's model for a completion.  ``prompt`` is text or a list of messages."""
        messages = ([{"role": "user", "content": {"type": "text", "text": prompt}}]
                    if isinstance(prompt, str) else list(prompt))
        body = {"messages": messages, "maxTokens": max_tokens}
        body.update({_camel(k): v for k, v in params.items()})
        return await self._ask_one("sampling/createMessage", body, key)

    async def list_roots(self, *, key: str | None = None) -> list:
        """The client's roots (``[{"uri", "name"?}]``)."""
        result = await self._ask_one("roots/list", {}, key)
        return list(result.get("roots", [])) if isinstance(result, dict) else []

    def _require_capability(self, request: dict) -> None:
        method = request.get("method")
        head = _CAPABILITY_OF.get(method)
        if head is None:
            raise ValueError(f"cannot ask the client {method!r}; use elicitation/create, "
                             "sampling/createMessage or roots/list")
        params = request.get("params") or {}
        need, shape = head, {head: {}}
        if method == "elicitation/create" and params.get("mode") == "url":
            need, shape = "elicitation.url", {"elicitation": {"url": {}}}
        elif method == "sampling/createMessage" and params.get("tools"):
            need, shape = "sampling.tools", {"sampling": {"tools": {}}}
        elif (method == "sampling/createMessage" and params.get("includeContext") in ("thisServer", "allServers")
              and self.protocol_version >= _CLIENT_FEATURE_SINCE["sampling.context"][1]):
            need, shape = "sampling.context", {"sampling": {"context": {}}}  # (before: plain sampling)
        if self.supports(need):
            return
        feature, since = _CLIENT_FEATURE_SINCE.get(need, (need, ""))
        if self.protocol_version < since:
            raise ToolError(f"{feature} is not part of MCP {self.protocol_version}, the revision this client "
                            f"speaks; it needs {since} or later, so the client cannot be asked.")
        if self.modern:
            raise _missing_capability(shape, need)
        raise ToolError(f"The client did not declare the {need} capability, so it cannot be asked.")


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _checked_input_response(key: str, method: str, value) -> dict:
    """An ``inputResponses`` entry, checked for the shape its request expects."""
    ok = isinstance(value, dict) and (
        (method == "elicitation/create" and value.get("action") in ("accept", "decline", "cancel"))
        or (method == "sampling/createMessage" and "content" in value)
        or (method == "roots/list" and isinstance(value.get("roots"), list)))
    if not ok:
        raise _invalid_params(f"inputResponses.{key} is not a valid answer to {method}.", {"key": key})
    return value


# Fields each revision added, per kind of object (from the official schemas); ``_without_newer_fields`` drops
# the ones a client's revision does not define.
_ADDED_IN = {
    "tool": {"annotations": "2025-03-26", "title": "2025-06-18", "outputSchema": "2025-06-18",
             "_meta": "2025-06-18", "icons": "2025-11-25", "execution": "2025-11-25"},
    "listing": {"title": "2025-06-18", "_meta": "2025-06-18", "icons": "2025-11-25"},
    "argument": {"title": "2025-06-18"},
    "implementation": {"title": "2025-06-18", "description": "2025-11-25", "icons": "2025-11-25",
                       "websiteUrl": "2025-11-25"},
    "content": {"_meta": "2025-06-18", "title": "2025-06-18", "icons": "2025-11-25"},
    "annotations": {"lastModified": "2025-06-18"},
    "contents": {"_meta": "2025-06-18"},
}


# from this revision on, content blocks need no shaping
_CONTENT_STABLE_SINCE = max(date for kind in ("content", "annotations", "contents")
                            for date in _ADDED_IN[kind].values())


def _without_newer_fields(obj: dict, kind: str, version: str) -> dict:
    added = _ADDED_IN[kind]
    if not any(key in added and version < added[key] for key in obj):
        return obj
    return {key: value for key, value in obj.items() if key not in added or version >= added[key]}


def _shape_block(block: dict, version: str) -> dict:
    """A content block as a revision can read it (audio and resource links become text)."""
    kind = block.get("type")
    if kind == "audio" and version < "2025-03-26":
        return {"type": "text", "text": f"[audio content ({block.get('mimeType', 'audio')}) omitted]"}
    if kind == "resource_link" and version < "2025-06-18":
        return {"type": "text", "text": f"Resource: {block.get('name', '')} <{block.get('uri', '')}>"}
    block = _without_newer_fields(block, "content", version)
    if "annotations" in block and isinstance(block["annotations"], dict):
        block = {**block, "annotations": _without_newer_fields(block["annotations"], "annotations", version)}
    if kind == "resource" and isinstance(block.get("resource"), dict):
        block = {**block, "resource": _without_newer_fields(block["resource"], "contents", version)}
    return block


def _shape_call_result(result: dict, version: str) -> dict:
    if version >= "2026-07-28":
        return result
    content = result.get("content", ())
    shaped = {"content": content if version >= _CONTENT_STABLE_SINCE else [_shape_block(b, version) for b in content]}
    if result.get("isError"):
        shaped["isError"] = True
    if "_meta" in result:
        shaped["_meta"] = result["_meta"]
    structured = result.get("structuredContent")
    if structured is not None and version >= "2025-06-18" and isinstance(structured, dict):
        shaped["structuredContent"] = structured
    return shaped


def _shape_tool(definition: dict, version: str) -> dict:
    if version >= "2026-07-28":
        return {k: v for k, v in definition.items() if k != "execution"}
    tool = _without_newer_fields(definition, "tool", version)
    schema = tool.get("outputSchema")
    if schema is not None and schema.get("type") != "object":
        tool = {k: v for k, v in tool.items() if k != "outputSchema"}  # legacy: objects only
    if version < "2025-11-25" and "$schema" in tool["inputSchema"]:
        tool = {**tool, "inputSchema": {k: v for k, v in tool["inputSchema"].items() if k != "$schema"}}
    return tool


def _shape_listing(definition: dict, version: str) -> dict:
    """A resource or template definition as a revision defines it (annotations included)."""
    listing = _without_newer_fields(definition, "listing", version)
    if isinstance(listing.get("annotations"), dict):
        trimmed = _without_newer_fields(listing["annotations"], "annotations", version)
        if trimmed is not listing["annotations"]:
            listing = {**listing, "annotations": trimmed}
    return listing


def _shape_prompt(definition: dict, version: str) -> dict:
    prompt = _without_newer_fields(definition, "listing", version)
    if version < "2025-06-18" and "arguments" in prompt:
        prompt = {**prompt, "arguments": [_without_newer_fields(a, "argument", version) for a in prompt["arguments"]]}
    return prompt


def _error_response(request_id, error: RpcError) -> dict:
    return {"jsonrpc": "2.0", "id": request_id, "error": error.to_dict()}


def _is_request_id(value) -> bool:
    """A JSON-RPC id this server accepts: a string or an integer (not a boolean)."""
    return isinstance(value, (str, int)) and not isinstance(value, bool)


def _classify(message: dict) -> str:
    """The kind of a JSON-RPC message (``request``, ``notification``, ``response``), or -32600."""
    if not isinstance(message, dict):
        raise RpcError(INVALID_REQUEST, "Invalid Request: a JSON-RPC message must be an object.", status=400)
    if message.get("jsonrpc") != "2.0":
        raise RpcError(INVALID_REQUEST, 'Invalid Request: "jsonrpc" must be "2.0".', status=400)
    if "method" in message:
        if not isinstance(message["method"], str):
            raise RpcError(INVALID_REQUEST, 'Invalid Request: "method" must be a string.', status=400)
        if "params" in message and not isinstance(message["params"], dict):
            raise RpcError(INVALID_REQUEST, 'Invalid Request: "params" must be an object.', status=400)
        if "id" not in message:
            return "notification"
        if not _is_request_id(message["id"]):
            raise RpcError(INVALID_REQUEST, 'Invalid Request: "id" must be a string or an integer.',
                            status=400)
        return "request"
    if "id" in message and (("result" in message) != ("error" in message)):
        if message["id"] is not None and not _is_request_id(message["id"]):  # (null: an error for no request)
            raise RpcError(INVALID_REQUEST, 'Invalid Request: a response\'s "id" must be the string or '
                           "integer of the request it answers.", status=400)
        return "response"
    raise RpcError(INVALID_REQUEST, "Invalid Request: neither a request, a notification nor a response.",
                    status=400)


def _modern_meta(message: dict) -> dict | None:
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    return meta if isinstance(meta, dict) and _META_VERSION in meta else None


def _is_modern(message: dict, header_version: str | None) -> bool:
    """Era of a request: modern when ``_meta`` names a version, or the header names a non-legacy one.

    ``initialize`` is legacy whatever the header says; with a modern ``_meta`` it is a modern
    request for a method 2026-07-28 removed (404)."""
    if _modern_meta(message) is not None:
        return True
    if message.get("method") == "initialize":
        return False
    return header_version is not None and header_version not in LEGACY_VERSIONS


def _modern_context_facts(message: dict, header_version: str | None, http: bool) -> tuple:
    """(version, capabilities) of a modern request, or the -32020/-32602/-32022 error (HTTP 400)."""
    if http and header_version is None:
        raise RpcError(HEADER_MISMATCH, "The MCP-Protocol-Version header is required with 2026-07-28 requests.",
                        status=400)
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    if not isinstance(meta, dict) or _META_VERSION not in meta or _META_CAPS not in meta:
        missing = [k for k in (_META_VERSION, _META_CAPS) if not isinstance(meta, dict) or k not in meta]
        raise _invalid_params("params._meta must carry " + " and ".join(missing) + ".",
                              {"missing": missing}, status=400)
    version, caps = meta[_META_VERSION], meta[_META_CAPS]
    if http and header_version != version:
        raise RpcError(HEADER_MISMATCH, f"The MCP-Protocol-Version header ({header_version}) does not "
                        f"match params._meta ({version}).", status=400)
    if version not in MODERN_VERSIONS:
        raise _unsupported_version(version)
    if not isinstance(caps, dict):
        raise _invalid_params(f"params._meta[{_META_CAPS!r}] must be an object.", status=400)
    return version, caps


def _modern_context(server: _CoreMethods, message: dict, header_version: str | None, *, http: bool,
                    **context) -> "Context":
    """The Context of a 2026-07-28 request (every transport's), or its RpcError (HTTP 400)."""
    version, caps = _modern_context_facts(message, header_version, http=http)
    return Context(server, message["method"], message.get("params") or {}, message.get("id"),
                   version=version, modern=True, capabilities=caps, **context)


def _args_digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


def _question_digest(question: dict) -> str:
    """What an answer in ``inputResponses`` is bound to: the method and params asked (message,
    schema, URL), less the elicitationId a URL elicitation makes anew each round."""
    params = {k: v for k, v in (question.get("params") or {}).items() if k != "elicitationId"}
    return _args_digest({"method": question["method"], "params": params})


class Extension:
    """A protocol extension (SEP-2133), declared once with ``server.add_extension(...)``.

    ``identifier`` is its ``<prefix>/<name>`` key in ``capabilities.extensions``, ``settings`` the
    object under it, ``methods`` and ``notifications`` map method names to ``async fn(ctx)``
    handlers (a method's returns the result object).  The extension is declared in the
    ``initialize`` result (from revision ``since`` on) and in ``server/discover``, and its methods
    join the method tables of those revisions.  ``declared`` (a callable) can hold the
    declaration back until the server has something to offer; the methods answer either way."""

    def __init__(self, identifier: str, settings: dict | None = None, *, methods: dict | None = None,
                 notifications: dict | None = None, since: str = "2025-11-25",
                 declared: typing.Callable[[], bool] | None = None):
        prefix, _, name = identifier.rpartition("/")
        if not prefix or not name:
            raise ValueError(f"extension identifier {identifier!r}: use '<prefix>/<name>', e.g. "
                             "'com.example/reports'")
        self.identifier = identifier
        self.settings = dict(settings or {})
        self.methods = dict(methods or {})
        self.notifications = dict(notifications or {})
        self.since = since
        self.declared = declared


class _Extensions:
    """The extensions one server declared: their capability entries and their method handlers.

    Core methods always win: an extension cannot take over ``tools/call`` or another
    extension's method, so declaring one never changes what an existing method does."""

    def __init__(self):
        self.by_id: dict = {}
        self.owner: dict = {}  # method or notification name -> Extension

    def add(self, extension: Extension) -> None:
        names = [*extension.methods, *extension.notifications]
        taken = [n for n in names if n in _LEGACY_METHODS or n in _MODERN_METHODS
                 or self.owner.get(n, extension).identifier != extension.identifier]
        if taken:
            raise ValueError(f"extension {extension.identifier}: {', '.join(taken)} already has a handler")
        previous = self.by_id.get(extension.identifier)
        for name in ([*previous.methods, *previous.notifications] if previous else ()):
            self.owner.pop(name, None)
        self.by_id[extension.identifier] = extension
        self.owner.update(dict.fromkeys(names, extension))
        _EXTENSION_METHODS.update(names)

    def capabilities(self, version: str) -> dict:
        return {e.identifier: dict(e.settings) for e in self.by_id.values()
                if version >= e.since and (e.declared is None or e.declared())}

    def handler(self, method: str, version: str):
        extension = self.owner.get(method)
        if extension is None or version < extension.since:
            return None
        return extension.methods.get(method) or extension.notifications.get(method)


_EXTENSION_METHODS: set = set()  # every extension method name declared in this process (metrics labels)


# ---- Masking what a tool returns (``mask``: the login tools by default) --------------------------
#
# Rules:
# - A masked tool's result, structuredContent and error text pass through ``_mask``: every
#   scalar under a sensitive key (by pattern, in any spelling and nesting) and identifiers found
#   in any string (``_mask_free_text``); the log gets its exceptions masked the same way.

_DEFAULT_MASK_FIELDS = frozenset((
    "account_id", "accountid", "account_no", "account_number", "accountnumber", "client_id", "clientid",
    "user_id", "userid", "customer_id", "customerid", "pan", "pan_number", "email", "email_id", "mail",
    "phone", "phone_number", "mobile", "mobile_number", "bank_account", "bank_account_number",
    "bankaccount", "demat_id", "dp_id", "aadhaar", "ssn"))

# A key is sensitive when a run of its words (split at camelCase, digits and any of ``_-. ``,
# lower-cased, joined) is one of these: ``panNumber``, ``Mobile-No``, ``bank.account.number``,
# ``emailId``, ``x_access_token``.  A run, not a substring: ``company`` holds no ``pan``.
_SENSITIVE_KEY = re.compile(
    r"pan(no|num|number|card)?|e?mail(id|ids|address|addr)?|"
    r"(phone|mobile|tel|telephone|cell|cellphone|landline|whatsapp)(no|num|number|numbers)?|"
    r"(bank)?(account|acct)(no|num|number|nr|id|ids)?|bank|iban|ifsc|"
    r"demat(id|no|number|account)?|dpid|boid|aadha+r(no|number|id)?|ssn|"
    r"(access|refresh|id|auth|bearer|api|session|csrf)?tokens?|(api|secret|private|access|client|signing)key|"
    r"(client)?secret|password|passwd|pwd|passcode|otp|pin(code)?|cvv|(card|creditcard|debitcard)(no|num|number)|"
    r"(user|client|customer|login|member|holder|u)id|(user|client|customer)(code|no|number)|"
    r"upi(id|handle)?|vpa|dob|(date)?(of)?birth(date|day)?|(postal|home|residential|permanent|mailing)?"
    r"(address|addr)(line\d*)?|(user|holder|account|nominee|father|mother|spouse|full|first|last|middle|legal|"
    r"customer|client|display)name|username|login|nominee|ucc|placedby")
# Keys that name the user's own orders, not the user: their values (Kite's order ids are 15-16
# digits) stay whole, or cancel_order could not be given an id the orders tool showed.
_ORDER_ID_KEYS = frozenset({"orderid", "exchangeorderid", "parentorderid"})
# Identifiers and secrets in free text, masked wherever a string appears in a login tool's result
# or error: JWTs, Authorization values, key=value pairs with a sensitive key, e-mail addresses,
# PAN-like codes, long base64/hex runs, phone numbers and runs of 8+ digits.
_FREE_TEXT_MASKS = (
    (re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), 0),
    (re.compile(r"(?i)\b(?:bearer|basic)\s+([A-Za-z0-9._~+/=-]{8,})"), 1),
    (re.compile(r"\b([A-Za-z][\w.-]{0,40})([\"']?\s*[:=]\s*[\"']?)([^\s\"'&,;<>{}\[\]]{3,})"), 3),
    (re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+"), 0),
    (re.compile(r"[A-Za-z0-9._-]{2,}@[A-Za-z]{2,}(?![\w.@-])"), 0),  # a UPI id (VPA): no dot after the @
    (re.compile(r"(?i)\b[A-Z]{5}[0-9]{4}[A-Z]\b"), 0),
    (re.compile(r"(?<![A-Za-z0-9+/_-])(?=[A-Za-z0-9+/_-]*[0-9])(?=[A-Za-z0-9+/_-]*[A-Za-z])"
                r"[A-Za-z0-9+/_-]{24,}={0,2}"), 0),
    (re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?\(?\d{1,5}\)?(?:[ .-]?\d{2,5}){1,4}|\(?\d{3,5}\)?[.-]\d{3,5}[.-]?\d{0,5}|"
                r"\d{4} \d{4} \d{4}|\d{5} \d{5})(?!\w)"), -1),
    (re.compile(r"(?<!\d)\d{8,}(?!\d)"), 0),
)


def _mask_text(value) -> str:
    """A masked value: all X, but the last 4 characters of a long one (enough to tell two apart)."""
    text = str(value)
    return "X" * len(text) if len(text) < 10 else "X" * (len(text) - 4) + text[-4:]


def _key_words(key: str) -> list:
    return [word.lower() for word in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+", key)][:12]


@functools.lru_cache(maxsize=256)
def _mask_names(fields: frozenset) -> frozenset:
    """MASK_FIELDS and a tool's ``mask`` names, spelt as ``_sensitive_key`` compares them."""
    return frozenset("".join(_key_words(str(field))) for field in fields)


@functools.lru_cache(maxsize=4096)
def _sensitive_key(key, names: frozenset) -> bool:
    words = _key_words(str(key))
    for start in range(len(words)):
        for end in range(start + 1, len(words) + 1):
            run = "".join(words[start:end])
            if run in names or _SENSITIVE_KEY.fullmatch(run):
                return True
    return False


def _mask_phone(match: re.Match) -> str:
    text = match.group(0)
    digits = sum(c.isdigit() for c in text)
    return _mask_text(text) if digits >= 10 or (text.startswith("+") and digits >= 8) else text


def _mask_free_text(text: str, names: frozenset = frozenset()) -> str:
    """``text`` with every identifier or secret ``_FREE_TEXT_MASKS`` finds masked."""
    for pattern, group in _FREE_TEXT_MASKS:
        if group == -1:
            text = pattern.sub(_mask_phone, text)
        elif group == 3:
            text = pattern.sub(lambda m: m.group(1) + m.group(2) + _mask_text(m.group(3))
                               if _sensitive_key(m.group(1), names) else m.group(0), text)
        elif group:
            text = pattern.sub(lambda m: m.group(0)[:m.start(group) - m.start()] + _mask_text(m.group(group)), text)
        else:
            text = pattern.sub(lambda m: _mask_text(m.group(0)), text)
    return text


def _is_order_id(key, value, names: frozenset) -> bool:
    """An order id of the user's own (a number, or digits/letters as text) under an order-id key
    that MASK_FIELDS does not name: left out of the digit-run and whole-number masking."""
    if not isinstance(key, str) or "".join(_key_words(key)) not in _ORDER_ID_KEYS or _sensitive_key(key, names):
        return False
    return (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value) is not None)


def _mask(value, fields: frozenset, under_sensitive: bool = False):
    """Mask a result: every scalar under a sensitive key (``_sensitive_key``: the patterns and
    ``fields``, in any spelling), whatever the nesting, keeping the last 4 characters of long
    ones; and identifiers in every other string, dict keys included (``_mask_free_text``)."""
    names = _mask_names(fields)
    if isinstance(value, dict):
        return {(_mask_free_text(k, names) if isinstance(k, str) else k):
                v if not under_sensitive and _is_order_id(k, v, names) else
                _mask(v, fields, under_sensitive or _sensitive_key(k, names)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_mask(v, fields, under_sensitive) for v in value]
    if value is None or isinstance(value, bool):
        return value
    if under_sensitive:
        return _mask_text(value)
    if isinstance(value, str):
        return _mask_free_text(value, names)
    if isinstance(value, (int, float)) and value == value and abs(value) >= 1e7 and value == int(value):
        return _mask_text(int(value))  # a whole number of 8+ digits: an account or phone number, as text
    return value


class _RuntimePort:
    """What the protocol core asks of the world around it, and nothing more: section 6's
    ``_Runtime`` is the real one (over a ``Store``); a test may pass a plain fake.  Events on the
    bus reach every client's streams on every instance; records are sealed where the store is
    shared; ``listen`` holds a subscriptions/listen stream open."""

    shared = False  # other processes share the store (then the key ring needs MCP_SECRET)
    task_runs: dict  # task id -> the _TaskRun running here
    tasks_running: collections.Counter  # principal -> its tasks running here

    def spawn(self, coroutine):
        """Run ``coroutine`` as background work; returns what ``cancel()`` ends."""
        raise NotImplementedError

    async def publish_event(self, event: dict) -> None:
        """Tell every client a list changed or a resource was updated (``{"kind": ...}``)."""
        raise NotImplementedError

    async def publish(self, channel: str, message) -> None:
        raise NotImplementedError

    def subscribe(self, channel: str, callback) -> typing.Callable:
        """Call ``callback(message)`` for what is published on ``channel``; returns the unsubscribe."""
        raise NotImplementedError

    async def set_sealed(self, key: str, record: dict, ttl: float) -> None:
        raise NotImplementedError

    async def get_sealed(self, key: str) -> dict | None:
        raise NotImplementedError

    async def listen(self, ctx: "Context", honored: dict) -> dict:
        """Stream the ``honored`` notifications to ``ctx``'s client until it goes."""
        raise NotImplementedError

    def cancel(self, session_id: str | None, request_id) -> None:
        """Cancel a running request, here or on the instance that runs it."""
        raise NotImplementedError


class _Registry:
    """What a server offers, and the decorators of ``MCPServer``'s public API that register it:
    tools, resources, prompts, completions, skills, MCP Apps, extensions, middleware.  The
    protocol core (``_ProtocolCore``) serves what is registered here."""

    def __init__(self, name: str, version: str, *, instructions: str | None, title: str | None,
                 description: str | None, website_url: str | None, icons: list | None, middleware: list | None):
        self.name, self.version = name, version
        self.instructions = instructions
        self.middleware = list(middleware or [])
        self.info = {"name": name, "version": version}
        for key, value in (("title", title), ("description", description), ("websiteUrl", website_url),
                           ("icons", icons)):
            if value is not None:
                self.info[key] = value
        self._tools: dict = {}
        self._resources: dict = {}
        self._templates: list = []
        self._prompts: dict = {}
        self._completions: dict = {}
        self._shaped: dict = {}  # (kind, version) -> shaped list; cleared when a registry changes
        self.extensions = _Extensions()
        self.extensions.add(_tasks_extension(self))
        self._skills = None  # the _Skills, once a skill was added

    def tool(self, name: str | None = None, *, title: str | None = None, description: str | None = None,
             annotations: dict | None = None, icons: list | None = None, input_schema: dict | None = None,
             output_schema: dict | None = None, meta: dict | None = None, task: str | None = None,
             task_start: str = "call", login_required: bool = False, mask: typing.Iterable | bool | None = None,
             inline: bool = False, app: str | None = None):
        """Register a function as a tool; its schema comes from its type hints.

        ``task="optional"`` or ``"required"`` lets a 2026-07-28 client that negotiated the tasks
        extension run the call as a task (``tasks/get`` to poll, ``tasks/update`` to answer
        questions, ``tasks/cancel``).  The task starts with the call, or, with
        ``task_start="explicit"``, where the tool calls ``await ctx.run_as_task()`` (its asks
        before that point are ordinary input rounds).

        ``login_required=True`` refuses the call (as a tool error) until the user logged in to
        the upstream provider; ``mask`` masks fields of the result (the default set, MASK_FIELDS,
        and any names given; login-required tools mask by default, ``mask=False`` turns it off).

        A sync function runs in a worker thread, so that it never blocks the event loop.
        ``inline=True`` runs it on the loop instead, which saves the thread hand-off: only for a
        function that never waits (no I/O, locks or sleeps), since while it runs no other
        request of the process is served and the tool timeout cannot interrupt it.

        ``app="ui://..."`` names the MCP App (``server.app``) a host renders the result in."""
        if app is not None:
            meta = {**(meta or {}), "ui": {**((meta or {}).get("ui") or {}), "resourceUri": app}}

        def register(fn):
            tool = _Tool(fn, name or fn.__name__, title=title, description=description,
                         annotations=annotations, icons=icons, input_schema=input_schema,
                         output_schema=output_schema, meta=meta, task=task, task_start=task_start)
            tool.login_required = login_required
            tool.inline = bool(inline)
            if mask is False or (mask is None and not login_required):
                tool.mask = None
            else:
                tool.mask = frozenset() if mask in (None, True) else frozenset(f.lower() for f in mask)
            self._tools[tool.name] = tool
            self._changed("tools")
            return fn
        return register

    def resource(self, uri: str, *, name: str | None = None, title: str | None = None,
                 description: str | None = None, mime_type: str | None = None, size: int | None = None,
                 annotations: dict | None = None, icons: list | None = None, meta: dict | None = None):
        """Register a resource (a fixed URI) or a resource template (RFC 6570, e.g. ``notes://{id}``)."""
        def register(fn):
            resource = _Resource(fn, uri, name=name, title=title, description=description,
                                 mime_type=mime_type, size=size, annotations=annotations, icons=icons,
                                 meta=meta)
            if resource.template:
                missing = set(resource.variables) - set(resource.arg_names) if not resource.takes_kwargs else set()
                if missing:
                    raise TypeError(f"resource template {uri!r}: {fn.__name__} lacks parameters {sorted(missing)}")
                self._templates = [t for t in self._templates if t.uri != uri] + [resource]
            else:
                self._resources[uri] = resource
            self._changed("resources")
            return fn
        return register

    def prompt(self, name: str | None = None, *, title: str | None = None, description: str | None = None,
               icons: list | None = None, meta: dict | None = None):
        """Register a prompt; its arguments are the function's parameters."""
        def register(fn):
            prompt = _Prompt(fn, name or fn.__name__, title=title, description=description, icons=icons,
                             meta=meta)
            self._prompts[prompt.name] = prompt
            self._changed("prompts")
            return fn
        return register

    def completion(self, ref_type: str, ref: str):
        """Register completions for a prompt (``"ref/prompt", name``) or a resource template
        (``"ref/resource", uri_template``): ``fn(argument, value, context_arguments) -> list[str]``."""
        if ref_type not in ("ref/prompt", "ref/resource"):
            raise ValueError("ref_type must be 'ref/prompt' or 'ref/resource'")

        def register(fn):
            self._completions[(ref_type, ref)] = _Callable(fn)
            return fn
        return register

    def add_extension(self, extension: Extension) -> None:
        """Declare an extension: its settings in ``capabilities.extensions``, its methods served."""
        self.extensions.add(extension)

    def add_skill(self, skill_md: str | bytes, files: dict | None = None, *, prefix: str = "") -> str:
        """Serve a skill (SEP-2640) given in code: its SKILL.md text and ``{relative path: text or
        bytes}``; ``prefix`` nests it (``acme/billing``).  Returns the SKILL.md URI."""
        return self._add_skill(_Skill(skill_md, files, prefix=prefix))

    def add_skills(self, folder: str) -> list:
        """Serve every skill under ``folder``: each directory holding a SKILL.md is a skill, named by
        the directory (which must equal its frontmatter ``name``), its parents the URI prefix."""
        return [self._add_skill(skill) for skill in _skills_under(folder)]

    def _add_skill(self, skill: _Skill) -> str:
        if self._skills is None:
            self._skills = _Skills(self)
            self.extensions.add(self._skills.extension)
        self._skills.add(skill)
        return skill.uri

    def app(self, uri: str, *, name: str | None = None, description: str | None = None,
            csp: dict | None = None, permissions: dict | None = None, domain: str | None = None,
            prefers_border: bool | None = None):
        """Register an MCP App: a function returning the HTML document of a ``ui://`` resource
        (``text/html;profile=mcp-app``).  Point a tool at it with ``@server.tool(app=uri)``.
        ``csp`` lists the origins it needs (``connectDomains``, ``resourceDomains``...)."""
        def register(fn):
            ui = _app_ui_meta(csp, permissions, domain, prefers_border)
            self._resources[uri] = _app_resource(fn, uri, name=name, description=description, ui=ui)
            if APPS_EXTENSION not in self.extensions.by_id:
                self.extensions.add(Extension(APPS_EXTENSION, {"mimeTypes": [APP_MIME_TYPE]}))
            self._changed("resources")
            return fn
        return register

    def add_middleware(self, hook) -> None:
        """Add ``async def hook(ctx, call_next)`` around every MCP request; outermost first."""
        self.middleware.append(hook)

    def _changed(self, kind: str) -> None:
        """A registry changed: its shaped lists go, and the clients hear of it (``_announce``)."""
        self._shaped.clear()
        self._announce(kind)

    def _announce(self, kind: str) -> None:
        """Tell the clients that ``kind`` changed: the protocol core does, once it runs."""

    def test_client(self, era: str = LATEST_LEGACY, **handlers) -> "TestClient":
        """An in-process client for tests: ``async with server.test_client() as client`` (see
        ``TestClient``; ``era="2026-07-28"`` for a stateless client)."""
        return TestClient(self, era, **handlers)

class _ProtocolCore(_Registry):
    """The MCP protocol core: the method tables, shaping per revision, pagination, Multi
    Round-Trip Requests, tasks.  It owns no I/O: what it needs beyond a request's ``Context``
    goes through its runtime port (``_runtime()``, a ``_RuntimePort``), which ``MCPServer``
    wires (section 10)."""

    def __init__(self, name: str, version: str = "0.1.0", *, instructions: str | None = None,
                 title: str | None = None, description: str | None = None, website_url: str | None = None,
                 icons: list | None = None, settings: Settings | None = None, middleware: list | None = None):
        super().__init__(name, version, instructions=instructions, title=title, description=description,
                         website_url=website_url, icons=icons, middleware=middleware)
        self.settings = settings or Settings()
        self._keys: _KeyRing | None = None
        self.threads: anyio.CapacityLimiter | None = None  # sync functions' threads (MCP_TOOL_THREADS)
        self._login = None  # the upstream login flow (section 7), once add_login_tools() ran
        self._local_base = None  # http://127.0.0.1:<port> of the listener, for calls to ourselves
        self._live_runtime: _RuntimePort | None = None  # the runtime port, once made

    def _runtime(self) -> _RuntimePort:
        """The runtime port, made on first use (``MCPServer`` wires it)."""
        raise NotImplementedError("the protocol core has no runtime of its own: use MCPServer")

    async def _started_runtime(self) -> _RuntimePort:
        """The runtime port, started (in the running event loop)."""
        raise NotImplementedError("the protocol core has no runtime of its own: use MCPServer")

    def _login_flow(self) -> "_Login":
        if self._login is None:
            raise ToolError("This server has no upstream login (call server.add_login_tools()).")
        return self._login

    # -- notifications to every client -------------------------------------------------------

    async def notify_tools_changed(self) -> None:
        await self._runtime().publish_event({"kind": "tools"})

    async def notify_prompts_changed(self) -> None:
        await self._runtime().publish_event({"kind": "prompts"})

    async def notify_resources_changed(self) -> None:
        await self._runtime().publish_event({"kind": "resources"})

    async def notify_resource_updated(self, uri: str) -> None:
        await self._runtime().publish_event({"kind": "updated", "uri": uri})

    def _announce(self, kind: str) -> None:
        runtime = self._live_runtime
        if runtime is not None:
            runtime.spawn(runtime.publish_event({"kind": kind}))

    @property
    def keys(self) -> _KeyRing:
        """The key ring; on a shared store without MCP_SECRET, use ``await _keyring()`` instead."""
        if self._keys is None:
            self._keys = _KeyRing(self.settings.secret, self.settings.token_parameter)
        return self._keys

    async def _keyring(self) -> _KeyRing:
        """The key ring every instance agrees on: from MCP_SECRET (or TOKEN_PARAMETER).  A shared
        store without either is refused (``Settings.check_secrets`` refuses REDIS_URL without
        it at start-up): no usable secret is ever kept in the store, where a copy of it would
        mint tokens for every user."""
        if self._keys is None:
            if not (self.settings.secret or self.settings.token_parameter or not self._runtime().shared):
                raise RpcError(INTERNAL_ERROR, "This server shares its store but has no MCP_SECRET: set the "
                               "same MCP_SECRET on every instance.", status=503)
            self._keys = _KeyRing(self.settings.secret, self.settings.token_parameter)
        return self._keys

    # -- capabilities and descriptions ---------------------------------------------------------

    def _server_info(self, version: str) -> dict:
        return _without_newer_fields(self.info, "implementation", version)

    def _capabilities(self, version: str) -> dict:
        caps = {"tools": {"listChanged": True}, "resources": {"subscribe": True, "listChanged": True},
                "prompts": {"listChanged": True}, "logging": {}}
        if version >= "2025-03-26":
            caps["completions"] = {}
        extensions = self.extensions.capabilities(version)
        if extensions or version >= "2026-07-28":  # (2026 always says; an older revision only when any)
            caps["extensions"] = extensions
        return caps

    # -- the request path -------------------------------------------------------------------------

    async def _respond(self, ctx: Context) -> tuple:
        """Run one request or notification: (JSON-RPC response or None, HTTP status)."""
        if ctx.meta:
            trace = ctx.meta.get("traceparent")
            if isinstance(trace, str) and len(trace) == 55:
                _trace_id.set(trace[3:35])
        try:
            try:
                result = await (self._call_chain(ctx, 0) if self.middleware else self._dispatch(ctx))
            except _InputRequired as exc:  # (inside: what fails while building the round is caught below)
                result = await self._input_required(ctx, exc.requests)
        except RpcError as exc:
            if ctx.request_id is None:
                response, status = None, exc.status if exc.status != 200 else 202
            else:
                response, status = _error_response(ctx.request_id, exc), exc.status
        except _Cancelled:
            response, status = None, 0
        except _REQUEST_ERRORS as exc:  # (middleware's too: never the process's end)
            error_id = _error_id()
            log.error("%s failed (error id %s)", ctx.method, error_id, exc_info=True)
            detail = f": {exc!r}" if self.settings.expose_errors else ""
            error = RpcError(INTERNAL_ERROR, f"Internal error while handling {ctx.method} (error id {error_id}){detail}.")
            response, status = (None, 500) if ctx.request_id is None else (_error_response(ctx.request_id, error), 500)
        else:
            if ctx.request_id is None:
                response, status = None, 202
            else:
                if ctx.modern:
                    result = self._finish_modern(result, ctx.method)
                response, status = {"jsonrpc": "2.0", "id": ctx.request_id, "result": result}, 200
        if ctx.request_id is not None and _metrics.on:
            outcome = ("cancelled" if response is None else "error" if "error" in response
                       else response["result"].get("resultType", "ok") if ctx.modern else "ok")
            _metrics.add(_rpc_metric_key(ctx.method, outcome))
        return response, status

    async def _call_chain(self, ctx: Context, index: int):
        if index == len(self.middleware):
            return await self._dispatch(ctx)
        return await self.middleware[index](ctx, functools.partial(self._call_chain, ctx, index + 1))

    def _finish_modern(self, result: dict, method: str) -> dict:
        if "resultType" not in result:
            result = {"resultType": "complete", **result}
        if method in _CACHEABLE and result["resultType"] == "complete" and "ttlMs" not in result:
            result["ttlMs"] = 0 if method == "resources/read" else 60000
            result["cacheScope"] = "private" if method == "resources/read" else "public"
        meta = result.get("_meta")
        result["_meta"] = {**meta, _META_SERVERINFO: self.info} if isinstance(meta, dict) else {
            _META_SERVERINFO: self.info}
        return result

    def _dispatch(self, ctx: Context) -> typing.Awaitable:
        """The handler's coroutine for ``ctx`` (the caller awaits it: one frame less a request)."""
        table = _MODERN_METHODS if ctx.modern else _LEGACY_METHODS
        handler = table.get(ctx.method)
        if handler is None:
            extension_handler = self.extensions.handler(ctx.method, ctx.protocol_version)
            if extension_handler is not None:
                return extension_handler(ctx)
            if ctx.request_id is None:
                return _answer_nothing()  # unknown notifications are ignored
            known = (ctx.method in _LEGACY_METHODS or ctx.method in _MODERN_METHODS
                     or ctx.method in self.extensions.owner)
            era = "2026-07-28" if ctx.modern else ctx.protocol_version
            message = (f"Method not found: {ctx.method} is not part of protocol version {era}."
                       if known else f"Method not found: {ctx.method}.")
            if ctx.method in _TASKS_2025_11_25 and not ctx.modern and era >= "2025-11-25":
                message = (f"Method not found: {ctx.method}: this server declared no tasks capability for {era}; "
                           f"it runs tasks for 2026-07-28 clients, as the {_TASKS_EXTENSION} extension.")
            raise RpcError(METHOD_NOT_FOUND, message, status=404 if ctx.modern else 200)
        if ctx.modern and ctx.method in _MRTR_METHODS and (
                "requestState" in ctx.params or "inputResponses" in ctx.params):
            return self._next_round(ctx, handler)
        return handler(self, ctx)

    async def _next_round(self, ctx: Context, handler):
        await self._restore_round(ctx)
        return await handler(self, ctx)

    # -- Multi Round-Trip Requests (2026) ------------------------------------------------------

    def _round_target(self, ctx: Context) -> tuple:
        params = ctx.params
        if ctx.method == "resources/read":
            return params.get("uri"), ""
        return params.get("name"), _args_digest(params.get("arguments") or {})

    async def _restore_round(self, ctx: Context) -> None:
        """The answers and state of the rounds so far.  With a sealed requestState,
        ``inputResponses`` count only for the keys it lists as asked (others are unknown keys,
        ignored as the spec says).  Without one they are offered as they are: a handler's
        ``ask`` takes them, except an ``asked_only`` ask (a confirmation), which needs the
        question to have been asked."""
        sealed = ctx.params.get("requestState")
        if sealed is None:
            responses = ctx.params.get("inputResponses")
            ctx._responses = dict(responses) if isinstance(responses, dict) else {}
            return
        state = (await self._keyring()).unseal(sealed)
        target, digest = self._round_target(ctx)
        if (state is None or state.get("m") != ctx.method or state.get("t") != target
                or state.get("h") != digest or state.get("sub") != ctx.principal
                or not isinstance(state.get("exp"), (int, float)) or state["exp"] < _now()):
            raise _invalid_params("requestState is invalid, expired or belongs to another request; "
                                  "retry the request without it.")
        ctx._answers = dict(state.get("a") or {})
        ctx.round_state = dict(state.get("c") or {})
        ctx._asked = dict(state.get("q") or {})
        responses = ctx.params.get("inputResponses")
        if isinstance(responses, dict):
            ctx._responses = {key: value for key, value in responses.items() if key in ctx._asked}

    async def _input_required(self, ctx: Context, requests: dict) -> dict:
        """A handler asked the client for input: the 2026 input_required result, or an error."""
        if ctx.method not in _MRTR_METHODS or not ctx.modern:
            raise RpcError(INTERNAL_ERROR, f"{ctx.method} cannot ask the client for input.", status=500)
        target, digest = self._round_target(ctx)
        asked = ctx._asked | {key: _question_digest(question) for key, question in requests.items()}
        state = {"m": ctx.method, "t": target, "h": digest, "a": ctx._answers, "q": asked, "sub": ctx.principal,
                 "exp": int(_now()) + 3600, "n": secrets.token_hex(4)}
        if ctx.round_state:
            state["c"] = ctx.round_state
        return {"resultType": "input_required", "inputRequests": requests,
                "requestState": (await self._keyring()).seal(state)}

    # -- lists and pagination -----------------------------------------------------------------

    def _shaped_list(self, kind: str, version: str) -> list:
        key = (kind, version)
        items = self._shaped.get(key)
        if items is None:
            if kind == "tools":
                items = [_shape_tool(t.definition, version) for t in self._tools.values()]
            elif kind == "prompts":
                items = [_shape_prompt(p.definition, version) for p in self._prompts.values()]
            elif kind == "resources":
                items = [_shape_listing(r.definition, version) for r in self._resources.values() if r.listed]
            else:
                items = [_shape_listing(r.definition, version) for r in self._templates]
            self._shaped[key] = items
        return items

    async def _page(self, ctx: Context, kind: str, field: str) -> dict:
        return await self._paginate(ctx, self._shaped_list(kind, ctx.protocol_version), kind, field)

    async def _paginate(self, ctx: Context, items: list, kind: str, field: str) -> dict:
        """One page of ``items`` as ``{field: [...], "nextCursor"?}``; cursors are signed, per kind."""
        cursor, start = ctx.params.get("cursor"), 0
        if len(items) <= self.settings.page_size and cursor in (None, ""):
            return {field: items}  # one page: no cursor to sign
        keys = await self._keyring()
        if cursor not in (None, ""):
            text = keys.verify(cursor)
            if text is None or not text.startswith(kind + ":"):
                raise _invalid_params("Invalid cursor: pass back a nextCursor this server returned.",
                                      status=400 if ctx.modern else 200)
            start = int(text.rpartition(":")[2])
        end = start + self.settings.page_size
        result = {field: items[start:end] if start or end < len(items) else items}
        if end < len(items):
            result["nextCursor"] = keys.sign(f"{kind}:{end}")
        return result



class _CoreMethods(_ProtocolCore):
    """The handlers of the core's method tables (``_LEGACY_METHODS``, ``_MODERN_METHODS``): one
    ``_m_<name>`` per request method, one ``_n_<name>`` per notification."""


    async def _m_initialize(self, ctx: Context) -> dict:
        params = ctx.params
        requested = params.get("protocolVersion")
        if not isinstance(requested, str):
            raise _invalid_params("initialize needs params.protocolVersion, a string.")
        caps = params.get("capabilities")
        if caps is not None and not isinstance(caps, dict):
            raise _invalid_params("initialize: params.capabilities must be an object.")
        version = requested if requested in LEGACY_VERSIONS else LATEST_LEGACY
        client = params.get("clientInfo") if isinstance(params.get("clientInfo"), dict) else {}
        size = len(_dumps(caps or {})) + len(_dumps(client))
        if size > _MAX_CLIENT_STATE:
            raise _invalid_params(f"initialize: params.capabilities and params.clientInfo take {size} bytes as "
                                  f"JSON; the session keeps at most {_MAX_CLIENT_STATE}.", status=400)
        ctx.protocol_version = version
        ctx.client_capabilities = caps or {}
        ctx.session = {"v": version, "caps": caps or {}, "client": client, "log": None, "subs": []}
        ctx._session_changed = True
        result = {"protocolVersion": version, "capabilities": self._capabilities(version),
                  "serverInfo": self._server_info(version)}
        if self.instructions:
            result["instructions"] = self.instructions
        return result

    async def _m_discover(self, ctx: Context) -> dict:
        result = {"supportedVersions": list(SUPPORTED_VERSIONS),
                  "capabilities": self._capabilities("2026-07-28"), "ttlMs": 3600000, "cacheScope": "public"}
        if self.instructions:
            result["instructions"] = self.instructions
        return result

    async def _m_ping(self, ctx: Context) -> dict:
        return {}

    async def _m_set_level(self, ctx: Context) -> dict:
        level = ctx.params.get("level")
        if level not in _LOG_RANK:
            raise _invalid_params(f"Unknown log level {level!r}; use one of {', '.join(_LOG_LEVELS)}.")
        return self._session_update(ctx, log=level)

    async def _m_tools_list(self, ctx: Context) -> dict:
        return await self._page(ctx, "tools", "tools")

    @staticmethod
    def _named(ctx: Context, registry: dict, what: str) -> tuple:
        """(name, the registered thing) that ``params.name`` names; -32602 without one."""
        name = ctx.params.get("name")
        if not isinstance(name, str):
            raise _invalid_params(f"{ctx.method} needs params.name, a string.")
        found = registry.get(name)
        if found is None:
            raise _invalid_params(f"Unknown {what}: {name}.", {"name": name})
        return name, found

    @staticmethod
    def _session_update(ctx: Context, **fields) -> dict:
        """Change the legacy session's record (the transport saves it); the empty result."""
        ctx.session = {**(ctx.session or {}), **fields}
        ctx._session_changed = True
        return {}

    async def _m_tools_call(self, ctx: Context) -> dict:
        name, tool = self._named(ctx, self._tools, "tool")
        arguments = ctx.params.get("arguments")
        if arguments is None:
            arguments = {}
        elif not isinstance(arguments, dict):
            raise _invalid_params("tools/call: params.arguments must be an object.")
        problem = tool.check(arguments)
        if problem:
            return _shape_call_result(_tool_error(f"Invalid arguments for tool {name}: {problem}"),
                                      ctx.protocol_version)
        if tool.task and ctx.modern:
            if _has_tasks_extension(ctx):
                return await _TaskRun(self, tool, ctx).call(arguments)
            if tool.task == "required":
                raise _missing_capability({"extensions": {_TASKS_EXTENSION: {}}},
                                          f"{_TASKS_EXTENSION} (tool {name} runs only as a task)")
        timed = _metrics.on
        started = time.perf_counter() if timed else 0.0
        outcome = "error"
        try:
            result = await self._run_tool(tool, arguments, ctx)
            outcome = "error" if result.get("isError") else "ok"
        finally:
            if timed:
                _metrics.add(tool.metric_keys[outcome])
                _metrics.observe_key(tool.metric_keys["duration"], time.perf_counter() - started)
        return _shape_call_result(result, ctx.protocol_version)

    async def _run_tool(self, tool: _Tool, arguments: dict, ctx: Context) -> dict:
        limit = self.settings.tool_timeout
        # (a sync call on the loop cannot be interrupted anyway)
        deadline = _cancel_scope(limit if not tool.on_loop else None)
        try:
            with deadline:
                if tool.login_required:
                    await ctx.credentials()  # a tool error telling the user to log in, if they did not
                value = await tool.invoke(arguments, ctx, self.threads)
            if deadline.cancelled_caught:
                return _tool_error(f"Tool {tool.name} did not finish within {limit:g} seconds.")
            if tool.mask is not None:
                value = _mask(_plain_json(value), _DEFAULT_MASK_FIELDS | tool.mask |
                              {f.lower() for f in self.settings.mask_fields})
            return _to_call_result(value, tool)
        except ToolError as exc:
            message = str(exc) or f"Tool {tool.name} failed."
            return _tool_error(message if tool.mask is None else _mask_free_text(message))
        except (RpcError, _InputRequired, _Cancelled):
            raise
        except _cancelled_class():
            if ctx._cancelled:
                raise _Cancelled() from None
            raise
        except _REQUEST_ERRORS as exc:
            error_id = _error_id()
            if tool.mask is None:
                log.error("tool %s raised (error id %s)", tool.name, error_id, exc_info=True)
            else:  # a login tool's exception may quote the user's data: the log gets it masked
                import traceback
                log.error("tool %s raised (error id %s): %s", tool.name, error_id,
                          _mask_free_text(traceback.format_exc()))
            detail = f": {exc!r}" if self.settings.expose_errors else ""
            if detail and tool.mask is not None:
                detail = _mask_free_text(detail)
            return _tool_error(f"Tool {tool.name} failed with an internal error (error id {error_id}){detail}.")

    async def _m_resources_list(self, ctx: Context) -> dict:
        return await self._page(ctx, "resources", "resources")

    async def _m_templates_list(self, ctx: Context) -> dict:
        return await self._page(ctx, "templates", "resourceTemplates")

    def _find_resource(self, uri: str):
        resource = self._resources.get(uri)
        if resource is not None:
            return resource, {}
        for template in self._templates:
            variables = template.match(uri)
            if variables is not None:
                return template, variables
        return None, None

    def _resource_not_found(self, ctx: Context, uri) -> RpcError:
        if ctx.modern:
            return _invalid_params(f"Resource not found: {uri}", {"uri": uri})
        return RpcError(RESOURCE_NOT_FOUND, f"Resource not found: {uri}", {"uri": uri})

    async def _m_resources_read(self, ctx: Context) -> dict:
        uri = ctx.params.get("uri")
        if not isinstance(uri, str):
            raise _invalid_params("resources/read needs params.uri, a string.")
        resource, variables = self._find_resource(uri)
        if resource is None:
            raise self._resource_not_found(ctx, uri)
        try:
            value = await resource.invoke(variables, ctx, self.threads)
        except (LookupError, FileNotFoundError):
            raise self._resource_not_found(ctx, uri) from None
        except ToolError as exc:
            raise RpcError(INTERNAL_ERROR, str(exc)) from None
        contents = resource.contents(value, uri)
        if ctx.protocol_version < "2026-07-28":
            contents = [_without_newer_fields(c, "contents", ctx.protocol_version) for c in contents]
        return {"contents": contents}

    async def _m_subscribe(self, ctx: Context) -> dict:
        uri = ctx.params.get("uri")
        if not isinstance(uri, str):
            raise _invalid_params(f"{ctx.method} needs params.uri, a string.")
        subs = set((ctx.session or {}).get("subs", ()))
        if ctx.method == "resources/subscribe":
            subs.add(uri)
            if len(_dumps(sorted(subs))) > _MAX_CLIENT_STATE:
                raise _invalid_params(f"resources/subscribe: this session's subscriptions would take more than "
                                      f"{_MAX_CLIENT_STATE} bytes; unsubscribe from some first.")
        else:
            subs.discard(uri)
        return self._session_update(ctx, subs=sorted(subs))

    async def _m_prompts_list(self, ctx: Context) -> dict:
        return await self._page(ctx, "prompts", "prompts")

    async def _m_prompts_get(self, ctx: Context) -> dict:
        name, prompt = self._named(ctx, self._prompts, "prompt")
        arguments = ctx.params.get("arguments") or {}
        if not isinstance(arguments, dict):
            raise _invalid_params("prompts/get: params.arguments must be an object.")
        missing = [a["name"] for a in prompt.definition["arguments"] if a["required"] and a["name"] not in arguments]
        if missing:
            raise _invalid_params(f"Prompt {name} needs the argument(s) {', '.join(missing)}.",
                                  {"missing": missing})
        try:
            value = await prompt.invoke(arguments, ctx, self.threads)
        except ToolError as exc:
            raise RpcError(INTERNAL_ERROR, str(exc)) from None
        result = {"messages": [{"role": m["role"], "content": _shape_block(m["content"], ctx.protocol_version)}
                               for m in prompt.messages(value)]}
        if prompt.definition.get("description"):
            result["description"] = prompt.definition["description"]
        return result

    async def _m_complete(self, ctx: Context) -> dict:
        ref, argument = ctx.params.get("ref"), ctx.params.get("argument")
        if not isinstance(ref, dict) or not isinstance(argument, dict) or not isinstance(argument.get("name"), str):
            raise _invalid_params("completion/complete needs params.ref and params.argument {name, value}.")
        ref_type = ref.get("type")
        key = ref.get("name") if ref_type == "ref/prompt" else ref.get("uri")
        value = str(argument.get("value", ""))
        context_args = ((ctx.params.get("context") or {}).get("arguments") or {})
        if ref_type == "ref/prompt" and key not in self._prompts:
            raise _invalid_params(f"Unknown prompt: {key}.")
        if ref_type == "ref/resource" and key not in {t.uri for t in self._templates} and key not in self._resources:
            raise _invalid_params(f"Unknown resource or template: {key}.")
        if ref_type not in ("ref/prompt", "ref/resource"):
            raise _invalid_params("params.ref.type must be ref/prompt or ref/resource.")
        handler = self._completions.get((ref_type, key))
        if handler is not None:
            values = await handler.invoke({"argument": argument["name"], "value": value,
                                           "context": context_args}, ctx)
            values = [str(v) for v in (values or [])]
        elif ref_type == "ref/prompt":
            values = [c for c in self._prompts[key].choices.get(argument["name"], ()) if c.startswith(value)]
        else:
            values = []
        return {"completion": {"values": values[:100], "total": len(values), "hasMore": len(values) > 100}}

    async def _m_listen(self, ctx: Context) -> dict:
        """2026-07-28 ``subscriptions/listen``: what the client asked to hear, checked here; the
        stream that carries it is the runtime's."""
        wanted = ctx.params.get("notifications")
        if not isinstance(wanted, dict):
            raise _invalid_params("subscriptions/listen needs params.notifications, an object.", status=400)
        honored = {k: True for k in ("toolsListChanged", "promptsListChanged", "resourcesListChanged")
                   if wanted.get(k) is True}
        uris = wanted.get("resourceSubscriptions")
        if isinstance(uris, list) and all(isinstance(u, str) for u in uris):
            honored["resourceSubscriptions"] = uris
        if ctx._out is None or not getattr(ctx._out, "can_stream", False):
            raise RpcError(INVALID_REQUEST, "subscriptions/listen needs a response stream of its own: POST it "
                            "to the MCP endpoint with Accept: text/event-stream.", status=400)
        return await self._runtime().listen(ctx, honored)

    async def _n_initialized(self, ctx: Context):
        return None

    async def _n_cancelled(self, ctx: Context):
        request_id = ctx.params.get("requestId")
        if _is_request_id(request_id):  # (anything else names no request: ignored, as the spec allows)
            self._runtime().cancel(ctx.session_id, request_id)
        return None

    async def _n_ignored(self, ctx: Context):
        return None


_TASK_TERMINAL = ("completed", "failed", "cancelled")
_TASK_PRIVATE = ("sub", "tool")
_TASK_TTL_MS = 3600000


async def _answer_nothing() -> None:
    return None


@functools.lru_cache(maxsize=256)
def _rpc_metric_key(method: str, outcome: str) -> tuple:
    known = method in _LEGACY_METHODS or method in _MODERN_METHODS or method in _EXTENSION_METHODS
    method = method if known else "other"
    return ("mcp_rpc_calls_total", (("method", method), ("outcome", outcome)))


def _has_tasks_extension(ctx: Context) -> bool:
    extensions = ctx.client_capabilities.get("extensions")
    return isinstance(extensions, dict) and _TASKS_EXTENSION in extensions


def _task_key(task_id: str) -> str:
    return f"mcp:task:{{{_store_id(task_id)}}}"


def _iso_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _task_record(previous: dict, status: str, **fields) -> dict:
    record = {k: v for k, v in previous.items() if k not in ("inputRequests", "result", "error", "statusMessage")}
    record.update(status=status, lastUpdatedAt=_iso_now(), **fields)
    return record


class _TaskRun:
    """One tool call running as a task: its state lives in the store (``mcp:task:{id}``), so
    any instance can answer ``tasks/get``; the running coroutine and the questions it waits on
    are this process's.

    Theory of operation: the tool always runs in its own asyncio task, and the request waits on
    ``outcome``.  ``start()`` (at the call's start, or where the tool calls
    ``ctx.run_as_task()``) writes the task record and answers the request with a
    CreateTaskResult; until then the call behaves like an ordinary one (its result, error or
    input_required round answers the request).  After the start, the tool's asks park the task
    in ``input_required`` until ``tasks/update`` delivers the answers."""

    def __init__(self, server: _CoreMethods, tool: _Tool, ctx: Context):
        self.server, self.runtime, self.tool, self.ctx = server, server._runtime(), tool, ctx
        self.task_id = secrets.token_urlsafe(16)
        self.started = False
        self.record: dict = {}
        self.outcome = _Answer()  # what answers the request: the result, or the task's creation
        self.pending: dict = {}       # key -> input request still unanswered
        self.delivered: dict = {}     # key -> answer from tasks/update, not yet taken
        self.arrived = anyio.Event()  # set, and replaced, when tasks/update delivers answers
        self.runner = None
        self._unsubscribe = lambda: None
        self._saving = anyio.Lock()
        self._counted = None  # the principal whose running tasks count this one
        ctx._task_run = self

    async def call(self, arguments: dict) -> dict:
        self._count()
        try:
            if self.tool.task_start == "call":
                await self.start()
            self.runner = self.runtime.spawn(self._body(arguments))
        except BaseException:
            self._uncount()
            raise
        try:
            return await self.outcome.wait()  # (the request going away does not end the task)
        except _cancelled_class():
            if not self.started:
                self.runner.cancel()  # the request went away before the task began
            raise

    def _count(self) -> None:
        """A principal's running tasks are bounded (each is a coroutine here and a record in the
        store, and tokens are free); 429 past MCP_MAX_TASKS_PER_PRINCIPAL."""
        principal, limit = self.ctx.principal, self.server.settings.max_tasks_per_principal
        if principal is None or not limit:
            return
        running = self.runtime.tasks_running
        if running[principal] >= limit:
            raise RpcError(INVALID_REQUEST, f"Too many tasks: this token has {limit} running, the limit "
                           "(MCP_MAX_TASKS_PER_PRINCIPAL); wait for one to end or cancel one.", status=429)
        running[principal] += 1
        self._counted = principal

    def _uncount(self) -> None:
        principal, self._counted = self._counted, None
        if principal is not None:
            self.runtime.tasks_running[principal] -= 1
            if self.runtime.tasks_running[principal] <= 0:
                del self.runtime.tasks_running[principal]

    async def start(self) -> None:
        now = _iso_now()
        self.record = {"taskId": self.task_id, "status": "working", "createdAt": now, "lastUpdatedAt": now,
                       "ttlMs": _TASK_TTL_MS, "pollIntervalMs": 500, "sub": self.ctx.principal,
                       "tool": self.tool.name}
        await self._save()
        self.started = True
        self.runtime.task_runs[self.task_id] = self
        self._unsubscribe = self.runtime.subscribe(_task_channel(self.task_id), self._on_control)
        if not self.outcome.done:
            self.outcome.set({"resultType": "task", **{k: v for k, v in self.record.items()
                                                               if k not in _TASK_PRIVATE}})
        self.ctx._out = None  # the request is answered: progress and logs have nowhere to go

    async def _save(self) -> None:
        async with self._saving:  # one write at a time, each of the newest record
            await self.runtime.set_sealed(_task_key(self.task_id), self.record, self.record["ttlMs"] / 1000)

    async def _finish(self, status: str, **fields) -> None:
        current = await self.runtime.get_sealed(_task_key(self.task_id)) or self.record
        if current.get("status") in _TASK_TERMINAL:
            return  # cancelled meanwhile: the first terminal state stays
        self.record = _task_record(self.record, status, **fields)
        await self._save()

    async def _body(self, arguments: dict) -> None:
        ctx = self.ctx
        try:
            result = await self.server._run_tool(self.tool, arguments, ctx)
        except (RpcError, _InputRequired) as exc:
            if not self.started:
                self.outcome.fail(exc)
            elif isinstance(exc, RpcError):
                await self._finish("failed", error=exc.to_dict())
            return
        except (_Cancelled, _cancelled_class()):
            if not self.started:
                self.outcome.fail(_Cancelled())
            else:
                with anyio.CancelScope(shield=True):  # (its own scope is cancelled: the record is not)
                    await self._finish("cancelled", statusMessage="Cancelled by the client.")
            return
        finally:
            self._uncount()
            if self.started:
                self.runtime.task_runs.pop(self.task_id, None)
                self._unsubscribe()
        shaped = _shape_call_result(result, ctx.protocol_version)
        if not self.started:
            self.outcome.set(shaped)
        else:
            await self._finish("completed", result={"resultType": "complete", **shaped})

    async def wait_input(self, missing: dict) -> dict:
        """Park the task in input_required until tasks/update answers every key of ``missing``."""
        self.pending.update(missing)
        self.record = _task_record(self.record, "input_required", inputRequests=dict(self.pending))
        await self._save()
        answers: dict = {}
        while len(answers) < len(missing):
            arrived = self.arrived  # (taken before the scan: a delivery after it sets this one)
            for key in missing:
                if key in self.delivered and key not in answers:
                    answers[key] = self.delivered.pop(key)
            if len(answers) < len(missing):
                await arrived.wait()
        for key in missing:
            self.pending.pop(key, None)
        if self.pending:
            self.record = _task_record(self.record, "input_required", inputRequests=dict(self.pending))
        else:
            self.record = _task_record(self.record, "working")
        await self._save()
        return answers

    def _on_control(self, message: dict) -> None:
        """tasks/update or tasks/cancel received by another instance."""
        if message.get("cancel"):
            self.ctx._cancelled = True
            if self.runner is not None:
                self.runner.cancel()
        elif isinstance(message.get("update"), dict):
            self.runtime.spawn(self.deliver(message["update"]))

    async def deliver(self, responses: dict) -> None:
        """Answers from tasks/update; the record shows what is still pending before the ack."""
        answered = [k for k in responses if k in self.pending]  # unknown keys are ignored
        for key in answered:
            self.delivered[key] = responses[key]
        remaining = {k: v for k, v in self.pending.items() if k not in self.delivered}
        if answered and remaining:
            self.record = _task_record(self.record, "input_required", inputRequests=remaining)
            await self._save()
        # every waiter (a tool may ask several things at once) scans again, then waits anew
        arrived, self.arrived = self.arrived, anyio.Event()
        arrived.set()

    async def cancel(self) -> None:
        self.ctx._cancelled = True
        await self._finish("cancelled", statusMessage="Cancelled by the client.")
        if self.runner is not None:
            self.runner.cancel()


def _tool_error(message: str) -> dict:
    return {"content": [{"type": "text", "text": message}], "isError": True}


# ---- the tasks extension (io.modelcontextprotocol/tasks, 2026-07-28) ---------------------------


async def _load_task(ctx: Context) -> dict:
    if not _has_tasks_extension(ctx):
        raise _missing_capability({"extensions": {_TASKS_EXTENSION: {}}}, _TASKS_EXTENSION)
    task_id = ctx.params.get("taskId")
    if not isinstance(task_id, str):
        raise _invalid_params(f"{ctx.method} needs params.taskId, a string.")
    record = await ctx.server._runtime().get_sealed(_task_key(task_id))
    if record is None or record.get("sub") != ctx.principal:
        raise _invalid_params(f"Unknown task: {task_id} (it never existed or has expired).",
                              {"taskId": task_id})
    return record


async def _tasks_get(ctx: Context) -> dict:
    record = await _load_task(ctx)
    return {k: v for k, v in record.items() if k not in _TASK_PRIVATE}


async def _tasks_update(ctx: Context) -> dict:
    record = await _load_task(ctx)
    responses = ctx.params.get("inputResponses")
    if not isinstance(responses, dict):
        raise _invalid_params("tasks/update needs params.inputResponses, an object.")
    runtime = ctx.server._runtime()
    run = runtime.task_runs.get(record["taskId"])
    if run is not None:
        await run.deliver(responses)
    elif record["status"] not in _TASK_TERMINAL:
        await runtime.publish(_task_channel(record["taskId"]), {"update": responses})
    return {}


async def _tasks_cancel(ctx: Context) -> dict:
    record = await _load_task(ctx)
    if record["status"] not in _TASK_TERMINAL:
        runtime = ctx.server._runtime()
        run = runtime.task_runs.get(record["taskId"])
        if run is not None:
            await run.cancel()
        else:
            await runtime.publish(_task_channel(record["taskId"]), {"cancel": True})
            await runtime.set_sealed(_task_key(record["taskId"]), _task_record(
                record, "cancelled", statusMessage="Cancelled by the client."), record["ttlMs"] / 1000)
    return {}


def _tasks_extension(server: _CoreMethods) -> Extension:
    """Declared once a tool can run as a task; its methods answer (-32021 without the client's
    extension) whatever the tools."""
    return Extension(_TASKS_EXTENSION, since="2026-07-28",
                     methods={"tasks/get": _tasks_get, "tasks/update": _tasks_update, "tasks/cancel": _tasks_cancel},
                     declared=lambda: any(t.task for t in server._tools.values()))


# ---- the skills extension (io.modelcontextprotocol/skills, SEP-2640) ---------------------------

SKILLS_EXTENSION = "io.modelcontextprotocol/skills"


class _Skills:
    """A server's skills: ``skills/list``, ``skills/get`` and ``resources/directory/read``; every
    skill file is also an ordinary resource (only each SKILL.md is listed in resources/list)."""

    def __init__(self, server: _CoreMethods):
        self.server = server
        self.skills: dict = {}       # SKILL.md URI -> _Skill
        self.directories: dict = {}  # directory URI -> {child URI: Resource}
        self.extension = Extension(SKILLS_EXTENSION, {"directoryRead": True}, methods={
            "skills/list": self.list, "skills/get": self.get, "resources/directory/read": self.read_directory})

    def add(self, skill: _Skill) -> None:
        if skill.uri in self.skills:
            raise ValueError(f"a skill is already served at {skill.uri}")
        self.skills[skill.uri] = skill
        for uri, children in skill.directories().items():
            self.directories.setdefault(uri, {}).update((c["uri"], c) for c in children)
        for rel, data in skill.files.items():
            self.server._resources[skill.file_uri(rel)] = _skill_file_resource(skill, rel, data)
        self.server._changed("resources")

    @staticmethod
    def _cacheable(ctx: Context, result: dict) -> dict:
        if ctx.modern:  # (CacheableResult: 2026-07-28 on; an older revision has no such fields)
            result.update(ttlMs=60000, cacheScope="public")
        return result

    async def list(self, ctx: Context) -> dict:
        items = [skill.entry for skill in self.skills.values()]
        return self._cacheable(ctx, await self.server._paginate(ctx, items, "skills", "skills"))

    async def get(self, ctx: Context) -> dict:
        uri = _string_param(ctx, "uri")
        skill = self.skills.get(uri)
        if skill is None:
            raise _invalid_params(f"No skill is served at {uri}.", {"uri": uri})
        return self._cacheable(ctx, {"skill": skill.entry})

    async def read_directory(self, ctx: Context) -> dict:
        uri = _string_param(ctx, "uri")
        children = self.directories.get(uri)
        if children is None:
            raise _invalid_params(f"{uri} is not a directory resource of this server.", {"uri": uri})
        page = await self.server._paginate(ctx, [children[k] for k in sorted(children)], f"dir {uri}", "resources")
        return self._cacheable(ctx, page)


def _string_param(ctx: Context, field: str) -> str:
    value = ctx.params.get(field)
    if not isinstance(value, str):
        raise _invalid_params(f"{ctx.method} needs params.{field}, a string.")
    return value


def _skill_file_resource(skill: _Skill, rel: str, data: bytes) -> _Resource:
    try:
        value: str | bytes = data.decode("utf-8")  # text when it is text: the same bytes, readable
    except UnicodeDecodeError:
        value = data

    async def read():
        return value
    if rel == "SKILL.md":
        resource = _Resource(read, skill.uri, name=skill.frontmatter["name"],
                             description=skill.frontmatter["description"], mime_type="text/markdown")
    else:
        resource = _Resource(read, skill.file_uri(rel), name=rel.rpartition("/")[2],
                             description=f"{rel} of the {skill.frontmatter['name']} skill",
                             mime_type=_file_mime(rel))
        resource.listed = False
    return resource


# ---- MCP Apps (io.modelcontextprotocol/ui) ---------------------------------------------------

APPS_EXTENSION = "io.modelcontextprotocol/ui"
APP_MIME_TYPE = "text/html;profile=mcp-app"


def _app_ui_meta(csp: dict | None, permissions: dict | None, domain: str | None,
                 prefers_border: bool | None) -> dict:
    ui = {}
    for key, value in (("csp", csp), ("permissions", permissions), ("domain", domain),
                       ("prefersBorder", prefers_border)):
        if value is not None:
            ui[key] = value
    return ui


def _app_resource(fn, uri: str, *, name: str | None, description: str | None, ui: dict) -> _Resource:
    """A ``ui://`` resource: the function's HTML with the app profile MIME type and ``_meta.ui``."""
    if not uri.startswith("ui://") or "{" in uri:
        raise ValueError(f"app URI {uri!r}: an MCP App is a fixed ui:// resource")
    inner = _Callable(fn)

    async def read(ctx: Context):
        html = await inner.invoke({}, ctx)
        if not isinstance(html, str):
            raise ToolError(f"app {uri} must return its HTML document as a string")
        return {"text": html, "mimeType": APP_MIME_TYPE, **({"_meta": {"ui": ui}} if ui else {})}
    return _Resource(read, uri, name=name or fn.__name__, description=description or _description(fn),
                     mime_type=APP_MIME_TYPE, meta={"ui": ui} if ui else None)


# ---- the in-process test client ------------------------------------------------------------


class _TestClientChannel:
    """The outbound channel of a test client's requests: notifications are recorded, requests
    to the client (legacy ``ctx.ask``) are answered by the client's handlers, in-process."""

    def __init__(self, client: "TestClient"):
        self.client = client

    async def send(self, message: dict) -> None:
        self.client.notifications.append(message)

    async def request(self, method: str, params: dict):
        return await self.client._answer(method, params)


class TestClient:
    """``async with server.test_client() as client``: a client that runs requests through the
    server's real dispatch (middleware, validation, shaping) in this event loop: no socket,
    thread or store.  ``era`` is ``"2025-11-25"`` (a session: initialize first, server-to-client
    requests) or ``"2026-07-28"`` (stateless: input rounds answered and retried).  ``sampling``
    and ``elicitation`` are ``fn(params) -> result`` (sync or async); ``roots`` a list of roots or
    such a function.  A JSON-RPC error raises ``RpcError``; tool errors come back as results."""

    __test__ = False  # (pytest: not a test class)
    MAX_ROUNDS = 16

    def __init__(self, server: _CoreMethods, era: str = LATEST_LEGACY, *, sampling=None, elicitation=None,
                 roots=None, capabilities: dict | None = None):
        if era not in SUPPORTED_VERSIONS:
            raise ValueError(f"era {era!r}: use one of {', '.join(SUPPORTED_VERSIONS)}")
        self.server, self.era, self.modern = server, era, era in MODERN_VERSIONS
        self.handlers = {"sampling/createMessage": sampling, "elicitation/create": elicitation,
                         "roots/list": roots if roots is None or callable(roots) else (lambda _p: {"roots": list(roots)})}
        caps = {"sampling": {}} if sampling else {}
        if elicitation:
            caps["elicitation"] = {"form": {}, "url": {}}
        if roots is not None:
            caps["roots"] = {"listChanged": True}
        self.capabilities = {**caps, **(capabilities or {})}
        self.notifications: list = []  # progress and log notifications the server sent
        self.session: dict | None = None
        self.initialize_result: dict | None = None
        self._ids = itertools.count(1)
        self._channel = _TestClientChannel(self)

    async def __aenter__(self) -> "TestClient":
        if not self.modern:
            self.initialize_result = await self.request("initialize", {
                "protocolVersion": self.era, "capabilities": self.capabilities,
                "clientInfo": {"name": "mcp-test-client", "version": __version__}})
            await self._send("notifications/initialized", {}, None)
        return self

    async def __aexit__(self, *exc) -> None:
        self.session = None

    async def _answer(self, method: str, params: dict):
        handler = self.handlers.get(method)
        if handler is None:
            raise RpcError(METHOD_NOT_FOUND, f"this test client has no handler for {method}")
        result = handler(params)
        return await result if inspect.isawaitable(result) else result

    async def _send(self, method: str, params: dict, request_id):
        if self.modern:
            meta = {_META_VERSION: self.era, _META_CAPS: self.capabilities,
                    "io.modelcontextprotocol/clientInfo": {"name": "mcp-test-client", "version": __version__}}
            message = {"jsonrpc": "2.0", "id": request_id, "method": method,
                       "params": {**params, "_meta": {**meta, **(params.get("_meta") or {})}}}
            ctx = _modern_context(self.server, message, None, http=False, out=self._channel)
        else:
            version = (self.session or {}).get("v", self.era)
            ctx = Context(self.server, method, params, request_id, version=version, out=self._channel,
                          capabilities=(self.session or {}).get("caps", self.capabilities),
                          session=self.session, session_id="test-client" if self.session else None)
        response, _ = await self.server._respond(ctx)
        if ctx._session_changed:
            self.session = ctx.session
        return response

    async def request(self, method: str, params: dict | None = None) -> dict:
        """Any request (an extension's too); its result, after answering any input rounds."""
        params = dict(params or {})
        for _ in range(self.MAX_ROUNDS):
            response = await self._send(method, params, next(self._ids))
            if "error" in response:
                error = response["error"]
                raise RpcError(error["code"], error["message"], error.get("data"))
            result = response["result"]
            if result.get("resultType") != "input_required":
                return result
            params["inputResponses"] = {key: await self._answer(r["method"], r.get("params") or {})
                                        for key, r in result["inputRequests"].items()}
            if "requestState" in result:
                params["requestState"] = result["requestState"]
        raise RpcError(INTERNAL_ERROR, f"{method} still asked for input after {self.MAX_ROUNDS} rounds")

    async def _walk(self, method: str, field: str, params: dict | None = None) -> list:
        items, cursor = [], None
        for _ in range(10000):
            page = await self.request(method, {**(params or {}), **({"cursor": cursor} if cursor else {})})
            items.extend(page.get(field, []))
            cursor = page.get("nextCursor")
            if not cursor:
                return items
        raise RpcError(INTERNAL_ERROR, f"{method} never stopped returning nextCursor")

    async def list_tools(self) -> list:
        return await self._walk("tools/list", "tools")

    async def call_tool(self, name: str, arguments: dict | None = None) -> dict:
        """The CallToolResult (``content``, ``structuredContent``, ``isError``)."""
        return await self.request("tools/call", {"name": name, "arguments": arguments or {}})

    async def list_resources(self) -> list:
        return await self._walk("resources/list", "resources")

    async def list_resource_templates(self) -> list:
        return await self._walk("resources/templates/list", "resourceTemplates")

    async def read_resource(self, uri: str) -> list:
        """The resource's ``contents``."""
        return (await self.request("resources/read", {"uri": uri}))["contents"]

    async def list_prompts(self) -> list:
        return await self._walk("prompts/list", "prompts")

    async def get_prompt(self, name: str, arguments: dict | None = None) -> dict:
        return await self.request("prompts/get", {"name": name, "arguments": arguments or {}})

    async def complete(self, ref: dict, argument: str, value: str, context: dict | None = None) -> dict:
        """``completion/complete``: its ``completion`` (``values``, ``total``, ``hasMore``)."""
        params = {"ref": ref, "argument": {"name": argument, "value": value}}
        if context:
            params["context"] = {"arguments": context}
        return (await self.request("completion/complete", params))["completion"]

    async def list_skills(self) -> list:
        return await self._walk("skills/list", "skills")


_COMMON_METHODS = {
    "tools/list": _CoreMethods._m_tools_list,
    "tools/call": _CoreMethods._m_tools_call,
    "resources/list": _CoreMethods._m_resources_list,
    "resources/templates/list": _CoreMethods._m_templates_list,
    "resources/read": _CoreMethods._m_resources_read,
    "prompts/list": _CoreMethods._m_prompts_list,
    "prompts/get": _CoreMethods._m_prompts_get,
    "completion/complete": _CoreMethods._m_complete,
    "server/discover": _CoreMethods._m_discover,
}
_LEGACY_METHODS = {
    **_COMMON_METHODS,
    "initialize": _CoreMethods._m_initialize,
    "ping": _CoreMethods._m_ping,
    "logging/setLevel": _CoreMethods._m_set_level,
    "resources/subscribe": _CoreMethods._m_subscribe,
    "resources/unsubscribe": _CoreMethods._m_subscribe,
    "notifications/initialized": _CoreMethods._n_initialized,
    "notifications/cancelled": _CoreMethods._n_cancelled,
    "notifications/roots/list_changed": _CoreMethods._n_ignored,
    "notifications/progress": _CoreMethods._n_ignored,
}
_MODERN_METHODS = {
    **_COMMON_METHODS,
    "subscriptions/listen": _CoreMethods._m_listen,
    "notifications/cancelled": _CoreMethods._n_cancelled,
}


# ==== 6. Transports =============================================================================
#
# Rules:
# - Streamable HTTP (``/mcp``): POST answers with JSON unless the request streams, in which case
#   the answer upgrades to SSE at its first notification or server request (so a plain call costs
#   one JSON write).  2025-11-25 SSE answers carry a priming event and are logged in the store, so
#   a client that lost the stream resumes with GET + ``Last-Event-ID``.
# - A legacy session exists only after a successful ``initialize``; unknown or expired ids get 404
#   (the client then re-initializes), a missing id gets 400.  Modern requests never get a session.
#   Exception: GET /sse records its session (owner, transport) at once, before initialize, so the
#   first POST /messages may reach any instance.
# - A session belongs to the principal whose token made it and to the transport that made it
#   (``t``: "mcp" or "sse").  Every route that names a session (POST/GET/DELETE /mcp, resumption,
#   GET /sse, POST /messages, answers to server requests, cancellations) goes through
#   ``_session_of``; anything else is 404, as for an unknown id.  With MCP_AUTH=none there is no
#   principal and the id (192 random bits) is the whole credential.
# - Legacy HTTP: a dropped connection is not a cancellation (``notifications/cancelled`` is).
#   A cancelled request's POST still gets JSON or SSE (``_PostChannel.finish_cancelled``).
#   Modern HTTP: a dropped connection cancels the request and nothing more is sent.
# - Session-wide notifications (list changes, resource updates) travel on a store channel, so the
#   instance that holds a client's GET stream or ``/sse`` stream delivers them wherever they arose.
# - Only what cannot leave the process lives in the ``_Runtime`` (the core's ``_RuntimePort``):
#   open streams, running requests, answers a request awaits from its client.
# - Tokens are free, so everything a client makes the server hold is capped per principal and per
#   client address, with a 429 that names the setting: live sessions (counted in the store, so the
#   cap holds across instances), open streams (GET /mcp, /sse, subscriptions/listen; per
#   instance), running tasks, /messages requests in flight (each a task holding no connection),
#   the logs of a session's streams, and the JSON a session keeps for the client.
# - A draining instance (SIGTERM) ends its GET /mcp streams, and with a shared store its
#   2025-11-25 POST streams, with an SSE ``retry:`` hint: the client resumes on another instance
#   with ``Last-Event-ID`` while the request runs on here and logs what it sends.  /sse and
#   subscriptions/listen streams just end (they cannot resume).


# ---- Running a request eagerly ---------------------------------------------------------------
#
# A request runs at once, in the callback that received it, until it first has to wait (an
# eager task, Python 3.12+): most tools/call never wait, and are answered before that callback
# returns, without a trip through the event loop.  It is a real task from the start, so
# asyncio.current_task(), timeouts, cancellation and task groups act on it as on any other.


# Python 3.11 has no eager tasks: there a request starts on the loop's next pass (slower, the same)
_EAGER = {"eager_start": True} if sys.version_info >= (3, 12) else {}


def _run_eagerly(coroutine) -> "asyncio.Task | None":
    """Run ``coroutine`` as a task that starts at once, in this callback, until it first waits;
    the task, or None when it finished then (its exception, if any, raised here)."""
    task = asyncio.Task(coroutine, loop=asyncio.get_running_loop(), **_EAGER)
    if not task.done():
        return task
    if not task.cancelled():
        task.result()
    return None


def _sse(message: dict | str | None, event_id: str | None = None, event: str = "message") -> bytes:
    """One SSE event; ``message`` is a JSON-RPC message, or its JSON text already made."""
    head = f"event: {event}\n"
    if event_id is not None:
        head += f"id: {event_id}\n"
    data = "" if message is None else message if isinstance(message, str) else _dumps(message)
    return (head + "data: " + data + "\n\n").encode()


_SEALED = "sealed:"  # a stored value that is not JSON but an AES-GCM token of it (``_Runtime``)


_SSE_KEEPALIVE = b": keep-alive\n\n"


def _log_stream_overflow(kind: str) -> None:
    log.warning("a %s stream ended: its client read too slowly and fell MCP_STREAM_BUFFER messages "
                "behind (a 2025-11-25 client resumes it with Last-Event-ID)", kind)


def _retry_hint(runtime: "_Runtime", resumable: bool) -> bytes:
    """The last bytes of a stream the server ends: while it drains, a resumable stream's client is
    told when to reconnect (through the balancer, to another instance, with ``Last-Event-ID``)."""
    return f"retry: {runtime.settings.sse_retry_ms}\n\n".encode() if runtime.draining and resumable else b""


class _Runtime(_RuntimePort):
    """The protocol core's runtime port over a ``Store``, and what cannot leave the process:
    open streams, running requests, pending client answers."""

    def __init__(self, server: _ProtocolCore, store: Store):
        self.server = server
        self.store = store
        self.settings = server.settings
        self.pending: dict = {}         # (session id, request id) -> Future of the client's answer
        self.running: dict = {}         # (session id, request id) -> Context
        self.session_streams: dict = {}  # session id -> _SessionStream (GET /mcp or GET /sse)
        self.live_posts: dict = {}      # (session id, stream id) -> _PostChannel (resumable)
        self.task_runs: dict = {}       # task id -> _TaskRun running here
        self.listeners: set = set()     # callables fed every bus event
        self.background = _Background()  # work that outlives its request
        self.closing = False
        self.unready = False  # SIGTERM: /readyz says 503 (balancers take the instance out), it still serves
        self.draining = False  # then its streams end, resumable ones with a retry hint
        self._ids = 0
        self._prefix = secrets.token_hex(3)
        self.shared = not isinstance(store, MemoryStore)  # other processes may hold streams
        self.started = False
        self._unsubscribes: list = []
        # Copies of legacy sessions read from a shared store: session id -> (record, when read).
        # A request in a known session then costs no store round trip; every change or end of a
        # session is published on _SESSIONS_CHANNEL and drops the copies everywhere, and a copy
        # older than MCP_SESSION_CACHE seconds is read again (which also slides the expiry).
        self.session_cache: dict = {}
        self.cache_seconds = self.settings.session_cache if self.shared else 0.0
        self._drops = 0  # changes announced on _SESSIONS_CHANNEL so far
        self._ticker = None  # the keep-alive ticker of idle session streams
        self.held: collections.Counter = collections.Counter()  # (kind, holder, who) -> open streams, requests
        self.tasks_running: collections.Counter = collections.Counter()  # principal -> its _TaskRuns here

    def start(self) -> None:
        """Subscribe to the server-wide channels (in the running loop)."""
        if not _on_asyncio():
            if isinstance(self.store, RedisStore):
                raise RuntimeError("The Redis store (REDIS_URL) needs asyncio: redis-py's client runs on "
                                   "asyncio alone.  Serve server.asgi on asyncio (uvicorn, hypercorn's asyncio "
                                   "worker, the bundled server), or on trio without REDIS_URL.")
            if self.background.group is None:  # (refused before anything takes a slot or a stream)
                raise RpcError(INTERNAL_ERROR, "This server runs on trio without ASGI lifespan events, which "
                               "its background work needs: turn lifespan on in the ASGI server.", status=503)
        self.started = True
        self._unsubscribes = [self.store.subscribe(_BUS_CHANNEL, self._on_bus),
                              self.store.subscribe(_CANCEL_CHANNEL, self._on_cancel)]
        if self.cache_seconds:
            self._unsubscribes.append(self.store.subscribe(_SESSIONS_CHANNEL, self._on_session_changed))

    # -- legacy sessions ---------------------------------------------------------------------------

    async def session(self, session_id: str) -> dict | None:
        """A legacy session's record, its expiry slid forward (or this instance's fresh copy)."""
        cache, store = self.session_cache, self.store
        if not self.cache_seconds:  # the in-memory store, or copies turned off
            return await self._read_session(session_id)
        trusted = store.link_up  # copies need the invalidations to arrive
        if trusted:
            entry = cache.get(session_id)
            if (entry is not None and time.monotonic() - entry[1] < self.cache_seconds
                    and entry[2] == store.link_epoch):
                return entry[0]
        epoch, drops = store.link_epoch, self._drops
        record = await self._read_session(session_id)
        # (a change announced while the read was on its way may be newer than what it read)
        # (nor of an /sse session not initialized yet: its initialize may come through any instance)
        if (record is None or "v" not in record or not trusted or epoch != store.link_epoch
                or drops != self._drops):
            cache.pop(session_id, None)
        else:
            if len(cache) >= _SESSION_CACHE_MAX and session_id not in cache:
                del cache[next(iter(cache))]
            cache[session_id] = (record, time.monotonic(), epoch)
        return record

    async def _read_session(self, session_id: str) -> dict | None:
        ttl = self.settings.session_ttl
        record = await self.store.get_refreshed(_session_key(session_id), ttl)
        if record is not None and record.get("q"):
            await self.store.touch(record["q"], ttl)  # the quota sets counting it live as long as it does
        return record

    async def save_session(self, session_id: str, record: dict, new: bool = False) -> None:
        await self.store.set(_session_key(session_id), record, self.settings.session_ttl)
        if not new:
            await self._session_changed(session_id)

    async def drop_session(self, session_id: str, record: dict) -> None:
        await self.store.delete(_session_key(session_id))
        for key in record.get("q", ()):
            await self.store.discard(key, session_id, self.settings.session_ttl)
        await self._session_changed(session_id)

    async def _session_changed(self, session_id: str) -> None:
        if self.cache_seconds:
            self.session_cache.pop(session_id, None)
            await self.store.publish(_SESSIONS_CHANNEL, {"sid": session_id})

    def _on_session_changed(self, message: dict) -> None:
        self._drops += 1
        if isinstance(message, dict) and self.session_cache.pop(message.get("sid"), None) is not None:
            _metrics.inc("mcp_session_cache_drops_total")

    def spawn(self, coroutine) -> _Job:
        return self.background.spawn(coroutine)

    async def publish_event(self, event: dict) -> None:
        await self.store.publish(_BUS_CHANNEL, event)

    async def publish(self, channel: str, message) -> None:
        await self.store.publish(channel, message)

    def subscribe(self, channel: str, callback) -> typing.Callable:
        return self.store.subscribe(channel, callback)

    def _on_bus(self, event: dict) -> None:
        for listener in list(self.listeners):
            listener(event)

    def watch_idle_streams(self) -> None:
        """Make sure the keep-alive ticker runs (one timer for every stream, not one each)."""
        if self._ticker is None or self._ticker.done:
            self._ticker = self.spawn(self._keep_alive())

    async def _keep_alive(self) -> None:
        """Wake the streams that were quiet for MCP_SSE_KEEPALIVE seconds; they send a comment."""
        period = self.settings.sse_keepalive
        tick = min(1.0, period / 4)
        while self.session_streams and not self.closing:
            await anyio.sleep(tick)
            now = anyio.current_time()
            for stream in list(self.session_streams.values()):
                waiter = stream.waiter
                if waiter is not None and now - stream.idle_since >= period:
                    waiter.set()

    # -- quotas: sessions in the store (they hold across instances), streams here ------------------

    async def admit_session(self, session_id: str, http: _HttpRequest, request_id=None) -> list:
        """Count a new session against its principal's and its client address's caps; 429 past
        either.  Returns the quota sets it is in, which the record keeps as ``q``: reading the
        session slides their expiry too, and deleting it takes it out of them.  A session whose
        record expired stops counting as well."""
        settings = self.settings
        counted = []
        for holder, who, limit, setting in (
                ("token", http.principal, settings.max_sessions_per_principal, "MCP_MAX_SESSIONS_PER_PRINCIPAL"),
                ("client address", http.client_address(), settings.max_sessions_per_address,
                 "MCP_MAX_SESSIONS_PER_ADDRESS")):
            if who is None or not limit:
                continue
            key = _quota_key("sessions:" + holder, who)
            if not await self.store.admit(key, session_id, limit, settings.session_ttl, _session_key):
                _metrics.inc("mcp_quota_refusals_total", kind="sessions")
                raise _over_limit(f"Too many sessions: this {holder} holds {limit} live sessions, the limit "
                                  f"({setting}); end one with DELETE or let one expire, then retry.", request_id)
            counted.append(key)
        return counted

    def hold_stream(self, principal: str | None, address: str | None) -> typing.Callable:
        """Count an open stream against its principal's and address's caps on this instance (429
        past either); returns what releases it."""
        settings = self.settings
        return self._hold("streams", "open streams", "close one", (
            ("token", principal, settings.max_streams_per_principal, "MCP_MAX_STREAMS_PER_PRINCIPAL"),
            ("client address", address, settings.max_streams_per_address, "MCP_MAX_STREAMS_PER_ADDRESS")))

    def hold_request(self, principal: str | None, address: str | None, request_id=None) -> typing.Callable:
        """Count a /messages request running here (a task that holds no connection) against its
        principal's and address's caps; returns what releases it."""
        return self._hold("requests", "requests in flight on /messages", "wait for their answers", (
            ("token", principal, _MAX_IN_FLIGHT, f"{_MAX_IN_FLIGHT} for a token"),
            ("client address", address, _MAX_IN_FLIGHT * 10, f"{_MAX_IN_FLIGHT * 10} for an address")), request_id)

    def _hold(self, kind: str, what: str, remedy: str, caps: tuple, request_id=None) -> typing.Callable:
        held = []
        for holder, who, limit, setting in caps:
            if who is None or not limit:
                continue
            if self.held[(kind, holder, who)] >= limit:
                _metrics.inc("mcp_quota_refusals_total", kind=kind)
                raise _over_limit(f"Too many {what}: this {holder} has {limit} on this server, the limit "
                                  f"({setting}); {remedy}, then retry.", request_id)
            held.append((kind, holder, who))
        for key in held:
            self.held[key] += 1

        def release():
            for key in held:
                self.held[key] -= 1
                if self.held[key] <= 0:
                    del self.held[key]
        return release

    # -- event logs of resumable streams ----------------------------------------------------------

    async def log_event(self, key: str, text: str) -> int:
        """Append one event (JSON text) to a stream's log; returns its sequence number.  In a
        shared store the event is sealed, bound to its log: a copy of the store would otherwise
        hold tool results and the elicitations that carry a login link and its pairing code."""
        if self.shared:
            text = _SEALED + (await self.server._keyring()).seal_text(text, "events", key)
        return await self.store.append(key, text, self.settings.replay_events, self.settings.session_ttl)

    async def set_sealed(self, key: str, record: dict, ttl: float) -> None:
        """Store a record that a copy of the store must not show (a task's result and questions):
        in a shared store sealed, bound to its key; in this process's memory as it is."""
        value = record
        if self.shared:
            value = _SEALED + (await self.server._keyring()).seal_text(_dumps(record), "records", key)
        await self.store.set(key, value, ttl)

    async def get_sealed(self, key: str) -> dict | None:
        value = await self.store.get(key)
        if isinstance(value, str) and value.startswith(_SEALED):
            text = (await self.server._keyring()).unseal_text(value[len(_SEALED):], "records", key)
            value = None if text is None else _loads(text, _STORED_JSON_DEPTH)
        return value if isinstance(value, dict) else None

    async def read_events(self, key: str, after: int) -> list:
        """A stream's logged events after ``after`` as ``(seq, message)``.  The log keeps text: a
        string is one object the garbage collector never walks, where a message is dozens.  An
        event that does not unseal (the secret changed, or someone wrote it) is left out."""
        events = []
        for seq, item in await self.store.read_after(key, after):
            if isinstance(item, str) and item.startswith(_SEALED):
                item = (await self.server._keyring()).unseal_text(item[len(_SEALED):], "events", key)
                if item is None:
                    log.warning("an event of a stream's log does not unseal: left out of the replay")
                    continue
            events.append((seq, _loads(item, _STORED_JSON_DEPTH) if isinstance(item, str) else item))
        return events

    # -- requests the server sends to a legacy client ------------------------------------------------

    def next_request_id(self) -> str:
        self._ids += 1
        return f"s{self._prefix}-{self._ids}"

    async def ask_client(self, session_id: str | None, method: str, params: dict, write) -> dict:
        """Send a server-to-client request with ``write(message)`` and wait for its answer."""
        request_id = self.next_request_id()
        reply = _Answer()
        key = (session_id, request_id)
        self.pending[key] = reply
        # the answer may be POSTed to another instance: it arrives on the session's reply channel
        unsubscribe = self.store.subscribe(_reply_channel(session_id), lambda m: self.resolve(session_id, m))
        try:
            await self.store.subscribed()  # the answer may come through another instance at once
            await write({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
            timeout, answer = self.settings.client_timeout or math.inf, None
            with anyio.move_on_after(timeout):
                answer = await reply.wait()
            if answer is None:
                raise ToolError(f"The client did not answer {method} within {timeout:g} seconds.")
        finally:
            self.pending.pop(key, None)
            unsubscribe()
        if "error" in answer:
            error = answer["error"] if isinstance(answer["error"], dict) else {}
            raise ToolError(f"The client refused {method}: {error.get('message', 'no reason given')}")
        result = answer.get("result")
        return result if isinstance(result, dict) else {}

    def resolve(self, session_id: str | None, message: dict) -> bool:
        answer = self.pending.get((session_id, message.get("id")))
        if answer is None or answer.done:
            return False
        answer.set(message)
        return True

    # -- running requests and cancellation -------------------------------------------------------

    async def respond_cancellable(self, ctx: Context) -> tuple:
        """``_respond`` for a request of a legacy session, in a cancel scope that
        ``notifications/cancelled`` (on any instance) ends; (None, 0) when it did."""
        key = (ctx.session_id, ctx.request_id)
        with _cancel_scope() as ctx._scope:
            if ctx.request_id is not None:
                self.running[key] = ctx
            try:
                return await self.server._respond(ctx)
            finally:
                if self.running.get(key) is ctx:
                    del self.running[key]
        return None, 0

    def cancel(self, session_id: str | None, request_id) -> None:
        """Cancel a running request here, or tell the instance that runs it."""
        if not self._cancel_local(session_id, request_id) and self.shared and session_id is not None:
            self.spawn(self.store.publish(_CANCEL_CHANNEL, {"sid": session_id, "rid": request_id}))

    def _on_cancel(self, message: dict) -> None:
        self._cancel_local(message.get("sid"), message.get("rid"))

    def _cancel_local(self, session_id, request_id) -> bool:
        ctx = self.running.get((session_id, request_id))
        if ctx is None or ctx.method == "initialize":
            return False  # unknown, finished, or not cancellable: ignored, as the spec allows
        ctx._cancelled = True
        if ctx._scope is not None:
            ctx._scope.cancel()
        return True

    # -- 2026 subscriptions/listen ----------------------------------------------------------------

    async def listen(self, ctx: Context, honored: dict) -> dict:
        """The stream of a subscriptions/listen request (the core checked what it asks)."""
        out = ctx._out
        try:  # (its connection counts against the client address)
            release = self.hold_stream(ctx.principal, None)
        except _HttpError as exc:
            raise RpcError(exc.code, exc.message, status=exc.status) from None
        tag = {_META_SUBSCRIPTION: ctx.request_id}
        inbox = _Inbox(self.settings.stream_buffer)

        def on_event(event):
            method = _listen_method(event, honored)
            if method:
                params = {"_meta": tag}
                if event["kind"] == "updated":
                    params["uri"] = event["uri"]
                inbox.put({"jsonrpc": "2.0", "method": method, "params": params})
            elif event.get("kind") == "shutdown":
                inbox.put(None)

        self.listeners.add(on_event)  # before the acknowledgement: nothing after it is missed
        _metrics.inc("mcp_open_streams", kind="listen")
        try:
            await out.send({"jsonrpc": "2.0", "method": "notifications/subscriptions/acknowledged",
                            "params": {"_meta": tag, "notifications": honored}})
            while not self.closing:
                message = await inbox.get(self.settings.sse_keepalive)
                if message is inbox.QUIET:
                    await out.keepalive()
                    continue
                if message is None:
                    break
                await out.send(message)
        finally:
            if inbox.overflowed:
                _log_stream_overflow("subscriptions/listen")
            inbox.close()
            release()
            self.listeners.discard(on_event)
            _metrics.inc("mcp_open_streams", -1, kind="listen")
        return {"_meta": tag}

    async def end_streams(self) -> None:
        """Graceful stop, first half (``_serve_http``): end every open stream, resumable ones with
        a retry hint, so that their clients reconnect elsewhere and resume from the store.  The
        requests behind POST streams run on, logging what they send, until they finish; a POST
        stream ends early only where another instance can resume it (a shared store)."""
        self.draining = True
        self._on_bus({"kind": "shutdown"})  # session streams, resumed streams, subscriptions/listen
        for channel in list(self.live_posts.values()) if self.shared else ():
            await channel.detach()

    async def close(self) -> None:
        """Graceful stop: end listen and session streams, cancel background work."""
        self.closing = True
        self._on_bus({"kind": "shutdown"})
        await self.background.close()
        for unsubscribe in self._unsubscribes:
            unsubscribe()
        await self.store.close()


_LISTEN_FILTERS = {"tools": "toolsListChanged", "prompts": "promptsListChanged",
                   "resources": "resourcesListChanged"}
_LIST_CHANGED = {"tools": "notifications/tools/list_changed", "prompts": "notifications/prompts/list_changed",
                 "resources": "notifications/resources/list_changed"}


def _listen_method(event: dict, honored: dict) -> str | None:
    kind = event.get("kind")
    if kind in _LISTEN_FILTERS:
        return _LIST_CHANGED[kind] if honored.get(_LISTEN_FILTERS[kind]) else None
    if kind == "updated":
        return ("notifications/resources/updated"
                if event.get("uri") in honored.get("resourceSubscriptions", ()) else None)
    return None


# ---- HTTP plumbing shared by the HTTP transports --------------------------------------------------


class _HttpError(Exception):
    def __init__(self, status: int, message: str, code: int = INVALID_REQUEST, request_id=None,
                 headers: tuple = ()):
        super().__init__(message)
        self.status, self.message, self.code, self.request_id, self.headers = (
            status, message, code, request_id, headers)


_REASONS = {200: "OK", 201: "Created", 202: "Accepted", 204: "No Content", 302: "Found", 400: "Bad Request",
            401: "Unauthorized", 403: "Forbidden", 421: "Misdirected Request", 429: "Too Many Requests",
            404: "Not Found", 405: "Method Not Allowed", 406: "Not Acceptable", 408: "Request Timeout",
            409: "Conflict", 413: "Content Too Large", 414: "URI Too Long", 415: "Unsupported Media Type",
            431: "Request Header Fields Too Large", 500: "Internal Server Error", 503: "Service Unavailable"}


def _header_dict(pairs: list) -> dict:
    """Lower-cased names to values; a repeated header's values joined, as HTTP allows."""
    headers = dict(pairs)
    if len(headers) != len(pairs):
        headers = {}
        for key, text in pairs:
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers


def _over_limit(message: str, request_id=None) -> "_HttpError":
    """A per-principal or per-address cap was reached: 429, with a hint of when to retry."""
    return _HttpError(429, message, request_id=request_id, headers=((b"retry-after", b"30"),))


def _release_nothing() -> None:
    return None


async def _holding(step: typing.Awaitable, release: typing.Callable) -> None:
    """Run ``step`` (a long-lived response, a /messages request), then give back the slot it held."""
    try:
        await step
    finally:
        release()


def _body_too_large(limit: int) -> "_HttpError":
    return _HttpError(413, f"Request body is larger than the limit of {limit} bytes (MCP_MAX_BODY).")


class _AsgiExchange:
    """The exchange interface over plain ASGI: any ASGI server (the bundled server's own adapter
    is its ``_BundledExchange``, section 9).  ``_HttpRequest`` asks an exchange for no more than this:

    - ``take_body()``: the whole body if it has all arrived and nobody took it, else None; then
    - ``receive()``: ASGI's, the next body chunk or ``http.disconnect``;
    - ``start(status, headers)``: the response head, sent with the first ``write``;
    - ``await write(body, more)``: body bytes (``more=False`` ends the response);
    - ``on_disconnect(callback)``: ``callback()`` once the client has gone before the response
      ended (at most one per exchange); ``stop_watching()`` forgets it;
    - ``forget_request()``: drop the request's raw headers where that is safe."""

    __slots__ = ("receive", "send", "spawn", "head", "watcher", "extension", "raw_headers")

    def __init__(self, scope: dict, receive, send, spawn):
        self.receive, self.send = receive, send
        self.spawn = spawn  # runs a coroutine as background work (``_Runtime.spawn``)
        self.head = None  # the response start, waiting for the first write
        self.watcher = None
        # the bundled server's disconnect callbacks, when it runs us as a plain ASGI app (mounted)
        self.extension = (scope.get("extensions") or {}).get("mcp_server.disconnect")
        # its raw header list, which it never reads after the head; another server's is left alone
        self.raw_headers = scope.get("headers") if self.extension is not None else None

    def take_body(self) -> None:
        return None

    def start(self, status: int, headers: list) -> None:
        self.head = {"type": "http.response.start", "status": status, "headers": headers}

    async def write(self, body: bytes, more: bool) -> None:
        if self.head is not None:
            head, self.head = self.head, None
            await self.send(head)
        await self.send({"type": "http.response.body", "body": body, "more_body": more})

    def on_disconnect(self, callback) -> None:
        if self.extension is not None:
            self.extension(callback)
        elif self.watcher is None:  # watch receive() for http.disconnect
            async def watch():
                while True:
                    message = await self.receive()
                    if message["type"] == "http.disconnect":
                        callback()
                        return
            self.watcher = self.spawn(watch())

    def stop_watching(self) -> None:
        if self.watcher is not None:
            self.watcher.cancel()
            self.watcher = None

    def forget_request(self) -> None:
        if type(self.raw_headers) is list:
            self.raw_headers.clear()


def _asgi_headers(scope: dict) -> dict:
    return _header_dict([(name.decode("latin-1").lower(), value.decode("latin-1"))
                         for name, value in scope.get("headers", ())])


class _HttpRequest:
    """One HTTP exchange, with the helpers every transport needs, over an exchange (``io``):
    ``_AsgiExchange`` under any ASGI server, the bundled server's ``_BundledExchange`` under it."""

    __slots__ = ("scope", "io", "headers", "extra_headers", "started", "ended", "_callbacks",
                 "_watching", "principal", "base", "status", "cancels")

    def __init__(self, scope: dict, headers: dict, io, extra_headers: list | None = None):
        self.scope, self.headers, self.io = scope, headers, io  # headers: lower-cased name -> value
        self.extra_headers = extra_headers or []  # CORS and the like, added to every response
        self.started = self.ended = False
        self._callbacks: tuple = ()  # (a tuple: most exchanges add none, and the rest one)
        self.cancels: Context | None = None  # the 2026 request that ends if the client goes
        self._watching = False
        self.principal = None  # who the bearer token names (None with MCP_AUTH=none)
        self.base = None  # this server's external base URL as the client sees it
        self.status = 0

    def client_address(self) -> str | None:
        """The client's IP address (a trusted proxy's X-Forwarded-For already applied); None when
        the server does not know it (a Unix socket), and then no per-address cap applies."""
        client = self.scope.get("client")
        return _address_block(client[0]) if client else None

    def query(self, name: str) -> str | None:
        values = urllib.parse.parse_qs(self.scope.get("query_string", b"").decode("latin-1")).get(name)
        return values[0] if values else None

    async def read_body(self, limit: int) -> bytes:
        declared = self.headers.get("content-length")
        if declared is not None and _DECIMAL.fullmatch(declared) and int(declared) > limit:
            raise _body_too_large(limit)
        whole = self.io.take_body()
        if whole is not None:  # it has all arrived
            if len(whole) > limit:
                raise _body_too_large(limit)
            return whole
        chunks, size = [], 0
        while True:
            message = await self.io.receive()
            if message["type"] == "http.disconnect":
                raise _Cancelled()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _body_too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    async def read_message(self, settings: Settings):
        """The body as a JSON-RPC message (or batch): 415 unless it is declared JSON (as the
        official SDK requires: a browser's cross-site "simple" POST cannot declare it), 400 with
        -32700 when it is not JSON."""
        declared = self.headers.get("content-type")
        if declared is None or _media_type(declared) != "application/json":
            raise _HttpError(415, "Unsupported Media Type: the Content-Type must be application/json, not "
                             f"{'missing' if declared is None else repr(_media_type(declared))}.")
        body = await self.read_body(settings.max_body)
        try:
            return _loads(body, settings.max_json_depth)
        except ValueError as exc:
            raise _HttpError(400, _parse_error_text(exc), PARSE_ERROR) from None

    def start(self, status: int, headers: list) -> None:
        """The response head; it leaves with the first ``write`` or ``end``."""
        self.started = True
        self.status = status
        self.io.start(status, headers + self.extra_headers)

    async def write(self, data: bytes) -> None:
        if not self.ended:
            await self.io.write(data, True)

    async def end(self, data: bytes = b"") -> None:
        if not self.ended:
            self.ended = True
            await self.io.write(data, False)
        self.stop_watching()

    async def respond(self, status: int, body: bytes = b"", content_type: str = "application/json",
                      headers: list | None = None) -> None:
        head = [(b"content-type", content_type.encode())] if body or status >= 400 else []
        head.append((b"content-length", b"%d" % len(body)))
        if headers:
            head += headers
        self.start(status, head)
        await self.end(body)

    def respond_json(self, status: int, value, headers: list | None = None) -> typing.Awaitable:
        return self.respond(status, _dumps(value).encode(), headers=headers)

    async def start_sse(self, headers: list | None = None) -> None:
        self.start(200, [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                               (b"x-accel-buffering", b"no")] + (headers or []))
        await self.write(b"")  # an empty chunk sends the head now: the client knows the stream is open

    def forget_request(self) -> None:
        """For a long-lived response: drop the request's headers, which nothing reads any more
        (idle streams are many, and each kept its request's headers).  The session id stays for the access
        log.  The exchange drops its raw headers where that is safe."""
        session_id = self.headers.get("mcp-session-id")
        self.headers = {} if session_id is None else {"mcp-session-id": session_id}
        self.io.forget_request()

    def on_disconnect(self, callback) -> None:
        """Call ``callback()`` if the client goes away before the response ends."""
        self._callbacks += (callback,)
        if len(self._callbacks) == 1 and self.cancels is None:
            self._watch()

    def cancel_on_disconnect(self, ctx: "Context") -> None:
        """2026-07-28: closing the response stream cancels the request (until ``stop_watching``).
        One attribute, where a callback would cost a closure and its registration a request."""
        self.cancels = ctx
        if not self._callbacks:
            self._watch()

    def _watch(self) -> None:
        """Have ``_fire`` called when the client goes."""
        if not self._watching:
            self._watching = True
            self.io.on_disconnect(self._fire)

    def _fire(self) -> None:
        if self.ended or not (self._callbacks or self.cancels):
            return
        self.ended = True  # nothing more can be written
        callbacks, self._callbacks = self._callbacks, ()
        ctx, self.cancels = self.cancels, None
        if ctx is not None:
            ctx._cancelled = True
            if ctx._scope is not None:
                ctx._scope.cancel()
        for callback in callbacks:
            callback()

    def stop_watching(self) -> None:
        self._callbacks, self.cancels = (), None
        if self._watching:
            self._watching = False
            self.io.stop_watching()


@functools.lru_cache(maxsize=64)
def _media_type(content_type: str) -> str:
    return content_type.split(";")[0].strip().lower()


@functools.lru_cache(maxsize=256)
def _accepts(accept: str | None) -> tuple:
    """(JSON acceptable, SSE acceptable) for an Accept header; lenient like real clients need."""
    if not accept:
        return True, False
    kinds = [part.split(";")[0].strip().lower() for part in accept.split(",")]
    any_type = "*/*" in kinds
    json_ok = any_type or "application/json" in kinds or "application/*" in kinds
    sse_ok = any_type or "text/event-stream" in kinds or "text/*" in kinds
    return json_ok, sse_ok


def _error_body(error: RpcError | _HttpError, request_id=None) -> dict:
    if isinstance(error, _HttpError):
        return {"jsonrpc": "2.0", "id": request_id, "error": {"code": error.code, "message": error.message}}
    return _error_response(request_id, error)


# ---- Streamable HTTP ---------------------------------------------------------------------------


class _PostChannel:
    """Where a POSTed request's notifications and server requests go: JSON until the first of
    them, then an SSE response (logged in the store for 2025-11-25 resumption)."""

    __slots__ = ("http", "runtime", "session_id", "sse_ok", "resumable", "streaming", "detached", "stream_id",
                 "followers", "extra_headers", "done", "must_stream")

    def __init__(self, http: _HttpRequest, runtime: _Runtime, session_id: str | None, sse_ok: bool, resumable: bool,
                 extra_headers: list):
        self.http, self.runtime, self.session_id = http, runtime, session_id
        self.sse_ok, self.resumable = sse_ok, resumable and session_id is not None
        self.streaming = self.detached = self.done = False
        self.stream_id = None
        self.followers: list = []
        self.extra_headers = extra_headers
        self.must_stream = False  # answer with SSE even if nothing streams (SSE-only clients, sse mode)

    @property
    def can_stream(self) -> bool:
        return self.sse_ok

    async def _start(self) -> None:
        self.streaming = True
        await self.http.start_sse(self.extra_headers)
        if self.resumable:
            self.stream_id = secrets.token_hex(6)
            self.runtime.live_posts[(self.session_id, self.stream_id)] = self
            await self._remember_log()
            retry = self.runtime.settings.sse_retry_ms
            await self.http.write(f"id: {self.stream_id}:0\nretry: {retry}\ndata: \n\n".encode())

    async def _remember_log(self) -> None:
        """List this stream's log under the session, so that deleting the session deletes it too.
        A session keeps the logs of its last MCP_REPLAY_EVENTS streams: the list holds one more,
        whose log goes when it is pushed out (a client cannot pile up logs by streaming)."""
        store, settings, index = self.runtime.store, self.runtime.settings, _streams_key(self.session_id)
        kept = settings.replay_events
        seq = await store.append(index, self.stream_id, kept + 1, settings.session_ttl)
        if seq > kept:
            for _seq, stream_id in (await store.read_after(index, seq - kept - 1))[:1]:
                await store.delete_log(_events_key(self.session_id, stream_id))

    async def send(self, message: dict) -> None:
        if not self.sse_ok:
            return  # a JSON-only client cannot receive notifications on this request
        if not self.streaming:
            await self._start()
        await self._emit(message)

    async def _emit(self, message: dict) -> None:
        event_id, text = None, _dumps(message)
        if self.resumable:
            seq = await self.runtime.log_event(_events_key(self.session_id, self.stream_id), text)
            event_id = f"{self.stream_id}:{seq}"
            for follower in self.followers:
                follower.put((event_id, message))
            if self.runtime.shared:  # a client may resume this stream on another instance
                await self.runtime.store.publish(_stream_channel(self.session_id, self.stream_id), [event_id, message])
        if not self.detached:
            await self.http.write(_sse(text, event_id))

    async def keepalive(self) -> None:
        if self.streaming and not self.detached:
            await self.http.write(_SSE_KEEPALIVE)

    async def request(self, method: str, params: dict) -> dict:
        if not self.sse_ok:
            raise ToolError(f"Cannot send {method} to the client: its request did not accept "
                            "text/event-stream responses.")
        return await self.runtime.ask_client(self.session_id, method, params, self.send)

    async def detach(self) -> None:
        if self.resumable and not self.detached:
            if not self.streaming:
                await self._start()
            self.detached = True
            await self.http.end(_retry_hint(self.runtime, True))

    def finish(self, response: dict | None, status: int, headers: list) -> typing.Awaitable:
        """Send the final response (or nothing, for a cancelled request).  The common answer, JSON
        without a stream, goes straight out: no followers or live post to end, and no coroutine
        of its own."""
        if not self.streaming and not self.must_stream and response is not None:
            self.done = True
            return self.http.respond_json(status, response, headers=headers)
        return self._end(response, status, headers)

    def finish_cancelled(self, request_id, headers: list) -> typing.Awaitable:
        """End a request that gets no response (the client cancelled it; the specification says
        none is sent).  Its POST still gets one of the two content types a client of Streamable
        HTTP accepts (a 204 without one is an error to every SDK): an SSE stream that ends
        without an event, or, for a client that takes only JSON, an error it no longer waits for.
        A resumable stream that already has events ends with that error too: a client resumes a
        stream that ended without a response (the official SDK does, once a second, for ever)."""
        error = _error_response(request_id, RpcError(REQUEST_CANCELLED, "Request cancelled."))
        if self.streaming and self.resumable:
            return self._end(error, 200, headers)
        if self.streaming or self.sse_ok:
            return self._end(None, 0, headers)
        self.done = True
        return self.http.respond_json(200, error, headers=headers)

    async def _end(self, response: dict | None, status: int, headers: list) -> None:
        try:
            if not self.streaming and self.must_stream and response is not None:
                self.extra_headers = self.extra_headers + headers  # e.g. the new Mcp-Session-Id
                await self._start()
            if self.streaming:
                if response is not None:
                    await self._emit(response)
                await self.http.end()
            else:  # a request that ends without a response (cancelled): a stream without an event
                await self.http.start_sse(self.extra_headers + headers)
                await self.http.end()
        finally:
            self.done = True
            for follower in self.followers:
                follower.put(None)
            if self.stream_id:
                self.runtime.live_posts.pop((self.session_id, self.stream_id), None)


class _SessionStream:
    """A session's long-lived stream: GET /mcp (Streamable HTTP) or GET /sse (HTTP+SSE).

    It carries session-wide notifications, server requests routed to it, and, for /sse, every
    response.  A newer stream for the same session takes over and this one ends."""

    # Idle streams are the common case, thousands per process: a list, and an event only while
    # waiting, instead of an ``_Inbox`` and a cancel scope each (bench/RESULTS.md: the memory per
    # idle stream); the runtime's one ticker wakes a stream that has been quiet for the keep-alive
    # period.  The list is bounded all the same: past MCP_STREAM_BUFFER undelivered items the
    # client reads too slowly, and the stream ends (a 2025-11-25 client resumes from the log).
    __slots__ = ("runtime", "http", "session_id", "version", "log_events", "_items", "waiter", "idle_since",
                 "overflowed")

    def __init__(self, runtime: _Runtime, http: _HttpRequest, session_id: str, version: str | None, log_events: bool):
        self.runtime, self.http, self.session_id = runtime, http, session_id
        self.version = version
        self.log_events = log_events
        self._items: list | None = None  # what put() delivered and run() has not taken yet
        self.waiter: anyio.Event | None = None  # while run() waits
        self.idle_since = 0.0  # anyio.current_time() when it began to wait
        self.overflowed = False

    def put(self, item) -> None:
        if self.overflowed:
            return
        if self._items is None:
            self._items = [item]
        elif len(self._items) < self.runtime.settings.stream_buffer:
            self._items.append(item)
        else:  # the client reads too slowly: end the stream (the end is the one item let in)
            self.overflowed = True
            self._items.append(None)
        if self.waiter is not None:
            self.waiter.set()

    def _end(self) -> None:
        self.put(None)

    async def run(self, first: bytes = b"", replay: list = ()) -> None:
        runtime, http = self.runtime, self.http
        unsubscribe = runtime.store.subscribe(_session_channel(self.session_id), self.put)
        try:  # before the first event: an answer to what the client sends next may come from anywhere
            await runtime.store.subscribed()
        except BaseException:
            unsubscribe()
            raise
        previous = runtime.session_streams.get(self.session_id)
        if previous is not None:
            previous.put(None)  # take over
        runtime.session_streams[self.session_id] = self
        _metrics.inc("mcp_open_streams", kind="session")
        http.on_disconnect(self._end)
        runtime.listeners.add(self._on_bus)
        try:
            await http.start_sse()
            http.forget_request()
            if first:
                await http.write(first)
            for event_id, message in replay:
                await http.write(_sse(message, event_id))
            while not http.ended and not runtime.closing and not runtime.draining:
                if not self._items:
                    self.waiter = waiter = anyio.Event()
                    self.idle_since = anyio.current_time()
                    runtime.watch_idle_streams()
                    try:
                        await waiter.wait()
                    finally:
                        self.waiter = None
                    if not self._items:
                        await http.write(_SSE_KEEPALIVE)
                        continue
                item = self._items.pop(0)
                if item is None or item.get("close"):
                    break  # taken over, session deleted, client gone, or shutdown
                message = await self._render(item)
                if message is not None:
                    await self._write(message)
        finally:
            if self.overflowed:
                _log_stream_overflow("session")
            _metrics.inc("mcp_open_streams", -1, kind="session")
            unsubscribe()
            runtime.listeners.discard(self._on_bus)
            if runtime.session_streams.get(self.session_id) is self:
                del runtime.session_streams[self.session_id]
            await http.end(_retry_hint(runtime, self.version is not None))  # (/sse streams cannot resume)

    async def _write(self, message: dict) -> None:
        event_id, text = None, _dumps(message)
        if self.log_events:
            seq = await self.runtime.log_event(_events_key(self.session_id, "get"), text)
            event_id = f"get:{seq}"
        await self.http.write(_sse(text, event_id))

    def _on_bus(self, event: dict) -> None:
        if event.get("kind") in _LIST_CHANGED or event.get("kind") == "updated":
            self.put({"bus": event})
        elif event.get("kind") == "shutdown":
            self.put(None)

    async def _render(self, item: dict) -> dict | None:
        event = item.get("bus")
        if event is None:
            return item  # a JSON-RPC message published for this session
        if event["kind"] in _LIST_CHANGED:
            return {"jsonrpc": "2.0", "method": _LIST_CHANGED[event["kind"]]}
        session = await self.runtime.store.get(_session_key(self.session_id))
        if session and event["uri"] in session.get("subs", ()):
            return {"jsonrpc": "2.0", "method": "notifications/resources/updated", "params": {"uri": event["uri"]}}
        return None


class _SessionChannel:
    """Out channel of a request whose answers travel on the session's stream (HTTP+SSE)."""

    # (notifications go out on the session's stream; but a subscriptions/listen here would run on
    # with no response of its own to end it, after its POST was answered 202: refused)
    can_stream = False

    def __init__(self, runtime: _Runtime, session_id: str):
        self.runtime, self.session_id = runtime, session_id

    async def send(self, message: dict) -> None:
        await self.runtime.store.publish(_session_channel(self.session_id), message)

    async def keepalive(self) -> None:
        return None

    async def request(self, method: str, params: dict) -> dict:
        return await self.runtime.ask_client(self.session_id, method, params, self.send)


class _StreamableHTTP:
    """POST, GET and DELETE on the MCP endpoint, for every revision."""

    def __init__(self, server: _ProtocolCore):
        self.server = server

    # -- POST ------------------------------------------------------------------------------------

    async def post(self, http: _HttpRequest) -> None:
        server = self.server
        settings = server.settings
        json_ok, sse_ok = _accepts(http.headers.get("accept"))
        if not json_ok and not sse_ok:
            raise _HttpError(406, "Not Acceptable: the Accept header must allow application/json "
                             "or text/event-stream.")
        if settings.response_mode == "json":
            sse_ok = False
        message = await http.read_message(settings)
        header_version = http.headers.get("mcp-protocol-version")
        if isinstance(message, list):
            await self._batch(http, message, header_version, json_ok)
            return
        kind = _classify_http(message)
        # answer with SSE from the start when the mode says so, or the client takes only SSE
        sse_first = sse_ok and (settings.response_mode == "sse" or not json_ok)
        if _is_modern(message, header_version) and kind != "response":
            await self._modern(http, message, kind, header_version, sse_ok, sse_first)
        else:
            await self._legacy(http, message, kind, header_version, sse_ok, sse_first)

    async def _modern(self, http: _HttpRequest, message: dict, kind: str, header_version, sse_ok: bool,
                      sse_first: bool) -> None:
        server, runtime = self.server, self.server._runtime()
        request_id = message.get("id")
        try:
            ctx = _modern_context(server, message, header_version, http=True, principal=http.principal,
                                  base_url=http.base)
            _check_modern_headers(http.headers, message, server)
        except RpcError as exc:
            await http.respond_json(exc.status, _error_response(request_id, exc))
            return
        if kind == "notification":
            await server._respond(ctx)
            await http.respond(202)
            return
        channel = _PostChannel(http, runtime, None, sse_ok, False, [])
        ctx._out = channel
        response = None
        with _cancel_scope() as ctx._scope:
            http.cancel_on_disconnect(ctx)
            try:
                if sse_first:
                    await channel._start()
                response, status = await server._respond(ctx)
            finally:
                http.stop_watching()
        if response is None or ctx._cancelled:
            if not ctx._cancelled:
                await channel.finish_cancelled(request_id, [])
            return
        await channel.finish(response, status, [])

    async def _legacy(self, http: _HttpRequest, message: dict, kind: str, header_version, sse_ok: bool,
                      sse_first: bool) -> None:
        server, runtime = self.server, self.server._runtime()
        request_id = message.get("id") if kind == "request" else None
        if header_version is not None and header_version not in LEGACY_VERSIONS:
            raise _HttpError(400, f"Unsupported MCP-Protocol-Version {header_version!r}.", request_id=request_id)
        session_id = http.headers.get("mcp-session-id")
        method = message.get("method")
        session = None
        if method == "initialize":
            if kind != "request":
                raise _HttpError(400, "initialize must be a request with an id.")
            session_id = None
        else:
            if session_id is None:
                raise _HttpError(400, "Bad Request: the Mcp-Session-Id header is required; "
                                 "send initialize first to get one.", request_id=request_id)
            session = await _session_of(runtime, http, session_id)
            if session is None:
                raise _HttpError(404, "Session not found: it expired or was deleted. Send initialize "
                                 "to start a new session.", request_id=request_id)
        if kind == "response":
            if not runtime.resolve(session_id, message):
                await runtime.store.publish(_reply_channel(session_id), message)
            await http.respond(202)
            return
        version = session["v"] if session else LATEST_LEGACY
        ctx = Context(server, method, message.get("params") or {}, request_id, version=version,
                      capabilities=(session or {}).get("caps"), session_id=session_id, session=session,
                      principal=http.principal, base_url=http.base)
        if kind == "notification":
            await server._respond(ctx)
            await http.respond(202)
            return
        extra = []
        channel = _PostChannel(http, runtime, session_id, sse_ok, version >= "2025-11-25", extra)
        ctx._out = channel
        if sse_first:
            channel.must_stream = True
            if method != "initialize":  # initialize's stream waits for the new session's id
                await channel._start()
        response, status = await runtime.respond_cancellable(ctx)
        headers = []
        if method == "initialize" and response is not None and "result" in response:
            session_id = secrets.token_urlsafe(24)
            counted = await runtime.admit_session(session_id, http, request_id)
            headers.append((b"mcp-session-id", session_id.encode()))
            _metrics.inc("mcp_sessions_created_total")
            await runtime.save_session(session_id, {**ctx.session, "owner": http.principal, "q": counted,
                                                "born": round(_now(), 3)}, new=True)
        elif ctx._session_changed and session_id is not None:
            await runtime.save_session(session_id, ctx.session)
        if response is None:
            await channel.finish_cancelled(request_id, headers)
        else:
            await channel.finish(response, status, headers)

    async def _batch(self, http: _HttpRequest, messages: list, header_version, json_ok: bool) -> None:
        """2025-03-26 JSON-RPC batches (answered as one JSON array)."""
        server, runtime = self.server, self.server._runtime()
        session_id = http.headers.get("mcp-session-id")
        session = None
        if session_id is not None:
            session = await _session_of(runtime, http, session_id)
            if session is None:
                raise _HttpError(404, "Session not found: send initialize to start a new session.")
        if session is None or session["v"] not in ("2025-03-26", "2024-11-05") or not messages:
            raise _HttpError(400, "Invalid Request: JSON-RPC batches are only allowed in a 2025-03-26 session.")
        answers = []
        for message in messages:
            try:
                kind = _classify(message)
            except RpcError as exc:
                answers.append(_error_response(None, exc))
                continue
            if message.get("method") == "initialize":
                answers.append(_error_response(message.get("id"), RpcError(
                    INVALID_REQUEST, "initialize must not be part of a batch.")))
                continue
            if kind == "response":
                runtime.resolve(session_id, message)
                continue
            ctx = Context(server, message["method"], message.get("params") or {}, message.get("id"),
                          version=session["v"], capabilities=session.get("caps"), session_id=session_id,
                          session=session, principal=http.principal, base_url=http.base)
            response, _status = await server._respond(ctx)
            if ctx._session_changed:
                session = ctx.session
                await runtime.save_session(session_id, session)
            if response is not None:
                answers.append(response)
        if answers:
            await http.respond_json(200, answers)
        else:
            await http.respond(202)

    # -- GET: the session's standalone stream, or a resumed one --------------------------------

    async def get(self, http: _HttpRequest) -> typing.Awaitable | None:
        server, runtime = self.server, self.server._runtime()
        header_version = http.headers.get("mcp-protocol-version")
        if header_version is not None and header_version not in LEGACY_VERSIONS:
            raise _HttpError(405, "Method Not Allowed: 2026-07-28 has no GET stream; use "
                             "subscriptions/listen.", headers=[(b"allow", b"POST")])
        _json_ok, sse_ok = _accepts(http.headers.get("accept"))
        if not sse_ok:
            raise _HttpError(406, "Not Acceptable: a GET stream needs Accept: text/event-stream.")
        session_id = http.headers.get("mcp-session-id")
        if session_id is None:
            raise _HttpError(400, "Bad Request: the Mcp-Session-Id header is required for a GET stream.")
        session = await _session_of(runtime, http, session_id)
        if session is None:
            raise _HttpError(404, "Session not found: send initialize to start a new session.")
        last_event = http.headers.get("last-event-id")
        if last_event and ":" in last_event:
            stream_id, _, seq = last_event.rpartition(":")
            if stream_id != "get" and _DECIMAL.fullmatch(seq):
                release = runtime.hold_stream(http.principal, http.client_address())
                return _holding(self._resume(http, session_id, stream_id, int(seq)), release)  # a tail call
            replay = await runtime.read_events(_events_key(session_id, "get"), int(seq) if _DECIMAL.fullmatch(seq) else 0)
            replay = [(f"get:{n}", m) for n, m in replay]
        else:
            replay = []
        stream = _SessionStream(runtime, http, session_id, session["v"], session["v"] >= "2025-03-26")
        first = (f"id: get:0\nretry: {server.settings.sse_retry_ms}\ndata: \n\n".encode()
                 if session["v"] >= "2025-11-25" and not replay else b"")
        release = runtime.hold_stream(http.principal, http.client_address())
        return _holding(stream.run(first, replay), release)  # a tail call: _App._handle awaits it

    async def _resume(self, http: _HttpRequest, session_id: str, stream_id: str, after: int) -> None:
        """Replay a POST's SSE stream after ``after`` and follow it until its response."""
        runtime = self.server._runtime()
        live = runtime.live_posts.get((session_id, stream_id))
        inbox = _Inbox(runtime.settings.stream_buffer)
        unsubscribe = None

        def on_bus(event):
            if event.get("kind") == "shutdown":
                inbox.put(None)
        if live is not None:
            live.followers.append(inbox)
        elif runtime.shared:  # the stream may be live on another instance
            unsubscribe = runtime.store.subscribe(_stream_channel(session_id, stream_id),
                                              lambda item: inbox.put(tuple(item)))
        try:
            if unsubscribe is not None:
                await runtime.store.subscribed()  # then the log read below misses nothing
            events = await runtime.read_events(_events_key(session_id, stream_id), after)
            await http.start_sse()
            last = after
            for seq, message in events:
                await http.write(_sse(message, f"{stream_id}:{seq}"))
                last = seq
            finished = any("id" in m and "method" not in m for _s, m in events)
            http.on_disconnect(lambda: inbox.put(None))
            runtime.listeners.add(on_bus)
            following = live is not None or unsubscribe is not None
            while following and not finished and not http.ended and not runtime.draining:
                item = await inbox.get(runtime.settings.sse_keepalive)
                if item is inbox.QUIET:
                    if live is None:  # pub/sub may have dropped something: the log has it all
                        missed = await runtime.read_events(_events_key(session_id, stream_id), last)
                        for seq, message in missed:
                            await http.write(_sse(message, f"{stream_id}:{seq}"))
                            last = seq
                            finished = finished or ("id" in message and "method" not in message)
                        if missed:
                            continue
                        break  # quiet, and produced elsewhere (maybe by nobody now): the client polls again
                    await http.write(_SSE_KEEPALIVE)
                    continue
                if item is None:
                    break
                event_id, message = item
                if int(event_id.rpartition(":")[2]) <= last:
                    continue
                await http.write(_sse(message, event_id))
                last = int(event_id.rpartition(":")[2])
                finished = "id" in message and "method" not in message
        finally:
            if inbox.overflowed:
                _log_stream_overflow("resumed")
            inbox.close()
            if live is not None and inbox in live.followers:
                live.followers.remove(inbox)
            if unsubscribe is not None:
                unsubscribe()
            runtime.listeners.discard(on_bus)
            await http.end(_retry_hint(runtime, True))

    # -- DELETE: end a session -------------------------------------------------------------------

    async def delete(self, http: _HttpRequest) -> None:
        runtime = self.server._runtime()
        header_version = http.headers.get("mcp-protocol-version")
        if header_version is not None and header_version not in LEGACY_VERSIONS:
            raise _HttpError(405, "Method Not Allowed: 2026-07-28 has no sessions to delete.",
                             headers=[(b"allow", b"POST")])
        session_id = http.headers.get("mcp-session-id")
        if session_id is None:
            raise _HttpError(400, "Bad Request: the Mcp-Session-Id header is required.")
        session = await _session_of(runtime, http, session_id)
        if session is None:
            raise _HttpError(404, "Session not found.")
        await runtime.drop_session(session_id, session)
        _metrics.inc("mcp_sessions_deleted_total")
        _telemetry.session_ended(session.get("born"), session.get("v"), "tcp")
        for _seq, stream_id in await runtime.store.read_after(_streams_key(session_id), 0):
            await runtime.store.delete_log(_events_key(session_id, stream_id))
        await runtime.store.delete_log(_events_key(session_id, "get"))
        await runtime.store.delete_log(_streams_key(session_id))
        await runtime.store.publish(_session_channel(session_id), {"close": True})
        await http.respond(200)


async def _session_of(runtime: _Runtime, http: _HttpRequest, session_id: str, transport: str = "mcp") -> dict | None:
    """A legacy session, its expiry slid forward, if it belongs to the caller's token and was
    made on ``transport`` ("mcp" or "sse"): a session id alone proves nothing, and one transport's
    session id is no session on the other."""
    session = await runtime.session(session_id)
    if session is None or session.get("owner") != http.principal or session.get("t", "mcp") != transport:
        return None
    return session


def _classify_http(message) -> str:
    try:
        return _classify(message)
    except RpcError as exc:
        raise _HttpError(400, exc.message, exc.code) from None


_HEADER_VALUE_RE = re.compile(r"[\x20-\x7e\t]*")


@functools.lru_cache(maxsize=256)  # (clients repeat their values; a bad one raises and is not kept)
def _decode_header_value(value: str) -> str:
    """An ``Mcp-Name``/``Mcp-Param-*`` value, trimmed and Base64-sentinel decoded (SEP-2243)."""
    value = value.strip(" \t")
    if not _HEADER_VALUE_RE.fullmatch(value):
        raise ValueError("invalid characters")
    if value.startswith("=?base64?") and value.endswith("?=") and len(value) >= 11:
        try:
            return base64.b64decode(value[9:-2], validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            raise ValueError("invalid Base64") from None
    return value


_NAME_FIELDS = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri",
                "tasks/get": "taskId", "tasks/update": "taskId", "tasks/cancel": "taskId"}


def _header_mismatch(text: str) -> RpcError:
    return RpcError(HEADER_MISMATCH, text, status=400)


def _check_modern_headers(headers: dict, message: dict, server: _ProtocolCore) -> None:
    """SEP-2243: ``Mcp-Method``, ``Mcp-Name`` and ``Mcp-Param-*`` must mirror the body (-32020)."""
    mismatch = _header_mismatch
    method = message.get("method")
    if "id" not in message:
        return  # notifications: header rules are undefined in 2026; accept
    header_method = headers.get("mcp-method")
    if header_method is None:
        raise mismatch("The Mcp-Method header is required with 2026-07-28 requests.")
    if header_method.strip(" \t") != method:
        raise mismatch(f"The Mcp-Method header ({header_method.strip()}) does not match the body ({method}).")
    params = message.get("params") or {}
    name_field = _NAME_FIELDS.get(method)
    if name_field is not None:
        raw = headers.get("mcp-name")
        if raw is None:
            raise mismatch(f"The Mcp-Name header is required with {method}.")
        try:
            name = _decode_header_value(raw)
        except ValueError as exc:
            raise mismatch(f"The Mcp-Name header has {exc}.") from None
        if name != params.get(name_field):
            raise mismatch(f"The Mcp-Name header does not match params.{name_field}.")
    if method == "tools/call":
        tool = server._tools.get(params.get("name"))
        if tool is not None and tool.headers:
            arguments = params.get("arguments") or {}
            for prop, header in tool.headers.items():
                raw = headers.get("mcp-param-" + header.lower())
                value = arguments.get(prop) if isinstance(arguments, dict) else None
                if raw is None:
                    if value is not None:
                        raise mismatch(f"The Mcp-Param-{header} header is required when "
                                       f"arguments.{prop} is given.")
                    continue
                try:
                    decoded = _decode_header_value(raw)
                except ValueError as exc:
                    raise mismatch(f"The Mcp-Param-{header} header has {exc}.") from None
                if not _header_matches(decoded, value):
                    raise mismatch(f"The Mcp-Param-{header} header does not match arguments.{prop}.")


def _header_matches(header: str, value) -> bool:
    if isinstance(value, bool):
        return header == ("true" if value else "false")
    if isinstance(value, (int, float)):
        try:
            return float(header) == float(value)
        except ValueError:
            return False
    return header == value


# ---- Legacy HTTP+SSE (2024-11-05) --------------------------------------------------------------


_MAX_IN_FLIGHT = 100  # /messages requests of one token running on an instance at once (ten times that an address)


class _LegacySSE:
    """GET /sse opens the stream and names the POST endpoint; POST /messages answers 202."""

    def __init__(self, server: _ProtocolCore):
        self.server = server

    async def get(self, http: _HttpRequest, root_path: str) -> typing.Awaitable | None:
        runtime = self.server._runtime()
        session_id = http.query("session_id")
        if session_id is not None:
            if await _session_of(runtime, http, session_id, "sse") is None:
                raise _HttpError(404, "Session not found: open /sse without session_id to start over.")
        release = runtime.hold_stream(http.principal, http.client_address())
        opened = session_id is None
        try:
            if opened:  # recorded at once: the first POST may reach another instance
                session_id = secrets.token_urlsafe(24)
                counted = await runtime.admit_session(session_id, http)
                await runtime.save_session(session_id, {"owner": http.principal, "t": "sse", "q": counted}, new=True)
        except BaseException:
            release()
            raise
        endpoint = f"{root_path}/messages?session_id={session_id}"
        stream = _SessionStream(runtime, http, session_id, None, False)
        return _holding(self._follow(stream, f"event: endpoint\ndata: {endpoint}\n\n".encode(), opened),
                        release)  # a tail call

    async def _follow(self, stream: _SessionStream, first: bytes, opened: bool) -> None:
        """Serve the stream; a session it opened that was never initialized ends with it (it
        would count against its owner's caps until it expired)."""
        try:
            await stream.run(first)
        finally:
            runtime = self.server._runtime()
            # (not when another stream took the session over, nor while the server stops)
            if opened and stream.session_id not in runtime.session_streams and not runtime.closing:
                record = await runtime.store.get(_session_key(stream.session_id))
                if record is not None and "v" not in record:
                    await runtime.drop_session(stream.session_id, record)

    async def post(self, http: _HttpRequest) -> None:
        server, runtime = self.server, self.server._runtime()
        session_id = http.query("session_id") or http.query("sessionId")
        if not session_id:
            raise _HttpError(400, "Bad Request: the session_id query parameter is required.")
        record = await _session_of(runtime, http, session_id, "sse")
        if record is None:
            raise _HttpError(404, "Session not found: open /sse again to start a new session.")
        message = await http.read_message(server.settings)
        kind = _classify_http(message)
        if kind == "response":
            if not runtime.resolve(session_id, message):
                await runtime.store.publish(_reply_channel(session_id), message)
            await http.respond(202)
            return
        # (a notification is not counted: it ends at once, and cancelling must work at the cap)
        release = (runtime.hold_request(http.principal, http.client_address(), message.get("id"))
                   if kind == "request" else _release_nothing)
        try:
            await http.respond(202)  # the answer, or the error, travels on the stream
        except BaseException:
            release()
            raise
        runtime.spawn(_holding(self._process(session_id, record, message, kind, http.principal, http.base), release))

    async def _process(self, session_id: str, record: dict, message: dict, kind: str,
                       principal: str | None, base_url: str | None) -> None:
        server, runtime = self.server, self.server._runtime()
        session = record if "v" in record else None  # (None: opened, not initialized yet)
        channel = _SessionChannel(runtime, session_id)
        request_id = message.get("id") if kind == "request" else None
        if _modern_meta(message) is not None:  # a 2026-07-28 request on this stream: stateless
            try:
                ctx = _modern_context(server, message, None, http=False, out=channel, principal=principal,
                                      base_url=base_url)
            except RpcError as exc:
                if request_id is not None:
                    await channel.send(_error_response(request_id, exc))
                return
            response, _status = await server._respond(ctx)
            if response is not None:
                await channel.send(response)
            return
        if session is None and message.get("method") not in ("initialize", "ping"):
            if request_id is not None:  # before initialize: a clear error, on the stream like any answer
                await channel.send(_error_response(request_id, RpcError(
                    INVALID_REQUEST, f"Send initialize before {message.get('method')}.")))
            return
        version = session["v"] if session else LATEST_LEGACY
        ctx = Context(server, message["method"], message.get("params") or {}, request_id, version=version,
                      capabilities=(session or {}).get("caps"), session_id=session_id, session=session,
                      out=channel, principal=principal, base_url=base_url)
        response, _status = await runtime.respond_cancellable(ctx)
        if ctx._session_changed:
            await runtime.save_session(session_id, {**ctx.session, "owner": principal, "t": "sse",
                                                "q": record.get("q", [])})
        if response is not None:
            await channel.send(response)


# ---- Direct JSON (/http) -------------------------------------------------------------------------


class _DirectJSON:
    """POST one JSON-RPC request (or ``{"method", "params"}``) and get its answer in the body."""

    def __init__(self, server: _ProtocolCore):
        self.server = server

    async def post(self, http: _HttpRequest) -> None:
        server = self.server
        server._runtime()
        message = await http.read_message(server.settings)
        short = isinstance(message, dict) and "jsonrpc" not in message and "method" in message
        if short:
            message = {"jsonrpc": "2.0", "id": 1, "method": message["method"],
                       "params": message.get("params") or {}}
        kind = _classify_http(message)
        if kind != "request":
            raise _HttpError(400, "Invalid Request: /http takes one request with an id.")
        header_version = http.headers.get("mcp-protocol-version")
        if _modern_meta(message) is not None:
            try:
                ctx = _modern_context(server, message, header_version, http=False, principal=http.principal,
                                      base_url=http.base)
            except RpcError as exc:
                await http.respond_json(exc.status, _error_body(exc, message.get("id")))
                return
        else:
            version = header_version if header_version in LEGACY_VERSIONS else LATEST_LEGACY
            ctx = Context(server, message["method"], message.get("params") or {}, message["id"],
                          version=version, principal=http.principal, base_url=http.base)
        response, status = await server._respond(ctx)
        if not short:
            await http.respond_json(status, response)
        elif "error" in response:
            await http.respond_json(status if status != 200 else 400, {"error": response["error"]})
        else:
            await http.respond_json(200, response["result"])


# ---- stdio ----------------------------------------------------------------------------------------


# Requests that may wait on the client (or run long) get their own task on stdio; the rest run
# in order as they arrive, so a client that pipelines initialize and tools/list is served right.
_CONCURRENT_METHODS = frozenset(("tools/call", "prompts/get", "resources/read", "completion/complete",
                                 "subscriptions/listen", "tasks/get", "tasks/update", "tasks/cancel"))


_OVERSIZED_LINE = b"\n"  # stands in for a stdin line that was too long (identity matters)


class _Stdio:
    """Newline-delimited JSON-RPC on stdin/stdout; the process is the (legacy) session.

    stdin is read on a thread (asyncio pipes misbehave on Windows); stdout is reserved for the
    protocol at the file-descriptor level, so a stray ``print()`` in a tool lands on stderr."""

    SESSION = "stdio"

    def __init__(self, server: _ProtocolCore, stdin=None, stdout_fd: int | None = None):
        self.server = server
        self.uid = "stdio:" + secrets.token_urlsafe(12)  # the local user this process serves
        self.session: dict | None = None
        self.tasks: dict = {}
        self._stdin = stdin
        self._out_fd = stdout_fd
        self._write_lock = threading.Lock()

    @property
    def can_stream(self) -> bool:
        return True

    def _guard_stdio(self) -> None:
        """Keep fds 0 and 1 for the protocol alone: a child process a tool starts inherits them,
        and one that read stdin would swallow the client's next message, one that wrote stdout
        would corrupt the stream.  Children and stray reads get /dev/null, stray writes stderr."""
        if self._out_fd is None:
            sys.stdout.flush()
            self._out_fd = os.dup(1)
            os.dup2(2, 1)  # anything written to fd 1 from now on goes to stderr
            sys.stdout = sys.stderr
        if self._stdin is None:
            self._stdin = open(os.dup(0), "rb")  # the protocol's own handle on the client's pipe
            with open(os.devnull, "rb") as nothing:
                os.dup2(nothing.fileno(), 0)

    def _write(self, message) -> None:
        data = (_dumps(message) + "\n").encode()
        with self._write_lock:
            view = memoryview(data)
            while view:
                written = os.write(self._out_fd, view)
                view = view[written:]

    async def send(self, message: dict) -> None:
        self._write(message)

    async def keepalive(self) -> None:
        return None

    async def request(self, method: str, params: dict) -> dict:
        return await self.server._runtime().ask_client(self.SESSION, method, params, self.send)

    async def run(self) -> None:
        self._guard_stdio()
        loop = asyncio.get_running_loop()
        runtime = await self.server._started_runtime()
        batches: asyncio.Queue = asyncio.Queue()
        stdin = self._stdin
        limit = self.server.settings.max_body

        def read():
            # What arrived together goes over together: one wake-up of the loop for a batch of
            # lines, not one per line (each is a system call and a hand-over of the GIL).
            try:
                pending, oversized = bytearray(), False
                while chunk := stdin.read1(65536):  # what is there, up to 64 KiB (a binary stream)
                    pending += chunk
                    end = pending.rfind(b"\n")
                    if end < 0:
                        if len(pending) > limit:  # a line beyond MCP_MAX_BODY: refused, skipped
                            pending.clear()
                            oversized = True
                        continue
                    batch = bytes(pending[:end]).split(b"\n")
                    del pending[:end + 1]
                    if oversized:
                        batch[0], oversized = _OVERSIZED_LINE, False
                    loop.call_soon_threadsafe(batches.put_nowait, batch)
                if pending and not oversized:
                    loop.call_soon_threadsafe(batches.put_nowait, [bytes(pending)])
            except (OSError, ValueError):
                pass
            loop.call_soon_threadsafe(batches.put_nowait, None)

        threading.Thread(target=read, name="mcp-stdin", daemon=True).start()
        runtime.listeners.add(self._on_bus)
        try:
            while (batch := await batches.get()) is not None:
                for line in batch:
                    if line is _OVERSIZED_LINE:
                        self._write(_error_response(None, RpcError(
                            INVALID_REQUEST, f"Invalid Request: the message is larger than the limit of "
                            f"{limit} bytes (MCP_MAX_BODY).")))
                    elif line.strip():
                        await self._line(line)
                        await asyncio.sleep(0)  # let what the line started (and finished) go on
        finally:
            runtime.listeners.discard(self._on_bus)
            pending = list(self.tasks.values())
            if pending:
                done, still = await asyncio.wait(pending, timeout=2.0)
                for task in still:
                    task.cancel()
                await asyncio.gather(*still, return_exceptions=True)

    def _on_bus(self, event: dict) -> None:
        if self.session is None:
            return
        kind = event.get("kind")
        if kind in _LIST_CHANGED:
            self._write({"jsonrpc": "2.0", "method": _LIST_CHANGED[kind]})
        elif kind == "updated" and event.get("uri") in self.session.get("subs", ()):
            self._write({"jsonrpc": "2.0", "method": "notifications/resources/updated",
                         "params": {"uri": event["uri"]}})

    async def _line(self, line: bytes) -> None:
        try:
            message = _loads(line, self.server.settings.max_json_depth)
        except ValueError as exc:
            self._write(_error_response(None, RpcError(PARSE_ERROR, _parse_error_text(exc, "line"))))
            return
        if isinstance(message, list):
            if not message or self.session is None or self.session["v"] not in ("2025-03-26", "2024-11-05"):
                self._write(_error_response(None, RpcError(
                    INVALID_REQUEST, "Invalid Request: batches are only allowed in a 2025-03-26 session.")))
                return
            answers = [a for a in await asyncio.gather(*(self._one(m, batch=True) for m in message)) if a]
            if answers:
                self._write(answers)
            return
        await self._one(message)

    async def _one(self, message, batch: bool = False):
        try:
            kind = _classify(message)
        except RpcError as exc:
            return self._answer(_error_response(message.get("id") if isinstance(message, dict) else None, exc), batch)
        if kind == "response":
            self.server._runtime().resolve(self.SESSION, message)
            return None
        if batch and message.get("method") == "initialize":
            return _error_response(message.get("id"), RpcError(INVALID_REQUEST, "initialize must not be batched."))
        request_id = message.get("id")
        if _modern_meta(message) is not None:
            try:
                ctx = _modern_context(self.server, message, None, http=False, session_id=self.SESSION, out=self,
                                      principal=self.uid, base_url=self.server._local_base)
            except RpcError as exc:
                return self._answer(_error_response(request_id, exc), batch) if kind == "request" else None
        else:
            method = message["method"]
            if self.session is None and method not in ("initialize", "ping", "server/discover") and kind == "request":
                return self._answer(_error_response(request_id, RpcError(
                    INVALID_REQUEST, f"Send initialize before {method}.")), batch)
            version = self.session["v"] if self.session else LATEST_LEGACY
            ctx = Context(self.server, method, message.get("params") or {}, request_id if kind == "request" else None,
                          version=version, capabilities=(self.session or {}).get("caps"),
                          session_id=self.SESSION, session=self.session, out=self, principal=self.uid,
                          base_url=self.server._local_base)
        if kind == "notification" or batch or ctx.method not in _CONCURRENT_METHODS:
            return await self._run(ctx, batch)  # cheap and ordered: initialize, lists, ping...
        task = _run_eagerly(self._run(ctx, batch))
        if task is not None:  # it waits (on the client, a thread, I/O): reading goes on meanwhile
            self.tasks[request_id] = task
            task.add_done_callback(lambda _t, rid=request_id: self.tasks.pop(rid, None))
        return None

    async def _run(self, ctx: Context, batch: bool):
        response, _status = await self.server._runtime().respond_cancellable(ctx)
        if ctx._session_changed:
            self.session = ctx.session
        if response is None:
            return None
        return self._answer(response, batch)

    def _answer(self, response: dict, batch: bool):
        if batch:
            return response
        self._write(response)
        return None


# ==== 7. OAuth and login ========================================================================
#
# Rules:
# - The HTTP transports (/mcp, /sse, /messages, /http) are an OAuth 2.1 protected resource.  By
#   default this server is also the authorization server that issues its tokens (MCP_AUTH=builtin);
#   MCP_AUTH=external trusts another issuer's JWTs instead; MCP_AUTH=none turns checks off.
# - Discovery satisfies every client generation: Protected Resource Metadata (RFC 9728) at the
#   root and path-suffixed well-known URLs, authorization-server metadata (RFC 8414 and OIDC) at
#   the origin, and /authorize, /token, /register at the root for 2025-03-26 clients.
# - PKCE S256 only; redirect URIs are compared as strings, exactly (only the port of a loopback
#   URI may change, RFC 8252), and hold no userinfo, backslash, fragment, control or non-ASCII
#   character; codes are single use and a replayed code revokes what it issued; refresh tokens
#   rotate, the replaced one works once within _REFRESH_GRACE seconds, and any other reuse
#   revokes the family; ``iss`` is in every redirect.
# - No redirect before the person acted goes to a web client they never approved (registration
#   is open, so a registered URI proves nothing): errors then show a page (RFC 9700 4.11.2).
# - Browser cookies: ``__Host-`` names on an https issuer, plain names on http, never both;
#   SameSite=Strict except the login nonce.  Forms post only from their own Origin (section 8).
# - Client metadata documents: fetched on their own few threads under a total deadline, a size
#   cap, global addresses only, no redirects; failures are cached.  Registrations expire unused
#   (MCP_CLIENT_TTL) and are capped per address (MCP_REGISTRATIONS_PER_HOUR); every endpoint
#   that may fetch is rate limited.
# - Access tokens are HS256 JWTs bound to this resource (``aud``) and to a user session (``sid``);
#   a request needs the signature, issuer, audience, expiry and a live, unrevoked session.
# - Codes, refresh tokens and client secrets are stored as SHA-256 hashes: a dump of the store
#   holds nothing usable.  Secrets never reach a log.
#
# Theory of operation: /authorize validates the client and redirect URI first (errors there
# render a page: an unvalidated URI is never redirected to), then everything else (errors go
# back to the client as RFC 6749 parameters).  Consent, when asked, is a form whose hidden field
# is the sealed authorization request, guarded by a double-submit CSRF cookie.  Approval creates
# the user's session (``mcp:{sid}:user``, ANONYMOUS until the upstream login), a hashed code, and
# the browser-binding cookie the login flow uses.
#
# ``_OAuth`` is the one object the app, the login flow and the sandbox hold: what every endpoint
# shares (URLs, discovery, rate limits, scopes, cookies) lives there once, and each endpoint is
# served by a part that reaches the rest through it: ``_OAuthClients`` (/register, client lookup,
# metadata documents), ``_AuthorizationEndpoint`` (/authorize and consent), ``_Tokens`` (/token,
# /revoke, the bearer check).

# Referrer-Policy same-origin, not no-referrer: under no-referrer a browser sends ``Origin: null``
# on the pages' own form posts (Fetch), and null is also what a sandboxed iframe or data: URL of
# an attacker sends; under same-origin the forms carry the real Origin, and nothing leaves for
# another site.
_HTML_HEADERS = [(b"cache-control", b"no-store"),
                 (b"x-frame-options", b"DENY"), (b"referrer-policy", b"same-origin"),
                 (b"x-content-type-options", b"nosniff"),
                 (b"content-security-policy", b"default-src 'none'; style-src 'unsafe-inline'; "
                                              b"img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'")]
_NO_STORE = [(b"cache-control", b"no-store"), (b"pragma", b"no-cache")]
_OAUTH_BROWSER_PATHS = ("/authorize", "/login/", "/sandbox/authorize", "/sandbox/kite/connect/")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _html_page(title: str, body: str) -> bytes:
    """A plain, readable page: inline CSS, no JavaScript; ``body`` is already escaped HTML."""
    import html
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8>"
            f"<meta name=viewport content='width=device-width,initial-scale=1'><title>{html.escape(title)}</title>"
            "<style>body{font:16px/1.5 system-ui,sans-serif;background:#f4f5f7;color:#1d2330;margin:0}"
            "main{max-width:34rem;margin:8vh auto;background:#fff;border-radius:12px;padding:2rem 2.2rem;"
            "box-shadow:0 2px 12px #0001}h1{font-size:1.35rem;margin:0 0 1rem}p{margin:.6rem 0}"
            "code{background:#eef0f4;padding:.1rem .3rem;border-radius:4px}"
            ".row{display:flex;gap:.8rem;margin-top:1.4rem}button{font:inherit;padding:.55rem 1.2rem;"
            "border-radius:8px;border:1px solid #c6cad3;background:#fff;cursor:pointer}"
            "button.primary{background:#2454d6;border-color:#2454d6;color:#fff}.muted{color:#5d6575;font-size:.9rem}"
            ".ok{color:#137333}.bad{color:#b3261e}</style></head>"
            f"<body><main><h1>{html.escape(title)}</h1>{body}</main></body></html>").encode()


def _form_fields(body: bytes) -> dict:
    try:
        pairs = urllib.parse.parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise _HttpError(400, "The form is not valid UTF-8.") from None
    fields: dict = {}
    for key, value in pairs:
        if key in fields:
            raise _OAuthError("invalid_request", f"The parameter {key} appears more than once.")
        fields[key] = value
    return fields


class _OAuthError(Exception):
    """An RFC 6749 error: ``error`` code, description, HTTP status for JSON endpoints."""

    def __init__(self, error: str, description: str, status: int = 400):
        super().__init__(description)
        self.error, self.description, self.status = error, description, status


async def _oauth_json_error(http: _HttpRequest, error: _OAuthError) -> None:
    """``error`` as the JSON endpoints (/register, /token, /revoke) answer it (RFC 6749 5.2)."""
    headers = list(_NO_STORE)
    if error.status == 401:
        headers.append((b"www-authenticate", b'Basic realm="token"'))
    await http.respond_json(error.status, {"error": error.error, "error_description": error.description},
                            headers=headers)


# Redirect URIs and client-id URLs are judged as the strings a browser will follow, never through
# urlsplit's view of them (``http://evil.test\@127.0.0.1/`` is 127.0.0.1 to urlsplit, evil.test to
# a browser).  Only printable ASCII without backslash or fragment passes, and the authority is a
# bare host (no userinfo, no percent-encoding) with an optional port.
_WEB_URI = re.compile(r"(https?)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)"
                      r"(:[0-9]{1,5})?((?:[/?][!-~]*)?)")
_LOOPBACK_URI = re.compile(r"http://(127\.0\.0\.1|\[::1\]|localhost)(?::[0-9]{1,5})?((?:[/?][!-~]*)?)")
_PRIVATE_USE_URI = re.compile(r"([A-Za-z][A-Za-z0-9+-]*(?:\.[A-Za-z0-9+-]+)+):([!-~]*)")


def _uri_problem(uri) -> str | None:
    """Why ``uri`` cannot be a redirect URI or client-id URL, or None: the checks both share."""
    if not isinstance(uri, str) or not uri or len(uri) > 2000:
        return "it must be a URL of at most 2000 characters"
    if not re.fullmatch(r"[!-~]+", uri):
        return "it holds a space, a control character or a non-ASCII character"
    if "\\" in uri:
        return "it holds a backslash"
    if "#" in uri:
        return "it holds a fragment (#)"
    return None


def _is_loopback_redirect(uri: str) -> bool:
    return isinstance(uri, str) and _LOOPBACK_URI.fullmatch(uri) is not None


def _redirect_uri_problem(uri) -> str | None:
    """None for https, loopback http (native apps) or a private-use scheme with a dot (RFC 8252
    7.1); else why not."""
    problem = _uri_problem(uri)
    if problem:
        return problem
    if uri.startswith(("https:", "http:")):
        web = _WEB_URI.fullmatch(uri)
        if web is None:
            return "its address is not a plain host[:port] (no user name, no percent-encoding)"
        if web.group(1) == "http" and not _is_loopback_redirect(uri):
            return "http is allowed only for loopback addresses (127.0.0.1, [::1], localhost)"
        return None
    private = _PRIVATE_USE_URI.fullmatch(uri)
    if private is None:
        return "use https, a loopback http URI, or a private-use scheme such as com.example.app:/callback"
    rest = private.group(2)
    if rest.startswith("//") and "@" in re.split(r"[/?]", rest[2:], maxsplit=1)[0]:
        return "it holds a user name (@) in its address"
    return None


def _redirect_uri_allowed(uri) -> bool:
    return _redirect_uri_problem(uri) is None


def _redirect_matches(presented: str, registered: list) -> bool:
    """Exact string equality with a registered URI; only the port of a loopback http URI may
    differ (RFC 8252 7.3), compared on the strings with the port removed."""
    if _redirect_uri_problem(presented) is not None:
        return False
    if presented in registered:
        return True
    loopback = _LOOPBACK_URI.fullmatch(presented)
    if loopback is None:
        return False
    return any((m := _LOOPBACK_URI.fullmatch(uri)) is not None and m.groups() == loopback.groups()
               for uri in registered if isinstance(uri, str))


def _redirect_target(uri: str) -> str:
    """What a person should read as the receiver of a redirect: host[:port], or the app's scheme."""
    web = _WEB_URI.fullmatch(uri)
    if web is not None:
        return web.group(2) + (web.group(3) or "")
    return "the app that opens " + uri.split(":", 1)[0] + ": links"


def _display_name(name) -> str | None:
    """A self-declared client name fit to show: no control or bidi-override characters."""
    import unicodedata
    if not isinstance(name, str):
        return None
    clean = "".join(ch for ch in name if unicodedata.category(ch) not in ("Cc", "Cf")).strip()
    return clean[:200] or None


def _with_query(uri: str, params: dict) -> str:
    parts = urllib.parse.urlsplit(uri)
    query = parts.query + ("&" if parts.query else "") + urllib.parse.urlencode(
        {k: v for k, v in params.items() if v is not None})
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


_REFRESH_GRACE = 60       # seconds a just-replaced refresh token may be used, once, for a lost answer
_CIMD_MAX_FETCHES = 4      # client metadata documents fetched at once, per process
_CIMD_NEGATIVE_TTL = 300   # seconds a document that could not be fetched is not asked for again
_CIMD_LIMIT = 65536        # largest document in bytes


def _public_address(ip) -> bool:
    """A globally routable unicast address, judged on the address itself: IPv6 forms that carry an
    IPv4 address inside (mapped, compatible, 6to4, Teredo, NAT64) are refused outright."""
    import ipaddress
    if ip.version == 6 and (ip.ipv4_mapped or ip.sixtofour or ip.teredo or any(
            ip in ipaddress.ip_network(net) for net in ("::/96", "64:ff9b::/96", "64:ff9b:1::/48"))):
        return False
    return ip.is_global and not ip.is_multicast


def _client_id_url_problem(url, allow_private: bool) -> str | None:
    problem = _uri_problem(url)
    if problem:
        return problem
    web = _WEB_URI.fullmatch(url)
    if web is None or not web.group(4).startswith("/"):
        return "it must be an https URL with a path and a plain host (no user name)"
    if web.group(1) != "https" and not allow_private:
        return "it must use https"
    if re.search(r"/\.\.?(/|$|\?)", web.group(4)):
        return "its path has . or .. segments"
    return None


def _fetch_json_document(url: str, allow_private: bool, limit: int = _CIMD_LIMIT, timeout: float = 5.0,
                         what: str = "client metadata document") -> tuple:
    """GET a JSON document from a URL someone else named (a client's metadata document, an
    upstream issuer's discovery document or keys) under SSRF rules, in a worker thread.

    https only; every resolved address must be public (``_public_address``) and the connection
    goes to the address that was checked (no DNS rebinding between check and use); no redirects
    are followed; the whole exchange must fit ``timeout`` seconds (each read gets only what is
    left, so a server dripping a byte at a time cannot stretch it) and ``limit`` bytes.
    Returns (document, max_age)."""
    import ipaddress
    import ssl
    deadline = time.monotonic() + timeout
    problem = _client_id_url_problem(url, allow_private)
    if problem:
        raise ValueError(f"{what} URL refused: {problem}")
    scheme, host, port_text, target = _WEB_URI.fullmatch(url).groups()
    port = int(port_text[1:]) if port_text else (443 if scheme == "https" else 80)
    name = host.strip("[]")
    address = None
    for info in socket.getaddrinfo(name, port, type=socket.SOCK_STREAM):
        if not allow_private and not _public_address(ipaddress.ip_address(info[4][0].split("%")[0])):
            raise ValueError(f"{what} host {name} resolves to a non-public address")
        address = address or info[4][0]
    if address is None:
        raise ValueError(f"{what} host {name} does not resolve")

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ValueError(f"{what} took longer than {timeout:g} s")
        return remaining

    data = bytearray()
    sock = socket.create_connection((address, port), left())
    try:
        if scheme == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=name)
        sock.sendall(f"GET {target} HTTP/1.0\r\nHost: {host}{port_text or ''}\r\nAccept: application/json\r\n"
                     "User-Agent: mcp_server\r\nConnection: close\r\n\r\n".encode("ascii"))
        while True:
            sock.settimeout(left())
            chunk = sock.recv(16384)
            if not chunk:
                break
            data += chunk
            if len(data) > limit + 16384:
                raise ValueError(f"{what} is too large")
    except (socket.timeout, TimeoutError):
        raise ValueError(f"{what} took longer than {timeout:g} s") from None
    finally:
        sock.close()
    return _parse_document_response(bytes(data), limit, what)




def _parse_document_response(data: bytes, limit: int, what: str = "client metadata document") -> tuple:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = re.match(r"HTTP/1\.[01] (\d{3})", lines[0])
    if status is None:
        raise ValueError(f"the {what} URL did not answer HTTP")
    if status.group(1) != "200":
        raise ValueError(f"the {what} URL answered HTTP {status.group(1)}")
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    if "content-length" in headers:
        length = int(headers["content-length"]) if _DECIMAL.fullmatch(headers["content-length"]) else -1
        if length < 0 or length > len(body):
            raise ValueError(f"{what} was cut short")
        body = body[:length]
    if len(body) > limit:
        raise ValueError(f"{what} is too large")
    cache = headers.get("cache-control", "")
    match = re.search(r"max-age=(\d+)", cache)
    max_age = 0 if "no-store" in cache else min(int(match.group(1)) if match else 300, 86400)
    return _loads(body), max_age


def _remember(approved: list, client_id: str, keep: int = 20, size: int = 3000) -> str:
    """The consent cookie's list after approving ``client_id``: the newest ``keep`` clients, in
    the order they were approved, within ``size`` characters (a browser drops a larger cookie)."""
    newest = [c for c in approved if c != client_id][-(keep - 1):] + [client_id]
    while len(newest) > 1 and len(" ".join(newest)) > size:
        newest.pop(0)
    return " ".join(newest)


class _OAuth:
    """The built-in authorization server and the resource-server checks, as the rest of the file
    sees them: what every endpoint shares (URLs, discovery documents, rate limits, scopes,
    browser cookies) and the endpoints, each served by its part: ``clients`` (/register and the
    clients it knows), ``authorization`` (/authorize and consent) and ``tokens`` (/token,
    /revoke and the bearer check of every protected request)."""

    def __init__(self, server: _ProtocolCore):
        self.server = server
        self.clients = _OAuthClients(self)
        self.authorization = _AuthorizationEndpoint(self)
        self.tokens = _Tokens(self)

    @property
    def settings(self) -> Settings:
        return self.server.settings

    # -- URLs ------------------------------------------------------------------------------------

    def origin(self, http: _HttpRequest) -> str:
        if self.settings.public_url:
            parts = urllib.parse.urlsplit(self.settings.public_url)
            return f"{parts.scheme}://{parts.netloc}"
        return f"{http.scope.get('scheme', 'http')}://{http.headers.get('host', 'localhost')}"

    def issuer(self, http: _HttpRequest) -> str:
        if self.settings.public_url:
            return self.settings.public_url
        return self.origin(http) + http.scope.get("root_path", "")

    def _endpoints(self) -> tuple:
        """The protected endpoints, each its own resource URI (RFC 9728): /mcp, /sse, /http."""
        return (self.settings.mcp_path, "/sse", "/http")

    def resource(self, http: _HttpRequest, endpoint: str | None = None) -> str:
        """The resource URI of ``endpoint`` (a protected path), by default the MCP endpoint."""
        if endpoint in ("/messages", "/messages/"):
            endpoint = "/sse"  # the legacy transport's two halves are one resource
        endpoint = (endpoint or "").rstrip("/")
        return self.issuer(http) + (endpoint if endpoint in self._endpoints() else self.settings.mcp_path)

    def resources(self, http: _HttpRequest) -> list:
        return [self.issuer(http) + endpoint for endpoint in self._endpoints()]

    def metadata_url(self, http: _HttpRequest, endpoint: str | None = None) -> str:
        path = urllib.parse.urlsplit(self.resource(http, endpoint)).path
        return self.origin(http) + "/.well-known/oauth-protected-resource" + path

    def secure(self, http: _HttpRequest) -> bool:
        return self.issuer(http).startswith("https://")

    # -- discovery documents -------------------------------------------------------------------

    async def protected_resource_metadata(self, http: _HttpRequest, suffix: str = "") -> None:
        """RFC 9728 metadata: the root document names the MCP endpoint; a path-suffixed one names
        the endpoint its suffix is (``/.well-known/oauth-protected-resource/sse`` -> ``.../sse``)."""
        issuer = self.settings.auth_issuer if self.settings.auth == "external" else self.issuer(http)
        endpoint = None
        if suffix:
            root = urllib.parse.urlsplit(self.issuer(http)).path
            endpoint = suffix[len(root):] if root and suffix.startswith(root) else suffix
            if endpoint.rstrip("/") not in self._endpoints():
                raise _HttpError(404, f"Not Found: no protected resource at {suffix}.")
        await http.respond_json(200, {
            "resource": self.resource(http, endpoint), "authorization_servers": [issuer],
            "scopes_supported": list(self.settings.scopes), "bearer_methods_supported": ["header"],
            "resource_name": self.server.name})

    async def server_metadata(self, http: _HttpRequest) -> None:
        if self.settings.auth != "builtin":
            raise _HttpError(404, "This server does not run an authorization server (MCP_AUTH is not builtin).")
        issuer = self.issuer(http)
        await http.respond_json(200, {
            "issuer": issuer,
            "authorization_endpoint": issuer + "/authorize",
            "token_endpoint": issuer + "/token",
            "registration_endpoint": issuer + "/register",
            "revocation_endpoint": issuer + "/revoke",
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["none", "client_secret_basic", "client_secret_post"],
            "revocation_endpoint_auth_methods_supported": ["none", "client_secret_basic", "client_secret_post"],
            "scopes_supported": list(self.settings.scopes) + ["offline_access"],
            "client_id_metadata_document_supported": True,
            "authorization_response_iss_parameter_supported": True})

    # -- rate limits -------------------------------------------------------------------------------

    async def _rate_limit(self, http: _HttpRequest, route: str, limit: int | None = None, window: int = 60,
                          message: str = "") -> None:
        limit = self.settings.auth_rate_limit if limit is None else limit
        if not limit:
            return
        client = http.client_address() or "unknown"
        slot = int(_now() // window)
        count = await self.server._runtime().store.incr(f"mcp:rate:{route}:{client}:{slot}", window)
        if count > limit:
            wait = window - int(_now()) % window
            raise _HttpError(429, message or f"Too many requests to {route}; try again in a minute.",
                             headers=((b"retry-after", str(wait).encode()),))

    # -- scopes and cookies ------------------------------------------------------------------------

    def _scopes(self, requested: str | None) -> str:
        allowed = set(self.settings.scopes) | {"offline_access"}
        wanted = (requested or " ".join(self.settings.scopes)).split()
        unknown = [s for s in wanted if s not in allowed]
        if unknown:
            raise _OAuthError("invalid_scope", f"Unknown scope(s): {', '.join(unknown)}.")
        return " ".join(s for s in wanted if s != "offline_access") or " ".join(self.settings.scopes)

    # The binding cookies are SameSite=Strict: a cross-site page cannot make the browser send
    # them.  Only the login nonce (mcp_login) must come back on the provider's top-level
    # redirect to /redirect, which Strict would drop.
    _LAX_COOKIES = frozenset(("mcp_login",))

    def _cookie_name(self, http: _HttpRequest, name: str) -> str:
        """``__Host-name`` on an https issuer (a sibling host cannot set or shadow it), the plain
        name on http (loopback development): one name per deployment, never both."""
        return ("__Host-" if self.secure(http) else "") + name

    def _cookie(self, http: _HttpRequest, name: str) -> str | None:
        wanted = self._cookie_name(http, name)
        for part in http.headers.get("cookie", "").split(";"):
            key, _, value = part.strip().partition("=")
            if key == wanted:
                return value
        return None

    def _set_cookie(self, http: _HttpRequest, name: str, value: str, max_age: int) -> tuple:
        same_site = "Lax" if name in self._LAX_COOKIES else "Strict"
        text = (f"{self._cookie_name(http, name)}={value}; Path=/; HttpOnly; SameSite={same_site}; "
                f"Max-Age={max_age}" + ("; Secure" if self.secure(http) else ""))
        return (b"set-cookie", text.encode())

    # -- the endpoints, each served by its part ----------------------------------------------------

    async def register(self, http: _HttpRequest) -> None:
        await self.clients.register(http)

    async def authorize(self, http: _HttpRequest) -> None:
        await self.authorization.authorize(http)

    async def token(self, http: _HttpRequest) -> None:
        await self.tokens.token(http)

    async def revoke(self, http: _HttpRequest) -> None:
        await self.tokens.revoke(http)

    async def authenticate(self, http: _HttpRequest, endpoint: str | None = None) -> str | None:
        """The principal of a protected request to ``endpoint``, or a 401/403 challenge."""
        return await self.tokens.authenticate(http, endpoint)


class _OAuthPart:
    """A part of the authorization server.  The settings, the server (store, key ring) and what
    every endpoint shares (URLs, rate limits, scopes, cookies) it reaches through the ``_OAuth``
    it belongs to, which holds each of them once."""

    def __init__(self, oauth: _OAuth):
        self.oauth = oauth
        self.server = oauth.server

    @property
    def settings(self) -> Settings:
        return self.oauth.settings


class _OAuthClients(_OAuthPart):
    """The clients the authorization server knows: those registered at /register (RFC 7591),
    kept in the store, and those whose client_id is the URL of their Client ID Metadata
    Document, fetched under SSRF rules on threads of their own and cached."""

    def __init__(self, oauth: _OAuth):
        super().__init__(oauth)
        # Client metadata documents are fetched on threads of their own, at most
        # _CIMD_MAX_FETCHES at once (a slot is free only when its thread is done), so slow
        # documents never hold the pool that runs tools and upstream calls.
        self._fetch_slots = threading.BoundedSemaphore(_CIMD_MAX_FETCHES)
        self._fetch_threads = None  # anyio.CapacityLimiter(_CIMD_MAX_FETCHES), made in the running loop
        self._fetches: dict = {}  # URL -> _Answer of the fetch in flight, shared by concurrent requests

    async def register(self, http: _HttpRequest) -> None:
        await self.oauth._rate_limit(http, "register")
        try:
            body = _loads(await http.read_body(64 * 1024))
        except (ValueError, UnicodeDecodeError):
            await _oauth_json_error(http, _OAuthError("invalid_client_metadata",
                                                      "The body must be a JSON object."))
            return
        try:
            client = self._client_from_registration(body)
        except _OAuthError as exc:
            await _oauth_json_error(http, exc)
            return
        # counted once the request is valid: a registration that will be stored (and live
        # MCP_CLIENT_TTL unless used) is what the hourly cap per address limits
        await self.oauth._rate_limit(http, "registered", self.settings.registrations_per_hour, 3600,
                                     "Too many client registrations from this address; try again within "
                                     "the hour (MCP_REGISTRATIONS_PER_HOUR).")
        response = {k: v for k, v in client.items() if k != "secret_hash"}
        if client["token_endpoint_auth_method"] != "none":
            secret = secrets.token_urlsafe(32)
            client["secret_hash"] = _sha256(secret)
            response["client_secret"] = secret
            response["client_secret_expires_at"] = 0
        await self.server._runtime().store.set(f"mcp:oauth:client:{client['client_id']}", client,
                                           self.settings.client_ttl)
        await http.respond_json(201, response, headers=list(_NO_STORE))

    def _client_from_registration(self, body) -> dict:
        if not isinstance(body, dict):
            raise _OAuthError("invalid_client_metadata", "The body must be a JSON object.")
        uris = body.get("redirect_uris")
        if not isinstance(uris, list) or not 0 < len(uris) <= 20 or not all(isinstance(u, str) for u in uris):
            raise _OAuthError("invalid_redirect_uri", "redirect_uris must be a list of 1 to 20 URLs.")
        for uri in uris:
            problem = _redirect_uri_problem(uri)
            if problem:
                raise _OAuthError("invalid_redirect_uri", f"Redirect URI {uri[:200]!r} is not allowed: {problem}.")
        method = body.get("token_endpoint_auth_method", "none")
        if method not in ("none", "client_secret_basic", "client_secret_post"):
            raise _OAuthError("invalid_client_metadata", f"token_endpoint_auth_method {method!r} is not supported.")
        grants = body.get("grant_types", ["authorization_code", "refresh_token"])
        if not isinstance(grants, list) or not set(grants) <= {"authorization_code", "refresh_token"}:
            raise _OAuthError("invalid_client_metadata", "grant_types may hold authorization_code and refresh_token.")
        kind = body.get("application_type") if body.get("application_type") in ("native", "web") else (
            "native" if all(_is_loopback_redirect(u) or not u.startswith("https") for u in uris) else "web")
        name = _display_name(body.get("client_name"))
        return {"client_id": secrets.token_urlsafe(18), "client_id_issued_at": int(_now()),
                "redirect_uris": uris, "token_endpoint_auth_method": method, "grant_types": grants,
                "response_types": ["code"], "application_type": kind,
                **({"client_name": name} if name else {}),
                **({"scope": body["scope"]} if isinstance(body.get("scope"), str) else {})}

    async def client(self, client_id) -> dict | None:
        """A registered client (its life restarts with each use), or a Client ID Metadata Document
        fetched (and cached, failures too) from its URL."""
        if not isinstance(client_id, str) or not client_id or len(client_id) > 2048:
            return None
        store = self.server._runtime().store
        if not client_id.startswith(("https://", "http://")):
            return await store.get_refreshed(f"mcp:oauth:client:{client_id}", self.settings.client_ttl)
        cache_key = f"mcp:oauth:cimd:{_sha256(client_id)}"
        cached = await store.get(cache_key)
        if cached is not None:
            return cached or None
        try:
            document, max_age = await self._fetch_document(client_id)
            client = self._client_from_document(client_id, document)
        except _OAuthError:
            raise  # too many fetches at once: not the document's fault, nothing to remember
        except Exception as exc:
            log.warning("client metadata document %s refused: %s", client_id[:200], exc)
            await store.set(cache_key, {}, _CIMD_NEGATIVE_TTL)
            return None
        if max_age:
            await store.set(cache_key, client, max_age)
        return client

    async def _fetch_document(self, client_id: str) -> tuple:
        """``_fetch_json_document`` on the fetch threads, within the fetch deadline; a fetch of
        the same URL already under way is shared.  Past the cap: 503, at once."""
        fetched = self._fetches.get(client_id)
        timeout = self.settings.client_fetch_timeout
        if fetched is None:
            if not self._fetch_slots.acquire(blocking=False):  # (given back when the thread ends)
                raise _OAuthError("temporarily_unavailable", "Too many client metadata documents are being "
                                  "fetched right now; try again in a moment.", 503)
            fetched = self._fetches[client_id] = _Answer()
            self.server._runtime().spawn(self._fetch_into(fetched, client_id, timeout))
        with anyio.move_on_after(timeout + 1):
            return await fetched.wait()
        raise ValueError(f"client metadata document took longer than {timeout:g} s")

    async def _fetch_into(self, fetched: _Answer, client_id: str, timeout: float) -> None:
        """Fetch a client's document on a fetch thread, for every request waiting on ``fetched``
        (a background job: a request that goes away does not take the fetch with it)."""
        def fetch():
            try:
                return _fetch_json_document(client_id, self.settings.allow_private_fetch, timeout=timeout)
            finally:
                self._fetch_slots.release()
        if self._fetch_threads is None:
            self._fetch_threads = anyio.CapacityLimiter(_CIMD_MAX_FETCHES)
        try:
            fetched.set(await anyio.to_thread.run_sync(fetch, abandon_on_cancel=True, limiter=self._fetch_threads))
        except Exception as exc:
            fetched.fail(exc)
        finally:
            self._fetches.pop(client_id, None)

    @staticmethod
    def _client_from_document(client_id: str, document) -> dict:
        uris = document.get("redirect_uris") if isinstance(document, dict) else None
        if not isinstance(document, dict) or document.get("client_id") != client_id:
            raise ValueError("the document's client_id must equal its URL")
        if not isinstance(uris, list) or not 0 < len(uris) <= 20 or not all(_redirect_uri_allowed(u) for u in uris):
            raise ValueError("redirect_uris must be 1 to 20 allowed redirect URIs")
        return {"client_id": client_id, "redirect_uris": uris, "token_endpoint_auth_method": "none",
                "client_name": _display_name(document.get("client_name")) or _WEB_URI.fullmatch(client_id).group(2),
                "metadata_document": True}


class _AuthorizationEndpoint(_OAuthPart):
    """/authorize, the browser-facing endpoint: it validates the client and redirect URI, then the
    request, asks the person's consent (or remembers it) and redirects back with a single-use
    code, or with an error only where that is safe (``_authorize_error``)."""

    async def authorize(self, http: _HttpRequest) -> None:
        await self.oauth._rate_limit(http, "authorize")
        method = http.scope.get("method")
        if method == "POST":
            await self._consent_answer(http)
            return
        params = {}
        for key, value in urllib.parse.parse_qsl(http.scope.get("query_string", b"").decode("latin-1"),
                                                 keep_blank_values=True):
            if key in params:
                await self._error_page(http, "Invalid request", f"The parameter {key} appears more than once.")
                return
            params[key] = value
        try:
            client = await self.oauth.clients.client(params.get("client_id"))
        except _OAuthError as exc:
            await self._error_page(http, "Try again in a moment", exc.description, exc.status)
            return
        if client is None:
            document = str(params.get("client_id") or "").startswith(("https://", "http://"))
            await self._error_page(http, "Unknown application",
                                   "The application that sent you here is not registered with this server"
                                   + (" (its client metadata document could not be fetched in time, or is "
                                      "not valid)" if document else "") + ". Go back to it and connect again.")
            return
        redirect = params.get("redirect_uri")
        if redirect is None and len(client["redirect_uris"]) == 1:
            redirect = client["redirect_uris"][0]
        if not redirect or not _redirect_matches(redirect, client["redirect_uris"]):
            await self._error_page(http, "Invalid redirect address",
                                   "The application asked to send you to an address it did not register, "
                                   "so this server will not send you there.")
            return
        request = {"kind": "consent", "client_id": client["client_id"], "redirect_uri": redirect,
                   "state": params.get("state"), "explicit_redirect": "redirect_uri" in params}
        remembered = client["client_id"] in await self._remembered(http)
        try:
            request.update(self._validate_authorization(params, http))
        except _OAuthError as exc:
            await self._authorize_error(http, redirect, exc, params.get("state"), trusted=remembered)
            return
        if self.settings.consent == "never" or (self.settings.consent == "remember" and remembered):
            await self._approve(http, request)
            return
        await self._consent_page(http, client, request)

    async def _authorize_error(self, http: _HttpRequest, redirect: str, error: _OAuthError, state, trusted: bool) -> None:
        """An error before the person said anything.  A registered redirect URI proves only that
        someone registered it (registration is open), so this server redirects on its own only to
        a client the person approved, a native app's URI, or when the operator trusts every client
        (MCP_CONSENT=never); otherwise the person reads the error and decides (RFC 9700 4.11.2)."""
        if trusted or self.settings.consent == "never" or not redirect.startswith("https:"):
            await self._redirect_error(http, redirect, error, state)
            return
        import html
        location = self._error_location(http, redirect, error, state)
        await self._error_page(http, "The application's request was refused", error.description,
                               extra=f"<p class=muted>It came from an application that answers at "
                                     f"<code>{html.escape(_redirect_target(redirect))}</code>. "
                                     f"<a href='{html.escape(location)}'>Tell it about the error</a> "
                                     "only if you trust that address.</p>")

    def _validate_authorization(self, params: dict, http: _HttpRequest) -> dict:
        if params.get("response_type") != "code":
            raise _OAuthError("unsupported_response_type", "Only response_type=code is supported.")
        challenge = params.get("code_challenge")
        if not challenge:
            raise _OAuthError("invalid_request", "PKCE is required: send code_challenge with code_challenge_method=S256.")
        if params.get("code_challenge_method") != "S256":
            raise _OAuthError("invalid_request", "Only code_challenge_method=S256 is accepted.")
        if not re.fullmatch(r"[A-Za-z0-9_-]{43}", challenge):
            raise _OAuthError("invalid_request", "code_challenge must be a base64url SHA-256 digest (43 characters).")
        resource = (params.get("resource") or self.oauth.resource(http)).rstrip("/")
        if resource not in self.oauth.resources(http):
            raise _OAuthError("invalid_target",
                              f"This server issues tokens only for {', '.join(self.oauth.resources(http))}.")
        granted = self.oauth._scopes(params.get("scope"))
        return {"challenge": challenge, "resource": resource, "scope": granted}

    async def _remembered(self, http: _HttpRequest) -> list:
        """The clients this browser approved.  The signed text starts with ``consent:`` so that no
        other value signed with the same key can stand in for it."""
        value = self.oauth._cookie(http, "mcp_consent")
        text = (await self.server._keyring()).verify(value, "cookie") if value else None
        kind, _, approved = (text or "").partition(" ")
        return approved.split(" ") if kind == "consent:" and approved else []

    async def _consent_page(self, http: _HttpRequest, client: dict, request: dict) -> None:
        import html
        keys = await self.server._keyring()
        csrf = secrets.token_urlsafe(24)
        sealed = keys.seal({**request, "csrf": csrf, "exp": int(_now()) + 600}, "consent")
        name = html.escape(client.get("client_name") or client["client_id"])
        if client.get("metadata_document"):  # the client_id's host is the identity it proved
            who = (f"<b>{name}</b> <span class=muted>(its own name for itself)</span>, "
                   f"<span class=ok>verified as <code>{html.escape(_redirect_target(client['client_id']))}"
                   "</code> (a web address it controls)</span>,")
        else:
            who = f"<b>{name}</b> <span class=muted>(its own name for itself)</span>"
        warning = ("<p class=muted>It runs on this computer (a loopback address): approve only if you "
                   "just started it yourself.</p>") if _is_loopback_redirect(request["redirect_uri"]) else ""
        body = (f"<p>{who} asks to use <b>{html.escape(self.server.name)}</b> on your behalf.</p>"
                f"<p>It will receive access to: <code>{html.escape(request['scope'])}</code></p>"
                f"<p class=muted>After you approve, this server sends you and the access code to "
                f"<code>{html.escape(_redirect_target(request['redirect_uri']))}</code>.</p>{warning}"
                f"<form method=post action='{html.escape(self.oauth.issuer(http))}/authorize'>"
                f"<input type=hidden name=request value='{html.escape(sealed)}'>"
                f"<input type=hidden name=csrf value='{html.escape(csrf)}'>"
                "<div class=row><button class=primary name=decision value=approve>Approve</button>"
                "<button name=decision value=deny>Deny</button></div></form>")
        headers = _HTML_HEADERS + [self.oauth._set_cookie(http, "mcp_csrf", csrf, 600)]
        await http.respond(200, _html_page("Allow access?", body), "text/html; charset=utf-8", headers)

    async def _consent_answer(self, http: _HttpRequest) -> None:
        try:
            fields = _form_fields(await http.read_body(16 * 1024))
        except _OAuthError as exc:
            await self._error_page(http, "Invalid request", exc.description)
            return
        keys = await self.server._keyring()
        request = keys.unseal(fields.get("request", ""), "consent")
        cookie = self.oauth._cookie(http, "mcp_csrf") or ""
        if (request is None or request.get("kind") != "consent" or request.get("exp", 0) < _now() or not cookie
                or not hmac.compare_digest(str(request.get("csrf")), fields.get("csrf", ""))
                or not hmac.compare_digest(cookie, fields.get("csrf", ""))):
            await self._error_page(http, "This page has expired",
                                   "The approval form is stale or did not come from this browser. "
                                   "Go back to the application and connect again.")
            return
        if fields.get("decision") != "approve":
            await self._redirect_error(http, request["redirect_uri"], _OAuthError(
                "access_denied", "The user denied the request."), request.get("state"))
            return
        remember = None
        if self.settings.consent == "remember":
            remember = self.oauth._set_cookie(http, "mcp_consent", keys.sign(
                "consent: " + _remember(await self._remembered(http), request["client_id"]), "cookie"), 180 * 86400)
        await self._approve(http, request, remember)

    async def _approve(self, http: _HttpRequest, request: dict, extra_cookie: tuple | None = None) -> None:
        store = self.server._runtime().store
        sid, generation = secrets.token_urlsafe(24), secrets.token_hex(4)
        await store.set(_user_key(sid), {"state": "ANONYMOUS", "client_id": request["client_id"],
                                         "created": int(_now()), "revoked": [], "gen": generation},
                        self.settings.session_ttl)
        code = secrets.token_urlsafe(32)
        await store.set(f"mcp:oauth:code:{_sha256(code)}", {
            "client_id": request["client_id"], "redirect_uri": request["redirect_uri"],
            "explicit_redirect": request["explicit_redirect"], "challenge": request["challenge"],
            "resource": request["resource"], "scope": request["scope"], "sid": sid, "gen": generation}, 600)
        headers = [extra_cookie] if extra_cookie else []
        location = _with_query(request["redirect_uri"], {"code": code, "state": request.get("state"),
                                                         "iss": self.oauth.issuer(http)})
        await http.respond(302, headers=[(b"location", location.encode()), *_NO_STORE, *headers])

    def _error_location(self, http: _HttpRequest, redirect: str, error: _OAuthError, state) -> str:
        return _with_query(redirect, {"error": error.error, "error_description": error.description,
                                      "state": state, "iss": self.oauth.issuer(http)})

    async def _redirect_error(self, http: _HttpRequest, redirect: str, error: _OAuthError, state) -> None:
        location = self._error_location(http, redirect, error, state)
        await http.respond(302, headers=[(b"location", location.encode()), *_NO_STORE])

    async def _error_page(self, http: _HttpRequest, title: str, message: str, status: int = 400, extra: str = "") -> None:
        import html
        await http.respond(status, _html_page(title, f"<p class=bad>{html.escape(message)}</p>{extra}"),
                           "text/html; charset=utf-8", list(_HTML_HEADERS))


class _Tokens(_OAuthPart):
    """Access and refresh tokens: issued at /token (for an authorization code or a refresh
    token), revoked at /revoke, and checked on every protected request (``authenticate``): this
    server's own under MCP_AUTH=builtin, another issuer's under MCP_AUTH=external."""

    # -- /token and /revoke ------------------------------------------------------------------------

    async def _authenticate_client(self, http: _HttpRequest, fields: dict) -> dict:
        basic_id = basic_secret = None
        header = http.headers.get("authorization", "")
        if header[:6].lower() == "basic ":
            try:
                decoded = base64.b64decode(header[6:], validate=True).decode()
                basic_id, _, basic_secret = decoded.partition(":")
                basic_id = urllib.parse.unquote_plus(basic_id)
                basic_secret = urllib.parse.unquote_plus(basic_secret)
            except (ValueError, UnicodeDecodeError):
                raise _OAuthError("invalid_client", "Malformed Basic credentials.", 401) from None
        client_id = basic_id or fields.get("client_id")
        if fields.get("client_id") and basic_id and fields["client_id"] != basic_id:
            raise _OAuthError("invalid_client", "client_id does not match the Basic credentials.", 401)
        client = await self.oauth.clients.client(client_id)
        if client is None:
            raise _OAuthError("invalid_client", "Unknown client.", 401)
        if client["token_endpoint_auth_method"] != "none":
            secret = basic_secret if basic_id else fields.get("client_secret")
            if not secret or not hmac.compare_digest(_sha256(secret), client.get("secret_hash", "")):
                raise _OAuthError("invalid_client", "Client authentication failed.", 401)
        return client

    async def token(self, http: _HttpRequest) -> None:
        await self.oauth._rate_limit(http, "token")
        try:
            kind = _media_type(http.headers.get("content-type", ""))
            body = await http.read_body(64 * 1024)
            if kind == "application/json":
                fields = _loads(body)
                if not isinstance(fields, dict):
                    raise ValueError
                fields = {k: str(v) for k, v in fields.items()}
            else:
                fields = _form_fields(body)
        except (ValueError, UnicodeDecodeError):
            await _oauth_json_error(http, _OAuthError("invalid_request", "Send the parameters as a form."))
            return
        except _OAuthError as exc:
            await _oauth_json_error(http, exc)
            return
        try:
            client = await self._authenticate_client(http, fields)
            grant = fields.get("grant_type")
            if grant == "authorization_code":
                answer = await self._code_grant(http, client, fields)
            elif grant == "refresh_token":
                answer = await self._refresh_grant(http, client, fields)
            else:
                raise _OAuthError("unsupported_grant_type", f"grant_type {grant!r} is not supported.")
        except _OAuthError as exc:
            await _oauth_json_error(http, exc)
            return
        await http.respond_json(200, answer, headers=list(_NO_STORE))

    async def _code_grant(self, http: _HttpRequest, client: dict, fields: dict) -> dict:
        store = self.server._runtime().store
        code = fields.get("code", "")
        code_hash = _sha256(code)
        grant = await store.pop(f"mcp:oauth:code:{code_hash}")
        if grant is None:
            used = await store.pop(f"mcp:oauth:used:{code_hash}")
            if used is not None:  # a replayed code: revoke everything it issued
                family = await store.get(f"mcp:oauth:family:{used.get('family')}")
                if family is not None:
                    await self._revoke_family(family)
                await store.delete(_user_key(used["sid"]))
                log.warning("authorization code replayed: its session and tokens were revoked")
            raise _OAuthError("invalid_grant", "The authorization code is invalid, expired or already used.")
        if grant["client_id"] != client["client_id"]:
            raise _OAuthError("invalid_grant", "The code was issued to another client.")
        redirect = fields.get("redirect_uri")
        if (redirect or grant["explicit_redirect"]) and redirect != grant["redirect_uri"]:
            raise _OAuthError("invalid_grant", "redirect_uri does not match the authorization request.")
        verifier = fields.get("code_verifier", "")
        if not re.fullmatch(r"[A-Za-z0-9._~-]{43,128}", verifier):
            raise _OAuthError("invalid_grant", "code_verifier must be 43-128 characters of [A-Za-z0-9._~-].")
        digest = _b64url(hashlib.sha256(verifier.encode()).digest())
        if not hmac.compare_digest(digest, grant["challenge"]):
            raise _OAuthError("invalid_grant", "code_verifier does not match the code_challenge.")
        resource = fields.get("resource")
        if resource and resource.rstrip("/") != grant["resource"]:
            raise _OAuthError("invalid_target", "resource does not match the authorization request.")
        family_id = secrets.token_urlsafe(12)
        await store.set(f"mcp:oauth:used:{code_hash}", {"sid": grant["sid"], "family": family_id}, 600)
        return await self._issue(http, client, grant["sid"], grant["scope"], grant["resource"],
                                 family=(family_id, None), generation=grant.get("gen"))

    async def _issue(self, http: _HttpRequest, client: dict, sid: str, scope: str, resource: str, family,
                     generation: str | None) -> dict:
        jwt = _require("tokens")
        keys = await self.server._keyring()
        now = int(_now())
        claims = {"iss": self.oauth.issuer(http), "aud": resource, "sub": sid, "sid": sid,
                  "jti": secrets.token_urlsafe(12), "iat": now, "nbf": now, "exp": now + self.settings.token_ttl,
                  "scope": scope, "client_id": client["client_id"], "gen": generation}
        access = jwt.encode(claims, keys.token_key, algorithm="HS256", headers={"kid": keys.kid, "typ": "at+jwt"})
        answer = {"access_token": access, "token_type": "Bearer", "expires_in": self.settings.token_ttl,
                  "scope": scope}
        if "refresh_token" in client.get("grant_types", ["refresh_token"]):
            answer["refresh_token"] = await self._new_refresh(client, sid, scope, resource, family)
        return answer

    async def _new_refresh(self, client: dict, sid: str, scope: str, resource: str, family: tuple) -> str:
        """A new refresh token; ``family`` is ``(id, hash of the token it replaces, or None)``."""
        store, ttl = self.server._runtime().store, self.settings.refresh_ttl
        token = secrets.token_urlsafe(32)
        token_hash = _sha256(token)
        family_id, replaced = family
        await store.set(f"mcp:oauth:rt:{token_hash}", {"family": family_id, "client_id": client["client_id"],
                                                       "sid": sid, "scope": scope, "resource": resource}, ttl)
        await store.set(f"mcp:oauth:family:{family_id}", {"id": family_id, "current": token_hash,
                                                          "previous": replaced, "rotated": int(_now()),
                                                          "sid": sid}, ttl)
        return token

    async def _refresh_grant(self, http: _HttpRequest, client: dict, fields: dict) -> dict:
        """Rotate: the presented token must be the family's newest, or the one it replaced, once,
        within _REFRESH_GRACE seconds of the rotation (a client retrying a lost answer; RFC 9700
        4.14.2).  Anything else is reuse: the family and its session are revoked."""
        store = self.server._runtime().store
        token_hash = _sha256(fields.get("refresh_token", ""))
        record = await store.get(f"mcp:oauth:rt:{token_hash}")
        if record is None or record["client_id"] != client["client_id"]:
            raise _OAuthError("invalid_grant", "The refresh token is invalid, expired or revoked.")
        family = await store.get(f"mcp:oauth:family:{record['family']}")
        if family is None:
            raise _OAuthError("invalid_grant", "The refresh token was revoked.")
        # A session idle past its time is gone with whatever it held (the upstream login); the
        # refresh token outlives it and starts the same session afresh, anonymous again.
        # A new generation: tokens issued before the restart stay dead (their revocations went
        # with the old session, so none of them may count).
        session = await store.get(_user_key(record["sid"])) or {
            "state": "ANONYMOUS", "client_id": client["client_id"], "created": int(_now()), "revoked": [],
            "gen": secrets.token_hex(4)}
        if not await self._may_rotate(family, token_hash):
            await self._revoke_family(family)
            log.warning("refresh token reuse detected: the token family and its session were revoked")
            raise _OAuthError("invalid_grant", "The refresh token was already used; sign in again.")
        if fields.get("resource") and fields["resource"].rstrip("/") != record["resource"]:
            raise _OAuthError("invalid_target", "resource does not match the one this grant was issued for.")
        scope = record["scope"]
        if fields.get("scope"):
            narrower = self.oauth._scopes(fields["scope"]).split()
            if not set(narrower) <= set(scope.split()):
                raise _OAuthError("invalid_scope", "A refresh cannot widen the granted scope.")
            scope = " ".join(narrower)
        await store.set(_user_key(record["sid"]), session, self.settings.session_ttl)  # activity
        answer = await self._issue(http, client, record["sid"], scope, record["resource"],
                                   family=(family["id"], token_hash), generation=session.get("gen"))
        if await store.get(f"mcp:oauth:revoked:{family['id']}") is not None:
            # a concurrent reuse revoked the family while this rotation was writing it back
            await self._revoke_family({**family, "current": _sha256(answer.get("refresh_token", "")),
                                       "previous": None})
            raise _OAuthError("invalid_grant", "The refresh token was already used; sign in again.")
        return answer

    async def _may_rotate(self, family: dict, token_hash: str) -> bool:
        """Whether a refresh token may be exchanged now.  The family's newest, once: of concurrent
        uses (on any instance) one claims it atomically.  Then once more, within _REFRESH_GRACE
        seconds, the token a rotation replaced or one whose rotation is under way (a client that
        lost the answer retries).  Every other use is reuse; a superseded replacement's record
        stays, so using it is reuse too."""
        store = self.server._runtime().store
        if token_hash == family["current"] and await store.add(f"mcp:oauth:rotated:{token_hash}", 1,
                                                                self.settings.refresh_ttl):
            return True
        recent = token_hash == family["current"] or (
            token_hash == family.get("previous") and _now() - family.get("rotated", 0) <= _REFRESH_GRACE)
        return recent and await store.add(f"mcp:oauth:grace:{token_hash}", 1, 2 * _REFRESH_GRACE)

    async def _revoke_family(self, family: dict) -> None:
        """End a token family and its session.  The mark comes first: a rotation that read the
        family before this must see it when it is done, and undo what it wrote (_refresh_grant)."""
        store = self.server._runtime().store
        await store.set(f"mcp:oauth:revoked:{family['id']}", 1, self.settings.refresh_ttl)
        await store.delete(f"mcp:oauth:family:{family['id']}")
        for key in ("current", "previous"):
            if family.get(key):
                await store.delete(f"mcp:oauth:rt:{family[key]}")
        await store.delete(_user_key(family["sid"]))

    async def revoke(self, http: _HttpRequest) -> None:
        await self.oauth._rate_limit(http, "revoke")  # it may fetch a client metadata document
        try:
            fields = _form_fields(await http.read_body(16 * 1024))
            client = await self._authenticate_client(http, fields)
        except _OAuthError as exc:
            await _oauth_json_error(http, exc)
            return
        token = fields.get("token", "")
        store = self.server._runtime().store
        record = await store.get(f"mcp:oauth:rt:{_sha256(token)}")
        # RFC 7009 2.1: a client may revoke only its own tokens; anything else is ignored (200)
        if record is not None and record["client_id"] != client["client_id"]:
            record = None
            token = ""
        if record is not None:
            family = await store.get(f"mcp:oauth:family:{record['family']}")
            if family:
                await self._revoke_family(family)
            await store.delete(f"mcp:oauth:rt:{_sha256(token)}")
        else:
            claims = await self._decode(http, token, verify_exp=False) if token else None
            if claims is not None and claims.get("client_id") == client["client_id"]:
                session = await store.get(_user_key(claims["sid"]))
                if session is not None:
                    revoked = (session.get("revoked", []) + [claims["jti"]])[-100:]
                    await store.set(_user_key(claims["sid"]), {**session, "revoked": revoked},
                                    self.settings.session_ttl)
        await http.respond(200, headers=list(_NO_STORE))  # RFC 7009: 200 whatever the token was

    # -- the protected resource --------------------------------------------------------------------

    async def _decode(self, http: _HttpRequest, token: str, verify_exp: bool = True) -> dict | None:
        jwt = _require("tokens")
        keys = await self.server._keyring()
        candidates = [keys.token_key]
        if self.settings.previous_secret:
            candidates.append(_KeyRing(self.settings.previous_secret).token_key)
        for key in candidates:
            try:
                return jwt.decode(token, key, algorithms=["HS256"], audience=self.oauth.resources(http),
                                  issuer=self.oauth.issuer(http),
                                  options={"require": ["exp", "iat", "sub", "jti", "aud", "iss"],
                                           "verify_exp": verify_exp})
            except jwt.InvalidSignatureError:
                continue
            except jwt.PyJWTError:
                return None
        return None

    def _challenge(self, http: _HttpRequest, error: str | None, description: str, status: int = 401,
                   endpoint: str | None = None) -> _HttpError:
        parts = [f'resource_metadata="{self.oauth.metadata_url(http, endpoint)}"',
                 f'scope="{" ".join(self.settings.scopes)}"']
        if error:
            parts.insert(0, f'error="{error}", error_description="{description}"')
        return _HttpError(status, f"{'Unauthorized' if status == 401 else 'Forbidden'}: {description}",
                          headers=((b"www-authenticate", ("Bearer " + ", ".join(parts)).encode()),))

    async def authenticate(self, http: _HttpRequest, endpoint: str | None = None) -> str | None:
        """The principal of a protected request to ``endpoint``, or a 401/403 challenge."""
        if self.settings.auth == "none":
            return None
        header = http.headers.get("authorization", "")
        if header[:7].lower() != "bearer " or not header[7:].strip():
            raise self._challenge(http, None, "this endpoint needs a bearer token (OAuth 2.1); "
                                  "see the resource metadata for how to get one", endpoint=endpoint)
        token = header[7:].strip()
        if self.settings.auth == "external":
            claims = await self._decode_external(http, token)
            if claims is None:
                raise self._challenge(http, "invalid_token", "the token is invalid, expired or not for this server",
                                      endpoint=endpoint)
            return f"ext:{claims['sub']}"
        claims = await self._decode(http, token)
        if claims is None:
            raise self._challenge(http, "invalid_token", "the token is invalid, expired or not for this server",
                                  endpoint=endpoint)
        session = await self.server._runtime().store.get_refreshed(_user_key(claims["sid"]), self.settings.session_ttl)
        if (session is None or claims["jti"] in session.get("revoked", ())
                or claims.get("gen") != session.get("gen")):
            raise self._challenge(http, "invalid_token", "the token was revoked or its session ended",
                                  endpoint=endpoint)
        granted = set(str(claims.get("scope", "")).split())
        if not set(self.settings.scopes) & granted and self.settings.scopes:
            raise self._challenge(http, "insufficient_scope", "the token lacks the scope this server needs", 403,
                                  endpoint=endpoint)
        return claims["sid"]

    async def _decode_external(self, http: _HttpRequest, token: str) -> dict | None:
        jwt = _require("tokens")
        settings = self.settings
        if not settings.auth_secret:
            _require("jwks")  # (PyJWT needs it for these algorithms: else every token looks invalid)
        try:
            if settings.auth_secret:
                key, algorithms = settings.auth_secret, ["HS256"]
            else:
                if getattr(self, "_jwks", None) is None:
                    # cooldown: a token naming an unknown key id refetches the key set at most
                    # once in that many seconds, so bogus tokens cannot make this server a fetcher
                    self._jwks = jwt.PyJWKClient(settings.auth_jwks_url, cache_keys=True, timeout=5,
                                                 cooldown_duration=30)
                signing = await anyio.to_thread.run_sync(self._jwks.get_signing_key_from_jwt, token,
                                                         abandon_on_cancel=True)
                key, algorithms = signing.key, ["RS256", "ES256", "PS256", "EdDSA"]
            audience = [settings.auth_audience] if settings.auth_audience else self.oauth.resources(http)
            claims = jwt.decode(token, key, algorithms=algorithms, audience=audience,
                                issuer=settings.auth_issuer, options={"require": ["exp", "sub", "aud", "iss"]})
            kind = str(jwt.get_unverified_header(token).get("typ", "JWT")).lower()
        except Exception:
            return None
        # an access token (RFC 9068: at+jwt; many issuers still say JWT), for someone: an empty
        # subject would make every such token one principal, "ext:"
        if kind not in _ACCESS_TOKEN_TYPES or not isinstance(claims.get("sub"), str) or not claims["sub"].strip():
            return None
        return claims


_ACCESS_TOKEN_TYPES = ("jwt", "at+jwt", "application/at+jwt")


def _user_key(sid: str) -> str:
    return f"mcp:{{{_store_id(sid)}}}:user"


def _login_tx_key(tx: str) -> str:
    """A login transaction's key: a hash of its link, which a copy of the store does not give."""
    return f"mcp:login:tx:{_sha256(tx)}"


def _pairing_mac(keys: _KeyRing, tx: str, code: str) -> str:
    """What the store keeps of a pairing code: a MAC under a key that is not in the store (a
    plain hash of 40 bits would be reversed from a copy of it in minutes), bound to its link."""
    return hmac.new(keys.key("pairing"), f"{tx}\n{code}".encode(), hashlib.sha256).hexdigest()


def _credentials_ad(uid: str) -> bytes:
    """The associated data of a user's sealed credentials: the user, and what the value is."""
    return b"mcp_server/v1 credentials " + uid.encode()


# ---- The upstream login flow --------------------------------------------------------------------
#
# Rules:
# - The LLM never sees the user's upstream password, tokens or raw identifiers: the user signs in
#   to the provider in a browser, this server exchanges what the provider sends back (a code, a
#   Kite request_token: ``Provider.exchange``) server-side, keeps the credentials
#   encrypted in the user's record (AES-256-GCM with ENCRYPTION_KEY, the user id as associated
#   data), and masks every login tool's result and error: every scalar under a sensitive key (by
#   pattern, in any spelling and nesting) and identifiers found in any string (``_mask``).
# - A login link opens our own page first, and EVERY browser must enter the pairing code the
#   login tool showed in the user's own client (five tries, counted atomically in the store),
#   in MCP_AUTH=builtin, external and none alike.  No cookie skips it: any cookie this server
#   sets can be planted in a victim's browser (an /authorize approval for the attacker's own
#   client sets one; with MCP_CONSENT=never without a click), and a skip would let an attacker's
#   link attach the victim's account to the attacker's session.  The page tells the user never
#   to enter a code someone else gave them: that is the only way left to misuse a link.
# - A link completes once: the right code takes the transaction.  Every state is single use
#   with a 10-minute life and bound to the browser by a nonce cookie; a browser without the
#   cookie cannot use it up.  Codes, tokens and the /redirect query string never reach a log.
# - Calls that change the account (place_order, cancel_order: UPSTREAM_TRADING) happen only after
#   the user confirmed them in an elicitation form, never for a client that cannot ask, and at
#   most once per confirmation (``_Login.change``).
# - A copy of the store yields nothing usable: transactions are keyed by a hash of the link and
#   keep a MAC of the pairing code under a key from MCP_SECRET; states are sealed (they hold the
#   PKCE verifier); credentials are sealed with ENCRYPTION_KEY, which is never in the store.
#
# Theory of operation: ``login`` stores a transaction ``mcp:login:tx:{hash(tx)}`` (user, pairing-
# code MAC) and returns ``/login/{tx}``.  The right pairing code takes the transaction, stores a
# sealed state ``mcp:login:state:{hash(state)}`` (tx, user, PKCE verifier, browser nonce, OIDC
# nonce), sets the nonce cookie and redirects to ``Provider.authorize_url``.  ``/redirect`` checks
# the cookie, takes the state atomically, has the provider exchange the callback's parameters, and
# writes the sealed credentials into ``mcp:{user}:user``.

_PAIRING_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I
_PAIRING_TRIES = 5

def _http_call(method: str, url: str, *, form: dict | None = None, json_body: dict | None = None,
               headers: dict | None = None, timeout: float = 10.0) -> tuple:
    """One HTTP request from a worker thread, no redirects followed: (status, parsed JSON or None).
    The body is ``form`` (url-encoded) or ``json_body``."""
    import urllib.error
    import urllib.request

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    data, kind = None, {}
    if form is not None:
        data, kind = urllib.parse.urlencode(form).encode(), {"Content-Type": "application/x-www-form-urlencoded"}
    elif json_body is not None:
        data, kind = _dumps(json_body).encode(), {"Content-Type": "application/json"}
    request = urllib.request.Request(url, data=data, method=method, headers={
        "Accept": "application/json", "User-Agent": "mcp_server", **(headers or {}), **kind})
    try:
        response = urllib.request.build_opener(NoRedirect).open(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        response = exc
    body = response.read(1024 * 1024 + 1)
    try:
        parsed = _loads(body) if body and len(body) <= 1024 * 1024 else None
    except ValueError:
        parsed = None
    return response.status, parsed


# ---- Providers: how the login talks to an upstream service -------------------------------------
#
# Rules:
# - A ``Provider`` says only what differs between upstreams: where the browser signs in, how the
#   callback's parameters become credentials, how the API is called with them, refresh and
#   revoke.  Everything the flow guarantees (pairing code, nonce cookie, single-use sealed state,
#   encrypted credentials, masking) stays in ``_Login`` and holds for every provider.
# - The callback names its login transaction with ``state``: OAuth sends it back by itself; Kite
#   Connect has no state parameter, so it travels in ``redirect_params``, which Kite echoes.
# - Documents an upstream names (OIDC discovery, its JWKS) are fetched under the same SSRF rules,
#   deadline and size cap as client metadata documents (``_fetch_json_document``).

_UPSTREAM_BASE: contextvars.ContextVar = contextvars.ContextVar("mcp_upstream_base", default="")
_GENERIC_PATHS = {"profile": "profile", "holdings": "holdings", "positions": "positions", "orders": "orders"}


def _api_url(base: str, path: str, params: dict | None = None) -> str:
    return base.rstrip("/") + "/" + path.lstrip("/") + (("?" + urllib.parse.urlencode(params)) if params else "")


class _NoAnswer(ToolError):
    """The provider could not be reached or its answer was unclear (no answer, 3xx, 5xx, not JSON,
    over 1 MiB): whether a call took effect is unknown."""


class _Refused(ToolError):
    """The provider refused the call (a 4xx answer): it did not take effect."""


class Provider:
    """An upstream service users sign in to, and whose API the login tools call as them.

    Subclass it (or ``OAuth2Provider``) and plug it in with ``server.add_login_tools(provider=...)``.
    The flow around it (pairing code, browser binding, single-use state, encrypted credentials,
    masked results) does not change with the provider.

    - ``authorize_url(login)``: where the browser signs in.  ``login`` holds ``state`` (must come
      back as the callback's ``state_param`` query parameter), ``redirect_uri`` (this server's
      /redirect), ``code_challenge`` (PKCE S256 of ``login["verifier"]``) and ``nonce``.
    - ``callback_error(query)``: why the callback carries no grant (the person cancelled...), or None.
    - ``exchange(query, login)``: the callback's query -> the credentials to keep, a JSON dict
      with ``access_token`` (kept encrypted; never shown to the model).  Raise ``ToolError``
      with a message for the person when the provider refuses.
    - ``request(credentials, method, path, params, body)``: one API call, as a dict with
      ``method``, ``url``, ``headers`` and ``form`` or ``json`` (the body).
    - ``expired(status, answer)``: whether an API answer means the login ended (default: 401).
    - ``refresh(credentials)``: new credentials after such an answer, or None.
    - ``revoke(credentials)``: end the login at the provider (logout); failures are ignored.

    ``paths`` maps the built-in tools (profile, holdings, positions, orders) to API paths;
    ``order_request`` says how place_order and cancel_order call the API."""

    paths: dict = _GENERIC_PATHS
    state_param = "state"  # the callback's query parameter that brings ``login["state"]`` back
    sandbox = False  # the built-in sandbox presets: their endpoints live under this server's /sandbox/
    server = None  # the MCPServer it serves (set by add_login_tools)

    async def authorize_url(self, login: dict) -> str:
        raise NotImplementedError

    def callback_error(self, query: dict) -> str | None:
        if "error" in query or not query.get("code"):
            return query.get("error_description") or query.get("error") or "no code was returned"
        return None

    async def exchange(self, query: dict, login: dict) -> dict:
        raise NotImplementedError

    def request(self, credentials: dict, method: str, path: str, params: dict | None = None,
                body: dict | None = None) -> dict:
        raise NotImplementedError

    def expired(self, status: int, answer) -> bool:
        """Whether an API answer says the credentials no longer work (then: refresh, or log out)."""
        return status == 401

    async def refresh(self, credentials: dict) -> dict | None:
        return None

    async def revoke(self, credentials: dict) -> None:
        return None

    def order_request(self, action: str, details: dict) -> tuple:
        """(method, path, body) for ``place`` (details: symbol, side, quantity, price) or
        ``cancel`` (details: order_id)."""
        if action == "place":
            return "POST", "orders", details
        return "DELETE", "orders/" + urllib.parse.quote(details["order_id"], safe=""), None

    async def fetch(self, method: str, url: str, *, form: dict | None = None, json: dict | None = None,
                    headers: dict | None = None) -> tuple:
        """One HTTP call to the provider from a worker thread: (status, parsed JSON or None)."""
        try:
            return await anyio.to_thread.run_sync(functools.partial(
                _http_call, method, url, form=form, json_body=json, headers=headers), abandon_on_cancel=True)
        except (OSError, TimeoutError, ValueError) as exc:
            raise _NoAnswer(f"The provider did not answer ({type(exc).__name__}).") from None

    def _at(self, url: str) -> str:
        """``url`` with ``{base}`` (this server as the browser sees it) and ``{local}`` (as the server
        reaches itself) filled in: how the sandbox presets name endpoints under /sandbox/."""
        if "{" not in url:
            return url
        base = _UPSTREAM_BASE.get()
        local = (self.server._local_base if self.server is not None else None) or base
        return url.replace("{base}", base).replace("{local}", local)


class OAuth2Provider(Provider):
    """OAuth 2 with the authorization-code grant and PKCE; the API takes a bearer token."""

    def __init__(self, *, authorize_url: str, token_url: str, client_id: str, client_secret: str = "",
                 api_base: str = "", revoke_url: str = "", scopes: str = "", paths: dict | None = None):
        self.authorize_endpoint, self.token_endpoint, self.revoke_endpoint = authorize_url, token_url, revoke_url
        self.client_id, self.client_secret, self.api_base, self.scopes = client_id, client_secret, api_base, scopes
        self.paths = {**_GENERIC_PATHS, **(paths or {})}

    async def authorize_url(self, login: dict) -> str:
        return _with_query(self._at(self.authorize_endpoint), {
            "response_type": "code", "client_id": self.client_id, "redirect_uri": login["redirect_uri"],
            "state": login["state"], "scope": self.scopes or None,
            "code_challenge": login["code_challenge"], "code_challenge_method": "S256"})

    async def exchange(self, query: dict, login: dict) -> dict:
        return self._credentials(await self._token({
            "grant_type": "authorization_code", "code": query["code"], "redirect_uri": login["redirect_uri"],
            "code_verifier": login["verifier"]}))

    def request(self, credentials, method, path, params=None, body=None) -> dict:
        return {"method": method, "url": _api_url(self._at(self.api_base), path, params), "json": body,
                "headers": {"Authorization": f"Bearer {credentials['access_token']}"}}

    async def refresh(self, credentials: dict) -> dict | None:
        if not credentials.get("refresh_token"):
            return None
        try:
            tokens = await self._token({"grant_type": "refresh_token", "refresh_token": credentials["refresh_token"]})
        except ToolError:
            return None
        tokens.setdefault("refresh_token", credentials["refresh_token"])
        return self._credentials(tokens)

    async def revoke(self, credentials: dict) -> None:
        if not self.revoke_endpoint:
            return
        for kind in ("refresh_token", "access_token"):
            if credentials.get(kind):
                await self.fetch("POST", self._at(self.revoke_endpoint), form={
                    "token": credentials[kind], "token_type_hint": kind, "client_id": self.client_id})

    async def _token(self, form: dict) -> dict:
        headers = {}
        form = {**form, "client_id": self.client_id}
        if self.client_secret:
            pair = f"{urllib.parse.quote(self.client_id, safe='')}:{urllib.parse.quote(self.client_secret, safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        status, body = await self.fetch("POST", self._at(self.token_endpoint), form=form, headers=headers)
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
            raise ToolError(f"The provider refused the sign-in (HTTP {status}).")
        return body

    @staticmethod
    def _credentials(tokens: dict) -> dict:
        expires = tokens.get("expires_in")
        return {"access_token": tokens["access_token"], "refresh_token": tokens.get("refresh_token"),
                "expires_at": int(_now()) + int(expires) if isinstance(expires, (int, float)) else None}


class OIDCProvider(OAuth2Provider):
    """OpenID Connect: ``issuer`` alone gives the endpoints (its discovery document); an ID token,
    when the provider sends one, must carry a valid signature from the issuer's JWKS, ``iss``,
    ``aud`` (the client id), ``exp`` and the login's ``nonce``; a callback's ``iss`` must match."""

    def __init__(self, issuer: str, *, client_id: str, client_secret: str = "", scopes: str = "openid",
                 api_base: str = "", paths: dict | None = None, allow_private: bool = False, timeout: float = 5.0):
        super().__init__(authorize_url="", token_url="", client_id=client_id, client_secret=client_secret,
                         api_base=api_base, scopes=scopes, paths=paths)
        self.issuer, self.allow_private, self.timeout = issuer, allow_private, timeout
        self._metadata, self._fresh_until, self._keys = None, 0.0, None

    async def _document(self, url: str, what: str) -> tuple:
        try:
            return await anyio.to_thread.run_sync(functools.partial(
                _fetch_json_document, url, self.allow_private, _CIMD_LIMIT, self.timeout, what),
                abandon_on_cancel=True)
        except (OSError, ValueError) as exc:
            raise ToolError(f"The identity provider's {what} could not be read: {exc}.") from None

    async def discover(self) -> dict:
        """The issuer's discovery document (cached as it says), with the endpoints taken from it."""
        if self._metadata is not None and time.monotonic() < self._fresh_until:
            return self._metadata
        url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
        document, max_age = await self._document(url, "discovery document")
        if not isinstance(document, dict) or document.get("issuer") != self.issuer:
            raise ToolError("The identity provider's discovery document names another issuer than "
                            "UPSTREAM_ISSUER; the login is refused.")
        for name in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            problem = _client_id_url_problem(document.get(name), self.allow_private)
            if problem:
                raise ToolError(f"The identity provider's {name} is unusable: {problem}.")
        self.authorize_endpoint, self.token_endpoint = document["authorization_endpoint"], document["token_endpoint"]
        revoke = document.get("revocation_endpoint")
        self.revoke_endpoint = revoke if _client_id_url_problem(revoke, self.allow_private) is None else ""
        self._metadata, self._fresh_until, self._keys = document, time.monotonic() + max(max_age, 60), None
        return document

    async def authorize_url(self, login: dict) -> str:
        await self.discover()
        return _with_query(await super().authorize_url(login), {"nonce": login["nonce"]})

    async def exchange(self, query: dict, login: dict) -> dict:
        metadata = await self.discover()
        if ("iss" in query or metadata.get("authorization_response_iss_parameter_supported")) and \
                query.get("iss") != self.issuer:  # RFC 9207: an answer from another issuer (mix-up)
            raise ToolError("The sign-in answer names another issuer than UPSTREAM_ISSUER; it was refused.")
        tokens = await self._token({"grant_type": "authorization_code", "code": query["code"],
                                    "redirect_uri": login["redirect_uri"], "code_verifier": login["verifier"]})
        if "id_token" in tokens:
            await self.check_id_token(tokens["id_token"], login["nonce"])
        return self._credentials(tokens)

    async def check_id_token(self, token, nonce: str) -> dict:
        """The ID token's claims, or a ToolError: signed by a key of the issuer's JWKS (fetched
        under the SSRF rules, refetched once for an unknown key id), for this client, unexpired,
        with this login's nonce."""
        jwt = _require("tokens")
        _require("jwks")
        try:
            kid = jwt.get_unverified_header(token).get("kid") if isinstance(token, str) else None
        except jwt.PyJWTError:
            kid = None
        for attempt in (1, 2):
            if self._keys is None or attempt == 2:
                jwks, _ = await self._document((await self.discover())["jwks_uri"], "key set (JWKS)")
                try:
                    self._keys = jwt.PyJWKSet.from_dict(jwks if isinstance(jwks, dict) else {})
                except jwt.PyJWTError:
                    raise ToolError("The identity provider's key set (JWKS) holds no usable key.") from None
            keys = [k for k in self._keys.keys if kid is None or k.key_id == kid]
            if keys:
                break
        try:
            claims = jwt.decode(token, keys[0].key if keys else "", algorithms=["RS256", "ES256", "PS256", "EdDSA"],
                                audience=self.client_id, issuer=self.issuer,
                                options={"require": ["exp", "iat", "iss", "aud", "sub"]})
        except jwt.PyJWTError as exc:
            raise ToolError(f"The identity provider's ID token is not valid ({type(exc).__name__}).") from None
        if not isinstance(claims.get("nonce"), str) or not hmac.compare_digest(claims["nonce"], nonce):
            raise ToolError("The identity provider's ID token is not for this sign-in (nonce).")
        return claims


class KiteProvider(Provider):
    """Zerodha Kite Connect: the browser signs in at ``login_url?v=3&api_key=...``; Kite redirects
    back with ``request_token`` and ``status=success`` (and echoes ``redirect_params``, which carry
    the login's state); the session is ``POST /session/token`` with ``checksum =
    sha256(api_key + request_token + api_secret)``; API calls send ``X-Kite-Version: 3`` and
    ``Authorization: token api_key:access_token``; logout is ``DELETE /session/token``."""

    paths = {"profile": "user/profile", "holdings": "portfolio/holdings", "positions": "portfolio/positions",
             "orders": "orders"}

    def __init__(self, *, api_key: str, api_secret: str, login_url: str = "https://kite.zerodha.com/connect/login",
                 api_base: str = "https://api.kite.trade"):
        self.api_key, self.api_secret, self.login_url, self.api_base = api_key, api_secret, login_url, api_base

    async def authorize_url(self, login: dict) -> str:
        return _with_query(self._at(self.login_url), {
            "v": "3", "api_key": self.api_key, "redirect_params": urllib.parse.urlencode({"state": login["state"]})})

    def expired(self, status: int, answer) -> bool:
        return status == 403 and isinstance(answer, dict) and answer.get("error_type") == "TokenException"

    def callback_error(self, query: dict) -> str | None:
        if query.get("status") != "success" or not query.get("request_token"):
            return query.get("message") or query.get("status") or "no request_token was returned"
        return None

    async def exchange(self, query: dict, login: dict) -> dict:
        token = query["request_token"]
        checksum = hashlib.sha256((self.api_key + token + self.api_secret).encode()).hexdigest()
        status, body = await self.fetch("POST", _api_url(self._at(self.api_base), "session/token"),
                                        form={"api_key": self.api_key, "request_token": token, "checksum": checksum},
                                        headers={"X-Kite-Version": "3"})
        data = body.get("data") if isinstance(body, dict) else None
        if status != 200 or not isinstance(data, dict) or not isinstance(data.get("access_token"), str):
            raise ToolError(f"Kite refused the session (HTTP {status}).")
        return {"access_token": data["access_token"], "expires_at": None}  # (the profile in data is not kept)

    def request(self, credentials, method, path, params=None, body=None) -> dict:
        return {"method": method, "url": _api_url(self._at(self.api_base), path, params), "form": body,
                "headers": {"X-Kite-Version": "3", "Authorization": f"token {self.api_key}:{credentials['access_token']}"}}

    async def revoke(self, credentials: dict) -> None:
        await self.fetch("DELETE", _api_url(self._at(self.api_base), "session/token", {
            "api_key": self.api_key, "access_token": credentials["access_token"]}), headers={"X-Kite-Version": "3"})

    def order_request(self, action: str, details: dict) -> tuple:
        if action == "place":
            form = {"tradingsymbol": details["symbol"], "exchange": "NSE", "transaction_type": details["side"],
                    "quantity": str(details["quantity"]), "product": "CNC", "validity": "DAY",
                    "order_type": "MARKET" if details.get("price") is None else "LIMIT"}
            if details.get("price") is not None:
                form["price"] = str(details["price"])
            return "POST", "orders/regular", form
        return "DELETE", "orders/regular/" + urllib.parse.quote(details["order_id"], safe=""), None


_SANDBOX_KITE_KEY, _SANDBOX_KITE_SECRET = "sandbox-kite-key", "sandbox-kite-secret"  # (public: a demo)


def _provider_from_settings(settings: Settings) -> Provider:
    """The provider UPSTREAM_PROVIDER (or, unset, the other UPSTREAM_* settings) names."""
    kind = settings.upstream_provider or (
        "oidc" if settings.upstream_issuer else "oauth2" if settings.upstream_authorize_url else "sandbox")
    common = {"client_id": settings.upstream_client_id, "client_secret": settings.upstream_client_secret,
              "api_base": settings.upstream_api_base}
    if kind == "oidc":
        return OIDCProvider(settings.upstream_issuer, scopes=settings.upstream_scopes or "openid",
                            allow_private=settings.allow_private_fetch, timeout=settings.client_fetch_timeout, **common)
    if kind == "oauth2":
        return OAuth2Provider(authorize_url=settings.upstream_authorize_url, token_url=settings.upstream_token_url,
                              revoke_url=settings.upstream_revoke_url, scopes=settings.upstream_scopes, **common)
    if kind == "kite":
        return KiteProvider(api_key=settings.upstream_client_id, api_secret=settings.upstream_client_secret,
                            **({"login_url": settings.upstream_authorize_url} if settings.upstream_authorize_url else {}),
                            **({"api_base": settings.upstream_api_base} if settings.upstream_api_base else {}))
    if kind == "sandbox-kite":
        provider = KiteProvider(api_key=_SANDBOX_KITE_KEY, api_secret=_SANDBOX_KITE_SECRET,
                                login_url="{base}/sandbox/kite/connect/login", api_base="{local}/sandbox/kite")
    else:
        provider = OAuth2Provider(authorize_url="{base}/sandbox/authorize", token_url="{local}/sandbox/token",
                                  revoke_url="{local}/sandbox/revoke", api_base="{local}/sandbox/api",
                                  client_id="sandbox-client", client_secret="sandbox-secret", scopes="read")
    provider.sandbox = True
    return provider


class _NotLoggedIn(ToolError):
    def __init__(self, detail: str = ""):
        super().__init__("Not logged in" + (f" ({detail})" if detail else "") +
                         ": call the login tool, open the link it returns, and sign in.")


class _Login:
    """The login flow and the upstream API client of one MCPServer."""

    def __init__(self, server: _ProtocolCore, provider: Provider | None = None):
        self.server = server
        self._vault = None
        self.provider = provider or _provider_from_settings(server.settings)
        self.provider.server = server

    @property
    def settings(self) -> Settings:
        return self.server.settings

    # -- configuration -------------------------------------------------------------------------

    @property
    def sandbox(self) -> bool:
        """Whether the provider is a built-in sandbox preset (its endpoints are served here)."""
        return self.provider.sandbox

    def path(self, name: str) -> str:
        """The provider's API path for a built-in tool's ``name`` (``holdings``...)."""
        return self.provider.paths.get(name, name)

    @staticmethod
    def _bind(base: str | None) -> None:
        """Tell the provider where this server is, for the sandbox presets' endpoints."""
        _UPSTREAM_BASE.set(base or "")

    def vault(self) -> _Vault:
        if self._vault is None:
            settings = self.settings
            if not settings.encryption_key:
                if settings.redis_url:
                    raise RpcError(INTERNAL_ERROR, "ENCRYPTION_KEY is not set: credentials cannot be stored "
                                   "in a shared store without it.", status=503)
                log.warning("ENCRYPTION_KEY is not set: using a key that lives only in this process "
                            "(logins end when it stops)")
            try:
                self._vault = _Vault(settings.encryption_key or None, settings.previous_encryption_keys)
            except ValueError as exc:  # (refused at start-up; a server built in code may skip that)
                raise RpcError(INTERNAL_ERROR, f"The login is misconfigured: {exc}.", status=503) from None
        return self._vault

    # -- the user's record ---------------------------------------------------------------------

    def user_id(self, ctx: Context) -> str:
        if ctx.principal:
            return ctx.principal
        if ctx.session_id and ctx.session_id != _Stdio.SESSION:
            return "session:" + ctx.session_id
        raise ToolError("Logging in needs a signed-in client (OAuth) or an MCP session; this request has neither.")

    async def _user(self, uid: str) -> dict:
        store = self.server._runtime().store
        return await store.get_refreshed(_user_key(uid), self.settings.session_ttl) or {"state": "ANONYMOUS"}

    async def _save_user(self, uid: str, record: dict) -> None:
        await self.server._runtime().store.set(_user_key(uid), record, self.settings.session_ttl)

    async def credentials(self, ctx: Context) -> dict:
        uid = self.user_id(ctx)
        record = await self._user(uid)
        sealed = record.get("cred")
        if record.get("state") != "AUTHENTICATED" or not sealed:
            raise _NotLoggedIn()
        plain = self.vault().decrypt(sealed, _credentials_ad(uid))
        if plain is None:
            raise _NotLoggedIn("the stored login cannot be decrypted with the current ENCRYPTION_KEY")
        return _loads(plain, _STORED_JSON_DEPTH)

    async def _store_credentials(self, uid: str, cred: dict) -> None:
        record = await self.server._runtime().store.get_refreshed(_user_key(uid), self.settings.session_ttl)
        if record is None:
            if ":" not in uid:  # an OAuth session of this server: gone means revoked or expired
                raise ToolError("Your session with this server ended meanwhile; connect your assistant "
                                "again, then log in.")
            record = {"state": "ANONYMOUS"}  # stdio, MCP-session and external identities start here
        if not isinstance(cred, dict) or not isinstance(cred.get("access_token"), str):
            raise ToolError("The provider gave no access token.")
        await self._save_user(uid, {**record, "state": "AUTHENTICATED", "logged_in_at": int(_now()),
                                    "cred": self.vault().encrypt(_dumps(cred), _credentials_ad(uid))})

    # -- the login tool ------------------------------------------------------------------------

    async def start(self, ctx: Context) -> dict:
        uid = self.user_id(ctx)
        base = ctx.base_url or self.server._local_base
        if not base:
            raise ToolError("This server does not know its own address; set MCP_PUBLIC_URL.")
        tx = secrets.token_urlsafe(18)
        code = "".join(secrets.choice(_PAIRING_ALPHABET) for _ in range(8))
        pairing = f"{code[:4]}-{code[4:]}"
        keys = await self.server._keyring()
        await self.server._runtime().store.set(_login_tx_key(tx), {"uid": uid, "pairing": _pairing_mac(keys, tx, code)},
                                           600)
        url = f"{base}/login/{tx}"
        return {"url": url, "pairing_code": pairing, "expires_in": 600}

    # -- pages: /login/<tx> and /redirect -----------------------------------------------------------

    async def page(self, http: _HttpRequest, tx: str) -> None:
        store = self.server._runtime().store
        if await store.get(_login_tx_key(tx)) is None:
            await self._link_gone(http)
        elif http.scope.get("method") == "POST":
            await self._pair(http, tx)
        else:
            await self._pairing_form(http, tx)

    async def _link_gone(self, http: _HttpRequest) -> None:
        await self._page(http, 400, "This sign-in link has expired",
                         "<p class=bad>The link is older than 10 minutes, or was already used.</p>"
                         "<p>Ask your assistant to call <code>login</code> again.</p>")

    async def _pair(self, http: _HttpRequest, tx: str) -> None:
        """The pairing form's answer.  Every try counts atomically in the store before the code is
        compared, so concurrent guesses on any instance get ``_PAIRING_TRIES`` compared in all;
        the right code takes the transaction, so a link completes once, in one browser."""
        oauth = self.server.asgi.oauth
        store = self.server._runtime().store
        fields = _form_fields(await http.read_body(16 * 1024))
        cookie = oauth._cookie(http, "mcp_csrf") or ""
        if not cookie or not hmac.compare_digest(cookie, fields.get("csrf", "")):
            await self._page(http, 400, "This page has expired", "<p class=bad>Reload the sign-in link "
                             "and try again.</p>")
            return
        tries = await store.incr(f"mcp:login:tries:{_sha256(tx)}", 600)
        record = await store.get(_login_tx_key(tx)) if tries <= _PAIRING_TRIES else None
        if record is None and tries <= _PAIRING_TRIES:
            await self._link_gone(http)
            return
        typed = re.sub(r"[^A-Z0-9]", "", fields.get("code", "").upper())
        keys = await self.server._keyring()
        if record is None or not hmac.compare_digest(_pairing_mac(keys, tx, typed), record["pairing"]):
            if tries >= _PAIRING_TRIES:
                await store.delete(_login_tx_key(tx))
                await self._page(http, 400, "Too many wrong codes", "<p class=bad>This sign-in link no "
                                 "longer works.</p><p>Ask your assistant to call <code>login</code> again.</p>")
                return
            await self._pairing_form(http, tx, "That code is not right; check it in your assistant.")
            return
        record = await store.pop(_login_tx_key(tx))
        if record is None:  # another browser paired it a moment ago
            await self._link_gone(http)
            return
        await self._to_provider(http, tx, record)

    async def _pairing_form(self, http: _HttpRequest, tx: str, problem: str = "") -> None:
        import html
        oauth = self.server.asgi.oauth
        csrf = secrets.token_urlsafe(18)
        body = ((f"<p class=bad>{html.escape(problem)}</p>" if problem else "") +
                "<p>To connect your account, enter the pairing code your assistant showed you next to "
                "this link.</p>"
                "<p><b>Never enter a code that someone else gave you</b> (in a message, an e-mail, a call or "
                "on another site): whoever sent it would get your account.</p>"
                f"<form method=post action='{html.escape(oauth.issuer(http))}/login/{html.escape(tx)}'>"
                f"<input type=hidden name=csrf value='{csrf}'>"
                "<p><input name=code autocomplete=off placeholder='ABCD-1234' aria-label='Pairing code' "
                "style='font:inherit;padding:.5rem;width:12rem;letter-spacing:.1em'></p>"
                "<div class=row><button class=primary>Continue</button></div></form>"
                "<p class=muted>If you did not ask your own assistant to log in just now, close this page.</p>")
        await self._page(http, 200, "Enter your pairing code", body,
                         [oauth._set_cookie(http, "mcp_csrf", csrf, 600)])

    async def _to_provider(self, http: _HttpRequest, tx: str, record: dict) -> None:
        oauth = self.server.asgi.oauth
        base = oauth.issuer(http)
        self._bind(base)
        state, nonce = secrets.token_urlsafe(24), secrets.token_urlsafe(18)
        verifier, oidc_nonce = secrets.token_urlsafe(48), secrets.token_urlsafe(18)
        login = {"state": state, "redirect_uri": base + "/redirect", "verifier": verifier, "nonce": oidc_nonce,
                 "code_challenge": _b64url(hashlib.sha256(verifier.encode()).digest())}
        try:
            location = await self.provider.authorize_url(login)
        except ToolError as exc:
            await self._page(http, 502, "Sign-in is not available", f"<p class=bad>{_escape(str(exc))}</p>")
            return
        keys = await self.server._keyring()
        await self.server._runtime().store.set(f"mcp:login:state:{_sha256(state)}", keys.seal({
            "tx": tx, "uid": record["uid"], "verifier": verifier, "nonce": _sha256(nonce),
            "oidc_nonce": oidc_nonce, "redirect_uri": login["redirect_uri"]}, "login"), 600)
        await http.respond(302, headers=[(b"location", location.encode()), *_NO_STORE,
                                         oauth._set_cookie(http, "mcp_login", nonce, 600)])

    async def _redirect_state(self, http: _HttpRequest, query: dict) -> dict | str:
        """The login state ``/redirect`` names, taken (single use) only by the browser holding its
        nonce cookie, so that a stranger who opens the URL cannot use it up; else why not."""
        if not isinstance(query.get(self.provider.state_param), str) or not query[self.provider.state_param]:
            return "expired"
        store = self.server._runtime().store
        key = f"mcp:login:state:{_sha256(query[self.provider.state_param])}"
        sealed = await store.get(key)
        state = (await self.server._keyring()).unseal(sealed, "login") if sealed else None
        if state is None:
            return "expired"
        nonce = self.server.asgi.oauth._cookie(http, "mcp_login") or ""
        if not hmac.compare_digest(_sha256(nonce), state["nonce"]):
            return "browser"
        return state if await store.pop(key) is not None else "expired"

    async def redirect(self, http: _HttpRequest) -> None:
        query = dict(urllib.parse.parse_qsl(http.scope.get("query_string", b"").decode("latin-1")))
        store = self.server._runtime().store
        state = await self._redirect_state(http, query)
        retry = "<p>Ask your assistant to call <code>login</code> again.</p>"
        if state == "expired":
            await self._page(http, 400, "This sign-in has expired",
                             "<p class=bad>The sign-in took longer than 10 minutes or was already completed.</p>" + retry)
            return
        if state == "browser":
            await self._page(http, 400, "Finish in the same browser",
                             "<p class=bad>This sign-in started in another browser.</p>" + retry)
            return
        reason = self.provider.callback_error(query)
        if reason:
            await self._page(http, 400, "Sign-in was not completed",
                             f"<p class=bad>The provider said: {_escape(str(reason)[:200])}.</p>" + retry)
            return
        self._bind(self.server.asgi.oauth.issuer(http))
        login = {"state": query[self.provider.state_param], "redirect_uri": state["redirect_uri"], "verifier": state["verifier"],
                 "nonce": state.get("oidc_nonce", "")}
        try:
            cred = await self.provider.exchange(query, login)
        except ToolError as exc:
            _metrics.inc("mcp_logins_total", outcome="failure")
            await self._page(http, 502, "Sign-in failed", f"<p class=bad>{_escape(str(exc))}</p>" + retry)
            return
        try:
            await self._store_credentials(state["uid"], cred)
        except ToolError as exc:
            _metrics.inc("mcp_logins_total", outcome="failure")
            await self._page(http, 400, "Sign-in not saved", f"<p class=bad>{_escape(str(exc))}</p>")
            return
        _metrics.inc("mcp_logins_total", outcome="success")
        await store.publish(_BUS_CHANNEL, {"kind": "tools"})  # clients refresh what they can do
        log.info("upstream login completed")
        await self._page(http, 200, "You are signed in",
                         "<p class=ok>Your account is connected.</p><p>Go back to your assistant; you can "
                         "close this page.</p>")

    async def _page(self, http: _HttpRequest, status: int, title: str, body: str, extra: list | None = None) -> None:
        await http.respond(status, _html_page(title, body), "text/html; charset=utf-8",
                           list(_HTML_HEADERS) + (extra or []))

    # -- talking to the provider ---------------------------------------------------------------

    async def api(self, ctx: Context, path: str, params: dict | None = None, *, method: str = "GET",
                  body: dict | None = None):
        """Call ``path`` of the provider's API as the signed-in user; after a 401, refresh the
        credentials once (where the provider can) and try again, else forget the login."""
        uid = self.user_id(ctx)
        self._bind(ctx.base_url or self.server._local_base)
        cred = await self.credentials(ctx)
        for attempt in (1, 2):
            call = self.provider.request(cred, method, path, params, body)
            status, answer = await self.provider.fetch(call["method"], call["url"], form=call.get("form"),
                                                       json=call.get("json"), headers=call.get("headers"))
            if self.provider.expired(status, answer):
                cred = await self.provider.refresh(cred) if attempt == 1 else None
                if cred is None:
                    break
                await self._store_credentials(uid, cred)
                continue
            if 400 <= status < 500:
                raise _Refused(f"The provider refused the call to {path} (HTTP {status}).")
            if not 200 <= status < 300:  # a 3xx or 5xx: a gateway may answer so after the call took effect
                raise _NoAnswer(f"The provider answered HTTP {status} for {path}.")
            if answer is None:
                raise _NoAnswer(f"The provider's answer for {path} was not JSON (or over 1 MiB).")
            return answer
        record = await self._user(uid)
        await self._save_user(uid, {k: v for k, v in record.items() if k != "cred"} | {"state": "ANONYMOUS"})
        raise _NotLoggedIn("the provider no longer accepts this login")

    async def logout(self, ctx: Context) -> str:
        uid = self.user_id(ctx)
        record = await self._user(uid)
        if record.get("state") != "AUTHENTICATED":
            return "You were not logged in."
        self._bind(ctx.base_url or self.server._local_base)
        try:
            await self.provider.revoke(await self.credentials(ctx))
        except (ToolError, OSError, TimeoutError):
            pass  # the local logout happens whatever the provider says
        await self._save_user(uid, {k: v for k, v in record.items() if k != "cred"} | {"state": "ANONYMOUS"})
        return "Logged out: the stored credentials are gone."

    # -- calls that change the account ---------------------------------------------------------

    async def change(self, ctx: Context, action: str, details: dict, summary: str) -> dict:
        """Place or cancel an order (``Provider.order_request``) once the user confirmed
        ``summary`` in a form (elicitation), at most once per confirmation: its key is made in
        the first 2026-07-28 round (and comes back sealed in requestState) or, on a session, is
        the request's id and arguments; the outcome (done, declined, unknown) is kept sealed under
        the user's key, so a retry gets the first answer's outcome and the broker is not called
        twice.  Only a definite refusal (a 4xx, or the login ended) frees the confirmation; an
        unclear answer (no answer, 3xx, 5xx, not JSON, any error) leaves the outcome unknown."""
        uid = self.user_id(ctx)
        await self.credentials(ctx)  # not logged in: say so before asking anything
        if not ctx.supports("elicitation.form"):
            raise ToolError(f"Nothing was done: to {summary}, this server must ask you to confirm, and this "
                            "client cannot ask (it needs MCP elicitation in form mode, revision 2025-06-18 "
                            "or later). Use a client that supports elicitation.")
        if ctx.modern:
            key = ctx.round_state.setdefault("confirmation", secrets.token_urlsafe(18))
        else:
            key = f"{ctx.session_id}|{ctx.request_id!r}|{ctx.params.get('name')}|" \
                  f"{_args_digest(ctx.params.get('arguments') or {})}"
        runtime = self.server._runtime()
        store, slot = runtime.store, f"mcp:{{{_store_id(uid)}}}:change:{_sha256(key)}"
        if (done := await runtime.get_sealed(slot)) is not None:
            return self._replayed(done)
        answer = await ctx.elicit(f"Please confirm: {summary}. This changes your account at the provider.", {
            "type": "object", "required": ["confirm"], "properties": {"confirm": {
                "type": "boolean", "title": "Yes, " + summary, "description": "Leave unticked to do nothing."}}},
            key="confirm", asked_only=True)
        content = answer.get("content") if isinstance(answer, dict) else None
        confirmed = answer.get("action") == "accept" and isinstance(content, dict) and content.get("confirm") is True
        if not await store.add(slot, {"status": "pending"}, 86400):  # one answer per confirmation
            return self._replayed(await runtime.get_sealed(slot) or {"status": "pending"})
        if not confirmed:  # kept: the same requestState with an "accept" must not turn this into a yes
            await runtime.set_sealed(slot, {"status": "declined"}, 86400)
            return {"done": False, "message": f"Nothing was done: you did not confirm ({summary})."}
        method, path, body = self.provider.order_request(action, details)
        try:
            result = await self.api(ctx, path, method=method, body=body)
        except (_Refused, _NotLoggedIn):
            await store.delete(slot)  # refused: nothing happened, a new confirmation may try again
            raise
        except Exception as exc:  # it may have happened: never again blindly
            await runtime.set_sealed(slot, {"status": "unknown"}, 86400)
            reason = str(exc) if isinstance(exc, ToolError) else type(exc).__name__
            raise ToolError(f"{reason} Whether the provider did it ({summary}) is unknown: check your orders "
                            "before asking again; this confirmation will not be sent again.") from None
        await runtime.set_sealed(slot, {"status": "done", "result": result}, 86400)
        return {"done": True, "message": f"Done: {summary}.", "result": result}

    @staticmethod
    def _replayed(outcome: dict) -> dict:
        if outcome.get("status") == "done":
            return {"done": True, "replayed": True, "message": "Already done for this confirmation (not repeated).",
                    "result": outcome.get("result")}
        if outcome.get("status") == "declined":
            return {"done": False, "replayed": True, "message": "Nothing was done: this confirmation was "
                    "declined, and an answer counts once. Ask again to be asked again."}
        raise ToolError("This confirmed request was already sent and its outcome is unknown; check your "
                        "orders before asking again.")


def _escape(text: str) -> str:
    import html
    return html.escape(text)


def _service_path(path: str, allowed: typing.Iterable) -> str:
    """A relative API path the ``service`` tool may call, or a ToolError that says why not."""
    clean = (path or "").strip().lstrip("/")
    if (not clean or ".." in clean.split("/") or "//" in clean or "\\" in clean or ":" in clean
            or not re.fullmatch(r"[A-Za-z0-9_./-]+", clean)):
        raise ToolError(f"{path!r} is not an API path: use letters, digits, / _ - . only.")
    for prefix in allowed:
        prefix = prefix.strip("/")
        if clean == prefix or clean.startswith(prefix + "/"):
            return clean
    raise ToolError(f"{path!r} is not one of the allowed API paths: {', '.join(allowed)}.")


# ---- The sandbox provider -------------------------------------------------------------------------
#
# A demo broker under /sandbox/, used when no UPSTREAM_* provider is configured, so the whole login
# flow runs on a fresh machine: as an OAuth 2 provider (/sandbox/authorize, token, revoke, api/)
# and, for UPSTREAM_PROVIDER=sandbox-kite, speaking Kite Connect (/sandbox/kite/...).  Its data is
# fixed and fictitious (listed in docs/login.md), except the orders placed in it (kept a day in the
# store), and every page says it is a sandbox.

_SANDBOX_USERS = {
    "asha": {"profile": {"user_id": "AB1234", "name": "Asha Rao (sandbox)", "email": "asha.rao@example.com",
                         "phone": "+91-98765-43210", "pan": "ABCPR1234K", "account_id": "ACC-00012345",
                         "bank_account": "001234567890", "broker": "Sandbox Securities"},
             "holdings": [{"symbol": "INFY", "quantity": 40, "average_price": 1450.5, "last_price": 1532.25,
                           "demat_id": "IN30012345678901"},
                          {"symbol": "TCS", "quantity": 12, "average_price": 3380.0, "last_price": 3512.4,
                           "demat_id": "IN30012345678901"}],
             "positions": [{"symbol": "NIFTY26DECFUT", "quantity": 75, "average_price": 24110.0, "pnl": 1875.0}],
             "orders": [{"order_id": "SBX-1001", "symbol": "INFY", "side": "BUY", "quantity": 10,
                         "price": 1525.0, "status": "COMPLETE", "account_id": "ACC-00012345"},
                        {"order_id": "SBX-1002", "symbol": "HDFCBANK", "side": "SELL", "quantity": 5,
                         "price": 1710.5, "status": "OPEN", "account_id": "ACC-00012345"}]},
    "ben": {"profile": {"user_id": "CD5678", "name": "Ben Okafor (sandbox)", "email": "ben.okafor@example.com",
                        "phone": "+44-7700-900123", "pan": "BQKPO5678M", "account_id": "ACC-00067890",
                        "bank_account": "009876543210", "broker": "Sandbox Securities"},
            "holdings": [{"symbol": "RELIANCE", "quantity": 25, "average_price": 2810.0, "last_price": 2950.75,
                          "demat_id": "IN30098765432109"}],
            "positions": [],
            "orders": [{"order_id": "SBX-2001", "symbol": "RELIANCE", "side": "BUY", "quantity": 25,
                        "price": 2805.0, "status": "COMPLETE", "account_id": "ACC-00067890"}]},
}


class _Sandbox:
    """The sandbox provider's endpoints: authorize (a page), token, revoke, and the demo API."""

    def __init__(self, server: _ProtocolCore):
        self.server = server

    async def handle(self, http: _HttpRequest, path: str) -> None:
        method = http.scope.get("method")
        if method == "POST":  # each sign-in and token call stores something: anyone's to make
            await self.server.asgi.oauth._rate_limit(http, "sandbox")
        if path == "/sandbox/authorize":
            await (self._sign_in(http) if method == "POST" else self._authorize_page(http))
        elif path == "/sandbox/token" and method == "POST":
            await self._token(http)
        elif path == "/sandbox/revoke" and method == "POST":
            fields = _form_fields(await http.read_body(16 * 1024))
            store = self.server._runtime().store
            for prefix in ("mcp:sandbox:at:", "mcp:sandbox:rt:"):
                await store.delete(prefix + _sha256(fields.get("token", "")))
            await http.respond(200)
        elif path.startswith("/sandbox/api/"):
            header = http.headers.get("authorization", "")
            await self._api(http, method, path[len("/sandbox/api/"):],
                            header[7:] if header.lower().startswith("bearer ") else None)
        elif path.startswith("/sandbox/kite/"):
            await self._kite(http, method, path[len("/sandbox/kite/"):])
        else:
            raise _HttpError(404, f"Not Found: {path} (sandbox).")

    async def _authorize_page(self, http: _HttpRequest) -> None:
        """The sign-in page.  What the sign-in will do (client, redirect URI, state, PKCE) is
        sealed here into the form, so the POST redirects only where this GET was asked to."""
        import html
        query = dict(urllib.parse.parse_qsl(http.scope.get("query_string", b"").decode("latin-1")))
        problem = None
        if not query.get("state") or not re.fullmatch(r"[A-Za-z0-9_-]{43}", query.get("code_challenge") or ""):
            problem = "The sandbox authorize page needs state and a PKCE S256 code_challenge."
        elif query.get("client_id") != "sandbox-client":
            problem = "The sandbox knows one client: sandbox-client."
        elif not _redirect_uri_allowed(query.get("redirect_uri")):
            problem = "The sandbox redirects only to an https or loopback http redirect_uri."
        if problem:
            await http.respond(400, _html_page("Sandbox Securities - sign in", f"<p class=bad>{html.escape(problem)}</p>"),
                               "text/html; charset=utf-8", list(_HTML_HEADERS))
            return
        keys = await self.server._keyring()
        sealed = keys.seal({"kind": "sandbox", "exp": int(_now()) + 600,
                            **{k: query[k] for k in ("redirect_uri", "state", "code_challenge", "client_id")}}, "consent")
        await self._sign_in_page(http, "Sandbox Securities - sign in", sealed, query["redirect_uri"])

    async def _sign_in_page(self, http: _HttpRequest, title: str, sealed: str, redirect_uri: str) -> None:
        import html
        options = "".join(f"<option value='{name}'>{html.escape(user['profile']['name'])}</option>"
                          for name, user in _SANDBOX_USERS.items())
        body = ("<p class=muted><b>SANDBOX</b> - a demo provider with made-up accounts; nothing here is real.</p>"
                f"<p class=muted>Signing in sends you back to <code>{html.escape(_redirect_target(redirect_uri))}"
                "</code>.</p><form method=post><p><label>Demo user <select name=user>" + options + "</select></label></p>"
                f"<input type=hidden name=request value='{html.escape(sealed)}'>"
                "<div class=row><button class=primary>Sign in</button></div></form>")
        await http.respond(200, _html_page(title, body), "text/html; charset=utf-8", list(_HTML_HEADERS))

    async def _signed_in(self, http: _HttpRequest, kind: str) -> tuple:
        """(the sealed request, the demo user) of a sign-in form of ``kind`` posted back."""
        fields = _form_fields(await http.read_body(16 * 1024))
        request = (await self.server._keyring()).unseal(fields.get("request", ""), "consent")
        if request is None or request.get("kind") != kind or request.get("exp", 0) < _now():
            raise _HttpError(400, "This sign-in form is stale or was not made by the sandbox; start again.")
        if fields.get("user") not in _SANDBOX_USERS:
            raise _HttpError(400, "Choose one of the demo users.")
        return request, fields["user"]

    async def _sign_in(self, http: _HttpRequest) -> None:
        request, user = await self._signed_in(http, "sandbox")
        code = secrets.token_urlsafe(24)
        await self.server._runtime().store.set(f"mcp:sandbox:code:{_sha256(code)}", {
            "user": user, "challenge": request["code_challenge"], "client_id": request["client_id"],
            "redirect_uri": request["redirect_uri"]}, 300)
        location = _with_query(request["redirect_uri"], {"code": code, "state": request["state"]})
        await http.respond(302, headers=[(b"location", location.encode()), *_NO_STORE])

    async def _token(self, http: _HttpRequest) -> None:
        fields = _form_fields(await http.read_body(16 * 1024))
        store = self.server._runtime().store
        user = None
        if fields.get("grant_type") == "authorization_code":
            grant = await store.pop(f"mcp:sandbox:code:{_sha256(fields.get('code', ''))}")
            verifier = fields.get("code_verifier", "")
            if (grant and grant["challenge"] and grant["redirect_uri"] == fields.get("redirect_uri")
                    and grant.get("client_id") == fields.get("client_id")
                    and _b64url(hashlib.sha256(verifier.encode()).digest()) == grant["challenge"]):
                user = grant["user"]
        elif fields.get("grant_type") == "refresh_token":
            user = await store.get(f"mcp:sandbox:rt:{_sha256(fields.get('refresh_token', ''))}")
        if user is None:
            await http.respond_json(400, {"error": "invalid_grant"}, headers=list(_NO_STORE))
            return
        access, refresh = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        await store.set(f"mcp:sandbox:at:{_sha256(access)}", user, 3600)
        await store.set(f"mcp:sandbox:rt:{_sha256(refresh)}", user, 86400)
        await http.respond_json(200, {"access_token": access, "refresh_token": refresh, "token_type": "Bearer",
                                      "expires_in": 3600}, headers=list(_NO_STORE))

    async def _api(self, http: _HttpRequest, method: str, resource: str, token: str | None, kite: bool = False) -> None:
        """The demo API: GET a resource, POST orders (place), DELETE orders/{id} (cancel).  The
        generic API takes JSON bodies and answers 401 to a bad token; the Kite one takes forms and
        answers 403 TokenException, as Kite does."""
        store = self.server._runtime().store
        user = await store.get(f"mcp:sandbox:at:{_sha256(token)}") if token else None
        if user is None:
            await http.respond_json(403 if kite else 401, {"status": "error", "error_type": "TokenException",
                                                          "message": "Incorrect api_key or access_token."}
                                    if kite else {"error": "invalid_token"})
            return
        resource = resource.strip("/")
        orders = "orders/regular" if kite else "orders"
        if method == "POST" and resource == orders:
            raw = await http.read_body(16 * 1024)
            try:
                order = _form_fields(raw) if kite else _loads(raw or b"{}")
            except ValueError:
                raise _HttpError(400, "The order is not valid JSON.") from None
            data = await self._place(user, order, kite)
        elif method == "DELETE" and resource.startswith(orders + "/"):
            data = await self._cancel(user, resource[len(orders) + 1:])
        elif method == "GET":
            names = {"user/profile": "profile", "portfolio/holdings": "holdings",
                     "portfolio/positions": "positions"} if kite else {}
            name = names.get(resource, resource)
            data = await self._orders(user) if name == "orders" else _SANDBOX_USERS[user].get(name)
            if data is None or (kite and resource not in (*names, "orders")):
                raise _HttpError(404, f"The sandbox API has no {resource!r}.")
        else:
            raise _HttpError(405, f"The sandbox API does not take {method} {resource!r}.")
        await http.respond_json(200, {"status": "success", "sandbox": True, "data": data})

    async def _orders(self, user: str) -> list:
        return await self.server._runtime().store.get(f"mcp:sandbox:orders:{user}") or _SANDBOX_USERS[user]["orders"]

    async def _place(self, user: str, order, kite: bool) -> dict:
        if kite and isinstance(order, dict):
            order = {"symbol": order.get("tradingsymbol"), "side": order.get("transaction_type"),
                     "quantity": order.get("quantity"), "price": order.get("price")}
        try:
            side, symbol, quantity = order["side"], str(order["symbol"]), int(order["quantity"])
            price = None if order.get("price") in (None, "") else float(order["price"])
        except (KeyError, TypeError, ValueError):
            raise _HttpError(400, "An order needs symbol, side, quantity (and price for a limit order).") from None
        if side not in ("BUY", "SELL") or quantity <= 0:
            raise _HttpError(400, "side must be BUY or SELL and quantity positive.")
        placed = {"order_id": "SBX-" + secrets.token_hex(4).upper(), "symbol": symbol, "side": side,
                  "quantity": quantity, "price": price, "status": "OPEN"}
        orders = await self._orders(user)
        await self.server._runtime().store.set(f"mcp:sandbox:orders:{user}", [*orders, placed], 86400)
        return {"order_id": placed["order_id"]}

    async def _cancel(self, user: str, order_id: str) -> dict:
        orders = await self._orders(user)
        if not any(o["order_id"] == order_id and o["status"] == "OPEN" for o in orders):
            raise _HttpError(400, f"No open order {order_id!r} to cancel.")
        await self.server._runtime().store.set(f"mcp:sandbox:orders:{user}", [
            {**o, "status": "CANCELLED"} if o["order_id"] == order_id else o for o in orders], 86400)
        return {"order_id": order_id}

    # -- the sandbox speaking Kite Connect -----------------------------------------------------------

    async def _kite(self, http: _HttpRequest, method: str, path: str) -> None:
        if path == "connect/login":
            await (self._kite_sign_in(http) if method == "POST" else self._kite_login_page(http))
        elif path == "session/token" and method == "POST":
            await self._kite_session(http)
        elif path == "session/token" and method == "DELETE":
            query = dict(urllib.parse.parse_qsl(http.scope.get("query_string", b"").decode("latin-1")))
            await self.server._runtime().store.delete(f"mcp:sandbox:at:{_sha256(query.get('access_token', ''))}")
            await http.respond_json(200, {"status": "success", "data": True})
        else:
            header = http.headers.get("authorization", "")
            key, _, token = header[6:].partition(":") if header.startswith("token ") else ("", "", "")
            if http.headers.get("x-kite-version") != "3":
                await http.respond_json(400, {"status": "error", "error_type": "InputException",
                                              "message": "X-Kite-Version: 3 is required."})
                return
            await self._api(http, method, path, token if key == _SANDBOX_KITE_KEY else None, kite=True)

    async def _kite_login_page(self, http: _HttpRequest) -> None:
        query = dict(urllib.parse.parse_qsl(http.scope.get("query_string", b"").decode("latin-1")))
        if query.get("api_key") != _SANDBOX_KITE_KEY or query.get("v") != "3":
            raise _HttpError(400, f"The sandbox Kite login needs v=3 and api_key={_SANDBOX_KITE_KEY}.")
        sealed = (await self.server._keyring()).seal({"kind": "sandbox-kite", "exp": int(_now()) + 600,
                                                      "redirect_params": query.get("redirect_params", "")}, "consent")
        await self._sign_in_page(http, "Kite (sandbox) - login", sealed,
                                 self.server.asgi.oauth.issuer(http) + "/redirect")

    async def _kite_sign_in(self, http: _HttpRequest) -> None:
        """Kite sends the browser to the app's registered redirect URL (here: this server's
        /redirect) with a request_token and the app's redirect_params."""
        request, user = await self._signed_in(http, "sandbox-kite")
        token = secrets.token_urlsafe(24)
        await self.server._runtime().store.set(f"mcp:sandbox:kite-rt:{_sha256(token)}", user, 300)
        extra = dict(urllib.parse.parse_qsl(request["redirect_params"]))
        location = _with_query(self.server.asgi.oauth.issuer(http) + "/redirect", {
            **extra, "action": "login", "type": "login", "status": "success", "request_token": token})
        await http.respond(302, headers=[(b"location", location.encode()), *_NO_STORE])

    async def _kite_session(self, http: _HttpRequest) -> None:
        fields = _form_fields(await http.read_body(16 * 1024))
        token = fields.get("request_token", "")
        expected = hashlib.sha256((_SANDBOX_KITE_KEY + token + _SANDBOX_KITE_SECRET).encode()).hexdigest()
        store = self.server._runtime().store
        user = None
        if fields.get("api_key") == _SANDBOX_KITE_KEY and hmac.compare_digest(fields.get("checksum", ""), expected):
            user = await store.pop(f"mcp:sandbox:kite-rt:{_sha256(token)}")
        if user is None:
            await http.respond_json(403, {"status": "error", "error_type": "TokenException",
                                          "message": "Token is invalid or has expired."})
            return
        access = secrets.token_urlsafe(24)
        await store.set(f"mcp:sandbox:at:{_sha256(access)}", user, 3600)
        profile = _SANDBOX_USERS[user]["profile"]
        await http.respond_json(200, {"status": "success", "data": {
            "user_id": profile["user_id"], "user_name": profile["name"], "email": profile["email"],
            "api_key": _SANDBOX_KITE_KEY, "access_token": access, "public_token": secrets.token_hex(16),
            "login_time": time.strftime("%Y-%m-%d %H:%M:%S")}})


# ==== 8. ASGI app ===============================================================================
#
# Rules:
# - ``_App`` is a raw ASGI 3 callable: ``http`` and ``lifespan`` scopes.  It works under the
#   bundled server, uvicorn or hypercorn, mounted under a prefix (``root_path``) or not, and with
#   or without lifespan events (the runtime starts on first use).
# - Every request passes Origin and Host validation first (DNS-rebinding protection): a browser
#   Origin must be loopback or allow-listed (``Origin: null`` is foreign); on a loopback bind (or
#   any bind, once MCP_ALLOWED_HOSTS is set) the Host must be loopback or allow-listed.  A form
#   POST to the authorization server's browser pages must come from their own origin (no
#   allow-list, no loopback, no null: section 7).  The 403 names the header and the setting to
#   change.  A Host that is not one RFC 3986 host[:port] (two Host headers arrive joined: not
#   one) is 400, so the Host the metadata names is sound.
# - A POST body is JSON only if declared ``application/json`` (415 otherwise, as the official
#   SDK answers): a browser's cross-site "simple" request cannot declare it.
# - Errors before a response started become a JSON body with the right status; after it started,
#   the stream simply ends.

_CORS_ALLOW_HEADERS = (b"content-type, accept, authorization, mcp-session-id, mcp-protocol-version, "
                       b"mcp-method, mcp-name, last-event-id, x-request-id")


@functools.lru_cache(maxsize=4096)
def _is_loopback(host: str | None) -> bool:
    """``localhost`` (and its subdomains) or a loopback IP literal; ``127.0.0.1.evil.example`` is not."""
    import ipaddress
    if not host:
        return False
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@functools.lru_cache(maxsize=1024)
def _host_allowed(value: str, bound, allowed: tuple) -> bool:
    """A Host header on a server bound to ``bound``, given MCP_ALLOWED_HOSTS."""
    if "*" in allowed:
        return True
    if not allowed and not _is_loopback(str(bound)):
        return True  # DNS-rebinding protection guards loopback binds unless hosts are listed
    name = _split_host(value).lower()
    return value in allowed or name in allowed or _is_loopback(name)


# RFC 3986 host[:port]: a reg-name (here only its unreserved characters: no percent-escapes or
# sub-delimiters, which no real host name has and which the issuer URL would carry into pages),
# an IPv4 address (a reg-name too), or a bracketed IPv6 address; an optional port of digits.
_HOST_RE = re.compile(r"(?:[A-Za-z0-9._~-]{1,253}|\[([0-9A-Fa-f:.]{2,45})\])(?::[0-9]{1,5})?")


@functools.lru_cache(maxsize=1024)
def _valid_host(value: str) -> bool:
    """A Host header value as RFC 3986 allows it (see ``_HOST_RE``); ``127.0.0.1:7101@evil.com``,
    paths, spaces and two values joined by a comma are not."""
    import ipaddress
    match = _HOST_RE.fullmatch(value)
    if match is None:
        return False
    if match.group(1) is not None:
        try:
            ipaddress.IPv6Address(match.group(1))
        except ValueError:
            return False
    port = value.rpartition(":")[2] if not value.endswith("]") and ":" in value else None
    return port is None or int(port) <= 65535


@functools.lru_cache(maxsize=1024)
def _split_host(value: str) -> str:
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


# An Origin header is a serialized origin: scheme, host and port, nothing else (RFC 6454 6.2).
_ORIGIN = re.compile(r"https?://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::([0-9]{1,5}))?")


def _is_loopback_origin(origin: str) -> bool:
    """A well-formed http(s) origin on a loopback host.  Read by a pattern, not ``urlsplit``: that
    finds 127.0.0.1 in ``http://evil.example@127.0.0.1`` and ``http://127.0.0.1:1.evil``."""
    match = _ORIGIN.fullmatch(origin)
    return (match is not None and int(match.group(2) or 0) <= 65535
            and _is_loopback(match.group(1).strip("[]")))


class _App:
    """The ASGI application behind ``MCPServer.asgi``."""

    def __init__(self, server: _ProtocolCore):
        self.server = server
        self.oauth = _OAuth(server)
        self.streamable = _StreamableHTTP(server)
        self.legacy_sse = _LegacySSE(server)
        self.direct = _DirectJSON(server)

    async def __call__(self, scope, receive, send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        else:
            raise RuntimeError(f"mcp_server: unsupported ASGI scope type {kind!r}")

    def _spawn(self, coroutine) -> _Job:
        return self.server._runtime().spawn(coroutine)

    async def _lifespan(self, receive, send) -> None:
        """Startup readies the runtime, whose background work then runs in this task's task group
        until shutdown (the only place it can run on trio)."""
        message = await receive()
        if message["type"] != "lifespan.startup":
            return
        try:
            runtime = self.server._runtime()
        except Exception as exc:  # (a store that cannot be made: a missing package)
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            return
        async with runtime.background.serving():
            try:
                await self.server._started_runtime()
            except Exception as exc:
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
            await send({"type": "lifespan.startup.complete"})
            while (await receive())["type"] != "lifespan.shutdown":
                pass
            await _shutdown(self.server)
        await send({"type": "lifespan.shutdown.complete"})

    def _check_origin(self, http: _HttpRequest, path: str) -> list:
        """CORS headers for an allowed Origin; raises 403 for a foreign one.  The browser pages of
        the authorization server also accept their own origin, and a form posted to them only
        their own origin (never ``null``, nor another allowed or loopback origin)."""
        origin = http.headers.get("origin")
        if origin is None:
            return []
        allowed = self.server.settings.allowed_origins
        own = path.startswith(_OAUTH_BROWSER_PATHS) and origin == self.oauth.origin(http)
        if path.startswith(_OAUTH_BROWSER_PATHS) and http.scope.get("method") == "POST":
            ok = own
        else:
            ok = own or "*" in allowed or origin in allowed or _is_loopback_origin(origin)
        if not ok:
            raise _HttpError(403, f"Forbidden: the Origin {origin!r} is not allowed; add it to "
                             "MCP_ALLOWED_ORIGINS (--allowed-origins) to allow it.")
        return [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin"),
                (b"access-control-expose-headers", b"mcp-session-id, mcp-protocol-version, www-authenticate")]

    async def _rate_limit(self, http: _HttpRequest) -> None:
        """MCP_RATE_LIMIT requests a minute per client IP and per session, counted in the store
        (so the limit holds across instances); past it, 429 with Retry-After."""
        limit, store = self.server.settings.rate_limit, self.server._runtime().store
        window = int(_now() // 60)
        keys = [f"mcp:rate:ip:{http.client_address() or '-'}:{window}"]
        if http.headers.get("mcp-session-id"):
            keys.append(f"mcp:rate:session:{_hash_id(http.headers['mcp-session-id'])}:{window}")
        for key in keys:
            if await store.incr(key, 60) > limit:
                _metrics.inc("mcp_rate_limited_total", kind=key.split(":")[2])
                raise _HttpError(429, f"Too many requests: the limit is {limit} a minute; retry shortly.",
                                 headers=((b"retry-after", str(60 - int(_now()) % 60).encode()),))

    def _apply_forwarded(self, http: _HttpRequest) -> None:
        """Believe ``X-Forwarded-For/-Proto/-Host`` only from a configured proxy (MCP_TRUSTED_PROXIES).
        The last X-Forwarded-For hop (the one the proxy added) counts only if it is an IP address:
        anything else would become the per-address rate-limit key, one a client could vary."""
        trusted = self.server.settings.trusted_proxies
        client = http.scope.get("client")
        if not trusted or not client or (client[0] not in trusted and "*" not in trusted):
            return
        headers, scope = http.headers, dict(http.scope)
        if headers.get("x-forwarded-for"):
            import ipaddress
            hop = headers["x-forwarded-for"].split(",")[-1].strip()
            try:
                scope["client"] = (str(ipaddress.ip_address(hop)), 0)
            except ValueError:
                pass  # not an address: keep the proxy's own
        if headers.get("x-forwarded-proto") in ("http", "https"):
            scope["scheme"] = headers["x-forwarded-proto"]
        if headers.get("x-forwarded-host"):
            headers["host"] = headers["x-forwarded-host"].split(",")[-1].strip()
        http.scope = scope

    def _check_host(self, http: _HttpRequest) -> None:
        """400 for a malformed Host (two Host headers arrive joined by a comma: malformed too), as
        RFC 9112 section 3.2 requires: the Host names this server in the metadata it serves;
        then DNS-rebinding protection."""
        value = http.headers.get("host")
        if value is not None and not _valid_host(value):
            raise _HttpError(400, "Bad Request: the Host header must be one host[:port] (RFC 3986), "
                             f"not {value[:100]!r}.")
        value = value or ""
        bound = (http.scope.get("server") or (self.server.settings.host,))[0]
        allowed = self.server.settings.allowed_hosts
        if not _host_allowed(value, bound, allowed if type(allowed) is tuple else tuple(allowed)):
            raise _HttpError(403, f"Forbidden: the Host {value!r} is not allowed; add it to "
                             "MCP_ALLOWED_HOSTS (--allowed-hosts) to allow it.")

    def serve_exchange(self, scope: dict, headers: dict, exchange) -> typing.Awaitable:
        """The bundled server's entry: the same as ASGI's, over its own exchange (``_BundledExchange``)."""
        return self._handle(_HttpRequest(scope, headers, exchange))

    async def _http(self, scope, receive, send) -> None:
        await self._handle(_HttpRequest(scope, _asgi_headers(scope), _AsgiExchange(scope, receive, send, self._spawn)))

    async def _handle(self, http: _HttpRequest) -> None:
        scope, server = http.scope, self.server
        settings = server.settings
        # (0.0: no access log line; nor when the log level leaves it out)
        started = time.perf_counter() if settings.access_log and log.isEnabledFor(logging.INFO) else 0.0
        root = scope.get("root_path", "")
        path = scope.get("path", "/")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        method = scope.get("method", "GET")
        request_header = self._identify(http)
        try:
            if server._live_runtime is None or not server._live_runtime.started:
                await server._started_runtime()
            if _telemetry.on:  # (the trace context of the HTTP request, for the MCP server span)
                _telemetry.http_headers.set(http.headers)
            self._check_host(http)
            if "origin" in http.headers:
                http.extra_headers = self._check_origin(http, path) + request_header
            if method == "OPTIONS":
                await http.respond(204, headers=[
                    (b"access-control-allow-methods", b"GET, POST, DELETE, OPTIONS"),
                    (b"access-control-allow-headers", http.headers.get(
                        "access-control-request-headers", "").encode("latin-1") or _CORS_ALLOW_HEADERS),
                    (b"access-control-max-age", b"86400")])
                return
            # A handler may end by returning the coroutine to run next (a tail call): a long-lived
            # stream then waits without the frames of _route and the handler above it.
            step = await self._route(http, path, method, root)
            while step is not None:
                step = await step
        except _REQUEST_ERRORS as exc:
            await self._failed(http, exc, method, path)
        finally:
            http.stop_watching()
            if _metrics.on or started:
                route = _route_label(path, settings.mcp_path)
                if _metrics.on:
                    _metrics.add(_http_metric_key(route, method, http.status))
                if started:  # (_ACCESS_FIELDS)
                    _log_access((method, route, http.status, round((time.perf_counter() - started) * 1000, 2),
                                 _hash_id(http.headers.get("mcp-session-id")), (http.scope.get("client") or ("-",))[0]))

    def _identify(self, http: _HttpRequest) -> list:
        """The request's id (the client's X-Request-Id if sane) and trace id in the log context,
        the proxy's view applied, this listener's own base URL noted; the X-Request-Id header
        every response carries."""
        headers, scope, server = http.headers, http.scope, self.server
        request_id = headers.get("x-request-id")
        if request_id is None or not _REQUEST_ID_RE.fullmatch(request_id):
            request_id = _next_request_id()
        _request_id.set(request_id)
        traceparent = headers.get("traceparent")
        if traceparent is not None:
            traceparent = _TRACEPARENT_RE.fullmatch(traceparent)
            _trace_id.set(traceparent.group(1) if traceparent else None)
        elif _trace_id.get() is not None:
            _trace_id.set(None)
        request_header = [(b"x-request-id", request_id.encode())]
        http.extra_headers = request_header
        if server.settings.trusted_proxies:
            self._apply_forwarded(http)
        if server._local_base is None and scope.get("server"):
            host, port = scope["server"][:2]
            host = "127.0.0.1" if host in ("0.0.0.0", "", None) else ("[::1]" if host == "::" else host)
            server._local_base = f"http://{'[' + host + ']' if ':' in host and not host.startswith('[') else host}:{port}"
        return request_header

    async def _failed(self, http: _HttpRequest, exc: BaseException, method: str, path: str) -> None:
        """What a request that raised gets: its error as JSON with the right status, or, once its
        response started, the end of it."""
        if http.started:
            if not isinstance(exc, (_HttpError, _OAuthError, RpcError, _Cancelled)):
                log.error("unhandled error on %s %s (error id %s)", method, path, _error_id(), exc_info=exc)
            await http.end()
        elif isinstance(exc, _HttpError):
            await http.respond_json(exc.status, _error_body(exc, exc.request_id), headers=list(exc.headers))
        elif isinstance(exc, _OAuthError):  # a malformed OAuth request outside an endpoint's own handling
            await http.respond_json(exc.status, {"error": exc.error, "error_description": exc.description},
                                    headers=list(_NO_STORE))
        elif isinstance(exc, RpcError):  # the store is unavailable (503), or another protocol-level refusal
            retry = [(b"retry-after", b"2")] if exc.status == 503 else []
            await http.respond_json(exc.status if exc.status != 200 else 400, _error_response(None, exc),
                                    headers=retry)
        elif not isinstance(exc, _Cancelled):
            error_id = _error_id()
            log.error("unhandled error on %s %s (error id %s)", method, path, error_id, exc_info=exc)
            error = RpcError(INTERNAL_ERROR, f"Internal server error (error id {error_id}).")
            await http.respond_json(500, _error_response(None, error))

    async def _route(self, http: _HttpRequest, path: str, method: str, root: str) -> typing.Awaitable | None:
        settings = self.server.settings
        mcp_path, auth = settings.mcp_path, settings.auth
        login = self.server._login
        if login is not None:
            http.base = self.oauth.issuer(http)  # the login tool hands out links to this server
        if path == mcp_path and method == "POST" and auth == "none" and not settings.rate_limit:
            return self.streamable.post(http)  # the hot path: nothing to check on the way
        if path in (mcp_path, mcp_path + "/", "/sse", "/messages", "/messages/", "/http", "/http/"):
            if auth != "none":
                http.principal = await self.oauth.authenticate(http, path)
            if settings.rate_limit:
                await self._rate_limit(http)
        elif await self._route_browser_and_oauth(http, path, method, login):
            return None
        return await self._route_endpoints(http, path, method, root)

    async def _route_browser_and_oauth(self, http: _HttpRequest, path: str, method: str, login) -> bool:
        """The login pages, the sandbox, the metadata documents and the authorization server's
        endpoints; False for any other path."""
        auth = self.server.settings.auth
        if login is not None and path.startswith("/login/") and path.count("/") == 2:
            if method not in ("GET", "POST"):
                raise _HttpError(405, "Method Not Allowed: the login page takes GET and POST.",
                                 headers=[(b"allow", b"GET, POST")])
            await login.page(http, path[len("/login/"):])
        elif login is not None and path == "/redirect":
            _require_method(method, "GET", path)
            await login.redirect(http)
        elif login is not None and login.sandbox and path.startswith("/sandbox/"):
            await _Sandbox(self.server).handle(http, path)
        elif path.startswith("/.well-known/") or path.endswith("/.well-known/openid-configuration"):
            _require_method(method, "GET", path)
            if path.startswith("/.well-known/oauth-protected-resource") and auth != "none":
                await self.oauth.protected_resource_metadata(http, path[len("/.well-known/oauth-protected-resource"):])
            elif path.startswith(("/.well-known/oauth-authorization-server", "/.well-known/openid-configuration")) \
                    or path.endswith("/.well-known/openid-configuration"):
                await self.oauth.server_metadata(http)
            else:
                raise _HttpError(404, f"Not Found: {path}.")
        elif path in ("/authorize", "/token", "/register", "/revoke") and auth == "builtin":
            if path == "/authorize":
                if method not in ("GET", "POST"):
                    raise _HttpError(405, "Method Not Allowed: /authorize takes GET and POST.",
                                     headers=[(b"allow", b"GET, POST")])
                await self.oauth.authorize(http)
            else:
                _require_method(method, "POST", path)
                await {"/token": self.oauth.token, "/register": self.oauth.register,
                       "/revoke": self.oauth.revoke}[path](http)
        else:
            return False
        return True

    async def _route_endpoints(self, http: _HttpRequest, path: str, method: str, root: str) -> typing.Awaitable | None:
        """The MCP transports (a long-lived one returned, for ``_handle`` to await: a tail call),
        then health, readiness, metrics and the index."""
        mcp_path = self.server.settings.mcp_path
        if path in (mcp_path, mcp_path + "/"):
            handler = {"POST": self.streamable.post, "GET": self.streamable.get,
                       "DELETE": self.streamable.delete}.get(method)
            if handler is None:
                raise _HttpError(405, f"Method Not Allowed: {mcp_path} takes POST, GET and DELETE.",
                                 headers=[(b"allow", b"GET, POST, DELETE, OPTIONS")])
            return handler(http)
        if path == "/sse":
            _require_method(method, "GET", path)
            return self.legacy_sse.get(http, root)
        if path in ("/messages", "/messages/"):
            _require_method(method, "POST", path)
            await self.legacy_sse.post(http)
        elif path in ("/http", "/http/"):
            _require_method(method, "POST", path)
            await self.direct.post(http)
        elif path == "/healthz":
            await http.respond_json(200, {"status": "ok"})
        elif path == "/metrics":
            await self._metrics_page(http)
        elif path == "/readyz":
            await self._readiness(http)
        elif path == "/":
            await http.respond_json(200, {"name": self.server.name, "version": self.server.version,
                                          "mcp": root + mcp_path, "sse": root + "/sse", "http": root + "/http",
                                          "protocolVersions": list(SUPPORTED_VERSIONS)})
        else:
            raise _HttpError(404, f"Not Found: {path}; the MCP endpoint is {root + mcp_path}.")
        return None

    async def _metrics_page(self, http: _HttpRequest) -> None:
        token = self.server.settings.metrics_token
        if not token:
            raise _HttpError(404, "Not Found: /metrics is off; set MCP_METRICS_TOKEN to serve it.")
        presented = http.headers.get("authorization", "")
        if token != "public" and not hmac.compare_digest(presented.encode(), f"Bearer {token}".encode()):
            raise _HttpError(401, "Unauthorized: /metrics needs Authorization: Bearer <MCP_METRICS_TOKEN>.")
        await http.respond(200, _metrics.render().encode(), "text/plain; version=0.0.4; charset=utf-8")

    async def _readiness(self, http: _HttpRequest) -> None:
        runtime = self.server._runtime()
        store = runtime.store
        if runtime.closing or runtime.unready:  # (SIGTERM: the balancer takes this instance out first)
            await http.respond_json(503, {"status": "unavailable", "reason": "shutting down"})
        elif await store.ping():
            await http.respond_json(200, {"status": "ready", "store": store.name})
        else:
            await http.respond_json(503, {"status": "unavailable", "store": store.name,
                                          "reason": "the store does not answer"})


_REQUEST_ID_RE = re.compile(r"[\x21-\x7e]{1,128}")
_TRACEPARENT_RE = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
_request_counter = iter(range(1, 1 << 62))
_REQUEST_PREFIX = secrets.token_hex(4)


def _next_request_id() -> str:
    """Unique per process and distinct across processes, without a system call per request."""
    return f"{_REQUEST_PREFIX}-{next(_request_counter):x}"


_FIXED_ROUTES = ("/sse", "/messages", "/http", "/healthz", "/readyz", "/metrics", "/authorize", "/token",
                 "/register", "/revoke", "/redirect", "/")


@functools.lru_cache(maxsize=1024)
def _http_metric_key(route: str, method: str, status: int) -> tuple:
    method = method if method in _HTTP_METHODS else "other"  # (label values must stay few)
    return ("mcp_http_requests_total", (("route", route), ("method", method), ("status", status)))


_HTTP_METHODS = frozenset(("GET", "POST", "DELETE", "OPTIONS", "HEAD", "PUT", "PATCH"))


def _route_label(path: str, mcp_path: str) -> str:
    """A metric label for a path: routes, never raw paths (their number must stay small)."""
    trimmed = path.rstrip("/") or "/"
    if trimmed == mcp_path:
        return mcp_path
    if trimmed in _FIXED_ROUTES:
        return trimmed
    for prefix, label in (("/login/", "/login/{tx}"), ("/sandbox/", "/sandbox/*"), ("/.well-known/", "/.well-known/*")):
        if path.startswith(prefix):
            return label
    return "other"


def _require_method(method: str, allowed: str, path: str) -> None:
    if method != allowed:
        raise _HttpError(405, f"Method Not Allowed: {path} takes {allowed}.",
                         headers=[(b"allow", allowed.encode())])


async def _shutdown(server: _ProtocolCore) -> None:
    if server._live_runtime is not None:
        await server._live_runtime.close()
        server._live_runtime = None


# ==== 9. HTTP server ============================================================================
#
# Rules:
# - HTTP/1.1 on ``asyncio.Protocol``: keep-alive, pipelined requests answered in order,
#   ``Content-Length`` and chunked bodies, ``Expect: 100-continue``, streamed responses (chunked
#   when no length is given), backpressure both ways.  A HEAD response is GET's head (its
#   Content-Length too) without a body, so pipelined responses stay in step.
# - Public asyncio only: a request is an eager task (``_run_eagerly``); the end of a loop pass
#   is a ``call_soon`` callback (``_EndOfPassWrites``); the loop is asyncio's default unless
#   MCP_BUSY_POLL_US asks for polling.
# - Every size and time has a limit with a clear answer: head too large 431, request line too
#   long 414, body too large 413 (a declared length is refused before reading), a slow head or
#   body 408 and close, an idle keep-alive connection closed, connections capped (503), and
#   capped per client address (429; a trusted proxy's are many clients' and are not).
# - Anything that could smuggle a request is refused with 400 and the connection closed:
#   Content-Length together with Transfer-Encoding, several (even identical) Content-Length
#   headers, a malformed length, obsolete line folding, a transfer coding other than chunked,
#   a chunk size or trailer line over 1 KB; so is an HTTP/1.1 request without exactly one
#   well-formed Host (RFC 9112 section 3.2).
# - Nothing a request raises ends the process (``_REQUEST_ERRORS``): a 500 with an error id.
# - SIGTERM drains: /readyz says 503 for MCP_DRAIN_SECONDS while everything is still served, then
#   the listener closes, the runtime ends the streams (``_Runtime.end_streams``) and requests in flight
#   get MCP_DRAIN_GRACE seconds before the store closes.  SIGINT (or a second SIGTERM) skips the
#   readiness wait; a ``stop`` event set by code stops without it too.
#
# Theory of operation: ``data_received`` appends to a buffer and parses at most one request head
# at a time.  A parsed request becomes a ``_BundledExchange`` whose ASGI task runs the app; body bytes are
# fed to the cycle as they arrive (reading pauses while the app has not taken them).  Bytes after
# the body stay in the buffer: the next request is parsed only when the current response ended,
# which answers pipelined requests in order.  When the peer disconnects, the cycle's disconnect
# callbacks fire (the ``mcp_server.disconnect`` ASGI extension) and ``receive`` reports it.

_MAX_REQUEST_LINE = 8192
_HEADER_BLOCK_RE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\r\n\x00]*(?:\r\n[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\r\n\x00]*)*")
_ASGI_VERSION = {"version": "3.0", "spec_version": "2.3"}
_METHOD_RE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


class _BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class _ServerState:
    def __init__(self, app, settings: Settings):
        self.app, self.settings = app, settings
        # Our own app takes the connection's ``_BundledExchange`` as its exchange (section 6: the same
        # interface as ``_AsgiExchange``, one layer less); any other ASGI app gets standard ASGI.
        self.native = app.serve_exchange if isinstance(app, _App) else None
        self.connections: set = set()
        self.per_address: collections.Counter = collections.Counter()  # client IP -> open connections
        self.draining = False
        self.root_path = ""
        self.loop = asyncio.get_running_loop()
        self.clock = self.loop.time
        self.sweeper = None
        self.ended = 0  # connections closed since the start
        self.end_of_pass = _end_of_pass_writes(self.loop)  # where the connections' output waits (send_soon)

    async def sweep(self) -> None:
        """Enforce header, body and idle deadlines of every connection, a few times a second; and
        give memory back once many connections ended (``_give_back_memory``)."""
        settings = self.settings
        interval = max(0.02, min(0.5, settings.header_timeout / 4, settings.body_timeout / 4,
                                 settings.idle_timeout / 4))
        ended_then, trimmed_at, last_trim, cost = 0, 0, -1e9, 0.0
        while True:
            await asyncio.sleep(interval)
            now = self.clock()
            for connection in list(self.connections):
                connection.check_deadline(now)
            if _time_to_trim(self.ended, ended_then, trimmed_at, now - last_trim, cost):
                started = time.perf_counter()
                _give_back_memory()
                cost = time.perf_counter() - started
                trimmed_at, last_trim = self.ended, now
            ended_then = self.ended


_TRIM_AFTER = 1000


def _time_to_trim(ended: int, ended_a_tick_ago: int, ended_at_last_trim: int, since_last_trim: float,
                  last_cost: float) -> bool:
    """_TRIM_AFTER connections ended since the last trim, none in the last tick (the wave is
    over), and at most 1% of the time spent trimming (one trim is not free)."""
    return (ended - ended_at_last_trim >= _TRIM_AFTER and ended == ended_a_tick_ago
            and since_last_trim >= 100 * last_cost)


def _give_back_memory() -> None:
    """Free what ended connections left in reference cycles (asyncio's transports keep one), then
    hand glibc's free pages back to the OS.  Python's small-object allocator returns only whole
    empty 1 MiB arenas, which seldom happens; under PYTHONMALLOC=malloc (the Docker image sets
    it) every freed object is glibc's, and most of it comes back.  Also run once after start
    (``serve``): where no cached byte code could be used (PYTHONDONTWRITEBYTECODE, a read-only
    checkout) the import compiled this module, and the compiler's ~17 MB of freed work space
    would stay in RSS."""
    import gc
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (musl, macOS, Windows)."""
    try:
        import ctypes
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError, ImportError):
        return None


class _LazyEvent:
    """An asyncio.Event made only when someone waits (most requests arrive whole and never do)."""

    __slots__ = ("_event", "_set")

    def __init__(self):
        self._event, self._set = None, False

    def set(self) -> None:
        self._set = True
        if self._event is not None:
            self._event.set()

    def clear(self) -> None:
        self._set = False
        if self._event is not None:
            self._event.clear()

    async def wait(self) -> None:
        if self._set:
            return
        if self._event is None:
            self._event = asyncio.Event()
        await self._event.wait()


def _status_line(status: int) -> bytes:
    return _STATUS_LINES.get(status) or b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, "Status").encode())


_STATUS_LINES = {status: b"HTTP/1.1 %d %s\r\n" % (status, reason.encode()) for status, reason in _REASONS.items()}
_FRAMING_NAMES = frozenset((b"content-length", b"connection", b"transfer-encoding"))


class _BundledExchange:
    """One request/response on a connection; ``task`` runs the app (None once it finished).  To
    our own app it is the exchange (the interface ``_AsgiExchange`` describes); to any other
    ASGI app it offers ``receive``/``send``."""

    # No reference to the scope: a foreign app's scope holds the disconnect extension, a bound
    # method of the cycle, and a cycle -> scope -> cycle loop would leave every finished request
    # to the garbage collector.
    __slots__ = ("protocol", "http11", "body", "body_event", "more_body", "expect_continue",
                 "disconnected", "callbacks", "response_started", "response_done", "chunked",
                 "keep_alive", "status", "task", "received", "body_finished", "_head", "headers",
                 "bodiless")

    def __init__(self, protocol: "_HttpConnection", http11: bool, expect_continue: bool, keep_alive: bool,
                 bodiless: bool = False):
        self.protocol = protocol
        self.http11 = http11
        self.bodiless = bodiless  # a HEAD request: its response has no body (RFC 9110 9.3.2)
        self.body = bytearray()
        self.body_event = _LazyEvent()
        self.more_body = True
        self.expect_continue = expect_continue
        self.disconnected = False
        self.callbacks: tuple | list = ()  # a list once one is added
        self.response_started = self.response_done = False
        self.chunked = False
        self.keep_alive = keep_alive
        self.status = 0
        self.task = None
        self.received = 0
        self.body_finished = False
        self._head = None
        self.headers = None  # lower-cased name -> value, for our own app

    def take_body(self) -> bytes | None:
        """The whole body, if it has arrived and nobody took it (our own app's shortcut)."""
        if self.more_body or self.body_finished:
            return None
        self.body_finished = True
        chunk = bytes(self.body)
        self.body.clear()
        return chunk

    def on_disconnect(self, callback) -> None:
        if self.disconnected:
            asyncio.get_running_loop().call_soon(callback)
        elif self.callbacks:
            self.callbacks.append(callback)
        else:
            self.callbacks = [callback]

    def stop_watching(self) -> None:
        self.callbacks = ()

    def forget_request(self) -> None:
        pass  # (our own app was handed the headers as a dict; no raw list is kept)

    def lost(self) -> None:
        if self.disconnected:
            return
        self.disconnected = True
        self.body_event.set()
        callbacks, self.callbacks = self.callbacks, ()
        if not self.response_done:
            for callback in callbacks:
                try:
                    callback()
                except Exception:
                    log.exception("disconnect callback failed (error id %s)", _error_id())

    async def receive(self) -> dict:
        if self.expect_continue and not self.response_started and not self.disconnected:
            self.expect_continue = False
            self.protocol.send_now(b"HTTP/1.1 100 Continue\r\n\r\n")
        if self.body_finished:
            # the body was delivered: the next message is the disconnect (or the response's end)
            while not self.disconnected and not self.response_done:
                self.body_event.clear()
                await self.body_event.wait()
            return {"type": "http.disconnect"}
        while not self.body and self.more_body and not self.disconnected:
            self.body_event.clear()
            self.protocol.resume_reading()
            await self.body_event.wait()
        if self.disconnected and self.more_body:
            return {"type": "http.disconnect"}
        chunk = bytes(self.body)
        self.body.clear()
        self.body_finished = not self.more_body
        if self.more_body:
            self.protocol.resume_reading()
        return {"type": "http.request", "body": chunk, "more_body": self.more_body}

    async def send(self, message: dict) -> None:
        """ASGI ``send``."""
        kind = message["type"]
        if kind == "http.response.start":
            self.start(message["status"], message.get("headers", []))
        elif kind == "http.response.body":
            await self.write(message.get("body", b""), message.get("more_body", False))
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r}")

    def start(self, status: int, headers: list) -> None:
        if self.disconnected or self.response_done:
            return
        if self.response_started:
            raise RuntimeError("response already started")
        self.response_started = True
        self.status = status
        self._head = headers

    async def write(self, body: bytes, more: bool) -> None:
        protocol = self.protocol
        if self.disconnected or self.response_done:
            return
        if not self.response_started:
            raise RuntimeError("a response body before its start")
        head = self._head
        if head is not None:
            self._head = None
            out = self._encode_head(head, body, more)
            if not self.bodiless:
                out += (body if not self.chunked else (b"%x\r\n%s\r\n" % (len(body), body) if body else b"")) + (
                    b"0\r\n\r\n" if self.chunked and not more else b"")
        elif self.bodiless:  # (a HEAD response: the head says what GET would send, and that is all)
            out = b""
        elif self.chunked:
            out = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + (b"" if more else b"0\r\n\r\n")
        else:
            out = body
        if out:
            protocol.send_soon(out)
        if protocol.write_paused:
            await protocol.drain()
        if not more:
            self.response_done = True
            self.callbacks = ()  # (they hold the exchange, which holds this cycle)
            self.body_event.set()
            protocol.cycle_done(self)

    def _encode_head(self, headers: list, body: bytes, more: bool) -> bytes:
        has_length = False
        lines = [_status_line(self.status)]
        for name, value in headers:
            # (our own names are lower-case and seldom about framing: one set lookup for them)
            if name in _FRAMING_NAMES or not name.islower():
                lower = name.lower()
                if lower == b"content-length":
                    has_length = True
                elif lower == b"connection" and value.lower() == b"close":
                    self.keep_alive = False
                elif lower == b"transfer-encoding":
                    continue
            lines += (name, b": ", value, b"\r\n")
        if self.protocol.state.draining:
            self.keep_alive = False
        if not has_length:
            if more:
                self.chunked = self.http11
                if self.chunked:
                    lines.append(b"transfer-encoding: chunked\r\n")
                else:
                    self.keep_alive = False
            elif self.status >= 200 and self.status not in (204, 304):
                lines.append(b"content-length: %d\r\n" % len(body))
        if not self.keep_alive:
            lines.append(b"connection: close\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)


# Parsed request heads by their exact bytes: a client repeats the same head (the same path,
# session, Accept, Content-Type, and often the same length) request after request, and a hit
# skips the validation and the splitting.  A head with credentials (Authorization, Cookie) is
# never kept: a module-wide table must not hold bearer tokens past their request.  Bounded in
# entries and in head size, so one-off sessions cannot keep heads alive without end.  Each
# request gets its own copy of the header dict, so a handler may change it (``_apply_forwarded``
# does) without reaching the next request with the same head.
_REQUEST_HEADS: dict = {}
_REQUEST_HEADS_MAX, _REQUEST_HEAD_CACHED_SIZE = 128, 2048


def _parse_request_head(head: bytes) -> tuple:
    """(scope template, HTTP/1.1?, fields, pairs, content length, transfer coding, connection
    tokens, expects 100-continue) of a request head without its blank line, validated;
    _BadRequest for what HTTP/1.1 does not allow.  Remembered in _REQUEST_HEADS."""
    request_line, _, block = head.partition(b"\r\n")
    if len(request_line) > _MAX_REQUEST_LINE:
        raise _BadRequest(414, "The request line is too long.")
    parts = request_line.split(b" ")
    if len(parts) != 3 or not _METHOD_RE.fullmatch(parts[0]) or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise _BadRequest(400, "Malformed request line.")
    method, target, version = parts
    http11 = version == b"HTTP/1.1"
    fields, pairs = _header_fields(block)
    host = fields.get("host")
    if host is None and http11:
        raise _BadRequest(400, "An HTTP/1.1 request needs a Host header.")
    if host is not None and not _valid_host(host):  # (empty too: an http URI has a host, RFC 9110 4.2.1)
        raise _BadRequest(400, "Malformed Host header.")
    content_length, transfer_encoding = _body_framing(fields)
    tokens = fields.get("connection")
    if tokens is not None:
        tokens = tokens.lower()
    expect = fields.get("expect")
    expect = expect is not None and expect.lower() == "100-continue"
    raw_path, path, query = _request_target(target)
    template = {"type": "http", "asgi": _ASGI_VERSION, "http_version": "1.1" if http11 else "1.0",
                "method": method.decode("ascii"), "scheme": "http", "path": path, "raw_path": raw_path,
                "query_string": query, "root_path": "", "client": None, "server": None}
    parsed = (template, http11, fields, tuple(pairs), content_length, transfer_encoding, tokens, expect)
    if len(head) <= _REQUEST_HEAD_CACHED_SIZE and "authorization" not in fields and "cookie" not in fields:
        if len(_REQUEST_HEADS) >= _REQUEST_HEADS_MAX:
            _REQUEST_HEADS.clear()
        _REQUEST_HEADS[head] = parsed
    return parsed


def _header_fields(block: bytes) -> tuple:
    """(fields, pairs) of a head's header lines: lower-cased names to values (repeats joined),
    and the pairs in order; _BadRequest for a malformed line or a repeated framing header."""
    # One C-level match validates every header line: a token, a colon, a value without CR,
    # LF or NUL.  A line that starts with white space (obsolete folding) cannot match.
    if block and not _HEADER_BLOCK_RE.fullmatch(block):
        if re.search(rb"(?:^|\r\n)[ \t]", block):
            raise _BadRequest(400, "Obsolete header line folding is not accepted.")
        raise _BadRequest(400, "Malformed header line.")
    # (name, value) text pairs, from one latin-1 decode of the block (header bytes map 1:1
    # onto it, and one decode and split costs less than a findall)
    pairs = []
    for line in block.decode("latin-1").split("\r\n") if block else ():
        name, _, value = line.partition(":")
        pairs.append((name.lower(), value.strip(" \t")))
    fields = dict(pairs)
    if len(fields) != len(pairs):
        names = [name for name, _ in pairs]
        for name in ("content-length", "transfer-encoding", "host"):
            if names.count(name) > 1:
                raise _BadRequest(400, f"Several {name.title()} headers are not accepted.")
        fields = _header_dict(pairs)
    return fields, pairs


def _body_framing(fields: dict) -> tuple:
    """(Content-Length or None, transfer coding or None): one of the two at most, and chunked
    the only coding (what a proxy and we could read differently is refused)."""
    content_length = fields.get("content-length")
    if content_length is not None:
        if not _DECIMAL.fullmatch(content_length):
            raise _BadRequest(400, "Malformed Content-Length.")
        content_length = int(content_length)
    transfer_encoding = fields.get("transfer-encoding")
    if transfer_encoding is not None:
        transfer_encoding = transfer_encoding.lower()
        if content_length is not None:
            raise _BadRequest(400, "Content-Length together with Transfer-Encoding is not accepted.")
        if transfer_encoding != "chunked":
            raise _BadRequest(400, "Only the chunked transfer coding is accepted.")
    return content_length, transfer_encoding


def _request_target(target: bytes) -> tuple:
    """(raw path, decoded path, query) of an origin-form or absolute-form request target."""
    raw_path, _, query = target.partition(b"?")
    if not raw_path.startswith(b"/") and raw_path != b"*":
        if raw_path.startswith((b"http://", b"https://")):  # absolute form
            raw_path = b"/" + raw_path.split(b"/", 3)[-1] if raw_path.count(b"/") >= 3 else b"/"
        else:
            raise _BadRequest(400, "Malformed request target.")
    try:
        path = raw_path.decode("ascii")
    except UnicodeDecodeError:
        raise _BadRequest(400, "The request target must be ASCII.") from None
    if "%" in path:
        path = urllib.parse.unquote(path)
    return raw_path, path, query


class _HttpConnection(asyncio.Protocol):
    """One client connection of the bundled HTTP/1.1 server."""

    def __init__(self, state: _ServerState):
        self.state = state
        self.settings = state.settings
        self.transport = None
        self.buffer = bytearray()
        self.cycle: _BundledExchange | None = None
        self.body_left = 0          # bytes of a Content-Length body still to come
        self.chunk_state = None     # parsing state of a chunked body, or None
        self.reading_paused = False
        self.write_paused = False
        self._drain: asyncio.Future | None = None
        self.timer = None
        self.peer = self.client = self.server = None
        self.counted_as = None  # the client address this connection counts against, if any
        self.closed = False
        self.unsent: list | None = None  # output for send_soon, not yet handed to the transport
        self.unsent_size = 0

    # -- connection lifecycle --------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("sockname")
        self.client = self.peer[:2] if isinstance(self.peer, tuple) else None
        self.server = sock[:2] if isinstance(sock, tuple) else None
        state = self.state
        if len(state.connections) >= self.settings.max_connections or state.draining:
            self._reject(503, "The server is at its connection limit; try again shortly.")
            return
        peer, limit = self.client[0] if self.client else None, self.settings.max_connections_per_address
        proxies = self.settings.trusted_proxies  # (a proxy's connections are many clients')
        address = _address_block(peer) if peer is not None else None
        if address is not None and limit and peer not in proxies and "*" not in proxies:
            if state.per_address[address] >= limit:
                self._reject(429, f"Too many connections from this client address: {limit} are open, the "
                             "limit (MCP_MAX_CONNECTIONS_PER_ADDRESS); close some, then retry.", b"retry-after: 5\r\n")
                return
            state.per_address[address] += 1
            self.counted_as = address
        state.connections.add(self)
        self._arm(self.settings.header_timeout, self._head_timeout)

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.state.connections.discard(self)
        if self.counted_as is not None:
            per_address, address, self.counted_as = self.state.per_address, self.counted_as, None
            per_address[address] -= 1
            if per_address[address] <= 0:
                del per_address[address]
        self.state.ended += 1
        self._disarm()
        if self.cycle is not None:
            self.cycle.lost()
            self.cycle = None  # no protocol <-> cycle loop: both go by reference counting
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    async def drain(self) -> None:
        if self.write_paused and not self.closed:
            self._drain = asyncio.get_running_loop().create_future()
            await self._drain

    def pause_reading_if(self) -> None:
        if not self.reading_paused and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()
        if self.buffer and self.cycle is not None and self.cycle.more_body:
            self._advance()  # body bytes already buffered while reading was paused

    # -- writing -----------------------------------------------------------------------------------

    def send_soon(self, data: bytes) -> None:
        """Send ``data`` at the end of this loop pass (``_EndOfPassWrites``), with whatever else this
        connection and the others write until then.  Each send to a peer that sleeps wakes it,
        and on loopback (a proxy or a load generator on the same host) that wake-up costs the
        server more than the send itself; answers that leave together wake the peer once (the
        wait is at most one pass over the ready connections).  A lone client's answer goes at once
        (``_EndOfPassWrites.release``)."""
        unsent = self.unsent
        if unsent is None:
            self.unsent, self.unsent_size = [data], len(data)
            self.state.end_of_pass.add(self.send_now)
        else:
            unsent.append(data)
            self.unsent_size += len(data)
        if self.unsent_size > 65536:
            self.send_now()

    def send_now(self, data: bytes = b"") -> None:
        """Send what waits, then ``data``.  Every write goes through here or ``send_soon``, so the
        bytes leave in the order they were written."""
        unsent = self.unsent
        if unsent is not None:
            self.unsent, self.unsent_size = None, 0
            if data:
                unsent.append(data)
            data = unsent[0] if len(unsent) == 1 else b"".join(unsent)
        if data and not self.closed:
            self.transport.write(data)

    def close(self, last: bytes = b"") -> None:
        """Close once what waits, then ``last``, has been sent."""
        self.send_now(last)
        self.transport.close()

    def _arm(self, seconds: float, callback) -> None:
        """Set this connection's deadline; the server's sweeper calls ``callback`` once it passes.
        (One float per request instead of a timer handle each: the sweeper does the waiting.)"""
        if seconds and seconds > 0:
            self.timer = (self.state.clock() + seconds, callback)
        else:
            self.timer = None

    def _disarm(self) -> None:
        self.timer = None

    def check_deadline(self, now: float) -> None:
        if self.timer is not None and self.timer[0] <= now and not self.closed:
            callback = self.timer[1]
            self.timer = None
            callback()

    def _head_timeout(self) -> None:
        if self.buffer:
            self._reject(408, "The request head did not arrive in time.")
        else:
            self.close()  # an idle keep-alive connection

    def _body_timeout(self) -> None:
        if self.cycle is not None and not self.cycle.response_started:
            self._reject(408, "The request body did not arrive in time.")
        else:
            self.close()

    def _reject(self, status: int, message: str, headers: bytes = b"") -> None:
        code = INTERNAL_ERROR if status == 500 else INVALID_REQUEST
        body = _dumps({"jsonrpc": "2.0", "id": None, "error": {"code": code, "message": message}}).encode()
        self.close(_status_line(status) + b"content-type: application/json\r\ncontent-length: %d\r\n"
                   b"%sconnection: close\r\n\r\n%s" % (len(body), headers, body))
        self.buffer.clear()

    # -- reading -----------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self.cycle is None and not self.buffer:
            self._arm(self.settings.header_timeout, self._head_timeout)  # a new head starts: its clock runs
        self.buffer += data
        end_of_pass = self.state.end_of_pass
        end_of_pass.hold()
        try:
            self._advance()
        finally:
            end_of_pass.release()

    def _advance(self) -> None:
        try:
            while not self.closed:
                if self.cycle is None:
                    scope = self._parse_head()
                    if scope is None:
                        return
                    cycle = self.cycle
                    if cycle.more_body:
                        self._feed_body()  # what already arrived, so that the app finds it
                    self._start(cycle, scope)
                elif self.cycle.more_body:
                    if not self._feed_body():
                        return
                else:
                    if len(self.buffer) > self.settings.max_header + self.settings.max_body:
                        self.pause_reading_if()  # pipelined data waits for the current response
                    return
        except _BadRequest as exc:
            self._reject(exc.status, exc.message)

    def _parse_head(self) -> dict | None:
        """The next request's ASGI scope (its cycle made), or None while its head is incomplete."""
        if not self.buffer:
            return None
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            first = self.buffer.find(b"\r\n")
            if (first < 0 and len(self.buffer) > _MAX_REQUEST_LINE) or first > _MAX_REQUEST_LINE:
                raise _BadRequest(414, "The request line is too long.")
            if len(self.buffer) > self.settings.max_header:
                raise _BadRequest(431, f"The request head is larger than {self.settings.max_header} bytes.")
            if self.buffer.lstrip(b"\r\n") == b"" and self.buffer:
                self.buffer.clear()  # stray line breaks between requests are tolerated
            return None
        if end > self.settings.max_header:
            raise _BadRequest(431, f"The request head is larger than {self.settings.max_header} bytes.")
        head = bytes(self.buffer[:end])
        del self.buffer[:end + 4]
        if head[:1] in (b"\r", b"\n"):
            head = head.lstrip(b"\r\n")  # stray line breaks before a request are tolerated
        parsed = _REQUEST_HEADS.get(head)
        if parsed is None:
            parsed = _parse_request_head(head)
        template, http11, fields, pairs, content_length, transfer_encoding, tokens, expect = parsed
        keep_alive = http11
        if tokens is not None:
            keep_alive = ("close" not in tokens) if keep_alive else ("keep-alive" in tokens)
        if content_length is not None and content_length > self.settings.max_body:
            raise _BadRequest(413, f"Request body is larger than the limit of {self.settings.max_body} "
                              "bytes (MCP_MAX_BODY).")
        scope = template.copy()
        scope["root_path"], scope["client"], scope["server"] = self.state.root_path, self.client, self.server
        cycle = _BundledExchange(self, http11, expect, keep_alive, template["method"] == "HEAD")
        if self.state.native is not None:
            cycle.headers = fields.copy()
        else:
            scope["headers"] = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in pairs]
            scope["extensions"] = {"mcp_server.disconnect": cycle.on_disconnect}
        self.cycle = cycle
        if transfer_encoding is not None:
            self.chunk_state = [0, False]  # bytes left in the current chunk; in trailers
            self.body_left = 0
        else:
            self.chunk_state = None
            self.body_left = content_length or 0
            cycle.more_body = self.body_left > 0
        if cycle.more_body and len(self.buffer) < self.body_left:
            self._arm(self.settings.body_timeout, self._body_timeout)
        else:
            self._disarm()
        return scope

    def _start(self, cycle: _BundledExchange, scope: dict) -> None:
        """Run the app for ``cycle`` at once, in this callback, until it first has to wait; only
        then does it become a task.  A request whose body has arrived and whose handler never
        waits (most tools/call) is answered without a task or a trip through the event loop."""
        cycle.task = _run_eagerly(self._run(cycle, scope))

    def _feed_body(self) -> bool:
        """Move body bytes from the buffer to the cycle; False when more input is needed."""
        cycle = self.cycle
        if len(cycle.body) > 1024 * 1024:
            self.pause_reading_if()  # the app has not taken what it has: backpressure
            return False
        if self.chunk_state is None:
            take = min(self.body_left, len(self.buffer))
            if take:
                cycle.body += self.buffer[:take]
                del self.buffer[:take]
                self.body_left -= take
                cycle.received += take
                cycle.body_event.set()
            if self.body_left == 0:
                self._body_done()
                return True
            return False
        return self._feed_chunks(cycle)

    def _feed_chunks(self, cycle) -> bool:
        """The chunked coding, a step at a time (data, its CRLF, the next size line, trailers);
        each step returns None to go on, or what ``_feed_body`` returns."""
        while True:
            left, in_trailers = self.chunk_state
            if in_trailers:
                step = self._chunk_trailer(cycle)
            elif left > 0:
                step = self._chunk_data(cycle, left)
            elif left == -1:
                step = self._chunk_data_end()
            else:
                step = self._chunk_size()
            if step is not None:
                return step

    def _chunk_trailer(self, cycle) -> bool | None:
        end = self._chunk_line_end()
        if end < 0:
            return False
        del self.buffer[:end + 2]
        if not end:
            self._body_done()
            return True
        cycle.received += end  # (trailers count against MCP_MAX_BODY, so they end)
        if cycle.received > self.settings.max_body:
            raise _BadRequest(413, "The chunked body's trailers are larger than MCP_MAX_BODY.")
        return None

    def _chunk_data(self, cycle, left: int) -> bool | None:
        take = min(left, len(self.buffer))
        if not take:
            return False
        cycle.body += self.buffer[:take]
        del self.buffer[:take]
        cycle.received += take
        self.chunk_state[0] = left - take
        cycle.body_event.set()
        if cycle.received > self.settings.max_body:
            raise _BadRequest(413, f"Request body is larger than the limit of "
                              f"{self.settings.max_body} bytes (MCP_MAX_BODY).")
        if self.chunk_state[0] == 0:
            self.chunk_state[0] = -1  # expect the CRLF after the data
        return None

    def _chunk_data_end(self) -> bool | None:
        if len(self.buffer) < 2:
            return False
        if self.buffer[:2] != b"\r\n":
            raise _BadRequest(400, "Malformed chunked body.")
        del self.buffer[:2]
        self.chunk_state[0] = 0
        return None

    def _chunk_size(self) -> bool | None:
        end = self._chunk_line_end()
        if end < 0:
            return False
        size_text = bytes(self.buffer[:end]).split(b";")[0].strip()
        del self.buffer[:end + 2]
        if not size_text or len(size_text) > 16 or not re.fullmatch(rb"[0-9A-Fa-f]+", size_text):
            raise _BadRequest(400, "Malformed chunk size.")
        size = int(size_text, 16)
        if size == 0:
            self.chunk_state[1] = True
        else:
            self.chunk_state[0] = size
        return None

    def _chunk_line_end(self) -> int:
        """Where the chunk size or trailer line at the start of the buffer ends (-1: not yet);
        400 for one longer than 1 KB (a chunk extension or trailer nobody needs: it would only
        be held in memory)."""
        end = self.buffer.find(b"\r\n", 0, 1026)
        if end < 0 and len(self.buffer) > 1024:
            raise _BadRequest(400, "Malformed chunked body: a chunk size or trailer line longer than 1 KB.")
        return end

    def _body_done(self) -> None:
        cycle = self.cycle
        cycle.more_body = False
        cycle.body_event.set()
        self._disarm()

    async def _run(self, cycle: _BundledExchange, scope: dict) -> None:
        try:
            if self.state.native is not None:
                headers, cycle.headers = cycle.headers, None  # handed over (forget_request drops them)
                await self.state.native(scope, headers, cycle)
            else:
                await self.state.app(scope, cycle.receive, cycle.send)
        except _REQUEST_ERRORS:
            error_id = _error_id()
            log.error("the ASGI app raised (error id %s)", error_id, exc_info=True)
            if not cycle.response_started and not self.closed:
                self._reject(500, f"Internal server error (error id {error_id}).")
                return
        if not cycle.response_done and not self.closed:
            if not cycle.response_started:
                self._reject(500, "The application sent no response.")
            else:
                self.close()  # a response cut short cannot be framed

    def cycle_done(self, cycle: _BundledExchange) -> None:
        """The response ended: close, or go on with the next (maybe pipelined) request."""
        if cycle.more_body and not self.closed:
            cycle.keep_alive = False  # the app ignored the rest of the body: the framing is lost
        if not cycle.keep_alive or self.state.draining:
            self.close()
            return
        self.cycle = None
        self.resume_reading()
        self._arm(self.settings.idle_timeout if not self.buffer else self.settings.header_timeout,
                  self._head_timeout)
        if self.buffer:
            asyncio.get_running_loop().call_soon(self._advance)


async def _lifespan(app, phase: str, state: dict) -> None:
    """Drive an ASGI app's lifespan protocol; apps without one are fine."""
    if phase == "startup":
        inbox: asyncio.Queue = asyncio.Queue()
        done = asyncio.get_running_loop().create_future()

        async def receive():
            return await inbox.get()

        async def send(message):
            if not done.done():
                done.set_result(message)
            elif message["type"].startswith("lifespan.shutdown"):
                state["shutdown"].set_result(message)

        state["inbox"], state["shutdown"] = inbox, asyncio.get_running_loop().create_future()
        state["task"] = asyncio.get_running_loop().create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}},
                                                                   receive, send))
        inbox.put_nowait({"type": "lifespan.startup"})
        finished = await asyncio.wait({done, state["task"]}, return_when=asyncio.FIRST_COMPLETED)
        if done in finished[0] and done.result()["type"] == "lifespan.startup.failed":
            raise SystemExit(f"mcp_server: startup failed: {done.result().get('message', '')}")
        return
    task = state.get("task")
    if task is None or task.done():
        return
    state["inbox"].put_nowait({"type": "lifespan.shutdown"})
    await asyncio.wait({state["shutdown"], task}, timeout=10, return_when=asyncio.FIRST_COMPLETED)


class _BusyPollSelector(selectors.DefaultSelector):
    """The event loop's selector with MCP_BUSY_POLL_US set (off by default): it polls for up to
    ``window`` seconds before it sleeps, when the wait before was short.

    A process that sleeps in ``epoll_wait`` pays when woken: the wake-up itself, then the request
    that woke it runs on cold caches.  A client that sends its next request as soon as it has the
    answer waits for all of that each time.  So while the waits are short the loop polls first,
    yielding the core to anyone else runnable between polls, and sleeps only if nothing came
    within the window; a wait the window would not have covered turns polling off until a short
    one is seen again.  It buys one such client a shorter round trip (bench/RESULTS.md) with CPU
    time that shows in ``top`` as a busy core: so an operator asks for it."""

    def __init__(self, window: float):
        super().__init__()
        self.window = window
        self.polling = True  # the last wait was short: poll before sleeping on the next

    def select(self, timeout=None):
        if timeout is not None and timeout <= 0:
            return super().select(0)
        clock = time.perf_counter
        started = clock()
        if self.polling:
            deadline = started + (self.window if timeout is None else min(self.window, timeout))
            while True:
                ready = super().select(0)
                if ready:
                    return ready
                if clock() >= deadline:
                    break
                os.sched_yield()
            self.polling = False
            if timeout is not None:
                timeout = max(0.0, timeout - (clock() - started))
            return super().select(timeout)
        ready = super().select(timeout)
        self.polling = bool(ready) and clock() - started < self.window
        return ready


def _http_loop_factory(settings: Settings) -> typing.Callable | None:
    """The event loop the bundled HTTP server runs on: asyncio's default (None), or with
    MCP_BUSY_POLL_US set (and ``sched_yield`` on the platform) a selector loop on
    ``_BusyPollSelector``."""
    if settings.busy_poll_us <= 0 or not hasattr(os, "sched_yield"):
        return None
    return functools.partial(_busy_poll_loop, settings.busy_poll_us / 1e6)


def _busy_poll_loop(window: float) -> asyncio.AbstractEventLoop:
    return asyncio.SelectorEventLoop(_BusyPollSelector(window))


async def _serve_http(app, settings: Settings, server: _ProtocolCore | None = None,
                      ready: typing.Callable | None = None, stop: asyncio.Event | None = None) -> None:
    loop = asyncio.get_running_loop()
    state = _ServerState(app, settings)
    state.sweeper = loop.create_task(state.sweep())
    stop = stop or asyncio.Event()
    terminated = asyncio.Event()  # SIGTERM (an orchestrator's stop): drain first

    def on_signal(sig):  # SIGINT, or a second SIGTERM, stops without the readiness wait
        (terminated if sig == signal.SIGTERM and not terminated.is_set() else stop).set()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread, or Windows
    life: dict = {}
    await _lifespan(app, "startup", life)
    try:
        listener = await loop.create_server(lambda: _HttpConnection(state), settings.host, settings.port,
                                            reuse_address=True, backlog=2048,
                                            reuse_port=bool(os.environ.get("MCP_WORKER_ID")))
    except OSError as exc:
        await _lifespan(app, "shutdown", life)
        raise SystemExit(f"mcp_server: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}")
    port = listener.sockets[0].getsockname()[1]
    host = settings.host if ":" not in settings.host else f"[{settings.host}]"
    store_name = server.store.name if server is not None and server.store is not None else "memory"
    if settings.auth == "none" and not _is_loopback(settings.host):
        log.warning("AUTHENTICATION IS OFF (MCP_AUTH=none) while listening on %s: anyone who can reach "
                    "this port can use every tool", settings.host)
    worker = os.environ.get("MCP_WORKER_ID")
    if settings.stdio:  # the side listener of stdio: it is there for the browser, not for MCP
        print(f"mcp_server: login pages listening on http://{host}:{port}/login/ (for the login "
              "tool's browser sign-in; MCP itself is on stdio)", file=sys.stderr, flush=True)
    elif worker in (None, "0"):
        print(f"mcp_server: listening on http://{host}:{port}{settings.mcp_path} "
              f"(also /sse, /messages, /http); store: {store_name}", file=sys.stderr, flush=True)
    if ready is not None:
        ready(port)
    # (stdio's side listener serves pages, not MCP: stdio stops its requests itself)
    runtime = server._runtime() if server is not None and not settings.stdio else None
    try:
        await _until_stopped(stop, terminated, runtime, settings.drain_seconds)
    finally:
        await _drain(state, listener, runtime)
        await _lifespan(app, "shutdown", life)
        for connection in list(state.connections):
            connection.transport.abort()
        state.sweeper.cancel()
        await listener.wait_closed()


async def _until_stopped(stop: asyncio.Event, terminated: asyncio.Event, runtime: "_Runtime | None",
                         drain_seconds: float) -> None:
    """Serve until ``stop``; after a SIGTERM (``terminated``), first answer /readyz with 503 for
    ``drain_seconds`` while still serving, so that balancers stop sending work here."""
    stopped, signalled = asyncio.ensure_future(stop.wait()), asyncio.ensure_future(terminated.wait())
    await asyncio.wait({stopped, signalled}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    signalled.cancel()
    if terminated.is_set() and runtime is not None and drain_seconds > 0:
        runtime.unready = True
        log.info("SIGTERM: /readyz answers 503 for %g s (MCP_DRAIN_SECONDS), then the server stops "
                 "accepting and drains", drain_seconds)
        try:  # a second signal ends the wait
            await asyncio.wait_for(stop.wait(), drain_seconds)
        except TimeoutError:
            pass


async def _drain(state: _ServerState, listener, runtime: "_Runtime | None") -> None:
    """Stop accepting, end the open streams (resumable ones with a retry hint: their clients go
    on elsewhere), and let the requests in flight finish, for MCP_DRAIN_GRACE seconds at most:
    the store stays open until they did, so what they send is logged for the resumed streams."""
    state.draining = True
    listener.close()
    for connection in list(state.connections):
        if connection.cycle is None:
            connection.close()  # idle keep-alive connections go at once
    if runtime is not None:
        runtime.unready = True
        await runtime.end_streams()
    deadline = state.clock() + state.settings.drain_grace
    while (state.connections or (runtime is not None and runtime.running)) and state.clock() < deadline:
        await asyncio.sleep(0.05)


# ==== 10. MCPServer, built-in tools and CLI ====================================================
#
# Rules:
# - ``MCPServer`` is the public face: the protocol core of section 5 with its runtime, app, login
#   tools and command line wired in.  Nothing in sections 1-5 names it.
# - ``serve`` runs a server (stdio, HTTP, ``--workers``); ``main()`` is the command line.


class MCPServer(_CoreMethods):
    """An MCP server: register tools, resources and prompts, then ``run()`` or mount ``asgi``.

    The protocol core (section 5) wired to the world: the store and the runtime (section 6), the
    ASGI app (section 8), the upstream login tools (section 7) and the command line (``serve``)."""

    def __init__(self, name: str, version: str = "0.1.0", *, instructions: str | None = None,
                 title: str | None = None, description: str | None = None,
                 website_url: str | None = None, icons: list | None = None,
                 settings: Settings | None = None, store: Store | None = None,
                 middleware: list | None = None):
        super().__init__(name, version, instructions=instructions, title=title, description=description,
                         website_url=website_url, icons=icons, settings=settings, middleware=middleware)
        self.store = store
        self._app = None

    def add_login_tools(self, provider=None) -> None:
        """Add the upstream login flow: the ``login``, ``logout``, ``profile``, ``holdings``,
        ``orders`` and ``service`` tools (with UPSTREAM_TRADING, ``place_order`` and
        ``cancel_order``), the /login and /redirect pages, and, for the sandbox presets, the
        sandbox provider under /sandbox/.  ``provider`` (a ``Provider``) replaces the one the
        UPSTREAM_* settings describe."""
        self._login = _Login(self, provider)
        flow = self._login
        if self.settings.encryption_iv:
            log.warning("ENCRYPTION_IV is ignored: a fixed IV is unsafe; AES-GCM takes a fresh random "
                        "nonce for every value")

        @self.tool(title="Log in to the upstream account", annotations={"openWorldHint": True})
        async def login(ctx: Context) -> dict:
            """Start signing in to your account at the upstream provider: returns a link to open in
            your browser and the pairing code to enter there."""
            flow.vault()  # a login whose credentials could not be stored must not start (a missing package)
            # a 2026 client retries after the URL elicitation: the retry must reuse the same link
            started = ctx.round_state.get("login") or await flow.start(ctx)
            if ctx.supports("elicitation.url") and ctx.protocol_version >= "2025-11-25":
                ctx.round_state["login"] = started
                await ctx.elicit_url("Sign in to your account in the browser; enter the pairing code "
                                     f"{started['pairing_code']} there. Keep the code to yourself.",
                                     started["url"], key="login")
            return {"__mcp_result__": True, "structuredContent": started, "content": [{
                "type": "text", "text": f"Open {started['url']} and enter the pairing code "
                                        f"{started['pairing_code']} there. The link works for 10 minutes; "
                                        "the code is for the user alone, never to be passed on."}]}

        @self.tool(title="Log out of the upstream account", annotations={"destructiveHint": False})
        async def logout(ctx: Context) -> str:
            """Sign out of the upstream account: revokes its tokens and deletes the stored credentials."""
            return await flow.logout(ctx)

        @self.tool(title="Account profile", login_required=True, annotations={"readOnlyHint": True})
        async def profile(ctx: Context) -> dict:
            """Your account profile at the upstream provider (identifiers masked)."""
            return await ctx.upstream(flow.path("profile"))

        @self.tool(title="Holdings", login_required=True, annotations={"readOnlyHint": True})
        async def holdings(ctx: Context) -> dict:
            """The securities held in your account, with quantities and prices."""
            return await ctx.upstream(flow.path("holdings"))

        @self.tool(title="Orders", login_required=True, annotations={"readOnlyHint": True})
        async def orders(ctx: Context) -> dict:
            """Today's orders in your account and their status."""
            return await ctx.upstream(flow.path("orders"))

        allowed = ", ".join(self.settings.service_paths)

        @self.tool(title="Upstream API", login_required=True, annotations={"readOnlyHint": True},
                   description=f"Call an allowed path of the upstream API (GET) and return its data. "
                               f"Allowed paths: {allowed}.")
        async def service(path: str, ctx: Context, params: dict[str, str] | None = None) -> dict:
            return await ctx.upstream(flow.path(_service_path(path, self.settings.service_paths)), params)

        if self.settings.upstream_trading:
            self._add_trading_tools(flow)

    def _add_trading_tools(self, flow) -> None:
        @self.tool(title="Place an order", login_required=True,
                   annotations={"destructiveHint": True, "idempotentHint": False, "openWorldHint": True})
        async def place_order(symbol: str, side: typing.Literal["BUY", "SELL"], quantity: int, ctx: Context,
                              price: float | None = None) -> dict:
            """Place an order in your account (you confirm it first). Without a price it is a market order."""
            symbol = symbol.strip().upper()
            if not re.fullmatch(r"[A-Z0-9&_.-]{1,40}", symbol) or not 0 < quantity <= 1_000_000 or (
                    price is not None and not 0 < price < 1e9):
                raise ToolError("Give a symbol (letters, digits, & _ . -), a quantity from 1 to 1000000 and "
                                "a positive price, or none for a market order.")
            summary = f"{side.lower()} {quantity} {symbol} " + (f"at {price}" if price is not None else "at market price")
            return await flow.change(ctx, "place", {"symbol": symbol, "side": side, "quantity": quantity,
                                                    "price": price}, summary)

        @self.tool(title="Cancel an order", login_required=True,
                   annotations={"destructiveHint": True, "idempotentHint": True, "openWorldHint": True})
        async def cancel_order(order_id: str, ctx: Context) -> dict:
            """Cancel one of your open orders (you confirm it first)."""
            if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", order_id or ""):
                raise ToolError("Give the order id as the orders tool shows it.")
            return await flow.change(ctx, "cancel", {"order_id": order_id}, f"cancel order {order_id}")

    @property
    def asgi(self):
        """This server as a raw ASGI 3 application (http and lifespan scopes)."""
        if self._app is None:
            self._app = _App(self)
        return self._app

    def run(self, argv: list | None = None, *, stdio: bool | None = None) -> None:
        """Serve until interrupted, configured by the command line (``--help``) and environment."""
        try:
            self.settings = Settings.load(sys.argv[1:] if argv is None else argv,
                                          prog=os.path.basename(sys.argv[0]) or "mcp_server",
                                          defaults=self.settings)
        except SystemExit as exc:
            if exc.code not in (0, None):
                print(exc.code, file=sys.stderr)
                sys.exit(2)
            raise
        if stdio is not None:
            self.settings.stdio = stdio
        serve(self, self.settings)

    def _runtime(self) -> "_Runtime":
        if self._live_runtime is None:
            if self.store is None:
                settings = self.settings
                self.store = (RedisStore(settings.redis_url, cluster=settings.redis_cluster,
                                         timeout=settings.store_timeout) if settings.redis_url
                              else MemoryStore(max_keys=settings.max_sessions * 4))
            self._live_runtime = _Runtime(self, self.store)
        return self._live_runtime

    async def _started_runtime(self) -> "_Runtime":
        """The runtime, started (subscriptions made) on first use in a running loop."""
        runtime = self._live_runtime if self._live_runtime is not None else self._runtime()
        if not runtime.started:
            runtime.start()
            self.threads = anyio.CapacityLimiter(self.settings.tool_threads)
            _telemetry.instrument(self)
            if self.settings.metrics_token:
                _metrics.on = True  # (for good: another server in this process may serve them too)
        return runtime


async def _serve_stdio(server: MCPServer) -> None:
    """stdio; with the login flow, also a loopback HTTP listener for /login, /redirect and the
    sandbox (the browser needs somewhere to go).  Ends on stdin EOF or SIGTERM/SIGINT."""
    stop, born = asyncio.Event(), _now()
    listener = None
    if server._login is not None:
        listener = asyncio.get_running_loop().create_task(_side_listener(server, stop))
        for _ in range(100):  # the login tool hands out links to it: let it bind first (bounded)
            if server._local_base is not None or listener.done():
                break
            await asyncio.sleep(0.01)
    stdio = asyncio.get_running_loop().create_task(_Stdio(server).run())
    # What starting up left behind goes back to the OS (_give_back_memory), once the client's
    # opening exchange is over: not before the first answer (cold start), nor inside it
    asyncio.get_running_loop().call_later(1.0, _give_back_memory)
    stopped = asyncio.get_running_loop().create_task(stop.wait())
    await asyncio.wait({stdio, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stop.set()
    stdio.cancel()
    await asyncio.gather(stdio, stopped, return_exceptions=True)
    if listener is not None:
        await asyncio.gather(listener, return_exceptions=True)
    _telemetry.session_ended(born, None, "pipe")  # (the process is the session)
    await _shutdown(server)


async def _side_listener(server: MCPServer, stop: asyncio.Event) -> None:
    def ready(port):
        server._local_base = f"http://127.0.0.1:{port}"
    for port in (server.settings.port, 0):  # the configured port, else any free one
        settings = dataclasses.replace(server.settings, host="127.0.0.1", port=port)
        try:
            await _serve_http(server.asgi, settings, server, ready=ready, stop=stop)
            return
        except SystemExit as exc:
            log.warning("%s", exc)


def _check_packages(server: MCPServer, settings: Settings) -> None:
    """Refuse to start, naming the package, when the configuration needs one that is missing:
    better than a login that stops halfway or a 500 on the first token."""
    needed = ["redis"] if settings.redis_url or isinstance(server.store, RedisStore) else []
    if not settings.stdio and settings.auth in ("builtin", "external"):
        needed += ["tokens", "sealing"] if settings.auth == "builtin" else ["tokens"]
        if settings.auth == "external" and not settings.auth_secret:
            needed.append("jwks")
    if server._login is not None:
        needed.append("vault")
        if isinstance(server._login.provider, OIDCProvider):
            needed += ["tokens", "jwks"]  # (ID tokens: PyJWT and the RSA/EC algorithms)
    for feature in needed:
        try:
            _require(feature)
        except _MissingPackage as exc:
            raise SystemExit(f"mcp_server: error: {exc}") from None


def serve(server: MCPServer, settings: Settings | None = None) -> None:
    """Run ``server`` until interrupted: HTTP on the bundled server (``--workers`` processes), or stdio."""
    settings = settings or server.settings
    server.settings = settings
    # (settings built in code skip Settings.load's check; a store given in code counts too)
    settings.check_secrets(shared_store=server.store is not None and not isinstance(server.store, MemoryStore))
    _check_packages(server, settings)
    _configure_logging(settings.log_level, settings.log_format, settings.log_file)
    if getattr(settings, "dotenv_file", ""):  # which file, and what it set; never a value
        log.info("settings read from %s: %s", settings.dotenv_file, ", ".join(settings.dotenv_names) or "none")
    if not settings.stdio:  # what starting up left behind (before the freeze, which would keep its cycles)
        _give_back_memory()
    if settings.workers > 1 and not os.environ.get("MCP_WORKER_ID"):
        sys.exit(_supervise(settings))  # (a supervisor that mostly sleeps, and is small)
    if os.environ.get("MCP_WORKER_ID") and os.environ.get(_WORKER_METRICS_DIR):
        _metrics.share(os.environ[_WORKER_METRICS_DIR], os.environ["MCP_WORKER_ID"])
    # A server allocates many short-lived objects per request and keeps long-lived ones (sessions,
    # event logs): collecting the young generation less often and never rescanning what startup
    # made cuts the tail latency under load (bench/RESULTS.md, issue 20: gc.freeze).  Only here, where
    # this module owns the process; an application that mounts ``server.asgi`` keeps its own.
    import gc
    gc.freeze()
    gc.set_threshold(max(gc.get_threshold()[0], 50000), 20, 20)
    try:
        if settings.stdio:
            asyncio.run(_serve_stdio(server))
        else:
            with asyncio.Runner(loop_factory=_http_loop_factory(settings)) as runner:
                runner.run(_serve_http(server.asgi, settings, server))
    except KeyboardInterrupt:
        pass


_WORKER_METRICS_DIR = "MCP_WORKER_METRICS_DIR"  # (set by the supervisor for its workers: _Metrics.share)


def _supervise(settings: Settings) -> int:
    """Run ``settings.workers`` copies of this command on one port (SO_REUSEPORT); restart a
    worker that dies, and on SIGTERM/SIGINT stop them all gracefully.  With /metrics served,
    the workers share their counters through a directory of the supervisor's."""
    import shutil
    import tempfile
    metrics_dir = tempfile.mkdtemp(prefix="mcp-metrics-") if settings.metrics_token else ""  # (mode 0700)
    try:
        return _run_workers(settings, {_WORKER_METRICS_DIR: metrics_dir} if metrics_dir else {})
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _run_workers(settings: Settings, extra_env: dict) -> int:
    import subprocess
    if settings.port == 0:
        print("mcp_server: error: --workers needs a fixed --port", file=sys.stderr)
        return 2
    if not hasattr(socket, "SO_REUSEPORT"):
        print("mcp_server: error: --workers needs SO_REUSEPORT, which this platform lacks", file=sys.stderr)
        return 2
    # the parent's own command line, interpreter options and all: ``-m mcp_server`` stays a module
    # run (cached byte code), where sys.argv would make each worker compile the file anew
    command = [sys.executable, *sys.orig_argv[1:]]
    if len(command) == 1:
        print("mcp_server: error: --workers needs a command line to start the workers with (this "
              "interpreter is embedded)", file=sys.stderr)
        return 2
    stopping = threading.Event()

    def stop(_signum, _frame):
        stopping.set()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def start(index: int):
        # glibc's allocator, so that a worker's trims give memory back (docs/operations.md: Memory); the
        # operator's own PYTHONMALLOC wins
        env = {"PYTHONMALLOC": "malloc", **os.environ, **extra_env, "MCP_WORKER_ID": str(index)}
        return subprocess.Popen(command, env=env)

    workers = {i: start(i) for i in range(settings.workers)}
    print(f"mcp_server: supervising {settings.workers} workers on port {settings.port}", file=sys.stderr, flush=True)
    restarts: dict = collections.defaultdict(list)
    while not stopping.is_set():
        stopping.wait(0.2)
        for index, process in list(workers.items()):
            code = process.poll()
            if code is None or stopping.is_set():
                continue
            recent = [t for t in restarts[index] if time.monotonic() - t < 60] + [time.monotonic()]
            restarts[index] = recent
            if len(recent) > 5:
                print(f"mcp_server: worker {index} keeps dying (exit {code}); giving up", file=sys.stderr)
                stopping.set()
                break
            print(f"mcp_server: worker {index} exited with {code}; restarting it", file=sys.stderr, flush=True)
            workers[index] = start(index)
    for process in workers.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + settings.drain_seconds + settings.drain_grace + 5  # (each worker drains)
    for process in workers.values():
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
    return 0


# The built-in server's own skills (SEP-2640): how to use its tools, served to any client that
# speaks the skills extension (and readable by any other as ordinary skill:// resources).
_BUILTIN_SKILLS = {
    "upstream-login": ("""---
name: upstream-login
description: Sign the user in to their upstream account with the login tool, and what to do when a tool says to log in
---

# Signing in to the upstream account

The account tools (`profile`, `holdings`, `orders`, `service`) act as the signed-in user.
Until the user signs in, each of them answers with a tool error that says to log in.

1. Call `login` (no arguments). It returns `url` and `pairing_code`; a client that supports
   URL elicitation is also asked to open the link.
2. Ask the user to open the link in their browser, sign in at the provider, and enter the
   pairing code on the page. The link expires after 10 minutes.
3. The pairing code is for the user alone: never repeat it anywhere else, never enter it
   yourself, and never ask the user to send it to you.
4. When the user says they are done, call the account tool again.

`logout` revokes the upstream tokens and deletes the stored credentials. See
`references/errors.md` for the messages the tools give and what each means.
""", {"references/errors.md": """# Messages of the login and account tools

| Message says | Meaning | What to do |
| --- | --- | --- |
| log in / not signed in | no credentials for this user | run the `login` skill steps |
| expired / sign in again | the upstream session ended | call `login` again |
| path not allowed | `service` was given a path outside the allowed list | use one of the paths in the tool's description |
"""}),
    "account-tools": ("""---
name: account-tools
description: What the profile, holdings, orders, service and server_info tools return and how to read their results
---

# The account tools and their results

Every result has a text block and, for objects, `structuredContent` with the same data.
Identifiers (account numbers, emails, phone numbers and the like) come back masked, for
example `XXXX1234`: show them as they are, never try to reconstruct them.

- `profile`: the user's account profile at the upstream provider.
- `holdings`: the securities held, with quantities and prices.
- `orders`: today's orders and their status.
- `service`: GET one allowed path of the upstream API (`path`, optional `params`); the
  allowed paths are listed in the tool's description.
- `server_info`: this server's name, version, store and the protocol revision in use
  (no sign-in needed).

An error result (`isError: true`) explains itself in its text; when it says to log in,
follow the `upstream-login` skill.
""", None),
}


def _builtin_server(settings: Settings) -> MCPServer:
    """The server ``python mcp_server.py`` runs: its built-in tools on the configured store."""
    server = MCPServer("mcp_server", version=settings.app_version or __version__, settings=settings,
                       instructions="Tools of the mcp_server reference deployment. Call server_info "
                                    "to see the server's version, store and your protocol revision.")

    if settings.redis_url and not settings.encryption_key:
        raise SystemExit("mcp_server: error: ENCRYPTION_KEY is required with Redis: the upstream "
                         "credentials kept there are encrypted with it")
    settings.check_secrets("mcp_server")
    server.add_login_tools()

    @server.tool(title="Server information", annotations={"readOnlyHint": True, "openWorldHint": False})
    def server_info(ctx: Context) -> dict:
        """The server's name and version, the store it keeps state in, and your protocol revision."""
        return {"name": server.name, "version": server.version,
                "store": server.store.name if server.store is not None else "memory",
                "protocolVersion": ctx.protocol_version, "supportedVersions": list(SUPPORTED_VERSIONS)}

    for skill_md, files in _BUILTIN_SKILLS.values():
        server.add_skill(skill_md, files)
    return server


def _settings_table() -> str:
    """Every setting as a Markdown table (docs/configuration.md is this output)."""
    def cell(value):
        if isinstance(value, bool):
            return "`true`" if value else "`false`"
        if value == "" or value == ():
            return "(empty)"
        if isinstance(value, tuple):
            return "`" + ",".join(value) + "`"
        return f"`{value}`"
    rows = ["| Flag | Environment | Default | Meaning |", "|---|---|---|---|"]
    for _attr, flag, names, _parse, default, help_text in _SETTING_SPECS:
        rows.append(f"| {f'`{flag}`' if flag else '(env only)'} | {', '.join(f'`{n}`' for n in names)} "
                    f"| {cell(default)} | {help_text.replace('|', '/')} |")
    return "\n".join(rows)


_TABLE_START, _TABLE_END = "<!-- settings-table:start -->", "<!-- settings-table:end -->"


def _write_settings_table(path: str) -> None:
    """Put the settings table between the markers of the page at ``path`` (docs/configuration.md)."""
    try:
        with open(path, encoding="utf-8") as f:
            page = f.read()
    except OSError as exc:
        raise SystemExit(f"mcp_server: error: cannot read {path}: {exc.strerror or exc}")
    start, end = page.find(_TABLE_START), page.find(_TABLE_END)
    if start < 0 or end < start:
        raise SystemExit(f"mcp_server: error: {path} has no {_TABLE_START} ... {_TABLE_END} markers")
    page = page[:start + len(_TABLE_START)] + "\n" + _settings_table() + "\n" + page[end:]
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)


def _encrypt_command(args: list) -> None:
    """``encrypt --setting NAME VALUE``: print VALUE as an ``enc:`` value of setting NAME (bound
    to it: it decrypts as no other setting).  VALUE ``-`` reads it from stdin, out of the shell's
    history and the process list."""
    usage = "mcp_server: error: usage: python mcp_server.py encrypt --setting NAME VALUE (VALUE - reads stdin)"
    if len(args) != 3 or args[0] != "--setting":
        raise SystemExit(usage)
    textual = {env_names[0] for _attr, _flag, env_names, parse, *_ in _SETTING_SPECS if parse is str}
    name = args[1].upper()
    if name not in textual or name == "ENCRYPTION_KEY":
        raise SystemExit(f"mcp_server: error: {args[1]!r} is not a setting that takes an enc: value")
    value = sys.stdin.readline().rstrip("\r\n") if args[2] == "-" else args[2]
    key = Settings.load([]).encryption_key
    if not key:
        raise SystemExit("mcp_server: error: set ENCRYPTION_KEY first (the same key the server uses)")
    print("enc:" + _Vault(key).encrypt(value, _setting_ad(name)))


def main(argv: list | None = None) -> None:
    """``python mcp_server.py [flags]``: the built-in server (see ``--help``);
    ``python mcp_server.py encrypt --setting NAME VALUE``: print VALUE as an ``enc:`` value of NAME;
    ``python mcp_server.py settings``: print every setting as a Markdown table;
    ``python mcp_server.py settings --write docs/configuration.md``: put it into that page."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["settings"]:
            if argv[1:2] == ["--write"] and len(argv) == 3:
                _write_settings_table(argv[2])
            elif len(argv) == 1:
                print(_settings_table())
            else:
                raise SystemExit("mcp_server: error: usage: python mcp_server.py settings [--write PAGE.md]")
            return
        if argv[:1] == ["encrypt"]:
            _encrypt_command(argv[1:])
            return
        settings = Settings.load(argv)
        server = _builtin_server(settings)
    except _MissingPackage as exc:
        print(f"mcp_server: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except SystemExit as exc:
        if exc.code not in (0, None):
            print(exc.code, file=sys.stderr)
            sys.exit(2)
        raise
    serve(server, settings)


if __name__ == "__main__":
    main()
