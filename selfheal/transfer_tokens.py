"""Short-lived bearer tokens that let a peer read one dataset of one node, for one transfer.

The controller signs a token when it plans a transfer; the puller presents it
to the serving agent as ``Authorization: Bearer <token>``; the serving agent
checks it with its own command key (``selfheal.keys``). Format, all ASCII::

    sht1.<node>.<dataset>.<expires_at>.<hex HMAC-SHA256>

``node`` is the *serving* node (whose key signs), ``dataset`` the dataset
name, ``expires_at`` whole seconds since the epoch (UTC). The MAC covers
``"selfheal-transfer-v1\\n" node "\\n" dataset "\\n" expires_at`` — a domain
tag of its own, so a transfer token can never pass for a command signature
made with the same key, nor the other way round. Node and dataset names
cannot hold a dot, so the token splits unambiguously. A token whose expiry
lies further ahead than ``MAX_TTL`` is refused as well: tokens stay
short-lived even if a controller's clock runs ahead.

Pure: no I/O, time comes in as ``now``.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re

PREFIX = "sht1"
MAX_TTL = 3600.0
"""Seconds ahead an expiry may lie at most."""
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_TOKEN = re.compile(r"^sht1\.([a-z0-9][a-z0-9-]{0,62})\.([a-z0-9][a-z0-9-]{0,62})\.([0-9]{1,12})\.([0-9a-f]{64})$")


def sign_transfer_token(key: bytes, *, node: str, dataset: str, expires_at: float) -> str:
    """A token letting its bearer read ``dataset`` on ``node`` until ``expires_at`` (rounded up to a second)."""
    if not (_NAME.match(node) and _NAME.match(dataset)):
        raise ValueError(f"node and dataset must match [a-z0-9][a-z0-9-]{{0,62}}: {node!r}, {dataset!r}")
    expiry = math.ceil(expires_at)
    return f"{PREFIX}.{node}.{dataset}.{expiry}.{_mac(key, node, dataset, expiry)}"


def check_transfer_token(key: bytes | None, token: str, *, node: str, dataset: str, now: float,
                         max_ttl: float = MAX_TTL) -> str | None:
    """None when ``token`` lets its bearer read ``dataset`` on ``node`` at ``now``; else why not."""
    if key is None:
        return "this node has no command key, so it cannot check transfer tokens"
    match = _TOKEN.match(token)
    if match is None:
        return "not a transfer token"
    token_node, token_dataset, expiry_text, mac = match.groups()
    expiry = int(expiry_text)
    if not hmac.compare_digest(mac.encode(), _mac(key, token_node, token_dataset, expiry).encode()):
        return "bad signature"
    if token_node != node:
        return f"token is for node {token_node!r}"
    if token_dataset != dataset:
        return f"token is for dataset {token_dataset!r}"
    if expiry <= now:
        return "token expired"
    if expiry > now + max_ttl:
        return f"token expires more than {max_ttl:g} s ahead"
    return None


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, if that is what it is."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def _mac(key: bytes, node: str, dataset: str, expiry: int) -> str:
    message = f"selfheal-transfer-v1\n{node}\n{dataset}\n{expiry}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()
