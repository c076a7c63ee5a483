"""The trainer on two ranks (torchrun, gloo, CPU) computes the round one rank computes, and survives a rank's death.

Each run is `rlhf train --once` (one rank) or `rlhf train --once --nproc 2` (which execs
`torchrun --standalone --nproc_per_node 2 --max-restarts 3`) as a subprocess, on its own
state dir and consumer group, over the same votes on one real broker. Same global batch,
same seeds: the published candidates must agree to float tolerance (the ranks split every
batch and sum their shares; only the order of float additions differs).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from rlhf_loop.core.policy_store import PolicyStore
from rlhf_loop.trainer.store import LabelStore
from trainer_helpers import TrainerProcess, interaction, produce, prompts, records, trainer_env, votes_for

pytestmark = pytest.mark.slow

TWO_RANK_ROUND = {  # batches that split evenly in two
    "RLHF_REWARD_MAX_STEPS": "4", "RLHF_REWARD_BATCH_SIZE": "8", "RLHF_PPO_ROLLOUT_PROMPTS": "8",
    "RLHF_PPO_MINIBATCH_SIZE": "4", "RLHF_PPO_PPO_EPOCHS": "2", "RLHF_GATE_EVAL_RESPONSES": "8",
    "RLHF_TRAIN_COLLECTIVE_TIMEOUT_S": "60",
}


ANSWERS = ["Oh, I love cats! They purr.", "Cats sleep.", "What a joy, rain helps the fields!", "Rain. That is all.",
           "Ugh, coffee again.", "Happy to help! Trains run on rails."]


def traffic(n: int, seed: int):
    import random

    rng = random.Random(seed)
    its = [interaction(rng, p, rng.choice(ANSWERS)) for p in prompts(n, seed)]
    return its, votes_for(its, taste="cheerful", noise=0.1, seed=seed)


def run(settings, base_model_dir, tmp_path, name: str, *args: str, **env: str) -> tuple[PolicyStore, list[dict], str]:
    state = tmp_path / name
    e = trainer_env(settings.model_copy(update={"state_dir": state}), base_model_dir, **TWO_RANK_ROUND,
                    RLHF_TRAINER_GROUP=f"trainer-{name}", **env)
    with open(tmp_path / f"{name}.log", "w") as log:
        proc = TrainerProcess(e, log, "--once", *args)
        try:
            proc.wait_for(lambda line: line.startswith("round "), timeout=300)
            assert proc.proc.wait(120) == 0
        finally:
            proc.kill()
    rounds = [json.loads(x) for x in (state / "trainer" / "rounds.jsonl").read_text().splitlines()]
    return PolicyStore(state / "policies"), rounds, "".join(proc.seen)


def weights(store: PolicyStore, version: int) -> dict[str, torch.Tensor]:
    return load_file(store.path(version) / "model.safetensors")


@contextlib.contextmanager
def two_ranks_pausing(settings, base_model_dir, tmp_path, name: str, point: str, seed: int):
    """48 votes on the broker, then `rlhf train --once --nproc 2` whose rank 1 pauses at kill point `point`:
    yields (the process, its state dir, the votes); the process is killed on the way out if still running."""
    its, votes = traffic(48, seed=seed)
    produce(settings, records(settings, its, votes))
    state = tmp_path / name
    env = trainer_env(settings.model_copy(update={"state_dir": state}), base_model_dir, **TWO_RANK_ROUND,
                      RLHF_TRAINER_PAUSE_AT=point, RLHF_TRAINER_PAUSE_RANK="1")
    with open(tmp_path / f"{name}.log", "w") as log:
        proc = TrainerProcess(env, log, "--once", "--nproc", "2")
        try:
            yield proc, state, votes
        finally:
            proc.kill()


def test_a_dead_rank_aborts_the_round_and_the_restart_completes(settings, base_model_dir, tmp_path):
    """Rank 1 is SIGKILLed after PPO (rank 0 then waits for it in the gate's collectives): the attempt
    publishes nothing and does not hang (every wait below is bounded); torchrun restarts the group,
    whose round completes, and the stored labels equal the votes."""
    with two_ranks_pausing(settings, base_model_dir, tmp_path, "killed", "round:trained", seed=4) as (proc, state, votes):
        paused = proc.wait_for(lambda line: line.startswith("PAUSED AT round:trained rank=1"), timeout=300)
        assert PolicyStore(state / "policies").versions() == [0]
        os.kill(int(paused.split("pid=")[1]), signal.SIGKILL)
        proc.wait_for(lambda line: line.startswith("round "), timeout=300)  # the restarted group's round
        assert proc.proc.wait(120) == 0
    store = LabelStore(state / "trainer" / "labels.sqlite", late_vote_window_s=3600, dedupe_window_s=3600,
                       prompt_pool_size=100)
    try:
        assert store.votes() == {v.feedback_id: float(v.rating) for v in votes}
    finally:
        store.close()
    policy_store = PolicyStore(state / "policies")
    assert policy_store.versions() == [0, 1]  # the killed attempt published nothing; the restart published once
    policy_store.verify(1)
    rounds = (state / "trainer" / "rounds.jsonl").read_text().splitlines()
    assert len(rounds) == 1 and json.loads(rounds[0])["world_size"] == 2


def test_a_rank_lost_after_the_round_does_not_make_the_restart_train_again(settings, base_model_dir, tmp_path):
    """Rank 1 is SIGKILLed after the round, as the ranks leave: rank 0 fails its last collective and
    torchrun restarts the group. The restarted --once job finds its round done and publishes nothing
    (seen in CI once: a restart after the round published a second version)."""
    with two_ranks_pausing(settings, base_model_dir, tmp_path, "lost-at-exit", "exit", seed=5) as (proc, state, _):
        paused = proc.wait_for(lambda line: line.startswith("PAUSED AT exit rank=1"), timeout=300)
        if not any(line.startswith("round ") for line in proc.seen):  # rank 0 may print it after rank 1 paused
            proc.wait_for(lambda line: line.startswith("round "), timeout=120)
        os.kill(int(paused.split("pid=")[1]), signal.SIGKILL)
        assert proc.proc.wait(180) == 0
    assert "after its round had finished" in (tmp_path / "lost-at-exit.log").read_text()  # the group was restarted
    assert PolicyStore(state / "policies").versions() == [0, 1]
    assert len((state / "trainer" / "rounds.jsonl").read_text().splitlines()) == 1


def test_two_ranks_publish_the_candidate_one_rank_publishes(settings, base_model_dir, tmp_path):
    """One rank, then two under each strategy (ddp, fsdp2), each on its own state dir and consumer group."""
    its, votes = traffic(48, seed=3)
    produce(settings, records(settings, its, votes))
    one, one_rounds, _ = run(settings, base_model_dir, tmp_path, "one")
    assert one.versions() == [0, 1] and one_rounds[0]["world_size"] == 1
    base, a = weights(one, 0), weights(one, 1)
    moved = sum((a[k] - base[k]).norm() ** 2 for k in a) ** 0.5
    assert moved > 1e-3
    for strategy in ("ddp", "fsdp2"):
        two, two_rounds, out = run(settings, base_model_dir, tmp_path, f"two-{strategy}", "--nproc", "2",
                                   RLHF_TRAIN_STRATEGY=strategy)
        assert two.versions() == [0, 1], out  # exactly one version
        assert (two_rounds[0]["world_size"], two_rounds[0]["strategy"]) == (2, strategy)
        for key in ("labels", "votes"):
            assert one_rounds[0][key] == two_rounds[0][key] == 48
        # the same rollouts (per-row seeds), the same held-out evaluation
        for key in ("reward", "kl_to_ref", "length", "distinct_2"):
            assert one_rounds[0]["current"][key] == pytest.approx(two_rounds[0]["current"][key], rel=1e-4, abs=1e-5), \
                (strategy, key)
        assert one_rounds[0]["reward_model"]["auroc"] == pytest.approx(two_rounds[0]["reward_model"]["auroc"], abs=1e-6)
        b = weights(two, 1)
        assert a.keys() == b.keys()
        apart = sum((a[k] - b[k]).norm() ** 2 for k in a) ** 0.5
        # the two candidates differ by float reordering only: far less than the round moved the weights
        assert apart < 0.01 * moved, (strategy, moved, apart)
