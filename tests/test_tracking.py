"""``--report-to tensorboard``: the training commands' records reach TensorBoard through
accelerate's trackers; read back with tensorboard's own event reader."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_train_detector import TINY as DETECTOR_TINY
from test_train_detector import make_dataset
from test_treat import base_config, detector_dir, prompt_files, tiny_flux  # noqa: F401

from dd.engines.treat import treat
from dd.errors import DDError
from dd.runtime.tracking import RunTracker, check_report_to

#: Tiny models on a shared CPU run faster on one thread.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(folder.rglob("events.out.tfevents.*"))
    assert files, f"no event file under {folder}"
    acc = EventAccumulator(str(files[0].parent), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_treat_reports_scalars_quality_and_grids(tiny_flux, detector_dir, prompt_files, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    cfg = base_config(tiny_flux, detector_dir, prompt_files, out, report_to="tensorboard",
                      quality=["detail", "drift"], train_steps=2, eval_every=2,
                      eval_seeds=[0])  # fmt: skip
    treat(cfg)
    acc = _events(out / "tensorboard")
    tags = acc.Tags()
    for tag in ("train/loss", "train/lr", "eval/mean", "eval/drift", "quality/detail",
                "base_quality/detail", "quality/drift"):  # fmt: skip
        assert tag in tags["scalars"], tags["scalars"]
    assert [e.step for e in acc.Scalars("eval/mean")] == [0, 2]
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]
    assert "eval/grid" in tags["images"]
    image = acc.Images("eval/grid")[-1]
    assert image.step == 2 and image.width > 0 and image.height > 0


def test_train_detector_reports_scalars(tmp_path, cli):
    data = make_dataset(tmp_path / "ds")
    out = tmp_path / "det"
    res = cli("train-detector", data, "--out", out, *DETECTOR_TINY, "--steps", "2",
              "--val-every", "2", "--workers", "0", "--report-to", "tensorboard")  # fmt: skip
    assert res.exit_code == 0, res.output
    acc = _events(out / "tensorboard")
    scalars = acc.Tags()["scalars"]
    assert "train/loss" in scalars and "train/lr" in scalars, scalars
    assert any(t.startswith("val/") for t in scalars), scalars


def test_report_to_is_checked_before_anything_loads(cli, tmp_path, monkeypatch):
    with pytest.raises(DDError, match="one of none, tensorboard, wandb"):
        check_report_to("mlflow")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a)
    )
    with pytest.raises(DDError, match="pip install wandb"):
        check_report_to("wandb")
    (tmp_path / "p.txt").write_text("a cat\n")
    res = cli("treat", "--backbone", "flux", "--model", "m", "--prompts", tmp_path / "p.txt",
              "--eval-prompts", tmp_path / "p.txt", "--out", tmp_path / "o",
              "--report-to", "mlflow")  # fmt: skip
    assert res.exit_code == 2 and "unknown --report-to 'mlflow'" in res.output


def test_none_tracks_nothing(tmp_path):
    tracker = RunTracker("none", tmp_path, "x")
    tracker.record({"type": "train", "step": 1, "loss": 0.5})
    tracker.close()
    assert not tracker.active and not any(tmp_path.iterdir())
