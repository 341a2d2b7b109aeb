"""Keep the agent's own controller connections out of the mesh it manages.

In Kubernetes the agent reaches the controller through its Service: the
routing decision is made for the ClusterIP (bypassed by an ``ip rule``), but
kube-proxy then rewrites the destination to the controller pod's address
(iptables/IPVS DNAT, or at connect() time with a socket-level load balancer)
and the kernel routes again, now into another node's pod CIDR: into the TUN
device, or, while no agent runs, into the fail-closed guard. Neither may carry
the control connection (the agent could not start again without a stored view).

gRPC (Python) cannot set socket options on its connections, so the agent
connects to a local forwarder instead (``MarkedForwarder``, one per controller
port, on 127.0.0.1) whose outgoing sockets carry ``SO_MARK`` = the agent's
fwmark: ``ip rule fwmark <mark> lookup main`` (RouteManager) sends them
through the main table, like our IKE and ESP sockets, whatever address the
Service resolves to. TLS is end to end (the agent verifies the controller as
``meshsec-controller``); the forwarder only copies bytes.
"""
from __future__ import annotations

import logging
import socket
import threading

SO_MARK = getattr(socket, "SO_MARK", 36)


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"controller address {addr!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


class MarkedForwarder:
    """Listens on 127.0.0.1 (ephemeral port, ``local``) and forwards each connection to
    ``target`` (HOST:PORT, resolved at every connection) from a socket with SO_MARK ``mark``.
    ``connect`` is socket.create_connection's shape (tests inject one). OSError if the mark
    cannot be set (needs CAP_NET_ADMIN) shows at the first connection and closes it."""

    def __init__(self, target: str, mark: int, *, logger: logging.Logger | None = None,
                 connect=None, timeout: float = 10.0) -> None:
        self.target = target
        self.host, self.port = _split(target)
        self.mark = mark
        self.log = logger or logging.getLogger("meshsec.agent")
        self.timeout = timeout
        self._connect = connect or self._marked_connection
        self._lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._lsock.bind(("127.0.0.1", 0))
        self._lsock.listen(16)
        self.local = f"127.0.0.1:{self._lsock.getsockname()[1]}"
        self._closed = threading.Event()
        self.connections = 0
        self.errors = 0
        self._thread = threading.Thread(target=self._accept, name=f"ctl-fwd-{self.port}", daemon=True)

    def start(self) -> "MarkedForwarder":
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed.set()
        try:
            self._lsock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._lsock.close()

    def _marked_connection(self) -> socket.socket:
        last: OSError | None = None
        for fam, kind, proto, _, addr in socket.getaddrinfo(self.host, self.port, 0, socket.SOCK_STREAM):
            s = socket.socket(fam, kind, proto)
            try:
                s.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
                s.settimeout(self.timeout)
                s.connect(addr)
                s.settimeout(None)
                return s
            except OSError as exc:
                s.close()
                last = exc
        raise last or OSError(f"{self.host}: no address")

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._lsock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), name="ctl-fwd-conn", daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = self._connect()
        except OSError as exc:
            self.errors += 1
            self.log.warning("controller %s: cannot connect (marked %#x): %s", self.target, self.mark, exc)
            client.close()
            return
        self.connections += 1
        t = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
        t.start()
        _pump(client, upstream)
        t.join()
        client.close()
        upstream.close()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy src -> dst until EOF or an error, then half-close dst (and close both at the end)."""
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
            try:
                s.shutdown(how)
            except OSError:
                pass


def forward_controller(addresses: str, watch_addresses: list[str], mark: int,
                       logger: logging.Logger | None = None) -> tuple[str, str, list[MarkedForwarder]]:
    """Forwarders for every controller address and its watch address; returns the local
    ``address`` and ``watch_address`` strings for ControllerClient and the forwarders (close
    them at exit)."""
    log = logger or logging.getLogger("meshsec.agent")
    targets = [a.strip() for a in addresses.split(",") if a.strip()]
    fwds: list[MarkedForwarder] = []
    try:
        enrol = [MarkedForwarder(t, mark, logger=log).start() for t in targets]
        fwds += enrol
        watch = [MarkedForwarder(t, mark, logger=log).start() for t in watch_addresses]
        fwds += watch
    except (OSError, ValueError):
        for f in fwds:
            f.close()
        raise
    for f in fwds:
        log.info("controller %s via %s: connections marked %#x, kept out of the mesh", f.target, f.local, mark)
    return ",".join(f.local for f in enrol), ",".join(f.local for f in watch), fwds
