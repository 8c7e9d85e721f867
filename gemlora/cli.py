"""The `gemlora` command line: `generate` streams a completion to the terminal, `convert` turns a
GGUF file into the cached checkpoint folder ahead of time. Thin: it only wires options to the engine.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from gemlora.config import EngineConfig
from gemlora.lora.adapter import AdapterError
from gemlora.lora.registry import UnknownAdapterError
from gemlora.sampling import InvalidRequestError, SamplingParams

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Serve Gemma models with many LoRA adapters.")

MODEL_HELP = "HF checkpoint folder or .gguf file; default: the embedded google/gemma-3-270m"


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
) -> None:
    """Generate a completion for PROMPT and stream it to the terminal."""
    from gemlora.engine.async_engine import AsyncEngine
    from gemlora.text.chat import format_prompt

    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                seed=seed, repetition_penalty=repetition_penalty,
                                frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                                stop=tuple(stop))
        config = EngineConfig(model=model, dtype=dtype, device=device, adapter_dirs=tuple(adapter_dir))
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
