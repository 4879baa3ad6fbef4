"""Pure detectors: functions of a node snapshot and ``now`` that return findings.

No I/O, no asyncio, no clock reads: the controller builds a ``NodeSnapshot``
from its fleet state and passes the time in. See ``registry.py`` for the set
the controller runs.
"""
