"""QEMU >= 10.1 (with ``vfio-user-pci``): from PATH, or from a Debian tool root.

On a host whose QEMU is too old (Debian 12 ships 7.2) we make a Debian *tool root* under
the cache with ``debootstrap --variant=minbase trixie`` and install ``qemu-system-arm``
from trixie-backports (falling back to sid) inside it.  QEMU then runs *without* chroot
through the tool root's own dynamic loader::

    <root>/lib64/ld-linux-x86-64.so.2 --library-path <root libs> \\
        <root>/usr/bin/qemu-system-aarch64 -L <root>/usr/share/qemu ...

so socket and image paths are the same on both sides.  If that does not work on a host,
:class:`QemuCommand` falls back to ``chroot <root>`` with the needed folders bind-mounted
at the same paths.

The tool root is also where arm64 Debian packages for the guest image are fetched
(``dpkg --add-architecture arm64`` + ``apt-get download``), see :mod:`.image`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

MIN_QEMU = (10, 1)
QEMU_BINARY = "qemu-system-aarch64"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
TOOLROOT_SUITE = "trixie"
LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu")
Progress = Callable[[str], None]


class SetupError(RuntimeError):
    """A set-up step failed; the message says which step and what to do."""


def cache_dir() -> Path:
    """``$VIOMMU_CACHE`` or ``~/.cache/viommu-backend``."""
    env = os.environ.get("VIOMMU_CACHE")
    return Path(env).expanduser().resolve() if env else Path.home() / ".cache" / "viommu-backend"


@contextlib.contextmanager
def cache_lock(cache: Path, name: str = "setup") -> Iterator[None]:
    """An exclusive lock so that concurrent set-ups (e.g. parallel tests) do not race."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def parse_qemu_version(text: str) -> tuple[int, int, int] | None:
    m = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", text)
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


@dataclass(frozen=True)
class QemuCommand:
    """How to start ``qemu-system-aarch64``: ``argv`` is the prefix (loader, binary, -L),
    ``env`` extra environment.  ``binds`` lists host folders a chroot route must see."""

    argv: tuple[str, ...]
    version: tuple[int, int, int]
    origin: str  # "path" | "toolroot" | "chroot"
    env: dict[str, str] = field(default_factory=dict)
    root: Path | None = None

    def command(self, *args: str) -> list[str]:
        return [*self.argv, *args]

    def environ(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        return env

    def describe(self) -> str:
        v = ".".join(map(str, self.version))
        return f"QEMU {v} ({self.origin}): {' '.join(self.argv)}"

    @contextlib.contextmanager
    def mounted(self, paths: Sequence[Path]) -> Iterator[None]:
        """For the chroot route: bind-mount ``paths`` into the root at the same place."""
        if self.origin != "chroot" or self.root is None:
            yield
            return
        with ExitMounts() as m:
            m.standard(self.root)
            for p in paths:
                m.bind(p, self.root)
            yield


def _run(cmd: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 60,
         check: bool = False) -> subprocess.CompletedProcess[str]:
    try:
        cp = subprocess.run(list(cmd), env=env, capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        if check:
            raise SetupError(f"{cmd[0]}: {e}") from None
        return subprocess.CompletedProcess(list(cmd), 127, "", str(e))
    if check and cp.returncode:
        tail = "\n".join((cp.stdout + cp.stderr).strip().splitlines()[-15:])
        raise SetupError(f"command failed ({cp.returncode}): {' '.join(cmd)}\n{tail}")
    return cp


def probe_qemu(argv: Sequence[str], env: dict[str, str] | None = None) -> tuple[int, int, int] | None:
    """Version of a QEMU if it is >= MIN_QEMU and has ``vfio-user-pci``, else None."""
    full_env = dict(os.environ, **(env or {}))
    cp = _run([*argv, "--version"], env=full_env, timeout=30)
    version = parse_qemu_version(cp.stdout) if cp.returncode == 0 else None
    if version is None or version[:2] < MIN_QEMU:
        return None
    cp = _run([*argv, "-device", "vfio-user-pci,help"], env=full_env, timeout=30)
    if cp.returncode != 0 or "socket" not in cp.stdout:
        return None
    return version


def qemu_from_path() -> QemuCommand | None:
    exe = shutil.which(QEMU_BINARY)
    if not exe:
        return None
    version = probe_qemu([exe])
    return QemuCommand((exe,), version, "path") if version else None


class ExitMounts(contextlib.ExitStack):
    """Mounts undone in reverse order on exit."""

    def _mount(self, args: list[str], target: Path) -> None:
        target.mkdir(parents=True, exist_ok=True)
        if is_mountpoint(target):
            return  # someone else (another process) holds it; leave it alone
        _run(["mount", *args, str(target)], check=True)
        self.callback(_run, ["umount", "-l", str(target)])

    def standard(self, root: Path) -> None:
        self._mount(["-t", "proc", "proc"], root / "proc")
        self._mount(["--bind", "/dev"], root / "dev")
        self._mount(["-t", "sysfs", "sysfs"], root / "sys")

    def bind(self, path: Path, root: Path) -> None:
        path = path.resolve()
        self._mount(["--bind", str(path)], root / str(path).lstrip("/"))


def _last_line(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1].strip()[:100] if lines else ""


def is_mountpoint(path: Path) -> bool:
    target = str(path.resolve())
    try:
        with open("/proc/self/mounts") as f:
            return any(line.split()[1] == target for line in f if len(line.split()) > 1)
    except OSError:
        return False


def mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()).rstrip("/") + "/"
    with open("/proc/self/mounts") as f:
        found = [line.split()[1] for line in f if len(line.split()) > 1]
    return sorted((m for m in found if m.startswith(prefix)), reverse=True)


def host_debian_mirror() -> str:
    """The Debian mirror the host's apt uses (``$VIOMMU_DEBIAN_MIRROR`` overrides)."""
    env = os.environ.get("VIOMMU_DEBIAN_MIRROR")
    if env:
        return env.rstrip("/")
    texts: list[str] = []
    for p in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        with contextlib.suppress(OSError):
            texts.append(p.read_text())
    for text in texts:
        for m in re.finditer(r"(https?://\S+?/debian)/?(?=\s|$)", text):
            return m.group(1)
    return DEFAULT_MIRROR


class ToolRoot:
    """A Debian trixie tool root under ``<cache>/toolroot``."""

    def __init__(self, cache: Path | None = None, mirror: str | None = None) -> None:
        self.cache = cache or cache_dir()
        self.path = self.cache / "toolroot"
        self.mirror = mirror or host_debian_mirror()
        self._arm64 = False

    # --- state ----------------------------------------------------------------------
    @property
    def bootstrapped(self) -> bool:
        return (self.path / ".viommu-debootstrap-ok").exists()

    @property
    def has_qemu(self) -> bool:
        return (self.path / ".viommu-qemu-ok").exists()

    def loader_argv(self) -> tuple[str, ...]:
        libs = ":".join(str(self.path / d) for d in LIB_DIRS)
        return (str(self.path / "lib64/ld-linux-x86-64.so.2"), "--library-path", libs)

    # --- running things inside --------------------------------------------------------
    _ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive",
            "LC_ALL": "C", "HOME": "/root"}

    @contextlib.contextmanager
    def _mounted(self, binds: Sequence[Path]) -> Iterator[None]:
        with ExitMounts() as m:
            m.standard(self.path)
            for p in binds:
                m.bind(p, self.path)
            yield

    def run(self, script: str, *, timeout: float = 900, check: bool = True,
            binds: Sequence[Path] = ()) -> subprocess.CompletedProcess[str]:
        """Run a ``sh -c`` script inside the root (chroot, proc/dev/sys mounted, ``binds``
        bind-mounted at their own paths)."""
        with self._mounted(binds):
            return _run(["chroot", str(self.path), "sh", "-ec", script], env=self._ENV,
                        timeout=timeout, check=check)

    def run_logged(self, script: str, *, log: Path, label: str, progress: Progress,
                   timeout: float, binds: Sequence[Path] = (), every: float = 30.0) -> None:
        """:meth:`run` for long steps: output to ``log``, and every ``every`` seconds a
        progress line with the elapsed time and the log's last line."""
        t0 = time.monotonic()
        with self._mounted(binds), open(log, "wb") as out:
            proc = subprocess.Popen(["chroot", str(self.path), "sh", "-ec", script], env=self._ENV,
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            next_note = t0 + every
            while proc.poll() is None:
                now = time.monotonic()
                if now - t0 > timeout:
                    proc.kill()
                    proc.wait()
                    raise SetupError(f"{label}: timed out after {timeout:.0f} s (log: {log})")
                if now >= next_note:
                    progress(f"{label}: {now - t0:.0f} s, {_last_line(log)}")
                    next_note = now + every
                time.sleep(0.5)
        if proc.returncode:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
            raise SetupError(f"{label} failed (rc={proc.returncode}, log: {log}):\n{tail}")

    # --- building ---------------------------------------------------------------------
    def ensure(self, progress: Progress = print) -> QemuCommand:
        """Create the root and install QEMU if not done yet; return how to run QEMU."""
        with cache_lock(self.cache, "toolroot"):
            if not self.bootstrapped:
                self._debootstrap(progress)
            if not self.has_qemu:
                self._install_qemu(progress)
            return self.qemu()

    def _debootstrap(self, progress: Progress) -> None:
        if os.geteuid() != 0:
            raise SetupError("making the tool root needs root (debootstrap, chroot); "
                             "run scripts/setup as root, or put QEMU >= 10.1 on PATH")
        if not shutil.which("debootstrap"):
            raise SetupError("debootstrap is missing: apt-get install debootstrap (scripts/setup does)")
        tmp = self.path.with_name("toolroot.partial")
        if tmp.exists():
            for mnt in mounts_under(tmp):
                _run(["umount", "-l", mnt])
            if mounts_under(tmp):
                raise SetupError(f"{tmp}: still has mounts; unmount them and remove it")
            shutil.rmtree(tmp)
        if self.path.exists():
            for mnt in mounts_under(self.path):
                _run(["umount", "-l", mnt])
            shutil.rmtree(self.path)
        progress(f"[setup] debootstrap --variant=minbase {TOOLROOT_SUITE} from {self.mirror} "
                 f"into {self.path} (~30 s, ~230 MiB)")
        t0 = time.monotonic()
        _run(["debootstrap", "--variant=minbase", TOOLROOT_SUITE, str(tmp), self.mirror],
             timeout=1800, check=True)
        (tmp / "etc/apt/apt.conf.d/99viommu").write_text(
            'Acquire::Check-Valid-Until "false";\n'
            'APT::Sandbox::User "root";\n'
            'APT::Install-Recommends "false";\n'
            'Acquire::Retries "3";\n'
        )
        sources = tmp / "etc/apt/sources.list.d"
        sources.mkdir(parents=True, exist_ok=True)
        (sources / "viommu.list").write_text(
            f"deb {self.mirror} {TOOLROOT_SUITE}-backports main\n"
            f"deb {self.mirror} sid main\n"
        )
        # sid only when asked for explicitly (-t sid / pkg/sid): never by default.
        (tmp / "etc/apt/preferences.d").mkdir(parents=True, exist_ok=True)
        (tmp / "etc/apt/preferences.d/viommu-sid").write_text(
            "Package: *\nPin: release n=sid\nPin-Priority: 50\n"
        )
        (tmp / ".viommu-debootstrap-ok").write_text(f"{self.mirror}\n")
        tmp.rename(self.path)
        progress(f"[setup] tool root ready in {time.monotonic() - t0:.0f} s")

    def ensure_arm64(self) -> None:
        """``dpkg --add-architecture arm64`` + ``apt-get update`` (once per process)."""
        if self._arm64:
            return
        stamp = self.path / ".viommu-arm64-ok"
        if not stamp.exists():
            self.run("dpkg --add-architecture arm64 && apt-get update -qq", timeout=900)
            stamp.write_text("arm64\n")
        self._arm64 = True

    def apt_update(self) -> None:
        self.run("apt-get update -qq", timeout=900)

    def _install_qemu(self, progress: Progress) -> None:
        progress("[setup] installing qemu-system-arm (trixie-backports) in the tool root (~1 min)")
        t0 = time.monotonic()
        self.ensure_arm64()
        errors = []
        for release in (f"{TOOLROOT_SUITE}-backports", "sid"):
            cp = self.run(f"apt-get install -y -qq -t {release} qemu-system-arm >/dev/null",
                          timeout=1800, check=False)
            version = probe_qemu(self._loader_qemu_argv(), self._loader_env())
            if cp.returncode == 0 and version:
                (self.path / ".viommu-qemu-ok").write_text(".".join(map(str, version)) + f" {release}\n")
                progress(f"[setup] QEMU {'.'.join(map(str, version))} from {release} "
                         f"installed in {time.monotonic() - t0:.0f} s")
                return
            errors.append(f"{release}: rc={cp.returncode} {cp.stderr.strip()[-400:]}")
            progress(f"[setup] QEMU from {release} not usable; trying the next source")
        raise SetupError("could not install QEMU >= 10.1 with vfio-user-pci in the tool root:\n"
                         + "\n".join(errors))

    # --- QEMU -------------------------------------------------------------------------
    def _loader_qemu_argv(self) -> list[str]:
        return [*self.loader_argv(), str(self.path / "usr/bin" / QEMU_BINARY),
                "-L", str(self.path / "usr/share/qemu")]

    def _loader_env(self) -> dict[str, str]:
        return {"QEMU_MODULE_DIR": str(self.path / "usr/lib/x86_64-linux-gnu/qemu")}

    def qemu(self) -> QemuCommand:
        """QEMU from the root: through its ld.so if that works, else through chroot."""
        argv, env = self._loader_qemu_argv(), self._loader_env()
        version = probe_qemu(argv, env)
        if version:
            return QemuCommand(tuple(argv), version, "toolroot", env, self.path)
        chroot_argv = ["chroot", str(self.path), "/usr/bin/" + QEMU_BINARY]
        with ExitMounts() as m:
            m.standard(self.path)
            version = probe_qemu(chroot_argv)
        if version:
            return QemuCommand(tuple(chroot_argv), version, "chroot", {}, self.path)
        raise SetupError(f"QEMU in the tool root {self.path} does not run; remove "
                         f"{self.path / '.viommu-qemu-ok'} and run scripts/setup again")


def find_qemu(cache: Path | None = None, progress: Progress = print, *,
              install: bool = True) -> QemuCommand:
    """QEMU >= 10.1 with vfio-user-pci: PATH first (``$VIOMMU_QEMU`` names a binary),
    else the tool root (made when ``install``)."""
    explicit = os.environ.get("VIOMMU_QEMU")
    if explicit:
        version = probe_qemu([explicit])
        if not version:
            raise SetupError(f"$VIOMMU_QEMU={explicit} is not QEMU >= 10.1 with vfio-user-pci")
        return QemuCommand((explicit,), version, "path")
    found = qemu_from_path()
    if found:
        return found
    root = ToolRoot(cache)
    if root.bootstrapped and root.has_qemu:
        return root.qemu()
    if not install:
        raise SetupError("no QEMU >= 10.1 with vfio-user-pci on PATH and no tool root yet: "
                         "run scripts/setup")
    return root.ensure(progress)
