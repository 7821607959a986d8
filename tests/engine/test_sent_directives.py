"""The ring of sent directives: what an ack finds, what it forgets, what a snapshot keeps."""

from __future__ import annotations

import pickle
from collections import OrderedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler_service.domain import Action, DirectiveId, SessionId
from scheduler_service.engine import Engine
from scheduler_service.sent_directives import SentDirectives


def _d(epoch: int, seq: int) -> DirectiveId:
    return DirectiveId(f"d{epoch}-{seq}")


def test_an_ack_finds_its_directive_once() -> None:
    sent = SentDirectives(1 << 10)
    sent.add(2, 1, [SessionId("a"), SessionId("b")], [1, 2])
    sent.add(2, 3, [SessionId("c")], [Action.RELEASE])
    assert sent.pop(_d(2, 2)) == ("b", Action.OFFLOAD_HOST)
    assert sent.pop(_d(2, 2)) is None  # acked twice: the second finds nothing
    assert sent.pop(_d(1, 1)) is None  # another leader's directive of the same sequence
    malformed = ("", "d", "x2-1", "d2-", "d-1", "d2-1-1", "d2-x", "2-1", "d2--1")
    not_as_written = ("d02-1", "d2-01", "d2-\u0661", f"d2-{1 << 64}")
    for bad in (*malformed, *not_as_written):
        assert sent.pop(DirectiveId(bad)) is None, bad
    assert sent.ids() == ["d2-1", "d2-3"]
    assert len(sent) == 2


def test_it_grows_rather_than_forget_an_unacked_directive_and_is_bounded() -> None:
    sent = SentDirectives(4096)
    for seq in range(1, 3001):
        sent.add(1, seq, [SessionId(f"s{seq}")], [Action.RETAIN_GPU])
    assert len(sent) == 3000  # past its first 1,024 slots: grown, nothing lost
    assert sent.pop(_d(1, 1)) == ("s1", Action.RETAIN_GPU)
    sids = [SessionId(f"t{i}") for i in range(2000)]
    sent.add(1, 3001, sids, [Action.RELEASE] * 2000)  # a batch that wraps the ring
    assert len(sent) == 4096  # at capacity: the oldest are forgotten
    assert sent.ids()[0] == "d1-905" and sent.ids()[-1] == "d1-5000"
    assert sent.pop(_d(1, 904)) is None
    assert sent.pop(_d(1, 4999)) == ("t1998", Action.RELEASE)


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("add"), st.integers(1, 40), st.just(0)),
            # sequences skipped: an engine restored from a snapshot goes on
            # from its own count
            st.tuples(st.just("add"), st.integers(1, 40), st.integers(1, 3000)),
            st.tuples(st.just("ack"), st.integers(0, 400), st.just(0)),
        ),
        max_size=60,
    ),
    capacity=st.sampled_from([8, 64, 2048]),
)
def test_it_answers_as_an_ordered_map_of_the_last_sequences_would(
    ops: list[tuple[str, int, int]], capacity: int
) -> None:
    # the model: id -> (session, action) of every directive among the last
    # ``capacity`` sequences sent, minus those acked
    sent = SentDirectives(capacity)
    model: OrderedDict[str, tuple[str, Action]] = OrderedDict()
    seq = 0
    for op, x, gap in ops:
        if op == "add":
            seq += gap
            sids = [SessionId(f"s{seq + i}") for i in range(x)]
            actions = [Action(1 + (seq + i) % 5) for i in range(x)]
            sent.add(3, seq + 1, sids, actions)
            for i in range(x):
                model[f"d3-{seq + 1 + i}"] = (sids[i], actions[i])
            seq += x
            for did in [d for d in model if int(d.partition("-")[2]) <= seq - capacity]:
                del model[did]
        else:
            did = _d(3, x if x <= 200 else seq - (x - 200))  # an old one, or a recent one
            assert sent.pop(did) == model.pop(did, None)
        assert sent.ids() == list(model)
    restored = pickle.loads(pickle.dumps(sent))
    assert restored == sent and restored.ids() == list(model)


def test_a_snapshot_from_before_the_ring_is_read() -> None:
    engine = Engine()
    state = engine.__getstate__()
    state["_unacked"] = OrderedDict(
        [("d1-7", (SessionId("a"), Action.RETAIN_GPU)), ("d1-9", (SessionId("b"), 4))]
    )
    old = Engine.__new__(Engine)
    old.__setstate__(state)
    assert old._unacked.ids() == ["d1-7", "d1-9"]
    assert old._unacked.pop(_d(1, 9)) == ("b", Action.RELEASE)


def test_sequences_only_grow_and_a_skipped_one_is_not_found() -> None:
    sent = SentDirectives(8)
    sent.add(1, 1, [SessionId("a"), SessionId("b"), SessionId("c")], [1, 2, 3])
    with pytest.raises(ValueError):
        sent.add(1, 3, [SessionId("x")], [1])
    assert sent.pop(_d(1, 2)) == ("b", Action.OFFLOAD_HOST)
    restored = pickle.loads(pickle.dumps(sent))
    assert restored.ids() == ["d1-1", "d1-3"]
    # the engine goes on from its own count: 4..11 were sent by no one here
    restored.add(1, 12, [SessionId("x")], [Action.RELEASE])
    assert restored.pop(_d(1, 11)) is None and restored.pop(_d(1, 4)) is None
    assert restored.pop(_d(1, 3)) is None  # older than the last 8 sequences
    assert restored.pop(_d(1, 12)) == ("x", Action.RELEASE)
