"""Paged attention's step plan: exact against a float64 per-sequence reference, and bounded in memory.

The reference gathers each sequence's K/V contiguously and applies the full causal + window mask
(and soft-cap); `paged_attention` must match it for decode, prefill, chunked prefill and mixed
steps, on global and sliding layers, with GQA, shuffled block tables and budgets so small that the
plan splits decode rows into many groups and prefill rows into many query sub-chunks. The headline
test serves 32 sequences of ~8k tokens on a tiny Gemma 3 and measures each step's peak resident
memory in a subprocess against `EngineConfig.attention_workspace_bytes`.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

from conftest import make_tiny_checkpoint
from gemlora.model.attention import AttentionMetadata, AttentionShape, paged_attention

ATOL = 1e-5


def make_step(specs, *, bs, kvh, d, seed, spare_blocks=7):
    """specs: [(query_len, seq_len)] per sequence. Random cache contents (stale slots included),
    random new K/V, and block tables drawn from a shuffled pool so no table is contiguous."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-s // bs) for _, s in specs]
    pool = torch.randperm(sum(need) + spare_blocks, generator=g).tolist()
    tables, i = [], 0
    for n in need:
        tables.append(pool[i:i + n])
        i += n
    num_blocks = len(pool)
    k_cache = torch.randn(num_blocks, bs, kvh, d, generator=g)
    v_cache = torch.randn(num_blocks, bs, kvh, d, generator=g)
    T = sum(q for q, _ in specs)
    k_new = torch.randn(T, kvh, d, generator=g)
    v_new = torch.randn(T, kvh, d, generator=g)
    return tables, k_cache, v_cache, k_new, v_new


def reference(q, k_new, v_new, k_cache, v_cache, specs, tables, *, bs, window, softcap, scale):
    """Per sequence: its keys 0..s-1 gathered in order (cached, then this step's), float64."""
    H, KVH = q.shape[1], k_new.shape[1]
    G = H // KVH
    outs, t = [], 0
    for (n, s), table in zip(specs, tables):
        pos = torch.arange(s)
        keys = k_cache[torch.tensor(table)[pos // bs], pos % bs].double()      # [s, KVH, D]
        values = v_cache[torch.tensor(table)[pos // bs], pos % bs].double()
        keys[s - n:], values[s - n:] = k_new[t:t + n].double(), v_new[t:t + n].double()
        keys, values = keys.repeat_interleave(G, dim=1), values.repeat_interleave(G, dim=1)  # [s, H, D]
        qs = q[t:t + n].double()                                               # [n, H, D]
        scores = torch.einsum("qhd,khd->hqk", qs, keys) * scale                # [H, n, s]
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        q_pos = torch.arange(s - n, s)[:, None]
        allowed = pos[None, :] <= q_pos
        if window is not None:
            allowed &= pos[None, :] > q_pos - window
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        outs.append(torch.einsum("hqk,khd->qhd", probs, values).reshape(n, -1))
        t += n
    return torch.cat(outs)


def run_case(specs, *, window, softcap, heads=(4, 2), d=16, bs=4, workspace=None, seed=0):
    H, KVH = heads
    tables, k_cache, v_cache, k_new, v_new = make_step(specs, bs=bs, kvh=KVH, d=d, seed=seed)
    q = torch.randn(sum(n for n, _ in specs), H, d, generator=torch.Generator().manual_seed(seed + 1))
    scale = d ** -0.5
    want = reference(q, k_new, v_new, k_cache, v_cache, specs, tables, bs=bs, window=window,
                     softcap=softcap, scale=scale)
    meta = AttentionMetadata.build([n for n, _ in specs], [s for _, s in specs], tables, bs, window, "cpu",
                                   workspace, AttentionShape(H, KVH, d, torch.float32))
    out = paged_attention(q, k_new, v_new, k_cache, v_cache, meta, scale=scale, sliding=window is not None,
                          softcap=softcap)
    torch.testing.assert_close(out.double(), want, atol=ATOL, rtol=0)
    if workspace is not None:
        assert meta.planned_bytes <= workspace
    return meta


DECODE = [(1, s) for s in (1, 3, 4, 5, 9, 16, 17, 40, 77, 130, 131, 250)]
PREFILL = [(s, s) for s in (2, 7, 19, 64, 101)]
CHUNKED = [(13, 40), (2, 9), (50, 150), (33, 33 + 64)]
MIXED = DECODE[::2] + [(60, 60), (25, 140)] + DECODE[1::2] + [(3, 200)]
STEPS = {"decode": DECODE, "prefill": PREFILL, "chunked": CHUNKED, "mixed": MIXED}


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("window", [None, 8, 37])
@pytest.mark.parametrize("kind", sorted(STEPS))
def test_matches_reference_unbounded(kind, window, softcap):
    run_case(STEPS[kind], window=window, softcap=softcap, seed=len(kind))


# Many decode rows of similar lengths (so the sliding plan must split them too) and three prefill rows.
BUDGET_STEP = [(1, s) for s in range(20, 100, 3)] + [(48, 48), (30, 90), (2, 60)]
random.Random(0).shuffle(BUDGET_STEP)


@pytest.mark.parametrize("heads", [(4, 2), (2, 2), (8, 1)])
@pytest.mark.parametrize("window", [None, 16])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_matches_reference_under_tiny_budgets(heads, window, softcap):
    """The smallest budget the step plans under (and twice it): many row groups, many sub-chunks."""
    H, KVH = heads
    shape = AttentionShape(H, KVH, 16, torch.float32)
    smallest = 4096
    while not plans(BUDGET_STEP, 4, window, smallest, shape):
        smallest = smallest * 9 // 8
    for budget in (smallest, 2 * smallest):
        meta = run_case(BUDGET_STEP, window=window, softcap=softcap, heads=heads, workspace=budget, seed=H)
        for plan in (meta.global_plan, meta.sliding_plan):
            assert plan.window == (None if plan is meta.global_plan else window)
            assert len(plan.rows) >= 2 and all(r.tokens is not None for r in plan.rows)
            assert len(plan.chunks) > 3                                 # 3 prefill rows, split
    assert len(meta.global_plan.rows) >= 4


def plans(specs, bs, window, budget, shape) -> bool:
    try:
        tables = [list(range(-(-s // bs))) for _, s in specs]
        AttentionMetadata.build([n for n, _ in specs], [s for _, s in specs], tables, bs, window, "cpu", budget, shape)
        return True
    except ValueError:
        return False


def test_sliding_rows_gather_only_the_window():
    """A decode row at 250 tokens, window 8, blocks of 4: 3 blocks (12 keys), never the whole table."""
    meta = run_case(DECODE, window=8, softcap=None, seed=5)
    assert len(meta.sliding_plan.rows) == 1
    assert meta.sliding_plan.rows[0].mask.shape[-1] == (math.ceil(8 / 4) + 1) * 4
    assert meta.global_plan.rows[0].mask.shape[-1] == 252           # the longest row's 63 blocks
    meta = run_case(CHUNKED, window=8, softcap=None, seed=6)
    assert max(c.blocks.numel() for c in meta.sliding_plan.chunks) * 4 <= 50 + 8 + 2 * 4


def test_decode_step_under_budget_is_one_group_in_step_order():
    meta = run_case(DECODE, window=8, softcap=None, workspace=64 * 2**20)
    for plan in (meta.global_plan, meta.sliding_plan):
        assert len(plan.rows) == 1 and plan.rows[0].tokens is None and not plan.chunks


def test_no_window_plan_when_every_sequence_fits_the_window():
    meta = run_case(MIXED, window=4096, softcap=2.0, workspace=64 * 2**20)
    assert meta.sliding_plan is meta.global_plan


def test_row_too_big_for_the_budget_is_a_clear_error():
    shape = AttentionShape(4, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="attention workspace budget of .* cannot hold one query"):
        AttentionMetadata.build([1], [5000], [list(range(1250))], 4, None, "cpu", 256 * 1024, shape)
    with pytest.raises(ValueError, match="attention workspace budget of .* cannot hold one query"):
        AttentionMetadata.build([400], [5000], [list(range(1250))], 4, None, "cpu", 256 * 1024, shape)
    meta = AttentionMetadata.build([1], [5000], [list(range(1250))], 4, 8, "cpu", 4 * 2**20, shape)
    assert meta.planned_bytes <= 4 * 2**20


def test_workspace_config():
    from gemlora.config import EngineConfig
    assert EngineConfig(kv_cache_memory_gb=2.0).attention_workspace_bytes == 2**29
    assert EngineConfig(kv_cache_memory_gb=0.1).attention_workspace_bytes == 64 * 2**20
    assert EngineConfig(attention_workspace_gb=0.5).attention_workspace_bytes == 2**29
    with pytest.raises(ValueError, match="attention_workspace_gb"):
        EngineConfig(attention_workspace_gb=0)


# --- 32 sequences of ~8k tokens on a tiny Gemma 3, served by the engine -------------------------

N_SEQS, BLOCK, CHUNK = 32, 16, 2048
KV_GB = 0.4          # 17,476 blocks of 16 tokens (24 KiB each): room for all 32, so no preemption
# Non-attention activations of a 2,048-token step, bounded: the tiny model's per-token tensors
# (hidden 64, q|k|v 128, gate|up 256, the MLP's gelu and product 128 each, rotary and norm copies)
# are < 2048 tokens * 2048 floats * 4 B = 16 MiB even with several alive at once; plus 16 MiB for
# Python objects and kernel scratch. Stated, not fitted.
SLACK = 32 * 2**20
# The worker's allocator: a fixed mmap threshold, so every tensor of 4 MiB or more is returned to the
# OS when freed and RSS follows the live temporaries. glibc's default raises the threshold as large
# blocks are freed and then keeps freed heap pages resident within the step (up to ~40 MiB more
# here), which is allocator caching the plan cannot count. One thread: on a shared 2-core machine
# OpenMP barriers stall for whole scheduler slices when another process runs (steps 0.1 s -> 4 s).
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(4 * 2**20), "OMP_NUM_THREADS": "1"}


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _serve_and_measure(ckpt: str, out_path: str) -> None:
    """In a fresh process: serves the workload step by step, measuring each step's peak RSS growth."""
    import ctypes
    import time

    import gemlora.engine.runner as runner_mod
    from gemlora.config import EngineConfig
    from gemlora.engine.engine import LLMEngine
    from gemlora.model.loader import load_model
    from gemlora.sampling import SamplingParams

    libc = ctypes.CDLL("libc.so.6")
    model = load_model(ckpt, torch.float32)
    config = EngineConfig(kv_cache_memory_gb=KV_GB, block_size=BLOCK, max_num_seqs=N_SEQS,
                          max_num_batched_tokens=CHUNK, max_loras=0, device="cpu", dtype="float32")
    engine = LLMEngine(model, config, frozenset())
    budget = config.attention_workspace_bytes
    plans: list[dict] = []
    real_build = runner_mod.AttentionMetadata.build

    class Recording:   # what each step asked of attention, and the plan's own bound
        @staticmethod
        def build(query_lens, seq_lens, *args, **kwargs):
            meta = real_build(query_lens, seq_lens, *args, **kwargs)
            decode = [s for q, s in zip(query_lens, seq_lens) if q == 1]
            plans.append(dict(decodes=len(decode), min_decode_len=min(decode, default=0),
                              prefill=[(q, s) for q, s in zip(query_lens, seq_lens) if q > 1],
                              planned=getattr(meta, "planned_bytes", None)))
            return meta
    runner_mod.AttentionMetadata = Recording

    warm = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    engine.add_request(list(range(2, 40)), warm)             # first-call costs out of the measurement
    while engine.has_work():
        engine.step()
    rng = random.Random(0)
    prompts = [[rng.randrange(2, 512) for _ in range(rng.randint(7900, 8192))] for _ in range(N_SEQS)]
    params = SamplingParams(max_tokens=1000, temperature=0, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    first_logits: dict[str, list[float]] = {}                # each request's logits at its last prompt token
    run = engine.runner.run

    def recording_run(batch):
        logits, rows = run(batch)
        for j, i in enumerate(rows):
            first_logits.setdefault(batch.requests[i].request_id, logits[j].tolist())
        return logits, rows
    engine.runner.run = recording_run
    steps, outputs, start = [], {rid: [] for rid in ids}, time.perf_counter()
    while min(len(v) for v in outputs.values()) < 2:         # every prompt prefilled, then one decode more
        libc.malloc_trim(0)                # freed heap pages go back, so reusing them cannot hide growth
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                   # VmHWM := VmRSS
        base = _status("VmRSS")
        t0 = time.perf_counter()
        for o in engine.step():
            outputs[o.request_id] += o.new_token_ids
        steps.append(dict(plans[-1], growth=_status("VmHWM") - base, seconds=time.perf_counter() - t0))
        if steps[-1]["growth"] > budget + SLACK:             # the old code gets here within a few steps
            break
    with open(out_path, "w") as f:
        json.dump(dict(budget=budget, steps=steps, prompts=prompts, ids=ids, outputs=outputs,
                       first_logits=first_logits, seconds=time.perf_counter() - start), f)


@pytest.mark.slow
def test_32_sequences_at_8k_stay_under_the_workspace_and_match_transformers(tmp_path):
    from transformers import AutoModelForCausalLM
    make_tiny_checkpoint("gemma3", tmp_path / "ckpt", max_position_embeddings=16384)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32,
                                              attn_implementation="sdpa").eval()
    out = tmp_path / "run.json"
    proc = subprocess.run([sys.executable, __file__, str(tmp_path / "ckpt"), str(out)], capture_output=True,
                          text=True, timeout=900, env={**os.environ, **WORKER_ENV})
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = json.loads(out.read_text())
    budget, steps = run["budget"], run["steps"]
    assert budget == int(KV_GB * 2**30) // 4                 # derived: a quarter of the KV cache's
    mib = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
    worst = max(range(len(steps)), key=lambda i: steps[i]["growth"])
    assert steps[worst]["growth"] <= budget + SLACK, (
        f"step {worst + 1} ({steps[worst]['decodes']} decodes, prefill {steps[worst]['prefill']}) grew "
        f"{mib(steps[worst]['growth'])}; budget {mib(budget)} + slack {mib(SLACK)}")
    assert all(s["planned"] <= budget for s in steps)
    # The workload did what the issue describes: a ~2k-token chunk beside 31 decodes at ~8k context.
    assert any(s["decodes"] >= 31 and s["min_decode_len"] >= 7900 and max(q for q, _ in s["prefill"]) >= 1900
               for s in steps if s["prefill"])
    for j in (0, N_SEQS // 2, N_SEQS - 1):
        prompt, rid = run["prompts"][j], run["ids"][j]
        n = len(run["outputs"][rid])
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          output_logits=True, return_dict_in_generate=True)
        # ref.logits[0]: the raw logits at the last prompt position, what the engine sampled from first.
        torch.testing.assert_close(torch.tensor(run["first_logits"][rid]), ref.logits[0][0].float(), atol=1e-4, rtol=0)
        assert run["outputs"][rid] == ref.sequences[0, len(prompt):].tolist()


if __name__ == "__main__":
    _serve_and_measure(sys.argv[1], sys.argv[2])
