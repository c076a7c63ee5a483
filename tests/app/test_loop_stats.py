"""What bench/loop.py reports about a run, on a log and rounds written here with known answers."""

from rlhf_loop.app.loop import FINAL_WINDOW, round_stats, stats_at, votes_to_gain
from rlhf_loop.app.simulate import SimLog, Vote

EPOCH = 1_000.0  # wall clock when the users started


def vote(t: float, version: int, up: bool) -> Vote:
    return Vote(t=t, user="u", response_id="r", version=version, prompt="p", answer="a", liked=up, up=up,
                feedback_id="r:k")


def rnd(trigger: float, seconds: float, *, promoted: bool, reason: str = "", version: int | None = None,
        votes: int = 0, auroc: float | None = None) -> dict:
    return {"trigger_time": EPOCH + trigger, "seconds": {"total": seconds}, "promoted": promoted, "reason": reason,
            "version": version, "votes": votes, "candidate": True, "reward_model": {"auroc": auroc}}


KL = "KL to reference 9.1 > 8"
REWARD = "reward 0.1 does not beat 0.2"


def test_round_stats_counts_rejections_and_the_longest_run_of_kl_ones():
    rounds = [rnd(0, 10, promoted=True, votes=128, auroc=0.7), rnd(20, 12, promoted=False, reason=KL, votes=256, auroc=0.76),
              rnd(40, 14, promoted=False, reason=KL, votes=384, auroc=0.8), rnd(60, 8, promoted=False, reason=REWARD),
              rnd(80, 9, promoted=False, reason=KL, votes=512, auroc=0.81)]
    stats = round_stats(rounds)
    assert (stats["rounds_promoted"], stats["rounds_rejected_kl"], stats["rounds_rejected_reward"]) == (1, 3, 1)
    assert stats["max_consecutive_kl_rejections"] == 2
    assert stats["seconds_per_round_median"] == 10
    assert (stats["rm_auroc_end"], stats["rm_auroc_0.75_at_votes"]) == (0.81, 256)


def test_votes_to_gain_is_the_first_window_that_reaches_the_gain():
    votes = [vote(i, 0, i % 2 == 0) for i in range(200)] + [vote(200 + i, 1, True) for i in range(200)]
    # baseline 0.5; the 100-vote window reaches 0.8 once 60 of its votes are v1's (all up): 0.6 + 0.4 * 0.5
    assert votes_to_gain(votes, 0.5, 0.3) == 260
    assert votes_to_gain(votes, 0.5, 0.6) is None and votes_to_gain(votes, None, 0.1) is None


def test_stats_at_a_vote_count_sees_only_what_had_happened_by_then():
    log = SimLog()
    log.votes = ([vote(i, 0, i % 4 == 0) for i in range(400)]  # v0: 0.25
                 + [vote(400 + i, 1, i % 4 != 0) for i in range(600)]  # v1 from t=400: 0.75
                 + [vote(1000 + i, 2, True) for i in range(1000)])  # v2 from t=1000
    rounds = [rnd(300, 90, promoted=True, version=1),  # done at t=390
              rnd(900, 50, promoted=False, reason=KL),  # done at t=950
              rnd(960, 30, promoted=True, version=2),  # done at t=990
              rnd(995, 20, promoted=False, reason=KL)]  # done at t=1015: after vote 1,000 (t=999)
    versions = {0: {"metrics": {}}, 1: {"metrics": {"kl_to_ref": 2.5}}, 2: {"metrics": {"kl_to_ref": 4.0}}}
    at = stats_at(log, rounds, versions, EPOCH, 1000)
    assert FINAL_WINDOW <= 600  # the window at vote 1,000 holds only v1's votes
    assert (at["baseline_approval"], at["approval"]) == (0.25, 0.75) and at["approval_gain"] == 0.5
    assert (at["rounds_promoted"], at["rounds_rejected_kl"], at["max_consecutive_kl_rejections"]) == (2, 1, 1)
    assert (at["serving_version"], at["kl_to_ref"]) == (1, 2.5)
    assert at["votes_to_gain_0.3"] == 460  # 60 of the window's 100 votes from v1: 0.75 * 0.6 + 0.25 * 0.4
    assert stats_at(log, rounds, versions, EPOCH, 2001) is None
