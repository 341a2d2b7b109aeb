"""Micro-benchmark of the ESP hot path (not a test).

Usage: .venv/bin/python tests/esp/bench_esp.py [seconds-per-case]
Prints packets/s and Mbit/s (inner bytes) for 1400-byte inner packets in
batches of 64, encapsulate and decapsulate, per transform.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent.esp import EspSa  # noqa: E402
from agent.iana import EncrId, IntegId  # noqa: E402
from agent.model import EspKeys  # noqa: E402

SUITES = {
    "aes128gcm16": dict(encr_id=EncrId.ENCR_AES_GCM_16, encr_key=os.urandom(20)),
    "aes256gcm16": dict(encr_id=EncrId.ENCR_AES_GCM_16, encr_key=os.urandom(36)),
    "chacha20poly1305": dict(encr_id=EncrId.ENCR_CHACHA20_POLY1305, encr_key=os.urandom(36)),
    "aes128-sha256": dict(encr_id=EncrId.ENCR_AES_CBC, encr_key=os.urandom(16),
                          integ_id=IntegId.AUTH_HMAC_SHA2_256_128, integ_key=os.urandom(32)),
}
BATCH = 64
SIZE = 1400


def run(fn, seconds: float) -> tuple[float, int]:
    n = 0
    t0 = time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= seconds:
            return dt, n


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
    inner = [bytes([0x45]) + os.urandom(SIZE - 1) for _ in range(BATCH)]
    print(f"{'suite':18} {'direction':12} {'packets/s':>12} {'Mbit/s':>10}")
    for name, kw in SUITES.items():
        keys = EspKeys(spi=0x1234, **kw)
        tx = EspSa(keys, rng=os.urandom)
        dt, n = run(lambda: tx.encapsulate_batch(inner), seconds)
        pps = n * BATCH / dt
        print(f"{name:18} {'encapsulate':12} {pps:12,.0f} {pps * SIZE * 8 / 1e6:10,.0f}")
        # decapsulate with the default 1024-bit replay window: pre-encrypt
        # distinct sequence numbers, decapsulate each batch once.
        rounds = 400
        batches = [tx.encapsulate_batch(inner) for _ in range(rounds)]
        rx = EspSa(keys, rng=os.urandom)
        assert rx.decapsulate_batch(batches[0]) == inner, "round trip failed"
        t0 = time.perf_counter()
        for b in batches[1:]:
            rx.decapsulate_batch(b)
        dt = time.perf_counter() - t0
        assert rx.counters["packets_in"] == rounds * BATCH, rx.counters
        pps = (rounds - 1) * BATCH / dt
        print(f"{name:18} {'decapsulate':12} {pps:12,.0f} {pps * SIZE * 8 / 1e6:10,.0f}")

if __name__ == "__main__":
    main()
