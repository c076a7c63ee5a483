"""`rlhf export`: a label store filled the way the trainer fills it (LabelStore.apply_batch with the
contract's events: votes and preferences), exported by the command in a subprocess, loaded with
`datasets.load_dataset` (config "ratings", the default, and "preferences")."""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import datasets
import pytest
import yaml

from rlhf_loop.core.contracts import (AnswerRef, Feedback, Interaction, Message, Preference, Sampling,
                                      bind_feedback_id, feedback_id_for, make_response_id, preference_id_for)
from rlhf_loop.trainer.store import LabelStore

SECRET = b"response-id-secret"
T0 = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)
KEY = "key:5f0c3a9e1b7d2c4a"  # an API key's identity (the service's HMAC of the key)
ADDRESS = "address:9d8e7f6a5b4c3d2e"  # a client address's, where no key is used
ALICE, BOB, CAROL = f"{KEY}/alice", f"{KEY}/bob", ADDRESS  # voters: a key's users, and an address
R1, R2, R3, R4, R5 = (make_response_id(SECRET, v, n) for v, n in [(0, 1), (1, 2), (1, 1), (1, 1), (2, 1)])
PROMPTS = {
    R1: [Message(role="system", content="Be brief."), Message(role="user", content="Grüße! Was ist 2+2? 👋")],
    R2: [Message(role="user", content="Name a colour.")],
    R3: [Message(role="user", content="Tell me a joke.")],
    R5: [Message(role="user", content="Name a colour.")],  # R2's prompt again: an arena pair with R2
}
ANSWERS = {(R1, 0): "Vier.", (R2, 0): "Blue.", (R2, 1): "Chartreuse, obviously.", (R3, 0): "No.", (R5, 0): "Red."}
VERSIONS = {R1: 0, R2: 1, R3: 1, R5: 2}
COLUMNS = ["prompt", "answer", "rating", "weight", "withdrawn", "policy_version", "voted_at", "answered_at",
           "voter_id", "comment", "response_id", "choice_index"]


def interaction(rid: str, choice: int) -> Interaction:
    return Interaction(response_id=rid, choice_index=choice, policy_version=VERSIONS[rid], model="rlhf-policy",
                       messages=PROMPTS[rid], prompt_token_ids=[1, 2, 3], completion=ANSWERS[(rid, choice)],
                       completion_token_ids=[4, 5], finish_reason="stop", ts=T0 + timedelta(seconds=choice),
                       sampling=Sampling(temperature=1.0, top_p=1.0, max_tokens=16))


def vote(rid: str, choice: int, voter: str, rating: int | None, minutes: int, comment: str | None = None) -> Feedback:
    """A vote as the service writes it: its id bound to the identity, the voter the caps count."""
    identity = voter.split("/")[0]
    fid = bind_feedback_id(SECRET, identity, feedback_id_for(rid, choice, None, voter))
    return Feedback(feedback_id=fid, response_id=rid, choice_index=choice, rating=rating, comment=comment,
                    user=voter.rpartition("/")[2] if "/" in voter else None, identity=identity, voter=voter,
                    deleted=rating is None, ts=T0 + timedelta(minutes=minutes))


VOTES = [  # (response, choice, voter, rating, minute)
    (R1, 0, ALICE, 1, 1), (R1, 0, BOB, -1, 2), (R2, 1, ALICE, -1, 3), (R2, 0, CAROL, 1, 4),
]
PREFERENCE_COLUMNS = ["prompt", "chosen", "rejected", "tie", "weight", "withdrawn", "chosen_policy_version",
                      "rejected_policy_version", "voted_at", "voter_id", "comment", "chosen_response_id",
                      "chosen_choice_index", "rejected_response_id", "rejected_choice_index"]


def preference(chosen: tuple[str, int], rejected: tuple[str, int], voter: str, minutes: int, *, tie: bool = False,
               comment: str | None = None, withdrawn: bool = False) -> Preference:
    """A preference as the service writes it (or its withdrawal: no pair, no voter, the same id)."""
    identity = voter.split("/")[0]
    a, b = AnswerRef(response_id=chosen[0], choice_index=chosen[1]), AnswerRef(response_id=rejected[0],
                                                                               choice_index=rejected[1])
    pid = bind_feedback_id(SECRET, identity, preference_id_for(a, b, voter), label="preference")
    if withdrawn:
        return Preference(preference_id=pid, chosen=None, rejected=None, deleted=True, identity=identity,
                          ts=T0 + timedelta(minutes=minutes))
    return Preference(preference_id=pid, chosen=a, rejected=b, tie=tie, comment=comment,
                      user=voter.rpartition("/")[2] if "/" in voter else None, identity=identity, voter=voter,
                      ts=T0 + timedelta(minutes=minutes))


PREFERENCES = [  # (chosen, rejected, voter, minute, tie, comment): the live ones
    ((R2, 1), (R2, 0), BOB, 7, False, "bolder"),  # two choices of one n=2 response
    ((R5, 0), (R2, 0), CAROL, 8, True, None),  # two responses to one prompt, by two versions: a tie
]


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory) -> Path:
    """A state dir whose trainer store holds 4 live votes on 3 answers by 3 voters under 2 identities, a
    withdrawn vote (R3), and a vote still waiting for its answer (R4); 2 live preferences (Bob's and Carol's),
    a withdrawn one (Alice's) and one still waiting for an answer (R4)."""
    state = tmp_path_factory.mktemp("state")
    store = LabelStore(state / "trainer" / "labels.sqlite", late_vote_window_s=3600.0, dedupe_window_s=3600.0,
                       prompt_pool_size=100)
    store.apply_batch([vote(R4, 0, BOB, 1, 0)], {("rlhf.feedback", 0): 1})  # before any answer: not a label
    store.apply_batch([interaction(R1, 0), interaction(R2, 0), interaction(R2, 1), interaction(R3, 0)],
                      {("rlhf.interactions", 0): 4})
    events = [vote(rid, c, v, r, m, comment="short and right" if (rid, v) == (R1, ALICE) else None)
              for rid, c, v, r, m in VOTES]
    store.apply_batch(events + [vote(R3, 0, CAROL, 1, 5)], {("rlhf.feedback", 0): 6})
    store.apply_batch([vote(R3, 0, CAROL, None, 6)], {("rlhf.feedback", 0): 7})  # withdrawn
    store.apply_batch([interaction(R5, 0), preference((R4, 0), (R2, 0), BOB, 7)],
                      {("rlhf.interactions", 0): 5, ("rlhf.feedback", 0): 8})  # R4 never came: not a label
    store.apply_batch([preference(c, r, v, m, tie=t, comment=x) for c, r, v, m, t, x in PREFERENCES]
                      + [preference((R5, 0), (R2, 1), ALICE, 9, comment="red!")], {("rlhf.feedback", 0): 11})
    store.apply_batch([preference((R5, 0), (R2, 1), ALICE, 10, withdrawn=True)], {("rlhf.feedback", 0): 12})
    store.close()
    return state


def run_export(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf_loop", "export", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def load(out: Path, cache: Path, config: str | None = None) -> datasets.Dataset:
    return datasets.load_dataset(str(out), config, cache_dir=str(cache))["train"]


@pytest.fixture(scope="module")
def exported(state_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, datasets.Dataset]:
    out = tmp_path_factory.mktemp("export") / "labels"
    done = run_export("--out", out, "--state-dir", state_dir)
    assert done.returncode == 0, done.stderr
    return out, done, load(out, tmp_path_factory.mktemp("cache"))


def by_answer(ds: datasets.Dataset) -> dict[tuple[str, int, int | None], dict]:
    return {(r["response_id"], r["choice_index"], r["rating"]): r for r in ds}


def test_every_live_label_is_a_row_with_its_prompt_answer_rating_and_times(exported):
    out, done, ds = exported
    assert ds.column_names == COLUMNS and ds.num_rows == 4
    assert (ds.features["rating"].dtype, ds.features["voted_at"].dtype) == ("int8", "timestamp[us, tz=UTC]")
    assert done.stdout.splitlines()[0] == "ratings: 4 rows, 3 voters, 2 up, 2 down, 0 withdrawn (by policy version: v0: 2, v1: 2)"
    rows = by_answer(ds)
    assert set(rows) == {(rid, c, r) for rid, c, _, r, _ in VOTES}  # not R3 (withdrawn), not R4 (no answer)
    for rid, c, _, rating, minute in VOTES:
        row = rows[(rid, c, rating)]
        assert row["prompt"] == [m.model_dump() for m in PROMPTS[rid]]
        assert (row["answer"], row["policy_version"], row["withdrawn"]) == (ANSWERS[(rid, c)], VERSIONS[rid], False)
        assert row["voted_at"] == T0 + timedelta(minutes=minute) and row["answered_at"] == T0 + timedelta(seconds=c)
    assert rows[(R1, 0, 1)]["comment"] == "short and right" and rows[(R1, 0, -1)]["comment"] is None


def test_weights_are_the_trainers_influence_cap(exported, state_dir, tmp_path):
    """Summed per answer, the rows' weights are the trainer's n_votes and their weighted mean its rating."""
    _, _, ds = exported
    store = LabelStore(state_dir / "trainer" / "labels.sqlite", late_vote_window_s=3600.0, dedupe_window_s=3600.0,
                       prompt_pool_size=100)
    examples = {(e.response_id, e.choice_index): e for e in store.examples(max_voter_share=0.2)}
    store.close()
    for key, ex in examples.items():
        rows = [r for r in ds if (r["response_id"], r["choice_index"]) == key]
        assert sum(r["weight"] for r in rows) == pytest.approx(ex.n_votes)
        assert sum(r["weight"] * r["rating"] for r in rows) / ex.n_votes == pytest.approx(ex.rating)
    # votes and preferences are labels alike: Alice has 2 (votes), Bob 2 (a vote, a preference), Carol 2 (a vote,
    # a preference). Fewer identities (and voters in one) than the cap asks for count equally: in the key
    # Alice's two weigh as much as Bob's two, and the key's four then as much as Carol's (her address's) two
    assert sorted(ds["weight"]) == [0.5, 0.5, 0.5, 1.0]
    uncapped = tmp_path / "uncapped"
    assert run_export("--out", uncapped, "--state-dir", state_dir, "--max-voter-share", 1).returncode == 0
    assert load(uncapped, tmp_path / "cache")["weight"] == [1.0] * 4
    assert load(uncapped, tmp_path / "cache", "preferences")["weight"] == [1.0] * 2


def test_voter_ids_are_pseudonyms_stable_within_an_export_only(exported, state_dir, tmp_path):
    _, _, ds = exported
    ids = {(r["response_id"], r["choice_index"], r["rating"]): r["voter_id"] for r in ds}
    voter_of = {(rid, c, r): v for rid, c, v, r, _ in VOTES}
    assert all(re.fullmatch(r"voter-[0-9a-f]{16}", i) for i in ids.values())
    assert ids[(R1, 0, 1)] == ids[(R2, 1, -1)]  # both Alice's
    assert len({ids[k] for k in ids if voter_of[k] != ALICE} | {ids[(R1, 0, 1)]}) == 3
    raw = {KEY, ADDRESS, ALICE, BOB, "alice", "bob", KEY.split(":")[1], ADDRESS.split(":")[1]}
    assert not any(part in i for i in ids.values() for part in raw)
    again = tmp_path / "again"
    assert run_export("--out", again, "--state-dir", state_dir).returncode == 0
    ids2 = {(r["response_id"], r["choice_index"], r["rating"]): r["voter_id"] for r in load(again, tmp_path / "cache")}
    assert ids2.keys() == ids.keys() and not set(ids2.values()) & set(ids.values())  # a fresh salt each export
    assert ids2[(R1, 0, 1)] == ids2[(R2, 1, -1)]


def test_every_live_preference_is_a_row_with_both_answers_and_the_same_pseudonyms(exported, state_dir):
    out, done, ratings = exported
    ds = load(out, out.parent / "cache", "preferences")
    assert ds.column_names == PREFERENCE_COLUMNS and ds.num_rows == len(PREFERENCES)
    assert (ds.features["tie"].dtype, ds.features["voted_at"].dtype) == ("bool", "timestamp[us, tz=UTC]")
    assert done.stdout.splitlines()[1] == "preferences: 2 rows, 2 voters, 1 ties, 0 withdrawn (by policy version: v1: 2, v2: 1)"
    rows = {(r["chosen_response_id"], r["chosen_choice_index"], r["rejected_response_id"], r["rejected_choice_index"]): r
            for r in ds}
    assert set(rows) == {(*c, *r) for c, r, *_ in PREFERENCES}  # not Alice's (withdrawn), not R4's (no answer)
    for c, r, _, minute, tie, comment in PREFERENCES:
        row = rows[(*c, *r)]
        assert row["prompt"] == [m.model_dump() for m in PROMPTS[c[0]]] == [m.model_dump() for m in PROMPTS[r[0]]]
        assert (row["chosen"], row["rejected"], row["tie"], row["comment"], row["withdrawn"]) == (
            ANSWERS[c], ANSWERS[r], tie, comment, False)
        assert (row["chosen_policy_version"], row["rejected_policy_version"]) == (VERSIONS[c[0]], VERSIONS[r[0]])
        assert row["voted_at"] == T0 + timedelta(minutes=minute)
    # one voter, one pseudonym across the configs of an export: Bob's preference and his vote on R1
    (bob_vote,) = [r for r in ratings if (r["response_id"], r["rating"]) == (R1, -1)]
    assert rows[(R2, 1, R2, 0)]["voter_id"] == bob_vote["voter_id"]
    # the weights are the trainer's: preferences and votes under one influence cap
    store = LabelStore(state_dir / "trainer" / "labels.sqlite", late_vote_window_s=3600.0, dedupe_window_s=3600.0,
                       prompt_pool_size=100)
    trained = {(p.chosen.response_id, p.chosen.choice_index, p.rejected.response_id, p.rejected.choice_index): p.weight
               for p in store.preferences(max_voter_share=0.2)}
    store.close()
    assert trained == {k: r["weight"] for k, r in rows.items()} == {(R2, 1, R2, 0): 0.5, (R5, 0, R2, 0): 1.0}


def test_the_card_declares_the_config_features_and_counts(exported):
    out, _, _ = exported
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "preferences.jsonl.gz", "ratings.jsonl.gz"]
    text = (out / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["configs"] == [
        {"config_name": "ratings", "data_files": [{"split": "train", "path": "ratings.jsonl.gz"}], "default": True},
        {"config_name": "preferences", "data_files": [{"split": "train", "path": "preferences.jsonl.gz"}]}]
    ratings, preferences = meta["dataset_info"]
    assert [f["name"] for f in ratings["features"]] == COLUMNS
    assert [f["name"] for f in preferences["features"]] == PREFERENCE_COLUMNS
    assert "4 rows from 3 voters: 2 up, 2 down, 0 withdrawn; by policy version: v0: 2, v1: 2." in body
    assert "2 rows from 2 voters: 1 ties, 0 withdrawn; by policy version: v1: 2, v2: 1." in body
    assert 'datasets.load_dataset("<this directory>", \'preferences\')' in body
    assert "withdrawn votes left out" in body and "HMAC-SHA256" in body
    builder = datasets.load_dataset_builder(str(out))
    assert builder.config.name == "ratings" and list(builder.info.features) == COLUMNS
    builder = datasets.load_dataset_builder(str(out), "preferences")
    assert list(builder.info.features) == PREFERENCE_COLUMNS


def test_withdrawn_votes_only_when_asked_and_the_filters(state_dir, tmp_path):
    out = tmp_path / "all"
    done = run_export("--out", out, "--state-dir", state_dir, "--include-withdrawn")
    assert done.returncode == 0, done.stderr
    (gone,) = [r for r in load(out, tmp_path / "cache") if r["withdrawn"]]
    assert (gone["response_id"], gone["rating"], gone["weight"], gone["voted_at"]) == (R3, None, 0.0, T0 + timedelta(minutes=6))
    (gone,) = [r for r in load(out, tmp_path / "cache", "preferences") if r["withdrawn"]]
    # a withdrawal keeps its pair as last stated, with no choice (tie null) and no weight
    assert (gone["chosen"], gone["rejected"], gone["tie"], gone["weight"], gone["voted_at"]) == (
        "Red.", "Chartreuse, obviously.", None, 0.0, T0 + timedelta(minutes=10))
    assert [re.search(r"(\d+) withdrawn", line)[1] for line in done.stdout.splitlines()[:2]] == ["1", "1"]
    assert run_export("--out", tmp_path / "v0", "--state-dir", state_dir, "--version", 0).returncode == 0
    assert load(tmp_path / "v0", tmp_path / "cache")["response_id"] == [R1, R1]
    since = (T0 + timedelta(minutes=3)).replace(tzinfo=None).isoformat()  # no zone: UTC
    assert run_export("--out", tmp_path / "since", "--state-dir", state_dir, "--since", since).returncode == 0
    assert sorted(load(tmp_path / "since", tmp_path / "cache")["choice_index"]) == [0, 1]  # R2's two, minutes 3 and 4
    # a preference counts under either answer's version: Carol's tie (R5 by v2 against R2 by v1), not Bob's
    assert run_export("--out", tmp_path / "v2", "--state-dir", state_dir, "--version", 2).returncode == 0
    assert sorted(p.name for p in (tmp_path / "v2").iterdir()) == ["README.md", "preferences.jsonl.gz"]
    only = load(tmp_path / "v2", tmp_path / "cache")  # the one config written is the default
    assert (only.column_names, only["chosen_response_id"]) == (PREFERENCE_COLUMNS, [R5])
    since = (T0 + timedelta(minutes=8)).isoformat()
    assert run_export("--out", tmp_path / "since8", "--state-dir", state_dir, "--since", since).returncode == 0
    assert load(tmp_path / "since8", tmp_path / "cache")["voted_at"] == [T0 + timedelta(minutes=8)]


def test_it_reads_a_snapshot_beside_a_writing_trainer_and_writes_nothing_there(state_dir, tmp_path):
    """A trainer mid-batch (its transaction open): the export sees the last committed labels, does not
    wait, and leaves the store's file as it was."""
    path = state_dir / "trainer" / "labels.sqlite"
    store = LabelStore(path, late_vote_window_s=3600.0, dedupe_window_s=3600.0, prompt_pool_size=100)
    before = path.read_bytes()
    store.db.execute("BEGIN IMMEDIATE")
    store.db.execute("UPDATE votes SET rating = -rating")  # uncommitted: no reader may see it
    try:
        done = run_export("--out", tmp_path / "out", "--state-dir", state_dir)
    finally:
        store.db.execute("ROLLBACK")
        store.close()
    assert done.returncode == 0, done.stderr
    assert set(by_answer(load(tmp_path / "out", tmp_path / "cache"))) == {(rid, c, r) for rid, c, _, r, _ in VOTES}
    assert path.read_bytes() == before


@pytest.mark.parametrize("args, rc, message", [
    (["--since", "yesterday"], 2, "--since 'yesterday' is not an ISO 8601 date or time"),
    (["--version", "-1"], 2, "--version must be a policy version"),
    (["--state-dir", "{tmp}/nowhere"], 1, "no label store at"),
    (["--out", "{tmp}/taken"], 1, "exists and is not an empty directory"),
    (["--version", "7"], 1, "match (0 rows): nothing written"),  # `datasets` cannot load a config without rows
])
def test_bad_input_is_one_line_and_writes_nothing(state_dir, tmp_path, args, rc, message):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    argv = ["--out", tmp_path / "out", "--state-dir", state_dir] + [a.format(tmp=tmp_path) for a in args]
    done = run_export(*argv)
    assert done.returncode == rc and done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith("rlhf export: error: ") and message in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"] and (tmp_path / "taken" / "keep.txt").read_text() == "mine"
