"""AsyncEngine: the engine on its own thread, serving many asyncio callers at once.

Owns the step loop's thread, a thread-safe inbox (adds and aborts land between steps), one
asyncio queue per request, and the text side of the output: UTF-8-safe incremental detokenization
and stop strings. A caller that stops listening (a client disconnect, a cancelled task) aborts its
request at once, which frees its KV blocks and its adapter slot. A request naming an adapter pins
it in the registry for its lifetime; a cold adapter is read and validated on a worker thread, never
on the engine's. Knows nothing of HTTP or chat templates.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

from gemlora.config import EngineConfig
from gemlora.engine.engine import LLMEngine
from gemlora.lora.adapter import LoRAAdapter
from gemlora.lora.registry import AdapterRef, AdapterRegistry
from gemlora.model.loader import load_model
from gemlora.model.source import resolve_model_dir
from gemlora.request import FinishReason, RequestOutput
from gemlora.sampling import SamplingParams
from gemlora.text.detokenizer import IncrementalDetokenizer
from gemlora.text.tokenizer import Tokenizer

log = logging.getLogger("gemlora.engine")


class EngineError(RuntimeError):
    """The engine failed while running a request (not the request's fault)."""


@dataclass(slots=True)
class GenerationChunk:
    text: str                      # new text since the previous chunk
    token_ids: list[int]           # new token ids since the previous chunk
    finished: bool
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int


class AsyncEngine:
    def __init__(self, engine: LLMEngine, tokenizer: Tokenizer, model_dir: Path | None = None,
                 registry: AdapterRegistry | None = None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_dir = model_dir
        self.registry = registry or AdapterRegistry(engine.model_config, max_cpu_loras=engine.config.max_cpu_loras,
                                                    max_rank=engine.config.max_lora_rank)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = False
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(cls, config: EngineConfig, progress: bool = True) -> AsyncEngine:
        model_dir = resolve_model_dir(config.model, progress=progress)
        model = load_model(model_dir, config.torch_dtype, config.torch_device, progress=progress)
        tokenizer = Tokenizer.from_dir(model_dir)
        stop_ids = tokenizer.stop_token_ids | frozenset(model.cfg.eos_token_ids)
        engine = cls(LLMEngine(model, config, stop_ids), tokenizer, model_dir)
        for folder in config.adapter_dirs:
            engine.registry.register_folder(folder)
        return engine

    def start(self) -> AsyncEngine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="gemlora-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wakeup.set()

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                       lora: str | None = None, lora_scale: float = 1.0) -> AsyncIterator[GenerationChunk]:
        """Streams chunks until the request finishes. `lora` is an adapter's name or id. Raises
        InvalidRequestError / UnknownAdapterError / AdapterError before anything runs."""
        self.engine.validate(prompt_ids, lora_scale=lora_scale)   # read-only: safe off the engine thread
        request_id = request_id or uuid.uuid4().hex
        ref = adapter = None
        if lora is not None:
            ref, adapter = await asyncio.to_thread(self.registry.acquire, lora)
        try:
            self.engine.validate(prompt_ids, adapter, lora_scale)
            async for chunk in self._run(request_id, prompt_ids, params, ref, adapter, lora_scale):
                yield chunk
        finally:
            if ref is not None:
                self.registry.release(ref)

    async def _run(self, request_id: str, prompt_ids: list[int], params: SamplingParams, ref: AdapterRef | None,
                   adapter: LoRAAdapter | None, lora_scale: float) -> AsyncIterator[GenerationChunk]:
        stream: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        detok = IncrementalDetokenizer(self.tokenizer, prompt_ids=prompt_ids, stop=list(params.stop))
        self._inbox.put(("add", request_id, prompt_ids, params, ref, adapter, lora_scale))
        self._wakeup.set()
        finished = False
        try:
            while not finished:
                out = await stream.get()
                if out.error is not None:
                    raise EngineError(out.error)
                text = "".join(detok.push(t) for t in out.new_token_ids if not detok.stopped)
                finished, reason = out.finished, out.finish_reason
                if detok.stopped and not finished:
                    self.abort(request_id)          # a stop string ended it: free its blocks now
                    finished, reason = True, FinishReason.STOP
                if finished and not detok.stopped:
                    text += detok.flush()
                yield GenerationChunk(text, out.new_token_ids, finished, reason,
                                      out.num_prompt_tokens, out.num_output_tokens)
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)              # the caller stopped listening

    def _loop(self) -> None:
        while not self._stopping:
            self._drain_inbox()
            if not self.engine.has_work():
                self._wakeup.wait()
                self._wakeup.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a bug must not hang every caller: fail what is in flight, keep serving
                log.exception("engine step failed")
                outputs = self.engine.scheduler.fail_all(f"engine step failed: {exc!r}")
            for out in outputs:
                self._deliver(out)
        for out in self.engine.scheduler.fail_all("the engine is shutting down"):
            self._deliver(out)

    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if msg[0] == "add":
                _, request_id, prompt_ids, params, ref, adapter, lora_scale = msg
                if request_id in self._streams:   # not already abandoned by its caller
                    try:
                        self.engine.add_request(prompt_ids, params, request_id, adapter_id=ref and ref.id,
                                                adapter=adapter, lora_scale=lora_scale)
                    except Exception as exc:  # refused: tell its caller, keep serving the rest
                        self._deliver(RequestOutput(request_id, [], True, FinishReason.ERROR, len(prompt_ids), 0,
                                                    error=str(exc)))
            else:
                self.engine.abort(msg[1])

    def _deliver(self, out: RequestOutput) -> None:
        target = self._streams.get(out.request_id)
        if target is not None:
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, out)
