"""`rlhf model import`: a random Llama written as GGUF (gguf_writer.py) comes back as the same weights,
tokenizer, chat template and EOS ids, serves chat, and bad inputs are refused in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gguf_writer import write_gguf
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from rlhf_loop.app import gguf_import
from rlhf_loop.core.models import CHATML

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi, wörld! 🙂 <|im_end|> 12"}]


def run_import(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf_loop", "model", "import", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def original(random_model) -> Path:
    return Path(random_model("llama-tiny"))


@pytest.fixture(scope="module")
def gguf_file(original, tmp_path_factory) -> tuple[Path, set[str]]:
    """(the GGUF of the random Llama, the HF names of its Q8_0 tensors)"""
    path = tmp_path_factory.mktemp("gguf") / "llama-tiny.gguf"
    return path, write_gguf(original, path)


@pytest.fixture(scope="module")
def imported(gguf_file, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("imported") / "llama-tiny"
    proc = run_import(gguf_file[0], out)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_weights_round_trip_exactly_or_within_q8_0_error(original, gguf_file, imported):
    quantized = gguf_file[1]
    assert {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"} <= quantized
    want = AutoModelForCausalLM.from_pretrained(original, use_safetensors=True).state_dict()
    got = AutoModelForCausalLM.from_pretrained(imported[0], use_safetensors=True).state_dict()
    assert got.keys() == want.keys()
    for name, w in want.items():
        if name in quantized:  # Q8_0: at most one step of 1/127 of the largest weight, and not zero
            err = (got[name] - w).abs().max().item()
            assert 0 < err <= w.abs().max().item() / 127, (name, err)
        else:  # F32, q/k permuted by the writer and back by the loader: bit for bit
            assert torch.equal(got[name], w), name
    assert not list(imported[0].glob("*.bin")) and (imported[0] / "model.safetensors").exists()


def test_tokenizer_chat_template_and_eos_ids_survive(original, imported):
    want, got = AutoTokenizer.from_pretrained(original), AutoTokenizer.from_pretrained(imported[0])
    text = CHAT[1]["content"]
    assert got(text)["input_ids"] == want(text)["input_ids"]
    assert got.decode(got(text)["input_ids"]) == text
    assert len(got) == len(want)
    assert got.chat_template == want.chat_template == CHATML
    for tokenize in (False, True):
        assert (got.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=tokenize, return_dict=False)
                == want.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=tokenize, return_dict=False))
    assert (got.eos_token, got.pad_token) == (want.eos_token, want.pad_token) == ("<|im_end|>", "<|endoftext|>")
    # the file names <|im_end|>; <|endoftext|> comes back as llama.cpp would stop on it
    want_eos = GenerationConfig.from_pretrained(original).eos_token_id
    assert sorted(GenerationConfig.from_pretrained(imported[0]).eos_token_id) == sorted(want_eos)
    assert len(want_eos) == 2


def test_report_names_what_was_imported(original, imported):
    out, proc = imported
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(original).parameters())
    eos = GenerationConfig.from_pretrained(original).eos_token_id
    assert f"imported into {out}" in proc.stdout
    for line in ("llama (LlamaForCausalLM)", f"parameters     {params:,}", "float32", f"{eos}", "from the GGUF"):
        assert line in proc.stdout, line
    assert "sample" in proc.stdout
    assert "converting" in proc.stderr and "generating" in proc.stderr  # progress while it works
    assert "warning" not in proc.stderr


def test_imported_model_serves_chat(imported, broker, tmp_path):
    from tests.service.service_helpers import ServiceProcess, chat

    service = ServiceProcess.start(tmp_path / "state", str(imported[0]), broker.bootstrap)
    try:
        r = chat(service.openai(), "Hi there", max_tokens=8)
    finally:
        service.stop()
    assert r.system_fingerprint == "policy-v0"
    assert r.choices[0].finish_reason in ("stop", "length") and isinstance(r.choices[0].message.content, str)
    assert r.usage.completion_tokens >= 1


def test_without_a_chat_template_warns_or_takes_one_from_the_flag(original, tmp_path):
    path = tmp_path / "bare.gguf"
    write_gguf(original, path, q8_0=(), chat_template=False)
    bare = run_import(path, tmp_path / "bare")
    assert bare.returncode == 0, bare.stderr
    assert "chat template  none" in bare.stdout
    warning = [line for line in bare.stderr.splitlines() if line.startswith("warning")]
    assert len(warning) == 1 and "--chat-template" in warning[0] and "RLHF_CHAT_TEMPLATE" in warning[0]
    assert AutoTokenizer.from_pretrained(tmp_path / "bare").chat_template is None

    given = run_import(path, tmp_path / "given", "--chat-template", "chatml")
    assert given.returncode == 0, given.stderr
    assert "from --chat-template" in given.stdout and "warning" not in given.stderr
    assert AutoTokenizer.from_pretrained(tmp_path / "given").chat_template == CHATML


def test_end_of_generation_ids_named_by_the_file_come_first():
    tokens = ["<|endoftext|>", "a", "<|eot_id|>", "<|im_end|>", "b"]
    metadata = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.eos_token_id": 4,
                "tokenizer.ggml.eot_token_id": 2, "tokenizer.ggml.eom_token_id": 1}
    assert gguf_import.end_of_generation_ids(metadata) == [4, 2, 1, 0, 3]
    assert gguf_import.end_of_generation_ids({"tokenizer.ggml.tokens": ["a", "b"]}) == []


def _not_gguf(d: Path) -> Path:
    (d / "notes.gguf").write_text("hello")
    return d / "notes.gguf"


def _truncated(d: Path, gguf_path: Path) -> Path:
    (d / "cut.gguf").write_bytes(gguf_path.read_bytes()[:2000])
    return d / "cut.gguf"


def _bert(d: Path) -> Path:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(d / "bert.gguf", "bert")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return d / "bert.gguf"


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"),
    ("not gguf", "not a GGUF file"),
    ("truncated", "not a readable GGUF file"),
    ("architecture", "cannot load GGUF architecture 'bert'; it can load: "),
    ("out dir used", "exists and is not an empty directory"),
])
def test_bad_input_is_refused_in_one_line_and_writes_nothing(case, message, gguf_file, tmp_path, capsys):
    source = {"missing": lambda: tmp_path / "absent.gguf", "not gguf": lambda: _not_gguf(tmp_path),
              "truncated": lambda: _truncated(tmp_path, gguf_file[0]), "architecture": lambda: _bert(tmp_path),
              "out dir used": lambda: gguf_file[0]}[case]()
    out = tmp_path / "out"
    if case == "out dir used":
        out.mkdir()
        (out / "mine.txt").write_text("keep me")
    assert gguf_import.main([str(source), str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rlhf model import: error: ") and message in err, err
    if case == "architecture":
        assert "llama" in err and "qwen2" in err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []  # no stage left
    assert not out.exists() or [p.name for p in out.iterdir()] == ["mine.txt"]


def test_an_empty_out_dir_is_used_and_a_bad_template_refused(gguf_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        gguf_import.main([str(gguf_file[0]), str(tmp_path / "x"), "--chat-template", "my-template.jinja"])
    assert e.value.code == 2 and "chat template file my-template.jinja does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    (tmp_path / "empty").mkdir()
    assert gguf_import.main([str(gguf_file[0]), str(tmp_path / "empty")]) == 0
    assert (tmp_path / "empty" / "model.safetensors").exists()
