"""Guest device tree with an ``arm,smmu-v3`` node for the IOMMU function (route 1).

The virt machine's DTB is dumped with the same command line (``-machine ...,dumpdtb=F``),
decompiled with ``dtc``, extended with the SMMU node at the address Linux will assign to
the IOMMU function's BAR0 and an ``iommu-map`` on the PCIe host bridge, and compiled again.
At boot the arm-smmu-v3 probe fails (memory decode off); the guest's ``smmu`` workload
enables the PCI function and re-probes the platform device.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from viommu_backend.config import Config
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


def add_smmu(dts: str, smmu: SmmuNode) -> str:
    """``dts`` (as dtc decompiles it) plus the SMMU node and the host bridge's iommu-map.
    Uses dtc's merging of later ``/ { }`` and ``&{/path} { }`` blocks: no text surgery."""
    pcie = find_pcie_node(dts)
    body = re.sub(r"^/dts-v1/;\s*", "", dts.lstrip(), count=1)
    hi, lo = smmu.base >> 32, smmu.base & 0xFFFFFFFF
    span = 0x10000 - smmu.iommu_map_base
    return (
        "/dts-v1/;\n\n" + body + "\n"
        "/ {\n"
        f"\tviommu_smmu: {smmu.node_name} {{\n"
        '\t\tcompatible = "arm,smmu-v3";\n'
        f"\t\treg = <0x{hi:x} 0x{lo:x} 0x{smmu.size >> 32:x} 0x{smmu.size & 0xFFFFFFFF:x}>;\n"
        f"\t\tinterrupts = <0x0 0x{smmu.spi:x} 0x4>;\n"
        '\t\tinterrupt-names = "combined";\n'
        "\t\t#iommu-cells = <0x1>;\n"
        + ("\t\tdma-coherent;\n" if smmu.coherent else "\t\tdma-noncoherent;\n")
        + ('\t\tstatus = "disabled";\n' if smmu.disabled else "")
        + "\t};\n"
        "};\n\n"
        f"&{{{pcie}}} {{\n"
        f"\tiommu-map = <0x{smmu.iommu_map_base:x} &viommu_smmu 0x{smmu.iommu_map_base:x} 0x{span:x}>;\n"
        + ("\tats-supported;\n" if smmu.ats else "")
        + "};\n"
    )


def smmu_node_for(config: Config) -> SmmuNode | None:
    fn = config.iommu_function()
    if fn is None or not config.iommu.device_tree:
        return None
    assert fn.slot is not None  # validated: the IOMMU sits on bus 0
    base = predict_bar0(config)[fn.name]
    size = _pow2(fn.bar0_size or SMMU_BAR0_SIZE)
    return SmmuNode(base=base, size=size, spi=intx_spi(fn.slot),
                    iommu_map_base=config.iommu.iommu_map_base, ats=config.iommu.ats,
                    disabled=config.iommu.route == "module", coherent=config.iommu.dma_coherent)


def cache_key(dump_argv: Sequence[str], smmu: SmmuNode) -> str:
    h = hashlib.sha256()
    h.update("\0".join(dump_argv).encode())
    h.update(repr(smmu).encode())
    return h.hexdigest()[:16]


async def build_guest_dtb(qemu: QemuCommand, config: Config, *, kernel: Path, initrd: Path,
                          socket_dir: Path, cache: Path, cmdline_extra: str = "") -> Path | None:
    """The DTB to boot with (``-dtb``), or None when the config wants no SMMU node.
    Cached under ``<cache>/dtb/<hash of the dump command line + node>.dtb``."""
    from viommu_backend.guest.qemu import qemu_args, run_qemu_to_exit

    smmu = smmu_node_for(config)
    if smmu is None:
        return None
    placeholder = Path("/dev/null/DUMP")
    key_args = qemu_args(config, kernel=kernel, initrd=initrd, socket_dir=socket_dir,
                         cmdline_extra=cmdline_extra, dumpdtb=placeholder)
    key = cache_key([*qemu.argv, *key_args], smmu)
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
    dts = add_smmu(dtb_to_dts(raw.read_bytes()), smmu)
    out.with_suffix(".dts").write_text(dts)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(dts_to_dtb(dts))
    tmp.rename(out)
    raw.unlink(missing_ok=True)
    return out
