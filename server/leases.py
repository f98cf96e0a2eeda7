"""Read leases on every mapped checkpoint file: the server learns that another
process is about to truncate or rewrite a file it serves before it happens.

The weights are memory-mapped. If another process truncates a mapped file (or
`cp`s over it, which truncates first), the next read of a page past the new
end raises SIGBUS and the whole process dies; a handler cannot safely resume
Python, and copying the files to private memory would defeat the mapping. A
read lease (`fcntl(F_SETLEASE, F_RDLCK)`) on the descriptor each mapping was
made from closes that window: an `open` for writing or a `truncate` by anyone
else blocks in the kernel, which sends this process SIGIO, and waits until the
lease is released (at most /proc/sys/fs/lease-break-time seconds, 45 by
default; then the kernel breaks it anyway). On that signal the watcher thread
finds which lease is being broken and

1. takes the file's profile out of service (`Registry.file_changing`): its
   expert slots are re-pointed to another mapped source under the model lock
   (after the forward in flight), sequences on it are failed; a file of the
   model itself stops every forward;
2. waits for the engine's step in flight, which may have been scheduled with
   the old pools, to end;
3. releases the lease: the writer goes on, and nothing reads the old pages again.

What leases need: the server must own the files (or hold CAP_LEASE), nobody may
have them open for writing when it starts, and the filesystem must support
them (local ones do; NFS, FUSE and some overlay setups refuse). Where a lease
cannot be taken the server says so at start for that file: then the file must
not be changed in place while it is served (docs/profiles.md).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import threading

log = logging.getLogger("emo_serve.leases")


class FileLeases:
    def __init__(self, registry, engine):
        self.registry, self.engine = registry, engine
        self.held: dict[int, tuple[str, str]] = {}  # fd -> (source folder, file path)
        self.refused: list[tuple[str, str]] = []  # (file, why) where no lease could be taken
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None

    def take(self) -> "FileLeases":
        """Lease every mapped file and start watching. Must run on the main thread
        (it installs the SIGIO handler: SIGIO's default action ends the process)."""
        signal.signal(signal.SIGIO, lambda *_: self._wake.set())
        for source, files in self.registry.model.sources.items():
            for f in files.files.values():
                fd = f.fileno()
                try:
                    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
                except OSError as e:
                    why = {errno.EACCES: "not the file's owner (and no CAP_LEASE)",
                           errno.EAGAIN: "another process has it open for writing",
                           errno.EINVAL: "the filesystem does not support leases"}.get(e.errno, os.strerror(e.errno))
                    self.refused.append((str(f.path), why))
                    log.warning("no read lease on %s (%s): truncating or rewriting it while it is served would "
                                "crash the server (SIGBUS)", f.path, why)
                    continue
                self.held[fd] = (source, str(f.path))
        self._thread = threading.Thread(target=self._watch, name="emo-leases", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop = True
        self._wake.set()

    def _watch(self) -> None:
        while not self._stop:
            # the signal wakes it at once; the poll covers a signal that arrived while busy
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            for fd, (source, path) in list(self.held.items()):
                try:
                    broken = fcntl.fcntl(fd, fcntl.F_GETLEASE) != fcntl.F_RDLCK
                except OSError:
                    broken = True
                if broken:
                    self._give_up(fd, source, path)

    def _give_up(self, fd: int, source: str, path: str) -> None:
        log.error("%s is being truncated or opened for writing by another process: its profile leaves service",
                  path)
        try:
            self.registry.file_changing(source, path)
            self.engine.wait_for_step()  # a step scheduled before the withdrawal has ended
        except Exception:  # whatever failed, the writer must not wait for the kernel's timeout
            log.exception("withdrawing %s failed", path)
        for other, (src, _) in list(self.held.items()):  # the source's other shards go with it
            if src == source:
                try:
                    fcntl.fcntl(other, fcntl.F_SETLEASE, fcntl.F_UNLCK)
                except OSError:
                    pass
                del self.held[other]
