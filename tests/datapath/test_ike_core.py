"""The runtime's view of the IKE side: ``IkeCore`` lists exactly what agent.datapath uses
of IkeManager, and IkeManager and the datapath fakes all satisfy it (names and parameters)."""
from __future__ import annotations

import ast
import inspect
import os
from pathlib import Path

import pytest

from agent.datapath.ike_core import IkeCore
from agent.ike.manager import IkeManager
from agent.model import Credentials, NodeView
from tests.datapath.fakes import FakeIke, ScriptedIke

ROOT = Path(__file__).resolve().parents[2]
VIEW = NodeView(name="a", identity="a", subnets=(), local_address="198.51.100.1", peers=())


def members() -> set[str]:
    return {n for n in IkeCore.__dict__.get("__annotations__", {})} | {
        n for n, v in vars(IkeCore).items() if callable(v) and not n.startswith("_")}


def ike_uses() -> set[str]:
    """Attributes the datapath reads or calls on its IKE object (``self.ike.X``, ``rt.ike.X``)."""
    used = set()
    for path in (ROOT / "agent/datapath").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) \
                    and node.value.attr == "ike" and isinstance(node.value.value, ast.Name) \
                    and node.value.value.id in ("self", "rt"):
                used.add(node.attr)
    return used


def test_ike_core_lists_exactly_what_the_datapath_uses():
    assert ike_uses() == members()


@pytest.mark.parametrize("make", [
    lambda: IkeManager(VIEW, Credentials(psk=b"x"), os.urandom, local_address="198.51.100.1"),
    lambda: FakeIke(VIEW, Credentials(psk=b"x"), os.urandom, local_address="198.51.100.1"),
    ScriptedIke,
], ids=["IkeManager", "FakeIke", "ScriptedIke"])
def test_implementations_satisfy_ike_core(make):
    ike = make()
    assert isinstance(ike, IkeCore)
    for name, proto_fn in vars(IkeCore).items():
        if name.startswith("_") or not callable(proto_fn):
            continue
        want = [p for p in inspect.signature(proto_fn).parameters if p != "self"]
        have = list(inspect.signature(getattr(ike, name)).parameters)
        assert have[:len(want)] == want, f"{type(ike).__name__}.{name}{tuple(have)}: IkeCore says {tuple(want)}"


def test_a_missing_method_is_seen():
    # the isinstance check above can fail: an object without rekey_child is no IkeCore
    full = ScriptedIke()
    half = type("NoRekey", (), {})()
    for k in members() - {"rekey_child"}:
        setattr(half, k, getattr(full, k))
    assert not isinstance(half, IkeCore)
    half.rekey_child = full.rekey_child
    assert isinstance(half, IkeCore)
