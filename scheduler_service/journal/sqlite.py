"""SQLite journal: WAL, synchronous=FULL, group commit in a writer thread.

One writer thread owns the connection. Appends from the event loop go on a
queue; the writer takes everything queued (up to ``max_batch``) into one
transaction, commits, then resolves the batch's futures on the loop. Under
load many records share one fsync, so durability costs little per event.

Each row carries a CRC32 of its payload; recovery stops at the first row whose
CRC does not match (a torn or corrupted tail) and reports what it dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import structlog

from scheduler_service.journal import LoadReport, Record, RecordKind, Snapshot

log = structlog.get_logger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS journal (
    -- AUTOINCREMENT: ids are never reused after a snapshot deletes the rows it covers.
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    now REAL NOT NULL,
    worker_id TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    payload BLOB NOT NULL,
    crc INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY,
    upto_id INTEGER NOT NULL,
    now REAL NOT NULL,
    blob BLOB NOT NULL,
    crc INTEGER NOT NULL
);
"""

_Item = tuple[Record | Snapshot | None, asyncio.Future[None], asyncio.AbstractEventLoop]


def _crc(r: Record) -> int:
    head = f"{r.kind}|{r.now!r}|{r.worker_id}|{r.epoch}|{r.seq}|".encode()
    return zlib.crc32(r.payload, zlib.crc32(head))


class SqliteJournal:
    """Group-committed journal in ``<data_dir>/journal.sqlite3``."""

    def __init__(self, data_dir: Path, max_batch: int = 4096, synchronous: str = "FULL") -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / "journal.sqlite3"
        self._max_batch = max_batch
        self._synchronous = synchronous
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._report = LoadReport(records=0, dropped=0, last_now=0.0)
        self.commits = 0
        self.records_written = 0
        self.snapshots_written = 0
        conn = self._connect()
        conn.executescript(_SCHEMA)
        conn.close()
        self._thread = threading.Thread(target=self._writer, name="kvsched-journal", daemon=True)
        self._thread.start()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        # NOTE: FULL fsyncs the WAL on every commit, so an acked record survives a
        # power cut, not only a process crash; group commit amortises the fsync.
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        return conn

    # -- loop side -------------------------------------------------------------

    def append(self, record: Record) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._queue.put((record, fut, loop))
        return fut

    def snapshot(self, snap: Snapshot) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._queue.put((snap, fut, loop))
        return fut

    def barrier(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._queue.put((None, fut, loop))
        return fut

    async def close(self) -> None:
        await self.barrier()
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)

    # -- recovery ----------------------------------------------------------------

    def load(self) -> tuple[Snapshot | None, Iterator[Record]]:
        conn = self._connect()
        try:
            snap_row = conn.execute(
                "SELECT upto_id, now, blob, crc FROM snapshots ORDER BY id DESC LIMIT 1"
            ).fetchone()
            upto = 0
            snap: Snapshot | None = None
            if snap_row is not None:
                upto, snap_now, blob, crc = snap_row
                if zlib.crc32(bytes(blob)) != crc:
                    # The records it covered are gone: recovering without it would be wrong.
                    raise RuntimeError(
                        f"snapshot in {self.path} is corrupt (CRC mismatch); restore the data"
                        " directory from a backup"
                    )
                snap = Snapshot(float(snap_now), bytes(blob))
            rows = conn.execute(
                "SELECT id, kind, now, worker_id, epoch, seq, payload, crc FROM journal"
                " WHERE id > ? ORDER BY id",
                (upto,),
            ).fetchall()
        finally:
            conn.close()
        records = self._check(rows, snap)
        return snap, records

    def _check(self, rows: list[tuple[Any, ...]], snap: Snapshot | None) -> Iterator[Record]:
        good = 0
        last_now = snap.now if snap else 0.0
        snap_now = snap.now if snap else None
        out: list[Record] = []
        for i, (rid, kind, now, wid, epoch, seq, payload, crc) in enumerate(rows):
            try:
                rec = Record(
                    RecordKind(kind), float(now), bytes(payload), wid, int(epoch), int(seq)
                )
            except (ValueError, TypeError):
                rec = None
            if rec is None or _crc(rec) != crc:
                dropped = len(rows) - i
                log.warning("journal.torn_tail", first_bad_id=rid, dropped=dropped)
                self._truncate_from(int(rid))
                self._report = LoadReport(good, dropped, last_now, snap_now)
                return iter(out)
            out.append(rec)
            good += 1
            last_now = rec.now
        self._report = LoadReport(good, 0, last_now, snap_now)
        return iter(out)

    def load_report(self) -> LoadReport:
        return self._report

    def _truncate_from(self, row_id: int) -> None:
        conn = self._connect()
        try:
            conn.execute("DELETE FROM journal WHERE id >= ?", (row_id,))
        finally:
            conn.close()

    # -- writer thread -----------------------------------------------------------

    def _writer(self) -> None:
        conn = self._connect()
        try:
            while True:
                first = self._queue.get()
                if first is None:
                    return
                batch = [first]
                stop = False
                while len(batch) < self._max_batch:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stop = True
                        break
                    batch.append(item)
                self._commit(conn, batch)
                if stop:
                    return
        finally:
            conn.close()

    def _commit(self, conn: sqlite3.Connection, batch: list[_Item]) -> None:
        # A snapshot covers exactly the records queued before it, so commit the
        # records ahead of it first, then the snapshot, then what follows.
        start = 0
        for i, (item, _, _) in enumerate(batch):
            if isinstance(item, Snapshot):
                self._commit_records(conn, batch[start:i])
                self._commit_snapshot(conn, batch[i])
                start = i + 1
        self._commit_records(conn, batch[start:])

    def _commit_snapshot(self, conn: sqlite3.Connection, item: _Item) -> None:
        snap, fut, loop = item
        assert isinstance(snap, Snapshot)
        error: BaseException | None = None
        try:
            conn.execute("BEGIN")
            upto = conn.execute("SELECT COALESCE(MAX(id), 0) FROM journal").fetchone()[0]
            cur = conn.execute(
                "INSERT INTO snapshots (upto_id, now, blob, crc) VALUES (?, ?, ?, ?)",
                (upto, snap.now, snap.blob, zlib.crc32(snap.blob)),
            )
            conn.execute("DELETE FROM snapshots WHERE id < ?", (cur.lastrowid,))
            conn.execute("DELETE FROM journal WHERE id <= ?", (upto,))
            conn.execute("COMMIT")
            self.snapshots_written += 1
        except sqlite3.Error as exc:
            log.error("journal.snapshot_failed", error=str(exc))
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            error = exc
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_resolve, [fut], error)

    def _commit_records(self, conn: sqlite3.Connection, batch: list[_Item]) -> None:
        if not batch:
            return
        rows = [
            (r.kind.value, r.now, r.worker_id, r.epoch, r.seq, r.payload, _crc(r))
            for r, _, _ in batch
            if isinstance(r, Record)
        ]
        error: BaseException | None = None
        if rows:
            try:
                conn.execute("BEGIN")
                conn.executemany(
                    "INSERT INTO journal (kind, now, worker_id, epoch, seq, payload, crc)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
                conn.execute("COMMIT")
                self.commits += 1
                self.records_written += len(rows)
            except sqlite3.Error as exc:  # disk full, I/O error: fail the batch, never ack it
                log.error("journal.commit_failed", error=str(exc), records=len(rows))
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                error = exc
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        for _, fut, loop in batch:
            by_loop.setdefault(loop, []).append(fut)
        for loop, futs in by_loop.items():
            # RuntimeError: the loop closed while we were committing.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, futs, error)


def _resolve(futs: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for f in futs:
        if f.done():
            continue
        if error is None:
            f.set_result(None)
        else:
            f.set_exception(error)
