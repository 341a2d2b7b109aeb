"""An agent restarted while the controller is down runs on its stored view (controller mode).

    ns ctl  meshsec-controller 198.51.100.254 (stopped half-way)
                 |
    ======= br0 (ns sw, underlay 198.51.100.0/24) =======
        |                          |
    node-a .1 (restarted)      node-b .2
    lan0 10.1.0.1/24           lan0 10.2.0.1/24

Before the fix node-a dropped every IKE request as no_view_yet until the controller
came back; now it loads view.json from --state-dir and the CHILD_SA comes back.
Namespaces come from e2e.topology (unique prefixes, removed on exit).
"""
from __future__ import annotations

import os
import signal
import stat

import pytest

pytestmark = pytest.mark.e2e


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"), reason="needs root and /dev/net/tun")
def test_restart_while_the_controller_is_down_uses_the_stored_view():
    from e2e.mesh import Mesh
    from e2e.topology import wait_until

    with Mesh({"node-a": "10.1.0.0/24", "node-b": "10.2.0.0/24"}, keylog=False) as m:
        m.build()
        m.start_all()
        m.wait_established(timeout=60)
        stored = m.workdir / "state-node-a" / "view.json"
        wait_until(stored.exists, 10, what="node-a's stored view")
        assert stat.S_IMODE(stored.stat().st_mode) == 0o600
        m.controller.send_signal(signal.SIGTERM)
        m.controller.wait(10)
        a = m.agents["node-a"]
        a.send_signal(signal.SIGTERM)
        assert a.wait(15) == 0
        m.agent_args = ["--stored-view-after", "1"]
        m.start_agent("node-a")

        def back():
            st = m.status("node-a")
            if m.agents["node-a"].poll() is not None:
                raise RuntimeError("node-a exited:\n" + m.log("node-a"))
            return st if st and st.get("view_source") == "stored" and any(
                c.get("peer") == "node-b" for c in st.get("child_sas", [])) else None

        st = wait_until(back, 40, interval=0.3, what="CHILD_SA node-a <-> node-b on the stored view")
        assert st["view_version"] >= 1 and st["internal_errors"] == 0
        assert "running on the stored view of version" in m.log("node-a")
