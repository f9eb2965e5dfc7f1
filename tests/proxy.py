"""A TCP peer that stops answering, on loopback, for the frozen-server tests.

:class:`FreezingProxy` forwards a database connection to the real server until it sees chosen bytes in
what the client sends (a statement's text, say), then goes silent: it keeps every socket open and
forwards nothing more, in either direction, like a paused container or a hung host whose kernel still
acknowledges TCP. ``trigger=b""`` freezes at once; ``upstream=None`` accepts connections and never
answers at all (a server that never sends its handshake).
"""

from __future__ import annotations

import socket
import threading
from types import TracebackType

import sqlalchemy as sa


class FreezingProxy:
    def __init__(self, upstream: tuple[str, int] | None, trigger: bytes | None = None) -> None:
        self.upstream = upstream
        self.trigger = trigger
        self.frozen = threading.Event()
        self.closed = threading.Event()
        self.sockets: list[socket.socket] = []
        self.accepted = 0  # client connections, reconnections included
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, url: str) -> str:
        """``url`` pointed at the proxy (password kept)."""
        return sa.make_url(url).set(host="127.0.0.1", port=self.port).render_as_string(hide_password=False)

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.sockets.append(client)
            self.accepted += 1
            if self.upstream is None:
                continue  # accept, and never say a word
            server = socket.create_connection(self.upstream)
            self.sockets.append(server)
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        while not self.closed.is_set():
            try:
                data = source.recv(65536)
            except OSError:
                return
            if not data:
                return
            if from_client and self.trigger is not None and self.trigger in data:
                self.frozen.set()
            if self.frozen.is_set():
                self.closed.wait()  # silent from now on, sockets left open
                return
            try:
                sink.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.closed.set()
        for sock in [self.listener, *self.sockets]:
            try:
                sock.close()
            except OSError:
                pass

    def __enter__(self) -> FreezingProxy:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
