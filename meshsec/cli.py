"""``meshsec``: operator CLI. ``meshsec status [--socket PATH] [--json]``,
``meshsec rekey PEER [--ike] [--socket PATH]``,
``meshsec ready [--grace SECONDS] [--socket PATH]`` (a readiness probe),
``meshsec mesh [--json]`` (meshsec.cli_mesh).

Talks to a running meshsec-agent over its control socket (newline-delimited
JSON, agent.datapath.control_socket); ``mesh`` asks the controller. Exit
status: 0 ok, 1 agent / controller not reachable or error answer (``ready``:
or not ready yet), 2 usage.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from meshsec.cli_common import DEFAULT_SOCKET, CliError, _age, _size, _table, request


def _drops(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted((d or {}).items()) if v) or "-"


def _sa_kind(c: dict) -> str:
    """e.g. ``esp/transport/udp``. The ESP SA of an ah+esp bundle travels inside its AH SA
    (RFC 4301 §4.5: IP/AH/ESP, never in UDP, whatever NAT-T said): ``esp/transport in ah
    SPI_o``; the AH SA has its own row (``ah/transport/none``)."""
    if c.get("ah"):
        return f"{c.get('protocol', 'esp')}/{c.get('mode', '?')} in ah {c['ah']}_o"
    encap = c.get("encapsulation") or ("udp" if c.get("udp_encap") else "none")
    return f"{c.get('protocol', 'esp')}/{c.get('mode', '?')}/{encap}"


def _life(c: dict) -> str:
    """Byte/packet lifetime use of a CHILD_SA (RFC 4301 §4.4.2.1): the busier direction
    against the limit, e.g. ``1.2MiB/10.0MiB 900/1000p``; ``-`` without limits."""
    life = c.get("lifetime") or {}
    parts = []
    for key, fmt in (("bytes", _size), ("packets", lambda n: f"{int(n or 0)}")):
        d = life.get(key) or {}
        if d.get("limit"):
            used = max(d.get("used_in", 0) or 0, d.get("used_out", 0) or 0)
            parts.append(f"{fmt(used)}/{fmt(d['limit'])}" + ("p" if key == "packets" else ""))
    if life.get("expired"):
        parts.append("EXPIRED")
    return " ".join(parts) or "-"


def _selector_extra(e: dict) -> str:
    """Next-layer protocol and ports of an SPD entry (any when the entry has none)."""
    proto = e.get("protocol")
    if proto in (None, "", "any"):
        return "any"
    ports = [f"{k}={e[k]}" for k in ("local_ports", "remote_ports") if e.get(k) not in (None, "", "any")]
    return " ".join([str(proto)] + ports)


def format_status(st: dict) -> str:
    """Human-readable status (the agent's status JSON as produced by Runtime.status)."""
    src = st.get("view_source")
    src = {"stored": " (STORED: controller unreachable)", "none": " (waiting for the controller)"}.get(src, "")
    out = [f"node {st.get('node', '?')}  local {st.get('local_address', '?')}  tun {st.get('tun', '?')}  "
           f"view v{st.get('view_version', 0)}{src}  up {_age(st.get('uptime_s'))}", ""]
    ctl = st.get("controller")
    if ctl:
        if ctl.get("reachable") is None:
            out.append(f"controller {ctl.get('address', '?')}: not asked yet")
        elif ctl.get("reachable") and not ctl.get("error"):
            out.append(f"controller {ctl.get('address', '?')}: reachable (last report "
                       f"{_age(time.time() - ctl['last_ok']) if ctl.get('last_ok') else '-'} ago)")
        else:
            last = f"; last answer {_age(time.time() - ctl['last_ok'])} ago" if ctl.get("last_ok") else ""
            state = "answers but refused the report" if ctl.get("reachable") else "UNREACHABLE"
            out.append(f"controller {ctl.get('address', '?')}: {state}: {ctl.get('error') or '?'}{last}")
    if st.get("cert_not_after"):
        left = st["cert_not_after"] - time.time()
        out.append(f"certificate expires in {_age(left)}" if left > 0 else "certificate EXPIRED")
    if ctl or st.get("cert_not_after"):
        out.append("")
    peers = st.get("peers")
    if peers is not None:
        out.append(f"PEERS ({len(peers)})")
        if peers:
            now = time.time()
            rows = [[p["name"], p["state"].upper() if p["state"] == "down" else p["state"], p.get("ike_state") or "-",
                     p.get("endpoint") or "-", _age(now - p["last_handshake"]) + " ago" if p.get("last_handshake")
                     else "never", f"{_size(p.get('bytes_in'))}/{_size(p.get('bytes_out'))}",
                     str(p.get("mtu") or "-"), p.get("rule") or "-",
                     (f"{p['last_error']} ({_age(now - p['last_error_at'])} ago)" if p.get("last_error") else "-")]
                    for p in peers]
            out.append(_table(["PEER", "STATE", "IKE_SA", "ENDPOINT", "LAST HANDSHAKE", "IN/OUT", "MTU", "RULE",
                               "LAST ERROR"], rows))
        out.append("")
    errs = st.get("policy_errors") or {}
    if errs:
        out.append(f"REFUSED PEERS ({len(errs)}): bad policy data, fix it in the inventory / config")
        out += [f"  {peer}: {why}" for peer, why in sorted(errs.items())]
        out.append("")
    last = dict(st.get("peer_errors") or {})
    for s in st.get("ike_sas") or []:
        if s.get("last_error") and s.get("peer"):
            last.setdefault(s["peer"], s["last_error"])
    if last:
        # the last IKE_SA failure or CHILD_SA refusal per peer, until a CHILD_SA with it is up
        out.append(f"LAST ERRORS ({len(last)})")
        out += [f"  {peer}: {why}" for peer, why in sorted(last.items())]
        out.append("")
    ike = st.get("ike_sas") or []
    out.append(f"IKE_SAs ({len(ike)})")
    if ike:
        rows = []
        for s in ike:
            est = s.get("established_age_s", s.get("age_s"))
            rows.append([s.get("peer", "?"), f"{s.get('spi_i', '?')}_i {s.get('spi_r', '?')}_r",
                         s.get("state", "?"), s.get("algorithms", "-") or "-", _age(est) if est is not None else "-"])
        out.append(_table(["PEER", "SPIs", "STATE", "ALGORITHMS", "AGE"], rows))
    out.append("")
    ch = st.get("child_sas") or []
    out.append(f"CHILD_SAs ({len(ch)})")
    if ch:
        rows = [[c["peer"], f"{c['spi_in']}_in {c['spi_out']}_out", _sa_kind(c), c.get("via") or "-",
                 c.get("algorithms", "-"), _age(c.get("age_s")),
                 f"{_size(c.get('bytes_in'))}/{c.get('packets_in', 0)}p",
                 f"{_size(c.get('bytes_out'))}/{c.get('packets_out', 0)}p", _drops(c.get("drops"))] for c in ch]
        headers = ["PEER", "SPIs", "PROTO/MODE/ENCAP", "VIA", "ALGORITHMS", "AGE", "IN", "OUT", "DROPS"]
        if any(_life(c) != "-" for c in ch):  # byte/packet lifetimes configured: show their use
            headers.insert(8, "LIFETIME USED")
            for r, c in zip(rows, ch):
                r.insert(8, _life(c))
        out.append(_table(headers, rows))
    out.append("")
    spd = st.get("spd")
    if spd is not None:
        # RFC 4301 §4.4.1: entries in lookup order, first match wins
        out.append(f"SPD ({len(spd)} entries, first match wins)")
        if spd:
            rows = [[str(i), e.get("local", "any"), e.get("remote", "any"), _selector_extra(e),
                     str(e.get("action", "?")).upper(), e.get("peer") or "-", e.get("rule") or "-",
                     e.get("name") or "-", e.get("bundle") or "-", str(e.get("hits", 0))]
                    for i, e in enumerate(spd, 1)]
            out.append(_table(["#", "LOCAL", "REMOTE", "PROTO/PORTS", "ACTION", "PEER", "RULE", "ENTRY", "BUNDLE",
                               "HITS"], rows))
        mtu = st.get("tun_mtu")
        if mtu is not None:
            out.append(f"TUN MTU {mtu}  underlay MTU {st.get('underlay_mtu') or '?'}")
        out.append("")
    out.append("drops: " + _drops(st.get("drops")))
    if st.get("ike_drops"):
        out.append("IKE drops: " + _drops(st.get("ike_drops")))
    early = (st.get("before_first_view") or {}).get("ike_dropped")
    if early:
        out.append(f"before first view: {early} IKE packets ignored (normal at start; peers retransmit)")
    if st.get("route_carve_outs"):
        out.append("kept out of the TUN (covered by a peer's subnet): " + ", ".join(st["route_carve_outs"]))
    if st.get("guarded"):
        out.append("fail closed (dropped whenever no agent runs): " + ", ".join(st["guarded"]))
    if st.get("internal_errors"):
        out.append(f"internal errors: {st['internal_errors']} (logged by the agent; please report them)")
    return "\n".join(out)


DEFAULT_GRACE = 120.0


def readiness(st: dict, grace_s: float) -> tuple[bool, str]:
    """(ready, why) from an agent status: ready once it has a view and a CHILD_SA with every
    peer its view asks for (``peers_expected``: PROTECT peers with an endpoint), or once
    ``grace_s`` seconds of uptime have passed (a dead peer must not block a rollout forever;
    0: no grace, only the CHILD_SAs count, as for ``helm test``)."""
    up = float(st.get("uptime_s") or 0.0)
    if st.get("view_source") == "none":
        missing = "no view from the controller yet"
    else:
        have = {c.get("peer") for c in st.get("child_sas") or []}
        lacking = sorted(set(st.get("peers_expected") or []) - have)
        if not lacking:
            return True, f"ready: CHILD_SAs with all {len(st.get('peers_expected') or [])} expected peers"
        missing = f"no CHILD_SA yet with {len(lacking)} peers: {', '.join(lacking[:10])}" + (
            " ..." if len(lacking) > 10 else "")
    if grace_s > 0 and up >= grace_s:
        return True, f"ready (grace of {grace_s:g}s passed, up {up:.0f}s): {missing}"
    if grace_s <= 0:
        return False, f"not ready (no grace): {missing}"
    return False, f"not ready (up {up:.0f}s of {grace_s:g}s grace): {missing}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="meshsec", description="meshsec operator CLI")
    from meshsec.version import version_line
    p.add_argument("--version", action="version", version=version_line("meshsec"))
    sub = p.add_subparsers(dest="cmd", required=True)
    ps = sub.add_parser("status", help="peers (state, last handshake, last error, endpoint), IKE_SAs, CHILD_SAs "
                                       "and drop counters of the local agent; whether the controller answers")
    ps.add_argument("--socket", default=DEFAULT_SOCKET, help=f"agent control socket (default {DEFAULT_SOCKET})")
    ps.add_argument("--json", action="store_true", help="print the raw JSON status")
    pr = sub.add_parser("rekey", help="rekey the CHILD_SA(s) with a peer now (RFC 7296 §1.3.3), or with "
                                      "--ike its IKE_SA (§1.3.2)")
    pr.add_argument("peer", metavar="PEER", help="peer name as in `meshsec status`")
    pr.add_argument("--ike", action="store_true", help="rekey the IKE_SA instead of the CHILD_SA(s)")
    pr.add_argument("--socket", default=DEFAULT_SOCKET, help=f"agent control socket (default {DEFAULT_SOCKET})")
    pq = sub.add_parser("ready", help="readiness probe: exit 0 once the agent has CHILD_SAs with every peer "
                                      "its view asks for, or --grace seconds after it started; 1 otherwise")
    pq.add_argument("--grace", type=float, default=DEFAULT_GRACE, metavar="SECONDS",
                    help=f"ready anyway after this much agent uptime (default {DEFAULT_GRACE:g}; 0: never, only "
                         "the CHILD_SAs count)")
    pq.add_argument("--socket", default=DEFAULT_SOCKET, help=f"agent control socket (default {DEFAULT_SOCKET})")
    from meshsec import cli_mesh
    cli_mesh.add_parser(sub)
    args = p.parse_args(argv)
    if args.cmd == "mesh":
        return cli_mesh.run(args)
    if args.cmd == "ready":
        if args.grace < 0:
            p.error(f"--grace {args.grace:g}: use 0 or more seconds")
        try:
            ok, why = readiness(request(args.socket, {"cmd": "status"}), args.grace)
        except CliError as exc:
            print(f"meshsec: not ready: {exc}", file=sys.stderr)
            return 1
        print(why, file=sys.stdout if ok else sys.stderr)
        return 0 if ok else 1
    if args.cmd == "rekey":
        what = "ike" if args.ike else "child"
        try:
            ans = request(args.socket, {"cmd": "rekey", "peer": args.peer, "what": what})
        except CliError as exc:
            print(f"meshsec: {exc}", file=sys.stderr)
            return 1
        kind = "IKE_SA" if what == "ike" else "CHILD_SA"
        print(f"{kind} rekey with {args.peer} started ({', '.join(ans.get('spis') or []) or '-'}); "
              "`meshsec status` shows the new SA")
        return 0
    try:
        st = request(args.socket, {"cmd": "status"})
    except CliError as exc:
        print(f"meshsec: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
    else:
        print(format_status(st))
    return 0


if __name__ == "__main__":
    sys.exit(main())
