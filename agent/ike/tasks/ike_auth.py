"""IKE_AUTH task (RFC 7296 §1.2, §2.15, §2.21.2, §3.15 CP) with the first CHILD_SA.

Initiator: HDR, SK {IDi, [CERT,] [CERTREQ,] [N(INITIAL_CONTACT),] [IDr,] AUTH, [CP(CFG_REQUEST),]
SA, TSi, TSr, [N(USE_TRANSPORT_MODE)]} -->
Responder: <-- HDR, SK {IDr, [CERT,] AUTH, [CP(CFG_REPLY),] SA, TSi, TSr}, or
<-- HDR, SK {N(AUTHENTICATION_FAILED)}, or <-- HDR, SK {IDr, AUTH, N(<CHILD_SA error>)}
(the IKE_SA is up without its CHILD_SA, §1.2; agent.ike.child_refusal retries it).

Who the peer may be and what it may claim is the PAD's (agent.ike.pad). The task holds the
first CHILD_SA's SPI, the proposals and the selectors it offered.

Pure module: no I/O.
"""
from __future__ import annotations

import ipaddress

from agent.iana import AuthMethod, CertEncoding, ExchangeType, IdType, NotifyType, PayloadType
from agent.ike import auth
from agent.ike import child as ch
from agent.ike import cp as cfgp
from agent.ike import natt_ts
from agent.ike.child_refusal import CHILD_SA_REFUSALS
from agent.ike.errors import (AuthError, CryptoError, DeleteReason, LocalProtocolError, Mode, Protocol,
                               RemoteProtocolError, notify_name)
from agent.ike.message import AuthPayload, CertPayload, IdPayload, Message, NotifyPayload, TsPayload
from agent.ike.proposals import ProposalError
from agent.ike.tasks.ike_init import certreq_payload
from agent.model import Peer

__all__ = ["IkeAuth"]


class IkeAuth:
    """The IKE_AUTH exchange of one IkeSa (see the module docstring)."""

    def __init__(self, sa) -> None:
        self.sa = sa
        self.child_spi = 0  # our inbound SPI of the first CHILD_SA
        self.esp_offered: list = []
        self.ts_proposed: tuple = ((), ())  # TSi, TSr of our request (§2.9)

    # ------------------------------------------------------------ AUTH payloads (§2.15)
    def _octets(self, ours: bool, id_body: bytes) -> bytes:
        """InitiatorSignedOctets / ResponderSignedOctets of our (``ours``) or the peer's AUTH."""
        sa = self.sa
        prf = sa._ike_prop.prf
        if sa.initiator == ours:  # the initiator's AUTH: its IKE_SA_INIT request, Nr, SK_pi
            return auth.signed_octets(prf, sa._init_request, sa._nr, sa._keys.sk_pi, id_body,
                                      sa.intermediate.int_auth())
        return auth.signed_octets(prf, sa._init_response, sa._ni, sa._keys.sk_pr, id_body,
                                  sa.intermediate.int_auth())

    def my_auth(self, id_payload: IdPayload, psk: bytes | None) -> AuthPayload:
        sa = self.sa
        octets = self._octets(True, id_payload.body)
        if psk is not None:
            return AuthPayload(int(AuthMethod.SHARED_KEY_MESSAGE_INTEGRITY_CODE),
                               auth.psk_auth(sa._ike_prop.prf, psk, octets))
        hashes_ok = tuple(sorted(sa._peer_sig_hashes)) or None
        return AuthPayload(int(AuthMethod.DIGITAL_SIGNATURE),
                           auth.sign_digital_signature(sa.cfg.credentials.private_key_pem, octets, hashes_ok))

    def verify_peer(self, idp: IdPayload, auth_p: AuthPayload | None, certs: list, peer: Peer, now: float) -> None:
        """Check the peer's ID, certificate and AUTH (§2.15) against the PAD; raises AuthError."""
        sa = self.sa
        sa.pad.check_identity(peer, idp.id_type, idp.data)
        if auth_p is None:
            raise AuthError("no AUTH payload")
        octets = self._octets(False, idp.body)
        if auth_p.method == AuthMethod.SHARED_KEY_MESSAGE_INTEGRITY_CODE:
            psk = peer.psk if peer.psk is not None else sa.cfg.credentials.psk
            if psk is None:
                raise AuthError("peer used a PSK but none is configured for it")
            auth.verify_psk_auth(sa._ike_prop.prf, psk, octets, auth_p.data)
            return
        if auth_p.method == AuthMethod.DIGITAL_SIGNATURE:
            if not sa.cfg.credentials.ca_certificates:
                raise AuthError("peer used a certificate but we have no CA to verify it")
            x509s = [c.data for c in certs if c.encoding == CertEncoding.X509_CERTIFICATE_SIGNATURE]
            leaf = auth.verify_certificate_chain(x509s, list(sa.cfg.credentials.ca_certificates),
                                                 now + sa.cfg.wall_offset())
            sa.pad.check_revoked(peer, leaf.serial_number)
            auth.identity_matches_certificate(idp.id_type, idp.data, leaf)
            auth.verify_digital_signature(leaf, octets, auth_p.data)
            sa.peer_cert_serial = leaf.serial_number
            return
        raise AuthError(f"unsupported AUTH method {auth_p.method}")

    def _my_psk(self, peer: Peer) -> bytes | None:
        """PSK we authenticate with, or None for certificates."""
        if peer.psk is not None:
            return peer.psk
        creds = self.sa.cfg.credentials
        return None if creds.uses_certificates else creds.psk

    def _id(self, ptype: int) -> IdPayload:
        """Our IDi / IDr (§3.5): ID_FQDN for a name, ID_IPV4_ADDR / ID_IPV6_ADDR for an address,
        ID_DER_ASN1_DN for a DN (our certificate's subject, byte for byte, when it is that DN)."""
        cfg = self.sa.cfg
        want = auth.id_for_identity(cfg.identity)
        if want is not None:
            return IdPayload(ptype, *want)
        return IdPayload(ptype, int(IdType.ID_DER_ASN1_DN), auth.dn_for_identity(
            cfg.identity, cfg.credentials.certificate_chain[:1]))

    def _cert_payloads(self, psk: bytes | None) -> list:
        if psk is not None:
            return []
        return [CertPayload(int(CertEncoding.X509_CERTIFICATE_SIGNATURE), c)
                for c in self.sa.cfg.credentials.certificate_chain]

    # ------------------------------------------------------------ initiator
    def start(self, now: float) -> None:
        """HDR, SK {IDi, [CERT,] [CERTREQ,] [N(INITIAL_CONTACT),] IDr, AUTH, SA, TSi, TSr} -->."""
        sa = self.sa
        peer = sa.peer
        psk = self._my_psk(peer)
        idi = self._id(PayloadType.IDi)
        payloads: list = [idi, *self._cert_payloads(psk)]
        if sa.cfg.credentials.ca_certificates:
            payloads.append(certreq_payload(sa.cfg.credentials))
        if sa.cfg.initial_contact:
            payloads.append(NotifyPayload(int(NotifyType.INITIAL_CONTACT)))
        want = auth.id_for_identity(peer.identity)  # IDr is optional (§3.5): left out for a DN
        if want is not None:
            payloads.append(IdPayload(int(PayloadType.IDr), *want))
        try:
            payloads.append(self.my_auth(idi, psk))
        except (AuthError, CryptoError) as e:
            sa._die(f"cannot authenticate ourselves: {e}", DeleteReason.REFUSED)
            return
        self.child_spi = sa._new_child_spi()
        # first kind of the policy: ESP, or AH for "ah" ("ah+esp": its AH SA follows in CREATE_CHILD_SA)
        first_kind = ch.kinds(peer.policy)[0]
        problem = sa.pad.policy_problem(peer)
        if problem is not None:  # never an ESTABLISHED IKE_SA without its CHILD_SA
            sa._die(f"refused: {problem}", DeleteReason.REFUSED)
            return
        try:
            self.esp_offered = ch.offers(peer.policy, first_kind)
        except ProposalError as e:
            sa._die(f"refused: peer {peer.name!r}: bad esp_proposals: {e}", DeleteReason.REFUSED)
            return
        vip_versions = tuple(getattr(peer.policy, "request_virtual_ip", ()) or ())
        tsi_nets = sa.cfg.local_subnets
        if vip_versions:
            # CP(CFG_REQUEST) (§3.15.1); TSi any: the gateway narrows it to the address it assigns
            payloads.append(cfgp.request(4 in vip_versions, 6 in vip_versions).encode())
            tsi_nets = tuple(ipaddress.ip_network("0.0.0.0/0" if v == 4 else "::/0") for v in vip_versions)
        payloads.append(ch.esp_sa_payload(self.esp_offered, self.child_spi))
        self.ts_proposed = (ch.ts_from_networks(tsi_nets), ch.ts_from_networks(peer.subnets))
        payloads.append(TsPayload(int(PayloadType.TSi), self.ts_proposed[0]))
        payloads.append(TsPayload(int(PayloadType.TSr), self.ts_proposed[1]))
        if ch.child_mode(peer.policy, first_kind) == Mode.TRANSPORT:
            payloads.append(NotifyPayload(int(NotifyType.USE_TRANSPORT_MODE)))
        sa._request(ExchangeType.IKE_AUTH, payloads, self.process_response, now)

    def process_response(self, msg: Message, inner, now: float) -> None:
        """<-- HDR, SK {IDr, [CERT,] AUTH, SA, TSi, TSr}."""
        sa = self.sa
        m = Message(msg.spi_i, msg.spi_r, msg.exchange, msg.message_id, False, True, tuple(inner))
        errors = [n for n in m.notifies() if n.is_error]
        auth_err = next((n for n in errors if n.notify_type == NotifyType.AUTHENTICATION_FAILED), None)
        if auth_err is not None:
            raise LocalProtocolError("peer refused our authentication (AUTHENTICATION_FAILED)",
                                     NotifyType.AUTHENTICATION_FAILED)
        idr = m.first(PayloadType.IDr)
        if idr is None or m.first(PayloadType.AUTH) is None:
            if errors:
                raise LocalProtocolError(f"IKE_AUTH failed: {notify_name(errors[0].notify_type)}",
                                         errors[0].notify_type, kind=DeleteReason.PROTOCOL_ERROR)
            raise RemoteProtocolError("IKE_AUTH failed: no IDr/AUTH")
        try:
            self.verify_peer(idr, m.first(PayloadType.AUTH), m.get(PayloadType.CERT), sa.peer, now)
            sa.pad.check_binding(sa.peer, sa.remote, sa.nat.remote)
        except (AuthError, CryptoError) as e:
            sa.info.notify_error(NotifyType.AUTHENTICATION_FAILED, f"AUTHENTICATION_FAILED: {e}",
                                 DeleteReason.AUTH_FAILED)
            return
        sa._established(now)
        self._first_child_response(m, inner, errors, now)

    def _first_child_response(self, m: Message, inner, errors: list, now: float) -> None:
        sa = self.sa
        peer = sa.peer
        first_kind = ch.kinds(peer.policy)[0]
        # §1.2, §2.21.2: a refused CHILD_SA leaves the IKE_SA up; the CHILD_SA is retried with
        # CREATE_CHILD_SA after a backoff (agent.ike.child_refusal). Not with a virtual IP: that
        # comes only with IKE_AUTH, so such an IKE_SA is deleted and set up again.
        wanted = (None if getattr(peer.policy, "request_virtual_ip", ()) else
                  (tuple(sa.cfg.local_subnets), tuple(peer.subnets), first_kind))
        sa_p, tsi, tsr = m.first(PayloadType.SA), m.first(PayloadType.TSi), m.first(PayloadType.TSr)

        def refuse(reason: str, notify: int | None = None) -> None:
            if sa_p is not None and notify is None:
                sa.child_create.delete_unwanted(self.child_spi, now, first_kind)  # the responder installed it
            if wanted is None or (notify is not None and notify not in CHILD_SA_REFUSALS):
                sa.delete(now, reason, DeleteReason.PROTOCOL_ERROR)
            else:
                sa.refusals.by_peer(reason, notify, now, wanted)

        if errors:
            refuse(f"CHILD_SA refused: {notify_name(errors[0].notify_type)}", errors[0].notify_type)
            return
        choice = ch.accepted_esp(sa_p, self.esp_offered) if sa_p else None
        if choice is None or tsi is None or tsr is None:
            refuse("CHILD_SA refused: response SA/TS not acceptable")
            return
        tsi, tsr = natt_ts.child_ts(sa, m, tsi, tsr, exchange_initiator=True,  # §2.23.1, before any check
                                    transport_wanted=ch.child_mode(peer.policy, first_kind) == Mode.TRANSPORT)
        if getattr(peer.policy, "request_virtual_ip", ()):
            try:
                cpr = cfgp.find_cp(inner)
                vips = cfgp.reply_addresses(cpr) if cpr is not None else []
            except cfgp.CpError as e:
                sa.delete(now, f"CHILD_SA refused: bad CP(CFG_REPLY): {e}", DeleteReason.PROTOCOL_ERROR)
                return
            if not vips:
                sa.delete(now, "CHILD_SA refused: we asked for a virtual IP and the gateway sent no CP(CFG_REPLY)",
                          DeleteReason.PROTOCOL_ERROR)
                return
            sa.virtual_ips = tuple(str(a) for a in vips)
        local_ts = ch.networks_of(tsi.selectors)
        remote_ts = ch.networks_of(tsr.selectors)
        if (not local_ts or not remote_ts
                or not ch.ts_within(tsi.selectors, ch.ts_from_networks(sa._local_nets()))
                or not ch.ts_within(tsr.selectors, ch.ts_from_networks(peer.subnets))
                or not ch.ts_within(tsi.selectors, self.ts_proposed[0])
                or not ch.ts_within(tsr.selectors, self.ts_proposed[1])):
            refuse("CHILD_SA refused: responder widened the traffic selectors")
            return
        kind = Protocol.AH if choice.proposal.is_ah else Protocol.ESP
        transport = (ch.child_mode(peer.policy, kind) == Mode.TRANSPORT
                     and m.notify(NotifyType.USE_TRANSPORT_MODE) is not None)
        self._install_first(choice, local_ts, remote_ts, Mode.TRANSPORT if transport else Mode.TUNNEL, now,
                            tuple(tsi.selectors), tuple(tsr.selectors))
        for more in ch.kinds(peer.policy)[1:]:
            # "ah+esp": the AH CHILD_SA of the bundle, same TS pair (CREATE_CHILD_SA, §1.3.1)
            sa.create_child(now, local_ts, remote_ts, protocol=more)

    def _install_first(self, choice: ch.EspChoice, local_ts, remote_ts, mode: str, now: float,
                       local_sel: tuple = (), remote_sel: tuple = ()) -> None:
        # first CHILD_SA: KEYMAT from the IKE_SA_INIT nonces (§2.17)
        sa = self.sa
        sa.child_create.make_child(choice, self.child_spi, sa._ni, sa._nr, None, local_ts, remote_ts, mode, now,
                                   exchange_initiator=sa.initiator, selectors=(local_sel, remote_sel))

    # ------------------------------------------------------------ responder
    def process_request(self, msg: Message, inner, now: float) -> list | None:
        """HDR, SK {IDi, [CERT,] [CERTREQ,] [IDr,] AUTH, SA, TSi, TSr} -->
        <-- HDR, SK {IDr, [CERT,] AUTH, SA, TSi, TSr}  or  <-- HDR, SK {N(AUTHENTICATION_FAILED)}."""
        sa = self.sa
        m = Message(msg.spi_i, msg.spi_r, msg.exchange, msg.message_id, True, False, tuple(inner))
        idi = m.first(PayloadType.IDi)
        try:
            peer = sa.pad.lookup(idi.id_type, idi.data)
            idr = m.first(PayloadType.IDr)
            if idr is not None:
                sa.pad.check_wanted(sa.cfg.identity, idr.id_type, idr.data)
            self.verify_peer(idi, m.first(PayloadType.AUTH), m.get(PayloadType.CERT), peer, now)
            sa.pad.check_binding(peer, sa.remote, sa.nat.remote)
        except (AuthError, CryptoError) as e:
            sa.auth_failure = str(e)
            raise RemoteProtocolError(f"AUTHENTICATION_FAILED: {e}", NotifyType.AUTHENTICATION_FAILED) from None
        problem = sa.pad.policy_problem(peer)
        if problem is not None:
            # no IKE_SA whose CHILD_SA we could not install: refuse before AUTH (§2.21.2)
            sa.peer = peer
            raise RemoteProtocolError(f"refused: {problem}", NotifyType.NO_PROPOSAL_CHOSEN, kind=DeleteReason.REFUSED)
        sa.peer = peer
        # RFC 7383: the peer's own fragment size from now on (our IKE_AUTH response is the big one)
        sa.cfg.fragment_size = getattr(peer.policy, "fragment_size", sa.cfg.fragment_size)
        sa.peer_initial_contact = m.notify(NotifyType.INITIAL_CONTACT) is not None
        psk = self._my_psk(peer)
        my_id = self._id(PayloadType.IDr)
        try:
            payloads: list = [my_id, *self._cert_payloads(psk), self.my_auth(my_id, psk)]
        except (AuthError, CryptoError) as e:  # e.g. the peer accepts none of our hash algorithms
            raise LocalProtocolError(f"cannot authenticate ourselves: {e}", NotifyType.AUTHENTICATION_FAILED,
                                     kind=DeleteReason.REFUSED) from None
        sa._established(now)
        return payloads + self._first_child_request(m, inner, peer, now)

    def _first_child_request(self, m: Message, inner, peer: Peer, now: float) -> list:
        """The first CHILD_SA of the peer's IKE_AUTH: payloads to add to our response."""
        sa = self.sa
        refusals = sa.refusals
        sa_p, tsi, tsr = m.first(PayloadType.SA), m.first(PayloadType.TSi), m.first(PayloadType.TSr)
        if sa_p is None or tsi is None or tsr is None:
            return []  # childless (RFC 6023)
        payloads: list = []
        pool = getattr(peer.policy, "virtual_ip_pool", None)
        if pool:
            # gateway with an address pool: the remote host must ask (§3.15.4)
            try:
                cpr = cfgp.find_cp(inner)
            except cfgp.CpError:
                cpr = None
            if cpr is None or cpr.cfg_type != cfgp.CfgType.CFG_REQUEST:
                refusals.by_us("no CP(CFG_REQUEST): this gateway assigns a virtual IP (RFC 7296 §3.15.4)",
                               NotifyType.FAILED_CP_REQUIRED, refusals.offer_text(sa_p, tsi, tsr))
                return [NotifyPayload(int(NotifyType.FAILED_CP_REQUIRED))]
            versions = tuple(v for v, a in ((4, cfgp.INTERNAL_IP4_ADDRESS), (6, cfgp.INTERNAL_IP6_ADDRESS))
                             if cpr.get(a)) or (4,)
            vips = sa.cfg.assign_vip(peer, versions)
            if not vips:
                refusals.by_us(f"virtual IP pool {pool} has no free address", NotifyType.INTERNAL_ADDRESS_FAILURE,
                               refusals.offer_text(sa_p, tsi, tsr))
                return [NotifyPayload(int(NotifyType.INTERNAL_ADDRESS_FAILURE))]
            sa.peer_virtual_ips = tuple(str(a) for a in vips)
            payloads.append(cfgp.reply(vips).encode())
        choice = ch.choose_esp(sa_p, ch.acceptable(peer.policy))
        if choice is None:
            refusals.by_us("no common CHILD_SA proposal", NotifyType.NO_PROPOSAL_CHOSEN,
                           refusals.offer_text(sa_p, tsi, tsr))
            return payloads + [NotifyPayload(int(NotifyType.NO_PROPOSAL_CHOSEN))]
        tsi, tsr = natt_ts.child_ts(sa, m, tsi, tsr, exchange_initiator=False,  # §2.23.1, before narrowing
                                    transport_wanted=natt_ts.wants_transport(peer.policy, choice))
        # TSi is the initiator's side (the peer's subnets), TSr ours (§2.9): the PAD's selectors
        # §2.9 on IP protocol, ports and addresses
        remote_sel = ch.narrow_ts(tsi.selectors, ch.ts_from_networks(sa._remote_allowed()))
        local_sel = ch.narrow_ts(tsr.selectors, ch.ts_from_networks(sa.cfg.local_subnets))
        remote_ts, local_ts = ch.networks_of(remote_sel), ch.networks_of(local_sel)
        if not remote_ts or not local_ts:
            refusals.by_us(f"traffic selectors do not overlap ours ({refusals.ts_allowed_text()})",
                           NotifyType.TS_UNACCEPTABLE, refusals.offer_text(sa_p, tsi, tsr))
            return payloads + [NotifyPayload(int(NotifyType.TS_UNACCEPTABLE))]
        self.child_spi = sa._new_child_spi()
        kind = Protocol.AH if choice.proposal.is_ah else Protocol.ESP
        transport = (ch.child_mode(peer.policy, kind) == Mode.TRANSPORT
                     and m.notify(NotifyType.USE_TRANSPORT_MODE) is not None)
        sa_out = ch.esp_sa_payload([choice.proposal], self.child_spi, [choice.number])
        payloads += [sa_out, TsPayload(int(PayloadType.TSi), tuple(remote_sel)),
                     TsPayload(int(PayloadType.TSr), tuple(local_sel))]
        if transport:
            payloads.append(NotifyPayload(int(NotifyType.USE_TRANSPORT_MODE)))
        self._install_first(choice, local_ts, remote_ts, Mode.TRANSPORT if transport else Mode.TUNNEL, now,
                            tuple(local_sel), tuple(remote_sel))
        return payloads
