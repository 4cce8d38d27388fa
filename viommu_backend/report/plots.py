"""The report's plots (matplotlib, Agg; PNG files), each from a boot's collected data
(:mod:`viommu_backend.report.collect`):

- ``heatmap.png``   translation heat map: IOVA pages (distinct pages touched, in address
                    order) x time, one panel each for TLB hits, walks and faults
- ``queues.png``    CMDQ / EVTQ / PRIQ occupancy over time and CMD_SYNC latency
- ``commands.png``  the command mix (commands executed, by opcode)
- ``events.png``    event records by type
- ``stream.png``    one stream's STE -> CD(s) -> mappings (coalesced ranges)

Every function writes its file and returns its path; an empty data set still draws a
figure that says so (a page never has a broken image).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

DPI = 100
TIME_BINS = 120
PAGE_BINS = 160


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=12, color="#666")
    ax.set_xticks([])
    ax.set_yticks([])


def _records(trace: Sequence[dict[str, Any]], cat: str) -> list[dict[str, Any]]:
    return [r for r in trace if r.get("cat") == cat]


# --------------------------------------------------------------------------- heat map
def translation_grid(trace: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(counts[3, page_bins, time_bins] for hits / walks / faults, the page numbers at the
    bins' lower edges, the time edges).  Pages are ranked (distinct pages in address order)
    so that a sparse IOVA space still fills the picture."""
    xl = _records(trace, "xlat")
    faults = _records(trace, "fault")
    page_lists = [r["pages"] for r in xl] + [[int(r["iova"]) >> 12] for r in faults if "iova" in r]
    if not page_lists:
        return np.zeros((3, 0, 0)), np.zeros(0, dtype=np.int64), np.zeros(0)
    pages = np.unique(np.concatenate([np.asarray(p, dtype=np.int64) for p in page_lists]))
    times = [r["t"] for r in xl] + [r["t"] for r in faults]
    t_edges = np.linspace(min(times), max(times) + 1e-6, TIME_BINS + 1)
    nbins = min(PAGE_BINS, len(pages))
    grid = np.zeros((3, nbins, TIME_BINS))

    def add(kind: int, t: float, pg: Sequence[int]) -> None:
        if not len(pg):
            return
        rank = np.searchsorted(pages, np.asarray(pg, dtype=np.int64))
        rows = rank * nbins // len(pages)
        col = min(TIME_BINS - 1, int(np.searchsorted(t_edges, t, side="right")) - 1)
        np.add.at(grid[kind], (rows, col), 1)

    for r in xl:
        walked = set(r["walked"])
        add(0, r["t"], [p for p in r["pages"] if p not in walked])
        add(1, r["t"], r["walked"])
    for r in faults:
        if "iova" in r:
            add(2, r["t"], [int(r["iova"]) >> 12] * int(r.get("count", 1)))
    edges = pages[np.arange(nbins) * len(pages) // nbins]
    return grid, edges, t_edges


def heatmap(trace: Sequence[dict[str, Any]], path: Path) -> Path:
    grid, edges, t_edges = translation_grid(trace)
    fig, axes = plt.subplots(1, 3, figsize=(15, 5), sharey=True)
    titles = ("TLB hits", "table walks", "faults")
    cmaps = ("Greens", "Oranges", "Reds")
    if grid.shape[1] == 0:
        for ax, title in zip(axes, titles):
            ax.set_title(title)
            _empty(ax, "no translations traced")
        return _save(fig, path)
    extent = (t_edges[0], t_edges[-1], 0, grid.shape[1])
    for k, (ax, title, cmap) in enumerate(zip(axes, titles, cmaps)):
        data = np.ma.masked_equal(grid[k], 0)
        ax.set_title(f"{title} ({int(grid[k].sum())} pages)")
        ax.set_xlabel("time since the backend started (s)")
        if data.count():
            im = ax.imshow(data, aspect="auto", origin="lower", extent=extent, cmap=cmap,
                           norm=LogNorm(vmin=1, vmax=max(1, data.max())), interpolation="nearest")
            fig.colorbar(im, ax=ax, label="page translations per bin")
        else:
            ax.imshow(np.zeros_like(grid[k]), aspect="auto", origin="lower", extent=extent, cmap="Greys",
                      vmin=0, vmax=1)
            ax.text(0.5, 0.5, f"no {title}", transform=ax.transAxes, ha="center", color="#666")
    ticks = np.linspace(0, grid.shape[1] - 1, min(8, grid.shape[1])).astype(int)
    axes[0].set_yticks(ticks + 0.5)
    axes[0].set_yticklabels([f"{int(edges[i]) << 12:#x}" for i in ticks], fontsize=8)
    axes[0].set_ylabel(f"IOVA page ({len(edges)} rows over the pages touched, in address order)")
    fig.suptitle("Translations: IOVA pages x time")
    return _save(fig, path)


# --------------------------------------------------------------------------- queues
def _wrap_diff(new: int, old: int, log2: int) -> int:
    """Entries between two queue pointers (index + wrap bit) of a 2^log2 queue."""
    mod = 1 << (log2 + 1)
    return (new - old) % mod


def queue_series(trace: Sequence[dict[str, Any]], queues: dict[str, Any]) -> dict[str, Any]:
    """Occupancy steps per queue ({name: (t[], entries[])}) and CMD_SYNC latencies
    (t[], us[]): a CMD_SYNC's latency runs from the CMDQ_PROD write that published it to
    its completion (the MSI write, or else the guest's next CMDQ_CONS read)."""
    occ: dict[str, tuple[list[float], list[int]]] = {q: ([], []) for q in ("CMDQ", "EVTQ", "PRIQ")}
    written = {"EVTQ": 0, "PRIQ": 0}  # records produced = the producer index, unwrapped
    cons = {"EVTQ": 0, "PRIQ": 0}
    log2 = {q: int((queues.get(q) or {}).get("log2size", 0)) for q in written}
    sync_t: list[float] = []
    sync_us: list[float] = []
    last_prod_t = None
    pending_sync: float | None = None
    batch = 0
    for r in trace:
        cat = r.get("cat")
        if cat == "reg" and r.get("op") == "w" and r.get("reg") == "CMDQ_PROD":
            if batch:
                occ["CMDQ"][0].append(last_prod_t)
                occ["CMDQ"][1].append(batch)
            last_prod_t, batch = r["t"], 0
        elif cat == "cmd":
            batch += 1
            if r.get("name") == "CMD_SYNC":
                pending_sync = last_prod_t if last_prod_t is not None else r["t"]
        elif pending_sync is not None and (
                (cat == "irq" and r.get("source") == "cmd_sync")
                or (cat == "reg" and r.get("op") == "r" and r.get("reg") == "CMDQ_CONS")):
            sync_t.append(r["t"])
            sync_us.append(1e6 * (r["t"] - pending_sync))
            pending_sync = None
        elif (cat == "event" and r.get("outcome") == "written") or (cat == "priq" and r.get("outcome", "written") == "written"):
            q = "EVTQ" if cat == "event" else "PRIQ"
            written[q] += 1
            occ[q][0].append(r["t"])
            occ[q][1].append(_wrap_diff(written[q], cons[q], log2[q]))
        elif cat == "reg" and r.get("op") == "w" and r.get("reg") in ("EVTQ_CONS", "PRIQ_CONS"):
            q = r["reg"][:4]
            cons[q] = int(r.get("value", 0)) & ((2 << log2[q]) - 1)
            occ[q][0].append(r["t"])
            occ[q][1].append(_wrap_diff(written[q], cons[q], log2[q]))
    if batch and last_prod_t is not None:
        occ["CMDQ"][0].append(last_prod_t)
        occ["CMDQ"][1].append(batch)
    return {"occupancy": occ, "sync": (sync_t, sync_us)}


def queue_plot(trace: Sequence[dict[str, Any]], queues: dict[str, Any], path: Path) -> Path:
    s = queue_series(trace, queues)
    fig, axes = plt.subplots(4, 1, figsize=(13, 10), sharex=True)
    for ax, name in zip(axes, ("CMDQ", "EVTQ", "PRIQ")):
        t, n = s["occupancy"][name]
        size = 1 << int((queues.get(name) or {}).get("log2size", 0))
        ax.set_ylabel(f"{name}\nentries")
        if t and name == "CMDQ":
            ax.plot(t, n, ".", ms=3, color="#1f77b4")
            ax.set_ylim(0, max(n) * 1.15 + 1)
            rate = ax.twinx()
            counts, edges = np.histogram(t, bins=TIME_BINS, weights=n)
            rate.plot((edges[:-1] + edges[1:]) / 2, counts / np.diff(edges), color="#ff7f0e", lw=1)
            rate.set_ylabel("commands/s", color="#ff7f0e")
            ax.set_title(f"CMDQ: entries pending at each CMDQ_PROD write (dots; the backend consumes them at "
                         f"once) and commands/s (line); queue of {size} entries", fontsize=10)
        elif t:
            ax.step(t, n, where="post", lw=0.8, color="#d62728")
            ax.plot(t, n, ".", ms=2, color="#333")
            ax.set_title(f"{name}: records not yet consumed (queue of {size} entries)", fontsize=10)
        else:
            ax.set_title(f"{name}: no records", fontsize=10)
    ax = axes[3]
    t, us = s["sync"]
    if t:
        ax.plot(t, us, ".", ms=3, color="#2ca02c")
        ax.set_yscale("log")
        ax.set_title(f"CMD_SYNC latency: PROD write to completion ({len(us)} syncs, "
                     f"median {np.median(us):.1f} us, p99 {np.percentile(us, 99):.1f} us)", fontsize=10)
    else:
        ax.set_title("CMD_SYNC latency: no CMD_SYNC traced", fontsize=10)
    ax.set_ylabel("us")
    ax.set_xlabel("time since the backend started (s)")
    fig.suptitle("Queues")
    return _save(fig, path)


# --------------------------------------------------------------------------- bars
def bars(counts: dict[str, int], title: str, path: Path, color: str = "#1f77b4") -> Path:
    fig, ax = plt.subplots(figsize=(9, max(2.5, 0.35 * len(counts) + 1.2)))
    if not counts:
        _empty(ax, f"{title}: none")
        ax.set_title(title)
        return _save(fig, path)
    items = sorted(counts.items(), key=lambda kv: kv[1])
    names, values = [k for k, _ in items], [v for _, v in items]
    ax.barh(names, values, color=color)
    ax.set_xscale("log" if max(values) > 100 * max(1, min(values)) else "linear")
    for i, v in enumerate(values):
        ax.text(v, i, f" {v}", va="center", fontsize=9)
    ax.set_title(f"{title} ({sum(values)} in all)")
    return _save(fig, path)


# --------------------------------------------------------------------------- stream
def coalesce(mappings: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Contiguous leaves with the same permissions (IOVA and PA both contiguous) as ranges."""
    out: list[dict[str, Any]] = []
    for m in mappings:
        pa = m.get("pa", m.get("ipa", 0))
        last = out[-1] if out else None
        if (last and last["perm"] == m["perm"] and last["iova"] + last["size"] == m["iova"]
                and last["pa"] + last["size"] == pa):
            last["size"] += m["size"]
            last["leaves"] += 1
        else:
            out.append({"iova": m["iova"], "pa": pa, "size": m["size"], "perm": m["perm"], "leaves": 1})
    return out


def _box(ax: Any, x: float, y: float, w: float, h: float, text: str, color: str) -> None:
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.01", fc=color, ec="#333", lw=1))
    ax.text(x + 0.01, y + h - 0.012, text, va="top", ha="left", fontsize=7.5, family="monospace")


def _arrow(ax: Any, x0: float, y0: float, x1: float, y1: float) -> None:
    ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(arrowstyle="->", color="#444", lw=1))


def _stage_text(st: dict[str, Any], head: str) -> tuple[str, list[dict[str, Any]]]:
    ranges = coalesce(st.get("mappings", []))
    more = " (more: paged)" if st.get("next") is not None else ""
    levels: dict[int, int] = {}
    for m in st.get("mappings", []):
        levels[m["level"]] = levels.get(m["level"], 0) + 1
    per_level = ", ".join(f"{n} at L{lv}" for lv, n in sorted(levels.items()))
    return (f"{head}\nttb {st.get('ttb0', st.get('ttb', 0)):#x}  granule {st.get('granule', 0) >> 10}K\n"
            f"ia {st.get('ia-bits')} bits, walk from level {st.get('start-level')}\n"
            f"{st.get('tables-read', '?')} tables read\n"
            f"{len(st.get('mappings', []))} leaves{more}\n{per_level}"), ranges


def _range_text(ranges: list[dict[str, Any]], n: int = 10) -> str:
    lines = [f"{r['iova']:#014x}+{r['size']:#x} -> {r['pa']:#x} {r['perm']}"
             + (f" ({r['leaves']})" if r["leaves"] > 1 else "") for r in ranges[:n]]
    if len(ranges) > n:
        lines.append(f"... {len(ranges) - n} more range(s)")
    return "\n".join(lines) or "(no mappings)"


def stream_plot(stream: dict[str, Any] | None, path: Path, max_cds: int = 3) -> Path:
    fig, ax = plt.subplots(figsize=(15, 7))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.axis("off")
    if not stream or "ste" not in stream:
        _empty(ax, "no translated stream captured" + (f": {stream.get('error')}" if stream else ""))
        return _save(fig, path)
    ste = stream["ste"]["fields"]
    _box(ax, 0.01, 0.55, 0.2, 0.4, f"STE  sid {stream['sid']:#x}\n@ {stream['ste']['address']:#x}\n"
         f"config {stream.get('config')}\n" + "\n".join(f"{k} {v:#x}" for k, v in list(ste.items())[:12]),
         "#dbe9f6")
    y = 0.95
    subs = stream.get("substreams", [])[:max_cds]
    stages = [(f"CD ssid {s['ssid'] if s['ssid'] is not None else '-'} (index {s['cd-index']})\n"
               f"@ {s.get('address', 0):#x}  ASID {s['stage1']['asid']}", s["stage1"]) for s in subs if "stage1" in s]
    if "stage2" in stream:
        stages.append((f"stage 2  VMID {stream['stage2']['vmid']}", stream["stage2"]))
    h = 0.9 / max(1, len(stages))
    for head, st in stages:
        text, ranges = _stage_text(st, head)
        _box(ax, 0.27, y - h + 0.02, 0.22, h - 0.04, text, "#fde9c9")
        _box(ax, 0.55, y - h + 0.02, 0.44, h - 0.04, "mappings (IOVA+size -> PA perm)\n" + _range_text(ranges),
             "#e2f2dc")
        _arrow(ax, 0.21, 0.75, 0.27, y - h / 2)
        _arrow(ax, 0.49, y - h / 2, 0.55, y - h / 2)
        y -= h
    if not stages:
        ax.text(0.3, 0.75, f"{stream.get('config')}: no context descriptors or stage-2 tables", fontsize=10)
    ax.set_title(f"Stream {stream['sid']:#x}: STE -> CD(s) -> page tables (as the guest programmed them)")
    return _save(fig, path)


# --------------------------------------------------------------------------- matrix
def matrix_plot(names: Sequence[str], counters: Sequence[dict[str, Any]], path: Path) -> Path:
    """Translations, walks, commands and CMD_SYNCs of each run, side by side."""
    keys = ("translations", "walks", "commands", "syncs")
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(names) + 2), 4.5))
    if not names:
        _empty(ax, "no runs")
        return _save(fig, path)
    x = np.arange(len(names))
    w = 0.8 / len(keys)
    for k, key in enumerate(keys):
        vals = [max(0, int(c.get(key, 0) or 0)) for c in counters]
        ax.bar(x + (k - 1.5) * w, [max(v, 0.8) for v in vals], w, label=key)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("Per run: translations, walks, commands, CMD_SYNCs")
    return _save(fig, path)
