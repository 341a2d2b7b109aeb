"""Shared per-version work behind the controller's ``Watch`` fan-out.

The straightforward path (:func:`controller.policy.compute_view` and
:func:`controller.policy.diff_views` in every stream) costs O(N) per stream
per version, O(N^2) per inventory change, and keeps one view per stream.
Here whatever the views of one version share is computed once:

- :class:`VersionIndex`: one inventory version. Per node its spec,
  effective subnets and a *policy signature* (its role and, for every rule,
  whether it is on either side of ``between``). :func:`~controller.policy.pair_policy`
  is a function of the two signatures alone, so pair policies are memoised
  per signature pair; serialized peer entries per (peer, policy, initiate);
  snapshot *rows* per (observer signature, observer has endpoints) as two
  concatenated blobs with offsets, so a node's snapshot is two slices.
- :class:`Transition`: between two versions, the nodes whose record changed
  and, if defaults, groups or rules changed, per observer signature class the
  peers whose pair policy changed. Computed once, shared by every stream.
- :class:`ViewCache`: the recent versions' indexes (older ones rebuilt from
  the store's history on demand), transitions memoised; streams keep only
  the version number they last sent.

Output is byte-identical to ``view_update(compute_view(..), version,
diff_views(..)).SerializeToString()``: the straightforward path stays the
reference (tests/controller/test_fanout.py compares both on random
inventories).
"""
from __future__ import annotations

import threading
from array import array
from collections import OrderedDict
from typing import Callable

from controller.policy import (
    Inventory,
    NodeSpec,
    PolicyView,
    View,
    ViewDiff,
    _member,
    effective_subnets,
    pair_policy,
)
from meshsec.v1 import controller_pb2 as pb

_MODE = {"tunnel": pb.MODE_TUNNEL, "transport": pb.MODE_TRANSPORT}
_PROTOCOL = {"esp": pb.PROTOCOL_ESP, "ah": pb.PROTOCOL_AH, "ah+esp": pb.PROTOCOL_AH_ESP}
_ACTION = {"protect": pb.ACTION_PROTECT, "bypass": pb.ACTION_BYPASS, "discard": pb.ACTION_DISCARD}
_ENCAP = {"udp": pb.ENCAPSULATION_UDP, "none": pb.ENCAPSULATION_NONE}

# ViewUpdate.upserted_peers is field 7, length-delimited (wire type 2).
_UPSERTED_TAG = bytes([(7 << 3) | 2])

# Snapshot rows kept per version (each ~2 x N x 200 bytes).
ROWS_KEEP = 32


def policy_to_proto(pol: PolicyView) -> pb.PeerPolicy:
    return pb.PeerPolicy(
        mode=_MODE[pol.mode], protocol=_PROTOCOL[pol.protocol], encapsulation=_ENCAP[pol.encapsulation],
        ike_proposals=list(pol.ike_proposals), esp_proposals=list(pol.esp_proposals),
        ike_lifetime_s=pol.ike_lifetime_s, child_lifetime_s=pol.child_lifetime_s,
        dpd_interval_s=pol.dpd_interval_s, replay_window=pol.replay_window,
        action=_ACTION[pol.action], rule=pol.rule,
        child_lifetime_bytes=pol.child_lifetime_bytes, child_lifetime_packets=pol.child_lifetime_packets,
        # the inventory accepts a 0 window only with allow_no_replay: true
        allow_no_replay=pol.replay_window == 0,
    )


def peer_to_proto(p) -> pb.Peer:
    """A :class:`~controller.policy.PeerView` as ``meshsec.v1.Peer``."""
    return pb.Peer(name=p.name, identity=p.identity, endpoints=list(p.endpoints), subnets=list(p.subnets),
                   initiate=p.initiate, policy=policy_to_proto(p.policy))


def serial_bytes(serial: int) -> bytes:
    """A certificate serial number as unsigned big-endian bytes (ViewUpdate.revoked_serials)."""
    return serial.to_bytes(max(1, (serial.bit_length() + 7) // 8), "big")


def view_update(view: View, version: int, diff: ViewDiff | None) -> pb.ViewUpdate:
    """A full snapshot (``diff is None``) or an incremental update (the
    straightforward path; :class:`ViewCache` produces the same bytes)."""
    peers = view.peers if diff is None else diff.upserted
    return pb.ViewUpdate(
        version=version, full=diff is None, node_name=view.name, identity=view.identity,
        subnets=list(view.subnets), endpoints=list(view.endpoints),
        upserted_peers=[peer_to_proto(p) for p in peers],
        removed_peers=[] if diff is None else list(diff.removed),
        revoked_serials=[serial_bytes(s) for s in (view.revoked if diff is None else diff.revoked_added)],
        unrevoked_serials=[] if diff is None else [serial_bytes(s) for s in diff.revoked_removed],
    )


def _revoked_tail(added: list[int], removed: list[int]) -> bytes:
    """Serialized ViewUpdate fields 9 and 10 (they follow every other field)."""
    if not added and not removed:
        return b""
    return pb.ViewUpdate(revoked_serials=[serial_bytes(s) for s in added],
                         unrevoked_serials=[serial_bytes(s) for s in removed]).SerializeToString()


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _signatures(inventory: Inventory) -> tuple[dict[str, int], list[NodeSpec]]:
    """Node name -> signature id, and one representative node per id. Two
    nodes with the same signature match the same rule sides and have the
    same role, so every pair policy treats them alike."""
    groups = dict(inventory.groups)
    sides = [rule.between for rule in inventory.rules]
    ids: dict[tuple, int] = {}
    reps: list[NodeSpec] = []
    out: dict[str, int] = {}
    for node in inventory.nodes:
        bits = tuple((any(_member(r, node, groups) for r in left), any(_member(r, node, groups) for r in right))
                     for left, right in sides)
        sig = (node.role, bits)
        sid = ids.get(sig)
        if sid is None:
            sid = ids[sig] = len(reps)
            reps.append(node)
        out[node.name] = sid
    return out, reps


class VersionIndex:
    """What the views of one inventory version share. Thread-safe; the
    memoised parts are filled on demand."""

    def __init__(self, version: int, inventory: Inventory) -> None:
        self.version = version
        self.inventory = inventory
        self.config = (inventory.defaults, inventory.groups, inventory.rules)
        self.spec: dict[str, NodeSpec] = {n.name: n for n in inventory.nodes}
        self.names: list[str] = sorted(self.spec)
        self.pos: dict[str, int] = {n: i for i, n in enumerate(self.names)}
        self.subnets: dict[str, tuple[str, ...]] = {n.name: effective_subnets(n) for n in inventory.nodes}
        self.sid, self._reps = _signatures(inventory)
        self.revoked: frozenset[int] = inventory.revoked_serials
        self._revoked_tail: bytes | None = None
        self._pid: dict[tuple[int, int], int] = {}      # (signature, signature) -> policy id
        self._policies: list[PolicyView] = []
        self._pid_of: dict[PolicyView, int] = {}
        self._policy_bytes: list[bytes] = []            # policy id -> serialized PeerPolicy
        self._entries: dict[tuple[str, int, bool], bytes] = {}
        self._rows: OrderedDict[tuple[int, bool], tuple[bytes, array, bytes, array]] = OrderedDict()
        self._lock = threading.RLock()

    def __contains__(self, name: str) -> bool:
        return name in self.spec

    def __len__(self) -> int:
        return len(self.names)

    # -- pair policies ------------------------------------------------------------
    def _policy_id(self, sa: int, sb: int) -> int:
        pid = self._pid.get((sa, sb))
        if pid is None:
            with self._lock:
                pid = self._pid.get((sa, sb))
                if pid is None:
                    pol = pair_policy(self.inventory, self._reps[sa], self._reps[sb])
                    pid = self._pid_of.get(pol)
                    if pid is None:
                        pid = self._pid_of[pol] = len(self._policies)
                        self._policies.append(pol)
                        self._policy_bytes.append(policy_to_proto(pol).SerializeToString())
                    self._pid[(sa, sb)] = pid
        return pid

    def policy(self, me: str, peer: str) -> PolicyView:
        """The pair policy of two nodes of this version (KeyError if absent)."""
        return self._policies[self._policy_id(self.sid[me], self.sid[peer])]

    def _initiate(self, me: NodeSpec, peer: NodeSpec, pid: int) -> bool:
        # policy.should_initiate, for PROTECT pairs only
        if self._policies[pid].action != "protect" or not peer.endpoints:
            return False
        return not me.endpoints or me.name < peer.name

    def peer_key(self, me: str, peer: str) -> tuple:
        """Everything that shapes ``peer``'s entry in ``me``'s view: equal
        keys (also across versions) mean equal ``PeerView``."""
        pid = self._policy_id(self.sid[me], self.sid[peer])
        p = self.spec[peer]
        return (p.endpoints, self.subnets[peer], self._policies[pid], self._initiate(self.spec[me], p, pid))

    # -- serialized pieces ------------------------------------------------------
    def _entry(self, peer: str, pid: int, initiate: bool) -> bytes:
        """``upserted_peers`` tag + length + serialized Peer."""
        key = (peer, pid, initiate)
        e = self._entries.get(key)
        if e is None:
            p = self.spec[peer]
            # fields in number order, as SerializeToString writes them: 1-4, policy (5), initiate (6)
            pol = self._policy_bytes[pid]
            body = (pb.Peer(name=peer, identity=peer, endpoints=list(p.endpoints),
                            subnets=list(self.subnets[peer])).SerializeToString()
                    + bytes([(5 << 3) | 2]) + _varint(len(pol)) + pol + (b"\x30\x01" if initiate else b""))
            e = self._entries[key] = _UPSERTED_TAG + _varint(len(body)) + body
        return e

    def entry(self, me: str, peer: str) -> bytes:
        pid = self._policy_id(self.sid[me], self.sid[peer])
        return self._entry(peer, pid, self._initiate(self.spec[me], self.spec[peer], pid))

    def _row(self, me: str) -> tuple[bytes, array, bytes, array]:
        """Every node's entry as seen by observers like ``me``: ``lo`` for
        peers sorting before the observer, ``hi`` after (``initiate``
        depends on the order), with cumulative offsets."""
        m = self.spec[me]
        key = (self.sid[me], bool(m.endpoints))
        with self._lock:
            row = self._rows.get(key)
            if row is not None:
                self._rows.move_to_end(key)
                return row
            sm, has_ep = key
            lo, hi = [], []
            lo_off, hi_off = array("Q", [0]), array("Q", [0])
            n_lo = n_hi = 0
            for name in self.names:
                p = self.spec[name]
                pid = self._policy_id(sm, self.sid[name])
                protect = self._policies[pid].action == "protect" and bool(p.endpoints)
                a = self._entry(name, pid, protect and not has_ep)
                b = self._entry(name, pid, protect)
                lo.append(a)
                hi.append(b)
                n_lo += len(a)
                n_hi += len(b)
                lo_off.append(n_lo)
                hi_off.append(n_hi)
            row = (b"".join(lo), lo_off, b"".join(hi), hi_off)
            self._rows[key] = row
            while len(self._rows) > ROWS_KEEP:
                self._rows.popitem(last=False)
            return row

    def _header(self, me: str, full: bool) -> bytes:
        m = self.spec[me]
        return pb.ViewUpdate(version=self.version, full=full, node_name=me, identity=me,
                             subnets=list(self.subnets[me]), endpoints=list(m.endpoints)).SerializeToString()

    def snapshot(self, me: str) -> bytes:
        """Serialized full ``ViewUpdate`` for ``me`` (KeyError if absent)."""
        lo, lo_off, hi, hi_off = self._row(me)
        i = self.pos[me]
        if self._revoked_tail is None:
            self._revoked_tail = _revoked_tail(sorted(self.revoked), [])
        return self._header(me, True) + lo[:lo_off[i]] + hi[hi_off[i + 1]:] + self._revoked_tail

    def incremental(self, me: str, upserted: list[str], removed: list[str],
                    revoked_added: list[int] = (), revoked_removed: list[int] = ()) -> bytes:
        """Serialized incremental ``ViewUpdate``: ``upserted`` peers (in
        order, present in this version), ``removed`` peer names, revoked
        serials added / dropped."""
        tail = pb.ViewUpdate(removed_peers=removed).SerializeToString() if removed else b""
        tail += _revoked_tail(list(revoked_added), list(revoked_removed))
        return self._header(me, False) + b"".join(self.entry(me, n) for n in upserted) + tail

    def drop_rows(self) -> None:
        """Forget snapshot rows and entries (a newer version took over)."""
        with self._lock:
            self._rows.clear()
            self._entries = {}


class Transition:
    """What changed from version ``a`` to ``b``, shared by every stream."""

    def __init__(self, a: VersionIndex, b: VersionIndex) -> None:
        self.a, self.b = a, b
        names = a.spec.keys() | b.spec.keys()
        # NodeSpec equality ignores the join token: token rotation changes no view
        self.changed: frozenset[str] = frozenset(n for n in names if a.spec.get(n) != b.spec.get(n))
        self.config_changed = a.config != b.config
        self._classes: dict[tuple[int, int], set[str]] = {}
        if self.config_changed:
            for n in a.spec.keys() & b.spec.keys():
                self._classes.setdefault((a.sid[n], b.sid[n]), set()).add(n)
        self._by_class: dict[tuple[int, int], frozenset[str]] = {}
        self._lock = threading.Lock()
        # the same for every node: revocations are mesh-wide
        self.revoked_added = sorted(b.revoked - a.revoked)
        self.revoked_removed = sorted(a.revoked - b.revoked)

    def policy_changed(self, me: str) -> frozenset[str]:
        """Peers (in both versions) whose pair policy with ``me`` differs."""
        if not self.config_changed:
            return frozenset()
        cm = (self.a.sid[me], self.b.sid[me])
        got = self._by_class.get(cm)
        if got is None:
            a, b = self.a, self.b
            out: set[str] = set()
            for (sa, sb), members in self._classes.items():
                if a._policies[a._policy_id(cm[0], sa)] != b._policies[b._policy_id(cm[1], sb)]:
                    out |= members
            got = frozenset(out)
            with self._lock:
                self._by_class[cm] = got
        return got

    def diff(self, me: str) -> tuple[list[str], list[str], bool]:
        """(upserted peer names sorted, removed peer names sorted, whether
        ``me``'s own subnets/endpoints changed) for ``me``, present in both
        versions; same result as ``diff_views`` of the two views."""
        a, b = self.a, self.b
        if me in self.changed:  # own role/endpoints shape every pair: compare all
            candidates = (a.spec.keys() | b.spec.keys()) - {me}
        else:
            candidates = (self.changed | self.policy_changed(me)) - {me}
        upserted, removed = [], []
        for n in sorted(candidates):
            if n not in b.spec:
                if n in a.spec:
                    removed.append(n)
                continue
            if n not in a.spec or a.peer_key(me, n) != b.peer_key(me, n):
                upserted.append(n)
        self_changed = (a.subnets[me], a.spec[me].endpoints) != (b.subnets[me], b.spec[me].endpoints)
        return upserted, removed, self_changed


class ViewCache:
    """Version indexes and transitions for a controller's streams.

    ``history``: version -> ``Inventory.view_json()`` or None (the store's
    ``inventory_at``), used for versions no longer in memory. ``keep``:
    recent versions held in memory; ``loaded_keep``: older versions rebuilt
    from history and held (reconnect storms resume from the same few)."""

    def __init__(self, history: Callable[[int], str | None], *, keep: int = 16, loaded_keep: int = 4,
                 transitions_keep: int = 32) -> None:
        self._history = history
        self._keep, self._loaded_keep, self._transitions_keep = keep, loaded_keep, transitions_keep
        self._recent: OrderedDict[int, VersionIndex] = OrderedDict()
        self._loaded: OrderedDict[int, VersionIndex] = OrderedDict()
        self._transitions: OrderedDict[tuple[int, int], Transition] = OrderedDict()
        self._lock = threading.Lock()
        self.built = 0  # indexes built (tests and metrics)

    def current(self, version: int, inventory: Inventory) -> VersionIndex:
        """The index of the version the controller serves now (built once)."""
        with self._lock:
            idx = self._recent.get(version)
            if idx is not None:
                return idx
            idx = VersionIndex(version, inventory)
            self.built += 1
            newest = max(self._recent, default=0)
            self._recent[version] = idx
            if version > newest and newest:
                self._recent[newest].drop_rows()  # snapshots now come from the new version
            while len(self._recent) > self._keep:
                self._recent.pop(min(self._recent))
            return idx

    def at(self, version: int) -> VersionIndex | None:
        """The index of an earlier version: in memory, or rebuilt from the
        store's history; None if the history no longer has it."""
        with self._lock:
            idx = self._recent.get(version) or self._loaded.get(version)
            if idx is not None:
                return idx
        text = self._history(version)  # store I/O outside the lock
        if text is None:
            return None
        idx = VersionIndex(version, Inventory.from_view_json(text))
        with self._lock:
            self.built += 1
            have = self._recent.get(version) or self._loaded.get(version)
            if have is not None:
                return have
            self._loaded[version] = idx
            while len(self._loaded) > self._loaded_keep:
                self._loaded.popitem(last=False)
            return idx

    def transition(self, a: VersionIndex, b: VersionIndex) -> Transition:
        key = (a.version, b.version)
        with self._lock:
            t = self._transitions.get(key)
            if t is not None and t.a is a and t.b is b:
                return t
            t = self._transitions[key] = Transition(a, b)
            while len(self._transitions) > self._transitions_keep:
                self._transitions.popitem(last=False)
            return t

    def update(self, a: VersionIndex, b: VersionIndex, me: str) -> bytes | None:
        """Serialized incremental ``ViewUpdate`` taking ``me`` from version
        ``a`` to ``b`` (both must contain ``me``), or None if nothing in
        ``me``'s view changed."""
        t = self.transition(a, b)
        upserted, removed, self_changed = t.diff(me)
        if not (upserted or removed or self_changed or t.revoked_added or t.revoked_removed):
            return None
        return b.incremental(me, upserted, removed, t.revoked_added, t.revoked_removed)
