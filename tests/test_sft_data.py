"""Supervised fine-tuning data: both record formats, prompt masking, packing, and bad records by file:line."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from strata.config import SFTDataConfig
from strata.data.sft import IGNORE_INDEX, BadRecordsError, collate, load_sft_dataset, pack
from strata.data.tokenizer import load_tokenizer
from strata.models.presets import build_model
from strata.train.sft_loop import forward_batch

GOOD = [{"prompt": f"Write function number {i}", "response": f"def f{i}():\n    return {i}\n"} for i in range(40)]


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def tokenizer(small_data):
    return load_tokenizer(small_data[1].tokenizer_dir)


def test_prompt_tokens_are_masked_and_response_is_learned(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", GOOD)
    ds = load_sft_dataset(SFTDataConfig(train_file=str(path), eval_fraction=0.2), tokenizer)
    assert len(ds.train) + len(ds.eval) == 40 and ds.eval and not ds.bad
    example = ds.train[0]
    first_learned = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    prompt = tokenizer.decode(example.input_ids[:first_learned])
    assert prompt.startswith("<|im_start|>user\nWrite function number") and prompt.endswith("<|im_start|>assistant\n")
    learned = tokenizer.decode(example.labels[first_learned:])
    assert learned.startswith("def f") and learned.endswith("<|im_end|>\n")  # the model learns to stop


LLAMA3_TEMPLATE = (
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@pytest.mark.parametrize("generation_prompt", ["as rendered", "differs"])
def test_a_base_with_another_chat_template_learns_its_own_end_of_turn(tmp_path, small_data, generation_prompt):
    """A model from elsewhere (Llama 3's template) learns to end a response with its own end-of-turn token,
    the one serving stops at, not ChatML's <|im_end|> as text; also where the generation prompt is not the
    start of the rendered turn (then the turn is closed with that token directly)."""
    from strata.data.sft import encode

    tokenizer = load_tokenizer(small_data[1].tokenizer_dir)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
    )
    tokenizer.chat_template = LLAMA3_TEMPLATE
    if generation_prompt == "differs":
        tokenizer.chat_template = LLAMA3_TEMPLATE.replace("assistant<|end_header_id|>", "reply<|end_header_id|>")
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    example = encode([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "def f(): pass"}], tokenizer)
    learned = [label for label in example.labels if label != IGNORE_INDEX]
    assert learned[-1] == eot and "<|im_end|>" not in tokenizer.decode(learned)
    assert tokenizer.decode(learned[:-1]) == "def f(): pass"


def test_messages_records_and_parquet_files(tmp_path, tokenizer):
    records = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"Q{i}"},
                {"role": "assistant", "content": f"A{i}"},
            ]
        }
        for i in range(30)
    ]
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(records), path)
    ds = load_sft_dataset(SFTDataConfig(train_file=str(path), eval_fraction=0.3), tokenizer)
    assert len(ds.train) + len(ds.eval) == 30 and not ds.bad
    text = tokenizer.decode(ds.train[0].input_ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ")


def test_split_is_stable_and_hash_names_the_data(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", GOOD)
    a = load_sft_dataset(SFTDataConfig(train_file=str(path)), tokenizer)
    reversed_path = write_jsonl(tmp_path / "r.jsonl", list(reversed(GOOD)))
    b = load_sft_dataset(SFTDataConfig(train_file=str(reversed_path)), tokenizer)
    as_set = lambda xs: sorted(tuple(x.input_ids) for x in xs)  # noqa: E731
    assert as_set(a.eval) == as_set(b.eval)
    assert a.dataset_hash != b.dataset_hash


def test_bad_records_are_reported_by_file_and_line_then_skipped_or_fatal(tmp_path, tokenizer):
    lines = [
        GOOD[0],
        "{not json",
        {"prompt": "no response here"},
        {"prompt": "empty", "response": "   "},
        {"prompt": "long", "response": "x = 1\n" * 400},
        {"messages": [{"role": "user", "content": "no answer"}]},
        *GOOD[1:30],
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    ds = load_sft_dataset(SFTDataConfig(train_file=str(path), max_seq_len=128), tokenizer)
    assert [(b.line, b.reason.split(" (")[0]) for b in ds.bad] == [
        (2, "not valid JSON"),
        (3, "missing field 'response'"),
        (4, "empty response"),
        (5, ds.bad[3].reason),
        (6, "the last message must be the assistant's response"),
    ]
    assert "over max_seq_len 128" in ds.bad[3].reason
    assert str(ds.bad[0]).startswith(f"{path}:2: ")
    assert len(ds.train) + len(ds.eval) == 30  # every good record kept

    with pytest.raises(BadRecordsError) as err:
        load_sft_dataset(SFTDataConfig(train_file=str(path), max_seq_len=128, on_bad_record="error"), tokenizer)
    assert f"{path}:3: missing field 'response'" in str(err.value) and "5 bad record(s)" in str(err.value)


def test_packing_keeps_per_sample_masks_and_fits_max_len(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", GOOD)
    plain = load_sft_dataset(SFTDataConfig(train_file=str(path), max_seq_len=64), tokenizer)
    packed = pack(plain.train, 64)
    assert len(packed) < len(plain.train)
    assert all(len(p.input_ids) <= 64 for p in packed)
    learned = lambda xs: sum(sum(label != IGNORE_INDEX for label in x.labels) for x in xs)  # noqa: E731
    assert learned(packed) == learned(plain.train)


def test_a_packed_sample_sees_only_itself(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", GOOD)
    cfg = SFTDataConfig(train_file=str(path), max_seq_len=96, packing=True)
    packed = load_sft_dataset(cfg, tokenizer).train
    alone = load_sft_dataset(cfg.model_copy(update={"packing": False}), tokenizer).train
    assert packed[0].position_ids.count(0) >= 2 and len(packed[0].input_ids) != len(packed[1].input_ids)
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
    model = build_model("tiny", len(tokenizer), special, seed=0).eval()

    def logits(examples):
        with torch.no_grad():
            return forward_batch(model, collate(examples, tokenizer.pad_token_id)).logits

    rows = logits(packed[:2])  # two packed rows in one micro-batch: the shorter one is right-padded
    samples = iter(alone)  # packing keeps the order of the samples
    for row, example in zip(rows, packed[:2], strict=True):
        start = 0
        for _ in range(example.position_ids.count(0)):
            sample = next(samples)
            end = start + len(sample.input_ids)
            assert example.input_ids[start:end] == sample.input_ids
            torch.testing.assert_close(row[start:end], logits([sample])[0], rtol=1e-4, atol=1e-4)
            start = end


def test_collate_pads_right_and_masks_padding(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", GOOD)
    ds = load_sft_dataset(SFTDataConfig(train_file=str(path)), tokenizer)
    batch = collate(ds.train[:3], tokenizer.pad_token_id)
    lengths = [len(e.input_ids) for e in ds.train[:3]]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_missing_or_wrong_data_file_is_a_config_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        SFTDataConfig(train_file=str(tmp_path / "nope.jsonl"))
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"\.jsonl or \.parquet"):
        SFTDataConfig(train_file=str(tmp_path / "d.csv"))


def test_finetune_cli_stops_on_bad_records_with_file_and_line(tmp_path, tiny_base, capsys):
    from strata.cli import main

    data = write_jsonl(tmp_path / "bad.jsonl", [*GOOD[:20], {"prompt": "no response"}])
    config = tmp_path / "ft.yaml"
    config.write_text(f"base_model: {tiny_base}\ndata: {{train_file: {data}, on_bad_record: error}}\n")
    assert main(["finetune", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{data}:21: missing field 'response'" in err.replace("\n", "")


def test_finetune_cli_refuses_data_with_no_eval_split_naming_the_fields(tmp_path, tiny_base, capsys):
    """Two records both on the train side: a CLI error naming the file and `data.eval_fraction`, no traceback."""
    from strata.cli import main

    data = write_jsonl(tmp_path / "two.jsonl", GOOD[:2])
    config = tmp_path / "ft.yaml"
    config.write_text(f"base_model: {tiny_base}\ndata: {{train_file: {data}, eval_fraction: 0.01}}\n")
    assert main(["finetune", "--config", str(config)]) == 2
    unwrapped = "".join(capsys.readouterr().err.split())  # the console wraps lines at its width
    assert "".join(f"data.train_file {data}: 2 train and 0 eval examples (data.eval_fraction 0.01".split()) in unwrapped
