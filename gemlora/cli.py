"""The `gemlora` command line: `generate` streams a completion to the terminal, `convert` turns a
GGUF file into the cached checkpoint folder ahead of time. Thin: it only wires options to the engine.
"""

from __future__ import annotations

import asyncio
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import typer

from gemlora.config import QUANT_ACTIVATIONS, EngineConfig
from gemlora.lora.adapter import AdapterError
from gemlora.lora.registry import UnknownAdapterError
from gemlora.sampling import InvalidRequestError, SamplingParams

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Serve Gemma models with many LoRA adapters.")

MODEL_HELP = "HF checkpoint folder or .gguf file; default: the embedded google/gemma-3-270m"
QUANT_HELP = ("Weight format: none (dense, exact), gguf (keep a GGUF's own types), int8 or int4 (quantize at "
              "load); auto = the checkpoint's own (gguf for a GGUF, none for safetensors)")
KV_DTYPE_HELP = "KV cache dtype: float32, bfloat16, float16, or auto (the activation dtype)"


def _env(option: str) -> str:
    """Every serve option also reads GEMLORA_<OPTION> (as vLLM and Ollama users expect in containers)."""
    return f"GEMLORA_{option.upper()}"


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The prompt (a user turn unless --raw)"),
    model: Optional[str] = typer.Option(None, help=MODEL_HELP),
    max_tokens: int = typer.Option(256, help="Tokens to generate at most"),
    temperature: float = typer.Option(0.6, help="0 = greedy; up to 5"),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass (0-2; >= 1 keeps all)"),
    top_k: Optional[int] = typer.Option(None, help="Keep the k most likely tokens (1-50)"),
    seed: Optional[int] = typer.Option(None, help="Seed for reproducible sampling (1-9999999999)"),
    repetition_penalty: float = typer.Option(1.0), frequency_penalty: float = typer.Option(0.0),
    presence_penalty: float = typer.Option(0.0),
    stop: list[str] = typer.Option([], help="Stop string (repeatable)"),
    raw: bool = typer.Option(False, help="Send the prompt as is, without Gemma's chat turns"),
    lora: Optional[str] = typer.Option(None, help="LoRA adapter: a PEFT adapter folder, or a name in --adapter-dir"),
    lora_scale: float = typer.Option(1.0, help="Strength of the adapter (0 = base model)"),
    adapter_dir: list[str] = typer.Option([], help="Folder of adapter folders, registered by name (repeatable)"),
    dtype: str = typer.Option("auto", help="float32, bfloat16, float16 or auto"),
    device: str = typer.Option("auto", help="cpu, cuda or auto"),
    quantization: str = typer.Option("auto", help=QUANT_HELP),
    kv_cache_dtype: str = typer.Option("auto", help=KV_DTYPE_HELP),
) -> None:
    """Generate a completion for PROMPT and stream it to the terminal."""
    from gemlora.engine.async_engine import AsyncEngine
    from gemlora.text.chat import format_prompt

    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                seed=seed, repetition_penalty=repetition_penalty,
                                frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                                stop=tuple(stop))
        config = EngineConfig(model=model, dtype=dtype, device=device, adapter_dirs=tuple(adapter_dir),
                              quantization=quantization, kv_cache_dtype=kv_cache_dtype)
    except (InvalidRequestError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    engine = AsyncEngine.from_config(config).start()
    try:
        if lora is not None and Path(lora).is_dir():
            ref = engine.registry.register(lora)
            typer.echo(f"[adapter {ref.name}: {engine.registry.acquire(ref.id)[1].summary()}]", err=True)
            engine.registry.release(ref)
            lora = ref.id
        prompt_ids = engine.tokenizer.encode(format_prompt(prompt, raw=raw))
        asyncio.run(_stream(engine, prompt_ids, params, lora, lora_scale))
    except (InvalidRequestError, AdapterError, UnknownAdapterError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    finally:
        engine.shutdown()


async def _stream(engine, prompt_ids: list[int], params: SamplingParams, lora: str | None, lora_scale: float) -> None:
    start = time.perf_counter()
    first = None
    async for chunk in engine.generate(prompt_ids, params, lora=lora, lora_scale=lora_scale):
        first = first or time.perf_counter()
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        if chunk.finished:
            elapsed = time.perf_counter() - start
            decode = time.perf_counter() - first
            rate = (chunk.completion_tokens - 1) / decode if chunk.completion_tokens > 1 and decode > 0 else 0.0
            typer.echo(f"\n[{chunk.prompt_tokens} prompt + {chunk.completion_tokens} generated tokens, "
                       f"finish: {chunk.finish_reason.value}, {elapsed:.1f} s, {rate:.1f} tokens/s]", err=True)


def _host(value: str) -> str:
    """An empty host binds every interface (uvicorn): never let it pass for loopback."""
    if not value.strip():
        raise typer.BadParameter("must be an address or a host name; '' would listen on every interface "
                                 "(give 0.0.0.0 or :: to mean that)")
    return value


def _positive(value: float | None) -> float | None:
    """A finite number above 0 (click's FloatRange lets nan and inf through)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"must be a finite number above 0, not {value}")
    return value


def _activations(value: str) -> str:
    if value not in QUANT_ACTIVATIONS:
        raise typer.BadParameter(f"must be one of {', '.join(QUANT_ACTIVATIONS)}, not {value!r}")
    return value


@app.command()
def serve(
    model: Optional[str] = typer.Option(None, help=MODEL_HELP, envvar=_env("model")),
    host: str = typer.Option("127.0.0.1", help="Address to listen on", envvar=_env("host"), callback=_host),
    port: int = typer.Option(8787, min=1, max=65535, help="Port to listen on", envvar=_env("port")),
    alias: list[str] = typer.Option([], help="Another name the model answers to, e.g. @cf/google/gemma-7b-it-lora "
                                             "(env: space-separated)", envvar=_env("alias")),
    data_dir: Path = typer.Option(Path("~/.local/share/gemlora"), help="Finetunes database and adapter files",
                                  envvar=_env("data_dir")),
    tokens_file: Optional[Path] = typer.Option(None, help="API tokens: one 'TOKEN ACCOUNT_ID' per line "
                                                          "(also GEMLORA_API_TOKENS=token:account,...)",
                                               envvar=_env("tokens_file")),
    allow_anonymous_public: bool = typer.Option(False, help="Serve without tokens on a non-loopback address",
                                                envvar=_env("allow_anonymous_public")),
    public_adapters_dir: Optional[Path] = typer.Option(None, help="Folder of adapters every account may use",
                                                       envvar=_env("public_adapters_dir")),
    max_input_length: int = typer.Option(4096, min=1, help="Characters per prompt or message",
                                         envvar=_env("max_input_length")),
    max_finetunes_per_account: int = typer.Option(30, min=1, envvar=_env("max_finetunes_per_account")),
    max_adapter_mb: int = typer.Option(300, min=1, help="Largest adapter file accepted, MiB", envvar=_env("max_adapter_mb")),
    max_body_mb: float = typer.Option(8.0, help="Largest request body but an adapter upload, MiB (413 beyond)",
                                      envvar=_env("max_body_mb"), callback=_positive),
    tool_format: Optional[str] = typer.Option(None, help="How tools are written into prompts: gemma-json (Google's "
                                                         "Gemma function-calling format) or functiongemma "
                                                         "(FunctionGemma's tokens); default: from the tokenizer",
                                              envvar=_env("tool_format")),
    max_loras: int = typer.Option(8, min=0, help="Adapter slots next to the model", envvar=_env("max_loras")),
    max_cpu_loras: int = typer.Option(64, min=1, help="Adapters kept in RAM", envvar=_env("max_cpu_loras")),
    max_lora_rank: int = typer.Option(32, min=1, envvar=_env("max_lora_rank")),
    kv_cache_memory_gb: float = typer.Option(1.0, help="Memory budget of the KV cache",
                                             envvar=_env("kv_cache_memory_gb"), callback=_positive),
    attention_workspace_gb: Optional[float] = typer.Option(
        None, help="Budget of one step's attention temporaries; default a quarter of the KV budget (>= 64 MiB)",
        envvar=_env("attention_workspace_gb"), callback=_positive),
    max_num_seqs: int = typer.Option(64, min=1, help="Requests in one step at most", envvar=_env("max_num_seqs")),
    max_num_batched_tokens: int = typer.Option(2048, min=1, help="Tokens in one step at most",
                                               envvar=_env("max_num_batched_tokens")),
    max_model_len: Optional[int] = typer.Option(None, min=1, help="Context window; default: the model's, capped by "
                                                           "the KV budget", envvar=_env("max_model_len")),
    prefix_caching: bool = typer.Option(True, "--prefix-caching/--no-prefix-caching",
                                        help="Reuse the KV cache of prompt prefixes seen before (same adapter)",
                                        envvar=_env("prefix_caching")),
    dtype: str = typer.Option("auto", envvar=_env("dtype")), device: str = typer.Option("auto", envvar=_env("device")),
    quantization: str = typer.Option("auto", help=QUANT_HELP, envvar=_env("quantization")),
    kv_cache_dtype: str = typer.Option("auto", help=KV_DTYPE_HELP, envvar=_env("kv_cache_dtype")),
    quant_activations: str = typer.Option("auto", help="How the quantized kernels quantize activations: int8 (one "
                                          "pass, llama.cpp's: fastest, changes ~3% of greedy tokens against the "
                                          "float path), int8x2, int16, or auto (the CPU's cheapest exact-enough)",
                                          envvar=_env("quant_activations"), callback=_activations),
    screen_lm_head: bool = typer.Option(True, "--screen-lm-head/--no-screen-lm-head",
                                        help="Greedy and top-k (<= 64) steps read a 4-bit copy of the LM head and "
                                             "rescore its top 64 tokens exactly (CPU; same greedy tokens; the "
                                             "head read in 105 MB, not 178, on Gemma 3 270M)",
                                        envvar=_env("screen_lm_head")),
    speculative_tokens: int = typer.Option(8, min=0, help="Prompt-lookup speculative decoding: draft tokens a request "
                                           "may verify per step, taken from its own prompt and output (lossless: "
                                           "the same tokens; drafted only where the measured step cost says it "
                                           "pays, so not in large batches); 0 turns it off",
                                           envvar=_env("speculative_tokens")),
    prompt_lookup_min: int = typer.Option(2, min=1, help="Shortest suffix n-gram looked up for drafts",
                                          envvar=_env("prompt_lookup_min")),
    prompt_lookup_max: int = typer.Option(4, min=1, help="Longest suffix n-gram looked up for drafts",
                                          envvar=_env("prompt_lookup_max")),
    log_level: str = typer.Option("info", envvar=_env("log_level")),
    replicas: int = typer.Option(1, min=1, help="Engine replicas; more than 1 runs a Ray Serve application "
                                                "(pip install -e '.[ray]')", envvar=_env("replicas")),
    ray_address: Optional[str] = typer.Option(None, help="Join this Ray cluster instead of starting a local one "
                                                         "(implies Ray Serve)", envvar=_env("ray_address")),
    replica_routing: str = typer.Option("affinity", help="How requests reach replicas: affinity (to a replica "
                                        "holding the adapter), ray (Ray Serve's default), round-robin",
                                        envvar=_env("replica_routing")),
) -> None:
    """Serve the Workers AI and OpenAI-compatible HTTP APIs."""
    import logging

    import uvicorn

    from gemlora.api.app import ServerSettings, create_app
    from gemlora.api.auth import Auth, is_loopback
    from gemlora.engine.async_engine import AsyncEngine
    from gemlora.model.source import DEFAULT_MODEL_NAME

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        auth = Auth.from_sources(tokens_file)
    except (OSError, ValueError) as exc:
        typer.echo(f"error: API tokens: {exc}", err=True)
        raise typer.Exit(2) from exc
    if auth.anonymous and not is_loopback(host):
        if not allow_anonymous_public:
            typer.echo(f"error: refusing to serve {host} without API tokens; give --tokens-file or "
                       "GEMLORA_API_TOKENS, or --allow-anonymous-public", err=True)
            raise typer.Exit(2)
    if auth.anonymous:
        typer.echo(f"no API tokens configured: anonymous requests are accepted on {host}", err=True)
    try:
        config = EngineConfig(model=model, dtype=dtype, device=device, kv_cache_memory_gb=kv_cache_memory_gb,
                              max_loras=max_loras, max_cpu_loras=max_cpu_loras, max_lora_rank=max_lora_rank,
                              max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                              max_model_len=max_model_len, quantization=quantization, kv_cache_dtype=kv_cache_dtype,
                              attention_workspace_gb=attention_workspace_gb, enable_prefix_caching=prefix_caching,
                              screen_lm_head=screen_lm_head, quant_activations=quant_activations,
                              num_speculative_tokens=speculative_tokens, prompt_lookup_min=prompt_lookup_min,
                              prompt_lookup_max=prompt_lookup_max)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    base = "@cf/" + DEFAULT_MODEL_NAME if model in (None, DEFAULT_MODEL_NAME) else "@local/" + Path(model).stem
    try:
        settings = ServerSettings(model_names=(base, *alias), data_dir=data_dir.expanduser(),
                                  max_input_length=max_input_length, max_finetunes_per_account=max_finetunes_per_account,
                                  max_adapter_file_bytes=max_adapter_mb * 2**20,
                                  max_body_bytes=int(max_body_mb * 2**20), public_adapters_dir=public_adapters_dir,
                                  tool_format=tool_format)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if replicas > 1 or ray_address:
        try:
            from gemlora.cluster.application import ROUTERS, serve_replicas
        except ImportError as exc:
            typer.echo(f"error: --replicas needs Ray Serve: pip install -e '.[ray]' ({exc})", err=True)
            raise typer.Exit(2) from exc
        if replica_routing not in ROUTERS:
            raise typer.BadParameter(f"--replica-routing must be one of {', '.join(ROUTERS)}")
        serve_replicas(config, settings, auth, replicas, ray_address, host, port, replica_routing)
        return
    engine = AsyncEngine.from_config(config)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, settings, auth), host=host, port=port,
                                           log_level=log_level, timeout_graceful_shutdown=30))
    # The engine runs on this (the main) thread and HTTP on another: torch is ~1.6x slower when its
    # parallel regions start from a secondary thread. Signals still land here and stop the server,
    # whose shutdown (after in-flight requests finish) stops the engine.
    def stop(signum, frame):
        if server.should_exit:
            server.force_exit = True
        server.should_exit = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    http = threading.Thread(target=_serve_http, args=(server, engine), name="gemlora-http")
    http.start()
    typer.echo(f"serving {', '.join(settings.model_names)} on http://{host}:{port}", err=True)
    engine.run()
    http.join()
    if not server.started:
        raise typer.Exit(1)       # it never listened (e.g. the port is taken): uvicorn said why


def _serve_http(server, engine) -> None:
    try:
        server.run()
    finally:
        engine.shutdown()         # however the server ended, the engine ends with it


@app.command()
def convert(
    gguf: Optional[Path] = typer.Argument(None, help="GGUF file; default: the embedded model"),
    cache_dir: Optional[Path] = typer.Option(None, help="Where converted checkpoints live (default ~/.cache/gemlora)"),
) -> None:
    """Convert a GGUF file once into the checkpoint cache (later starts memory-map it)."""
    from gemlora.model.source import resolve_model_dir

    typer.echo(str(resolve_model_dir(str(gguf) if gguf else None, cache_dir=cache_dir, progress=True)))


if __name__ == "__main__":
    app()
