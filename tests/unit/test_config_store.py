"""``[store] url``: which state store the controller opens, checked without quoting a password back."""

from __future__ import annotations

from pathlib import Path

import pytest

from selfheal.config import load_config
from selfheal.config_checks import redact_url
from selfheal.errors import ConfigError


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
    path = tmp_path / "selfheal.toml"
    path.write_text(text, encoding="utf-8")
    return load_config(path, env=env or {}).store.url


def test_without_a_store_table_the_url_is_empty_for_sqlite(tmp_path: Path) -> None:
    assert load(tmp_path, "") == ""


@pytest.mark.parametrize("url", ["postgresql://selfheal@db-host/selfheal", "postgres://db-host:5433/fleet",
                                 "postgresql:///selfheal?host=/run/postgresql"])
def test_a_postgresql_url_is_taken(tmp_path: Path, url: str) -> None:
    assert load(tmp_path, f'[store]\nurl = "{url}"\n') == url


def test_the_environment_can_name_the_store(tmp_path: Path) -> None:
    assert load(tmp_path, "", env={"SELFHEAL_STORE__URL": "postgresql://db/selfheal"}) == "postgresql://db/selfheal"


@pytest.mark.parametrize("url", ["mysql://root:hunter2@db/selfheal", "/var/lib/selfheal/selfheal.sqlite3",
                                 "postgresql:hunter2"])
def test_anything_else_is_refused_without_showing_it(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigError, match=r"store\.url: must be a postgresql:// URL") as refused:
        load(tmp_path, f'[store]\nurl = "{url}"\n')
    assert "hunter2" not in str(refused.value)


def test_an_unknown_store_key_names_its_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"store\.dsn: unknown key"):
        load(tmp_path, '[store]\ndsn = "postgresql://db/selfheal"\n')


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://selfheal:hunter2@db:5432/fleet", "postgresql://selfheal:***@db:5432/fleet"),
    ("postgresql://selfheal@db/fleet?sslmode=require&password=hunter2",
     "postgresql://selfheal@db/fleet?sslmode=require&password=***"),
    ("postgresql://db/fleet", "postgresql://db/fleet"),
])
def test_a_url_is_shown_without_its_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown
