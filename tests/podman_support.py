"""A real container engine for the ``docker`` unit kind's tests: Podman's Docker-compatible API service.

``start_podman_engine`` runs ``podman --runtime runc system service --time=0 unix://<dir>/podman.sock``
with storage, run and tmp dirs of its own under ``dir`` (so it shares nothing with other Podman users on
the machine), and builds ``localhost/busybox:selfheal-test`` with ``podman import`` from the host's
``/bin/busybox`` (Debian's ``busybox-static``): no registry is needed. Containers use the host's network
(``network_mode = "host"``: nothing to set up) and explicit ``nofile``/``nproc`` ulimits.

Missing tools fail the test with the Debian package to install (``.ci/run`` installs them).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

from tests.conftest import require_binary

IMAGE = "localhost/busybox:selfheal-test"
ULIMITS = {"nofile": [1024, 1024], "nproc": [1024, 1024]}
APPLETS = ("sh", "sleep", "httpd", "kill", "echo", "cat", "true", "false", "wget", "mkdir", "head", "tr")
SOCKET_WAIT = 30.0


@dataclass
class PodmanEngine:
    directory: Path
    url: str
    """``unix://.../podman.sock``: what ``docker.url`` (or ``DOCKER_HOST``) names."""
    podman: list[str]
    """argv prefix of the ``podman`` CLI on this engine's storage."""
    process: subprocess.Popen[bytes]
    image: str = IMAGE

    def client(self) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.url, timeout=30)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.podman, *args], capture_output=True, text=True, timeout=60, check=check)

    def run(self, name: str, command: list[str], **options: Any) -> dict[str, Any]:
        """Create and start a container the way an orchestrator would; returns its inspect."""
        client = self.client()
        try:
            container = client.containers.run(
                self.image, command, name=name, detach=True, network_mode="host",
                ulimits=[docker.types.Ulimit(name=k, soft=s, hard=h) for k, (s, h) in ULIMITS.items()], **options)
            container.reload()
            return dict(container.attrs)
        finally:
            client.close()

    def inspect(self, name: str) -> dict[str, Any] | None:
        client = self.client()
        try:
            return dict(client.api.inspect_container(name))
        except docker.errors.NotFound:
            return None
        finally:
            client.close()

    def remove(self, name: str) -> None:
        self.cli("rm", "--force", "--time", "0", name, check=False)

    def stop(self) -> None:
        self.cli("rm", "--all", "--force", "--time", "0", check=False)
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        swept = sweep_orphans(self.directory)
        if swept:
            print(f"podman_support: removed {swept} container(s) Podman had lost track of", file=sys.stderr)
        # The overlay driver bind-mounts its own directory; left mounted, the temp dir could not be removed.
        overlay = self.directory / "storage" / "overlay"
        if overlay.is_mount():
            subprocess.run(["umount", str(overlay)], capture_output=True, timeout=30, check=False)


def sweep_orphans(directory: Path) -> int:
    """Delete runc containers whose bundle lies under ``directory`` that Podman no longer knows.

    Seen with Podman 4.3: a container force-removed while the API service restarts it can leave its runc
    container (and conmon) running after its record is gone; nothing of a test session may outlive it."""
    listed = subprocess.run(["runc", "list", "--format", "json"], capture_output=True, text=True, timeout=30,
                            check=False)
    swept = 0
    for container in json.loads(listed.stdout or "null") or []:
        if str(container.get("bundle", "")).startswith(f"{directory}/"):
            subprocess.run(["runc", "delete", "--force", container["id"]], capture_output=True, timeout=30,
                           check=False)
            swept += 1
    return swept


def busybox_rootfs() -> bytes:
    """A tarball holding ``/bin/busybox``, applet links, a passwd file and a page for ``httpd`` to serve."""
    busybox = Path("/bin/busybox")
    if not busybox.is_file():
        pytest.fail("/bin/busybox not found: install the Debian package 'busybox-static' "
                    "(apt-get install -y busybox-static)")
    listed = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=False).stdout.split()
    if "httpd" not in listed:
        pytest.fail(f"{busybox} has no httpd applet: install the Debian package 'busybox-static'")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for directory in ("bin", "etc", "tmp", "www"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if directory == "tmp" else 0o755
            tar.addfile(info)
        tar.add(str(busybox), arcname="bin/busybox")
        for applet in APPLETS:
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
        for name, text in (("etc/passwd", "root:x:0:0:root:/:/bin/sh\n"), ("etc/group", "root:x:0:\n"),
                           ("www/index.html", "selfheal\n")):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def start_podman_engine(directory: Path) -> PodmanEngine:
    podman = require_binary("podman", "podman")
    require_binary("runc", "runc")
    directory.mkdir(parents=True, exist_ok=True)
    base = [podman, "--root", str(directory / "storage"), "--runroot", str(directory / "run"),
            "--tmpdir", str(directory / "tmp"), "--runtime", "runc", "--cgroup-manager", "cgroupfs",
            "--events-backend", "file"]
    rootfs = directory / "busybox.tar"
    rootfs.write_bytes(busybox_rootfs())
    imported = subprocess.run([*base, "import", str(rootfs), IMAGE], capture_output=True, text=True, timeout=120,
                              check=False)
    if imported.returncode != 0:
        pytest.fail(f"podman import failed ({imported.returncode}): {imported.stderr.strip()}")
    sock = directory / "podman.sock"
    log = (directory / "service.log").open("ab")
    process = subprocess.Popen([*base, "system", "service", "--time=0", f"unix://{sock}"],
                               stdout=log, stderr=subprocess.STDOUT)
    log.close()
    engine = PodmanEngine(directory=directory, url=f"unix://{sock}", podman=base, process=process)
    deadline = time.monotonic() + SOCKET_WAIT
    while True:
        if process.poll() is not None:
            pytest.fail(f"podman system service exited ({process.returncode}): "
                        f"{(directory / 'service.log').read_text(errors='replace')[-2000:]}")
        if sock.exists():
            try:
                client = engine.client()
                client.ping()
                client.close()
                break
            except docker.errors.DockerException:
                pass
        if time.monotonic() > deadline:
            engine.stop()
            pytest.fail(f"podman system service did not answer on {sock} within {SOCKET_WAIT}s")
        time.sleep(0.1)
    return engine
