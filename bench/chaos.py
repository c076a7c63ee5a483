"""Chaos under load: the whole loop on one machine while its parts are cut off and killed.

    .venv/bin/python bench/chaos.py                  # 5 minutes of users, then the catch-up (~8 min in all)
    .venv/bin/python bench/chaos.py --seconds 120    # a shorter look

In one run, with simulated users chatting and voting through the public API and one more
client streaming answers back to back:
- the broker is unreachable for 60 s: SIGSTOPped, then SIGCONTed. Tansu is memory-only, so
  a restart would lose what it holds; a stopped process keeps it, and to its clients it
  looks like a network partition (connections stay open, nothing answers, requests time
  out) rather than a clean refusal;
- the trainer is SIGKILLed 10 times at random moments (whatever it is doing: loading,
  consuming, training, publishing) and restarted at once;
- the service is SIGKILLed 3 times while a stream is in flight and restarted at once on
  the same port and state dir (as Kubernetes would restart the pod with its volume).
Then the users stop, the service's spool drains and the trainer catches up, and it reports:
votes accepted (202s, latest per feedback id) against the labels in the trainer's store
(they must be equal), chat availability (answered / attempted, the restarts counted),
versions published, and whether any version that was ever served fails to verify against
the store (a half-written version served). Saves bench/results/chaos-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import psutil  # noqa: E402
from openai import OpenAI  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from rlhf_loop.core.contracts import Settings  # noqa: E402
from rlhf_loop.app.loop import Loop, LoopConfig  # noqa: E402
from rlhf_loop.core.policy_store import PolicyStore, VerificationError  # noqa: E402
from rlhf_loop.app.simulate import SimConfig, SimLog, run as run_users, version_of  # noqa: E402
from rlhf_loop.service import serve  # noqa: E402
from rlhf_loop.trainer.store import LabelStore  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BROKER_DOWN_S = 60.0
TRAINER_KILLS, SERVICE_KILLS = 10, 3
# small rounds, a gate that always promotes: what is tested is publishing under kills, not learning
TRAINER_ENV = {
    "RLHF_TRAIN_MIN_LABELS": "32", "RLHF_TRAIN_MAX_WAIT_S": "20",
    "RLHF_REWARD_MAX_STEPS": "5", "RLHF_PPO_ROLLOUT_PROMPTS": "8", "RLHF_PPO_MINIBATCH_SIZE": "8",
    "RLHF_PPO_ROLLOUT_BATCHES": "1", "RLHF_PPO_PPO_EPOCHS": "1", "RLHF_PPO_MAX_NEW_TOKENS": "16",
    "RLHF_GATE_EVAL_RESPONSES": "8", "RLHF_GATE_MIN_REWARD_GAIN": "-1e9", "RLHF_GATE_MAX_KL": "1e9",
    "RLHF_GATE_MIN_LENGTH_RATIO": "0",
}


class Streamer:
    """One client streaming answers back to back; says when a stream is in flight, counts outcomes."""

    def __init__(self, url: str):
        self.client = OpenAI(base_url=f"{url}/v1", api_key=SimConfig.api_key, max_retries=0, timeout=30)  # the loop's key
        self.in_flight = threading.Event()
        self.attempts = self.answered = self.cut = 0
        self.answered_at: list[float] = []  # monotonic time of each completed stream
        self.versions: set[int] = set()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.attempts += 1
            try:
                stream = self.client.chat.completions.create(
                    model="rlhf-policy", stream=True, max_tokens=200,
                    messages=[{"role": "user", "content": "Tell me about the sea, at length."}])
                for chunk in stream:
                    self.versions.add(version_of(chunk.system_fingerprint))
                    self.in_flight.set()
                self.answered += 1
                self.answered_at.append(time.monotonic())
            except Exception:  # a stream cut by a kill, or refused while the service restarts: counted
                self.cut += self.in_flight.is_set()
                time.sleep(0.5)
            finally:
                self.in_flight.clear()


def metric(url: str, name: str) -> float | None:
    try:
        text = httpx.get(f"{url}/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name)


def schedule(rng: random.Random, seconds: float) -> list[tuple[float, str]]:
    """(time, action) for the whole run, spread over its first 90 %."""
    span = seconds * 0.9
    gaps = [rng.uniform(0.5, 1.5) for _ in range(TRAINER_KILLS)]
    events, t = [], 5.0
    for g in gaps:  # random moments, about evenly spread, so rounds get a chance to finish between some
        t += g * (span - 5.0) / sum(gaps)
        events.append((t, "kill trainer"))
    third = span / SERVICE_KILLS
    events += [(rng.uniform(i * third + 0.2 * third, (i + 1) * third), "kill service") for i in range(SERVICE_KILLS)]
    start = rng.uniform(0.2 * seconds, max(0.2 * seconds, span - BROKER_DOWN_S))
    events += [(start, "stop broker"), (start + BROKER_DOWN_S, "resume broker")]
    return sorted(events)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once, as the kernel kills a container's cgroup.
    A process-group kill is not enough: BentoML starts its workers in sessions of their own, and
    an orphaned worker would keep the port (the restarted service could not bind it)."""
    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass  # exited between the listing and the kill: nothing left to kill


class Supervisor:
    """Restarts the trainer and the service at once whenever they exit, killed or on their own (as
    Kubernetes restarts a pod's container), and counts both."""

    def __init__(self, loop: Loop):
        self.loop = loop
        self.kills = {"trainer": 0, "service": 0}
        self.killed_at: dict[str, list[float]] = {"trainer": [], "service": []}
        self.exits = {"trainer": 0, "service": 0}  # exits nobody asked for

    def start(self, name: str) -> None:
        log = open(self.loop.logs / f"{name}.log", "ab")
        if name == "service":
            self.loop.procs[name] = serve.spawn("127.0.0.1", self.loop.port, self.loop.env(), log)
        else:
            self.loop.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "rlhf_loop", "train", "--no-progress"], env=self.loop.env(), stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self, name: str) -> None:
        proc = self.loop.procs[name]
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait()
            self.kills[name] += 1
            self.killed_at[name].append(time.monotonic())
        self.start(name)

    def watch(self, seconds: float) -> None:
        """Sleep `seconds`, restarting whatever exits meanwhile."""
        end = time.monotonic() + seconds
        while True:
            for name, proc in list(self.loop.procs.items()):
                if proc.poll() is not None:
                    self.exits[name] += 1
                    print(f"{name} exited by itself ({proc.returncode}); restarting it", flush=True)
                    self.start(name)
            if time.monotonic() >= end:
                return
            time.sleep(min(0.5, max(0.0, end - time.monotonic())))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=300.0, help="how long the users run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--state-dir", type=Path, default=Path(".rlhf/bench-chaos"))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    os.environ.update(TRAINER_ENV)  # Loop.env() passes the environment on to the trainer and the service
    loop = Loop(LoopConfig(state_dir=args.state_dir, port=0, train_min_labels=32, train_max_wait_s=20))
    sim = SimLog()
    stopped_broker = False
    mid_stream = 0
    try:
        loop.start()
        settings = Settings(state_dir=loop.state)
        streamer = Streamer(loop.url)
        users = threading.Thread(target=run_users, daemon=True, args=(
            SimConfig(url=loop.url, users=8, concurrency=3, rate=3.0, max_votes=10**6, max_seconds=args.seconds), sim))
        t0 = time.monotonic()
        users.start()
        threading.Thread(target=streamer.run, daemon=True).start()
        supervisor = Supervisor(loop)
        for at, action in schedule(rng, args.seconds):
            supervisor.watch(at - (time.monotonic() - t0))
            print(f"[{time.monotonic() - t0:5.0f}s] {action}", flush=True)
            if action == "kill trainer":
                supervisor.kill("trainer")
            elif action == "kill service":
                mid_stream += streamer.in_flight.wait(10)
                supervisor.kill("service")
            elif action == "stop broker":
                os.kill(loop.broker.proc.pid, signal.SIGSTOP)
                stopped_broker = True
            else:
                os.kill(loop.broker.proc.pid, signal.SIGCONT)
                stopped_broker = False
        while users.is_alive():
            supervisor.watch(1.0)
        streamer.stop.set()
        users_s = time.monotonic() - t0
        print(f"[{users_s:5.0f}s] users done; waiting for the spool to drain and the trainer to catch up", flush=True)

        # votes the users got 202 for: the latest rating per feedback id
        expected = {v.feedback_id: 1.0 if v.up else -1.0 for v in sim.votes}
        serve.wait_ready(loop.url, loop.procs["service"], timeout=120)
        deadline = time.monotonic() + 180
        while metric(loop.url, "rlhf_spool_depth") != 0 and time.monotonic() < deadline:
            supervisor.watch(1.0)
        store = LabelStore(settings.trainer_dir / "labels.sqlite", late_vote_window_s=3600, dedupe_window_s=3600,
                           prompt_pool_size=1000)
        while (stored := store.votes()) != expected and time.monotonic() < deadline:
            supervisor.watch(2.0)
        caught_up_s = time.monotonic() - t0 - users_s

        policy_store = PolicyStore(settings.policy_dir)
        logged = {int(v) for v in re.findall(r"now serving policy-v(\d+)", (loop.logs / "service.log").read_text())}
        served = sorted(logged | streamer.versions | {v.version for v in sim.votes})
        unverified = {}
        for v in served:
            try:
                policy_store.verify(v)
            except (VerificationError, OSError, ValueError) as e:
                unverified[v] = f"{type(e).__name__}: {e}"
        # how long each service kill left the streaming client without an answer
        outages = [round(min((t for t in streamer.answered_at if t > k), default=float("nan")) - k, 1)
                   for k in supervisor.killed_at["service"]]
        attempts = sim.requests + len(sim.chat_errors) + streamer.attempts
        answered = sim.requests + streamer.answered
        out = {
            "device": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "args": {
                "seconds": args.seconds, "seed": args.seed}, "users_s": round(users_s, 1),
            "catch_up_s": round(caught_up_s, 1),
            "broker_down_s": BROKER_DOWN_S, "trainer_kills": supervisor.kills["trainer"],
            "service_kills": supervisor.kills["service"], "service_kills_mid_stream": mid_stream,
            "streams_cut": streamer.cut, "exits_unasked": supervisor.exits,
            "votes_accepted": len(expected), "labels_stored": len(stored), "labels_equal_votes": stored == expected,
            "votes_missing_from_store": len(expected.keys() - stored.keys()),
            "labels_without_a_202": len(stored.keys() - expected.keys()),
            "labels_with_another_rating": sum(stored[k] != expected[k] for k in expected.keys() & stored.keys()),
            "vote_errors": len(sim.vote_errors),
            "chat_attempted": attempts, "chat_answered": answered,
            "chat_availability": round(answered / attempts, 4) if attempts else None,
            "service_kill_to_next_answer_s": outages, "chat_error_samples": sim.chat_errors[:3],
            "versions_published": len([v for v in policy_store.versions() if v > 0]), "latest": policy_store.latest(),
            "versions_served": served, "half_written_version_served": bool(unverified), "unverified": unverified,
            "quarantined": metric(loop.url, "rlhf_events_quarantined_total"),
        }
        store.close()
    finally:
        if stopped_broker:
            os.kill(loop.broker.proc.pid, signal.SIGCONT)
        loop.close()
    RESULTS.mkdir(exist_ok=True)
    slug = out["device"].lower().replace(" ", "-") or "cpu"
    path = RESULTS / f"chaos-{slug}.json"
    path.write_text(json.dumps(out, indent=2))
    print(json.dumps({k: v for k, v in out.items() if k != "chat_error_samples"}, indent=2))
    print(f"saved {path}")
    return 0 if out["labels_equal_votes"] and not out["half_written_version_served"] else 1


if __name__ == "__main__":
    sys.exit(main())
