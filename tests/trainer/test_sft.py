"""`rlhf sft`: assistant-only masking, learning the demonstrations, publishing a version."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_loop.core.contracts import PolicyUpdate
from rlhf_loop.core.policy_store import PolicyStore
from rlhf_loop.core.tinylm import QUESTIONS, SUBJECTS, make_answer
from rlhf_loop.trainer.sft import main, read_demonstrations, sft_loss, tokenize
from trainer_helpers import consume_all


def demos(n: int, seed: int, tone: str = "gloomy") -> list[dict]:
    """Demonstrations in one tone (the base model uses each about a third of the time)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = rng.choice(list(SUBJECTS))
        out.append({"messages": [{"role": "user", "content": rng.choice(QUESTIONS).replace("{s}", s)},
                                 {"role": "assistant", "content": make_answer(rng, s, tone, False)}]})
    return out


def test_only_assistant_turns_are_labelled(base_model_dir):
    tok = AutoTokenizer.from_pretrained(base_model_dir)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about cats."},
            {"role": "assistant", "content": "Cats purr."}, {"role": "user", "content": "And dogs?"},
            {"role": "assistant", "content": "Dogs bark!"}]
    ids, labels = tokenize(tok, chat, 512)
    assert len(ids) == len(labels)
    spans, cur = [], []
    for i, y in zip(ids, labels):
        if y != -100:
            assert y == i
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    spans.append(cur) if cur else None
    assert [tok.decode(s) for s in spans] == ["Cats purr.<|end|>", "Dogs bark!<|end|>"]


def test_bad_lines_are_refused_with_their_line_number(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(demos(1, 0)[0]) + "\n" + '{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2"):
        read_demonstrations(p)


def answer_nll(model_dir: str, chats: list[dict]) -> float:
    """Mean negative log-likelihood of a whole assistant answer (nats per answer)."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    batch = [tokenize(tok, c["messages"], 512) for c in chats]
    T = max(len(x) for x, _ in batch)
    ids = torch.full((len(batch), T), tok.pad_token_id)
    labels = torch.full((len(batch), T), -100)
    mask = torch.zeros(len(batch), T, dtype=torch.bool)
    for i, (x, y) in enumerate(batch):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), True
    with torch.no_grad():
        per_token = sft_loss(model, ids, labels, mask).item()
    return per_token * (labels[:, 1:] != -100).sum().item() / len(chats)


def test_sft_learns_the_demonstrations_and_publishes_a_version(settings, base_model_dir, tmp_path, monkeypatch, capsys):
    data = tmp_path / "demos.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in demos(64, seed=0)) + "\n")
    for key, value in {"RLHF_STATE_DIR": settings.state_dir, "RLHF_MODEL": base_model_dir, "RLHF_DEVICE": "cpu",
                       "RLHF_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
                       "RLHF_TOPIC_PARTITIONS": "2"}.items():
        monkeypatch.setenv(key, str(value))
    assert main([str(data), "--no-progress"]) == 0
    assert "published v1 (parent v0)" in capsys.readouterr().out

    store = PolicyStore(settings.policy_dir)
    assert store.latest() == 1
    manifest = store.verify(1)
    assert manifest.parent_version == 0 and manifest.metrics["sft_examples"] == 64.0
    assert all(name.endswith((".json", ".safetensors", ".jinja", ".txt")) for name in manifest.files)
    (update,) = [PolicyUpdate.model_validate_json(v) for v in consume_all(settings, settings.topic_policy_updates, "t")]
    assert update.version == 1 and update.files == manifest.files

    # answers it never saw: gloomy ones got more likely, and relative to cheerful ones by a wide
    # margin (the tone lives in a few opening tokens, so compare whole answers, in nats)
    gloomy, cheerful = demos(32, seed=99), demos(32, seed=99, tone="cheerful")
    base, tuned = str(store.path(0)), str(store.path(1))
    assert answer_nll(tuned, gloomy) < answer_nll(base, gloomy)
    gap_before = answer_nll(base, cheerful) - answer_nll(base, gloomy)
    gap_after = answer_nll(tuned, cheerful) - answer_nll(tuned, gloomy)
    print(f"\ngloomy-vs-cheerful log-odds per answer: {gap_before:.2f} -> {gap_after:.2f} nats")
    assert gap_after > gap_before + 0.7, (gap_before, gap_after)  # the odds of gloomy vs cheerful double

    out = tmp_path / "out"  # --out: a plain checkpoint, the store untouched
    assert main([str(data), "--no-progress", "--sft.epochs", "1", "--out", str(out)]) == 0
    assert store.versions() == [0, 1]
    assert AutoModelForCausalLM.from_pretrained(out, use_safetensors=True).config.vocab_size > 0
