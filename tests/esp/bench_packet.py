"""Micro-benchmark of the packet helpers and AH (not a test).

Usage: .venv/bin/python tests/esp/bench_packet.py [seconds-per-case]
Internet checksum of a 1400-byte buffer: agent.esp.packet.checksum (one
big-int modulo) against a 16-bit word loop and an array('H') sum; AH
HMAC-SHA2-256-128 transport encapsulate/decapsulate of 1400-byte packets.
"""
from __future__ import annotations

import array
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent.esp import AhSa  # noqa: E402
from agent.esp.packet import build_ip, checksum  # noqa: E402
from agent.model import EspKeys  # noqa: E402


def loop_checksum(d: bytes) -> int:
    s = 0
    for i in range(0, len(d) - 1, 2):
        s += d[i] << 8 | d[i + 1]
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def array_checksum(d: bytes) -> int:
    a = array.array("H", d)
    if sys.byteorder == "little":
        a.byteswap()
    s = sum(a)
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def rate(fn, seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(100):
            fn()
        n += 100
    return n / (time.perf_counter() - t0)


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
    buf = os.urandom(1400)
    assert checksum(buf) == loop_checksum(buf) == array_checksum(buf)
    for name, fn in (("checksum (big-int mod)", checksum), ("array('H') sum", array_checksum),
                     ("16-bit word loop", loop_checksum)):
        r = rate(lambda: fn(buf), seconds)
        print(f"{name:26} {1e6 / r:8.2f} us per 1400 bytes")
    keys = EspKeys(spi=0x1234, encr_id=0, encr_key=b"", integ_id=12, integ_key=os.urandom(32))
    tx = AhSa(keys)
    pkts = [build_ip("10.0.0.1", "10.0.0.2", 17, os.urandom(1380)) for _ in range(64)]
    r = rate(lambda: tx.encapsulate_batch(pkts), seconds) * 64
    print(f"{'AH encapsulate (transport)':26} {r:10,.0f} packets/s {r * 1400 * 8 / 1e6:8,.0f} Mbit/s")
    out = tx.encapsulate_batch(pkts)
    def dec():
        rx = AhSa(keys)
        rx.decapsulate_batch(out)
    r = rate(dec, seconds) * 64
    print(f"{'AH decapsulate (transport)':26} {r:10,.0f} packets/s {r * 1400 * 8 / 1e6:8,.0f} Mbit/s")


if __name__ == "__main__":
    main()
