"""Circular queues over guest memory: pointer arithmetic, overflow, bounds, records."""

from __future__ import annotations

import pytest

from viommu_backend.smmuv3.events import (EVENT_IDS, Event, PageRequest, decode_event,
                                          decode_page_request)
from viommu_backend.smmuv3.queues import (CommandQueue, OutputQueue, Produced, Queue,
                                          QueueMemoryError)

from tests.support.smmuv3_harness import RAM_BASE, RAM_SIZE, make_memory


def test_pointer_arithmetic_with_wrap_bit():
    q = Queue("Q", 16, 19, base_reg=RAM_BASE | 2)  # 4 entries
    assert q.size == 4 and q.ptr_mask == 0b111
    assert q.empty() and not q.full()
    q.prod = 0b100  # index 0, wrap 1
    assert q.full() and q.count() == 4
    q.cons = 0b010  # index 2, wrap 0
    assert q.count() == 2 and not q.full() and not q.empty()
    assert q.inc(0b111) == 0 and q.inc(0b011) == 0b100
    assert q.entry_addr(0b110) == RAM_BASE + 2 * 16


def test_log2size_clamped_and_base_aligned():
    q = Queue("Q", 32, 5, base_reg=(RAM_BASE + 0x40) | 9)
    assert q.log2size == 5  # clamped to IDR1 max
    assert q.base == RAM_BASE  # 32 entries * 32 bytes = 1 KiB alignment
    q2 = Queue("Q", 16, 19, base_reg=(RAM_BASE + 0x20) | 0)  # one entry: 32-byte align
    assert q2.base == RAM_BASE + 0x20


def test_output_queue_writes_records_in_memory():
    mem = make_memory()
    q = OutputQueue("EVTQ", 32, 19, base_reg=RAM_BASE | 2)
    for i in range(4):
        assert q.produce(mem, bytes([i + 1]) * 32) is Produced.WRITTEN
    assert q.full() and q.prod_reg == 0b100
    assert mem.read(RAM_BASE + 3 * 32, 32) == bytes([4]) * 32


def test_overflow_toggles_once_until_acknowledged():
    mem = make_memory()
    q = OutputQueue("EVTQ", 32, 19, base_reg=RAM_BASE | 1)  # 2 entries
    q.produce(mem, bytes(32))
    q.produce(mem, bytes(32))
    assert q.produce(mem, b"\xAA" * 32) is Produced.OVERFLOW
    assert q.prod_reg >> 31 == 1 and q.overflow_active
    assert q.produce(mem, b"\xAA" * 32) is Produced.OVERFLOW
    assert q.prod_reg >> 31 == 1 and q.overflows == 1 and q.dropped == 2
    assert b"\xAA" not in mem.read(RAM_BASE, 64)  # nothing overwritten
    # driver consumes everything and acknowledges the overflow
    q.write_cons(q.prod | (1 << 31))
    assert not q.overflow_active and q.empty()
    q.produce(mem, bytes(32)); q.produce(mem, bytes(32))
    assert q.produce(mem, bytes(32)) is Produced.OVERFLOW
    assert q.prod_reg >> 31 == 0 and q.overflows == 2  # toggled back


def test_queue_outside_guest_memory_aborts():
    mem = make_memory()
    q = OutputQueue("PRIQ", 16, 19, base_reg=(RAM_BASE + RAM_SIZE) | 3)
    assert q.produce(mem, bytes(16)) is Produced.ABORT
    assert q.prod == 0 and q.dropped == 1
    c = CommandQueue("CMDQ", 16, 19, base_reg=(RAM_BASE + RAM_SIZE - 16) | 4)
    c.prod = 2
    assert len(c.read_entry(mem, 0)) == 16  # base is aligned down: still inside
    c2 = CommandQueue("CMDQ", 16, 19, base_reg=0x1000 | 4)
    with pytest.raises(QueueMemoryError):
        c2.read_entry(mem, 0)
    with pytest.raises(QueueMemoryError):
        c2.read_entry(None, 0)  # no client connected


def test_event_record_layout():
    ev = Event("F_TRANSLATION", sid=0x1234, ssid=0x56, addr=0xFFFF_0000_1234_5678,
               ipa=0x8_7654_3000, read=False, privileged=True, instruction=True, s2=True,
               klass=1, stall=True, stag=0xABCD)
    raw = ev.encode()
    assert len(raw) == 32
    w = [int.from_bytes(raw[i:i + 8], "little") for i in range(0, 32, 8)]
    assert w[0] == 0x10 | 1 << 11 | 0x56 << 12 | 0x1234 << 32
    assert w[1] == 0xABCD | 1 << 31 | 1 << 33 | 1 << 34 | 0 << 35 | 1 << 39 | 1 << 40
    assert w[2] == 0xFFFF_0000_1234_5678
    assert w[3] == 0x8_7654_3000
    d = decode_event(raw)
    assert d["name"] == "F_TRANSLATION" and d["STREAMID"] == 0x1234 and d["IPA"] == 0x8_7654_3000


def test_event_types_carry_only_their_fields():
    raw = Event("C_BAD_STE", sid=7, addr=0x1234).encode()
    w = [int.from_bytes(raw[i:i + 8], "little") for i in range(0, 32, 8)]
    assert w == [0x04 | 7 << 32, 0, 0, 0]
    raw = Event("F_WALK_EABT", sid=1, fetch_addr=0x4000_1238, klass=1).encode()
    assert int.from_bytes(raw[24:32], "little") == 0x4000_1238
    assert len(EVENT_IDS) == 19 and EVENT_IDS["E_PAGE_REQUEST"] == 0x24
    with pytest.raises(ValueError):
        Event("F_NOT_A_THING", sid=0)


def test_pri_record_layout():
    raw = PageRequest(sid=0x100, prg_index=0x1FF, addr=0x7FFF_F000_1000, ssid=3,
                      read=True, write=True, exec=False, priv=True, last=True).encode()
    w0 = int.from_bytes(raw[:8], "little")
    w1 = int.from_bytes(raw[8:], "little")
    assert w0 == 0x100 | 3 << 32 | 1 << 58 | 1 << 60 | 1 << 61 | 1 << 62 | 1 << 63
    assert w1 == 0x1FF | 0x7FFF_F000_1000
    d = decode_page_request(raw)
    assert d["SSV"] == 1 and d["PRG_INDEX"] == 0x1FF and d["ADDR"] == 0x7FFF_F000_1000
