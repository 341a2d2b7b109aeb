"""Controller under an unauthenticated slowloris on the enrol port (issue 13): a benchmark, not a test.

An in-process controller on 127.0.0.1 (ephemeral ports, a temporary state
directory) with ``--max-workers`` threads. Node alpha enrols first. Then N
Enroll calls open their stream on the enrol port and never send the request
message. Meanwhile alpha renews (watch port, mutual TLS), watches, and node
bravo enrols, each with a deadline. Printed: those latencies (or the error).

``--idle-tcp N`` instead: a separate attacker process keeps N plain TCP connections to the enrol
port open that send nothing (reopening each one the controller closes), with the controller's
soft open-file limit set to ``--nofile`` (default 1024, a common default; the controller does not
raise it here, to show the per-port caps alone).

Run: ``.venv/bin/python e2e/bench/controller_slowloris.py [--stalled 300] [--max-workers 256]``
or ``... --idle-tcp 1000 [--nofile 1024]``.
``MESHSEC_BENCH_ROOT=/path/to/other/checkout`` measures another tree's controller (e.g. before the fix).
"""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.environ.get("MESHSEC_BENCH_ROOT") or os.path.join(os.path.dirname(__file__), "..", ".."))

import grpc  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

from controller.service import ControllerServer  # noqa: E402
from meshsec.v1 import controller_pb2 as pb  # noqa: E402
from meshsec.v1 import controller_pb2_grpc as pb_grpc  # noqa: E402

_bench = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(1, _bench)
from controller_watch_flood import INVENTORY, OPTS, csr, mtls, timed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stalled", type=int, default=300, help="Enroll calls that never send (default: %(default)s)")
    ap.add_argument("--max-workers", type=int, default=256, help="controller threads (default: %(default)s)")
    ap.add_argument("--deadline", type=float, default=5.0, help="RPC deadline, s (default: %(default)s)")
    ap.add_argument("--idle-tcp", type=int, default=0, help="idle TCP connections instead of stalled calls")
    ap.add_argument("--nofile", type=int, default=1024, help="controller's soft RLIMIT_NOFILE with --idle-tcp")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.idle_tcp:
        import resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    tmp = Path(tempfile.mkdtemp(prefix="meshsec-bench-"))
    (tmp / "inventory.yaml").write_text(INVENTORY)
    server = ControllerServer(tmp / "inventory.yaml", tmp / "state", listen="127.0.0.1:0", server_names=["127.0.0.1"],
                              cert_lifetime=dt.timedelta(hours=1), max_workers=args.max_workers,
                              logger=logging.getLogger("bench.controller"))
    server.start()
    ca = grpc.ssl_channel_credentials(server.ca_path.read_bytes())
    enrol_ch = grpc.secure_channel(f"127.0.0.1:{server.port}", ca, options=OPTS)
    akey = ec.generate_private_key(ec.SECP256R1())
    alpha = pb_grpc.ControllerStub(enrol_ch).Enroll(
        pb.EnrollRequest(node_name="alpha", join_token="alpha-token", csr_der=csr("alpha", akey)), timeout=10)
    enrol_ch.close()

    release = threading.Event()

    def never():
        release.wait()
        return
        yield

    # the attacker's connection: N streams, headers only
    bad_ch = grpc.secure_channel(f"127.0.0.1:{server.port}", ca, options=OPTS)
    method = bad_ch.stream_unary("/meshsec.v1.Controller/Enroll",
                                 request_serializer=pb.EnrollRequest.SerializeToString,
                                 response_deserializer=pb.EnrollResponse.FromString)
    stalled = [method.future(never(), timeout=120) for _ in range(0 if args.idle_tcp else args.stalled)]
    time.sleep(0 if args.idle_tcp else 2.0)  # let the controller take them up (a benchmark may wait; tests poll)

    ach = grpc.secure_channel(f"127.0.0.1:{server.watch_port}", mtls(server, alpha.certificate_chain_der[0], akey),
                              options=OPTS)
    astub = pb_grpc.ControllerStub(ach)
    attacker = idle_tcp(server.port, args.idle_tcp) if args.idle_tcp else None

    def do_renew(deadline):
        astub.Renew(pb.RenewRequest(node_name="alpha", csr_der=csr("alpha", akey)), timeout=deadline)

    def do_watch(deadline):
        call = astub.Watch(pb.WatchRequest(node_name="alpha"), timeout=deadline)
        next(iter(call))
        call.cancel()

    bkey = ec.generate_private_key(ec.SECP256R1())

    def do_enrol(deadline):
        with grpc.secure_channel(f"127.0.0.1:{server.port}", ca, options=OPTS) as ch:
            pb_grpc.ControllerStub(ch).Enroll(pb.EnrollRequest(node_name="bravo", join_token="bravo-token",
                                                               csr_der=csr("bravo", bkey)), timeout=deadline)

    if attacker is not None:
        time.sleep(4.0)  # past gRPC's connect backoff; the attacker holds its connections
        print(f"{args.idle_tcp} idle TCP connections kept open to the enrol port; controller soft NOFILE "
              f"{args.nofile}, deadline {args.deadline:g} s")
    else:
        print(f"{args.stalled} stalled Enroll calls open; controller --max-workers {args.max_workers}, "
              f"deadline {args.deadline:g} s")
    print("  alpha " + timed("Renew", do_renew, args.deadline))
    print("  alpha " + timed("Watch (first update)", do_watch, args.deadline))
    print("  bravo " + timed("Enroll (fresh)", do_enrol, args.deadline))
    port = getattr(server, "enrol_port", None)
    if attacker is not None:
        attacker.terminate()
        attacker.wait(timeout=10)
        caps = (getattr(server, "enroll_max_connections", None), getattr(server, "watch_max_connections", None))
        print(f"  connection caps (enrol, watch): {caps}; handshake timeout "
              f"{getattr(server, 'enroll_handshake_timeout', 120):g} s")
    elif port is not None:
        print(f"  enrol port: stalled calls are coroutines, ended after {port.read_timeout:g} s without a "
              f"request; at most {port.max_concurrent} open calls")
    release.set()
    for c in stalled:
        c.cancel()
    ach.close()
    bad_ch.close()
    server.stop(grace=0)


ATTACKER = """
import os, resource, selectors, socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
parent = os.getppid()
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
sel = selectors.DefaultSelector()
def one():
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=2)
    except OSError:
        return
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
for _ in range(n):
    one()
while os.getppid() == parent:  # ends with the benchmark, even if it dies
    for key, _ in sel.select(timeout=0.2):
        sel.unregister(key.fileobj)
        key.fileobj.close()
    for _ in range(n - len(sel.get_map())):
        one()
"""


def idle_tcp(port: int, n: int):
    """A child process that keeps ``n`` idle TCP connections to 127.0.0.1:``port`` open (own fd limit)."""
    import subprocess
    return subprocess.Popen([sys.executable, "-c", ATTACKER, str(port), str(n)])


if __name__ == "__main__":
    main()
