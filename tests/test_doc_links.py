"""Paths the README and docs/*.md name (``tests/ike/test_policy_errors.py``, ``docs/design.md``,
``agent/datapath/inside.py``...) exist in the repository, and ``FILE.py::test_name`` names a
function of that file, so renamed tests and moved modules cannot leave the docs pointing at
nothing (as they once pointed at a DESIGN.md outside the repository)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATH = re.compile(r"(?<![\w./-])((?:docs|tests|agent|controller|meshsec|e2e|fuzz|scripts|charts|deploy|proto)/"
                  r"[\w./-]*\w\.(?:md|py|yaml|yml|sh|png|proto|json|toml))")
# files the docs may name before they exist (say why beside each)
PLANNED: set[str] = set()


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def missing_paths(files: list[Path], root: Path = ROOT) -> list[str]:
    out = []
    for f in files:
        for i, line in enumerate(f.read_text().splitlines(), 1):
            out += [f"{f.relative_to(root)}:{i}: {m.group(1)}" for m in PATH.finditer(line)
                    if m.group(1) not in PLANNED and not (root / m.group(1)).exists()]
    return out


def test_docs_name_only_files_that_exist():
    files = doc_files()
    assert len(files) > 10
    bad = missing_paths(files)
    assert not bad, "docs name files that do not exist:\n" + "\n".join(bad)


TEST_REF = re.compile(r"((?:tests|e2e)/[\w./-]*\.py)::(\w+)")


def missing_tests(files: list[Path], root: Path = ROOT) -> list[str]:
    out = []
    for f in files:
        for i, line in enumerate(f.read_text().splitlines(), 1):
            for m in TEST_REF.finditer(line):
                path = root / m.group(1)
                names = {n.name for n in ast.walk(ast.parse(path.read_text()))
                         if isinstance(n, (ast.FunctionDef, ast.ClassDef))} if path.exists() else set()
                if m.group(2) not in names:
                    out.append(f"{f.relative_to(root)}:{i}: {m.group(0)}")
    return out


def test_docs_name_only_tests_that_exist():
    bad = missing_tests(doc_files())
    assert not bad, "docs name tests that do not exist:\n" + "\n".join(bad)


def test_docs_refer_to_no_design_md_outside_the_repository():
    bad = [f"{f.relative_to(ROOT)}" for f in doc_files() if "DESIGN.md" in f.read_text()]
    assert not bad, "docs/design.md is the design page; these name a DESIGN.md: " + ", ".join(bad)


def test_the_check_sees_a_missing_file(tmp_path):
    (tmp_path / "docs").mkdir()
    doc = tmp_path / "docs" / "x.md"
    doc.write_text("see `tests/test_gone.py` and docs/x.md\nand tests/t.py::test_a, tests/t.py::test_b\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "t.py").write_text("def test_a():\n    pass\n")
    assert missing_paths([doc], tmp_path) == ["docs/x.md:1: tests/test_gone.py"]
    assert missing_tests([doc], tmp_path) == ["docs/x.md:2: tests/t.py::test_b"]
