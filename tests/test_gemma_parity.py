"""Our Gemma 1/2/3 against transformers on tiny random weights: prefill and step-by-step decode logits."""

from __future__ import annotations

import torch

from gemlora.cache.block_manager import BlockManager
from gemlora.cache.kv_cache import allocate_kv_cache
from gemlora.model.attention import AttentionMetadata
from gemlora.model.config import GemmaConfig
from gemlora.model.gemma import StepContext
from gemlora.model.loader import load_model

ATOL = 1e-4


class TinyDriver:
    """Runs sequences through our model with a paged cache, outside the engine."""

    def __init__(self, model, block_size=4, num_blocks=64):
        self.model, self.block_size = model, block_size
        self.blocks = BlockManager(num_blocks, block_size)
        self.kv = allocate_kv_cache(model.cfg, num_blocks, block_size, model.dtype, "cpu")

    def step(self, chunks: list[list[int]], tables: list[list[int]], done: list[int]) -> torch.Tensor:
        """chunks[b]: new tokens of sequence b, which already has done[b] tokens cached. Logits of all new tokens."""
        seq_lens = [d + len(c) for d, c in zip(done, chunks)]
        for b, s in enumerate(seq_lens):
            need = self.blocks.blocks_for(s) - len(tables[b])
            tables[b] += self.blocks.allocate(need)
        meta = AttentionMetadata.build([len(c) for c in chunks], seq_lens, tables, self.block_size,
                                       self.model.cfg.sliding_window, "cpu")
        ids = torch.tensor([t for c in chunks for t in c])
        pos = torch.cat([torch.arange(d, d + len(c)) for d, c in zip(done, chunks)])
        hidden = self.model(ids, pos, StepContext(meta, self.kv))
        return self.model.compute_logits(hidden)


def hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()


def test_config_normalises_both_schemas():
    old = dict(model_type="gemma3_text", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=12,
               num_attention_heads=2, num_key_value_heads=1, head_dim=4, sliding_window_pattern=6,
               rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0})
    new = {**{k: v for k, v in old.items() if k not in ("sliding_window_pattern", "rope_theta",
                                                         "rope_local_base_freq", "rope_scaling")},
           "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(12)],
           "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    a, b = GemmaConfig.from_hf(old), GemmaConfig.from_hf(new)
    assert a == b
    assert a.layer_sliding == (True,) * 5 + (False,) + (True,) * 5 + (False,)
    assert a.rope_global.linear_factor == 8.0 and a.rope_local.linear_factor == 1.0
    assert a.rope_local.theta == 1e4 and a.attn_scale == 256 ** -0.5 and a.qk_norm


def test_prefill_and_decode_match_transformers(tiny_checkpoint):
    kind, path, hf_model = tiny_checkpoint
    model = load_model(path, torch.float32)
    driver = TinyDriver(model)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 512, (19,), generator=g).tolist()   # longer than the window of 8
    decode = torch.randint(0, 512, (6,), generator=g).tolist()
    ref = hf_logits(hf_model, prompt + decode)
    table: list[int] = []
    ours = driver.step([prompt], [table], [0])
    torch.testing.assert_close(ours, ref[:len(prompt)], atol=ATOL, rtol=0)
    for i, tok in enumerate(decode):
        step = driver.step([[tok]], [table], [len(prompt) + i])
        torch.testing.assert_close(step[0], ref[len(prompt) + i], atol=ATOL, rtol=0)


def test_batched_mixed_chunks_match_transformers(tiny_checkpoint):
    """Chunked prefill of one sequence next to decode of another, in one step."""
    kind, path, hf_model = tiny_checkpoint
    model = load_model(path, torch.float32)
    driver = TinyDriver(model)
    g = torch.Generator().manual_seed(2)
    a = torch.randint(0, 512, (23,), generator=g).tolist()
    b = torch.randint(0, 512, (12,), generator=g).tolist()
    ref_a, ref_b = hf_logits(hf_model, a), hf_logits(hf_model, b)
    ta, tb = [], []
    driver.step([a[:10]], [ta], [0])
    out = driver.step([a[10:], b[:11]], [ta, tb], [10, 0])          # rest of a's prompt + b's prompt
    torch.testing.assert_close(out[:13], ref_a[10:], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[13:], ref_b[:11], atol=ATOL, rtol=0)
    out = driver.step([[b[11]]], [tb], [11])
    torch.testing.assert_close(out[0], ref_b[11], atol=ATOL, rtol=0)
