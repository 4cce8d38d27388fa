"""Devices and their domains, as iommufd's device.c: binding streams, the attach / replace /
detach rules (a group moves as a whole), and the VMM's side: how a decoded STE picks or
allocates the HWPT a stream is bound to (CFGI_STE / CFGI_ALL, SMMUEN / GBPA changes), and
CFGI_CD dropping cached CDs.  Functions of the :class:`~.manager.DomainManager` (bound
there as its methods)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Iterable

from viommu_backend.smmuv3.ste import ConfigFault, S2Config, StreamConfig, decode_ste, fetch_ste

from . import hwpt
from .objects import (BusyError, Device, DomainError, FaultResponse, Hwpt, HwptNested,
                      HwptPaging)

if TYPE_CHECKING:
    from .manager import DomainManager

log = logging.getLogger(__package__ + ".manager")  # the DomainManager's log


# -- devices -----------------------------------------------------------------------------------
def add_device(mgr: DomainManager, sid: int, *, name: str = "",
               group: int | str | None = None, can_enforce_coherency: bool = True) -> Device:
    if sid in mgr.devices:
        raise DomainError(f"sid {sid:#x} already bound", "EEXIST")
    dev = Device(sid, name, group, can_enforce_coherency)
    mgr.devices[sid] = dev
    resolve_stream(mgr, dev)
    return dev


def remove_device(mgr: DomainManager, sid: int) -> None:
    dev = mgr.devices.get(sid)
    if dev is None:
        return
    set_domain(mgr, dev, None)
    del mgr.devices[sid]


def device(mgr: DomainManager, sid: int) -> Device:
    """The device of ``sid``; a stream never seen before is bound on first use."""
    dev = mgr.devices.get(sid)
    if dev is None:
        dev = mgr.add_device(sid)
    return dev


def group_of(mgr: DomainManager, dev: Device) -> list[Device]:
    if dev.group is None:
        return [dev]
    return [d for d in mgr.devices.values() if d.group == dev.group]


# -- attach / replace / detach -----------------------------------------------------------------
def attach(mgr: DomainManager, sid: int, hwpt_id: int) -> None:
    """Attach a detached device's whole group to ``hwpt_id`` (all or nothing)."""
    devs = mgr.group_of(mgr.device(sid))
    if any(d.hwpt is not None for d in devs):
        raise BusyError(f"group of sid {sid:#x} is attached: use replace")
    attach_group(mgr, devs, hwpt_id)


def replace(mgr: DomainManager, sid: int, hwpt_id: int) -> None:
    """Move an attached device's whole group to ``hwpt_id``."""
    devs = mgr.group_of(mgr.device(sid))
    if any(d.hwpt is None for d in devs):
        raise DomainError(f"group of sid {sid:#x} is not attached: use attach")
    attach_group(mgr, devs, hwpt_id)


def detach(mgr: DomainManager, sid: int) -> None:
    for d in mgr.group_of(mgr.device(sid)):
        set_domain(mgr, d, None)


def attach_group(mgr: DomainManager, devs: list[Device], hwpt_id: int) -> None:
    h = mgr.get_object(hwpt_id)
    if not isinstance(h, Hwpt):
        raise DomainError(f"object {hwpt_id} is not a HWPT")
    for d in devs:
        if isinstance(h, (HwptPaging, HwptNested)) and not h.compatible(d):
            raise DomainError(f"sid {d.sid:#x} cannot enforce cache coherency "
                              f"required by hwpt {h.id}")
    for d in devs:
        set_domain(mgr, d, h)


def set_domain(mgr: DomainManager, dev: Device, new: Hwpt | None) -> None:
    old = dev.hwpt
    dev.ctx_cache.clear()
    if old is new:
        return
    if new is not None:
        new.get()
        new.devices.add(dev.sid)
    dev.hwpt = new
    if mgr.trace.on_domain:
        trace_domain(mgr, dev, old, new)
    if old is None:
        mgr.counters.attaches += 1
    elif new is None:
        mgr.counters.detaches += 1
    else:
        mgr.counters.replaces += 1
    if old is not None:
        old.devices.discard(dev.sid)
        if old.fault is not None:  # answer what this device left pending
            old.fault.flush(dev.sid, response=FaultResponse.INVALID)
        old.put()
        hwpt.release(mgr, old)


def trace_domain(mgr: DomainManager, dev: Device, old: Hwpt | None, new: Hwpt | None) -> None:
    kind = "attach" if old is None else "detach" if new is None else "replace"
    mgr.trace.record("domain", kind=kind, sid=dev.sid,
                     **{"from": None if old is None else old.id,
                        "to": None if new is None else new.id,
                        "from-type": None if old is None else type(old).__name__,
                        "to-type": None if new is None else type(new).__name__,
                        "config": None if dev.ste is None else dev.ste.config,
                        "config-fault": None if dev.config_fault is None
                        else dev.config_fault.event})


# -- STE-driven configuration ------------------------------------------------------------------
def stream_table_changed(mgr: DomainManager, sid: int | None = None) -> None:
    """CFGI_STE / CFGI_STE_RANGE / CFGI_ALL, or SMMUEN / STRTAB changes: re-read the
    STE(s) of bound streams and attach / replace / detach accordingly."""
    if sid is None:
        targets = list(mgr.devices.values())
    else:
        dev = mgr.devices.get(sid)
        targets = [dev] if dev is not None else []  # unseen streams resolve on use
    for dev in targets:
        resolve_stream(mgr, dev)
    check_groups(mgr, targets)


def check_groups(mgr: DomainManager, devs: Iterable[Device]) -> None:
    seen = set()
    for dev in devs:
        if dev.group is None or dev.group in seen:
            continue
        seen.add(dev.group)
        if len({id(d.hwpt) for d in mgr.group_of(dev)}) > 1:
            mgr.counters.group_conflicts += 1
            log.warning("group %s split across domains (guest STEs differ)", dev.group)


def split_groups(mgr: DomainManager) -> list[Any]:
    groups: dict[Any, set[int]] = {}
    for d in mgr.devices.values():
        if d.group is not None:
            groups.setdefault(d.group, set()).add(d.hwpt.id if d.hwpt else 0)
    return sorted((g for g, ids in groups.items() if len(ids) > 1), key=str)


def read_stream_config(mgr: DomainManager, sid: int) -> StreamConfig | ConfigFault:
    st = mgr.stream_table() if mgr.stream_table is not None else None
    if st is None:
        return StreamConfig("bypass")
    if not st.enabled:
        return StreamConfig("abort" if st.gbpa_abort else "bypass")
    mem = mgr.memory
    if mem is None:
        return ConfigFault("F_STE_FETCH", "no guest memory", sid=sid)
    cfg = {"FMT": st.fmt, "LOG2SIZE": st.log2size, "SPLIT": st.split}
    try:
        words = fetch_ste(mem, st.base, cfg, sid)
        return decode_ste(words, oas=mgr.oas, ssid_bits=mgr.ssid_bits, sid=sid,
                          stall_model=mgr.stall_model, httu=mgr.httu)
    except ConfigFault as cf:
        return cf


def resolve_stream(mgr: DomainManager, dev: Device) -> None:
    sc = read_stream_config(mgr, dev.sid)
    if isinstance(sc, ConfigFault):
        dev.ste, dev.config_fault = None, sc
        set_domain(mgr, dev, mgr.blocking)
        return
    dev.ste, dev.config_fault = sc, None
    set_domain(mgr, dev, domain_for(mgr, dev, sc))


def domain_for(mgr: DomainManager, dev: Device, sc: StreamConfig) -> Hwpt:
    if sc.config == "abort":
        return mgr.blocking
    if sc.config == "bypass":
        return find_paging(mgr, dev, None, nest_parent=False)
    if sc.config == "s2":
        return find_paging(mgr, dev, sc.s2, nest_parent=False)
    parent = find_paging(mgr, dev, sc.s2 if sc.config == "nested" else None, nest_parent=True)
    for h in mgr.hwpts:
        if isinstance(h, HwptNested) and h.parent is parent and h.s1 == sc.s1:
            return h
    return mgr.alloc_nested(parent, sc.s1, auto=True, fault=True)


def find_paging(mgr: DomainManager, dev: Device, s2: S2Config | None, *,
                nest_parent: bool) -> HwptPaging:
    # prefer the domain the device already has (no needless replace), then any
    # compatible one; else allocate, with coherency taken from this (first) device
    cands = [h for h in mgr.hwpts if isinstance(h, HwptPaging) and h.s2 == s2
             and (h.nest_parent or not nest_parent) and h.compatible(dev)]
    cur = dev.hwpt.parent if isinstance(dev.hwpt, HwptNested) else dev.hwpt
    for h in cands:
        if h is cur:
            return h
    if cands:
        return cands[0]
    return mgr.alloc_paging(s2, nest_parent=nest_parent,
                            enforce_cache_coherency=dev.can_enforce_coherency,
                            fault=s2 is not None, auto=True)


def cd_changed(mgr: DomainManager, sid: int, ssid: int | None = None) -> None:
    """CFGI_CD (``ssid`` given) / CFGI_CD_ALL: drop the cached CD(s) of the stream's
    stage-1 domain (shared by every stream using that CD table)."""
    dev = mgr.devices.get(sid)
    if dev is None or not isinstance(dev.hwpt, HwptNested):
        return
    h = dev.hwpt
    if ssid is None:
        h.cds.clear()
    else:
        h.cds.pop(ssid, None)
        if ssid == 0:
            h.cds.pop(None, None)  # non-PASID traffic may use CD 0
    for s in h.devices:
        d = mgr.devices.get(s)
        if d is not None:
            d.ctx_cache.clear()
