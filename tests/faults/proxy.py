"""A TCP proxy that fails on command, for the fault tests.

It listens on 127.0.0.1 at a free port and forwards to a target port, on an asyncio loop in a
thread of its own, so a test can flip it between modes while a balsync subprocess talks
through it:

- `pass`: forward both ways;
- `drop`: reset every new connection at once (existing ones keep flowing);
- `reset`: reset every connection, open or new (RST, via SO_LINGER 0);
- `blackhole`: accept and keep every connection, forward nothing, never reset; what a hung
  server or a stuck middlebox looks like. On loopback the proxy's kernel still answers TCP
  keepalive probes, so only the client's own read timeouts can notice.

`silence(port)` blackholes one connection alone, the one whose upstream leaves from `port`
(the `client_port` of its backend in pg_stat_activity), while the others keep flowing;
`reset_all()` resets the connections open right now and leaves the mode alone, and
`lose_reply(pattern)` lets the next server reply containing `pattern` vanish while the
connection is reset: a commit that landed but whose answer was lost in transit.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Literal, TypeVar

Mode = Literal["pass", "drop", "reset", "blackhole"]
T = TypeVar("T")
CHUNK = 65536
_LINGER_ZERO = struct.pack("ii", 1, 0)


@dataclass(eq=False)
class _Pair:
    """A client connection and, unless it was born blackholed, its upstream connection."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    silent: bool = False  # blackholed on its own (`Proxy.silence`)


def _reset(writer: asyncio.StreamWriter | None) -> None:
    """Close with RST instead of FIN."""
    if writer is None or writer.transport.is_closing():
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    writer.transport.abort()


def _close(writer: asyncio.StreamWriter | None) -> None:
    if writer is not None and not writer.transport.is_closing():
        writer.close()


class Proxy:
    """A fault-injecting TCP proxy to 127.0.0.1:target_port; a context manager."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self.mode: Mode = "pass"
        self.accepted = 0  # connections accepted, for the test's report
        self.resets = 0  # connections reset by reset_all() or mode "reset"
        self.lost_replies = 0
        self._lose: bytes | None = None
        self._pairs: set[_Pair] = set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy")

    # -- the test's side ------------------------------------------------------------------

    def start(self) -> Proxy:
        """Listen, and return once connections are accepted."""
        self._thread.start()
        self._server = self._run(
            asyncio.start_server(self._handle, "127.0.0.1", 0, reuse_address=True)
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def close(self) -> None:
        """Stop listening, reset what is left open, and stop the loop's thread."""
        if not self._thread.is_alive():
            return
        self._run(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_mode(self, mode: Mode) -> None:
        """Switch mode; `reset` also resets every open connection."""
        self.mode = mode
        if mode == "reset":
            self.reset_all()

    def reset_all(self) -> int:
        """Reset every open connection now; return how many there were."""
        return self._run(self._reset_all())

    def silence(self, upstream_port: int) -> bool:
        """Blackhole the one connection whose upstream leaves from local `upstream_port`;
        False when no open connection does."""
        return self._run(self._silence(upstream_port))

    def lose_reply(self, pattern: bytes) -> None:
        """Drop the next server-to-client chunk holding `pattern`, and reset its connection."""
        self._lose = pattern

    @property
    def open_connections(self) -> int:
        """Connections currently held."""
        return len(self._pairs)

    def _run(self, coro: Coroutine[object, object, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    # -- the loop's side ------------------------------------------------------------------

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await self._reset_all()
        tasks = [t for pair in self._pairs for t in pair.tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _silence(self, upstream_port: int) -> bool:
        for pair in self._pairs:
            local = pair.upstream.get_extra_info("sockname") if pair.upstream else None
            if local is not None and local[1] == upstream_port:
                pair.silent = True
                return True
        return False

    async def _reset_all(self) -> int:
        pairs = list(self._pairs)
        for pair in pairs:
            _reset(pair.client)
            _reset(pair.upstream)
            self._pairs.discard(pair)
        self.resets += len(pairs)
        return len(pairs)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.mode in ("drop", "reset"):
            self.resets += 1
            _reset(writer)
            return
        pair = _Pair(writer)
        self._pairs.add(pair)
        if self.mode == "blackhole":
            # Hold the client; there is no upstream to talk to.
            await self._swallow(reader, pair)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            self._pairs.discard(pair)
            _reset(writer)
            return
        pair.upstream = up_writer
        pair.tasks = [
            asyncio.create_task(self._pump(reader, up_writer, pair, to_client=False)),
            asyncio.create_task(self._pump(up_reader, writer, pair, to_client=True)),
        ]
        await asyncio.gather(*pair.tasks, return_exceptions=True)

    async def _swallow(self, reader: asyncio.StreamReader, pair: _Pair) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while await reader.read(CHUNK):
                pass
        self._pairs.discard(pair)
        _close(pair.client)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pair: _Pair,
        *,
        to_client: bool,
    ) -> None:
        tail = b""
        try:
            while data := await reader.read(CHUNK):
                if self.mode == "blackhole" or pair.silent:
                    continue
                if to_client and self._lose is not None and self._lose in tail + data:
                    self._lose = None
                    self.lost_replies += 1
                    self._pairs.discard(pair)
                    _reset(pair.client)
                    _reset(pair.upstream)
                    return
                tail = data[-64:]
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        # The upstream going away during a blackhole must stay invisible to the client.
        if to_client and (self.mode == "blackhole" or pair.silent) and pair in self._pairs:
            _close(pair.upstream)
            return
        self._pairs.discard(pair)
        _close(pair.client)
        _close(pair.upstream)
