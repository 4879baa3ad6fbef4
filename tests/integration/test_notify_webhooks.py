"""Chat notifiers over real HTTP: every destination kind against a local receiver that records and misbehaves.

Each kind's payload is checked against its service's documented format
(required keys and types); 429 with ``Retry-After`` (or Discord's
``retry_after`` body field) is waited out, 5xx is retried, 404 is given up
after one attempt with a logged reason; grouping turns five findings into one
message and a fix into a resolve message; the URL never reaches a log; a full
queue drops and counts instead of blocking the engine.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from datetime import datetime
from email.utils import formatdate
from typing import Any

import pytest
import structlog
from prometheus_client import generate_latest

from controller.metrics import ControllerMetrics
from controller.notify import Notification, incident_labels
from controller.notify.alertmanager import fingerprint
from controller.notify.delivery import RetryPolicy
from controller.notify.registry import default_formatters
from controller.notify.router import Destination, Router
from remediations.state import Matcher
from selfheal.clocks import SystemClock
from tests.conftest import eventually
from tests.webhook_receiver import WebhookReceiver, webhook_receiver

pytestmark = pytest.mark.integration
KINDS = ["slack", "mattermost", "teams", "discord", "googlechat", "alertmanager"]
SECRET = "/services/T0SECRET/B0SECRET/xoxbTOKEN123"  # noqa: S105 - a fake webhook path the test hunts for
LINK = "http://status.example:8080/api/v1/incidents/{}"
FAST = RetryPolicy(max_attempts=4, backoff_initial=0.05, backoff_max=0.2, jitter=0.05)


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with webhook_receiver() as r:
        yield r


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    """Everything selfheal logs through structlog, as JSON lines."""
    out = io.StringIO()
    structlog.configure(processors=[structlog.processors.add_log_level, structlog.processors.format_exc_info,
                                    structlog.processors.JSONRenderer()],
                        logger_factory=structlog.PrintLoggerFactory(out), cache_logger_on_first_use=False)
    yield out
    structlog.reset_defaults()


class Audit:
    """Stands in for the engine's ``_audit``: what the router asked to write, per incident."""

    def __init__(self) -> None:
        self.entries: list[tuple[int, str, dict[str, object]]] = []

    async def __call__(self, incident_id: int, kind: str, data: dict[str, object]) -> None:
        self.entries.append((incident_id, kind, data))

    def of(self, kind: str, incident_id: int | None = None) -> list[dict[str, object]]:
        return [d for i, k, d in self.entries if k == kind and (incident_id is None or i == incident_id)]


def note(incident: int, event: str = "opened", *, unit: str = "web", node: str = "node-a", action: str = "",
         outcome: str = "", text: str = "", severity: str = "critical") -> Notification:
    labels = incident_labels(kind="unit_exited", node=node, unit=unit, severity=severity, rule="restart-exited",
                             node_labels={"group": "gpu"})
    return Notification(incident_id=incident, event=event, severity="critical",  # type: ignore[arg-type]
                        title=f"unit_exited on {node}/{unit}: {event}", text=text or f"unit {unit} exited",
                        node=node, unit=unit, link=LINK.format(incident), kind="unit_exited",
                        summary=f"unit {unit} exited with signal 9", action=action, outcome=outcome,
                        labels=labels, at=1_700_000_000.0 + incident)


def destination(receiver: WebhookReceiver, kind: str, path: str = SECRET, **overrides: Any) -> Destination:
    settings: dict[str, Any] = {"group_wait": 0.05, "group_interval": 0.1, "repeat_interval": 3600.0,
                                "rate": 6000.0, "burst": 10, "timeout": 2.0}
    settings.update(overrides)
    return Destination(name=f"ops-{kind}", kind=kind, url=receiver.url(path), **settings)


@asynccontextmanager
async def running(*destinations: Destination, audit: Audit | None = None, policy: RetryPolicy = FAST,
                  silenced: Any = None) -> AsyncIterator[Router]:
    router = Router(list(destinations), formatters=default_formatters(), metrics=ControllerMetrics(),
                    clock=SystemClock(), record=audit or Audit(), silenced=silenced or (lambda labels: False),
                    external_url="http://status.example:8080", policy=policy)
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(router.run(stop=stop))
        try:
            yield router
        finally:
            stop.set()


async def fix(router: Router, incident: int) -> None:
    """The whole life of one healed incident, as the engine reports it."""
    await router.notify(note(incident, "action", action="restart_unit", text="restart_unit (attempt 1)"))
    await router.notify(note(incident, "outcome", action="restart_unit", outcome="succeeded",
                             text="healthy again 1.20s after the action"))
    await router.notify(note(incident, "resolved", text="cleared for 5s"))


# --- documented payload formats --------------------------------------------------------------------


def _strings(mapping: Mapping[str, Any]) -> bool:
    return all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items())


def check_slack(p: dict[str, Any]) -> None:
    assert isinstance(p["text"], str)
    assert p["text"]
    assert isinstance(p["blocks"], list)
    assert 0 < len(p["blocks"]) <= 50
    header = p["blocks"][0]
    assert header["type"] == "header"
    assert header["text"]["type"] == "plain_text"
    assert len(header["text"]["text"]) <= 150
    sections = [b for b in p["blocks"] if b["type"] == "section"]
    assert sections
    for block in p["blocks"]:
        assert block["type"] in ("header", "section", "context")
    for section in sections:
        assert section["text"]["type"] == "mrkdwn"
        assert len(section["text"]["text"]) <= 3000
    context = p["blocks"][-1]
    assert context["type"] == "context"
    assert all(e["type"] == "mrkdwn" for e in context["elements"])


def check_mattermost(p: dict[str, Any]) -> None:
    assert isinstance(p["text"], str)
    assert p["text"]
    assert isinstance(p["attachments"], list)
    assert p["attachments"]
    for a in p["attachments"]:
        assert isinstance(a["fallback"], str)
        assert a["fallback"]
        assert re.fullmatch(r"#[0-9a-f]{6}", a["color"])
        assert isinstance(a["title"], str)
        assert a["title_link"].startswith("http")
        for f in a["fields"]:
            assert isinstance(f["title"], str)
            assert isinstance(f["value"], str)
            assert isinstance(f["short"], bool)


def check_teams(p: dict[str, Any]) -> None:
    assert p["type"] == "message"
    assert "MessageCard" not in json.dumps(p)
    assert "@type" not in json.dumps(p)
    [attachment] = p["attachments"]
    assert attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
    assert "contentUrl" in attachment
    assert attachment["contentUrl"] is None
    card = attachment["content"]
    assert card["type"] == "AdaptiveCard"
    assert card["$schema"].startswith("http://adaptivecards.io/schemas/")
    assert re.fullmatch(r"1\.[0-5]", card["version"])
    for element in card["body"]:
        assert element["type"] in ("TextBlock", "FactSet")
        if element["type"] == "TextBlock":
            assert isinstance(element["text"], str)
        else:
            assert all(isinstance(f["title"], str) and isinstance(f["value"], str) for f in element["facts"])
    for action in card["actions"]:
        assert action["type"] == "Action.OpenUrl"
        assert action["url"].startswith("http")
        assert isinstance(action["title"], str)


def check_discord(p: dict[str, Any]) -> None:
    assert p["allowed_mentions"] == {"parse": []}
    assert isinstance(p["content"], str)
    assert 0 < len(p["content"]) <= 2000
    assert isinstance(p["embeds"], list)
    assert 0 < len(p["embeds"]) <= 10
    total = 0
    for e in p["embeds"]:
        assert isinstance(e["title"], str)
        assert len(e["title"]) <= 256
        assert isinstance(e["color"], int)
        assert 0 <= e["color"] <= 0xFFFFFF
        assert e["url"].startswith("http")
        datetime.fromisoformat(e["timestamp"])
        assert len(e["fields"]) <= 25
        for f in e["fields"]:
            assert 0 < len(f["name"]) <= 256
            assert 0 < len(f["value"]) <= 1024
            assert isinstance(f["inline"], bool)
        total += len(e["title"]) + sum(len(f["name"]) + len(f["value"]) for f in e["fields"])
    assert total <= 6000


def check_googlechat(p: dict[str, Any]) -> None:
    assert isinstance(p["text"], str)
    [card] = p["cardsV2"]
    assert isinstance(card["cardId"], str)
    assert card["cardId"]
    assert isinstance(card["card"]["header"]["title"], str)
    widgets = [w for s in card["card"]["sections"] for w in s["widgets"]]
    assert 0 < len(widgets) <= 100
    for widget in widgets:
        [kind] = widget.keys()
        assert kind in ("decoratedText", "buttonList", "textParagraph")
        if kind == "decoratedText":
            assert isinstance(widget[kind]["text"], str)
            assert isinstance(widget[kind]["topLabel"], str)
        if kind == "buttonList":
            for button in widget[kind]["buttons"]:
                assert button["onClick"]["openLink"]["url"].startswith("http")


def check_alertmanager(p: dict[str, Any]) -> None:
    assert p["version"] == "4"
    assert isinstance(p["groupKey"], str)
    assert p["groupKey"]
    assert p["status"] in ("firing", "resolved")
    assert isinstance(p["receiver"], str)
    assert isinstance(p["externalURL"], str)
    assert isinstance(p["truncatedAlerts"], int)
    for key in ("groupLabels", "commonLabels", "commonAnnotations"):
        assert isinstance(p[key], dict)
        assert _strings(p[key])
    assert p["alerts"]
    for a in p["alerts"]:
        assert a["status"] in ("firing", "resolved")
        assert _strings(a["labels"])
        assert a["labels"]["alertname"]
        assert _strings(a["annotations"])
        datetime.fromisoformat(a["startsAt"].replace("Z", "+00:00"))
        if a["status"] == "firing":
            assert a["endsAt"] == "0001-01-01T00:00:00Z"
        else:
            datetime.fromisoformat(a["endsAt"].replace("Z", "+00:00"))
        assert isinstance(a["generatorURL"], str)
        assert re.fullmatch(r"[0-9a-f]{16}", a["fingerprint"])


CHECKS = {"slack": check_slack, "mattermost": check_mattermost, "teams": check_teams, "discord": check_discord,
          "googlechat": check_googlechat, "alertmanager": check_alertmanager}


@pytest.mark.parametrize("kind", KINDS)
async def test_each_kind_sends_its_documented_format_with_what_broke_what_was_done_and_the_link(
        receiver: WebhookReceiver, kind: str) -> None:
    audit = Audit()
    async with running(destination(receiver, kind), audit=audit) as router:
        await router.notify(note(7))
        await router.notify(note(7, "action", action="restart_unit", text="restart_unit (attempt 1)"))
        await eventually(lambda: len(receiver.received()) == 1, what="the opened message")
        await router.notify(note(7, "outcome", action="restart_unit", outcome="succeeded",
                                 text="healthy again 1.20s after the action"))
        await router.notify(note(7, "resolved", text="cleared for 5s"))
        await eventually(lambda: len(receiver.received()) == 2, what="the resolved message")
    first, second = (r.body for r in receiver.received())
    for payload in (first, second):
        CHECKS[kind](payload)
        text = json.dumps(payload)
        assert "unit web exited with signal 9" in text  # what broke
        assert "restart_unit" in text  # what selfheal did
        assert LINK.format(7) in text  # the incident
    assert "FIRING" in json.dumps(first) or first.get("status") == "firing"
    assert "not yet" in json.dumps(first)  # whether it worked, so far
    assert "yes" in json.dumps(second)
    assert "succeeded" in json.dumps(second)
    assert "RESOLVED" in json.dumps(second) or second.get("status") == "resolved"
    assert all(r.headers["content-type"] == "application/json" for r in receiver.received())
    assert [d["outcome"] for d in audit.of("delivery", 7)] == ["sent", "sent"]


def test_alertmanager_fingerprints_are_stable_per_label_set() -> None:
    labels = {"alertname": "unit_exited", "node": "node-a"}
    assert fingerprint(labels) == fingerprint(dict(reversed(labels.items())))
    assert fingerprint(labels) != fingerprint({**labels, "node": "node-b"})
    assert fingerprint({}) == "cbf29ce484222325"  # FNV-1a 64 offset basis: nothing hashed


# --- retries, Retry-After, giving up ------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_429_waits_retry_after_then_500_is_retried_then_it_is_sent(
        receiver: WebhookReceiver, kind: str, logs: io.StringIO, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    receiver.answer(SECRET, 429, {"Retry-After": "1"}, '{"message": "slow down"}')
    receiver.answer(SECRET, 500, {}, "upstream trouble")
    audit = Audit()
    async with running(destination(receiver, kind), audit=audit) as router:
        await router.notify(note(1))
        await eventually(lambda: bool(audit.of("delivery")), what="a final outcome")
    first, second, third = receiver.received()
    assert second.at - first.at >= 0.99  # Retry-After: 1 was honoured
    assert third.at - second.at < 0.9  # the 500 took the (short) backoff, not another second
    assert first.body == second.body == third.body
    attempts = audit.of("delivery_attempt", 1)
    assert [(a["result"], a["http_status"]) for a in attempts] == [("retry", 429), ("retry", 500), ("sent", 200)]
    assert attempts[0]["retry_in_s"] == 1.0
    [outcome] = audit.of("delivery", 1)
    assert outcome["outcome"] == "sent"
    assert outcome["attempts"] == 3
    assert router.metrics.webhook_deliveries.labels(kind, "sent")._value.get() == 1
    _assert_no_secret(logs.getvalue() + caplog.text, receiver)
    assert "HTTP Request: POST" in caplog.text  # httpx did log each request, with the URL redacted


async def test_discord_retry_after_in_the_429_body_is_honoured(receiver: WebhookReceiver) -> None:
    receiver.answer(SECRET, 429, {"content-type": "application/json"},
                    '{"message": "You are being rate limited.", "retry_after": 1.2, "global": false}')
    audit = Audit()
    async with running(destination(receiver, "discord"), audit=audit) as router:
        await router.notify(note(1))
        await eventually(lambda: bool(audit.of("delivery")), what="a final outcome")
    first, second = receiver.received()
    assert second.at - first.at >= 1.19
    assert audit.of("delivery_attempt")[0]["retry_in_s"] == 1.2


async def test_retry_after_as_an_http_date_is_honoured(receiver: WebhookReceiver) -> None:
    # Whole seconds, written now: 2 to 3 s from now, so still over 1 s away when the first attempt lands
    # (the router's start-up may take most of a second on a loaded machine).
    receiver.answer(SECRET, 503, {"Retry-After": formatdate(SystemClock().wall() + 3, usegmt=True)})
    audit = Audit()
    async with running(destination(receiver, "slack"), audit=audit) as router:
        await router.notify(note(1))
        await eventually(lambda: bool(audit.of("delivery")), what="a final outcome")
    first, second = receiver.received()
    assert second.at - first.at >= 1.0  # waited for the date, not retried at once
    assert audit.of("delivery")[0]["outcome"] == "sent"


@pytest.mark.parametrize("kind", KINDS)
async def test_404_gives_up_after_one_attempt_with_a_logged_reason(
        receiver: WebhookReceiver, kind: str, logs: io.StringIO, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    receiver.answer(SECRET, 404, {}, f"no_service (you posted to {receiver.url(SECRET)})")
    audit = Audit()
    async with running(destination(receiver, kind), audit=audit) as router:
        await router.notify(note(3))
        await eventually(lambda: bool(audit.of("delivery")), what="a final outcome")
    assert len(receiver.received()) == 1
    [outcome] = audit.of("delivery", 3)
    assert outcome["outcome"] == "rejected"
    assert outcome["attempts"] == 1
    assert str(outcome["reason"]).startswith("HTTP 404: no_service")
    gave_up = [json.loads(line) for line in logs.getvalue().splitlines() if '"notify.gave_up"' in line]
    assert gave_up
    assert gave_up[0]["reason"].startswith("HTTP 404: no_service")
    assert gave_up[0]["url"] == f"{receiver.url('')}/…"  # scheme and host only
    assert router.metrics.webhook_deliveries.labels(kind, "rejected")._value.get() == 1
    _assert_no_secret(logs.getvalue() + caplog.text + json.dumps(audit.entries), receiver)


async def test_timeouts_and_refused_connections_are_retried_then_given_up(
        receiver: WebhookReceiver, logs: io.StringIO) -> None:
    receiver.answer(SECRET, 200, delay=1.0)  # slower than the destination's timeout
    audit = Audit()
    slow = destination(receiver, "slack", timeout=0.3)
    with webhook_receiver() as gone:
        dead_url = gone.url(SECRET)
    closed = Destination(name="gone", kind="mattermost", url=dead_url, group_wait=0.05)
    async with running(slow, closed, audit=audit,
                       policy=RetryPolicy(max_attempts=3, backoff_initial=0.05, backoff_max=0.1, jitter=0.01)) as r:
        await r.notify(note(4))
        await eventually(lambda: len(audit.of("delivery")) == 2, what="both outcomes")
    outcomes = {d["destination"]: d for d in audit.of("delivery")}
    assert outcomes["ops-slack"]["outcome"] == "sent"
    assert outcomes["ops-slack"]["attempts"] == 2
    assert outcomes["gone"]["outcome"] == "failed"
    assert outcomes["gone"]["attempts"] == 3
    assert "connection error" in str(outcomes["gone"]["reason"])
    timeouts = [a for a in audit.of("delivery_attempt") if a["destination"] == "ops-slack"]
    assert "timed out" in str(timeouts[0]["reason"])
    assert dead_url not in logs.getvalue()
    assert SECRET not in logs.getvalue()


def _assert_no_secret(text: str, receiver: WebhookReceiver) -> None:
    assert receiver.url(SECRET) not in text
    for secret in ("T0SECRET", "B0SECRET", "xoxbTOKEN123"):
        assert secret not in text


# --- grouping, state changes, silences --------------------------------------------------------------


async def test_five_findings_of_one_group_make_one_message_and_their_fix_one_resolve(
        receiver: WebhookReceiver) -> None:
    audit = Audit()
    async with running(destination(receiver, "alertmanager", group_wait=0.5), audit=audit) as router:
        for i in range(1, 6):
            await router.notify(note(i, unit=f"u{i}"))  # kind=unit_exited, node=node-a: one group
            await asyncio.sleep(0.05)  # findings trickle in, as they do; group_wait collects them
        await eventually(lambda: len(receiver.received()) == 1, what="the grouped message")
        for i in range(1, 6):
            await fix(router, i)
        await eventually(lambda: len(receiver.received()) == 2, what="the resolve message")
        await eventually(lambda: len(audit.of("delivery")) == 10, what="both deliveries audited per incident")
    opened, resolved = (r.body for r in receiver.received())
    assert opened["status"] == "firing"
    assert len(opened["alerts"]) == 5
    assert opened["groupLabels"] == {"kind": "unit_exited", "node": "node-a"}
    assert {a["labels"]["unit"] for a in opened["alerts"]} == {f"u{i}" for i in range(1, 6)}
    assert opened["commonLabels"]["group"] == "gpu"
    assert "unit" not in opened["commonLabels"]
    assert resolved["status"] == "resolved"
    assert len(resolved["alerts"]) == 5
    assert all(a["status"] == "resolved" and a["endsAt"] != "0001-01-01T00:00:00Z" for a in resolved["alerts"])
    assert all(a["annotations"]["selfheal_worked"].startswith("yes") for a in resolved["alerts"])
    assert {i for i, k, _ in audit.entries if k == "delivery"} == set(range(1, 6))
    assert len(router.lanes[0].groups) == 0  # all resolved and said: the group is forgotten


async def test_unresolved_groups_are_repeated_and_other_groups_go_separately(receiver: WebhookReceiver) -> None:
    async with running(destination(receiver, "slack", repeat_interval=0.4)) as router:
        await router.notify(note(1, node="node-a"))
        await router.notify(note(2, node="node-b"))
        await eventually(lambda: len(receiver.received()) == 2, what="one message per group")
        await eventually(lambda: len(receiver.received()) >= 4, what="both repeated")
    texts = [r.body["text"] for r in receiver.received()]
    assert sum("node-a" in t for t in texts[:2]) == 1
    assert sum("node-b" in t for t in texts[:2]) == 1
    assert all("(still unresolved)" in t for t in texts[2:4])


async def test_matchers_route_by_labels_and_silences_mute(receiver: WebhookReceiver) -> None:
    critical = destination(receiver, "slack", path="/critical")
    gpu_db = Destination(name="gpu-db", kind="discord", url=receiver.url("/gpu-db"), group_wait=0.05,
                         matchers=(Matcher("group", "gpu"), Matcher("unit", "db*")))
    muted: set[str] = {"quiet"}
    audit = Audit()
    async with running(critical, gpu_db, audit=audit,
                       silenced=lambda labels: labels.get("unit") in muted) as router:
        deliveries = await router.notify(note(1, unit="web"))
        assert [(d.destination, d.outcome) for d in deliveries] == [("ops-slack", "queued")]
        deliveries = await router.notify(note(2, unit="db-main"))
        assert {d.destination for d in deliveries} == {"ops-slack", "gpu-db"}
        deliveries = await router.notify(note(3, unit="quiet"))
        assert [(d.destination, d.outcome) for d in deliveries] == [("ops-slack", "silenced")]
        await eventually(lambda: len(receiver.received("/critical")) == 1 and len(receiver.received("/gpu-db")) == 1,
                         what="one message per destination")
    slack = json.dumps(receiver.received("/critical")[0].body)
    assert "#1 " in slack
    assert "#2 " in slack
    assert "#3 " not in slack
    assert "#2 " in json.dumps(receiver.received("/gpu-db")[0].body)


async def test_a_full_queue_drops_and_counts_without_blocking(receiver: WebhookReceiver) -> None:
    metrics = ControllerMetrics()
    router = Router([destination(receiver, "slack")], formatters=default_formatters(), metrics=metrics,
                    clock=SystemClock(), record=Audit(), silenced=lambda labels: False, queue_size=3)
    async with asyncio.timeout(1.0):  # nothing drains the queue: notify must still return at once
        outcomes = [(await router.notify(note(i)))[0].outcome for i in range(10)]
    assert outcomes == ["queued"] * 3 + ["dropped"] * 7
    assert metrics.notifications_dropped._value.get() == 7
    assert b"selfheal_notifications_dropped_total 7.0" in generate_latest(metrics.registry)


async def test_a_stop_flushes_what_was_not_said_yet(receiver: WebhookReceiver) -> None:
    async with running(destination(receiver, "slack", group_wait=600.0)) as router:
        await router.notify(note(1))
    [message] = receiver.received()
    assert "FIRING:1" in message.body["text"]
