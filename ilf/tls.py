"""TLS and mutual TLS for servers and channels, from PEM file paths in the settings.

A server with ILF_TLS_CERT and ILF_TLS_KEY speaks TLS; with ILF_TLS_CLIENT_AUTH=required it also
demands a client certificate signed by ILF_TLS_CA. A channel uses TLS when ILF_TLS_CA is set
(verifying the server against it) and presents ILF_TLS_CERT/KEY as its own certificate when set,
so one certificate per service serves both directions of service-to-service calls.
"""
from __future__ import annotations

from pathlib import Path

import grpc

from ilf import config


def _read(name: str) -> bytes | None:
    path = config.get(name)
    return Path(path).read_bytes() if path else None


def server_credentials() -> grpc.ServerCredentials | None:
    """None when the server should listen in plaintext."""
    cert, key = _read("ILF_TLS_CERT"), _read("ILF_TLS_KEY")
    client_auth = config.get("ILF_TLS_CLIENT_AUTH").lower()
    if client_auth not in ("none", "required"):
        raise ValueError(f"ILF_TLS_CLIENT_AUTH must be none or required, got {client_auth!r}")
    if not (cert and key):
        if cert or key or client_auth == "required":
            raise ValueError("TLS needs both ILF_TLS_CERT and ILF_TLS_KEY (and ILF_TLS_CA for client auth)")
        return None
    required = client_auth == "required"
    ca = _read("ILF_TLS_CA")
    if required and not ca:
        raise ValueError("ILF_TLS_CLIENT_AUTH=required needs ILF_TLS_CA to verify client certificates")
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca if required else None,
                                       require_client_auth=required)


def channel_credentials() -> grpc.ChannelCredentials | None:
    """None when channels should be plaintext."""
    ca = _read("ILF_TLS_CA")
    if not ca:
        return None
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=_read("ILF_TLS_KEY"),
                                        certificate_chain=_read("ILF_TLS_CERT"))
