"""NAT traversal of the IKE_SA (RFC 7296 §2.23, RFC 3948), in one place.

- NAT detection: N(NAT_DETECTION_SOURCE_IP) = SHA-1(SPIi | SPIr | source IP | source port),
  N(NAT_DETECTION_DESTINATION_IP) likewise for the destination, in IKE_SA_INIT (the
  initiator's request carries SPIr = 0). A source hash that does not match says the peer is
  behind a NAT (or fakes it to force UDP encapsulation, strongSwan encap=yes); a destination
  hash that does not match says we are.
- After IKE_SA_INIT with a NAT found (or forced encapsulation) both continue on port 4500.
- NAT following: only the side NOT behind a NAT follows the peer's new address.

Pure module: no I/O.
"""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes

from agent.iana import NotifyType
from agent.ike.message import NotifyPayload

IKE_PORT = 500
NAT_T_PORT = 4500

Addr = tuple  # (ip, port)


def _sha1(data: bytes) -> bytes:
    h = hashes.Hash(hashes.SHA1())
    h.update(data)
    return h.finalize()


def nat_hash(spi_i: int, spi_r: int, addr: Addr) -> bytes:
    """SHA-1(SPIi | SPIr | IP | port) of one NAT_DETECTION_* notify (§2.23); 20 octets."""
    return _sha1(struct.pack("!QQ", spi_i, spi_r) + ipaddress.ip_address(addr[0]).packed
                 + struct.pack("!H", addr[1]))


def nat_notifies(spi_i: int, spi_r: int, local: Addr, remote: Addr, *, force_encap: bool, rng) -> list:
    """[N(NAT_DETECTION_SOURCE_IP), N(NAT_DETECTION_DESTINATION_IP)]; ``force_encap``: a random
    source hash that cannot match, so the peer sees a NAT and encapsulates (strongSwan encap=yes)."""
    src = _sha1(rng(20)) if force_encap else nat_hash(spi_i, spi_r, local)
    return [NotifyPayload(int(NotifyType.NAT_DETECTION_SOURCE_IP), src),
            NotifyPayload(int(NotifyType.NAT_DETECTION_DESTINATION_IP), nat_hash(spi_i, spi_r, remote))]


@dataclass
class NatState:
    """What NAT detection found. ``local``: we are behind a NAT (destination hashes are never
    faked, so this is real); ``remote``: the peer is behind one, or fakes its source hash."""
    local: bool = False
    remote: bool = False

    @property
    def detected(self) -> bool:
        return self.local or self.remote

    def check(self, payloads, spi_i: int, spi_r: int, local: Addr, remote: Addr) -> None:
        """Compare the peer's NAT_DETECTION_* notifies of IKE_SA_INIT with our addresses; a peer
        without NAT-T support (no notifies) leaves both False."""
        srcs = [p.data for p in payloads if isinstance(p, NotifyPayload)
                and p.notify_type == NotifyType.NAT_DETECTION_SOURCE_IP]
        dsts = [p.data for p in payloads if isinstance(p, NotifyPayload)
                and p.notify_type == NotifyType.NAT_DETECTION_DESTINATION_IP]
        if not srcs and not dsts:
            return
        self.remote = nat_hash(spi_i, spi_r, remote) not in srcs
        self.local = nat_hash(spi_i, spi_r, local) not in dsts

    def may_follow(self, established: bool, current: Addr, new: Addr) -> bool:
        """§2.23: follow an authenticated message from ``new`` only when the peer is behind a
        NAT and we are not (behind one, ``remote`` may only say that the peer fakes its source
        hash, and the address we reach the peer at is not ours to change)."""
        return self.remote and not self.local and established and tuple(new) != tuple(current)


def float_to_nat_t(local: Addr, remote: Addr) -> tuple[Addr, Addr]:
    """§2.23: after IKE_SA_INIT with a NAT detected (or forced), both sides use port 4500."""
    return (local[0], NAT_T_PORT), (remote[0], NAT_T_PORT)


def udp_encap(nat: NatState, force_encap: bool, peer) -> bool:
    """CHILD_SAs in UDP (RFC 3948): a NAT found, forced here, or the peer policy's choice."""
    return nat.detected or force_encap or (peer is not None and peer.policy.encapsulation == "udp")


__all__ = ["IKE_PORT", "NAT_T_PORT", "nat_hash", "nat_notifies", "NatState", "float_to_nat_t", "udp_encap"]
