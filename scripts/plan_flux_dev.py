"""The `dd treat --plan` estimates of FLUX.1-dev in docs/performance.md (no GPU, no weights).

FLUX.1-dev's transformer and VAE from their real configurations (dd.engines.bench), built on the
meta device with a rank-16 LoRA and a SegFormer-b5 detector at 512 (DiffDoctor's); the
flux-dev preset's sampling (10 steps, guidance 3.5, 256 T5 tokens); one treat step at
1024², K=1, batch 1, checkpointed, for bf16 and each --quantize mode. Text encoders
(T5-XXL encoder, CLIP-L) from their configurations, in bf16.

    python scripts/plan_flux_dev.py            # prints the markdown table
"""

from __future__ import annotations

import time

import torch

from dd.engines.bench import full_size_flux_setup
from dd.engines.plan import GIB, estimate_step
from dd.runtime.memory import tensor_bytes

TARGETS = {"none": 48, "int8": 28, "fp8": 28, "nf4": 20}


def text_encoder_bytes() -> int:
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    t5 = T5Config(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                  vocab_size=32128, feed_forward_proj="gated-gelu")  # fmt: skip
    clip = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, projection_dim=768)  # fmt: skip
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            models = [T5EncoderModel(t5), CLIPTextModel(clip)]
    finally:
        torch.set_default_dtype(torch.float32)
    return sum(tensor_bytes([*m.parameters(), *m.buffers()]) for m in models)


def main() -> None:
    t0 = time.perf_counter()
    setup = full_size_flux_setup(device=torch.device("meta"), dtype=torch.bfloat16, steps=10,
                                 lora_rank=16, max_sequence_length=256)  # fmt: skip
    text = text_encoder_bytes()
    rows = []
    for mode in ("none", "int8", "fp8", "nf4"):
        parts = estimate_step(setup, resolution=1024, grad_steps=1, checkpointing=True,
                              quantize=mode)  # fmt: skip
        rows.append((mode, parts, sum(parts.values())))
    print(f"| part | {' | '.join('bf16' if m == 'none' else m for m, _, _ in rows)} |")
    print("|---|" + "---|" * len(rows))
    for name in rows[0][1]:
        print(f"| {name} | " + " | ".join(f"{p[name] / GIB:.2f}" for _, p, _ in rows) + " |")
    print("| **one treat step (peak)** | "
          + " | ".join(f"**{t / GIB:.2f}**" for _, _, t in rows) + " |")  # fmt: skip
    base = rows[0][1]
    loading = base["denoiser (frozen)"] + base["VAE"] + base["detector"] + text
    print("| loading + embedding prompts (bf16 weights + text encoders) | "
          + " | ".join(f"{loading / GIB:.2f}" for _ in rows) + " |")  # fmt: skip
    print("| target for the step | " + " | ".join(f"<= {TARGETS[m]}" for m, _, _ in rows) + " |")
    print(f"\ntext encoders (bf16, on the GPU only while prompts are embedded): {text / GIB:.2f}"
          f" GiB; traced in {time.perf_counter() - t0:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
