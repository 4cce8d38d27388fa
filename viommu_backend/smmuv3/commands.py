"""Command queue entries (16 bytes): one declarative layout per command.

Bit positions follow the SMMUv3 architecture as Linux's ``arm-smmu-v3.h`` (CMDQ_*)
encodes them.  :func:`decode_command` turns 16 bytes into a :class:`Command` (opcode
name + field dict) or raises :class:`IllegalCommand` (the device then reports
CERROR_ILL).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from viommu_backend.bitfield import F, Field, Layout

CMD_SIZE = 16

OPCODE = F("OPCODE", 7, 0)

# shared field groups
_SID = F("SID", 63, 32)
_SSEC = F("SSEC", 10)
_SSV = F("SSV", 11)
_SSID = F("SSID", 31, 12)
_LEAF = F("LEAF", 0, word=1)
_VMID = F("VMID", 47, 32)
_ASID = F("ASID", 63, 48)
_NUM = F("NUM", 16, 12)
_SCALE = F("SCALE", 24, 20)
_TTL = F("TTL", 9, 8, word=1)
_TG = F("TG", 11, 10, word=1)
_VA = F("ADDR", 63, 12, word=1, address=True)
_IPA = F("ADDR", 51, 12, word=1, address=True)

CS_NONE = 0
CS_IRQ = 1
CS_SEV = 2

RESP_TERM = 0  # RESUME: terminate (RAZ/WI if IDR0.TERM_MODEL == 0, else abort)
RESP_RETRY = 1  # retry as though the transaction had just arrived
RESP_ABORT = 2  # terminate with an abort

PRI_RESP_DENY = 0
PRI_RESP_FAIL = 1
PRI_RESP_SUCC = 2


def _L(name: str, *fs: Field) -> Layout:
    return Layout(f"CMD_{name}", 128, (OPCODE, *fs))


# opcode -> (name, layout)
COMMANDS: dict[int, tuple[str, Layout]] = {
    0x01: ("PREFETCH_CONFIG", _L("PREFETCH_CONFIG", _SSEC, _SSV, _SSID, _SID)),
    0x02: ("PREFETCH_ADDR", _L("PREFETCH_ADDR", _SSEC, _SSV, _SSID, _SID,
                               F("SIZE", 4, 0, word=1), F("STRIDE", 9, 5, word=1),
                               F("ADDR", 63, 12, word=1, address=True))),
    0x03: ("CFGI_STE", _L("CFGI_STE", _SSEC, _SID, _LEAF)),
    0x04: ("CFGI_STE_RANGE", _L("CFGI_STE_RANGE", _SSEC, _SID, F("RANGE", 4, 0, word=1))),
    0x05: ("CFGI_CD", _L("CFGI_CD", _SSEC, _SSID, _SID, _LEAF)),
    0x06: ("CFGI_CD_ALL", _L("CFGI_CD_ALL", _SSEC, _SID)),
    0x10: ("TLBI_NH_ALL", _L("TLBI_NH_ALL", _VMID)),
    0x11: ("TLBI_NH_ASID", _L("TLBI_NH_ASID", _VMID, _ASID)),
    0x12: ("TLBI_NH_VA", _L("TLBI_NH_VA", _NUM, _SCALE, _VMID, _ASID, _LEAF, _TTL, _TG, _VA)),
    0x13: ("TLBI_NH_VAA", _L("TLBI_NH_VAA", _NUM, _SCALE, _VMID, _LEAF, _TTL, _TG, _VA)),
    0x18: ("TLBI_EL3_ALL", _L("TLBI_EL3_ALL")),
    0x1A: ("TLBI_EL3_VA", _L("TLBI_EL3_VA", _NUM, _SCALE, _LEAF, _TTL, _TG, _VA)),
    0x20: ("TLBI_EL2_ALL", _L("TLBI_EL2_ALL")),
    0x21: ("TLBI_EL2_ASID", _L("TLBI_EL2_ASID", _ASID)),
    0x22: ("TLBI_EL2_VA", _L("TLBI_EL2_VA", _NUM, _SCALE, _ASID, _LEAF, _TTL, _TG, _VA)),
    0x23: ("TLBI_EL2_VAA", _L("TLBI_EL2_VAA", _NUM, _SCALE, _LEAF, _TTL, _TG, _VA)),
    0x28: ("TLBI_S12_VMALL", _L("TLBI_S12_VMALL", _VMID)),
    0x2A: ("TLBI_S2_IPA", _L("TLBI_S2_IPA", _NUM, _SCALE, _VMID, _LEAF, _TTL, _TG, _IPA)),
    0x30: ("TLBI_NSNH_ALL", _L("TLBI_NSNH_ALL")),
    0x40: ("ATC_INV", _L("ATC_INV", F("GLOBAL", 9), _SSV, _SSID, _SID,
                         F("SIZE", 5, 0, word=1), F("ADDR", 63, 12, word=1, address=True))),
    0x41: ("PRI_RESP", _L("PRI_RESP", _SSEC, _SSV, _SSID, _SID,
                          F("GRPID", 8, 0, word=1), F("RESP", 13, 12, word=1))),
    0x44: ("RESUME", _L("RESUME", _SSEC, F("RESP", 13, 12), _SID, F("STAG", 15, 0, word=1))),
    0x45: ("STALL_TERM", _L("STALL_TERM", _SSEC, _SID)),
    0x46: ("CMD_SYNC", _L("CMD_SYNC", F("CS", 13, 12), F("MSH", 23, 22),
                          F("MSIATTR", 27, 24), F("MSIDATA", 63, 32),
                          F("MSIADDR", 51, 2, word=1, address=True))),
}
OPCODES: dict[str, int] = {name: op for op, (name, _) in COMMANDS.items()}
LAYOUTS: dict[str, Layout] = {name: lay for _, (name, lay) in COMMANDS.items()}
CFGI_ALL_RANGE = 31  # CFGI_ALL is CFGI_STE_RANGE with Range 31


class IllegalCommand(ValueError):
    """An unknown opcode or a reserved field value: CERROR_ILL."""


@dataclass(frozen=True)
class Command:
    name: str
    opcode: int
    fields: dict[str, int] = field(default_factory=dict)
    raw: bytes = b""

    def __getitem__(self, key: str) -> int:
        return self.fields[key]


def decode_command(data: bytes) -> Command:
    """The command in the first 16 bytes of ``data`` (a driver reuses a few encodings, a
    queue slot's CMD_SYNC among them: the last decodes are kept; treat the result as
    read-only)."""
    if len(data) < CMD_SIZE:
        raise IllegalCommand(f"command of {len(data)} bytes")
    return _decode(bytes(data[:CMD_SIZE]))


@functools.lru_cache(maxsize=1024)
def _decode(raw: bytes) -> Command:
    value = int.from_bytes(raw, "little")
    op = OPCODE.get(value)
    entry = COMMANDS.get(op)
    if entry is None:
        raise IllegalCommand(f"unknown opcode {op:#04x}")
    name, lay = entry
    fv = lay.decode(value)
    del fv["OPCODE"]
    if name == "CMD_SYNC" and fv["CS"] == 3:
        raise IllegalCommand("CMD_SYNC CS=3 reserved")
    if name == "RESUME" and fv["RESP"] == 3:
        raise IllegalCommand("RESUME Resp=3 reserved")
    if name == "PRI_RESP" and fv["RESP"] == 3:
        raise IllegalCommand("PRI_RESP Resp=3 reserved")
    if fv.get("SSEC"):
        raise IllegalCommand("SSec=1 on the Non-secure command queue")
    return Command(name, op, fv, raw)


def encode_command(name: str, **fv: int) -> bytes:
    """Build a command (for tests, tools and the guest-side fuzzers)."""
    if name == "CFGI_ALL":
        name, fv = "CFGI_STE_RANGE", {"RANGE": CFGI_ALL_RANGE, **fv}
    lay = LAYOUTS[name]
    return lay.to_bytes(lay.encode(fv, OPCODE=OPCODES[name]))
