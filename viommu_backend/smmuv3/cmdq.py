"""Command execution: the :class:`CommandSink` protocol the domain manager implements
and the dispatch of decoded commands onto it.

CMD_SYNC, PREFETCH_* and the queue mechanics live in :mod:`viommu_backend.smmuv3.device`;
everything that changes translation state goes to the sink.  All sink methods are
optional: a sink that lacks one simply does not see that command (see
:class:`NullCommandSink` for the full set with their arguments).
"""

from __future__ import annotations

import logging
from typing import Protocol, runtime_checkable

from viommu_backend.smmuv3.commands import CFGI_ALL_RANGE, Command, IllegalCommand
from viommu_backend.smmuv3.smmu_config import STALL_MODEL_TERMINATE, SmmuConfig

log = logging.getLogger(__name__)

# Above this many StreamIDs, CFGI_STE_RANGE becomes one "everything changed" call.
STE_RANGE_EXPAND_MAX = 64
TG_GRANULE = {1: 1 << 12, 2: 1 << 14, 3: 1 << 16}


@runtime_checkable
class CommandSink(Protocol):
    """Configuration and invalidation calls the command queue makes.

    Addresses are byte addresses; ``size`` is the span in bytes to invalidate
    (``1`` for the non-range TLBI form: every entry that contains ``addr``), ready for
    ``TLB.inv_va(addr, size, ...)`` / ``TLB.inv_ipa``.  ``asid``
    ``None`` means all ASIDs (the *VAA forms).  ``leaf``: only last-level entries
    need to go; ``ttl``: the level hint (0 = unknown).
    """

    def stream_table_changed(self, sid: int | None = None) -> None: ...
    def cd_changed(self, sid: int, ssid: int | None = None) -> None: ...
    def tlbi_nh_all(self, vmid: int) -> None: ...
    def tlbi_nh_asid(self, vmid: int, asid: int) -> None: ...
    def tlbi_nh_va(self, vmid: int, asid: int | None, addr: int, size: int, leaf: bool,
                   ttl: int) -> None: ...
    def tlbi_el2_all(self) -> None: ...
    def tlbi_el2_asid(self, asid: int) -> None: ...
    def tlbi_el2_va(self, asid: int | None, addr: int, size: int, leaf: bool,
                    ttl: int) -> None: ...
    def tlbi_s12_vmall(self, vmid: int) -> None: ...
    def tlbi_s2_ipa(self, vmid: int, addr: int, size: int, leaf: bool, ttl: int) -> None: ...
    def tlbi_nsnh_all(self) -> None: ...
    def atc_inv(self, sid: int, ssid: int | None, addr: int, size: int,
                global_: bool) -> bool | None: ...
    def pri_resp(self, sid: int, ssid: int | None, grpid: int, resp: int) -> None: ...
    def resume(self, sid: int, stag: int, resp: int) -> None: ...
    def stall_term(self, sid: int) -> None: ...


# every method a command sink must have (derived from the protocol: one definition)
SINK_METHODS = tuple(n for n, v in vars(CommandSink).items() if callable(v) and not n.startswith("_"))


def check_sink(sink: object) -> None:
    """Refuse a sink that lacks methods: a command must never be skipped silently."""
    missing = [m for m in SINK_METHODS if not callable(getattr(sink, m, None))]
    if missing:
        raise TypeError(f"{type(sink).__name__} is not a command sink: missing {', '.join(missing)}")


class NullCommandSink:
    """Accepts everything, does nothing."""

    def stream_table_changed(self, sid: int | None = None) -> None: pass
    def cd_changed(self, sid: int, ssid: int | None = None) -> None: pass
    def tlbi_nh_all(self, vmid: int) -> None: pass
    def tlbi_nh_asid(self, vmid: int, asid: int) -> None: pass
    def tlbi_nh_va(self, vmid: int, asid: int | None, addr: int, size: int, leaf: bool,
                   ttl: int) -> None: pass
    def tlbi_el2_all(self) -> None: pass
    def tlbi_el2_asid(self, asid: int) -> None: pass
    def tlbi_el2_va(self, asid: int | None, addr: int, size: int, leaf: bool,
                    ttl: int) -> None: pass
    def tlbi_s12_vmall(self, vmid: int) -> None: pass
    def tlbi_s2_ipa(self, vmid: int, addr: int, size: int, leaf: bool, ttl: int) -> None: pass
    def tlbi_nsnh_all(self) -> None: pass
    def atc_inv(self, sid: int, ssid: int | None, addr: int, size: int,
                global_: bool) -> bool | None: return None
    def pri_resp(self, sid: int, ssid: int | None, grpid: int, resp: int) -> None: pass
    def resume(self, sid: int, stag: int, resp: int) -> None: pass
    def stall_term(self, sid: int) -> None: pass


class RecordingSink:
    """Records every sink call as ``(method, kwargs)`` (tests, tracing)."""

    def __init__(self, atc_result: bool | None = None) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.atc_result = atc_result

    def __getattr__(self, name: str):
        if name not in _SINK_METHODS:
            raise AttributeError(name)

        def record(**kw: object) -> bool | None:
            self.calls.append((name, kw))
            return self.atc_result if name == "atc_inv" else None
        return record


_SINK_METHODS = frozenset(n for n in vars(NullCommandSink) if not n.startswith("_"))


def tlbi_span(cmd: Command) -> tuple[int, int]:
    """(addr, size) of a TLBI *_VA / S2_IPA, as ``tlb.tlbi_range`` computes it: with
    TG != 0 (RIL range form) ``(NUM+1) * 2^SCALE`` granules from ``addr`` aligned down to
    the granule; with TG == 0 ``size`` 1 (every entry containing ``addr``)."""
    addr = cmd["ADDR"]
    tg = cmd["TG"]
    if tg == 0:
        return addr, 1
    gran = TG_GRANULE[tg]
    return addr & ~(gran - 1), ((cmd["NUM"] + 1) << cmd["SCALE"]) * gran


def atc_span(cmd: Command) -> tuple[int, int]:
    """(addr, size) of a CMD_ATC_INV: 2^(12+Size) bytes aligned to their size."""
    span = 1 << (12 + min(cmd["SIZE"], 52))
    return cmd["ADDR"] & ~(span - 1), span


def invalidation_span(cmd: Command) -> tuple[int, int] | None:
    """(addr, size) an address-based TLBI / CMD_ATC_INV covers; None for the others
    (they cover every address of their scope)."""
    if cmd.name == "ATC_INV":
        return atc_span(cmd)
    if cmd.name.startswith("TLBI_") and "ADDR" in cmd.fields:
        return tlbi_span(cmd)
    return None


def _ttl(cmd: Command) -> int:
    """The TTL hint (the leaf level), which has a meaning only in the range form (TG)."""
    return cmd["TTL"] if cmd["TG"] else 0


def _ssid(cmd: Command) -> int | None:
    return cmd["SSID"] if cmd.fields.get("SSV") else None


def check_supported(cmd: Command, cfg: SmmuConfig) -> None:
    """Commands the configuration does not implement are CERROR_ILL."""
    n = cmd.name
    if n.startswith("TLBI_EL3"):
        raise IllegalCommand(f"{n} on the Non-secure command queue")
    if n.startswith("TLBI_EL2") and not cfg.hyp:
        raise IllegalCommand(f"{n} without IDR0.HYP")
    if n in ("TLBI_S12_VMALL", "TLBI_S2_IPA") and not cfg.s2p:
        raise IllegalCommand(f"{n} without stage 2")
    if n == "ATC_INV" and not cfg.ats:
        raise IllegalCommand("ATC_INV without IDR0.ATS")
    if n == "PRI_RESP" and not cfg.pri:
        raise IllegalCommand("PRI_RESP without IDR0.PRI")
    if n in ("RESUME", "STALL_TERM") and cfg.stall_model == STALL_MODEL_TERMINATE:
        raise IllegalCommand(f"{n} without stall support")
    if n in ("TLBI_NH_VA", "TLBI_NH_VAA", "TLBI_S2_IPA", "TLBI_EL2_VA", "TLBI_EL2_VAA") \
            and cmd["TG"] and not cfg.ril:
        # without RIL, TG/NUM/SCALE are RES0; a TTL hint alone is fine
        if cmd["NUM"] or cmd["SCALE"]:
            raise IllegalCommand(f"{n} range form without IDR3.RIL")


def dispatch(cmd: Command, sink: object, cfg: SmmuConfig) -> bool:
    """Run ``cmd`` (not CMD_SYNC / PREFETCH) on ``sink``.  Returns False when an ATC
    invalidation reported failure (the next CMD_SYNC then fails with
    CERROR_ATC_INV_SYNC).  Raises :class:`IllegalCommand`."""
    check_supported(cmd, cfg)
    n = cmd.name
    method = _METHOD.get(n)
    if method is None:
        return True  # nothing for the sink to do (PREFETCH_*, ...)
    call = getattr(sink, method)
    if n == "CFGI_STE":
        call(sid=cmd["SID"])
    elif n == "CFGI_STE_RANGE":
        rng = cmd["RANGE"]
        if rng >= CFGI_ALL_RANGE:
            call(sid=None)
        else:
            count = 2 << rng
            if count > STE_RANGE_EXPAND_MAX:
                call(sid=None)
            else:
                first = cmd["SID"] & ~(count - 1)
                for sid in range(first, first + count):
                    call(sid=sid)
    elif n == "CFGI_CD":
        call(sid=cmd["SID"], ssid=cmd["SSID"])
    elif n == "CFGI_CD_ALL":
        call(sid=cmd["SID"], ssid=None)
    elif n == "TLBI_NH_ALL" or n == "TLBI_S12_VMALL":
        call(vmid=cmd["VMID"])
    elif n == "TLBI_NH_ASID":
        call(vmid=cmd["VMID"], asid=cmd["ASID"])
    elif n in ("TLBI_NH_VA", "TLBI_NH_VAA"):
        addr, size = tlbi_span(cmd)
        call(vmid=cmd["VMID"], asid=cmd.fields.get("ASID") if n == "TLBI_NH_VA" else None,
             addr=addr, size=size, leaf=bool(cmd["LEAF"]), ttl=_ttl(cmd))
    elif n in ("TLBI_EL2_ALL", "TLBI_NSNH_ALL"):
        call()
    elif n == "TLBI_EL2_ASID":
        call(asid=cmd["ASID"])
    elif n in ("TLBI_EL2_VA", "TLBI_EL2_VAA"):
        addr, size = tlbi_span(cmd)
        call(asid=cmd.fields.get("ASID") if n == "TLBI_EL2_VA" else None, addr=addr,
             size=size, leaf=bool(cmd["LEAF"]), ttl=_ttl(cmd))
    elif n == "TLBI_S2_IPA":
        addr, size = tlbi_span(cmd)
        call(vmid=cmd["VMID"], addr=addr, size=size, leaf=bool(cmd["LEAF"]), ttl=_ttl(cmd))
    elif n == "ATC_INV":
        addr, span = atc_span(cmd)
        ok = call(sid=cmd["SID"], ssid=_ssid(cmd), addr=addr, size=span,
                  global_=bool(cmd["GLOBAL"]))
        return ok is not False
    elif n == "PRI_RESP":
        call(sid=cmd["SID"], ssid=_ssid(cmd), grpid=cmd["GRPID"], resp=cmd["RESP"])
    elif n == "RESUME":
        call(sid=cmd["SID"], stag=cmd["STAG"], resp=cmd["RESP"])
    elif n == "STALL_TERM":
        call(sid=cmd["SID"])
    return True


_METHOD = {
    "CFGI_STE": "stream_table_changed", "CFGI_STE_RANGE": "stream_table_changed",
    "CFGI_CD": "cd_changed", "CFGI_CD_ALL": "cd_changed",
    "TLBI_NH_ALL": "tlbi_nh_all", "TLBI_NH_ASID": "tlbi_nh_asid",
    "TLBI_NH_VA": "tlbi_nh_va", "TLBI_NH_VAA": "tlbi_nh_va",
    "TLBI_EL2_ALL": "tlbi_el2_all", "TLBI_EL2_ASID": "tlbi_el2_asid",
    "TLBI_EL2_VA": "tlbi_el2_va", "TLBI_EL2_VAA": "tlbi_el2_va",
    "TLBI_S12_VMALL": "tlbi_s12_vmall", "TLBI_S2_IPA": "tlbi_s2_ipa",
    "TLBI_NSNH_ALL": "tlbi_nsnh_all", "ATC_INV": "atc_inv", "PRI_RESP": "pri_resp",
    "RESUME": "resume", "STALL_TERM": "stall_term",
}
