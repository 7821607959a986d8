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


def _seq(directive_id: str) -> int | None:
    # the sequence of an id of this engine's form (d<epoch>-<seq>), else None
    _head, dash, seq = directive_id.rpartition("-")
    return int(seq) if dash and seq.isdigit() else None


class SentDirectives:
    """Session and action of each recent directive until it is acked.

    # NOTE: plain lists, written by slices: a batch's directives go in with
    # three C-level slice assignments (numpy's per-call cost is as much as
    # the work at a few dozen directives a batch).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._size = min(1024, capacity)  # grows by doubling up to capacity
        self._alloc(self._size)

    def _alloc(self, size: int) -> None:
        self._did: list[DirectiveId | None] = [None] * size
        self._sid: list[SessionId | None] = [None] * size
        self._action: list[int] = [0] * size

    def add(
        self,
        first_seq: int,
        dids: Sequence[DirectiveId],
        sids: Sequence[SessionId],
        actions: Sequence[int],
    ) -> None:
        """Remember directives ``dids``, of sequences ``first_seq``, ``first_seq + 1``, …"""
        n = len(dids)
        if n == 1:  # the per-event path's case
            i = first_seq % self._size
            while self._did[i] is not None and self._size < self.capacity:
                self._grow(2 * self._size)
                i = first_seq % self._size
            self._did[i], self._sid[i], self._action[i] = dids[0], sids[0], actions[0]
            return
        if n > self.capacity:  # only the newest fit
            skip = n - self.capacity
            dids, sids, actions = dids[skip:], sids[skip:], actions[skip:]
            first_seq, n = first_seq + skip, n - skip
        # grow (up to capacity) rather than overwrite a directive still unacked
        while self._size < self.capacity and (n > self._size or self._taken(first_seq, n)):
            self._grow(2 * self._size)
        size = self._size
        start = first_seq % size
        end = start + n
        if end <= size:
            self._did[start:end] = dids
            self._sid[start:end] = sids
            self._action[start:end] = actions
        else:
            cut = size - start
            self._did[start:], self._did[: end - size] = dids[:cut], dids[cut:]
            self._sid[start:], self._sid[: end - size] = sids[:cut], sids[cut:]
            self._action[start:], self._action[: end - size] = actions[:cut], actions[cut:]

    def _taken(self, first_seq: int, n: int) -> bool:
        # whether any of the n slots from first_seq holds a directive still unacked
        start = first_seq % self._size
        end = start + n
        if end <= self._size:
            return self._did[start:end].count(None) != n
        return (self._did[start:].count(None) + self._did[: end - self._size].count(None)) != n

    def _grow(self, size: int) -> None:
        dids, sids, actions = self._did, self._sid, self._action
        live = self._live()
        self._size = min(size, self.capacity)
        self._alloc(self._size)
        size = self._size
        for i, seq in live:
            at = seq % size
            self._did[at], self._sid[at], self._action[at] = dids[i], sids[i], actions[i]

    def _live(self) -> list[tuple[int, int]]:
        # (slot, sequence) of every remembered directive, oldest first
        live = [(i, _seq(d)) for i, d in enumerate(self._did) if d is not None]
        return sorted(live, key=lambda x: x[1])  # type: ignore[arg-type]

    def pop(self, directive_id: DirectiveId) -> tuple[SessionId, Action] | None:
        """The session and action of an unacked directive, now forgotten; None for an
        id never sent, already acked, forgotten, or not of this engine's form."""
        seq = _seq(directive_id)
        if seq is None:
            return None
        i = seq % self._size
        if self._did[i] != directive_id:
            return None
        self._did[i] = None
        sid = self._sid[i]
        self._sid[i] = None
        return sid, Action(self._action[i])  # type: ignore[return-value]

    def ids(self) -> list[DirectiveId]:
        """The ids still remembered, oldest first."""
        return [self._did[i] for i, _seq in self._live()]  # type: ignore[misc]

    def __len__(self) -> int:
        return self._size - self._did.count(None)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SentDirectives) and self.__getstate__() == other.__getstate__()

    __hash__ = None  # type: ignore[assignment]

    def restore(
        self, dids: Sequence[DirectiveId], sids: Sequence[SessionId], actions: Sequence[int]
    ) -> None:
        """Remember directives by id alone, oldest first (a snapshot's, or the map
        of an engine from before the ring): each id carries its sequence."""
        for did, sid, action in zip(dids, sids, actions, strict=True):
            seq = _seq(did)
            if seq is not None:
                self.add(seq, [did], [sid], [action])

    def __getstate__(self) -> dict[str, object]:
        # only what is remembered: a snapshot does not carry the empty ring
        live = self._live()
        return {
            "capacity": self.capacity,
            "size": self._size,
            "did": [self._did[i] for i, _ in live],
            "sid": [self._sid[i] for i, _ in live],
            "action": [int(self._action[i]) for i, _ in live],
        }

    def __setstate__(self, state: dict[str, object]) -> None:
        self.capacity = state["capacity"]  # type: ignore[assignment]
        self._size = state["size"]  # type: ignore[assignment]
        self._alloc(self._size)
        self.restore(state["did"], state["sid"], state["action"])  # type: ignore[arg-type]
