"""``viommu-backend bisect GOOD BAD --config F --check NAME``: find the first commit of a
kernel tree at which a check fails.

The config's ``[kernel] source`` is a git tree (clean, as for any out-of-tree build).
``git bisect`` walks it; at each step the tree is built **incrementally in one build
folder** (``<cache>/bisect/<tree hash>/build``, ``O=``: the project's ``tinyconfig`` +
``viommu.config`` + the config's fragments, then ``make Image modules``: make recompiles
what the step changed), the guest boots that Image against the backend, and the check
(``viommu.<workload>.<check>``, or without the ``viommu.`` prefix) decides: PASS = good,
FAIL = bad, anything else (build failed, check missing) = skip.  The tree's bisect state is
reset at the end, whatever happens; the bisect log is printed.

    result = bisect(tree, good, bad, evaluate)     # evaluate(commit) -> ("good"|"bad"|"skip", why)
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from viommu_backend.config import Config, ConfigError, KernelConfig
from viommu_backend.guest.toolroot import SetupError, ToolRoot, cache_dir

Progress = Callable[[str], None]
Evaluate = Callable[[str], tuple[str, str]]
MAX_STEPS = 64
VERDICTS = ("good", "bad", "skip")


class BisectError(ConfigError):
    """The tree or the arguments do not allow a bisect."""


def git(tree: Path, *args: str, check: bool = True) -> str:
    cp = subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True, timeout=300)
    if check and cp.returncode:
        raise BisectError(f"git {' '.join(args)} in {tree}: {(cp.stderr or cp.stdout).strip()}")
    return cp.stdout + cp.stderr


@dataclass
class BisectResult:
    first_bad: str | None  # the first bad commit, None when skips left it undecided
    steps: list[tuple[str, str, str]] = field(default_factory=list)  # (commit, verdict, why)
    log: str = ""
    candidates: list[str] = field(default_factory=list)  # when only skipped commits are left

    def format(self) -> str:
        lines = [f"  step {i + 1}: {c[:12]} {v:4} {why}" for i, (c, v, why) in enumerate(self.steps)]
        if self.first_bad:
            lines.append(f"first bad commit: {self.first_bad}")
        else:
            lines.append("undecided: only skipped commits left: " + " ".join(c[:12] for c in self.candidates))
        return "\n".join(lines)


_FIRST_BAD = re.compile(r"^([0-9a-f]{40}) is the first bad commit", re.M)


def _done(out: str) -> str | None:
    m = _FIRST_BAD.search(out)
    return m.group(1) if m else None


def bisect(tree: Path, good: str, bad: str, evaluate: Evaluate, progress: Progress = print) -> BisectResult:
    """Run ``git bisect`` in ``tree`` between ``good`` and ``bad`` with ``evaluate``."""
    if git(tree, "status", "--porcelain", "--untracked-files=no").strip():
        raise BisectError(f"{tree}: uncommitted changes; bisect needs a clean tree")
    good_c, bad_c = git(tree, "rev-parse", "--verify", good + "^{commit}").strip(), \
        git(tree, "rev-parse", "--verify", bad + "^{commit}").strip()
    res = BisectResult(None)
    out = git(tree, "bisect", "start", bad_c, good_c)
    try:
        for _ in range(MAX_STEPS):
            res.first_bad = _done(out)
            if res.first_bad or "only 'skip'ped commits left" in out:
                break
            commit = git(tree, "rev-parse", "HEAD").strip()
            progress(f"[bisect] step {len(res.steps) + 1}: {git(tree, 'log', '-1', '--format=%h %s', commit).strip()}")
            verdict, why = evaluate(commit)
            if verdict not in VERDICTS:
                raise BisectError(f"evaluate({commit}) returned {verdict!r}")
            res.steps.append((commit, verdict, why))
            progress(f"[bisect] {commit[:12]}: {verdict} ({why})")
            out = git(tree, "bisect", verdict, commit, check=False)
        if res.first_bad is None:
            res.candidates = re.findall(r"^([0-9a-f]{40})$", out, re.M)
        res.log = git(tree, "bisect", "log", check=False)
    finally:
        git(tree, "bisect", "reset", check=False)
    return res


# --------------------------------------------------------------------------- building
def work_dir(tree: Path, cache: Path | None = None) -> Path:
    """The bisect folder of a tree (its build folder is reused by every step and every
    later bisect of the same tree)."""
    return (cache or cache_dir()) / "bisect" / hashlib.sha256(str(tree.resolve()).encode()).hexdigest()[:16]


def build_step(kernel: KernelConfig, work: Path, root: ToolRoot, progress: Progress) -> tuple[Path, Path]:
    """Configure and build the tree as it is checked out now, incrementally in
    ``work/build``; returns (Image, the installed modules folder)."""
    from viommu_backend.guest.kernel import MAKE_ENV, ensure_build_tools, fragments

    assert kernel.source is not None
    src = kernel.source.resolve()
    if not (src / "Makefile").is_file():
        raise SetupError(f"{src}: not a kernel tree (no Makefile)")
    if (src / ".config").exists():
        raise SetupError(f"{src}: the tree has a .config; it is built out of tree: run `make mrproper` first")
    ensure_build_tools(root, progress)
    b, frag_dir, modroot = work / "build", work / "fragments", work / "modroot"
    b.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(frag_dir, ignore_errors=True)
    frag_dir.mkdir()
    for i, f in enumerate(fragments(kernel)):
        shutil.copy(f, frag_dir / f"{i:02d}-{f.name}")
    frag_args = " ".join(shlex.quote(str(p)) for p in sorted(frag_dir.iterdir()))
    q = shlex.quote
    make = f"make -C {q(str(src))} O={q(str(b))}"
    t0 = time.monotonic()
    root.run(f"{MAKE_ENV}; {make} -s tinyconfig && cd {q(str(src))} && "
             f"scripts/kconfig/merge_config.sh -m -O {q(str(b))} {q(str(b))}/.config {frag_args} >/dev/null && "
             f"{make} -s olddefconfig", timeout=600, binds=[work, src])
    shutil.rmtree(modroot, ignore_errors=True)
    root.run_logged(f"{MAKE_ENV}; {make} -j$(nproc) Image modules && "
                    f"{make} -s modules_install INSTALL_MOD_PATH={q(str(modroot))} INSTALL_MOD_STRIP=1",
                    log=work / "build.log", label="[bisect] make", progress=progress, timeout=7200,
                    binds=[work, src])
    progress(f"[bisect] built in {time.monotonic() - t0:.0f} s (incremental, {b})")
    return b / "arch/arm64/boot/Image", modroot / "lib" / "modules"


def find_check(checks: list, name: str) -> object | None:
    want = name if name.startswith("viommu.") else f"viommu.{name}"
    return next((c for c in checks if c.path == want), None)


def boot_step(config: Config, check: str, work: Path, root: ToolRoot, progress: Progress) -> Evaluate:
    """The real step: incremental build, a boot of that Image, the check's verdict."""
    from viommu_backend.guest.boot import run_boot
    from viommu_backend.kci.checks import checks_from_markers

    def evaluate(commit: str) -> tuple[str, str]:
        try:
            image, modules = build_step(config.kernel, work, root, progress)
        except SetupError as e:
            return "skip", f"build failed: {str(e).splitlines()[0]}"
        kernel = KernelConfig(image=image, modules=modules if modules.is_dir() else None)
        cfg = dataclasses.replace(config, kernel=kernel)
        lines: list[str] = []
        summary = asyncio.run(run_boot(cfg, progress=lines.append, workdir=work / "runs" / commit[:12]))
        (work / "runs" / commit[:12] / "boot.log").write_text("\n".join(lines) + "\n")
        checks = checks_from_markers(summary.markers, ok=summary.ok, reason=(summary.error or "").split("\n")[0])
        c = find_check(checks, check)
        if c is None:
            return "skip", f"no check {check} (boot: {'ok' if summary.ok else summary.error})"
        verdict = {"PASS": "good", "FAIL": "bad"}.get(c.status, "skip")
        return verdict, f"{c.path} {c.status} {c.detail}".strip()
    return evaluate


def main_bisect(good: str, bad: str, config: Config, check: str, progress: Progress = print) -> int:
    """0: a first bad commit was found (printed); 1: undecided; 2: bad arguments."""
    if config.kernel.source is None:
        raise BisectError("bisect needs [kernel] source = \"/path/to/linux\" (a git tree) in the config")
    tree = config.kernel.source
    if config.iommu.route == "module":
        raise BisectError("bisect boots each step's Image directly: use [iommu] route = \"reprobe\"")
    work = work_dir(tree)
    progress(f"[bisect] {tree}: good {good}, bad {bad}, check {check}; build folder {work / 'build'}")
    res = bisect(tree, good, bad, boot_step(config, check, work, ToolRoot(), progress), progress)
    progress(res.format())
    progress("git bisect log:\n" + res.log.rstrip())
    return 0 if res.first_bad else 1
