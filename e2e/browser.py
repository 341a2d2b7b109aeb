"""Headless Chromium (Debian's ``chromium`` package) for the mesh page tests:
load a page, dump its DOM after the load event, take a screenshot; parse the
SVG graph out of the dump.

The controller's certificate is signed by the mesh CA, which Chromium does not
know: it is accepted by pinning its public key
(``--ignore-certificate-errors-spki-list``), nothing else is trusted. Every
run uses a fresh ``--user-data-dir`` and no network service of its own
(background networking, component updates and sync are off) and resolves no
name at all, so the browser talks only to the page's IP address.
"""
from __future__ import annotations

import base64
import hashlib
import html.parser
import shutil
import subprocess
import tempfile
import urllib.parse
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization


def chromium() -> str | None:
    """Path of the chromium binary, or None (scripts/setup.sh installs it)."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def spki_pin(cert_pem: bytes) -> str:
    """base64(SHA-256(SubjectPublicKeyInfo)) of a PEM certificate, Chromium's pin format."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def run_chromium(url: str, *, pin: str | None = None, screenshot: Path | None = None, ns: str | None = None,
                 timeout: float = 90.0, size: str = "1280,800", virtual_time_ms: int = 0) -> str:
    """The DOM of ``url`` after load (``--dump-dom``); with ``screenshot``, a second
    run saves a PNG there. ``ns``: run inside that network namespace.
    ``virtual_time_ms``: let the page's timers run that long (virtual time) before the dump."""
    exe = chromium()
    if exe is None:
        raise FileNotFoundError("chromium not installed (apt-get install -y chromium; scripts/setup.sh)")
    prefix = ["ip", "netns", "exec", ns] if ns else []
    with tempfile.TemporaryDirectory(prefix="meshsec-chromium-") as profile:
        base = [*prefix, exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-default-apps", "--disable-extensions", "--no-default-browser-check",
                "--metrics-recording-only", "--no-pings", "--disable-domain-reliability",
                "--disable-client-side-phishing-detection", "--disable-features=OptimizationHints,MediaRouter",
                # no name resolves but the page's own host: nothing else can be reached
                f"--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE {urllib.parse.urlsplit(url).hostname}",
                f"--user-data-dir={profile}", f"--window-size={size}", "--hide-scrollbars"]
        if pin:
            base.append(f"--ignore-certificate-errors-spki-list={pin}")
        budget = [f"--virtual-time-budget={virtual_time_ms}"] if virtual_time_ms else []
        dom = subprocess.run([*base, *budget, "--dump-dom", url], capture_output=True, text=True, timeout=timeout)
        if dom.returncode != 0 or "<svg" not in dom.stdout:
            raise RuntimeError(f"chromium --dump-dom {url} failed ({dom.returncode}):\n{dom.stderr[-3000:]}")
        if screenshot is not None:
            shot = subprocess.run([*base, f"--screenshot={screenshot}", url], capture_output=True, text=True,
                                  timeout=timeout)
            if shot.returncode != 0 or not screenshot.exists():
                raise RuntimeError(f"chromium --screenshot failed ({shot.returncode}):\n{shot.stderr[-3000:]}")
        return dom.stdout


class _Graph(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.nodes: dict[str, dict[str, str]] = {}
        self.edges: dict[tuple[str, str], dict[str, str]] = {}
        self.sites: set[str] = set()
        self.body: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs) -> None:
        a = {k: v or "" for k, v in attrs}
        cls = a.get("class", "")
        if tag == "g" and cls == "node":
            self.nodes[a["data-node"]] = a
        elif tag == "g" and cls == "edge":
            self.edges[(a["data-a"], a["data-b"])] = a
        elif tag == "g" and cls == "site":
            self.sites.add(a["data-site"])
        elif tag == "body":
            self.body = a


def parse_graph(dom: str) -> _Graph:
    """Nodes (by name), edges (by (a, b)) and sites drawn in the page's SVG, with their data-* attributes."""
    g = _Graph()
    g.feed(dom)
    return g
