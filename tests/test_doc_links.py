"""Paths the README and docs/*.md name (``tests/ike/test_pad.py``, ``docs/design.md``,
``agent/datapath/inside.py``...) exist in the repository, so renamed tests and moved modules
cannot leave the docs pointing at nothing (as they once pointed at a DESIGN.md outside it)."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATH = re.compile(r"(?<![\w./-])((?:docs|tests|agent|controller|meshsec|e2e|fuzz|scripts|charts|deploy|proto)/"
                  r"[\w./-]*\w\.(?:md|py|yaml|yml|sh|png|proto|json|toml))")
# named by the docs as not written yet (docs/fuzzing.md: "picks up ... once it exists")
PLANNED = {"fuzz/targets/offload.py"}


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


def test_docs_refer_to_no_design_md_outside_the_repository():
    bad = [f"{f.relative_to(ROOT)}" for f in doc_files() if "DESIGN.md" in f.read_text()]
    assert not bad, "docs/design.md is the design page; these name a DESIGN.md: " + ", ".join(bad)


def test_the_check_sees_a_missing_file(tmp_path):
    (tmp_path / "docs").mkdir()
    doc = tmp_path / "docs" / "x.md"
    doc.write_text("see `tests/test_gone.py` and docs/x.md\n")
    assert missing_paths([doc], tmp_path) == ["docs/x.md:1: tests/test_gone.py"]
