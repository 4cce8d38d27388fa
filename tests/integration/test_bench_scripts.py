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
