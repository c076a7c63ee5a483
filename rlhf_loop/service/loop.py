"""What the loop page (/loop, static/loop.html) shows, gathered for GET /v1/loop (service/api.py).

    board = ReplicaBoard(settings, versions).start()     # this replica's line on the shared board
    view = await loop_view(settings, board)               # every replica, the trainer's rounds and approval

Two sources, neither of them the trainer's code (the service never imports it):
- **The replica board**: every replica writes what it serves (version, pin, LATEST as it read it)
  to `<policy store>/replicas/<name>.json` every `policy_poll_s`, and removes it when it stops.
  The policy store is the one volume every replica and the trainer already share, so any
  replica can tell the page what all of them serve; a replica that died without removing its
  line shows its last report's age. `name` is `<hostname>:<port>` (a pod's name in Kubernetes).
- **The trainer's loop report** (core/loop_report.py): GET /loop on the trainer's metrics port,
  RLHF_TRAINER_URL, relayed as it is (validated against the shared model). Without the setting,
  or with the trainer away, the page says so and shows the replicas alone.
docs/service.md, "The loop page", says why this and not the alternatives.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import anyio
import httpx
from pydantic import ValidationError

from rlhf_loop.core.contracts import Settings
from rlhf_loop.core.loop_report import LoopReport
from rlhf_loop.service.schemas import LoopView, ReplicaServing, TrainerStatus
from rlhf_loop.service.versions import VersionManager

log = logging.getLogger(__name__)

TRAINER_TIMEOUT_S = 3.0  # the page polls every few seconds; a trainer busier than this is shown as away


def board_dir(settings: Settings) -> Path:
    return settings.policy_dir / "replicas"


class ReplicaBoard:
    """This replica's line on the board, rewritten every `policy_poll_s` by a daemon thread."""

    def __init__(self, settings: Settings, versions: VersionManager):
        self.dir = board_dir(settings)
        self.name = f"{socket.gethostname()}:{settings.port}"
        self.versions = versions
        self.period_s = settings.policy_poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="replica-board", daemon=True)

    def start(self) -> "ReplicaBoard":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.path.unlink(missing_ok=True)  # stopped on purpose: no longer a replica

    @property
    def path(self) -> Path:
        return self.dir / f"{self.name}.json"

    def now(self) -> ReplicaServing:
        """What this replica serves at this moment."""
        current = self.versions.current
        return ReplicaServing(name=self.name, serving=None if current is None else current.version,
                              pinned=self.versions.pinned, latest=self.versions.store.latest(), seen=time.time())

    def _run(self) -> None:
        while True:
            try:
                self._write(self.now())
            except OSError as e:  # a store away for a moment: the line goes stale, the replica serves on
                log.warning("cannot write this replica's line on the board %s: %s", self.dir, e)
            if self._stop.wait(self.period_s):
                return

    def _write(self, line: ReplicaServing) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{self.name}.{uuid.uuid4().hex}.tmp"
        tmp.write_text(line.model_dump_json())
        os.replace(tmp, self.path)  # readers see the old line or the new one, never half of one


def read_board(directory: Path, own: ReplicaServing) -> list[ReplicaServing]:
    """Every replica's last line, this one's (`own`) as it is now, by name. A line that does not parse (being
    replaced on a file system without atomic rename) is left out of this answer."""
    lines = {own.name: own.model_copy(update={"answering": True})}
    for path in sorted(directory.glob("*.json")) if directory.exists() else []:
        try:
            line = ReplicaServing.model_validate_json(path.read_bytes())
        except (OSError, ValidationError):
            continue
        lines.setdefault(line.name, line)
    return sorted(lines.values(), key=lambda r: r.name)


async def trainer_report(url: str) -> tuple[TrainerStatus, LoopReport | None]:
    """The trainer's GET /loop, or why there is none."""
    if not url:
        return TrainerStatus(status="not_configured", detail="RLHF_TRAINER_URL is not set on this replica"), None
    try:
        async with httpx.AsyncClient(timeout=TRAINER_TIMEOUT_S) as client:
            resp = await client.get(f"{url.rstrip('/')}/loop")
        resp.raise_for_status()
        return TrainerStatus(status="ok"), LoopReport.model_validate_json(resp.content)
    except httpx.HTTPError as e:
        return TrainerStatus(status="unreachable", detail=f"{type(e).__name__}: {e}"), None
    except (ValidationError, json.JSONDecodeError) as e:
        return TrainerStatus(status="unreachable", detail=f"the trainer's answer is not a loop report: {e}"), None


async def loop_view(settings: Settings, board: ReplicaBoard) -> LoopView:
    status, report = await trainer_report(settings.trainer_url)
    replicas = await anyio.to_thread.run_sync(lambda: read_board(board.dir, board.now()))  # files, maybe on NFS
    return LoopView(replicas=replicas, trainer=status,
                    rounds=report.rounds if report else [], approval=report.approval if report else [])
