"""The backend process: the functions of a configuration served over vfio-user, the
domain manager between them, and the QMP control socket.

``Backend`` is what ``viommu-backend serve`` runs; tests build one in-process too.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Callable, Iterable, Mapping

from viommu_backend.errorlog import ErrorLog
from viommu_backend.faults import FaultInjector
from viommu_backend.config import SMMU_FUNCTION_KEYS, Config, ConfigError, FunctionConfig
from viommu_backend.pci.function import PciFunction
from viommu_backend.qmp.commands import forward_events, register_viommu_commands
from viommu_backend.qmp.host import forward_faults, register_host_commands
from viommu_backend.qmp.inject import register_inject_commands
from viommu_backend.qmp.server import QmpCommandRegistry, QmpServer
from viommu_backend.qmp.stream import register_stream_commands
from viommu_backend.qmp.trace import register_trace_commands
from viommu_backend.trace import TraceError, Tracer
from viommu_backend.topology import Placement, placements
from viommu_backend.vfio_user.server import VfioUserServer

log = logging.getLogger(__name__)


def _where(w: Path | socket.socket | None) -> str:
    """A function's socket as text: its path, ``fd:N`` for one handed in, or ``-``."""
    if isinstance(w, socket.socket):
        return f"fd:{w.fileno()}"
    return str(w) if w is not None else "-"

IOMMU_SOCKET = "viommu.sock"


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
        self.iommu = None  # SMMUv3Function, when the config has one
        self.manager = None  # DomainManager, when there is an IOMMU
        self.injector: FaultInjector | None = None  # fault injection state (QMP viommu-inject-*)
        self.qmp = None
        self.warnings: dict[str, list[str]] = {}  # function -> problems seen at run time
        # every ERROR record of the package's loggers while this backend lives (QMP
        # query-viommu-errors): a run fails on any of them
        self.errors = ErrorLog()
        self.errors.attach(logging.getLogger("viommu_backend"))
        self._build()

    # -- construction ---------------------------------------------------------------------
    def _build(self) -> None:
        iommu_cfg = self.config.iommu_function()
        if iommu_cfg is not None:
            self._build_iommu(iommu_cfg)
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
        from viommu_backend.smmuv3.config import SmmuConfig
        from viommu_backend.smmuv3.function import SMMUv3Function

        smmu_opts = {k: v for k, v in fc.options.items() if k not in SMMU_FUNCTION_KEYS}
        host_s2, layout = host_options(fc)
        if host_s2:  # the guest sees a stage-1-only SMMU: the host owns stage 2
            smmu_opts["s2p"] = False
        try:
            smmu_config = SmmuConfig(**smmu_opts)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"function {fc.name}: bad SMMU option: {e}") from e
        fn = SMMUv3Function(fc.name, smmu_config)
        fn.smmu.trace = self.tracer  # attach_smmu shares it with the manager
        self.manager = DomainManager(lambda: fn.ctx.memory if fn.ctx is not None else None,
                                     host_s2=host_s2, host_layout=layout)
        self.manager.attach_smmu(fn.smmu)
        self.injector = FaultInjector().install(self.manager, fn.smmu)
        self.iommu = fn
        self.functions[fc.name] = fn

    def _attach_dma(self, fn: PciFunction, fc: FunctionConfig) -> None:
        """Endpoints behind the IOMMU DMA through the domain manager with their StreamID;
        the others (or all, without an IOMMU) DMA to guest-physical addresses."""
        set_port = getattr(fn, "set_dma_port", None)
        if set_port is None:
            return
        from viommu_backend.endpoints.dma import DirectDma, TranslatedDma

        p = self.placements[fc.name]
        behind = self.manager is not None and p.stream_id >= self.config.iommu.iommu_map_base
        set_port(TranslatedDma(fn, self.manager, p.stream_id) if behind else DirectDma(fn))
        if behind:
            self._add_device(fn, fc, p)
        if behind and fn.ats is not None:  # its DMA uses an ATC while the guest enables ATS
            ats = fn.ats
            self.manager.ats_probes[p.stream_id] = lambda: ats.enabled
        if behind and fn.msix is not None:
            self._warn_msix_translated(fn, p.stream_id)

    def _add_device(self, fn: PciFunction, fc: FunctionConfig, p: Placement) -> None:
        """Bind the endpoint's stream in the domain manager: its name, its group (the
        ``group`` option, else the functions of one device -- no ACS -- share one) and
        whether it can have No Snoop blocked (``enforce_cc``); with PRI, the hook the
        host uses to turn its page requests on and off."""
        assert self.manager is not None
        group = fc.options.get("group")
        if group is not None and (isinstance(group, bool) or not isinstance(group, (str, int))):
            raise ConfigError(f"function {fc.name}.group: a name or a number, got {group!r}")
        if group is None and any(q.bus == p.bus and q.devfn >> 3 == p.devfn >> 3
                                 for q in self.placements.values() if q is not p):
            group = f"{p.bus:02x}:{p.devfn >> 3:02x}"  # functions of one device
        cc = fc.options.get("enforce_cc", True)
        if not isinstance(cc, bool):
            raise ConfigError(f"function {fc.name}.enforce_cc: true or false, got {cc!r}")
        self.manager.add_device(p.stream_id, name=fc.name, group=group,
                                can_enforce_coherency=cc)
        if fn.pri is not None:
            pri = fn.pri
            self.manager.iopf_hooks[p.stream_id] = \
                lambda on: pri.host_enable(pri.capacity) if on else pri.host_disable()

    def _warn_msix_translated(self, fn: PciFunction, sid: int) -> None:
        """MSI-X enabled on a stream in a translating domain: QEMU delivers a vfio-user
        device's MSIs itself, untranslated, to the IOVA the guest programmed -- the guest
        will not get these interrupts.  Say so in the log (once per enable)."""
        from viommu_backend.pci.capabilities import MSIX_CTRL, MSIX_REGS

        assert fn.msix is not None and self.manager is not None
        mgr = self.manager

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
        return self.socket_dir / (IOMMU_SOCKET if fc.kind == "smmuv3" else f"{fc.name}.sock")

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
            if self.iommu is not None:
                forward_events(self.iommu.smmu, self.qmp.emit)
            if self.manager is not None:
                forward_faults(self.manager, self.qmp.emit)

    def qmp_registry(self) -> QmpCommandRegistry:
        registry = QmpCommandRegistry()
        registry.register("query-viommu-functions", self._query_functions,
                          doc="per PCI function: kind, BDF and StreamID, socket, trapped BAR reads/writes")
        registry.register("query-viommu-errors", lambda _args: self.errors.describe(),
                          doc="the backend's own errors (logged at ERROR level) since it started: "
                              "count and the most recent with tracebacks; a run fails on any")
        if self.manager is not None and self.iommu is not None:
            register_viommu_commands(registry, self.manager, self.iommu.smmu)
            register_host_commands(registry, self.manager)
            register_inject_commands(registry, self)
            register_trace_commands(registry, self.tracer, self._emit)
            register_stream_commands(registry, self.manager, self.iommu.smmu)
        return registry

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
                         "bar-reads": {str(k): v for k, v in sorted(fn.bar_reads.items())},
                         "bar-writes": {str(k): v for k, v in sorted(fn.bar_writes.items())},
                         "irqs": dict(sorted(fn.irq_signals.items())),
                         "warnings": list(self.warnings.get(name, ()))}
        return out

    async def close(self) -> None:
        self.errors.detach(logging.getLogger("viommu_backend"))
        if self.injector is not None:
            self.injector.close()  # disarms rules, cancels delayed CMD_SYNC releases
        if self.qmp is not None:
            await self.qmp.stop()
            self.qmp = None
        await self.server.close()


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
