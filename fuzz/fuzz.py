"""Run one fuzz target under atheris (libFuzzer).

    python fuzz/fuzz.py TARGET [libFuzzer flags] [corpus dirs...]

TARGET is a module name in fuzz/targets (e.g. ike_message). The target's
packages (``agent``, ``controller``, ...) are imported under atheris'
instrumentation, so libFuzzer's ``cov``/``ft`` count edges in our code.
Use fuzz/run.py to run several targets with budgets and a summary.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit("usage: python fuzz/fuzz.py TARGET [libFuzzer flags] [corpus dirs]")
    name = sys.argv[1]
    import atheris

    spec = importlib.import_module(f"fuzz.targets.{name}")  # the plain module: its TARGET names the packages
    packages = spec.TARGET.packages
    for mod in list(sys.modules):  # re-import the code under test with instrumentation
        if mod.split(".")[0] in packages or mod == "fuzz.targets" or mod.startswith("fuzz.targets."):
            del sys.modules[mod]
    with atheris.instrument_imports(include=list(packages)):
        module = importlib.import_module(f"fuzz.targets.{name}")
    target = module.TARGET
    atheris.Setup([sys.argv[0]] + sys.argv[2:], target.timed)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
