"""Pure policy: a validated inventory -> the view each node gets.

No I/O, no clock, no randomness. ``controller.inventory`` builds the
:class:`Inventory` from YAML; ``controller.service`` maps :class:`View` onto
the ``meshsec.v1.ViewUpdate`` message.

Rules:
- Full mesh: every node's peers are all other nodes, sorted by name.
- A node's subnets are its inventory ``subnets``, or, if it lists none,
  its endpoints as host prefixes (/32, /128): a plain host protects itself.
- ``initiate``: the node whose name sorts lower starts IKE, unless one side
  has no endpoints (unreachable, e.g. a roaming host behind NAT): then the
  side without endpoints initiates, and nobody initiates to a peer without
  endpoints.
- Mode: ``defaults.mode``; ``auto`` means transport between two hosts,
  tunnel whenever a gateway is involved.
"""
from __future__ import annotations

import ipaddress
import json
from dataclasses import asdict, dataclass, field

DEFAULT_IKE_PROPOSALS: tuple[str, ...] = (
    "aes128gcm16-prfsha256-x25519",
    "aes256gcm16-prfsha256-x25519",
    "aes128gcm16-prfsha256-ecp256",
    "aes256gcm16-prfsha256-ecp256",
)
DEFAULT_ESP_PROPOSALS: tuple[str, ...] = ("aes128gcm16", "aes256gcm16")

MODES = ("tunnel", "transport", "auto")
PROTOCOLS = ("esp", "ah")
ENCAPSULATIONS = ("udp", "none")
ROLES = ("host", "gateway")


class UnknownNode(KeyError):
    """The named node is not in the inventory."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"node {self.name!r} is not in the inventory"


@dataclass(frozen=True)
class Defaults:
    """Policy applied to every peer pair. Durations in seconds (0: no rekey /
    no DPD); replay_window in packets."""

    ike_proposals: tuple[str, ...] = DEFAULT_IKE_PROPOSALS
    esp_proposals: tuple[str, ...] = DEFAULT_ESP_PROPOSALS
    mode: str = "tunnel"
    protocol: str = "esp"
    encapsulation: str = "udp"
    ike_lifetime_s: float = 4 * 3600.0
    child_lifetime_s: float = 3600.0
    dpd_interval_s: float = 30.0
    replay_window: int = 1024


@dataclass(frozen=True)
class NodeSpec:
    """One inventory node. ``subnets`` are normalised CIDR strings,
    ``endpoints`` normalised IP strings. ``join_token_sha256`` is the 32-byte
    SHA-256 of the join token (b"" in history snapshots, which omit tokens)."""

    name: str
    role: str
    endpoints: tuple[str, ...]
    subnets: tuple[str, ...]
    join_token_sha256: bytes = field(default=b"", repr=False, compare=False)


@dataclass(frozen=True)
class Inventory:
    nodes: tuple[NodeSpec, ...]
    defaults: Defaults = Defaults()

    def node(self, name: str) -> NodeSpec:
        """The node called ``name``; raises :class:`UnknownNode`."""
        for n in self.nodes:
            if n.name == name:
                return n
        raise UnknownNode(name)

    def view_json(self) -> str:
        """Canonical JSON of everything that shapes views (no tokens)."""
        nodes = [
            {"name": n.name, "role": n.role, "endpoints": list(n.endpoints), "subnets": list(n.subnets)}
            for n in sorted(self.nodes, key=lambda n: n.name)
        ]
        return json.dumps({"nodes": nodes, "defaults": asdict(self.defaults)}, sort_keys=True)

    @classmethod
    def from_view_json(cls, text: str) -> Inventory:
        """Inverse of :meth:`view_json` (tokens come back empty)."""
        data = json.loads(text)
        d = data["defaults"]
        defaults = Defaults(**{**d, "ike_proposals": tuple(d["ike_proposals"]),
                               "esp_proposals": tuple(d["esp_proposals"])})
        nodes = tuple(
            NodeSpec(n["name"], n["role"], tuple(n["endpoints"]), tuple(n["subnets"]))
            for n in data["nodes"]
        )
        return cls(nodes=nodes, defaults=defaults)


@dataclass(frozen=True)
class PolicyView:
    mode: str
    protocol: str
    encapsulation: str
    ike_proposals: tuple[str, ...]
    esp_proposals: tuple[str, ...]
    ike_lifetime_s: float
    child_lifetime_s: float
    dpd_interval_s: float
    replay_window: int


@dataclass(frozen=True)
class PeerView:
    name: str
    identity: str
    endpoints: tuple[str, ...]
    subnets: tuple[str, ...]
    policy: PolicyView
    initiate: bool


@dataclass(frozen=True)
class View:
    """What one node gets: itself and its peers (sorted by name)."""

    name: str
    identity: str
    subnets: tuple[str, ...]
    endpoints: tuple[str, ...]
    peers: tuple[PeerView, ...]

    def peer(self, name: str) -> PeerView | None:
        for p in self.peers:
            if p.name == name:
                return p
        return None


def effective_subnets(node: NodeSpec) -> tuple[str, ...]:
    """The node's subnets, or its endpoints as host prefixes if it has none."""
    if node.subnets:
        return node.subnets
    return tuple(str(ipaddress.ip_network(e)) for e in node.endpoints)


def should_initiate(me: NodeSpec, peer: NodeSpec) -> bool:
    """Whether ``me`` starts IKE with ``peer`` (see module docstring)."""
    if not peer.endpoints:
        return False
    if not me.endpoints:
        return True
    return me.name < peer.name


def pair_policy(defaults: Defaults, a: NodeSpec, b: NodeSpec) -> PolicyView:
    """The policy between two nodes; symmetric in a and b."""
    mode = defaults.mode
    if mode == "auto":
        mode = "transport" if a.role == "host" and b.role == "host" else "tunnel"
    return PolicyView(
        mode=mode,
        protocol=defaults.protocol,
        encapsulation=defaults.encapsulation,
        ike_proposals=defaults.ike_proposals,
        esp_proposals=defaults.esp_proposals,
        ike_lifetime_s=defaults.ike_lifetime_s,
        child_lifetime_s=defaults.child_lifetime_s,
        dpd_interval_s=defaults.dpd_interval_s,
        replay_window=defaults.replay_window,
    )


def compute_view(inventory: Inventory, node_name: str) -> View:
    """The view of ``node_name``; raises :class:`UnknownNode`."""
    me = inventory.node(node_name)
    peers = tuple(
        PeerView(
            name=n.name,
            identity=n.name,
            endpoints=n.endpoints,
            subnets=effective_subnets(n),
            policy=pair_policy(inventory.defaults, me, n),
            initiate=should_initiate(me, n),
        )
        for n in sorted(inventory.nodes, key=lambda n: n.name)
        if n.name != me.name
    )
    return View(name=me.name, identity=me.name, subnets=effective_subnets(me),
                endpoints=me.endpoints, peers=peers)


@dataclass(frozen=True)
class ViewDiff:
    upserted: tuple[PeerView, ...]
    removed: tuple[str, ...]
    self_changed: bool

    @property
    def empty(self) -> bool:
        return not (self.upserted or self.removed or self.self_changed)


def diff_views(old: View, new: View) -> ViewDiff:
    """Peers added or changed (``upserted``), peers gone (``removed``, names),
    and whether the node's own subnets/endpoints changed."""
    old_peers = {p.name: p for p in old.peers}
    new_names = {p.name for p in new.peers}
    upserted = tuple(p for p in new.peers if old_peers.get(p.name) != p)
    removed = tuple(sorted(n for n in old_peers if n not in new_names))
    self_changed = (old.subnets, old.endpoints, old.identity) != (new.subnets, new.endpoints, new.identity)
    return ViewDiff(upserted=upserted, removed=removed, self_changed=self_changed)
