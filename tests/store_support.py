"""A store that ignores conditional writes, played by a relay in front of moto."""
from __future__ import annotations

import socket
import threading
from typing import Iterable

from fault_support import OwnerCheckingRelay, loopback_listener


class HeaderStrippingRelay:
    """A loopback relay to moto that drops request headers, as a store that ignores them behaves.

    moto honours ``If-Match`` / ``If-None-Match`` on PutObject; a store that does not would
    treat such a write as a plain one. The relay removes the named headers from every
    request (moto checks no signatures here) and records which requests carried them.
    """

    def __init__(self, upstream_port: int, headers: Iterable[str] = ("if-match", "if-none-match")):
        self.upstream_port = upstream_port
        self.headers = {h.lower().encode() for h in headers}
        self.stripped: list[str] = []
        self._listener, self.port = loopback_listener()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._requests, args=(client, upstream), daemon=True).start()
            threading.Thread(target=OwnerCheckingRelay._pump, args=(upstream, client), daemon=True).start()

    def _requests(self, client: socket.socket, upstream: socket.socket) -> None:
        buffer = b""
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = client.recv(1 << 16)
                    if not data:
                        return
                    buffer += data
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                lines = head.split(b"\r\n")
                kept = [lines[0]] + [line for line in lines[1:]
                                     if line.split(b":", 1)[0].strip().lower() not in self.headers]
                if len(kept) < len(lines):
                    self.stripped.append(lines[0].decode(errors="replace"))
                length = next((int(line.split(b":", 1)[1]) for line in lines[1:]
                               if line.lower().startswith(b"content-length:")), 0)
                upstream.sendall(b"\r\n".join(kept) + b"\r\n\r\n")
                while length > 0:  # the body as it comes, then the next request's head
                    if not buffer:
                        buffer = client.recv(1 << 16)
                        if not buffer:
                            return
                    chunk, buffer = buffer[:length], buffer[length:]
                    upstream.sendall(chunk)
                    length -= len(chunk)
        except OSError:
            pass
        finally:
            for sock in (client, upstream):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._listener.close()
