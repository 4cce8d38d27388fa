"""What the domain manager hands back: fault codes and their names, batched translation
results, and the exception of an endpoint DMA that could not complete."""

from __future__ import annotations

from viommu_backend.smmuv3.fields import EventId
from viommu_backend.smmuv3.walker import WalkResult

from .objects import PendingFault

# Fault code for a transaction terminated without an event (STE.Config=abort, GBPA.ABORT,
# a stream on the blocking domain): not an SMMUv3 event type.
ABORT = 0xFF
ABORT_NAME = "ABORT"
PAGE = 1 << 12


def fault_name(code: int) -> str | None:
    if code == 0:
        return None
    if code == ABORT:
        return ABORT_NAME
    return EventId(code).name


class TranslationResult(WalkResult):
    """Batched result: the walker's arrays, plus the domain id that translated them."""

    domain: int | None = None

    def fault_name(self, i: int) -> str | None:  # type: ignore[override]
        return fault_name(int(self.fault[i]))

    @classmethod
    def of(cls, r: WalkResult, domain: int | None) -> "TranslationResult":
        out = cls(**{k: getattr(r, k) for k in WalkResult.__dataclass_fields__})
        out.domain = domain
        return out


class DmaFault(Exception):
    """An endpoint DMA that could not complete: the SMMU fault (event name, or ABORT for a
    silently terminated transaction, or BUS_ERROR for an output address outside guest
    RAM) at ``iova``."""

    def __init__(self, event: str, sid: int, ssid: int | None, iova: int,
                 write: bool, pending: PendingFault | None = None) -> None:
        super().__init__(f"DMA {'write' if write else 'read'} sid {sid:#x} ssid {ssid} "
                         f"iova {iova:#x}: {event}")
        self.event = event
        self.sid = sid
        self.ssid = ssid
        self.iova = iova
        self.write = write
        self.pending = pending  # a stalled transaction waiting for CMD_RESUME
