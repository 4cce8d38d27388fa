"""asyncio UNIX-socket QMP server over the sans-IO core in :mod:`.protocol`.

:class:`QmpCommandRegistry` maps command names to handlers with an argument schema
(QAPI style: ``{"sid": "int", "*ssid": "int"}``, a leading ``*`` marks an optional
argument). :class:`QmpServer` serves several clients at once, runs each client's
commands in order, and broadcasts events with :meth:`QmpServer.emit`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping, Union

from .protocol import (COMMAND_NOT_FOUND, DEFAULT_MAX_LINE, GENERIC_ERROR, Execute, QmpConnection,
                       QmpError, Reply, make_greeting)

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Union[Any, Awaitable[Any]]]

_TYPE_NAMES: dict[Any, str] = {int: "int", str: "str", bool: "bool", float: "number",
                               dict: "object", list: "array", object: "any"}
_EXPECTED: dict[str, str] = {"int": "integer", "str": "string", "bool": "boolean",
                             "number": "number", "object": "object", "array": "array",
                             "any": "any"}


def _type_ok(kind: str, v: Any) -> bool:
    if kind == "any":
        return True
    if kind == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if kind == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if kind == "str":
        return isinstance(v, str)
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "object":
        return isinstance(v, dict)
    if kind == "array":
        return isinstance(v, list)
    raise ValueError(f"unknown QMP argument type {kind!r}")


@dataclass(frozen=True)
class ArgSpec:
    name: str
    kind: str
    optional: bool


@dataclass
class QmpCommand:
    name: str
    handler: Handler
    args: tuple[ArgSpec, ...]
    doc: str = ""

    def check(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """Validate ``arguments`` against the schema; :class:`QmpError` on mismatch."""
        known = {a.name: a for a in self.args}
        for k in arguments:
            if k not in known:
                raise QmpError(f"Parameter '{k}' is unexpected")
        for a in self.args:
            if a.name not in arguments:
                if not a.optional:
                    raise QmpError(f"Parameter '{a.name}' is missing")
                continue
            if not _type_ok(a.kind, arguments[a.name]):
                raise QmpError(f"Invalid parameter type for '{a.name}', expected: "
                               f"{_EXPECTED[a.kind]}")
        return dict(arguments)


class QmpCommandRegistry:
    """Command table: ``register(name, handler, args)``; ``handler(args) -> dict | list``
    (sync or async); raise :class:`QmpError` for an error reply."""

    def __init__(self) -> None:
        self._commands: dict[str, QmpCommand] = {}

    def register(self, name: str, handler: Handler,
                 args: Mapping[str, str | type] | None = None, doc: str = "") -> None:
        if name in self._commands or name == "qmp_capabilities":
            raise ValueError(f"QMP command {name!r} already registered")
        specs = []
        for key, kind in (args or {}).items():
            optional = key.startswith("*")
            kname = _TYPE_NAMES.get(kind, kind) if not isinstance(kind, str) else kind
            if kname not in _EXPECTED:
                raise ValueError(f"{name}: argument {key!r} has unknown type {kind!r}")
            specs.append(ArgSpec(key.lstrip("*"), kname, optional))
        self._commands[name] = QmpCommand(name, handler, tuple(specs), doc)

    def command(self, name: str, args: Mapping[str, str | type] | None = None,
                doc: str = "") -> Callable[[Handler], Handler]:
        """Decorator form of :meth:`register`."""
        def deco(fn: Handler) -> Handler:
            self.register(name, fn, args, doc)
            return fn
        return deco

    def names(self) -> list[str]:
        return ["qmp_capabilities", *self._commands]

    def __contains__(self, name: str) -> bool:
        return name in self._commands

    def get(self, name: str) -> QmpCommand | None:
        return self._commands.get(name)

    async def dispatch(self, command: str, arguments: Mapping[str, Any]) -> Any:
        """Run a command; raises :class:`QmpError` for every failure (never another
        exception): unknown command, bad arguments, handler error."""
        cmd = self._commands.get(command)
        if cmd is None:
            raise QmpError(f"The command {command} has not been found", COMMAND_NOT_FOUND)
        args = cmd.check(arguments)
        try:
            result = cmd.handler(args)
            if inspect.isawaitable(result):
                result = await result
        except QmpError:
            raise
        except Exception as e:  # a handler bug must not take the connection down
            log.exception("QMP command %s failed", command)
            raise QmpError(f"{command}: {type(e).__name__}: {e}") from e
        return {} if result is None else result


@dataclass
class _Client:
    conn: QmpConnection
    writer: asyncio.StreamWriter


@dataclass
class QmpServer:
    """Serve a :class:`QmpCommandRegistry` on a UNIX socket.

    Built-ins: ``qmp_capabilities`` (in the core), ``query-commands``, ``query-version``.
    """

    registry: QmpCommandRegistry = field(default_factory=QmpCommandRegistry)
    version: tuple[int, int, int] = (0, 1, 0)
    package: str = "viommu-backend"
    max_line: int = DEFAULT_MAX_LINE
    _clients: list[_Client] = field(default_factory=list, repr=False)
    _server: asyncio.base_events.Server | None = field(default=None, repr=False)
    _path: str | None = field(default=None, repr=False)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if "query-commands" not in self.registry:
            self.registry.register("query-commands", self._query_commands)
        if "query-version" not in self.registry:
            self.registry.register("query-version", self._query_version)

    def _query_commands(self, args: dict[str, Any]) -> list[dict[str, str]]:
        return [{"name": n} for n in self.registry.names()]

    def _query_version(self, args: dict[str, Any]) -> dict[str, Any]:
        major, minor, micro = self.version
        return {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": self.package}

    def new_connection(self) -> QmpConnection:
        major, minor, micro = self.version
        return QmpConnection(make_greeting(major, minor, micro, self.package), self.max_line)

    # -- lifetime -------------------------------------------------------------------------
    async def start(self, path: str) -> None:
        if os.path.exists(path):
            os.unlink(path)
        self._path = path
        self._server = await asyncio.start_unix_server(self._serve_client, path=path)
        os.chmod(path, 0o600)  # the control socket can inject faults: owner only

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for c in list(self._clients):
            c.writer.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        if self._path and os.path.exists(self._path):
            os.unlink(self._path)
        self._path = None

    @property
    def clients(self) -> int:
        return len(self._clients)

    # -- events ---------------------------------------------------------------------------
    def emit(self, event: str, data: dict[str, Any] | None = None) -> int:
        """Send an event to every negotiated client; returns how many got it."""
        sent = 0
        for c in list(self._clients):
            msg = c.conn.event(event, data)
            if msg is None or c.writer.is_closing():
                continue
            c.writer.write(msg)
            sent += 1
        return sent

    # -- per client -----------------------------------------------------------------------
    async def _serve_client(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        client = _Client(self.new_connection(), writer)
        self._clients.append(client)
        try:
            writer.write(client.conn.greeting())
            await writer.drain()
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                for item in client.conn.feed(data):
                    if isinstance(item, Reply):
                        writer.write(item.data)
                    else:
                        writer.write(await self.execute(client.conn, item))
                    await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._clients.remove(client)
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    async def execute(self, conn: QmpConnection, req: Execute) -> bytes:
        try:
            result = await self.registry.dispatch(req.command, req.arguments)
        except QmpError as e:
            return conn.error(req, e.desc, e.cls)
        try:
            return conn.reply(req, result)
        except (TypeError, ValueError) as e:  # result not JSON-serialisable
            log.error("QMP command %s returned unserialisable data: %s", req.command, e)
            return conn.error(req, f"{req.command}: result is not JSON-serialisable: {e}")


__all__ = ["QmpServer", "QmpCommandRegistry", "QmpCommand", "ArgSpec", "QmpError",
           "GENERIC_ERROR", "COMMAND_NOT_FOUND"]
