"""Turn a directory of text or source files into sharded Parquet with document ids and a manifest."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema([("doc_id", pa.int64()), ("path", pa.string()), ("text", pa.string())])


@dataclass(frozen=True)
class CorpusManifest:
    source_dir: str
    fingerprint: str  # hash of (path, size, mtime) of every input file: a changed source rebuilds the corpus
    num_docs: int
    num_bytes: int
    shards: list[str]

    @classmethod
    def read(cls, corpus_dir: Path) -> CorpusManifest:
        return cls(**json.loads((corpus_dir / "manifest.json").read_text()))


def list_source_files(source_dir: Path, extensions: list[str], exclude_dirs: list[str], max_files: int | None):
    excluded = set(exclude_dirs)
    files = sorted(
        p
        for p in source_dir.rglob("*")
        if p.suffix in extensions and p.is_file() and not excluded.intersection(p.relative_to(source_dir).parts)
    )
    return files[:max_files] if max_files else files


def _fingerprint(source_dir: Path, files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(source_dir)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def build_corpus(
    source_dir: str | Path,
    out_dir: str | Path,
    extensions: list[str],
    exclude_dirs: list[str] = (),
    max_files: int | None = None,
    docs_per_shard: int = 2000,
) -> CorpusManifest:
    """Write `out_dir/shard-NNNNN.parquet` + `manifest.json`; a no-op when the manifest matches the source."""
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    files = list_source_files(source_dir, extensions, list(exclude_dirs), max_files)
    if not files:
        raise ValueError(f"no files with extensions {extensions} under {source_dir}")
    fingerprint = _fingerprint(source_dir, files)
    if (out_dir / "manifest.json").exists():
        manifest = CorpusManifest.read(out_dir)
        if manifest.fingerprint == fingerprint:
            return manifest

    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("shard-*.parquet"):
        stale.unlink()
    shards, rows, num_docs, num_bytes = [], [], 0, 0

    def flush() -> None:
        name = f"shard-{len(shards):05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), out_dir / name)
        shards.append(name)
        rows.clear()

    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # a few stdlib test files are deliberately not UTF-8
        if not text.strip():
            continue
        rows.append({"doc_id": num_docs, "path": str(path.relative_to(source_dir)), "text": text})
        num_docs += 1
        num_bytes += len(text.encode())
        if len(rows) == docs_per_shard:
            flush()
    if rows:
        flush()
    manifest = CorpusManifest(str(source_dir), fingerprint, num_docs, num_bytes, shards)
    (out_dir / "manifest.json").write_text(json.dumps(asdict(manifest), indent=2))
    return manifest


def iter_texts(corpus_dir: str | Path, batch_size: int = 256) -> Iterator[list[str]]:
    """Documents in doc_id order, in batches (what tokenizer training and packing consume)."""
    corpus_dir = Path(corpus_dir)
    for shard in CorpusManifest.read(corpus_dir).shards:
        for batch in pq.ParquetFile(corpus_dir / shard).iter_batches(batch_size=batch_size, columns=["text"]):
            yield batch.column("text").to_pylist()
