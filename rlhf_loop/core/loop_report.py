"""The trainer's loop report: what `GET /loop` on the trainer's metrics port answers, and what the
service relays to the loop page (`GET /v1/loop`, service/loop.py). Defined once, here, for both.

    trainer (trainer/metrics.py)  ->  LoopReport JSON  ->  service (service/loop.py)  ->  the page at /loop

A round is summarised from its rounds.jsonl line (trainer/round.py, RoundReport): the verdict and
its reason, the gate's KL to the reference and rewards of the current policy and the candidate.
Approval is per policy version from the trainer's label store (every live vote joined to the
answer that version gave, as the live-approval watch counts them), cumulative over time.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class LoopRound(BaseModel):
    """One training round as the loop page shows it."""

    model_config = ConfigDict(extra="forbid")

    round: int = Field(ge=0)
    time: float = Field(description="unix time the round started")
    algorithm: str
    labels: int = Field(ge=0, description="labelled responses the round trained on")
    verdict: Literal["promoted", "rejected", "skipped"]
    reason: str = Field(description="the gate's reason: what a promotion improved, why it rejected (the candidate, "
                        "or the reward model before any policy trained), why skipped")
    version_before: int = Field(ge=0, description="the policy the round trained from")
    version: int | None = Field(None, description="the version it published, if promoted")
    kl_to_ref: float | None = Field(None, description="the candidate's KL to the reference, nats per response")
    kl_to_ref_before: float | None = Field(None, description="the current policy's KL to the reference")
    kl_bound: float | None = Field(None, description="the gate's bound on KL to the reference (gate.max_kl)")
    reward_before: float | None = Field(None, description="mean reward of the current policy on the gate's prompts")
    reward_after: float | None = Field(None, description="... and of the candidate")


class ApprovalPoint(BaseModel):
    """A version's votes up to `time` (cumulative)."""

    model_config = ConfigDict(extra="forbid")

    time: float = Field(description="unix time: the end of a bucket of vote event times")
    up: int = Field(ge=0)
    down: int = Field(ge=0)


class VersionApproval(BaseModel):
    """Live votes on the answers one policy version gave: now, and over time."""

    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=0)
    up: int = Field(ge=0)
    down: int = Field(ge=0)
    points: list[ApprovalPoint] = Field(description="cumulative counts, oldest first; the last equals up/down")


class LoopReport(BaseModel):
    """The trainer's answer at GET /loop."""

    model_config = ConfigDict(extra="forbid")

    rounds: list[LoopRound] = Field(description="the newest rounds, oldest first")
    approval: list[VersionApproval] = Field(description="by version, oldest first")


def round_verdict(line: dict) -> str:
    """promoted; rejected by the gate (a candidate it refused, or a reward model its judge refused before any
    policy trained); skipped (nothing to train on yet). `line`: a rounds.jsonl line, or asdict(RoundReport)."""
    if line["promoted"]:
        return "promoted"
    return "rejected" if line.get("candidate") or line.get("checks") else "skipped"


def loop_round(line: dict) -> LoopRound:
    """A rounds.jsonl line (`dataclasses.asdict(RoundReport)`, NaN written as null) -> LoopRound."""
    current, candidate = line.get("current") or {}, line.get("candidate") or {}
    verdict = round_verdict(line)
    return LoopRound(round=line["round"], time=line["trigger_time"], algorithm=line["algorithm"], labels=line["labels"],
                     verdict=verdict, reason=line["reason"], version_before=line["version_before"],
                     version=line["version"], kl_to_ref=candidate.get("kl_to_ref"),
                     kl_to_ref_before=current.get("kl_to_ref"), kl_bound=line["kl_bound"],
                     reward_before=current.get("reward"), reward_after=candidate.get("reward"))
