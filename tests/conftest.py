"""Shared by all test kinds: the helpers in tests/unit (SMMU harness, virtio driver,
walker and endpoint environments) are importable from integration and e2e tests too, and
so are the fuzz targets (tests/fuzz, package ``fuzz``)."""

import sys
from pathlib import Path

_TESTS = Path(__file__).resolve().parent
for _helpers in (str(_TESTS / "unit"), str(_TESTS)):  # tests/fuzz is the package ``fuzz``
    if _helpers not in sys.path:
        sys.path.insert(0, _helpers)
