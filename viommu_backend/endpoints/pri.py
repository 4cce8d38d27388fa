"""An endpoint's Page Request Interface (PCIe PRI) around its DMA.

A DMA that fails translation (F_TRANSLATION, F_PERMISSION, F_ACCESS) on a device whose
PRI capability is enabled -- by the guest's driver, or by the host when it attached the
device to a fault-capable domain -- is not an error yet: the device sends a Page Request
for the faulting page (one PRG, last) through its DMA port and waits.  A Success
response makes it retry the whole transfer; Invalid Request or Response Failure (or a
page that faults again after a Success) ends it with the original fault.  Outstanding
requests are accounted in the PRI capability (its allocation bounds them).
"""

from __future__ import annotations

from typing import Any, Callable

from viommu_backend.endpoints.dma import DmaFault
from viommu_backend.pci.function import PciFunction

PAGE_MASK = ~0xFFF
PRG_INDEXES = 1 << 9
REQUESTABLE = frozenset({"F_TRANSLATION", "F_PERMISSION", "F_ACCESS"})
SUCCESS, FAILURE = "SUCCESS", "FAILURE"

Done = Callable[[Any, "DmaFault | None"], None]


class PageRequester:
    """Runs DMA operations of ``fn`` (through ``fn.dma``) with page requests."""

    def __init__(self, fn: PciFunction) -> None:
        self.fn = fn
        self._next_prg = 0
        self.requests = 0  # page requests sent
        self.retries = 0  # transfers retried after a Success

    def run(self, op: Callable[[], Any], done: Done, *, ssid: int | None = None) -> Any:
        """Run ``op``; ``done(result, None)`` or ``done(None, fault)`` once it is over,
        now or after the answers to its page requests.  Returns the PendingFault it waits
        on (None when ``done`` was already called)."""
        requested: set[int] = set()
        waiting: list[Any] = []

        def attempt() -> None:
            try:
                result = op()
            except DmaFault as e:
                pf = self._request(e, ssid, requested)
                if pf is None:
                    done(None, e)
                    return
                waiting.append(pf)
                pf.add_done_callback(lambda pf, e=e: self._answered(pf, e, attempt, done))
                return
            done(result, None)

        attempt()
        return waiting[-1] if waiting and not waiting[-1].done else None

    def _request(self, e: DmaFault, ssid: int | None, requested: set[int]) -> Any:
        pri, port = self.fn.pri, self.fn.dma
        page = e.iova & PAGE_MASK
        ask = getattr(port, "page_request", None)
        if (e.reason != "translation" or e.event not in REQUESTABLE or pri is None
                or ask is None or page in requested or not pri.request()):
            return None
        requested.add(page)
        self.requests += 1
        prg = self._next_prg
        self._next_prg = (prg + 1) % PRG_INDEXES
        return ask(page, write=e.write, ssid=ssid, prg_index=prg)

    def _answered(self, pf: Any, fault: DmaFault, retry: Callable[[], None],
                  done: Done) -> None:
        response = pf.response.name
        if self.fn.pri is not None:
            self.fn.pri.response(failure=response == FAILURE)
        if response != SUCCESS:
            done(None, fault)
            return
        self.retries += 1
        if self.fn.ctx is not None:  # not inside whoever answered (a command, a QMP call)
            self.fn.ctx.call_soon(retry)
        else:
            retry()
