"""Key log for Wireshark (debugging aid, like SSLKEYLOGFILE; off by default).

With ``--keylog-dir DIR`` the agent appends to two Wireshark 4.0 UAT files:

- ``DIR/ikev2_decryption_table``: ``SPIi,SPIr,SK_ei,SK_er,"encr",SK_ai,SK_ar,"integ"``
  (SPIs 16 hex digits, keys hex, algorithm names as Wireshark spells them);
- ``DIR/esp_sa``: ``"IPv4","src","dst","0xSPI","encr","0xkey","auth","0xkey"``,
  one line per direction of every ESP CHILD_SA, addresses ``*``;
- ``DIR/ah_sa`` (ours; Wireshark has no AH key table): ``IPv4|IPv6,0xSPI,<IANA integrity
  name>,0x<key>,esn|noesn``, one line per direction of every AH CHILD_SA (docs/datapath.md).

Copy them to ``$HOME/.config/wireshark/`` (and pass
``-o esp.enable_encryption_decode:TRUE`` for ESP). Each line is one
``write`` on an ``O_APPEND`` descriptor so agents can share a directory.
Anyone who can read these files can decrypt the traffic: use it only for
debugging.
"""
from __future__ import annotations

import logging
import os

from agent.iana import EncrId, IntegId, name_of

# Wireshark 4.0 packet-ipsec.c names (ESP SA UAT).
_ESP_ENCR = {
    EncrId.ENCR_NULL: "NULL",
    EncrId.ENCR_3DES: "TripleDES-CBC [RFC2451]",
    EncrId.ENCR_AES_CBC: "AES-CBC [RFC3602]",
    EncrId.ENCR_AES_CTR: "AES-CTR [RFC3686]",
    EncrId.ENCR_AES_GCM_8: "AES-GCM with 8 octet ICV [RFC4106]",
    EncrId.ENCR_AES_GCM_12: "AES-GCM with 12 octet ICV [RFC4106]",
    EncrId.ENCR_AES_GCM_16: "AES-GCM with 16 octet ICV [RFC4106]",
}
_ESP_AUTH = {
    IntegId.NONE: "NULL",
    IntegId.AUTH_HMAC_SHA1_96: "HMAC-SHA-1-96 [RFC2404]",
    IntegId.AUTH_HMAC_SHA2_256_128: "HMAC-SHA-256-128 [RFC4868]",
    IntegId.AUTH_HMAC_SHA2_384_192: "HMAC-SHA-384-192 [RFC4868]",
    IntegId.AUTH_HMAC_SHA2_512_256: "HMAC-SHA-512-256 [RFC4868]",
}
_AEAD = {EncrId.ENCR_AES_GCM_8, EncrId.ENCR_AES_GCM_12, EncrId.ENCR_AES_GCM_16}

IKE_TABLE = "ikev2_decryption_table"
ESP_TABLE = "esp_sa"
AH_TABLE = "ah_sa"


def esp_sa_line(keys, src: str = "*", dst: str = "*", family: str = "IPv4") -> str | None:
    """One ``esp_sa`` UAT line for one direction, or None if Wireshark 4.0 cannot decrypt the suite."""
    encr = _ESP_ENCR.get(keys.encr_id)
    auth = _ESP_AUTH.get(keys.integ_id)
    if encr is None or auth is None:
        return None
    akey = "" if keys.encr_id in _AEAD or not keys.integ_key else "0x" + keys.integ_key.hex()
    return (f'"{family}","{src}","{dst}","0x{keys.spi:08x}","{encr}",'
            f'"0x{keys.encr_key.hex()}","{auth}","{akey}"')


def ah_sa_line(keys, family: str = "IPv4") -> str:
    """One ``ah_sa`` line for one direction of an AH CHILD_SA (RFC 4302): family, SPI,
    the IANA integrity transform name, the key, and whether ESN is on."""
    return (f"{family},0x{keys.spi:08x},{name_of(IntegId, keys.integ_id)},0x{keys.integ_key.hex()},"
            f"{'esn' if keys.esn else 'noesn'}")


def ikev2_line(ev) -> str:
    """One ``ikev2_decryption_table`` line from an ``IkeKeysDerived`` event."""
    return (f"{ev.spi_i:016x},{ev.spi_r:016x},{ev.sk_ei.hex()},{ev.sk_er.hex()},"
            f'"{ev.encr_wireshark}",{ev.sk_ai.hex()},{ev.sk_ar.hex()},"{ev.integ_wireshark}"')


class KeyLog:
    """Appends key lines to ``directory`` (created 0700 if missing; files 0600)."""

    def __init__(self, directory: str, logger: logging.Logger | None = None) -> None:
        self.dir = directory
        self.log = logger or logging.getLogger("meshsec.keylog")
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._warned: set[int] = set()

    def _append(self, name: str, line: str) -> None:
        fd = os.open(os.path.join(self.dir, name), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (line + "\n").encode())  # one write per line: atomic w.r.t. other appenders
        finally:
            os.close(fd)

    def ike_keys(self, ev) -> None:
        """Log an ``IkeKeysDerived`` event (skipped with a warning if Wireshark lacks the suite)."""
        if ev.encr_wireshark is None or ev.integ_wireshark is None:
            self.log.warning("keylog: Wireshark cannot decrypt this IKE suite; IKE_SA %016x not logged", ev.spi_i)
            return
        self._append(IKE_TABLE, ikev2_line(ev))

    def child_sa(self, ev) -> None:
        """Log both directions of a ``ChildSaEstablished`` event: ESP to ``esp_sa``,
        AH (``ev.protocol == "ah"``) to ``ah_sa``."""
        family = "IPv6" if ":" in ev.remote[0] else "IPv4"
        if getattr(ev, "protocol", "esp") == "ah":
            self._append(AH_TABLE, "\n".join(ah_sa_line(k, family) for k in (ev.inbound, ev.outbound)))
            return
        for keys in (ev.inbound, ev.outbound):
            line = esp_sa_line(keys, family=family)
            if line is None:
                if keys.encr_id not in self._warned:
                    self._warned.add(keys.encr_id)
                    self.log.warning("keylog: Wireshark 4.0 cannot decrypt ESP encr %s / integ %s; not logged",
                                     keys.encr_id, keys.integ_id)
                continue
            self._append(ESP_TABLE, line)
