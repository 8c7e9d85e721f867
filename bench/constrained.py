"""The per-token cost of constrained (JSON-schema) decoding against free decoding, on the embedded model.

For 1 and 32 concurrent requests, the same prompts decode the same number of tokens (greedy, EOS
ignored): free, and under JSON schemas whose output cannot end within the budget (an array of at least
100 records, each a bounded integer and a string): `records` with free-text strings, and
`bounded-strings` with `maxLength: 16` on the string, the costliest common case (llguidance then
checks every token against a length-bounded lexeme: 1.4-6 ms per mask inside a string, against
under 0.3 ms for a free string, measured on the embedded vocabulary); and `tool-calls`, calls of the 20
tools of tests/fixtures/tool_schemas.json (issue 27: the grammar of tool_choice "required", with budget
steering planning in every step, as it does near the end of any budget). Prints decode-only milliseconds
per step of each and the ratio constrained / free (the issue's target is at most 1.15x). Rounds alternate the two modes
and the median is reported, so drift on a shared machine hits both.

Also prints what a constrained step spends on its masks: filling them (llguidance's batch fill, on the
engine's worker thread while the model runs; with budget steering's plans where the budget is near),
applying them (the C++ kernel, after the logits are out), and steering's check of each sampled token
(on the engine's thread; its plans reach their limit on these never-ending arrays, the costliest case).

    python bench/constrained.py [--concurrency 1 32] [--new-tokens 48] [--rounds 3] [--dtype auto|float32|bfloat16]
                                [--schemas records bounded-strings tool-calls]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from gemlora.config import EngineConfig
import gemlora.engine.sampler as sampler
from gemlora.engine.engine import LLMEngine
from gemlora.engine.token_masks import TokenMasks
from gemlora.kernels import token_mask
from gemlora.model.loader import load_model, quantizes
from gemlora.model.source import resolve_model_dir
from gemlora.sampling import SamplingParams
from gemlora.structured.grammar_constraint import GrammarConstraint
from gemlora.structured.json_grammars import JsonGrammars
from gemlora.structured.output_format import from_guided_json
from gemlora.text.tokenizer import Tokenizer
from gemlora.text.tool_format import GemmaJsonFormat, ToolSpec

def records(name: dict) -> dict:
    return {"type": "array", "minItems": 100,
            "items": {"type": "object", "additionalProperties": False, "required": ["id", "name"],
                      "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99999}, "name": name}}}


def tool_calls() -> dict:
    """Issue 27's tool calls: an array of at least 100 calls, each naming one of the 20 tools of the tests'
    fixture and holding arguments valid against its parameters (the grammar of tool_choice "required")."""
    tools = json.loads((Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tool_schemas.json").read_text())
    one = GemmaJsonFormat().calls_schema([ToolSpec(t["name"], t["description"], t["parameters"]) for t in tools])
    return {"type": "array", "minItems": 100, "items": one}


SCHEMAS = {"records": records({"type": "string"}),
           "bounded-strings": records({"type": "string", "maxLength": 16}),
           "tool-calls": tool_calls()}
PROMPTS = ["A list of customers as JSON: ", "Inventory (JSON array): ", "The team roster, as JSON: ",
           "Records exported from the database: "]


def decode(engine: LLMEngine, tok: Tokenizer, grammars: JsonGrammars | None, n: int, new_tokens: int,
           totals: dict, schema: dict | None = None) -> float:
    """Decode-only seconds per step with n requests, after every prompt has its first token."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    for i in range(n):
        constraint = None
        if grammars is not None:
            constraint = grammars.constraint(from_guided_json(schema), "bench")
        engine.add_request(tok.encode(PROMPTS[i % len(PROMPTS)] + f"(batch {i})"), params, constraint=constraint)
    produced, start, steps = 0, None, 0
    while engine.has_work():
        outs = engine.step()
        produced += sum(len(o.new_token_ids) for o in outs)
        if start is None and produced >= n:
            start, steps = time.perf_counter(), 0
            totals["fill"] = totals["apply"] = totals["steer"] = 0.0
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
    ap.add_argument("--schemas", nargs="+", default=list(SCHEMAS), choices=list(SCHEMAS))
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="activation dtype (auto: as `gemlora serve` picks it)")
    args = ap.parse_args()
    model_dir = resolve_model_dir(None)
    config = EngineConfig(kv_cache_memory_gb=1.0, dtype=args.dtype)
    dtype = config.activation_dtype(quantizes(model_dir, config.quantization))
    model = load_model(model_dir, dtype, config.torch_device, quantization=config.quantization,
                       activations=config.quant_activations)
    tok = Tokenizer.from_dir(model_dir)
    engine = LLMEngine(model, config, tok.stop_token_ids | frozenset(model.cfg.eos_token_ids))
    grammars = JsonGrammars(tok.to_json, model.cfg.vocab_size, sorted(engine.stop_token_ids))

    totals = {"fill": 0.0, "apply": 0.0, "steer": 0.0, "steps": 0}

    def timed(fn, key):
        def run(*a, **kw):
            t = time.perf_counter()
            out = fn(*a, **kw)
            totals[key] += time.perf_counter() - t
            return out
        return run

    sampler.apply_token_bitmask = timed(sampler.apply_token_bitmask, "apply")
    TokenMasks._fill = timed(TokenMasks._fill, "fill")
    GrammarConstraint.steer = timed(GrammarConstraint.steer, "steer")
    print(f"torch threads {torch.get_num_threads()}, kernel path {token_mask.extension().cpu_isa()}, "
          f"activations {dtype}, "
          f"{args.new_tokens} new tokens per request, median of {args.rounds} rounds")
    print(f"{'schema':>16} {'concurrent':>10} {'free ms/step':>13} {'json ms/step':>13} {'ratio':>7} "
          f"{'fill ms/step':>13} {'apply ms/step':>14} {'steer ms/step':>14}")
    decode(engine, tok, grammars, 2, 8, totals, SCHEMAS["records"])       # warm up both paths
    for name in args.schemas:
        schema = SCHEMAS[name]
        for n in args.concurrency:
            free, constrained, fill, applied, steered = [], [], [], [], []
            for _ in range(args.rounds):
                free.append(decode(engine, tok, None, n, args.new_tokens, totals))
                constrained.append(decode(engine, tok, grammars, n, args.new_tokens, totals, schema))
                fill.append(totals["fill"] / totals["steps"])
                applied.append(totals["apply"] / totals["steps"])
                steered.append(totals["steer"] / totals["steps"])
            f, c = statistics.median(free), statistics.median(constrained)
            print(f"{name:>16} {n:>10} {f * 1e3:>13.2f} {c * 1e3:>13.2f} {c / f:>6.2f}x "
                  f"{statistics.median(fill) * 1e3:>13.2f} {statistics.median(applied) * 1e3:>14.2f} "
                  f"{statistics.median(steered) * 1e3:>14.2f}", flush=True)


if __name__ == "__main__":
    main()
