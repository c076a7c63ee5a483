"""Reward-model losses and metrics by hand, and the model itself on the embedded backbone."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

from rlhf_loop.core.contracts import Settings
from rlhf_loop.core.models import ensure_policy_store
from rlhf_loop.trainer.config import RewardConfig, TrainConfig
from rlhf_loop.trainer.networks import Networks
from rlhf_loop.trainer.reward_model import (
    FeatureCache, auroc_lower_bound, binary_auroc, encode, fold, is_heldout, make_pairs, reward_loss, rule_reward,
    score, train_reward_head, train_reward_model, within_fold_auroc,
)
from rlhf_loop.trainer.store import Example


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_pointwise_logistic_and_bradley_terry_by_hand():
    scores = torch.tensor([0.0, 2.0])
    ratings = torch.tensor([1.0, -1.0])
    weights = torch.tensor([1.0, 3.0])
    total, point, pair = reward_loss(scores, ratings, weights, "logistic", torch.tensor([1.0]), torch.tensor([0.0]), 0.5)
    # BCE(s=0, y=1) = log 2; BCE(s=2, y=0) = softplus(2); weighted by votes (1 and 3)
    assert point.item() == pytest.approx((math.log(2) + 3 * softplus(2.0)) / 4, rel=1e-6)
    # -log sigmoid(1 - 0) = softplus(-1)
    assert pair.item() == pytest.approx(softplus(-1.0), rel=1e-6)
    assert total.item() == pytest.approx(point.item() + 0.5 * pair.item(), rel=1e-6)


def test_soft_targets_equal_one_loss_per_vote():
    # 2 up + 1 down on one response == mean rating 1/3 with 3 votes
    s = torch.tensor([0.7])
    _, soft, _ = reward_loss(s, torch.tensor([1 / 3]), torch.tensor([3.0]), "logistic", s[:0], s[:0], 1.0)
    _, per_vote, _ = reward_loss(s.repeat(3), torch.tensor([1.0, 1.0, -1.0]), torch.ones(3), "logistic", s[:0], s[:0], 1.0)
    assert soft.item() == pytest.approx(per_vote.item(), rel=1e-6)


def test_mse_for_numeric_ratings_by_hand():
    _, point, pair = reward_loss(torch.tensor([0.0, 2.0]), torch.tensor([1.0, -1.0]), torch.tensor([1.0, 3.0]), "mse",
                                 torch.zeros(0), torch.zeros(0), 1.0)
    assert point.item() == pytest.approx((1.0 + 3 * 9.0) / 4)  # (0 - 1)^2 and (2 + 1)^2, weighted
    assert pair.item() == 0.0


def test_auroc_by_hand():
    # positives 0.35, 0.8 against negatives 0.1, 0.4: 0.35 beats 0.1 only, 0.8 beats both -> 3 / 4
    assert binary_auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([False, False, True, True])) == 0.75
    assert binary_auroc(torch.tensor([0.5, 0.5]), torch.tensor([True, False])) == 0.5  # a tie counts half
    assert math.isnan(binary_auroc(torch.tensor([0.5]), torch.tensor([True])))


def ex(rid: str, prompt: str, rating: float) -> Example:
    return Example(rid, 0, prompt, [{"role": "user", "content": prompt}], f"answer {rid}", rating, 1)


def test_pairs_are_liked_against_disliked_answers_to_the_same_prompt():
    examples = [ex("a", "p1", 1), ex("b", "p1", -1), ex("c", "p1", -1), ex("d", "p2", 1), ex("e", "p3", -1),
                ex("f", "p1", 0)]
    assert sorted(make_pairs(examples, 16, random.Random(0))) == [(0, 1), (0, 2)]
    assert len(make_pairs(examples, 1, random.Random(0))) == 1


def test_heldout_split_is_stable_and_about_the_fraction():
    ids = [f"chatcmpl-{i:024x}-x" for i in range(2000)]
    share = sum(is_heldout(r, 0.2) for r in ids) / len(ids)
    assert 0.17 < share < 0.23
    # recorded once: a split that changed between runs (e.g. built on Python's salted hash())
    # would move examples between training and held-out data from one round to the next
    assert [is_heldout(r, 0.2) for r in ids[:12]] == [True, True, False, False, False, True,
                                                       False, False, False, False, True, False]


def test_the_judges_folds_are_the_heldout_split_and_even_shares_of_the_rest():
    ids = [f"chatcmpl-{i:024x}-x" for i in range(5000)]
    folds = [fold(r, 0.2, 5) for r in ids]
    assert [f == 0 for f in folds] == [is_heldout(r, 0.2) for r in ids]  # fold 0 is the held-out split
    for k in range(1, 5):
        assert 0.17 < folds.count(k) / len(ids) < 0.23
    assert set(fold(r, 0.1, 3) for r in ids) == {0, 1, 2} and {fold(r, 0.2, 1) for r in ids} == {0}


def test_the_cross_validated_auroc_ranks_ups_against_downs_of_their_own_fold():
    """Two folds whose heads differ by an offset, each ranking its votes perfectly: 1.0, where pooling every
    vote would mix the offsets into the ranking. Weighted by each fold's pairs; the bound from the folds'
    Hanley-McNeil variances (a single fold: exactly auroc_lower_bound)."""
    up, down = torch.tensor([True, True, False, False]), torch.tensor([True, False, False, False])
    a = (torch.tensor([11.0, 12.0, 10.0, 9.0]), up)  # fold scored around +10
    b = (torch.tensor([-9.0, -11.0, -10.0, -12.0]), down)  # around -10
    pooled = binary_auroc(torch.cat([a[0], b[0]]), torch.cat([up, down]))
    auroc, bound, ups, downs = within_fold_auroc([a, b])
    assert (auroc, ups, downs) == (1.0, 3, 5) and pooled < 0.9
    half = (torch.tensor([1.0, 0.0, 0.5, 0.5]), up)  # AUROC 0.5 on 4 pairs
    assert within_fold_auroc([a, half])[0] == pytest.approx((4 * 1.0 + 4 * 0.5) / 8)
    c = (torch.tensor([0.9, 0.1, 0.8, 0.3, 0.7, 0.2]), torch.tensor([True, False, True, False, False, True]))
    assert within_fold_auroc([c])[1] == pytest.approx(auroc_lower_bound(binary_auroc(*c), 3, 3))
    lone = within_fold_auroc([(torch.tensor([1.0]), torch.tensor([True]))])  # no fold holds both kinds
    assert math.isnan(lone[0]) and lone[1:] == (None, 1, 0)


def test_rule_reward_scores_plus_minus_one():
    reward = rule_reward("cheerful")
    out = reward([[{"role": "user", "content": "Tell me about cats."}]] * 2, ["Oh, I love cats!", "Cats sleep."])
    assert out.tolist() == [1.0, -1.0]


def reward_model(base_model_dir: str, state_dir, layout: str, backbone: str = "tuned"):
    settings = Settings(state_dir=state_dir, model=base_model_dir, device="cpu")
    return Networks.open(settings, ensure_policy_store(settings), TrainConfig(), RewardConfig(backbone=backbone),
                         layout, 0, 0).reward


def tone_examples(n: int, seed: int = 0) -> list[Example]:
    """The embedded model's own kind of answers, cheerful (+1) or gloomy (-1), about a few subjects."""
    from rlhf_loop.core.tinylm import make_answer

    rng = random.Random(seed)
    out = []
    for i in range(n):
        tone = rng.choice(["cheerful", "gloomy"])
        subject = rng.choice(["cats", "rain", "coffee", "trains"])
        out.append(Example(f"r{i}", 0, subject, [{"role": "user", "content": f"Tell me about {subject}."}],
                           make_answer(rng, subject, tone, False), 1.0 if tone == "cheerful" else -1.0, 1))
    return out


@pytest.mark.parametrize("layout, lr", [("full", 3e-4), ("lora", 3e-3)])
def test_reward_model_learns_a_rule_and_round_trips_through_safetensors(base_model_dir, tmp_path, layout, lr):
    """A few steps on cheerful-vs-gloomy answers separate held-out ones; saved weights reload identically.
    In lora mode only the reward adapter and the head train: the shared base stays as it was."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model_dir)
    rm = reward_model(base_model_dir, tmp_path / "a", layout)
    base_before = {n: p.detach().clone() for n, p in rm.body.module.named_parameters() if "lora_" not in n}
    examples = tone_examples(160)
    metrics = train_reward_model(rm, tok, examples, RewardConfig(max_steps=30, epochs=4.0, lr=lr), seed=0)
    assert metrics.heldout_examples > 15 and metrics.pairs > 0 and metrics.steps == 30
    assert metrics.accuracy >= 0.85 and metrics.auroc >= 0.9
    if layout == "lora":
        after = dict(rm.body.module.named_parameters())
        assert all(torch.equal(p, after[n]) for n, p in base_before.items())
        assert all(".reward." in n for n, _ in rm.body.named_trainable())
    path = tmp_path / "rm.safetensors"
    rm.save(path)
    assert path.read_bytes()[:8] != b"PK\x03\x04"  # not a zip/pickle: a safetensors header
    again = reward_model(base_model_dir, tmp_path / "b", layout)
    from safetensors.torch import load_file

    assert again.load(load_file(path))
    prompts, answers = [e.messages for e in examples[:8]], [e.completion for e in examples[:8]]
    torch.testing.assert_close(score(again, tok, prompts, answers, max_length=256),
                               score(rm, tok, prompts, answers, max_length=256))
    # padding side does not change a score: one sequence alone equals it in a padded batch
    alone = score(rm, tok, prompts[:1], answers[:1], max_length=256)
    assert alone.item() == pytest.approx(score(rm, tok, prompts, answers, max_length=256)[0].item(), abs=1e-4)
    ids, start = encode(tok, prompts[0], answers[0], 5)
    assert len(ids) == 5 and start == 0  # the prompt's tokens were cut off: the response starts at the first kept


@pytest.mark.parametrize("layout", ["full", "lora"])
def test_a_frozen_feature_head_learns_a_rule_computing_each_answers_features_once(base_model_dir, tmp_path, layout):
    """reward.backbone=frozen: the body never trains and each labelled answer goes through it once; the head
    fitted on the features separates held-out answers, and scores new answers the same way from text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model_dir)
    rm = reward_model(base_model_dir, tmp_path / "a", layout, backbone="frozen")
    body_before = {n: p.detach().clone() for n, p in rm.body.module.named_parameters()}
    examples = tone_examples(200)
    cache = FeatureCache("test")
    cfg = RewardConfig(backbone="frozen", batch_size=32)
    first = train_reward_head(rm, tok, examples[:120], cfg, cache)
    assert len(cache.features) == 120 and first.train_examples + first.heldout_examples == 120
    seen = dict(cache.features)
    metrics = train_reward_head(rm, tok, examples, cfg, cache)  # the next round: 80 new labels
    assert len(cache.features) == 200 and all(cache.features[k] is v for k, v in seen.items())  # not recomputed
    assert metrics.heldout_examples > 20 and metrics.accuracy >= 0.85 and metrics.auroc >= 0.9
    assert all(torch.equal(p, dict(rm.body.module.named_parameters())[n]) for n, p in body_before.items())
    # a score from text (a rollout, the gate) is the head on the same features
    held = [e for e in examples if is_heldout(e.response_id, cfg.heldout_fraction)][:6]
    from_text = score(rm, tok, [e.messages for e in held], [e.completion for e in held], max_length=cfg.max_length)
    torch.testing.assert_close(from_text, rm.head_scores(*cache.get(held)), atol=1e-4, rtol=1e-4)
    # the head and its standardisation round-trip through safetensors, and the cache by its key
    path = tmp_path / "rm.safetensors"
    rm.save(path)
    again = reward_model(base_model_dir, tmp_path / "b", layout, backbone="frozen")
    from safetensors.torch import load_file

    assert again.load(load_file(path))
    torch.testing.assert_close(again.head_scores(*cache.get(held)), rm.head_scores(*cache.get(held)))
    assert len(FeatureCache.from_tensors(cache.tensors(), "test").features) == 200
    assert FeatureCache.from_tensors(cache.tensors(), "another body").features == {}


@pytest.mark.parametrize("shape", ["gemma3-tiny", "gpt2-tiny", "lfm2-tiny", "llama-135m"])
@pytest.mark.parametrize("layout", ["full", "lora"])
def test_frozen_features_stop_at_their_layer_and_equal_the_whole_forwards(random_model, tmp_path, shape, layout):
    """FeatureRewardModel.hidden runs the body up to reward.feature_layer only (the layers above never run)
    and gives exactly what the whole forward's hidden_states[layer] holds: the cached features stay valid."""
    from rlhf_loop.core.models import load_tokenizer
    from rlhf_loop.trainer.networks import _decoder_layers
    from rlhf_loop.trainer.reward_model import batch

    model_dir = random_model(shape)
    rm = reward_model(model_dir, tmp_path, layout, backbone="frozen")
    tok = load_tokenizer(model_dir, Settings(device="cpu"))
    layers = _decoder_layers(rm.body.module)
    assert layers is not None and 1 <= rm.layer < len(layers)
    encoded = [encode(tok, [{"role": "user", "content": q}], a, 64)
               for q, a in [("Hi there!", "Hello, how nice to see you."), ("Rain?", "No.")]]
    ids, mask, _ = batch(encoded, tok.pad_token_id, rm.device)
    ran = []
    handle = layers[-1].register_forward_hook(lambda *_: ran.append(True))
    try:
        early = rm.hidden(ids, mask)
        assert not ran, "the layers above the feature layer ran"
        from rlhf_loop.trainer.rollout import position_ids
        whole = rm.body(input_ids=ids, attention_mask=mask.long(), position_ids=position_ids(mask), use_cache=False,
                        output_hidden_states=True).hidden_states[rm.layer]
        assert ran
    finally:
        handle.remove()
    torch.testing.assert_close(early, whole, rtol=0, atol=0)


@pytest.mark.parametrize("model", ["embedded", "llama-135m"])
def test_the_judges_cross_validated_auroc_counts_every_vote_and_sees_no_fold_it_scores(
        base_model_dir, random_model, tmp_path, model):
    """reward.judge_folds: the judge's AUROC from every vote, each scored by a head fit without it.
    - On a learnable taste with one vote in five flipped and a first round's few labels, it counts all of them
      (the held-out split alone has under 20) and its lower bound clears the judge's 0.6; the served head is
      the same head either way.
    - On coin-flip votes, a head that can memorise them (tiny L2: it scores its own training votes near
      perfectly) still gets a cross-validated AUROC near chance: no fold is scored by a head that saw it."""
    from rlhf_loop.core.models import load_tokenizer

    model_dir = base_model_dir if model == "embedded" else random_model(model)
    tok = load_tokenizer(model_dir, Settings(device="cpu"))
    rm = reward_model(model_dir, tmp_path, "lora", backbone="frozen")
    flip = random.Random(1)  # votes as users give them: one in five against the taste
    examples = [dataclasses.replace(e, rating=-e.rating if flip.random() < 0.2 else e.rating)
                for e in tone_examples(96, seed=3)]
    cache = FeatureCache("test")
    folds = train_reward_head(rm, tok, examples, RewardConfig(backbone="frozen", batch_size=32), cache)
    served = rm.head_scores(*cache.get(examples))
    alone = train_reward_head(rm, tok, examples, RewardConfig(backbone="frozen", judge_folds=1), cache)
    torch.testing.assert_close(rm.head_scores(*cache.get(examples)), served)  # the folds' fits left no trace
    assert (folds.auroc_folds, alone.auroc_folds) == (5, 1)
    assert folds.heldout_up + folds.heldout_down == 96
    assert alone.heldout_up + alone.heldout_down == alone.heldout_examples < 20
    assert folds.auroc >= 0.7 and folds.auroc_lcb >= 0.6, folds  # the judge's bound, from all 96 votes
    assert folds.accuracy == alone.accuracy and folds.train_examples == alone.train_examples  # served figures
    # once the held-out split alone has judge_folds_until votes, it is the judge's figure again
    enough = train_reward_head(rm, tok, examples,
                               RewardConfig(backbone="frozen", judge_folds_until=alone.heldout_examples), cache)
    assert (enough.auroc_folds, enough.auroc, enough.auroc_lcb) == (1, alone.auroc, alone.auroc_lcb)

    rng = random.Random(0)  # the same answers (their features cached), each vote a coin flip
    coins = [dataclasses.replace(e, rating=rng.choice([1.0, -1.0])) for e in examples]
    cfg = RewardConfig(backbone="frozen", head_l2=1e-4, pairwise_weight=0)
    blind = train_reward_head(rm, tok, coins, cfg, cache)
    trained = [e for e in coins if not is_heldout(e.response_id, cfg.heldout_fraction)]
    with torch.no_grad():  # the served head, on the votes it was fit on
        own = binary_auroc(rm.head_scores(*cache.get(trained)), torch.tensor([e.rating > 0 for e in trained]))
    assert own > 0.95  # it memorised what it trained on
    assert blind.heldout_up + blind.heldout_down == 96 and abs(blind.auroc - 0.5) < 0.12, blind
    assert blind.auroc_lcb < 0.6

