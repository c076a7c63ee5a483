"""`rlhf serve` refuses, in one line and before BentoML starts, what would only fail later:
a port something else holds, and a policy store made from another model than RLHF_MODEL."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from rlhf_loop.core.broker import free_port
from rlhf_loop.core.policy_store import PolicyStore


def serve(tmp_path, *args, **env) -> subprocess.CompletedProcess:
    environ = {**os.environ, "RLHF_STATE_DIR": str(tmp_path / "state"), **env}
    return subprocess.run([sys.executable, "-m", "rlhf_loop", "serve", "--host", "127.0.0.1", *args],
                          env=environ, capture_output=True, text=True, timeout=120)


def test_a_port_in_use_is_named_with_the_flag_that_changes_it(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        out = serve(tmp_path, "--port", str(port), "--admin-port", str(free_port()))
    assert out.returncode == 1
    (line,) = out.stderr.strip().splitlines()
    assert f"port {port} is already in use" in line and "--port" in line
    assert not (tmp_path / "state").exists(), "refused before anything was written"


def test_a_store_of_another_model_is_refused_naming_both(tmp_path, random_model):
    store = PolicyStore(tmp_path / "state" / "policies")
    store.write(0, lambda d: (d / "config.json").write_text(json.dumps({})), parent_version=None, source="tiny-chat")
    model = random_model("llama-tiny")
    out = serve(tmp_path, "--port", str(free_port()), "--admin-port", str(free_port()), RLHF_MODEL=model)
    assert out.returncode == 1
    (line,) = out.stderr.strip().splitlines()
    assert "tiny-chat" in line and model in line and "RLHF_NEW_LINEAGE" in line
    assert store.latest() == 0 and store.versions() == [0]
