"""The kernel's own VFIO selftests (``tools/testing/selftests/vfio``, Linux >= 6.18),
cross-built for the guest with the project's driver for the DMA test engine.

The selftests drive a device through a small driver library (``struct
vfio_pci_driver_ops``: probe, init, remove, memcpy_start / memcpy_wait, send_msi) whose
drivers cover real DMA engines only.  The project keeps one for its engine in
``guest_images/vfio_selftests/viommu_engine.c``; the build:

1. copies what the selftests' Makefile reads out of the kernel source (the selftests'
   ``lib.mk`` and kselftest headers, the vfio folder, ``tools/include``,
   ``scripts/subarch.include``) to a scratch folder -- the source tree is never touched;
2. puts the driver (and ``guest_images/programs/engine_regs.h``, the engine's registers)
   in ``lib/drivers/viommu_engine/`` of that copy and registers it: one
   ``LIBVFIO_C`` line in ``lib/libvfio.mk`` and one entry (with its declaration) in the
   driver table of ``lib/vfio_pci_driver.c`` (:func:`register_driver`);
3. fetches libuuid for arm64 (``uuid-dev`` and ``libuuid1``, ``apt-get download`` in the
   tool root, unpacked in the scratch folder: the tool root's own packages are unchanged);
4. runs the selftests' own Makefile with the tool root's cross gcc, static, against the
   built kernel's uapi headers.

The binaries (``vfio_*_test``) go into the guest image next to the project's programs;
the guest workload ``vfio-selftests`` runs them against the engine and the host parses
their KTAP output (:mod:`viommu_backend.guest.ktap`).  :data:`SKIP_CAUSES` says why this
machine makes a test skip itself, :data:`UNCHECKED` which checks a passing test leaves out
without a SKIP (the IOMMU page-table check exists for Intel VT-d only).
"""

from __future__ import annotations

import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from viommu_backend.guest.ktap import KtapResult, KtapRun
from viommu_backend.guest.toolroot import SetupError, ToolRoot

Progress = Callable[[str], None]
SELFTESTS = Path("tools/testing/selftests")
VFIO = SELFTESTS / "vfio"
DRIVER = "viommu_engine"
GUEST_DIR = "vfio-selftests"  # under /bin in the guest: the workload runs every program there
CROSS = "aarch64-linux-gnu-"
UUID_PACKAGES = ("uuid-dev", "libuuid1")
# what the vfio selftests' Makefile (and ../lib.mk, lib/libvfio.mk) read from the tree
TREE_PARTS = (SELFTESTS / "lib.mk", SELFTESTS / "kselftest.h", SELFTESTS / "kselftest_harness.h",
              SELFTESTS / "kselftest", VFIO, Path("tools/include"), Path("tools/arch/arm64/include"),
              Path("scripts/subarch.include"))
MK_ANCHOR = "LIBVFIO_OUTPUT :="
TABLE_ANCHOR = "static struct vfio_pci_driver_ops *driver_ops[] = {"


def driver_sources(recipe: Path) -> list[Path]:
    """The driver and the engine's register header it shares with the project's programs."""
    return [recipe / "vfio_selftests" / f"{DRIVER}.c", recipe / "programs" / "engine_regs.h"]


def has_vfio_selftests(src: Path) -> bool:
    """Whether a kernel tree carries the VFIO selftests and their driver library."""
    return (src / VFIO / "lib" / "vfio_pci_driver.c").is_file() and (src / VFIO / "Makefile").is_file()


def register_driver(libvfio_mk: str, driver_table: str) -> tuple[str, str]:
    """``lib/libvfio.mk`` and ``lib/vfio_pci_driver.c`` with the engine's driver added:
    its source in ``LIBVFIO_C`` (before ``LIBVFIO_OUTPUT``, for every architecture) and
    its ops, declared, in ``driver_ops[]``."""
    if MK_ANCHOR not in libvfio_mk:
        raise SetupError(f"vfio selftests: lib/libvfio.mk has no {MK_ANCHOR!r} line to add the driver before")
    if TABLE_ANCHOR not in driver_table:
        raise SetupError(f"vfio selftests: lib/vfio_pci_driver.c has no driver table ({TABLE_ANCHOR!r})")
    mk = libvfio_mk.replace(MK_ANCHOR, f"LIBVFIO_C += drivers/{DRIVER}/{DRIVER}.c\n\n{MK_ANCHOR}", 1)
    table = driver_table.replace(
        TABLE_ANCHOR, f"extern struct vfio_pci_driver_ops {DRIVER}_ops;\n\n{TABLE_ANCHOR}\n\t&{DRIVER}_ops,", 1)
    return mk, table


def prepare_tree(src: Path, dest: Path, driver: Sequence[Path]) -> Path:
    """Copy the selftests' part of ``src`` to ``dest`` with the engine's driver (its
    files ``driver``, the .c first) registered; returns the copy's vfio folder."""
    shutil.rmtree(dest, ignore_errors=True)
    for part in TREE_PARTS:
        s, d = src / part, dest / part
        if not s.exists():
            raise SetupError(f"vfio selftests: {s} missing from the kernel tree")
        d.parent.mkdir(parents=True, exist_ok=True)
        if s.is_dir():
            shutil.copytree(s, d)  # its links point into the rest of the tree: copy their files
        else:
            shutil.copy2(s, d)
    vfio = dest / VFIO
    (vfio / "lib/drivers" / DRIVER).mkdir(parents=True)
    for f in driver:
        shutil.copy2(f, vfio / "lib/drivers" / DRIVER / f.name)
    mk, table = register_driver((vfio / "lib/libvfio.mk").read_text(), (vfio / "lib/vfio_pci_driver.c").read_text())
    (vfio / "lib/libvfio.mk").write_text(mk)
    (vfio / "lib/vfio_pci_driver.c").write_text(table)
    return vfio


def selftest_names(makefile: str) -> list[str]:
    """The selftests the Makefile builds (its ``TEST_GEN_PROGS``)."""
    return re.findall(r"^TEST_GEN_PROGS\s*\+?=\s*(\S+)", makefile, re.M)


def fetch_uuid(work: Path, root: ToolRoot) -> Path:
    """libuuid's arm64 headers and static library unpacked under ``work`` (a folder the
    tool root sees); returns the unpacked root."""
    root.ensure_arm64()
    pkgs = " ".join(f"{p}:arm64" for p in UUID_PACKAGES)
    out = work / "uuid"
    w = shlex.quote(str(work))
    root.run(f"mkdir -p {w}/deb {w}/uuid && cd {w}/deb && apt-get download -qq {pkgs} && "
             f"for f in *.deb; do dpkg-deb -x \"$f\" {w}/uuid; done", timeout=900, binds=[work])
    if not list(out.glob("usr/lib/aarch64-linux-gnu/libuuid.a")):
        raise SetupError(f"vfio selftests: no arm64 libuuid.a in {' '.join(UUID_PACKAGES)}")
    return out


def build_vfio_selftests(src: Path, uapi: Path, work: Path, recipe: Path, root: ToolRoot,
                         progress: Progress, *, binds: Sequence[Path]) -> dict[str, Path]:
    """Cross-build the VFIO selftests of ``src`` with the engine's driver in ``work``
    (under a folder in ``binds``, which the tool root sees); ``vfio-selftests/<name>``
    (the path under the guest's /bin) -> static binary."""
    tree = prepare_tree(src, work / "tree", driver_sources(recipe))
    uuid = fetch_uuid(work, root)
    out = work / "out"
    out.mkdir(parents=True, exist_ok=True)
    names = selftest_names((tree / "Makefile").read_text())
    progress(f"[image] building the kernel's VFIO selftests ({', '.join(names)}) with the "
             f"{DRIVER} driver")
    q = shlex.quote
    make_vars = {
        "ARCH": "arm64", "CROSS_COMPILE": CROSS, "OUTPUT": str(out),
        "KHDR_INCLUDES": f"-isystem {uapi}",
        "EXTRA_CFLAGS": f"-I{uuid}/usr/include",
        "LDFLAGS": f"-static -pthread -L{uuid}/usr/lib/aarch64-linux-gnu",
    }
    args = " ".join(f"{k}={q(v)}" for k, v in make_vars.items())
    root.run(f"make -C {q(str(tree))} -s -j2 {args} > {q(str(work / 'build.log'))} 2>&1 || "
             f"{{ tail -n 30 {q(str(work / 'build.log'))} >&2; exit 1; }}", timeout=1800, binds=list(binds))
    programs: dict[str, Path] = {}
    for name in names:
        binary = out / name
        if not binary.is_file():
            raise SetupError(f"vfio selftests: the build produced no {name} (log: {work / 'build.log'})")
        root.run(f"{CROSS}strip {q(str(binary))}", timeout=120, binds=list(binds))
        programs[f"{GUEST_DIR}/{name}"] = binary
    return programs


# -- what the results mean on this machine -----------------------------------------------
@dataclass(frozen=True)
class SkipCause:
    reason: re.Pattern[str]  # the test's own SKIP text
    why: str  # what on this machine makes it so


@dataclass(frozen=True)
class Unchecked:
    tests: re.Pattern[str]  # the results it concerns
    evidence: re.Pattern[str]  # an output line that shows the check ran
    check: str
    why: str


SKIP_CAUSES = (
    SkipCause(re.compile(r"Driver does not support send_msi"),
              f"{DRIVER} has no send_msi(): QEMU delivers a vfio-user device's MSIs itself, untranslated, "
              "and every domain the selftests attach translates, so the MSI would never reach the eventfd"),
    SkipCause(re.compile(r"^mmap\(\) failed: Invalid argument"),
              "no HugeTLB pages in the guest (CONFIG_HUGETLBFS is not set in the project's kernel fragments)"),
    SkipCause(re.compile(r"^BAR too small"), "the engine's only BAR (BAR0) is 4 KiB, one page"),
    SkipCause(re.compile(r"^MSI: not supported"), "the engine has MSI-X (2 vectors) and no MSI capability"),
    SkipCause(re.compile(r"^SR-IOV may not be supported by the PF"), "the engine has no SR-IOV capability"),
)
UNCHECKED = (
    Unchecked(re.compile(r"^vfio_dma_mapping_test\..*\.dma_map_unmap$"),
              re.compile(r"^Found IOMMU mappings for IOVA"),
              "IOMMU page-table levels of the mapping",
              "read from /sys/kernel/debug/iommu/intel/<bdf>/domain_translation_struct: Intel VT-d only; "
              "elsewhere (arm-smmu-v3 here) the test maps and unmaps without it"),
)


def skip_cause(reason: str) -> str:
    """Why this machine made a test skip itself with ``reason`` ("" if the project does
    not know)."""
    return next((c.why for c in SKIP_CAUSES if c.reason.search(reason)), "")


def unchecked(run: KtapRun) -> list[tuple[Unchecked, list[str]]]:
    """The checks of :data:`UNCHECKED` that passed tests of ``run`` left out: (what, test names)."""
    out = []
    for u in UNCHECKED:
        names = [r.name for r in run.by_status("pass") if u.tests.search(r.name)
                 and not any(u.evidence.search(line) for line in r.output)]
        if names:
            out.append((u, names))
    return out


def summary_lines(runs: dict[str, KtapRun], rcs: dict[str, int]) -> list[str]:
    """The boot summary's lines for the selftests: per program the counts, then every
    failure, the skips grouped by reason (with the cause here) and the unchecked checks."""
    lines = []
    for program, run in runs.items():
        c = run.counts()
        lines.append(f"  vfio selftest {program} (rc {rcs.get(program, '?')}): {len(run.results)} tests, "
                     + ", ".join(f"{k} {v}" for k, v in c.items() if v or k in ("pass", "fail", "skip")))
        lines += [f"    problem: {p}" for p in run.problems()]
        if run.skipped is not None:
            cause = skip_cause(run.skipped)
            lines.append(f"    skipped entirely by the program: {run.skipped!r}" + (f" -- {cause}" if cause else ""))
        for r in run.by_status("fail") + run.by_status("error"):
            lines.append(f"    FAILED {r.name}" + (f": {r.reason}" if r.reason else ""))
        by_reason: dict[str, list[KtapResult]] = {}
        for r in run.by_status("skip"):
            by_reason.setdefault(r.reason, []).append(r)
        for reason, rs in by_reason.items():
            cause = skip_cause(reason)
            lines.append(f"    skipped x{len(rs)} by the test: {reason!r}" + (f" -- {cause}" if cause else ""))
        for u, names in unchecked(run):
            lines.append(f"    not checked in {len(names)} passing test(s): {u.check} ({u.why})")
    return lines
