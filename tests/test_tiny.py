"""Tiny offline pipelines: built from code, loaded by the real diffusers classes, generating.

Each pipeline is built once per session (``tiny_pipeline_path``) and loaded once per module.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch

from dd.errors import DDError
from dd.testing import tiny
from dd.testing.tiny import (
    BACKBONES,
    PIPELINE_CLASSES,
    build_tiny,
    load_clip_tokenizer,
    load_t5_tokenizer,
    tiny_call_kwargs,
    tiny_defaults,
    tiny_pipeline_path,
)

# (backbone, variants): FLUX schnell-like and dev-like, and the other families.
CASES = [
    ("flux", {}),
    ("flux", {"guidance": True}),
    ("sd15", {}),
    ("sd3", {}),
    ("sdxl", {}),
    ("ldm", {}),
]
EXPECTED_COMPONENTS = {
    "flux": {
        "transformer": "FluxTransformer2DModel",
        "vae": "AutoencoderKL",
        "scheduler": "FlowMatchEulerDiscreteScheduler",
        "text_encoder": "CLIPTextModel",
        "tokenizer": "CLIPTokenizer",
        "text_encoder_2": "T5EncoderModel",
        "tokenizer_2": "T5Tokenizer",  # transformers 5: T5TokenizerFast is T5Tokenizer
    },
    "sd15": {
        "unet": "UNet2DConditionModel",
        "vae": "AutoencoderKL",
        "scheduler": "PNDMScheduler",
        "text_encoder": "CLIPTextModel",
        "tokenizer": "CLIPTokenizer",
    },
    "sd3": {
        "transformer": "SD3Transformer2DModel",
        "vae": "AutoencoderKL",
        "scheduler": "FlowMatchEulerDiscreteScheduler",
        "text_encoder": "CLIPTextModelWithProjection",
        "text_encoder_2": "CLIPTextModelWithProjection",
        "text_encoder_3": "T5EncoderModel",
        "tokenizer": "CLIPTokenizer",
        "tokenizer_2": "CLIPTokenizer",
        "tokenizer_3": "T5Tokenizer",
    },
    "sdxl": {
        "unet": "UNet2DConditionModel",
        "vae": "AutoencoderKL",
        "scheduler": "EulerDiscreteScheduler",
        "text_encoder": "CLIPTextModel",
        "text_encoder_2": "CLIPTextModelWithProjection",
        "tokenizer": "CLIPTokenizer",
        "tokenizer_2": "CLIPTokenizer",
    },
    "ldm": {"vqvae": "VQModel", "unet": "UNet2DModel", "scheduler": "DDIMScheduler"},
}


def _case_id(case: tuple[str, dict]) -> str:
    backbone, variants = case
    return backbone + ("-dev" if variants.get("guidance") else "")


@pytest.fixture(scope="module", params=CASES, ids=_case_id)
def tiny_case(request, tmp_path_factory):
    """(backbone, variants, folder, pipeline loaded back by the real class under offline mode)."""
    backbone, variants = request.param
    path = tiny_pipeline_path(backbone, tmp_path_factory, **variants)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    pipe = getattr(diffusers, PIPELINE_CLASSES[backbone]).from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return backbone, variants, path, pipe


def test_loads_as_real_classes(tiny_case):
    backbone, _, path, pipe = tiny_case
    assert type(pipe).__name__ == PIPELINE_CLASSES[backbone]
    got = {name: type(c).__name__ for name, c in pipe.components.items() if c is not None}
    assert got == EXPECTED_COMPONENTS[backbone]
    weights = sorted(p.relative_to(path).as_posix() for p in path.rglob("*.safetensors"))
    modules = [n for n, c in pipe.components.items() if isinstance(c, torch.nn.Module)]
    assert len(weights) == len(modules) and not list(path.rglob("*.bin"))
    denoiser = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    names = {n.rsplit(".", 1)[-1] for n, _ in denoiser.named_modules()}
    if backbone != "ldm":  # the default LoRA targets of `dd treat`
        assert {"to_q", "to_k", "to_v"} <= names
        assert any(n.endswith("to_out.0") for n, _ in denoiser.named_modules())
    if backbone == "sd15":
        assert pipe.safety_checker is None and pipe.config.requires_safety_checker is False


def test_two_step_generation_is_finite_sized_and_deterministic(tiny_case):
    backbone, variants, _, pipe = tiny_case
    d = tiny_defaults(backbone, **variants)
    kwargs = tiny_call_kwargs(backbone, **variants)
    assert kwargs["num_inference_steps"] == d["steps"] == 2

    def run(seed: int, prompt: str = "a photo of a cat", **over):
        call = {**kwargs, **over}
        if backbone != "ldm":
            call["prompt"] = prompt
        return pipe(generator=torch.Generator().manual_seed(seed), output_type="np", **call).images

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (1, d["height"], d["width"], 3) == (1, 64, 64, 3)
    assert np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1 and a.std() > 0.01
    assert np.array_equal(a, b)  # same seed, same image
    assert np.abs(a - c).mean() > 1e-3  # another seed, another image
    if backbone != "ldm":
        assert np.abs(a - run(0, "a red car at night")).mean() > 1e-3  # the text is used
        # Any multiple of `multiple_of` works, non-square too.
        m = d["multiple_of"]
        assert run(0, height=6 * m, width=10 * m).shape == (1, 6 * m, 10 * m, 3)
        assert pipe.vae_scale_factor == d["vae_scale_factor"]


def test_vae_latents_and_scale_factors(tiny_case):
    backbone, _, _, pipe = tiny_case
    vae = pipe.vqvae if backbone == "ldm" else pipe.vae
    expected = {
        "flux": (0.1159, 0.3611),
        "sd3": (0.0609, 1.5305),
        "sd15": (None, 0.18215),
        "sdxl": (None, 0.13025),
    }
    if backbone in expected:
        shift, scale = expected[backbone]
        assert vae.config.shift_factor == shift and vae.config.scaling_factor == scale
    d = tiny_defaults(backbone)
    assert vae.config.latent_channels == d["latent_channels"]
    assert 2 ** (len(vae.config.block_out_channels) - 1) == d["vae_scale_factor"] == 4
    with torch.no_grad():
        encoded = vae.encode(torch.zeros(1, 3, 64, 64))
    latents = encoded.latents if backbone == "ldm" else encoded.latent_dist.mean
    assert latents.shape == (1, d["latent_channels"], 16, 16)


def test_text_encoders_match_tokenizers(tiny_case):
    backbone, _, _, pipe = tiny_case
    pairs = [
        (getattr(pipe, f"tokenizer{s}", None), getattr(pipe, f"text_encoder{s}", None))
        for s in ("", "_2", "_3")
    ]
    pairs = [(t, e) for t, e in pairs if t is not None]
    assert len(pairs) == {"flux": 2, "sd15": 1, "sd3": 3, "sdxl": 2, "ldm": 0}[backbone]
    for tok, enc in pairs:
        assert enc.config.vocab_size == len(tok)
        ids = tok("A photo of a smiling woman, 8k", return_tensors="pt").input_ids
        with torch.no_grad():
            out = enc(ids, output_hidden_states=True)
        assert torch.isfinite(out.last_hidden_state).all()


@pytest.mark.parametrize("dev", [False, True], ids=["schnell", "dev"])
def test_flux_schnell_and_dev_variants(dev, tmp_path_factory):
    path = tiny_pipeline_path("flux", tmp_path_factory, **({"guidance": True} if dev else {}))
    transformer = diffusers.FluxTransformer2DModel.load_config(path / "transformer")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.load_config(path / "scheduler")
    assert transformer["guidance_embeds"] is dev
    assert scheduler["use_dynamic_shifting"] is dev
    assert scheduler["shift"] == (3.0 if dev else 1.0)
    assert tiny_defaults("flux", guidance=dev)["guidance"] == (3.5 if dev else 0.0)


def test_clip_tokenizer_is_clip_like():
    tok = load_clip_tokenizer()
    assert tok.model_max_length == 77
    assert tok.convert_ids_to_tokens([tok.bos_token_id, tok.eos_token_id]) == [
        "<|startoftext|>",
        "<|endoftext|>",
    ]
    assert tok.pad_token_id == tok.eos_token_id == len(tok) - 1
    ids = tok("A photo of a cat holding a cup, high quality").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert all(0 <= i < len(tok) for i in ids)
    # Common words are whole tokens; anything else falls back to bytes, never to unknown.
    assert tok.tokenize("a photo of a cat") == ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]
    odd = tok("zebra Ünïcode ☃ 42").input_ids
    assert tok.unk_token_id not in odd[1:-1]
    padded = tok(["a cat"], padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded[0]) == 77
    assert len(tok(" ".join(["cat"] * 200), truncation=True).input_ids) == 77
    assert 600 <= len(tok) <= 1000


def test_t5_tokenizer_is_t5_like():
    tok = load_t5_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok("A photo of a cat holding a cup, high quality").input_ids
    assert ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
    assert all(0 <= i < len(tok) for i in ids)
    assert (
        tok.decode(ids, skip_special_tokens=True) == "A photo of a cat holding a cup, high quality"
    )
    assert len(tok) == tiny.T5_VOCAB_SIZE + tiny.T5_EXTRA_IDS
    assert "<extra_id_0>" in tok.get_vocab()
    padded = tok(["a cat"], padding="max_length", max_length=32, truncation=True).input_ids
    assert len(padded[0]) == 32 and padded[0][-1] == tok.pad_token_id


def test_tokenizer_assets_are_reproducible_and_small(tmp_path):
    written = tiny.rebuild_tokenizers(tmp_path)
    committed = sorted(p for p in tiny.ASSETS.rglob("*") if p.is_file())
    assert [p.relative_to(tmp_path) for p in written] == [
        p.relative_to(tiny.ASSETS) for p in committed
    ]
    for new, old in zip(written, committed, strict=True):
        assert new.read_bytes() == old.read_bytes(), new.name
    assert sum(p.stat().st_size for p in committed) < 1_000_000


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_build_is_byte_reproducible_and_seeded(tmp_path):
    a = build_tiny("sd15", tmp_path / "a")
    b = build_tiny("sd15", tmp_path / "b")
    c = build_tiny("sd15", tmp_path / "c", seed=1)
    da, db, dc = _digest(a), _digest(b), _digest(c)
    assert da == db
    differ = {k for k in da if da[k] != dc[k]}
    assert differ == {
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    }
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_build_refuses_bad_requests_and_overwrites_on_request(tmp_path):
    with pytest.raises(DDError, match=r"unknown backbone 'sd2' \(installed: flux, ldm"):
        build_tiny("sd2", tmp_path / "x")  # plugin backbones build their own tiny pipelines
    with pytest.raises(DDError, match="no variant guidance"):
        build_tiny("sd15", tmp_path / "x", guidance=True)
    with pytest.raises(DDError, match="unknown tiny backbone"):
        tiny_defaults("sd2")
    out = tmp_path / "ldm"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(DDError, match="not empty") as e:
        build_tiny("ldm", out)
    assert "--overwrite" in e.value.hint and (out / "keep.txt").exists()
    assert build_tiny("ldm", out, overwrite=True) == out
    assert not (out / "keep.txt").exists() and (out / "model_index.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["ldm"]


def test_cli_module_writes_a_loadable_folder(tmp_path):
    out = tmp_path / "flux-dev"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "dd.testing.tiny", "flux", str(out), "--guidance", "--seed", "3"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    assert _digest(out) == _digest(build_tiny("flux", tmp_path / "again", seed=3, guidance=True))


def test_cli_main_reports_errors_in_one_line(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert tiny.main(["ldm", str(tmp_path / "full")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not empty" in err[0]
    with pytest.raises(SystemExit) as e:
        tiny.main(["sd15", str(tmp_path / "y"), "--guidance"])
    assert e.value.code == 2 and "flux only" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


@pytest.mark.parametrize("backbone", BACKBONES)
def test_defaults_are_consistent(backbone):
    d = tiny_defaults(backbone)
    assert d["pipeline"] == PIPELINE_CLASSES[backbone]
    if d["multiple_of"] is not None:
        assert d["height"] % d["multiple_of"] == 0 and d["width"] % d["multiple_of"] == 0
    assert ("max_sequence_length" in d) == (backbone in ("flux", "sd3"))
