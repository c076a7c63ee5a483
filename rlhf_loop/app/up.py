"""The README's first command: the whole RLHF loop on one machine, on the embedded defaults.

    rlhf up                       # broker + service + trainer + simulated users, ~15 min
    rlhf up --model smollm2       # the same on a real instruct model (fetched and imported once), ~45 min
    rlhf up --votes 300           # a shorter run
    rlhf up --keep-serving        # leave broker + service + trainer up afterwards (Ctrl-C stops)

Prints a working curl and `openai` example as soon as the service answers, then one live
status line (policy version served, approval of that version, votes, KL, rounds), and at
the end the learning curve (PNG) and summary (JSON) paths. Ctrl-C stops everything, one
line per part (the simulated users, the trainer, the service, the broker), exit code 130;
once the users vote, the run so far is summarized and saved first, as at the end;
SIGTERM and SIGHUP (`timeout`, a closed terminal, a process manager) do the same, with
128 + the signal's number. Should `rlhf up` die without stopping them (SIGKILL), its parts
get SIGTERM from the kernel (core/processes.py).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from rlhf_loop.app import known_models
from rlhf_loop.app.loop import STOP_SIGNALS, LoopConfig, run
from rlhf_loop.app.simulate import SimConfig
from rlhf_loop.core.contracts import EMBEDDED_MODEL, Settings
from rlhf_loop.trainer.config import REAL_MODEL_CPU_ALGORITHM, TrainConfig

EXAMPLES = """
service ready on {url}  (logs in {logs})

  chat and vote in a browser: {url}/   (the playground, API key {key}; the API reference is {url}/docs)
  watch the loop: {url}/loop   (what serves, approval by version, the rounds, KL to the reference)

  curl -s {url}/v1/chat/completions -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\
       -d '{{"model": "rlhf-policy", "messages": [{{"role": "user", "content": "Tell me about cats."}}]}}'

  python -c 'from openai import OpenAI; c = OpenAI(base_url="{url}/v1", api_key="{key}"); \\
r = c.chat.completions.create(model="rlhf-policy", messages=[{{"role": "user", "content": "Do you like rain?"}}]); \\
print(r.choices[0].message.content, r.system_fingerprint)'

  curl -s {url}/v1/feedback -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' -d '{{"response_id": "<id>", "rating": "up"}}'

simulated users ({taste}, noise {noise}) are voting now; the trainer learns from their votes.
"""


# the run's length, pace and algorithm on the embedded model, and on a real one (issue 21's budget: 1,500 votes in
# 45 minutes). On SmolLM2 on a CPU, PPO's candidates scored below the current policy round after round (16
# rollouts a round and a value head from zero: an advantage that is mostly noise), while RLOO, each answer judged
# against the other three of its prompt, was promoted round after round (docs/trainer.md, "A real model on a CPU").
# RLOO runs the real-model CPU profile's 16 rollouts a round (4 prompts x 4 answers: model_defaults): with 32,
# +0.23 in 1,500 votes at 114-161 s a round beside the service (one run); with 16, +0.46, +0.25 and +0.07 over
# three seeds at 59-86 s (docs/trainer.md, "Three seeds of the real-model default"), and with the in-round KL
# estimate on the gate's answers +0.34, +0.30 and +0.25 at 63-100 s; PPO, +0.09,
# +0.08 and +0.05 with the same seeds: clearly behind by the rule of three seeds (docs/trainer.md, "RLOO against
# PPO on SmolLM2, three seeds each"); GRPO +0.03 and KTO +0.04 / +0.23 in screen runs. The choice is the trainer's
# (trainer/config.py REAL_MODEL_CPU_ALGORITHM, which `rlhf train` takes on a CPU); a run here names it, so that its
# results do too.
# A round per 64 new labels on a real model, not 128: while the judge still refuses (a round of seconds) it looks
# twice as often, and a trained round takes about as long as 64 labels take to come at a conversation a second
# (docs/trainer.md, "The gate's answers kept, and a round per 64 new labels").
RUN_DEFAULTS = {"votes": (2000, 1500), "minutes": (15.0, 45.0), "rate": (3.0, 1.0),
                "algorithm": (TrainConfig().algorithm, REAL_MODEL_CPU_ALGORITHM),
                "round_labels": (128, 64)}


def trainer_args(algorithm: str) -> tuple[str, ...]:
    """The trainer's flags for a demo or bench run (rlhf train)."""
    return ("--algorithm", algorithm)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="rlhf up", description=__doc__.splitlines()[0])
    ap.add_argument("--state-dir", type=Path, default=Path(".rlhf/demo"))
    ap.add_argument("--port", type=int, default=3000)
    ap.add_argument("--model", default=Settings().model,
                    help=f"the base model: {EMBEDDED_MODEL} (the embedded one, built on first use), "
                         f"{' | '.join(sorted(known_models.KNOWN))} (a real model, fetched and imported once), or a "
                         "Hugging Face model directory (default: RLHF_MODEL)")
    ap.add_argument("--votes", type=int, default=None, help="stop after this many votes (default 2000; 1500 on a real model)")
    ap.add_argument("--minutes", type=float, default=None, help="or after this long (default 15; 45 on a real model)")
    ap.add_argument("--taste", default="cheerful", help="what the simulated users secretly like")
    ap.add_argument("--algorithm", default=None, choices=["ppo", "grpo", "rloo", "kto", "dpo"],
                    help="how the trainer learns from the votes (rlhf train --algorithm; default ppo; rloo on a real model)")
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--rate", type=float, default=None,
                    help="conversations per second across all users (default 3; 1 on a real model, whose answers take longer)")
    ap.add_argument("--round-labels", type=int, default=None,
                    help="new votes that trigger a training round (default 128; 64 on a real model)")
    ap.add_argument("--keep-serving", action="store_true")
    args = ap.parse_args(argv)
    toy = args.model == EMBEDDED_MODEL
    for name, (embedded, real) in RUN_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, embedded if toy else real)
    cfg = LoopConfig(
        state_dir=args.state_dir, port=args.port, model=args.model, train_min_labels=args.round_labels,
        keep_serving=args.keep_serving, trainer_args=trainer_args(args.algorithm),
        sim=SimConfig(taste=args.taste, prompts="toy" if toy else "assistant", noise=args.noise, users=args.users,
                      concurrency=args.concurrency, rate=args.rate, max_votes=args.votes, max_seconds=args.minutes * 60),
    )

    def on_status(s: dict) -> None:
        if "ready" in s:
            print(EXAMPLES.format(url=s["ready"], logs=cfg.state_dir / "logs", taste=args.taste, noise=args.noise,
                                  key=cfg.sim.api_key), flush=True)
            return
        ap_cur = "-" if s["approval_current"] is None else f"{s['approval_current']:.2f}"
        ap_win = "-" if s["approval_last100"] is None else f"{s['approval_last100']:.2f}"
        kl = "-" if s["kl_to_ref"] is None else f"{s['kl_to_ref']:.3f}"
        judge = "-" if s["rm_auroc"] is None else f"{s['rm_auroc']:.2f}" + ("" if s["rm_trusted"] else " (not yet trusted)")
        budget = " (budget spent)" if s["budget_spent"] else ""
        rolled = f", {s['rolled_back']} rolled back" if s["rolled_back"] else ""
        line = (f"[{s['elapsed_s']:6.0f}s] serving v{s['serving_version']}  approval(v) {ap_cur}  last100 {ap_win}  "
                f"votes {s['votes']}/{args.votes}  KL {kl}{budget}  RM AUROC {judge}  rounds {s['rounds']} "
                f"(+{s['promoted']} promoted, {s['rejected']} rejected{rolled})  chat errors {s['chat_errors']}")
        print("\r" + line if sys.stdout.isatty() else line, end="" if sys.stdout.isatty() else "\n", flush=True)

    stop_on_signals()
    try:
        summary, png, js = run(cfg, on_status if sys.stdout.isatty() else _every(on_status, 15), on_stopped=_stopped)
    except KeyboardInterrupt as e:  # before the users started: nothing was measured
        return _shut_down(e.signum if isinstance(e, Stopped) else signal.SIGINT)
    except (RuntimeError, TimeoutError) as e:  # a part failed to start or died: say which, and where its log is
        print(f"\nerror: {e}", file=sys.stderr)
        return 1
    # the run at its end, or stopped while the users voted: what they measured (so far), then the stop
    print(f"\n\napproval by policy version{' so far' if summary['interrupted'] else ''}:")
    for v, row in summary["approval_by_version"].items():
        print(f"  v{v}: {row['approval']:.2f}  ({row['votes']} votes)")
    if summary["approval_gain"] is not None:
        print(f"baseline {summary['baseline_approval']:.2f} -> final {summary['final_approval']:.2f} "
              f"(+{summary['approval_gain']:.2f}), {summary['promoted']} versions promoted, "
              f"{summary['chat_errors']} failed chat requests")
    for pair in summary["before_after"][:3]:
        print(f"\n  {pair['prompt']}\n    v0:  {_one_line(pair['before'])}"
              f"\n    v{pair['after_version']}: {_one_line(pair['after'])}")
    print(f"\nlearning curve: {png}\nsummary:        {js}")
    return _shut_down(signal.Signals[summary["interrupted"]]) if summary["interrupted"] else 0


def _shut_down(signum: int) -> int:
    """The last line of a stopped run, and its exit status (128 + the signal, as a shell reports it)."""
    print(f"{'Ctrl-C' if signum == signal.SIGINT else signal.Signals(signum).name}: everything shut down.")
    return 128 + signum


def _one_line(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


class Stopped(KeyboardInterrupt):
    """A signal that ends `rlhf up` other than Ctrl-C, raised in the main thread where the run is, so
    that it unwinds through the same stop as Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP stop the run as Ctrl-C does (SIGINT raises KeyboardInterrupt already, unless
    it was ignored when we started, e.g. in a shell's background job: then it stays ignored)."""

    def stop(signum, _frame) -> None:
        raise Stopped(signum)

    for s in STOP_SIGNALS:
        if s != signal.SIGINT:
            signal.signal(s, stop)


def _stopped(part: str) -> None:
    """One line per part stopped (on a terminal, in place of the live status line)."""
    print(("\r\033[K" if sys.stdout.isatty() else "") + f"stopped {part}", flush=True)


def _every(fn, seconds: float):
    """Status every `seconds` when not on a terminal (logs stay readable)."""
    import time

    last = [0.0]

    def wrapped(s: dict) -> None:
        if "ready" in s or time.monotonic() - last[0] >= seconds:
            last[0] = time.monotonic()
            fn(s)
    return wrapped
