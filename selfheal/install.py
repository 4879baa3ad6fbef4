"""``selfheal install``: put the systemd units, users, tmpfiles and polkit rule in place for this venv.

The files in ``systemd/`` are the canonical units for the standard layout
(selfheal in ``/opt/selfheal/venv``). Installing renders them for the
virtual environment that runs the command:

- ``ExecStart=`` names this venv's ``selfheal``;
- when the venv, the interpreter it links to, or the source checkout of an
  editable install lies under ``/home``, ``/root`` or ``/run/user``,
  ``ProtectHome=tmpfs`` with ``BindReadOnlyPaths=`` for those paths replaces
  ``ProtectHome=yes`` (which would hide them); under ``/tmp`` or ``/var/tmp``,
  ``BindReadOnlyPaths=`` brings them into the private ones of ``PrivateTmp=yes``;
- the agent gets ``ReadWritePaths=`` for what ``agent.toml`` says it writes:
  dataset replicas (repairs), unit working directories, a non-default state
  dir;
- the polkit rule lists the agent's units of kind ``systemd``;
- the agent's ``LoadCredential=command.key:`` names ``/etc/selfheal/keys/<node_id>.key`` for the
  ``node_id`` of ``agent.toml`` (systemd reads the root-only file and gives the agent a private copy;
  no unit or probe of the agent is told where it is), and its ``MemoryMax=`` becomes ``infinity`` when
  it starts units of kind ``process`` or ``spark``, which share its cgroup (their memory is the
  operator's figure, for a drop-in).

Config skeletons (``/etc/selfheal/*.toml``, ``*.env``, the API token) are
written only when missing; the rendered units, sysusers.d, tmpfiles.d and
polkit files are replaced on every run (local changes belong in drop-ins).
Ownership and modes of secrets are tmpfiles.d's job, so a staging tree
(``--root``) needs no users that exist only on the target. Nothing here
starts anything: the commands to run are printed.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TextIO

import selfheal
from selfheal.config import Config, load_config
from selfheal.config_checks import NODE_ID_RE, systemd_service
from selfheal.errors import SelfhealError

Role = Literal["agent", "controller"]
ROLES: tuple[Role, ...] = ("controller", "agent")
STANDARD_VENV = "/opt/selfheal/venv"
CONFIG_DIR = Path("/etc/selfheal")
HOME_PREFIXES = ("/home", "/root", "/run/user")
TMP_PREFIXES = ("/tmp", "/var/tmp")  # noqa: S108 - prefixes compared with paths, never written
"""Hidden from the services by ``PrivateTmp=yes``: a venv or checkout there (a CI clone) is bound back in."""
AGENT_USER = "selfheal-agent"
KEY_CREDENTIAL = "command.key"
"""The agent's key among its credentials: ``selfheal.keys.CREDENTIAL``."""
AGENT_MEMORY_MAX = "512M"
"""The agent's own bound (``MemoryMax=`` of its unit) when none of its units shares its cgroup."""
CHILD_KINDS = frozenset({"process", "spark"})
"""Unit kinds the agent starts as its own children, in its cgroup."""
DEFAULT_AGENT_STATE = "/var/lib/selfheal-agent"


@dataclass(frozen=True)
class Layout:
    """Where this selfheal lives: what the units run and must be able to read."""

    executable: str
    """The ``selfheal`` console script of the venv (``ExecStart=``)."""
    read_paths: tuple[str, ...]
    """The venv, the interpreter's prefix and (editable installs) the source checkout."""

    @classmethod
    def current(cls) -> Layout:
        script = Path(sys.prefix) / "bin" / "selfheal"
        executable = str(script) if script.exists() else f"{sys.executable} -m selfheal"
        paths = [sys.prefix, sys.base_prefix, str(Path(os.path.realpath(sys.executable)).parent.parent)]
        package_root = Path(selfheal.__file__).resolve().parent.parent
        if not package_root.is_relative_to(Path(sys.prefix).resolve()):
            paths.append(str(package_root))  # an editable install runs from its checkout
        return cls(executable=executable, read_paths=tuple(dict.fromkeys(os.path.normpath(p) for p in paths)))


@dataclass
class Plan:
    """What an install writes: path (on the target) → (content, mode, overwrite)."""

    files: dict[str, tuple[str, int, bool]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, path: str, content: str, *, mode: int = 0o644, overwrite: bool = True) -> None:
        self.files[path] = (content, mode, overwrite)


def data_dir() -> Path:
    """``systemd/``: inside the package when installed from a wheel, beside it in a checkout."""
    here = Path(selfheal.__file__).resolve().parent
    for candidate in (here / "systemd", here.parent / "systemd"):
        if (candidate / "selfheal-agent.service").is_file():
            return candidate
    raise SelfhealError(f"the systemd/ data files are missing (looked in {here} and {here.parent})")


# --- rendering (pure) --------------------------------------------------------------------------------


def under_home(path: str) -> bool:
    return _under(path, HOME_PREFIXES)


def _under(path: str, prefixes: Sequence[str]) -> bool:
    return any(path == p or path.startswith(p + "/") for p in prefixes)


def render_unit(template: str, layout: Layout, *, writable: Sequence[str] = ()) -> str:
    """The unit ``template`` (a file of ``systemd/``) for ``layout``; ``writable``: extra ReadWritePaths."""
    text = template.replace(f"{STANDARD_VENV}/bin/selfheal", layout.executable)
    header = f"# Rendered by `selfheal install` ({selfheal.__version__}) for {layout.executable}.\n"
    hidden_ro = [p for p in layout.read_paths if under_home(p)]
    hidden_rw = [p for p in writable if under_home(p)]
    if hidden_ro or hidden_rw:
        lines = ["# selfheal lives under a home directory: an empty /home, /root and /run/user with just it inside.",
                 "ProtectHome=tmpfs"]
        lines += [f"BindReadOnlyPaths={_quote(p)}" for p in hidden_ro]
        lines += [f"BindPaths=-{_quote(p)}" for p in hidden_rw]
        text = _replace_line(text, "ProtectHome=yes", "\n".join(lines))
    tmp_ro = [p for p in layout.read_paths if _under(p, TMP_PREFIXES)]
    tmp_rw = [p for p in writable if _under(p, TMP_PREFIXES)]
    if tmp_ro or tmp_rw:
        lines = ["PrivateTmp=yes", "# selfheal lives under /tmp or /var/tmp: brought into the private ones."]
        lines += [f"BindReadOnlyPaths={_quote(p)}" for p in tmp_ro]
        lines += [f"BindPaths=-{_quote(p)}" for p in tmp_rw]
        text = _replace_line(text, "PrivateTmp=yes", "\n".join(lines))
    if writable:
        lines = ["# Written by the agent (agent.toml: datasets, unit working directories, state_dir).",
                 "ReadWritePaths=" + " ".join(f"-{_quote(p)}" for p in writable)]
        text = _replace_line(text, "ProtectSystem=strict", "\n".join(["ProtectSystem=strict", *lines]))
    return header + text


def _replace_line(text: str, line: str, replacement: str) -> str:
    lines = text.split("\n")
    if line not in lines:
        raise SelfhealError(f"unit template has no line {line!r}")
    return "\n".join(replacement if each == line else each for each in lines)


def _quote(path: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_@%+=:,./-]+", path):
        return path
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'


def agent_writable(config: Config) -> list[str]:
    """Paths outside the agent's StateDirectory that agent.toml says the agent (or its units) write."""
    paths = [dataset.path for dataset in config.agent.datasets]
    paths += [unit.cwd for unit in config.agent.units if unit.cwd and Path(unit.cwd).is_absolute()]
    if os.path.normpath(config.agent.state_dir) != DEFAULT_AGENT_STATE:
        paths.append(config.agent.state_dir)
    return list(dict.fromkeys(os.path.normpath(p) for p in paths))


def render_agent(unit: str, config: Config) -> str:
    """The rendered agent unit, for what ``agent.toml`` says: its key credential, its memory bound."""
    key = f"{CONFIG_DIR}/keys/{config.agent.node_id}.key"
    text = _replace_line(unit, f"LoadCredential={KEY_CREDENTIAL}:{CONFIG_DIR}/keys/%H.key",
                         f"LoadCredential={KEY_CREDENTIAL}:{key}")
    if any(each.kind in CHILD_KINDS for each in config.agent.units):
        text = _replace_line(text, f"MemoryMax={AGENT_MEMORY_MAX}",
                             "# Units of kind process or spark share this cgroup: their bound is a drop-in's.\n"
                             "MemoryMax=infinity")
    return text


def systemd_units(config: Config) -> list[str]:
    """The systemd services the agent manages: its units of kind ``systemd``, by service name."""
    return sorted({systemd_service(unit.systemd.unit) for unit in config.agent.units
                   if unit.kind == "systemd" and unit.systemd is not None})


def render_polkit(template: str, units: Sequence[str]) -> str:
    listed = ", ".join(json.dumps(unit) for unit in units)
    return _replace_line(template, "    var units = [];", f"    var units = [{listed}];")


def skeleton(role: Role, node_id: str) -> str:
    if role == "controller":
        return f"""\
# selfheal controller. Every key: README.md, "Configuration".
# Check: selfheal config check {CONFIG_DIR}/controller.toml --role controller
# Reload after a change: systemctl reload selfheal-controller (rulebooks, chat routes and log apply live).
[mqtt]
url = "mqtt://127.0.0.1:1883"

[controller]
listen = "127.0.0.1:8080"
state_dir = "/var/lib/selfheal"   # StateDirectory= of selfheal-controller.service
# rulebooks = ["{CONFIG_DIR}/rules.yaml"]

[security]
key_dir = "{CONFIG_DIR}/keys"      # <node_id>.key per node, group selfheal-keys (tmpfiles.d)
api_token_file = "{CONFIG_DIR}/api.token"
"""
    return f"""\
# selfheal agent. Every key: README.md, "Configuration".
# Check: selfheal config check {CONFIG_DIR}/agent.toml --role agent
# After changing units or datasets, run `selfheal install` again: it renders the
# polkit rule (units of kind systemd) and the unit's ReadWritePaths (datasets).
[mqtt]
url = "mqtt://127.0.0.1:1883"

[agent]
node_id = "{node_id}"
state_dir = "{DEFAULT_AGENT_STATE}"   # StateDirectory= of selfheal-agent.service
listen = "0.0.0.0:8731"

# [[agent.units]]
# name = "predict"
# kind = "process"
# command = ["/opt/predict/bin/serve"]
"""


ENV_SKELETON = {
    "controller": "# Environment of selfheal-controller.service (root-only).\n"
                  "# SELFHEAL_<SECTION>__<KEY>=value overrides a key of controller.toml.\n",
    "agent": "# Environment of selfheal-agent.service (root-only).\n"
             "# SELFHEAL_<SECTION>__<KEY>=value overrides a key of agent.toml. Not for secrets: the command key\n"
             f"# goes in {CONFIG_DIR}/keys/<node_id>.key (mode 0600), loaded with LoadCredential=.\n",
}


def default_node_id() -> str:
    name = socket.gethostname().split(".")[0].lower()
    name = re.sub(r"[^a-z0-9-]", "-", name).strip("-")[:63]
    return name if NODE_ID_RE.match(name) else "node-1"


# --- the install -------------------------------------------------------------------------------------


def plan_install(*, root: Path, roles: Sequence[Role], layout: Layout, templates: Path) -> Plan:
    plan = Plan()
    for role in roles:
        plan.add(f"{CONFIG_DIR}/{role}.toml", skeleton(role, default_node_id()), mode=0o640, overwrite=False)
        plan.add(f"{CONFIG_DIR}/{role}.env", ENV_SKELETON[role], mode=0o600, overwrite=False)
    if "controller" in roles:
        plan.add(f"{CONFIG_DIR}/api.token", secrets.token_urlsafe(32) + "\n", mode=0o640, overwrite=False)
    for role in roles:
        template = (templates / f"selfheal-{role}.service").read_text(encoding="utf-8")
        if role == "agent":
            config = _agent_config(root, plan)
            units = systemd_units(config)
            rule = render_polkit((templates / "50-selfheal-agent.rules").read_text(encoding="utf-8"), units)
            plan.add("/etc/polkit-1/rules.d/50-selfheal-agent.rules", rule)
            plan.notes.append(f"polkit: {AGENT_USER} may start/stop/restart "
                              + (", ".join(units) if units else "no units (none of kind systemd in agent.toml)"))
            plan.notes.append(f"agent key: {CONFIG_DIR}/keys/{config.agent.node_id}.key (LoadCredential=, "
                              "root-only; the same key as the controller's file for this node)")
            as_users = sorted(each.name for each in config.agent.units if each.user is not None)
            if as_users:
                plan.notes.append(f"units {', '.join(as_users)} name a user: the agent must run as root to switch "
                                  "to it (a drop-in, README \"Security\"); as selfheal-agent they fail to start")
            unit = render_agent(render_unit(template, layout, writable=agent_writable(config)), config)
        else:
            unit = render_unit(template, layout)
        plan.add(f"/etc/systemd/system/selfheal-{role}.service", unit)
    plan.add("/etc/sysusers.d/selfheal.conf", (templates / "selfheal.sysusers").read_text(encoding="utf-8"))
    plan.add("/etc/tmpfiles.d/selfheal.conf", (templates / "selfheal.tmpfiles").read_text(encoding="utf-8"))
    return plan


def _agent_config(root: Path, plan: Plan) -> Config:
    """The agent's config as it will be on the target: the existing file, else the skeleton about to be written."""
    path = _target(root, f"{CONFIG_DIR}/agent.toml")
    if path.exists():
        return load_config(path, role="agent")
    with tempfile.TemporaryDirectory() as tmp:  # the skeleton goes through the one loader too
        draft = Path(tmp) / "agent.toml"
        draft.write_text(plan.files[f"{CONFIG_DIR}/agent.toml"][0], encoding="utf-8")
        return load_config(draft, role="agent")


def _target(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def apply_plan(plan: Plan, *, root: Path, dry_run: bool, out: TextIO) -> None:
    for path, (content, mode, overwrite) in plan.files.items():
        target = _target(root, path)
        exists = target.exists()
        if exists and not overwrite:
            print(f"kept     {target} (exists)", file=out)
            continue
        verb = "replace" if exists else "write"
        if dry_run:
            shown = "(a new random token)\n" if path.endswith("api.token") else content
            print(f"would {verb} {target} (mode {mode:04o}):", file=out)
            print("".join(f"    {line}\n" for line in shown.splitlines()), end="", file=out)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(content)
        os.chmod(tmp, mode)  # noqa: PTH101 - the umask must not narrow (or widen) the mode
        tmp.replace(target)
        print(f"{verb:8} {target}", file=out)
    for note in plan.notes:
        print(note, file=out)


def next_steps(roles: Sequence[Role], root: Path) -> list[str]:
    units = " ".join(f"selfheal-{role}.service" for role in roles)
    steps = ["systemd-sysusers selfheal.conf",
             "systemd-tmpfiles --create selfheal.conf",
             "systemctl daemon-reload",
             f"systemctl enable --now {units}"]
    if str(root) != "/":
        steps.insert(0, f"# on the system {root} becomes:")
    return steps


def install(*, root: Path, roles: Sequence[Role], dry_run: bool, out: TextIO, layout: Layout | None = None) -> int:
    layout = layout or Layout.current()
    plan = plan_install(root=root, roles=roles, layout=layout, templates=data_dir())
    apply_plan(plan, root=root, dry_run=dry_run, out=out)
    print("\nthen run:" if not dry_run else "\nthe install would be followed by:", file=out)
    for step in next_steps(roles, root):
        print(f"  {step}", file=out)
    return 0
