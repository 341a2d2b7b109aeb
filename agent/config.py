"""Standalone configuration (no controller): YAML -> NodeView, Credentials, DatapathSettings.

Format (keys not listed are an error)::

    name: gw-a                      # this node; also its IKE identity (ID_FQDN)
    local_address: 198.51.100.1     # underlay address; IKE and ESP-in-UDP bind here
    subnets: [10.1.0.0/24]          # networks behind this node (may be empty)
    tun: {name: meshsec0, mtu: 1400, address: 10.200.9.1/32}   # all optional
    auth: {psk: "long random key"}  # >= 16 chars, varied; or {psk_file: PATH} or {key: PATH, cert: PATH, ca: PATH}
    peers:
      - name: gw-b
        identity: gw-b              # default: name
        endpoints: [198.51.100.2]
        subnets: [10.2.0.0/24]
        psk: "per-peer random key"  # optional, overrides auth.psk (same strength rules)
        initiate: true              # default: our name sorts lower than the peer's
        ike_proposals: [aes128gcm16-prfsha256-x25519]
        esp_proposals: [aes128gcm16]
        mode: tunnel                # tunnel | transport
        protocol: esp               # esp | ah | ah+esp
        encapsulation: udp          # udp (ESP in UDP 4500, RFC 3948) | none (raw IP protocol 50/51)
        virtual_ip: false           # true: ask this peer (a gateway) for an inner address (CP, case 4);
                                    # IPv6 when all its subnets are IPv6, else IPv4
        virtual_ip_pool: 10.99.0.0/24   # gateway side: hand this peer an address from the pool
        ike_lifetime: 4h            # IKE_SA rekeyed at 80-90 %, deleted at 100 % (0: never); s/m/h/d
        child_lifetime: 1h          # CHILD_SA likewise (RFC 7296 §2.8); a bare number is seconds
        child_lifetime_bytes: 10G   # CHILD_SA volume lifetime per SA direction (RFC 4301 §4.4.2.1): octets,
                                    # k/M/G/T = 1000^n, Ki/Mi/Gi/Ti = 1024^n; rekey 90 %, delete 100 %; 0: none
        child_lifetime_packets: 0   # likewise in packets
        fragment_size: 1280         # RFC 7383: IP packet octets above which IKE messages are fragmented
        bind_endpoints: false       # true: refuse this peer when its IKE comes from another address (no NAT)
        dpd_interval: 30s           # liveness check (RFC 7296 §2.4) after this long without IKE or ESP
                                    # from the peer; 0: off
        retransmit_timeout: 1s      # IKE requests: first retransmission after this (RFC 7296 §2.1),
        retransmit_base: 2          # each further wait multiplied by this,
        retransmit_tries: 5         # "peer did not respond" after this many retransmissions
        init_retransmit_timeout: 0.1s   # IKE_SA_INIT first retransmits after this, doubling up to
                                    # retransmit_timeout (a peer still starting); 0: not sooner

    docs/config.md documents every key with its default.

    A transport-mode peer without ``subnets`` protects traffic to its first
    endpoint (``<endpoint>/32``); a node without ``subnets`` that has
    transport peers uses ``<local_address>/32`` as its own selector.
    ``tun.mtu: auto`` (the default when no MTU is given) sets the TUN MTU to
    the underlay MTU minus the largest SA bundle overhead; ``tun.mss_clamp:
    true`` clamps TCP MSS on SYN / SYN-ACK to fit.

Every error is a ``ConfigError`` whose message names file, line and field
and says what to do. Relative paths are relative to the config file.
"""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

import yaml

from meshsec.defaults import MIN_LIFETIME_BYTES, MIN_LIFETIME_PACKETS
from meshsec.units import parse_duration, parse_size

from agent.model import (DEFAULT_ESP_PROPOSALS, DEFAULT_IKE_PROPOSALS, Credentials, NodeView, Peer,
                         PeerPolicy)


class ConfigError(Exception):
    """Invalid configuration; ``str()`` is ``file:line: field: problem (what to do)``."""


@dataclass(frozen=True)
class DatapathSettings:
    """Datapath parameters from the config file (CLI flags override them in agent.main)."""

    tun_name: str | None = None
    mtu: int | None = None
    tun_addresses: tuple[str, ...] = ()
    local_address: str | None = None
    mss_clamp: bool = False
    mtu_auto: bool = False


class _Map(dict):
    line: int = 0
    key_lines: dict


class _Seq(list):
    line: int = 0
    item_lines: list


class _Loader(yaml.SafeLoader):
    pass


def _construct_map(loader, node):
    loader.flatten_mapping(node)
    m = _Map()
    m.line = node.start_mark.line + 1
    m.key_lines = {}
    for k_node, v_node in node.value:
        key = loader.construct_object(k_node, deep=True)
        if key in m:
            raise ConfigError(f"{{file}}:{k_node.start_mark.line + 1}: duplicate key {key!r} (remove one)")
        m[key] = loader.construct_object(v_node, deep=True)
        m.key_lines[key] = v_node.start_mark.line + 1
    return m


def _construct_seq(loader, node):
    s = _Seq(loader.construct_object(n, deep=True) for n in node.value)
    s.line = node.start_mark.line + 1
    s.item_lines = [n.start_mark.line + 1 for n in node.value]
    return s


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_map)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_seq)


class _Ctx:
    def __init__(self, path: str) -> None:
        self.path = path
        self.base = os.path.dirname(os.path.abspath(path))

    def err(self, line: int, field: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.path}:{line}: {field}: {msg}")

    def resolve(self, p: str) -> str:
        return p if os.path.isabs(p) else os.path.join(self.base, p)


def _line(m, key) -> int:
    return getattr(m, "key_lines", {}).get(key, getattr(m, "line", 1))


def _check_keys(ctx: _Ctx, m, allowed: set[str], where: str) -> None:
    for k in m:
        if k not in allowed:
            raise ctx.err(_line(m, k), f"{where}{k}", f"unknown key (allowed: {', '.join(sorted(allowed))})")


def _req(ctx, m, key, where, typ, what):
    if key not in m or m[key] is None:
        raise ctx.err(getattr(m, "line", 1), f"{where}{key}", f"missing; add {what}")
    return _typed(ctx, m, key, where, typ, what)


def _typed(ctx, m, key, where, typ, what):
    v = m[key]
    if typ is str and isinstance(v, (int, float)) and not isinstance(v, bool):
        v = str(v)
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise ctx.err(_line(m, key), f"{where}{key}", f"expected {what}, got {type(v).__name__} {v!r}")
    return v


def _str_list(ctx, m, key, where, what) -> tuple[list[str], list[int]]:
    if key not in m or m[key] is None:
        return [], []
    v = m[key]
    if isinstance(v, str):
        return [v], [_line(m, key)]
    if not isinstance(v, list):
        raise ctx.err(_line(m, key), f"{where}{key}", f"expected a list of {what}")
    lines = getattr(v, "item_lines", [_line(m, key)] * len(v))
    for item, ln in zip(v, lines):
        if not isinstance(item, str):
            raise ctx.err(ln, f"{where}{key}", f"expected {what}, got {item!r}")
    return list(v), list(lines)


def _subnets(ctx, m, key, where):
    items, lines = _str_list(ctx, m, key, where, "CIDR prefixes such as 10.1.0.0/24")
    out = []
    for s, ln in zip(items, lines):
        try:
            out.append(ipaddress.ip_network(s, strict=True))
        except ValueError as exc:
            raise ctx.err(ln, f"{where}{key}", f"{s!r} is not a network prefix ({exc}); "
                          "use an address with its prefix length and no host bits, e.g. 10.1.0.0/24")
    return tuple(out)


def _address(ctx, m, key, where):
    v = _typed(ctx, m, key, where, str, "an IP address")
    try:
        return str(ipaddress.ip_address(v))
    except ValueError:
        raise ctx.err(_line(m, key), f"{where}{key}", f"{v!r} is not an IP address; write e.g. 198.51.100.1")


def _proposals(ctx, m, key, where, kind, default, protocol="esp"):
    """Proposal strings, each checked. CHILD_SA lists (``esp_proposals``) may hold ESP strings
    (with an encryption keyword) and AH strings (integrity only, e.g. ``sha256-esn``) as
    ``protocol`` needs them: esp only ESP, ah only AH, ah+esp both."""
    items, lines = _str_list(ctx, m, key, where, "proposal strings")
    if not items:
        return default
    try:
        from agent.ike import proposals as props
        parse = props.parse_ike_proposal if kind == "ike" else props.parse_child_proposal
    except (ImportError, AttributeError):
        parse = None  # IKE core absent: the IKE manager validates at negotiation
    for s, ln in zip(items, lines):
        if parse is not None:
            try:
                prop = parse(s)
            except Exception as exc:
                raise ctx.err(ln, f"{where}{key}", f"{exc}")
            is_ah = bool(getattr(prop, "is_ah", False))
            if kind != "ike" and protocol == "esp" and is_ah:
                raise ctx.err(ln, f"{where}{key}", f"{s!r} is an AH proposal (no encryption); "
                              "add an encryption algorithm (e.g. aes128gcm16) or set protocol: ah / ah+esp")
            if kind != "ike" and protocol == "ah" and not is_ah:
                raise ctx.err(ln, f"{where}{key}", f"{s!r} has encryption, AH has none; "
                              "give integrity only (e.g. sha256) or set protocol: ah+esp")
    return tuple(items)


def _read_file(ctx, line, field, path) -> bytes:
    try:
        with open(ctx.resolve(path), "rb") as f:
            return f.read()
    except OSError as exc:
        raise ctx.err(line, field, f"cannot read {path!r}: {exc.strerror}; check the path "
                      "(relative paths are relative to the config file)")


MIN_PSK_LENGTH = 16  # characters (octets); the controller's join tokens follow the same floor
MIN_PSK_DISTINCT = 6  # different characters; 16 random hex digits have fewer about 4 times in 10^5


def psk_weakness(psk: bytes) -> str | None:
    """Why ``psk`` is too weak for IKEv2 PSK authentication (RFC 7296 §2.15: a key that is
    not random enough falls to an offline dictionary attack on one IKE_AUTH), or None.

    Weak: shorter than MIN_PSK_LENGTH octets, fewer than MIN_PSK_DISTINCT different octets,
    or one shorter string repeated ("abcabcabc..."). The message never contains the key."""
    if len(psk) < MIN_PSK_LENGTH:
        return f"the pre-shared key is {len(psk)} characters long; use at least {MIN_PSK_LENGTH}"
    distinct = len(set(psk))
    if distinct < MIN_PSK_DISTINCT:
        return f"the pre-shared key has only {distinct} different characters; use at least {MIN_PSK_DISTINCT}"
    if psk in (psk + psk)[1:-1]:
        return "the pre-shared key is one shorter string repeated"
    return None


_PSK_ADVICE = ("; give a long random string, e.g. the output of `head -c 24 /dev/urandom | base64` "
               "(or authenticate with certificates: auth: {key, cert, ca})")


def _psk_bytes(ctx, line, field, value) -> bytes:
    b = value.encode() if isinstance(value, str) else None
    if not b:
        raise ctx.err(line, field, "the pre-shared key is empty; give a long random string")
    return _strong_psk(ctx, line, field, b)


def _strong_psk(ctx, line, field, psk: bytes) -> bytes:
    why = psk_weakness(psk)
    if why is not None:
        raise ctx.err(line, field, why + _PSK_ADVICE)
    return psk


def _credentials(ctx, m) -> Credentials:
    if "auth" not in m or not isinstance(m["auth"], dict):
        raise ctx.err(_line(m, "auth"), "auth", "missing or not a mapping; add "
                      "auth: {psk: ...}, {psk_file: PATH} or {key: PATH, cert: PATH, ca: PATH}")
    a = m["auth"]
    _check_keys(ctx, a, {"psk", "psk_file", "key", "cert", "ca"}, "auth.")
    has_psk = "psk" in a or "psk_file" in a
    has_cert = any(k in a for k in ("key", "cert", "ca"))
    if has_psk == has_cert or ("psk" in a and "psk_file" in a):
        raise ctx.err(a.line, "auth", "give exactly one of psk, psk_file, or key+cert+ca")
    if "psk" in a:
        return Credentials(psk=_psk_bytes(ctx, _line(a, "psk"), "auth.psk", str(a["psk"])))
    if "psk_file" in a:
        path = _typed(ctx, a, "psk_file", "auth.", str, "a file path")
        data = _read_file(ctx, _line(a, "psk_file"), "auth.psk_file", path).strip()
        if not data:
            raise ctx.err(_line(a, "psk_file"), "auth.psk_file", f"{path!r} is empty; put the key in it")
        return Credentials(psk=_strong_psk(ctx, _line(a, "psk_file"), "auth.psk_file", data))
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import Encoding

    for k in ("key", "cert", "ca"):
        if k not in a:
            raise ctx.err(a.line, f"auth.{k}", "missing; certificate auth needs key, cert and ca (PEM files)")
    key_pem = _read_file(ctx, _line(a, "key"), "auth.key", str(a["key"]))
    try:
        serialization.load_pem_private_key(key_pem, password=None)
    except Exception as exc:
        raise ctx.err(_line(a, "key"), "auth.key", f"not an unencrypted PEM private key ({exc})")
    chains = []
    for k in ("cert", "ca"):
        pem = _read_file(ctx, _line(a, k), f"auth.{k}", str(a[k]))
        try:
            certs = x509.load_pem_x509_certificates(pem)
        except Exception as exc:
            raise ctx.err(_line(a, k), f"auth.{k}", f"not a PEM certificate file ({exc})")
        chains.append(tuple(c.public_bytes(Encoding.DER) for c in certs))
    return Credentials(private_key_pem=key_pem, certificate_chain=chains[0], ca_certificates=chains[1])


_PEER_KEYS = {"name", "identity", "endpoints", "subnets", "psk", "initiate", "ike_proposals",
              "esp_proposals", "mode", "encapsulation", "ike_port", "protocol", "virtual_ip",
              "virtual_ip_pool", "ike_lifetime", "child_lifetime", "fragment_size", "bind_endpoints",
              "child_lifetime_bytes", "child_lifetime_packets", "dpd_interval", "retransmit_timeout",
              "retransmit_base", "retransmit_tries", "init_retransmit_timeout"}
from meshsec.defaults import MIN_LIFETIME_S  # noqa: E402 - below it a rekey could not finish (shared with the controller)
# the duration/size rules and lifetime bounds are shared with the controller's inventory
# (meshsec.units, meshsec.defaults)


def _volume(ctx, p, key, where) -> int:
    try:
        n = parse_size(p[key])
    except ValueError as exc:
        raise ctx.err(_line(p, key), f"{where}{key}", str(exc))
    low = MIN_LIFETIME_BYTES if key.endswith("bytes") else MIN_LIFETIME_PACKETS
    if 0 < n < low:
        raise ctx.err(_line(p, key), f"{where}{key}", f"{n} is too small: the CHILD_SA would be rekeyed every "
                      f"few packets; use 0 (no limit) or at least {low}")
    return n


def _lifetime(ctx, p, key, where, default: float) -> float:
    if key not in p:
        return default
    try:
        secs = parse_duration(p[key])
    except ValueError as exc:
        raise ctx.err(_line(p, key), f"{where}{key}", str(exc))
    if 0 < secs < MIN_LIFETIME_S:
        raise ctx.err(_line(p, key), f"{where}{key}", f"{p[key]!r} is shorter than {MIN_LIFETIME_S}s: a rekey "
                      "needs time to finish before the SA expires; use at least 10s (or 0 for no rekey)")
    return secs


def _peer(ctx, name: str, p, idx: int) -> Peer:
    where = f"peers[{idx}]."
    if not isinstance(p, dict):
        raise ctx.err(getattr(p, "line", 1), f"peers[{idx}]", "expected a mapping with name, endpoints, subnets")
    _check_keys(ctx, p, _PEER_KEYS, where)
    pname = _req(ctx, p, "name", where, str, "the peer's node name")
    ident = _typed(ctx, p, "identity", where, str, "an identity string") if "identity" in p else pname
    eps, lines = _str_list(ctx, p, "endpoints", where, "IP addresses")
    if not eps:
        raise ctx.err(p.line, f"{where}endpoints", "missing; list at least one underlay address of the peer")
    for i, (e, ln) in enumerate(zip(eps, lines)):
        try:
            # canonical text form: IKE and the datapath match a datagram's source address against
            # the endpoints as strings (2001:DB8:0::2 and 2001:db8::2 are one address)
            eps[i] = str(ipaddress.ip_address(e))
        except ValueError:
            raise ctx.err(ln, f"{where}endpoints", f"{e!r} is not an IP address")
    subnets = _subnets(ctx, p, "subnets", where)
    mode = p.get("mode", "tunnel")
    if mode not in ("tunnel", "transport"):
        raise ctx.err(_line(p, "mode"), f"{where}mode", f"{mode!r}: use tunnel or transport")
    encap = p.get("encapsulation", "udp")
    if encap not in ("udp", "none"):
        raise ctx.err(_line(p, "encapsulation"), f"{where}encapsulation", f"{encap!r}: use udp or none")
    protocol = p.get("protocol", "esp")
    if protocol not in ("esp", "ah", "ah+esp"):
        raise ctx.err(_line(p, "protocol"), f"{where}protocol", f"{protocol!r}: use esp, ah or ah+esp")
    if protocol != "esp" and encap == "udp" and "encapsulation" in p:
        raise ctx.err(_line(p, "encapsulation"), f"{where}encapsulation",
                      "AH cannot be carried in UDP (RFC 3948 covers ESP only; NAT breaks AH): "
                      "use encapsulation: none with protocol ah")
    if protocol != "esp":
        encap = "none"
    vip = _typed(ctx, p, "virtual_ip", where, bool, "true or false") if "virtual_ip" in p else False
    if not subnets and mode == "transport":
        subnets = (ipaddress.ip_network(eps[0]),)
    initiate = name < pname
    if vip or "virtual_ip_pool" in p:
        initiate = bool(vip)  # case 4: only the remote host can ask for its address (CP), so it starts
    responder_only = False
    if "initiate" in p:
        initiate = _typed(ctx, p, "initiate", where, bool, "true or false")
        responder_only = not initiate  # said explicitly: no IKE_SA_INIT at start-up (join) either
    psk = _psk_bytes(ctx, _line(p, "psk"), f"{where}psk", str(p["psk"])) if "psk" in p else None
    port = _typed(ctx, p, "ike_port", where, int, "a UDP port") if "ike_port" in p else 500
    extra = {}
    if vip:
        # the inner address must be of the family the gateway's subnets use: IPv6 for an
        # IPv6-only site (INTERNAL_IP6_ADDRESS, RFC 7296 §3.15.1), else IPv4
        extra["request_virtual_ip"] = (6,) if subnets and all(n.version == 6 for n in subnets) else (4,)
    if "virtual_ip_pool" in p:
        pool = _typed(ctx, p, "virtual_ip_pool", where, str, "a CIDR prefix such as 10.99.0.0/24")
        for part in pool.split(","):
            try:
                ipaddress.ip_network(part.strip())
            except ValueError as exc:
                raise ctx.err(_line(p, "virtual_ip_pool"), f"{where}virtual_ip_pool",
                              f"{part!r}: {exc}; write e.g. 10.99.0.0/24")
        extra["virtual_ip_pool"] = pool
    try:
        PeerPolicy(**extra)
    except TypeError:
        raise ctx.err(_line(p, "virtual_ip" if vip else "virtual_ip_pool"), f"{where}virtual_ip",
                      "this build's IKE core has no configuration payload yet; remove the key")
    defaults = PeerPolicy()
    extra["ike_lifetime_s"] = _lifetime(ctx, p, "ike_lifetime", where, defaults.ike_lifetime_s)
    extra["child_lifetime_s"] = _lifetime(ctx, p, "child_lifetime", where, defaults.child_lifetime_s)
    if "fragment_size" in p:
        fs = _typed(ctx, p, "fragment_size", where, int, "a number of octets")
        if not 576 <= fs <= 65535:
            raise ctx.err(_line(p, "fragment_size"), f"{where}fragment_size",
                          f"{fs} is out of range; use 576..65535 octets (1280 is safe on any IPv6 path)")
        extra["fragment_size"] = fs
    if "bind_endpoints" in p:  # PAD endpoint binding (RFC 4301 §4.4.3, docs/ike-hardening.md)
        extra["bind_endpoints"] = _typed(ctx, p, "bind_endpoints", where, bool, "true or false")
    for key in ("child_lifetime_bytes", "child_lifetime_packets"):  # RFC 4301 §4.4.2.1
        if key in p:
            extra[key] = _volume(ctx, p, key, where)
    extra.update(_liveness(ctx, p, where))
    policy = PeerPolicy(
        mode=mode, encapsulation=encap, protocol=protocol, **extra,
        ike_proposals=_proposals(ctx, p, "ike_proposals", where, "ike", DEFAULT_IKE_PROPOSALS),
        esp_proposals=_proposals(ctx, p, "esp_proposals", where, "esp", DEFAULT_ESP_PROPOSALS, protocol),
    )
    return Peer(name=pname, identity=ident, endpoints=tuple(eps), subnets=subnets, policy=policy,
                ike_port=port, psk=psk, initiate=initiate, responder_only=responder_only)


def _liveness(ctx, p, where: str) -> dict:
    """``dpd_interval`` and the IKE retransmission keys of one peer -> PeerPolicy fields."""
    from agent.ike.retransmit import RetransmitSchedule
    out: dict = {}
    for key, field in (("dpd_interval", "dpd_interval_s"), ("retransmit_timeout", "retransmit_timeout_s"),
                       ("init_retransmit_timeout", "init_retransmit_timeout_s")):
        if key in p:
            try:
                out[field] = parse_duration(p[key])
            except ValueError as exc:
                raise ctx.err(_line(p, key), f"{where}{key}", str(exc))
    if "retransmit_base" in p:
        base = p["retransmit_base"]
        if isinstance(base, bool) or not isinstance(base, (int, float)):
            raise ctx.err(_line(p, "retransmit_base"), f"{where}retransmit_base",
                          f"{base!r} is not a number; give a factor from 1 to 10 (e.g. 2)")
        out["retransmit_base"] = float(base)
    if "retransmit_tries" in p:
        out["retransmit_tries"] = _typed(ctx, p, "retransmit_tries", where, int, "a whole number from 0 to 20")
    d = PeerPolicy()
    try:
        RetransmitSchedule(out.get("retransmit_timeout_s", d.retransmit_timeout_s),
                           out.get("retransmit_base", d.retransmit_base),
                           out.get("retransmit_tries", d.retransmit_tries),
                           out.get("init_retransmit_timeout_s", d.init_retransmit_timeout_s))
    except ValueError as exc:
        key = next((k for k in ("retransmit_timeout", "retransmit_base", "retransmit_tries",
                                "init_retransmit_timeout") if k in p), "retransmit_timeout")
        raise ctx.err(_line(p, key), f"{where}{key}", str(exc))
    return out


def parse_config(text: str, path: str = "<config>") -> tuple[NodeView, Credentials, DatapathSettings]:
    """Parse YAML ``text`` (``path`` only names the file in errors). Raises ConfigError."""
    ctx = _Ctx(path)
    try:
        m = yaml.load(text, Loader=_Loader)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("{file}", path)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        raise ConfigError(f"{path}:{line}: YAML syntax error: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(m, dict):
        raise ctx.err(1, "(top level)", "expected a mapping with name, local_address, auth, peers")
    _check_keys(ctx, m, {"name", "local_address", "subnets", "tun", "auth", "peers"}, "")
    name = _req(ctx, m, "name", "", str, "this node's name, e.g. name: gw-a")
    local = _address(ctx, m, "local_address", "") if "local_address" in m else None
    subnets = _subnets(ctx, m, "subnets", "")
    tun_name, mtu, addrs, clamp = None, None, (), False
    if "tun" in m:
        t = m["tun"]
        if not isinstance(t, dict):
            raise ctx.err(_line(m, "tun"), "tun", "expected a mapping {name, mtu, address}")
        _check_keys(ctx, t, {"name", "mtu", "address", "mss_clamp"}, "tun.")
        if "mss_clamp" in t:
            clamp = _typed(ctx, t, "mss_clamp", "tun.", bool, "true or false")
        if "name" in t:
            tun_name = _typed(ctx, t, "name", "tun.", str, "an interface name")
            if not 0 < len(tun_name.encode()) <= 15:
                raise ctx.err(_line(t, "name"), "tun.name", "must be 1 to 15 bytes (Linux IFNAMSIZ)")
        if t.get("mtu") == "auto":
            pass
        elif "mtu" in t:
            mtu = _typed(ctx, t, "mtu", "tun.", int, "an integer")
            if not 576 <= mtu <= 65535:
                raise ctx.err(_line(t, "mtu"), "tun.mtu", f"{mtu} is out of range; use 576..65535 (1400 is typical)")
        a_items, a_lines = _str_list(ctx, t, "address", "tun.", "CIDR addresses such as 10.200.9.1/32")
        for s, ln in zip(a_items, a_lines):
            try:
                ipaddress.ip_interface(s)
            except ValueError:
                raise ctx.err(ln, "tun.address", f"{s!r} is not an address with prefix, e.g. 10.200.9.1/32")
        addrs = tuple(a_items)
    creds = _credentials(ctx, m)
    peers_raw = m.get("peers") or []
    if not isinstance(peers_raw, list):
        raise ctx.err(_line(m, "peers"), "peers", "expected a list of peers")
    peers = []
    seen: dict[str, int] = {}
    for i, p in enumerate(peers_raw):
        peer = _peer(ctx, name, p, i)
        if peer.name in seen or peer.name == name:
            raise ctx.err(p.line, f"peers[{i}].name", f"{peer.name!r} is duplicated or is this node; "
                          "give every peer a unique name")
        seen[peer.name] = i
        peers.append(peer)
    if not subnets and local is not None and any(p.policy.mode == "transport" for p in peers):
        subnets = (ipaddress.ip_network(local),)  # transport mode: our own address is the selector
    view = NodeView(name=name, identity=name, subnets=subnets, peers=tuple(peers), local_address=local)
    return view, creds, DatapathSettings(tun_name=tun_name, mtu=mtu, tun_addresses=addrs, local_address=local,
                                         mss_clamp=clamp, mtu_auto=mtu is None)


def load_config(path: str) -> tuple[NodeView, Credentials, DatapathSettings]:
    """Read and parse ``path``. Raises ConfigError (also for an unreadable file)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                          "save the file as UTF-8 (is it the right file, not a key or a binary?)") from None
    return parse_config(text, path)
