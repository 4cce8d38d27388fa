"""Adversarial (property-based) tests of the QMP side: random bytes, random JSON values and
wrong-typed arguments to the sans-IO QmpConnection and to the dispatch of every
registered viommu command (a real Backend: SMMUv3 + DomainManager + fault injector).
Always a reply or an error object of class GenericError / CommandNotFound, never an
exception; the connection still answers a valid command afterwards."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.pci_ctx import TestContext
from viommu_backend.app import Backend
from viommu_backend.config import loads_config
from viommu_backend.qmp.protocol import MAX_NESTING, Execute, QmpConnection, Reply
from viommu_backend.qmp.server import QmpServer

from tests.support.topologies import SMMU_TESTDEV as CONFIG

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])
CLASSES = {"GenericError", "CommandNotFound"}
# an error description that is a Python exception leaking through a handler (the
# registry turns uncaught handler exceptions into "<cmd>: <ExcType>: ...")
LEAK = re.compile(r": (TypeError|KeyError|ValueError|AttributeError|IndexError|"
                  r"OverflowError|RecursionError|AssertionError|ZeroDivisionError|"
                  r"UnboundLocalError|NameError|RuntimeError|\w+Error): ")



def _messages(items: list) -> list[dict]:
    out = []
    for it in items:
        assert isinstance(it, (Reply, Execute)), it
        if isinstance(it, Reply):
            assert it.data.endswith(b"\r\n")
            msg = json.loads(it.data)
            assert set(msg) <= {"return", "error", "id"}
            if "error" in msg:
                assert msg["error"]["class"] in CLASSES and msg["error"]["desc"]
            out.append(msg)
    return out


def _negotiated() -> QmpConnection:
    c = QmpConnection()
    assert _messages(c.feed(b'{"execute": "qmp_capabilities"}')) == [{"return": {}}]
    return c


def _still_answers(c: QmpConnection) -> None:
    # a lexical error (a control byte: invalid inside and outside strings) resynchronises the scanner whatever state garbage left it in
    items = c.feed(b'\x01{"execute": "query-viommu", "id": "probe"}')
    ex = [i for i in items if isinstance(i, Execute)]
    assert ex and ex[-1].command == "query-viommu" and ex[-1].id == "probe"


@SETTINGS
@given(data=st.binary(max_size=400), negotiate=st.booleans(),
       cuts=st.lists(st.integers(0, 400), max_size=5))
def test_random_bytes(data, negotiate, cuts):
    c = _negotiated() if negotiate else QmpConnection()
    bounds = sorted({x % (len(data) + 1) for x in cuts} | {0, len(data)})
    items = []
    for a, b in zip(bounds, bounds[1:]):
        items += c.feed(data[a:b])
    _messages(items)
    if not c.negotiated:
        c.feed(b'\x01{"execute": "qmp_capabilities"}')
    _still_answers(c)


JSON = st.recursive(
    # JSON has no NaN or Infinity (json.dumps would write them, and QMP rightly refuses them)
    st.none() | st.booleans() | st.integers(-2**70, 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                              max_size=4),
    max_leaves=20)


@SETTINGS
@given(values=st.lists(JSON, min_size=1, max_size=4), sep=st.sampled_from([b"", b"\n", b" "]))
def test_random_json_values(values, sep):
    c = _negotiated()
    msgs = _messages(c.feed(sep.join(json.dumps(v).encode() for v in values) + b"\n"))
    assert all("error" in m for m in msgs)  # none of these is a valid request
    _still_answers(c)


def test_nesting_at_the_limit_is_an_error_not_an_exception():
    """Found by this suite: a request nested ~1000 deep (under QEMU's 1024) made
    json.loads raise RecursionError out of feed()."""
    c = _negotiated()
    for depth in (MAX_NESTING - 1, 999, 1000, 1023, 1025):
        req = b'{"execute": "x", "id": ' + b"[" * depth + b"]" * depth + b"}"
        msgs = _messages(c.feed(req))
        execs = [i for i in c.feed(b'{"execute": "ok"}') if isinstance(i, Execute)]
        assert execs and execs[0].command == "ok"
        assert msgs or depth < MAX_NESTING


# -- registry dispatch of every viommu command ---------------------------------------------------
@pytest.fixture(scope="module")
def backend(tmp_path_factory) -> Backend:
    be = Backend(loads_config(CONFIG), Path(tmp_path_factory.mktemp("s")))
    for fn in be.functions.values():  # guest RAM (memfd) as a connected client maps it
        fn.connected(TestContext())
    return be


@pytest.fixture(scope="module")
def server(backend) -> QmpServer:
    return QmpServer(backend.qmp_registry())


ARG_VALUES = st.one_of(JSON, st.integers(-1, 2**64 + 1), st.sampled_from(
    ["F_TRANSLATION", "C_BAD_STE", "EVTQ_ABT_ERR", "CMDQ_ERR", "ILL", "hold", "delay",
     "normal", "dma0", "viommu", "00ff", "zz", "IN", "TT", "CD", ""]))
ARG_NAMES = st.sampled_from(["sid", "ssid", "iova", "write", "type", "size", "once",
                             "write-only", "id", "error", "cerror", "mode", "count",
                             "delay-ms", "device", "data", "stall", "stag", "class", "s2",
                             "ipa", "fetch-addr", "bogus"])


@SETTINGS
@given(data=st.data())
def test_every_command_with_random_arguments(server, data):
    names = server.registry.names()
    name = data.draw(st.sampled_from(names))
    cmd = server.registry.get(name)
    # mostly the right names (so type checks and handlers run), random values
    keys = [a.name for a in cmd.args] if cmd else []
    args = data.draw(st.dictionaries(st.sampled_from(keys) if keys else ARG_NAMES, ARG_VALUES,
                                     max_size=len(keys) or 2))
    if data.draw(st.booleans()):
        args.update(data.draw(st.dictionaries(ARG_NAMES, ARG_VALUES, max_size=2)))
    conn = _negotiated()
    req = json.dumps({"execute": name, "arguments": args, "id": 7}).encode()
    items = conn.feed(req)
    replies = _messages(items)
    execs = [i for i in items if isinstance(i, Execute)]
    if execs:
        out = asyncio.run(server.execute(conn, execs[0]))
        replies = _messages([Reply(out)])
    msg = replies[-1]
    assert msg.get("id") == 7
    if "error" in msg:
        assert not LEAK.search(msg["error"]["desc"]), (name, args, msg)
    # the connection and the registry still serve a valid command
    _still_answers(conn)
    ok = asyncio.run(server.execute(conn, Execute("query-viommu", {}, 1, True)))
    assert "return" in json.loads(ok)
    # leave no injected state behind for the next example
    inj = server.registry.get("viommu-clear-fault")
    if inj is not None:
        asyncio.run(server.registry.dispatch("viommu-clear-fault", {}))
        asyncio.run(server.registry.dispatch("viommu-inject-sync", {"mode": "normal"}))
