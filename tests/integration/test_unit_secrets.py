"""A workload cannot take the node's command key from the agent (issue 13, "leaked key").

A real ``selfheal agent`` process holds its key three ways at once: a file in
``key_dir``, the deprecated ``$SELFHEAL_COMMAND_KEY`` and a systemd-style
``$CREDENTIALS_DIRECTORY/command.key``. Its process unit and that unit's exec
probe dump their environment: neither holds the key, any ``SELFHEAL_*`` the
agent had, or the way to its credentials. A unit run as ``nobody`` has
nobody's uid and groups, cannot read the key file (0600 root), can write its
progress file in its own working directory, and a unit naming a user that
does not exist fails to start, saying why.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.units.base import UnitContext
from agent.units.process import ProcessUnit
from selfheal.clocks import SystemClock
from selfheal.config import UnitConfig
from selfheal.errors import UnitError
from selfheal.keys import CREDENTIAL, write_key
from tests.conftest import Broker, eventually_sync

pytestmark = pytest.mark.integration

NODE = "secret-node"
ENV_KEY_HEX = "ab" * 32
CREDENTIAL_HEX = "cd" * 32
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory ``nobody`` can reach (pytest's tmp_path is root's alone): outputs, and the key directory."""
    path = Path(tempfile.mkdtemp(prefix="selfheal-secrets-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _toml_list(argv: list[str]) -> str:
    return "[" + ", ".join(json.dumps(a) for a in argv) + "]"


def _sh(script: str) -> list[str]:
    return ["/bin/sh", "-c", script]


@dataclass
class Node:
    """An agent's key material, where its units write, and the agent process."""

    keys: Path
    key_file: Path
    credentials: Path
    out: Path
    state: Path
    log: Path

    @property
    def secrets(self) -> tuple[str, ...]:
        return self.key_file.read_text().strip(), ENV_KEY_HEX, CREDENTIAL_HEX


@pytest.fixture
def node(tmp_path: Path, shared: Path) -> Node:
    """The key three ways: a 0600 root file in a directory anyone may look in (only the file's own mode keeps
    others out), the deprecated variable, and a credential."""
    keys = shared / "keys"
    key_file = write_key(keys, NODE)
    keys.chmod(0o755)
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / CREDENTIAL).write_text(CREDENTIAL_HEX + "\n")
    out = shared / "out"
    out.mkdir()
    out.chmod(0o777)
    return Node(keys=keys, key_file=key_file, credentials=credentials, out=out, state=tmp_path / "state",
                log=tmp_path / "agent.log")


@contextmanager
def running_agent(node: Node, broker: Broker, units: str) -> Iterator[subprocess.Popen[bytes]]:
    config = node.state.parent / "agent.toml"
    config.write_text(
        f'[mqtt]\nurl = "{broker.url}"\nkeepalive = 1.0\nreconnect_max = 1.0\n'
        f'[agent]\nnode_id = "{NODE}"\ninterval = 0.5\nstate_dir = "{node.state}"\nlisten = "127.0.0.1:0"\n'
        f'{units}[security]\nkey_dir = "{node.keys}"\n')
    env = {**os.environ, "SELFHEAL_LOG__FORMAT": "json", "SELFHEAL_COMMAND_KEY": ENV_KEY_HEX,
           "CREDENTIALS_DIRECTORY": str(node.credentials)}
    with node.log.open("ab") as sink:
        agent = subprocess.Popen([sys.executable, "-m", "selfheal", "agent", "--config", str(config)],
                                 stdout=sink, stderr=subprocess.STDOUT, env=env)
    try:
        yield agent
        for secret in node.secrets:
            assert secret not in node.log.read_text()
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(30)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()


def _variables(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def _written(*paths: Path) -> bool:
    return all(path.exists() and path.stat().st_size > 0 for path in paths)


def _assert_clean(path: Path, node: Node) -> dict[str, str]:
    dumped = path.read_text()
    for secret in node.secrets:
        assert secret not in dumped, path.name
    variables = _variables(path)
    for name in ("CREDENTIALS_DIRECTORY", "SELFHEAL_COMMAND_KEY", "SELFHEAL_LOG__FORMAT"):
        assert name not in variables, (path.name, name)
    assert "PATH" in variables, path.name
    return variables


def test_units_and_probes_never_see_the_agents_key(node: Node, mosquitto: Broker) -> None:
    out = node.out
    units = (
        f'[[agent.units]]\nname = "dump"\nkind = "process"\n'
        f'command = {_toml_list(_sh(f"env > {out}/unit.env; exec sleep 600"))}\n'
        'env = { UNIT_OWN = "kept", SELFHEAL_DUMP_OPTION = "set-by-the-operator" }\n'
        f'[agent.units.probe]\nkind = "exec"\ntarget = {_toml_list(_sh(f"env > {out}/probe.env"))}\ninterval = 0.2\n'
        '[[agent.units]]\nname = "ghost"\nkind = "process"\nuser = "no-such-user-h5"\n'
        f'command = {_toml_list(_sh("exec sleep 600"))}\n')
    with running_agent(node, mosquitto, units):
        eventually_sync(lambda: _written(out / "unit.env", out / "probe.env")
                        and "does not exist" in node.log.read_text(), timeout=30,
                        what="the unit, its probe and the refusal")
        unit_env = _assert_clean(out / "unit.env", node)
        _assert_clean(out / "probe.env", node)
        assert unit_env["UNIT_OWN"] == "kept"
        assert unit_env["SELFHEAL_DUMP_OPTION"] == "set-by-the-operator"  # the unit's own env, from agent.toml
        failed = [json.loads(line) for line in node.log.read_text().splitlines()
                  if line.startswith("{") and '"unit.start_failed"' in line]
        assert any(entry.get("unit") == "ghost" and "user 'no-such-user-h5' does not exist" in entry["detail"]
                   for entry in failed), failed


@needs_root
def test_a_unit_run_as_nobody_cannot_read_the_key(node: Node, mosquitto: Broker) -> None:
    out = node.out
    as_nobody = _sh(
        f"id -u > {out}/nobody.uid; id -G > {out}/nobody.groups; env > {out}/nobody.env;"
        f" cat {node.key_file} > {out}/nobody.leak 2> {out}/nobody.err;"
        f" cat {node.credentials / CREDENTIAL} >> {out}/nobody.leak 2>> {out}/nobody.err;"
        ' printf \'{"done": 1, "total": 2, "stage": "x", "updated_at": 0}\' > "$SELFHEAL_PROGRESS_FILE";'
        " exec sleep 600")
    units = (
        '[[agent.units]]\nname = "runs-as-nobody"\nkind = "process"\nuser = "nobody"\n'
        f'command = {_toml_list(as_nobody)}\nprogress_file = "progress.json"\n'
        f'[agent.units.probe]\nkind = "exec"\ntarget = {_toml_list(_sh(f"id -u > {out}/probe-nobody.uid"))}\n'
        'interval = 0.2\n')
    work = node.state / "work" / "runs-as-nobody"
    with running_agent(node, mosquitto, units):
        eventually_sync(lambda: _written(out / "nobody.env", out / "nobody.err", out / "probe-nobody.uid",
                                         work / "progress.json"), timeout=30, what="the unit run as nobody")
        nobody = pwd.getpwnam("nobody")
        assert int((out / "nobody.uid").read_text()) == nobody.pw_uid
        assert int((out / "probe-nobody.uid").read_text()) == nobody.pw_uid  # its probe runs as nobody too
        groups = [str(g) for g in os.getgrouplist("nobody", nobody.pw_gid)]
        assert (out / "nobody.groups").read_text().split() == groups
        assert (out / "nobody.leak").read_text() == ""
        assert (out / "nobody.err").read_text().count("Permission denied") == 2
        variables = _assert_clean(out / "nobody.env", node)
        assert (variables["USER"], variables["HOME"]) == ("nobody", nobody.pw_dir)
        assert variables["SELFHEAL_PROGRESS_FILE"] == "progress.json"  # its state dir is not nobody's to cross
        info = work.stat()
        assert (info.st_uid, info.st_gid, info.st_mode & 0o7777) == (nobody.pw_uid, nobody.pw_gid, 0o700)


@needs_root
async def test_an_agent_that_is_not_root_refuses_to_switch_users(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The refusal path on an agent running as an ordinary user: the unit is failed, with the reason."""
    monkeypatch.setattr(os, "geteuid", lambda: 4321)
    ctx = UnitContext(node_id="n", state_dir=tmp_path, emit=lambda _: None, clock=SystemClock())
    unit = ProcessUnit(UnitConfig(name="svc", command=["/bin/true"], user="nobody"), ctx)
    with pytest.raises(UnitError, match="cannot run as user 'nobody': the agent runs as uid 4321, not root"):
        await unit.start()
    report = unit.report()
    assert report.state == "failed"
    assert "not root" in report.error
    assert report.pid is None
