"""Fixture: a factory of in-process controllers on 127.0.0.1."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.controller.ctl_helpers import ServerFactory


@pytest.fixture
def controller(tmp_path: Path):
    factory = ServerFactory(tmp_path)
    yield factory
    factory.stop_all()
