"""CURVE keys for workers on other hosts (tcp://): the gateway is the client, each worker the server."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth


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
