"""QMP fault-injection commands and the host-side DMA command.

``register_inject_commands(registry, backend)`` installs a
:class:`~viommu_backend.fault_injection.FaultInjector` on the backend's domain manager and SMMU
(reusing one already installed) and registers:

- ``viommu-inject-event {type, sid, ssid?, iova?, ipa?, fetch-addr?, write?, stall?, stag?,
  class?, s2?}`` -> ``{outcome: written|overflow|abort|disabled}``: one event record into
  the event queue (architected encoding), with its interrupt;
- ``viommu-inject-fault {sid, ssid?, iova, size?, type?, once?, write-only?}`` -> ``{id}``:
  that stream's translations of ``[iova, iova+size)`` fault (once, or until cleared);
  ``viommu-clear-fault {id?}`` -> ``{cleared}``; ``query-viommu-faults`` -> the rules;
- ``viommu-inject-gerror {error, cerror?}`` -> ``{raised}``;
- ``viommu-inject-sync {mode, count?, delay-ms?}`` (see :mod:`viommu_backend.fault_injection`);
- ``viommu-inject-atc {sid, mode}`` -> ``{atc-ignore: [sid...]}``: ``ignore`` makes the ATS
  endpoint of ``sid`` complete CMD_ATC_INV without dropping its cached translations
  (``normal`` ends it);
- ``viommu-inject-drop-invalidation {command, sid?, ssid?, asid?, vmid?, addr?, count?}``
  -> ``{id}``: the SMMU drops the next ``count`` (default 1) invalidations ``command``
  (CFGI_STE, TLBI_NH_VA, ... or a family: CFGI, TLBI) whose fields equal the given ones
  and whose address span contains ``addr``, as though the driver had not sent them (its
  caches keep the entries); ``query-viommu`` ``injected.drops`` lists the armed rules;
- ``viommu-inject-page-request {sid, addr, ssid?, read?, write?, exec?, priv?, last?,
  prg-index?}`` -> ``{prg-index, pending, outcome}``: the stream issues a PCIe Page
  Request through the domain manager (PRIQ record + PRIQ interrupt; the guest answers with
  CMD_PRI_RESP); ``query-viommu-page-requests`` -> the injected requests with their
  ``state`` (pending / answered) and ``response`` (SUCCESS / INVALID / FAILURE);
- ``viommu-dma {device, iova, size, write?, data?, ssid?, no-snoop?}`` -> ``{data: hex}``
  (read), ``{written: n}`` (write) or ``{fault: "<event>", ...}``; an endpoint with PRI
  enabled answers a translation fault with a page request instead: ``{pending: true, job,
  page-request: {queue, cookie, ...}}``, and ``VIOMMU_DMA_COMPLETED {job, ...}`` (the same
  outcome keys) once the answer came and the retried DMA is over.  ``no-snoop``: the DMA
  carries No Snoop (if the function's Device Control allows it); the reply says whether it
  stayed so (``false``: its domain enforces cache coherency).

Every injection (and every fired injected fault / held CMD_SYNC) is counted in
``query-viommu`` ``"injected"`` and sent to QMP clients as ``VIOMMU_INJECTED``.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterator

from viommu_backend.fault_injection import DROP_MATCH_FIELDS, FaultInjector, InjectError

from .protocol import QmpError
from .server import QmpCommandRegistry

DMA_MAX = 1 << 20  # bytes per viommu-dma (the reply carries them as hex)


def _emit(backend: Any, event: str, data: dict[str, Any]) -> None:
    """A QMP event through the backend's (or SMMU unit's: it names the SMMU) ``emit``, or
    straight to its QMP server."""
    send = getattr(backend, "emit", None)
    if send is not None:
        send(event, data)
        return
    qmp = getattr(backend, "qmp", None)
    if qmp is not None:
        qmp.emit(event, data)


def _injector(backend: Any) -> FaultInjector:
    mgr, iommu = backend.manager, backend.iommu
    inj = getattr(mgr, "injector", None)
    if inj is None:
        inj = FaultInjector().install(mgr, iommu.smmu)
    return inj


def register_inject_commands(registry: QmpCommandRegistry, backend: Any) -> FaultInjector | None:
    """Register the commands for ``backend`` (an :class:`viommu_backend.app.Backend`:
    ``.manager``, ``.iommu``, ``.functions``, ``.qmp``).  Without an IOMMU only nothing
    is registered and None is returned."""
    if backend.manager is None or backend.iommu is None:
        return None
    inj = _injector(backend)

    def emit(info: dict[str, Any]) -> None:
        _emit(backend, "VIOMMU_INJECTED", info)

    inj.listeners.append(emit)
    _register_smmu_errors(registry, inj, backend.iommu.smmu)
    _register_translation_faults(registry, inj)
    _register_invalidations(registry, inj)
    _register_page_requests(registry, inj)
    _register_dma(registry, backend, inj)
    return inj


def _register_smmu_errors(registry: QmpCommandRegistry, inj: FaultInjector, smmu: Any) -> None:
    """viommu-inject-event, viommu-inject-gerror, viommu-inject-sync: what the SMMU itself
    reports or does wrong."""

    def inject_event(args: dict[str, Any]) -> dict[str, Any]:
        ev = inj.make_event(
            args["type"], args["sid"], ssid=args.get("ssid"), iova=args.get("iova", 0),
            ipa=args.get("ipa", 0), fetch_addr=args.get("fetch-addr", 0),
            write=args.get("write", False), stall=args.get("stall", False),
            stag=args.get("stag", 0), klass=args.get("class", "IN"), s2=args.get("s2", False))
        return {"outcome": inj.inject_event(ev)}

    def inject_gerror(args: dict[str, Any]) -> dict[str, Any]:
        raised = inj.inject_gerror(args["error"], args.get("cerror", "ILL"))
        return {"raised": raised, "gerror-active": smmu.gerror_active()}

    def inject_sync(args: dict[str, Any]) -> dict[str, Any]:
        inj.set_sync_mode(args["mode"], args.get("count", 1), args.get("delay-ms", 0))
        return inj.snapshot()["sync"]

    registry.register("viommu-inject-event", _checked(inject_event),
                      {"type": "str", "sid": "int", "*ssid": "int", "*iova": "int",
                       "*ipa": "int", "*fetch-addr": "int", "*write": "bool",
                       "*stall": "bool", "*stag": "int", "*class": "any", "*s2": "bool"},
                      doc="write an event record to the event queue and raise its interrupt")
    registry.register("viommu-inject-gerror", _checked(inject_gerror),
                      {"error": "str", "*cerror": "str"},
                      doc="raise a GERROR condition (CMDQ_ERR also stops the command queue)")
    registry.register("viommu-inject-sync", _checked(inject_sync),
                      {"mode": "str", "*count": "int", "*delay-ms": "int"},
                      doc="hold (drop) or delay the next CMD_SYNC completions; normal ends it")


def _register_translation_faults(registry: QmpCommandRegistry, inj: FaultInjector) -> None:
    """viommu-inject-fault, viommu-clear-fault, query-viommu-faults."""

    def inject_fault(args: dict[str, Any]) -> dict[str, Any]:
        rule = inj.add_fault(args["sid"], args["iova"], args.get("size", 4096),
                             ssid=args.get("ssid"), event=args.get("type", "F_TRANSLATION"),
                             once=args.get("once", False),
                             write_only=args.get("write-only", False))
        return {"id": rule.id}

    def clear_fault(args: dict[str, Any]) -> dict[str, Any]:
        return {"cleared": inj.clear_faults(args.get("id"))}

    def query_faults(args: dict[str, Any]) -> list[dict[str, Any]]:
        return inj.faults()

    registry.register("viommu-inject-fault", _checked(inject_fault),
                      {"sid": "int", "*ssid": "int", "iova": "int", "*size": "int",
                       "*type": "str", "*once": "bool", "*write-only": "bool"},
                      doc="make a stream's translations of an IOVA range fault")
    registry.register("viommu-clear-fault", _checked(clear_fault), {"*id": "int"},
                      doc="remove one injected fault (or all)")
    registry.register("query-viommu-faults", query_faults,
                      doc="injected translation faults with their hit counts")


def _register_invalidations(registry: QmpCommandRegistry, inj: FaultInjector) -> None:
    """viommu-inject-atc, viommu-inject-drop-invalidation: invalidations without effect."""

    def inject_atc(args: dict[str, Any]) -> dict[str, Any]:
        inj.set_atc_mode(args["sid"], args["mode"])
        return {"atc-ignore": sorted(inj.atc_ignore)}

    def inject_drop(args: dict[str, Any]) -> dict[str, Any]:
        rule = inj.add_drop(args["command"], addr=args.get("addr"), count=args.get("count", 1),
                            **{k: args.get(k) for k in DROP_MATCH_FIELDS})
        return {"id": rule.id}

    registry.register("viommu-inject-atc", _checked(inject_atc),
                      {"sid": "int", "mode": "str"},
                      doc="an ATS endpoint ignores (mode ignore) or honours (normal) CMD_ATC_INV")
    registry.register("viommu-inject-drop-invalidation", _checked(inject_drop),
                      {"command": "str", "*sid": "int", "*ssid": "int", "*asid": "int",
                       "*vmid": "int", "*addr": "int", "*count": "int"},
                      doc="drop the next matching CFGI / TLBI / ATC_INV (a missing invalidation)")


def _register_page_requests(registry: QmpCommandRegistry, inj: FaultInjector) -> None:
    """viommu-inject-page-request, query-viommu-page-requests."""

    def inject_page_request(args: dict[str, Any]) -> dict[str, Any]:
        rec = inj.inject_page_request(
            args["sid"], args["addr"], ssid=args.get("ssid"), prg_index=args.get("prg-index"),
            read=args.get("read", True), write=args.get("write", False),
            exec_=args.get("exec", False), priv=args.get("priv", False),
            last=args.get("last", True))
        out: dict[str, Any] = {"prg-index": rec.prg_index, "pending": rec.response is None,
                               "outcome": rec.outcome}
        if rec.response is not None:
            out["response"] = rec.response
        return out

    def query_page_requests(args: dict[str, Any]) -> list[dict[str, Any]]:
        return inj.page_requests()

    registry.register("viommu-inject-page-request", _checked(inject_page_request),
                      {"sid": "int", "*ssid": "int", "addr": "int", "*read": "bool",
                       "*write": "bool", "*exec": "bool", "*priv": "bool", "*last": "bool",
                       "*prg-index": "int"},
                      doc="issue a PRI page request from a stream (PRIQ record + interrupt)")
    registry.register("query-viommu-page-requests", query_page_requests,
                      doc="injected page requests with their state and PRI response")


def _checked(fn: Any) -> Any:
    """A handler whose InjectError becomes a QMP error."""
    def handler(args: dict[str, Any]) -> Any:
        try:
            return fn(args)
        except InjectError as e:
            raise QmpError(str(e)) from None
    return handler


def _register_dma(registry: QmpCommandRegistry, backend: Any, inj: FaultInjector) -> None:
    """viommu-dma, and VIOMMU_DMA_COMPLETED for the DMAs that waited for a page request."""
    jobs = itertools.count(1)

    def completed(info: dict[str, Any]) -> None:
        _emit(backend, "VIOMMU_DMA_COMPLETED", dict(info))

    def dma(args: dict[str, Any]) -> dict[str, Any]:
        out = _dma(backend, args, jobs, completed)
        inj.note("dma", device=args["device"], iova=args["iova"], size=args["size"],
                 write=args.get("write", False), **({"fault": out["fault"]}
                                                    if "fault" in out else {}))
        return out

    registry.register("viommu-dma", _checked(dma),
                      {"device": "str", "iova": "int", "size": "int", "*write": "bool",
                       "*data": "str", "*ssid": "int", "*no-snoop": "bool"},
                      doc="DMA from an endpoint through the IOMMU (with PRI: a job)")


def _dma_endpoint(backend: Any, name: str) -> tuple[Any, Any]:
    """The endpoint ``name`` and its translated DMA port."""
    from viommu_backend.endpoints.dma import TranslatedDma

    fn = backend.functions.get(name)
    if fn is None or fn is backend.iommu:
        endpoints = [n for n, f in backend.functions.items() if f is not backend.iommu]
        raise InjectError(f"no endpoint {name!r} (endpoints: {', '.join(endpoints) or 'none'})")
    port = getattr(fn, "dma", None)
    if not isinstance(port, TranslatedDma):
        raise InjectError(f"endpoint {name!r} is not behind the IOMMU (its DMA is "
                          f"{'guest-physical' if port is not None else 'absent'})")
    return fn, port


def _dma_args(args: dict[str, Any]) -> tuple[int, int, int | None, bool, bytes]:
    iova, size = args["iova"], args["size"]
    if not 0 <= iova < 1 << 64:
        raise InjectError("'iova' out of range (0..2^64-1)")
    if not 0 < size <= DMA_MAX or iova + size > 1 << 64:
        raise InjectError(f"'size' must be 1..{DMA_MAX} and iova + size <= 2^64")
    ssid = args.get("ssid")
    if ssid is not None and not 0 <= ssid < 1 << 20:
        raise InjectError("'ssid' out of range (0..2^20-1)")
    write = args.get("write", False)
    data = b""
    if write:
        if "data" not in args:
            raise InjectError("a write needs 'data' (hex string of 'size' bytes)")
        try:
            data = bytes.fromhex(args["data"])
        except ValueError:
            raise InjectError("'data' is not a hex string") from None
        if len(data) != size:
            raise InjectError(f"'data' holds {len(data)} bytes, 'size' is {size}")
    elif "data" in args:
        raise InjectError("'data' is only for writes")
    return iova, size, ssid, write, data


def _dma_outcome(value: Any, fault: Any, size: int, ssid: int | None) -> dict[str, Any]:
    if fault is None:
        return {"data": value.hex()} if value is not None else {"written": size}
    out: dict[str, Any] = {"fault": fault.event or "BUS_ERROR", "reason": fault.reason}
    if ssid is not None:
        out["ssid"] = ssid
    return out


def _no_snoop(fn: Any, port: Any) -> bool:
    """The DMA carries No Snoop if the function's PCIe Device Control allows it; the
    domain may still perform it snooped.  Returns whether it stayed No Snoop."""
    from viommu_backend.pci.capabilities import DEVCTL, PCIE_REGS

    if fn.pcie_cap is None or not fn.cfg.field(fn.pcie_cap + PCIE_REGS["DEVCTL"].offset,
                                               DEVCTL, "NO_SNOOP"):
        return False
    return port.no_snoop()


def _dma(backend: Any, args: dict[str, Any], jobs: Iterator[int],
         completed: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """viommu-dma: the endpoint's DMA now, or -- when it sent a page request (PRI) --
    ``{pending, job, page-request}`` and ``completed(...)`` once it is over."""
    from viommu_backend.endpoints.dma import DmaFault

    name = args["device"]
    fn, port = _dma_endpoint(backend, name)
    iova, size, ssid, write, data = _dma_args(args)
    if backend.manager.memory is None:
        raise InjectError("no guest memory yet (no vfio-user client has mapped RAM "
                          "on the IOMMU function)")
    out: dict[str, Any] = {}
    if args.get("no-snoop", False):
        out["no-snoop"] = _no_snoop(fn, port)

    def op() -> bytes | None:
        if write:
            port.write(iova, data, ssid=ssid)
            return None
        return port.read(iova, size, ssid=ssid)

    result: dict[str, Any] = {}

    def done(value: Any, fault: DmaFault | None) -> None:
        if fault is not None and fault.reason == "no_bus_master" and "job" not in result:
            raise InjectError(f"endpoint {name!r}: bus master disabled (PCI COMMAND.MASTER "
                              f"is 0, or no client connected): its DMA is refused")
        result.update(_dma_outcome(value, fault, size, ssid))
        if "job" in result:
            completed(result)

    requester = getattr(fn, "page_requests", None)
    if requester is None:
        try:
            done(op(), None)
        except DmaFault as e:
            done(None, e)
        return {**out, **result}
    pf = requester.run(op, done, ssid=ssid)
    if pf is None:
        return {**out, **result}
    result.update(job=next(jobs), device=name, iova=iova, size=size, write=write)
    return {**out, "pending": True, "job": result["job"], "page-request": pf.describe()}
