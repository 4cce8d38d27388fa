"""Command line: ``viommu-backend serve``, ``boot``, ``matrix`` and ``bisect``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import asyncio
import logging
import shutil
import signal
import socket
import tempfile
import sys
from pathlib import Path

from viommu_backend.config import Config, ConfigError, load_config, load_default


def _trace_categories(text: str) -> tuple[str, ...]:
    from viommu_backend.trace import TraceError, parse_categories

    try:
        return parse_categories(text)
    except TraceError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="viommu-backend",
                                 description="Out-of-process Arm SMMUv3 vIOMMU for QEMU (vfio-user)")
    ap.add_argument("-v", "--verbose", action="count", default=0)
    sub = ap.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve the IOMMU and endpoint functions over vfio-user")
    where = s.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket-dir", type=Path,
                       help="DIR/viommu.sock is the IOMMU function; DIR/<name>.sock each endpoint")
    where.add_argument("--socket-path", type=Path, metavar="PATH",
                       help="serve one function (--function) on this UNIX socket path "
                            "(vfio-user backend program conventions)")
    where.add_argument("--fd", type=int, metavar="FDNUM",
                       help="serve one function (--function) on this UNIX socket, listening or "
                            "connected (vfio-user backend program conventions)")
    s.add_argument("--function", metavar="NAME",
                   help="with --socket-path / --fd: the function to serve (default: the IOMMU "
                        "function, or the config's only function)")
    s.add_argument("--qmp", type=Path, help="QMP control socket path")
    s.add_argument("--config", type=Path, help="machine/device TOML (default: embedded)")
    s.add_argument("--trace", type=_trace_categories, default=(), metavar="CAT[,CAT...]",
                   help="trace categories on from the start (reg, cmd, event, priq, gerror, "
                        "irq, domain, fault, all); read with QMP query-viommu-trace")

    d = sub.add_parser("describe", help="print (or --install) the vfio-user backend description JSON")
    d.add_argument("--install", type=Path, nargs="?", const=Path("/usr/share/vfio-user"), metavar="DIR",
                   help="write DIR/viommu-backend.json (default DIR: /usr/share/vfio-user)")

    b = sub.add_parser("boot", help="boot a guest against the backend and run the workload")
    b.add_argument("--config", type=Path, help="machine/device TOML (default: embedded)")
    b.add_argument("--keep-running", action="store_true",
                   help="leave the guest up; print the QMP sockets")
    b.add_argument("--workload", help="override the guest workload (comma-separated)")
    b.add_argument("--report", type=Path, metavar="DIR",
                   help="write an HTML report with plots (trace, queues, commands, events, tables) into DIR")
    b.add_argument("--logs", type=Path, metavar="DIR",
                   help="keep the console and server logs (and sockets) in DIR; without it a "
                        "temporary folder is used and removed after a successful run")

    m = sub.add_parser("matrix", help="boot guests over a configuration matrix (driver regression run)")
    m.add_argument("matrix", type=Path, help="matrix TOML (e.g. qemu_configs/matrix-smoke.toml)")
    m.add_argument("--only", action="append", default=[], metavar="AXIS=VALUE",
                   help="run only these values of an axis (repeatable; VALUE may be a,b)")
    m.add_argument("--list", action="store_true", help="show the expanded runs; boot nothing")
    m.add_argument("--output", type=Path, metavar="DIR",
                   help="write DIR/results.json, DIR/junit.xml and keep DIR/runs/<run>/ logs")
    m.add_argument("--timeout", type=float, help="seconds per run (default: the matrix's)")
    m.add_argument("--jobs", "-j", type=_positive_int, default=1, metavar="N",
                   help="boot N runs at a time (default 1; README: N=2 on two cores)")
    m.add_argument("--kcidb", type=Path, metavar="FILE",
                   help="write the results as KCIDB objects (checkouts, builds, tests) to FILE")
    m.add_argument("--lava", type=Path, metavar="DIR",
                   help="write one LAVA job definition per run into DIR (also with --list)")
    m.add_argument("--lava-repo", metavar="URL",
                   help="the git URL LAVA jobs clone this project from (default: this checkout's origin)")
    m.add_argument("--report", type=Path, metavar="DIR",
                   help="write an HTML report (a page per run with plots, and the matrix page) into DIR")
    bi = sub.add_parser("bisect", help="git bisect a kernel tree ([kernel] source) on one check, a boot per step")
    bi.add_argument("good", help="a commit where the check passes")
    bi.add_argument("bad", help="a commit where it fails")
    bi.add_argument("--config", type=Path, required=True, help="machine TOML with [kernel] source = tree")
    bi.add_argument("--check", required=True, metavar="NAME",
                    help="the check that decides, e.g. viommu.blk.bs-4096 (see README: checks)")
    return ap


async def _serve(args: argparse.Namespace) -> int:
    from viommu_backend.app import Backend

    config = _config(args.config)
    sockets = None if args.socket_dir is not None else {_served_function(config, args.function):
                                                        _convention_socket(args)}
    backend = Backend(config, args.socket_dir, qmp_path=args.qmp, trace=args.trace, sockets=sockets)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # before the sockets appear: a peer may
        loop.add_signal_handler(sig, stop.set)    # stop us as soon as it sees them
    await backend.start()
    print(f"viommu-backend: serving {', '.join(backend.socket_paths())}"
          + (f"; QMP at {args.qmp}" if args.qmp else ""), flush=True)
    try:
        await stop.wait()
    finally:
        await backend.close()
    return 0


def _describe(args: argparse.Namespace) -> int:
    from viommu_backend.conventions import backend_description, install_description

    binary = shutil.which("viommu-backend") or f"{sys.executable} -m viommu_backend"
    if args.install is None:
        print(json.dumps(backend_description(binary), indent=2))
    else:
        print(f"viommu-backend: wrote {install_description(args.install, binary)}")
    return 0


def _served_function(config: Config, name: str | None) -> str:
    """--function, or the function a one-device backend program serves by default."""
    if name is not None:
        if name not in {fc.name for fc in config.functions}:
            raise ConfigError(f"--function {name}: no such function in {config.source}")
        return name
    iommus = config.iommu_functions()
    if len(iommus) == 1:
        return iommus[0].name
    if len(config.functions) == 1:
        return config.functions[0].name
    raise ConfigError("--socket-path / --fd serve one function: name it with --function")


def _convention_socket(args: argparse.Namespace) -> Path | socket.socket:
    if args.socket_path is not None:
        return args.socket_path
    try:
        sock = socket.socket(fileno=args.fd)
    except OSError as e:
        raise ConfigError(f"--fd {args.fd}: not a usable socket: {e.strerror or e}") from None
    if sock.family != socket.AF_UNIX:
        raise ConfigError(f"--fd {args.fd}: not a UNIX domain socket")
    return sock


def _config(path: Path | None) -> Config:
    return load_config(path) if path is not None else load_default()


def _boot(args: argparse.Namespace) -> int:
    from viommu_backend.guest.boot import run_boot_interruptible

    config = _config(args.config)
    if args.workload:
        config = dataclasses.replace(
            config, guest=dataclasses.replace(config.guest, workload=args.workload))
    workdir = args.logs if args.logs is not None else Path(tempfile.mkdtemp(prefix="viommu-boot-"))
    report = None
    if args.report is not None:
        from viommu_backend.report.collect import ReportCollector

        report = ReportCollector()
    try:  # SIGINT / SIGTERM: QEMU and the server are stopped, then exit 130
        summary = asyncio.run(run_boot_interruptible(
            config, keep_running=args.keep_running, workdir=workdir,
            **({} if report is None else {"server_argv": report.server_argv(), "on_marker": report.on_marker})))
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 130
    if report is not None:
        from viommu_backend.report.html import write_boot_report

        print(f"[boot] report: {write_boot_report(args.report, report.data, summary)}")
    if summary.ok and args.logs is None:
        shutil.rmtree(workdir, ignore_errors=True)
        print("  (logs removed after the successful run; --logs DIR keeps them)")
    return 0 if summary.ok else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    sys.stdout.reconfigure(line_buffering=True)  # progress lines as they happen, also into a pipe
    try:
        if args.command == "serve":
            return asyncio.run(_serve(args))
        if args.command == "boot":
            return _boot(args)
        if args.command == "describe":
            return _describe(args)
        if args.command == "bisect":
            from viommu_backend.kci.bisect import main_bisect

            return main_bisect(args.good, args.bad, load_config(args.config), args.check)
        if args.command == "matrix":
            from viommu_backend.kci.outputs import KciOutputs
            from viommu_backend.matrix import main_matrix

            return main_matrix(args.matrix, only=args.only, list_only=args.list, output=args.output,
                               timeout=args.timeout, verbose=args.verbose > 0, jobs=args.jobs,
                               outputs=KciOutputs(args.kcidb, args.lava, args.report, args.lava_repo))
    except ConfigError as e:
        print(f"viommu-backend: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2
