"""The controller's inventory loader (controller/inventory.py) on arbitrary text.

Input: the inventory file's bytes (as ``load_inventory`` reads them: UTF-8;
other bytes are that function's "cannot read" error). Allowed: InventoryError.
For an inventory that loads: every node's view (controller/policy.py), its
protobuf form as the Watch stream sends it (controller/fanout.py), and the
view_json round trip must work without any error.
"""
from __future__ import annotations

from controller.fanout import VersionIndex, view_update
from controller.inventory import InventoryError, parse_inventory
from controller.policy import Inventory, compute_view

from fuzz.harness import Finding, Target


def one_input(data: bytes) -> None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return
    inv = parse_inventory(text, "fuzz.yaml", controller_addresses=("198.51.100.250",))
    idx = VersionIndex(1, inv)
    for node in inv.nodes[:8]:
        view = compute_view(inv, node.name)
        view_update(view, 1, None).SerializeToString()
        idx.snapshot(node.name)
    again = Inventory.from_view_json(inv.view_json())
    if again.view_json() != inv.view_json():
        raise Finding("Inventory.from_view_json(view_json()) differs")


TARGET = Target("inventory", one_input, allowed=(InventoryError,), packages=("controller", "yaml"))
