"""`dd refine train`: late-step training of a tiny LDM (full) and tiny SD1.5 (LoRA), 32 px.

The training timesteps must all lie in the range; a few hundred steps on a tiny dataset must
lower the denoising loss on the range; the output loads as a `dd refine --segment`; resume
gives the same weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dd.api.plugins import get_host
from dd.engines.refine_train import (
    RefineTrainConfig,
    eval_range_loss,
    refine_train,
    sample_range_timesteps,
    train_timestep_range,
)
from dd.testing.tiny import tiny_pipeline_path
from tests.helpers import TINY_DETECTOR as DET
from tests.helpers import assert_two_rank_checkpoint, launch_dd_twice

#: Tiny models on a shared CPU run several times faster on one thread.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """8 images of 32 px: two-colour gradients with a coloured square, and their prompts."""
    root = tmp_path_factory.mktemp("refine-data")
    rng = np.random.default_rng(0)
    xx = np.mgrid[0:32, 0:32][1][..., None] / 31
    for i in range(8):
        a = xx * rng.random(3) + (1 - xx) * rng.random(3)
        a[8 + i : 20 + i, 6:18] = rng.random(3)
        Image.fromarray((a * 255).astype(np.uint8)).save(root / f"im{i}.png")
        (root / f"im{i}.txt").write_text(f"a square number {i}")
    return root


def config(init: Path, data: Path, out: Path, **kw) -> RefineTrainConfig:
    values = dict(
        backbone="ldm",
        late_steps="500-750",
        data=str(data),
        init=str(init),
        out=str(out),
        resolution=32,
        batch_size=4,
        lr=1e-3,
        ema_decay=0.99,
        device="cpu",
        eval_images=8,
        log_every=10,
    )
    values.update(kw)
    return RefineTrainConfig(**values)


def test_training_timesteps_lie_in_the_range(tiny_ldm, dataset, tmp_path, monkeypatch):
    assert train_timestep_range("500-750") == (250, 500)
    assert train_timestep_range("0-250") == (750, 999)
    t = sample_range_timesteps(250, 500, 20000, torch.Generator().manual_seed(0))
    assert int(t.min()) == 250 and int(t.max()) == 500
    assert len(torch.unique(t)) == 251  # every timestep of the range is drawn
    from dd_plugins.ldm import LDMBackbone

    seen: list[int] = []
    real = LDMBackbone.predict

    def predict(self, latents, timestep, *args, **kwargs):
        seen.extend(int(x) for x in timestep)
        return real(self, latents, timestep, *args, **kwargs)

    monkeypatch.setattr(LDMBackbone, "predict", predict)
    refine_train(config(tiny_ldm, dataset, tmp_path / "run", train_steps=5, eval_every=5))
    assert len(seen) >= 5 * 4
    assert all(250 <= t <= 500 for t in seen), sorted(set(seen))


def test_tiny_ldm_lowers_its_range_loss_and_loads_as_a_segment(
    tiny_ldm, dataset, tmp_path, cli, monkeypatch
):
    out = tmp_path / "run"
    res = refine_train(config(tiny_ldm, dataset, out, train_steps=200, eval_every=100))
    assert res.step == 200
    # Measured (CPU, seeded): range loss 1.1555 -> 0.0144 after 200 steps.
    assert res.last_loss < 0.2 * res.first_loss
    info = json.loads((out / "refine.json").read_text())
    assert info["late_steps"] == [500, 750] and info["timesteps"] == [250, 500]
    assert info["kind"] == "full" and (out / "model_index.json").is_file()
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "eval"] == [0, 100, 200]
    assert (out / "curves.png").is_file() and (out / "README.md").is_file()

    # the saved folder, loaded afresh, denoises the range better than the model it started from
    ldm = get_host().backbones.get("ldm")
    images = torch.stack(
        [
            torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1).float() / 255
            for p in sorted(dataset.glob("*.png"))
        ]
    )
    before = eval_range_loss(ldm.from_pretrained(str(tiny_ldm)), images, [""] * 8, 250, 500)
    after = eval_range_loss(ldm.from_pretrained(str(out)), images, [""] * 8, 250, 500)
    assert after < 0.2 * before

    # `--segment OUT` (range from refine.json) runs t 500..300 with the trained UNet
    from dd_plugins.ldm import LDMBackbone

    calls: list[tuple[str, int]] = []
    real = LDMBackbone.predict

    def predict(self, latents, timestep, *args, **kwargs):
        calls.append((Path(self.source).name, int(timestep[0])))
        return real(self, latents, timestep, *args, **kwargs)

    monkeypatch.setattr(LDMBackbone, "predict", predict)
    r = cli("refine", dataset / "im0.png", "--model", tiny_ldm, "--segment", out, "--steps",
            "20", "--out", tmp_path / "refined", *DET)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert calls[:5] == [("run", t) for t in (500, 450, 400, 350, 300)]
    assert {m for m, _ in calls[5:]} == {Path(tiny_ldm).name}


def test_resume_gives_the_same_weights(tiny_ldm, dataset, tmp_path):
    kw = dict(train_steps=8, save_every=4, eval_every=4)
    refine_train(config(tiny_ldm, dataset, tmp_path / "straight", **kw))
    first = refine_train(config(tiny_ldm, dataset, tmp_path / "resumed", stop_at=4, **kw))
    assert first.step == 4 and "continue with --resume" in first.stop_reason
    with pytest.raises(Exception, match="already holds a refine train run"):
        refine_train(config(tiny_ldm, dataset, tmp_path / "resumed", **kw))
    second = refine_train(config(tiny_ldm, dataset, tmp_path / "resumed", resume=True, **kw))
    assert second.step == 8
    names = ("checkpoints/last/trainable.safetensors", "unet/diffusion_pytorch_model.safetensors")
    for name in names:
        a = load_file(str(tmp_path / "straight" / name))
        b = load_file(str(tmp_path / "resumed" / name))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_sd15_lora_on_the_range_loads_on_top_of_the_base(
    tmp_path_factory, dataset, tmp_path, cli, monkeypatch
):
    sd15 = tiny_pipeline_path("sd15", tmp_path_factory)
    out = tmp_path / "lora"
    res = cli(
        "refine", "train", "--backbone", "sd15", "--late-steps", "500-750", "--data", dataset,
        "--init", sd15, "--out", out, "--resolution", "32", "--train-steps", "2",
        "--batch-size", "2", "--lora-rank", "4", "--device", "cpu", "--eval-images", "2",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((out / "refine.json").read_text())["kind"] == "lora"

    from dd_plugins.sd15 import SD15Backbone

    calls: list[tuple[int, bool, tuple]] = []
    real = SD15Backbone.predict

    def predict(self, latents, timestep, *args, **kwargs):
        layers = [m for m in self.denoiser.modules() if hasattr(m, "lora_A")]
        enabled = bool(layers) and not any(m.disable_adapters for m in layers)
        calls.append((int(timestep[0]), enabled, tuple(self.denoiser.active_adapters())))
        return real(self, latents, timestep, *args, **kwargs)

    monkeypatch.setattr(SD15Backbone, "predict", predict)
    # backbone and base model come from the run's refine.json
    r = cli("refine", dataset / "im1.png", "--segment", f"500-750={out}", "--steps", "8",
            "--out", tmp_path / "refined", *DET)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert [(t, on) for t, on, _ in calls] == [(500, True), (375, True), (250, False), (125, False)]
    assert calls[0][2] == ("segment0",)


def test_train_bad_input(cli, tiny_ldm, dataset, tmp_path):
    def error(*args) -> str:
        res = cli("refine", "train", *args)
        assert res.exit_code != 0
        lines = [x for x in res.output.splitlines() if x.startswith("Error:")]
        assert len(lines) == 1, res.output
        return lines[0]

    base = ["--data", dataset, "--init", tiny_ldm, "--out", tmp_path / "o"]
    assert "--late-steps '900-100' must satisfy" in error(*base, "--late-steps", "900-100")
    msg = error(*base, "--late-steps", "0-500", "--backbone", "flux")
    assert "cannot train --backbone 'flux' on a step range" in msg
    assert "ldm (full)" in msg and "sd15 (lora)" in msg
    assert "--data folder not found" in error(
        "--late-steps", "0-500", "--data", tmp_path / "none", "--init", tiny_ldm, "--out",
        tmp_path / "o",
    )  # fmt: skip
    assert "--ema-decay must be in [0, 1)" in error(*base, "--late-steps", "0-500",
                                                    "--ema-decay", "1.5")  # fmt: skip


def test_two_cpu_processes_through_accelerate_launch(tiny_ldm, dataset, tmp_path):
    run = tmp_path / "run"
    proc = launch_dd_twice([
        "refine", "train", "--backbone", "ldm",
        "--late-steps", "500-750", "--data", dataset, "--init", tiny_ldm,
        "--out", run, "--device", "cpu", "--resolution", "32", "--train-steps", "2",
        "--batch-size", "2", "--eval-every", "2", "--save-every", "1",
    ])  # fmt: skip
    assert "batch 2 x 2 x 1" in proc.stderr
    assert_two_rank_checkpoint(run)
    assert json.loads((run / "refine.json").read_text())["step"] == 2


def test_run_records_name_inputs_by_absolute_path(tiny_ldm, dataset, tmp_path, monkeypatch):
    """--init and --data given relative: refine.json and config.toml work from anywhere."""

    monkeypatch.chdir(Path(tiny_ldm).parent)
    init = os.path.relpath(tiny_ldm)
    data = os.path.relpath(dataset)
    out = tmp_path / "run"
    refine_train(config(Path(init), Path(data), out, train_steps=2, eval_every=2))
    info = json.loads((out / "refine.json").read_text())
    assert info["init"] == str(Path(tiny_ldm).resolve())
    monkeypatch.chdir(tmp_path)
    from dd.engines.refine import read_model_info

    assert Path(read_model_info(out)["init"]).is_dir()


def test_metrics_of_a_resumed_run_equal_the_straight_runs(tiny_ldm, dataset, tmp_path):
    """The loop's metrics.jsonl rules (issue 29): no extra line at --stop-at (the loss window
    is in the checkpoint), lr is the one the logged step used, resumed == straight."""
    from dd.training.schedule import lr_schedule

    kw = dict(train_steps=6, save_every=2, eval_every=3, log_every=4, warmup_steps=2,
              lr_schedule="cosine", batch_size=2, eval_images=2)  # fmt: skip
    refine_train(config(tiny_ldm, dataset, tmp_path / "straight", **kw))
    refine_train(config(tiny_ldm, dataset, tmp_path / "resumed", stop_at=3, **kw))
    assert [r["type"] for r in _metrics(tmp_path / "resumed")] == ["eval", "eval", "stop"]
    refine_train(config(tiny_ldm, dataset, tmp_path / "resumed", resume=True, **kw))
    straight = _metrics(tmp_path / "straight")
    assert straight == _metrics(tmp_path / "resumed")
    train = [r for r in straight if r["type"] == "train"]
    assert [r["step"] for r in train] == [4, 6]
    f = lr_schedule("cosine", 6, 2)
    assert [r["lr"] for r in train] == pytest.approx([1e-3 * f(3), 1e-3 * f(5)])


def _metrics(out: Path) -> list[dict]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "step_time_s"} for r in recs]


def test_refine_train_embedding_cache_flag(tmp_path_factory, dataset, tmp_path, cli):
    sd15 = tiny_pipeline_path("sd15", tmp_path_factory)
    cache = tmp_path / "cache"
    res = cli(
        "refine", "train", "--backbone", "sd15", "--late-steps", "500-750", "--data", dataset,
        "--init", sd15, "--out", tmp_path / "run", "--resolution", "32", "--train-steps", "1",
        "--batch-size", "2", "--lora-rank", "2", "--device", "cpu", "--eval-images", "2",
        "--embedding-cache", cache, "--no-offload-text-encoders",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert len(list(cache.glob("sd15-*/*/*.safetensors"))) == 8  # one per caption
