"""Command-signing keys: ``<key_dir>/<node_id>.key`` holds a hex HMAC key.

The agent reads its own file — or, when set, the ``SELFHEAL_COMMAND_KEY``
environment variable (hex), so the key can come from a systemd
``EnvironmentFile=`` instead of a file in ``key_dir``. The controller reads
every node's file. A missing key is not an error here; callers decide (the
controller sends that node nothing and says why; the agent refuses every
command).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from selfheal.errors import ConfigError

ENV_KEY = "SELFHEAL_COMMAND_KEY"


def read_key(key_dir: str | Path, node_id: str) -> bytes | None:
    path = Path(key_dir) / f"{node_id}.key"
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read key: {exc.strerror}", source=str(path)) from None
    return _parse(text, str(path))


def read_own_key(key_dir: str | Path, node_id: str, env: Mapping[str, str] | None = None) -> bytes | None:
    """The agent's key: ``$SELFHEAL_COMMAND_KEY`` if set, else its file in ``key_dir``."""
    text = (os.environ if env is None else env).get(ENV_KEY, "").strip()
    if text:
        return _parse(text, f"${ENV_KEY}")
    return read_key(key_dir, node_id)


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
