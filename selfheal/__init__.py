"""selfheal: a self-healing daemon for AI data platforms.

This package is the kernel every other layer builds on: the CLI entry point,
the typed configuration, the MQTT wire protocol, logging, the error tree,
sd_notify and clocks. It imports no other selfheal layer (see
``docs/ARCHITECTURE.md``).
"""

__version__ = "0.1.0"
