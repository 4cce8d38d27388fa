"""viommu QMP commands and events over a DomainManager and an SMMUv3 model.

Commands:
- ``query-viommu`` -> the SMMU's registers, queue pointers and counters (``snapshot()``)
  plus the translation counters of the domain manager under ``"translation"``;
- ``viommu-translate {sid, ssid?, iova, write?}`` -> ``{pa, page-size, perm, domain, ...}``
  or ``{fault: "<SMMUv3 event name>"}`` (``ABORT`` for a silently terminated transaction);
  a probe: it records no event and fills no cache;
- ``query-viommu-domains`` -> the object graph (IOAS, HWPTs, devices, attachments, fault
  queues, refcounts).

Events: :func:`forward_events` sends every SMMU event record as ``VIOMMU_EVENT``,
:func:`forward_sanitizer` every driver sanitizer violation as ``VIOMMU_SANITIZER``.
"""

from __future__ import annotations

from typing import Any, Callable

from viommu_backend.domains.manager import DomainManager, fault_name
from viommu_backend.smmuv3 import fields as fl

from .protocol import QmpError
from .server import QmpCommandRegistry


def perm_string(perm: int) -> str:
    return "".join(c if perm & bit else "-" for c, bit in
                   (("r", fl.PERM_R), ("w", fl.PERM_W), ("x", fl.PERM_X)))


def _u64(args: dict[str, Any], name: str, bits: int = 64) -> int:
    v = args[name]
    if v < 0 or v >= 1 << bits:
        raise QmpError(f"Parameter '{name}' out of range (0..2^{bits}-1)")
    return v


def register_viommu_commands(registry: QmpCommandRegistry, mgr: DomainManager,
                             smmu: Any | None = None) -> None:
    """Register the viommu commands on ``registry``."""

    def query_viommu(args: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if smmu is not None:
            out.update(smmu.snapshot())
        out["translation"] = mgr.stats()
        return out

    def translate(args: dict[str, Any]) -> dict[str, Any]:
        sid = _u64(args, "sid", 32)
        ssid = _u64(args, "ssid", 20) if "ssid" in args else None
        iova = _u64(args, "iova")
        write = bool(args.get("write", False))
        t, domain = mgr.probe(sid, ssid, iova, write)
        if t.fault:
            out: dict[str, Any] = {"fault": fault_name(t.fault)}
            if t.stage2:
                out.update({"stage2": True, "ipa": t.ipa})
            if t.level >= 0:
                out["level"] = t.level
            if domain is not None:
                out["domain"] = domain
            return out
        out = {"pa": t.pa, "page-size": t.page_size, "perm": perm_string(t.perm),
               "domain": domain}
        if t.level >= 0:
            out["level"] = t.level
        if t.ipa:
            out["ipa"] = t.ipa
        return out

    def query_domains(args: dict[str, Any]) -> dict[str, Any]:
        return mgr.describe()

    registry.register("query-viommu", query_viommu,
                      doc="SMMU registers, queues and counters")
    registry.register("viommu-translate", translate,
                      {"sid": "int", "*ssid": "int", "iova": "int", "*write": "bool"},
                      doc="translate one address as the stream would now (no side effects)")
    registry.register("query-viommu-domains", query_domains,
                      doc="the domain manager's object graph")


def forward_events(smmu: Any, emit: Callable[[str, dict[str, Any]], Any]) -> None:
    """Send each event record the SMMU produces to QMP clients as ``VIOMMU_EVENT``
    (``data``: the record's type name and fields as the driver reads them)."""
    from viommu_backend.smmuv3.events import decode_event

    def on_event(ev: Any) -> None:
        emit("VIOMMU_EVENT", {k: v for k, v in decode_event(ev.encode()).items()})

    smmu.on_event.append(on_event)


def forward_sanitizer(mgr: DomainManager, emit: Callable[[str, dict[str, Any]], Any]) -> None:
    """Send each violation the driver sanitizer reports (SMMU option ``sanitize``) to QMP
    clients as ``VIOMMU_SANITIZER`` (``data``: ``rule`` and what it concerns)."""
    if mgr.sanitizer is not None:
        mgr.sanitizer.listeners.append(lambda info: emit("VIOMMU_SANITIZER", dict(info)))
