"""Corpus, tokenizer and packing: round trips, caching, and a data cursor that resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from strata.config import DataConfig
from strata.data.corpus import CorpusManifest, build_corpus, iter_texts
from strata.data.packing import ROWS_PER_GROUP, DataCursor, GlobalBatchSchedule, PackedSequences, load_packed
from strata.data.prepare import prepare_data
from strata.data.tokenizer import BOS, EOS, PAD, load_tokenizer, train_tokenizer

SOURCE = "def gr\u00fc\u00dfe(name: str) -> str:\n    return f'Hallo, {name}! \u2603'\n\n\tx = [1, 2]  # tabs\n"


def make_tree(root):
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "pkg" / "a.py").write_text("print('a')\n")
    (root / "pkg" / "sub" / "b.py").write_text("print('b')\n")
    (root / "pkg" / "notes.txt").write_text("not python\n")
    (root / "pkg" / "empty.py").write_text("   \n")
    (root / "site-packages").mkdir()
    (root / "site-packages" / "c.py").write_text("print('c')\n")
    return root


def test_corpus_shards_ids_manifest_and_cache(tmp_path):
    source = make_tree(tmp_path / "src")
    out = tmp_path / "corpus"
    manifest = build_corpus(source, out, [".py"], ["site-packages"], docs_per_shard=1)
    assert manifest.num_docs == 2  # the blank file and the excluded dir are skipped
    assert manifest.shards == ["shard-00000.parquet", "shard-00001.parquet"]
    rows = [r for s in manifest.shards for r in pq.read_table(out / s).to_pylist()]
    assert [(r["doc_id"], r["path"]) for r in rows] == [(0, "pkg/a.py"), (1, "pkg/sub/b.py")]
    assert json.loads((out / "manifest.json").read_text())["num_docs"] == 2

    mtime = (out / "shard-00000.parquet").stat().st_mtime_ns
    assert build_corpus(source, out, [".py"], ["site-packages"], docs_per_shard=1) == manifest
    assert (out / "shard-00000.parquet").stat().st_mtime_ns == mtime  # unchanged source: not rewritten

    (source / "pkg" / "new.py").write_text("print('new')\n")
    rebuilt = build_corpus(source, out, [".py"], ["site-packages"], docs_per_shard=1)
    assert rebuilt.num_docs == 3 and rebuilt.fingerprint != manifest.fingerprint
    assert CorpusManifest.read(out) == rebuilt


def test_empty_source_is_a_clear_error(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(ValueError, match="no files with extensions"):
        build_corpus(tmp_path / "src", tmp_path / "out", [".py"])


def test_tokenizer_round_trips_source_and_has_specials_and_chat_template(small_data):
    cfg, prepared = small_data
    tokenizer = load_tokenizer(prepared.tokenizer_dir)
    assert len(tokenizer) == cfg.vocab_size
    ids = tokenizer(SOURCE, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == SOURCE  # byte-level: exact, no unknown tokens, whitespace kept
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (BOS, EOS, PAD)
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # Compression: trained BPE beats one token per byte on code by a wide margin.
    text = next(iter_texts(prepared.corpus_dir))[0]
    assert len(tokenizer(text)["input_ids"]) < 0.5 * len(text.encode())


def test_packing_is_dense_and_documents_are_eos_separated(small_data):
    cfg, prepared = small_data
    packed = load_packed(prepared.packed_dir)
    assert packed.shape == (prepared.packed.num_sequences, cfg.seq_len)
    tokenizer = load_tokenizer(prepared.tokenizer_dir)
    assert (packed == tokenizer.eos_token_id).sum() >= cfg.max_files - 5  # one EOS per document
    assert (packed != tokenizer.pad_token_id).all()  # packing wastes nothing on padding


def test_streamed_reads_match_the_whole_set_and_hold_a_bounded_number_of_row_groups(small_data):
    _, prepared = small_data
    whole = load_packed(prepared.packed_dir)
    assert len(whole) > 3 * ROWS_PER_GROUP  # several row groups, so the reads below cross them
    streamed = PackedSequences(prepared.packed_dir, cached_groups=2)
    assert (len(streamed), streamed.seq_len) == whole.shape
    indices = np.random.default_rng(0).permutation(len(whole))[:100]
    np.testing.assert_array_equal(streamed.take(indices).numpy(), whole[indices])
    assert len(streamed._cache) == 2  # least recently used groups are dropped


def test_schedule_covers_each_epoch_once_and_splits_global_batches_across_ranks():
    schedule = GlobalBatchSchedule(num_sequences=20, global_batch=4, seed=1)
    seen = []
    for _ in range(5):  # 5 x 4 = one epoch
        parts = [
            GlobalBatchSchedule(20, 4, 1, DataCursor(**schedule.cursor.state_dict())).next_indices(r, 2)
            for r in range(2)
        ]
        whole = schedule.next_indices(0, 1)
        np.testing.assert_array_equal(np.concatenate(parts), whole)  # ranks split the same global batch
        seen.extend(whole)
    assert sorted(seen) == list(range(20))
    assert schedule.cursor == DataCursor(epoch=0, offset=20)
    schedule.next_indices(0, 1)
    assert schedule.cursor == DataCursor(epoch=1, offset=4)


def test_schedule_resumed_from_cursor_continues_exactly():
    straight = GlobalBatchSchedule(100, 8, seed=7)
    expected = [straight.next_indices(0, 1) for _ in range(30)]
    first = GlobalBatchSchedule(100, 8, seed=7)
    got = [first.next_indices(0, 1) for _ in range(11)]
    resumed = GlobalBatchSchedule(100, 8, seed=7, cursor=DataCursor(**first.cursor.state_dict()))
    got += [resumed.next_indices(0, 1) for _ in range(19)]
    for a, b in zip(expected, got, strict=False):
        np.testing.assert_array_equal(a, b)


def test_tokenizer_and_packing_are_rebuilt_when_the_corpus_changes(tmp_path):
    def prepare(max_files: int):
        return prepare_data(DataConfig(data_dir=str(tmp_path), max_files=max_files, vocab_size=512, seq_len=32))

    first = prepare(max_files=20)
    tokenizer_json = Path(first.tokenizer_dir) / "tokenizer.json"
    trained_on_20 = tokenizer_json.read_bytes()
    assert len(load_tokenizer(first.tokenizer_dir)) == 512  # the size alone cannot tell the two corpora apart
    mtime = tokenizer_json.stat().st_mtime_ns
    assert prepare(max_files=20).packed == first.packed and tokenizer_json.stat().st_mtime_ns == mtime  # reused

    changed = prepare(max_files=40)  # same vocab_size, another corpus
    corpus = CorpusManifest.read(Path(changed.corpus_dir))
    assert tokenizer_json.read_bytes() != trained_on_20
    fresh = train_tokenizer(changed.corpus_dir, tmp_path / "fresh", 512)
    assert load_tokenizer(changed.tokenizer_dir).get_vocab() == fresh.get_vocab()
    assert changed.packed.corpus_fingerprint == corpus.fingerprint != first.packed.corpus_fingerprint
    assert changed.packed.tokenizer_hash != first.packed.tokenizer_hash  # packed again with the new tokenizer
