"""Run the chat + feedback service: `bentoml serve service.service:ChatService`.

    rlhf serve [--host 0.0.0.0] [--port 3000] [--admin-port 3001]

Settings come from RLHF_* environment variables (core/contracts.py); Kafka is not needed
to start (events wait in the spool). Before BentoML starts, the base model and policy
version 0 are made sure of here, so a first run on a fresh machine shows the embedded
model's build progress (about a minute) instead of a silent, not-ready service.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import httpx

from rlhf_loop.core.contracts import Settings
from rlhf_loop.core.broker import port_in_use
from rlhf_loop.core.policy_store import LineageMismatch, PolicyStore
from rlhf_loop.core.processes import die_with_parent

SERVICE = "rlhf_loop.service.service:ChatService"
# BentoML's working directory, which it puts on sys.path: the directory that holds rlhf_loop (the
# checkout, or site-packages), never rlhf_loop itself, whose layers' names (kernels, service, ...)
# would then shadow other distributions' top-level packages.
ROOT = Path(__file__).resolve().parents[2]


def command(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "bentoml", "serve", SERVICE, "--host", host, "--port", str(port),
            "--working-dir", str(ROOT)]


def environment(settings: Settings, host: str, port: int) -> dict[str, str]:
    """The service's environment: ours, plus a BentoML home of its own.

    BentoML keeps its Prometheus multiprocess directory under BENTOML_HOME and wipes it at
    start, so two services on one host (tests, a benchmark next to a demo) must not share one.
    """
    env = {**os.environ, "RLHF_HOST": host, "RLHF_PORT": str(port),
           "BENTOML_DO_NOT_TRACK": "true", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    env.setdefault("BENTOML_HOME", str(settings.state_dir / "bentoml" / f"{host}-{port}"))
    return env


def spawn(host: str, port: int, env: dict[str, str], log: IO[bytes] | int = subprocess.DEVNULL) -> subprocess.Popen:
    """Start `rlhf serve` as a child in its own process group (stop it with os.killpg) — for
    whatever brings the service up next to other things: `rlhf up`, the tests, bench/serve.py."""
    return subprocess.Popen([sys.executable, "-m", "rlhf_loop.service.serve", "--host", host, "--port", str(port)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=die_with_parent)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Block until `url`/readyz answers 200 (a policy is loaded); raise if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the service exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout:.0f}s")


def terminate(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Stop a `spawn`ed service: SIGTERM to its process group (BentoML shuts down gracefully, the
    spool keeps what Kafka has not taken), SIGKILL after `timeout`, then any stragglers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # workers a killed arbiter left behind
    except ProcessLookupError:
        pass


def main(argv: list[str]) -> int:
    settings = Settings()
    ap = argparse.ArgumentParser(prog="rlhf serve", description=__doc__.splitlines()[0])
    ap.add_argument("--host", default=settings.host)
    ap.add_argument("--port", type=int, default=settings.port)
    ap.add_argument("--admin-port", type=int, default=settings.admin_port)
    args = ap.parse_args(argv)

    for port, flag in ((args.port, "--port (RLHF_PORT)"), (args.admin_port, "--admin-port (RLHF_ADMIN_PORT)")):
        if port_in_use(args.host, port):
            print(f"error: port {port} is already in use on {args.host}: stop what holds it, or pass {flag}",
                  file=sys.stderr)
            return 1
    store = PolicyStore(settings.policy_dir)
    try:
        store.check_source(settings.model_source, new_lineage=settings.new_lineage)
    except LineageMismatch as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if store.latest() is None:  # a fresh machine: build the embedded model (if it is the one), write v0
        from rlhf_loop.core.models import ensure_policy_store  # imports torch: only when needed, starts stay quick

        store = ensure_policy_store(settings)
    print(f"policy store {store.root}: LATEST = v{store.latest()}; serving on http://{args.host}:{args.port}, "
          f"admin API on port {args.admin_port}", flush=True)
    cmd = command(args.host, args.port)
    env = {**environment(settings, args.host, args.port), "RLHF_ADMIN_PORT": str(args.admin_port)}
    os.execve(cmd[0], cmd, env)  # signals go straight to bentoml


if __name__ == "__main__":  # what `spawn` runs
    sys.exit(main(sys.argv[1:]))
