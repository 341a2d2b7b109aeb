"""Validation of one peer's policy data before the IKE core uses it (sans-I/O).

Every value of a PeerPolicy that later reaches a parser or the ESP core is
checked here, so IkeManager can refuse one peer with a clear reason instead
of raising out of ``initiate`` or half-way through IKE_AUTH (RFC 7296 §1.2:
the CHILD_SA parameters must be usable before IKE_AUTH completes).
Pure module: no I/O.
"""
from __future__ import annotations

import ipaddress

from agent.esp.replay import check_replay_window
from agent.ike import child as ch
from agent.ike.proposals import ProposalError, parse_ike_proposal
from agent.model import Peer


def ike_proposal_problem(s: str) -> str | None:
    """None if the IKE proposal string parses, else the parser's message."""
    try:
        parse_ike_proposal(s)
    except (ProposalError, ValueError, TypeError) as e:
        return str(e)
    return None


def policy_problem(peer: Peer) -> str | None:
    """None if ``peer``'s policy is usable, else one line naming the peer, the field and
    the bad value, and what to do. Never raises."""
    pol = peer.policy
    try:
        if not pol.ike_proposals:
            return f"peer {peer.name!r}: ike_proposals is empty; give at least one (e.g. aes128gcm16-prfsha256-x25519)"
        for s in pol.ike_proposals:
            err = ike_proposal_problem(s)
            if err:
                return f"peer {peer.name!r}: bad ike_proposals entry {s!r}: {err}"
        for kind in ch.kinds(pol):
            try:
                ch.offers(pol, kind)
            except (ProposalError, ValueError, TypeError) as e:
                return f"peer {peer.name!r}: bad esp_proposals: {e}"
        try:
            check_replay_window(pol.replay_window, getattr(pol, "allow_no_replay", False))
        except ValueError as e:
            return f"peer {peer.name!r}: {e}"
        if pol.mode not in ("tunnel", "transport"):
            return f"peer {peer.name!r}: mode {pol.mode!r} is not tunnel or transport"
        if getattr(pol, "protocol", "esp") not in ("esp", "ah", "ah+esp"):
            return f"peer {peer.name!r}: protocol {pol.protocol!r} is not esp, ah or ah+esp"
        for v in getattr(pol, "request_virtual_ip", ()) or ():
            if v not in (4, 6):
                return f"peer {peer.name!r}: request_virtual_ip {v!r} is not 4 or 6"
        pool = getattr(pol, "virtual_ip_pool", None)
        if pool:
            for c in str(pool).split(","):
                if c.strip():
                    try:
                        ipaddress.ip_network(c.strip(), strict=True)
                    except ValueError as e:
                        return f"peer {peer.name!r}: virtual_ip_pool {c.strip()!r} is not a network: {e}"
        fs = getattr(pol, "fragment_size", 1280)
        if isinstance(fs, bool) or not isinstance(fs, int) or fs < 576:
            return f"peer {peer.name!r}: fragment_size {fs!r} must be an integer of at least 576 octets"
        for name in ("ike_lifetime_s", "child_lifetime_s", "dpd_interval_s"):
            v = getattr(pol, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or v != v:
                return f"peer {peer.name!r}: {name} {v!r} must be a number of seconds >= 0"
    except Exception as e:  # a policy object of the wrong shape: still a refusal, not a crash
        return f"peer {peer.name!r}: unusable policy ({type(e).__name__}: {e})"
    return None


__all__ = ["policy_problem", "ike_proposal_problem"]
