"""The agent's internal model of its node, its peers and their policy.

Both sources of configuration map onto these types: the controller's Watch
view (agent.control) and the standalone YAML file (agent.config). The IKE
core, the ESP core and the datapath read only these types.

Pure module: no I/O. Key material never appears in a ``repr``.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# one list for agent and controller (meshsec.defaults); re-exported here
from meshsec.defaults import DEFAULT_ESP_PROPOSALS, DEFAULT_IKE_PROPOSALS  # noqa: E402,F401


@dataclass(frozen=True)
class Credentials:
    """How this node proves its identity (RFC 7296 §2.15).

    Either certificate authentication (``private_key_pem`` +
    ``certificate_chain`` leaf first, DER + ``ca_certificates`` DER, the trust
    anchors for peers) or a pre-shared key (``psk``), never both.
    """

    private_key_pem: bytes | None = field(default=None, repr=False)
    certificate_chain: tuple[bytes, ...] = field(default=(), repr=False)
    ca_certificates: tuple[bytes, ...] = field(default=(), repr=False)
    psk: bytes | None = field(default=None, repr=False)

    @property
    def uses_certificates(self) -> bool:
        return self.private_key_pem is not None

    def __post_init__(self) -> None:
        if self.uses_certificates == (self.psk is not None):
            raise ValueError("credentials: give either a private key with a certificate, or a psk")
        if self.uses_certificates and not self.certificate_chain:
            raise ValueError("credentials: a private key needs its certificate")


@dataclass(frozen=True)
class PeerPolicy:
    """How traffic between this node and one peer is handled (RFC 4301 §4.4.1).

    ``action`` PROTECT uses ``protocol`` (esp, ah, or ah+esp: ESP first,
    then AH) in ``mode`` (tunnel or transport), ESP carried in UDP 4500
    (``encapsulation`` udp, RFC 3948) or as raw IP protocol 50/51 (none).
    BYPASS sends in the clear, DISCARD drops. Lifetimes in seconds (0: no
    rekey); ``replay_window`` in packets; ``fragment_size`` in octets (IP packet). ``rule`` names the controller
    policy rule that decided it.
    """

    mode: Literal["tunnel", "transport"] = "tunnel"
    # "ah+esp": ESP applied first, then AH (RFC 4301 §4.5)
    protocol: Literal["esp", "ah", "ah+esp"] = "esp"
    encapsulation: Literal["udp", "none"] = "udp"
    ike_proposals: tuple[str, ...] = DEFAULT_IKE_PROPOSALS
    esp_proposals: tuple[str, ...] = DEFAULT_ESP_PROPOSALS
    ike_lifetime_s: float = 4 * 3600.0
    child_lifetime_s: float = 3600.0
    dpd_interval_s: float = 30.0
    replay_window: int = 1024
    # what the SPD does with traffic between us and this peer (RFC 4301 §4.4.1):
    # PROTECT with the SAs above, BYPASS in the clear, or DISCARD
    action: Literal["protect", "bypass", "discard"] = "protect"
    # the controller policy rule this came from, shown by `meshsec status`
    rule: str = ""
    # replay_window 0 (anti-replay off, RFC 4303 §3.4.3) is refused unless this
    # says so explicitly (agent.esp.replay.check_replay_window)
    allow_no_replay: bool = False
    # Configuration payload (RFC 7296 §3.15, RFC 4301 case 4). A remote host asks its
    # gateway for an inner address: IP versions to request, e.g. (4,) or (4, 6); its
    # TSi becomes that address. A gateway hands out addresses to this peer from
    # ``virtual_ip_pool``: one CIDR or several comma-separated ("10.99.0.0/24,fd99::/120");
    # peers naming the same pool string share it; each identity keeps a stable address.
    request_virtual_ip: tuple[int, ...] = ()
    virtual_ip_pool: str | None = None
    # RFC 7383: IP packet octets above which our encrypted IKE messages to this peer are
    # sent as SKF fragments (as strongSwan's charon.fragment_size)
    fragment_size: int = 1280
    # PAD endpoint binding: refuse this peer, even authenticated, when its IKE packets come
    # from an address that is not one of ``Peer.endpoints`` and no NAT was detected
    # (NAT-D, RFC 7296 §2.23). Off by default: a NAT legitimately changes the address.
    bind_endpoints: bool = False
    # CHILD_SA lifetimes in volume (RFC 4301 §4.4.2.1), per SA direction, 0 = no limit:
    # inner octets (the SA's bytes_in/bytes_out) and packets. Soft limit (rekey) at 90 %,
    # hard limit (the SA refuses further packets and is deleted through IKE) at 100 %.
    child_lifetime_bytes: int = 0
    child_lifetime_packets: int = 0
    # IKE request retransmissions (RFC 7296 §2.1, agent.ike.retransmit): first wait in seconds,
    # factor between waits, retransmissions before "peer did not respond"; an initiator's
    # IKE_SA_INIT first retransmits after init_retransmit_timeout_s, doubling (0: no quick phase)
    retransmit_timeout_s: float = 1.0
    retransmit_base: float = 2.0
    retransmit_tries: int = 5
    init_retransmit_timeout_s: float = 0.1


@dataclass(frozen=True)
class Peer:
    """One remote node.

    ``identity`` is the IKE identity we require (ID_FQDN, equal to the
    node name and to a dNSName SAN of its certificate). ``endpoints`` are
    underlay IP addresses (first is tried first); ``subnets`` the networks
    it protects (the remote TSr we propose / accept).
    ``psk`` overrides Credentials.psk for this peer (standalone mode).
    """

    name: str
    identity: str
    endpoints: tuple[str, ...]
    subnets: tuple[IPNetwork, ...]
    policy: PeerPolicy = PeerPolicy()
    ike_port: int = 500
    psk: bytes | None = field(default=None, repr=False)
    initiate: bool = True
    # ``initiate: false`` written by the operator (standalone config): we never open an IKE_SA
    # to this peer at start-up (IkeManager.join), as for a gateway that only answers; traffic
    # (acquire) and recovery after the peer restarted still do
    responder_only: bool = False


@dataclass(frozen=True)
class NodeView:
    """Everything one agent needs: itself, its peers, a version.

    ``version`` increases with every change the controller makes to this
    view; standalone configurations use 0.
    """

    name: str
    identity: str
    subnets: tuple[IPNetwork, ...]
    peers: tuple[Peer, ...]
    local_address: str | None = None
    version: int = 0
    # serial numbers of revoked peer certificates (not yet expired), from the controller
    revoked_serials: frozenset[int] = frozenset()

    def peer(self, name: str) -> Peer | None:
        for p in self.peers:
            if p.name == name:
                return p
        return None


@dataclass(frozen=True)
class EspKeys:
    """Keys and parameters of one direction of a CHILD_SA (RFC 7296 §2.17).

    ``encr_id`` / ``integ_id`` are IANA values (agent.iana.EncrId /
    IntegId; integ_id 0 for AEAD). ``encr_key`` includes the salt that
    AEAD transforms take from KEYMAT (RFC 4106 §8.1: 4 bytes, RFC 7634 §2:
    4 bytes). ``spi`` is the SPI the *receiver* of this direction chose.
    """

    spi: int
    encr_id: int
    encr_key: bytes = field(repr=False)
    integ_id: int = 0
    integ_key: bytes = field(default=b"", repr=False)
    esn: bool = False
