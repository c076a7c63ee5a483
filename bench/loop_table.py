"""A markdown table of bench/loop.py results (the tables in docs/trainer.md are its output).

    python bench/loop_table.py bench/results/loop-cheerful-ppo-2000-x86_64.json ...          # at the end of each run
    python bench/loop_table.py --at 1000 bench/results/loop-cheerful-*-x86_64.json        # as each stood at vote 1,000
    python bench/loop_table.py before=OLD.json after=NEW.json                             # a first column naming each
    python bench/loop_table.py --at 1000 --mean bench/results/loop-short-*.json           # plus each (taste, algorithm)'s mean over seeds
    python bench/loop_table.py --at 1000 --decide FILES                                   # the default algorithm, by the rule below
    python bench/loop_table.py --decide --incumbent rloo FILES                            # ... where another algorithm is the default

One row per file (LABEL=FILE puts LABEL in a first column). --at N reads the run as it stood at its N-th vote (bench/loop.py --at, the
default 1000): a 2,000-vote run then compares with 1,000-vote ones on the same footing. --mean adds,
after the runs, one row per (taste, algorithm) run more than once with the mean of each column over its runs (bench/loop.py --seed).

--decide prints, per taste and algorithm, the approval gain's mean, standard deviation and range over the seeds, then
applies the rule for the trainer's default algorithm (issue 21): among the algorithms run at least MIN_SEEDS times on every
taste, A is clearly better than B on a taste when A's mean gain exceeds B's by more than twice the standard error of the
difference (sqrt(sd_A^2/n_A + sd_B^2/n_B)), and clearly worse when B's exceeds A's so. The default is an algorithm that is
clearly worse than none of the others on any taste and clearly better than the incumbent on at least one; of several,
the highest mean over the tastes. If none is, the incumbent stays. The incumbent is the default in place: the trainer's
(ppo), or --incumbent (e.g. rloo, the real-model run default: app/up.py RUN_DEFAULTS).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

COLUMNS = [  # header, key, format
    ("approval gain", "approval_gain", "{:+.2f}"),
    ("votes to +0.3", "votes_to_gain_0.3", "{:.0f}"),
    ("promoted", "rounds_promoted", "{}"),
    ("rejected: KL", "rounds_rejected_kl", "{}"),
    ("rejected: reward", "rounds_rejected_reward", "{}"),
    ("longest run of KL rejections", "max_consecutive_kl_rejections", "{}"),
    ("KL at the end", "kl_to_ref", "{:.2f}"),
    ("s / round", "seconds_per_round_median", "{:.1f}"),
    ("RM AUROC at the end", "rm_auroc_end", "{:.2f}"),
    ("RM AUROC >= 0.75 at vote", "rm_auroc_0.75_at_votes", "{:.0f}"),
]


def row(path: Path, at: int | None) -> tuple[dict, dict]:
    run = json.loads(path.read_text())
    stats = dict(run)
    stats["kl_to_ref"] = run.get("final_kl_to_ref")
    if at is not None:
        snapshot = run.get(f"at_{at}_votes")
        if snapshot is None:
            raise SystemExit(f"{path}: no figures at vote {at} (run with bench/loop.py --at {at}, and enough votes)")
        stats.update(snapshot)
    return run, stats


def cell(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="FILE or LABEL=FILE")
    ap.add_argument("--at", type=int, default=None, help="the runs as they stood at this vote count")
    ap.add_argument("--mean", action="store_true", help="add each (taste, algorithm)'s mean over its runs")
    ap.add_argument("--decide", action="store_true", help="the default algorithm by the rule in this docstring")
    ap.add_argument("--incumbent", default=INCUMBENT, help=f"the default in place, which --decide keeps unless another is "
                                                             f"clearly better (default {INCUMBENT}, the trainer's)")
    args = ap.parse_args()
    runs = [(f.partition("=")[0], Path(f.partition("=")[2])) if "=" in f else (None, Path(f)) for f in args.files]
    labelled = any(label for label, _ in runs)
    print(("| run " if labelled else "") + "| taste | algorithm | seed | votes | " + " | ".join(h for h, _, _ in COLUMNS) + " | file |")
    print(("|---" if labelled else "") + "|---|---|---|---|" + "---|" * len(COLUMNS) + "---|")
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for label, path in runs:
        run, stats = row(path, args.at)
        votes = args.at if args.at is not None else run["votes"]
        taste, algorithm = run.get("taste", "cheerful"), run.get("algorithm", "ppo")
        groups[taste, algorithm].append(stats)
        cells = [cell(stats.get(key), fmt) for _, key, fmt in COLUMNS]
        print((f"| {label or ''} " if labelled else "") + f"| {taste} | {algorithm} | {run.get('seed', 0)} | {votes} | "
              + " | ".join(cells) + f" | `{path.name}` |")
    if args.mean:
        for (taste, algorithm), group in groups.items():
            if len(group) < 2:
                continue
            cells = []
            for _, key, fmt in COLUMNS:
                values = [s[key] for s in group if s.get(key) is not None]
                # counts average to fractions; a run that never got there (None) is left out, and the cell says so
                text = cell(statistics.mean(values) if values else None, "{:.1f}" if fmt == "{}" else fmt)
                cells.append(text if len(values) == len(group) else f"{text} ({len(values)} of {len(group)})")
            print(("| mean " if labelled else "") + f"| {taste} | {algorithm} | mean of {len(group)} | "
                  + f"{args.at if args.at is not None else '-'} | " + " | ".join(cells) + " | |")
    if args.decide:
        print()
        print(decide({k: [g["approval_gain"] for g in group] for k, group in groups.items()}, args.incumbent))
    return 0


MIN_SEEDS = 3
INCUMBENT = "ppo"


def decide(gains: dict[tuple[str, str], list[float]], incumbent: str = INCUMBENT) -> str:
    """The spread table and the rule's verdict (module docstring), as markdown."""
    tastes = sorted({t for t, _ in gains})
    lines = ["| taste | algorithm | seeds | gain: mean | sd | min | max |", "|---|---|---|---|---|---|---|"]
    for (t, a), g in sorted(gains.items()):
        sd = statistics.stdev(g) if len(g) > 1 else float("nan")
        lines.append(f"| {t} | {a} | {len(g)} | {statistics.mean(g):+.2f} | {sd:.2f} | {min(g):+.2f} | {max(g):+.2f} |")
    algorithms = sorted({a for t, a in gains if all(len(gains.get((t2, a), [])) >= MIN_SEEDS for t2 in tastes)})

    def versus(t: str, a: str, b: str) -> int:  # +1 a clearly better than b on taste t, -1 clearly worse, 0 neither
        ga, gb = gains[t, a], gains[t, b]
        diff = statistics.mean(ga) - statistics.mean(gb)
        se = (statistics.variance(ga) / len(ga) + statistics.variance(gb) / len(gb)) ** 0.5
        return 1 if diff > 2 * se else -1 if diff < -2 * se else 0

    lines.append("")
    if incumbent not in algorithms:
        return "\n".join(lines + [f"No verdict: {incumbent} lacks {MIN_SEEDS} seeds on every taste."])
    never_worse = [a for a in algorithms if all(versus(t, a, b) >= 0 for t in tastes for b in algorithms if b != a)]
    better = [a for a in never_worse if a != incumbent and any(versus(t, a, incumbent) > 0 for t in tastes)]
    for a in algorithms:
        worse = [f"{b} on {t}" for t in tastes for b in algorithms if b != a and versus(t, a, b) < 0]
        wins = [t for t in tastes if a != incumbent and versus(t, a, incumbent) > 0]
        lines.append(f"- {a}: clearly worse than {', '.join(worse) if worse else 'none'}; "
                     + (f"clearly better than {incumbent} on {', '.join(wins) if wins else 'no taste'}" if a != incumbent
                        else "the incumbent"))
    for a in sorted({a for _, a in gains} - set(algorithms)):  # a screen run: shown above, not weighed
        seeds = ", ".join(f"{len(gains.get((t, a), []))} on {t}" for t in tastes)
        lines.append(f"- {a}: outside the rule, with {seeds} (it needs {MIN_SEEDS} on every taste)")
    if better:
        best = max(better, key=lambda a: statistics.mean(statistics.mean(gains[t, a]) for t in tastes))
        lines.append(f"\nVerdict: **{best}** (never clearly worse, clearly better than {incumbent} somewhere"
                     + (f"; of {', '.join(better)}, the highest mean gain" if len(better) > 1 else "") + ").")
    else:
        lines.append(f"\nVerdict: **{incumbent} stays** (no algorithm is never clearly worse and clearly better than it somewhere).")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
