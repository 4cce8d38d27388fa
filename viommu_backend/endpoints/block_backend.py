"""Backing stores for block devices: a RAM disk (:class:`MemoryBackend`), an image file
(:class:`FileBackend`), or anything else implementing :class:`BlockBackend`.  Not tied
to virtio; :func:`open_backend` turns a device's ``backing`` argument into one."""

from __future__ import annotations

import os
from typing import Protocol, Union

import numpy as np


class BlockBackend(Protocol):
    size: int
    read_only: bool

    def pread(self, offset: int, n: int) -> bytes: ...

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


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

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


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

    def flush(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


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
