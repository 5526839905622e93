#!/usr/bin/env python3
"""Drives @modelcontextprotocol/server-everything (npm) the way a real agent would, for capmesh's
tests: through a sidecar's passthrough endpoint or directly. Output is one JSON object on stdout.

    python everything_client.py --url URL session
        The official `mcp` 2.3.0 client (2025 generation: initialize, Mcp-Session-Id, GET stream,
        DELETE) with a sampling and an elicitation handler. Lists the tools, calls
        trigger-sampling-request, trigger-elicitation-request and
        trigger-long-running-operation (with a progress callback). Prints
        {"session_ids", "tools", "sampling": {"requests", "result_text"},
         "elicitation": {"requests", "result_text"}, "progress": [{"progress", "total",
         "elapsed_ms"}], "long_result_text", "long_result_elapsed_ms"}.

    python everything_client.py --url URL resume
        Raw HTTP (httpx), to control the GET stream: initialize, turn on the server's simulated
        logging (one message now, one every 5 s, all on the session's GET stream), read the first
        message with its SSE event id, drop the GET stream, wait for the next message to be
        stored, then open a new GET stream with Last-Event-ID. Prints {"session_id",
        "first": {"id", "data"}, "replayed": [{"id", "data"}], "reconnect_status"}.

Exit code 0 when the script ran to the end (the test judges the content), 1 otherwise, with
{"error": ...} on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from typing import Any

import anyio
import httpx2

import mcp_types as types
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

warnings.filterwarnings("ignore", category=DeprecationWarning)

SAMPLED_REPLY = "capmesh-sampled-reply"
ELICITED_NAME = "Ada Through-The-Mesh"


def out(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def text_of(result: types.CallToolResult) -> str:
    return "\n".join(getattr(b, "text", "") or "" for b in result.content)


async def cmd_session(url: str) -> dict[str, Any]:
    session_ids: list[str] = []
    sampling: list[dict[str, Any]] = []
    elicitation: list[dict[str, Any]] = []

    async def on_response(response: httpx2.Response) -> None:
        sid = response.headers.get("mcp-session-id")
        if sid and sid not in session_ids:
            session_ids.append(sid)

    async def on_sampling(_ctx: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        seen = [getattr(m.content, "text", None) for m in params.messages]
        sampling.append({"messages": seen, "max_tokens": params.max_tokens})
        return types.CreateMessageResult(
            role="assistant",
            content=types.TextContent(type="text", text=SAMPLED_REPLY),
            model="capmesh-test-model",
            stop_reason="endTurn",
        )

    async def on_elicitation(_ctx: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        elicitation.append({"message": getattr(params, "message", None)})
        return types.ElicitResult(action="accept", content={"name": ELICITED_NAME, "check": True})

    t_total = httpx2.Timeout(30.0, read=120.0)
    async with httpx2.AsyncClient(timeout=t_total, event_hooks={"response": [on_response]}) as http:
        client = Client(
            streamable_http_client(url, http_client=http),
            mode="legacy",
            cache=None,
            read_timeout_seconds=60,
            sampling_callback=on_sampling,
            elicitation_callback=on_elicitation,
        )
        async with client:
            tools = sorted(t.name for t in (await client.list_tools()).tools)
            sampled = await client.call_tool("trigger-sampling-request", {"prompt": "hello mesh", "maxTokens": 20})
            elicited = await client.call_tool("trigger-elicitation-request", {})
            progress: list[dict[str, Any]] = []
            t0 = time.monotonic()

            async def on_progress(value: float, total: float | None, _message: str | None) -> None:
                elapsed = round((time.monotonic() - t0) * 1000.0, 1)
                progress.append({"progress": value, "total": total, "elapsed_ms": elapsed})

            long = await client.call_tool(
                "trigger-long-running-operation", {"duration": 3, "steps": 3}, progress_callback=on_progress
            )
            long_elapsed = round((time.monotonic() - t0) * 1000.0, 1)
    return {
        "session_ids": session_ids,
        "tools": tools,
        "sampling": {"requests": sampling, "result_text": text_of(sampled)},
        "elicitation": {"requests": elicitation, "result_text": text_of(elicited)},
        "progress": progress,
        "long_result_text": text_of(long),
        "long_result_elapsed_ms": long_elapsed,
    }


HEADERS = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
VERSION = "2025-11-25"


def rpc(id_: int | None, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if id_ is not None:
        msg["id"] = id_
    if params is not None:
        msg["params"] = params
    return msg


async def sse_events(response: httpx2.Response) -> Any:
    """Yields (id, data) for each SSE event of a streaming response."""
    event_id: str | None = None
    data: list[str] = []
    async for line in response.aiter_lines():
        if line == "":
            if data:
                yield event_id, "\n".join(data)
            event_id, data = None, []
        elif line.startswith("id:"):
            event_id = line[3:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())


async def post(http: httpx2.AsyncClient, url: str, sid: str | None, msg: dict[str, Any]) -> httpx2.Response:
    headers = dict(HEADERS)
    if sid:
        headers["mcp-session-id"] = sid
        headers["mcp-protocol-version"] = VERSION
    r = await http.post(url, headers=headers, content=json.dumps(msg))
    if r.status_code >= 400:
        raise RuntimeError(f"{msg['method']}: HTTP {r.status_code}: {r.text}")
    return r


async def first_log(http: httpx2.AsyncClient, url: str, headers: dict[str, str], limit: float) -> tuple[int, list[tuple[str | None, str]]]:
    """Opens a GET stream and returns (status, the events up to and including the first log message)."""
    got: list[tuple[str | None, str]] = []
    async with http.stream("GET", url, headers=headers) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, got
        with anyio.fail_after(limit):
            async for event_id, data in sse_events(r):
                got.append((event_id, data))
                if '"notifications/message"' in data:
                    break
    return 200, got


async def cmd_resume(url: str) -> dict[str, Any]:
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(30.0, read=60.0)) as http:
        init = rpc(1, "initialize", {"protocolVersion": VERSION, "capabilities": {}, "clientInfo": {"name": "resume", "version": "0"}})
        r = await post(http, url, None, init)
        sid = r.headers.get("mcp-session-id")
        if not sid:
            raise RuntimeError(f"initialize answered without Mcp-Session-Id: {dict(r.headers)}")
        await post(http, url, sid, rpc(None, "notifications/initialized"))
        await post(http, url, sid, rpc(2, "logging/setLevel", {"level": "debug"}))
        get_headers = {"accept": "text/event-stream", "mcp-session-id": sid, "mcp-protocol-version": VERSION}

        first: dict[str, Any] = {}

        async def read_first() -> None:
            status, events = await first_log(http, url, get_headers, 15.0)
            if status != 200 or not events:
                raise RuntimeError(f"GET stream: HTTP {status}, events {events}")
            first["id"], first["data"] = events[-1]

        async with anyio.create_task_group() as tg:
            tg.start_soon(read_first)
            await anyio.sleep(0.5)  # the GET stream is open before the first message is sent
            await post(http, url, sid, rpc(3, "tools/call", {"name": "toggle-simulated-logging", "arguments": {}}))
        # The GET stream is closed now; the server stores the next message (5 s later) for replay.
        await anyio.sleep(6.5)
        headers = dict(get_headers)
        headers["last-event-id"] = first["id"] or ""
        status, replayed = await first_log(http, url, headers, 15.0)
        await post(http, url, sid, rpc(4, "tools/call", {"name": "toggle-simulated-logging", "arguments": {}}))
        await http.delete(url, headers={"mcp-session-id": sid, "mcp-protocol-version": VERSION})
    return {
        "session_id": sid,
        "first": first,
        "replayed": [{"id": i, "data": d} for i, d in replayed],
        "reconnect_status": status,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True)
    p.add_argument("command", choices=["session", "resume"])
    args = p.parse_args()
    try:
        result = anyio.run(cmd_session if args.command == "session" else cmd_resume, args.url)
    except BaseException as exc:  # noqa: BLE001 - report anything, including task-group errors
        if isinstance(exc, KeyboardInterrupt):
            raise
        out({"error": f"{type(exc).__name__}: {exc}"})
        sys.exit(1)
    out(result)


if __name__ == "__main__":
    main()
