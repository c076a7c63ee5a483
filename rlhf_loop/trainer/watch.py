"""After a promotion, the users judge: roll a version back, with no operator, when its live approval drops.

Offline checks (the gate) can all pass and users still like a new version less: in 2025 an
update rolled out to a chat model was rolled back for sycophancy that offline evaluations
and A/B tests had missed. So the trainer (rank 0, between polls) watches LATEST against its
parent with Wald's sequential probability ratio test on the new version's votes, each an
up (1) or a down (0):

    H0: p = p0            (p0: the parent's approval, from its own votes, clamped to [0.05, 0.95])
    H1: p = p0 - delta    (delta = WatchConfig.max_drop)
    LLR = ups * log(p1 / p0) + downs * log((1 - p1) / (1 - p0))
    LLR >= log((1 - beta) / alpha)  -> roll back: LATEST = parent, recorded, announced
    LLR <= log(beta / (1 - alpha))  -> keep: the version is no worse, stop watching it

with alpha (WatchConfig.false_alarm) the chance of rolling back a version as good as its
parent and beta (WatchConfig.miss) the chance of keeping one delta worse. The test is checked
after each poll, i.e. in small groups of votes, which is what "sequential" means here; the
parent's p0 is itself an estimate, so the test waits for min_parent_votes of them. How many
votes it takes: `expected_votes`. A rolled-back version is never made LATEST again by the
trainer (it is in the store's ROLLBACKS.json); the next round trains from the parent.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from rlhf_loop.trainer.config import WatchConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    version: int
    parent: int
    decision: str  # "roll back" | "keep" | "watching"
    llr: float
    upper: float  # log((1 - beta) / alpha)
    lower: float  # log(beta / (1 - alpha))
    parent_approval: float
    approval: float | None
    votes: int


def sprt(ups: int, downs: int, p0: float, cfg: WatchConfig) -> tuple[str, float, float, float]:
    """(decision, LLR, upper, lower) for `ups`/`downs` votes on the new version against the parent's p0."""
    p0 = min(max(p0, 0.05), 0.95)
    p1 = max(p0 - cfg.max_drop, 0.01)
    llr = ups * math.log(p1 / p0) + downs * math.log((1 - p1) / (1 - p0))
    upper, lower = math.log((1 - cfg.miss) / cfg.false_alarm), math.log(cfg.miss / (1 - cfg.false_alarm))
    decision = "roll back" if llr >= upper else "keep" if llr <= lower else "watching"
    return decision, llr, upper, lower


def expected_votes(p0: float, p: float, cfg: WatchConfig) -> float:
    """Wald's approximation of the votes the test needs to decide when the true approval is p."""
    p0 = min(max(p0, 0.05), 0.95)
    p1 = max(p0 - cfg.max_drop, 0.01)
    up, down = math.log(p1 / p0), math.log((1 - p1) / (1 - p0))
    drift = p * up + (1 - p) * down
    upper, lower = math.log((1 - cfg.miss) / cfg.false_alarm), math.log(cfg.miss / (1 - cfg.false_alarm))
    return (upper if drift > 0 else lower) / drift


def check(state) -> Verdict | None:
    """Rank 0: judge LATEST against its parent; roll it back if the test says so. None: nothing to judge."""
    cfg = state.cfg.watch
    latest = state.policy_store.latest()
    parent = state.policy_store.manifest(latest).parent_version
    if not cfg.enabled or parent is None or state.store.get(f"watch:{latest}") is not None:
        return None
    counts = state.store.approval_by_version()
    pu, pd = counts.get(parent, (0, 0))
    if pu + pd < cfg.min_parent_votes:
        return None
    ups, downs = counts.get(latest, (0, 0))
    decision, llr, upper, lower = sprt(ups, downs, pu / (pu + pd), cfg)
    verdict = Verdict(latest, parent, decision, llr, upper, lower, pu / (pu + pd),
                      ups / (ups + downs) if ups + downs else None, ups + downs)
    if decision == "keep":
        state.store.set(f"watch:{latest}", "kept")
    elif decision == "roll back":
        reason = (f"live approval {verdict.approval:.2f} over {verdict.votes} votes against parent v{parent}'s "
                  f"{verdict.parent_approval:.2f}: SPRT LLR {llr:.2f} >= {upper:.2f} (a drop of "
                  f"{cfg.max_drop:g}, false-alarm rate {cfg.false_alarm:g})")
        state.policy_store.roll_back(latest, parent, reason)
        state.store.set(f"watch:{latest}", "rolled back")
        state.publisher.announce(parent, rollback_of=latest)
        log.warning("rolled back v%d to v%d: %s", latest, parent, reason)
    return verdict
