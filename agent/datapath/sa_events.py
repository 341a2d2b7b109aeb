"""What the runtime does with each IKE event (agent.ike.events): CHILD_SAs are
installed in and removed from the SAD here, and only here (the IKE side never
writes the SAD, docs/design.md). ``HANDLERS`` maps each event class to its handler
``handler(rt, ev, now)``; ``rt`` is the Runtime, ``now`` its monotonic seconds.
"""
from __future__ import annotations

import time

from agent.datapath.policy import selector_entries
from agent.esp import AhSa
from agent.esp.sad import ChildEntry
from agent.ike.events import (ChildSaDeleted, ChildSaEstablished, ChildSaRefused, HalfOpenDropped, IkeKeysDerived,
                              IkeSaDeleted, IkeSaEstablished, InitsRefused, PeerAddressChanged, PeerRefused)

# soft byte/packet lifetime (RFC 4301 §4.4.2.1) as a fraction of the hard one: the sending SA
# gets there first and starts the rekey; the receiving SA only if the sender did not (e.g. a
# peer without volume limits), which keeps both ends from rekeying at once
SOFT_FRACTION_OUT = 0.90
SOFT_FRACTION_IN = 0.95

# events after which the NAT-keepalive set is recomputed (NAT-D results come and go with IKE_SAs)
NAT_EVENTS = (IkeSaEstablished, IkeSaDeleted, PeerAddressChanged)


def volume_kw(log, peer) -> tuple[dict, dict]:
    """SA constructor kwargs (inbound, outbound) for the policy's byte/packet lifetimes
    (RFC 4301 §4.4.2.1); empty without limits, so plain factories keep working. A value
    that is not a whole number >= 0 (a hand-edited stored view) is logged and ignored."""
    pol = peer.policy if peer is not None else None
    vals = []
    for key in ("child_lifetime_bytes", "child_lifetime_packets"):
        v = getattr(pol, key, 0) or 0
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            log.error("peer %s: policy %s %r is not a whole number >= 0; its CHILD_SAs get no such "
                      "limit (fix the policy)", peer.name, key, v)
            v = 0
        vals.append(v)
    lb, lp = vals
    if not (lb or lp):
        return {}, {}
    kw = {"lifetime_bytes": lb, "lifetime_packets": lp}
    return dict(kw, soft_fraction=SOFT_FRACTION_IN), dict(kw, soft_fraction=SOFT_FRACTION_OUT)


def sas_changed(rt) -> None:
    """After the SAD changed: the SPD (CHILD_SA entries, bundles, MTU) and the routes follow."""
    rt.policy.rebuild(rt.view)
    rt.policy.sync_routes(rt.view)


def remove_child(rt, ch: ChildEntry) -> None:
    """Remove one CHILD_SA from the SAD (the peer's next newest SA sends)."""
    rt.sad.remove(ch)
    sas_changed(rt)


def ike_established(rt, ev: IkeSaEstablished, now: float) -> None:
    rt.log.info("IKE_SA %016x_i %016x_r with %s established (%s, %s)", ev.spi_i, ev.spi_r,
                ev.peer, "initiator" if ev.initiator else "responder", ev.algorithms)


def ike_keys(rt, ev: IkeKeysDerived, now: float) -> None:
    if rt.keylog is not None:
        rt.keylog.ike_keys(ev)


def child_established(rt, ev: ChildSaEstablished, now: float) -> None:
    """Build both SA directions (ESP or AH, RFC 7296 §3.3.1 Protocol ID), install the
    CHILD_SA, make it the peer's sending SA (a rekeyed one keeps receiving until deleted)."""
    peer = rt.view.peer(ev.peer)
    window = peer.policy.replay_window if peer is not None else 1024
    mode = ev.mode
    is_ah = ev.protocol == "ah"
    kw_in, kw_out = volume_kw(rt.log, peer)
    if is_ah:
        # outbound tunnel mode is transport AH over our own IP-in-IP header (see inside.Inside._ah)
        in_sa = AhSa(ev.inbound, replay_window=window, mode=mode,
                     tunnel_src=ev.remote[0] if mode == "tunnel" else None,
                     tunnel_dst=rt.local_address if mode == "tunnel" else None, **kw_in)
        out_sa = AhSa(ev.outbound, replay_window=window, mode="transport", **kw_out)
    else:
        in_sa = rt.esp_factory(ev.inbound, rng=rt.rng, replay_window=window, mode=mode, **kw_in)
        out_sa = rt.esp_factory(ev.outbound, rng=rt.rng, replay_window=window, mode=mode, **kw_out)
    ch = ChildEntry(peer=ev.peer, ike_spi_i=ev.ike_spi_i, ike_spi_r=ev.ike_spi_r,
                    inbound_spi=ev.inbound.spi, outbound_spi=ev.outbound.spi, in_sa=in_sa, out_sa=out_sa,
                    local_ts=tuple(ev.local_ts), remote_ts=tuple(ev.remote_ts), remote=tuple(ev.remote),
                    mode=mode, udp_encap=ev.udp_encap and not is_ah, algorithms=ev.algorithms,
                    established=now, established_wall=time.time(), protocol="ah" if is_ah else "esp",
                    needs_ah=not is_ah and peer is not None and getattr(peer.policy, "protocol", "") == "ah+esp",
                    narrow=selector_entries(ev.peer, mode, ev.local_selectors or (), ev.remote_selectors or ()),
                    rekey_of=ev.rekey_of)
    old = rt.sad.lookup(ch.inbound_spi)
    if old is not None:
        # IkeManager allocates inbound SPIs unique on this node (RFC 4301 §4.1): a clash is our
        # bug; keep the live CHILD_SA, do not install the new one
        rt.counters["internal_errors"] += 1
        rt.log.error("internal error: inbound SPI %08x of a new CHILD_SA with %s is already used by a "
                     "CHILD_SA with %s; the new CHILD_SA is not installed", ch.inbound_spi, ev.peer, old.peer)
        return
    if is_ah:
        rt._ensure_raw_ah()
    elif not ev.udp_encap and rt.raw_esp is None:
        rt.log.warning("CHILD_SA with %s negotiated without UDP encapsulation but no raw ESP "
                       "socket is open: its packets are dropped (counter no_raw_socket)", ev.peer)
    vip = ev.virtual_ip
    if vip:  # case 4: the gateway gave us an inner address (CP CFG_REPLY): it is ours now
        rt.policy.local_ips.add(str(vip))
        if rt.routes is not None:
            try:
                rt.routes.add_address(f"{vip}/{32 if ':' not in str(vip) else 128}")
            except Exception as exc:
                rt.log.error("cannot assign virtual IP %s: %s", vip, exc)
    if ev.rekey_of is not None and not ev.exchange_initiator:
        ch.send_after = ev.rekey_of  # the peer may not have our new inbound SA yet (sent on at its Delete)
    rt.sad.add(ch)  # it sends for its selectors; a rekeyed one keeps receiving until deleted
    sas_changed(rt)
    rt.hold.ready.add(ev.peer)  # packets held for this peer go out after this batch of events
    if rt.keylog is not None:
        rt.keylog.child_sa(ev)  # ESP to esp_sa, AH to ah_sa
    rt.log.info("CHILD_SA with %s established: spi in %08x out %08x, %s, %s -> %s%s", ev.peer,
                ch.inbound_spi, ch.outbound_spi, ev.algorithms,
                ",".join(map(str, ch.local_ts)), ",".join(map(str, ch.remote_ts)),
                f" (rekey of {ev.rekey_of:08x})" if ev.rekey_of is not None else "")
    if ev.rekey_of is None and peer is not None and not is_ah:
        log_narrowed(rt, ch, peer)


def log_narrowed(rt, ch: ChildEntry, peer) -> None:
    """Log the policy's subnet pairs a new CHILD_SA leaves out (the peer narrowed them away,
    RFC 7296 §2.9, or proposed only some): traffic for them is never sent through this SA
    (RFC 4301 §5.1); an acquire asks for a CHILD_SA of their own. Without local subnets
    (a host: its address or virtual IP) there is nothing to compare."""
    pairs = [(lo, r) for r in peer.subnets for lo in rt.view.subnets if lo.version == r.version]
    left = [(lo, r) for lo, r in pairs if not ch.covers(lo, r)]
    if left:
        rt.log.info("CHILD_SA with %s (spi in %08x) carries only %s -> %s; not through it: %s (each such "
                    "pair gets a CHILD_SA of its own on demand)", ch.peer, ch.inbound_spi,
                    ",".join(map(str, ch.local_ts)), ",".join(map(str, ch.remote_ts)),
                    ", ".join(f"{lo} -> {r}" for lo, r in left))


def child_deleted(rt, ev: ChildSaDeleted, now: float) -> None:
    ch = rt.sad.lookup(ev.inbound_spi)
    if ch is not None:
        remove_child(rt, ch)
    rt.log.info("CHILD_SA with %s deleted: spi in %08x out %08x (%s)", ev.peer,
                ev.inbound_spi, ev.outbound_spi, ev.reason)


def ike_deleted(rt, ev: IkeSaDeleted, now: float) -> None:
    moved_to = ev.rekeyed_to
    for ch in rt.sad.of_ike_sa(ev.spi_i, ev.spi_r):
        if moved_to is not None:  # IKE_SA rekey (RFC 7296 §1.3.2): the CHILD_SAs live on
            ch.ike_spi_i, ch.ike_spi_r = moved_to
        else:
            remove_child(rt, ch)
    rt.log.info("IKE_SA %016x_i %016x_r%s deleted (%s)", ev.spi_i, ev.spi_r,
                f" with {ev.peer}" if ev.peer else "", ev.reason)


def peer_address_changed(rt, ev: PeerAddressChanged, now: float) -> None:
    # RFC 7296 §2.23 / RFC 3948: the peer's NAT mapping moved; its UDP-encapsulated CHILD_SAs follow
    moved = 0
    for ch in rt.sad.of_ike_sa(ev.ike_spi_i, ev.ike_spi_r):
        if ch.udp_encap:
            ch.remote = tuple(ev.remote)
            moved += 1
    rt.log.info("peer %s (IKE_SA %016x_i %016x_r) now at %s:%d behind its NAT; %d CHILD_SA(s) follow",
                ev.peer, ev.ike_spi_i, ev.ike_spi_r, ev.remote[0], ev.remote[1], moved)


def inits_refused(rt, ev: InitsRefused, now: float) -> None:
    # refused IKE_SA_INITs: one line per summary (at most every 10 s), never one per datagram;
    # the running totals are the IKE counters init_refused_<reason> (status, metrics)
    rt.log.info("refused %d IKE_SA_INIT request(s) in %.0f s (%s); last from %s: %s", sum(ev.counts.values()),
                ev.until - ev.since, ", ".join(f"{k} {v}" for k, v in ev.counts.items()), ev.last[0], ev.detail)


def half_open_dropped(rt, ev: HalfOpenDropped, now: float) -> None:
    # responder IKE_SAs that never got an IKE_AUTH (evicted under load, expired): one line per
    # summary (at most every 10 s), never one per attacker datagram; totals: half_open_dropped_<kind>
    rt.log.info("dropped %d half-open IKE_SA(s) in %.0f s (%s); last from %s: %s", sum(ev.counts.values()),
                ev.until - ev.since, ", ".join(f"{k} {v}" for k, v in ev.counts.items()), ev.last[0], ev.detail)


def peer_refused(rt, ev: PeerRefused, now: float) -> None:
    # policy data the IKE core cannot use (docs/ike-hardening.md): one warning per new problem
    rt.log.warning("peer %s refused: %s (fix the policy; other peers are unaffected; "
                   "see meshsec status)", ev.peer, ev.reason)


def child_refused(rt, ev: ChildSaRefused, now: float) -> None:
    # RFC 7296 §2.21.2: a refused CHILD_SA leaves the IKE_SA up; the IKE side backs off the retry
    rt.log.warning("CHILD_SA with %s refused by %s: %s%s%s", ev.peer or "?", "the peer" if ev.by == "peer" else "us",
                   ev.reason, f"; {ev.offered}" if ev.offered else "",
                   f"; retry in {ev.retry_in_s:.0f} s" if ev.retry_in_s is not None else "")


HANDLERS = {
    ChildSaRefused: child_refused,
    PeerRefused: peer_refused,
    InitsRefused: inits_refused,
    HalfOpenDropped: half_open_dropped,
    IkeSaEstablished: ike_established,
    IkeKeysDerived: ike_keys,
    ChildSaEstablished: child_established,
    ChildSaDeleted: child_deleted,
    IkeSaDeleted: ike_deleted,
    PeerAddressChanged: peer_address_changed,
}
