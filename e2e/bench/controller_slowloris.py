"""Controller under an unauthenticated slowloris on the enrol port (issue 13): a benchmark, not a test.

An in-process controller on 127.0.0.1 (ephemeral ports, a temporary state
directory) with ``--max-workers`` threads. Node alpha enrols first. Then N
Enroll calls open their stream on the enrol port and never send the request
message. Meanwhile alpha renews (watch port, mutual TLS), watches, and node
bravo enrols, each with a deadline. Printed: those latencies (or the error).

Run: ``.venv/bin/python e2e/bench/controller_slowloris.py [--stalled 300] [--max-workers 256]``.
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
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
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
    stalled = [method.future(never(), timeout=120) for _ in range(args.stalled)]
    time.sleep(2.0)  # let the controller take them up (a benchmark may wait; tests poll)

    ach = grpc.secure_channel(f"127.0.0.1:{server.watch_port}", mtls(server, alpha.certificate_chain_der[0], akey),
                              options=OPTS)
    astub = pb_grpc.ControllerStub(ach)

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

    print(f"{args.stalled} stalled Enroll calls open; controller --max-workers {args.max_workers}, "
          f"deadline {args.deadline:g} s")
    print("  alpha " + timed("Renew", do_renew, args.deadline))
    print("  alpha " + timed("Watch (first update)", do_watch, args.deadline))
    print("  bravo " + timed("Enroll (fresh)", do_enrol, args.deadline))
    port = getattr(server, "enrol_port", None)
    if port is not None:
        print(f"  enrol port: stalled calls are coroutines, ended after {port.read_timeout:g} s without a "
              f"request; at most {port.max_concurrent} open calls")
    release.set()
    for c in stalled:
        c.cancel()
    ach.close()
    bad_ch.close()
    server.stop(grace=0)


if __name__ == "__main__":
    main()
