"""IkeManager's bookkeeping after every IKE_SA step (sans-I/O): drops counted, datagrams (SKF
fragments) and events collected, rekeyed IKE_SAs adopted, the per-peer tables, half-open tables
and deadlines kept current. docs/design.md "agent.ike.manager.IkeManager".

Pure module: no I/O.
"""
from __future__ import annotations

from agent.ike.events import ChildSaEstablished, ChildSaRefused, IkeSaDeleted, IkeSaEstablished
from agent.ike.errors import DeleteReason
from agent.ike.sa import Datagram, IkeSa, State


class Bookkeeping:
    """What IkeManager does with the output of an IKE_SA. ``m``: the IkeManager whose tables it
    works on (they stay there, one home for state)."""

    def __init__(self, m) -> None:
        self.m = m

    def collect(self, sa: IkeSa, now: float) -> None:
        if sa.peer_name and not sa.is_dead and self.m._sas.get(sa.my_spi) is sa:
            self.m._by_peer.setdefault(sa.peer_name, set()).add(sa.my_spi)
        drops, sa.drops = sa.drops, []  # e.g. invalid_ke_data (RFC 9370 exchanges)
        for reason in drops:
            self.m._count(reason)
        for d in sa.outbox:  # RFC 7383: a fragmented message leaves as its SKF fragments
            frags = getattr(d.data, "fragments", None)
            self.m._out.extend([Datagram(f, d.local, d.remote) for f in frags] if frags else [d])
        sa.outbox.clear()
        spawned, sa.spawned = sa.spawned, []
        for new in spawned:  # IKE_SA rekey: the new IKE_SA's events come before the old one's delete
            new._from_rekey = True  # the continuation of an IKE_SA, never a duplicate of it
            self.m._sas[new.my_spi] = new
            self.m._collect(new, now)
        events, sa.events = sa.events, []
        after: list = []  # (fn(peer, now), peer) run once all of this IKE_SA's events are out:
        # the old IKE_SAs' ChildSaDeleted must follow the new ChildSaEstablished (make before break)
        for ev in events:
            if isinstance(ev, IkeSaDeleted) and self.m._admission.half_open_gone(sa, ev, now):
                continue  # never authenticated, not ours: counted and summarised (HalfOpenDropped)
            self.m._events.append(ev)
            if isinstance(ev, IkeSaEstablished):
                self.m._contacted.add(ev.peer)
                self.m._retry.pop(ev.peer, None)
                self.m._hold.pop(ev.peer, None)
                if ev.peer:
                    self.m._by_peer.setdefault(ev.peer, set()).add(sa.my_spi)
                if sa.peer_initial_contact:
                    # RFC 7296 §2.4: the peer restarted; our older IKE_SAs with it are stale
                    # only SAs established before: a simultaneous initiation in flight stays
                    # (after this IKE_SA's events: its CHILD_SA is installed before theirs go)
                    after.append((lambda p, n, s=sa: self.m._joining.initial_contact(s, p, n), ev.peer))
                if ev.peer and not getattr(sa, "_from_rekey", False) and sa.peer_initial_contact:
                    after.append((self.m._joining.replaced, ev.peer))  # the peer's replacement is up
                if ev.peer:
                    after.append((lambda p, n, s=sa: self.m._joining.drop_moot_inits(s, p, n), ev.peer))
                    after.append((lambda p, n, s=sa: self.m._resolve_duplicates(s, p, n), ev.peer))
            elif isinstance(ev, ChildSaEstablished):
                # the re-initiation backoff ends when traffic can flow, not at IKE_AUTH: an IKE_SA
                # whose CHILD_SA keeps failing must not restart at the shortest delay
                self.m._backoff.pop(ev.peer, None)
                self.m.last_errors.pop(ev.peer, None)
                if getattr(sa, "_replacement", False) and ev.peer:
                    sa._replacement_up = True
                    after.append((self.m._joining.replaced, ev.peer))  # our replacement carries traffic now
            elif isinstance(ev, ChildSaRefused):
                self.m._count("child_sa_refused_by_peer" if ev.by == "peer" else "child_sa_refused")
                if ev.peer:
                    retry = f" (retry in {ev.retry_in_s:.0f} s)" if ev.retry_in_s is not None else ""
                    self.m.last_errors[ev.peer] = (f"CHILD_SA refused by the peer: {ev.reason}{retry}" if ev.by == "peer"
                                                 else f"we refused its CHILD_SA: {ev.reason}; {ev.offered}")
                if (ev.peer and ev.by == "peer" and getattr(sa, "_replacement", False)
                        and not getattr(sa, "_replacement_up", False)):
                    # make before break: the new policy's CHILD_SA is refused, so the old IKE_SA must not
                    # stay for good; the replacement IKE_SA keeps retrying its CHILD_SA (backoff)
                    after.append((lambda p, n, r=ev.reason: self.m._joining.replaced(p, n, failed=r), ev.peer))
            elif isinstance(ev, IkeSaDeleted):
                if ev.kind == DeleteReason.AUTH_FAILED:
                    self.m._count("auth_failed")
                name = ev.peer or (sa.cfg.peer.name if sa.cfg.peer else "")
                if (name and ev.rekeyed_to is None and ev.kind != DeleteReason.LOCAL
                        and not any(s is not sa for s in self.m._sas_of(name))):
                    self.m.last_errors[name] = f"IKE_SA {'deleted' if sa.established_at else 'failed'}: {ev.reason}"
                if getattr(sa, "_replacement", False) and not getattr(sa, "_replacement_up", False) and name:
                    after.append((lambda p, n, r=ev.reason: self.m._joining.replaced(p, n, failed=r), name))
                if ev.kind == DeleteReason.TIMEOUT and ev.peer:
                    # the peer may have restarted: the IKE_SA we build next carries INITIAL_CONTACT
                    self.m._contacted.discard(ev.peer)
                if ev.rekeyed_to is None and ev.peer:
                    self.m._vip.release_vip(ev.peer, sa)
                self.m._timers.schedule_retry(sa, ev, now)
        for fn, peer in after:
            fn(peer, now)
        if sa.is_dead:
            if self.m._sas.get(sa.my_spi) is sa:
                del self.m._sas[sa.my_spi]
            self.m._admission.forget_half_open(sa)
            peers = self.m._by_peer.get(sa.peer_name)
            if peers is not None:
                peers.discard(sa.my_spi)
                if not peers:
                    del self.m._by_peer[sa.peer_name]
        elif sa.state == State.ESTABLISHED:
            self.m._admission.remember_init(sa)
            self.m._admission.forget_half_open(sa)
        elif sa.my_spi in self.m._ho_cost:
            self.m._admission.charge(sa, now)  # its request, response and fragment buffers count against the budget
        self.m._timers.schedule(sa)


__all__ = ["Bookkeeping"]
