"""What an ack needs of the directives the engine sent: a ring keyed by sequence.

A directive's id is ``d{leader epoch}-{sequence}``, the sequence counting every
directive the engine ever emitted. A worker's ack names the id; a REJECTED one
needs the directive's session and action back. The ring keeps them for the
last ``capacity`` sequences (a worker that never acks costs bounded memory),
in columns written a batch at a time: an OrderedDict of id → (session, action)
cost ~1 µs per directive to fill and trim, most of the compiled batch path's
cost per directive.
"""

from __future__ import annotations

from collections.abc import Sequence

from scheduler_service.domain import Action, DirectiveId, SessionId

_MAX = (1 << 63) - 1


def parse_directive_id(directive_id: str) -> tuple[int, int] | None:
    """(epoch, sequence) of an id of the engine's form ``d<epoch>-<sequence>``, else None."""
    head, dash, tail = directive_id.rpartition("-")
    digits = head[1:]
    if not (
        dash
        and head[:1] == "d"
        and digits.isascii()
        and digits.isdigit()
        and tail.isascii()
        and tail.isdigit()
    ):
        return None
    epoch, seq = int(digits), int(tail)
    if epoch > _MAX or seq > _MAX or f"d{epoch}-{seq}" != directive_id:
        return None  # out of range, or not as the engine writes it (a leading zero)
    return epoch, seq


class SentDirectives:
    """Session and action of each recent directive until it is acked.

    # NOTE: sequence ``q`` lives in slot ``q % size``, and sequences only grow,
    # so a slot's sequence is implied: the newest one of its residue up to the
    # last added. Entries are three plain lists (session, action, epoch),
    # written by slice a batch at a time; the id itself is not kept (it is
    # its epoch and sequence). A ring of id strings freed one old string per
    # directive once full, which cost more than the rest of the entry, and
    # numpy columns cost ~1 us per slice written, as much as the work.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._size = min(1024, capacity)  # grows by doubling up to capacity
        self._last = -1  # the newest sequence added
        self._alloc(self._size)

    def _alloc(self, size: int) -> None:
        self._sid: list[SessionId | None] = [None] * size
        self._action: list[int] = [0] * size
        self._epoch: list[int] = [0] * size

    def _seq_at(self, i: int) -> int:
        # the sequence slot i holds (when it holds one)
        return self._last - (self._last - i) % self._size

    def add(
        self,
        epoch: int,
        first_seq: int,
        sids: Sequence[SessionId],
        actions: Sequence[int],
    ) -> None:
        """Remember directives of ``epoch`` with sequences ``first_seq``, ``first_seq + 1``, …

        Sequences must grow: ``first_seq`` is past every sequence added before.
        Sequences skipped (an engine restored from a snapshot goes on from its
        own count) are remembered as acked.
        """
        if first_seq <= self._last:
            raise ValueError(f"sequence {first_seq} is not past {self._last}")
        n = len(sids)
        if n > self.capacity:  # only the newest fit
            skip = n - self.capacity
            sids, actions = sids[skip:], actions[skip:]
            first_seq, n = first_seq + skip, n - skip
        lo = first_seq if self._last < 0 else self._last + 1
        span = first_seq + n - lo  # the slots this add writes or empties
        # grow (up to capacity) rather than overwrite a directive still unacked
        while self._size < self.capacity and (
            span > self._size or self._taken(lo, min(span, self._size))
        ):
            self._grow(2 * self._size)
        size = self._size
        if lo < first_seq:
            self._clear(lo, min(first_seq - lo, size))
        start = first_seq % size
        if n == 1:  # the per-event path's case
            self._sid[start], self._action[start], self._epoch[start] = sids[0], actions[0], epoch
            self._last = first_seq
            return
        end = start + n
        epochs = [epoch] * n
        if end <= size:
            self._sid[start:end] = sids
            self._action[start:end] = actions
            self._epoch[start:end] = epochs
        else:
            cut = size - start
            rest = end - size
            self._sid[start:], self._sid[:rest] = sids[:cut], sids[cut:]
            self._action[start:], self._action[:rest] = actions[:cut], actions[cut:]
            self._epoch[start:], self._epoch[:rest] = epochs[:cut], epochs[cut:]
        self._last = first_seq + n - 1

    def _clear(self, first_seq: int, n: int) -> None:
        # empty the n slots from first_seq's (n <= size)
        start = first_seq % self._size
        end = start + n
        if end <= self._size:
            self._sid[start:end] = [None] * n
        else:
            self._sid[start:] = [None] * (self._size - start)
            self._sid[: end - self._size] = [None] * (end - self._size)

    def _taken(self, first_seq: int, n: int) -> bool:
        # whether any of the n slots from first_seq holds a directive still unacked
        start = first_seq % self._size
        end = start + n
        if end <= self._size:
            return self._sid[start:end].count(None) != n
        return (self._sid[start:].count(None) + self._sid[: end - self._size].count(None)) != n

    def _grow(self, size: int) -> None:
        # the last ``old`` sequences, oldest first, to their slots in the bigger ring
        old = self._size
        oldest = (self._last + 1) % old  # slot of the oldest sequence the ring can hold
        sids = self._sid[oldest:] + self._sid[:oldest]
        actions = self._action[oldest:] + self._action[:oldest]
        epochs = self._epoch[oldest:] + self._epoch[:oldest]
        self._size = min(size, self.capacity)
        self._alloc(self._size)
        start = (self._last - old + 1) % self._size
        cut = min(old, self._size - start)
        self._sid[start : start + cut], self._sid[: old - cut] = sids[:cut], sids[cut:]
        self._action[start : start + cut], self._action[: old - cut] = actions[:cut], actions[cut:]
        self._epoch[start : start + cut], self._epoch[: old - cut] = epochs[:cut], epochs[cut:]

    def _live(self) -> list[tuple[int, int]]:
        # (sequence, slot) of every remembered directive, oldest first
        seq_at = self._seq_at
        return sorted((seq_at(i), i) for i, sid in enumerate(self._sid) if sid is not None)

    def pop(self, directive_id: DirectiveId) -> tuple[SessionId, Action] | None:
        """The session and action of an unacked directive, now forgotten; None for an
        id never sent, already acked, forgotten, or not of this engine's form."""
        parsed = parse_directive_id(directive_id)
        if parsed is None:
            return None
        epoch, seq = parsed
        i = seq % self._size
        sid = self._sid[i]
        if sid is None or self._seq_at(i) != seq or self._epoch[i] != epoch:
            return None
        self._sid[i] = None
        return sid, Action(self._action[i])

    def ids(self) -> list[DirectiveId]:
        """The ids still remembered, oldest first."""
        return [DirectiveId(f"d{self._epoch[i]}-{seq}") for seq, i in self._live()]

    def __len__(self) -> int:
        return self._size - self._sid.count(None)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SentDirectives) and self.__getstate__() == other.__getstate__()

    __hash__ = None  # type: ignore[assignment]

    def restore(
        self, dids: Sequence[DirectiveId], sids: Sequence[SessionId], actions: Sequence[int]
    ) -> None:
        """Remember directives by id alone, oldest first (a snapshot's, or the map
        of an engine from before the ring): each id carries its epoch and sequence."""
        for did, sid, action in zip(dids, sids, actions, strict=True):
            parsed = parse_directive_id(did)
            if parsed is not None and parsed[1] > self._last:
                self.add(parsed[0], parsed[1], [sid], [int(action)])

    def __getstate__(self) -> dict[str, object]:
        # only what is remembered: a snapshot does not carry the empty ring
        live = self._live()
        return {
            "capacity": self.capacity,
            "size": self._size,
            "did": [f"d{self._epoch[i]}-{seq}" for seq, i in live],
            "sid": [self._sid[i] for _seq, i in live],
            "action": [int(self._action[i]) for _seq, i in live],
        }

    def __setstate__(self, state: dict[str, object]) -> None:
        self.capacity = state["capacity"]  # type: ignore[assignment]
        self._size = state["size"]  # type: ignore[assignment]
        self._last = -1
        self._alloc(self._size)
        self.restore(state["did"], state["sid"], state["action"])  # type: ignore[arg-type]
