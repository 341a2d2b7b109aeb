"""IKE message and payload decoding (agent/ike/message.py, RFC 7296 §3).

Input: one mode octet (see ``fix_header``) then a whole UDP payload (no non-ESP marker). Decodes the header and the
payload chain *without* decode_message's catch-all (which turns any bug into
MessageError("internal decode error")), so a codec bug shows as a crash here.
Then: the exchange table checks, the CP decoder (agent/ike/cp.py) on any CP
payload, the selectors' address ranges, and the round-trip property the module
documents: decode(encode(m)) == m for every decoded message m.
Allowed: MessageError, CpError.
"""
from __future__ import annotations

from agent.ike import cp
from agent.ike.message import (HEADER_LEN, Message, MessageError, RawPayload, TsPayload, check_outer,
                               check_payload_rules, decode_header, decode_message, decode_payloads,
                               encode_message, FLAG_INITIATOR, FLAG_RESPONSE, FLAG_VERSION)
from agent.iana import PayloadType

from fuzz.harness import Finding, Target


def fix_header(data: bytes) -> bytes:
    """Most random inputs fail the header's Length == datagram length check; with
    the first input octet even the harness writes the true length and version 2
    into the header, so the fuzzer spends its time in the payload chain."""
    if not data:
        return data
    mode, data = data[0], data[1:]
    if mode & 1 or len(data) < HEADER_LEN:
        return data
    return data[:17] + bytes([0x20 | (data[17] & 0x0F)]) + data[18:24] + len(data).to_bytes(4, "big") + data[28:]


def one_input(data: bytes) -> None:
    data = fix_header(data)
    h = decode_header(data)
    payloads = decode_payloads(h.first, data[HEADER_LEN:])
    msg = Message(h.spi_i, h.spi_r, h.exchange, h.message_id, bool(h.flags & FLAG_INITIATOR),
                  bool(h.flags & FLAG_RESPONSE), payloads, h.minor, bool(h.flags & FLAG_VERSION))
    for p in payloads:
        if isinstance(p, TsPayload):
            for s in p.selectors:
                s.networks()
        elif isinstance(p, RawPayload) and p.ptype == PayloadType.CP:
            try:
                c = cp.find_cp([p])
                if c is not None:
                    cp.reply_addresses(c)
            except cp.CpError:
                pass
    # the exchange table, as the manager applies it (outer) and IkeSa (inner)
    for fn in (lambda: check_outer(msg), lambda: check_payload_rules(h.exchange, msg.is_response, payloads)):
        try:
            fn()
        except MessageError:
            pass
    # round trip: what we decoded encodes to something that decodes the same
    try:
        again = encode_message(msg)
    except ValueError:  # e.g. a payload over 64 KiB cannot be re-encoded: fine
        return
    if decode_message(again) != msg:
        raise Finding("decode(encode(m)) != m")


TARGET = Target("ike_message", one_input, allowed=(MessageError, cp.CpError))
