"""Notification hygiene without I/O: grouping and its timers, Retry-After, the token bucket, secrets, config."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from controller.notify import Notification, incident_labels
from controller.notify.delivery import RedactingFilter, TokenBucket, parse_retry_after, redact, scrub
from controller.notify.grouping import Groups
from controller.notify.model import GroupMessage
from controller.notify.registry import default_formatters
from controller.notify.router import Destination
from selfheal.config import NotifyConfig, load_config
from selfheal.errors import ConfigError

URL = "https://hooks.slack.com/services/T000/B000/SECRETSECRET"


def note(incident: int, event: str = "opened", *, node: str = "node-a", unit: str = "web", kind: str = "unit_exited",
         action: str = "", outcome: str = "", text: str = "") -> Notification:
    return Notification(incident_id=incident, event=event, severity="critical",  # type: ignore[arg-type]
                        title="t", text=text, node=node, unit=unit, link=f"http://x/incidents/{incident}", kind=kind,
                        summary=f"{unit} exited", action=action, outcome=outcome, at=1000.0 + incident,
                        labels=incident_labels(kind=kind, node=node, unit=unit, severity="warning", rule="r",
                                               node_labels={"group": "gpu"}))


def groups(**timing: float) -> Groups:
    settings = {"group_wait": 5.0, "group_interval": 60.0, "repeat_interval": 3600.0, **timing}
    return Groups(group_by=("kind", "node"), **settings)


def flush_due(g: Groups, now: float, silenced: object = None) -> list[GroupMessage]:
    out = []
    for key in g.due(now):
        message = g.flush(key, now, receiver="ops", external_url="http://x",
                          silenced=silenced or (lambda labels: False))  # type: ignore[arg-type]
        if message is not None:
            out.append(message)
    return out


def test_a_new_group_waits_group_wait_and_collects_every_finding_that_arrives_meanwhile() -> None:
    g = groups()
    for i in range(5):
        g.apply(note(i, unit=f"u{i}"), now=float(i))
    g.apply(note(9, node="node-b"), now=1.0)
    assert flush_due(g, 4.9) == []
    [a] = flush_due(g, 5.0)
    assert len(a.alerts) == 5
    assert a.group_labels == {"kind": "unit_exited", "node": "node-a"}
    assert a.reason == "new"
    assert a.headline() == "[FIRING:5] unit_exited on node-a"
    assert a.common_labels["group"] == "gpu"
    assert "unit" not in a.common_labels
    [b] = flush_due(g, 6.0)
    assert [x.incident_id for x in b.alerts] == [9]


def test_changes_go_out_at_most_once_per_group_interval_and_quiet_groups_repeat() -> None:
    g = groups()
    g.apply(note(1), now=0.0)
    flush_due(g, 5.0)
    g.apply(note(1, "action", action="restart_unit"), now=10.0)
    assert g.next_due() == 65.0  # last sent at 5, group_interval 60
    g.apply(note(1, "outcome", action="restart_unit", outcome="failed", text="not healthy within 3s"), now=20.0)
    assert flush_due(g, 64.0) == []
    [update] = flush_due(g, 65.0)
    assert update.reason == "update"
    [alert] = update.alerts
    assert alert.did == "restart_unit"
    assert alert.worked == "no — restart_unit failed: not healthy within 3s"
    assert alert.changes == ("restart_unit started", "restart_unit failed")
    assert g.next_due() == 65.0 + 3600.0
    [repeat] = flush_due(g, 3665.0)
    assert repeat.reason == "repeat"
    assert repeat.alerts[0].changes == ()
    assert repeat.headline().endswith("(still unresolved)")


def test_a_change_after_a_long_quiet_spell_goes_out_at_once() -> None:
    g = groups()
    g.apply(note(1), now=0.0)
    flush_due(g, 5.0)
    g.apply(note(1, "escalated", text="crash loop"), now=500.0)
    assert g.next_due() == 500.0
    [message] = flush_due(g, 500.0)
    assert message.alerts[0].worked == "no — escalated to a human: crash loop"
    assert message.alerts[0].did == "paged a human"


def test_resolved_incidents_leave_the_group_once_said_and_an_empty_group_is_forgotten() -> None:
    g = groups(group_wait=0.0, group_interval=1.0)
    g.apply(note(1), now=0.0)
    g.apply(note(2, unit="db"), now=0.0)
    flush_due(g, 0.0)
    for action in ("restart_unit", "restart_unit", "stop_unit"):
        g.apply(note(1, "action", action=action), now=1.0)
    g.apply(note(1, "resolved", text="cleared"), now=1.0)
    [message] = flush_due(g, 1.0)
    assert message.status == "firing"
    assert message.firing == 1
    assert [(a.incident_id, a.status) for a in message.alerts] == [(2, "firing"), (1, "resolved")]
    assert message.alerts[1].did == "restart_unit x2, then stop_unit"
    assert message.alerts[1].worked == "yes — resolved: cleared"
    g.apply(note(2, "resolved"), now=2.0)
    [last] = flush_due(g, 2.0)
    assert last.status == "resolved"
    assert last.headline() == "[RESOLVED] unit_exited on node-a/db"
    assert len(g) == 0
    assert g.next_due() is None


def test_silenced_incidents_keep_their_state_but_stay_out_of_messages() -> None:
    g = groups(group_wait=0.0, group_interval=1.0)
    g.apply(note(1), now=0.0)
    g.apply(note(2, unit="db"), now=0.0)

    def silenced(labels: object) -> bool:
        return labels["unit"] == "db"  # type: ignore[index]
    [message] = flush_due(g, 0.0, silenced)
    assert [a.incident_id for a in message.alerts] == [1]
    g.apply(note(2, "resolved"), now=1.0)
    assert flush_due(g, 1.0, silenced) == []  # only the silenced one changed: nothing to say
    assert flush_due(g, 3601.0, lambda labels: True) == []  # all silenced: the repeat is muted too


def test_groups_and_incidents_per_group_are_bounded() -> None:
    g = Groups(group_by=("node",), group_wait=1.0, group_interval=1.0, repeat_interval=1.0, max_groups=3,
               max_alerts=4, max_shown=2)
    for n in range(10):
        g.apply(note(n, node=f"n{n}"), now=float(n))
    assert len(g) == 3
    for i in range(10, 20):
        g.apply(note(i, node="n9", unit=f"u{i}"), now=20.0)
    [message] = [m for m in flush_due(g, 100.0) if m.group_labels == {"node": "n9"}]
    assert len(message.alerts) == 2
    assert message.truncated == 2


def test_formatters_cover_every_configurable_kind() -> None:
    kinds = NotifyConfig.__annotations__["kind"]
    assert set(default_formatters()) == {"slack", "mattermost", "teams", "discord", "googlechat", "alertmanager"}
    assert all(k in kinds for k in default_formatters())


def test_text_cannot_ping_anyone() -> None:
    g = groups(group_wait=0.0)
    n = note(1)
    g.apply(Notification(**{**{f: getattr(n, f) for f in n.__slots__},  # type: ignore[arg-type]
                            "summary": "<!channel> @here @all <users/all> & co"}), now=0.0)
    [message] = flush_due(g, 0.0)
    formatters = default_formatters()
    slack = str(formatters["slack"].render(message))
    assert "<!channel>" not in slack
    assert "&lt;!channel&gt;" in slack
    assert "&amp; co" in slack
    assert "@here" not in str(formatters["mattermost"].render(message))
    assert formatters["discord"].render(message)["allowed_mentions"] == {"parse": []}
    assert "<users/all>" not in str(formatters["googlechat"].render(message)["cardsV2"])


# --- Retry-After, token bucket ---------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    ("1", 1.0), ("0.5", 0.5), (" 120 ", 120.0), ("-3", 0.0), ("", None), (None, None), ("soon", None),
    ("Wed, 21 Oct 2015 07:28:10 GMT", 10.0),  # now is 07:28:00
    ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),  # already past
])
def test_retry_after_is_seconds_or_an_http_date(value: str | None, expected: float | None) -> None:
    now = 1445412480.0  # Wed, 21 Oct 2015 07:28:00 GMT
    assert parse_retry_after(value, now) == expected


def test_the_token_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(per_minute=60, burst=3, now=0.0)
    assert [bucket.reserve(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.reserve(0.0) == pytest.approx(1.0)
    assert bucket.reserve(0.0) == pytest.approx(2.0)  # queued behind the previous reservation
    assert bucket.reserve(10.0) == 0.0  # refilled (capped at the burst)


# --- secrets ----------------------------------------------------------------------------------------------


def test_urls_are_redacted_to_scheme_and_host() -> None:
    assert redact(URL) == "https://hooks.slack.com/…"
    assert redact("http://127.0.0.1:8080/hook?token=abc") == "http://127.0.0.1:8080/…"
    assert "SECRET" not in scrub(f"POST {URL} failed; path /services/T000/B000/SECRETSECRET", [URL])
    destination = Destination(name="ops", kind="slack", url=URL)
    assert "SECRET" not in repr(destination)
    assert "SECRET" not in str(destination)


def test_the_httpx_request_log_line_is_rewritten(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    logger = logging.getLogger("httpx")
    redacting = RedactingFilter([URL])
    logger.addFilter(redacting)
    try:
        logger.info('HTTP Request: %s %s "%s %d %s"', "POST", URL, "HTTP/1.1", 200, "OK")
    finally:
        logger.removeFilter(redacting)
    assert "HTTP Request: POST https://hooks.slack.com/… \"HTTP/1.1 200 OK\"" in caplog.text
    assert "SECRET" not in caplog.text


# --- config -------------------------------------------------------------------------------------------------


def _config(tmp_path: Path, notify: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(notify)
    return path


def test_a_destination_takes_defaults_like_alertmanager(tmp_path: Path) -> None:
    config = load_config(_config(tmp_path, f'[[controller.notify]]\nkind = "slack"\nurl = "{URL}"\n'))
    [notify] = config.controller.notify
    assert (notify.group_by, notify.group_wait, notify.group_interval, notify.repeat_interval) == (
        ["kind", "node"], 5.0, 60.0, 14400.0)
    assert (notify.rate, notify.burst, notify.timeout, notify.matchers) == (20.0, 5, 10.0, {})
    assert Destination.from_config(notify, 0).name == "slack-0"
    assert "SECRET" not in repr(notify)
    assert "SECRET" not in repr(config)


def test_matchers_and_timing_are_read_from_toml(tmp_path: Path) -> None:
    config = load_config(_config(tmp_path, f"""
[[controller.notify]]
kind = "teams"
name = "gpu-oncall"
url = "{URL}"
matchers = {{ severity = "critical", group = "gpu-*" }}
group_by = ["node"]
group_wait = 0
rate = 6.0
burst = 1
"""))
    destination = Destination.from_config(config.controller.notify[0], 0)
    assert destination.name == "gpu-oncall"
    assert destination.group_by == ("node",)
    assert destination.routes({"severity": "critical", "group": "gpu-a", "node": "n"})
    assert not destination.routes({"severity": "warning", "group": "gpu-a"})
    assert not destination.routes({"severity": "critical"})


@pytest.mark.parametrize(("body", "path", "message"), [
    ('kind = "slack"\nurl = "hooks.slack.com/services/SECRET"', "controller.notify[0].url", "http:// or https://"),
    ('kind = "slack"\nurl = "ftp://x/SECRET"', "controller.notify[0].url", "not shown"),
    ('kind = "irc"\nurl = "https://x/SECRET"', "controller.notify[0].kind", ""),
    ('kind = "slack"\nurl = "https://x/SECRET"\ngroup_interval = 0', "controller.notify[0].group_interval", "> 0"),
    ('kind = "slack"\nurl = "https://x/SECRET"\nburst = 0', "controller.notify[0].burst", ">= 1"),
    ('kind = "slack"\nurl = "https://x/SECRET"\ngroup_by = []', "controller.notify[0].group_by", "at least one"),
    ('kind = "slack"\nurl = "https://x/SECRET"\nname = "bad name"', "controller.notify[0].name", "must match"),
    ('kind = "slack"\nurl = "https://x/SECRET"\nmatchers = { severity = "" }', "controller.notify[0].matchers",
     "non-empty"),
])
def test_bad_destinations_name_the_key_and_never_the_url(tmp_path: Path, body: str, path: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(_config(tmp_path, f"[[controller.notify]]\n{body}\n"))
    assert caught.value.path == path
    assert message in str(caught.value)
    assert "SECRET" not in str(caught.value)


def test_destination_names_are_unique(tmp_path: Path) -> None:
    two = f'[[controller.notify]]\nkind = "slack"\nurl = "{URL}"\nname = "ops"\n' * 2
    with pytest.raises(ConfigError, match="duplicate destination name 'ops'") as caught:
        load_config(_config(tmp_path, two))
    assert caught.value.path == "controller.notify[1].name"
