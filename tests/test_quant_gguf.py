"""GGUF tensors keep their precision: every block type the embedded file and common Gemma GGUFs use
is repacked into QuantizedTensor without loss (dequantizing it equals gguf-py's `dequantize`
exactly), through the converter's cache and the CPU kernels' packed layout too."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from gemlora.kernels import qmatmul as kernels
from gemlora.model.gguf_convert import QUANTIZED_METADATA, convert_gguf
from gemlora.model.loader import load_model
from gemlora.model.tensor_file import TensorReader
from gemlora.quant import gguf as gguf_quant
from gemlora.quant.tensor import QuantizedTensor

# the fp16 fields (d, dmin, m) of each block type, by byte offset: set to finite values, since random
# bytes would make NaNs, which never compare equal
FP16_FIELDS = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0], T.Q2_K: [80, 82],
               T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}


def random_blocks(qtype: T, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Valid blocks of `qtype` with every code, scale and min bit random (rows x bytes per row)."""
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    for offset in FP16_FIELDS[qtype]:
        values = (rng.standard_normal(raw.shape[0]) * 0.05).astype(np.float16)
        raw[:, offset:offset + 2] = values.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def test_every_supported_type_is_one_of_the_listed_ones():
    listed = {T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_0, T.Q5_K, T.Q6_K, T.Q8_0}     # the list, quantized part
    assert listed <= set(gguf_quant.SUPPORTED) == set(gguf_quant.LAYOUT) == set(FP16_FIELDS)


@pytest.mark.parametrize("qtype", gguf_quant.SUPPORTED, ids=lambda t: t.name)
def test_repacking_is_lossless(qtype):
    rows, cols = 40, 512
    raw = random_blocks(qtype, rows, cols)
    want = gguf.quants.dequantize(raw, qtype).reshape(rows, cols)
    qt = gguf_quant.unpack(raw, qtype, rows, cols)
    bits, group, scale_dtype, has_bias, offset = gguf_quant.LAYOUT[qtype]
    assert (qt.bits, qt.group, qt.scales.dtype, qt.bias is not None, qt.offset) == (bits, group, scale_dtype,
                                                                                    has_bias, offset)
    assert np.array_equal(qt.dequantize().numpy(), want)
    # row slices unpack to the same thing (the converter works slice by slice)
    top = gguf_quant.unpack(raw[:17], qtype, 17, cols)
    assert torch.equal(top.codes, qt.codes[:17]) and torch.equal(top.scales, qt.scales[:17])
    if kernels.extension() is not None:        # and the CPU layout loses nothing either
        ids = torch.arange(rows)
        assert np.array_equal(kernels.pack(qt).take_rows(ids).numpy(), want)


def test_unsupported_types_are_refused_by_name():
    with pytest.raises(gguf_quant.UnsupportedGGUFType, match="IQ4_XS is not supported"):
        gguf_quant.unpack(np.zeros(136, np.uint8), T.IQ4_XS, 1, 256)


def write_tiny_quantized_gguf(path, types: dict[str, T]) -> dict[str, np.ndarray]:
    """A 1-layer Gemma 3 GGUF whose projections use the given block types; returns gguf-py's
    dequantized value of every weight, by GGUF name."""
    hidden, inter, heads, head_dim, vocab = 256, 512, 2, 128, 512
    writer = gguf.GGUFWriter(path, "gemma3")
    for add, value in ((writer.add_context_length, 512), (writer.add_embedding_length, hidden),
                       (writer.add_block_count, 1), (writer.add_feed_forward_length, inter),
                       (writer.add_head_count, heads), (writer.add_head_count_kv, 1),
                       (writer.add_layer_norm_rms_eps, 1e-6), (writer.add_key_length, head_dim),
                       (writer.add_value_length, head_dim), (writer.add_sliding_window, 64)):
        add(value)
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"t{i}" for i in range(vocab - 4)]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types([3] * 4 + [1] * (vocab - 4))
    for add, value in ((writer.add_bos_token_id, 2), (writer.add_eos_token_id, 1), (writer.add_unk_token_id, 3),
                       (writer.add_pad_token_id, 0)):
        add(value)
    shapes = {"token_embd": (vocab, hidden), "blk.0.attn_q": (heads * head_dim, hidden),
              "blk.0.attn_k": (head_dim, hidden), "blk.0.attn_v": (head_dim, hidden),
              "blk.0.attn_output": (hidden, heads * head_dim), "blk.0.ffn_gate": (inter, hidden),
              "blk.0.ffn_up": (inter, hidden), "blk.0.ffn_down": (hidden, inter)}
    values = {}
    for i, (name, (rows, cols)) in enumerate(shapes.items()):
        qtype = types.get(name, T.Q8_0)
        raw = random_blocks(qtype, rows, cols, seed=i)
        writer.add_tensor(f"{name}.weight", raw, raw_shape=(rows, raw.shape[1]), raw_dtype=qtype)
        values[f"{name}.weight"] = gguf.quants.dequantize(raw, qtype).reshape(rows, cols)
    rng = np.random.default_rng(99)
    for name, n in (("output_norm", hidden), ("blk.0.attn_norm", hidden), ("blk.0.post_attention_norm", hidden),
                    ("blk.0.ffn_norm", hidden), ("blk.0.post_ffw_norm", hidden), ("blk.0.attn_q_norm", head_dim),
                    ("blk.0.attn_k_norm", head_dim)):
        value = (1 + rng.standard_normal(n) * 0.1).astype(np.float32)
        writer.add_tensor(f"{name}.weight", value)
        values[f"{name}.weight"] = value
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return values


MIXED = {"blk.0.attn_q": T.Q5_0, "blk.0.attn_k": T.Q4_K, "blk.0.attn_v": T.Q6_K, "blk.0.attn_output": T.Q4_0,
         "blk.0.ffn_gate": T.Q4_1, "blk.0.ffn_up": T.Q5_K, "blk.0.ffn_down": T.Q3_K, "token_embd": T.Q2_K}


def test_the_cache_keeps_every_type_and_the_model_loads_them_exactly(tmp_path):
    values = write_tiny_quantized_gguf(tmp_path / "mixed.gguf", MIXED)
    out = convert_gguf(tmp_path / "mixed.gguf", tmp_path / "cache", progress=False)
    with TensorReader(out / "model.safetensors") as f:
        formats = json.loads(f.metadata[QUANTIZED_METADATA])
        assert {v["gguf_type"] for v in formats.values()} == {t.name for t in MIXED.values()}
        assert all(f.get(k).dtype != torch.float32 or k.endswith(("norm.weight", ".scales", ".bias"))
                   for k in f.keys()), "no weight may be widened to float32 in the cache"
        names = {"token_embd.weight": "model.embed_tokens.weight", "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
                 "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
                 "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight"}
        for gguf_name, name in names.items():
            meta = formats[name]
            qt = QuantizedTensor(f.get(f"{name}.codes"), f.get(f"{name}.scales"),
                                 f.get(f"{name}.bias") if f"{name}.bias" in f else None,
                                 meta["bits"], meta["group"], meta["offset"])
            assert np.array_equal(qt.dequantize().numpy(), values[gguf_name]), gguf_name
    # the "none" path dequantizes every weight to exactly gguf-py's values; "gguf" keeps them quantized
    dense = load_model(out, torch.float32, quantization="none")
    assert np.array_equal(dense.embed_tokens.detach().numpy(), values["token_embd.weight"])
    qkv = dense.layers[0].self_attn.qkv_proj.weight.detach().numpy()
    assert np.array_equal(qkv, np.concatenate([values[f"blk.0.attn_{p}.weight"] for p in "qkv"]))
    assert np.allclose(dense.layers[0].input_layernorm.weight.numpy(), values["blk.0.attn_norm.weight"] - 1)
    quantized = load_model(out, torch.float32, quantization="gguf")
    assert quantized.embed_tokens is None and quantized.layers[0].mlp.down_proj.weight is None
    ids = torch.tensor([0, 5, 511, 5])
    assert np.array_equal(quantized.embed_quantized.take_rows(ids, torch.float32).numpy(),
                          values["token_embd.weight"][ids.numpy()])
    # q (Q5_0, 8-bit), k (Q4_K, 4-bit), v (Q6_K, 8-bit g16): three formats, three matrices, one output
    assert quantized.layers[0].self_attn.qkv_proj.quantized.formats == ["8-bit/g32", "4-bit/g32", "8-bit/g16"]
