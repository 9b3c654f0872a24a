"""Corpus -> tokenizer -> packed sequences for a DataConfig, each step skipped when already up to date."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from strata.config import DataConfig
from strata.data.corpus import build_corpus
from strata.data.packing import PackedManifest, pack_corpus
from strata.data.tokenizer import train_tokenizer
from strata.paths import join, publish, read_text


@dataclass(frozen=True)
class PreparedData:
    corpus_dir: str
    tokenizer_dir: str
    packed_dir: str
    packed: PackedManifest
    # Where workers read them: the local directories, or their published copies in object storage.
    worker_tokenizer_dir: str
    worker_packed_dir: str


def prepare_data(cfg: DataConfig, console: Console | None = None) -> PreparedData:
    console = console or Console(stderr=True)
    root = cfg.root
    with console.status(f"corpus from {cfg.source_dir}"):
        corpus = build_corpus(
            cfg.source_dir,
            root / "corpus",
            cfg.extensions,
            cfg.exclude_dirs,
            cfg.max_files,
            cfg.docs_per_shard,
        )
    console.print(f"corpus: {corpus.num_docs} documents, {corpus.num_bytes / 1e6:.1f} MB -> {root / 'corpus'}")
    tokenizer_dir = Path(cfg.tokenizer) if cfg.tokenizer else root / "tokenizer"
    if not cfg.tokenizer:
        with console.status(f"training a {cfg.vocab_size}-token byte-level BPE tokenizer"):
            train_tokenizer(root / "corpus", tokenizer_dir, cfg.vocab_size)
    console.print(f"tokenizer: {tokenizer_dir}")
    packed_dir = root / f"packed-{cfg.seq_len}"
    with console.status("tokenizing and packing"):
        packed = pack_corpus(root / "corpus", tokenizer_dir, packed_dir, cfg.seq_len)
    console.print(f"packed: {packed.num_sequences} sequences of {cfg.seq_len} tokens -> {packed_dir}")
    worker_tokenizer_dir, worker_packed_dir = str(tokenizer_dir), str(packed_dir)
    if cfg.publish_to:
        worker_tokenizer_dir = join(cfg.publish_to, cfg.name, "tokenizer")
        worker_packed_dir = join(cfg.publish_to, cfg.name, packed_dir.name)
        with console.status(f"publishing to {cfg.publish_to}/{cfg.name}"):
            publish_once(tokenizer_dir, worker_tokenizer_dir, "tokenizer.json")
            publish_once(packed_dir, worker_packed_dir, "manifest.json")
        console.print(f"published for workers: {worker_tokenizer_dir}, {worker_packed_dir}")
    return PreparedData(
        str(root / "corpus"), str(tokenizer_dir), str(packed_dir), packed, worker_tokenizer_dir, worker_packed_dir
    )


def publish_once(local_dir: Path, uri: str, identity: str) -> None:
    """Upload `local_dir` unless the copy at `uri` already holds the same `identity` file (copied last)."""
    try:
        if read_text(join(uri, identity)) == (local_dir / identity).read_text():
            return
    except FileNotFoundError:
        pass
    publish(local_dir, uri, last=identity)
