"""Exporters: deliver queued batches to backends with retry, backoff and a circuit breaker."""
