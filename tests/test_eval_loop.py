"""Quality measured in the loop: the topology's `eval:`, teacher agreement / cosine, sharded k-NN, summary."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from PIL import Image

from dinodist.core.errors import DinodistError
from tests.gloo import run_gloo
from tests.test_distill import REPO, distill_cmd, env, metrics_lines, wait_for, write_topology

CLASSES = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


def labelled_folder(root: Path, per_class: int, seed: int = 0) -> Path:
    """One sub-folder per class (the ImageFolder labels of core/data/sources.py), noisy tinted squares."""
    rng = np.random.default_rng(seed)
    for name, rgb in CLASSES.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise = rng.integers(-40, 40, size=(16, 16, 3))
            img = np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i:02d}.png")
    return root


def base_topology(tmp_path: Path, **eval_section) -> dict:
    path = write_topology(tmp_path / "t.yaml", teacher_devices=1, shard="replicate", students=["tiny-vits"],
                          iterations=3)
    raw = yaml.safe_load(path.read_text())
    if eval_section:
        raw["eval"] = eval_section
    return raw


def parse(raw: dict):
    from dinodist.orchestrator.topology import parse_topology

    return parse_topology(raw)


# ------------------------------------------------------------------------------------- topology


@pytest.mark.parametrize("section,message", [
    ({"every": 0, "knn": {"train": "folder:/x", "test": "folder:/y"}}, "eval.every"),
    ({"every": 2}, "eval.knn"),
    ({"every": 2, "knn": {"train": "folder:/x", "test": "folder:/y", "kk": 3}}, "eval.knn: unknown key 'kk'"),
    ({"every": 2, "knn": {"train": "skimage", "test": "folder:/y"}}, "eval.knn.train: skimage has no labels"),
    ({"every": 2, "knn": {"train": "folder:/x", "test": "mnist:/y"}}, "eval.knn.test: unknown data source"),
    ({"every": 2, "knn": {"train": "folder:/x", "test": "folder:/y", "image_size": 30}},
     "eval.knn.image_size: 30 is not a multiple of the patch size 8"),
    ({"every": 2, "knn": {"train": "folder:/x", "test": "folder:/y", "k": 0}}, "eval.knn.k"),
    ({"every": "2", "knn": {"train": "folder:/x", "test": "folder:/y"}}, "eval.every"),
])
def test_eval_section_errors_name_the_field(tmp_path, section, message):
    with pytest.raises(DinodistError) as err:
        parse(base_topology(tmp_path, **section))
    text = str(err.value)
    assert message in text and "\n" not in text, text


def test_eval_section_defaults_and_unlabelled_folder_refused_by_the_driver(tmp_path):
    from dinodist.orchestrator.runtime.jobs import knn_settings, student_job, teacher_job
    from dinodist.orchestrator.topology import eval_indexes

    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "a.png")
    good = labelled_folder(tmp_path / "train", 2)
    topo = parse(base_topology(tmp_path, every=2, knn={"train": f"folder:{good}", "test": f"folder:{flat}"}))
    k = topo.eval.knn
    assert (k.limit_train, k.limit_test, k.k, k.temperature) == (10000, 2000, 20, 0.07)
    assert topo.eval.teacher is True
    s = knn_settings(topo, tmp_path / "out")
    assert s.image_size == topo.data.global_crop_size and s.every == 2 and s.train_index is None
    with pytest.raises(DinodistError, match=r"^eval\.knn\.test: folder:.* has no labels"):
        eval_indexes(topo, tmp_path)
    assert student_job(topo, "tiny-vits", tmp_path).knn is not None and teacher_job(topo, tmp_path).knn
    no_teacher = parse(base_topology(tmp_path, every=2, teacher=False,
                                     knn={"train": f"folder:{good}", "test": f"folder:{good}"}))
    assert teacher_job(no_teacher, tmp_path).knn is None
    assert student_job(parse(base_topology(tmp_path)), "tiny-vits", tmp_path).knn is None


def test_a_rank_refuses_an_unlabelled_source_at_startup_in_one_line(tmp_path):
    from dinodist.core.eval.inloop import KnnSettings, ShardedKnn

    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "a.png")
    s = KnnSettings(every=1, train=f"folder:{flat}", test=f"folder:{flat}", train_index=None, test_index=None,
                    limit_train=None, limit_test=None, image_size=16, k=3, temperature=0.07, batch_size=4)
    with pytest.raises(DinodistError, match=r"^eval\.knn\.train: folder:.* has no labels; k-NN needs"):
        ShardedKnn(s, None, 0, 1, torch.device("cpu"))


def test_eval_ids_spread_over_class_folders():
    from dinodist.core.eval.inloop import due, eval_ids

    assert eval_ids(10, None) == list(range(10)) and eval_ids(3, 5) == [0, 1, 2]
    assert eval_ids(30, 3) == [0, 10, 20]  # one per class of 3 sorted class folders of 10
    assert [it for it in range(7) if due(it, 7, 3)] == [2, 5, 6]


# ------------------------------------------------------------------------- agreement and cosine


def _direct(s_logits: torch.Tensor, t_logits: torch.Tensor, t_probs: torch.Tensor) -> tuple[float, float]:
    """Row by row, the plain definitions (the student's argmax is the teacher target's; cosine of the
    mean-removed logit vectors)."""
    agree, cos = 0, 0.0
    for s, t, p in zip(s_logits.double(), t_logits.double(), t_probs.double()):
        agree += int(int(s.argmax()) == int(p.argmax()))
        cos += float(F.cosine_similarity(s - s.mean(), t - t.mean(), dim=0))
    return agree / len(s_logits), cos / len(s_logits)


def test_agreement_chunked_equals_full_and_direct():
    from dinodist.core.losses import sinkhorn_knopp, sinkhorn_knopp_chunked
    from dinodist.students.loss import agreement_sums_, agreement_sums_chunked

    g = torch.Generator().manual_seed(0)
    zs = F.normalize(torch.randn(13, 8, generator=g), dim=-1)
    zt = F.normalize(torch.randn(13, 8, generator=g), dim=-1)
    ws, wt = torch.randn(50, 8, generator=g), torch.randn(50, 8, generator=g)
    temp = 0.07
    t_probs = sinkhorn_knopp(zt @ wt.t(), temp)
    # some rows agree for sure: their student logits peak at the teacher target's prototype
    hot = t_probs[:5].argmax(-1)
    ws = F.normalize(ws, dim=-1)  # unit prototypes: a unit row scores highest on its own prototype
    zs[:5] = ws[hot]
    s_logits = zs @ ws.t()
    assert (s_logits[:5].argmax(-1) == hot).all()
    full = agreement_sums_(s_logits.clone(), zt @ wt.t(), t_probs) / 13
    want = _direct(s_logits, zt @ wt.t(), t_probs)
    scaling = sinkhorn_knopp_chunked(zt, wt, temp, chunk_rows=4)
    for chunk in (1, 4, 13, 100):
        got = agreement_sums_chunked(zs, ws, scaling, chunk) / 13
        assert torch.allclose(got, full, atol=1e-6), (chunk, got, full)
    assert full[0].item() == pytest.approx(want[0]) and want[0] >= 5 / 13
    assert full[1].item() == pytest.approx(want[1], abs=1e-6)
    # the target's argmax, not the raw logits': Sinkhorn-Knopp moves it for some rows here
    assert (t_probs.argmax(-1) != (zt @ wt.t()).argmax(-1)).any()




def test_student_quality_chunked_path_equals_unchunked_and_direct(tmp_path, world):
    from dinodist.core.data.loader import BatchLoader
    from dinodist.core.data.sources import build_source
    from dinodist.core.distributed import group_mesh
    from dinodist.core.losses import sinkhorn_knopp
    from dinodist.core.targets import HEADS, crop_major, masks_from_collated
    from dinodist.orchestrator.runtime.jobs import student_job, teacher_job
    from dinodist.students.loss import attach_chunked_losses, chunked_heads_loss, distill_loss
    from dinodist.students.model import build_student, shard_student
    from dinodist.teacher.model import last_layers, load_teacher
    from dinodist.teacher.targets import compute_targets

    topo = parse(base_topology(tmp_path))
    sj, tj = student_job(topo, "tiny-vits", tmp_path), teacher_job(topo, tmp_path)
    g = tj.global_batch
    loaded = load_teacher(tj.arch, tj.overrides, None, tj.kind, tj.dino_head, tj.ibot_head, tj.seed)
    last = last_layers(loaded.model)
    tl = BatchLoader(build_source(tj.source), dataclasses.replace(tj.crops, n_local=0), g, tj.seed,
                     slice(0, g), loaded.spec.patch_size)
    sl = BatchLoader(build_source(sj.source), sj.crops, g, sj.seed, slice(0, g), 8)
    try:
        batch = sl.get(0)
        tgt = crop_major(compute_targets(loaded.model, tl.get(0), 0, 0, tj.kind, torch.device("cpu")),
                         masks_from_collated(batch["collated_masks"]))
    finally:
        tl.close()
        sl.close()
    quality, losses = {}, {}
    for chunk in (0, 3):  # 3 rows per chunk: 2 x 4 global crops in chunks of 3, 3, 2
        s = shard_student(build_student(sj.arch, sj.overrides, sj.kind, sj.dino_head, sj.ibot_head,
                                        sj.teacher_dim, sj.seed), group_mesh(world, [0], "cpu"))
        cfg = dataclasses.replace(sj.loss, loss_chunk_rows=chunk)
        q: dict = {}
        torch.manual_seed(5)
        if chunk:
            attach_chunked_losses(s)
            losses[chunk] = chunked_heads_loss(s, batch, tgt, last, sj.crops.n_local, cfg, group=world,
                                               quality=q)[0]
        else:
            out = s(batch["collated_global_crops"], batch["collated_local_crops"], batch["mask_indices_list"])
            losses[chunk] = distill_loss(HEADS, out, tgt, last, batch, sj.crops.n_local, cfg, group=world,
                                         quality=q)[0]
            t_logits = tgt["dino"] @ last["dino_last_layer.weight"].t()
            direct = _direct(out["dino"][: 2 * g].detach(), t_logits,
                             sinkhorn_knopp(t_logits, sj.loss.teacher_temp, group=world))
        assert not any(v.requires_grad for v in q.values())
        quality[chunk] = {k: v.item() for k, v in q.items()}
    assert quality[0].keys() == quality[3].keys() == {"teacher_agreement", "teacher_cosine"}
    assert quality[0]["teacher_agreement"] == quality[3]["teacher_agreement"] == pytest.approx(direct[0])
    assert quality[0]["teacher_cosine"] == pytest.approx(quality[3]["teacher_cosine"], abs=1e-6)
    assert quality[0]["teacher_cosine"] == pytest.approx(direct[1], abs=1e-6)
    assert losses[0].item() == pytest.approx(losses[3].item(), abs=1e-5)


def test_features_targets_report_the_cls_cosine_and_no_agreement():
    from dinodist.students.loss import LossConfig, features_loss

    g = torch.Generator().manual_seed(1)
    out = {"proj_cls": torch.randn(6, 5, generator=g), "proj_patch": torch.randn(6, 4, 5, generator=g),
           "g_cls": torch.randn(6, 7, generator=g)}
    tgt = {"cls": torch.randn(6, 5, generator=g), "patch": torch.randn(6, 4, 5, generator=g)}
    cfg = LossConfig(teacher_temp=0.07, student_temp=0.1, ibot_weight=1.0, koleo_weight=0.1,
                     loss_chunk_rows=0, loss_precision="auto")
    q: dict = {}
    _, terms = features_loss(out, tgt, cfg, q)
    assert set(q) == {"teacher_cosine"}
    want = F.cosine_similarity(out["proj_cls"], tgt["cls"], dim=-1).mean()
    assert q["teacher_cosine"].item() == pytest.approx(want.item())
    assert terms["cls_cosine"].item() == pytest.approx(1 - want.item())


# -------------------------------------------------------------- the loop: losses unchanged by eval


def test_losses_are_bit_identical_with_eval_on_and_off(tmp_path, world):
    from dinodist.orchestrator.runtime.inline import run_inline

    folder = labelled_folder(tmp_path / "labelled", 3)
    lines = {}
    for on in (False, True):
        raw = base_topology(tmp_path)
        if on:
            raw["eval"] = {"every": 1, "knn": {"train": f"folder:{folder}", "test": f"folder:{folder}",
                                               "k": 3, "image_size": 16, "batch_size": 4}}
        path = tmp_path / f"topo-{on}.yaml"
        path.write_text(yaml.safe_dump(raw))
        out = tmp_path / f"out-{on}"
        torch.manual_seed(0)
        run_inline(path, "tiny-vits", out, iterations=3)
        lines[on] = metrics_lines(out / "tiny-vits" / "metrics.jsonl")
    assert [r["iteration"] for r in lines[True]] == [0, 1, 2]
    terms = ("loss", "dino_global", "dino_local", "ibot", "koleo", "teacher_agreement", "teacher_cosine")
    for off_row, on_row in zip(lines[False], lines[True]):
        for key in terms:
            assert off_row[key] == on_row[key], (key, off_row[key], on_row[key])  # bit for bit
        assert "knn_top1" not in off_row and 0 <= on_row["knn_top1"] <= 1 and on_row["knn_seconds"] > 0
        assert 0 <= on_row["teacher_agreement"] <= 1 and -1 <= on_row["teacher_cosine"] <= 1
    side = json.loads((tmp_path / "out-True" / "tiny-vits" / "backbone-best.pth.json").read_text())
    best = max(lines[True], key=lambda r: r["knn_top1"])
    assert side["source"]["iteration"] == best["iteration"] + 1


# ----------------------------------------------------------------- sharded extraction, 2 gloo ranks


def _sharded_features(rank: int, folder: str, out: str) -> None:
    from dinodist.core.distributed import group_mesh
    from dinodist.core.eval.inloop import KnnSettings, ShardedKnn, backbone_forward
    from dinodist.core.models.arch import TINY_DINO_HEAD, TINY_IBOT_HEAD
    from dinodist.students.model import build_student, make_ema, shard_student

    s = KnnSettings(every=1, train=f"folder:{folder}", test=f"folder:{folder}", train_index=None,
                    test_index=None, limit_train=7, limit_test=None, image_size=16, k=3, temperature=0.07,
                    batch_size=2)  # 7 images on 2 ranks (3 + 4) in batches of 2: rank 0 pads one forward
    student = build_student("tiny-vits", {"depth": 2}, "heads", TINY_DINO_HEAD, TINY_IBOT_HEAD, 0, seed=1)
    ema = make_ema(student)
    group = dist.group.WORLD
    shard_student(ema, group_mesh(group, [0, 1], "cpu"))
    knn = ShardedKnn(s, group, rank, 2, torch.device("cpu"))
    assert knn.train.shares == [3, 4] and knn.train.steps == 2
    feats = knn.features(backbone_forward(ema), knn.train)
    top1, _ = knn.evaluate(backbone_forward(ema))
    if rank == 0:
        torch.save({"feats": feats, "top1": top1}, Path(out) / "sharded.pt")


@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_sharded_extraction_equals_single_rank(tmp_path):
    from dinodist.core.data.sources import build_source
    from dinodist.core.eval import extract_features
    from dinodist.core.eval.inloop import eval_ids
    from dinodist.core.models.arch import TINY_DINO_HEAD, TINY_IBOT_HEAD
    from dinodist.students.model import build_student

    folder = labelled_folder(tmp_path / "labelled", 4)  # 12 images, 7 spread over them
    run_gloo(_sharded_features, 2, tmp_path, str(folder), str(tmp_path), timeout_s=100)
    got = torch.load(tmp_path / "sharded.pt")
    backbone = build_student("tiny-vits", {"depth": 2}, "heads", TINY_DINO_HEAD, TINY_IBOT_HEAD, 0,
                             seed=1).backbone.eval()
    src = build_source(f"folder:{folder}")
    ids = eval_ids(len(src), 7)

    class Subset:
        name = "subset"

        def __len__(self):
            return len(ids)

        def load(self, i):
            return src.load(ids[i])

        def label(self, i):
            return src.label(ids[i])

    want, labels = extract_features(backbone, Subset(), 16, batch_size=5)
    assert got["feats"].shape == want.shape == (7, 48)
    assert torch.allclose(got["feats"], want, atol=1e-5), (got["feats"] - want).abs().max()
    assert labels.tolist() == [src.label(i) for i in ids] and got["top1"] is not None


# ------------------------------------------------------------------------------- summary, resume


def test_summary_best_backbone_only_when_its_sidecar_matches(tmp_path):
    from dinodist.orchestrator.distill import _knn_summary, quality_line

    g = tmp_path / "s"
    g.mkdir()
    rows = [{"iteration": 0, "teacher_agreement": 0.1},
            {"iteration": 1, "knn_top1": 0.5, "knn_seconds": 1.0},
            {"iteration": 3, "knn_top1": 0.7, "knn_seconds": 2.0},
            {"iteration": 5, "knn_top1": 0.7, "knn_seconds": 3.0},
            {"iteration": 6, "knn_top1": 0.6, "knn_seconds": 2.0}]
    (g / "backbone-best.pth.json").write_text(json.dumps({"source": {"iteration": 9}}))  # abandoned timeline
    knn = _knn_summary(rows, g)
    assert (knn["last"], knn["last_iteration"], knn["best"], knn["best_iteration"]) == (0.6, 6, 0.7, 3)
    assert knn["best_backbone"] is None and knn["evaluations"] == 4 and knn["mean_seconds"] == 2.0
    (g / "backbone-best.pth.json").write_text(json.dumps({"source": {"iteration": 4}}))
    assert _knn_summary(rows, g)["best_backbone"] == str(g / "backbone-best.pth")
    line = quality_line({"teacher_agreement": {"first": 0.1, "first_iteration": 0, "last": 0.5,
                                               "last_iteration": 6}, "knn_top1": _knn_summary(rows, g)})
    assert line == ("agreement 0.100 (it 0) -> 0.500 (it 6), k-NN top-1 0.600 (it 6; best 0.700 at it 3, "
                    "backbone-best.pth)")
    assert _knn_summary(rows[:1], g) is None


def test_summary_agreement_is_a_mean_over_each_end_of_the_run():
    from dinodist.orchestrator.distill import QUALITY_WINDOW, _first_last, quality_line

    rows = [{"iteration": i, "teacher_cosine": i / 100} for i in range(30)] + [{"iteration": 30}]
    q = _first_last(rows, "teacher_cosine")
    w = QUALITY_WINDOW
    assert q["window"] == w and (q["first_iteration"], q["last_iteration"]) == (0, 29)
    assert q["first"] == pytest.approx(sum(range(w)) / w / 100)
    assert q["last"] == pytest.approx(sum(range(30 - w, 30)) / w / 100)
    assert quality_line({"teacher_cosine": q}) == (f"cosine {q['first']:.3f} (it 0-{w - 1}) -> "
                                                   f"{q['last']:.3f} (it {30 - w}-29)")
    # a short run: half its rows at each end, so the two ends never overlap
    assert _first_last(rows[:3], "teacher_cosine")["window"] == 1
    assert _first_last(rows[30:], "teacher_cosine") is None


# ------------------------------------------------------------------------------------ end to end


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_distill_with_eval_end_to_end(tmp_path):
    """A 2-rank student group and a 1-rank teacher: k-NN rows at every 2nd and the last iteration,
    agreement every iteration, summary fields, the Prometheus gauges, the printed lines."""
    iterations, every = 5, 2
    train = labelled_folder(tmp_path / "train", 4, seed=0)
    test = labelled_folder(tmp_path / "test", 3, seed=1)
    path = write_topology(tmp_path / "t.yaml", teacher_devices=1, shard="replicate", students=["tiny-vits"],
                          iterations=iterations, devices={"tiny-vits": 2})
    raw = yaml.safe_load(path.read_text())
    raw["eval"] = {"every": every, "knn": {"train": f"folder:{train}", "test": f"folder:{test}", "k": 5,
                                           "image_size": 16, "batch_size": 4}}
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    proc = subprocess.Popen(distill_cmd(path, out), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    want = ('dinodist_teacher_agreement_ratio{group="tiny-vits"}',
            'dinodist_teacher_cosine{group="tiny-vits"}', 'dinodist_knn_top1_ratio{group="tiny-vits"}')
    try:
        def scrape() -> str | None:
            try:
                url = json.loads((out / "run.json").read_text())["metrics_url"]
                text = urllib.request.urlopen(url, timeout=2).read().decode()
            except (OSError, ValueError, KeyError):
                return None
            return text if all(w in text for w in want) else None

        scraped = wait_for(scrape, 240, proc, every=0.1)
        stdout, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stdout
    assert scraped, "no /metrics scrape with the quality gauges during the run:\n" + stdout
    for line in scraped.splitlines():
        if line.startswith(want[0]) or line.startswith(want[2]):
            assert 0 <= float(line.split()[-1]) <= 1, line

    rows = metrics_lines(out / "tiny-vits" / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == list(range(iterations))
    assert [r["iteration"] for r in rows if "knn_top1" in r] == [1, 3, 4]
    assert all(0 <= r["teacher_agreement"] <= 1 and -1 <= r["teacher_cosine"] <= 1 for r in rows)
    assert all(r["knn_seconds"] > 0 for r in rows if "knn_top1" in r)
    summary = json.loads((out / "summary.json").read_text())
    g = summary["groups"]["tiny-vits"]
    evals = [r for r in rows if "knn_top1" in r]
    best = max(evals, key=lambda r: r["knn_top1"])
    assert g["knn_top1"]["last"] == evals[-1]["knn_top1"] and g["knn_top1"]["best"] == best["knn_top1"]
    assert g["knn_top1"]["best_iteration"] == best["iteration"]
    assert g["knn_top1"]["best_backbone"] == str(out / "tiny-vits" / "backbone-best.pth")
    assert g["teacher_agreement"]["first_iteration"] == 0 and g["teacher_agreement"]["last_iteration"] == 4
    assert 0 <= summary["groups"]["teacher"]["knn_top1"]["last"] <= 1
    assert "tiny-vits      agreement" in stdout and "k-NN top-1" in stdout, stdout
    assert (out / "eval-index-train.json").is_file()
    # the 2-rank group's sharded number is the single-rank k-NN of its final EMA backbone
    from dinodist.core.eval.backbone import load_eval_backbone
    from dinodist.core.eval.inloop import KnnSettings, ShardedKnn

    backbone, _, _ = load_eval_backbone(str(out / "tiny-vits"), None)
    s = KnnSettings(every=1, train=f"folder:{train}", test=f"folder:{test}", train_index=None,
                    test_index=None, limit_train=10000, limit_test=2000, image_size=16, k=5, temperature=0.07,
                    batch_size=3)
    top1, _ = ShardedKnn(s, None, 0, 1, torch.device("cpu")).evaluate(lambda x: backbone(x))
    assert top1 == evals[-1]["knn_top1"]
