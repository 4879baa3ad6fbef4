"""Manifests: what a job committed, with a sha256 of every output file and a root digest over them.

Outputs are published by rename: a job writes into a temp path, then renames
it into place, then replaces its manifest (``write_json_atomic``: temp file,
fsync, rename, fsync the directory). The manifest is the commit record:
readers list files from it, never by globbing, so a file that a killed job
left outside it is never read, and a restarted job knows what is done.

The root digest is ``sha256:`` over the sorted lines ``path NUL sha256 NUL
bytes``: equal roots mean equal outputs, whatever the order files were made.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec

CHUNK = 1024 * 1024
ETL_MANIFEST = "manifest.json"
MODEL_MANIFEST = "manifest.json"
CURRENT_POINTER = "current.json"


class FileDigest(msgspec.Struct, frozen=True, kw_only=True):
    path: str
    """Relative to the directory the manifest describes."""
    sha256: str
    bytes: int


class BatchInput(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    """A landing file name, e.g. ``batch-000003.csv``."""
    sha256: str
    bytes: int


class EtlCommit(msgspec.Struct, frozen=True, kw_only=True):
    seq: int
    path: str
    """``commits/commit-000001``: features under ``features/``, quarantined rows under ``quarantine/``."""
    batches: list[BatchInput]
    rows_in: int
    rows_clean: int
    rows_quarantined: int
    duplicates_dropped: int
    missing_filled: int
    feature_rows: int
    committed_at: float
    files: list[FileDigest]


class EtlManifest(msgspec.Struct, kw_only=True):
    version: int = 1
    commits: list[EtlCommit] = msgspec.field(default_factory=list)
    root: str = ""
    updated_at: float = 0.0

    def batches(self) -> set[str]:
        return {batch.name for commit in self.commits for batch in commit.batches}

    def feature_files(self) -> list[FileDigest]:
        return [f for commit in self.commits for f in commit.files if "/features/" in f.path]


class ModelManifest(msgspec.Struct, frozen=True, kw_only=True):
    version: str
    """``v000003``"""
    run_key: str
    """Digest of the training data's root and the training parameters: the same key, the same model."""
    files: list[FileDigest]
    root: str
    created_at: float


class CurrentPointer(msgspec.Struct, frozen=True, kw_only=True):
    version: str
    root: str
    published_at: float


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def digest_files(base: Path, paths: Iterable[Path]) -> list[FileDigest]:
    """A ``FileDigest`` per file, paths relative to ``base``, sorted."""
    return sorted((FileDigest(path=p.relative_to(base).as_posix(), sha256=sha256_file(p), bytes=p.stat().st_size)
                   for p in paths), key=lambda f: f.path)


def root_digest(files: Iterable[FileDigest]) -> str:
    digest = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.path):
        digest.update(f"{f.path}\0{f.sha256}\0{f.bytes}\n".encode())
    return "sha256:" + digest.hexdigest()


def verify_files(base: Path, files: Iterable[FileDigest]) -> list[str]:
    """What does not match: missing files, other sizes, other digests (empty: all good)."""
    problems = []
    for f in files:
        path = base / f.path
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{f.path}: missing")
            continue
        if size != f.bytes or sha256_file(path) != f.sha256:
            problems.append(f"{f.path}: content differs from the manifest")
    return problems


def write_json_atomic(path: Path, value: Any) -> None:
    """Replace ``path`` with ``value`` as JSON, durably: temp file, fsync, rename, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as out:
        out.write(msgspec.json.format(msgspec.json.encode(value), indent=2) + b"\n")
        out.flush()
        os.fsync(out.fileno())
    tmp.replace(path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_etl_manifest(output: Path) -> EtlManifest:
    """The ETL output's manifest; an empty one when there is none yet."""
    try:
        return msgspec.json.decode((output / ETL_MANIFEST).read_bytes(), type=EtlManifest)
    except FileNotFoundError:
        return EtlManifest()


def read_current(models: Path) -> CurrentPointer | None:
    try:
        return msgspec.json.decode((models / CURRENT_POINTER).read_bytes(), type=CurrentPointer)
    except (FileNotFoundError, msgspec.DecodeError):
        return None


def read_model_manifest(version_dir: Path) -> ModelManifest | None:
    try:
        return msgspec.json.decode((version_dir / MODEL_MANIFEST).read_bytes(), type=ModelManifest)
    except (FileNotFoundError, msgspec.DecodeError):
        return None
