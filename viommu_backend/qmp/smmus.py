"""QMP over several SMMU functions: each SMMU's commands (``query-viommu``,
``viommu-translate``, ``query-viommu-stream``, the host and injection commands) are
registered once, with an optional ``smmu`` argument naming the function; the command
runs on that SMMU's own registry.  Without ``smmu`` it runs on the only SMMU, so clients
of a one-SMMU backend see no change; with several it is required.

``query-viommu-smmus`` -> ``[{name, bdf, root-complex, connected, endpoints: [{name, bdf,
stream-id}]}]``: the SMMU functions and the endpoints each translates.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from .protocol import QmpError
from .server import QmpCommandRegistry

SMMU_ARG = "smmu"


def register_smmu_commands(registry: QmpCommandRegistry, per_smmu: Mapping[str, QmpCommandRegistry],
                           describe: Callable[[], list[dict[str, Any]]]) -> None:
    """Register on ``registry`` every command of the per-SMMU registries (which all hold
    the same commands) plus ``query-viommu-smmus``."""
    registry.register("query-viommu-smmus", lambda _args: describe(),
                      doc="the SMMU functions: BDF, root complex, endpoints with their StreamIDs")
    if not per_smmu:
        return
    names = list(per_smmu)
    first = per_smmu[names[0]]
    for command in first.names():
        cmd = first.get(command)
        if cmd is None:  # qmp_capabilities
            continue
        if any(a.name == SMMU_ARG for a in cmd.args):
            raise ValueError(f"QMP command {command!r} already has an argument {SMMU_ARG!r}")
        schema = {("*" if a.optional else "") + a.name: a.kind for a in cmd.args}
        schema["*" + SMMU_ARG] = "str"
        registry.register(command, _dispatcher(command, per_smmu), schema, doc=cmd.doc)


def _dispatcher(command: str, per_smmu: Mapping[str, QmpCommandRegistry]) -> Callable[[dict[str, Any]], Any]:
    async def run(args: dict[str, Any]) -> Any:
        args = dict(args)
        name = args.pop(SMMU_ARG, None)
        if name is None:
            if len(per_smmu) > 1:
                raise QmpError(f"{command}: Parameter '{SMMU_ARG}' is missing (the backend has several "
                               f"SMMUs: {', '.join(per_smmu)})")
            name = next(iter(per_smmu))
        sub = per_smmu.get(name)
        if sub is None:
            raise QmpError(f"{command}: no SMMU {name!r} (SMMUs: {', '.join(per_smmu)})")
        return await sub.dispatch(command, args)

    return run
