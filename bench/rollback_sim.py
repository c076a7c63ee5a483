"""The live-approval watch by simulation: how often it rolls back a version as good as its parent,
and how many votes it needs to catch a worse one (trainer/watch.py). Pure Python, no model: a minute.

    PYTHONPATH=. .venv/bin/python bench/rollback_sim.py                  # 4,000 watches per scenario
    PYTHONPATH=. .venv/bin/python bench/rollback_sim.py --watches 1000 --seed 1

One simulated watch: the parent's true approval p ~ U(0.5, 0.75) (the demo's versions: 0.55-0.72);
when the child is promoted the parent has n ~ U{50..150} votes (the loop runs a round per 64-128
votes, and a parent serves one round or a few); 20 % more votes on answers the parent wrote before
the swap arrive late, each at every poll with probability 0.2 (most within the child's first 50
votes); the child gets 10 votes per poll (about a second of the demo's 16 users) and is watched up
to 1,000 votes. Its true approval is p - drop. "parent 50, no late votes" is the worst case for a
test that trusts the parent's approval: exactly the old test's min_parent_votes, never more.

Both tests see the same simulated votes (each watch's votes are drawn once):
  watch        trainer/watch.py as configured by WatchConfig() (its own functions, called here)
  old_sprt     the test before issue 22: Wald's SPRT against the parent's approval taken as known
               (delta 0.1, alpha 0.05, beta 0.1, from 50 parent votes), reproduced below

Per scenario and test: the share of watches that rolled back (for drop 0: the false-rollback rate,
with its 95 % Wilson interval), were kept, or were still undecided at the horizon, and the child's
votes at the rollback (median, 90th percentile). Printed, and saved to
bench/results/rollback_sim-defaults.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import time
from dataclasses import asdict
from pathlib import Path

from rlhf_loop.trainer import watch
from rlhf_loop.trainer.config import WatchConfig

HORIZON = 1000  # child votes
PER_POLL = 10  # child votes per poll
LATE_SHARE, LATE_P = 0.2, 0.2  # parent's late votes: share of its votes at the child's start; arrival chance per poll
SCENARIOS = [  # (name, drop, parent votes at the child's start (lo, hi), late votes)
    ("as good, parent 50-150", 0.0, (50, 150), True),
    ("as good, parent 50, no late votes", 0.0, (50, 50), False),
    ("0.10 worse, parent 50-150", 0.10, (50, 150), True),
    ("0.15 worse, parent 50-150", 0.15, (50, 150), True),
    ("0.15 worse, parent 50, no late votes", 0.15, (50, 50), False),
    ("0.25 worse, parent 50-150", 0.25, (50, 150), True),
]


def simulate(rng: random.Random, drop: float, parent_range: tuple[int, int], late: bool) -> list[tuple[int, int, int, int]]:
    """One watch's votes: (child ups, child downs, parent ups, parent downs) after each poll."""
    p = rng.uniform(0.5, 0.75)
    n = rng.randint(*parent_range)
    pu = sum(rng.random() < p for _ in range(n))
    pd = n - pu
    pending = round(LATE_SHARE * n) if late else 0
    cu = cd = 0
    polls = []
    while cu + cd < HORIZON:
        for _ in range(PER_POLL):
            if rng.random() < p - drop:
                cu += 1
            else:
                cd += 1
        arrived = sum(rng.random() < LATE_P for _ in range(pending))
        pending -= arrived
        for _ in range(arrived):
            if rng.random() < p:
                pu += 1
            else:
                pd += 1
        polls.append((cu, cd, pu, pd))
    return polls


def run_watch(polls, cfg: WatchConfig) -> tuple[str, int]:
    """trainer/watch.py's test over one watch's polls: (decision, child votes when decided)."""
    taken = 0
    for cu, cd, pu, pd in polls:
        look = watch.next_look(cu + cd, pu + pd, taken, cfg)
        if look is None:
            continue
        taken = look.k
        decision = watch.decide(watch.z_statistic(cu, cd, pu, pd), look, cfg)
        if decision != "watching":
            return decision, cu + cd
    return "undecided", polls[-1][0] + polls[-1][1]


def run_old_sprt(polls, max_drop=0.1, alpha=0.05, beta=0.1, min_parent_votes=50) -> tuple[str, int]:
    """The watch before issue 22: SPRT of H0 p = p0 against H1 p = p0 - max_drop, p0 the parent's
    approval so far taken as known (clamped to [0.05, 0.95]), checked after each poll."""
    upper, lower = math.log((1 - beta) / alpha), math.log(beta / (1 - alpha))
    for cu, cd, pu, pd in polls:
        if pu + pd < min_parent_votes:
            continue
        p0 = min(max(pu / (pu + pd), 0.05), 0.95)
        p1 = max(p0 - max_drop, 0.01)
        llr = cu * math.log(p1 / p0) + cd * math.log((1 - p1) / (1 - p0))
        if llr >= upper:
            return "roll back", cu + cd
        if llr <= lower:
            return "keep", cu + cd
    return "undecided", polls[-1][0] + polls[-1][1]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def summarise(results: list[tuple[str, int]]) -> dict:
    n = len(results)
    at = sorted(v for d, v in results if d == "roll back")
    rolled = len(at)
    return {
        "watches": n, "rolled_back": rolled / n, "rolled_back_ci95": wilson(rolled, n),
        "kept": sum(d == "keep" for d, _ in results) / n, "undecided": sum(d == "undecided" for d, _ in results) / n,
        "votes_to_rollback_median": statistics.median(at) if at else None,
        "votes_to_rollback_p90": at[min(len(at) - 1, math.ceil(0.9 * len(at)) - 1)] if at else None,
    }


def _votes(v: float | None) -> str:
    return "-" if v is None else f"{v:g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--watches", type=int, default=4000, help="simulated watches per scenario")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "rollback_sim-defaults.json"))
    args = ap.parse_args()
    cfg = WatchConfig()
    t0 = time.perf_counter()
    rows = []
    for i, (name, drop, parent_range, late) in enumerate(SCENARIOS):
        rng = random.Random(args.seed * 1000 + i)
        watches = [simulate(rng, drop, parent_range, late) for _ in range(args.watches)]
        for test, run in (("watch", lambda p: run_watch(p, cfg)), ("old_sprt", run_old_sprt)):
            rows.append({"scenario": name, "drop": drop, "test": test, **summarise([run(p) for p in watches])})
    print(f"{'scenario':40s} {'test':9s} {'rolled back':>22s} {'kept':>6s} {'undecided':>9s} {'median':>6s} {'p90':>5s}")
    for r in rows:
        lo, hi = r["rolled_back_ci95"]
        print(f"{r['scenario']:40s} {r['test']:9s} {r['rolled_back']:8.3f} [{lo:.3f}, {hi:.3f}] {r['kept']:6.3f} "
              f"{r['undecided']:9.3f} {_votes(r['votes_to_rollback_median']):>6} {_votes(r['votes_to_rollback_p90']):>5}")
    out = {"benchmark": "rollback_sim", "watch_config": asdict(cfg), "looks": [asdict(x) for x in watch.schedule(cfg)],
           "watches_per_scenario": args.watches, "seed": args.seed, "horizon_votes": HORIZON, "votes_per_poll": PER_POLL,
           "late_parent_votes": {"share": LATE_SHARE, "arrival_per_poll": LATE_P}, "parent_approval": [0.5, 0.75],
           "python": platform.python_version(), "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"-> {args.out} ({out['seconds']} s)")


if __name__ == "__main__":
    main()
