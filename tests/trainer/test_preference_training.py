"""Preferences in the trainer: the store's join and its migration, the Bradley-Terry loss and the judge's
pairwise accuracy by hand, the reward model (both paths) and DPO learning from preferences alone.

The service side (POST /v1/preferences, validation, Kafka) and the whole path through a real broker into a
round are in tests/service/test_preferences.py.
"""

from __future__ import annotations

import math
import random
from datetime import datetime, timedelta, timezone

import pytest
import torch

from rlhf_loop.core.contracts import (
    AnswerRef, Feedback, Interaction, Message, Preference, Sampling, feedback_id_for, preference_id_for,
)
from rlhf_loop.trainer import gate
from rlhf_loop.trainer.config import GateConfig, RewardConfig
from rlhf_loop.trainer.objectives import dpo_loss
from rlhf_loop.trainer.reward_model import (
    FeatureCache, accuracy_lower_bound, is_heldout_pair, pairwise_accuracy, reward_loss, train_reward_head,
    train_reward_model,
)
from rlhf_loop.trainer.store import Answer, LabelStore, PreferencePair

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


def interaction(rid: str, choice: int = 0, question: str = "Tell me about cats.",
                completion: str = "Oh, I love cats!") -> Interaction:
    return Interaction(response_id=rid, choice_index=choice, policy_version=0, model="m",
                       messages=[Message(role="user", content=question)], prompt_token_ids=[1, 2],
                       completion=completion, completion_token_ids=[3, 4], finish_reason="stop",
                       sampling=Sampling(temperature=1.0, top_p=1.0, max_tokens=8))


def prefer(chosen: tuple[str, int], rejected: tuple[str, int], voter: str = "key:k/alice", seconds: float = 0.0,
           tie: bool = False) -> Preference:
    a, b = (AnswerRef(response_id=r, choice_index=c) for r, c in (chosen, rejected))
    return Preference(preference_id=preference_id_for(a, b, voter) + ".tag", chosen=a, rejected=b, tie=tie,
                      identity=voter.partition("/")[0], voter=voter, ts=T0 + timedelta(seconds=seconds))


def withdraw(p: Preference, seconds: float) -> Preference:
    return Preference(preference_id=p.preference_id, chosen=None, rejected=None, deleted=True,
                      identity=p.identity, ts=T0 + timedelta(seconds=seconds))


# ---------------------------------------------------------------------------- the store


def test_a_preference_waits_for_both_answers_and_counts_as_a_new_label(store):
    p = prefer(("r", 1), ("r", 0))
    mark = store.label_seq()
    store.apply_batch([p, interaction("r", 0, completion="Rain, rain.")], {}, now=0.0)
    assert store.preferences() == [] and store.label_count(since_seq=mark) == 0  # answer 1 not stored yet
    store.apply_batch([interaction("r", 1, completion="Oh, I love cats!")], {}, now=1.0)
    (pair,) = store.preferences()
    assert (pair.chosen.completion, pair.rejected.completion, pair.tie) == ("Oh, I love cats!", "Rain, rain.", False)
    assert (pair.chosen.response_id, pair.chosen.choice_index, pair.rejected.choice_index) == ("r", 1, 0)
    assert pair.messages == [{"role": "user", "content": "Tell me about cats."}] and pair.weight == 1.0
    assert store.label_count(since_seq=mark) == 1 and store.label_stats()[0] == 1
    assert store.examples() == []  # a preference is no thumb


def test_the_same_voters_next_preference_on_a_pair_replaces_it_and_a_withdrawal_removes_it(store):
    store.apply_batch([interaction("r", 0), interaction("r", 1)], {}, now=0.0)
    first = prefer(("r", 0), ("r", 1), seconds=1)
    flipped = prefer(("r", 1), ("r", 0), seconds=2)  # the same pair the other way round: the same id
    assert first.preference_id == flipped.preference_id
    result = store.apply_batch([first, flipped, prefer(("r", 0), ("r", 1), voter="key:k/bob", seconds=3)], {})
    assert result.preferences == 3
    assert sorted((p.chosen.choice_index, p.weight) for p in store.preferences()) == [(0, 1.0), (1, 1.0)]
    stale = store.apply_batch([prefer(("r", 0), ("r", 1), seconds=1.5)], {})  # older than the stored one
    assert stale.stale == 1 and {p.chosen.choice_index for p in store.preferences()} == {0, 1}
    mark = store.label_seq()
    tombstone = withdraw(flipped, seconds=4)
    store.apply_batch([tombstone], {})
    assert [p.chosen.choice_index for p in store.preferences()] == [0]  # bob's is left
    assert store.label_count(since_seq=mark) == 1  # a withdrawal changes the labels: the trigger sees it
    assert store.apply_batch([tombstone], {}).duplicates == 1  # redelivered: its event id counts once
    assert store.apply_batch([prefer(("r", 0), ("r", 1), seconds=5)], {}).preferences == 1  # a later one revives it
    assert sorted(p.chosen.choice_index for p in store.preferences()) == [0, 0]


def test_preferences_and_votes_share_the_influence_cap(store):
    """An identity flooding preferences is down-weighted like one flooding votes, counted together."""
    events: list = [interaction(f"r{i}", c) for i in range(10) for c in (0, 1)]
    events += [prefer((f"r{i}", 0), (f"r{i}", 1), voter="key:flood/x") for i in range(8)]
    events += [Feedback(feedback_id=feedback_id_for(f"r{i}", 0, None, f"key:u{i}/u"), response_id=f"r{i}", rating=1,
                        identity=f"key:u{i}", voter=f"key:u{i}/u") for i in (8, 9)]
    store.apply_batch(events, {})
    examples, prefs = store.labels(max_voter_share=0.25)
    # three identities, fewer than 1 / cap: they count equally (capped_level), the flooder's 8 as much as one vote
    assert [p.weight for p in prefs] == pytest.approx([1 / 8] * 8)
    assert [e.n_votes for e in examples] == [1.0, 1.0]
    assert store.voter_counts()[("key:flood", "key:flood/x")] == 8


def test_prune_keeps_answers_a_preference_names_and_expires_one_left_waiting(store):
    store.apply_batch([interaction("a", 0), interaction("a", 1), prefer(("a", 0), ("a", 1)),
                       prefer(("b", 0), ("b", 1))], {}, now=0.0)
    out = store.prune(now=150.0)
    assert out["expired_preferences"] == 1 and out["unvoted_interactions"] == 0
    assert len(store.preferences()) == 1 and len(store.preference_ids()) == 1
    store.apply_batch([withdraw(prefer(("a", 0), ("a", 1)), seconds=5)], {}, now=200.0)
    assert store.prune(now=1300.0)["tombstones"] == 1 and store.preference_ids() == {}


def test_a_store_from_before_preferences_gains_the_table_and_keeps_its_votes(tmp_path):
    path = tmp_path / "labels.sqlite"
    old = LabelStore(path, late_vote_window_s=100.0, dedupe_window_s=1000.0, prompt_pool_size=10)
    old.apply_batch([interaction("r"), Feedback(feedback_id="r:u.1", response_id="r", rating=1)], {("t", 0): 2})
    old.db.executescript("DROP TABLE preferences; DROP INDEX IF EXISTS preferences_by_seq;")  # as such a store is
    assert "preferences" not in {r[0] for r in old.db.execute("SELECT name FROM sqlite_master")}
    seq = old.db.execute("SELECT MAX(seq) FROM votes").fetchone()[0]
    old.close()
    store = LabelStore(path, late_vote_window_s=100.0, dedupe_window_s=1000.0, prompt_pool_size=10)
    try:
        assert [e.rating for e in store.examples()] == [1.0] and store.consumed_offsets() == {("t", 0): 2}
        assert store.label_seq() == seq  # the trigger's watermark means the same
        store.apply_batch([interaction("r", 1), prefer(("r", 1), ("r", 0))], {})
        assert len(store.preferences()) == 1 and store.label_count(since_seq=seq) == 1
    finally:
        store.close()


# ---------------------------------------------------------------------------- the losses and figures by hand


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_bradley_terry_on_preferences_with_ties_and_weights_by_hand():
    scores = torch.zeros(0)
    liked, disliked = torch.tensor([2.0, 0.5, 1.0]), torch.tensor([0.0, 1.5, 1.0])
    total, point, pair = reward_loss(scores, scores, scores, "logistic", liked, disliked, 0.5,
                                     pair_weights=torch.tensor([1.0, 2.0, 1.0]),
                                     pair_targets=torch.tensor([1.0, 1.0, 0.5]))
    # -log sigmoid(2) = softplus(-2); -log sigmoid(-1) = softplus(1), twice; a tie at d = 0: log 2
    assert point.item() == 0.0  # no thumbs in the batch: no pointwise loss, not 0 / 0
    assert pair.item() == pytest.approx((softplus(-2.0) + 2 * softplus(1.0) + math.log(2)) / 4, rel=1e-6)
    assert total.item() == pytest.approx(0.5 * pair.item(), rel=1e-6)
    # a tie at d: -(log sigmoid(d) + log sigmoid(-d)) / 2 = (softplus(-d) + softplus(d)) / 2, smallest at d = 0
    _, _, tie = reward_loss(scores, scores, scores, "logistic", torch.tensor([1.0]), torch.tensor([0.0]), 1.0,
                            pair_targets=torch.tensor([0.5]))
    assert tie.item() == pytest.approx((softplus(-1.0) + softplus(1.0)) / 2, rel=1e-6) and tie.item() > math.log(2)
    # target 1 is exactly the thumbs-derived pairs' loss
    _, _, plain = reward_loss(scores, scores, scores, "logistic", liked, disliked, 1.0)
    _, _, ones = reward_loss(scores, scores, scores, "logistic", liked, disliked, 1.0, pair_targets=torch.ones(3))
    assert plain.item() == ones.item()


def test_pairwise_accuracy_and_its_lower_bound_by_hand():
    assert pairwise_accuracy(torch.tensor([1.0, 0.0, 2.0, 3.0]), torch.tensor([0.0, 1.0, 2.0, 1.0])) == 0.625
    assert math.isnan(pairwise_accuracy(torch.zeros(0), torch.zeros(0)))
    # Wilson, z = 1.645: p = 0.8, n = 50 -> (0.8 + 0.02706 - 1.645 sqrt(0.0032 + 0.0002706)) / 1.05412
    z, p, n = 1.645, 0.8, 50
    hand = (p + z * z / 100 - z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n)
    assert accuracy_lower_bound(0.8, 50) == pytest.approx(hand) and 0.69 < hand < 0.71
    assert accuracy_lower_bound(1.0, 10) == pytest.approx(10 / (10 + z * z))  # perfect on few pairs: still unsure
    assert accuracy_lower_bound(0.9, 0) is None


def test_weighted_dpo_by_hand():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    loss = dpo_loss(chosen, rejected, beta=0.5, weights=torch.tensor([3.0, 1.0]))
    assert loss.item() == pytest.approx((3 * softplus(-0.5) + math.log(2)) / 4, rel=1e-6)
    assert dpo_loss(chosen, rejected, beta=0.5).item() == pytest.approx((softplus(-0.5) + math.log(2)) / 2, rel=1e-6)


def judge(**kw) -> dict:
    return {"auroc": math.nan, "auroc_lcb": None, "pair_accuracy": math.nan, "pair_accuracy_lcb": None,
            "heldout_preferences": 0, "approval_gap": None, "approval_gap_versions": [0], "approval_gap_labels": 0,
            **kw}


def test_the_judge_passes_on_preferences_alone_and_needs_every_kind_it_can_measure():
    cfg = GateConfig()
    prefs_only = gate._judge(judge(pair_accuracy=0.9, pair_accuracy_lcb=0.8, heldout_preferences=40), cfg)
    assert prefs_only["rm_pair_accuracy"].passed and prefs_only["rm_auroc"].passed
    assert "judged on 40 held-out preferences" in prefs_only["rm_auroc"].skipped
    weak = gate._judge(judge(pair_accuracy=0.6, pair_accuracy_lcb=0.45, heldout_preferences=40), cfg)
    assert not weak["rm_pair_accuracy"].passed and "pairwise accuracy 0.60" in weak["rm_pair_accuracy"].why
    both = gate._judge(judge(auroc=0.55, auroc_lcb=0.4, pair_accuracy=0.9, pair_accuracy_lcb=0.8,
                             heldout_preferences=40), cfg)
    assert not both["rm_auroc"].passed and both["rm_pair_accuracy"].passed  # thumbs disagree: no promotion
    neither = gate._judge(judge(), cfg)
    assert not neither["rm_auroc"].passed and "rm_pair_accuracy" not in neither
    thumbs = gate._judge(judge(auroc=0.9, auroc_lcb=0.8), cfg)
    assert thumbs["rm_auroc"].passed and not thumbs["rm_auroc"].skipped and "rm_pair_accuracy" not in thumbs


# ---------------------------------------------------------------------------- the reward model on preferences


def tone_preferences(n: int, seed: int = 0, ties: int = 0) -> list[PreferencePair]:
    """n pairs of the embedded model's own kind of answers to one prompt, the cheerful one chosen over the gloomy
    one (ties: that many more pairs, both cheerful, as ties)."""
    from rlhf_loop.core.tinylm import make_answer

    rng = random.Random(seed)
    out = []
    for i in range(n + ties):
        subject = rng.choice(["cats", "rain", "coffee", "trains"])
        tie = i >= n
        good, bad = (make_answer(rng, subject, "cheerful", False),
                     make_answer(rng, subject, "cheerful" if tie else "gloomy", False))
        out.append(PreferencePair(f"p{i}", subject, [{"role": "user", "content": f"Tell me about {subject}."}],
                                  Answer(f"r{i}", rng.randrange(2), good, 0), Answer(f"r{i}", 2, bad, 0), tie, 1.0,
                                  f"voter{i}", 0.0, None, False))
    return out


def test_a_frozen_head_learns_from_preferences_alone_and_the_judge_can_trust_it(base_model_dir, tmp_path):
    """No thumbs at all: the head fits the preferences (features of both answers, cached by response id and
    choice), ranks held-out chosen answers over rejected ones, and that alone passes the gate's judge."""
    from transformers import AutoTokenizer

    from test_reward_model import reward_model

    tok = AutoTokenizer.from_pretrained(base_model_dir)
    rm = reward_model(base_model_dir, tmp_path, "full", backbone="frozen")
    prefs = tone_preferences(240, ties=20)
    cfg = RewardConfig(backbone="frozen", batch_size=64)
    cache = FeatureCache("test")
    metrics = train_reward_head(rm, tok, [], cfg, cache, preferences=prefs)
    assert len(cache.features) == 2 * len(prefs)  # both answers of every preference, once each
    assert all(f.dim() == 2 for f in cache.features.values())  # (T, H): each answer token's state, for the token head
    held = [p for p in prefs if is_heldout_pair(p, cfg.heldout_fraction)]
    assert metrics.train_preferences == len(prefs) - len(held) and metrics.pairs == metrics.train_preferences
    assert metrics.heldout_preferences == sum(not p.tie for p in held) > 20
    assert metrics.pair_accuracy >= 0.9 and metrics.pair_accuracy_lcb >= 0.75, metrics
    assert math.isnan(metrics.auroc) and metrics.auroc_lcb is None  # no held-out thumbs
    checks = gate._judge(vars(metrics), GateConfig())
    assert all(c.passed for c in checks.values()), checks


def test_a_tuned_reward_model_learns_from_preferences_alone(base_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from test_reward_model import reward_model

    tok = AutoTokenizer.from_pretrained(base_model_dir)
    rm = reward_model(base_model_dir, tmp_path, "full")
    prefs = tone_preferences(160, seed=1)
    metrics = train_reward_model(rm, tok, [], RewardConfig(max_steps=30, epochs=4.0), seed=0, preferences=prefs)
    assert metrics.steps == 30 and metrics.train_examples == 0 and metrics.train_preferences > 100
    assert metrics.heldout_preferences > 15 and metrics.pair_accuracy >= 0.85, metrics


def test_the_pair_path_on_a_real_shaped_model(random_model, tmp_path):
    """A random-weight 135M Llama through the reward-model path real models take on CPU (frozen features, a
    head; the tuned path's pairs are the same rows, covered on the embedded model above). Random weights learn
    nothing worth asserting; what must hold is the plumbing: both answers of each preference through the body
    once, next to the thumbs, the counts, finite figures."""
    from rlhf_loop.core.contracts import Settings
    from rlhf_loop.core.models import load_tokenizer
    from rlhf_loop.trainer.store import Example

    from test_reward_model import reward_model

    model_dir = random_model("llama-135m")
    tok = load_tokenizer(model_dir, Settings(device="cpu"))
    rm = reward_model(model_dir, tmp_path, "lora", backbone="frozen")
    prefs = tone_preferences(12, ties=2)
    thumbs = [Example(f"t{i}", 0, "cats", [{"role": "user", "content": "Tell me about cats."}], f"Answer {i}.",
                      1.0 if i % 2 else -1.0, 1.0) for i in range(8)]
    cfg = RewardConfig(backbone="frozen", batch_size=8, max_length=64, heldout_fraction=0.3)
    cache = FeatureCache("real")
    metrics = train_reward_head(rm, tok, thumbs, cfg, cache, preferences=prefs)
    assert len(cache.features) == len(thumbs) + 2 * len(prefs)
    assert {f.shape[-1] for f in cache.features.values()} == {rm.shift.shape[0]}  # (T, H) token states of the body
    held = [p for p in prefs if is_heldout_pair(p, cfg.heldout_fraction)]
    assert metrics.train_preferences == len(prefs) - len(held) > 0
    assert metrics.heldout_preferences == sum(not p.tie for p in held) > 0
    assert math.isfinite(metrics.loss) and 0.0 <= metrics.pair_accuracy <= 1.0
