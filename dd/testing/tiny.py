"""Tiny offline pipelines of the real diffusers/transformers classes.

``python -m dd.testing.tiny BACKBONE OUTDIR`` writes a diffusers pipeline folder that the
standard ``from_pretrained`` loads exactly like a user's real weights, only with a few
thousand random (seeded) parameters per model, so that tests and users' smoke checks run
the real code paths on CPU in seconds and offline:

========  ============================  ===================================================
backbone  pipeline class                components
========  ============================  ===================================================
flux      ``FluxPipeline``              FluxTransformer2DModel (1 double + 1 single block;
                                        ``--guidance`` = dev-like guidance embedding),
                                        AutoencoderKL (16 latent channels, FLUX's shift
                                        0.1159 and scale 0.3611), FlowMatchEulerDiscrete
                                        (schnell: shift 1; dev: dynamic shifting),
                                        CLIPTextModel + CLIPTokenizer, T5EncoderModel +
                                        T5TokenizerFast
sd15      ``StableDiffusionPipeline``   UNet2DConditionModel, AutoencoderKL (scale 0.18215),
                                        CLIPTextModel + CLIPTokenizer, PNDMScheduler like
                                        SD1.5's, no safety checker
sd3       ``StableDiffusion3Pipeline``  SD3Transformer2DModel, AutoencoderKL (16 channels,
                                        shift 0.0609, scale 1.5305), FlowMatchEulerDiscrete
                                        (shift 3), 2 x CLIPTextModelWithProjection +
                                        CLIPTokenizer, T5EncoderModel + T5TokenizerFast
sdxl      ``StableDiffusionXLPipeline`` UNet2DConditionModel ("text_time" embedding),
                                        AutoencoderKL (scale 0.13025), CLIPTextModel +
                                        CLIPTextModelWithProjection, 2 x CLIPTokenizer,
                                        EulerDiscreteScheduler like SDXL's
ldm       ``LDMPipeline``               VQModel + unconditional UNet2DModel + DDIMScheduler
========  ============================  ===================================================

Every VAE downsamples by **4** (not the real 8), so code that hard-codes 8 instead of
reading ``vae.config.block_out_channels`` fails on these pipelines; :func:`tiny_defaults`
gives the resolution constraints. The tokenizers are kept in ``assets/`` (a byte-level CLIP
BPE of ~900 tokens and a T5 sentencepiece unigram model of 320 pieces, both learnt from a
prompt corpus generated here) and are rebuilt by ``python -m dd.testing.tiny
--rebuild-tokenizers``. Building is seeded per component: the same arguments give the same
files, byte for byte.
"""

from __future__ import annotations

import argparse
import collections
import io
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dd.errors import DDError
from dd.runtime.io import atomic_write_bytes, atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    import pytest
    from transformers import CLIPTokenizer, T5TokenizerFast

BACKBONES: tuple[str, ...] = ("flux", "sd15", "sd3", "sdxl", "ldm")
PIPELINE_CLASSES: dict[str, str] = {
    "flux": "FluxPipeline",
    "sd15": "StableDiffusionPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "ldm": "LDMPipeline",
}
ASSETS = Path(__file__).resolve().parent / "assets"
CLIP_TOKENIZER_DIR = ASSETS / "clip-tokenizer"
T5_TOKENIZER_DIR = ASSETS / "t5-tokenizer"

# ---------------------------------------------------------------------------------------
# Tokenizers: learnt from a small prompt corpus generated here, reproducibly.
# ---------------------------------------------------------------------------------------

CLIP_MAX_LENGTH = 77
CLIP_NUM_MERGES = 400
T5_VOCAB_SIZE = 320
T5_EXTRA_IDS = 100
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"

_PREFIXES = (
    "a photo of a",
    "an image of a",
    "a picture of the",
    "a painting of a",
    "close up of a",
)
_ADJECTIVES = (
    "red", "blue", "green", "yellow", "black", "white", "old", "young", "small", "large",
    "beautiful", "happy", "smiling", "sitting", "standing", "running", "wooden", "golden",
    "detailed", "realistic", "cute", "dark", "bright", "colorful",
)  # fmt: skip
_SUBJECTS = (
    "cat", "dog", "woman", "man", "child", "girl", "boy", "hand", "face", "person", "horse",
    "bird", "car", "house", "tree", "flower", "robot", "astronaut", "city", "mountain",
    "river", "forest", "castle", "dragon", "portrait", "street", "beach", "garden", "kitchen",
    "table", "chair", "book", "cup", "apple", "boat", "train", "bicycle", "sign", "painting",
    "statue",
)  # fmt: skip
_SETTINGS = (
    "in the park", "on the street", "at night", "in the snow", "under the sky", "by the sea",
    "in a room", "on a table", "with a hat", "with two hands", "holding a cup", "in the rain",
    "at sunset", "in the morning", "near a window",
)  # fmt: skip
_STYLES = (
    "high quality", "photorealistic", "oil painting", "digital art", "sharp focus",
    "studio lighting", "4k", "8k photo", "cinematic", "watercolor", "sketch", "anime style",
)  # fmt: skip
# Common English and prompt words, in lines of eight, for a wider vocabulary.
_WORDS_TEXT = """
the and of to in is it that for on with as by at from or this be are was an not but all
they we you he she his her their there what which when where who how one two three four
five many some more most very much other new good great little big long short high low
first last next same different right left front back top bottom side center middle inside
outside over under above below between behind near far through across around into out up
down light shadow sun moon star cloud sky water fire ice wind stone metal glass wood paper
cloth skin hair eye eyes nose mouth lips teeth ear ears arm arms leg legs foot feet finger
fingers body head neck shoulder smile hold holding wearing looking walking flying jumping
dancing playing reading writing eating drinking sleeping wearing dress shirt jacket shoes
glasses mirror lamp window door wall floor roof road bridge tower building room office
school market shop cafe restaurant field farm desert island ocean lake valley hill sunrise
morning evening afternoon summer winter spring autumn season weather fog mist storm
lightning rainbow background foreground scene view landscape portrait closeup wide angle
lens camera shot film photo photograph render illustration drawing poster logo text letters
words number symbol pattern texture color shape line curve circle square triangle soft hard
smooth rough sharp blurry clear vivid pale warm cold quiet loud calm busy empty full clean
dirty broken perfect ugly pretty elegant simple complex modern ancient futuristic vintage
retro minimal abstract surreal fantasy magic dream night day time people family friends
crowd group team animal animals fish insect butterfly lion tiger bear wolf fox rabbit mouse
elephant monkey snake cow sheep pig chicken duck owl eagle whale shark turtle frog food bread
cake pizza fruit orange banana grape lemon coffee tea wine bottle plate bowl knife fork spoon
"""
_WORDS = _WORDS_TEXT.split()
# Every printable ASCII character, so that each is a piece of the T5 model.
_CHARSET_LINE = "".join(chr(c) for c in range(33, 127))


def prompt_corpus() -> list[str]:
    """The generated prompt corpus both tokenizers are learnt from (4800 lines)."""
    lines = []
    combos = itertools.product(_PREFIXES, _ADJECTIVES, _SUBJECTS)
    for i, (prefix, adjective, subject) in enumerate(combos):
        setting, style = _SETTINGS[i % len(_SETTINGS)], _STYLES[i % len(_STYLES)]
        line = f"{prefix} {adjective} {subject} {setting}, {style}"
        lines.append(line[0].upper() + line[1:] if i % 3 == 0 else line)
    lines += [" ".join(_WORDS[i : i + 8]) for i in range(0, len(_WORDS), 8)]
    return lines


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _learn_bpe(word_counts: collections.Counter[str], num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE on words ending in ``</w>``; ties go to the smallest pair (deterministic)."""
    byte_map = _bytes_to_unicode()
    words = {}
    for word in word_counts:
        chars = [byte_map[b] for b in word.encode("utf-8")]
        words[word] = chars[:-1] + [chars[-1] + "</w>"]
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for word, symbols in words.items():
            for pair in itertools.pairwise(symbols):
                pairs[pair] += word_counts[word]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for word, symbols in words.items():
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            words[word] = merged
    return merges


def _write_clip_tokenizer(out: Path) -> None:
    """``vocab.json`` + ``merges.txt`` laid out like OpenAI CLIP's, learnt from the corpus."""
    words: collections.Counter[str] = collections.Counter()
    for line in prompt_corpus():
        words.update(re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", line.lower()))
    merges = _learn_bpe(words, CLIP_NUM_MERGES)
    base = list(_bytes_to_unicode().values())
    tokens = base + [t + "</w>" for t in base] + ["".join(m) for m in merges] + [_BOS, _EOS]
    atomic_write_text(
        out / "vocab.json", json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False)
    )
    atomic_write_text(
        out / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    )
    atomic_write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": CLIP_MAX_LENGTH,
            "bos_token": _BOS,
            "eos_token": _EOS,
            "unk_token": _EOS,
            "pad_token": _EOS,
            "do_lower_case": True,
            "errors": "replace",
            "add_prefix_space": False,
        },
    )


def _write_t5_tokenizer(out: Path) -> None:
    """A sentencepiece unigram ``spiece.model`` with T5's ids: <pad>=0, </s>=1, <unk>=2."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([*prompt_corpus(), _CHARSET_LINE]),
        model_writer=buffer,
        model_type="unigram",
        vocab_size=T5_VOCAB_SIZE,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        num_threads=1,
        minloglevel=2,
    )
    atomic_write_bytes(out / "spiece.model", buffer.getvalue())
    atomic_write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "T5Tokenizer",
            "model_max_length": 512,
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "pad_token": "<pad>",
            "extra_ids": T5_EXTRA_IDS,
        },
    )


def rebuild_tokenizers(assets: Path = ASSETS) -> list[Path]:
    """Regenerate the tokenizer files under ``assets`` (the ones kept in the repository)."""
    clip_dir, t5_dir = assets / CLIP_TOKENIZER_DIR.name, assets / T5_TOKENIZER_DIR.name
    _write_clip_tokenizer(clip_dir)
    _write_t5_tokenizer(t5_dir)
    return sorted(p for d in (clip_dir, t5_dir) for p in d.iterdir())


def load_clip_tokenizer() -> CLIPTokenizer:
    """The repository's tiny CLIP tokenizer (model_max_length 77)."""
    from transformers import CLIPTokenizer

    # local_files_only is saved into tokenizer_config.json: fixed, so builds are identical
    return CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR, local_files_only=True)


def load_t5_tokenizer() -> T5TokenizerFast:
    """The repository's tiny T5 tokenizer (320 pieces + 100 sentinel tokens)."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast.from_pretrained(T5_TOKENIZER_DIR, local_files_only=True)


# ---------------------------------------------------------------------------------------
# Model configurations. The two CLIP encoders and the T5 encoder have distinct widths so
# that code mixing them up fails on shapes.
# ---------------------------------------------------------------------------------------

VAE_SCALE_FACTOR = 4
_CLIP_L = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "projection_dim": 32,
    "hidden_act": "quick_gelu",
}
_CLIP_G = {"hidden_size": 48, "intermediate_size": 96, "projection_dim": 40, "hidden_act": "gelu"}
_T5 = {"d_model": 96, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4}
_VAE_COMMON = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "block_out_channels": (16, 32, 32),  # 3 levels: downsampling by VAE_SCALE_FACTOR = 4
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
}
_VAE = {
    # FLUX.1's and SD3's VAEs: 16 channels, no quant convs, real shift and scale factors.
    "flux": {
        "latent_channels": 16,
        "shift_factor": 0.1159,
        "scaling_factor": 0.3611,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "force_upcast": True,
    },
    "sd3": {
        "latent_channels": 16,
        "shift_factor": 0.0609,
        "scaling_factor": 1.5305,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "force_upcast": True,
    },
    "sd15": {"latent_channels": 4, "scaling_factor": 0.18215, "force_upcast": True},
    "sdxl": {"latent_channels": 4, "scaling_factor": 0.13025, "force_upcast": True},
}
# SD1.5's and SDXL's shipped scheduler configurations.
_SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
_SD15_SCHEDULER = {
    **_SD_BETAS,
    "num_train_timesteps": 1000,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "prediction_type": "epsilon",
}
_SDXL_SCHEDULER = {
    **_SD_BETAS,
    "num_train_timesteps": 1000,
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}
# FLUX.1-schnell (no guidance) and FLUX.1-dev (guidance embedding) ship different schedulers.
_FLUX_SCHEDULER_COMMON = {
    "num_train_timesteps": 1000,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "base_shift": 0.5,
    "max_shift": 1.15,
}
_FLUX_SCHEDULER = {
    False: {**_FLUX_SCHEDULER_COMMON, "shift": 1.0, "use_dynamic_shifting": False},
    True: {**_FLUX_SCHEDULER_COMMON, "shift": 3.0, "use_dynamic_shifting": True},
}
_SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
_LDM_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0015,
    "beta_end": 0.0195,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
}
_LDM_SAMPLE_SIZE = 16  # LDMPipeline takes no height/width: latents are unet.sample_size square


def tiny_defaults(backbone: str, *, guidance: bool = False) -> dict[str, Any]:
    """Sampling settings and resolution constraints of the tiny ``backbone`` pipeline.

    ``height``/``width`` must be multiples of ``multiple_of`` (VAE downsampling 4, times
    FLUX's 2x2 latent packing or SD3's patch size 2; the UNets halve the latents once). SD3
    goes up to 512x512 (its position embedding); ``ldm`` has a fixed 64x64 size.
    ``guidance`` is the classifier-free (or, for FLUX dev, embedded) guidance scale; FLUX
    schnell ignores it. ``max_sequence_length`` (T5 tokens, FLUX and SD3 only) is kept short
    for speed; the pipelines default to 512 (FLUX) and 256 (SD3).
    """
    _check_backbone(backbone)
    # ldm: LDMPipeline takes no size; its images are unet.sample_size * 4 square, always.
    multiple_of = {"flux": 8, "sd3": 8, "sd15": 8, "sdxl": 8, "ldm": None}[backbone]
    out: dict[str, Any] = {
        "pipeline": PIPELINE_CLASSES[backbone],
        "height": 64,
        "width": 64,
        "steps": 2,
        "guidance": {"flux": 3.5 if guidance else 0.0, "sd15": 7.5, "sd3": 7.0, "sdxl": 5.0}.get(
            backbone, 0.0
        ),
        "multiple_of": multiple_of,
        "vae_scale_factor": VAE_SCALE_FACTOR,
        "latent_channels": {"flux": 16, "sd3": 16, "sd15": 4, "sdxl": 4, "ldm": 3}[backbone],
    }
    if backbone in ("flux", "sd3"):
        out["max_sequence_length"] = 32
    return out


def tiny_call_kwargs(backbone: str, *, guidance: bool = False) -> dict[str, Any]:
    """Keyword arguments for the tiny pipeline's ``__call__`` built from :func:`tiny_defaults`."""
    d = tiny_defaults(backbone, guidance=guidance)
    if backbone == "ldm":
        return {"num_inference_steps": d["steps"]}
    kwargs = {
        "height": d["height"],
        "width": d["width"],
        "num_inference_steps": d["steps"],
        "guidance_scale": d["guidance"],
    }
    if "max_sequence_length" in d:
        kwargs["max_sequence_length"] = d["max_sequence_length"]
    return kwargs


# ---------------------------------------------------------------------------------------
# Building.
# ---------------------------------------------------------------------------------------


def _check_backbone(backbone: str) -> None:
    if backbone not in BACKBONES:
        raise DDError(
            f"unknown tiny backbone {backbone!r}", hint=f"choose one of {', '.join(BACKBONES)}"
        )


def _seeded(seed: int, component: str) -> None:
    """Seed torch for one component: a fixed offset per name keeps components independent."""
    import torch

    torch.manual_seed(seed * 1_000_003 + zlib.crc32(component.encode()) % 1_000_003)


def _clip_encoder(kind: dict[str, Any], tokenizer: Any, seed: int, name: str, *, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **kind,
    )
    _seeded(seed, name)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    return model.eval()


def _t5_encoder(tokenizer: Any, seed: int, name: str):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as in FLUX and SD3
        tie_word_embeddings=False,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        **_T5,
    )
    _seeded(seed, name)
    return T5EncoderModel(config).eval()


def tiny_vae(like: str, seed: int = 0):
    """A tiny ``AutoencoderKL`` (downsampling 4) with the latent channels and scale/shift
    factors of ``like``'s VAE (flux, sd3, sd15 or sdxl): for plugins' tiny builders too."""
    from diffusers import AutoencoderKL

    if like not in _VAE:
        raise DDError(f"no tiny VAE like {like!r}", hint=f"one of {', '.join(_VAE)}")
    _seeded(seed, "vae")
    return AutoencoderKL(**_VAE_COMMON, **_VAE[like]).eval()


def _build_flux(seed: int, guidance: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    clip_tok, t5_tok = load_clip_tokenizer(), load_t5_tokenizer()
    _seeded(seed, "transformer")
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=_VAE["flux"]["latent_channels"] * 4,  # 2x2 packed latents
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_T5["d_model"],
        pooled_projection_dim=_CLIP_L["hidden_size"],  # FLUX pools CLIP's pooler_output
        guidance_embeds=guidance,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**_FLUX_SCHEDULER[guidance]),
        vae=tiny_vae("flux", seed),
        text_encoder=_clip_encoder(_CLIP_L, clip_tok, seed, "text_encoder", projection=False),
        tokenizer=clip_tok,
        text_encoder_2=_t5_encoder(t5_tok, seed, "text_encoder_2"),
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


def _build_sd15(seed: int):
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    # Deliberate copy: each family's tiny pipeline is spelled out with its real classes and sizes
    # (diffusers' test style), so one family's change cannot reach another's.
    clip_tok = load_clip_tokenizer()
    _seeded(seed, "unet")
    unet = UNet2DConditionModel(
        sample_size=64 // VAE_SCALE_FACTOR,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=_CLIP_L["hidden_size"],
        attention_head_dim=8,
    ).eval()
    return StableDiffusionPipeline(
        vae=tiny_vae("sd15", seed),
        text_encoder=_clip_encoder(_CLIP_L, clip_tok, seed, "text_encoder", projection=False),
        tokenizer=clip_tok,
        unet=unet,
        scheduler=PNDMScheduler(**_SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sd3(seed: int):
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    clip_tok, t5_tok = load_clip_tokenizer(), load_t5_tokenizer()
    _seeded(seed, "transformer")
    transformer = SD3Transformer2DModel(
        sample_size=64 // VAE_SCALE_FACTOR,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_T5["d_model"],
        caption_projection_dim=32,  # = heads * head dim
        pooled_projection_dim=_CLIP_L["projection_dim"] + _CLIP_G["projection_dim"],
        pos_embed_max_size=64,  # up to 64x64 patches: images up to 512x512
    ).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**_SD3_SCHEDULER),
        vae=tiny_vae("sd3", seed),
        text_encoder=_clip_encoder(_CLIP_L, clip_tok, seed, "text_encoder", projection=True),
        tokenizer=clip_tok,
        text_encoder_2=_clip_encoder(_CLIP_G, clip_tok, seed, "text_encoder_2", projection=True),
        tokenizer_2=clip_tok,
        text_encoder_3=_t5_encoder(t5_tok, seed, "text_encoder_3"),
        tokenizer_3=t5_tok,
    )


def _build_sdxl(seed: int):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    # Deliberate copy: spelled out per family, see build_sd15's note.
    clip_tok = load_clip_tokenizer()
    time_embed_dim = 8
    _seeded(seed, "unet")
    unet = UNet2DConditionModel(
        sample_size=64 // VAE_SCALE_FACTOR,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=_CLIP_L["hidden_size"] + _CLIP_G["hidden_size"],
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # 6 micro-conditioning numbers (original size, crop, target size) + pooled text
        projection_class_embeddings_input_dim=6 * time_embed_dim + _CLIP_G["projection_dim"],
    ).eval()
    return StableDiffusionXLPipeline(
        vae=tiny_vae("sdxl", seed),
        text_encoder=_clip_encoder(_CLIP_L, clip_tok, seed, "text_encoder", projection=False),
        text_encoder_2=_clip_encoder(_CLIP_G, clip_tok, seed, "text_encoder_2", projection=True),
        tokenizer=clip_tok,
        tokenizer_2=clip_tok,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**_SDXL_SCHEDULER),
    )


def _build_ldm(seed: int):
    from diffusers import DDIMScheduler, LDMPipeline, UNet2DModel, VQModel

    _seeded(seed, "vqvae")
    vqvae = VQModel(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=3,
        vq_embed_dim=3,
        num_vq_embeddings=64,
        norm_num_groups=8,
        sample_size=_LDM_SAMPLE_SIZE * VAE_SCALE_FACTOR,
    ).eval()
    _seeded(seed, "unet")
    unet = UNet2DModel(
        sample_size=_LDM_SAMPLE_SIZE,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()
    return LDMPipeline(vqvae=vqvae, unet=unet, scheduler=DDIMScheduler(**_LDM_SCHEDULER))


def build_tiny(
    backbone: str,
    out: str | os.PathLike,
    *,
    seed: int = 0,
    overwrite: bool = False,
    **variants: Any,
) -> Path:
    """Write the tiny ``backbone`` pipeline to ``out`` and return its path.

    ``variants``: ``guidance=True`` (flux only) builds a FLUX.1-dev-like transformer with a
    guidance embedding and dev's dynamically shifted scheduler; the default is schnell-like.
    The folder appears whole or not at all (it is written beside ``out``, then renamed); an
    existing non-empty ``out`` is an error unless ``overwrite``.
    """
    if backbone not in BACKBONES:
        return _build_plugin_tiny(backbone, out, seed=seed, overwrite=overwrite, **variants)
    _check_backbone(backbone)
    allowed = {"guidance"} if backbone == "flux" else set()
    unknown = sorted(set(variants) - allowed)
    if unknown:
        raise DDError(
            f"tiny {backbone} has no variant {', '.join(unknown)}",
            hint="only flux takes guidance=True (dev-like)" if backbone != "flux" else None,
        )
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DDError(f"{out} is a file", hint="give a folder for the tiny pipeline")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DDError(f"{out} is not empty", hint="choose a new folder or pass --overwrite")

    builders = {
        "flux": lambda: _build_flux(seed, bool(variants.get("guidance", False))),
        "sd15": lambda: _build_sd15(seed),
        "sd3": lambda: _build_sd3(seed),
        "sdxl": lambda: _build_sdxl(seed),
        "ldm": lambda: _build_ldm(seed),
    }
    return _save_whole(builders[backbone](), out)


def _build_plugin_tiny(
    backbone: str, out: str | os.PathLike, *, seed: int, overwrite: bool, **variants: Any
) -> Path:
    """The tiny pipeline a backbone plugin builds itself (``Backbone.build_tiny_pipeline``):
    how a third-party family gets offline tests without dd knowing its name."""
    from dd.api.plugins import get_host

    cls = get_host().backbones.get(backbone)  # an unknown name lists the installed ones
    if variants:
        raise DDError(f"tiny {backbone} has no variant {', '.join(sorted(variants))}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DDError(f"{out} is a file", hint="give a folder for the tiny pipeline")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DDError(f"{out} is not empty", hint="choose a new folder or pass --overwrite")
    pipe = cls.build_tiny_pipeline(seed)
    if pipe is None:
        raise DDError(
            f"backbone {backbone} has no tiny builder",
            hint="its plugin can implement Backbone.build_tiny_pipeline(seed)",
        )
    return _save_whole(pipe, out)


def _save_whole(pipe: Any, out: Path) -> Path:
    """``pipe.save_pretrained`` into ``out``, whole or not at all (written beside, renamed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if out.is_dir():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def tiny_pipeline_path(
    backbone: str, tmp_path_factory: pytest.TempPathFactory, *, seed: int = 0, **variants: Any
) -> Path:
    """A tiny pipeline folder built once per pytest session (and per ``xdist`` worker).

    Use it from a session- or module-scoped fixture; callers must not modify the folder::

        @pytest.fixture(scope="session")
        def tiny_flux(tmp_path_factory):
            return tiny_pipeline_path("flux", tmp_path_factory)
    """
    tag = "-".join([backbone, f"seed{seed}", *(f"{k}{v}" for k, v in sorted(variants.items()))])
    path = tmp_path_factory.getbasetemp() / "dd-tiny-pipelines" / tag
    if not path.is_dir():  # build_tiny renames a whole folder into place
        build_tiny(backbone, path, seed=seed, **variants)
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m dd.testing.tiny BACKBONE OUTDIR [--seed N] [--guidance] [--overwrite]``."""
    parser = argparse.ArgumentParser(
        prog="python -m dd.testing.tiny",
        description="Write a tiny offline diffusers pipeline of the real classes "
        "(random seeded weights) that from_pretrained loads.",
    )
    parser.add_argument(
        "backbone",
        nargs="?",
        help=f"model family: {', '.join(BACKBONES)}, or a plugin backbone with a tiny builder",
    )
    parser.add_argument("outdir", nargs="?", type=Path, help="folder to write (new or empty)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument(
        "--guidance",
        action="store_true",
        help="flux only: FLUX.1-dev-like guidance embedding (default: schnell-like)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTDIR")
    parser.add_argument(
        "--rebuild-tokenizers",
        action="store_true",
        help=f"regenerate the tokenizer files kept in {ASSETS} and exit",
    )
    args = parser.parse_args(argv)
    if args.rebuild_tokenizers:
        for path in rebuild_tokenizers():
            print(path)
        return 0
    if args.backbone is None or args.outdir is None:
        parser.error("BACKBONE and OUTDIR are required (or --rebuild-tokenizers)")
    if args.guidance and args.backbone != "flux":
        parser.error("--guidance applies to flux only")
    variants = {"guidance": True} if args.guidance else {}
    try:
        out = build_tiny(
            args.backbone, args.outdir, seed=args.seed, overwrite=args.overwrite, **variants
        )
    except DDError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def build_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """A tiny ``CLIPModel`` with its processor (the real classes, 32 px images), saved with
    ``save_pretrained`` to ``folder``: the local weights of the CLIP-score and PickScore
    columns and quality scorers in tests."""
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPVisionConfig,
    )

    torch.manual_seed(seed)
    tok = load_clip_tokenizer()
    text = CLIPTextConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        projection_dim=8,
    )
    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=8,
    )
    config = CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=8
    )
    folder = Path(folder)
    CLIPModel(config).eval().save_pretrained(folder)
    size = {"shortest_edge": 32}
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size=size, crop_size=32), tokenizer=tok)
    proc.save_pretrained(folder)
    return folder
