"""A byte-level BPE tokenizer trained locally with `tokenizers`, saved as a transformers tokenizer directory."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from strata.data.corpus import CorpusManifest, iter_texts

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END]

# ChatML, as the Qwen family uses; fine-tuning renders prompt/response pairs and message lists through it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TRAINED_FROM = "trained_from.json"  # beside the tokenizer: the inputs it was trained from


def training_inputs(corpus_dir: str | Path, vocab_size: int) -> dict:
    """Everything a trained tokenizer depends on: the corpus (its manifest's fingerprint), size and settings."""
    return {
        "corpus_fingerprint": CorpusManifest.read(Path(corpus_dir)).fingerprint,
        "vocab_size": vocab_size,
        "model": "byte-level BPE",
        "special_tokens": SPECIAL_TOKENS,
        "chat_template": CHAT_TEMPLATE,
    }


def train_tokenizer(corpus_dir: str | Path, out_dir: str | Path, vocab_size: int) -> PreTrainedTokenizerFast:
    """Train on the corpus and save to `out_dir`; reuses the tokenizer there only if it was trained from the same
    inputs (corpus, vocab size, settings), as recorded in `TRAINED_FROM`."""
    out_dir = Path(out_dir)
    inputs = training_inputs(corpus_dir, vocab_size)
    record = out_dir / TRAINED_FROM
    if (out_dir / "tokenizer.json").exists() and record.exists() and json.loads(record.read_text()) == inputs:
        return load_tokenizer(out_dir)

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknown tokens
        show_progress=True,
    )
    tokenizer.train_from_iterator(iter_texts(corpus_dir), trainer=trainer)

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    record.unlink(missing_ok=True)  # written again last: a tokenizer saved only in part is never reused
    wrapped.save_pretrained(out_dir)
    record.write_text(json.dumps(inputs, indent=2))
    return wrapped


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(str(path))
