"""The unit files as systemd reads them: ``selfheal install --root`` renders a tree whose units verify
cleanly, whose hardening scores within the issue's thresholds, and whose users and tmpfiles apply."""

from __future__ import annotations

import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_binary

pytestmark = pytest.mark.integration

MAX_EXPOSURE = {"selfheal-controller": 2.0, "selfheal-agent": 5.0}
"""``systemd-analyze security`` exposure (0 best, 10 worst); a fully hardened unit scores about 1.1 on 252."""


def install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "selfheal", "install", "--root", str(root), *args],
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("root")
    done = install(root)
    assert done.returncode == 0, done.stderr
    return root


def units(root: Path) -> list[Path]:
    found = sorted((root / "etc/systemd/system").glob("selfheal-*.service"))
    assert [p.stem for p in found] == ["selfheal-agent", "selfheal-controller"]
    return found


def test_every_unit_verifies_without_a_word(tree: Path) -> None:
    analyze = require_binary("systemd-analyze", "systemd")
    for unit in units(tree):
        done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False)
        assert (done.returncode, done.stdout + done.stderr) == (0, ""), unit.name


def test_exposure_scores(tree: Path) -> None:
    analyze = require_binary("systemd-analyze", "systemd")
    for unit in units(tree):
        done = subprocess.run([analyze, "security", "--offline=yes", str(unit)],
                              capture_output=True, text=True, timeout=60, check=False)
        match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
        assert match, done.stdout[-2000:] + done.stderr
        score = float(match.group(1))
        print(f"{unit.stem}: exposure {score}")
        assert score <= MAX_EXPOSURE[unit.stem], done.stdout


def test_rendered_for_this_venv(tree: Path) -> None:
    for unit in units(tree):
        text = unit.read_text()
        assert f"ExecStart={sys.prefix}/bin/selfheal " in text
        assert "/opt/selfheal/venv" not in text.split("[Unit]", 1)[1]
        assert "RestartPreventExitStatus=78" in text
        assert "Type=notify" in text
        assert "WatchdogSec=" in text
    agent = (tree / "etc/systemd/system/selfheal-agent.service").read_text()
    assert "User=selfheal-agent" in agent
    assert "DynamicUser" not in agent
    assert "DynamicUser=yes" in (tree / "etc/systemd/system/selfheal-controller.service").read_text()


def test_skeletons_are_valid_configs_and_secrets_are_private(tree: Path) -> None:
    for role in ("agent", "controller"):
        path = tree / f"etc/selfheal/{role}.toml"
        done = subprocess.run([sys.executable, "-m", "selfheal", "config", "check", str(path), "--role", role],
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert stat.S_IMODE((tree / f"etc/selfheal/{role}.env").stat().st_mode) == 0o600
    assert stat.S_IMODE((tree / "etc/selfheal/api.token").stat().st_mode) == 0o640


def test_sysusers_and_tmpfiles_apply_to_the_tree(tree: Path) -> None:
    sysusers = require_binary("systemd-sysusers", "systemd")
    tmpfiles = require_binary("systemd-tmpfiles", "systemd")
    (tree / "etc/passwd").touch()
    (tree / "etc/group").touch()
    done = subprocess.run([sysusers, f"--root={tree}", "selfheal.conf"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^selfheal-agent:x:\d+:\d+:", (tree / "etc/passwd").read_text(), re.M)
    group = re.search(r"^selfheal-keys:x:(\d+):", (tree / "etc/group").read_text(), re.M)
    assert group
    done = subprocess.run([tmpfiles, f"--root={tree}", "--create", "selfheal.conf"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    keys = (tree / "etc/selfheal/keys").stat()
    assert (stat.S_IMODE(keys.st_mode), keys.st_gid) == (0o750, int(group.group(1)))
    token = (tree / "etc/selfheal/api.token").stat()
    assert (stat.S_IMODE(token.st_mode), token.st_gid) == (0o640, int(group.group(1)))


def test_install_keeps_configs_and_renders_from_them(tmp_path: Path) -> None:
    config = tmp_path / "etc/selfheal/agent.toml"
    config.parent.mkdir(parents=True)
    config.write_text('[agent]\nnode_id = "keep-me"\n[[agent.datasets]]\nname = "model"\npath = "/srv/models"\n')
    done = install(tmp_path, "--role", "agent")
    assert done.returncode == 0, done.stderr
    assert "kept" in done.stdout
    assert config.read_text().startswith('[agent]\nnode_id = "keep-me"')
    unit = (tmp_path / "etc/systemd/system/selfheal-agent.service").read_text()
    assert "ReadWritePaths=-/srv/models" in unit
    assert not (tmp_path / "etc/systemd/system/selfheal-controller.service").exists()
    assert "systemctl enable --now selfheal-agent.service" in done.stdout


def test_install_refuses_a_bad_agent_config(tmp_path: Path) -> None:
    config = tmp_path / "etc/selfheal/agent.toml"
    config.parent.mkdir(parents=True)
    config.write_text('[agent]\nnode_id = "Bad Id"\n')
    done = install(tmp_path, "--role", "agent")
    assert done.returncode == 78, done.stdout + done.stderr
    assert "agent.node_id" in done.stderr
    assert not (tmp_path / "etc/systemd/system/selfheal-agent.service").exists()


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    done = install(tmp_path, "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "would write" in done.stdout
    assert "[Service]" in done.stdout
    assert "(a new random token)" in done.stdout
    assert list(tmp_path.iterdir()) == []
