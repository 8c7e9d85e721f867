"""EngineConfig: every knob of the engine in one validated dataclass."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZATIONS = ("auto", "none", "gguf", "int8", "int4")
QUANT_ACTIVATIONS = ("auto", "int8", "int8x2", "int16")   # gemlora.kernels.qmatmul.ACTIVATIONS, or auto


@dataclass(slots=True)
class EngineConfig:
    model: str | None = None              # HF folder, .gguf file, or None for the embedded default
    dtype: str = "auto"                   # auto: bfloat16 on CUDA and on CPUs with AMX, else float32
    device: str = "auto"                  # auto: cuda if available, else cpu
    quantization: str = "auto"            # none | gguf | int8 | int4; auto: the checkpoint's own (gguf for GGUF)
    quant_activations: str = "auto"       # int8 (llama.cpp's) | int8x2 | int16; auto: the CPU's cheapest exact-enough
    kv_cache_memory_gb: float = 1.0       # memory budget for the KV cache
    kv_cache_dtype: str = "auto"          # auto: the activation dtype
    attention_workspace_gb: float | None = None  # one step's attention temporaries; None: KV / 4, >= 64 MiB
    block_size: int = 16                  # tokens per KV block
    enable_prefix_caching: bool = True    # reuse the K/V of full blocks of a prefix seen before (same adapter)
    max_num_seqs: int = 64                # requests in one step at most
    max_num_batched_tokens: int = 2048    # tokens in one step at most (prefill chunks + decodes)
    max_model_len: int | None = None      # context window; default: the model's, capped by the KV budget
    max_loras: int = 8                    # adapter slots next to the model (distinct adapters per step)
    max_lora_rank: int = 32               # slots are padded to this rank; higher-rank adapters are refused
    max_cpu_loras: int = 64               # validated adapters kept in RAM (LRU), beyond those in slots
    adapter_dirs: tuple[str, ...] = ()    # folders whose subfolders are adapters, registered by folder name
    adapter_aging_steps: int = 32         # steps a request waits for an adapter slot before others are held back
    stall_timeout_s: float = 300.0        # a step running longer than this makes the engine unhealthy
    screen_lm_head: bool = True           # greedy / small top-k steps read a 4-bit screen of the LM head (CPU)
    num_speculative_tokens: int = 8       # prompt-lookup draft tokens per request and step at most; 0: off
    prompt_lookup_min: int = 2            # shortest suffix n-gram looked up in the request's own tokens
    prompt_lookup_max: int = 4            # longest (the longest that matches wins)

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in _DTYPES:
            raise ValueError(f"kv_cache_dtype must be auto or one of {sorted(_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if self.quant_activations not in QUANT_ACTIVATIONS:
            raise ValueError(f"quant_activations must be one of {', '.join(QUANT_ACTIVATIONS)}, "
                             f"got {self.quant_activations!r}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if self.num_speculative_tokens < 0 or not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError("num_speculative_tokens must be >= 0, and 1 <= prompt_lookup_min <= prompt_lookup_max")
        if self.max_loras < 0 or self.max_lora_rank < 1:
            raise ValueError("max_loras must be >= 0 and max_lora_rank >= 1")
        if self.max_cpu_loras < 1 or (self.max_model_len is not None and self.max_model_len < 1):
            raise ValueError("max_cpu_loras and max_model_len (when given) must be positive")
        # `not x > 0`, never `x <= 0`: nan compares false to everything
        if self.adapter_aging_steps < 0 or not (math.isfinite(self.stall_timeout_s) and self.stall_timeout_s > 0):
            raise ValueError("adapter_aging_steps must be >= 0 and stall_timeout_s a finite number above 0")
        if not (math.isfinite(self.kv_cache_memory_gb) and self.kv_cache_memory_gb > 0):
            raise ValueError(f"kv_cache_memory_gb must be a finite number above 0, not {self.kv_cache_memory_gb}")
        if self.attention_workspace_gb is not None and not (math.isfinite(self.attention_workspace_gb)
                                                            and self.attention_workspace_gb > 0):
            raise ValueError("attention_workspace_gb must be a finite number above 0 (or None: derived)")

    @property
    def attention_workspace_bytes(self) -> int:
        """Budget of the attention temporaries of one step (gathered K/V, masks, scores)."""
        if self.attention_workspace_gb is not None:
            return int(self.attention_workspace_gb * 2**30)
        return max(int(self.kv_cache_memory_gb * 2**30) // 4, 64 * 2**20)

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def kv_torch_dtype(self, activation_dtype: torch.dtype) -> torch.dtype:
        return activation_dtype if self.kv_cache_dtype == "auto" else _DTYPES[self.kv_cache_dtype]

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            fast_bf16 = self.torch_device.type == "cuda" or _cpu_has_amx_bf16()
            return torch.bfloat16 if fast_bf16 else torch.float32
        return _DTYPES[self.dtype]

    def activation_dtype(self, quantized: bool) -> torch.dtype:
        """The model's dtype for a checkpoint whose linear layers are (or are not) quantized. On the CPU
        the quantized kernels take float32 activations and the decode stack runs float32 only, so "auto"
        keeps float32 there even where AMX makes bf16 GEMMs fast: on an AMX Xeon the embedded GGUF
        decodes in 19.3 ms per step at batch 1 in float32 against 29.5 ms in bf16, 121 vs 166 ms at 32."""
        if self.dtype == "auto" and quantized and self.torch_device.type == "cpu":
            return torch.float32
        return self.torch_dtype


def _cpu_has_amx_bf16() -> bool:
    """bf16 GEMMs beat fp32 3x on CPUs with AMX (measured: 394 vs 136 GFLOP/s at 32 rows) and run at
    a sixth of fp32 on AVX2-only ones, so the CPU decides what "auto" means."""
    try:
        with open("/proc/cpuinfo") as f:
            return " amx_bf16" in f.read()
    except OSError:
        return False
