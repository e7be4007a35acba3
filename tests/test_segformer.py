"""SegFormer artifact detector: parity with DiffDoctor's released inference, loading, variants.

Everything runs on CPU with tiny random models (b5 only on the meta device); no hub access.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dd_plugins import segformer as sf
from dd_plugins.segformer import SegformerDetector
from safetensors.torch import load_file, save_file
from transformers import (
    SegformerConfig,
    SegformerForSemanticSegmentation,
    SegformerImageProcessor,
)

from dd.api.detectors import logits_to_probs
from dd.errors import DDError

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


# -- helpers (built from transformers' own classes, independent of the plugin) -----------------
def _tiny_hf_config(**kw) -> SegformerConfig:
    args = dict(
        depths=[1, 1, 1, 1],
        hidden_sizes=[8, 16, 32, 64],
        num_attention_heads=[1, 1, 2, 4],
        decoder_hidden_size=32,
        num_labels=1,
    )
    args.update(kw)
    return SegformerConfig(**args)


def _spread_weights(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-draw weights large enough that the output map varies strongly over the image."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        bn = model.decode_head.batch_norm
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g) * 0.2)
        bn.running_var.copy_(0.5 + 1.5 * torch.rand(bn.running_var.shape, generator=g))
    return model.eval()


def _tiny_hf_model(seed: int = 0, **kw) -> SegformerForSemanticSegmentation:
    torch.manual_seed(seed)
    return _spread_weights(SegformerForSemanticSegmentation(_tiny_hf_config(**kw)), seed)


def _released_layout_state_dict(model, tmp_path) -> dict[str, torch.Tensor]:
    """The model's weights under transformers' own on-disk (original, 4.x) key names."""
    out = tmp_path / "hf_save"
    model.save_pretrained(out)
    return load_file(str(out / "model.safetensors"))


def _write_png(path, height: int, width: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack(
        [127 + 100 * np.sin(xx / 17.0 + c) * np.cos(yy / 23.0 - c) for c in range(3)], -1
    )
    img = np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)
    assert cv2.imwrite(str(path), img)


def _released_pipeline(model, png_path) -> torch.Tensor:
    """DiffDoctor's released inference script, step by step."""
    image = cv2.imread(str(png_path))
    image = cv2.resize(image, (512, 512))
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    image = torch.from_numpy(image).permute(2, 0, 1).float().div(255)  # transforms.ToTensor()
    processor = SegformerImageProcessor(
        do_resize=True,
        size={"height": 512, "width": 512},
        do_normalize=True,
        image_mean=MEAN,
        image_std=STD,
    )
    pixel_values = processor(image, return_tensors="pt", do_rescale=False)["pixel_values"]
    with torch.no_grad():
        logits = model(pixel_values=pixel_values).logits
    up = F.interpolate(logits, size=(512, 512), mode="bilinear", align_corners=False)
    return torch.sigmoid(up)


def _png_as_tensor(png_path) -> torch.Tensor:
    rgb = cv2.cvtColor(cv2.imread(str(png_path)), cv2.COLOR_BGR2RGB)
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True, raising=False)


@pytest.fixture(scope="module")
def hf_model():
    return _tiny_hf_model(seed=1)


@pytest.fixture
def tiny_bin(tmp_path, hf_model):
    path = tmp_path / "ad_pytorch_model.bin"
    torch.save(_released_layout_state_dict(hf_model, tmp_path), path)
    return path


# -- 1. parity with the released pipeline ------------------------------------------------------
@pytest.mark.parametrize("layout", ["released", "installed"])
def test_parity_with_released_pipeline_resized_png(tmp_path, hf_model, layout):
    sd = _released_layout_state_dict(hf_model, tmp_path) if layout == "released" else None
    path = tmp_path / "ad_pytorch_model.bin"
    torch.save(sd if sd is not None else hf_model.state_dict(), path)
    png = tmp_path / "in.png"
    _write_png(png, 400, 600)

    ref = _released_pipeline(hf_model, png)
    assert ref.std() > 0.05  # the map varies: the comparison means something

    det = SegformerDetector.load(path)
    assert det.variant == "tiny" and not det.untrained and det.source == str(path)
    x = _png_as_tensor(png)
    with torch.no_grad():
        ours = logits_to_probs(det.logits(x), (512, 512))
        full = det(x)
    assert full.shape == (1, 1, 400, 600)
    # Preprocessing: float bilinear vs cv2's fixed-point uint8 INTER_LINEAR differ by rounding.
    cv_resized = cv2.cvtColor(cv2.resize(cv2.imread(str(png)), (512, 512)), cv2.COLOR_BGR2RGB)
    ours_resized = F.interpolate(x, size=(512, 512), mode="bilinear", align_corners=False)
    levels = (ours_resized[0].permute(1, 2, 0) * 255 - torch.from_numpy(cv_resized).float()).abs()
    assert levels.max() < 1.0 and levels.mean() < 0.3  # measured 0.749 / 0.271
    # End to end: only that rounding separates the two maps.
    diff = (ours - ref).abs()
    assert diff.max() < 1e-2 and diff.mean() < 1e-3  # measured 0.0041 / 0.00043

    # Control: a wrong resize convention is caught by the same bounds.
    with torch.no_grad():
        bad_x = F.interpolate(x, size=(512, 512), mode="bilinear", align_corners=True)
        bad = logits_to_probs(det.logits(bad_x), (512, 512))
    assert (bad - ref).abs().max() > 1.5e-2 and (bad - ref).abs().mean() > 1.5e-3


def test_parity_exact_when_already_512(tmp_path, hf_model, tiny_bin):
    png = tmp_path / "in512.png"
    _write_png(png, 512, 512, seed=3)
    ref = _released_pipeline(hf_model, png)
    det = SegformerDetector.load(tiny_bin)
    with torch.no_grad():
        ours = det(_png_as_tensor(png))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_predict_matches_forward_and_shapes(tiny_bin):
    det = SegformerDetector.load(tiny_bin)
    x = torch.rand(3, 3, 96, 80, generator=torch.Generator().manual_seed(1))
    assert det.logits(x).shape == (3, 1, 128, 128)
    assert det.working_size(96, 80) == (512, 512)
    p = det.predict(x, batch_size=2)
    assert p.shape == (3, 1, 96, 80) and p.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(p, det(x))
    small = SegformerDetector.load(tiny_bin, input_size="64x96")
    assert small.logits(x).shape == (3, 1, 16, 24)
    assert small.describe()["input_size"] == [64, 96]


# -- 2. gradients ----------------------------------------------------------------------------------
def test_gradients_reach_images_and_parameters(tiny_bin):
    det = SegformerDetector.load(tiny_bin)
    x = torch.rand(2, 3, 100, 140, generator=torch.Generator().manual_seed(0)).requires_grad_()
    det(x).mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    grads = [p.grad for p in det.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert det.model.decode_head.classifier.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_in_eval_mode_gives_same_gradients(tiny_bin):
    det = SegformerDetector.load(tiny_bin)
    assert not det.training
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    def grad_of_input():
        xi = x.clone().requires_grad_()
        det(xi).square().mean().backward()
        return xi.grad

    plain = grad_of_input()
    calls = []
    orig = sf.checkpoint

    def spy(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    det.enable_gradient_checkpointing()
    try:
        sf.checkpoint = spy
        ckpt = grad_of_input()
    finally:
        sf.checkpoint = orig
    assert len(calls) == 4  # one per tiny encoder block, although in eval mode
    torch.testing.assert_close(ckpt, plain)
    with torch.no_grad():  # no recomputation bookkeeping without autograd
        det(x)
    det.disable_gradient_checkpointing()
    torch.testing.assert_close(grad_of_input(), plain)


# -- 3. loading --------------------------------------------------------------------------------
def _same_outputs(a: SegformerDetector, b: SegformerDetector) -> None:
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=1e-6, rtol=0)


def test_bin_is_read_with_weights_only(tiny_bin, monkeypatch):
    seen = []
    orig = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return orig(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    SegformerDetector.load(tiny_bin)
    assert seen == [{"map_location": "cpu", "weights_only": True}]


def test_load_formats_agree(tmp_path, tiny_bin, hf_model):
    ref = SegformerDetector.load(tiny_bin)
    sd = _released_layout_state_dict(hf_model, tmp_path)

    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    _same_outputs(ref, SegformerDetector.load(st))

    nested = tmp_path / "nested.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, nested)
    _same_outputs(ref, SegformerDetector.load(nested))
    torch.save({"model": hf_model.state_dict()}, tmp_path / "model_key.pt")
    _same_outputs(ref, SegformerDetector.load(tmp_path / "model_key.pt"))

    folder = tmp_path / "release"
    folder.mkdir()
    torch.save(sd, folder / "ad_pytorch_model.bin")
    det = SegformerDetector.load(folder)
    assert det.source == str(folder)
    _same_outputs(ref, det)

    st_folder = tmp_path / "st_folder"
    st_folder.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st_folder / "weights.safetensors"))
    _same_outputs(ref, SegformerDetector.load(st_folder))

    # dtype and device are applied; eval mode
    half = SegformerDetector.load(tiny_bin, dtype=torch.bfloat16)
    assert half.model.dtype == torch.bfloat16 and not half.training
    assert half(torch.rand(1, 3, 32, 32)).dtype == torch.bfloat16


def test_folder_needs_exactly_one_weights_file(tmp_path, tiny_bin):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DDError, match="exactly one"):
        SegformerDetector.load(empty)
    both = tmp_path / "both"
    both.mkdir()
    for name in ("ad_pytorch_model.bin", "ad_richhf_baseline_model.bin"):
        (both / name).write_bytes(tiny_bin.read_bytes())
    with pytest.raises(DDError, match="ad_richhf_baseline_model.bin") as ei:
        SegformerDetector.load(both)
    assert "PATH/ad_pytorch_model.bin" in ei.value.hint


def test_save_pretrained_roundtrip_and_released_layout(tmp_path, tiny_bin, hf_model):
    det = SegformerDetector.load(tiny_bin)
    out = det.save_pretrained(tmp_path / "saved")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    again = SegformerDetector.load(out)
    assert again.variant == "tiny" and again.source == str(out)
    _same_outputs(det, again)
    plain = SegformerForSemanticSegmentation.from_pretrained(out).eval()
    assert plain.config.num_labels == 1
    x = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(plain(pixel_values=det.preprocess(x)).logits, det.logits(x))

    # state_dict() of the wrapped model is the released (transformers 4.x) layout: the same
    # keys transformers itself writes to disk, so torch.save of it is an ad_pytorch_model.bin.
    keys = list(det.model.state_dict())
    released = set(_released_layout_state_dict(hf_model, tmp_path))
    assert set(keys) == released == set(load_file(str(out / "model.safetensors")))
    assert "segformer.encoder.block.0.0.attention.self.query.weight" in keys
    assert "decode_head.linear_c.0.proj.weight" in keys
    assert all(k.startswith(("segformer.encoder.", "decode_head.")) for k in keys)
    assert {"decode_head.batch_norm.running_mean", "decode_head.classifier.weight"} <= set(keys)
    assert tuple(det.model.state_dict()["decode_head.classifier.weight"].shape) == (1, 32, 1, 1)
    resaved = tmp_path / "resaved.bin"
    torch.save(det.model.state_dict(), resaved)
    _same_outputs(det, SegformerDetector.load(resaved))
    # load_state_dict accepts the released and the installed transformers' layouts
    det.model.load_state_dict(det.model.state_dict())
    det.model.load_state_dict(hf_model.state_dict())
    assert all(k.startswith("model.") for k in det.state_dict())


def test_folder_with_config_of_other_task_is_refused(tmp_path):
    m = SegformerForSemanticSegmentation(_tiny_hf_config(num_labels=3))
    m.save_pretrained(tmp_path / "ade")
    with pytest.raises(DDError, match="3 output channels"):
        SegformerDetector.load(tmp_path / "ade")


# -- variant inference ------------------------------------------------------------------------
def test_variant_inference_tiny_b0_b5():
    assert sf.infer_variant(_tiny_hf_model().state_dict()) == "tiny"
    for name in ("b0", "b5", "b2"):
        with torch.device("meta"):
            model = SegformerForSemanticSegmentation(sf.segformer_config(name))
        sd = model.state_dict()
        assert sf.infer_variant(sd) == name  # installed layout, meta tensors
        shapes = {k: tuple(v.shape) for k, v in sf.to_released_keys(sd).items()}
        assert sf.infer_variant(shapes) == name  # released layout, bare shapes
    assert sf.infer_variant({"foo": (3, 3)}) is None
    assert sf.infer_config({"foo": torch.zeros(3)}) is None


def test_custom_architecture_is_inferred_and_loads(tmp_path):
    model = _tiny_hf_model(depths=[1, 2, 1, 1], decoder_hidden_size=24)
    path = tmp_path / "custom.bin"
    torch.save(model.state_dict(), path)
    name, config = sf.infer_config(model.state_dict())
    assert name == "custom" and list(config.depths) == [1, 2, 1, 1]
    det = SegformerDetector.load(path)
    assert det.variant == "custom"
    x = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(det.logits(x), model(pixel_values=det.preprocess(x)).logits)


def test_wrong_variant_names_missing_and_unexpected_keys(tiny_bin):
    with pytest.raises(DDError) as ei:
        SegformerDetector.load(tiny_bin, variant="b0")
    msg = str(ei.value)
    assert "variant b0" in msg and "missing key" in msg
    assert "segformer.encoder.block.0.1." in msg  # b0 has two blocks per stage, tiny one
    assert "shape mismatch for segformer.encoder.patch_embeddings.0.proj.weight" in msg
    assert "[8, 3, 7, 7]" in msg and "[32, 3, 7, 7]" in msg
    assert "variant=tiny" in ei.value.hint


def test_foreign_state_dict_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(4, 4), "head.bias": torch.zeros(4)}, path)
    with pytest.raises(DDError) as ei:
        SegformerDetector.load(path)
    msg = str(ei.value)
    assert "unexpected key(s): encoder.weight, head.bias" in msg
    assert "missing key(s)" in msg and "variant b5" in msg
    assert "not look like a SegFormer" in ei.value.hint


def test_multi_class_head_is_a_shape_mismatch(tmp_path):
    path = tmp_path / "ade.bin"
    torch.save(_tiny_hf_model(num_labels=150).state_dict(), path)
    with pytest.raises(DDError, match=r"decode_head\.classifier\.weight: file has \[150, 32"):
        SegformerDetector.load(path, variant="tiny")


def _make_marker(path):
    with open(path, "w") as fh:
        fh.write("pwned")
    return torch.zeros(1)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_make_marker, (self.marker,))


def test_pickle_with_code_is_refused_and_never_runs(tmp_path, hf_model):
    marker = tmp_path / "marker_loaded_by_dd"
    evil = tmp_path / "ad_pytorch_model.bin"
    torch.save({**hf_model.state_dict(), "evil": _Payload(str(marker))}, evil)
    with pytest.raises(DDError, match="not a plain state_dict.*weights_only"):
        SegformerDetector.load(evil)
    assert not marker.exists()
    # Control: the payload is live, it runs when unpickled unsafely.
    control_marker = tmp_path / "control_marker"
    control = tmp_path / "control.bin"
    torch.save({"evil": _Payload(str(control_marker))}, control)
    torch.load(control, weights_only=False)
    assert control_marker.exists()


def test_non_tensor_entries_are_refused(tmp_path):
    path = tmp_path / "mixed.pt"
    torch.save({"a.weight": torch.zeros(2), "note": "hello"}, path)
    with pytest.raises(DDError, match="not tensors: note"):
        SegformerDetector.load(path)


def test_missing_path_and_offline_hub_id(tmp_path):
    missing = tmp_path / "nope" / "ad_pytorch_model.bin"
    with pytest.raises(DDError, match="weights not found"):
        SegformerDetector.load(missing)
    with pytest.raises(DDError, match="weights not found"):
        SegformerDetector.load("some/dir/ad_pytorch_model.bin")
    with pytest.raises(DDError, match="hub id 'dd-test-org/no-such-detector'") as ei:
        SegformerDetector.load("dd-test-org/no-such-detector")
    assert "local file" in ei.value.hint


def test_bad_options():
    with pytest.raises(DDError, match="unknown SegFormer variant"):
        SegformerDetector.load(variant="b9")
    with pytest.raises(DDError, match="unknown option"):
        SegformerDetector.load(colour="red")
    with pytest.raises(DDError, match="input_size"):
        SegformerDetector.load(input_size="big")


# -- untrained default, b5 config -----------------------------------------------------------
def test_random_init_is_seeded_and_marked_untrained():
    a = SegformerDetector.load(variant="tiny", seed=1)
    b = SegformerDetector.load(variant="tiny", seed="1")
    c = SegformerDetector.load(variant="tiny", seed=2)
    assert a.untrained and a.source == "random init (untrained)" and a.variant == "tiny"
    _same_outputs(a, b)
    assert not torch.equal(
        a.model.decode_head.classifier.weight, c.model.decode_head.classifier.weight
    )
    d = a.describe()
    assert d == {
        "detector": "segformer",
        "weights": "random init (untrained)",
        "untrained": True,
        "image_threshold": 0.5,
        "threshold_calibrated": False,
        "variant": "tiny",
        "input_size": [512, 512],
    }


def test_b5_config_on_meta():
    cfg = sf.segformer_config("b5")
    assert list(cfg.depths) == [3, 6, 40, 3]
    assert list(cfg.hidden_sizes) == [64, 128, 320, 512]
    assert cfg.decoder_hidden_size == 768 and cfg.num_labels == 1
    assert list(cfg.num_attention_heads) == [1, 2, 5, 8]
    assert list(cfg.sr_ratios) == [8, 4, 2, 1]
    assert list(cfg.patch_sizes) == [7, 3, 3, 3] and list(cfg.strides) == [4, 2, 2, 2]
    det = SegformerDetector.load(variant="mit-b5", device="meta")
    assert det.variant == "b5" and det.untrained
    cls = det.model.decode_head.classifier
    assert isinstance(cls, torch.nn.Conv2d) and cls.out_channels == 1 and cls.in_channels == 768
    assert cls.kernel_size == (1, 1)
    n = sum(p.numel() for p in det.parameters())
    assert 84_000_000 < n < 85_000_000  # MiT-b5 + all-MLP head: 84,594,113
    assert set(sf.VARIANTS) == {"tiny", "small", "b0", "b1", "b2", "b3", "b4", "b5"}


# -- 5. plugin registration -------------------------------------------------------------------
def test_plugin_registers_segformer():
    from dd.api.plugins import get_host

    assert get_host().detectors.get("segformer") is SegformerDetector


def test_input_size_is_saved_with_the_weights(tmp_path):
    det = SegformerDetector.load(None, variant="tiny", input_size=96)
    det.save_pretrained(tmp_path / "m")
    back = SegformerDetector.load(tmp_path / "m")
    assert back.input_size == (96, 96) and back.variant == "tiny" and not back.untrained
    assert SegformerDetector.load(tmp_path / "m", input_size=64).input_size == (64, 64)


def test_wrong_input_shape_or_dtype_is_one_clear_error():
    det = SegformerDetector.load(None, variant="tiny", input_size=32)
    with pytest.raises(DDError, match=r"B x 3 x H x W tensor, got \(3, 32, 32\)"):
        det(torch.rand(3, 32, 32))
    with pytest.raises(DDError, match=r"B x 3 x H x W tensor, got \(1, 4, 32, 32\)"):
        det.logits(torch.rand(1, 4, 32, 32))
    with pytest.raises(DDError, match="float in \\[0, 1\\], got dtype torch.uint8"):
        det(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_key_mappings_are_inverse_for_every_key():
    """The released (transformers 4.x) and transformers >= 5 key maps undo each other on
    every key of a real SegFormer (both directions are written out rule for rule)."""
    from dd_plugins.segformer import _key_to_released, _key_to_v5
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    cfg = SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
        num_attention_heads=[1, 2], decoder_hidden_size=16, num_labels=1,
    )  # fmt: skip
    keys = list(SegformerForSemanticSegmentation(cfg).state_dict())
    released = [_key_to_released(k) for k in keys]
    assert [_key_to_v5(k) for k in released] == keys
    assert [_key_to_released(_key_to_v5(k)) for k in released] == released
    assert any(k.startswith("segformer.encoder.block.") for k in released)
