"""In-memory fakes for datapath tests: a fake clock and two toy IKE sides that
satisfy ``agent.datapath.ike_core.IkeCore`` (what the runtime uses of
IkeManager), so the runtime's loop is tested independently of agent.ike. ESP is
the real agent.esp.EspSa; the TUN and UDP stand-ins are in tests/datapath/fake_devices.py.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from agent.iana import EncrId
from agent.ike.events import ChildSaDeleted, ChildSaEstablished, IkeSaDeleted, IkeSaEstablished
from agent.model import EspKeys


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


@dataclass(frozen=True)
class Datagram:
    data: bytes
    local: tuple
    remote: tuple


class FakeIke:
    """Toy key agreement with the IkeManager interface (keys travel in clear: tests only).

    INIT {from, spi, k_ir, k_ri} -> RESP {from, spi}; both sides then emit
    IkeSaEstablished + ChildSaEstablished. Unanswered INITs are retransmitted
    by ``handle_timer`` every ``rto`` seconds. Garbage counts as "malformed".
    """

    MAGIC = b"FAKEIKE1"

    def __init__(self, view, credentials, rng, *, local_address: str, rto: float = 1.0) -> None:
        self.view = view
        self.rng = rng
        self.local = (local_address, 500)
        self.rto = rto
        self._out: list[Datagram] = []
        self._events: list = []
        self.pending: dict[str, tuple[float, bytes, dict]] = {}
        self.established: dict[str, dict] = {}
        self.counters = {"malformed": 0}
        self.policy_errors: dict[str, str] = {}
        self.last_errors: dict[str, dict] = {}
        self.wall_offset = 0.0
        self.initiate_calls: list[str] = []
        self.views: list = [view]

    def update_view(self, view, now):
        self.view = view
        self.views.append(view)
        names = {p.name for p in view.peers}
        for name in list(self.established):
            if name not in names:
                self._drop(name, "peer removed")

    def update_credentials(self, credentials, now):
        pass

    # requests this toy does not support: answered "not done", as IkeManager does for an unknown SA
    def create_child(self, peer_name, now, local_ts=None, remote_ts=None):
        return False

    def rekey_child(self, inbound_spi, now):
        return False

    def delete_child(self, inbound_spi, now, reason="deleted locally"):
        return False

    def rekey_ike(self, peer_name, now):
        return False

    def follow_peer(self, inbound_spi, remote, now):
        return False

    def hint_unknown_spi(self, remote_addr, now, spi=b""):
        return "ignored"

    def _remote(self, peer):
        return (peer.endpoints[0], peer.ike_port)

    def initiate(self, peer_name, now):
        self.initiate_calls.append(peer_name)
        if peer_name in self.pending or peer_name in self.established:
            return
        peer = self.view.peer(peer_name)
        if peer is None:
            return
        st = {"spi": int.from_bytes(self.rng(4), "big") | 1, "k_ir": self.rng(20).hex(), "k_ri": self.rng(20).hex()}
        msg = self.MAGIC + json.dumps({"t": "INIT", "from": self.view.name, **st}).encode()
        self.pending[peer_name] = (now + self.rto, msg, st)
        self._out.append(Datagram(msg, self.local, self._remote(peer)))

    def receive_datagram(self, data, local, remote, now):
        try:
            if not data.startswith(self.MAGIC):
                raise ValueError
            m = json.loads(data[len(self.MAGIC):])
            peer = self.view.peer(m["from"])
            if peer is None:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            self.counters["malformed"] += 1
            return
        if m["t"] == "INIT":
            my_spi = int.from_bytes(self.rng(4), "big") | 1
            resp = self.MAGIC + json.dumps({"t": "RESP", "from": self.view.name, "spi": my_spi}).encode()
            self._out.append(Datagram(resp, local, remote))
            self._establish(peer, my_spi, bytes.fromhex(m["k_ir"]), m["spi"], bytes.fromhex(m["k_ri"]), remote, now, False)
        elif m["t"] == "RESP":
            p = self.pending.pop(peer.name, None)
            if p is None:
                return
            st = p[2]
            self._establish(peer, st["spi"], bytes.fromhex(st["k_ri"]), m["spi"], bytes.fromhex(st["k_ir"]), remote, now, True)
        elif m["t"] == "DEL":
            self._drop(peer.name, "deleted by peer")

    def _establish(self, peer, in_spi, in_key, out_spi, out_key, remote, now, initiator):
        gcm = EncrId.ENCR_AES_GCM_16
        ike_i, ike_r = (in_spi, out_spi) if initiator else (out_spi, in_spi)
        self.established[peer.name] = {"in": in_spi, "out": out_spi, "ike": (ike_i, ike_r), "remote": remote}
        self._events.append(IkeSaEstablished(peer.name, ike_i, ike_r, initiator, self.local, remote, "fake"))
        self._events.append(ChildSaEstablished(
            peer=peer.name, ike_spi_i=ike_i, ike_spi_r=ike_r,
            inbound=EspKeys(in_spi, gcm, in_key), outbound=EspKeys(out_spi, gcm, out_key),
            local_ts=self.view.subnets, remote_ts=peer.subnets, mode="tunnel", udp_encap=True,
            local=(self.local[0], 4500), remote=(remote[0], 4500), algorithms="AES_GCM_16_128"))

    def _drop(self, name, reason):
        st = self.established.pop(name)
        self._events.append(ChildSaDeleted(name, st["in"], st["out"], reason))
        self._events.append(IkeSaDeleted(name, *st["ike"], reason))

    def handle_timer(self, now):
        for name, (deadline, msg, st) in list(self.pending.items()):
            if deadline <= now:
                self.pending[name] = (now + self.rto, msg, st)
                self._out.append(Datagram(msg, self.local, self._remote(self.view.peer(name))))

    def get_timer(self):
        return min((d for d, _, _ in self.pending.values()), default=None)

    def datagrams_to_send(self):
        out, self._out = self._out, []
        return out

    def next_event(self):
        return self._events.pop(0) if self._events else None

    def join(self, now, names=None):
        return []  # FakeIke initiates only where the view says so

    def note_inbound(self, peers_or_spis, now):
        self.inbound_noted = getattr(self, "inbound_noted", 0) + 1

    def delete_all(self, now):
        for name in list(self.established):
            msg = self.MAGIC + json.dumps({"t": "DEL", "from": self.view.name}).encode()
            self._out.append(Datagram(msg, self.local, self.established[name]["remote"]))
            self._drop(name, "shutdown")

    def status(self):
        return [{"peer": n, "spi_i": f"{s['ike'][0]:016x}", "spi_r": f"{s['ike'][1]:016x}", "state": "ESTABLISHED",
                 "algorithms": "fake"} for n, s in self.established.items()]


class ScriptedIke:
    """IkeCore stand-in that only emits the events a test queues (``events``) and records
    ``initiate`` calls; every request is answered "not done"."""

    def __init__(self):
        self.events, self.counters, self.initiated = [], {}, []
        self.policy_errors: dict[str, str] = {}
        self.last_errors: dict[str, dict] = {}
        self.wall_offset = 0.0

    def update_view(self, view, now): pass
    def update_credentials(self, credentials, now): pass
    def initiate(self, peer_name, now): self.initiated.append(peer_name)
    def receive_datagram(self, data, local, remote, now): self.counters["ike_in"] = self.counters.get("ike_in", 0) + 1
    def handle_timer(self, now): pass
    def get_timer(self): return None
    def datagrams_to_send(self): return []
    def next_event(self): return self.events.pop(0) if self.events else None
    def create_child(self, peer_name, now, local_ts=None, remote_ts=None): return False
    def rekey_child(self, inbound_spi, now): return False
    def delete_child(self, inbound_spi, now, reason="deleted locally"): return False
    def rekey_ike(self, peer_name, now): return False
    def hint_unknown_spi(self, remote_addr, now, spi=b""): return "ignored"
    def follow_peer(self, inbound_spi, remote, now): return False
    def delete_all(self, now): pass
    def join(self, now, names=None): return []
    def note_inbound(self, peers_or_spis, now): pass
    def status(self): return []
