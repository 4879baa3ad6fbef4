"""The one error tree of selfheal.

::

    SelfhealError                     base of everything selfheal raises on purpose
    ├── ConfigError                   a bad config file or value; names the key path (exit code 78)
    │   └── RulebookError             a rulebook that fails its schema; names file, rule and key
    ├── WireError                     an MQTT payload or topic that cannot be accepted
    │   ├── MalformedMessage          not JSON, wrong shape or type, wrong schema version
    │   ├── OversizedMessage          larger than the wire size cap
    │   └── SpoofedMessage            node id or bucket does not match the topic
    ├── StoreError                    the state store could not read or write
    ├── UnitError                     a managed unit could not be started, stopped or found
    └── RemediationError              a remediation step did not complete
        ├── TemporaryRemediationError may succeed if retried after ``retry_after`` seconds
        └── PermanentRemediationError retrying will not help (unknown unit, rejected command)

Handlers catch the narrowest class they can act on; loops catch
``SelfhealError`` to count and log a failure without stopping.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 78  # sysexits.h EX_CONFIG: systemd treats it as a permanent failure


class SelfhealError(Exception):
    """Base class of every error selfheal raises on purpose."""


class ConfigError(SelfhealError):
    """A configuration file or value is invalid.

    ``path`` is the dotted key path (``agent.units[0].probe.kind``) or empty
    when the problem is the file as a whole.
    """

    def __init__(self, message: str, *, source: str = "", path: str = "") -> None:
        self.source = source
        self.path = path
        where = ": ".join(part for part in (source, path) if part)
        super().__init__(f"{where}: {message}" if where else message)


class WireError(SelfhealError):
    """An MQTT message that cannot be accepted. ``reason`` is a short metric label."""

    reason = "invalid"


class MalformedMessage(WireError):
    reason = "malformed"


class OversizedMessage(WireError):
    reason = "oversized"


class SpoofedMessage(WireError):
    reason = "spoofed"


class RulebookError(ConfigError):
    """A rulebook failed validation."""


class StoreError(SelfhealError):
    """The state store failed."""


class UnitError(SelfhealError):
    """A managed unit could not be operated."""


class RemediationError(SelfhealError):
    """A remediation step did not complete."""


class TemporaryRemediationError(RemediationError):
    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class PermanentRemediationError(RemediationError):
    pass
