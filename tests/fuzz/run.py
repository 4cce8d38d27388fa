"""One fuzz target under atheris (coverage guided, libFuzzer engine):
``python -m tests.fuzz.run TARGET STATS_FILE [libFuzzer options and corpus dirs]``.
The target's counters go to STATS_FILE (JSON) every 500 inputs and on a finding."""

from __future__ import annotations

import hashlib
import importlib
import json
import sys

import atheris


def main() -> None:
    name, stats_file = sys.argv[1], sys.argv[2]
    # coverage of the project's code (not of numpy, asyncio, json, ..., nor of the test
    # drivers in tests.support, which play the peer)
    with atheris.instrument_imports(include=["viommu_backend", "tests.fuzz"],
                                    exclude=["tests.support"]):
        target = importlib.import_module(f"tests.fuzz.{name}")
    from tests.fuzz.common import STATS

    def dump() -> None:
        with open(stats_file, "w") as f:
            json.dump(dict(STATS), f)

    prefix = next((a.split("=", 1)[1] for a in sys.argv[3:]
                   if a.startswith("-artifact_prefix=")), None)

    def one(data: bytes) -> None:
        try:
            target.one_input(data)
        except BaseException:
            STATS["findings"] += 1
            dump()
            if prefix is not None:  # libFuzzer writes none for a Python exception
                with open(f"{prefix}crash-{hashlib.sha1(data).hexdigest()}", "wb") as f:
                    f.write(data)
            raise
        if STATS["inputs"] % 500 == 0:
            dump()

    atheris.Setup([sys.argv[0]] + sys.argv[3:], one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
