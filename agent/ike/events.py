"""Events the IKE core emits (past tense), drained by the runtime.

docs/design.md "agent.ike.manager.IkeManager". Frozen dataclasses; key
material never appears in a repr. Addresses are (ip: str, port: int).
Pure module: no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from agent.ike.errors import DeleteReason
from agent.model import EspKeys, IPNetwork

Addr = tuple[str, int]


@dataclass(frozen=True)
class IkeSaEstablished:
    """IKE_AUTH completed: the IKE_SA is authenticated (RFC 7296 §1.2)."""
    peer: str
    spi_i: int
    spi_r: int
    initiator: bool
    local: Addr
    remote: Addr
    algorithms: str


@dataclass(frozen=True)
class IkeKeysDerived:
    """SK_e / SK_a of a new IKE_SA, for Wireshark's ikev2_decryption_table (key log only).

    ``encr_wireshark`` / ``integ_wireshark`` are Wireshark's UAT names (None:
    Wireshark cannot decrypt that algorithm).
    """
    spi_i: int
    spi_r: int
    sk_ei: bytes = field(repr=False)
    sk_er: bytes = field(repr=False)
    sk_ai: bytes = field(repr=False)
    sk_ar: bytes = field(repr=False)
    encr_wireshark: str | None = None
    integ_wireshark: str | None = None


@dataclass(frozen=True)
class ChildSaEstablished:
    """A CHILD_SA is ready: install ``inbound`` / ``outbound`` in the SAD (RFC 7296 §2.17).

    ``local_ts`` / ``remote_ts`` are the narrowed traffic selectors as networks;
    ``rekey_of`` is the inbound SPI of the CHILD_SA this one replaces, if any
    (§1.3.3: keep the old inbound SA until its ChildSaDeleted, send on the new one).
    ``virtual_ip``: the address the gateway assigned us by CP(CFG_REPLY) (§3.15), our
    side of ``local_ts``; None without a configuration payload.
    ``protocol``: "esp" (RFC 4303) or "ah" (RFC 4302; the keys then carry integrity only,
    ``encr_id`` 0), the Protocol ID of the chosen proposal (RFC 7296 §3.3.1).
    ``local_selectors`` / ``remote_selectors``: the narrowed selectors with IP protocol and
    port ranges (agent.ike.message.TrafficSelector, §2.9); ``local_ts`` / ``remote_ts``
    cover their addresses. Protocol 0 with ports 0-65535 means whole networks.
    ``exchange_initiator``: we started the CREATE_CHILD_SA (or IKE_AUTH) that made it. The
    responder of a rekey sends on the new SA only once the old one is deleted: the initiator
    installs the new SA before it deletes the old one, so nothing arrives before it can be read.
    """
    peer: str
    ike_spi_i: int
    ike_spi_r: int
    inbound: EspKeys
    outbound: EspKeys
    local_ts: tuple[IPNetwork, ...]
    remote_ts: tuple[IPNetwork, ...]
    mode: str
    udp_encap: bool
    local: Addr
    remote: Addr
    algorithms: str
    rekey_of: int | None = None
    virtual_ip: str | None = None
    protocol: str = "esp"
    local_selectors: tuple = ()
    remote_selectors: tuple = ()
    exchange_initiator: bool = True


@dataclass(frozen=True)
class ChildSaDeleted:
    """A CHILD_SA is gone: remove both SPIs from the SAD."""
    peer: str
    inbound_spi: int
    outbound_spi: int
    reason: str


@dataclass(frozen=True)
class IkeSaDeleted:
    """An IKE_SA is gone (deleted, failed or replaced). ``peer`` may be "" if never authenticated.

    ``rekeyed_to``: (SPIi, SPIr) of the IKE_SA that replaced this one (§1.3.2); its
    CHILD_SAs moved there and stay installed. None when the CHILD_SAs went with it.
    """
    peer: str
    spi_i: int
    spi_r: int
    reason: str
    rekeyed_to: tuple[int, int] | None = None
    # what the manager decides re-initiation by (agent.ike.errors.DeleteReason); ``reason``
    # is for people and logs
    kind: DeleteReason = DeleteReason.PROTOCOL_ERROR


@dataclass(frozen=True)
class PeerAddressChanged:
    """The peer, behind a NAT, now sends from ``remote`` (ip, port): its NAT mapping changed.
    IKE messages of this IKE_SA go there from now on (RFC 7296 §2.23); move the UDP
    encapsulation endpoint (RFC 3948) of its CHILD_SAs there too. Emitted only after a
    message from the new address authenticated (ICV verified)."""
    peer: str
    ike_spi_i: int
    ike_spi_r: int
    remote: Addr


@dataclass(frozen=True)
class PeerRefused:
    """The manager will not negotiate with ``peer`` because of its policy data (e.g. a proposal
    string that does not parse, a replay window the ESP core rejects). ``reason`` names the
    peer and the bad value; other peers are unaffected. Fix the policy and push a new view."""
    peer: str
    reason: str


@dataclass(frozen=True)
class ChildSaRefused:
    """A CHILD_SA was not created; the IKE_SA stays (RFC 7296 §1.2, §2.21.2).

    ``by``: "peer" (the peer answered our IKE_AUTH / CREATE_CHILD_SA request with an error
    notify, or its answer was unacceptable to us) or "us" (we refused the peer's request as
    responder). ``notify``: the error Notify Message Type sent or received (agent.iana.NotifyType),
    None when the refusal had no notify. ``offered``: what the refused request offered
    (proposals and traffic selectors, for the log). ``retry_in_s``: seconds until we try the
    CHILD_SA again with CREATE_CHILD_SA (exponential backoff), None when we do not retry.
    """
    peer: str
    ike_spi_i: int
    ike_spi_r: int
    by: str
    reason: str
    notify: int | None = None
    offered: str = ""
    retry_in_s: float | None = None


@dataclass(frozen=True)
class InitsRefused:
    """IKE_SA_INIT requests refused statelessly (RFC 7296 §1.2, §2.6) since the last such event:
    ``counts`` by reason (the suffix of the ``init_refused_<reason>`` counters), over
    ``since``..``until`` (the ``now`` clock). At most one per ``REFUSAL_SUMMARY_S`` (10 s), so a
    flood of refused requests makes one log line per interval, not one per datagram. ``last``:
    the source address of the last one, ``detail`` why it was refused (e.g. the hybrid hint)."""
    counts: dict = field(hash=False, compare=True)
    since: float
    until: float
    last: Addr
    detail: str = ""


@dataclass(frozen=True)
class HalfOpenDropped:
    """Responder IKE_SAs that never got past IKE_SA_INIT (no IKE_AUTH, no peer known) dropped since
    the last such event: ``counts`` by agent.ike.errors.DeleteReason ("dropped": evicted under
    load, "setup_timeout": no IKE_AUTH in time), over ``since``..``until``. Instead of one
    IkeSaDeleted each (one log line per attacker datagram under a COOKIE-answering flood); at
    most one per ``REFUSAL_SUMMARY_S`` (10 s). ``last``: the last one's source address,
    ``detail`` its reason text. Totals: counters ``half_open_dropped_<kind>``."""
    counts: dict = field(hash=False, compare=True)
    since: float
    until: float
    last: Addr
    detail: str = ""


Event = Union[IkeSaEstablished, IkeKeysDerived, ChildSaEstablished, ChildSaDeleted, IkeSaDeleted, PeerRefused,
              PeerAddressChanged, ChildSaRefused, InitsRefused, HalfOpenDropped]

__all__ = ["Addr", "Event", "IkeSaEstablished", "IkeKeysDerived", "ChildSaEstablished",
           "ChildSaDeleted", "IkeSaDeleted", "PeerRefused", "PeerAddressChanged", "ChildSaRefused",
           "InitsRefused", "HalfOpenDropped"]
