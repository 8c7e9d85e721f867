"""The engine's nouns: a Request in flight, and the RequestOutput it yields after each step.

A Request is token ids plus options: it carries no text and no HTTP. Its KV block table and
the count of tokens whose K/V are cached belong to it; the scheduler moves it between queues.
"""

from __future__ import annotations

import enum
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from gemlora.sampling import InvalidRequestError, SamplingParams, check_lora_scale

if TYPE_CHECKING:
    from gemlora.engine.sampler import TokenLogprobs
    from gemlora.engine.speculation import DraftState
    from gemlora.engine.token_masks import TokenConstraint
    from gemlora.lora.adapter import LoRAAdapter


class FinishReason(str, enum.Enum):
    STOP = "stop"        # a stop token or stop string
    LENGTH = "length"    # max_tokens or the context window
    ABORT = "abort"      # cancelled by the caller
    ERROR = "error"      # the engine failed while running it


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 stop_token_ids: frozenset[int], max_model_len: int,
                 adapter_id: str | None = None, adapter: LoRAAdapter | None = None, lora_scale: float = 1.0,
                 cache_salt: str | None = None, constraint: TokenConstraint | None = None):
        self.request_id = request_id
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.params = params
        self.stop_token_ids = frozenset() if params.ignore_eos else stop_token_ids
        self.stop_token_ids |= frozenset(params.extra_stop_token_ids)
        self.max_len = min(max_model_len, len(prompt_ids) + params.max_tokens)
        self.status = Status.WAITING
        self.block_table: list[int] = []
        self.num_computed = 0            # tokens whose K/V are in the cache
        self.cache_salt = cache_salt         # only requests with the same salt share cached prefixes
        self.block_hashes: list[bytes] = []   # prefix-cache names of its full blocks, as far as computed
        self.num_named_blocks = 0        # leading blocks of its table that the prefix cache knows by name
        self.num_cached_tokens: int | None = None   # prompt tokens found in the prefix cache when first admitted
        self.num_preemptions = 0
        self.constraint = constraint     # the grammar its output follows; its state moves with output_ids
        if constraint is not None and hasattr(constraint, "limit"):
            constraint.limit(self.max_len - len(self.prompt_ids))   # it keeps the output finishable within it
        self._steer = getattr(constraint, "steer", None)            # looked up once, not per token
        self.finish_reason: FinishReason | None = None
        if (adapter_id is None) != (adapter is None):
            raise ValueError("adapter_id and adapter go together")
        self.adapter_id, self.adapter, self.lora_scale = adapter_id, adapter, check_lora_scale(lora_scale)
        self.blocked_since: int | None = None   # scheduler step since which it waits for an adapter slot
        self.draft_state: DraftState | None = None   # its speculative decoding, once it drafts
        self.arrival_time = time.monotonic()
        # Own generator per request: its samples depend on its seed alone, whatever shares the batch.
        self.generator = torch.Generator().manual_seed(params.seed if params.seed is not None
                                                       else secrets.randbits(63))

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_slice(self, start: int, n: int) -> list[int]:
        """Tokens start .. start+n of prompt + output, without copying the whole sequence."""
        p = len(self.prompt_ids)
        if start + n <= p:
            return self.prompt_ids[start:start + n]
        if start >= p:
            return self.output_ids[start - p:start - p + n]
        return self.prompt_ids[start:] + self.output_ids[:start + n - p]

    def append(self, token: int) -> FinishReason | None:
        """Adds the sampled token, or the one its grammar steers to instead (output_ids[-1] says which)."""
        if self._steer is not None:
            token = self._steer(token)
        self.output_ids.append(token)
        if self.constraint is not None:
            self.constraint.accept(token)
        if token in self.stop_token_ids:
            return FinishReason.STOP
        if self.constraint is not None and self.constraint.finished:
            return FinishReason.STOP     # the grammar is complete (with ignore_eos too: nothing may follow)
        if self.num_tokens >= self.max_len:
            return FinishReason.LENGTH
        return None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int = 0                    # prompt tokens whose K/V came from the prefix cache
    error: str | None = None                      # the engine failed while running it (not its fault)
    refusal: InvalidRequestError | None = None    # the engine refused it (the caller's fault)
    logprobs: list[TokenLogprobs] | None = None   # per new token, when its params ask for them
