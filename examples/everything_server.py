"""The "everything" fixture for the official MCP conformance suite.

This server exposes exactly the tools, resources and prompts, with the exact names, texts and
schemas, that ``@modelcontextprotocol/conformance`` (0.2.0-alpha.12) drives. The same
definitions serve both wires: the stateful 2025-11-25 one and the stateless 2026-07-28 one.
On 2025-11-25, ``ctx.sample``/``ctx.elicit``/``ctx.list_roots`` become real server-to-client
requests. On 2026-07-28 they become multi-round-trip ``input_required`` results.
It also serves two skills (SEP-2640) for the suite's ``sep-2640-*`` scenarios: one read from
``examples/skills/`` and one registered in code under a nested path.

Run it (on the bundled server, or as ``server.asgi`` under any ASGI server, trio included: its
tools wait with ``anyio``, which runs on both), then point the harness at it::

    python examples/everything_server.py --port 3001
    # or: cd examples && uvicorn everything_server:server.asgi --port 3001
    # or: cd examples && hypercorn -k trio -b 127.0.0.1:3001 everything_server:server.asgi
    npx @modelcontextprotocol/conformance server --url http://127.0.0.1:3001/mcp --requirements 2026-07-28
    npx @modelcontextprotocol/conformance server --url http://127.0.0.1:3001/mcp --scenario sep-2640-skills-enumeration
"""

import anyio
import base64
import json
import os
import sys
from typing import Annotated

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mcp_server import (  # noqa: E402
    Audio, Context, EmbeddedResource, Image, MCPServer, Param, RpcError, Settings, ToolError,
)

# The conformance suite drives the MCP endpoint without OAuth, so this fixture turns auth off
# (flags and environment can still turn it on: MCP_AUTH=builtin).
server = MCPServer("mcp-conformance-test-server", version="1.0.0", settings=Settings(auth="none"))

# --- Fixture data ---------------------------------------------------------------------------

PNG_BASE64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
WAV_BASE64 = "UklGRiYAAABXQVZFZm10IBAAAAABAAEAQB8AAAB9AAACABAAZGF0YQIAAAA="

JSON_SCHEMA_2020_12 = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "$defs": {
        "address": {
            "$anchor": "addressDef",
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
        },
    },
    "properties": {
        "name": {"type": "string"},
        "address": {"$ref": "#/$defs/address"},
        "contactMethod": {"type": "string", "enum": ["phone", "email"]},
        "phone": {"type": "string"},
        "email": {"type": "string"},
    },
    "allOf": [{"anyOf": [{"required": ["phone"]}, {"required": ["email"]}]}],
    "if": {"properties": {"contactMethod": {"const": "phone"}}, "required": ["contactMethod"]},
    "then": {"required": ["phone"]},
    "else": {"required": ["email"]},
    "additionalProperties": False,
}

SEP1034_DEFAULTS_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "default": "John Doe"},
        "age": {"type": "integer", "default": 30},
        "score": {"type": "number", "default": 95.5},
        "status": {"type": "string", "enum": ["active", "inactive", "pending"], "default": "active"},
        "verified": {"type": "boolean", "default": True},
    },
    "required": [],
}

SEP1330_ENUMS_SCHEMA = {
    "type": "object",
    "properties": {
        "untitledSingle": {"type": "string", "enum": ["option1", "option2", "option3"]},
        "titledSingle": {
            "type": "string",
            "oneOf": [
                {"const": "value1", "title": "First Option"},
                {"const": "value2", "title": "Second Option"},
                {"const": "value3", "title": "Third Option"},
            ],
        },
        "legacyEnum": {
            "type": "string",
            "enum": ["opt1", "opt2", "opt3"],
            "enumNames": ["Option One", "Option Two", "Option Three"],
        },
        "untitledMulti": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {"type": "string", "enum": ["option1", "option2", "option3"]},
        },
        "titledMulti": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "anyOf": [
                    {"const": "value1", "title": "First Choice"},
                    {"const": "value2", "title": "Second Choice"},
                    {"const": "value3", "title": "Third Choice"},
                ],
            },
        },
    },
    "required": [],
}


def _form(**fields: str) -> dict:
    """An elicitation schema whose fields are all required, with the given JSON types."""
    return {
        "type": "object",
        "properties": {name: {"type": kind} for name, kind in fields.items()},
        "required": list(fields),
    }


def _elicitation(message: str, schema: dict) -> dict:
    return {"method": "elicitation/create", "params": {"message": message, "requestedSchema": schema}}


def _sampling(text: str, max_tokens: int) -> dict:
    return {
        "method": "sampling/createMessage",
        "params": {
            "messages": [{"role": "user", "content": {"type": "text", "text": text}}],
            "maxTokens": max_tokens,
        },
    }


ROOTS_REQUEST = {"method": "roots/list", "params": {}}


def _answer(elicit_result: dict, field: str):
    """One field of an accepted elicitation, or None."""
    return (elicit_result.get("content") or {}).get(field)


def _text_of(create_message_result: dict) -> str:
    """The text a sampling client answered with."""
    content = create_message_result.get("content")
    blocks = content if isinstance(content, list) else [content]
    texts = [block["text"] for block in blocks if isinstance(block, dict) and block.get("type") == "text"]
    return " ".join(texts) or "no response"


def _compact(value) -> str:
    return json.dumps(value, separators=(",", ":"))


def _outcome(elicit_result: dict) -> str:
    return f"action={elicit_result['action']}, content={_compact(elicit_result.get('content') or {})}"


# --- Content tools (both wires) -------------------------------------------------------------
# Registered first: http-header-validation calls the first listed tool with `{}` arguments.


@server.tool()
def test_simple_text() -> str:
    """Tests simple text content response"""
    return "This is a simple text response for testing."


@server.tool()
def test_image_content() -> Image:
    """Tests image content response"""
    return Image(base64=PNG_BASE64, mime_type="image/png")


@server.tool()
def test_audio_content() -> Audio:
    """Tests audio content response"""
    return Audio(base64=WAV_BASE64, mime_type="audio/wav")


@server.tool()
def test_embedded_resource() -> EmbeddedResource:
    """Tests embedded resource content response"""
    return EmbeddedResource("test://embedded-resource", text="This is an embedded resource content.",
                            mime_type="text/plain")


@server.tool()
def test_multiple_content_types() -> list:
    """Tests response with multiple content types (text, image, resource)"""
    return [
        "Multiple content types test:",
        Image(base64=PNG_BASE64, mime_type="image/png"),
        EmbeddedResource("test://mixed-content-resource", text=_compact({"test": "data", "value": 123}),
                         mime_type="application/json"),
    ]


@server.tool()
def test_error_handling() -> str:
    """Tests error response handling"""
    raise ToolError("This tool intentionally returns an error for testing")


# --- Notifications during a call ------------------------------------------------------------


@server.tool()
async def test_tool_with_progress(ctx: Context) -> str:
    """Tests tool that reports progress notifications"""
    await ctx.report_progress(0, 100)
    await anyio.sleep(0.05)
    await ctx.report_progress(50, 100)
    await anyio.sleep(0.05)
    await ctx.report_progress(100, 100)
    return str(ctx.meta.get("progressToken"))


@server.tool()
async def test_tool_with_logging(ctx: Context) -> str:
    """Tests tool that emits log messages during execution"""
    await ctx.log("info", "Tool execution started")
    await anyio.sleep(0.05)
    await ctx.log("info", "Tool processing data")
    await anyio.sleep(0.05)
    await ctx.log("info", "Tool execution completed")
    return "Tool with logging executed successfully"


# --- Requests to the client (2025-11-25 scenarios) ------------------------------------------


@server.tool()
async def test_sampling(prompt: Annotated[str, "The prompt to send to the LLM"], ctx: Context) -> str:
    """Tests server-initiated sampling (LLM completion request)"""
    result = await ctx.sample(prompt, max_tokens=100)
    return f"LLM response: {_text_of(result)}"


@server.tool()
async def test_elicitation(message: Annotated[str, "The message to show the user"], ctx: Context) -> str:
    """Tests server-initiated elicitation (user input request)"""
    schema = {
        "type": "object",
        "properties": {"response": {"type": "string", "description": "User's response"}},
        "required": ["response"],
    }
    return f"User response: {_outcome(await ctx.elicit(message, schema))}"


@server.tool()
async def test_elicitation_sep1034_defaults(ctx: Context) -> str:
    """Tests elicitation with default values per SEP-1034"""
    result = await ctx.elicit("Please review and update the form fields with defaults", SEP1034_DEFAULTS_SCHEMA)
    return f"Elicitation completed: {_outcome(result)}"


@server.tool()
async def test_elicitation_sep1330_enums(ctx: Context) -> str:
    """Tests elicitation with enum schema improvements per SEP-1330"""
    result = await ctx.elicit("Please select options from the enum fields", SEP1330_ENUMS_SCHEMA)
    return f"Elicitation completed: {_outcome(result)}"


# --- Schemas, headers and streams -----------------------------------------------------------


@server.tool(input_schema=JSON_SCHEMA_2020_12)
def json_schema_2020_12_tool(name: str | None = None, address: dict | None = None,
                             contactMethod: str | None = None, phone: str | None = None,
                             email: str | None = None) -> str:
    """Tool with JSON Schema 2020-12 features for conformance testing (SEP-1613)"""
    given = {"name": name, "address": address, "contactMethod": contactMethod, "phone": phone, "email": email}
    return f"JSON Schema 2020-12 tool called with: {_compact({k: v for k, v in given.items() if v})}"


REGION = Param(description="Deployment region, mirrored into the Mcp-Param-Region header", header="Region")


@server.tool()
def test_x_mcp_header(region: Annotated[str, REGION]) -> str:
    """Tests SEP-2243 Mcp-Param-* header validation against the region argument"""
    return f"region={region}"


@server.tool()
async def test_reconnection(ctx: Context) -> str:
    """Tests SSE stream disconnection and client reconnection (SEP-1699)

    The server closes the response stream mid-call; the result reaches the client only
    through its Last-Event-ID reconnection."""
    await ctx.close_sse_stream()
    await anyio.sleep(0.1)
    return "Reconnection test completed successfully"


# --- Stateless diagnostics (2026-07-28 server-stateless) ------------------------------------


@server.tool()
async def test_missing_capability(ctx: Context) -> str:
    """Test tool requiring sampling: clients that did not declare it get -32021"""
    result = await ctx.sample("Say hello", max_tokens=20)
    return f"Sampling available: {_text_of(result)}"


@server.tool()
async def test_streaming_elicitation(ctx: Context) -> str:
    """Diagnostic tool: elicits mid-call without ever streaming a JSON-RPC request to the client"""
    await ctx.report_progress(50, 100, "Waiting for the user")
    answer = await ctx.elicit("Continue?", _form(proceed="boolean"), key="proceed")
    return f"Streaming complete: action={answer['action']}"


@server.tool()
async def test_logging_tool(ctx: Context) -> str:
    """Diagnostic logging validator tool: logs only when the request set a log level"""
    await ctx.log("info", "Diagnostic trace logging activated")
    return "Logging evaluated"


@server.tool()
async def test_trigger_tool_change(ctx: Context) -> str:
    """Announces a tool list change to subscribed clients"""
    await ctx.server.notify_tools_changed()
    return "Tool list change announced"


@server.tool()
async def test_trigger_prompt_change(ctx: Context) -> str:
    """Announces a prompt list change to subscribed clients"""
    await ctx.server.notify_prompts_changed()
    return "Prompt list change announced"


# --- Multi round-trip input (2026-07-28 input-required-result-*) ----------------------------


@server.tool()
async def test_input_required_result_elicitation(ctx: Context) -> str:
    """MRTR: asks the client for the user's name via elicitation"""
    answer = await ctx.elicit("What is your name?", _form(name="string"), key="user_name")
    return f"Hello, {_answer(answer, 'name')}!"


@server.tool()
async def test_input_required_result_sampling(ctx: Context) -> str:
    """MRTR: asks the client for an LLM completion"""
    result = await ctx.sample("What is the capital of France?", max_tokens=100, key="sample_request")
    return f"Sampling result: {_text_of(result)}"


@server.tool()
async def test_input_required_result_list_roots(ctx: Context) -> str:
    """MRTR: asks the client for its roots"""
    roots = await ctx.list_roots(key="client_roots")
    return f"Found {len(roots)} root(s)"


@server.tool()
async def test_input_required_result_request_state(ctx: Context) -> str:
    """MRTR: round-trips a sealed requestState alongside the input request"""
    answer = await ctx.elicit("Please confirm", _form(ok="boolean"), key="confirm")
    return f"state-ok: confirmed={_answer(answer, 'ok')}"


@server.tool()
async def test_input_required_result_multiple_inputs(ctx: Context) -> str:
    """MRTR: asks for elicitation, sampling and roots in one round"""
    answers = await ctx.ask({
        "user_name": _elicitation("What is your name?", _form(name="string")),
        "greeting": _sampling("Generate a greeting", 50),
        "client_roots": ROOTS_REQUEST,
    })
    name, greeting = _answer(answers["user_name"], "name"), _text_of(answers["greeting"])
    return f"Name: {name}; Greeting: {greeting}; Roots: {len(answers['client_roots'].get('roots', []))}"


@server.tool()
async def test_input_required_result_multi_round(ctx: Context) -> str:
    """MRTR: two dependent questions over three rounds"""
    step1 = await ctx.elicit("Step 1: What is your name?", _form(name="string"), key="step1")
    step2 = await ctx.elicit("Step 2: What is your favorite color?", _form(color="string"), key="step2")
    return f"Multi-round complete for {_answer(step1, 'name')} who likes {_answer(step2, 'color')}"


@server.tool()
async def test_input_required_result_tampered_state(ctx: Context) -> str:
    """MRTR: a tampered requestState is rejected before this tool runs again"""
    await ctx.elicit("Please confirm", _form(ok="boolean"), key="confirm")
    return "integrity-ok: state verified"


@server.tool()
async def test_input_required_result_capabilities(ctx: Context) -> str:
    """MRTR: asks only for the kinds of input the client declared it can answer"""
    wanted = {}
    if ctx.supports("sampling"):
        wanted["sample_input"] = _sampling("Sample request", 50)
    if ctx.supports("elicitation"):
        wanted["elicit_input"] = _elicitation("Elicitation input", _form(value="string"))
    if ctx.supports("roots"):
        wanted["client_roots"] = ROOTS_REQUEST
    if not wanted:
        return "No supported input capabilities declared"
    answers = await ctx.ask(wanted)
    return f"capabilities-ok: received {','.join(answers)}"


# --- Tasks extension (SEP-2663) -------------------------------------------------------------


@server.tool()
def greet(name: str) -> str:
    """Greets someone; never runs as a task"""
    return f"Hello, {name}!"


@server.tool(task="optional")
async def slow_compute(seconds: float = 1.0, label: str = "") -> str:
    """Sleeps for the given number of seconds, so it can be cancelled while running"""
    await anyio.sleep(seconds)
    return f"Computed {label} after {seconds} seconds"


@server.tool(task="required")
async def failing_job() -> str:
    """Always fails with a tool error after about a second; runs only as a task"""
    await anyio.sleep(1)
    raise ToolError("This job intentionally fails for testing")


@server.tool(task="optional")
async def protocol_error_job() -> str:
    """Fails with a protocol-level error, so its task ends as failed"""
    raise RpcError(-32603, "Protocol-level failure for testing")


@server.tool(task="optional")
async def confirm_delete(filename: str, ctx: Context) -> str:
    """Asks the user to confirm before (pretending to) delete a file"""
    answer = await ctx.elicit(f"Delete {filename}?", _form(confirm="boolean"), key="confirm")
    if answer["action"] == "accept" and _answer(answer, "confirm"):
        return f"Deleted {filename}"
    return f"Kept {filename}"


@server.tool(task="optional")
async def multi_input(ctx: Context) -> str:
    """Asks two questions at once; they can be answered separately"""
    answers = await ctx.ask({
        "first": _elicitation("Who requested the change?", _form(name="string")),
        "second": _elicitation("Who approves the change?", _form(name="string")),
    })
    return f"Answers: {_answer(answers['first'], 'name')}, {_answer(answers['second'], 'name')}"


@server.tool(task="required", task_start="explicit")
async def test_tool_with_task(ctx: Context) -> str:
    """Gathers the user's name over MRTR, then finishes the work as a task"""
    answer = await ctx.elicit("What is your name?", _form(name="string"), key="user_name")
    await ctx.run_as_task()
    return f"Task completed for {_answer(answer, 'name')}"


# --- Resources ------------------------------------------------------------------------------


@server.resource("test://static-text", name="static-text", title="Static Text Resource",
                 mime_type="text/plain")
def static_text() -> str:
    """A static text resource for testing"""
    return "This is the content of the static text resource."


@server.resource("test://static-binary", name="static-binary", title="Static Binary Resource",
                 mime_type="image/png")
def static_binary() -> bytes:
    """A static binary resource (image) for testing"""
    return base64.b64decode(PNG_BASE64)


@server.resource("test://template/{id}/data", name="template", title="Resource Template",
                 mime_type="application/json")
def template_data(id: str) -> str:
    """A resource template with parameter substitution"""
    return _compact({"id": id, "templateTest": True, "data": f"Data for ID: {id}"})


@server.resource("test://watched-resource", name="watched-resource", title="Watched Resource",
                 mime_type="text/plain")
def watched_resource() -> str:
    """A resource clients can subscribe to for updates"""
    return "Watched resource content"


# --- Prompts --------------------------------------------------------------------------------


@server.prompt(title="Simple Test Prompt")
def test_simple_prompt() -> str:
    """A simple prompt without arguments"""
    return "This is a simple prompt for testing."


@server.prompt(title="Prompt With Arguments")
def test_prompt_with_arguments(arg1: Annotated[str, "First test argument"],
                               arg2: Annotated[str, "Second test argument"]) -> str:
    """A prompt with required arguments"""
    return f"Prompt with arguments: arg1='{arg1}', arg2='{arg2}'"


@server.prompt(title="Prompt With Embedded Resource")
def test_prompt_with_embedded_resource(resourceUri: Annotated[str, "URI of the resource to embed"]) -> list:
    """A prompt that includes an embedded resource"""
    return [
        EmbeddedResource(resourceUri, text="Embedded resource content for testing.", mime_type="text/plain"),
        "Please process the embedded resource above.",
    ]


@server.prompt(title="Prompt With Image")
def test_prompt_with_image() -> list:
    """A prompt that includes image content"""
    return [Image(base64=PNG_BASE64, mime_type="image/png"), "Please analyze the image above."]


@server.prompt()
async def test_input_required_result_prompt(ctx: Context) -> str:
    """MRTR: a prompt that asks the user for its context before rendering"""
    question = "What context should the prompt use?"
    answer = await ctx.elicit(question, _form(context="string"), key="user_context")
    return f"Prompt with context: {_answer(answer, 'context')}"


# --- Completion -----------------------------------------------------------------------------


@server.completion("ref/prompt", "test_prompt_with_arguments")
def complete_prompt_argument(argument: str, value: str, context: dict) -> list[str]:
    """No suggestions: the suite only checks that completion/complete answers with a list."""
    return []


# --- Skills (SEP-2640) ----------------------------------------------------------------------
# One skill from a folder (SKILL.md, references/, templates/) and one registered in code under a
# nested path: skills/list, skills/get, resources/directory/read and resources/read serve them.

server.add_skills(os.path.join(os.path.dirname(os.path.abspath(__file__)), "skills"))
server.add_skill("""---
name: refunds
description: Decide whether a refund request follows the policy, and draft the answer
---

# Refunds

Read `policy.md`, then answer the customer with the decision and its reason.
""", {"policy.md": "# Refund policy\n\nRefunds within 30 days of purchase, with the receipt.\n"},
    prefix="acme/billing")


if __name__ == "__main__":
    server.run()
