"""Build the arm64 guest image: Debian's kernel + a busybox initramfs.

Recipe (``guest_images/``): ``packages.txt`` (extra arm64 Debian packages, busybox-static)
and ``init.sh`` (the guest's /init).  The kernel comes from Debian's
``linux-image-<flavour>`` for the chosen suite (default trixie 6.12 LTS, cloud-arm64), or
from the user (an uncompressed Image + a modules folder).  Exact package versions are
resolved at build time (``apt-cache`` in the tool root) and written to ``manifest.json``
next to the image.  Images are cached under ``<cache>/images/<recipe hash>/``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from viommu_backend.config import KernelConfig
from viommu_backend.guest.kernel import (GuestExtras, KernelBuild, build_guest_extras, ensure_kernel,
                                         extras_sources, kernel_key, packaged_kernel_programs)
from viommu_backend.guest.toolroot import SetupError, ToolRoot, cache_dir, cache_lock

Progress = Callable[[str], None]
BUILDER_VERSION = 3  # 3: kernels built from source, programs, more recorded options
REQUIRED_CONFIG = {"CONFIG_ARM_SMMU_V3": "y", "CONFIG_PCI_HOST_GENERIC": "y"}
RECORDED_CONFIG = (
    "CONFIG_ARM_SMMU_V3", "CONFIG_ARM_SMMU_V3_SVA", "CONFIG_PCI_HOST_GENERIC", "CONFIG_OF_OVERLAY",
    "CONFIG_OF_DYNAMIC", "CONFIG_IOMMUFD", "CONFIG_VFIO", "CONFIG_VIRTIO_PCI",
    "CONFIG_STRICT_DEVMEM", "CONFIG_IO_STRICT_DEVMEM", "CONFIG_IOMMU_DEFAULT_DMA_STRICT",
    "CONFIG_HOTPLUG_PCI_PCIE", "CONFIG_PCIEPORTBUS", "CONFIG_MODULE_SIG_FORCE", "CONFIG_ARM_GIC_V3_ITS", "CONFIG_PCI_MSI",
    "CONFIG_PCI_PRI", "CONFIG_PCI_ATS", "CONFIG_PCI_PASID", "CONFIG_IOMMU_SVA", "CONFIG_IOMMU_IOPF",
    "CONFIG_VFIO_PCI", "CONFIG_VFIO_DEVICE_CDEV", "CONFIG_VFIO_CONTAINER",
)
ARM64_IMAGE_MAGIC = b"ARM\x64"  # at offset 0x38 of an arm64 Image


def recipe_dir() -> Path:
    env = os.environ.get("VIOMMU_GUEST_IMAGES")
    d = Path(env) if env else Path(__file__).resolve().parents[2] / "guest_images"
    if not (d / "init.sh").exists():
        raise SetupError(f"guest image recipe not found at {d} (set $VIOMMU_GUEST_IMAGES)")
    return d


def read_package_list(path: Path) -> list[str]:
    names = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    return names


@dataclass(frozen=True)
class GuestImage:
    kernel: Path  # uncompressed arm64 Image for -kernel
    initrd: Path  # gzip'd cpio
    manifest: dict
    directory: Path

    @property
    def kernel_version(self) -> str:
        return self.manifest.get("kernel_version", "?")


# --- cpio (newc) ----------------------------------------------------------------------
class CpioWriter:
    """A minimal SVR4 ``newc`` cpio archive writer (what the kernel's initramfs takes)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1
        self.seen: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        name = name.lstrip("/")
        if name in self.seen:
            raise ValueError(f"cpio: duplicate entry {name}")
        self.seen.add(name)
        nb = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0]
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.ino += 1
        self.buf.write(hdr + nb)
        self.buf.write(b"\0" * (-(len(hdr) + len(nb)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            p = "/".join(parts[:i])
            if p not in self.seen:
                self._entry(p, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        parent = os.path.dirname(name.strip("/"))
        if parent:
            self.dir(parent)
        self._entry(name, stat.S_IFREG | mode, data)

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        data = self.buf.getvalue()
        return data + b"\0" * (-len(data) % 512)


# --- kernel config / modules ----------------------------------------------------------
def parse_kconfig(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"^(CONFIG_\w+)=(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip('"')
            continue
        m = re.match(r"^# (CONFIG_\w+) is not set$", line)
        if m:
            out[m.group(1)] = "n"
    return out


def check_kconfig(cfg: dict[str, str]) -> dict[str, str]:
    """The recorded options (absent = "n"); raises if a required one is missing."""
    bad = [f"{k}={cfg.get(k, 'n')} (need {v})" for k, v in REQUIRED_CONFIG.items() if cfg.get(k) != v]
    if bad:
        raise SetupError("guest kernel config unusable: " + ", ".join(bad))
    return {k: cfg.get(k, "n") for k in RECORDED_CONFIG}


def load_ko(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        raise SetupError(f"{path}: zstd-compressed modules are not supported; decompress them")
    return data


def module_closure(moddir: Path, names: Iterable[str]) -> list[str]:
    """Module file paths (relative to ``moddir``) for ``names`` and their dependencies,
    dependencies first, from ``modules.dep``."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    dep_file = moddir / "modules.dep"
    if not dep_file.exists():
        if (moddir / "kernel").is_dir():  # a Debian package: depmod never ran
            return _modinfo_closure(moddir, names)
        raise SetupError(f"{dep_file} missing: not a kernel modules folder")
    for line in dep_file.read_text().splitlines():
        if ":" not in line:
            continue
        mod, rest = line.split(":", 1)
        deps[mod] = rest.split()
        base = os.path.basename(mod).split(".ko")[0]
        by_name[base] = mod
        by_name[base.replace("-", "_")] = mod
    order: list[str] = []

    def visit(mod: str, stack: tuple[str, ...]) -> None:
        if mod in order or mod in stack:
            return
        for d in deps.get(mod, []):
            visit(d, stack + (mod,))
        order.append(mod)

    for n in names:
        mod = by_name.get(n) or by_name.get(n.replace("-", "_"))
        if mod is None:
            raise SetupError(f"guest module {n!r} not found in {dep_file} (built in, or misspelt?)")
        visit(mod, ())
    return order


def modinfo_depends(ko: bytes) -> list[str]:
    """The ``depends=`` list of a (decompressed) module's .modinfo strings."""
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", ko)
    return [d for d in m.group(1).decode().split(",") if d] if m else []


def _modinfo_closure(moddir: Path, names: Iterable[str]) -> list[str]:
    """:func:`module_closure` without modules.dep (as Debian's packages ship the tree):
    dependencies from each module's own ``depends=``."""
    files: dict[str, str] = {}
    for f in moddir.rglob("*.ko*"):
        base = f.name.split(".ko")[0].replace("-", "_")
        files.setdefault(base, str(f.relative_to(moddir)))
    order: list[str] = []

    def visit(name: str, stack: tuple[str, ...]) -> None:
        rel = files.get(name.replace("-", "_"))
        if rel is None:
            raise SetupError(f"guest module {name!r} not found under {moddir} (built in, or misspelt?)")
        if rel in order or rel in stack:
            return
        for d in modinfo_depends(load_ko(moddir / rel)):
            visit(d, stack + (rel,))
        order.append(rel)

    for n in names:
        visit(n, ())
    return order


def decompress_kernel(data: bytes) -> bytes:
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if data[0x38:0x3C] != ARM64_IMAGE_MAGIC:
        raise SetupError("guest kernel is not an arm64 Image (no ARM\\x64 magic at 0x38)")
    return data


# --- build ----------------------------------------------------------------------------
def recipe_hash(kernel: KernelConfig, modules: Sequence[str]) -> str:
    d = recipe_dir()
    h = hashlib.sha256()
    h.update(f"builder={BUILDER_VERSION}\n".encode())
    for name in ("init.sh", "packages.txt"):
        h.update(name.encode() + b"\0" + (d / name).read_bytes() + b"\0")
    if kernel.image:
        st = kernel.image.stat()
        h.update(f"user-kernel={kernel.image}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        h.update(f"user-modules={kernel.modules}\n".encode())
    else:
        if kernel.built:
            h.update(f"built-kernel={kernel_key(kernel)}\n".encode())
        else:
            h.update(f"suite={kernel.suite} flavour={kernel.flavour}\n".encode())
        for p in extras_sources():  # the project's guest modules and programs (programs
            h.update(str(p.relative_to(d)).encode() + b"\0" + p.read_bytes() + b"\0")  # in both)
    h.update(("modules=" + ",".join(modules)).encode())
    return h.hexdigest()[:16]


def cached_image(kernel: KernelConfig, modules: Sequence[str] = (), cache: Path | None = None) -> GuestImage | None:
    d = (cache or cache_dir()) / "images" / recipe_hash(kernel, modules)
    if (d / "manifest.json").exists() and (d / "Image").exists() and (d / "initrd.gz").exists():
        return GuestImage(d / "Image", d / "initrd.gz", json.loads((d / "manifest.json").read_text()), d)
    return None


def build_image(kernel: KernelConfig, modules: Sequence[str] = (), *, cache: Path | None = None,
                toolroot: ToolRoot | None = None, progress: Progress = print) -> GuestImage:
    """The cached image for this recipe, built first if needed."""
    cache = cache or cache_dir()
    found = cached_image(kernel, modules, cache)
    if found:
        return found
    with cache_lock(cache, "image"):
        found = cached_image(kernel, modules, cache)
        if found:
            return found
        return _build(kernel, list(modules), cache, toolroot or ToolRoot(cache), progress)


def _apt_resolve(root: ToolRoot, suite: str, start: Sequence[str]) -> dict[str, str]:
    """name -> candidate version (arm64) for ``start`` and the versioned ``linux-*``
    packages they depend on (sid splits the kernel into several)."""
    opt = f"-o APT::Default-Release={suite}"
    todo = list(start)
    found: dict[str, str] = {}
    while todo:
        name = todo.pop(0)
        if name in found:
            continue
        cp = root.run(f"apt-cache {opt} show --no-all-versions {name}:arm64", check=False, timeout=120)
        if cp.returncode or "Version:" not in cp.stdout:
            raise SetupError(f"arm64 package {name} not found in Debian {suite}: {cp.stderr.strip()[-300:]}")
        fields = dict(re.findall(r"^([A-Za-z-]+): ?(.*)$", cp.stdout, re.M))
        found[name] = fields["Version"]
        if name.startswith("linux-"):
            for dep in re.split(r"[,|]", fields.get("Depends", "")):
                dname = dep.strip().split(" ")[0].split(":")[0]
                if dname.startswith("linux-") and re.search(r"\d", dname):
                    todo.append(dname)
    return found


def _build(kernel: KernelConfig, modules: list[str], cache: Path, root: ToolRoot,
           progress: Progress) -> GuestImage:
    t0 = time.monotonic()
    rhash = recipe_hash(kernel, modules)
    final = cache / "images" / rhash
    work = cache / "images" / f"{rhash}.partial"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    manifest: dict = {"recipe_hash": rhash, "builder": BUILDER_VERSION, "built_at": time.time()}
    suite, versions = _resolve_packages(kernel, cache, root, progress)
    manifest["suite"] = suite
    manifest["packages"] = versions
    host_dl = _download_packages(root, rhash, versions, progress)
    x = host_dl / "x"
    scratch = [host_dl]  # removed once the image is written (or the build failed)
    try:
        busybox = x / "bin/busybox" if (x / "bin/busybox").exists() else x / "usr/bin/busybox"
        if not busybox.exists():
            raise SetupError("busybox-static:arm64 did not provide bin/busybox")
        k = _image_kernel(kernel, x, suite, rhash, cache, root, progress, manifest)
        scratch += k.scratch
        image_bytes = decompress_kernel(k.image.read_bytes())
        if k.config_text is not None:
            manifest["config"] = check_kconfig(parse_kconfig(k.config_text))
        else:
            manifest["config"] = None
            progress("[image] warning: no kernel config found; cannot check ARM_SMMU_V3=y")
        kver = k.moddir.name if k.moddir else _version_from_image(image_bytes)
        manifest["kernel_version"] = kver
        progress(f"[image] building initramfs (kernel {kver})")
        initramfs = _initramfs(busybox, modules, k, kver, manifest)
        (work / "Image").write_bytes(image_bytes)
        (work / "initrd.gz").write_bytes(gzip.compress(initramfs, compresslevel=6))
        manifest["sizes"] = {"Image": len(image_bytes), "initrd.gz": (work / "initrd.gz").stat().st_size}
        manifest["build_seconds"] = round(time.monotonic() - t0, 1)
        (work / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    finally:
        for d in scratch:
            shutil.rmtree(d, ignore_errors=True)
    if final.exists():
        shutil.rmtree(final)
    work.rename(final)
    progress(f"[image] {final} ready in {time.monotonic() - t0:.0f} s")
    return GuestImage(final / "Image", final / "initrd.gz", manifest, final)


def _resolve_packages(kernel: KernelConfig, cache: Path, root: ToolRoot,
                      progress: Progress) -> tuple[str, dict[str, str]]:
    """The Debian suite and the exact arm64 package versions (name -> version) the image
    takes: the recipe's packages and, for a packaged kernel, its linux-image."""
    if not root.bootstrapped:
        with cache_lock(cache, "toolroot"):
            if not root.bootstrapped:
                root._debootstrap(progress)
    root.ensure_arm64()
    suite = "trixie" if kernel.image is not None or kernel.built else kernel.suite
    progress(f"[image] resolving arm64 packages from Debian {suite}")
    root.apt_update()
    wanted = read_package_list(recipe_dir() / "packages.txt")
    if kernel.image is None and not kernel.built:
        wanted.insert(0, f"linux-image-{kernel.flavour}")
    return suite, _apt_resolve(root, suite, wanted)


def _download_packages(root: ToolRoot, rhash: str, versions: dict[str, str],
                       progress: Progress) -> Path:
    """Download and unpack the packages in the tool root: the folder (host path) whose
    ``x`` holds their files."""
    inside = f"/var/tmp/viommu-image-{rhash}"
    host_dl = root.path / inside.lstrip("/")
    shutil.rmtree(host_dl, ignore_errors=True)
    progress(f"[image] downloading {len(versions)} packages: "
             + ", ".join(f"{n}={v}" for n, v in versions.items()))
    pkgs = " ".join(f"{n}:arm64={v}" for n, v in versions.items())
    root.run(f"mkdir -p {inside}/deb {inside}/x && cd {inside}/deb && apt-get download -qq {pkgs}"
             f" && for f in *.deb; do dpkg-deb -x \"$f\" {inside}/x; done", timeout=1800)
    return host_dl


@dataclass
class _ImageKernel:
    """The kernel an image is built around."""

    image: Path
    config_text: str | None
    moddir: Path | None
    programs: dict[str, Path] = field(default_factory=dict)  # guest_images/programs, built
    scratch: list[Path] = field(default_factory=list)  # folders to remove after the build


def _image_kernel(kernel: KernelConfig, x: Path, suite: str, rhash: str, cache: Path,
                  root: ToolRoot, progress: Progress, manifest: dict) -> _ImageKernel:
    """Built from source (with the project's guest modules and programs), Debian's (from
    the packages unpacked in ``x``) or the user's; where it came from goes in ``manifest``."""
    if kernel.built:
        kb = ensure_kernel(kernel, cache=cache, root=root, progress=progress)
        extras = build_guest_extras(kb, kb.directory / f"extras-{rhash}", root, progress, cache=cache)
        k = _ImageKernel(kb.image, kb.config_text, extras.modroot / "lib/modules" / kb.release,
                         extras.programs, [extras.modroot.parent])
        manifest["kernel_source"] = f"built from {kb.manifest['source']} {kb.manifest['source_version']}"
        manifest["kernel_build"] = _kernel_build_record(kb, extras)
    elif kernel.image is None:
        k = _ImageKernel(*_find_debian_kernel(x))
        k.programs, scratch = packaged_kernel_programs(cache, rhash, root, progress)
        k.scratch.append(scratch)
        manifest["kernel_source"] = f"debian {suite} linux-image-{kernel.flavour}"
        manifest["flavour"] = kernel.flavour
    else:
        k = _ImageKernel(*_user_kernel(kernel))
        manifest["kernel_source"] = f"user {kernel.image}"
    return k


def _initramfs(busybox: Path, modules: list[str], k: _ImageKernel, kver: str,
               manifest: dict) -> bytes:
    """The cpio archive: /init, busybox, the requested modules with what they depend on
    (listed in /etc/viommu-modules) and the guest programs."""
    cpio = CpioWriter()
    for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "etc", "root", "lib/modules"):
        cpio.dir(d)
    cpio.file("init", (recipe_dir() / "init.sh").read_bytes(), 0o755)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    loaded = []
    if modules:
        if k.moddir is None:
            raise SetupError("guest modules requested but the kernel has no modules folder")
        for rel in module_closure(k.moddir, modules):
            dest = f"lib/modules/{kver}/" + re.sub(r"\.ko\.(xz|gz)$", ".ko", rel)
            cpio.file(dest, load_ko(k.moddir / rel))
            loaded.append("/" + dest)
    cpio.file("etc/viommu-modules", ("\n".join(loaded) + "\n").encode())
    manifest["modules"] = loaded
    for name, path in k.programs.items():
        cpio.file(f"bin/{name}", path.read_bytes(), 0o755)
    manifest["programs"] = sorted(k.programs)
    return cpio.finish()


def _kernel_build_record(kb: KernelBuild, extras: GuestExtras) -> dict:
    m = kb.manifest
    return {k: m[k] for k in ("key", "source", "source_version", "compiler", "fragments",
                              "config_mismatches", "kernel_release")} | {
        "directory": str(kb.directory), "guest_modules": extras.modules}


def _find_debian_kernel(x: Path) -> tuple[Path, str | None, Path | None]:
    mods = sorted((x / "usr/lib/modules").glob("*")) + sorted((x / "lib/modules").glob("*"))
    mods = [m for m in mods if m.is_dir()]
    moddir = mods[0] if mods else None
    candidates = sorted((x / "boot").glob("vmlinuz-*"))
    if moddir and (moddir / "vmlinuz").exists():
        candidates.insert(0, moddir / "vmlinuz")
    if not candidates:
        raise SetupError("no vmlinuz in the kernel packages (neither /boot nor /usr/lib/modules/<ver>)")
    cfgs = sorted((x / "boot").glob("config-*"))
    if moddir and (moddir / "config").exists():
        cfgs.insert(0, moddir / "config")
    return candidates[0], cfgs[0].read_text() if cfgs else None, moddir


def _user_kernel(kernel: KernelConfig) -> tuple[Path, str | None, Path | None]:
    assert kernel.image is not None
    if not kernel.image.is_file():
        raise SetupError(f"kernel image {kernel.image} not found")
    moddir = None
    if kernel.modules:
        moddir = kernel.modules
        if not (moddir / "modules.dep").exists():
            subs = [p for p in moddir.glob("*") if (p / "modules.dep").exists()]
            if len(subs) != 1:
                raise SetupError(f"{kernel.modules}: expected lib/modules/<version> with modules.dep")
            moddir = subs[0]
    cfg = None
    for p in ([moddir / "config"] if moddir else []) + sorted(kernel.image.parent.glob("config*")) + [
            kernel.image.parent / ".config"]:
        if p.is_file():
            cfg = p.read_text()
            break
    return kernel.image, cfg, moddir


def _version_from_image(image: bytes) -> str:
    m = re.search(rb"Linux version (\S+)", image)
    return m.group(1).decode() if m else "unknown"
