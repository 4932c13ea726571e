"""The bus inside a container that has no network: a listener on 127.0.0.1 in the container's own network
namespace that relays each connection to nats-server on the host.

The engine runs without a bridge or iptables, so a container either shares the host's network or has
none. A container plugin not granted `network_access` gets none: the process standing for it enters the
container's network namespace (setns, this thread only) just long enough to bind a socket there, comes
back, and relays what arrives on it to the host's servers. The plugin connects to
`nats://127.0.0.1:4222` and can reach nothing else, on this host or anywhere.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import threading
from urllib.parse import urlsplit

CLONE_NEWNET = 0x40000000
PORT = 4222  # in the container's own namespace: nothing else listens there
URL = f"nats://127.0.0.1:{PORT}"
CHUNK = 65536


def _setns(fd: int) -> None:
    if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def listen_in(pid: int, port: int = PORT) -> socket.socket:
    """A listening socket on 127.0.0.1:`port` in the network namespace of process `pid`."""
    own = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
        try:
            _setns(target)
            try:
                # A socket stays in the namespace it was made in, whichever namespace its user is in later.
                return socket.create_server(("127.0.0.1", port), backlog=16)
            finally:
                _setns(own)
        finally:
            os.close(target)
    finally:
        os.close(own)


def upstreams(urls: str) -> list[tuple[str, int]]:
    """The host's servers, in the order the host lists them."""
    found = []
    for url in urls.split(","):
        parts = urlsplit(url.strip() if "://" in url else f"nats://{url.strip()}")
        if parts.hostname:
            found.append((parts.hostname, parts.port or 4222))
    return found


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(CHUNK):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


def _serve(inside: socket.socket, servers: list[tuple[str, int]]) -> None:
    outside = None
    for address in servers:  # the first that answers, as a client with this server list would
        try:
            outside = socket.create_connection(address, timeout=5)
            outside.settimeout(None)
            break
        except OSError:
            continue
    if outside is None:
        inside.close()
        return
    for s in (inside, outside):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    back = threading.Thread(target=_pump, args=(outside, inside), daemon=True)
    back.start()
    _pump(inside, outside)
    back.join()
    inside.close()
    outside.close()


def relay(listener: socket.socket, servers: list[tuple[str, int]]) -> threading.Thread:
    """Relay every connection made to `listener` to the first of `servers` that answers, until the
    listener is closed; the thread doing it."""
    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                threading.Thread(target=_serve, args=(conn, servers), daemon=True).start()

    thread = threading.Thread(target=accept, name="bus-relay", daemon=True)
    thread.start()
    return thread
