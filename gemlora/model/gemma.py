"""The Gemma text decoder (Gemma 1, 2 and 3), all of it in this file.

Matches transformers' `modeling_gemma.py`, `modeling_gemma2.py` and `modeling_gemma3.py` (checked by
the parity tests): embeddings scaled by sqrt(hidden) in the activation dtype, RMSNorm (1 + w),
GeGLU MLP with tanh GeLU, RoPE (rotate-half) with separate local/global bases, QK-norm (Gemma 3),
the 4-norm "sandwich" (Gemma 2/3), sliding-window layers, attention and final logit soft-capping,
tied embeddings. Branches on `GemmaConfig` switches, never on a version.

The model sees flat tensors only: `input_ids [T]`, `positions [T]` and a `StepContext` holding the
per-step `AttentionMetadata` and the KV cache tensors. It knows nothing of requests or scheduling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from gemlora.kernels.build import extension
from gemlora.kernels.decode_stack import DecodeStack, LayerWeights, StackShape
from gemlora.model.attention import AttentionMetadata, paged_attention
from gemlora.model.config import GemmaConfig
from gemlora.model.layers import Linear, RMSNorm, Rotary, gelu_tanh, norm_and_rotate
from gemlora.quant.screened_head import ScreenedHead

if TYPE_CHECKING:
    from gemlora.lora.batch import LoRABatch


_LM_HEAD_MIN_ROWS = 16


@dataclass(slots=True)
class StepContext:
    attn: AttentionMetadata
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]   # per layer (K, V)
    lora: LoRABatch | None = None                          # this step's adapter layout, if any token uses one
    cos_sin: dict[bool, tuple[torch.Tensor, torch.Tensor]] | None = None  # by "sliding", filled by the model


class GemmaAttention(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer_idx: int):
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.sliding = cfg.layer_sliding[layer_idx]
        self.qkv_proj = Linear(cfg.hidden_size, (cfg.q_size, cfg.kv_size, cfg.kv_size))
        self.o_proj = Linear(cfg.q_size, (cfg.hidden_size,))
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        cfg = self.cfg
        q, k, v = self.qkv_proj(x, ctx.lora).split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.view(-1, cfg.num_heads, cfg.head_dim)
        k = k.view(-1, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(-1, cfg.num_kv_heads, cfg.head_dim)
        cos, sin = ctx.cos_sin[self.sliding]
        q = norm_and_rotate(q, self.q_norm if cfg.qk_norm else None, cos, sin)
        k = norm_and_rotate(k, self.k_norm if cfg.qk_norm else None, cos, sin)
        k_cache, v_cache = ctx.kv_caches[self.layer_idx]
        out = paged_attention(q, k, v, k_cache, v_cache, ctx.attn, scale=cfg.attn_scale,
                              sliding=self.sliding, softcap=cfg.attn_logit_softcap)
        return self.o_proj(out, ctx.lora)


class GemmaMLP(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, (cfg.intermediate_size, cfg.intermediate_size))
        self.down_proj = Linear(cfg.intermediate_size, (cfg.hidden_size,))

    def forward(self, x: torch.Tensor, lora: LoRABatch | None) -> torch.Tensor:
        gate, up = self.gate_up_proj(x, lora).chunk(2, dim=-1)
        return self.down_proj(gelu_tanh(gate) * up, lora)


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer_idx: int):
        super().__init__()
        self.sandwich = cfg.sandwich_norms
        self.self_attn = GemmaAttention(cfg, layer_idx)
        self.mlp = GemmaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def projections(self) -> tuple[Linear, Linear, Linear, Linear]:
        """qkv, o, gate_up, down: the order the decode stack takes them in."""
        return self.self_attn.qkv_proj, self.self_attn.o_proj, self.mlp.gate_up_proj, self.mlp.down_proj

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        if self.sandwich:  # Gemma 2/3: norm before and after each block
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), ctx))
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x), ctx.lora))
        x = x + self.self_attn(self.input_layernorm(x), ctx)  # Gemma 1: post_attention norm feeds the MLP
        return x + self.mlp(self.post_attention_layernorm(x), ctx.lora)


class GemmaForCausalLM(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.embed_quantized = None     # set by the loader with a quantized table (see set_quantized_embedding)
        self.layers = nn.ModuleList(GemmaDecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, (cfg.vocab_size,))
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens
        self._rotary: dict[bool, Rotary] = {}
        self.use_decode_stack = True    # decode-only steps in one C++ call where it applies (same bits)
        self._decode_stack: DecodeStack | None | bool = False   # False: not built yet; None: cannot be
        self.screened_head: ScreenedHead | None = None   # set by screen_lm_head
        for name, module in self.layers.named_modules(prefix="layers"):
            if isinstance(module, Linear):
                module.lora_key = name

    def lora_targets(self) -> dict[str, tuple[int, tuple[int, ...]]]:
        """Every projection LoRA can patch: key -> (in_features, packed output sizes)."""
        return {m.lora_key: (m.in_features, m.output_sizes) for m in self.layers.modules() if isinstance(m, Linear)}

    def set_quantized_embedding(self, table) -> None:
        """`table.take_rows(ids, dtype)` serves lookups; tied, it is also the LM head's weight."""
        self.embed_quantized = table
        self.embed_tokens = None
        if self.cfg.tie_word_embeddings:
            self.lm_head.set_quantized(table)

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    def rotary(self, sliding: bool) -> Rotary:
        if sliding not in self._rotary:  # built lazily, after the weights found their device
            spec = self.cfg.rope_local if sliding else self.cfg.rope_global
            self._rotary[sliding] = Rotary(self.cfg.head_dim, spec, self.device)
        return self._rotary[sliding]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Returns the final-normed hidden states, [T, hidden]."""
        ctx.cos_sin = {s: self.rotary(s).cos_sin(positions, self.dtype) for s in set(self.cfg.layer_sliding)}
        # transformers scales in the activation dtype: sqrt(3072) = 55.4256 becomes 55.5 in bf16.
        normalizer = torch.tensor(self.cfg.hidden_size ** 0.5, dtype=self.dtype)
        if self.embed_quantized is None:
            x = self.embed_tokens[input_ids]
        else:
            x = self.embed_quantized.take_rows(input_ids, self.dtype)
        x = x * normalizer
        stack = self.decode_stack() if self.use_decode_stack else None
        if stack is not None and stack.applies(x, ctx.attn, ctx.kv_caches, ctx.lora):
            if ctx.lora is not None and not stack.attached(ctx.lora.slots):
                stack.attach_lora(ctx.lora.slots, [[p.lora_key for p in layer.projections()] for layer in self.layers])
            x = stack(x, ctx.attn, ctx.kv_caches, ctx.cos_sin, ctx.lora)
        else:
            for layer in self.layers:
                x = layer(x, ctx)
        return self.norm(x)

    def decode_stack(self) -> DecodeStack | None:
        """The layers as one C++ call for decode steps (gemlora.kernels.decode_stack), built on first use
        from the loaded weights; None where it cannot serve (no kernels, not the CPU, a weight in
        another form)."""
        if self._decode_stack is False:
            self._decode_stack = self._build_decode_stack()
        return self._decode_stack

    def _build_decode_stack(self) -> DecodeStack | None:
        if extension() is None or self.device.type != "cpu" or self.dtype != torch.float32:
            return None

        def parts(linear: Linear):
            if linear.quantized is None:
                return [linear.weight.detach()]
            return getattr(linear.quantized, "cpu_parts", lambda: None)()

        cfg, layers = self.cfg, []
        for layer in self.layers:
            attn = layer.self_attn
            projections = [parts(p) for p in layer.projections()]
            if any(p is None for p in projections):
                return None
            norms = [layer.input_layernorm, layer.post_attention_layernorm]
            if layer.sandwich:
                norms += [layer.pre_feedforward_layernorm, layer.post_feedforward_layernorm]
            layers.append(LayerWeights(*projections, [n.scale() for n in norms],
                                       attn.q_norm.scale() if cfg.qk_norm else None,
                                       attn.k_norm.scale() if cfg.qk_norm else None, attn.sliding))
        shape = StackShape(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps, cfg.attn_scale,
                           cfg.attn_logit_softcap, cfg.sandwich_norms)
        return DecodeStack(shape, layers)

    def screen_lm_head(self) -> ScreenedHead | None:
        """Builds (once) the 4-bit screen of the LM head (gemlora.quant.screened_head) where it runs
        (on the CPU with the kernels) and pays (the head is read in 6 bits or more). None elsewhere."""
        if self.screened_head is None and self.device.type == "cpu" and extension() is not None:
            weight = self.lm_head.weight if self.lm_head.quantized is None else self.lm_head.quantized
            if ScreenedHead.pays(weight, self.cfg.vocab_size, self.cfg.hidden_size):
                self.screened_head = ScreenedHead.of(weight, self.cfg.vocab_size, self.cfg.hidden_size)
        return self.screened_head

    def compute_logits(self, hidden: torch.Tensor, screened: bool = False) -> torch.Tensor:
        """hidden: [N, hidden] for the N positions that are sampled. Returns float32 [N, vocab].
        `screened`: through the screened head, if built (exact at each row's top candidates only)."""
        if screened and self.screened_head is not None:
            logits = self.screened_head(hidden)
        else:
            logits = self._exact_logits(hidden)
        cap = self.cfg.final_logit_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _exact_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.shape[0]
        if hidden.device.type == "cpu" and 1 < rows < _LM_HEAD_MIN_ROWS and self.lm_head.quantized is None:
            # MKL's fp32 GEMM against the [vocab, hidden] weight is slowest for 2-15 rows (8 rows
            # take 1.5x as long as 16): padding to 16 rows is cheaper than the small-M kernel.
            hidden = torch.cat([hidden, hidden.new_zeros(_LM_HEAD_MIN_ROWS - rows, hidden.shape[1])])
        return self.lm_head(hidden)[:rows].float()
