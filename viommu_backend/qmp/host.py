"""The host's part over QMP: commands that mirror the iommufd uAPI one to one, on the
backend's :class:`~viommu_backend.domains.DomainManager`.

=============================  ============================  ==============================
command                        iommufd                       reply
=============================  ============================  ==============================
``viommu-ioas-map``            IOMMU_IOAS_MAP (fixed IOVA)   ``{iova}``
``viommu-ioas-unmap``          IOMMU_IOAS_UNMAP              ``{unmapped}`` (bytes)
``viommu-hwpt-alloc``          IOMMU_HWPT_ALLOC              ``{id, enforce-cc}``
``viommu-fault-queue-alloc``   IOMMU_FAULT_QUEUE_ALLOC       ``{id}``
``viommu-device-attach``       IOMMU_HWPT_ATTACH             ``{}``
``viommu-device-replace``      IOMMU_HWPT_REPLACE            ``{}``
``viommu-device-detach``       IOMMU_HWPT_DETACH             ``{}``
``viommu-destroy``             IOMMU_DESTROY                 ``{}``
``query-viommu-fault-queue``   read() of a fault fd          ``{id, pending, responded}``
``viommu-fault-respond``       write() of a fault fd         ``{}``
``viommu-group-claim``         iommu_device_claim_dma_owner  ``{owner, count}``
``viommu-group-release``       iommu_device_release_...      ``{owner, count}``
``viommu-iova-to-phys``        iommu_iova_to_phys()          ``{mapped, pa}``
``query-viommu-coherency``     kvm_arch_has_noncoherent_dma  ``{noncoherent-dma, ...}``
=============================  ============================  ==============================

A refused operation is a QMP error whose description starts with the errno iommufd
would return (``EBUSY: hwpt 7 is in use (refcount 1)``).  Every record a fault queue
takes is sent to clients as ``VIOMMU_FAULT`` (the queue id, the record's cookie and
what it asks for).
"""

from __future__ import annotations

from typing import Any, Callable

from viommu_backend.domains import DomainError, DomainManager
from viommu_backend.memory import PROT_READ, PROT_WRITE

from .protocol import QmpError
from .server import QmpCommandRegistry

Handler = Callable[[dict[str, Any]], Any]


def uapi(fn: Handler) -> Handler:
    """A handler whose DomainError becomes a QMP error named by its errno."""
    def handler(args: dict[str, Any]) -> Any:
        try:
            return fn(args)
        except DomainError as e:
            raise QmpError(f"{e.errno}: {e}") from None
    return handler


def _num(args: dict[str, Any], name: str, bits: int = 64) -> int:
    v = args[name]
    if not 0 <= v < 1 << bits:
        raise QmpError(f"ERANGE: '{name}' out of range (0..2^{bits}-1)")
    return v


def register_host_commands(registry: QmpCommandRegistry, mgr: DomainManager) -> None:
    """Register the host's commands for ``mgr``."""
    _register_ioas(registry, mgr)
    _register_hwpts(registry, mgr)
    _register_faults(registry, mgr)
    _register_groups(registry, mgr)


def _register_ioas(registry: QmpCommandRegistry, mgr: DomainManager) -> None:
    def ioas_map(args: dict[str, Any]) -> dict[str, Any]:
        prot = (PROT_READ if args.get("readable", True) else 0) | \
            (PROT_WRITE if args.get("writable", True) else 0)
        iova = _num(args, "iova")
        pa = _num(args, "pa") if "pa" in args else None
        mgr.ioas_map(iova, _num(args, "length"), pa, prot)
        return {"iova": iova}

    def ioas_unmap(args: dict[str, Any]) -> dict[str, Any]:
        return {"unmapped": mgr.ioas_unmap(_num(args, "iova"), _num(args, "length"))}

    registry.register("viommu-ioas-map", uapi(ioas_map),
                      {"iova": "int", "length": "int", "*pa": "int", "*readable": "bool",
                       "*writable": "bool"},
                      doc="map IPA -> host PA in the host stage 2 (default PA: the guest "
                          "RAM placed at that IPA)")
    registry.register("viommu-ioas-unmap", uapi(ioas_unmap), {"iova": "int", "length": "int"},
                      doc="unmap an IPA range from the host stage 2")


def _register_hwpts(registry: QmpCommandRegistry, mgr: DomainManager) -> None:
    def hwpt_alloc(args: dict[str, Any]) -> dict[str, Any]:
        flags = args.get("flags", [])
        if not all(isinstance(f, str) for f in flags):
            raise QmpError("EINVAL: 'flags' is a list of strings")
        h = mgr.hwpt_alloc(parent=args.get("parent"), flags=flags,
                           fault_queue=args.get("fault-queue"),
                           sid=_num(args, "sid", 32) if "sid" in args else None)
        return {"id": h.id, "enforce-cc": h.enforce_cache_coherency}

    def fault_queue_alloc(args: dict[str, Any]) -> dict[str, Any]:
        return {"id": mgr.alloc_fault_queue().id}

    def op(fn: Callable[..., Any], *names: str) -> Handler:
        def run(args: dict[str, Any]) -> dict[str, Any]:
            fn(*(args[n] for n in names))
            return {}
        return uapi(run)

    registry.register("viommu-hwpt-alloc", uapi(hwpt_alloc),
                      {"*parent": "int", "*flags": "array", "*fault-queue": "int",
                       "*sid": "int"},
                      doc="allocate a paging HWPT (flags nest-parent, dirty-tracking) or, "
                          "with parent, a nested one carrying stream sid's stage 1")
    registry.register("viommu-fault-queue-alloc", uapi(fault_queue_alloc),
                      doc="allocate a fault queue")
    registry.register("viommu-device-attach", op(mgr.attach, "sid", "hwpt"),
                      {"sid": "int", "hwpt": "int"},
                      doc="attach a stream's group (in its default domain or blocked)")
    registry.register("viommu-device-replace", op(mgr.replace, "sid", "hwpt"),
                      {"sid": "int", "hwpt": "int"}, doc="move an attached group")
    registry.register("viommu-device-detach", op(mgr.detach, "sid"), {"sid": "int"},
                      doc="detach a stream's group (its DMA is blocked)")
    registry.register("viommu-destroy", op(mgr.destroy, "id"), {"id": "int"},
                      doc="destroy an object (EBUSY while referenced)")


def _register_faults(registry: QmpCommandRegistry, mgr: DomainManager) -> None:
    from viommu_backend.domains import FaultQueue

    def query_fault_queue(args: dict[str, Any]) -> dict[str, Any]:
        fq = mgr.get_object(args["id"], FaultQueue)
        return {"id": fq.id, "pending": [p.describe() for p in fq],
                "responded": dict(fq.responded)}

    def fault_respond(args: dict[str, Any]) -> dict[str, Any]:
        mgr.fault_respond(args["id"], args["cookie"], args["code"])
        return {}

    def iova_to_phys(args: dict[str, Any]) -> dict[str, Any]:
        pa = mgr.iova_to_phys(args["hwpt"], _num(args, "iova"))
        return {"mapped": pa is not None, "pa": pa or 0}

    registry.register("query-viommu-fault-queue", uapi(query_fault_queue), {"id": "int"},
                      doc="the records a fault queue holds, with their cookies")
    registry.register("viommu-fault-respond", uapi(fault_respond),
                      {"id": "int", "cookie": "int", "code": "str"},
                      doc="answer a fault record: success, invalid or failure")
    registry.register("viommu-iova-to-phys", uapi(iova_to_phys), {"hwpt": "int", "iova": "int"},
                      doc="what a paging HWPT maps an IOVA to (nested: EOPNOTSUPP)")
    registry.register("query-viommu-coherency", uapi(lambda args: mgr.coherency()),
                      doc="can any device here DMA without snooping (KVM's question)?")


def _register_groups(registry: QmpCommandRegistry, mgr: DomainManager) -> None:
    def claim(args: dict[str, Any]) -> dict[str, Any]:
        mgr.claim(args["sid"], args["owner"])
        return _ownership(args["sid"])

    def release(args: dict[str, Any]) -> dict[str, Any]:
        mgr.release(args["sid"], args["owner"])
        return _ownership(args["sid"])

    def _ownership(sid: int) -> dict[str, Any]:
        return mgr.groups.of(mgr.bound(sid).group_key).describe()

    registry.register("viommu-group-claim", uapi(claim), {"sid": "int", "owner": "str"},
                      doc="take DMA ownership of a stream's group: dma-api or user")
    registry.register("viommu-group-release", uapi(release), {"sid": "int", "owner": "str"},
                      doc="give DMA ownership back (the last user reference returns the "
                          "group to its default domain)")


def forward_faults(mgr: DomainManager, emit: Callable[[str, dict[str, Any]], Any]) -> None:
    """Send each record a fault queue takes to QMP clients as ``VIOMMU_FAULT``."""
    def on_record(fq: Any, pf: Any) -> None:
        emit("VIOMMU_FAULT", pf.describe())

    mgr.faults.listeners.append(on_record)
