"""The Peer Authorization Database (RFC 4301 §4.4.3) as the IKE_SA consults it.

One home for the checks that bind an authenticated identity to what it may do:

- identity lookup: the peer entry for an IDi (:class:`PeerIndex` over the node view, which
  the manager hands each IKE_SA as ``find_peer``);
- identity match: the ID payload names the expected peer (§3.5, RFC 4945 §3.1);
- revocation: a certificate serial the controller revoked may not authenticate;
- endpoint binding (PeerPolicy.bind_endpoints): unless NAT-D found the peer behind a NAT,
  its IKE source address must be one of its configured endpoints;
- allowed selectors (§2.9): the peer may claim only its own subnets (or the virtual IP we
  assigned it); our side only our subnets (or the virtual IP we were given);
- the CHILD_SA policy must be usable before IKE_AUTH completes (``policy_problem``).

Every check raises :class:`agent.ike.errors.AuthError` (AUTHENTICATION_FAILED) or returns a
value; none does I/O.
"""
from __future__ import annotations

import ipaddress
from agent.iana import IdType, name_of
from agent.ike.errors import AuthError
from agent.ike.identity import id_text, identity_has_forms, same_identity
from agent.model import Peer


class PeerIndex:
    """The PAD entries of a node view by IKE identity (RFC 4301 §4.4.3): PROTECT peers only (a
    peer whose policy is BYPASS or DISCARD has no PAD entry and may not negotiate SAs with us).
    An identity written another way (an address, a DN in another RDN order) still finds its peer."""

    def __init__(self, peers) -> None:
        self.identities: dict[str, Peer] = {}  # the first peer with an identity, as a scan finds it
        self.loose: list[Peer] = []  # peers whose identity is an address or a DN
        for p in peers:
            if p.policy.action != "protect":
                continue
            self.identities.setdefault(p.identity, p)
            if identity_has_forms(p.identity):
                self.loose.append(p)

    def find(self, identity: str) -> Peer | None:
        """The configured peer with this IKE identity (id_text form), or None."""
        p = self.identities.get(identity)
        if p is not None:
            return p
        for p in self.loose:
            if same_identity(p.identity, identity):
                return p
        return None


class Pad:
    """PAD view of one IKE_SA's configuration ``cfg`` (agent.ike.sa.IkeSaConfig), read at each
    check: ``cfg.find_peer(identity) -> Peer | None``; ``cfg.revoked() -> frozenset`` of
    certificate serials; ``cfg.policy_problem(peer) -> str | None`` (why the peer's CHILD_SA
    policy is unusable)."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def lookup(self, id_type: int, id_data: bytes) -> Peer:
        """The peer entry for the identity of an IDi (responder, §2.15); AuthError if none."""
        ident = id_text(id_type, id_data)  # FQDN, RFC822, IPv4/6 address or DN (§3.5)
        peer = self.cfg.find_peer(ident) if ident is not None else None
        if peer is None:
            raise AuthError(f"no configured peer has identity {ident!r} ({name_of(IdType, id_type)})")
        return peer

    @staticmethod
    def check_identity(peer: Peer, id_type: int, id_data: bytes) -> None:
        """The ID payload names ``peer`` (§3.5); AuthError otherwise."""
        ident = id_text(id_type, id_data)
        if ident is None:
            raise AuthError(f"peer identity of type {name_of(IdType, id_type)} is not supported or malformed "
                            "(we take ID_FQDN, ID_RFC822_ADDR, ID_IPV4_ADDR, ID_IPV6_ADDR, ID_DER_ASN1_DN)")
        if not same_identity(peer.identity, ident):
            raise AuthError(f"peer identity {ident!r} ({name_of(IdType, id_type)}) is not the expected "
                            f"{peer.identity!r}")

    @staticmethod
    def check_wanted(own_identity: str, id_type: int, id_data: bytes) -> None:
        """The initiator's optional IDr names us (§3.5); AuthError otherwise."""
        wanted = id_text(id_type, id_data)
        if wanted is None or not same_identity(own_identity, wanted):
            raise AuthError(f"peer wants to talk to {wanted or id_data!r} ({name_of(IdType, id_type)}), "
                            f"we are {own_identity!r}")

    def check_revoked(self, peer: Peer, serial: int) -> None:
        """A certificate the controller revoked may not authenticate; AuthError if ``serial`` is."""
        if serial in self.cfg.revoked():
            raise AuthError(f"certificate of {peer.name!r} (serial {serial}) is revoked")

    @staticmethod
    def check_binding(peer: Peer, remote, nat_remote: bool) -> None:
        """PeerPolicy.bind_endpoints: unless NAT-D found the peer behind a NAT, its IKE source
        address must be one of its configured endpoints; AuthError otherwise. NAT-D (§2.23) says
        nothing when the policy fakes it (encapsulation udp, strongSwan encap=yes): then strict."""
        nat = nat_remote and peer.policy.encapsulation != "udp"
        if getattr(peer.policy, "bind_endpoints", False) and not nat and remote[0] not in peer.endpoints:
            raise AuthError(f"peer {peer.name!r} authenticated from {remote[0]}, not one of its endpoints "
                            f"{', '.join(peer.endpoints) or '(none)'} (bind_endpoints is on)")

    def policy_problem(self, peer: Peer) -> str | None:
        """Why the CHILD_SA policy of ``peer`` is unusable, or None (checked before IKE_AUTH completes)."""
        return self.cfg.policy_problem(peer)

    @staticmethod
    def remote_selectors(peer: Peer, peer_virtual_ips: tuple) -> tuple:
        """Networks the peer may claim as its side (§2.9): its subnets, or the virtual IP we gave it."""
        return tuple(ipaddress.ip_network(a) for a in peer_virtual_ips) or tuple(peer.subnets)

    @staticmethod
    def local_selectors(local_subnets: tuple, virtual_ips: tuple) -> tuple:
        """Networks of our side: our subnets, or the virtual IP the gateway gave us."""
        return tuple(ipaddress.ip_network(a) for a in virtual_ips) or tuple(local_subnets)


__all__ = ["Pad", "PeerIndex"]
