"""What an IkeSa is made of: its configuration, the datagrams it sends, its states and
the request it waits on (RFC 7296 §2.1-2.3). Pure module: no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from agent.ike import fragment as frag
from agent.ike.errors import IkeSaState
from agent.ike.events import Addr
from agent.ike.retransmit import RetransmitSchedule
from agent.model import Credentials, Peer

RETRANSMIT_BASE_S = 1.0
RETRANSMIT_FACTOR = 2.0
RETRANSMIT_TRIES = 5
HALF_OPEN_TIMEOUT_S = 30.0  # responder waiting for IKE_AUTH
# an initiator's own retransmissions (1+2+4+8+16+32 s) end first; this only backs them up
INITIATOR_SETUP_FACTOR = 4.0


@dataclass(frozen=True)
class Datagram:
    """One UDP datagram to send; the sender adds the non-ESP marker when local[1] == 4500."""
    data: bytes = field(repr=False)
    local: Addr
    remote: Addr


class State:
    """IKE_SA states by their old short names (agent.ike.errors.IkeSaState members)."""
    INIT = IkeSaState.CONNECTING
    AUTH = IkeSaState.AUTHENTICATING
    ESTABLISHED = IkeSaState.ESTABLISHED
    DELETING = IkeSaState.DELETING
    DELETED = IkeSaState.DELETED


@dataclass
class IkeSaConfig:
    """What an IkeSa needs to know about us and whom it may talk to.

    ``peer``: the configured peer (initiator: always; responder: None until
    IKE_AUTH, then ``find_peer(IDi)``, the PAD lookup, decides).
    ``ike_proposals``: proposal strings we offer (initiator) or accept (responder).
    ``force_encap``: fake our NAT_DETECTION_SOURCE_IP (strongSwan encap=yes).
    """
    identity: str
    credentials: Credentials
    local_subnets: tuple
    ike_proposals: tuple[str, ...]
    peer: Peer | None = None
    find_peer: Callable[[str], Peer | None] = lambda _ident: None
    force_encap: bool = False
    initial_contact: bool = False
    # seconds to add to ``now`` (monotonic) to get Unix time, for certificate
    # validity; the shell measures it, the core never reads a clock
    wall_offset: Callable[[], float] = lambda: 0.0
    # gateway side of CP (§3.15): (peer, IP versions asked for) -> addresses, or None (pool exhausted)
    assign_vip: Callable[[Peer, tuple], list | None] = lambda _peer, _versions: None
    # RFC 7383: IP packet size above which encrypted messages are fragmented (strongSwan's default)
    fragment_size: int = frag.DEFAULT_FRAGMENT_SIZE
    # seconds a responder IKE_SA may stay un-ESTABLISHED (initiator: 4x that as a backstop)
    half_open_timeout_s: float = HALF_OPEN_TIMEOUT_S
    # PAD (RFC 4301 §4.4.3): serial numbers of revoked peer certificates
    revoked: Callable[[], frozenset] = lambda: frozenset()
    # (peer, CHILD_SA policy) -> None or the reason it is unusable; checked before IKE_AUTH completes
    policy_problem: Callable[[Peer], str | None] = lambda _peer: None
    # inbound CHILD_SA SPI allocator of the node (IkeManager: unique over every IKE_SA, RFC 4301
    # §4.1); None: drawn from rng by this IKE_SA alone
    new_child_spi: Callable[[], int] | None = None
    # request retransmissions (RFC 7296 §2.1) while ``peer`` is unknown; then the peer policy's
    retransmit: RetransmitSchedule = field(default_factory=RetransmitSchedule)


@dataclass
class Pending:
    """Our outstanding request (window size 1, §2.3) and its retransmission state."""
    message_id: int
    exchange: int
    data: bytes
    sent_at: float
    deadline: float
    tries: int
    on_response: Callable
    max_tries: int = RETRANSMIT_TRIES



def new_ike_spi(rng) -> int:
    """A random non-zero IKE SPI (§3.1), 8 octets from ``rng``."""
    while True:
        spi = int.from_bytes(rng(8), "big")
        if spi:
            return spi


def new_child_spi(rng) -> int:
    """A random ESP/AH SPI, 4 octets from ``rng``; 1-255 are reserved (RFC 4303 §2.1)."""
    while True:
        spi = int.from_bytes(rng(4), "big")
        if spi >= 256:
            return spi


__all__ = ["new_ike_spi", "new_child_spi", "IkeSaConfig", "Datagram", "State", "Pending", "HALF_OPEN_TIMEOUT_S", "INITIATOR_SETUP_FACTOR",
           "RETRANSMIT_TRIES"]
