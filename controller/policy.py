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
- Policy rules (``Inventory.rules``, the inventory's ``policies:``) are
  tried in order for every pair of nodes; the first rule whose ``between``
  matches the pair (either way round) decides: PROTECT (with its protocol,
  mode and proposals over ``defaults``), BYPASS or DISCARD. No match: PROTECT
  with ``defaults`` (rule name ``defaults``). Peers whose pair is not
  PROTECT are not initiated to.
- Mode: ``auto`` means transport between two hosts, tunnel whenever a
  gateway is involved.
"""
from __future__ import annotations

import ipaddress
import json
from dataclasses import asdict, dataclass, field, replace

# one list for agent and controller (meshsec.defaults); re-exported here
from meshsec.defaults import DEFAULT_ESP_PROPOSALS, DEFAULT_IKE_PROPOSALS  # noqa: E402,F401

MODES = ("tunnel", "transport", "auto")
PROTOCOLS = ("esp", "ah", "ah+esp")
ACTIONS = ("protect", "bypass", "discard")
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
    no DPD); replay_window in packets; CHILD_SA lifetimes in octets and packets
    (RFC 4301 §4.4.2.1, 0: no limit)."""

    ike_proposals: tuple[str, ...] = DEFAULT_IKE_PROPOSALS
    esp_proposals: tuple[str, ...] = DEFAULT_ESP_PROPOSALS
    mode: str = "tunnel"
    protocol: str = "esp"
    encapsulation: str = "udp"
    ike_lifetime_s: float = 4 * 3600.0
    child_lifetime_s: float = 3600.0
    dpd_interval_s: float = 30.0
    replay_window: int = 1024
    child_lifetime_bytes: int = 0
    child_lifetime_packets: int = 0


# Defaults fields left out of view_json while 0, so inventories that do not use them keep
# their snapshots byte-identical (from_view_json fills in the default)
_OMIT_WHEN_ZERO = ("child_lifetime_bytes", "child_lifetime_packets")


@dataclass(frozen=True)
class Rule:
    """One ``policies:`` entry. ``between`` holds two sets of node references,
    each ``"<node name>"``, ``"group:<name>"``, ``"role:host|gateway"`` or
    ``"any"``; the rule matches a pair (a, b) when a is in one set and b in
    the other. ``settings`` overrides :class:`Defaults` fields for PROTECT."""

    name: str
    between: tuple[tuple[str, ...], tuple[str, ...]]
    action: str = "protect"
    settings: tuple[tuple[str, object], ...] = ()


@dataclass(frozen=True)
class NodeSpec:
    """One inventory node. ``subnets`` are normalised CIDR strings,
    ``endpoints`` normalised IP strings. ``join_token_sha256`` is the 32-byte
    SHA-256 of the join token (b"" in history snapshots, which omit tokens).
    ``shared_token``: the token is a cluster-wide one (Kubernetes source),
    usable again whenever the node holds no current certificate; otherwise
    the token is single-use."""

    name: str
    role: str
    endpoints: tuple[str, ...]
    subnets: tuple[str, ...]
    join_token_sha256: bytes = field(default=b"", repr=False, compare=False)
    shared_token: bool = field(default=False, compare=False)


@dataclass(frozen=True)
class Inventory:
    nodes: tuple[NodeSpec, ...]
    defaults: Defaults = Defaults()
    groups: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (group name, member node names)
    rules: tuple[Rule, ...] = ()
    # revoked, unexpired node certificates: (serial, not_after Unix seconds), sorted
    revoked: tuple[tuple[int, int], ...] = ()

    @property
    def revoked_serials(self) -> frozenset[int]:
        return frozenset(s for s, _ in self.revoked)

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
        defaults = {k: v for k, v in asdict(self.defaults).items() if not (k in _OMIT_WHEN_ZERO and not v)}
        doc = {"nodes": nodes, "defaults": defaults}
        if self.groups or self.rules:  # absent keys keep older snapshots byte-identical
            doc["groups"] = [[g, list(m)] for g, m in self.groups]
            doc["rules"] = [{"name": r.name, "between": [list(r.between[0]), list(r.between[1])],
                             "action": r.action, "settings": [[k, list(v) if isinstance(v, tuple) else v]
                                                              for k, v in r.settings]}
                            for r in self.rules]
        if self.revoked:
            doc["revoked"] = [[format(serial, "x"), not_after] for serial, not_after in self.revoked]
        return json.dumps(doc, sort_keys=True)

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
        groups = tuple((g, tuple(m)) for g, m in data.get("groups", []))
        rules = tuple(
            Rule(name=r["name"], between=(tuple(r["between"][0]), tuple(r["between"][1])), action=r["action"],
                 settings=tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in r["settings"]))
            for r in data.get("rules", []))
        revoked = tuple((int(serial, 16), int(na)) for serial, na in data.get("revoked", []))
        return cls(nodes=nodes, defaults=defaults, groups=groups, rules=rules, revoked=revoked)


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
    action: str = "protect"
    rule: str = "defaults"
    child_lifetime_bytes: int = 0  # octets per CHILD_SA direction, 0: no limit
    child_lifetime_packets: int = 0


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
    # serials of revoked, unexpired node certificates (sorted)
    revoked: tuple[int, ...] = ()

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


def _member(ref: str, node: NodeSpec, groups: dict[str, tuple[str, ...]]) -> bool:
    if ref == "any":
        return True
    if ref.startswith("role:"):
        return node.role == ref[5:]
    if ref.startswith("group:"):
        return node.name in groups.get(ref[6:], ())
    return node.name == ref


def matching_rule(inventory: Inventory, a: NodeSpec, b: NodeSpec) -> Rule | None:
    """The first rule whose ``between`` matches the pair either way round."""
    groups = dict(inventory.groups)
    for rule in inventory.rules:
        left, right = rule.between
        in_l = lambda n: any(_member(r, n, groups) for r in left)  # noqa: E731
        in_r = lambda n: any(_member(r, n, groups) for r in right)  # noqa: E731
        if (in_l(a) and in_r(b)) or (in_l(b) and in_r(a)):
            return rule
    return None


def pair_policy(inventory: Inventory | Defaults, a: NodeSpec, b: NodeSpec) -> PolicyView:
    """The policy between two nodes; symmetric in a and b. (A bare
    :class:`Defaults` is accepted for callers without rules.)"""
    if isinstance(inventory, Defaults):
        inventory = Inventory(nodes=(), defaults=inventory)
    rule = matching_rule(inventory, a, b)
    defaults = inventory.defaults
    if rule is not None and rule.settings:
        defaults = replace(defaults, **dict(rule.settings))
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
        child_lifetime_bytes=defaults.child_lifetime_bytes,
        child_lifetime_packets=defaults.child_lifetime_packets,
        action=rule.action if rule else "protect",
        rule=rule.name if rule else "defaults",
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
            policy=(pol := pair_policy(inventory, me, n)),
            initiate=pol.action == "protect" and should_initiate(me, n),
        )
        for n in sorted(inventory.nodes, key=lambda n: n.name)
        if n.name != me.name
    )
    return View(name=me.name, identity=me.name, subnets=effective_subnets(me),
                endpoints=me.endpoints, peers=peers, revoked=tuple(sorted(inventory.revoked_serials)))


@dataclass(frozen=True)
class ViewDiff:
    upserted: tuple[PeerView, ...]
    removed: tuple[str, ...]
    self_changed: bool
    revoked_added: tuple[int, ...] = ()
    revoked_removed: tuple[int, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.upserted or self.removed or self.self_changed or self.revoked_added
                    or self.revoked_removed)


def diff_views(old: View, new: View) -> ViewDiff:
    """Peers added or changed (``upserted``), peers gone (``removed``, names),
    whether the node's own subnets/endpoints changed, and the revoked
    serials added and dropped."""
    old_peers = {p.name: p for p in old.peers}
    new_names = {p.name for p in new.peers}
    upserted = tuple(p for p in new.peers if old_peers.get(p.name) != p)
    removed = tuple(sorted(n for n in old_peers if n not in new_names))
    self_changed = (old.subnets, old.endpoints, old.identity) != (new.subnets, new.endpoints, new.identity)
    was, now = set(old.revoked), set(new.revoked)
    return ViewDiff(upserted=upserted, removed=removed, self_changed=self_changed,
                    revoked_added=tuple(sorted(now - was)), revoked_removed=tuple(sorted(was - now)))
