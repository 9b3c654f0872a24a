"""Supervised fine-tuning data: JSONL or Parquet records, rendered with the chat template, loss on responses only.

A record is either `{"prompt": str, "response": str}` (optionally `"system": str`) or
`{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}` whose last message is the
assistant's answer; only that answer is trained on. Bad records (not JSON, a missing field, an empty
response, longer than `max_seq_len` tokens) are reported by file and line, then skipped or fatal.
"""

from __future__ import annotations

import ast
import hashlib
import json
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from strata.config import ConfigError, SFTDataConfig, stdlib_source_dir
from strata.data.tokenizer import end_of_turn_id
from strata.paths import fetched

SCHEMA_SAMPLE = 100  # records kept for the dataset's schema in MLflow
IGNORE_INDEX = -100  # label value the loss skips (transformers' convention)
ROLES = {"system", "user", "assistant"}


class BadRecordsError(ValueError):
    """Bad records with on_bad_record=error; the message lists them by file and line."""


@dataclass(frozen=True)
class BadRecord:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass
class SFTExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens
    position_ids: list[int] | None = None  # a packed row's: restarting at 0 for every sample; None: 0, 1, ...

    @property
    def loss_tokens(self) -> int:
        """Tokens the loss is taken over: labels shifted by one (a sequence's first token is never predicted)."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


@dataclass
class SFTDataset:
    train: list[SFTExample]
    eval: list[SFTExample]
    bad: list[BadRecord] = field(default_factory=list)
    dataset_hash: str = ""
    source: str = ""
    schema_sample: list[dict] = field(default_factory=list)  # the first records read: their fields, for MLflow


def read_records(path: Path) -> Iterator[tuple[int, dict | str]]:
    """(line number, record) pairs; a line that is not a JSON object comes back as an error string."""
    if path.suffix == ".parquet":
        for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield i, row
        return
    with path.open(encoding="utf-8") as lines:
        for i, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                yield i, f"not valid JSON ({err.msg})"
                continue
            yield i, record if isinstance(record, dict) else "not a JSON object"


def to_messages(record: dict) -> list[dict]:
    """Normalise either record format to chat messages; raises ValueError naming what is wrong."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError("each message needs a 'role' (system/user/assistant) and a string 'content'")
        if messages[-1]["role"] != "assistant":
            raise ValueError("the last message must be the assistant's response")
    else:
        for key in ("prompt", "response"):
            if not isinstance(record.get(key), str):
                raise ValueError(f"missing field {key!r}" if key not in record else f"field {key!r} is not a string")
        messages = [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["response"]},
        ]
        if isinstance(record.get("system"), str):
            messages.insert(0, {"role": "system", "content": record["system"]})
    if not messages[-1]["content"].strip():
        raise ValueError("empty response")
    return messages


def encode(messages: list[dict], tokenizer) -> SFTExample:
    """Prompt (chat template + generation prompt) and response are tokenized apart, so the mask is exact.

    The response is what the model's own template renders after the prompt: the content and whatever closes the
    turn (`<|im_end|>` in ChatML, `<|eot_id|>` in Llama 3), so the model learns to stop where serving stops."""
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(messages, tokenize=False)
    if whole.startswith(prompt):
        response = whole[len(prompt) :]
    else:  # a template that renders earlier turns differently once the reply is there: close the turn ourselves
        closing = end_of_turn_id(tokenizer)
        response = messages[-1]["content"] + (
            tokenizer.eos_token if closing is None else tokenizer.convert_ids_to_tokens(closing)
        )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return SFTExample(prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids)


def is_eval(messages: list[dict], eval_fraction: float) -> bool:
    """A stable split: the same record lands on the same side whatever the file order or size."""
    digest = hashlib.sha1(json.dumps(messages, sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < eval_fraction


def pack(examples: list[SFTExample], max_seq_len: int) -> list[SFTExample]:
    """Greedy packing of whole samples into sequences of at most max_seq_len tokens. Position ids restart at 0
    for each sample, from which the model builds a block-diagonal causal mask: samples never see each other."""
    packed, ids, labels, positions = [], [], [], []
    for ex in examples:
        if ids and len(ids) + len(ex.input_ids) > max_seq_len:
            packed.append(SFTExample(ids, labels, positions))
            ids, labels, positions = [], [], []
        ids, labels = ids + ex.input_ids, labels + ex.labels
        positions = positions + list(range(len(ex.input_ids)))
    if ids:
        packed.append(SFTExample(ids, labels, positions))
    return packed


def load_sft_dataset(cfg: SFTDataConfig, tokenizer) -> SFTDataset:
    source = cfg.train_file or str(build_builtin(cfg))
    train, evaluation, bad, sample = [], [], [], []
    with fetched(source) as local:  # an s3:// file is read from a private local copy, once
        digest = hashlib.sha256(Path(local).read_bytes()).hexdigest()[:16]
        for line, record in read_records(Path(local)):
            if cfg.max_records and len(train) + len(evaluation) >= cfg.max_records:
                break
            if isinstance(record, dict) and len(sample) < SCHEMA_SAMPLE:
                sample.append(record)
            try:
                if isinstance(record, str):
                    raise ValueError(record)
                messages = to_messages(record)
                example = encode(messages, tokenizer)
                if len(example.input_ids) > cfg.max_seq_len:
                    raise ValueError(f"{len(example.input_ids)} tokens, over max_seq_len {cfg.max_seq_len}")
            except ValueError as err:
                bad.append(BadRecord(source, line, str(err)))
                continue
            (evaluation if is_eval(messages, cfg.eval_fraction) else train).append(example)
    if bad and cfg.on_bad_record == "error":
        shown = "\n".join(f"  {b}" for b in bad[:20])
        raise BadRecordsError(f"{len(bad)} bad record(s) in {source} (data.on_bad_record=error):\n{shown}")
    if not train or not evaluation:
        raise ConfigError(
            f"data.train_file {source}: {len(train)} train and {len(evaluation)} eval examples (data.eval_fraction "
            f"{cfg.eval_fraction}, {len(bad)} bad records skipped); need at least one of each"
        )
    if cfg.packing:
        train = pack(train, cfg.max_seq_len)
    return SFTDataset(train, evaluation, bad, digest, source, sample)


def collate(examples: list[SFTExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch to its longest sequence: the model's inputs plus `labels`.

    Packed rows go without a 2-D `attention_mask`: only then does transformers derive the block-diagonal causal
    mask from the restarting position ids (`masking_utils.find_packed_sequence_indices`, for sdpa, eager and
    flex attention alike; flash attention reads the position ids itself). Right padding needs no mask in a
    causal model: no real token comes after it, and its labels are ignored.
    """
    width = max(len(e.input_ids) for e in examples)
    ids = np.full((len(examples), width), pad_id, dtype=np.int64)
    labels = np.full((len(examples), width), IGNORE_INDEX, dtype=np.int64)
    positions = np.tile(np.arange(width, dtype=np.int64), (len(examples), 1))  # padding continues the last sample
    mask = np.zeros((len(examples), width), dtype=np.int64)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[row, :n], labels[row, :n], mask[row, :n] = ex.input_ids, ex.labels, 1
        if ex.position_ids is not None:
            positions[row, :n] = ex.position_ids
            positions[row, n:] = np.arange(width - n) + ex.position_ids[-1] + 1
    batch = {
        "input_ids": torch.from_numpy(ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(positions),
    }
    if all(ex.position_ids is None for ex in examples):
        batch["attention_mask"] = torch.from_numpy(mask)
    return batch


# --- the built-in demo dataset: docstring -> function, from the standard library ---------------------------


def docstring_pairs(source_dir: Path, limit: int, max_chars: int = 600) -> Iterator[dict]:
    """Instruction = a function's signature and docstring summary; response = the function's code."""
    count = 0
    for path in sorted(source_dir.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        lines = source.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_") or node.decorator_list:
                continue
            doc = ast.get_docstring(node)
            code = textwrap.dedent("\n".join(lines[node.lineno - 1 : node.end_lineno]))
            if not doc or len(code) > max_chars:
                continue
            summary = doc.strip().split("\n\n")[0].replace("\n", " ")
            yield {"prompt": f"Write a Python function `{node.name}`: {summary}", "response": code}
            count += 1
            if count == limit:
                return


def build_builtin(cfg: SFTDataConfig, limit: int = 3000) -> Path:
    """Write the built-in dataset as JSONL once (the same format users give), and return its path."""
    from strata.paths import resolve

    path = Path(resolve(cfg.data_dir)) / "sft" / f"{cfg.builtin}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as out:
            for record in docstring_pairs(Path(stdlib_source_dir()), limit):
                out.write(json.dumps(record) + "\n")
        tmp.rename(path)
    return path
