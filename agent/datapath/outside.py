"""The outside: what arrives from the network, on its way in.

Inbound flow (one socket batch, ``Outside.udp500`` / ``udp4500`` / ``raw_esp`` / ``raw_ah``):
  1. socket batch read by the loop (``recv_batch``)
  2. classify: UDP 500 -> IKE; UDP 4500 -> ESP, IKE behind the non-ESP marker or a
     NAT-keepalive (RFC 3948 §2.2, §2.3); raw IP 50 -> ESP, raw IP 51 -> AH
  3. demultiplex by SPI through the SAD (RFC 4303 §3.4.2, RFC 4302 §3.4.2); unknown
     SPI -> counted, and an unknown-SPI hint for IKE
  4. decapsulate per CHILD_SA, one ``decapsulate_batch`` per group (replay check,
     ICV, decrypt; transport mode rebuilds the IP header, RFC 3948 §3.1.2 checksums)
  5. inbound policy check (RFC 4301 §5.2): the bundle it came through (``via``, the AH
     SA outside "ah+esp"), the CHILD_SA's selectors, narrowed protocol / ports
  6. peel nested layers: a tunnel's inner ESP / IKE addressed to us goes round again
     from step 3 (up to 4 deep), inner IKE is queued for IKE
  7. queue on the ``Batch``: inner packets for the TUN (MSS clamp), IKE datagrams,
     volume requests, unknown-SPI hints, the IKE_SAs whose CHILD_SAs received traffic
The loop writes the batch and hands the requests to IKE afterwards: nothing here
calls IKE or touches a device.
"""
from __future__ import annotations

import ipaddress

from agent.datapath import packets as pk
from agent.datapath.batch import Batch
from agent.datapath.inside import MAX_NESTING, sa_drops, within_child
from agent.datapath.policy import Policy
from agent.esp import Sad, classify_udp4500

_NATT = (b"\x11\x94", b"\x01\xf4")  # destination port 4500, 500


class Outside:
    """Sockets -> SAD -> SAs -> policy check -> what to write. ``counters``: the runtime's
    counters (shared)."""

    def __init__(self, sad: Sad, policy: Policy, counters: dict, *, local_address: str,
                 mss_clamp: bool = False) -> None:
        self.sad = sad
        self.policy = policy
        self.counters = counters
        self.local_address = local_address
        self.mss_clamp = mss_clamp
        self._local_b: bytes | None = None  # packed local address, for transport mode
        self._local_packed: tuple = (None, set())  # (policy.local_ips, the same packed) for _peel

    # -- sockets --------------------------------------------------------------
    def udp500(self, batch: list, out: Batch) -> None:
        """IKE on UDP 500: every datagram goes to IKE."""
        local = (self.local_address, 500)
        out.ike += [(data, local, addr) for data, addr in batch]

    def udp4500(self, batch: list, out: Batch) -> None:
        """UDP 4500 (RFC 3948): ESP, IKE behind the non-ESP marker, NAT-keepalives."""
        c = self.counters
        esp: list[bytes] = []
        esp_src: list = []
        ike = None
        zero3 = b"\x00\x00\x00"
        for data, addr in batch:
            if len(data) >= 12 and data[:3] != zero3:
                esp.append(data)  # SPI >= 256: ESP (classify_udp4500's answer, without the call)
                esp_src.append(addr)
                continue
            kind = classify_udp4500(data)
            if kind == "esp":
                esp.append(data)
                esp_src.append(addr)
            elif kind == "ike":  # RFC 3948 §2.2: IKE behind the non-ESP marker
                if ike is None:
                    ike = []
                ike.append((data[4:], addr))
            elif kind == "keepalive":  # RFC 3948 §2.3
                c["keepalives"] += 1
            else:
                c["malformed"] += 1
        if esp:
            before = c["unknown_spi"]
            self.esp_in(esp, None, out, srcs=esp_src)
            if c["unknown_spi"] != before:
                out.unknown_spi += [(p[:4], a) for p, a in zip(esp, esp_src)]
        if ike:
            local = (self.local_address, 4500)
            out.ike += [(data, local, addr) for data, addr in ike]

    def raw_esp(self, batch: list, out: Batch) -> None:
        """Raw IP protocol 50: whole IP packets, ESP after the IP header."""
        esp = []
        for pkt, _addr in batch:
            off = (pkt[0] & 0x0F) * 4 if pkt[0] >> 4 == 4 else 40
            esp.append(pkt[off:])
        c = self.counters
        before = c["unknown_spi"]
        self.esp_in(esp, None, out)
        if c["unknown_spi"] != before:
            out.unknown_spi += [(p[:4], a) for p, a in zip(esp, (a for _p, a in batch))]

    def raw_ah(self, batch: list, out: Batch) -> None:
        """Raw IP protocol 51: whole IP packets with AH."""
        c = self.counters
        before = c["unknown_spi"]
        self.ah_in([p for p, _a in batch], out)
        if c["unknown_spi"] != before:
            for p, a in batch:
                off = (p[0] & 0x0F) * 4 if p and p[0] >> 4 == 4 else 40
                out.unknown_spi.append((p[off + 4:off + 8], a))

    # -- AH (RFC 4302) ----------------------------------------------------------
    def ah_in(self, pkts: list[bytes], out: Batch) -> None:
        """Inbound AH (RFC 4302 §3.4): find the SA by SPI, verify and strip AH, then the
        inner packet goes through its policy check to the TUN, or (ESP then AH bundle) to
        the ESP SA that must sit inside this AH SA."""
        c = self.counters
        c["ah_in"] += len(pkts)
        groups: dict[int, list] = {}
        for p in pkts:
            try:
                v = p[0] >> 4
                off = (p[0] & 0x0F) * 4 if v == 4 else 40
                if (p[9] if v == 4 else p[6]) != pk.PROTO_AH:
                    raise IndexError
                spi = int.from_bytes(p[off + 4:off + 8], "big")
                if len(p) < off + 12:
                    raise IndexError
            except IndexError:
                c["malformed"] += 1
                continue
            groups.setdefault(spi, []).append(p)
        spd = self.policy.spd
        lookup = self.sad.lookup
        tun = out.tun
        for spi, lst in groups.items():
            ch = lookup(spi, "ah")
            if ch is None:
                c["unknown_spi"] += len(lst)
                continue
            sa = ch.in_sa
            before = sa_drops(sa)
            inner = sa.decapsulate_batch(lst)
            c["ah_drops"] += sa_drops(sa) - before
            if getattr(sa, "needs_rekey", False):  # byte/packet soft or hard limit inbound
                out.volume.append((ch, sa))
            if inner:
                out.inbound_ike_sas.add((ch.ike_spi_i, ch.ike_spi_r))
            esp = []
            for p in inner:
                v = p[0] >> 4
                proto = p[9] if v == 4 else p[6]
                if ch.mode == "transport" and proto == pk.PROTO_ESP:
                    esp.append(p[(p[0] & 0x0F) * 4 if v == 4 else 40:])
                elif spd.allows_inbound(ch.local_ts, ch.remote_ts, p):
                    if ch.narrow is None or within_child(ch, [p], spd, c, inbound=True):
                        tun.append(p)  # (a narrowed-selector miss is counted by within_child)
                else:
                    ch.drops["policy"] += 1
                    c["policy"] += 1
            if esp:
                self.esp_in(esp, None, out, ah_peer=ch.peer)

    # -- ESP (RFC 4303) ---------------------------------------------------------
    def esp_in(self, esp: list[bytes], via: str | None, out: Batch, depth: int = 0,
               ah_peer: str | None = None, srcs: list | None = None) -> None:
        """Decapsulate ESP packets (RFC 4303 §3.4), check each inner packet against its
        CHILD_SA's selectors (RFC 4301 §5.2) and queue them for the TUN; an inner packet
        that is itself ESP/IKE addressed to us (a nested SA) is processed again here.
        ``via``: the peer whose SA the packets came out of (None: from the underlay);
        ``ah_peer``: the peer whose AH SA they came out of ("ah+esp" bundles); ``srcs``: the
        (ip, port) each packet came from (UDP 4500), to notice a rebound NAT mapping."""
        c = self.counters
        c["esp_in"] += len(esp)
        good_all: list[bytes] = []
        sad = self.sad
        before = sad.counters["no_sa"]
        policy = self.policy
        spd = policy.spd
        allows = spd.allows_inbound
        nest_in = policy.nest_in
        alive = out.inbound_ike_sas
        src_set = set(srcs) if srcs else None  # per batch, not per packet
        for ch, lst in sad.demux_esp(esp):
            # "ah+esp": this ESP SA must come out of the same peer's AH SA, and only then
            bad_ah = (ah_peer != ch.peer) if ch.needs_ah else (ah_peer is not None)
            if ch.via != via or bad_ah:
                # RFC 4301 §5.2: the bundle the policy demands is not the way it came
                ch.drops["policy"] += len(lst)
                c["policy"] += len(lst)
                continue
            sa = ch.in_sa
            lts, rts = ch.local_ts, ch.remote_ts
            if ch.mode == "tunnel":
                inner = sa.decapsulate_batch(lst)
            else:
                local_b = self._local_b
                if local_b is None:
                    local_b = self._local_b = ipaddress.ip_address(self.local_address).packed
                src = ipaddress.ip_address(ch.remote[0]).packed
                fix = ch.udp_encap
                inner = [pk.rebuild_transport(src, local_b, nh, pl, fix_checksum=fix)
                         for nh, pl in sa.decapsulate_batch_nh(lst)]
            if getattr(sa, "needs_rekey", False):  # byte/packet soft or hard limit inbound
                out.volume.append((ch, sa))
            if inner:
                alive.add((ch.ike_spi_i, ch.ike_spi_r))
                if src_set is not None and ch.udp_encap and ch.remote not in src_set:
                    self._rebound(ch, lst, esp, srcs, src_set, out)
            # the SPD answer depends on the addresses only: asked once per address pair
            good, bad = pk.filter_inbound(allows, lts, rts, inner)
            if bad:
                ch.drops["policy"] += bad
                c["policy"] += bad
            if ch.narrow is not None and good:
                good = within_child(ch, good, spd, c, inbound=True)
            if good and ch.mode == "tunnel" and nest_in:
                good = self._peel(ch.peer, good, depth, out)
            good_all += good
        c["unknown_spi"] += sad.counters["no_sa"] - before
        if good_all:
            if self.mss_clamp:
                clamp = policy.clamp
                good_all = [clamp(p, c) for p in good_all]
            out.tun += good_all

    @staticmethod
    def _rebound(ch, lst: list[bytes], esp: list[bytes], srcs: list, src_set: set, out: Batch) -> None:
        """``ch`` authenticated ESP (``lst``), none of it from ``ch.remote``: if it all came from
        one address, the peer's NAT mapping moved there (RFC 3948, RFC 7296 §2.23); the loop
        asks IKE whether to follow (``IkeRequests.follow``). Packets from several addresses
        decide nothing (one of them may be a forgery that failed)."""
        if len(src_set) == 1:
            src = next(iter(src_set))
        else:
            key = lst[0][:4]
            from_ = {a for p, a in zip(esp, srcs) if p[:4] == key}
            if len(from_) != 1:
                return
            src = from_.pop()
        out.moved[ch.inbound_spi] = (ch, tuple(src))

    def _peel(self, peer: str, pkts: list[bytes], depth: int, out: Batch) -> list[bytes]:
        """Inner packets of ``peer``'s tunnel that are ESP (raw or in UDP 4500) or IKE for us go
        through the next layer here (IKE: queued for IKE); the rest are returned for the TUN."""
        rest, esp = [], []
        local_ips = self.policy.local_ips
        if self._local_packed[0] != local_ips:  # our addresses as packed bytes, per set of them
            self._local_packed = (set(local_ips), {ipaddress.ip_address(a).packed for a in local_ips})
        local_b = self._local_packed[1]
        c = self.counters
        for p in pkts:
            v = p[0] >> 4
            if v == 4:
                dst_b, proto, off = p[16:20], p[9], (p[0] & 0x0F) * 4
            else:
                dst_b, proto, off = p[24:40], p[6], 40
            if dst_b not in local_b:
                rest.append(p)
                continue
            src = str(ipaddress.IPv4Address(p[12:16]) if v == 4 else ipaddress.IPv6Address(p[8:24]))
            if proto == pk.PROTO_ESP:
                esp.append(p[off:])
            elif proto == pk.PROTO_UDP and len(p) >= off + 8 and p[off + 2:off + 4] in _NATT:
                data = p[off + 8:]
                port = p[off + 2] << 8 | p[off + 3]
                sport = p[off] << 8 | p[off + 1]
                kind = classify_udp4500(data) if port == 4500 else None
                if kind == "esp":
                    esp.append(data)
                elif kind == "ike":
                    out.ike.append((data[4:], (self.local_address, port), (src, sport)))
                elif port == 500:
                    out.ike.append((data, (self.local_address, port), (src, sport)))
                else:
                    c["keepalives"] += 1
            else:
                rest.append(p)
        if esp:
            if depth >= MAX_NESTING:
                c["nesting_loop"] += len(esp)
            else:
                c["nested_in"] += len(esp)
                self.esp_in(esp, peer, out, depth + 1)
        return rest
