"""`python launcher.py --ray [ADDRESS]`: the workers as Ray actors across a cluster (supervisor/ray_hosts.py), the
gateways finding them through Ray (gateway/ray_discovery.py).

What changes against the plain launcher: `--workers N` workers of each model named with `--model` (default: the
default chat model) are placed by Ray, spread over the nodes, each reserving `--ray-worker-cpus` CPUs or one GPU where
the cluster has GPUs, and each restarted by Ray when it dies — on its node, or on another with room, or when a lost
node comes back. They stay loaded (as fixed workers do: keep_alive and the memory budget are the single-host
registry's business). The launcher's own gateway(s) run here as before, plus one gateway actor on each
`--ray-gateway-node`. Between gateways and workers: ZeroMQ over tcp:// with CURVE, as between hosts anywhere.

Every node needs tandem and its Python environment at the same path as here (one image or one shared venv): the
actors run `python -m worker` from this checkout's folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import signal
import sys
from typing import Any

from common.curve import keygen
from launcher import HERE, Launcher
from supervisor.config import LaunchConfig, param_flags
from supervisor.ray_hosts import STOP_TIMEOUT, GatewayHost, Keys, WorkerHost
from worker.catalog import Entry

logger = logging.getLogger("launcher")

WORKER_PREFIX = "tandem-worker-"  # what gateway/ray_discovery.py looks for


def actor_name(entry: Entry, index: int) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", entry.name)[:40]
    return f"{WORKER_PREFIX}{slug}-{hashlib.sha256(entry.name.encode()).hexdigest()[:6]}-{index}"


class RayLauncher(Launcher):
    """The launcher's run (gateways started, health awaited, supervised, shut down in order) with Ray placing the
    workers instead of the model registry."""

    def __init__(self, config: LaunchConfig, entries: list[Entry] | None = None) -> None:
        super().__init__(config, entries)
        self.worker_actors: list[Any] = []
        self.gateway_actors: list[Any] = []
        self.gcs_address = ""
        self.keys_dir = self.config.curve_dir or self.run_dir / "curve"

    # -- placing ----------------------------------------------------------------------------

    def _load_first(self) -> bool:
        import ray

        # Ray's C++ core would print a stack trace for every SIGTERM (the normal way the launcher is stopped).
        os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
        ray.init(
            address=self.config.ray or None,
            namespace=self.config.ray_namespace,
            # Every actor imports this checkout (supervisor.ray_hosts), whatever is installed on the node.
            runtime_env={"env_vars": {"PYTHONPATH": str(HERE)}},
        )
        for sig in (signal.SIGTERM, signal.SIGINT):  # ray.init sets its own; ours stop everything in order
            signal.signal(sig, self._on_signal)
        self.gcs_address = ray.get_runtime_context().gcs_address
        nodes = [n for n in ray.nodes() if n["Alive"]]
        logger.info("ray: cluster at %s, %d node(s), %s", self.gcs_address, len(nodes), ray.cluster_resources())
        if self.config.curve_dir is None:
            keygen(self.keys_dir)
        gpus = self.config.ray_worker_gpus
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        try:
            for entry in self.entries[: max(len(self.config.models), 1)]:
                for index in range(self.config.num_workers):
                    self.worker_actors.append(self._place_worker(entry, index, gpus))
            for node in self.config.ray_gateway_nodes:
                self.gateway_actors.append(self._place_gateway(node, nodes))
        except ValueError as exc:  # a name taken (another launcher in this namespace), an unknown node
            logger.error("ray: %s", exc)
            return False
        for actor in self.gateway_actors:
            logger.info("ray: a gateway actor serves on %s", ray.get(actor.url.remote()))
        return True

    def _place_worker(self, entry: Entry, index: int, gpus: float) -> Any:
        import ray

        name = actor_name(entry, index)
        device = "cuda" if gpus > 0 else ("cpu" if self.config.device == "auto" else self.config.device)
        args = ["--device", device, "--dtype", self.config.dtype, "--model", entry.spec, "--served-name", entry.name]
        args += [] if entry.is_embedding else param_flags(self.config.params, entry.name)
        args += ["--log-format", self.config.log_format, *self.config.worker_args]
        keys = self._keys("server.key_secret", "authorized/client.key")
        logger.info("ray: placing %s (%s, %g CPU, %g GPU)", name, entry.name, self.config.ray_worker_cpus, gpus)
        return (
            ray.remote(WorkerHost)
            .options(
                name=name,
                max_restarts=-1,  # a lost node is not a crash to give up on: Ray restarts it once there is room
                num_cpus=self.config.ray_worker_cpus,
                num_gpus=gpus,
                scheduling_strategy="SPREAD",
            )
            .remote(name, args, keys, str(HERE))
        )

    def _place_gateway(self, node: str, nodes: list[dict[str, Any]]) -> Any:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        matches = [n["NodeID"] for n in nodes if node in (n["NodeManagerAddress"], n["NodeID"])]
        matches += [n["NodeID"] for n in nodes if n["NodeID"].startswith(node)]
        if not matches:
            raise ValueError(f"no live node has the id or IP {node!r}")
        args = ["--worker-ray", self.gcs_address, "--ray-namespace", self.config.ray_namespace]
        args += ["--shutdown-grace", str(self.config.grace_period), "--log-format", self.config.log_format]
        keys = self._keys("server.key", "client.key_secret")
        name = f"tandem-gateway-{len(self.gateway_actors)}"
        return (
            ray.remote(GatewayHost)
            .options(
                name=name,
                max_restarts=-1,
                num_cpus=0,  # the gateway's CPU is not the workers' to wait for
                scheduling_strategy=NodeAffinitySchedulingStrategy(matches[0], soft=False),
            )
            .remote(name, self.config.ray_gateway_port, [*args, *self.config.gateway_args], keys, str(HERE))
        )

    def _keys(self, *names: str) -> Keys:
        return {name: (self.keys_dir / name).read_text() for name in names}

    def _gateway_command(self, fd: int) -> list[str]:
        command = [sys.executable, "-m", "gateway", "--host", self.config.host, "--port", str(self.config.port)]
        command += ["--worker-ray", self.gcs_address, "--ray-namespace", self.config.ray_namespace]
        command += ["--curve-server-key", str(self.keys_dir / "server.key")]
        command += ["--curve-client-key", str(self.keys_dir / "client.key_secret")]
        command += ["--fd", str(fd), "--shutdown-grace", str(self.config.grace_period)]
        return command + ["--log-format", self.config.log_format, *self.config.gateway_args]

    # -- stopping ---------------------------------------------------------------------------

    def _shutdown(self) -> None:
        """Gateways first (they drain), then the workers; each child gets its SIGTERM before its actor goes."""
        self._stop_actors(self.gateway_actors)
        super()._shutdown()
        self._stop_actors(self.worker_actors)
        import ray

        if ray.is_initialized():
            ray.shutdown()

    @staticmethod
    def _stop_actors(actors: list[Any]) -> None:
        import ray
        from ray.exceptions import RayError

        if not actors:
            return
        logger.info("ray: stopping %d actor(s)", len(actors))
        calls = [actor.stop.remote() for actor in actors]
        ray.wait(calls, num_returns=len(calls), timeout=STOP_TIMEOUT + 5)
        for actor in actors:
            try:
                ray.kill(actor, no_restart=True)
            except RayError:
                pass
