"""`dd detect` end to end with the real SegFormer class at tiny size, on CPU."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dd.api.plugins import get_host
from dd.cli import main
from dd.data.images import collect_inputs, load_image
from dd.engines.detect import JOURNAL, DetectConfig, resize_for, run_detect

TINY = ["-O", "variant=tiny", "-O", "input_size=64"]


def _images(folder: Path, n: int = 5, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = int(rng.integers(20, 70)), int(rng.integers(20, 70))
        p = folder / f"img{i:02d}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def _tiny_detector():
    return get_host().detectors.get("segformer").load(None, variant="tiny", input_size=64)


def test_detect_folder_writes_maps_overlays_and_reports(tmp_path, cli):
    imgs = _images(tmp_path / "in", 4)
    (tmp_path / "in" / "sub").mkdir()
    Image.new("L", (33, 17), 90).save(tmp_path / "in" / "sub" / "gray.png")
    out = tmp_path / "out"
    res = cli("detect", tmp_path / "in", "--out", out, *TINY, "--batch-size", "3")
    assert res.exit_code == 0, res.output
    assert "UNTRAINED" in res.output
    recs = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]
    assert [r["key"] for r in recs] == [f"img{i:02d}" for i in range(4)] + ["sub/gray"]
    for r, src in zip(recs, [*imgs, tmp_path / "in" / "sub" / "gray.png"], strict=True):
        w, h = Image.open(src).size
        # by default: the map at the detector's working size (64 here, aspect kept) and a
        # JPEG overlay thumbnail (these images are under its 256 px)
        m = Image.open(out / r["map"])
        scale = min(1.0, 64 / max(w, h))
        assert m.mode == "L" and m.size == (max(1, round(w * scale)), max(1, round(h * scale)))
        assert r["overlay"].endswith(".jpg")
        ov = Image.open(out / r["overlay"])
        assert ov.format == "JPEG" and ov.mode == "RGB" and ov.size == (w, h)
        assert (r["width"], r["height"]) == (w, h)  # the scores are the full-size map's
        assert 0 <= r["peak"][0] < w and 0 <= r["peak"][1] < h
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert [r["key"] for r in rows] == [r["key"] for r in recs]
    html = (out / "index.html").read_text()
    by_max = sorted(recs, key=lambda r: -r["max"])
    positions = [html.index(f">{r['key']}<") for r in by_max]
    assert positions == sorted(positions), "contact sheet is not sorted by max confidence"
    assert "Untrained detector" in html
    assert (out / "failed.jsonl").read_text() == ""
    assert json.loads((out / "summary.json").read_text())["images"] == 5


def test_full_size_outputs_are_one_flag_away(tmp_path, cli):
    imgs = _images(tmp_path / "in", 3, seed=2)
    Image.fromarray(np.full((90, 120, 3), 200, np.uint8)).save(tmp_path / "in" / "big.png")
    out = tmp_path / "full"
    full = ["--full-size-outputs", "--dtype", "fp32"]
    res = cli("detect", tmp_path / "in", "--out", out, *TINY, *full)
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]
    for r, src in zip(recs, [tmp_path / "in" / "big.png", *imgs], strict=True):
        w, h = Image.open(src).size
        m = Image.open(out / r["map"])
        assert m.mode == "L" and m.size == (w, h)
        ov = Image.open(out / r["overlay"])
        assert r["overlay"].endswith(".png") and ov.mode == "RGB" and ov.size == (w, h)
        arr = np.asarray(m, np.float32) / 255
        assert r["max"] == pytest.approx(arr.max(), abs=1 / 255)
        assert r["mean"] == pytest.approx(arr.mean(), abs=1 / 255)
    # the default run's scores are the same (they come from the full-size map either way)
    res = cli("detect", tmp_path / "in", "--out", tmp_path / "small", *TINY, "--dtype", "fp32")
    assert res.exit_code == 0, res.output
    small = [json.loads(x) for x in (tmp_path / "small" / "report.jsonl").read_text().splitlines()]
    assert Image.open(tmp_path / "small" / small[0]["map"]).size == (64, 48)  # 120x90 -> 64
    for a, b in zip(recs, small, strict=True):
        assert a["max"] == pytest.approx(b["max"], abs=1e-6) and a["peak"] == b["peak"]
    # resuming with the other outputs would mix them: refused
    res = cli("detect", tmp_path / "in", "--out", out, *TINY, "--dtype", "fp32", "--resume")
    assert res.exit_code == 1 and "--full-size-outputs" in res.output


def test_dtype_auto_is_bf16_only_where_it_is_native(monkeypatch):
    import dd.runtime.device as device

    cpu = torch.device("cpu")
    monkeypatch.setattr(device, "fast_bf16", lambda d: True)
    assert device.resolve_inference_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(device, "fast_bf16", lambda d: False)
    assert device.resolve_inference_dtype("auto", cpu) == torch.float32
    assert device.resolve_inference_dtype("fp32", cpu) == torch.float32


def test_maps_match_the_differentiable_forward(tmp_path):
    """The batched loader path gives the same map as Detector.forward on the image."""
    _images(tmp_path / "in", 3, seed=1)
    det = _tiny_detector()
    items, _ = collect_inputs([str(tmp_path / "in")])
    cfg = DetectConfig(out=tmp_path / "out", batch_size=2, full_size_outputs=True)
    res = run_detect(items, det, cfg)
    for r, it in zip(res.records, items, strict=True):
        x = torch.from_numpy(load_image(it.path)).permute(2, 0, 1).float()[None] / 255
        with torch.no_grad():
            ref = det(x)[0, 0].numpy()
        got = np.asarray(Image.open(tmp_path / "out" / r["map"]), np.float32) / 255
        assert np.abs(got - ref).max() <= 0.5 / 255 + 1e-6
        assert r["max"] == pytest.approx(float(ref.max()), abs=1e-5)
    assert resize_for(det, np.zeros((10, 12, 3), np.uint8)).shape == (3, 64, 64)


def test_bad_inputs_are_listed_and_exit_4(tmp_path, cli):
    _images(tmp_path / "in", 2)
    (tmp_path / "in" / "empty.png").write_bytes(b"")
    (tmp_path / "in" / "notes.jpg").write_text("not an image")
    out = tmp_path / "out"
    res = cli("detect", tmp_path / "in", tmp_path / "missing.png", "--out", out, *TINY)
    assert res.exit_code == 4, res.output
    failed = [json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines()]
    reasons = {Path(f["path"]).name: f["reason"] for f in failed}
    assert set(reasons) == {"empty.png", "notes.jpg", "missing.png"}
    assert "empty" in reasons["empty.png"] and "empty.png" in reasons["empty.png"]
    assert len((out / "report.jsonl").read_text().splitlines()) == 2
    assert "missing.png" in res.output


def test_fail_above_gate_and_json(tmp_path, cli):
    _images(tmp_path / "in", 2)
    res = cli("detect", tmp_path / "in", "--out", tmp_path / "o1", *TINY, "--fail-above", "0")
    assert res.exit_code == 3
    res = cli(
        "detect", tmp_path / "in", "--out", tmp_path / "o2", *TINY, "--fail-above", "1", "--json"
    )
    assert res.exit_code == 0
    payload = json.loads(res.stdout)
    assert payload["summary"]["images"] == 2 and len(payload["images"]) == 2
    assert payload["summary"]["untrained"] is True


def test_errors_are_one_line_with_a_hint(tmp_path, capsys, monkeypatch):
    code = main(["detect", str(tmp_path / "nothing-here"), "--out", str(tmp_path / "o")])
    assert code == 4  # EXIT_SOME_INPUTS_FAILED: no input could be read
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: no images to process")
    assert "nothing-here" in err[0] and "not found" in err[0]

    _images(tmp_path / "in", 1)
    code = main(["detect", str(tmp_path / "in"), "--weights", str(tmp_path / "nope.bin")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("Error: ") and "nope.bin" in err[-1]

    code = main(["detect", str(tmp_path / "in"), "--device", "cuda:7", *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and "hint:" in err[-1]


def test_dd_debug_shows_the_traceback(tmp_path):
    env = {**os.environ, "DD_DEBUG": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "dd", "detect", str(tmp_path / "none")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0
    assert "Traceback" in res.stderr and "DDError" in res.stderr


def test_resume_after_interrupt_has_no_duplicates(tmp_path):
    _images(tmp_path / "in", 7)
    items, _ = collect_inputs([str(tmp_path / "in")])
    det = _tiny_detector()
    out = tmp_path / "out"

    def stop_after(done, total):
        if done >= 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_detect(
            items, det, DetectConfig(out=out, batch_size=2, workers=1), on_progress=stop_after
        )
    assert not (out / "report.jsonl").exists()
    journal = (out / JOURNAL).read_text().splitlines()
    assert len(journal) == 3  # the interrupt lands after the third record, deterministically
    # A torn last line, as a kill in the middle of a write would leave.
    with open(out / JOURNAL, "a") as f:
        f.write('{"key": "img06", "ma')
    res = run_detect(items, det, DetectConfig(out=out, batch_size=2, resume=True))
    assert res.resumed == len(journal) and res.processed == 7 - len(journal)
    keys = [json.loads(line)["key"] for line in (out / "report.jsonl").read_text().splitlines()]
    assert keys == sorted(set(keys)) and len(keys) == 7


def test_resume_refuses_another_detector(tmp_path, cli):
    _images(tmp_path / "in", 1)
    assert cli("detect", tmp_path / "in", "--out", tmp_path / "o", *TINY).exit_code == 0
    res = cli(
        "detect",
        tmp_path / "in",
        "--out",
        tmp_path / "o",
        "--resume",
        "--detector",
        "segformer",
        "-O",
        "variant=tiny",
        "-O",
        "input_size=32",
    )
    assert res.exit_code == 1 and "another detector" in res.output


@pytest.mark.slow
def test_sigkill_mid_run_leaves_whole_files_and_resumes(tmp_path):
    """Kill -9 a real `dd detect` process; every file left is whole; --resume finishes."""
    _images(tmp_path / "in", 40, seed=3)
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "dd",
        "detect",
        str(tmp_path / "in"),
        "--out",
        str(out),
        *TINY,
        "--batch-size",
        "2",
        "--workers",
        "2",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    journal = out / JOURNAL
    deadline = time.time() + 300  # a loaded machine starts python slowly
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and len(journal.read_bytes().splitlines()) >= 5:
            break
        time.sleep(0.02)
    # A run that ended by itself (an error, or all 40 done before the poll) proves nothing.
    assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "report.jsonl").exists()
    for png in list(out.glob("maps/*.png")) + list(out.glob("overlays/*.png")):
        Image.open(png).load()  # a truncated PNG would raise here
    res = subprocess.run([*cmd, "--resume", "--json"], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    keys = [json.loads(line)["key"] for line in (out / "report.jsonl").read_text().splitlines()]
    assert len(keys) == 40 and len(set(keys)) == 40
    assert not list(out.rglob(".*.tmp")), "stale temporary files were left behind"


def test_decompression_bomb_guard_is_refused_with_a_hint(tmp_path, cli):
    _images(tmp_path / "in", 2)
    Image.new("RGB", (120, 100), (9, 9, 9)).save(tmp_path / "in" / "big.png")
    out = tmp_path / "out"
    res = cli("detect", tmp_path / "in", "--out", out, *TINY, "--max-pixels", "10000")
    assert res.exit_code == 4
    failed = [json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines()]
    assert [Path(f["path"]).name for f in failed] == ["big.png"]
    assert "120x100 = 12000 pixels" in failed[0]["reason"]
    assert "decompression-bomb guard" in failed[0]["reason"]
    res = cli("detect", tmp_path / "in", "--out", out, *TINY, "--max-pixels", "20000")
    assert res.exit_code == 1 and "already holds a detect run" in res.output
    assert res.output.startswith("Error:")  # refused before the detector loads or a bar starts
    res = cli(
        "detect", tmp_path / "in", "--out", out, *TINY, "--max-pixels", "20000", "--overwrite"
    )
    assert res.exit_code == 0


def test_no_overlays_writes_maps_and_reports_only(tmp_path, cli):
    _images(tmp_path / "in", 2)
    out = tmp_path / "out"
    res = cli("detect", tmp_path / "in", "--out", out, *TINY, "--no-overlays", "--json")
    assert res.exit_code == 0, res.output
    recs = json.loads(res.stdout)["images"]
    assert all("overlay" not in r and (out / r["map"]).exists() for r in recs)
    assert not (out / "overlays").exists()
    assert "img00" in (out / "index.html").read_text()


def test_out_that_is_a_file_is_one_line(tmp_path, cli):
    _images(tmp_path / "in", 1)
    (tmp_path / "report").write_text("mine")
    res = cli("detect", tmp_path / "in", "--out", tmp_path / "report", *TINY)
    assert res.exit_code == 1
    assert "is a file, not a folder" in res.output and "Traceback" not in res.output
    assert (tmp_path / "report").read_text() == "mine"


def test_a_second_run_never_reads_its_own_output(tmp_path, cli):
    """dd detect SRC --out SRC/report twice: 3 images both times, not 3 -> 9 -> 21."""
    src = tmp_path / "src"
    _images(src, 3)
    for flag in ((), ("--overwrite",), ("--resume",)):
        res = cli("detect", src, "--out", src / "report", *TINY, *flag)
        assert res.exit_code == 0, res.output
        summary = json.loads((src / "report" / "summary.json").read_text())
        assert summary["images"] == 3, flag
        keys = [json.loads(x)["key"] for x in (src / "report" / "report.jsonl").open()]
        assert not any(k.startswith("report/") for k in keys), keys


def test_other_run_folders_are_skipped_unless_named(tmp_path, cli):
    src = tmp_path / "src"
    _images(src, 2)
    res = cli("detect", src, "--out", src / "first", *TINY)
    assert res.exit_code == 0, res.output
    res = cli("detect", src, "--out", tmp_path / "second", *TINY)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "second" / "summary.json").read_text())["images"] == 2
    # Naming the run folder itself is explicit: its maps are read.
    res = cli("detect", src / "first" / "maps", "--out", tmp_path / "third", *TINY)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "third" / "summary.json").read_text())["images"] == 2
    # The output folder itself is never an input.
    res = cli("detect", tmp_path / "third", "--out", tmp_path / "third", *TINY, "--overwrite")
    assert res.exit_code == 4 and "is the output folder" in res.output


def test_weights_of_the_wrong_kind_leave_no_output_behind(tmp_path, cli):
    _images(tmp_path / "in", 1)
    (tmp_path / "wrong.bin").write_bytes(b"not a checkpoint")
    out = tmp_path / "out"
    res = cli("detect", tmp_path / "in", "--weights", tmp_path / "wrong.bin", "--out", out)
    assert res.exit_code == 1 and res.output.startswith("Error:")
    assert len(res.output.strip().splitlines()) == 1
    assert not out.exists()


def test_the_image_threshold_of_the_weights_flags_images_and_drives_fail_above_auto(tmp_path, cli):
    """Weights with a calibrated image threshold: the summary counts images at or above it,
    --fail-above auto gates on it; a bad --fail-above is a usage error."""
    _images(tmp_path / "in", 3)
    det = _tiny_detector()
    first = cli("detect", tmp_path / "in", "--out", tmp_path / "probe", *TINY, "--json")
    maxes = sorted(r["max"] for r in json.loads(first.stdout)["images"])
    weights = tmp_path / "w"
    # between the lowest and the highest max: one image or more under, one or more over
    det.image_threshold = (maxes[0] + maxes[-1]) / 2
    det.save_pretrained(weights)
    args = ("detect", tmp_path / "in", "--weights", weights, "-O", "input_size=64")
    res = cli(*args, "--out", tmp_path / "o1", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)["summary"]
    assert summary["image_threshold"] == pytest.approx(det.image_threshold)
    assert summary["threshold_calibrated"] is True
    assert summary["with_artifacts"] == sum(m >= det.image_threshold for m in maxes)
    assert 0 < summary["with_artifacts"] < 3
    page = (tmp_path / "o1" / "index.html").read_text()
    assert f"{det.image_threshold:.2f} (calibrated threshold)" in page
    res = cli(*args, "--out", tmp_path / "o2", "--fail-above", "auto")
    assert res.exit_code == 3, res.output
    assert "(the detector's calibrated threshold)" in " ".join(res.output.split())
    # above every max: no gate
    det.image_threshold = min(1.0, maxes[-1] + 1e-3)
    det.save_pretrained(weights)
    assert cli(*args, "--out", tmp_path / "o3", "--fail-above", "auto").exit_code == 0
    for bad in ("high", "1.5"):
        res = cli(*args, "--out", tmp_path / "o4", "--fail-above", bad)
        assert res.exit_code == 2 and "--fail-above" in res.output, res.output
        assert "Traceback" not in res.output


def test_a_bad_image_threshold_in_the_weights_is_one_line(tmp_path, capsys):
    _images(tmp_path / "in", 1)
    weights = tmp_path / "w"
    _tiny_detector().save_pretrained(weights)
    cfg = json.loads((weights / "config.json").read_text())
    for bad in ("high", 1.5):
        cfg["dd_image_threshold"] = bad
        (weights / "config.json").write_text(json.dumps(cfg))
        out = tmp_path / f"o-{bad}"
        code = main(["detect", str(tmp_path / "in"), "--weights", str(weights),
                     "-O", "input_size=64", "--out", str(out)])  # fmt: skip
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and err[-1].startswith("Error: ") and "dd_image_threshold" in err[-1]
        assert not out.exists()
