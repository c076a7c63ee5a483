"""core/models.py: where chat templates given as settings or flags come from."""

import pytest

from rlhf_loop.core.models import CHATML, resolve_chat_template


def test_chat_template_from_shorthand_file_or_text(tmp_path):
    assert resolve_chat_template("chatml") == resolve_chat_template(" ChatML ") == CHATML
    (tmp_path / "t.jinja").write_text("{{ messages[0]['content'] }}")
    assert resolve_chat_template(str(tmp_path / "t.jinja")) == "{{ messages[0]['content'] }}"
    assert resolve_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}").startswith("{% for")


@pytest.mark.parametrize("value, message", [
    ("missing.jinja", "chat template file missing.jinja does not exist"),
    ("templates/chat.jnja", "is neither 'chatml', a .jinja file, nor a Jinja template"),  # a mistyped path
])
def test_chat_template_refuses_what_it_cannot_use(value, message):
    with pytest.raises(ValueError, match=message):
        resolve_chat_template(value)


def test_models_load_without_hub_kernels(base_model_dir):
    """transformers turns Hugging Face Hub kernels on by default, and on CUDA `.train()` then downloads and
    runs them (an error offline: the GPU run of tests/gpu/test_cuda.py hit it). Every load here says no."""
    from rlhf_loop.core.contracts import Settings
    from rlhf_loop.core.models import load_model

    model = load_model(base_model_dir, Settings(device="cpu"))
    model.train()
    assert model.use_kernels is False
