"""Redis journal and leader lease: shared state for active/standby schedulers.

Layout under ``kvsched:{cell}:``
  ``journal``   a Stream; one entry per record (fields k, n, w, e, s, p, c)
  ``snapshot``  a hash: blob, now, upto (last stream id it covers), crc
  ``leader``    the lease: a token, SET NX PX, renewed by its holder
  ``epoch``     the fencing counter, INCR on every takeover

Every write is a Lua script that first checks the caller still holds the lease,
so a deposed leader (paused, partitioned) can never append after a takeover:
its writes fail with FENCED, its futures fail, and it never acks again.

Durability is Redis's: run it with ``appendonly yes`` and ``appendfsync always``
(or ``everysec`` and accept up to a second of acked loss on a power cut), and set
``wait_replicas`` to make each group commit wait for replicas (``WAIT``).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import zlib
from collections.abc import Iterator
from typing import Any

import redis
import redis.asyncio as aioredis
import structlog

from scheduler_service.journal import LoadReport, Record, RecordKind, Snapshot

log = structlog.get_logger(__name__)

_APPEND = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return redis.error_reply('FENCED') end
local last = ''
for i = 2, #ARGV, 7 do
  last = redis.call('XADD', KEYS[2], '*', 'k', ARGV[i], 'n', ARGV[i+1], 'w', ARGV[i+2],
                    'e', ARGV[i+3], 's', ARGV[i+4], 'p', ARGV[i+5], 'c', ARGV[i+6])
end
return last
"""

_SNAPSHOT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return redis.error_reply('FENCED') end
redis.call('HSET', KEYS[3], 'blob', ARGV[2], 'now', ARGV[3], 'upto', ARGV[4], 'crc', ARGV[5])
if ARGV[4] ~= '0-0' then
  redis.call('XTRIM', KEYS[2], 'MINID', ARGV[6])
end
return 1
"""

_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return 0
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Fenced(RuntimeError):
    """This process no longer holds the leader lease."""


def _crc(r: Record) -> int:
    head = f"{r.kind}|{r.now!r}|{r.worker_id}|{r.epoch}|{r.seq}|".encode()
    return zlib.crc32(r.payload, zlib.crc32(head))


def _next_id(stream_id: str) -> str:
    ms, seq = stream_id.split("-")
    return f"{ms}-{int(seq) + 1}"


def _decode(fields: dict[bytes, bytes]) -> Record | None:
    try:
        rec = Record(
            RecordKind(fields[b"k"].decode()),
            float(fields[b"n"]),
            fields[b"p"],
            fields[b"w"].decode(),
            int(fields[b"e"]),
            int(fields[b"s"]),
        )
    except (KeyError, ValueError):
        return None
    return rec if _crc(rec) == int(fields[b"c"]) else None


class RedisKeys:
    """Key names of one scheduler cell."""

    def __init__(self, cell: str) -> None:
        p = f"kvsched:{cell}:"
        self.journal, self.snapshot = p + "journal", p + "snapshot"
        self.leader, self.epoch = p + "leader", p + "epoch"


class LeaderLease:
    """The leader lease with a fencing epoch; ``token`` is what the write scripts check."""

    def __init__(self, client: Any, cell: str, ttl_s: float, server_id: str) -> None:
        # NOTE: redis-py's return types are unions over decode settings; we use raw bytes.
        self._r: Any = client
        self.keys = RedisKeys(cell)
        self.ttl_ms = max(100, int(ttl_s * 1000))
        self.token = f"{server_id}:{secrets.token_hex(8)}"
        self.epoch = 0

    async def try_acquire(self) -> bool:
        """Take the lease if nobody holds it; on success ``epoch`` is the new fencing epoch."""
        epoch = await self._r.eval(
            _ACQUIRE, 2, self.keys.leader, self.keys.epoch, self.token, self.ttl_ms
        )
        if int(epoch):
            self.epoch = int(epoch)
            return True
        return False

    async def renew(self) -> bool:
        """Extend the lease; False when it was lost (expired and taken, or deleted)."""
        ok = await self._r.eval(_RENEW, 1, self.keys.leader, self.token, self.ttl_ms)
        return bool(int(ok))

    async def release(self) -> None:
        """Give the lease up (clean shutdown) so a standby takes over at once."""
        with contextlib.suppress(redis.RedisError):
            await self._r.eval(_RELEASE, 1, self.keys.leader, self.token)

    async def holder(self) -> str | None:
        """Token of the current holder, if any."""
        v = await self._r.get(self.keys.leader)
        return v.decode() if v else None


class RedisJournal:
    """Group-committed, fenced journal in a Redis Stream."""

    def __init__(
        self,
        url: str,
        cell: str,
        lease: LeaderLease | None = None,
        wait_replicas: int = 0,
        max_batch: int = 2048,
    ) -> None:
        self.url = url
        self.keys = RedisKeys(cell)
        self.lease = lease
        self.wait_replicas = wait_replicas
        self.max_batch = max_batch
        self._r: Any = aioredis.Redis.from_url(url)
        self._q: asyncio.Queue[tuple[Record | Snapshot | None, asyncio.Future[None]]] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._report = LoadReport(0, 0, 0.0)
        self.last_id = "0-0"  # last stream id applied (load/tail) or written
        self.commits = 0

    @property
    def client(self) -> Any:
        """The asyncio client (shared with the lease)."""
        return self._r

    def _token(self) -> str:
        if self.lease is None:
            raise Fenced("no leader lease held")
        return self.lease.token

    # -- loop side -------------------------------------------------------------

    def _queue(self) -> asyncio.Queue[tuple[Record | Snapshot | None, asyncio.Future[None]]]:
        if self._q is None:
            self._q = asyncio.Queue()
            self._writer = asyncio.get_running_loop().create_task(self._write_loop())
        return self._q

    def append(self, record: Record) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue().put_nowait((record, fut))
        return fut

    def barrier(self) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue().put_nowait((None, fut))
        return fut

    def snapshot(self, snap: Snapshot) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue().put_nowait((snap, fut))
        return fut

    async def close(self) -> None:
        if self._q is not None:
            # A fenced (deposed) leader cannot flush; what it could not write was never acked.
            with contextlib.suppress(redis.RedisError, Fenced):
                await self.barrier()
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        await self._r.aclose()

    async def _write_loop(self) -> None:
        q = self._q
        assert q is not None
        while True:
            batch = [await q.get()]
            while len(batch) < self.max_batch and not q.empty():
                batch.append(q.get_nowait())
            start = 0
            for i, (item, _) in enumerate(batch):
                if isinstance(item, Snapshot):
                    await self._commit(batch[start:i])
                    await self._commit_snapshot(batch[i])
                    start = i + 1
            await self._commit(batch[start:])

    async def _commit(
        self, batch: list[tuple[Record | Snapshot | None, asyncio.Future[None]]]
    ) -> None:
        if not batch:
            return
        args: list[Any] = []
        for r, _ in batch:
            if isinstance(r, Record):
                args += [r.kind.value, repr(r.now), r.worker_id, r.epoch, r.seq, r.payload, _crc(r)]
        error: BaseException | None = None
        if args:
            try:
                last = await self._r.eval(
                    _APPEND, 2, self.keys.leader, self.keys.journal, self._token(), *args
                )
                self.last_id = last.decode() if isinstance(last, bytes) else str(last)
                if self.wait_replicas:
                    await self._r.execute_command("WAIT", self.wait_replicas, 1000)
                self.commits += 1
            except redis.ResponseError as exc:
                error = Fenced(str(exc)) if "FENCED" in str(exc) else exc
            except (redis.RedisError, Fenced) as exc:
                error = exc
            if error is not None:
                log.error("journal.redis_append_failed", error=str(error), records=len(args) // 7)
        for _, fut in batch:
            if not fut.done():
                fut.set_result(None) if error is None else fut.set_exception(error)

    async def _commit_snapshot(
        self, item: tuple[Record | Snapshot | None, asyncio.Future[None]]
    ) -> None:
        snap, fut = item
        assert isinstance(snap, Snapshot)
        upto = self.last_id
        try:
            await self._r.eval(
                _SNAPSHOT,
                3,
                self.keys.leader,
                self.keys.journal,
                self.keys.snapshot,
                self._token(),
                snap.blob,
                repr(snap.now),
                upto,
                zlib.crc32(snap.blob),
                _next_id(upto),
            )
            fut.set_result(None)
        except (redis.RedisError, Fenced) as exc:
            fut.set_exception(Fenced(str(exc)) if "FENCED" in str(exc) else exc)

    # -- recovery and tailing ----------------------------------------------------

    def load(self) -> tuple[Snapshot | None, Iterator[Record]]:
        r: Any = redis.Redis.from_url(self.url)
        try:
            h = r.hgetall(self.keys.snapshot)
            snap: Snapshot | None = None
            start = "-"
            if h:
                blob = h[b"blob"]
                if zlib.crc32(blob) != int(h[b"crc"]):
                    raise RuntimeError(
                        f"snapshot in {self.keys.snapshot} is corrupt (CRC mismatch)"
                    )
                snap = Snapshot(float(h[b"now"]), blob)
                self.last_id = h[b"upto"].decode()
                if self.last_id != "0-0":
                    start = "(" + self.last_id
            records = self._read_from(r, start, snap)
        finally:
            r.close()
        return snap, iter(records)

    def _read_from(self, r: Any, start: str, snap: Snapshot | None) -> list[Record]:
        out: list[Record] = []
        dropped = 0
        last_now = snap.now if snap else 0.0
        while True:
            chunk = r.xrange(self.keys.journal, min=start, max="+", count=5000)
            if not chunk:
                break
            for sid, fields in chunk:
                rec = _decode(fields)
                if rec is None:
                    dropped += 1
                    log.warning("journal.redis_bad_entry", id=sid.decode())
                    continue
                out.append(rec)
                last_now = rec.now
                self.last_id = sid.decode()
            start = "(" + self.last_id
        self._report = LoadReport(len(out), dropped, last_now, snap.now if snap else None)
        return out

    async def tail(self, block_ms: int = 200) -> list[Record]:
        """Records appended since the last one seen; waits up to ``block_ms`` (0: no wait)."""
        # NOTE: Redis reads BLOCK 0 as "forever"; no wait means no BLOCK argument.
        resp = await self._r.xread(
            {self.keys.journal: self.last_id}, count=5000, block=block_ms if block_ms > 0 else None
        )
        out: list[Record] = []
        for _, entries in resp or []:
            for sid, fields in entries:
                rec = _decode(fields)
                self.last_id = sid.decode()
                if rec is not None:
                    out.append(rec)
        return out

    def load_report(self) -> LoadReport:
        return self._report
