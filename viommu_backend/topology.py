"""Where each backend function sits in the guest's PCI hierarchy, and its StreamID.

The SMMU sees a function's Requester ID (bus << 8 | devfn) as its StreamID.  Linux numbers
buses depth-first in slot order, so with only root ports on bus 0 the port at the lowest
slot gets secondary bus 1, the next bus 2, and so on; a function behind a port sits at
device 0 of that bus.  A function can pin its StreamID with ``stream_id`` in its options.

Each ``pxb-pcie`` expander is a root complex of its own: in the guest DT a host bridge
node of PCI domain 1, 2, ... (in bus_nr order) over the buses from its ``bus_nr`` up to
the next root complex's; its root ports get the buses after ``bus_nr``.  The root complex
of the virt machine (pcie.0, domain 0) keeps the buses below the first expander.  A root
complex's iommu-map translates the RIDs from the bus after its root bus to its last bus
(its root bus holds root ports, and on pcie.0 the SMMU functions themselves), with
StreamID = RID, to the SMMU function whose ``root_complex`` names it.
"""

from __future__ import annotations

from dataclasses import dataclass

from viommu_backend.config import MAIN_ROOT_COMPLEX, Config, ConfigError, FunctionConfig


@dataclass(frozen=True)
class RootComplex:
    """One PCIe host bridge as the guest sees it (one DT node, one PCI domain)."""

    name: str  # pcie.0 or the expander's name
    domain: int
    first_bus: int
    last_bus: int
    map_base: int  # first RID its iommu-map translates

    @property
    def map_end(self) -> int:
        """One past the last RID it translates."""
        return (self.last_bus + 1) << 8


def root_complexes(config: Config) -> list[RootComplex]:
    """pcie.0 first, then the expanders in bus_nr order (their PCI domain numbers)."""
    exps = sorted(config.expanders, key=lambda e: e.bus_nr)
    ends = [e.bus_nr - 1 for e in exps] + [0xFF]
    out = [RootComplex(MAIN_ROOT_COMPLEX, 0, 0, ends[0], config.iommu.iommu_map_base)]
    for n, e in enumerate(exps):
        out.append(RootComplex(e.name, n + 1, e.bus_nr, ends[n + 1], (e.bus_nr + 1) << 8))
    return out


@dataclass(frozen=True)
class Placement:
    name: str
    bus: int
    devfn: int
    domain: int = 0  # PCI domain (segment): 0 for pcie.0, 1.. for expanders

    @property
    def stream_id(self) -> int:
        return (self.bus << 8) | self.devfn

    @property
    def bdf(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.devfn >> 3:02x}.{self.devfn & 7}"


def secondary_buses(config: Config) -> dict[str, int]:
    """Root port name -> the secondary bus number Linux gives it (on its root complex)."""
    out: dict[str, int] = {}
    for rc in root_complexes(config):
        ports = sorted((p for p in config.root_ports if p.bus == rc.name), key=lambda p: p.slot)
        out.update({p.name: rc.first_bus + n + 1 for n, p in enumerate(ports)})
    return out


def domain_of(config: Config, fn: FunctionConfig) -> int:
    rc = config.root_complex_of(fn)
    return next(r.domain for r in root_complexes(config) if r.name == rc)


def place(config: Config, fn: FunctionConfig) -> Placement:
    pinned = fn.options.get("stream_id")
    if pinned is not None:
        if not isinstance(pinned, int) or not 0 <= pinned < (1 << 16):
            raise ConfigError(f"function {fn.name}: stream_id must be 0..0xffff")
        return Placement(fn.name, pinned >> 8, pinned & 0xFF, domain_of(config, fn))
    if fn.port is not None:
        buses = secondary_buses(config)
        if fn.port not in buses:
            raise ConfigError(f"function {fn.name}: no root port {fn.port!r}")
        return Placement(fn.name, buses[fn.port], fn.func, domain_of(config, fn))
    if fn.slot is None:
        raise ConfigError(f"function {fn.name}: needs a slot or a port")
    return Placement(fn.name, 0, fn.slot << 3 | fn.func)


def placements(config: Config) -> dict[str, Placement]:
    out = {fn.name: place(config, fn) for fn in config.functions}
    seen: dict[tuple[int, int], str] = {}
    for name, p in out.items():
        other = seen.setdefault((p.domain, p.stream_id), name)
        if other != name:
            raise ConfigError(f"functions {other} and {name} share StreamID {p.stream_id:#x}")
    return out


def translated(config: Config, fn: FunctionConfig, p: Placement) -> bool:
    """Whether the iommu-map of ``fn``'s root complex sends its RID to an SMMU."""
    if config.iommu_of(fn) is None:
        return False
    rc = next(r for r in root_complexes(config) if r.name == config.root_complex_of(fn))
    return rc.map_base <= p.stream_id < rc.map_end
