"""SamplingParams: the per-request generation options, validated where they are made.

Ranges follow Workers AI's text-generation schema (temperature 0-5, top_p 0-2, top_k 1-50,
seed 1-9999999999, penalties 0-2); `logprobs` asks for the chosen token's log-probability and up to
MAX_LOGPROBS alternatives (OpenAI's top_logprobs limit). Out-of-range values raise `InvalidRequestError`; nothing is
clamped silently. Knows nothing of tokens' meaning, the engine or HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_LOGPROBS = 20       # alternatives per token: OpenAI's top_logprobs limit


class InvalidRequestError(ValueError):
    """A request the engine refuses; `field` names the offending option when there is one."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message, field)
        self.field = field

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True, slots=True)
class Range:
    """The values an option takes: numbers from `lo` to `hi` (either end None: open-ended; `lo_open`: `lo`
    itself excluded), integers only where `integer`. The one statement of an option's range: the checks below
    and the HTTP schemas (gemlora.api.fields) both read it."""

    lo: float | None
    hi: float | None
    integer: bool = False
    lo_open: bool = False

    def json_schema(self) -> dict:
        out: dict = {"type": "integer" if self.integer else "number"}
        if self.lo is not None:
            out["exclusiveMinimum" if self.lo_open else "minimum"] = self.lo
        if self.hi is not None:
            out["maximum"] = self.hi
        return out

    def check(self, name: str, value: float | None) -> None:
        if value is None:
            return
        if self.integer and (isinstance(value, bool) or not isinstance(value, int)):
            raise InvalidRequestError(f"{name} must be an integer, got {value!r}", name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidRequestError(f"{name} must be a number, got {type(value).__name__}", name)
        lo = float("-inf") if self.lo is None else self.lo
        hi = float("inf") if self.hi is None else self.hi
        if value != value or value > hi or value < lo or (self.lo_open and value == lo):
            bound = f"({self.lo}, {self.hi}]" if self.lo_open else f"[{self.lo}, {self.hi}]"
            raise InvalidRequestError(f"{name} must be in {bound}, got {value}", name)


# Workers AI's text-generation ranges (OpenAI's temperature 0-2 and top_p 0-1 lie inside them); a
# repetition penalty of 0 would divide logits by zero, so its lower bound is exclusive.
RANGES = {
    "max_tokens": Range(1, None, integer=True),
    "temperature": Range(0, 5),
    "top_p": Range(0, 2),
    "top_k": Range(1, 50, integer=True),
    "seed": Range(1, 9_999_999_999, integer=True),
    "repetition_penalty": Range(0, 2, lo_open=True),
    "frequency_penalty": Range(0, 2),
    "presence_penalty": Range(0, 2),
    "logprobs": Range(0, MAX_LOGPROBS, integer=True),
    "lora_scale": Range(0, 10),
}


def check_lora_scale(value: float) -> float:
    """The per-request adapter scale: 0 is the base model, 1 the adapter as trained."""
    RANGES["lora_scale"].check("lora_scale", value)
    return float(value)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.6           # Workers AI's default; 0 means greedy
    top_p: float = 1.0                 # >= 1 keeps every token; 0 keeps only the most likely one
    top_k: int | None = None
    seed: int | None = None
    repetition_penalty: float = 1.0    # divides positive / multiplies negative logits of seen tokens
    frequency_penalty: float = 0.0     # subtracted per earlier occurrence in the output
    presence_penalty: float = 0.0      # subtracted once if the token occurred in the output
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    extra_stop_token_ids: tuple[int, ...] = field(default=())
    logprobs: int | None = None        # None: none; n: the chosen token's log-probability and the n most likely

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}", "max_tokens")
        for name, values in RANGES.items():
            if name not in ("max_tokens", "lora_scale"):
                values.check(name, getattr(self, name))
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidRequestError("stop must be a list of non-empty strings", "stop")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0 or self.presence_penalty != 0

    def decided_by_top(self, n: int) -> bool:
        """Does the token drawn depend on the logits of the `n` most likely tokens alone? (greedy or
        top_k <= n, with no penalties and no logprobs to report)"""
        top = self.greedy or (self.top_k is not None and self.top_k <= n)
        return top and not self.has_penalties and self.logprobs is None
