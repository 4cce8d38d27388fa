"""Config space emulation: masks, RW1C, BAR sizing, ROM BAR, capability lists."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from viommu_backend.pci.capabilities import (
    ATS_CTRL, DEVCTL, DEVSTA, MSI_CTRL, PCIE_FLAGS, PMCSR, PRI_STATUS, AtsCap, CapId,
    ExtCapId, MsiCap, PasidCap, PciePortType, PriCap, add_pcie_cap, add_pm_cap,
    add_vendor_cap)
from viommu_backend.pci.config_space import (
    BAR, CAP_HEADER, COMMAND, EXT_CAP_HEADER, HEADER, STATUS, ConfigSpace)

CMD, STS = HEADER["COMMAND"].offset, HEADER["STATUS"].offset


def header_cfg() -> ConfigSpace:
    cfg = ConfigSpace()
    cfg.init_header("VENDOR_ID", 0x5555)
    cfg.init_header("DEVICE_ID", 0x0001)
    cfg.init_header("CLASS_CODE", 0xFF0000)
    cfg.init_header("INTERRUPT_PIN", 1)
    cfg.install(0, HEADER.values())
    return cfg


def test_ids_are_read_only() -> None:
    cfg = header_cfg()
    cfg.write(0x00, 4, 0xDEADBEEF)
    cfg.write(0x08, 4, 0xFFFFFFFF)
    assert cfg.read(0x00, 2) == 0x5555 and cfg.read(0x02, 2) == 0x0001
    assert cfg.read(0x09, 3) == 0xFF0000
    assert cfg.read(0x3D, 1) == 1  # pin RO
    cfg.write(0x3C, 1, 0x2A)  # line RW
    assert cfg.read(0x3C, 1) == 0x2A


def test_command_writable_bits() -> None:
    cfg = header_cfg()
    cfg.write(CMD, 2, 0xFFFF)
    cmd = COMMAND.decode(cfg.read(CMD, 2))
    assert cmd["MEMORY"] == cmd["MASTER"] == cmd["INTX_DISABLE"] == cmd["SERR"] == 1
    assert cmd["IO"] == 0 and cmd["SPECIAL"] == 0  # no I/O BARs; unsupported bits RO 0
    assert cfg.read(CMD, 2) == COMMAND.encode(MEMORY=1, MASTER=1, PARITY=1, SERR=1,
                                              INTX_DISABLE=1)
    cfg.write(CMD, 2, 0)
    assert cfg.read(CMD, 2) == 0


def test_status_rw1c_and_read_only_bits() -> None:
    cfg = header_cfg()
    errs = STATUS.encode(SIG_TARGET_ABORT=1, REC_MASTER_ABORT=1, DETECTED_PARITY=1)
    cfg.poke(STS, 2, errs | STATUS.encode(INTERRUPT=1))
    cfg.write(STS, 2, 0)  # writing 0 changes nothing
    assert cfg.read(STS, 2) == errs | STATUS.encode(INTERRUPT=1)
    cfg.write(STS, 2, STATUS.encode(REC_MASTER_ABORT=1, INTERRUPT=1, CAP_LIST=1))
    st = STATUS.decode(cfg.read(STS, 2))
    assert st["REC_MASTER_ABORT"] == 0  # cleared by writing 1
    assert st["SIG_TARGET_ABORT"] == 1 and st["DETECTED_PARITY"] == 1
    assert st["INTERRUPT"] == 1 and st["CAP_LIST"] == 0  # read-only: unchanged


def test_dword_write_over_command_and_status() -> None:
    """A 32-bit write at 0x04 sets Command and clears Status RW1C bits in one go."""
    cfg = header_cfg()
    cfg.poke(STS, 2, STATUS.encode(SIG_SYSTEM_ERROR=1, PARITY=1))
    cfg.write(CMD, 4, COMMAND.encode(MEMORY=1) | STATUS.encode(PARITY=1) << 16)
    assert cfg.read(CMD, 2) == COMMAND.encode(MEMORY=1)
    assert cfg.read(STS, 2) == STATUS.encode(SIG_SYSTEM_ERROR=1)


@pytest.mark.parametrize("size", [16, 0x1000, 0x20000, 1 << 31])
def test_bar32_sizing(size: int) -> None:
    cfg = header_cfg()
    cfg.setup_bar(0, size)
    cfg.write(0x10, 4, 0xFFFFFFFF)
    assert cfg.read(0x10, 4) == (~(size - 1) & 0xFFFFFFF0)
    cfg.write(0x10, 4, 0x1234_5678)
    assert cfg.bar_address(0) == 0x1234_5678 & ~(size - 1) & 0xFFFFFFF0
    assert cfg.read(0x10, 4) & 0xF == 0  # memory, 32-bit, not prefetchable


@pytest.mark.parametrize("size", [0x4000, 1 << 32, 1 << 33])
def test_bar64_pair_sizing(size: int) -> None:
    cfg = header_cfg()
    cfg.setup_bar(2, size, is64=True, prefetchable=True)
    cfg.write(0x18, 4, 0xFFFFFFFF)
    cfg.write(0x1C, 4, 0xFFFFFFFF)
    lo, hi = cfg.read(0x18, 4), cfg.read(0x1C, 4)
    mask = ~(size - 1) & ((1 << 64) - 1)
    assert BAR.decode(lo)["TYPE"] == 2 and BAR.decode(lo)["PREFETCH"] == 1
    assert lo & ~0xF == mask & 0xFFFFFFF0
    assert hi == mask >> 32
    # the size a driver computes from the pair
    assert ((~((hi << 32) | (lo & ~0xF))) & ((1 << 64) - 1)) + 1 == size
    cfg.write(0x18, 4, 0)
    cfg.write(0x1C, 4, 0x80)
    assert cfg.bar_address(2) == 0x80_0000_0000


def test_bar_bad_parameters() -> None:
    cfg = header_cfg()
    with pytest.raises(ValueError):
        cfg.setup_bar(0, 0x1800)
    with pytest.raises(ValueError):
        cfg.setup_bar(5, 0x1000, is64=True)
    with pytest.raises(ValueError):
        cfg.setup_bar(0, 1 << 32)


def test_unused_bars_and_rom_read_zero() -> None:
    cfg = header_cfg()
    for off in range(0x10, 0x28, 4):
        cfg.write(off, 4, 0xFFFFFFFF)
        assert cfg.read(off, 4) == 0
    cfg.write(0x30, 4, 0xFFFFF800)  # ROM sizing as QEMU does it
    assert cfg.read(0x30, 4) == 0
    cfg.write(0x30, 4, 0xFFFFFFFF)
    assert cfg.read(0x30, 4) == 0


def test_capability_list_walk() -> None:
    cfg = header_cfg()
    pcie = add_pcie_cap(cfg)
    pm = add_pm_cap(cfg)
    msi = MsiCap(cfg, 4, lambda v: True)
    assert STATUS.get(cfg.read(STS, 2), "CAP_LIST") == 1
    # walk by hand: pointer at 0x34, then each header's NEXT
    ptr, seen = cfg.read(0x34, 1), []
    while ptr:
        assert ptr % 4 == 0 and 0x40 <= ptr < 0x100
        hdr = CAP_HEADER.decode(cfg.read(ptr, 2))
        seen.append((hdr["ID"], ptr))
        ptr = hdr["NEXT"]
    assert seen == [(CapId.PCIE, pcie), (CapId.PM, pm), (CapId.MSI, msi.off)]
    assert cfg.caps() == seen
    assert cfg.find_cap(CapId.PM) == pm and cfg.find_cap(CapId.MSIX) is None
    # capability headers are read-only
    cfg.write(pcie, 2, 0xFFFF)
    assert CAP_HEADER.decode(cfg.read(pcie, 2)) == {"ID": CapId.PCIE, "NEXT": pm}


def test_vendor_cap_body_and_writable_bytes() -> None:
    cfg = header_cfg()
    body = bytes([16, 1, 4, 0, 0, 0]) + (0x3000).to_bytes(4, "little") + bytes(4)
    off = add_vendor_cap(cfg, body, wmask=bytes(10) + b"\xff" * 4)
    assert cfg.caps() == [(CapId.VENDOR, off)]
    assert cfg.read_bytes(off + 2, 14) == body
    cfg.write(off + 2, 4, 0xFFFFFFFF)  # read-only part
    cfg.write(off + 12, 4, 0xA5A5A5A5)  # writable window
    assert cfg.read_bytes(off + 2, 10) == body[:10] and cfg.read(off + 12, 4) == 0xA5A5A5A5


def test_no_caps_no_extended_list() -> None:
    cfg = header_cfg()
    assert STATUS.get(cfg.read(STS, 2), "CAP_LIST") == 0
    assert cfg.read(0x34, 1) == 0 and cfg.caps() == []
    assert cfg.read(0x100, 4) == 0 and cfg.ext_caps() == []


def test_extended_capability_list_walk() -> None:
    cfg = header_cfg()
    add_pcie_cap(cfg)
    ats, pri, pasid = AtsCap(cfg), PriCap(cfg, 64), PasidCap(cfg, 16)
    assert ats.off == 0x100
    ptr, seen = 0x100, []
    while ptr:
        hdr = EXT_CAP_HEADER.decode(cfg.read(ptr, 4))
        assert hdr["VERSION"] == 1
        seen.append((hdr["ID"], ptr))
        ptr = hdr["NEXT"]
    assert seen == [(ExtCapId.ATS, ats.off), (ExtCapId.PRI, pri.off),
                    (ExtCapId.PASID, pasid.off)]
    cfg.write(0x100, 4, 0)  # headers read-only
    assert cfg.find_ext_cap(ExtCapId.PASID) == pasid.off


def test_pcie_cap_fields_and_devsta_rw1c() -> None:
    cfg = header_cfg()
    off = add_pcie_cap(cfg, port_type=PciePortType.RC_INTEGRATED_ENDPOINT)
    flags = PCIE_FLAGS.decode(cfg.read(off + 2, 2))
    assert flags["VERSION"] == 2 and flags["PORT_TYPE"] == 9
    assert cfg.read(off + 4, 4) >> 28 & 1 == 0  # no FLR
    cfg.write(off + 8, 2, DEVCTL.encode(BCR_FLR=1, MPS=1))
    assert DEVCTL.decode(cfg.read(off + 8, 2))["MPS"] == 1
    assert DEVCTL.decode(cfg.read(off + 8, 2))["BCR_FLR"] == 0
    cfg.poke(off + 0xA, 2, DEVSTA.encode(CED=1, URD=1, TRPND=1))
    cfg.write(off + 0xA, 2, DEVSTA.encode(URD=1, TRPND=1))
    assert cfg.read(off + 0xA, 2) == DEVSTA.encode(CED=1, TRPND=1)


def test_pcie_flr_is_self_clearing_and_calls_hook() -> None:
    cfg = header_cfg()
    resets: list[int] = []
    off = add_pcie_cap(cfg, flr=True, on_flr=lambda: resets.append(1))
    assert cfg.read(off + 4, 4) >> 28 & 1 == 1
    cfg.write(off + 8, 2, DEVCTL.encode(BCR_FLR=1) | cfg.read(off + 8, 2))
    assert resets == [1]
    assert DEVCTL.get(cfg.read(off + 8, 2), "BCR_FLR") == 0
    cfg.write(off + 8, 2, cfg.read(off + 8, 2))  # a write without the bit: no reset
    assert resets == [1]


def test_pm_power_states() -> None:
    cfg = header_cfg()
    off = add_pm_cap(cfg)
    cfg.write(off + 4, 2, 3)
    assert PMCSR.get(cfg.read(off + 4, 2), "POWER_STATE") == 3
    cfg.write(off + 4, 2, 1)  # D1 not supported: ignored
    assert PMCSR.get(cfg.read(off + 4, 2), "POWER_STATE") == 3
    cfg.write(off + 4, 2, 0)
    assert PMCSR.decode(cfg.read(off + 4, 2))["POWER_STATE"] == 0
    assert PMCSR.decode(cfg.read(off + 4, 2))["NO_SOFT_RESET"] == 1


def test_msi_mme_capped_mask_and_pending() -> None:
    cfg = header_cfg()
    sent: list[int] = []
    msi = MsiCap(cfg, 4, lambda v: sent.append(v) is None)
    ctrl = msi.off + 2
    assert MSI_CTRL.decode(cfg.read(ctrl, 2))["MMC"] == 2
    cfg.write(ctrl, 2, MSI_CTRL.encode(ENABLE=1, MME=5))
    assert msi.enabled and msi.enabled_vectors == 4  # MME capped at MMC
    assert not msi.notify(7)  # beyond the enabled vectors: dropped
    mask_off = msi.off + msi.regs["MASK"].offset
    cfg.write(mask_off, 4, 0b10)
    assert not msi.notify(1) and msi.pending(1) and sent == []
    cfg.write(msi.off + msi.regs["PENDING"].offset, 4, 0)  # pending is RO
    assert msi.pending(1)
    cfg.write(mask_off, 4, 0)
    assert sent == [1] and not msi.pending(1)
    assert msi.notify(0) and sent == [1, 0]


def test_ats_control() -> None:
    cfg = header_cfg()
    ats = AtsCap(cfg, inv_queue_depth=4)
    assert cfg.read(ats.off + 4, 2) & 0x1F == 4
    cfg.write(ats.off + 4, 2, 0)  # capability RO
    assert cfg.read(ats.off + 4, 2) & 0x1F == 4
    assert not ats.enabled
    cfg.write(ats.off + 6, 2, ATS_CTRL.encode(ENABLE=1, STU=2))
    assert ats.enabled and ats.stu == 2


def test_pri_capacity_allocation_reset_and_status() -> None:
    cfg = header_cfg()
    pri = PriCap(cfg, 32)
    ctrl, sts = pri.off + 4, pri.off + 6
    assert cfg.read(pri.off + 8, 4) == 32
    cfg.write(pri.off + 8, 4, 1)  # capacity RO
    assert cfg.read(pri.off + 8, 4) == 32
    assert pri.status("STOPPED") == 1 and not pri.request()  # disabled
    cfg.write(pri.off + 0xC, 4, 2)
    cfg.write(ctrl, 2, 1)
    assert pri.enabled and pri.status("STOPPED") == 0
    assert pri.request() and pri.request() and not pri.request()  # allocation 2
    pri.response(failure=True)
    pri.response(unexpected=True)
    assert pri.outstanding == 1
    assert PRI_STATUS.decode(cfg.read(sts, 2)) == {
        "RF": 1, "UPRGI": 1, "STOPPED": 0, "PASID_REQUIRED": 0}
    cfg.write(sts, 2, PRI_STATUS.encode(RF=1))  # RW1C
    assert pri.status("RF") == 0 and pri.status("UPRGI") == 1
    cfg.write(ctrl, 2, 0b11)  # reset while enabled: no effect, reads 0
    assert pri.outstanding == 1 and cfg.read(ctrl, 2) == 1
    cfg.write(ctrl, 2, 0)  # disable: outstanding request -> not stopped
    assert pri.status("STOPPED") == 0
    cfg.write(ctrl, 2, 0b10)  # reset while disabled clears the credits
    assert pri.outstanding == 0 and pri.status("STOPPED") == 1 and cfg.read(ctrl, 2) == 0


def test_pasid_width_and_permission_bits() -> None:
    cfg = header_cfg()
    p = PasidCap(cfg, 16, exec_perm=True)
    assert p.max_width == 16
    cfg.write(p.off + 6, 2, 0b111)
    assert p.enabled and p.control("EXEC") and not p.control("PRIV")  # no priv support
    with pytest.raises(ValueError):
        PasidCap(header_cfg(), 21)


def test_reset_restores_power_on_image() -> None:
    cfg = header_cfg()
    cfg.setup_bar(0, 0x1000)
    off = add_pm_cap(cfg)
    power_on = cfg.read_bytes(0, 4096)
    cfg.write(0x04, 2, 0x6)
    cfg.write(0x10, 4, 0x1000_0000)
    cfg.write(off + 4, 2, 3)
    assert cfg.read_bytes(0, 4096) != power_on
    cfg.reset()
    assert cfg.read_bytes(0, 4096) == power_on


def test_out_of_range_access_rejected() -> None:
    cfg = header_cfg()
    with pytest.raises(ValueError):
        cfg.read(0xFFE, 4)
    with pytest.raises(ValueError):
        cfg.write_bytes(0x1000, b"\0")


def full_cfg() -> ConfigSpace:
    cfg = header_cfg()
    cfg.setup_bar(0, 0x1000)
    cfg.setup_bar(2, 1 << 20, is64=True, prefetchable=True)
    add_pcie_cap(cfg, flr=True)
    add_pm_cap(cfg)
    MsiCap(cfg, 8, lambda v: True)
    AtsCap(cfg)
    PriCap(cfg, 16)
    PasidCap(cfg, 20, exec_perm=True, priv=True)
    return cfg


FULL = full_cfg()
READ_ONLY = [o for o in range(4096) if not FULL.wmask[o] and not FULL.w1cmask[o]]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4095), st.sampled_from([1, 2, 4]),
                          st.integers(0, 0xFFFFFFFF)), max_size=20))
def test_random_writes_never_touch_read_only_bytes(writes: list[tuple[int, int, int]]) -> None:
    cfg = full_cfg()
    before = cfg.read_bytes(0, 4096)
    for off, size, value in writes:
        off = min(off - off % size, 4096 - size)
        cfg.write(off, size, value)
    after = cfg.read_bytes(0, 4096)
    # read-only bytes never change through guest writes; status bits a device drives
    # (PRI Stopped) are the only read-only bits the model itself updates
    changed = [o for o in READ_ONLY if before[o] != after[o]]
    pri = cfg.find_ext_cap(ExtCapId.PRI)
    assert pri is not None
    assert all(o == pri + 7 for o in changed), [hex(o) for o in changed]
    assert after[:4] == before[:4] and after[0x30:0x34] == bytes(4)
