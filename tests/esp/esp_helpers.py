"""Shared helpers for the ESP core tests (imported as tests.esp.esp_helpers)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

VECTORS = Path("/work/shared/vectors")
CAPTURES = Path("/work/shared/captures")


class DetRng:
    """Deterministic rng(n) for tests (SHA-256 counter stream)."""

    def __init__(self, seed: bytes = b"esp-tests") -> None:
        self.seed = seed
        self.counter = 0
        self.calls = 0

    def __call__(self, n: int) -> bytes:
        self.calls += 1
        out = b""
        while len(out) < n:
            out += hashlib.sha256(self.seed + self.counter.to_bytes(8, "big")).digest()
            self.counter += 1
        return out[:n]


def load_json(name: str) -> dict:
    return json.loads((VECTORS / name).read_text())


def ipv4_packet(payload_len: int = 64, src: str = "10.0.0.1", dst: str = "10.0.1.1", proto: int = 17,
                sport: int = 1234, dport: int = 5678, fill: int = 0) -> bytes:
    """A minimal IPv4 packet (checksum not computed: the ESP core does not look at it)."""
    import ipaddress
    body = sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + bytes((fill + i) & 0xFF for i in range(max(0, payload_len - 4)))
    total = 20 + len(body)
    hdr = bytes([0x45, 0, total >> 8, total & 0xFF, 0, 0, 0, 0, 64, proto, 0, 0])
    return hdr + ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed + body


def ipv6_packet(payload_len: int = 64, src: str = "fd00::1", dst: str = "fd00:1::1", proto: int = 17,
                sport: int = 1234, dport: int = 5678) -> bytes:
    import ipaddress
    body = sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + bytes(i & 0xFF for i in range(max(0, payload_len - 4)))
    hdr = bytes([0x60, 0, 0, 0, len(body) >> 8, len(body) & 0xFF, proto, 64])
    return hdr + ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed + body
