"""The HTML report: the series behind the plots, the plots (non-blank PNGs), the boot and
matrix pages, and the pages as headless Chromium shows them (every image loaded)."""

from __future__ import annotations

import asyncio

from viommu_backend.kci.checks import checks_from_markers
from viommu_backend.matrix import expand, loads_matrix, run_matrix
from viommu_backend.report import plots
from viommu_backend.report.collect import DATA_FILE, ReportCollector
from viommu_backend.report.html import IMAGES, render_run, write_matrix_report

from tests.support.report_data import IOVA, data, images_in_chromium, png_not_blank, screenshot, stream, trace
from tests.support.run_data import markers
from tests.support.run_data import TWO_AXES, summary


def test_translation_grid_counts_hits_walks_and_faults():
    grid, edges, t_edges = plots.translation_grid(trace())
    assert grid.shape == (3, 5, plots.TIME_BINS)  # 4 pages translated + the faulting one
    assert grid[0].sum() == 9 * 4 and grid[1].sum() == 4 and grid[2].sum() == 1
    assert list(edges) == [(IOVA >> 12) + i for i in range(4)] + [(IOVA + 0x10000) >> 12]
    assert grid[1][:, 0].sum() == 4  # the walks come first in time
    assert t_edges[0] == next(r["t"] for r in trace() if r["cat"] == "xlat")


def test_queue_series_occupancy_and_sync_latency():
    queues = data()["viommu"]["queues"]
    s = plots.queue_series(trace(), queues)
    t, n = s["occupancy"]["CMDQ"]
    assert n == [2] * 10 and len(t) == 10
    assert s["occupancy"]["EVTQ"][1] == [1, 0]  # one record written, then consumed
    sync_t, us = s["sync"]
    assert len(us) == 10 and all(abs(x - 3000) < 1 for x in us)  # PROD write -> MSI: 3 records of 1 ms


def test_coalesce_merges_contiguous_leaves_with_equal_permissions():
    ranges = plots.coalesce(stream()["substreams"][0]["stage1"]["mappings"])
    assert [(r["iova"], r["size"], r["perm"], r["leaves"]) for r in ranges] == [
        (IOVA, 0x3000, "rw-", 3), (IOVA + 0x3000, 0x1000, "r--", 1)]


def test_every_plot_draws_something_also_without_data(tmp_path):
    for d, tag in ((data(), "full"), ({}, "empty")):
        out = tmp_path / tag
        render_run(out, d, title=tag, checks=checks_from_markers(markers(), ok=True), facts={"verdict": "PASS"})
        for name, _ in IMAGES:
            assert png_not_blank(out / name) > 0.001, (tag, name)  # at least the "no data" text
    assert png_not_blank(tmp_path / "full" / "heatmap.png") > png_not_blank(tmp_path / "empty" / "heatmap.png")


def test_boot_page_in_headless_chromium(tmp_path):
    page = render_run(tmp_path / "r", data(), title="viommu-backend boot",
                      checks=checks_from_markers(markers(blk_match=False), ok=False, reason="bs=4096 mismatch"),
                      facts={"verdict": "FAIL"})
    html = page.read_text()
    assert "viommu.blk.bs-4096" in html and "class='FAIL'" in html
    imgs = images_in_chromium(page, tmp_path)
    assert sorted(i[0] for i in imgs) == sorted(name for name, _ in IMAGES)
    assert all(complete and w > 300 and h > 150 for _, complete, w, h in imgs), imgs
    shot = screenshot(page, tmp_path / "shot.png", tmp_path)
    assert png_not_blank(shot) > 0.05


def test_matrix_report_links_a_page_per_run(tmp_path):
    m = loads_matrix(TWO_AXES)
    runs = expand(m)[:2]

    async def boot(config, *, progress, workdir):
        rec = ReportCollector()
        rec.data = data()
        rec.save(workdir / DATA_FILE)
        s = summary()
        s.markers = markers()
        return s

    results = asyncio.run(run_matrix(m, runs, progress=lambda _l: None, output=tmp_path / "out", boot=boot,
                                     setup=False))
    page = write_matrix_report(m, runs, results, tmp_path / "report")
    html = page.read_text()
    for r in runs:
        assert f"href='{r.slug}/index.html'" in html
        assert (tmp_path / "report" / r.slug / "heatmap.png").is_file()
    imgs = images_in_chromium(page, tmp_path)
    assert imgs and imgs[0][0] == "matrix.png" and imgs[0][1] and imgs[0][2] > 300
