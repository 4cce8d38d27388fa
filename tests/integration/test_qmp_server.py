"""QMP server over a real UNIX socket, driven by the qemu.qmp client library."""

import asyncio
import json
import os

import pytest
from qemu.qmp import ExecuteError, QMPClient

from viommu_backend.qmp.server import QmpCommandRegistry, QmpError, QmpServer


@pytest.fixture
async def server(tmp_path):
    reg = QmpCommandRegistry()
    reg.register("echo", lambda a: {"value": a.get("value")}, {"*value": "any"})

    async def slow(a):
        await asyncio.sleep(0)
        return {"n": a["n"] + 1}
    reg.register("inc", slow, {"n": "int"})

    def fail(a):
        raise QmpError("no such stream")
    reg.register("fail", fail)
    srv = QmpServer(reg)
    path = str(tmp_path / "qmp.sock")
    await srv.start(path)
    yield srv, path
    await srv.stop()
    assert not os.path.exists(path)


async def test_qemu_qmp_client_execute_and_events(server):
    srv, path = server
    cli = QMPClient("test")
    await cli.connect(path)
    try:
        assert cli.greeting is not None
        assert await cli.execute("echo", {"value": [1, "a"]}) == {"value": [1, "a"]}
        assert await cli.execute("inc", {"n": 41}) == {"n": 42}
        ver = await cli.execute("query-version")
        assert ver["package"] == "viommu-backend"
        names = {c["name"] for c in await cli.execute("query-commands")}
        assert {"qmp_capabilities", "query-commands", "query-version", "echo", "inc"} <= names
        with pytest.raises(ExecuteError) as ei:
            await cli.execute("fail")
        assert ei.value.error_class == "GenericError" and "no such stream" in ei.value.error.error.desc
        with pytest.raises(ExecuteError) as ei:
            await cli.execute("inc", {"n": "x"})
        assert "expected: integer" in ei.value.error.error.desc
        with pytest.raises(ExecuteError) as ei:
            await cli.execute("missing-cmd")
        assert ei.value.error_class == "CommandNotFound"

        with cli.listener() as listener:
            assert srv.emit("VIOMMU_FAULT", {"sid": 5, "event": "F_TRANSLATION"}) == 1
            ev = await asyncio.wait_for(listener.get(), 5)
        assert ev["event"] == "VIOMMU_FAULT"
        assert ev["data"] == {"sid": 5, "event": "F_TRANSLATION"}
        assert set(ev["timestamp"]) == {"seconds", "microseconds"}
    finally:
        await cli.disconnect()


async def test_several_clients_and_raw_socket(server):
    srv, path = server
    a, b = QMPClient("a"), QMPClient("b")
    await a.connect(path)
    await b.connect(path)
    # A raw client that never negotiates gets no events and is refused commands.
    reader, writer = await asyncio.open_unix_connection(path)
    greeting = json.loads(await reader.readline())
    assert "QMP" in greeting
    writer.write(b'{"execute": "echo", "id": 1}\n')
    reply = json.loads(await reader.readline())
    assert reply["error"]["class"] == "CommandNotFound" and reply["id"] == 1
    # garbage then a valid negotiation on the same connection
    writer.write(b'\xff{"execute": "qmp_capabilities", "id": 2}')
    assert "JSON parse error" in json.loads(await reader.readline())["error"]["desc"]
    assert json.loads(await reader.readline()) == {"return": {}, "id": 2}
    try:
        assert srv.clients == 3
        with a.listener() as la, b.listener() as lb:
            assert srv.emit("VIOMMU_X", {"k": 1}) == 3
            ea = await asyncio.wait_for(la.get(), 5)
            eb = await asyncio.wait_for(lb.get(), 5)
        raw_ev = json.loads(await asyncio.wait_for(reader.readline(), 5))
        assert ea["event"] == eb["event"] == raw_ev["event"] == "VIOMMU_X"
        r1, r2 = await asyncio.gather(a.execute("inc", {"n": 1}), b.execute("inc", {"n": 10}))
        assert (r1, r2) == ({"n": 2}, {"n": 11})
    finally:
        writer.close()
        await a.disconnect()
        await b.disconnect()
    for _ in range(100):
        if srv.clients == 0:
            break
        await asyncio.sleep(0.01)
    assert srv.clients == 0
