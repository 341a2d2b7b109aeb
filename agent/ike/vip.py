"""Virtual IP address pools of an IkeManager (CP, RFC 7296 §3.15; sans-I/O): one AddressPool per
prefix of a peer's ``virtual_ip_pool``, an address per identity while one of its IKE_SAs lives.

Pure module: no I/O.
"""
from __future__ import annotations

from agent.ike.cp import AddressPool
from agent.ike.sa import IkeSa, State
from agent.model import Peer


class VipPools:
    """The CP address pools of an IkeManager (its ``_pools``). ``m``: the IkeManager whose tables it
    works on (they stay there, one home for state)."""

    def __init__(self, m) -> None:
        self.m = m

    def assign_vip(self, peer: Peer, versions: tuple) -> list | None:
        spec = peer.policy.virtual_ip_pool
        pools = self.m._pools.get(spec)
        if pools is None:
            pools = self.m._pools[spec] = [AddressPool(c.strip()) for c in spec.split(",") if c.strip()]
        out = []
        for pool in pools:
            if pool.network.version in versions:
                addr = pool.acquire(peer.identity)
                if addr is None:
                    return None
                out.append(addr)
        return out or None

    def release_vip(self, peer_name: str, gone: IkeSa) -> None:
        peer = self.m.view.peer(peer_name)
        if peer is None or any(s is not gone and s.state != State.DELETING for s in self.m._sas_of(peer_name)):
            return  # another IKE_SA of that peer still holds the address
        for pools in self.m._pools.values():
            for pool in pools:
                pool.release(peer.identity)

    def leases(self) -> dict[str, dict[str, str]]:
        """Virtual IPs handed out, per pool string: {pool: {identity: address}}."""
        return {k: {i: a for p in v for i, a in p.leased().items()} for k, v in self.m._pools.items()}


__all__ = ["VipPools"]
