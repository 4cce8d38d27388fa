"""Command layouts (encode/decode) and their dispatch onto the CommandSink."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from viommu_backend.smmuv3.cmdq import RecordingSink, dispatch
from viommu_backend.smmuv3.commands import (COMMANDS, LAYOUTS, OPCODES, IllegalCommand,
                                            decode_command, encode_command)
from viommu_backend.smmuv3.smmu_config import STALL_MODEL_TERMINATE, SmmuConfig


def words(b: bytes) -> tuple[int, int]:
    return int.from_bytes(b[:8], "little"), int.from_bytes(b[8:16], "little")


def test_opcodes_are_architected():
    assert OPCODES["CFGI_STE"] == 0x03 and OPCODES["CFGI_STE_RANGE"] == 0x04
    assert OPCODES["TLBI_NH_VA"] == 0x12 and OPCODES["TLBI_S12_VMALL"] == 0x28
    assert OPCODES["TLBI_S2_IPA"] == 0x2A and OPCODES["TLBI_NSNH_ALL"] == 0x30
    assert OPCODES["ATC_INV"] == 0x40 and OPCODES["PRI_RESP"] == 0x41
    assert OPCODES["RESUME"] == 0x44 and OPCODES["STALL_TERM"] == 0x45
    assert OPCODES["CMD_SYNC"] == 0x46 and len(COMMANDS) == 24


def test_bit_positions_match_linux_encoding():
    w0, w1 = words(encode_command("CMD_SYNC", CS=1, MSH=3, MSIATTR=0xF, MSIDATA=0xDEAD,
                                  MSIADDR=0x4000_1234))
    assert w0 == 0x46 | 1 << 12 | 3 << 22 | 0xF << 24 | 0xDEAD << 32
    assert w1 == 0x4000_1234
    w0, w1 = words(encode_command("TLBI_NH_VA", VMID=7, ASID=0x1234, ADDR=0xABC000,
                                  LEAF=1, TG=1, TTL=3, NUM=2, SCALE=1))
    assert w0 == 0x12 | 2 << 12 | 1 << 20 | 7 << 32 | 0x1234 << 48
    assert w1 == 0xABC000 | 1 | 3 << 8 | 1 << 10
    w0, w1 = words(encode_command("CFGI_CD", SID=0x100, SSID=5, LEAF=1))
    assert w0 == 0x05 | 5 << 12 | 0x100 << 32 and w1 == 1
    w0, w1 = words(encode_command("PRI_RESP", SID=9, SSV=1, SSID=3, GRPID=0x1FF, RESP=2))
    assert w0 == 0x41 | 1 << 11 | 3 << 12 | 9 << 32 and w1 == 0x1FF | 2 << 12
    w0, w1 = words(encode_command("RESUME", SID=4, RESP=1, STAG=0xBEEF))
    assert w0 == 0x44 | 1 << 12 | 4 << 32 and w1 == 0xBEEF
    w0, _ = words(encode_command("CFGI_ALL"))
    w1 = words(encode_command("CFGI_ALL"))[1]
    assert w0 == 0x04 and w1 == 31


@given(st.sampled_from(sorted(LAYOUTS)), st.data())
def test_roundtrip_every_command(name, data):
    lay = LAYOUTS[name]
    fv = {}
    for f in lay.fields:
        if f.name == "OPCODE":
            continue
        if f.name == "SSEC":  # must be 0 on the Non-secure queue
            v = 0
        elif f.address:
            v = data.draw(st.integers(0, (f.mask >> (64 * f.word)) >> f.lo % 64)) << f.lo % 64
        else:
            hi = (1 << f.width) - 1
            if f.name in ("CS", "RESP"):
                hi = 2
            v = data.draw(st.integers(0, hi))
        fv[f.name] = v
    cmd = decode_command(encode_command(name, **fv))
    assert cmd.name == name and cmd.fields == fv


@pytest.mark.parametrize("raw", [
    bytes(16),  # opcode 0
    (0x07).to_bytes(16, "little"),
    (0xFF).to_bytes(16, "little"),
    (0x46 | 3 << 12).to_bytes(16, "little"),  # CMD_SYNC CS=3
    (0x03 | 1 << 10).to_bytes(16, "little"),  # SSec on the NS queue
    b"\x46" * 8,  # short
])
def test_illegal_commands(raw):
    with pytest.raises(IllegalCommand):
        decode_command(raw)


def run(name, cfg=None, sink=None, **fv):
    sink = sink or RecordingSink()
    ok = dispatch(decode_command(encode_command(name, **fv)), sink, cfg or SmmuConfig())
    return sink.calls, ok


def test_dispatch_configuration_commands():
    assert run("CFGI_STE", SID=0x42)[0] == [("stream_table_changed", {"sid": 0x42})]
    assert run("CFGI_ALL")[0] == [("stream_table_changed", {"sid": None})]
    calls, _ = run("CFGI_STE_RANGE", SID=0x13, RANGE=1)  # 4 StreamIDs, aligned
    assert [c[1]["sid"] for c in calls] == [0x10, 0x11, 0x12, 0x13]
    assert run("CFGI_STE_RANGE", SID=0, RANGE=20)[0] == [("stream_table_changed",
                                                          {"sid": None})]
    assert run("CFGI_CD", SID=1, SSID=9)[0] == [("cd_changed", {"sid": 1, "ssid": 9})]
    assert run("CFGI_CD_ALL", SID=1)[0] == [("cd_changed", {"sid": 1, "ssid": None})]


def test_dispatch_invalidations():
    calls, _ = run("TLBI_NH_VA", VMID=1, ASID=2, ADDR=0x10000, TG=1, NUM=3, SCALE=2,
                   LEAF=1, TTL=3)
    assert calls == [("tlbi_nh_va", {"vmid": 1, "asid": 2, "addr": 0x10000,
                                     "size": 4 * 4 * 4096, "leaf": True, "ttl": 3})]
    calls, _ = run("TLBI_NH_VAA", VMID=1, ADDR=0x2000)
    assert calls[0][1]["asid"] is None and calls[0][1]["size"] == 1
    calls, _ = run("TLBI_S2_IPA", VMID=3, ADDR=0x8000_1000, TG=3)  # aligned down
    assert calls == [("tlbi_s2_ipa", {"vmid": 3, "addr": 0x8000_0000, "size": 1 << 16,
                                      "leaf": False, "ttl": 0})]
    assert run("TLBI_NH_ASID", VMID=0, ASID=5)[0] == [("tlbi_nh_asid",
                                                        {"vmid": 0, "asid": 5})]
    assert run("TLBI_S12_VMALL", VMID=9)[0] == [("tlbi_s12_vmall", {"vmid": 9})]
    assert run("TLBI_NSNH_ALL")[0] == [("tlbi_nsnh_all", {})]
    calls, _ = run("ATC_INV", SID=0x100, SSV=1, SSID=4, ADDR=0x12345000, SIZE=2)
    assert calls == [("atc_inv", {"sid": 0x100, "ssid": 4, "addr": 0x12344000,
                                  "size": 0x4000, "global_": False})]


def test_dispatch_fault_responses_and_atc_failure():
    assert run("PRI_RESP", SID=7, GRPID=3, RESP=2)[0] == [
        ("pri_resp", {"sid": 7, "ssid": None, "grpid": 3, "resp": 2})]
    assert run("RESUME", SID=7, STAG=11, RESP=1)[0] == [
        ("resume", {"sid": 7, "stag": 11, "resp": 1})]
    assert run("STALL_TERM", SID=7)[0] == [("stall_term", {"sid": 7})]
    _, ok = run("ATC_INV", sink=RecordingSink(atc_result=False), SID=1)
    assert ok is False


def test_unimplemented_commands_are_illegal():
    with pytest.raises(IllegalCommand):
        run("TLBI_EL2_ALL")  # no IDR0.HYP
    with pytest.raises(IllegalCommand):
        run("TLBI_EL3_ALL")
    with pytest.raises(IllegalCommand):
        run("TLBI_S12_VMALL", cfg=SmmuConfig(s2p=False))
    with pytest.raises(IllegalCommand):
        run("PRI_RESP", cfg=SmmuConfig(pri=False))
    with pytest.raises(IllegalCommand):
        run("RESUME", cfg=SmmuConfig(stall_model=STALL_MODEL_TERMINATE))
    calls, _ = run("TLBI_EL2_ASID", cfg=SmmuConfig(hyp=True), ASID=3)
    assert calls == [("tlbi_el2_asid", {"asid": 3})]
