"""A short smoke of every fuzz target (tests/fuzz, run at scale by scripts/fuzz): replay
its corpus in the repo, then a few thousand new inputs mutated from it (seeded, so a
failure reproduces).  Any exception is a finding; accesses outside guest memory are
counted by the fenced guest memory and must stay at zero."""

from __future__ import annotations

import importlib
import random

import pytest

from tests.fuzz import TARGETS
from tests.fuzz.common import STATS
from tests.support import REPO

CORPUS = REPO / "tests" / "fuzz" / "corpus"
NEW_INPUTS = 2000


def mutate(rnd: random.Random, data: bytes, other: bytes) -> bytes:
    """A few libFuzzer-like mutations: byte changes, inserts, erasures, splices."""
    b = bytearray(data)
    for _ in range(rnd.randint(1, 6)):
        op = rnd.randrange(5)
        pos = rnd.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(pos, len(b) - 1)] = rnd.randrange(256)
        elif op == 1:
            b[pos:pos] = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 8)))
        elif op == 2:
            del b[pos:pos + rnd.randint(1, 16)]
        elif op == 3:
            b[pos:] = other[rnd.randrange(len(other) + 1):]
        elif b:
            i = min(pos, len(b) - 1)
            b[i] ^= 1 << rnd.randrange(8)
    return bytes(b)


@pytest.mark.parametrize("name", TARGETS)
def test_fuzz_target_smoke(name: str) -> None:
    target = importlib.import_module(f"tests.fuzz.{name}")
    corpus = [f.read_bytes() for f in sorted((CORPUS / name).iterdir())]
    assert corpus, f"no corpus for {name}"
    before = STATS["inputs"]
    for data in corpus:
        target.one_input(data)
    rnd = random.Random(f"fuzz-smoke-{name}")
    for _ in range(NEW_INPUTS):
        target.one_input(mutate(rnd, rnd.choice(corpus), rnd.choice(corpus)))
    assert STATS["inputs"] - before == len(corpus) + NEW_INPUTS
    assert STATS["oob"] == 0


def test_seed_corpus_is_what_the_targets_build() -> None:
    """The corpus in the repo starts from each target's seeds (scripts/fuzz --write-seeds)."""
    for name in TARGETS:
        target = importlib.import_module(f"tests.fuzz.{name}")
        stored = {f.read_bytes() for f in (CORPUS / name).glob("seed-*")}
        assert set(target.seeds()) == stored, name


def test_a_findings_file_of_an_earlier_run_is_not_this_runs_finding(tmp_path) -> None:
    """scripts/fuzz keeps findings across runs; a run counts only the inputs it saved."""
    from tests.fuzz.cli import run_target
    old = tmp_path / "tables" / "findings" / "crash-0123"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"an earlier run's input")
    r = run_target("tables", 200, None, tmp_path)
    assert r["rc"] == 0 and r["inputs"] == 200, r
    assert r["crashes"] == 0 and r["hangs"] == 0 and r["findings"] == [], r
    assert old.exists()
