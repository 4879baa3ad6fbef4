"""Short-lived bearer tokens that let one puller read listed files of one dataset of one node.

The controller signs a token when it walks two replicas (for itself) and when
it sends a ``ResyncDataset`` command (for the pulling node); the puller
presents it to the serving agent as ``Authorization: Bearer <token>`` and
names itself in ``X-Selfheal-Puller``; the serving agent checks it with its
own command key (``selfheal.keys``). Format, all ASCII::

    sht2.<node>.<puller>.<dataset>.<expires_at>[.<nonce>].<hex HMAC-SHA256>

``node`` is the *serving* node (whose key signs), ``puller`` the node that
pulls (or ``controller`` for the controller's walk), ``dataset`` the dataset
name, ``expires_at`` whole seconds since the epoch (UTC). The MAC covers::

    "selfheal-transfer-v2\\n" node "\\n" puller "\\n" dataset "\\n" paths_digest "\\n" expires_at

followed by ``"\\n" nonce`` when the token has one, where ``paths_digest`` is
``paths_digest(paths)``: SHA-256 over the sorted, de-duplicated allowed
paths, each length-prefixed. The path list is not in
the token (a command may list 64 long paths): the puller sends it once, when
it opens the transfer (``agent.peer_api``), and the serving agent recomputes
the digest. An empty list means *listings only* (trees and chunk lists, no
chunk bytes): the controller's walk.

A domain tag of its own, so a transfer token can never pass for a command
signature (or a v1 token) made with the same key, nor the other way round.
Names cannot hold a dot, so the token splits unambiguously. A token lives at
most ``MAX_TTL`` (60 s): an expiry further ahead is refused, so tokens stay
short-lived even if a controller's clock runs ahead. A transfer that takes
longer still completes: the token only has to be valid when the puller opens
the transfer; the serving agent then remembers the opened transfer while it
is in use (see ``agent.peer_api``). A file token opens one transfer, once, so
two commands must never carry the same token: the controller gives each file
token a random ``nonce`` (16 hex digits), else two commands for the same
puller, dataset and paths signed within one second would be identical.

Pure: no I/O, time comes in as ``now``.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass

PREFIX = "sht2"
MAX_TTL = 60.0
"""Seconds ahead an expiry may lie at most."""
CONTROLLER = "controller"
"""The puller name the controller signs its own listing walk for."""
PULLER_HEADER = "X-Selfheal-Puller"
"""The request header naming the pulling node: the token covers it."""
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_TOKEN = re.compile(r"^sht2\.([a-z0-9][a-z0-9-]{0,62})\.([a-z0-9][a-z0-9-]{0,62})\.([a-z0-9][a-z0-9-]{0,62})"
                    r"\.([0-9]{1,12})(?:\.([0-9a-f]{16}))?\.([0-9a-f]{64})$")
_NONCE = re.compile(r"^[0-9a-f]{16}$")
_DOMAIN = "selfheal-transfer-v2"


@dataclass(frozen=True, slots=True)
class TransferGrant:
    """What a checked token allows: ``puller`` may read ``paths`` (none: listings only) of ``dataset``."""

    node: str
    puller: str
    dataset: str
    paths: frozenset[str]
    expires_at: int
    mac: str
    """The token's MAC: identifies the transfer the token opens (not a secret once checked)."""


def paths_digest(paths: Iterable[str]) -> str:
    """The canonical digest of an allowed path list: order and duplicates do not matter."""
    hasher = hashlib.sha256(b"selfheal-transfer-paths\0")
    for path in sorted(set(paths)):
        encoded = path.encode("utf-8")
        hasher.update(struct.pack(">I", len(encoded)) + encoded)
    return hasher.hexdigest()


def sign_transfer_token(key: bytes, *, node: str, puller: str, dataset: str, paths: Iterable[str],
                        expires_at: float, nonce: str | None = None) -> str:
    """A token letting ``puller`` read ``paths`` of ``dataset`` on ``node`` until ``expires_at`` (rounded up).

    ``nonce`` (16 hex digits, e.g. ``secrets.token_hex(8)``) makes the token unique: file tokens need one."""
    for what, name in (("node", node), ("puller", puller), ("dataset", dataset)):
        if not _NAME.match(name):
            raise ValueError(f"{what} must match [a-z0-9][a-z0-9-]{{0,62}}: {name!r}")
    if nonce is not None and not _NONCE.match(nonce):
        raise ValueError("a nonce is 16 lowercase hex digits")
    expiry = math.ceil(expires_at)
    mac = _mac(key, node, puller, dataset, paths_digest(paths), expiry, nonce)
    return f"{PREFIX}.{node}.{puller}.{dataset}.{expiry}{'.' + nonce if nonce else ''}.{mac}"


def check_transfer_token(key: bytes | None, token: str, *, node: str, puller: str, dataset: str,
                         paths: Iterable[str], now: float, max_ttl: float = MAX_TTL,
                         ) -> TransferGrant | str:
    """The grant when ``token`` lets ``puller`` read ``paths`` of ``dataset`` on ``node`` at ``now``; else why not.

    ``paths`` is the list the puller claims the token was signed for (empty for a listings-only token);
    a different list fails the signature check.
    """
    if key is None:
        return "this node has no command key, so it cannot check transfer tokens"
    if token.startswith("sht1."):
        return "a version 1 transfer token (not bound to a puller and paths): refused"
    match = _TOKEN.match(token)
    if match is None:
        return "not a transfer token"
    token_node, token_puller, token_dataset, expiry_text, nonce, mac = match.groups()
    expiry = int(expiry_text)
    allowed = frozenset(paths)
    expected = _mac(key, token_node, token_puller, token_dataset, paths_digest(allowed), expiry, nonce)
    if not hmac.compare_digest(mac.encode(), expected.encode()):
        return "bad signature (or not signed for these paths)"
    if token_node != node:
        return f"token is for node {token_node!r}"
    if token_puller != puller:
        return f"token is for puller {token_puller!r}, not {puller!r}"
    if token_dataset != dataset:
        return f"token is for dataset {token_dataset!r}"
    if expiry <= now:
        return "token expired"
    if expiry > now + max_ttl:
        return f"token expires more than {max_ttl:g} s ahead"
    return TransferGrant(token_node, token_puller, token_dataset, allowed, expiry, mac)


def token_mac(token: str) -> str | None:
    """The MAC part of a well-formed token (the key of the transfer it opened), without checking it."""
    match = _TOKEN.match(token)
    return match.group(6) if match is not None else None


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, if that is what it is."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def _mac(key: bytes, node: str, puller: str, dataset: str, digest: str,  # noqa: PLR0917 - the fields, in order
         expiry: int, nonce: str | None = None) -> str:
    message = f"{_DOMAIN}\n{node}\n{puller}\n{dataset}\n{digest}\n{expiry}{chr(10) + nonce if nonce else ''}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()
