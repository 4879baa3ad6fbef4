"""The resync puller: repair this node's replica of a dataset from a peer, chunk by verified chunk.

``DatasetResyncer.resync`` executes one ``wire.ResyncDataset`` command. Per
path, in the order the controller listed them:

- ``fetch``: the file is rebuilt in a new file in its own directory: the
  listed chunks are pulled from the source's HTTP with the transfer token
  (the command's fetch paths are first opened as one transfer, naming this
  node as the puller: ``agent.peer_api``),
  the others are copied from the local file; *every* chunk is checked
  against the authority's hash list as it arrives or is read — the source is
  never trusted, and the answer must come from the authority's root
  (``X-Selfheal-Root``), so a source that changed since it was verified is
  refused. Then: fsync, re-read and verify the whole file, set its mode, keep
  the old file in the quarantine, rename over it atomically, fsync the
  directory. The old file is never written to: anything going wrong before
  the rename — the agent killed included — leaves it as it was.

  The new file is an unnamed ``O_TMPFILE`` inode while it is written, so a
  killed agent leaves nothing behind (the kernel frees it); it gets its name
  ``.<name>.selfheal-resync.tmp`` only once verified, just before the
  rename. Where the filesystem has no ``O_TMPFILE`` it is that named file from
  the start, removed on failure; one a killed agent left is replaced by the
  next attempt. Scans never digest such names (``agent.digests.reading``),
  so a leftover is never taken for data. A transfer is not resumed: the next
  attempt starts over, reusing the local chunks that verify.
- ``delete``: an extra path goes (a file into the quarantine first);
  ``mkdir`` creates a directory; ``chmod`` sets a mode.

Every path is opened beneath the dataset root without following symlinks
(``agent.digests.reading``). Whatever mode a command carries, only the
permission bits (``mode & 0o777``) are ever applied: a repaired file or
directory never gets setuid, setgid or sticky bits (a refused bit is logged
and counted in ``refused``). Chunk answers are read as a stream and dropped
the moment they exceed the chunk's length (at most ``chunk_size``), each
within a deadline (``request_timeout`` plus ``chunk_size`` at
``MIN_CHUNK_RATE``); a ``Content-Encoding`` is refused, so no compressed
answer expands in memory. The source is ``http://`` or
``https://`` (verified against ``security.peer_tls_ca``, else the system
CAs). One resync per dataset at a time; none while the
dataset is being written (a fresh incremental scan must say ``ok`` first),
and the digester is held off while files are swapped. Pulled bytes honour
the dataset's ``read_bandwidth``. Afterwards the dataset is rescanned at once,
so the controller sees the new root without waiting a scan interval.

The quarantine (``<state_dir>/quarantine/<dataset>/``) keeps at most
``QUARANTINE_FILES`` files and ``QUARANTINE_BYTES`` bytes, oldest evicted
first; a replaced file larger than the whole budget is not kept (logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import os
import shutil
import ssl
import stat
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from agent.digests.hashing import Algorithm, algorithm_named, hash_chunk, parse_digest
from agent.digests.reading import (
    RESYNC_TEMP_SUFFIX,
    hash_open_file,
    new_buffer,
    open_beneath,
    read_chunk,
    split_relpath,
)
from agent.digests.scanner import DatasetScanner
from agent.digests.throttle import Throttle
from selfheal.clocks import Clock
from selfheal.logs import get_logger
from selfheal.transfer_tokens import PULLER_HEADER
from selfheal.wire import ResyncDataset, ResyncFile

if TYPE_CHECKING:
    import httpx

Status = Literal["done", "failed"]
TEMP_SUFFIX = RESYNC_TEMP_SUFFIX
QUARANTINE_FILES = 100
QUARANTINE_BYTES = 2 * 1024**3
_WRITE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_TMPFILE = getattr(os, "O_TMPFILE", 0)
"""Linux: open an unnamed file in a directory (0: not available here)."""
_PROC_FD = Path("/proc/self/fd")
PERMISSION_BITS = 0o777
"""The only mode bits a repair applies: never setuid, setgid or sticky."""
MIN_CHUNK_RATE = 64 * 1024
"""Bytes/s a chunk answer must at least arrive at: with ``request_timeout`` it sets each chunk's deadline."""
MAX_ERROR_BODY = 4096
"""Bytes of an error answer read for the failure message."""


class ResyncRefused(Exception):
    """This repair must not go on (a chunk that does not verify, a path that is not plain...)."""


@dataclass
class _Tally:
    pulled_bytes: int = 0
    reused_bytes: int = 0
    paths: list[str] = field(default_factory=list)


class DatasetResyncer:
    def __init__(self, *, scanner: DatasetScanner, state_dir: Path, clock: Clock, node_id: str,
                 transport: httpx.AsyncBaseTransport | None = None, request_timeout: float = 30.0,
                 verify: ssl.SSLContext | bool = True) -> None:
        """``verify``: how an ``https://`` source's certificate is checked (``selfheal.peer_tls``)."""
        self.scanner = scanner
        self.quarantine = state_dir / "quarantine"
        self.clock = clock
        self.node_id = node_id
        self.transport = transport
        self.request_timeout = request_timeout
        self.verify = verify
        self.refused: Counter[str] = Counter()
        """Refused parts of commands by reason (``special_mode_bits``, ``oversized_chunk``)."""
        self._busy: set[str] = set()
        self._throttles = {name: Throttle(view.config.read_bandwidth) for name, view in scanner.views.items()}
        self.log = get_logger("agent.resync", node=node_id)

    async def resync(self, step: ResyncDataset) -> tuple[Status, str]:
        import httpx  # noqa: PLC0415 - a node that never repairs a dataset does not load it

        view = self.scanner.view(step.dataset)
        if view is None:
            return "failed", f"no dataset {step.dataset!r} on this node"
        if step.dataset in self._busy:
            return "failed", f"a resync of {step.dataset} is already running"
        self._busy.add(step.dataset)
        try:
            before = await self.scanner.scan(step.dataset, deep=False)
            if before.state != "ok":
                why = before.error or "being written"
                return "failed", f"{step.dataset} is {before.state} here ({why}): not repaired"
            tally = _Tally()
            try:
                async with view.lock:  # no scan reads the dataset while files are swapped
                    await self._repair(step, view.config.path, tally)
            except (ResyncRefused, OSError, httpx.HTTPError) as exc:
                self.log.warning("resync.failed", dataset=step.dataset, reason=str(exc), done=tally.paths[:20])
                return "failed", f"{step.dataset}: {exc} (repaired before that: {len(tally.paths)} paths)"
            after = await self.scanner.scan(step.dataset, deep=False)
        finally:
            self._busy.discard(step.dataset)
        verdict = ("matches the authority" if after.root == step.expected_root
                   else f"is {after.root or after.state}, not yet the authority's (more commands may follow)")
        self.log.info("resync.done", dataset=step.dataset, paths=len(tally.paths), pulled_bytes=tally.pulled_bytes,
                      reused_bytes=tally.reused_bytes, root=after.root, expected=step.expected_root)
        return "done", (f"repaired {len(tally.paths)} paths of {step.dataset}: pulled {tally.pulled_bytes} bytes, "
                        f"reused {tally.reused_bytes} local bytes; the new root {verdict}")

    async def _repair(self, step: ResyncDataset, root: str, tally: _Tally) -> None:
        import httpx  # noqa: PLC0415

        if urlsplit(step.source_url).scheme not in ("http", "https"):
            raise ResyncRefused(f"the source {step.source_url[:100]!r} is not an http:// or https:// address")
        async with httpx.AsyncClient(base_url=step.source_url, timeout=self.request_timeout,
                                     transport=self.transport, verify=self.verify, follow_redirects=False,
                                     headers={"Authorization": f"Bearer {step.token}",
                                              PULLER_HEADER: self.node_id,
                                              "Accept-Encoding": "identity"}) as client:
            fetches = [item.path for item in step.files if item.action == "fetch"]
            if fetches:
                await self._open_transfer(client, step.dataset, fetches)
            for item in step.files:
                try:
                    parts = split_relpath(item.path)
                except ValueError as exc:
                    raise ResyncRefused(f"{item.path!r}: {exc}") from None
                if not parts:
                    raise ResyncRefused("the dataset root itself cannot be repaired")
                if item.action == "fetch":
                    await self._fetch(client, step, root, parts=parts, item=item, tally=tally)
                else:
                    await asyncio.to_thread(self._apply, step.dataset, root, parts, item,
                                            self._permissions(step.dataset, item))
                tally.paths.append(item.path)

    # --- fetch ----------------------------------------------------------------------------------

    async def _fetch(self, client: httpx.AsyncClient, step: ResyncDataset, root: str, *, parts: tuple[str, ...],
                     item: ResyncFile, tally: _Tally) -> None:
        expected = [parse_digest(h) for h in item.chunk_hashes]
        algs = {alg for alg, _ in expected}
        if len(algs) > 1 or len(expected) != math.ceil(item.size / step.chunk_size):
            raise ResyncRefused(f"{item.path}: {len(expected)} chunk hashes do not describe {item.size} bytes")
        alg = algorithm_named(algs.pop()) if algs else algorithm_named("sha256")
        pulled = set(item.chunks)
        throttle = self._throttles.get(step.dataset) or Throttle(0)
        dfd = await asyncio.to_thread(open_beneath, root, parts[:-1], directory=True)
        name, temp = parts[-1], f".{parts[-1]}{TEMP_SUFFIX}"
        old = await asyncio.to_thread(_open_old, dfd, name)
        out, named = -1, False
        try:
            out, named = await asyncio.to_thread(_create_temp, dfd, temp)
            for index, (_, digest) in enumerate(expected):
                length = min(step.chunk_size, item.size - index * step.chunk_size)
                data = None
                if index not in pulled and old >= 0:
                    data = await asyncio.to_thread(read_chunk, old, index, step.chunk_size)
                    if len(data) != length or await asyncio.to_thread(hash_chunk, alg, data) != digest:
                        data = None  # the local chunk is bad too: pull it after all
                    else:
                        tally.reused_bytes += length
                if data is None:
                    data = await self._pull(client, step, item.path, index=index, length=length, alg=alg,
                                            digest=digest)
                    await asyncio.to_thread(throttle.consume, len(data))
                    tally.pulled_bytes += length
                await asyncio.to_thread(os.pwrite, out, data, index * step.chunk_size)
            await asyncio.to_thread(_finish_temp, out, item, alg, step.chunk_size, [d for _, d in expected],
                                    mode=self._permissions(step.dataset, item))
            if not named:
                named = True  # from here on a failure removes the name (there may be none yet: fine)
                await asyncio.to_thread(_name_temp, out, dfd, temp)
            await asyncio.to_thread(self._swap, step.dataset, dfd, name, temp, item.path)
        except BaseException:
            if named:
                await asyncio.to_thread(_unlink_quietly, dfd, temp)
            raise
        finally:
            for fd in (out, old, dfd):
                if fd >= 0:
                    os.close(fd)

    async def _open_transfer(self, client: httpx.AsyncClient, dataset: str, paths: list[str]) -> None:
        """Open the command's fetches as one transfer: the token must be valid now, not for the whole repair."""
        try:
            async with asyncio.timeout(self.request_timeout):
                async with client.stream("POST", f"/datasets/{dataset}/transfers", json={"paths": paths}) as answer:
                    if answer.status_code != 201:
                        raise ResyncRefused(f"the source refused the transfer: HTTP {answer.status_code} "
                                            f"{await _error_text(answer)}")
        except TimeoutError:
            raise ResyncRefused(f"the source did not open the transfer within {self.request_timeout:g} s") from None

    async def _pull(self, client: httpx.AsyncClient, step: ResyncDataset, path: str, *, index: int, length: int,
                    alg: Algorithm, digest: bytes) -> bytes:
        deadline = self.request_timeout + step.chunk_size / MIN_CHUNK_RATE
        try:
            async with asyncio.timeout(deadline):
                data = await self._pull_bounded(client, step, path, index=index, length=length)
        except TimeoutError:
            raise ResyncRefused(f"{path} chunk {index}: not received within {deadline:g} s") from None
        if len(data) != length or await asyncio.to_thread(hash_chunk, alg, data) != digest:  # off the loop
            raise ResyncRefused(f"{path} chunk {index} from the source does not verify against the authority: "
                                "refused")
        return data

    async def _pull_bounded(self, client: httpx.AsyncClient, step: ResyncDataset, path: str, *, index: int,
                            length: int) -> bytes:
        """Chunk ``index``'s bytes, read as a stream and never more than ``length`` of them."""
        where = f"{path} chunk {index}"
        async with client.stream("GET", f"/datasets/{step.dataset}/chunk",
                                 params={"path": path, "index": str(index)}) as response:
            if response.status_code != 200:
                raise ResyncRefused(f"{where}: the source answered HTTP {response.status_code} "
                                    f"{await _error_text(response)}")
            served_root = response.headers.get("X-Selfheal-Root", "")
            if served_root != step.expected_root:
                raise ResyncRefused(f"{where}: the source serves root {served_root or '?'}, not the "
                                    f"authority's {step.expected_root}: it changed, not used")
            if response.headers.get("Content-Encoding", "identity").lower() != "identity":
                raise ResyncRefused(f"{where}: the source sent an encoded answer: refused")
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > length:
                self._oversized(step.dataset, where, int(declared), length)
            data = bytearray()
            async for piece in response.aiter_bytes():
                data += piece
                if len(data) > length:
                    self._oversized(step.dataset, where, len(data), length)
        return bytes(data)

    def _oversized(self, dataset: str, where: str, size: int, length: int) -> None:
        self.refused["oversized_chunk"] += 1
        self.log.warning("resync.oversized_chunk", dataset=dataset, chunk=where, size=size, expected=length)
        raise ResyncRefused(f"{where}: the source sent more than the chunk's {length} bytes: aborted")

    def _swap(self, dataset: str, dfd: int, name: str, temp: str, path: str) -> None:
        """Keep what stands at ``name`` in the quarantine, then rename the verified temp file over it."""
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            _remove_tree(dfd, name)
        elif st is not None and stat.S_ISREG(st.st_mode):
            self._keep(dataset, dfd, name, path, st.st_size)
        os.rename(temp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        os.fsync(dfd)

    # --- delete, mkdir, chmod -------------------------------------------------------------------

    def _permissions(self, dataset: str, item: ResyncFile) -> int:
        """The mode a fetch, mkdir or chmod applies: the permission bits only, whatever the command says."""
        if item.action != "delete" and item.mode & ~PERMISSION_BITS:
            self.refused["special_mode_bits"] += 1
            self.log.warning("resync.special_mode_bits_refused", dataset=dataset, path=item.path,
                             mode=oct(item.mode), applied=oct(item.mode & PERMISSION_BITS))
        return item.mode & PERMISSION_BITS

    def _apply(self, dataset: str, root: str, parts: tuple[str, ...], item: ResyncFile, mode: int) -> None:
        dfd = open_beneath(root, parts[:-1], directory=True)
        name = parts[-1]
        try:
            if item.action == "delete":
                try:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    return
                if stat.S_ISDIR(st.st_mode):
                    _remove_tree(dfd, name)
                else:
                    if stat.S_ISREG(st.st_mode):
                        self._keep(dataset, dfd, name, item.path, st.st_size)
                    os.unlink(name, dir_fd=dfd)
            elif item.action == "mkdir":
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o700, dir_fd=dfd)
                _chmod_beneath(root, parts, mode)
            else:
                _chmod_beneath(root, parts, mode)
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _keep(self, dataset: str, dfd: int, name: str, path: str, size: int) -> None:
        """A copy of the replaced file in the bounded quarantine (a hard link when on the same filesystem)."""
        if size > QUARANTINE_BYTES:
            self.log.warning("resync.not_quarantined", dataset=dataset, path=path, size=size,
                             reason="larger than the whole quarantine")
            return
        folder = self.quarantine / dataset
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{self.clock.wall():.6f}-{path.replace('/', '%')}"
        try:
            os.link(name, target, src_dir_fd=dfd, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
            src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dfd)
            try:
                with os.fdopen(src, "rb", closefd=False) as reader, target.open("wb") as writer:
                    shutil.copyfileobj(reader, writer, 1024 * 1024)
            finally:
                os.close(src)
        _bound_quarantine(folder)
        self.log.info("resync.quarantined", dataset=dataset, path=path, kept=str(target))


def _open_old(dfd: int, name: str) -> int:
    """The current file at ``name`` for reusing its good chunks, or -1 (absent, not a regular file)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), dir_fd=dfd)
    except OSError:
        return -1
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return -1
    return fd


def _create_temp(dfd: int, temp: str) -> tuple[int, bool]:
    """A new empty file in the directory ``dfd`` for the rebuilt file, and whether it has a name yet.

    Unnamed (``O_TMPFILE``) where the kernel and filesystem allow it and ``/proc`` is there to name it
    afterwards; else ``temp``, truncated (a leftover of a killed attempt is simply reused).
    """
    if _TMPFILE and _PROC_FD.is_dir():
        try:
            return os.open(".", _TMPFILE | os.O_RDWR | getattr(os, "O_CLOEXEC", 0), 0o600, dir_fd=dfd), False
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):  # not on this filesystem
                raise
    return os.open(temp, _WRITE_FLAGS, 0o600, dir_fd=dfd), True


def _name_temp(fd: int, dfd: int, temp: str) -> None:
    """Give the verified unnamed file ``fd`` the name ``temp`` (replacing a leftover), ready for the rename."""
    _unlink_quietly(dfd, temp)
    os.link(_PROC_FD / str(fd), temp, dst_dir_fd=dfd, follow_symlinks=True)


def _finish_temp(fd: int, item: ResyncFile, alg: Algorithm, chunk_size: int, expected: list[bytes], *,
                 mode: int) -> None:
    """fsync, then re-read the whole temp file and check it against the authority before it may replace."""
    os.ftruncate(fd, item.size)
    os.fsync(fd)
    os.lseek(fd, 0, os.SEEK_SET)
    digest = hash_open_file(fd, alg=alg, chunk_size=chunk_size, expected=None, throttle=Throttle(0),
                            abort=threading.Event(), buffer=new_buffer(chunk_size))
    if digest is None or digest.size != item.size or list(digest.chunks) != expected:
        raise ResyncRefused(f"{item.path}: the rebuilt file does not verify as a whole")
    os.fchmod(fd, mode & PERMISSION_BITS)


def _chmod_beneath(root: str, parts: tuple[str, ...], mode: int) -> None:
    try:
        fd = open_beneath(root, parts)
    except OSError as exc:
        if exc.errno != errno.EISDIR:
            raise
        fd = open_beneath(root, parts, directory=True)
    try:
        os.fchmod(fd, mode & PERMISSION_BITS)
    finally:
        os.close(fd)


async def _error_text(response: httpx.Response) -> str:
    """The start of an error answer, read no further than ``MAX_ERROR_BODY`` bytes."""
    text = bytearray()
    async for piece in response.aiter_bytes():
        text += piece
        if len(text) >= MAX_ERROR_BODY:
            break
    return bytes(text[:200]).decode("utf-8", "replace")


def _remove_tree(dfd: int, name: str) -> None:
    shutil.rmtree(name, dir_fd=dfd)


def _unlink_quietly(dfd: int, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dfd)


def _bound_quarantine(folder: Path) -> None:
    kept = sorted(folder.iterdir(), key=lambda p: p.name)  # names start with the time they were kept
    sizes = {p: p.lstat().st_size for p in kept}
    total = sum(sizes.values())
    while kept and (len(kept) > QUARANTINE_FILES or total > QUARANTINE_BYTES):
        victim = kept.pop(0)
        total -= sizes[victim]
        victim.unlink(missing_ok=True)
