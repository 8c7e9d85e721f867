"""The per-token cost of constrained (JSON-schema) decoding against free decoding, on the embedded model.

For 1 and 32 concurrent requests, the same prompts decode the same number of tokens (greedy, EOS
ignored) twice: free, and under a JSON schema whose output cannot end within the budget (an array of
at least 100 records with a bounded integer and a free-text string, so string tokens, the costliest
masks, come up on every record). Prints decode-only milliseconds per step and per token of each, and
their ratio (constrained / free; the issue's target is at most 1.15x). Rounds alternate the two modes
and the median is reported, so drift on a shared machine hits both.

Also prints what a constrained step spends on its masks: filling them (llguidance, on the worker thread
while the model runs) and applying them (the C++ kernel, after the logits are out).

    python bench/constrained.py [--concurrency 1 32] [--new-tokens 48] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gemlora.config import EngineConfig
from gemlora.engine.engine import LLMEngine
from gemlora.kernels import token_mask
from gemlora.model.loader import load_model
from gemlora.model.source import resolve_model_dir
from gemlora.sampling import SamplingParams
from gemlora.structured.json_grammars import JsonGrammars
from gemlora.structured.output_format import from_guided_json
from gemlora.text.tokenizer import Tokenizer

SCHEMA = {"type": "array", "minItems": 100,
          "items": {"type": "object", "additionalProperties": False, "required": ["id", "name"],
                    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99999},
                                   "name": {"type": "string", "maxLength": 16}}}}
PROMPTS = ["A list of customers as JSON: ", "Inventory (JSON array): ", "The team roster, as JSON: ",
           "Records exported from the database: "]


class Timed:
    """A constraint whose fill_bitmask time is added up (the worker thread calls it)."""

    def __init__(self, inner, totals: dict):
        self.inner, self.totals = inner, totals

    def fill_bitmask(self, bitmask, row):
        t = time.perf_counter()
        self.inner.fill_bitmask(bitmask, row)
        self.totals["fill"] += time.perf_counter() - t

    def accept(self, token):
        self.inner.accept(token)

    @property
    def finished(self):
        return self.inner.finished


def decode(engine: LLMEngine, tok: Tokenizer, grammars: JsonGrammars | None, n: int, new_tokens: int,
           totals: dict) -> float:
    """Decode-only seconds per step with n requests, after every prompt has its first token."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    for i in range(n):
        constraint = None
        if grammars is not None:
            constraint = Timed(grammars.constraint(from_guided_json(SCHEMA), "bench"), totals)
        engine.add_request(tok.encode(PROMPTS[i % len(PROMPTS)] + f"(batch {i})"), params, constraint=constraint)
    produced, start, steps = 0, None, 0
    while engine.has_work():
        outs = engine.step()
        produced += sum(len(o.new_token_ids) for o in outs)
        if start is None and produced >= n:
            start, steps = time.perf_counter(), 0
            totals["fill"] = totals["apply"] = 0.0
            continue
        steps += 1
    elapsed = time.perf_counter() - start
    assert produced == n * new_tokens, "a request ended early: the schema must outlast the budget"
    totals["steps"] = steps
    return elapsed / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    model_dir = resolve_model_dir(None)
    config = EngineConfig(kv_cache_memory_gb=1.0)
    model = load_model(model_dir, config.torch_dtype, config.torch_device, quantization=config.quantization,
                       activations=config.quant_activations)
    tok = Tokenizer.from_dir(model_dir)
    engine = LLMEngine(model, config, tok.stop_token_ids | frozenset(model.cfg.eos_token_ids))
    grammars = JsonGrammars(tok.to_json, model.cfg.vocab_size, sorted(engine.stop_token_ids))

    totals = {"fill": 0.0, "apply": 0.0, "steps": 0}
    apply = token_mask.apply_token_bitmask

    def timed_apply(*a, **kw):
        t = time.perf_counter()
        apply(*a, **kw)
        totals["apply"] += time.perf_counter() - t

    import gemlora.engine.sampler as sampler
    sampler.apply_token_bitmask = timed_apply
    print(f"torch threads {torch.get_num_threads()}, kernel path {token_mask.extension().cpu_isa()}, "
          f"{args.new_tokens} new tokens per request, median of {args.rounds} rounds")
    print(f"{'concurrent':>10} {'free ms/step':>13} {'json ms/step':>13} {'ratio':>7} "
          f"{'fill ms/step':>13} {'apply ms/step':>14}")
    decode(engine, tok, grammars, 2, 8, totals)                  # warm up both paths
    for n in args.concurrency:
        free, constrained, fill, applied = [], [], [], []
        for _ in range(args.rounds):
            free.append(decode(engine, tok, None, n, args.new_tokens, totals))
            constrained.append(decode(engine, tok, grammars, n, args.new_tokens, totals))
            fill.append(totals["fill"] / totals["steps"])
            applied.append(totals["apply"] / totals["steps"])
        f, c = statistics.median(free), statistics.median(constrained)
        print(f"{n:>10} {f * 1e3:>13.2f} {c * 1e3:>13.2f} {c / f:>6.2f}x {statistics.median(fill) * 1e3:>13.2f} "
              f"{statistics.median(applied) * 1e3:>14.2f}", flush=True)


if __name__ == "__main__":
    main()
