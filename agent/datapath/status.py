"""The runtime's status (``meshsec status``, the control socket) and the operator's
rekey command. Both run on the loop thread and take the Runtime ``rt``; no keys
ever appear in what they return.
"""
from __future__ import annotations

import time

from agent.esp import Action

DROP_REASONS = ("no_sa", "no_policy", "discard", "unknown_spi", "policy", "malformed", "send_errors",
                "too_big", "no_raw_socket", "nesting_loop", "ah_drops", "no_endpoint", "fragment", "narrowed",
                "held_expired")
# IKE packets dropped in controller mode before the first view arrived: expected once or
# twice at every start (the peer retransmits), so shown apart from the drops
BEFORE_FIRST_VIEW = "no_view_yet"


def rekey_command(rt, req: dict) -> dict:
    """``{"cmd": "rekey", "peer": NAME, "what": "child" | "ike"}``: start a CHILD_SA rekey
    (RFC 7296 §1.3.3) of every CHILD_SA that sends to ``peer`` (with "ah+esp", the ESP and
    the AH one), or an IKE_SA rekey (§1.3.2). Answers ``{"ok": true, "peer", "what",
    "spis": [inbound SPIs, hex]}`` once the CREATE_CHILD_SA request is sent (the new SA
    follows as ChildSaEstablished / IkeSaEstablished), else ``{"error": ...}`` saying why."""
    peer, what = req.get("peer"), req.get("what", "child")
    if not isinstance(peer, str) or rt.view.peer(peer) is None:
        known = ", ".join(sorted(p.name for p in rt.view.peers)) or "none"
        return {"error": f"rekey: unknown peer {peer!r}; known peers: {known}"}
    if what not in ("child", "ike"):
        return {"error": f"rekey: what={what!r}; use \"child\" or \"ike\""}
    now = rt.clock()
    if what == "ike":
        ok = bool(rt.ike.rekey_ike(peer, now))
        if not ok:
            return {"error": f"rekey: no established IKE_SA with {peer}, or one is already being rekeyed "
                             "(see meshsec status)"}
        spis = [f"{s['spi_i']}_i" for s in rt.ike.status()
                if s.get("peer") == peer and s.get("state") == "ESTABLISHED"][:1]
    else:
        cur = rt.sad.current.get(peer)
        if cur is None:
            return {"error": f"rekey: no CHILD_SA with {peer} yet (see meshsec status)"}
        spis = []
        todo = []
        for s in rt.sad.sending.get(peer, (cur,)):  # every sending CHILD_SA (one per selector set)
            todo += [x for x in (s, s.ah) if x is not None and x not in todo]
        for ch in todo:
            if rt.ike.rekey_child(ch.inbound_spi, now):
                spis.append(f"{ch.inbound_spi:08x}")
        if not spis:
            return {"error": f"rekey: the CHILD_SA with {peer} is already being rekeyed or its IKE_SA is "
                             "busy; try again in a few seconds"}
    rt._flush_ike(now)
    rt.log.info("operator asked for a %s rekey with %s (%s)", "CHILD_SA" if what == "child" else "IKE_SA",
                peer, ", ".join(spis))
    return {"ok": True, "peer": peer, "what": what, "spis": spis}


def _spd_rows(rt) -> list[dict]:
    current = rt.sad.current
    hits = rt.policy.hits
    rows = []
    for e in rt.policy.spd.entries:
        row = {"local": str(e.local) if e.local is not None else "any",
               "remote": str(e.remote) if e.remote is not None else "any",
               "action": e.action.value, "peer": e.peer, "mode": e.mode, "name": e.name,
               "hits": hits.get(e, 0), "bundle": []}
        vp = rt.view.peer(e.peer) if e.peer else None
        row["rule"] = getattr(vp.policy, "rule", "") if vp is not None else ""  # controller policy rule
        for k in ("protocol", "local_ports", "remote_ports"):
            v = getattr(e, k, None)
            if v is not None:
                row[k] = v if isinstance(v, (int, str)) else str(v)
        cur = rt.policy.sa_for(e) if e.peer and e.action is Action.PROTECT else None
        seen = set()
        while cur is not None and cur.peer not in seen:  # the SAs applied, innermost first
            seen.add(cur.peer)
            row["bundle"].append(f"{cur.peer}:{cur.describe}")
            cur = current.get(cur.via) if cur.via else None
        row["bundle"] = " -> ".join(row["bundle"]) or ("-" if e.action is not Action.PROTECT else
                                                   "no SA yet" if e.peer not in current else "no SA for this pair")
        rows.append(row)
    return rows


def status(rt) -> dict:
    """JSON-ready status: node, IKE_SAs, CHILD_SAs with counters, SPD, global drops. No keys."""
    now = rt.clock()
    try:
        ike_sas = rt.ike.status()
    except Exception as exc:
        ike_sas = [{"error": str(exc)}]
    for s in ike_sas:
        est = s.get("established")
        if isinstance(est, (int, float)) and not isinstance(est, bool):
            s["age_s"] = round(now - est, 3)  # "established" is on the runtime's monotonic clock
    children = [ch.status(now) for ch in sorted(rt.sad.children.values(), key=lambda c: (c.peer, c.established))]
    counters = rt.counters
    drops = {k: counters[k] for k in DROP_REASONS if counters[k]}
    for ch in children:
        for k, v in ch["drops"].items():
            if k != "policy":  # already in the global counter
                drops[k] = drops.get(k, 0) + v
    ike_counters = dict(rt.ike.counters or {})
    return {
        "spd": _spd_rows(rt), "tun_mtu": rt.policy.tun_mtu, "underlay_mtu": rt.policy.underlay_mtu,
        "node": rt.view.name, "view_version": rt.view.version, "local_address": rt.local_address,
        "tun": getattr(rt.tun, "name", None), "uptime_s": round(time.time() - rt.started_wall, 3),
        "ike_sas": ike_sas, "child_sas": children,
        "drops": drops, "ike_drops": {k: v for k, v in ike_counters.items() if v},
        # per peer: drops counted by CHILD_SAs removed since the start (rekeyed, deleted)
        "retired_child_sa_drops": {p: dict(d) for p, d in getattr(rt.sad, "retired_drops", {}).items() if d},
        "counters": dict(counters),
        # controller mode: IKE requests that came before the first view (peers retransmit)
        "before_first_view": {"ike_dropped": counters[BEFORE_FIRST_VIEW]},
        "view_source": rt.view_source,
        "policy_errors": dict(rt.ike.policy_errors or {}),
        "peer_errors": dict(rt.ike.last_errors or {}),  # IkeManager.last_errors: the last error per peer
        "internal_errors": counters["internal_errors"],
        "route_carve_outs": sorted(getattr(rt.routes, "carve_outs", ()) or ()),
        # readiness (`meshsec ready`): PROTECT peers with an endpoint; the fail-closed guard
        "peers_expected": sorted(p.name for p in rt.view.peers if p.policy.action == "protect" and p.endpoints),
        "guarded": sorted(map(str, getattr(rt.routes, "guarded", ()) or ())),
    }
