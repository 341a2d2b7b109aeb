"""Demo: a controller and three meshsec agents in network namespaces.

Builds the topology drawn in e2e/test_mesh.py, starts the controller and
the agents, waits for the IKE_SAs and CHILD_SAs, has every workload ping
every other, moves 20 MB over TCP through the mesh, shows `meshsec status`
on every node, and removes everything when it ends (also on Ctrl-C).

Usage (root): bash scripts/demo.sh [--hold SECONDS] [--keep]
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

from e2e.mesh import Mesh, venv_bin
from e2e.topology import ping, sh

NODES = {"node-a": "10.1.0.0/24", "node-b": "10.2.0.0/24", "node-c": "10.3.0.0/24"}


def say(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hold", type=float, default=0.0,
                    help="keep the mesh up this many seconds before tearing it down (try `ip netns` meanwhile)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the work dir (logs, and the key log, keys, tokens and CA: secrets) after the demo")
    args = ap.parse_args()
    with Mesh(NODES) as mesh:
        mesh.keep_workdir = args.keep
        say(f"building namespaces (work dir {mesh.workdir})")
        mesh.build()
        say("starting meshsec-controller on 198.51.100.254:7443 and three meshsec-agents")
        t0 = time.monotonic()
        mesh.start_all()
        mesh.wait_established(timeout=90)
        say(f"mesh established in {time.monotonic() - t0:.1f}s")
        workloads = [w for n in NODES for w in mesh.node(n).workloads]
        for src, dst in itertools.permutations(workloads, 2):
            ok = any(ping(src.ns, dst.ip, count=1) for _ in range(5))
            print(f"  ping {src.name:>9} {src.ip:<9} -> {dst.name:>9} {dst.ip:<9} {'ok' if ok else 'FAILED'}")
        src, dst = mesh.node("node-a").workloads[0], mesh.node("node-c").workloads[0]
        say(f"20 MB over TCP {src.ip} -> {dst.ip}")
        blob = mesh.workdir / "blob"
        data = os.urandom(20_000_000)
        blob.write_bytes(data)
        server = subprocess.Popen(["ip", "netns", "exec", dst.ns, sys.executable, "-m", "e2e.transfer", "serve", "5001"],
                                  stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
        server.stdout.readline()
        t1 = time.monotonic()
        sh(sys.executable, "-m", "e2e.transfer", "send", dst.ip, "5001", str(blob), ns=src.ns)
        out, _ = server.communicate(timeout=120)
        dt = time.monotonic() - t1
        n, digest = out.split()
        intact = int(n) == len(data) and digest == hashlib.sha256(data).hexdigest()
        print(f"  {int(n) / 1e6:.1f} MB in {dt:.2f}s ({int(n) * 8 / dt / 1e6:.0f} Mbit/s), "
              f"sha256 {'matches' if intact else 'DIFFERS'}")
        for name in NODES:
            say(f"meshsec status on {name}")
            subprocess.run([venv_bin("meshsec"), "status", "--socket", str(mesh.socket(name))])
        if args.hold:
            say(f"holding for {args.hold:.0f}s")
            time.sleep(args.hold)
        say("tearing down")
    if args.keep:
        print(f"done: namespaces and processes removed; work dir kept: {mesh.workdir} (holds keys: delete it)")
    else:
        print("done: namespaces, processes and the work dir (keys, tokens, CA, key log) removed")
    return 0 if intact else 1


if __name__ == "__main__":
    sys.exit(main())
