"""The chat + feedback service: OpenAI-compatible chat on BentoML, votes and interactions to Kafka.

    service.py   the BentoML service (wiring, readiness, shutdown)
    api.py       the public HTTP routes: chat, models, feedback, the playground, the OpenAPI document
    admin.py     the admin API (versions, pin, unpin) on its own port
    http.py      what both APIs are built on: OpenAI's error shape, body parsing and limits, bearer tokens
    openapi.py   the OpenAPI document the API declares
    schemas.py   request/response bodies
    limits.py    vote caps
    versions.py  which version serves: load, follow announcements, verify, hot swap, pin
    loaded.py    a loaded version as the engine runs it (LoadedVersion, and SharedBase: one base, many adapters)
    engine.py    the engine the API submits to: one thread, continuous batching
    scheduler.py which waiting requests start, and how much prompt per step
    runner.py    the forward passes and the KV caches (one batch per loaded version)
    sampler.py   one token per row, with its request's parameters and generator
    detokenizer.py  token ids -> text deltas, incrementally, stop strings cut out
    request.py   a request's state: one Request, its Choices, their Deltas
    events.py    the disk spool and its drainer to Kafka
    metrics.py   the service's Prometheus metrics
    serve.py     `rlhf serve`, and starting/stopping it from other programs
"""
