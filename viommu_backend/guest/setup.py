"""Guest-side set-up: QEMU >= 10.1, dtc, the guest image for a config.

    python -m viommu_backend.guest.setup [--config FILE ...] [--check]

Idempotent: everything is cached under ``$VIOMMU_CACHE`` (default
``~/.cache/viommu-backend``) and nothing is downloaded twice.  ``--check`` only reports
what is missing (exit 1 if anything is).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from viommu_backend.config import Config, ConfigError, load_config, load_default
from viommu_backend.guest.dt import dtc_path
from viommu_backend.guest.image import GuestImage, build_image, cached_image
from viommu_backend.guest.toolroot import QemuCommand, SetupError, ToolRoot, cache_dir, find_qemu

Progress = Callable[[str], None]


@dataclass(frozen=True)
class GuestTools:
    qemu: QemuCommand
    image: GuestImage
    dtc: str
    cache: Path


def ensure_guest_tools(config: Config, *, cache: Path | None = None, progress: Progress = print,
                       install: bool = True) -> GuestTools:
    """QEMU, dtc and the guest image for ``config``, made if missing (``install``)."""
    cache = cache or cache_dir()
    t0 = time.monotonic()
    dtc = dtc_path()
    qemu = find_qemu(cache, progress, install=install)
    if install:
        image = build_image(config.kernel, config.guest.modules, cache=cache, toolroot=ToolRoot(cache),
                            progress=progress)
    else:
        found = cached_image(config.kernel, config.guest.modules, cache)
        if found is None:
            raise SetupError("guest image not built yet: run scripts/setup")
        image = found
    if time.monotonic() - t0 > 1:
        progress(f"[setup] guest tools ready in {time.monotonic() - t0:.0f} s")
    return GuestTools(qemu, image, dtc, cache)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m viommu_backend.guest.setup", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, action="append",
                    help="machine config (repeatable; default: the embedded one)")
    ap.add_argument("--check", action="store_true", help="report only; do not install or build")
    a = ap.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress lines as they happen, also into a pipe
    try:
        configs = [load_config(c) for c in a.config] if a.config else [load_default()]
        for config in configs:
            tools = ensure_guest_tools(config, install=not a.check)
            m = tools.image.manifest
            print(f"[setup] {config.source}: guest kernel {m.get('kernel_version')} "
                  f"({m.get('kernel_source')}); image {tools.image.directory}")
    except (SetupError, ConfigError) as e:
        print(f"setup: error: {e}", file=sys.stderr)
        return 1
    print(f"[setup] {tools.qemu.describe()}")
    print(f"[setup] dtc: {tools.dtc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
