"""Active/standby with a Redis leader lease and a fencing epoch.

Every replica starts as a standby: it loads the shared journal, then follows the
leader's appends so its state stays warm, answering UNAVAILABLE ("not the
leader") meanwhile. When the lease lapses, the first standby to take it gets a
new fencing epoch (INCR), catches up to the end of the journal, journals a
LEADER record (so directives carry the new epoch, in replays too) and starts
serving. The leader renews every ttl/3; if a renewal fails it has been deposed:
its writes are already fenced off in Redis, so it stops acking, and the process
exits so a supervisor restarts it as a standby.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import redis
import structlog

from scheduler_service.api.dispatch import Dispatcher
from scheduler_service.journal import Snapshot
from scheduler_service.journal.redis import LeaderLease, RedisJournal

log = structlog.get_logger(__name__)

#: Exit code of a leader that lost its lease.
EXIT_DEPOSED = 75


def _stream_id(s: str) -> tuple[int, int]:
    ms, seq = s.split("-")
    return int(ms), int(seq)


class HaController:
    """Runs the follow → promote → renew cycle of one replica."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        journal: RedisJournal,
        lease: LeaderLease,
        clock: Callable[[], float],
        on_promoted: Callable[[], object],
        on_deposed: Callable[[int], None],
    ) -> None:
        self._d = dispatcher
        self._j = journal
        self._lease = lease
        self._clock = clock
        self._on_promoted = on_promoted
        self._on_deposed = on_deposed
        self.period_s = lease.ttl_ms / 3000.0
        self.is_leader = False

    async def run(self) -> None:
        """Follow until the lease is ours, then serve and renew until stopped or deposed."""
        self._d.standby = True
        while True:
            try:
                if await self._lease.try_acquire():
                    break
                await self._follow()
            except redis.RedisError as exc:
                log.warning("ha.redis_unreachable", error=str(exc))
                await asyncio.sleep(self.period_s)
        await self._promote()
        while True:
            await asyncio.sleep(self.period_s)
            try:
                ok = await self._lease.renew()
            except redis.RedisError as exc:
                log.warning("ha.renew_failed", error=str(exc))
                ok = False  # cannot prove we still hold it: act as deposed
            if not ok:
                self.is_leader = False
                self._d.standby = True
                log.error("ha.deposed", epoch=self._lease.epoch)
                self._on_deposed(EXIT_DEPOSED)
                return

    async def _follow(self) -> None:
        client = self._j.client
        upto = await client.hget(self._j.keys.snapshot, "upto")
        if upto and _stream_id(upto.decode()) > _stream_id(self._j.last_id):
            # The leader snapshotted and trimmed past us: restart from its snapshot.
            h = await client.hgetall(self._j.keys.snapshot)
            snap = Snapshot(float(h[b"now"]), h[b"blob"])
            self._d.restore_snapshot(snap.blob)
            self._j.last_id = upto.decode()
            log.info("ha.standby_restored_snapshot", upto=self._j.last_id)
        for rec in await self._j.tail(block_ms=int(self.period_s * 1000)):
            self._d.apply_record(rec)

    async def _promote(self) -> None:
        while recs := await self._j.tail(block_ms=0):  # catch up to the end first
            for rec in recs:
                self._d.apply_record(rec)
        await self._d.become_leader(self._lease.epoch, self._clock())
        self._d.standby = False
        self.is_leader = True
        log.info("ha.promoted", epoch=self._lease.epoch, journal_last_id=self._j.last_id)
        result = self._on_promoted()
        if asyncio.iscoroutine(result):
            await result
