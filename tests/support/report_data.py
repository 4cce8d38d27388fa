"""A small, hand-made report data set (what ReportCollector gathers from a boot) and the
Chromium check of a report page, shared by the report tests."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

IOVA = 0xFFFF_0000


def trace() -> list[dict]:
    """CMDQ_PROD writes with TLBI + CMD_SYNC pairs (MSI completion), translations of four
    pages (first walked, then hits), one fault and its event, consumed by EVTQ_CONS."""
    recs: list[dict] = []
    t = 1.0

    def add(cat: str, **f) -> None:
        nonlocal t
        recs.append({"seq": len(recs), "t": round(t, 6), "cat": cat, **f})
        t += 0.001

    pages = [(IOVA >> 12) + i for i in range(4)]
    for i in range(10):
        add("reg", op="w", reg="CMDQ_PROD", offset=152, size=4, value=2 * i + 2)
        add("cmd", name="TLBI_NH_VA", index=2 * i, fields={})
        add("cmd", name="CMD_SYNC", index=2 * i + 1, fields={})
        add("irq", source="cmd_sync", kind="msi", addr=0x1000, data=0)
        add("xlat", sid=256, ssid=None, write=False, pages=pages, walked=pages if i == 0 else [], faults=0)
    add("fault", sid=256, ssid=None, iova=IOVA + 0x10000, write=True, fault="F_TRANSLATION", recorded=True)
    add("event", name="F_TRANSLATION", outcome="written", fields={"sid": 256})
    add("reg", op="w", reg="EVTQ_CONS", offset=0x100a8, size=4, value=1)
    return recs


def stream() -> dict:
    maps = [{"iova": IOVA + i * 0x1000, "pa": 0x4200_0000 + i * 0x1000, "size": 0x1000, "level": 3,
             "perm": "rw-" if i < 3 else "r--", "attrs": {}} for i in range(4)]
    return {"sid": 256, "config": "s1", "domain": 5,
            "ste": {"address": 0x7AC6_0000, "words": [0] * 8, "fields": {"V": 1, "Config": 5, "S1ContextPtr": 0x42D4_5000}},
            "cd-table": {"address": 0x42D4_5000, "format": 0, "cdmax": 0, "s1dss": 0},
            "substreams": [{"ssid": None, "cd-index": 0, "address": 0x42D4_5000, "fields": {"ASID": 1},
                            "stage1": {"asid": 1, "ttb0": 0x42D4_4000, "granule": 4096, "ia-bits": 48,
                                       "start-level": 0, "ips-bits": 48, "epd0": False, "mappings": maps,
                                       "next": None, "tables-read": 4}}],
            "next-ssid": None}


def data() -> dict:
    return {"trace": trace(), "dropped": 0, "errors": [], "stream": stream(),
            "viommu": {"queues": {"CMDQ": {"log2size": 8}, "EVTQ": {"log2size": 7}, "PRIQ": {"log2size": 7}},
                       "counters": {"commands": {"TLBI_NH_VA": 10, "CMD_SYNC": 10}, "events": {"F_TRANSLATION": 1}}}}


def png_not_blank(path: Path) -> float:
    """The fraction of pixels that are not (near) white; fails on an unreadable PNG."""
    import matplotlib.image as mpimg

    img = mpimg.imread(str(path))
    rgb = img[..., :3]
    return float(np.mean(np.any(rgb < 0.95, axis=-1)))


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium missing under CI (Debian package chromium)")
        pytest.skip("chromium not installed (Debian package chromium)")
    return exe


FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
PROBE = """<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth, i.naturalHeight]);
  const out = document.createElement('pre'); out.id = 'image-probe'; out.textContent = JSON.stringify(imgs);
  document.body.appendChild(out);
});
</script>"""


def images_in_chromium(page: Path, tmp: Path) -> list[list]:
    """Open ``page`` (a copy with a probe script) in headless Chromium; the probe lists
    every <img>: [src, complete, naturalWidth, naturalHeight]."""
    probe = page.with_name("probe-" + page.name)
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    cp = subprocess.run([chromium(), *FLAGS, f"--user-data-dir={tmp / 'chromium-profile'}",
                         "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                        capture_output=True, text=True, timeout=120)
    probe.unlink()
    m = re.search(r'<pre id="image-probe">(.*?)</pre>', cp.stdout, re.S)
    assert m, f"no probe output from chromium (rc={cp.returncode}): {cp.stderr[-2000:]}"
    return json.loads(m.group(1).replace("&quot;", '"'))


def screenshot(page: Path, out: Path, tmp: Path) -> Path:
    subprocess.run([chromium(), *FLAGS, f"--user-data-dir={tmp / 'chromium-shot'}", "--hide-scrollbars",
                    "--window-size=1400,2400", f"--screenshot={out}", page.as_uri()],
                   capture_output=True, text=True, timeout=120, check=True)
    return out
