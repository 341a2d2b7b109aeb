"""Status of an IKE_SA and its CHILD_SAs, as `meshsec status` and the metrics show it.
Pure module: no I/O, no key material in the output.
"""
from __future__ import annotations

__all__ = ["ike_sa_status"]


def ike_sa_status(sa) -> dict:
    """JSON-ready summary of IkeSa ``sa`` (no keys). ``created`` (IKE_SA_INIT started or received) and
    ``established`` (IKE_AUTH done, RFC 7296 §1.2; None before) are seconds on the ``now``
    clock the caller passes in, so ``established - created`` is the handshake time."""
    return {
        "peer": sa.peer_name,
        "spi_i": f"{sa.spi_i:016x}",
        "spi_r": f"{sa.spi_r:016x}",
        "initiator": sa.initiator,
        "state": sa.state,
        "local": f"{sa.local[0]}:{sa.local[1]}",
        "remote": f"{sa.remote[0]}:{sa.remote[1]}",
        "algorithms": sa.algorithms,
        "key_exchanges": sa._ike_prop.key_exchanges() if sa._ike_prop else "",
        "nat": {"local": sa.nat.local, "remote": sa.nat.remote},
        "created": sa.created_at,
        "established": sa.established_at,
        "children": [{
            "inbound_spi": f"{c.inbound_spi:08x}", "outbound_spi": f"{c.outbound_spi:08x}",
            "mode": c.mode, "protocol": c.protocol, "udp_encap": c.udp_encap,
            "algorithms": c.proposal.describe(),
            "local_ts": [str(n) for n in c.local_ts], "remote_ts": [str(n) for n in c.remote_ts],
            "established": c.established_at,
        } for c in sa.children],
    }
