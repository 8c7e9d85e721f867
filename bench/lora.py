"""Multi-LoRA throughput: gemlora's mixed-adapter batches against peft's mixed-batch generate().

One run on the embedded model, the same workload for every row: 32 concurrent requests, mixed
prompt lengths (fixed seed), the same number of greedy new tokens each (EOS ignored), token ids in.
  - gemlora, no adapters                      (the base the LoRA overhead is measured against)
  - gemlora, requests spread over 8 adapters, then over 32 adapters (round-robin)
  - peft `generate(adapter_names=...)` over the same 8 and 32 adapters (its mixed-batch path)
  - gemlora with 1,000 registered adapters, each request's adapter drawn from Zipf(1.0)
Adapters are random PEFT LoRAs (rank 8 on q_proj and v_proj, the Workers AI docs' example targets;
`--targets all` patches all seven projections) written to a temporary folder. gemlora's time
includes fetching each request's adapter from the registry (a disk load when it is not in RAM).

    python bench/lora.py [--requests 32] [--new-tokens 32] [--prompt-lens 16 64] [--rank 8 [64 ...]]
                         [--targets qv|all] [--skip-peft]

Weights as `gemlora serve` loads them (`--quantization auto`: the GGUF's own types); `--quantization
none` runs dense float32 weights. `--rank 8 64` gives the adapters those ranks in turn (adapter i has rank ranks[i % len(ranks)]): a
step's adapters then differ in rank, and each is computed at its own.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from gemlora.config import EngineConfig
from gemlora.engine.engine import LLMEngine
from gemlora.lora.registry import AdapterRegistry
from gemlora.model.loader import load_model
from gemlora.model.source import resolve_model_dir
from gemlora.sampling import SamplingParams

MODULES = {"qv": ["q_proj", "v_proj"],
           "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def write_adapter(path: Path, cfg, rank: int, targets: list[str], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    dims = {"q_proj": (cfg.hidden_size, cfg.q_size), "k_proj": (cfg.hidden_size, cfg.kv_size),
            "v_proj": (cfg.hidden_size, cfg.kv_size), "o_proj": (cfg.q_size, cfg.hidden_size),
            "gate_proj": (cfg.hidden_size, cfg.intermediate_size), "up_proj": (cfg.hidden_size, cfg.intermediate_size),
            "down_proj": (cfg.intermediate_size, cfg.hidden_size)}
    tensors = {}
    for layer in range(cfg.num_layers):
        for m in targets:
            block = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            key = f"base_model.model.model.layers.{layer}.{block}.{m}"
            fan_in, fan_out = dims[m]
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) / fan_in ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * 0.01
    path.mkdir(parents=True)
    save_file(tensors, path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
        "target_modules": targets, "bias": "none", "base_model_name_or_path": "google/gemma-3-270m"}))


def make_prompts(n, vocab, lens, seed):
    rng = random.Random(seed)
    return [[2] + [rng.randrange(1000, vocab - 1000) for _ in range(rng.randint(*lens))] for _ in range(n)]


def run_gemlora(engine: LLMEngine, registry: AdapterRegistry | None, prompts, names, new_tokens) -> float:
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    held = []
    for p, name in zip(prompts, names):
        if name is None:
            engine.add_request(p, params)
        else:
            ref, adapter = registry.acquire(name)
            held.append(ref)
            engine.add_request(p, params, adapter_id=ref.id, adapter=adapter)
    produced = 0
    while engine.has_work():
        produced += sum(len(o.new_token_ids) for o in engine.step())
    elapsed = time.perf_counter() - start
    for ref in held:
        registry.release(ref)
    assert produced == new_tokens * len(prompts)
    return produced / elapsed


def run_peft(peft_model, prompts, names, new_tokens) -> float:
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.inference_mode():
        out = peft_model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    elapsed = time.perf_counter() - start
    assert out.shape[1] - width == new_tokens
    return new_tokens * len(prompts) / elapsed


def zipf_names(n: int, population: list[str], seed: int) -> list[str]:
    weights = [1.0 / (k + 1) for k in range(len(population))]
    return random.Random(seed).choices(population, weights=weights, k=n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-lens", type=int, nargs=2, default=[16, 64])
    ap.add_argument("--rank", type=int, nargs="+", default=[8])
    ap.add_argument("--targets", choices=sorted(MODULES), default="qv")
    ap.add_argument("--registered", type=int, default=1000)
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--quantization", default="auto", help="load_model's: auto (as served: the GGUF's own types) "
                    "or none (dense float32)")
    args = ap.parse_args()

    model_dir = resolve_model_dir(None)
    model = load_model(model_dir, torch.float32, quantization=args.quantization)
    cfg = model.cfg
    n = args.requests
    engine = LLMEngine(model, EngineConfig(kv_cache_memory_gb=1.0, max_num_seqs=64, max_loras=32,
                                           max_lora_rank=max(8, *args.rank)), frozenset({1, 106}))
    registry = AdapterRegistry(cfg, max_cpu_loras=64, max_rank=max(32, *args.rank))
    tmp = Path(tempfile.mkdtemp(prefix="gemlora-bench-"))
    try:
        t = time.perf_counter()
        names = [f"adapter-{i:04d}" for i in range(max(32, args.registered))]
        for i, name in enumerate(names):
            write_adapter(tmp / name, cfg, args.rank[i % len(args.rank)], MODULES[args.targets], seed=i)
        for name in names:
            registry.register(tmp / name, name=name)
        print(f"wrote and registered {len(names)} adapters (rank {'/'.join(map(str, args.rank))}, {args.targets}) "
              f"in {time.perf_counter() - t:.0f} s")
        prompts = make_prompts(n, cfg.vocab_size, args.prompt_lens, seed=0)
        print(f"workload: {n} concurrent requests, prompts {args.prompt_lens[0]}-{args.prompt_lens[1]} tokens, "
              f"{args.new_tokens} new tokens each, greedy, float32, weights {args.quantization}, "
              f"{torch.get_num_threads()} threads")
        run_gemlora(engine, registry, prompts[:2], [None, names[0]], 2)          # warm-up
        spreads = {k: [names[i % k] for i in range(n)] for k in (8, 32)}
        rows = {"none": run_gemlora(engine, registry, prompts, [None] * n, args.new_tokens)}
        for k, spread in spreads.items():
            rows[k] = run_gemlora(engine, registry, prompts, spread, args.new_tokens)
        zipf = zipf_names(n, names[:args.registered], seed=1)
        rows["zipf"] = run_gemlora(engine, registry, prompts, zipf, args.new_tokens)
        peft_rows = {}
        if not args.skip_peft:
            from peft import PeftModel
            from transformers import AutoModelForCausalLM
            base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            peft_model = PeftModel.from_pretrained(base, tmp / names[0], adapter_name=names[0])
            for name in names[1:32]:
                peft_model.load_adapter(tmp / name, adapter_name=name)
            peft_model.eval()
            for k, spread in spreads.items():
                peft_rows[k] = run_peft(peft_model, prompts, spread, args.new_tokens)
        print(f"{'run':<38} {'gemlora tok/s':>13} {'peft tok/s':>10} {'ratio':>6} {'vs no adapters':>15}")
        print(f"{'no adapters':<38} {rows['none']:>13.1f}")
        for k in (8, 32):
            p = peft_rows.get(k)
            ratio = f"{rows[k] / p:>5.2f}x" if p else "     -"
            share = rows[k] / rows["none"]
            print(f"{f'{k} distinct adapters':<38} {rows[k]:>13.1f} {p or 0:>10.1f} {ratio} {share:>14.0%}")
        print(f"{f'{args.registered} registered, Zipf(1.0), {len(set(zipf))} distinct':<38} {rows['zipf']:>13.1f} "
              f"{'':>10} {'':>6} {rows['zipf'] / rows['none']:>14.0%}   = {rows['zipf'] / rows[8]:.0%} of 8 adapters")
        print(f"registry loads from disk: {registry.loads}, slot loads: {engine.lora_slots.loads}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
