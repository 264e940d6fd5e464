"""Requests awaiting a reply, by the correlation id the bridge gave them (pure code, no I/O).

An RPC target replaces a request's reply-to with the broker's own reply address and its
correlation id with one it generates; the reply comes back with that id, and this map says
where it goes (the original reply-to) and which correlation id it had.  Bounded: an entry
expires after its timeout and, when ``limit`` entries are pending, the oldest is evicted to
make room.  Both are counted (``expired``, ``evicted``): a reply that comes after is unknown.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(slots=True)
class Pending:
    created: float
    deadline: float
    reply_to: str  # the request's reply-to as the target's protocol names it
    correlation_id: bytes | None  # the request's own, restored on the reply
    owner: object  # what receives the reply (the channel consuming the reply address)


class PendingReplies:
    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        # One FIFO per timeout: within one, insertion order is deadline order, so expiry and
        # eviction only ever look at the heads.  Timeouts come from configuration: few.
        self._by_timeout: dict[float, OrderedDict[str, Pending]] = {}
        self._size = 0
        self.expired = 0  # no reply within the timeout, or the owner went away
        self.evicted = 0  # forgotten early because ``limit`` entries were pending

    def __len__(self) -> int:
        return self._size

    def add(
        self,
        cid: str,
        reply_to: str,
        correlation_id: bytes | None,
        *,
        timeout: float,
        owner: object,
        now: float,
    ) -> Pending | None:
        """Remember a request; returns the entry evicted to make room, if any."""
        evicted = None
        if self._size >= self.limit:
            evicted = self._evict_oldest()
        fifo = self._by_timeout.get(timeout)
        if fifo is None:
            fifo = self._by_timeout[timeout] = OrderedDict()
        fifo[cid] = Pending(now, now + timeout, reply_to, correlation_id, owner)
        self._size += 1
        return evicted

    def take(self, cid: str) -> Pending | None:
        """The entry for a reply's correlation id, removed; None when unknown or expired."""
        for fifo in self._by_timeout.values():
            entry = fifo.pop(cid, None)
            if entry is not None:
                self._size -= 1
                return entry
        return None

    def discard(self, cid: str) -> None:
        """Forget a request that was never delivered (refused by the broker): not counted."""
        self.take(cid)

    def expire(self, now: float) -> list[Pending]:
        """Remove and count the entries whose deadline has passed."""
        out: list[Pending] = []
        for fifo in self._by_timeout.values():
            while fifo:
                cid = next(iter(fifo))
                if fifo[cid].deadline > now:
                    break
                out.append(fifo.pop(cid))
        self._size -= len(out)
        self.expired += len(out)
        return out

    def drop_owner(self, owner: object) -> list[Pending]:
        """Remove and count as expired every entry of ``owner``, whose replies can no longer
        arrive (its channel closed)."""
        out: list[Pending] = []
        for fifo in self._by_timeout.values():
            gone = [cid for cid, entry in fifo.items() if entry.owner is owner]
            out.extend(fifo.pop(cid) for cid in gone)
        self._size -= len(out)
        self.expired += len(out)
        return out

    def next_deadline(self) -> float | None:
        heads = [fifo[next(iter(fifo))].deadline for fifo in self._by_timeout.values() if fifo]
        return min(heads) if heads else None

    def _evict_oldest(self) -> Pending | None:
        oldest: tuple[float, OrderedDict[str, Pending], str] | None = None
        for fifo in self._by_timeout.values():
            if fifo:
                cid = next(iter(fifo))
                created = fifo[cid].created
                if oldest is None or created < oldest[0]:
                    oldest = (created, fifo, cid)
        if oldest is None:
            return None
        _, fifo, cid = oldest
        self._size -= 1
        self.evicted += 1
        return fifo.pop(cid)
