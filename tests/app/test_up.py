"""`rlhf up` stopped: a real run (broker, `bentoml serve`, `rlhf train`, simulated users) interrupted the
way a terminal does it (Ctrl-C: SIGINT to the foreground process group) once the users are voting, or
the way `timeout` and process managers do (SIGTERM to `rlhf up` alone), or killed outright (SIGKILL):
every time, nothing it started is left running. Stopped while the users vote, it first saves and prints
the run so far, as at the end.

    .venv/bin/python -m pytest -q tests/app/test_up.py
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from rlhf_loop.app.simulate import SimConfig
from rlhf_loop.core.broker import free_port

ROOT = Path(__file__).resolve().parents[2]


def start_up(tmp_path, base_model_dir, port: int) -> subprocess.Popen:
    state = tmp_path / "demo"
    (state / "models").mkdir(parents=True)  # the session's built model: the run finds it in its cache
    shutil.copytree(base_model_dir, state / "models" / os.path.basename(base_model_dir))
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "rlhf_loop", "up", "--state-dir", str(state), "--port", str(port), "--votes", "5000",
         "--round-labels", "8", "--rate", "4"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        # as a terminal starts it: Ctrl-C not ignored (a shell's background job, like `make test &`, would
        # hand SIG_IGN down, and Python then installs no KeyboardInterrupt handler)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def loop_view(port: int) -> dict:
    """GET /v1/loop with the demo's API key."""
    resp = httpx.get(f"http://127.0.0.1:{port}/v1/loop", headers={"Authorization": f"Bearer {SimConfig.api_key}"},
                     timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_ctrl_c_saves_the_run_so_far_and_stops_every_part_with_a_line_each(tmp_path, base_model_dir):
    port = free_port()
    proc = start_up(tmp_path, base_model_dir, port)
    state = tmp_path / "demo"
    lines = []
    try:
        for line in proc.stdout:  # until the users have started
            lines.append(line)
            if line.startswith("simulated users ("):
                break
        service_log, deadline = state / "logs" / "service.log", time.monotonic() + 60
        while "path=/v1/feedback" not in service_log.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)  # until they vote
        # the loop page's data: the service relays the trainer's GET /loop (RLHF_TRAINER_URL set by `up`)
        while (loop := loop_view(port))["trainer"]["status"] != "ok" and time.monotonic() < deadline + 60:
            time.sleep(0.5)
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
    # the run so far: summarized, printed and saved as at the end, and marked as stopped
    summary = json.loads((state / "summary.json").read_text())
    assert summary["interrupted"] == "SIGINT" and summary["votes"] > 0, summary["votes"]
    assert sum(row["votes"] for row in summary["approval_by_version"].values()) == summary["votes"]
    assert (state / "learning_curve.png").stat().st_size > 0
    assert "approval by policy version so far:\n  v0: " in out and f"learning curve: {state / 'learning_curve.png'}" in out, out
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the service still listens"
    assert "path=/v1/feedback" in (state / "logs" / "service.log").read_text(), "the users were voting by then"
    assert loop["trainer"]["status"] == "ok", loop
    assert [(r["serving"], r["answering"]) for r in loop["replicas"]] == [(0, True)], loop


def test_sigterm_to_rlhf_up_alone_stops_every_part_as_ctrl_c_does(tmp_path, base_model_dir):
    """`timeout 100 rlhf up` sends SIGTERM to rlhf up only (its parts are in sessions of their own): it stops
    them as Ctrl-C does, one line each, exit 128 + 15. SIGHUP takes the same path (app/up.py)."""
    port = free_port()
    proc = start_up(tmp_path, base_model_dir, port)
    try:
        out = []
        for line in proc.stdout:  # until the users have started
            out.append(line)
            if line.startswith("simulated users ("):
                break
        parts = psutil.Process(proc.pid).children(recursive=True)
        assert len(parts) >= 3, out  # the broker, the service (and its workers), the trainer
        os.kill(proc.pid, signal.SIGTERM)
        rest, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = "".join(out) + rest
    assert proc.returncode == 128 + signal.SIGTERM, text
    assert "Traceback" not in text, text
    stopped = [line for line in text.splitlines() if line.startswith("stopped ")]
    assert stopped == ["stopped simulated users", "stopped trainer", "stopped service", "stopped broker"], text
    assert text.rstrip().endswith("SIGTERM: everything shut down."), text
    _, alive = psutil.wait_procs(parts, timeout=60)
    assert not alive, [p.cmdline()[:4] for p in alive]
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the service still listens"


def test_a_part_whose_parent_is_killed_outright_stops_too(tmp_path):
    """SIGKILL cannot be handled: the kernel sends each part SIGTERM when the process that started it dies
    (core/processes.py). Shown on `rlhf broker`, whose broker child is started as `rlhf up` starts its
    broker, service and trainer (the same preexec_fn)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_loop", "broker", "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().startswith("broker ready"), "the broker did not start"
        (child,) = psutil.Process(proc.pid).children()
        proc.kill()
        proc.wait()
        gone, _ = psutil.wait_procs([child], timeout=30)
        assert gone, "the broker outlived the process that started it"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_taken_port_is_named_in_one_line_with_the_flag_that_changes_it(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "rlhf_loop", "up", "--state-dir", str(tmp_path / "demo"),
                              "--port", str(port)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    (line,) = [l for l in out.stderr.splitlines() if l.strip()]
    assert f"port {port} is already in use" in line and "--port" in line
