"""``matrix --kcidb FILE``: KCIDB checkouts / builds / tests from matrix results, validated
with kcidb-io (the KCIDB project's own schema package)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess

import pytest
from kcidb_io.schema import LATEST

from viommu_backend.kci.kcidb import kcidb_report
from viommu_backend.kci.outputs import KciOutputs
from viommu_backend.matrix import expand, loads_matrix, run_matrix

from tests.support.run_data import markers
from tests.support.run_data import FakeSummary, summary

STARTED = dt.datetime(2026, 12, 1, 10, 0, 0, tzinfo=dt.timezone.utc)


def git_tree(path):
    path.mkdir()
    (path / "Makefile").write_text("VERSION = 6\n")
    for args in (["init", "-q", "-b", "main"], ["add", "."],
                 ["-c", "user.email=t@e", "-c", "user.name=t", "commit", "-qm", "v6.99"], ["tag", "v6.99"]):
        subprocess.run(["git", "-C", str(path), *args], check=True)
    return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def matrix_text(tree) -> str:
    return f"""
[matrix]
name = "kci"

[[axis]]
name = "kernel"
values = [
  {{ name = "trixie" }},
  {{ name = "built-6.12", set = {{ "kernel.build" = "6.12", "guest.modules" = [] }} }},
  {{ name = "tree", set = {{ "kernel.source" = "{tree}", "guest.modules" = [] }} }},
]

[[axis]]
name = "dma"
values = [ {{ name = "strict" }}, {{ name = "lazy", set = {{ "guest.cmdline+" = "iommu.strict=0" }} }} ]
"""


def canned(ok_for):
    async def boot(config, *, progress, workdir):
        s = FakeSummary(ok=ok_for(config), error=None if ok_for(config) else "QEMU exited with 1: boom",
                        markers=markers(blk_match=ok_for(config)), backend=summary().backend, workdir=workdir)
        return s
    return boot


def manifests(cfg):
    if cfg.kernel.source is not None:
        return {}  # a tree that did not build: its build is FAIL
    if cfg.kernel.build:
        return {"kernel_version": "6.12.117", "kernel_build": {"compiler": "aarch64-linux-gnu-gcc 14.2.0",
                                                                "source_version": "6.12.117-1"},
                "directory": "/cache/images/abc"}
    return {"kernel_version": "6.12.107+deb13-cloud-arm64", "packages": {"linux-image-cloud-arm64": "6.12.107-1"},
            "directory": "/cache/images/def"}


@pytest.fixture
def report(tmp_path):
    head = git_tree(tmp_path / "linux")
    m = loads_matrix(matrix_text(tmp_path / "linux"))
    runs = expand(m)
    results = asyncio.run(run_matrix(m, runs, progress=lambda _l: None, output=tmp_path / "out", setup=False,
                                     boot=canned(lambda c: "strict=0" not in c.guest.cmdline)))
    return head, m, runs, results, kcidb_report(m, runs, results, started=STARTED, manifest_of=manifests)


def test_the_report_is_valid_kcidb(report):
    data = report[-1]
    LATEST.validate(data)  # raises on any schema violation
    assert LATEST.is_valid(data) and data["version"] == {"major": LATEST.major, "minor": LATEST.minor}


def test_checkouts_builds_and_tests_link_up(report):
    head, m, runs, results, data = report
    checkouts, builds, tests = data["checkouts"], data["builds"], data["tests"]
    assert len(checkouts) == 3 and len(builds) == 3  # one kernel source / build per kernel value
    assert {c["id"] for c in checkouts} == {b["checkout_id"] for b in builds}
    assert {t["build_id"] for t in tests} == {b["id"] for b in builds}
    ids = [o["id"] for o in checkouts + builds + tests]
    assert len(ids) == len(set(ids)) and all(i.startswith("viommu:") for i in ids)

    tree = next(c for c in checkouts if c.get("git_commit_hash"))
    assert tree["git_commit_hash"] == head and tree["git_commit_name"] == "v6.99"
    assert tree["git_repository_branch"] == "main" and "git_repository_url" not in tree  # no https remote
    deb = next(c for c in checkouts if c["tree_name"] == "debian-trixie")
    assert "6.12.107-1" in deb["comment"]

    built = next(b for b in builds if b["config_name"].startswith("tinyconfig"))
    assert built["config_name"] == "tinyconfig+viommu.config" and built["status"] == "PASS"
    assert built["input_files"][0]["name"] == "viommu.config" and built["input_files"][0]["url"].startswith("file:///")
    assert built["compiler"] == "aarch64-linux-gnu-gcc 14.2.0"
    assert next(b for b in builds if b["checkout_id"] == tree["id"])["status"] == "FAIL"


def test_each_check_is_a_test_under_its_workload(report):
    _, m, runs, results, data = report
    tests = data["tests"]
    per_run = len(results[0].checks) + 1
    assert len(tests) == per_run * len(runs)
    paths = {t["path"] for t in tests}
    assert {"viommu", "viommu.boot.verdict", "viommu.blk.bs-4096", "viommu.smmu.probe",
            "viommu.unplug.removed"} <= paths
    lazy_bs = [t for t in tests if t["path"] == "viommu.blk.bs-4096" and "dma=lazy" in t["comment"]]
    assert len(lazy_bs) == 3 and all(t["status"] == "FAIL" for t in lazy_bs)
    assert all(t["number"]["unit"] == "MB/s" and t["number"]["value"] > 0 for t in lazy_bs)
    whole = [t for t in tests if t["path"] == "viommu"]
    assert [t["status"] for t in whole] == ["PASS", "FAIL"] * 3
    assert whole[1]["log_excerpt"].startswith("QEMU exited with 1")
    assert whole[0]["log_url"].startswith("file:///") and whole[0]["log_url"].endswith("/boot.log")
    assert whole[0]["environment"]["misc"]["choice"] == {"kernel": "trixie", "dma": "strict"}
    assert {t["path"] for t in tests if ":01-trixie-strict" in t["id"]} == paths


def test_two_submissions_of_one_matrix_do_not_collide(report):
    _, m, runs, results, data = report
    later = kcidb_report(m, runs, results, started=STARTED + dt.timedelta(hours=1), manifest_of=manifests)
    assert not {t["id"] for t in data["tests"]} & {t["id"] for t in later["tests"]}
    assert [b["id"] for b in data["builds"]] == [b["id"] for b in later["builds"]]


def test_outputs_write_the_file(report, tmp_path):
    _, m, runs, results, _ = report
    lines: list[str] = []
    KciOutputs(kcidb=tmp_path / "k" / "kcidb.json", started=STARTED).after_runs(m, runs, results, lines.append)
    data = json.loads((tmp_path / "k" / "kcidb.json").read_text())
    LATEST.validate(data)
    assert lines[0].startswith(f"[matrix] KCIDB: {tmp_path / 'k' / 'kcidb.json'} (")
