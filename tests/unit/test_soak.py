"""The soak's pure parts: durations, the workload it hands the guest, its verdict."""

from __future__ import annotations

import argparse
import random

import pytest

from viommu_backend.config import load_config
from viommu_backend.guest.boot import BootSummary
from viommu_backend.guest.qemu import Marker
from viommu_backend.soak import DEFAULT_CONFIG, Injector, SoakResult, parse_duration, soak_config


@pytest.mark.parametrize("text,seconds", [("90", 90), ("90s", 90), ("30m", 1800), ("1h", 3600)])
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "5x", "-3m", "m"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration(text)


def test_soak_config_sets_the_guest_duration_and_timeout() -> None:
    config = load_config(DEFAULT_CONFIG)
    c = soak_config(config, 1800)
    assert c.guest.workload.split(",")[-1] == "soak:1800"
    assert sum(w.startswith("soak") for w in c.guest.workload.split(",")) == 1
    assert c.guest.timeout == config.guest.timeout + 1800


def result(endpoints: dict, *, ok: bool = True, errors: int = 0) -> SoakResult:
    s = BootSummary(ok=ok, error=None if ok else "x")
    s.markers.append(Marker("soak", {"ms": 1000, "endpoints": endpoints}, 0.0))
    s.backend = {"errors": {"count": errors}}
    return SoakResult(s, Injector(random.Random(0), print), 1, 1.0)


GOOD = {"requests": 4, "bytes": 262144, "checks": 2, "mismatches": 0, "retries": 1, "errors": 0}


def test_a_clean_soak_passes() -> None:
    assert result({"vda": GOOD, "dma": GOOD}).problems() == []


@pytest.mark.parametrize("change,expect", [
    ({"mismatches": 1}, "vda: 1 data mismatches"),
    ({"errors": 2}, "vda: 2 requests failed even when retried"),
    ({"checks": 0}, "vda: no verified I/O"),
])
def test_what_fails_a_soak(change: dict, expect: str) -> None:
    assert expect in result({"vda": {**GOOD, **change}}).problems()


def test_backend_errors_and_a_failed_boot_fail_the_soak() -> None:
    assert "backend errors: 3" in result({"vda": GOOD}, errors=3).problems()
    assert any(p.startswith("boot failed") for p in result({"vda": GOOD}, ok=False).problems())
