"""Sans-IO core of a QMP server (the wire format of QEMU's QMP, docs/interop/qmp-spec).

A :class:`QmpConnection` holds the state of one client: the receive buffer (a stream of
JSON objects, partial reads tolerated), and whether capabilities negotiation is done.
It turns received bytes (a stream of JSON objects, newlines optional) into :class:`Execute` requests for the layer above, answers
everything it can decide alone (framing and parse errors, ``qmp_capabilities``, commands
sent before negotiation) with ready :class:`Reply` bytes, and serialises replies, errors
and events.  It performs no I/O; :mod:`viommu_backend.qmp.server` drives it from asyncio.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

GENERIC_ERROR = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"

DEFAULT_MAX_LINE = 1 << 20  # bytes in one request line before it is refused

# Deeper values are refused.  QEMU allows 1024, but Python's json module recurses once per
# level and hits the interpreter's recursion limit (~1000, less the caller's stack) before
# that: a request nested 1000 deep raised RecursionError out of feed().  No QMP command
# needs more than a few levels.
MAX_NESTING = 128

_TOP_LEVEL_KEYS = frozenset({"execute", "arguments", "id", "control"})
_WHITESPACE = frozenset(b" \t\r\n")
_JSON_OUTSIDE_STRING = frozenset(b"{}[]:,\"-+.0123456789eEtruefalsn")
# Runs of bytes that only extend the buffer (the scanner ends in the state it starts in),
# which :meth:`QmpConnection.feed` takes at once instead of byte by byte: the body of a
# string; numbers / literals / separators outside strings; inside an object or array also
# whole strings and whitespace (a run ends with a size-checked byte, or is all whitespace,
# which the byte scanner does not size-check either).
_STRING_RUN = re.compile(rb'[^\x00-\x1f"\\]+')
_PLAIN_RUN = re.compile(rb"[-+.0-9:,eEtrufalsn]+")
_NESTED_RUN = re.compile(
    rb'(?:[ \t\r\n]*(?:[-+.0-9:,eEtrufalsn]+|"(?:[^\x00-\x1f"\\]|\\[\x20-\xff])*"))+')
_NESTED_WHITESPACE_RUN = re.compile(rb"[ \t\r\n]+")


class QmpError(Exception):
    """Raised by command handlers: becomes ``{"error": {"class": cls, "desc": desc}}``."""

    def __init__(self, desc: str, cls: str = GENERIC_ERROR) -> None:
        super().__init__(desc)
        self.desc = desc
        self.cls = cls


@dataclass(frozen=True)
class Execute:
    """A well-formed command request to run (after negotiation)."""

    command: str
    arguments: dict[str, Any]
    id: Any = None
    has_id: bool = False


@dataclass(frozen=True)
class Reply:
    """Bytes to send to the client, decided by the core itself."""

    data: bytes


Incoming = Execute | Reply


def encode_message(msg: dict[str, Any]) -> bytes:
    """One QMP message on the wire: compact JSON and CRLF, as QEMU sends them."""
    return json.dumps(msg, separators=(", ", ": ")).encode() + b"\r\n"


def make_greeting(major: int = 0, minor: int = 1, micro: int = 0, package: str = "viommu-backend",
                  capabilities: list[str] | None = None) -> dict[str, Any]:
    return {"QMP": {"version": {"qemu": {"major": major, "minor": minor, "micro": micro},
                                "package": package},
                    "capabilities": list(capabilities or [])}}


def make_return(result: Any, id: Any = None, has_id: bool = False) -> dict[str, Any]:
    msg: dict[str, Any] = {"return": result}
    if has_id:
        msg["id"] = id
    return msg


def make_error(desc: str, cls: str = GENERIC_ERROR, id: Any = None,
               has_id: bool = False) -> dict[str, Any]:
    msg: dict[str, Any] = {"error": {"class": cls, "desc": desc}}
    if has_id:
        msg["id"] = id
    return msg


def make_event(event: str, data: dict[str, Any] | None = None,
               now: float | None = None) -> dict[str, Any]:
    t = time.time() if now is None else now
    seconds = int(t)
    micro = int(round((t - seconds) * 1_000_000))
    if micro >= 1_000_000:  # rounding carry
        seconds, micro = seconds + 1, micro - 1_000_000
    msg: dict[str, Any] = {"event": event, "timestamp": {"seconds": seconds, "microseconds": micro}}
    if data is not None:
        msg["data"] = data
    return msg


@dataclass
class QmpConnection:
    """State of one QMP client connection (sans-IO).

    ``feed(data)`` returns the requests and replies the received bytes produce, in order.
    Replies to :class:`Execute` requests are built with :meth:`reply` / :meth:`error`.
    """

    greeting_msg: dict[str, Any] = field(default_factory=make_greeting)
    max_line: int = DEFAULT_MAX_LINE
    clock: Callable[[], float] = time.time
    negotiated: bool = False
    _buf: bytearray = field(default_factory=bytearray, repr=False)
    _depth: int = field(default=0, repr=False)
    _in_string: bool = field(default=False, repr=False)
    _escape: bool = field(default=False, repr=False)
    _discarding: bool = field(default=False, repr=False)  # inside a refused object

    # -- output -------------------------------------------------------------------------
    def greeting(self) -> bytes:
        return encode_message(self.greeting_msg)

    def reply(self, request: Execute, result: Any) -> bytes:
        return encode_message(make_return(result, request.id, request.has_id))

    def error(self, request: Execute | None, desc: str, cls: str = GENERIC_ERROR) -> bytes:
        if request is None:
            return encode_message(make_error(desc, cls))
        return encode_message(make_error(desc, cls, request.id, request.has_id))

    def event(self, name: str, data: dict[str, Any] | None = None) -> bytes | None:
        """The event's bytes, or None while the client has not negotiated (QEMU sends
        no events before ``qmp_capabilities``)."""
        if not self.negotiated:
            return None
        return encode_message(make_event(name, data, self.clock()))

    # -- input --------------------------------------------------------------------------
    def feed(self, data: bytes) -> list[Incoming]:
        """Scan received bytes (any split) and return what they complete, in order.

        Framing is QEMU's: a stream of JSON values, each request one top-level object,
        newlines optional (``qemu.qmp`` sends none).  The scanner tracks nesting and
        strings only; a complete object is then parsed with :func:`json.loads`.  A byte
        that cannot occur in JSON outside a string (e.g. 0xFF), or a control character
        inside one, is a lexical error: it is reported and the scanner resets, so a
        client can always resynchronise.  Objects larger than ``max_line`` bytes or
        nested deeper than :data:`MAX_NESTING` are refused once and skipped.
        """
        out: list[Incoming] = []
        i, n = 0, len(data)
        while i < n:
            run = self._run_at(data, i)
            if run is None:
                self._scan(data[i], out)
                i += 1
                continue
            if not self._discarding:
                self._buf += run.group()
                if run.re is not _NESTED_WHITESPACE_RUN:  # whitespace is not size-checked
                    self._check_size(out)
            i = run.end()
        return out

    def _run_at(self, data: bytes, i: int) -> re.Match[bytes] | None:
        """The run of buffer-only bytes at ``data[i]`` (what :meth:`_scan` would only
        append, byte by byte), or None: the byte is scanned alone."""
        if self._in_string:
            return None if self._escape else _STRING_RUN.match(data, i)
        if self._depth:
            return _NESTED_RUN.match(data, i) or _NESTED_WHITESPACE_RUN.match(data, i)
        return _PLAIN_RUN.match(data, i)

    def _lex_error(self, out: list[Incoming], what: str) -> None:
        out.append(Reply(encode_message(make_error(f"JSON parse error, {what}"))))
        self._reset_scanner()

    def _reset_scanner(self) -> None:
        self._buf.clear()
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._discarding = False

    def _finish_scalar(self, out: list[Incoming]) -> None:
        if self._buf:
            try:
                json.loads(bytes(self._buf))
            except ValueError:
                out.append(Reply(encode_message(make_error(
                    f"JSON parse error, invalid token {bytes(self._buf)[:32]!r}"))))
            else:
                out.append(Reply(encode_message(make_error("QMP input must be a JSON object"))))
            self._buf.clear()

    def _check_size(self, out: list[Incoming]) -> None:
        if len(self._buf) > self.max_line:
            out.append(Reply(encode_message(make_error(
                f"QMP input exceeds {self.max_line} bytes"))))
            self._discarding = True
            self._buf.clear()

    def _scan(self, b: int, out: list[Incoming]) -> None:
        if self._in_string:
            if b < 0x20:
                self._lex_error(out, "control character in string")
                return
            if not self._discarding:
                self._buf.append(b)
                self._check_size(out)
            if self._escape:
                self._escape = False
            elif b == 0x5C:  # backslash
                self._escape = True
            elif b == 0x22:  # closing quote
                self._in_string = False
                if self._depth == 0:  # a top-level string: not an object
                    self._buf.clear()
                    out.append(Reply(encode_message(make_error("QMP input must be a JSON object"))))
            return
        if b in _WHITESPACE:
            if self._depth == 0:
                self._finish_scalar(out)
            elif not self._discarding:
                self._buf.append(b)
            return
        if b not in _JSON_OUTSIDE_STRING:
            self._lex_error(out, f"invalid byte {b:#04x}")
            return
        if b in (0x7B, 0x5B):  # { [
            if self._depth == 0:
                self._finish_scalar(out)
            self._depth += 1
            if self._depth > MAX_NESTING and not self._discarding:
                out.append(Reply(encode_message(make_error(
                    f"JSON parse error, nesting deeper than {MAX_NESTING}"))))
                self._discarding = True
                self._buf.clear()
        elif b in (0x7D, 0x5D):  # } ]
            if self._depth == 0:
                self._finish_scalar(out)
                out.append(Reply(encode_message(make_error(
                    f"JSON parse error, unexpected {chr(b)!r}"))))
                return
            self._depth -= 1
        elif b == 0x22:
            self._in_string = True
        if not self._discarding:
            self._buf.append(b)
            self._check_size(out)
        if self._depth == 0 and b in (0x7D, 0x5D):
            if self._discarding:
                self._discarding = False
            else:
                item = self._parse_line(bytes(self._buf))
                if item is not None:
                    out.append(item)
            self._buf.clear()

    def _parse_line(self, line: bytes) -> Incoming | None:
        text = line.strip()
        if not text:
            return None
        try:
            msg = json.loads(text)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            return Reply(encode_message(make_error(f"JSON parse error, {e}")))
        if not isinstance(msg, dict):
            return Reply(encode_message(make_error("QMP input must be a JSON object")))
        has_id = "id" in msg
        mid = msg.get("id")

        def err(desc: str, cls: str = GENERIC_ERROR) -> Reply:
            return Reply(encode_message(make_error(desc, cls, mid, has_id)))

        for key in msg:
            if key not in _TOP_LEVEL_KEYS:
                return err(f"QMP input member '{key}' is unexpected")
        if "execute" not in msg:
            return err("QMP input lacks member 'execute'")
        command = msg["execute"]
        if not isinstance(command, str):
            return err("QMP input member 'execute' must be a string")
        arguments = msg.get("arguments", {})
        if not isinstance(arguments, dict):
            return err("QMP input member 'arguments' must be an object")
        if "control" in msg:
            return err("QMP input member 'control' is unexpected: out-of-band is not supported")

        if command == "qmp_capabilities":
            if self.negotiated:
                return err("Capabilities negotiation is already complete, command ignored",
                           COMMAND_NOT_FOUND)
            for k, v in arguments.items():
                if k != "enable":
                    return err(f"Parameter '{k}' is unexpected")
                if not isinstance(v, list) or not all(isinstance(c, str) for c in v):
                    return err("Invalid parameter type for 'enable', expected: array of strings")
                offered = set(self.greeting_msg["QMP"]["capabilities"])
                for cap in v:
                    if cap not in offered:
                        return err(f"Capability '{cap}' not available")
            self.negotiated = True
            return Reply(encode_message(make_return({}, mid, has_id)))
        if not self.negotiated:
            return err("Expecting capabilities negotiation with 'qmp_capabilities'",
                       COMMAND_NOT_FOUND)
        return Execute(command, arguments, mid, has_id)
