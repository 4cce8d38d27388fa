"""``boot --report``: a real guest on the default machine (1 MiB per block size) with the
report collector; the collected trace, counters and stream tables, the plots drawn from
them, and the page as headless Chromium shows it.

Needs the set-up made by scripts/setup (and Debian's chromium); skips without them except
under CI=true (fails)."""

from __future__ import annotations

import dataclasses

import pytest

from viommu_backend.config import load_default
from viommu_backend.report.collect import ReportCollector
from viommu_backend.report.html import IMAGES, write_boot_report

from tests.support.report_data import images_in_chromium, png_not_blank
from tests.support.guest import boot

pytestmark = pytest.mark.e2e


async def test_boot_report_from_a_real_guest(guest_ready, tmp_path):
    cfg = load_default()
    cfg = dataclasses.replace(cfg, guest=dataclasses.replace(cfg.guest, cmdline="viommu.blk_bytes=1048576"))
    rec = ReportCollector()
    s = await boot(cfg, tmp_path / "run", server_argv=rec.server_argv(), on_marker=rec.on_marker)
    assert s.ok, s.format()
    d = rec.data
    assert d["errors"] == [] and d["dropped"] == 0
    cats = {r["cat"] for r in d["trace"]}
    assert {"reg", "cmd", "irq", "domain", "xlat"} <= cats, cats
    walked = sum(len(r["walked"]) for r in d["trace"] if r["cat"] == "xlat")
    assert walked == d["viommu"]["translation"]["walks"] > 0  # every walk traced
    syncs = sum(1 for r in d["trace"] if r["cat"] == "cmd" and r["name"] == "CMD_SYNC")
    assert syncs == d["viommu"]["counters"]["commands"]["CMD_SYNC"]
    st = d["stream"]
    assert st["sid"] == 0x100 and st["config"] == "s1"
    assert st["substreams"][0]["stage1"]["mappings"], st  # the endpoint's rings at least

    page = write_boot_report(tmp_path / "report", d, s)
    for name, _ in IMAGES:
        assert png_not_blank(page.parent / name) > 0.01, name
    imgs = images_in_chromium(page, tmp_path)
    assert len(imgs) == len(IMAGES) and all(c and w > 300 for _, c, w, _ in imgs), imgs
