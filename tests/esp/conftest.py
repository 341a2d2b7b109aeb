"""Fixtures for the ESP core tests."""
from __future__ import annotations

import pytest

from tests.esp.esp_helpers import DetRng


@pytest.fixture
def rng() -> DetRng:
    return DetRng()
