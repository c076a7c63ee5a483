"""Fixtures for the trainer tests: one torch thread, trainer settings on a fresh broker."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlhf_loop.core.contracts import Settings


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: on a shared 2-core machine two threads spin against each other
    (a reward-model step is ~10x slower under contention); restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def settings(tmp_path: Path, broker, base_model_dir) -> Settings:
    """Trainer settings on a fresh broker and state dir, topics created, base = the embedded model."""
    from rlhf_loop.core.broker import ensure_topics

    s = Settings(state_dir=tmp_path / "state", model=base_model_dir, kafka_bootstrap_servers=broker.bootstrap,
                 topic_partitions=2, device="cpu")
    ensure_topics(s)
    return s


@pytest.fixture
def store(tmp_path):
    """An empty label store with short windows (votes wait 100 s for their answer, dedupe keeps 1,000 s)."""
    from rlhf_loop.trainer.store import LabelStore

    s = LabelStore(tmp_path / "labels.sqlite", late_vote_window_s=100.0, dedupe_window_s=1000.0, prompt_pool_size=10)
    yield s
    s.close()
