"""BAR0 in shared memory: what the guest sees in the page, when the SMMU takes its
writes, and what it publishes (the register-model tests run in both modes too:
test_device.py)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from viommu_backend.smmuv3 import regs
from viommu_backend.smmuv3.commands import encode_command
from viommu_backend.smmuv3.smmu_config import SmmuConfig
from viommu_backend.smmuv3.events import Event
from viommu_backend.smmuv3.function import RegisterPoller, SMMUv3Function
from viommu_backend.smmuv3.shared_regs import PollSchedule
from viommu_backend.vfio_user.device import RegionFlags

from tests.support.smmuv3_harness import CMDQ_ADDR, RAM_BASE, GuestMapping, Harness, off

CR0 = regs.layout("CR0")


def shared() -> Harness:
    return Harness(shared=True)


def test_id_registers_are_in_the_page_before_the_guest_looks():
    h = shared()
    for name in ("IDR0", "IDR1", "IDR3", "IDR5", "IIDR", "AIDR"):
        assert h.bar.read(off(name), 4) == h.smmu.ids[name] != 0 or name == "IDR3"


def test_a_write_waits_for_the_poll():
    h = shared()
    h.bar.map[off("CR0"):off("CR0") + 4] = CR0.encode(CMDQEN=1).to_bytes(4, "little")
    assert h.r32("CR0ACK") == 0 and not h.smmu.cr0_bit("CMDQEN")  # not taken yet
    assert h.bar.shared.poll() is True
    assert h.r32("CR0ACK") == CR0.encode(CMDQEN=1)
    assert h.bar.shared.poll() is False  # nothing new


def test_one_poll_applies_bases_before_the_writes_that_act():
    """A base and the CR0 / PROD writes that use it, seen in one scan: bases first."""
    h = shared()
    page = h.bar.map
    h.put(encode_command("CFGI_STE", SID=7), encode_command("CMD_SYNC"))

    def store(name: str, value: int, size: int = 4) -> None:
        page[off(name):off(name) + size] = value.to_bytes(size, "little")

    store("CMDQ_PROD", h.prod)
    store("CR0", CR0.encode(CMDQEN=1))
    store("CMDQ_BASE", CMDQ_ADDR | h.cmdq_log2, 8)
    h.bar.shared.poll()
    assert h.sink.calls == [("stream_table_changed", {"sid": 7})]
    assert h.r32("CMDQ_CONS") == 2


def test_event_queue_pointer_is_published_before_the_interrupt():
    h = shared()
    h.setup_queues()
    seen = {}
    set_level = h.irq.set_level

    def on_level(source: str, level: bool) -> None:
        seen[source] = h.bar.read(off("EVTQ_PROD"), 4)
        set_level(source, level)

    h.irq.set_level = on_level
    h.smmu.record_event(Event("F_TRANSLATION", sid=3, addr=0x1000))
    assert seen["evtq"] == 1 and h.irq.levels["evtq"]


def test_cmd_sync_msi_sees_cons_published():
    """The driver, woken by the CMD_SYNC MSI, may read CMDQ_CONS: it is in the page."""
    h = shared()
    h.setup_queues()
    slot = h.cmd_addr(h.prod + 1)
    h.mem.write(slot, b"\xff" * 4)
    h.submit(encode_command("CFGI_STE", SID=1),
             encode_command("CMD_SYNC", CS=1, MSH=3, MSIATTR=0xF, MSIADDR=slot))
    assert h.mem.read_u32(slot) == 0
    assert regs.layout("CMDQ_CONS").get(h.r32("CMDQ_CONS"), "RD") == 2


def test_guest_write_to_an_smmu_register_is_undone():
    h = shared()
    h.w32("IDR0", 0)
    h.w32("CR0ACK", 0xF)
    assert h.r32("IDR0") == h.smmu.ids["IDR0"] and h.r32("CR0ACK") == 0


def test_gbpa_update_completes_in_the_page():
    h = shared()
    gbpa = regs.layout("GBPA")
    h.w32("GBPA", gbpa.encode(ABORT=1, UPDATE=1))
    assert h.r32("GBPA") == gbpa.encode(ABORT=1)


def test_a_publish_never_overwrites_a_guest_write_not_yet_taken():
    h = shared()
    h.setup_queues()
    gbpa = regs.layout("GBPA")
    value = gbpa.encode(ABORT=1, UPDATE=1)
    h.bar.map[off("GBPA"):off("GBPA") + 4] = value.to_bytes(4, "little")
    h.smmu.record_event(Event("F_TRANSLATION", sid=3))  # publishes EVTQ_PROD
    assert h.bar.read(off("GBPA"), 4) == value  # still there for the poll to take
    h.bar.shared.poll()
    assert h.r32("GBPA") == gbpa.encode(ABORT=1) and h.smmu.gbpa == gbpa.encode(ABORT=1)


def test_64_bit_register_written_as_two_halves():
    h = shared()
    base = (1 << 62) | (RAM_BASE + 0x8_0000)
    h.w32("STRTAB_BASE", base & 0xFFFFFFFF)
    h.bar.write(off("STRTAB_BASE") + 4, 4, base >> 32)
    assert h.smmu.strtab_base == base


def test_reset_puts_the_model_values_back():
    h = shared()
    h.setup_queues()
    h.smmu.reset()
    h.bar.shared.reset()
    assert h.r32("CR0") == h.r32("CR0ACK") == 0 and h.r32("CMDQ_PROD") == 0
    assert h.r32("IDR0") == h.smmu.ids["IDR0"]
    assert h.bar.shared.poll() is False


def test_trapped_accesses_to_a_shared_bar_behave_as_in_trapped_mode():
    fn = SMMUv3Function(config=SmmuConfig(registers="shared"))
    assert fn.shared is not None
    fn.shared.write(off("CR0"), 4, CR0.encode(EVTQEN=1))
    assert fn.shared.read(off("CR0ACK"), 4) == CR0.encode(EVTQEN=1)
    assert fn.smmu.counters.mmio_reads == {"CR0ACK": 1}
    fn.shared.write(off("CR0"), 2, 0)  # sub-word: stored, taken as the word it makes
    assert fn.shared.read(off("CR0ACK"), 4) == 0


def test_region_info_offers_the_page_for_mmap():
    shared_fn = SMMUv3Function(config=SmmuConfig(registers="shared"))
    info = shared_fn.region_info(0)
    assert info.flags & RegionFlags.MMAP and info.fd == shared_fn.shared.fd
    assert info.size == regs.BAR_SIZE
    trapped = SMMUv3Function().region_info(0)
    assert not trapped.flags & RegionFlags.MMAP and trapped.fd is None


def test_bad_register_mode_is_refused():
    with pytest.raises(ValueError, match="registers must be one of"):
        SmmuConfig(registers="mmap")


def test_pending_says_whether_a_poll_would_find_a_write():
    h = shared()
    assert not h.bar.shared.pending()
    h.bar.map[off("CR0"):off("CR0") + 4] = CR0.encode(CMDQEN=1).to_bytes(4, "little")
    assert h.bar.shared.pending() and h.bar.shared.stats.polls == 0  # it only looks
    h.bar.shared.poll()
    assert not h.bar.shared.pending()  # CR0ACK published too: nothing left to take


def test_poll_schedule_climbs_its_ladder_from_the_last_activity():
    s = PollSchedule(steps=((0.002, 50e-6), (0.02, 250e-6), (1.0, 0.001)), idle_s=0.01)
    assert s.delay(0.0) == s.delay(0.0019) == 50e-6
    assert s.delay(0.002) == s.delay(0.019) == 250e-6
    assert s.delay(0.5) == 0.001
    assert s.delay(1.0) == s.delay(60.0) == 0.01
    assert PollSchedule(steps=(), idle_s=0.5).delay(0.0) == 0.5
    default = PollSchedule()
    assert [sleep for _, sleep in default.steps] == sorted(sleep for _, sleep in default.steps)
    assert default.delay(0.0) <= 100e-6 and default.idle_s >= 0.001


WAIT_S = 30.0  # generous: the host may be busy; every wait below ends on the event


async def until(cond, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.001)


def started(schedule: PollSchedule) -> tuple[SMMUv3Function, RegisterPoller, GuestMapping]:
    fn = SMMUv3Function(config=SmmuConfig(registers="shared"))
    poller = RegisterPoller(fn.shared, schedule)
    poller.start(asyncio.get_running_loop())
    return fn, poller, GuestMapping(fn.shared)


async def test_the_detector_thread_lives_from_start_to_stop():
    fn, poller, _ = started(PollSchedule(steps=(), idle_s=0.001))
    threads = [t for t in threading.enumerate() if t.name == "smmuv3-register-detector"]
    assert poller.running and len(threads) == 1 and threads[0].daemon
    await until(lambda: fn.shared.stats.looks >= 3, "three looks")
    assert fn.shared.stats.polls == 0  # nothing written: the loop was never asked
    poller.stop()
    assert not poller.running and not threads[0].is_alive()
    looks = fn.shared.stats.looks
    await asyncio.sleep(0.01)
    assert fn.shared.stats.looks == looks


async def test_a_write_wakes_the_loop_once_and_the_loop_takes_it():
    fn, poller, guest = started(PollSchedule(steps=(), idle_s=0.0005))
    try:
        await until(lambda: fn.shared.stats.looks >= 1, "a first look")
        guest.map[off("CR0"):off("CR0") + 4] = CR0.encode(CMDQEN=1).to_bytes(4, "little")
        looks = fn.shared.stats.looks
        # the loop is busy (blocked here): the detector keeps looking, asks only once
        deadline = time.monotonic() + WAIT_S
        while fn.shared.stats.looks < looks + 5:
            assert time.monotonic() < deadline, "the detector stopped looking"
            time.sleep(0.001)
        assert fn.shared.stats.polls == 0 and guest.read(off("CR0ACK"), 4) == 0
        await until(lambda: guest.read(off("CR0ACK"), 4) != 0, "CR0ACK")
        assert guest.read(off("CR0ACK"), 4) == CR0.encode(CMDQEN=1)
        looks = fn.shared.stats.looks
        await until(lambda: fn.shared.stats.looks >= looks + 5, "more looks")
        assert fn.shared.stats.polls == fn.shared.stats.active_polls == 1
        assert fn.smmu.cr0_bit("CMDQEN")
    finally:
        poller.stop()


async def test_a_kick_wakes_the_detector_and_resets_its_ladder():
    fn, poller, guest = started(PollSchedule(steps=((0.05, 0.001),), idle_s=30.0))
    try:
        await until(lambda: fn.shared.stats.looks >= 1, "a first look")
        await asyncio.sleep(0.1)  # past the fast step: the detector now sleeps 30 s
        guest.map[off("CR0"):off("CR0") + 4] = CR0.encode(EVTQEN=1).to_bytes(4, "little")
        looks = fn.shared.stats.looks
        await asyncio.sleep(0.05)
        assert fn.shared.stats.looks == looks and guest.read(off("CR0ACK"), 4) == 0
        poller.kick()  # e.g. an endpoint behind the SMMU signalled its interrupt
        await until(lambda: guest.read(off("CR0ACK"), 4) != 0, "CR0ACK after the kick")
        assert guest.read(off("CR0ACK"), 4) == CR0.encode(EVTQEN=1)
        # back on the fast step: more looks follow within the next 30 s sleep
        await until(lambda: fn.shared.stats.looks >= looks + 3, "looks at the fast step")
    finally:
        poller.stop()


async def test_stop_while_the_detector_sleeps_returns_at_once():
    fn, poller, _ = started(PollSchedule(steps=(), idle_s=60.0))
    await until(lambda: fn.shared.stats.looks >= 1, "a first look")
    t0 = time.monotonic()
    poller.stop()
    assert time.monotonic() - t0 < WAIT_S / 2 and not poller.running


async def test_a_scan_asked_by_a_stopped_detector_does_nothing():
    fn, poller, guest = started(PollSchedule(steps=(), idle_s=0.0005))
    guest.map[off("CR0"):off("CR0") + 4] = CR0.encode(CMDQEN=1).to_bytes(4, "little")
    deadline = time.monotonic() + WAIT_S
    while not poller._scan_asked:  # the loop is blocked here: the request waits
        assert time.monotonic() < deadline, "the detector never asked"
        time.sleep(0.001)
    poller.stop()
    await asyncio.sleep(0.01)  # the request runs now, for a detector that is gone
    assert fn.shared.stats.polls == 0 and fn.shared.pending()
