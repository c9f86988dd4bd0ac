"""Pipeline stages between receivers and queues: the batcher, and what flows between stages."""
