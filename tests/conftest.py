"""Fixtures shared by every test package: environment and a real Kafka-protocol broker."""

from __future__ import annotations

import os

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from rlhf_loop.core.broker import EmbeddedBroker  # noqa: E402


@pytest.fixture
def broker(tmp_path):
    """A fresh tansu broker on a free loopback port, stopped after the test."""
    with EmbeddedBroker(log_path=tmp_path / "broker.log") as b:
        yield b


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory) -> str:
    """The embedded default model, built once per test session into a shared cache.

    RLHF_TEST_MODEL_CACHE (default ~/.cache/rlhf-loop-test) keeps it between sessions so
    repeated local runs skip the ~1 minute build; CI on a clean machine builds it once.
    """
    from pathlib import Path

    from rlhf_loop.core import tinylm

    cache = Path(os.environ.get("RLHF_TEST_MODEL_CACHE", Path.home() / ".cache" / "rlhf-loop-test"))
    return str(tinylm.ensure(cache))


@pytest.fixture(scope="session")
def random_model():
    """random_model(shape, chat_template=..., pad_token=...) -> directory of a random-weight HF causal LM
    (app/random_models.py), built once into the shared test cache."""
    from pathlib import Path

    from rlhf_loop.app import random_models

    cache = Path(os.environ.get("RLHF_TEST_MODEL_CACHE", Path.home() / ".cache" / "rlhf-loop-test"))

    def get(shape: str, **variant) -> str:
        return str(random_models.ensure(cache / "random", shape, **variant))

    return get
