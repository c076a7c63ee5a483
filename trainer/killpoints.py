"""Named points where the kill test stops the trainer (tests/trainer/test_kill.py).

    RLHF_TRAINER_PAUSE_AT=publish:staged rlhf train --once

When the trainer reaches the named point it prints `PAUSED AT <name>` on stdout and sleeps
until it is killed, so the test can SIGKILL it exactly there instead of guessing timings.
Unset (always, outside that test) a kill point is one dictionary lookup.

Points: consume:applied (inside the SQLite transaction of a poll), consume:stored (SQLite
committed, Kafka offsets not yet), round:trained (after PPO, before the gate),
publish:staged (version files written in tmp/, not renamed), publish:written (version in
place and LATEST moved, not yet announced on Kafka).
"""

from __future__ import annotations

import os
import time

ENV = "RLHF_TRAINER_PAUSE_AT"


def killpoint(name: str) -> None:
    if os.environ.get(ENV) == name:
        print(f"PAUSED AT {name}", flush=True)
        while True:
            time.sleep(3600)
