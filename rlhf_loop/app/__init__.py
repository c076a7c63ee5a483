"""The app layer, above the service and the trainer: the `rlhf` command (app/cli.py), `rlhf up`
and the one-machine loop it runs (app/up.py, app/loop.py), simulated users (app/simulate.py),
GGUF import and random-weight models of real shapes for tests and benches."""
