"""The `rlhf` command: one subcommand per job, each owned by the module that does it.

    rlhf up | broker | serve | train | sft | simulate | model build | model import
"""

from __future__ import annotations

import importlib
import os
import sys

# subcommand -> (module:function taking argv, one-line help). Each module owns its flags.
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("rlhf.up:main", "the whole loop on one machine: broker, service, trainer, simulated users"),
    "broker": ("rlhf.broker:main", "the embedded Kafka-protocol broker (tansu) on loopback"),
    "serve": ("service.serve:main", "the chat + feedback service (bentoml serve)"),
    "train": ("trainer.cli:main", "the trainer: consume votes, train, publish policies (--once for one round)"),
    "sft": ("trainer.sft:main", "supervised fine-tuning on demonstrations (JSONL of chats)"),
    "simulate": ("rlhf.simulate:main", "simulated users that chat and vote by a hidden taste"),
    "model": ("rlhf.cli:model", "the base model: build the embedded one, or import a GGUF file"),
}

# `rlhf model ACTION`, the same way one level down
MODEL_ACTIONS: dict[str, tuple[str, str]] = {
    "build": ("rlhf.tinylm:main", "(re)build the embedded default model"),
    "import": ("rlhf.gguf_import:main", "convert a GGUF file into a safetensors model directory"),
}


def dispatch(prog: str, table: dict[str, tuple[str, str]], argv: list[str]) -> int:
    """Run the `module:function` that `argv[0]` names in `table` with the rest of `argv`, or print usage."""
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in table:
        print(f"usage: {prog} COMMAND [options]   ({prog} COMMAND --help for its options)\n\ncommands:")
        for name, (_, text) in table.items():
            print(f"  {name:<9} {text}")
        return 0 if argv and argv[0] in {"-h", "--help"} else 2
    module, _, func = table[argv[0]][0].partition(":")
    return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)


def model(argv: list[str]) -> int:
    return dispatch("rlhf model", MODEL_ACTIONS, argv)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return dispatch("rlhf", COMMANDS, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
