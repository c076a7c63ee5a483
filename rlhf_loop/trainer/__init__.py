"""The trainer: votes from Kafka -> labelled examples -> reward model -> PPO -> gated, published policies.

Start at `trainer/round.py` (one round, top to bottom) and docs/trainer.md.
"""
