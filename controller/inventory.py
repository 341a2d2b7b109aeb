"""Inventory YAML -> validated :class:`controller.policy.Inventory`.

Format::

    defaults:                      # optional; every key optional
      ike_proposals: [aes128gcm16-prfsha256-x25519, ...]
      esp_proposals: [aes128gcm16, ...]
      mode: tunnel                 # tunnel | transport | auto
      protocol: esp                # esp | ah
      encapsulation: udp           # udp (RFC 3948) | none
      ike_lifetime: 4h             # seconds or 30s/15m/4h/1d; 0 = no rekey
      child_lifetime: 1h
      dpd_interval: 30s            # 0 = dead peer detection off
      replay_window: 1024          # packets, a multiple of 32 up to 1048576; 0 (no anti-replay) only
                                   # with allow_no_replay: true
      child_lifetime_bytes: 10G    # CHILD_SA volume lifetime per SA direction (RFC 4301 §4.4.2.1):
                                   # octets, k/M/G/T = 1000^n, Ki/Mi/Gi/Ti = 1024^n; 0 = no limit
      child_lifetime_packets: 0    # packets, same suffixes; 0 = no limit. Rekey at 90 %, delete at 100 %
    nodes:
      - name: gw-a                 # DNS name; the node's IKE identity
        role: gateway              # host | gateway
        endpoints: [198.51.100.1]  # underlay IPs, may be empty: then nobody initiates to this node,
                                   # it initiates to its peers (a roaming host behind NAT)
        subnets: [10.1.0.0/16]     # may be empty (host: its endpoints); must not contain the controller's
                                   # address nor an endpoint of its own or of a gateway (IKE/ESP would
                                   # loop); a host's endpoint inside a gateway's subnet is a host behind
                                   # that gateway (RFC 4301 case 3, nested SAs)
        join_token: s3cret         # or join_token_sha256: <64 hex>
    groups:                        # optional: named sets of nodes for policies
      site-a: [gw-a, host-a1]
    policies:                      # optional: first match wins for each pair of nodes
      - name: hosts-end-to-end     # shown by `meshsec status`
        between: [role:host, role:host]   # each side: node, group:NAME, role:host|gateway, any, or a list
        action: protect            # protect | bypass | discard
        mode: transport            # and any defaults key, for protect
      - name: legacy-in-clear
        between: [legacy-1, any]
        action: bypass

Every error is an :class:`InventoryError` whose message is
``FILE:LINE: FIELD: problem``, e.g.
``inventory.yaml:7: nodes[1].subnets[0]: '10.0.0.0/33' is not an IPv4/IPv6 network``.
"""
from __future__ import annotations

import hashlib
import ipaddress
import math
import re
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from meshsec.defaults import MAX_LIFETIME_VOLUME, MIN_LIFETIME_BYTES, MIN_LIFETIME_PACKETS  # noqa: F401 (re-exported)
from meshsec.defaults import MIN_DPD_INTERVAL_S, MIN_LIFETIME_S
from meshsec.units import parse_duration, parse_size  # noqa: F401 (re-exported)

from controller.proposals import ProposalInvalid, check_child_proposal, check_ike_proposal
from controller.policy import (
    ACTIONS,
    ENCAPSULATIONS,
    MODES,
    PROTOCOLS,
    ROLES,
    Defaults,
    Inventory,
    NodeSpec,
    Rule,
)

# The controller's own TLS name; a node of that name could impersonate it.
CONTROLLER_TLS_NAME = "meshsec-controller"
# Largest anti-replay window (packets) the controller hands out; the agents'
# windows take any positive multiple of 32 (tests/controller/test_proposals_table.py).
MAX_REPLAY_WINDOW = 1 << 20
# Deepest YAML nesting read (an inventory needs 4 or 5 levels); checked before PyYAML's
# composer, which recurses once per level.
MAX_YAML_DEPTH = 32

_DNS_NAME = re.compile(r"^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")
_PROPOSAL = re.compile(r"^[a-z0-9_]+(-[a-z0-9_]+)*$")

_DEFAULT_KEYS = ("ike_proposals", "esp_proposals", "mode", "protocol", "encapsulation",
                 "ike_lifetime", "child_lifetime", "dpd_interval", "replay_window", "allow_no_replay",
                 "child_lifetime_bytes", "child_lifetime_packets")
_RULE_KEYS = ("name", "between", "action") + _DEFAULT_KEYS
_NODE_KEYS = ("name", "role", "endpoints", "subnets", "join_token", "join_token_sha256")


SHOW_CHARS = 40


def show(value: Any) -> str:
    """``repr(value)`` for an error message, cut to :data:`SHOW_CHARS` characters + "..." (a
    4,000-digit integer or a 4 KB string must not become a 4 KB log line)."""
    text = repr(value)
    return text if len(text) <= SHOW_CHARS else text[:SHOW_CHARS] + "..."


def clip_error(e: Exception, value: Any) -> str:
    """``str(e)`` with the echoed ``repr(value)`` cut as by :func:`show`."""
    return str(e).replace(repr(value), show(value))


class InventoryError(ValueError):
    """The inventory is invalid; ``str()`` is ``FILE:LINE: FIELD: problem``."""


class _Parser:
    def __init__(self, filename: str, controller_addresses: tuple = ()) -> None:
        self.filename = filename
        self.controller_addresses = controller_addresses
        self._constructor = SafeConstructor()

    def fail(self, node: Node | None, path: str, msg: str) -> InventoryError:
        line = node.start_mark.line + 1 if node is not None else 1
        where = f"{path}: " if path else ""
        return InventoryError(f"{self.filename}:{line}: {where}{msg}")

    def mapping(self, node: Node, path: str, allowed: tuple[str, ...],
                required: tuple[str, ...] = ()) -> dict[str, tuple[Node, Node]]:
        if not isinstance(node, MappingNode):
            raise self.fail(node, path or "inventory", "expected a mapping")
        out: dict[str, tuple[Node, Node]] = {}
        for k, v in node.value:
            if not isinstance(k, ScalarNode) or not isinstance(k.value, str):
                raise self.fail(k, path, "keys must be strings")
            key = k.value
            sub = f"{path}.{key}" if path else key
            if key not in allowed:
                raise self.fail(k, sub if len(key) <= SHOW_CHARS else path,
                                f"unknown key {show(key)} (known: {', '.join(allowed)})")
            if key in out:
                raise self.fail(k, sub, f"duplicate key {show(key)} (first on line {out[key][0].start_mark.line + 1})")
            out[key] = (k, v)
        for key in required:
            if key not in out:
                where = f"{path}.{key}" if path else key
                raise self.fail(node, where, "missing")
        return out

    def scalar(self, node: Node, path: str) -> Any:
        """The value of a scalar node. Anything PyYAML cannot (or may not) construct, such as
        explicit or unknown tags, bad timestamps or integers too long to convert, and
        non-finite numbers (.nan, .inf: no setting takes them) are InventoryErrors here."""
        if not isinstance(node, ScalarNode):
            raise self.fail(node, path, "expected a single value, not a list or mapping")
        try:
            value = self._constructor.construct_object(node)
        except Exception as e:  # noqa: BLE001 - PyYAML's constructors also raise KeyError, AttributeError...
            what = getattr(e, "problem", None) or (str(e).splitlines() or [type(e).__name__])[0]
            raise self.fail(node, path, f"cannot read {show(node.value)} (tag {node.tag}): {what}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(node, path, f"{show(node.value)} is not a finite number")
        return value

    def string(self, node: Node, path: str) -> str:
        value = self.scalar(node, path)
        if not isinstance(value, str) or not value:
            raise self.fail(node, path, f"expected a non-empty string, got {show(value)}")
        return value

    def seq(self, node: Node, path: str) -> list[Node]:
        if isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            return []
        if not isinstance(node, SequenceNode):
            raise self.fail(node, path, "expected a list")
        return list(node.value)

    def choice(self, node: Node, path: str, allowed: tuple[str, ...]) -> str:
        value = self.scalar(node, path)
        if value not in allowed:
            raise self.fail(node, path, f"{show(value)} is not one of {', '.join(allowed)}")
        return value

    def duration(self, node: Node, path: str, minimum: float = 0.0) -> float:
        """Seconds; 0 or at least ``minimum`` (meshsec.defaults: what the agent accepts)."""
        value = self.scalar(node, path)
        try:
            secs = parse_duration(value)
        except ValueError as e:
            raise self.fail(node, path, clip_error(e, value)) from None
        if 0 < secs < minimum:
            raise self.fail(node, path, f"{show(node.value)} is {secs:g}s; use at least {minimum:g}s (or 0 to turn it "
                                        f"off): agents refuse shorter ones, and the mesh would go down")
        return secs

    def proposals(self, node: Node, path: str, kind: str) -> tuple[str, ...]:
        items = self.seq(node, path)
        if not items:
            raise self.fail(node, path, "needs at least one proposal")
        check = check_ike_proposal if kind == "ike" else check_child_proposal
        example = "'aes128gcm16-prfsha256-x25519'" if kind == "ike" else "'aes128gcm16' or 'sha256' (AH)"
        out = []
        for i, item in enumerate(items):
            s = self.string(item, f"{path}[{i}]")
            if not _PROPOSAL.match(s):
                raise self.fail(item, f"{path}[{i}]", f"{show(s)} is not a proposal like {example}")
            try:
                check(s)
            except ProposalInvalid as e:
                raise self.fail(item, f"{path}[{i}]", clip_error(e, s)) from None
            out.append(s)
        return tuple(out)

    def settings(self, m: dict[str, tuple[Node, Node]], path: str) -> dict[str, Any]:
        """Defaults-style keys of a mapping -> Defaults field values."""
        kw: dict[str, Any] = {}
        for key, (_, v) in m.items():
            p = f"{path}.{key}"
            if key in ("ike_proposals", "esp_proposals"):
                kw[key] = self.proposals(v, p, key[:3])
            elif key == "mode":
                kw[key] = self.choice(v, p, MODES)
            elif key == "protocol":
                kw[key] = self.choice(v, p, PROTOCOLS)
            elif key == "encapsulation":
                kw[key] = self.choice(v, p, ENCAPSULATIONS)
            elif key in ("ike_lifetime", "child_lifetime", "dpd_interval"):
                kw[f"{key}_s"] = self.duration(v, p, MIN_DPD_INTERVAL_S if key == "dpd_interval" else MIN_LIFETIME_S)
            elif key in ("child_lifetime_bytes", "child_lifetime_packets"):
                raw = self.scalar(v, p)
                try:
                    value = parse_size(raw)
                except ValueError as e:
                    raise self.fail(v, p, clip_error(e, raw)) from None
                low = MIN_LIFETIME_BYTES if key.endswith("bytes") else MIN_LIFETIME_PACKETS
                if 0 < value < low:
                    raise self.fail(v, p, f"{value} is too small: the CHILD_SA would be rekeyed every few "
                                          f"packets; use 0 (no limit) or at least {low}")
                kw[key] = value
            elif key == "replay_window":
                value = self.scalar(v, p)
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_REPLAY_WINDOW:
                    raise self.fail(v, p, f"{show(value)} is not a window size in packets: a positive multiple of 32 "
                                          f"up to {MAX_REPLAY_WINDOW} (e.g. 1024)")
                if value % 32:
                    lower = value // 32 * 32
                    use = f"{lower} or {lower + 32}" if lower else "32"
                    raise self.fail(v, p, f"{value} is not a multiple of 32 (the agents' window is whole 32-bit "
                                          f"words): use {use}")
                kw[key] = value
        allow = m.get("allow_no_replay")
        if allow is not None and not isinstance(self.scalar(allow[1], f"{path}.allow_no_replay"), bool):
            raise self.fail(allow[1], f"{path}.allow_no_replay", "expected true or false")
        if kw.get("replay_window") == 0 and not (allow and self.scalar(allow[1], "") is True):
            raise self.fail(m["replay_window"][1], f"{path}.replay_window",
                            "0 turns anti-replay protection off (RFC 4303 §3.4.3); "
                            "if you really mean it, add allow_no_replay: true")
        return kw

    def defaults(self, node: Node) -> Defaults:
        if isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            return Defaults()
        return Defaults(**self.settings(self.mapping(node, "defaults", _DEFAULT_KEYS), "defaults"))

    def groups(self, node: Node, names: set[str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
        if not isinstance(node, MappingNode):
            raise self.fail(node, "groups", "expected a mapping of group name -> list of node names")
        out = []
        seen: set[str] = set()
        for k, v in node.value:
            gname = self.string(k, "groups")
            path = f"groups.{gname}"
            if not _DNS_NAME.match(gname):
                raise self.fail(k, path, f"{show(gname)} is not a lower-case name (letters, digits, '-', '.')")
            if gname in seen:
                raise self.fail(k, path, f"duplicate group {show(gname)}")
            seen.add(gname)
            members = []
            for j, item in enumerate(self.seq(v, path)):
                member = self.string(item, f"{path}[{j}]")
                if member not in names:
                    raise self.fail(item, f"{path}[{j}]", f"{show(member)} is not a node in this inventory")
                members.append(member)
            out.append((gname, tuple(members)))
        return tuple(out)

    def rule(self, node: Node, i: int, names: set[str], groups: set[str]) -> Rule:
        path = f"policies[{i}]"
        m = self.mapping(node, path, _RULE_KEYS, required=("name", "between"))
        name = self.string(m["name"][1], f"{path}.name")
        action = self.choice(m["action"][1], f"{path}.action", ACTIONS) if "action" in m else "protect"
        between_node = m["between"][1]
        sides = self.seq(between_node, f"{path}.between")
        if len(sides) != 2:
            raise self.fail(between_node, f"{path}.between",
                            "expected two sides, e.g. [gw-a, group:site-b] or [role:host, any]")
        between = []
        for j, side in enumerate(sides):
            p = f"{path}.between[{j}]"
            items = self.seq(side, p) if isinstance(side, SequenceNode) else [side]
            if not items:
                raise self.fail(side, p, "empty side")
            refs = []
            for item in items:
                ref = self.string(item, p)
                ok = (ref == "any" or ref in names or (ref.startswith("group:") and ref[6:] in groups)
                      or (ref.startswith("role:") and ref[5:] in ROLES))
                if not ok:
                    raise self.fail(item, p, f"{show(ref)} is not a node, group:NAME (groups: "
                                             f"{', '.join(sorted(groups)) or 'none defined'}), "
                                             f"role:host, role:gateway or any")
                refs.append(ref)
            between.append(tuple(refs))
        settings = self.settings({k: v for k, v in m.items() if k in _DEFAULT_KEYS}, path)
        if action != "protect" and settings:
            first = next(k for k in m if k in _DEFAULT_KEYS)
            raise self.fail(m[first][0], f"{path}.{first}", f"only meaningful with action: protect (this rule is "
                                                            f"{action})")
        return Rule(name=name, between=(between[0], between[1]), action=action,
                    settings=tuple(sorted(settings.items())))

    def node(self, node: Node, i: int) -> tuple[NodeSpec, list[tuple[Node, str, ipaddress._BaseNetwork]]]:
        path = f"nodes[{i}]"
        m = self.mapping(node, path, _NODE_KEYS, required=("name", "role"))
        name_node = m["name"][1]
        name = self.string(name_node, f"{path}.name")
        if not _DNS_NAME.match(name):
            raise self.fail(name_node, f"{path}.name",
                            f"{show(name)} is not a lower-case DNS name (letters, digits, '-', '.')")
        if name == CONTROLLER_TLS_NAME:
            raise self.fail(name_node, f"{path}.name", f"{show(name)} is reserved for the controller")
        role = self.choice(m["role"][1], f"{path}.role", ROLES)
        endpoints = []
        if "endpoints" in m:
            for j, item in enumerate(self.seq(m["endpoints"][1], f"{path}.endpoints")):
                p = f"{path}.endpoints[{j}]"
                text = str(self.scalar(item, p))
                try:
                    endpoints.append(str(ipaddress.ip_address(text)))
                except ValueError:
                    raise self.fail(item, p, f"{show(text)} is not an IPv4/IPv6 address") from None
        subnets: list[tuple[Node, str, ipaddress._BaseNetwork]] = []
        if "subnets" in m:
            for j, item in enumerate(self.seq(m["subnets"][1], f"{path}.subnets")):
                p = f"{path}.subnets[{j}]"
                text = str(self.scalar(item, p))
                try:
                    net = ipaddress.ip_network(text, strict=False)
                except ValueError:
                    raise self.fail(item, p, f"{show(text)} is not an IPv4/IPv6 network") from None
                try:
                    ipaddress.ip_network(text, strict=True)
                except ValueError:
                    raise self.fail(item, p, f"{show(text)} has host bits set (did you mean {show(str(net))}?)")
                subnets.append((item, p, net))
        if "join_token" in m and "join_token_sha256" in m:
            raise self.fail(m["join_token_sha256"][0], f"{path}.join_token_sha256",
                            "give join_token or join_token_sha256, not both")
        if "join_token" in m:
            token = self.string(m["join_token"][1], f"{path}.join_token")
            digest = hashlib.sha256(token.encode()).digest()
        elif "join_token_sha256" in m:
            v = m["join_token_sha256"][1]
            text = str(self.scalar(v, f"{path}.join_token_sha256"))
            if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
                raise self.fail(v, f"{path}.join_token_sha256", "expected 64 hex digits (a SHA-256)")
            digest = bytes.fromhex(text)
        else:
            raise self.fail(node, f"{path}.join_token", f"node {show(name)} has no join_token or join_token_sha256")
        spec = NodeSpec(name=name, role=role, endpoints=tuple(endpoints),
                        subnets=tuple(str(n) for _, _, n in subnets), join_token_sha256=digest)
        return spec, subnets

    def check_loops(self, all_subnets: list, nodes: list[NodeSpec]) -> None:
        """A node's subnets are routed into every peer's TUN: one that contains
        a node's endpoint or the controller's address would carry IKE/ESP or
        the control connection into the tunnel itself (a loop). The one
        exception is RFC 4301 case 3: a host behind a gateway (its endpoint
        inside the gateway's subnet) reaches the mesh through the gateway's
        tunnel, its own SA nested inside."""
        role = {n.name: n.role for n in nodes}
        addrs = [(ipaddress.ip_address(e), n.name, f"endpoint {e} of node {show(n.name)}")
                 for n in nodes for e in n.endpoints]
        addrs += [(a, None, f"controller's address {a} (--listen / --server-name)") for a in self.controller_addresses]
        for _, owner, sub_node, p, net in all_subnets:
            for addr, node, what in addrs:
                behind = node is not None and node != owner and role[owner] == "gateway" and role[node] == "host"
                if addr.version == net.version and addr in net and not behind:
                    raise self.fail(sub_node, p, f"{show(str(net))} of node {show(owner)} contains the {what}: agents route "
                                                 f"this subnet into the tunnel, so IKE/ESP (or the control "
                                                 f"connection) to that address would loop into it; narrow the "
                                                 f"subnet or move the address out of it")

    def compose(self, text: str) -> Node | None:
        """The YAML node tree of ``text``; InventoryError for a syntax error or nesting deeper than
        :data:`MAX_YAML_DEPTH` (checked on the parser's events, which do not recurse, before the
        composer, which does)."""
        try:
            depth = 0
            for event in yaml.parse(text, Loader=yaml.SafeLoader):
                if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                    depth += 1
                    if depth > MAX_YAML_DEPTH:
                        raise InventoryError(f"{self.filename}:{event.start_mark.line + 1}: YAML nested more than "
                                             f"{MAX_YAML_DEPTH} levels deep: an inventory needs a few")
                elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                    depth -= 1
            return yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            line = mark.line + 1 if mark else 1
            raise InventoryError(f"{self.filename}:{line}: YAML syntax error: {e.problem}") from None
        except yaml.YAMLError as e:
            raise InventoryError(f"{self.filename}:1: YAML error: {e}") from None

    def inventory(self, text: str) -> Inventory:
        root = self.compose(text)
        if root is None:
            raise InventoryError(f"{self.filename}:1: nodes: missing (the inventory is empty)")
        m = self.mapping(root, "", ("nodes", "defaults", "groups", "policies"), required=("nodes",))
        defaults = self.defaults(m["defaults"][1]) if "defaults" in m else Defaults()
        nodes: list[NodeSpec] = []
        seen: dict[str, tuple[int, int]] = {}
        all_subnets: list[tuple[int, str, Node, str, ipaddress._BaseNetwork]] = []
        for i, item in enumerate(self.seq(m["nodes"][1], "nodes")):
            spec, subnets = self.node(item, i)
            name_node = self.mapping(item, f"nodes[{i}]", _NODE_KEYS)["name"][1]
            if spec.name in seen:
                j, line = seen[spec.name]
                raise self.fail(name_node, f"nodes[{i}].name",
                                f"duplicate node name {show(spec.name)} (also nodes[{j}] on line {line})")
            seen[spec.name] = (i, name_node.start_mark.line + 1)
            for sub_node, p, net in subnets:
                for oi, oname, _, op, onet in all_subnets:
                    if oi != i and net.version == onet.version and net.overlaps(onet):
                        raise self.fail(sub_node, p, f"{show(str(net))} overlaps {show(str(onet))} "
                                                     f"of node {show(oname)} ({op})")
            all_subnets.extend((i, spec.name, n, p, net) for n, p, net in subnets)
            nodes.append(spec)
        self.check_loops(all_subnets, nodes)
        names = {n.name for n in nodes}
        groups = self.groups(m["groups"][1], names) if "groups" in m else ()
        rules: list[Rule] = []
        if "policies" in m:
            rule_lines: dict[str, int] = {}
            for i, item in enumerate(self.seq(m["policies"][1], "policies")):
                rule = self.rule(item, i, names, {g for g, _ in groups})
                if rule.name in rule_lines:
                    raise self.fail(item, f"policies[{i}].name",
                                    f"duplicate policy name {show(rule.name)} (also on line {rule_lines[rule.name]})")
                rule_lines[rule.name] = item.start_mark.line + 1
                rules.append(rule)
        return Inventory(nodes=tuple(nodes), defaults=defaults, groups=groups, rules=tuple(rules))


def _addresses(values) -> tuple:
    out = []
    for v in values:
        try:
            out.append(ipaddress.ip_address(str(v).strip("[]")))
        except ValueError:
            continue  # DNS names and wildcards name no fixed address
    return tuple(a for a in dict.fromkeys(out) if not a.is_unspecified)


def parse_inventory(text: str, filename: str = "inventory.yaml", controller_addresses=()) -> Inventory:
    """Validate inventory YAML text; raises :class:`InventoryError` and nothing else.
    ``controller_addresses``: the controller's own IPs (strings; names and
    wildcards are skipped), which no node's subnets may contain."""
    try:
        return _Parser(filename, _addresses(controller_addresses)).inventory(text)
    except InventoryError:
        raise
    except RecursionError:  # nesting is bounded before composing; kept as the last guard
        raise InventoryError(f"{filename}:1: YAML nested too deeply: an inventory needs a few levels") from None
    except Exception as e:  # a case the checks above missed: still FILE:LINE and exit 2, not a traceback
        raise InventoryError(f"{filename}:1: cannot read the inventory ({type(e).__name__}: {str(e)[:200]})") from None


def load_inventory(path: str | Path, controller_addresses=()) -> Inventory:
    """Read and validate the inventory file; raises :class:`InventoryError`
    (also for an unreadable file)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InventoryError(f"{path}:1: cannot read inventory: {e}") from None
    return parse_inventory(text, str(path), controller_addresses)
