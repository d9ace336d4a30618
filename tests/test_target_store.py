"""Target store: round trips, crash safety, corruption, follow mode, retention, compatibility, errors."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import re
import resource
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from dinodist.core.errors import DinodistError
from dinodist.core.procs import pid_alive
from dinodist.core.target_store import (
    StoreReader,
    StoreWriter,
    bytes_per_image,
    bytes_per_million_iterations,
    check_compatible,
    validate_manifest,
)
from dinodist.core.target_store import format as fmt
from dinodist.core.target_store.quant import decode, encode

G, DB, DI, P = 4, 32, 24, 16  # images, DINO/iBOT bottleneck widths, patches per crop


def manifest(**over) -> dict:
    m = dict(
        teacher_hash="random-init:0",
        teacher_arch="tiny-vit7b",
        data_fingerprint="skimage:abc",
        crop_config={"global_size": 32, "local_size": 16, "n_local": 2, "global_scale": (0.32, 1.0)},
        target_kind="heads",
        topology="cpu-tiny",
        global_batch_size=G,
    )
    m.update(over)
    return m


def targets(it: int) -> tuple[dict[str, torch.Tensor], dict]:
    g = torch.Generator().manual_seed(it)
    counts = torch.randint(0, P // 2, (G, 2), generator=g)
    m = int(counts.sum())
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g), dim=-1)
    t = {"dino": unit(G, 2, DB), "ibot": unit(m, DI), "ibot_counts": counts, "valid": counts > 0}
    meta = {"iteration": it, "ids": list(range(it * G, (it + 1) * G)), "seeds": [it] * G, "crop": [32, 16]}
    return t, meta


def write_store(path: Path, n: int, dtype: str = "fp32", **kw) -> None:
    with StoreWriter(path, manifest(), dtype=dtype, **kw) as w:
        for it in range(n):
            w.append(it, *targets(it))


def records_bytes(path: Path, k: int = 0) -> tuple[bytes, bytes]:
    return (path / fmt.shard_name(k, "bin")).read_bytes(), (path / fmt.shard_name(k, "idx")).read_bytes()


# ---------------------------------------------------------------- round trips


def test_fp32_round_trip_bit_exact_across_shards(tmp_path):
    write_store(tmp_path / "s", 12, "fp32", shard_bytes=8192)
    r = StoreReader(tmp_path / "s")
    assert len(fmt.SHARD_RE.pattern) and len(list((tmp_path / "s").glob("shard-*.bin"))) > 2
    assert r.iterations() == list(range(12))
    seen = []
    for it, got, meta in r:
        want, want_meta = targets(it)
        assert meta == want_meta
        assert set(got) == set(want)
        for k in want:
            assert got[k].dtype == (torch.float32 if want[k].is_floating_point() else want[k].dtype)
            assert torch.equal(got[k], want[k]), k
        seen.append(it)
    assert seen == list(range(12))
    # Random access gives the same as the in-order walk.
    assert torch.equal(r.read(7)[0]["ibot"], targets(7)[0]["ibot"])
    with pytest.raises(DinodistError, match="iteration 99 is not in the target store"):
        r.read(99)


def test_bf16_and_int8_within_quantisation_error(tmp_path):
    for dtype in ("bf16", "int8"):
        write_store(tmp_path / dtype, 3, dtype)
        for it, got, _ in StoreReader(tmp_path / dtype):
            want, _ = targets(it)
            assert torch.equal(got["ibot_counts"], want["ibot_counts"])
            for k in ("dino", "ibot"):
                x = want[k].reshape(-1, want[k].shape[-1])
                y = got[k].reshape(x.shape)
                if dtype == "bf16":
                    assert torch.equal(y, x.bfloat16().float())
                else:
                    # Symmetric rounding to 127 levels: every entry within half a step of its row's scale.
                    half_step = x.abs().amax(1, keepdim=True) / 254
                    assert ((y - x).abs() <= half_step * (1 + 1e-5)).all()
                    assert (y - x).abs().max() > 0
    # A zero row (scale 0) and an empty tensor survive int8.
    z = torch.zeros(3, 8)
    z[1] = torch.linspace(-1, 1, 8)
    data, scales = encode(z, "int8")
    back = decode(bytearray(data), [3, 8], "int8", "float32", bytearray(scales))
    assert torch.equal(back[0], z[0]) and torch.allclose(back[1], z[1], atol=1 / 254)
    e, s = encode(torch.zeros(0, 8), "int8")
    assert decode(bytearray(e), [0, 8], "int8", "float32", bytearray(s)).shape == (0, 8)


def test_async_and_sync_writers_produce_identical_files(tmp_path):
    write_store(tmp_path / "a", 6, "int8", async_write=True, max_queue=1, shard_bytes=4096)
    write_store(tmp_path / "b", 6, "int8", async_write=False, shard_bytes=4096)
    names = sorted(p.name for p in (tmp_path / "a").glob("shard-*"))
    assert names == sorted(p.name for p in (tmp_path / "b").glob("shard-*")) and len(names) > 2
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n


def test_last_layers_exact_and_manifest(tmp_path):
    ll = {
        "dino_last_layer.weight": torch.randn(64, DB),
        "ibot_last_layer.weight": torch.randn(48, DI).bfloat16(),
    }
    with StoreWriter(tmp_path / "s", manifest(), dtype="int8") as w:
        w.write_last_layers(ll)
    r = StoreReader(tmp_path / "s")
    got = r.last_layers()
    assert torch.equal(got["dino_last_layer.weight"], ll["dino_last_layer.weight"])
    assert torch.equal(got["ibot_last_layer.weight"], ll["ibot_last_layer.weight"].float())
    assert r.manifest["dtype"] == "int8" and r.manifest["format_version"] == fmt.FORMAT_VERSION
    assert r.manifest["crop_config"]["global_scale"] == [0.32, 1.0]
    assert r.closed() and r.iterations() == []
    blob = bytearray((tmp_path / "s" / fmt.LAST_LAYERS_FILE).read_bytes())
    blob[-3] ^= 0x10
    (tmp_path / "s" / fmt.LAST_LAYERS_FILE).write_bytes(blob)
    with pytest.raises(DinodistError, match="last_layers.bin: checksum mismatch"):
        r.last_layers()


# ---------------------------------------------------------------- crash safety and corruption


def test_truncated_index_or_data_shows_prefix(tmp_path):
    src = tmp_path / "src"
    write_store(src, 4, "bf16")
    data, index = records_bytes(src)
    frames, pos = [], 0
    while pos < len(index):
        fr = fmt.unframe(index, pos)
        frames.append((pos, fr.end))
        pos = fr.end
    assert len(frames) == 4
    last_start, last_end = frames[-1]
    rec3 = fmt.parse_record(fmt.unframe(index, last_start).payload, 0)
    # Every cut inside the last index record (and its header) hides only iteration 3.
    for cut in list(range(last_start, last_end, 7)) + [last_end - 1]:
        d = tmp_path / f"cut{cut}"
        shutil.copytree(src, d)
        (d / "CLOSED").unlink()
        with open(d / fmt.shard_name(0, "idx"), "r+b") as f:
            f.truncate(cut)
        assert StoreReader(d).iterations() == [0, 1, 2], cut
    # A .bin cut inside iteration 3's data hides iteration 3 even though its index record is whole.
    d = tmp_path / "bincut"
    shutil.copytree(src, d)
    with open(d / fmt.shard_name(0, "bin"), "r+b") as f:
        f.truncate(rec3.start + (rec3.end - rec3.start) // 2)
    r = StoreReader(d)
    assert r.iterations() == [0, 1, 2]
    assert torch.equal(r.read(2)[0]["dino"], targets(2)[0]["dino"].bfloat16().float())
    # Data written without its index record (crash between the two writes) is ignored.
    d = tmp_path / "orphan"
    shutil.copytree(src, d)
    with open(d / fmt.shard_name(0, "bin"), "ab") as f:
        f.write(os.urandom(5000))
    assert [it for it, _, _ in StoreReader(d)] == [0, 1, 2, 3]


def test_resume_cuts_torn_tail_and_continues(tmp_path):
    d = tmp_path / "s"
    write_store(d, 5, "fp32", shard_bytes=4096)
    last_idx = d / sorted(p.name for p in d.glob("shard-*.idx"))[-1]
    with open(last_idx, "ab") as f:  # a torn frame: header and half a payload
        f.write(fmt.frame(b"\x81\xa1x\x01" * 20)[:30])
    with open(d / fmt.shard_name(int(last_idx.stem[6:]), "bin"), "ab") as f:
        f.write(b"\x01" * 100)
    with pytest.raises(DinodistError, match="already exists"):
        StoreWriter(d, manifest(), dtype="fp32")
    with pytest.raises(DinodistError, match="'teacher_hash'"):
        StoreWriter(d, manifest(teacher_hash="sha256:00"), dtype="fp32", resume=True)
    with StoreWriter(d, manifest(), dtype="fp32", shard_bytes=4096, resume=True) as w:
        assert w.last_iteration == 4
        with pytest.raises(DinodistError, match="iteration 4 appended after 4"):
            w.append(4, *targets(4))
        for it in range(5, 9):
            w.append(it, *targets(it))
    r = StoreReader(d)
    assert r.iterations() == list(range(9))
    for it, got, _ in r:
        assert torch.equal(got["ibot"], targets(it)[0]["ibot"])


def test_corrupt_byte_names_iteration_and_shard(tmp_path):
    d = tmp_path / "s"
    write_store(d, 4, "int8")
    r = StoreReader(d)
    target = fmt.parse_record(fmt.unframe(records_bytes(d)[1], 0).payload, 0)  # iteration 0's frame
    idx = records_bytes(d)[1]
    second = fmt.unframe(idx, 0).end
    rec1 = fmt.parse_record(fmt.unframe(idx, second).payload, 0)
    assert target.iteration == 0 and rec1.iteration == 1
    binp = d / fmt.shard_name(0, "bin")
    raw = bytearray(binp.read_bytes())
    raw[rec1.start + 11] ^= 0x01
    binp.write_bytes(raw)
    with pytest.raises(DinodistError, match=r"shard-00000\.bin: checksum mismatch for iteration 1"):
        r.read(1)
    r.read(0), r.read(2)  # neighbours unaffected
    # A flipped byte inside an index record that is followed by others is corruption, not a torn tail.
    idxp = d / fmt.shard_name(0, "idx")
    raw = bytearray(idxp.read_bytes())
    raw[second + 20] ^= 0x01
    idxp.write_bytes(raw)
    with pytest.raises(DinodistError, match=rf"shard-00000\.idx: corrupt index record at byte {second}"):
        StoreReader(d).iterations()


def test_malformed_index_records_are_refused(tmp_path):
    d = tmp_path / "s"
    write_store(d, 1, "fp32")
    data, index = records_bytes(d)
    good = fmt.unpack(fmt.unframe(index, 0).payload)

    def with_entry(**change):
        rec = dict(good, tensors=[dict(good["tensors"][0], **change)])
        (d / fmt.shard_name(0, "idx")).write_bytes(fmt.frame(fmt.pack(rec)))
        return StoreReader(d)

    for change, msg in [
        ({"nbytes": good["tensors"][0]["nbytes"] * 2}, "do not match shape"),
        ({"dtype": "object"}, "dtype 'object' not allowed"),
        ({"name": "../../etc"}, "must match"),
        ({"enc": "pickle"}, "encoding 'pickle'"),
        ({"offset": 10**12}, "outside its record"),
    ]:
        with pytest.raises(DinodistError, match="malformed index record at byte 0.*" + msg):
            with_entry(**change).iterations()
    with pytest.raises(DinodistError, match="must match"):
        with StoreWriter(tmp_path / "t", manifest()) as w:
            w.append(0, {"bad name": torch.zeros(1)}, {})
    with pytest.raises(DinodistError, match="not one of"):
        StoreWriter(tmp_path / "u", manifest()).append(0, {"x": torch.zeros(2, dtype=torch.complex64)}, {})


# ---------------------------------------------------------------- follow mode


def _live_writer(path: str, n: int, die: bool) -> None:
    torch.set_num_threads(1)
    w = StoreWriter(path, manifest(), dtype="bf16", shard_bytes=4096)
    for it in range(n):
        w.append(it, *targets(it))
        time.sleep(0.02)
    w.flush()
    if die:
        # Killed mid-write: a torn index frame, then no CLOSED marker.
        with open(Path(path) / fmt.shard_name(w._shards[-1].k, "idx"), "ab") as f:
            f.write(fmt.frame(b"\x80" * 50)[:20])
        os.kill(os.getpid(), signal.SIGKILL)
    w.close()


@pytest.mark.multiproc
@pytest.mark.timeout(60)
def test_follow_live_writer_process_until_closed(tmp_path):
    d = str(tmp_path / "live")
    p = mp.get_context("fork").Process(target=_live_writer, args=(d, 15, False))
    p.start()
    try:
        r = StoreReader(d, follow=True, poll_s=0.01, timeout_s=20)  # waits for the manifest
        got = []
        for it, t, meta in r:
            assert meta["iteration"] == it
            assert torch.equal(t["dino"], targets(it)[0]["dino"].bfloat16().float())
            got.append(it)
        assert got == list(range(15))
    finally:
        p.join(20)
    assert p.exitcode == 0


@pytest.mark.multiproc
@pytest.mark.timeout(60)
def test_follow_killed_writer_times_out_naming_last_iteration(tmp_path):
    d = str(tmp_path / "dead")
    p = mp.get_context("fork").Process(target=_live_writer, args=(d, 6, True))
    p.start()
    got = []
    try:
        while not (Path(d) / fmt.MANIFEST_FILE).exists() and p.is_alive():
            time.sleep(0.01)
        t0 = time.monotonic()
        r = StoreReader(d, follow=True, poll_s=0.01, timeout_s=2.0)
        with pytest.raises(DinodistError, match="last complete iteration 5 "):
            for it, _, _ in r:
                got.append(it)
    finally:
        p.join(20)
    assert p.exitcode == -signal.SIGKILL
    assert got == list(range(6)) and time.monotonic() - t0 >= 2.0


def test_follow_in_thread_with_retention_and_falling_behind(tmp_path):
    d = tmp_path / "ret"
    w = StoreWriter(d, manifest(), dtype="int8", retain=4, shard_bytes=2048)
    got, errors = [], []

    def follow():
        try:
            for it, _, _ in StoreReader(d, follow=True, poll_s=0.005, timeout_s=10):
                got.append(it)
        except DinodistError as e:
            errors.append(e)

    th = threading.Thread(target=follow)
    th.start()
    for it in range(30):
        # Lockstep (the follower is at most 3 behind, inside the window of 4) so the test cannot
        # flake on a loaded machine; the follower still only ever sees what is on disk.
        deadline = time.monotonic() + 10
        while len(got) < it - 2 and not errors and time.monotonic() < deadline:
            time.sleep(0.002)
        w.append(it, *targets(it))
        w.flush()
    w.close()
    th.join(15)
    assert not errors and got == list(range(30))
    r = StoreReader(d)
    its = r.iterations()
    per_shard = max(len(st.its) for st in r._scanner.shards.values())
    # Whole shards go: at least the last 4 iterations stay, at most one shard's worth more.
    assert its[-4:] == [26, 27, 28, 29] and len(its) <= 4 + per_shard and its == list(range(its[0], 30))
    assert (d / fmt.shard_name(0, "bin")).exists() is False
    # A reader that listed an iteration later deleted by retention says so.
    w2 = StoreWriter(
        tmp_path / "ret2", manifest(), dtype="int8", retain=2, shard_bytes=1024, async_write=False
    )
    w2.append(0, *targets(0))
    w2.append(1, *targets(1))
    r = StoreReader(tmp_path / "ret2")
    assert r.iterations()[0] == 0
    for it in range(2, 8):
        w2.append(it, *targets(it))
    w2.close()
    with pytest.raises(DinodistError, match="iteration 0 was deleted"):
        r.read(0)


# ---------------------------------------------------------------- manifest checks


def test_check_compatible_names_first_mismatch():
    m = validate_manifest(manifest())
    check_compatible(m, {"teacher_hash": "random-init:0", "crop_config": manifest()["crop_config"]})
    with pytest.raises(DinodistError, match="field 'teacher_hash' is \"random-init:0\" but this run expects"):
        check_compatible(m, {"target_kind": "features", "teacher_hash": "sha256:ff"})
    with pytest.raises(DinodistError, match="field 'data_fingerprint'"):
        check_compatible(m, {"crop_config": {"global_size": 64}, "data_fingerprint": "folder:x"})
    with pytest.raises(DinodistError, match="field 'crop_config'"):
        check_compatible(m, {"crop_config": dict(manifest()["crop_config"], n_local=8)})
    with pytest.raises(DinodistError, match="field 'target_kind'"):
        check_compatible(m, {"target_kind": "features"})
    with pytest.raises(DinodistError, match="missing field 'seed'"):
        check_compatible(m, {"seed": 3})
    for field in ("teacher_hash", "global_batch_size", "target_kind"):
        bad = manifest()
        del bad[field]
        with pytest.raises(DinodistError, match=f"missing field '{field}'"):
            validate_manifest(bad)
    with pytest.raises(DinodistError, match="field 'target_kind' must be one of"):
        validate_manifest(manifest(target_kind="logits"))


# ---------------------------------------------------------------- background errors


def test_async_error_surfaces_when_directory_removed(tmp_path):
    d = tmp_path / "gone"
    w = StoreWriter(d, manifest(), dtype="fp32", shard_bytes=1024)
    w.append(0, *targets(0))
    w.flush()
    shutil.rmtree(d)  # the next record needs a new shard, whose file cannot be created
    with pytest.raises(DinodistError, match="target store write failed"):
        for it in range(1, 50):
            w.append(it, *targets(it))
        w.flush()
    with pytest.raises(DinodistError, match="target store write failed"):
        w.close()


def test_async_error_surfaces_when_disk_full(tmp_path):
    d = tmp_path / "full"
    w = StoreWriter(d, manifest(), dtype="fp32")
    w.append(0, *targets(0))
    w.flush()
    old_sig = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old_lim = resource.getrlimit(resource.RLIMIT_FSIZE)
    size = (d / fmt.shard_name(0, "bin")).stat().st_size
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 3000, old_lim[1]))
    try:
        with pytest.raises(
            DinodistError, match=r"shard-00000\.bin: target store write failed \(File too large"
        ):
            for it in range(1, 20):
                w.append(it, *targets(it))
            w.flush()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_lim)
        signal.signal(signal.SIGXFSZ, old_sig)
    # What was written before the failure is still a readable store.
    its = StoreReader(d).iterations()
    assert its[0] == 0 and its == list(range(len(its))) and len(its) < 19
    with pytest.raises(DinodistError, match="meta of iteration 0 is not msgpack-able"):
        StoreWriter(tmp_path / "m", manifest()).append(0, {}, {"x": object()})


# ---------------------------------------------------------------- cost model


def test_bytes_per_image_matches_bytes_on_disk(tmp_path):
    masked = 5  # patches masked per global crop, the same for every image here
    for dtype in ("fp32", "bf16", "int8"):
        d = tmp_path / dtype
        n = 3
        with StoreWriter(d, manifest(), dtype=dtype) as w:
            for it in range(n):
                t, meta = targets(it)
                t = {
                    "dino": t["dino"],
                    "ibot": torch.randn(G * 2 * masked, DI),
                    "ibot_counts": torch.full((G, 2), masked),
                    "ids": torch.arange(G),
                    "seeds": torch.arange(G),
                }
                w.append(it, t, meta)
        per_image = bytes_per_image(
            "heads", dino_dim=DB, ibot_dim=DI, patches_per_crop=P, masked_fraction=masked / P, dtype=dtype
        )
        on_disk = (d / fmt.shard_name(0, "bin")).stat().st_size / (n * G)
        # The only difference is 64-byte alignment padding: at most 63 bytes per segment (<= 6 per record).
        assert per_image <= on_disk <= per_image + 6 * 63 / G, dtype
    paper = bytes_per_million_iterations(4096)
    assert paper == pytest.approx(1e6 * (4096 * bytes_per_image() + fmt.RECORD_OVERHEAD_BYTES))
    assert bytes_per_image(dtype="int8") < bytes_per_image(dtype="bf16") < bytes_per_image(dtype="fp32")
    with pytest.raises(DinodistError, match="dtype 'fp8'"):
        bytes_per_image(dtype="fp8")


# ---------------------------------------------------------------- resume from an iteration, damage, lock


def layout(path: Path) -> list[list[int]]:
    """Iterations per shard, lowest shard first."""
    r = StoreReader(path)
    r.refresh()
    return [list(st.its) for st in r._scanner.shards.values()]


def snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def closed_last(path: Path):
    return json.loads((path / fmt.CLOSED_FILE).read_text())["last_iteration"]


@pytest.mark.parametrize("where", ["inside-shard", "shard-boundary", "zero", "after-last"])
def test_resume_from_cuts_the_records_it_will_recompute(tmp_path, where):
    d = tmp_path / "s"
    write_store(d, 12, "fp32", shard_bytes=8192)
    per_shard = layout(d)
    # A shard holding two records after a shard holding one: a cut inside it and at its start.
    j = next(j for j, its in enumerate(per_shard) if len(its) == 2 and j > 0 and j < len(per_shard) - 1)
    k = {"inside-shard": per_shard[j][1], "shard-boundary": per_shard[j][0], "zero": 0, "after-last": 12}
    k = k[where]
    shards_kept = {"inside-shard": j + 1, "shard-boundary": j, "zero": 1, "after-last": len(per_shard)}[where]
    with StoreWriter(d, manifest(), dtype="fp32", shard_bytes=8192, resume=True, resume_from=k) as w:
        assert not (d / fmt.CLOSED_FILE).exists()  # being written again
        assert w.last_iteration == (k - 1 if k else None)
        # What a reader sees before anything new is appended: exactly the iterations below k.
        assert StoreReader(d).iterations() == list(range(k))
        assert len(list(d.glob("shard-*.idx"))) == len(list(d.glob("shard-*.bin"))) == shards_kept
        # Cut to the byte: no bytes of a cut record stay behind in a data or index file.
        r = StoreReader(d)
        r.refresh()
        for st in r._scanner.shards.values():
            assert (d / fmt.shard_name(st.k, "bin")).stat().st_size == st.data_end
            assert (d / fmt.shard_name(st.k, "idx")).stat().st_size == st.index_end
        if k:
            with pytest.raises(DinodistError, match=f"iteration {k - 1} appended after {k - 1}"):
                w.append(k - 1, *targets(k - 1))
        # The resumed teacher's records differ from the old ones: only the new ones may be read back.
        for it in range(k, 14):
            w.append(it, *targets(it + 100))
    r = StoreReader(d)
    assert r.iterations() == list(range(14)) and closed_last(d) == 13 and r.check_closed()
    for it, got, meta in r:
        want, want_meta = targets(it if it < k else it + 100)
        assert torch.equal(got["ibot"], want["ibot"]) and meta == want_meta, it
    assert r.manifest["teacher_hash"] == manifest()["teacher_hash"]


def test_resume_from_refuses_a_gap_and_leaves_the_store_untouched(tmp_path):
    d = tmp_path / "s"
    write_store(d, 6, "fp32", shard_bytes=8192)
    before = snapshot(d)
    with pytest.raises(DinodistError, match=r"cannot resume the target store from iteration 8: it lacks "
                                            r"iteration 6 \(it holds iterations 0\.\.5\)") as e:
        StoreWriter(d, manifest(), dtype="fp32", resume=True, resume_from=8)
    assert "\n" not in str(e.value)
    assert snapshot(d) == before  # CLOSED included: a refused resume changes nothing (and leaves no lock)
    with pytest.raises(DinodistError, match="resume_from=3 needs resume=True"):
        StoreWriter(d, manifest(), dtype="fp32", resume_from=3)
    with pytest.raises(DinodistError, match="resume_from must be a non-negative int"):
        StoreWriter(d, manifest(), dtype="fp32", resume=True, resume_from=-1)
    with pytest.raises(DinodistError, match="no manifest.json and no records, so iterations 0..4"):
        StoreWriter(tmp_path / "new", manifest(), resume=True, resume_from=5)
    # A store that itself skipped an iteration cannot be resumed inside the hole either.
    with StoreWriter(tmp_path / "holey", manifest(), dtype="fp32") as w:
        for it in (0, 1, 3, 4):
            w.append(it, *targets(it))
    with pytest.raises(DinodistError, match="from iteration 4: it lacks iteration 2"):
        StoreWriter(tmp_path / "holey", manifest(), dtype="fp32", resume=True, resume_from=4)
    # A store may start above 0 (its writer began there): only a hole after its start is refused.
    with StoreWriter(tmp_path / "late", manifest(), dtype="fp32") as w:
        for it in (3, 4, 5):
            w.append(it, *targets(it))
    StoreWriter(tmp_path / "late", manifest(), dtype="fp32", resume=True, resume_from=5).close()
    assert StoreReader(tmp_path / "late").iterations() == [3, 4]
    # last + 1 is plain resume, whatever the store holds.
    StoreWriter(tmp_path / "holey", manifest(), dtype="fp32", resume=True, resume_from=5).close()
    assert StoreReader(tmp_path / "holey").iterations() == [0, 1, 3, 4]
    StoreWriter(d, manifest(), dtype="fp32", resume=True, resume_from=6).close()
    assert StoreReader(d).iterations() == list(range(6)) and closed_last(d) == 5


def _fixed(it: int) -> dict[str, torch.Tensor]:
    return {"x": torch.full((64,), float(it))}  # 256 bytes: two records per 512-byte shard


def test_retention_is_recorded_and_resume_respects_it(tmp_path):
    d = tmp_path / "s"
    with StoreWriter(d, manifest(), dtype="fp32", retain=2, shard_bytes=512, async_write=False) as w:
        for it in range(10):
            w.append(it, _fixed(it))
    assert layout(d) == [[8, 9]]
    assert json.loads((d / fmt.RETENTION_FILE).read_text()) == {"first_shard": 4, "first_iteration": 8}
    r = StoreReader(d)
    assert r.iterations() == [8, 9] and r.check_closed()
    with pytest.raises(DinodistError, match="iteration 3 was deleted \\(store retention\\)"):
        r.read(3)
    # A crash between recording a deletion and making it leaves shards below the first one: readers
    # skip them, a resume finishes the deletion.
    shutil.copy(d / "shard-00004.bin", d / "shard-00001.bin")
    shutil.copy(d / "shard-00004.idx", d / "shard-00001.idx")
    assert StoreReader(d).iterations() == [8, 9]
    with pytest.raises(DinodistError, match="retention already deleted the iterations before 8"):
        StoreWriter(d, manifest(), dtype="fp32", resume=True, resume_from=5)
    assert (d / "shard-00001.idx").exists()  # refused: nothing changed
    StoreWriter(d, manifest(), dtype="fp32", resume=True, resume_from=9).close()
    assert not (d / "shard-00001.idx").exists() and not (d / "shard-00001.bin").exists()
    assert StoreReader(d).iterations() == [8]
    # 0 starts over: shard numbers keep growing, and retention's old point no longer hides anything.
    with StoreWriter(d, manifest(), dtype="fp32", resume=True, resume_from=0, shard_bytes=512) as w:
        assert StoreReader(d).iterations() == []
        for it in range(3):
            w.append(it, _fixed(it))
    assert json.loads((d / fmt.RETENTION_FILE).read_text()) == {"first_shard": 4, "first_iteration": 0}
    assert layout(d) == [[0, 1], [2]] and sorted(p.name for p in d.glob("*.idx"))[0] == "shard-00004.idx"


def test_damaged_non_final_shard_is_an_error_and_resume_deletes_nothing(tmp_path):
    src = tmp_path / "src"
    write_store(src, 12, "fp32", shard_bytes=8192)
    assert len(layout(src)) > 3
    idx0 = fmt.shard_name(0, "idx")
    size0 = (src / idx0).stat().st_size
    cases = {
        "torn-index": (idx0, size0 - 5,
                       r"shard-00000\.idx: torn index record at byte \d+, but shard 0 is not the last one"),
        "short-data": (fmt.shard_name(0, "bin"), 100,
                       r"shard-00000\.bin: shorter than its index says \(iteration 0\), but shard 0 is not"),
    }
    for name, (file, size, msg) in cases.items():
        d = tmp_path / name
        shutil.copytree(src, d)
        os.truncate(d / file, size)
        (d / fmt.CLOSED_FILE).unlink()  # as after a crash: the reader must not lean on the marker
        with pytest.raises(DinodistError, match=msg):
            StoreReader(d).iterations()
        with pytest.raises(DinodistError, match=msg):
            list(StoreReader(d))
        before = snapshot(d)
        for resume_from in (None, 1, 8):
            with pytest.raises(DinodistError, match=msg):
                StoreWriter(d, manifest(), dtype="fp32", resume=True, resume_from=resume_from)
            assert snapshot(d) == before, (name, resume_from)


def test_missing_shard_is_an_error_unless_retention_removed_it(tmp_path):
    src = tmp_path / "src"
    write_store(src, 12, "fp32", shard_bytes=8192)
    for k in (0, 2):
        d = tmp_path / f"lost{k}"
        shutil.copytree(src, d)
        for ext in ("idx", "bin"):
            (d / fmt.shard_name(k, ext)).unlink()
        msg = rf"shard-0000{k}\.idx: shard {k} is missing \(retention deleted no shard\)"
        with pytest.raises(DinodistError, match=msg):
            StoreReader(d).iterations()
        before = snapshot(d)
        with pytest.raises(DinodistError, match=msg):
            StoreWriter(d, manifest(), dtype="fp32", resume=True)
        assert snapshot(d) == before
    # Below retention's first shard nothing is expected; from it on, every shard is.
    d = tmp_path / "ret"
    with StoreWriter(d, manifest(), dtype="fp32", retain=3, shard_bytes=512, async_write=False) as w:
        for it in range(12):
            w.append(it, _fixed(it))
    assert layout(d) == [[8, 9], [10, 11]]
    (d / fmt.shard_name(4, "idx")).unlink()
    with pytest.raises(DinodistError, match=r"shard-00004\.idx: shard 4 is missing \(retention deleted only "
                                            r"the shards below 4\)"):
        StoreReader(d).iterations()


def test_iterating_reader_never_skips_records_retention_deleted(tmp_path):
    d = tmp_path / "s"
    w = StoreWriter(d, manifest(), dtype="fp32", retain=2, shard_bytes=512, async_write=False)
    w.append(0, _fixed(0))
    walk = iter(StoreReader(d))
    assert next(walk)[0] == 0
    for it in range(1, 6):  # shard 0 (0, 1) and shard 1 (2, 3) go before the reader gets to 1
        w.append(it, _fixed(it))
    w.close()
    with pytest.raises(DinodistError, match=r"after iteration 0 up to 3 were deleted \(store retention\)"):
        next(walk)


def test_reader_of_a_store_resumed_from_an_earlier_iteration_stops(tmp_path):
    d = tmp_path / "s"
    write_store(d, 12, "fp32", shard_bytes=8192)
    per_shard = layout(d)
    r = StoreReader(d)
    assert r.iterations() == list(range(12))
    StoreWriter(d, manifest(), dtype="fp32", resume=True, resume_from=per_shard[0][1]).close()
    with pytest.raises(DinodistError, match=r"shard-00001\.idx: removed while the store was being read, "
                                            "and not by retention"):
        r.iterations()
    d = tmp_path / "one"
    write_store(d, 4, "fp32")
    r = StoreReader(d)
    assert r.iterations() == [0, 1, 2, 3]
    StoreWriter(d, manifest(), dtype="fp32", resume=True, resume_from=2).close()
    with pytest.raises(DinodistError, match=r"shard-00000\.idx: shrank from \d+ to \d+ bytes"):
        r.iterations()


def test_closed_marker_is_checked_against_the_last_record(tmp_path):
    d = tmp_path / "s"
    write_store(d, 4, "fp32")
    assert closed_last(d) == 3 and StoreReader(d).check_closed()
    write_store(tmp_path / "empty", 0)
    assert closed_last(tmp_path / "empty") is None and StoreReader(tmp_path / "empty").check_closed()
    # The last index record lost after the close (whole frames gone, so it is no torn tail).
    index = (d / fmt.shard_name(0, "idx")).read_bytes()
    pos = 0
    for _ in range(3):
        pos = fmt.unframe(index, pos).end
    os.truncate(d / fmt.shard_name(0, "idx"), pos)
    msg = r"CLOSED: the writer closed the store after iteration 3 but the last complete record is iteration 2"
    # iterations() lists what is on disk; the marker is checked where a reader relies on it.
    assert StoreReader(d).iterations() == [0, 1, 2]
    assert StoreReader(d).closed()
    with pytest.raises(DinodistError, match=msg):
        StoreReader(d).check_closed()
    got = []
    with pytest.raises(DinodistError, match=msg):
        for it, _, _ in StoreReader(d):
            got.append(it)
    assert got == [0, 1, 2]
    with pytest.raises(DinodistError, match=msg):
        list(StoreReader(d, follow=True, poll_s=0.01, timeout_s=5))
    # A record after the close is as wrong as one missing.
    (d / fmt.CLOSED_FILE).write_text(json.dumps({"last_iteration": 1}))
    with pytest.raises(DinodistError, match="after iteration 1 but the last complete record is iteration 2"):
        list(StoreReader(d))


def _lock(path: Path) -> dict:
    return json.loads((path / fmt.LOCK_FILE).read_text())


def test_one_writer_at_a_time(tmp_path, caplog):
    d = tmp_path / "s"
    w = StoreWriter(d, manifest(), dtype="fp32")
    held = _lock(d)
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["started"]
    holder = rf"writer\.lock: target store is being written by pid {os.getpid()} on {re.escape(held['host'])}"
    for resume in (True, False):
        with pytest.raises(DinodistError, match=holder):
            StoreWriter(d, manifest(), dtype="fp32", resume=resume)
    with pytest.raises(DinodistError, match=holder):
        StoreWriter(d, manifest(), dtype="fp32", resume=True, resume_from=0)
    w.append(0, *targets(0))
    w.close()
    assert not (d / fmt.LOCK_FILE).exists() and StoreReader(d).iterations() == [0]
    # Released on failure too: in the body, and while opening (an incompatible manifest).
    with pytest.raises(RuntimeError):
        with StoreWriter(d, manifest(), dtype="fp32", resume=True):
            raise RuntimeError("teacher failed")
    assert not (d / fmt.LOCK_FILE).exists()
    with pytest.raises(DinodistError, match="'teacher_hash'"):
        StoreWriter(d, manifest(teacher_hash="sha256:00"), dtype="fp32", resume=True)
    assert not (d / fmt.LOCK_FILE).exists()
    # A writer that died (its pid is gone) is taken over, with a warning.
    dead = next(p for p in range(4_000_000, 1000, -1) if not Path(f"/proc/{p}").exists() and not pid_alive(p))
    stale = {"host": socket.gethostname(), "pid": dead, "started": "2020-01-01T00:00:00+00:00"}
    (d / fmt.LOCK_FILE).write_text(json.dumps(stale))
    with caplog.at_level(logging.WARNING, logger="dinodist.core.target_store.lock"):
        w = StoreWriter(d, manifest(), dtype="fp32", resume=True)
    assert f"took over a stale target store lock of pid {dead}" in caplog.text
    assert f"pid {dead} is not running" in caplog.text and _lock(d)["pid"] == os.getpid()
    w.close()
    # A live pid whose process started at another time is a reused pid: stale as well.
    if held.get("pid_start") is not None:
        (d / fmt.LOCK_FILE).write_text(json.dumps(dict(held, pid_start=held["pid_start"] + 1)))
        StoreWriter(d, manifest(), dtype="fp32", resume=True).close()
        assert "now belongs to another process" in caplog.text
    # Another host's writer cannot be checked from here: refused, as is a lock nobody can read.
    (d / fmt.LOCK_FILE).write_text(json.dumps(dict(stale, host="elsewhere.invalid")))
    with pytest.raises(DinodistError, match=f"pid {dead} on elsewhere.invalid .*another host"):
        StoreWriter(d, manifest(), dtype="fp32", resume=True)
    (d / fmt.LOCK_FILE).write_text("{")
    with pytest.raises(DinodistError, match="unreadable target store lock"):
        StoreWriter(d, manifest(), dtype="fp32", resume=True)
    assert StoreReader(d).iterations() == [0]
