"""Node sources besides the inventory file, and how their nodes join it.

A node source (``controller.k8s.KubeNodeSource`` is the one there is)
keeps a set of :class:`controller.policy.NodeSpec` current and calls
``on_change()`` whenever it changed. :func:`merge_nodes` (pure) puts them
beside the inventory's own nodes: inventory nodes always win; a source node
whose name or subnets clash with an inventory node (or an earlier source
node) is left out and reported, naming both sources, so a bad Node object
cannot take a remote site off the mesh.
"""
from __future__ import annotations

import dataclasses
import ipaddress
from typing import Iterable, Protocol

from controller.inventory import CONTROLLER_TLS_NAME
from controller.policy import Inventory, NodeSpec


class NodeSource(Protocol):
    name: str                                    # e.g. "kubernetes" (for messages)

    def nodes(self) -> tuple[NodeSpec, ...]: ...

    def start(self, on_change) -> None: ...

    def wait_synced(self, timeout: float) -> bool: ...

    def stop(self) -> None: ...


def merge_nodes(inventory: Inventory, extra: Iterable[NodeSpec], source: str,
                inventory_name: str = "inventory file") -> tuple[Inventory, list[str]]:
    """Inventory nodes + ``extra`` nodes from ``source``.

    Returns (merged inventory, problems). Each problem is a message naming
    both sources and the node, e.g. ``node 'gw-a' from kubernetes clashes
    with node 'gw-a' in the inventory file: rename one``; that extra node is
    left out. Groups, rules and defaults stay the inventory's.
    """
    taken_names = {n.name: inventory_name for n in inventory.nodes}
    taken_nets: list[tuple[ipaddress._BaseNetwork, str, str]] = [
        (ipaddress.ip_network(s), n.name, inventory_name) for n in inventory.nodes for s in n.subnets]
    merged = list(inventory.nodes)
    problems: list[str] = []
    for node in sorted(extra, key=lambda n: n.name):
        if node.name == CONTROLLER_TLS_NAME:
            problems.append(f"node {node.name!r} from {source}: the name is reserved for the controller; "
                            "rename the node")
            continue
        if node.name in taken_names:
            problems.append(f"node {node.name!r} from {source} clashes with node {node.name!r} in the "
                            f"{taken_names[node.name]}: rename one of them (the {source} node is left out)")
            continue
        clash = None
        nets = [ipaddress.ip_network(s) for s in node.subnets]
        for net in nets:
            for other, oname, osrc in taken_nets:
                if net.version == other.version and net.overlaps(other):
                    clash = (net, other, oname, osrc)
                    break
            if clash:
                break
        if clash:
            net, other, oname, osrc = clash
            problems.append(f"node {node.name!r} from {source}: subnet {str(net)!r} overlaps {str(other)!r} of "
                            f"node {oname!r} in the {osrc}: change one of them (the {source} node is left out)")
            continue
        taken_names[node.name] = source
        taken_nets.extend((n, node.name, source) for n in nets)
        merged.append(node)
    return dataclasses.replace(inventory, nodes=tuple(merged)), problems
