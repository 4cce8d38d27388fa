"""``boot``: set up, start the backend server, start QEMU, follow the guest's markers.

    summary = await run_boot(config)          # BootSummary; summary.ok
    python -m viommu_backend.guest.boot [--config FILE] [--keep-running]

The server is ``python -m viommu_backend serve --socket-dir DIR --qmp DIR/viommu-qmp.sock
--config FILE`` unless ``server_argv`` is given (a list in which ``{socket_dir}``,
``{config}`` and ``{qmp}`` are substituted).  QEMU and the server are always stopped,
on failure and on cancellation (Ctrl-C) too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from viommu_backend.config import Config, ConfigError, load_config, load_default
from viommu_backend.guest.dt import build_guest_dtb, predict_bar0, smmu_node_for
from viommu_backend.guest.qemu import GuestError, Marker, QemuGuest, function_device, qemu_args, stop_process
from viommu_backend.guest.setup import ensure_guest_tools
from viommu_backend.guest.toolroot import SetupError

Progress = Callable[[str], None]
SOCKET_WAIT = 30.0  # s for the server to listen on every socket


@dataclass
class BootSummary:
    ok: bool = False
    error: str | None = None
    markers: list[Marker] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    qemu: str = ""
    kernel: str = ""
    workdir: Path | None = None
    console_log: Path | None = None
    server_log: Path | None = None
    qemu_rc: int | None = None
    server_rc: int | None = None
    predicted_bar0: dict[str, int] = field(default_factory=dict)

    def marks(self, name: str) -> list[Any]:
        return [m.data for m in self.markers if m.name == name]

    @property
    def pci_devices(self) -> list[dict[str, Any]]:
        return self.marks("pci-dev")

    @property
    def guest_errors(self) -> list[Any]:
        return self.marks("error")

    def format(self) -> str:
        lines = [f"boot: {'OK' if self.ok else 'FAILED'}" + (f": {self.error}" if self.error else "")]
        lines.append(f"  qemu: {self.qemu}")
        lines.append(f"  kernel: {self.kernel}")
        for d in self.pci_devices:
            bars = " ".join(f"BAR{b['index']}={b['start']}" for b in d.get("bars", []))
            lines.append(f"  pci {d['bdf']} {d['vendor']}:{d['device']} {bars} driver={d.get('driver') or '-'}"
                         f" group={d.get('iommu_group') or '-'}")
        for s in self.marks("smmu"):
            lines.append(f"  smmu: {json.dumps(s)}")
        for e in self.guest_errors:
            lines.append(f"  guest error: {json.dumps(e)}")
        lines.append("  times: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items()))
        lines.append(f"  logs: {self.console_log} {self.server_log}")
        return "\n".join(lines)


def server_command(socket_dir: Path, config_file: Path, qmp: Path,
                   server_argv: Sequence[str] | None = None) -> list[str]:
    if server_argv is None:
        return [sys.executable, "-m", "viommu_backend", "serve", "--socket-dir", str(socket_dir),
                "--qmp", str(qmp), "--config", str(config_file)]
    subst = {"socket_dir": str(socket_dir), "config": str(config_file), "qmp": str(qmp)}
    return [a.format(**subst) for a in server_argv]


async def _wait_sockets(proc: asyncio.subprocess.Process, paths: list[Path], log: Path) -> None:
    deadline = time.monotonic() + SOCKET_WAIT
    while not all(p.exists() for p in paths):
        if proc.returncode is not None:
            raise SetupError(f"backend server exited (rc={proc.returncode}) before listening:\n"
                             + _tail(log))
        if time.monotonic() > deadline:
            missing = [str(p) for p in paths if not p.exists()]
            raise SetupError(f"backend server did not create {', '.join(missing)} within "
                             f"{SOCKET_WAIT:.0f} s:\n" + _tail(log))
        await asyncio.sleep(0.05)


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


async def run_boot(config: Config, *, keep_running: bool = False, progress: Progress = print,
                   server_argv: Sequence[str] | None = None, workdir: Path | None = None,
                   cmdline_extra: str = "") -> BootSummary:
    """Boot the guest of ``config`` against the backend; never raises for a failed boot
    (see ``summary.ok`` / ``summary.error``) except on cancellation."""
    s = BootSummary()
    t_start = time.monotonic()
    server: asyncio.subprocess.Process | None = None
    guest: QemuGuest | None = None
    try:
        progress("[boot] checking set-up (QEMU, dtc, guest image)")
        tools = await asyncio.to_thread(ensure_guest_tools, config, progress=progress)
        s.qemu = tools.qemu.describe()
        s.kernel = f"{tools.image.kernel_version} ({tools.image.manifest.get('kernel_source')})"
        s.timings["setup"] = time.monotonic() - t_start

        wd = workdir or Path(tempfile.mkdtemp(prefix="viommu-boot-"))
        wd.mkdir(parents=True, exist_ok=True)
        s.workdir = wd
        cfg_file = Path(config.source) if Path(config.source).is_file() else wd / "config.toml"
        if not cfg_file.exists():
            if not config.text:
                raise ConfigError("config has no TOML text to hand to the server (use loads_config)")
            cfg_file.write_text(config.text)
        qmp_server = wd / "viommu-qmp.sock"
        qmp_qemu = wd / "qemu-qmp.sock"
        s.console_log, s.server_log = wd / "console.log", wd / "server.log"
        s.predicted_bar0 = predict_bar0(config)

        t = time.monotonic()
        argv = server_command(wd, cfg_file, qmp_server, server_argv)
        progress(f"[boot] starting backend: {' '.join(argv)}")
        with open(s.server_log, "wb") as log:
            server = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        await _wait_sockets(server, [wd / fn.socket_name for fn in config.functions], s.server_log)
        s.timings["server"] = time.monotonic() - t

        dtb = None
        if smmu_node_for(config) is not None:
            t = time.monotonic()
            dtb = await build_guest_dtb(tools.qemu, config, kernel=tools.image.kernel,
                                        initrd=tools.image.initrd, socket_dir=wd, cache=tools.cache,
                                        cmdline_extra=cmdline_extra)
            progress(f"[boot] guest DT with arm,smmu-v3 at {smmu_node_for(config).base:#x}: {dtb}")
            s.timings["dtb"] = time.monotonic() - t

        extra = cmdline_extra + (" viommu.keep=1" if keep_running else "")
        args = qemu_args(config, kernel=tools.image.kernel, initrd=tools.image.initrd, socket_dir=wd,
                         qmp_path=qmp_qemu, dtb=dtb, cmdline_extra=extra.strip())
        guest = QemuGuest(tools.qemu, args, s.console_log, qmp_qemu, bind_paths=[wd, tools.cache])
        progress(f"[boot] starting QEMU (console: {s.console_log})")
        t = time.monotonic()
        await guest.start()
        await _follow(guest, config, s, progress, t, keep_running)
        s.timings["guest"] = time.monotonic() - t
        rc = await guest.wait(30)
        if rc is None:
            raise GuestError("guest printed 'done' but did not power off within 30 s")
        s.qemu_rc = rc
        if rc != 0:
            raise GuestError(f"QEMU exited with {rc}:\n" + guest.console_tail())
        if s.guest_errors:
            raise GuestError(f"{len(s.guest_errors)} workload error(s) in the guest")
        s.ok = True
    except (SetupError, GuestError, ConfigError, OSError) as e:
        s.error = str(e)
        if server is not None and server.returncode is not None and s.server_log:
            s.error += f"\nbackend server exited (rc={server.returncode}):\n" + _tail(s.server_log)
    finally:
        if guest is not None:
            rc = await guest.close()
            if s.qemu_rc is None:
                s.qemu_rc = rc
        if server is not None:
            s.server_rc = await stop_process(server)
            if s.ok and s.server_rc not in (0, -15):
                s.ok = False
                s.error = f"backend server exited with {s.server_rc}:\n" + _tail(s.server_log)
        s.timings["total"] = time.monotonic() - t_start
    progress(s.format())
    return s


async def _follow(guest: QemuGuest, config: Config, s: BootSummary, progress: Progress,
                  t0: float, keep_running: bool) -> None:
    deadline = t0 + config.guest.timeout
    while True:
        m = await guest.next_marker(max(0.1, deadline - time.monotonic()))
        s.markers.append(m)
        if m.name == "boot":
            s.timings["boot-to-init"] = time.monotonic() - t0
            progress(f"[boot] guest kernel {m.data.get('kernel') if isinstance(m.data, dict) else '?'} "
                     f"reached init in {s.timings['boot-to-init']:.1f} s")
        elif m.name == "workload":
            progress(f"[boot] guest workload {m.data.get('name')}")
        elif m.name == "error":
            progress(f"[boot] guest error: {json.dumps(m.data)}")
        elif m.name == "wait-hotplug":
            for fn in config.hotplug_functions():
                progress(f"[boot] hot-plugging {fn.name} into {fn.port}")
                await guest.device_add(function_device(fn, s.workdir or Path(".")))
        elif m.name == "done":
            if keep_running:
                progress("[boot] guest idle; QEMU keeps running until Ctrl-C")
                await guest.wait(None)
            return


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m viommu_backend.guest.boot")
    ap.add_argument("--config", type=Path)
    ap.add_argument("--keep-running", action="store_true")
    ap.add_argument("--server", help="server command (shell words; {socket_dir} {config} {qmp})")
    a = ap.parse_args(argv)
    try:
        config = load_config(a.config) if a.config else load_default()
    except ConfigError as e:
        print(f"boot: error: {e}", file=sys.stderr)
        return 2
    server_argv = a.server.split() if a.server else None
    try:
        s = asyncio.run(run_boot_interruptible(config, keep_running=a.keep_running, server_argv=server_argv))
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 130
    return 0 if s.ok else 1


async def run_boot_interruptible(config: Config, **kw: Any) -> BootSummary:
    """:func:`run_boot` cancelled (QEMU and server torn down) on SIGINT or SIGTERM."""
    import signal

    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await run_boot(config, **kw)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


if __name__ == "__main__":
    sys.exit(main())
