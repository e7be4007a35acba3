"""The contract every writing command keeps with its output folder, its inputs and its exit
codes (README, "Errors and exit codes"): each case here failed on an earlier dd.

* a run that fails before writing any result leaves nothing that blocks the corrected rerun;
* an existing output: refused unless ``--overwrite`` (another command's results, files dd
  did not write), continued with ``--resume`` (the same command, the same settings);
* exit codes mean one thing each: 2 usage mistakes, 1 errors, 4 some inputs failed;
* Ctrl-C says ``--resume`` only where the command has one;
* folders given as inputs yield inputs, not dd's own grids, overlays or masks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image

from dd.cli import build_app, main
from dd.runtime.io import mark_run_folder
from tests.helpers import TINY_DETECTOR as DET

#: Tiny models on a shared CPU run faster on one thread.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _run(capsys, args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out + out.err


def _images(folder: Path, n: int = 2, size: int = 32) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(
            folder / f"img{i}.png"
        )
    return folder


def _leaves():
    def walk(cmd, path=()):
        subs = getattr(cmd, "commands", None)
        if subs is None:
            yield path, cmd
            return
        for name, sub in sorted(subs.items()):
            yield from walk(sub, (*path, name))

    return list(walk(typer.main.get_command(build_app())))


# ------------------------------------------------------------------------------------------
# A failed run does not block the corrected rerun; --overwrite everywhere
# ------------------------------------------------------------------------------------------
def test_refine_with_a_bad_mask_leaves_nothing_that_blocks_the_rerun(tmp_path, tiny_ldm, capsys):
    imgs = _images(tmp_path / "in")
    (tmp_path / "bad.png").write_text("not a png")
    out = tmp_path / "rx"
    base = ["refine", imgs, "--backbone", "ldm", "--model", tiny_ldm, "--late-steps",
            "500-750", "--steps", "4", "--out", out, *DET]  # fmt: skip
    code, text = _run(capsys, [*base, "--mask", tmp_path / "bad.png"])
    assert code == 1 and "Error:" in text, text
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))
    code, text = _run(capsys, [*base, "--mask", "auto"])
    assert code == 0, text
    # a finished run: refused with both ways out named, replaced with --overwrite
    code, text = _run(capsys, [*base, "--mask", "auto"])
    assert code == 1 and "already holds a refine run" in text and "--overwrite" in text
    code, text = _run(capsys, [*base, "--overwrite"])
    assert code == 0, text
    settings = json.loads((out / ".dd" / "refine-run.json").read_text())
    assert settings["mask"] is None  # the new run's settings, not the old one's
    code, text = _run(capsys, [*base, "--resume", "--overwrite"])
    assert code == 2 and "exclude each other" in text


def test_synth_with_a_corrupt_photo_leaves_nothing_that_blocks_the_rerun(tmp_path, capsys):
    photos = _images(tmp_path / "photos", 2, 64)
    (photos / "broken.jpg").write_text("not a jpeg")
    out = tmp_path / "ds"
    args = ["synth", "--out", out, "--count", "3", "--size", "64", "--photos", photos]
    code, text = _run(capsys, args)
    assert code == 1 and "broken.jpg" in text and "hint:" in text, text
    assert not out.exists()
    (photos / "broken.jpg").unlink()
    code, text = _run(capsys, args)
    assert code == 0, text
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 3


def test_every_command_that_writes_a_results_folder_has_overwrite():
    writers = {
        " ".join(path)
        for path, cmd in _leaves()
        if any(getattr(p, "name", None) == "out" for p in cmd.params)
    }
    expected = {
        *("detect", "generate", "treat", "dreambooth", "train-detector", "synth"),
        *("refine run", "refine train", "eval gen", "eval-detector", "label mine"),
        *("label pseudo", "label import", "dataset import-richhf", "eval study create"),
    }
    assert expected <= writers
    leaves = {" ".join(p): c for p, c in _leaves()}
    for name in writers:
        names = {p.name for p in leaves[name].params}
        assert "overwrite" in names, f"dd {name} writes --out but has no --overwrite"


# ------------------------------------------------------------------------------------------
# An existing output is treated the same way everywhere
# ------------------------------------------------------------------------------------------
def _detect_run(tmp_path: Path) -> Path:
    out = tmp_path / "detect-run"
    mark_run_folder(out, "detect", not_inputs=("maps", "overlays"))
    (out / "report.jsonl").write_text("{}\n")
    return out


def test_eval_gen_refuses_another_commands_results(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a cat\n")
    out = _detect_run(tmp_path)
    code, text = _run(capsys, ["eval", "gen", "--backbone", "sd15", "--model", "no/model",
                               "--prompts", tmp_path / "p.txt", "--out", out])  # fmt: skip
    assert code == 1 and "holds the results of `dd detect`" in text and "--overwrite" in text
    assert sorted(p.name for p in out.iterdir()) == [".dd", "report.jsonl"]


def test_eval_detector_refuses_to_replace_metrics_and_checks_out_first(tmp_path, capsys):
    from dd.data.synth import synthesize

    ds = tmp_path / "ds"
    synthesize(ds, 4, size=64, use_skimage=False, progress=False)
    out = tmp_path / "ev"
    args = ["eval-detector", ds, "--out", out, *DET, "--device", "cpu"]
    code, text = _run(capsys, args)
    assert code == 0, text
    before = (out / "metrics.json").read_text()
    code, text = _run(capsys, args)
    assert code == 1 and "already holds a metrics.json" in text and "--overwrite" in text
    assert (out / "metrics.json").read_text() == before
    code, text = _run(capsys, [*args, "--overwrite"])
    assert code == 0, text
    # --out naming a file fails at once, before any evaluation
    (tmp_path / "file").write_text("x")
    code, text = _run(capsys, ["eval-detector", ds, "--out", tmp_path / "file", *DET])
    assert code == 1 and "is a file, not a folder" in text
    assert "eval" not in text.split("Error:")[0]  # no progress bar ran


def test_detect_refuses_a_folder_of_other_files(tmp_path, capsys):
    imgs = _images(tmp_path / "in")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code, text = _run(capsys, ["detect", imgs, "--out", mine, *DET])
    assert code == 1 and "is not empty" in text and "--overwrite" in text, text
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    code, text = _run(capsys, ["detect", imgs, "--out", mine, *DET, "--overwrite"])
    assert code == 0, text
    assert (mine / "notes.txt").read_text() == "keep me"  # --overwrite replaces dd's files only


def test_label_export_does_not_replace_a_file_silently(tmp_path, capsys):
    from dd.data.synth import synthesize

    ds = tmp_path / "ds"
    synthesize(ds, 3, size=64, use_skimage=False, progress=False)
    out = tmp_path / "coco.json"
    out.write_text("mine")
    args = ["label", "export", ds, "--format", "coco", "--out", out]
    code, text = _run(capsys, args)
    assert code == 1 and "already exists" in text and "--overwrite" in text
    assert out.read_text() == "mine"
    code, text = _run(capsys, [*args, "--overwrite"])
    assert code == 0, text
    assert json.loads(out.read_text())["images"]


def test_label_mine_does_not_re_mine_an_existing_queue_silently(tmp_path, capsys):
    pool = _images(tmp_path / "pool")
    queue = tmp_path / "q"
    mark_run_folder(queue, "label mine")
    (queue / "queue.jsonl").write_text('{"id": "x"}\n')
    code, text = _run(capsys, ["label", "mine", pool, "--out", queue, *DET])
    assert code == 1 and "already holds a labelling queue" in text
    assert "--resume" in text and "--overwrite" in text
    assert (queue / "queue.jsonl").read_text() == '{"id": "x"}\n'
    code, text = _run(capsys, ["label", "mine", pool, "--out", _detect_run(tmp_path), *DET])
    assert code == 1 and "holds the results of `dd detect`" in text


# ------------------------------------------------------------------------------------------
# Exit codes: 2 usage, 1 errors, 4 some inputs failed
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["generate", "--backbone", "sd15", "--model", "m"], "--prompts is required"),
        (["generate", "--model", "m", "--prompts", "p.txt"], "--backbone is required"),
        (["treat", "--backbone", "flux", "--model", "m"], "--prompts is required"),
        (["eval", "gen", "--backbone", "flux", "--model", "m"], "--prompts is required"),
        (["dreambooth", "--backbone", "sd3", "--model", "m"], "--instance-dir is required"),
        (["refine", "ds/images/img0.png", "--late-steps", "500-750"], "--backbone is required"),
        (["detect", "ds/images", "--device", "gpu"], "unknown device 'gpu'"),
        (["train-detector", "ds", "--out", "run", "--loss", "l1"], "unknown --loss 'l1'"),
        (
            [
                "generate",
                "--backbone",
                "sd15",
                "--model",
                "m",
                "--prompts",
                "p.txt",
                "--dtype",
                "fp8",
            ],
            "unknown dtype",
        ),  # fmt: skip
    ],
)
def test_usage_mistakes_exit_2_with_the_usage_line(args, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("a cat\n")
    _images(tmp_path / "ds" / "images")
    code, text = _run(capsys, args)
    assert code == 2, text
    assert words in text and "Traceback" not in text
    assert f"Usage: dd {args[0]}" in text and "for help" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "p.txt"]  # nothing written


def test_label_pseudo_fails_when_nothing_was_labelled(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, text = _run(capsys, ["label", "pseudo", tmp_path / "empty", "--out",
                               tmp_path / "o1", *DET])  # fmt: skip
    assert code == 4 and "no images in the pool" in text, text
    assert not (tmp_path / "o1").exists()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_text("not a png")
    (bad / "b.jpg").write_bytes(b"")
    code, text = _run(capsys, ["label", "pseudo", bad, "--out", tmp_path / "o2", *DET])
    assert code == 4 and "every image of the pool failed" in text, text
    assert not (tmp_path / "o2").exists()
    # one good image among bad ones: labels are written, the exit code says some failed
    _images(bad, 1)
    code, text = _run(capsys, ["label", "pseudo", bad, "--out", tmp_path / "o3", *DET])
    assert code == 4 and "1 images labelled" in text, text
    assert (tmp_path / "o3" / "manifest.jsonl").is_file()


def test_a_lora_that_does_not_exist_is_not_found(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a cat\n")
    code, text = _run(capsys, ["treat", "--backbone", "flux", "--model", "no/model",
                               "--prompts", tmp_path / "p.txt", "--eval-prompts",
                               tmp_path / "p.txt", "--init-lora", tmp_path / "nothere",
                               "--out", tmp_path / "t"])  # fmt: skip
    assert code == 1 and "--init-lora not found" in text, text
    assert "offline" not in text and "weight_name" not in text
    assert not (tmp_path / "t").exists()


# ------------------------------------------------------------------------------------------
# Ctrl-C: the hint is true for the command
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "args", "resumable"),
    [
        (("synth",), ["--out", "x"], False),
        (("eval", "gen"), [], False),
        (("generate",), [], True),
        (("detect",), ["x"], True),
        (("treat",), [], True),
    ],
)
def test_interrupt_hint_names_resume_only_where_it_exists(path, args, resumable, capsys):
    root = typer.main.get_command(build_app())
    cmd = root
    for name in path:
        cmd = cmd.commands[name]

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    cmd.callback = interrupted
    try:
        code = root.main(args=[*path, *args], prog_name="dd", standalone_mode=False)
    except typer.Exit as exc:
        code = exc.exit_code
    err = capsys.readouterr().err
    assert code == 130
    assert err.startswith("Interrupted (")
    assert ("--resume" in err) == resumable, err


def test_generate_resumes_after_an_interrupt_to_the_same_images(
    tmp_path, tiny_ldm, capsys, monkeypatch
):
    import dd.inference as inference

    (tmp_path / "p.txt").write_text("a cat\na dog\n")
    args = ["generate", "--backbone", "ldm", "--model", tiny_ldm, "--prompts",
            tmp_path / "p.txt", "--seeds", "2", "--steps", "2", "--resolution", "32"]  # fmt: skip
    code, text = _run(capsys, [*args, "--out", tmp_path / "whole"])
    assert code == 0, text

    real = inference.generate_batches

    def two_then_interrupt(*a, **k):
        for n, batch in enumerate(real(*a, **k)):
            if n == 2:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(inference, "generate_batches", two_then_interrupt)
    out = tmp_path / "cut"
    code, text = _run(capsys, [*args, "--out", out])
    assert code == 130 and "--resume" in text
    assert len(list(out.glob("*.png"))) == 2 and not (out / "report.jsonl").exists()
    code, text = _run(capsys, [*args, "--out", out])  # without --resume: refused
    assert code == 1 and "already holds a dd generate run" in text
    code, text = _run(capsys, [*args[:-2], "--resolution", "64", "--out", out, "--resume"])
    assert code == 1 and "resolution" in text  # other settings: refused
    monkeypatch.setattr(inference, "generate_batches", real)
    code, text = _run(capsys, [*args, "--out", out, "--resume"])
    assert code == 0 and "resuming: 2 image(s)" in text, text
    for png in (tmp_path / "whole").glob("*.png"):
        assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(out / png.name)))
    whole = (tmp_path / "whole" / "report.jsonl").read_text()
    assert (out / "report.jsonl").read_text() == whole


# ------------------------------------------------------------------------------------------
# Folders given as inputs yield inputs
# ------------------------------------------------------------------------------------------
def test_folders_yield_inputs_not_dds_own_pictures(tmp_path):
    from dd.data.images import collect_inputs
    from dd.data.synth import synthesize

    gen = _images(tmp_path / "gen", 2)
    Image.new("RGB", (64, 32)).save(gen / "grid.png")
    mark_run_folder(gen, "generate", not_inputs=("grid.png",))
    items, _ = collect_inputs([str(gen)])
    assert sorted(it.path.name for it in items) == ["img0.png", "img1.png"]
    ds = tmp_path / "ds"
    synthesize(ds, 4, size=64, use_skimage=False, progress=False)
    items, _ = collect_inputs([str(ds)])
    assert items and all(it.path.parent.name == "images" for it in items)
    # naming what is skipped reads it
    items, _ = collect_inputs([str(ds / "masks")])
    assert items and all(it.path.parent.name == "masks" for it in items)
    items, _ = collect_inputs([str(gen / "grid.png")])
    assert [it.path.name for it in items] == ["grid.png"]


def test_pseudo_labelling_a_dataset_folder_skips_its_masks(tmp_path):
    from dd.data.synth import synthesize
    from dd.engines.pseudo import stream_inputs

    ds = tmp_path / "ds"
    synthesize(ds, 4, size=64, use_skimage=False, progress=False)
    names = [p.parent.name for p, _ in stream_inputs([str(ds)])]
    assert names and set(names) == {"images"}


# ------------------------------------------------------------------------------------------
# Presets and help
# ------------------------------------------------------------------------------------------
def _presets() -> list[str]:
    from dd.runtime.config import list_presets

    names = list_presets()
    assert {"flux-schnell", "flux-dev", "flux-dev-24gb", "sd15", "sd3", "sdxl"} <= set(names)
    return names


@pytest.mark.parametrize("preset", _presets())
@pytest.mark.parametrize(
    ("command", "missing"),
    [
        (["dreambooth"], "--instance-dir is required"),
        (["treat"], "--prompts is required"),
        (["generate"], "--prompts is required"),
    ],
)
def test_every_preset_works_for_every_command_with_config(preset, command, missing, capsys):
    code, text = _run(capsys, [*command, "--config", preset])
    assert code == 2 and missing in text, text  # past the preset, at the first missing flag
    assert "unknown key" not in text


def test_group_help_shows_the_default_forms_options(capsys):
    code, text = _run(capsys, ["refine", "--help"])
    assert code == 0
    assert "Without a command it runs `run`: dd refine IMAGES... [OPTIONS]" in text
    assert "--late-steps" in text and "--mask" in text and "--overwrite" in text
    code, text = _run(capsys, ["eval", "study", "--help"])
    assert code == 0
    assert "dd eval study DIR_A DIR_B [OPTIONS]" in text and "--out" in text


def test_label_import_merges_into_a_dataset_but_not_into_other_files(tmp_path, capsys):
    from dd.data.synth import synthesize

    src = tmp_path / "src"
    synthesize(src, 4, size=64, use_skimage=False, progress=False)
    args = ["label", "import", src / "masks", "--images", src / "images", "--format", "png"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, text = _run(capsys, [*args, "--out", other])
    assert code == 1 and "is not empty" in text and "--overwrite" in text, text
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    code, text = _run(capsys, [*args, "--out", other, "--overwrite"])
    assert code == 0, text
    assert (other / "notes.txt").read_text() == "mine" and (other / "manifest.jsonl").is_file()
    # a dataset folder is merged into (re-running replaces, never duplicates)
    code, text = _run(capsys, [*args, "--out", tmp_path / "ds"])
    assert code == 0, text
    code, text = _run(capsys, [*args, "--out", tmp_path / "ds"])
    assert code == 0, text
    rows = (tmp_path / "ds" / "manifest.jsonl").read_text().splitlines()
    assert len(rows) == len(set(rows))


def test_training_overwrite_replaces_the_old_run_and_keeps_other_files(tmp_path):
    from dd.errors import DDError, UsageError
    from dd.runtime.checkpoint import prepare_run_folder

    out = tmp_path / "run"
    mark_run_folder(out, "treat")
    for d in ("checkpoints/last", "best"):
        (out / d).mkdir(parents=True)
    (out / "metrics.jsonl").write_text("{}\n")
    (out / "config.toml").write_text("lr = 1\n")
    (out / "notes.txt").write_text("mine")
    files = ("checkpoints", "metrics.jsonl", "pytorch_lora_weights.safetensors")
    with pytest.raises(DDError, match="already holds a treat run") as e:
        prepare_run_folder(out, False, "treat", files)
    assert "--overwrite" in str(e.value)
    with pytest.raises(UsageError, match="exclude each other"):
        prepare_run_folder(out, True, "treat", files, overwrite=True)
    assert prepare_run_folder(out, False, "treat", files, overwrite=True) is None
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # nothing of it resumable


def test_label_pseudo_refuses_then_overwrites_its_labels(tmp_path, capsys):
    pool = _images(tmp_path / "pool", 3)
    args = ["label", "pseudo", pool, "--out", tmp_path / "o", *DET]
    code, text = _run(capsys, args)
    assert code == 0, text
    code, text = _run(capsys, args)
    assert code == 1 and "already holds pseudo-labels" in text and "--overwrite" in text
    code, text = _run(capsys, [*args, "--overwrite"])
    assert code == 0 and "3 images labelled" in text, text
    rows = (tmp_path / "o" / "manifest.jsonl").read_text().splitlines()
    assert len(rows) == 3
