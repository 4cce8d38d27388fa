"""Guest kernels built from source, cached by recipe.

Debian's packaged arm64 kernels have neither IOMMUFD nor ARM_SMMU_V3_SVA, so the paths
that need them run on kernels this module builds:

- ``[kernel] build = "6.12"`` (or another key of :data:`DEBIAN_SOURCES`): Debian's
  ``linux-source-<ver>`` package, installed in the tool root and unpacked once;
- ``[kernel] source = "/path/to/linux"``: a user's tree (built out of tree, so it must be
  clean: ``make mrproper``), bind-mounted into the tool root at the same path.

Both are configured from ``tinyconfig`` plus the project's fragment
(``guest_images/kernel/viommu.config``) plus the config's own ``fragments``, merged with
the kernel's ``scripts/kconfig/merge_config.sh`` and ``olddefconfig``, and cross-built in
the tool root with Debian's ``gcc-aarch64-linux-gnu``: ``Image``, ``modules``, the uapi
``headers`` (for guest programs) and ``modules_install``.  The result lives under
``<cache>/kernels/<key>/`` (the key hashes the builder version, the source and the
fragments' text; a tree's key also hashes its git HEAD and uncommitted diff) with a
``manifest.json`` naming source package and version, fragments, compiler and the options
that did not come out as the fragments asked.  The build folder is kept: the project's
guest modules and programs are built against it (:func:`build_guest_extras`).

tuxmake (the ecosystem's build wrapper) is not used: its ``null`` runtime wants the cross
toolchain on the host's PATH, while here it lives in the Debian tool root (the host may be
Debian 12), and its container runtimes are not available; the build is the four ``make``
calls above.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from viommu_backend.config import DEBIAN_SOURCES, KernelConfig
from viommu_backend.guest.toolroot import SetupError, ToolRoot, cache_dir, cache_lock
from viommu_backend.guest.vfio_selftests import build_vfio_selftests, has_vfio_selftests

Progress = Callable[[str], None]
BUILDER_VERSION = 1
KBUILD_PACKAGES = ("gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross", "gcc", "libc6-dev", "make",
                   "flex", "bison", "bc", "libssl-dev", "cpio", "kmod", "xz-utils", "python3")
CROSS = "aarch64-linux-gnu-"
MAKE_ENV = f"export ARCH=arm64 CROSS_COMPILE={CROSS}"
# Options without which a built kernel cannot run the project's workloads at all.
REQUIRED = {"CONFIG_ARM_SMMU_V3": "y", "CONFIG_PCI_HOST_GENERIC": "y", "CONFIG_MODULES": "y",
            "CONFIG_BLK_DEV_INITRD": "y"}


def recipe_root() -> Path:
    """``guest_images/`` of this checkout (or ``$VIOMMU_GUEST_IMAGES``)."""
    env = os.environ.get("VIOMMU_GUEST_IMAGES")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "guest_images"


def fragments(kernel: KernelConfig) -> list[Path]:
    """The project's fragment, then the config's own, in merge order."""
    base = recipe_root() / "kernel" / "viommu.config"
    if not base.is_file():
        raise SetupError(f"kernel config fragment {base} missing")
    for f in kernel.fragments:
        if not f.is_file():
            raise SetupError(f"kernel config fragment {f} not found")
    return [base, *kernel.fragments]


def parse_fragment(text: str) -> dict[str, str]:
    """``CONFIG_X=v`` and ``# CONFIG_X is not set`` (= "n") lines of a fragment / .config."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"^(CONFIG_\w+)=(.*)$", line.strip())
        if m:
            out[m.group(1)] = m.group(2).strip('"')
            continue
        m = re.match(r"^# (CONFIG_\w+) is not set$", line.strip())
        if m:
            out[m.group(1)] = "n"
    return out


def config_mismatches(wanted: dict[str, str], got: dict[str, str]) -> dict[str, str]:
    """Options the fragments asked for that olddefconfig did not keep: name -> "want/got"."""
    return {k: f"{v}/{got.get(k, 'n')}" for k, v in wanted.items() if got.get(k, "n") != v}


def _tree_identity(tree: Path) -> str:
    """What a user's tree holds: git HEAD + a hash of the uncommitted diff, else the
    newest modification time under it."""
    try:
        head = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=60, check=True).stdout.strip()
        diff = subprocess.run(["git", "-C", str(tree), "diff", "HEAD"], capture_output=True,
                              timeout=300, check=True).stdout
        return f"git {head} diff {hashlib.sha256(diff).hexdigest()[:16]}"
    except (OSError, subprocess.SubprocessError):
        newest = max((p.stat().st_mtime_ns for p in tree.rglob("*") if p.is_file()), default=0)
        return f"mtime {newest}"


def kernel_key(kernel: KernelConfig) -> str:
    """The cache key of a built kernel (no network: the Debian version is resolved at
    build time and recorded in the manifest)."""
    h = hashlib.sha256(f"kbuilder={BUILDER_VERSION}\n".encode())
    if kernel.build is not None:
        h.update(f"debian linux-source-{kernel.build}\n".encode())
    elif kernel.source is not None:
        h.update(f"tree {kernel.source} {_tree_identity(kernel.source)}\n".encode())
    else:
        raise SetupError("kernel_key: the config builds no kernel")
    for f in fragments(kernel):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class KernelBuild:
    """A built kernel: ``src`` (the tree), ``build`` (its O= folder, kept for module
    builds), the installed modules under ``modroot`` and the manifest."""

    directory: Path
    src: Path
    manifest: dict

    @property
    def build(self) -> Path:
        return self.directory / "build"

    @property
    def image(self) -> Path:
        return self.build / "arch/arm64/boot/Image"

    @property
    def release(self) -> str:
        return str(self.manifest["kernel_release"])

    @property
    def modroot(self) -> Path:
        return self.directory / "modroot"

    @property
    def uapi(self) -> Path:
        return self.build / "usr/include"

    @property
    def config_text(self) -> str:
        return (self.build / ".config").read_text()


def _kernels(cache: Path) -> Path:
    return cache / "kernels"


def cached_kernel(kernel: KernelConfig, cache: Path | None = None) -> KernelBuild | None:
    d = _kernels(cache or cache_dir()) / kernel_key(kernel)
    mf = d / "manifest.json"
    if not mf.is_file():
        return None
    manifest = json.loads(mf.read_text())
    kb = KernelBuild(d, Path(manifest["src"]), manifest)
    return kb if kb.image.is_file() and kb.src.is_dir() else None


def ensure_kernel(kernel: KernelConfig, *, cache: Path | None = None, root: ToolRoot | None = None,
                  progress: Progress = print) -> KernelBuild:
    """The built kernel for ``kernel``, built first if it is not cached."""
    cache = cache or cache_dir()
    found = cached_kernel(kernel, cache)
    if found:
        return found
    with cache_lock(cache, "kernel"):
        found = cached_kernel(kernel, cache)
        if found:
            return found
        return _build(kernel, cache, root or ToolRoot(cache), progress)


# -- the build ----------------------------------------------------------------------------
def ensure_build_tools(root: ToolRoot, progress: Progress) -> None:
    """The cross toolchain and kernel build tools in the tool root (once)."""
    stamp = root.path / ".viommu-kbuild-ok"
    want = " ".join(KBUILD_PACKAGES)
    if stamp.is_file() and stamp.read_text().strip() == want:
        return
    progress(f"[kernel] installing the cross toolchain and build tools in the tool root: {want}")
    t0 = time.monotonic()
    root.run(f"apt-get update -qq && apt-get install -y -qq {want} >/dev/null", timeout=1800)
    stamp.write_text(want + "\n")
    progress(f"[kernel] build tools ready in {time.monotonic() - t0:.0f} s")


def debian_source(build: str, cache: Path, root: ToolRoot, progress: Progress) -> tuple[Path, dict]:
    """Install ``linux-source-<build>`` in the tool root and unpack it once under the
    cache; returns the tree and what it is (source, version, Debian release)."""
    pkg = f"linux-source-{build}"
    release = DEBIAN_SOURCES[build]
    if not root.bootstrapped:
        root.ensure(progress)
    cp = root.run(f"dpkg-query -W -f '${{Version}}' {pkg} 2>/dev/null || true", timeout=60)
    if not cp.stdout.strip():
        progress(f"[kernel] installing {pkg} from Debian {release} in the tool root (~150 MB)")
        t0 = time.monotonic()
        root.run(f"apt-get install -y -qq -t {release} {pkg} >/dev/null", timeout=3600)
        progress(f"[kernel] {pkg} installed in {time.monotonic() - t0:.0f} s")
    version = root.run(f"dpkg-query -W -f '${{Version}}' {pkg}", timeout=60).stdout.strip()
    src = _kernels(cache) / "src" / f"{pkg}_{version}"
    if not (src / ".viommu-unpacked").is_file():
        tarball = root.path / "usr/src" / f"{pkg}.tar.xz"
        if not tarball.is_file():
            raise SetupError(f"{pkg} installed but {tarball} is missing")
        progress(f"[kernel] unpacking {tarball.name} ({tarball.stat().st_size >> 20} MiB)")
        t0 = time.monotonic()
        tmp = src.with_name(src.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        subprocess.run(["tar", "-xJf", str(tarball), "-C", str(tmp), "--strip-components=1"],
                       check=True, timeout=1800)
        (tmp / ".viommu-unpacked").write_text(version + "\n")
        shutil.rmtree(src, ignore_errors=True)
        tmp.rename(src)
        progress(f"[kernel] unpacked in {time.monotonic() - t0:.0f} s")
    return src, {"source": f"debian {pkg}", "source_version": version, "debian_release": release}


def _build(kernel: KernelConfig, cache: Path, root: ToolRoot, progress: Progress) -> KernelBuild:
    t0 = time.monotonic()
    key = kernel_key(kernel)
    if not root.bootstrapped:
        root.ensure(progress)
    ensure_build_tools(root, progress)
    if kernel.build is not None:
        src, origin = debian_source(kernel.build, cache, root, progress)
    else:
        assert kernel.source is not None
        src = kernel.source.resolve()
        if not (src / "Makefile").is_file() or not (src / "arch/arm64").is_dir():
            raise SetupError(f"{src}: not a Linux source tree (no Makefile / arch/arm64)")
        if (src / ".config").exists():
            raise SetupError(f"{src}: the tree has a .config; it is built out of tree (O=): "
                             "run `make mrproper` in it first")
        origin = {"source": f"tree {src}", "source_version": _tree_identity(src)}
    frags = fragments(kernel)
    final = _kernels(cache) / key
    work = final.with_name(key + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    (work / "build").mkdir(parents=True)
    (work / "fragments").mkdir()
    for i, f in enumerate(frags):  # copies inside the bind-mounted cache for the chroot
        shutil.copy(f, work / "fragments" / f"{i:02d}-{f.name}")
    b, frag_args = work / "build", " ".join(
        shlex.quote(str(p)) for p in sorted((work / "fragments").iterdir()))
    binds = [_kernels(cache)] + ([src] if kernel.source is not None else [])
    jobs = os.cpu_count() or 2
    make = f"make -C {shlex.quote(str(src))} O={shlex.quote(str(b))}"
    progress(f"[kernel] configuring {origin['source']} {origin['source_version']}: tinyconfig + "
             + ", ".join(f.name for f in frags))
    root.run(f"{MAKE_ENV}; {make} -s tinyconfig && cd {shlex.quote(str(src))} && "
             f"scripts/kconfig/merge_config.sh -m -O {shlex.quote(str(b))} {shlex.quote(str(b))}/.config "
             f"{frag_args} >/dev/null && {make} -s olddefconfig", timeout=600, binds=binds)
    got = parse_fragment((b / ".config").read_text())
    wanted: dict[str, str] = {}
    for f in frags:
        wanted.update(parse_fragment(f.read_text()))
    missing = config_mismatches(REQUIRED, got)
    if missing:
        raise SetupError(f"kernel config unusable after olddefconfig: {missing} (want/got)")
    mismatches = config_mismatches(wanted, got)
    if mismatches:
        progress(f"[kernel] note: options not as the fragments ask (want/got): {mismatches}")
    progress(f"[kernel] building Image and modules with make -j{jobs} (~5 min on 2 cores)")
    root.run_logged(f"{MAKE_ENV}; {make} -j{jobs} Image modules && {make} -s headers && "
                    f"{make} -s modules_install INSTALL_MOD_PATH={shlex.quote(str(work / 'modroot'))} "
                    "INSTALL_MOD_STRIP=1", log=work / "build.log", label="[kernel] make",
                    progress=progress, timeout=7200, binds=binds)
    kernel_release = root.run(f"{MAKE_ENV}; {make} -s kernelrelease", timeout=120,
                              binds=binds).stdout.strip().splitlines()[-1]
    compiler = root.run(f"{CROSS}gcc --version | head -n 1", timeout=60).stdout.strip()
    manifest = {
        **origin, "key": key, "builder": BUILDER_VERSION, "src": str(src),
        "fragments": {f.name: hashlib.sha256(f.read_bytes()).hexdigest()[:16] for f in frags},
        "compiler": compiler, "kernel_release": kernel_release,
        "config_mismatches": mismatches, "build_seconds": round(time.monotonic() - t0, 1),
        "image_bytes": (b / "arch/arm64/boot/Image").stat().st_size, "built_at": time.time(),
    }
    (work / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    work.rename(final)
    progress(f"[kernel] {kernel_release} built in {time.monotonic() - t0:.0f} s ({final})")
    return KernelBuild(final, src, manifest)


# -- the project's guest modules and programs, built against a kernel ---------------------------
@dataclass(frozen=True)
class GuestExtras:
    """Built against one kernel: ``modroot`` (the kernel's modules plus the project's, as
    extra/<name>.ko, depmod'ed) and ``programs`` (name -> static arm64 binary)."""

    modroot: Path
    programs: dict[str, Path]
    modules: list[str]


def extras_sources() -> list[Path]:
    """Every file the project's guest modules and programs are built from (for hashes)."""
    root = recipe_root()
    return sorted(p for d in ("modules", "programs", "vfio_selftests") if (root / d).is_dir()
                  for p in (root / d).rglob("*") if p.is_file())


def build_guest_extras(kb: KernelBuild, work: Path, root: ToolRoot, progress: Progress,
                       *, cache: Path) -> GuestExtras:
    """Build ``guest_images/modules/<name>/`` (out-of-tree modules),
    ``guest_images/programs/<name>.c`` (static programs, uapi headers of this kernel and
    of the project's modules) and, when the tree has them, the kernel's VFIO selftests
    with the engine's driver (:mod:`.vfio_selftests`) into
    ``work``, which must lie under ``<cache>/kernels`` (the folder the tool root sees)."""
    rec = recipe_root()
    if not str(work.resolve()).startswith(str(_kernels(cache).resolve()) + "/"):
        raise SetupError(f"{work}: guest extras must be built under {_kernels(cache)}")
    shutil.rmtree(work, ignore_errors=True)
    modroot = work / "modroot"
    shutil.copytree(kb.modroot, modroot, symlinks=True)
    moddir = modroot / "lib/modules" / kb.release
    binds = [_kernels(cache)] + ([kb.src] if not str(kb.src).startswith(str(_kernels(cache))) else [])
    make = f"make -C {shlex.quote(str(kb.src))} O={shlex.quote(str(kb.build))}"
    built: list[str] = []
    for mdir in sorted((rec / "modules").glob("*/")) if (rec / "modules").is_dir() else []:
        dest = work / "modules" / mdir.name
        shutil.copytree(mdir, dest)
        progress(f"[image] building guest module {mdir.name} against {kb.release}")
        root.run(f"{MAKE_ENV}; {make} M={shlex.quote(str(dest))} -s modules", timeout=900, binds=binds)
        kos = sorted(dest.glob("*.ko"))
        if not kos:
            raise SetupError(f"guest module {mdir.name}: the build produced no .ko")
        (moddir / "extra").mkdir(parents=True, exist_ok=True)
        for ko in kos:
            shutil.copy(ko, moddir / "extra" / ko.name)
            built.append(ko.stem)
    if built:
        root.run(f"depmod -b {shlex.quote(str(modroot))} {shlex.quote(kb.release)}", timeout=300,
                 binds=binds)
    # a program may include a module's uapi header (guest_images/modules/<name>/*.h)
    includes = sorted((work / "modules").glob("*/"))
    programs = build_guest_programs(work / "programs", root, progress, uapi=kb.uapi, includes=includes,
                                    binds=binds)
    if has_vfio_selftests(kb.src):  # the kernel's own VFIO selftests, with the engine's driver
        programs |= build_vfio_selftests(kb.src, kb.uapi, work / "vfio_selftests", rec, root, progress,
                                         binds=binds)
    return GuestExtras(modroot, programs, built)


def build_guest_programs(work: Path, root: ToolRoot, progress: Progress, *, uapi: Path | None = None,
                         includes: Sequence[Path] = (), binds: Sequence[Path] = ()) -> dict[str, Path]:
    """``guest_images/programs/<name>.c`` -> static arm64 binaries in ``work`` (a folder the
    tool root sees), compiled against ``uapi`` (a built kernel's headers) or, without it,
    the cross toolchain's own (Debian's linux-libc-dev-arm64-cross: the packaged kernels'
    series), with ``includes`` (e.g. the project's modules' uapi headers) on the path."""
    rec = recipe_root() / "programs"
    inc = " ".join(f"-I{shlex.quote(str(d))}" for d in ([uapi] if uapi is not None else []) + list(includes))
    programs: dict[str, Path] = {}
    for c in sorted(rec.glob("*.c")) if rec.is_dir() else []:
        work.mkdir(parents=True, exist_ok=True)
        shutil.copytree(c.parent, work / "src", dirs_exist_ok=True)
        out = work / c.stem
        progress(f"[image] building guest program {c.stem}")
        root.run(f"{CROSS}gcc -static -O2 -Wall -Werror {inc} -I{shlex.quote(str(work / 'src'))} "
                 f"-o {shlex.quote(str(out))} {shlex.quote(str(work / 'src' / c.name))} && "
                 f"{CROSS}strip {shlex.quote(str(out))}", timeout=600, binds=list(binds))
        programs[c.stem] = out
    return programs


def packaged_kernel_programs(cache: Path, tag: str, root: ToolRoot,
                             progress: Progress) -> tuple[dict[str, Path], Path]:
    """The guest programs for a packaged (not built) kernel, built in a scratch folder of
    the kernel cache named by ``tag``: (name -> binary, the folder to remove after use)."""
    ensure_build_tools(root, progress)  # the cross compiler and the arm64 libc
    work = _kernels(cache) / f"programs-{tag}"
    shutil.rmtree(work, ignore_errors=True)
    mods = recipe_root() / "modules"
    includes = []
    for mdir in sorted(mods.glob("*/")) if mods.is_dir() else []:  # the modules' uapi headers
        shutil.copytree(mdir, work / "modules" / mdir.name)
        includes.append(work / "modules" / mdir.name)
    programs = build_guest_programs(work / "programs", root, progress, includes=includes,
                                    binds=[_kernels(cache)])
    return programs, work

