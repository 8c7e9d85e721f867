"""Quantized weights in the model and the engine: the GGUF path against the exact float path on the
embedded model, batch invariance on every weight format, LoRA on a quantized base, round-to-nearest
int8/int4 of a float checkpoint, the KV cache dtype, and the no-kernel fallback."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch

from conftest import make_tiny_checkpoint
from gemlora.cache.kv_cache import allocate_kv_cache, block_bytes
from gemlora.config import EngineConfig
from gemlora.engine.engine import LLMEngine
from gemlora.model.attention import AttentionMetadata
from gemlora.model.gemma import StepContext
from gemlora.model.loader import load_model
from gemlora.quant import rtn
from gemlora.sampling import SamplingParams

# ~400 tokens of varied text: prose, a list, code, numbers, another language
VARIED = """The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the steps as his
father had taught him: one hundred and twelve, no more, no less. Out on the water the fishing boats were
turning for home, their lamps swinging like fireflies above the grey swell.

Ingredients for the bread: 500 g flour, 350 ml water, 10 g salt, 5 g dried yeast. Mix, rest for an hour,
fold twice, shape, and bake at 230 degrees for forty minutes until the crust sings when you tap it.

def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a

In 1969 the Apollo 11 mission landed on the Moon; the descent took about twelve minutes and the lunar
module had roughly twenty-five seconds of fuel left. Le chat dort sur le canapé pendant que la pluie tombe
doucement sur les toits de Paris. Quarterly revenue rose 4.2% to $18.7 million, driven by subscriptions.

"Are you coming to the station?" she asked. "Only if the train is late," he said, "which it always is."
{"user": "ada", "roles": ["admin", "editor"], "quota": 1024, "active": true}
Roses climb the garden wall, / bees drift slow through summer's hall; / and when the evening shadows fall, /
the old oak keeps the count of all. Photosynthesis converts light energy into chemical energy stored in
glucose, releasing oxygen as a by-product."""


@torch.inference_mode()
def all_logits(model, ids):
    """Teacher-forced logits at every position, one prefill."""
    return model.compute_logits(teacher_forced_hidden(model, ids))


@torch.inference_mode()
def teacher_forced_hidden(model, ids):
    """The final-normed hidden states at every position, one prefill."""
    T, bs = len(ids), 16
    blocks = -(-T // bs)
    kv = allocate_kv_cache(model.cfg, blocks, bs, model.dtype, "cpu")
    meta = AttentionMetadata.build([T], [T], [list(range(blocks))], bs, model.cfg.sliding_window,
                                   torch.device("cpu"))
    return model(torch.tensor(ids), torch.arange(T), StepContext(meta, kv, None))


@pytest.mark.slow
def test_the_gguf_path_agrees_with_the_exact_float_path(converted, real_model):
    from gemlora.text.tokenizer import Tokenizer
    ids = Tokenizer.from_dir(converted).encode(VARIED)
    assert len(ids) >= 300
    want = all_logits(real_model, ids).argmax(-1)
    quantized = load_model(converted, torch.float32, quantization="gguf")
    assert quantized.embed_tokens is None and quantized.lm_head.quantized is not None   # nothing dense is kept
    agreement = (all_logits(quantized, ids).argmax(-1) == want).float().mean().item()
    print(f"\nteacher-forced next-token agreement, gguf vs none, {len(ids)} tokens: {agreement:.2%}")
    assert agreement >= 0.98


def engine_for(model, **kw):
    gb = 256 * block_bytes(model.cfg, 4, torch.float32) / 2**30
    return LLMEngine(model, EngineConfig(kv_cache_memory_gb=gb, block_size=4, **kw), frozenset())


def run(engine, prompts, params, **adapter_kw):
    ids = [engine.add_request(p, params, **(adapter_kw.get(i) or {})) for i, p in enumerate(prompts)]
    outs: dict[str, list[int]] = {}
    while engine.has_work():
        for o in engine.step():
            outs.setdefault(o.request_id, []).extend(o.new_token_ids)
    return [outs[i] for i in ids]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-quant")
    make_tiny_checkpoint("gemma3", path)
    return path


@pytest.mark.parametrize("quantization", ["none", "int8", "int4"])
def test_a_row_in_a_mixed_batch_equals_it_alone(tiny_dir, quantization):
    model = load_model(tiny_dir, quantization=quantization)
    rng = random.Random(0)
    prompts = [[rng.randrange(2, 512) for _ in range(rng.randint(2, 30))] for _ in range(8)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    together = run(engine_for(model), prompts, params)
    alone = [run(engine_for(model), [p], params)[0] for p in prompts]
    assert together == alone


def test_round_to_nearest_quantization_is_within_half_a_step(tiny_dir):
    w = torch.randn(64, 128) * torch.linspace(0.1, 3, 128)
    for bits in (8, 4):
        qt = rtn.quantize(w, bits)
        step = qt.scales.float().repeat_interleave(32, dim=1)
        # half a step, plus the rounding of the fp16 scale / bias themselves (relative 2^-11 of the range)
        slack = (step * 2 ** -10 * (127 if bits == 8 else 15)) + (w.abs() * 2 ** -11 if bits == 4 else 0)
        assert ((qt.dequantize() - w).abs() <= step / 2 + slack + 1e-7).all(), bits
    model = load_model(tiny_dir, quantization="int8")
    dense = load_model(tiny_dir, quantization="none")
    assert model.layers[0].mlp.down_proj.weight is None and model.embed_tokens is None
    ids = list(range(5, 40))
    torch.testing.assert_close(all_logits(model, ids), all_logits(dense, ids), atol=0.05, rtol=0.05)


def test_lora_adds_its_delta_on_a_quantized_base(tmp_path):
    """Mixed adapters on an int8 base: every row's logits equal peft running that adapter (dense) over
    the dequantized int8 base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from gemlora.lora.registry import AdapterRegistry
    base_dir = tmp_path / "base"
    make_tiny_checkpoint("gemma3", base_dir)
    # int16 activations everywhere: the AVX2 default's single int8 pass at the LM head would add its
    # own error (bounded and tested in test_quant_kernels) to what this test isolates, the LoRA math
    model = load_model(base_dir, quantization="int8", activations="int16")

    def dequantized_base():    # the checkpoint with every weight replaced by its dequantized int8 form
        hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        with torch.no_grad():
            for p in hf.parameters():
                if p.dim() == 2:
                    p.copy_(rtn.quantize(p, 8).dequantize())
        return hf.eval()

    registry = AdapterRegistry(model.cfg)
    refs = {None: (None, None, dequantized_base())}
    for i, targets in enumerate((["q_proj", "v_proj"], ["o_proj", "gate_proj", "down_proj"])):
        torch.manual_seed(10 + i)
        pm = get_peft_model(dequantized_base(), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.3)
        pm.save_pretrained(tmp_path / f"a{i}")
        ref, adapter = registry.acquire(registry.register(tmp_path / f"a{i}", name=f"a{i}").id)
        refs[i] = (ref, adapter, pm.eval())
    rows = [(None, [5, 9, 77, 300, 12]), (0, [7, 8, 9, 10]), (1, [100, 200, 300]), (0, [3, 4])]
    engine = engine_for(model, max_loras=2)
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    ids = []
    for which, prompt in rows:
        ref, adapter, _ = refs[which]
        kw = {} if ref is None else dict(adapter_id=ref.id, adapter=adapter)
        ids.append(engine.add_request(prompt, params, **kw))
    batch = engine.scheduler.schedule()
    logits, sampled = engine.runner.run(batch)
    got = {batch.requests[r].request_id: logits[j] for j, r in enumerate(sampled)}
    with torch.no_grad():
        for rid, (which, prompt) in zip(ids, rows):
            want = refs[which][2](torch.tensor([prompt])).logits[0, -1]
            # the int8 base's own activation quantization (int16) is the only difference
            torch.testing.assert_close(got[rid], want, atol=2e-3, rtol=2e-3)


def test_kv_cache_dtype_is_selectable(tiny_dir):
    model = load_model(tiny_dir)
    full = LLMEngine(model, EngineConfig(kv_cache_memory_gb=0.01, kv_cache_dtype="float32"), frozenset())
    half = LLMEngine(model, EngineConfig(kv_cache_memory_gb=0.01, kv_cache_dtype="bfloat16"), frozenset())
    assert half.runner.kv_caches[0][0].dtype == torch.bfloat16
    assert half.blocks.num_blocks // 2 == full.blocks.num_blocks       # the same budget holds twice the tokens
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    out = run(half, [[5, 6, 7, 8]], params)[0]
    assert len(out) == 6
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="int8")


def test_without_the_kernels_quantized_weights_fall_back_to_dequantizing(tiny_dir):
    code = f"""
import os, torch
os.environ["GEMLORA_NO_KERNELS"] = "1"
from gemlora.kernels import qmatmul
from gemlora.model.loader import load_model
model = load_model({str(tiny_dir)!r}, quantization="int8")
assert qmatmul.extension() is None
w = model.layers[0].mlp.down_proj.quantized
x = torch.randn(3, w.in_features)
want = torch.nn.functional.linear(x, w._matrices[0].dequantize())
assert torch.equal(w(x), want)
print("fallback ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "fallback ok" in out.stdout and "dequantized per call" in out.stderr


def test_auto_dtype_keeps_quantized_models_in_float32_on_the_cpu(converted, tmp_path):
    from gemlora.model.loader import quantizes
    make_tiny_checkpoint("gemma3", tmp_path)
    assert quantizes(converted, "auto") and quantizes(tmp_path, "int4")
    assert not quantizes(tmp_path, "auto") and not quantizes(converted, "none")
    auto = EngineConfig(device="cpu")
    assert auto.activation_dtype(quantized=True) == torch.float32      # the kernels take float32 activations
    assert auto.activation_dtype(quantized=False) == auto.torch_dtype  # bf16 where AMX makes dense GEMMs fast
    assert EngineConfig(device="cpu", dtype="bfloat16").activation_dtype(quantized=True) == torch.bfloat16
