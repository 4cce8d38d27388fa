"""Adversarial (property-based) tests of the sans-IO vfio-user Connection (server side):
random byte streams and valid headers with garbage bodies, in random chunks, with real
descriptors attached.  The connection yields only Request / Violation events (or error
replies), never raises, never leaks a descriptor, and keeps serving when framing is
intact."""

from __future__ import annotations

import gc
import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from viommu_backend.vfio_user import protocol as p
from viommu_backend.vfio_user.connection import Connection, Request, Violation, close_fds

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
C = p.Command


def _fd_count() -> int:
    # cyclic garbage of earlier tests (guest memories: mmaps hold a dup of their memfd)
    # must not be freed between the two counts
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def _feed_all(conn: Connection, data: bytes, cuts: list[int], fd_at: dict[int, int]
              ) -> list:
    """Feed ``data`` in chunks cut at ``cuts``; chunk i carries ``fd_at.get(i, 0)`` fresh
    pipe descriptors (both ends: the read end is passed, the write end closed here)."""
    events = []
    bounds = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        fds = []
        for _ in range(fd_at.get(i, 0)):
            r, w = os.pipe()
            os.close(w)
            fds.append(r)
        events += conn.feed(data[a:b], fds)
    return events


def _consume(events: list) -> None:
    """What the server does with events: a Request's handler owns its fds."""
    for ev in events:
        assert isinstance(ev, (Request, Violation)), ev
        if isinstance(ev, Request):
            close_fds(ev.fds)
        else:
            assert isinstance(ev.errno, int) and ev.errno > 0 and ev.message


def _replies(conn: Connection) -> list[p.Header]:
    out = []
    for frame, fds in conn.outgoing():
        assert fds == []
        hdr = p.Header.unpack(frame)
        assert hdr.size == len(frame) and hdr.is_reply
        out.append(hdr)
    return out


def _valid_probe() -> bytes:
    return (p.frame(0xBEEF, C.VERSION, p.Version(0, 0, {"max_msg_fds": 4}).encode())
            + p.frame(0xBEF0, C.REGION_READ, p.RegionAccess(0, 0, 4).encode()))


def _assert_probe_answered(conn: Connection) -> None:
    evs = conn.feed(_valid_probe())
    reqs = [e for e in evs if isinstance(e, Request)]
    assert [r.header.msg_id for r in reqs][-2:] == [0xBEEF, 0xBEF0], evs
    assert isinstance(reqs[-2].msg, p.Version) and isinstance(reqs[-1].msg, p.RegionAccess)


FD_MAP = st.dictionaries(st.integers(0, 8), st.integers(0, 3), max_size=3)
CUTS = st.lists(st.integers(0, 1 << 16), max_size=8)


@SETTINGS
@given(data=st.binary(max_size=600), cuts=CUTS, fd_at=FD_MAP)
def test_random_bytes(data, cuts, fd_at):
    base = _fd_count()
    conn = Connection(server=True)
    events = _feed_all(conn, data, cuts, fd_at)
    _consume(events)
    _replies(conn)
    conn.eof()
    assert _fd_count() == base


COMMANDS = st.one_of(st.sampled_from([int(c) for c in C]), st.integers(0, 0xFFFF))
FLAGS = st.one_of(st.sampled_from([0, int(p.MsgFlags.NO_REPLY), int(p.MsgFlags.REPLY),
                                   int(p.MsgFlags.REPLY | p.MsgFlags.ERROR)]),
                  st.integers(0, 0xFFFFFFFF))


@st.composite
def garbage_message(draw) -> bytes:
    """A header whose size matches its body (framing intact) and a garbage body."""
    cmd = draw(COMMANDS)
    body = draw(st.one_of(
        st.binary(max_size=96),
        # a structurally plausible body: argsz etc. as random little-endian words
        st.lists(st.integers(0, 2**64 - 1), max_size=10).map(
            lambda ws: b"".join(struct.pack("<Q", w) for w in ws)),
        # VERSION with random JSON-ish text
        st.text(max_size=60).map(lambda t: struct.pack("<HH", 1, 0) + t.encode() + b"\0"),
    ))
    flags = draw(FLAGS)
    msg_id = draw(st.integers(0, 0xFFFF))
    error = draw(st.integers(0, 0xFFFFFFFF))
    return p.Header(msg_id, cmd, p.HEADER_SIZE + len(body), flags, error).pack() + body


@SETTINGS
@given(msgs=st.lists(garbage_message(), min_size=1, max_size=6), cuts=CUTS, fd_at=FD_MAP)
def test_garbage_bodies_keep_serving(msgs, cuts, fd_at):
    base = _fd_count()
    conn = Connection(server=True)
    data = b"".join(msgs)
    events = _feed_all(conn, data, cuts, fd_at)
    _consume(events)
    # one event per message (framing intact): a Request or a Violation
    assert len(events) == len(msgs)
    for ev, raw in zip(events, msgs):
        hdr = p.Header.unpack(raw)
        assert ev.header is not None and ev.header.msg_id == hdr.msg_id
    replies = _replies(conn)
    # error replies only for rejected requests that asked for one
    rejected = [e for e in events if isinstance(e, Violation)
                and not e.header.is_reply and not e.header.no_reply]
    assert len([r for r in replies if r.is_error]) == len(rejected)
    assert not conn.mid_message
    _assert_probe_answered(conn)
    conn.eof()
    assert _fd_count() == base


@SETTINGS
@given(cmd=COMMANDS, size=st.integers(0, 0xFFFFFFFF), flags=FLAGS, fds=st.integers(0, 12),
       tail=st.binary(max_size=64))
def test_bad_sizes_and_fds(cmd, size, flags, fds, tail):
    """Header-level garbage (size below the header, huge, any flags) with descriptors."""
    base = _fd_count()
    conn = Connection(server=True)
    hdr = p.Header(1, cmd, size, flags, 0).pack()
    events = _feed_all(conn, hdr + tail, [len(hdr)], {0: fds})
    _consume(events)
    _replies(conn)
    if size == p.HEADER_SIZE + len(tail) or size < p.HEADER_SIZE and not tail:
        assert not conn.mid_message
    conn.eof()
    assert _fd_count() == base


def test_descriptors_on_valid_messages_that_take_none_are_closed():
    base = _fd_count()
    conn = Connection(server=True)
    r, w = os.pipe()
    evs = conn.feed(p.frame(3, C.REGION_READ, p.RegionAccess(0, 0, 4).encode()), [r, w])
    assert len(evs) == 1 and isinstance(evs[0], Violation)
    assert [h.error for h in _replies(conn)] == [22]  # EINVAL
    assert _fd_count() == base
    _assert_probe_answered(conn)
