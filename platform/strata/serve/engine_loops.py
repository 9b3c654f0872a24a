"""Several engine loops over one copy of a model: each loop its own batch, KV cache and scheduler thread.

On torch's CPU kernels a decode step of the small presets is many small kernels and the Python between them, which
one thread runs while a second thread of the same loop mostly waits. Two loops of one thread each keep both cores
busy: each loop's Python runs while the other's kernels run (torch releases the GIL inside them). Measured on Intel,
in-process, on the `small` preset at 32 clients (2 cores): one loop of 2 threads ~520 tokens/s, two loops of 1
thread over one model ~740, two processes with a model each ~730. On the bf16 brgemm kernels
(`models/brgemm_bf16.py`) a layer is one call and the loops' Python contends for the GIL instead: there one loop of
2 threads is faster. A GPU replica runs one loop.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from strata.serve.engine import Engine, Output, Sink, StepStats
from strata.serve.metrics import ObservabilityErrors
from strata.serve.sampling import SamplingParams

WARM_UP_PROMPT = "Hello"
WARM_UP_TOKENS = 16  # a prefill and a short reply's decode steps, each cache length a new shape the first time
WARM_UP_LONGEST_PROMPT = 256  # prompts of 1, 2, 4, ... this many tokens are prefilled once each
WARM_UP_TIMEOUT_S = 600.0


class EngineLoops:
    """`loops` engines sharing `model`, behind the API of one: a request goes to the least loaded loop, and the
    slots, the KV cache budget and the step statistics are the replica's, split over or summed across loops."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        loops: int = 1,
        max_batch_size: int = 32,
        kv_cache_tokens: int | None = None,
        on_step: Callable[[StepStats], None] | None = None,
        observer_errors: ObservabilityErrors | None = None,
        **settings: Any,
    ):
        if loops < 1 or max_batch_size < loops:
            raise ValueError(f"need 1 <= loops ({loops}) <= max_batch_size ({max_batch_size})")
        self.observer_errors = observer_errors or ObservabilityErrors()
        self.on_step = on_step
        ids = itertools.count()
        self.engines = [
            Engine(
                model,
                tokenizer,
                max_batch_size // loops + (loop < max_batch_size % loops),
                on_step=lambda stats, loop=loop: self._stepped(loop, stats),
                seed=loop,
                kv_cache_tokens=kv_cache_tokens and kv_cache_tokens // loops,
                observer_errors=self.observer_errors,
                request_ids=ids,
                **settings,
            )
            for loop in range(loops)
        ]
        self._latest = [StepStats(0, 0, 0, 0, 0) for _ in self.engines]
        self._step_lock = threading.Lock()
        first = self.engines[0]
        self.model, self.tokenizer, self.max_context = first.model, first.tokenizer, first.max_context

    def start(self) -> None:
        for loop, engine in enumerate(self.engines):
            threading.Thread(target=engine.run, name=f"strata-engine-{loop}", daemon=True).start()

    def warm_up(self, adapters: list[str | None]) -> float:
        """Generate WARM_UP_TOKENS greedy tokens on every loop, a row for each of `adapters` (None: the plain
        model), prefill a prompt of every power-of-two length up to WARM_UP_LONGEST_PROMPT, and forget them all;
        the seconds it took. The first forwards on a thread pay for lazy set-up (on a GPU the CUDA context, cuBLAS
        handles and the allocator's pools; on a CPU the loop's OpenMP team and, measured, a prompt longer than any
        before it: on `small` in bf16 a 44-token first prompt took 17-30 ms after a 4-token warm-up, ~7 after the
        ladder, ~6 the second time), which a replica should pay before it is ready rather than in its first
        client's request, where a canary would judge it. The warm-up reaches neither `on_step` nor the counters
        `stats` reports. A model that cannot generate raises RuntimeError: a replica that would fail its first
        request must not become ready."""
        started = time.perf_counter()
        first = self.engines[0]
        budget = min(first.max_context, first.kv_cache_tokens or first.max_context)  # a small KV budget cuts it
        prompt = self.tokenizer.encode(WARM_UP_PROMPT, add_special_tokens=False) or [self.tokenizer.eos_token_id or 0]
        prompt = prompt[: max(1, budget - 1)]
        longest = max(1, min(WARM_UP_LONGEST_PROMPT, budget - 1))
        ladder = [(prompt * length)[:length] for length in (1 << k for k in range(longest.bit_length()))]
        rows = [(prompt, self.greedy_to_the_end(max(1, min(WARM_UP_TOKENS, budget - len(prompt)))))]
        rows += [(ids, SamplingParams(max_tokens=1, temperature=0.0)) for ids in ladder]
        finished: list[Output] = []
        each_finish = threading.Semaphore(0)

        def sink(output: Output) -> None:
            if output.finish_reason:
                finished.append(output)
                each_finish.release()

        on_step, self.on_step = self.on_step, None
        deadline = started + WARM_UP_TIMEOUT_S
        try:
            for engine in self.engines:  # to each loop, not the least loaded: every loop's thread must warm
                for adapter, (ids, params) in itertools.product(adapters, rows):
                    engine.submit(ids, params, sink, adapter)
            for _ in range(len(self.engines) * len(adapters) * len(rows)):
                if not each_finish.acquire(timeout=max(0.0, deadline - time.perf_counter())):
                    raise RuntimeError(f"the warm-up generation did not finish in {WARM_UP_TIMEOUT_S:.0f} s")
            if failed := next((output.error for output in finished if output.finish_reason == "error"), None):
                raise RuntimeError(f"the model failed its warm-up generation: {failed}")
            with self.paused():  # the steps that answered have ended, and counted
                for engine in self.engines:
                    engine.forget_counts()
        except BaseException:
            self.stop()  # the replica will not serve: no loop is left running
            raise
        finally:
            self.on_step = on_step
        return time.perf_counter() - started

    def greedy_to_the_end(self, max_tokens: int) -> SamplingParams:
        """Greedy sampling with end-of-text banned: a row decodes all `max_tokens`, whatever the model."""
        vocab = self.model.config.vocab_size
        never_ends = {token: -1e9 for token in self.engines[0].eos_token_ids if token < vocab}
        return SamplingParams(max_tokens=max_tokens, temperature=0.0, logit_bias=never_ends)

    def stop(self) -> None:
        for engine in self.engines:
            engine.stop()

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Sink, adapter: str | None = None) -> int:
        """To the least loaded loop that has not failed (a failed loop is idle, and would take everything until
        the health check replaces the replica); with every loop failed, the first says why (RuntimeError)."""
        healthy = [engine for engine in self.engines if not engine.failure] or self.engines[:1]
        return min(healthy, key=Engine.load).submit(prompt_ids, params, sink, adapter)

    def cancel(self, request_id: int) -> None:
        """Request ids are unique across loops: only the one holding it acts."""
        for engine in self.engines:
            engine.cancel(request_id)

    @property
    def failure(self) -> str | None:
        return next((engine.failure for engine in self.engines if engine.failure), None)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No loop steps inside: the model may change (an adapter is added)."""
        with ExitStack() as stack:
            for engine in self.engines:
                stack.enter_context(engine.model_lock)
            yield

    def stats(self) -> dict[str, Any]:
        totals: dict[str, Any] = {}
        for engine in self.engines:
            for key, value in engine.stats().items():
                totals[key] = totals.get(key, 0) + value
        return {**totals, "observability_errors": self.observer_errors.count, "loops": len(self.engines)}

    def _stepped(self, loop: int, stats: StepStats) -> None:
        """One loop's step, reported as the replica's: its tokens, and every loop's latest batch, queue and cache."""
        if not self.on_step:
            return
        with self._step_lock:
            self._latest[loop] = stats
            replica = StepStats(
                sum(s.batch_size for s in self._latest),
                sum(s.queue_length for s in self._latest),
                sum(s.running for s in self._latest),
                sum(s.cache_tokens for s in self._latest),
                stats.tokens,
            )
            if not stats.running:  # this loop finished its last rows and sleeps: no batch of its own until it wakes
                self._latest[loop] = dataclasses.replace(stats, batch_size=0)
            self.on_step(replica)
