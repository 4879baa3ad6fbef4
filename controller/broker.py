"""The embedded MQTT broker (amqtt), for ``mqtt.url = "embedded"``: single-host use.

It honours last wills and retained messages; it is slower than Mosquitto and
may deliver a retained message twice to a new wildcard subscriber, which the
fleet's idempotent handlers absorb. Production fleets use Mosquitto or EMQX.

Without ``mqtt.embedded_password_file`` it lets anyone connect and publish
anything: fine for one host, never for a network. With it, the broker is a
trust boundary of its own, the same one ``selfheal broker init`` writes for
Mosquitto: anonymous clients and wrong passwords are refused (the file is in
Mosquitto's hashed format), and each identity is held to its topics — a node
publishes only its own ``status|report|digests|events`` and reads only its own
``commands`` and the controller's status; the controller reads node topics and
publishes commands. amqtt 0.12 checks publishes, subscriptions and deliveries
through plugins, but not last wills nor the retained messages it replays, and it
lets a connecting client disturb the session of the id it claims *before* it
authenticates; :class:`_GuardedBroker` closes those three gaps (wills are
checked at CONNECT). What is still out of reach is logged once at start as
``broker.limitation`` (see :data:`LIMITATIONS`).

The ACL itself is pure (:func:`may_publish`, :func:`may_subscribe`,
:func:`may_read`, :func:`client_id_allowed`) and unit-testable without a broker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.utils import gen_client_id

from selfheal.broker_setup import CONTROLLER_USER, hash_password, parse_password_file, verify_password
from selfheal.errors import ConfigError
from selfheal.logs import RateLimiter, get_logger
from selfheal.wire import (
    CONTROLLER_STATUS_TOPIC,
    CONTROLLERS_STATUS_FILTER,
    PREFIX,
    NodeChannel,
    is_controller_status,
    node_topic,
)

NODE_CHANNELS: Final[tuple[NodeChannel, ...]] = ("status", "report", "digests", "events")
"""What a node publishes; ``commands`` is the one it reads."""
AGENT_CLIENT_PREFIX = "selfheal-agent-"
"""Agents connect as ``selfheal-agent-<node>`` (agent/app.py); that id belongs to that node alone."""
CONTROLLER_NODE_FILTERS = tuple(f"{PREFIX}/p/+/nodes/+/{channel}" for channel in NODE_CHANNELS)
COMMANDS_PATTERN = f"{PREFIX}/p/+/nodes/+/commands"

LIMITATIONS: tuple[tuple[str, str, str], ...] = (
    ("tls", "TLS",
     "the embedded broker speaks plain MQTT: passwords and messages cross the network in clear text; "
     "keep embedded_listen on loopback or use Mosquitto with TLS"),
    ("packet_size", "a packet size cap",
     "amqtt reads a whole packet (up to MQTT's 256 MB) before it checks the sender; "
     "Mosquitto caps it with max_packet_size"),
    ("queues", "per-client queue limits",
     "no per-client rate or queue limit: a slow or flooding client costs the controller's memory; "
     "Mosquitto bounds it with max_queued_messages / max_inflight_messages"),
    ("reload", "new users without a restart",
     "the password file is read at start: after `selfheal broker add-node` restart the controller "
     "(Mosquitto re-reads its password and ACL files on SIGHUP)"),
)
"""What this broker cannot enforce even with a password file; logged once at start."""


# --- the ACL (pure) ------------------------------------------------------------------------------


def topic_matches(topic: str, topic_filter: str) -> bool:
    """MQTT matching of a concrete ``topic`` against a filter with ``+`` / ``#``."""
    levels, parts = topic.split("/"), topic_filter.split("/")
    for index, part in enumerate(parts):
        if part == "#":
            return True
        if index >= len(levels) or (part != "+" and part != levels[index]):
            return False
    return len(levels) == len(parts)


def filter_within(requested: str, allowed: str) -> bool:
    """Whether every topic ``requested`` can match is one ``allowed`` matches (``allowed`` has no ``#``)."""
    want, have = requested.split("/"), allowed.split("/")
    if len(want) != len(have):
        return False
    return all(h == w or (h == "+" and w != "#") for w, h in zip(want, have, strict=True))


def _node_topics(user: str) -> frozenset[str]:
    return frozenset(node_topic(user, channel) for channel in NODE_CHANNELS)


def may_publish(user: str | None, topic: str) -> bool:
    """A node publishes only its own node topics; the controller only commands and its status."""
    if not user:
        return False
    if user == CONTROLLER_USER:
        return is_controller_status(topic) or topic_matches(topic, COMMANDS_PATTERN)
    return topic in _node_topics(user)  # exact strings: a '+' or '/' in a user name widens nothing


def may_subscribe(user: str | None, topic_filter: str) -> bool:
    """A node subscribes to its own commands and the controller's status; the controller to node topics."""
    if not user:
        return False
    if user == CONTROLLER_USER:
        return any(filter_within(topic_filter, allowed) for allowed in CONTROLLER_NODE_FILTERS)
    return topic_filter in (node_topic(user, "commands"), CONTROLLER_STATUS_TOPIC, CONTROLLERS_STATUS_FILTER)


def may_read(user: str | None, topic: str) -> bool:
    """Whether a message on ``topic`` may be delivered to ``user`` (checked per message)."""
    if not user:
        return False
    if user == CONTROLLER_USER:
        return any(topic_matches(topic, allowed) for allowed in CONTROLLER_NODE_FILTERS)
    return topic == node_topic(user, "commands") or is_controller_status(topic)


def client_id_allowed(user: str, client_id: str) -> bool:
    """``selfheal-agent-<N>`` is node N's alone; a node uses no other id, so no one takes over a session."""
    if client_id.startswith(AGENT_CLIENT_PREFIX):
        return client_id == AGENT_CLIENT_PREFIX + user
    return user == CONTROLLER_USER


def read_password_file(path: str | Path) -> dict[str, str]:
    """{user: hash} of a Mosquitto password file; unreadable, malformed or empty is a ConfigError."""
    try:
        users = parse_password_file(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeError, ValueError) as exc:
        detail = str(exc) if isinstance(exc, ValueError) else exc.__class__.__name__
        raise ConfigError(f"cannot use the broker password file: {detail}",
                          path="mqtt.embedded_password_file") from None
    if not users:
        raise ConfigError("no user in the broker password file", path="mqtt.embedded_password_file")
    return users


# --- amqtt plugins --------------------------------------------------------------------------------

_log = get_logger("broker")
_limiter = RateLimiter(period=60.0)
_DUMMY_HASH = hash_password("selfheal-no-such-user")
"""Verified against for an unknown user, so a refusal takes as long whoever asks."""


def _short(value: object) -> str:
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


class PasswordFileAuth(BaseAuthPlugin):  # type: ignore[misc]  # amqtt ships no type hints
    """Refuses anonymous clients, unknown users, wrong passwords, a foreign will topic or client id."""

    @dataclass
    class Config:
        password_file: str = ""

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.users = read_password_file(self.config.password_file)
        self.refused: Counter[str] = Counter()

    async def authenticate(self, *, session: Any) -> bool:
        user = session.username if session is not None else None
        password = session.password if session is not None else None
        if not user:
            return self._refuse("anonymous", user)
        if password is None:
            return self._refuse("bad_credentials", user)
        line_hash = self.users.get(user)
        ok = verify_password(line_hash or _DUMMY_HASH, str(password))
        if line_hash is None or not ok:
            return self._refuse("bad_credentials", user)
        if session.will_flag and not may_publish(user, session.will_topic or ""):
            return self._refuse("will_topic", user, topic=session.will_topic)
        if not client_id_allowed(user, session.client_id or ""):
            return self._refuse("client_id", user, client_id=session.client_id)
        return True

    def _refuse(self, reason: str, user: str | None, **fields: Any) -> bool:
        self.refused[reason] += 1
        if _limiter.allow("refused", reason, time.monotonic()):
            _log.warning("broker.refused", reason=reason, user=_short(user or "-"),
                         **{k: _short(v) for k, v in fields.items()}, total=self.refused[reason])
        return False


class TopicAcl(BaseTopicPlugin):  # type: ignore[misc]  # amqtt ships no type hints
    """The per-node ACL on every publish, subscription and delivery."""

    @dataclass
    class Config:
        pass

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.denied: Counter[str] = Counter()

    async def topic_filtering(self, *, session: Any = None, topic: str | None = None,
                              action: Any = None) -> bool:
        user = session.username if session is not None else None
        if not topic:
            return False
        if action == Action.PUBLISH:
            allowed = may_publish(user, topic)
        elif action == Action.SUBSCRIBE:
            allowed = may_subscribe(user, topic)
        else:
            allowed = may_read(user, topic)
        if not allowed:
            kind = str(action)
            self.denied[kind] += 1
            if _limiter.allow(f"denied:{user}", kind, time.monotonic()):
                _log.warning("broker.denied", action=kind, user=_short(user or "-"), topic=_short(topic),
                             total=self.denied[kind])
        return allowed


class _GuardedBroker(Broker):  # type: ignore[misc]  # amqtt ships no type hints
    """amqtt 0.12's broker with the checks its plugins cannot make.

    - A CONNECT is authenticated before the broker touches an existing session
      with the same client id (amqtt deletes or takes it over first, so a stranger
      could silently unsubscribe a node, or swap its will, without a password).
    - Retained messages replayed to a subscriber pass the read ACL, and only for
      the subscriber's own filters (amqtt replays every client's filters to each
      new connection, unchecked).
    """

    async def _initialize_client_session(self, reader: Any, writer: Any, remote_address: str,
                                         remote_port: int) -> tuple[Any, Any]:
        # amqtt 0.12.1's method, with the authentication moved up.
        try:
            handler, session = await BrokerProtocolHandler.init_from_connect(reader, writer, self.plugins_manager)
        except (AMQTTError, NoDataError) as exc:
            raise AMQTTError(exc) from exc
        except MQTTError:
            await writer.close()
            raise
        if not await self._authenticate(session, None):
            await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
            await writer.close()
            raise MQTTError("connection refused: not authorized")
        if session.clean_session:
            if session.client_id:
                await self._delete_session(session.client_id)
            else:
                session.client_id = gen_client_id()
            session.parent = 0
        elif session.client_id in self._sessions:
            existing, _ = self._sessions[session.client_id]
            for name in ("will_flag", "will_message", "will_topic", "will_qos", "will_retain", "keep_alive",
                         "username", "password"):
                setattr(existing, name, getattr(session, name))
            session = existing
            session.parent = 1
        else:
            session.parent = 0
        delay = self.config.get("timeout-disconnect-delay", 0)
        if session.keep_alive > 0 and isinstance(delay, int):
            session.keep_alive += delay
        return handler, session

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int],
                                                          session: Any) -> None:
        topic_filter, qos = subscription
        if all(owner.client_id != session.client_id for owner, _ in self._subscriptions.get(topic_filter, [])):
            return  # another client's filter
        handler = self._get_handler(session)
        if handler is None:
            return
        tasks = [
            asyncio.ensure_future(handler.mqtt_publish(retained.topic, retained.data,
                                                       min(qos, retained.qos or qos), retain=True))
            for topic, retained in list(self._retained_messages.items())
            if self._matches(topic, topic_filter)
            and await self._topic_filtering(session, topic=topic, action=Action.RECEIVE)
        ]
        if tasks:
            await asyncio.wait(tasks)


@dataclass
class BrokerGuard:
    """What the embedded broker refused so far (for tests and the operator)."""

    auth: PasswordFileAuth | None = None
    acl: TopicAcl | None = None

    @property
    def refused(self) -> Counter[str]:
        return self.auth.refused if self.auth is not None else Counter()

    @property
    def denied(self) -> Counter[str]:
        return self.acl.denied if self.acl is not None else Counter()


@asynccontextmanager
async def embedded_broker(host: str, port: int, *, password_file: str | None = None) -> AsyncIterator[BrokerGuard]:
    """Serve MQTT on ``host:port`` for the duration of the block.

    ``password_file``: a Mosquitto-format password file; with it, only its users connect, each held
    to its topics. Without it, anyone connects and publishes anything.
    """
    for name in ("amqtt", "transitions"):
        logging.getLogger(name).setLevel(logging.ERROR)  # amqtt logs every packet (passwords too) below
    log = get_logger("broker")
    guard = BrokerGuard()
    listeners = {"default": {"type": "tcp", "bind": f"{host}:{port}"}}
    if password_file:
        users = len(read_password_file(password_file))  # a bad file is a ConfigError, before amqtt wraps it
        broker = _GuardedBroker({"listeners": listeners, "plugins": {
            f"{__name__}.PasswordFileAuth": {"password_file": str(password_file)},
            f"{__name__}.TopicAcl": {},
        }})
        guard.auth = broker.plugins_manager.get_plugin("PasswordFileAuth")
        guard.acl = broker.plugins_manager.get_plugin("TopicAcl")
    else:
        users = 0
        broker = Broker({"listeners": listeners,
                         "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}})
    await broker.start()
    log.info("broker.started", listen=f"{host}:{port}", kind="embedded amqtt",
             auth="password file + per-node ACL" if password_file else "anonymous", users=users)
    if password_file:
        for limit, what, detail in LIMITATIONS:
            log.info("broker.limitation", limit=limit, what=what, detail=detail)
    else:
        log.warning("broker.limitation", limit="anonymous", what="any identity check",
                    detail="no mqtt.embedded_password_file: any client may publish anything, as any node")
    try:
        yield guard
    finally:
        try:
            await asyncio.wait_for(broker.shutdown(), 5)
        except (TimeoutError, Exception):  # noqa: BLE001 - shutdown of a dying broker is best effort
            log.warning("broker.shutdown_incomplete")
