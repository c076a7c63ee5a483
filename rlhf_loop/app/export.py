"""`rlhf export`: the trainer's labels as a dataset the Hugging Face `datasets` library loads, for
offline training and audits.

    rlhf export --out DIR                                  # every live vote and preference, a row each
    rlhf export --out DIR --since 2025-06-01 --version 3   # labels since then, on version 3's answers
    rlhf export --out DIR --include-withdrawn              # withdrawn ones too (withdrawn=true)
    python -c 'import datasets; print(datasets.load_dataset("DIR"))'     # config "ratings", split "train"
    python -c 'import datasets; print(datasets.load_dataset("DIR", "preferences"))'

It reads the trainer's label store (<state dir>/trainer/labels.sqlite) read-only, safely beside a
running trainer (trainer/store.py, connect_read_only), and writes DIR/ratings.jsonl.gz (thumbs),
DIR/preferences.jsonl.gz (which of two answers is better) and DIR/README.md: a dataset card whose
YAML front matter names the configs, their files and features, with what the rows hold, how they
were made and how many there are. A config without rows is left out. DIR is written beside its
place and renamed into it, so it is either the whole export or absent.

Voters are pseudonyms: `voter-<HMAC-SHA256(salt, voter)>` with a salt drawn at random for each
export and never written anywhere. So one voter's rows share an id within an export (enough to
count voters and audit one voter's influence), while the id reveals nothing of the identity (an API
key's hash, a client address's hash, a key's user) and cannot be joined across exports or back to
the store. The text itself (prompts, answers, comments) is what users and the model wrote, as is.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import hmac
import json
import secrets
import sqlite3
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml

from rlhf_loop.app.staging import staged
from rlhf_loop.core.contracts import Settings
from rlhf_loop.trainer.config import RewardConfig
from rlhf_loop.trainer.store import Label, PreferencePair, connect_read_only, read_labels, read_preferences

STORE_FILE = "labels.sqlite"  # under Settings.trainer_dir (trainer/state.py opens the same file)


class ExportError(Exception):
    """What keeps an export from being written: printed as one line."""


@dataclass(frozen=True)
class ExportConfig:
    """One export: where from, where to, which labels."""

    out: Path
    """The dataset directory to write: new, or empty."""
    state_dir: Path
    """The state dir whose trainer/labels.sqlite is read (RLHF_STATE_DIR, as every command; default .rlhf)."""
    since: datetime | None = None
    """Only labels cast (or withdrawn) at or after this time, by the vote's (preference's) event time;
    timezone-aware."""
    version: int | None = None
    """Only votes on answers that this policy version wrote, and preferences with an answer it wrote."""
    include_withdrawn: bool = False
    """Also withdrawn votes and preferences whose tombstone the store still keeps (the trainer's dedupe
    window): withdrawn=true, rating (tie) null, weight 0. Off by default: a withdrawn one is not a label."""
    max_voter_share: float = RewardConfig.max_voter_share
    """The influence cap the rows' `weight` is computed with (trainer/store.py voter_weights over every
    live label, whatever the filters); the trainer's reward.max_voter_share by default."""

    def __post_init__(self) -> None:
        if self.since is not None and self.since.tzinfo is None:
            raise ValueError("since must be timezone-aware")
        if self.version is not None and self.version < 0:
            raise ValueError(f"--version must be a policy version (0 or more), got {self.version}")
        if not 0.0 < self.max_voter_share <= 1.0:
            raise ValueError(f"--max-voter-share must be in (0, 1], got {self.max_voter_share}")


@dataclass(frozen=True)
class Part:
    """One config of the exported dataset: its rows in one file, their features as the card declares them
    (the `datasets` YAML form: {name, dtype} or {name, list: [...]} for a list of structs)."""

    name: str
    file: str
    features: list[dict]
    about: str
    tally: Callable[[list[dict]], dict[str, int]]  # rows -> what the card and the command count of them, by name
    versions: Callable[[dict], set[int]]  # a row -> the policy versions it counts under (its answers')


_TIME = "timestamp[us, tz=UTC]"
_MESSAGES = {"name": "prompt", "list": [{"name": "role", "dtype": "string"}, {"name": "content", "dtype": "string"}]}

RATINGS = Part(
    name="ratings",
    file="ratings.jsonl.gz",
    features=[
        _MESSAGES,
        {"name": "answer", "dtype": "string"},
        {"name": "rating", "dtype": "int8"},
        {"name": "weight", "dtype": "float64"},
        {"name": "withdrawn", "dtype": "bool"},
        {"name": "policy_version", "dtype": "int64"},
        {"name": "voted_at", "dtype": _TIME},
        {"name": "answered_at", "dtype": _TIME},
        {"name": "voter_id", "dtype": "string"},
        {"name": "comment", "dtype": "string"},
        {"name": "response_id", "dtype": "string"},
        {"name": "choice_index", "dtype": "int64"},
    ],
    about="one row per vote (thumbs up/down) on one answer: the prompt (chat messages), the answer, "
          "`rating` +1/-1, `weight` the vote's weight under the trainer's influence cap (1 below it), "
          "the policy version that wrote the answer, when the vote was cast and the answer written, "
          "the voter's pseudonym, the voter's comment, and the answer's response id and choice index",
    tally=lambda rows: {"up": sum(r["rating"] == 1 for r in rows), "down": sum(r["rating"] == -1 for r in rows)},
    versions=lambda row: {row["policy_version"]},
)

PREFERENCES = Part(
    name="preferences",
    file="preferences.jsonl.gz",
    features=[
        _MESSAGES,
        {"name": "chosen", "dtype": "string"},
        {"name": "rejected", "dtype": "string"},
        {"name": "tie", "dtype": "bool"},
        {"name": "weight", "dtype": "float64"},
        {"name": "withdrawn", "dtype": "bool"},
        {"name": "chosen_policy_version", "dtype": "int64"},
        {"name": "rejected_policy_version", "dtype": "int64"},
        {"name": "voted_at", "dtype": _TIME},
        {"name": "voter_id", "dtype": "string"},
        {"name": "comment", "dtype": "string"},
        {"name": "chosen_response_id", "dtype": "string"},
        {"name": "chosen_choice_index", "dtype": "int64"},
        {"name": "rejected_response_id", "dtype": "string"},
        {"name": "rejected_choice_index", "dtype": "int64"},
    ],
    about="one row per preference between two answers to one prompt (POST /v1/preferences): the prompt, "
          "the `chosen` answer and the `rejected` one (with `tie`, neither is better: they are just the pair), "
          "`weight` under the influence cap (votes and preferences count together), the policy versions that "
          "wrote each, when it was stated, the voter's pseudonym and comment, and each answer's response id "
          "and choice index (TRL's preference columns: prompt, chosen, rejected)",
    tally=lambda rows: {"ties": sum(bool(r["tie"]) for r in rows)},
    versions=lambda row: {row["chosen_policy_version"], row["rejected_policy_version"]},
)

PARTS = (RATINGS, PREFERENCES)  # every config an export writes, the first the default


def pseudonym(salt: bytes, voter: str) -> str:
    """`voter-<16 hex>`: the voter's HMAC-SHA256 under this export's salt (64 bits: no collision among
    any realistic number of voters)."""
    return "voter-" + hmac.new(salt, voter.encode(), hashlib.sha256).hexdigest()[:16]


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat()


def rating_row(label: Label, salt: bytes) -> dict:
    """One label as a row of RATINGS (its features, in their order)."""
    return {
        "prompt": label.messages,
        "answer": label.completion,
        "rating": None if label.rating is None else int(label.rating),
        "weight": label.weight,
        "withdrawn": label.withdrawn,
        "policy_version": label.policy_version,
        "voted_at": _iso(label.voted_at),
        "answered_at": _iso(label.answered_at),
        "voter_id": pseudonym(salt, label.voter),
        "comment": label.comment,
        "response_id": label.response_id,
        "choice_index": label.choice_index,
    }


def preference_row(p: PreferencePair, salt: bytes) -> dict:
    """One preference as a row of PREFERENCES (its features, in their order). A withdrawn one keeps its pair
    as last stated, and its tie is null (a withdrawal states no choice, as a withdrawn vote has no rating)."""
    return {
        "prompt": p.messages,
        "chosen": p.chosen.completion,
        "rejected": p.rejected.completion,
        "tie": None if p.withdrawn else p.tie,
        "weight": p.weight,
        "withdrawn": p.withdrawn,
        "chosen_policy_version": p.chosen.policy_version,
        "rejected_policy_version": p.rejected.policy_version,
        "voted_at": _iso(p.stated_at),
        "voter_id": pseudonym(salt, p.voter),
        "comment": p.comment,
        "chosen_response_id": p.chosen.response_id,
        "chosen_choice_index": p.chosen.choice_index,
        "rejected_response_id": p.rejected.response_id,
        "rejected_choice_index": p.rejected.choice_index,
    }


def kept(cfg: ExportConfig, at: float, versions: set[int]) -> bool:
    """Whether `cfg`'s filters keep a label cast at `at` on answers of `versions` (withdrawn ones were left
    out by the read already, unless asked for)."""
    return (cfg.since is None or at >= cfg.since.timestamp()) and (cfg.version is None or cfg.version in versions)


def collect(db: sqlite3.Connection, cfg: ExportConfig, salt: bytes) -> dict[str, list[dict]]:
    """Part name -> its rows, read in one snapshot of the store (one read transaction for both reads)."""
    db.execute("BEGIN")
    try:
        labels = read_labels(db, cfg.max_voter_share, include_withdrawn=cfg.include_withdrawn)
        preferences = read_preferences(db, cfg.max_voter_share, include_withdrawn=cfg.include_withdrawn)
    finally:
        db.execute("COMMIT")
    return {
        RATINGS.name: [rating_row(x, salt) for x in labels if kept(cfg, x.voted_at, {x.policy_version})],
        PREFERENCES.name: [preference_row(p, salt) for p in preferences
                           if kept(cfg, p.stated_at, {p.chosen.policy_version, p.rejected.policy_version})],
    }


def counts(part: Part, rows: list[dict]) -> dict:
    """What the card and the command's last lines report about a part's rows: rows, voters, the part's
    tally (up / down, or ties), withdrawn, and rows by policy version (a preference under each of its
    answers' versions)."""
    versions: dict[int, int] = {}
    for r in rows:
        for v in part.versions(r):
            versions[v] = versions.get(v, 0) + 1
    return {
        "rows": len(rows),
        "voters": len({r["voter_id"] for r in rows}),
        **part.tally(rows),
        "withdrawn": sum(r["withdrawn"] for r in rows),
        "by_policy_version": dict(sorted(versions.items())),
    }


def summary(part: Part, c: dict) -> str:
    """`<tally>, <n> withdrawn` of counts(): e.g. "2 up, 2 down, 0 withdrawn", "1 ties, 0 withdrawn"."""
    return ", ".join(f"{c[k]} {k}" for k in [*part.tally([]), "withdrawn"])


def written(rows: dict[str, list[dict]]) -> list[Part]:
    """The parts an export writes: those with rows (`datasets` cannot load a config whose files hold none)."""
    return [p for p in PARTS if rows[p.name]]


def card(cfg: ExportConfig, rows: dict[str, list[dict]], made: datetime) -> str:
    """The dataset card, README.md: YAML front matter that `datasets.load_dataset(DIR)` reads (the written
    parts as configs, the first the default, with their files and features), then what the dataset holds
    and how it was made. (Split sizes are in the text: the YAML's would need Arrow's byte counts too.)"""
    parts = written(rows)
    meta = {
        "license": "other",
        "pretty_name": "rlhf-loop labels",
        "tags": ["rlhf", "human-feedback"],
        "configs": [{"config_name": p.name, "data_files": [{"split": "train", "path": p.file}],
                     **({"default": True} if p is parts[0] else {})} for p in parts],
        "dataset_info": [{"config_name": p.name, "features": p.features} for p in parts],
    }
    filters = [f"labels cast at or after {cfg.since.isoformat()}" if cfg.since else "",
               f"answers of policy version {cfg.version} (a preference: either answer)" if cfg.version is not None
               else "",
               "withdrawn votes and preferences included (withdrawn=true, rating / tie null, weight 0)"
               if cfg.include_withdrawn else "withdrawn votes left out, and withdrawn preferences"]
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
        "# rlhf-loop labels", "",
        "What users of an rlhf-loop service said about its answers, as its trainer stored them: "
        f"exported {made.isoformat(timespec='seconds')} by `rlhf export` from the trainer's label store "
        "(read-only, one consistent snapshot).", "",
        "```python", "import datasets",
        *(f'{p.name} = datasets.load_dataset("<this directory>"{"" if p is parts[0] else f", {p.name!r}"})["train"]'
          for p in parts), "```", "",
        "## Contents", "",
    ]
    for p in parts:
        c = counts(p, rows[p.name])
        versions = ", ".join(f"v{v}: {n}" for v, n in c["by_policy_version"].items())
        lines += [f"- `{p.name}` ({p.file}): {p.about}.",
                  f"  {c['rows']} rows from {c['voters']} voters: {summary(p, c)}; by policy version: {versions}."]
    lines += [
        "", "## How it was made", "",
        "- Filters: " + "; ".join(f for f in filters if f) + ".",
        "- A row is a vote joined to the answer it is about, or a preference joined to both its answers; "
        "those still waiting for an answer are not labels yet and are left out. A voter's later vote on the "
        "same answer replaced the earlier one, and a later preference on the same two answers (either way "
        "round, or a tie) the earlier one.",
        f"- `weight`: the trainer's influence cap (max_voter_share {cfg.max_voter_share}) over every live label "
        "in the store: no API key (or client address) carries more than that share, nor a key's user more "
        "than that share of its key's. The trainer's per-answer rating is the weighted mean.",
        "- `voter_id` is a pseudonym: an HMAC-SHA256 of the voter under a random salt drawn for this export "
        "and not kept. The same voter has the same id within this export only; it reveals nothing of the "
        "API key, client address or user name, and cannot be joined with another export.",
        "- Times are UTC: `voted_at` is when the vote or preference (or its withdrawal) was cast, `answered_at` "
        "when the answer was written (null for answers stored before the store kept it).",
        "- A withdrawn preference keeps its pair as last stated; its `tie` is null.",
        "", "## License and personal data", "",
        "`license: other`: the prompts, answers and comments are what this deployment's users and model "
        "wrote, as they wrote them, and may hold personal data; their terms are the deployment's. "
        "Pseudonymous voter ids are not anonymity: review the text before sharing it.", "",
    ]
    return "\n".join(lines)


def write(out: Path, rows: dict[str, list[dict]], card_text: str) -> None:
    """Every part's rows as gzipped JSON lines and the card, written in a directory beside `out`, then
    renamed into place: `out` is the whole export or nothing."""
    with staged(out) as stage:
        for p in written(rows):
            with gzip.open(stage / p.file, "wt", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[p.name])
        (stage / "README.md").write_text(card_text, encoding="utf-8")


def export(cfg: ExportConfig) -> dict[str, dict]:
    """Write the export `cfg` describes; returns each part's counts."""
    if cfg.out.is_file() or (cfg.out.is_dir() and any(cfg.out.iterdir())):
        raise ExportError(f"--out {cfg.out} exists and is not an empty directory")
    path = Settings(state_dir=cfg.state_dir).trainer_dir / STORE_FILE
    if not path.is_file():
        raise ExportError(f"no label store at {path} (has a trainer run with --state-dir {cfg.state_dir}?)")
    try:
        db = connect_read_only(path)
        try:
            rows = collect(db, cfg, secrets.token_bytes(32))
        finally:
            db.close()
    except sqlite3.Error as e:
        raise ExportError(f"cannot read the label store {path}: {e}") from e
    if not written(rows):
        raise ExportError(f"no labels in {path} match (0 rows): nothing written")
    write(cfg.out, rows, card(cfg, rows, datetime.now(timezone.utc)))
    return {p.name: counts(p, rows[p.name]) for p in PARTS}


def parse_since(text: str) -> datetime:
    """ISO 8601 date or time; without a zone it is UTC."""
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since {text!r} is not an ISO 8601 date or time (e.g. 2025-06-01 or 2025-06-01T12:00Z)") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="rlhf export", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", type=Path, required=True, metavar="DIR", help="the dataset directory (new or empty)")
    ap.add_argument("--state-dir", type=Path, metavar="DIR", help="the state dir (default: RLHF_STATE_DIR, else .rlhf)")
    ap.add_argument("--since", metavar="TIME",
                    help="only votes and preferences cast at or after this ISO 8601 time (UTC if no zone)")
    ap.add_argument("--version", type=int, metavar="N",
                    help="only votes on answers policy version N wrote, preferences with such an answer")
    ap.add_argument("--include-withdrawn", action="store_true",
                    help="also withdrawn votes and preferences (withdrawn=true, no rating / tie)")
    ap.add_argument("--max-voter-share", type=float, default=RewardConfig.max_voter_share, metavar="SHARE",
                    help="the influence cap the `weight` column uses (default: the trainer's, %(default)s)")
    args = ap.parse_args(argv)
    try:
        cfg = ExportConfig(out=args.out, state_dir=args.state_dir or Settings().state_dir,
                           since=None if args.since is None else parse_since(args.since), version=args.version,
                           include_withdrawn=args.include_withdrawn, max_voter_share=args.max_voter_share)
    except ValueError as e:
        print(f"rlhf export: error: {e}", file=sys.stderr)
        return 2
    try:
        report = export(cfg)
    except ExportError as e:
        print(f"rlhf export: error: {e}", file=sys.stderr)
        return 1
    for part in PARTS:
        c = report[part.name]
        versions = ", ".join(f"v{v}: {n}" for v, n in c["by_policy_version"].items()) or "none"
        print(f"{part.name}: {c['rows']} rows, {c['voters']} voters, {summary(part, c)} (by policy version: {versions})")
    print(f'wrote {cfg.out}: datasets.load_dataset("{cfg.out}")')
    return 0
