#!/usr/bin/env python3
"""A command-line MCP client (official `mcp` 2.3.0 SDK, `mcp.Client`) driven by capmesh's tests.

    python client.py --url URL --mode legacy|2026-07-28|auto [--header K=V ...]
                     [--timeout SECONDS] [--log-level LEVEL] COMMAND ...

--mode legacy       the 2025 generation: `initialize` handshake (the SDK offers 2025-11-25),
                    `Mcp-Session-Id` session, GET stream for server notifications, DELETE on exit.
--mode 2026-07-28   the stateless generation, pinned: no handshake, no probe; every POST carries
                    `MCP-Protocol-Version: 2026-07-28`, `Mcp-Method`, `Mcp-Name` and `_meta`.
--mode auto         the SDK default: `server/discover` probe, falls back to `initialize`.
--header K=V        an HTTP header sent on every request (repeatable), e.g. x-tenant-id=t1.
--log-level LEVEL   opt in to `notifications/message` on 2026-07-28 requests (legacy sessions
                    get them unconditionally).
--sample-reply TEXT declare the sampling capability and answer every sampling/createMessage
                    with TEXT (the requests seen are reported as "sampling" by `call`).

Commands (all output is JSON on stdout):
    info                                  {"protocol_version", "server_info", "capabilities", "instructions"}
    list                                  [{"name", "description", "inputSchema"}, ...]
    call TOOL JSON_ARGS                   {"result_text", "is_error", "structured_content", "progress":
                                           [{"progress", "total", "message", "elapsed_ms"}], "logs":
                                           [{"level", "data", "elapsed_ms"}], "result_elapsed_ms",
                                           "sampling": [{"id", "messages"}]}
                                          (elapsed_ms counted from the start of the tools/call)
    watch SECONDS                         one line per listing: {"t_ms", "event": "initial"|"list_changed",
                                           "tools": [names]}; waits SECONDS for
                                           notifications/tools/list_changed (legacy: GET stream;
                                           2026-07-28: subscriptions/listen), re-lists on each; exit 0.
    loop TOOL JSON_ARGS COUNT INTERVAL_MS one line per call: {"i", "ok", "text", "is_error", "error",
                                           "t_ms", "elapsed_ms"}; one session, reconnecting after a
                                           transport failure or a lost session. Exit 0 iff every call ok.

Errors: a JSON object with "error" (plus "kind", "code", "http_status" when known) and exit code
1 for an MCP / JSON-RPC error (including HTTP 4xx/5xx answers), 2 for a connection error
(refused, reset, timeout). A tool result with isError=true is not an error (exit 0).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx2

import mcp_types as types
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

warnings.filterwarnings("ignore", category=DeprecationWarning)
try:
    from mcp.shared.exceptions import MCPDeprecationWarning

    warnings.filterwarnings("ignore", category=MCPDeprecationWarning)
except ImportError:  # pragma: no cover
    pass

EXIT_OK, EXIT_MCP, EXIT_CONN = 0, 1, 2


def out(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def now_ms(t0: float) -> float:
    return round((time.monotonic() - t0) * 1000.0, 1)


class HttpLog:
    """Records the status of every HTTP response (the SDK maps statuses to JSON-RPC errors)."""

    def __init__(self) -> None:
        self.last_error_status: int | None = None

    async def on_response(self, response: httpx2.Response) -> None:
        if response.status_code >= 400:
            self.last_error_status = response.status_code


def leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        found: list[BaseException] = []
        for inner in exc.exceptions:
            found.extend(leaves(inner))
        return found
    chain = [exc]
    cause = exc.__cause__ or exc.__context__
    while cause is not None and len(chain) < 8:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    return chain


def classify(exc: BaseException, http: HttpLog) -> tuple[int, dict[str, Any]]:
    """(exit code, error JSON) for an exception raised by the SDK."""
    found = leaves(exc)
    for e in found:
        if isinstance(e, MCPError):
            info: dict[str, Any] = {"error": e.message, "kind": "mcp", "code": e.code}
            if e.error.data is not None:
                info["data"] = e.error.data
            if http.last_error_status is not None:
                info["http_status"] = http.last_error_status
            return EXIT_MCP, info
    for e in found:
        if isinstance(e, (httpx2.TransportError, OSError, TimeoutError)):
            return EXIT_CONN, {"error": f"{type(e).__name__}: {e}", "kind": "connection"}
    for e in found:
        if isinstance(e, httpx2.HTTPStatusError):
            return EXIT_MCP, {
                "error": str(e),
                "kind": "http",
                "http_status": e.response.status_code,
            }
    real = [e for e in found if not isinstance(e, anyio.get_cancelled_exc_class())]
    first = real[0] if real else (found[0] if found else exc)
    info = {"error": f"{type(first).__name__}: {first}", "kind": "other"}
    if http.last_error_status is not None:
        info["http_status"] = http.last_error_status
        return EXIT_MCP, info
    return EXIT_MCP, info


class Conn:
    """Per-connection recorders (log messages, tools/list_changed) shared with the SDK callbacks."""

    def __init__(self) -> None:
        self.logs: list[dict[str, Any]] = []
        self.t0 = time.monotonic()
        self.list_changed = anyio.Event()
        self.sampling: list[dict[str, Any]] = []

    async def on_log(self, params: types.LoggingMessageNotificationParams) -> None:
        self.logs.append({"level": params.level, "data": params.data, "elapsed_ms": now_ms(self.t0)})

    async def on_message(self, message: Any) -> None:
        if getattr(message, "method", None) == "notifications/tools/list_changed":
            self.list_changed.set()


@asynccontextmanager
async def connect(args: argparse.Namespace, http: HttpLog, conn: Conn) -> AsyncIterator[Client]:
    """One MCP connection: a legacy session (initialize ... DELETE) or a pinned 2026-07-28 client.

    Used strictly as `async with`, so a transport failure (which the SDK reports by cancelling
    the caller and raising from the client's task group on exit) surfaces as an exception here.
    """
    timeout = httpx2.Timeout(min(30.0, args.timeout), read=max(300.0, args.timeout))
    async with httpx2.AsyncClient(
        headers=dict(args.header), timeout=timeout, event_hooks={"response": [http.on_response]}
    ) as http_client:
        sampling: dict[str, Any] = {}
        if args.sample_reply is not None:
            reply = args.sample_reply

            async def on_sampling(ctx: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
                seen = [getattr(m.content, "text", None) for m in params.messages]
                conn.sampling.append({"id": getattr(ctx, "request_id", None), "messages": seen})
                return types.CreateMessageResult(
                    role="assistant", content=types.TextContent(type="text", text=reply), model="capmesh-test"
                )

            sampling["sampling_callback"] = on_sampling
        client = Client(
            streamable_http_client(args.url, http_client=http_client),
            mode=args.mode,
            cache=None,  # every list/call goes to the wire
            read_timeout_seconds=args.timeout,
            logging_callback=conn.on_log,
            message_handler=conn.on_message,
            log_level=args.log_level,
            **sampling,
        )
        async with client:
            yield client


def tool_json(tool: types.Tool) -> dict[str, Any]:
    return {"name": tool.name, "description": tool.description, "inputSchema": tool.input_schema}


def result_text(result: types.CallToolResult) -> str:
    parts = []
    for block in result.content:
        text = getattr(block, "text", None)
        parts.append(text if text is not None else json.dumps(block.model_dump(mode="json", by_alias=True)))
    return "\n".join(parts)


async def list_all(client: Client) -> list[types.Tool]:
    tools: list[types.Tool] = []
    cursor: str | None = None
    for _ in range(100):
        page = await client.list_tools(cursor=cursor)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if not cursor:
            break
    return tools


async def call_once(conn: Conn, client: Client, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
    t0 = time.monotonic()
    conn.t0 = t0
    conn.logs = []
    progress: list[dict[str, Any]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append({"progress": value, "total": total, "message": message, "elapsed_ms": now_ms(t0)})

    result = await client.call_tool(tool, arguments, progress_callback=on_progress)
    return {
        "result_text": result_text(result),
        "is_error": bool(result.is_error),
        "structured_content": result.structured_content,
        "progress": progress,
        "logs": list(conn.logs),
        "result_elapsed_ms": now_ms(t0),
        "sampling": list(conn.sampling),
    }


async def cmd_info(conn: Conn, client: Client, _rest: list[str]) -> int:
    if client.protocol_version in MODERN_PROTOCOL_VERSIONS:
        # A pinned 2026-07-28 client sends no handshake; ask the server with server/discover.
        raw = await client.session.send_discover(client.protocol_version)
        meta = raw.get("_meta") or {}
        out(
            {
                "protocol_version": client.protocol_version,
                "server_info": meta.get("io.modelcontextprotocol/serverInfo"),
                "capabilities": raw.get("capabilities"),
                "instructions": raw.get("instructions"),
                "discover": raw,
            }
        )
        return EXIT_OK
    info = client.server_info
    out(
        {
            "protocol_version": client.protocol_version,
            "server_info": info.model_dump(mode="json", by_alias=True, exclude_none=True) if info else None,
            "capabilities": client.server_capabilities.model_dump(mode="json", by_alias=True, exclude_none=True),
            "instructions": client.instructions,
        }
    )
    return EXIT_OK


async def cmd_list(conn: Conn, client: Client, _rest: list[str]) -> int:
    out([tool_json(t) for t in await list_all(client)])
    return EXIT_OK


def parse_json_args(text: str) -> dict[str, Any]:
    value = json.loads(text) if text.strip() else {}
    if not isinstance(value, dict):
        raise ValueError("JSON_ARGS must be a JSON object")
    return value


async def cmd_call(conn: Conn, client: Client, rest: list[str]) -> int:
    tool, arguments = rest[0], parse_json_args(rest[1] if len(rest) > 1 else "{}")
    out(await call_once(conn, client, tool, arguments))
    return EXIT_OK


async def cmd_watch(conn: Conn, client: Client, rest: list[str]) -> int:
    seconds = float(rest[0])
    t0 = time.monotonic()
    deadline = t0 + seconds

    async def emit(event: str) -> None:
        tools = await list_all(client)
        out({"t_ms": now_ms(t0), "event": event, "tools": [t.name for t in tools]})

    if client.protocol_version in MODERN_PROTOCOL_VERSIONS:
        # 2026-07-28: change notifications only arrive on a subscriptions/listen stream.
        with anyio.move_on_after(max(deadline - time.monotonic(), 0)):
            async with client.listen(tools_list_changed=True) as sub:
                await emit("initial")
                async for _event in sub:
                    await emit("list_changed")
        return EXIT_OK

    # Legacy: the SDK opens the GET stream after `initialized`; list_changed arrives there.
    await emit("initial")
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return EXIT_OK
        with anyio.move_on_after(left):
            await conn.list_changed.wait()
        if not conn.list_changed.is_set():
            return EXIT_OK
        conn.list_changed = anyio.Event()
        await emit("list_changed")


async def cmd_loop(args: argparse.Namespace, http: HttpLog, rest: list[str]) -> int:
    tool, arguments = rest[0], parse_json_args(rest[1])
    count, interval = int(rest[2]), float(rest[3]) / 1000.0
    t0 = time.monotonic()
    state = {"i": 0, "all_ok": True, "started": time.monotonic(), "line": None}

    def finish(line: dict[str, Any]) -> None:
        line["elapsed_ms"] = now_ms(state["started"])
        state["all_ok"] = state["all_ok"] and bool(line["ok"])
        out(line)
        state["i"] += 1
        state["line"] = None

    def failed(line: dict[str, Any], exc: BaseException) -> tuple[int, dict[str, Any]]:
        code, info = classify(exc, http)
        line.update(ok=False, text=None, is_error=None, error=info.get("error"), error_kind=info.get("kind"))
        for key in ("code", "http_status"):
            if key in info:
                line[key] = info[key]
        return code, info

    async def wait_turn() -> None:
        # Calls are scheduled at t0 + i * interval (a late call goes at once).
        delay = t0 + state["i"] * interval - time.monotonic()
        if delay > 0:
            await anyio.sleep(delay)

    while state["i"] < count:
        await wait_turn()
        state["started"] = time.monotonic()
        conn = Conn()
        try:
            # One session for as many calls as it survives; a broken connection or a lost
            # session (404) ends it and the next call starts a fresh one.
            async with connect(args, http, conn) as client:
                while state["i"] < count:
                    await wait_turn()
                    line: dict[str, Any] = {"i": state["i"], "t_ms": now_ms(t0)}
                    state["line"], state["started"] = line, time.monotonic()
                    http.last_error_status = None
                    try:
                        res = await call_once(conn, client, tool, arguments)
                    except MCPError as exc:
                        _code, info = failed(line, exc)
                        finish(line)
                        if info.get("http_status") == 404 or "Session terminated" in str(info.get("error")):
                            break
                        continue
                    line.update(ok=not res["is_error"], text=res["result_text"], is_error=res["is_error"], error=None)
                    finish(line)
        except Exception as exc:  # noqa: BLE001 - the connection failed: record it on the pending call
            line = state["line"] or {"i": state["i"], "t_ms": now_ms(t0)}
            failed(line, exc)
            finish(line)
    return EXIT_OK if state["all_ok"] else EXIT_MCP


COMMANDS: dict[str, tuple[Callable[[Conn, Client, list[str]], Awaitable[int]], int]] = {
    "info": (cmd_info, 0),
    "list": (cmd_list, 0),
    "call": (cmd_call, 1),
    "watch": (cmd_watch, 1),
}


async def run(args: argparse.Namespace) -> int:
    http = HttpLog()
    if args.command == "loop":
        if len(args.rest) != 4:
            out({"error": "usage: loop TOOL JSON_ARGS COUNT INTERVAL_MS", "kind": "usage"})
            return EXIT_MCP
        return await cmd_loop(args, http, args.rest)
    handler, min_args = COMMANDS[args.command]
    if len(args.rest) < min_args:
        out({"error": f"{args.command}: missing arguments", "kind": "usage"})
        return EXIT_MCP
    conn = Conn()
    try:
        async with connect(args, http, conn) as client:
            return await handler(conn, client, args.rest)
    except Exception as exc:  # noqa: BLE001 - every failure is reported as JSON
        code, info = classify(exc, http)
        out(info)
        return code


def header(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"header must be K=V, got {text!r}")
    return key.strip(), value


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="MCP test client (mcp SDK)")
    p.add_argument("--url", required=True)
    p.add_argument("--mode", default="legacy", help="legacy | 2026-07-28 | auto")
    p.add_argument("--header", type=header, action="append", default=[], metavar="K=V")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request (and for connecting)")
    p.add_argument("--log-level", default=None, help="2026-07-28 log opt-in level (e.g. info)")
    p.add_argument("--sample-reply", default=None, help="answer sampling requests with this text")
    p.add_argument("command", choices=["info", "list", "call", "watch", "loop"])
    p.add_argument("rest", nargs="*")
    return p.parse_args(argv)


def main() -> None:
    args = parse_args(sys.argv[1:])
    try:
        code = anyio.run(run, args)
    except KeyboardInterrupt:
        code = 130
    except BaseException as exc:  # noqa: BLE001 - last resort: still print JSON
        code, info = classify(exc, HttpLog())
        out(info)
    sys.exit(code)


if __name__ == "__main__":
    main()
