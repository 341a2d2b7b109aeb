"""The controller's messages -> the agent's model: ``meshsec.v1.ViewUpdate`` (and its
``Peer`` / ``PeerPolicy``) -> :class:`agent.model.NodeView`. Pure: no I/O; a malformed
message raises ValueError naming the field."""
from __future__ import annotations

import ipaddress

from agent.model import NodeView, Peer, PeerPolicy
from meshsec.v1 import controller_pb2 as pb

_MODE = {pb.MODE_TUNNEL: "tunnel", pb.MODE_TRANSPORT: "transport"}
_PROTOCOL = {pb.PROTOCOL_ESP: "esp", pb.PROTOCOL_AH: "ah", pb.PROTOCOL_AH_ESP: "ah+esp"}
_ACTION = {pb.ACTION_PROTECT: "protect", pb.ACTION_BYPASS: "bypass", pb.ACTION_DISCARD: "discard"}
_ENCAP = {pb.ENCAPSULATION_UDP: "udp", pb.ENCAPSULATION_NONE: "none"}


def _enum(table: dict[int, str], value: int, default: str, what: str) -> str:
    if value == 0:
        return default
    try:
        return table[value]
    except KeyError:
        raise ValueError(f"unknown {what} {value}") from None


def policy_from_proto(p: pb.PeerPolicy) -> PeerPolicy:
    """Unset enums and empty proposal lists take the model defaults;
    unknown enum values raise ValueError."""
    d = PeerPolicy()
    return PeerPolicy(
        mode=_enum(_MODE, p.mode, d.mode, "mode"),  # type: ignore[arg-type]
        protocol=_enum(_PROTOCOL, p.protocol, d.protocol, "protocol"),  # type: ignore[arg-type]
        encapsulation=_enum(_ENCAP, p.encapsulation, d.encapsulation, "encapsulation"),  # type: ignore[arg-type]
        ike_proposals=tuple(p.ike_proposals) or d.ike_proposals,
        esp_proposals=tuple(p.esp_proposals) or d.esp_proposals,
        ike_lifetime_s=p.ike_lifetime_s,
        child_lifetime_s=p.child_lifetime_s,
        dpd_interval_s=p.dpd_interval_s,
        # 0 is also what an unset field reads as: it means the default, never "off"; only the
        # explicit allow_no_replay (the inventory's opt-in, logged by the client) turns it off
        replay_window=p.replay_window or (0 if p.allow_no_replay else d.replay_window),
        allow_no_replay=p.replay_window == 0 and p.allow_no_replay,
        action=_enum(_ACTION, p.action, d.action, "action"),  # type: ignore[arg-type]
        rule=p.rule,
        child_lifetime_bytes=p.child_lifetime_bytes,
        child_lifetime_packets=p.child_lifetime_packets,
    )


def peer_from_proto(p: pb.Peer) -> Peer:
    """ValueError on an empty name or a bad address / network."""
    if not p.name:
        raise ValueError("peer without a name")
    for e in p.endpoints:
        ipaddress.ip_address(e)
    return Peer(
        name=p.name,
        identity=p.identity or p.name,
        endpoints=tuple(p.endpoints),
        subnets=tuple(ipaddress.ip_network(s) for s in p.subnets),
        policy=policy_from_proto(p.policy),
        ike_port=p.ike_port or 500,
        initiate=p.initiate,
    )


def no_replay_peers(view: NodeView) -> list[str]:
    """Names of the peers whose policy turns anti-replay off (explicit allow_no_replay)."""
    return [p.name for p in view.peers if p.policy.replay_window == 0 and p.policy.allow_no_replay]


def view_from_proto(update: pb.ViewUpdate, previous: NodeView | None = None) -> NodeView:
    """Apply one ``ViewUpdate`` and return the resulting full NodeView.

    A ``full`` update replaces everything; an incremental one upserts and
    removes peers of ``previous`` (required: ValueError if None) and adds /
    drops revoked certificate serials (``NodeView.revoked_serials``). The node's
    own fields are always taken from the update; ``local_address`` is its
    first endpoint. Peers are kept sorted by name. Raises ValueError for a
    malformed update.
    """
    if not update.node_name:
        raise ValueError("view update without node_name")
    if update.full:
        peers: dict[str, Peer] = {}
    else:
        if previous is None:
            raise ValueError("incremental view update without a previous view")
        if previous.name != update.node_name:
            raise ValueError(f"view update for {update.node_name!r} applied to {previous.name!r}")
        peers = {p.name: p for p in previous.peers}
        for name in update.removed_peers:
            peers.pop(name, None)
    for p in update.upserted_peers:
        peer = peer_from_proto(p)
        peers[peer.name] = peer
    for e in update.endpoints:
        ipaddress.ip_address(e)
    revoked = set() if update.full else set(previous.revoked_serials)
    revoked -= {_serial(b) for b in update.unrevoked_serials}
    revoked |= {_serial(b) for b in update.revoked_serials}
    return NodeView(
        name=update.node_name,
        identity=update.identity or update.node_name,
        subnets=tuple(ipaddress.ip_network(s) for s in update.subnets),
        peers=tuple(peers[n] for n in sorted(peers)),
        local_address=update.endpoints[0] if update.endpoints else None,
        version=update.version,
        revoked_serials=frozenset(revoked),
    )


def _serial(data: bytes) -> int:
    # RFC 5280 §4.1.2.2: serial numbers are at most 20 octets
    if not 1 <= len(data) <= 20:
        raise ValueError(f"revoked serial of {len(data)} bytes (expected 1..20)")
    return int.from_bytes(data, "big")
