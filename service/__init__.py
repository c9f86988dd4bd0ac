"""governor: a metrics governance proxy for OTLP and Prometheus Remote Write."""

__version__ = "0.1.0"
