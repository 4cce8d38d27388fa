"""The Register abstraction: write masks from per-field access rules, RW1C, reserved bits."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from viommu_backend.bitfield import ALL_FIELDS, F, Register, masked_write
from viommu_backend.pci.config_space import HEADER
from viommu_backend.smmuv3 import regs

CTRL = Register("CTRL", 0x10, 16, (F("EN", 0), F("MODE", 3, 1), F("ERR", 8), F("ID", 15, 12)),
                rw=("EN", "MODE"), rw1c=("ERR",))


def test_masks_derive_from_the_access_rules() -> None:
    assert CTRL.wmask == 0b1111  # EN + MODE
    assert CTRL.w1cmask == 1 << 8  # ERR (ID and the reserved bits: read-only)
    assert CTRL.size == 2


def test_all_fields_covers_the_fields_only_or_the_whole_register() -> None:
    every = Register("R", 0, 32, CTRL.fields, rw=(ALL_FIELDS,))
    assert every.wmask == 0xF10F  # reserved bits [7:4], [11:9] stay read-only
    assert Register("SCRATCH", 0, 32, rw=(ALL_FIELDS,)).wmask == 0xFFFF_FFFF


def write(old: int, value: int) -> int:
    return masked_write(old, value, CTRL.wmask, CTRL.w1cmask)


def test_write_applies_rw_rw1c_and_keeps_read_only_and_reserved_bits() -> None:
    old = CTRL.layout.encode(EN=1, MODE=5, ERR=1, ID=0xA) | 0x70  # + reserved bits set
    assert write(old, 0) == CTRL.layout.encode(ERR=1, ID=0xA) | 0x70  # 0 does not clear ERR
    new = write(old, CTRL.layout.encode(MODE=2, ERR=1, ID=0x5) | 0x80)
    assert CTRL.layout.decode(new) == {"EN": 0, "MODE": 2, "ERR": 0, "ID": 0xA}
    assert new & 0xF0 == 0x70  # reserved bits as they were


@given(old=st.integers(0, 0xFFFF), value=st.integers(0, 0xFFFF))
def test_write_never_touches_read_only_bits(old: int, value: int) -> None:
    new = write(old, value)
    fixed = ~(CTRL.wmask | CTRL.w1cmask) & 0xFFFF
    assert new & fixed == old & fixed
    assert new & CTRL.wmask == value & CTRL.wmask
    assert new & CTRL.w1cmask == old & ~value & CTRL.w1cmask


def test_bad_access_tables_fail_at_definition() -> None:
    with pytest.raises(ValueError, match="no field NOPE"):
        Register("R", 0, 32, (F("A", 0),), rw=("NOPE",))
    with pytest.raises(ValueError, match="both RW and RW1C"):
        Register("R", 0, 32, (F("A", 0),), rw=("A",), rw1c=("A",))
    with pytest.raises(ValueError, match="overlaps"):
        Register("R", 0, 32, (F("A", 3, 0), F("B", 3)))


def test_describe_is_the_value_and_its_fields() -> None:
    assert CTRL.describe(CTRL.layout.encode(MODE=3, ID=1)) == {
        "value": hex(0x1006), "EN": 0, "MODE": 3, "ERR": 0, "ID": 1}


def test_pci_config_and_smmu_registers_are_the_same_abstraction() -> None:
    status, command = HEADER["STATUS"], HEADER["COMMAND"]
    assert status.w1cmask & status.layout["REC_MASTER_ABORT"].mask
    assert not (status.wmask | status.w1cmask) & status.layout["INTERRUPT"].mask
    assert command.wmask & command.layout["MASTER"].mask
    assert not command.wmask & command.layout["IO"].mask
    assert type(status) is type(regs.SMMU_REGS["CR0"]) is Register
