"""Receivers: decode requests and hand them to the ingest channel; the status table lives here."""
