"""The service's own Prometheus metrics, served by BentoML's /metrics next to its built-in ones.

BentoML runs prometheus_client in multiprocess mode (PROMETHEUS_MULTIPROC_DIR is set in
the worker's environment before this module is imported), so plain prometheus_client
metrics land in the same /metrics output. Gauges say how to combine worker processes.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

requests = Counter("rlhf_requests", "API requests by endpoint and HTTP status", ["endpoint", "status"])
tokens = Counter("rlhf_tokens", "Tokens processed, by kind (prompt/completion) and policy version",
                 ["kind", "policy_version"])
completions = Counter("rlhf_completions", "Chat completions answered, by policy version", ["policy_version"])
generation_seconds = Histogram("rlhf_generation_seconds", "Wall time from admission to last token of a completion",
                               buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
engine_waiting = Gauge("rlhf_engine_waiting_requests", "Requests queued in the engine, not started yet",
                       multiprocess_mode="livesum")
engine_running = Gauge("rlhf_engine_running_seqs", "Rows (choices) in the engine's decode batches",
                       multiprocess_mode="livesum")
engine_rejected = Counter("rlhf_engine_rejected", "Requests refused with 429 because the engine's queue was full")
engine_cancelled = Counter("rlhf_engine_cancelled", "Requests whose client left before the end; their rows were freed")
time_to_first_token = Histogram("rlhf_time_to_first_token_seconds", "From arrival in the engine to the first token",
                                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
inter_token_latency = Histogram("rlhf_inter_token_latency_seconds",
                                "Between two decode steps: what every running row waits for its next token",
                                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
votes = Counter("rlhf_votes", "Votes accepted, by rating and the policy version of the response voted on",
                ["rating", "policy_version"])
votes_rate_limited = Counter("rlhf_votes_rate_limited", "Votes and withdrawals refused (429) by a vote cap, by the "
                             "kind of identity whose cap was reached", ["identity_kind"])
preferences = Counter("rlhf_preferences", "Preferences accepted, by whether they are ties and the policy version "
                      "of the chosen answer", ["tie", "policy_version"])
preferences_withdrawn = Counter("rlhf_preferences_withdrawn", "Preferences withdrawn (tombstones)")
votes_withdrawn = Counter("rlhf_votes_withdrawn", "Votes withdrawn (tombstones), by policy version", ["policy_version"])

events_spooled = Counter("rlhf_events_spooled", "Events appended to the local spool", ["topic"])
events_delivered = Counter("rlhf_events_delivered", "Events acknowledged by Kafka (acks=all)", ["topic"])
events_dropped = Counter("rlhf_events_dropped", "Events dropped because the spool was over its size cap", ["topic"])
events_quarantined = Counter("rlhf_events_quarantined", "Spooled events Kafka refused for good, moved to the "
                             "spool's quarantine file (docs/service.md: replay)", ["topic", "reason"])
kafka_errors = Counter("rlhf_kafka_errors", "Failed attempts to deliver a batch of spooled events", ["reason"])
spool_depth = Gauge("rlhf_spool_depth", "Events spooled but not yet acknowledged by Kafka", multiprocess_mode="livesum")
spool_bytes = Gauge("rlhf_spool_bytes", "Bytes of spool segment files on disk", multiprocess_mode="livesum")

policy_version = Gauge("rlhf_policy_version", "The policy version now serving", multiprocess_mode="livemax")
policy_pinned = Gauge("rlhf_policy_pinned", "1 while an admin pin overrides LATEST", multiprocess_mode="livemax")
policy_following = Gauge("rlhf_policy_updates_following",
                         "1 while this replica is attached to the policy-updates topic", multiprocess_mode="livemin")
policy_announcements = Counter("rlhf_policy_announcements", "PolicyUpdate announcements read from Kafka")
policy_swaps = Counter("rlhf_policy_swaps", "Policy versions swapped in")
policy_rollbacks = Counter("rlhf_policy_rollbacks", "Rollbacks announced by the trainer's live-approval watch and followed")
policy_load_failures = Counter("rlhf_policy_load_failures", "Policy versions refused, by reason", ["reason"])
policy_named_loads = Counter("rlhf_policy_named_loads", "Policy versions loaded because a chat request named one that "
                             "was not in memory (evicted ones named again count again)")
