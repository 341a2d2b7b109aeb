"""A small, honest stand-in for kube-apiserver's Node list/watch (no real
API server can run on these machines).

What it implements, in the API server's JSON wire format:
- ``GET /api/v1/nodes`` -> a ``NodeList`` whose ``metadata.resourceVersion``
  is the current version.
- ``GET /api/v1/nodes?watch=1&resourceVersion=N[&allowWatchBookmarks=true]
  [&timeoutSeconds=S]`` -> HTTP/1.1 chunked stream of one JSON object per
  line, ``{"type": "ADDED"|"MODIFIED"|"DELETED"|"BOOKMARK"|"ERROR",
  "object": ...}``: every change after N, then changes as they happen.
  N older than the compaction point -> one ``ERROR`` event carrying a
  ``Status`` with ``code: 410`` (reason ``Expired``), then the stream ends,
  as the real server does. No or ``0`` resourceVersion: synthetic ``ADDED``
  for every current Node first. ``BOOKMARK`` objects carry only
  ``metadata.resourceVersion`` (sent on :meth:`bookmark` and every
  ``bookmark_interval`` seconds when asked for).
- ``POST /apis/authentication.k8s.io/v1/tokenreviews`` -> a ``TokenReview``
  with ``status.authenticated`` and, for known tokens, ``status.user``
  (username, ``extra["authentication.kubernetes.io/node-name"]``) as for a
  projected service-account token bound to a pod.
- ``GET`` / ``PATCH`` (merge of ``data``) ``/api/v1/namespaces/NS/configmaps/NAME`` for
  the ConfigMaps in ``configmaps`` (404 ``Status`` for others; no create, as the chart's
  RBAC allows none).
- Every request needs ``Authorization: Bearer <token>`` (401 ``Status``
  otherwise); resourceVersions are decimal strings of one global counter.

Test API: :meth:`add_node`, :meth:`modify_node`, :meth:`delete_node`,
:meth:`compact` (expire old versions), :meth:`drop_watches` (cut streams
without the terminating chunk, like a dropped connection), :meth:`bookmark`,
:meth:`write_kubeconfig`; ``requests`` logs (method, path, query).
"""
from __future__ import annotations

import copy
import ctypes
import json
import os
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

CLONE_NEWNET = 0x40000000


def node_object(name: str, internal_ips: list[str], pod_cidrs: list[str], rv: int,
                uid: str | None = None, extra_addresses: list[dict] | None = None,
                annotations: dict | None = None) -> dict:
    """A v1 Node as the API server serialises it (the fields meshsec reads,
    plus the usual neighbours so the parser meets realistic objects)."""
    addresses = [{"type": "InternalIP", "address": ip} for ip in internal_ips]
    addresses.append({"type": "Hostname", "address": name})
    addresses.extend(extra_addresses or [])
    spec: dict = {"podCIDRs": list(pod_cidrs)}
    if pod_cidrs:
        spec["podCIDR"] = pod_cidrs[0]
    return {
        "kind": "Node", "apiVersion": "v1",
        "metadata": {"name": name, "uid": uid or str(uuid.uuid4()), "resourceVersion": str(rv),
                     "creationTimestamp": "2026-01-01T00:00:00Z",
                     "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"},
                     **({"annotations": dict(annotations)} if annotations else {})},
        "spec": spec,
        "status": {"addresses": addresses,
                   "conditions": [{"type": "Ready", "status": "True"}],
                   "nodeInfo": {"kubeletVersion": "v1.33.0"}},
    }


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


class FakeKubeApiServer:
    """Threaded HTTP server on ``host``:``port`` (0: ephemeral). With
    ``netns``, the listening socket is created inside that network namespace
    (the serving threads stay in ours; a socket keeps its namespace)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, token: str = "test-bearer-token",
                 netns: str | None = None, bookmark_interval: float | None = None) -> None:
        self.token = token
        self.bookmark_interval = bookmark_interval
        self._cond = threading.Condition()
        self._rv = 100
        self._compacted = 0           # a watch from a version below this gets 410
        self._nodes: dict[str, dict] = {}
        self._events: list[tuple[int, str, dict]] = []
        self._epoch = 0               # drop_watches() bumps it; streams of an older epoch end
        self._bookmarks = 0
        self._open_watches = 0        # streams past their initial events, waiting for changes
        self.requests: list[tuple[str, str, dict]] = []
        self.review_tokens: dict[str, tuple[str, str]] = {}   # token -> (username, node name)
        self.configmaps: dict[tuple[str, str], dict] = {}      # (namespace, name) -> ConfigMap object
        sock = _listen_socket(host, port, netns)
        self._httpd = ThreadingHTTPServer((host, port), _handler_for(self), bind_and_activate=False)
        self._httpd.socket.close()
        self._httpd.socket = sock
        self._httpd.server_address = sock.getsockname()[:2]
        self._httpd.daemon_threads = True
        self.host, self.port = self._httpd.server_address
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fake-kube-apiserver", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "FakeKubeApiServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.drop_watches()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "FakeKubeApiServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def add_configmap(self, namespace: str, name: str, data: dict | None = None) -> None:
        with self._cond:
            self._rv += 1
            self.configmaps[(namespace, name)] = {
                "kind": "ConfigMap", "apiVersion": "v1", "data": dict(data or {}),
                "metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4()),
                             "resourceVersion": str(self._rv)}}

    # -- cluster changes ------------------------------------------------
    @property
    def resource_version(self) -> int:
        with self._cond:
            return self._rv

    def _record(self, kind: str, obj: dict) -> None:
        self._events.append((self._rv, kind, copy.deepcopy(obj)))
        self._cond.notify_all()

    def add_node(self, name: str, internal_ips: list[str], pod_cidrs: list[str], **kw) -> dict:
        with self._cond:
            if name in self._nodes:
                raise ValueError(f"node {name!r} exists")
            self._rv += 1
            obj = node_object(name, internal_ips, pod_cidrs, self._rv, **kw)
            self._nodes[name] = obj
            self._record("ADDED", obj)
            return copy.deepcopy(obj)

    def modify_node(self, name: str, *, internal_ips: list[str] | None = None,
                    pod_cidrs: list[str] | None = None, labels: dict | None = None,
                    annotations: dict | None = None) -> dict:
        with self._cond:
            old = self._nodes[name]
            ips = internal_ips if internal_ips is not None else [
                a["address"] for a in old["status"]["addresses"] if a["type"] == "InternalIP"]
            cidrs = pod_cidrs if pod_cidrs is not None else old["spec"].get("podCIDRs", [])
            self._rv += 1
            notes = annotations if annotations is not None else old["metadata"].get("annotations")
            obj = node_object(name, ips, cidrs, self._rv, uid=old["metadata"]["uid"], annotations=notes)
            obj["metadata"]["labels"].update(labels or {})
            self._nodes[name] = obj
            self._record("MODIFIED", obj)
            return copy.deepcopy(obj)

    def delete_node(self, name: str) -> None:
        with self._cond:
            obj = self._nodes.pop(name)
            self._rv += 1
            obj = copy.deepcopy(obj)
            obj["metadata"]["resourceVersion"] = str(self._rv)
            self._record("DELETED", obj)

    def compact(self) -> int:
        """Expire every version up to now (etcd compaction): watches from an
        older resourceVersion get 410 Gone. Returns the compaction point."""
        with self._cond:
            self._compacted = self._rv
            self._events = [e for e in self._events if e[0] > self._rv]
            return self._compacted

    def drop_watches(self) -> None:
        """Cut every open watch stream abruptly (no terminating chunk)."""
        with self._cond:
            self._epoch += 1
            self._cond.notify_all()

    def bookmark(self) -> None:
        """Send a BOOKMARK at the current version on every stream that asked for them."""
        with self._cond:
            self._bookmarks += 1
            self._cond.notify_all()

    def open_watches(self) -> int:
        """Watch streams that will see the next bookmark() / drop_watches() / change.
        (A request is recorded before its stream is registered: tests that poke a
        stream must wait for this, not for watch_requests().)"""
        with self._cond:
            return self._open_watches

    def watch_requests(self) -> list[dict]:
        return [q for m, p, q in list(self.requests) if p == "/api/v1/nodes" and q.get("watch") in ("1", "true")]

    def list_requests(self) -> list[dict]:
        return [q for m, p, q in list(self.requests) if p == "/api/v1/nodes" and q.get("watch") not in ("1", "true")]

    def write_kubeconfig(self, path: Path, server_url: str | None = None) -> Path:
        cfg = {
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": server_url or self.url}}],
            "users": [{"name": "meshsec-controller", "user": {"token": self.token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "meshsec-controller"}}],
        }
        Path(path).write_text(json.dumps(cfg, indent=1))
        return Path(path)


def _listen_socket(host: str, port: int, netns: str | None) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(64)
        return s

    if netns is None:
        return make()
    result: list = []

    def in_ns() -> None:  # setns() moves only this thread; it ends right after
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {netns} failed")
            finally:
                os.close(fd)
            result.append(make())
        except Exception as e:  # reported to the caller below
            result.append(e)

    t = threading.Thread(target=in_ns, name=f"bind-in-{netns}")
    t.start()
    t.join()
    if isinstance(result[0], Exception):
        raise result[0]
    return result[0]


def _handler_for(api: FakeKubeApiServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # quiet
            pass

        def _json(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorised(self) -> bool:
            if self.headers.get("Authorization") == f"Bearer {api.token}":
                return True
            self._json(401, _status(401, "Unauthorized", "Unauthorized"))
            return False

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
            api.requests.append(("GET", url.path, query))
            if not self._authorised():
                return
            if "/configmaps/" in url.path:
                self._configmap(url.path, None)
                return
            if url.path != "/api/v1/nodes":
                self._json(404, _status(404, "NotFound", f"the server could not find the requested resource ({url.path})"))
                return
            if query.get("watch") in ("1", "true"):
                self._watch(query)
                return
            with api._cond:
                body = {"kind": "NodeList", "apiVersion": "v1",
                        "metadata": {"resourceVersion": str(api._rv)},
                        "items": [copy.deepcopy(n) for _, n in sorted(api._nodes.items())]}
            self._json(200, body)

        def do_POST(self) -> None:
            url = urlsplit(self.path)
            api.requests.append(("POST", url.path, {}))
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            if not self._authorised():
                return
            if url.path != "/apis/authentication.k8s.io/v1/tokenreviews":
                self._json(404, _status(404, "NotFound", url.path))
                return
            try:
                review = json.loads(raw)
                token = review["spec"]["token"]
            except (ValueError, KeyError, TypeError):
                self._json(400, _status(400, "BadRequest", "TokenReview needs spec.token"))
                return
            known = api.review_tokens.get(token)
            status: dict = {"authenticated": known is not None}
            if known:
                status["user"] = {"username": known[0], "groups": ["system:serviceaccounts"],
                                  "extra": {"authentication.kubernetes.io/node-name": [known[1]]}}
                status["audiences"] = review["spec"].get("audiences") or []
            else:
                status["error"] = "invalid bearer token"
            self._json(201, {"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                             "metadata": {}, "spec": review["spec"], "status": status})

        def do_PATCH(self) -> None:
            url = urlsplit(self.path)
            api.requests.append(("PATCH", url.path, {}))
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if not self._authorised():
                return
            try:
                body = json.loads(raw)
            except ValueError:
                self._json(400, _status(400, "BadRequest", "patch body is not JSON"))
                return
            self._configmap(url.path, body)

        def _configmap(self, path: str, patch: dict | None) -> None:
            parts = path.strip("/").split("/")
            if len(parts) != 6 or parts[:3] != ["api", "v1", "namespaces"] or parts[4] != "configmaps":
                self._json(404, _status(404, "NotFound", path))
                return
            key = (parts[3], parts[5])
            with api._cond:
                cm = api.configmaps.get(key)
                if cm is None:
                    self._json(404, _status(404, "NotFound", f'configmaps "{key[1]}" not found'))
                    return
                if patch is not None:
                    data = dict(cm.get("data") or {})
                    data.update((patch or {}).get("data") or {})
                    cm["data"] = data
                    api._rv += 1
                    cm["metadata"]["resourceVersion"] = str(api._rv)
                body = copy.deepcopy(cm)
            self._json(200, body)

        def _chunk(self, obj: dict) -> None:
            data = json.dumps(obj).encode() + b"\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        def _watch(self, query: dict) -> None:
            rv_text = query.get("resourceVersion", "")
            bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
            timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else None
            deadline = time.monotonic() + timeout if timeout else None
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            pending: list[tuple[int, str, dict]]
            registered = False
            with api._cond:
                epoch, marks = api._epoch, api._bookmarks
                if rv_text in ("", "0"):
                    since = api._rv
                    pending = [(since, "ADDED", copy.deepcopy(n)) for _, n in sorted(api._nodes.items())]
                else:
                    try:
                        since = int(rv_text)
                    except ValueError:
                        since = -1
                    if since < api._compacted:
                        gone = _status(410, "Expired", f"too old resource version: {rv_text} ({api._compacted})")
                        pending = [(0, "ERROR", gone)]
                        since = None
                    else:
                        pending = [e for e in api._events if e[0] > since]
            try:
                for _, kind, obj in pending:
                    self._chunk({"type": kind, "object": obj})
                if since is None:   # 410: the server ends the stream after the ERROR event
                    self.wfile.write(b"0\r\n\r\n")
                    return
                last = max([since] + [e[0] for e in pending])
                with api._cond:
                    api._open_watches += 1
                    registered = True
                next_mark = time.monotonic() + api.bookmark_interval if api.bookmark_interval else None
                while True:
                    with api._cond:
                        waits = [t for t in (deadline, next_mark) if t is not None]
                        wait = min(waits) - time.monotonic() if waits else None
                        api._cond.wait_for(lambda: api._epoch != epoch or api._bookmarks != marks
                                           or (api._events and api._events[-1][0] > last),
                                           timeout=None if wait is None else max(0.0, wait))
                        if api._epoch != epoch:
                            self.close_connection = True
                            try:
                                self.connection.shutdown(socket.SHUT_RDWR)
                            except OSError:
                                pass
                            return
                        new = [e for e in api._events if e[0] > last]
                        send_mark = api._bookmarks != marks
                        marks = api._bookmarks
                        now_rv = api._rv
                    for rv, kind, obj in new:
                        self._chunk({"type": kind, "object": obj})
                        last = rv
                    now = time.monotonic()
                    if next_mark is not None and now >= next_mark:
                        send_mark = True
                        next_mark = now + api.bookmark_interval
                    if send_mark and bookmarks:
                        last = max(last, now_rv)
                        self._chunk({"type": "BOOKMARK", "object": {
                            "kind": "Node", "apiVersion": "v1",
                            "metadata": {"resourceVersion": str(last),
                                         "annotations": {"k8s.io/initial-events-end": "false"}}}})
                    if deadline is not None and now >= deadline:
                        self.wfile.write(b"0\r\n\r\n")
                        return
            except (BrokenPipeError, ConnectionResetError, OSError):
                self.close_connection = True
            finally:
                if registered:
                    with api._cond:
                        api._open_watches -= 1

    return Handler


def main() -> None:  # manual use: python -m e2e.kube_apiserver
    with FakeKubeApiServer(port=6443) as api:
        api.add_node("node-1", ["198.51.100.1"], ["10.244.1.0/24"])
        print(api.url, "token", api.token, flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
