"""rlhf-loop: shared contracts, the embedded model and broker, and the `rlhf` command line."""
