"""The CI pass of the coverage-guided fuzz targets (fuzz/, docs/fuzzing.md):
every target runs a few seconds under atheris, starting from its seed corpus
(so every seed is replayed too), about a minute in all. Fails on any finding:
an unexpected exception, a hang, an input over the 10 ms bound (rechecked
without instrumentation), or no executions at all."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECONDS = os.environ.get("MESHSEC_FUZZ_SMOKE_S", "5")


def test_atheris_is_installed() -> None:
    try:
        import atheris  # noqa: F401
    except ImportError:  # pragma: no cover - a setup problem, said plainly
        pytest.fail("atheris is missing: run `bash scripts/setup.sh` (it installs the `test` extra)")


def test_every_target_runs_without_findings(tmp_path: Path) -> None:
    out = tmp_path / "fuzz.json"
    proc = subprocess.run([sys.executable, str(ROOT / "fuzz" / "run.py"), "--time", SECONDS, "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    sys.path.insert(0, str(ROOT))
    from fuzz.run import available
    assert sorted(r["target"] for r in results) == sorted(available())
    for r in results:
        assert r["execs"] > 0 and r["cov"] > 0, r
        assert not r["findings"], (f"{r['target']}: {r['findings']} saved under fuzz/findings/{r['target']}/\n"
                                   + "\n".join(r.get("output_tail", [])))
    assert proc.returncode == 0, proc.stdout[-3000:]
