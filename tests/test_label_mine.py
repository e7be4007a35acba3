"""`dd label mine`: categories, biased-category flags, balanced hard-case selection, queue."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dd.engines.mine import (
    OTHER,
    MineConfig,
    category_stats,
    item_category,
    load_rules,
    select_hard_cases,
)
from dd.errors import DDError
from dd.label.queue import Queue

TINY = ["-O", "variant=tiny", "-O", "input_size=64"]


def _records(spec: dict[str, list[float]]) -> list[dict]:
    return [
        {"key": f"{cat}{i:03d}", "category": cat, "max": m}
        for cat, maxes in spec.items()
        for i, m in enumerate(maxes)
    ]


def test_flags_the_category_with_abnormally_high_confidence():
    rng = np.random.default_rng(0)
    recs = _records(
        {
            "hand": list(0.85 + 0.1 * rng.random(40)),  # over-detected
            "animal": list(0.2 + 0.3 * rng.random(40)),
            "text": list(0.25 + 0.3 * rng.random(40)),
            "face": [0.99, 0.98],  # too few to be flagged
        }
    )
    stats = {s["category"]: s for s in category_stats(recs, MineConfig(min_count=5))}
    assert stats["hand"]["flagged"] and stats["hand"]["d"] > 1
    assert not stats["animal"]["flagged"] and not stats["text"]["flagged"]
    assert not stats["face"]["flagged"]
    assert stats["hand"]["n"] == 40 and 0.85 <= stats["hand"]["mean_max"] <= 0.95
    forced = category_stats(recs, MineConfig(force_flag=("face",)))
    assert {s["category"] for s in forced if s["flagged"]} == {"hand", "face"}
    # near-identical scores (a random detector) flag nothing, however small the spread
    flat = _records({"a": [0.5001] * 10, "b": [0.5000] * 9 + [0.50001]})
    assert not any(s["flagged"] for s in category_stats(flat, MineConfig()))


def test_selection_is_balanced_and_within_budget():
    recs = _records(
        {
            "hand": [0.9] * 30 + [0.5] * 30,
            "animal": [0.1] * 50 + [0.5] * 3,  # only 3 uncertain candidates
            "text": [0.45] * 40,
        }
    )
    cfg = MineConfig(budget=21, band=(0.4, 0.6), high=0.8)
    picked = select_hard_cases(recs, {"hand"}, cfg)
    assert len(picked) == 21 and len({r["key"] for r in picked}) == 21
    by_cat = {c: [r for r in picked if r["category"] == c] for c in ("hand", "animal", "text")}
    # animal has 3 candidates; the other two share the rest evenly
    assert [len(by_cat[c]) for c in ("animal", "hand", "text")] == [3, 9, 9]
    reasons = [r["reason"] for r in by_cat["hand"]]
    assert reasons[:4] == ["flagged-high", "uncertain", "flagged-high", "uncertain"]
    assert all(r["reason"] == "uncertain" for r in by_cat["text"] + by_cat["animal"])
    assert all(0.4 <= r["max"] <= 0.6 for r in picked if r["reason"] == "uncertain")
    # an unflagged category's confident images are not hard cases
    assert not any(r["category"] == "animal" and r["max"] < 0.4 for r in picked)
    big = select_hard_cases(recs, {"hand"}, MineConfig(budget=1000, band=(0.4, 0.6), high=0.8))
    assert len(big) == 60 + 3 + 40


def test_categories_from_fields_prompts_sidecars_and_rules(tmp_path):
    rules = load_rules(None)
    img = tmp_path / "a.png"
    assert item_category(img, {"category": "hand"}, rules) == ("hand", None)
    assert item_category(img, {"prompt": "Two DOGS playing"}, rules)[0] == "animal"
    assert item_category(img, {"prompt": "a woman waving her hand"}, rules)[0] == "hand"
    assert item_category(img, {"prompt": "a mountain lake"}, rules)[0] == OTHER
    assert item_category(img, {"prompt": "handsome scenery"}, rules)[0] == OTHER
    (tmp_path / "a.txt").write_text("a neon sign at night\n")
    assert item_category(img, {}, rules) == ("text", "a neon sign at night")
    (tmp_path / "rules.toml").write_text('[categories]\nvehicle = ["car", "truck"]\n')
    custom = load_rules(tmp_path / "rules.toml")
    assert item_category(img, {"prompt": "red cars"}, custom)[0] == "vehicle"
    assert item_category(img, {}, custom)[0] == OTHER
    (tmp_path / "bad.toml").write_text("[categories\n")
    with pytest.raises(DDError, match="bad.toml: invalid TOML"):
        load_rules(tmp_path / "bad.toml")


def _pool(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    (tmp_path / "pool").mkdir()
    lines = []
    for i in range(12):
        p = tmp_path / "pool" / f"g{i:02d}.png"
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), np.uint8)).save(p)
        rec = {"image": f"pool/{p.name}"}
        if i % 3 == 0:
            rec["category"] = "hand"
        else:
            rec["prompt"] = "a cat on a sofa" if i % 3 == 1 else "a poster with text"
        lines.append(json.dumps(rec))
    (tmp_path / "pool.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "pool.jsonl"


def test_mine_cli_writes_a_queue_with_predictions(tmp_path, cli):
    pool = _pool(tmp_path)
    q = tmp_path / "q"
    args = ["label", "mine", pool, "--out", q, *TINY, "--budget", "5", "--band", "0,1"]
    res = cli(*args, "--batch-size", "4", "--flag", "hand")
    assert res.exit_code == 0, res.output
    assert "predicted max confidence by category (12 images)" in res.output
    assert "FLAGGED" in res.output and "5 hard cases queued" in res.output
    queue = Queue.open(q)
    assert len(queue.items) == 5
    assert {it["category"] for it in queue.items} == {"hand", "animal", "text"}
    for it in queue.items:
        pred = queue.prediction_path(it)
        assert pred.is_file() and Image.open(pred).size == (40, 30)
        assert (it["width"], it["height"]) == (40, 30) and Path(it["image"]).is_file()
        assert it["reason"] in ("flagged-high", "uncertain")
    info = json.loads((q / "queue.json").read_text())
    assert info["flagged"] == ["hand"] and info["pool"] == 12
    assert info["detector"]["untrained"] is True
    # after labelling starts, re-mining needs --resume (decisions are kept)
    queue.log.append({"item": queue.items[0]["id"], "label": "skip"})
    res = cli(*args)
    assert res.exit_code == 1 and "already holds labelling decisions" in res.output
    res = cli(*args, "--resume", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output[res.output.index("{") :])["selected"] == 5
    res = cli("label", "status", q)
    assert res.exit_code == 0 and "labelling progress: 1 / 5" in res.output
    res = cli("label", "mine", tmp_path / "nothing", "--out", tmp_path / "q2", *TINY)
    assert res.exit_code != 0 and "no images in the pool" in res.output
