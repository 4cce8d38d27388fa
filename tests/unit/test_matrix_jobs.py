"""``matrix --jobs N``: runs overlap up to N at a time, each prints one line when it ends,
each keeps its own boot.log, and the results (results.json, JUnit) are those of a serial
run apart from timings."""

from __future__ import annotations

import asyncio
import json
import re
from xml.etree import ElementTree as ET

import pytest

from viommu_backend.cli import main as cli_main
from viommu_backend.matrix import expand, junit_xml, loads_matrix, results_json, run_matrix

from tests.support.run_data import TWO_AXES, summary

TIMING_KEYS = {"duration", "time"}


def _untimed(obj):
    """results.json / JUnit content with the timings left out."""
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [_untimed(x) for x in obj]
    return obj


def _junit_untimed(text: str) -> list[tuple[str, dict[str, str], str]]:
    return [(e.tag, {k: v for k, v in e.attrib.items() if k not in TIMING_KEYS}, (e.text or "").strip())
            for e in ET.fromstring(text).iter()]


class Booter:
    """Canned boots that take a different time each (later runs finish first) and record
    how many were running at once."""

    def __init__(self, fail_index: int = 3) -> None:
        self.running = 0
        self.peak = 0
        self.fail_index = fail_index
        self.calls = 0

    async def __call__(self, config, *, progress, workdir):
        self.calls += 1
        n = self.calls
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            progress(f"[boot] fake run {config.guest.cmdline}")
            await asyncio.sleep(0.05 * (7 - n))
            progress("[boot] done")
            if "strict=0" in config.guest.cmdline and "s1p" in str(config.function("viommu").options):
                return summary(ok=False, error="QEMU exited with 1: boom")
            return summary(domain="DMA-FQ" if "strict=0" in config.guest.cmdline else "DMA")
        finally:
            self.running -= 1


@pytest.mark.parametrize("jobs", [2, 3])
def test_parallel_results_equal_serial_ones(tmp_path, jobs):
    m = loads_matrix(TWO_AXES)
    runs = expand(m)
    serial_boot, par_boot = Booter(), Booter()
    serial = asyncio.run(run_matrix(m, runs, progress=lambda _l: None, output=tmp_path / "s",
                                    boot=serial_boot, setup=False))
    lines: list[str] = []
    par = asyncio.run(run_matrix(m, runs, progress=lines.append, output=tmp_path / "p",
                                 boot=par_boot, setup=False, jobs=jobs))
    assert serial_boot.peak == 1 and par_boot.peak == jobs

    # same results in the same order; only timings and the run folder's root differ
    ser_j = json.loads(json.dumps(results_json(m, serial), default=str).replace(str(tmp_path / "s"), "OUT"))
    par_j = json.loads(json.dumps(results_json(m, par), default=str).replace(str(tmp_path / "p"), "OUT"))
    assert _untimed(ser_j) == _untimed(par_j)
    assert [r["status"] for r in par_j["runs"]] == ["PASS", "PASS", "PASS", "FAIL", "PASS", "PASS"]
    assert _junit_untimed(junit_xml(m, serial)) == _junit_untimed(junit_xml(m, par))

    # one line per run (when it ends, naming its log), no "..." start lines
    run_lines = [line for line in lines if re.match(r"\[\d/6\] ", line)]
    assert len(run_lines) == 6 and not any(line.endswith("...") for line in lines)
    assert sorted(int(line[1]) for line in run_lines) == [1, 2, 3, 4, 5, 6]
    assert [int(line[1]) for line in run_lines] != [1, 2, 3, 4, 5, 6]  # later runs ended first
    assert all(f"[log {tmp_path / 'p' / 'runs'}" in line for line in run_lines)
    fail_line = next(line for line in run_lines if line.startswith("[4/6]"))
    assert ": FAIL in " in fail_line and "QEMU exited with 1: boom" in fail_line

    # each run's own boot lines in its own log, not interleaved with another run's
    for r in runs:
        log = (tmp_path / "p" / "runs" / r.slug / "boot.log").read_text().splitlines()
        assert log[0] == f"[boot] fake run {r.config.guest.cmdline}" and log[1:] == ["[boot] done"]


def test_verbose_parallel_lines_name_their_run(tmp_path):
    m = loads_matrix(TWO_AXES)
    runs = expand(m)[:2]
    lines: list[str] = []
    asyncio.run(run_matrix(m, runs, progress=lines.append, boot=Booter(), setup=False, jobs=2,
                           verbose=True))
    assert "[1] [boot] done" in lines and "[2] [boot] done" in lines


def test_cli_rejects_bad_jobs(capsys):
    with pytest.raises(SystemExit):
        cli_main(["matrix", "x.toml", "--jobs", "0"])
    assert "expected a positive integer" in capsys.readouterr().err
