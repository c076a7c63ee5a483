"""The chat + feedback service: OpenAI-compatible chat on BentoML, votes and interactions to Kafka.

    service.py   the BentoML service (wiring, readiness, shutdown)
    api.py       the HTTP routes, auth, limits, OpenAI error shape
    admin.py     the admin API (versions, pin, unpin) on its own port
    schemas.py   request/response bodies
    engine.py    Policy, the decode loop, the engine the API submits to
    policies.py  which version serves: load, follow announcements, verify, hot swap, pin
    events.py    the disk spool and its drainer to Kafka
    metrics.py   the service's Prometheus metrics
    serve.py     `rlhf serve`
"""
