"""Layering rules from docs/design.md, checked on the source (AST, not grep).

- agent.ike and agent.esp are pure: they import only computation (a short list of
  standard-library modules, ``cryptography``) and other pure modules (agent.iana,
  agent.model, meshsec.defaults/.proposals/.units): no sockets, asyncio, grpc, pyroute2,
  pytun, files, clocks or OS randomness; they take `now` and an injected `rng`; they
  never import the I/O shell (agent.datapath, agent.control).
- The packet sides (inside, outside) and the policy module open nothing: batches in,
  batches out.
- No import circle anywhere in agent/, controller/, meshsec/ (strongly connected
  components of the import graph, lazy imports count), and no module there over 600
  lines.
- In-memory stand-ins (Fake*) live in tests/, not in the packages.
- agent and controller share only the meshsec package: the generated API (meshsec.v1)
  and the shared defaults, proposal keywords and unit parsers (meshsec.defaults,
  .proposals, .units); meshsec itself imports neither side.
- The datapath's two packet sides (inside, outside) never reach agent.ike, not
  even through another module: they return requests, the loop talks to IKE.
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
# what the pure core may import besides pure in-repo modules: computation only (no os, files,
# sockets, pyroute2, pytun, grpc, clocks)
CORE_STDLIB = {"__future__", "abc", "bisect", "collections", "dataclasses", "datetime", "enum", "fractions",
               "functools", "hashlib", "heapq", "hmac", "ipaddress", "itertools", "math", "operator", "re",
               "struct", "typing"}
CORE_THIRD_PARTY = {"cryptography"}
PURE_OUTSIDE_CORE = {"agent.iana", "agent.model", "meshsec.defaults", "meshsec.proposals", "meshsec.units"}
# I/O the packet sides and the policy module leave to the loop (runtime) and the devices
DEVICE_IO = {"socket", "selectors", "select", "os", "fcntl", "pytun", "pyroute2", "subprocess", "threading",
             "time", "asyncio", "grpc"}
PACKAGES = ("agent", "controller", "meshsec")


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


# ---- the import graph of agent/, controller/, meshsec/ (names resolved to modules)

def resolved_imports(path: Path) -> list[tuple[int, str]]:
    """Like imports(), with in-repo names resolved to modules: ``from meshsec import
    proposals`` is meshsec.proposals, ``from agent.esp import Sad`` is agent.esp."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] not in PACKAGES:
                out.append((node.lineno, node.module))
                continue
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.append((node.lineno, sub if module_file(sub) is not None else node.module))
    return out


def repo_imports(path: Path, root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> set[str]:
    """The in-repo modules (of ``packages``) ``path`` imports, anywhere in the file (lazy
    imports too), names resolved to modules: ``from agent.esp import Sad`` is agent.esp,
    ``from agent.datapath import packets`` is agent.datapath.packets."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] in packages}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] in packages:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if module_file(sub, root) is not None else node.module)
    return out


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """module -> the in-repo modules it imports, for every module under ``packages``."""
    files = [p for pkg in packages if (root / pkg).is_dir() for p in sorted((root / pkg).rglob("*.py"))]
    mods = {module_name(p, root): p for p in files}
    return {m: {d for d in repo_imports(p, root, packages) if d in mods} for m, p in mods.items()}


def import_circles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """The strongly connected components of more than one module (or a module importing
    itself), each sorted: Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, deps = work[-1]
            for w in deps:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1 or v in graph[v]:
                        out.append(tuple(sorted(comp)))
    return sorted(out)


@pytest.mark.parametrize("mod", ["agent.datapath.inside", "agent.datapath.outside", "agent.datapath.policy"])
def test_packet_sides_and_policy_open_no_devices(mod):
    # batches in, batches out: the TUN, sockets, clocks and threads belong to the loop
    files = [module_file(mod)] + [module_file(m) for m in reachable(mod) if m.startswith("agent.datapath")]
    bad = [f"{f.relative_to(ROOT)}:{ln}: imports {m}" for f in files for ln, m in imports(f)
           if m.split(".")[0] in DEVICE_IO]
    assert not bad, f"{mod} (or an agent.datapath module it imports) does I/O:\n" + "\n".join(bad)


@pytest.mark.parametrize("path", list(core_files()), ids=lambda p: str(p.relative_to(ROOT)))
def test_pure_core_imports_only_computation(path):
    bad = []
    for ln, mod in resolved_imports(path):
        if mod.split(".")[0] in PACKAGES:
            if not (mod.startswith(("agent.ike", "agent.esp")) or mod in PURE_OUTSIDE_CORE):
                bad.append(f"{path.relative_to(ROOT)}:{ln}: imports {mod}, which is not pure")
        elif mod.split(".")[0] not in CORE_STDLIB | CORE_THIRD_PARTY:
            bad.append(f"{path.relative_to(ROOT)}:{ln}: imports {mod}")
    assert not bad, "the pure core imports computation only (docs/design.md):\n" + "\n".join(bad)


@pytest.mark.parametrize("mod", sorted(PURE_OUTSIDE_CORE))
def test_pure_modules_outside_the_core_import_only_computation(mod):
    path = module_file(mod)
    bad = [f"{path.relative_to(ROOT)}:{ln}: imports {m}" for ln, m in resolved_imports(path)
           if m.split(".")[0] not in CORE_STDLIB | CORE_THIRD_PARTY and m not in PURE_OUTSIDE_CORE]
    assert not bad, "\n".join(bad)


def clock_reads(path: Path) -> list[int]:
    tree = ast.parse(path.read_text())
    return [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr in ("now", "utcnow", "today")
            and (isinstance(n.value, ast.Name) and n.value.id in ("datetime", "date")
                 or isinstance(n.value, ast.Attribute) and n.value.attr in ("datetime", "date"))]


@pytest.mark.parametrize("path", list(core_files()), ids=lambda p: str(p.relative_to(ROOT)))
def test_pure_core_reads_no_clock(path):
    # datetime is allowed for certificate validity arithmetic; the time comes in as ``now``
    bad = [f"{path.relative_to(ROOT)}:{ln}: reads the clock" for ln in clock_reads(path)]
    assert not bad, "\n".join(bad)


def test_no_import_circle_anywhere():
    graph = import_graph()
    assert {"agent.datapath.runtime", "agent.ike.tasks.ike_auth", "controller.server", "meshsec.cli"} <= set(graph)
    assert len(graph) > 80
    circles = import_circles(graph)
    assert not circles, "import circles (lazy imports count):\n" + "\n".join(" <-> ".join(c) for c in circles)


def test_the_scc_check_sees_circles(tmp_path):
    # guards against the check above passing because it cannot see circles
    pkg = tmp_path / "agent" / "datapath"
    pkg.mkdir(parents=True)
    (tmp_path / "agent" / "__init__.py").write_text("")
    (tmp_path / "meshsec").mkdir()
    (tmp_path / "meshsec" / "c.py").write_text("import agent.datapath.z\n")
    (pkg / "__init__.py").write_text("")
    (pkg / "x.py").write_text("from agent.datapath import y\n")
    (pkg / "y.py").write_text("def f():\n    from agent.datapath.x import g\n")
    (pkg / "z.py").write_text("from agent.datapath import x\nfrom meshsec import c\n")
    graph = import_graph(tmp_path)
    assert import_circles(graph) == [("agent.datapath.x", "agent.datapath.y"), ("agent.datapath.z", "meshsec.c")]


@pytest.mark.parametrize("pkg", PACKAGES)
def test_no_module_over_600_lines(pkg):
    big = [f"{p.relative_to(ROOT)}: {n} lines" for p in sorted((ROOT / pkg).rglob("*.py"))
           if (n := len(p.read_text().splitlines())) > 600
           and "v1" not in p.relative_to(ROOT).parts]
    assert not big, "split these modules (at most ~600 lines each):\n" + "\n".join(big)


def test_fakes_live_in_tests():
    # in-memory stand-ins for devices, sockets or IKE belong to tests/, not to the product
    bad = [f"{p.relative_to(ROOT)}:{n.lineno}: class {n.name}" for pkg in PACKAGES
           for p in sorted((ROOT / pkg).rglob("*.py"))
           for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.ClassDef) and n.name.startswith("Fake")]
    assert not bad, "move these to tests/:\n" + "\n".join(bad)


def module_file(mod: str, root: Path = ROOT) -> Path | None:
    """The source file of an in-repo module name (package -> its __init__.py), else None."""
    base = root.joinpath(*mod.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def agent_imports(path: Path, root: Path = ROOT) -> set[str]:
    """The agent.* modules ``path`` imports (see repo_imports)."""
    return repo_imports(path, root, ("agent",))


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


def test_layering_check_sees_files():
    # guards against the check passing because it looked at nothing
    assert len(list(core_files())) >= 4


@pytest.mark.parametrize("mod", ["agent/view_proto.py", "meshsec/defaults.py", "meshsec/proposals.py",
                                 "meshsec/units.py"])
def test_conversion_errors_and_shared_parts_do_no_io(mod):
    # the pieces split out of the controller client stay pure: proto -> model, errors, defaults, units
    path = ROOT / mod
    bad = [f"{mod}:{ln}: imports {m}" for ln, m in imports(path)
           if m.split(".")[0] in FORBIDDEN_IN_CORE | {"os", "grpc"} or m.startswith("agent.control")]
    assert not bad, "\n".join(bad)


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
