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
    """The page requests of ``fn``'s DMA (through ``fn.dma``): :meth:`begin` a transfer,
    :meth:`request` the page a fault names, :meth:`answered` when the answer came (then
    retry the whole transfer on Success); :meth:`run` does all of it for one operation."""

    def __init__(self, fn: PciFunction) -> None:
        self.fn = fn
        self._next_prg = 0
        self._requested: set[int] = set()  # pages asked for in this transfer
        self._mine: set[int] = set()  # id() of the outstanding requests
        self.requests = 0  # page requests sent
        self.retries = 0  # transfers retried after a Success

    def begin(self) -> None:
        """A new transfer: every page may be asked for once again."""
        self._requested = set()

    def request(self, e: DmaFault, ssid: int | None) -> Any:
        """The Page Request for the page that faulted in ``e``, or None when the device
        does not ask (not a translation fault it may ask about, PRI off or its allocation
        used, or that page asked for already in this transfer)."""
        pri, port = self.fn.pri, self.fn.dma
        page = e.iova & PAGE_MASK
        ask = getattr(port, "page_request", None)
        if (e.reason != "translation" or e.event not in REQUESTABLE or pri is None
                or ask is None or page in self._requested or not pri.request()):
            return None
        self._requested.add(page)
        self.requests += 1
        prg = self._next_prg
        self._next_prg = (prg + 1) % PRG_INDEXES
        pf = ask(page, write=e.write, ssid=ssid, prg_index=prg)
        self._mine.add(id(pf))
        return pf

    def answered(self, pf: Any) -> Any:
        """Account the answer to one of our requests (a stall's passes through); returns
        the response."""
        if id(pf) in self._mine:
            self._mine.discard(id(pf))
            if self.fn.pri is not None:
                self.fn.pri.response(failure=pf.response.name == FAILURE)
            if pf.response.name == SUCCESS:
                self.retries += 1
        return pf.response

    def run(self, op: Callable[[], Any], done: Done, *, ssid: int | None = None) -> Any:
        """Run ``op``; ``done(result, None)`` or ``done(None, fault)`` once it is over,
        now or after the answers to its page requests.  Returns the PendingFault it waits
        on (None when ``done`` was already called)."""
        self.begin()
        waiting: list[Any] = []

        def attempt() -> None:
            try:
                result = op()
            except DmaFault as e:
                pf = self.request(e, ssid)
                if pf is None:
                    done(None, e)
                    return
                waiting.append(pf)
                pf.add_done_callback(lambda pf, e=e: self._soon(
                    lambda: attempt() if self.answered(pf).name == SUCCESS else done(None, e)))
                return
            done(result, None)

        attempt()
        return waiting[-1] if waiting and not waiting[-1].done else None

    def _soon(self, fn: Callable[[], Any]) -> None:
        """Not inside whoever answered (a command, a QMP call)."""
        if self.fn.ctx is not None:
            self.fn.ctx.call_soon(fn)
        else:
            fn()
