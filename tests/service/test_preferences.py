"""Pairwise preferences over HTTP (POST / DELETE /v1/preferences) on a real `bentoml serve`, the answers made
with the official openai client, and the whole path: simulated users stating preferences -> Kafka -> the
trainer's store -> a round whose reward model and DPO use them.

    .venv/bin/python -m pytest -q tests/service/test_preferences.py
"""

from __future__ import annotations

import httpx
import pytest
from service_helpers import API_KEY, chat, read_events

from rlhf_loop.core.contracts import Preference, bind_feedback_id, make_response_id, prompt_tag, Message

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def answer(i: int, rid: str, choice: int = 0) -> dict:
    return {"response_id": rid, "choice_index": choice}


def test_preferences_replace_withdraw_and_reach_kafka(service, module_broker):
    client, http = service.openai(), service.http(headers=AUTH)
    two = chat(client, n=2, seed=5, user="alice")
    other = chat(client, seed=6)  # another response to the same prompt ("Tell me about cats.")
    before = service.metric("rlhf_preferences_total", tie="false", policy_version="0")

    def prefer(chosen: dict, rejected: dict, **body) -> httpx.Response:
        return http.post("/v1/preferences", json={"chosen": chosen, "rejected": rejected, **body})

    first = prefer(answer(0, two.id, 1), answer(0, two.id, 0), user="alice", comment="warmer")
    assert first.status_code == 202, first.text
    pid = first.json()["id"]
    assert first.json() == {"object": "preference", "id": pid, "chosen": {"response_id": two.id, "choice_index": 1},
                            "rejected": {"response_id": two.id, "choice_index": 0}, "tie": False, "deleted": False}
    flipped = prefer(answer(0, two.id, 0), answer(0, two.id, 1), user="alice")  # changed her mind: replaces it
    assert flipped.status_code == 202 and flipped.json()["id"] == pid
    bob = prefer(answer(0, two.id, 0), answer(0, two.id, 1), user="bob", tie=True)
    assert bob.status_code == 202 and bob.json()["id"] != pid and bob.json()["tie"] is True
    across = prefer(answer(0, other.id), answer(0, two.id, 1), user="alice")  # two responses, one prompt
    assert across.status_code == 202, across.text
    # only the identity that stated it may withdraw it; a preference's id is no vote's id
    secret = service.id_secret()
    someone_elses = bind_feedback_id(secret, "key:0123456789abcdef", pid.rpartition(".")[0], label="preference")
    refused = http.delete(f"/v1/preferences/{someone_elses}")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "permission_denied"
    assert http.delete(f"/v1/feedback/{pid}").status_code == 403
    gone = http.delete(f"/v1/preferences/{pid}")
    assert gone.status_code == 202 and gone.json() == {"object": "preference", "id": pid, "chosen": None,
                                                       "rejected": None, "tie": False, "deleted": True}
    assert service.metric("rlhf_preferences_total", tie="false", policy_version="0") == before + 3

    service.wait_drained()
    events = read_events(module_broker.bootstrap, ["rlhf.feedback"],
                         until=lambda evs: sum(isinstance(e, Preference) and two.id in e.preference_id
                                               for e in evs) >= 4)
    mine = [e for e in events if isinstance(e, Preference) and e.preference_id in (pid, bob.json()["id"])]
    alice = [(e.chosen and e.chosen.choice_index, e.deleted, e.comment) for e in mine if e.preference_id == pid]
    assert alice == [(1, False, "warmer"), (0, False, None), (None, True, None)]  # in order: the latest wins
    (identity,) = {e.identity for e in mine}
    assert identity.startswith("key:") and {e.voter for e in mine if e.user} == {f"{identity}/alice", f"{identity}/bob"}
    (cross,) = [e for e in events if isinstance(e, Preference) and e.preference_id == across.json()["id"]]
    assert (cross.chosen.response_id, cross.rejected.response_id) == (other.id, two.id)


@pytest.fixture(scope="module")
def answers(service) -> dict[str, str]:
    """Response ids for the bad-input cases: an n=2 and an n=1 answer to one prompt, one to another prompt, and
    an id of the form issued before ids carried their prompt (valid for votes, not comparable across responses)."""
    client, secret = service.openai(), service.id_secret()
    return {"two": chat(client, n=2).id, "one": chat(client).id, "rain": chat(client, "Tell me about rain.").id,
            "old": make_response_id(secret, 0, 1),
            "forged": make_response_id(b"another secret", 0, 2, prompt_tag(b"another secret", [
                Message(role="user", content="Tell me about cats.")]))}


# (name, body with {two}/{one}/{rain}/{old}/{forged} ids, status, code, param)
BAD = [
    ("same answer twice", {"chosen": ("two", 0), "rejected": ("two", 0)}, 400, "invalid_value", "rejected"),
    ("choice out of range", {"chosen": ("one", 1), "rejected": ("one", 0)}, 400, "invalid_value", "chosen.choice_index"),
    ("rejected choice out of range", {"chosen": ("two", 0), "rejected": ("two", 2)}, 400, "invalid_value",
     "rejected.choice_index"),
    ("not our id", {"chosen": ("forged", 0), "rejected": ("two", 0)}, 404, "response_not_found", "chosen.response_id"),
    ("different prompts", {"chosen": ("two", 0), "rejected": ("rain", 0)}, 400, "prompt_mismatch",
     "rejected.response_id"),
    ("an id from before prompts were bound", {"chosen": ("old", 0), "rejected": ("one", 0)}, 400, "prompt_unknown",
     "rejected.response_id"),
    ("unknown field", {"chosen": ("two", 0), "rejected": ("two", 1), "winner": "a"}, 400, "invalid_value", "winner"),
    ("tie not a bool", {"chosen": ("two", 0), "rejected": ("two", 1), "tie": "yes"}, 400, "invalid_value", "tie"),
    ("no rejected", {"chosen": ("two", 0)}, 400, "invalid_value", "rejected"),
    ("negative choice", {"chosen": ("two", -1), "rejected": ("two", 1)}, 400, "invalid_value", "chosen.choice_index"),
]


@pytest.mark.parametrize("name,body,status,code,param", BAD, ids=[b[0] for b in BAD])
def test_bad_preferences_get_a_4xx_in_openai_shape_and_write_nothing(service, answers, name, body, status, code,
                                                                    param):
    json = {k: {"response_id": answers[v[0]], "choice_index": v[1]} if isinstance(v, tuple) else v
            for k, v in body.items()}
    spooled = service.metric("rlhf_events_spooled_total")
    with service.http(headers=AUTH) as http:
        r = http.post("/v1/preferences", json=json)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert (err["code"], err["param"], err["type"]) == (code, param, "invalid_request_error")
    assert service.metric("rlhf_events_spooled_total") == spooled


def test_withdrawals_and_keys_are_checked(service, answers):
    body = {"chosen": {"response_id": answers["two"]}, "rejected": {"response_id": answers["two"], "choice_index": 1}}
    with service.http() as http:
        assert http.post("/v1/preferences", json=body).status_code == 401  # no API key
    with service.http(headers=AUTH) as http:
        for path, status in ((f"/v1/preferences/{answers['two']}:pref-0123.0123456789abcdef", 403),
                             ("/v1/preferences/nonsense", 404), (f"/v1/preferences/{answers['forged']}:x.y", 404)):
            r = http.delete(path)
            assert r.status_code == status, (path, r.text)
            assert r.json()["error"]["code"] == {403: "permission_denied", 404: "preference_not_found"}[status]
            assert r.json()["error"]["param"] == "preference_id"
        # the old ids still take votes: only comparing two of them is refused
        assert http.post("/v1/feedback", json={"response_id": answers["old"], "rating": "up"}).status_code == 202


@pytest.mark.slow
def test_simulated_preferences_flow_through_kafka_into_a_round(service, module_broker, base_model_dir, tmp_path):
    """Users with a taste state preferences between the two answers of n=2 chats (app/simulate.py, labels=
    preferences); the trainer consumes them from the real broker, joins each to both its answers, and a
    DPO round trains its reward model and its policy on them: the round counts every one."""
    from rlhf_loop.app.simulate import SimConfig, run
    from rlhf_loop.core.contracts import Settings
    from rlhf_loop.trainer.config import TrainerConfig
    from rlhf_loop.trainer.reward_model import is_heldout_pair
    from rlhf_loop.trainer.round import run_round
    from rlhf_loop.trainer.state import TrainerState

    log = run(SimConfig(url=service.url, api_key=API_KEY, labels="preferences", max_votes=48, rate=0, users=6,
                        concurrency=2, max_tokens=24, seed=3))
    assert not log.chat_errors and not log.vote_errors, (log.chat_errors[:3], log.vote_errors[:3])
    assert len(log.preferences) == len(log.votes) == 48
    assert all(v.feedback_id == "" for v in log.votes)  # preferences only: no thumbs sent
    strict = [p for p in log.preferences if not p.tie]  # the taste liked one of the two answers
    assert all(p.liked[0] == p.liked[1] for p in log.preferences if p.tie)
    assert strict and sum(p.liked[p.chosen] for p in strict) > len(strict) / 2  # the liked one, but for the noise
    service.wait_drained()

    settings = Settings(state_dir=tmp_path / "trainer", model=base_model_dir, device="cpu",
                        kafka_bootstrap_servers=module_broker.bootstrap)
    cfg = TrainerConfig().replace(
        train={"algorithm": "dpo"}, reward={"backbone": "frozen"}, direct={"max_steps": 4},
        gate={"eval_responses": 8, "guard_set": None, "min_rm_auroc": 0, "min_rm_pair_accuracy": 0,
              "max_rm_approval_gap": 0})
    state = TrainerState.open(settings, cfg)
    try:
        report = run_round(state, progress=False)
        stored = state.store.preferences(cfg.reward.max_voter_share)
    finally:
        state.close()
    # every preference this module's tests left standing, the simulated users' 48 among them, joined to both answers
    sent = {p.preference_id for p in log.preferences}
    assert sent <= {p.preference_id for p in stored} and report.preferences == len(stored)
    assert report.labels == 0 and report.new_labels >= 48 and report.candidate, report.reason
    held = [p for p in stored if is_heldout_pair(p, cfg.reward.heldout_fraction)]
    rm = report.reward_model
    assert rm["train_preferences"] == len(stored) - len(held) and rm["pairs"] == rm["train_preferences"]
    assert rm["heldout_preferences"] == sum(not p.tie for p in held)
    assert report.train["preferences"] == sum(not p.tie for p in stored if p not in held) > 0
    assert report.train["pairs"] == report.train["preferences"] and report.train["steps"] > 0
