"""CHILD_SA negotiation helpers: SA payloads, proposal choice, TS narrowing, KEYMAT split.

RFC 7296 §2.7 (proposal choice), §2.9 (traffic selector narrowing), §2.17
(KEYMAT). The single place where the IKE role (i/r) becomes the traffic
direction (inbound/outbound): :func:`split_keymat`. Pure module: no I/O.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from agent.iana import EsnId, KeId, ProtocolId, TransformAttr, TransformType, TsType
from agent.ike.errors import Mode, Protocol
from agent.ike.message import Proposal, SaPayload, TrafficSelector, Transform, TransformAttribute
from agent.ike.proposals import (EspProposal, IkeProposal, encr_key_len, integ_key_len, parse_ah_proposal,
                                 parse_child_proposal, parse_esp_proposal)
from agent.model import EspKeys, IPNetwork


ADD_KE_TYPES = frozenset(int(TransformType.ADDITIONAL_KEY_EXCHANGE_1) + i for i in range(7))


def add_ke_transforms(add_ke) -> list[Transform]:
    """Transforms of type ADDITIONAL_KEY_EXCHANGE_n (6..12) for ``add_ke`` (RFC 9370 §2.2.1)."""
    out = []
    for i, alts in enumerate(add_ke or ()):
        out += [Transform(int(TransformType.ADDITIONAL_KEY_EXCHANGE_1) + i, int(k)) for k in alts]
    return out


def choose_add_ke(ts: dict, mine) -> tuple[tuple[int, ...], ...] | None:
    """Pick one method per ADDITIONAL_KEY_EXCHANGE_n type (RFC 9370 §2.2.1).

    ``ts``: the peer proposal's transforms by type; ``mine``: our add_ke. A type absent
    on one side counts as NONE. Returns the chosen add_ke (``()`` for a type neither side
    has, ``(0,)`` for NONE the peer offered) or None when the proposals do not match.
    """
    chosen: list[tuple[int, ...]] = []
    mine = tuple(mine or ())
    for i in range(7):
        peer = [t.id for t in ts.get(int(TransformType.ADDITIONAL_KEY_EXCHANGE_1) + i, [])]
        ours = mine[i] if i < len(mine) else ()
        if not peer and not ours:
            chosen.append(())
        elif not peer:
            if KeId.NONE not in ours:
                return None  # we require it, the peer does not do it
            chosen.append(())
        elif not ours:
            if KeId.NONE not in peer:
                return None  # the peer requires one we do not do
            chosen.append((int(KeId.NONE),))
        else:
            common = [k for k in ours if k in peer]
            if not common:
                return None
            chosen.append((int(common[0]),))
    while chosen and not chosen[-1]:
        chosen.pop()
    return tuple(chosen)


def _encr_transform(encr: int, bits: int | None) -> Transform:
    attrs = (TransformAttribute(int(TransformAttr.KEY_LENGTH), bits),) if bits else ()
    return Transform(int(TransformType.ENCR), encr, attrs)


def ike_sa_payload(proposals: list[IkeProposal] | tuple[IkeProposal, ...], spi: int | None = None,
                   numbers: list[int] | None = None) -> SaPayload:
    """SA payload offering ``proposals`` in order (§3.3), numbered from 1.

    ``spi``: the sender's new IKE SPI (8 octets) for an IKE_SA rekey in CREATE_CHILD_SA (§1.3.2);
    None in IKE_SA_INIT (SPI size 0).
    """
    out = []
    spi_b = spi.to_bytes(8, "big") if spi is not None else b""
    for n, p in enumerate(proposals, 1):
        t = [_encr_transform(p.encr, p.encr_key_bits), Transform(int(TransformType.PRF), p.prf)]
        if p.integ:
            t.append(Transform(int(TransformType.INTEG), p.integ))
        t += [Transform(int(TransformType.KE), k) for k in p.ke]
        t += add_ke_transforms(p.add_ke)  # RFC 9370 §2.2.1
        out.append(Proposal(numbers[n - 1] if numbers else n, int(ProtocolId.IKE), spi_b, tuple(t)))
    return SaPayload(tuple(out))


def esp_sa_payload(proposals, spi: int, numbers: list[int] | None = None, *, ke: bool = False) -> SaPayload:
    """SA payload offering ESP/AH ``proposals`` with our inbound ``spi`` (4 octets).

    An AH proposal (``is_ah``) gets Protocol ID AH and no ENCR transform (§3.3).

    ``ke``: include the proposals' KE transforms (PFS in CREATE_CHILD_SA, §1.3.1);
    IKE_AUTH carries none (§1.2: the first CHILD_SA uses the IKE_SA_INIT key exchange).
    """
    out = []
    for i, p in enumerate(proposals):
        t = [] if p.is_ah else [_encr_transform(p.encr, p.encr_key_bits)]
        if p.integ:
            t.append(Transform(int(TransformType.INTEG), p.integ))
        if ke:
            t += [Transform(int(TransformType.KE), k) for k in p.ke]
            t += add_ke_transforms(getattr(p, "add_ke", ()))  # RFC 9370 §2.2.4
        t += [Transform(int(TransformType.ESN), e) for e in p.esn]
        out.append(Proposal(numbers[i] if numbers else i + 1, int(ProtocolId.AH if p.is_ah else ProtocolId.ESP),
                            spi.to_bytes(4, "big"), tuple(t)))
    return SaPayload(tuple(out))


def _by_type(p: Proposal) -> dict[int, list[Transform]]:
    d: dict[int, list[Transform]] = {}
    for t in p.transforms:
        d.setdefault(t.type, []).append(t)
    return d


def _has_encr(ts: dict[int, list[Transform]], encr: int, bits: int | None) -> bool:
    return any(t.id == encr and t.key_length == bits for t in ts.get(TransformType.ENCR, []))


def _has(ts: dict[int, list[Transform]], ttype: int, tid: int) -> bool:
    return any(t.id == tid for t in ts.get(ttype, []))


def _only_known_types(ts: dict[int, list[Transform]], allowed: set[int]) -> bool:
    return set(ts) <= allowed


@dataclass(frozen=True)
class IkeChoice:
    """The chosen IKE proposal (one transform of each type) and its proposal number."""
    proposal: IkeProposal
    number: int


def choose_ike(offered: SaPayload, ours: list[IkeProposal], ke_hint: int | None, *,
               allow_add_ke: bool = True) -> tuple[IkeChoice, list[int]] | None:
    """Pick our most preferred proposal the peer also offers (§2.7).

    Returns (choice, acceptable KE methods) or None (NO_PROPOSAL_CHOSEN). The KE
    method is ``ke_hint`` (the peer's KE payload) when acceptable, else our first.
    """
    allowed = {TransformType.ENCR, TransformType.PRF, TransformType.INTEG, TransformType.KE} | ADD_KE_TYPES
    # ``allow_add_ke`` False: the initiator did not announce INTERMEDIATE_EXCHANGE_SUPPORTED, so
    # only proposals whose additional key exchanges are all NONE can be chosen (RFC 9370 §2.2.1)
    for mine in ours:
        for prop in offered.proposals:
            if prop.protocol != ProtocolId.IKE or prop.spi not in (b"",) and len(prop.spi) != 8:
                continue
            ts = _by_type(prop)
            if not _only_known_types(ts, allowed):
                continue
            if not _has_encr(ts, mine.encr, mine.encr_key_bits) or not _has(ts, TransformType.PRF, mine.prf):
                continue
            if mine.integ and not _has(ts, TransformType.INTEG, mine.integ):
                continue
            if not mine.integ and any(t.id != 0 for t in ts.get(TransformType.INTEG, [])):
                continue
            kes = [k for k in mine.ke if _has(ts, TransformType.KE, k)]
            if not kes:
                continue
            ke = ke_hint if ke_hint in kes else kes[0]
            add = choose_add_ke(ts, mine.add_ke)
            if add is None or (not allow_add_ke and any(a and a[0] for a in add)):
                continue
            chosen = IkeProposal(mine.encr, mine.encr_key_bits, mine.integ, mine.prf, (ke,), add)
            return IkeChoice(chosen, prop.number), kes
    return None


def accepted_ike(response: SaPayload, ours: list[IkeProposal]) -> IkeProposal | None:
    """Check the responder's SA (one proposal, one transform per type) is one we offered."""
    if len(response.proposals) != 1:
        return None
    ts = _by_type(response.proposals[0])
    if any(len(v) != 1 for v in ts.values()):
        return None
    res = choose_ike(response, ours, None)
    return res[0].proposal if res else None


@dataclass(frozen=True)
class EspChoice:
    proposal: EspProposal  # one ESN value
    number: int
    peer_spi: int


def choose_esp(offered: SaPayload, ours: list[EspProposal], *, pfs: bool = False,
               ke_hint: int | None = None) -> EspChoice | None:
    """Our most preferred ESP proposal the peer offers (§2.7); None: NO_PROPOSAL_CHOSEN.

    ``pfs``: CREATE_CHILD_SA, where KE transforms count (§1.3.1): a proposal of ours with KE
    methods needs one the peer offers (``ke_hint``, the group of the peer's KE payload, is
    preferred); one without needs a peer proposal without KE (or KE NONE). Without ``pfs``
    (IKE_AUTH) KE transforms are ignored and the result has ``ke == ()``.
    AH proposals of ours (``is_ah``) match only Protocol ID AH proposals without any ENCR
    transform and with our INTEG (§3.3: AH's mandatory type is INTEG; an ENCR there makes
    the proposal unacceptable, §3.3.6).
    """
    allowed = {TransformType.ENCR, TransformType.INTEG, TransformType.ESN, TransformType.KE} | ADD_KE_TYPES
    allowed_ah = {TransformType.INTEG, TransformType.ESN, TransformType.KE}
    for mine in ours:
        for prop in offered.proposals:
            want = ProtocolId.AH if mine.is_ah else ProtocolId.ESP
            if prop.protocol != want or len(prop.spi) != 4:
                continue
            ts = _by_type(prop)
            if not _only_known_types(ts, allowed_ah if mine.is_ah else allowed):
                continue
            if mine.is_ah:
                if not mine.integ or not _has(ts, TransformType.INTEG, mine.integ):
                    continue
            elif not _has_encr(ts, mine.encr, mine.encr_key_bits):
                continue
            if mine.integ and not _has(ts, TransformType.INTEG, mine.integ):
                continue
            if not mine.integ and any(t.id != 0 for t in ts.get(TransformType.INTEG, [])):
                continue
            # absent ESN transform means NO_ESN
            peer_esn = [t.id for t in ts.get(TransformType.ESN, [])] or [int(EsnId.NO_ESN)]
            esn = [e for e in mine.esn if e in peer_esn]
            if not esn:
                continue
            spi = int.from_bytes(prop.spi, "big")
            if spi == 0:
                continue
            ke: tuple[int, ...] = ()
            if pfs:
                peer_ke = [t.id for t in ts.get(TransformType.KE, []) if t.id != 0]
                if mine.ke:
                    common = [k for k in mine.ke if k in peer_ke]
                    if not common:
                        continue
                    ke = (ke_hint if ke_hint in common else common[0],)
                elif peer_ke and not any(t.id == 0 for t in ts.get(TransformType.KE, [])):
                    continue
            add: tuple = ()
            if pfs:  # RFC 9370 §2.2.4; IKE_AUTH ignores additional key exchanges like KE
                add = choose_add_ke(ts, getattr(mine, "add_ke", ()))
                if add is None:
                    continue
            chosen = EspProposal(mine.encr, mine.encr_key_bits, mine.integ, (esn[0],), ke, add)
            return EspChoice(chosen, prop.number, spi)
    return None


def accepted_esp(response: SaPayload, ours: list[EspProposal], *, pfs: bool = False) -> EspChoice | None:
    """Check the responder's ESP SA: one proposal, one transform per type, one we offered."""
    if len(response.proposals) != 1:
        return None
    ts = _by_type(response.proposals[0])
    if any(len(v) != 1 for v in ts.values()):
        return None
    return choose_esp(response, ours, pfs=pfs)


# ------------------------------------------------------------------ traffic selectors

def ts_from_networks(nets) -> tuple[TrafficSelector, ...]:
    return tuple(TrafficSelector.from_network(n) for n in nets)


def networks_of(selectors) -> list[IPNetwork]:
    """CIDR blocks covered by the selectors (ports and protocol ignored: whole-subnet policy)."""
    out: list[IPNetwork] = []
    for s in selectors:
        out.extend(s.networks())
    return out


def narrow(proposed: list[IPNetwork], allowed: tuple[IPNetwork, ...] | list[IPNetwork]) -> list[IPNetwork]:
    """Intersection of the proposed and the allowed networks (§2.9 narrowing)."""
    out: list[IPNetwork] = []
    for p in proposed:
        for a in allowed:
            if p.version != a.version or not p.overlaps(a):
                continue
            out.append(p if p.subnet_of(a) else a)
    # de-duplicate, keep order
    seen = []
    for n in out:
        if n not in seen:
            seen.append(n)
    return seen


_FULL_PORTS = (0, 65535)
_OPAQUE_PORTS = (65535, 0)  # §3.13.1: start 65535, end 0 = OPAQUE ports


def _port_meet(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int] | None:
    if a == _FULL_PORTS:
        return b
    if b == _FULL_PORTS:
        return a
    if a == _OPAQUE_PORTS or b == _OPAQUE_PORTS:
        return _OPAQUE_PORTS if a == b else None
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo <= hi else None


def ts_intersect(a: TrafficSelector, b: TrafficSelector) -> TrafficSelector | None:
    """The selector both ``a`` and ``b`` cover (§2.9), or None when they share nothing.

    Intersects the IP protocol (0 = any), the port range (0-65535 = any; OPAQUE
    65535-0 meets only itself or any) and the address range. Only TS_IPV4_ADDR_RANGE
    and TS_IPV6_ADDR_RANGE selectors of the same type meet; other types never do.
    """
    if a.ts_type != b.ts_type or a.ts_type not in (TsType.TS_IPV4_ADDR_RANGE, TsType.TS_IPV6_ADDR_RANGE):
        return None
    if a.ip_protocol and b.ip_protocol and a.ip_protocol != b.ip_protocol:
        return None
    ports = _port_meet((a.start_port, a.end_port), (b.start_port, b.end_port))
    if ports is None:
        return None
    n = len(a.start_addr)
    if len(b.start_addr) != n or len(a.end_addr) != n or len(b.end_addr) != n:
        return None
    lo = max(int.from_bytes(a.start_addr, "big"), int.from_bytes(b.start_addr, "big"))
    hi = min(int.from_bytes(a.end_addr, "big"), int.from_bytes(b.end_addr, "big"))
    if lo > hi:
        return None
    return TrafficSelector(a.ts_type, a.ip_protocol or b.ip_protocol, ports[0], ports[1],
                           lo.to_bytes(n, "big"), hi.to_bytes(n, "big"))


def narrow_ts(proposed, allowed) -> list[TrafficSelector]:
    """Responder narrowing (§2.9): every non-empty intersection of a proposed selector with an
    allowed one, in the proposer's order, without duplicates. Empty list: TS_UNACCEPTABLE."""
    out: list[TrafficSelector] = []
    for p in proposed:
        for a in allowed:
            x = ts_intersect(p, a)
            if x is not None and x not in out:
                out.append(x)
    return out


def ts_within(selectors, allowed) -> bool:
    """Every selector lies inside one allowed selector (protocol, ports and addresses):
    the initiator's check that the responder did not widen what it proposed (§2.9)."""
    return all(any(ts_intersect(s, a) == s for a in allowed) for s in selectors)


def within(nets: list[IPNetwork], allowed) -> bool:
    """Every network in ``nets`` lies inside one of ``allowed``."""
    return all(any(n.version == a.version and n.subnet_of(a) for a in allowed) for n in nets)


# ------------------------------------------------------------------ KEYMAT

def split_keymat(keymat: bytes, prop: EspProposal, *, initiator: bool,
                 our_spi: int, peer_spi: int) -> tuple[EspKeys, EspKeys]:
    """KEYMAT (§2.17) -> (inbound, outbound) EspKeys.

    Order in KEYMAT: encr i->r, integ i->r, encr r->i, integ r->i (AEAD keys
    include the salt). Each direction's SPI is the one its receiver chose.
    """
    ek = 0 if prop.is_ah else encr_key_len(prop.encr, prop.encr_key_bits)  # AH: integrity keys only
    ak = integ_key_len(prop.integ) if prop.integ else 0
    if len(keymat) != 2 * (ek + ak):
        raise ValueError("KEYMAT length does not match the proposal")
    e_ir, a_ir = keymat[:ek], keymat[ek:ek + ak]
    e_ri, a_ri = keymat[ek + ak:2 * ek + ak], keymat[2 * ek + ak:]
    esn = bool(prop.esn and prop.esn[0] == EsnId.ESN)
    i_to_r_spi, r_to_i_spi = (peer_spi, our_spi) if initiator else (our_spi, peer_spi)
    i_to_r = EspKeys(i_to_r_spi, prop.encr, e_ir, prop.integ, a_ir, esn)
    r_to_i = EspKeys(r_to_i_spi, prop.encr, e_ri, prop.integ, a_ri, esn)
    return (r_to_i, i_to_r) if initiator else (i_to_r, r_to_i)


def keymat_len(prop: EspProposal) -> int:
    ek = 0 if prop.is_ah else encr_key_len(prop.encr, prop.encr_key_bits)
    ak = integ_key_len(prop.integ) if prop.integ else 0
    return 2 * (ek + ak)


# ------------------------------------------------------------------ AH / ESP per policy

DEFAULT_AH_PROPOSALS = ("sha256",)


def offers(policy, kind: str) -> list[EspProposal]:
    """Our CHILD_SA proposals of ``kind`` ("esp" or "ah") from ``policy.esp_proposals``.

    That list may mix ESP strings (with an encryption keyword) and AH strings
    (integrity only, e.g. ``sha256-esn``); AH falls back to ``sha256`` when the list
    has no AH string (the defaults are ESP only). Raises ProposalError on a bad string.
    """
    props = [parse_child_proposal(s) for s in policy.esp_proposals]
    if kind == "ah":
        return [p for p in props if p.is_ah] or [parse_ah_proposal(s) for s in DEFAULT_AH_PROPOSALS]
    return [p for p in props if not p.is_ah] or [parse_esp_proposal(s) for s in
                                                 ("aes128gcm16", "aes256gcm16")]


def kinds(policy) -> tuple[str, ...]:
    """The CHILD_SA kinds ``policy.protocol`` needs, the IKE_AUTH one first.

    "ah+esp" is two CHILD_SAs for the same traffic selectors (§3.3 allows one protocol
    per proposal): the ESP one (transport) in IKE_AUTH, the AH one in a CREATE_CHILD_SA
    right after; together they form the RFC 4301 §4.5 bundle ESP-then-AH.
    """
    proto = getattr(policy, "protocol", "esp")
    return {"ah": (Protocol.AH,), "ah+esp": (Protocol.ESP, Protocol.AH)}.get(proto, (Protocol.ESP,))


def acceptable(policy) -> list[EspProposal]:
    """Every proposal a responder accepts for this policy (all its kinds)."""
    return [p for k in kinds(policy) for p in offers(policy, k)]


def child_mode(policy, kind: str) -> Mode:
    """Mode of a CHILD_SA of ``kind``: in "ah+esp" the ESP SA is always transport."""
    if getattr(policy, "protocol", "esp") == "ah+esp" and kind == Protocol.ESP:
        return Mode.TRANSPORT
    return Mode(policy.mode)


@dataclass
class ChildSa:
    """One established CHILD_SA (ESP or AH: ``protocol``), as the IkeSa tracks it."""
    inbound_spi: int
    outbound_spi: int
    proposal: EspProposal
    local_ts: tuple[IPNetwork, ...]
    remote_ts: tuple[IPNetwork, ...]
    mode: Mode
    udp_encap: bool
    established_at: float
    inbound: EspKeys = field(repr=False)
    outbound: EspKeys = field(repr=False)
    # lifetimes (seconds on the ``now`` clock; None: none): soft -> rekey, hard -> delete
    rekey_at: float | None = None
    expire_at: float | None = None
    rekeyed: bool = False  # replaced by a rekey; waits for its DELETE
    virtual_ip: str | None = None
    # the negotiated selectors with IP protocol and ports (§2.9); () when whole networks
    local_selectors: tuple = ()
    remote_selectors: tuple = ()

    @property
    def protocol(self) -> Protocol:
        return Protocol.AH if self.proposal.is_ah else Protocol.ESP

    @property
    def protocol_id(self) -> int:
        return int(ProtocolId.AH if self.proposal.is_ah else ProtocolId.ESP)


__all__ = ["ike_sa_payload", "esp_sa_payload", "choose_ike", "accepted_ike", "choose_esp",
           "accepted_esp", "IkeChoice", "EspChoice", "ts_from_networks", "networks_of", "narrow", "narrow_ts",
           "ts_intersect", "ts_within",
           "within", "split_keymat", "keymat_len", "ChildSa", "offers", "kinds", "acceptable", "child_mode",
           "DEFAULT_AH_PROPOSALS"]
