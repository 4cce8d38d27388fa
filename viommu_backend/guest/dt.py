"""Guest device tree with an ``arm,smmu-v3`` node per IOMMU function (route 1).

The virt machine's DTB is dumped with the same command line (``-machine ...,dumpdtb=F``),
decompiled with ``dtc``, extended with the SMMU node at the address Linux will assign to
the IOMMU function's BAR0 and an ``iommu-map`` on the PCIe host bridge, and compiled again.
At boot the arm-smmu-v3 probe fails (memory decode off); the guest's ``smmu`` workload
enables the PCI function and re-probes the platform device.

With ``pxb-pcie`` expanders (several root complexes) QEMU's DT still has one host bridge
node, and Linux never finds the expanders' buses (the expander is a host-bridge function
on bus 0, not a PCI-PCI bridge: measured, nothing behind it is enumerated).  So the node
is split: the machine's node keeps the buses below the first expander and its share of
the ECAM and of each MMIO / I/O window, and each expander gets a host bridge node of its
own (its buses, ECAM slice, window share, ``linux,pci-domain``; the interrupt-map and
msi-map are the machine's: QEMU routes an expander's INTx through bus 0 with the same
swizzle).  Each node's ``iommu-map`` points at the SMMU that translates that root complex.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from viommu_backend.config import MAIN_ROOT_COMPLEX, Config
from viommu_backend.topology import RootComplex, root_complexes
from viommu_backend.guest.toolroot import QemuCommand, SetupError

# QEMU virt: 32-bit PCI MMIO window, INTx -> GIC SPI mapping
VIRT_PCI_MMIO32_BASE = 0x10000000
VIRT_PCI_MMIO32_END = 0x3EFEFFFF
VIRT_PCI_MMIO64_BASE = 0x80_0000_0000
VIRT_PCI_MMIO64_END = 0xFF_FFFF_FFFF
ROOT_PORT_BAR0_SIZE = 0x1000  # QEMU's pcie-root-port has a 4 KiB BAR0
VIRT_PCI_INTX_SPI_BASE = 3  # INTA..INTD of slot s, pin p -> SPI 3 + (s + p) % 4
SMMU_BAR0_SIZE = 0x20000  # page 0 + page 1 (128 KiB)
HOTPLUG_BRIDGE_WINDOW = 2 << 20  # Linux pci_hotplug_mmio_size default
BRIDGE_WINDOW_ALIGN = 1 << 20


def dtc_path() -> str:
    exe = shutil.which("dtc")
    if not exe:
        raise SetupError("dtc not found: apt-get install device-tree-compiler (scripts/setup does)")
    return exe


def dtc(args: Sequence[str], data: bytes) -> bytes:
    cp = subprocess.run([dtc_path(), "-q", *args], input=data, capture_output=True, timeout=60)
    if cp.returncode:
        raise SetupError(f"dtc {' '.join(args)} failed: {cp.stderr.decode(errors='replace').strip()}")
    return cp.stdout


def dtb_to_dts(dtb: bytes) -> str:
    return dtc(["-I", "dtb", "-O", "dts"], dtb).decode()


def dts_to_dtb(dts: str) -> bytes:
    return dtc(["-I", "dts", "-O", "dtb"], dts.encode())


# --- BAR address prediction ----------------------------------------------------------------
@dataclass(frozen=True)
class _Res:
    name: str
    devfn: int
    size: int
    align: int


def _align_up(v: int, a: int) -> int:
    return (v + a - 1) & ~(a - 1)


def _pow2(v: int) -> int:
    return 1 << (max(v, 1) - 1).bit_length()


def _place(res: list[_Res], base: int, end: int, what: str) -> dict[str, int]:
    res = sorted(res, key=lambda r: (-r.align, r.devfn))
    addr = base
    out: dict[str, int] = {}
    for r in res:
        addr = _align_up(addr, r.align)
        out[r.name] = addr
        addr += r.size
    if addr - 1 > end:
        raise SetupError(f"bus 0 BARs do not fit the virt {what} PCI window")
    return out


def predict_bar0(config: Config) -> dict[str, int]:
    """BAR0 addresses Linux assigns on bus 0 of virt for this topology (functions on bus
    0 with a known ``bar0_size``; the smmuv3 kind defaults to a 128 KiB 64-bit BAR).

    Model of Linux's bus-0 assignment (measured on virt with 6.12): per window,
    resources sorted by alignment (largest first, then devfn), each at the next aligned
    address.  32-bit window (0x10000000): 32-bit BARs, and per pcie-root-port a 2 MiB
    hot-plug memory window plus the port's own 4 KiB BAR0.  64-bit window
    (0x8000000000): 64-bit BARs, and per root port a 2 MiB prefetchable window.
    Measured: a lone 32-bit 128 KiB BAR0 at 00:01.0 -> 0x10000000 (0x10200000 with one
    root port); a 64-bit one with one root port -> 0x8000200000."""
    low: list[_Res] = []
    high: list[_Res] = []
    for port in config.root_ports:
        if port.bus != MAIN_ROOT_COMPLEX:
            continue  # its windows come from its expander's host bridge
        devfn = port.slot << 3
        low.append(_Res(port.name + "/window", devfn, HOTPLUG_BRIDGE_WINDOW, BRIDGE_WINDOW_ALIGN))
        low.append(_Res(port.name, devfn, ROOT_PORT_BAR0_SIZE, ROOT_PORT_BAR0_SIZE))
        high.append(_Res(port.name + "/pref", devfn, HOTPLUG_BRIDGE_WINDOW, BRIDGE_WINDOW_ALIGN))
    for fn in config.functions:
        if fn.slot is None:
            continue
        size = fn.bar0_size or (SMMU_BAR0_SIZE if fn.kind == "smmuv3" else None)
        if size is None:
            continue
        size = _pow2(size)
        (high if fn.bar0_is64 else low).append(_Res(fn.name, fn.slot << 3 | fn.func, size, size))
    out = _place(low, VIRT_PCI_MMIO32_BASE, VIRT_PCI_MMIO32_END, "32-bit")
    out.update(_place(high, VIRT_PCI_MMIO64_BASE, VIRT_PCI_MMIO64_END, "64-bit"))
    return {fn.name: out[fn.name] for fn in config.functions if fn.name in out}


def intx_spi(slot: int, pin: int = 0) -> int:
    """GIC SPI number of a bus-0 function's INTx on virt (pin 0 = INTA)."""
    return VIRT_PCI_INTX_SPI_BASE + (slot + pin) % 4


# --- DTS editing ------------------------------------------------------------------------------
@dataclass(frozen=True)
class SmmuNode:
    base: int
    size: int = SMMU_BAR0_SIZE
    spi: int = 4
    iommu_map_base: int = 0x100  # first RID translated; RIDs below (bus 0) are not
    iommu_map_end: int = 0x10000  # one past the last RID translated
    root_complex: str = MAIN_ROOT_COMPLEX  # the host bridge whose iommu-map points here
    label: str = "viommu_smmu"
    # route 2: (domain, bus, devfn) of the SMMU function, "viommu,pci-function" for the
    # guest module viommu_smmu to pick this node for that function
    pci_function: tuple[int, int, int] | None = None
    ats: bool = False  # "ats-supported" on the host bridge: the driver may enable ATS
    disabled: bool = False  # route 2: the guest module viommu_smmu enables it at BAR0
    # "dma-coherent" / "dma-noncoherent" (explicit: virt's root node says dma-coherent,
    # which of_dma_is_coherent inherits): the driver's ARM_SMMU_FEAT_COHERENCY
    coherent: bool = True

    @property
    def node_name(self) -> str:
        return f"smmuv3@{self.base:x}"


def find_pcie_node(dts: str) -> str:
    """Path of the ECAM host bridge node (``/pcie@...``) in a decompiled virt DT."""
    for m in re.finditer(r"^\t([\w,.+-]+@[0-9a-f]+) \{\n(.*?)^\t\};", dts, re.M | re.S):
        if '"pci-host-ecam-generic"' in m.group(2):
            return "/" + m.group(1)
    raise SetupError("no pci-host-ecam-generic node in the machine's device tree")


def add_smmus(dts: str, smmus: Sequence[SmmuNode], complexes: Sequence[RootComplex]) -> str:
    """``dts`` plus one node per SMMU and an ``iommu-map`` on the host bridge node of each
    SMMU's root complex; with more than one root complex in ``complexes`` (pcie.0 first),
    the machine's host bridge split into one node per root complex (module docstring).
    Uses dtc's merging of later ``/ { }`` and ``&{/path} { }`` blocks: no text surgery."""
    pcie = find_pcie_node(dts)
    body = re.sub(r"^/dts-v1/;\s*", "", dts.lstrip(), count=1)
    paths = {MAIN_ROOT_COMPLEX: pcie}
    bridges: dict[str, list[str]] = {MAIN_ROOT_COMPLEX: []}
    nodes: list[str] = []
    if len(complexes) > 1:
        node_text = _node_body(dts, pcie)
        ecam_base, _ = _cells_pair(_prop(node_text, "reg"))
        windows = _split_ranges(_prop(node_text, "ranges"), len(complexes))
        for n, rc in enumerate(complexes):
            props = _bridge_props(rc, ecam_base, windows[n])
            if rc.name == MAIN_ROOT_COMPLEX:
                bridges[rc.name] = props
                continue
            name = f"pcie@{ecam_base + (rc.first_bus << 20):x}"
            paths[rc.name] = "/" + name
            bridges[rc.name] = props
            kept = [line for line in node_text.splitlines()
                    if line.strip() and line.split(" =")[0].strip().rstrip(";") not in _SPLIT_PROPS]
            nodes.append(f"\t{name} {{\n" + "\n".join(kept) + "\n\t};\n")
    for smmu in smmus:
        nodes.append(_smmu_node(smmu))
        span = smmu.iommu_map_end - smmu.iommu_map_base
        bridges[smmu.root_complex].append(
            f"iommu-map = <0x{smmu.iommu_map_base:x} &{smmu.label} 0x{smmu.iommu_map_base:x} 0x{span:x}>;")
        if smmu.ats:
            bridges[smmu.root_complex].append("ats-supported;")
    out = "/dts-v1/;\n\n" + body + "\n/ {\n" + "".join(nodes) + "};\n"
    for rc, props in bridges.items():
        if props:
            out += f"\n&{{{paths[rc]}}} {{\n" + "".join(f"\t{p}\n" for p in props) + "};\n"
    return out


def _smmu_node(smmu: SmmuNode) -> str:
    hi, lo = smmu.base >> 32, smmu.base & 0xFFFFFFFF
    return (
        f"\t{smmu.label}: {smmu.node_name} {{\n"
        '\t\tcompatible = "arm,smmu-v3";\n'
        f"\t\treg = <0x{hi:x} 0x{lo:x} 0x{smmu.size >> 32:x} 0x{smmu.size & 0xFFFFFFFF:x}>;\n"
        f"\t\tinterrupts = <0x0 0x{smmu.spi:x} 0x4>;\n"
        '\t\tinterrupt-names = "combined";\n'
        "\t\t#iommu-cells = <0x1>;\n"
        + ("\t\tdma-coherent;\n" if smmu.coherent else "\t\tdma-noncoherent;\n")
        + ('\t\tstatus = "disabled";\n' if smmu.disabled else "")
        + ("\t\tviommu,pci-function = <0x{:x} 0x{:x} 0x{:x}>;\n".format(*smmu.pci_function)
           if smmu.pci_function is not None else "")
        + "\t};\n"
    )


# properties of the machine's host bridge that differ per root complex
_SPLIT_PROPS = ("reg", "ranges", "bus-range", "linux,pci-domain")
_RANGE_ALIGN = {0x1000000: 0x1000, 0x2000000: 1 << 20, 0x3000000: 1 << 20}  # I/O, MEM32, MEM64


def _node_body(dts: str, path: str) -> str:
    m = re.search(rf"^\t{re.escape(path.lstrip('/'))} \{{\n(.*?)^\t\}};", dts, re.M | re.S)
    if m is None:
        raise SetupError(f"no {path} node in the machine's device tree")
    return m.group(1)


def _prop(node_text: str, name: str) -> list[int]:
    m = re.search(rf"^\s*{re.escape(name)} = <([^>]*)>;", node_text, re.M)
    if m is None:
        raise SetupError(f"the host bridge node has no {name} property")
    return [int(c, 0) for c in m.group(1).split()]


def _cells_pair(cells: list[int]) -> tuple[int, int]:
    """(address, size) of a reg with 2 address and 2 size cells."""
    return cells[0] << 32 | cells[1], cells[2] << 32 | cells[3]


def _split_ranges(cells: list[int], parts: int) -> list[list[tuple[int, int, int, int]]]:
    """The host bridge's ``ranges`` (flags, PCI address, CPU address, size per window),
    each window cut into ``parts`` equal aligned pieces: ``[part][window]``."""
    if len(cells) % 7:
        raise SetupError(f"host bridge ranges: {len(cells)} cells, expected 7 per window")
    out: list[list[tuple[int, int, int, int]]] = [[] for _ in range(parts)]
    for i in range(0, len(cells), 7):
        flags, pci, cpu, size = (cells[i], cells[i + 1] << 32 | cells[i + 2],
                                 cells[i + 3] << 32 | cells[i + 4], cells[i + 5] << 32 | cells[i + 6])
        align = _RANGE_ALIGN.get(flags & 0x3000000, 1 << 20)
        piece = size // parts & ~(align - 1)
        for n in range(parts):
            out[n].append((flags, pci + n * piece, cpu + n * piece, piece))
    return out


def _bridge_props(rc: RootComplex, ecam_base: int, windows: list[tuple[int, int, int, int]]) -> list[str]:
    ecam = ecam_base + (rc.first_bus << 20)
    size = (rc.last_bus - rc.first_bus + 1) << 20
    cells = " ".join(f"0x{f:x} 0x{p >> 32:x} 0x{p & 0xFFFFFFFF:x} 0x{c >> 32:x} 0x{c & 0xFFFFFFFF:x} "
                     f"0x{s >> 32:x} 0x{s & 0xFFFFFFFF:x}" for f, p, c, s in windows)
    return [f"reg = <0x{ecam >> 32:x} 0x{ecam & 0xFFFFFFFF:x} 0x{size >> 32:x} 0x{size & 0xFFFFFFFF:x}>;",
            f"ranges = <{cells}>;",
            f"bus-range = <0x{rc.first_bus:x} 0x{rc.last_bus:x}>;",
            f"linux,pci-domain = <0x{rc.domain:x}>;"]


def smmu_nodes_for(config: Config) -> list[SmmuNode]:
    """One node per smmuv3 function (none when the config wants no DT nodes); each maps
    the translated RIDs of its root complex (topology.root_complexes)."""
    if not config.iommu.device_tree:
        return []
    bars = predict_bar0(config)
    complexes = {rc.name: rc for rc in root_complexes(config)}
    route2 = config.iommu.route == "module"
    out = []
    for n, fn in enumerate(config.iommu_functions()):
        assert fn.slot is not None  # validated: the IOMMU sits on bus 0
        rc = complexes[fn.root_complex]
        out.append(SmmuNode(base=bars[fn.name], size=_pow2(fn.bar0_size or SMMU_BAR0_SIZE),
                            spi=intx_spi(fn.slot), iommu_map_base=rc.map_base,
                            iommu_map_end=rc.map_end, root_complex=rc.name,
                            label="viommu_smmu" if n == 0 else f"viommu_smmu{n}",
                            ats=config.iommu.ats, disabled=config.iommu.route == "module",
                            coherent=config.iommu.dma_coherent,
                            pci_function=(0, 0, fn.slot << 3 | fn.func) if route2 else None))
    return out


def cache_key(dump_argv: Sequence[str], *nodes: object) -> str:
    h = hashlib.sha256()
    h.update("\0".join(dump_argv).encode())
    for node in nodes:
        h.update(repr(node).encode())
    return h.hexdigest()[:16]


async def build_guest_dtb(qemu: QemuCommand, config: Config, *, kernel: Path, initrd: Path,
                          socket_dir: Path, cache: Path, cmdline_extra: str = "") -> Path | None:
    """The DTB to boot with (``-dtb``), or None when the config wants no SMMU node.
    Cached under ``<cache>/dtb/<hash of the dump command line + node>.dtb``."""
    from viommu_backend.guest.qemu import qemu_args, run_qemu_to_exit

    smmus = smmu_nodes_for(config)
    if not smmus:
        return None
    complexes = root_complexes(config)
    placeholder = Path("/dev/null/DUMP")
    key_args = qemu_args(config, kernel=kernel, initrd=initrd, socket_dir=socket_dir,
                         cmdline_extra=cmdline_extra, dumpdtb=placeholder)
    key = cache_key([*qemu.argv, *key_args], *smmus, *complexes)
    out = cache / "dtb" / f"{key}.dtb"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    raw = out.with_suffix(".machine.dtb")
    args = qemu_args(config, kernel=kernel, initrd=initrd, socket_dir=socket_dir,
                     cmdline_extra=cmdline_extra, dumpdtb=raw)
    rc, text = await run_qemu_to_exit(qemu, args, timeout=60)
    if not raw.exists() or raw.stat().st_size == 0:
        raise SetupError(f"QEMU did not dump the machine DTB (rc={rc}): {text.strip()[-500:]}")
    dts = add_smmus(dtb_to_dts(raw.read_bytes()), smmus, complexes)
    out.with_suffix(".dts").write_text(dts)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(dts_to_dtb(dts))
    tmp.rename(out)
    raw.unlink(missing_ok=True)
    return out
