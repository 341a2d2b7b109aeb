"""Controller fan-out benchmark (prints figures; not a test).

    python -m e2e.bench_controller [--agents 1000] [--rounds 3] [--max-workers 1100]

One ``meshsec-controller`` process on 127.0.0.1 (SQLite state in a temp
dir; an inventory of N gateway nodes, full mesh, so each view holds N-1
peers). N simulated agents, each with its own key and certificate enrolled
through ``Enroll``, hold ``Watch`` streams over mutual TLS: one grpc.aio
event loop in one thread, one channel per agent (each has its own client
certificate). Then the inventory file changes (one node's endpoint) and
every stream must receive the incremental update.

Printed: time to enrol and to open all streams; per round the fan-out
latency p50/p99/max from the first agent receiving the update (the
controller's fan-out proper) and from the file write (adds the 1 s
inventory poll); the controller's CPU seconds for the round, its idle CPU
per second with all streams open, and its RSS; last, the controller's CPU
to end every stream at once (all agents gone). Loopback only. Figures:
docs/scale.md.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshsec.v1 import controller_pb2 as pb
from meshsec.v1 import controller_pb2_grpc as pb_grpc

HOST = "127.0.0.1"
OPTS = [("grpc.ssl_target_name_override", "meshsec-controller")]


def endpoint(i: int) -> str:
    return f"10.200.{i // 250}.{i % 250 + 1}"  # data only: nothing is sent there


def inventory(n: int, moved: int | None = None, round_: int = 0) -> str:
    lines = ["nodes:"]
    for i in range(n):
        ep = endpoint(i) if i != moved else f"10.201.{round_ // 250}.{round_ % 250 + 1}"
        lines += [f"  - name: n{i:04d}", "    role: gateway", f"    endpoints: [{ep}]",
                  f"    subnets: [10.{i // 256}.{i % 256}.0/24]", f"    join_token: token-{i}"]
    return "\n".join(lines) + "\n"


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def enrol(port: int, ca_pem: bytes, n: int, threads: int = 8) -> list[tuple[bytes, bytes]]:
    """(key PEM, certificate PEM) per agent, enrolled over one channel."""
    channel = grpc.secure_channel(f"{HOST}:{port}", grpc.ssl_channel_credentials(ca_pem), options=OPTS)
    stub = pb_grpc.ControllerStub(channel)

    def one(i: int) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        name = f"n{i:04d}"
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])).sign(key, hashes.SHA256()))
        resp = stub.Enroll(pb.EnrollRequest(node_name=name, join_token=f"token-{i}",
                                            csr_der=csr.public_bytes(serialization.Encoding.DER)), timeout=60)
        cert = x509.load_der_x509_certificate(resp.certificate_chain_der[0])
        return (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()),
                cert.public_bytes(serialization.Encoding.PEM))

    with ThreadPoolExecutor(threads) as pool:
        out = list(pool.map(one, range(n)))
    channel.close()
    return out


class Agents:
    """N Watch streams on one asyncio loop; records when each version arrives."""

    def __init__(self, watch_port: int, ca_pem: bytes, creds: list[tuple[bytes, bytes]]) -> None:
        self.watch_port, self.ca_pem, self.creds = watch_port, ca_pem, creds
        self.received: dict[int, list[float]] = {}  # version -> arrival times (monotonic)
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="bench-aio", daemon=True)
        self.channels: list = []

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._open_all(), self.loop).result()

    async def _open_all(self) -> None:
        for i, (key, cert) in enumerate(self.creds):
            creds = grpc.ssl_channel_credentials(self.ca_pem, key, cert)
            ch = grpc.aio.secure_channel(f"{HOST}:{self.watch_port}", creds, options=OPTS)
            self.channels.append(ch)
            self.loop.create_task(self._watch(ch, f"n{i:04d}"))

    async def _watch(self, ch, name: str) -> None:
        try:
            async for upd in pb_grpc.ControllerStub(ch).Watch(pb.WatchRequest(node_name=name)):
                t = time.monotonic()
                with self.lock:
                    self.received.setdefault(upd.version, []).append(t)
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                self.errors.append(f"{name}: {e.code().name}: {e.details()}")

    def count(self, version: int) -> int:
        with self.lock:
            return len(self.received.get(version, []))

    def times(self, version: int) -> list[float]:
        with self.lock:
            return list(self.received.get(version, []))

    def close(self) -> None:
        async def close_all():
            for ch in self.channels:
                await ch.close()
        asyncio.run_coroutine_threadsafe(close_all(), self.loop).result(timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def wait(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def settle(pid: int, quiet: float = 0.02, timeout: float = 120.0) -> None:
    """Wait until the process uses less than ``quiet`` CPU s/s over 0.5 s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c0 = proc_cpu(pid)
        time.sleep(0.5)
        if proc_cpu(pid) - c0 < quiet * 0.5:
            return


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-workers", type=int, default=None, help="controller threads (default: agents + 64)")
    ap.add_argument("--port", type=int, default=17443)
    args = ap.parse_args(argv)
    n = args.agents
    work = Path(tempfile.mkdtemp(prefix="meshsec-bench-ctl-"))
    inv = work / "inventory.yaml"
    inv.write_text(inventory(n))
    ctl_bin = Path(sys.executable).parent / "meshsec-controller"
    log = open(work / "controller.log", "wb")
    proc = subprocess.Popen([str(ctl_bin), "--inventory", str(inv), "--state-dir", str(work / "state"),
                             "--listen", f"{HOST}:{args.port}", "--server-name", HOST,
                             "--max-workers", str(args.max_workers or n + 64)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    agents = None
    try:
        ca = work / "state" / "ca.pem"
        wait(lambda: ca.exists() and proc.poll() is None, 30, "controller start")
        time.sleep(0.5)
        ca_pem = ca.read_bytes()
        t0 = time.monotonic()
        creds = enrol(args.port, ca_pem, n)
        t_enrol = time.monotonic() - t0
        cpu0 = proc_cpu(proc.pid)
        t0 = time.monotonic()
        agents = Agents(args.port + 1, ca_pem, creds)
        agents.start()
        wait(lambda: agents.count(1) == n or agents.errors, 300, f"{n} snapshots")
        if agents.errors:
            raise RuntimeError(f"{len(agents.errors)} watch errors, first: {agents.errors[0]}")
        t_streams = time.monotonic() - t0
        cpu_streams = proc_cpu(proc.pid) - cpu0
        print(f"agents: {n}; enrolment {t_enrol:.1f} s ({n / t_enrol:.0f}/s); "
              f"{n} Watch streams with snapshots ({n - 1} peers each) in {t_streams:.1f} s, "
              f"controller CPU {cpu_streams:.1f} s")
        time.sleep(2.0)
        c0 = proc_cpu(proc.pid)
        time.sleep(5.0)
        idle = (proc_cpu(proc.pid) - c0) / 5.0
        print(f"idle with {n} streams: controller CPU {idle:.3f} s/s, RSS {proc_rss_mb(proc.pid):.0f} MB")
        for r in range(1, args.rounds + 1):
            version = 1 + r
            c0 = proc_cpu(proc.pid)
            t_write = time.monotonic()
            inv.write_text(inventory(n, moved=r % n, round_=r))
            wait(lambda: agents.count(version) == n or agents.errors, 300, f"version {version} at all agents")
            cpu = proc_cpu(proc.pid) - c0
            times = agents.times(version)
            first = min(times)
            spread = [t - first for t in times]
            total = [t - t_write for t in times]
            print(f"round {r}: update reached {len(times)}/{n} agents; fan-out from first receipt "
                  f"p50 {pct(spread, .5) * 1000:.0f} ms p99 {pct(spread, .99) * 1000:.0f} ms "
                  f"max {max(spread) * 1000:.0f} ms; from file write p50 {pct(total, .5) * 1000:.0f} ms "
                  f"p99 {pct(total, .99) * 1000:.0f} ms (includes the 1 s inventory poll); "
                  f"controller CPU {cpu:.2f} s; RSS {proc_rss_mb(proc.pid):.0f} MB")
            time.sleep(1.5)
        peak = next((ln.split(':')[1].strip() for ln in Path(f'/proc/{proc.pid}/status').read_text().splitlines()
                     if ln.startswith('VmHWM')), "?")
        print(f"controller total CPU {proc_cpu(proc.pid):.1f} s; peak RSS: {peak}")
        # every agent goes away at once (e.g. a network blip): what does ending n streams cost?
        c0, t0 = proc_cpu(proc.pid), time.monotonic()
        agents.close()
        agents = None
        settle(proc.pid)
        print(f"all {n} streams closed: controller CPU {proc_cpu(proc.pid) - c0:.2f} s until idle "
              f"({time.monotonic() - t0:.1f} s)")
        return 0
    finally:
        if agents is not None:
            try:
                agents.close()
            except Exception as e:  # report, keep cleaning up
                print(f"closing streams: {e}", file=sys.stderr)
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


if __name__ == "__main__":
    sys.exit(main())
