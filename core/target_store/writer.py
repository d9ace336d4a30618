"""StoreWriter: appends one record of teacher targets per iteration, off the training thread.

`append` only copies the tensors to CPU and queues them (bounded: a full queue blocks the caller,
which is the backpressure a slow disk exerts on the teacher); a background thread encodes, writes
the data bytes, then the index record. A failure in that thread is kept and raised by the next
call, never dropped.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import queue
import threading
import time
from bisect import bisect_left
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import torch

from dinodist.core.errors import DinodistError
from dinodist.core.target_store import format as fmt
from dinodist.core.target_store.lock import WriterLock
from dinodist.core.target_store.quant import dtype_name, encode
from dinodist.core.target_store.sizes import FLOAT_ENCODINGS

DEFAULT_SHARD_BYTES = 256 << 20
_ZEROS = bytes(fmt.ALIGN)


def _write_all(fd: int, data: memoryview | bytes) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _atomic_write(path: Path, data: bytes | list[bytes | memoryview]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        for chunk in [data] if isinstance(data, bytes) else data:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _encoded(name: str, t: torch.Tensor, store_dtype: str) -> tuple[str, str, memoryview, memoryview | None]:
    src = dtype_name(t.dtype)
    enc = store_dtype if t.is_floating_point() else "raw"
    data, scales = encode(t, enc)
    return src, enc, data, scales


@dataclass
class _Shard:
    k: int
    data_fd: int
    index_fd: int
    size: int  # bytes in the data file
    last_iteration: int | None = None


class StoreWriter:
    """Writes a target store at `path` (a directory). See docs/target-store.md.

    dtype: how float targets are stored ("bf16", "int8" per-row scaled, or "fp32"); integer
    tensors are stored as they are. retain: keep every iteration (None) or at least the last N:
    whole shards whose newest iteration is older than the window are deleted, so up to one
    shard more than N iterations stays on disk. resume: reopen an existing store with the same
    manifest and append after its last complete record (a torn tail of the final shard is cut off
    first). resume_from (with resume=True): keep only the records of iterations below it and cut
    off the rest, which the resumed teacher recomputes; refused unless the store holds every
    iteration from its first record up to resume_from - 1 (0 empties the store).
    fsync: also fsync data and index (power-loss safety); without it a killed process still
    leaves a readable store, since the index record is written only after its data.
    Only one writer may have a store open (`writer.lock`); a second one raises DinodistError.
    """

    def __init__(
        self,
        path: str | Path,
        manifest: dict,
        dtype: str = "bf16",
        retain: int | None = None,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        async_write: bool = True,
        max_queue: int = 4,
        resume: bool = False,
        fsync: bool = False,
        resume_from: int | None = None,
    ) -> None:
        if dtype not in FLOAT_ENCODINGS:
            raise DinodistError(f"target store: dtype {dtype!r} is not one of {list(FLOAT_ENCODINGS)}")
        if retain is not None and (not isinstance(retain, int) or retain < 1):
            raise DinodistError(f"target store: retain must be a positive int or None, got {retain!r}")
        if shard_bytes < fmt.ALIGN:
            raise DinodistError(f"target store: shard_bytes must be at least {fmt.ALIGN}, got {shard_bytes}")
        if max_queue < 1:
            raise DinodistError(f"target store: max_queue must be at least 1, got {max_queue}")
        if resume_from is not None:
            if not resume:
                raise DinodistError(f"{path}: target store resume_from={resume_from!r} needs resume=True")
            if not isinstance(resume_from, int) or isinstance(resume_from, bool) or resume_from < 0:
                raise DinodistError(
                    f"{path}: target store resume_from must be a non-negative int, got {resume_from!r}"
                )
        self.path = Path(path)
        self.dtype = dtype
        self.retain = retain
        self.shard_bytes = int(shard_bytes)
        self.fsync = fsync
        m = fmt.validate_manifest(manifest, where=f"{self.path}: manifest")
        m.update(format_version=fmt.FORMAT_VERSION, dtype=dtype)
        m.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        self._shards: list[_Shard] = []  # oldest first; the last one is open for appends
        self._last_enqueued: int | None = None
        self._last_written: int | None = None  # newest record on disk: what CLOSED names
        self._first_iteration = 0  # retention deleted every iteration below it: none may come again
        self._error: BaseException | None = None
        self._closed = False
        self._lock = threading.Condition()
        self._pending = 0
        self.stats = {"records": 0, "bytes": 0, "write_seconds": 0.0, "blocked_seconds": 0.0}

        manifest_path = self.path / fmt.MANIFEST_FILE
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DinodistError(f"{self.path}: cannot create target store ({e.strerror})") from e
        # Taken before anything is read or changed: another live writer must not see its records cut.
        self._writer_lock = WriterLock(self.path)
        try:
            if manifest_path.exists():
                if not resume:
                    raise DinodistError(
                        f"{self.path}: target store already exists (resume=True appends to it)"
                    )
                old = _read_json(manifest_path)
                expected = {k: v for k, v in m.items() if k not in ("created",)}
                fmt.check_compatible(old, expected)
                self.manifest = old
                self._recover(resume_from)
            else:
                self._create(m, resume_from)
        except BaseException as e:
            for s in self._shards[-1:]:
                _close_fds(s)
            self._writer_lock.release()
            if isinstance(e, OSError):
                where = e.filename or self.path
                raise DinodistError(f"{where}: cannot open target store ({e.strerror or e})") from e
            raise

        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        if async_write:
            self._queue = queue.Queue(maxsize=max_queue)
            self._thread = threading.Thread(target=self._worker, name="target-store-writer", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------ public

    @property
    def last_iteration(self) -> int | None:
        """Last iteration accepted by `append` (queued or written)."""
        return self._last_enqueued

    def write_last_layers(self, tensors: dict[str, torch.Tensor]) -> None:
        """Store the teacher heads' last layers once (exact dtype, no quantisation), atomically."""
        self._check_error()
        header_room = 0
        encoded = []
        for name, t in tensors.items():
            fmt.check_name(name)
            src = dtype_name(t.dtype)
            data, _ = encode(t, "raw")
            encoded.append((name, src, tuple(t.shape), data))
        chunks: list[memoryview | bytes] = []
        for _, _, _, data in encoded:
            chunks += [data, _ZEROS[: fmt.pad_to(len(data))]]
        dg = fmt.digest(chunks)  # the data bytes do not depend on where the header ends
        # Offsets are absolute in the file: lay the header out with a guessed size, redo if it grew.
        while True:
            entries = []
            start = pos = header_room
            for name, src, shape, data in encoded:
                entries.append(fmt.TensorEntry(name, src, "raw", shape, pos, len(data), 0, 0))
                pos += len(data) + fmt.pad_to(len(data))
            msg = {"start": start, "end": pos, "tensors": [e.to_msg() for e in entries], "digest": dg}
            header = fmt.frame(fmt.pack(msg), fmt.LAST_LAYERS_MAGIC)
            if len(header) <= header_room:
                break
            header_room = len(header) + fmt.pad_to(len(header))
        blob = [header, bytes(header_room - len(header)), *chunks]
        try:
            _atomic_write(self.path / fmt.LAST_LAYERS_FILE, blob)
        except OSError as e:
            raise DinodistError(f"{self.path / fmt.LAST_LAYERS_FILE}: cannot write ({e.strerror})") from e

    def append(self, iteration: int, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
        """Queue one iteration's targets (iterations strictly increase); blocks while the queue is full."""
        self._check_error()
        if self._closed:
            raise DinodistError(f"{self.path}: target store writer is closed")
        if not isinstance(iteration, int) or isinstance(iteration, bool) or iteration < 0:
            raise DinodistError(f"{self.path}: iteration must be a non-negative int, got {iteration!r}")
        if self._last_enqueued is not None and iteration <= self._last_enqueued:
            raise DinodistError(
                f"{self.path}: iteration {iteration} appended after {self._last_enqueued} (must increase)"
            )
        if iteration < self._first_iteration:
            raise DinodistError(
                f"{self.path}: iteration {iteration} is below {self._first_iteration}, where store retention "
                "already deleted the records before it"
            )
        meta = {} if meta is None else meta
        try:
            msgpack.packb(meta, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as e:
            raise DinodistError(
                f"{self.path}: meta of iteration {iteration} is not msgpack-able ({e})"
            ) from e
        copies = {}
        for name, t in tensors.items():
            fmt.check_name(name)
            if not isinstance(t, torch.Tensor):
                raise DinodistError(f"{self.path}: target '{name}' is not a tensor")
            dtype_name(t.dtype)
            # A private CPU copy: the caller may reuse or free its buffers as soon as we return.
            copies[name] = t.detach().to("cpu", copy=True).contiguous()
        self._last_enqueued = iteration
        if self._queue is None:
            self._write_or_keep(iteration, copies, meta)
            self._check_error()
            return
        with self._lock:
            self._pending += 1
        t0 = time.perf_counter()
        while True:
            try:
                self._queue.put((iteration, copies, meta), timeout=0.1)
                break
            except queue.Full:
                if self._error is not None:
                    with self._lock:
                        self._pending -= 1
                    self._check_error()
        self.stats["blocked_seconds"] += time.perf_counter() - t0

    def flush(self) -> None:
        """Wait until every queued record is on disk; raise a background failure if there was one."""
        if self._queue is not None:
            with self._lock:
                while self._pending and self._error is None:
                    self._lock.wait(0.1)
        self._check_error()

    def close(self) -> None:
        """Flush, close the files, and mark the store closed so followers stop cleanly."""
        if self._closed:
            self._check_error()
            return
        try:
            try:
                self.flush()
            finally:
                self._stop()
            # Naming the last iteration lets a reader tell a whole closed store from one that lost
            # records after the close.
            closed = {"last_iteration": self._last_written}
            try:
                _atomic_write(self.path / fmt.CLOSED_FILE, json.dumps(closed).encode())
            except OSError as e:
                raise DinodistError(f"{self.path / fmt.CLOSED_FILE}: cannot write ({e.strerror})") from e
        finally:
            self._writer_lock.release()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.close()
        else:
            # Leave no CLOSED marker: the store ends at its last complete record, like after a crash.
            self._abandon()

    # ------------------------------------------------------------ background

    def _worker(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None:
                self._write_or_keep(*item)
            with self._lock:
                self._pending -= 1
                self._lock.notify_all()

    def _write_or_keep(self, iteration: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        try:
            self._write_record(iteration, tensors, meta)
        except BaseException as e:  # kept for the caller's next call
            self._error = e

    def _check_error(self) -> None:
        e = self._error
        if e is None:
            return
        if isinstance(e, DinodistError):
            raise e
        detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        where = getattr(e, "filename", None) or self.path
        raise DinodistError(f"{where}: target store write failed ({detail})".replace("\n", " ")) from e

    def _write_record(self, iteration: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        t0 = time.perf_counter()
        encoded = [(name, *_encoded(name, t, self.dtype), tuple(t.shape)) for name, t in tensors.items()]
        total = 0
        for _, _, _, data, scales, _ in encoded:
            total += len(data) + fmt.pad_to(len(data))
            if scales is not None:
                total += len(scales) + fmt.pad_to(len(scales))
        shard = self._shards[-1]
        if shard.size > 0 and shard.size + total > self.shard_bytes:
            self._roll()
            shard = self._shards[-1]
        start = pos = shard.size
        entries, chunks = [], []

        def put(buf: memoryview) -> int:
            nonlocal pos
            off = pos
            chunks.append(buf)
            pad = fmt.pad_to(len(buf))
            if pad:
                chunks.append(_ZEROS[:pad])
            pos += len(buf) + pad
            return off

        for name, src, enc, data, scales, shape in encoded:
            off = put(data)
            soff = put(scales) if scales is not None else 0
            entries.append(
                fmt.TensorEntry(
                    name, src, enc, shape, off, len(data), soff, 0 if scales is None else len(scales)
                )
            )
        name = fmt.shard_name(shard.k, "bin")
        try:
            for c in chunks:
                _write_all(shard.data_fd, c)
            shard.size = pos
            if self.fsync:
                os.fsync(shard.data_fd)
            # The index record goes last: until it is complete, readers do not see this iteration.
            payload = fmt.record_payload(iteration, start, pos, entries, meta, fmt.digest(chunks))
            name = fmt.shard_name(shard.k, "idx")
            _write_all(shard.index_fd, fmt.frame(payload))
            if self.fsync:
                os.fsync(shard.index_fd)
        except OSError as e:
            e.filename = e.filename or str(self.path / name)  # os.write errors carry no file name
            raise
        shard.last_iteration = iteration
        self._last_written = iteration
        self.stats["records"] += 1
        self.stats["bytes"] += pos - start
        self.stats["write_seconds"] += time.perf_counter() - t0
        self._apply_retention(iteration)

    # ------------------------------------------------------------ shards

    def _open_shard(self, k: int, data_size: int = 0, index_size: int | None = None) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        data_path = self.path / fmt.shard_name(k, "bin")
        index_path = self.path / fmt.shard_name(k, "idx")
        data_fd = os.open(data_path, flags, 0o644)
        try:
            # The .bin exists before the .idx, so a reader that lists the .idx finds its data file.
            index_fd = os.open(index_path, flags, 0o644)
        except OSError:
            os.close(data_fd)
            raise
        if index_size is not None:
            os.ftruncate(index_fd, index_size)
            os.ftruncate(data_fd, data_size)
        self._shards.append(_Shard(k, data_fd, index_fd, data_size))

    def _roll(self) -> None:
        old = self._shards[-1]
        _close_fds(old)
        self._open_shard(old.k + 1)

    def _apply_retention(self, newest: int) -> None:
        if self.retain is None:
            return
        keep_from = newest - self.retain + 1
        drop: list[_Shard] = []
        while (
            len(self._shards) > 1
            and self._shards[0].last_iteration is not None
            and self._shards[0].last_iteration < keep_from
        ):
            drop.append(self._shards.pop(0))
        if not drop:
            return
        # Recorded before anything is deleted: a reader (or a resume) that then misses these shards
        # knows retention removed them, where a missing shard would otherwise mean lost data.
        self._first_iteration = drop[-1].last_iteration + 1
        self._write_retention(self._shards[0].k)
        for s in drop:
            self._delete_shard(s.k)

    def _write_retention(self, first_shard: int) -> None:
        record = {"first_shard": first_shard, "first_iteration": self._first_iteration}
        _atomic_write(self.path / fmt.RETENTION_FILE, json.dumps(record).encode())

    def _delete_shard(self, k: int) -> None:
        # Index first: a reader listing shards (by index) never meets an index without its data.
        for ext in ("idx", "bin"):
            (self.path / fmt.shard_name(k, ext)).unlink(missing_ok=True)

    def _create(self, manifest: dict, resume_from: int | None) -> None:
        strays = sorted(n for n in os.listdir(self.path) if fmt.SHARD_FILE_RE.match(n))
        if strays:
            # Records without a manifest cannot be checked against this run; appending would mix them in.
            raise DinodistError(
                f"{self.path / strays[0]}: shard file in a directory without {fmt.MANIFEST_FILE}; "
                "not a target store this writer can continue"
            )
        if resume_from:
            raise DinodistError(
                f"{self.path}: cannot resume the target store from iteration {resume_from}: it has no "
                f"{fmt.MANIFEST_FILE} and no records, so iterations 0..{resume_from - 1} would be missing"
            )
        try:
            body = json.dumps(manifest, indent=2, sort_keys=True).encode()
            _atomic_write(self.path / fmt.MANIFEST_FILE, body)
        except OSError as e:
            raise DinodistError(f"{self.path}: cannot create target store ({e.strerror})") from e
        self.manifest = manifest
        self._open_shard(0)

    def _recover(self, resume_from: int | None) -> None:
        """Reopen an existing store: cut the final shard's torn tail (and, with `resume_from`, every
        record from that iteration on), then reopen the last shard for appends."""
        from dinodist.core.target_store.reader import read_record, scan_store  # one scanner for both

        # Raises, naming the shard, on anything but a torn tail of the final shard: nothing is
        # deleted below unless every record before the cut was read.
        sc = scan_store(self.path)
        first_shard, self._first_iteration = sc.first_shard, sc.first_iteration
        shards = list(sc.shards.values())
        its = [it for st in shards for it in st.its]
        cut = None
        if resume_from is not None and not (its and resume_from == its[-1] + 1):
            self._check_resume_point(resume_from, its)
            # The first record at or after resume_from: shard j, record i.
            firsts = ((j, bisect_left(st.its, resume_from)) for j, st in enumerate(shards))
            cut = next(((j, i) for j, i in firsts if i < len(shards[j].its)), None)
        # Every check passed: from here on the store changes. It is being written again, so a
        # follower must not stop at the old marker.
        (self.path / fmt.CLOSED_FILE).unlink(missing_ok=True)
        self._remove_retained_leftovers(first_shard)
        if cut is not None:
            j, i = cut
            # Newest first, so that a crash part-way leaves a store that still reads as a prefix.
            for st in reversed(shards[j + 1 :]):
                self._delete_shard(st.k)
            st = shards[j]
            if i == 0 and j > 0:
                # No record of this shard is kept: drop it and append to the one before, as if the
                # writer had never rolled over.
                self._delete_shard(st.k)
                shards = shards[:j]
            else:
                start = read_record(self.path, st.k, st.pos[i], st.its[i]).start
                st.index_end, st.data_end = st.pos[i], start
                st.last_iteration = st.its[i - 1] if i else None
                shards = shards[: j + 1]
        if resume_from == 0 and self._first_iteration > 0:
            # Starting over: iterations below the old retention point are written again.
            self._first_iteration = 0
            self._write_retention(first_shard)
        if not shards:
            self._open_shard(first_shard)
            return
        for info in shards[:-1]:
            self._shards.append(_Shard(info.k, -1, -1, info.data_end, info.last_iteration))
        last = shards[-1]
        self._open_shard(last.k, data_size=last.data_end, index_size=last.index_end)
        self._shards[-1].last_iteration = last.last_iteration
        kept = [s.last_iteration for s in self._shards if s.last_iteration is not None]
        self._last_enqueued = self._last_written = max(kept) if kept else None

    def _check_resume_point(self, resume_from: int, its: list[int]) -> None:
        """Refuse a resume point that would leave a gap before it (0 always fits: it starts over)."""
        if resume_from == 0:
            return
        first = self._first_iteration
        if resume_from < first:
            raise DinodistError(
                f"{self.path / fmt.RETENTION_FILE}: cannot resume the target store from iteration "
                f"{resume_from}: retention already deleted the iterations before {first} (resume from "
                f"{first} or later, or from 0 to start the store over)"
            )
        # From the first record on disk: a store may start above 0 (or above the retention point) if
        # its writer began there; what must not happen is a hole between that start and resume_from.
        want = its[0] if its else first
        for it in its:
            if it >= resume_from or it != want:
                break
            want += 1
        if want < resume_from:
            held = f"iterations {its[0]}..{its[-1]}" if its else "no records"
            raise DinodistError(
                f"{self.path}: cannot resume the target store from iteration {resume_from}: it lacks "
                f"iteration {want} (it holds {held}), so the records would not be contiguous"
            )

    def _remove_retained_leftovers(self, first_shard: int) -> None:
        # Retention records its deletions before making them: files below its first shard are ones a
        # crash left behind, already invisible to readers.
        for name in sorted(os.listdir(self.path), key=lambda n: not n.endswith(".idx")):
            m = fmt.SHARD_FILE_RE.match(name)
            if m and int(m.group(1)) < first_shard:
                (self.path / name).unlink(missing_ok=True)

    def _stop(self) -> None:
        """End the writer thread and close the open shard's files (what is queued is not waited for)."""
        self._closed = True
        if self._queue is not None:
            self._queue.put(None)
            self._thread.join()
        for s in self._shards[-1:]:
            _close_fds(s)

    def _abandon(self) -> None:
        try:
            self._stop()
        finally:
            self._writer_lock.release()


def _close_fds(s: _Shard) -> None:
    for fd in (s.data_fd, s.index_fd):
        if fd >= 0:
            os.close(fd)
    s.data_fd = s.index_fd = -1


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DinodistError(f"{path}: cannot read target store manifest ({e})") from e
