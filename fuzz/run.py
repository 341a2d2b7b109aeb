#!/usr/bin/env python3
"""Run the fuzz targets (atheris/libFuzzer) one after another and summarise.

    python fuzz/run.py                          # every target, 60 s each
    python fuzz/run.py ike_message esp_decap --time 300
    python fuzz/run.py --runs 1000000           # a fixed number of executions per target
    python fuzz/run.py --time 6 --json out.json # the CI smoke pass

Per target it prints executions, libFuzzer's coverage (``cov``: edges of our
instrumented code; ``ft``: features), corpus size, RSS at the start and the end
(memory growth), and findings: crashing inputs (``crash-*``), hangs over 10 s
(``timeout-*``), out-of-memory (``oom-*``) and inputs over the 10 ms
per-input bound (``slow-*``), all saved under fuzz/findings/<target>/.
Seeds come from fuzz/corpus/<target>/ (kept in the repository, read only);
new inputs libFuzzer finds go to fuzz/.work/<target>/ (not kept; copy the good
ones into the corpus with ``--merge``). Exit status 1 if any target had a finding.
One process at a time: the machine is shared.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

FUZZ = Path(__file__).resolve().parent
ROOT = FUZZ.parent
TARGETS = ["ike_message", "ike_manager", "ike_sk", "ike_fragment", "esp_decap", "spd_lookup", "inventory",
           "controller_grpc"]
OPTIONAL = {"offload": ROOT / "agent" / "datapath" / "offload.py"}  # only where the module exists
_STAT = re.compile(r"^#(\d+)\s+(\w+)\s+cov: (\d+) ft: (\d+) corp: (\d+)/\S+.*?(?:exec/s: (\d+))?\s+rss: (\d+)Mb")
_DONE = re.compile(r"^Done (\d+) runs in (\d+) second")
_FINDING_PREFIXES = ("crash-", "timeout-", "oom-", "leak-", "slow-")


def available() -> list[str]:
    out = list(TARGETS)
    for name, module in OPTIONAL.items():
        if module.exists() and (FUZZ / "targets" / f"{name}.py").exists():
            out.append(name)
    return out


def _findings(target: str) -> set[str]:
    d = FUZZ / "findings" / target
    return {p.name for p in d.iterdir() if p.name.startswith(_FINDING_PREFIXES)} if d.is_dir() else set()


_RETIME = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
import importlib
t = importlib.import_module("fuzz.targets." + sys.argv[2]).TARGET
for path in sys.stdin.read().splitlines():  # paths on stdin: a long run saves thousands of slow inputs
    if not os.path.isfile(path):
        continue  # gone: not re-timed, so it stays a finding
    data = open(path, "rb").read()
    t._once(data)  # warm-up: first-use imports and caches
    print(path, min(t._once(data) for _ in range(20)) * 1000, flush=True)  # the best of 20: the machine is shared
"""


def recheck_slow(target: str, names: list[str], python: str, directory: Path | None = None) -> dict[str, float]:
    """Milliseconds per slow input (best of 20), timed again in a plain (uninstrumented) process: the
    10 ms bound is about the code that ships, and atheris' edge tracing slows pure-Python
    code (PyYAML above all) several times. ``names``: files in ``directory`` (default
    fuzz/findings/<target>/), passed on stdin (any number; a missing one is left out)."""
    if not names:
        return {}
    d = directory or FUZZ / "findings" / target
    out = subprocess.run([python, "-c", _RETIME, str(ROOT), target], input="\n".join(str(d / n) for n in names),
                         cwd=ROOT, capture_output=True, text=True, check=False).stdout
    res = {}
    for line in out.splitlines():
        path, ms = line.rsplit(" ", 1)
        res[Path(path).name] = float(ms)
    return res


def run_target(target: str, *, seconds: float | None, runs: int | None, max_len: int, verbose: bool,
               python: str = sys.executable, merge: bool = False) -> dict:
    work = FUZZ / ".work" / target
    work.mkdir(parents=True, exist_ok=True)
    corpus = FUZZ / "corpus" / target
    corpus.mkdir(parents=True, exist_ok=True)
    findings = FUZZ / "findings" / target
    findings.mkdir(parents=True, exist_ok=True)
    before = _findings(target)
    cmd = [python, str(FUZZ / "fuzz.py"), target, f"-artifact_prefix={findings}/", "-print_final_stats=1",
           "-timeout=10", "-rss_limit_mb=2048", f"-max_len={max_len}", "-print_pcs=0"]
    if seconds is not None:
        cmd.append(f"-max_total_time={max(1, int(seconds))}")
    if runs is not None:
        cmd.append(f"-runs={runs}")
    cmd += [str(work), str(corpus)]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace")
    res = {"target": target, "execs": 0, "cov": 0, "ft": 0, "corpus": 0, "rss_start_mb": None, "rss_end_mb": None,
           "exec_per_s": 0, "seconds": 0.0, "findings": [], "exit": None}
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip("\n")
        tail = (tail + [line])[-40:]
        if verbose:
            print(f"  [{target}] {line}", flush=True)
        m = _STAT.match(line)
        if m:
            execs, kind, cov, ft, corp, eps, rss = m.groups()
            res.update(execs=int(execs), cov=int(cov), ft=int(ft), corpus=int(corp), rss_end_mb=int(rss))
            if kind == "INITED" or res["rss_start_mb"] is None:
                res["rss_start_mb"] = int(rss)
            continue
        m = _DONE.match(line)
        if m:
            res["execs"] = int(m.group(1))
        elif line.startswith("stat::number_of_executed_units:"):
            res["execs"] = int(line.split(":")[-1])
        elif line.startswith("stat::peak_rss_mb:"):
            res["rss_end_mb"] = int(line.split(":")[-1])
    res["exit"] = proc.wait()
    res["seconds"] = round(time.monotonic() - t0, 1)
    res["exec_per_s"] = int(res["execs"] / res["seconds"]) if res["seconds"] else 0
    res["findings"] = sorted(_findings(target) - before)
    slow = [n for n in res["findings"] if n.startswith("slow-")]
    timed = recheck_slow(target, slow, python)
    res["slow_dismissed"] = 0
    for n in slow:
        ms = timed.get(n)
        if ms is not None and ms <= 10.0:  # only slow under instrumentation: not a finding
            dismissed = work.parent / f"{target}.slow-dismissed"
            dismissed.mkdir(parents=True, exist_ok=True)
            (findings / n).replace(dismissed / n)
            res["findings"].remove(n)
            res["slow_dismissed"] += 1
        elif ms is not None:
            res.setdefault("slow_ms", {})[n] = round(ms, 1)
    if res["exit"] not in (0, None) and not res["findings"]:
        res["findings"] = [f"exit status {res['exit']} (see output)"]
    if res["findings"] and not verbose:
        res["output_tail"] = tail
    if merge:  # keep what this run found, minimised, in the repository corpus
        subprocess.run([python, str(FUZZ / "fuzz.py"), target, "-merge=1", f"-max_len={max_len}", str(corpus),
                        str(work)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("targets", nargs="*", help=f"targets (default all: {', '.join(available())})")
    ap.add_argument("--time", type=float, default=None, help="seconds per target (default 60 unless --runs)")
    ap.add_argument("--runs", type=int, default=None, help="executions per target (stops at whichever comes first)")
    ap.add_argument("--max-len", type=int, default=4096, help="largest input libFuzzer makes (octets)")
    ap.add_argument("--json", type=Path, help="write the summary as JSON here")
    ap.add_argument("--merge", action="store_true", help="merge new inputs into fuzz/corpus/<target>/")
    ap.add_argument("-v", "--verbose", action="store_true", help="show libFuzzer's output")
    a = ap.parse_args(argv)
    targets = a.targets or available()
    unknown = [t for t in targets if not (FUZZ / "targets" / f"{t}.py").exists()]
    if unknown:
        ap.error(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(available())}")
    seconds = a.time if a.time is not None or a.runs is not None else 60.0
    results = []
    for t in targets:
        print(f"fuzz: {t} ({f'{seconds:.0f} s' if seconds else ''}{' / ' if seconds and a.runs else ''}"
              f"{f'{a.runs} runs' if a.runs else ''}) ...", flush=True)
        r = run_target(t, seconds=seconds, runs=a.runs, max_len=a.max_len, verbose=a.verbose, merge=a.merge)
        results.append(r)
        print(f"fuzz: {t}: {r['execs']} execs in {r['seconds']} s ({r['exec_per_s']}/s), cov {r['cov']} ft {r['ft']}, "
              f"corpus {r['corpus']}, rss {r['rss_start_mb']} -> {r['rss_end_mb']} MB, "
              f"findings: {', '.join(r['findings']) or 'none'}"
              + (f" ({r['slow_dismissed']} inputs over 10 ms only under instrumentation, dismissed)"
                 if r.get("slow_dismissed") else "")
              + (f"; slow uninstrumented (ms): {r['slow_ms']}" if r.get("slow_ms") else ""), flush=True)
        for line in r.get("output_tail", []):
            print(f"  | {line}")
    print()
    print(f"{'target':16} {'execs':>10} {'exec/s':>7} {'cov':>5} {'ft':>6} {'corpus':>6} {'rss MB':>10}  findings")
    for r in results:
        print(f"{r['target']:16} {r['execs']:>10} {r['exec_per_s']:>7} {r['cov']:>5} {r['ft']:>6} {r['corpus']:>6} "
              f"{str(r['rss_start_mb']) + '->' + str(r['rss_end_mb']):>10}  {len(r['findings'])}")
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    return 1 if any(r["findings"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
