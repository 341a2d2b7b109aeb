"""meshsec.units: the one set of duration and size rules the agent's YAML config and the
controller's inventory both use (tests/test_layering.py checks neither side writes its own)."""
from __future__ import annotations

import pytest

from meshsec.units import parse_duration, parse_size


@pytest.mark.parametrize("value,s", [("30s", 30), ("15m", 900), ("4h", 14400), ("1d", 86400), ("90", 90),
                                     ("1.5h", 5400), (45, 45), ("0", 0), (2.5, 2.5)])
def test_parse_duration(value, s):
    assert parse_duration(value) == s


@pytest.mark.parametrize("bad", ["", "1w", "-5", True, "4x", "-5m"])
def test_parse_duration_refuses(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize("text, value", [
    ("10G", 10_000_000_000), ("500M", 500_000_000), ("64k", 64_000), ("64K", 64_000),
    ("1Gi", 1 << 30), ("512KiB", 512 * 1024), ("1.5G", 1_500_000_000), ("2 TB", 2 * 10 ** 12),
    ("0", 0), (0, 0), (123456, 123456), ("123456", 123456),
])
def test_parse_size_units(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text, word", [
    ("-1", "not a count"), (-5, "negative"), ("1.5", "whole number"), (1.5, "not a count"),
    (True, "not a count"), ("ten", "not a count"), ("10X", "not a count"),
    ("100000000000T", r"2\^64 - 1"),
])
def test_parse_size_errors(text, word):
    with pytest.raises(ValueError, match=word):
        parse_size(text)
