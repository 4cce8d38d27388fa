"""DMA ownership of groups, as Linux's iommu core counts it (iommu.c ``owner_cnt``).

A group is either unowned, used by the DMA API (``dma-api``: drivers doing DMA through
the group's default domain; any number of users), or claimed by a user (``user``: VFIO /
iommufd, which takes the group off its default domain and attaches its own HWPTs).  A
claim of one kind fails with EBUSY while the other holds the group, and a user claim
fails with EBUSY while the group sits in a domain that is not its default one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .objects import BusyError, DomainError

DMA_API = "dma-api"
USER = "user"
OWNERS = (DMA_API, USER)


@dataclass
class Ownership:
    owner: str | None = None
    count: int = 0

    def describe(self) -> dict[str, Any]:
        return {"owner": self.owner, "count": self.count}


class Groups:
    """Owner counts by group key (:attr:`~.objects.Device.group_key`)."""

    def __init__(self) -> None:
        self._own: dict[Any, Ownership] = {}

    def of(self, key: Any) -> Ownership:
        return self._own.get(key, Ownership())

    def claim(self, key: Any, owner: str, *, default_domain: bool) -> bool:
        """Take one reference of ``owner`` on the group.  True when a user claim took
        the group (the caller moves it off its default domain)."""
        if owner not in OWNERS:
            raise DomainError(f"owner {owner!r}: one of {', '.join(OWNERS)}")
        o = self._own.setdefault(key, Ownership())
        if o.count and o.owner != owner:
            raise BusyError(f"group {_name(key)} is owned by {o.owner}")
        if owner == USER and not o.count and not default_domain:
            raise BusyError(f"group {_name(key)} is not in its default domain")
        o.owner = owner
        o.count += 1
        return owner == USER and o.count == 1

    def release(self, key: Any, owner: str) -> bool:
        """Drop one reference of ``owner``.  True when the user's ownership ended (the
        caller returns the group to its default domain)."""
        o = self._own.get(key)
        if o is None or not o.count or o.owner != owner:
            raise DomainError(f"group {_name(key)} is not claimed by {owner}")
        o.count -= 1
        if o.count:
            return False
        del self._own[key]
        return owner == USER

    def describe(self) -> dict[str, dict[str, Any]]:
        return {_name(k): o.describe() for k, o in self._own.items()}


def _name(key: Any) -> str:
    kind, v = key
    return f"sid {v:#x}" if kind == "sid" else str(v)
