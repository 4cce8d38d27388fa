"""Backing stores for block devices: a RAM disk (:class:`MemoryBackend`), an image file
(:class:`FileBackend`), or anything else implementing :class:`BlockBackend`.  Not tied
to virtio; :func:`open_backend` turns a device's ``backing`` argument into one.

Bulk transfers: :func:`read_into` / :func:`write_from` move a request's data between the
store and a list of buffers (e.g. memoryviews of guest RAM) -- with ``os.preadv`` /
``os.pwritev`` straight into / out of the buffers for a file, a numpy copy for a RAM disk,
``pread`` / ``pwrite`` plus a copy for any other backend."""

from __future__ import annotations

import os
from typing import Protocol, Sequence, Union

import numpy as np


class BlockBackend(Protocol):
    size: int
    read_only: bool

    def pread(self, offset: int, n: int) -> bytes: ...

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None:
        """Make completed writes stable, then release the store."""


class MemoryBackend:
    """A RAM disk (numpy bytes); ``data`` gives the initial contents."""

    def __init__(self, size: int, *, data: bytes | None = None, read_only: bool = False) -> None:
        if size < 0:
            raise ValueError("negative disk size")
        self.size = size
        self.read_only = read_only
        self.buf = np.zeros(size, np.uint8)
        if data:
            self.buf[:len(data)] = np.frombuffer(data[:size], np.uint8)

    def pread(self, offset: int, n: int) -> bytes:
        return self.buf[offset:offset + n].tobytes()

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.buf[offset:offset + len(data)] = np.frombuffer(data, np.uint8)

    def preadv(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Fill ``bufs`` in order from ``offset`` (zeros past the end)."""
        for b in bufs:
            n = len(b)
            dst = np.frombuffer(b, np.uint8)
            got = self.buf[offset:offset + n]
            dst[:len(got)] = got
            dst[len(got):] = 0
            offset += n

    def pwritev(self, offset: int, bufs: Sequence[memoryview]) -> None:
        for b in bufs:
            n = len(b)
            self.buf[offset:offset + n] = np.frombuffer(b, np.uint8)
            offset += n

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _bytes_views(bufs: Sequence[memoryview]) -> list[memoryview]:
    """``bufs`` as non-empty byte-format memoryviews (len = bytes), in order."""
    out = []
    for b in bufs:
        if type(b) is not memoryview or b.format != "B" or b.ndim != 1:
            b = memoryview(b).cast("B")
        if len(b):
            out.append(b)
    return out


class FileBackend:
    """A disk image file accessed with pread/pwrite.  With ``size`` the file is created
    if missing and grown to ``size``; otherwise its current size is the disk size."""

    def __init__(self, path: str | os.PathLike[str], *, size: int | None = None,
                 read_only: bool = False) -> None:
        self.path = os.fspath(path)
        self.read_only = read_only
        flags = os.O_RDONLY if read_only else os.O_RDWR
        if size is not None and not read_only:
            flags |= os.O_CREAT
        self.fd = os.open(self.path, flags | os.O_CLOEXEC, 0o644)
        try:
            cur = os.fstat(self.fd).st_size
            if size is not None and cur < size and not read_only:
                os.ftruncate(self.fd, size)
            self.size = size if size is not None else cur
        except OSError:
            os.close(self.fd)
            raise

    def pread(self, offset: int, n: int) -> bytes:
        out = os.pread(self.fd, n, offset)
        return out + bytes(n - len(out)) if len(out) < n else out

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        mv = memoryview(data)
        while len(mv):
            done = os.pwrite(self.fd, mv, offset)
            mv, offset = mv[done:], offset + done

    def preadv(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Fill ``bufs`` in order from ``offset`` straight from the file (zeros past its
        end); at most IOV_MAX buffers per system call."""
        bufs = _bytes_views(bufs)
        i = 0
        while i < len(bufs):
            chunk = bufs[i:i + _IOV_MAX]
            want = sum(map(len, chunk))
            got = os.preadv(self.fd, chunk, offset)
            if got == want:
                i += len(chunk)
                offset += got
                continue
            if got == 0:  # end of file: the rest reads as zeros
                for b in bufs[i:]:
                    b[:] = bytes(len(b))
                return
            offset += got
            while got >= len(bufs[i]):  # partly filled: resume after the bytes read
                got -= len(bufs[i])
                i += 1
            bufs[i] = bufs[i][got:]

    def pwritev(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Write ``bufs`` in order at ``offset`` straight to the file."""
        bufs = _bytes_views(bufs)
        i = 0
        while i < len(bufs):
            chunk = bufs[i:i + _IOV_MAX]
            done = os.pwritev(self.fd, chunk, offset)
            offset += done
            while i < len(bufs) and done >= len(bufs[i]):
                done -= len(bufs[i])
                i += 1
            if done:
                bufs[i] = bufs[i][done:]

    def flush(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        """Flush (what was written is made stable) and close; a second call does nothing."""
        if self.fd >= 0:
            if not self.read_only:
                self.flush()
            os.close(self.fd)
            self.fd = -1


def _iov_max() -> int:
    try:
        v = os.sysconf("SC_IOV_MAX")
    except (ValueError, OSError):
        return 1024
    return v if v > 0 else 1024


_IOV_MAX = _iov_max()  # buffers per preadv/pwritev call


def read_into(backend: BlockBackend, offset: int, bufs: Sequence[memoryview]) -> None:
    """Fill the writable buffers ``bufs`` in order with the store's bytes at ``offset``."""
    fn = getattr(backend, "preadv", None)
    if fn is not None:
        fn(offset, bufs)
        return
    total = sum(len(b) for b in bufs)
    data = memoryview(backend.pread(offset, total))
    pos = 0
    for b in bufs:
        n = len(b)
        memoryview(b).cast("B")[:] = data[pos:pos + n]
        pos += n


def write_from(backend: BlockBackend, offset: int, bufs: Sequence[memoryview]) -> None:
    """Write the buffers ``bufs`` in order to the store at ``offset``."""
    fn = getattr(backend, "pwritev", None)
    if fn is not None:
        fn(offset, bufs)
        return
    backend.pwrite(offset, b"".join(bufs))


Backing = Union[int, str, "os.PathLike[str]", BlockBackend]


def open_backend(backing: Backing, *, size: int | None = None,
                 read_only: bool = False) -> BlockBackend:
    """``int`` -> RAM disk of that many bytes; a path -> image file; a backend as is."""
    if isinstance(backing, bool):
        raise TypeError("backing must be a size, a path or a BlockBackend")
    if isinstance(backing, int):
        return MemoryBackend(backing, read_only=read_only)
    if isinstance(backing, (str, os.PathLike)):
        return FileBackend(backing, size=size, read_only=read_only)
    return backing
