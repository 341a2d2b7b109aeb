"""The RFC 7383 reassembler (agent/ike/fragment.py) and SKF payload decoding.

Input: up to 64 fragments, each: ``sel`` octet (bit 0: the fragment fails
authentication, bit 1: fails decryption otherwise; bits 2-3: Message ID
0..3), Fragment Number and Total Fragments (2 octets each), Next Payload
(1 octet), plaintext (length-prefixed chunk). The fragment travels as a real
SKF payload inside an IKE message through decode_message, so the SKF decoder
is fuzzed too; decryption is a stand-in that returns the body (or raises
IntegrityError / CryptoError as ``sel`` says).

Reassembler.add must never raise (it returns a drop reason); checked too:
what is stored never exceeds max_fragments / max_bytes, a completed message
has a first payload type and at most max_bytes octets, and a fragment that failed authentication
is never stored.

"""
from __future__ import annotations

import struct

from agent.iana import ExchangeType, PayloadType
from agent.ike.crypto import CryptoError, IntegrityError
from agent.ike.fragment import FRAGMENT_QUEUED, Reassembler
from agent.ike.message import HEADER_LEN, EncryptedFragmentPayload, MessageError, decode_message, encode_header

from fuzz.harness import Finding, Reader, Target


def one_input(data: bytes) -> None:
    r = Reader(data)
    ra = Reassembler(max_fragments=r.u8() % 40 or 32, max_bytes=(r.u16() or 1) * 8)
    for _ in range(64):
        if not r.left():
            break
        sel = r.u8()
        number, total, first = r.u16(), r.u16(), r.u8()
        body = r.chunk()
        skf = struct.pack("!BBHHH", first, 0, 8 + len(body), number, total) + body
        raw = encode_header(0x1122334455667788, 0x99AABBCCDDEEFF00, int(PayloadType.SKF),
                            ExchangeType.IKE_AUTH, 0x08, 1, HEADER_LEN + len(skf)) + skf
        try:
            msg = decode_message(raw)
        except MessageError:
            continue
        p = msg.payloads[0]
        if not isinstance(p, EncryptedFragmentPayload) or (p.number, p.total, p.first) != (number, total, first):
            raise Finding(f"SKF decoded as {p!r}")

        def open_(aad: bytes, b: bytes) -> bytes:
            if aad != raw[:HEADER_LEN + 8]:
                raise Finding("associated data is not the IKE header + SKF header")
            if sel & 1:
                raise IntegrityError("bad ICV")
            if sel & 2:
                raise CryptoError("bad padding")
            return b

        res = ra.add((sel >> 2) & 3, p, raw, open_)
        if isinstance(res, tuple):
            f, whole = res
            if f == 0 or not isinstance(whole, bytes) or len(whole) > ra.max_bytes:
                raise Finding(f"completed message with first payload {f}")
        elif not isinstance(res, str):
            raise Finding(f"add returned {res!r}")
        elif res == FRAGMENT_QUEUED and sel & 3:
            raise Finding("a fragment that failed authentication was stored")
        part = ra._p
        if part is not None:
            if len(part.parts) > ra.max_fragments or part.size > ra.max_bytes:
                raise Finding(f"reassembly state over its caps: {len(part.parts)} fragments, {part.size} octets")
            if part.total > ra.max_fragments:
                raise Finding(f"collecting a message of {part.total} fragments")


TARGET = Target("ike_fragment", one_input, allowed=())
