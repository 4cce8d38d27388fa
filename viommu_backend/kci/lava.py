"""LAVA job definitions for matrix runs (``viommu-backend matrix --lava DIR``), and the
step that runs inside such a job (``python -m viommu_backend.kci.lava run --config F``).

A run needs a host that runs QEMU and the backend side by side, not a board: the job is for
LAVA's ``docker`` device type.  It deploys a stock ``debian:bookworm`` container; its one
test definition (inline, so the job file is all a lab needs) installs git, clones this
project at the generating checkout's commit, writes the run's config (the matrix run's
TOML, base64 in the job), runs ``scripts/setup --config`` (the venv, QEMU >= 10.1 in a
Debian tool root, the guest kernel: Debian's package fetched, or ``linux-source`` / a tree
built), then boots the guest against the backend and reports every check
(``kci.checks``: ``viommu.<workload>.<check>``) as a LAVA test case, one test set per
workload, with measurements (MB/s) where a check has one.

The set-up debootstraps a tool root and chroots into it, so the lab's docker device must
run containers privileged (``docker_privileged: true`` in its device dictionary) and with
network access to Debian's archive and PyPI (README "LAVA")."""

from __future__ import annotations

import argparse
import asyncio
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from viommu_backend.kci.checks import Check, checks_from_markers, suites

IMAGE = "debian:bookworm"
PROJECT_DIR = "/opt/viommu-backend"
CONFIG_PATH = "/tmp/viommu-run.toml"
PROMPT = "root@lava:"
LAVA_RESULTS = {"PASS": "pass", "FAIL": "fail", "MISS": "skip", "SKIP": "skip"}
_CASE_RE = re.compile(r"[^-_.a-zA-Z0-9]+")


def source_of(checkout: Path) -> tuple[str, str]:
    """(repository URL, commit) of the checkout the job should install: the ``origin``
    remote when it has one, else the checkout's own path (a lab needs a URL it can reach:
    ``--lava-repo``)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True,
                                  timeout=30, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return git("remote", "get-url", "origin") or str(checkout.resolve()), git("rev-parse", "HEAD") or "HEAD"


def setup_minutes(config: Any) -> int:
    """A kernel built from source takes ~5 min on 2 cores plus its sources; a packaged one seconds."""
    return 60 if config.kernel.built else 20


def steps(config_text: str, repo: str, commit: str) -> list[str]:
    venv = "${VIOMMU_CACHE:-$HOME/.cache/viommu-backend}/venv/bin/python"
    return [
        "export DEBIAN_FRONTEND=noninteractive",
        "apt-get update -q && apt-get install -y -q --no-install-recommends git ca-certificates python3",
        f"rm -rf {PROJECT_DIR} && git clone -q {shlex.quote(repo)} {PROJECT_DIR}"
        f" && git -C {PROJECT_DIR} checkout -q {shlex.quote(commit)}",
        f"cat > {CONFIG_PATH} <<'VIOMMU_CONFIG'\n{config_text.rstrip()}\nVIOMMU_CONFIG",
        f"lava-test-case setup --shell {PROJECT_DIR}/scripts/setup --config {CONFIG_PATH}",
        f"PYTHONPATH={PROJECT_DIR} {venv} -m viommu_backend.kci.lava run --config {CONFIG_PATH}",
    ]


def job_definition(matrix: Any, run: Any, *, repo: str, commit: str,
                   image: str | dict[str, Any] = IMAGE) -> dict[str, Any]:
    """The LAVA job (as data: dump it as YAML) for one matrix run.  ``image``: the docker
    image to pull, or ``{"name": ..., "local": True}`` for one the worker already has."""
    setup = setup_minutes(run.config)
    guest = int(run.config.guest.timeout // 60) + 5
    name = f"viommu-{matrix.name}-{run.slug}"
    return {
        "job_name": f"viommu-backend {matrix.name} {run.name}",
        "device_type": "docker",
        "priority": "medium",
        "visibility": "public",
        "timeouts": {"job": {"minutes": setup + guest + 15}, "action": {"minutes": setup + guest},
                     "connection": {"minutes": 5}},
        "metadata": {"viommu.matrix": matrix.name, "viommu.run": run.name, "viommu.repository": repo,
                     "viommu.commit": commit, "viommu.kernel": run.config.kernel.describe(),
                     **{f"viommu.axis.{a}": v for a, v in run.choice.items()}},
        "actions": [
            {"deploy": {"to": "docker", "image": image, "timeout": {"minutes": 15}}},
            {"boot": {"method": "docker", "command": "bash", "prompts": [PROMPT], "timeout": {"minutes": 5}}},
            {"test": {"timeout": {"minutes": setup + guest}, "definitions": [{
                "from": "inline", "name": name, "path": f"inline/{name}.yaml",
                "repository": {
                    "metadata": {"format": "Lava-Test Test Definition 1.0", "name": name,
                                 "description": f"viommu-backend: boot an arm64 guest against the emulated "
                                                f"SMMUv3 ({run.name}) and check it"},
                    "run": {"steps": steps(run.config.text, repo, commit)},
                },
            }]}},
        ],
    }


def write_jobs(matrix: Any, runs: Sequence[Any], out: Path, *, repo: str | None = None,
               commit: str | None = None, image: str | dict[str, Any] = IMAGE) -> list[Path]:
    """One ``<slug>.yaml`` per run in ``out``; the source defaults to this checkout."""
    import yaml

    here_repo, here_commit = source_of(Path(__file__).resolve().parents[2])
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for run in runs:
        job = job_definition(matrix, run, repo=repo or here_repo, commit=commit or here_commit, image=image)
        p = out / f"{run.slug}.yaml"
        p.write_text(f"# viommu-backend matrix {matrix.name} ({matrix.source}), run {run.index}: {run.name}\n"
                     + yaml.safe_dump(job, sort_keys=False, width=100))
        paths.append(p)
    return paths


# Debian trixie-backports: lava_common.schemas + lava-schema.py, and the jinja2 its
# validator imports (only a Recommends of lava-common, which the tool root does not take)
LAVA_COMMON = ("lava-common", "python3-jinja2")


def validate_jobs(paths: Sequence[Path], *, root: Any = None, progress: Callable[[str], None] = print
                  ) -> dict[Path, str]:
    """Each job checked with lava-common's own validator (``lava-schema.py job --strict``,
    in the tool root, installed there first if missing): {path: why it is invalid}."""
    from viommu_backend.guest.toolroot import ToolRoot

    root = root or ToolRoot()
    stamp = root.path / ".viommu-lava-common-ok"
    if not stamp.is_file() or stamp.read_text().split() != list(LAVA_COMMON):
        progress("[lava] installing lava-common (trixie-backports) in the tool root")
        root.run(f"apt-get update -qq && apt-get install -y -qq --no-install-recommends -t trixie-backports "
                 f"{' '.join(LAVA_COMMON)} >/dev/null", timeout=900)
        stamp.write_text("\n".join(LAVA_COMMON) + "\n")
    bad: dict[Path, str] = {}
    for p in paths:
        p = p.resolve()
        cp = root.run(f"python3 /usr/share/lava-common/lava-schema.py job --strict {shlex.quote(str(p))}",
                      binds=[p.parent], check=False, timeout=120)
        if cp.returncode != 0:
            bad[p] = (cp.stdout + cp.stderr).strip()
    return bad


# --------------------------------------------------------------------------- inside the job
def case_name(check: Check) -> str:
    return _CASE_RE.sub("_", check.name)


def report_checks(checks: Sequence[Check], emit: Callable[[list[str]], None]) -> None:
    """Each check as ``lava-test-case`` (one ``lava-test-set`` per workload)."""
    for workload, group in suites(checks).items():
        emit(["lava-test-set", "start", workload])
        for c in group:
            args = ["lava-test-case", case_name(c), "--result", LAVA_RESULTS.get(c.status, "unknown")]
            if c.value is not None and c.status in ("PASS", "FAIL"):
                args += ["--measurement", f"{c.value:g}"] + (["--units", c.unit] if c.unit else [])
            emit(args)
        emit(["lava-test-set", "stop", workload])


def lava_emitter() -> Callable[[list[str]], None]:
    """Call LAVA's helpers when they are on PATH (inside a job), else print the signals
    they would send (the same lines LAVA parses)."""
    if shutil.which("lava-test-case"):
        return lambda args: subprocess.run(args, check=False)

    def signal(args: list[str]) -> None:
        if args[0] == "lava-test-set":
            print(f"<LAVA_SIGNAL_TESTSET {args[1].upper()} {args[2]}>" if args[1] == "start"
                  else "<LAVA_SIGNAL_TESTSET STOP>", flush=True)
            return
        opts = dict(zip(args[2::2], args[3::2]))
        extra = "".join(f" {k[2:].upper()}={v}" for k, v in opts.items() if k != "--result")
        print(f"<LAVA_SIGNAL_TESTCASE TEST_CASE_ID={args[1]} RESULT={opts['--result']}{extra}>", flush=True)
    return signal


def run_and_report(config_path: Path, emit: Callable[[list[str]], None]) -> int:
    from viommu_backend.config import load_config
    from viommu_backend.guest.boot import run_boot

    summary = asyncio.run(run_boot(load_config(config_path)))
    checks = checks_from_markers(summary.markers, ok=summary.ok, reason=(summary.error or "").split("\n")[0])
    report_checks(checks, emit)
    return 0 if summary.ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m viommu_backend.kci.lava",
                                 description="the step a LAVA job runs: boot, then one test case per check")
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="boot the config's guest and report its checks to LAVA")
    r.add_argument("--config", type=Path, required=True)
    a = ap.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    return run_and_report(a.config, lava_emitter())


if __name__ == "__main__":
    sys.exit(main())
