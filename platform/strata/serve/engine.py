"""Iteration-level (continuous) batching over a transformers causal LM and its KV cache.

One scheduler thread owns the model. Each iteration it admits waiting requests (as many as the free slots and the
KV cache budget allow; prefilled together, grouped into power-of-two prompt-length buckets so padding stays small),
merges their caches into the running batch, runs one decode step for every running sequence, and retires the ones
that finished (EOS or the chat template's end of turn, max_tokens, a stop string) or were cancelled. Rows of the batch
are left-padded to a common length; an attention mask and explicit position ids keep each row's positions its own.

transformers' own continuous batching (`generate_batch`) is some 40x slower than a static batch on a CPU, which is
why the scheduling lives here: it is plain tensor bookkeeping around `model(...)` and a `DynamicCache`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from strata.data.tokenizer import stop_token_ids
from strata.serve.kv_cache import is_out_of_memory, peak_cache_tokens, stack_right_aligned
from strata.serve.metrics import ObservabilityErrors
from strata.serve.mixed_lora import BASE_ADAPTER, MixedAdapters
from strata.serve.sampling import SamplingParams, TokenLogprob, sample

logger = logging.getLogger(__name__)

# Router logits are for training losses; the engine's expert counts come from hooks (ExpertLoadRecorder).
FORWARD_OPTIONS = {"use_cache": True, "output_router_logits": False}


@dataclass(frozen=True)
class Output:
    """What one request gained in one iteration: new text (held back where it could still become a stop string)."""

    text: str
    finish_reason: str | None  # None while running, then "stop" (EOS or a stop string), "length" or "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None  # why, when finish_reason is "error"
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens generated since the last Output, if the request asked
    cumulative_logprob: float = 0.0  # of every token sampled so far, an EOS taken off included (best_of ranks by it)


Sink = Callable[[Output], None]


@dataclass
class Sequence:
    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    sink: Sink
    generated: list[int] = field(default_factory=list)
    text: str = ""
    emitted_chars: int = 0
    prefix_offset: int = 0  # incremental detokenization: `text` covers generated[:read_offset]
    read_offset: int = 0
    cancelled: bool = False
    arrived: float = field(default_factory=time.monotonic)
    generator: torch.Generator | None = None  # the request's own, when it has a seed
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per generated token, if asked for
    logprobs_sent: int = 0
    cumulative_logprob: float = 0.0  # the sum of `logprobs`, the EOS's too
    adapter: str | None = None  # the LoRA adapter its rows decode with, on a peft model serving several

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.generated)

    def output(self, text: str, finish: str | None) -> Output:
        """New text, with the logprobs not yet sent, of tokens still in `generated` (an EOS taken off it is never
        reported, though the cumulative logprob counts it)."""
        fresh = tuple(self.logprobs[self.logprobs_sent : len(self.generated)])
        self.logprobs_sent += len(fresh)
        tokens = len(self.prompt_ids), len(self.generated)
        return Output(text, finish, *tokens, logprobs=fresh, cumulative_logprob=self.cumulative_logprob)


@dataclass
class StepStats:
    batch_size: int  # rows that gained a token this step (finished ones included)
    queue_length: int
    running: int  # rows still in the batch after the step
    cache_tokens: int  # what the batch's KV cache holds after the step: rows x longest row, padding included
    tokens: int  # generated this step: batch_size of one engine (`EngineLoops` sums the rest over its loops)


def bucket(length: int) -> int:
    """The power-of-two bucket a prompt length falls in (prompts of similar length are prefilled together)."""
    return 1 << max(0, (length - 1).bit_length())


class Engine:
    """Continuous batching. `submit` and `cancel` are thread-safe; `run` is the scheduler loop (its own thread)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        max_batch_size: int = 32,
        on_step: Callable[[StepStats], None] | None = None,
        seed: int = 0,
        admission_group: int = 1,
        admission_wait_s: float = 0.0,
        kv_cache_tokens: int | None = None,
        observer_errors: ObservabilityErrors | None = None,
        request_ids: Iterator[int] | None = None,
        torch_threads: int | None = None,
        adapters: MixedAdapters | None = None,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        # Newcomers join a running batch `admission_group` at a time, or once the first has waited
        # `admission_wait_s`: each join costs a prefill forward, as dear as a decode step when launches dominate.
        self.admission_group = min(admission_group, max_batch_size)
        self.admission_wait_s = admission_wait_s
        # Requests are admitted while the batch's cache, at its peak, stays within this many tokens (None: no limit).
        self.kv_cache_tokens = kv_cache_tokens
        self.max_context = int(model.config.max_position_embeddings)
        self.eos_token_ids = set(stop_token_ids(tokenizer, model.generation_config))  # EOS and the end of a turn
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.device = next(model.parameters()).device
        self.on_step = on_step
        self.observer_errors = observer_errors or ObservabilityErrors()  # on_step may fail; a request never does
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.adapters = adapters  # a base serving several LoRA adapters decodes each row with its own
        self.model_lock = threading.Lock()  # held by each step: whoever changes the model (adds an adapter) waits
        self.torch_threads = torch_threads  # set on the scheduler thread (OpenMP's thread count is per thread)

        self._ids = request_ids or itertools.count()  # shared by engines on one model, whose ids must not clash
        self._lock = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._admitting: list[list[Sequence]] = []  # taken from the queue, not yet in the batch: groups to prefill
        self._cancelled: set[int] = set()
        self._stopped = False
        self.failure: str | None = None

        # The running batch: one row per sequence, all rows the same (left-padded) cache length.
        self.rows: list[Sequence] = []
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)  # (rows, cache length)
        self.next_tokens = torch.zeros(0, dtype=torch.long, device=self.device)  # sampled, not yet fed
        self.forget_counts()  # requests finished, cancelled and failed; steps, tokens and busy seconds

    # -- API used by other threads ------------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Sink, adapter: str | None = None) -> int:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) + params.max_tokens > self.max_context:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context "
                f"length {self.max_context}"
            )
        if self.kv_cache_tokens is not None and len(prompt_ids) + params.max_tokens > self.kv_cache_tokens:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds this model server's "
                f"KV cache budget of {self.kv_cache_tokens} tokens"
            )
        if adapter is not None and not self.adapters:
            raise ValueError(f"adapter {adapter!r} asked of a model that serves none")
        sequence = Sequence(next(self._ids), list(prompt_ids), params, sink, adapter=adapter)
        with self._lock:
            if self.failure:
                raise RuntimeError(f"the engine has stopped after a failure: {self.failure}")
            self._waiting.append(sequence)
            self._lock.notify()
        return sequence.request_id

    def cancel(self, request_id: int) -> None:
        """Free a request's batch slot at the next iteration (a client went away)."""
        with self._lock:
            self._cancelled.add(request_id)
            self._lock.notify()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify()

    def load(self) -> int:
        """Requests in this engine (running, being admitted, waiting): where `EngineLoops` sends the next one."""
        return len(self.rows) + sum(map(len, self._admitting)) + len(self._waiting)

    def forget_counts(self) -> None:
        """The counters `stats` reports, from zero (a warm-up is not traffic). Between steps (under `model_lock`):
        a step updates them at its end. `tokens` counts every generated token, cancelled requests' too."""
        self.finished = self.cancelled = self.failed = self.steps = self.tokens = 0
        self.busy_seconds = 0.0

    def stats(self) -> dict[str, int]:
        with self._lock:
            waiting = len(self._waiting)
        return {
            "running": len(self.rows),
            "waiting": waiting,
            "finished": self.finished,
            "cancelled": self.cancelled,
            "failed": self.failed,
            "cache_tokens": self.mask.numel(),
            "steps": self.steps,
            "tokens": self.tokens,
            "busy_seconds": self.busy_seconds,
            "observability_errors": self.observer_errors.count,
        }

    def run(self) -> None:
        """The scheduler loop: sleeps while idle, otherwise one `step` after another until `stop`.

        If a step fails (a broken model, out of memory while decoding), every request in the engine ends with finish
        reason "error", later submissions are refused, and `failure` says why: the replica's health check reports
        it, and Serve replaces the replica. Running out of memory while prefilling newcomers fails only them."""
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not (self._stopped or self._waiting or self.rows or self._cancelled):
                        self._lock.wait()
                    stopped = self._stopped
                if stopped:  # what is still waiting or running gets an answer, and nothing more is taken
                    self._fail_all(RuntimeError("the engine was stopped"))
                    return
                try:
                    with self.model_lock:
                        self.step()
                except Exception as err:  # any failure must reach every waiting client
                    self._fail_all(err)
                    return

    def _fail_all(self, err: Exception) -> None:
        with self._lock:
            self.failure = f"{type(err).__name__}: {err}"
            stranded = [*self.rows, *itertools.chain(*self._admitting), *self._waiting]
            self.rows, self._admitting, self._waiting, self.cache = [], [], deque(), None
        self._fail(stranded, self.failure)

    def _fail(self, sequences: list[Sequence], error: str) -> None:
        self.failed += len(sequences)
        for sequence in sequences:
            sequence.sink(Output("", "error", len(sequence.prompt_ids), len(sequence.generated), error))

    # -- the scheduler --------------------------------------------------------------------------------------------

    def step(self) -> None:
        """Decode one token for every running row, then prefill newcomers (their first token), then retire.

        Every row gains exactly one token per step, so `_emit` looks at one new token per row."""
        started = time.perf_counter()
        self._admitting = _group_by_bucket(self._take_admissions())  # a failure must reach them too
        if self.rows:
            self._decode()
        while self._admitting:
            self._admit(self._admitting[0])
            del self._admitting[0]
        new_tokens = len(self.rows)
        self._retire()
        self.steps += 1
        self.tokens += new_tokens
        self.busy_seconds += time.perf_counter() - started
        if self.on_step:
            with self._lock:
                queue_length = len(self._waiting)
            stats = StepStats(new_tokens, queue_length, len(self.rows), self.mask.numel(), new_tokens)
            self.observer_errors.guard(self.on_step, stats)

    def _take_admissions(self) -> list[Sequence]:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            if cancelled:  # the hot path has none to look for
                for sequence in itertools.chain(self.rows, self._waiting):
                    sequence.cancelled = sequence.cancelled or sequence.request_id in cancelled
                kept = [s for s in self._waiting if not s.cancelled]
                self.cancelled += len(self._waiting) - len(kept)
                self._waiting = deque(kept)
            joining = self._fitting()
            if joining <= 0 or (
                self.rows
                and joining < self.admission_group
                and time.monotonic() - self._waiting[0].arrived < self.admission_wait_s
            ):
                return []
            return [self._waiting.popleft() for _ in range(joining)]

    def _fitting(self) -> int:
        """How many waiting requests, in arrival order, fit in the free slots and in the KV cache budget."""
        slots = min(self.max_batch_size - len(self.rows), len(self._waiting))
        if self.kv_cache_tokens is None or slots <= 0:
            return slots
        rows = [(s.length, s.params.max_tokens - len(s.generated)) for s in self.rows]
        for fitting, sequence in enumerate(itertools.islice(self._waiting, slots)):
            rows.append((len(sequence.prompt_ids), sequence.params.max_tokens))
            if peak_cache_tokens(rows) > self.kv_cache_tokens:
                return fitting  # the rest wait for running requests to finish
        return slots

    def _admit(self, group: list[Sequence]) -> None:
        """Prefill newcomers into the batch. Running out of memory fails them alone: the running batch is untouched."""
        try:
            self._prefill(group)
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            logger.warning("out of memory prefilling %d requests: they fail, the rest go on", len(group), exc_info=err)
            self._fail(group, f"the model server ran out of memory for this request ({type(err).__name__})")

    def _prefill(self, group: list[Sequence]) -> None:
        width = max(len(s.prompt_ids) for s in group)
        ids = torch.full((len(group), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, sequence in enumerate(group):
            ids[row, width - len(sequence.prompt_ids) :] = torch.tensor(sequence.prompt_ids)
            mask[row, width - len(sequence.prompt_ids) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        with self._adapters(group):
            logits = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, **FORWARD_OPTIONS
            ).logits[:, -1]
        tokens = self._sample(logits, group)
        self._merge(group, cache, mask, tokens)

    def _merge(self, group: list[Sequence], cache: DynamicCache, mask: torch.Tensor, tokens: torch.Tensor) -> None:
        """Append prefilled rows to the running batch, left-padding whichever side is shorter.

        Each tensor is copied once, into place in one of the merged size. The running batch changes only once all
        are built, so running out of memory here fails the newcomers alone."""
        if self.cache is None or not self.rows:
            self.rows, self.cache, self.mask, self.next_tokens = list(group), cache, mask, tokens
            return
        width = max(self.mask.shape[1], mask.shape[1])
        merged = [
            (stack_right_aligned(old.keys, new.keys, width), stack_right_aligned(old.values, new.values, width))
            for old, new in zip(self.cache.layers, cache.layers, strict=True)
        ]
        mask, tokens = stack_right_aligned(self.mask, mask, width, dim=1), torch.cat([self.next_tokens, tokens])
        self.cache, self.mask, self.next_tokens = DynamicCache(merged, config=self.model.config), mask, tokens
        self.rows.extend(group)

    def _decode(self) -> None:
        """One token for every row: feed the tokens sampled last iteration."""
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        positions = (self.mask.sum(-1, keepdim=True) - 1).clamp(min=0)
        with self._adapters(self.rows):
            logits = self.model(
                input_ids=self.next_tokens[:, None],
                attention_mask=self.mask,
                position_ids=positions,
                past_key_values=self.cache,
                **FORWARD_OPTIONS,
            ).logits[:, -1]
        self.next_tokens = self._sample(logits, self.rows)

    def _adapters(self, rows: list[Sequence]) -> contextlib.AbstractContextManager:
        """The forward inside decodes each row with its own adapter (rows of none take the base)."""
        if not self.adapters:
            return contextlib.nullcontext()
        return self.adapters.rows([s.adapter or BASE_ADAPTER for s in rows])

    def _sample(self, logits: torch.Tensor, rows: list[Sequence]) -> torch.Tensor:
        """Each row's next token under its own sampling params (`sampling.sample`), recorded in its sequence here;
        it is fed to the model next iteration."""
        tokens, logprobs = sample(logits, rows, self.generator)
        for sequence, token, logprob in zip(rows, tokens.tolist(), logprobs, strict=True):
            sequence.generated.append(token)
            if logprob is not None:
                sequence.logprobs.append(logprob)
                sequence.cumulative_logprob += logprob.logprob
        return tokens

    def _retire(self) -> None:
        """Emit new text to every sink; drop finished and cancelled rows from the batch."""
        keep = []
        for row, sequence in enumerate(self.rows):
            finish = "cancelled" if sequence.cancelled else self._emit(sequence)
            if finish is None:
                keep.append(row)
                continue
            if finish == "cancelled":
                self.cancelled += 1
            else:
                self.finished += 1
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache, self.mask, self.next_tokens = None, self.mask[:0, :0], self.next_tokens[:0]
            return
        index = torch.tensor(keep, device=self.device)
        self.mask = self.mask.index_select(0, index)
        self.next_tokens = self.next_tokens.index_select(0, index)
        start = int((self.mask.sum(0) > 0).nonzero()[0])  # columns padded in every remaining row can go
        self.mask = self.mask[:, start:]
        self.cache = DynamicCache(
            [
                (layer.keys.index_select(0, index)[:, :, start:], layer.values.index_select(0, index)[:, :, start:])
                for layer in self.cache.layers
            ],
            config=self.model.config,
        )

    def _emit(self, sequence: Sequence) -> str | None:
        params = sequence.params
        finish = None
        if sequence.generated[-1] in self.eos_token_ids:
            sequence.generated.pop()
            finish = "stop"
        elif len(sequence.generated) >= params.max_tokens or sequence.length >= self.max_context:
            finish = "length"
        self._detokenize(sequence, final=finish is not None)
        if params.stop:
            window = max(0, sequence.emitted_chars - max(len(s) for s in params.stop))
            hits = [i for i in (sequence.text.find(s, window) for s in params.stop) if i >= 0]
            if hits:
                sequence.text = sequence.text[: min(hits)]
                finish = "stop"
        ready = len(sequence.text)
        if finish is None:  # hold back what could still become a stop string
            ready -= max((len(s) - 1 for s in params.stop), default=0)
        delta = sequence.text[sequence.emitted_chars : max(ready, sequence.emitted_chars)]
        sequence.emitted_chars += len(delta)
        sequence.sink(sequence.output(delta, finish))
        return finish

    def _detokenize(self, sequence: Sequence, final: bool) -> None:
        """Incremental detokenization (as vLLM does it): decode only the tokens since the last complete text, with a
        few tokens of left context, and wait while the new tokens end inside a multi-byte character."""
        ids = sequence.generated
        before = self.tokenizer.decode(ids[sequence.prefix_offset : sequence.read_offset], skip_special_tokens=True)
        after = self.tokenizer.decode(ids[sequence.prefix_offset :], skip_special_tokens=True)
        if final or (len(after) > len(before) and not after.endswith("\ufffd")):
            sequence.text += after[len(before) :]
            sequence.prefix_offset, sequence.read_offset = sequence.read_offset, len(ids)


def _group_by_bucket(sequences: list[Sequence]) -> list[list[Sequence]]:
    groups: dict[int, list[Sequence]] = {}
    for sequence in sequences:
        groups.setdefault(bucket(len(sequence.prompt_ids)), []).append(sequence)
    return list(groups.values())
