"""The SQLite journal: group commit, order, torn tails, failures."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
from pathlib import Path

import pytest

from scheduler_service.journal import Record, RecordKind
from scheduler_service.journal.sqlite import SqliteJournal


def rec(i: int) -> Record:
    return Record(RecordKind.WORKER_MESSAGE, float(i), f"payload-{i}".encode(), "w1", 1, i)


async def write(path: Path, n: int) -> SqliteJournal:
    j = SqliteJournal(path)
    await asyncio.gather(*(j.append(rec(i)) for i in range(1, n + 1)))
    await j.close()
    return j


async def test_appends_are_group_committed_and_reload_in_order(tmp_path: Path) -> None:
    j = await write(tmp_path, 500)
    assert j.records_written == 500
    assert j.commits < 500  # many records share one transaction
    again = SqliteJournal(tmp_path)
    got = list(again.load()[1])
    assert [r.seq for r in got] == list(range(1, 501))
    assert got[41] == rec(42)
    assert again.load_report().records == 500 and again.load_report().dropped == 0
    await again.close()


async def test_barrier_resolves_after_earlier_appends_are_durable(tmp_path: Path) -> None:
    j = SqliteJournal(tmp_path)
    first = j.append(rec(1))
    await j.barrier()
    assert first.done()
    await j.close()


async def test_corrupted_tail_is_dropped_and_reported(tmp_path: Path) -> None:
    await write(tmp_path, 10)
    conn = sqlite3.connect(tmp_path / "journal.sqlite3")
    conn.execute("UPDATE journal SET payload = ? WHERE seq = 8", (b"garbage",))
    conn.commit()
    conn.close()
    j = SqliteJournal(tmp_path)
    got = list(j.load()[1])
    assert [r.seq for r in got] == list(range(1, 8))
    report = j.load_report()
    assert (report.records, report.dropped, report.last_now) == (7, 3, 7.0)
    # The torn tail is gone for good: new appends follow the good prefix.
    await j.append(rec(99))
    await j.close()
    assert [r.seq for r in SqliteJournal(tmp_path).load()[1]] == [*range(1, 8), 99]


async def test_truncated_wal_keeps_every_fully_committed_batch(tmp_path: Path) -> None:
    j = SqliteJournal(tmp_path)
    for batch in range(5):  # five separate commits
        await asyncio.gather(*(j.append(rec(batch * 10 + i)) for i in range(1, 4)))
    # The on-disk image at a crash: database + WAL copied while the writer is live
    # (no checkpoint), then the WAL's last bytes cut as by a torn write.
    crash = tmp_path / "crash"
    crash.mkdir()
    for name in ("journal.sqlite3", "journal.sqlite3-wal"):
        shutil.copyfile(tmp_path / name, crash / name)
    await j.close()
    wal = crash / "journal.sqlite3-wal"
    with wal.open("r+b") as fh:
        fh.truncate(wal.stat().st_size - 100)
    got = [r.seq for r in SqliteJournal(crash).load()[1]]
    # Every batch before the torn one survives intact; the torn batch is gone whole.
    assert got in (
        [1, 2, 3, 11, 12, 13, 21, 22, 23, 31, 32, 33],
        [1, 2, 3, 11, 12, 13, 21, 22, 23, 31, 32, 33, 41, 42, 43],
    )
    assert len(got) % 3 == 0


async def test_a_failed_commit_fails_its_futures(tmp_path: Path) -> None:
    j = SqliteJournal(tmp_path)
    await j.append(rec(1))
    # Make the table read-only to force a commit error.
    conn = sqlite3.connect(tmp_path / "journal.sqlite3")
    conn.execute(
        "CREATE TRIGGER no_insert BEFORE INSERT ON journal BEGIN SELECT RAISE(ABORT, 'disk full'); END"
    )
    conn.commit()
    conn.close()
    with pytest.raises(sqlite3.Error):
        await j.append(rec(2))
    await j.close()


async def test_snapshot_covers_earlier_records_and_truncates_them(tmp_path: Path) -> None:
    from scheduler_service.journal import Snapshot

    j = SqliteJournal(tmp_path)
    for i in range(1, 6):
        j.append(rec(i))
    snap_done = j.snapshot(Snapshot(5.0, b"state-after-5"))
    for i in range(6, 9):
        j.append(rec(i))
    await snap_done
    await j.close()
    again = SqliteJournal(tmp_path)
    snap, records = again.load()
    assert snap == Snapshot(5.0, b"state-after-5")
    assert [r.seq for r in records] == [6, 7, 8]
    assert again.load_report().snapshot_now == 5.0
    await again.close()


async def test_corrupt_snapshot_refuses_to_start(tmp_path: Path) -> None:
    from scheduler_service.journal import Snapshot

    j = SqliteJournal(tmp_path)
    j.append(rec(1))
    await j.snapshot(Snapshot(1.0, b"state"))
    await j.close()
    conn = sqlite3.connect(tmp_path / "journal.sqlite3")
    conn.execute("UPDATE snapshots SET blob = ?", (b"other",))
    conn.commit()
    conn.close()
    with pytest.raises(RuntimeError, match=r"snapshot .* is corrupt"):
        SqliteJournal(tmp_path).load()
