"""AsyncEngine: the engine on its own thread, serving many asyncio callers at once.

Owns the step loop's thread, a thread-safe inbox (adds, aborts and adapter removals land between
steps), one asyncio queue per request, and the text side of the output: UTF-8-safe incremental
detokenization and stop strings. Request ids are always made here: nothing a caller sends keys the
engine's state. A caller that stops listening (a client disconnect, a cancelled task) aborts its
request at once, which frees its KV blocks and its adapter's hold on a slot. A request naming an
adapter pins it in the registry for its lifetime; a cold adapter is read and validated on a worker
thread, never on the engine's.

The loop cannot die quietly: a failed step ends only its own batch (LLMEngine), a failure anywhere
else in an iteration ends what is in flight and the loop goes on, and should the thread still end
(a bug past all that), every caller gets an EngineDeadError at once and `health()` says so. Knows
nothing of HTTP or chat templates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

from gemlora.config import EngineConfig
from gemlora.engine.engine import EngineStats, LLMEngine
from gemlora.engine.sampler import TokenLogprobs
from gemlora.engine.token_masks import TokenConstraint
from gemlora.lora.adapter import LoRAAdapter
from gemlora.lora.registry import AdapterRef, AdapterRegistry
from gemlora.model.loader import load_model, quantizes
from gemlora.model.source import resolve_model_dir
from gemlora.request import FinishReason, RequestOutput
from gemlora.sampling import InvalidRequestError, SamplingParams
from gemlora.text.detokenizer import IncrementalDetokenizer
from gemlora.text.tokenizer import Tokenizer

log = logging.getLogger("gemlora.engine")


class EngineError(RuntimeError):
    """The engine failed while running a request (not the request's fault)."""


class EngineDeadError(EngineError):
    """The engine loop is not running: nothing can be generated until the server restarts."""


@dataclass(slots=True)
class GenerationChunk:
    text: str                      # new text since the previous chunk
    token_ids: list[int]           # new token ids since the previous chunk
    finished: bool
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0         # prompt tokens whose K/V came from the prefix cache
    logprobs: list[TokenLogprobs] | None = None   # per token of token_ids (a final stop token left out)


@dataclass(frozen=True, slots=True)
class EngineHealth:
    alive: bool                    # the loop thread runs
    stepping: bool                 # ... and no step has been running for longer than the stall timeout
    detail: str
    steps: int
    step_running_s: float | None   # how long the current step has been running, if one is


class AsyncEngine:
    def __init__(self, engine: LLMEngine, tokenizer: Tokenizer, model_dir: Path | None = None,
                 registry: AdapterRegistry | None = None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_dir = model_dir
        self.registry = registry or AdapterRegistry(engine.model_config, max_cpu_loras=engine.config.max_cpu_loras,
                                                    max_rank=engine.config.max_lora_rank)
        self.registry.on_unregister = self._forget_adapter
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._dead: str | None = None              # why the loop ended, once it has
        self._step_started: float | None = None
        self._steps = 0

    @classmethod
    def from_config(cls, config: EngineConfig, progress: bool = True) -> AsyncEngine:
        model_dir = resolve_model_dir(config.model, progress=progress)
        dtype = config.activation_dtype(quantizes(model_dir, config.quantization))
        model = load_model(model_dir, dtype, config.torch_device, progress=progress,
                           quantization=config.quantization, activations=config.quant_activations)
        tokenizer = Tokenizer.from_dir(model_dir)
        stop_ids = tokenizer.stop_token_ids | frozenset(model.cfg.eos_token_ids)
        engine = cls(LLMEngine(model, config, stop_ids), tokenizer, model_dir)
        for folder in config.adapter_dirs:
            engine.registry.register_folder(folder)
        return engine

    # ---- read-only surface for the server ---------------------------------------------------------

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def model_config(self):
        return self.engine.model_config

    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    def stats(self) -> EngineStats:
        return self.engine.stats()       # plain counters read across threads: atomic under the GIL

    def health(self) -> EngineHealth:
        alive = self._thread is not None and self._thread.is_alive() and self._dead is None
        started = self._step_started
        running_s = time.monotonic() - started if started is not None else None
        stalled = running_s is not None and running_s > self.engine.config.stall_timeout_s
        if not alive:
            detail = f"engine loop is not running: {self._dead or 'not started'}"
        elif stalled:
            detail = f"a step has been running for {running_s:.0f} s"
        else:
            detail = "ok"
        return EngineHealth(alive, alive and not stalled, detail, self._steps, running_s)

    # ---- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> AsyncEngine:
        """Run the loop on a thread of its own (for callers whose main thread runs asyncio)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="gemlora-engine", daemon=True)
            self._thread.start()
        return self

    def run(self) -> None:
        """Run the loop on the calling thread until `shutdown()`. A server should call this from its
        main thread and serve HTTP from another: torch's OpenMP parallel regions started from a
        secondary thread cost ~50-150 us more each here (~1.6x the decode step of the 270M model)."""
        if self._thread is not None:
            raise RuntimeError("the engine loop is already running")
        self._thread = threading.current_thread()
        self._loop()

    def shutdown(self) -> None:
        self._stopping = True
        self._wakeup.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread() and thread.name == "gemlora-engine":
            thread.join()             # the loop started by start(); run()'s caller returns by itself
            self._thread = None

    def abort(self, request_id: str) -> None:
        self._post(("abort", request_id))

    def requests_on_adapter(self, adapter_id: str) -> int:
        """Requests in flight that hold the adapter (0 for one never loaded)."""
        registry = self.registry
        return registry.in_flight(registry.resolve(adapter_id)) if registry.is_registered(adapter_id) else 0

    def remove_adapter(self, adapter_id: str) -> None:
        """Unregister an adapter: new requests cannot find it from now on; it goes (from RAM and from
        its slot) when the last request using it ends."""
        self.registry.unregister(adapter_id, when_idle=True)

    # ---- generation --------------------------------------------------------------------------------

    async def generate(self, prompt_ids: list[int], params: SamplingParams, lora: str | None = None,
                       lora_scale: float = 1.0, cache_salt: str | None = None,
                       constraint: TokenConstraint | None = None) -> AsyncIterator[GenerationChunk]:
        """Streams chunks until the request finishes. `lora` is an adapter's name or id; only requests
        with the same `cache_salt` share cached prefixes (the API passes the account); `constraint` is
        the grammar the output must follow, made for this request alone. Raises
        InvalidRequestError / UnknownAdapterError / AdapterError before anything runs, and
        EngineDeadError when the engine loop is not running."""
        self._check_alive()
        self.engine.validate(prompt_ids, lora_scale=lora_scale)   # read-only: safe off the engine thread
        request_id = uuid.uuid4().hex                             # the engine's key: never the caller's
        ref = adapter = None
        if lora is not None:
            ref, adapter = await self._acquire(lora)
        try:
            self.engine.validate(prompt_ids, adapter, lora_scale)
            # closed here, not by a finalizer later: its abort is posted before the pin is released
            async with contextlib.aclosing(self._run(request_id, prompt_ids, params, ref, adapter, lora_scale,
                                                     cache_salt, constraint)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            # Released before the engine has seen the abort: the Request still references the weights,
            # so an unregister that wins this race cannot pull them from under a running step.
            if ref is not None:
                self.registry.release(ref)

    async def _acquire(self, lora: str) -> tuple[AdapterRef, LoRAAdapter]:
        """The registry's pin on `lora`, taken on a worker thread. A caller cancelled meanwhile (Ray Serve
        cancels a closed stream's call) does not stop the thread: its pin is released when it lands."""
        acquiring = asyncio.ensure_future(asyncio.to_thread(self.registry.acquire, lora))
        try:
            return await asyncio.shield(acquiring)
        except asyncio.CancelledError:
            def release(done: asyncio.Future) -> None:
                if not done.cancelled() and done.exception() is None:
                    self.registry.release(done.result()[0])
            acquiring.add_done_callback(release)
            raise

    async def _run(self, request_id: str, prompt_ids: list[int], params: SamplingParams, ref: AdapterRef | None,
                   adapter: LoRAAdapter | None, lora_scale: float,
                   cache_salt: str | None, constraint: TokenConstraint | None) -> AsyncIterator[GenerationChunk]:
        stream: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        detok = IncrementalDetokenizer(self.tokenizer, prompt_ids=prompt_ids, stop=list(params.stop))
        stop_ids = frozenset(params.extra_stop_token_ids) | (frozenset() if params.ignore_eos
                                                             else self.engine.stop_token_ids)
        finished = False
        try:
            self._check_alive()       # the loop may have died since generate() checked
            self._post(("add", request_id, prompt_ids, params, ref, adapter, lora_scale, cache_salt, constraint))
            while not finished:
                out = await stream.get()
                if out.refusal is not None:
                    raise out.refusal
                if out.error is not None:
                    raise (EngineDeadError if self._dead else EngineError)(out.error)
                pieces = []
                for t in out.new_token_ids:
                    if detok.stopped:
                        break
                    pieces.append(detok.push(t))
                text = "".join(pieces)
                # a stop string ends the output at the token that completed it: a step that produced more
                # (speculative decoding keeps several tokens a step) neither returns nor counts the rest
                token_ids, logprobs = out.new_token_ids[:len(pieces)], out.logprobs and out.logprobs[:len(pieces)]
                num_output = out.num_output_tokens - (len(out.new_token_ids) - len(token_ids))
                finished, reason = out.finished, out.finish_reason
                if detok.stopped and not finished:
                    self.abort(request_id)          # a stop string ended it: free its blocks now
                    finished, reason = True, FinishReason.STOP
                if finished and not detok.stopped:
                    text += detok.flush()
                if logprobs and finished and logprobs[-1].token in stop_ids:
                    logprobs = logprobs[:-1]          # the stop token is not part of the output's text
                yield GenerationChunk(text, token_ids, finished, reason, out.num_prompt_tokens,
                                      num_output, out.num_cached_tokens, logprobs)
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)              # the caller stopped listening

    # ---- the engine thread -------------------------------------------------------------------------

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine is not running ({self._dead})")

    def _post(self, msg: tuple) -> None:
        self._inbox.put(msg)
        self._wakeup.set()

    def _forget_adapter(self, adapter_id: str) -> None:
        self._post(("forget", adapter_id))      # slots belong to the engine thread

    def _loop(self) -> None:
        try:
            while not self._stopping:
                self._iterate()
            self._deliver_all(self.engine.scheduler.fail_all("the engine is shutting down"))
            self._dead = "shut down"
        except BaseException as exc:   # past every guard below: say so loudly, and hang no caller
            self._dead = f"engine loop died: {exc!r}"
            log.critical("%s; the server can no longer generate until it is restarted", self._dead, exc_info=True)
        finally:
            self._step_started = None
            self._fail_streams(self._dead or "the engine stopped")

    def _iterate(self) -> None:
        try:
            self._drain_inbox()
            if not self.engine.has_work():
                self._wakeup.wait(0.5)       # bounded: a signal handler on this thread must get to run
                self._wakeup.clear()
                return
            self._step_started = time.monotonic()
            try:
                outputs = self.engine.step()      # a failing batch comes back as error outputs
            finally:
                self._step_started = None
                self._steps += 1
            self._deliver_all(outputs)
        except Exception:
            # Not a step failure (those end their batch in LLMEngine.step): the engine's own state
            # may be inconsistent, so end everything in flight, and keep serving new requests.
            log.exception("engine loop iteration failed; ending every request in flight")
            try:
                self._deliver_all(self.engine.scheduler.fail_all("internal engine error"))
            except Exception:
                log.exception("could not end the requests in flight; failing their callers")
                self._fail_streams("internal engine error")
                time.sleep(0.1)      # the state is broken: do not spin on it

    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if msg[0] == "add":
                _, request_id, prompt_ids, params, ref, adapter, lora_scale, cache_salt, constraint = msg
                if request_id in self._streams:   # not already abandoned by its caller
                    try:
                        self.engine.add_request(prompt_ids, params, request_id, adapter_id=ref and ref.id,
                                                adapter=adapter, lora_scale=lora_scale, cache_salt=cache_salt,
                                                constraint=constraint)
                    except InvalidRequestError as exc:      # refused: the caller's fault, tell it so
                        self._deliver(RequestOutput(request_id, [], True, FinishReason.ERROR, len(prompt_ids), 0,
                                                    refusal=exc))
                    except Exception as exc:                # not the caller's fault
                        log.exception("adding request %s failed", request_id)
                        self._deliver(RequestOutput(request_id, [], True, FinishReason.ERROR, len(prompt_ids), 0,
                                                    error=f"could not add the request: {exc!r}"))
            elif msg[0] == "abort":
                self.engine.abort(msg[1])
            elif msg[0] == "forget":
                self.engine.forget_adapter(msg[1])

    def _deliver_all(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            self._deliver(out)

    def _deliver(self, out: RequestOutput) -> None:
        target = self._streams.get(out.request_id)
        if target is None:
            return
        loop, stream = target
        try:
            loop.call_soon_threadsafe(stream.put_nowait, out)
        except RuntimeError:     # the caller's event loop is closed: nobody is listening any more
            self._streams.pop(out.request_id, None)
            if not out.finished:
                self.engine.abort(out.request_id)

    def _fail_streams(self, why: str) -> None:
        for request_id in list(self._streams):
            self._deliver(RequestOutput(request_id, [], True, FinishReason.ERROR, 0, 0, error=why))

