"""Fail loudly: the backend keeps its own errors, and a run with any of them fails."""

from __future__ import annotations

import logging

import pytest

from viommu_backend.config import loads_config
from viommu_backend.app import Backend
from viommu_backend.guest.boot import BootSummary, backend_failure
from viommu_backend.guest.qemu import GuestError
from viommu_backend.smmuv3.cmdq import SINK_METHODS, NullCommandSink, check_sink
from viommu_backend.smmuv3.device import SMMUv3

SMMU = '[[function]]\nname = "viommu"\nkind = "smmuv3"\nslot = 1\n'


def test_backend_keeps_every_error_its_parts_log(tmp_path) -> None:
    b = Backend(loads_config(SMMU), tmp_path)
    logging.getLogger("viommu_backend.smmuv3.device").warning("not an error")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("viommu_backend.vfio_user.server").exception("handler failed")
    d = b.errors.describe()
    b.errors.detach(logging.getLogger("viommu_backend"))
    assert d["count"] == 1
    [e] = d["recent"]
    assert e["message"] == "handler failed" and "RuntimeError: boom" in e["traceback"]


def summary(errors: dict, sink_errors: int = 0) -> BootSummary:
    s = BootSummary()
    s.backend = {"errors": errors, "viommu": {"counters": {"sink_errors": sink_errors}}}
    return s


def test_a_run_fails_on_backend_errors_with_the_traceback() -> None:
    backend_failure(summary({"count": 0, "recent": []}))  # clean: no exception
    with pytest.raises(GuestError, match="1 error\\(s\\) logged") as e:
        backend_failure(summary({"count": 1, "recent": [
            {"logger": "viommu_backend.x", "message": "handler failed", "traceback": "Traceback: boom"}]}))
    assert "Traceback: boom" in str(e.value)
    with pytest.raises(GuestError, match="2 command sink error"):
        backend_failure(summary({"count": 0, "recent": []}, sink_errors=2))
    s = BootSummary()
    s.backend_error = "TimeoutError: "
    with pytest.raises(GuestError, match="no final state"):
        backend_failure(s)


def test_a_sink_missing_methods_is_refused_at_start_up() -> None:
    class Partial:
        def tlbi_nh_all(self, vmid: int) -> None: pass

    with pytest.raises(TypeError, match="missing stream_table_changed"):
        SMMUv3(sink=Partial())
    check_sink(NullCommandSink())
    assert {"resume", "stall_term", "cd_changed", "tlbi_nh_va"} <= set(SINK_METHODS)
