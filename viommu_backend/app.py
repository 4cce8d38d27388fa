"""The backend process: the functions of a configuration served over vfio-user, the
domain manager between them, and the QMP control socket.

``Backend`` is what ``viommu-backend serve`` runs; tests build one in-process too.

A configuration may have several SMMU functions, one per root complex (``root_complex``):
each is an :class:`SmmuUnit` with its own domain manager, stream table, fault injector and
the endpoints of its root complex.  Every per-SMMU QMP command takes an optional ``smmu``
argument naming the function (needed only when there are several);
``query-viommu-smmus`` lists them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from viommu_backend.errorlog import ErrorLog
from viommu_backend.fault_injection import FaultInjector
from viommu_backend.config import Config, ConfigError, FunctionConfig, smmu_config
from viommu_backend.endpoints.virtio.pci import VirtioPciFunction
from viommu_backend.pci.function import PciFunction
from viommu_backend.qmp.commands import (forward_events, forward_sanitizer,
                                         register_viommu_commands)
from viommu_backend.qmp.host import forward_faults, register_host_commands
from viommu_backend.qmp.inject import register_inject_commands
from viommu_backend.qmp.server import QmpCommandRegistry, QmpServer
from viommu_backend.qmp.smmus import register_smmu_commands
from viommu_backend.qmp.stream import register_stream_commands
from viommu_backend.qmp.trace import register_trace_commands
from viommu_backend.trace import TraceError, Tracer
from viommu_backend.topology import Placement, placements, translated
from viommu_backend.vfio_user.server import VfioUserServer

log = logging.getLogger(__name__)


def _where(w: Path | socket.socket | None) -> str:
    """A function's socket as text: its path, ``fd:N`` for one handed in, or ``-``."""
    if isinstance(w, socket.socket):
        return f"fd:{w.fileno()}"
    return str(w) if w is not None else "-"



@dataclass
class SmmuUnit:
    """One SMMU function with its domain manager and fault injector, and the endpoints
    it translates (``functions``: the view QMP's injection commands work on)."""

    name: str
    iommu: Any  # SMMUv3Function
    manager: Any  # DomainManager
    injector: FaultInjector
    root_complex: str
    backend: "Backend"
    functions: dict[str, PciFunction] = field(default_factory=dict)

    @property
    def qmp(self) -> QmpServer | None:
        return self.backend.qmp

    def emit(self, event: str, data: dict) -> None:
        """A QMP event of this SMMU (naming it when the backend has several)."""
        if self.backend.qmp is not None:
            many = len(self.backend.smmus) > 1
            self.backend.qmp.emit(event, {**data, "smmu": self.name} if many else data)


class Backend:
    """Builds the functions of ``config`` and serves them from ``socket_dir``."""

    def __init__(self, config: Config, socket_dir: Path | None, *, qmp_path: Path | None = None,
                 trace: Iterable[str] | str = (),
                 sockets: Mapping[str, Path | socket.socket] | None = None) -> None:
        """``socket_dir``: every function at DIR/viommu.sock or DIR/<name>.sock; or
        ``sockets``: only the functions named there, each at its path or on a socket
        handed in (the vfio-user backend program conventions' --socket-path / --fd)."""
        self.config = config
        try:  # trace records of the SMMU, domain manager and vfio-user server (QMP viommu-trace)
            self.tracer = Tracer(enable=trace)
        except TraceError as e:
            raise ConfigError(str(e)) from e
        self.socket_dir = Path(socket_dir) if socket_dir is not None else None
        self.sockets = dict(sockets) if sockets is not None else None
        if self.socket_dir is None and self.sockets is None:
            raise ConfigError("serve needs a socket folder or the sockets of the functions to serve")
        self.qmp_path = qmp_path
        self.placements: dict[str, Placement] = placements(config)
        self.server = VfioUserServer(tracer=self.tracer)
        self.functions: dict[str, PciFunction] = {}
        self.smmus: dict[str, SmmuUnit] = {}  # the SMMU functions, config order
        # the first SMMU's function, domain manager and fault injection state (QMP
        # viommu-inject-*): None without an IOMMU
        self.iommu = None
        self.manager = None
        self.injector: FaultInjector | None = None
        self.qmp = None
        self.warnings: dict[str, list[str]] = {}  # function -> problems seen at run time
        # every ERROR record of the package's loggers while this backend lives (QMP
        # query-viommu-errors): a run fails on any of them
        self.errors = ErrorLog()
        self.errors.attach(logging.getLogger("viommu_backend"))
        self._build()

    # -- construction ---------------------------------------------------------------------
    def _build(self) -> None:
        for iommu_cfg in self.config.iommu_functions():
            self._build_iommu(iommu_cfg)
        first = next(iter(self.smmus.values()), None)
        if first is not None:
            self.iommu, self.manager, self.injector = first.iommu, first.manager, first.injector
        for fc in self.config.functions:
            if fc.kind == "smmuv3":
                continue
            builder = ENDPOINT_BUILDERS.get(fc.kind)
            if builder is None:
                raise ConfigError(f"function {fc.name}: unknown kind {fc.kind!r} "
                                  f"(known: smmuv3, {', '.join(sorted(ENDPOINT_BUILDERS))})")
            fn = builder(fc)
            self._attach_dma(fn, fc)
            self.functions[fc.name] = fn

    def _build_iommu(self, fc: FunctionConfig) -> None:
        from viommu_backend.domains import DomainManager
        from viommu_backend.smmuv3.function import SMMUv3Function

        host_s2, layout = host_options(fc)
        # with a hidden stage 2 the guest sees a stage-1-only SMMU: the host owns stage 2
        fn = SMMUv3Function(fc.name, smmu_config(fc, **({"s2p": False} if host_s2 else {})))
        fn.smmu.trace = self.tracer  # attach_smmu shares it with the manager
        manager = DomainManager(lambda: fn.ctx.memory if fn.ctx is not None else None,
                                host_s2=host_s2, host_layout=layout)
        manager.attach_smmu(fn.smmu)
        injector = FaultInjector().install(manager, fn.smmu)
        fn.on_reset.append(lambda: _smmu_reset(manager))  # after the registers' reset
        self.smmus[fc.name] = SmmuUnit(fc.name, fn, manager, injector, fc.root_complex, self,
                                       {fc.name: fn})
        self.functions[fc.name] = fn

    def _attach_dma(self, fn: PciFunction, fc: FunctionConfig) -> None:
        """Endpoints behind the IOMMU DMA through the domain manager with their StreamID;
        the others (or all, without an IOMMU) DMA to guest-physical addresses."""
        set_port = getattr(fn, "set_dma_port", None)
        if set_port is None:
            return
        from viommu_backend.endpoints.dma import DirectDma, TranslatedDma

        p = self.placements[fc.name]
        iommu = self.config.iommu_of(fc)
        if iommu is None or not translated(self.config, fc, p):
            set_port(DirectDma(fn))
            return
        unit = self.smmus[iommu.name]
        unit.functions[fc.name] = fn
        set_port(TranslatedDma(fn, unit.manager, p.stream_id))
        if unit.iommu.poller is not None:  # its driver unmaps (CMD_SYNC) after the interrupt
            fn.on_irq_signal.append(unit.iommu.poller.kick)
        self._add_device(unit.manager, fn, fc, p)
        if fn.ats is not None:  # its DMA uses an ATC while the guest enables ATS
            ats = fn.ats
            unit.manager.ats_probes[p.stream_id] = lambda: ats.enabled
        if fn.msix is not None:
            self._warn_msix_translated(unit.manager, fn, p.stream_id)

    def _add_device(self, manager: Any, fn: PciFunction, fc: FunctionConfig, p: Placement) -> None:
        """Bind the endpoint's stream in the domain manager: its name, its group (the
        ``group`` option, else the functions of one device -- no ACS -- share one) and
        whether it can have No Snoop blocked (``enforce_cc``); with PRI, the hook the
        host uses to turn its page requests on and off."""
        group = fc.options.get("group")
        if group is not None and (isinstance(group, bool) or not isinstance(group, (str, int))):
            raise ConfigError(f"function {fc.name}.group: a name or a number, got {group!r}")
        if group is None and any((q.domain, q.bus, q.devfn >> 3) == (p.domain, p.bus, p.devfn >> 3)
                                 for q in self.placements.values() if q is not p):
            group = f"{p.bus:02x}:{p.devfn >> 3:02x}"  # functions of one device
        cc = fc.options.get("enforce_cc", True)
        if not isinstance(cc, bool):
            raise ConfigError(f"function {fc.name}.enforce_cc: true or false, got {cc!r}")
        manager.add_device(p.stream_id, name=fc.name, group=group, can_enforce_coherency=cc)
        if fn.pri is not None:
            pri = fn.pri
            manager.iopf_hooks[p.stream_id] = \
                lambda on: pri.host_enable(pri.capacity) if on else pri.host_disable()

    def _warn_msix_translated(self, mgr: Any, fn: PciFunction, sid: int) -> None:
        """MSI-X enabled on a stream in a translating domain: QEMU delivers a vfio-user
        device's MSIs itself, untranslated, to the IOVA the guest programmed -- the guest
        will not get these interrupts.  Say so in the log (once per enable)."""
        from viommu_backend.pci.capabilities import MSIX_CTRL, MSIX_REGS

        assert fn.msix is not None

        def on_ctrl(old: int, new: int) -> None:
            if MSIX_CTRL.get(old, "ENABLE") or not MSIX_CTRL.get(new, "ENABLE"):
                return
            if mgr.translates(sid):
                self.warnings.setdefault(fn.name, []).append(
                    f"{fn.name}: MSI-X enabled on translated stream {sid:#x}")
                log.warning("%s: the guest enabled MSI-X while StreamID %#x is translated: "
                            "QEMU delivers vfio-user MSIs untranslated (to the doorbell's "
                            "IOVA), so these interrupts will not reach the guest; use INTx "
                            "(options msix = false) or an identity domain", fn.name, sid)

        fn.cfg.watch(fn.msix.off + MSIX_REGS["CTRL"].offset, 2, on_ctrl)

    # -- lifetime -------------------------------------------------------------------------
    def socket_path(self, name: str) -> Path | socket.socket | None:
        """Where function ``name`` is served (None: not served by this process)."""
        if self.sockets is not None:
            return self.sockets.get(name)
        fc = self.config.function(name)
        assert self.socket_dir is not None
        return self.socket_dir / fc.socket_name

    def socket_paths(self) -> list[str]:
        return [_where(w) for n in self.functions if (w := self.socket_path(n)) is not None]

    async def start(self) -> None:
        for name, fn in self.functions.items():
            where = self.socket_path(name)
            if isinstance(where, socket.socket):
                self.server.add_device_socket(_where(where), where, fn)
            elif where is not None:
                where.parent.mkdir(parents=True, exist_ok=True)
                self.server.add_device(where, fn)
        await self.server.start()
        if self.qmp_path is not None:
            self.qmp = QmpServer(self.qmp_registry())
            await self.qmp.start(os.fspath(self.qmp_path))
            for unit in self.smmus.values():
                forward_events(unit.iommu.smmu, unit.emit)
                forward_faults(unit.manager, unit.emit)
                forward_sanitizer(unit.manager, unit.emit)

    def qmp_registry(self) -> QmpCommandRegistry:
        registry = QmpCommandRegistry()
        registry.register("query-viommu-functions", self._query_functions,
                          doc="per PCI function: kind, BDF and StreamID, socket, trapped BAR reads/writes")
        registry.register("query-viommu-errors", lambda _args: self.errors.describe(),
                          doc="the backend's own errors (logged at ERROR level) since it started: "
                              "count and the most recent with tracebacks; a run fails on any")
        if not self.smmus:
            return registry
        per_smmu = {}
        for name, unit in self.smmus.items():
            sub = per_smmu[name] = QmpCommandRegistry()
            register_viommu_commands(sub, unit.manager, unit.iommu.smmu)
            register_host_commands(sub, unit.manager)
            register_inject_commands(sub, unit)
            register_stream_commands(sub, unit.manager, unit.iommu.smmu)
        register_smmu_commands(registry, per_smmu, self._describe_smmus)
        register_trace_commands(registry, self.tracer, self._emit)
        return registry

    def _smmu_of(self, name: str) -> str | None:
        """The SMMU that translates endpoint ``name`` (None: untranslated, or an SMMU)."""
        return next((u.name for u in self.smmus.values() if name in u.functions and name != u.name), None)

    def _describe_smmus(self) -> list[dict[str, Any]]:
        """``query-viommu-smmus``: each SMMU function, its root complex and its endpoints."""
        out = []
        for name, unit in self.smmus.items():
            out.append({"name": name, "bdf": self.placements[name].bdf, "root-complex": unit.root_complex,
                        "connected": unit.iommu.ctx is not None,
                        "endpoints": [{"name": n, "bdf": self.placements[n].bdf,
                                       "stream-id": self.placements[n].stream_id}
                                      for n in unit.functions if n != name]})
        return out

    def _emit(self, event: str, data: dict) -> None:
        if self.qmp is not None:
            self.qmp.emit(event, data)

    def _query_functions(self, args: dict) -> dict:
        out = {}
        for name, fn in self.functions.items():
            p = self.placements[name]
            out[name] = {"kind": self.config.function(name).kind, "bdf": p.bdf,
                         "stream-id": p.stream_id, "socket": _where(self.socket_path(name)),
                         "connected": fn.ctx is not None,
                         **({"smmu": unit} if (unit := self._smmu_of(name)) else {}),
                         "bar-reads": {str(k): v for k, v in sorted(fn.bar_reads.items())},
                         "bar-writes": {str(k): v for k, v in sorted(fn.bar_writes.items())},
                         "irqs": dict(sorted(fn.irq_signals.items())), "resets": fn.resets,
                         **({"virtio": dataclasses.asdict(fn.stats)} if isinstance(fn, VirtioPciFunction) else {}),
                         "warnings": list(self.warnings.get(name, ()))}
        return out

    async def close(self) -> None:
        self.errors.detach(logging.getLogger("viommu_backend"))
        for unit in self.smmus.values():
            unit.injector.close()  # disarms rules, cancels delayed CMD_SYNC releases
        if self.qmp is not None:
            await self.qmp.stop()
            self.qmp = None
        await self.server.close()
        for fn in self.functions.values():  # completed writes made stable, files closed
            close = getattr(fn, "close", None)
            if close is not None:
                close()


def _smmu_reset(manager: Any) -> None:
    """The SMMU function was reset (SMMUEN now 0): streams follow GBPA again and no
    cached configuration or translation survives."""
    manager.stream_table_changed()
    manager.flush_all()


def host_options(fc: FunctionConfig) -> tuple[bool, str]:
    """The SMMU function's host-side options: ``host_s2`` (the host owns stage 2; the
    guest sees IDR0.S2P = 0) and ``host_pa`` (where the host places guest RAM:
    ``identity`` or ``reversed``)."""
    from viommu_backend.domains.host import LAYOUTS

    host_s2 = fc.options.get("host_s2", False)
    layout = fc.options.get("host_pa", "identity")
    if not isinstance(host_s2, bool):
        raise ConfigError(f"function {fc.name}.host_s2: true or false, got {host_s2!r}")
    if layout not in LAYOUTS:
        raise ConfigError(f"function {fc.name}.host_pa: one of {', '.join(LAYOUTS)}, "
                          f"got {layout!r}")
    if host_s2 and fc.options.get("s2p", False):
        raise ConfigError(f"function {fc.name}: s2p = true contradicts host_s2 (the guest "
                          f"sees a stage-1-only SMMU)")
    if "host_pa" in fc.options and not host_s2:
        raise ConfigError(f"function {fc.name}.host_pa: only with host_s2 = true")
    return host_s2, layout


def _testdev(fc: FunctionConfig) -> PciFunction:
    from viommu_backend.endpoints.testdev import TestDevice

    return TestDevice(fc.name, pasid=bool(fc.options.get("pasid", True)))


def _virtio_blk(fc: FunctionConfig) -> PciFunction:
    from viommu_backend.config import parse_size
    from viommu_backend.endpoints.virtio.pci import VirtioFeature
    from viommu_backend.endpoints.virtio_blk import VirtioBlk

    backing = fc.options.get("file")
    if backing is None:
        backing = parse_size(fc.options.get("size", "64M"), f"function {fc.name}.size")
    fn = VirtioBlk(fc.name, backing=backing, msix=bool(fc.options.get("msix", True)))
    if fc.options.get("ats", False):  # an ATS capability: the driver may enable ATS
        fn.add_ats()
    if not fc.options.get("indirect", True):  # no VIRTIO_F_INDIRECT_DESC: one mapping less
        fn.device_features &= ~(1 << VirtioFeature.RING_INDIRECT_DESC)  # per request
    return fn


ENDPOINT_BUILDERS: dict[str, Callable[[FunctionConfig], PciFunction]] = {
    "testdev": _testdev,
    "virtio-blk": _virtio_blk,
}
