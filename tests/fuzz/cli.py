"""scripts/fuzz: run the fuzz targets under atheris, each in its own process, and print
per target the inputs run, exec/s, coverage, crashes, hangs, accesses outside guest
memory and the corpus size.  Exits non-zero on any finding (the input is saved)."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from tests.fuzz import TARGETS

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
MAX_LEN = {"tables": 24576}
HANG_SECONDS = 10


def write_seeds(target: str) -> int:
    """(Re)write the target's seed corpus into the repo; returns how many."""
    import importlib
    mod = importlib.import_module(f"tests.fuzz.{target}")
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    seeds = mod.seeds()
    for i, s in enumerate(seeds):
        (d / f"seed-{i:02d}").write_bytes(s)
    return len(seeds)


def _last(pattern: str, text: str) -> str | None:
    m = re.findall(pattern, text)
    return m[-1] if m else None


def run_target(target: str, inputs: int, seconds: int | None, work: Path) -> dict:
    tdir = work / target
    corpus = tdir / "corpus"
    artifacts = tdir / "findings"
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    earlier = set(artifacts.iterdir())  # findings of earlier runs are not this run's
    stats_file = tdir / "stats.json"
    stats_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "tests.fuzz.run", target, str(stats_file), str(corpus),
           str(CORPUS / target), f"-runs={inputs}", f"-timeout={HANG_SECONDS}",
           f"-max_len={MAX_LEN.get(target, 4096)}", f"-artifact_prefix={artifacts}/",
           "-print_final_stats=1", "-rss_limit_mb=4096", "-close_fd_mask=0"]
    if seconds:
        cmd.append(f"-max_total_time={seconds}")
    t0 = time.monotonic()
    log = tdir / "libfuzzer.log"
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=os.environ).returncode
    wall = time.monotonic() - t0
    text = log.read_text(errors="replace")
    stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
    runs = int(_last(r"stat::number_of_executed_units: *(\d+)", text)
               or _last(r"#(\d+)\s", text) or 0)
    found = set(artifacts.iterdir()) - earlier
    crashed = sorted(a.name for a in found if a.name.startswith(("crash-", "oom-")))
    hangs = sorted(a.name for a in found if a.name.startswith(("timeout-", "slow-")))
    return {
        "target": target, "rc": rc, "inputs": runs, "seconds": round(wall, 1),
        "exec_per_s": round(runs / wall) if wall else 0,
        "cov": int(_last(r"cov: (\d+)", text) or 0), "ft": int(_last(r"ft: (\d+)", text) or 0),
        "crashes": len(crashed) or int(rc != 0 and not hangs), "hangs": len(hangs),
        "oob": stats.get("oob", 0), "refused": stats.get("refused", 0),
        "corpus": len(list(corpus.iterdir())) + len(list((CORPUS / target).iterdir())),
        "findings": [str(artifacts / a) for a in crashed + hangs], "log": str(log),
        "target_stats": stats,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/fuzz", description=__doc__)
    ap.add_argument("--target", default="all", choices=("all",) + TARGETS)
    ap.add_argument("--inputs", type=int, default=10**6, help="inputs per target (10^6)")
    ap.add_argument("--seconds", type=int, default=None, help="time limit per target")
    ap.add_argument("--work", type=Path,
                    default=Path(os.environ.get("VIOMMU_CACHE", Path.home() / ".cache/viommu-backend")) / "fuzz",
                    help="working corpus and findings (default: the cache)")
    ap.add_argument("--write-seeds", action="store_true", help="regenerate tests/fuzz/corpus")
    args = ap.parse_args(argv)
    targets = TARGETS if args.target == "all" else (args.target,)
    if args.write_seeds:
        for t in targets:
            print(f"{t}: {write_seeds(t)} seeds")
        return 0
    bad = 0
    print(f"{'target':10} {'inputs':>9} {'exec/s':>7} {'cov':>6} {'ft':>6} {'crashes':>7} "
          f"{'hangs':>5} {'oob':>4} {'refused':>8} {'corpus':>6}", flush=True)
    for t in targets:
        r = run_target(t, args.inputs, args.seconds, args.work)
        print(f"{t:10} {r['inputs']:>9} {r['exec_per_s']:>7} {r['cov']:>6} {r['ft']:>6} "
              f"{r['crashes']:>7} {r['hangs']:>5} {r['oob']:>4} {r['refused']:>8} "
              f"{r['corpus']:>6}   ({r['seconds']} s)", flush=True)
        print(f"           counters: {json.dumps(r['target_stats'], sort_keys=True)}", flush=True)
        if r["crashes"] or r["hangs"] or r["oob"]:
            bad += 1
            print(f"  FINDING in {t}: {r['findings']} (log: {r['log']})", flush=True)
            print("\n".join(Path(r["log"]).read_text(errors="replace").splitlines()[-30:]))
    print("verdict:", "FAIL" if bad else "ok (no crash, hang or access outside guest memory)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
