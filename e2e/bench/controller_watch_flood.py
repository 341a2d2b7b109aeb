"""Controller under a Watch flood from one enrolled node (issue 13): a benchmark, not a test.

An in-process controller on 127.0.0.1 (ephemeral ports, a temporary state
directory) with ``--max-workers`` threads; node alpha enrols and opens N Watch
streams on one connection and reads none of them; then node bravo enrols,
watches and renews, each with a deadline. Printed: bravo's latencies (or the
error), and how many of alpha's streams the controller still serves.

Run: ``.venv/bin/python e2e/bench/controller_watch_flood.py [--streams 300] [--max-workers 256]``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import grpc  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

from controller.service import ControllerServer  # noqa: E402
from meshsec.v1 import controller_pb2 as pb  # noqa: E402
from meshsec.v1 import controller_pb2_grpc as pb_grpc  # noqa: E402

OPTS = [("grpc.ssl_target_name_override", "meshsec-controller")]
INVENTORY = """\
nodes:
  - name: alpha
    role: host
    endpoints: [198.51.100.1]
    join_token: alpha-token
  - name: bravo
    role: host
    endpoints: [198.51.100.2]
    join_token: bravo-token
"""


def csr(name: str, key) -> bytes:
    return x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])).sign(key, hashes.SHA256()).public_bytes(
        serialization.Encoding.DER)


def mtls(server, chain_der: bytes, key) -> grpc.ChannelCredentials:
    pem = x509.load_der_x509_certificate(chain_der).public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return grpc.ssl_channel_credentials(server.ca_path.read_bytes(), key_pem, pem)


def timed(what: str, fn, deadline: float) -> str:
    t0 = time.perf_counter()
    try:
        fn(deadline)
        return f"{what}: {1000 * (time.perf_counter() - t0):.0f} ms"
    except grpc.RpcError as e:
        return f"{what}: {e.code().name} after {time.perf_counter() - t0:.1f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=300, help="alpha's Watch streams (default: %(default)s)")
    ap.add_argument("--max-workers", type=int, default=256, help="controller threads (default: %(default)s)")
    ap.add_argument("--deadline", type=float, default=5.0, help="bravo's RPC deadline, s (default: %(default)s)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    tmp = Path(tempfile.mkdtemp(prefix="meshsec-bench-"))
    (tmp / "inventory.yaml").write_text(INVENTORY)
    server = ControllerServer(tmp / "inventory.yaml", tmp / "state", listen="127.0.0.1:0", server_names=["127.0.0.1"],
                              cert_lifetime=dt.timedelta(hours=1), max_workers=args.max_workers,
                              logger=logging.getLogger("bench.controller"))
    server.start()
    enrol_ch = grpc.secure_channel(f"127.0.0.1:{server.port}", grpc.ssl_channel_credentials(
        server.ca_path.read_bytes()), options=OPTS)
    enrol = pb_grpc.ControllerStub(enrol_ch)
    akey = ec.generate_private_key(ec.SECP256R1())
    alpha = enrol.Enroll(pb.EnrollRequest(node_name="alpha", join_token="alpha-token", csr_der=csr("alpha", akey)),
                         timeout=10)
    ach = grpc.secure_channel(f"127.0.0.1:{server.watch_port}", mtls(server, alpha.certificate_chain_der[0], akey),
                              options=OPTS)
    calls = [pb_grpc.ControllerStub(ach).Watch(pb.WatchRequest(node_name="alpha"), timeout=120)
             for _ in range(args.streams)]
    time.sleep(2.0)  # let the controller take them up (a benchmark may wait; tests poll)
    bkey = ec.generate_private_key(ec.SECP256R1())
    out = {}

    def do_enrol(deadline):
        out["bravo"] = enrol.Enroll(pb.EnrollRequest(node_name="bravo", join_token="bravo-token",
                                                     csr_der=csr("bravo", bkey)), timeout=deadline)

    print(f"alpha: {args.streams} Watch streams; controller --max-workers {args.max_workers}")
    print("  bravo " + timed("Enroll", do_enrol, args.deadline))
    if "bravo" in out:
        bch = grpc.secure_channel(f"127.0.0.1:{server.watch_port}",
                                  mtls(server, out["bravo"].certificate_chain_der[0], bkey), options=OPTS)
        bstub = pb_grpc.ControllerStub(bch)

        def do_watch(deadline):
            call = bstub.Watch(pb.WatchRequest(node_name="bravo"), timeout=deadline)
            next(iter(call))
            call.cancel()

        def do_renew(deadline):
            bstub.Renew(pb.RenewRequest(node_name="bravo", csr_der=csr("bravo", bkey)), timeout=deadline)
        print("  bravo " + timed("Watch (first update)", do_watch, args.deadline))
        print("  bravo " + timed("Renew", do_renew, args.deadline))
        bch.close()
    watches = getattr(server, "watches", None)
    if watches is not None:
        print(f"  alpha's live Watch streams at the controller: {watches.live('alpha')} "
              f"(superseded {watches.superseded})")
    else:
        print("  alpha's live Watch streams at the controller: all that got a thread (no per-node limit)")
    for c in calls:
        c.cancel()
    ach.close()
    enrol_ch.close()
    server.stop(grace=0)


if __name__ == "__main__":
    main()
