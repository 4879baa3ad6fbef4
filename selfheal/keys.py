"""Command-signing keys: ``<key_dir>/<node_id>.key`` holds a hex HMAC key.

The controller reads every node's file in ``key_dir`` (live, so a node added
or a key rotated needs no restart; the directory is readable only by root and
the ``selfheal-keys`` group its ``DynamicUser=`` joins, and the controller
runs no workloads). The agent reads only its own key, in this order:

1. ``$CREDENTIALS_DIRECTORY/command.key``: systemd's ``LoadCredential=``
   (the rendered ``selfheal-agent.service`` loads
   ``/etc/selfheal/keys/<node_id>.key``, a root-only file, and hands the
   agent a private copy). ``NO_KEY`` there (the unit's ``SetCredential=``
   default when the file is missing) means none was delivered.
2. ``$SELFHEAL_COMMAND_KEY`` (hex): deprecated. It is removed from
   ``os.environ`` the moment it is read, so no child the agent starts can
   inherit it — but ``/proc/<agent pid>/environ`` keeps showing what the
   process was started with, to root and the agent's own user: use a
   credential or a file.
3. ``<key_dir>/<node_id>.key`` (one the agent may not read counts as none
   when it runs with credentials: under the rendered unit the default
   ``/etc/selfheal/keys`` is root's, and the credential is the way in).

A missing key is not an error here; callers decide (the controller sends
that node nothing and says why; the agent refuses every command).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping, MutableMapping
from pathlib import Path

from selfheal.errors import ConfigError
from selfheal.logs import get_logger

ENV_KEY = "SELFHEAL_COMMAND_KEY"
"""Deprecated: the agent's key in its environment."""
CREDENTIAL = "command.key"
"""The agent's key among its systemd credentials (``LoadCredential=command.key:...``)."""
CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"
NO_KEY = "none"
"""A credential holding just this carries no key (systemd's ``SetCredential=`` cannot be empty)."""


def read_key(key_dir: str | Path, node_id: str, *, denied_is_missing: bool = False) -> bytes | None:
    """``<key_dir>/<node_id>.key``; ``None`` when there is none (``denied_is_missing``: or it may not be read)."""
    path = Path(key_dir) / f"{node_id}.key"
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except PermissionError:
        if denied_is_missing:
            return None
        raise ConfigError("cannot read key: Permission denied", source=str(path)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read key: {exc.strerror}", source=str(path)) from None
    return _parse(text, str(path))


def read_own_key(key_dir: str | Path, node_id: str, env: Mapping[str, str] | None = None) -> bytes | None:
    """The agent's key: its systemd credential, else ``$SELFHEAL_COMMAND_KEY`` (deprecated), else its file in
    ``key_dir``. ``env`` (default ``os.environ``) loses ``SELFHEAL_COMMAND_KEY`` whichever is used."""
    environ = os.environ if env is None else env
    text = environ.get(ENV_KEY, "").strip()
    if ENV_KEY in environ and isinstance(environ, MutableMapping):
        del environ[ENV_KEY]  # gone before any child can be started with this environment
    credentials = environ.get(CREDENTIALS_ENV, "")
    if credentials:
        key = _read_credential(Path(credentials) / CREDENTIAL)
        if key is not None:
            return key
    if text:
        get_logger("selfheal.keys").warning(
            "keys.deprecated_env", variable=ENV_KEY,
            hint="deliver the key with LoadCredential=command.key:/etc/selfheal/keys/<node_id>.key")
        return _parse(text, f"${ENV_KEY}")
    # Under the rendered unit, /etc/selfheal/keys (the default key_dir) is root's and the controller's: the
    # credential was the way in, and a directory the agent may not read holds no key for it.
    return read_key(key_dir, node_id, denied_is_missing=bool(credentials))


def _read_credential(path: Path) -> bytes | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise ConfigError("key is not hex", source=str(path)) from None  # the error would quote a byte of it
    except OSError as exc:
        raise ConfigError(f"cannot read the key credential: {exc.strerror}", source=str(path)) from None
    if not text or text == NO_KEY:
        return None
    return _parse(text, str(path))


def _parse(text: str, source: str) -> bytes:
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ConfigError("key is not hex", source=source) from None
    if len(key) < 16:
        raise ConfigError("key is shorter than 16 bytes", source=source)
    return key


def write_key(key_dir: str | Path, node_id: str) -> Path:
    """Generate a 32-byte key file readable by its owner only."""
    directory = Path(key_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{node_id}.key"
    path.write_text(secrets.token_hex(32) + "\n", encoding="ascii")
    path.chmod(0o600)
    return path
