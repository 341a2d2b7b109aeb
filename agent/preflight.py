"""Preflight checks of ``meshsec-agent`` before it opens anything: CAP_NET_ADMIN, the TUN
device node, UDP 500/4500 free on the local address. Each failure is a StartupError whose
message says what to do (exit status 1)."""
from __future__ import annotations

import errno
import os
import socket

CAP_NET_ADMIN = 12


class StartupError(Exception):
    """A preflight check or start-up step failed; the message says what to do."""


def check_cap_net_admin(status_path: str = "/proc/self/status") -> None:
    """StartupError unless CAP_NET_ADMIN is in the effective set (CapEff bit 12)."""
    try:
        with open(status_path) as f:
            for line in f:
                if line.startswith("CapEff:"):
                    if int(line.split()[1], 16) >> CAP_NET_ADMIN & 1:
                        return
                    break
    except (OSError, ValueError, IndexError):
        pass
    raise StartupError("missing capability CAP_NET_ADMIN (needed for the TUN device and routes): "
                       "run as root or grant it, e.g. `setcap cap_net_admin+ep` / a container with NET_ADMIN")


def check_dev_tun(path: str = "/dev/net/tun") -> None:
    if not os.path.exists(path):
        raise StartupError(f"{path} does not exist: load the tun module (`modprobe tun`) or, in a container, "
                           "pass the device (--device /dev/net/tun)")


def bind_hint(err: int | None, port: int, local_address: str) -> str:
    """What to do when binding UDP ``port`` failed with ``err`` (an errno)."""
    if err == errno.EADDRINUSE:
        return "is another IKE daemon (strongSwan charon, another meshsec-agent) running?"
    if err == errno.EACCES:
        return (f"port {port} is below 1024 and needs CAP_NET_BIND_SERVICE: run as root or grant it "
                "(`setcap cap_net_bind_service,cap_net_admin+ep`, or NET_BIND_SERVICE in the container's "
                "capabilities)")
    if err == errno.EADDRNOTAVAIL:
        return f"{local_address} is not an address of this host: fix --local-address / local_address"
    return "check --local-address and the agent's privileges"


def check_ports_free(local_address: str) -> None:
    """StartupError if UDP 500 or 4500 is already bound on ``local_address``."""
    fam = socket.AF_INET6 if ":" in local_address else socket.AF_INET
    for port in (500, 4500):
        s = socket.socket(fam, socket.SOCK_DGRAM)
        try:
            s.bind((local_address, port))
        except OSError as exc:
            raise StartupError(f"UDP port {port} on {local_address} is not available ({exc.strerror}): "
                               + bind_hint(exc.errno, port, local_address)) from None
        finally:
            s.close()
