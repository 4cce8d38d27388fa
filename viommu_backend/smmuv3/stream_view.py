"""What the guest programmed for one stream, decoded straight from guest memory: the STE,
the context descriptors of its SubstreamIDs and the live mappings of each stage
(QMP ``query-viommu-stream``).  Side-effect free: no event, no cache fill.

    describe_stream(mem, table, sid, oas=48, ssid_bits=20,
                    ssid=0, max_ssids=8, iova=0, limit=64) -> dict

``table`` is the SMMU's stream table state (``enabled``, ``base``, ``fmt``, ``log2size``,
``split``).  Substreams are listed from CD index ``ssid`` on, at most ``max_ssids`` with a
valid CD (scanning at most ``SCAN_MAX`` indices); mappings from input address ``iova`` on,
at most ``limit`` per table; ``next-ssid`` / ``next`` say where the following page starts.
"""

from __future__ import annotations

from typing import Any

from viommu_backend.smmuv3 import fields as fl
from viommu_backend.smmuv3.cd import S1Config, cd_address, decode_cd
from viommu_backend.smmuv3.ptdump import Leaf, LeafPage, leaves, perms
from viommu_backend.smmuv3.ste import ConfigFault, S2Config, decode_ste, read_words, ste_address
from viommu_backend.smmuv3.walker import walk_one

SCAN_MAX = 4096
MAX_SSIDS = 64


def _perm_text(perm: int) -> str:
    return "".join(c if perm & bit else "-" for c, bit in
                   (("r", fl.PERM_R), ("w", fl.PERM_W), ("x", fl.PERM_X)))


def _nonzero(d: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in d.items() if v}


def _s2_pa(mem, s2: S2Config | None, ipa: int) -> int | None:
    if s2 is None:
        return ipa
    t = walk_one(mem, None, s2, ipa, write=False)
    return None if t.fault else t.pa


def _mapping(mem, leaf: Leaf, *, stage2: bool, s2: S2Config | None) -> dict[str, Any]:
    out = {"iova": leaf.iova, "size": leaf.size, "level": leaf.level,
           "perm": _perm_text(perms(leaf, stage2)), "attrs": _nonzero(leaf.attrs(stage2))}
    if s2 is not None:  # nested stage 1: its output is an IPA
        out["ipa"] = leaf.oa
        pa = _s2_pa(mem, s2, leaf.oa)
        if pa is not None:
            out["pa"] = pa
    else:
        out["pa"] = leaf.oa
    return out


def _page(mem, page: LeafPage, *, stage2: bool, s2: S2Config | None) -> dict[str, Any]:
    out: dict[str, Any] = {"mappings": [_mapping(mem, lf, stage2=stage2, s2=s2) for lf in page.leaves],
                           "next": page.next, "tables-read": page.tables}
    if page.errors:
        out["errors"] = page.errors
    return out


def _stage2(mem, s2: S2Config, iova: int, limit: int) -> dict[str, Any]:
    out = {"vmid": s2.vmid, "ttb": s2.ttb, "granule": s2.tg, "ia-bits": s2.ia_bits,
           "start-level": s2.start_level, "ps-bits": s2.ps_bits}
    return out | _page(mem, leaves(mem, s2, start=iova, limit=limit), stage2=True, s2=None)


def _cd(mem, cd: S1Config, s2: S2Config | None, iova: int, limit: int) -> dict[str, Any]:
    out = {"asid": cd.asid, "ttb0": cd.ttb, "granule": cd.tg, "ia-bits": cd.ia_bits,
           "start-level": cd.start_level, "ips-bits": cd.ips_bits, "epd0": cd.epd0}
    table_pa = None if s2 is None else (lambda ipa: _s2_pa(mem, s2, ipa))
    page = leaves(mem, cd, start=iova, limit=limit, table_pa=table_pa)
    return out | _page(mem, page, stage2=False, s2=s2)


def _substreams(mem, sc: Any, sid: int, *, oas: int, first: int, max_ssids: int, iova: int,
                limit: int) -> tuple[list[dict[str, Any]], int | None]:
    ctx = sc.s1
    count = 1 << ctx.cdmax if ctx.cdmax else 1
    out: list[dict[str, Any]] = []
    index = first
    while index < min(count, first + SCAN_MAX):
        if len(out) >= max_ssids:
            return out, index
        entry: dict[str, Any] = {"ssid": index if ctx.cdmax else None, "cd-index": index}
        try:
            addr = cd_address(mem, ctx, index, sc.s2, sid=sid)
            words = read_words(mem, addr, fl.CD_WORDS, "F_CD_FETCH", sid=sid, ssid=index)
        except ConfigFault as cf:
            if ctx.cdmax and cf.event == "C_BAD_SUBSTREAMID":  # L1 descriptor invalid: skip
                index += 1
                continue
            out.append(entry | {"error": str(cf)})
            index += 1
            continue
        val = sum(int(w) << (64 * i) for i, w in enumerate(words))
        if ctx.cdmax and not fl.CD["V"].get(val):
            index += 1
            continue
        entry |= {"address": addr, "fields": _nonzero(fl.CD.decode(val))}
        try:
            cd = decode_cd(words, oas=oas, sid=sid, ssid=index)
            entry["stage1"] = _cd(mem, cd, sc.s2, iova, limit)
        except ConfigFault as cf:
            entry["error"] = str(cf)
        out.append(entry)
        index += 1
    return out, (index if index < count else None)


def describe_stream(mem, table: Any, sid: int, *, oas: int = 48, ssid_bits: int = 20,
                    fwb: bool = False, ssid: int = 0, max_ssids: int = 8, iova: int = 0, limit: int = 64) -> dict[str, Any]:
    """The decoded STE, CDs and mappings of ``sid`` (see the module docstring)."""
    out: dict[str, Any] = {"sid": sid}
    if table is None or not table.enabled:
        out["config"] = "smmu-disabled"
        return out
    if mem is None:
        out["error"] = "no guest memory mapped yet"
        return out
    cfg = {"FMT": table.fmt, "LOG2SIZE": table.log2size, "SPLIT": table.split}
    try:
        addr = ste_address(mem, table.base, cfg, sid)
        words = read_words(mem, addr, fl.STE_WORDS, "F_STE_FETCH", sid=sid)
    except ConfigFault as cf:
        return out | {"error": str(cf), "event": cf.event}
    val = sum(int(w) << (64 * i) for i, w in enumerate(words))
    out["ste"] = {"address": addr, "words": [int(w) for w in words], "fields": _nonzero(fl.STE.decode(val))}
    try:
        sc = decode_ste(words, oas=oas, ssid_bits=ssid_bits, sid=sid, fwb=fwb)
    except ConfigFault as cf:
        return out | {"error": str(cf), "event": cf.event}
    out["config"] = sc.config
    if sc.s2 is not None:
        out["stage2"] = _stage2(mem, sc.s2, iova if sc.s1 is None else 0, limit)
    if sc.s1 is not None:
        out["cd-table"] = {"address": sc.s1.cd_ptr, "format": sc.s1.fmt, "cdmax": sc.s1.cdmax,
                           "s1dss": sc.s1.dss}
        subs, nxt = _substreams(mem, sc, sid, oas=oas, first=ssid,
                                max_ssids=max(1, min(max_ssids, MAX_SSIDS)), iova=iova, limit=limit)
        out["substreams"], out["next-ssid"] = subs, nxt
    return out
