"""Gemma-7B in a laptop's memory: a GGUF at google/gemma-7b's sizes (28 layers, hidden 3072, 16 heads
of 256, MLP 24576, vocabulary 256000, tied embedding), every projection and the embedding in random
Q4_0, written here with gguf-py (never committed), converts, loads and generates in a fresh process
whose peak resident memory stays within 7 GB including a 1 GB KV cache, and within 1 GB of what it
holds once loaded."""

from __future__ import annotations

import json
import subprocess
import sys

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

pytestmark = pytest.mark.slow

LAYERS, HIDDEN, HEADS, HEAD_DIM, MLP, VOCAB = 28, 3072, 16, 256, 24576, 256000
GB = 2**30


def write_gemma_7b_q4_0(path):
    """Tensor by tensor (header first, then each tensor's bytes), so writing never holds the model."""
    writer = gguf.GGUFWriter(path, "gemma")
    for add, value in ((writer.add_context_length, 8192), (writer.add_embedding_length, HIDDEN),
                       (writer.add_block_count, LAYERS), (writer.add_feed_forward_length, MLP),
                       (writer.add_head_count, HEADS), (writer.add_head_count_kv, HEADS),
                       (writer.add_layer_norm_rms_eps, 1e-6), (writer.add_key_length, HEAD_DIM),
                       (writer.add_value_length, HEAD_DIM)):
        add(value)
    writer.add_tokenizer_model("llama")
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"\u2581w{i}" for i in range(VOCAB - 4)]
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * VOCAB)
    writer.add_token_types([3] * 4 + [1] * (VOCAB - 4))
    for add, value in ((writer.add_bos_token_id, 2), (writer.add_eos_token_id, 1), (writer.add_unk_token_id, 3),
                       (writer.add_pad_token_id, 0)):
        add(value)
    q, kv, o = HEADS * HEAD_DIM, HEADS * HEAD_DIM, HEADS * HEAD_DIM
    tensors = [("token_embd.weight", (VOCAB, HIDDEN))]
    for i in range(LAYERS):
        tensors += [(f"blk.{i}.attn_norm.weight", (HIDDEN,)), (f"blk.{i}.attn_q.weight", (q, HIDDEN)),
                    (f"blk.{i}.attn_k.weight", (kv, HIDDEN)), (f"blk.{i}.attn_v.weight", (kv, HIDDEN)),
                    (f"blk.{i}.attn_output.weight", (HIDDEN, o)), (f"blk.{i}.ffn_norm.weight", (HIDDEN,)),
                    (f"blk.{i}.ffn_gate.weight", (MLP, HIDDEN)), (f"blk.{i}.ffn_up.weight", (MLP, HIDDEN)),
                    (f"blk.{i}.ffn_down.weight", (HIDDEN, MLP))]
    tensors.append(("output_norm.weight", (HIDDEN,)))
    block_bytes = gguf.GGML_QUANT_SIZES[T.Q4_0][1]
    for name, shape in tensors:
        if len(shape) == 1:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), shape[0] * 4)
        else:
            n = shape[0] * shape[1] // 32 * block_bytes
            writer.add_tensor_info(name, (shape[0], shape[1] // 32 * block_bytes), np.dtype(np.uint8), n, T.Q4_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 256, size=(1 << 16, block_bytes), dtype=np.uint8)   # random blocks, reused
    # scales like a trained model's (std ~0.02 weights -> d ~ 0.005), so activations stay finite
    pool[:, 0:2] = (rng.random(1 << 16) * 0.004 + 0.002).astype(np.float16).view(np.uint8).reshape(-1, 2)
    for name, shape in tensors:
        if len(shape) == 1:
            writer.write_tensor_data(np.ones(shape, np.float32))        # llama.cpp stores 1 + w: w = 0
        else:
            blocks = shape[0] * shape[1] // 32
            picks = rng.integers(0, pool.shape[0], size=blocks)
            writer.write_tensor_data(pool[picks])
    writer.close()


CHILD = r"""
import json, sys, time
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
import torch
from gemlora.config import EngineConfig
from gemlora.engine.engine import LLMEngine
from gemlora.model.loader import load_model
from gemlora.model.source import resolve_model_dir
from gemlora.sampling import SamplingParams
start = time.perf_counter()
path = resolve_model_dir(sys.argv[1], cache_dir=sys.argv[2], progress=False)
converted = time.perf_counter()
model = load_model(path, torch.float32, quantization="gguf")
loaded_rss = status("VmRSS:")
engine = LLMEngine(model, EngineConfig(kv_cache_memory_gb=1.0), frozenset())
rid = engine.add_request([2] + list(range(100, 140)), SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
t0 = time.perf_counter()
tokens = []
while engine.has_work():
    for out in engine.step():
        tokens += out.new_token_ids
done = time.perf_counter()
print(json.dumps({"peak": status("VmHWM:"), "loaded": loaded_rss, "final": status("VmRSS:"), "tokens": tokens,
                  "convert_s": converted - start, "load_s": t0 - converted, "generate_s": done - t0,
                  "kv_blocks": engine.blocks.num_blocks}))
"""


def test_a_gemma_7b_shaped_q4_0_gguf_loads_and_generates_in_7_gb(tmp_path):
    gguf_file = tmp_path / "gemma-7b-q4_0.gguf"
    write_gemma_7b_q4_0(gguf_file)
    assert 4.5e9 < gguf_file.stat().st_size < 5.2e9       # 8.54 B weights at 4.5 bits
    out = subprocess.run([sys.executable, "-c", CHILD, str(gguf_file), str(tmp_path / "cache")],
                         capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\n7B Q4_0: peak RSS {got['peak'] / GB:.2f} GiB, after load {got['loaded'] / GB:.2f} GiB, "
          f"final {got['final'] / GB:.2f} GiB (1 GiB KV); convert {got['convert_s']:.0f} s, "
          f"load {got['load_s']:.0f} s, 6 tokens in {got['generate_s']:.1f} s")
    assert len(got["tokens"]) == 6 and all(0 <= t < VOCAB for t in got["tokens"])
    assert got["peak"] <= 7 * GB
    assert got["peak"] - got["final"] <= 1 * GB          # loading streamed: no second copy of the model
    cache_files = [p for p in (tmp_path / "cache").rglob("*.safetensors")]
    assert len(cache_files) == 1 and cache_files[0].stat().st_size < 1.15 * gguf_file.stat().st_size
    config = json.loads((cache_files[0].parent / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (LAYERS, HIDDEN, VOCAB)
