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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

from qemu.qmp import QMPError

from viommu_backend.config import Config, ConfigError, sva_blockers
from viommu_backend.guest.dt import build_guest_dtb, predict_bar0, smmu_nodes_for
from viommu_backend.guest.qemu import GuestError, Marker, QemuGuest, function_device, qemu_args, stop_process
from viommu_backend.guest.setup import ensure_guest_tools
from viommu_backend.guest.toolroot import SetupError

Progress = Callable[[str], None]
SOCKET_WAIT = 30.0  # s for the server to listen on every socket
POWEROFF_ACK = "poweroff"  # typed after `done` once the host has read the backend's state

CHECKLESS_MARKERS = frozenset({"module"})  # markers with an "ok" that are not checks
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


def _atc_line(t: dict[str, Any]) -> str:
    """", ATC hit rate ..." for endpoints using ATS (their hits never reach the SMMU)."""
    a = t.get("atc")
    if not a or not a.get("hits", 0) + a.get("misses", 0):
        return ""
    n = a["hits"] + a["misses"]
    return (f"; endpoint ATC hit rate {100.0 * a['hits'] / n:.1f}% ({a['hits']}/{n}), "
            f"{a.get('invalidations', 0)} ATC_INV")


@dataclass
class BootSummary:
    ok: bool = False
    error: str | None = None
    markers: list[Marker] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    qemu: str = ""
    kernel: str = ""
    sva: str = ""  # whether the stock driver can enable SVA on this machine, and why not
    workdir: Path | None = None
    console_log: Path | None = None
    server_log: Path | None = None
    qemu_rc: int | None = None
    server_rc: int | None = None
    predicted_bar0: dict[str, int] = field(default_factory=dict)
    backend: dict[str, Any] | None = None  # query_backend() at the end
    backend_before_unplug: dict[str, Any] | None = None  # query_backend() before device_del
    backend_error: str | None = None
    unexpected_kmsg: list[dict[str, Any]] = field(default_factory=list)

    def marks(self, name: str) -> list[Any]:
        return [m.data for m in self.markers if m.name == name]

    @property
    def pci_devices(self) -> list[dict[str, Any]]:
        return self.marks("pci-dev")

    def checks(self) -> list[tuple[str, dict[str, Any]]]:
        """The guest test programs' result lines (markers with an ``ok``), in order."""
        return [(m.name, m.data) for m in self.markers
                if m.name not in CHECKLESS_MARKERS and isinstance(m.data, dict)
                and isinstance(m.data.get("ok"), bool)]

    @property
    def guest_errors(self) -> list[Any]:
        return self.marks("error")

    def format(self) -> str:
        lines = [f"boot: {'OK' if self.ok else 'FAILED'}" + (f": {self.error}" if self.error else "")]
        lines.append(f"  qemu: {self.qemu}")
        lines.append(f"  kernel: {self.kernel}")
        if self.sva:
            lines.append(f"  sva: {self.sva}")
        for d in self.pci_devices:
            bars = " ".join(f"BAR{b['index']}={b['start']}" for b in d.get("bars", []))
            lines.append(f"  pci {d['bdf']} {d['vendor']}:{d['device']} {bars} driver={d.get('driver') or '-'}"
                         f" group={d.get('iommu_group') or '-'}")
        for s in self.marks("smmu"):
            lines.append(f"  smmu: {json.dumps(s)}")
        for k in self.marks("kmsg"):
            if "smmu" in str(k.get("text", "")).lower():
                lines.append(f"  dmesg<{k.get('level')}>: {k.get('text')}")
        for d in self.marks("blk-dev"):
            lines.append(f"  blk: /dev/{d.get('dev')} {d.get('bytes', 0) >> 20} MiB at {d.get('bdf')} "
                         f"iommu group {d.get('iommu_group') or '-'} ({d.get('domain_type') or '?'})")
        for io in self.marks("blk-io"):
            lines.append(f"  blk bs={io['bs']:>7}: {io['bytes'] >> 10} KiB  write {_mbps(io['bytes'], io['write_ms'])}"
                         f"  read {_mbps(io['bytes'], io['read_ms'])}  data {'OK' if io.get('match') else 'MISMATCH'}")
        for u in self.marks("unplug"):
            lines.append(f"  unplug {u.get('bdf')}: gone in {u.get('ms')} ms"
                         + (f" with I/O running ({u.get('busy_iterations')} loops)" if u.get("busy_iterations") else ""))
        for name, d in self.checks():
            lines.append(f"  check {name}: {'OK' if d['ok'] else 'FAILED'}")
        lines += self.backend_lines()
        for k in self.unexpected_kmsg:
            lines.append(f"  UNEXPECTED kernel message <{k.get('level')}>: {k.get('text')}")
        for e in self.guest_errors:
            lines.append(f"  guest error: {json.dumps(e)}")
        done = self.marks("done")
        lines.append(f"  guest result: {'errors=' + str(done[-1].get('errors')) if done else 'no done marker'}")
        lines.append("  times: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items()))
        lines.append(f"  logs: {self.console_log} {self.server_log}")
        return "\n".join(lines)


    def backend_lines(self) -> list[str]:
        if self.backend_error:
            return [f"  backend QMP: {self.backend_error}"]
        if not self.backend or "viommu" not in self.backend:
            return []
        smmus = self.backend.get("smmus", {})
        if len(smmus) < 2:
            return _smmu_lines(self.backend["viommu"])
        return [line for name, view in smmus.items()
                for line in _smmu_lines(view["viommu"], f"iommu {name}")]


def _smmu_lines(v: dict[str, Any], tag: str = "iommu") -> list[str]:
    """The summary lines of one SMMU's query-viommu, each starting with ``tag``."""
    c, t = v.get("counters", {}), v.get("translation", {})
    tlb = t.get("tlb", {})
    looks = tlb.get("hits", 0) + tlb.get("misses", 0)
    cmds = ", ".join(f"{k} {n}" for k, n in sorted(c.get("commands", {}).items()))
    reads = c.get("mmio_reads", {})
    return [
        f"  {tag}: {t.get('bytes_read', 0) + t.get('bytes_written', 0)} bytes through the SMMU "
        f"(DMA read {t.get('bytes_read', 0)} in {t.get('dma_reads', 0)}, "
        f"write {t.get('bytes_written', 0)} in {t.get('dma_writes', 0)})",
        f"  {tag}: translations {t.get('translations', 0)}, walks {t.get('walks', 0)}, "
        f"TLB hit rate {100.0 * tlb.get('hits', 0) / looks if looks else 0.0:.1f}% "
        f"({tlb.get('hits', 0)}/{looks}), faults {t.get('faults', 0)}" + _atc_line(t),
        f"  {tag}: commands: {cmds or '-'}",
        f"  {tag}: CMD_SYNC {c.get('syncs', 0)} (MSI writes {c.get('msi_writes', 0)}), trapped reads "
        f"CMDQ_CONS {reads.get('CMDQ_CONS', 0)} of {sum(reads.values())} register reads",
        f"  {tag}: events {json.dumps(c.get('events', {}))}, GERRORs {json.dumps(c.get('gerrors', {}))}",
        _pasid_line(c, t, tag),
    ] + _sanitizer_lines(t, tag)


def _sanitizer_lines(t: dict[str, Any], tag: str) -> list[str]:
    """The driver sanitizer (SMMU option ``sanitize``): its checks, one line per
    violation it still holds, the device's reports and the no-match counters."""
    san = t.get("sanitizer")
    if san is None:
        return []
    found = ", ".join(f"{k} {n}" for k, n in san["violations"].items() if n) or "none"
    device = ", ".join(f"{k} {n}" for k, n in san.get("device", {}).items() if n) or "none"
    unmatched = ", ".join(f"{k} {n}" for k, n in san.get("no-match", {}).items() if n) or "none"
    return [f"  {tag}: sanitizer: {san['checks']} cached entries checked, violations: {found}"
            ] + [f"  {tag}: sanitizer: " + " ".join(
                f"{k}={hex(v) if isinstance(v, int) and not isinstance(v, bool) else v}"
                for k, v in rec.items()) for rec in san["recent"]] + [
            f"  {tag}: sanitizer: device use after unmap: {device}; invalidations matching "
            f"nothing live: {unmatched}"]


def _pasid_line(c: dict[str, Any], t: dict[str, Any], tag: str) -> str:
    """SubstreamID (PASID) traffic and the stall model at work (query-viommu counters)."""
    return (f"  {tag}: PASID: translations {t.get('ssid_translations', 0)}, DMA bytes "
            f"{t.get('ssid_bytes_read', 0) + t.get('ssid_bytes_written', 0)}, CFGI_CD with "
            f"SSID {c.get('cfgi_cd_ssids', 0)}; stalls {t.get('stalls', 0)} (resumed "
            f"{t.get('stall_retries', 0)}, aborted {t.get('stall_aborts', 0)}, STALL_TERM "
            f"{t.get('stall_terms', 0)}, held {t.get('stalls_held', 0)})")


def _mbps(nbytes: int, ms: int) -> str:
    return f"{nbytes / 1e6 / (ms / 1000):7.2f} MB/s" if ms > 0 else "      ? MB/s"


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
    server: asyncio.subprocess.Process | None = None
    guest: QemuGuest | None = None
    ctx: HostContext | None = None
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
        if config.iommu_function() is not None:
            blockers = sva_blockers(config)
            s.sva = "; ".join(blockers) if blockers else \
                f"SMMU meets the driver's SVA checks (cpu {config.machine.cpu})"

        t = time.monotonic()
        argv = server_command(wd, cfg_file, qmp_server, server_argv)
        progress(f"[boot] starting backend: {' '.join(argv)}")
        with open(s.server_log, "wb") as log:
            server = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        await _wait_sockets(server, [wd / fn.socket_name for fn in config.functions], s.server_log)
        s.timings["server"] = time.monotonic() - t

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
        args = qemu_args(config, kernel=tools.image.kernel, initrd=tools.image.initrd, socket_dir=wd,
                         qmp_path=qmp_qemu, dtb=dtb, cmdline_extra=extra.strip())
        guest = QemuGuest(tools.qemu, args, s.console_log, qmp_qemu, bind_paths=[wd, tools.cache])
        progress(f"[boot] starting QEMU (console: {s.console_log})")
        t = time.monotonic()
        await guest.start()
        ctx = HostContext(guest, s, qmp_server)
        await _follow(guest, config, s, progress, t, keep_running, server, on_marker, ctx)
        s.timings["guest"] = time.monotonic() - t
        if s.backend is None:
            await _query_backend(s, qmp_server, server)
        rc = await guest.wait(30)
        if rc is None:
            raise GuestError("guest printed 'done' but did not power off within 30 s")
        s.qemu_rc = rc
        if rc != 0:
            raise GuestError(f"QEMU exited with {rc}:\n" + guest.console_tail())
        backend_failure(s)
        if s.guest_errors:
            raise GuestError(f"{len(s.guest_errors)} workload error(s) in the guest")
        s.unexpected_kmsg = kmsg_problems(s.markers, [*kmsg_allowed, *config_expected(config)])
        if s.unexpected_kmsg:
            raise GuestError(f"{len(s.unexpected_kmsg)} unexpected guest kernel warning(s)/error(s): "
                             + "; ".join(str(k.get("text")) for k in s.unexpected_kmsg[:5]))
        s.ok = True
    except (SetupError, GuestError, ConfigError, OSError, QMPError) as e:
        s.error = str(e)
        if server is not None and server.returncode is not None and s.server_log:
            s.error += f"\nbackend server exited (rc={server.returncode}):\n" + _tail(s.server_log)
    finally:
        if ctx is not None:
            await ctx.close()
        if s.backend is None and s.workdir is not None:  # failed run: still show the counters
            with contextlib.suppress(Exception):
                await asyncio.wait_for(_query_backend(s, s.workdir / "viommu-qmp.sock", server), 15)
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


def backend_failure(s: BootSummary) -> None:
    """Raise when the backend failed during the run: errors it logged (tracebacks shown),
    a command sink that failed, or no final state to judge by."""
    if s.backend_error is not None:
        raise GuestError(f"no final state from the backend's QMP socket: {s.backend_error}")
    if s.backend is None:
        return  # a server without the QMP socket (a test's own): nothing to judge by
    errors = s.backend.get("errors", {})
    views = s.backend.get("smmus") or {"": s.backend}  # each SMMU's query-viommu
    sink_errors = sum(u.get("viommu", {}).get("counters", {}).get("sink_errors", 0)
                      for u in views.values())
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
                     f"{_mbps(m.data['bytes'], m.data['write_ms']).strip()}, read "
                     f"{_mbps(m.data['bytes'], m.data['read_ms']).strip()}, "
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

