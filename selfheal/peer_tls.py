"""How the controller and pulling agents reach an agent's peer API: its address, and how its TLS is verified.

An agent announces its peer API in ``NodeStatus.http``: ``https://host:port``
when it serves TLS (``agent.tls_cert``/``agent.tls_key``), a bare
``host:port`` (older agents) or ``http://host:port`` otherwise.
``peer_base_url`` turns any of these into a base URL and refuses anything
else (another scheme, a path, credentials), so a status message can only
ever point a puller at an HTTP(S) origin. ``peer_ssl_context`` verifies
peers' certificates against ``security.peer_tls_ca`` (the system CAs when
unset); host names are checked, so an agent's certificate must name the
address it announces (an IP address SAN for an IP).
"""

from __future__ import annotations

import ssl
from urllib.parse import urlsplit

from selfheal.errors import ConfigError


def peer_base_url(announced: str) -> str:
    """``scheme://host:port`` for an announced peer address; ``ValueError`` when it is not one."""
    text = announced.strip()
    if "://" not in text:
        text = f"http://{text}"
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a peer address: {announced[:100]!r} ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
        raise ValueError(f"not a peer address (http[s]://host:port): {announced[:100]!r}")
    if parts.username is not None or parts.password is not None or parts.path not in ("", "/") \
            or parts.query or parts.fragment:
        raise ValueError(f"a peer address is only scheme://host:port: {announced[:100]!r}")
    return f"{parts.scheme}://{parts.netloc}"


def peer_ssl_context(ca_file: str | None) -> ssl.SSLContext:
    """A client context verifying peers (certificate and host name) against ``ca_file``, or the system CAs.

    ``ConfigError`` (naming ``security.peer_tls_ca``) when the file does not load as PEM CA certificates."""
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load {ca_file!r} as PEM CA certificates: {exc}",
                          path="security.peer_tls_ca") from None
