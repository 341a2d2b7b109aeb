"""The controller's state in etcd (v3), for several controller replicas.

Talks to etcd through its JSON gRPC gateway (``/v3/kv/range``, ``/v3/kv/put``,
``/v3/kv/txn``, ``/v3/kv/deleterange``, ``/v3/lease/grant``,
``/v3/lease/keepalive``, ``/v3/lease/revoke``, ``/v3/watch``) over HTTPS (server
verified against ``--etcd-cacert``, client certificate ``--etcd-cert`` /
``--etcd-key``) or, on loopback or with an explicit opt-out, plain HTTP, with
the standard library (``http.client``, ``ssl``): the maintained Python etcd v3
clients ship protobuf code generated for protobuf 3.x that does not import
under our protobuf 7 (docs/ha.md). Keys and values are base64 in the gateway's JSON.

Key layout under ``prefix`` (default ``/meshsec/``)::

    meta/<name>               CA key and certificate (created once, by txn)
    view/head                 current view version (decimal); the CAS target
    view/v/<020d version>     inventory snapshot (``Inventory.view_json()``)
    certs/<node>/<serial hex> JSON {"not_before", "not_after", "der" (base64)}
    tokens/<node>/<sha256 hex> Unix time the join token was used (created once, by txn)
    revoked/<serial hex>      JSON {"node", "not_after"}
    leader                    replica id of the leader, bound to its lease

Every write that changes the view is a txn comparing ``view/head``'s
mod_revision (no lost update between replicas) and, when a fence is set
(:meth:`EtcdStore.set_fence`), the leader key's value: a replica that lost
its lease cannot write (:class:`NotLeader`).
"""
from __future__ import annotations

import base64
import http.client
import ipaddress
import json
import logging
import socket
import ssl
import threading
import time
from typing import Callable, Iterator
from urllib.parse import urlsplit

from controller.store import HISTORY_KEEP

DEFAULT_PREFIX = "/meshsec/"


class EtcdError(OSError):
    """etcd is unreachable or answered with an error; the message names the
    endpoint(s) and what failed."""


class NotLeader(EtcdError):
    """A fenced write was refused: this replica no longer holds the leader key."""


def _b64(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode()
    return base64.b64encode(data).decode()


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def prefix_end(key: bytes) -> bytes:
    """The range_end that selects every key starting with ``key`` (etcd's rule)."""
    k = bytearray(key)
    while k:
        if k[-1] < 0xFF:
            k[-1] += 1
            return bytes(k)
        k.pop()
    return b"\x00"


def parse_endpoints(text: str) -> list[str]:
    """``https://h:2379[,https://h2:2379]`` -> normalised URLs ``scheme://host:port``
    (IPv6 hosts in brackets; a bare ``host:port`` is ``http://``).

    ValueError naming the bad entry; every entry must use the same scheme."""
    out = []
    for raw in text.split(","):
        raw = raw.strip()
        if not raw:
            continue
        u = urlsplit(raw if "://" in raw else "http://" + raw)
        if u.scheme not in ("http", "https") or not u.hostname or u.port is None or u.path not in ("", "/"):
            raise ValueError(f"--etcd-endpoints entry {raw!r} is not https://HOST:PORT (or http://HOST:PORT)")
        host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
        out.append(f"{u.scheme}://{host}:{u.port}")
    if not out:
        raise ValueError("--etcd-endpoints is empty; give https://HOST:PORT[,https://HOST:PORT...]")
    if len({e.split("://")[0] for e in out}) > 1:
        raise ValueError("--etcd-endpoints mixes http:// and https://; use https:// for every member")
    return out


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an IP, IPv6 with or without brackets) is this machine."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a DNS name: it may resolve anywhere


def _split(ep: str) -> tuple[str, str, int]:
    """(scheme, host without brackets, port) of ``[scheme://]host:port``."""
    scheme, _, rest = ep.rpartition("://")
    host, _, port = rest.rpartition(":")
    return scheme or "http", host.strip("[]"), int(port)


class EtcdTls:
    """TLS to etcd (``--etcd-cacert``, ``--etcd-cert``, ``--etcd-key``; docs/ha.md).

    ``cacert``: PEM CA bundle that signed etcd's server certificate (None: the
    system's trust store); ``cert`` / ``key``: PEM client certificate and its
    unencrypted key, for etcd's ``--client-cert-auth`` (both or neither). The
    server's certificate must name the endpoint's host (DNS or IP SAN). Raises
    ValueError naming the flag when a file is missing or unusable."""

    def __init__(self, cacert: str | None = None, cert: str | None = None, key: str | None = None) -> None:
        if (cert is None) != (key is None):
            raise ValueError("give --etcd-cert and --etcd-key together (the client certificate and its key)")
        self.cacert, self.cert, self.key = cacert, cert, key
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=None) if cacert is None \
            else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        if cacert is not None:
            try:
                ctx.load_verify_locations(cafile=cacert)
            except (OSError, ssl.SSLError) as e:
                raise ValueError(f"--etcd-cacert {cacert}: cannot load a PEM CA certificate from it "
                                 f"({getattr(e, 'strerror', None) or e}); give the PEM CA certificate that "
                                 "signed etcd's --cert-file") from None
        if cert is not None:
            try:
                ctx.load_cert_chain(cert, key)
            except (OSError, ssl.SSLError) as e:
                raise ValueError(f"--etcd-cert {cert} / --etcd-key {key}: cannot load the client certificate and "
                                 f"its key ({getattr(e, 'strerror', None) or e}); give PEM files, the key unencrypted "
                                 "and matching the certificate") from None
        self.context = ctx

    def __repr__(self) -> str:
        return f"EtcdTls(cacert={self.cacert!r}, cert={self.cert!r})"

    def explain(self, ep: str, e: BaseException) -> str:
        """A TLS failure against ``ep`` as a sentence naming the flag to fix."""
        host = _split(ep)[1]
        if isinstance(e, ssl.SSLCertVerificationError):
            if e.verify_code == 62 or "hostname" in str(e.verify_message).lower() \
                    or "IP address mismatch" in str(e.verify_message):
                return (f"TLS: etcd's certificate does not name {host!r} ({e.verify_message}); use a host its "
                        "certificate names (DNS or IP SAN) in --etcd-endpoints")
            ca = f"--etcd-cacert {self.cacert}" if self.cacert else "the system trust store (no --etcd-cacert)"
            return (f"TLS: etcd's certificate is not trusted by {ca} ({e.verify_message}); "
                    "give the CA that signed etcd's --cert-file with --etcd-cacert")
        text = str(e)
        # etcd (Go) ends the handshake with an alert or just closes it when it refuses the client
        refused = any(w in text for w in ("CERTIFICATE_REQUIRED", "HANDSHAKE_FAILURE", "BAD_CERTIFICATE",
                                          "UNKNOWN_CA", "CERTIFICATE_UNKNOWN", "EOF")) or "reset" in text.lower()
        if refused and self.cert is None:
            return (f"TLS: etcd refused the connection without a client certificate ({text}); etcd runs with "
                    "--client-cert-auth: give --etcd-cert and --etcd-key")
        if refused:
            return (f"TLS: etcd refused our client certificate --etcd-cert {self.cert} ({text}); it must be "
                    "signed by a CA in etcd's --trusted-ca-file")
        return f"TLS: {text}"


def check_plain_http(endpoints: list[str], allow: bool, log: logging.Logger | None = None) -> None:
    """Refuse ``http://`` to a non-loopback etcd (the CA private key would cross the network
    in the clear) unless ``allow`` (``--etcd-allow-plain-http``), which is logged."""
    plain = [ep for ep in endpoints if _split(ep)[0] == "http" and not is_loopback(_split(ep)[1])]
    if not plain:
        return
    if not allow:
        raise ValueError(f"--etcd-endpoints {','.join(plain)}: plain HTTP to a non-loopback etcd would carry the "
                         "CA private key and join-token use in the clear; use https:// with --etcd-cacert, "
                         "--etcd-cert and --etcd-key (docs/ha.md), or, on a network you trust, "
                         "--etcd-allow-plain-http")
    (log or logging.getLogger("meshsec.controller.etcd")).warning(
        "--etcd-allow-plain-http: talking to etcd %s over plain HTTP; the CA private key crosses the network "
        "in the clear", ",".join(plain))


class EtcdClient:
    """A small etcd v3 client over the JSON gateway; thread-safe (one HTTP(S)
    connection per call). ``endpoints``: from :func:`parse_endpoints` (a bare
    ``host:port`` is plain HTTP); ``tls``: :class:`EtcdTls` for ``https://``
    ones (default: the system trust store, no client certificate). Fails over
    between ``endpoints`` on connection and TLS errors (the TLS ones explained
    by :meth:`EtcdTls.explain`); ``timeout`` (seconds) bounds each request."""

    def __init__(self, endpoints: list[str], *, timeout: float = 3.0, tls: EtcdTls | None = None,
                 logger: logging.Logger | None = None) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoints")
        schemes = {_split(ep)[0] for ep in endpoints}
        if tls is not None and schemes != {"https"}:
            raise ValueError("--etcd-cacert/--etcd-cert/--etcd-key need https:// --etcd-endpoints")
        if "https" in schemes and tls is None:
            tls = EtcdTls()  # verify against the system trust store, no client certificate
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self.tls = tls
        self._preferred = 0
        self.log = logger or logging.getLogger("meshsec.controller.etcd")

    def _connect(self, ep: str, timeout: float) -> http.client.HTTPConnection:
        scheme, host, port = _split(ep)
        if scheme == "https":
            return http.client.HTTPSConnection(host, port, timeout=timeout, context=self.tls.context)
        return http.client.HTTPConnection(host, port, timeout=timeout)

    def _why(self, ep: str, e: BaseException) -> str:
        if isinstance(e, ssl.SSLError) and self.tls is not None:
            return f"{ep}: {self.tls.explain(ep, e)}"
        if isinstance(e, ConnectionResetError) and self.tls is not None:
            return f"{ep}: {self.tls.explain(ep, e)}"
        return f"{ep}: {e}"

    def __repr__(self) -> str:
        return f"EtcdClient({self.endpoints!r})"

    def call(self, path: str, body: dict) -> dict:
        """POST ``body`` to ``/v3/<path>`` on the first endpoint that answers."""
        errors = []
        n = len(self.endpoints)
        for i in range(n):
            idx = (self._preferred + i) % n
            ep = self.endpoints[idx]
            conn = self._connect(ep, self.timeout)
            try:
                conn.request("POST", "/v3/" + path, json.dumps(body), {"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException) as e:
                errors.append(self._why(ep, e))
                continue
            finally:
                conn.close()
            try:
                doc = json.loads(data or b"{}")
            except ValueError:
                raise EtcdError(f"etcd {ep} /v3/{path}: unreadable answer {data[:200]!r}") from None
            if resp.status != 200:
                msg = doc.get("message") or doc.get("error") or data[:200]
                if resp.status == 503 or "no leader" in str(msg) or "timed out" in str(msg):
                    errors.append(f"{ep}: {msg}")  # this member cannot serve now; try another
                    continue
                raise EtcdError(f"etcd {ep} /v3/{path}: HTTP {resp.status}: {msg}")
            self._preferred = idx
            return doc
        raise EtcdError(f"no etcd endpoint answered /v3/{path}: " + "; ".join(errors))

    # -- kv --------------------------------------------------------------
    def get(self, key: bytes) -> tuple[bytes, int, int] | None:
        """(value, mod_revision, create_revision) or None."""
        kvs = self.call("kv/range", {"key": _b64(key)}).get("kvs") or []
        if not kvs:
            return None
        kv = kvs[0]
        return _unb64(kv.get("value")), int(kv.get("mod_revision", 0)), int(kv.get("create_revision", 0))

    def get_prefix(self, key: bytes) -> list[tuple[bytes, bytes]]:
        doc = self.call("kv/range", {"key": _b64(key), "range_end": _b64(prefix_end(key))})
        return [(_unb64(kv.get("key")), _unb64(kv.get("value"))) for kv in doc.get("kvs") or []]

    def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        body = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        return int(self.call("kv/put", body).get("header", {}).get("revision", 0))

    def delete(self, key: bytes) -> None:
        self.call("kv/deleterange", {"key": _b64(key)})

    def txn(self, compare: list[dict], success: list[dict], failure: list[dict]) -> dict:
        return self.call("kv/txn", {"compare": compare, "success": success, "failure": failure})

    # -- leases ----------------------------------------------------------
    def lease_grant(self, ttl: int) -> int:
        doc = self.call("lease/grant", {"TTL": str(int(ttl))})
        if doc.get("error"):
            raise EtcdError(f"lease grant failed: {doc['error']}")
        return int(doc["ID"])

    def lease_keepalive(self, lease: int) -> int:
        """Refresh a lease; returns its remaining TTL (0 or less: it expired)."""
        doc = self.call("lease/keepalive", {"ID": str(lease)})
        return int((doc.get("result") or doc).get("TTL", 0))

    def lease_revoke(self, lease: int) -> None:
        self.call("lease/revoke", {"ID": str(lease)})

    # -- watch -----------------------------------------------------------
    def watch_prefix(self, key: bytes, start_revision: int, stop: threading.Event,
                     idle_timeout: float = 10.0) -> Iterator[tuple[int, list[tuple[str, bytes, bytes]]]]:
        """Stream ``(revision, [(type, key, value), ...])`` for changes under
        ``key`` from ``start_revision``; ends (returns) when the stream
        breaks, goes idle for ``idle_timeout`` seconds, or ``stop`` is set:
        the caller re-watches from the last revision + 1."""
        errors = []
        for i in range(len(self.endpoints)):
            ep = self.endpoints[(self._preferred + i) % len(self.endpoints)]
            conn = self._connect(ep, idle_timeout)
            body = {"create_request": {"key": _b64(key), "range_end": _b64(prefix_end(key)),
                                       "start_revision": str(start_revision)}}
            try:
                conn.request("POST", "/v3/watch", json.dumps(body), {"Content-Type": "application/json"})
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as e:
                errors.append(self._why(ep, e))
                conn.close()
                continue
            closer = threading.Thread(target=self._close_on_stop, args=(conn, stop), daemon=True)
            closer.start()
            try:
                while not stop.is_set():
                    line = resp.readline()
                    if not line:
                        return
                    doc = json.loads(line)
                    res = doc.get("result") or {}
                    if doc.get("error"):
                        raise EtcdError(f"etcd {ep} watch: {doc['error']}")
                    if res.get("compact_revision") and int(res["compact_revision"]) > 0 and res.get("canceled"):
                        raise EtcdError(f"etcd {ep} watch: history compacted at {res['compact_revision']}")
                    events = res.get("events") or []
                    if events:
                        rev = int(res.get("header", {}).get("revision", 0))
                        yield rev, [(e.get("type", "PUT"), _unb64(e["kv"].get("key")), _unb64(e["kv"].get("value")))
                                    for e in events]
            except (OSError, http.client.HTTPException, ValueError):
                return  # idle timeout, closed on stop, or a broken stream: the caller re-watches
            finally:
                conn.close()
        raise EtcdError("no etcd endpoint accepted a watch: " + "; ".join(errors))

    @staticmethod
    def _close_on_stop(conn: http.client.HTTPConnection, stop: threading.Event) -> None:
        while not stop.wait(0.5):
            if conn.sock is None:
                return
        sock = conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _cmp_absent(key: bytes) -> dict:
    return {"key": _b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}


def _put(key: bytes, value: bytes) -> dict:
    return {"request_put": {"key": _b64(key), "value": _b64(value)}}


def _range(key: bytes) -> dict:
    return {"request_range": {"key": _b64(key)}}


class EtcdStore:
    """The :class:`controller.store.StateStore` contract on etcd.

    Methods raise :class:`EtcdError` when etcd cannot be reached (after
    trying every endpoint) and :class:`NotLeader` for a fenced write by a
    replica that lost the leadership.
    """

    def __init__(self, client: EtcdClient, prefix: str = DEFAULT_PREFIX) -> None:
        if not prefix.startswith("/") or not prefix.endswith("/"):
            raise ValueError(f"--etcd-prefix {prefix!r} must start and end with '/'")
        self.client = client
        self.prefix = prefix.encode()
        self._fence: tuple[bytes, bytes] | None = None

    def __repr__(self) -> str:
        return f"EtcdStore({self.client!r}, prefix={self.prefix.decode()!r})"

    def key(self, *parts: str) -> bytes:
        return self.prefix + "/".join(parts).encode()

    @property
    def leader_key(self) -> bytes:
        return self.key("leader")

    @property
    def view_prefix(self) -> bytes:
        return self.key("view/")

    def set_fence(self, value: bytes | None) -> None:
        """Guard view writes with ``leader == value`` (None: unguarded)."""
        self._fence = None if value is None else (self.leader_key, value)

    def close(self) -> None:
        pass

    # -- meta --------------------------------------------------------------
    def get_meta(self, key: str) -> bytes | None:
        got = self.client.get(self.key("meta", key))
        return None if got is None else got[0]

    def set_meta(self, key: str, value: bytes) -> None:
        self.client.put(self.key("meta", key), value)

    def create_meta_once(self, items: dict[str, bytes]) -> dict[str, bytes]:
        """Store every item iff none of them exists yet (one txn); returns
        what is stored afterwards (ours, or the values a replica stored first)."""
        keys = {name: self.key("meta", name) for name in items}
        doc = self.client.txn([_cmp_absent(k) for k in keys.values()],
                              [_put(k, items[n]) for n, k in keys.items()],
                              [_range(k) for k in keys.values()])
        if doc.get("succeeded"):
            return dict(items)
        out = {}
        for name, resp in zip(keys, doc.get("responses") or []):
            kvs = (resp.get("response_range") or {}).get("kvs") or []
            if kvs:
                out[name] = _unb64(kvs[0].get("value"))
        if set(out) != set(items):
            raise EtcdError(f"CA material in etcd under {self.key('meta').decode()} is incomplete "
                            f"(has {sorted(out)}, needs {sorted(items)}); restore it or delete those keys")
        return out

    # -- view versions -------------------------------------------------------
    def _head(self) -> tuple[int, int]:
        """(version, mod_revision of the head key; 0 if absent)."""
        got = self.client.get(self.key("view/head"))
        if got is None:
            return 0, 0
        return int(got[0] or b"0"), got[1]

    def current_version(self) -> int:
        return self._head()[0]

    def inventory_at(self, version: int) -> str | None:
        if version <= 0:
            return None
        got = self.client.get(self.key(f"view/v/{version:020d}"))
        return None if got is None else got[0].decode()

    def record_inventory(self, view_json: str) -> tuple[int, bool]:
        for _ in range(20):
            version, mod = self._head()
            if version and self.inventory_at(version) == view_json:
                return version, False
            new = version + 1
            head = self.key("view/head")
            cmp = [{"key": _b64(head), "target": "MOD", "result": "EQUAL", "mod_revision": str(mod)}]
            if self._fence is not None:
                fk, fv = self._fence
                cmp.append({"key": _b64(fk), "target": "VALUE", "result": "EQUAL", "value": _b64(fv)})
            ops = [_put(self.key(f"view/v/{new:020d}"), view_json.encode()), _put(head, str(new).encode())]
            if new > HISTORY_KEEP:
                ops.append({"request_delete_range": {"key": _b64(self.key("view/v/")),
                                                     "range_end": _b64(self.key(f"view/v/{new - HISTORY_KEEP + 1:020d}"))}})
            doc = self.client.txn(cmp, ops, [_range(head)] + ([_range(self._fence[0])] if self._fence else []))
            if doc.get("succeeded"):
                return new, True
            if self._fence is not None:
                resp = (doc.get("responses") or [{}, {}])[-1]
                kvs = (resp.get("response_range") or {}).get("kvs") or []
                if not kvs or _unb64(kvs[0].get("value")) != self._fence[1]:
                    raise NotLeader("this controller is no longer the leader; view write refused")
            time.sleep(0.05)  # another writer moved the head: re-read and retry
        raise EtcdError("view version write kept conflicting; is another controller writing without a lease?")

    # -- certificates --------------------------------------------------------
    def add_certificate(self, serial: int, node: str, not_before: int, not_after: int, der: bytes) -> None:
        doc = json.dumps({"not_before": not_before, "not_after": not_after, "der": _b64(der)})
        self.client.put(self.key("certs", node, format(serial, "x")), doc.encode())

    def certificates_for(self, node: str) -> list[tuple[str, int, int]]:
        rows = []
        for key, value in self.client.get_prefix(self.key("certs", node) + b"/"):
            d = json.loads(value)
            rows.append((key.rsplit(b"/", 1)[-1].decode(), int(d["not_before"]), int(d["not_after"])))
        return sorted(rows, key=lambda r: r[1])

    def certificate_ders(self, node: str) -> list[tuple[int, int, bytes]]:
        out = []
        for key, value in self.client.get_prefix(self.key("certs", node) + b"/"):
            d = json.loads(value)
            out.append((int(key.rsplit(b"/", 1)[-1], 16), int(d["not_after"]), _unb64(d["der"])))
        return out

    def consume_token(self, node: str, token_sha256: bytes, now: int) -> bool:
        """Create ``tokens/<node>/<sha256>`` iff absent (one txn): True if
        this call used the token, False if it had been used."""
        key = self.key("tokens", node, token_sha256.hex())
        doc = self.client.txn([_cmp_absent(key)], [_put(key, str(now).encode())], [])
        return bool(doc.get("succeeded"))

    def revoke(self, entries: list[tuple[int, str, int]]) -> None:
        for serial, node, not_after in entries:
            self.client.put(self.key("revoked", format(serial, "x")),
                            json.dumps({"node": node, "not_after": not_after}).encode())

    def revoked(self, now: int) -> list[tuple[int, str, int]]:
        out = []
        for key, value in self.client.get_prefix(self.key("revoked") + b"/"):
            d = json.loads(value)
            if int(d["not_after"]) <= now:
                self.client.delete(key)  # expired: no longer needs revoking
                continue
            out.append((int(key.rsplit(b"/", 1)[-1], 16), d["node"], int(d["not_after"])))
        return sorted(out)


class ViewFollower:
    """Follows ``view/head`` in etcd and calls ``on_version(version,
    view_json)`` for each new version (from its own thread); reconnects
    after errors, polling as a fallback every ``resync`` seconds."""

    def __init__(self, store: EtcdStore, on_version: Callable[[int, str], None],
                 logger: logging.Logger | None = None, resync: float = 5.0) -> None:
        self.store = store
        self.on_version = on_version
        self.log = logger or logging.getLogger("meshsec.controller.etcd")
        self.resync = resync
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.seen = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="etcd-view-follower", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _sync(self) -> int:
        """Read the head; deliver it if newer. Returns the etcd revision read at."""
        doc = self.store.client.call("kv/range", {"key": _b64(self.store.key("view/head"))})
        rev = int(doc.get("header", {}).get("revision", 0))
        kvs = doc.get("kvs") or []
        if kvs:
            self._deliver(int(_unb64(kvs[0].get("value")) or b"0"))
        return rev

    def _deliver(self, version: int) -> None:
        if version <= self.seen:
            return
        view_json = self.store.inventory_at(version)
        if view_json is None:
            return
        self.seen = version
        self.on_version(version, view_json)

    def _run(self) -> None:
        head = self.store.key("view/head")
        while not self._stop.is_set():
            try:
                rev = self._sync()
                for rev, events in self.store.client.watch_prefix(head, rev + 1, self._stop,
                                                                   idle_timeout=self.resync):
                    for typ, key, value in events:
                        if key == head and typ == "PUT":
                            self._deliver(int(value or b"0"))
            except EtcdError as e:
                self.log.warning("following view versions in etcd: %s", e)
                self._stop.wait(1.0)
            except Exception:
                self.log.exception("view follower failed; retrying")
                self._stop.wait(1.0)
