"""`dd train-detector` end to end: tiny SegFormer at 64 px on CPU, tiny hand-made datasets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dd.api.plugins import get_host
from dd.engines.train_detector import (
    detector_loss,
    dilate_targets,
    is_better,
    plot_curves,
)
from dd.training.schedule import lr_schedule
from tests.helpers import assert_two_rank_checkpoint, launch_dd_twice

TINY = ["--variant", "tiny", "--input-size", "64", "--batch-size", "4", "--log-every", "1"]
ARTIFACT = (250, 20, 200)  # a magenta square is the artifact; its mask is exact


def make_dataset(root: Path, n: int = 18, seed: int = 0, negatives: bool = True) -> Path:
    """Noisy images of 64-96 px; two of every three (all without ``negatives``) get a
    magenta square (hand or face, some pseudo-labelled, some with a manifest shrink_pad);
    the rest are real negatives."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    lines = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(64, 97, 2))
        img = (rng.random((h, w, 3)) * 80 + 60).astype(np.uint8)
        rec: dict = {"image": f"images/{i:03d}.png"}
        if i % 3 or not negatives:
            s = int(rng.integers(14, 30))
            y, x = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
            img[y : y + s, x : x + s] = ARTIFACT
            mask = np.zeros((h, w), np.uint8)
            mask[y : y + s, x : x + s] = 255
            Image.fromarray(mask).save(root / f"masks/{i:03d}.png")
            rec.update(
                mask=f"masks/{i:03d}.png",
                source="pseudo" if i % 4 == 1 else "synthetic",
                category=("hand", "face")[i % 2],
            )
            if i % 5 == 2:
                rec["shrink_pad"] = {"scale": 0.5}
        else:
            rec.update(mask=None, source="real")
        Image.fromarray(img).save(root / rec["image"])
        lines.append(json.dumps(rec))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "ds")


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _without_times(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "step_time_s"} for r in records]


# -- pieces ---------------------------------------------------------------------------------------
def test_detector_loss_hand_computed():
    logits = torch.full((2, 1, 4, 4), math.log(3.0))  # sigmoid = 0.75 everywhere
    target = torch.stack([torch.ones(1, 8, 8), torch.zeros(1, 8, 8)])
    # per sample: (0.75 - 1)^2 = 0.0625 and 0.75^2 = 0.5625; weights 1 and 2
    loss = detector_loss(logits, target, torch.tensor([1.0, 2.0]))
    assert float(loss) == pytest.approx((0.0625 + 2 * 0.5625) / 2)
    assert float(detector_loss(logits, target)) == pytest.approx((0.0625 + 0.5625) / 2)
    # the logits are upsampled bilinearly (align_corners=False) to the target size
    lg = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    up = torch.nn.functional.interpolate(lg, size=(16, 16), mode="bilinear", align_corners=False)
    assert float(detector_loss(lg, t)) == pytest.approx(float((up.sigmoid() - t).square().mean()))


def test_bce_pos_weight_weighs_only_artifact_pixels():
    logits = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    ln2 = math.log(2.0)
    assert float(detector_loss(logits, target, kind="bce")) == pytest.approx(ln2)
    got = float(detector_loss(logits, target, kind="bce", pos_weight=5.0))
    assert got == pytest.approx((5 * ln2 + 3 * ln2) / 4)


def test_dilate_targets_grows_masks_by_exactly_n_pixels():
    t = torch.zeros(1, 1, 9, 9)
    t[0, 0, 4, 4] = 1.0
    t[0, 0, 0, 8] = 0.5  # soft values keep their value
    assert torch.equal(dilate_targets(t, 0), t)
    d = dilate_targets(t, 2)
    assert d.shape == t.shape
    assert torch.equal(d[0, 0, 2:7, 2:7], torch.ones(5, 5))
    assert d[0, 0, 1, 4] == 0 and d[0, 0, 7, 4] == 0 and d[0, 0, 4, 1] == 0
    assert d[0, 0, 0, 6] == 0.5 and d[0, 0, 2, 8] == 0.5 and d[0, 0, 0, 5] == 0
    assert int((d == 1).sum()) == 25


def test_cosine_schedule():
    f = lr_schedule("cosine", 10, 2, 0.1)
    assert [f(0), f(1), f(2)] == pytest.approx([0.5, 1.0, 1.0])
    assert f(6) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert f(10) == pytest.approx(0.1)
    assert lr_schedule("cosine", 4, 0, 0.0)(0) == pytest.approx(1.0)


def test_plot_curves_draws_a_png(tmp_path):
    recs = [{"type": "train", "step": s, "loss": 1 / s} for s in range(1, 30)]
    recs += [{"type": "val", "step": s, "mse": 0.3 - s / 100, "iou": s / 40} for s in (10, 20)]
    plot_curves(recs, tmp_path / "c.png", "iou")
    im = Image.open(tmp_path / "c.png")
    assert im.size == (960, 300) and im.mode == "RGB"
    arr = np.asarray(im)
    assert (np.abs(arr.astype(int) - (31, 119, 180)).sum(-1) == 0).sum() > 50  # the loss line
    assert (np.abs(arr.astype(int) - (214, 39, 40)).sum(-1) == 0).sum() > 10  # val iou


# -- end to end -----------------------------------------------------------------------------------
def test_train_writes_a_loadable_model_and_reports(tmp_path, data, cli):
    run = tmp_path / "run"
    res = cli(
        "train-detector", data, "--out", run, *TINY,
        "--steps", "8", "--lr", "2e-3", "--warmup-steps", "1", "--workers", "0",
        "--val-every", "4", "--save-every", "4", "--val-fraction", "0.25",
        "--balance", "hand=1:1,face=1:2",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "class balance" in res.output and "validation at step" in res.output
    for name in ("model/config.json", "model/model.safetensors", "README.md", "curves.png"):
        assert (run / name).is_file(), name
    assert not list(run.rglob("*.tmp")) and not list(run.rglob("*.old"))

    recs = _records(run)
    train = [r for r in recs if r["type"] == "train"]
    val = [r for r in recs if r["type"] == "val"]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert [r["step"] for r in val] == [4, 8]
    assert all(math.isfinite(r["loss"]) and r["lr"] >= 0 for r in train)
    assert {"mse", "kl_fn", "kl_fp", "iou", "image_auroc", "n_images"} <= set(val[0])
    assert val[0]["n_images"] == 4  # round(18 * 0.25) held out
    assert val[1]["mse"] < val[0]["mse"] < 0.25  # it learns (0.25: the untrained 0.5 maps)

    balance = json.loads((run / "balance.json").read_text())
    assert balance["train_samples"] == 14 and balance["spec"] == "hand=1:1,face=1:2"
    cats = {c["category"]: c for c in balance["categories"]}
    assert cats["face"]["ratio"] == "1:2" and cats["face"]["effective"] == "1:2.00"

    cfg = json.loads((run / "train_config.json").read_text())
    assert cfg["steps"] == 8 and cfg["variant"] == "tiny"
    card = (run / "README.md").read_text()
    assert "8 of 8 optimizer steps" in card and "input_size=64x64" in card

    # RUN/model is the best checkpoint and loads through the detector API
    best = json.loads((run / "checkpoints/best/best.json").read_text())
    best_step = min(val, key=lambda r: r["mse"])["step"]
    assert best["step"] == best_step and best["metric"] == "mse"
    det = get_host().detectors.get("segformer").load(str(run / "model"), input_size=64)
    assert det.variant == "tiny" and not det.untrained
    saved = load_file(str(run / "checkpoints/best/model/model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in det.model.state_dict().items())
    init = get_host().detectors.get("segformer").load(None, variant="tiny", input_size=64)
    assert any(not torch.equal(v, init.model.state_dict()[k]) for k, v in saved.items())

    res = cli(
        "detect", data / "images", "--out", tmp_path / "det", "--weights", run / "model",
        "-O", "input_size=64",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "UNTRAINED" not in res.output


def test_resume_gives_the_same_weights_and_metrics(tmp_path, data, cli):
    """6 steps straight == 3 (at the end of epoch 0; an on-the-fly shrink-pad check right
    after the checkpoint) or 4 (mid-epoch; flags restored from the checkpoint) + resume, with
    loader workers, class balance, pseudo labels and manifest shrink_pad in play."""
    opts = [
        data, *TINY, "--steps", "6", "--lr", "1e-3", "--workers", "2",
        "--val-every", "3", "--save-every", "2", "--val-fraction", "0.25",
        "--balance", "hand=1:1,*=1:2", "--shrink-pad-threshold", "0.55",
        "--shrink-pad-every", "3", "--shrink-pad-prob", "1", "--log-every", "2",
    ]  # fmt: skip
    a = tmp_path / "a"
    assert cli("train-detector", "--out", a, *opts).exit_code == 0
    ra = _records(a)
    assert [r["step"] for r in ra if r["type"] == "shrink_pad"] == [0, 3]
    # the loss is logged every 2 steps: a stop at step 3 leaves a half-full loss window
    assert [r["step"] for r in ra if r["type"] == "train"] == [2, 4, 6]
    wa = load_file(str(a / "checkpoints/last/model/model.safetensors"))
    sa = torch.load(a / "checkpoints/last/state.pt", weights_only=True)

    for stop in (3, 4):
        b = tmp_path / f"b{stop}"
        res = cli("train-detector", "--out", b, *opts, "--stop-at", stop)
        assert res.exit_code == 0, res.output
        trainer = json.loads((b / "checkpoints/last/trainer.json").read_text())
        assert trainer["state"]["step"] == stop
        # 14 training samples: 12 draws (3 batches) per epoch; step 3 ends epoch 0
        epoch, position = divmod(stop * 4 - 1, 12)
        assert (trainer["state"]["epoch"], trainer["state"]["position"]) == (epoch, position + 1)
        # a run killed after logging one more step left a line the checkpoint does not cover
        with open(b / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"type": "train", "step": stop + 1, "loss": 9.0}) + "\n")
        res = cli("train-detector", "--out", b, *opts, "--resume")
        assert res.exit_code == 0, res.output
        assert f"resuming at step {stop}" in res.output

        for sub in ("checkpoints/last/model", "model"):
            wb = load_file(str(b / sub / "model.safetensors"))
            ref = wa if sub != "model" else load_file(str(a / sub / "model.safetensors"))
            assert ref.keys() == wb.keys()
            assert all(torch.equal(ref[k], wb[k]) for k in ref), (stop, sub)
        sb = torch.load(b / "checkpoints/last/state.pt", weights_only=True)
        for i, st in sa["optimizer"]["state"].items():
            assert all(torch.equal(v, sb["optimizer"]["state"][i][k]) for k, v in st.items())
        assert _without_times(_records(b)) == _without_times(ra), stop


def test_resume_refuses_other_settings_and_existing_runs(tmp_path, data, cli):
    run = tmp_path / "run"
    base = [data, "--out", run, *TINY, "--steps", "2", "--workers", "0", "--val-fraction", "0"]
    base += ["--precision", "bf16", "--cpu"]  # CPU autocast in bfloat16
    assert cli("train-detector", *base).exit_code == 0
    assert (run / "model/model.safetensors").is_file()
    # no validation split (the stop line ends every training job's metrics since issue 30)
    assert [r["type"] for r in _records(run)] == ["train", "train", "stop"]
    res = cli("train-detector", *base)
    assert res.exit_code == 1 and "already holds a training run" in res.output
    res = cli("train-detector", *base, "--resume", "--lr", "1e-3")
    assert res.exit_code == 1 and "lr" in res.output and "different settings" in res.output


def test_is_better_knows_the_direction_of_each_metric():
    assert is_better("mse", 0.1, 0.2) and not is_better("mse", 0.3, 0.2)
    assert is_better("iou", 0.3, 0.2) and not is_better("iou", 0.1, 0.2)
    assert is_better("image_auroc", 0.9, 0.5) and is_better("kl_fp", 1.0, 2.0)
    assert not is_better("mse", 0.2, 0.2)  # ties keep the earlier step
    assert is_better("cc", -0.5, None)
    assert not is_better("cc", math.nan, None) and not is_better("cc", None, 0.1)


def test_early_stopping_when_the_metric_never_improves(tmp_path, data, cli):
    val = make_dataset(tmp_path / "val", n=4, seed=1, negatives=False)
    run = tmp_path / "run"
    res = cli(
        "train-detector", data, "--out", run, *TINY, "--val", val,
        "--steps", "10", "--workers", "0", "--val-every", "1",
        "--select-metric", "mse_clean", "--patience", "2",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    # no clean validation image: mse_clean is undefined, so no evaluation improves it
    assert "early stop at step 2" in res.output and "no best step: mse_clean" in res.output
    val_recs = [r for r in _records(run) if r["type"] == "val"]
    assert [(r["step"], r["best"], r["mse_clean"]) for r in val_recs] == [
        (1, False, None),
        (2, False, None),
    ]
    assert val_recs[0]["n_images"] == 4 and val_recs[0]["n_positive"] == 4
    assert not (run / "checkpoints/best").exists()
    last = load_file(str(run / "checkpoints/last/model/model.safetensors"))
    model = load_file(str(run / "model/model.safetensors"))
    assert all(torch.equal(last[k], model[k]) for k in last)  # no best: the last weights
    card = (run / "README.md").read_text()
    assert "(early stop)" in card and "2 of 10 optimizer steps" in card
    assert "mse_clean was never defined" in card


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [
        (["--precision", "fp16", "--cpu"], "fp16 needs a GPU", 1),  # this machine's limit
        (["--variant", "b9"], "unknown SegFormer variant", 1),  # the detector plugin's word
        (["--balance", "hand=1"], "bad --balance entry", 2),
        (["--select-metric", "accuracy"], "unknown --select-metric", 2),
        (["--shrink-pad-fill", "grey"], "bad --shrink-pad-fill", 2),
        (["--batch-size", "64"], "no full batch", 1),  # the data's size
        (["--pos-weight", "4"], "--pos-weight needs --loss bce", 2),
        (["--loss", "bce", "--pos-weight", "0"], "--pos-weight must be positive", 2),
        (["--mask-dilate", "-1"], "--mask-dilate must be 0 or more", 2),
    ],
)
def test_bad_input_is_one_error_line(tmp_path, data, cli, args, message, code):
    """Exit 2 for a usage mistake (with click's usage line), 1 for other errors."""
    base = ["--input-size", "64", "--steps", "1", "--workers", "0"]
    res = cli("train-detector", data, "--out", tmp_path / "run", *base, *args)
    assert res.exit_code == code, res.output
    assert message in res.output
    assert res.output.strip().splitlines()[-1].startswith("Error:")
    assert "Traceback" not in res.output
    if code == 2:
        assert "Usage: dd train-detector" in res.output and "for help" in res.output
    assert not (tmp_path / "run").exists()  # nothing written


def test_empty_dataset_is_an_error(tmp_path, cli):
    (tmp_path / "empty" / "images").mkdir(parents=True)
    res = cli("train-detector", tmp_path / "empty", "--out", tmp_path / "run", *TINY)
    assert res.exit_code == 1 and "no images found" in res.output


def test_two_cpu_processes_through_accelerate_launch(tmp_path, data):
    """DDP over gloo with two CPU processes: both train, rank 0 writes a loadable model."""
    run = tmp_path / "run"
    proc = launch_dd_twice([
        "train-detector", data, "--out", run,
        "--cpu", *TINY[:4], "--batch-size", "2", "--steps", "3", "--workers", "0",
        "--val-every", "3", "--log-every", "1", "--val-fraction", "0.25",
    ], timeout=240)  # fmt: skip
    assert "2 process(es), global batch 4" in proc.stderr
    last = assert_two_rank_checkpoint(run)
    r0 = torch.load(last / "rng_rank0.pt", weights_only=True)["torch"]
    r1 = torch.load(last / "rng_rank1.pt", weights_only=True)["torch"]
    assert not torch.equal(r0, r1)  # each process has its own dropout stream
    recs = _records(run)
    assert [r["step"] for r in recs if r["type"] == "train"] == [1, 2, 3]
    val = [r for r in recs if r["type"] == "val"]
    assert len(val) == 1 and val[0]["n_images"] == 4  # gathered from both processes
    det = get_host().detectors.get("segformer").load(str(run / "model"), input_size=64)
    out = det.predict(torch.rand(1, 3, 64, 64))
    assert out.shape == (1, 1, 64, 64) and torch.isfinite(out).all()


def test_bad_dataset_leaves_no_run_folder(tmp_path, cli):
    (tmp_path / "notadataset").mkdir()
    res = cli("train-detector", tmp_path / "notadataset", "--out", tmp_path / "run", *TINY)
    assert res.exit_code == 1 and "no images/ folder" in res.output
    assert not (tmp_path / "run").exists()


# -- learning on synthetic watermarks -------------------------------------------------------------
def test_tiny_detector_learns_synthetic_watermarks(tmp_path, cli):
    """300 steps from scratch on `dd synth` watermarks (64 px, procedural backgrounds, opacity
    0.9-1): validation MSE falls below the untrained detector's and IoU at p >= 0.5 on
    held-out watermarks clears a bound set at about half the measured value (measured here:
    watermark IoU 0.19, pixel AUROC 0.83, CC 0.36, MSE 0.10; untrained: IoU 0.06, AUROC 0.53,
    CC 0.02, MSE 0.24)."""
    from dd.data.datasets import read_dataset
    from dd.data.synth import synthesize
    from dd.inference.metrics import evaluate_detector

    kw = {"size": 64, "kinds": ["watermark"], "watermark_opacity": (0.9, 1.0)}
    kw.update(negative_ratio=0.2, use_skimage=False, progress=False)
    synthesize(tmp_path / "train", 160, seed=3, **kw)
    synthesize(tmp_path / "val", 32, seed=4, **kw)
    run = tmp_path / "run"
    res = cli(
        "train-detector", tmp_path / "train", "--val", tmp_path / "val", "--out", run,
        "--variant", "tiny", "--input-size", "64", "--batch-size", "8", "--steps", "300",
        "--lr", "3e-3", "--warmup-steps", "10", "--loss", "bce", "--pos-weight", "10",
        "--crop-scale", "1.0", "--val-every", "100", "--save-every", "300", "--workers", "0",
        "--log-every", "50", "--seed", "0",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    val = [r for r in _records(run) if r["type"] == "val"]
    assert [r["step"] for r in val] == [100, 200, 300]

    untrained = get_host().detectors.get("segformer").load(None, variant="tiny", input_size=64)
    before = evaluate_detector(untrained, read_dataset(tmp_path / "val"), workers=1)
    last = val[-1]
    assert last["mse"] < before["mse"] / 2, (last["mse"], before["mse"])
    # The untrained map hovers around 0.5, so it "finds" about half of every image: IoU 0.06.
    wm, wm0 = last["by_category"]["watermark"], before["by_category"]["watermark"]
    assert wm["iou"] >= max(0.12, 2 * wm0["iou"]), (wm, wm0)
    assert wm["pixel_auroc"] >= 0.75 > wm0["pixel_auroc"] + 0.1, (wm, wm0)
    assert wm["cc"] >= 0.2, wm


def test_init_with_a_mismatching_variant_hints_the_commands_own_flag(data, tmp_path, cli):
    """The embedded default is variant small: --variant b0 with it names --variant small."""
    from dd_plugins.segformer import DEFAULT_WEIGHTS

    res = cli("train-detector", data, "--out", tmp_path / "run", "--init",
              DEFAULT_WEIGHTS / "model.safetensors",
              "--variant", "b0", "--steps", "1")  # fmt: skip
    assert res.exit_code == 1, res.output
    assert "--variant small" in res.output and "--option" not in res.output
    helptext = cli("train-detector", "--help").output
    assert "small" in helptext


def test_any_trainable_detector_plugin_can_be_trained(data, tmp_path, cli):
    """--detector NAME trains a plugin detector that implements TrainableDetector; one that
    does not is refused in one line."""
    import types

    from dd_plugins.segformer import SegformerDetector

    from dd.api.hookspecs import hookimpl
    from dd.api.plugins import PluginHost, reset_host

    class Mini(SegformerDetector):  # a third party's trainable detector
        name = "mini"
        default_train_options = {"variant": "tiny"}

    from dd.api.detectors import Detector

    class Untrainable(Detector):
        name = "untrainable"

        @classmethod
        def load(cls, weights=None, *, device="cpu", dtype=torch.float32):
            return cls()

        def logits(self, images):
            return images[:, :1]

    host = PluginHost()
    mod = types.ModuleType("third")
    mod.dd_register_detectors = hookimpl(lambda register: (register(Mini), register(Untrainable)))
    host.add(mod, name="third")
    reset_host(host)
    res = cli("train-detector", data, "--out", tmp_path / "run", "--detector", "mini",
              "--input-size", "64", "--steps", "2", "--batch-size", "4")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "mini artifact detector" in (tmp_path / "run" / "README.md").read_text()
    res = cli("train-detector", data, "--out", tmp_path / "run2", "--detector", "untrainable",
              "--steps", "1")  # fmt: skip
    assert res.exit_code == 1 and "cannot be trained by dd train-detector" in res.output


def test_a_calibrated_threshold_is_not_inherited_by_a_fine_tuned_detector(data, tmp_path, cli):
    """--init from weights with a calibrated image threshold: the trained weights are not
    calibrated, so their config carries none (detect falls back to 0.5)."""
    factory = get_host().detectors.get("segformer")
    start = factory.load(None, variant="tiny", input_size=64)
    start.image_threshold = 0.83
    start.save_pretrained(tmp_path / "start")
    again = factory.load(str(tmp_path / "start"))
    assert again.image_threshold == pytest.approx(0.83) and again.flag_threshold == 0.83
    assert again.describe()["threshold_calibrated"] is True

    res = cli("train-detector", data, "--out", tmp_path / "run", "--init", tmp_path / "start",
              "--steps", "2", "--val-every", "2", "--workers", "0")  # fmt: skip
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert "dd_image_threshold" not in cfg
    tuned = factory.load(str(tmp_path / "run" / "model"))
    assert tuned.image_threshold is None and tuned.flag_threshold == 0.5
