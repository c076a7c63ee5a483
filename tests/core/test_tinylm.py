"""The embedded default model: built by the project, loaded through from_pretrained."""

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_loop.core import tinylm
from rlhf_loop.core.tastes import cheerful, on_topic


def test_corpus_is_deterministic_and_mixes_tones():
    a, b = tinylm.make_corpus(300), tinylm.make_corpus(300)
    assert a == b
    answers = [c[-1]["content"] for c in a]
    share = sum(cheerful("", x) for x in answers) / len(answers)
    assert 0.2 < share < 0.5  # one tone in three is cheerful: room for the loop to improve


def test_built_model_loads_with_from_pretrained_and_answers_in_its_domain(base_model_dir):
    d = Path(base_model_dir)
    assert (d / "model.safetensors").exists() and not list(d.glob("*.bin"))
    info = json.loads((d / "tiny_chat_build.json").read_text())
    assert info["final_loss"] < 1.0, info
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    prompt = "Tell me about dogs."
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    assert tok.decode(ids["input_ids"][0]).endswith("<|assistant|>")
    answers = []
    for seed in range(12):
        torch.manual_seed(seed)
        out = model.generate(**ids, do_sample=True, max_new_tokens=48)
        answers.append(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    assert all(a and a[0].isupper() and a.rstrip()[-1] in ".!?" for a in answers), answers
    assert sum(on_topic(prompt, a) for a in answers) >= 6, answers  # mostly talks about dogs
    tones = {cheerful(prompt, a) for a in answers}
    assert tones == {True, False}, answers  # some nicer than others
