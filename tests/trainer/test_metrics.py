"""`rlhf train`'s Prometheus metrics and loop report (GET /loop): a real trainer process, a real broker, one short round.

    .venv/bin/python -m pytest -q tests/trainer/test_metrics.py
"""

from __future__ import annotations

import json
import random
import signal
import time

import httpx
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families
from trainer_helpers import TrainerProcess, interaction, produce, records, trainer_env, votes_for

from rlhf_loop.core.broker import free_port
from rlhf_loop.core.loop_report import LoopReport
from rlhf_loop.core.tinylm import make_answer
from rlhf_loop.trainer import metrics

PHASES = {"consume", "reward_model", "rollout", "score", "ppo", "gate", "publish", "total"}


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value}."""
    text = httpx.get(url, timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_a_round_and_the_vote_stream_show_on_the_trainers_metrics(settings, base_model_dir, tmp_path):
    port = free_port()
    env = trainer_env(settings, base_model_dir, RLHF_TRAIN_MIN_LABELS="20", RLHF_TRAIN_MAX_WAIT_S="3",
                      RLHF_TRAINER_METRICS_PORT=str(port), RLHF_HOST="127.0.0.1")
    rng = random.Random(0)
    its = [interaction(rng, [{"role": "user", "content": "Tell me about rain."}],
                       make_answer(rng, "rain", rng.choice(["cheerful", "gloomy"]), False)) for _ in range(24)]
    votes = votes_for(its, taste="cheerful", noise=0.0, seed=0)
    with open(tmp_path / "trainer.log", "w") as log:
        proc = TrainerProcess(env, log)
        try:
            produce(settings, records(settings, its, votes))
            proc.wait_for(lambda line: line.startswith("round 1:"))
            url = f"http://127.0.0.1:{port}/metrics"
            deadline = time.monotonic() + 30  # the loop reports its state after the next poll
            while (m := scrape(url)).get(("rlhf_trainer_labels", ())) != 24 and time.monotonic() < deadline:
                time.sleep(0.5)
            loop = LoopReport.model_validate_json(httpx.get(f"http://127.0.0.1:{port}/loop", timeout=10).content)
            proc.proc.send_signal(signal.SIGTERM)
            assert proc.proc.wait(60) == 0
        finally:
            proc.kill()

    (report,) = [json.loads(x) for x in (settings.trainer_dir / "rounds.jsonl").read_text().splitlines()]
    assert report["promoted"], report
    assert m[("rlhf_trainer_rounds_total", (("outcome", "promoted"),))] == 1
    assert {dict(ls)["phase"] for n, ls in m if n == "rlhf_trainer_phase_seconds_count"} == PHASES
    assert m[("rlhf_trainer_phase_seconds_sum", (("phase", "total"),))] == report["seconds"]["total"]
    assert m[("rlhf_trainer_reward_model_accuracy", ())] == report["reward_model"]["accuracy"]
    for policy in ("current", "candidate"):
        assert m[("rlhf_trainer_reward", (("policy", policy),))] == report[policy]["reward"]
        assert m[("rlhf_trainer_kl_to_reference", (("policy", policy),))] == report[policy]["kl_to_ref"]
    assert m[("rlhf_trainer_kl_coef", ())] == report["kl_coef"]
    assert m[("rlhf_trainer_policy_version", ())] == report["version"] == 1
    assert m[("rlhf_trainer_labels", ())] == 24
    newest = max(v.ts for v in votes).timestamp()
    assert m[("rlhf_trainer_last_vote_timestamp_seconds", ())] == newest
    # every partition of both topics, each read to its end
    lag = {(dict(ls)["topic"], dict(ls)["partition"]): v for (n, ls), v in m.items() if n == "rlhf_trainer_consumer_lag"}
    partitions = {(t, str(p)) for t in (settings.topic_interactions, settings.topic_feedback)
                  for p in range(settings.topic_partitions)}
    assert set(lag) == partitions and set(lag.values()) == {0}, lag
    # the same port's GET /loop (the loop page's source): the round from rounds.jsonl, approval from the store
    (shown,) = loop.rounds
    assert (shown.round, shown.verdict, shown.version, shown.version_before) == (1, "promoted", 1, 0)
    assert (shown.kl_to_ref, shown.reward_after) == (report["candidate"]["kl_to_ref"], report["candidate"]["reward"])
    assert shown.kl_bound == report["kl_bound"] and shown.labels == report["labels"] == 24
    (v0,) = loop.approval
    ups = sum(v.rating == 1 for v in votes)
    assert (v0.version, v0.up, v0.down) == (0, ups, 24 - ups) and 0 < ups < 24
    assert (v0.points[-1].up, v0.points[-1].down, v0.points[-1].time) == (ups, 24 - ups, newest)
    # nothing trainer/metrics.py defines is missing from the scrape
    defined = {v.describe()[0].name for v in vars(metrics).values() if isinstance(v, MetricWrapperBase)}
    assert defined and defined <= {name for name, _ in m} | {name.removesuffix("_total") for name, _ in m} | {
        name.removesuffix("_count") for name, _ in m}
