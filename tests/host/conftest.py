"""A real systemd as PID 1: a Debian bookworm system image, built once and cached, booted under Podman.

The image: ``debootstrap --variant=minbase --include=systemd,systemd-sysv,
dbus,polkitd,libpam-systemd,python3 bookworm`` (``libpam-systemd`` provides
the ``logind`` that ``polkitd`` depends on, which debootstrap does not
resolve by itself), then ``podman import``. The root file system is cached
under ``$SELFHEAL_TEST_CACHE`` (default ``/var/cache/selfheal-test``) and the
image in Podman's store, both outside the repository; a lock keeps two test
runs from building at once.

The container: ``podman --runtime runc run -d --systemd=always
--network=host`` with ``/lib/systemd/systemd`` as PID 1, explicit nofile and
nproc ulimits, and the checkout, its venv and the interpreter that venv
links to bind-mounted read-only at the same paths, so ``selfheal install``
inside renders units for exactly this code. It also gets ``--cap-add
SYS_ADMIN``: without it the container's systemd cannot build its services'
mount namespaces and (systemd 252) starts them without ``ProtectSystem=``,
``ProtectHome=``, ``ReadWritePaths=`` and the like — the units would run,
but not as hardened as on a host — and ``--cap-add DAC_READ_SEARCH``, which
Podman leaves out of a container's bounding set and an agent running units
as other users takes (README, "Security"). Once booted, ``mount --make-rshared /``
does what systemd does on a host and skips in a container, so services'
credentials (``LoadCredential=``) reach them. With the host's network, the agent inside
reaches the test's Mosquitto and controller on loopback.

When the engine cannot build or boot the system, the test fails with the
engine's own error; it never skips.
"""

from __future__ import annotations

import fcntl
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from selfheal.keys import read_key, write_key
from tests.conftest import Broker, eventually_sync, free_port, require_binary

RECIPE = 1
"""Bump when the image recipe changes: the cache key of the root file system and the image tag."""
IMAGE = f"localhost/selfheal-systemd:bookworm-{RECIPE}"
PACKAGES = "systemd,systemd-sysv,dbus,polkitd,libpam-systemd,python3"
MIRROR = "http://deb.debian.org/debian"
CHECKOUT = Path(__file__).resolve().parents[2]


def _cache() -> Path:
    return Path(os.environ.get("SELFHEAL_TEST_CACHE", "/var/cache/selfheal-test"))


def _run(argv: Sequence[str], *, what: str, timeout: float = 120, input_text: str | None = None
         ) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, input=input_text, check=False)
    if done.returncode != 0:
        pytest.fail(f"{what} failed (exit {done.returncode}): {' '.join(argv)}\n{done.stdout[-3000:]}"
                    f"\n{done.stderr[-3000:]}")
    return done


def build_image() -> str:
    """The cached image, built on first use (debootstrap takes a few minutes; the import seconds)."""
    podman = require_binary("podman", "podman")
    if subprocess.run([podman, "image", "exists", IMAGE], check=False).returncode == 0:
        return IMAGE
    cache = _cache()
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / "build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if subprocess.run([podman, "image", "exists", IMAGE], check=False).returncode == 0:
            return IMAGE
        rootfs = cache / f"rootfs-bookworm-{RECIPE}"
        if not (rootfs / ".complete").exists():
            debootstrap = require_binary("debootstrap", "debootstrap")
            partial = cache / "rootfs.partial"
            shutil.rmtree(partial, ignore_errors=True)
            shutil.rmtree(rootfs, ignore_errors=True)
            _run([debootstrap, "--variant=minbase", f"--include={PACKAGES}", "bookworm", str(partial), MIRROR],
                 what="debootstrap", timeout=1500)
            partial.rename(rootfs)
            (rootfs / ".complete").touch()
        with subprocess.Popen(["tar", "-C", str(rootfs), "--exclude=./.complete", "-c", "."],
                              stdout=subprocess.PIPE) as tar:  # the context closes the pipe and waits
            done = subprocess.run([podman, "import", "--change", 'CMD ["/lib/systemd/systemd"]', "-", IMAGE],
                                  stdin=tar.stdout, capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0:
            pytest.fail(f"podman import failed: {done.stderr[-3000:]}")
    return IMAGE


@dataclass
class SystemdHost:
    """A booted container; ``run`` executes inside it."""

    name: str
    podman: str

    def run(self, *argv: str, check: bool = True, input_text: str | None = None, timeout: float = 120
            ) -> subprocess.CompletedProcess[str]:
        cmd = [self.podman, "exec", *(["-i"] if input_text is not None else []), self.name, *argv]
        if check:
            return _run(cmd, what=f"in the container: {argv[0]}", timeout=timeout, input_text=input_text)
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input_text, check=False)

    def sh(self, script: str, *, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-c", script, check=check, timeout=timeout)

    def write(self, path: str, text: str, mode: str = "0644") -> None:
        self.run("sh", "-c", f'mkdir -p "$(dirname {path})" && cat > {path} && chmod {mode} {path}', input_text=text)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str, lines: int = 60) -> str:
        return self.run("journalctl", "-u", unit, "--no-pager", "-n", str(lines), check=False).stdout

    def wait_show(self, unit: str, check: Callable[[dict[str, str]], bool], *props: str, timeout: float = 60,
                  what: str = "unit state") -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            values = self.show(unit, *props)
            if check(values):
                return values
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}: {values}\n"
                                     f"{self.journal(unit)}")
            time.sleep(0.3)


def _mounts() -> list[str]:
    paths = [str(CHECKOUT), sys.prefix, os.path.realpath(sys.base_prefix)]
    unique: list[str] = []
    for path in paths:
        if not any(path == p or path.startswith(p + "/") for p in unique):
            unique.append(path)
    return [arg for path in unique for arg in ("-v", f"{path}:{path}:ro")]


@pytest.fixture(scope="module")
def systemd_host() -> Iterator[SystemdHost]:
    podman = require_binary("podman", "podman")
    require_binary("runc", "runc")
    image = build_image()
    name = f"selfheal-systemd-{os.getpid()}"
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
    subprocess.run([podman, "rm", "-f", "-t", "0", name], capture_output=True, check=False)
    _run([podman, "--runtime", "runc", "run", "-d", "--name", name, "--systemd=always", "--network=host",
          "--cap-add", "SYS_ADMIN", "--cap-add", "DAC_READ_SEARCH",
          "--ulimit", f"nofile={nofile[0]}:{nofile[1]}", "--ulimit", "nproc=4096:4096",
          *_mounts(), image, "/lib/systemd/systemd"], what="podman run (booting systemd)")
    host = SystemdHost(name=name, podman=podman)
    try:
        deadline = time.monotonic() + 120
        while True:  # until PID 1 answers on its bus at all ("offline" until then); --wait for the boot
            booted = host.run("systemctl", "is-system-running", "--wait", check=False, timeout=120)
            state = booted.stdout.strip()
            if state not in ("", "offline", "unknown") or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if state not in ("running", "degraded"):
            logs = subprocess.run([podman, "logs", name], capture_output=True, text=True, check=False)
            pytest.fail(f"systemd in the container did not boot: {state!r} {booted.stderr.strip()}\n"
                        f"{logs.stdout[-3000:]}{logs.stderr[-3000:]}")
        if state == "degraded":
            print("systemd degraded:", host.run("systemctl", "--failed", "--no-legend", check=False).stdout)
        # systemd makes / shared at boot on a host, never in a container (Podman mounts it private). Its
        # credentials (LoadCredential=) are mounted in a namespace of their own and moved into
        # /run/credentials: without shared propagation the service finds an empty, root-only directory.
        host.run("mount", "--make-rshared", "/")
        yield host
    finally:
        subprocess.run([podman, "rm", "-f", "-t", "0", name], capture_output=True, check=False, timeout=120)


# --- the agent installed in the container, a controller on the host ---------------------------------

AGENT = "selfheal-agent.service"
SELFHEAL = f"{sys.prefix}/bin/selfheal"
DROP_IN = "[Service]\nWatchdogSec=3\nRestartSec=1\n"


def agent_toml(broker: Broker, node: str, *, interval: float = 0.5, level: str = "info") -> str:
    return (f'[mqtt]\nurl = "{broker.url}"\nkeepalive = 2.0\nreconnect_max = 1.0\n'
            f'[agent]\nnode_id = "{node}"\ninterval = {interval}\nlisten = "127.0.0.1:0"\n'
            f'[log]\nlevel = "{level}"\nformat = "json"\n')


@pytest.fixture(scope="module")
def node(request: pytest.FixtureRequest) -> str:
    """The agent's node id: one per test module (a node's session only grows, and each module's system
    starts its agent from session 1 again)."""
    return f"sysd-{os.getpid()}-{zlib.crc32(request.module.__name__.encode()) % 10000}"


@dataclass(frozen=True)
class HostController:
    api: str
    key_hex: str
    """The node's command key, which the agent gets as a systemd credential (``LoadCredential=``) of the root-only
    ``/etc/selfheal/keys/<node>.key``."""


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory, mosquitto: Broker, node: str) -> Iterator[HostController]:
    """``selfheal controller`` on the host, with the node's key."""
    root = tmp_path_factory.mktemp("controller")
    write_key(root / "keys", node)
    port = free_port()
    config = root / "controller.toml"
    config.write_text(f'[mqtt]\nurl = "{mosquitto.url}"\nkeepalive = 2.0\nreconnect_max = 1.0\n'
                      f'[controller]\nlisten = "127.0.0.1:{port}"\nstate_dir = "{root / "state"}"\n'
                      f'[security]\nkey_dir = "{root / "keys"}"\napi_token_file = "{root / "token"}"\n')
    with (root / "controller.log").open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "selfheal", "controller", "--config", str(config)],
                                stdout=log, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(f"{api}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        eventually_sync(ready, timeout=30, what="the controller on the host")
        key = read_key(root / "keys", node)
        assert key is not None
        yield HostController(api=api, key_hex=key.hex())
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(25)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def installed(systemd_host: SystemdHost, mosquitto: Broker, controller: HostController, node: str) -> SystemdHost:
    """The agent's config and key in place, then ``selfheal install`` as an operator runs it."""
    host = systemd_host
    host.write("/etc/selfheal/agent.toml", agent_toml(mosquitto, node), "0640")
    host.write(f"/etc/selfheal/keys/{node}.key", f"{controller.key_hex}\n", "0600")
    out = host.run(SELFHEAL, "install", "--role", "agent").stdout
    assert "kept     /etc/selfheal/agent.toml" in out, out
    assert "systemctl enable --now selfheal-agent.service" in out, out
    host.run("systemd-sysusers", "selfheal.conf")
    host.run("systemd-tmpfiles", "--create", "selfheal.conf")
    host.write(f"/etc/systemd/system/{AGENT}.d/50-test.conf", DROP_IN)
    host.run("systemctl", "daemon-reload")
    return host
