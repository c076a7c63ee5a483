"""A markdown table of bench/loop.py results (the tables in docs/trainer.md are its output).

    python bench/loop_table.py bench/results/loop-cheerful-ppo-2000-x86_64.json ...          # at the end of each run
    python bench/loop_table.py --at 1000 bench/results/loop-cheerful-*-x86_64.json        # as each stood at vote 1,000
    python bench/loop_table.py before=OLD.json after=NEW.json                             # a first column naming each
    python bench/loop_table.py --at 1000 --mean bench/results/loop-short-*.json           # plus each (taste, algorithm)'s mean over seeds

One row per file (LABEL=FILE puts LABEL in a first column). --at N reads the run as it stood at its N-th vote (bench/loop.py --at, the
default 1000): a 2,000-vote run then compares with 1,000-vote ones on the same footing. --mean adds,
after the runs, one row per (taste, algorithm) run more than once with the mean of each column over its runs (bench/loop.py --seed).
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
