"""A TCP proxy for browser tests: counts the bytes a client sends, can slow them down, can flip one of them.

It runs an asyncio loop in a thread and listens on an ephemeral port; each client connection gets its own
connection to ``target`` (which a test may change, or point at nothing while a server is down: the client's
connection is then closed at once, as a dead server's would be).
"""
from __future__ import annotations

import asyncio
import threading
import time


class WireProxy:
    def __init__(self, target_port: int, *, bytes_per_second: float | None = None):
        self.target_port = target_port
        self.bytes_per_second = bytes_per_second
        self.sent = 0                   # client -> server bytes passed on, over all connections
        self.refused = 0                # client connections that found no server behind the proxy
        self.corrupt_marker: bytes | None = None   # the first byte after this marker is flipped, once
        self.corrupted = 0
        self._link_free = 0.0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    # -- the test's side ---------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset_count(self) -> None:
        self.sent = 0

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shut(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _shut(self) -> None:
        self._server.close()
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the loop's side ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _serve(self, client_reader, client_writer) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            self.refused += 1
            client_writer.close()
            return
        upstream = asyncio.ensure_future(self._pipe(client_reader, server_writer, count=True))
        downstream = asyncio.ensure_future(self._pipe(server_reader, client_writer, count=False))
        try:
            await asyncio.wait([upstream, downstream], return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            pass   # the proxy is closing
        finally:
            for task in (upstream, downstream):
                task.cancel()
            for writer in (client_writer, server_writer):
                writer.close()

    async def _pipe(self, reader, writer, count: bool) -> None:
        tail = [b""]   # this connection's last bytes: a marker may straddle two of its reads (never two connections')
        try:
            while data := await reader.read(16384):
                if count:
                    data = self._maybe_corrupt(data, tail)
                    await self._throttle(len(data))
                    self.sent += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError, OSError):
            pass
        if count:   # the client finished sending (or vanished): the server sees the end as a dead client's
            writer.close()

    async def _throttle(self, size: int) -> None:
        """One link shared by every connection: each block waits for its turn at ``bytes_per_second``."""
        if not self.bytes_per_second:
            return
        now = self._loop.time()
        self._link_free = max(now, self._link_free) + size / self.bytes_per_second
        await asyncio.sleep(self._link_free - now)

    def _maybe_corrupt(self, data: bytes, tail: list) -> bytes:
        marker = self.corrupt_marker
        if marker is None or self.corrupted:
            return data
        window = tail[0] + data
        found = window.find(marker)
        at = found + len(marker) - len(tail[0])   # the byte after the marker, inside ``data``
        if found < 0 or found + len(marker) >= len(window) or at < 0:
            tail[0] = window[-len(marker):]
            return data
        self.corrupted += 1
        self.corrupted_at = time.monotonic()
        return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]
