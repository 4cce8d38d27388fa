"""Fault injection state of one backend (QMP ``viommu-inject-*``).

A :class:`FaultInjector` belongs to one Backend (one SMMU + its domain manager); it is
installed as ``mgr.injector`` and ``smmu.injector`` (:meth:`FaultInjector.install`), which
consult it at three hook points and nowhere else:

- translation (``DomainManager.translate_one`` / ``translate`` / ``probe``), after the
  stream's configuration is resolved and before the TLB: :meth:`fault_for` /
  :meth:`fault_codes` return the event of an armed :class:`FaultRule` covering the address,
  and the manager then fails the access and reports the event through its normal fault
  path (CD.R / S2R / stall), as if the table walk had faulted;
- CMD_SYNC (``SMMUv3._run_cmdq``): :meth:`hold_cmd_sync` says whether the CMD_SYNC at the
  head of the command queue is held (see "CMD_SYNC modes" below);
- display (``SMMUv3.snapshot``): :meth:`snapshot` under ``"injected"`` in ``query-viommu``.

Event records and GERROR conditions are injected directly into the SMMU model
(:meth:`inject_event`, :meth:`inject_gerror`) through its architected production paths.

Page requests (``viommu-inject-page-request``, :meth:`inject_page_request`) are issued as
the endpoint's PCIe Page Request through the domain manager (``mgr.page_request``): the
request joins the fault queue of the stream's domain, the SMMU writes the PRIQ record and
raises the PRIQ interrupt, and the group is completed by the CMD_PRI_RESP the guest
writes to the command queue.  Each injected request is kept (newest
:data:`PAGE_REQUESTS_KEPT`) with the response it got (:meth:`page_requests`).

CMD_SYNC modes (``viommu-inject-sync``)
---------------------------------------
A CMD_SYNC completes when the SMMU consumes it: CMDQ_CONS moves past it and, with CS=IRQ,
the MSI (MSIADDR/MSIDATA) is written.  Linux's driver waits for one of those two.

- ``drop``: the next CMD_SYNC that reaches the head of the queue *hangs* the command
  queue, as a wedged SMMU would: it is not consumed (CONS stays pointing at it), its MSI
  is not written, and nothing queued behind it is consumed.  The driver's poll times out
  ("CMD_SYNC timeout"); later submissions wait behind it.  Setting the mode back to
  ``normal`` completes the held CMD_SYNC and the queue drains.  ``count`` must be 1: a
  hung queue never reaches a second CMD_SYNC before ``normal`` is set.
- ``delay``: each of the next ``count`` CMD_SYNCs is held the same way for ``delay_ms``
  of wall time, then completed (timer on the event loop; the loop never blocks).
- ``normal``: cancels the above and releases a held CMD_SYNC at once.

The CMD_SYNC hold is the SMMU's (``smmu.cmd_sync_held``); the injector decides and
releases it with ``smmu.release_cmd_sync()``.  An SMMU reset drops a hold.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from viommu_backend.smmuv3 import regs
from viommu_backend.smmuv3.events import EVENT_IDS, FAULT_CLASSES, Event
from viommu_backend.smmuv3.fields import EventId, FaultClass

log = logging.getLogger(__name__)

# Faults a translation table walk can end with (what viommu-inject-fault may arm).
WALK_FAULTS: tuple[str, ...] = ("F_TRANSLATION", "F_ADDR_SIZE", "F_ACCESS", "F_PERMISSION",
                                "F_WALK_EABT", "F_TLB_CONFLICT")
CERRORS: dict[str, int] = {"ILL": regs.CERROR_ILL, "ABT": regs.CERROR_ABT,
                           "ATC_INV_SYNC": regs.CERROR_ATC_INV_SYNC}
SYNC_MODES = ("normal", "drop", "delay")
# Invalidations viommu-inject-drop-invalidation may drop ("CFGI" / "TLBI": any of the family).
INVALIDATIONS: tuple[str, ...] = (
    "CFGI_STE", "CFGI_STE_RANGE", "CFGI_CD", "CFGI_CD_ALL", "TLBI_NH_ALL", "TLBI_NH_ASID",
    "TLBI_NH_VA", "TLBI_NH_VAA", "TLBI_EL2_ALL", "TLBI_EL2_ASID", "TLBI_EL2_VA",
    "TLBI_EL2_VAA", "TLBI_S12_VMALL", "TLBI_S2_IPA", "TLBI_NSNH_ALL", "ATC_INV")
DROP_MATCH_FIELDS: dict[str, tuple[str, int]] = {  # QMP argument -> (command field, bits)
    "sid": ("SID", 32), "ssid": ("SSID", 20), "asid": ("ASID", 16), "vmid": ("VMID", 16)}
PRG_INDEXES = 1 << 9  # PRIQ record / CMD_PRI_RESP: PRG index is 9 bits
PAGE_REQUESTS_KEPT = 256  # injected page requests remembered for the query
DROPPED_KEPT = 16  # dropped invalidations remembered for the query

Scheduler = Callable[[float, Callable[[], None]], Any]  # loop.call_later-like


class InjectError(ValueError):
    """Bad injection request (unknown name, value out of range, unknown id)."""


def _check_range(name: str, v: int, bits: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v >= 1 << bits:
        raise InjectError(f"'{name}' out of range (0..2^{bits}-1)")
    return v


@dataclass
class FaultRule:
    """Translations of stream ``sid`` (substream ``ssid``; None = any substream, with or
    without PASID) for IOVAs in ``[iova, iova + size)`` fail with ``event``."""

    id: int
    sid: int
    iova: int
    size: int
    event: str = "F_TRANSLATION"
    ssid: int | None = None
    once: bool = False
    write_only: bool = False
    hits: int = 0
    active: bool = True  # False once a ``once`` rule has fired

    @property
    def code(self) -> int:
        return int(EventId[self.event])

    def covers(self, sid: int, ssid: int | None, write: bool) -> bool:
        return (self.active and sid == self.sid and (self.ssid is None or ssid == self.ssid)
                and (write or not self.write_only))

    def contains(self, iova: int) -> bool:
        return self.iova <= iova < self.iova + self.size

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "sid": self.sid, "iova": self.iova,
                               "size": self.size, "type": self.event, "once": self.once,
                               "write-only": self.write_only, "hits": self.hits,
                               "active": self.active}
        if self.ssid is not None:
            out["ssid"] = self.ssid
        return out


@dataclass
class InjectedPageRequest:
    """One injected page request and what became of it: ``pending`` is the domain
    manager's :class:`~viommu_backend.domains.objects.PendingFault` of its group (shared
    by the requests of one group); its ``response`` is set by CMD_PRI_RESP (or by the
    manager: INVALID at once when the domain has no fault queue, or on detach)."""

    id: int
    sid: int
    ssid: int | None
    addr: int
    prg_index: int
    read: bool
    write: bool
    exec: bool
    priv: bool
    last: bool
    outcome: str  # PRIQ production: written / overflow / abort / disabled / none
    pending: Any = None

    @property
    def response(self) -> str | None:
        r = self.pending.response if self.pending is not None else None
        return r.name if r is not None else None

    def describe(self) -> dict[str, Any]:
        resp = self.response
        out: dict[str, Any] = {
            "id": self.id, "sid": self.sid, "addr": self.addr, "prg-index": self.prg_index,
            "read": self.read, "write": self.write, "exec": self.exec, "priv": self.priv,
            "last": self.last, "outcome": self.outcome,
            "state": "pending" if resp is None else "answered"}
        if self.ssid is not None:
            out["ssid"] = self.ssid
        if resp is not None:
            out["response"] = resp
        return out


@dataclass
class DropRule:
    """Drop the next ``remaining`` invalidations named ``command`` (or of its family,
    "CFGI" / "TLBI") whose fields equal ``match`` (command field -> value) and, with
    ``addr``, whose address span contains it."""
    id: int
    command: str
    match: dict[str, int]
    addr: int | None
    remaining: int
    dropped: int = 0

    def covers(self, cmd: Any) -> bool:
        from viommu_backend.smmuv3.cmdq import invalidation_span

        if cmd.name != self.command and not cmd.name.startswith(self.command + "_"):
            return False
        if any(cmd.fields.get(k) != v for k, v in self.match.items()):
            return False
        if self.addr is None:
            return True
        span = invalidation_span(cmd)
        if span is None:
            return True
        start, size = span
        if size == 1:  # no range form: the entries holding that address (its 4 KiB page)
            return start >> 12 == self.addr >> 12
        return start <= self.addr < start + size

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "command": self.command,
                               "remaining": self.remaining, "dropped": self.dropped}
        fields = {f: k for k, (f, _) in DROP_MATCH_FIELDS.items()}
        out.update({fields[f]: v for f, v in self.match.items()})
        if self.addr is not None:
            out["addr"] = self.addr
        return out


class FaultInjector:
    """The injection state of one backend.  ``call_later(seconds, fn)`` schedules the
    release of a delayed CMD_SYNC (default: the running asyncio loop's ``call_later``)."""

    def __init__(self, *, call_later: Scheduler | None = None) -> None:
        self._call_later = call_later
        self.rules: dict[int, FaultRule] = {}
        self._next_id = 1
        self.injected: dict[str, int] = {}  # what was injected / what fired, by kind
        self.listeners: list[Callable[[dict[str, Any]], None]] = []  # VIOMMU_INJECTED
        self.sync_mode = "normal"
        self.sync_remaining = 0
        self.sync_delay_ms = 0
        self._timer: Any = None
        self.smmu: Any = None
        self.manager: Any = None
        self.page_reqs: list[InjectedPageRequest] = []  # newest PAGE_REQUESTS_KEPT
        self._next_pr_id = 1
        self.atc_ignore: set[int] = set()  # StreamIDs whose endpoint ignores CMD_ATC_INV
        self.drops: dict[int, DropRule] = {}  # armed viommu-inject-drop-invalidation rules
        # the newest invalidations dropped (command, fields): where the stale entries are
        self.dropped: deque[dict[str, Any]] = deque(maxlen=DROPPED_KEPT)

    # -- lifetime ------------------------------------------------------------------------
    def install(self, manager: Any = None, smmu: Any = None) -> "FaultInjector":
        """Become ``manager.injector`` and ``smmu.injector`` (the hook points)."""
        if manager is not None:
            manager.injector = self
            self.manager = manager
        if smmu is not None:
            smmu.injector = self
            self.smmu = smmu
        return self

    def close(self) -> None:
        """Disarm everything, release a held CMD_SYNC and unhook."""
        self.clear_faults()
        self.set_sync_mode("normal")
        self.atc_ignore.clear()
        self.drops.clear()
        if self.manager is not None and getattr(self.manager, "injector", None) is self:
            self.manager.injector = None
        if self.smmu is not None and getattr(self.smmu, "injector", None) is self:
            self.smmu.injector = None

    def note(self, kind: str, **data: Any) -> None:
        """Count ``kind`` in ``injected`` and tell the listeners (QMP VIOMMU_INJECTED)."""
        self.injected[kind] = self.injected.get(kind, 0) + 1
        info = {"kind": kind, **data}
        for fn in list(self.listeners):
            try:
                fn(info)
            except Exception:  # an observer must not break the DMA / command path
                log.exception("injection listener failed")

    # -- translation faults ----------------------------------------------------------------
    def add_fault(self, sid: int, iova: int, size: int = 4096, *, ssid: int | None = None,
                  event: str = "F_TRANSLATION", once: bool = False,
                  write_only: bool = False) -> FaultRule:
        _check_range("sid", sid, 32)
        if ssid is not None:
            _check_range("ssid", ssid, 20)
        _check_range("iova", iova, 64)
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0 \
                or iova + size > 1 << 64:
            raise InjectError("'size' must be > 0 and iova + size <= 2^64")
        if event not in WALK_FAULTS:
            raise InjectError(f"'type' must be one of {', '.join(WALK_FAULTS)}")
        rule = FaultRule(self._next_id, sid, iova, size, event, ssid, once, write_only)
        self._next_id += 1
        self.rules[rule.id] = rule
        self.note("fault", **rule.describe())
        return rule

    def clear_faults(self, rule_id: int | None = None) -> int:
        """Remove one rule (``InjectError`` if unknown) or all; returns how many."""
        if rule_id is None:
            n = len(self.rules)
            self.rules.clear()
            return n
        if self.rules.pop(rule_id, None) is None:
            raise InjectError(f"no injected fault with id {rule_id}")
        return 1

    def faults(self) -> list[dict[str, Any]]:
        return [r.describe() for r in self.rules.values()]

    def _fire(self, rule: FaultRule, sid: int, ssid: int | None, iova: int,
              write: bool) -> None:
        rule.hits += 1
        if rule.once:
            rule.active = False
        self.note("fault-hit", id=rule.id, sid=sid, ssid=ssid, iova=iova, write=write,
                   type=rule.event)

    def fault_for(self, sid: int, ssid: int | None, iova: int, write: bool, *,
                  consume: bool = True) -> int:
        """Event code (``EventId``) of the first armed rule covering this access, or 0.
        ``consume=False`` only looks (QMP probes): no hit is counted, ``once`` stays."""
        if not self.rules:
            return 0
        for rule in self.rules.values():
            if rule.covers(sid, ssid, write) and rule.contains(iova):
                if consume:
                    self._fire(rule, sid, ssid, iova, write)
                return rule.code
        return 0

    def fault_codes(self, sid: int, ssid: int | None, iovas: np.ndarray,
                    write: bool) -> np.ndarray | None:
        """Batched :meth:`fault_for`: uint8 codes per address (0 = none), or None when no
        rule applies (the common case, one dict scan).  One call is one hit of a rule
        however many of the addresses it covers (a ``once`` rule fails the whole batch
        that first touches it)."""
        if not self.rules:
            return None
        rules = [r for r in self.rules.values() if r.covers(sid, ssid, write)]
        if not rules:
            return None
        va = np.asarray(iovas, dtype=np.uint64)
        codes = np.zeros(len(va), dtype=np.uint8)
        for rule in rules:
            lo = np.uint64(rule.iova)
            inside = (va >= lo) & ((va - lo) < np.uint64(rule.size)) & (codes == 0)
            if inside.any():
                codes[inside] = rule.code
                self._fire(rule, sid, ssid, int(va[np.argmax(inside)]), write)
        return codes if codes.any() else None

    # -- event records -------------------------------------------------------------------
    def make_event(self, name: str, sid: int, *, ssid: int | None = None, iova: int = 0,
                   ipa: int = 0, fetch_addr: int = 0, write: bool = False,
                   stall: bool = False, stag: int = 0, klass: int | str = FaultClass.IN,
                   s2: bool = False) -> Event:
        if name not in EVENT_IDS:
            raise InjectError(f"unknown SMMUv3 event {name!r} (known: "
                              f"{', '.join(EVENT_IDS)})")
        _check_range("sid", sid, 32)
        if ssid is not None:
            _check_range("ssid", ssid, 20)
        _check_range("iova", iova, 64)
        _check_range("ipa", ipa, 52)
        _check_range("fetch-addr", fetch_addr, 52)
        _check_range("stag", stag, 16)
        if isinstance(klass, str):
            if klass not in FAULT_CLASSES:
                raise InjectError(f"'class' must be one of {', '.join(FAULT_CLASSES)}")
            klass = FAULT_CLASSES[klass]
        elif not isinstance(klass, int) or isinstance(klass, bool) \
                or klass not in FAULT_CLASSES.values():
            raise InjectError(f"'class' must be one of {', '.join(FAULT_CLASSES)} (or "
                              f"{', '.join(map(str, FAULT_CLASSES.values()))})")
        return Event(name, sid, ssid, addr=iova, ipa=ipa, fetch_addr=fetch_addr,
                     read=not write, s2=s2, klass=klass, stall=stall, stag=stag)

    def inject_event(self, ev: Event) -> str:
        """Write ``ev`` to the SMMU's event queue (and raise its interrupt) the way a
        fault would; returns the queue outcome (written / overflow / abort / disabled)."""
        smmu = self._need_smmu()
        produced = smmu.record_event(ev)
        self.note("event", type=ev.name, sid=ev.sid, outcome=produced.value)
        return produced.value

    # -- GERROR ----------------------------------------------------------------------------
    def inject_gerror(self, name: str, cerror: str = "ILL") -> bool:
        """Raise GERROR.<name> (toggle + interrupt / MSI).  CMDQ_ERR also sets
        CMDQ_CONS.ERR to ``cerror`` and stops the command queue until the driver
        acknowledges it through GERRORN, exactly as an illegal command does.  Returns
        False when that error was already active (the architecture does not re-toggle)."""
        if name not in regs.GERROR_CONDITIONS:
            raise InjectError(f"'error' must be one of {', '.join(regs.GERROR_CONDITIONS)}")
        if cerror not in CERRORS:
            raise InjectError(f"'cerror' must be one of {', '.join(CERRORS)}")
        smmu = self._need_smmu()
        if smmu.gerror_active(name):
            return False
        if name == "CMDQ_ERR":
            smmu.cmdq.err = CERRORS[cerror]
        smmu.raise_gerror(name)
        self.note("gerror", error=name, **({"cerror": cerror} if name == "CMDQ_ERR" else {}))
        return True

    # -- CMD_SYNC --------------------------------------------------------------------------
    def set_sync_mode(self, mode: str, count: int = 1, delay_ms: int = 0) -> None:
        if mode not in SYNC_MODES:
            raise InjectError(f"'mode' must be one of {', '.join(SYNC_MODES)}")
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise InjectError("'count' must be >= 1")
        if mode == "drop" and count != 1:
            raise InjectError("'count' must be 1 for drop: a dropped CMD_SYNC hangs the "
                              "command queue until mode normal")
        if not isinstance(delay_ms, int) or isinstance(delay_ms, bool) \
                or not 0 <= delay_ms <= 600_000:
            raise InjectError("'delay-ms' must be 0..600000")
        if mode == "delay" and delay_ms == 0:
            raise InjectError("mode delay needs 'delay-ms' > 0")
        self._cancel_timer()
        held = self.smmu is not None and self.smmu.cmd_sync_held is not None
        self.sync_mode = mode
        self.sync_remaining = 0 if mode == "normal" else count
        self.sync_delay_ms = delay_ms if mode == "delay" else 0
        if mode == "normal":
            self.note("sync", mode=mode)
            if held:
                self._release()
            return
        self.note("sync", mode=mode, count=count, **({"delay-ms": delay_ms}
                                                      if mode == "delay" else {}))
        if held and mode == "delay":  # a sync hung by drop now only waits the delay
            self._take_one()
            self._schedule_release()
        elif held:  # drop: the CMD_SYNC already held is the dropped one
            self.sync_remaining = 0

    def _take_one(self) -> None:
        self.sync_remaining -= 1
        if self.sync_remaining <= 0 and self.sync_mode == "delay":
            self.sync_mode = "normal"  # the pending timer still releases the held one

    def hold_cmd_sync(self) -> bool:
        """SMMU hook: a CMD_SYNC is at the head of the command queue; True holds it."""
        if self.sync_mode == "normal" or self.sync_remaining <= 0:
            return False
        mode = self.sync_mode
        if mode == "drop":
            self.sync_remaining -= 1  # the mode stays "drop" until set normal
            self.note("sync-dropped")
            return True
        self._take_one()
        self.note("sync-delayed", **{"delay-ms": self.sync_delay_ms})
        self._schedule_release()
        return True

    def _schedule_release(self) -> None:
        call_later = self._call_later or asyncio.get_running_loop().call_later
        self._timer = call_later(self.sync_delay_ms / 1000.0, self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        self._release()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            cancel = getattr(self._timer, "cancel", None)
            if cancel is not None:
                cancel()
            self._timer = None

    def _release(self) -> None:
        if self.smmu is not None and self.smmu.cmd_sync_held is not None:
            self.note("sync-released")
            self.smmu.release_cmd_sync()

    # -- dropped invalidations -------------------------------------------------------------
    def add_drop(self, command: str, *, addr: int | None = None, count: int = 1,
                 **match: int | None) -> DropRule:
        """Arm the drop of the next ``count`` invalidations ``command`` (a name of
        :data:`INVALIDATIONS`, or "CFGI" / "TLBI") whose fields equal ``match`` (keys of
        :data:`DROP_MATCH_FIELDS`) and whose span contains ``addr``: the SMMU then
        completes them as a driver that never sent them (the caches keep their entries)."""
        if command not in INVALIDATIONS and command not in ("CFGI", "TLBI"):
            raise InjectError(f"'command' must be CFGI, TLBI or one of {', '.join(INVALIDATIONS)}")
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise InjectError("'count' must be >= 1")
        fields: dict[str, int] = {}
        for key, value in match.items():
            if key not in DROP_MATCH_FIELDS:
                raise InjectError(f"unknown match field {key!r}")
            if value is not None:
                name, bits = DROP_MATCH_FIELDS[key]
                fields[name] = _check_range(key, value, bits)
        if addr is not None:
            _check_range("addr", addr, 64)
        rule = DropRule(self._next_id, command, fields, addr, count)
        self._next_id += 1
        self.drops[rule.id] = rule
        self.note("drop-invalidation", **rule.describe())
        return rule

    def drop_invalidation(self, cmd: Any) -> bool:
        """SMMU hook: True drops ``cmd`` (counted, told to the listeners); a rule whose
        count is used up is removed."""
        for rule in list(self.drops.values()):
            if rule.covers(cmd):
                rule.remaining -= 1
                rule.dropped += 1
                if rule.remaining <= 0:
                    del self.drops[rule.id]
                dropped = {"rule": rule.id, "command": cmd.name, "fields": dict(cmd.fields)}
                self.dropped.append(dropped)
                self.note("invalidation-dropped", **dropped)
                return True
        return False

    # -- ATC invalidation ------------------------------------------------------------------
    def set_atc_mode(self, sid: int, mode: str) -> None:
        """``ignore``: the ATS endpoint of ``sid`` completes CMD_ATC_INV without dropping
        anything (its ATC keeps serving the old translations: the effect of a driver that
        forgets the invalidation); ``normal`` ends it (entries already stale stay until
        invalidated again)."""
        _check_range("sid", sid, 32)
        if mode not in ("ignore", "normal"):
            raise InjectError("'mode' must be ignore or normal")
        if mode == "ignore":
            self.atc_ignore.add(sid)
        else:
            self.atc_ignore.discard(sid)
        self.note("atc", sid=sid, mode=mode)

    def ignores_atc_inv(self, sid: int) -> bool:
        """Domain manager hook: True swallows a CMD_ATC_INV for ``sid`` (counted)."""
        if sid not in self.atc_ignore:
            return False
        self.note("atc-inv-ignored", sid=sid)
        return True

    # -- PRI page requests ---------------------------------------------------------------
    def inject_page_request(self, sid: int, addr: int, *, ssid: int | None = None,
                            prg_index: int | None = None, read: bool = True,
                            write: bool = False, exec_: bool = False, priv: bool = False,
                            last: bool = True) -> InjectedPageRequest:
        """Have stream ``sid`` issue a PCIe Page Request for ``addr`` (bits 63:12 go in
        the record) through the domain manager.  ``prg_index`` None picks the lowest
        index with no group of this stream outstanding; naming the index of an
        outstanding group adds a request to it (``last`` closes the group: only then does
        the guest answer).  Refused while the PRI queue is off: the request would reach
        nobody and its group would never be answered."""
        for name, v in (("read", read), ("write", write), ("exec", exec_), ("priv", priv),
                        ("last", last)):
            if not isinstance(v, bool):
                raise InjectError(f"'{name}' must be a boolean")
        _check_range("sid", sid, 32)
        _check_range("addr", addr, 64)
        if ssid is not None:
            _check_range("ssid", ssid, 20)
        if not (read or write):
            raise InjectError("a page request asks for read and/or write access")
        if (exec_ or priv) and ssid is None:
            raise InjectError("'exec' and 'priv' travel in the PASID prefix: they need 'ssid'")
        smmu, mgr = self._need_smmu(), self.manager
        if mgr is None:
            raise InjectError("no domain manager in this backend")
        if not smmu.config.pri:
            raise InjectError("this SMMU has no PRI (IDR0.PRI = 0)")
        if not smmu.cr0_bit("PRIQEN"):
            raise InjectError("the PRI queue is disabled (CR0.PRIQEN = 0): the guest "
                              "driver has not enabled PRI")
        open_groups = {r.prg_index for r in self.page_reqs
                       if r.sid == sid and r.pending is not None and not r.pending.done}
        dev = mgr.devices.get(sid)  # groups the endpoint itself has outstanding
        fq = getattr(dev.hwpt, "fault", None) if dev is not None and dev.hwpt else None
        if fq is not None:
            open_groups |= {key for kind, s, key in fq.pending if kind == "pri" and s == sid}
        if prg_index is None:
            free = [i for i in range(PRG_INDEXES) if i not in open_groups]
            if not free:
                raise InjectError(f"all {PRG_INDEXES} PRG indexes of sid {sid:#x} are outstanding")
            prg_index = free[0]
        else:
            _check_range("prg-index", prg_index, 9)
        # the PRIQ outcome of this request: seen on its way from the manager to the SMMU
        produced: list[Any] = []
        forward = mgr.on_page_request

        def capture(req: Any) -> Any:
            result = forward(req) if forward is not None else None
            produced.append(result)
            return result

        mgr.on_page_request = capture
        try:
            pf = mgr.page_request(sid, ssid, addr, prg_index=prg_index, read=read,
                                  write=write, last=last, priv=priv, exec_=exec_)
        finally:
            mgr.on_page_request = forward
        outcome = getattr(produced[0], "value", "written") if produced else "none"
        rec = InjectedPageRequest(self._next_pr_id, sid, ssid, addr, prg_index, read, write,
                                  exec_, priv, last, outcome, pf)
        self._next_pr_id += 1
        self.page_reqs.append(rec)
        del self.page_reqs[:-PAGE_REQUESTS_KEPT]
        self.note("page-request", **rec.describe())
        pf.add_done_callback(lambda _pf, rec=rec: self.note(
            "page-response", id=rec.id, sid=rec.sid, **{"prg-index": rec.prg_index},
            response=rec.response))
        return rec

    def page_requests(self) -> list[dict[str, Any]]:
        """The injected page requests (oldest first) with their state / response."""
        return [r.describe() for r in self.page_reqs]

    # -- helpers / display -----------------------------------------------------------------
    def _need_smmu(self) -> Any:
        if self.smmu is None:
            raise InjectError("no SMMU in this backend")
        return self.smmu

    def snapshot(self) -> dict[str, Any]:
        """``query-viommu`` ``"injected"``: counts by kind, armed faults, CMD_SYNC mode."""
        held = self.smmu.cmd_sync_held if self.smmu is not None else None
        answered = sum(1 for r in self.page_reqs if r.response is not None)
        return {"counts": dict(self.injected), "faults": len(self.rules),
                "drops": [r.describe() for r in self.drops.values()],
                "dropped": list(self.dropped),
                "atc-ignore": sorted(self.atc_ignore),
                "page-requests": {"pending": len(self.page_reqs) - answered,
                                  "answered": answered},
                "sync": {"mode": self.sync_mode, "remaining": self.sync_remaining,
                         "delay-ms": self.sync_delay_ms, "held": held is not None,
                         **({"held-at": held} if held is not None else {})}}
