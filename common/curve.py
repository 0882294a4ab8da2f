"""CURVE between hosts (tcp://): the worker is the CURVE server, each gateway a client.

Traffic is encrypted, and the worker's ZAP handler lets in only the gateways whose public key is in its
authorized folder. `keygen` writes both keypairs (`python launcher.py keygen DIR`).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CurveKeys:
    """CURVE for tcp:// workers on other hosts: their public key and this gateway's keypair (Z85)."""

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def load(cls, server_key: Path, client_key: Path) -> CurveKeys:
        """`server_key`: the workers' server.key; `client_key`: this gateway's client.key_secret."""
        server_public, _ = zmq.auth.load_certificate(server_key)
        public, secret = zmq.auth.load_certificate(client_key)
        if secret is None:
            raise ValueError(f"{client_key} holds no secret key: pass the .key_secret file")
        return cls(server_public, public, secret)

    def apply(self, socket: zmq.Socket) -> None:
        """Make `socket` a CURVE client of the worker; before connect."""
        socket.curve_serverkey = self.server_public
        socket.curve_publickey = self.public
        socket.curve_secretkey = self.secret


@dataclass
class ServerCurve:
    """The worker's CURVE keypair and the gateways' public keys it lets in (read once, at start)."""

    public: bytes
    secret: bytes
    authorized: set[bytes]  # Z85 public keys
    refused: set[bytes] = field(default_factory=set)

    @classmethod
    def load(cls, secret_key: Path, authorized_dir: Path) -> ServerCurve:
        """`secret_key`: server.key_secret; `authorized_dir`: the gateways' client public keys (*.key)."""
        public, secret = zmq.auth.load_certificate(secret_key)
        if secret is None:
            raise ValueError(f"{secret_key} holds no secret key: pass the .key_secret file")
        if not authorized_dir.is_dir():
            raise ValueError(f"{authorized_dir} is not a folder of client public keys")
        authorized = set(zmq.auth.load_certificates(authorized_dir))
        if not authorized:
            raise ValueError(f"{authorized_dir} holds no client public key (*.key): no gateway could connect")
        return cls(public, secret, authorized)

    def callback(self, domain: str, key: bytes) -> bool:
        """Asked by the ZAP handler for every handshake. A refused key is logged once, not once per retry."""
        if key in self.authorized:
            return True
        if key not in self.refused:
            self.refused.add(key)
            logger.warning("refused a connection with an unknown CURVE key %s", key.decode(errors="replace"))
        return False


KEY_FILES = ("server.key", "server.key_secret", "client.key", "client.key_secret")


def keygen(directory: Path, *, force: bool = False) -> bool:
    """Write a worker (server) and a gateway (client) CURVE keypair, and authorize the client's public key.

    Layout: server.key_secret + authorized/ for the worker, server.key + client.key_secret for the gateway.
    Existing keys are kept unless `force` (False is returned then), so a compose one-shot can run it each time.
    """
    if (directory / "server.key_secret").exists() and not force:
        return False
    previous = os.umask(0o077)  # every file owner-only from its first byte, not chmod-ed after
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for name in KEY_FILES:
            (directory / name).unlink(missing_ok=True)
        zmq.auth.create_certificates(directory, "server")
        client_public, _ = zmq.auth.create_certificates(directory, "client")
        authorized = directory / "authorized"
        shutil.rmtree(authorized, ignore_errors=True)
        authorized.mkdir()
        shutil.copy(client_public, authorized / "client.key")
    finally:
        os.umask(previous)
    return True
