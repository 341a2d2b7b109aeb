"""Issue 13: a value in an inventory error is echoed at most ~40 characters long. A 4,000-digit
integer (or a 4 KB string) was echoed in full: a 4 KB line in ``--check`` output and the reload log."""
from __future__ import annotations

import pytest

from controller.inventory import InventoryError, parse_inventory
from tests.controller.ctl_helpers import inventory_text

BIG = "9" * 4000


@pytest.mark.parametrize("field", ["ike_lifetime", "child_lifetime", "replay_window", "mode", "protocol",
                                   "child_lifetime_bytes", "x" * 600])
def test_defaults_value_is_clipped(field: str) -> None:
    text = inventory_text().replace("defaults:\n", f"defaults:\n  {field}: {BIG}\n")
    with pytest.raises(InventoryError) as e:
        parse_inventory(text)
    message = str(e.value)
    assert len(message) < 400, message[:200]
    assert "..." in message


def test_message_without_the_value_is_unchanged() -> None:
    text = inventory_text().replace("defaults:\n", f"defaults:\n  allow_no_replay: {BIG}\n")
    with pytest.raises(InventoryError, match=r"^inventory.yaml:2: defaults.allow_no_replay: expected true or false$"):
        parse_inventory(text)


@pytest.mark.parametrize("where", ["name: alpha", "role: gateway", "endpoints: [127.0.0.1]",
                                   "subnets: [10.1.0.0/16]"])
def test_node_value_is_clipped(where: str) -> None:
    key, _, value = where.partition(": ")
    value = f"[{BIG}]" if value.startswith("[") else BIG
    text = inventory_text().replace(where, f"{key}: {value}", 1)
    with pytest.raises(InventoryError) as e:
        parse_inventory(text)
    assert len(str(e.value)) < 400, str(e.value)[:200]
    assert str(e.value).startswith("inventory.yaml:")
