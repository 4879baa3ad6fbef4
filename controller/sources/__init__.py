"""External finding sources: alerts that other monitoring systems raise, fed to the same rules.

``alerts.ExternalAlerts`` holds them (bounded, with a TTL); ``alertmanager``
fills it from Alertmanager's webhook, ``promql`` from PromQL queries
evaluated against a Prometheus server. The engine asks the store for the
findings that hold now, next to its own detectors'.
"""
