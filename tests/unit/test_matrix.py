"""The matrix runner without boots: expansion, overrides into Config, validation errors,
excludes, --only filters, result table / JSON / JUnit from synthetic summaries, and the
run loop with a boot function that returns canned summaries."""

from __future__ import annotations

import asyncio
import json
import tomllib
from xml.etree import ElementTree as ET

import pytest

from viommu_backend.cli import main as cli_main
from viommu_backend.config import default_config_text, loads_config
from viommu_backend.matrix import (
    MatrixError, apply_override, dumps_toml, expand, format_table, junit_xml, load_matrix,
    loads_matrix, parse_only, result_from_summary, results_json, run_matrix, write_results,
)

from tests.support.run_data import TWO_AXES, summary
from tests.support import REPO



def test_expands_the_cartesian_product_in_order():
    m = loads_matrix(TWO_AXES)
    runs = expand(m)
    assert [r.name for r in runs] == [
        "smmu=s1+s2,dma=strict", "smmu=s1+s2,dma=lazy", "smmu=s2-only,dma=strict",
        "smmu=s2-only,dma=lazy", "smmu=linear,dma=strict", "smmu=linear,dma=lazy"]
    assert [r.index for r in runs] == [1, 2, 3, 4, 5, 6]
    assert m.timeout == 50 and m.name == "t" and m.base_source == "<default>"


def test_overrides_land_in_the_config():
    runs = {r.name: r for r in expand(loads_matrix(TWO_AXES))}
    base = runs["smmu=s1+s2,dma=strict"].config
    assert base.guest.cmdline == "viommu.blk_bytes=1048576"
    assert "s1p" not in base.function("viommu").options
    # everything else is the embedded default
    default = loads_config(default_config_text())
    assert base.functions[1] == default.functions[1] and base.root_ports == default.root_ports
    assert base.guest.workload == default.guest.workload

    s2 = runs["smmu=s2-only,dma=lazy"].config
    assert s2.function("viommu").options == {"s1p": False}
    assert s2.function("viommu").bar0_size == 128 << 10
    assert s2.guest.cmdline == "viommu.blk_bytes=1048576 iommu.strict=0"  # appended
    assert runs["smmu=linear,dma=strict"].config.function("viommu").options == {"two_level_strtab": False}
    # the TOML handed to the server is the overridden one
    assert tomllib.loads(s2.text)["function"][0]["options"] == {"s1p": False}
    assert runs["smmu=s2-only,dma=lazy"].expect == {"domain_type": "DMA-FQ"}


def test_kernel_suite_and_nested_option_tables():
    m = loads_matrix("""
[[axis]]
name = "kernel"
values = [ { name = "sid", set = { "kernel.suite" = "sid", "guest.modules+" = ["loop"] } } ]
""")
    [run] = expand(m)
    assert run.config.kernel.suite == "sid"
    assert run.config.guest.modules == ("virtio_blk", "loop")
    assert run.config.function("blk0").options == {"size": "64M", "msix": False}


def test_apply_override_addresses_named_arrays_and_creates_tables():
    doc = tomllib.loads(default_config_text())
    apply_override(doc, "function.blk0.options.size", "32M")
    apply_override(doc, "root_port.rp0.chassis", 7)
    apply_override(doc, "machine.extra_args+", ["-s"])
    apply_override(doc, "machine.extra_args+", "-S")
    assert doc["function"][1]["options"]["size"] == "32M"
    assert doc["root_port"][0]["chassis"] == 7
    assert doc["machine"]["extra_args"] == ["-s", "-S"]
    with pytest.raises(MatrixError, match="no \\[\\[function\\]\\] named 'nope'.*have: viommu, blk0"):
        apply_override(doc, "function.nope.options.s1p", False)
    with pytest.raises(MatrixError, match="names a whole"):
        apply_override(doc, "function.viommu", {})
    with pytest.raises(MatrixError, match="is a value, not a table"):
        apply_override(doc, "guest.workload.x", 1)
    with pytest.raises(MatrixError, match="append"):
        apply_override(doc, "machine.cpus+", 1)


def test_dumps_toml_round_trips_the_default_and_odd_values():
    doc = tomllib.loads(default_config_text())
    assert tomllib.loads(dumps_toml(doc)) == doc
    odd = {"a": {"b c": 'quote " and \\ and \n', "f": 1.5, "l": [1, "x", True], "t": {"u": {"v": 2}}},
           "aot": [{"name": "x", "options": {"k": [1, 2]}}, {"name": "y"}]}
    assert tomllib.loads(dumps_toml(odd)) == odd


@pytest.mark.parametrize("text, match", [
    ('[[axis]]\nname = "smmu"\nvalues = [ { name = "x", set = { "function.viommu.options.stall_model" = 7 } } ]',
     "axis 'smmu' = 'x'.*stall_model must be 0, 1 or 2"),
    ('[[axis]]\nname = "smmu"\nvalues = [ { name = "x", set = { "function.viommu.options.bogus" = 1 } } ]',
     "axis 'smmu' = 'x'.*unknown SMMU config keys: \\['bogus'\\]"),
    ('[[axis]]\nname = "k"\nvalues = [ { name = "old", set = { "kernel.suite" = "buster" } } ]',
     "axis 'k' = 'old'.*suite: must be one of trixie, sid"),
    ('[[axis]]\nname = "g"\nvalues = [ { name = "typo", set = { "guest.cmdlin" = "x" } } ]',
     "axis 'g' = 'typo'.*unknown key\\(s\\) cmdlin"),
    ('[[axis]]\nname = "f"\nvalues = [ { name = "v", set = { "function.gpu.options.x" = 1 } } ]',
     "axis 'f' value 'v'.*no \\[\\[function\\]\\] named 'gpu'"),
    ('[[axis]]\nname = "a"\nvalues = []', "axis 'a': 'values' must be a non-empty list"),
    ('[[axis]]\nname = "a"\nvalues = [ { name = "v" }, { name = "v" } ]', "value 'v': defined twice"),
    ('[[axis]]\nname = "a"\nvalues = [ { name = "v", sett = {} } ]', "unknown key\\(s\\) sett"),
    ('[[axis]]\nname = "a"\nvalues = [ { name = "v", expect = { domain = "DMA" } } ]', "unknown key\\(s\\) domain"),
    ('[[axis]]\nname = "a"\nvalues = [ { name = "v", expect = { kmsg = "(" } } ]', "bad regex"),
    ('[matrix]\ntimeout = -1', "timeout: expected a positive"),
    ('[matrix]\nbase = "/nonexistent/x.toml"', "cannot read /nonexistent/x.toml"),
    ('[matrix]\nexclude = [ { a = "w" } ]\n[[axis]]\nname = "a"\nvalues = [ { name = "v" } ]',
     "exclude #1: axis 'a' has no value 'w'"),
    ('exclude = [ { b = "v" } ]\n[[axis]]\nname = "a"\nvalues = [ { name = "v" } ]', "exclude #1: no axis 'b'"),
    ('[[axis]]\nname = "a"\nvalues = [ { name = "v" } ]\nexclude = [ { a = "v" } ]', "'exclude' belongs in \\[matrix\\]"),
    ('[matrix]\nexclude = [ {} ]', "exclude #1 is empty"),
    ("[[axis]]\nname = 'a'\nvalues = [ { name = 'v' } ]\n[[axis]]\nname = 'a'\nvalues = [ { name = 'v' } ]",
     "axis 'a': defined twice"),
    ('[matrix\n', "invalid TOML"),
])
def test_validation_errors_name_the_axis_and_value(text, match):
    with pytest.raises(MatrixError, match=match):
        expand(loads_matrix(text))


def test_smmu_function_keys_are_not_smmu_options(tmp_path):
    """A matrix over the hidden-stage-2 config: its function's host_s2 / host_pa are the
    function's, not SMMU options (the check is config.smmu_config's, as the server's)."""
    m = tmp_path / "m.toml"
    m.write_text(f'[matrix]\nbase = "{REPO / "qemu_configs" / "host-s2.toml"}"\n'
                 '[[axis]]\nname = "a"\nvalues = [ { name = "x", set = { "function.viommu.options.oas_bits" = 52 } } ]\n')
    [run] = expand(load_matrix(m))
    assert run.config.function("viommu").options["host_s2"] is True


def test_two_axes_setting_the_same_key_is_an_error_unless_appending():
    text = """
[[axis]]
name = "a"
values = [ { name = "x", set = { "guest.cmdline" = "iommu.strict=0" } } ]
[[axis]]
name = "b"
values = [ { name = "y", set = { "guest.cmdline" = "iommu.passthrough=1" } } ]
"""
    with pytest.raises(MatrixError, match="axis 'b' value 'y' and axis 'a' value 'x' both set 'guest.cmdline'"):
        expand(loads_matrix(text))
    [run] = expand(loads_matrix(text.replace('"guest.cmdline"', '"guest.cmdline+"')))
    assert run.config.guest.cmdline == "iommu.strict=0 iommu.passthrough=1"


def test_excludes_and_only_filters():
    m = loads_matrix(TWO_AXES.replace('name = "t"\n', 'name = "t"\nexclude = [ { smmu = "linear", dma = "lazy" }, '
                                      '{ smmu = "s2-only" } ]\n'))
    assert [r.name for r in expand(m)] == ["smmu=s1+s2,dma=strict", "smmu=s1+s2,dma=lazy", "smmu=linear,dma=strict"]
    only = parse_only(["dma=lazy"], m)
    assert [r.name for r in expand(m, only)] == ["smmu=s1+s2,dma=lazy"]
    m2 = loads_matrix(TWO_AXES)
    only = parse_only(["smmu=linear,s2-only", "dma=strict"], m2)
    assert [r.name for r in expand(m2, only)] == ["smmu=s2-only,dma=strict", "smmu=linear,dma=strict"]
    with pytest.raises(MatrixError, match="no axis 'kernel'"):
        parse_only(["kernel=sid"], m2)
    with pytest.raises(MatrixError, match="axis 'dma' has no value 'lax'"):
        parse_only(["dma=lax"], m2)
    with pytest.raises(MatrixError, match="expected AXIS=VALUE"):
        parse_only(["dma"], m2)


def test_base_from_a_file_and_inline(tmp_path):
    base = tmp_path / "base.toml"
    base.write_text(default_config_text().replace('memory = "1G"', 'memory = "512M"')
                    .replace('suite = "trixie"', 'suite = "trixie"\nimage = "k/Image"'))
    (tmp_path / "m.toml").write_text('[matrix]\nbase = "base.toml"\n')
    m = load_matrix(tmp_path / "m.toml")
    [run] = expand(m)
    assert m.name == "m" and m.base_source == str(base)
    assert run.config.machine.memory == 512 << 20
    assert run.config.kernel.image == (tmp_path / "k" / "Image").resolve()  # relative to the base file
    inline = loads_matrix('[base]\n[base.machine]\ncpus = 1\n[[base.function]]\nname = "viommu"\n'
                          'kind = "smmuv3"\nslot = 1\n')
    [run] = expand(inline)
    assert run.config.machine.cpus == 1 and [f.name for f in run.config.functions] == ["viommu"]


def test_shipped_matrices_expand():
    smoke = load_matrix(REPO / "qemu_configs" / "matrix-smoke.toml")
    full = load_matrix(REPO / "qemu_configs" / "matrix-full.toml")
    assert len(expand(smoke)) == 6
    runs = expand(full)
    assert len(runs) == 108
    assert {r.config.kernel.suite for r in runs if not r.config.kernel.built} == {"trixie", "sid"}
    built = [r for r in runs if r.config.kernel.built]
    assert {r.config.kernel.build for r in built} == {"6.12", "7.3"} and len(built) == 54
    assert all(r.config.guest.modules == () for r in built)
    ats = [r for r in runs if r.config.iommu.ats]
    assert len(ats) == 12 and all(r.config.function("blk0").options["ats"] for r in ats)
    opts = [r.config.function("viommu").options for r in runs]
    assert {"s1p": False} in opts and {"stall_model": 2} in opts and {"ssidsize": 0} in opts


def test_shipped_iommufd_matrix_expands():
    runs = expand(load_matrix(REPO / "qemu_configs" / "matrix-iommufd.toml"))
    assert len(runs) == 14 and all(r.config.guest.workload == "enumerate,smmu,iommufd" for r in runs)
    k73 = [r for r in runs if r.config.kernel.build == "7.3"]
    assert len(k73) == 7 and all(r.config.machine.cpu == "neoverse-n1" for r in k73)
    assert all(r.config.kernel.fragments[-1].name == "iommufd.config" for r in k73)  # vIOMMU support
    assert [r.choice["kernel"] for r in runs if r.config.function("viommu").options.get("fwb")] == ["6.12", "7.3"]
    both = next(r for r in k73 if r.choice["smmu"] == "cohacc0")  # the appended kmsg lists add up
    assert len(both.config.guest.expect_kmsg) == 6
    nc = [r for r in runs if not r.config.iommu.dma_coherent]
    assert len(nc) == 2 and all("viommu.iommufd_checks=coherency" in r.config.guest.cmdline for r in nc)


# --------------------------------------------------------------------------- results


def test_result_from_summary_extracts_counters_rates_and_driver_facts():
    r = result_from_summary(3, "smmu=s1+s2", {"smmu": "s1+s2"}, summary(), {"domain_type": "DMA"})
    assert r.ok and r.status == "PASS" and r.reason == "" and r.duration == 12.5
    c = r.counters
    assert (c["translations"], c["walks"], c["tlb_hit_rate"], c["commands"], c["events"], c["gerrors"]) == \
        (100, 25, 0.75, 40, 2, 0)
    assert c["bytes"] == 11 and c["msi_writes"] == 10 and c["cmdq_cons_reads"] == 7
    assert r.blk["4096"]["write_mbps"] == pytest.approx(1.048576) and r.blk["4096"]["read_mbps"] == pytest.approx(2.097152)
    assert r.blk["1048576"]["mbps"] == pytest.approx(2 * 1.048576 / 0.2)
    assert r.driver["features"] == "0x00088fe7" and r.domain_type == "DMA"
    assert r.kernel == "6.12.107+deb13-cloud-arm64"


def test_unmet_expectations_fail_a_booted_run():
    r = result_from_summary(1, "x", {}, summary(domain="DMA"), {"domain_type": "DMA-FQ"})
    assert not r.ok and r.reason == "expected domain type DMA-FQ, got DMA"
    r = result_from_summary(1, "x", {}, summary(), {"kmsg": [r"features 0x0+88fe7", r"option mask"]})
    assert not r.ok and r.reason == "no kernel message matching 'option mask'"
    r = result_from_summary(1, "x", {}, summary(), {"kernel": r"^(?!6\.12\.)"})
    assert not r.ok and "expected kernel matching" in r.reason
    r = result_from_summary(1, "x", {}, summary(kernel="7.2.13+deb14-cloud-arm64"), {"kernel": r"^(?!6\.12\.)"})
    assert r.ok
    failed = result_from_summary(2, "y", {}, summary(ok=False, error="guest printed 'done'\nmore"), {"domain_type": "DMA"})
    assert not failed.ok and failed.reason == "guest printed 'done'" and failed.error.endswith("more")


def results_pair():
    m = loads_matrix(TWO_AXES)
    a = result_from_summary(1, "smmu=s1+s2,dma=strict", {"smmu": "s1+s2", "dma": "strict"}, summary())
    b = result_from_summary(2, "smmu=s1+s2,dma=lazy", {"smmu": "s1+s2", "dma": "lazy"},
                            summary(ok=False, error="QEMU exited with 1: <boom> & more"))
    return m, [a, b]


def test_table_json_and_junit():
    m, results = results_pair()
    table = format_table(results, ["smmu", "dma"]).splitlines()
    assert table[0].split() == ["#", "smmu", "dma", "result", "domain", "xlat", "walks", "TLB", "cmds", "syncs",
                                "evts", "gerr", "MB/s", "4K", "MB/s", "1M", "time", "reason"]
    assert table[2].split()[:12] == ["1", "s1+s2", "strict", "PASS", "DMA", "100", "25", "75.0%", "40", "10", "2", "0"]
    assert table[2].split()[12:14] == ["1.4", "10.5"]
    assert table[3].split()[:4] == ["2", "s1+s2", "lazy", "FAIL"] and table[3].endswith("QEMU exited with 1: <boom> & more")
    assert table[-1] == "1/2 passed, 1 FAILED"

    j = results_json(m, results)
    assert (j["passed"], j["failed"]) == (1, 1) and j["axes"]["dma"] == ["strict", "lazy"]
    assert [r["status"] for r in j["runs"]] == ["PASS", "FAIL"]
    json.dumps(j)  # serialisable

    suite = ET.fromstring(junit_xml(m, results))
    assert suite.tag == "testsuite" and suite.get("tests") == "2" and suite.get("failures") == "1"
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["smmu=s1+s2,dma=strict", "smmu=s1+s2,dma=lazy"]
    assert cases[0].find("failure") is None
    assert cases[1].find("failure").get("message") == "QEMU exited with 1: <boom> & more"


def test_write_results(tmp_path):
    m, results = results_pair()
    j, x = write_results(m, results, tmp_path / "out")
    assert json.loads(j.read_text())["runs"][1]["reason"].startswith("QEMU exited")
    assert ET.parse(x).getroot().get("failures") == "1"


def test_run_loop_with_canned_boots(tmp_path):
    """run_matrix calls the boot function once per run, in order, with each run's config;
    a boot that overruns the timeout is a FAIL with a reason, and the loop goes on."""
    m = loads_matrix(TWO_AXES.replace("timeout = 50", "timeout = 0.2"))
    runs = expand(m, parse_only(["smmu=s1+s2,s2-only"], m))
    seen = []

    async def boot(config, *, progress, workdir):
        seen.append((config.function("viommu").options, config.guest.cmdline, workdir))
        progress("[boot] fake")
        if len(seen) == 3:
            await asyncio.sleep(5)
        return summary(domain="DMA-FQ" if "strict=0" in config.guest.cmdline else "DMA")

    lines: list[str] = []
    results = asyncio.run(run_matrix(m, runs, progress=lines.append, output=tmp_path, boot=boot, setup=False))
    assert [o for o, _, _ in seen] == [{}, {}, {"s1p": False}, {"s1p": False}]
    assert seen[0][2] == tmp_path / "runs" / "01-s1_s2-strict"
    assert (tmp_path / "runs" / "01-s1_s2-strict" / "boot.log").read_text() == "[boot] fake\n"
    assert [r.status for r in results] == ["PASS", "PASS", "FAIL", "PASS"]
    assert results[2].reason == "timeout: no result after 0 s" or results[2].reason.startswith("timeout")
    assert "[3/4] smmu=s2-only,dma=strict: FAIL" in "\n".join(lines)


def test_cli_list_and_bad_matrix(tmp_path, capsys):
    assert cli_main(["matrix", str(REPO / "qemu_configs" / "matrix-smoke.toml"), "--list",
                     "--only", "dma=lazy"]) == 0
    out = capsys.readouterr().out
    assert "matrix smoke: 3 run(s)" in out and "[3] smmu=poll,dma=lazy" in out
    bad = tmp_path / "bad.toml"
    bad.write_text('[[axis]]\nname = "s"\nvalues = [ { name = "v", set = { "function.viommu.options.sidsize" = 99 } } ]\n')
    assert cli_main(["matrix", str(bad), "--list"]) == 2
    assert "axis 's' = 'v'" in capsys.readouterr().err


def test_guest_checks_become_a_per_check_table():
    from viommu_backend.guest.boot import BootSummary
    from viommu_backend.guest.qemu import parse_marker

    def booted(*lines: str) -> BootSummary:
        s = BootSummary(ok=True, timings={"total": 3.0})
        s.markers = [m for m in (parse_marker(line) for line in lines) if m is not None]
        return s

    a = result_from_summary(1, "k=6.12", {"k": "6.12"}, booted(
        'VIOMMU-MARK: iommufd-ioas {"ok":true,"steps":[{"op":"IOMMU_IOAS_ALLOC","ok":true}]}',
        'VIOMMU-MARK: iommufd-fault {"ok":false,"steps":[{"op":"a","ok":true},{"op":"attach","ok":false}]}',
        'VIOMMU-MARK: module {"path":"/x.ko","ok":true}'))
    b = result_from_summary(2, "k=7.3", {"k": "7.3"}, booted(
        'VIOMMU-MARK: iommufd-fault {"ok":true,"steps":[]}'))
    assert a.guest_checks == {"iommufd-ioas": "PASS", "iommufd-fault": "FAIL: attach"}
    lines = format_table([a, b], ["k"]).split("guest checks per run:\n")[1].splitlines()
    assert lines[0].split() == ["#", "k", "iommufd-ioas", "iommufd-fault"]
    assert lines[2].split() == ["1", "6.12", "PASS", "FAIL"] and lines[3].split() == ["2", "7.3", "-", "PASS"]
    assert lines[4] == "#1 iommufd-fault: FAIL: attach"
    assert "guest checks" not in format_table([result_from_summary(3, "x", {}, summary())], [])
