"""strongSwan 5.9.8 as an interop peer in a network namespace (e2e only).

One ``Charon`` per namespace, as /work/shared/INTEROP.md describes:

- its own strongswan.conf (``STRONGSWAN_CONF``), log file and VICI socket
  in a work directory;
- a private /run: ``unshare --mount`` + a tmpfs on /run, because the pid file
  path /var/run/charon.pid is compiled in;
- plugins loaded explicitly, kernel-libipsec before kernel-netlink (ESP in
  userspace over the TUN device ipsec0; this kernel has no ESP) and ``kdf``;
- ``swanctl --uri unix://<vici>`` to load connections and initiate.

``Pki`` makes test certificates with strongSwan's ``pki`` tool (a CA, an
optional intermediate CA, leaf certificates with a DNS subjectAltName), so
the certificates meshsec verifies were not written by meshsec.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from e2e.topology import Topology, TopologyError, sh, wait_until

CHARON = "/usr/lib/ipsec/charon"
PLUGIN_DIR = "/usr/lib/ipsec/plugins"
# kernel-libipsec must come before kernel-netlink (it provides the IPsec backend)
PLUGINS = ("random nonce openssl pem pkcs1 pkcs8 pubkey x509 constraints aes sha1 sha2 hmac kdf gcm "
           "chapoly curve25519 kernel-libipsec kernel-netlink socket-default vici")


def missing_prerequisites() -> str | None:
    """None when charon, swanctl, pki and the plugins are installed, else what is missing."""
    if not os.path.exists(CHARON):
        return f"{CHARON} missing (install strongswan-charon; scripts/setup.sh does)"
    for tool in ("swanctl", "pki", "unshare"):
        if not shutil.which(tool):
            return f"{tool} missing (install strongswan-swanctl / strongswan-pki; scripts/setup.sh does)"
    for p in PLUGINS.split():
        if not os.path.exists(f"{PLUGIN_DIR}/libstrongswan-{p}.so"):
            return f"strongSwan plugin {p} missing (libcharon-extra-plugins / libstrongswan-*-plugins)"
    return None


_CONF = """\
charon {{
  load_modular = no
  load = {plugins}
  port = 500
  port_nat_t = 4500
  install_virtual_ip = no
  # loaded CI machines: keep the first retransmit quick (happy path unchanged) but give up late
  # (1 s, then x1.8 each: about 75 s over 7 tries)
  retransmit_tries = 7
  retransmit_timeout = 1.0
  fragment_size = {fragment_size}
  filelog {{
    interop {{
      path = {dir}/charon.log
      time_format = %T
      default = 1
      ike = 2
      cfg = 2
      enc = 1
      knl = 1
      append = yes
      flush_line = yes
    }}
  }}
  syslog {{
  }}
  plugins {{
    vici {{
      socket = unix://{dir}/charon.vici
    }}
  }}
}}
"""


class Charon:
    """One charon in namespace ``ns``; files in ``workdir``. Stopped by the topology's cleanup."""

    def __init__(self, topo: Topology, ns: str, workdir: Path, fragment_size: int = 1280):
        self.topo = topo
        self.ns = ns
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.vici = self.dir / "charon.vici"
        self.log_path = self.dir / "charon.log"
        (self.dir / "strongswan.conf").write_text(
            _CONF.format(plugins=PLUGINS, dir=self.dir, fragment_size=fragment_size))
        self.proc = topo.spawn(ns, [
            "unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount -t tmpfs interop-run /run && exec env STRONGSWAN_CONF="$1" "$2"',
            "sh", str(self.dir / "strongswan.conf"), CHARON], self.dir / "charon-stdout.log")
        wait_until(lambda: self.vici.exists() or self.proc.poll() is not None, 60, 0.05, "charon's vici socket")
        if self.proc.poll() is not None:
            raise TopologyError(f"charon exited ({self.proc.returncode}); see {self.dir}/charon-stdout.log")

    def swanctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh("swanctl", *args, "--uri", f"unix://{self.vici}", ns=self.ns, check=check)

    def load(self, swanctl_conf: str, keys: tuple[Path, ...] = ()) -> None:
        """Replace all connections, secrets and credentials with ``swanctl_conf``.

        Certificates are referenced by absolute paths in the config (``certs``,
        ``cacerts``); swanctl loads private keys only from its ``private/``
        directory, so ``keys`` are copied there (the old ones removed).
        """
        for sub in ("x509", "x509ca", "x509ocsp", "x509aa", "x509ac", "x509crl", "pubkey", "private", "rsa",
                    "ecdsa", "bliss", "pkcs8", "pkcs12"):
            (self.dir / sub).mkdir(exist_ok=True)
        for old in (self.dir / "private").iterdir():
            old.unlink()
        for k in keys:
            shutil.copy(k, self.dir / "private" / Path(k).name)
        path = self.dir / "swanctl.conf"
        path.write_text(swanctl_conf)
        res = self.swanctl("--load-all", "--clear", "--noprompt", "--file", str(path))
        (self.dir / "swanctl-load.log").write_text(res.stdout + res.stderr)

    def initiate(self, child: str, timeout: int = 40) -> subprocess.CompletedProcess:
        return self.swanctl("--initiate", "--child", child, "--timeout", str(timeout), check=False)

    def terminate_all(self) -> None:
        """Delete every IKE_SA (and wait for the deletes to finish)."""
        out = self.swanctl("--list-sas", check=False).stdout
        for name in set(re.findall(r"^(\S+): #\d+", out, re.M)):
            self.swanctl("--terminate", "--ike", name, "--timeout", "5", "--force", check=False)

    def list_sas(self) -> str:
        return self.swanctl("--list-sas", check=False).stdout

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def mark(self) -> int:
        """Offset into the log; pass to log_since() to read what came after."""
        return len(self.log())

    def log_since(self, mark: int) -> str:
        return self.log()[mark:]


class Pki:
    """Certificates from strongSwan's ``pki`` tool, PEM files under ``dir``."""

    def __init__(self, dir: Path):
        self.dir = Path(dir)
        self.dir.mkdir(parents=True, exist_ok=True)

    def _pki(self, *args: str) -> bytes:
        res = subprocess.run(["pki", *args], capture_output=True)
        if res.returncode != 0:
            raise TopologyError(f"pki {' '.join(args)} failed: {res.stderr.decode(errors='replace')}")
        return res.stdout

    def key(self, name: str, kind: str) -> Path:
        """kind: ecdsa256 | ecdsa384 | rsa3072 | ed25519."""
        args = {"ecdsa256": ["--type", "ecdsa", "--size", "256"], "ecdsa384": ["--type", "ecdsa", "--size", "384"],
                "rsa3072": ["--type", "rsa", "--size", "3072"], "ed25519": ["--type", "ed25519"]}[kind]
        p = self.dir / f"{name}.key"
        p.write_bytes(self._pki("--gen", *args, "--outform", "pem"))
        return p

    def self_signed_ca(self, name: str, key: Path) -> Path:
        p = self.dir / f"{name}.crt"
        p.write_bytes(self._pki("--self", "--ca", "--lifetime", "2", "--in", str(key),
                                "--dn", f"CN={name}", "--outform", "pem"))
        return p

    def issue(self, name: str, key: Path, ca_cert: Path, ca_key: Path, *, san: str | None = None,
              ca: bool = False, pss: bool = False) -> Path:
        """A certificate for ``key`` signed by ``ca_cert``/``ca_key`` (a sub-CA when ``ca``)."""
        pub = self._pki("--pub", "--in", str(key), "--outform", "pem")
        pubp = self.dir / f"{name}.pub"
        pubp.write_bytes(pub)
        args = ["--issue", "--cacert", str(ca_cert), "--cakey", str(ca_key), "--type", "pub", "--in", str(pubp),
                "--dn", f"CN={name}", "--lifetime", "2", "--outform", "pem"]
        if san:
            args += ["--san", san]
        if ca:
            args += ["--ca"]
        if pss:
            args += ["--rsa-padding", "pss"]
        p = self.dir / f"{name}.crt"
        p.write_bytes(self._pki(*args))
        return p
