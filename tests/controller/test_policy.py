"""Pure policy: inventory -> per-node views, initiate rule, diffs."""
from __future__ import annotations

import pytest

from controller.inventory import parse_inventory
from controller.policy import Inventory, UnknownNode, compute_view, diff_views

INV = """\
defaults:
  mode: auto
nodes:
  - {name: gw-b, role: gateway, endpoints: [198.51.100.2], subnets: [10.2.0.0/16], join_token: t}
  - {name: gw-a, role: gateway, endpoints: [198.51.100.1], subnets: [10.1.0.0/16], join_token: t}
  - {name: host-a, role: host, endpoints: [10.1.0.5], join_token: t}
  - {name: host-b, role: host, endpoints: [10.2.0.5], join_token: t}
  - {name: roamer, role: host, endpoints: [], join_token: t}
"""


@pytest.fixture
def inv() -> Inventory:
    return parse_inventory(INV)


def test_full_mesh_sorted_and_excludes_self(inv: Inventory) -> None:
    v = compute_view(inv, "gw-a")
    assert [p.name for p in v.peers] == ["gw-b", "host-a", "host-b", "roamer"]
    assert v.subnets == ("10.1.0.0/16",) and v.endpoints == ("198.51.100.1",)
    assert all(p.identity == p.name for p in v.peers)


def test_lower_name_initiates_symmetrically(inv: Inventory) -> None:
    a, b = compute_view(inv, "gw-a"), compute_view(inv, "gw-b")
    assert a.peer("gw-b").initiate is True
    assert b.peer("gw-a").initiate is False


def test_node_without_endpoints_initiates_and_is_never_initiated_to(inv: Inventory) -> None:
    assert compute_view(inv, "roamer").peer("gw-a").initiate is True
    assert compute_view(inv, "gw-a").peer("roamer").initiate is False


def test_host_without_subnets_protects_its_endpoints(inv: Inventory) -> None:
    assert compute_view(inv, "gw-a").peer("host-a").subnets == ("10.1.0.5/32",)


def test_auto_mode(inv: Inventory) -> None:
    assert compute_view(inv, "host-a").peer("host-b").policy.mode == "transport"
    assert compute_view(inv, "host-a").peer("gw-a").policy.mode == "tunnel"


def test_default_policy_values() -> None:
    inv = parse_inventory(INV.replace("  mode: auto\n", "  replay_window: 64\n"))
    pol = compute_view(inv, "gw-a").peer("gw-b").policy
    assert (pol.mode, pol.protocol, pol.encapsulation, pol.replay_window) == ("tunnel", "esp", "udp", 64)
    # hybrid post-quantum first, classical fallback after it (RFC 9370)
    assert pol.ike_proposals[0] == "aes256gcm16-prfsha384-x25519-ke1_mlkem768"
    assert "aes128gcm16-prfsha256-x25519" in pol.ike_proposals[1:]


def test_unknown_node(inv: Inventory) -> None:
    with pytest.raises(UnknownNode, match="'nobody' is not in the inventory"):
        compute_view(inv, "nobody")


def test_json_roundtrip_drops_tokens_keeps_views(inv: Inventory) -> None:
    back = Inventory.from_view_json(inv.view_json())
    assert all(n.join_token_sha256 == b"" for n in back.nodes)
    for n in inv.nodes:
        assert compute_view(back, n.name) == compute_view(inv, n.name)
    assert back.view_json() == inv.view_json()


def test_diff(inv: Inventory) -> None:
    new = parse_inventory(INV.replace("198.51.100.2", "198.51.100.22")
                          .replace("  - {name: host-b, role: host, endpoints: [10.2.0.5], join_token: t}\n", ""))
    d = diff_views(compute_view(inv, "gw-a"), compute_view(new, "gw-a"))
    assert [p.name for p in d.upserted] == ["gw-b"] and d.upserted[0].endpoints == ("198.51.100.22",)
    assert d.removed == ("host-b",) and not d.self_changed
    d2 = diff_views(compute_view(inv, "gw-b"), compute_view(new, "gw-b"))
    assert d2.self_changed and not d2.upserted
    assert diff_views(compute_view(inv, "host-a"), compute_view(inv, "host-a")).empty
