"""The whole loop on one machine: broker, service, trainer and simulated users, with live status.

Used by `rlhf up` (the README's first command) and `bench/loop.py`. Each part runs as
it would in production: the broker and the trainer as their own processes, the service
as a real `bentoml serve`; the simulated users talk to the public HTTP API only.
At the end it writes a learning curve (PNG) and a JSON summary.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path


from rlhf_loop.app import known_models
from rlhf_loop.app.simulate import SimConfig, SimLog, run as run_users
from rlhf_loop.core.broker import EmbeddedBroker, ensure_topics, free_port, port_in_use
from rlhf_loop.core.contracts import EMBEDDED_MODEL, Settings
from rlhf_loop.core.processes import die_with_parent
from rlhf_loop.core.models import ensure_policy_store
from rlhf_loop.core.policy_store import PolicyStore
from rlhf_loop.service import serve  # the same spawn / wait / stop helpers the tests and bench/serve.py use


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # each stops a run the way Ctrl-C does (app/up.py)
FINAL_WINDOW = 300  # votes over which the end-of-run approval is measured
USERS_STOP_S = 30.0  # a conversation in flight gets this long to finish (one takes well under a second)
# votes + withdrawals per window for the simulated users' API key: far above any rate they run at, so only
# the per-user cap paces them, as it would a real app's users (docs/service.md, "Vote caps")
DEMO_KEY_QUOTA = 100_000


@dataclass(frozen=True)
class LoopConfig:
    """One run of the loop."""

    state_dir: Path = Path(".rlhf/demo")  # everything the run writes, outputs included
    model: str = EMBEDDED_MODEL  # the base model: the embedded one, a known name (app/known_models.py) or a directory
    port: int = 3000  # the service's public port (0 = a free one)
    broker_port: int = 0  # 0 = a free loopback port
    sim: SimConfig = field(default_factory=SimConfig)
    train_min_labels: int = 128  # votes per round
    train_max_wait_s: float = 60.0
    trainer_args: tuple[str, ...] = ()  # extra `rlhf train` flags (PPO/RM config)
    keep_serving: bool = False  # after the users stop, keep broker + service up until Ctrl-C
    stats_at_votes: tuple[int, ...] = ()  # also report the run as it stood at these vote counts (stats_at)


class Loop:
    """Starts the parts, runs the users, reports; `close()` stops everything it started."""

    def __init__(self, cfg: LoopConfig):
        self.cfg = cfg
        self.state = Path(cfg.state_dir).resolve()
        self.logs = self.state / "logs"
        self.procs: dict[str, subprocess.Popen] = {}
        self.broker: EmbeddedBroker | None = None
        self.users: threading.Thread | None = None
        self.port = cfg.port or free_port()
        self.model = cfg.model  # resolved to a directory by start() when it is a known name
        self.url = f"http://127.0.0.1:{self.port}"
        self.trainer_metrics_port = free_port()  # its GET /loop feeds the service's loop page (RLHF_TRAINER_URL)
        self.sim_log = SimLog()
        self.stop = threading.Event()
        self.t0 = time.monotonic()
        self.users_epoch = time.time()  # wall clock when the users started (freshness is measured against it)

    def env(self) -> dict[str, str]:
        assert self.broker is not None
        return {
            **os.environ, "RLHF_STATE_DIR": str(self.state), "RLHF_KAFKA_BOOTSTRAP_SERVERS": self.broker.bootstrap,
            "RLHF_MODEL": self.model,
            "RLHF_PORT": str(self.port), "RLHF_ADMIN_PORT": str(free_port()),
            # the simulated users are one app with one key, which vouches for their `user` ids
            "RLHF_API_KEYS": f"{self.cfg.sim.api_key}={DEMO_KEY_QUOTA}",
            "RLHF_TRAIN_MIN_LABELS": str(self.cfg.train_min_labels),
            "RLHF_TRAIN_MAX_WAIT_S": str(self.cfg.train_max_wait_s),
            "RLHF_TRAINER_METRICS_PORT": str(self.trainer_metrics_port),
            "RLHF_TRAINER_URL": f"http://127.0.0.1:{self.trainer_metrics_port}",
            "BENTOML_DO_NOT_TRACK": "true", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
        }

    def _log(self, name: str):
        return open(self.logs / f"{name}.log", "ab")

    def start(self) -> None:
        if port_in_use("127.0.0.1", self.port):
            raise RuntimeError(f"port {self.port} is already in use (another `rlhf up` or `rlhf serve`?): "
                               "stop what holds it, or pass --port N")
        # each run starts from the base model: clear the last run's policy_store, labels and spool
        # (the built model in models/ is kept, so a second run starts in seconds)
        marker = self.state / ".rlhf-loop-run"
        if self.state.exists():
            leftovers = [p for p in self.state.iterdir() if p.name not in {"models", marker.name}]
            if leftovers and not marker.exists():
                raise RuntimeError(f"{self.state} holds files that no earlier run wrote; choose another --state-dir")
            for p in leftovers:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        self.logs.mkdir(parents=True, exist_ok=True)
        marker.touch()
        self.model = known_models.resolve(self.cfg.model, self.state / "models")  # a fetch + import, first time only
        self.broker = EmbeddedBroker(self.cfg.broker_port or None, log_path=self.logs / "broker.log").start()
        settings = Settings(state_dir=self.state, model=self.model, kafka_bootstrap_servers=self.broker.bootstrap)
        ensure_topics(settings)
        ensure_policy_store(settings)  # builds the embedded model on a fresh machine (progress shown)
        self.procs["service"] = serve.spawn("127.0.0.1", self.port, self.env(), self._log("service"))
        try:
            serve.wait_ready(self.url, self.procs["service"], timeout=300)
        except (RuntimeError, TimeoutError) as e:
            raise RuntimeError(f"{e}; see {self.logs / 'service.log'}") from None
        self.procs["trainer"] = subprocess.Popen(
            [sys.executable, "-m", "rlhf_loop", "train", *self.cfg.trainer_args], env=self.env(),
            stdout=self._log("trainer"), stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=die_with_parent)
        # the users are a part from here on (announced with the service's address): a stop before
        # run_users starts them still says they stopped, as for every other part
        cfg = self.cfg.sim.__class__(**{**asdict(self.cfg.sim), "url": self.url})
        self.users = threading.Thread(target=run_users, args=(cfg, self.sim_log, self.stop), daemon=True)

    def run_users(self, on_status=None, until: Callable[[dict], bool] | None = None) -> SimLog:
        """The simulated users, to their vote or time cap, or until `until(status)` says so."""
        users = self.users
        self.users_epoch = time.time()
        self.t0 = time.monotonic()  # the loop's clock starts with the users (not the model build)
        users.start()
        while users.is_alive():
            users.join(1.0)
            if on_status or until:
                status = self.status()
                if on_status:
                    on_status(status)
                if until and until(status):
                    self.stop.set()
            for name, p in self.procs.items():
                if p.poll() is not None:
                    self.stop.set()
                    raise RuntimeError(f"{name} exited with {p.returncode}; see {self.logs / (name + '.log')}")
        return self.sim_log

    def rounds(self) -> list[dict]:
        path = self.state / "trainer" / "rounds.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def versions(self) -> list[dict]:
        return PolicyStore(Settings(state_dir=self.state).policy_dir).info()

    def status(self) -> dict:
        with self.sim_log.lock:
            by = self.sim_log.approval_by_version()
            votes = len(self.sim_log.votes)
            errors = len(self.sim_log.chat_errors)
            window = self.sim_log.approval_window(100)
        rounds = self.rounds()
        versions = self.versions()
        current = max(by) if by else 0
        kl = next((v["metrics"].get("kl_to_ref") for v in reversed(versions) if v.get("metrics")), None)
        judged = [r for r in rounds if r.get("reward_model")]
        last = judged[-1] if judged else {}
        return {
            "elapsed_s": round(time.monotonic() - self.t0, 1), "votes": votes, "chat_errors": errors,
            "serving_version": current, "approval_current": by.get(current, {}).get("approval"),
            "votes_by_version": {v: row["votes"] for v, row in by.items()},
            "approval_last100": window, "kl_to_ref": kl,
            "rounds": len(rounds), "promoted": sum(bool(r.get("promoted")) for r in rounds),
            "rejected": sum(not r.get("promoted") for r in rounds),
            # is the judge trustworthy yet (the gate's check), and is the KL budget spent?
            "rm_auroc": (last.get("reward_model") or {}).get("auroc"),
            "rm_trusted": all(c.get("passed") for name, c in (last.get("checks") or {}).items()
                              if name in ("rm_auroc", "rm_pair_accuracy")) if last.get("checks") else None,
            "budget_spent": bool((last.get("budget") or {}).get("spent")),
            "rolled_back": sum(1 for v in versions if v.get("rolled_back")),
        }

    def summary(self) -> dict:
        log = self.sim_log
        by = log.approval_by_version()
        versions = {v["version"]: v for v in self.versions()}
        baseline = by.get(0, {}).get("approval")
        # the served policy's approval at the end: the last FINAL_WINDOW votes (one version
        # can have too few votes to say; a window spanning the last versions can)
        tail = log.votes[-FINAL_WINDOW:]
        final = sum(v.up for v in tail) / len(tail) if len(tail) == FINAL_WINDOW else None
        final_version = log.votes[-1].version if log.votes else None
        rounds = self.rounds()
        freshness = []
        for r in rounds:
            v, trig = r.get("version"), r.get("trigger_time")
            if r.get("promoted") and v in log.first_served and trig is not None:
                freshness.append(self.users_epoch + log.first_served[v] - trig)
        return {
            **round_stats(rounds), "votes_to_gain_0.3": votes_to_gain(log.votes, baseline, 0.3),
            "votes": len(log.votes), "requests": log.requests, "chat_errors": len(log.chat_errors),
            "vote_errors": len(log.vote_errors), "chat_error_samples": log.chat_errors[:5],
            "baseline_approval": baseline, "final_version": final_version, "final_approval": final,
            "final_window_votes": FINAL_WINDOW, "final_window_versions": sorted({v.version for v in tail}),
            "approval_gain": (final - baseline) if final is not None and baseline is not None else None,
            "approval_by_version": {str(k): v for k, v in by.items()},
            "versions": {str(k): v.get("metrics", {}) for k, v in versions.items()},
            "rounds": rounds, "promoted": sum(bool(r.get("promoted")) for r in rounds),
            "before_after": before_after(log.votes, final_version),
            "freshness_s_median": statistics.median(freshness) if freshness else None,
            "freshness_s": freshness, "elapsed_s": round(time.monotonic() - self.t0, 1),
            "taste": self.cfg.sim.taste, "noise": self.cfg.sim.noise,
            **{f"at_{n}_votes": stats_at(log, rounds, versions, self.users_epoch, n) for n in self.cfg.stats_at_votes},
        }

    def close(self, on_stopped: Callable[[str], None] = lambda part: None) -> None:
        """Stop what was started, `on_stopped(part)` after each: the users first, so that no
        request of theirs meets a stopped service; the broker last, so that the trainer and
        the service can flush to it while they stop."""
        self.stop.set()
        if self.users is not None:
            if self.users.is_alive():  # False too when a stop came before run_users started them
                self.users.join(USERS_STOP_S)
            on_stopped("simulated users")
        for name in ("trainer", "service"):  # SIGTERM to each process group, SIGKILL after 20 s
            if name in self.procs:
                serve.terminate(self.procs[name])
                on_stopped(name)
        if self.broker:
            self.broker.stop()
            on_stopped("broker")


def before_after(votes: list, final_version: int | None, n: int = 5) -> list[dict]:
    """Up to `n` prompts that v0 and the version serving at the end both answered: what the users saw
    before and after, and what they voted (the last answer of each)."""
    if not final_version:
        return []
    first: dict[str, object] = {}
    last: dict[str, object] = {}
    for v in votes:
        if v.version == 0:
            first.setdefault(v.prompt, v)
        elif v.version == final_version:
            last[v.prompt] = v
    both = [p for p in first if p in last][:n]
    return [{"prompt": p, "before": first[p].answer, "before_up": first[p].up, "after": last[p].answer,
             "after_up": last[p].up, "after_version": final_version} for p in both]


def round_stats(rounds: list[dict]) -> dict:
    """What the rounds did: promoted, rejected for KL / for reward, the longest run of KL rejections in a
    row, seconds per round, and the reward model's held-out AUROC (at the end, and the first vote count
    at which it reached 0.75)."""
    kl = ["KL to reference" in (r.get("reason") or "") and not r.get("promoted") for r in rounds]
    longest = run = 0
    for k in kl:
        run = run + 1 if k else 0
        longest = max(longest, run)
    trained = [r for r in rounds if r.get("candidate")]
    aurocs = [(r.get("votes"), r["reward_model"].get("auroc")) for r in rounds if r.get("reward_model")]
    return {
        "rounds_promoted": sum(bool(r.get("promoted")) for r in rounds),
        "rounds_rejected_kl": sum(kl),
        "rounds_rejected_reward": sum("does not beat" in (r.get("reason") or "") and not r.get("promoted")
                                      for r in rounds),
        "max_consecutive_kl_rejections": longest,
        "seconds_per_round_median": statistics.median(r["seconds"]["total"] for r in trained) if trained else None,
        "rm_auroc_end": aurocs[-1][1] if aurocs else None,
        "rm_auroc_0.75_at_votes": next((v for v, a in aurocs if a is not None and a >= 0.75), None),
    }


def stats_at(log: SimLog, rounds: list[dict], versions: dict[int, dict], users_epoch: float, n: int) -> dict | None:
    """The run as it stood at its n-th vote, so that a longer run compares with one that stopped there:
    approval over the FINAL_WINDOW votes up to the n-th against v0's approval among them, the rounds
    finished by then (round_stats), and the KL of the version that took the n-th vote."""
    if len(log.votes) < n:
        return None
    votes = log.votes[:n]
    cutoff = users_epoch + votes[-1].t
    done = [r for r in rounds if r.get("trigger_time") is not None and r["trigger_time"] + r["seconds"]["total"] <= cutoff]
    v0 = [v.up for v in votes if v.version == 0]
    baseline = sum(v0) / len(v0) if v0 else None
    window = votes[-FINAL_WINDOW:]
    approval = sum(v.up for v in window) / len(window)
    return {**round_stats(done), "votes": n, "baseline_approval": baseline, "approval": approval,
            "approval_gain": approval - baseline if baseline is not None else None,
            "votes_to_gain_0.3": votes_to_gain(votes, baseline, 0.3), "serving_version": votes[-1].version,
            "kl_to_ref": (versions.get(votes[-1].version, {}).get("metrics") or {}).get("kl_to_ref")}


def votes_to_gain(votes: list, baseline: float | None, gain: float, window: int = 100) -> int | None:
    """The vote count at which approval over the last `window` votes first reached baseline + gain."""
    if baseline is None:
        return None
    ups = 0
    for i, v in enumerate(votes):
        ups += v.up - (votes[i - window].up if i >= window else 0)
        if i + 1 >= window and ups / window >= baseline + gain:
            return i + 1
    return None


def plot_curve(summary: dict, vote_log: SimLog, path: Path) -> None:
    """Approval per version, approval over votes (rolling 100), and KL to the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    by = summary["approval_by_version"]
    vs = sorted(by, key=int)
    axes[0].bar([f"v{v}" for v in vs], [by[v]["approval"] for v in vs], color="tab:green")
    for i, v in enumerate(vs):
        axes[0].text(i, by[v]["approval"] + 0.01, f"n={by[v]['votes']}", ha="center", fontsize=8)
    axes[0].set(title="approval rate per policy version", ylim=(0, 1.05), ylabel="share of thumbs-up")
    ups = [v.up for v in vote_log.votes]
    roll = [sum(ups[max(0, i - 99): i + 1]) / (i + 1 - max(0, i - 99)) for i in range(len(ups))]
    axes[1].plot(range(1, len(roll) + 1), roll, color="tab:blue")
    changes = [i for i in range(1, len(vote_log.votes)) if vote_log.votes[i].version != vote_log.votes[i - 1].version]
    for i in changes:
        axes[1].axvline(i, color="grey", alpha=0.3, lw=0.8)
    axes[1].set(title="approval over votes (rolling 100; lines = new version served)", xlabel="votes", ylim=(0, 1.05))
    kl = [(int(v), m.get("kl_to_ref")) for v, m in summary["versions"].items() if m.get("kl_to_ref") is not None]
    if kl:
        kl.sort()
        axes[2].plot([f"v{v}" for v, _ in kl], [k for _, k in kl], marker="o", color="tab:red", label="KL(policy || v0)")
    bound = next((r.get("kl_bound") for r in summary["rounds"] if r.get("kl_bound") is not None), None)
    if bound is not None:
        axes[2].axhline(bound, color="tab:red", ls="--", alpha=0.5, label="gate's bound")
        axes[2].legend(loc="lower right")
    if summary["baseline_approval"] is not None:
        axes[1].axhline(summary["baseline_approval"], color="grey", ls="--", alpha=0.6, label="v0 baseline")
        axes[1].legend(loc="lower right")
    axes[2].set(title="mean KL to reference per promoted version", ylabel="nats per response (exact, summed over tokens)")
    fig.suptitle(f"rlhf-loop: simulated users who like '{summary['taste']}' answers (noise {summary['noise']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@contextmanager
def _ignoring_stop_signals() -> Iterator[None]:
    """A second Ctrl-C (or SIGTERM, SIGHUP) while the parts stop would leave them running (and print a
    traceback)."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run(cfg: LoopConfig, on_status=None, on_stopped: Callable[[str], None] = lambda part: None,
        until: Callable[[dict], bool] | None = None) -> tuple[dict, Path, Path]:
    """Run the loop to its end (the users' vote or time cap, or `until(status)` true: a condition the caps
    cannot say, e.g. so many votes on trained versions); returns (summary, png path, json path).
    Ctrl-C or a stop signal (app/up.py) while the users vote ends the run early, not in vain: the users stop,
    what they measured is summarized and saved as for a full run, with `summary["interrupted"]` the signal's
    name (None for a run that reached its end); the caller says it was stopped. Before the users start, a stop
    just stops. Stopping, it calls `on_stopped(part)` for each part it stops (Loop.close)."""
    loop = Loop(cfg)
    interrupted = None
    try:
        loop.start()
        if on_status:
            on_status({"ready": loop.url})
        try:
            loop.run_users(on_status, until)
        except KeyboardInterrupt as e:  # SIGINT, or app/up.py's Stopped(signum) for SIGTERM and SIGHUP
            interrupted = signal.Signals(getattr(e, "signum", signal.SIGINT)).name
            with _ignoring_stop_signals():  # the users finish the conversations in flight, as at their cap
                loop.stop.set()
                if loop.users.is_alive():
                    loop.users.join(USERS_STOP_S)
        time.sleep(1.0)
        summary = {**loop.summary(), "interrupted": interrupted}
        out_png, out_json = loop.state / "learning_curve.png", loop.state / "summary.json"
        out_json.write_text(json.dumps(summary, indent=2, default=str))
        plot_curve(summary, loop.sim_log, out_png)
        if cfg.keep_serving and not interrupted:
            print(f"\nstill serving on {loop.url} (Ctrl-C stops)", flush=True)
            while all(p.poll() is None for p in loop.procs.values()):
                time.sleep(1)
        return summary, out_png, out_json
    finally:
        with _ignoring_stop_signals():
            loop.close(on_stopped)
