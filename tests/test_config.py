"""TOML presets: finding, validation with one-line errors, merging, saving; shipped presets."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import typer.main

from dd.engines.treat import TreatConfig
from dd.errors import DDError
from dd.runtime.config import (
    PRESET_DIR,
    find_preset,
    list_presets,
    load_preset,
    load_toml,
    resolve,
    save_config,
    to_toml,
    validate,
)

SHIPPED = ["flux-dev", "flux-schnell", "sd15", "sd3", "sdxl"]


def test_shipped_presets_load_and_reproduce_the_papers_settings():
    assert set(SHIPPED) <= set(list_presets())
    presets = {name: load_preset(name, TreatConfig)[0] for name in SHIPPED}
    for name, p in presets.items():
        cfg = resolve(TreatConfig, preset=p)
        assert cfg.lora_rank == 16 and cfg.grad_steps == 1 and cfg.lr == 1e-4, name
        assert cfg.reg_weight == 0.25 and cfg.reduction == "mean", name
        assert cfg.backbone == name.split("-")[0] and cfg.model, name
    schnell, dev = presets["flux-schnell"], presets["flux-dev"]
    assert (schnell["resolution"], schnell["steps"]) == (1024, 4) and "guidance" not in schnell
    assert (dev["steps"], dev["guidance"]) == (10, 3.5)
    assert (presets["sd15"]["resolution"], presets["sd15"]["steps"]) == (512, 20)
    assert (presets["sd3"]["resolution"], presets["sd3"]["steps"]) == (1024, 28)
    assert presets["sd3"]["guidance"] == 7.0
    assert presets["sdxl"]["resolution"] == 1024
    # every value carries a comment citing where it comes from
    for name in SHIPPED:
        for line in (PRESET_DIR / f"{name}.toml").read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                assert "  # " in line, (name, line)


def test_find_preset_by_name_path_and_local_folder(tmp_path, monkeypatch):
    assert find_preset("sd15") == PRESET_DIR / "sd15.toml"
    own = tmp_path / "mine.toml"
    own.write_text("lr = 0.001\n")
    assert find_preset(str(own)) == own
    # ./configs/NAME.toml shadows a shipped preset of the same name
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "sd15.toml").write_text("steps = 7\n")
    monkeypatch.chdir(tmp_path)
    assert load_preset("sd15", TreatConfig)[0] == {"steps": 7}
    with pytest.raises(DDError, match="no preset named 'flux-schnel'") as e:
        find_preset("flux-schnel")
    assert e.value.hint == "did you mean 'flux-schnell'?"
    with pytest.raises(DDError, match="config file not found"):
        find_preset(str(tmp_path / "missing.toml"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lr = 1e-4\nlora_rnak = 8\n", "unknown key 'lora_rnak'"),
        ("resolution = 'big'\n", "key 'resolution' must be an integer, got 'big'"),
        ("gradient_checkpointing = 1\n", "key 'gradient_checkpointing' must be true/false"),
        ("eval_seeds = [0, 'a']\n", "key 'eval_seeds' must be a list of an integer"),
        ("[lora]\nrank = 8\n", "unknown key 'lora'"),
        ("lr = \n", "invalid TOML"),
    ],
)
def test_bad_presets_are_one_line_errors_naming_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(DDError) as e:
        load_preset(str(path), TreatConfig)
    assert str(path) in e.value.message and message in e.value.message
    assert "\n" not in str(e.value)
    if "lora_rnak" in text:
        assert e.value.hint == "did you mean 'lora_rank'?"


def test_resolve_precedence_defaults_preset_flags():
    preset = validate({"lr": 1e-3, "train_steps": 5, "guidance": 2}, TreatConfig, source="p")
    assert preset["guidance"] == 2.0 and isinstance(preset["guidance"], float)
    cfg = resolve(TreatConfig, preset=preset, flags={"lr": 0.5})
    assert (cfg.lr, cfg.train_steps, cfg.eval_every) == (0.5, 5, TreatConfig().eval_every)
    with pytest.raises(DDError, match="command line: key 'lr' must be a number"):
        resolve(TreatConfig, flags={"lr": "fast"})


def test_saved_config_reads_back_as_the_same_settings(tmp_path):
    cfg = TreatConfig(
        backbone="flux",
        model='C:\\models\\"flux"',
        detector_options={"input_size": 64, "variant": "tiny"},
        lora_targets=["to_q", "to_out.0"],
        guidance=None,
        lr=3e-5,
        max_drift=float("inf"),
    )
    path = save_config(tmp_path / "config.toml", cfg.resolved(), header=["a run", ""])
    text = path.read_text()
    assert text.startswith("# a run\n#\n") and "# guidance = (unset)" in text
    back = validate(load_toml(path), TreatConfig, source=str(path))
    again = resolve(TreatConfig, preset=back)
    assert again == cfg
    assert to_toml({"a b": [1.5, True], "x": {"k": "v"}}) == '"a b" = [1.5, true]\nx = {k = "v"}\n'


def test_cli_defaults_are_the_config_defaults():
    """A flag left at its default must mean the same as the config's default."""
    from dd.cli import build_app

    defaults = TreatConfig()
    cmd = typer.main.get_command(build_app(with_plugins=False)).commands["treat"]
    fields = {f.name for f in dataclasses.fields(TreatConfig)}
    seen = set()
    for param in cmd.params:
        name = {"backbone_option": "backbone_options", "detector_option": "detector_options"}.get(
            param.name, param.name
        )
        if name not in fields:
            continue
        seen.add(name)
        value = getattr(defaults, name)
        if name == "eval_seeds":
            assert param.default == ",".join(map(str, value))
        elif name in ("backbone_options", "detector_options", "lora_targets", "quality",
                      "quality_weights"):  # fmt: skip
            assert param.default in (None, []) and not value
        else:
            assert param.default == value, name
    assert seen == fields


def test_unknown_preset_key_stops_the_cli_before_loading_anything(cli, tmp_path):
    path = tmp_path / "p.toml"
    path.write_text("backbone = 'flux'\nsteps_per_eval = 3\n")
    res = cli("treat", "--config", path, "--model", "nowhere", "--out", tmp_path / "o")
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {path}: unknown key 'steps_per_eval'")
    assert not (tmp_path / "o").exists()


def test_declared_choices_and_bounds_are_checked_for_any_config():
    """A config made in Python (not through the CLI's option checks) is held to its fields'
    declared choices and lower bounds: one usage error naming the flag."""
    import dataclasses

    from dd.engines.refine_train import RefineTrainConfig
    from dd.engines.treat import TreatConfig
    from dd.errors import UsageError
    from dd.runtime.config import check_declared, setting

    @dataclasses.dataclass
    class Toy:
        mode: str = setting("a", help="A mode.", choices=("a", "b"))
        steps: int | None = setting(None, help="Steps.", min=1, flags=("--n-steps",))

    check_declared(Toy())
    check_declared(Toy(mode="b", steps=3))
    with pytest.raises(UsageError, match=r"unknown --mode 'c'.*") as e:
        check_declared(Toy(mode="c", steps=0))  # the choice is reported first
    assert "one of a, b" in e.value.hint
    with pytest.raises(UsageError, match=r"--n-steps must be at least 1, got 0"):
        check_declared(Toy(steps=0))
    with pytest.raises(UsageError, match=r"unknown --quantize 'int3'"):
        check_declared(TreatConfig(quantize="int3"))
    with pytest.raises(UsageError, match=r"--save-every must be at least 1, got 0"):
        check_declared(RefineTrainConfig(save_every=0))
    with pytest.raises(UsageError, match=r"unknown --lr-schedule 'linear'"):
        check_declared(RefineTrainConfig(lr_schedule="linear"))
    from dd.engines.eval_detector import EvalDetectorConfig

    with pytest.raises(UsageError, match=r"--calibrate must be at most 0.999, got 1.5"):
        check_declared(EvalDetectorConfig(dataset=Path("x"), calibrate=1.5))
