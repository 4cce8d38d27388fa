"""``matrix --lava DIR``: one LAVA job per run, every one valid for lava-common's own schema
(Debian's lava-common, in the tool root), carrying the run's config unchanged; and the
in-job step that turns checks into LAVA test cases."""

from __future__ import annotations

import re
import subprocess
import tomllib

import pytest
import yaml

from viommu_backend.kci.checks import checks_from_markers
from viommu_backend.kci.lava import job_definition, lava_emitter, report_checks, validate_jobs, write_jobs
from viommu_backend.kci.outputs import KciOutputs
from viommu_backend.matrix import expand, load_matrix, loads_matrix

from tests.support.run_data import markers
from tests.support import REPO



def toolroot_or_skip():
    from viommu_backend.guest.toolroot import ToolRoot

    root = ToolRoot()
    if not root.bootstrapped:
        if __import__("os").environ.get("CI") == "true":
            pytest.fail("no tool root under CI (scripts/setup makes it)")
        pytest.skip("no tool root (scripts/setup makes it)")
    return root


def built_matrix(tmp_path):
    (tmp_path / "extra.config").write_text("CONFIG_DEBUG_FS=y\n")
    return loads_matrix(f"""
[matrix]
name = "kernels"
[[axis]]
name = "kernel"
values = [
  {{ name = "trixie" }},
  {{ name = "built", set = {{ "kernel.build" = "6.12", "kernel.fragments" = ["{tmp_path / 'extra.config'}"], "guest.modules" = [] }} }},
]
""")


def test_every_generated_job_is_valid_for_lava_common(tmp_path):
    root = toolroot_or_skip()
    smoke = load_matrix(REPO / "qemu_configs" / "matrix-smoke.toml")
    paths = write_jobs(smoke, expand(smoke), tmp_path / "smoke", repo="https://example.org/viommu-backend.git",
                       commit="0" * 40)
    kernels = built_matrix(tmp_path)
    paths += write_jobs(kernels, expand(kernels), tmp_path / "kernels")
    assert len(paths) == 8
    assert validate_jobs(paths, root=root) == {}

    # the validator does reject a broken job (a test definition name LAVA does not allow)
    broken = tmp_path / "broken" / "job.yaml"
    broken.parent.mkdir()
    broken.write_text(paths[0].read_text().replace("name: viommu-smoke-01-s1_s2-strict", "name: 'viommu smoke/01'"))
    assert list(validate_jobs([broken], root=root)) == [broken.resolve()]


def test_a_job_installs_this_project_and_boots_the_runs_config(tmp_path):
    m = built_matrix(tmp_path)
    run = expand(m)[1]
    job = job_definition(m, run, repo="https://example.org/v.git", commit="abc123")
    assert job["device_type"] == "docker"
    assert [next(iter(a)) for a in job["actions"]] == ["deploy", "boot", "test"]
    assert job["actions"][0]["deploy"]["image"] == "debian:bookworm"
    steps = job["actions"][2]["test"]["definitions"][0]["repository"]["run"]["steps"]
    text = "\n".join(steps)
    assert "git clone -q https://example.org/v.git /opt/viommu-backend" in text and "checkout -q abc123" in text
    cfg = re.search(r"<<'VIOMMU_CONFIG'\n(.*)\nVIOMMU_CONFIG", text, re.S).group(1)
    assert tomllib.loads(cfg) == tomllib.loads(run.config.text)
    assert tomllib.loads(cfg)["kernel"]["build"] == "6.12"
    assert "scripts/setup --config /tmp/viommu-run.toml" in text
    assert steps[-1].endswith("-m viommu_backend.kci.lava run --config /tmp/viommu-run.toml")
    # a kernel build gets the time it needs
    assert job["timeouts"]["action"]["minutes"] > job_definition(m, expand(m)[0], repo="r", commit="c")[
        "timeouts"]["action"]["minutes"]
    assert job["metadata"]["viommu.axis.kernel"] == "built"


def test_the_heredoc_survives_the_shell(tmp_path):
    """The config step, run by a shell as LAVA runs it, writes the run's config verbatim."""
    m = built_matrix(tmp_path)
    run = expand(m)[0]
    job = job_definition(m, run, repo="r", commit="c")
    step = next(s for s in job["actions"][2]["test"]["definitions"][0]["repository"]["run"]["steps"]
                if "VIOMMU_CONFIG" in s)
    out = tmp_path / "written.toml"
    subprocess.run(["bash", "-ec", step.replace("/tmp/viommu-run.toml", str(out))], check=True)
    assert out.read_text().rstrip() == run.config.text.rstrip()


def test_default_source_is_this_checkout_and_list_writes_jobs(tmp_path):
    m = load_matrix(REPO / "qemu_configs" / "matrix-smoke.toml")
    lines: list[str] = []
    KciOutputs(lava=tmp_path / "jobs").before_runs(m, expand(m), lines.append)
    assert lines == [f"[matrix] LAVA job definitions: 6 in {tmp_path / 'jobs'}"]
    job = yaml.safe_load((tmp_path / "jobs" / "01-s1_s2-strict.yaml").read_text())
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert job["metadata"]["viommu.commit"] == head


def test_checks_become_test_sets_and_cases():
    checks = checks_from_markers(markers(blk_match=False, error="bs=4096 mismatch", stop_after="blk"),
                                 ok=False, reason="guest errors")
    calls: list[list[str]] = []
    report_checks(checks, calls.append)
    assert calls[0] == ["lava-test-set", "start", "boot"] and calls[3] == ["lava-test-set", "stop", "boot"]
    assert ["lava-test-case", "verdict", "--result", "fail"] in calls
    bs = next(c for c in calls if c[1] == "bs-4096")
    assert bs[:4] == ["lava-test-case", "bs-4096", "--result", "fail"] and bs[4] == "--measurement"
    assert bs[-2:] == ["--units", "MB/s"]
    assert ["lava-test-case", "completed", "--result", "skip"] in calls  # unplug never ran
    sets = [c[2] for c in calls if c[:2] == ["lava-test-set", "start"]]
    assert sets == ["boot", "enumerate", "smmu", "hotplug", "blk", "unplug"]


def test_signals_without_lava_helpers(capsys, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    emit = lava_emitter()
    emit(["lava-test-set", "start", "blk"])
    emit(["lava-test-case", "bs-4096", "--result", "pass", "--measurement", "4.2", "--units", "MB/s"])
    emit(["lava-test-set", "stop", "blk"])
    assert capsys.readouterr().out.splitlines() == [
        "<LAVA_SIGNAL_TESTSET START blk>",
        "<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=bs-4096 RESULT=pass MEASUREMENT=4.2 UNITS=MB/s>",
        "<LAVA_SIGNAL_TESTSET STOP>"]
