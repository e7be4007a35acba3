"""``dd lora``: what a LoRA file is, and dd's LoRAs in the format every UI loads.

dd writes LoRAs in diffusers' format (``pytorch_lora_weights.safetensors``, loadable with
``pipe.load_lora_weights``): for SD1.5/SDXL UNet keys ``unet.<module>.lora.down.weight`` /
``.lora.up.weight``, for FLUX/SD3 ``transformer.<module>.lora_A.weight`` / ``lora_B``, with
the adapter's configuration (rank, alpha, targets) in the file's metadata.

* :func:`lora_info`: format (diffusers, kohya, peft), family (sd15, sdxl, flux, sd3, from
  the module names), rank, alpha, target modules, tensors and parameters of any LoRA file.
* :func:`export_kohya`: an SD1.5/SDXL LoRA as kohya-ss keys (``lora_unet_<module>
  .lora_down.weight``, ``.lora_up.weight``, ``.alpha``): the format AUTOMATIC1111, Forge and
  ComfyUI load (diffusers converts it back on ``load_lora_weights``, equal images: tested).
  The conversion is diffusers' own (``convert_state_dict_to_kohya``), with the file's real
  alpha (diffusers' writes alpha = rank). FLUX and SD3 files of dd already load in ComfyUI
  (``transformer.``-prefixed keys) and diffusers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from dd.errors import DDError, UsageError
from dd.runtime.checkpoint import LORA_FILE

__all__ = ["FORMATS", "export_kohya", "lora_info", "read_lora"]

FORMATS = ("kohya",)


def lora_file(path: str | Path, *, best: bool = False) -> Path:
    """The LoRA file of ``path``: a ``.safetensors`` file, a folder holding
    ``pytorch_lora_weights.safetensors`` (a run, its ``best/``), or with ``best`` the run's
    ``best/`` LoRA."""
    p = Path(path).expanduser()
    if best:
        p = p / "best"
    if p.is_dir():
        p = p / LORA_FILE
    if not p.is_file():
        raise DDError(
            f"LoRA not found: {p}",
            hint="pass a .safetensors file or a run folder (dd treat, dd dreambooth)",
        )
    return p


def read_lora(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The tensors and the metadata of a safetensors LoRA file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            meta = dict(f.metadata() or {})
    except Exception as e:
        raise DDError(
            f"cannot read {path} as safetensors: {type(e).__name__}",
            hint="a LoRA .safetensors file",
        ) from None
    return tensors, meta


def _format(keys: list[str]) -> str:
    if any(k.startswith(("lora_unet_", "lora_te", "lora_transformer_")) for k in keys):
        return "kohya"
    if any(".lora.down." in k or ".lora_A." in k or ".lora_linear_layer." in k for k in keys):
        return "peft" if any(k.startswith("base_model.model.") for k in keys) else "diffusers"
    return "unknown"


def _family(keys: list[str]) -> str:
    text = " ".join(keys)
    if "single_transformer_blocks" in text or "single_blocks" in text:
        return "flux"
    if "transformer_blocks" in text and ("context" in text or "add_q_proj" in text):
        return "sd3"
    if "unet" not in text:
        return "unknown"
    # SDXL's UNet has no attention in its first down block; SD1.5's has
    return "sd15" if re.search(r"down_blocks[._]0[._]attentions", text) else "sdxl"


def _adapter_config(meta: dict[str, str]) -> dict[str, Any]:
    """The PEFT adapter configuration diffusers stores in ``lora_adapter_metadata``."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except ValueError:
        return {}
    out: dict[str, Any] = {}
    for key, value in config.items():  # "unet.r" / "transformer.lora_alpha" / plain "r"
        out[key.split(".", 1)[-1] if "." in key else key] = value
    return out


def lora_info(path: str | Path, *, best: bool = False) -> dict[str, Any]:
    """Format, family, rank, alpha, targets, tensors and parameters of a LoRA file."""
    file = lora_file(path, best=best)
    tensors, meta = read_lora(file)
    keys = sorted(tensors)
    fmt = _format(keys)
    downs = {
        k: v
        for k, v in tensors.items()
        if any(s in k for s in (".lora.down.", ".lora_A.", ".lora_down.", "down.weight"))
        and v.ndim >= 2
    }
    ranks = sorted({int(v.shape[0]) for v in downs.values()})
    config = _adapter_config(meta)
    alphas = sorted({float(v) for k, v in tensors.items() if k.endswith(".alpha")})
    alpha: Any = config.get("lora_alpha")
    if alpha is None and alphas:
        alpha = alphas[0] if len(alphas) == 1 else alphas
    targets = config.get("target_modules")
    if not targets:
        names = set()
        for k in downs:
            stem = re.split(r"\.lora[._](?:down|A)|\.lora_down|\.lora\.down", k)[0]
            names.add(re.split(r"[._]", stem)[-1] if fmt == "kohya" else stem.split(".")[-1])
        targets = sorted(names)
    return {
        "file": str(file),
        "format": fmt,
        "family": _family(keys),
        "rank": ranks[0] if len(ranks) == 1 else ranks,
        "alpha": alpha if alpha is not None else (ranks[0] if len(ranks) == 1 else None),
        "alpha_from": "metadata"
        if config.get("lora_alpha") is not None
        else ("alpha tensors" if alphas else "none (loaders use alpha = rank)"),
        "targets": sorted(targets),
        "layers": len(downs),
        "tensors": len(tensors),
        "parameters": int(sum(v.numel() for v in tensors.values() if v.ndim >= 1)),
        "dtype": sorted({str(v.dtype).replace("torch.", "") for v in tensors.values()}),
    }


def export_kohya(
    path: str | Path, out: str | Path, *, best: bool = False, overwrite: bool = False
) -> Path:
    """Write the SD1.5/SDXL LoRA of ``path`` to ``out`` in kohya-ss format; returns ``out``."""
    import torch
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save

    from dd.runtime.io import atomic_write_bytes

    file = lora_file(path, best=best)
    out = Path(out).expanduser()
    if out.suffix != ".safetensors":
        raise UsageError(f"--out must name a .safetensors file, got {out}")
    if out.exists() and not overwrite:
        raise DDError(f"{out} exists", hint="pass --overwrite to replace it, or another --out")
    tensors, meta = read_lora(file)
    keys = list(tensors)
    fmt, family = _format(keys), _family(keys)
    if fmt == "kohya":
        raise DDError(f"{file} is already in kohya format", hint="it loads as it is")
    if family not in ("sd15", "sdxl") or fmt != "diffusers":
        raise DDError(
            f"kohya export is for SD1.5/SDXL LoRAs in diffusers format; {file} is {family} ({fmt})",
            hint="dd's FLUX and SD3 LoRAs (transformer.-prefixed) load as they are in ComfyUI "
            "and diffusers",
        )
    renames = ((".lora.down.weight", ".lora_A.weight"), (".lora.up.weight", ".lora_B.weight"))
    peft = {}
    for key, value in tensors.items():
        for old, new in renames:
            key = key.replace(old, new)
        peft[key] = value
    kohya = convert_state_dict_to_kohya(peft)
    config = _adapter_config(meta)
    alpha = config.get("lora_alpha")
    if alpha is not None:  # diffusers' converter writes alpha = rank
        for key in [k for k in kohya if k.endswith(".alpha")]:
            kohya[key] = torch.tensor(float(alpha))
    info = {"ss_network_module": "networks.lora", "dd_source": str(file), "dd_family": family}
    if config.get("r") is not None:
        info["ss_network_dim"] = str(config["r"])
    if alpha is not None:
        info["ss_network_alpha"] = str(alpha)
    data = save({k: v.contiguous() for k, v in kohya.items()}, metadata=info)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, data)
    return out
