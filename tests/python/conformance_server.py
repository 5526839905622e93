#!/usr/bin/env python3
"""An MCP server (official `mcp` 2.3.0 SDK) offering what the scenarios of the MCP conformance
suite (@modelcontextprotocol/conformance 0.1.16, `conformance server`) call by name, so that the
suite has something to pass, directly and through capmesh's passthrough:

    tools      test_simple_text, test_image_content, test_audio_content, test_embedded_resource,
               test_multiple_content_types, test_tool_with_logging, test_tool_with_progress,
               test_error_handling, test_sampling, test_elicitation
    resources  test://static-text, test://static-binary, test://template/{id}/data
    prompts    test_simple_prompt, test_prompt_with_arguments

    python conformance_server.py [--port 0]      prints "READY <port>" once listening

Only what the suite checks is implemented; scenarios it does not cover here fail the same way
whichever way the suite reaches the server, which is what the mesh test compares.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import signal
import warnings
from typing import Annotated

import uvicorn
from pydantic import BaseModel, Field

import mcp_types as types
from mcp.server import MCPServer
from mcp.server.mcpserver.context import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings

warnings.filterwarnings("ignore", category=DeprecationWarning)
try:
    from mcp.shared.exceptions import MCPDeprecationWarning

    warnings.filterwarnings("ignore", category=MCPDeprecationWarning)
except ImportError:  # pragma: no cover
    pass

# A 1x1 red PNG and a 44-byte silent WAV header.
PNG = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415408d763f8cfc0000003010100c9fe92ef0000000049454e44ae426082"
    )
).decode()
WAV = base64.b64encode(
    b"RIFF$\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00D\xac\x00\x00\x88X\x01\x00\x02\x00\x10\x00data\x00\x00\x00\x00"
).decode()


class Contact(BaseModel):
    username: str = Field(description="User's response")
    email: str = Field(description="User's email address")


def build() -> MCPServer:
    server = MCPServer("capmesh-conformance", log_level="WARNING")

    @server.tool(structured_output=False)
    async def test_simple_text() -> str:
        """Returns simple text."""
        return "This is a simple text response for testing."

    @server.tool(structured_output=False)
    async def test_image_content() -> list[types.ContentBlock]:
        """Returns an image."""
        return [types.ImageContent(type="image", data=PNG, mime_type="image/png")]

    @server.tool(structured_output=False)
    async def test_audio_content() -> list[types.ContentBlock]:
        """Returns audio."""
        return [types.AudioContent(type="audio", data=WAV, mime_type="audio/wav")]

    @server.tool(structured_output=False)
    async def test_embedded_resource() -> list[types.ContentBlock]:
        """Returns an embedded resource."""
        return [
            types.EmbeddedResource(
                type="resource",
                resource=types.TextResourceContents(
                    uri="test://embedded-resource", mime_type="text/plain", text="This is an embedded resource content."
                ),
            )
        ]

    @server.tool(structured_output=False)
    async def test_multiple_content_types() -> list[types.ContentBlock]:
        """Returns text, an image and a resource."""
        return [
            types.TextContent(type="text", text="Multiple content types test:"),
            types.ImageContent(type="image", data=PNG, mime_type="image/png"),
            types.EmbeddedResource(
                type="resource",
                resource=types.TextResourceContents(
                    uri="test://mixed-content-resource", mime_type="application/json", text='{"test":"data","value":123}'
                ),
            ),
        ]

    @server.tool(structured_output=False)
    async def test_tool_with_logging(ctx: Context) -> str:
        """Sends three log messages while it runs."""
        await ctx.info("Tool execution started")
        await asyncio.sleep(0.05)
        await ctx.info("Tool processing data")
        await asyncio.sleep(0.05)
        await ctx.info("Tool execution completed")
        return "Tool with logging executed successfully"

    @server.tool(structured_output=False)
    async def test_tool_with_progress(ctx: Context) -> str:
        """Reports progress 0, 50, 100 of 100."""
        for i, value in enumerate((0, 50, 100)):
            if i:
                await asyncio.sleep(0.05)
            await ctx.report_progress(value, 100)
        return "Tool with progress executed successfully"

    @server.tool(structured_output=False)
    async def test_error_handling() -> str:
        """Always fails."""
        raise ToolError("This tool intentionally returns an error for testing")

    @server.tool(structured_output=False)
    async def test_sampling(ctx: Context, prompt: Annotated[str, Field(description="The prompt")]) -> str:
        """Asks the client's model."""
        result = await ctx.session.create_message(
            messages=[types.SamplingMessage(role="user", content=types.TextContent(type="text", text=prompt))],
            max_tokens=100,
            related_request_id=ctx.request_context.request_id,
        )
        return f"LLM response: {getattr(result.content, 'text', result.content)}"

    @server.tool(structured_output=False)
    async def test_elicitation(ctx: Context, message: Annotated[str, Field(description="What to ask")]) -> str:
        """Asks the user."""
        result = await ctx.elicit(message, Contact)
        content = result.data.model_dump() if getattr(result, "data", None) is not None else None
        return f"User response: action={result.action}, content={content}"

    @server.resource("test://static-text", mime_type="text/plain")
    def static_text() -> str:
        """A static text resource."""
        return "This is the content of the static text resource."

    @server.resource("test://static-binary", mime_type="image/png")
    def static_binary() -> bytes:
        """A static binary resource."""
        return base64.b64decode(PNG)

    @server.resource("test://template/{id}/data", mime_type="application/json")
    def template(id: str) -> str:
        """A templated resource."""
        return f'{{"id":"{id}","templateTest":true,"data":"Data for ID: {id}"}}'

    @server.prompt()
    def test_simple_prompt() -> str:
        """A simple prompt."""
        return "This is a simple prompt for testing."

    @server.prompt()
    def test_prompt_with_arguments(arg1: str, arg2: str) -> str:
        """A prompt with arguments."""
        return f"Prompt with arguments: arg1='{arg1}', arg2='{arg2}'"

    return server


async def serve(port: int) -> None:
    server = build()
    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=["127.0.0.1:*", "localhost:*"],
        allowed_origins=["http://127.0.0.1:*", "http://localhost:*"],
    )
    app = server.streamable_http_app(streamable_http_path="/mcp", host="127.0.0.1", transport_security=security)
    web = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    signal.signal(signal.SIGTERM, lambda _sig, _frame: None)
    task = asyncio.create_task(web.serve())
    while not web.started:
        if task.done():
            await task
            raise SystemExit("uvicorn stopped before it started")
        await asyncio.sleep(0.01)
    print(f"READY {web.servers[0].sockets[0].getsockname()[1]}", flush=True)
    await task


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=0)
    try:
        asyncio.run(serve(p.parse_args().port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
