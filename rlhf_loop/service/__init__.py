"""The chat + feedback service: OpenAI-compatible chat on BentoML, votes and interactions to Kafka.

    service.py   the BentoML service (wiring, readiness, shutdown)
    api.py       the HTTP routes, auth, limits, OpenAI error shape
    admin.py     the admin API (versions, pin, unpin) on its own port
    schemas.py   request/response bodies
    engine.py    Policy, and the engine the API submits to: one thread, continuous batching
    scheduler.py which waiting requests start, and how much prompt per step
    runner.py    the forward passes and the KV caches (one batch per policy version)
    sampler.py   one token per row, with its request's parameters and generator
    detokenizer.py  token ids -> text deltas, incrementally, stop strings cut out
    request.py   a request's state: one Request, its Choices, their Deltas
    policies.py  which version serves: load, follow announcements, verify, hot swap, pin
    events.py    the disk spool and its drainer to Kafka
    metrics.py   the service's Prometheus metrics
    serve.py     `rlhf serve`
"""
