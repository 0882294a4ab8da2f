"""The launcher's one frozen config, from its flags with env defaults (`python launcher.py --help`)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from common import logs
from common.control import parse_duration
from supervisor import memory
from worker.defaults import parse_params, to_defaults


@dataclass(frozen=True)
class Param:
    """A launcher `--param`: a generation default for every chat model's worker, or for one model's."""

    setting: str  # NAME=VALUE, as the worker's --param takes it
    model: str | None = None  # None: every chat model


@dataclass(frozen=True)
class LaunchConfig:
    host: str
    port: int
    models: tuple[str, ...]  # --model: paths, hub ids, name=path; empty: the built-in default chat model
    device: str
    dtype: str
    num_workers: int  # worker processes per loaded model
    worker_args: tuple[str, ...]
    gateway_args: tuple[str, ...]
    grace_period: float
    max_restarts: int  # crashes within `restart_window` seconds before giving up
    restart_window: float = 300.0
    num_gateways: int = 1
    log_format: str = "text"
    models_dir: Path | None = None
    hf_cache: Path | None = None  # the Hugging Face hub cache to list models from; None: not listed
    keep_alive: float = 300.0  # seconds a model stays loaded after its last request; negative: forever
    max_loaded_models: int = 3
    builtin_embedding: bool = True
    loras: tuple[str, ...] = ()  # --lora NAME=PATH: LoRA adapters, each served as a model on its base's worker
    ray: str | None = None  # --ray [ADDRESS]: workers as Ray actors ("": the local cluster, started if none)
    ray_namespace: str = "tandem"
    ray_worker_cpus: float = 1.0
    ray_worker_gpus: float | None = None  # None: 1 per worker where the cluster has GPUs, else 0
    ray_gateway_nodes: tuple[str, ...] = ()  # Ray node ids or IPs that run a gateway actor each
    ray_gateway_port: int = 0  # of those gateways; 0: a free port (logged)
    curve_dir: Path | None = None  # CURVE keys for tcp:// workers (`keygen`); None: fresh ones per run
    params: tuple[Param, ...] = ()  # --param [MODEL:]NAME=VALUE


def flag_value(args: tuple[str, ...], flag: str) -> str | None:
    """The value of `flag` among pass-through arguments (`--flag=V` or `--flag V`), the last one winning."""
    value = None
    for index, arg in enumerate(args):
        if arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
        elif arg == flag and index + 1 < len(args):
            value = args[index + 1]
    return value


def parse_param(text: str) -> Param:
    """`NAME=VALUE`, or `MODEL:NAME=VALUE` for one model (a name may hold colons, as `qwen3:8b` does; NAME never
    does). Checked here, so a bad one stops the launch rather than every load of a model."""
    left, sep, value = text.partition("=")
    model, colon, name = left.rpartition(":")
    try:
        to_defaults(parse_params([f"{name.strip()}{sep}{value}"]))
    except ValueError as exc:  # (a value that is not JSON too: msgspec's DecodeError is one)
        raise argparse.ArgumentTypeError(str(exc) if str(exc).startswith("--param") else f"{text!r}: {exc}") from None
    if colon and not model.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: MODEL is empty")
    return Param(f"{name.strip()}={value}", model.strip() if colon else None)


def param_flags(params: tuple[Param, ...], model: str) -> list[str]:
    """The worker flags of one chat model: the server-wide --param first, then the model's own, which win (a
    repeated `stop` adds to the list)."""
    key = model.strip().lower()
    chosen = [p for p in params if p.model is None] + [p for p in params if p.model and p.model.lower() == key]
    return [f"--param={p.setting}" for p in chosen]


def duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: list[str] | None = None) -> LaunchConfig:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="python launcher.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default=env("TANDEM_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(env("TANDEM_PORT", "8000")))
    models = parser.add_argument_group("models")
    models.add_argument(
        "--model",
        action="append",
        default=[m for m in env("TANDEM_MODEL", "").split(",") if m],
        help="a .gguf file, a model folder or a hub id in the local cache; NAME=PATH serves it as NAME (repeatable; "
        "the first is loaded at start; default: SmolLM2-135M-Instruct)",
    )
    models.add_argument(
        "--models-dir",
        type=Path,
        default=env("TANDEM_MODELS_DIR") or None,
        help="each .gguf file or model folder in it is one model",
    )
    models.add_argument(
        "--no-hf-cache", action="store_true", help="do not list the models in the local Hugging Face cache"
    )
    models.add_argument(
        "--no-embedding-model", action="store_true", help="do not list the built-in embedding model (all-MiniLM-L6-v2)"
    )
    models.add_argument(
        "--lora",
        action="append",
        default=[m for m in env("TANDEM_LORA", "").split(",") if m],
        metavar="NAME=PATH",
        help="serve a LoRA adapter (a PEFT folder) as the model NAME, on the chat model its adapter_config.json names "
        "(base_model_name_or_path), else on the first chat model listed (repeatable; worker flag --max-loras: how "
        "many are in memory at once)",
    )
    models.add_argument(
        "--keep-alive",
        type=duration,
        default=duration(env("TANDEM_KEEP_ALIVE") or env("OLLAMA_KEEP_ALIVE") or "5m"),
        help="how long a model stays loaded after its last request: 300, 5m, 1h; negative: forever (default 5m)",
    )
    models.add_argument(
        "--max-loaded-models",
        type=int,
        default=int(env("TANDEM_MAX_LOADED_MODELS") or env("OLLAMA_MAX_LOADED_MODELS") or 0) or None,
        help="models loaded at once (default: 3, or 3 per GPU)",
    )
    parser.add_argument("--device", default=env("TANDEM_DEVICE", "auto"))
    parser.add_argument("--dtype", default=env("TANDEM_DTYPE", "auto"))
    parser.add_argument("--workers", type=int, default=1, help="worker processes per loaded model (e.g. one per GPU)")
    parser.add_argument("--grace-period", type=float, default=30.0, help="seconds in-flight streams get on shutdown")
    parser.add_argument("--max-restarts", type=int, default=5, help="worker crashes within 5 minutes before giving up")
    parser.add_argument("--gateways", type=int, default=1, help="gateway processes sharing the port")
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        type=parse_param,
        metavar="[MODEL:]NAME=VALUE",
        help="a generation default (Ollama's PARAMETER names: temperature, top_p, top_k, min_p, repeat_penalty, "
        "num_predict, stop) for every chat model, or with MODEL: for that one, over the model's own (repeatable)",
    )
    parser.add_argument("--worker-arg", action="append", default=[], help="extra flag passed to each worker")
    parser.add_argument("--gateway-arg", action="append", default=[], help="extra flag passed to the gateway")
    parser.add_argument("--log-format", choices=logs.FORMATS, default=env("TANDEM_LOG_FORMAT", "text"))
    ray = parser.add_argument_group("Ray (README: Cluster)")
    ray.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="place the workers (--workers per model) as Ray actors across the cluster at ADDRESS (none: the local "
        "cluster, started if there is none); the gateways find them through Ray",
    )
    ray.add_argument("--ray-namespace", default="tandem", help="Ray namespace of the actors (one per deployment)")
    ray.add_argument("--ray-worker-cpus", type=float, default=1.0, help="CPUs Ray reserves for each worker")
    ray.add_argument(
        "--ray-worker-gpus", type=float, default=None, help="GPUs per worker (default: 1 if the cluster has GPUs)"
    )
    ray.add_argument(
        "--ray-gateway-node",
        action="append",
        default=[],
        metavar="NODE",
        help="also run a gateway as a Ray actor on this node (a node id or IP; repeatable)",
    )
    ray.add_argument("--ray-gateway-port", type=int, default=0, help="port of those gateways (default: a free one)")
    ray.add_argument(
        "--curve-dir",
        type=Path,
        default=None,
        help="CURVE keys from `launcher.py keygen` for the tcp:// workers (default: new keys each run)",
    )
    args = parser.parse_args(argv)
    if args.ray is None and (args.ray_gateway_node or args.curve_dir):
        parser.error("--ray-gateway-node and --curve-dir go with --ray")
    hub = env("HF_HUB_CACHE") or str(Path(env("HF_HOME") or Path.home() / ".cache" / "huggingface") / "hub")
    max_loaded = args.max_loaded_models or 3 * max(memory.gpu_count() if args.device != "cpu" else 1, 1)
    return LaunchConfig(
        host=args.host,
        port=args.port,
        models=tuple(args.model),
        device=args.device,
        dtype=args.dtype,
        num_workers=args.workers,
        worker_args=tuple(args.worker_arg),
        gateway_args=tuple(args.gateway_arg),
        grace_period=args.grace_period,
        max_restarts=args.max_restarts,
        num_gateways=args.gateways,
        log_format=args.log_format,
        models_dir=args.models_dir,
        hf_cache=None if args.no_hf_cache else Path(hub),
        keep_alive=args.keep_alive,
        max_loaded_models=max_loaded,
        builtin_embedding=not args.no_embedding_model,
        loras=tuple(args.lora),
        ray=args.ray,
        ray_namespace=args.ray_namespace,
        ray_worker_cpus=args.ray_worker_cpus,
        ray_worker_gpus=args.ray_worker_gpus,
        ray_gateway_nodes=tuple(args.ray_gateway_node),
        ray_gateway_port=args.ray_gateway_port,
        curve_dir=args.curve_dir,
        params=tuple(args.param),
    )
