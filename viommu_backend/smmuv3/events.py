"""Event queue records (32 bytes) and PRI queue records (16 bytes).

Bit positions follow the SMMUv3 architecture as Linux's ``arm-smmu-v3.h`` (EVTQ_*,
PRIQ_*) encodes them.  One layout covers all event types; :data:`EVENT_FIELDS` says
which fields each type carries (the others are written as zero).  The type codes are
:class:`~viommu_backend.smmuv3.fields.EventId`, the CLASS values
:class:`~viommu_backend.smmuv3.fields.FaultClass`.
"""

from __future__ import annotations

from dataclasses import dataclass

from viommu_backend.bitfield import F, Layout
from viommu_backend.smmuv3.fields import EventId, FaultClass

EVT_SIZE = 32
PRI_SIZE = 16

EVENT_RECORD = Layout("EVENT", 256, (
    F("EVENTID", 7, 0),
    F("SSV", 11),
    F("SUBSTREAMID", 31, 12),
    F("STREAMID", 63, 32),
    F("STAG", 15, 0, word=1),
    F("STALL", 31, word=1),
    F("PNU", 33, word=1),
    F("IND", 34, word=1),
    F("RNW", 35, word=1),
    F("S2", 39, word=1),
    F("CLASS", 41, 40, word=1),
    F("TT_READ", 44, word=1),
    F("INPUTADDR", 63, 0, word=2, address=True),
    F("NSIPA", 0, word=3),
    F("FETCHADDR", 51, 3, word=3, address=True),  # F_STE_FETCH/F_CD_FETCH/F_WALK_EABT/...
))
# IPA of a stage-2 fault shares word 3 with FETCHADDR: [51:12].
IPA_FIELD = F("IPA", 51, 12, word=3, address=True)

EVENT_IDS: dict[str, int] = {e.name: int(e) for e in EventId if e is not EventId.OK}
EVENT_NAMES: dict[int, str] = {v: k for k, v in EVENT_IDS.items()}
FAULT_CLASSES: dict[str, int] = {c.name: int(c) for c in FaultClass}  # CD, TTD, IN

_ID = ("STREAMID", "SSV", "SUBSTREAMID")
_ACCESS = ("PNU", "IND", "RNW")
_FULL = _ID + ("STALL", "STAG") + _ACCESS + ("S2", "CLASS", "INPUTADDR", "NSIPA", "IPA")
EVENT_FIELDS: dict[str, tuple[str, ...]] = {
    "F_UUT": _ID + ("STALL", "STAG") + _ACCESS + ("INPUTADDR",),
    "C_BAD_STREAMID": _ID,
    "F_STE_FETCH": _ID + ("FETCHADDR",),
    "C_BAD_STE": _ID,
    "F_BAD_ATS_TREQ": _ID + _ACCESS + ("INPUTADDR",),
    "F_STREAM_DISABLED": ("STREAMID",),
    "F_TRANSL_FORBIDDEN": ("STREAMID", "RNW", "INPUTADDR"),
    "C_BAD_SUBSTREAMID": _ID,
    "F_CD_FETCH": _ID + ("FETCHADDR",),
    "C_BAD_CD": _ID,
    "F_WALK_EABT": _ID + ("STALL", "STAG") + _ACCESS + ("S2", "CLASS", "INPUTADDR",
                                                        "FETCHADDR"),
    "F_TRANSLATION": _FULL,
    "F_ADDR_SIZE": _FULL,
    "F_ACCESS": _FULL,
    "F_PERMISSION": _FULL + ("TT_READ",),
    "F_TLB_CONFLICT": _ID + _ACCESS + ("S2", "INPUTADDR"),
    "F_CFG_CONFLICT": _ID,
    "E_PAGE_REQUEST": _ID + _ACCESS + ("INPUTADDR",),
    "F_VMS_FETCH": ("STREAMID", "FETCHADDR"),
}
if EVENT_FIELDS.keys() != EVENT_IDS.keys():
    raise ValueError(f"EVENT_FIELDS and EventId differ: {EVENT_FIELDS.keys() ^ EVENT_IDS.keys()}")


@dataclass(frozen=True)
class Event:
    """One event record before encoding: the type name plus the fields it carries."""

    name: str
    sid: int
    ssid: int | None = None  # None: SSV=0
    addr: int = 0  # InputAddr
    ipa: int = 0
    fetch_addr: int = 0
    read: bool = True  # RnW
    privileged: bool = False  # PnU
    instruction: bool = False  # InD
    s2: bool = False
    klass: int = FaultClass.IN
    stall: bool = False
    stag: int = 0
    nsipa: bool = False
    tt_read: bool = False

    def __post_init__(self) -> None:
        if self.name not in EVENT_IDS:
            raise ValueError(f"unknown event {self.name!r}")

    def fields(self) -> dict[str, int]:
        return {
            "STREAMID": self.sid, "SSV": self.ssid is not None,
            "SUBSTREAMID": self.ssid or 0, "INPUTADDR": self.addr, "IPA": self.ipa & ~0xFFF,
            "FETCHADDR": self.fetch_addr & ~0x7, "RNW": self.read, "PNU": self.privileged,
            "IND": self.instruction, "S2": self.s2, "CLASS": self.klass,
            "STALL": self.stall, "STAG": self.stag, "NSIPA": self.nsipa,
            "TT_READ": self.tt_read,
        }

    def encode(self) -> bytes:
        return encode_event(self)


def encode_event(ev: Event) -> bytes:
    """32 little-endian bytes of the record; fields not carried by the type are 0."""
    carried = EVENT_FIELDS[ev.name]
    all_f = ev.fields()
    value = EVENT_RECORD.encode(EVENTID=EVENT_IDS[ev.name])
    for name in carried:
        fld = IPA_FIELD if name == "IPA" else EVENT_RECORD[name]
        fv = int(all_f[name])
        if fld.address:  # drop bits the record cannot hold (e.g. above bit 51)
            fv &= fld.mask >> (64 * fld.word)
        value = fld.put(value, fv)
    return EVENT_RECORD.to_bytes(value)


def decode_event(data: bytes) -> dict[str, int | str]:
    """Fields of a record as the driver sees them (name + the type's fields)."""
    value = EVENT_RECORD.from_bytes(data)
    eid = EVENT_RECORD.get(value, "EVENTID")
    name = EVENT_NAMES.get(eid, f"UNKNOWN_{eid:#x}")
    out: dict[str, int | str] = {"name": name, "EVENTID": eid}
    for fname in EVENT_FIELDS.get(name, _ID):
        out[fname] = IPA_FIELD.get(value) if fname == "IPA" else EVENT_RECORD.get(value, fname)
    return out


# -- PRI queue ----------------------------------------------------------------------
PRI_RECORD = Layout("PRIQ_ENTRY", 128, (
    F("SID", 31, 0),
    F("SSID", 51, 32),
    F("PRIV", 58),
    F("EXEC", 59),
    F("READ", 60),
    F("WRITE", 61),
    F("LAST", 62),
    F("SSV", 63),
    F("PRG_INDEX", 8, 0, word=1),
    F("ADDR", 63, 12, word=1, address=True),
))


@dataclass(frozen=True)
class PageRequest:
    """A PCIe Page Request (one entry of a Page Request Group)."""

    sid: int
    prg_index: int
    addr: int
    ssid: int | None = None  # PASID; None = no PASID prefix
    read: bool = True
    write: bool = False
    exec: bool = False
    priv: bool = False
    last: bool = True

    def encode(self) -> bytes:
        return PRI_RECORD.to_bytes(PRI_RECORD.encode(
            SID=self.sid, SSID=self.ssid or 0, SSV=self.ssid is not None, PRIV=self.priv,
            EXEC=self.exec, READ=self.read, WRITE=self.write, LAST=self.last,
            PRG_INDEX=self.prg_index, ADDR=self.addr & (PRI_RECORD["ADDR"].mask >> 64),
        ))


def decode_page_request(data: bytes) -> dict[str, int]:
    return PRI_RECORD.decode(PRI_RECORD.from_bytes(data))
