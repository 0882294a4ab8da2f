"""CURVE between hosts, with real ZeroMQ sockets: keygen's files, a gateway with an authorized key gets in,
any other is refused (wrong client key, wrong server key, no CURVE at all)."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import httpx
import pytest
from test_ops_harness import ScriptedEngine, chat, free_port, serve_gateway, serve_worker, wait_until

import launcher
from common.curve import ServerCurve, keygen


def test_keygen_writes_owner_only_keys_and_authorizes_the_client(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    assert keygen(keys)
    files = sorted(p.relative_to(keys).as_posix() for p in keys.rglob("*") if p.is_file())
    assert files == ["authorized/client.key", "client.key", "client.key_secret", "server.key", "server.key_secret"]
    assert all(stat.S_IMODE(p.stat().st_mode) & 0o077 == 0 for p in keys.rglob("*"))
    assert (keys / "authorized" / "client.key").read_bytes() == (keys / "client.key").read_bytes()
    first = (keys / "server.key").read_bytes()
    assert not keygen(keys) and (keys / "server.key").read_bytes() == first  # kept: compose reruns it
    assert keygen(keys, force=True) and (keys / "server.key").read_bytes() != first
    assert launcher.keygen_main([str(keys)]) == 0


def test_server_keys_that_cannot_work_are_refused_at_start(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keygen(keys)
    with pytest.raises(ValueError, match="no secret key"):
        ServerCurve.load(keys / "server.key", keys / "authorized")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no client public key"):
        ServerCurve.load(keys / "server.key_secret", tmp_path / "empty")


def test_only_a_gateway_with_an_authorized_key_gets_in(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    keys, other = tmp_path / "keys", tmp_path / "other"
    keygen(keys)
    keygen(other)  # valid keys this worker never heard of
    address = f"tcp://127.0.0.1:{free_port()}"
    engine = ScriptedEngine()
    with serve_worker(engine, address, ServerCurve.load(keys / "server.key_secret", keys / "authorized")):
        good = {"curve_server_key": keys / "server.key", "curve_client_key": keys / "client.key_secret"}
        with serve_gateway(address, **good) as gateway:
            gateway.wait_ready()
            answer = httpx.post(f"{gateway.base_url}/v1/chat/completions", json=chat())
        strangers = [  # (config, whether the gateway sees its handshake fail; plain text just never connects)
            ({"curve_server_key": keys / "server.key", "curve_client_key": other / "client.key_secret"}, True),
            ({"curve_server_key": other / "server.key", "curve_client_key": keys / "client.key_secret"}, True),
            ({}, False),
        ]
        refused = []
        for config, fails_handshake in strangers:
            seen = len(handshake_failures(caplog))
            with serve_gateway(address, **config) as gateway:
                if fails_handshake:  # it tried, and was refused
                    wait_until(lambda seen=seen: len(handshake_failures(caplog)) > seen)  # type: ignore[misc]
                health = httpx.get(f"{gateway.base_url}/health")
                request = httpx.post(f"{gateway.base_url}/v1/chat/completions", json=chat())
                refused.append((health.status_code, request.status_code))
    assert answer.status_code == 200
    assert refused == [(503, 503)] * 3
    assert len(engine.received) == 1
    unknown_key = [r for r in caplog.records if r.getMessage().startswith("refused a connection with an unknown")]
    assert len(unknown_key) == 1 and unknown_key[0].levelno == logging.WARNING  # once, not once per retry
    handshake = handshake_failures(caplog)
    assert handshake and all(r.levelno == logging.ERROR for r in handshake)


def handshake_failures(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "security handshake failed" in r.getMessage()]
