"""Reading captures with tshark (an implementation we did not write) in the e2e tests."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from e2e.gso_pcap import resegment

KEY_TABLES = ("esp_sa", "ikev2_decryption_table")
_wire_copies: dict = {}


def _wire_view(pcap: Path) -> Path:
    """``pcap`` with UDP GSO frames cut into the ESP packets a real wire carries (see
    e2e/gso_pcap.py), made once per file version."""
    st = Path(pcap).stat()
    key = (str(pcap), st.st_size, st.st_mtime_ns)
    if key not in _wire_copies:
        _wire_copies[key] = resegment(Path(pcap))
    return _wire_copies[key]


def tshark(pcap: Path, display_filter: str, home: Path | None = None, fields: list[str] | None = None,
           timeout: float = 300) -> list[str]:
    """Frames of ``pcap`` matching ``display_filter``, one line each (or the
    ``fields`` of each). With ``home`` (see :func:`wireshark_home`) tshark
    decrypts IKE and ESP with the key tables there and checks ESP ICVs."""
    cmd = ["tshark", "-n", "-r", str(_wire_view(pcap)), "-Y", display_filter]
    env = dict(os.environ)
    if home is not None:
        env["HOME"] = str(home)
        cmd += ["-o", "esp.enable_encryption_decode:TRUE", "-o", "esp.enable_authentication_check:TRUE"]
    if fields:
        cmd += ["-T", "fields"] + [x for f in fields for x in ("-e", f)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert res.returncode == 0, res.stderr
    return [line for line in res.stdout.splitlines() if line.strip()]


def wireshark_home(keylog_dir: Path, home: Path) -> Path:
    """A HOME for tshark whose profile holds the agents' key tables (``--keylog-dir``)."""
    profile = home / ".config" / "wireshark"
    profile.mkdir(parents=True, exist_ok=True)
    for name in KEY_TABLES:
        shutil.copy(keylog_dir / name, profile / name)
    return home
