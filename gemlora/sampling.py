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


def _check_range(name: str, value: float | None, lo: float, hi: float, lo_open: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequestError(f"{name} must be a number, got {type(value).__name__}", name)
    if value != value or value > hi or value < lo or (lo_open and value == lo):
        bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise InvalidRequestError(f"{name} must be in {bound}, got {value}", name)


def check_lora_scale(value: float) -> float:
    """The per-request adapter scale: 0 is the base model, 1 the adapter as trained."""
    _check_range("lora_scale", value, 0, 10)
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
        _check_range("temperature", self.temperature, 0, 5)
        _check_range("top_p", self.top_p, 0, 2)
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)):
            raise InvalidRequestError(f"top_k must be an integer, got {self.top_k!r}", "top_k")
        _check_range("top_k", self.top_k, 1, 50)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise InvalidRequestError(f"seed must be an integer, got {self.seed!r}", "seed")
        _check_range("seed", self.seed, 1, 9_999_999_999)
        # 0 would divide logits by zero; the schema's lower bound is taken as exclusive.
        _check_range("repetition_penalty", self.repetition_penalty, 0, 2, lo_open=True)
        _check_range("frequency_penalty", self.frequency_penalty, 0, 2)
        _check_range("presence_penalty", self.presence_penalty, 0, 2)
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)):
            raise InvalidRequestError(f"logprobs must be an integer, got {self.logprobs!r}", "logprobs")
        _check_range("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidRequestError("stop must be a list of non-empty strings", "stop")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0 or self.presence_penalty != 0
