#!/usr/bin/env python3
"""A small, configurable MCP server (agent) used by capmesh's end-to-end tests.

It is written the way any user would write an agent with the official Python SDK
(`mcp` 2.3.0, `MCPServer`); it knows nothing about capmesh. One server serves both MCP
protocol generations on the same endpoint, `http://HOST:PORT/mcp` (streamable HTTP):

* 2025-03-26 ... 2025-11-25: `initialize` handshake, `Mcp-Session-Id` sessions, GET stream;
* 2026-07-28: stateless POSTs routed by the `MCP-Protocol-Version` header.

Usage:
    python agent.py --port P [--host 127.0.0.1] [--name NAME]
                    [--tools weather,echo,slow,caller,headers,fail] [--delay-ms N]
                    [--journal FILE] [--no-host-check]

`--port 0` picks a free port; the real one is printed as `READY <port>` (stdout, flushed)
once the socket is listening. SIGTERM/SIGINT stop it cleanly (open streams are closed after
at most 2 s). SIGUSR1 toggles an extra tool `extra` and sends
`notifications/tools/list_changed` (legacy sessions: on their GET stream; 2026-07-28:
to `subscriptions/listen` streams).

Tools (selected by --tools; default: weather,echo,slow,caller):
    weather         get_weather(city)            -> "<NAME>: sunny in <city>"
    echo            echo(text)                   -> "<NAME>: <text>"
    slow            slow_count(n, delay_ms=100)  -> progress 1..n (total n), then "<NAME>: counted <n>"
    caller|headers  whoami()                     -> JSON of the HTTP request headers the tool saw
    fail            fail(message)                -> a tool error (isError: true) with <message>
    ask             ask(question)                -> asks the client to sample (sampling/createMessage
                                                    on the call's own stream, 2025 sessions only), then
                                                    "<NAME>: <the client's answer>"
    consult         consult(question)            -> the same through the SDK's resolver (Resolve +
                                                    Sample): 2026-07-28 answers `input_required`
                                                    with a requestState only this process can open,
                                                    and finishes when the client retries with the
                                                    sampled answer

slow_count prints "CANCELLED slow_count" on stderr when its call is cancelled (a 2026-07-28
client closing the stream, or notifications/cancelled in a 2025 session).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
import warnings
from typing import Annotated, Any

import uvicorn
from pydantic import Field

import mcp_types as types
from mcp.server import MCPServer
from mcp.server.mcpserver import Resolve, Sample
from mcp.server.mcpserver.context import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.subscriptions import InMemorySubscriptionBus, ToolsListChanged
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

# ctx.info()/log() are deprecated in 2026-07-28 (still delivered to legacy sessions, and to
# modern requests that opt in with _meta log level); keep stderr clean.
warnings.filterwarnings("ignore", category=DeprecationWarning)
try:
    from mcp.shared.exceptions import MCPDeprecationWarning

    warnings.filterwarnings("ignore", category=MCPDeprecationWarning)
except ImportError:  # pragma: no cover
    pass

TOOL_KEYS = {
    "weather": "get_weather",
    "get_weather": "get_weather",
    "echo": "echo",
    "slow": "slow_count",
    "slow_count": "slow_count",
    "caller": "whoami",
    "headers": "whoami",
    "whoami": "whoami",
    "fail": "fail",
    "ask": "ask",
    "consult": "consult",
}
DEFAULT_TOOLS = "weather,echo,slow,caller"
REPORTED_HEADERS = (
    "x-capmesh-caller",
    "x-tenant-id",
    "x-secret",
    "traceparent",
    "tracestate",
    "host",
    "authorization",
    "mcp-session-id",
    "mcp-protocol-version",
    "mcp-method",
    "mcp-name",
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="MCP test agent (mcp SDK, streamable HTTP at /mcp)")
    p.add_argument("--port", type=int, required=True, help="TCP port; 0 picks a free one (see READY line)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--name", default="agent", help="instance name, prefixed to every tool result")
    p.add_argument("--tools", default=DEFAULT_TOOLS, help=f"comma-separated: {','.join(sorted(TOOL_KEYS))}")
    p.add_argument("--delay-ms", type=int, default=0, help="extra latency added to every tool call")
    p.add_argument(
        "--journal",
        default=None,
        help="append '<tool> <argument>' to this file as each get_weather/echo call's request "
        "arrives, before the SDK handles it (so a test knows which calls reached this agent "
        "before it was killed)",
    )
    p.add_argument(
        "--no-host-check",
        action="store_true",
        help="disable the SDK's DNS-rebinding protection (Host/Origin allow-list)",
    )
    return p.parse_args(argv)


async def sample_answer(question: str) -> Sample:
    """The resolver of consult(): ask the client's model (module level, so annotations resolve)."""
    return Sample([types.SamplingMessage(role="user", content=types.TextContent(type="text", text=question))], max_tokens=50)


def build_server(args: argparse.Namespace) -> tuple[MCPServer, InMemorySubscriptionBus, Any]:
    name = args.name
    delay = max(args.delay_ms, 0) / 1000.0
    bus = InMemorySubscriptionBus()
    server = MCPServer(name, instructions=f"capmesh test agent {name}", log_level="WARNING", subscriptions=bus)

    # Legacy (2025) sessions seen so far, to send them tools/list_changed on their standalone
    # (GET) stream. A ServerSession is per request but sends unrelated notifications on its
    # connection's standalone channel, so the latest one per Mcp-Session-Id is kept.
    legacy_sessions: dict[str, Any] = {}

    async def remember_sessions(ctx: Any, call_next: Any) -> Any:
        request = getattr(ctx, "request", None)
        headers = getattr(request, "headers", None)
        session_id = headers.get("mcp-session-id") if headers is not None else None
        if session_id and ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
            legacy_sessions[session_id] = ctx.session
        return await call_next(ctx)

    server.middleware.append(remember_sessions)

    async def pause() -> None:
        if delay:
            await asyncio.sleep(delay)

    async def get_weather(city: Annotated[str, Field(description="City name, e.g. Paris")]) -> str:
        await pause()
        return f"{name}: sunny in {city}"

    async def echo(text: Annotated[str, Field(description="Text to echo back")]) -> str:
        await pause()
        return f"{name}: {text}"

    async def slow_count(
        ctx: Context,
        n: Annotated[int, Field(description="Number of steps (one progress notification each)", ge=0)],
        delay_ms: Annotated[int, Field(description="Milliseconds between steps", ge=0)] = 100,
    ) -> str:
        await pause()
        try:
            for i in range(1, n + 1):
                await asyncio.sleep(delay_ms / 1000.0)
                await ctx.report_progress(i, n, f"step {i}/{n}")
                await ctx.info(f"{name}: step {i}/{n}")
        except asyncio.CancelledError:
            print("CANCELLED slow_count", file=sys.stderr, flush=True)
            raise
        return f"{name}: counted {n}"

    async def ask(ctx: Context, question: Annotated[str, Field(description="What to ask the client's model")]) -> str:
        await pause()
        result = await ctx.session.create_message(
            messages=[types.SamplingMessage(role="user", content=types.TextContent(type="text", text=question))],
            max_tokens=50,
            related_request_id=ctx.request_context.request_id,
        )
        return f"{name}: {getattr(result.content, 'text', result.content)}"

    async def consult(
        question: Annotated[str, Field(description="What to ask the client's model")],
        answer: Annotated[types.CreateMessageResult, Resolve(sample_answer)],
    ) -> str:
        await pause()
        return f"{name}: {getattr(answer.content, 'text', answer.content)}"

    async def whoami(ctx: Context) -> str:
        await pause()
        headers = ctx.headers or {}
        seen = {h: headers.get(h) for h in REPORTED_HEADERS}
        seen["name"] = name
        seen["protocol_version"] = ctx.protocol_version
        seen["all_headers"] = {k: v for k, v in headers.items()}
        return json.dumps(seen, sort_keys=True)

    async def fail(message: Annotated[str, Field(description="Error text to return")] = "failed") -> str:
        await pause()
        raise ToolError(f"{name}: {message}")

    async def extra() -> str:
        await pause()
        return f"{name}: extra"

    catalog = {
        "get_weather": (get_weather, "Get the current weather for a city."),
        "echo": (echo, "Echo the given text back, prefixed with the agent name."),
        "slow_count": (
            slow_count,
            "Count to n slowly, sending a progress notification (and a log message) per step.",
        ),
        "whoami": (whoami, "Report the HTTP request headers this tool call arrived with (JSON)."),
        "fail": (fail, "Always fails with a tool error (isError: true)."),
        "ask": (ask, "Ask the client's model a question (sampling) and return its answer."),
        "consult": (consult, "Ask the client's model a question (SDK resolver; input_required in 2026-07-28)."),
    }
    wanted: list[str] = []
    for key in (k.strip() for k in args.tools.split(",")):
        if not key:
            continue
        if key not in TOOL_KEYS:
            raise SystemExit(f"unknown tool {key!r}; known: {', '.join(sorted(TOOL_KEYS))}")
        if TOOL_KEYS[key] not in wanted:
            wanted.append(TOOL_KEYS[key])
    for tool in wanted:
        fn, description = catalog[tool]
        server.add_tool(fn, name=tool, description=description, structured_output=False)

    state = {"extra": False}

    async def toggle_extra() -> None:
        if state["extra"]:
            server.remove_tool("extra")
        else:
            server.add_tool(extra, name="extra", description="A tool added at runtime (SIGUSR1).", structured_output=False)
        state["extra"] = not state["extra"]
        print(f"TOOLS {'added' if state['extra'] else 'removed'} extra", flush=True)
        await bus.publish(ToolsListChanged())
        for session_id, session in list(legacy_sessions.items()):
            try:
                await session.send_tool_list_changed()
            except Exception:  # a closed session: forget it
                legacy_sessions.pop(session_id, None)

    return server, bus, toggle_extra


class Journal:
    """ASGI middleware: appends `<tool> <argument>` to a file for each get_weather/echo call the
    moment its HTTP request body has arrived, before the MCP SDK sees it, so a test knows which
    calls reached this process before it was killed. Written through to the kernel at once (it
    survives a SIGKILL)."""

    ARGUMENT = {"get_weather": "city", "echo": "text"}

    def __init__(self, app: Any, path: str) -> None:
        self.app = app
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        messages = []
        while True:
            message = await receive()
            messages.append(message)
            if message.get("type") != "http.request" or not message.get("more_body", False):
                break
        body = b"".join(m.get("body", b"") for m in messages)
        try:
            rpc = json.loads(body)
            params = rpc.get("params") or {} if isinstance(rpc, dict) else {}
            tool = params.get("name") if rpc.get("method") == "tools/call" else None
            if tool in self.ARGUMENT:
                argument = (params.get("arguments") or {}).get(self.ARGUMENT[tool], "")
                self.file.write(f"{tool} {argument}\n")
                self.file.flush()
        except (ValueError, AttributeError):
            pass
        pending = iter(messages)

        async def replay() -> Any:
            try:
                return next(pending)
            except StopIteration:
                return await receive()

        await self.app(scope, replay, send)


async def serve(args: argparse.Namespace) -> None:
    server, _bus, toggle_extra = build_server(args)
    security = None
    if args.no_host_check:
        security = TransportSecuritySettings(enable_dns_rebinding_protection=False)
    app = server.streamable_http_app(streamable_http_path="/mcp", host=args.host, transport_security=security)
    if args.journal:
        app = Journal(app, args.journal)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        timeout_graceful_shutdown=2,
        lifespan="on",
    )
    web = uvicorn.Server(config)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, restores the previous handlers and then
    # re-raises the signal; with a no-op handler here the process then exits 0.
    signal.signal(signal.SIGTERM, lambda _sig, _frame: None)
    task = asyncio.create_task(web.serve())
    while not web.started:
        if task.done():
            await task  # re-raise the bind error
            raise SystemExit("uvicorn stopped before it started")
        await asyncio.sleep(0.01)
    port = web.servers[0].sockets[0].getsockname()[1]
    print(f"READY {port}", flush=True)

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, lambda: asyncio.ensure_future(toggle_extra()))
    await task


def main() -> None:
    args = parse_args(sys.argv[1:])
    started = time.monotonic()
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass
    print(f"agent {args.name} (pid {os.getpid()}) stopped after {time.monotonic() - started:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
