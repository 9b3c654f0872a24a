"""Where Strata writes things: everything relative is rooted at $STRATA_HOME (default: the working directory).

Under `ray job submit --working-dir .` the working directory is a temporary copy of the checkout, so a job
that should write into a fixed place sets STRATA_HOME (or uses absolute paths / s3:// URIs in its config).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs


def home() -> Path:
    return Path(os.environ.get("STRATA_HOME") or os.getcwd()).expanduser().resolve()


def cache_dir() -> Path:
    """Where each node keeps what it downloaded once and reads again (registered model versions):
    $STRATA_CACHE, else $XDG_CACHE_HOME/strata (~/.cache/strata). Not under $STRATA_HOME, which a job's working
    directory may make a fresh temporary copy each time."""
    configured = os.environ.get("STRATA_CACHE")
    if configured:
        return Path(configured).expanduser().resolve()
    return (Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "strata").expanduser().resolve()


def is_remote(uri: str) -> bool:
    return "://" in uri


def resolve(path: str) -> str:
    """An absolute local path or a remote URI, the same on every Ray worker."""
    if is_remote(path):
        return path
    candidate = Path(path).expanduser()
    return str(candidate if candidate.is_absolute() else home() / candidate)


# -- object storage (s3://, gs://, ...) through pyarrow's file systems: the ones Ray Train writes checkpoints with --


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The file system of a local path or a URI, and the path inside it. S3 takes its endpoint, region and
    credentials from the usual AWS variables (`AWS_ENDPOINT_URL` for an S3-compatible server)."""
    if is_remote(uri):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def read_text(uri: str) -> str:
    """A small file's text; FileNotFoundError when it is not there (yet)."""
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def publish(local_dir: str | Path, uri: str, last: str | None = None) -> None:
    """Copy a directory's files into object storage (or another local directory), replacing what is there. The file
    named `last` is copied after all the others, so that finding it there means the copy is complete."""
    fs, path = filesystem(uri)
    local_dir = Path(local_dir).resolve()
    files = sorted((f for f in local_dir.rglob("*") if f.is_file()), key=lambda f: f.name == last)
    for file in files:
        target = join(path, file.relative_to(local_dir).as_posix())
        fs.create_dir(target.rpartition("/")[0], recursive=True)
        pafs.copy_files(str(file), target, pafs.LocalFileSystem(), fs)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


@contextlib.contextmanager
def fetched(uri: str) -> Iterator[str]:
    """A local path to the directory or file at `uri` for the `with` block: the path itself when local, else a
    private temporary copy, removed afterwards (workers on one node never share, or leave behind, a copy)."""
    if not is_remote(uri):
        yield uri
        return
    fs, path = filesystem(uri)
    with tempfile.TemporaryDirectory(prefix="strata-fetch-") as local:
        if fs.get_file_info(path).type == pafs.FileType.File:
            local = os.path.join(local, os.path.basename(path))
        pafs.copy_files(path, local, fs, pafs.LocalFileSystem())
        yield local
