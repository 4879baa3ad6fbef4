"""Command-signing keys: ``<key_dir>/<node_id>.key`` holds a hex HMAC key.

The agent reads its own file, the controller all of them. A missing key is
not an error here; callers decide (the controller sends that node nothing and
says why; the agent refuses every command).
"""

from __future__ import annotations

import secrets
from pathlib import Path

from selfheal.errors import ConfigError


def read_key(key_dir: str | Path, node_id: str) -> bytes | None:
    path = Path(key_dir) / f"{node_id}.key"
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read key: {exc.strerror}", source=str(path)) from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ConfigError("key is not hex", source=str(path)) from None
    if len(key) < 16:
        raise ConfigError("key is shorter than 16 bytes", source=str(path))
    return key


def write_key(key_dir: str | Path, node_id: str) -> Path:
    """Generate a 32-byte key file readable by its owner only."""
    directory = Path(key_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{node_id}.key"
    path.write_text(secrets.token_hex(32) + "\n", encoding="ascii")
    path.chmod(0o600)
    return path
