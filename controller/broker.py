"""The embedded MQTT broker (amqtt), for ``mqtt.url = "embedded"``: single-host use.

It honours last wills and retained messages; it is slower than Mosquitto and
may deliver a retained message twice to a new wildcard subscriber, which the
fleet's idempotent handlers absorb. Production fleets use Mosquitto or EMQX.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from amqtt.broker import Broker

from selfheal.logs import get_logger


@asynccontextmanager
async def embedded_broker(host: str, port: int) -> AsyncIterator[None]:
    """Serve MQTT on ``host:port`` for the duration of the block."""
    for name in ("amqtt", "transitions"):
        logging.getLogger(name).setLevel(logging.ERROR)  # amqtt logs every packet at INFO
    broker = Broker({
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    })
    await broker.start()
    get_logger("broker").info("broker.started", listen=f"{host}:{port}", kind="embedded amqtt")
    try:
        yield
    finally:
        try:
            await asyncio.wait_for(broker.shutdown(), 5)
        except (TimeoutError, Exception):  # noqa: BLE001 - shutdown of a dying broker is best effort
            get_logger("broker").warning("broker.shutdown_incomplete")
