"""agent.view_proto.view_from_proto: proto ViewUpdate -> agent.model.NodeView."""
from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from agent.control import ControlError, ControllerClient, default_watch_address
from agent.model import PeerPolicy
from agent.view_proto import view_from_proto
from meshsec.v1 import controller_pb2 as pb


def peer(name: str, endpoint: str = "198.51.100.2", **kw) -> pb.Peer:
    return pb.Peer(name=name, identity=name, endpoints=[endpoint], subnets=["10.2.0.0/16"], initiate=True,
                   policy=pb.PeerPolicy(mode=pb.MODE_TRANSPORT, protocol=pb.PROTOCOL_ESP,
                                        encapsulation=pb.ENCAPSULATION_UDP, esp_proposals=["aes256gcm16"],
                                        ike_lifetime_s=100, child_lifetime_s=50, dpd_interval_s=5,
                                        replay_window=64), **kw)


def full(*peers: pb.Peer, version: int = 3) -> pb.ViewUpdate:
    return pb.ViewUpdate(version=version, full=True, node_name="a", identity="a", subnets=["10.1.0.0/16"],
                         endpoints=["198.51.100.1"], upserted_peers=list(peers))


def test_full_snapshot() -> None:
    v = view_from_proto(full(peer("c"), peer("b")))
    assert (v.name, v.identity, v.version, v.local_address) == ("a", "a", 3, "198.51.100.1")
    assert v.subnets == (ipaddress.ip_network("10.1.0.0/16"),)
    assert [p.name for p in v.peers] == ["b", "c"]
    p = v.peer("b")
    assert p.ike_port == 500 and p.initiate and p.subnets == (ipaddress.ip_network("10.2.0.0/16"),)
    assert p.policy == PeerPolicy(mode="transport", esp_proposals=("aes256gcm16",), ike_lifetime_s=100,
                                  child_lifetime_s=50, dpd_interval_s=5, replay_window=64)


def test_incremental_applies_upserts_and_removals() -> None:
    v = view_from_proto(full(peer("b"), peer("c")))
    inc = pb.ViewUpdate(version=4, node_name="a", identity="a", subnets=["10.1.0.0/16"],
                        upserted_peers=[peer("c", "198.51.100.3"), peer("d")], removed_peers=["b"])
    v2 = view_from_proto(inc, v)
    assert [p.name for p in v2.peers] == ["c", "d"] and v2.peer("c").endpoints == ("198.51.100.3",)
    assert v2.version == 4 and v2.local_address is None


def test_unset_enums_take_model_defaults() -> None:
    v = view_from_proto(full(pb.Peer(name="b", endpoints=["198.51.100.2"])))
    assert v.peer("b").policy.mode == "tunnel" and v.peer("b").identity == "b"
    assert v.peer("b").policy.ike_proposals == PeerPolicy().ike_proposals


def test_malformed_updates_raise_value_error() -> None:
    with pytest.raises(ValueError, match="without a previous view"):
        view_from_proto(pb.ViewUpdate(version=1, node_name="a"))
    with pytest.raises(ValueError):
        view_from_proto(full(pb.Peer(name="b", subnets=["10.0.0.0/33"])))
    with pytest.raises(ValueError, match="unknown mode 9"):
        view_from_proto(full(pb.Peer(name="b", policy=pb.PeerPolicy(mode=9))))
    with pytest.raises(ValueError, match="without node_name"):
        view_from_proto(pb.ViewUpdate(full=True))
    with pytest.raises(ValueError, match="applied to"):
        view_from_proto(pb.ViewUpdate(version=2, node_name="z"), view_from_proto(full()))


def test_default_watch_address() -> None:
    assert default_watch_address("10.0.0.1:7443") == "10.0.0.1:7444"
    assert default_watch_address("[::1]:7443") == "[::1]:7444"
    with pytest.raises(ValueError):
        default_watch_address("ctl")


def test_corrupt_key_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "node.key").write_text("garbage")
    import datetime as dt

    from controller.ca import CertificateAuthority
    ca_pem = CertificateAuthority.create(dt.datetime.now(dt.timezone.utc)).certificate_pem
    c = ControllerClient("127.0.0.1:1", "a", "t", tmp_path, ca_pem)
    with pytest.raises(ControlError, match="not a readable PEM private key"):
        c.enroll()


def test_replay_window_zero_or_unset_means_the_default_not_off() -> None:
    """A 0 window (what an unset proto field reads as) is the default 1024; anti-replay is off only
    with the explicit allow_no_replay the controller sets for the inventory's opt-in."""
    from agent.view_proto import no_replay_peers
    from agent.ike.policy_check import policy_problem
    unset = pb.Peer(name="u", identity="u", endpoints=["198.51.100.3"], subnets=["10.3.0.0/16"])
    zero = pb.Peer(name="z", identity="z", endpoints=["198.51.100.4"], subnets=["10.4.0.0/16"],
                   policy=pb.PeerPolicy(replay_window=0))
    off = pb.Peer(name="o", identity="o", endpoints=["198.51.100.5"], subnets=["10.5.0.0/16"],
                  policy=pb.PeerPolicy(replay_window=0, allow_no_replay=True))
    v = view_from_proto(full(unset, zero, off))
    pol = {p.name: p.policy for p in v.peers}
    assert (pol["u"].replay_window, pol["u"].allow_no_replay) == (1024, False)
    assert (pol["z"].replay_window, pol["z"].allow_no_replay) == (1024, False)
    assert (pol["o"].replay_window, pol["o"].allow_no_replay) == (0, True)
    assert no_replay_peers(v) == ["o"]
    assert policy_problem(v.peer("o")) is None and policy_problem(v.peer("z")) is None
    # allow_no_replay with a real window changes nothing
    w = view_from_proto(full(pb.Peer(name="w", identity="w", endpoints=["198.51.100.6"], subnets=["10.6.0.0/16"],
                                     policy=pb.PeerPolicy(replay_window=64, allow_no_replay=True))))
    assert (w.peers[0].policy.replay_window, w.peers[0].policy.allow_no_replay) == (64, False)


def test_controller_sends_allow_no_replay_only_for_a_zero_window() -> None:
    from controller.fanout import policy_to_proto
    from controller.policy import Defaults, pair_policy
    from dataclasses import replace as dc_replace
    pol = pair_policy(Defaults(), *_two_nodes())
    assert not policy_to_proto(pol).allow_no_replay and policy_to_proto(pol).replay_window == 1024
    off = dc_replace(pol, replay_window=0)
    assert policy_to_proto(off).allow_no_replay and policy_to_proto(off).replay_window == 0


def _two_nodes():
    from controller.policy import NodeSpec
    return (NodeSpec("a", "gateway", ("198.51.100.1",), ("10.1.0.0/16",)),
            NodeSpec("b", "gateway", ("198.51.100.2",), ("10.2.0.0/16",)))


def test_the_opt_out_is_logged_once_per_peer(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import datetime as dt
    import logging
    from controller.ca import CertificateAuthority
    ca = CertificateAuthority.create(dt.datetime.now(dt.timezone.utc)).certificate_pem
    c = ControllerClient("127.0.0.1:1", "a", "t", tmp_path, ca)
    off = pb.Peer(name="o", identity="o", endpoints=["198.51.100.5"], subnets=["10.5.0.0/16"],
                  policy=pb.PeerPolicy(replay_window=0, allow_no_replay=True))
    with caplog.at_level(logging.WARNING):
        for version in (1, 2):
            c._log_no_replay(view_from_proto(full(off, peer("b"), version=version)))
    msgs = [r.getMessage() for r in caplog.records if "anti-replay is OFF" in r.getMessage()]
    assert msgs == ["anti-replay is OFF for peer o: the controller's inventory sets replay_window 0 with "
                    "allow_no_replay (RFC 4303 §3.4.3)"]
