"""Matrix results as KCIDB objects (``viommu-backend matrix --kcidb FILE``).

KCIDB's model is checkout -> build -> test.  Here:

- a **checkout** is where a guest kernel's source came from: Debian's packaged kernel of a
  suite, Debian's ``linux-source-<v>``, or a user's tree (with its git commit);
- a **build** is that source with the project's config fragment (and the config's own
  fragments) as built, plus the guest image around it: one per distinct guest image;
- a **test** is one check of one run (``kci.checks``: ``viommu.<workload>.<check>``), and
  one more per run at path ``viommu`` for the run as a whole.

IDs start with the origin (``viommu``); tests carry the matrix run's own ID, so two
submissions of the same matrix never collide, while checkouts and builds keep IDs derived
from what they are (the same kernel is the same build in every submission).
The output is KCIDB I/O schema 5.3 (``kcidb-io`` validates it in the test suite).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from viommu_backend.config import Config, KernelConfig
from viommu_backend.kci.checks import ROOT, Check

ORIGIN = "viommu"
SCHEMA_VERSION = {"major": 5, "minor": 3}
EXCERPT_MAX = 16384


def _id(*parts: str) -> str:
    return f"{ORIGIN}:" + ":".join(parts)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _file_url(path: Path | str) -> str:
    return Path(path).resolve().as_uri()


def _git(tree: Path, *args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True,
                              timeout=60, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _image_manifest(cfg: Config) -> dict[str, Any]:
    """The guest image's manifest when it is in the cache (after a run it is)."""
    from viommu_backend.guest.image import cached_image

    try:
        img = cached_image(cfg.kernel, cfg.guest.modules)
    except Exception:  # noqa: BLE001 - no manifest: the objects carry less detail
        return {}
    return dict(img.manifest) | {"directory": str(img.directory)} if img is not None else {}


def checkout_for(kernel: KernelConfig, manifest: Mapping[str, Any], started: str) -> dict[str, Any]:
    """The KCIDB checkout of a guest kernel's source."""
    obj: dict[str, Any] = {"origin": ORIGIN, "start_time": started, "valid": True}
    if kernel.source is not None:
        head = _git(kernel.source, "rev-parse", "HEAD")
        obj["tree_name"] = kernel.source.name
        obj["comment"] = f"tree {kernel.source}"
        if len(head) == 40:
            obj["git_commit_hash"] = head
            obj["git_commit_name"] = _git(kernel.source, "describe", "--always", "--tags") or head[:12]
            branch = _git(kernel.source, "rev-parse", "--abbrev-ref", "HEAD")
            if branch and branch != "HEAD":
                obj["git_repository_branch"] = branch
            url = _git(kernel.source, "remote", "get-url", "origin")
            if url.startswith("https://"):
                obj["git_repository_url"] = url
        identity = f"tree {kernel.source} {head}"
    elif kernel.build is not None:
        version = (manifest.get("kernel_build") or {}).get("source_version", "")
        obj["tree_name"] = f"debian-linux-source-{kernel.build}"
        obj["comment"] = f"Debian linux-source-{kernel.build} {version}".strip()
        identity = f"debian linux-source-{kernel.build} {version}"
    elif kernel.image is not None:
        obj["tree_name"] = "user-image"
        obj["comment"] = f"prebuilt Image {kernel.image}"
        identity = f"image {kernel.image} {manifest.get('kernel_version', '')}"
    else:
        pkg = f"linux-image-{kernel.flavour}"
        version = (manifest.get("packages") or {}).get(pkg, "")
        obj["tree_name"] = f"debian-{kernel.suite}"
        obj["comment"] = f"Debian {kernel.suite} {pkg} {version}".strip()
        identity = f"debian {kernel.suite} {pkg} {version}"
    obj["id"] = _id("checkout", _digest(identity))
    return obj


def build_for(cfg: Config, manifest: Mapping[str, Any], checkout_id: str) -> dict[str, Any]:
    """The KCIDB build: the source + config fragments as built into the guest image."""
    from viommu_backend.guest.image import recipe_hash
    from viommu_backend.guest.kernel import fragments

    kernel = cfg.kernel
    obj: dict[str, Any] = {"origin": ORIGIN, "checkout_id": checkout_id, "architecture": "arm64"}
    try:
        key = recipe_hash(kernel, cfg.guest.modules)
    except Exception:  # noqa: BLE001 - e.g. a vanished user Image: still a build, failed
        key = _digest(kernel.describe() + ",".join(cfg.guest.modules))
    obj["id"] = _id("build", key)
    record = manifest.get("kernel_build") or {}
    if kernel.built:
        frags = fragments(kernel)
        obj["config_name"] = "+".join(["tinyconfig", *(f.name for f in frags)])
        obj["input_files"] = [{"name": f.name, "url": _file_url(f)} for f in frags]
        if record.get("compiler"):
            obj["compiler"] = record["compiler"]
        obj["command"] = ("make ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu- tinyconfig; "
                          "merge_config.sh -m .config " + " ".join(f.name for f in frags)
                          + "; make olddefconfig; make Image modules")
    elif kernel.image is None:
        obj["config_name"] = f"debian {kernel.flavour}"
    else:
        obj["config_name"] = "user image"
    image_dir = manifest.get("directory")
    obj["status"] = "PASS" if manifest else "FAIL"
    obj["comment"] = f"guest kernel {manifest.get('kernel_version', '?')} ({kernel.describe()})"
    obj["misc"] = {k: manifest[k] for k in ("kernel_version", "kernel_source", "modules", "programs")
                   if k in manifest} | ({"config_mismatches": record["config_mismatches"]}
                                        if record.get("config_mismatches") else {})
    if image_dir:
        obj["output_files"] = [{"name": n, "url": _file_url(Path(image_dir) / n)} for n in ("Image", "initrd.gz")]
    return obj


def run_tests(run_id: str, slug: str, result: Any, build_id: str, environment: dict[str, Any]
              ) -> list[dict[str, Any]]:
    """The run as a whole (path ``viommu``) and each of its checks."""
    log = Path(result.workdir) / "boot.log" if result.workdir else None
    common = {"origin": ORIGIN, "build_id": build_id, "environment": environment}
    if log is not None and log.is_file():
        common["log_url"] = _file_url(log)
    whole = common | {
        "id": _id(run_id, slug), "path": ROOT, "status": "PASS" if result.ok else "FAIL",
        "comment": result.name, "duration": round(float(result.duration), 3),
        "misc": {"counters": result.counters, "domain_type": result.domain_type,
                 "kernel": result.kernel, "driver": result.driver},
    }
    if not result.ok:
        whole["log_excerpt"] = (result.error or result.reason)[:EXCERPT_MAX]
    out = [whole]
    for c in (Check.from_json(x) for x in result.checks):
        t: dict[str, Any] = common | {"id": _id(run_id, slug, c.path), "path": c.path, "status": c.status,
                                      "comment": f"{result.name}: {c.detail}"[:1000] if c.detail else result.name}
        if c.value is not None and c.status in ("PASS", "FAIL"):
            t["number"] = {"value": float(c.value)} | ({"unit": c.unit} if c.unit else {})
        if c.status == "FAIL" and c.detail:
            t["log_excerpt"] = c.detail[:EXCERPT_MAX]
        out.append(t)
    return out


def kcidb_report(matrix: Any, runs: Sequence[Any], results: Sequence[Any], *,
                 started: dt.datetime | None = None,
                 manifest_of: Callable[[Config], dict[str, Any]] = _image_manifest) -> dict[str, Any]:
    """KCIDB I/O data for one matrix run: ``runs`` (matrix.Run) and their ``results``
    (matrix.RunResult), in the same order; ``manifest_of(config)``: the guest image's
    manifest ({} when there is none: the build is FAIL)."""
    started = started or dt.datetime.now(dt.timezone.utc)
    stamp = started.astimezone(dt.timezone.utc).isoformat(timespec="seconds")
    run_id = f"{matrix.name}-{started.astimezone(dt.timezone.utc):%Y%m%dT%H%M%SZ}-{_digest(stamp + matrix.source)[:6]}"
    checkouts: dict[str, dict[str, Any]] = {}
    builds: dict[str, dict[str, Any]] = {}
    tests: list[dict[str, Any]] = []
    for run, result in zip(runs, results, strict=True):
        manifest = manifest_of(run.config)
        co = checkout_for(run.config.kernel, manifest, stamp)
        checkouts.setdefault(co["id"], co)
        b = build_for(run.config, manifest, co["id"])
        builds.setdefault(b["id"], b)
        env = {"comment": f"QEMU virt (TCG) + viommu-backend SMMUv3, matrix {matrix.name} run {run.name}",
               "misc": {"matrix": matrix.name, "run": run.name, "choice": dict(run.choice),
                        "overrides": json.loads(json.dumps(run.overrides, default=str))}}
        tests += run_tests(run_id, run.slug, result, b["id"], env)
    return {"version": dict(SCHEMA_VERSION), "checkouts": list(checkouts.values()),
            "builds": list(builds.values()), "tests": tests}


def write_kcidb(path: Path, data: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
