"""The device's side of virtio's event-index handshakes against a driver that acts
between any two of the device's ring accesses (virtio 1.2, 2.7.7 / 2.7.10).

Both sides publish an index and then read the other's event index.  The driver here
runs one step at the k-th access the device makes to ring memory, for every k, and the
test checks that nothing is lost: a request the driver adds while the device is busy is
either taken in the same pass or the driver kicks; a driver that re-enables interrupts
while the device completes either sees the completion itself or gets the interrupt.
"""

from __future__ import annotations

import struct
from typing import Callable

import pytest

from viommu_backend.endpoints.virtio.virtqueue import Segment, Virtqueue, need_event

from tests.support.virtio_driver import Ring

SIZE = 8
BASE = 0x1000
DATA = 0x8000


class SteppedMemory:
    """Guest memory as a DmaPort; at the ``at``-th access (counting from 0) it first
    runs ``step`` -- the driver acting on another vCPU between two device accesses."""

    def __init__(self) -> None:
        self.buf = bytearray(0x10000)
        self.accesses = 0  # the device's, since last reset
        self.at: int | None = None
        self.step: Callable[[], None] = lambda: None
        self._in_step = False

    def arm(self, at: int, step: Callable[[], None]) -> None:
        self.at, self.step, self.accesses = at, step, 0

    def _tick(self) -> None:
        if self._in_step:  # the driver's own access
            return
        if self.accesses == self.at:
            self._in_step = True
            self.step()
            self._in_step = False
        self.accesses += 1

    def read(self, addr: int, n: int, *, ssid: int | None = None) -> bytes:
        self._tick()
        return bytes(self.buf[addr:addr + n])

    def write(self, addr: int, data: bytes | bytearray | memoryview, *,
              ssid: int | None = None) -> None:
        self._tick()
        self.buf[addr:addr + len(data)] = bytes(data)


def _setup(first_index: int) -> tuple[SteppedMemory, Ring, Virtqueue]:
    """A queue whose driver and device have both passed ``first_index`` requests."""
    mem = SteppedMemory()
    ring = Ring(mem, BASE, SIZE)
    ring.avail_idx = ring.last_used = first_index
    mem.write(ring.avail + 2, struct.pack("<H", first_index))
    mem.write(ring.used + 2, struct.pack("<H", first_index))
    vq = Virtqueue(0, SIZE)
    vq.desc, vq.driver, vq.device = ring.desc, ring.avail, ring.used
    vq.last_avail = vq.used_idx = first_index
    vq.enabled = True
    return mem, ring, vq


def _add(ring: Ring) -> bool:
    """The driver adds a one-descriptor request; returns whether it kicks the device
    (virtqueue_kick_prepare with EVENT_IDX: has the new index passed avail_event?)."""
    old = ring.avail_idx
    ring.publish(ring.add_chain([(DATA, 16, False)]))
    return need_event(ring.avail_event(), ring.avail_idx, old)


def _process(mem: SteppedMemory, vq: Virtqueue, irqs: list[int]) -> int:
    def handle(segs: list[Segment]) -> int:
        return 0
    try:
        return vq.process(mem, handle, event_idx=True, indirect=False,
                          interrupt=lambda: irqs.append(1), report=pytest.fail)
    finally:
        mem.at = None  # the driver's step runs during the pass or not at all


def _device_accesses(first_index: int, step: Callable[[Ring], None]) -> int:
    """How many ring accesses one pass of the device makes with ``step`` not run."""
    mem, ring, vq = _setup(first_index)
    step(ring)
    mem.accesses = 0
    _process(mem, vq, [])
    return mem.accesses


@pytest.mark.parametrize("first_index", [0, 0xFFFE])  # also across the 16-bit wrap
def test_a_request_added_during_a_pass_is_taken_or_kicked(first_index: int) -> None:
    n = _device_accesses(first_index, lambda ring: _add(ring))
    for k in range(n + 1):
        mem, ring, vq = _setup(first_index)
        _add(ring)  # request 1, the one the device was notified of
        kicked: list[bool] = []
        mem.arm(k, lambda: kicked.append(_add(ring)))
        _process(mem, vq, [])
        if not kicked:  # k == n: after the device's last access
            kicked.append(_add(ring))
        assert len(kicked) == 1
        taken = vq.last_avail == ring.avail_idx
        assert taken or kicked[0], \
            f"driver added request 2 before device access {k}: not taken, and no kick"


@pytest.mark.parametrize("first_index", [5, 0xFFFF])
def test_an_interrupt_asked_for_during_a_pass_is_sent_or_not_needed(first_index: int) -> None:
    def prepare(ring: Ring) -> None:
        ring.set_used_event(0)  # the driver has interrupts off (virtqueue_disable_cb)
        _add(ring)
    n = _device_accesses(first_index, prepare)
    for k in range(n + 1):
        mem, ring, vq = _setup(first_index)
        prepare(ring)
        seen: list[bool] = []

        def enable_cb() -> None:  # virtqueue_enable_cb: used_event = last seen, re-check
            ring.set_used_event(ring.last_used)
            seen.append(ring.used_idx() != ring.last_used)
        mem.arm(k, enable_cb)
        irqs: list[int] = []
        _process(mem, vq, irqs)
        if not seen:  # k == n: after the device's last access
            enable_cb()
        assert len(seen) == 1
        assert seen[0] or irqs, \
            f"driver re-enabled interrupts before device access {k}: saw no completion, got no interrupt"
