"""The trainer's durable example store: SQLite (WAL, synchronous=FULL) in <trainer_dir>/labels.sqlite.

Votes and responses are joined here, not in memory: a vote that arrives before its response
waits in `votes` until the interaction lands (or `late_vote_window_s` passes), and a label is
simply a row of the join. Everything one Kafka poll brings is applied in ONE transaction,
together with the consumer's own record of the next offset per partition; the consumer
commits offsets to Kafka only after that transaction committed (docs/trainer.md, "join and
commit protocol"). Redelivered messages are recognised by `event_id` and do nothing.

Preferences (a voter's "this answer is better than that one", both to one prompt) wait in
`preferences` the same way, for BOTH their answers' interactions; a preference is a label once
both are stored (`preferences()`), with the same late window, dedupe and latest-per-id rule.

Aggregation: a response's label is every user's latest non-deleted vote on it (one vote per
`feedback_id`, which by default is one per user and choice). The example's `rating` is the
mean rating and `n_votes` its count, so the pointwise logistic loss on the up-vote fraction
weighted by `n_votes` equals the sum of one loss per vote.

Influence cap, on two levels that follow the service's trust model (docs/service.md, "Vote
caps"), over votes and preferences together (each one label): no identity (an API key, or a client address without keys: the event's `identity`)
carries more than `max_voter_share` of the labels a round trains on, and inside an identity no
voter (a key's user: the event's `voter`) carries more than that share of the identity's. So a
key inventing users gets no more than its share, and no voter more than the share of the
round. Votes over a cap are down-weighted (`voter_weights`), so `rating` is then the weighted
mean and `n_votes` the weighted count.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass, replace
from pathlib import Path

from rlhf_loop.core.contracts import Feedback, Interaction, Preference
from rlhf_loop.core.loop_report import ApprovalPoint, VersionApproval
from rlhf_loop.trainer.killpoints import killpoint

SCHEMA = """
CREATE TABLE IF NOT EXISTS interactions (
    response_id TEXT NOT NULL, choice_index INTEGER NOT NULL,
    event_id TEXT NOT NULL, prompt_key TEXT NOT NULL, completion TEXT NOT NULL,
    completion_tokens INTEGER NOT NULL, policy_version INTEGER NOT NULL, finish_reason TEXT NOT NULL,
    received REAL NOT NULL,
    answered REAL,                                 -- the answer's event time (Interaction.ts)
    completion_token_ids TEXT,                     -- JSON list; NULL in rows from before behaviour log-probs
    completion_logprobs TEXT,                      -- JSON list, one per token id; NULL when the event had none
    temperature REAL, top_p REAL,                  -- the sampling that made those log-probs' distribution
    PRIMARY KEY (response_id, choice_index)
);
CREATE TABLE IF NOT EXISTS votes (               -- latest event per feedback_id; tombstones kept as deleted=1
    feedback_id TEXT PRIMARY KEY, response_id TEXT NOT NULL, choice_index INTEGER NOT NULL,
    user TEXT, rating REAL, deleted INTEGER NOT NULL, ts REAL NOT NULL, event_id TEXT NOT NULL,
    received REAL NOT NULL, seq INTEGER NOT NULL,  -- seq: when this vote last changed or got joined
    voter TEXT,                                    -- the voter the influence cap counts (Feedback.voter or user)
    identity TEXT,                                 -- who cast it (Feedback.identity); NULL before identities
    comment TEXT                                   -- Feedback.comment
);
CREATE INDEX IF NOT EXISTS votes_by_response ON votes (response_id, choice_index);
CREATE INDEX IF NOT EXISTS votes_by_seq ON votes (seq);
CREATE TABLE IF NOT EXISTS preferences (         -- latest event per preference_id; tombstones kept as deleted=1
    preference_id TEXT PRIMARY KEY,
    chosen_response_id TEXT, chosen_choice INTEGER,       -- a tombstone keeps its preference's (NULL if none came)
    rejected_response_id TEXT, rejected_choice INTEGER,
    tie INTEGER NOT NULL, user TEXT, voter TEXT, identity TEXT, deleted INTEGER NOT NULL,
    ts REAL NOT NULL, event_id TEXT NOT NULL, received REAL NOT NULL,
    seq INTEGER NOT NULL,                                 -- in the votes' sequence: when it changed or got joined
    comment TEXT                                          -- Preference.comment
);
CREATE INDEX IF NOT EXISTS preferences_by_chosen ON preferences (chosen_response_id, chosen_choice);
CREATE INDEX IF NOT EXISTS preferences_by_rejected ON preferences (rejected_response_id, rejected_choice);
CREATE INDEX IF NOT EXISTS preferences_by_seq ON preferences (seq);
CREATE TABLE IF NOT EXISTS prompts (prompt_key TEXT PRIMARY KEY, messages TEXT NOT NULL, last_seen REAL NOT NULL);
CREATE TABLE IF NOT EXISTS seen_events (event_id TEXT PRIMARY KEY, received REAL NOT NULL);
CREATE TABLE IF NOT EXISTS dead_letters (
    topic TEXT NOT NULL, partition INTEGER NOT NULL, "offset" INTEGER NOT NULL, value_sha256 TEXT NOT NULL,
    reason TEXT NOT NULL, received REAL NOT NULL,
    PRIMARY KEY (topic, partition, "offset", value_sha256)
);
CREATE TABLE IF NOT EXISTS consumed_offsets (     -- the consumer's own record: offset after the last stored batch
    topic TEXT NOT NULL, partition INTEGER NOT NULL, next_offset INTEGER NOT NULL, updated REAL NOT NULL,
    PRIMARY KEY (topic, partition)
);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
# Columns a store made by an earlier release lacks (they are in SCHEMA for new stores). A writable
# store gains them on open (NULL in the rows stored before); a read-only reader sees them as NULL.
ADDED_COLUMNS = {
    "votes": {"voter": "TEXT", "identity": "TEXT", "comment": "TEXT"},
    "interactions": {"answered": "REAL", "completion_token_ids": "TEXT", "completion_logprobs": "TEXT",
                     "temperature": "REAL", "top_p": "REAL"},
    "preferences": {"comment": "TEXT"},
}
# Tables a store made by an earlier release lacks: a writable store gains them on open (SCHEMA's
# CREATE ... IF NOT EXISTS); a read-only reader sees them empty (connect_read_only).
ADDED_TABLES = ("preferences",)


@dataclass(frozen=True)
class Behaviour:
    """What the serving policy did for one answer (Interaction.completion_logprobs): the tokens it drew and each
    one's log-prob under the distribution it was drawn from, made by `temperature` and `top_p` (temperature 0:
    greedy, and the log-probs are the raw log-softmax, at temperature 1; docs/service.md, "Log-probs")."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    temperature: float
    top_p: float


@dataclass(frozen=True)
class Example:
    """One labelled response: the prompt, what the policy answered, and what users thought."""

    response_id: str
    choice_index: int
    prompt_key: str
    messages: list[dict]  # the prompt, [{"role", "content"}, ...]
    completion: str
    rating: float  # (weighted) mean of the votes' ratings (+1 / -1 for thumbs)
    n_votes: float  # (weighted) number of votes: below their count when a voter was over the cap
    policy_version: int = 0  # the version that answered
    behaviour: Behaviour | None = None  # its log-probs under that version; None for events from before them


@dataclass(frozen=True)
class Label:
    """One vote joined to the answer it is about (what `rlhf export` writes, a row each); a response's
    Example aggregates its labels."""

    response_id: str
    choice_index: int
    prompt_key: str
    messages: list[dict]  # the prompt, [{"role", "content"}, ...]
    completion: str
    policy_version: int  # the version that answered
    rating: float | None  # +1 / -1 for thumbs; None for a withdrawn vote (a tombstone keeps no rating)
    weight: float  # the vote's weight under the influence cap (voter_weights): 1 below it; 0 if withdrawn
    voter: str  # whom the cap counts (VOTER): identity-derived, so an export pseudonymizes it
    voted_at: float  # the vote's (or its withdrawal's) event time, unix seconds
    answered_at: float | None  # the answer's event time; None for answers stored before it was kept
    comment: str | None
    withdrawn: bool
    behaviour: "Behaviour | None" = None  # the answer's log-probs under the version that wrote it (not exported)


@dataclass(frozen=True)
class Answer:
    """One answer of a preference pair."""

    response_id: str
    choice_index: int
    completion: str
    policy_version: int  # the version that wrote it
    behaviour: Behaviour | None = None  # its log-probs under that version; None for events from before them


@dataclass(frozen=True)
class PreferencePair:
    """One voter's preference between two stored answers to one prompt (read_preferences: what the trainer
    trains on, and `rlhf export` writes, a row each): `chosen` is better than `rejected`, or, with `tie`,
    neither is."""

    preference_id: str
    prompt_key: str
    messages: list[dict]  # the prompt, [{"role", "content"}, ...]
    chosen: Answer
    rejected: Answer
    tie: bool
    weight: float  # the influence cap's weight: 1, less when its voter is over the cap (voter_weights); 0 if withdrawn
    voter: str  # whom the cap counts (as Label.voter): identity-derived, so an export pseudonymizes it
    stated_at: float  # the preference's (or its withdrawal's) event time, unix seconds
    comment: str | None
    withdrawn: bool

    def as_examples(self) -> tuple[Example, Example]:
        """The chosen answer as a liked one and the rejected as a disliked one, each of the preference's
        weight (KTO's use of pairwise data: unpaired desirable and undesirable answers)."""
        return tuple(Example(a.response_id, a.choice_index, self.prompt_key, self.messages, a.completion, rating,
                             self.weight, a.policy_version, a.behaviour)
                     for a, rating in ((self.chosen, 1.0), (self.rejected, -1.0)))


@dataclass(frozen=True)
class DeadLetterKey:
    topic: str
    partition: int
    offset: int
    value_sha256: str
    reason: str


@dataclass
class BatchResult:
    interactions: int = 0
    votes: int = 0
    preferences: int = 0
    duplicates: int = 0
    stale: int = 0  # older than the stored vote (preference) for the same feedback_id (preference_id)
    dead_letters: int = 0


VOTER = "COALESCE(v.voter, v.feedback_id)"  # a vote without a voter is its own voter
IDENTITY = f"COALESCE(v.identity, {VOTER})"  # a vote from before identities is its voter's own identity
JOINED_VOTE = "JOIN interactions i ON v.response_id = i.response_id AND v.choice_index = i.choice_index"
# a preference is joined when both its answers are stored, and they answer one prompt (the service checked it)
JOINED_PREFERENCE = (
    "JOIN interactions c ON c.response_id = p.chosen_response_id AND c.choice_index = p.chosen_choice "
    "JOIN interactions r ON r.response_id = p.rejected_response_id AND r.choice_index = p.rejected_choice "
    "AND r.prompt_key = c.prompt_key")
PREFERENCE_VOTER = "COALESCE(p.voter, p.preference_id)"  # as VOTER
PREFERENCE_IDENTITY = "COALESCE(p.identity, p.voter, p.preference_id)"  # as IDENTITY
# (identity, voter) of every live label, a row each: votes joined to their answer, preferences to both
LIVE_LABEL_VOTERS = (f"SELECT {IDENTITY}, {VOTER} FROM votes v {JOINED_VOTE} WHERE v.deleted = 0 UNION ALL "
                     f"SELECT {PREFERENCE_IDENTITY}, {PREFERENCE_VOTER} FROM preferences p {JOINED_PREFERENCE} "
                     "WHERE p.deleted = 0")
PAIR_COLUMNS = ("chosen_response_id", "chosen_choice", "rejected_response_id", "rejected_choice")
SEQ = "(SELECT MAX(m) FROM (SELECT MAX(seq) AS m FROM votes UNION ALL SELECT MAX(seq) FROM preferences))"


def capped_level(totals: list[float], cap: float) -> float:
    """The largest level T such that cutting every total above T down to T leaves none above `cap`
    of the sum: T = cap x sum(min(t, T)) (water-filling). inf when no total is above the cap. With
    fewer than 1 / cap totals no such T exists; then every total is cut to the smallest (all count
    equally, as close to the cap as their number allows).

    With the totals sorted, t_1 <= ... <= t_n, and the k smallest below T, T = cap x (t_1 + ... + t_k)
    / (1 - cap x (n - k)): the first k for which that T is at most t_(k+1) is the answer.
    """
    totals = sorted(totals)
    n = len(totals)
    if totals[-1] <= cap * sum(totals):
        return float("inf")
    if n * cap < 1:
        return totals[0]
    below = 0.0  # t_1 + ... + t_k
    for k, t in enumerate(totals[:-1]):
        if cap * (n - k) < 1 and cap * below / (1 - cap * (n - k)) <= t:
            return cap * below / (1 - cap * (n - k))
        below += t
    return cap * below / (1 - cap)  # only the largest is cut (at most t_n, since t_n > cap x the sum)


def voter_weights(votes: list[tuple[str, str]], cap: float) -> dict[tuple[str, str], float]:
    """(identity, voter) of every vote -> the weight of each of that voter's votes, so that no identity
    carries more than `cap` of the total weight and, inside an identity, no voter more than `cap` of
    the identity's (capped_level at each level: inside each identity over its voters' counts, then
    over the identities' capped totals). A voter then carries at most `cap` of the total whenever
    its identity does, or its identity has at least 1 / cap voters. Fewer than 1 / cap identities
    (or voters inside one) cannot meet the cap: they count equally instead.
    """
    counts: dict[tuple[str, str], int] = {}
    for v in votes:
        counts[v] = counts.get(v, 0) + 1
    if cap >= 1.0:
        return {v: 1.0 for v in counts}
    by_identity: dict[str, dict[str, int]] = {}
    for (identity, voter), c in counts.items():
        by_identity.setdefault(identity, {})[voter] = c
    inner: dict[tuple[str, str], float] = {}
    totals: dict[str, float] = {}
    for identity, voters in by_identity.items():
        level = capped_level(list(voters.values()), cap)
        inner.update({(identity, voter): min(1.0, level / c) for voter, c in voters.items()})
        totals[identity] = sum(min(c, level) for c in voters.values())
    level = capped_level(list(totals.values()), cap) if totals else float("inf")
    return {(i, v): w * min(1.0, level / totals[i]) for (i, v), w in inner.items()}


def _missing_columns(db: sqlite3.Connection) -> dict[str, list[str]]:
    """table -> the ADDED_COLUMNS it lacks (a store from an earlier release; tables it has)."""
    out = {}
    for table, added in ADDED_COLUMNS.items():
        have = {r[1] for r in db.execute(f"PRAGMA main.table_info({table})")}
        if have and (missing := [c for c in added if c not in have]):
            out[table] = missing
    return out


def _table_sql(table: str) -> str:
    """SCHEMA's CREATE TABLE statement of `table`."""
    start = SCHEMA.index(f"CREATE TABLE IF NOT EXISTS {table} (")
    return SCHEMA[start:SCHEMA.index(");", start) + 1]


def connect_read_only(path: Path) -> sqlite3.Connection:
    """The store at `path` opened for reading only, beside a trainer that writes it (`rlhf export`).

    SQLite's read-only mode: nothing can be written and a missing file is an error, not a new store.
    In WAL mode a reader sees the last committed batch and neither blocks the writer nor waits for
    it; one SELECT, or the reads inside one BEGIN ... COMMIT (read_labels and read_preferences each read
    twice: rows, then label_weights), is one consistent snapshot. A store from an earlier release reads as if it had
    gained ADDED_COLUMNS (NULL) and ADDED_TABLES (empty): temporary views and tables of the same names
    shadow (or stand in for) its tables, for this connection only.
    """
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30.0)
    for table in ADDED_TABLES:
        if not db.execute(f"PRAGMA main.table_info({table})").fetchall():
            db.execute(_table_sql(table).replace("CREATE TABLE IF NOT EXISTS", "CREATE TEMP TABLE", 1))
    for table, missing in _missing_columns(db).items():
        nulls = ", ".join(f"NULL AS {c}" for c in missing)
        db.execute(f"CREATE TEMP VIEW {table} AS SELECT *, {nulls} FROM main.{table}")
    return db


def label_weights(db: sqlite3.Connection, max_voter_share: float) -> dict[tuple[str, str], float]:
    """(identity, voter) -> the weight of each of its labels: voter_weights over every live label, votes
    and preferences together (each one label)."""
    return voter_weights(db.execute(LIVE_LABEL_VOTERS).fetchall(), max_voter_share)


def read_labels(db: sqlite3.Connection, max_voter_share: float = 1.0, *, include_withdrawn: bool = False) -> list[Label]:
    """Every vote joined to its answer (votes still waiting for theirs are not labels yet), by
    (response id, choice, feedback id), weighted so that no voter carries more than `max_voter_share`
    of the live labels (label_weights). Withdrawn votes (tombstones still kept: `dedupe_window_s`)
    only with `include_withdrawn`, with no rating and weight 0. `db`: LabelStore.db or
    connect_read_only's."""
    rows = db.execute(
        "SELECT i.response_id, i.choice_index, i.prompt_key, p.messages, i.completion, i.policy_version, "
        f"v.rating, {IDENTITY}, {VOTER}, v.ts, i.answered, v.comment, v.deleted, "
        "i.completion_token_ids, i.completion_logprobs, i.temperature, i.top_p "
        "FROM interactions i JOIN votes v ON v.response_id = i.response_id AND v.choice_index = i.choice_index "
        "JOIN prompts p ON p.prompt_key = i.prompt_key WHERE v.deleted = 0 OR ? "
        "ORDER BY i.response_id, i.choice_index, v.feedback_id", (include_withdrawn,)
    ).fetchall()
    weight = label_weights(db, max_voter_share)
    return [Label(rid, choice, key, json.loads(messages), completion, version, rating,
                  0.0 if deleted else weight[(identity, voter)], voter, ts, answered, comment, bool(deleted),
                  _behaviour(*behaviour))
            for (rid, choice, key, messages, completion, version, rating, identity, voter, ts, answered, comment,
                 deleted, *behaviour) in rows]


BEHAVIOUR_COLUMNS = ("completion_token_ids", "completion_logprobs", "temperature", "top_p")  # _behaviour's


def read_preferences(db: sqlite3.Connection, max_voter_share: float = 1.0, *,
                     include_withdrawn: bool = False) -> list[PreferencePair]:
    """Every preference joined to both its answers (waiting for either: not a label yet), by preference id,
    weighted as read_labels' votes (label_weights: votes and preferences count together). Withdrawn ones
    (tombstones still kept, which keep their pair) only with `include_withdrawn`, with weight 0. `db`:
    LabelStore.db or connect_read_only's."""
    answer = ", ".join(f"{{t}}.{c}" for c in ("response_id", "choice_index", "completion", "policy_version",
                                              *BEHAVIOUR_COLUMNS))
    rows = db.execute(
        f"SELECT p.preference_id, c.prompt_key, m.messages, {answer.format(t='c')}, {answer.format(t='r')}, p.tie, "
        f"{PREFERENCE_IDENTITY}, {PREFERENCE_VOTER}, p.ts, p.comment, p.deleted "
        f"FROM preferences p {JOINED_PREFERENCE} JOIN prompts m ON m.prompt_key = c.prompt_key "
        "WHERE p.deleted = 0 OR ? ORDER BY p.preference_id", (include_withdrawn,)
    ).fetchall()
    weight = label_weights(db, max_voter_share)
    out = []
    for pid, key, messages, *answers, tie, identity, voter, ts, comment, deleted in rows:
        out.append(PreferencePair(pid, key, json.loads(messages), _answer(*answers[:8]), _answer(*answers[8:]),
                                  bool(tie), 0.0 if deleted else weight[(identity, voter)], voter, ts, comment,
                                  bool(deleted)))
    return out


def _answer(response_id: str, choice_index: int, completion: str, policy_version: int, *behaviour) -> Answer:
    return Answer(response_id, choice_index, completion, policy_version, _behaviour(*behaviour))


def _behaviour(token_ids: str | None, logprobs: str | None, temperature: float | None,
               top_p: float | None) -> Behaviour | None:
    """An interactions row's behaviour columns -> Behaviour, or None where the event carried no log-probs."""
    if logprobs is None:
        return None
    return Behaviour(tuple(json.loads(token_ids)), tuple(json.loads(logprobs)), temperature, top_p)


def prompt_key(messages: list[dict]) -> str:
    canonical = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


class LabelStore:
    def __init__(self, path: Path, *, late_vote_window_s: float, dedupe_window_s: float, prompt_pool_size: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.late_vote_window_s = late_vote_window_s
        self.dedupe_window_s = dedupe_window_s
        self.prompt_pool_size = prompt_pool_size
        self.db = sqlite3.connect(path, isolation_level=None, timeout=30.0)  # explicit BEGIN/COMMIT below
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a committed batch survives power loss, not just a crash
        self.db.executescript(SCHEMA)
        for table, missing in _missing_columns(self.db).items():
            for column in missing:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {ADDED_COLUMNS[table][column]}")

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------------ writes

    def apply_batch(
        self,
        events: list[Interaction | Feedback | Preference],
        next_offsets: dict[tuple[str, int], int],
        dead_letters: list[DeadLetterKey] = (),
        now: float | None = None,
    ) -> BatchResult:
        """Apply one poll's events, record its dead letters and next offsets: all or nothing."""
        now = time.time() if now is None else now
        result = BatchResult()
        cur = self.db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            for event in events:
                if cur.execute("INSERT OR IGNORE INTO seen_events VALUES (?, ?)", (str(event.event_id), now)).rowcount == 0:
                    result.duplicates += 1
                elif isinstance(event, Interaction):
                    result.interactions += self._apply_interaction(cur, event, now)
                elif isinstance(event, Preference):
                    applied = self._apply_preference(cur, event, now)
                    result.preferences += applied
                    result.stale += 1 - applied
                else:
                    applied = self._apply_feedback(cur, event, now)
                    result.votes += applied
                    result.stale += 1 - applied
            killpoint("consume:applied")  # inside the transaction: a kill here must store nothing
            for d in dead_letters:
                result.dead_letters += cur.execute(
                    "INSERT OR IGNORE INTO dead_letters VALUES (?, ?, ?, ?, ?, ?)",
                    (d.topic, d.partition, d.offset, d.value_sha256, d.reason, now),
                ).rowcount
            cur.executemany(
                "INSERT OR REPLACE INTO consumed_offsets VALUES (?, ?, ?, ?)",
                [(t, p, o, now) for (t, p), o in next_offsets.items()],
            )
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        return result

    def _next_seq(self, cur: sqlite3.Cursor) -> int:
        """One sequence for votes and preferences: the trigger counts both as labels (label_count)."""
        return cur.execute(f"SELECT COALESCE({SEQ}, 0) + 1").fetchone()[0]

    def _apply_interaction(self, cur: sqlite3.Cursor, ev: Interaction, now: float) -> int:
        messages = [m.model_dump() for m in ev.messages]
        key = prompt_key(messages)
        logprobs = None if ev.completion_logprobs is None else json.dumps(ev.completion_logprobs)
        inserted = cur.execute(
            "INSERT OR IGNORE INTO interactions (response_id, choice_index, event_id, prompt_key, completion, "
            "completion_tokens, policy_version, finish_reason, received, answered, completion_token_ids, "
            "completion_logprobs, temperature, top_p) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (ev.response_id, ev.choice_index, str(ev.event_id), key, ev.completion,
             len(ev.completion_token_ids), ev.policy_version, ev.finish_reason, now, ev.ts.timestamp(),
             json.dumps(ev.completion_token_ids), logprobs, ev.sampling.temperature, ev.sampling.top_p),
        ).rowcount
        cur.execute(
            "INSERT INTO prompts VALUES (?, ?, ?) ON CONFLICT (prompt_key) DO UPDATE SET last_seen = excluded.last_seen",
            (key, json.dumps(messages, ensure_ascii=False), now),
        )
        if inserted:  # votes (preferences) that waited for this answer become labels now: new to the trigger
            seq = self._next_seq(cur)
            cur.execute("UPDATE votes SET seq = ? WHERE response_id = ? AND choice_index = ?",
                        (seq, ev.response_id, ev.choice_index))
            cur.execute("UPDATE preferences SET seq = ? WHERE (chosen_response_id = ? AND chosen_choice = ?) "
                        "OR (rejected_response_id = ? AND rejected_choice = ?)",
                        (seq, ev.response_id, ev.choice_index, ev.response_id, ev.choice_index))
        return inserted

    def _apply_feedback(self, cur: sqlite3.Cursor, ev: Feedback, now: float) -> int:
        """Upsert the vote (or its tombstone) unless a newer event for this feedback_id is stored."""
        ts = ev.ts.timestamp()
        row = cur.execute("SELECT ts FROM votes WHERE feedback_id = ?", (ev.feedback_id,)).fetchone()
        if row is not None and row[0] > ts:
            return 0
        cur.execute(
            "INSERT OR REPLACE INTO votes (feedback_id, response_id, choice_index, user, rating, deleted, ts, event_id, "
            "received, seq, voter, identity, comment) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (ev.feedback_id, ev.response_id, ev.choice_index, ev.user,
             None if ev.deleted else float(ev.rating), int(ev.deleted), ts, str(ev.event_id), now, self._next_seq(cur),
             ev.voter or ev.user, ev.identity, ev.comment),
        )
        return 1

    def _apply_preference(self, cur: sqlite3.Cursor, ev: Preference, now: float) -> int:
        """Upsert the preference (or its tombstone) unless a newer event for this preference_id is stored."""
        ts = ev.ts.timestamp()
        row = cur.execute("SELECT ts FROM preferences WHERE preference_id = ?", (ev.preference_id,)).fetchone()
        if row is not None and row[0] > ts:
            return 0
        c, r = ev.chosen, ev.rejected
        # a tombstone names no pair: it keeps the stored one's, so the withdrawal joins (and counts as a change)
        keep = ", ".join(f"{col} = COALESCE(excluded.{col}, {col})" for col in PAIR_COLUMNS)
        fresh = ", ".join(f"{col} = excluded.{col}" for col in (
            "tie", "user", "voter", "identity", "deleted", "ts", "event_id", "received", "seq", "comment"))
        cur.execute(
            "INSERT INTO preferences (preference_id, chosen_response_id, chosen_choice, rejected_response_id, "
            "rejected_choice, tie, user, voter, identity, deleted, ts, event_id, received, seq, comment) "
            f"VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (preference_id) DO UPDATE SET {keep}, "
            f"{fresh}",
            (ev.preference_id, c and c.response_id, c and c.choice_index, r and r.response_id, r and r.choice_index,
             int(ev.tie), ev.user, ev.voter or ev.user, ev.identity, int(ev.deleted), ts, str(ev.event_id), now,
             self._next_seq(cur), ev.comment),
        )
        return 1

    def prune(self, now: float | None = None) -> dict[str, int]:
        """Bound the state: expire votes (preferences) that waited too long for their response (either
        answer), responses nobody voted on or compared within the window, old tombstones and dedupe
        records, surplus prompts."""
        now = time.time() if now is None else now
        late, dedupe = now - self.late_vote_window_s, now - self.dedupe_window_s
        cur = self.db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            out = {
                "expired_votes": cur.execute(
                    "DELETE FROM votes WHERE received < ? AND NOT EXISTS (SELECT 1 FROM interactions i WHERE "
                    "i.response_id = votes.response_id AND i.choice_index = votes.choice_index)", (late,)).rowcount,
                "expired_preferences": cur.execute(
                    "DELETE FROM preferences WHERE deleted = 0 AND received < ? AND preference_id NOT IN "
                    f"(SELECT p.preference_id FROM preferences p {JOINED_PREFERENCE})", (late,)).rowcount,
                "unvoted_interactions": cur.execute(
                    "DELETE FROM interactions WHERE received < ? AND NOT EXISTS (SELECT 1 FROM votes v WHERE "
                    "v.response_id = interactions.response_id AND v.choice_index = interactions.choice_index) "
                    "AND NOT EXISTS (SELECT 1 FROM preferences p WHERE (p.chosen_response_id = "
                    "interactions.response_id AND p.chosen_choice = interactions.choice_index) OR "
                    "(p.rejected_response_id = interactions.response_id AND p.rejected_choice = "
                    "interactions.choice_index))", (late,)).rowcount,
                "tombstones": cur.execute("DELETE FROM votes WHERE deleted = 1 AND received < ?", (dedupe,)).rowcount
                + cur.execute("DELETE FROM preferences WHERE deleted = 1 AND received < ?", (dedupe,)).rowcount,
                "seen_events": cur.execute("DELETE FROM seen_events WHERE received < ?", (dedupe,)).rowcount,
                "dead_letters": cur.execute("DELETE FROM dead_letters WHERE received < ?", (dedupe,)).rowcount,
                "prompts": cur.execute(
                    "DELETE FROM prompts WHERE prompt_key NOT IN (SELECT prompt_key FROM prompts "
                    "ORDER BY last_seen DESC LIMIT ?) AND prompt_key NOT IN (SELECT prompt_key FROM interactions)",
                    (self.prompt_pool_size,)).rowcount,
            }
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        return out

    def set(self, key: str, value) -> None:
        self.db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (key, json.dumps(value)))

    # ------------------------------------------------------------------ reads

    def get(self, key: str, default=None):
        row = self.db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def known_dead_letter(self, d: DeadLetterKey) -> bool:
        return self.db.execute(
            'SELECT 1 FROM dead_letters WHERE topic = ? AND partition = ? AND "offset" = ? AND value_sha256 = ?',
            (d.topic, d.partition, d.offset, d.value_sha256),
        ).fetchone() is not None

    def examples(self, max_voter_share: float = 1.0) -> list[Example]:
        """The thumbs of labels(): every labelled response."""
        return self.labels(max_voter_share)[0]

    def preferences(self, max_voter_share: float = 1.0) -> list[PreferencePair]:
        """The preferences of labels()."""
        return self.labels(max_voter_share)[1]

    def labels(self, max_voter_share: float = 1.0) -> tuple[list[Example], list[PreferencePair]]:
        """Every labelled response (joined, with at least one non-deleted vote), by response id (a fixed
        order for a given set of labels, whatever the arrival timing): its labels (read_labels) aggregated;
        and every live preference whose two answers are stored, by preference id (read_preferences). Votes
        and preferences are weighted together so that no voter carries more than `max_voter_share` of them
        (label_weights)."""
        out: list[Example] = []
        for x in read_labels(self.db, max_voter_share):
            if out and (out[-1].response_id, out[-1].choice_index) == (x.response_id, x.choice_index):
                prev = out[-1]
                n = prev.n_votes + x.weight
                out[-1] = replace(prev, rating=(prev.rating * prev.n_votes + x.rating * x.weight) / n, n_votes=n)
            else:
                out.append(Example(x.response_id, x.choice_index, x.prompt_key, x.messages, x.completion, x.rating,
                                   x.weight, x.policy_version, x.behaviour))
        return out, read_preferences(self.db, max_voter_share)

    def approval_by_version(self) -> dict[int, tuple[int, int]]:
        """policy version -> (up-votes, down-votes): every live vote on a response that version gave."""
        return {v: (up, down) for v, up, down in self.db.execute(
            "SELECT i.policy_version, SUM(v.rating > 0), SUM(v.rating < 0) FROM votes v JOIN interactions i ON "
            "v.response_id = i.response_id AND v.choice_index = i.choice_index WHERE v.deleted = 0 "
            "GROUP BY i.policy_version")}

    def voter_counts(self) -> dict[tuple[str, str], int]:
        """(identity, voter) -> live joined votes and preferences (votes without a voter count as their own voter
        each)."""
        return {(identity, voter): n for identity, voter, n in self.db.execute(
            f"SELECT *, COUNT(*) FROM ({LIVE_LABEL_VOTERS}) GROUP BY 1, 2")}

    def label_count(self, since_seq: int = 0) -> int:
        """Joined votes and preferences (tombstones included: a withdrawal changes the labels) changed after
        `since_seq`."""
        return (self.db.execute(f"SELECT COUNT(*) FROM votes v {JOINED_VOTE} WHERE v.seq > ?", (since_seq,)).fetchone()[0]
                + self.db.execute(f"SELECT COUNT(*) FROM preferences p {JOINED_PREFERENCE} WHERE p.seq > ?",
                                  (since_seq,)).fetchone()[0])

    def label_seq(self) -> int:
        return self.db.execute(f"SELECT COALESCE({SEQ}, 0)").fetchone()[0]

    def votes(self) -> dict[str, float]:
        """feedback_id -> rating of every live (non-deleted) vote that joined a response."""
        return dict(self.db.execute(
            "SELECT v.feedback_id, v.rating FROM votes v JOIN interactions i ON v.response_id = i.response_id "
            "AND v.choice_index = i.choice_index WHERE v.deleted = 0").fetchall())

    def label_stats(self) -> tuple[int, float | None]:
        """(labels: live votes joined to their response and live preferences joined to both answers, event time of
        the newest vote or preference stored or None)."""
        labels = (self.db.execute(f"SELECT COUNT(*) FROM votes v {JOINED_VOTE} WHERE v.deleted = 0").fetchone()[0]
                  + self.db.execute(f"SELECT COUNT(*) FROM preferences p {JOINED_PREFERENCE} WHERE p.deleted = 0")
                  .fetchone()[0])
        newest = self.db.execute("SELECT MAX(ts) FROM (SELECT MAX(ts) AS ts FROM votes WHERE deleted = 0 "
                                 "UNION ALL SELECT MAX(ts) FROM preferences WHERE deleted = 0)").fetchone()[0]
        return labels, newest

    def preference_ids(self) -> dict[str, tuple[tuple[str, int], tuple[str, int], bool]]:
        """preference_id -> ((chosen response id, choice), (rejected ...), tie) of every live preference stored,
        joined or not."""
        return {pid: ((c, ci), (r, ri), bool(tie)) for pid, c, ci, r, ri, tie in self.db.execute(
            "SELECT preference_id, chosen_response_id, chosen_choice, rejected_response_id, rejected_choice, tie "
            "FROM preferences WHERE deleted = 0")}

    def pending_votes(self) -> int:
        return self.db.execute(
            "SELECT COUNT(*) FROM votes v WHERE v.deleted = 0 AND NOT EXISTS (SELECT 1 FROM interactions i "
            "WHERE i.response_id = v.response_id AND i.choice_index = v.choice_index)").fetchone()[0]

    def prompts(self) -> list[tuple[str, list[dict]]]:
        """(prompt_key, messages) of the prompt pool, ordered by key (a stable pseudo-random order)."""
        return [(k, json.loads(m)) for k, m in self.db.execute("SELECT prompt_key, messages FROM prompts ORDER BY prompt_key")]

    def consumed_offsets(self) -> dict[tuple[str, int], int]:
        """(topic, partition) -> the offset after the last batch stored from it. For inspection: the
        consumer's position comes from Kafka's committed offsets, so after a broker that lost its
        data (tansu restarts empty) reading starts over and the event_id dedupe keeps labels exact."""
        return {(t, p): o for t, p, o in self.db.execute("SELECT topic, partition, next_offset FROM consumed_offsets")}


# ---------------------------------------------------------------------------- approval over time (the loop page)


def read_approval(path: Path, buckets: int) -> list[VersionApproval]:
    """Approval by version over time from the store at `path`, on a connection of its own (connect_read_only):
    the metrics server's thread asks while the trainer's thread writes. No store yet: no votes."""
    if not path.exists():
        return []
    db = connect_read_only(path)
    try:
        rows = db.execute(
            "SELECT i.policy_version, v.ts, v.rating FROM votes v JOIN interactions i ON v.response_id = i.response_id "
            "AND v.choice_index = i.choice_index WHERE v.deleted = 0 ORDER BY v.ts").fetchall()
    finally:
        db.close()
    return approval_points(rows, buckets)


def approval_points(rows: list[tuple[int, float, float]], buckets: int) -> list[VersionApproval]:
    """(policy_version, vote event time, rating) rows, oldest first -> each version's cumulative (up, down)
    at the end of each of `buckets` equal spans of the votes' time range in which its count changed,
    and at the last span's end (so every version's line runs to the newest vote). The same votes as
    `LabelStore.approval_by_version` (live, joined), so the page shows what the live-approval watch judges."""
    if not rows:
        return []
    t0, t1 = rows[0][1], rows[-1][1]
    width = (t1 - t0) / buckets or 1.0  # all at one instant: one span
    counts: dict[int, list[int]] = {}  # version -> [up, down] so far
    points: dict[int, list[ApprovalPoint]] = {}

    def close_bucket(k: int, versions: set[int]) -> None:
        for v in versions:
            points[v].append(ApprovalPoint(time=t0 + width * (k + 1), up=counts[v][0], down=counts[v][1]))

    k, changed = 0, set()
    for version, ts, rating in rows:
        kk = min(int((ts - t0) / width), buckets - 1)
        if kk != k:
            close_bucket(k, changed)
            k, changed = kk, set()
        c = counts.setdefault(version, [0, 0])
        points.setdefault(version, [])
        c[0 if rating > 0 else 1] += 1
        changed.add(version)
    close_bucket(k, set(counts))  # every version ends at the newest vote's span
    return [VersionApproval(version=v, up=counts[v][0], down=counts[v][1], points=points[v]) for v in sorted(counts)]
