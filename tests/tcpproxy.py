"""A loopback TCP proxy in front of a real endpoint that a test can take down and bring back.

`down()` stops listening (new connections are refused, as from a stopped server) and resets every open
connection; `up()` listens again. The socket stays bound to its port throughout, so no other process can
take the port while the proxy is down (Linux: `shutdown(SHUT_RD)` on a listening socket bound to an
explicit port stops it listening and keeps the binding). Standard library only.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from types import TracebackType


class TcpProxy:
    """Forward 127.0.0.1:`port` to `target` (host, port) until `down()`; `endpoint` is its http URL."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._generation = 0
        self._listening = False
        self._listener = _bound_socket()
        self.port = self._listener.getsockname()[1]
        self.up()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        with self._lock:
            if self._listening:
                return
            self._listener.listen(64)
            self._listening = True
            self._generation += 1
            generation = self._generation
        threading.Thread(target=self._accept, args=(generation,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            listening, self._listening = self._listening, False
            conns, self._conns = self._conns, set()
        if listening:
            self._listener.shutdown(socket.SHUT_RD)
        for conn in conns:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RD)  # wakes the pump blocked in recv, so that close sends the RST
            conn.close()

    def _live(self, generation: int) -> bool:
        return self._listening and self._generation == generation

    def _accept(self, generation: int) -> None:
        while self._live(generation):
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            with self._lock:
                if not self._live(generation):
                    client.close()
                    upstream.close()
                    return
                self._conns |= {client, upstream}
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                ours = src in self._conns  # otherwise down() took the pair and resets it
                self._conns -= {src, dst}
            if ours:
                for s in (src, dst):
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)

    def outage(self, seconds: float) -> threading.Timer:
        """Go down now and come back after `seconds` (in a timer thread, returned)."""
        self.down()
        timer = threading.Timer(seconds, self.up)
        timer.daemon = True
        timer.start()
        return timer

    def close(self) -> None:
        self.down()
        self._listener.close()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _bound_socket() -> socket.socket:
    """A socket bound to a free loopback port named explicitly, so that the binding outlives a shutdown.
    SO_REUSEADDR lets it listen again while its earlier connections sit in TIME_WAIT; the kernel hands a
    bound port to no bind(0) or outgoing connection, which is what took the port before."""
    for _ in range(20):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind(("127.0.0.1", port))
        except OSError:
            listener.close()
            continue
        listener.settimeout(0.2)
        return listener
    raise OSError("no free loopback port for the proxy")
