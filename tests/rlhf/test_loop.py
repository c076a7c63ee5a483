"""The loop end to end, shortened: real broker, `bentoml serve`, `rlhf train`, simulated users.

bench/loop.py is the full run (2,000 votes / 15 minutes) with the issue's targets; this
asserts only the direction: the served policy's approval rose over its own baseline,
with no failed chat request.
"""

import json
import os
import shutil

from rlhf.loop import LoopConfig, run
from rlhf.simulate import SimConfig


def test_approval_rises_when_users_vote(tmp_path, base_model_dir, monkeypatch):
    # the embedded model is already built for the session; the loop finds it in its cache
    (tmp_path / "models").mkdir()
    shutil.copytree(base_model_dir, tmp_path / "models" / os.path.basename(base_model_dir))
    cfg = LoopConfig(
        state_dir=tmp_path, port=0, train_min_labels=96, train_max_wait_s=30,
        sim=SimConfig(taste="cheerful", noise=0.1, users=8, concurrency=3, rate=8.0,
                      max_votes=400, max_seconds=180),
    )
    summary, png, js = run(cfg)
    assert png.stat().st_size > 10_000 and json.loads(js.read_text())["votes"] == summary["votes"]
    assert summary["chat_errors"] == 0, summary["chat_error_samples"]
    assert summary["promoted"] >= 1, summary["rounds"]
    by = summary["approval_by_version"]
    assert by["0"]["votes"] >= 50
    assert summary["final_version"] > 0, by
    assert summary["approval_gain"] > 0.1, by
