"""Kernel routes for peers' subnets via the TUN device (pyroute2, netlink).

``RouteManager.sync(subnets)`` makes the set of routes via the TUN device
equal to ``subnets`` (adds the missing, removes the ones no peer needs any
more); idempotent. Routes carry ``src`` = a local address inside one of the
node's own subnets when the host has one, so replies come from the protected
range rather than the underlay address. IPv4 forwarding is enabled only for
gateways (nodes with subnets).
"""
from __future__ import annotations

import ipaddress
import logging

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_EEXIST, _ESRCH, _ENOENT = 17, 3, 2


class RouteError(Exception):
    """A netlink operation failed (message names the route and the reason)."""


class RouteManager:
    """Owns the routes via one TUN device.

    ``ifname``: the TUN device. ``own_subnets``: the node's subnets (for the
    route ``src`` and the forwarding decision). ``addresses``: CIDRs to
    assign to the device (e.g. the benchmark's 10.200.9.1/32).
    """

    def __init__(self, ifname: str, own_subnets: tuple[IPNetwork, ...] = (),
                 addresses: tuple[str, ...] = (), logger: logging.Logger | None = None) -> None:
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
        for cidr in addresses:
            self.add_address(cidr)

    def add_address(self, cidr: str) -> None:
        iface = ipaddress.ip_interface(cidr)
        try:
            self._ipr.addr("add", index=self._idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        except Exception as exc:
            if getattr(exc, "code", None) != _EEXIST:
                raise RouteError(f"cannot add address {cidr} to {self.ifname}: {exc}") from exc

    def _local_src(self, family: int) -> str | None:
        """A host address inside one of our subnets, or None."""
        nets = [n for n in self.own_subnets if n.version == family]
        if not nets:
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

    def sync(self, subnets) -> None:
        """Make the routes via the device exactly ``subnets``. Errors are logged, not raised."""
        want = set(subnets)
        for net in sorted(want - self._installed, key=str):
            self._add(net)
        for net in sorted(self._installed - want, key=str):
            self._del(net)

    def _add(self, net: IPNetwork) -> None:
        kw = {"dst": str(net), "oif": self._idx}
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
        for net in list(self._installed):
            self._del(net)

    def close(self) -> None:
        self._ipr.close()


def enable_ip_forwarding(own_subnets, logger: logging.Logger | None = None) -> bool:
    """Turn on IPv4 forwarding if the node is a gateway (has subnets). Returns whether it did."""
    log = logger or logging.getLogger("meshsec.routes")
    if not any(n.version == 4 for n in own_subnets):
        return False
    try:
        with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
            f.write("1\n")
        return True
    except OSError as exc:
        log.error("cannot enable IPv4 forwarding: %s", exc)
        return False
