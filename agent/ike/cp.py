"""Configuration payload (RFC 7296 §3.15) and a virtual IP address pool.

A remote host (RFC 4301 case 4) asks the gateway for an inner address with
CP(CFG_REQUEST){INTERNAL_IP4_ADDRESS, INTERNAL_IP6_ADDRESS} in IKE_AUTH; the
gateway answers CP(CFG_REPLY) with the address it assigned (§2.19, §3.15.1).

Wire format of the CP payload body (§3.15): CFG Type (1 octet), RESERVED (3),
then attributes: R bit + Attribute Type (15 bits), Length (2), Value.
INTERNAL_IP4_ADDRESS value: 4 octets (0 in a request); INTERNAL_IP6_ADDRESS:
16 octets address + 1 octet prefix length (0 in a request).

Pure module: no I/O.
"""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from agent.iana import CfgType, PayloadType
from agent.ike.message import RawPayload

INTERNAL_IP4_ADDRESS = 1
INTERNAL_IP4_NETMASK = 2
INTERNAL_IP6_ADDRESS = 8


class CpError(ValueError):
    """A malformed configuration payload."""


@dataclass(frozen=True)
class ConfigPayload:
    """Decoded CP: ``cfg_type`` (CfgType) and (attribute type, value) pairs in wire order."""
    cfg_type: int
    attributes: tuple[tuple[int, bytes], ...] = ()

    def encode(self) -> RawPayload:
        body = struct.pack("!B3x", self.cfg_type)
        for t, v in self.attributes:
            body += struct.pack("!HH", t & 0x7FFF, len(v)) + v
        return RawPayload(int(PayloadType.CP), body)

    @classmethod
    def decode(cls, data: bytes) -> "ConfigPayload":
        """Raises CpError naming the defect."""
        if len(data) < 4:
            raise CpError(f"CP body of {len(data)} octets is shorter than its 4-octet header")
        cfg_type = data[0]
        attrs = []
        off = 4
        while off < len(data):
            if len(data) - off < 4:
                raise CpError("CP attribute header truncated")
            t, n = struct.unpack_from("!HH", data, off)
            off += 4
            if off + n > len(data):
                raise CpError(f"CP attribute {t & 0x7FFF} length {n} runs past the payload")
            attrs.append((t & 0x7FFF, bytes(data[off:off + n])))
            off += n
        return cls(cfg_type, tuple(attrs))

    def get(self, attr: int) -> list[bytes]:
        return [v for t, v in self.attributes if t == attr]


def request(ipv4: bool = True, ipv6: bool = False) -> ConfigPayload:
    """CP(CFG_REQUEST) asking for an inner IPv4 and/or IPv6 address (empty values, §3.15.1)."""
    attrs = []
    if ipv4:
        attrs.append((INTERNAL_IP4_ADDRESS, b""))
    if ipv6:
        attrs.append((INTERNAL_IP6_ADDRESS, b""))
    return ConfigPayload(int(CfgType.CFG_REQUEST), tuple(attrs))


def reply(addresses: list) -> ConfigPayload:
    """CP(CFG_REPLY) with the assigned addresses (ipaddress objects)."""
    attrs = []
    for a in addresses:
        if a.version == 4:
            attrs.append((INTERNAL_IP4_ADDRESS, a.packed))
        else:
            attrs.append((INTERNAL_IP6_ADDRESS, a.packed + bytes([128])))
    return ConfigPayload(int(CfgType.CFG_REPLY), tuple(attrs))


def find_cp(payloads) -> ConfigPayload | None:
    """The decoded CP among ``payloads`` or None. Raises CpError if it is malformed."""
    for p in payloads:
        if isinstance(p, RawPayload) and p.ptype == PayloadType.CP:
            return ConfigPayload.decode(p.data)
    return None


def reply_addresses(cp: ConfigPayload) -> list:
    """Addresses in a CFG_REPLY (ipaddress objects); malformed values raise CpError."""
    out = []
    for v in cp.get(INTERNAL_IP4_ADDRESS):
        if len(v) != 4:
            raise CpError(f"INTERNAL_IP4_ADDRESS of {len(v)} octets (expected 4)")
        out.append(ipaddress.IPv4Address(v))
    for v in cp.get(INTERNAL_IP6_ADDRESS):
        if len(v) != 17:
            raise CpError(f"INTERNAL_IP6_ADDRESS of {len(v)} octets (expected 17)")
        out.append(ipaddress.IPv6Address(v[:16]))
    return out


class AddressPool:
    """Virtual IP pool of a gateway (``PeerPolicy.virtual_ip_pool``, e.g. "10.99.0.0/24").

    ``acquire(identity)`` gives each peer identity one address (the network and
    broadcast addresses of an IPv4 pool are never handed out), the same one again
    while it holds it, and after a release the address it had before if still
    free (stable per identity). Of an IPv6 pool the Subnet-Router anycast address
    (all-zeros interface ID) is never handed out either. Returns None when exhausted. ``release(identity)``
    frees it (IKE_SA deleted). Raises ValueError for a pool that is not a network.
    """

    def __init__(self, cidr: str):
        try:
            self.network = ipaddress.ip_network(cidr, strict=True)
        except ValueError as e:
            raise ValueError(f"virtual_ip_pool {cidr!r} is not a network (e.g. 10.99.0.0/24): {e}") from None
        self._leases: dict[str, ipaddress.IPv4Address | ipaddress.IPv6Address] = {}
        self._last: dict[str, ipaddress.IPv4Address | ipaddress.IPv6Address] = {}

    def _candidates(self):
        if self.network.version == 4 and self.network.prefixlen < 31:
            return self.network.hosts()
        if self.network.version == 6 and self.network.prefixlen < 127:
            # the all-zeros interface ID is the Subnet-Router anycast address (RFC 4291 §2.6.1)
            return (a for a in self.network if a != self.network.network_address)
        return iter(self.network)

    def acquire(self, identity: str):
        if identity in self._leases:
            return self._leases[identity]
        used = set(self._leases.values())
        prev = self._last.get(identity)
        if prev is not None and prev not in used:
            addr = prev
        else:
            taken_before = set(self._last.values())
            addr = None
            fallback = None
            for a in self._candidates():
                if a in used:
                    continue
                if a not in taken_before:
                    addr = a
                    break
                if fallback is None:
                    fallback = a
            addr = addr or fallback
            if addr is None:
                return None
        self._leases[identity] = addr
        self._last[identity] = addr
        return addr

    def release(self, identity: str) -> None:
        self._leases.pop(identity, None)

    def leased(self) -> dict[str, str]:
        return {k: str(v) for k, v in self._leases.items()}


__all__ = ["ConfigPayload", "CpError", "AddressPool", "request", "reply", "find_cp", "reply_addresses",
           "INTERNAL_IP4_ADDRESS", "INTERNAL_IP6_ADDRESS"]
