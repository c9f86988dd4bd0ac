"""Self-telemetry: the metrics registry, /metrics /live /ready, and structured logging."""
