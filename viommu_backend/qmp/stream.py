"""``query-viommu-stream {sid, ssid?, max-ssids?, iova?, limit?}``: the decoded STE, the
context descriptors of its SubstreamIDs and the live mappings of each stage, read from
guest memory now (no event, no cache fill); bounded and paged (``next-ssid``, ``next``).
See :mod:`viommu_backend.smmuv3.stream_view`."""

from __future__ import annotations

from typing import Any

from viommu_backend.smmuv3.ptdump import MAX_LIMIT
from viommu_backend.smmuv3.stream_view import MAX_SSIDS, describe_stream

from .protocol import QmpError
from .server import QmpCommandRegistry


def _arg(args: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    v = args.get(name, default)
    if not lo <= v <= hi:
        raise QmpError(f"Parameter '{name}' out of range ({lo}..{hi})")
    return v


def register_stream_commands(registry: QmpCommandRegistry, mgr: Any, smmu: Any) -> None:
    def query_stream(args: dict[str, Any]) -> dict[str, Any]:
        sid = _arg(args, "sid", 0, 0, (1 << smmu.config.sidsize) - 1)
        out = describe_stream(
            mgr.guest_memory, smmu.stream_table, sid, oas=mgr.oas, ssid_bits=mgr.ssid_bits,
            fwb=mgr.fwb, ssid=_arg(args, "ssid", 0, 0, (1 << 20) - 1),
            max_ssids=_arg(args, "max-ssids", 8, 1, MAX_SSIDS),
            iova=_arg(args, "iova", 0, 0, (1 << 64) - 1), limit=_arg(args, "limit", 64, 1, MAX_LIMIT))
        dev = mgr.devices.get(sid)
        if dev is not None and dev.hwpt is not None:
            out["domain"] = dev.hwpt.id
        return out

    registry.register("query-viommu-stream", query_stream,
                      {"sid": "int", "*ssid": "int", "*max-ssids": "int", "*iova": "int", "*limit": "int"},
                      doc="decoded STE, CDs and live mappings of a stream (bounded, paged)")
