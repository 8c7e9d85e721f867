"""Train a LoRA adapter that teaches google/gemma-3-270m to call two tools, on CPU, in minutes.

The base model is not instruction-tuned: shown Google's Gemma function-calling prompt (the one gemlora
writes for `tools`), it repeats the instructions instead of calling anything. This adapter learns, from
templated examples, to answer a weather question with a `get_weather` call and a money question with a
`convert_currency` call (arguments taken from the question), and, once the tool's result is in the
conversation, to answer in words. The prompts are written exactly as `gemlora serve` writes them
(gemlora.text.tool_prompt with the gemma-json format), so the adapter serves as a finetune with no
glue: `tools` in, `tool_calls` out. Cities, amounts and phrasings used by the tests' evaluation are kept
out of the training set (HELD_OUT below).

    python examples/train_tool_lora.py --out tests/fixtures/adapters/tool-caller [--steps N] [--seed S]

LoRA r=8, alpha=16 on every projection, float32; the loss is on the answer tokens only. The helpers
(batching, the answer-only loss, saving) are examples/train_lora.py's.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_lora import TARGET_MODULES, answer_loss, collate, encode, load_base, save_adapter  # noqa: E402

from gemlora.text.chat import format_chat  # noqa: E402
from gemlora.text.tool_format import GemmaJsonFormat, ToolCall, ToolSpec  # noqa: E402
from gemlora.text.tool_prompt import tool_messages  # noqa: E402

WEATHER = {"name": "get_weather", "description": "Get the current weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city"}},
                          "required": ["city"]}}
CONVERT = {"name": "convert_currency", "description": "Convert an amount of money from one currency to another.",
           "parameters": {"type": "object",
                          "properties": {"amount": {"type": "number"},
                                         "from_currency": {"type": "string", "description": "ISO 4217 code"},
                                         "to_currency": {"type": "string", "description": "ISO 4217 code"}},
                          "required": ["amount", "from_currency", "to_currency"]}}
TOOLS = [WEATHER, CONVERT]
SPECS = [ToolSpec(t["name"], t["description"], t["parameters"]) for t in TOOLS]

CITIES = ["Paris", "Berlin", "Madrid", "Rome", "Vienna", "Oslo", "Dublin", "Prague", "Warsaw", "Athens", "Cairo",
          "Nairobi", "Lima", "Bogota", "Toronto", "Chicago", "Denver", "Seattle", "Boston", "Sydney", "Osaka",
          "Seoul", "Delhi", "Hanoi"]
CURRENCIES = {"dollars": "USD", "euros": "EUR", "yen": "JPY", "pounds": "GBP", "francs": "CHF", "rupees": "INR",
              "pesos": "MXN", "won": "KRW"}
AMOUNTS = [5, 12, 20, 35, 50, 75, 100, 150, 200, 250, 400, 1000]
WEATHER_ASKS = ["What's the weather like in {c}?", "How is the weather in {c} today?", "Is it raining in {c}?",
                "Tell me the weather in {c}.", "What is the temperature in {c} right now?",
                "Do I need an umbrella in {c}?", "weather {c}", "Is it cold in {c} at the moment?"]
CONVERT_ASKS = ["Convert {a} {f} to {t}.", "How much is {a} {f} in {t}?", "What are {a} {f} worth in {t}?",
                "Change {a} {f} into {t}.", "{a} {f} to {t}, please.", "I have {a} {f}. How many {t} is that?",
                "Exchange {a} {f} for {t}.", "What is {a} {f} in {t}?"]

# Kept out of training: the tests ask these (tests/test_tool_adapter.py)
HELD_OUT_CITIES = ["Lisbon", "Tokyo", "Mumbai", "Havana", "Helsinki", "Santiago"]
HELD_OUT_AMOUNTS = [7, 30, 80, 300]
HELD_OUT_WEATHER = ["Could you check the weather in {c} for me?", "Any idea what the weather is in {c}?"]
HELD_OUT_CONVERT = ["Could you convert {a} {f} to {t} for me?", "I need {t} for {a} {f}. How much?"]


def prompt(messages: list[dict]) -> str:
    """The prompt `gemlora serve` writes for these messages with TOOLS (tool_choice auto)."""
    return format_chat(tool_messages(messages, SPECS, GemmaJsonFormat()))


def call_text(name: str, arguments: dict) -> str:
    return GemmaJsonFormat().call([ToolCall(name, arguments)])


def weather_example(rng: random.Random, ask: str, city: str) -> list[tuple[str, str]]:
    question = ask.format(c=city)
    arguments = {"city": city}
    call = ToolCall("get_weather", arguments, "call_1")
    temp, sky = rng.randint(-5, 32), rng.choice(["sunny", "cloudy", "rainy", "windy", "clear"])
    result = json.dumps({"city": city, "temperature_c": temp, "conditions": sky})
    answer = f"It is {sky} in {city}, at {temp}°C."
    history = [{"role": "user", "content": question}, {"role": "assistant", "content": "", "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": result}]
    return [(prompt(history[:1]), call_text("get_weather", arguments) + "<end_of_turn>"),
            (prompt(history), answer + "<end_of_turn>")]


def convert_example(rng: random.Random, ask: str, amount: int, src: str, dst: str) -> list[tuple[str, str]]:
    question = ask.format(a=amount, f=src, t=dst)
    arguments = {"amount": amount, "from_currency": CURRENCIES[src], "to_currency": CURRENCIES[dst]}
    call = ToolCall("convert_currency", arguments, "call_1")
    value = round(amount * rng.uniform(0.5, 2.0), 2)
    result = json.dumps({"amount": value, "currency": CURRENCIES[dst]})
    answer = f"{amount} {src} is {value} {dst}."
    history = [{"role": "user", "content": question}, {"role": "assistant", "content": "", "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": result}]
    return [(prompt(history[:1]), call_text("convert_currency", arguments) + "<end_of_turn>"),
            (prompt(history), answer + "<end_of_turn>")]


def build_dataset(seed: int, n: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    names = sorted(CURRENCIES)
    data = []
    for i in range(n):
        if i % 2 == 0:
            data += weather_example(rng, rng.choice(WEATHER_ASKS), rng.choice(CITIES))
        else:
            src, dst = rng.sample(names, 2)
            data += convert_example(rng, rng.choice(CONVERT_ASKS), rng.choice(AMOUNTS), src, dst)
    rng.shuffle(data)
    return data


def held_out_questions() -> list[tuple[str, str, dict]]:
    """(question, the tool it needs, its arguments), none of them in training."""
    out = []
    for i, city in enumerate(HELD_OUT_CITIES):
        out.append((HELD_OUT_WEATHER[i % 2].format(c=city), "get_weather", {"city": city}))
    pairs = [("dollars", "euros"), ("yen", "pounds"), ("francs", "rupees"), ("euros", "won"), ("pounds", "pesos"),
             ("rupees", "dollars")]
    for i, (src, dst) in enumerate(pairs):
        amount = HELD_OUT_AMOUNTS[i % len(HELD_OUT_AMOUNTS)]
        out.append((HELD_OUT_CONVERT[i % 2].format(a=amount, f=src, t=dst), "convert_currency",
                    {"amount": amount, "from_currency": CURRENCIES[src], "to_currency": CURRENCIES[dst]}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder to write the adapter into")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--model", default=None, help="base checkpoint folder (default: the embedded gemma-3-270m)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    from peft import LoraConfig, get_peft_model

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok, base = load_base(args.model)
    model = get_peft_model(base, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, bias="none",
                                            target_modules=TARGET_MODULES, task_type="CAUSAL_LM"))
    data = build_dataset(args.seed, args.steps * args.batch_size // 2)
    examples = encode(tok, data)
    print(f"{len(examples)} examples ({max(len(ids) for ids, _ in examples)} tokens at most), e.g. "
          f"...{data[0][0][-80:]!r} -> {data[0][1]!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, (args.steps - s) / max(1, args.steps - warmup)))
    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        batch = examples[step * args.batch_size:(step + 1) * args.batch_size]
        loss = answer_loss(model, *collate(batch, tok.pad_token_id))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step + 1}/{args.steps} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    save_adapter(model, args.out, "gemma")
    print(f"trained in {time.perf_counter() - t0:.0f}s; wrote {args.out}")


if __name__ == "__main__":
    main()
