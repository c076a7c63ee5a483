"""What the service and the trainer share: the contracts (core/contracts.py: settings, events,
ids, the store's layout), the policy store, model loading, LoRA versions, the Kafka clients and
the embedded broker, the embedded model and the tastes its users have."""
