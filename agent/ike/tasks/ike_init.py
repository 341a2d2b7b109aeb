"""IKE_SA_INIT task (RFC 7296 §1.2, §2.6, §2.10, §2.23), NAT detection included.

Initiator: HDR, SA, KEi, Ni, N(NAT_DETECTION_SOURCE_IP), N(NAT_DETECTION_DESTINATION_IP),
[N(SIGNATURE_HASH_ALGORITHMS)], N(IKEV2_FRAGMENTATION_SUPPORTED),
[N(INTERMEDIATE_EXCHANGE_SUPPORTED)] -->; a COOKIE (§2.6) or INVALID_KE_PAYLOAD (§1.2)
answer restarts the exchange (at most MAX_INIT_RETRIES times).
Responder: <-- HDR, SA, KEr, Nr, N(NAT_DETECTION_*), [CERTREQ], [N(...)], or a stateless
<-- HDR, N(error) with SPIr 0 (the task raises RemoteProtocolError with the notify).
Failures raise agent.ike.errors.LocalProtocolError (the peer refused us) or
RemoteProtocolError (the peer's message is wrong); the IkeSa ends with them.

The task holds the exchange's own nonce, KE and cookie; when the exchange completes it
hands the IKE_SA its nonces, the two messages (for AUTH, §2.15) and SK_* (§2.14).

Pure module: no I/O.
"""
from __future__ import annotations

import struct
from dataclasses import replace

from agent.iana import CertEncoding, ExchangeType, KeId, NotifyType, PayloadType
from agent.ike import auth
from agent.ike import child as ch
from agent.ike import natt
from agent.ike.crypto import KeyExchange, KeyExchangeError, derive_ike_keys, ike_key_lengths, nonce_ok
from agent.ike.errors import IkeSaState, LocalProtocolError, RemoteProtocolError, notify_name
from agent.ike.message import (CertReqPayload, KePayload, Message, NoncePayload, NotifyPayload, Proposal, SaPayload,
                               encode_message)
from agent.ike.proposals import ProposalError
from agent.ike.tasks.ike_intermediate import announces_intermediate

NONCE_LEN = 32
MAX_INIT_RETRIES = 3  # INVALID_KE_PAYLOAD / COOKIE round trips


def certreq_payload(credentials) -> CertReqPayload:
    """CERTREQ naming our trust anchors by SHA-1 of their SPKI (§3.7)."""
    return CertReqPayload(int(CertEncoding.X509_CERTIFICATE_SIGNATURE),
                          b"".join(auth.certreq_hash(c) for c in credentials.ca_certificates))


def _requires_add_ke(p) -> bool:
    return any(alts and KeId.NONE not in alts for alts in p.add_ke)


def hybrid_hint(offered_sa, ours) -> str:
    """Why NO_PROPOSAL_CHOSEN, when our policy lists only hybrid (RFC 9370) proposals."""
    if not ours or not all(_requires_add_ke(p) for p in ours):
        return ""
    if offered_sa is not None:  # responder: would a classical variant of ours have matched?
        if ch.choose_ike(offered_sa, [replace(p, add_ke=()) for p in ours], None) is None:
            return ""
        return (": the peer offers no additional key exchange (e.g. ML_KEM_768) and our policy lists only "
                "hybrid proposals; add a classical one (e.g. aes256gcm16-prfsha384-x25519) to allow a fallback")
    return (": we offered only hybrid proposals (additional key exchanges, e.g. ke1_mlkem768); a peer without "
            "RFC 9370 support (e.g. strongSwan 5.x) needs a classical one in our policy as a fallback")


class IkeInit:
    """The IKE_SA_INIT exchange of one IkeSa (see the module docstring)."""

    def __init__(self, sa) -> None:
        self.sa = sa
        self.ni = b""  # initiator: our nonce until the exchange completes
        self.ke: KeyExchange | None = None
        self.cookie: bytes | None = None
        self.retries = 0
        self._body: list | None = None  # a COOKIE retry repeats the same payloads (§2.6)

    # ------------------------------------------------------------ shared
    def _sig_hash_notify(self) -> list:
        if not self.sa.cfg.credentials.uses_certificates:
            return []
        # all we verify, IDENTITY included: without it a peer cannot sign with Ed25519 (RFC 8420 §2)
        data = b"".join(struct.pack("!H", h) for h in auth.SUPPORTED_HASH_ALGORITHMS)
        return [NotifyPayload(int(NotifyType.SIGNATURE_HASH_ALGORITHMS), data)]

    def note_peer_support(self, payloads) -> None:
        """What the peer announced: RFC 7383 fragmentation, RFC 7427 signature hash algorithms."""
        sa = self.sa
        sa._frag_peer = any(isinstance(p, NotifyPayload)
                            and p.notify_type == NotifyType.IKEV2_FRAGMENTATION_SUPPORTED for p in payloads)
        n = next((p for p in payloads if isinstance(p, NotifyPayload)
                  and p.notify_type == NotifyType.SIGNATURE_HASH_ALGORITHMS), None)
        if n is not None:
            sa._peer_sig_hashes = {struct.unpack_from("!H", n.data, i)[0] for i in range(0, len(n.data) - 1, 2)}

    def _derive(self, prop, g_ir: bytes) -> None:
        sa = self.sa
        ek, ak = ike_key_lengths(prop)
        sa._install_keys(prop, derive_ike_keys(prop.prf, sa._ni, sa._nr, g_ir, sa.spi_i, sa.spi_r, ek, ak))

    # ------------------------------------------------------------ initiator
    def start(self, now: float) -> None:
        """HDR, SA, KEi, Ni, N(NAT_DETECTION_*), ... -->."""
        sa = self.sa
        self.ni = sa.rng(NONCE_LEN)
        self._send(sa._ike_proposals()[0].ke[0], now)

    def _send(self, group: int, now: float) -> None:
        sa = self.sa
        if self._body is None or self.ke is None or self.ke.ke_id != group:
            # a COOKIE retry keeps the same KEi and NAT-D (§2.6: the same payloads, cookie first);
            # only INVALID_KE_PAYLOAD (another group) makes a new key exchange
            self.ke = KeyExchange(group, sa.rng)
            self._body = [
                ch.ike_sa_payload(sa._ike_proposals()), KePayload(group, self.ke.public_bytes()),
                NoncePayload(self.ni),
                *natt.nat_notifies(sa.spi_i, 0, sa.local, sa.remote, force_encap=sa.cfg.force_encap, rng=sa.rng),
                *self._sig_hash_notify(), NotifyPayload(int(NotifyType.IKEV2_FRAGMENTATION_SUPPORTED)),
                *sa.intermediate.announce()]
        payloads = []
        if self.cookie is not None:
            payloads.append(NotifyPayload(int(NotifyType.COOKIE), self.cookie))
        payloads += self._body
        data = encode_message(Message(sa.spi_i, 0, int(ExchangeType.IKE_SA_INIT), 0, True, False, tuple(payloads)))
        sa._init_request = data
        sa._send_first(data, self.process_response, now)

    def process_response(self, msg: Message, inner, now: float) -> None:
        """<-- HDR, SA, KEr, Nr, N(NAT_DETECTION_*), [CERTREQ]  (or N(error), N(COOKIE))."""
        sa = self.sa
        offered = sa._ike_proposals()
        ke_note = msg.notify(NotifyType.INVALID_KE_PAYLOAD)
        cookie = msg.notify(NotifyType.COOKIE)
        if ke_note is not None or cookie is not None:
            self.retries += 1
            if self.retries > MAX_INIT_RETRIES:
                raise LocalProtocolError("IKE_SA_INIT: too many INVALID_KE_PAYLOAD/COOKIE round trips")
            group = self.ke.ke_id
            if ke_note is not None:
                if len(ke_note.data) != 2:
                    raise RemoteProtocolError("INVALID_KE_PAYLOAD without a group")
                group = struct.unpack("!H", ke_note.data)[0]
                if not any(group in p.ke for p in offered) or group == self.ke.ke_id:
                    raise RemoteProtocolError(f"INVALID_KE_PAYLOAD names group {group} we did not offer")
            if cookie is not None:
                self.cookie = cookie.data
            self._send(group, now)  # HDR, [N(COOKIE),] SA, KEi(new group), Ni -->
            return
        errors = [n for n in msg.notifies() if n.is_error]
        if errors:
            raise LocalProtocolError(f"IKE_SA_INIT refused: {notify_name(errors[0].notify_type)}"
                                     + (hybrid_hint(None, offered)
                                        if errors[0].notify_type == NotifyType.NO_PROPOSAL_CHOSEN else ""),
                                     errors[0].notify_type)
        sa_p, ke, nr = msg.first(PayloadType.SA), msg.first(PayloadType.KE), msg.first(PayloadType.NONCE)
        if sa_p is None or ke is None or nr is None or msg.spi_r == 0:
            raise RemoteProtocolError("IKE_SA_INIT response lacks SA, KE or Nr")
        prop = ch.accepted_ike(sa_p, offered)
        if prop is None or prop.ke[0] != ke.group or ke.group != self.ke.ke_id:
            raise RemoteProtocolError("IKE_SA_INIT response: proposal or KE method we did not offer")
        if not nonce_ok(nr.data, prop.prf):  # §2.10: 16-256 octets, at least half the PRF key size
            raise RemoteProtocolError(f"IKE_SA_INIT response: bad nonce length {len(nr.data)}")
        sa.spi_r = msg.spi_r
        sa._ni, sa._nr = self.ni, nr.data
        sa._init_response = sa._last_raw
        try:
            self._derive(prop, self.ke.shared_secret(ke.data))
        except KeyExchangeError as e:
            raise RemoteProtocolError(f"IKE_SA_INIT: {e}") from None
        sa.nat.check(msg.payloads, sa.spi_i, sa.spi_r, sa.local, sa.remote)
        self.note_peer_support(msg.payloads)
        sa.state = IkeSaState.AUTHENTICATING
        if sa.nat.detected or sa.cfg.force_encap:
            sa.local, sa.remote = natt.float_to_nat_t(sa.local, sa.remote)  # §2.23: continue on 4500
        sa.intermediate.after_init(msg.payloads, now)  # IKE_INTERMEDIATE per additional KE, then IKE_AUTH

    # ------------------------------------------------------------ responder
    def process_request(self, msg: Message, inner, now: float) -> list | None:
        """HDR, SA, KEi, Ni --> ; <-- HDR, SA, KEr, Nr, N(NAT_DETECTION_*), [CERTREQ]."""
        sa = self.sa
        sa_p, ke, ni = msg.first(PayloadType.SA), msg.first(PayloadType.KE), msg.first(PayloadType.NONCE)
        if not 16 <= len(ni.data) <= 256:
            raise RemoteProtocolError("IKE_SA_INIT: bad nonce length", NotifyType.INVALID_SYNTAX)
        try:
            ours = sa._ike_proposals()
        except ProposalError:
            ours = []
        res = ch.choose_ike(sa_p, ours, ke.group, allow_add_ke=announces_intermediate(msg.payloads))
        if res is None:
            raise RemoteProtocolError("IKE_SA_INIT: no proposal chosen" + hybrid_hint(sa_p, ours),
                                      NotifyType.NO_PROPOSAL_CHOSEN)
        choice, _kes = res
        if not nonce_ok(ni.data, choice.proposal.prf):  # §2.10: at least half the PRF key size
            raise RemoteProtocolError(f"IKE_SA_INIT: nonce of {len(ni.data)} octets is shorter than half the PRF key",
                                      NotifyType.INVALID_SYNTAX)
        if choice.proposal.ke[0] != ke.group:
            raise RemoteProtocolError("IKE_SA_INIT: asked the initiator for another KE method",
                                      NotifyType.INVALID_KE_PAYLOAD, struct.pack("!H", choice.proposal.ke[0]))
        try:
            self.ke = KeyExchange(ke.group, sa.rng)
            g_ir = self.ke.shared_secret(ke.data)
        except KeyExchangeError as e:
            raise RemoteProtocolError(f"IKE_SA_INIT: {e}", NotifyType.INVALID_SYNTAX) from None
        sa._ni = ni.data
        sa._nr = sa.rng(NONCE_LEN)
        sa._init_request = sa._last_raw
        self._derive(choice.proposal, g_ir)
        sa.nat.check(msg.payloads, sa.spi_i, 0, sa.local, sa.remote)
        self.note_peer_support(msg.payloads)
        chosen = ch.ike_sa_payload([choice.proposal]).proposals[0]
        sa_out = SaPayload((Proposal(choice.number, chosen.protocol, chosen.spi, chosen.transforms),))
        # responder NAT-D hashes use both SPIs (§2.23)
        payloads = [sa_out, KePayload(ke.group, self.ke.public_bytes()), NoncePayload(sa._nr),
                    *natt.nat_notifies(sa.spi_i, sa.spi_r, sa.local, sa.remote, force_encap=sa.cfg.force_encap,
                                       rng=sa.rng)]
        if sa.cfg.credentials.uses_certificates:
            payloads.append(certreq_payload(sa.cfg.credentials))
        payloads += self._sig_hash_notify()
        payloads += sa.intermediate.reply(msg.payloads)
        if sa._frag_peer:  # RFC 7383 §2.3: only in answer to the initiator's announcement
            payloads.append(NotifyPayload(int(NotifyType.IKEV2_FRAGMENTATION_SUPPORTED)))
        sa.state = IkeSaState.AUTHENTICATING
        sa._init_response = sa._seal(ExchangeType.IKE_SA_INIT, 0, True, payloads)
        return payloads


__all__ = ["IkeInit", "certreq_payload", "hybrid_hint", "NONCE_LEN", "MAX_INIT_RETRIES"]
