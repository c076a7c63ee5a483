"""`rlhf up` and Ctrl-C: a real run (broker, `bentoml serve`, `rlhf train`, simulated users) interrupted
the way a terminal does it, SIGINT to the foreground process group, once the users are voting.

    .venv/bin/python -m pytest -q tests/rlhf/test_up.py
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from rlhf_loop.core.broker import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_ctrl_c_stops_every_part_with_a_line_each_and_no_traceback(tmp_path, base_model_dir):
    state = tmp_path / "demo"
    (state / "models").mkdir(parents=True)  # the session's built model: the run finds it in its cache
    shutil.copytree(base_model_dir, state / "models" / os.path.basename(base_model_dir))
    port = free_port()
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhf_loop", "up", "--state-dir", str(state), "--port", str(port), "--votes", "5000",
         "--round-labels", "8", "--rate", "4"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        # as a terminal starts it: Ctrl-C not ignored (a shell's background job, like `make test &`, would
        # hand SIG_IGN down, and Python then installs no KeyboardInterrupt handler)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    try:
        for line in proc.stdout:  # until the users have started
            lines.append(line)
            if line.startswith("simulated users ("):
                break
        service_log, deadline = state / "logs" / "service.log", time.monotonic() + 60
        while "path=/v1/feedback" not in service_log.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)  # until they vote
        time.sleep(1)  # conversations in flight when Ctrl-C comes
        os.killpg(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = "".join(lines) + rest
    assert proc.returncode == 130, out
    assert "Traceback" not in out and "Exception" not in out, out
    stopped = [line for line in out.splitlines() if line.startswith("stopped ")]
    assert stopped == ["stopped simulated users", "stopped trainer", "stopped service", "stopped broker"], out
    assert out.rstrip().endswith("Ctrl-C: everything shut down."), out
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the service still listens"
    assert "path=/v1/feedback" in (state / "logs" / "service.log").read_text(), "the users were voting by then"
