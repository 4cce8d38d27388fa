"""The benchmark scripts run end to end on a small size (their figures are not checked
here: speed targets live in the benchmarks, never in timed tests)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def test_bench_cmd_sync_every_sync_completes_on_both_servers():
    """bench_cmd_sync waits for each CMD_SYNC's MSI write (a lost one ends it with an
    error): 200 TLBI + CMD_SYNC pairs through the real server, and the floor's."""
    out = subprocess.run([sys.executable, str(SCRIPTS / "bench_cmd_sync"), "--syncs", "200"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = dict(re.findall(r"^\s+(floor|backend)\s+([\d.]+)\s+[\d.]+$", out.stdout, re.M))
    assert set(rows) == {"floor", "backend"} and all(float(v) > 0 for v in rows.values())
    assert "backend / floor: wall" in out.stdout


def test_bench_dma_path_moves_the_data_right_in_every_layout():
    """bench_dma_path writes 1 MiB to the disk and reads it back through each layout
    (asserting the bytes) before it times anything; then a row per size, op, layout and
    TLB state.  Exit 1 only says a speed target failed, which is not checked here."""
    out = subprocess.run([sys.executable, str(SCRIPTS / "bench_dma_path"), "--sizes", "4096",
                          "--seconds", "0.02"], capture_output=True, text=True, timeout=300)
    assert out.returncode in (0, 1) and "Traceback" not in out.stderr, out.stdout + out.stderr
    assert "read back through each layout OK (contig, sg, sgrev, huge)" in out.stdout
    rows = re.findall(r"^\s+4096 (write|read)\s+(\w+)\s+(warm|strict|cold)\s+[\d.]+\s+[\d.]+"
                      r"\s+[\d.]+\s+([\d.]+)$", out.stdout, re.M)
    assert {(op, layout, tlb) for op, layout, tlb, _ in rows} == {
        (op, layout, tlb) for op in ("write", "read") for layout in ("contig", "sg", "sgrev", "huge")
        for tlb in ("warm", "strict", "cold")}
    assert all(float(us) > 0 for *_, us in rows)
    assert re.search(r"^(PASS|FAIL): 4 KiB write huge strict: [\d.]+ us per request$", out.stdout, re.M)
