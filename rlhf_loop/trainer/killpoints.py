"""Named points where the kill test stops the trainer (tests/trainer/test_kill.py).

    RLHF_TRAINER_PAUSE_AT=publish:staged rlhf train --once

When the trainer reaches the named point it prints `PAUSED AT <name>` on stdout (then its
rank and pid) and sleeps until it is killed, so the test can SIGKILL it exactly there
instead of guessing timings. Under torchrun, RLHF_TRAINER_PAUSE_RANK picks the one rank
that pauses (the others go on until a collective waits for it), and only the first attempt
pauses: the group torchrun restarts after the kill runs through. Unset (always, outside the
kill tests) a kill point is one dictionary lookup.

Points: consume:applied (inside the SQLite transaction of a poll), consume:stored (SQLite
committed, Kafka offsets not yet), round:trained (after PPO, before the gate),
publish:staged (version files written in tmp/, not renamed), publish:written (version in
place and LATEST moved, not yet announced on Kafka), exit (the work done and stored, the
process group not yet closed).
"""

from __future__ import annotations

import os
import time

ENV = "RLHF_TRAINER_PAUSE_AT"
RANK_ENV = "RLHF_TRAINER_PAUSE_RANK"


def killpoint(name: str) -> None:
    if os.environ.get(ENV) != name:
        return
    rank = os.environ.get("RANK", "0")
    if os.environ.get(RANK_ENV, rank) != rank or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    print(f"PAUSED AT {name} rank={rank} pid={os.getpid()}", flush=True)
    while True:
        time.sleep(3600)
