"""The digest of a run: what a finished boot produced, as text and as figures.

A run leaves a :class:`BootSummary`: the guest's markers (workload result lines, kernel
messages, block I/O), the backend's QMP state at the end (``query-viommu`` and friends,
see :func:`viommu_backend.guest.boot.query_backend`), the error that failed it and the
timings.  This module is the one place that reads them:

- :class:`SmmuCounters`: one SMMU's ``query-viommu`` (translations, TLB, commands, events,
  trapped register reads, PASID and stall traffic), as summary lines
  (:meth:`SmmuCounters.lines`) and as the key counters a matrix run records
  (:meth:`SmmuCounters.key_counters`);
- :func:`blk_rates`: the MB/s of a ``blk-io`` result line;
- :func:`digest`: a run in figures (:class:`RunDigest`): kernel, domain type, counters,
  MB/s per block size, the SMMU driver's messages, the guest checks; what the matrix
  runner, the HTML report and the benchmarks build on.

A new kind of guest result (a marker) joins the digest in :meth:`BootSummary.format`
(its text) and :func:`digest` (its figures).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from viommu_backend.guest.ktap import KtapRun, runs_from_lines
from viommu_backend.guest.qemu import Marker
from viommu_backend.guest.vfio_selftests import summary_lines as selftest_summary_lines

CHECKLESS_MARKERS = frozenset({"module"})  # markers with an "ok" that are not checks
# what the arm-smmu-v3 driver says about the SMMU it probed (RunDigest.driver)
DRIVER_LINES = {
    "features": re.compile(r"\(features (0x[0-9a-f]+)\)"),
    "option_mask": re.compile(r"option mask (0x[0-9a-f]+)"),
    "strtab": re.compile(r"(\d+-level strtab|linear stream table|2-level)", re.I),
}


def mbps(nbytes: int, ms: float) -> float:
    """MB/s (1e6 bytes a second) of ``nbytes`` moved in ``ms`` milliseconds; 0 without time."""
    return nbytes / 1e3 / ms if ms > 0 else 0.0


def mbps_text(nbytes: int, ms: float) -> str:
    return f"{mbps(nbytes, ms):7.2f} MB/s" if ms > 0 else "      ? MB/s"


def blk_rates(io: Mapping[str, Any]) -> dict[str, Any]:
    """A ``blk-io`` marker (O_DIRECT write + read back at one block size) in MB/s:
    ``write_mbps``, ``read_mbps``, ``mbps`` (both ways: write+read bytes over write+read
    time), with its ``bytes`` and whether the data read back ``match``-ed."""
    nbytes = io.get("bytes", 0)
    write_ms, read_ms = io.get("write_ms", 0), io.get("read_ms", 0)
    return {"bytes": nbytes, "write_mbps": mbps(nbytes, write_ms), "read_mbps": mbps(nbytes, read_ms),
            "mbps": mbps(2 * nbytes, write_ms + read_ms), "match": bool(io.get("match"))}


@dataclass(frozen=True)
class SmmuCounters:
    """One SMMU's ``query-viommu``: its ``counters`` (command queue, events, GERRORs,
    register reads), ``translation`` (DMA, walks, TLB, PASID, stalls, sanitizer) and
    ``registers`` (how BAR0 reaches the guest: trapped, or shared memory and its scans)."""

    counters: Mapping[str, Any]
    translation: Mapping[str, Any]
    registers: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_query(cls, viommu: Mapping[str, Any] | None) -> SmmuCounters:
        v = viommu or {}
        return cls(v.get("counters", {}) or {}, v.get("translation", {}) or {},
                   v.get("registers", {}) or {})

    def count(self, key: str) -> int:
        return self.counters.get(key, 0)

    def by_type(self, key: str) -> dict[str, Any]:
        """A counter kept per type: ``commands``, ``events``, ``gerrors`` (by name) or
        ``mmio_reads`` (trapped reads of the SMMU's registers, by register)."""
        return dict(self.counters.get(key, {}) or {})

    @property
    def commands(self) -> dict[str, int]:
        return self.by_type("commands")

    @property
    def mmio_reads(self) -> dict[str, int]:
        return self.by_type("mmio_reads")

    @property
    def tlbi(self) -> int:
        """TLB invalidation commands of every kind."""
        return sum(n for k, n in self.commands.items() if k.startswith("TLBI"))

    @property
    def tlb(self) -> tuple[int, int]:
        """(hits, lookups) of the translation cache."""
        tlb = self.translation.get("tlb", {}) or {}
        hits = tlb.get("hits", 0)
        return hits, hits + tlb.get("misses", 0)

    @property
    def tlb_hit_rate(self) -> float | None:
        hits, looks = self.tlb
        return hits / looks if looks else None

    @property
    def dma_bytes(self) -> int:
        return self.translation.get("bytes_read", 0) + self.translation.get("bytes_written", 0)

    def key_counters(self) -> dict[str, Any]:
        """The counters a matrix run records (results.json ``counters``)."""
        t, events, gerrors = self.translation, self.by_type("events"), self.by_type("gerrors")
        return {
            "translations": t.get("translations", 0), "walks": t.get("walks", 0),
            "faults": t.get("faults", 0), "tlb_hit_rate": self.tlb_hit_rate,
            "commands": sum(self.commands.values()), "commands_by_type": self.commands,
            "syncs": self.count("syncs"), "msi_writes": self.count("msi_writes"),
            "cmdq_cons_reads": self.mmio_reads.get("CMDQ_CONS", 0),
            "events": sum(events.values()), "events_by_type": events,
            "gerrors": sum(gerrors.values()) if all(isinstance(x, int) for x in gerrors.values())
            else len(gerrors),
            "gerrors_by_type": gerrors,
            "bytes": self.dma_bytes,
            "caches": t.get("caches", {}), "sanitizer": t.get("sanitizer"),
        }

    def _registers_line(self, tag: str) -> str:
        r = self.registers
        if r.get("mode") != "shared":
            return f"  {tag}: registers trapped (each access a vfio-user message)"
        return (f"  {tag}: registers shared (BAR0 mapped into the guest): {r.get('looks', 0)} "
                f"detector looks, {r.get('polls', 0)} scans, "
                f"{r.get('active_polls', 0)} found writes, {r.get('writes_taken', 0)} register writes "
                f"taken, {r.get('publishes', 0)} words published")

    def lines(self, tag: str = "iommu") -> list[str]:
        """The boot summary's lines about this SMMU, each starting with ``tag``."""
        t = self.translation
        hits, looks = self.tlb
        cmds = ", ".join(f"{k} {n}" for k, n in sorted(self.commands.items()))
        reads = self.mmio_reads
        return [
            f"  {tag}: {self.dma_bytes} bytes through the SMMU "
            f"(DMA read {t.get('bytes_read', 0)} in {t.get('dma_reads', 0)}, "
            f"write {t.get('bytes_written', 0)} in {t.get('dma_writes', 0)})",
            f"  {tag}: translations {t.get('translations', 0)}, walks {t.get('walks', 0)}, "
            f"TLB hit rate {100.0 * hits / looks if looks else 0.0:.1f}% "
            f"({hits}/{looks}), faults {t.get('faults', 0)}" + self._atc_text(),
            f"  {tag}: commands: {cmds or '-'}",
            f"  {tag}: CMD_SYNC {self.count('syncs')} (MSI writes {self.count('msi_writes')}), trapped "
            f"reads CMDQ_CONS {reads.get('CMDQ_CONS', 0)} of {sum(reads.values())} register reads",
            f"  {tag}: events {json.dumps(self.counters.get('events', {}))}, "
            f"GERRORs {json.dumps(self.counters.get('gerrors', {}))}",
            self._pasid_line(tag),
            self._registers_line(tag),
        ] + self._cache_lines(tag) + self._sanitizer_lines(tag)

    def _atc_text(self) -> str:
        """", ATC hit rate ..." for endpoints using ATS (their hits never reach the SMMU)."""
        a = self.translation.get("atc")
        if not a or not a.get("hits", 0) + a.get("misses", 0):
            return ""
        n = a["hits"] + a["misses"]
        return (f"; endpoint ATC hit rate {100.0 * a['hits'] / n:.1f}% ({a['hits']}/{n}), "
                f"{a.get('invalidations', 0)} ATC_INV")

    def _pasid_line(self, tag: str) -> str:
        """SubstreamID (PASID) traffic and the stall model at work."""
        t = self.translation
        return (f"  {tag}: PASID: translations {t.get('ssid_translations', 0)}, DMA bytes "
                f"{t.get('ssid_bytes_read', 0) + t.get('ssid_bytes_written', 0)}, CFGI_CD with "
                f"SSID {self.count('cfgi_cd_ssids')}; stalls {t.get('stalls', 0)} (resumed "
                f"{t.get('stall_retries', 0)}, aborted {t.get('stall_aborts', 0)}, STALL_TERM "
                f"{t.get('stall_terms', 0)}, held {t.get('stalls_held', 0)})")

    def _cache_lines(self, tag: str) -> list[str]:
        """The caches of the aggressive caching model (SMMU option ``cache``), one line
        per cache."""
        caches = self.translation.get("caches", {})
        if caches.get("model", "default") == "default":
            return []
        caches = {"tlb": self.translation.get("tlb", {}), **caches}
        return [f"  {tag}: cache {name}: " + ", ".join(f"{k} {v}" for k, v in c.items())
                for name, c in caches.items() if isinstance(c, dict)]

    def _sanitizer_lines(self, tag: str) -> list[str]:
        """The driver sanitizer (SMMU option ``sanitize``): its checks, one line per
        violation it still holds, the device's reports and the no-match counters."""
        san = self.translation.get("sanitizer")
        if san is None:
            return []
        found = ", ".join(f"{k} {n}" for k, n in san["violations"].items() if n) or "none"
        device = ", ".join(f"{k} {n}" for k, n in san.get("device", {}).items() if n) or "none"
        unmatched = ", ".join(f"{k} {n}" for k, n in san.get("no-match", {}).items() if n) \
            or "none"
        return [f"  {tag}: sanitizer: {san['checks']} cached entries checked, violations: {found}"
                ] + [f"  {tag}: sanitizer: " + " ".join(
                    f"{k}={hex(v) if isinstance(v, int) and not isinstance(v, bool) else v}"
                    for k, v in rec.items()) for rec in san["recent"]] + [
                f"  {tag}: sanitizer: device use after unmap: {device}; invalidations matching "
                f"nothing live: {unmatched}"]


def backend_counters(backend: Mapping[str, Any] | None) -> dict[str, Any]:
    """The key counters of the (first) SMMU from the backend's final QMP state; {} without one."""
    if not backend:
        return {}
    return SmmuCounters.from_query(backend.get("viommu")).key_counters()


def endpoint_bar_accesses(functions: Mapping[str, Mapping[str, Any]], skip: Sequence[str] = ()
                          ) -> tuple[int, int]:
    """(BAR reads, BAR writes) of every function in ``query-viommu-functions`` but ``skip``."""
    reads = writes = 0
    for name, fn in functions.items():
        if name not in skip:
            reads += sum(fn.get("bar-reads", {}).values())
            writes += sum(fn.get("bar-writes", {}).values())
    return reads, writes


@dataclass
class BootSummary:
    """What one boot produced (filled by :func:`viommu_backend.guest.boot.run_boot`)."""

    ok: bool = False
    error: str | None = None
    markers: list[Marker] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    qemu: str = ""
    kernel: str = ""
    sva: str = ""  # whether the stock driver can enable SVA on this machine, and why not
    workdir: Path | None = None
    console_log: Path | None = None
    server_log: Path | None = None
    qemu_rc: int | None = None
    server_rc: int | None = None
    predicted_bar0: dict[str, int] = field(default_factory=dict)
    backend: dict[str, Any] | None = None  # query_backend() at the end
    backend_before_unplug: dict[str, Any] | None = None  # query_backend() before device_del
    backend_error: str | None = None
    unexpected_kmsg: list[dict[str, Any]] = field(default_factory=list)

    def marks(self, name: str) -> list[Any]:
        return [m.data for m in self.markers if m.name == name]

    @property
    def pci_devices(self) -> list[dict[str, Any]]:
        return self.marks("pci-dev")

    def checks(self) -> list[tuple[str, dict[str, Any]]]:
        """The guest test programs' result lines (markers with an ``ok``), in order."""
        return [(m.name, m.data) for m in self.markers
                if m.name not in CHECKLESS_MARKERS and isinstance(m.data, dict)
                and isinstance(m.data.get("ok"), bool)]

    def selftests(self) -> dict[str, KtapRun]:
        """The kernel selftests' results (workload ``vfio-selftests``): program -> its
        KTAP output parsed, from the guest's ``ktap`` markers."""
        return runs_from_lines((str(d.get("test")), str(d.get("line", ""))) for d in self.marks("ktap")
                               if isinstance(d, dict))

    def selftest_rcs(self) -> dict[str, int]:
        return {str(d.get("test")): d.get("rc") for d in self.marks("vfio-selftest") if isinstance(d, dict)}

    @property
    def guest_errors(self) -> list[Any]:
        return self.marks("error")

    def format(self) -> str:
        lines = [f"boot: {'OK' if self.ok else 'FAILED'}" + (f": {self.error}" if self.error else ""),
                 f"  qemu: {self.qemu}", f"  kernel: {self.kernel}"]
        if self.sva:
            lines.append(f"  sva: {self.sva}")
        lines += self._guest_lines()
        lines += self.backend_lines()
        for k in self.unexpected_kmsg:
            lines.append(f"  UNEXPECTED kernel message <{k.get('level')}>: {k.get('text')}")
        for e in self.guest_errors:
            lines.append(f"  guest error: {json.dumps(e)}")
        done = self.marks("done")
        lines.append(f"  guest result: {'errors=' + str(done[-1].get('errors')) if done else 'no done marker'}")
        lines.append("  times: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items()))
        lines.append(f"  logs: {self.console_log} {self.server_log}")
        return "\n".join(lines)

    def _guest_lines(self) -> list[str]:
        """What the guest reported: PCI functions, the SMMU, its kernel messages about the
        SMMU, the disk and its I/O, unplugs, the test programs' checks."""
        lines = []
        for d in self.pci_devices:
            bars = " ".join(f"BAR{b['index']}={b['start']}" for b in d.get("bars", []))
            lines.append(f"  pci {d['bdf']} {d['vendor']}:{d['device']} {bars} driver={d.get('driver') or '-'}"
                         f" group={d.get('iommu_group') or '-'}")
        for s in self.marks("smmu"):
            lines.append(f"  smmu: {json.dumps(s)}")
        for k in self.marks("kmsg"):
            if "smmu" in str(k.get("text", "")).lower():
                lines.append(f"  dmesg<{k.get('level')}>: {k.get('text')}")
        for d in self.marks("blk-dev"):
            lines.append(f"  blk: /dev/{d.get('dev')} {d.get('bytes', 0) >> 20} MiB at {d.get('bdf')} "
                         f"iommu group {d.get('iommu_group') or '-'} ({d.get('domain_type') or '?'})")
        for io in self.marks("blk-io"):
            lines.append(f"  blk bs={io['bs']:>7}: {io['bytes'] >> 10} KiB  write "
                         f"{mbps_text(io['bytes'], io['write_ms'])}  read {mbps_text(io['bytes'], io['read_ms'])}"
                         f"  data {'OK' if io.get('match') else 'MISMATCH'}")
        for u in self.marks("unplug"):
            lines.append(f"  unplug {u.get('bdf')}: gone in {u.get('ms')} ms"
                         + (f" with I/O running ({u.get('busy_iterations')} loops)" if u.get("busy_iterations") else ""))
        for name, d in self.checks():
            lines.append(f"  check {name}: {'OK' if d['ok'] else 'FAILED'}")
        if self.marks("ktap"):
            lines += selftest_summary_lines(self.selftests(), self.selftest_rcs())
        return lines

    def backend_lines(self) -> list[str]:
        """The backend's counters, per SMMU when there are several."""
        if self.backend_error:
            return [f"  backend QMP: {self.backend_error}"]
        if not self.backend or "viommu" not in self.backend:
            return []
        smmus = self.backend.get("smmus", {})
        if len(smmus) < 2:
            return SmmuCounters.from_query(self.backend["viommu"]).lines()
        return [line for name, view in smmus.items()
                for line in SmmuCounters.from_query(view["viommu"]).lines(f"iommu {name}")]


def driver_facts(kmsg: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """SMMU facts from the guest kernel log (``kmsg`` markers): features, option mask,
    messages that name the SMMU (kept verbatim)."""
    facts: dict[str, Any] = {"smmu_lines": []}
    for k in kmsg:
        text = str(k.get("text", ""))
        if "smmu" not in text.lower():
            continue
        facts["smmu_lines"].append(text)
        for key, pat in DRIVER_LINES.items():
            m = pat.search(text)
            if m:
                facts[key] = m.group(1)
    return facts


def guest_checks(summary: Any) -> dict[str, str]:
    """The guest programs' check lines of a run (``BootSummary.checks()``): name -> PASS,
    or FAIL with the first step that was not as expected."""
    checks = getattr(summary, "checks", None)
    out: dict[str, str] = {}
    for name, d in checks() if callable(checks) else ():
        failed = [st.get("op", "?") for st in d.get("steps", []) if isinstance(st, dict) and not st.get("ok")]
        out[name] = "PASS" if d["ok"] else "FAIL" + (f": {failed[0]}" if failed else "")
    return out


@dataclass(frozen=True)
class RunDigest:
    """A finished run in figures (see :func:`digest`)."""

    ok: bool
    error: str
    kernel: str  # the guest kernel's version (its ``boot`` marker), else what set-up found
    domain_type: str  # the disk's default domain type (last ``blk-dev`` marker)
    counters: dict[str, Any]  # SmmuCounters.key_counters() of the (first) SMMU
    blk: dict[str, dict[str, Any]]  # block size -> blk_rates()
    driver: dict[str, Any]  # driver_facts()
    guest_checks: dict[str, str]  # check name -> PASS / FAIL: first failed step
    kmsg: list[str]  # every guest kernel message
    markers: list[Marker]
    workdir: str
    log: str  # the boot summary text
    duration: float  # the run's total time, as it timed itself


def digest(summary: Any) -> RunDigest:
    """The figures of a finished run: a :class:`BootSummary`, or anything with its ``ok``,
    ``error``, ``marks()``, ``backend``, ``kernel``, ``timings`` and ``workdir``
    (``checks()``, ``markers`` and ``format()`` when it has them)."""
    boots = summary.marks("boot")
    devs = summary.marks("blk-dev")
    kmsg = summary.marks("kmsg")
    kernel = (boots[0].get("kernel", "") if boots and isinstance(boots[0], dict) else "") or summary.kernel
    fmt = getattr(summary, "format", None)
    return RunDigest(
        ok=bool(summary.ok), error=summary.error or "", kernel=kernel,
        domain_type=str(devs[-1].get("domain_type") or "") if devs else "",
        counters=backend_counters(summary.backend),
        blk={str(io["bs"]): blk_rates(io) for io in summary.marks("blk-io")},
        driver=driver_facts(kmsg), guest_checks=guest_checks(summary),
        kmsg=[str(k.get("text", "")) for k in kmsg], markers=list(getattr(summary, "markers", [])),
        workdir=str(summary.workdir or ""), log=fmt() if callable(fmt) else "",
        duration=float(summary.timings.get("total", 0.0)),
    )
