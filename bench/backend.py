# -*- test-case-name: tests.test_bench -*-
"""
The benchmark's backends: plain TCP servers on 127.0.0.1 that are cheap
enough never to be what a proxy benchmark measures.

One process (pinned by C{bench/run.py} to the load generator's core) serves
three ports:

  - C{echo}: writes back everything it reads; closes after the peer's EOF.
  - C{sink}: reads and counts until the peer's EOF, then answers with the
    count in ASCII and a newline, and closes.
  - C{source}: writes an endless stream (a constant 256 KiB chunk, as much
    as the socket takes) until the peer goes away.

Run as C{python bench/backend.py}; it prints one JSON line with the ports and
serves until its standard input closes (or C{--lifetime} seconds pass), so it
cannot outlive the benchmark that started it.

Only the standard library is used (asyncio); its CPU time is reported by the
benchmark so a busy backend is visible.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
from typing import Any, Optional

CHUNK = b"\xa5" * (256 * 1024)
"""
What C{source} sends, over and over.
"""


class Echo(asyncio.Protocol):
    """
    Writes back what it reads; closes once the peer sent EOF.
    """

    transport: Any

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False


class Sink(asyncio.BufferedProtocol):
    """
    Counts what it reads; at EOF answers with the count and closes.
    """

    transport: Any

    def __init__(self) -> None:
        self.count = 0
        self.buffer = bytearray(256 * 1024)

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.count += nbytes

    def eof_received(self) -> bool:
        self.transport.write(b"%d\n" % (self.count,))
        return False


class SourceServer:
    """
    Accepts connections and writes L{CHUNK} to each for as long as the
    socket takes it, with no buffering in Python: the content never changes,
    so a partial send needs no bookkeeping.  (An asyncio transport would
    copy every chunk it could not send at once into its own buffer.)
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, port: int) -> None:
        self.loop = loop
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(4096)
        self.sock.setblocking(False)
        self.connections: dict[int, socket.socket] = {}
        loop.add_reader(self.sock.fileno(), self.accept)

    def accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.connections[conn.fileno()] = conn
            self.loop.add_writer(conn.fileno(), self.send, conn)

    def send(self, conn: socket.socket) -> None:
        try:
            conn.send(CHUNK)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self.drop(conn)

    def drop(self, conn: socket.socket) -> None:
        self.loop.remove_writer(conn.fileno())
        self.connections.pop(conn.fileno(), None)
        conn.close()

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        for conn in list(self.connections.values()):
            self.drop(conn)
        self.sock.close()

    def getsockname(self) -> Any:
        return self.sock.getsockname()


async def serve(ports: dict[str, int], lifetime: float) -> None:
    loop = asyncio.get_running_loop()
    servers: dict[str, Any] = {}
    for name, protocol in (("echo", Echo), ("sink", Sink)):
        servers[name] = await loop.create_server(
            protocol, "127.0.0.1", ports.get(name, 0), backlog=4096, reuse_address=True
        )
    source = SourceServer(loop, ports.get("source", 0))
    print(
        json.dumps(
            {
                "pid": os.getpid(),
                **{name: s.sockets[0].getsockname()[1] for name, s in servers.items()},
                "source": source.getsockname()[1],
            }
        ),
        flush=True,
    )
    stdinClosed = loop.create_future()

    def readable() -> None:
        if not os.read(sys.stdin.fileno(), 4096) and not stdinClosed.done():
            stdinClosed.set_result(None)

    loop.add_reader(sys.stdin.fileno(), readable)
    try:
        await asyncio.wait_for(stdinClosed, lifetime)
    except asyncio.TimeoutError:
        pass
    for server in servers.values():
        server.close()
    source.close()


def main(argv: Optional[list[str]] = None) -> None:
    """
    Serve the three backends until standard input closes.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--echo", type=int, default=0)
    parser.add_argument("--sink", type=int, default=0)
    parser.add_argument("--source", type=int, default=0)
    parser.add_argument("--lifetime", type=float, default=3600.0)
    args = parser.parse_args(argv)
    asyncio.run(serve({"echo": args.echo, "sink": args.sink, "source": args.source}, args.lifetime))


if __name__ == "__main__":
    main()
