"""The installed meshsec version, for ``--version`` on every CLI and the ``*_build_info`` metrics."""
from __future__ import annotations

import platform


def version() -> str:
    """The distribution's version (pyproject.toml), or "unknown" when run from a tree that was
    never installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _v
    try:
        return _v("meshsec")
    except PackageNotFoundError:
        return "unknown"


def build_info() -> dict[str, str]:
    """Labels of the ``meshsec_{agent,controller}_build_info`` gauge (value 1)."""
    return {"version": version(), "python": platform.python_version()}


def version_line(prog: str) -> str:
    """``prog VERSION (Python X.Y.Z)``, what ``--version`` prints."""
    info = build_info()
    return f"{prog} {info['version']} (Python {info['python']})"
