"""The SMMU's register block in shared memory (SMMU option ``registers = "shared"``).

vfio-user lets a server hand the client a region as a file (GET_REGION_INFO with
VFIO_REGION_INFO_FLAG_MMAP and an fd); QEMU then maps it straight into the guest, so the
driver's register reads and writes are plain memory accesses with no message.  No SMMUv3
register has a read side effect, so both pages of BAR0 can live in a memfd:

- reads see what is in memory: the SMMU keeps its own registers there (the ID registers,
  CR0ACK, IRQ_CTRLACK, GERROR, GBPA, the queue pointers it moves) -- :meth:`publish`
  writes each one whose value changed, before every interrupt or MSI it sends;
- writes land in memory and act when the SMMU notices them: :meth:`poll` compares every
  register word with the value last seen and hands the changed registers to the register
  model (:class:`SMMUv3`) as writes -- the storage registers first, then those whose write
  acts (GBPA, CR0, IRQ_CTRL, GERRORN, the queue pointers, CMDQ_PROD last), the order a
  driver relies on when it writes a base before enabling or producing.

Who polls and how often is the transport's business: :meth:`pending` says, without
touching the model, whether a poll would find a write (a detector thread may ask it;
:class:`PollSchedule` says how long it sleeps between two looks), :meth:`poll` runs where
the model lives.
A register that both sides write (GBPA's UPDATE, CMDQ_CONS / EVTQ_PROD / PRIQ_PROD while
their queue is off) is published only when the SMMU's value differs from the last one
seen, so a publish never overwrites a guest write the SMMU has not yet taken.  Once the
SMMU has taken a write, a register that reads back other than written (reserved bits,
an ignored write, a register the SMMU owns) shows its value in the page.

Trapped accesses (vfio-user REGION_READ/WRITE from a client that does not map the region,
and this project's tests) go through :meth:`read` / :meth:`write`: a write is stored and
polled at once, a read is answered by the model after a poll, so both modes behave alike.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import numpy as np

from viommu_backend.bitfield import Register
from viommu_backend.smmuv3 import regs
from viommu_backend.smmuv3.device import SMMUv3

# the registers whose value the SMMU decides; the others hold what the driver wrote
PUBLISHED: tuple[str, ...] = (
    "IDR0", "IDR1", "IDR2", "IDR3", "IDR4", "IDR5", "IIDR", "AIDR", "CR0ACK", "STATUSR",
    "GBPA", "AGBPA", "IRQ_CTRLACK", "GERROR", "CMDQ_CONS", "EVTQ_PROD", "PRIQ_PROD")
# registers whose write acts, in the order one poll applies them (after all the others)
ACTING: tuple[str, ...] = (
    "GBPA", "CR0", "IRQ_CTRL", "GERRORN", "CMDQ_CONS", "EVTQ_PROD", "PRIQ_PROD",
    "EVTQ_CONS", "PRIQ_CONS", "CMDQ_PROD")


def _apply_order(reg: Register) -> tuple[int, int]:
    return (ACTING.index(reg.name) + 1, 0) if reg.name in ACTING else (0, reg.offset)


@dataclass
class SharedStats:
    looks: int = 0  # checks for a changed word by the poller's detector thread (pending())
    polls: int = 0  # register scans (on the model's thread)
    active_polls: int = 0  # scans that found a guest write
    writes_taken: int = 0  # registers handed to the model as writes
    publishes: int = 0  # register words the SMMU wrote into the shared page

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class SharedRegisters:
    """BAR0 of one SMMU as a memfd shared with the client, and the model behind it."""

    def __init__(self, smmu: SMMUv3, size: int = regs.BAR_SIZE) -> None:
        self.smmu = smmu
        self.size = size
        self.fd = os.memfd_create("viommu-smmuv3-bar0", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self._map = mmap.mmap(self.fd, size)
        self.words = np.frombuffer(self._map, dtype="<u4")
        self.stats = SharedStats()
        self._regs = sorted(regs.SMMU_REGS.registers, key=_apply_order)
        # the words scanned: every register's (both halves of a 64-bit one), in apply
        # order; _owner[i] is the register of word i, _pos its first word
        self._owner = [r for r in self._regs for _ in range(r.width // 32)]
        self._idx = np.array([r.offset // 4 + k for r in self._regs for k in range(r.width // 32)],
                             dtype=np.intp)
        self._pos = {r.name: self._owner.index(r) for r in self._regs}
        self._published = [regs.SMMU_REGS[n] for n in PUBLISHED]
        self._seen = np.zeros(len(self._idx), dtype=np.uint32)
        smmu.page = self
        self.reset()

    # -- guest writes -> model ---------------------------------------------------------
    def pending(self) -> bool:
        """Whether a register word differs from the value last seen, i.e. :meth:`poll`
        would find a write.  Reads only (the words and the last seen values), so another
        thread may ask: at worst it sees a word the model thread is storing and the poll it
        asks for finds nothing."""
        return bool((np.take(self.words, self._idx) != self._seen).any())

    def poll(self) -> bool:
        """Take the guest's register writes since the last poll; True if there were any."""
        self.stats.polls += 1
        now = self.words[self._idx]
        changed = np.flatnonzero(now != self._seen)
        if not len(changed):
            return False
        self.stats.active_polls += 1
        self._seen[changed] = now[changed]
        for reg in dict.fromkeys(self._owner[i] for i in changed.tolist()):  # in apply order
            at = self._pos[reg.name]
            value = int(now[at]) | (int(now[at + 1]) << 32 if reg.width == 64 else 0)
            self.stats.writes_taken += 1
            self.smmu.write(reg.offset, reg.width // 8, value)
            self._show_taken(reg, now)
        self.publish()
        return True

    def _show_taken(self, reg: Register, written: np.ndarray) -> None:
        """Where the register reads back other than written (reserved bits, a write the
        SMMU ignored), put its value in the page -- unless the guest wrote again."""
        for i, word in self._model_words(reg):
            if word != written[i] and self.words[self._idx[i]] == written[i]:
                self._store(i, word)

    def _model_words(self, reg: Register) -> list[tuple[int, int]]:
        """(position, 32-bit word) of what ``reg`` reads as in the model."""
        value = self.smmu.register_value(reg.name)
        at = self._pos[reg.name]
        return [(at + k, (value >> (32 * k)) & 0xFFFFFFFF) for k in range(reg.width // 32)]

    def _store(self, i: int, word: int) -> None:
        self._seen[i] = word
        self.words[self._idx[i]] = word
        self.stats.publishes += 1

    # -- model -> shared page ------------------------------------------------------------
    def publish(self) -> None:
        """Write the SMMU's registers whose value changed since last seen."""
        for reg in self._published:
            for i, word in self._model_words(reg):
                if self._seen[i] != word:
                    self._store(i, word)

    def reset(self) -> None:
        """Every register at the model's value (after the model's own reset)."""
        self.words[:] = 0
        for reg in self._regs:
            for i, word in self._model_words(reg):
                self.words[self._idx[i]] = word
        self._seen[:] = self.words[self._idx]

    # -- trapped accesses (MmioHandler) ---------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        self.poll()
        return self.smmu.read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if 0 <= offset and offset + size <= self.size:
            self._map[offset:offset + size] = (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")
            self.poll()


@dataclass(frozen=True)
class PollSchedule:
    """How long the detector sleeps between two looks at the shared registers, by the time
    since the driver was last active (a write seen, or an endpoint behind the SMMU
    interrupted, after which the driver's unmap issues a CMD_SYNC): ``steps`` are
    (active within the last ``until_s``, sleep ``sleep_s``) from the fastest, then
    ``idle_s``.  Measured on the 2-core bench host under load: a look costs ~20-25 us of
    CPU whatever the sleep asked for, and a 50 us sleep lasts 100-250 us (20 us is no
    faster); a strict 4 KiB virtio-blk request's ~4 CMD_SYNCs follow each other and
    the endpoint's interrupt by a few 100 us (interrupt to first one: median 0.4-0.9 ms),
    so the fast step stays short (2 ms of it cost lazy-mode 4 KiB requests ~200 us more
    server CPU each than 0.5 ms, with no strict-mode gain in MB/s).  A
    write after a quiet second still gets its answer within ``idle_s`` (the driver's
    CR0ACK polls wait up to 1 s)."""

    steps: tuple[tuple[float, float], ...] = ((0.0005, 50e-6), (0.005, 250e-6), (1.0, 0.001))
    idle_s: float = 0.01

    def delay(self, since_active_s: float) -> float:
        for until_s, sleep_s in self.steps:
            if since_active_s < until_s:
                return sleep_s
        return self.idle_s
