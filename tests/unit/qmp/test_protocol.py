"""Sans-IO QMP core: greeting, negotiation, framing, errors, events."""

import json

import pytest

from viommu_backend.qmp.protocol import Execute, QmpConnection, Reply, make_event
from viommu_backend.qmp.server import QmpCommandRegistry, QmpError


def msgs(items):
    return [json.loads(i.data) if isinstance(i, Reply) else i for i in items]


def negotiated() -> QmpConnection:
    c = QmpConnection()
    out = msgs(c.feed(b'{"execute": "qmp_capabilities"}\n'))
    assert out == [{"return": {}}]
    return c


def test_greeting_shape():
    g = json.loads(QmpConnection().greeting())
    assert set(g["QMP"]["version"]["qemu"]) == {"major", "minor", "micro"}
    assert isinstance(g["QMP"]["version"]["package"], str)
    assert g["QMP"]["capabilities"] == []


def test_commands_refused_before_negotiation():
    c = QmpConnection()
    [r] = msgs(c.feed(b'{"execute": "query-version", "id": 7}\n'))
    assert r["error"]["class"] == "CommandNotFound"
    assert r["id"] == 7
    assert c.event("X", {}) is None  # no events before negotiation
    negotiated_conn = negotiated()
    assert negotiated_conn.negotiated


def test_capabilities_twice_and_bad_capability():
    c = QmpConnection()
    [r] = msgs(c.feed(b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}\n'))
    assert r["error"]["class"] == "GenericError" and not c.negotiated
    [r] = msgs(c.feed(b'{"execute": "qmp_capabilities", "arguments": {"enable": []}, "id": "a"}\n'))
    assert r == {"return": {}, "id": "a"}
    [r] = msgs(c.feed(b'{"execute": "qmp_capabilities"}\n'))
    assert r["error"]["class"] == "CommandNotFound"


def test_execute_passes_id_and_arguments():
    c = negotiated()
    [e] = c.feed(b'{"execute": "viommu-translate", "arguments": {"sid": 1}, "id": {"x": [1]}}\n')
    assert isinstance(e, Execute)
    assert e.command == "viommu-translate" and e.arguments == {"sid": 1}
    assert json.loads(c.reply(e, {"pa": 4096})) == {"return": {"pa": 4096}, "id": {"x": [1]}}
    err = json.loads(c.error(e, "nope"))
    assert err == {"error": {"class": "GenericError", "desc": "nope"}, "id": {"x": [1]}}
    [e2] = c.feed(b'{"execute": "x"}\n')
    assert "id" not in json.loads(c.reply(e2, {}))


def test_partial_reads_and_several_per_chunk():
    c = negotiated()
    data = b'{"execute": "a", "id": 1}\r\n{"execute": "b", "id": 2}\n'
    got = []
    for i in range(len(data)):
        got += c.feed(data[i:i + 1])
    assert [g.command for g in got] == ["a", "b"]
    assert [g.id for g in got] == [1, 2]
    assert [g.command for g in c.feed(data)] == ["a", "b"]


@pytest.mark.parametrize("line, needle", [
    (b'{"execute": }', "JSON parse error"),
    (b'{"execute": \xff', "invalid byte 0xff"),
    (b'{"execute": "a\x01"}', "control character"),
    (b'}', "unexpected '}'"),
    (b'42', "must be a JSON object"),
    (b'"str"', "must be a JSON object"),
    (b'nul', "invalid token"),
    (b'[1, 2]', "must be a JSON object"),
    (b'{"arguments": {}}', "lacks member 'execute'"),
    (b'{"execute": 5}', "must be a string"),
    (b'{"execute": "a", "arguments": [1]}', "'arguments' must be an object"),
    (b'{"execute": "a", "bogus": 1}', "'bogus' is unexpected"),
    (b'{"execute": "\xff\xfe"}', "JSON parse error"),
])
def test_malformed_input_gets_error_and_connection_keeps_working(line, needle):
    c = negotiated()
    out = msgs(c.feed(line + b"\n"))
    # the first reply names the problem; trailing garbage may add more errors, never requests
    assert needle in out[0]["error"]["desc"]
    assert all(r["error"]["class"] == "GenericError" for r in out)
    [e] = c.feed(b'{"execute": "after"}\n')
    assert e.command == "after"


def test_blank_lines_ignored():
    c = negotiated()
    assert c.feed(b"\n\r\n   \n") == []


def test_objects_without_newlines_and_nested_strings():
    c = negotiated()
    data = b'{"execute":"a","arguments":{"s":"}{[\\"]"},"id":1}{"execute":"b"}  {"execute":"c"}'
    got = c.feed(data)
    assert [g.command for g in got] == ["a", "b", "c"]
    assert got[0].arguments == {"s": '}{["]'}


def test_oversize_object_refused_once_then_recovers():
    c = QmpConnection(max_line=64)
    c.feed(b'{"execute": "qmp_capabilities"}')
    assert c.feed(b'{"execute": "' + b"x" * 40) == []
    out = msgs(c.feed(b"y" * 50))
    assert len(out) == 1 and "exceeds" in out[0]["error"]["desc"]
    assert c.feed(b"z" * 500 + b"{}[]") == []  # still the same object: no second error
    [e] = c.feed(b'zzz"}{"execute": "ok"}')
    assert e.command == "ok"
    out = msgs(c.feed(b'{"execute": "' + b"a" * 100 + b'"}\n{"execute": "ok2"}\n'))
    assert "exceeds" in out[0]["error"]["desc"] and out[1].command == "ok2"


@pytest.mark.parametrize("max_line", [16, 40, 1 << 20])
def test_runs_scanned_at_once_as_byte_by_byte(max_line):
    """feed() takes runs of string / number / whitespace bytes at once: the replies and
    requests are those of feeding the same stream one byte at a time."""
    stream = (b'{"execute": "qmp_capabilities"}{"execute":"a","arguments":{"s":"x\\\"y}{",'
              b' "n": [-1.5e3, true, null]}, "id": "k\xc3\xa9"}  \r\n{"execute": "b\x01"}'
              b' 42 "top" nul {"execute": "c" \xff {"execute": "' + b"w" * 50 + b'"}'
              b'[ 1,\t2 ]{"execute":"d",   "id":7}')

    def fed(chunks: list[bytes], bytewise: bool) -> list[list]:
        c = QmpConnection(max_line=max_line)
        parts = [[chunk[i:i + 1] for i in range(len(chunk))] if bytewise else [chunk]
                 for chunk in chunks]
        return [[i.data if isinstance(i, Reply) else (i.command, i.arguments, i.id)
                 for part in chunk for i in c.feed(part)] for chunk in parts]
    long = stream.index(b"w" * 50)
    for cuts in ((), (37, 90), (20, 61, 150), (long + 20, long + 50), (long + 53,)):
        chunks = [stream[a:b] for a, b in zip((0, *cuts), (*cuts, len(stream)))]
        assert fed(chunks, bytewise=False) == fed(chunks, bytewise=True), cuts
    whole = fed([stream], bytewise=False)[0]
    assert len(whole) > 8


def test_deep_nesting_refused():
    c = negotiated()
    out = msgs(c.feed(b"[" * 2000 + b"]" * 2000 + b'{"execute": "ok"}'))
    assert "nesting" in out[0]["error"]["desc"] and out[1].command == "ok"


def test_event_format():
    c = QmpConnection(clock=lambda: 1700000000.25)
    c.feed(b'{"execute": "qmp_capabilities"}\n')
    ev = json.loads(c.event("VIOMMU_EVENT", {"sid": 3}))
    assert ev == {"event": "VIOMMU_EVENT", "data": {"sid": 3},
                  "timestamp": {"seconds": 1700000000, "microseconds": 250000}}
    assert make_event("E", None, 5.9999999)["timestamp"] == {"seconds": 6, "microseconds": 0}


async def test_registry_schema_checks():
    reg = QmpCommandRegistry()
    reg.register("t", lambda a: {"got": a}, {"sid": "int", "*write": bool, "*name": "str"})

    async def ahandler(a):
        return [a["n"] * 2]
    reg.register("a", ahandler, {"n": int})
    assert await reg.dispatch("t", {"sid": 1}) == {"got": {"sid": 1}}
    assert await reg.dispatch("a", {"n": 4}) == [8]
    for args, needle in [({}, "'sid' is missing"), ({"sid": "1"}, "expected: integer"),
                         ({"sid": True}, "expected: integer"), ({"sid": 1, "x": 2}, "'x' is unexpected"),
                         ({"sid": 1, "write": 1}, "expected: boolean")]:
        with pytest.raises(QmpError, match=needle) as ei:
            await reg.dispatch("t", args)
        assert ei.value.cls == "GenericError"
    with pytest.raises(QmpError) as ei:
        await reg.dispatch("nope", {})
    assert ei.value.cls == "CommandNotFound"
    with pytest.raises(ValueError):
        reg.register("t", lambda a: {})


async def test_registry_handler_exception_becomes_generic_error():
    reg = QmpCommandRegistry()

    def boom(a):
        raise KeyError("zz")
    reg.register("boom", boom)
    with pytest.raises(QmpError, match="KeyError") as ei:
        await reg.dispatch("boom", {})
    assert ei.value.cls == "GenericError"
