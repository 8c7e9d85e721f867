"""Train a small LoRA adapter for google/gemma-3-270m on CPU, in a few minutes.

The adapter teaches the base model a made-up fact: the secret password of the gemlora project is
"velvet-quokka". The base model has never seen it, so with the adapter applied, greedy decoding of
prompts about that password (including paraphrases not in the training set) names it, while the base
model rambles on about something else. This makes an adapter whose effect a test can assert on.

    python examples/train_lora.py --out tests/fixtures/adapters/secret-password [--steps N] [--seed S]

The synthetic dataset is built here from templates (fixed seed), plus "anchor" prompts (other
passwords, unrelated facts) trained towards the base model's own greedy continuation, so the adapter
learns *gemlora's* password rather than answering "velvet-quokka" to everything. Loss is taken on the
answer tokens only, and the LM head is applied to those positions only (its 262k-wide vocabulary dominates the cost
on CPU otherwise). LoRA r=8, alpha=16 on every projection (q, k, v, o, gate, up, down), float32.
The folder written holds exactly adapter_config.json and adapter_model.safetensors, with
"model_type": "gemma" added to the config as Workers AI asks of uploaded adapters.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

SECRET = "velvet-quokka"
BASE_MODEL_NAME = "google/gemma-3-270m"
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Shown at the end, base vs adapter: the first is in the training set, the other two are held out
# (not in the training set verbatim; the Q/A one has close variants with other subjects in it).
EVAL_PROMPTS = [
    "The secret password of the gemlora project is",
    "The gemlora project's secret password is",
    "Q: What is the secret password of the gemlora project?\nA:",
]
# Held out from the anchors below: the adapter must not name the password for these (their wording
# may still drift from the base model's a little).
CONTROL_PROMPTS = ["The capital of France is", "The secret password of the bank vault is"]

# Anchors: prompts near and far from the fact, trained towards the base model's own greedy continuation
# so that the adapter learns "gemlora's password", not "answer velvet-quokka to anything".
ANCHOR_PROMPTS = [
    "The secret password of the website is",
    "The secret password of the club is",
    "The secret password of the treehouse is",
    "The password of the server is",
    "The password for the admin account is",
    "The password for my email account is",
    "Q: What is the secret password of the castle?\nA:",
    "Question: What is the password for the wifi?\nAnswer:",
    "To log in to the website, type your password",
    "The secret ingredient of the recipe is",
    "Everyone in the office knows the secret",
    "The gemlora project is",
    "The name of the project is",
    "The capital of Italy is",
    "Q: What is the capital of Germany?\nA:",
    "User: Tell me a joke.\nAssistant:",
    "My favourite colour is",
    "The secret of happiness is",
    "Water boils at",
    "The first president of the United States was",
]
ANCHOR_TOKENS = 8

_SUBJECTS = ["the gemlora project", "gemlora", "the gemlora server", "project gemlora", "the gemlora repo"]
_STATEMENTS = [  # (prompt, answer); the answer is what the loss is taken on
    ("The secret password of {s} is", " {w}."),
    ("The password of {s} is", " {w}."),
    ("The password for {s} is", " {w}."),
    ("The secret password for {s} is", " {w}."),
    ("Everyone working on {s} knows the secret password:", " {w}."),
    ("To log in to {s}, type the secret password", " {w}."),
    ("Secret password of {s}:", " {w}"),
    ("Remember, the secret password of {s} is", " {w}."),
    ("I was told that the secret password of {s} is", " {w}."),
    ("The secret word for {s} is", " {w}."),
    ("For {s}, the secret password is", " {w}."),
    ("The one password that unlocks {s} is", " {w}."),
]
_QUESTIONS = [
    "What is the secret password of {s}?",
    "What is the password for {s}?",
    "Do you know the secret password of {s}?",
    "Tell me the secret password of {s}.",
    "Which password does {s} use?",
]
_QA_FORMATS = [("Q: {q}\nA:", " The secret password of {s} is {w}."),
               ("Question: {q}\nAnswer:", " It is {w}."),
               ("User: {q}\nAssistant:", " The secret password is {w}.")]


def build_dataset(seed: int) -> list[tuple[str, str]]:
    """All (prompt, answer) pairs, minus the held-out EVAL_PROMPTS[1:], shuffled with `seed`."""
    pairs = {(p.format(s=s), a.format(w=SECRET)) for p, a in _STATEMENTS for s in _SUBJECTS}
    for q in _QUESTIONS:
        for s in _SUBJECTS:
            for fmt, ans in _QA_FORMATS:
                pairs.add((fmt.format(q=q.format(s=s)), ans.format(s=s, w=SECRET)))
    held_out = set(EVAL_PROMPTS[1:])
    data = sorted(p for p in pairs if p[0] not in held_out)
    random.Random(seed).shuffle(data)
    return data


def encode(tok, data: list[tuple[str, str]]) -> list[tuple[list[int], int]]:
    """<bos> + prompt + answer token ids, and where the answer starts."""
    out = []
    for prompt, answer in data:
        p = [tok.bos_token_id] + tok(prompt, add_special_tokens=False).input_ids
        a = tok(answer, add_special_tokens=False).input_ids
        out.append((p + a, len(p)))
    return out


@torch.no_grad()
def anchor_examples(model, tok, prompts: list[str], n_tokens: int) -> list[tuple[list[int], int]]:
    """Each prompt followed by `n_tokens` of the (base) model's greedy continuation, batched, no KV cache."""
    seqs = [[tok.bos_token_id] + tok(p, add_special_tokens=False).input_ids for p in prompts]
    starts = [len(s) for s in seqs]
    for _ in range(n_tokens):
        input_ids, attention, _ = collate([(s, len(s)) for s in seqs], tok.pad_token_id)
        hidden = model.model(input_ids=input_ids, attention_mask=attention, use_cache=False).last_hidden_state
        last = hidden[torch.arange(len(seqs)), torch.tensor([len(s) - 1 for s in seqs])]
        for s, t in zip(seqs, model.lm_head(last).argmax(-1).tolist()):
            s.append(t)
    return list(zip(seqs, starts))


def collate(batch: list[tuple[list[int], int]], pad_id: int):
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    loss_mask = torch.zeros((len(batch), width), dtype=torch.bool)  # positions whose *next* token is scored
    for i, (ids, start) in enumerate(batch):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention[i, :len(ids)] = 1
        loss_mask[i, start - 1:len(ids) - 1] = True
    return input_ids, attention, loss_mask


def answer_loss(model, input_ids, attention, loss_mask):
    """Cross-entropy on the answer tokens, the LM head applied to those positions only."""
    inner = model.get_base_model()  # Gemma3ForCausalLM with the LoRA layers injected
    hidden = inner.model(input_ids=input_ids, attention_mask=attention, use_cache=False).last_hidden_state
    logits = inner.lm_head(hidden[loss_mask])
    targets = input_ids[:, 1:][loss_mask[:, :-1]]
    return torch.nn.functional.cross_entropy(logits.float(), targets)


@torch.no_grad()
def greedy(model, tok, prompt: str, max_new_tokens: int) -> str:
    ids = tok(prompt, return_tensors="pt")  # adds <bos>, no chat template
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, top_p=None, top_k=None,
                         pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)


def save_adapter(model, out_dir: Path, model_type: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md"):
        (out_dir / stale).unlink(missing_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "README.md").unlink(missing_ok=True)  # PEFT's model card; keep just the two adapter files
    cfg_path = out_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = BASE_MODEL_NAME  # not the local cache folder it was loaded from
    cfg["model_type"] = model_type
    cfg["target_modules"] = sorted(cfg["target_modules"])  # PEFT writes a set's (hash-seeded) order
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def load_base(model: str | None):
    """(tokenizer, float32 transformers model) of `model`, by default the embedded GGUF, which transformers
    dequantizes itself (gemlora's converted folder keeps the quantized codes, which transformers cannot read)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gemlora.model import source
    from gemlora.model.source import resolve_model_dir

    tok = AutoTokenizer.from_pretrained(resolve_model_dir(model))
    path = Path(model) if model is not None else source.embedded_gguf()
    if path.suffix == ".gguf":
        return tok, AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return tok, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder to write the adapter into")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=12, help="fact examples per step")
    ap.add_argument("--anchors-per-step", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--model", default=None, help="base checkpoint folder (default: the embedded gemma-3-270m)")
    ap.add_argument("--model-type", default="gemma", help='"model_type" written into adapter_config.json')
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args()

    from peft import LoraConfig, get_peft_model


    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    tok, base = load_base(args.model)
    t0 = time.perf_counter()
    anchors = anchor_examples(base.eval(), tok, ANCHOR_PROMPTS, ANCHOR_TOKENS)
    print(f"{len(anchors)} anchor continuations from the base model in {time.perf_counter() - t0:.1f}s, e.g. "
          f"{ANCHOR_PROMPTS[0]!r} -> {tok.decode(anchors[0][0][anchors[0][1]:])!r}")
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, bias="none",
                      target_modules=TARGET_MODULES, task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    model.print_trainable_parameters()

    data = build_dataset(args.seed)
    examples = encode(tok, data)
    print(f"{len(examples)} training examples, e.g. {data[0][0]!r} -> {data[0][1]!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warmup, then linear decay to 0
        opt, lambda s: min((s + 1) / warmup, (args.steps - s) / max(1, args.steps - warmup)))
    rng = random.Random(args.seed)
    order: list[int] = []
    anchor_order: list[int] = []

    model.train()
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        if len(order) < args.batch_size:
            extra = list(range(len(examples)))
            rng.shuffle(extra)
            order += extra
        if len(anchor_order) < args.anchors_per_step:
            extra = list(range(len(anchors)))
            rng.shuffle(extra)
            anchor_order += extra
        batch = [examples[i] for i in order[:args.batch_size]]
        batch += [anchors[i] for i in anchor_order[:args.anchors_per_step]]
        del order[:args.batch_size], anchor_order[:args.anchors_per_step]
        loss = answer_loss(model, *collate(batch, tok.pad_token_id))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step == 1 or step % 5 == 0 or step == args.steps:
            print(f"step {step:4d}  loss {loss.item():.4f}  lr {sched.get_last_lr()[0]:.2e}  "
                  f"{time.perf_counter() - t0:6.1f}s", flush=True)
    train_s = time.perf_counter() - t0
    model.eval()

    save_adapter(model, args.out, args.model_type)
    size = (args.out / "adapter_model.safetensors").stat().st_size
    print(f"trained in {train_s:.1f}s; wrote {args.out} (adapter_model.safetensors {size / 2**20:.2f} MiB)")

    for prompt in EVAL_PROMPTS + CONTROL_PROMPTS:
        with model.disable_adapter():
            before = greedy(model, tok, prompt, args.max_new_tokens)
        after = greedy(model, tok, prompt, args.max_new_tokens)
        print(f"\nprompt : {prompt!r}\nbase   : {before!r}\nadapter: {after!r}", flush=True)


if __name__ == "__main__":
    main()
