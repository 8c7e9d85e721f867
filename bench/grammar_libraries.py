"""llguidance against xgrammar on the embedded model's tokenizer (262,144 tokens): how long each takes to
build its tokenizer view, to compile a schema, and to compute the token mask at each step of a valid
JSON output (forced token by token), as p50 / p90 / max. The measurement behind choosing llguidance
(gemlora/structured/json_grammars.py). xgrammar is not a dependency: `pip install xgrammar` to compare
(it needs transformers, triton and tvm-ffi; `pip install --no-deps xgrammar apache-tvm-ffi` suffices
on the CPU).

    python bench/grammar_libraries.py
"""

from __future__ import annotations

import json
import statistics
import time

from gemlora.model.source import resolve_model_dir

NESTED = ({"type": "object", "required": ["name", "age", "tags", "address"],
           "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
                          "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}},
                          "address": {"type": "object", "required": ["city", "zip"],
                                      "properties": {"city": {"type": "string"},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}}},
          {"name": "Ada Lovelace the first programmer", "age": 36, "tags": ["a", "c"],
           "address": {"city": "London", "zip": "12345"}})
ANY_OBJECT = ({"type": "object"}, {"title": "A long walk", "items": [1, 2, 3, {"k": "value here with words"}], "ok": True})


def report(lib: str, name: str, compile_s: float, times: list[float]) -> None:
    times = sorted(times)
    print(f"{lib:10} {name:10} compile {compile_s * 1e3:7.1f} ms   mask p50 {statistics.median(times) * 1e6:6.0f} us"
          f"  p90 {times[int(0.9 * len(times))] * 1e6:6.0f} us  max {times[-1] * 1e6:6.0f} us  ({len(times)} tokens)")


def main() -> None:
    from tokenizers import Tokenizer
    path = resolve_model_dir(None) / "tokenizer.json"
    tk = Tokenizer.from_file(str(path))
    vocab = tk.get_vocab_size(with_added_tokens=True)
    cases = [("nested", NESTED), ("object", ANY_OBJECT)]

    import llguidance
    import llguidance.torch as lt

    from gemlora.structured.json_grammars import JSON_STYLE
    t = time.perf_counter()
    tok = llguidance.LLTokenizer(path.read_text(), n_vocab=vocab, eos_token=1)
    print(f"llguidance tokenizer {time.perf_counter() - t:.2f} s")
    for name, (schema, value) in cases:
        ids = tk.encode(json.dumps(value), add_special_tokens=False).ids
        t = time.perf_counter()
        matcher = llguidance.LLMatcher(tok, llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE))
        compile_s = time.perf_counter() - t
        bitmask = lt.allocate_token_bitmask(1, vocab)
        times = []
        for token in ids:
            t = time.perf_counter()
            lt.fill_next_token_bitmask(matcher, bitmask, 0)
            times.append(time.perf_counter() - t)
            assert matcher.consume_token(token), matcher.get_error()
        report("llguidance", name, compile_s, times)

    try:
        import xgrammar as xgr
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        print("xgrammar is not installed: nothing to compare against")
        return
    t = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_file=str(path)), vocab_size=vocab,
                                              stop_token_ids=[1])
    compiler = xgr.GrammarCompiler(info)
    print(f"xgrammar tokenizer {time.perf_counter() - t:.2f} s")
    for name, (schema, value) in cases:
        ids = tk.encode(json.dumps(value), add_special_tokens=False).ids
        t = time.perf_counter()
        matcher = xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(schema), any_whitespace=False))
        compile_s = time.perf_counter() - t
        bitmask = xgr.allocate_token_bitmask(1, vocab)
        times = []
        for token in ids:
            t = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask, 0)
            times.append(time.perf_counter() - t)
            assert matcher.accept_token(token)
        report("xgrammar", name, compile_s, times)


if __name__ == "__main__":
    main()
