"""Configuration matrix runner for driver regression runs (``viommu-backend matrix``).

A matrix file (TOML) names a base config and a set of axes; every combination of one value
per axis is a run: the base config with the values' overrides applied, booted with
:func:`viommu_backend.guest.boot.run_boot`, one after the other::

    [matrix]
    name = "smoke"
    base = "default.toml"        # path relative to this file; omitted: the embedded default
    timeout = 240                 # seconds per run (set-up of guest images excluded)
    set = { "guest.cmdline" = "viommu.blk_bytes=1048576" }   # applied to every run
    exclude = [ { stages = "s2-only", flush = "lazy" } ]      # combinations not to run

    [[axis]]
    name = "stages"
    values = [
      { name = "s1+s2" },
      { name = "s2-only", set = { "function.viommu.options.s1p" = false } },
    ]

    [[axis]]
    name = "flush"
    values = [
      { name = "strict", expect = { domain_type = "DMA" } },
      { name = "lazy", set = { "guest.cmdline+" = "iommu.strict=0" },
        expect = { domain_type = "DMA-FQ" } },
    ]

    # in [matrix]:  exclude = [ { stages = "s2-only", flush = "lazy" } ]

Override keys are dotted paths into the config TOML: ``guest.cmdline``, ``kernel.suite``,
``function.<name>.options.<key>``, ``root_port.<name>.<key>`` (array-of-table entries are
addressed by their ``name``).  A key ending in ``+`` appends (words to a string, items to a
list) instead of replacing, so that several axes can add kernel command-line words.
Instead of ``base`` a matrix may carry the base config inline as a ``[base]`` table.

``expect`` (per axis value) checks what the guest saw: ``domain_type`` (the iommu group's
default domain type of the block device: DMA, DMA-FQ, identity), ``kmsg`` (regexes each of
which must match a kernel log line), ``kernel`` (a regex on the guest kernel version).

Every combination is expanded and validated (overrides, config, SMMU options) before the
first boot; errors name the axis and value.

The package: :mod:`~viommu_backend.matrix.spec` (the file, its expansion into runs),
:mod:`~viommu_backend.matrix.run` (booting them, ``viommu-backend matrix``),
:mod:`~viommu_backend.matrix.report` (results, table, JSON, JUnit) and
:mod:`~viommu_backend.matrix.tomlout` (each run's config back to TOML).
"""
from viommu_backend.matrix.report import (
    RunResult, check_expect, format_check_table, format_run_list, format_table, junit_xml,
    result_from_summary, results_json, write_results,
)
from viommu_backend.matrix.run import BootFn, main_matrix, prepare, run_matrix
from viommu_backend.matrix.spec import (
    Axis, AxisValue, Matrix, MatrixError, Run, apply_override, expand, load_matrix, loads_matrix,
    parse_matrix, parse_only,
)
from viommu_backend.matrix.tomlout import dumps_toml

__all__ = [
    "Axis", "AxisValue", "BootFn", "Matrix", "MatrixError", "Run", "RunResult", "apply_override",
    "check_expect", "dumps_toml", "expand", "format_check_table", "format_run_list", "format_table",
    "junit_xml", "load_matrix", "loads_matrix", "main_matrix", "parse_matrix", "parse_only", "prepare",
    "result_from_summary", "results_json", "run_matrix", "write_results",
]
