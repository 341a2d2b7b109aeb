"""Kernel routes for peers' subnets via the TUN device (pyroute2, netlink).

With ``table`` set (the agent's default, table 4301) the routes live in our
own routing table, consulted through ``ip rule`` entries we add and remove
(pref 4300 ``fwmark 0x4301 lookup main`` for our own marked IKE/ESP sockets,
pref 4301 ``lookup 4301``), like strongSwan's table 220: the main table (and a
CNI's routes) stays untouched, and a directly connected peer host can be
captured for transport mode without our own packets looping into the TUN.

``RouteManager.sync(subnets)`` makes the set of routes via the TUN device
equal to ``subnets`` (adds the missing, removes the ones no peer needs any
more); idempotent. Routes carry ``src`` = a local address inside one of the
node's own subnets when the host has one, so replies come from the protected
range rather than the underlay address. IPv4 and IPv6 forwarding are enabled only for
gateways (nodes with subnets).

Underlay carve-outs: ``sync(subnets, keep_out=ADDRESSES)`` never lets a route
into the TUN capture an address the agent itself talks to in the clear (its
own underlay address, tunnel-mode peers' IKE/ESP endpoints): for every such
address a routed prefix covers, it adds ``to ADDR/32 lookup main`` plus
``to ADDR/32 unreachable`` at the bypass priority (ahead of ``lookup
<table>``), logs a warning naming route and address, and removes them when the
route goes. Without a table of our own (``table=None``) a covering route is
refused instead (logged, ``refused`` lists it).

Fail closed (``guard_table`` set, the agent's default, table 4302): every
prefix routed into the TUN also gets a ``blackhole`` route in the guard table,
consulted by ``ip rule`` pref ``rule_priority + 2`` (after ``lookup <table>``,
before the main table). While the agent runs, the TUN route wins; when the
agent stops (SIGTERM, crash, kill -9, OOM) the TUN device and its routes go,
and the guard drops the traffic instead of letting it fall through to the
CNI's routes in the clear. ``remove_all()`` then leaves the guard, the rules
and the carve-outs in place (the kernel keeps them, no agent needed); a new
agent adopts them (``guarded``) and removes rules it no longer wants after
its first ``sync``. A prefix stays guarded when its peer leaves the view (a
node removed from the inventory is dropped, not sent in the clear); it leaves
the guard only when policy says BYPASS for it (``sync(..., cleartext=...)``),
when an agent ``--bypass`` prefix covers it, when it overlaps the node's own
subnets, or through ``remove_state`` (``meshsec-agent --uninstall``). With
``guard_table=None`` (``--fail-open``) there is no guard, and ``remove_all``
removes everything as before.
"""
from __future__ import annotations

import ipaddress
import logging

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_EEXIST, _ESRCH, _ENOENT = 17, 3, 2
_IFA_F_NODAD = 0x02  # linux/if_addr.h

# Our routing table and fwmark (strongSwan uses table 220 and pref 220; we keep clear of it).
DEFAULT_TABLE = 4301
DEFAULT_MARK = 0x4301
DEFAULT_RULE_PRIORITY = 4300
DEFAULT_GUARD_TABLE = 4302
# rule priorities we own: rule_priority (fwmark, bypass, carve-outs), +1 (lookup table), +2 (guard)
_OUR_PRIORITIES = 3
_RTN_BLACKHOLE = 6
_ACTIONS = {1: None, 6: "FR_ACT_BLACKHOLE", 7: "FR_ACT_UNREACHABLE", 8: "FR_ACT_PROHIBIT"}


class RouteError(Exception):
    """A netlink operation failed (message names the route and the reason)."""


def bypass_rules(bypass, priority: int = DEFAULT_RULE_PRIORITY) -> list[dict]:
    """``ip rule`` specs (pyroute2 ``rule()`` keywords) sending traffic to each ``bypass`` prefix
    through the main table, at ``priority`` (the fwmark rule's pref, i.e. before ``lookup 4301``):
    control-plane destinations (API server, controller, node-local ranges) never enter the TUN,
    even inside a peer's subnet. Per prefix two rules, in this order: ``to P lookup main``, then
    ``to P unreachable`` (a failed lookup falls through to the next rule; without the second one
    a destination the main table has no route for would still reach table 4301 and the TUN).
    ValueError names a prefix that is not a network."""
    out = []
    for b in bypass:
        try:
            net = ipaddress.ip_network(b, strict=False)
        except ValueError as exc:
            raise ValueError(f"bypass prefix {b!r}: {exc}; write e.g. 10.96.0.0/12") from None
        sel = {"family": 2 if net.version == 4 else 10, "priority": priority,
               "dst": str(net.network_address), "dst_len": net.prefixlen}
        out += [{**sel, "table": 254}, {**sel, "action": "FR_ACT_UNREACHABLE"}]
    return out


class RouteManager:
    """Owns the routes via one TUN device.

    ``ifname``: the TUN device. ``own_subnets``: the node's subnets (for the
    route ``src`` and the forwarding decision). ``addresses``: CIDRs to
    assign to the device (e.g. the benchmark's 10.200.9.1/32).
    """

    def __init__(self, ifname: str, own_subnets: tuple[IPNetwork, ...] = (),
                 addresses: tuple[str, ...] = (), logger: logging.Logger | None = None, *,
                 table: int | None = None, mark: int = 0, rule_priority: int = DEFAULT_RULE_PRIORITY,
                 local_address: str | None = None, bypass=(), guard_table: int | None = None) -> None:
        from pyroute2 import IPRoute  # imported here: tests without netlink never load it

        self.log = logger or logging.getLogger("meshsec.routes")
        self.ifname = ifname
        self.own_subnets = tuple(own_subnets)
        self._ipr = IPRoute()
        found = self._ipr.link_lookup(ifname=ifname)
        if not found:
            self._ipr.close()
            raise RouteError(f"no interface named {ifname!r}")
        self._idx = found[0]
        self._installed: set[IPNetwork] = set()
        self.table = table
        self.mark = mark
        self.rule_priority = rule_priority
        self.local_address = local_address
        self.bypass = tuple(bypass)
        self._rules: list[dict] = []
        self._found: list[dict] = []  # rules of _rules that existed before us (EEXIST)
        self._carved: dict[str, list[dict]] = {}  # address -> its ip rules
        self.refused: set = set()  # prefixes not routed (table None: they covered an underlay address)
        self.guard_table = guard_table if table is not None else None
        self._guarded: set[IPNetwork] = set()
        self._stale: list[dict] | None = None  # rules of a previous run, reconciled after the first sync
        self._vips: dict[int, str] = {}  # IP version -> our virtual IP (RFC 4301 case 4)
        for cidr in addresses:
            self.add_address(cidr)
        if table is not None:
            self._stale = self._existing_rules()
            if self.guard_table is not None:
                self._guarded = self._read_guard()
                if self._guarded:
                    self.log.warning("fail closed: %d prefixes left blackholed by a previous run (table %d): %s",
                                     len(self._guarded), self.guard_table,
                                     ", ".join(sorted(map(str, self._guarded))))
            try:
                self._add_rules()
            except RouteError:
                self.abandon()  # the rules added before the failing one go too
                raise

    def _add_rules(self) -> None:
        """``fwmark <mark> lookup main`` (our own IKE/ESP sockets) before ``lookup <table>`` (the
        TUN routes), both ahead of the main table's rule, for IPv4 and IPv6 (RFC 4301 §5.1: the
        SPD must see what is routed to a peer, even to a directly connected peer host)."""
        for family in (2, 10):
            rules = []
            if self.mark:
                rules.append({"family": family, "priority": self.rule_priority, "table": 254,
                              "fwmark": self.mark, "fwmask": 0xFFFFFFFF})
            rules += [r for r in bypass_rules(self.bypass, self.rule_priority) if r["family"] == family]
            rules.append({"family": family, "priority": self.rule_priority + 1, "table": self.table})
            if self.guard_table is not None:
                rules.append({"family": family, "priority": self.rule_priority + 2, "table": self.guard_table})
            for r in rules:
                try:
                    self._ipr.rule("add", **r)
                    self._rules.append(r)
                except Exception as exc:
                    if getattr(exc, "code", None) == _EEXIST:
                        self._rules.append(r)
                        self._found.append(r)
                    elif family == 2:
                        raise RouteError(f"cannot add ip rule {r}: {exc}") from exc
                    # IPv6 disabled in this namespace: IPv4 alone works
        self.log.info("ip rules: fwmark %#x lookup main (pref %d), lookup %d (pref %d)", self.mark,
                      self.rule_priority, self.table, self.rule_priority + 1)
        if self.bypass:
            self.log.info("ip rules: to %s lookup main (pref %d, bypass)",
                          ", ".join(map(str, self.bypass)), self.rule_priority)
        if self.guard_table is not None:
            self.log.info("fail closed: lookup %d (pref %d) blackholes protected prefixes while no agent runs",
                          self.guard_table, self.rule_priority + 2)

    def _remove_rules(self) -> None:
        for r in self._rules:
            try:
                self._ipr.rule("del", **r)
            except Exception as exc:
                if getattr(exc, "code", None) not in (_ESRCH, _ENOENT):
                    self.log.error("cannot remove ip rule %s: %s", r, exc)
        self._rules.clear()

    def set_mtu(self, mtu: int) -> None:
        """Set the TUN device's MTU (bytes); RouteError on failure."""
        try:
            self._ipr.link("set", index=self._idx, mtu=mtu)
        except Exception as exc:
            raise RouteError(f"cannot set MTU {mtu} on {self.ifname}: {exc}") from exc

    def underlay_mtu(self, address: str) -> int | None:
        """MTU of the interface that holds ``address`` (bytes), or None if none does."""
        try:
            fam = 10 if ":" in address else 2
            for a in self._ipr.get_addr(family=fam):
                if a.get("address") == address:
                    link = self._ipr.get_links(a["index"])[0]
                    return int(link.get("mtu"))
        except Exception:
            return None
        return None

    def add_address(self, cidr: str) -> None:
        """Put ``cidr`` on the device; a virtual IP (RFC 4301 case 4) then becomes the ``src``
        of every route of its family, re-installed here, so our own traffic leaves with it."""
        iface = ipaddress.ip_interface(cidr)
        # IPv6 without DAD: a tentative address as a route's src is EINVAL; a TUN has no neighbours
        flags = {"flags": _IFA_F_NODAD} if iface.version == 6 else {}
        try:
            self._ipr.addr("add", index=self._idx, address=str(iface.ip), prefixlen=iface.network.prefixlen,
                           **flags)
        except Exception as exc:
            if getattr(exc, "code", None) != _EEXIST:
                raise RouteError(f"cannot add address {cidr} to {self.ifname}: {exc}") from exc
        if self._vips.get(iface.version) != str(iface.ip):
            self._vips[iface.version] = str(iface.ip)
            for net in sorted(self._installed, key=str):
                if net.version == iface.version:
                    self._add(net)

    def _local_src(self, family: int) -> str | None:
        """Our virtual IP, else a host address inside one of our subnets, or None."""
        vip = self._vips.get(family)
        if vip is not None:
            return vip
        nets = [n for n in self.own_subnets if n.version == family]
        if not nets:
            if self.local_address and ipaddress.ip_address(self.local_address).version == family:
                return self.local_address  # a host: transport-mode peers see our underlay address
            return None
        try:
            addrs = self._ipr.get_addr(family=2 if family == 4 else 10)
        except Exception:
            return None
        for a in addrs:
            ip = ipaddress.ip_address(a.get("address"))
            if any(ip in n for n in nets):
                return str(ip)
        return None

    def sync(self, subnets, keep_out=(), cleartext=()) -> None:
        """Make the routes via the device exactly ``subnets``, and keep every address in
        ``keep_out`` (IP strings: our underlay address, peers' IKE/ESP endpoints) out of the
        TUN (see the module docstring). With a guard table, every routed prefix is guarded
        too; ``cleartext`` (networks policy says BYPASS for) leaves the guard. Errors are
        logged, not raised."""
        want = set(subnets)
        keep = set()
        for a in keep_out:
            try:
                keep.add(ipaddress.ip_address(a))
            except ValueError:
                continue
        if self.table is None:  # no rules of our own: refuse a route that would capture them
            refused = {n for n in want if any(a.version == n.version and a in n for a in keep)}
            for n in sorted(refused - self.refused, key=str):
                self.log.error("route %s via %s refused: it covers an underlay address we use (%s); IKE/ESP "
                               "would loop into the TUN. Narrow the subnet or use a routing table of our own",
                               n, self.ifname, ", ".join(str(a) for a in sorted(keep, key=str) if a in n))
            self.refused = refused
            want -= refused
        for net in sorted(want - self._installed, key=str):
            self._add(net)
        for net in sorted(self._installed - want, key=str):
            self._del(net)
        if self.guard_table is not None:
            self._sync_guard(set(cleartext))
        if self.table is not None:
            self._sync_carve_outs(keep)
            self._drop_stale_rules()

    def _bypassed(self, addr) -> bool:
        for b in self.bypass:
            try:
                if addr in ipaddress.ip_network(b, strict=False):
                    return True
            except (ValueError, TypeError):
                continue
        return False

    def _sync_guard(self, cleartext: set) -> None:
        """Guard = routed prefixes + those guarded before, minus what policy or --bypass sends in
        the clear and what overlaps our own subnets (a pod CIDR handed to this node)."""
        want = set(self._guarded) | self._installed
        bypass = []
        for b in self.bypass:
            try:
                bypass.append(ipaddress.ip_network(b, strict=False))
            except ValueError:
                continue
        for n in list(want):
            if n in self._installed:
                continue
            why = None
            if n in cleartext:
                why = "policy says BYPASS for it"
            elif any(b.version == n.version and n.subnet_of(b) for b in bypass):
                why = "an agent --bypass prefix covers it"
            elif any(o.version == n.version and n.overlaps(o) for o in self.own_subnets):
                why = "it overlaps this node's own subnets"
            if why:
                want.discard(n)
                self.log.warning("fail closed: %s leaves the guard (table %d): %s", n, self.guard_table, why)
        for n in sorted(want - self._guarded, key=str):
            kw = {"dst": str(n), "table": self.guard_table, "type": "blackhole"}
            if n.version == 6:
                kw["family"] = 10
            try:
                self._ipr.route("replace", **kw)
                self._guarded.add(n)
            except Exception as exc:
                self.log.error("fail closed: cannot add blackhole %s to table %d: %s", n, self.guard_table, exc)
        for n in sorted(self._guarded - want, key=str):
            self._unguard(n)
        gone = self._guarded - self._installed
        if gone:
            self.log.debug("fail closed: %s stay blackholed (no peer routes them now)", ", ".join(map(str, gone)))

    def _unguard(self, n) -> None:
        kw = {"dst": str(n), "table": self.guard_table, "type": "blackhole"}
        if n.version == 6:
            kw["family"] = 10
        try:
            self._ipr.route("del", **kw)
        except Exception as exc:
            if getattr(exc, "code", None) not in (_ESRCH, _ENOENT):
                self.log.error("fail closed: cannot remove blackhole %s from table %d: %s", n, self.guard_table, exc)
        self._guarded.discard(n)

    @property
    def guarded(self) -> frozenset:
        """Prefixes blackholed in the guard table now (dropped whenever no TUN route matches)."""
        return frozenset(self._guarded)

    def _read_guard(self) -> set:
        out = set()
        for family in (2, 10):
            try:
                msgs = self._ipr.get_routes(family=family, table=self.guard_table)
            except Exception:
                continue
            for m in msgs:
                if m.get("type") != _RTN_BLACKHOLE or (m.get_attr("RTA_TABLE") or m.get("table")) != self.guard_table:
                    continue
                dst = m.get_attr("RTA_DST") or ("0.0.0.0" if family == 2 else "::")
                out.add(ipaddress.ip_network(f"{dst}/{m['dst_len']}", strict=False))
        return out

    def _existing_rules(self) -> list[dict]:
        """Our priorities' rules already in the kernel (a previous run's), as rule() specs."""
        return list_rules(self._ipr, self.rule_priority)

    def _drop_stale_rules(self) -> None:
        """Once, after the first sync: remove a previous run's rules we no longer want (a bypass
        prefix taken away, a carve-out no longer needed, the guard rule under --fail-open)."""
        if self._stale is None:
            return
        stale, self._stale = self._stale, None
        mine = {_rule_key(r) for r in self._rules}
        for rules in self._carved.values():
            mine |= {_rule_key(r) for r in rules}
        for r in stale:
            if _rule_key(r) in mine:
                continue
            try:
                self._ipr.rule("del", **r)
                self.log.info("ip rule %s from a previous run removed", r)
            except Exception as exc:
                if getattr(exc, "code", None) not in (_ESRCH, _ENOENT):
                    self.log.error("cannot remove ip rule %s of a previous run: %s", r, exc)

    def _sync_carve_outs(self, keep) -> None:
        want = {}
        covered = self._installed | self._guarded
        for a in keep:
            covering = [n for n in covered if n.version == a.version and a in n]
            if covering and not self._bypassed(a):
                want[str(a)] = covering
        for a in sorted(set(self._carved) - set(want)):
            for r in self._carved.pop(a):
                try:
                    self._ipr.rule("del", **r)
                except Exception as exc:
                    if getattr(exc, "code", None) not in (_ESRCH, _ENOENT):
                        self.log.error("cannot remove ip rule %s: %s", r, exc)
            self.log.info("carve-out for %s removed (no route into %s covers it now)", a, self.ifname)
        for a, covering in sorted(want.items()):
            if a in self._carved:
                continue
            rules = bypass_rules([a], self.rule_priority)
            added = []
            for r in rules:
                try:
                    self._ipr.rule("add", **r)
                    added.append(r)
                except Exception as exc:
                    if getattr(exc, "code", None) == _EEXIST:
                        added.append(r)
                    else:
                        self.log.error("cannot add ip rule %s keeping %s out of %s: %s", r, a, self.ifname, exc)
            self._carved[a] = added
            self.log.warning("route %s via %s covers %s, an address we send IKE/ESP to or from: kept out of "
                             "the TUN by `ip rule to %s lookup main` (pref %d); narrow the subnet to avoid this",
                             ",".join(sorted(map(str, covering))), self.ifname, a, a, self.rule_priority)

    @property
    def carve_outs(self) -> list[str]:
        """Underlay addresses kept out of the TUN by our carve-out rules now."""
        return sorted(self._carved)

    def _add(self, net: IPNetwork) -> None:
        kw = {"dst": str(net), "oif": self._idx}
        if self.table is not None:
            kw["table"] = self.table
        src = self._local_src(net.version)
        if src is not None:
            kw["prefsrc"] = src
        if net.version == 6:
            kw["family"] = 10
        try:
            self._ipr.route("replace", **kw)
            self._installed.add(net)
            self.log.info("route %s dev %s%s added", net, self.ifname, f" src {src}" if src else "")
        except Exception as exc:
            self.log.error("cannot add route %s dev %s: %s", net, self.ifname, exc)

    def _del(self, net: IPNetwork) -> None:
        kw = {"dst": str(net), "oif": self._idx}
        if self.table is not None:
            kw["table"] = self.table
        if net.version == 6:
            kw["family"] = 10
        try:
            self._ipr.route("del", **kw)
        except Exception as exc:
            if getattr(exc, "code", None) not in (_ESRCH, _ENOENT):
                self.log.error("cannot remove route %s dev %s: %s", net, self.ifname, exc)
        self._installed.discard(net)
        self.log.info("route %s dev %s removed", net, self.ifname)

    @property
    def installed(self) -> frozenset:
        return frozenset(self._installed)

    def remove_all(self) -> None:
        """Remove every route we installed via the TUN device. Without a guard table also our ip
        rules and carve-outs (other routes are left alone). With one (fail closed), the guard,
        its rule, the bypass rules and carve-outs stay: traffic to protected prefixes is dropped
        until an agent is back or ``remove_state`` runs (``meshsec-agent --uninstall``)."""
        for net in list(self._installed):
            self._del(net)
        if self.guard_table is not None:
            self.log.warning("fail closed: %d prefixes stay blackholed (table %d, ip rule pref %d) until the "
                             "agent is back; `meshsec-agent --uninstall` removes them", len(self._guarded),
                             self.guard_table, self.rule_priority + 2)
            return
        self._sync_carve_outs(set())
        self._remove_rules()

    def close(self) -> None:
        self._ipr.close()

    def abandon(self) -> None:
        """Start-up failed: remove the routes and the ip rules this instance added (not rules that
        were there before it, which may be another agent's) and close. A guard a previous run left
        (fail closed) stays with its rules: the start failed, the protection it gives does not.
        Never raises."""
        try:
            for net in list(self._installed):
                self._del(net)
            if not self._guarded:
                self._rules = [r for r in self._rules if r not in self._found]
                self._sync_carve_outs(set())
                self._remove_rules()
        except Exception as exc:  # cleanup of a failed start must not hide the start-up error
            self.log.error("cleaning up routes and ip rules after a failed start: %s", exc)
        finally:
            try:
                self.close()
            except Exception:
                pass


def _rule_key(r: dict) -> tuple:
    return (r.get("family"), r.get("priority"), r.get("table"), r.get("action"), r.get("dst"),
            r.get("dst_len", 0), r.get("fwmark"))


def list_rules(ipr, rule_priority: int = DEFAULT_RULE_PRIORITY) -> list[dict]:
    """``ip rule`` entries at our priorities (``rule_priority`` .. +2), both families, as
    pyroute2 ``rule()`` keyword dicts (the shape ``bypass_rules`` returns)."""
    out = []
    for family in (2, 10):
        try:
            msgs = ipr.get_rules(family=family)
        except Exception:
            continue
        for m in msgs:
            prio = m.get_attr("FRA_PRIORITY")
            if prio is None or not rule_priority <= prio < rule_priority + _OUR_PRIORITIES:
                continue
            r = {"family": family, "priority": prio}
            if m.get_attr("FRA_DST") is not None:
                r["dst"], r["dst_len"] = m.get_attr("FRA_DST"), m["dst_len"]
            if m.get_attr("FRA_FWMARK") is not None:
                r["fwmark"] = m.get_attr("FRA_FWMARK")
                r["fwmask"] = m.get_attr("FRA_FWMASK") if m.get_attr("FRA_FWMASK") is not None else 0xFFFFFFFF
            action = _ACTIONS.get(m["action"], "?")
            if action is None:
                r["table"] = m.get_attr("FRA_TABLE") or m["table"]
            else:
                r["action"] = action
            out.append(r)
    return out


def _flush_tables(ipr, tables) -> int:
    n = 0
    for t in tables:
        for family in (2, 10):
            try:
                msgs = ipr.get_routes(family=family, table=t)
            except Exception:
                continue
            for m in msgs:
                if (m.get_attr("RTA_TABLE") or m.get("table")) != t:
                    continue
                dst = m.get_attr("RTA_DST") or ("0.0.0.0" if family == 2 else "::")
                kw = {"family": family, "dst": f"{dst}/{m['dst_len']}", "table": t, "type": m["type"]}
                if m.get_attr("RTA_OIF") is not None:
                    kw["oif"] = m.get_attr("RTA_OIF")
                try:
                    ipr.route("del", **kw)
                    n += 1
                except Exception as exc:
                    if getattr(exc, "code", None) not in (_ESRCH, _ENOENT):
                        raise RouteError(f"cannot remove route {kw['dst']} from table {t}: {exc}") from exc
    return n


def flush_guard(guard_table: int = DEFAULT_GUARD_TABLE, logger: logging.Logger | None = None) -> int:
    """Remove every route in ``guard_table`` (``--fail-open`` at start: a guard left by an earlier
    fail-closed run). Returns how many; RouteError if netlink refuses."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        n = _flush_tables(ipr, [guard_table])
    if n:
        (logger or logging.getLogger("meshsec.routes")).warning(
            "fail open: %d blackhole routes of an earlier fail-closed run removed from table %d", n, guard_table)
    return n


def remove_state(table: int = DEFAULT_TABLE, guard_table: int | None = DEFAULT_GUARD_TABLE,
                 rule_priority: int = DEFAULT_RULE_PRIORITY, logger: logging.Logger | None = None) -> dict:
    """Uninstall: remove every ip rule at our priorities (``rule_priority`` .. +2) and every route
    in ``table`` and ``guard_table``, with no agent running (``meshsec-agent --uninstall``).
    Returns counts ``{"rules": n, "routes": m}``; RouteError if netlink refuses."""
    from pyroute2 import IPRoute

    log = logger or logging.getLogger("meshsec.routes")
    counts = {"rules": 0, "routes": 0}
    with IPRoute() as ipr:
        for r in list_rules(ipr, rule_priority):
            try:
                ipr.rule("del", **r)
                counts["rules"] += 1
            except Exception as exc:
                if getattr(exc, "code", None) not in (_ESRCH, _ENOENT):
                    raise RouteError(f"cannot remove ip rule {r}: {exc}") from exc
        counts["routes"] = _flush_tables(ipr, [t for t in (table, guard_table) if t is not None])
    log.warning("uninstalled: %d ip rules (pref %d..%d) and %d routes (tables %s) removed", counts["rules"],
                rule_priority, rule_priority + _OUR_PRIORITIES - 1, counts["routes"],
                ", ".join(str(t) for t in (table, guard_table) if t is not None))
    return counts


def enable_ip_forwarding(own_subnets, logger: logging.Logger | None = None, *, proc_sys: str = "/proc/sys") -> bool:
    """Turn on forwarding for every IP version the node's subnets use (a gateway):
    ``net.ipv4.ip_forward`` for IPv4 subnets, ``net.ipv6.conf.all.forwarding`` for IPv6 ones
    (6-in-4 and 6-in-6 gateways forward IPv6 between the TUN and the LAN). Returns whether
    forwarding is on for all of them; a failure is a warning naming the sysctl."""
    log = logger or logging.getLogger("meshsec.routes")
    knobs = [(v, k) for v, k in ((4, "net/ipv4/ip_forward"), (6, "net/ipv6/conf/all/forwarding"))
             if any(n.version == v for n in own_subnets)]
    if not knobs:
        return False
    ok = True
    for version, knob in knobs:
        path = f"{proc_sys}/{knob}"
        try:
            with open(path) as f:
                if f.read().strip() == "1":
                    continue  # already on (usual on Kubernetes nodes, where /proc/sys may be read-only)
            with open(path, "w") as f:
                f.write("1\n")
        except OSError as exc:
            ok = False
            log.warning("cannot enable IPv%d forwarding (%s): traffic for the subnets behind this node "
                        "will not be forwarded until %s=1", version, exc.strerror or exc, knob.replace("/", "."))
    return ok
