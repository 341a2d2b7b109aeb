"""The controller's mesh page (controller.web): HTTPS with the controller's
certificate, client certificates of the mesh CA (revoked ones refused),
read-only, a strict CSP; and the page itself in a real headless Chromium,
drawing exactly the nodes and pairs of the mesh document."""
from __future__ import annotations

import http.client
import json
import ssl
from pathlib import Path

import pytest

from controller.web import CSP, render_page
from e2e.browser import chromium, parse_graph, run_chromium, spki_pin
from meshsec.v1 import controller_pb2 as pb
from tests.controller.ctl_helpers import ServerFactory, inventory_text, wait_for, write_inventory
from tests.controller.test_mesh_status import call, mtls, report, row


def _ctx(server, state: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=server.ca_path.read_text())
    ctx.check_hostname = False  # the certificate names meshsec-controller; trust is the mesh CA
    if state is not None:
        ctx.load_cert_chain(state / "node.crt", state / "node.key")
    return ctx


def get(server, path: str, ctx: ssl.SSLContext, method: str = "GET") -> tuple[int, dict, bytes]:
    conn = http.client.HTTPSConnection("127.0.0.1", server.mesh.web_port, context=ctx, timeout=10)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def test_web_requires_a_mesh_client_certificate(controller: ServerFactory, tmp_path: Path) -> None:
    server = controller.start(mesh_options={"web_listen": "127.0.0.1:0"})
    alpha = mtls(server, tmp_path, "alpha")  # enrols alpha: node.crt / node.key under tmp_path/agent-alpha
    call(server, alpha, "ReportStatus", report("alpha", [row("bravo")]))
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        get(server, "/", _ctx(server))  # no client certificate: the handshake fails
    status, headers, body = get(server, "/", _ctx(server, tmp_path / "agent-alpha"))
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert headers["Content-Security-Policy"] == CSP and "default-src 'none'" in CSP
    assert b'id="mesh-data"' in body and b"<svg" in body
    assert b"http://" not in body.replace(b"http://www.w3.org/2000/svg", b"")  # nothing fetched from outside
    status, headers, body = get(server, "/api/mesh", _ctx(server, tmp_path / "agent-alpha"))
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert {n["name"] for n in json.loads(body)["nodes"]} == {"alpha", "bravo", "charlie"}
    assert get(server, "/api/mesh", _ctx(server, tmp_path / "agent-alpha"), "POST")[0] == 405
    assert get(server, "/nope", _ctx(server, tmp_path / "agent-alpha"))[0] == 404


def test_web_refuses_a_revoked_certificate(controller: ServerFactory, tmp_path: Path) -> None:
    server = controller.start(mesh_options={"web_listen": "127.0.0.1:0"})
    mtls(server, tmp_path, "charlie")
    assert get(server, "/", _ctx(server, tmp_path / "agent-charlie"))[0] == 200
    # charlie leaves the inventory: its certificate is revoked
    write_inventory(controller.inventory, inventory_text().split("  - name: charlie")[0])
    wait_for(lambda: server.state.snapshot()[0].revoked, what="revocation")
    status, _, body = get(server, "/", _ctx(server, tmp_path / "agent-charlie"))
    assert status == 403 and b"revoked" in body


def test_page_escapes_the_embedded_document() -> None:
    doc = {"nodes": [], "pairs": [], "summary": {"pairs": {}}, "generated_at": 0, "view_version": 0,
           "evil": "</script><script>alert(1)</script>"}
    page = render_page(doc)
    assert "</script><script>alert(1)" not in page and "\\u003c/script>" in page


@pytest.mark.skipif(chromium() is None, reason="chromium not installed (scripts/setup.sh)")
def test_chromium_draws_the_mesh(controller: ServerFactory, tmp_path: Path) -> None:
    """Reports from three enrolled nodes over gRPC; Chromium loads the page and
    draws one node per inventory node and one edge per pair, in its state."""
    server = controller.start(mesh_options={"web_listen": "127.0.0.1:0", "web_client_auth": False})
    creds = {n: mtls(server, tmp_path, n) for n in ("alpha", "bravo", "charlie")}
    call(server, creds["alpha"], "ReportStatus", report("alpha", [row("bravo"), row(
        "charlie", "down", last_error="IKE_SA failed: peer did not respond", last_error_at=1)]))
    call(server, creds["bravo"], "ReportStatus", report("bravo", [row("alpha"), row("charlie", "connecting")]))
    call(server, creds["charlie"], "ReportStatus", report("charlie", [row("alpha", "idle"), row("bravo", "idle")]))
    doc = server.mesh.document()
    cert_pem = ssl.get_server_certificate(("127.0.0.1", server.mesh.web_port)).encode()
    shot = tmp_path / "mesh.png"
    dom = run_chromium(f"https://127.0.0.1:{server.mesh.web_port}/", pin=spki_pin(cert_pem), screenshot=shot)
    g = parse_graph(dom)
    assert set(g.nodes) == {n["name"] for n in doc["nodes"]} == {"alpha", "bravo", "charlie"}
    assert {k: v["data-connected"] for k, v in g.nodes.items()} == {"alpha": "true", "bravo": "true",
                                                                   "charlie": "true"}
    drawn = {k: v["data-state"] for k, v in g.edges.items()}
    assert drawn == {("alpha", "bravo"): "up", ("alpha", "charlie"): "down", ("bravo", "charlie"): "connecting"}
    assert drawn == {(p["a"], p["b"]): p["state"] for p in doc["pairs"]}
    assert all(e["data-rule"] == "defaults" for e in g.edges.values())
    assert g.sites == {"gateway", "host"}  # no groups in this inventory: nodes grouped by role
    assert g.body.get("data-drawn")
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "data-polls" not in g.body  # the first drawing comes from the embedded document
    # the page refreshes itself from /api/mesh (every 3 s; virtual time lets two polls happen)
    polled = parse_graph(run_chromium(f"https://127.0.0.1:{server.mesh.web_port}/", pin=spki_pin(cert_pem),
                                      virtual_time_ms=7000))
    assert int(polled.body["data-polls"]) >= 1
    assert {k: v["data-state"] for k, v in polled.edges.items()} == drawn


def test_controller_flags_for_the_mesh(tmp_path: Path) -> None:
    import socket
    import subprocess

    from tests.controller.test_cli import CLI, ROOT, run
    good = tmp_path / "inv.yaml"
    good.write_text(inventory_text())
    r = run(["--inventory", str(good), "--web-listen", "nonsense"])
    assert r.returncode == 2 and "--web-listen 'nonsense' is not HOST:PORT" in r.stderr
    r = run(["--inventory", str(good), "--web-client-ca", str(tmp_path / "missing.pem")])
    assert r.returncode == 2 and "cannot read --web-client-ca" in r.stderr
    (tmp_path / "junk.pem").write_text("not a certificate")
    r = run(["--inventory", str(good), "--web-client-ca", str(tmp_path / "junk.pem")])
    assert r.returncode == 2 and "no PEM certificate" in r.stderr
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:  # the web port is taken: exit 1 naming it
        r = run(["--inventory", str(good), "--state-dir", str(tmp_path / "s1"), "--listen", "127.0.0.1:0",
                 "--watch-listen", "127.0.0.1:0", "--web-listen", f"127.0.0.1:{busy.getsockname()[1]}"])
    finally:
        busy.close()
    assert r.returncode == 1 and "Address already in use" in r.stderr
    # the status socket lives in --state-dir by default; `meshsec mesh` reads it
    state = tmp_path / "s2"
    proc = subprocess.Popen(CLI + ["--inventory", str(good), "--state-dir", str(state), "--listen", "127.0.0.1:0",
                                   "--watch-listen", "127.0.0.1:0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline().startswith("meshsec-controller listening")
        sock = state / "controller.sock"
        assert (sock.stat().st_mode & 0o777) == 0o600
        from meshsec.cli import request
        doc = request(str(sock), {"cmd": "mesh"}, who="meshsec-controller")
        assert {n["name"] for n in doc["nodes"]} == {"alpha", "bravo", "charlie"}
        assert "error" in json.loads(_raw(str(sock), b'{"cmd": "nope"}\n'))
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    assert not (state / "controller.sock").exists()  # removed on exit


def _raw(path: str, data: bytes) -> bytes:
    import socket
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(path)
    s.sendall(data)
    out = b""
    while not out.endswith(b"\n"):
        chunk = s.recv(4096)
        if not chunk:
            break
        out += chunk
    s.close()
    return out


def test_web_bounds_concurrent_connections(controller: ServerFactory, monkeypatch, caplog) -> None:
    import logging
    import socket

    from controller import web
    monkeypatch.setattr(web._Server, "max_connections", 1)
    server = controller.start(mesh_options={"web_listen": "127.0.0.1:0", "web_client_auth": False})
    port = server.mesh.web_port
    hog = socket.create_connection(("127.0.0.1", port))  # never speaks TLS: holds the only slot
    try:
        with caplog.at_level(logging.WARNING):
            late = socket.create_connection(("127.0.0.1", port))
            late.settimeout(5)
            assert late.recv(1) == b""  # closed at once, not queued
            late.close()
        assert "more than 1 connections at once" in caplog.text
    finally:
        hog.close()
    # the slot comes back: the page answers again
    def answers() -> bool:
        try:
            return get(server, "/api/mesh", _ctx(server))[0] == 200
        except (ssl.SSLError, OSError):  # refused while the slot is still taken
            return False
    wait_for(answers, what="page after the hog left")
