"""Token packing into fixed-length sequences, and the per-step batch schedule with a resumable cursor.

Documents are tokenized, joined with EOS and cut into `seq_len` blocks (no padding, no waste). Training
walks a seeded permutation of the blocks, one *global* batch per optimizer step; each rank takes its
slice of that batch. The cursor counts global sequences consumed, so it is the same on every rank and a
run resumed on a different number of workers continues with exactly the same data.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from strata.data.corpus import CorpusManifest, iter_texts
from strata.data.tokenizer import load_tokenizer
from strata.paths import filesystem, join

ROWS_PER_GROUP = 256  # sequences per Parquet row group: the unit a worker reads


@dataclass(frozen=True)
class PackedManifest:
    corpus_fingerprint: str
    tokenizer_hash: str  # sha256 of tokenizer.json: another tokenizer means another packing
    seq_len: int
    num_sequences: int
    num_tokens: int


def pack_corpus(corpus_dir: str | Path, tokenizer_dir: str | Path, out_dir: str | Path, seq_len: int) -> PackedManifest:
    """Write `out_dir/tokens.parquet` (one fixed-size list column); a no-op when already up to date."""
    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    wanted = dict(
        corpus_fingerprint=CorpusManifest.read(corpus_dir).fingerprint,
        tokenizer_hash=hashlib.sha256((Path(tokenizer_dir) / "tokenizer.json").read_bytes()).hexdigest()[:16],
        seq_len=seq_len,
    )
    manifest_path = out_dir / "manifest.json"
    if manifest_path.exists():
        manifest = PackedManifest(**json.loads(manifest_path.read_text()))
        if all(getattr(manifest, k) == v for k, v in wanted.items()):
            return manifest

    chunks = []
    for texts in iter_texts(corpus_dir):
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            chunks.append(np.asarray(ids + [tokenizer.eos_token_id], dtype=np.int32))
    stream = np.concatenate(chunks)
    num_sequences = len(stream) // seq_len
    if num_sequences == 0:
        raise ValueError(f"corpus has {len(stream)} tokens, fewer than one sequence of {seq_len}")
    blocks = stream[: num_sequences * seq_len]
    column = pa.FixedSizeListArray.from_arrays(pa.array(blocks), seq_len)

    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"input_ids": column}), out_dir / "tokens.parquet", row_group_size=ROWS_PER_GROUP)
    manifest = PackedManifest(**wanted, num_sequences=num_sequences, num_tokens=int(blocks.size))
    manifest_path.write_text(json.dumps(asdict(manifest), indent=2))
    return manifest


def _to_array(column: pa.ChunkedArray) -> np.ndarray:
    column = column.combine_chunks()
    return column.flatten().to_numpy().astype(np.int64).reshape(len(column), -1)


def load_packed(packed_dir: str | Path) -> np.ndarray:
    """All packed sequences as an (N, seq_len) int64 array."""
    return _to_array(pq.read_table(Path(packed_dir) / "tokens.parquet").column("input_ids"))


class PackedSequences:
    """The packed tokens of a local directory or an object-store URI, read one row group at a time: a worker holds
    only the groups its batches touch (at most `cached_groups` of them), so a corpus larger than its memory trains,
    and on a cluster without a shared disk each worker reads straight from s3://."""

    def __init__(self, packed_dir: str, cached_groups: int = 64):
        fs, path = filesystem(join(packed_dir, "tokens.parquet"))
        self._file = pq.ParquetFile(fs.open_input_file(path))
        sizes = [self._file.metadata.row_group(i).num_rows for i in range(self._file.num_row_groups)]
        self._starts = np.cumsum([0, *sizes])
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cached_groups = cached_groups
        self.seq_len = self._file.schema_arrow.field("input_ids").type.list_size

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _group(self, index: int) -> np.ndarray:
        if index in self._cache:
            self._cache.move_to_end(index)
        else:
            self._cache[index] = _to_array(self._file.read_row_group(index, columns=["input_ids"]).column(0))
            if len(self._cache) > self._cached_groups:
                self._cache.popitem(last=False)
        return self._cache[index]

    def take(self, indices: np.ndarray) -> torch.Tensor:
        """The sequences at `indices`, in that order, as an (len(indices), seq_len) int64 tensor."""
        groups = np.searchsorted(self._starts, indices, side="right") - 1
        rows = [self._group(g)[i - self._starts[g]] for g, i in zip(groups, indices, strict=True)]
        return torch.from_numpy(np.stack(rows)) if rows else torch.empty(0, self.seq_len, dtype=torch.int64)


@dataclass
class DataCursor:
    """Where the data stream stands: global sequences consumed. Saved in every checkpoint."""

    epoch: int = 0
    offset: int = 0  # sequences of this epoch's permutation already consumed

    def state_dict(self) -> dict:
        return asdict(self)


class GlobalBatchSchedule:
    """Yields this rank's share of each global batch, in a seeded order that does not depend on world size."""

    def __init__(self, num_sequences: int, global_batch: int, seed: int, cursor: DataCursor | None = None):
        if global_batch > num_sequences:
            raise ValueError(f"global batch {global_batch} exceeds the {num_sequences} packed sequences")
        self.num_sequences = num_sequences
        self.global_batch = global_batch
        self.seed = seed
        self.cursor = cursor or DataCursor()
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, permutation), computed once per epoch

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_sequences))
        return self._order[1]

    def next_indices(self, rank: int, world_size: int) -> np.ndarray:
        """Sequence indices for this rank's part of the next global batch; advances the cursor."""
        if self.cursor.offset + self.global_batch > self.num_sequences:  # drop the ragged tail of an epoch
            self.cursor = DataCursor(epoch=self.cursor.epoch + 1, offset=0)
        start = self.cursor.offset
        batch = self._permutation(self.cursor.epoch)[start : start + self.global_batch]
        self.cursor = DataCursor(self.cursor.epoch, start + self.global_batch)
        return np.array_split(batch, world_size)[rank]
