"""The join store: votes before responses, upserts, withdrawals, duplicates, bounded state, atomic batches."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from rlhf_loop.core.contracts import Feedback, Interaction, Message, Sampling, feedback_id_for
from rlhf_loop.trainer.store import LabelStore

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


def interaction(rid: str, question: str = "Tell me about cats.", completion: str = "Oh, I love cats!") -> Interaction:
    return Interaction(response_id=rid, policy_version=0, model="m", messages=[Message(role="user", content=question)],
                       prompt_token_ids=[1, 2], completion=completion, completion_token_ids=[3, 4],
                       finish_reason="stop", sampling=Sampling(temperature=1.0, top_p=1.0, max_tokens=8))


def vote(rid: str, rating: int | None, user: str = "u1", seconds: float = 0.0, deleted: bool = False) -> Feedback:
    return Feedback(feedback_id=feedback_id_for(rid, 0, None, user), response_id=rid, rating=rating, user=user,
                    deleted=deleted, ts=T0 + timedelta(seconds=seconds))


@pytest.fixture
def store(tmp_path):
    s = LabelStore(tmp_path / "labels.sqlite", late_vote_window_s=100.0, dedupe_window_s=1000.0, prompt_pool_size=10)
    yield s
    s.close()


def test_a_vote_waits_for_its_response_then_becomes_a_label(store):
    v = vote("r1", 1)
    store.apply_batch([v], {("fb", 0): 1})
    assert store.examples() == [] and store.pending_votes() == 1 and store.label_count() == 0
    store.apply_batch([interaction("r1")], {("int", 0): 1})
    (ex,) = store.examples()
    assert (ex.response_id, ex.rating, ex.n_votes, ex.completion) == ("r1", 1.0, 1, "Oh, I love cats!")
    assert ex.messages == [{"role": "user", "content": "Tell me about cats."}]
    assert store.pending_votes() == 0 and store.label_count() == 1
    assert store.votes() == {v.feedback_id: 1.0}


def test_latest_vote_wins_and_older_ones_are_stale(store):
    store.apply_batch([interaction("r1"), vote("r1", 1, seconds=1)], {})
    r = store.apply_batch([vote("r1", -1, seconds=2)], {})  # the user changed their mind
    assert r.votes == 1 and store.examples()[0].rating == -1.0
    r = store.apply_batch([vote("r1", 1, seconds=1.5)], {})  # an older event redelivered late (new event id)
    assert r.stale == 1 and store.examples()[0].rating == -1.0


def test_withdrawal_removes_the_label_and_an_older_vote_cannot_resurrect_it(store):
    store.apply_batch([interaction("r1"), vote("r1", 1, seconds=1)], {})
    store.apply_batch([vote("r1", None, seconds=2, deleted=True)], {})
    assert store.examples() == [] and store.votes() == {}
    store.apply_batch([vote("r1", 1, seconds=1)], {})
    assert store.examples() == []
    store.apply_batch([vote("r1", 1, seconds=3)], {})  # a new vote after the withdrawal counts
    assert store.examples()[0].rating == 1.0


def test_duplicates_by_event_id_count_once(store):
    i, v = interaction("r1"), vote("r1", 1)
    r1 = store.apply_batch([i, v], {})
    r2 = store.apply_batch([i, v, v], {})
    assert (r1.interactions, r1.votes, r1.duplicates) == (1, 1, 0)
    assert (r2.interactions, r2.votes, r2.duplicates) == (0, 0, 3)
    assert store.examples()[0].n_votes == 1


def test_several_users_aggregate_to_mean_rating_and_vote_count(store):
    store.apply_batch([interaction("r1"), vote("r1", 1, "a"), vote("r1", 1, "b"), vote("r1", -1, "c")], {})
    (ex,) = store.examples()
    assert ex.n_votes == 3 and ex.rating == pytest.approx(1 / 3)


def test_label_count_counts_changes_after_a_watermark(store):
    store.apply_batch([interaction("r1"), vote("r1", 1)], {})
    mark = store.label_seq()
    assert store.label_count(since_seq=mark) == 0
    store.apply_batch([vote("r2", -1)], {})  # pending: not a label yet
    assert store.label_count(since_seq=mark) == 0
    store.apply_batch([interaction("r2")], {})  # joined now
    assert store.label_count(since_seq=mark) == 1
    store.apply_batch([vote("r1", -1, seconds=5)], {})  # a changed vote is a new label
    assert store.label_count(since_seq=mark) == 2


def test_prune_bounds_the_join_state(store):
    store.apply_batch([vote("late", 1)], {}, now=0.0)
    store.apply_batch([interaction("unvoted", question="Do you like rain?")], {}, now=0.0)
    store.apply_batch([interaction("kept"), vote("kept", 1)], {}, now=0.0)
    out = store.prune(now=50.0)  # inside the 100 s window: nothing goes
    assert out["expired_votes"] == 0 and out["unvoted_interactions"] == 0
    out = store.prune(now=150.0)
    assert out["expired_votes"] == 1 and out["unvoted_interactions"] == 1
    assert [e.response_id for e in store.examples()] == ["kept"]
    # the unvoted response's prompt stays in the pool for rollouts
    assert {m[0]["content"] for _, m in store.prompts()} == {"Do you like rain?", "Tell me about cats."}
    store.apply_batch([interaction("late")], {}, now=160.0)  # the vote expired: the response comes too late
    assert [e.response_id for e in store.examples()] == ["kept"]


def test_a_batch_is_all_or_nothing(store, monkeypatch):
    calls = []

    def failing(cur, ev, now):
        calls.append(ev)
        raise RuntimeError("disk full")

    monkeypatch.setattr(store, "_apply_feedback", failing)
    with pytest.raises(RuntimeError):
        store.apply_batch([interaction("r1"), vote("r1", 1)], {("t", 0): 2})
    assert calls and store.examples() == [] and store.consumed_offsets() == {}
    assert store.prompts() == []


def test_consumed_offsets_record_the_last_stored_batch_per_partition(store):
    store.apply_batch([], {("t", 0): 5, ("t", 1): 2})
    store.apply_batch([], {("t", 0): 3})  # e.g. a broker that restarted empty: offsets start over
    assert store.consumed_offsets() == {("t", 0): 3, ("t", 1): 2}


def test_no_voter_carries_more_than_the_cap(store):
    """One voter casting most of the votes is down-weighted to the cap; the others keep weight 1."""
    from rlhf_loop.trainer.store import voter_weights

    events = [interaction(f"r{i}") for i in range(12)]
    events += [vote(f"r{i}", 1, "flooder") for i in range(8)]  # 8 of the 12 votes, all up
    events += [vote(f"r{i}", -1, f"user{i}") for i in range(8, 12)]
    store.apply_batch(events, {})
    uncapped = store.examples()
    assert sum(e.n_votes for e in uncapped) == 12
    capped = store.examples(max_voter_share=0.25)
    flooder = sum(e.n_votes for e in capped if e.rating > 0)
    assert flooder / sum(e.n_votes for e in capped) == pytest.approx(0.25, abs=1e-6)
    assert all(e.n_votes == 1.0 for e in capped if e.rating < 0)
    assert store.voter_counts() == {"flooder": 8, **{f"user{i}": 1 for i in range(8, 12)}}
    # too few voters for the cap: everyone counts equally instead
    assert voter_weights(["a", "a", "a", "b"], 0.2) == {"a": 1 / 3, "b": 1.0}
