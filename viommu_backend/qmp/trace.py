"""QMP commands over the backend's :class:`~viommu_backend.trace.Tracer`.

- ``viommu-trace {enable?: [cat...], disable?: [cat...], size?: int, clear?: bool,
  stream?: bool}`` -> the tracer state ``{enabled, size, records, oldest, next, stream,
  stream-dropped}``.  ``disable`` applies before ``enable``; ``"all"`` names every
  category.  ``stream: true`` also sends each new record to QMP clients as the event
  ``VIOMMU_TRACE`` (at most ``trace.STREAM_RATE`` per second; the excess is counted in
  ``stream-dropped``); off by default.
- ``query-viommu-trace {since?: seq, limit?: int (256, max 4096), cat?: [cat...]}`` ->
  ``{records: [...], next: seq, dropped: n}``: pass ``next`` as ``since`` to read on;
  ``dropped`` counts the records from ``since`` on that left the ring unread.
"""

from __future__ import annotations

from typing import Any, Callable

from viommu_backend.trace import QUERY_LIMIT, TraceError, Tracer

from .protocol import QmpError
from .server import QmpCommandRegistry


def _list(args: dict[str, Any], name: str) -> list[str]:
    v = args.get(name, [])
    if not all(isinstance(c, str) for c in v):
        raise QmpError(f"Parameter '{name}' must be a list of category names")
    return v


def register_trace_commands(registry: QmpCommandRegistry, tracer: Tracer,
                            emit: Callable[[str, dict[str, Any]], Any] | None = None) -> None:
    """Register ``viommu-trace`` and ``query-viommu-trace``.  ``emit(event, data)`` sends
    QMP events (the backend's ``QmpServer.emit``); without it ``stream`` is refused."""

    def configure(args: dict[str, Any]) -> dict[str, Any]:
        stream = args.get("stream")
        if stream and emit is None:
            raise QmpError("streaming is not available (no QMP server)")
        try:
            state = tracer.configure(enable=_list(args, "enable"), disable=_list(args, "disable"),
                                     size=args.get("size"), clear=bool(args.get("clear", False)))
        except TraceError as e:
            raise QmpError(str(e)) from None
        if stream is not None:
            tracer.listener = (lambda rec: emit("VIOMMU_TRACE", rec)) if stream else None
            state = tracer.state()
        return state

    def query(args: dict[str, Any]) -> dict[str, Any]:
        cats = _list(args, "cat") if "cat" in args else None
        try:
            return tracer.query(args.get("since", 0), args.get("limit", QUERY_LIMIT), cats)
        except TraceError as e:
            raise QmpError(str(e)) from None

    registry.register("viommu-trace", configure,
                      {"*enable": "array", "*disable": "array", "*size": "int",
                       "*clear": "bool", "*stream": "bool"},
                      doc="enable / disable trace categories (reg cmd event priq gerror irq "
                          "domain fault, or all), resize or clear the ring, stream records")
    registry.register("query-viommu-trace", query,
                      {"*since": "int", "*limit": "int", "*cat": "array"},
                      doc="trace records from seq 'since' on: {records, next, dropped}")
