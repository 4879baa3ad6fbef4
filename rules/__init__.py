"""Rulebooks: which finding gets which remediation, loaded from schema-validated YAML."""
