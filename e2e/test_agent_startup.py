"""meshsec-agent start-up failures leave nothing behind (ip rules, routes).

    ns <p>-a (198.51.100.1 on ul0)      meshsec-agent --config, whose --control-socket is
                                         already served by another process (this test)

The agent adds its ip rules (pref 4300/4301, table 4301) before it opens the control
socket; when that fails it must remove them again before it exits.
"""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from e2e.topology import Topology, sh

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
AGENT = str(ROOT / ".venv" / "bin" / "meshsec-agent")


def _rules(ns: str) -> list[str]:
    out = sh("ip", "rule", "show", ns=ns).stdout.splitlines()
    return [line for line in out if line.split(":")[0].strip() in ("4300", "4301")]


def test_agent_exiting_because_the_control_socket_is_in_use_removes_its_ip_rules(tmp_path: Path):
    with Topology(workdir=tmp_path) as t:
        a = t.add_host("a", "198.51.100.1")
        sock = tmp_path / "agent.sock"
        busy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # a live server on that path
        busy.bind(str(sock))
        busy.listen(1)
        try:
            cfg = {"name": "a", "local_address": "198.51.100.1", "subnets": ["10.1.0.0/24"],
                   "tun": {"name": "ms0"}, "auth": {"psk": "startup-e2e-psk-not-secret"},
                   "peers": [{"name": "b", "endpoints": ["198.51.100.2"], "subnets": ["10.2.0.0/24"]}]}
            (tmp_path / "agent.yaml").write_text(json.dumps(cfg))
            assert _rules(a.ns) == []
            proc = t.spawn(a.ns, [AGENT, "--config", str(tmp_path / "agent.yaml"), "--state-dir", str(tmp_path),
                                  "--control-socket", str(sock), "-v"], tmp_path / "agent.log")
            rc = proc.wait(30)
            log = (tmp_path / "agent.log").read_text()
            assert rc != 0, log
            assert str(sock) in log, log
            assert _rules(a.ns) == [], log  # was: "lookup 4301" and the fwmark rule left behind
            assert "ms0" not in sh("ip", "link", "show", ns=a.ns).stdout
        finally:
            busy.close()
