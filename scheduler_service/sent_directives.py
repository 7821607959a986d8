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

import numpy as np
import numpy.typing as npt

from scheduler_service.domain import Action, DirectiveId, SessionId

_EMPTY = -1
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

    # NOTE: the sequence, epoch and action of each entry are numpy columns,
    # written by slice a batch at a time; the id itself is not kept (it is
    # its epoch and sequence). A ring of id strings freed one old string per
    # directive sent once full, which cost more than the rest of the entry.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._size = min(1024, capacity)  # grows by doubling up to capacity
        self._alloc(self._size)

    def _alloc(self, size: int) -> None:
        self._seq: npt.NDArray[np.int64] = np.full(size, _EMPTY, dtype=np.int64)
        self._epoch: npt.NDArray[np.int64] = np.zeros(size, dtype=np.int64)
        self._action: npt.NDArray[np.int8] = np.zeros(size, dtype=np.int8)
        self._sid: list[SessionId | None] = [None] * size

    def add(
        self,
        epoch: int,
        first_seq: int,
        sids: Sequence[SessionId],
        actions: Sequence[int] | npt.NDArray[np.integer],
    ) -> None:
        """Remember directives of ``epoch`` with sequences ``first_seq``, ``first_seq + 1``, …"""
        n = len(sids)
        if n == 1:  # the per-event path's case
            i = first_seq % self._size
            while self._seq[i] != _EMPTY and self._size < self.capacity:
                self._grow(2 * self._size)
                i = first_seq % self._size
            self._seq[i] = first_seq
            self._epoch[i] = epoch
            self._action[i] = actions[0]
            self._sid[i] = sids[0]
            return
        if n > self.capacity:  # only the newest fit
            skip = n - self.capacity
            sids, actions = sids[skip:], actions[skip:]
            first_seq, n = first_seq + skip, n - skip
        # grow (up to capacity) rather than overwrite a directive still unacked
        while self._size < self.capacity and (n > self._size or self._taken(first_seq, n)):
            self._grow(2 * self._size)
        size = self._size
        start = first_seq % size
        end = start + n
        seqs = np.arange(first_seq, first_seq + n, dtype=np.int64)
        if end <= size:
            self._seq[start:end] = seqs
            self._epoch[start:end] = epoch
            self._action[start:end] = actions
            self._sid[start:end] = sids
        else:
            cut = size - start
            rest = end - size
            self._seq[start:], self._seq[:rest] = seqs[:cut], seqs[cut:]
            self._epoch[start:] = epoch
            self._epoch[:rest] = epoch
            self._action[start:], self._action[:rest] = actions[:cut], actions[cut:]
            self._sid[start:], self._sid[:rest] = sids[:cut], sids[cut:]

    def _taken(self, first_seq: int, n: int) -> bool:
        # whether any of the n slots from first_seq holds a directive still unacked
        start = first_seq % self._size
        end = start + n
        if end <= self._size:
            return bool((self._seq[start:end] != _EMPTY).any())
        return bool(
            (self._seq[start:] != _EMPTY).any() or (self._seq[: end - self._size] != _EMPTY).any()
        )

    def _grow(self, size: int) -> None:
        live = self._live()
        seqs, epochs, actions = self._seq[live], self._epoch[live], self._action[live]
        sids = [self._sid[i] for i in live.tolist()]
        self._size = min(size, self.capacity)
        self._alloc(self._size)
        at = seqs % self._size
        self._seq[at], self._epoch[at], self._action[at] = seqs, epochs, actions
        for i, sid in zip(at.tolist(), sids, strict=True):
            self._sid[i] = sid

    def _live(self) -> npt.NDArray[np.intp]:
        # slots of every remembered directive, oldest first
        live = np.flatnonzero(self._seq != _EMPTY)
        return live[np.argsort(self._seq[live], kind="stable")]

    def pop(self, directive_id: DirectiveId) -> tuple[SessionId, Action] | None:
        """The session and action of an unacked directive, now forgotten; None for an
        id never sent, already acked, forgotten, or not of this engine's form."""
        parsed = parse_directive_id(directive_id)
        if parsed is None:
            return None
        epoch, seq = parsed
        i = seq % self._size
        if self._seq[i] != seq or self._epoch[i] != epoch:
            return None
        self._seq[i] = _EMPTY
        sid = self._sid[i]
        self._sid[i] = None
        return sid, Action(int(self._action[i]))  # type: ignore[return-value]

    def ids(self) -> list[DirectiveId]:
        """The ids still remembered, oldest first."""
        live = self._live()
        return [
            DirectiveId(f"d{e}-{s}")
            for e, s in zip(self._epoch[live].tolist(), self._seq[live].tolist(), strict=True)
        ]

    def __len__(self) -> int:
        return int(np.count_nonzero(self._seq != _EMPTY))

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
            if parsed is not None:
                self.add(parsed[0], parsed[1], [sid], [int(action)])

    def __getstate__(self) -> dict[str, object]:
        # only what is remembered: a snapshot does not carry the empty ring
        live = self._live()
        return {
            "capacity": self.capacity,
            "size": self._size,
            "did": self.ids(),
            "sid": [self._sid[i] for i in live.tolist()],
            "action": self._action[live].tolist(),
        }

    def __setstate__(self, state: dict[str, object]) -> None:
        self.capacity = state["capacity"]  # type: ignore[assignment]
        self._size = state["size"]  # type: ignore[assignment]
        self._alloc(self._size)
        self.restore(state["did"], state["sid"], state["action"])  # type: ignore[arg-type]
