"""Shared by all test kinds: the helpers in tests/unit (SMMU harness, virtio driver,
walker and endpoint environments) are importable from integration and e2e tests too."""

import sys
from pathlib import Path

_UNIT = str(Path(__file__).resolve().parent / "unit")
if _UNIT not in sys.path:
    sys.path.insert(0, _UNIT)
