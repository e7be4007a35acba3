"""`--init` from an ImageNet MiT classifier (`nvidia/mit-b0`..`b5` format): the detector
takes the classifier's encoder and a fresh one-channel decode head (issue 32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_train_detector import TINY, make_dataset

from dd.api.plugins import get_host


@pytest.fixture(scope="module")
def mit_classifier(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny MiT ImageNet-style classifier of the real transformers class, 7 labels."""
    from dd_plugins.segformer import segformer_config
    from transformers import SegformerForImageClassification

    labels = {i: f"class{i}" for i in range(7)}
    config = segformer_config("tiny", id2label=labels, label2id={v: k for k, v in labels.items()})
    torch.manual_seed(5)
    model = SegformerForImageClassification(config)
    out = tmp_path_factory.mktemp("mit") / "mit-tiny"
    model.save_pretrained(out)
    encoder = {k: v.clone() for k, v in model.segformer.state_dict().items()}
    return out, encoder


def test_a_classifier_gives_its_encoder_and_a_fresh_head(mit_classifier):
    folder, encoder = mit_classifier
    seg = get_host().detectors.get("segformer")
    det = seg.load(str(folder), input_size=64, seed=3)
    got = det.model.segformer.state_dict()
    assert got.keys() == encoder.keys()
    assert all(torch.equal(got[k], encoder[k]) for k in encoder)
    assert det.variant == "tiny" and det.model.config.num_labels == 1
    assert "decode head initialised fresh" in det.source
    # the head is seeded: the same seed gives the same head, another seed another one
    again = seg.load(str(folder), input_size=64, seed=3).model.decode_head.state_dict()
    other = seg.load(str(folder), input_size=64, seed=4).model.decode_head.state_dict()
    head = det.model.decode_head.state_dict()
    assert all(torch.equal(head[k], again[k]) for k in head)
    assert any(not torch.equal(head[k], other[k]) for k in head)
    with pytest.raises(Exception, match="no detector variant|is a MiT classifier"):
        seg.load(str(folder), variant="b5")


def test_train_detector_starts_from_the_classifier(mit_classifier, tmp_path, cli):
    folder, encoder = mit_classifier
    data = make_dataset(tmp_path / "ds", n=8)
    run = tmp_path / "run"
    res = cli("train-detector", data, "--out", run, "--init", folder, *TINY[2:],
              "--steps", "2", "--workers", "0", "--val-fraction", "0", "--lr", "1e-9")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "ImageNet MiT encoder; decode head initialised fresh" in " ".join(res.output.split())
    trained = get_host().detectors.get("segformer").load(str(run / "model"))
    assert tuple(trained.input_size) == (64, 64)  # recorded with the weights, read back
    got = trained.model.segformer.state_dict()
    # lr 1e-9 for 2 steps: the trained encoder is still the classifier's (to float precision)
    for k, v in encoder.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6)


def test_a_bare_state_dict_says_its_input_size_is_assumed(tmp_path, cli):
    seg = get_host().detectors.get("segformer")
    det = seg.load(None, variant="tiny", input_size=64)
    torch.save(det.model.state_dict(), tmp_path / "det.bin")
    loaded = seg.load(str(tmp_path / "det.bin"))
    assert tuple(loaded.input_size) == (512, 512) and loaded.describe()["input_size_assumed"]
    given = seg.load(str(tmp_path / "det.bin"), input_size=64)
    assert "input_size_assumed" not in given.describe()
    data = make_dataset(tmp_path / "ds", n=8)
    res = cli("train-detector", data, "--out", tmp_path / "run", "--init", tmp_path / "det.bin",
              "--batch-size", "2", "--steps", "1", "--workers", "0", "--val-fraction", "0",
              "--size", "64")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "records no input size" in " ".join(res.output.split())
    trained = seg.load(str(tmp_path / "run" / "model"))
    assert (
        tuple(trained.input_size) == (512, 512) and "input_size_assumed" not in trained.describe()
    )
