"""What a workload the agent starts inherits from it: an environment without the agent's secrets, and a user.

The agent holds secrets a workload must never see: its command key (whoever
has it can forge commands to this node and mint transfer tokens), config
overrides that may name secrets (``SELFHEAL_*``), and systemd's handles to the service
(``$CREDENTIALS_DIRECTORY`` where the key is, ``$NOTIFY_SOCKET`` through which
any child could report READY or ping the watchdog on the agent's behalf).
Every process the agent starts for a unit (kinds ``process`` and ``spark``)
and every ``exec`` probe gets ``unit_environment``: the agent's environment
minus ``DROPPED_NAMES``, minus every ``DROPPED_PREFIXES`` name, plus the
unit's own ``env`` and the variables selfheal sets for it on purpose
(``ALLOWED_SELFHEAL``). Containers (kind ``docker``) never get the agent's
environment at all, only the unit's ``env``; kind ``systemd`` services get
what their own unit file says.

Scrubbing the environment keeps secrets out of what a workload can see by
accident (a crash dump, a Spark UI's Environment tab, a child that logs its
environment); it is no wall against a workload that runs as the agent's own
user, which can read whatever the agent can. ``user`` (``resolve_user``)
runs a unit under an account of its own: with its uid, primary gid and
supplementary groups, ``HOME``/``USER``/``LOGNAME`` set as ``runuser``
would, and — unless the unit names a ``cwd`` — a working directory
``<state_dir>/work/<unit>`` owned by that user (mode 0700), where its
progress file lands too. The unit's log is opened by the agent and handed
over as stdout, so the user needs no access to ``<state_dir>/logs``.
Switching users needs an agent running as root (``CAP_SETUID``,
``CAP_SETGID``, ``CAP_CHOWN`` and ``CAP_DAC_READ_SEARCH`` for that
directory, ``CAP_KILL`` to stop the unit again); otherwise the unit fails to
start and says why.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfheal.config import UnitConfig
from selfheal.errors import UnitError
from selfheal.progress import ENV_VAR as PROGRESS_ENV

DROPPED_PREFIXES = ("SELFHEAL_", "WATCHDOG_", "LISTEN_", "MONITOR_", "TRIGGER_", "MEMORY_PRESSURE_")
"""``SELFHEAL_*``: the agent's key (``SELFHEAL_COMMAND_KEY``, deprecated), config overrides, the CLI's API
token. ``WATCHDOG_*``, ``LISTEN_*`` (socket activation), ``MONITOR_*``, ``TRIGGER_*``,
``MEMORY_PRESSURE_*``: systemd talking to the agent's service, not to the unit."""
DROPPED_NAMES = frozenset({
    "CREDENTIALS_DIRECTORY",  # where systemd put the agent's key (LoadCredential=)
    "NOTIFY_SOCKET",  # READY/WATCHDOG on the agent's behalf
    "INVOCATION_ID", "JOURNAL_STREAM", "SYSTEMD_EXEC_PID", "MAINPID", "MANAGERPID", "FDSTORE",
    "SERVICE_RESULT", "EXIT_CODE", "EXIT_STATUS",
    # The agent's own directories (StateDirectory= and friends): the unit gets its cwd instead.
    "RUNTIME_DIRECTORY", "STATE_DIRECTORY", "CACHE_DIRECTORY", "LOGS_DIRECTORY", "CONFIGURATION_DIRECTORY",
})
ALLOWED_SELFHEAL = frozenset({PROGRESS_ENV})
"""``SELFHEAL_*`` names selfheal itself sets for a unit (not secrets): ``SELFHEAL_PROGRESS_FILE``. A unit's
own ``env`` may name any variable, ``SELFHEAL_*`` included (the bundled workloads read
``SELFHEAL_<JOB>_<OPTION>``): the operator wrote it into agent.toml for that unit."""


def is_dropped(name: str) -> bool:
    """Whether the agent's variable ``name`` stays with the agent."""
    return name in DROPPED_NAMES or name.startswith(DROPPED_PREFIXES)


@dataclass(frozen=True, slots=True)
class Account:
    """A user a unit runs as: what ``subprocess`` needs to switch to it."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str


def unit_environment(base: Mapping[str, str], unit_env: Mapping[str, str] | None = None, *,
                     extra: Mapping[str, str] | None = None, account: Account | None = None) -> dict[str, str]:
    """Pure: the environment of a unit's process (or a probe): ``base`` (the agent's) scrubbed, then ``account``'s
    ``HOME``/``USER``/``LOGNAME``, then the unit's own ``unit_env``, then ``extra`` (what selfheal sets on purpose,
    ``SELFHEAL_PROGRESS_FILE``; a ``SELFHEAL_*`` name there must be in ``ALLOWED_SELFHEAL``)."""
    env = {name: value for name, value in base.items() if not is_dropped(name)}
    if account is not None:
        env.update(HOME=account.home, USER=account.name, LOGNAME=account.name)
    env.update(unit_env or {})
    for name, value in (extra or {}).items():
        if name.startswith("SELFHEAL_") and name not in ALLOWED_SELFHEAL:
            raise ValueError(f"{name} is not a variable selfheal sets for a unit")
        env[name] = value
    return env


def resolve_user(user: str, *, euid: int | None = None) -> Account:
    """The account ``user`` (a name or a uid) names; ``UnitError`` (a detail) when the agent cannot switch to it."""
    current = os.geteuid() if euid is None else euid
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, OverflowError):
        raise UnitError(f"user {user!r} does not exist") from None
    if current != 0:
        if entry.pw_uid == current:  # already that user: nothing to switch
            return Account(entry.pw_name, entry.pw_uid, entry.pw_gid, (), entry.pw_dir)
        raise UnitError(f"cannot run as user {user!r}: the agent runs as uid {current}, not root")
    groups = tuple(sorted(set(os.getgrouplist(entry.pw_name, entry.pw_gid)) - {entry.pw_gid}))
    return Account(entry.pw_name, entry.pw_uid, entry.pw_gid, groups, entry.pw_dir)


def switch_args(account: Account | None) -> dict[str, Any]:
    """``subprocess`` arguments that start a process as ``account`` (none when the agent already is it)."""
    if account is None or os.geteuid() != 0:
        return {}
    return {"user": account.uid, "group": account.gid, "extra_groups": list(account.groups)}


def work_dir(config: UnitConfig, state_dir: Path) -> Path:
    """The unit's working directory: its ``cwd``; else ``<state_dir>/work/<unit>`` for a unit with a ``user``, else
    the state dir. Relative progress files are taken from here."""
    if config.cwd:
        return Path(config.cwd)
    if config.user is not None:
        return state_dir / "work" / config.name
    return state_dir


WORK_DIR_MODE = 0o700
"""The unit's user's alone. The agent, root, enters it (to start the unit there) and reads the progress file in it
with ``CAP_DAC_READ_SEARCH`` — no more than its ``CAP_SETUID`` gives it anyway. (Sharing it with the agent's group
through a setgid directory would need ``RestrictSUIDSGID=no``.)"""


def prepare_work_dir(path: Path, account: Account) -> None:
    """Create ``path`` (the default working directory of a unit with a user) owned by ``account``, mode
    ``WORK_DIR_MODE``.

    Never follows a symlink there: only the agent writes ``<state_dir>/work``, but a directory the unit's user
    owns is the user's to fill."""
    path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    with suppress(FileExistsError):
        path.mkdir(mode=WORK_DIR_MODE)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise UnitError(exc.strerror or str(exc)) from None
    try:  # OSError (no CAP_CHOWN): the caller fails the unit with it
        info = os.fstat(fd)
        if (info.st_uid, info.st_gid) != (account.uid, account.gid):  # new, or the unit's user changed
            if info.st_uid != os.geteuid():
                os.fchown(fd, os.geteuid(), -1)  # back to the agent first, so it may set the mode
            os.fchmod(fd, WORK_DIR_MODE)  # while the agent owns it: no CAP_FOWNER needed
            os.fchown(fd, account.uid, account.gid)
    finally:
        os.close(fd)
