"""``meshsec-controller --check FILE``: every error of an inventory, not only the first.

:func:`controller.inventory.parse_inventory` stops at the first problem (the controller
refuses the whole file). Here each part is checked on its own, with the same rules and the
same ``FILE:LINE: FIELD: problem`` messages: the top-level keys, ``defaults``, every node,
the cross-node rules (duplicate names, overlapping subnets, subnets that would capture an
endpoint or the controller), every group and every policy. Last, the real parser runs on
the whole file, so a file with no error listed here is one the controller accepts.
"""
from __future__ import annotations

from pathlib import Path

from yaml.nodes import MappingNode, ScalarNode

from controller.inventory import InventoryError, _addresses, _Parser, parse_inventory

_TOP = ("nodes", "defaults", "groups", "policies")


def check_inventory(text: str, filename: str = "inventory.yaml", controller_addresses=()) -> list[str]:
    """Every problem of inventory ``text`` as ``FILE:LINE: FIELD: problem`` strings, in file
    order where they can be told apart; an empty list when the controller would accept it.
    Never raises for any text: a case the checks missed is one error line too."""
    try:
        return _check(text, filename, controller_addresses)
    except Exception as e:  # noqa: BLE001 - the parts missed it: the whole-file parser words it
        return [_whole(text, filename, controller_addresses)
                or f"{filename}:1: cannot read the inventory ({type(e).__name__}: {str(e)[:200]})"]


def _check(text: str, filename: str, controller_addresses) -> list[str]:
    p = _Parser(filename, _addresses(controller_addresses))
    errors: list[str] = []

    def attempt(fn):
        try:
            return fn()
        except InventoryError as e:
            if str(e) not in errors:
                errors.append(str(e))
            return None

    try:
        root = p.compose(text)
    except InventoryError as e:
        return [str(e)]
    if not isinstance(root, MappingNode):
        return [_whole(text, filename, controller_addresses) or f"{filename}:1: expected a mapping"]
    m: dict = {}
    for k, v in root.value:
        key = k.value if isinstance(k, ScalarNode) else None
        if key not in _TOP:
            errors.append(str(p.fail(k, str(key), f"unknown key {key!r} (known: {', '.join(_TOP)})")))
        elif key in m:
            errors.append(str(p.fail(k, key, "duplicate key")))
        else:
            m[key] = v
    if "defaults" in m:
        d = m["defaults"]
        if not isinstance(d, MappingNode):
            attempt(lambda: p.defaults(d))
        else:  # key by key, so every bad setting is listed (replay_window: 0 is read with allow_no_replay)
            allow = [kv for kv in d.value if isinstance(kv[0], ScalarNode) and kv[0].value == "allow_no_replay"]
            for kv in d.value:
                attempt(lambda: p.defaults(MappingNode(d.tag, [kv] + [a for a in allow[:1] if a is not kv],
                                                       d.start_mark, d.end_mark)))
    specs, all_subnets, names = [], [], set()
    items = attempt(lambda: p.seq(m["nodes"], "nodes")) if "nodes" in m else None
    if "nodes" not in m:
        errors.append(f"{filename}:1: nodes: missing (give the list of nodes, or nodes: [])")
    seen: dict[str, tuple[int, int]] = {}
    for i, item in enumerate(items or []):
        name_node = _name_node(item)
        if name_node is not None:
            names.add(name_node.value)  # a broken node still counts as known to groups and policies
        got = attempt(lambda: p.node(item, i))
        if got is None:
            continue
        spec, subnets = got
        if spec.name in seen:
            j, line = seen[spec.name]
            errors.append(str(p.fail(name_node, f"nodes[{i}].name",
                                     f"duplicate node name {spec.name!r} (also nodes[{j}] on line {line})")))
            continue
        seen[spec.name] = (i, name_node.start_mark.line + 1)
        clash = False
        for sub_node, path, net in subnets:
            for oi, oname, _, op, onet in all_subnets:
                if oi != i and net.version == onet.version and net.overlaps(onet):
                    errors.append(str(p.fail(sub_node, path, f"{str(net)!r} overlaps {str(onet)!r} "
                                                             f"of node {oname!r} ({op})")))
                    clash = True
        if clash:
            continue
        all_subnets.extend((i, spec.name, n, path, net) for n, path, net in subnets)
        specs.append(spec)
    for entry in all_subnets:
        attempt(lambda: p.check_loops([entry], specs))
    group_names: set[str] = set()
    if "groups" in m:
        g = m["groups"]
        if not isinstance(g, MappingNode):
            attempt(lambda: p.groups(g, names))
        else:
            for k, v in g.value:
                single = MappingNode(g.tag, [(k, v)], g.start_mark, g.end_mark)
                if isinstance(k, ScalarNode) and k.value in group_names:
                    errors.append(str(p.fail(k, f"groups.{k.value}", f"duplicate group {k.value!r}")))
                    continue
                if isinstance(k, ScalarNode):
                    group_names.add(k.value)
                attempt(lambda: p.groups(single, names))
    if "policies" in m:
        rules = attempt(lambda: p.seq(m["policies"], "policies"))
        rule_lines: dict[str, int] = {}
        for i, item in enumerate(rules or []):
            rule = attempt(lambda: p.rule(item, i, names, group_names))
            if rule is None:
                continue
            if rule.name in rule_lines:
                errors.append(str(p.fail(item, f"policies[{i}].name", f"duplicate policy name {rule.name!r} "
                                                                      f"(also on line {rule_lines[rule.name]})")))
            rule_lines[rule.name] = item.start_mark.line + 1
    if not errors:  # anything the parts missed: the real parser has the last word
        last = _whole(text, filename, controller_addresses)
        if last:
            errors.append(last)
    return errors


def _name_node(item):
    if isinstance(item, MappingNode):
        for k, v in item.value:
            if isinstance(k, ScalarNode) and k.value == "name" and isinstance(v, ScalarNode):
                return v
    return None


def _whole(text: str, filename: str, controller_addresses) -> str | None:
    try:
        parse_inventory(text, filename, controller_addresses)
    except InventoryError as e:
        return str(e)
    return None


def check_file(path: str | Path, controller_addresses=()) -> list[str]:
    """:func:`check_inventory` on a file; an unreadable file is one error."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return [f"{path}:1: cannot read inventory: {e}"]
    return check_inventory(text, str(path), controller_addresses)

