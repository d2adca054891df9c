"""An MCP App (``io.modelcontextprotocol/ui``): a counter a host renders next to a tool result.

``show_counter`` points at the ``ui://counter/view`` resource (``_meta.ui.resourceUri``); a host
that supports MCP Apps reads that resource (``text/html;profile=mcp-app``), renders it in a
sandboxed iframe, and passes the tool's result to it.  The page's "+1" button calls the
app-only ``increment`` tool through the host (``visibility: ["app"]``: the model never sees it).
A host without Apps support shows the text block instead.

    python examples/apps_server.py --port 3002 --no-auth

Opened directly in a browser (no host), the page says so and shows the counter without data.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mcp_server import MCPServer, Settings  # noqa: E402

server = MCPServer("counter-app", version="1.0.0", settings=Settings(auth="none"))

COUNTER_HTML = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Counter</title>
<style>
  :root { color-scheme: light dark; font-family: var(--font-sans, system-ui, sans-serif); }
  body { margin: 0; padding: 16px; background: var(--color-background-primary, Canvas);
         color: var(--color-text-primary, CanvasText); }
  #count { font-size: 48px; font-weight: 600; margin: 8px 0; }
  button { font-size: 16px; padding: 6px 16px; border-radius: var(--border-radius-md, 6px); }
  #status { font-size: 13px; opacity: 0.7; }
</style>
</head>
<body data-state="loading">
<h1>Counter</h1>
<div id="count" aria-live="polite">-</div>
<button id="increment" type="button" disabled>+1</button>
<p id="status">Starting...</p>
<script>
"use strict";
(() => {
  const countEl = document.getElementById("count");
  const statusEl = document.getElementById("status");
  const button = document.getElementById("increment");
  const pending = new Map();
  let nextId = 1;
  let count = null;

  function show(state, text) {
    document.body.dataset.state = state;
    statusEl.textContent = text;  // textContent only: nothing from a result becomes markup
  }
  function render(result) {
    const value = result && result.structuredContent && result.structuredContent.count;
    if (!Number.isInteger(value)) { show("error", "The tool result has no count."); return; }
    count = value;
    countEl.textContent = String(value);
    button.disabled = false;
    show("ready", "Click +1 to count.");
    notify("ui/notifications/size-changed", {width: document.body.scrollWidth,
                                             height: document.body.scrollHeight});
  }
  function send(message) { window.parent.postMessage(message, "*"); }
  function notify(method, params) { send({jsonrpc: "2.0", method, params}); }
  function request(method, params) {
    const id = nextId++;
    send({jsonrpc: "2.0", id, method, params});
    return new Promise((resolve, reject) => pending.set(id, {resolve, reject}));
  }

  if (window.parent === window) {
    show("no-host", "No MCP host: this page is an MCP App. Open it from a host that renders " +
                    "io.modelcontextprotocol/ui resources.");
    return;
  }
  window.addEventListener("message", (event) => {
    if (event.source !== window.parent) return;  // only the host speaks to this view
    const message = event.data;
    if (!message || message.jsonrpc !== "2.0") return;
    if (message.id !== undefined && pending.has(message.id)) {
      const {resolve, reject} = pending.get(message.id);
      pending.delete(message.id);
      if (message.error) reject(new Error(message.error.message)); else resolve(message.result);
    } else if (message.method === "ui/notifications/tool-result") {
      render(message.params);
    } else if (message.method === "ui/notifications/host-context-changed" && message.params.theme) {
      document.documentElement.style.colorScheme = message.params.theme;
    }
  });
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      render(await request("tools/call", {name: "increment", arguments: {count}}));
    } catch (error) {
      show("error", "The host could not call increment: " + error.message);
      button.disabled = false;
    }
  });
  request("ui/initialize", {protocolVersion: "2026-01-26", appInfo: {name: "counter", version: "1.0.0"},
                            appCapabilities: {availableDisplayModes: ["inline"]}})
    .then((result) => {
      const theme = result && result.hostContext && result.hostContext.theme;
      if (theme) document.documentElement.style.colorScheme = theme;
      notify("ui/notifications/initialized", {});
      show("waiting", "Waiting for the tool result...");
    })
    .catch((error) => show("error", "The host refused ui/initialize: " + error.message));
})();
</script>
</body>
</html>
"""


@server.app("ui://counter/view", name="Counter", description="A counter the user can click",
            prefers_border=True)
def counter_view() -> str:
    """The counter's page (no external origins: the default, strictest CSP applies)."""
    return COUNTER_HTML


@server.tool(title="Show a counter", app="ui://counter/view", annotations={"readOnlyHint": True})
def show_counter(start: int = 0) -> dict:
    """Show a counter that starts at ``start``; a host with MCP Apps renders it as a widget."""
    return {"count": start}


@server.tool(title="Increment", meta={"ui": {"resourceUri": "ui://counter/view", "visibility": ["app"]}},
             annotations={"readOnlyHint": True})
def increment(count: int, by: int = 1) -> dict:
    """The counter's next value (called by the counter app, not by the model)."""
    return {"count": count + by}


if __name__ == "__main__":
    server.run()
