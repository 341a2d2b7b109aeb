"""IKE_FOLLOWUP_KE task (RFC 9370 §2.2.4): the additional key exchanges of a CREATE_CHILD_SA
(CHILD_SA create/rekey, IKE_SA rekey).

  HDR, SK {SA, Ni, KEi, ...} -->  <-- HDR, SK {SA, Nr, KEr, N(ADDITIONAL_KEY_EXCHANGE)(link1), ...}
  HDR(IKE_FOLLOWUP_KE), SK {KEi(1), N(ADDITIONAL_KEY_EXCHANGE)(link1)} -->
  <-- HDR(IKE_FOLLOWUP_KE), SK {KEr(1)[, N(ADDITIONAL_KEY_EXCHANGE)(link2)]} ...

KEYMAT = prf+(SK_d, SK(0) | Ni | Nr | SK(1) | ... | SK(n)); for an IKE_SA rekey
SKEYSEED = prf(SK_d, SK(0) | Ni | Nr | SK(1) | ... | SK(n)). The new SA exists only after
the last IKE_FOLLOWUP_KE. An unknown link is answered with N(STATE_NOT_FOUND).

Pure module: no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from agent.iana import ExchangeType, KeId, NotifyType, PayloadType, name_of
from agent.ike.crypto import KeyExchange, KeyExchangeError
from agent.ike.errors import Drop, notify_name
from agent.ike.message import KePayload, Message, NotifyPayload

STATE_NOT_FOUND = int(NotifyType.STATE_NOT_FOUND)  # RFC 9370 §3.3
LINK_LEN = 8  # our ADDITIONAL_KEY_EXCHANGE link data (opaque to the peer)

__all__ = ["FollowupKe", "STATE_NOT_FOUND", "LINK_LEN"]


@dataclass(eq=False)
class _Followup:
    """Responder state between IKE_FOLLOWUP_KE exchanges, keyed by the link we sent."""
    methods: list
    finish: Callable
    fail: Callable
    secrets: list = field(default_factory=list, repr=False)


class FollowupKe:
    """The IKE_FOLLOWUP_KE exchanges of one IkeSa, both roles."""

    def __init__(self, sa) -> None:
        self.sa = sa
        self.links: dict[bytes, _Followup] = {}  # responder: link we sent -> what follows

    def run(self, methods: list, link: bytes, secrets: list, finish: Callable, fail: Callable, now: float) -> None:
        """Initiator: one IKE_FOLLOWUP_KE per method, then ``finish(SK(1) | ... | SK(n), now)``;
        ``fail(reason, now)`` on any error."""
        sa = self.sa
        if not methods:
            finish(b"".join(secrets), now)
            return
        if not link:
            fail("additional key exchanges chosen but no N(ADDITIONAL_KEY_EXCHANGE) link (RFC 9370 §2.2.4)", now)
            return
        method = methods[0]
        try:
            kex = KeyExchange(method, sa.rng)
            ke = KePayload(method, kex.public_bytes())
        except KeyExchangeError as e:
            fail(f"IKE_FOLLOWUP_KE: {e}", now)
            return

        def on_response(msg: Message, inner, t: float) -> None:
            m = Message(msg.spi_i, msg.spi_r, msg.exchange, msg.message_id, msg.is_initiator, True, tuple(inner))
            errors = [n for n in m.notifies() if n.is_error]
            if errors:
                fail(f"IKE_FOLLOWUP_KE refused: {notify_name(errors[0].notify_type)}", t)
                return
            kr = m.first(PayloadType.KE)
            if kr is None or kr.group != method:
                sa.drops.append(Drop.INVALID_KE_PAYLOAD)
                fail(f"IKE_FOLLOWUP_KE response: no KEr for {name_of(KeId, method)}", t)
                return
            try:
                ss = kex.shared_secret(kr.data)
            except KeyExchangeError as e:
                sa.drops.append(Drop.INVALID_KE_DATA)
                fail(f"IKE_FOLLOWUP_KE response: {e}", t)
                return
            nxt = m.notify(NotifyType.ADDITIONAL_KEY_EXCHANGE)
            rest = methods[1:]
            if not rest and nxt is not None:
                fail("IKE_FOLLOWUP_KE response asks for more key exchanges than negotiated", t)
                return
            self.run(rest, nxt.data if nxt is not None else b"", secrets + [ss], finish, fail, t)

        # HDR(IKE_FOLLOWUP_KE), SK {KEi(n), N(ADDITIONAL_KEY_EXCHANGE)(link)} -->
        sa._request(ExchangeType.IKE_FOLLOWUP_KE,
                    [ke, NotifyPayload(int(NotifyType.ADDITIONAL_KEY_EXCHANGE), link)], on_response, now)

    def await_(self, methods: list, finish: Callable, fail: Callable) -> NotifyPayload:
        """Responder: remember what to do after the IKE_FOLLOWUP_KEs; returns N(ADDITIONAL_KEY_EXCHANGE)(link)."""
        link = self.sa.rng(LINK_LEN)
        self.links[link] = _Followup(list(methods), finish, fail)
        return NotifyPayload(int(NotifyType.ADDITIONAL_KEY_EXCHANGE), link)

    def process_request(self, msg: Message, inner, now: float) -> list:
        """HDR(IKE_FOLLOWUP_KE), SK {KEi(n), N(ADDITIONAL_KEY_EXCHANGE)(link)} -->
        <-- HDR(IKE_FOLLOWUP_KE), SK {KEr(n)[, N(ADDITIONAL_KEY_EXCHANGE)(next link)]}."""
        sa = self.sa
        m = Message(msg.spi_i, msg.spi_r, msg.exchange, msg.message_id, msg.is_initiator, False, tuple(inner))
        n = m.notify(NotifyType.ADDITIONAL_KEY_EXCHANGE)
        st = self.links.pop(n.data, None) if n is not None else None
        if st is None:
            return [NotifyPayload(STATE_NOT_FOUND)]
        ke = m.first(PayloadType.KE)
        if ke is None or ke.group != st.methods[0]:
            sa.drops.append(Drop.INVALID_KE_PAYLOAD)
            st.fail(f"IKE_FOLLOWUP_KE: KEi is not {name_of(KeId, st.methods[0])}", now)
            return [NotifyPayload(int(NotifyType.INVALID_SYNTAX))]
        try:
            kex = KeyExchange(ke.group, sa.rng)
            st.secrets.append(kex.shared_secret(ke.data))
            payloads: list = [KePayload(ke.group, kex.public_bytes())]
        except KeyExchangeError as e:
            sa.drops.append(Drop.INVALID_KE_DATA)
            st.fail(f"IKE_FOLLOWUP_KE request: {e}", now)
            return [NotifyPayload(int(NotifyType.INVALID_SYNTAX))]
        st.methods.pop(0)
        if st.methods:
            link = sa.rng(LINK_LEN)
            self.links[link] = st
            payloads.append(NotifyPayload(int(NotifyType.ADDITIONAL_KEY_EXCHANGE), link))
        else:
            st.finish(b"".join(st.secrets), now)
        return payloads
