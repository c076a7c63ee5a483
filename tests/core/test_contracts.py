import json
import os
import sys
import uuid

import pytest
from pydantic import ValidationError

from rlhf_loop.core.contracts import (
    Feedback, Interaction, PolicyUpdate, Sampling, Settings, bind_feedback_id, cast_by, feedback_id_for,
    make_response_id, split_feedback_id, verify_response_id,
)


def test_response_ids_verify_only_with_the_issuing_secret():
    rid = make_response_id(b"secret-a")
    assert verify_response_id(b"secret-a", rid)
    assert not verify_response_id(b"secret-b", rid)
    forged = rid[:-1] + ("0" if rid[-1] != "0" else "1")
    assert not verify_response_id(b"secret-a", forged)
    assert not verify_response_id(b"secret-a", "chatcmpl-abc")
    assert not verify_response_id(b"secret-a", "")
    assert not verify_response_id(b"secret-a", "chatcmpl-abc-é")  # not a TypeError (a 500 at the API)


def test_feedback_ids_are_stable_per_voter_and_carry_the_response_id():
    rid = make_response_id(b"k")
    a1 = feedback_id_for(rid, 0, None, "key:k1/alice")
    assert a1 == feedback_id_for(rid, 0, None, "key:k1/alice")  # second vote replaces the first
    assert a1 != feedback_id_for(rid, 0, None, "key:k1/bob")
    assert a1 != feedback_id_for(rid, 1, None, "key:k1/alice")
    assert feedback_id_for(rid, 0, "client-key", "key:k1/alice") == f"{rid}:client-key"


def test_a_bound_feedback_id_names_the_identity_that_cast_it_and_no_other():
    secret, rid = b"s", make_response_id(b"s")
    mine = bind_feedback_id(secret, "key:aaaa", f"{rid}:client-key")
    theirs = bind_feedback_id(secret, "key:bbbb", f"{rid}:client-key")
    assert mine != theirs and mine == bind_feedback_id(secret, "key:aaaa", f"{rid}:client-key")  # idempotent
    assert mine.startswith(f"{rid}:client-key.") and split_feedback_id(mine) == (rid, mine.partition(":")[2])
    assert cast_by(secret, "key:aaaa", mine) and not cast_by(secret, "key:bbbb", mine)
    assert not cast_by(b"other secret", "key:aaaa", mine)
    assert not cast_by(secret, "key:aaaa", mine.replace(":client-key.", ":client-kez."))  # the key is covered too
    assert not cast_by(secret, "key:aaaa", f"{rid}:client-key")  # an unbound id is no one's
    for bad in (rid, f"{rid}:client-key", f"{rid}:bad key!.{'0' * 16}", f"{rid}:k.{'0' * 15}"):
        assert split_feedback_id(bad) is None, bad


def _interaction(**kw):
    base = dict(
        response_id="chatcmpl-x-y", policy_version=0, model="m",
        messages=[{"role": "user", "content": "hi"}], prompt_token_ids=[1, 2], completion="hello",
        completion_token_ids=[3], finish_reason="stop",
        sampling=Sampling(temperature=1.0, top_p=1.0, max_tokens=8, seed=None),
    )
    return Interaction(**{**base, **kw})


def test_events_round_trip_through_json():
    for ev in (
        _interaction(),
        _interaction(completion_logprobs=[-0.6931471805599453]),
        Feedback(feedback_id="f", response_id="r", rating=1),
        Feedback(feedback_id="f", response_id="r", rating=None, deleted=True),
        PolicyUpdate(version=2, parent_version=1, uri="/p/v2", files={"a": "0" * 64}, metrics={"kl": 0.1}),
    ):
        back = type(ev).model_validate_json(ev.to_bytes())
        assert back == ev
        assert json.loads(ev.to_bytes())["schema_version"] == 1
        assert isinstance(back.event_id, uuid.UUID)


@pytest.mark.parametrize("bad", [
    {"messages": []},
    {"messages": [{"role": "robot", "content": "x"}]},
    {"finish_reason": "eos"},
    {"unknown_field": 1},
    {"completion_logprobs": [-0.1, -0.2]},  # one log-prob per completion token
    {"completion_logprobs": []},
])
def test_interaction_schema_rejects_bad_events(bad):
    with pytest.raises(ValidationError):
        _interaction(**bad)


def test_feedback_from_before_identities_still_parses():
    old = {"kind": "feedback", "feedback_id": "r:u1", "response_id": "r", "rating": 1, "user": "alice",
           "voter": "user:ab/alice", "schema_version": 1}
    ev = Feedback.model_validate_json(json.dumps(old))
    assert ev.identity is None and ev.voter == "user:ab/alice"
    new = Feedback(feedback_id="r:u1.0123456789abcdef", response_id="r", rating=-1, user="alice",
                   identity="key:0123456789abcdef", voter="key:0123456789abcdef/alice")
    assert Feedback.model_validate_json(new.to_bytes()) == new


def test_feedback_rating_is_plus_or_minus_one():
    with pytest.raises(ValidationError):
        Feedback(feedback_id="f", response_id="r", rating=2)


def test_settings_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RLHF_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("RLHF_API_KEYS", "k1, k2=500,")
    monkeypatch.setenv("RLHF_TOPIC_FEEDBACK", "fb")
    s = Settings()
    assert s.state_dir == tmp_path and s.policy_dir == tmp_path / "policies"
    assert s.api_key_set() == {"k1", "k2"}
    assert s.api_key_quotas() == {"k1": s.vote_key_rate_limit, "k2": 500}
    assert s.topic_feedback == "fb"
    assert "k1" not in repr(s)  # secrets stay out of logs
    monkeypatch.setenv("RLHF_PORT", "not-a-port")
    with pytest.raises(ValidationError):
        Settings()


def test_id_secret_is_shared_through_the_state_dir_when_not_configured(tmp_path):
    a = Settings(state_dir=tmp_path).id_secret()
    assert a == Settings(state_dir=tmp_path).id_secret() and len(a) == 64
    assert Settings(state_dir=tmp_path, response_id_secret="s3cret").id_secret() == b"s3cret"


def test_api_keys_carry_a_quota_each_and_the_default_quota_is_on():
    s = Settings(api_keys="plain, own=20, padded==, b64pad=, x=y=7, zero=0")
    default = Settings().vote_key_rate_limit
    assert default > 0  # a key minting users is bounded without any setting
    assert s.api_key_quotas() == {"plain": default, "own": 20, "padded==": default, "b64pad=": default, "x=y": 7,
                                  "zero": 0}
    assert Settings(api_keys="k", vote_key_rate_limit=9).api_key_quotas() == {"k": 9}


def test_the_id_secret_file_is_created_with_its_mode(tmp_path):
    """At no line of id_secret() is a file in the state dir readable by others: with a umask of 022, a file
    written first and chmod-ed after would be (the trace checks the directory before every line)."""
    seen: list[tuple[str, int]] = []

    def look(frame, event, arg):
        seen.extend((p.name, p.stat().st_mode & 0o777) for p in tmp_path.iterdir())
        return look

    def calls(frame, event, arg):
        return look if frame.f_code is Settings.id_secret.__code__ else None

    umask, tracer = os.umask(0o022), sys.gettrace()
    sys.settrace(calls)
    try:
        secret = Settings(state_dir=tmp_path).id_secret()
    finally:
        sys.settrace(tracer)
        os.umask(umask)
    assert any(".tmp" in name for name, _ in seen), "the trace saw the file being made"
    assert {mode for _, mode in seen} == {0o600}, seen
    assert (tmp_path / "response_id_secret").stat().st_mode & 0o777 == 0o600 and len(secret) == 64


def test_an_interaction_from_before_completion_logprobs_still_parses():
    old = json.loads(_interaction().to_bytes())
    del old["completion_logprobs"]
    assert Interaction.model_validate_json(json.dumps(old)).completion_logprobs is None


# ---------------------------------------------------------------------------- preferences


def test_response_ids_carry_their_prompts_tag_and_older_ids_still_parse():
    from rlhf_loop.core.contracts import Message, parse_response_id, prompt_tag

    secret = b"s"
    cats = [Message(role="user", content="Tell me about cats.")]
    tag = prompt_tag(secret, cats)
    assert tag == prompt_tag(secret, [Message(role="user", content="Tell me about cats.")])
    assert tag != prompt_tag(secret, [Message(role="user", content="Tell me about rain.")])
    assert tag != prompt_tag(secret, [Message(role="system", content="Tell me about cats.")])  # roles count
    assert tag != prompt_tag(b"other secret", cats)  # keyed: an id says nothing of its prompt to its holder
    rid = make_response_id(secret, 123456789, 4, tag)  # the longest version and n an id can name
    assert parse_response_id(secret, rid) == (123456789, 4, tag)
    # an id issued before prompts were bound (no p part) is still ours: votes on it work, its prompt is unknown
    assert parse_response_id(secret, make_response_id(secret, 3, 2)) == (3, 2, None)
    # the tag is under the HMAC: another prompt's tag in the same id is a forgery
    other = prompt_tag(secret, [Message(role="user", content="Tell me about rain.")])
    assert parse_response_id(secret, rid.replace(f"p{tag}", f"p{other}")) is None


def test_preference_ids_name_the_unordered_pair_and_voter_and_are_no_vote_ids():
    from rlhf_loop.core.contracts import AnswerRef, preference_id_for

    secret = b"s"
    r1, r2 = sorted([make_response_id(secret), make_response_id(secret)])
    a, b = AnswerRef(response_id=r2, choice_index=1), AnswerRef(response_id=r1)
    pid = preference_id_for(a, b, "key:k/alice")
    assert pid == preference_id_for(b, a, "key:k/alice")  # a flip, or a tie, on the same pair replaces it
    assert pid.startswith(f"{r1}:pref-")  # keyed by the pair's first answer's response id
    assert pid != preference_id_for(a, b, "key:k/bob")
    assert pid != preference_id_for(a, AnswerRef(response_id=r1, choice_index=1), "key:k/alice")
    bound = bind_feedback_id(secret, "key:k", pid, label="preference")
    assert split_feedback_id(bound) == (r1, bound.partition(":")[2])
    assert cast_by(secret, "key:k", bound, label="preference") and not cast_by(secret, "key:other", bound,
                                                                                label="preference")
    assert not cast_by(secret, "key:k", bound)  # not a vote's id: DELETE /v1/feedback/<it> is refused
    assert bind_feedback_id(secret, "key:k", pid) != bound


def test_a_preference_event_is_a_pair_of_two_answers_or_a_tombstone():
    from rlhf_loop.core.contracts import AnswerRef, FeedbackEvent, Preference
    from pydantic import TypeAdapter

    a, b = AnswerRef(response_id="chatcmpl-a-t"), AnswerRef(response_id="chatcmpl-a-t", choice_index=1)
    pref = Preference(preference_id="chatcmpl-a-t:pref-x.y", chosen=b, rejected=a, tie=False, user="u",
                      identity="key:k", voter="key:k/u")
    again = TypeAdapter(FeedbackEvent).validate_json(pref.to_bytes())  # the feedback topic's parser
    assert again == pref and again.key == "chatcmpl-a-t"
    vote = Feedback(feedback_id="chatcmpl-a-t:u.1", response_id="chatcmpl-a-t", rating=1)
    assert TypeAdapter(FeedbackEvent).validate_json(vote.to_bytes()) == vote
    Preference(preference_id="chatcmpl-a-t:pref-x.y", chosen=None, rejected=None, deleted=True)
    for bad in (dict(chosen=a, rejected=a), dict(chosen=a, rejected=None), dict(chosen=None, rejected=None),
                dict(chosen=a, rejected=b, deleted=True)):
        with pytest.raises(ValidationError):
            Preference(preference_id="chatcmpl-a-t:pref-x.y", **bad)
