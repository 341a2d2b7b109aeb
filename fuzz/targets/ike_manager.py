"""IkeManager in the responder role fed arbitrary datagrams on UDP 500 and 4500.

Input: up to 8 datagrams, each ``sel`` (1 octet) + a length-prefixed chunk.
``sel`` bit 0: port 4500 (the datagram goes through the RFC 3948 classifier
first, as the runtime does: IKE behind the non-ESP marker to the manager, ESP
with an unknown SPI to ``hint_unknown_spi``) else 500; bit 1: from node-a's
address (a configured peer) else from 203.0.113.9; bits 2-3: 0 the chunk as
is, 1 the honest IKE_SA_INIT request of node-a instead (creates a half-open
responder IKE_SA with a deterministic SPI), 2 the chunk with its header's SPIs
set to that IKE_SA's and its length fixed, 3 only the length fixed; bits 4-7:
seconds the fake clock advances (timers fire).

receive_datagram never raises by design (it counts ``internal_error`` for any
exception): here that counter is the finding. Also checked: no datagram over
64 KiB is produced, and the half-open table stays within its cap.
"""
from __future__ import annotations

from agent.esp.udpencap import classify_udp4500
from agent.ike.message import HEADER_LEN

from fuzz.harness import Finding, Reader, Target
from fuzz.targets import _ike_env as env

_INIT = None


def honest_init() -> bytes:
    global _INIT
    if _INIT is None:
        _INIT = env.handshake()[0][1]
    return _INIT


def _fix(d: bytes, spi_i: bytes | None, spi_r: bytes | None) -> bytes:
    if len(d) < HEADER_LEN:
        return d
    if spi_i is not None:
        d = spi_i + spi_r + d[16:]
    return d[:24] + len(d).to_bytes(4, "big") + d[28:]


def one_input(data: bytes) -> None:
    r = Reader(data)
    m = env.manager("node-b", "fuzz-b")
    now = env.T0
    init = honest_init()
    our_spi = b"\0" * 8
    for _ in range(8):
        if not r.left():
            break
        sel = r.u8()
        chunk = r.chunk()
        port = 4500 if sel & 1 else 500
        remote = (env.A_ADDR if sel & 2 else "203.0.113.9", port)
        kind = (sel >> 2) & 3
        if kind == 1:
            chunk = init
        elif kind == 2:
            chunk = _fix(chunk, init[:8], our_spi)
        elif kind == 3:
            chunk = _fix(chunk, None, None)
        now += sel >> 4
        m.handle_timer(now)
        if port == 4500:
            wire = (b"\0\0\0\0" + chunk) if kind else chunk
            what = classify_udp4500(wire)
            if what == "esp":
                m.hint_unknown_spi(remote, now)
                continue
            if what != "ike":
                continue
            chunk = wire[4:]
        m.receive_datagram(chunk, (env.B_ADDR, port), remote, now)
        if "internal_error" in m.counters:
            raise Finding(f"IkeManager counted internal_error: {m.counters}")
        for d in m.datagrams_to_send():
            if len(d.data) > 65535 - 8:
                raise Finding(f"datagram of {len(d.data)} octets")
            if d.data[:8] == init[:8] and len(d.data) >= 16:
                our_spi = bytes(d.data[8:16])
        while m.next_event() is not None:
            pass
        if m.half_open() > max(m.cookie_threshold, m.half_open_per_source) + 1:
            raise Finding(f"{m.half_open()} half-open IKE_SAs")
    m.handle_timer(now + 3600)
    if "internal_error" in m.counters:
        raise Finding(f"IkeManager counted internal_error in a timer: {m.counters}")


TARGET = Target("ike_manager", one_input, allowed=())
