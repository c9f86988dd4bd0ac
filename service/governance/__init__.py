"""Governance: the rules file, the rule engine both pipelines share, and rule activity."""
