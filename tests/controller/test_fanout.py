"""controller.fanout: the shared per-version Watch fan-out produces exactly
what the straightforward path (policy.compute_view + diff_views +
service.view_update, one view per stream) produces, byte for byte, and
shares its work across streams."""
from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller import store as store_mod
from controller.fanout import ViewCache, VersionIndex
from controller.inventory import parse_inventory
from controller.policy import Defaults, Inventory, NodeSpec, Rule, compute_view, diff_views
from controller.service import view_update
from meshsec.v1 import controller_pb2 as pb
from meshsec.v1 import controller_pb2_grpc as pb_grpc
from tests.controller.ctl_helpers import ServerFactory, inventory_text, wait_for, write_inventory
from tests.controller.test_grpc import OPTS, client


def oracle_snapshot(inv: Inventory, version: int, me: str) -> bytes:
    return view_update(compute_view(inv, me), version, None).SerializeToString()


def oracle_update(old: Inventory, new: Inventory, version: int, me: str) -> bytes | None:
    d = diff_views(compute_view(old, me), compute_view(new, me))
    return None if d.empty else view_update(compute_view(new, me), version, d).SerializeToString()


def history_of(*invs: Inventory) -> dict[int, str]:
    return {v: inv.view_json() for v, inv in enumerate(invs, start=1)}


# -- random inventories ---------------------------------------------------------
NAMES = ["a", "b", "c", "d", "e", "f"]
IPS = ["198.51.100.1", "198.51.100.2", "203.0.113.7", "2001:db8::1"]
SUBNETS = ["10.1.0.0/16", "10.2.0.0/24", "fd00::/64"]
GROUPS = ["g1", "g2"]


def node_st(name: str):
    return st.builds(NodeSpec, name=st.just(name), role=st.sampled_from(["host", "gateway"]),
                     endpoints=st.lists(st.sampled_from(IPS), max_size=2, unique=True).map(tuple),
                     subnets=st.lists(st.sampled_from(SUBNETS), max_size=1).map(tuple))


REFS = st.sampled_from(NAMES + [f"group:{g}" for g in GROUPS] + ["role:host", "role:gateway", "any"])
SETTINGS = st.lists(st.sampled_from([("mode", "auto"), ("mode", "transport"), ("protocol", "ah+esp"),
                                     ("dpd_interval_s", 5.0), ("esp_proposals", ("aes256gcm16",))]),
                    max_size=2, unique_by=lambda kv: kv[0]).map(lambda kvs: tuple(sorted(kvs)))


@st.composite
def rule_st(draw, i: int):
    action = draw(st.sampled_from(["protect", "protect", "bypass", "discard"]))
    side = st.lists(REFS, min_size=1, max_size=2).map(tuple)
    return Rule(name=f"r{i}", between=(draw(side), draw(side)), action=action,
                settings=draw(SETTINGS) if action == "protect" else ())


@st.composite
def config_st(draw, names: list[str]):
    groups = tuple((g, tuple(draw(st.lists(st.sampled_from(names), max_size=3, unique=True))))
                   for g in GROUPS if draw(st.booleans()))
    rules = tuple(draw(rule_st(i)) for i in range(draw(st.integers(0, 3))))
    defaults = Defaults(mode=draw(st.sampled_from(["tunnel", "auto"])),
                        dpd_interval_s=draw(st.sampled_from([30.0, 10.0])))
    return defaults, groups, rules


@st.composite
def inventory_st(draw):
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=6, unique=True))
    nodes = tuple(draw(node_st(n)) for n in names)
    defaults, groups, rules = draw(config_st(names))
    return Inventory(nodes=nodes, defaults=defaults, groups=groups, rules=rules, revoked=draw(REVOKED))


# revoked serials: small, and as large as x509.random_serial_number() makes them (159 bits)
SERIALS = [1, 0xFF, 0x100, (1 << 158) + 12345, (1 << 159) - 1]
REVOKED = st.lists(st.sampled_from(SERIALS), max_size=3, unique=True).map(
    lambda ss: tuple(sorted((s, 2_000_000_000) for s in ss)))


@st.composite
def inventory_pair_st(draw):
    """(old, new): new changes some nodes only, the policy config only, or everything."""
    old = draw(inventory_st())
    how = draw(st.sampled_from(["nodes", "config", "both", "revoked"]))
    if how == "both":
        return old, draw(inventory_st())
    if how == "revoked":
        return old, Inventory(nodes=old.nodes, defaults=old.defaults, groups=old.groups, rules=old.rules,
                              revoked=draw(REVOKED))
    if how == "config":
        defaults, groups, rules = draw(config_st([n.name for n in old.nodes]))
        return old, Inventory(nodes=old.nodes, defaults=defaults, groups=groups, rules=rules, revoked=old.revoked)
    nodes = {n.name: n for n in old.nodes}
    for name in draw(st.lists(st.sampled_from(NAMES), max_size=3, unique=True)):
        if name in nodes and draw(st.booleans()) and len(nodes) > 1:
            del nodes[name]  # removal
        else:
            nodes[name] = draw(node_st(name))  # change or addition
    groups = tuple((g, tuple(m for m in members if m in nodes)) for g, members in old.groups)
    return old, Inventory(nodes=tuple(nodes.values()), defaults=old.defaults, groups=groups, rules=old.rules,
                          revoked=old.revoked)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inventory_st())
def test_snapshots_match_compute_view(inv: Inventory) -> None:
    idx = VersionIndex(7, inv)
    for node in inv.nodes:
        assert idx.snapshot(node.name) == oracle_snapshot(inv, 7, node.name)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inventory_pair_st())
def test_incremental_updates_match_diff_views(pair: tuple[Inventory, Inventory]) -> None:
    old, new = pair
    # the old version comes back from history JSON, as after a restart
    cache = ViewCache(history_of(old, new).get)
    a = cache.at(1)
    b = cache.current(2, new)
    for node in old.nodes:
        if node.name in b:
            assert cache.update(a, b, node.name) == oracle_update(old, new, 2, node.name), node.name
    for node in new.nodes:  # and the new version's snapshots
        assert b.snapshot(node.name) == oracle_snapshot(new, 2, node.name)


# -- hand-written cases -----------------------------------------------------------
BASE = """\
nodes:
  - {name: gw-a, role: gateway, endpoints: [198.51.100.1], subnets: [10.1.0.0/16], join_token: t}
  - {name: gw-b, role: gateway, endpoints: [198.51.100.2], subnets: [10.2.0.0/16], join_token: t}
  - {name: host-a, role: host, endpoints: [198.51.100.11], join_token: t}
  - {name: host-b, role: host, endpoints: [198.51.100.12], join_token: t}
  - {name: roamer, role: host, join_token: t}
groups:
  hosts: [host-a, host-b]
policies:
  - name: hosts-end-to-end
    between: [group:hosts, group:hosts]
    mode: transport
"""


def updates(old_text: str, new_text: str) -> dict[str, pb.ViewUpdate | None]:
    old, new = parse_inventory(old_text), parse_inventory(new_text)
    cache = ViewCache(history_of(old, new).get)
    a, b = cache.at(1), cache.current(2, new)
    out = {}
    for n in old.nodes:
        if n.name in b:
            got = cache.update(a, b, n.name)
            assert got == oracle_update(old, new, 2, n.name)
            out[n.name] = None if got is None else pb.ViewUpdate.FromString(got)
    return out


def test_rule_change_updates_exactly_the_pairs_it_covers() -> None:
    got = updates(BASE, BASE.replace("mode: transport", "protocol: ah+esp"))
    assert [p.name for p in got["host-a"].upserted_peers] == ["host-b"]
    assert [p.name for p in got["host-b"].upserted_peers] == ["host-a"]
    assert got["host-a"].upserted_peers[0].policy.protocol == pb.PROTOCOL_AH_ESP
    assert not got["host-a"].full and got["host-a"].version == 2
    assert got["gw-a"] is None and got["gw-b"] is None and got["roamer"] is None


def test_group_membership_change_moves_only_the_affected_pairs() -> None:
    got = updates(BASE, BASE.replace("hosts: [host-a, host-b]", "hosts: [host-a, host-b, gw-a]"))
    assert sorted(p.name for p in got["gw-a"].upserted_peers) == ["host-a", "host-b"]
    assert [p.name for p in got["host-a"].upserted_peers] == ["gw-a"]
    assert got["gw-b"] is None and got["roamer"] is None


def test_removal_and_addition() -> None:
    new = BASE.replace("  - {name: gw-b, role: gateway, endpoints: [198.51.100.2], subnets: [10.2.0.0/16], "
                       "join_token: t}\n", "  - {name: gw-c, role: gateway, endpoints: [198.51.100.3], join_token: t}\n")
    got = updates(BASE, new)
    for name in ("gw-a", "host-a", "host-b", "roamer"):
        assert list(got[name].removed_peers) == ["gw-b"], name
        assert [p.name for p in got[name].upserted_peers] == ["gw-c"], name


def test_own_endpoints_gone_flips_initiate_to_every_peer() -> None:
    # without endpoints a node is unreachable: it initiates to every reachable peer (policy.should_initiate)
    got = updates(BASE, BASE.replace("{name: host-b, role: host, endpoints: [198.51.100.12]",
                                     "{name: host-b, role: host, endpoints: []"))
    me = got["host-b"]
    assert not me.endpoints and not me.subnets
    assert {p.name: p.initiate for p in me.upserted_peers} == {"gw-a": True, "gw-b": True, "host-a": True}
    # the others stop initiating to host-b, and its subnets (its endpoints as /32s) are gone
    assert [(p.name, p.initiate) for p in got["gw-a"].upserted_peers] == [("host-b", False)]
    assert [(p.name, list(p.subnets)) for p in got["roamer"].upserted_peers] == [("host-b", [])]
    assert not got["roamer"].upserted_peers[0].initiate  # neither side reachable: nobody initiates


def test_only_own_record_changed_sends_an_update_without_peers() -> None:
    got = updates(BASE, BASE.replace("subnets: [10.1.0.0/16]", "subnets: [10.1.0.0/16, 10.9.0.0/16]"))
    assert list(got["gw-a"].subnets) == ["10.1.0.0/16", "10.9.0.0/16"] and not got["gw-a"].upserted_peers
    assert [p.name for p in got["gw-b"].upserted_peers] == ["gw-a"]


def test_work_is_shared_across_streams() -> None:
    inv = parse_inventory("nodes:\n" + "".join(
        f"  - {{name: n{i:03d}, role: gateway, endpoints: [198.51.100.{i + 1}], join_token: t}}\n"
        for i in range(60)))
    moved = parse_inventory("nodes:\n" + "".join(
        f"  - {{name: n{i:03d}, role: gateway, endpoints: [198.51.100.{i + 1 if i != 5 else 200}], "
        f"join_token: t}}\n" for i in range(60)))
    cache = ViewCache(lambda v: None)
    a = cache.current(1, inv)
    assert cache.current(1, inv) is a
    snaps = [a.snapshot(n) for n in a.names]
    assert len(a._rows) == 1  # one row serves every observer of this (uniform) inventory
    assert snaps[0] == oracle_snapshot(inv, 1, "n000") and snaps[-1] == oracle_snapshot(inv, 1, "n059")
    b = cache.current(2, moved)
    assert cache.built == 2 and not a._rows  # the superseded version's rows are dropped
    t = cache.transition(a, b)
    assert t.changed == {"n005"} and not t.config_changed and cache.transition(a, b) is t
    ups = [cache.update(a, b, n) for n in a.names]
    assert all(u == oracle_update(inv, moved, 2, n) for u, n in zip(ups, a.names))
    # the entry for the moved peer is built once per initiate variant, not per stream
    assert sum(1 for k in b._entries if k[0] == "n005") == 2


def test_version_unknown_to_history_is_none() -> None:
    inv = parse_inventory(BASE)
    cache = ViewCache(history_of(inv).get, keep=2)
    for v in (3, 4, 5):
        cache.current(v, inv)
    assert cache.at(5) is not None and cache.at(1) is not None  # memory, history
    assert cache.at(3) is None  # evicted from memory and not in history: the caller sends a snapshot


# -- through gRPC -------------------------------------------------------------------
def _mtls(server, creds) -> grpc.ChannelCredentials:
    chain = x509.load_der_x509_certificate(creds.certificate_chain[0]).public_bytes(serialization.Encoding.PEM)
    return grpc.ssl_channel_credentials(server.ca_path.read_bytes(), creds.private_key_pem, chain)


def _first(stub, since: int) -> pb.ViewUpdate:
    call = stub.Watch(pb.WatchRequest(node_name="alpha", since_version=since), timeout=10)
    try:
        return next(iter(call))
    finally:
        call.cancel()


def test_far_behind_resume_gets_a_snapshot(controller: ServerFactory, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "HISTORY_KEEP", 2)
    server = controller.start()
    creds = client(controller, server, "alpha", "alpha-token", tmp_path).enroll()
    v1 = server.state.snapshot()[1]
    for i, ip in enumerate(("127.0.0.31", "127.0.0.32", "127.0.0.33"), start=1):
        write_inventory(controller.inventory, inventory_text().replace("127.0.0.3", ip))
        wait_for(lambda: server.state.snapshot()[1] == v1 + i, what=f"version {v1 + i}")
    with grpc.secure_channel(f"127.0.0.1:{server.watch_port}", _mtls(server, creds), options=OPTS) as ch:
        stub = pb_grpc.ControllerStub(ch)
        # v1 is pruned from the history (and the stream was never at it): full snapshot
        old = _first(stub, v1)
        assert old.full and old.version == v1 + 3 and [p.name for p in old.upserted_peers] == ["bravo", "charlie"]
        # v1+2 is still known: only charlie
        recent = _first(stub, v1 + 2)
        assert not recent.full and [p.name for p in recent.upserted_peers] == ["charlie"]
        assert recent.upserted_peers[0].endpoints == ["127.0.0.33"]
        # a version from the future (state reset): snapshot
        assert _first(stub, v1 + 100).full


def test_live_streams_get_the_same_bytes_as_compute_view(controller: ServerFactory, tmp_path: Path) -> None:
    server = controller.start()
    creds = client(controller, server, "alpha", "alpha-token", tmp_path).enroll()
    with grpc.secure_channel(f"127.0.0.1:{server.watch_port}", _mtls(server, creds), options=OPTS) as ch:
        call = pb_grpc.ControllerStub(ch).Watch(pb.WatchRequest(node_name="alpha"), timeout=20)
        it = iter(call)
        inv1, v1 = server.state.snapshot()
        first = next(it)
        assert first.SerializeToString() == oracle_snapshot(inv1, v1, "alpha")
        text = inventory_text().replace("role: host", "role: gateway") + (
            "groups:\n  g: [alpha, charlie]\npolicies:\n  - {name: g-clear, between: [group:g, group:g], "
            "action: bypass}\n")
        write_inventory(controller.inventory, text)
        second = next(it)
        inv2, v2 = server.state.snapshot()
        call.cancel()
    assert v2 == v1 + 1
    assert second.SerializeToString() == oracle_update(inv1, inv2, v2, "alpha")
    assert [(p.name, p.policy.action, p.initiate) for p in second.upserted_peers] == [
        ("charlie", pb.ACTION_BYPASS, False)]


def test_stream_wakeups_are_per_stream(tmp_path: Path) -> None:
    from controller.service import ControllerState
    from controller.store import Store

    store = Store(tmp_path / "state")
    try:
        state = ControllerState(store, parse_inventory(BASE))
        _, v = state.snapshot()
        one, two = state.watcher(), state.watcher()
        one.set()  # what one stream's end does (gRPC callback): the other stays asleep
        assert not two.is_set()
        assert state.wait_newer(v, timeout=0, wakeup=one)[1] == v and not one.is_set()
        state.update(parse_inventory(BASE.replace("198.51.100.1]", "198.51.100.9]")))
        assert one.is_set() and two.is_set()  # a new version wakes every stream
        inv, v2 = state.wait_newer(v, timeout=0, wakeup=two)
        assert v2 == v + 1 and inv.node("gw-a").endpoints == ("198.51.100.9",)
        state.unwatch(one)
        one.clear()
        state.wake()  # shutdown wakes the registered ones
        assert two.is_set() and not one.is_set()
    finally:
        store.close()
