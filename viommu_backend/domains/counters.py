"""The domain manager's counters (QMP ``query-viommu-domains`` / ``mgr.stats()``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DomainManagerCounters:
    """What the domain manager counted: translations, walks, faults, DMA, attaches."""

    translations: int = 0  # addresses translated
    walks: int = 0  # addresses walked (TLB misses)
    faults: int = 0
    events: int = 0
    page_requests: int = 0
    stalls: int = 0  # stall event records raised (Stall=1, a STAG)
    stalls_held: int = 0  # stalls that could not record (queue unwritable / STALL_MAX)
    stall_retries: int = 0  # stalled transactions retried by CMD_RESUME (Retry)
    stall_aborts: int = 0  # ... terminated by CMD_RESUME (Abort / Terminate)
    stall_terms: int = 0  # ... terminated by CMD_STALL_TERM (recorded or held)
    nested_translations: int = 0  # addresses translated through stage 1 and stage 2 (nested)
    ssid_translations: int = 0  # addresses translated with a SubstreamID != 0 (PASID)
    ssid_bytes_read: int = 0  # DMA bytes with a SubstreamID != 0 (PASID DMA)
    ssid_bytes_written: int = 0
    dma_reads: int = 0
    dma_writes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    attaches: int = 0
    replaces: int = 0
    detaches: int = 0
    group_conflicts: int = 0
    host_faults: int = 0  # faults of the host's stage 2 (never the guest's events)
    host_page_requests: int = 0  # page requests that went to a host fault queue
    no_snoop: int = 0  # No Snoop DMA performed as such (domain not enforcing coherency)
    snoop_forced: int = 0  # No Snoop DMA performed snooped (domain enforcing coherency)

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))
