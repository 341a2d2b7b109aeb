"""``meshsec mesh``: the whole mesh as the controller sees it (docs/metrics.md,
"Seeing the mesh").

Two ways to ask:
- on the controller host: its status socket (``--socket``, default
  ``/var/lib/meshsec-controller/controller.sock``, ``controller.sock`` in the
  controller's default ``--state-dir``; mode 0600: run as the controller's user);
- from any node: ``--controller HOST:PORT`` calls ``GetMesh`` on the
  controller's watch port with mutual TLS, using the node's own certificate
  and key from the agent's ``--state-dir`` (``node.crt``, ``node.key``) and
  the CA in ``--controller-ca`` (default: ``STATE_DIR/mesh-ca.pem``).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

DEFAULT_CONTROLLER_SOCKET = "/var/lib/meshsec-controller/controller.sock"  # in its default --state-dir
DEFAULT_AGENT_STATE_DIR = "/var/lib/meshsec"


def add_parser(sub) -> None:
    p = sub.add_parser("mesh", help="every node and pair of the mesh, from the controller (like "
                                    "`subctl show connections`)",
                       description="Print every enrolled node (connected to the controller or not) and every "
                                   "pair (up, down with the reason, never tried). On the controller host it "
                                   "reads the controller's status socket; elsewhere give --controller.")
    p.add_argument("--socket", default=DEFAULT_CONTROLLER_SOCKET,
                   help=f"controller status socket (default {DEFAULT_CONTROLLER_SOCKET})")
    p.add_argument("--controller", metavar="HOST:PORT",
                   help="ask the controller over the network instead (its enrol address; the watch port, "
                        "PORT+1 unless --watch-address, is used with this node's certificate)")
    p.add_argument("--watch-address", metavar="HOST:PORT", help="the controller's mutual-TLS port")
    p.add_argument("--state-dir", default=DEFAULT_AGENT_STATE_DIR,
                   help=f"the agent's state directory with node.crt / node.key (default {DEFAULT_AGENT_STATE_DIR})")
    p.add_argument("--controller-ca", metavar="FILE", help="CA of the controller (default STATE_DIR/mesh-ca.pem)")
    p.add_argument("--all", action="store_true", help="also list pairs never tried")
    p.add_argument("--json", action="store_true", help="print the mesh document as JSON")


def fetch_remote(controller: str, watch_address: str | None, state_dir: str, ca_file: str | None,
                 timeout: float = 10.0) -> dict:
    """GetMesh over mutual TLS; CliError with the reason on failure."""
    import grpc

    from meshsec.cli_common import CliError
    from meshsec.v1 import controller_pb2 as pb
    from meshsec.v1 import controller_pb2_grpc as pb_grpc

    where = watch_address
    if not where:
        host, sep, port = controller.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise CliError(f"--controller {controller!r} is not HOST:PORT")
        where = f"{host}:{int(port) + 1}"  # the watch port (mutual TLS) is the enrol port + 1 by default
    d = Path(state_dir)
    try:
        key = (d / "node.key").read_bytes()
        chain = (d / "node.crt").read_bytes()
        ca = Path(ca_file).read_bytes() if ca_file else (d / "mesh-ca.pem").read_bytes()
    except OSError as e:
        raise CliError(f"cannot read {e.filename}: {e.strerror}; --state-dir must be an enrolled agent's state "
                       "directory (node.key, node.crt, mesh-ca.pem), readable by this user") from None
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=chain)
    # the controller's certificate always names "meshsec-controller", whatever address reaches it
    with grpc.secure_channel(where, creds, options=[("grpc.ssl_target_name_override", "meshsec-controller")]) as ch:
        try:
            resp = pb_grpc.ControllerStub(ch).GetMesh(pb.GetMeshRequest(), timeout=timeout)
        except grpc.RpcError as e:
            code = e.code().name if hasattr(e, "code") and e.code() else "error"
            raise CliError(f"controller {where}: {code}: {e.details() if hasattr(e, 'details') else e}") from None
    try:
        return json.loads(resp.json)
    except ValueError as e:
        raise CliError(f"controller {where} sent an unreadable mesh document: {e}") from None


def _ago(ts, now: float) -> str:
    from meshsec.cli_common import _age
    return f"{_age(max(0.0, now - ts))} ago" if ts else "never"


def _rate(bps) -> str:
    if bps is None:
        return "-"
    for unit in ("bit/s", "kbit/s", "Mbit/s", "Gbit/s"):
        if bps < 1000 or unit == "Gbit/s":
            return f"{bps:.0f}{unit}" if unit == "bit/s" else f"{bps:.1f}{unit}"
        bps /= 1000
    return "-"


def format_mesh(doc: dict, *, show_all: bool = False, now: float | None = None) -> str:
    """The mesh document as two tables (nodes, pairs)."""
    from meshsec.cli_common import _age, _table
    now = time.time() if now is None else now
    s = doc.get("summary", {})
    pc = s.get("pairs", {})
    out = [f"mesh: {s.get('nodes', 0)} nodes, {s.get('enrolled', 0)} enrolled, {s.get('connected', 0)} connected "
           f"to the controller; view v{doc.get('view_version', 0)}"
           + ("" if doc.get("leader", True) else " (this controller replica is a follower: it knows only the "
                                                    "reports of agents talking to it)"), ""]
    rows = []
    for n in doc.get("nodes", []):
        cert = n.get("cert_not_after")
        rows.append([n["name"], n.get("site", "-"), n.get("role", "-"), "yes" if n.get("enrolled") else "no",
                     "yes" if n.get("connected") else ("no" if n.get("last_report_at") else "never"),
                     _ago(n.get("last_report_at"), now), _age(cert - now) if cert and cert > now else
                     ("EXPIRED" if cert else "-"),
                     str(n.get("peers_up")) if n.get("peers_up") is not None else "-",
                     ",".join(n.get("endpoints") or []) or "-"])
    out.append(f"NODES ({len(rows)})")
    out.append(_table(["NODE", "SITE", "ROLE", "ENROLLED", "CONNECTED", "LAST REPORT", "CERT EXPIRES IN",
                       "PEERS UP", "ENDPOINTS"], rows))
    out.append("")
    pairs = [p for p in doc.get("pairs", []) if show_all or p["state"] != "never"]
    hidden = len(doc.get("pairs", [])) - len(pairs)
    out.append(f"PAIRS: {pc.get('up', 0)} up, {pc.get('down', 0)} down, {pc.get('connecting', 0)} connecting, "
               f"{pc.get('never', 0)} never tried, {pc.get('unknown', 0)} unknown"
               + "".join(f", {pc[k]} {k}" for k in ("bypass", "discard") if pc.get(k)))
    rows = []
    for p in pairs:
        rows.append([f"{p['a']} <-> {p['b']}", p["state"].upper() if p["state"] == "down" else p["state"],
                     f"{p.get('rule', '-')} ({p.get('action', '-')})", f"{p.get('protocol', '-')}/{p.get('mode', '-')}",
                     _ago(p.get("last_handshake"), now), _rate(p.get("bps_a_to_b")), _rate(p.get("bps_b_to_a")),
                     p.get("reason") or "-"])
    if rows:
        out.append(_table(["PAIR", "STATE", "RULE", "PROTO/MODE", "LAST HANDSHAKE", "A->B", "B->A", "REASON"], rows))
    if hidden:
        out.append(f"({hidden} pairs never tried not shown; --all lists them)")
    if doc.get("pairs_truncated"):
        out.append(f"({s.get('pairs_unlisted', '?')} more pairs no recent report shows as tried are not listed: "
                   "large mesh)")
    return "\n".join(out)


def run(args) -> int:
    import sys

    from meshsec.cli_common import CliError, request
    try:
        if args.controller:
            doc = fetch_remote(args.controller, args.watch_address, args.state_dir, args.controller_ca)
        else:
            try:
                doc = request(args.socket, {"cmd": "mesh"}, who="meshsec-controller")
            except CliError as e:
                raise CliError(f"{e} (the controller's status socket; from a node pass --controller HOST:PORT)")
    except CliError as exc:
        print(f"meshsec: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(format_mesh(doc, show_all=args.all))
    return 0
