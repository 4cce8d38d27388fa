"""Machine + device description (TOML), validated into plain dataclasses.

A config file describes the QEMU machine (memory, cpus), the guest kernel, the guest
workload and the backend's PCI functions: the IOMMU function (kind ``smmuv3``, named
``viommu`` by convention) and DMA endpoints.  Each function sits either on bus 0 at a
slot, or behind a named ``pcie-root-port`` (so that it can be hot-plugged after boot).
Several endpoints may share a slot (or a root port) as functions ``func`` 0-7 of one
multi-function device; function 0 must be among them (Linux scans a slot from it).

Several SMMU functions may each translate one PCIe root complex (``root_complex``: the
machine's ``pcie.0`` or a ``pxb-pcie`` ``[[expander]]``, on whose root bus root ports
sit with ``bus``); an endpoint is behind the SMMU of the root complex its root port is on
(viommu_backend.topology).

The embedded default is ``viommu_backend/data/default.toml`` (a copy of
``qemu_configs/default.toml``), loaded with :func:`load_default`.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from viommu_backend.smmuv3.smmu_config import SmmuConfig

FUNCTION_KINDS = ("smmuv3", "testdev", "virtio-blk")
KERNEL_SUITES = ("trixie", "sid")
IOMMU_ROUTES = ("reprobe", "module")
ROUTE_MODULE = "viommu_smmu"  # guest_images/modules/viommu_smmu: route 2
# [kernel] build = "<ver>": Debian's linux-source-<ver> package, from this release
DEBIAN_SOURCES = {"6.12": "trixie", "7.3": "trixie-backports"}
# QEMU's AArch64 CPU models under TCG and the PA range each reports (ID_AA64MMFR0_EL1
# .PARange, as bits), from QEMU's target/arm/cpu64.c and target/arm/tcg/cpu64.c; all have
# 16-bit ASIDs.  The stock driver enables SVA only when the SMMU's OAS covers the CPU's PA
# range (sva_blockers).  `max` (the default: every feature TCG has) reports 52 bits
# (FEAT_LPA); a real system pairs such a CPU with an SMMU of OAS 52 (smmuv3 option
# oas_bits = 52).  For SVA the project's configs use neoverse-n1 instead: 48-bit PA and
# FEAT_HAFDBS, the CPU of real SMMUv3 (MMU-600) systems whose OAS is 48 like this SMMU's
# default, and cheaper to emulate than max (no pointer authentication, SVE, SME).
CPU_PA_BITS = {"max": 52, "cortex-a35": 40, "cortex-a53": 40, "cortex-a55": 40,
               "cortex-a57": 44, "cortex-a72": 44, "cortex-a76": 40, "cortex-a78ae": 48,
               "cortex-a710": 40, "a64fx": 40, "neoverse-n1": 48, "neoverse-v1": 48,
               "neoverse-n2": 48}
CPU_ASID_BITS = 16
# options of a smmuv3 function that are not SmmuConfig fields (host_s2 / host_pa: the
# host's side of a hidden stage 2, see viommu_backend.app.host_options)
SMMU_FUNCTION_KEYS = ("bar0_size", "stream_id", "host_s2", "host_pa")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,30}$")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class ConfigError(ValueError):
    """A config file is malformed; the message names the file and the offending key."""


@dataclass(frozen=True)
class MachineConfig:
    memory: int = 1 << 30  # bytes
    cpus: int = 2
    # QEMU -cpu model (TCG), a key of CPU_PA_BITS.  "max" (default) has a 52-bit PA range,
    # more than the SMMU's default 48-bit OAS, so Linux will not share CPU page tables with
    # it (no SVA); "neoverse-n1" (48-bit PAs, 16-bit ASIDs, HA/HD) pairs with it as real
    # SoCs do.
    cpu: str = "max"
    extra_args: tuple[str, ...] = ()  # appended verbatim to the QEMU command line


@dataclass(frozen=True)
class KernelConfig:
    """Where the guest kernel comes from: Debian's packaged kernel (``suite``,
    ``flavour``), a prebuilt ``image`` (+ ``modules``), or built from source: Debian's
    ``linux-source-<build>`` or a user's ``source`` tree, with extra config ``fragments``."""

    suite: str = "trixie"
    flavour: str = "cloud-arm64"
    image: Path | None = None  # user-supplied uncompressed arm64 Image
    modules: Path | None = None  # user-supplied folder of modules (lib/modules/<ver>)
    build: str | None = None  # a key of DEBIAN_SOURCES
    source: Path | None = None  # a user's Linux tree
    fragments: tuple[Path, ...] = ()  # config fragments merged after the project's

    @property
    def built(self) -> bool:
        """Built from source by the project (guest/kernel.py)."""
        return self.build is not None or self.source is not None

    def describe(self) -> str:
        if self.build is not None:
            return f"built {self.build}"
        if self.source is not None:
            return f"tree {self.source}"
        if self.image is not None:
            return f"image {self.image}"
        return f"{self.suite} {self.flavour}"


@dataclass(frozen=True)
class GuestConfig:
    workload: str = "enumerate"
    cmdline: str = ""  # extra kernel command-line words
    timeout: float = 300.0  # seconds of wall time for the whole guest run
    modules: tuple[str, ...] = ()  # guest kernel modules to insmod at boot (by name)
    # regexes of guest kernel warnings/errors the workload provokes on purpose (e.g. the
    # driver's report of a fault a check injects): they do not fail the run
    expect_kmsg: tuple[str, ...] = ()


@dataclass(frozen=True)
class IommuConfig:
    device_tree: bool = True  # add the arm,smmu-v3 node to the guest DT
    # how the stock driver gets the registers: "reprobe" (route 1: the node at the
    # predicted BAR address, probed again once the function decodes) or "module" (route 2:
    # the node starts disabled; the guest module viommu_smmu points it at BAR0 and enables
    # it through an OF changeset; needs a kernel built with OF_DYNAMIC)
    route: str = "reprobe"
    iommu_map_base: int = 0x100  # first RID of pcie.0 translated (bus 1 onwards; expanders:
    # the bus after their root bus, see viommu_backend.topology)
    ats: bool = False  # the DT says the root complex supports ATS ("ats-supported")
    # the DT says the SMMU is coherent ("dma-coherent", else "dma-noncoherent"): Linux's
    # arm-smmu-v3 takes its coherency (ARM_SMMU_FEAT_COHERENCY) from firmware, not IDR0.COHACC
    dma_coherent: bool = True


MAIN_ROOT_COMPLEX = "pcie.0"  # the virt machine's own PCIe host bridge


@dataclass(frozen=True)
class Expander:
    """A ``pxb-pcie`` expander bridge: a second PCIe root complex whose root bus has the
    number ``bus_nr``; it sits at ``slot`` of bus 0 (QEMU routes its INTx through there)."""

    name: str
    slot: int
    bus_nr: int


@dataclass(frozen=True)
class RootPort:
    name: str
    slot: int
    chassis: int
    bus: str = MAIN_ROOT_COMPLEX  # pcie.0 or the name of an expander


@dataclass(frozen=True)
class FunctionConfig:
    name: str
    kind: str
    slot: int | None = None  # on bus 0
    port: str | None = None  # behind this root port
    hotplug: bool = False  # plugged with QMP device_add after boot, not at start
    func: int = 0  # PCI function number in its slot (multi-function devices)
    multifunction: bool = False  # derived: one of several functions of its slot
    first_iommu: bool = True  # derived for smmuv3: the first SMMU function (DIR/viommu.sock)
    bar0_size: int | None = None  # expected BAR0 size (for DT address prediction)
    bar0_64bit: bool | None = None  # BAR0 is a 64-bit BAR (None: smmuv3 yes, others no)
    # smmuv3: the root complex whose endpoints it translates (pcie.0 or an expander)
    root_complex: str = MAIN_ROOT_COMPLEX
    options: dict[str, Any] = field(default_factory=dict)  # kind-specific settings

    @property
    def bar0_is64(self) -> bool:
        return self.bar0_64bit if self.bar0_64bit is not None else self.kind == "smmuv3"

    @property
    def socket_name(self) -> str:
        """DIR/viommu.sock for the (first) IOMMU function (DESIGN), DIR/<name>.sock otherwise."""
        return "viommu.sock" if self.kind == "smmuv3" and self.first_iommu else f"{self.name}.sock"


@dataclass(frozen=True)
class Config:
    machine: MachineConfig
    kernel: KernelConfig
    guest: GuestConfig
    iommu: IommuConfig
    root_ports: tuple[RootPort, ...]
    functions: tuple[FunctionConfig, ...]
    source: str = "<default>"
    expanders: tuple[Expander, ...] = ()
    text: str = ""  # the TOML it was parsed from (handed to the server process)

    def function(self, name: str) -> FunctionConfig:
        for fn in self.functions:
            if fn.name == name:
                return fn
        raise KeyError(name)

    def iommu_function(self) -> FunctionConfig | None:
        """The first SMMU function (the only one in most configurations)."""
        fns = self.iommu_functions()
        return fns[0] if fns else None

    def iommu_functions(self) -> list[FunctionConfig]:
        return [fn for fn in self.functions if fn.kind == "smmuv3"]

    def root_port(self, name: str) -> RootPort:
        for port in self.root_ports:
            if port.name == name:
                return port
        raise KeyError(name)

    def root_complex_of(self, fn: FunctionConfig) -> str:
        """pcie.0, or the expander a function sits under (through its root port)."""
        return self.root_port(fn.port).bus if fn.port is not None else MAIN_ROOT_COMPLEX

    def iommu_of(self, fn: FunctionConfig) -> FunctionConfig | None:
        """The SMMU function that translates the root complex ``fn`` sits on, if any."""
        rc = self.root_complex_of(fn)
        return next((s for s in self.iommu_functions() if s.root_complex == rc), None)

    def boot_functions(self) -> list[FunctionConfig]:
        return [fn for fn in self.functions if not fn.hotplug]

    def hotplug_functions(self) -> list[FunctionConfig]:
        return [fn for fn in self.functions if fn.hotplug]


def parse_size(value: object, where: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a size like 1G or 512M, got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ConfigError(f"{where}: size must be positive, got {value}")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            size = int(m.group(1)) * _UNITS[m.group(2).upper()]
            if size > 0:
                return size
    raise ConfigError(f"{where}: expected a size like 1G or 512M, got {value!r}")


class _Table:
    """A TOML table being validated: typed getters, unknown keys rejected."""

    def __init__(self, data: object, where: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a table, got {type(data).__name__}")
        self.data = data
        self.where = where
        self.used: set[str] = set()

    def get(self, key: str, typ: type | tuple[type, ...], default: Any = None) -> Any:
        self.used.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        types = typ if isinstance(typ, tuple) else (typ,)
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok:
            names = " or ".join(t.__name__ for t in types)
            raise ConfigError(f"{self.where}.{key}: expected {names}, got {value!r}")
        return value

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(f"{self.where}: unknown key(s) {', '.join(unknown)}")


def _name(value: str, where: str) -> str:
    if not _NAME_RE.match(value):
        raise ConfigError(f"{where}: bad name {value!r} (lower-case letters, digits, - _; max 31)")
    return value


def _slot(value: int, where: str) -> int:
    if not 1 <= value <= 31:
        raise ConfigError(f"{where}: slot must be 1..31, got {value}")
    return value


def parse_config(data: dict[str, Any], source: str = "<string>") -> Config:
    """A config document (parsed TOML) as a validated :class:`Config`; :class:`ConfigError`
    names the file and the key (a smmuv3 function's options included)."""
    top = _Table(data, source)
    machine = _machine(top, source)
    kernel = _kernel(top, source)
    guest = _guest(top, source)
    iommu = _iommu(top, source, kernel, guest)
    expanders = _expanders(top, source)
    ports = _root_ports(top, source, expanders)
    functions = [_function(raw, f"{source}: [[function]] #{n + 1}")
                 for n, raw in enumerate(top.get("function", list, []))]
    top.finish()
    functions = _check_topology(ports, functions, source, expanders)
    for fn in _iommus(functions):
        smmu_config(fn, source)
    return Config(machine, kernel, guest, iommu, tuple(ports), tuple(functions), source,
                  expanders=tuple(expanders))


def _machine(top: _Table, source: str) -> MachineConfig:
    m = _Table(top.get("machine", dict, {}), f"{source}: [machine]")
    memory = parse_size(m.get("memory", (str, int), "1G"), m.where + ".memory")
    if memory < (128 << 20) or memory % (1 << 20):
        raise ConfigError(f"{m.where}.memory: need a multiple of 1 MiB and >= 128M")
    cpus = m.get("cpus", int, 2)
    if not 1 <= cpus <= 64:
        raise ConfigError(f"{m.where}.cpus: must be 1..64, got {cpus}")
    cpu = m.get("cpu", str, "max")
    if cpu not in CPU_PA_BITS:
        raise ConfigError(f"{m.where}.cpu: must be one of {', '.join(sorted(CPU_PA_BITS))}, "
                          f"got {cpu!r}")
    extra = m.get("extra_args", list, [])
    if not all(isinstance(a, str) for a in extra):
        raise ConfigError(f"{m.where}.extra_args: must be a list of strings")
    m.finish()
    return MachineConfig(memory=memory, cpus=cpus, cpu=cpu, extra_args=tuple(extra))


def _kernel(top: _Table, source: str) -> KernelConfig:
    k = _Table(top.get("kernel", dict, {}), f"{source}: [kernel]")
    suite = k.get("suite", str, "trixie")
    if suite not in KERNEL_SUITES:
        raise ConfigError(f"{k.where}.suite: must be one of {', '.join(KERNEL_SUITES)}, got {suite!r}")
    flavour = k.get("flavour", str, "cloud-arm64")
    if flavour not in ("cloud-arm64", "arm64"):
        raise ConfigError(f"{k.where}.flavour: must be cloud-arm64 or arm64, got {flavour!r}")
    base = Path(source).parent if source not in ("<string>", "<default>") else Path.cwd()
    image = k.get("image", str)
    modules = k.get("modules", str)
    build = k.get("build", str)
    tree = k.get("source", str)
    frags = k.get("fragments", list, [])
    k.finish()
    if modules is not None and image is None:
        raise ConfigError(f"{k.where}: 'modules' needs 'image' too")
    if sum(x is not None for x in (image, build, tree)) > 1:
        raise ConfigError(f"{k.where}: give at most one of 'image' (prebuilt), 'build' (Debian's "
                          "linux-source) or 'source' (a Linux tree)")
    if build is not None and build not in DEBIAN_SOURCES:
        raise ConfigError(f"{k.where}.build: must be one of {', '.join(DEBIAN_SOURCES)}, got {build!r}")
    if not all(isinstance(f, str) for f in frags):
        raise ConfigError(f"{k.where}.fragments: must be a list of file names")
    if frags and build is None and tree is None:
        raise ConfigError(f"{k.where}.fragments: only for kernels built from source ('build' or 'source')")
    return KernelConfig(
        suite=suite,
        flavour=flavour,
        image=(base / image).resolve() if image else None,
        modules=(base / modules).resolve() if modules else None,
        build=build,
        source=(base / tree).resolve() if tree else None,
        fragments=tuple((base / f).resolve() for f in frags),
    )


def _guest(top: _Table, source: str) -> GuestConfig:
    g = _Table(top.get("guest", dict, {}), f"{source}: [guest]")
    workload = g.get("workload", str, "enumerate")
    if not re.fullmatch(r"[a-z0-9_,:-]+", workload):
        raise ConfigError(f"{g.where}.workload: comma-separated names [a-z0-9_-] (name:arg for an "
                          f"argument), got {workload!r}")
    cmdline = g.get("cmdline", str, "")
    timeout = float(g.get("timeout", (int, float), 300))
    if timeout <= 0:
        raise ConfigError(f"{g.where}.timeout: must be positive")
    gmods = g.get("modules", list, [])
    if not all(isinstance(x, str) and re.fullmatch(r"[A-Za-z0-9_-]+", x) for x in gmods):
        raise ConfigError(f"{g.where}.modules: must be a list of module names")
    expect = g.get("expect_kmsg", list, [])
    for pat in expect:
        try:
            re.compile(pat) if isinstance(pat, str) else None
        except re.error as e:
            raise ConfigError(f"{g.where}.expect_kmsg: bad regex {pat!r}: {e}") from None
    if not all(isinstance(x, str) for x in expect):
        raise ConfigError(f"{g.where}.expect_kmsg: must be a list of regexes")
    g.finish()
    return GuestConfig(workload=workload, cmdline=cmdline, timeout=timeout, modules=tuple(gmods),
                       expect_kmsg=tuple(expect))


def _iommu(top: _Table, source: str, kernel: KernelConfig, guest: GuestConfig) -> IommuConfig:
    i = _Table(top.get("iommu", dict, {}), f"{source}: [iommu]")
    iommu = IommuConfig(
        device_tree=i.get("device_tree", bool, True),
        iommu_map_base=i.get("iommu_map_base", int, 0x100),
        ats=i.get("ats", bool, False),
        dma_coherent=i.get("dma_coherent", bool, True),
        route=i.get("route", str, "reprobe"),
    )
    i.finish()
    if iommu.route not in IOMMU_ROUTES:
        raise ConfigError(f"{i.where}.route: must be one of {', '.join(IOMMU_ROUTES)}, got {iommu.route!r}")
    if iommu.route == "module" and (not kernel.built or ROUTE_MODULE not in guest.modules):
        raise ConfigError(f"{i.where}.route = \"module\" needs a kernel built from source ([kernel] build "
                          f"or source: OF_DYNAMIC) and [guest] modules with {ROUTE_MODULE!r}")
    return iommu


def _expanders(top: _Table, source: str) -> list[Expander]:
    expanders: list[Expander] = []
    for n, raw in enumerate(top.get("expander", list, [])):
        t = _Table(raw, f"{source}: [[expander]] #{n + 1}")
        name, slot, bus_nr = t.get("name", str), t.get("slot", int), t.get("bus_nr", int)
        t.finish()
        if name is None or slot is None or bus_nr is None:
            raise ConfigError(f"{t.where}: needs 'name', 'slot' and 'bus_nr'")
        if not 2 <= bus_nr <= 0xFE:
            raise ConfigError(f"{t.where}.bus_nr: must be 2..254, got {bus_nr}")
        expanders.append(Expander(_name(name, t.where + ".name"), _slot(slot, t.where + ".slot"), bus_nr))
    return expanders


def _root_ports(top: _Table, source: str, expanders: list[Expander]) -> list[RootPort]:
    ports: list[RootPort] = []
    for n, raw in enumerate(top.get("root_port", list, [])):
        t = _Table(raw, f"{source}: [[root_port]] #{n + 1}")
        name = t.get("name", str)
        slot = t.get("slot", int)
        if name is None or slot is None:
            raise ConfigError(f"{t.where}: needs 'name' and 'slot'")
        chassis = t.get("chassis", int, n + 1)
        bus = t.get("bus", str, MAIN_ROOT_COMPLEX)
        t.finish()
        if bus != MAIN_ROOT_COMPLEX and bus not in {e.name for e in expanders}:
            raise ConfigError(f"{t.where}.bus: {MAIN_ROOT_COMPLEX} or an [[expander]] name, got {bus!r}")
        if not 0 <= slot <= 31 or (bus == MAIN_ROOT_COMPLEX and slot == 0):
            raise ConfigError(f"{t.where}.slot: must be 1..31 on {MAIN_ROOT_COMPLEX} (0..31 on an "
                              f"expander), got {slot}")
        ports.append(RootPort(_name(name, t.where + ".name"), slot, chassis, bus))
    return ports


def _function(raw: object, where: str) -> FunctionConfig:
    t = _Table(raw, where)
    name = t.get("name", str)
    kind = t.get("kind", str)
    if name is None or kind is None:
        raise ConfigError(f"{t.where}: needs 'name' and 'kind'")
    _name(name, t.where + ".name")
    if kind not in FUNCTION_KINDS:
        raise ConfigError(f"{t.where}.kind: must be one of {', '.join(FUNCTION_KINDS)}, got {kind!r}")
    slot = t.get("slot", int)
    port = t.get("port", str)
    hotplug = t.get("hotplug", bool, False)
    func = t.get("func", int, 0)
    bar0 = t.get("bar0_size", (int, str))
    bar0_64 = t.get("bar0_64bit", bool)
    root_complex = t.get("root_complex", str, MAIN_ROOT_COMPLEX)
    options = t.get("options", dict, {})
    t.finish()
    if "root_complex" in t.data and kind != "smmuv3":
        raise ConfigError(f"{t.where}.root_complex ({name}): only for a smmuv3 function (an endpoint "
                          "sits behind the SMMU of the root complex its root port is on)")
    if (slot is None) == (port is None):
        raise ConfigError(f"{t.where} ({name}): give exactly one of 'slot' (bus 0) or 'port' (root port)")
    if slot is not None:
        _slot(slot, t.where + ".slot")
    if hotplug and port is None:
        raise ConfigError(f"{t.where} ({name}): hotplug needs a 'port' (a pcie-root-port)")
    if not 0 <= func <= 7:
        raise ConfigError(f"{t.where}.func ({name}): a PCI function number is 0..7, got {func}")
    return FunctionConfig(
        name=name,
        kind=kind,
        slot=slot,
        port=port,
        hotplug=hotplug,
        func=func,
        bar0_size=parse_size(bar0, t.where + ".bar0_size") if bar0 is not None else None,
        bar0_64bit=bar0_64,
        root_complex=root_complex,
        options=dict(options),
    )


def smmu_config(fn: FunctionConfig, source: str = "", **overrides: Any) -> SmmuConfig:
    """The :class:`~viommu_backend.smmuv3.smmu_config.SmmuConfig` a smmuv3 function's options
    describe (:data:`SMMU_FUNCTION_KEYS` are the function's, not the SMMU's), with
    ``overrides`` on top; :class:`ConfigError` naming the function for a bad option."""
    from viommu_backend.smmuv3.smmu_config import SmmuConfig

    opts = {k: v for k, v in fn.options.items() if k not in SMMU_FUNCTION_KEYS}
    try:
        return SmmuConfig.from_dict({**opts, **overrides})
    except (TypeError, ValueError) as e:
        where = f"{source}: " if source else ""
        raise ConfigError(f"{where}function {fn.name}: bad SMMU option: {e}") from None


def _iommus(functions: list[FunctionConfig]) -> list[FunctionConfig]:
    return [fn for fn in functions if fn.kind == "smmuv3"]


def _check_expanders(expanders: list[Expander], ports: list[RootPort], functions: list[FunctionConfig],
                     source: str) -> None:
    """Expanders: distinct root bus numbers far enough apart for their root ports; each
    root complex translated by at most one SMMU."""
    by_bus = sorted(expanders, key=lambda e: e.bus_nr)
    for e, nxt in zip(by_bus, [*by_bus[1:], None]):
        end = nxt.bus_nr if nxt is not None else 0x100
        need = 1 + sum(p.bus == e.name for p in ports)
        if e.bus_nr + need > end:
            raise ConfigError(f"{source}: expander {e.name!r} (bus_nr {e.bus_nr}) needs buses "
                              f"{e.bus_nr}..{e.bus_nr + need - 1}, the next root complex starts at {end}")
    low = by_bus[0].bus_nr if by_bus else 0x100
    if 1 + sum(p.bus == MAIN_ROOT_COMPLEX for p in ports) > low:
        raise ConfigError(f"{source}: the root ports of {MAIN_ROOT_COMPLEX} need buses below the "
                          f"first expander's bus_nr {low}")
    complexes = {MAIN_ROOT_COMPLEX, *(e.name for e in expanders)}
    seen: dict[str, str] = {}
    for fn in _iommus(functions):
        if fn.root_complex not in complexes:
            raise ConfigError(f"{source}: smmuv3 function {fn.name!r}: root_complex must be one of "
                              f"{', '.join(sorted(complexes))}, got {fn.root_complex!r}")
        other = seen.setdefault(fn.root_complex, fn.name)
        if other != fn.name:
            raise ConfigError(f"{source}: root complex {fn.root_complex!r} is translated by both "
                              f"{other!r} and {fn.name!r} (one SMMU per root complex)")


def _check_topology(ports: list[RootPort], functions: list[FunctionConfig], source: str,
                    expanders: list[Expander]) -> list[FunctionConfig]:
    """Validate where everything sits; return the functions with ``multifunction`` set."""
    names: set[str] = {MAIN_ROOT_COMPLEX}
    for obj in [*expanders, *ports, *functions]:
        if obj.name in names:
            raise ConfigError(f"{source}: name {obj.name!r} used twice")
        names.add(obj.name)
    _check_expanders(expanders, ports, functions, source)
    chassis = [p.chassis for p in ports]
    if len(set(chassis)) != len(chassis):
        raise ConfigError(f"{source}: root-port chassis numbers must be unique")
    port_names = {p.name for p in ports}
    for fn in functions:
        if fn.port is not None and fn.port not in port_names:
            raise ConfigError(f"{source}: function {fn.name!r} names unknown root port {fn.port!r}")
    slots = _slots(ports, functions, source, expanders)
    lines: dict[int, str] = {}
    for smmu in _iommus(functions):
        if smmu.slot is None:
            raise ConfigError(f"{source}: the smmuv3 function {smmu.name!r} must sit on bus 0 (slot)")
        if len(slots[("slot", smmu.slot)]) > 1:
            raise ConfigError(f"{source}: the smmuv3 function {smmu.name!r} must be alone in its slot")
        # virt wires INTA of bus-0 slot s to GIC SPI 3 + s % 4; arm-smmu-v3 requests its
        # combined IRQ unshared, so two SMMUs on one line leave the second without interrupts
        other = lines.setdefault(smmu.slot % 4, smmu.name)
        if other != smmu.name:
            raise ConfigError(f"{source}: smmuv3 functions {other!r} and {smmu.name!r} would share an INTx "
                              f"line (bus 0 slots equal modulo 4): give them slots that differ modulo 4")
    multi = {fn.name for fns in slots.values() if len(fns) > 1 for fn in fns}
    first = next((fn.name for fn in _iommus(functions)), None)
    return [dataclasses.replace(fn, multifunction=fn.name in multi, first_iommu=fn.name == first)
            for fn in functions]


def _slots(ports: list[RootPort], functions: list[FunctionConfig], source: str,
           expanders: list[Expander]) -> dict[tuple[str, object], list[FunctionConfig]]:
    """(``slot``, n) on bus 0 or (``port``, name) -> its functions, function 0 first;
    checks that functions of one slot differ, that function 0 is there, and that a
    multi-function slot is not hot-plugged."""
    slots: dict[tuple[str, object], list[FunctionConfig]] = {}
    for fn in functions:
        where = ("slot", fn.slot) if fn.slot is not None else ("port", fn.port)
        slots.setdefault(where, []).append(fn)
    bus0 = [*((p.slot, p.name) for p in ports if p.bus == MAIN_ROOT_COMPLEX),
            *((e.slot, e.name) for e in expanders)]
    for slot, name in bus0:
        if ("slot", slot) in slots:
            raise ConfigError(f"{source}: bus 0 slot {slot} used by both {name!r} and "
                              f"{slots[('slot', slot)][0].name!r}")
    if len({s for s, _ in bus0}) != len(bus0):
        raise ConfigError(f"{source}: two root ports or expanders share a bus 0 slot")
    if len({(p.bus, p.slot) for p in ports}) != len(ports):
        raise ConfigError(f"{source}: two root ports share a slot of one root bus")
    for (kind, where), fns in slots.items():
        fns.sort(key=lambda f: f.func)
        label = f"root port {where!r}" if kind == "port" else f"bus 0 slot {where}"
        for a, b in zip(fns, fns[1:]):
            if a.func == b.func:
                raise ConfigError(f"{source}: {label} used by both {a.name!r} and {b.name!r} (function "
                                  f"{a.func}; distinct 'func' make them one multi-function device)")
        if fns[0].func != 0:
            raise ConfigError(f"{source}: {label} has no function 0 ({fns[0].name!r} is function {fns[0].func})")
        if len(fns) > 1 and any(f.hotplug for f in fns):
            raise ConfigError(f"{source}: {label}: a multi-function device cannot be hot-plugged")
    return slots


def sva_blockers(config: Config) -> list[str]:
    """What keeps the stock arm-smmu-v3 driver (Linux 6.12 arm_smmu_sva_supported) from
    enabling SVA on this machine: a coherent SMMU (per the DT), its OAS at least the CPU's PA range, its
    ASIDs at least as wide as the CPU's, the kernel's 4K pages among its granules (VAX is
    not needed: the project's kernels use 48-bit VAs).  Empty when nothing does."""
    fc = config.iommu_function()
    if fc is None:
        return ["no smmuv3 function"]
    smmu = smmu_config(fc, config.source)
    cpu = config.machine.cpu
    out = []
    if not config.iommu.dma_coherent:  # Linux takes ARM_SMMU_FEAT_COHERENCY from firmware
        out.append("the SMMU is not coherent ([iommu] dma_coherent = false)")
    if smmu.oas_bits < CPU_PA_BITS[cpu]:
        out.append(f"SMMU OAS {smmu.oas_bits} bits < the PA range of cpu {cpu} "
                   f"({CPU_PA_BITS[cpu]} bits): oas_bits = 52, or cpu = \"neoverse-n1\"")
    if not smmu.asid16:
        out.append(f"8-bit SMMU ASIDs, the CPU has {CPU_ASID_BITS}")
    if not smmu.gran4k:
        out.append("no 4K granule (the kernel's page size)")
    return out


def read_file(path: str | Path, what: str, error: type[ConfigError] = ConfigError) -> str:
    """The text of a config-like file; ``error`` naming the file when it cannot be read."""
    try:
        return Path(path).read_text()
    except OSError as e:
        raise error(f"{path}: cannot read {what}: {e.strerror or e}") from None


def parse_toml(text: str, source: str, error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """TOML text as a document; ``error`` naming ``source`` when it is not TOML."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise error(f"{source}: invalid TOML: {e}") from None


def load_config(path: str | Path) -> Config:
    return loads_config(read_file(path, "config"), str(path))


def loads_config(text: str, source: str = "<string>") -> Config:
    return dataclasses.replace(parse_config(parse_toml(text, source), source), text=text)


def default_config_text() -> str:
    return resources.files("viommu_backend").joinpath("data/default.toml").read_text()


def load_default() -> Config:
    return loads_config(default_config_text(), "<default>")
