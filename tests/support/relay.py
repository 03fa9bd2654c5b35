"""A TCP relay in front of a loopback server that cuts or stalls the link on demand, for tests of retries.

`cut_after(n, down_s)`: once `n` more bytes went from the server to the client, every connection is closed
and new ones are dropped at once for `down_s` seconds (a link that goes down for a while). `stall_after(n)`:
once `n` more bytes went, the connections open at that moment stay open but carry nothing more (a link
that hangs); new connections pass normally.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

CHUNK = 16 * 1024


class Relay:
    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.relayed = 0  # bytes sent from the server to clients
        self.requests = bytearray()  # what clients sent (request lines and headers: a token's way)
        self.cuts = self.stalls = 0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._stalled: set[socket.socket] = set()
        self._cut_at: int | None = None
        self._down_s = 0.0
        self._down_until = 0.0
        self._stall_at: int | None = None
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def cut_after(self, nbytes: int, down_s: float) -> None:
        with self._lock:
            self._cut_at, self._down_s = self.relayed + nbytes, down_s

    def stall_after(self, nbytes: int) -> None:
        with self._lock:
            self._stall_at = self.relayed + nbytes

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if time.monotonic() < self._down_until:
                client.close()
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open.update((client, server))
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, downstream: bool) -> None:
        try:
            while not self._closing.is_set():
                data = source.recv(CHUNK)
                if not data:
                    break
                if downstream and not self._pass(sink, len(data)):
                    return
                if not downstream:
                    with self._lock:
                        self.requests += data[:4096]
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _pass(self, client: socket.socket, size: int) -> bool:
        """Count `size` bytes to `client`; False when the link is to be cut or hang here."""
        with self._lock:
            if client in self._stalled:
                return self._hang(client)
            self.relayed += size
            if self._cut_at is not None and self.relayed >= self._cut_at:
                self._cut_at, self.cuts = None, self.cuts + 1
                self._down_until = time.monotonic() + self._down_s
                for sock in self._open:
                    with suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                return False
            if self._stall_at is not None and self.relayed >= self._stall_at:
                self._stall_at, self.stalls = None, self.stalls + 1
                self._stalled.add(client)
                return self._hang(client)
        return True

    def _hang(self, client: socket.socket) -> bool:
        """Keep a stalled connection open and silent until the relay closes (called under the lock)."""
        self._lock.release()
        try:
            self._closing.wait()
        finally:
            self._lock.acquire()
        return False

    def close(self) -> None:
        self._closing.set()
        self.listener.close()
        with self._lock:
            for sock in self._open:
                with suppress(OSError):
                    sock.close()
        self._thread.join(timeout=5)


@contextmanager
def relay(upstream_port: int) -> Iterator[Relay]:
    """A relay to 127.0.0.1:`upstream_port`, closed (every connection with it) on exit."""
    link = Relay(upstream_port)
    link._thread.start()
    try:
        yield link
    finally:
        link.close()
