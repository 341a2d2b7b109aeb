"""Layering rules from docs/design.md, checked on the source (AST, not grep).

- agent.ike and agent.esp are pure: no sockets, asyncio, grpc, clocks or OS
  randomness; they take `now` and an injected `rng`; they never import the
  I/O shell (agent.datapath, agent.control).
- agent and controller share only the meshsec package: the generated API (meshsec.v1)
  and the shared defaults and unit parsers (meshsec.defaults, meshsec.units); meshsec
  itself imports neither side.
- The datapath's two packet sides (inside, outside) never reach agent.ike, not
  even through another module: they return requests, the loop talks to IKE.
- No import circle among the agent.datapath modules, nor among the agent.ike modules.
- No module in agent.datapath, agent.esp or agent.ike over 600 lines (agent.ike's manager and
  message modules are being split apart).
- agent.ike: each exchange is a task (agent.ike.tasks); tasks never import the IkeSa or the
  manager; no mixins, no methods patched onto classes after their definition.
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
    assert not bad, "pure core must stay pure (docs/design.md):\n" + "\n".join(bad)


@pytest.mark.parametrize("pkg,others", [("agent", ("controller",)), ("controller", ("agent",)),
                                        ("meshsec", ("agent", "controller"))])
def test_agent_and_controller_share_only_the_meshsec_package(pkg, others):
    files = sorted((ROOT / pkg).rglob("*.py"))
    assert files, f"no sources under {pkg}/"
    bad = []
    for path in files:
        bad += [f"{path.relative_to(ROOT)}:{ln}: imports {mod}" for ln, mod in imports(path)
                if mod.split(".")[0] in others]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", ["agent/model.py", "controller/policy.py", "agent/config.py",
                                  "controller/inventory.py"])
def test_shared_defaults_and_parsers_are_imported_not_rewritten(path):
    # one home for the proposal defaults and the duration/size rules (meshsec.defaults, .units)
    tree = ast.parse((ROOT / path).read_text())
    defined = {t.id for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AnnAssign))
               for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
    defined |= {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    again = defined & {"DEFAULT_IKE_PROPOSALS", "DEFAULT_ESP_PROPOSALS", "parse_duration", "parse_size",
                       "MAX_LIFETIME_VOLUME", "MIN_LIFETIME_BYTES", "MIN_LIFETIME_PACKETS"}
    assert not again, f"{path} defines {sorted(again)} again; import them from meshsec.defaults/units"


def module_file(mod: str, root: Path = ROOT) -> Path | None:
    """The source file of an in-repo module name (package -> its __init__.py), else None."""
    base = root.joinpath(*mod.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def agent_imports(path: Path, root: Path = ROOT) -> set[str]:
    """The agent.* modules ``path`` imports (anywhere in the file), names resolved to modules:
    ``from agent.esp import Sad`` is agent.esp, ``from agent.datapath import packets`` is
    agent.datapath.packets."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "agent"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "agent":
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if module_file(sub, root) is not None else node.module)
    return out


def reachable(mod: str) -> dict[str, str]:
    """Every agent.* module ``mod`` imports, directly or not -> the module that imports it."""
    seen: dict[str, str] = {}
    todo = [mod]
    while todo:
        m = todo.pop()
        f = module_file(m)
        if f is None:
            continue
        for dep in sorted(agent_imports(f)):
            if dep not in seen and dep != mod:
                seen[dep] = m
                todo.append(dep)
    return seen


def datapath_circles(root: Path = ROOT, pkg: str = "agent/datapath") -> tuple[list[str], list[str]]:
    """(the modules of ``pkg`` and its subpackages, the import circles among them as "a -> b -> a")."""
    mods = sorted(".".join(p.relative_to(root).with_suffix("").parts) for p in (root / pkg).rglob("*.py")
                  if p.stem != "__init__")
    graph = {m: {d for d in agent_imports(module_file(m, root), root) if d in mods} for m in mods}
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    circles = []

    def visit(m, stack):
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                circles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in mods:
        if m not in state:
            visit(m, [m])
    return mods, circles


@pytest.mark.parametrize("path", list(core_files()), ids=lambda p: str(p.relative_to(ROOT)))
def test_pure_core_does_not_import_the_io_shell(path):
    bad = [f"{path.relative_to(ROOT)}:{ln}: imports {mod}" for ln, mod in imports(path)
           if mod.startswith(("agent.datapath", "agent.control", "agent.main"))]
    assert not bad, "the pure core must not depend on the I/O shell:\n" + "\n".join(bad)


@pytest.mark.parametrize("side", ["agent.datapath.inside", "agent.datapath.outside"])
def test_packet_sides_never_import_ike(side):
    assert module_file(side) is not None, f"{side} is missing"
    via = reachable(side)
    assert "agent.esp" in via  # the walk follows imports (it would see agent.ike too)
    bad = sorted(m for m in via if m == "agent.ike" or m.startswith("agent.ike."))
    assert not bad, f"{side} reaches " + ", ".join(f"{m} (imported by {via[m]})" for m in bad) + \
        ": the packet sides return requests; only the loop talks to IKE"


def test_no_import_circle_in_the_datapath():
    mods, circles = datapath_circles()
    assert "agent.datapath.runtime" in mods and len(mods) >= 10
    assert not circles, "import circles in agent.datapath:\n" + "\n".join(circles)


def test_the_circle_check_sees_a_circle(tmp_path):
    # guards against the check above passing because it cannot see circles
    pkg = tmp_path / "agent" / "datapath"
    pkg.mkdir(parents=True)
    (tmp_path / "agent" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "x.py").write_text("from agent.datapath import y\n")
    (pkg / "y.py").write_text("def f():\n    from agent.datapath.x import g\n")
    (pkg / "z.py").write_text("from agent.datapath import x\n")
    _mods, circles = datapath_circles(tmp_path)
    assert circles == ["agent.datapath.x -> agent.datapath.y -> agent.datapath.x"]


@pytest.mark.parametrize("pkg", ["agent/datapath", "agent/esp", "controller"])
def test_modules_stay_small(pkg):
    big = [f"{p.relative_to(ROOT)}: {n} lines" for p in sorted((ROOT / pkg).rglob("*.py"))
           if (n := len(p.read_text().splitlines())) > 600]
    assert not big, "split these modules (at most ~600 lines each):\n" + "\n".join(big)


def test_layering_check_sees_files():
    # guards against the check passing because it looked at nothing
    assert len(list(core_files())) >= 4


@pytest.mark.parametrize("mod", ["agent/view_proto.py", "meshsec/defaults.py",
                                 "meshsec/units.py"])
def test_conversion_errors_and_shared_parts_do_no_io(mod):
    # the pieces split out of the controller client stay pure: proto -> model, errors, defaults, units
    path = ROOT / mod
    bad = [f"{mod}:{ln}: imports {m}" for ln, m in imports(path)
           if m.split(".")[0] in FORBIDDEN_IN_CORE | {"os", "grpc"} or m.startswith("agent.control")]
    assert not bad, "\n".join(bad)



def test_no_import_circle_in_ike():
    mods, circles = datapath_circles(pkg="agent/ike")
    assert "agent.ike.sa" in mods and "agent.ike.tasks.ike_auth" in mods
    assert not circles, "import circles in agent.ike:\n" + "\n".join(circles)


def test_ike_modules_stay_small():
    # manager.py and message.py too: split by concern (admission, timers, lost_state, joining,
    # bookkeeping, vip; payloads, payload_codec)
    big = [f"{p.relative_to(ROOT)}: {n} lines" for p in sorted((ROOT / "agent/ike").rglob("*.py"))
           if (n := len(p.read_text().splitlines())) > 600]
    assert not big, "split these modules (at most ~600 lines each):\n" + "\n".join(big)


TASKS = ["ike_init", "ike_intermediate", "ike_auth", "child_create", "ike_rekey", "followup_ke", "informational"]


@pytest.mark.parametrize("task", TASKS)
def test_tasks_reach_neither_the_ike_sa_nor_the_manager_nor_io(task):
    mod = f"agent.ike.tasks.{task}"
    assert module_file(mod) is not None, f"{mod} is missing"
    via = reachable(mod)
    assert "agent.ike.message" in via  # the walk follows imports
    bad = sorted(m for m in via if m in ("agent.ike.sa", "agent.ike.manager") or
                 m.startswith(("agent.datapath", "agent.control", "agent.main")))
    assert not bad, f"{mod} reaches " + ", ".join(f"{m} (imported by {via[m]})" for m in bad)


def _classes_and_patches(path: Path) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """(classes with the names of their bases, ``Class.attr = ...`` statements at module level)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    classes = [(n.name, [ast.unparse(b) for b in n.bases]) for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    names = {c for c, _ in classes}
    patches = [ast.unparse(t) for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
               if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in names]
    return classes, patches


def test_ike_has_no_mixins_and_no_patched_methods():
    bad = []
    for path in sorted((ROOT / "agent/ike").rglob("*.py")):
        classes, patches = _classes_and_patches(path)
        rel = path.relative_to(ROOT)
        bad += [f"{rel}: class {c}({', '.join(b)}) has more than one base" for c, b in classes if len(b) > 1]
        bad += [f"{rel}: {t} is patched onto a class" for t in patches]
    from agent.ike.sa import IkeSa
    assert IkeSa.__bases__ == (object,)
    assert not bad, "\n".join(bad)


def test_the_mixin_check_sees_mixins_and_patches(tmp_path):
    # guards against the check above passing because it cannot see them
    f = tmp_path / "m.py"
    f.write_text("class A:\n    pass\n\n\nclass B(A, object):\n    pass\n\n\ndef g(self):\n    pass\n\n\nA.g = g\n")
    classes, patches = _classes_and_patches(f)
    assert ("B", ["A", "object"]) in classes and patches == ["A.g"]
