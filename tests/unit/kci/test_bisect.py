"""``bisect``: git bisect driven over a small synthetic history, and the incremental build
of each step in one build folder (a miniature "kernel" tree whose Makefile has the targets
the kernel build calls, built in the tool root as a real kernel is)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from viommu_backend.config import KernelConfig
from viommu_backend.kci.bisect import BisectError, bisect, build_step, find_check, work_dir
from viommu_backend.kci.checks import checks_from_markers

from tests.support.run_data import markers
from tests.support import CONFIGS

MAKEFILE = """\
O ?= .
SRCS := $(wildcard src/*.c)
OBJS := $(patsubst src/%.c,$(O)/obj/%.o,$(SRCS))
tinyconfig:
\techo CONFIG_TINY=y > $(O)/.config
olddefconfig:
\tsort -u $(O)/.config -o $(O)/.config
$(O)/obj/%.o: src/%.c
\tmkdir -p $(O)/obj && cp $< $@ && echo $* >> $(O)/compiled.log
Image: $(OBJS)
\tmkdir -p $(O)/arch/arm64/boot && cat $(OBJS) > $(O)/arch/arm64/boot/Image
modules:
\t@true
modules_install:
\tmkdir -p $(INSTALL_MOD_PATH)/lib/modules/6.99.0 && touch $(INSTALL_MOD_PATH)/lib/modules/6.99.0/modules.dep
.PHONY: tinyconfig olddefconfig Image modules modules_install
"""
MERGE = """#!/bin/sh
# merge_config.sh -m -O DIR BASE FRAGMENT...: append the fragments to BASE
shift 3; base=$1; shift; cat "$@" >> "$base"
"""
FILES = ("a", "b", "c", "d")
FIRST_BAD = 8  # commit number (1-based) that brings the bug


def history(tree: Path, n: int = 13) -> list[str]:
    """n commits; commit k changes src/<FILES[k % 4]>.c; from FIRST_BAD on src/c.c has BUG."""
    (tree / "src").mkdir(parents=True)
    (tree / "scripts/kconfig").mkdir(parents=True)
    (tree / "Makefile").write_text(MAKEFILE)
    (tree / "scripts/kconfig/merge_config.sh").write_text(MERGE)
    (tree / "scripts/kconfig/merge_config.sh").chmod(0o755)
    for f in FILES:
        (tree / "src" / f"{f}.c").write_text(f"{f} 0\n")

    def g(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True, check=True).stdout

    g("init", "-q", "-b", "main")
    commits = []
    for k in range(1, n + 1):
        f = FILES[k % 4]
        (tree / "src" / f"{f}.c").write_text(f"{f} {k}\n")
        c = tree / "src" / "c.c"
        if k >= FIRST_BAD and "BUG" not in c.read_text():  # the bug stays from FIRST_BAD on
            c.write_text(c.read_text() + "BUG\n")
        g("add", "-A")
        g("-c", "user.email=t@e", "-c", "user.name=t", "commit", "-qm", f"commit {k}: {f}.c")
        commits.append(g("rev-parse", "HEAD").strip())
    return commits


def reads_bug(tree: Path):
    def evaluate(commit: str) -> tuple[str, str]:
        bug = "BUG" in (tree / "src" / "c.c").read_text()
        return ("bad", "BUG in c.c") if bug else ("good", "no BUG")
    return evaluate


def test_bisect_finds_the_first_bad_commit_and_resets(tmp_path):
    tree = tmp_path / "linux"
    commits = history(tree)
    res = bisect(tree, commits[0], commits[-1], reads_bug(tree), progress=lambda _l: None)
    assert res.first_bad == commits[FIRST_BAD - 1]
    assert 2 <= len(res.steps) <= 4  # log2(12) steps
    assert "git bisect start" in res.log
    assert subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True
                          ).stdout.strip() == commits[-1]  # reset to where it was
    assert f"first bad commit: {commits[FIRST_BAD - 1]}" in res.format()


def test_skipped_steps_and_undecided_results(tmp_path):
    tree = tmp_path / "linux"
    commits = history(tree)
    suspects = set(commits[FIRST_BAD - 2:FIRST_BAD])  # the last good and the first bad

    def skips_around(commit: str) -> tuple[str, str]:
        return ("skip", "build failed") if commit in suspects else reads_bug(tree)(commit)

    res = bisect(tree, commits[0], commits[-1], skips_around, progress=lambda _l: None)
    assert res.first_bad is None and set(res.candidates) >= {commits[FIRST_BAD - 1]}
    assert "undecided" in res.format()


def test_a_dirty_tree_or_bad_revisions_are_refused(tmp_path):
    tree = tmp_path / "linux"
    commits = history(tree, 3)
    with pytest.raises(BisectError, match="no-such-rev"):
        bisect(tree, "no-such-rev", commits[-1], reads_bug(tree))
    (tree / "src" / "a.c").write_text("dirty\n")
    with pytest.raises(BisectError, match="uncommitted changes"):
        bisect(tree, commits[0], commits[-1], reads_bug(tree))


def test_find_check_by_full_or_short_name():
    checks = checks_from_markers(markers(blk_match=False), ok=False)
    assert find_check(checks, "viommu.blk.bs-4096").status == "FAIL"
    assert find_check(checks, "blk.bs-65536").status == "PASS"
    assert find_check(checks, "blk.bs-1") is None


def test_each_step_builds_incrementally_in_one_folder(tmp_path):
    from viommu_backend.guest.toolroot import ToolRoot

    root = ToolRoot()
    if not root.bootstrapped:
        if os.environ.get("CI") == "true":
            pytest.fail("no tool root under CI")
        pytest.skip("no tool root (scripts/setup makes it)")
    tree = tmp_path / "linux"
    commits = history(tree)
    work = work_dir(tree, tmp_path / "cache")
    kernel = KernelConfig(source=tree)
    images: list[bytes] = []

    def build_and_look(commit: str) -> tuple[str, str]:
        image, modules = build_step(kernel, work, root, progress=lambda _l: None)
        assert (modules / "6.99.0" / "modules.dep").is_file()
        images.append(image.read_bytes())
        return ("bad", "BUG in the Image") if b"BUG" in images[-1] else ("good", "clean Image")

    res = bisect(tree, commits[0], commits[-1], build_and_look, progress=lambda _l: None)
    assert res.first_bad == commits[FIRST_BAD - 1]
    compiled = (work / "build" / "compiled.log").read_text().split()
    assert sorted(compiled[:4]) == sorted(FILES)  # the first step compiles everything
    assert len(compiled) < 4 * len(res.steps)  # later steps only what changed
    assert "CONFIG_ARM_SMMU_V3=y" in (work / "build" / ".config").read_text()  # the project's fragment
    assert not (tree / ".config").exists() and not (tree / "obj").exists()  # out of tree


def test_cli_needs_a_tree_in_the_config(capsys):
    from viommu_backend.cli import main as cli_main

    default = CONFIGS / "default.toml"
    assert cli_main(["bisect", "v1", "v2", "--config", str(default), "--check", "blk.bs-4096"]) == 2
    assert "[kernel] source" in capsys.readouterr().err
