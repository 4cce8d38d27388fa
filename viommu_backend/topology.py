"""Where each backend function sits in the guest's PCI hierarchy, and its StreamID.

The SMMU sees a function's Requester ID (bus << 8 | devfn) as its StreamID.  Linux numbers
buses depth-first in slot order, so with only root ports on bus 0 the port at the lowest
slot gets secondary bus 1, the next bus 2, and so on; a function behind a port sits at
device 0 of that bus.  A function can pin its StreamID with ``stream_id`` in its options.
"""

from __future__ import annotations

from dataclasses import dataclass

from viommu_backend.config import Config, ConfigError, FunctionConfig


@dataclass(frozen=True)
class Placement:
    name: str
    bus: int
    devfn: int

    @property
    def stream_id(self) -> int:
        return (self.bus << 8) | self.devfn

    @property
    def bdf(self) -> str:
        return f"0000:{self.bus:02x}:{self.devfn >> 3:02x}.{self.devfn & 7}"


def secondary_buses(config: Config) -> dict[str, int]:
    """Root port name -> the secondary bus number Linux gives it."""
    ports = sorted(config.root_ports, key=lambda p: p.slot)
    return {p.name: n + 1 for n, p in enumerate(ports)}


def place(config: Config, fn: FunctionConfig) -> Placement:
    pinned = fn.options.get("stream_id")
    if pinned is not None:
        if not isinstance(pinned, int) or not 0 <= pinned < (1 << 16):
            raise ConfigError(f"function {fn.name}: stream_id must be 0..0xffff")
        return Placement(fn.name, pinned >> 8, pinned & 0xFF)
    if fn.port is not None:
        buses = secondary_buses(config)
        if fn.port not in buses:
            raise ConfigError(f"function {fn.name}: no root port {fn.port!r}")
        return Placement(fn.name, buses[fn.port], fn.func)
    if fn.slot is None:
        raise ConfigError(f"function {fn.name}: needs a slot or a port")
    return Placement(fn.name, 0, fn.slot << 3 | fn.func)


def placements(config: Config) -> dict[str, Placement]:
    out = {fn.name: place(config, fn) for fn in config.functions}
    seen: dict[int, str] = {}
    for name, p in out.items():
        other = seen.setdefault(p.stream_id, name)
        if other != name:
            raise ConfigError(f"functions {other} and {name} share StreamID {p.stream_id:#x}")
    return out
