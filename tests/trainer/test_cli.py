"""`rlhf train` in continuous mode: a round when enough labels arrived or some waited long enough; SIGTERM stops it."""

from __future__ import annotations

import json
import random
import signal

from rlhf_loop.core.tinylm import make_answer
from trainer_helpers import TrainerProcess, interaction, produce, records, trainer_env, votes_for


def traffic(n: int, seed: int):
    rng = random.Random(seed)
    its = [interaction(rng, [{"role": "user", "content": "Tell me about rain."}],
                       make_answer(rng, "rain", rng.choice(["cheerful", "gloomy"]), False)) for _ in range(n)]
    return its, votes_for(its, taste="cheerful", noise=0.0, seed=seed)


def test_rounds_follow_the_label_stream_and_sigterm_stops_cleanly(settings, base_model_dir, tmp_path):
    env = trainer_env(settings, base_model_dir, RLHF_TRAIN_MIN_LABELS="20", RLHF_TRAIN_MAX_WAIT_S="3")
    with open(tmp_path / "trainer.log", "w") as log:
        proc = TrainerProcess(env, log)
        try:
            produce(settings, records(settings, *traffic(24, seed=0)))  # >= 20 new labels: a round
            proc.wait_for(lambda line: line.startswith("round ") and "24 labels" in line)
            produce(settings, records(settings, *traffic(3, seed=1)))  # 3 < 20, but they wait 3 s: a round
            proc.wait_for(lambda line: line.startswith("round ") and "27 labels" in line)
            proc.proc.send_signal(signal.SIGTERM)
            assert proc.proc.wait(60) == 0
        finally:
            proc.kill()
    assert "SIGTERM: stopping" in (tmp_path / "trainer.log").read_text()
    rounds = [json.loads(x) for x in (settings.trainer_dir / "rounds.jsonl").read_text().splitlines()]
    assert rounds[-1]["labels"] == 27 and all(r["promoted"] for r in rounds)
    assert [r["version"] for r in rounds] == list(range(1, len(rounds) + 1))


def test_threads_follow_omp_num_threads_before_the_cores():
    """A pod's OMP_NUM_THREADS (its CPU request, k8s/base/trainer.yaml) wins over the node's core
    count, which os.cpu_count() reports inside a container."""
    import os

    from rlhf_loop.trainer.cli import default_threads

    assert default_threads({"OMP_NUM_THREADS": "3"}) == 3
    half = max(1, len(os.sched_getaffinity(0)) // 2)
    for unset in ({}, {"OMP_NUM_THREADS": ""}, {"OMP_NUM_THREADS": "0"}, {"OMP_NUM_THREADS": "two"}):
        assert default_threads(unset) == half
