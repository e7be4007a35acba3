"""`dd refine` on tiny pipelines of the real classes (LDM at 32-64 px, FLUX at 64 px, CPU).

Covers the step semantics (``--late-steps 500-750`` noises to t = 500 and denoises 500 ->
250 with the segment's model, then 250 -> 0 with the next), diffusers' ``--strength``, the
flow-matching shift, masks (pixels outside are bit-identical to the input), chained
segments (which model ran which step, by call records), ``--until-clean``, outputs, resume
and one-line errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dd.api.plugins import get_host
from dd.engines.refine import (
    Segment,
    build_plan,
    composite,
    mask_from_map,
    plan_segments,
    strength_plan,
)
from dd.errors import DDError
from dd.testing.tiny import build_tiny, tiny_pipeline_path
from tests.helpers import TINY_DETECTOR as DET

#: Tiny models on a shared CPU run several times faster on one thread.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def other_ldms(tmp_path_factory) -> tuple[Path, Path]:
    """Two more tiny LDMs (other seeds) to serve as segment models."""
    root = tmp_path_factory.mktemp("segments")
    return build_tiny("ldm", root / "A", seed=1), build_tiny("ldm", root / "B", seed=2)


def write_images(folder: Path, n: int = 2, size: tuple[int, int] = (32, 32)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = (rng.random((*size, 3)) * 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img{i}.png")
    return folder


def load_ldm(path: Path):
    return get_host().backbones.get("ldm").from_pretrained(str(path))


@pytest.fixture
def calls(monkeypatch) -> list[tuple[str, int]]:
    """Records (model folder, timestep) of every LDM denoiser call."""
    from dd_plugins.ldm import LDMBackbone

    records: list[tuple[str, int]] = []
    real = LDMBackbone.predict

    def predict(self, latents, timestep, *args, **kwargs):
        records.append((Path(self.source).name, int(timestep[0])))
        return real(self, latents, timestep, *args, **kwargs)

    monkeypatch.setattr(LDMBackbone, "predict", predict)
    return records


# ------------------------------------------------------------------------------------------
# Step semantics
# ------------------------------------------------------------------------------------------
def test_late_steps_plan_ddim(tiny_ldm):
    bb = load_ldm(tiny_ldm)
    plan = build_plan(bb, plan_segments("500-750", []), 20, 32, 32)
    ts = plan.schedule.timesteps.tolist()
    assert ts == [500, 450, 400, 350, 300, 250, 200, 150, 100, 50]
    assert plan.owner == [0] * 5 + [1] * 5
    assert [(s.start, s.end, s.model) for s in plan.segments] == [
        (500, 750, None),
        (750, 1000, None),
    ]
    ac = bb.alphas_cumprod()
    assert torch.allclose(plan.schedule.alphas[:-1], ac[torch.tensor(ts)])
    text = "\n".join(plan.describe())
    assert "noise the input to t = 500" in text
    assert "steps 500-750: t 500 450 400 350 300 -> 250" in text
    # step 0 is t = 999
    full = build_plan(bb, plan_segments("0-1000", []), 10, 32, 32)
    assert full.schedule.timesteps[0] == 999 and len(full.schedule) == 10


def test_strength_is_diffusers_img2img(tiny_ldm):
    from diffusers import DDIMScheduler

    bb = load_ldm(tiny_ldm)
    plan = strength_plan(bb, 0.5, 10, 32, 32)
    sched = DDIMScheduler.from_config(bb.pipe.scheduler.config)
    sched.set_timesteps(10)
    init = int(10 * 0.5)
    assert plan.schedule.timesteps.tolist() == sched.timesteps[10 - init :].tolist()


def test_flow_plan_takes_the_shift_into_account(tmp_path_factory):
    """FLUX dev (dynamic shift): steps 0-1000 give exactly the backbone's sampling schedule;
    500-1000 starts at sigma shift(0.5), where a full run is after half its steps."""
    path = tiny_pipeline_path("flux", tmp_path_factory, guidance=True)
    bb = get_host().backbones.get("flux").from_pretrained(str(path))
    full = bb.make_schedule(8, 64, 64)
    plan = build_plan(bb, plan_segments("0-1000", []), 8, 64, 64)
    assert torch.allclose(plan.schedule.sigmas, full.sigmas)
    assert torch.allclose(plan.schedule.timesteps, full.timesteps)
    half = build_plan(bb, plan_segments("500-1000", []), 8, 64, 64)
    assert torch.allclose(half.schedule.sigmas, full.sigmas[4:])
    assert float(half.schedule.sigmas[0]) > 0.5  # shifted towards noise, not 0.5
    assert "sigmas" in "\n".join(half.describe())


def test_plan_segments_fill_gaps_and_reject_overlaps(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    segs = plan_segments("250-500", [f"750-1000={b}"])
    assert [(s.start, s.end, s.model) for s in segs] == [
        (250, 500, None),
        (500, 750, None),
        (750, 1000, str(b)),
    ]
    with pytest.raises(DDError, match="overlap"):
        plan_segments(None, [f"500-750={a}", f"600-900={b}"])
    with pytest.raises(DDError, match="0 <= A < B"):
        plan_segments("750-500", [])
    assert [s.start for s in plan_segments(None, [f"500-750={a}"])] == [500, 750]
    assert Segment(0, 1).label == "base"


# ------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------
def test_refine_first_call_is_the_resolved_timestep(cli, tiny_ldm, tmp_path, calls):
    imgs = write_images(tmp_path / "in", n=3)
    (imgs / "img0.txt").write_text("a sidecar prompt")
    out = tmp_path / "out"
    res = cli(
        "refine", imgs, "--backbone", "ldm", "--model", tiny_ldm, "--late-steps", "500-750",
        "--steps", "20", "--out", out, "--batch-size", "2", *DET,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "noise the input to t = 500" in res.output
    assert "t 500 450 400 350 300 -> 250" in res.output
    # the summary says what its figures are: means over the images of per-image maxima
    assert "averaged over the images: per-image max" in " ".join(res.output.split())
    # 3 images in batches of 2: two runs of 10 calls; each starts at the resolved t = 500
    assert [t for _, t in calls] == [500, 450, 400, 350, 300, 250, 200, 150, 100, 50] * 2
    recs = [json.loads(x) for x in (out / "report.jsonl").read_text().splitlines()]
    assert [r["key"] for r in recs] == ["img0", "img1", "img2"]
    assert recs[0]["prompt"] == "a sidecar prompt"
    for r in recs:
        assert set(r["before"]) == {"mean", "max"} and set(r["after"]) == {"mean", "max"}
        assert (out / r["output"]).is_file() and (out / r["compare"]).is_file()
        refined = np.asarray(Image.open(out / r["output"]))
        assert refined.shape == (32, 32, 3)
        assert not np.array_equal(refined, np.asarray(Image.open(r["image"])))
    assert (out / "report.csv").read_text().splitlines()[0].startswith("key,image,output")
    assert "t 500" in (out / "plan.txt").read_text()
    # resume: nothing left to do; without --resume the folder is refused
    calls.clear()
    again = cli(
        "refine", imgs, "--backbone", "ldm", "--model", tiny_ldm, "--late-steps", "500-750",
        "--steps", "20", "--out", out, "--batch-size", "2", "--resume", *DET,
    )  # fmt: skip
    assert again.exit_code == 0, again.output
    assert calls == [] and "already refined" in again.output
    refused = cli(
        "refine", imgs, "--backbone", "ldm", "--model", tiny_ldm, "--late-steps", "500-750",
        "--steps", "20", "--out", out, *DET,
    )  # fmt: skip
    assert refused.exit_code != 0 and "already holds a refine run" in refused.output


def test_mask_file_leaves_outside_pixels_bit_identical(cli, tiny_ldm, tmp_path):
    imgs = tmp_path / "in"
    imgs.mkdir()
    rng = np.random.default_rng(1)
    # 36 x 28 is not a multiple of the model's 8: refined at 40 x 24, resized back
    original = (rng.random((28, 36, 3)) * 255).astype(np.uint8)
    Image.fromarray(original).save(imgs / "odd.png")
    mask = np.zeros((28, 36), np.uint8)
    mask[10:18, 12:22] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "out"
    res = cli(
        "refine", imgs, "--backbone", "ldm", "--model", tiny_ldm, "--late-steps", "250-1000",
        "--steps", "8", "--mask", tmp_path / "mask.png", "--dilate", "2", "--feather", "3",
        "--out", out, *DET,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    refined = np.asarray(Image.open(out / "images" / "odd.png"))
    used = np.asarray(Image.open(out / "masks" / "odd.png"))
    outside = used == 0
    assert outside.sum() > 0.5 * outside.size
    assert np.array_equal(refined[outside], original[outside])
    inside = mask > 0
    assert (refined[inside] != original[inside]).any(axis=-1).mean() > 0.9
    # the mask grew by dilate + feather (2 + 3 px) around the user's rectangle
    ys, xs = np.nonzero(used)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (10 - 5, 17 + 5, 12 - 5, 21 + 5)


def test_mask_auto_repaints_what_the_detector_flags(cli, tiny_ldm, tmp_path):
    from test_treat import fit_redness_detector

    det = fit_redness_detector(tmp_path / "redness")
    imgs = tmp_path / "in"
    imgs.mkdir()
    img = np.empty((64, 64, 3), np.uint8)
    img[:] = (90, 140, 150)  # blue-grey: low "redness"
    img += np.random.default_rng(2).integers(0, 20, img.shape, dtype=np.uint8)
    img[20:40, 24:44] = (230, 30, 30)  # the "artifact": a red patch
    Image.fromarray(img).save(imgs / "red.png")
    out = tmp_path / "out"
    res = cli(
        "refine", imgs, "--backbone", "ldm", "--model", tiny_ldm, "--late-steps", "500-1000",
        "--steps", "6", "--mask", "auto", "--threshold", "0.5", "--dilate", "2",
        "--feather", "2", "--detector-weights", det, "-O", "input_size=64", "--out", out,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    used = np.asarray(Image.open(out / "masks" / "red.png")) > 0
    assert used[25:35, 29:39].all()  # the red patch is repainted
    # exactly the detector's map thresholded, dilated and feathered
    detector = get_host().detectors.get("segformer").load(str(det), input_size=64)
    x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255
    prob = detector.predict(x)[0, 0].numpy()
    assert np.array_equal(used, mask_from_map(prob, 0.5, 2, 2) > 0)
    assert used.mean() < 0.6
    refined = np.asarray(Image.open(out / "images" / "red.png"))
    assert np.array_equal(refined[~used], img[~used])
    rec = json.loads((out / "report.jsonl").read_text())
    assert rec["before"]["max"] > 0.5 and 0 < rec["mask_fraction"] < 0.5
    cmp = Image.open(out / "compare" / "red.png")
    assert cmp.size[0] > 4 * cmp.size[1]  # input, before map, refined, after map, mask


def test_until_clean_rounds(cli, tiny_ldm, tmp_path, calls):
    imgs = write_images(tmp_path / "in", n=1)
    base = ["refine", imgs, "--backbone", "ldm", "--model", tiny_ldm, "--late-steps",
            "750-1000", "--steps", "4", *DET]  # fmt: skip
    res = cli(*base, "--until-clean", "3", "--clean-threshold", "0.01", "--out", tmp_path / "a")
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "a" / "report.jsonl").read_text())
    assert rec["rounds"] == 3 and rec["status"] == "not clean after 3 round(s)"
    assert len(calls) == 3  # one call per round (1 step for 750-1000 at 4 steps)
    calls.clear()
    res = cli(*base, "--until-clean", "3", "--clean-threshold", "0.99", "--out", tmp_path / "b")
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "b" / "report.jsonl").read_text())
    assert rec["rounds"] == 0 and rec["status"] == "already clean" and calls == []


def test_chained_segments_use_the_model_named_for_each(cli, tiny_ldm, other_ldms, tmp_path, calls):
    a, b = other_ldms
    imgs = write_images(tmp_path / "in", n=1)
    res = cli(
        "refine", imgs, "--backbone", "ldm", "--model", tiny_ldm, "--segment", f"500-750={a}",
        "--segment", f"750-1000={b}", "--steps", "20", "--out", tmp_path / "o1", *DET,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert calls == [("A", t) for t in (500, 450, 400, 350, 300)] + [
        ("B", t) for t in (250, 200, 150, 100, 50)
    ]
    # a gap between segments (500-750) and the part after them go to the base model
    calls.clear()
    res = cli(
        "refine", imgs, "--backbone", "ldm", "--model", tiny_ldm, "--late-steps", "250-500",
        "--segment", f"750-850={b}", "--steps", "20", "--out", tmp_path / "o2", *DET,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    names = {p.name for p in (a, b)}
    base = Path(tiny_ldm).name
    assert [m for m, t in calls if t > 250] == [base] * 10
    assert [m for m, t in calls if 150 < t <= 250] == ["B"] * 2
    assert [m for m, t in calls if t <= 150] == [base] * 3
    assert not names & {m for m, t in calls if t > 250}


def test_flux_refine_prints_sigmas_and_keeps_unmasked_pixels(cli, tmp_path_factory, tmp_path):
    path = tiny_pipeline_path("flux", tmp_path_factory, guidance=True)
    imgs = write_images(tmp_path / "in", n=1, size=(64, 64))
    mask = np.zeros((64, 64), np.uint8)
    mask[16:40, 16:40] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    res = cli(
        "refine", imgs, "--backbone", "flux", "--model", path, "--late-steps", "500-1000",
        "--steps", "4", "--mask", tmp_path / "m.png", "--dilate", "0", "--feather", "0",
        "--prompt", "a cat", "-B", "max_sequence_length=32", "--out", tmp_path / "o", *DET,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "sigmas" in res.output and "resolved plan for 64x64" in res.output
    original = np.asarray(Image.open(imgs / "img0.png"))
    refined = np.asarray(Image.open(tmp_path / "o" / "images" / "img0.png"))
    outside = mask == 0
    assert np.array_equal(refined[outside], original[outside])
    assert not np.array_equal(refined[~outside], original[~outside])


# ------------------------------------------------------------------------------------------
# Pieces and errors
# ------------------------------------------------------------------------------------------
def test_mask_from_map_and_composite():
    prob = np.zeros((20, 20), np.float32)
    prob[8:12, 8:12] = 0.9
    m = mask_from_map(prob, 0.5, dilate=1, feather_px=2)
    assert m[7:13, 8:12].min() == 1.0 and m[8:12, 7:13].min() == 1.0 and m[0, 0] == 0.0
    assert 0 < m[5, 10] < 1  # feathered edge, 2 px outside the dilated square
    assert m[4, 10] == 0.0
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
    c = composite(a, b, m)
    assert np.array_equal(c[m == 0], a[m == 0]) and np.array_equal(c[m == 1], b[m == 1])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--late-steps", "750-500"], "--late-steps '750-500' must satisfy 0 <= A < B <= 1000"),
        (["--late-steps", "abc"], "bad --late-steps 'abc'"),
        ([], "give --late-steps A-B, --segment A-B=MODEL or --strength S"),
        (["--late-steps", "500-750", "--strength", "0.5"], "--strength cannot be combined"),
        (["--strength", "1.5"], "--strength must be in (0, 1]"),
        (["--late-steps", "500-750", "--mask", "nope.png"], "mask not found: nope.png"),
        (["--segment", "500-750=missing-model"], "segment model not found: missing-model"),
        (["--late-steps", "500-750", "--backbone", "nope"], "nope"),
    ],
)
def test_bad_input_is_one_line(cli, tiny_ldm, tmp_path, args, message):
    imgs = write_images(tmp_path / "in", n=1)
    base = ["refine", imgs, "--model", tiny_ldm, "--out", tmp_path / "o", *DET]
    if "--backbone" not in args:
        base += ["--backbone", "ldm"]
    res = cli(*base, *args)
    assert res.exit_code != 0
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], res.output


def test_bad_segment_model_leaves_no_run_behind(cli, tiny_ldm, tmp_path):
    """A model that fails to load writes nothing to --out, so the corrected command runs."""
    imgs = write_images(tmp_path / "in", n=1)
    (tmp_path / "not-a-model").mkdir()
    base = ["refine", imgs, "--backbone", "ldm", "--model", tiny_ldm, "--steps", "4", *DET]
    res = cli(*base, "--segment", f"500-750={tmp_path / 'not-a-model'}", "--out", tmp_path / "o")
    assert res.exit_code != 0 and "neither a diffusers folder" in res.output
    assert not (tmp_path / "o").exists()
    res = cli(*base, "--late-steps", "500-750", "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o" / "report.jsonl").is_file()


def test_missing_images_and_train_subcommand_dispatch(cli, tiny_ldm, tmp_path):
    res = cli("refine", tmp_path / "nothing.png", "--backbone", "ldm", "--model", tiny_ldm,
              "--late-steps", "500-750", "--out", tmp_path / "o")  # fmt: skip
    assert res.exit_code != 0 and "no input images found" in res.output
    res = cli("refine", "train", "--late-steps", "500-750", "--data", tmp_path)
    assert res.exit_code != 0
    assert res.output.strip().splitlines()[-1].startswith("Error: --init is required")
    assert cli("refine", "--help").exit_code == 0
    assert "--late-steps" in cli("refine", "run", "--help").output
