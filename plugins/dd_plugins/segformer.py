"""SegFormer artifact detector: DiffDoctor's released detector (MiT-b5, one output channel).

DiffDoctor releases its artifact detector as a plain ``torch.save``'d ``state_dict`` of
transformers' ``SegformerForSemanticSegmentation`` (MiT-b5 encoder, all-MLP decode head whose
``decode_head.classifier`` is a 1x1 ``Conv2d`` to ONE channel): ``ad_pytorch_model.bin`` (the
DiffDoctor detector) and ``ad_richhf_baseline_model.bin`` (the RichHF baseline).

The released inference script does::

    cv2.imread -> cv2.resize(512, 512) (INTER_LINEAR) -> BGR2RGB -> ToTensor (/255)
    -> SegformerImageProcessor (mit-b5: resize 512 [no-op], ImageNet mean/std, do_rescale=False)
    -> model -> F.interpolate(logits, 512x512, bilinear, align_corners=False) -> sigmoid

:class:`SegformerDetector` reproduces this on ``B x 3 x H x W`` tensors in ``[0, 1]``: bilinear
resize (``align_corners=False``, no antialias: cv2 INTER_LINEAR's half-pixel sampling) to
``input_size``, ImageNet normalisation, the model; ``logits`` returns the ``B x 1 x H/4 x W/4``
map. Everything is differentiable w.r.t. the images.

State-dict layout: the released files use the key names of transformers 4.x
(``segformer.encoder.block.{stage}.{i}.attention.self.query.weight``, ``decode_head.linear_c``,
...). transformers >= 5 renamed the modules (``segformer.stages.{stage}.blocks.{i}.attention.
q_proj``, ``decode_head.linear_projections``, ...). This module reads both layouts, and the
wrapped model's ``state_dict()`` always returns the released (4.x) layout, so
``torch.save(detector.model.state_dict(), "ad_pytorch_model.bin")`` writes the released format
on any transformers version (``load_state_dict`` accepts either layout).
"""

from __future__ import annotations

import math
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dd.api.detectors import Detector, check_images
from dd.api.hookspecs import hookimpl
from dd.errors import DDError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VARIANTS",
    "SegformerDetector",
    "infer_config",
    "infer_variant",
    "segformer_config",
    "to_released_keys",
    "dd_register_detectors",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RELEASED_FILES = ("ad_pytorch_model.bin", "ad_richhf_baseline_model.bin")
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
#: dd's embedded default detector (shipped in the package; see docs/models.md).
DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "dd-synth-small"

_COMMON: dict[str, Any] = {
    "num_encoder_blocks": 4,
    "sr_ratios": [8, 4, 2, 1],
    "patch_sizes": [7, 3, 3, 3],
    "strides": [4, 2, 2, 2],
    "mlp_ratios": [4, 4, 4, 4],
}
_MIT_HEADS = [1, 2, 5, 8]
_WIDE = [64, 128, 320, 512]

#: MiT encoder variants (SegFormer paper / nvidia/mit-b*), ``small`` (dd's embedded default)
#: and ``tiny`` for tests.
VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": {
        "depths": [1, 1, 1, 1],
        "hidden_sizes": [8, 16, 32, 64],
        "num_attention_heads": [1, 1, 2, 4],
        "decoder_hidden_size": 32,
    },
    # dd's own small detector (the embedded default, trained on `dd synth` data on a CPU).
    "small": {
        "depths": [2, 2, 2, 2],
        "hidden_sizes": [16, 32, 80, 128],
        "num_attention_heads": [1, 1, 2, 4],
        "decoder_hidden_size": 64,
    },
    "b0": {
        "depths": [2, 2, 2, 2],
        "hidden_sizes": [32, 64, 160, 256],
        "num_attention_heads": _MIT_HEADS,
        "decoder_hidden_size": 256,
    },
    "b1": {"depths": [2, 2, 2, 2], "hidden_sizes": _WIDE, "decoder_hidden_size": 256},
    "b2": {"depths": [3, 4, 6, 3], "hidden_sizes": _WIDE, "decoder_hidden_size": 768},
    "b3": {"depths": [3, 4, 18, 3], "hidden_sizes": _WIDE, "decoder_hidden_size": 768},
    "b4": {"depths": [3, 8, 27, 3], "hidden_sizes": _WIDE, "decoder_hidden_size": 768},
    "b5": {"depths": [3, 6, 40, 3], "hidden_sizes": _WIDE, "decoder_hidden_size": 768},
}
for _v in VARIANTS.values():
    _v.setdefault("num_attention_heads", _MIT_HEADS)
    for _k, _val in _COMMON.items():
        _v.setdefault(_k, _val)
    for _k in list(_v):  # own copies, so a caller mutating one variant cannot change another
        _v[_k] = list(_v[_k]) if isinstance(_v[_k], list) else _v[_k]
del _v, _k, _val

#: Fields that identify a variant (the others cannot be told from a state dict).
_ARCH_FIELDS = (
    "depths",
    "hidden_sizes",
    "decoder_hidden_size",
    "sr_ratios",
    "patch_sizes",
    "mlp_ratios",
)


def _normalize_variant(variant: str) -> str:
    v = str(variant).strip().lower()
    for prefix in ("nvidia/", "mit-", "mit_", "segformer-", "segformer_"):
        v = v.removeprefix(prefix)
    if v not in VARIANTS:
        raise DDError(
            f"unknown SegFormer variant {variant!r}",
            hint=f"choose one of {', '.join(VARIANTS)} (DiffDoctor's released detector is b5)",
        )
    return v


def segformer_config(variant: str = "b5", **overrides: Any):
    """A ``SegformerConfig`` for MiT ``variant`` with one output channel (no hub access)."""
    from transformers import SegformerConfig

    kwargs: dict[str, Any] = {
        k: (list(v) if isinstance(v, list) else v)
        for k, v in VARIANTS[_normalize_variant(variant)].items()
    }
    kwargs.update(
        num_channels=3,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout_prob=0.1,
        drop_path_rate=0.1,
        layer_norm_eps=1e-6,
        reshape_last_stage=True,
        id2label={0: "artifact"},
        label2id={"artifact": 0},
    )
    kwargs.update(overrides)
    return SegformerConfig(**kwargs)


# -- state-dict layouts ---------------------------------------------------------------------------
# Block-internal module paths: released / transformers 4.x name -> transformers >= 5 name.
_BLOCK_RENAMES = {
    "attention.self.query": "attention.q_proj",
    "attention.self.key": "attention.k_proj",
    "attention.self.value": "attention.v_proj",
    "attention.self.sr": "attention.sequence_reduction.sequence_reduction",
    "attention.self.layer_norm": "attention.sequence_reduction.layer_norm",
    "attention.output.dense": "attention.o_proj",
    "mlp.dense1": "mlp.fc1",
    "mlp.dense2": "mlp.fc2",
    "layer_norm_1": "layernorm_before",
    "layer_norm_2": "layernorm_after",
}
_BLOCK_RENAMES_BACK = {v: k for k, v in _BLOCK_RENAMES.items()}

_OLD_PATCH = re.compile(r"^segformer\.encoder\.patch_embeddings\.(\d+)\.(.+)$")
_OLD_BLOCK = re.compile(r"^segformer\.encoder\.block\.(\d+)\.(\d+)\.(.+)$")
_OLD_NORM = re.compile(r"^segformer\.encoder\.layer_norm\.(\d+)\.(.+)$")
_NEW_PATCH = re.compile(r"^segformer\.stages\.(\d+)\.patch_embeddings\.(.+)$")
_NEW_BLOCK = re.compile(r"^segformer\.stages\.(\d+)\.blocks\.(\d+)\.(.+)$")
_NEW_NORM = re.compile(r"^segformer\.stages\.(\d+)\.layer_norm\.(.+)$")


def _rename_block_suffix(suffix: str, table: Mapping[str, str]) -> str:
    for old, new in table.items():
        if suffix.startswith(old + "."):
            return new + suffix[len(old) :]
    return suffix


def _key_to_released(key: str) -> str:
    """transformers >= 5 key -> released (transformers 4.x) key; other keys unchanged."""
    if m := _NEW_BLOCK.match(key):
        rest = _rename_block_suffix(m[3], _BLOCK_RENAMES_BACK)
        return f"segformer.encoder.block.{m[1]}.{m[2]}.{rest}"
    if m := _NEW_PATCH.match(key):
        return f"segformer.encoder.patch_embeddings.{m[1]}.{m[2]}"
    if m := _NEW_NORM.match(key):
        return f"segformer.encoder.layer_norm.{m[1]}.{m[2]}"
    if key.startswith("decode_head.linear_projections."):
        return "decode_head.linear_c." + key[len("decode_head.linear_projections.") :]
    return key


# Deliberate copy: the inverse of _key_to_released, rule for rule (each direction reads
# on its own; tests round-trip every key).
def _key_to_v5(key: str) -> str:
    """Released (transformers 4.x) key -> transformers >= 5 key; other keys unchanged."""
    if m := _OLD_BLOCK.match(key):
        rest = _rename_block_suffix(m[3], _BLOCK_RENAMES)
        return f"segformer.stages.{m[1]}.blocks.{m[2]}.{rest}"
    if m := _OLD_PATCH.match(key):
        return f"segformer.stages.{m[1]}.patch_embeddings.{m[2]}"
    if m := _OLD_NORM.match(key):
        return f"segformer.stages.{m[1]}.layer_norm.{m[2]}"
    if key.startswith("decode_head.linear_c."):
        return "decode_head.linear_projections." + key[len("decode_head.linear_c.") :]
    return key


def to_released_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename a ``SegformerForSemanticSegmentation`` state dict (either layout) to the released
    (transformers 4.x) key layout of ``ad_pytorch_model.bin``."""
    return {_key_to_released(k): v for k, v in state_dict.items()}


def _native_is_v5(model: torch.nn.Module) -> bool:
    return any(n.startswith("segformer.stages.") for n, _ in model.named_parameters())


def _rename_in_place(state_dict: dict, prefix: str, fn) -> None:
    items = [(k, v) for k, v in state_dict.items() if k.startswith(prefix)]
    for k, _ in items:
        del state_dict[k]
    for k, v in items:
        state_dict[prefix + fn(k[len(prefix) :])] = v


def _state_dict_to_released(module, state_dict, prefix, local_metadata) -> None:
    if getattr(module, "_dd_native_v5", False):
        _rename_in_place(state_dict, prefix, _key_to_released)


def _load_state_dict_to_native(module, state_dict, prefix, *args) -> None:
    fn = _key_to_v5 if getattr(module, "_dd_native_v5", False) else _key_to_released
    _rename_in_place(state_dict, prefix, fn)


def _install_layout_hooks(model: torch.nn.Module) -> None:
    """``model.state_dict()`` -> released layout; ``load_state_dict`` accepts both layouts."""
    if getattr(model, "_dd_layout_hooks", False):
        return
    model._dd_native_v5 = _native_is_v5(model)
    model.register_state_dict_post_hook(_state_dict_to_released)
    model.register_load_state_dict_pre_hook(_load_state_dict_to_native)
    model._dd_layout_hooks = True


# -- architecture inference -------------------------------------------------------------------
def _shape_map(state_dict: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    out = {}
    for k, v in state_dict.items():
        shape = v.shape if hasattr(v, "shape") else v
        out[_key_to_released(str(k))] = tuple(int(s) for s in shape)
    return out


def _infer_arch(state_dict: Mapping[str, Any]) -> dict[str, Any] | None:
    """Architecture numbers readable from a state dict's shapes (either key layout)."""
    shapes = _shape_map(state_dict)
    hidden, patch, chans = {}, {}, {}
    blocks: dict[int, set[int]] = {}
    for key, shape in shapes.items():
        if (m := _OLD_PATCH.match(key)) and m[2] == "proj.weight" and len(shape) == 4:
            i = int(m[1])
            hidden[i], chans[i], patch[i] = shape[0], shape[1], shape[-1]
        elif m := _OLD_BLOCK.match(key):
            blocks.setdefault(int(m[1]), set()).add(int(m[2]))
    n = len(hidden)
    if n == 0 or sorted(hidden) != list(range(n)) or sorted(blocks) != list(range(n)):
        return None
    if any(sorted(blocks[i]) != list(range(len(blocks[i]))) for i in range(n)):
        return None
    hidden_sizes = [hidden[i] for i in range(n)]
    if any(chans[i] != hidden_sizes[i - 1] for i in range(1, n)):
        return None
    sr, mlp = [], []
    for i in range(n):
        pre = f"segformer.encoder.block.{i}.0."
        sr_w = shapes.get(pre + "attention.self.sr.weight")
        sr.append(sr_w[-1] if sr_w else 1)
        fc1 = shapes.get(pre + "mlp.dense1.weight")
        if not fc1 or fc1[0] % hidden_sizes[i]:
            return None
        mlp.append(fc1[0] // hidden_sizes[i])
    cls_w = shapes.get("decode_head.classifier.weight")
    if not cls_w or len(cls_w) != 4:
        return None
    depths = [len(blocks[i]) for i in range(n)]
    heads = next(
        (v["num_attention_heads"] for v in VARIANTS.values() if v["hidden_sizes"] == hidden_sizes),
        None,
    )
    if heads is None:  # not readable from shapes: MiT's heads if they divide, else one per stage
        mit_ok = n == 4 and all(h % d == 0 for h, d in zip(hidden_sizes, _MIT_HEADS, strict=True))
        heads = _MIT_HEADS if mit_ok else [1] * n
    return {
        "num_channels": chans[0],
        "num_encoder_blocks": n,
        "depths": depths,
        "hidden_sizes": hidden_sizes,
        "num_attention_heads": list(heads),
        "sr_ratios": sr,
        "patch_sizes": [patch[i] for i in range(n)],
        "strides": [(patch[i] + 1) // 2 for i in range(n)],
        "mlp_ratios": mlp,
        "decoder_hidden_size": cls_w[1],
        "num_labels": cls_w[0],
    }


def infer_variant(state_dict: Mapping[str, Any]) -> str | None:
    """The :data:`VARIANTS` name whose architecture matches a state dict (tensors or a
    ``key -> shape`` mapping, either key layout), or None."""
    arch = _infer_arch(state_dict)
    if arch is None:
        return None
    return _matching_variant(arch)


def infer_config(state_dict: Mapping[str, Any]):
    """``(variant, SegformerConfig)`` for a state dict: a known variant, or ``"custom"`` built
    from the shapes (heads, which shapes do not show, taken from MiT); None if not SegFormer."""
    arch = _infer_arch(state_dict)
    if arch is None:
        return None
    name = infer_variant(state_dict)
    if name is not None:
        return name, segformer_config(name)
    from transformers import SegformerConfig

    if arch["num_labels"] != 1:
        return None
    arch = dict(arch)
    arch.pop("num_labels")
    base = segformer_config("b5")
    try:
        return "custom", SegformerConfig(
            **{**base.to_dict(), **arch, "id2label": {0: "artifact"}, "label2id": {"artifact": 0}}
        )
    except Exception:  # inconsistent numbers
        return None


def _matching_variant(arch: Mapping[str, Any]) -> str | None:
    def norm(x: Any) -> Any:
        return list(x) if isinstance(x, (list, tuple)) else x

    for name, v in VARIANTS.items():
        if all(norm(arch[f]) == norm(v[f]) for f in _ARCH_FIELDS):
            return name
    return None


def _config_variant(config) -> str:
    return _matching_variant({f: getattr(config, f) for f in _ARCH_FIELDS}) or "custom"


def _describe_config(config) -> str:
    return (
        f"depths {list(config.depths)}, hidden sizes {list(config.hidden_sizes)}, "
        f"decoder {config.decoder_hidden_size}, {config.num_labels} output channel(s)"
    )


# -- reading weights ------------------------------------------------------------------------------
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def _looks_like_hub_id(s: str) -> bool:
    return bool(_HUB_ID.match(s)) and not s.lower().endswith((*TORCH_SUFFIXES, ".safetensors"))


def _read_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DDError(
            f"{path} is not a plain state_dict: weights_only loading refused it ({first[:300]})",
            hint="the file holds pickled Python objects besides tensors; dd never unpickles "
            "those (they can run code). Re-save it as torch.save(model.state_dict(), path) "
            "or as .safetensors in a trusted environment",
        ) from None
    except Exception as exc:
        raise DDError(
            f"could not read weights file {path}: {type(exc).__name__}: {exc}",
            hint="is it a complete, uncorrupted torch state_dict (.bin/.pt/.pth)?",
        ) from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:
        raise DDError(
            f"could not read safetensors file {path}: {type(exc).__name__}: {exc}",
            hint="is the file complete (not a Git LFS pointer or partial download)?",
        ) from None


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(2):  # {"state_dict": {...}} / {"model": {...}}, possibly nested once more
        if isinstance(obj, Mapping):
            inner = next(
                (obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)), None
            )
            if inner is not None:
                obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise DDError(
            f"{path} does not hold a state dict (found {type(obj).__name__})",
            hint="expected a mapping of parameter names to tensors, e.g. ad_pytorch_model.bin",
        )
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise DDError(
            f"{path} is not a plain state dict: entries that are not tensors: "
            f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}",
            hint="save it with torch.save(model.state_dict(), path)",
        )
    sd = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in sd):  # DistributedDataParallel
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        obj: Any = _read_safetensors(path)
    elif suffix in TORCH_SUFFIXES:
        obj = _read_torch(path)
    else:
        raise DDError(
            f"unsupported weights file {path} (suffix {suffix or 'none'!r})",
            hint="pass a .bin/.pt/.pth state dict (e.g. ad_pytorch_model.bin), a .safetensors "
            "file, or a save_pretrained folder",
        )
    return _unwrap_state_dict(obj, path)


def _fmt_keys(keys: Sequence[str], n: int = 5) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _build_model(config, meta: bool = False):
    from transformers import SegformerForSemanticSegmentation

    if meta:
        with torch.device("meta"):
            return SegformerForSemanticSegmentation(config)
    return SegformerForSemanticSegmentation(config)


def _model_from_state_dict(sd: dict[str, torch.Tensor], variant: str | None, source: str):
    """Build the model for ``sd`` (variant given or inferred) and load it strictly."""
    inferred = infer_config(sd)
    inferred_name = inferred[0] if inferred else None
    if variant is not None:
        config, name = segformer_config(variant), variant
    elif inferred is not None:
        name, config = inferred
    else:
        name, config = "b5", segformer_config("b5")

    model = _build_model(config, meta=True)
    expected = to_released_keys({k: tuple(v.shape) for k, v in model.state_dict().items()})
    given = to_released_keys(sd)
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = [k for k in expected if k not in given and k not in optional]
    unexpected = [k for k in given if k not in expected]
    mismatched = [
        (k, tuple(given[k].shape), expected[k])
        for k in expected
        if k in given and tuple(given[k].shape) != expected[k]
    ]
    if missing or unexpected or mismatched:
        what = f"variant {name} ({_describe_config(config)})"
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_fmt_keys(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_fmt_keys(unexpected)}")
        for k, got, want in mismatched[:5]:
            parts.append(
                f"shape mismatch for {k}: file has {list(got)}, model expects {list(want)}"
            )
        if len(mismatched) > 5:
            parts.append(f"... {len(mismatched) - 5} more shape mismatches")
        if inferred_name and inferred_name != name:
            hint = (
                f"the file looks like variant {inferred_name}: pass -O variant={inferred_name} "
                f"(dd train-detector: --variant {inferred_name})"
                if inferred_name != "custom"
                else "the file has a custom MiT architecture: leave the variant option unset"
            )
        elif inferred is None:
            hint = (
                "the file does not look like a SegFormer artifact detector "
                "(SegformerForSemanticSegmentation state dict, e.g. DiffDoctor's "
                "ad_pytorch_model.bin); if it is one, pass its variant: -O variant=b0..b5 "
                "(dd train-detector: --variant)"
            )
        else:
            hint = (
                "pass the matching variant (-O variant=b0..b5; dd train-detector: --variant), "
                "or check the file is a SegFormer "
                "artifact detector with one output channel (DiffDoctor's ad_pytorch_model.bin)"
            )
        raise DDError(f"weights {source} do not fit {what}: " + "; ".join(parts), hint=hint)

    for k in optional:
        if k not in given:
            given[k] = torch.zeros((), dtype=torch.long)
    _install_layout_hooks(model)
    model.load_state_dict(given, strict=True, assign=True)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # cannot happen for a complete state dict; guard against silent garbage
        raise DDError(f"weights {source} left tensors uninitialised: {_fmt_keys(leftover)}")
    return model, name


def _is_classifier(config) -> bool:
    """A MiT ImageNet classifier (``SegformerForImageClassification``, e.g. the
    ``nvidia/mit-b0``..``mit-b5`` checkpoints SegFormer's paper starts from)."""
    return "SegformerForImageClassification" in (getattr(config, "architectures", None) or [])


def _from_classifier(ref: str, config, variant: str | None):
    """The detector of a MiT classifier's size with the classifier's encoder and a fresh
    one-channel decode head (from the seeded global generator), as SegFormer and DiffDoctor
    start training from ImageNet weights."""
    from transformers import SegformerForImageClassification
    from transformers.utils import logging as hf_logging

    encoder = {f: getattr(config, f) for f in _ARCH_FIELDS if f != "decoder_hidden_size"}
    names = [
        n
        for n, v in VARIANTS.items()
        if all(list(encoder[f]) == list(v[f]) for f in encoder)  # type: ignore[arg-type]
    ]
    name = variant or (names[-1] if names else None)
    if name is None or (variant is not None and variant not in names):
        raise DDError(
            f"{ref} is a MiT classifier of an encoder no detector variant has "
            f"(depths {list(config.depths)}, hidden sizes {list(config.hidden_sizes)})",
            hint="use nvidia/mit-b0..b5 (or a folder in that format)",
        )
    hf_logging.disable_progress_bar()
    try:
        classifier = SegformerForImageClassification.from_pretrained(ref)
    except Exception as exc:
        raise DDError(
            f"could not load the MiT classifier {ref}: {type(exc).__name__}: {exc}"[:400],
            hint="a save_pretrained folder or hub id of SegformerForImageClassification",
        ) from None
    model = _build_model(segformer_config(name))
    model.segformer.load_state_dict(classifier.segformer.state_dict(), strict=True)
    model.config.dd_init_note = "ImageNet MiT encoder; decode head initialised fresh"
    return model, name


def _check_num_labels(config, source: str) -> None:
    if config.num_labels != 1:
        raise DDError(
            f"{source} has {config.num_labels} output channels; the artifact detector "
            "has one (num_labels=1)",
            hint="this is a semantic-segmentation SegFormer, not an artifact detector",
        )


def _check_pretrained(model, info: Mapping[str, Any] | None, source: str) -> None:
    _check_num_labels(model.config, source)
    if info:
        bad = {k: list(info.get(k) or []) for k in ("missing_keys", "mismatched_keys")}
        if any(bad.values()):
            raise DDError(
                f"{source} is incomplete for its config: "
                + "; ".join(f"{k}: {_fmt_keys([str(x) for x in v])}" for k, v in bad.items() if v),
                hint="re-save it with SegformerDetector.save_pretrained or pass the .bin file",
            )


def _from_pretrained(ref: str, source: str, **kwargs: Any):
    from transformers import SegformerForSemanticSegmentation
    from transformers.utils import logging as hf_logging

    # dd shows its own progress; transformers' per-load "Loading weights" bar is noise here.
    hf_logging.disable_progress_bar()
    model, info = SegformerForSemanticSegmentation.from_pretrained(
        ref, output_loading_info=True, **kwargs
    )
    _check_pretrained(model, info, source)
    return model


def _load_dir(path: Path, variant: str | None):
    if (path / "config.json").is_file():
        from transformers import SegformerConfig

        try:
            config = SegformerConfig.from_pretrained(str(path))
        except Exception as exc:
            raise DDError(
                f"{path}/config.json is not a SegFormer config: {type(exc).__name__}: {exc}",
                hint="pass a save_pretrained folder of SegformerForSemanticSegmentation",
            ) from None
        if _is_classifier(config):
            return _from_classifier(str(path), config, variant)
        _check_num_labels(config, str(path))
        name = _config_variant(config)
        if variant is not None and variant != name:
            raise DDError(
                f"{path} holds variant {name} ({_describe_config(config)}), not {variant}",
                hint="leave the variant option unset for folders with a config.json",
            )
        try:
            model = _from_pretrained(str(path), str(path))
        except DDError:
            raise
        except Exception as exc:
            raise DDError(
                f"could not load {path} with from_pretrained: {type(exc).__name__}: {exc}",
                hint="the folder needs config.json and model.safetensors (or pytorch_model.bin)",
            ) from None
        return model, name
    found = [path / f for f in RELEASED_FILES if (path / f).is_file()]
    found += sorted(path.glob("*.safetensors"))
    if len(found) != 1:
        listing = ", ".join(p.name for p in found) if found else "none"
        raise DDError(
            f"{path} must hold exactly one weights file ({', '.join(RELEASED_FILES)} or "
            f"*.safetensors) or a config.json; found: {listing}",
            hint="pass the weights file itself, e.g. PATH/ad_pytorch_model.bin",
        )
    sd = _read_state_dict(found[0])
    model, name = _model_from_state_dict(sd, variant, str(found[0]))
    return model, name


def _load_hub(ref: str, variant: str | None):
    try:
        from transformers import SegformerConfig

        config = SegformerConfig.from_pretrained(ref)
        if _is_classifier(config):
            return _from_classifier(ref, config, variant)
        model = _from_pretrained(ref, ref)
    except DDError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
        raise DDError(
            f"could not load hub id {ref!r}: {type(exc).__name__}: {first[:300]}",
            hint="pass a local file (e.g. ad_pytorch_model.bin) or save_pretrained folder"
            + (" (HF_HUB_OFFLINE is set, so nothing is downloaded)" if offline else ""),
        ) from None
    name = _config_variant(model.config)
    if variant is not None and variant != name:
        raise DDError(
            f"hub model {ref} is variant {name} ({_describe_config(model.config)}), not {variant}",
            hint="leave the variant option unset for hub ids",
        )
    return model, name


def _parse_size(size: Any) -> tuple[int, int]:
    try:
        if isinstance(size, str):
            parts = [int(p) for p in re.split(r"[x,\s]+", size.strip().lower()) if p]
        elif isinstance(size, int):
            parts = [size]
        else:
            parts = [int(p) for p in size]
        if len(parts) == 1:
            parts = parts * 2
        if len(parts) != 2 or min(parts) < 32:
            raise ValueError
    except (TypeError, ValueError):
        raise DDError(
            f"invalid input_size {size!r}",
            hint="an int (512) or HxW (512x768), at least 32",
        ) from None
    return parts[0], parts[1]


class _CheckpointedForward:
    """Instance-level ``forward`` of one encoder block that recomputes it in backward.

    Unlike transformers' own gradient checkpointing (which only acts in training mode), this
    also works in eval mode, which is how the treat engine back-propagates through the
    detector. Skipped when autograd is off.
    """

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fwd = type(self.module).forward.__get__(self.module)
        if not torch.is_grad_enabled():
            return fwd(*args, **kwargs)
        return checkpoint(fwd, *args, use_reentrant=False, **kwargs)


def _image_threshold(config: Any, ref: str) -> float | None:
    """The calibrated image threshold saved with the weights (``dd_image_threshold``)."""
    value = getattr(config, "dd_image_threshold", None)
    if value is None:
        return None
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        threshold = math.nan
    if not 0.0 <= threshold <= 1.0:
        raise DDError(
            f"{ref}: dd_image_threshold must be a number in [0, 1], got {value!r}",
            hint="fix or remove it in config.json (dd eval-detector --calibrate "
            "--save-threshold writes it)",
        )
    return threshold


class SegformerDetector(Detector):
    """SegFormer (MiT) artifact detector with one output channel (DiffDoctor's release)."""

    name = "segformer"
    description = "SegFormer artifact detector (DiffDoctor's ad_pytorch_model.bin, MiT-b5)"

    def __init__(self, model: torch.nn.Module, *, variant: str, input_size: Any = 512):
        super().__init__()
        _install_layout_hooks(model)
        self.model = model
        self.variant = variant
        self.input_size = _parse_size(input_size)
        self.gradient_checkpointing = False

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        weights: str | os.PathLike | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        variant: str | None = None,
        input_size: Any = None,
        seed: int = 0,
        gradient_checkpointing: bool = False,
        **options: Any,
    ) -> SegformerDetector:
        """Build the detector.

        ``weights``: None without ``variant`` (dd's embedded default detector, trained on
        ``dd synth`` data: see docs/models.md), None with ``variant`` (random init:
        untrained), a
        ``.bin``/``.pt``/``.pth`` state dict (read with ``weights_only=True`` only), a
        ``.safetensors`` file, a folder (``save_pretrained`` output, or one holding exactly one
        of ``ad_pytorch_model.bin`` / ``ad_richhf_baseline_model.bin`` / ``*.safetensors``) or a
        hub id. ``variant`` (tiny, small, b0..b5) is inferred from the weights when not given.
        ``input_size`` defaults to the one saved with the weights (``dd_input_size`` in
        ``config.json``, written by :meth:`save_pretrained`), else 512 as DiffDoctor uses.
        """
        if options:
            raise DDError(
                f"unknown option(s) for detector segformer: {', '.join(sorted(options))}",
                hint="options: variant (tiny, b0..b5), input_size (512 or HxW), seed, "
                "gradient_checkpointing",
            )
        seed = int(seed)
        variant = _normalize_variant(variant) if variant is not None else None
        device = torch.device(device)

        if weights is None and variant is None and DEFAULT_WEIGHTS.is_dir():
            weights = DEFAULT_WEIGHTS
        if weights is None:
            size = _parse_size(input_size if input_size is not None else 512)
            name = variant or "tiny"
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = _build_model(segformer_config(name), meta=device.type == "meta")
            det = cls(model, variant=name, input_size=size)
            det.untrained = True
            det.source = "random init (untrained)"
        else:
            ref = os.path.expanduser(os.fspath(weights))
            path = Path(ref)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # a MiT classifier's fresh decode head draws here
                if path.is_dir():
                    model, name = _load_dir(path, variant)
                elif path.is_file():
                    model, name = _model_from_state_dict(_read_state_dict(path), variant, ref)
                elif _looks_like_hub_id(ref):
                    model, name = _load_hub(ref, variant)
                else:
                    raise DDError(
                        f"weights not found: {ref}",
                        hint="pass an existing file (e.g. ad_pytorch_model.bin), folder or hub id",
                    )
            saved = getattr(model.config, "dd_input_size", None)
            size = _parse_size(input_size if input_size is not None else (saved or 512))
            det = cls(model, variant=name, input_size=size)
            # A bare state dict (DiffDoctor's .bin) records no input size: 512 is assumed.
            det.input_size_assumed = input_size is None and saved is None
            det.source = ref if Path(ref) != DEFAULT_WEIGHTS else "dd default (synthetic artifacts)"
            note = getattr(model.config, "dd_init_note", None)
            if note:
                det.source = f"{ref} ({note})"
                del model.config.dd_init_note
            det.image_threshold = _image_threshold(model.config, ref)
        det.to(device=device, dtype=dtype)
        det.eval()
        if gradient_checkpointing:
            det.enable_gradient_checkpointing()
        return det

    # -- inference ---------------------------------------------------------------------------
    def working_size(self, height: int, width: int) -> tuple[int, int]:
        return self.input_size

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``B x 3 x H x W`` in [0, 1] -> normalised ``pixel_values`` at ``input_size``."""
        p = self._param()
        dt = torch.promote_types(images.dtype, torch.float32)
        x = images.to(device=p.device, dtype=dt)
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(
                x, size=self.input_size, mode="bilinear", align_corners=False, antialias=False
            )
        mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=dt).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device, dtype=dt).view(1, 3, 1, 1)
        return ((x - mean) / std).to(p.dtype)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        out = self.model(pixel_values=self.preprocess(images))
        return out.logits if hasattr(out, "logits") else out[0]

    # -- options ---------------------------------------------------------------------------------
    def _blocks(self) -> list[torch.nn.Module]:
        return [m for m in self.model.modules() if type(m).__name__ == "SegformerLayer"]

    def enable_gradient_checkpointing(self) -> SegformerDetector:
        """Recompute encoder blocks during backward (less memory, ~1 more forward), in train
        and eval mode alike. transformers' ``gradient_checkpointing_enable`` is not used: it
        only acts in training mode, and the treat engine differentiates in eval mode."""
        for block in self._blocks():
            block.forward = _CheckpointedForward(block)
        self.gradient_checkpointing = True
        return self

    def disable_gradient_checkpointing(self) -> SegformerDetector:
        for block in self._blocks():
            block.__dict__.pop("forward", None)
        self.gradient_checkpointing = False
        return self

    # -- saving / reporting -------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | os.PathLike) -> Path:
        """``config.json`` + ``model.safetensors`` (released key layout); ``load(out_dir)`` and
        ``SegformerForSemanticSegmentation.from_pretrained(out_dir)`` both read it."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        # Extra config attributes survive transformers' save/load; dd reads it back so a
        # detector trained at one input size is run at that size.
        self.model.config.dd_input_size = list(self.input_size)
        # The calibrated image threshold belongs to these weights only: written when set,
        # removed otherwise (a detector fine-tuned from a calibrated one is not calibrated).
        if self.image_threshold is not None:
            self.model.config.dd_image_threshold = float(self.image_threshold)
        elif hasattr(self.model.config, "dd_image_threshold"):
            delattr(self.model.config, "dd_image_threshold")
        self.model.save_pretrained(str(out))
        return out

    #: ``dd train-detector`` from scratch: the smallest ImageNet-size MiT.
    default_train_options: ClassVar[dict[str, Any]] = {"variant": "b0"}

    def load_pretrained_weights(self, folder: str | os.PathLike) -> None:
        """Load the weights :meth:`save_pretrained` wrote (strict), e.g. to resume training."""
        from safetensors.torch import load_file

        path = Path(folder) / "model.safetensors"
        try:
            weights = load_file(str(path))
        except Exception as e:
            raise DDError(f"cannot read {path}: {type(e).__name__}: {e}") from None
        self.model.load_state_dict(weights, strict=True)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(variant=self.variant, input_size=list(self.input_size))
        if getattr(self, "input_size_assumed", False):
            d["input_size_assumed"] = True  # the weights record none; 512 as DiffDoctor's
        return d


@hookimpl
def dd_register_detectors(register) -> None:
    register(SegformerDetector)
