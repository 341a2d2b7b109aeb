"""The committed generated code in meshsec/v1 matches proto/ (regenerated)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ("controller_pb2.py", "controller_pb2.pyi", "controller_pb2_grpc.py")


def test_generated_code_is_current(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHON=sys.executable)
    subprocess.run(["sh", str(ROOT / "proto" / "generate.sh"), str(tmp_path)],
                   check=True, env=env, cwd=ROOT)
    for name in GENERATED:
        fresh = (tmp_path / "meshsec" / "v1" / name).read_bytes()
        committed = (ROOT / "meshsec" / "v1" / name).read_bytes()
        assert fresh == committed, f"meshsec/v1/{name} is stale: run proto/generate.sh"


def test_generated_code_imports_as_meshsec_v1_not_proto() -> None:
    from meshsec.v1 import controller_pb2, controller_pb2_grpc

    assert controller_pb2.DESCRIPTOR.package == "meshsec.v1"
    assert hasattr(controller_pb2_grpc, "ControllerStub")
    for name in GENERATED[::2]:
        text = (ROOT / "meshsec" / "v1" / name).read_text()
        assert "from proto" not in text and "import proto" not in text
    # proto/ holds only .proto sources: nothing generated lives under it.
    assert importlib.util.find_spec("proto.meshsec.v1.controller_pb2") is None
    assert not list((ROOT / "proto").rglob("*.py"))
