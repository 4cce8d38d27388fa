"""QMP: random bytes, JSON, command names and arguments into the sans-IO QMP core and the
command registry of a real Backend (SMMU + DMA test engine, not serving).

Every reply must be one JSON object with ``return`` or ``error`` (``error`` with a
``class`` and a ``desc``); no command may hang (5 s), raise or log an error; afterwards a
fresh client still negotiates and ``query-viommu-functions`` answers.

Every input starts from the same state: after one with a command that returned and may
have changed something (all but the queries, ``viommu-iova-to-phys`` and negotiation),
the backend is built again.  Without that, objects allocated over QMP pile up (they live
until ``viommu-destroy``, as iommufd's live until close), each ``query-viommu-domains``
lists all of them, and the rate fell from 2000 to 60 inputs/s within 50,000 inputs;
armed faults would also carry into the next input, which then would not reproduce alone."""

from __future__ import annotations

import asyncio
import json
import tempfile
from typing import Any

from tests.support.topologies import SMMU_TESTDEV

from tests.fuzz.common import STATS, ErrorTrap, Finding, Reader
from viommu_backend.app import Backend
from viommu_backend.config import loads_config
from viommu_backend.qmp.protocol import Execute, QmpConnection, Reply
from viommu_backend.qmp.server import QmpServer

TIMEOUT = 5.0
LOOP = asyncio.new_event_loop()
SOCKET_DIR = tempfile.mkdtemp(prefix="viommu-fuzz-")
TRAP = ErrorTrap()
NEGOTIATE = b'{"execute": "qmp_capabilities"}'


class Target:
    """The backend under test and its QMP server; ``changed`` is set by a command that
    may have changed the backend's state."""

    def __init__(self) -> None:
        self._build()

    def _build(self) -> None:
        self.backend = Backend(loads_config(SMMU_TESTDEV), SOCKET_DIR)
        self.server = QmpServer(self.backend.qmp_registry())
        self.changed = False

    def rebuild(self) -> None:
        """Close the backend and start again from a fresh one."""
        LOOP.run_until_complete(self.backend.close())
        self._build()


TARGET = Target()
NAMES = sorted(TARGET.server.registry.names()) + ["qmp_capabilities"]
READ_ONLY = {n for n in NAMES if n.startswith("query-")} | {
    "qmp_capabilities", "viommu-iova-to-phys"}


def _check_reply(data: bytes) -> dict[str, Any]:
    try:
        msg = json.loads(data)
    except ValueError as e:
        raise Finding(f"reply is not JSON: {data[:200]!r}") from e
    if not isinstance(msg, dict) or ("return" in msg) == ("error" in msg):
        raise Finding(f"reply is neither a return nor an error: {msg!r:.300}")
    if "error" in msg:
        err = msg["error"]
        if not (isinstance(err, dict) and isinstance(err.get("class"), str)
                and isinstance(err.get("desc"), str)):
            raise Finding(f"malformed error reply {msg!r:.300}")
        STATS["errors"] += 1
    else:
        STATS["returns"] += 1
    return msg


async def _run(conn: QmpConnection, data: bytes) -> list[dict[str, Any]]:
    """Feed ``data`` and execute what it completes, in order, as the server does for a
    client (each command awaited inline under a 5 s timeout: a hang is a finding)."""
    out = []
    for item in conn.feed(data):
        if isinstance(item, Reply):
            out.append(_check_reply(item.data))
            continue
        assert isinstance(item, Execute)
        try:
            async with asyncio.timeout(TIMEOUT):
                raw = await TARGET.server.execute(conn, item)
        except TimeoutError:
            raise Finding(f"QMP {item.command} hung for {TIMEOUT} s") from None
        out.append(_check_reply(raw))
        if "return" in out[-1] and item.command not in READ_ONLY:
            TARGET.changed = True
    return out


def _value(r: Reader, depth: int = 0) -> Any:
    kind = r.int(1) % (8 if depth < 3 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return bool(r.int(1) & 1)
    if kind == 2:
        return int.from_bytes(r.take(8), "little", signed=True) >> r.below(64)
    if kind == 3:
        return r.take(r.below(24)).decode("latin-1")
    if kind == 4:
        return NAMES[r.below(len(NAMES))]
    if kind == 5:
        return r.int(8) / 7.0
    if kind == 6:
        return [_value(r, depth + 1) for _ in range(r.below(4))]
    return {_value(r, 3) if r.int(1) & 1 else "smmu": _value(r, depth + 1)
            for _ in range(r.below(4))}


def one_input(data: bytes) -> None:
    """First byte: mode (raw bytes / a structured command) and whether to negotiate."""
    STATS["inputs"] += 1
    r = Reader(data)
    mode = r.int(1)
    chunks = [NEGOTIATE] if mode & 1 else []
    if mode & 2:
        chunks.append(r.rest())
    else:
        while r.left:
            req: dict[str, Any] = {"execute": NAMES[r.below(len(NAMES))]}
            args = _value(r)
            if r.int(1) & 1:
                req["arguments"] = args if r.int(1) & 1 else {"smmu": args}
            if r.int(1) & 1:
                req["id"] = _value(r, 3)
            chunks.append(json.dumps(req).encode())
    LOOP.run_until_complete(_client(chunks))
    if TARGET.changed:
        TARGET.rebuild()
        STATS["rebuilt"] += 1


async def _client(chunks: list[bytes]) -> None:
    """One client connection sending ``chunks``, then the post-conditions: no error
    logged, and a fresh client is still served."""
    conn = TARGET.server.new_connection()
    for chunk in chunks:
        await _run(conn, chunk)
    TRAP.check()
    await _still_serves()


async def _still_serves() -> None:
    conn = TARGET.server.new_connection()
    got = await _run(conn, NEGOTIATE + b'{"execute": "query-viommu-functions", "id": 7}')
    if len(got) != 2 or got[1].get("id") != 7 or "return" not in got[1]:
        raise Finding(f"a fresh client is no longer served: {got!r:.300}")
    STATS["returns"] -= 2


def seeds() -> list[bytes]:
    raw = [b"\x03" + NEGOTIATE + b'{"execute": "query-commands"}',
           b"\x03" + b'{"execute": "query-viommu", "arguments": {"smmu": "viommu"}}',
           b"\x02" + b'{"execute": "query-version", "id": [1, {"a": null}]}',
           b"\x03" + b'{"execute": "viommu-trace", "arguments": {"enable": ["cmd"]}}{"exec']
    structured = [bytes([1, NAMES.index(n) % 256, 7, 1, 1, 0]) for n in NAMES[:8]]
    return raw + structured
