"""The last NodeView applied in controller mode, kept on disk for restarts while the
controller is down.

File ``<state-dir>/view.json`` (mode 0600, replaced atomically: written to a
temporary file in the same directory, fsync'ed, renamed)::

    {"format": 1, "saved_at": 1764400000.0,      # Unix time
     "view": {"name": "gw-a", "identity": "gw-a", "version": 17,
              "subnets": ["10.1.0.0/24"], "local_address": "198.51.100.1",
              "revoked_serials": [4660],
              "peers": [{"name": "gw-b", "identity": "gw-b", "endpoints": ["198.51.100.2"],
                         "subnets": ["10.2.0.0/24"], "ike_port": 500, "initiate": true,
                         "policy": {<every PeerPolicy field>}}]}}

No key material: per-peer pre-shared keys (standalone mode only) are never written.
The node's key and certificate stay where agent.control keeps them (node.key,
node.crt, mesh-ca.pem in the same directory); ``stored_credentials`` reads them
back and checks the certificate is valid now (a stored view is used only with a
valid certificate, else the agent waits for the controller).
"""
from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import time
from pathlib import Path

# the files the key store (agent.keystore) keeps in the state directory
from agent.keystore import CA_FILE, CERT_FILE, KEY_FILE
from agent.model import Credentials, NodeView, Peer, PeerPolicy

VIEW_FILE = "view.json"
FORMAT = 1


class StoredStateError(Exception):
    """The stored view or credentials cannot be used; the message says why."""


def view_to_json(view: NodeView) -> dict:
    """NodeView -> JSON-ready dict (no pre-shared keys)."""
    peers = []
    for p in view.peers:
        pol = {}
        for f in dataclasses.fields(PeerPolicy):
            v = getattr(p.policy, f.name)
            pol[f.name] = list(v) if isinstance(v, tuple) else v
        peers.append({"name": p.name, "identity": p.identity, "endpoints": list(p.endpoints),
                      "subnets": [str(n) for n in p.subnets], "ike_port": p.ike_port,
                      "initiate": p.initiate, "policy": pol})
    return {"name": view.name, "identity": view.identity, "version": view.version,
            "subnets": [str(n) for n in view.subnets], "local_address": view.local_address,
            "revoked_serials": sorted(int(s) for s in view.revoked_serials), "peers": peers}


def _policy(d: dict) -> PeerPolicy:
    if not isinstance(d, dict):
        raise ValueError("policy is not an object")
    defaults = PeerPolicy()
    kw = {}
    for f in dataclasses.fields(PeerPolicy):
        if f.name not in d:
            continue  # written by an older agent: the default
        v, dv = d[f.name], getattr(defaults, f.name)
        if isinstance(dv, tuple):
            if not isinstance(v, list):
                raise ValueError(f"policy.{f.name} is not a list")
            v = tuple(v)
        elif isinstance(dv, bool):
            if not isinstance(v, bool):
                raise ValueError(f"policy.{f.name} is not true/false")
        elif isinstance(dv, (int, float)) and (not isinstance(v, (int, float)) or isinstance(v, bool)):
            raise ValueError(f"policy.{f.name} is not a number")
        kw[f.name] = v
    return PeerPolicy(**kw)


def view_from_json(d: dict) -> NodeView:
    """Inverse of ``view_to_json``. ValueError naming the bad field."""
    if not isinstance(d, dict):
        raise ValueError("view is not an object")
    try:
        peers = []
        for i, p in enumerate(d.get("peers") or []):
            try:
                for e in p["endpoints"]:
                    ipaddress.ip_address(e)
                peers.append(Peer(name=str(p["name"]), identity=str(p.get("identity") or p["name"]),
                                  endpoints=tuple(p["endpoints"]),
                                  subnets=tuple(ipaddress.ip_network(s) for s in p.get("subnets") or ()),
                                  policy=_policy(p.get("policy") or {}), ike_port=int(p.get("ike_port", 500)),
                                  initiate=bool(p.get("initiate", True))))
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"peers[{i}]: {exc}") from None
        version = d["version"]
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise ValueError(f"version {version!r}")
        local = d.get("local_address")
        if local is not None:
            ipaddress.ip_address(local)
        return NodeView(name=str(d["name"]), identity=str(d.get("identity") or d["name"]),
                        subnets=tuple(ipaddress.ip_network(s) for s in d.get("subnets") or ()),
                        peers=tuple(peers), local_address=local, version=version,
                        revoked_serials=frozenset(int(s) for s in d.get("revoked_serials") or ()))
    except KeyError as exc:
        raise ValueError(f"missing {exc}") from None
    except TypeError as exc:
        raise ValueError(str(exc)) from None


def save_view(state_dir: str | Path, view: NodeView, *, now: float | None = None) -> Path:
    """Write ``view`` to ``<state_dir>/view.json`` atomically, mode 0600 (OSError on failure)."""
    d = Path(state_dir)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = d / VIEW_FILE
    tmp = d / f".{VIEW_FILE}.{os.getpid()}.tmp"
    data = json.dumps({"format": FORMAT, "saved_at": time.time() if now is None else now,
                       "view": view_to_json(view)}, sort_keys=True).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def load_view(state_dir: str | Path, node_name: str) -> tuple[NodeView, float]:
    """(view, saved_at Unix time) from ``<state_dir>/view.json``. StoredStateError if there is
    none, it does not parse, or it belongs to another node."""
    path = Path(state_dir) / VIEW_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise StoredStateError(f"no stored view ({path} does not exist yet)") from None
    except OSError as exc:
        raise StoredStateError(f"cannot read {path}: {exc.strerror}") from None
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"format {doc.get('format') if isinstance(doc, dict) else None!r}, expected {FORMAT}")
        view = view_from_json(doc.get("view"))
        saved_at = float(doc.get("saved_at", 0.0))
    except (ValueError, TypeError) as exc:
        raise StoredStateError(f"{path} is unusable ({exc}); it is rewritten when the controller sends a view") \
            from None
    if view.name != node_name:
        raise StoredStateError(f"{path} is the view of node {view.name!r}, not {node_name!r}")
    return view, saved_at


def stored_credentials(state_dir: str | Path, node_name: str, now: float) -> tuple[Credentials, float]:
    """(Credentials, notAfter Unix time) from the key, certificate chain and CAs agent.control
    stored. StoredStateError unless they exist, match (key, identity ``node_name``) and the
    certificate is valid at ``now`` (Unix time)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    d = Path(state_dir)
    try:
        key_pem = (d / KEY_FILE).read_bytes()
        chain = x509.load_pem_x509_certificates((d / CERT_FILE).read_bytes())
        cas = x509.load_pem_x509_certificates((d / CA_FILE).read_bytes())
        key = serialization.load_pem_private_key(key_pem, password=None)
    except FileNotFoundError as exc:
        raise StoredStateError(f"no stored certificate ({exc.filename} missing)") from None
    except (OSError, ValueError, TypeError) as exc:
        raise StoredStateError(f"stored key/certificate in {d} unreadable ({exc})") from None
    leaf = chain[0]
    if leaf.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) \
            != key.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo):
        raise StoredStateError(f"stored certificate in {d} is not for the stored key")
    try:
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName)
    except x509.ExtensionNotFound:
        sans = []
    if node_name not in sans:
        raise StoredStateError(f"stored certificate in {d} is not for node {node_name!r}")
    nb, na = leaf.not_valid_before_utc.timestamp(), leaf.not_valid_after_utc.timestamp()
    if not nb <= now < na:
        raise StoredStateError(f"stored certificate is not valid now (valid {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} "
                               f"to {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC)")
    der = serialization.Encoding.DER
    return Credentials(private_key_pem=key_pem, certificate_chain=tuple(c.public_bytes(der) for c in chain),
                       ca_certificates=tuple(c.public_bytes(der) for c in cas)), na
