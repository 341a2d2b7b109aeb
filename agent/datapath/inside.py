"""The inside: packets the kernel routed into the TUN device, on their way out.

Outbound flow (one TUN batch, ``Inside.process``):
  1. TUN batch read by the loop (``tun.read_batch``)
  2. TCP MSS clamp on SYN / SYN-ACK (``mss_clamp``)
  3. SPD lookup per packet (RFC 4301 §5.1): PROTECT -> grouped per SPD entry, and per
     group the CHILD_SA whose selectors cover the entry (``Policy.sa_for``; a peer may
     have several); PROTECT with no SA for the peer -> acquire request, with SAs but none
     for that selector pair -> acquire for the pair (the packets go along in
     ``Batch.waiting``: the loop holds them until a CHILD_SA is up, hold.py); DISCARD,
     BYPASS and no match -> counted drop
  4. narrowed-selector check (protocol / ports negotiated, RFC 7296 §2.9)
  5. MTU fit: too big with DF -> ICMP too-big back into the TUN (RFC 4301 §8.2.1)
  6. encapsulate per CHILD_SA, one ``encapsulate_batch`` per group: ESP (tunnel or
     transport; transport drops fragments), AH (RFC 4302), ESP then AH, and nested
     bundles (the result wrapped in IP/UDP and fed to the carrier's SA, up to 4 deep)
  7. queue on the ``Batch``: ESP in UDP 4500, raw ESP, raw AH; volume requests for SAs
     that set ``needs_rekey``
The loop sends the batch and hands the requests to IKE afterwards: nothing here
calls IKE or touches a device.
"""
from __future__ import annotations

import logging

from agent.datapath import packets as pk
from agent.datapath.batch import Batch
from agent.datapath.policy import Policy
from agent.esp import Action, Sad
from agent.esp.packet import PROTO_FRAGMENT, parse_ip
from agent.esp.sad import ChildEntry

MAX_NESTING = 4  # SAs applied to one packet (iterated processing, RFC 4301 §4.5)
FLOW_COUNTERS = ("packets_in", "packets_out", "bytes_in", "bytes_out")


def is_fragment(p: bytes) -> bool:
    """An IPv4 fragment (MF or offset) or an IPv6 packet with a Fragment header."""
    if len(p) < 8:
        return False
    if p[0] >> 4 == 4:
        return bool(p[6] & 0x3F or p[7])
    if p[6] not in (PROTO_FRAGMENT, 0, 43, 60):  # no extension header that may precede it
        return False
    try:
        return parse_ip(p).fragment
    except Exception:
        return False  # malformed: the SA counts it


def sa_drops(sa) -> int:
    """The drops an SA counted so far (every counter but the flow ones)."""
    return sum(v for k, v in sa.counters.items() if k not in FLOW_COUNTERS)


def within_child(ch: ChildEntry, pkts: list[bytes], spd, counters: dict, *, inbound: bool) -> list[bytes]:
    """Packets inside ``ch``'s narrowed selectors (protocol, ports: RFC 7296 §2.9); the
    rest are counted as ``policy`` drops (the SA was not negotiated for them)."""
    allows = spd.entry_allows
    keep = [p for p in pkts if any(allows(e, p, inbound=inbound) for e in ch.narrow)]
    bad = len(pkts) - len(keep)
    if bad:
        ch.drops["policy"] += bad
        counters["policy"] += bad
    return keep


class Inside:
    """TUN -> SPD -> SAs -> what to send. ``counters``: the runtime's counters (shared);
    ``raw_esp`` / ``raw_ah``: whether those sockets are open (set by the loop);
    ``rng(n)``: random bytes (the first IPv4 Identification for AH)."""

    def __init__(self, sad: Sad, policy: Policy, counters: dict, *, local_address: str, rng,
                 mss_clamp: bool = False, log: logging.Logger | None = None) -> None:
        self.sad = sad
        self.policy = policy
        self.counters = counters
        self.local_address = local_address
        self.mss_clamp = mss_clamp
        self.log = log or logging.getLogger("meshsec.runtime")
        self.raw_esp = False
        self.raw_ah = False
        self._ip_id = int.from_bytes(rng(2), "big") or 1  # IPv4 IDs we put on AH packets (never 0)
        self._fragment_logged = False

    def process(self, pkts: list[bytes], out: Batch, *, held: bool = False) -> None:
        """One TUN batch (whole IP packets) through the outbound flow into ``out``.
        ``held``: packets that waited for their SA (hold.py), already counted in ``tun_in``."""
        c = self.counters
        if not held:
            c["tun_in"] += len(pkts)
        policy = self.policy
        if self.mss_clamp:
            clamp = policy.clamp
            pkts = [clamp(p, c) for p in pkts]
        spd = policy.spd
        lookup = spd.lookup_outbound
        current = self.sad.current
        no_policy, malformed = spd.default_entry, spd.malformed_entry
        protect = Action.PROTECT
        groups: dict[int, list] = {}
        acquire = out.acquire  # peer -> packets without an SA
        waiting = out.waiting  # the packets themselves, to hold while the SA is negotiated
        last_e, last_g = None, None  # a batch is mostly one flow: skip the group lookup
        for p in pkts:
            e = lookup(p)
            if e is last_e:
                last_g.append(p)
                continue
            if e.action is protect:
                g = groups.get(id(e))
                if g is not None:
                    g[1].append(p)
                    last_e, last_g = e, g[1]
                elif e.peer in current:
                    g = groups[id(e)] = [e, [p]]
                    last_e, last_g = e, g[1]
                else:
                    acquire[e.peer] = acquire.get(e.peer, 0) + 1
                    w = waiting.get(e.peer)
                    if w is None:
                        waiting[e.peer] = [p]
                    else:
                        w.append(p)
            elif e is no_policy:
                c["no_policy"] += 1
            elif e is malformed:
                c["malformed"] += 1
            else:
                c["discard"] += 1  # explicit DISCARD, or BYPASS (nothing to bypass to on a TUN)
        hits = policy.hits
        tun_mtu = policy.tun_mtu
        sa_for = policy.sa_for
        for e, lst in groups.values():
            hits[e] = hits.get(e, 0) + len(lst)
            ch = sa_for(e)  # the CHILD_SA whose selectors cover this SPD entry, once per group
            if ch is None:
                # the peer has CHILD_SAs, none for this selector pair (e.g. the peer narrowed,
                # RFC 7296 §2.9): never through another pair's SA (RFC 4301 §5.1); ask for one
                k = (e.peer, e.local, e.remote)
                acquire[k] = acquire.get(k, 0) + len(lst)
                waiting.setdefault(k, []).extend(lst)
                continue
            if ch.narrow is not None and not e.name.startswith("child:"):
                lst = within_child(ch, lst, spd, c, inbound=False)
                if not lst:
                    continue
            if ch.max_inner < tun_mtu:
                lst = self._fit(ch, lst, out)
            self.protect(ch, lst, 0, out)

    def _fit(self, ch: ChildEntry, pkts: list[bytes], out: Batch) -> list[bytes]:
        """Packets that fit through ``ch``'s bundle; for the rest an ICMP "fragmentation needed" /
        Packet Too Big goes back into the TUN (RFC 4301 §8.2.1: the SA's PMTU is reported to the
        sender); too-big packets without DF are sent anyway (the outer packet gets fragmented)."""
        lim = ch.max_inner
        keep, icmp = [], []
        for p in pkts:
            if len(p) <= lim:
                keep.append(p)
                continue
            r = pk.too_big(p, lim)
            if r is None:
                keep.append(p)
            else:
                icmp.append(r)
        if icmp:
            self.counters["too_big"] += len(icmp)
            out.icmp += icmp
        return keep

    def protect(self, ch: ChildEntry, pkts: list[bytes], depth: int, out: Batch) -> None:
        """Apply ``ch``'s outbound SA to ``pkts`` (whole IP packets) and queue the result on
        ``out``, or hand it to the next SA of the bundle when ``ch.via`` is set."""
        c = self.counters
        if ch.mode == "transport":
            whole = [p for p in pkts if not is_fragment(p)]
            if len(whole) != len(pkts):
                # RFC 4303 §3.3.4 / RFC 4302 §3.4.1: transport mode protects whole datagrams only;
                # no reassembly here (docs/datapath.md "Fragments and transport mode")
                c["fragment"] += len(pkts) - len(whole)
                if not self._fragment_logged:
                    self._fragment_logged = True
                    self.log.warning("IP fragments from the TUN for the transport-mode CHILD_SA with %s are "
                                     "dropped (counter fragment; logged once): send datagrams that fit the "
                                     "TUN MTU, or use tunnel mode", ch.peer)
                pkts = whole
                if not pkts:
                    return
        if ch.protocol == "ah":
            self._ah(ch, pkts, out)
            return
        if ch.needs_ah and ch.ah is None:
            c["no_sa"] += len(pkts)  # "ah+esp": the AH SA is not up yet
            return
        sa = ch.out_sa
        esp = sa.encapsulate_batch(pkts)
        if getattr(sa, "needs_rekey", False):  # checked per batch, not per packet
            out.volume.append((ch, sa))
        if not esp:
            return
        if ch.via is not None:
            nxt = self.sad.current.get(ch.via)
            if nxt is None:
                c["no_sa"] += len(esp)
                return
            if depth >= MAX_NESTING:
                c["nesting_loop"] += len(esp)
                return
            src, dst = self.local_address, ch.remote[0]
            if ch.udp_encap:
                outer = [pk.udp_datagram(src, dst, pk.IKE_NATT_PORT, ch.remote[1], x) for x in esp]
            else:
                outer = [pk.ip_packet(src, dst, pk.PROTO_ESP, x) for x in esp]
            c["nested_out"] += len(outer)
            self.protect(nxt, outer, depth + 1, out)
            return
        if ch.ah is not None:  # ESP then AH (RFC 4301 §4.5): whole IP packets for the AH SA
            src, dst = self.local_address, ch.remote[0]
            c["esp_out"] += len(esp)
            self._ah(ch.ah, [pk.ip_packet(src, dst, pk.PROTO_ESP, x) for x in esp], out)
            return
        if ch.udp_encap:
            dst = ch.remote
            out.udp4500 += [(x, dst) for x in esp]
            out.udp4500_to.add(dst)
        elif self.raw_esp:
            dst = (ch.remote[0], 0)
            out.raw_esp += [(x, dst) for x in esp]
        else:
            c["no_raw_socket"] += len(esp)

    def _next_ip_id(self) -> int:
        self._ip_id = (self._ip_id % 0xFFFF) + 1
        return self._ip_id

    def _ah(self, ah: ChildEntry, pkts: list[bytes], out: Batch) -> None:
        """AH-protect whole IP packets (raw IP protocol 51, IP_HDRINCL). Tunnel mode is AH over
        a fresh IP-in-IP header we build (so its Identification, which the ICV covers, is ours
        and never 0: the kernel would fill in a 0 after the ICV was computed); transport mode
        gives IPv4 packets with ID 0 an ID first."""
        c = self.counters
        if not self.raw_ah:
            c["no_raw_socket"] += len(pkts)
            return
        src, dst = self.local_address, ah.remote[0]
        ready = []
        for p in pkts:
            if not p:
                continue
            if ah.mode == "tunnel":
                nh = 4 if p[0] >> 4 == 4 else 41
                ready.append(pk.build_ip(src, dst, nh, p, ident=self._next_ip_id(), df=False))
            elif p[0] >> 4 == 4 and len(p) >= 20 and p[4:6] == b"\x00\x00":
                ready.append(pk.with_ip_id(p, self._next_ip_id()))
            else:
                ready.append(p)
        sa = ah.out_sa
        before = sa_drops(sa)
        sealed = sa.encapsulate_batch(ready)
        c["ah_drops"] += sa_drops(sa) - before
        if getattr(sa, "needs_rekey", False):
            out.volume.append((ah, sa))
        if sealed:
            out.raw_ah += [(x, (dst, 0)) for x in sealed]
