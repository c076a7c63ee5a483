"""The judge's AUROC three ways, on a finished loop's own votes, against what the reward model then did.

    .venv/bin/python bench/judge_cv.py /tmp/bench-loop-state-XXXX --out judge-cv-smollm2-cheerful

Reads a loop's state directory (bench/loop.py leaves it in /tmp and prints its path; `rlhf up`'s
is .rlhf/demo): the votes in arrival order (trainer/labels.sqlite) and the frozen-feature reward
model's cached token states (trainer/rm_features.safetensors), so it needs reward.backbone=frozen.
Then, for the first N votes (N = --at), as a round at N labels would:
  heldout  the served head (fit on the training split) on the held-out split, as the judge did before
  pooled   5-fold cross-validation, every fold's scores pooled into one AUROC
  within   5-fold cross-validation, each fold's ups against its own downs (the judge now:
           reward_model.within_fold_auroc)
each with its 95 % lower bound (the judge trusts a reward model at 0.6), and what they estimate: the
served head's AUROC on the next --future votes (against the votes, and against the taste itself,
noise-free). Prints a table and saves bench/results/<out>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import _timing  # noqa: E402
from rlhf_loop.core.tastes import TASTES  # noqa: E402
from rlhf_loop.trainer.config import RewardConfig  # noqa: E402
from rlhf_loop.trainer.networks import FeatureRewardModel  # noqa: E402
from rlhf_loop.trainer.reward_model import (  # noqa: E402
    FeatureCache, _fold_scores, auroc_lower_bound, binary_auroc, is_heldout, train_reward_head,
)
from rlhf_loop.trainer.store import Example, connect_read_only, read_labels  # noqa: E402


def votes_in_order(state: Path, cache: FeatureCache) -> list[Example]:
    """Each answer's first vote, in the order the votes came, for the answers whose features are cached."""
    labels = sorted(read_labels(connect_read_only(state / "trainer" / "labels.sqlite")), key=lambda v: v.voted_at)
    seen, out = set(), []
    for v in labels:
        key = (v.response_id, v.choice_index)
        if key in seen or not v.rating:
            continue
        seen.add(key)
        e = Example(v.response_id, v.choice_index, v.prompt_key, v.messages, v.completion, float(v.rating), 1.0,
                    v.policy_version)
        if FeatureCache.name(e) in cache.features:
            out.append(e)
    return out


def measure(rm: FeatureRewardModel, cache: FeatureCache, seen: list[Example], future: list[Example],
            cfg: RewardConfig, taste: str) -> dict:
    """The held-out and within-fold figures from the trainer's own train_reward_head (all features cached:
    no forward runs), the pooled one from the same folds' scores; then the served head on the next votes."""
    def ups(examples: list[Example]) -> torch.Tensor:
        return torch.tensor([e.rating > 0 for e in examples], dtype=torch.bool)

    heldout = train_reward_head(rm, None, seen, dataclasses.replace(cfg, judge_folds=1), cache)
    within = train_reward_head(rm, None, seen, dataclasses.replace(cfg, judge_folds_until=0), cache)
    with torch.no_grad():  # the served head (the same fit in both calls) on the held-out votes and the next ones
        held = [e for e in seen if is_heldout(e.response_id, cfg.heldout_fraction) and e.rating != 0]
        held_scores, future_scores = rm.head_scores(*cache.get(held)), rm.head_scores(*cache.get(future))
    folded = [_fold_scores(rm, cache, seen, [], j, cfg) for j in range(1, cfg.judge_folds)]
    scores = torch.cat([held_scores] + [torch.tensor([s for _, s in f]) for f in folded])
    y = torch.cat([ups(held)] + [ups([e for e, _ in f]) for f in folded])
    pooled = binary_auroc(scores, y)
    liked = torch.tensor([TASTES[taste](e.messages[-1]["content"], e.completion) for e in future], dtype=torch.bool)
    return {"labels": len(seen), "heldout_votes": heldout.heldout_examples,
            "heldout": heldout.auroc, "heldout_lcb": heldout.auroc_lcb,
            "pooled": pooled, "pooled_lcb": auroc_lower_bound(pooled, int(y.sum()), int((~y).sum())),
            "within": within.auroc, "within_lcb": within.auroc_lcb,
            "future_votes": binary_auroc(future_scores, ups(future)), "future_taste": binary_auroc(future_scores, liked),
            "future_n": len(future)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("state", type=Path, help="a loop's state directory")
    ap.add_argument("--taste", default="cheerful", help="the simulated users' taste in that run")
    ap.add_argument("--at", type=int, nargs="+", default=[64, 128, 192, 256, 320, 384, 448, 512, 640])
    ap.add_argument("--future", type=int, default=400, help="votes after N that the served head is checked on")
    ap.add_argument("--out", default="judge-cv")
    args = ap.parse_args()
    torch.set_num_threads(1)  # as the trainer runs beside the service
    tensors = load_file(args.state / "trainer" / "rm_features.safetensors")
    cache = FeatureCache.from_tensors(tensors, bytes(tensors["__key__"].tolist()).decode())
    examples = votes_in_order(args.state, cache)
    hidden = next(iter(cache.features.values())).shape[-1]
    rm = FeatureRewardModel(types.SimpleNamespace(device=torch.device("cpu")), 0, hidden)  # the head alone
    cfg = RewardConfig(backbone="frozen")
    print(f"{len(examples)} votes; AUROC (95 % lower bound), the judge trusts at 0.6")
    print("| labels | held out | held-out split | 5-fold, pooled | 5-fold, within folds | next votes: against the votes "
          "| against the taste |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for n in args.at:
        if n >= len(examples):
            break
        r = measure(rm, cache, examples[:n], examples[n:n + args.future], cfg, args.taste)
        rows.append(r)

        def cell(k: str) -> str:
            return f"{r[k]:.2f} ({'-' if r[k + '_lcb'] is None else format(r[k + '_lcb'], '.2f')})"

        print(f"| {n} | {r['heldout_votes']} | {cell('heldout')} | {cell('pooled')} | {cell('within')} | "
              f"{r['future_votes']:.2f} | {r['future_taste']:.2f} |", flush=True)
    out = _timing.save_json({**_timing.environment(torch.device("cpu")), "args": {**vars(args), "state": str(args.state)},
                             "rows": rows}, _timing.RESULTS_DIR / f"{args.out}.json")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
