"""After a promotion, the users judge: roll a version back, with no operator, when its live approval drops.

Offline checks (the gate) can all pass and users still like a new version less: in 2025 an
update rolled out to a chat model was rolled back for sycophancy that offline evaluations
and A/B tests had missed. So the trainer (rank 0, after every poll) judges EVERY promoted
version against its own parent, on the users' votes on the answers each of them wrote.
Several versions are watched at once: rounds go on promoting, and a version superseded
before its test decided is still judged, since votes on the answers it gave keep arriving.

The test, for version v with n_v votes (approval p_v) against its parent with n_p (p_p),
both approvals estimated from their votes:

    pooled  q = (ups_v + ups_p) / (n_v + n_p)
    z       = (p_v - p_p) / sqrt(q (1 - q) (1 / n_v + 1 / n_p))      (two-proportion z statistic)

    H0: v is as good as its parent (true approval >= the parent's); roll back when it is rejected.

It is group-sequential: look k (of K = watch.looks) is taken when v has n_k = first_look x
2^(k-1) votes (50, 100, 200, 400) and its parent at least min_parent_votes, and it spends
alpha_k = alpha (n_k - n_{k-1}) / n_K of the false-alarm rate alpha (linear in v's votes, n_0 = 0:
1/8, 1/8, 1/4, 1/2 of it). Look k rolls back when z <= -Phi^-1(1 - alpha_k). By the union bound
P(a rollback | H0) <= sum_k alpha_k = alpha, whatever the correlation between looks and however
the votes arrive on either side (conservative: bench/rollback_sim.py measures about 3 % at
alpha 0.05). A poll that brings v past several looks at once takes only the last of them (the others'
alpha is left unspent, which keeps the bound). After the last look without a rollback v is kept.

The test before this one (Wald's SPRT against the parent's approval taken as known) rolled
back 16-23 % of versions as good as their parent instead of 5 % (the same bench): the parent's
approval is an estimate from 50-150 votes. Those votes also bound what any test can see: with 100 parent
votes at approval 0.6, a 0.15 drop is at most 3 standard errors away however many votes v gets.

A rollback moves LATEST to v's parent when v is LATEST or an ancestor of it; the versions
between (built on v) go with it. A version that is neither serves no longer and nothing
serving is built on it, so it is not judged (LATEST moved past it: a rollback of an ancestor,
or an operator). The move is recorded in the policy store's ROLLBACKS.json, announced
(`PolicyUpdate.rollback_of` = the LATEST it moved away from, which replicas leave even for an
older version) and the next round trains from there. The trainer store keeps each version's
looks taken (`watch_looks:<v>`) and its decision (`watch:<v>`: kept | rolled back).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from statistics import NormalDist

from rlhf_loop.trainer.config import WatchConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Look:
    """Look k (1..K): taken at `votes` of the version's votes, spending `alpha` of the false-alarm rate."""

    k: int
    votes: int
    alpha: float
    bound: float  # roll back at z <= -bound: Phi^-1(1 - alpha)


@dataclass(frozen=True)
class Verdict:
    version: int
    parent: int
    decision: str  # "roll back" | "keep" | "watching" (a look that found no drop, more to come)
    look: Look
    z: float
    approval: float
    votes: int
    parent_approval: float
    parent_votes: int


def schedule(cfg: WatchConfig) -> list[Look]:
    """The looks: at first_look x 2^(k-1) votes, alpha_k = alpha (n_k - n_{k-1}) / n_K."""
    votes = [cfg.first_look * 2 ** k for k in range(cfg.looks)]
    out = []
    for k, (before, n) in enumerate(zip([0, *votes], votes), 1):
        alpha = cfg.false_alarm * (n - before) / votes[-1]
        out.append(Look(k, n, alpha, NormalDist().inv_cdf(1 - alpha)))
    return out


def z_statistic(ups: int, downs: int, parent_ups: int, parent_downs: int) -> float:
    """The pooled two-proportion z of the version's approval against its parent's (negative: lower).
    0 when every vote on both agrees (q = 0 or 1: no evidence of a difference)."""
    n, n_p = ups + downs, parent_ups + parent_downs
    q = (ups + parent_ups) / (n + n_p)
    if q in (0.0, 1.0):
        return 0.0
    return (ups / n - parent_ups / n_p) / (q * (1 - q) * (1 / n + 1 / n_p)) ** 0.5


def next_look(votes: int, parent_votes: int, taken: int, cfg: WatchConfig) -> Look | None:
    """The look due now (the last one the version's votes reached, if not taken), or None."""
    if parent_votes < cfg.min_parent_votes:
        return None
    due = [look for look in schedule(cfg) if look.votes <= votes and look.k > taken]
    return due[-1] if due else None


def decide(z: float, look: Look, cfg: WatchConfig) -> str:
    if z <= -look.bound:
        return "roll back"
    return "keep" if look.k == cfg.looks else "watching"


def line(policy_store, latest: int) -> list[int]:
    """LATEST and its ancestors, newest first: the versions that serve or that what serves is built on."""
    out = [latest]
    while (parent := policy_store.manifest(out[-1]).parent_version) is not None:
        out.append(parent)
    return out


def check(state) -> list[Verdict]:
    """Rank 0, after a poll: a look for every version on LATEST's line that reached one (oldest first);
    a rollback moves LATEST and ends this check (the versions after it went with it)."""
    cfg = state.cfg.watch
    if not cfg.enabled:
        return []
    latest = state.policy_store.latest()
    versions = line(state.policy_store, latest)
    counts = state.store.approval_by_version()
    verdicts = []
    for version, parent in reversed(list(zip(versions, versions[1:]))):
        if state.store.get(f"watch:{version}") is not None:
            continue
        (ups, downs), (pu, pd) = counts.get(version, (0, 0)), counts.get(parent, (0, 0))
        look = next_look(ups + downs, pu + pd, state.store.get(f"watch_looks:{version}", 0), cfg)
        if look is None:
            continue
        z = z_statistic(ups, downs, pu, pd)
        verdict = Verdict(version, parent, decide(z, look, cfg), look, z, ups / (ups + downs), ups + downs,
                          pu / (pu + pd), pu + pd)
        verdicts.append(verdict)
        state.store.set(f"watch_looks:{version}", look.k)
        if verdict.decision == "keep":
            state.store.set(f"watch:{version}", "kept")
        elif verdict.decision == "roll back":
            _roll_back(state, verdict, latest, built_on=versions[:versions.index(version)])
            break
    return verdicts


def _roll_back(state, verdict: Verdict, latest: int, built_on: list[int]) -> None:
    """LATEST -> the version's parent, recorded and announced. `built_on`: the versions after it on the line."""
    v, cfg = verdict, state.cfg.watch
    reason = (f"live approval {v.approval:.2f} over {v.votes} votes against parent v{v.parent}'s "
              f"{v.parent_approval:.2f} over {v.parent_votes}: z {v.z:.2f} <= -{v.look.bound:.2f} at look "
              f"{v.look.k} of {cfg.looks} (false-alarm rate {cfg.false_alarm:g} over all looks)")
    if built_on:
        reason += f"; LATEST v{latest} was built on it (" + ", ".join(f"v{b}" for b in built_on) + ") and goes with it"
    state.policy_store.roll_back(v.version, v.parent, reason)
    state.store.set(f"watch:{v.version}", "rolled back")
    state.publisher.announce(v.parent, rollback_of=latest)
    log.warning("rolled back v%d: LATEST v%d -> v%d: %s", v.version, latest, v.parent, reason)
