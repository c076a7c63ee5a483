"""Simulated users: chat with the public API like an app would and vote by a hidden taste.

    rlhf simulate --url http://127.0.0.1:3000 --taste cheerful --noise 0.1 --users 8 --votes 500
    rlhf simulate --labels preferences ...   # "which answer do you prefer?" instead of thumbs (or: both)

Each user asks questions from the embedded model's little domain with the official
`openai` client, judges each answer by the taste (core/tastes.py) and, with probability
`noise`, votes the other way, then POSTs the vote to /v1/feedback. With `labels` preferences
the user asks for two answers (`n=2`) and POSTs which it prefers to /v1/preferences: the one
the taste likes when it likes exactly one (the other one with probability `noise`), a tie
when it likes both or neither (the taste cannot tell them apart); with `both`, a thumbs vote
on the first answer and the preference. The simulator knows
nothing of the trainer: it sees only what any client sees (answers, their ids and the
`system_fingerprint` naming the policy version). Every vote is recorded, so approval per
policy version is computed from the public side. With preferences only, the user's verdict
on the first answer (what its thumbs vote would have been, noise included) is recorded as its
vote but not sent: the approval figure means the same in all three modes.

The users are one app's users: they send its API key (`--api-key`) and each vote its `user`,
which the service trusts under a key. A server without keys trusts no `user`: all of them
would be one voter (the client address) and meet its vote cap within a minute. So give the
server the simulator's key, with a quota above its rate (`rlhf up` does: app/loop.py):
RLHF_API_KEYS=rlhf-demo=100000.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import httpx
from openai import OpenAI

from rlhf_loop.core.tastes import TASTES
from rlhf_loop.core.tinylm import QUESTIONS, SUBJECTS

# What a real assistant gets asked (self-written for this project, CC0): the users' prompts for a real model
ASSISTANT_PROMPTS = [line.strip() for line in (Path(__file__).with_name("assistant_prompts.txt")).read_text().splitlines()
                     if line.strip() and not line.startswith("#")]


@dataclass(frozen=True)
class SimConfig:
    """How the simulated users behave."""

    url: str = "http://127.0.0.1:3000"
    taste: str = "cheerful"  # a key of core.tastes.TASTES: what users secretly like
    prompts: Literal["toy", "assistant"] = "toy"  # the embedded model's little domain, or ASSISTANT_PROMPTS
    noise: float = 0.1  # probability a vote is flipped (users are inconsistent)
    users: int = 8  # distinct user ids; they take turns
    concurrency: int = 4  # requests in flight at once
    rate: float = 3.0  # conversations per second across all users (0 = as fast as the service answers)
    max_votes: int = 2000  # stop after this many votes ...
    max_seconds: float = 900.0  # ... or this long
    max_tokens: int = 48
    temperature: float = 1.0
    api_key: str = "rlhf-demo"  # the app's key; rlhf up's service trusts it (app/loop.py)
    model: str = "rlhf-policy"
    seed: int = 0
    labels: Literal["thumbs", "preferences", "both"] = "thumbs"  # what the users send: votes, preferences, or both

    def __post_init__(self):
        if self.taste not in TASTES:
            raise ValueError(f"unknown taste {self.taste!r}; choose from {sorted(TASTES)}")
        if not 0.0 <= self.noise < 0.5:
            raise ValueError("noise must be in [0, 0.5): above that the taste is inverted")
        if self.rate < 0:
            raise ValueError("rate must be >= 0")
        if self.users < 1 or self.concurrency < 1:
            raise ValueError("users and concurrency must be >= 1")
        if self.labels not in ("thumbs", "preferences", "both"):
            raise ValueError(f"labels must be thumbs, preferences or both, got {self.labels!r}")


@dataclass
class Vote:
    t: float  # seconds since the run started
    user: str
    response_id: str
    version: int
    prompt: str
    answer: str
    liked: bool  # what the taste says
    up: bool  # what was voted (liked, flipped with probability noise)
    feedback_id: str  # the vote's id, as the service answered it (an app keeps it to withdraw it); "" if not sent


@dataclass
class Stated:
    """One preference a user sent: between the two answers of one response."""

    t: float
    user: str
    response_id: str
    version: int
    liked: tuple[bool, bool]  # what the taste says of answers 0 and 1
    chosen: int  # the choice index preferred (as sent; flipped with probability noise)
    tie: bool
    preference_id: str  # as the service answered it


@dataclass
class SimLog:
    """Everything the simulated users saw; thread-safe appends."""

    votes: list[Vote] = field(default_factory=list)
    preferences: list[Stated] = field(default_factory=list)
    chat_errors: list[str] = field(default_factory=list)
    vote_errors: list[str] = field(default_factory=list)
    requests: int = 0
    in_flight: int = 0
    first_served: dict[int, float] = field(default_factory=dict)  # version -> t of first answer
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def approval_by_version(self) -> dict[int, dict]:
        by = defaultdict(lambda: [0, 0])
        for v in self.votes:
            by[v.version][0] += v.up
            by[v.version][1] += 1
        return {ver: {"votes": n, "up": up, "approval": up / n} for ver, (up, n) in sorted(by.items())}

    def approval_window(self, last: int = 100) -> float | None:
        recent = self.votes[-last:]
        return sum(v.up for v in recent) / len(recent) if recent else None


def version_of(fingerprint: str | None) -> int:
    """`policy-v3` -> 3 (the service names the version in `system_fingerprint`)."""
    if not fingerprint or not fingerprint.startswith("policy-v"):
        raise ValueError(f"response has no policy fingerprint: {fingerprint!r}")
    return int(fingerprint.removeprefix("policy-v"))


def run(cfg: SimConfig, log: SimLog | None = None, stop: threading.Event | None = None) -> SimLog:
    """Run the users until max_votes, max_seconds or `stop`; returns the log."""
    log = log or SimLog()
    stop = stop or threading.Event()
    taste = TASTES[cfg.taste]
    t0 = time.monotonic()
    client = OpenAI(base_url=cfg.url.rstrip("/") + "/v1", api_key=cfg.api_key, max_retries=0, timeout=60)
    http = httpx.Client(base_url=cfg.url, timeout=30, headers={"Authorization": f"Bearer {cfg.api_key}"})
    counter = iter(range(10**12))
    next_slot = [time.monotonic()]  # users pace themselves: one conversation every 1/rate s overall

    def worker(wid: int) -> None:
        rng = random.Random(cfg.seed * 1000 + wid)
        while not stop.is_set():
            with log.lock:  # conversations in flight count against max_votes, so the run stops at exactly it
                if len(log.votes) + log.in_flight >= cfg.max_votes or time.monotonic() - t0 >= cfg.max_seconds:
                    return
                log.in_flight += 1
                n = next(counter)
                slot = max(time.monotonic(), next_slot[0])
                next_slot[0] = slot + (1.0 / cfg.rate if cfg.rate else 0.0)
            try:
                if stop.wait(max(0.0, slot - time.monotonic())):
                    return
                converse(rng, n)
            finally:
                with log.lock:
                    log.in_flight -= 1

    def converse(rng: random.Random, n: int) -> None:
        """One user turn: ask (for two answers when it states preferences), judge by the taste (with noise),
        vote and / or state which answer it prefers."""
        user = f"sim-user-{n % cfg.users}"
        question = (rng.choice(QUESTIONS).replace("{s}", rng.choice(list(SUBJECTS))) if cfg.prompts == "toy"
                    else rng.choice(ASSISTANT_PROMPTS))
        try:
            resp = client.chat.completions.create(
                model=cfg.model, messages=[{"role": "user", "content": question}],
                max_tokens=cfg.max_tokens, temperature=cfg.temperature, user=user,
                n=1 if cfg.labels == "thumbs" else 2,
            )
            version = version_of(resp.system_fingerprint)
        except Exception as e:  # counted and reported: the loop's target is zero of these
            with log.lock:
                log.chat_errors.append(f"{type(e).__name__}: {e}")
            time.sleep(0.5)
            return
        answers = [c.message.content or "" for c in sorted(resp.choices, key=lambda c: c.index)]
        liked = [taste(question, a) for a in answers]
        up = liked[0] if rng.random() >= cfg.noise else not liked[0]
        with log.lock:
            log.requests += 1
            log.first_served.setdefault(version, time.monotonic() - t0)
        vote = Vote(time.monotonic() - t0, user, resp.id, version, question, answers[0], liked[0], up, "")
        if cfg.labels != "thumbs":
            stated = prefer(rng, user, resp.id, version, liked)
            if stated is None:
                return
            with log.lock:
                log.preferences.append(stated)
        if cfg.labels != "preferences":
            sent = post("/v1/feedback", {"response_id": resp.id, "rating": "up" if up else "down", "user": user})
            if sent is None:
                return
            vote.feedback_id = sent["id"]
        with log.lock:
            log.votes.append(vote)

    def prefer(rng: random.Random, user: str, rid: str, version: int, liked: list[bool]) -> Stated | None:
        """POST which of the two answers the taste prefers: a tie when it likes both or neither, else the liked
        one (the other with probability noise). None if the service did not take it."""
        tie = liked[0] == liked[1]
        chosen = liked.index(True) if not tie else 0
        if not tie and rng.random() < cfg.noise:
            chosen = 1 - chosen
        sent = post("/v1/preferences", {"chosen": {"response_id": rid, "choice_index": chosen},
                                        "rejected": {"response_id": rid, "choice_index": 1 - chosen},
                                        "tie": tie, "user": user})
        return None if sent is None else Stated(time.monotonic() - t0, user, rid, version, tuple(liked), chosen, tie,
                                                sent["id"])

    def post(path: str, body: dict) -> dict | None:
        """The service's answer to a label; None (the error counted in vote_errors) unless it was accepted."""
        try:
            r = http.post(path, json=body)
        except httpx.HTTPError as e:  # counted and reported, like a failed chat
            with log.lock:
                log.vote_errors.append(f"{type(e).__name__}: {e}")
            return None
        if r.status_code != 202:
            with log.lock:
                log.vote_errors.append(f"{r.status_code}: {r.text[:200]}")
            return None
        return r.json()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(cfg.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    client.close()
    http.close()
    return log


def save_log(log: SimLog, path: Path) -> None:
    """Every vote (and preference: {"preference": ...}) as a JSON line."""
    with open(path, "w") as f:
        for v in log.votes:
            f.write(json.dumps(asdict(v)) + "\n")
        for p in log.preferences:
            f.write(json.dumps({"preference": asdict(p)}) + "\n")


def main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="rlhf simulate", description=__doc__.splitlines()[0])
    for name, f in SimConfig.__dataclass_fields__.items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(f.default), default=f.default)
    ap.add_argument("--out", type=Path, default=None, help="write every vote as JSONL here")
    args = vars(ap.parse_args(argv))
    out = args.pop("out")
    cfg = SimConfig(**args)
    log = SimLog()
    stop = threading.Event()
    runner = threading.Thread(target=run, args=(cfg, log, stop), daemon=True)
    runner.start()
    try:
        while runner.is_alive():
            runner.join(2.0)
            with log.lock:
                by = log.approval_by_version()
                cur = max(by) if by else None
                print(f"\rvotes {len(log.votes):5d}  version {cur}  approval(last 100) "
                      f"{(log.approval_window() or 0):.2f}  chat errors {len(log.chat_errors)}", end="", flush=True)
    except KeyboardInterrupt:
        stop.set()
        runner.join()
    print()
    for ver, row in log.approval_by_version().items():
        print(f"policy v{ver}: {row['votes']} votes, approval {row['approval']:.2f}")
    if out:
        save_log(log, out)
        print(f"votes written to {out}")
    return 0
