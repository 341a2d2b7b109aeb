"""Offloads on the real devices.

UDP: GSO/GRO on loopback sockets (127.0.0.1 only), and the per-datagram fallback when the
kernel refuses (EIO/EINVAL/EMSGSIZE on sendmsg, or UDP_GRO refused).

TUN (root, network namespaces this test creates; deleted at the end):

    netns fpo-a-<pid>                                   netns fpo-b-<pid>
    fpoa<pid> 10.77.0.1/32 (TUN, offloads on)           fpob<pid> 10.77.0.2/32 (TUN, offloads on)
                     \\___ this test process reads one TUN and writes the other ___/

Real kernel TCP on both ends: the sender's TSO super-packets are split by read_batch,
written with write_batch to the other TUN (coalesced), and the bytes arrive intact.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import selectors
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from agent.datapath import tun as tunmod
from agent.datapath import udp as udpmod
from agent.datapath.tun import TunDevice
from agent.datapath.udp import UdpSocket

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _drain(sock: UdpSocket, want: int, timeout: float = 5.0) -> list:
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        got += sock.recv_batch(64)
        if len(got) < want:
            time.sleep(0.005)
    return got


@pytest.fixture
def pair():
    a, b = UdpSocket("127.0.0.1", 0), UdpSocket("127.0.0.1", 0)
    a.local = ("127.0.0.1", a._sock.getsockname()[1])
    b.local = ("127.0.0.1", b._sock.getsockname()[1])
    yield a, b
    a.close()
    b.close()


def test_udp_gso_and_gro_deliver_every_datagram_in_order(pair):
    a, b = pair
    dst = b.local
    batch = [(bytes([i]) * 1200, dst) for i in range(70)]          # more than 64: two groups
    batch += [(b"s" * 300, dst), (b"t" * 1200, dst), (b"u" * 1200, dst)]  # a short one ends a group
    assert a.send_batch(batch) == len(batch)
    assert a.counters["gso_sends"] >= 2 and a.counters["send_errors"] == 0
    got = _drain(b, len(batch))
    assert [d for d, _ in got] == [d for d, _ in batch]
    assert all(addr == a.local for _, addr in got)
    assert b.gro and b.counters["gro_datagrams"] >= 2


class _Refusing:
    """A socket whose sendmsg fails the way a kernel without UDP GSO does."""

    def __init__(self, sock, err):
        self._s, self.err, self.sendmsg_calls = sock, err, 0

    def sendmsg(self, *a, **k):
        self.sendmsg_calls += 1
        raise OSError(self.err, os.strerror(self.err))

    def __getattr__(self, name):
        return getattr(self._s, name)


@pytest.mark.parametrize("err", [errno.EIO, errno.EINVAL, errno.EMSGSIZE])
def test_udp_gso_refused_falls_back_once_logged_and_counted(pair, err, caplog):
    a, b = pair
    a._sock = _Refusing(a._sock, err)
    batch = [(bytes([i]) * 500, b.local) for i in range(10)]
    with caplog.at_level(logging.WARNING, logger="meshsec.udp"):
        assert a.send_batch(batch) == 10
        assert a.send_batch(batch) == 10
    assert a._sock.sendmsg_calls == 1 and not a.gso
    assert a.counters["gso_fallback"] == 1 and a.counters["send_errors"] == 0
    assert len([r for r in caplog.records if "refused UDP GSO" in r.message]) == 1
    assert [d for d, _ in _drain(b, 20)] == [d for d, _ in batch] * 2


def test_udp_gro_refused_reads_one_datagram_per_call(monkeypatch, caplog):
    real = socket.socket.setsockopt

    def refuse(self, level, opt, *v):
        if (level, opt) == (udpmod.SOL_UDP, udpmod.UDP_GRO):
            raise OSError(errno.ENOPROTOOPT, "Protocol not available")
        return real(self, level, opt, *v)

    monkeypatch.setattr(socket.socket, "setsockopt", refuse)
    with caplog.at_level(logging.WARNING, logger="meshsec.udp"):
        s = UdpSocket("127.0.0.1", 0)
    try:
        assert not s.gro and s.counters["gro_off"] == 1
        assert any("refused UDP_GRO" in r.message for r in caplog.records)
        port = s._sock.getsockname()[1]
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for i in range(5):
            tx.sendto(bytes([i]) * 100, ("127.0.0.1", port))
        tx.close()
        assert [d for d, _ in _drain(s, 5)] == [bytes([i]) * 100 for i in range(5)]
    finally:
        s.close()


def test_udp_offload_off_is_the_plain_path(pair):
    s = UdpSocket("127.0.0.1", 0, offload=False)
    try:
        assert not s.gso and not s.gro
        assert s.send_batch([(b"x" * 10, pair[1].local)] * 3) == 3
        assert len(_drain(pair[1], 3)) == 3
    finally:
        s.close()


# ---- TUN ---------------------------------------------------------------------------------

def _sh(*args, check=True):
    return subprocess.run(list(args), check=check, capture_output=True, text=True, timeout=30)


@pytest.fixture
def tun_pair():
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or not shutil.which("ip"):
        pytest.skip("needs root, iproute2 and /dev/net/tun")
    tag = os.getpid() % 100000
    nsa, nsb = f"fpo-a-{tag}", f"fpo-b-{tag}"
    devs = []
    try:
        for ns in (nsa, nsb):
            _sh("ip", "netns", "add", ns)
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        for ns, name, me, peer in ((nsa, f"fpoa{tag}", "10.77.0.1", "10.77.0.2"),
                                   (nsb, f"fpob{tag}", "10.77.0.2", "10.77.0.1")):
            d = TunDevice(name, 1400)
            devs.append(d)
            # a TUN device moves between namespaces with its file descriptor still open
            _sh("ip", "link", "set", name, "netns", ns)
            _sh("ip", "-n", ns, "addr", "add", f"{me}/32", "dev", name)
            _sh("ip", "-n", ns, "link", "set", name, "mtu", "1400", "up")
            _sh("ip", "-n", ns, "route", "add", f"{peer}/32", "dev", name)
        yield nsa, nsb, devs[0], devs[1]
    finally:
        for d in devs:
            d.close()
        for ns in (nsa, nsb):
            _sh("ip", "netns", "del", ns, check=False)


def _relay(a: TunDevice, b: TunDevice, stop: threading.Event, moved: list) -> None:
    sel = selectors.DefaultSelector()
    sel.register(a.fileno(), selectors.EVENT_READ, (a, b))
    sel.register(b.fileno(), selectors.EVENT_READ, (b, a))
    while not stop.is_set():
        for key, _ in sel.select(0.1):
            src, dst = key.data
            pkts = src.read_batch(64)
            if pkts:
                assert all(len(p) <= 1400 for p in pkts), [len(p) for p in pkts if len(p) > 1400]
                moved.append(len(pkts))
                dst.write_batch(pkts)
    sel.close()


def test_tcp_through_two_offloaded_tuns_arrives_intact(tun_pair, tmp_path):
    nsa, nsb, ta, tb = tun_pair
    assert "tso" in ta.offloads and "coalesce" in tb.offloads
    stop, moved = threading.Event(), []
    th = threading.Thread(target=_relay, args=(ta, tb, stop, moved), daemon=True)
    th.start()
    data = os.urandom(8 * 1024 * 1024)
    blob = tmp_path / "blob"
    blob.write_bytes(data)
    server = subprocess.Popen(["ip", "netns", "exec", nsb, sys.executable, "-m", "e2e.transfer", "serve", "5001"],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert server.stdout.readline().strip() == "listening"
        _sh("ip", "netns", "exec", nsa, sys.executable, "-c",
            f"import sys; sys.path.insert(0, {ROOT!r}); from e2e.transfer import send; "
            f"send('10.77.0.2', 5001, {str(blob)!r})")
        out, _ = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
        stop.set()
        th.join(5)
    n, digest = out.split()
    assert int(n) == len(data) and digest == hashlib.sha256(data).hexdigest()
    # the kernel handed over super-packets and took coalesced ones back
    assert ta.counters["gso_super_in"] > 0 and ta.counters["gso_segments_out"] > ta.counters["gso_super_in"]
    assert tb.counters["coalesced_super"] > 0
    for d in (ta, tb):
        assert d.counters["write_errors"] == 0 and d.counters["vnet_malformed"] == 0
        assert d.counters["gso_bad_length"] == 0 and d.counters["coalesce_fallback"] == 0


def test_tun_offload_refused_falls_back_to_plain_reads(monkeypatch, caplog):
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs root and /dev/net/tun")
    real = tunmod.fcntl.ioctl

    def refuse(fd, req, *a):
        if req == tunmod.TUNSETOFFLOAD:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, req, *a)

    monkeypatch.setattr(tunmod.fcntl, "ioctl", refuse)
    with caplog.at_level(logging.WARNING, logger="meshsec.tun"):
        d = TunDevice(f"fpor{os.getpid() % 100000}", 1400)
    try:
        assert d.vnet and d.offloads == ()
        assert any("refused TUNSETOFFLOAD" in r.message for r in caplog.records)
        assert all(p[0] >> 4 in (4, 6) for p in d.read_batch(8))  # e.g. an IPv6 router solicitation
        p = bytes.fromhex("450000210000400040110000") + bytes([10, 77, 0, 1, 10, 77, 0, 2]) + b"\x00" * 13
        # a write goes out with an all-zero header (no coalescing): accepted or counted, never raised
        n = d.write_batch([p, p])
        assert n + d.counters["write_errors"] == 2 and d.counters["coalesced_super"] == 0
    finally:
        d.close()


def test_malformed_reads_are_counted_and_the_read_loop_ends():
    """A device that only yields garbage reads: read_batch returns after at most ``max`` reads,
    every one counted, never spinning (a socketpair keeps the read boundaries)."""
    from agent.datapath import offload as off

    r, w = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        d = object.__new__(TunDevice)
        d.name, d.vnet, d._fd = "fake-vnet", True, r.fileno()
        d.counters = {"write_errors": 0, "coalesce_fallback": 0, **off.new_counters()}
        d._buffers()
        r.setblocking(False)
        for _ in range(100):
            w.send(b"\x01" * 9)  # shorter than a virtio-net header
        assert d.read_batch(64) == []
        assert d.counters["vnet_malformed"] == 64
        assert d.read_batch(64) == [] and d.counters["vnet_malformed"] == 100
        w.send(off.ZERO_HDR + b"\x45" + bytes(19))
        assert d.read_batch(64) == [b"\x45" + bytes(19)]
    finally:
        r.close()
        w.close()
