"""The trainer's Prometheus metrics, served by `rlhf train` on RLHF_TRAINER_METRICS_PORT (0 = off).

    RLHF_TRAINER_METRICS_PORT=9400 rlhf train  &&  curl -s localhost:9400/metrics | grep rlhf_trainer_
    curl -s localhost:9400/loop       # the loop report (core/loop_report.py): the newest rounds, approval by version

The same port answers GET /loop, read-only JSON for the service's loop page (service/loop.py
relays it from RLHF_TRAINER_URL): the newest rounds from rounds.jsonl and approval by version
over time from the label store, each read afresh per request on the server's own thread.

The metric objects, and small functions that take plain values: `observe_round` a round's
report as a dict (trainer/round.py, as the round ends), `observe_state` what the continuous
loop knows between polls (trainer/cli.py). Gauges hold the last round's figures; the table
is in docs/trainer.md, and k8s/base/grafana/rlhf-loop.json plots them.
"""

from __future__ import annotations

import json
import math
import threading
from collections import deque
from pathlib import Path
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import Counter, Gauge, Histogram, make_wsgi_app

from rlhf_loop.core.loop_report import LoopReport, loop_round, round_verdict
from rlhf_loop.trainer.store import read_approval

LOOP_ROUNDS = 200  # rounds in a loop report: the newest; a day of rounds at the default cadence fits
APPROVAL_BUCKETS = 48  # points per version's approval line

rounds = Counter("rlhf_trainer_rounds", "Training rounds by outcome: promoted, rejected (by the gate, or "
                 "by its judge before any policy trained), skipped (no labelled examples yet)", ["outcome"])
phase_seconds = Histogram("rlhf_trainer_phase_seconds", "Seconds per round phase (consume, reward_model, rollout, "
                          "score, ppo, gate, publish) and in total", ["phase"],
                          buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800))
reward_model_accuracy = Gauge("rlhf_trainer_reward_model_accuracy", "Held-out accuracy of the reward model, last round")
reward_model_auroc = Gauge("rlhf_trainer_reward_model_auroc", "Held-out AUROC of the reward model, last round "
                           "(NaN until the held-out set has both up and down votes)")
reward = Gauge("rlhf_trainer_reward", "Mean reward on the gate's held-out prompts, last round, by policy "
               "(current, candidate)", ["policy"])
kl_to_reference = Gauge("rlhf_trainer_kl_to_reference", "KL to the reference model in nats per response on the "
                        "gate's prompts, last round, by policy (current, candidate)", ["policy"])
kl_coef = Gauge("rlhf_trainer_kl_coef", "The adaptive KL coefficient (PPO's beta) after the last round")
policy_version = Gauge("rlhf_trainer_policy_version", "The policy version the trainer trains from: the last one it "
                       "published, or LATEST when it started")
labels = Gauge("rlhf_trainer_labels", "Labels stored: live votes joined to the answer they rate, and live preferences "
               "joined to both their answers")
last_vote = Gauge("rlhf_trainer_last_vote_timestamp_seconds", "When the newest stored vote was cast (its event "
                  "time); time() minus this is the vote stream's staleness")
consumer_lag = Gauge("rlhf_trainer_consumer_lag", "Records the broker holds beyond the trainer's position, per "
                     "partition (the high watermark of the last fetch minus the position)", ["topic", "partition"])


rollbacks = Counter("rlhf_trainer_rollbacks", "Promoted versions rolled back by the live-approval watch")
watch_z = Gauge("rlhf_trainer_watch_z", "The live-approval watch's last look: z of a version's approval against its "
                "parent's (negative: lower; that look rolls back at or below minus its bound)")
budget_spent = Gauge("rlhf_trainer_kl_budget_spent", "1 while the KL budget is spent: the serving version is near "
                     "gate.max_kl and rounds could not use the rest, so none run until LATEST moves")
update_scale = Gauge("rlhf_trainer_update_scale", "How much of its update the last candidate kept (1; 1/2, 1/4, ... "
                     "when scaled back under the KL bound)")
guard_streak = Gauge("rlhf_trainer_guard_rejections_in_a_row", "Rounds in a row whose candidate failed the guard set "
                     "(gate.guard_stall_rounds and more: the votes pull where the guard set forbids)")
voters_capped = Gauge("rlhf_trainer_voters_capped", "Voters whose votes the influence cap down-weighted, last round")
voter_share = Gauge("rlhf_trainer_max_voter_share", "The largest share of a round's votes one voter cast, before the cap")


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a request in flight does not hold the trainer's exit


class _Quiet(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - a scrape every 15 s is not worth a log line
        return


def serve(host: str, port: int, rounds_path: Path, store_path: Path) -> None:
    """/metrics (Prometheus) and /loop (the loop report: `loop_report`) on host:port, from a daemon thread."""
    prometheus = make_wsgi_app()

    def app(wsgi_env, start_response):  # (not `environ`: that name reads as the process environment to tests/deploy)
        if wsgi_env["PATH_INFO"] != "/loop":
            return prometheus(wsgi_env, start_response)
        body = loop_report(rounds_path, store_path).model_dump_json().encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    httpd = make_server(host, port, app, _Server, handler_class=_Quiet)
    threading.Thread(target=httpd.serve_forever, name="trainer-metrics", daemon=True).start()


def loop_report(rounds_path: Path, store_path: Path) -> LoopReport:
    """The newest LOOP_ROUNDS rounds of rounds.jsonl and approval by version from the label store."""
    lines: deque[str] = deque(maxlen=LOOP_ROUNDS)
    if rounds_path.exists():
        with open(rounds_path) as f:
            lines.extend(line for line in f if line.endswith("\n"))  # not a line the round is appending now
    return LoopReport(rounds=[loop_round(json.loads(line)) for line in lines],
                      approval=read_approval(store_path, APPROVAL_BUCKETS))


def observe_round(report: dict) -> None:
    """A finished round, as `dataclasses.asdict(RoundReport)`."""
    rounds.labels(outcome=round_verdict(report)).inc()
    for phase, seconds in report["seconds"].items():
        phase_seconds.labels(phase=phase).observe(seconds)
    if report["reward_model"]:
        reward_model_accuracy.set(report["reward_model"]["accuracy"])
        reward_model_auroc.set(report["reward_model"]["auroc"])
    for policy in ("current", "candidate"):
        if report[policy]:
            reward.labels(policy=policy).set(report[policy]["reward"])
            kl_to_reference.labels(policy=policy).set(report[policy]["kl_to_ref"])
    if report["voters"]:
        voters_capped.set(report["voters"]["capped"])
        voter_share.set(report["voters"]["max_share"])
    if report["budget"]:
        update_scale.set(report["budget"].get("update_scale", 1.0))
    guard_streak.set(report["guard_streak"])
    if math.isfinite(report["kl_coef"]):  # NaN in a round skipped before PPO
        kl_coef.set(report["kl_coef"])
    policy_version.set(report["version"] if report["promoted"] else report["version_before"])


def observe_state(version: int, labels_stored: int, last_vote_ts: float | None,
                  lag: dict[tuple[str, int], int]) -> None:
    """Between polls: the current version, the label store, the consumer's lag per (topic, partition)."""
    policy_version.set(version)
    labels.set(labels_stored)
    if last_vote_ts is not None:
        last_vote.set(last_vote_ts)
    for (topic, partition), records in lag.items():
        consumer_lag.labels(topic=topic, partition=str(partition)).set(records)


def observe_watch(verdict) -> None:
    """A look the live-approval watch took (trainer/watch.py)."""
    watch_z.set(verdict.z)
    if verdict.decision == "roll back":
        rollbacks.inc()
