"""DMA ports: guest-physical (DirectDma) and translated through the real DomainManager
over SMMU tables in memfd guest RAM (TranslatedDma)."""

from __future__ import annotations


import pytest
from tests.support.endpoint_env import DATA, RAM, SmmuEnv, bus_master

from viommu_backend.endpoints.dma import (ABORT_CODE, DirectDma, DmaFault, DmaPort,
                                          TranslatedDma, fault_event)
from viommu_backend.endpoints.testdev import TestDevice
from viommu_backend.smmuv3 import builders as b
from viommu_backend.smmuv3 import fields as fl
from viommu_backend.smmuv3.fields import EventId


def test_direct_dma_reads_and_writes_guest_physical(fn: TestDevice, env: SmmuEnv) -> None:
    port = DirectDma(fn)
    assert isinstance(port, DmaPort)
    port.write(DATA + 0x10, b"hello")
    assert env.mem.read(DATA + 0x10, 5) == b"hello"
    assert port.read(DATA + 0x10, 5) == b"hello"
    port.write_u32(DATA, 0xAABBCCDD)
    assert port.read_u16(DATA) == 0xCCDD and port.read_u64(DATA) == 0xAABBCCDD
    buf = bytearray(5)
    port.read_into(DATA + 0x10, buf)
    assert buf == b"hello"


def test_direct_dma_faults(fn: TestDevice) -> None:
    port = DirectDma(fn)
    with pytest.raises(DmaFault) as ei:
        port.read(0x1000, 4)  # not guest RAM
    assert ei.value.reason == "bad_address" and ei.value.event is None
    assert ei.value.event_code == 0
    bus_master(fn, False)
    with pytest.raises(DmaFault) as ei:
        port.write(DATA, b"x")
    assert ei.value.reason == "no_bus_master" and ei.value.write
    fn.disconnected()
    bus_master(fn)
    with pytest.raises(DmaFault) as ei:
        port.read(DATA, 1)
    assert ei.value.reason == "no_bus_master"


def test_translated_dma_scattered_pages(fn: TestDevice, env: SmmuEnv) -> None:
    (pt,) = env.s1_stream(0x10)
    for i in range(12):  # IOVA-contiguous, PA in reverse order: batched path
        pt.map(0x20_0000 + i * 4096, DATA + (20 - i) * 4096)
    port = TranslatedDma(fn, env.mgr, 0x10)
    payload = bytes(range(256)) * 16 * 11
    port.write(0x20_0000 + 0x100, payload)
    assert env.mem.read(DATA + 20 * 4096 + 0x100, 0xF00) == payload[:0xF00]
    assert env.mem.read(DATA + 19 * 4096, 4096) == payload[0xF00:0x1F00]
    assert port.read(0x20_0000 + 0x100, len(payload)) == payload
    assert env.mgr.counters.bytes_written == len(payload)


def test_translated_dma_fault_carries_event_name(fn: TestDevice, env: SmmuEnv) -> None:
    (pt,) = env.s1_stream(0x11)
    pt.map(0x1000, DATA, read_only=True)
    port = TranslatedDma(fn, env.mgr, 0x11)
    with pytest.raises(DmaFault) as ei:
        port.read(0x5000, 8)
    f = ei.value
    assert (f.reason, f.event, f.addr, f.write) == ("translation", "F_TRANSLATION", 0x5000, False)
    assert f.event_code == EventId.F_TRANSLATION
    with pytest.raises(DmaFault) as ei:
        port.write(0x1000, b"no")
    assert ei.value.event == "F_PERMISSION" and ei.value.event_code == 0x13
    assert port.read(0x1000, 4) == bytes(4)


def test_translated_dma_ssid_selects_context(fn: TestDevice, env: SmmuEnv) -> None:
    pts = env.s1_stream(0x12, n_cds=4)
    pts[0].map(0x1000, DATA)
    pts[3].map(0x1000, DATA + 0x3000)
    env.mem.write(DATA, b"cd0!")
    env.mem.write(DATA + 0x3000, b"cd3!")
    port = TranslatedDma(fn, env.mgr, 0x12)
    assert port.read(0x1000, 4) == b"cd0!"
    assert port.read(0x1000, 4, ssid=3) == b"cd3!"
    with pytest.raises(DmaFault) as ei:
        port.read(0x1000, 4, ssid=1)  # CD 1 maps nothing
    assert ei.value.event == "F_TRANSLATION" and ei.value.ssid == 1


def test_translated_dma_abort_bus_error_and_bus_master(fn: TestDevice, env: SmmuEnv) -> None:
    b.write_words(env.mem, RAM + 0x13 * fl.STE_SIZE, b.make_ste(fl.STE_CONFIG_ABORT))
    env.mgr.stream_table_changed(0x13)
    env.mgr.add_device(0x13)
    with pytest.raises(DmaFault) as ei:
        TranslatedDma(fn, env.mgr, 0x13).read(DATA, 4)
    assert ei.value.event == "ABORT" and ei.value.event_code == ABORT_CODE
    (pt,) = env.s1_stream(0x14)
    pt.map(0x1000, 0x7000_0000)  # output address outside guest RAM
    port = TranslatedDma(fn, env.mgr, 0x14)
    with pytest.raises(DmaFault) as ei:
        port.read(0x1000, 4)
    assert ei.value.reason == "bad_address" and ei.value.event == "BUS_ERROR"
    bus_master(fn, False)
    reads = env.mgr.counters.dma_reads
    with pytest.raises(DmaFault) as ei:
        port.read(0x1000, 4)
    assert ei.value.reason == "no_bus_master" and env.mgr.counters.dma_reads == reads


def test_fault_event_accepts_names_and_codes() -> None:
    class E(Exception):
        def __init__(self, event: object) -> None:
            self.event = event
    assert fault_event(E("C_BAD_STE")) == "C_BAD_STE"
    assert fault_event(E(EventId.F_ACCESS)) == "F_ACCESS"
    assert fault_event(E(0x10)) == "F_TRANSLATION"
    assert fault_event(E(0x77)) is None and fault_event(ValueError()) is None


def test_translated_dma_unrelated_errors_propagate(fn: TestDevice) -> None:
    class Broken:
        def dma_read(self, sid: int, ssid: int | None, iova: int, n: int) -> bytes:
            raise RuntimeError("bug")

        def dma_write(self, sid: int, ssid: int | None, iova: int, data: bytes) -> None:
            raise RuntimeError("bug")
    with pytest.raises(RuntimeError):
        TranslatedDma(fn, Broken(), 1).read(0, 4)

