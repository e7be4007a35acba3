"""`dd eval gen`: metric functions against hand-computed values, and a run on tiny SD3."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dd.api.plugins import get_host
from dd.engines.eval_gen import EvalGenConfig, eval_gen, fid, kid, psnr, ssim
from dd.errors import DDError
from dd.testing.tiny import tiny_pipeline_path

SIZE = 32
PROMPTS = ["a photo of a red cat", "a man lying on the grass"]
SEEDS = [0, 1]


# ------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------
def test_fid_hand_computed():
    a = np.array([[0, 0], [2, 0], [0, 2], [2, 2]], float)  # mean (1, 1), cov 4/3 I
    b = 3 * a + 5  # mean (8, 8), cov 12 I
    # |mu_a - mu_b|^2 = 98; per dimension 4/3 + 12 - 2 sqrt(4/3 * 12) = 16/3
    assert fid(a, b) == pytest.approx(98 + 2 * 16 / 3, rel=1e-9)
    assert fid(a, a) == pytest.approx(0.0, abs=1e-9)


def test_fid_matches_scipy_sqrtm_on_full_covariances():
    from scipy import linalg

    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 5)) @ rng.normal(size=(5, 5))
    b = rng.normal(size=(30, 5)) @ rng.normal(size=(5, 5)) + 0.5
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s_a @ s_b).real
    want = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean)
    assert fid(a, b) == pytest.approx(want, rel=1e-6)


def test_kid_hand_computed():
    x, y = np.array([[1.0], [2.0]]), np.array([[0.0], [1.0]])
    # k(u, v) = (u v + 1)^3: k_xx(1,2) = 27, k_yy(0,1) = 1, k_xy mean = (1 + 8 + 1 + 27) / 4
    mean, std = kid(x, y)
    assert mean == pytest.approx(27 + 1 - 2 * 37 / 4)
    assert std == 0.0
    # subsets smaller than the sets: the mean of subset MMDs, seeded
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(20, 3)), rng.normal(size=(25, 3)) + 1
    m1, s1 = kid(a, b, subset_size=10, subsets=50, seed=3)
    assert (m1, s1) == kid(a, b, subset_size=10, subsets=50, seed=3)
    assert m1 > 0 and s1 > 0
    # unbiased: a set against itself gives 2 (mean off-diagonal - mean) of its kernel, < 0 here
    k = (a @ a.T / 3 + 1) ** 3
    want = 2 * (k.sum() - np.trace(k)) / (20 * 19) - 2 * k.mean()
    assert kid(a, a.copy())[0] == pytest.approx(want, rel=1e-9)
    with pytest.raises(DDError, match="at least 2"):
        kid(a[:1], b)


def test_ssim_and_psnr_hand_computed():
    a, b = np.full((16, 16, 3), 0.2), np.full((16, 16, 3), 0.6)
    c1 = (
        0.01**2
    )  # constant images: no variance, so SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1)
    assert ssim(a, b) == pytest.approx((2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1))
    assert psnr(np.full((4, 4, 3), 0.2), np.full((4, 4, 3), 0.3)) == pytest.approx(20.0)
    rng = np.random.default_rng(0)
    x = rng.random((20, 24, 3))
    assert ssim(x, x) == pytest.approx(1.0)
    assert psnr(x, x) == 100.0
    # the same as scikit-image with Wang et al.'s settings
    from skimage.metrics import structural_similarity

    y = np.clip(x + rng.normal(scale=0.1, size=x.shape), 0, 1)
    want = structural_similarity(
        x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0,
        channel_axis=-1,
    )  # fmt: skip
    assert ssim(x, y) == pytest.approx(want, abs=1e-9)
    with pytest.raises(DDError, match="one size"):
        ssim(x, y[:10])


# ------------------------------------------------------------------------------------------
# A run on tiny SD3
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory) -> Path:
    return tiny_pipeline_path("sd3", tmp_path_factory)


@pytest.fixture(scope="module")
def lora_dir(tiny_sd3, tmp_path_factory) -> Path:
    """A LoRA with random (seeded, non-zero) weights, saved in diffusers' format."""
    torch.manual_seed(0)
    bb = get_host().backbones.get("sd3").from_pretrained(str(tiny_sd3), max_sequence_length=32)
    params = bb.add_lora(rank=4)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.3)
    out = tmp_path_factory.mktemp("lora") / "my-lora"
    bb.save_lora(out)
    return out


def tiny_detector():
    return get_host().detectors.get("segformer").load(None, variant="tiny", input_size=64, seed=0)


def colour_features(images: torch.Tensor) -> torch.Tensor:
    """A tiny feature extractor: per-channel mean and standard deviation (6-d)."""
    assert images.min() >= 0 and images.max() <= 1  # images arrive in [0, 1]
    return torch.cat([images.mean((2, 3)), images.std((2, 3))], 1)


@pytest.fixture(scope="module")
def run(tiny_sd3, lora_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("evalgen")
    (d / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    refs = d / "refs"
    refs.mkdir()
    rng = np.random.default_rng(5)
    # paired with prompt 0 seed 1 only, with every seed of prompt 1, and one unpaired
    for name in ("0000-seed1", "0001", "extra"):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(
            refs / f"{name}.png"
        )
    cfg = EvalGenConfig(
        backbone="sd3",
        model=str(tiny_sd3),
        backbone_options={"max_sequence_length": 32},
        loras=[str(lora_dir), str(lora_dir)],  # twice: switching LoRAs must not stack them
        prompts=str(d / "prompts.txt"),
        seeds=SEEDS,
        refs=str(refs),
        out=str(d / "out"),
        resolution=SIZE,
        steps=2,
        device="cpu",
    )
    det = tiny_detector()
    results = eval_gen(cfg, features=colour_features, detector=det)
    return d, cfg, results, det


def test_identical_seeds_match_diffusers(run, tiny_sd3, lora_dir):
    from diffusers import StableDiffusion3Pipeline

    d, _, results, _ = run
    assert [r["model"] for r in results["models"]] == ["base", "my-lora", "my-lora-2"]
    for p in (d / "out" / "images" / "my-lora").glob("*.png"):
        again = d / "out" / "images" / "my-lora-2" / p.name
        assert np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(again)))
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=2, max_sequence_length=32)
    for model in ("base", "my-lora"):
        if model == "my-lora":
            pipe.load_lora_weights(str(lora_dir))
        for pi, seed in ((0, 0), (1, 1)):
            want = pipe(
                PROMPTS[pi], generator=torch.Generator().manual_seed(seed), output_type="np", **kw
            ).images[0]
            got = np.asarray(Image.open(d / "out" / "images" / model / f"{pi:04d}-seed{seed}.png"))
            assert np.abs(got.astype(int) - (want * 255).round().astype(int)).max() <= 2
    base = np.asarray(Image.open(d / "out" / "images" / "base" / "0000-seed0.png"), float)
    tuned = np.asarray(Image.open(d / "out" / "images" / "my-lora" / "0000-seed0.png"), float)
    assert np.abs(base - tuned).mean() > 1


def test_metrics_equal_hand_computed_values(run):
    from scipy import linalg
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    d, _, results, det = run
    out = d / "out"
    refs = sorted((d / "refs").glob("*.png"))

    def load(p):
        return np.asarray(Image.open(p).convert("RGB"), np.float64) / 255

    ref_feats = (
        colour_features(torch.from_numpy(np.stack([load(p) for p in refs])).permute(0, 3, 1, 2))
        .double()
        .numpy()
    )
    for row in results["models"]:
        paths = [
            out / "images" / row["model"] / f"{pi:04d}-seed{s}.png"
            for pi in range(2)
            for s in SEEDS
        ]
        ims = np.stack([load(p) for p in paths])
        x = torch.from_numpy(ims).permute(0, 3, 1, 2).float()
        probs = det.predict(x).numpy()[:, 0]
        assert row["n_images"] == 4
        assert row["mean_conf"] == pytest.approx(probs.mean(axis=(1, 2)).mean(), abs=1e-6)
        assert row["max_conf"] == pytest.approx(probs.max(axis=(1, 2)).mean(), abs=1e-6)
        assert row["artifact_freq"] == pytest.approx((probs.max(axis=(1, 2)) >= 0.5).mean())
        assert row["artifact_pixels"] == pytest.approx((probs >= 0.5).mean(axis=(1, 2)).mean())
        # FID/KID on the injected features (a numpy/scipy FID as the independent reference)
        f = colour_features(x).double().numpy()
        s_a, s_b = np.cov(f, rowvar=False), np.cov(ref_feats, rowvar=False)
        want = ((f.mean(0) - ref_feats.mean(0)) ** 2).sum() + np.trace(
            s_a + s_b - 2 * linalg.sqrtm(s_a @ s_b).real
        )
        assert row["fid"] == pytest.approx(want, rel=1e-5, abs=1e-8)
        assert row["kid"] == pytest.approx(kid(f, ref_feats)[0], rel=1e-5)
        # SSIM / PSNR: 0000-seed1 pairs with its own reference, 0001-seed0/1 with 0001.png
        pairs = [(paths[1], d / "refs" / "0000-seed1.png"), (paths[2], d / "refs" / "0001.png"),
                 (paths[3], d / "refs" / "0001.png")]  # fmt: skip
        assert row["n_paired"] == 3
        ss = [
            structural_similarity(load(a), load(b), gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False, data_range=1.0, channel_axis=-1)
            for a, b in pairs
        ]  # fmt: skip
        ps = [peak_signal_noise_ratio(load(b), load(a), data_range=1.0) for a, b in pairs]
        assert row["ssim"] == pytest.approx(np.mean(ss), abs=1e-9)
        assert row["psnr"] == pytest.approx(np.mean(ps), abs=1e-9)


def test_report_files(run):
    d, _, results, _ = run
    out = d / "out"
    saved = json.loads((out / "results.json").read_text())
    assert saved["models"][1]["fid"] == pytest.approx(results["models"][1]["fid"])
    assert len(saved["images"]) == 12
    md = (out / "results.md").read_text()
    assert "| model |" in md and "FID" in md and "SSIM" in md and "| my-lora |" in md
    for name in ("grids/prompt-0000.png", "grids/prompt-0001.png", "bars.png"):
        with Image.open(out / name) as im:
            assert im.size[0] > 100
    with Image.open(out / "grids" / "prompt-0000.png") as im:
        assert im.size[1] > im.size[0] / 3  # two seed rows


def test_rerun_reuses_the_images(run):
    d, cfg, results, det = run
    img = d / "out" / "images" / "my-lora" / "0001-seed1.png"
    before = img.stat().st_mtime_ns
    again = eval_gen(cfg, features=colour_features, detector=det)
    assert img.stat().st_mtime_ns == before
    assert again["models"] == results["models"]


def test_other_settings_never_reuse_old_images(run, tmp_path):
    """--steps 3 after --steps 2 into the same --out: refused; --overwrite regenerates."""
    import dataclasses
    import shutil

    d, cfg, results, det = run
    out = tmp_path / "out"
    shutil.copytree(d / "out", out)
    cfg = dataclasses.replace(cfg, out=str(out), refs=None, loras=[])
    eval_gen(cfg, detector=det)  # the same settings: reused
    img = out / "images" / "base" / "0000-seed0.png"
    before = img.read_bytes()
    other = dataclasses.replace(cfg, steps=3)
    with pytest.raises(DDError, match=r"other settings \(steps 2 -> 3\)") as e:
        eval_gen(other, detector=det)
    assert "--overwrite" in e.value.hint
    assert img.read_bytes() == before
    again = eval_gen(dataclasses.replace(other, overwrite=True), detector=det)
    assert img.read_bytes() != before
    assert again["config"]["steps"] == 3
    # a changed prompt list is another setting too
    (tmp_path / "p.txt").write_text("something else\n")
    with pytest.raises(DDError, match="prompts_sha256"):
        eval_gen(dataclasses.replace(other, prompts=str(tmp_path / "p.txt")), detector=det)


def test_each_model_folder_records_prompt_and_seed(run):
    d, *_ = run
    recs = [json.loads(x) for x in (d / "out" / "images" / "base" / "report.jsonl").open()]
    assert {(r["image"], r["prompt"], r["seed"]) for r in recs} == {
        (f"{pi:04d}-seed{s}.png", PROMPTS[pi], s) for pi in range(2) for s in SEEDS
    }


def test_clip_score_from_local_weights(run, tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    from dd.inference.image_scores import ClipModel, clip_scores, pick_scores
    from dd.testing.tiny import build_tiny_clip

    folder = build_tiny_clip(tmp_path / "clip")
    model = CLIPModel.from_pretrained(str(folder)).eval()
    proc = CLIPProcessor.from_pretrained(str(folder))

    d, *_ = run
    ims = np.stack(
        [np.asarray(Image.open(p)) for p in sorted((d / "out/images/base").glob("*.png"))]
    )
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    scorer = ClipModel(str(folder), torch.device("cpu"), what="CLIP score")
    got = clip_scores(scorer, ims, prompts)
    inputs = proc(text=prompts, images=list(ims), return_tensors="pt", padding="max_length")
    with torch.no_grad():
        iv = model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output
        tv = model.text_model(input_ids=inputs["input_ids"]).pooler_output
        cos = torch.nn.functional.cosine_similarity(
            model.visual_projection(iv), model.text_projection(tv), dim=-1
        )
    assert got == pytest.approx([100 * max(float(c), 0) for c in cos], abs=1e-4)
    scale = float(model.logit_scale.detach().exp())
    assert pick_scores(scorer, ims, prompts) == pytest.approx(
        [scale * float(c) for c in cos], abs=1e-4
    )
    with pytest.raises(DDError, match="needs local weights"):
        ClipModel(str(tmp_path / "nothing"), torch.device("cpu"), what="CLIP score")


def test_cli_errors(cli, tiny_sd3, tmp_path, monkeypatch):
    monkeypatch.setenv("DD_HOME", str(tmp_path / "home"))
    (tmp_path / "p.txt").write_text("a cat\n")
    (tmp_path / "refs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "refs" / "r.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "refs" / "s.png")
    base = ["eval", "gen", "--backbone", "sd3", "--model", tiny_sd3, "--prompts",
            tmp_path / "p.txt", "--out", tmp_path / "o", "--device", "cpu"]  # fmt: skip
    r = cli(*base, "--refs", tmp_path / "refs", "--seeds", "1")
    assert r.exit_code == 1 and "at least 2" in r.output
    r = cli(*base, "--refs", tmp_path / "refs")
    assert r.exit_code == 1
    assert "inception-2015-12-05.pt" in r.output and str(tmp_path / "home") in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "images").exists()  # nothing generated before the check
    r = cli(*base, "--lora", tmp_path / "missing")
    assert r.exit_code == 1 and "--lora not found" in r.output
    r = cli(*base, "--image-reward-model", tmp_path / "ir")
    assert r.exit_code == 1 and "ImageReward" in r.output
