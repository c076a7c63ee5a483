"""`rlhf train`: run beside the service, learn from its vote stream, publish better policies.

    rlhf train                       # continuous: a round per RLHF_TRAIN_MIN_LABELS new labels,
                                     #   or after RLHF_TRAIN_MAX_WAIT_S with at least one
    rlhf train --once                # one round on what is stored + what the broker holds now
    rlhf train --ppo.lr 1e-4 ...     # any config field (trainer/config.py; --help lists them)

Settings (broker, topics, state dir, model) come from RLHF_* variables (rlhf/contracts.py).
SIGTERM or Ctrl-C stops cleanly: between polls at once, mid-round at the next step (the
round is dropped; every stored label stays stored).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time

import torch
import transformers

from kafka.errors import KafkaError

from rlhf.broker import ensure_topics
from rlhf.contracts import Settings
from trainer import config, metrics
from trainer.round import run_round
from trainer.state import RoundAborted, TrainerState

log = logging.getLogger("trainer")

PRUNE_EVERY_S = 60.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rlhf train", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--once", action="store_true", help="run one round and exit")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars (summary lines only)")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                    help="torch CPU threads (default: half the cores; the trainer runs beside the service, and "
                         "two processes spinning on the same cores are several times slower than one each)")
    config.add_arguments(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()  # per-load bars would drown the round lines
    settings = Settings()
    cfg = config.from_args(args)
    if settings.create_topics:
        ensure_topics(settings)
    state = TrainerState.open(settings, cfg)
    if settings.trainer_metrics_port:
        metrics.serve(settings.host, settings.trainer_metrics_port)

    def request_stop(signum, _frame):
        log.info("%s: stopping after the current step", signal.Signals(signum).name)
        state.stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        if args.once:
            run_round(state, progress=not args.no_progress)
        else:
            loop(state, settings, progress=not args.no_progress)
    except RoundAborted:
        log.info("round aborted by the stop request")
    finally:
        state.close()
    return 0


def loop(state: TrainerState, settings: Settings, *, progress: bool) -> None:
    """Poll continuously; run a round when enough new labels arrived or waited long enough."""
    last_round = last_prune = time.monotonic()
    log.info("waiting for labels: a round per %d new, or after %.0fs with at least one",
             settings.train_min_labels, settings.train_max_wait_s)
    while not state.stop.is_set():
        try:
            state.consumer.poll()
        except KafkaError as e:  # broker away: the batch was rewound, try again shortly
            log.warning("consume failed (%s); retrying in 5s", e)
            state.stop.wait(5.0)
            continue
        now = time.monotonic()
        if now - last_prune > PRUNE_EVERY_S:
            state.store.prune()
            last_prune = now
        new = state.new_labels()
        metrics.observe_state(state.version, *state.store.label_stats(), state.consumer.lag())
        if new >= settings.train_min_labels or (new > 0 and now - last_round >= settings.train_max_wait_s):
            try:
                run_round(state, progress=progress, drain_s=0.0)  # this loop has been consuming all along
            except KafkaError as e:  # broker away mid-round: labels stay stored, a publish is finished later
                log.warning("round dropped: %s; the next one retries", e)
            last_round = time.monotonic()
