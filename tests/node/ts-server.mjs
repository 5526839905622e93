// A TypeScript SDK v2 MCP server (npm @modelcontextprotocol/server + @modelcontextprotocol/node),
// sessionless: createMcpHandler builds a fresh McpServer for every HTTP request, so it serves
// 2025 clients (initialize, no Mcp-Session-Id) and 2026-07-28 clients alike.
//
//   node ts-server.mjs PORT NAME      (PORT 0 = any free port)
//
// Prints "READY <port>" on stdout once listening on 127.0.0.1. One tool, `shout`: the text in
// capitals, prefixed with NAME so a test can tell which server answered.
import { createServer } from 'node:http';
import { createMcpHandler, McpServer } from '@modelcontextprotocol/server';
import { localhostHostValidation, toNodeHandler } from '@modelcontextprotocol/node';
import * as z from 'zod/v4';

const port = Number(process.argv[2] ?? 0);
const name = process.argv[3] ?? 'ts-peer';

const handler = createMcpHandler(() => {
    const server = new McpServer({ name, version: '1.0.0' });
    server.registerTool(
        'shout',
        { description: 'The text in capitals', inputSchema: z.object({ text: z.string() }) },
        async ({ text }) => ({ content: [{ type: 'text', text: `${name}: ${text.toUpperCase()}` }] }),
    );
    return server;
});
const serve = toNodeHandler(handler);
const hostAllowed = localhostHostValidation();

const http = createServer((req, res) => {
    if (!hostAllowed(req, res)) return;
    void serve(req, res);
});
http.on('error', (err) => {
    console.error(`ts-server ${name}: cannot listen on 127.0.0.1:${port}: ${err.message}`);
    process.exit(1);
});
http.listen(port, '127.0.0.1', () => {
    console.log(`READY ${http.address().port}`);
});
