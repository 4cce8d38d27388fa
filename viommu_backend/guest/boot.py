"""``boot``: set up, start the backend server, start QEMU, follow the guest's markers.

    summary = await run_boot(config)          # BootSummary; summary.ok
    viommu-backend boot [--config FILE] [--keep-running]   # the command line (cli.py)

The server is ``python -m viommu_backend serve --socket-dir DIR --qmp DIR/viommu-qmp.sock
--config FILE`` unless ``server_argv`` is given (a list in which ``{socket_dir}``,
``{config}`` and ``{qmp}`` are substituted).  QEMU and the server are always stopped,
on failure and on cancellation (Ctrl-C) too.

Guest markers the host acts on: ``wait-hotplug`` (QMP device_add of the hot-plug
functions), ``wait-unplug`` (QMP device_del of them), ``kmsg`` (kernel log lines: a
warning or error about smmu/iommu/virtio/pci that is not in :data:`KMSG_ALLOWED` fails the
run), ``blk-io`` (O_DIRECT throughput, data check), ``done``.  The backend's QMP socket is
read before ``device_del`` (``summary.backend_before_unplug``) and at the end
(``summary.backend``): ``query-viommu``, ``query-viommu-domains`` and
``query-viommu-functions``.

Acting at chosen points of a run: the guest workload ``host`` marks ``wait-host {"n":N}``
and waits for one console line (workloads to run next, e.g. ``io`` or ``io:4096``, or
``end``).  ``run_boot(..., on_marker=cb)`` calls ``await cb(marker, ctx)`` for every marker
(``ctx``: :class:`HostContext`, with the backend's QMP at ``await ctx.execute(...)``); for
``wait-host`` the string it returns is typed to the guest (None: ``end``).  With
``--keep-running`` the guest keeps asking after ``done``: lines typed on boot's stdin are
forwarded (e.g. ``io``), and the guest's kernel messages and I/O results are printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

from qemu.qmp import QMPError

from viommu_backend.config import Config, ConfigError, sva_blockers
from viommu_backend.guest.dt import build_guest_dtb, predict_bar0, smmu_nodes_for
from viommu_backend.guest.qemu import GuestError, Marker, QemuGuest, function_device, qemu_args, stop_process
from viommu_backend.guest.report import BootSummary, SmmuCounters, mbps_text
from viommu_backend.guest.setup import GuestTools, ensure_guest_tools
from viommu_backend.guest.toolroot import SetupError

Progress = Callable[[str], None]
SOCKET_WAIT = 30.0  # s for the server to listen on every socket
POWEROFF_ACK = "poweroff"  # typed after `done` once the host has read the backend's state

KMSG_RELEVANT = re.compile(r"smmu|iommu|virtio|pci|\bvd[a-z]\b", re.I)
KMSG_ALLOWED: tuple[tuple[re.Pattern[str], str], ...] = (
    # Route 1: at boot the arm,smmu-v3 node is probed while the SMMU function's memory
    # decode is still off, so IDR0 reads all-ones (TTENDIAN = 3, reserved) and the probe
    # fails; the `smmu` workload enables the BAR and probes again.
    (re.compile(r"arm-smmu-v3 [0-9a-f]+\.smmuv3: unknown/unsupported TT endianness!"),
     "first probe at boot reads all-ones (BAR decode off); re-probed by the smmu workload"),
    # The project's guest modules (guest_images/modules/) are built out of tree against
    # the kernel built from source; loading the first one taints the kernel (O).
    (re.compile(r"^viommu_\w+: loading out-of-tree module taints kernel\.$"),
     "the project's own guest modules are out-of-tree modules"),
    # QEMU virt's ECAM host bridge describes a 512 GiB 64-bit MMIO window; the generic host
    # driver notes that it exceeds 32 bits at boot (machine property, not our devices).
    (re.compile(r"pci-host-generic [0-9a-f]+\.pcie: Memory resource size exceeds max for 32 bits"),
     "QEMU virt's 64-bit PCI MMIO window, reported at every boot"),
)


def config_expected(config: Config) -> list[tuple[re.Pattern[str], str]]:
    """The config's ``[guest] expect_kmsg`` patterns, as :data:`KMSG_ALLOWED` entries."""
    return [(re.compile(p), f"expected by {config.source}") for p in config.guest.expect_kmsg]


def kmsg_problems(markers: Sequence[Marker], allowed: Sequence[tuple[re.Pattern[str], str]] = KMSG_ALLOWED
                  ) -> list[dict[str, Any]]:
    """Kernel warnings/errors (level <= 4) about smmu/iommu/virtio/pci/vdX not allowed."""
    out = []
    for m in markers:
        if m.name != "kmsg" or not isinstance(m.data, dict):
            continue
        level, text = m.data.get("level", 7), str(m.data.get("text", ""))
        if level > 4 or not KMSG_RELEVANT.search(text):
            continue
        if any(p.search(text) for p, _ in allowed):
            continue
        out.append(m.data)
    return out


async def query_backend(path: Path) -> dict[str, Any]:
    """``query-viommu``, ``query-viommu-domains``, ``query-viommu-functions`` and
    ``query-viommu-errors`` from the backend's QMP socket."""
    from qemu.qmp import QMPClient

    client = QMPClient("viommu-boot-backend")
    await asyncio.wait_for(client.connect(str(path)), 10)
    try:
        out = {"functions": await asyncio.wait_for(client.execute("query-viommu-functions"), 10),
               "errors": await asyncio.wait_for(client.execute("query-viommu-errors"), 10)}
        commands = await asyncio.wait_for(client.execute("query-commands"), 10)
        if {"name": "query-viommu-smmus"} in commands:  # each SMMU's view; the first's at the top
            smmus = await asyncio.wait_for(client.execute("query-viommu-smmus"), 10)
            out["smmus"] = {}
            for unit in smmus:
                arg = {"smmu": unit["name"]}
                out["smmus"][unit["name"]] = {
                    **unit, "viommu": await asyncio.wait_for(client.execute("query-viommu", arg), 10),
                    "domains": await asyncio.wait_for(client.execute("query-viommu-domains", arg), 10)}
            first = out["smmus"][smmus[0]["name"]]
            out["viommu"], out["domains"] = first["viommu"], first["domains"]
        return out
    finally:
        await client.disconnect()


@dataclass
class HostContext:
    """What an ``on_marker`` callback may act on: the running guest (its console and
    QEMU's QMP: ``guest.qmp()``), the summary so far, and the backend's QMP socket."""

    guest: QemuGuest
    summary: BootSummary
    qmp_path: Path
    _client: Any = None

    async def backend(self) -> Any:
        """A connected ``qemu.qmp.QMPClient`` on the backend's QMP socket (kept open)."""
        if self._client is None:
            from qemu.qmp import QMPClient

            client = QMPClient("viommu-boot-host")
            await asyncio.wait_for(client.connect(str(self.qmp_path)), 10)
            self._client = client
        return self._client

    async def execute(self, cmd: str, args: dict[str, Any] | None = None, timeout: float = 30) -> Any:
        """Run one command on the backend's QMP socket."""
        client = await self.backend()
        return await asyncio.wait_for(client.execute(cmd, args), timeout)

    async def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.disconnect()
            self._client = None


OnMarker = Callable[[Marker, HostContext], Awaitable[str | None]]


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


@dataclass
class _Live:
    """The processes of a boot, kept as soon as each exists so that they are always stopped."""

    server: asyncio.subprocess.Process | None = None
    guest: QemuGuest | None = None
    ctx: HostContext | None = None


async def run_boot(config: Config, *, keep_running: bool = False, progress: Progress = print,
                   server_argv: Sequence[str] | None = None, workdir: Path | None = None,
                   cmdline_extra: str = "",
                   kmsg_allowed: Sequence[tuple[re.Pattern[str], str]] = KMSG_ALLOWED,
                   on_marker: OnMarker | None = None) -> BootSummary:
    """Boot the guest of ``config`` against the backend; never raises for a failed boot
    (see ``summary.ok`` / ``summary.error``) except on cancellation or an exception of
    ``on_marker`` (QEMU and the server are stopped first).  ``kmsg_allowed``:
    (pattern, reason) pairs of guest kernel warnings that do not fail the run.
    ``on_marker``: see the module docstring (``wait-host``)."""
    s = BootSummary()
    t_start = time.monotonic()
    live = _Live()
    try:
        progress("[boot] checking set-up (QEMU, dtc, guest image)")
        tools = await asyncio.to_thread(ensure_guest_tools, config, progress=progress)
        s.qemu = tools.qemu.describe()
        s.kernel = f"{tools.image.kernel_version} ({tools.image.manifest.get('kernel_source')})"
        s.timings["setup"] = time.monotonic() - t_start
        cfg_file = _prepare_workdir(config, s, workdir)
        await _start_server(config, s, live, cfg_file, server_argv, progress)
        guest, t = await _start_guest(config, s, live, tools, cmdline_extra, keep_running, progress)
        await _follow(guest, config, s, progress, t, keep_running, live.server, on_marker, live.ctx)
        s.timings["guest"] = time.monotonic() - t
        await _judge(config, s, live, kmsg_allowed)
        s.ok = True
    except (SetupError, GuestError, ConfigError, OSError, QMPError) as e:
        s.error = str(e)
        if live.server is not None and live.server.returncode is not None and s.server_log:
            s.error += f"\nbackend server exited (rc={live.server.returncode}):\n" + _tail(s.server_log)
    finally:
        await _teardown(s, live)
        s.timings["total"] = time.monotonic() - t_start
    progress(s.format())
    return s


def _prepare_workdir(config: Config, s: BootSummary, workdir: Path | None) -> Path:
    """The run's folder (sockets, logs, the config file handed to the server), what the
    summary knows before anything starts; returns the config file."""
    wd = workdir or Path(tempfile.mkdtemp(prefix="viommu-boot-"))
    wd.mkdir(parents=True, exist_ok=True)
    s.workdir = wd
    source = Path(config.source)
    # the config's own file, unless the text was edited after reading it (then a copy)
    same = source.is_file() and (not config.text or source.read_text() == config.text)
    cfg_file = source if same else wd / "config.toml"
    if not same:
        if not config.text:
            raise ConfigError("config has no TOML text to hand to the server (use loads_config)")
        cfg_file.write_text(config.text)
    s.console_log, s.server_log = wd / "console.log", wd / "server.log"
    s.predicted_bar0 = predict_bar0(config)
    if config.iommu_function() is not None:
        blockers = sva_blockers(config)
        s.sva = "; ".join(blockers) if blockers else \
            f"SMMU meets the driver's SVA checks (cpu {config.machine.cpu})"
    return cfg_file


async def _start_server(config: Config, s: BootSummary, live: _Live, cfg_file: Path,
                        server_argv: Sequence[str] | None, progress: Progress) -> None:
    """Start the backend server and wait until it listens on every function's socket."""
    assert s.workdir is not None and s.server_log is not None
    t = time.monotonic()
    argv = server_command(s.workdir, cfg_file, s.workdir / "viommu-qmp.sock", server_argv)
    progress(f"[boot] starting backend: {' '.join(argv)}")
    with open(s.server_log, "wb") as log:
        live.server = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    await _wait_sockets(live.server, [s.workdir / fn.socket_name for fn in config.functions], s.server_log)
    s.timings["server"] = time.monotonic() - t


async def _start_guest(config: Config, s: BootSummary, live: _Live, tools: GuestTools, cmdline_extra: str,
                       keep_running: bool, progress: Progress) -> tuple[QemuGuest, float]:
    """Build the guest's DT (when it has SMMU nodes) and start QEMU; returns it and when it
    started."""
    wd = s.workdir
    assert wd is not None and s.console_log is not None
    dtb = None
    if smmu_nodes_for(config):
        t = time.monotonic()
        dtb = await build_guest_dtb(tools.qemu, config, kernel=tools.image.kernel,
                                    initrd=tools.image.initrd, socket_dir=wd, cache=tools.cache,
                                    cmdline_extra=cmdline_extra)
        at = ", ".join(f"{n.base:#x}" for n in smmu_nodes_for(config))
        progress(f"[boot] guest DT with arm,smmu-v3 at {at}: {dtb}")
        s.timings["dtb"] = time.monotonic() - t

    extra = cmdline_extra + (" viommu.keep=1" if keep_running else "")
    qmp_qemu = wd / "qemu-qmp.sock"
    args = qemu_args(config, kernel=tools.image.kernel, initrd=tools.image.initrd, socket_dir=wd,
                     qmp_path=qmp_qemu, dtb=dtb, cmdline_extra=extra.strip())
    live.guest = QemuGuest(tools.qemu, args, s.console_log, qmp_qemu, bind_paths=[wd, tools.cache])
    progress(f"[boot] starting QEMU (console: {s.console_log})")
    t = time.monotonic()
    await live.guest.start()
    live.ctx = HostContext(live.guest, s, wd / "viommu-qmp.sock")
    return live.guest, t


async def _judge(config: Config, s: BootSummary, live: _Live,
                 kmsg_allowed: Sequence[tuple[re.Pattern[str], str]]) -> None:
    """After the guest's ``done``: the backend's final state, QEMU's exit, then raise for
    whatever fails the run (the backend, guest workload errors, unexpected kernel messages)."""
    assert live.guest is not None and s.workdir is not None
    if s.backend is None:
        await _query_backend(s, s.workdir / "viommu-qmp.sock", live.server)
    rc = await live.guest.wait(30)
    if rc is None:
        raise GuestError("guest printed 'done' but did not power off within 30 s")
    s.qemu_rc = rc
    if rc != 0:
        raise GuestError(f"QEMU exited with {rc}:\n" + live.guest.console_tail())
    backend_failure(s)
    if s.guest_errors:
        raise GuestError(f"{len(s.guest_errors)} workload error(s) in the guest")
    s.unexpected_kmsg = kmsg_problems(s.markers, [*kmsg_allowed, *config_expected(config)])
    if s.unexpected_kmsg:
        raise GuestError(f"{len(s.unexpected_kmsg)} unexpected guest kernel warning(s)/error(s): "
                         + "; ".join(str(k.get("text")) for k in s.unexpected_kmsg[:5]))


async def _teardown(s: BootSummary, live: _Live) -> None:
    """Stop QEMU and the server (reading the backend's counters first when the run failed
    before it could); a server that did not exit cleanly fails a run that passed."""
    if live.ctx is not None:
        await live.ctx.close()
    if s.backend is None and s.workdir is not None:  # failed run: still show the counters
        with contextlib.suppress(Exception):
            await asyncio.wait_for(_query_backend(s, s.workdir / "viommu-qmp.sock", live.server), 15)
    if live.guest is not None:
        rc = await live.guest.close()
        if s.qemu_rc is None:
            s.qemu_rc = rc
    if live.server is not None:
        s.server_rc = await stop_process(live.server)
        if s.ok and s.server_rc not in (0, -15):
            s.ok = False
            s.error = f"backend server exited with {s.server_rc}:\n" + _tail(s.server_log)


def backend_failure(s: BootSummary) -> None:
    """Raise when the backend failed during the run: errors it logged (tracebacks shown),
    a command sink that failed, or no final state to judge by."""
    if s.backend_error is not None:
        raise GuestError(f"no final state from the backend's QMP socket: {s.backend_error}")
    if s.backend is None:
        return  # a server without the QMP socket (a test's own): nothing to judge by
    errors = s.backend.get("errors", {})
    views = s.backend.get("smmus") or {"": s.backend}  # each SMMU's query-viommu
    sink_errors = sum(SmmuCounters.from_query(u.get("viommu")).count("sink_errors") for u in views.values())
    if errors.get("count") or sink_errors:
        detail = "\n".join(f"{e['logger']}: {e['message']}\n{e['traceback']}".rstrip()
                           for e in errors.get("recent", []))
        raise GuestError(f"the backend failed: {errors.get('count', 0)} error(s) logged, "
                         f"{sink_errors} command sink error(s):\n{detail}")


async def _query_backend(s: BootSummary, path: Path, server: asyncio.subprocess.Process | None,
                         attr: str = "backend") -> None:
    if not path.exists() or server is None or server.returncode is not None:
        return
    try:
        setattr(s, attr, await query_backend(path))
    except Exception as e:  # noqa: BLE001 - reported in the summary; the run decides
        s.backend_error = f"{type(e).__name__}: {e}"


async def _follow(guest: QemuGuest, config: Config, s: BootSummary, progress: Progress,
                  t0: float, keep_running: bool, server: asyncio.subprocess.Process | None = None,
                  on_marker: OnMarker | None = None, ctx: HostContext | None = None) -> None:
    deadline = t0 + config.guest.timeout
    while True:
        m = await guest.next_marker(max(0.1, deadline - time.monotonic()))
        s.markers.append(m)
        reply = await on_marker(m, ctx) if on_marker is not None and ctx is not None else None
        if m.name == "wait-host":
            line = reply if reply is not None else "end"
            progress(f"[boot] guest waits for the host (step {_step(m)}): answering {line!r}")
            await guest.send_console(line)
        elif m.name == "io":
            progress(f"[boot] guest io: {_io_text(m.data)}")
        elif m.name == "boot":
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
        elif m.name == "kmsg":
            if kmsg_problems([m], [*KMSG_ALLOWED, *config_expected(config)]):
                progress(f"[boot] guest kernel: {m.data.get('text')}")
        elif m.name == "blk-dev":
            progress(f"[boot] guest sees /dev/{m.data.get('dev')} at {m.data.get('bdf')} "
                     f"(iommu group {m.data.get('iommu_group') or '-'}, {m.data.get('domain_type')})")
        elif m.name == "blk-io":
            progress(f"[boot] O_DIRECT bs={m.data['bs']}: {m.data['bytes']} bytes, write "
                     f"{mbps_text(m.data['bytes'], m.data['write_ms']).strip()}, read "
                     f"{mbps_text(m.data['bytes'], m.data['read_ms']).strip()}, "
                     f"data {'verified' if m.data.get('match') else 'MISMATCH'}")
        elif m.name == "wait-unplug":
            if s.workdir is not None:
                await _query_backend(s, s.workdir / "viommu-qmp.sock", server, "backend_before_unplug")
            for fn in config.hotplug_functions():
                progress(f"[boot] hot-unplugging {fn.name}"
                         + (" with I/O running" if isinstance(m.data, dict) and m.data.get("busy") else ""))
                await guest.device_del(fn.name)
        elif m.name == "unplug":
            progress(f"[boot] guest: {m.data.get('bdf')} gone after {m.data.get('ms')} ms")
            # QEMU's DEVICE_DELETED follows once the guest powers the slot off; a later
            # device_add of the same id waits for it (QemuGuest.device_add)
        elif m.name == "done":
            if keep_running:
                await _keep_running(guest, s, progress)
                return
            # the guest waits for this line before powering off: read the backend's state
            # first, since the guest's shutdown turns the SMMU off (GBPA then decides)
            if s.workdir is not None:
                await _query_backend(s, s.workdir / "viommu-qmp.sock", server)
            with contextlib.suppress(GuestError):  # it powers off by itself after a while
                await guest.send_console(POWEROFF_ACK)
            return


def _step(m: Marker) -> Any:
    return m.data.get("n") if isinstance(m.data, dict) else "?"


def _io_text(d: Any) -> str:
    if not isinstance(d, dict):
        return str(d)
    ok = d.get("write_ok") and d.get("read_ok") and d.get("match")
    head = f"{d.get('bytes')} bytes O_DIRECT {'from' if d.get('op') == 'read' else 'to'} /dev/{d.get('dev')}: "
    if d.get("op") == "write":
        return head + ("written (no read back)" if d.get("write_ok") else "write FAILED") + \
            (f" ({d['error'].strip()})" if d.get("error", "").strip() else "")
    if ok:
        return head + ("read, data as last written" if d.get("op") == "read"
                       else "written, read back, data verified")
    parts = [] if d.get("op") == "read" else [f"write {'ok' if d.get('write_ok') else 'FAILED'}"]
    parts.append(f"read {'ok' if d.get('read_ok') else 'FAILED'}")
    if d.get("read_ok"):
        parts.append(f"data {'verified' if d.get('match') else 'MISMATCH'}")
    return head + ", ".join(parts) + (f" ({d['error'].strip()})" if d.get("error", "").strip() else "")


async def _keep_running(guest: QemuGuest, s: BootSummary, progress: Progress) -> None:
    """After ``done`` with --keep-running: forward boot's stdin lines to the guest (which
    runs them as workloads, see init.sh ``host``) and print what it reports, until QEMU
    exits or Ctrl-C."""
    wd = s.workdir or Path(".")
    progress(f"[boot] guest idle; QEMU keeps running until Ctrl-C\n"
             f"[boot] backend QMP: {wd / 'viommu-qmp.sock'}\n"
             f"[boot] QEMU QMP:    {wd / 'qemu-qmp.sock'}\n"
             f"[boot] type guest workloads here, one line at a time (e.g. `io`, `io:4096`, `enumerate`)")
    loop = asyncio.get_running_loop()
    fd, buf = sys.stdin.fileno() if sys.stdin else -1, bytearray()
    pending: list[str] = []

    def on_stdin() -> None:
        data = os.read(fd, 4096)
        if not data:
            loop.remove_reader(fd)
            return
        buf.extend(data)
        while b"\n" in buf:
            raw, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            line = raw.decode(errors="replace").strip().replace("\x01", "")
            if line:
                pending.append(line)
                wake.set()

    wake = asyncio.Event()
    reading = False
    if fd >= 0:
        try:
            loop.add_reader(fd, on_stdin)
            reading = True
        except (OSError, ValueError, NotImplementedError):  # e.g. a regular file
            progress("[boot] stdin cannot be watched; not forwarding it to the guest")
    try:
        next_marker = asyncio.ensure_future(guest.next_marker(1e9))
        waiting = False
        while True:
            woke = asyncio.ensure_future(wake.wait())
            done, _ = await asyncio.wait({next_marker, woke}, return_when=asyncio.FIRST_COMPLETED)
            if woke not in done:
                woke.cancel()
            if next_marker in done:
                try:
                    m = next_marker.result()
                except GuestError:  # QEMU exited
                    return
                s.markers.append(m)
                if m.name == "wait-host":
                    waiting = True
                elif m.name == "kmsg" and isinstance(m.data, dict):
                    progress(f"[guest] dmesg <{m.data.get('level')}>: {m.data.get('text')}")
                elif m.name == "io":
                    progress(f"[guest] io: {_io_text(m.data)}")
                elif m.name == "error":
                    progress(f"[guest] error: {json.dumps(m.data)}")
                next_marker = asyncio.ensure_future(guest.next_marker(1e9))
            wake.clear()
            if waiting and pending:
                line = pending.pop(0)
                progress(f"[boot] -> guest: {line}")
                await guest.send_console(line)
                waiting = False
    finally:
        if reading:
            loop.remove_reader(fd)
        with contextlib.suppress(Exception):
            next_marker.cancel()


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

