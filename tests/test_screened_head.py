"""The screened LM head (gemlora.quant.screened_head) against the exact head it screens: its top
tokens are the exact head's, with the exact head's values; a step uses it only when every sampled row
is decided by its top tokens; on the embedded model greedy tokens are those of the exact head."""

from __future__ import annotations

import pytest
import torch

from conftest import random_quantized
from test_quant_model import VARIED, teacher_forced_hidden
from gemlora.config import EngineConfig
from gemlora.engine.engine import LLMEngine
from gemlora.kernels import qmatmul as kernels
from gemlora.model.loader import load_model
from gemlora.quant import rtn
from gemlora.quant.screened_head import ScreenedHead
from gemlora.quant.weight import QuantWeight
from gemlora.sampling import SamplingParams
from gemlora.text.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("kernels")


def check_against(head: ScreenedHead, x: torch.Tensor, exact: torch.Tensor) -> None:
    """exact: the exact head's logits [M, V], float64."""
    out = head(x)
    C = head.candidates
    top = out.topk(C, dim=-1)
    # the row's top C tokens carry the exact head's values (to float32 rounding of a float64 sum)
    torch.testing.assert_close(top.values.double(), exact.gather(1, top.indices), rtol=1e-6, atol=1e-5)
    # and every other token sits at or below the lowest of them
    rest = out.scatter(1, top.indices, float("-inf"))
    assert (rest.max(-1).values <= top.values.min(-1).values).all()
    # the exact argmax is among them, first (random weights: the 4-bit error is a tenth of the gaps)
    assert torch.equal(out.argmax(-1), exact.argmax(-1))


@pytest.mark.parametrize("vocab,hidden,candidates", [(1000, 96, 64), (517, 64, 8), (40, 32, 64)])
def test_a_dense_head_is_screened_to_its_exact_top(vocab, hidden, candidates):
    g = torch.Generator().manual_seed(vocab)
    w = torch.randn(vocab, hidden, generator=g) * 0.05
    head = ScreenedHead.of(w, vocab, hidden, candidates)
    assert head.candidates == min(candidates, vocab)
    x = torch.randn(7, hidden, generator=g) * 3
    check_against(head, x, x.double() @ w.double().T)


@pytest.mark.parametrize("acts", kernels.ACTIVATIONS)
def test_a_quantized_head_is_screened_to_its_kernels_values(acts):
    qt = random_quantized(1000 + 3, 128, 8, 32, offset=128)       # rows not a multiple of the 16-row tile
    weight = QuantWeight([qt], activations=acts, lm_head=True)
    head = ScreenedHead.of(weight, qt.rows, qt.cols, 32)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1)) * 2
    check_against(head, x, kernels.reference_matmul(x, qt, acts))
    # what the exact path computes (the kernel, float32 sums) agrees to its own rounding
    torch.testing.assert_close(head(x).gather(1, head(x).topk(32).indices),
                               weight(x).gather(1, head(x).topk(32).indices), rtol=1e-5, atol=1e-4)


def test_only_heads_read_in_six_bits_or_more_are_screened():
    V, H = 262144, 128
    w = torch.zeros(V, H)
    assert ScreenedHead.pays(w, V, H)                                           # float32: 6.4x the bytes
    assert ScreenedHead.pays(QuantWeight([rtn.quantize(w, 8)]), V, H)          # 8-bit: 1.7x
    assert not ScreenedHead.pays(QuantWeight([rtn.quantize(w, 4)]), V, H)      # 4-bit: the same bytes
    assert not ScreenedHead.pays(torch.zeros(V, 48), V, 48)                     # rows not whole groups of 32
    assert not ScreenedHead.pays(torch.zeros(4096, 64), 4096, 64)              # 1 MB: faster read than screened


def test_which_rows_are_decided_by_their_top_tokens():
    assert SamplingParams(temperature=0).decided_by_top(64)
    assert SamplingParams(temperature=0.7, top_k=40).decided_by_top(64)
    assert not SamplingParams(temperature=0.7, top_k=40).decided_by_top(32)
    assert not SamplingParams(temperature=0.7).decided_by_top(64)                     # the whole vocabulary
    assert not SamplingParams(temperature=0.7, top_p=0.9).decided_by_top(64)
    assert not SamplingParams(temperature=0, logprobs=2).decided_by_top(64)           # reports log-probabilities
    assert not SamplingParams(temperature=0, repetition_penalty=1.2).decided_by_top(64)
    assert not SamplingParams(temperature=0, presence_penalty=0.5).decided_by_top(64)


@pytest.fixture(scope="module")
def gguf_model(converted):
    return load_model(converted, torch.float32, quantization="gguf")


def spy(monkeypatch) -> list[int]:
    """Rows each ScreenedHead call screened."""
    calls: list[int] = []
    real = ScreenedHead.__call__

    def counting(self, x):
        calls.append(x.shape[0])
        return real(self, x)
    monkeypatch.setattr(ScreenedHead, "__call__", counting)
    return calls


@pytest.mark.slow
def test_the_embedded_model_decodes_the_same_greedy_tokens_screened(gguf_model, converted, monkeypatch):
    words = VARIED.split()
    tok = Tokenizer.from_dir(converted)
    prompts = [tok.encode(" ".join(words[i:i + 40])) for i in range(0, 200, 40)]
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)

    def run(screen: bool, extra=()):
        engine = LLMEngine(gguf_model, EngineConfig(kv_cache_memory_gb=0.25, screen_lm_head=screen), frozenset())
        ids = [engine.add_request(p, greedy) for p in prompts]
        ids += [engine.add_request(p, params) for p, params in extra]
        out: dict[str, list[int]] = {i: [] for i in ids}
        while engine.has_work():
            for o in engine.step():
                out[o.request_id] += o.new_token_ids
        return [out[i] for i in ids]

    calls = spy(monkeypatch)
    exact = run(False)
    assert calls == []
    screened = run(True)
    assert screened == exact
    assert len(calls) >= 24 and max(calls) == len(prompts)      # the decode steps were screened
    # a row drawing from the whole vocabulary sends its steps to the exact head; the greedy rows' tokens stay
    calls.clear()
    mixed = run(True, [(prompts[0], SamplingParams(max_tokens=4, temperature=0.8, seed=1, ignore_eos=True))])
    assert mixed[:len(prompts)] == exact
    assert calls and all(n == len(prompts) for n in calls)      # only steps without the sampled row


@pytest.mark.slow
def test_screened_greedy_agrees_with_the_exact_head_teacher_forced(gguf_model, converted):
    ids = Tokenizer.from_dir(converted).encode(VARIED + "\n" + VARIED.upper())
    head = gguf_model.screen_lm_head()
    assert head is not None and head.nbytes < 0.6 * gguf_model.lm_head.quantized.nbytes
    hidden = teacher_forced_hidden(gguf_model, ids)
    want = gguf_model.compute_logits(hidden).argmax(-1)
    agreement = (gguf_model.compute_logits(hidden, screened=True).argmax(-1) == want).float().mean().item()
    alone = (head.coarse.matmul(hidden, "int8").argmax(-1) == want).float().mean().item()
    print(f"\nteacher-forced agreement with the exact 8-bit head, {len(ids)} tokens: screened {agreement:.2%}, "
          f"the 4-bit head alone {alone:.2%}")
    assert agreement >= 0.995          # measured 100% (835 tokens); the 4-bit head alone 89.5%
