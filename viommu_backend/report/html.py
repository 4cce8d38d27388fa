"""The HTML pages of ``--report DIR``: one per boot (``DIR/index.html`` for ``boot``,
``DIR/<run>/index.html`` for each matrix run) with the plots of
:mod:`viommu_backend.report.plots` and the run's checks, and for a matrix ``DIR/index.html``
with every run, its verdict and checks, and links to the run pages.  Plain HTML with the
PNGs beside it: open it from disk, copy the folder anywhere."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Sequence

from viommu_backend.kci.checks import Check
from viommu_backend.report import plots
from viommu_backend.report.collect import DATA_FILE, load

STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 2px 8px; font-size: 13px; text-align: left; }
.PASS { background: #d8f0d0; } .FAIL { background: #f6c9c4; } .MISS { background: #eee; } .SKIP { background: #f3ecc8; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.3em 0 1.2em; }
pre { background: #f6f6f6; padding: 0.6em; font-size: 12px; overflow-x: auto; }
"""
IMAGES = (("heatmap.png", "Translation heat map"), ("queues.png", "Queue timelines and CMD_SYNC latency"),
          ("commands.png", "Command mix"), ("events.png", "Events by type"),
          ("stream.png", "One stream: STE -> CD(s) -> page tables"))


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")


def _checks_table(checks: Sequence[Check]) -> str:
    rows = "".join(
        f"<tr class='{c.status}'><td>{html.escape(c.path)}</td><td>{c.status}</td>"
        f"<td>{'' if c.value is None else f'{c.value:g} {html.escape(c.unit)}'}</td>"
        f"<td>{html.escape(c.detail)}</td></tr>" for c in checks)
    return f"<table><tr><th>check</th><th>status</th><th>value</th><th>detail</th></tr>{rows}</table>"


def render_run(out: Path, data: dict[str, Any], *, title: str, checks: Sequence[Check],
               facts: dict[str, str]) -> Path:
    """Plots and ``index.html`` for one boot into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    trace = data.get("trace") or []
    viommu = data.get("viommu") or {}
    counters = viommu.get("counters") or {}
    plots.heatmap(trace, out / "heatmap.png")
    plots.queue_plot(trace, viommu.get("queues") or {}, out / "queues.png")
    plots.bars(dict(counters.get("commands") or {}), "Commands executed", out / "commands.png")
    plots.bars(dict(counters.get("events") or {}), "Event records", out / "events.png", color="#d62728")
    plots.stream_plot(data.get("stream"), out / "stream.png")
    (out / DATA_FILE).write_text(json.dumps(data, default=str) + "\n")
    fact_rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts.items())
    notes = []
    if data.get("dropped"):
        notes.append(f"{data['dropped']} trace records were dropped (ring overflow) before they were read")
    notes += data.get("errors") or []
    body = [f"<table>{fact_rows}<tr><th>trace records</th><td>{len(trace)}</td></tr></table>"]
    body += [f"<p><b>note:</b> {html.escape(n)}</p>" for n in notes]
    body.append("<h2>Checks</h2>" + _checks_table(checks))
    for name, caption in IMAGES:
        body.append(f"<h2>{html.escape(caption)}</h2><img src='{name}' alt='{html.escape(caption)}'>")
    body.append(f"<p>Data: <a href='{DATA_FILE}'>{DATA_FILE}</a> (trace, query-viommu, query-viommu-stream)</p>")
    page = out / "index.html"
    page.write_text(_page(title, "\n".join(body)))
    return page


def write_boot_report(out: Path, data: dict[str, Any], summary: Any, title: str = "viommu-backend boot") -> Path:
    from viommu_backend.kci.checks import checks_from_markers

    checks = checks_from_markers(summary.markers, ok=summary.ok, reason=(summary.error or "").split("\n")[0])
    facts = {"verdict": "PASS" if summary.ok else f"FAIL: {summary.error or ''}".strip(),
             "kernel": summary.kernel, "qemu": summary.qemu,
             "times": ", ".join(f"{k} {v:.1f} s" for k, v in summary.timings.items())}
    return render_run(out, data, title=title, checks=checks, facts=facts)


def write_matrix_report(matrix: Any, runs: Sequence[Any], results: Sequence[Any], out: Path) -> Path:
    """A page per run (from the data each run's boot collected into its folder) and the
    matrix page."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for run, res in zip(runs, results, strict=True):
        src = Path(res.workdir) / DATA_FILE if res.workdir else None
        data = load(src) if src is not None and src.is_file() else {"errors": ["no report data collected"]}
        checks = [Check.from_json(c) for c in res.checks]
        facts = {"verdict": res.status + (f": {res.reason}" if res.reason else ""), "kernel": res.kernel,
                 "domain type": res.domain_type or "-", "duration": f"{res.duration:.1f} s",
                 **{f"axis {a}": v for a, v in run.choice.items()}}
        render_run(out / run.slug, data, title=f"{matrix.name}: {run.name}", checks=checks, facts=facts)
        failed = [c.path for c in checks if c.status != "PASS"]
        c = res.counters
        rows.append(f"<tr class='{res.status}'><td>{run.index}</td><td><a href='{run.slug}/index.html'>"
                    f"{html.escape(run.name)}</a></td><td>{res.status}</td><td>{res.domain_type or '-'}</td>"
                    f"<td>{c.get('translations', '-')}</td><td>{c.get('walks', '-')}</td>"
                    f"<td>{c.get('commands', '-')}</td><td>{c.get('events', '-')}</td>"
                    f"<td>{sum(1 for x in checks if x.status == 'PASS')}/{len(checks)}</td>"
                    f"<td>{html.escape(', '.join(failed) or res.reason)}</td></tr>")
    plots.matrix_plot([r.name for r in results], [r.counters for r in results], out / "matrix.png")
    head = ("<tr><th>#</th><th>run</th><th>result</th><th>domain</th><th>translations</th><th>walks</th>"
            "<th>commands</th><th>events</th><th>checks passed</th><th>not passed</th></tr>")
    passed = sum(r.ok for r in results)
    body = (f"<p>{passed}/{len(results)} runs passed; matrix {html.escape(matrix.source)}, "
            f"base {html.escape(matrix.base_source)}</p><table>{head}{''.join(rows)}</table>"
            f"<h2>Runs side by side</h2><img src='matrix.png' alt='per-run counters'>")
    page = out / "index.html"
    page.write_text(_page(f"viommu-backend matrix {matrix.name}", body))
    return page
