"""Credentials for daemons that authenticate TCP clients.

A daemon with ``[auth] tcp = "token"`` wants ``authorization: Bearer
<token>`` with every call; one with ``tcp = "mtls"`` wants a client
certificate signed by its CA, over ``https://``. On the Unix socket the
daemon identifies the process by its uid and gid: nothing to send.

``Client("https://strata.node:7470", credentials=Credentials(
root_certificates=ca_pem, certificate_chain=cert_pem, private_key=key_pem))``
or ``Credentials(token=...)``; :func:`credentials_from` reads them from an
adapter's config (file paths).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import grpc
import grpc.aio

from . import _wire
from .errors import InvalidArgument


@dataclass(frozen=True)
class Credentials:
    """What a client shows the daemon. ``token``: sent as ``authorization:
    Bearer <token>`` with every call (use ``https://`` unless the daemon is
    on loopback). ``root_certificates``: PEM of the CA that signed the
    daemon's certificate (``https://``; None: the system roots).
    ``certificate_chain`` and ``private_key``: PEM of a client certificate
    and its key, for mutual TLS. ``server_name``: the name the daemon's
    certificate carries, when it is not the endpoint's host."""

    token: str | None = None
    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    server_name: str | None = None

    def metadata(self) -> tuple:
        """The call metadata these credentials add (empty without a token)."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def __repr__(self) -> str:  # never print secrets
        return (f"Credentials(token={'***' if self.token else None}, "
                f"tls={'mutual' if self.certificate_chain else bool(self.root_certificates)})")


def _read(path: Any) -> bytes | None:
    return Path(path).expanduser().read_bytes() if path else None


def credentials_from(config: Mapping[str, Any] | None) -> Credentials | None:
    """Credentials from an adapter's config: ``token`` (or ``token_file``),
    ``tls_ca_file``, ``tls_cert_file``, ``tls_key_file``,
    ``tls_server_name``. None when it names none of them."""
    c = dict(config or {})
    token = c.get("token")
    if token is None and c.get("token_file"):
        token = _read(c["token_file"]).decode().strip()
    creds = Credentials(token=token or None, root_certificates=_read(c.get("tls_ca_file")),
                        certificate_chain=_read(c.get("tls_cert_file")),
                        private_key=_read(c.get("tls_key_file")),
                        server_name=c.get("tls_server_name") or None)
    return None if creds == Credentials() else creds


def _tls(endpoint: str, creds: Credentials | None):
    """The channel credentials and extra options of an ``https://`` endpoint
    (None for plain ones)."""
    if not endpoint.startswith("https://"):
        if creds is not None and (creds.certificate_chain or creds.root_certificates):
            raise InvalidArgument(f"endpoint {endpoint!r}: TLS credentials need an https:// endpoint")
        return None, []
    c = creds or Credentials()
    if bool(c.certificate_chain) != bool(c.private_key):
        raise InvalidArgument("a client certificate and its private key go together")
    ssl = grpc.ssl_channel_credentials(root_certificates=c.root_certificates,
                                       private_key=c.private_key,
                                       certificate_chain=c.certificate_chain)
    opts = [("grpc.ssl_target_name_override", c.server_name)] if c.server_name else []
    return ssl, opts


def channel(endpoint: str, creds: Credentials | None = None) -> grpc.Channel:
    """A synchronous channel to ``endpoint``: TLS for ``https://``."""
    ssl, opts = _tls(endpoint, creds)
    options = _wire.channel_options(endpoint) + opts
    if ssl is None:
        return grpc.insecure_channel(_wire.target(endpoint), options=options)
    return grpc.secure_channel(_wire.target(endpoint), ssl, options=options)


def aio_channel(endpoint: str, creds: Credentials | None = None) -> grpc.aio.Channel:
    """An asyncio channel to ``endpoint``: TLS for ``https://``."""
    ssl, opts = _tls(endpoint, creds)
    options = _wire.channel_options(endpoint) + opts
    if ssl is None:
        return grpc.aio.insecure_channel(_wire.target(endpoint), options=options)
    return grpc.aio.secure_channel(_wire.target(endpoint), ssl, options=options)
