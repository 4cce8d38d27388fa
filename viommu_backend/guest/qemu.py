"""Build the QEMU command line from a :class:`~viommu_backend.config.Config`, run QEMU
(asyncio subprocess), read console markers, drive QMP, always tear down.

Console markers are lines ``VIOMMU-MARK: <name> <json>`` printed by the guest's init
(``guest_images/init.sh``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from viommu_backend.config import Config, FunctionConfig
from viommu_backend.guest.toolroot import QemuCommand

MARK_PREFIX = "VIOMMU-MARK: "


class GuestError(RuntimeError):
    """The guest run failed: timeout, QEMU exit, or an error marker."""


@dataclass(frozen=True)
class Marker:
    name: str
    data: Any
    time: float  # monotonic seconds when it was read


def parse_marker(line: str, now: float = 0.0) -> Marker | None:
    i = line.find(MARK_PREFIX)
    if i < 0:
        return None
    rest = line[i + len(MARK_PREFIX):].strip()
    name, _, payload = rest.partition(" ")
    if not name:
        return None
    payload = payload.strip()
    try:
        # raw_decode: a kernel message the console printed between the guest program's
        # JSON and its newline (printk interleaves with user writes) does not spoil the
        # marker; the message itself reaches the host again through the kmsg dump
        data = json.JSONDecoder().raw_decode(payload)[0] if payload else None
    except json.JSONDecodeError:
        data = {"raw": payload}
    return Marker(name, data, now)


# --- command line ----------------------------------------------------------------------
def kernel_cmdline(config: Config, extra: str = "") -> str:
    words = ["console=ttyAMA0", "iomem=relaxed", "panic=-1", "loglevel=6",
             f"viommu.workload={config.guest.workload}"]
    hot = len(config.hotplug_functions())
    if hot:
        words.append(f"viommu.hotplug_count={hot}")
    if config.guest.cmdline:
        words.append(config.guest.cmdline)
    if extra:
        words.append(extra)
    return " ".join(words)


def function_device(fn: FunctionConfig, socket_dir: Path) -> dict[str, Any]:
    """The vfio-user-pci device for one backend function (for -device JSON or device_add)."""
    dev: dict[str, Any] = {"driver": "vfio-user-pci", "id": fn.name}
    slot = f"0x{fn.slot:x}" if fn.slot is not None else "0x0"
    dev.update(bus="pcie.0" if fn.slot is not None else fn.port,
               addr=f"{slot}.{fn.func}" if fn.func or fn.multifunction else slot)
    if fn.multifunction:  # every function's header type says multi-function, as on real
        # devices (Linux reads each function's own bit: pci_dev.multifunction)
        dev["multifunction"] = True
    dev["socket"] = {"path": str(socket_dir / fn.socket_name), "type": "unix"}
    return dev


def machine_arg(config: Config, *, dumpdtb: Path | None = None) -> str:
    m = "virt,gic-version=3,memory-backend=mem"
    if dumpdtb is not None:
        m += f",dumpdtb={dumpdtb}"
    return m


def qemu_args(config: Config, *, kernel: Path, initrd: Path, socket_dir: Path,
              qmp_path: Path | None = None, dtb: Path | None = None, cmdline_extra: str = "",
              dumpdtb: Path | None = None, devices: bool = True) -> list[str]:
    """The arguments after the QEMU binary (see :meth:`QemuCommand.command`).

    ``dumpdtb``: ask QEMU to write the machine's DTB and exit (vfio-user devices are
    left out then: PCI devices are not in the DT and the server need not run)."""
    mem = config.machine.memory
    args = [
        "-machine", machine_arg(config, dumpdtb=dumpdtb),
        "-cpu", config.machine.cpu,
        "-smp", str(config.machine.cpus),
        "-m", f"{mem // (1 << 20)}M",
        "-object", f"memory-backend-memfd,id=mem,size={mem // (1 << 20)}M,share=on",
        "-nic", "none",
        "-nographic", "-monitor", "none",
        "-no-reboot",
        "-kernel", str(kernel),
        "-initrd", str(initrd),
        "-append", kernel_cmdline(config, cmdline_extra),
    ]
    if dtb is not None and dumpdtb is None:
        args += ["-dtb", str(dtb)]
    for exp in config.expanders:  # before the root ports that sit on them
        args += ["-device", f"pxb-pcie,id={exp.name},bus_nr={exp.bus_nr},bus=pcie.0,addr=0x{exp.slot:x}"]
    for port in config.root_ports:
        args += ["-device", f"pcie-root-port,id={port.name},bus={port.bus},chassis={port.chassis},"
                            f"addr=0x{port.slot:x}"]
    if devices and dumpdtb is None:
        for fn in config.boot_functions():
            args += ["-device", json.dumps(function_device(fn, socket_dir), separators=(",", ":"))]
    if qmp_path is not None and dumpdtb is None:
        args += ["-qmp", f"unix:{qmp_path},server=on,wait=off"]
    args += list(config.machine.extra_args)
    return args


# --- processes ---------------------------------------------------------------------------
async def stop_process(proc: asyncio.subprocess.Process | None, *, grace: float = 5.0) -> int | None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; reaps the process.  Safe to call
    twice and under cancellation (the signal is sent before the first await)."""
    if proc is None:
        return None
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), grace)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.shield(proc.wait())
    return proc.returncode


DEVICE_DELETED_TIMEOUT = 30.0  # s: a guest ejects a hot-unplugged device after ~5 s


@dataclass
class QemuGuest:
    """One QEMU run.  ``async with QemuGuest(...) as g:`` starts it and always stops it."""

    qemu: QemuCommand
    args: list[str]
    log_path: Path
    qmp_path: Path | None = None
    bind_paths: Sequence[Path] = ()
    proc: asyncio.subprocess.Process | None = None
    lines: list[str] = field(default_factory=list)
    markers: list[Marker] = field(default_factory=list)
    started_at: float = 0.0
    _queue: asyncio.Queue[Marker | None] = field(default_factory=asyncio.Queue)
    _reader: asyncio.Task[None] | None = None
    _mounts: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    _qmp: Any = None
    _deleting: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    @property
    def argv(self) -> list[str]:
        return self.qemu.command(*self.args)

    async def start(self) -> None:
        self._mounts.enter_context(self.qemu.mounted(list(self.bind_paths)))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.started_at = time.monotonic()
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env=self.qemu.environ(), start_new_session=True)
        self._reader = asyncio.create_task(self._read_console())

    async def _read_console(self) -> None:
        assert self.proc and self.proc.stdout
        with open(self.log_path, "w", buffering=1) as log:
            log.write("# " + " ".join(self.argv) + "\n")
            while True:
                raw = await self.proc.stdout.readline()
                if not raw:
                    break
                line = raw.decode(errors="replace").rstrip("\r\n")
                log.write(line + "\n")
                self.lines.append(line)
                m = parse_marker(line, time.monotonic() - self.started_at)
                if m:
                    self.markers.append(m)
                    self._queue.put_nowait(m)
        self._queue.put_nowait(None)

    async def send_console(self, line: str) -> None:
        """Type one line on the guest's serial console (QEMU's stdin: -nographic)."""
        if self.proc is None or self.proc.stdin is None or self.proc.returncode is not None:
            raise GuestError("QEMU is not running: cannot write to its console")
        if any(c in line for c in "\x01\r\n"):  # Ctrl-A is the mux escape
            raise GuestError(f"console line must be one line without Ctrl-A: {line!r}")
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            await self.proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as e:
            raise GuestError(f"QEMU's console input closed: {e}") from None

    def console_tail(self, n: int = 30) -> str:
        return "\n".join(self.lines[-n:])

    async def next_marker(self, timeout: float) -> Marker:
        """The next marker; ``GuestError`` on timeout or when QEMU's console ends first.
        An ``error`` marker is returned like any other (the caller decides)."""
        try:
            m = await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            raise GuestError(f"no console marker within {timeout:.0f} s; console tail:\n"
                             + self.console_tail()) from None
        if m is None:
            self._queue.put_nowait(None)  # sticky end
            rc = await self.wait(5)
            raise GuestError(f"QEMU exited (rc={rc}) before the expected marker; console tail:\n"
                             + self.console_tail())
        return m

    async def wait_for(self, name: str, timeout: float) -> Marker:
        deadline = time.monotonic() + timeout
        while True:
            m = await self.next_marker(max(0.01, deadline - time.monotonic()))
            if m.name == name:
                return m

    async def wait(self, timeout: float | None) -> int | None:
        if self.proc is None:
            return None
        try:
            return await asyncio.wait_for(asyncio.shield(self.proc.wait()), timeout)
        except asyncio.TimeoutError:
            return None

    # --- QMP ---
    async def qmp(self) -> Any:
        if self._qmp is None:
            if self.qmp_path is None:
                raise GuestError("QEMU was started without a QMP socket")
            from qemu.qmp import QMPClient

            client = QMPClient("viommu-boot")
            for _ in range(100):
                try:
                    await client.connect(str(self.qmp_path))
                    break
                except Exception:  # noqa: BLE001 - not listening yet
                    if self.proc is not None and self.proc.returncode is not None:
                        raise GuestError("QEMU exited before QMP was up:\n" + self.console_tail())
                    await asyncio.sleep(0.05)
            else:
                raise GuestError(f"cannot connect to QEMU's QMP socket {self.qmp_path}")
            self._qmp = client
        return self._qmp

    async def device_add(self, device: dict[str, Any]) -> None:
        """QMP device_add; a device of the same id that is still being unplugged is waited
        for first (QEMU refuses a duplicate id until its DEVICE_DELETED)."""
        pending = self._deleting.pop(str(device.get("id")), None)
        if pending is not None:
            try:
                await asyncio.wait_for(pending, DEVICE_DELETED_TIMEOUT)
            except asyncio.TimeoutError:
                raise GuestError(f"QEMU never finished unplugging {device.get('id')!r} "
                                 f"(no DEVICE_DELETED in {DEVICE_DELETED_TIMEOUT:.0f} s)") from None
        client = await self.qmp()
        await client.execute("device_add", device)

    async def device_del(self, dev_id: str, busy_timeout: float = 30.0) -> None:
        """QMP device_del.  The unplug completes later (the guest's hot-plug driver ejects
        the device, then QEMU emits DEVICE_DELETED): :meth:`device_add` of the same id waits
        for it.
        While the slot is still busy with the hot-plug ("power indicator blinking") QEMU
        refuses; it is asked again for up to ``busy_timeout`` s."""
        from qemu.qmp import EventListener

        client = await self.qmp()
        listener = EventListener(("DEVICE_DELETED",))
        client.register_listener(listener)

        async def deleted() -> None:
            try:
                async for event in listener:
                    if event.get("data", {}).get("device") == dev_id:
                        return
            finally:
                client.remove_listener(listener)

        self._deleting[dev_id] = asyncio.create_task(deleted())
        try:
            await self._device_del_when_idle(client, dev_id, busy_timeout)
        except BaseException:
            self._deleting.pop(dev_id).cancel()
            raise

    @staticmethod
    async def _device_del_when_idle(client: Any, dev_id: str, busy_timeout: float) -> None:
        """device_del, asked again while QEMU refuses it because the slot's power indicator
        still blinks (the guest's hot-plug driver has not finished bringing the slot up)."""
        from qemu.qmp import ExecuteError

        deadline = asyncio.get_running_loop().time() + busy_timeout
        while True:
            try:
                await client.execute("device_del", {"id": dev_id})
                return
            except ExecuteError as e:
                if "power indicator blinking" not in str(e) or \
                        asyncio.get_running_loop().time() > deadline:
                    raise
            await asyncio.sleep(0.2)

    async def close(self) -> int | None:
        rc = None
        for task in self._deleting.values():
            task.cancel()
        self._deleting.clear()
        try:
            rc = await stop_process(self.proc)
            if self._reader is not None:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(self._reader, 5)
        finally:
            if self._qmp is not None:
                with contextlib.suppress(Exception):
                    await self._qmp.disconnect()
                self._qmp = None
            self._mounts.close()
        return rc

    async def __aenter__(self) -> "QemuGuest":
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def run_qemu_to_exit(qemu: QemuCommand, args: Sequence[str], timeout: float = 60) -> tuple[int, str]:
    """Run a short QEMU job (e.g. dumpdtb) and return (rc, output)."""
    proc = await asyncio.create_subprocess_exec(
        *qemu.command(*args), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env=qemu.environ(), start_new_session=True)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        await stop_process(proc, grace=1)
    return proc.returncode or 0, out.decode(errors="replace")
