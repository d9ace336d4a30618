"""StoreReader: random access to, and live tailing of, a target store.

Only complete records are visible: an index record of the final shard that is short, or whose data
runs past the end of its .bin file, ends the store (for now, in follow mode); in any other shard it
is damage and raises. Every read checks the record's blake2b digest before decoding.
"""

from __future__ import annotations

import json
import os
import time
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dinodist.core.errors import DinodistError
from dinodist.core.target_store import format as fmt
from dinodist.core.target_store.quant import decode
from dinodist.core.target_store.sizes import FLOAT_DTYPES


@dataclass
class ShardScan:
    """How far one shard's index has been read, and where its records are.

    Records are kept as two int arrays (iteration, frame position in the .idx) rather than parsed
    objects: a follower of a million-iteration store must not hold every record's meta in memory.
    """

    k: int
    index_end: int = 0  # bytes of the .idx that are complete records
    data_end: int = 0  # end of the last complete record's data in the .bin
    last_iteration: int | None = None
    torn: bool = False  # the .idx (or .bin) ends inside a record
    done: bool = False  # a later shard exists, so this one will not grow
    its: array = field(default_factory=lambda: array("q"))
    pos: array = field(default_factory=lambda: array("q"))


def list_shards(path: Path) -> list[int]:
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for n in names if (m := fmt.SHARD_RE.match(n)))


class _Scanner:
    """Incremental scan of the shard indexes: each call reads only the bytes added since the last.

    Only the final shard may end in a torn record (a crash mid-write). Anything else that is not a
    complete record (a torn or truncated shard below the final one, a shard missing from the
    numbering that retention did not delete, an index that shrank) raises DinodistError naming the
    file: treating it as the end of the store would silently drop the later shards.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.shards: dict[int, ShardScan] = {}
        self.last_iteration: int | None = None
        self.first_shard = 0  # retention deleted the shards below this one ...
        self.first_iteration = 0  # ... and with them every iteration below this one

    def refresh(self) -> int:
        """Scan for new complete records; returns how many were found."""
        new = 0
        # Listing before reading the retention record, which retention writes before it deletes:
        # a shard missing from this listing but not below the record's first shard was lost.
        # Listing before parsing, too: every shard below the highest listed one is already finished.
        listed = list_shards(self.path)
        self.first_shard, self.first_iteration = fmt.read_retention(self.path)
        for k in list(self.shards):
            if k < self.first_shard:
                del self.shards[k]
            elif k not in listed:
                raise DinodistError(
                    f"{self.path / fmt.shard_name(k, 'idx')}: removed while the store was being read, and "
                    "not by retention (a writer resumed the store from an earlier iteration?)"
                )
        kept = [k for k in listed if k >= self.first_shard]
        for want, k in enumerate(kept, start=self.first_shard):
            if k != want:
                raise self._missing(want)
        for i, k in enumerate(kept):
            st = self.shards.setdefault(k, ShardScan(k))
            if st.done:
                continue
            final = i == len(kept) - 1
            found = self._parse(st, final)
            if found < 0:
                # Gone between listing and reading: fine only if retention deleted it meanwhile.
                self.first_shard, self.first_iteration = fmt.read_retention(self.path)
                if k < self.first_shard:
                    del self.shards[k]
                    continue
                raise self._missing(k)
            new += found
            if not final:
                st.done = True
        return new

    def _missing(self, k: int) -> DinodistError:
        kept = (f"retention deleted only the shards below {self.first_shard}" if self.first_shard
                else "retention deleted no shard")
        return DinodistError(f"{self.path / fmt.shard_name(k, 'idx')}: shard {k} is missing ({kept})")

    def _parse(self, st: ShardScan, final: bool) -> int:
        """Read the complete records added to one shard; -1 if the shard no longer exists."""
        idx_path = self.path / fmt.shard_name(st.k, "idx")
        bin_path = self.path / fmt.shard_name(st.k, "bin")
        try:
            with open(idx_path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(st.index_end)
                buf = f.read()
            data_size = os.stat(bin_path).st_size
        except FileNotFoundError:
            return -1
        except OSError as e:
            raise DinodistError(f"{idx_path}: cannot read ({e.strerror})") from e
        if size < st.index_end:
            raise DinodistError(
                f"{idx_path}: shrank from {st.index_end} to {size} bytes while being read "
                "(a writer resumed the store from an earlier iteration?)"
            )
        found = 0
        pos = 0
        st.torn = False
        later = f"but shard {st.k} is not the last one, so this is damage, not a crash mid-write"
        while pos < len(buf):
            fr = fmt.unframe(buf, pos)
            if fr.status == "bad" and not _is_torn_tail(buf, pos):
                raise DinodistError(f"{idx_path}: corrupt index record at byte {st.index_end + pos}")
            if fr.status != "ok":
                if not final:
                    raise DinodistError(
                        f"{idx_path}: torn index record at byte {st.index_end + pos}, {later}"
                    )
                st.torn = True
                break
            try:
                rec = fmt.parse_record(fr.payload, st.k)
            except (ValueError, TypeError) as e:
                raise DinodistError(
                    f"{idx_path}: malformed index record at byte {st.index_end + pos} ({e})"
                ) from e
            if rec.end > data_size:
                if not final:
                    raise DinodistError(
                        f"{bin_path}: shorter than its index says (iteration {rec.iteration}), {later}"
                    )
                st.torn = True  # data truncated: the store ends before this record
                break
            if rec.start < st.data_end or (
                self.last_iteration is not None and rec.iteration <= self.last_iteration
            ):
                raise DinodistError(
                    f"{idx_path}: index record at byte {st.index_end + pos} (iteration {rec.iteration}) "
                    f"overlaps or goes back after iteration {self.last_iteration}"
                )
            st.its.append(rec.iteration)
            st.pos.append(st.index_end + pos)
            found += 1
            st.data_end, st.last_iteration = rec.end, rec.iteration
            self.last_iteration = rec.iteration
            pos = fr.end
        st.index_end += pos
        return found


def _is_torn_tail(buf: bytes, pos: int) -> bool:
    # A frame that fails its check is the torn end of the file if it claims to run to (or past) the
    # end, or if the rest is zeros (a file extended but never written, after a power loss).
    rest = buf[pos:]
    if not rest.strip(b"\0"):
        return True
    if len(rest) >= fmt.FRAME.size:
        magic, n, _ = fmt.FRAME.unpack_from(buf, pos)
        return magic == fmt.INDEX_MAGIC and fmt.FRAME.size + n >= len(rest)
    return True


def scan_store(path: str | Path) -> _Scanner:
    """Every complete record of a store, or DinodistError naming the first damaged or missing shard."""
    sc = _Scanner(Path(path))
    sc.refresh()
    return sc


def read_record(path: Path, k: int, pos: int, iteration: int) -> fmt.Record:
    """The index record of `iteration`, found by an earlier scan at byte `pos` of shard k's index."""
    idx_path = path / fmt.shard_name(k, "idx")
    try:
        with open(idx_path, "rb") as f:
            f.seek(pos)
            head = f.read(fmt.FRAME.size)
            n = fmt.FRAME.unpack(head)[1] if len(head) == fmt.FRAME.size else 0
            fr = fmt.unframe(head + f.read(n), 0)
    except FileNotFoundError as e:
        raise DinodistError(
            f"{idx_path}: iteration {iteration} was deleted (store retention) before it was read"
        ) from e
    if fr.status != "ok":
        raise DinodistError(f"{idx_path}: index record of iteration {iteration} changed after it was written")
    try:
        rec = fmt.parse_record(fr.payload, k)
    except (ValueError, TypeError) as e:
        raise DinodistError(f"{idx_path}: malformed index record of iteration {iteration} ({e})") from e
    if rec.iteration != iteration:
        raise DinodistError(f"{idx_path}: index record of iteration {iteration} changed after it was written")
    return rec


class StoreReader:
    """Reads a target store. With follow=True, `__iter__` tails a store that is still being written:
    it waits (polling every `poll_s`) for new complete records, ends when the writer has closed the
    store, and raises DinodistError when `timeout_s` passes without a new record."""

    def __init__(
        self, path: str | Path, follow: bool = False, poll_s: float = 0.2, timeout_s: float | None = None
    ) -> None:
        self.path = Path(path)
        self.follow = follow
        self.poll_s = poll_s
        self.timeout_s = timeout_s
        manifest_path = self.path / fmt.MANIFEST_FILE
        if follow:
            self._wait_for(manifest_path, "manifest")
        if not manifest_path.is_file():
            raise DinodistError(f"{self.path}: not a target store (no {fmt.MANIFEST_FILE})")
        try:
            raw = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as e:
            raise DinodistError(f"{manifest_path}: cannot read target store manifest ({e})") from e
        self.manifest: dict = fmt.validate_manifest(raw, where=str(manifest_path))
        self._scanner = _Scanner(self.path)

    # ------------------------------------------------------------ listing

    def refresh(self) -> None:
        """Pick up records completed (and shards deleted by retention) since the last look."""
        self._scanner.refresh()

    def iterations(self) -> list[int]:
        """Iterations of the complete records present now, ascending."""
        self.refresh()
        out: list[int] = []
        for st in self._scanner.shards.values():
            out += st.its
        return out

    def closed(self) -> bool:
        """Whether the writer has closed the store (no more records will come). `check_closed` also
        checks the marker against the records."""
        return (self.path / fmt.CLOSED_FILE).exists()

    def check_closed(self) -> bool:
        """Whether the writer has closed the store; DinodistError if `CLOSED` names another last
        iteration than the last complete record (records lost, or written, after the close)."""
        # CLOSED is read before the scan: the writer writes it only once every record is on disk,
        # so the scan that follows sees them all.
        closed, last = fmt.read_closed(self.path)
        if not closed:
            return False
        self.refresh()
        have = self._scanner.last_iteration
        if have != last:
            raise DinodistError(
                f"{self.path / fmt.CLOSED_FILE}: the writer closed the store after iteration {last} but the "
                f"last complete record is {'none' if have is None else f'iteration {have}'}"
            )
        return True

    def _find(self, iteration: int) -> tuple[ShardScan, int] | None:
        for st in self._scanner.shards.values():
            if st.its and st.its[0] <= iteration <= st.its[-1]:
                i = bisect_left(st.its, iteration)
                if st.its[i] == iteration:
                    return st, i
        return None

    def _next_after(self, iteration: int | None) -> tuple[ShardScan, int] | None:
        for st in self._scanner.shards.values():
            if st.its and (iteration is None or st.its[-1] > iteration):
                return st, (0 if iteration is None else bisect_right(st.its, iteration))
        return None

    # ------------------------------------------------------------ reading

    def read(self, iteration: int) -> tuple[dict[str, torch.Tensor], dict]:
        """(targets, meta) of one iteration: float targets as float32, integer ones as stored."""
        hit = self._find(iteration)
        if hit is None:
            self.refresh()
            hit = self._find(iteration)
        if hit is None:
            its = self.iterations()
            if iteration < self._scanner.first_iteration:
                raise DinodistError(
                    f"{self.path}: iteration {iteration} was deleted (store retention) before it was read"
                )
            have = f"{its[0]}..{its[-1]}" if its else "none"
            raise DinodistError(f"{self.path}: iteration {iteration} is not in the target store (has {have})")
        return self._load(*hit)

    def _record(self, st: ShardScan, i: int) -> fmt.Record:
        return read_record(self.path, st.k, st.pos[i], st.its[i])

    def _load(self, st: ShardScan, i: int) -> tuple[dict[str, torch.Tensor], dict]:
        rec = self._record(st, i)
        bin_path = self.path / fmt.shard_name(rec.shard, "bin")
        n = rec.end - rec.start
        buf = bytearray(n)
        try:
            fd = os.open(bin_path, os.O_RDONLY)
        except FileNotFoundError as e:
            raise DinodistError(
                f"{bin_path}: iteration {rec.iteration} was deleted (store retention) before it was read"
            ) from e
        try:
            if rec.end > os.fstat(fd).st_size:
                raise DinodistError(f"{bin_path}: shorter than its index says (iteration {rec.iteration})")
            view = memoryview(buf)
            got = 0
            while got < n:
                k = os.preadv(fd, [view[got:]], rec.start + got)
                if k == 0:
                    raise DinodistError(
                        f"{bin_path}: shorter than its index says (iteration {rec.iteration})"
                    )
                got += k
        finally:
            os.close(fd)
        if fmt.digest([buf]) != rec.digest:
            raise DinodistError(f"{bin_path}: checksum mismatch for iteration {rec.iteration}")
        view = memoryview(buf)
        out: dict[str, torch.Tensor] = {}
        for e in rec.tensors:
            a = e.offset - rec.start
            data = view[a : a + e.nbytes]
            scales = None
            if e.scale_nbytes:
                b = e.scale_offset - rec.start
                scales = view[b : b + e.scale_nbytes]
            out[e.name] = decode(data, list(e.shape), e.enc, e.dtype, scales)
        return out, rec.meta

    def last_layers(self) -> dict[str, torch.Tensor]:
        """The teacher heads' last layers as float32, checked against their digest."""
        path = self.path / fmt.LAST_LAYERS_FILE
        if self.follow:
            self._wait_for(path, "last layers")
        try:
            blob = bytearray(path.read_bytes())
        except FileNotFoundError as e:
            raise DinodistError(
                f"{path}: target store has no last layers (the teacher writes them once)"
            ) from e
        fr = fmt.unframe(blob, 0, fmt.LAST_LAYERS_MAGIC)
        if fr.status != "ok":
            raise DinodistError(f"{path}: corrupt header")
        try:
            d = fmt.unpack(fr.payload)
            start, end = d["start"], d["end"]
            if not (isinstance(start, int) and isinstance(end, int) and fr.end <= start <= end == len(blob)):
                raise ValueError(f"data range {start}..{end} does not fit a file of {len(blob)} bytes")
            entries = [fmt.parse_tensor_entry(t, start, end) for t in d["tensors"]]
            dg = d["digest"]
        except (ValueError, TypeError, KeyError) as e:
            raise DinodistError(f"{path}: malformed header ({e})") from e
        view = memoryview(blob)
        if fmt.digest([view[start:end]]) != dg:
            raise DinodistError(f"{path}: checksum mismatch")
        out = {}
        for e in entries:
            t = decode(view[e.offset : e.offset + e.nbytes], list(e.shape), e.enc, e.dtype)
            out[e.name] = t.to(torch.float32) if e.dtype in FLOAT_DTYPES else t
        return out

    def __iter__(self) -> Iterator[tuple[int, dict[str, torch.Tensor], dict]]:
        """(iteration, targets, meta) in order; see the class docstring for follow mode."""
        last: int | None = None
        last_progress = time.monotonic()
        saw_closed = False
        while True:
            hit = self._next_after(last)
            if hit is None:
                self.refresh()
                hit = self._next_after(last)
            first = self._scanner.first_iteration
            if last is not None and first > last + 1:
                raise DinodistError(
                    f"{self.path}: the records after iteration {last} up to {first - 1} were deleted "
                    "(store retention) before they were read"
                )
            if hit is not None:
                tensors, meta = self._load(*hit)
                last = hit[0].its[hit[1]]
                yield last, tensors, meta
                last_progress = time.monotonic()
                continue
            if not self.follow or saw_closed:
                # The end of the records must be where the writer said it closed the store.
                if self.check_closed() and self._next_after(last) is not None:
                    continue
                return
            if self.closed():
                saw_closed = True  # one more scan: records finished before the marker are visible now
                continue
            if self.timeout_s is not None and time.monotonic() - last_progress > self.timeout_s:
                raise DinodistError(
                    f"{self.path}: no new target record for {self.timeout_s:g}s and the store is not closed; "
                    f"last complete iteration {last if last is not None else 'none'} (writer stopped?)"
                )
            time.sleep(self.poll_s)

    def _wait_for(self, path: Path, what: str) -> None:
        t0 = time.monotonic()
        while not path.exists():
            if self.timeout_s is not None and time.monotonic() - t0 > self.timeout_s:
                raise DinodistError(f"{self.path}: no {what} after {self.timeout_s:g}s ({path.name} missing)")
            time.sleep(self.poll_s)
