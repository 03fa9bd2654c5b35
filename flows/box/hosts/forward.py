"""Port forwarding over SSH (`ssh -L`): a listener on 127.0.0.1 relayed through SSH channels."""

from __future__ import annotations

import logging
import selectors
import socket
import threading
from collections.abc import Callable

import paramiko

from flows.box.hosts.base import READ_CHUNK

log = logging.getLogger(__name__)


class PortForward:
    """A listening socket on 127.0.0.1 whose connections are relayed through SSH channels by threads."""

    def __init__(self, open_channel: Callable[[tuple[str, int]], paramiko.Channel], port: int, what: str):
        self._open_channel, self._what = open_channel, what
        self._server = socket.create_server(("127.0.0.1", port))
        self.port: int = self._server.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()  # one byte written at close stops every loop
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"forward-{self.port}", daemon=True)
        self._relays: list[threading.Thread] = []

    def __enter__(self) -> PortForward:
        self._acceptor.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._wake_w.send(b"x")
        self._acceptor.join(timeout=5)
        for relay in self._relays:  # the acceptor has stopped: this list no longer changes
            relay.join(timeout=5)
        for sock in (self._server, self._wake_r, self._wake_w):
            sock.close()

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._server, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while True:
                ready = {key.fileobj for key, _ in selector.select()}
                if self._wake_r in ready:
                    return
                conn, origin = self._server.accept()
                relay = threading.Thread(target=self._relay, args=(conn, origin), daemon=True)
                self._relays = [t for t in self._relays if t.is_alive()] + [relay]
                relay.start()

    def _relay(self, conn: socket.socket, origin: tuple[str, int]) -> None:
        with conn:
            try:
                channel = self._open_channel(origin)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                log.warning("port forward to %s: cannot open a channel: %s", self._what, exc)
                return
            with channel:
                self._pump(conn, channel)

    def _pump(self, conn: socket.socket, channel: paramiko.Channel) -> None:
        """Copy both ways until both sides reach EOF (half-close aware) or the forward closes."""
        with selectors.DefaultSelector() as selector:
            selector.register(conn, selectors.EVENT_READ)
            selector.register(channel, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            open_sides = 2
            while open_sides:
                for key, _ in selector.select():
                    source = key.fileobj
                    if source is self._wake_r:
                        return
                    try:
                        data = source.recv(READ_CHUNK)  # type: ignore[union-attr]
                        if data:
                            (channel if source is conn else conn).sendall(data)
                            continue
                        selector.unregister(source)
                        open_sides -= 1
                        if source is conn:
                            channel.shutdown_write()
                        else:
                            conn.shutdown(socket.SHUT_WR)
                    except OSError:
                        return
