"""Image-text scoring models with local weights: CLIP score, PickScore and ImageReward.

Used by ``dd eval gen`` (its metric columns) and by the quality scorers of the same names
(``dd treat --quality clip``, ``pickscore``, ``imagereward``: dd_plugins.scorers). dd
downloads nothing: each takes a local folder (or file) the user provides.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dd.errors import DDError


class ClipModel:
    """CLIP score or PickScore from a local transformers ``CLIPModel`` folder."""

    def __init__(self, path: str, device: torch.device, *, what: str):
        from transformers import CLIPModel, CLIPProcessor

        p = Path(path).expanduser()
        if not p.is_dir():
            raise DDError(
                f"{what} needs local weights: {p} is not a folder",
                hint="pass a folder saved with CLIPModel/CLIPProcessor.save_pretrained",
            )
        try:
            self.model = CLIPModel.from_pretrained(str(p), local_files_only=True).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(str(p), local_files_only=True)
        except (OSError, ValueError) as e:
            raise DDError(
                f"cannot load {what} model from {p}: {str(e).splitlines()[0]}",
                hint="the folder needs a CLIPModel and its processor (tokenizer + image processor)",
            ) from None
        self.device = device

    @torch.no_grad()
    def cosines(self, images: np.ndarray, prompts: Sequence[str]) -> torch.Tensor:
        inputs = self.processor(
            text=list(prompts),
            images=list(images),
            return_tensors="pt",
            padding="max_length",
            truncation=True,
        ).to(self.device)
        img = self.model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = self.model.get_text_features(
            input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")
        )
        img = _as_embeds(img)
        txt = _as_embeds(txt)
        return F.cosine_similarity(img.float(), txt.float(), dim=-1).cpu()


def _as_embeds(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for key in ("pooler_output", "image_embeds", "text_embeds"):
        t = getattr(out, key, None)
        if t is not None:
            return t
    raise DDError("unexpected output of the CLIP model")


def clip_scores(scorer: ClipModel, images: np.ndarray, prompts: Sequence[str]) -> list[float]:
    """CLIP score per image (torchmetrics' definition): ``100 * max(cos, 0)``."""
    return [100 * max(float(c), 0.0) for c in scorer.cosines(images, prompts)]


def pick_scores(scorer: ClipModel, images: np.ndarray, prompts: Sequence[str]) -> list[float]:
    """PickScore per image: ``exp(logit_scale) * cos`` of the PickScore CLIP model."""
    scale = float(scorer.model.logit_scale.detach().exp())
    return [scale * float(c) for c in scorer.cosines(images, prompts)]


class ImageRewardModel:
    def __init__(self, path: str, device: torch.device):
        p = Path(path).expanduser()
        try:
            import ImageReward as reward  # noqa: N813 - the package's own name
        except ImportError:
            raise DDError(
                "ImageReward needs the image-reward package and local weights",
                hint=f"pip install image-reward; put ImageReward.pt and med_config.json in {p}",
            ) from None
        weights = p / "ImageReward.pt" if p.is_dir() else p
        config = weights.parent / "med_config.json"
        if not weights.is_file() or not config.is_file():
            raise DDError(
                f"ImageReward needs local weights at {weights} and {config}",
                hint="download ImageReward.pt and med_config.json yourself; dd downloads nothing",
            )
        self.model = reward.load(str(weights), device=str(device), med_config=str(config))

    @torch.no_grad()
    def scores(self, images: np.ndarray, prompts: Sequence[str]) -> list[float]:
        from PIL import Image

        return [
            float(self.model.score(p, [Image.fromarray(im)]))
            for im, p in zip(images, prompts, strict=True)
        ]
