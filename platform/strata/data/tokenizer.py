"""A byte-level BPE tokenizer trained locally with `tokenizers`, saved as a transformers tokenizer directory."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from strata.data.corpus import CorpusManifest, iter_texts
from strata.paths import fetched

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
    """From a local directory, or an object-store URI (s3://...) where `prepare_data` published it."""
    with fetched(str(path)) as local:
        return AutoTokenizer.from_pretrained(local)


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The special token the chat template closes an assistant turn with (`<|im_end|>` in ChatML, `<|eot_id|>` in
    Llama 3), found by rendering a turn; None without a chat template or when turns end in plain text."""
    if not tokenizer.chat_template:
        return None
    probe = "Strata end-of-turn probe"
    try:
        turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}]
        rendered = tokenizer.apply_chat_template(turn, tokenize=False)
    except TemplateError:  # a template that insists on other roles: no end-of-turn token to learn
        return None
    after = rendered.partition(probe)[2].lstrip()
    special = {t.content: i for i, t in tokenizer.added_tokens_decoder.items() if t.special and t.content}
    starts = [token for token in special if after.startswith(token)]
    return special[max(starts, key=len)] if starts else None


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, generation_config: Any = None) -> list[int]:
    """Every token that ends generation: EOS, the chat template's end of turn (SFT teaches responses to end with it),
    and whatever the model's generation config already stops at."""
    configured = getattr(generation_config, "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    ids = [*configured, tokenizer.eos_token_id, end_of_turn_id(tokenizer)]
    return list(dict.fromkeys(i for i in ids if i is not None))


def token_bytes(tokenizer: PreTrainedTokenizerBase) -> Callable[[int], bytes]:
    """Each token's exact bytes (a token may end inside a multi-byte character). Byte-level BPE tokens (GPT-2, Qwen,
    Strata's own) map back through the byte alphabet; other tokenizers' pieces are decoded."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    byte_level = isinstance(decoder, decoders.ByteLevel)
    alphabet = {char: byte for byte, char in bytes_to_unicode().items()} if byte_level else {}

    @functools.cache
    def of(token: int) -> bytes:
        piece = tokenizer.convert_ids_to_tokens(token)
        if alphabet and all(char in alphabet for char in piece):
            return bytes(alphabet[char] for char in piece)
        return tokenizer.decode([token]).encode()

    return of
