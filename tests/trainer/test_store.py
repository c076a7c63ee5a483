"""The join store: votes before responses, upserts, withdrawals, duplicates, bounded state, atomic batches."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta, timezone

import pytest

from rlhf_loop.core.contracts import Feedback, Interaction, Message, Sampling, feedback_id_for
from rlhf_loop.trainer.store import (
    Behaviour, LabelStore, approval_points, connect_read_only, read_approval, read_labels, read_preferences,
)

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


def interaction(rid: str, question: str = "Tell me about cats.", completion: str = "Oh, I love cats!") -> Interaction:
    return Interaction(response_id=rid, policy_version=0, model="m", messages=[Message(role="user", content=question)],
                       prompt_token_ids=[1, 2], completion=completion, completion_token_ids=[3, 4],
                       finish_reason="stop", sampling=Sampling(temperature=1.0, top_p=1.0, max_tokens=8))


def vote(rid: str, rating: int | None, user: str = "u1", seconds: float = 0.0, deleted: bool = False,
         identity: str | None = None) -> Feedback:
    """A vote by `user`; with `identity` as the service writes it: under that identity, its voter identity/user."""
    return Feedback(feedback_id=feedback_id_for(rid, 0, None, f"{identity}/{user}" if identity else user),
                    response_id=rid, rating=rating, user=user, deleted=deleted, ts=T0 + timedelta(seconds=seconds),
                    identity=identity, voter=f"{identity}/{user}" if identity else None)


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
    # events from before identities: each voter is its own identity
    assert store.voter_counts() == {("flooder", "flooder"): 8, **{(f"user{i}", f"user{i}"): 1 for i in range(8, 12)}}
    # too few voters for the cap: everyone counts equally instead
    assert voter_weights([("a", "a")] * 3 + [("b", "b")], 0.2) == {("a", "a"): 1 / 3, ("b", "b"): 1.0}


def test_capped_level_by_hand():
    from rlhf_loop.trainer.store import capped_level

    assert capped_level([1, 1, 1, 1, 8], 0.25) == pytest.approx(4 / 3)  # 4/3 of 16/3: a quarter
    assert capped_level([10] * 5 + [1000], 0.2) == pytest.approx(12.5)  # 12.5 of 62.5: a fifth
    assert capped_level([80, 10, 10, 10, 10, 1000], 0.2) == pytest.approx(40 / 3)  # two cut: 40/3 of 200/3
    assert capped_level([3, 1], 0.2) == 1  # fewer than 1 / cap: all count as the smallest
    assert capped_level([5, 5, 5, 5, 5], 0.2) == float("inf")  # nobody above a fifth: nothing cut
    assert capped_level([7], 0.2) == 7


def test_capped_level_is_water_filling():
    """Against the definition on random totals: the cut totals keep to the cap, and a higher level would not."""
    import random

    from rlhf_loop.trainer.store import capped_level

    rng = random.Random(0)
    for _ in range(500):
        cap = rng.choice([0.1, 0.2, 0.25, 0.3, 0.5])
        totals = [rng.choice([1, 2, 3, 10, 50, 400]) * rng.random() + 0.01 for _ in range(rng.randint(1 + int(1 / cap), 30))]
        level = capped_level(totals, cap)
        cut = [min(t, level) for t in totals]
        assert max(cut) <= cap * sum(cut) + 1e-9
        if level != float("inf"):
            higher = [min(t, level * 1.001) for t in totals]
            assert max(higher) > cap * sum(higher)


def test_a_key_inventing_users_carries_no_more_than_its_share():
    """One API key votes as 1,000 invented users, five client addresses 10 times each: the key, as a whole,
    carries a fifth of the weight; within it, its users keep equal weights; the addresses keep weight 1."""
    from rlhf_loop.trainer.store import voter_weights

    key = [("key:k", f"key:k/user{i}") for i in range(1000)]
    addresses = [(f"address:a{j}", f"address:a{j}") for j in range(5) for _ in range(10)]
    w = voter_weights(key + addresses, 0.2)
    assert all(w[v] == pytest.approx(12.5 / 1000) for v in key)  # the level: 12.5 of 62.5
    assert all(w[v] == 1.0 for v in addresses)
    assert sum(w[v] for v in key) / sum(w[v] for v in key + addresses) == pytest.approx(0.2)


def test_inside_an_identity_no_voter_carries_more_than_the_share_of_it():
    """A key's one loud user among its quiet ones is capped within the key; the key alone is not cut (it is
    the only identity); an address beside it is an identity of its own."""
    from rlhf_loop.trainer.store import voter_weights

    votes = [("key:k", "key:k/loud")] * 8 + [("key:k", f"key:k/u{i}") for i in range(4)]
    w = voter_weights(votes, 0.25)
    assert w[("key:k", "key:k/loud")] == pytest.approx((4 / 3) / 8) and w[("key:k", "key:k/u0")] == 1.0
    # with four quiet addresses beside it (five identities), the key as a whole is cut to a quarter as well
    w = voter_weights(votes + [(f"address:{j}", f"address:{j}") for j in range(4)], 0.25)
    key_total = 4 + 4 / 3  # the loud user cut to 4/3 inside the key, then the key cut to 4/3
    assert w[("key:k", "key:k/u0")] == pytest.approx((4 / 3) / key_total)
    assert w[("key:k", "key:k/loud")] == pytest.approx((4 / 3) / 8 * (4 / 3) / key_total)
    assert w[("address:0", "address:0")] == 1.0


def test_the_store_caps_a_key_voting_as_a_thousand_users(store):
    events = [interaction(f"r{i}") for i in range(1050)]
    events += [vote(f"r{i}", 1, f"invented{i}", identity="key:k") for i in range(1000)]  # all up
    events += [vote(f"r{1000 + i}", -1, "someone", identity=f"address:a{i // 10}") for i in range(50)]
    store.apply_batch(events, {})
    examples = store.examples(max_voter_share=0.2)
    key = sum(e.n_votes for e in examples if e.rating > 0)
    assert key / sum(e.n_votes for e in examples) == pytest.approx(0.2)
    assert len(store.voter_counts()) == 1005 and store.voter_counts()[("address:a0", "address:a0/someone")] == 10


def test_votes_of_two_identities_on_one_answer_stay_two_and_each_withdraws_its_own(store):
    """The service binds ids to identities: one identity's replacement and tombstone hit its own vote only."""
    from rlhf_loop.core.contracts import bind_feedback_id

    def bound(identity: str, rating: int | None, seconds: float, deleted: bool = False) -> Feedback:
        fid = bind_feedback_id(b"s", identity, feedback_id_for("r1", 0, "same-client-key", None))
        return Feedback(feedback_id=fid, response_id="r1", rating=rating, identity=identity, voter=identity,
                        deleted=deleted, ts=T0 + timedelta(seconds=seconds))

    store.apply_batch([interaction("r1"), bound("key:a", 1, 0), bound("key:b", 1, 1)], {})
    assert store.examples()[0].n_votes == 2
    store.apply_batch([bound("key:a", -1, 2)], {})  # a replaces its own
    assert (store.examples()[0].n_votes, store.examples()[0].rating) == (2, 0.0)
    store.apply_batch([bound("key:a", None, 3, deleted=True)], {})  # ... and withdraws it; b's stays
    assert (store.examples()[0].n_votes, store.examples()[0].rating) == (1, 1.0)


def test_labels_are_the_votes_behind_the_examples_with_their_comment_and_times(store):
    answer = interaction("r1")
    store.apply_batch([answer, vote("r1", 1, "a", seconds=5), vote("r1", -1, "b", seconds=6),
                       vote("r2", 1, "a")], {})  # r2's vote waits for its answer: not a label yet
    store.apply_batch([Feedback(feedback_id="r1:c", response_id="r1", rating=1, comment="spot on", user="c",
                                ts=T0 + timedelta(seconds=7))], {})
    labels = sorted(read_labels(store.db), key=lambda x: x.voter)
    assert [(x.voter, x.rating, x.weight, x.comment) for x in labels] == [("a", 1.0, 1.0, None), ("b", -1.0, 1.0, None),
                                                                         ("c", 1.0, 1.0, "spot on")]
    assert {x.voted_at for x in labels} == {(T0 + timedelta(seconds=s)).timestamp() for s in (5, 6, 7)}
    assert {x.answered_at for x in labels} == {answer.ts.timestamp()}
    (ex,) = store.examples()
    assert (ex.n_votes, ex.rating, ex.messages) == (3, pytest.approx(1 / 3), labels[0].messages)
    store.apply_batch([vote("r1", None, "b", seconds=8, deleted=True)], {})
    assert sorted(x.voter for x in read_labels(store.db)) == ["a", "c"]
    gone = [x for x in read_labels(store.db, include_withdrawn=True) if x.withdrawn]
    assert [(x.voter, x.rating, x.weight, x.voted_at) for x in gone] == [("b", None, 0.0, (T0 + timedelta(seconds=8)).timestamp())]


def test_a_store_from_an_earlier_release_reads_read_only_as_is_and_gains_the_columns_when_opened(tmp_path):
    path = tmp_path / "labels.sqlite"
    store = LabelStore(path, late_vote_window_s=100.0, dedupe_window_s=1000.0, prompt_pool_size=10)
    store.apply_batch([interaction("r1"), vote("r1", 1, "a")], {})
    for table, column in [("votes", "comment"), ("votes", "identity"), ("interactions", "answered")]:
        store.db.execute(f"ALTER TABLE {table} DROP COLUMN {column}")  # as an earlier release made it
    store.db.execute("DROP TABLE preferences")  # ... before preferences
    before = path.read_bytes()
    reader = connect_read_only(path)
    (label,) = read_labels(reader)
    assert (label.voter, label.rating, label.comment, label.answered_at) == ("a", 1.0, None, None)
    assert read_preferences(reader, include_withdrawn=True) == []  # an empty stand-in, this connection's only
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader.execute("DELETE FROM main.votes")
    reader.close()
    assert path.read_bytes() == before
    store.close()
    store = LabelStore(path, late_vote_window_s=100.0, dedupe_window_s=1000.0, prompt_pool_size=10)
    store.apply_batch([Feedback(feedback_id="r1:b", response_id="r1", rating=-1, comment="no", user="b")], {})
    assert sorted((x.voter, x.comment) for x in read_labels(store.db)) == [("a", None), ("b", "no")]
    store.close()


def test_approval_points_are_cumulative_per_version_by_time_span():
    # (version, vote time, rating); spans of (10 - 0) / 2 = 5 s: [0, 5) and [5, 10]
    rows = [(0, 0.0, 1.0), (0, 1.0, -1.0), (1, 4.0, 1.0), (0, 6.0, 1.0), (1, 10.0, -1.0), (1, 10.0, 1.0)]
    v0, v1 = approval_points(rows, buckets=2)
    assert (v0.version, v0.up, v0.down) == (0, 2, 1) and (v1.version, v1.up, v1.down) == (1, 2, 1)
    assert [(p.time, p.up, p.down) for p in v0.points] == [(5.0, 1, 1), (10.0, 2, 1)]
    assert [(p.time, p.up, p.down) for p in v1.points] == [(5.0, 1, 0), (10.0, 2, 1)]
    # a version with no vote in the last span still ends there; all votes at one instant: one span
    (only,) = approval_points([(2, 7.0, 1.0), (2, 7.0, 1.0)], buckets=4)
    assert [(p.time, p.up, p.down) for p in only.points] == [(8.0, 2, 0)]
    assert approval_points([], buckets=4) == []


def test_read_approval_counts_the_live_joined_votes_by_version_as_the_watch_does(store):
    old, new = interaction("r0"), interaction("r1").model_copy(update={"policy_version": 1})
    store.apply_batch([old, new, vote("r0", 1, "a", 1), vote("r0", -1, "b", 2), vote("r1", 1, "a", 3),
                       vote("r1", -1, "b", 4), vote("r1", 1, "c", 5), vote("pending", 1, "a", 6)], {})
    store.apply_batch([vote("r1", None, "b", 7, deleted=True)], {})  # withdrawn: no longer counted
    approval = read_approval(store.path, buckets=3)
    assert {a.version: (a.up, a.down) for a in approval} == store.approval_by_version() == {0: (1, 1), 1: (2, 0)}
    assert all(a.points[-1].up == a.up and a.points[-1].down == a.down for a in approval)
    assert approval[0].points[-1].time == (T0 + timedelta(seconds=5)).timestamp(), "ends at the newest live vote"
    assert read_approval(store.path.with_name("none.sqlite"), buckets=3) == []


def test_behaviour_logprobs_are_stored_with_their_sampling_and_old_events_have_none(store):
    with_logprobs = Interaction(**{**interaction("r1").model_dump(), "completion_logprobs": [-0.25, -1.5],
                                   "sampling": Sampling(temperature=0.7, top_p=0.9, max_tokens=8)})
    store.apply_batch([with_logprobs, interaction("r2"), vote("r1", 1), vote("r2", -1)], {})
    r1, r2 = store.examples()
    assert r1.behaviour == Behaviour(token_ids=(3, 4), logprobs=(-0.25, -1.5), temperature=0.7, top_p=0.9)
    assert r2.behaviour is None  # an event from before completion_logprobs


# the tables as a store from before voters, identities and behaviour log-probs made them
OLD_SCHEMA = """
CREATE TABLE interactions (
    response_id TEXT NOT NULL, choice_index INTEGER NOT NULL,
    event_id TEXT NOT NULL, prompt_key TEXT NOT NULL, completion TEXT NOT NULL,
    completion_tokens INTEGER NOT NULL, policy_version INTEGER NOT NULL, finish_reason TEXT NOT NULL,
    received REAL NOT NULL,
    PRIMARY KEY (response_id, choice_index)
);
CREATE TABLE votes (
    feedback_id TEXT PRIMARY KEY, response_id TEXT NOT NULL, choice_index INTEGER NOT NULL,
    user TEXT, rating REAL, deleted INTEGER NOT NULL, ts REAL NOT NULL, event_id TEXT NOT NULL,
    received REAL NOT NULL, seq INTEGER NOT NULL
);
CREATE TABLE prompts (prompt_key TEXT PRIMARY KEY, messages TEXT NOT NULL, last_seen REAL NOT NULL);
INSERT INTO interactions VALUES ('old', 0, 'e1', 'k', 'An old answer.', 3, 2, 'stop', 0);
INSERT INTO votes VALUES ('old:u', 'old', 0, 'u', 1.0, 0, 0, 'e2', 0, 1);
INSERT INTO prompts VALUES ('k', '[{"role": "user", "content": "Old?"}]', 0);
"""


def test_an_older_store_is_migrated_in_place_and_keeps_its_labels(tmp_path):
    path = tmp_path / "labels.sqlite"
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    db.close()
    store = LabelStore(path, late_vote_window_s=100.0, dedupe_window_s=1000.0, prompt_pool_size=10)
    try:
        (old,) = store.examples()
        assert (old.response_id, old.completion, old.policy_version, old.rating, old.behaviour) == (
            "old", "An old answer.", 2, 1.0, None)
        new = Interaction(**{**interaction("new").model_dump(), "completion_logprobs": [-0.5, -0.125]})
        store.apply_batch([new, vote("new", -1)], {})
        assert {e.response_id: e.behaviour for e in store.examples()} == {
            "old": None, "new": Behaviour((3, 4), (-0.5, -0.125), 1.0, 1.0)}
    finally:
        store.close()
    reopened = LabelStore(path, late_vote_window_s=100.0, dedupe_window_s=1000.0, prompt_pool_size=10)
    try:  # opening a migrated store again changes nothing
        assert len(reopened.examples()) == 2
    finally:
        reopened.close()
