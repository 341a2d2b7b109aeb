"""Kubernetes node source: every cluster Node becomes a mesh peer.

A Node maps onto a :class:`controller.policy.NodeSpec` as follows
(:func:`node_spec_from_k8s`):
- name: ``metadata.name`` (also its IKE identity, ID_FQDN);
- role: ``gateway`` (tunnel mode between nodes; each node protects its pods);
- endpoints: every ``status.addresses`` entry of type ``InternalIP``;
- subnets: the annotation ``meshsec.io/pod-cidrs`` (comma-separated CIDRs) when
  present, for CNIs whose IPAM does not fill ``spec.podCIDRs`` (Calico IPAM
  blocks, Cilium cluster-pool; docs/kubernetes.md); else ``spec.podCIDRs``
  (or the older single ``spec.podCIDR``).
A Node without an InternalIP or without a pod CIDR (IPAM not done yet) is
not a peer until a later MODIFIED event supplies them.

:class:`KubeNodeSource` lists Nodes, then watches from the list's
resourceVersion (``allowWatchBookmarks``), resuming from the last
resourceVersion seen (events and BOOKMARKs) when a stream ends or drops.
``410 Gone`` (the version was compacted away) -> a fresh list, which also
drops Nodes deleted meanwhile. Errors back off exponentially
(``backoff_initial`` .. ``backoff_max`` seconds). It uses the official
``kubernetes`` client for configuration, authentication and TLS, and reads
the watch stream line by line itself to see BOOKMARK and ERROR events.

Cluster agents enrol with one shared join token (``--kube-join-token-file``,
compared in constant time as a SHA-256 like every inventory token) or, with
``--kube-token-review``, with a projected service-account token checked by
the API server's TokenReview (:class:`TokenReviewer`).
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import re
import threading
from typing import Callable

from controller.policy import NodeSpec

_DNS_NAME = re.compile(r"^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
POD_CIDRS_ANNOTATION = "meshsec.io/pod-cidrs"
DEFAULT_AUDIENCE = "meshsec"


class KubeSourceError(RuntimeError):
    """Kubernetes configuration or API problem; the message says what to fix."""


class _Gone(Exception):
    """The watch's resourceVersion was compacted away (HTTP 410)."""


def node_spec_from_k8s(obj: dict, token_sha256: bytes = b"") -> tuple[NodeSpec | None, str]:
    """A v1 Node (parsed JSON) -> (NodeSpec, "") or (None, why it is not a peer yet)."""
    meta = obj.get("metadata") or {}
    name = meta.get("name")
    if not isinstance(name, str) or not _DNS_NAME.match(name):
        return None, f"Node name {name!r} is not a lower-case DNS name"
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    endpoints: list[str] = []
    for addr in status.get("addresses") or []:
        if isinstance(addr, dict) and addr.get("type") == "InternalIP":
            try:
                ip = str(ipaddress.ip_address(addr.get("address", "")))
            except ValueError:
                return None, f"Node {name!r}: InternalIP {addr.get('address')!r} is not an IP address"
            if ip not in endpoints:
                endpoints.append(ip)
    note = (meta.get("annotations") or {}).get(POD_CIDRS_ANNOTATION)
    if note is not None:
        cidrs = [c.strip() for c in str(note).split(",") if c.strip()]
        where = f"annotation {POD_CIDRS_ANNOTATION}"
        if not cidrs:
            return None, f"Node {name!r}: {where} is empty (remove it to use spec.podCIDRs)"
    else:
        cidrs = spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
        where = "spec.podCIDRs"
    subnets: list[str] = []
    for c in cidrs:
        try:
            net = ipaddress.ip_network(c, strict=True)
        except (ValueError, TypeError):
            return None, (f"Node {name!r}: pod CIDR {c!r} ({where}) is not a network without host bits, "
                          "e.g. 10.244.1.0/24")
        if str(net) not in subnets:
            subnets.append(str(net))
    if not endpoints:
        return None, f"Node {name!r} has no InternalIP address yet"
    if not subnets:
        return None, (f"Node {name!r} has no spec.podCIDRs yet (is the node IPAM controller running? a CNI with "
                      f"its own IPAM: set the annotation {POD_CIDRS_ANNOTATION}, docs/kubernetes.md)")
    return NodeSpec(name=name, role="gateway", endpoints=tuple(endpoints), subnets=tuple(subnets),
                    join_token_sha256=token_sha256, shared_token=True), ""


class Backoff:
    """Exponential backoff without jitter source of its own: ``next()`` ->
    seconds to wait (initial, 2x, 4x ... capped at ``maximum``); ``reset()``
    after a success."""

    def __init__(self, initial: float = 0.5, maximum: float = 30.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self.attempt = 0

    def next(self) -> float:
        delay = min(self.maximum, self.initial * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


def api_client(kubeconfig: str | None = None, in_cluster: bool = False):
    """A ``kubernetes.client.ApiClient`` from ``--kubeconfig FILE`` or the
    in-cluster service account (``--kubernetes``). KubeSourceError if neither works."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    try:
        if in_cluster:
            cfg = client.Configuration()
            config.load_incluster_config(client_configuration=cfg)
            return client.ApiClient(cfg)
        return config.new_client_from_config(config_file=kubeconfig)
    except (ConfigException, OSError, ValueError, TypeError) as e:
        where = "in-cluster service account (--kubernetes)" if in_cluster else f"--kubeconfig {kubeconfig}"
        raise KubeSourceError(f"cannot load Kubernetes configuration from {where}: {e}") from None


class KubeNodeSource:
    """Keeps the cluster's Nodes as NodeSpecs (see module docstring).

    ``api``: a kubernetes ``ApiClient``. ``token_sha256``: SHA-256 of the
    cluster join token, stamped on every NodeSpec. ``wait(seconds) -> bool``
    is the backoff sleep (default: the stop event's wait; tests pass their
    own). ``watch_timeout``: seconds the server keeps one watch open.
    ``counters``: lists, watches, events by type, 410s, errors.
    """

    name = "kubernetes"

    def __init__(self, api, token_sha256: bytes = b"", *, logger: logging.Logger | None = None,
                 backoff: Backoff | None = None, wait: Callable[[float], bool] | None = None,
                 watch_timeout: int = 300, read_timeout: float = 360.0) -> None:
        from kubernetes import client

        self._core = client.CoreV1Api(api)
        self.token_sha256 = token_sha256
        self.log = logger or logging.getLogger("meshsec.controller.k8s")
        self.backoff = backoff or Backoff()
        self._stop = threading.Event()
        self._wait = wait or self._stop.wait
        self.watch_timeout = watch_timeout
        self.read_timeout = read_timeout
        self._lock = threading.Lock()
        self._objects: dict[str, dict] = {}
        self._specs: tuple[NodeSpec, ...] = ()
        self._skipped: dict[str, str] = {}
        self._synced = threading.Event()
        self._on_change: Callable[[], None] = lambda: None
        self._thread: threading.Thread | None = None
        self._resp = None
        self.resource_version: str | None = None
        self.counters: dict[str, int] = {"lists": 0, "watches": 0, "gone_410": 0, "errors": 0,
                                         "ADDED": 0, "MODIFIED": 0, "DELETED": 0, "BOOKMARK": 0}

    # -- public ---------------------------------------------------------
    def nodes(self) -> tuple[NodeSpec, ...]:
        with self._lock:
            return self._specs

    def start(self, on_change: Callable[[], None]) -> None:
        self._on_change = on_change
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name="k8s-nodes", daemon=True)
        self._thread.start()

    def wait_synced(self, timeout: float) -> bool:
        """True once the first list arrived (within ``timeout`` seconds)."""
        return self._synced.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        resp = self._resp
        if resp is not None:
            try:
                resp.shutdown()
            except Exception:  # already closed
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # -- the loop -------------------------------------------------------
    def run(self) -> None:
        """List, then watch, until stop(); never raises."""
        while not self._stop.is_set():
            try:
                if self.resource_version is None:
                    self._list()
                self._watch_once()
                self.backoff.reset()
                continue  # a stream that ended cleanly (timeoutSeconds) resumes at once
            except _Gone:
                self.counters["gone_410"] += 1
                self.log.info("Node watch from resourceVersion %s: 410 Gone; listing again", self.resource_version)
                self.resource_version = None
                continue
            except Exception as e:  # dropped connection, API error, bad JSON: back off, resume
                if self._stop.is_set():
                    break
                self.counters["errors"] += 1
                delay = self.backoff.next()
                self.log.warning("Kubernetes Node %s failed (%s); retrying in %.1f s from resourceVersion %s",
                                 "list" if self.resource_version is None else "watch", _describe(e), delay,
                                 self.resource_version)
                self._wait(delay)

    def _list(self) -> None:
        resp = self._core.list_node(_preload_content=False, _request_timeout=(10, 60))
        try:
            body = json.loads(resp.data)
        finally:
            resp.release_conn()
        self.counters["lists"] += 1
        items = body.get("items") or []
        rv = (body.get("metadata") or {}).get("resourceVersion")
        if not rv:
            raise KubeSourceError("NodeList without metadata.resourceVersion")
        with self._lock:
            self._objects = {o["metadata"]["name"]: o for o in items if (o.get("metadata") or {}).get("name")}
        self.resource_version = rv
        self.log.info("listed %d Nodes at resourceVersion %s", len(items), rv)
        self._publish()
        self._synced.set()

    def _watch_once(self) -> None:
        self.counters["watches"] += 1
        resp = self._core.list_node(watch=True, resource_version=self.resource_version,
                                    allow_watch_bookmarks=True, timeout_seconds=self.watch_timeout,
                                    _preload_content=False, _request_timeout=(10, self.read_timeout))
        self._resp = resp
        try:
            from kubernetes.watch.watch import iter_resp_lines

            for line in iter_resp_lines(resp):
                if self._stop.is_set():
                    return
                if line.strip():
                    self._event(json.loads(line))
        finally:
            self._resp = None
            resp.release_conn()

    def _event(self, ev: dict) -> None:
        kind = ev.get("type")
        obj = ev.get("object") or {}
        meta = obj.get("metadata") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise _Gone()
            raise KubeSourceError(f"watch ERROR event: {obj.get('code')} {obj.get('reason')}: {obj.get('message')}")
        if kind not in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK"):
            raise KubeSourceError(f"unknown watch event type {kind!r}")
        self.counters[kind] += 1
        rv = meta.get("resourceVersion")
        if kind != "BOOKMARK":
            name = meta.get("name")
            with self._lock:
                if kind == "DELETED":
                    self._objects.pop(name, None)
                else:
                    self._objects[name] = obj
            self.log.info("Node %s %s (resourceVersion %s)", name, kind.lower(), rv)
        if rv:
            self.resource_version = rv
        if kind != "BOOKMARK":
            self._publish()

    def _publish(self) -> None:
        specs: list[NodeSpec] = []
        skipped: dict[str, str] = {}
        with self._lock:
            for name, obj in sorted(self._objects.items()):
                spec, why = node_spec_from_k8s(obj, self.token_sha256)
                if spec is None:
                    skipped[name] = why
                else:
                    specs.append(spec)
            changed = tuple(specs) != self._specs
            self._specs = tuple(specs)
            newly = {n: w for n, w in skipped.items() if self._skipped.get(n) != w}
            self._skipped = skipped
        for why in newly.values():
            self.log.warning("%s; not a mesh peer until it has one", why)
        if changed:
            try:
                self._on_change()
            except Exception:
                self.log.exception("node source change callback failed")


def _describe(e: Exception) -> str:
    status = getattr(e, "status", None)
    reason = getattr(e, "reason", None)
    if status:
        return f"HTTP {status} {reason or ''}".strip()
    return f"{type(e).__name__}: {e}"


class TokenReviewer:
    """Checks a projected service-account token with the API server
    (TokenReview, ``authentication.k8s.io/v1``).

    Accepts when the token is authenticated for ``audiences``, belongs to
    ``service_account`` (``system:serviceaccount:NS:NAME``) and is bound to
    a pod on the node asking (the ``authentication.kubernetes.io/node-name``
    extra, Kubernetes >= 1.30), and that node is a current cluster Node.
    ``check(node_name, token) -> (ok, reason)``; API errors -> (False, reason).
    """

    def __init__(self, api, source: KubeNodeSource, service_account: str,
                 audiences: tuple[str, ...] = (DEFAULT_AUDIENCE,)) -> None:
        from kubernetes import client

        self._auth = client.AuthenticationV1Api(api)
        self._client = client
        self.source = source
        self.service_account = service_account
        self.audiences = audiences

    def check(self, node_name: str, token: str) -> tuple[bool, str]:
        if node_name not in {n.name for n in self.source.nodes()}:
            return False, f"{node_name!r} is not a Kubernetes Node"
        body = self._client.V1TokenReview(spec=self._client.V1TokenReviewSpec(token=token,
                                                                               audiences=list(self.audiences)))
        try:
            review = self._auth.create_token_review(body, _request_timeout=(5, 10))
        except Exception as e:
            return False, f"TokenReview failed: {_describe(e)}"
        st = review.status
        if st is None or not st.authenticated:
            return False, f"token not authenticated ({getattr(st, 'error', None) or 'no reason given'})"
        user = st.user
        if user is None or user.username != self.service_account:
            return False, f"token belongs to {getattr(user, 'username', None)!r}, not {self.service_account!r}"
        bound = ((user.extra or {}).get(NODE_NAME_EXTRA) or [])
        if list(bound) != [node_name]:
            return False, f"token is bound to node {bound!r}, not {node_name!r}"
        return True, ""


def token_sha256(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def same_token(digest: bytes, token: str) -> bool:
    """Constant-time comparison of a token against a stored SHA-256."""
    return hmac.compare_digest(digest, token_sha256(token))


def parse_configmap_ref(ref: str) -> tuple[str, str]:
    """``NAMESPACE/NAME`` -> (namespace, name); ValueError naming what is wrong."""
    ns, sep, name = ref.partition("/")
    if not sep or not _DNS_NAME.match(ns or "") or not _DNS_NAME.match(name or ""):
        raise ValueError(f"--kube-ca-configmap {ref!r}: expected NAMESPACE/NAME, e.g. meshsec/meshsec-controller-ca")
    return ns, name


class CaPublisher:
    """Publishes the controller CA certificate (PEM) as key ``ca.pem`` of one existing ConfigMap,
    so agents mount it without manual steps (``--kube-ca-configmap NAMESPACE/NAME``).

    Only ``get`` and ``patch`` of that one object are needed (RBAC ``resourceNames``); the chart
    creates the ConfigMap. ``publish_once() -> (changed, problem)``; ``start()`` runs it in a
    thread: at once, then every ``interval`` seconds (a ``kubectl apply`` of the chart's empty
    object is repaired), retrying API errors with backoff. The CA is public: no secret here."""

    KEY = "ca.pem"

    def __init__(self, api, namespace: str, name: str, pem: str, *, interval: float = 60.0,
                 logger: logging.Logger | None = None, backoff: Backoff | None = None) -> None:
        from kubernetes import client

        self._core = client.CoreV1Api(api)
        self.namespace, self.name, self.pem = namespace, name, pem
        self.interval = interval
        self.log = logger or logging.getLogger("meshsec.controller.k8s")
        self.backoff = backoff or Backoff()
        self.published = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def publish_once(self) -> tuple[bool, str]:
        where = f"ConfigMap {self.namespace}/{self.name}"
        try:
            cm = self._core.read_namespaced_config_map(self.name, self.namespace, _request_timeout=(5, 10))
        except Exception as e:
            if getattr(e, "status", None) == 404:
                return False, (f"{where} does not exist: the chart creates it (or `kubectl -n {self.namespace} "
                               f"create configmap {self.name}`); the controller may only update it")
            return False, f"cannot read {where}: {_describe(e)}"
        if (cm.data or {}).get(self.KEY) == self.pem:
            return False, ""
        try:
            self._core.patch_namespaced_config_map(self.name, self.namespace, {"data": {self.KEY: self.pem}},
                                                   _request_timeout=(5, 10))
        except Exception as e:
            return False, f"cannot update {where}: {_describe(e)}"
        self.log.info("controller CA published to %s (key %s)", where, self.KEY)
        return True, ""

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ca-publisher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            _changed, problem = self.publish_once()
            if problem:
                delay = self.backoff.next()
                self.log.error("%s; retrying in %.1f s", problem, delay)
            else:
                self.backoff.reset()
                self.published.set()
                delay = self.interval
            if self._stop.wait(delay):
                return
