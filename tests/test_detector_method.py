"""The paper's detector-training method, exactly (issue 32): shrink-and-pad flags pseudo
labels only (by default), and a pseudo label's positivity comes from its map."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_train_detector import TINY, make_dataset

from dd.api.plugins import get_host
from dd.data.datasets import Sample, read_dataset
from dd.data.sampler import balance_weights, is_positive, parse_balance


def test_a_pseudo_label_is_positive_by_its_recorded_decision(tmp_path):
    mask = tmp_path / "m.png"
    pseudo = Sample(tmp_path / "a.png", mask, source="pseudo", category="hand",
                    meta={"positive": False, "positive_threshold": 0.5})  # fmt: skip
    assert not pseudo.positive and not is_positive(pseudo)
    pseudo.meta["positive"] = True
    assert is_positive(pseudo)
    human = Sample(tmp_path / "b.png", mask, source="human", category="hand")
    assert is_positive(human)  # a human mask marks an artifact
    real = Sample(tmp_path / "c.png", None, source="real", meta={"positive": True})
    assert not is_positive(real)
    samples = [pseudo, human] + [
        Sample(tmp_path / f"p{i}.png", mask, source="pseudo", category="hand",
               meta={"positive": False}) for i in range(3)
    ]  # fmt: skip
    _, rows = balance_weights(samples, parse_balance("hand=1:1"))
    hand = next(r for r in rows if r.category == "hand")
    assert (hand.positives, hand.negatives) == (2, 3)  # a soft map alone is not an artifact


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    det = get_host().detectors.get("segformer").load(None, variant="tiny", input_size=64)
    return str(det.save_pretrained(tmp_path_factory.mktemp("w") / "tiny"))


def test_label_pseudo_records_positivity_and_its_threshold(tmp_path, weights, cli):
    rng = np.random.default_rng(0)
    (tmp_path / "pool").mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), np.uint8)).save(
            tmp_path / "pool" / f"{i}.png"
        )
    out = tmp_path / "out"
    res = cli("label", "pseudo", tmp_path / "pool", "--out", out, "--weights", weights,
              "--positive-threshold", "0.5")  # fmt: skip
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(lines) == 4
    for rec in lines:
        assert rec["positive_threshold"] == 0.5 and rec["positive"] == (rec["max"] >= 0.5)
    by_image = {Path(s.image).name: s for s in read_dataset(out)}
    assert all(by_image[Path(r["image"]).name].positive == r["positive"] for r in lines)
    bad = cli("label", "pseudo", tmp_path / "pool", "--out", tmp_path / "o2", "--weights",
              weights, "--positive-threshold", "0")  # fmt: skip
    assert bad.exit_code == 2 and "--positive-threshold" in bad.output


def _flagged(run: Path) -> list[int]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["flagged"] for r in recs if r["type"] == "shrink_pad"]


def test_shrink_and_pad_flags_pseudo_labels_only_by_default(tmp_path, cli):
    data = make_dataset(tmp_path / "ds", n=12)
    train = read_dataset(data)
    pseudo = sum(1 for s in train if s.source == "pseudo")
    assert 0 < pseudo < len(train)
    common = [data, *TINY, "--steps", "1", "--workers", "0", "--val-fraction", "0",
              "--shrink-pad-threshold", "1.01", "--shrink-pad-every", "1"]  # fmt: skip
    res = cli("train-detector", "--out", tmp_path / "paper", *common)
    assert res.exit_code == 0, res.output
    assert _flagged(tmp_path / "paper") == [pseudo]  # every pseudo label, nothing else
    res = cli("train-detector", "--out", tmp_path / "all", *common, "--shrink-pad-scope", "all")
    assert res.exit_code == 0, res.output
    assert _flagged(tmp_path / "all") == [len(train)]
    res = cli("train-detector", "--out", tmp_path / "bad", *common, "--shrink-pad-scope", "x")
    assert res.exit_code == 2 and "--shrink-pad-scope" in res.output
