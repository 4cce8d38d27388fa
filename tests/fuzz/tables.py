"""Guest-written translation structures: a stream table (linear or 2-level), STEs, CDs
and page tables from the input, resolved and walked as the SMMU does for a transaction.

Input: 8 header bytes (STRTAB_BASE_CFG FMT/LOG2SIZE/SPLIT, StreamID, SSID, access), four
IOVAs and an image of guest memory at RAM.  Every outcome must be a configuration or a translation
fault with an architected event (C_BAD_STE for an invalid STE, ...), never an exception;
the batched walker must agree with the scalar one; no access outside the RAM region."""

from __future__ import annotations

import numpy as np

from tests.fuzz.common import STATS, Finding, Reader, fenced_memory
from viommu_backend.smmuv3 import builders as b
from viommu_backend.smmuv3 import fields as fl
from viommu_backend.smmuv3.cd import fetch_cd
from viommu_backend.smmuv3.events import EVENT_IDS
from viommu_backend.smmuv3.ste import ConfigFault, fetch_ste, decode_ste
from viommu_backend.smmuv3.walker import stage_params, walk, walk_one

RAM, RAM_SIZE, IMAGE = 0x4000_0000, 0x1_0000, 0x8000
STE_EVENTS = {"C_BAD_STREAMID", "F_STE_FETCH", "C_BAD_STE"}
CD_EVENTS = {"C_BAD_SUBSTREAMID", "F_STREAM_DISABLED", "F_CD_FETCH", "C_BAD_CD",
             "F_TRANSLATION", "F_ADDR_SIZE",
             "F_ACCESS", "F_PERMISSION", "F_WALK_EABT"}
MEM = fenced_memory(RAM, RAM_SIZE)


def _resolve(r: Reader):
    cfg = dict(FMT=r.int(1) & 1, LOG2SIZE=r.int(1) % 24, SPLIT=r.int(1) % 24)
    sid = r.int(2)
    ssid = r.int(2)
    ssid = None if ssid == 0xFFFF else ssid & 0xFFF
    access = r.int(1)
    iovas = np.frombuffer(r.take(32), dtype="<u8").astype(np.uint64)
    MEM.write(RAM, bytes(IMAGE))
    MEM.write(RAM, r.rest()[:IMAGE])
    try:
        words = fetch_ste(MEM, RAM, cfg, sid)
    except ConfigFault as f:
        if f.event not in STE_EVENTS:
            raise Finding(f"STE lookup raised {f.event}")
        return None
    try:
        sc = decode_ste(words, sid=sid)
    except ConfigFault as f:
        if f.event != "C_BAD_STE":
            raise Finding(f"STE decode raised {f.event}")
        STATS["C_BAD_STE"] += 1
        return None
    if not int(words[0]) & 1:
        raise Finding("STE.V == 0 decoded without C_BAD_STE")
    s1 = None
    if sc.s1 is not None:
        try:
            s1 = fetch_cd(MEM, sc.s1, ssid, sc.s2, sid=sid)
        except ConfigFault as f:
            if f.event not in CD_EVENTS:
                raise Finding(f"CD fetch raised {f.event}")
            STATS[f.event] += 1
            return None
    return s1, sc.s2, access, iovas


def one_input(data: bytes) -> None:
    STATS["inputs"] += 1
    r = Reader(data)
    got = _resolve(r)
    if got is None:
        return
    s1, s2, access, iovas = got
    write, priv, instr = bool(access & 1), bool(access & 2), bool(access & 4)
    updates = any(stage_params(c).update for c in (s1, s2) if c is not None)
    batch = None if updates else walk(MEM, s1, s2, iovas, write=write, priv=priv, instr=instr)
    for i, va in enumerate(iovas.tolist()):
        t = walk_one(MEM, s1, s2, va, write=write, priv=priv, instr=instr)
        if t.fault:
            name = t.fault_name
            if name not in EVENT_IDS:
                raise Finding(f"walk fault {t.fault} is no SMMUv3 event")
            STATS[name] += 1
        else:
            STATS["translated"] += 1
        if batch is not None:
            bt = batch.item(i)
            if (bt.fault, bt.pa if not bt.fault else 0) != (t.fault, t.pa if not t.fault else 0):
                raise Finding(f"batched walk {bt} != scalar walk {t} for {va:#x}")


def seeds() -> list[bytes]:
    """A valid S1 stream (linear table), a nested-free S2 one and a 2-level table."""
    out = []
    for config in (fl.STE_CONFIG_S1, fl.STE_CONFIG_S2, fl.STE_CONFIG_BYPASS):
        MEM.write(RAM, bytes(IMAGE))
        al = b.Allocator(RAM + 0x1000, IMAGE - 0x1000)
        pt = b.PageTable(MEM, al, stage2=config == fl.STE_CONFIG_S2)
        pt.map_range(0x10_0000, RAM + 0x6000, 0x2000)
        cd = al.alloc(64, 64)
        b.write_words(MEM, cd, b.make_cd(pt.root))
        b.write_words(MEM, RAM + 64, b.make_ste(config, s1_ctx_ptr=cd, s2_ttb=pt.root))
        hdr = bytes([0, 4, 0]) + (1).to_bytes(2, "little") + b"\xff\xff" + b"\x01"
        iovas = b"".join(v.to_bytes(8, "little") for v in (0x10_0000, 0x10_1008, 0x20_0000, 0))
        out.append(hdr + iovas + MEM.read(RAM, al.next - RAM))
    return out
