"""The guest DMA benchmark's targets (viommu_backend.guest.bench): figures in, the issue's
targets out as PASS / FAIL / not-measured lines, from blk-bench markers shaped as
guest_images/programs/blk_bench.c prints them."""

from __future__ import annotations

import pytest

from viommu_backend.config import ConfigError
from viommu_backend.guest.bench import (CASES, MIB, CaseRun, Figures, Host, case_bytes, mbps_table, summary_line,
                                        traps_table, verdicts)
from viommu_backend.guest.qemu import parse_marker


def marker(bs: int, layout: str, mbps: float, nbytes: int = 4 * MIB, **over) -> dict:
    """A blk-bench marker moving ``nbytes`` each way at ``mbps`` (combined), parsed from the
    line the guest prints."""
    ns = int(nbytes * 1e3 / mbps)  # per direction: 2 * nbytes over 2 * ns
    fields = {"ok": "true", "bs": bs, "bytes": nbytes, "requests": nbytes // bs, "layout": f'"{layout}"',
              "runs": 1 if layout == "contiguous" else bs // 4096, "layout_ok": "true",
              "write_ns": ns, "read_ns": ns, "error": '""'} | over
    line = "VIOMMU-MARK: blk-bench {" + ",".join(f'"{k}":{v}' for k, v in fields.items()) + "}"
    m = parse_marker(line)
    assert m is not None
    return m.data


def host(server_cpu_s: float = 0.0, traps: int = 0, bar_reads: int = 0) -> Host:
    return Host(server_cpu_s=server_cpu_s, wall_s=10.0, smmu_reads=0, smmu_writes=traps, bar_reads=bar_reads,
                bar_writes=0)


BUILTIN = {"4k": 10.0, "64k": 80.0, "1m": 200.0, "1m-scattered": 100.0}
NONE = {"4k": 20.0, "64k": 150.0, "1m": 400.0, "1m-scattered": 300.0}


def figures(backend: dict[str, float], *, mode: str = "strict", server_cpu_s: float = 0.1,
            traps: int = 0) -> Figures:
    fig = Figures()
    for name, c in CASES.items():
        fig.runs[(1, "", "none", name)] = CaseRun(marker(c.bs, c.layout, NONE[name]))
        fig.runs[(1, mode, "builtin", name)] = CaseRun(marker(c.bs, c.layout, BUILTIN[name]))
        fig.runs[(1, mode, "backend", name)] = CaseRun(marker(c.bs, c.layout, backend[name]),
                                                       host(server_cpu_s if name == "4k" else 1.0, traps))
    return fig


def lines(fig: Figures) -> list[str]:
    return [v.line() for v in verdicts(fig)]


def test_strict_targets_pass_and_fail_per_ratio():
    # 4 KiB: 7/10 = 0.70x passes (>= 0.7); 64 KiB 40/80 = 0.5x fails; 1 MiB 300/200 = 1.5x
    # passes; scattered 150/100 = 1.5x fails (>= 2x); vs none: 40/150 fails, 300/400 = 0.75x
    # passes, 150/300 = 0.5x fails
    fig = figures({"4k": 7.0, "64k": 40.0, "1m": 300.0, "1m-scattered": 150.0})
    out = lines(fig)
    assert out[:7] == [
        "PASS  smp 1 strict 4 KiB contiguous  backend / built-in: 0.70x (>= 0.70x)",
        "FAIL  smp 1 strict 64 KiB contiguous backend / built-in: 0.50x (>= 0.70x)",
        "FAIL  smp 1 strict 64 KiB contiguous backend / no IOMMU: 0.27x (>= 0.70x)",
        "PASS  smp 1 strict 1 MiB contiguous  backend / built-in: 1.50x (>= 0.70x)",
        "PASS  smp 1 strict 1 MiB contiguous  backend / no IOMMU: 0.75x (>= 0.70x)",
        "FAIL  smp 1 strict 1 MiB scattered   backend / built-in: 1.50x (>= 2.00x)",
        "FAIL  smp 1 strict 1 MiB scattered   backend / no IOMMU: 0.50x (>= 0.70x)",
    ]
    assert len(out) == 9


def test_lazy_needs_parity_with_the_builtin_smmu():
    fig = figures({"4k": 9.9, "64k": 80.0, "1m": 200.0, "1m-scattered": 200.0}, mode="lazy")
    out = lines(fig)
    assert out[0] == "FAIL  smp 1 lazy   4 KiB contiguous  backend / built-in: 0.99x (>= 1.00x)"
    assert out[1] == "PASS  smp 1 lazy   64 KiB contiguous backend / built-in: 1.00x (>= 1.00x)"
    assert "PASS  smp 1 lazy   1 MiB scattered   backend / built-in: 2.00x (>= 2.00x)" in out


def test_server_cpu_per_4k_request_and_trapped_accesses():
    # 4 MiB at 4 KiB = 1024 writes + 1024 reads; 0.2 s of server CPU -> 98 us per request
    fig = figures({"4k": 7.0, "64k": 80.0, "1m": 200.0, "1m-scattered": 200.0}, server_cpu_s=0.2)
    out = lines(fig)
    assert out[-2] == "PASS  smp 1 strict server CPU per 4 KiB request: 98 us (<= 100 us)"
    assert out[-1] == ("PASS  smp 1 strict trapped accesses on the map/unmap/submit path: 0 (<= 0)"
                       "  [0.0 per MiB over 32 MiB]")
    fig = figures({"4k": 7.0, "64k": 80.0, "1m": 200.0, "1m-scattered": 200.0}, server_cpu_s=0.25, traps=64)
    out = lines(fig)
    assert out[-2] == "FAIL  smp 1 strict server CPU per 4 KiB request: 122 us (<= 100 us)"
    assert out[-1] == ("FAIL  smp 1 strict trapped accesses on the map/unmap/submit path: 256 (<= 0)"
                       "  [8.0 per MiB over 32 MiB]")


def test_completion_reads_are_not_submit_path_traps():
    h = Host(server_cpu_s=0, wall_s=1, smmu_reads=1, smmu_writes=2, bar_reads=100, bar_writes=3)
    assert h.submit_path_traps == 6


def test_missing_figures_are_not_measured_not_passed():
    fig = figures({"4k": 7.0, "64k": 80.0, "1m": 200.0, "1m-scattered": 200.0})
    for name in CASES:
        del fig.runs[(1, "", "none", name)]
    del fig.runs[(1, "strict", "builtin", "1m")]
    out = lines(fig)
    assert "n/a   smp 1 strict 1 MiB contiguous  backend / built-in: not measured (>= 0.70x)" in out
    assert "n/a   smp 1 strict 64 KiB contiguous backend / no IOMMU: not measured (>= 0.70x)" in out
    assert summary_line(verdicts(fig), 61.4) == "5 of 9 targets passed, 0 failed, 4 not measured; run took 61 s"


@pytest.mark.parametrize("bad", [{"layout_ok": "false", "runs": 3}, {"ok": "false"}])
def test_a_case_whose_layout_or_data_failed_counts_as_not_measured(bad):
    fig = figures({"4k": 7.0, "64k": 80.0, "1m": 200.0, "1m-scattered": 200.0})
    fig.runs[(1, "strict", "backend", "1m-scattered")] = CaseRun(marker(MIB, "scattered", 999.0, **bad), host())
    out = lines(fig)
    assert "n/a   smp 1 strict 1 MiB scattered   backend / built-in: not measured (>= 2.00x)" in out


def test_tables_show_every_path_runs_ratios_and_traps():
    fig = figures({"4k": 7.0, "64k": 40.0, "1m": 300.0, "1m-scattered": 150.0}, traps=2)
    table = mbps_table(fig, 1, "strict")
    assert table[1:4] == [
        "4 KiB contiguous  | backend | " + f"{7.0:8.2f} {7.0:8.2f} {7.0:8.2f} |    1 |     0.70x  0.35x",
        "4 KiB contiguous  | builtin | " + f"{10.0:8.2f} {10.0:8.2f} {10.0:8.2f} |    1 |",
        "4 KiB contiguous  | none    | " + f"{20.0:8.2f} {20.0:8.2f} {20.0:8.2f} |    1 |",
    ]
    assert table[-3].startswith("1 MiB scattered   | backend |") and "|  256 |" in table[-3]
    traps = traps_table(fig, 1, "strict")
    assert traps[0].startswith("4 KiB contiguous : map/unmap/submit      0.2/MiB (SMMU reads 0, SMMU writes 2, ")
    assert "server CPU 49 us per request (2048 requests" in traps[0]


def test_bytes_one_size_for_every_case_or_by_case():
    assert case_bytes("4M", ["4k", "1m"]) == {"4k": 4 * MIB, "1m": 4 * MIB}
    assert case_bytes("1m=64M", list(CASES)) == {"4k": 16 * MIB, "64k": 64 * MIB, "1m": 64 * MIB,
                                                 "1m-scattered": 128 * MIB}
    with pytest.raises(ConfigError, match="no case '2m'"):
        case_bytes("2m=4M", ["4k"])
    with pytest.raises(ConfigError, match="less than one request for 1m"):
        case_bytes("64K", ["4k", "1m"])
