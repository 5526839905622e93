#!/usr/bin/env python3
"""A tiny TCP relay that logs every byte of HTTP traffic between an MCP client and server.

    python wiretap.py --listen 18080 --target 127.0.0.1:18001 [--log FILE]

Point a client at http://127.0.0.1:18080/mcp; each chunk is written to FILE (default stdout)
as it passes, with a connection number, a direction (C>S / S>C) and milliseconds since start,
so the timing of SSE events is visible. The bytes are relayed unchanged (the Host header
names the relay's port, which the SDK server accepts: its allow-list is `127.0.0.1:*`).
Standard library only. Used to record the wire examples in README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time

T0 = time.monotonic()
COUNTER = itertools.count(1)


def log(out, conn: int, direction: str, data: bytes) -> None:
    ms = (time.monotonic() - T0) * 1000.0
    text = data.decode("utf-8", errors="backslashreplace")
    out.write(f"--- #{conn} {direction} +{ms:.1f}ms ({len(data)} bytes)\n{text}")
    if not text.endswith("\n"):
        out.write("\n")
    out.flush()


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, out, conn: int, direction: str) -> None:
    try:
        while data := await reader.read(65536):
            log(out, conn, direction, data)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        try:
            writer.close()
        except Exception:
            pass


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", type=int, required=True)
    p.add_argument("--target", required=True, help="HOST:PORT")
    p.add_argument("--log", default="-")
    args = p.parse_args()
    host, _, port = args.target.rpartition(":")
    out = sys.stdout if args.log == "-" else open(args.log, "w", encoding="utf-8")

    async def handle(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        conn = next(COUNTER)
        s_reader, s_writer = await asyncio.open_connection(host, int(port))
        await asyncio.gather(
            pipe(c_reader, s_writer, out, conn, "C>S"), pipe(s_reader, c_writer, out, conn, "S>C")
        )

    server = await asyncio.start_server(handle, "127.0.0.1", args.listen)
    print(f"READY {args.listen}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
