"""Shared fixtures: tiny random Gemma 1/2/3 checkpoints written by transformers itself, and the
embedded google/gemma-3-270m (converted once per session into a temporary cache, plus transformers'
own load of the same GGUF as the reference)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)


def kernels_missing() -> tuple[str, str] | None:
    """None when the C++ kernels built; else ("skip", why) where they are not expected to build
    (GEMLORA_NO_KERNELS, no C++ compiler, not x86-64), or ("fail", why) where they should have."""
    import os
    import platform
    import shutil

    from gemlora.kernels.build import build_error, extension
    if extension() is not None:
        return None
    if os.environ.get("GEMLORA_NO_KERNELS"):
        return "skip", "GEMLORA_NO_KERNELS is set"
    if platform.machine().lower() not in ("x86_64", "amd64") or not shutil.which(os.environ.get("CXX", "c++")):
        return "skip", "no C++ compiler, or not x86-64: the kernels are not expected to build here"
    return "fail", f"the C++ kernels did not build on an x86-64 machine with a compiler:\n{build_error()}"


@pytest.fixture
def kernels():
    """The compiled kernels. Where they should have built but did not, the test fails (a broken build
    cannot pass the suite with no kernel coverage); it skips only where they are not expected."""
    from gemlora.kernels.build import extension
    missing = kernels_missing()
    if missing is not None:
        kind, why = missing
        pytest.skip(why) if kind == "skip" else pytest.fail(why, pytrace=False)
    return extension()


def tiny_lora_tensors(cfg, rank: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """PEFT's tensors of a q_proj LoRA on every layer of a model of GemmaConfig `cfg`."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg.num_layers):
        key = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        tensors[f"{key}.lora_A.weight"] = torch.randn(rank, cfg.hidden_size, generator=g)
        tensors[f"{key}.lora_B.weight"] = torch.randn(cfg.q_size, rank, generator=g)
    return tensors


def tiny_hf_config(kind: str, **overrides):
    from transformers import Gemma2Config, Gemma3TextConfig, GemmaConfig
    if kind == "gemma":
        return GemmaConfig(**{**TINY, **overrides})
    if kind == "gemma2":  # small window so prompts cross it; soft-capping on
        return Gemma2Config(**{**TINY, "sliding_window": 8, "query_pre_attn_scalar": 16, **overrides})
    if kind == "gemma3":  # 5 local : 1 global would leave no global layer in 4; use 2:1 via layer_types
        kw = {**TINY, "num_hidden_layers": 6, "sliding_window": 8, "query_pre_attn_scalar": 24,
              "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                                  "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
              "layer_types": ["sliding_attention", "sliding_attention", "full_attention"] * 2, **overrides}
        return Gemma3TextConfig(**kw)
    raise ValueError(kind)


def make_tiny_checkpoint(kind: str, path, seed: int = 0, **overrides):
    """A random tiny model saved as an HF folder; norm weights randomised so (1 + w) matters."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(kind, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(path)
    return model.eval()


def save_random_peft(base_dir, out, seed: int, **lora_kw):
    """A PEFT LoRA (LoraConfig(**lora_kw)) of the checkpoint at base_dir with random N(0, 0.3) A and B
    (PEFT zero-initialises B, which would make it a no-op), saved to `out`; returns the peft model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), LoraConfig(**lora_kw))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    pm.save_pretrained(out)
    return pm.eval()


@pytest.fixture(scope="session", params=["gemma", "gemma2", "gemma3"])
def tiny_checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    hf_model = make_tiny_checkpoint(request.param, path)
    return request.param, path, hf_model


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    from gemlora.model import source
    return source.embedded_gguf()


@pytest.fixture(scope="session")
def converted(gguf_path, tmp_path_factory) -> Path:
    """A fresh conversion (not the user's cache), so the converter itself is under test."""
    from gemlora.model.source import resolve_model_dir
    cache = tmp_path_factory.mktemp("gemlora-cache")
    start = time.perf_counter()
    path = resolve_model_dir(gguf_path, cache_dir=cache, progress=False)
    print(f"\nconverted {gguf_path.name} in {time.perf_counter() - start:.1f}s")
    return path


@pytest.fixture(scope="session")
def hf_model(gguf_path):
    """transformers loading the same GGUF: the reference for the real model."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_tokenizer(gguf_path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.fixture(scope="session")
def real_model(converted):
    from gemlora.model.loader import load_model
    return load_model(converted, torch.float32)


@pytest.fixture(scope="session")
def tiny_real_vocab(converted, tmp_path_factory) -> Path:
    """A tiny random Gemma 3 with the embedded model's tokenizer (its 262k vocabulary) and a long
    context: servers over real text that step in milliseconds."""
    import shutil
    path = tmp_path_factory.mktemp("tiny-real-vocab")
    make_tiny_checkpoint("gemma3", path, vocab_size=262144, max_position_embeddings=32768)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(converted / name, path / name)
    return path


def start_uvicorn(app):
    """Serves `app` on a free loopback port from a thread: (base URL, stop function)."""
    import threading

    import uvicorn
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)

    def stop():
        srv.should_exit = True
        thread.join(10)

    return f"http://127.0.0.1:{srv.config.port}", stop


@contextlib.contextmanager
def serve_engine(model, tok, config, data_dir, model_names=("@cf/google/gemma-7b-it-lora",), tokens=None):
    """A gemlora server over `model` (with tokenizer `tok` and EngineConfig `config`) on a loopback port:
    yields its base URL; stops the server and the engine after. `tokens`: {token: account}."""
    from gemlora.api.app import ServerSettings, create_app
    from gemlora.api.auth import Auth
    from gemlora.engine.async_engine import AsyncEngine
    from gemlora.engine.engine import LLMEngine
    engine = AsyncEngine(LLMEngine(model, config, tok.stop_token_ids), tok).start()
    settings = ServerSettings(model_names=tuple(model_names), data_dir=data_dir)
    base, stop = start_uvicorn(create_app(engine, settings, Auth(tokens or {"tok": "acct"})))
    try:
        yield base
    finally:
        stop()
        engine.shutdown()


@pytest.fixture
def serving():
    """serving(app) -> base URL of that app on a loopback port, stopped after the test."""
    stops = []

    def start(app) -> str:
        base, stop = start_uvicorn(app)
        stops.append(stop)
        return base

    yield start
    for stop in stops:
        stop()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_quantized(rows: int, cols: int, bits: int, group: int, scale_dtype=torch.float16, bias: bool = False,
                     offset: int | None = None, seed: int = 0):
    """A random QuantizedTensor of the given format (codes uniform over their range)."""
    from gemlora.quant.tensor import QuantizedTensor
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, (rows, cols), generator=g, dtype=torch.int32).to(torch.uint8)
    if bits == 4:
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    scales = (torch.rand(rows, cols // group, generator=g) * 0.02 + 0.001).to(scale_dtype)
    b = (torch.randn(rows, cols // group, generator=g) * 0.01).to(scale_dtype) if bias else None
    if offset is None:
        offset = 2 ** (bits - 1)
    return QuantizedTensor(codes, scales, b, bits, group, offset)


def start_replicas(converted, data_dir, tokens: dict[str, str], replicas: int = 2, extra: tuple[str, ...] = ()):
    """`gemlora serve --replicas N` (a Ray Serve application on a local Ray cluster) in a subprocess, once
    /health answers ok; returns (process, base URL, stop())."""
    import httpx
    port = free_port()
    tokens_file = Path(data_dir) / "tokens"
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    tokens_file.write_text("".join(f"{t} {a}\n" for t, a in tokens.items()))
    proc = subprocess.Popen([sys.executable, "-m", "gemlora.cli", "serve", "--replicas", str(replicas),
                             "--model", str(converted), "--alias", "@cf/google/gemma-7b-it-lora", "--port", str(port),
                             "--data-dir", str(Path(data_dir) / "data"), "--tokens-file", str(tokens_file),
                             "--dtype", "float32", "--kv-cache-memory-gb", "0.25", "--log-level", "warning", *extra],
                            stdout=subprocess.DEVNULL, stderr=open(Path(data_dir) / "serve.log", "w"))
    base = f"http://127.0.0.1:{port}"

    def stop():
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    deadline = time.monotonic() + 420          # Ray's start, then two model loads, on 2 busy cores
    while time.monotonic() < deadline:
        try:
            health = httpx.get(f"{base}/health", timeout=2)
            if health.status_code == 200 and health.json()["engine"].startswith(f"{replicas} of {replicas}"):
                return proc, base, stop
        except (httpx.HTTPError, ValueError):
            pass
        if proc.poll() is not None:
            raise AssertionError(f"gemlora serve --replicas exited with {proc.returncode}: "
                                 + (Path(data_dir) / "serve.log").read_text()[-3000:])
        time.sleep(1)
    stop()
    raise AssertionError("gemlora serve --replicas did not become ready: "
                         + (Path(data_dir) / "serve.log").read_text()[-3000:])
