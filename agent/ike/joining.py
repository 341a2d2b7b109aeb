"""Joining, crossed initiations, duplicates and make before break (issue 9; sans-I/O): how an
IkeManager starts IKE_SAs to its peers so that one IKE_SA per peer results, and replaces IKE_SAs
whose policy changed without a gap. docs/ike-hardening.md "Joining, duplicates, policy changes".

Pure module: no I/O.
"""
from __future__ import annotations

from agent.iana import ExchangeType
from agent.ike.errors import DeleteReason
from agent.ike.sa import IkeSa, State
from agent.model import NodeView, Peer

REPLACE_WAIT_S = 10.0  # make before break: the side that does not initiate waits this long for the new IKE_SA


class Joining:
    """Initiation races and replacements of an IkeManager. ``m``: the IkeManager whose tables it
    works on (they stay there, one home for state)."""

    def __init__(self, m) -> None:
        self.m = m

    @staticmethod
    def brought(old: NodeView, new: NodeView) -> list[str]:
        """Peers the new view adds, or whose endpoints / IKE port it changes."""
        before = {p.name: (p.endpoints, p.ike_port) for p in old.peers}
        return [p.name for p in new.peers if before.get(p.name) != (p.endpoints, p.ike_port)]

    def may_start(self, peer: Peer) -> bool:
        """We may open an IKE_SA to ``peer`` whatever the tie-break says: it is PROTECT, has an
        endpoint, and we are not its CP gateway (a host asks its gateway for its address in
        IKE_AUTH, §3.15: only the host can initiate)."""
        return (peer.policy.action == "protect" and bool(peer.endpoints) and not peer.policy.virtual_ip_pool
                and self.m._policy_problem(peer) is None)

    def restart_pending(self, names, now: float) -> None:
        """A view brought these peers (or their endpoints): our unanswered IKE_SA_INIT to them (it
        may retransmit into the void towards an old address, or at long intervals) is dropped,
        and their re-initiation backoff forgotten, so that the negotiation starts over at once."""
        for name in names:
            self.m._hold.pop(name, None)
            self.m._backoff.pop(name, None)
            self.m._retry.pop(name, None)
            for sa in self.m._sas_of(name):
                # unanswered only: an IKE_SA_INIT that got its response reached the peer, which may
                # complete it (dropping ours then could leave the two sides disagreeing)
                if self.unanswered_init(sa):
                    self.m._count("initiation_restarted")
                    sa._die("restarted: the view brought the peer or its endpoint", DeleteReason.DUPLICATE)
                    self.m._collect(sa, now)

    def join(self, now: float, names=None) -> list[str]:
        """We join (agent start, or a view that brings peers): open an IKE_SA to each of these
        peers (all by default) that we may start to (``_may_start``), also where the tie-break
        leaves initiation to the peer, so that a node is reachable as soon as it runs instead of
        when the peer's next retransmission comes. Race-free: nothing is started towards a peer
        with an IKE_SA (or one of its IKE_SA_INITs half-open here); when both IKE_SA_INITs cross,
        the side whose name sorts higher abandons its own unanswered one, an unanswered one is
        dropped once an IKE_SA with the peer is up, and two IKE_SAs that completed anyway are
        resolved (``_resolve_duplicates``). Returns the peers initiated to."""
        out = []
        for p in self.m.view.peers:
            if names is not None and p.name not in names:
                continue
            if self.m._shutdown or p.responder_only or not self.may_start(p) or self.m._sas_of(p.name):
                continue
            try:
                self.m.initiate(p.name, now)
            except ValueError:
                continue
            if self.m._sas_of(p.name):
                self.m._count("join_initiated")
                out.append(p.name)
        return out

    @staticmethod
    def unanswered_init(sa: IkeSa) -> bool:
        """Our IKE_SA_INIT that got no response yet: the peer holds at most a half-open IKE_SA
        for it (which expires), so dropping it can never leave the two sides disagreeing."""
        return (sa.initiator and sa.state == State.INIT and sa.spi_r == 0 and sa._pending is not None
                and sa._pending.exchange == ExchangeType.IKE_SA_INIT)

    def supersede_own_init(self, remote_ip: str, now: float) -> None:
        """The peer at ``remote_ip`` sent us its IKE_SA_INIT while ours to it is unanswered (both
        sides started at once): the side whose name sorts higher (the one the tie-break leaves
        to respond) drops its own, so that one IKE_SA results, in the roles the tie-break says.
        Both sides apply the rule, exactly one of them drops."""
        for p in self.m._index().endpoints.get(remote_ip, ()):  # indexed: this runs before authentication
            if not self.m.view.name > p.name:
                continue
            for sa in self.m._sas_of(p.name):
                if self.unanswered_init(sa):
                    self.m._count("own_init_superseded")
                    sa._die("superseded by the peer's IKE_SA_INIT", DeleteReason.DROPPED)
                    self.m._collect(sa, now)

    def drop_moot_inits(self, sa: IkeSa, peer: str, now: float) -> None:
        """An IKE_SA with ``peer`` is up: our IKE_SA_INITs to it still unanswered (e.g. sent
        before the peer ran, retransmitted at long intervals) are moot; dropped before one of
        their retransmissions makes a second IKE_SA."""
        for other in self.m._sas_of(peer):
            if other is not sa and self.unanswered_init(other):
                self.m._count("own_init_moot")
                other._die("moot: an IKE_SA with the peer is up", DeleteReason.DUPLICATE)
                self.m._collect(other, now)
        # likewise the peer's crossed IKE_SA_INIT it dropped itself (_supersede_own_init): its
        # half-open IKE_SA here would wait for an IKE_AUTH that never comes; only when no other
        # configured peer shares the address (hosts behind one NAT)
        p = self.m.view.peer(peer)
        ips = set(p.endpoints) if p is not None else set()
        if any(q.name != peer and ips & set(q.endpoints) for q in self.m.view.peers):
            return
        for key, half in list(self.m._half_open.items()):
            if key[0] in ips and half is not sa and half.state in (State.INIT, State.AUTH) and not half.initiator:
                self.m._count("half_open_moot")
                half._die("moot: an IKE_SA with the peer is up", DeleteReason.DUPLICATE)
                self.m._collect(half, now)

    def make_before_break(self, sa: IkeSa, view: NodeView, why: str, now: float) -> bool:
        """A PROTECT peer's policy changed (mode, protocol, proposals...): keep ``sa`` carrying
        traffic until an IKE_SA under the new policy is up, then delete it, instead of deleting
        first (traffic lost for the re-initiation backoff). The tie-break initiator opens the
        replacement with INITIAL_CONTACT (§2.4), so the peer drops its old IKE_SA the moment the
        new one is established, and deletes ours when it is; the other side keeps its old one
        until then, at most REPLACE_WAIT_S (then deleted as before). A replacement that fails
        deletes the old one too. False: not applicable (not ESTABLISHED, no longer PROTECT,
        being rekeyed), the caller deletes at once."""
        peer = view.peer(sa.peer_name)
        if (peer is None or peer.policy.action != "protect" or sa.state != State.ESTABLISHED
                or sa._successor is not None or self.m._shutdown):
            return False
        sa._replace_reason = why
        name = peer.name
        t = now + REPLACE_WAIT_S  # a backstop on both sides
        self.m._replace_by[name] = t
        self.m._timers.push(t, ("replace", name))
        if peer.initiate and self.may_start(peer):
            if not any(getattr(s, "_replacement", False) for s in self.m._sas_of(name)):
                self.m.initiate(name, now, replace=True)
            self.m._count("make_before_break")
            return True
        self.m._count("make_before_break_wait")
        return True

    def replaced(self, peer: str, now: float, failed: str | None = None) -> None:
        """Delete the IKE_SAs of ``peer`` waiting for a replacement (one is up, or it failed)."""
        self.m._replace_by.pop(peer, None)
        for old in self.m._sas_of(peer):
            why = getattr(old, "_replace_reason", None)
            if why is None or getattr(old, "_replacement", False) and failed is None:
                continue
            old._replace_reason = None
            old.delete(now, why + (" (replaced, make before break)" if failed is None
                                   else f"; its replacement failed: {failed}"), DeleteReason.RECONFIGURED)
            self.m._collect(old, now)

    def initial_contact(self, sa: IkeSa, peer: str, now: float) -> None:
        for old in self.m._sas_of(peer):
            if old is not sa and old.state == State.ESTABLISHED:
                old._die("peer sent INITIAL_CONTACT", DeleteReason.SUPERSEDED)
                self.m._collect(old, now)

    @staticmethod
    def lowest_nonce(sa: IkeSa) -> bytes:
        return min(sa._ni, sa._nr)

    def resolve_duplicates(self, sa: IkeSa, peer: str, now: float) -> None:
        """Both sides initiated at once (or a late start crossed a retransmission): a second
        IKE_SA with ``peer`` is ESTABLISHED beside ``sa``. RFC 7296 has no rule; both sides keep
        the one and delete the other the same way, as for rekey collisions (§2.25.2): the
        IKE_SA holding the lowest of the nonces is deleted (INFORMATIONAL Delete, §1.4.1). Each
        side decides alone from what both know (Ni, Nr), so both delete the same IKE_SA, also a
        peer that never deletes duplicates itself (strongSwan). IKE_SAs born of a rekey, or
        being replaced by one, are a lineage, not duplicates."""
        if getattr(sa, "_from_rekey", False) or sa.state != State.ESTABLISHED:
            return
        for other in self.m._sas_of(peer):
            if (other is sa or other.state != State.ESTABLISHED or other._successor is not None
                    or sa._successor is not None or getattr(other, "_replace_reason", None)
                    or getattr(sa, "_replace_reason", None)):
                continue
            loser = sa if self.lowest_nonce(sa) < self.lowest_nonce(other) else other
            self.m._count("duplicate_ike_sa_deleted")
            loser.delete(now, "duplicate IKE_SA (both sides initiated): the other one is kept",
                         DeleteReason.DUPLICATE)
            self.m._collect(loser, now)
            if loser is sa:
                return


__all__ = ["Joining", "REPLACE_WAIT_S"]
