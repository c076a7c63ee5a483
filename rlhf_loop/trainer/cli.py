"""`rlhf train`: run beside the service, learn from its vote stream, publish better policies.

    rlhf train                       # continuous: a round per RLHF_TRAIN_MIN_LABELS new labels,
                                     #   or after RLHF_TRAIN_MAX_WAIT_S with at least one
    rlhf train --once                # one round on what is stored + what the broker holds now
    rlhf train --ppo.lr 1e-4 ...     # any config field (trainer/config.py; --help lists them)
    rlhf train --nproc 2             # the same on 2 ranks: execs `torchrun --nproc_per_node 2 ... -m rlhf_loop.trainer.cli`
    torchrun --nnodes 2 --nproc_per_node 8 ... -m rlhf_loop.trainer.cli   # many nodes (trainer/dist.py)

Settings (broker, topics, state dir, model) come from RLHF_* variables (core/contracts.py).
SIGTERM or Ctrl-C stops cleanly: between polls at once, mid-round at the next step (the
round is dropped; every stored label stays stored). Under torchrun every rank runs this;
rank 0 alone consumes, stores, publishes and decides when a round starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import time

import torch
import transformers

from kafka.errors import KafkaError

from rlhf_loop.core.broker import ensure_topics
from rlhf_loop.core.contracts import Settings
from rlhf_loop.core.models import count_parameters, ensure_policy_store, resolve_device
from rlhf_loop.core.policy_store import LineageMismatch
from rlhf_loop.trainer import config, dist, metrics, watch
from rlhf_loop.trainer.killpoints import killpoint
from rlhf_loop.trainer.round import run_round
from rlhf_loop.trainer.state import RoundAborted, TrainerState

log = logging.getLogger(__name__)

PRUNE_EVERY_S = 60.0


MMAP_THRESHOLD = 4 * 1024 * 1024  # bytes; blocks from here up are their own mappings (bench/rm_memory.py, bench/train_round.py)


def _give_freed_memory_back() -> None:
    """A fixed glibc mmap threshold (MMAP_THRESHOLD, 4 MiB), so that every large tensor is its own mapping
    and goes back to the system when freed. By default glibc raises the threshold (up to 32 MiB) each time
    a large block is freed, after which blocks of that size come from its heap and stay there: a CPU
    trainer's resident memory then grows to several times what its tensors hold (bench/rm_memory.py: a
    135M LoRA reward-model phase peaks at 4.0 GB by default, 1.4 GB at 4 MiB). Why 4 MiB and not lower:
    every block over the threshold is a fresh mapping, page-faulted in and zeroed when first touched,
    and at 128 KiB that made the embedded model's round ~1.5x slower (bench/train_round.py, 13.4 s
    against 8.8 s) for a few % less memory. Linux with glibc only; elsewhere a no-op. An operator's own
    MALLOC_MMAP_THRESHOLD_ (glibc's variable, read at start) is left as it is."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc (musl, ...): it has no such threshold
        pass


def default_threads(environ) -> int:
    """OMP_NUM_THREADS when it is set (a pod's CPU request: os.cpu_count() would count the whole
    node), else half the CPUs this process may run on, at least 1."""
    if environ.get("OMP_NUM_THREADS", "").strip().isdigit() and int(environ["OMP_NUM_THREADS"]) > 0:
        return int(environ["OMP_NUM_THREADS"])
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, cpus // 2)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="rlhf train", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--once", action="store_true", help="run one round and exit")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars (summary lines only)")
    ap.add_argument("--threads", type=int, default=default_threads(os.environ),
                    help="torch CPU threads (default: OMP_NUM_THREADS if set, as the Kubernetes manifests set it to "
                         "the CPU request; else half the cores this process may run on: the trainer runs beside the "
                         "service, and two processes spinning on the same cores are several times slower than one each)")
    ap.add_argument("--nproc", type=int, default=None,
                    help="run on this many local ranks: re-executes itself under `torchrun --standalone "
                         "--nproc_per_node N --max-restarts 3` (multi-node: call torchrun yourself)")
    config.add_arguments(ap)
    ap.add_argument("--algorithm", dest="train.algorithm", choices=["ppo", "grpo", "rloo", "kto", "dpo"],
                    help="= --train.algorithm (env RLHF_TRAIN_ALGORITHM): how the policy learns from the votes")
    args = ap.parse_args(argv)
    if args.nproc:
        return _exec_torchrun(args.nproc, argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s {_rank_tag()}%(name)s: %(message)s")
    _give_freed_memory_back()
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()  # per-load bars would drown the round lines
    settings = Settings()
    train = config.from_args(args).train  # flags/env only: the process group comes before the model's defaults
    d = dist.init(train.strategy, train.collective_timeout_s)
    try:
        cfg = d.main_only(lambda: resolve_config(args, settings))  # rank 0 writes policy version 0 if the store is new
    except LineageMismatch as e:
        log.error("%s", e)
        return 1
    d = dataclasses.replace(d, strategy=cfg.train.strategy)
    if settings.create_topics and d.is_main:
        ensure_topics(settings)
    state = TrainerState.open(settings, cfg, d)
    if settings.trainer_metrics_port and d.is_main:
        metrics.serve(settings.host, settings.trainer_metrics_port, state.rounds_path, state.store.path)

    def request_stop(signum, _frame):
        log.info("%s: stopping after the current step", signal.Signals(signum).name)
        state.stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        if args.once:
            once(state, progress=not args.no_progress)
        else:
            loop(state, settings, progress=not args.no_progress)
    except RoundAborted:
        log.info("round aborted by the stop request")
    finally:
        state.close()
    killpoint("exit")
    d.close()  # only after a clean end: with a peer gone, tearing the group down can block (torchrun restarts us)
    return 0


def once(state: TrainerState, *, progress: bool) -> None:
    """`--once`: one round per job, also when torchrun restarts the group after the round finished
    (a rank that fails while the ranks leave, say). The job is torchrun's run id; its restarts carry
    TORCHELASTIC_RESTART_COUNT > 0. A restart of a job whose round is stored as done runs nothing."""
    job = os.environ.get("TORCHELASTIC_RUN_ID")
    restarted = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"
    if job and restarted and state.dist.main_only(lambda: state.store.get("once_done") == job):
        if state.dist.is_main:
            log.warning("torchrun restarted this --once job after its round had finished (run %s): "
                        "nothing more to do", job)
        return
    run_round(state, progress=progress)
    if job and state.dist.is_main:
        state.store.set("once_done", job)


def _exec_torchrun(nproc: int, argv: list[str]) -> int:
    """`rlhf train --nproc N ...` -> `torchrun ... -m rlhf_loop.trainer.cli ...` (this process becomes torchrun)."""
    rest, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "--max-restarts=3", "-m", "rlhf_loop.trainer.cli", *rest]
    os.execv(cmd[0], cmd)
    return 1  # not reached


def _rank_tag() -> str:
    """'[rank 1/2] ' under torchrun, so interleaved log lines say whose they are."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f"[rank {os.environ.get('RANK', '0')}/{world}] " if world > 1 else ""


def resolve_config(args: argparse.Namespace, settings: Settings) -> config.TrainerConfig:
    """Flags and RLHF_<SECTION>_<FIELD> over the base model's defaults (its scale, its own rlhf-trainer.json)."""
    base = ensure_policy_store(settings).path(0)
    params = count_parameters(base)
    adapter = config.explicit(args, None, "train", "adapter") or "auto"
    cfg = config.from_args(args, defaults=config.model_defaults(base, params, resolve_device(settings).type, adapter))
    log.info("base model %s: %.1fM parameters -> %s weights, %s, ppo.lr %g, reward.lr %g", settings.model,
             params / 1e6, cfg.train.adapter, cfg.train.algorithm, cfg.ppo.lr, cfg.reward.lr)
    return cfg


def loop(state: TrainerState, settings: Settings, *, progress: bool) -> None:
    """Poll continuously; run a round when enough new labels arrived or waited long enough.

    Rank 0 polls and decides; every iteration (about once a poll timeout, a second) its decision
    goes to every rank, so the others follow it and a lost rank shows within the collective timeout.
    """
    d = state.dist
    clock = {"round": time.monotonic(), "prune": time.monotonic()}
    if d.is_main:
        log.info("waiting for labels: a round per %d new, or after %.0fs with at least one",
                 settings.train_min_labels, settings.train_max_wait_s)
    while not d.any(state.stop.is_set()):
        if d.main_only(lambda: _poll_and_decide(state, settings, clock)):
            try:
                run_round(state, progress=progress, drain_s=0.0)  # this loop has been consuming all along
            except KafkaError as e:  # broker away mid-round: labels stay stored, a publish is finished later
                if d.is_main:
                    log.warning("round dropped: %s; the next one retries", e)
            clock["round"] = time.monotonic()


def budget_spent(state: TrainerState) -> bool:
    """Rank 0: whether the last round found the KL budget spent for what LATEST is now, under the bound
    this trainer runs with (a restart with a larger gate.max_kl, or LATEST moved, reopens it)."""
    spent = state.store.get("budget_spent")
    now = bool(spent) and spent["version"] == state.policy_store.latest() and spent["bound"] >= state.cfg.gate.max_kl
    metrics.budget_spent.set(int(now))
    return now


def _poll_and_decide(state: TrainerState, settings: Settings, clock: dict[str, float]) -> bool:
    """Rank 0: one poll into the label store; True when a round is due."""
    try:
        state.consumer.poll()
    except KafkaError as e:  # broker away: the batch was rewound, try again shortly
        log.warning("consume failed (%s); retrying in 5s", e)
        state.stop.wait(5.0)
        return False
    now = time.monotonic()
    if now - clock["prune"] > PRUNE_EVERY_S:
        state.store.prune()
        clock["prune"] = now
    new = state.new_labels()
    metrics.observe_state(state.version, *state.store.label_stats(), state.consumer.lag())
    for verdict in watch.check(state):  # the live-approval watch: may roll LATEST back
        metrics.observe_watch(verdict)
    if budget_spent(state):
        if not clock.get("told"):
            log.warning("KL budget spent: %s. No rounds until LATEST moves; labels are still stored.",
                        state.store.get("budget_spent")["why"])
            clock["told"] = True
        return False
    clock["told"] = False
    return new >= settings.train_min_labels or (new > 0 and now - clock["round"] >= settings.train_max_wait_s)


if __name__ == "__main__":  # what torchrun runs on every rank (`rlhf train --nproc N`, the TrainJob)
    sys.exit(main(sys.argv[1:]))
