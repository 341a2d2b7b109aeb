"""Layering rules from DESIGN.md, checked on the source (AST, not grep).

- agent.ike and agent.esp are pure: no sockets, asyncio, grpc, clocks or OS
  randomness; they take `now` and an injected `rng`.
- agent and controller share only the generated API (meshsec.v1).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN_IN_CORE = {"socket", "asyncio", "grpc", "time", "secrets", "select", "selectors",
                     "subprocess", "fcntl", "threading", "random"}


def imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


def os_urandom_calls(path: Path) -> list[int]:
    tree = ast.parse(path.read_text())
    return [n.lineno for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and n.attr in ("urandom", "getrandom")]


def core_files():
    for pkg in ("agent/ike", "agent/esp"):
        yield from sorted((ROOT / pkg).rglob("*.py"))


@pytest.mark.parametrize("path", list(core_files()), ids=lambda p: str(p.relative_to(ROOT)))
def test_pure_core_has_no_io(path):
    bad = [f"{path.relative_to(ROOT)}:{ln}: imports {mod}" for ln, mod in imports(path)
           if mod.split(".")[0] in FORBIDDEN_IN_CORE]
    bad += [f"{path.relative_to(ROOT)}:{ln}: reads OS randomness" for ln in os_urandom_calls(path)]
    assert not bad, "pure core must stay pure (DESIGN.md):\n" + "\n".join(bad)


@pytest.mark.parametrize("pkg,other", [("agent", "controller"), ("controller", "agent")])
def test_agent_and_controller_share_only_the_api(pkg, other):
    bad = []
    for path in sorted((ROOT / pkg).rglob("*.py")):
        bad += [f"{path.relative_to(ROOT)}:{ln}: imports {mod}" for ln, mod in imports(path)
                if mod.split(".")[0] == other]
    assert not bad, "\n".join(bad)


def test_layering_check_sees_files():
    # guards against the check passing because it looked at nothing
    assert len(list(core_files())) >= 4
