"""selfheal: a self-healing daemon for AI data platforms.

This package is the kernel every other layer builds on: the CLI entry point,
the typed configuration, the MQTT wire protocol, logging, the error tree,
sd_notify and clocks. It imports no other selfheal layer (see
``docs/ARCHITECTURE.md``).
"""

import sys

__version__ = "0.1.0"

# httpx imports its command-line tool at import time (click, pygments, rich: ~5 MiB resident in every
# process, a sixth of a lean agent) only to offer `httpx.main`, which selfheal never calls: skip it.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]

