import os
import shutil

import pytest


def pytest_collection_modifyitems(config, items):
    reason = None
    if os.geteuid() != 0:
        reason = "e2e tests need root (network namespaces)"
    elif not shutil.which("ip") or not os.path.exists("/dev/net/tun"):
        reason = "e2e tests need iproute2 and /dev/net/tun"
    if reason:
        for item in items:
            if "e2e" in item.keywords or str(item.fspath).find("/e2e/") >= 0:
                item.add_marker(pytest.mark.skip(reason=reason))
