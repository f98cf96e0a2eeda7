"""Zero-copy reading and streaming writing of safetensors checkpoints.

Reading parses the header ourselves (8-byte little-endian length, JSON, data)
and maps the file with MAP_PRIVATE (`mmap.ACCESS_COPY`): every tensor is a
`torch.frombuffer` view of the mapping, so opening a checkpoint reads only
headers, and a tensor's bytes are read by the kernel the first time a kernel
touches them. Pages are copy-on-write and we never write, so the file is safe.

Writing streams tensors one at a time into shards of a bounded size, hashing
as it writes, into a temporary folder renamed into place at the end: nothing
half-written is ever left under the final name.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import mmap
import os
import re
import shutil
import signal
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch
from torch import Tensor

_log = logging.getLogger("emo.safetensors_io")

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,  # block-scaled FP8 weights (modeling.quant.fp8)
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint file or index that is malformed, truncated or incomplete."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class MappedSafetensors:
    """One `.safetensors` file, header parsed and validated, data memory-mapped."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._fh = open(self.path, "rb")
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open ({e.strerror})") from None
        size = os.fstat(self._fh.fileno()).st_size
        if size < 8:
            raise CheckpointError(f"{self.path}: truncated file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", self._fh.read(8))
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(f"{self.path}: header length {n} does not fit the file size {size}")
        try:
            header = json.loads(self._fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path}: header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        base = 8 + n
        self.tensors: dict[str, TensorInfo] = {}
        for name, meta in header.items():
            try:
                dtype = DTYPES[meta["dtype"]]
                shape = tuple(int(x) for x in meta["shape"])
                b, e = (int(x) for x in meta["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: tensor {name!r} has a malformed header entry {meta!r}") from None
            itemsize = torch.empty((), dtype=dtype).element_size()
            if e < b or (e - b) != math.prod(shape) * itemsize:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} has {e - b} bytes for shape {list(shape)} of {meta['dtype']}")
            if base + e > size:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} ends at byte {base + e} but the file has {size} bytes (truncated?)")
            self.tensors[name] = TensorInfo(name, dtype, shape, base + b, base + e)
        # An empty mapping is not allowed; a file with only empty tensors needs none.
        self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_COPY) if size > base else None
        # One uint8 tensor over the whole mapping; every tensor is a slice of it,
        # so all views share one storage (and adjacent tensors can be joined).
        self._all = torch.frombuffer(self._mm, dtype=torch.uint8) if self._mm is not None else None

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> Tensor:
        """A zero-copy view of tensor `name` (nothing is read until touched)."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: no tensor {name!r}")
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        return self._view(info.start, info.end, info.dtype, info.shape)

    def _view(self, start: int, end: int, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
        try:
            return self._all[start:end].view(dtype).view(shape)
        except RuntimeError:  # offset not aligned to the element size: its own view
            flat = torch.frombuffer(self._mm, dtype=torch.uint8, count=end - start, offset=start)
            return flat.view(dtype).view(shape)

    def address_range(self) -> tuple[int, int] | None:
        """[start, end) of the mapping in this process's address space."""
        if self._all is None:
            return None
        return self._all.data_ptr(), self._all.data_ptr() + self._all.numel()

    def adjacent_view(self, first: str, second: str) -> Tensor | None:
        """One view over two tensors stored back to back with the same dtype and
        trailing shape (e.g. an expert's gate and up projections), else None."""
        a, b = self.tensors.get(first), self.tensors.get(second)
        if a is None or b is None or a.end != b.start or a.dtype != b.dtype or a.shape[1:] != b.shape[1:] or not a.shape:
            return None
        return self._view(a.start, b.end, a.dtype, (a.shape[0] + b.shape[0], *a.shape[1:]))

    def release(self, names: Iterable[str] | None = None) -> None:
        """Drop the resident pages of these tensors (all when None).

        The mapping stays valid; a later touch reads the file again. Used by
        layer-at-a-time passes over checkpoints larger than memory.
        """
        if self._mm is None:
            return
        infos = self.tensors.values() if names is None else [self.tensors[n] for n in names]
        page = mmap.PAGESIZE
        for info in infos:
            start = (info.start // page) * page
            length = info.end - start
            if length > 0:
                self._mm.madvise(mmap.MADV_DONTNEED, start, length)

    def fileno(self) -> int:
        """The descriptor the mapping was made from (open while the file is served:
        a read lease on it is how a server learns that someone writes the file)."""
        return self._fh.fileno()

    def close(self) -> None:
        # Views handed out keep the mapping alive (torch holds the buffer), so
        # only the file handle is closed here.
        self._fh.close()


class CheckpointFiles:
    """All safetensors files of a checkpoint folder: one file, or an index's shards."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        single = self.folder / SINGLE_NAME
        self.files: dict[str, MappedSafetensors] = {}
        self.weight_map: dict[str, str] = {}
        if index.is_file():
            try:
                wm = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                assert isinstance(wm, dict)
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, AssertionError, TypeError):
                raise CheckpointError(f"{index}: not a valid index (needs a 'weight_map' object)") from None
            for fname in sorted(set(wm.values())):
                if Path(fname).name != fname:
                    raise CheckpointError(f"{index}: shard name {fname!r} is not a plain file name")
                if not (self.folder / fname).is_file():
                    raise CheckpointError(f"{index}: shard {fname!r} is missing from {self.folder}")
                self.files[fname] = MappedSafetensors(self.folder / fname)
            for name, fname in wm.items():
                if name not in self.files[fname]:
                    raise CheckpointError(f"{index}: tensor {name!r} is listed in {fname} but not stored there")
                self.weight_map[name] = fname
        elif single.is_file():
            f = MappedSafetensors(single)
            self.files[SINGLE_NAME] = f
            self.weight_map = {n: SINGLE_NAME for n in f.tensors}
        else:
            raise CheckpointError(f"{self.folder}: no {SINGLE_NAME} or {INDEX_NAME}")

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def names(self) -> list[str]:
        return list(self.weight_map)

    def info(self, name: str) -> TensorInfo:
        return self._file(name).tensors[name]

    def get(self, name: str) -> Tensor:
        return self._file(name).get(name)

    def adjacent_view(self, first: str, second: str) -> Tensor | None:
        fa, fb = self.weight_map.get(first), self.weight_map.get(second)
        if fa is None or fa != fb:
            return None
        return self.files[fa].adjacent_view(first, second)

    def file_of(self, name: str) -> Path:
        return self._file(name).path

    def _file(self, name: str) -> MappedSafetensors:
        fname = self.weight_map.get(name)
        if fname is None:
            raise CheckpointError(f"{self.folder}: tensor {name!r} is missing from the checkpoint")
        return self.files[fname]

    def release(self, names: Iterable[str] | None = None) -> None:
        if names is None:
            for f in self.files.values():
                f.release()
            return
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.weight_map[n], []).append(n)
        for fname, ns in by_file.items():
            self.files[fname].release(ns)

    def total_bytes(self) -> int:
        return sum(i.nbytes for f in self.files.values() for i in f.tensors.values())


# -- writing -------------------------------------------------------------------


def _header_entry(t: Tensor, offset: int) -> dict:
    if t.dtype not in DTYPE_NAMES:
        raise CheckpointError(f"cannot store dtype {t.dtype}")
    nbytes = t.numel() * t.element_size()
    return {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}


def _tensor_bytes(t: Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def write_safetensors_file(path: Path, tensors: list[tuple[str, Tensor]], metadata: dict | None = None,
                           on_write=None) -> str:
    """Write one file, streaming tensor by tensor; returns its sha256. `on_write(nbytes)`
    is called after each tensor's bytes are written (progress)."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    off = 0
    for name, t in tensors:
        header[name] = _header_entry(t, off)
        off = header[name]["data_offsets"][1]
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)  # align the data section to 8 bytes
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(hb)), hb):
            f.write(chunk)
            h.update(chunk)
        for _, t in tensors:
            b = _tensor_bytes(t)
            f.write(b)
            h.update(b)
            if on_write is not None:
                on_write(len(b))
    return h.hexdigest()


class ShardedWriter:
    """Streams named tensors into shards of at most `max_shard_bytes`.

    Tensors are grouped in call order; a shard is written as soon as it is full,
    so peak memory is one shard's worth of *references* (views of mapped
    files cost nothing until written). `finish()` writes the index (when there
    is more than one shard) and returns {file name: sha256}.
    """

    def __init__(self, folder: Path, max_shard_bytes: int = 2 * 1024**3, on_flush=None, on_write=None):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        # Called with the names just written, so a caller streaming views of a
        # mapped source can drop those source pages (bounded peak memory).
        self.on_flush = on_flush
        self.on_write = on_write  # called with the bytes of each tensor as it is written (progress)
        self._pending: list[tuple[str, Tensor]] = []
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str], str]] = []  # (tmp name, names, sha)
        self._seen: set[str] = set()

    def add(self, name: str, tensor: Tensor) -> None:
        if name in self._seen:
            raise CheckpointError(f"tensor {name!r} written twice")
        self._seen.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending.append((name, tensor))
        self._pending_bytes += nbytes

    def _flush(self) -> None:
        if not self._pending:
            return
        tmp = f"shard-{len(self._shards):05d}.safetensors"
        sha = write_safetensors_file(self.folder / tmp, self._pending, on_write=self.on_write)
        names = [n for n, _ in self._pending]
        self._shards.append((tmp, names, sha))
        self._pending, self._pending_bytes = [], 0
        if self.on_flush is not None:
            self.on_flush(names)

    def finish(self) -> dict[str, str]:
        self._flush()
        if not self._shards:
            raise CheckpointError("no tensors to write")
        if len(self._shards) == 1:
            tmp, _, sha = self._shards[0]
            os.replace(self.folder / tmp, self.folder / SINGLE_NAME)
            return {SINGLE_NAME: sha}
        n = len(self._shards)
        hashes, weight_map, total = {}, {}, 0
        for i, (tmp, names, sha) in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / tmp, self.folder / final)
            hashes[final] = sha
            for name in names:
                weight_map[name] = final
            total += (self.folder / final).stat().st_size
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2))
        return hashes


@dataclass
class WrittenCheckpoint:
    path: Path
    shard_sha256: dict[str, str]
    total_bytes: int


def make_parents(folder: Path) -> list[Path]:
    """`mkdir -p folder`; returns the folders it created, deepest first (for `remove_created`)."""
    created, p = [], Path(folder)
    while not p.exists() and p != p.parent:
        created.append(p)
        p = p.parent
    Path(folder).mkdir(parents=True, exist_ok=True)
    return created


def remove_created(created: list[Path]) -> None:
    """Remove the folders `make_parents` created, deepest first, while they are empty."""
    for d in created:
        try:
            d.rmdir()
        except OSError:
            break


def _try_lock(path: Path) -> int | None:
    """An open descriptor holding an exclusive flock on folder `path`, or None when a
    live process holds it (or the folder is gone). flock is released by the kernel
    when its holder dies, whatever killed it, so it tells a stale folder from one
    being written (a PID could have been reused)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


class AtomicFolder:
    """A folder written under a temporary name beside `final` and renamed at the end.

    Used as a context manager: on any exception the temporary folder is removed,
    and so are the parent folders this write created, so a failed write leaves
    nothing behind. With `force`, an existing `final` is replaced only once the
    new folder is complete: `final` -> `.NAME.old-PID`, the new folder -> `final`,
    then the old one is removed.

    Crash safety: the writing process holds an flock on the temporary folder (and,
    while replacing, on the old one), so a folder whose lock can be taken belongs
    to a process that died (SIGKILL, power loss). Every new AtomicFolder first
    repairs what such deaths left in the same parent (`recover`): a replacement
    cut between its two renames gets the old folder back under its name, and
    stale temporary and old folders are removed.
    """

    TMP, OLD = ".tmp-", ".old-"
    MARKER = ".emo-atomic-write"  # inside a temporary folder: ours, removed before the final rename

    def __init__(self, final: str | Path, force: bool = False):
        self.final = Path(final)
        self.force = force
        if self.final.parent.is_dir():
            recover(self.final.parent)
        if self.final.exists() and not force:
            raise FileExistsError(f"{self.final} already exists (use --force to replace it)")
        self._created = make_parents(self.final.parent)
        self._fd: int | None = None
        try:
            for _ in range(3):  # a concurrent `recover` may take a folder between mkdtemp and flock
                tmp = Path(tempfile.mkdtemp(prefix=f".{self.final.name}{self.TMP}{os.getpid()}-",
                                            dir=self.final.parent))
                self._fd = _try_lock(tmp)
                if self._fd is not None and tmp.is_dir():
                    (tmp / self.MARKER).touch()
                    self.tmp = tmp
                    break
                if self._fd is not None:
                    os.close(self._fd)
            else:
                raise OSError(f"{self.final.parent}: cannot create a locked temporary folder")
        except BaseException:
            remove_created(self._created)
            raise

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                remove_created(self._created)
                return
            self._commit()
        finally:
            if self._fd is not None:
                os.close(self._fd)

    def _commit(self) -> None:
        os.chmod(self.tmp, 0o755)
        _crash_point("before-rename")
        if not self.final.exists():
            os.replace(self.tmp, self.final)
            (self.final / self.MARKER).unlink()  # (a crash right before this leaves only an empty dotfile)
            return
        if self.final.is_symlink() or not self.final.is_dir():
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise FileExistsError(f"{self.final} exists and is not a folder")
        old_fd = _try_lock(self.final)
        if old_fd is None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise FileExistsError(f"{self.final} is being replaced by another process")
        try:
            old = self.final.with_name(f".{self.final.name}{self.OLD}{os.getpid()}")
            os.replace(self.final, old)  # the lock moves with the folder
            _crash_point("between-renames")
            os.replace(self.tmp, self.final)
            (self.final / self.MARKER).unlink()
            _crash_point("after-renames")
            shutil.rmtree(old, ignore_errors=True)
        finally:
            os.close(old_fd)


_TMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[A-Za-z0-9_]+$")
_OLD_RE = re.compile(r"^\.(?P<name>.+)\.old-(?P<pid>\d+)$")


def recover(parent: str | Path) -> list[str]:
    """Repair what writers killed mid-way left in `parent` (see `AtomicFolder`).

    `.NAME.old-PID` of a dead writer (a checkpoint folder: config.json inside)
    goes back to `NAME` when `NAME` is missing (a `--force` replacement cut
    between its renames: the old folder is complete, the new one may not be),
    else it is removed (the replacement finished). A temporary folder of a dead
    writer (`.NAME.tmp-PID-*` holding our marker file, or empty) is removed. Only
    those exact shapes are touched, so a user's own hidden folders are safe.
    Returns what it did, one line each."""
    parent = Path(parent)
    done: list[str] = []
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        return done
    olds = [d for d in entries if _OLD_RE.match(d.name)]
    tmps = [d for d in entries if _TMP_RE.match(d.name)]
    for d in olds + tmps:  # restore first, so a replacement is undone before its new folder goes
        if d.is_symlink() or not d.is_dir():
            continue
        is_old = d in olds
        if is_old and not (d / "config.json").is_file():
            continue
        if not is_old and not (d / AtomicFolder.MARKER).is_file() and any(d.iterdir()):
            continue
        fd = _try_lock(d)
        if fd is None:
            continue  # a live writer holds it
        try:
            final = parent / (_OLD_RE.match(d.name) if is_old else _TMP_RE.match(d.name))["name"]
            if is_old and not final.exists():
                os.replace(d, final)
                done.append(f"restored {final} from {d.name} (a --force replacement was interrupted)")
            else:
                shutil.rmtree(d, ignore_errors=True)
                done.append(f"removed {d} (left by a writer that died)")
        finally:
            os.close(fd)
    for line in done:
        _log.warning("%s", line)
    return done


def _crash_point(where: str) -> None:
    """Tests of crash safety: `EMO_CRASH_AT=<where>` makes the process kill itself with
    SIGKILL here, which no cleanup code survives (as a power loss or the OOM killer)."""
    if os.environ.get("EMO_CRASH_AT") == where:
        os.kill(os.getpid(), signal.SIGKILL)


def write_checkpoint(
    out_dir: str | Path,
    config: dict,
    tensors: Mapping[str, Tensor] | Iterator[tuple[str, Tensor]],
    extra_files: Mapping[str, str | Path] | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    force: bool = False,
    on_flush=None,
    finish=None,
    on_write=None,
) -> WrittenCheckpoint:
    """Write a loadable checkpoint folder atomically: config.json, shards, extra files.

    `tensors` may be a mapping or a generator of (name, tensor) pairs, so a
    caller can stream views of another mapped checkpoint. `extra_files` maps a
    file name in the output to a source path (tokenizer files). `finish(tmp,
    shard_sha256)` runs last inside the temporary folder (a profile writes its
    manifest there); if it raises, nothing is left behind. `on_write(nbytes)`
    reports tensor bytes as they are written.
    """
    out = Path(out_dir)
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    with AtomicFolder(out, force=force) as tmp:
        writer = ShardedWriter(tmp, max_shard_bytes, on_flush, on_write)
        for name, t in items:
            writer.add(name, t)
        hashes = writer.finish()
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for fname, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / fname)
        total = sum((tmp / f).stat().st_size for f in hashes)
        if finish is not None:
            finish(tmp, hashes)
    return WrittenCheckpoint(out, hashes, total)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()
