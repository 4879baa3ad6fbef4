"""Streaming anomaly detectors: one instance per (node, metric), fed ``(timestamp, value)`` in order.

Each detector returns a score in ``[0, 1]`` per sample; an alert policy
(``policy.py``) — not the detector — decides when scores become a finding.
Detectors are pure: time arrives with the sample, memory is bounded, nothing
looks ahead. ``registry.build_detector`` turns a plain config mapping into a
detector; ``multivariate.py`` is the per-host exception, whose model fitting
the caller runs off the event loop. ``docs/DETECTORS.md`` says what each one
catches and how to tune it; ``bench/nab.py`` measures them on NAB.
"""
