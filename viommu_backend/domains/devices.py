"""Devices and their domains, as iommufd's device.c: binding streams, the attach / replace /
detach rules (a group moves as a whole), DMA ownership of groups, and the VMM's side: how
a decoded STE picks or allocates the HWPT a stream is bound to (CFGI_STE / CFGI_ALL,
SMMUEN / GBPA changes), and CFGI_CD dropping cached CDs.

A device's ``binding`` is the host's choice and its ``hwpt`` what its DMA uses:

- binding AUTO (the default domain): made from the guest's STE -- with a hidden stage 2
  the guest's stage 1 nested on a host NEST_PARENT over the IOAS (bypass: the parent
  itself; abort: blocking), else the guest's own stages;
- binding a host NEST_PARENT under a hidden stage 2: that parent instead of the
  automatic one, the guest still choosing stage 1;
- any other binding is used as it is (the guest's STE no longer matters); None blocks.

:class:`Attachments` owns the devices and the groups' ownership; it allocates and releases
HWPTs in the manager's object table and tells the translator which contexts to forget."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Iterable

from viommu_backend.smmuv3.ste import ConfigFault, S2Config, StreamConfig, decode_ste, fetch_ste

from .groups import DMA_API, Groups
from .objects import (AUTO, BusyError, Device, DomainError, FaultQueue, FaultResponse, Hwpt,
                      HwptNested, HwptPaging)

if TYPE_CHECKING:
    from .manager import DomainManager

log = logging.getLogger(__package__ + ".manager")  # the DomainManager's log


class Attachments:
    """The devices (streams) of one manager, their bindings, groups and domains."""

    def __init__(self, mgr: DomainManager) -> None:
        self.mgr = mgr
        self.devices: dict[int, Device] = {}
        self.groups = Groups()

    # -- devices ---------------------------------------------------------------------------
    def add_device(self, sid: int, *, name: str = "", group: int | str | None = None,
                   can_enforce_coherency: bool = True) -> Device:
        if sid in self.devices:
            raise DomainError(f"sid {sid:#x} already bound", "EEXIST")
        dev = Device(sid, name, group, can_enforce_coherency)
        self.devices[sid] = dev
        self.resolve_stream(dev)
        return dev

    def remove_device(self, sid: int) -> None:
        dev = self.devices.get(sid)
        if dev is None:
            return
        self.bind(dev, None)
        del self.devices[sid]

    def device(self, sid: int) -> Device:
        """The device of ``sid``; a stream never seen before is bound on first use."""
        dev = self.devices.get(sid)
        if dev is None:
            dev = self.add_device(sid)
        return dev

    def bound(self, sid: int) -> Device:
        """The device of ``sid``, which the host may act on only once it is bound
        (ENOENT)."""
        dev = self.devices.get(sid)
        if dev is None:
            raise DomainError(f"no device with sid {sid:#x}", "ENOENT")
        return dev

    def group_of(self, dev: Device) -> list[Device]:
        if dev.group is None:
            return [dev]
        return [d for d in self.devices.values() if d.group == dev.group]

    # -- attach / replace / detach (the host's choice, for a whole group) ------------------
    def _host_group(self, sid: int) -> list[Device]:
        devs = self.group_of(self.bound(sid))
        if self.groups.of(devs[0].group_key).owner == DMA_API:
            raise BusyError(f"group of sid {sid:#x} is used by the DMA API (its default "
                            f"domain)")
        return devs

    def attach(self, sid: int, hwpt_id: int) -> None:
        """Attach a group that is in its default domain or blocked to ``hwpt_id``."""
        devs = self._host_group(sid)
        if any(isinstance(d.binding, Hwpt) for d in devs):
            raise BusyError(f"group of sid {sid:#x} is attached: use replace")
        self._bind_group(devs, hwpt_id)

    def replace(self, sid: int, hwpt_id: int) -> None:
        """Move an attached group (in its default domain or a HWPT) to ``hwpt_id`` (to
        the HWPT it is in: nothing happens)."""
        devs = self._host_group(sid)
        if any(d.binding is None for d in devs):
            raise DomainError(f"group of sid {sid:#x} is not attached: use attach")
        self._bind_group(devs, hwpt_id)

    def detach(self, sid: int) -> None:
        """Block the group: its DMA has no domain until an attach (or a release)."""
        devs = self._host_group(sid)
        if all(d.binding is None for d in devs):
            raise DomainError(f"group of sid {sid:#x} is not attached")
        for d in devs:
            self.bind(d, None)

    def _bind_group(self, devs: list[Device], hwpt_id: int) -> None:
        h = self.mgr.table.get(hwpt_id, Hwpt)
        paging = h.parent if isinstance(h, HwptNested) else h
        if isinstance(paging, HwptPaging):
            if paging.enforce_cache_coherency is None:  # decided by the first device(s)
                paging.enforce_cache_coherency = self.mgr.smmu_enforces_cc and all(
                    d.can_enforce_coherency for d in devs)
            for d in devs:
                if not paging.compatible(d):
                    raise DomainError(f"sid {d.sid:#x} cannot enforce cache coherency "
                                      f"required by hwpt {h.id}")
        for d in devs:
            self.bind(d, h)

    def bind(self, dev: Device, new: Any) -> None:
        """Set the host's binding of ``dev`` (a HWPT, None or AUTO) and re-resolve its
        domain.  Records it left pending in the HWPT it was bound to are answered
        INVALID."""
        old = dev.binding
        dev.binding = new
        self.resolve_stream(dev)
        if isinstance(old, Hwpt) and old is not new and old.fault is not None:
            old.fault.flush(dev.sid, response=FaultResponse.INVALID)
        self._hold(dev)

    def _hold(self, dev: Device) -> None:
        """A device holds one reference on each HWPT it is bound to or uses; automatic
        domains go when their last holder lets go."""
        want = {h for h in (dev.binding, dev.hwpt) if isinstance(h, Hwpt)}
        for h in want - dev.holds:
            h.get()
        gone = dev.holds - want
        dev.holds = want
        for h in gone:
            h.put()
            self.mgr.table.release(h)

    # -- DMA ownership ---------------------------------------------------------------------
    def claim(self, sid: int, owner: str) -> None:
        """viommu-group-claim: a user claim takes the group off its default domain
        (blocked until the user attaches it)."""
        devs = self.group_of(self.bound(sid))
        default = all(d.binding == AUTO for d in devs)
        if self.groups.claim(devs[0].group_key, owner, default_domain=default):
            for d in devs:
                self.bind(d, None)

    def release(self, sid: int, owner: str) -> None:
        """viommu-group-release: the last user reference returns the group to its
        default domain."""
        devs = self.group_of(self.bound(sid))
        if self.groups.release(devs[0].group_key, owner):
            for d in devs:
                self.bind(d, AUTO)

    # -- the domain a device uses ----------------------------------------------------------
    def set_domain(self, dev: Device, new: Hwpt | None) -> None:
        old = dev.hwpt
        self.mgr.translator.forget(dev.sid)
        if old is new:
            return
        if new is not None:
            new.devices.add(dev.sid)
        dev.hwpt = new
        if self.mgr.trace.on_domain:
            self._trace_domain(dev, old, new)
        counters = self.mgr.counters
        if old is None:
            counters.attaches += 1
        elif new is None:
            counters.detaches += 1
        else:
            counters.replaces += 1
        if old is not None:
            old.devices.discard(dev.sid)
            if old.fault is not None:  # answer what this device left pending
                old.fault.flush(dev.sid, response=FaultResponse.INVALID)
        self._hold(dev)

    def _trace_domain(self, dev: Device, old: Hwpt | None, new: Hwpt | None) -> None:
        kind = "attach" if old is None else "detach" if new is None else "replace"
        self.mgr.trace.record("domain", kind=kind, sid=dev.sid,
                              **{"from": None if old is None else old.id,
                                 "to": None if new is None else new.id,
                                 "from-type": None if old is None else type(old).__name__,
                                 "to-type": None if new is None else type(new).__name__,
                                 "config": None if dev.ste is None else dev.ste.config,
                                 "config-fault": None if dev.config_fault is None
                                 else dev.config_fault.event})

    # -- STE-driven configuration ----------------------------------------------------------
    def stream_table_changed(self, sid: int | None = None) -> None:
        """CFGI_STE / CFGI_STE_RANGE / CFGI_ALL, or SMMUEN / STRTAB changes: re-read the
        STE(s) of bound streams and attach / replace / detach accordingly."""
        if sid is None:
            if self.mgr.sanitizer_rules is not None:
                self.mgr.sanitizer_rules.forget_entries()
            targets = list(self.devices.values())
        else:
            dev = self.devices.get(sid)
            targets = [dev] if dev is not None else []  # unseen streams resolve on use
        for dev in targets:
            self.resolve_stream(dev)
        self._check_groups(targets)

    def _check_groups(self, devs: Iterable[Device]) -> None:
        seen = set()
        for dev in devs:
            if dev.group is None or dev.group in seen:
                continue
            seen.add(dev.group)
            if len({id(d.hwpt) for d in self.group_of(dev)}) > 1:
                self.mgr.counters.group_conflicts += 1
                log.warning("group %s split across domains (guest STEs differ)", dev.group)

    def split_groups(self) -> list[Any]:
        groups: dict[Any, set[int]] = {}
        for d in self.devices.values():
            if d.group is not None:
                groups.setdefault(d.group, set()).add(d.hwpt.id if d.hwpt else 0)
        return sorted((g for g, ids in groups.items() if len(ids) > 1), key=str)

    def read_stream_config(self, sid: int) -> StreamConfig | ConfigFault:
        """The guest's STE for ``sid`` (GBPA while the SMMU is disabled)."""
        mgr = self.mgr
        st = mgr.stream_table() if mgr.stream_table is not None else None
        if st is None:
            return StreamConfig("bypass")
        if not st.enabled:
            return StreamConfig("abort" if st.gbpa_abort else "bypass")
        mem = mgr.guest_memory
        if mem is None:
            return ConfigFault("F_STE_FETCH", "no guest memory", sid=sid)
        cfg = {"FMT": st.fmt, "LOG2SIZE": st.log2size, "SPLIT": st.split}
        try:
            words = fetch_ste(mem, st.base, cfg, sid)
            if mgr.sanitizer_rules is not None:
                mgr.sanitizer_rules.ste_fetched(sid, words)
            sc = decode_ste(words, oas=mgr.oas, ssid_bits=mgr.ssid_bits, sid=sid,
                            stall_model=mgr.stall_model, httu=mgr.httu, fwb=mgr.fwb)
        except ConfigFault as cf:
            return cf
        if mgr.host_s2 and sc.s2 is not None:  # STE.Config[1] on an SMMU without S2P
            return ConfigFault("C_BAD_STE", "stage 2 in an STE of a stage-1-only SMMU",
                               sid=sid)
        return sc

    def _guest_decides(self, dev: Device) -> bool:
        b = dev.binding
        return b == AUTO or (self.mgr.host_s2 and isinstance(b, HwptPaging) and b.nest_parent)

    def resolve_stream(self, dev: Device) -> None:
        if not self._guest_decides(dev):
            dev.ste, dev.config_fault = None, None
            self.set_domain(dev, dev.binding)
        else:
            self.mgr.translator.caches.config.ste_fetches += 1
            sc = self.read_stream_config(dev.sid)
            if isinstance(sc, ConfigFault):
                dev.ste, dev.config_fault = None, sc
                self.set_domain(dev, self.mgr.blocking)
            else:
                dev.ste, dev.config_fault = sc, None
                self.set_domain(dev, self._domain_for(dev, sc))
        self.mgr.faults.update_iopf(dev)

    def _domain_for(self, dev: Device, sc: StreamConfig) -> Hwpt:
        if sc.config == "abort":
            return self.mgr.blocking
        if self.mgr.host_s2:
            b = dev.binding
            parent = b if isinstance(b, HwptPaging) else self._host_parent(dev)
            return parent if sc.config == "bypass" else self._nested_on(parent, sc.s1)
        if sc.config == "bypass":
            return self._find_paging(dev, None, nest_parent=False)
        if sc.config == "s2":
            return self._find_paging(dev, sc.s2, nest_parent=False)
        parent = self._find_paging(dev, sc.s2 if sc.config == "nested" else None,
                                   nest_parent=True)
        return self._nested_on(parent, sc.s1)

    def _nested_on(self, parent: HwptPaging, s1: Any) -> Hwpt:
        """The guest's stage 1 on ``parent``: shared by the streams using that CD table."""
        for h in self.mgr.table.hwpts:
            if isinstance(h, HwptNested) and h.auto and h.parent is parent and h.s1 == s1:
                return h
        return self.mgr.table.alloc_nested(parent, s1, auto=True, fault=True)

    def _prefer(self, dev: Device, cands: list[HwptPaging]) -> HwptPaging | None:
        """The candidate the device (or its group) already uses: no needless replace."""
        for d in [dev, *self.group_of(dev)]:
            cur = d.hwpt.parent if isinstance(d.hwpt, HwptNested) else d.hwpt
            for h in cands:
                if h is cur:
                    return h
        return cands[0] if cands else None

    def _host_parent(self, dev: Device) -> HwptPaging:
        """The host's automatic NEST_PARENT for ``dev``: a compatible one is reused, else
        one is allocated with cache coherency taken from this (first) device."""
        mgr = self.mgr
        cands = [h for h in mgr.table.hwpts if isinstance(h, HwptPaging) and h.auto
                 and h.table is not None and h.nest_parent and h.compatible(dev)]
        found = self._prefer(dev, cands)
        if found is not None:
            return found
        return mgr.table.alloc_paging(mgr.ioas, nest_parent=True, auto=True, owner="host",
                                      host=True, fault=False,
                                      enforce_cache_coherency=mgr.smmu_enforces_cc
                                      and dev.can_enforce_coherency)

    def _find_paging(self, dev: Device, s2: S2Config | None, *,
                     nest_parent: bool) -> HwptPaging:
        """The guest's stage 2 (or identity) for ``dev``: a compatible automatic domain is
        reused, else one is allocated with coherency taken from this (first) device."""
        mgr = self.mgr
        cands = [h for h in mgr.table.hwpts if isinstance(h, HwptPaging) and h.auto
                 and h.s2 == s2 and (h.nest_parent or not nest_parent) and h.compatible(dev)]
        found = self._prefer(dev, cands)
        if found is not None:
            return found
        return mgr.table.alloc_paging(mgr.ioas, s2, nest_parent=nest_parent,
                                      enforce_cache_coherency=mgr.smmu_enforces_cc
                                      and dev.can_enforce_coherency,
                                      fault=s2 is not None, auto=True)

    def nested_for(self, p: HwptPaging, dev: Device, fq: FaultQueue | None) -> HwptNested:
        """The host's nested HWPT on ``p`` carrying the stage 1 the guest's STE of
        ``dev`` holds now (its S1 is never combined with another stage 2)."""
        sc = self.read_stream_config(dev.sid)
        if isinstance(sc, ConfigFault) or sc.s1 is None:
            raise DomainError(f"the STE of sid {dev.sid:#x} has no stage 1")
        if sc.s2 is not None and sc.s2 != p.s2:
            raise DomainError(f"the stage 1 of sid {dev.sid:#x} sits on the guest's stage "
                              f"2: never combined with hwpt {p.id}'s")
        if not p.compatible(dev):
            raise DomainError(f"sid {dev.sid:#x} cannot enforce cache coherency "
                              f"required by hwpt {p.id}")
        return self.mgr.table.alloc_nested(p, sc.s1, fault=False if fq is None else fq,
                                           owner="host")

    def cd_changed(self, sid: int, ssid: int | None = None) -> None:
        """CFGI_CD (``ssid`` given) / CFGI_CD_ALL: drop the cached CD(s) of the stream's
        stage-1 domain (shared by every stream using that CD table), or in the aggressive
        caching model the CD(s) cached for ``sid`` alone."""
        if self.mgr.translator.cd_changed(sid, ssid):
            return
        dev = self.devices.get(sid)
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
            self.mgr.translator.forget(s)

    # -- cache coherency -------------------------------------------------------------------
    @staticmethod
    def enforcing(dev: Device) -> bool | None:
        """Does the domain ``dev`` uses enforce cache coherency (None: no DMA domain)?"""
        h = dev.hwpt
        paging = h.parent if isinstance(h, HwptNested) else h
        return paging.enforce_cache_coherency if isinstance(paging, HwptPaging) else None

    def no_snoop(self, sid: int) -> bool:
        """A DMA of ``sid`` carrying No Snoop: kept (True), or performed snooped because
        its domain enforces cache coherency (False).  Counted either way."""
        counters = self.mgr.counters
        if self.enforcing(self.device(sid)):
            counters.snoop_forced += 1
            return False
        counters.no_snoop += 1
        return True

    def coherency(self) -> dict[str, Any]:
        """KVM's question (kvm_arch_has_noncoherent_dma): can any device here DMA
        without snooping, i.e. does any DMA-capable domain not enforce coherency?"""
        devs = [{"sid": d.sid, "name": d.name, "can-enforce": d.can_enforce_coherency,
                 "hwpt": d.hwpt.id if d.hwpt else None, "enforced": self.enforcing(d)}
                for d in sorted(self.devices.values(), key=lambda d: d.sid)]
        c = self.mgr.counters
        return {"smmu-can-enforce": self.mgr.smmu_enforces_cc,
                "noncoherent-dma": any(d["enforced"] is False for d in devs),
                "devices": devs, "no-snoop": c.no_snoop, "snoop-forced": c.snoop_forced}
