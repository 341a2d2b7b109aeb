"""What one batch of the packet path produced: packets to send or write, and
requests for the IKE side. ``inside`` and ``outside`` fill a ``Batch``; the
loop (``runtime``) sends it and hands the requests to IKE after the batch, so
neither packet side calls IKE in the middle of a batch.
"""
from __future__ import annotations


class Batch:
    """One batch's output (lists are appended to; the loop drains them).

    To send / write:
      ``udp4500``: [(ESP bytes, (ip, port))] for the UDP 4500 socket (RFC 3948);
      ``udp4500_to``: the remotes of ``udp4500`` (for NAT keepalive bookkeeping);
      ``raw_esp``: [(ESP bytes, (ip, 0))] for the raw IP protocol 50 socket;
      ``raw_ah``: [(whole IP packet, (ip, 0))] for the raw IP protocol 51 socket;
      ``tun``: inner packets for the TUN device;
      ``icmp``: ICMP too-big / Packet Too Big for the TUN device (RFC 4301 §8.2.1).
    Requests:
      ``acquire``: {peer: packets without an SA} (RFC 4301 §5.1), and {(peer, local network,
      remote network): packets} for a peer that has CHILD_SAs, none for this SPD entry's pair;
      ``waiting``: {acquire key: [the packets counted in ``acquire``]} (held, see hold.py);
      ``volume``: [(ChildEntry, SA)] whose SA set ``needs_rekey`` (sequence number or
      byte/packet soft limit: rekey; hard limit, ``expired``: delete);
      ``unknown_spi``: [(SPI bytes, source address)] of ESP/AH with an SPI we do not know;
      ``ike``: [(IKE message, local (ip, port), remote (ip, port))] to hand to IKE;
      ``moved``: {inbound SPI: (ChildEntry, (ip, port))}: a UDP-encapsulated CHILD_SA authenticated ESP
      that came only from this address, not from its ``remote`` (a rebound NAT mapping);
      ``inbound_ike_sas``: {(IKE SPI i, IKE SPI r)} of CHILD_SAs that authenticated at
      least one inbound ESP/AH packet in this batch (traffic proves the peer alive).
    """

    __slots__ = ("udp4500", "udp4500_to", "raw_esp", "raw_ah", "tun", "icmp", "acquire", "waiting",
                 "volume", "unknown_spi", "ike", "inbound_ike_sas", "moved")

    def __init__(self) -> None:
        self.udp4500: list = []
        self.udp4500_to: set = set()
        self.raw_esp: list = []
        self.raw_ah: list = []
        self.tun: list = []
        self.icmp: list = []
        self.acquire: dict = {}
        self.waiting: dict = {}
        self.volume: list = []
        self.unknown_spi: list = []
        self.ike: list = []
        self.inbound_ike_sas: set = set()
        self.moved: dict = {}

    @property
    def requests(self) -> bool:
        """Whether anything here is for the IKE side."""
        return bool(self.acquire or self.volume or self.unknown_spi or self.ike or self.moved)
