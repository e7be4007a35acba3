"""`dd treat` end to end on tiny pipelines of the real classes (64 px, 2 steps, CPU).

The detector is fixed: a tiny random SegFormer whose 1x1 classifier is fitted by least
squares (no training loop) so that it flags *reddish* pixels as artifacts. It is a fixed,
differentiable function of the image like DiffDoctor's detector, and its gradients point the
same way for every prompt and seed, so treating has something to learn that carries over to
held-out prompts. (The plain random SegFormer outputs ~0.5 everywhere; treating tiny FLUX
against it lowers that too, but on tiny SD1.5 the held-out change stayed within noise.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from dd.api.plugins import get_host
from dd.data.prompts import parse_seeds, read_prompts, read_reg_data
from dd.engines.treat import (
    TIMING_FIELDS,
    TreatConfig,
    TreatObjective,
    confidence_loss,
    parse_grad_steps_range,
    treat,
)
from dd.errors import DDError
from dd.inference.scores import map_scores
from dd.testing.tiny import tiny_pipeline_path
from dd.training.schedule import lr_schedule
from tests.helpers import assert_two_rank_checkpoint, launch_dd_twice, seeded_pipeline_images

TRAIN_PROMPTS = [
    "a photo of a red cat",
    "a blue dog in the park",
    "a small house by the sea",
    "a woman with a hat",
    "a man holding a cup",
    "an old car on the street",
]
EVAL_PROMPTS = ["a dog in the snow", "a girl with two hands"]
TINY = {"resolution": 64, "steps": 2}

# Measured (CPU, these exact settings; the runs are seeded and deterministic): tiny FLUX,
# 10 steps, lr 3e-2, batch 2 lowers the held-out eval mean confidence from 0.5153 to 0.3848
# (gain 0.130); tiny SD1.5 with guidance 1 (no CFG, half the cost), 10 steps, lr 3e-2,
# batch 2: 0.6441 -> 0.5918 (gain 0.052). The margins are about half the measured gains.
FLUX_MARGIN = 0.06
SD15_MARGIN = 0.025


# ------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------
def fit_redness_detector(out: Path, seed: int = 0) -> Path:
    """A tiny SegFormer (random encoder, seed ``seed``) whose classifier is the least-squares
    fit of logit(redness) on its own features over 64 random images; saved to ``out``."""
    det = get_host().detectors.get("segformer").load(None, variant="tiny", input_size=64, seed=seed)
    g = torch.Generator().manual_seed(seed)
    low = F.interpolate(torch.rand(64, 3, 8, 8, generator=g), size=64, mode="bilinear")
    mix = torch.rand(64, 1, 1, 1, generator=g)
    x = (mix * low + (1 - mix) * torch.rand(64, 3, 64, 64, generator=g)).clamp(0, 1)
    redness = (2 * (x[:, :1] - 0.5 * (x[:, 1:2] + x[:, 2:3])) + 0.5).clamp(0, 1)
    feats: dict[str, torch.Tensor] = {}
    head = det.model.decode_head.classifier
    hook = head.register_forward_hook(lambda m, i, o: feats.setdefault("x", i[0]))
    with torch.no_grad():
        det.logits(x)
    hook.remove()
    f = feats["x"]
    b, c, h, w = f.shape
    y = torch.logit(F.interpolate(redness, size=(h, w), mode="area").clamp(0.02, 0.98))
    a = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, c), torch.ones(b * h * w, 1)], 1)
    sol = torch.linalg.lstsq(a, y.permute(0, 2, 3, 1).reshape(-1, 1)).solution[:, 0]
    with torch.no_grad():
        head.weight.copy_(sol[:c].view(1, c, 1, 1))
        head.bias.copy_(sol[c:])
    det.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def detector_dir(tmp_path_factory) -> Path:
    return fit_redness_detector(tmp_path_factory.mktemp("detector") / "redness")


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    return tiny_pipeline_path("flux", tmp_path_factory)


@pytest.fixture(scope="session")
def prompt_files(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("prompts")
    (d / "train.txt").write_text("# training prompts\n" + "\n".join(TRAIN_PROMPTS) + "\n\n")
    (d / "eval.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in EVAL_PROMPTS))
    return d / "train.txt", d / "eval.jsonl"


def load_det(detector_dir: Path):
    return get_host().detectors.get("segformer").load(str(detector_dir), input_size=64)


def base_config(model: Path, detector_dir: Path, prompts: tuple[Path, Path], out: Path, **kw):
    values = dict(
        backbone="flux",
        model=str(model),
        detector_weights=str(detector_dir),
        detector_options={"input_size": 64},
        prompts=str(prompts[0]),
        eval_prompts=str(prompts[1]),
        out=str(out),
        **TINY,
    )
    values.update(kw)
    if values["backbone"] in ("flux", "sd3"):  # T5 tokens, as the tiny pipelines' defaults
        values.setdefault("backbone_options", {"max_sequence_length": 32})
    return TreatConfig(**values)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def pipeline_confidence(pipe, det, prompts: list[str], seeds: list[int]) -> tuple[float, list]:
    """Mean over (prompt, seed) images of each image's mean detector confidence, generated
    by the diffusers pipeline itself (a CPU generator per image), and the images."""
    images = [
        img for p in prompts for img in seeded_pipeline_images(pipe, p, seeds, guidance_scale=0.0)
    ]
    with torch.no_grad():
        means = [float(det(img.float()).mean()) for img in images]
    return float(np.mean(means)), images


# ------------------------------------------------------------------------------------------
# Proof that it treats (FLUX), through the CLI with a preset and overrides
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flux_run(tmp_path_factory, tiny_flux, detector_dir, prompt_files, cli):
    d = tmp_path_factory.mktemp("flux-run")
    preset = d / "tiny-flux.toml"
    preset.write_text(
        'backbone = "flux"\nresolution = 64\nsteps = 2\ntrain_steps = 10\n'
        "lr = 1e-4  # overridden on the command line\n"
        "batch_size = 2\neval_every = 5\nsave_every = 5\neval_seeds = [0, 1]\n"
    )
    run = d / "run"
    res = cli(
        "treat", "--config", preset, "--model", tiny_flux, "--lr", "3e-2",
        "--detector-weights", detector_dir, "-O", "input_size=64",
        "--prompts", prompt_files[0], "--eval-prompts", prompt_files[1], "--out", run,
        "-B", "max_sequence_length=32",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    return run, res.output


@pytest.fixture(scope="module")
def cli(request):
    """A module-scoped twin of conftest's ``cli`` fixture (the FLUX run is shared)."""
    from typer.testing import CliRunner

    from dd.cli import build_app

    runner = CliRunner()

    def invoke(*args, **kw):
        return runner.invoke(build_app(), [str(a) for a in args], **kw)

    return invoke


def test_flux_treating_lowers_heldout_confidence(flux_run, tiny_flux, detector_dir):
    from diffusers import FluxPipeline

    run, output = flux_run
    det = load_det(detector_dir)
    pipe = FluxPipeline.from_pretrained(str(tiny_flux))
    pipe.set_progress_bar_config(disable=True)
    base, _ = pipeline_confidence(pipe, det, EVAL_PROMPTS, [0, 1])
    pipe.load_lora_weights(str(run))
    treated, _ = pipeline_confidence(pipe, det, EVAL_PROMPTS, [0, 1])
    assert base - treated >= FLUX_MARGIN, (base, treated)

    evals = [r for r in records(run) if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [0, 5, 10]
    # the engine's own numbers are the pipeline's (its sampler equals FluxPipeline's)
    assert evals[0]["mean"] == pytest.approx(base, abs=1e-4)
    assert evals[-1]["mean"] == pytest.approx(treated, abs=1e-4)
    assert evals[0]["drift"] == 0.0 and evals[-1]["drift"] > 0
    assert len(evals[-1]["images"]) == 4
    assert "untreated  step 0" in output and "reached --train-steps 10" in output


def test_flux_run_outputs(flux_run):
    from dd.runtime.config import load_toml

    run, _ = flux_run
    for name in ("README.md", "curves.png", "config.toml", "pytorch_lora_weights.safetensors"):
        assert (run / name).is_file(), name
    assert (run / "best" / "pytorch_lora_weights.safetensors").is_file()
    best = json.loads((run / "best" / "best.json").read_text())
    evals = [r for r in records(run) if r["type"] == "eval"]
    assert best["mean"] == min(r["mean"] for r in evals)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last", "step-10", "step-5"]
    assert sorted(p.name for p in (run / "eval").iterdir()) == [
        "base",
        "step-000000.png",
        "step-000005.png",
        "step-000010.png",
    ]
    grid = Image.open(run / "eval" / "step-000010.png")
    assert grid.width > 2 * 128 and grid.height > 4 * 128  # 4 rows of base | treated
    # resolved config: preset values, the flags typed, defaults for the rest
    cfg = load_toml(run / "config.toml")
    assert cfg["lr"] == 3e-2  # flag beats preset
    assert cfg["train_steps"] == 10 and cfg["batch_size"] == 2  # preset
    assert cfg["log_every"] == 1 and cfg["lora_rank"] == 16  # defaults
    assert "guidance" not in cfg  # schnell-like: unset
    card = (run / "README.md").read_text()
    assert "| untreated | 0 |" in card and "| best (`best/`) | 10 |" in card
    train = [r for r in records(run) if r["type"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 11))
    assert all(np.isfinite(r["loss"]) and r["reg_loss"] is None for r in train)
    assert records(run)[-1] == {"type": "stop", "step": 10, "reason": "reached --train-steps 10"}


def test_lora_round_trip_into_fresh_pipeline(flux_run, tiny_flux, tmp_path, cli):
    """diffusers loads the LoRA with no missing or unexpected keys; its images are the ones
    `dd generate --lora` writes, and differ from the base model's."""
    from diffusers import FluxPipeline

    run, _ = flux_run
    saved = load_file(str(run / "pytorch_lora_weights.safetensors"))
    pipe = FluxPipeline.from_pretrained(str(tiny_flux))
    pipe.set_progress_bar_config(disable=True)
    _, base_images = pipeline_confidence(pipe, torch.nn.Identity(), EVAL_PROMPTS[:1], [0, 1])
    pipe.load_lora_weights(str(run), adapter_name="treated")
    loaded = {n: p for n, p in pipe.transformer.named_parameters() if "lora_" in n}
    expected = {
        k.removeprefix("transformer.").replace(".weight", ".treated.weight"): v
        for k, v in saved.items()
    }
    assert saved and all(k.startswith("transformer.") for k in saved)
    assert set(loaded) == set(expected)  # nothing missing, nothing unexpected
    for name, value in expected.items():
        assert torch.equal(loaded[name].detach(), value)
    _, lora_images = pipeline_confidence(pipe, torch.nn.Identity(), EVAL_PROMPTS[:1], [0, 1])

    (tmp_path / "p.txt").write_text(EVAL_PROMPTS[0] + "\n")
    res = cli(
        "generate", "--backbone", "flux", "--model", tiny_flux, "--lora", run,
        "--prompts", tmp_path / "p.txt", "--seeds", "0,1", "--resolution", "64",
        "--steps", "2", "--out", tmp_path / "gen", "-B", "max_sequence_length=32",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    for seed, ours, base in zip((0, 1), lora_images, base_images, strict=True):
        png = np.asarray(Image.open(tmp_path / "gen" / f"0000-seed{seed}.png"), dtype=np.int16)
        ref = (ours[0].permute(1, 2, 0).numpy() * 255).round().astype(np.int16)
        assert np.abs(png - ref).max() <= 1
        assert float((ours - base).abs().mean()) > 0.01


def test_init_lora_continues_from_an_existing_lora(
    flux_run, tiny_flux, detector_dir, prompt_files, tmp_path
):
    run, _ = flux_run
    first = [r for r in records(run) if r["type"] == "eval"][-1]
    cfg = base_config(
        tiny_flux, detector_dir, prompt_files, tmp_path / "more", init_lora=str(run),
        train_steps=1, eval_every=1, lr=3e-2, batch_size=2,
    )  # fmt: skip
    result = treat(cfg)
    # step 0 of the new run is the loaded LoRA's model: the first run's last eval
    assert result.base is not None
    assert result.base["mean"] == pytest.approx(first["mean"], abs=1e-6)
    assert result.base["images"] == first["images"]
    before = load_file(str(run / "pytorch_lora_weights.safetensors"))
    after = load_file(str(result.lora))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert "initialised from" in (tmp_path / "more" / "README.md").read_text()


def test_init_lora_records_the_rank_it_trains(
    flux_run, tiny_flux, detector_dir, prompt_files, tmp_path
):
    """A rank-4 LoRA given to --init-lora is trained and recorded as rank 4, not 16."""
    from dd.runtime.config import load_toml

    bb = get_host().backbones.get("flux").from_pretrained(str(tiny_flux), max_sequence_length=32)
    bb.add_lora(rank=4, alpha=2.0)
    bb.save_lora(tmp_path / "rank4")
    cfg = base_config(
        tiny_flux, detector_dir, prompt_files, tmp_path / "more", init_lora=str(tmp_path / "rank4"),
        train_steps=1, eval_every=1, batch_size=2,
    )  # fmt: skip
    treat(cfg)
    saved = load_toml(tmp_path / "more" / "config.toml")
    assert saved["lora_rank"] == 4 and saved["lora_alpha"] == 2.0
    assert saved["init_lora"] == str((tmp_path / "rank4").resolve())
    out = load_file(str(tmp_path / "more" / "pytorch_lora_weights.safetensors"))
    assert {t.shape[0] for k, t in out.items() if "lora_A" in k} == {4}


# ------------------------------------------------------------------------------------------
# Truncated backprop, through the objective the engine runs for every micro-batch
# ------------------------------------------------------------------------------------------
def test_only_the_last_k_steps_receive_gradient(tiny_flux, detector_dir):
    bb = get_host().backbones.get("flux").from_pretrained(str(tiny_flux))
    bb.add_lora(rank=4)
    obj = TreatObjective(
        bb,
        load_det(detector_dir).requires_grad_(False),
        height=64,
        width=64,
        steps=3,
        guidance=None,
    )
    calls: list[dict] = []

    def hook(module, args, kwargs, output):
        out = output[0]
        rec = {"input_grad": kwargs["hidden_states"].requires_grad, "out_grad": out.requires_grad}
        rec["grad"] = 0.0
        if out.requires_grad:
            out.register_hook(lambda g, rec=rec: rec.__setitem__("grad", float(g.abs().sum())))
        calls.append(rec)

    handle = bb.denoiser.register_forward_hook(hook, with_kwargs=True)
    lora = [(n, p) for n, p in bb.denoiser.named_parameters() if "lora_" in n]
    try:
        for k in (1, 2, 3):
            calls.clear()
            out = obj(prompts=["a red cat"], seeds=[0], grad_steps=[k])
            out["loss"].backward()
            assert len(calls) == 3
            assert [c["out_grad"] for c in calls] == [False] * (3 - k) + [True] * k
            assert all(c["grad"] > 0 for c in calls[3 - k :])
            # the first tracked step starts from a leaf: nothing flows further back
            assert not calls[3 - k]["input_grad"]
            # B starts at zero (gaussian init), so A's first gradient is zero; B's is not
            assert all(p.grad is not None for _, p in lora)
            assert all(p.grad.abs().sum() > 0 for n, p in lora if "lora_B" in n)
            for _, p in lora:
                p.grad = None
        # K drawn per sample: samples sharing a K are generated together, in order of K
        calls.clear()
        out = obj(prompts=["a red cat", "a blue dog"], seeds=[0, 1], grad_steps=[2, 1])
        out["loss"].backward()
        assert [c["out_grad"] for c in calls] == [False, False, True, False, True, True]
        assert float(out["confidence"]) == pytest.approx(float(out["loss"].detach()))
    finally:
        handle.remove()


# ------------------------------------------------------------------------------------------
# Resume: identical to an uninterrupted run (with regularisation and random K)
# ------------------------------------------------------------------------------------------
def make_reg_data(root: Path) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i, prompt in enumerate(["a red wall", "a green field", "a blue sky"]):
        img = (rng.random((80, 96, 3)) * 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(prompt + "\n")
    return root


def test_resume_equals_uninterrupted_run(tiny_flux, detector_dir, prompt_files, tmp_path):
    reg = make_reg_data(tmp_path / "reg")
    common = dict(
        train_steps=4,
        eval_every=2,
        save_every=2,
        eval_seeds=[0],
        lr=1e-2,
        reg_data=str(reg),
        reg_every=2,
        grad_steps_random="1-2",
        lr_schedule="cosine",
        warmup_steps=1,
    )
    straight = tmp_path / "straight"
    r = treat(base_config(tiny_flux, detector_dir, prompt_files, straight, **common))
    assert r.step == 4 and r.stop_reason == "reached --train-steps 4"

    split = tmp_path / "split"
    r1 = treat(base_config(tiny_flux, detector_dir, prompt_files, split, stop_at=2, **common))
    assert r1.step == 2 and "--stop-at 2" in r1.stop_reason
    assert not (split / "checkpoints" / "step-4").exists()
    r2 = treat(base_config(tiny_flux, detector_dir, prompt_files, split, resume=True, **common))
    assert r2.step == 4

    for name in ("trainable.safetensors", "pytorch_lora_weights.safetensors"):
        a = load_file(str(straight / "checkpoints" / "last" / name))
        b = load_file(str(split / "checkpoints" / "last" / name))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    a = load_file(str(straight / "pytorch_lora_weights.safetensors"))
    b = load_file(str(split / "pytorch_lora_weights.safetensors"))
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    # the runs moved the LoRA (B starts at zero)
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)

    def comparable(run):
        out = []
        for rec in records(run):
            if rec["type"] == "stop":
                continue
            out.append({k: v for k, v in rec.items() if k not in TIMING_FIELDS})
        return out

    sa, sb = comparable(straight), comparable(split)
    assert [r["type"] for r in sa] == ["eval", "train", "train", "eval", "train", "train", "eval"]
    assert len(sa) == len(sb)
    for x, y in zip(sa, sb, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], float):
                assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-7), key
            else:
                assert x[key] == y[key], key
    regs = [r["reg_loss"] for r in sa if r["type"] == "train"]
    assert regs[0] is not None and regs[1] is None and regs[2] is not None  # every 2 steps
    # a resumed run refuses changed settings
    with pytest.raises(DDError, match="different settings.*lr"):
        treat(
            base_config(
                tiny_flux, detector_dir, prompt_files, split, resume=True, **(common | {"lr": 1e-3})
            )
        )


# ------------------------------------------------------------------------------------------
# The other backbones
# ------------------------------------------------------------------------------------------
def test_sd15_treating_lowers_heldout_confidence(
    tmp_path_factory, detector_dir, prompt_files, tmp_path
):
    model = tiny_pipeline_path("sd15", tmp_path_factory)
    cfg = base_config(
        model, detector_dir, prompt_files, tmp_path / "run", backbone="sd15",
        guidance=1.0, train_steps=10, lr=3e-2, batch_size=2, eval_every=10, eval_seeds=[0, 1],
    )  # fmt: skip
    result = treat(cfg)
    base, last = result.base, result.last_eval
    assert base is not None and last is not None and last["step"] == 10
    assert base["mean"] - last["mean"] >= SD15_MARGIN, (base["mean"], last["mean"])
    # diffusers loads the UNet LoRA whole into a fresh pipeline
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model))
    pipe.load_lora_weights(str(tmp_path / "run"))
    saved = load_file(str(result.lora))
    loaded = [n for n, _ in pipe.unet.named_parameters() if "lora_" in n]
    assert saved and all(k.startswith("unet.") for k in saved) and len(loaded) == len(saved)


@pytest.mark.parametrize("backbone", ["sd3", "sdxl"])
def test_one_treat_step_runs(backbone, tmp_path_factory, detector_dir, prompt_files, tmp_path):
    model = tiny_pipeline_path(backbone, tmp_path_factory)
    cfg = base_config(
        model, detector_dir, prompt_files, tmp_path / "run", backbone=backbone,
        train_steps=1, eval_every=1, eval_seeds=[0], gradient_checkpointing=True,
    )  # fmt: skip
    result = treat(cfg)
    assert result.step == 1
    train = [r for r in records(tmp_path / "run") if r["type"] == "train"]
    assert len(train) == 1 and np.isfinite(train[0]["loss"]) and train[0]["grad_norm"] > 0
    lora = load_file(str(result.lora))
    up = [v for k, v in lora.items() if "lora_B" in k or "lora.up" in k]  # UNets: lora.up
    assert up and any(v.abs().max() > 0 for v in up)


# ------------------------------------------------------------------------------------------
# Several processes through accelerate launch (gloo on CPU)
# ------------------------------------------------------------------------------------------
def test_two_cpu_processes_through_accelerate_launch(
    tiny_flux, detector_dir, prompt_files, tmp_path
):
    run = tmp_path / "run"
    proc = launch_dd_twice([
        "treat", "--backbone", "flux",
        "--model", tiny_flux, "--detector-weights", detector_dir,
        "-O", "input_size=64", "--prompts", prompt_files[0],
        "--eval-prompts", prompt_files[1], "--out", run, "--device", "cpu",
        "--resolution", "64", "--steps", "2", "--train-steps", "2", "--eval-every", "2",
        "--save-every", "1", "--eval-seeds", "1",  # one seed: 0
        "-B", "max_sequence_length=32",
    ])  # fmt: skip
    assert "2 process(es)" in proc.stderr
    last = assert_two_rank_checkpoint(run)
    assert json.loads((last / "trainer.json").read_text())["state"]["position"] == 4
    lora = load_file(str(run / "pytorch_lora_weights.safetensors"))
    assert lora and any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)
    evals = [r for r in records(run) if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2]
    assert [(i["prompt"], i["seed"]) for i in evals[-1]["images"]] == [(0, 0), (1, 0)]
    # gradients are averaged across processes: 2 x batch 1 == 1 process x batch 2
    single = tmp_path / "single"
    treat(
        base_config(
            tiny_flux, detector_dir, prompt_files, single, batch_size=2, train_steps=2,
            eval_every=2, save_every=1, eval_seeds=[0], device="cpu",
        )
    )  # fmt: skip
    one = load_file(str(single / "pytorch_lora_weights.safetensors"))
    assert one.keys() == lora.keys()
    for k in one:
        torch.testing.assert_close(lora[k], one[k], rtol=0, atol=1e-5)
    one_evals = [r for r in records(single) if r["type"] == "eval"]
    assert [r["mean"] for r in one_evals] == pytest.approx([r["mean"] for r in evals], abs=1e-5)


# ------------------------------------------------------------------------------------------
# Errors and early stopping
# ------------------------------------------------------------------------------------------
def test_drift_guard_stops_and_keeps_the_best(tiny_flux, detector_dir, prompt_files, tmp_path):
    cfg = base_config(
        tiny_flux, detector_dir, prompt_files, tmp_path / "run",
        train_steps=6, lr=0.3, eval_every=1, eval_seeds=[0], max_drift=0.02, save_every=100,
    )  # fmt: skip
    result = treat(cfg)
    assert result.stop_reason.startswith("drift guard")
    evals = [r for r in records(tmp_path / "run") if r["type"] == "eval"]
    assert evals[-1]["drift"] > 0.02 and result.step < 6
    assert result.best is not None and result.best["drift"] <= 0.02
    assert records(tmp_path / "run")[-1]["reason"] == result.stop_reason
    assert (tmp_path / "run" / "checkpoints" / "last").is_dir()


def test_patience_stops_when_eval_confidence_does_not_improve(
    tiny_flux, detector_dir, prompt_files, tmp_path
):
    # a negative scale *raises* the artifact confidence: no eval after step 0 improves
    cfg = base_config(
        tiny_flux, detector_dir, prompt_files, tmp_path / "run", loss_scale=-1.0, lr=3e-2,
        batch_size=2, train_steps=8, eval_every=1, eval_seeds=[0], patience=2,
    )  # fmt: skip
    result = treat(cfg)
    assert result.step == 2 and result.stop_reason.startswith("eval mean confidence did not")
    assert result.best is not None and result.best["step"] == 0
    evals = [r for r in records(tmp_path / "run") if r["type"] == "eval"]
    assert [r["best"] for r in evals] == [True, False, False]
    assert evals[2]["mean"] > evals[0]["mean"]


def test_out_of_memory_is_one_line_with_the_memory_options(
    tiny_flux, detector_dir, prompt_files, tmp_path, monkeypatch
):
    def oom(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(TreatObjective, "forward", oom)
    with pytest.raises(DDError) as e:
        treat(base_config(tiny_flux, detector_dir, prompt_files, tmp_path / "run", eval_seeds=[0]))
    assert "out of GPU memory at step 1" in str(e.value)
    for option in ("--gradient-checkpointing", "--grad-steps 1", "--resolution", "--dtype bf16"):
        assert option in e.value.hint


def test_cli_errors_are_one_line(
    cli, tiny_flux, tmp_path_factory, detector_dir, prompt_files, tmp_path
):
    sd15 = tiny_pipeline_path("sd15", tmp_path_factory)
    common = ["--prompts", prompt_files[0], "--eval-prompts", prompt_files[1]]
    res = cli("treat", "--backbone", "flux", "--model", sd15, *common, "--out", tmp_path / "a")
    assert res.exit_code == 1  # a model of another family: an error, not a usage mistake
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0] == res.output.strip().splitlines()[-1]
    assert "holds a StableDiffusionPipeline" in errors[0] and "--backbone sd15" in errors[0]
    res = cli("treat", "--model", tiny_flux, *common, "--out", tmp_path / "b")
    assert res.exit_code == 2 and "--backbone is required" in res.output
    res = cli("treat", "--backbone", "flux", "--model", tiny_flux, *common, "--out", tmp_path / "c",
              "--reduction", "median")  # fmt: skip
    assert res.exit_code == 2 and "unknown --reduction 'median'" in res.output
    # a random detector teaches nothing: refused
    res = cli("treat", "--backbone", "flux", "--model", tiny_flux, *common, "--out", tmp_path / "d",
              "-O", "input_size=64", "-O", "variant=tiny", *TINY_FLAGS)  # fmt: skip
    assert res.exit_code == 1 and "random weights" in res.output
    # an existing run is not overwritten
    (tmp_path / "e" / "checkpoints").mkdir(parents=True)
    res = cli("treat", "--backbone", "flux", "--model", tiny_flux, *common, "--out", tmp_path / "e",
              "--detector-weights", detector_dir)  # fmt: skip
    assert res.exit_code == 1 and "already holds a treat run" in res.output
    assert "--overwrite to replace it" in res.output
    # a folder of something else is refused unless --overwrite; --resume with it is usage
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "notes.txt").write_text("mine")
    res = cli("treat", "--backbone", "flux", "--model", tiny_flux, *common, "--out", tmp_path / "f",
              "--detector-weights", detector_dir)  # fmt: skip
    assert res.exit_code == 1 and "is not empty" in res.output, res.output
    res = cli("treat", "--backbone", "flux", "--model", tiny_flux, *common, "--out", tmp_path / "e",
              "--detector-weights", detector_dir, "--resume", "--overwrite")  # fmt: skip
    assert res.exit_code == 2 and "exclude each other" in res.output


TINY_FLAGS = ["--resolution", "64", "--steps", "2"]


# ------------------------------------------------------------------------------------------
# Small pieces
# ------------------------------------------------------------------------------------------
def test_confidence_loss_reductions_match_map_scores():
    class Fixed(torch.nn.Module):
        """Detector API stand-in: logits whose sigmoid is ``probs``, differentiable."""

        def __init__(self, probs):
            super().__init__()
            self.probs = probs

        def logits(self, images):
            tie = images.mean() - images.mean().detach()  # value 0, gradient to images
            return torch.logit(self.probs.double()).float() + tie

    g = torch.Generator().manual_seed(0)
    probs = torch.rand(3, 1, 8, 8, generator=g) ** 3
    probs[2] = 0.05  # no pixel above the weighted threshold
    images = torch.rand(3, 3, 8, 8, generator=g, requires_grad=True)
    det = Fixed(probs)
    scores = [map_scores(p[0].numpy()) for p in probs]
    expect = {
        "mean": np.mean([s["mean"] for s in scores]),
        "max": np.mean([s["max"] for s in scores]),
        "weighted": np.mean([s["weighted"] for s in scores]),
        "sum": float(probs.sum() / 3),
    }
    for reduction, value in expect.items():
        got = confidence_loss(det, images, reduction, 0.1).item()
        assert got == pytest.approx(value, rel=1e-5), reduction
    confidence_loss(det, images, "mean").backward()
    assert images.grad is not None
    with pytest.raises(DDError, match="unknown reduction"):
        confidence_loss(det, images, "median")


def test_parsers(tmp_path):
    assert parse_seeds("0,1,5") == [0, 1, 5]
    assert parse_seeds("3") == [0, 1, 2]
    assert parse_seeds("5-7") == [5, 6, 7]
    assert parse_seeds([4, 2]) == [4, 2]
    for bad in ("", "x", "0", "7-5"):
        with pytest.raises(DDError, match="bad seeds"):
            parse_seeds(bad)
    with pytest.raises(DDError, match="repeat a seed"):
        parse_seeds("1,2,1")
    assert parse_grad_steps_range("1-3", 4) == (1, 3)
    with pytest.raises(DDError, match="must lie in 1..2"):
        parse_grad_steps_range("1-3", 2)
    with pytest.raises(DDError, match="bad --grad-steps-random"):
        parse_grad_steps_range("two", 2)
    f = lr_schedule("cosine", 10, 2)
    assert [f(0), f(1), f(2)] == [0.5, 1.0, 1.0] and f(10) == pytest.approx(0.0)
    assert lr_schedule("constant", 10, 0)(9) == 1.0
    (tmp_path / "p.json").write_text('["a", "b"]')
    assert read_prompts(tmp_path / "p.json") == ["a", "b"]
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(DDError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(DDError, match="bad.jsonl:1: needs a string field 'prompt'"):
        read_prompts(tmp_path / "bad.jsonl")


def test_reg_data_folder_and_manifest(tmp_path):
    reg = make_reg_data(tmp_path / "reg")
    pairs = read_reg_data(reg)
    assert [(p.name, t) for p, t in pairs] == [
        ("0.png", "a red wall"),
        ("1.png", "a green field"),
        ("2.png", "a blue sky"),
    ]
    (reg / "3.png").write_bytes((reg / "0.png").read_bytes())
    with pytest.raises(DDError, match="have no prompt, e.g. 3.png"):
        read_reg_data(reg)
    (reg / "manifest.jsonl").write_text(json.dumps({"image": "3.png", "prompt": "again"}) + "\n")
    assert [(p.name, t) for p, t in read_reg_data(reg)] == [("3.png", "again")]


def test_default_detector_treats_with_a_note(tiny_flux, prompt_files, tmp_path):
    """Without --detector-weights the embedded default detector (trained on synthetic
    watermarks) is used, and the run says what it knows and what to load instead."""
    from io import StringIO

    from rich.console import Console

    from dd.runtime.progress import ConsoleReporter

    cfg = base_config(
        tiny_flux, Path("unused"), prompt_files, tmp_path / "run", train_steps=1, eval_seeds=[0]
    )
    cfg.detector_weights, cfg.detector_options = None, {}
    buf = StringIO()
    result = treat(cfg, reporter=ConsoleReporter(Console(file=buf, width=200)))
    text = buf.getvalue()
    assert "embedded default detector" in text and "ad_pytorch_model.bin" in text
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file(), result
