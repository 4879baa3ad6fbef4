"""Unit kinds: how a managed workload is started, watched and stopped (``base`` is the protocol)."""
