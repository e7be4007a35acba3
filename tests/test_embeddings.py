"""Prompt embeddings on disk (issue 31): the store, the backbone's bounded cache, encoders
leaving after embedding, treat/DreamBooth/refine train reusing the store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_treat import base_config, fit_redness_detector

from dd.api.backbones import Conditioning
from dd.api.plugins import load_backbone
from dd.errors import DDError
from dd.runtime.embeddings import EmbeddingStore, default_cache_root
from dd.testing.tiny import tiny_pipeline_path


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory) -> Path:
    return tiny_pipeline_path("flux", tmp_path_factory)


def flux(model: Path, **options):
    opts = {"max_sequence_length": 32, **options}
    return load_backbone("flux", str(model), device="cpu", dtype=torch.float32, options=opts)


def count_encodes(monkeypatch) -> list[int]:
    from dd_plugins.flux import FluxBackbone

    calls: list[int] = []
    real = FluxBackbone.encode_prompts_uncached

    def counted(self, prompts):
        calls.append(len(prompts))
        return real(self, prompts)

    monkeypatch.setattr(FluxBackbone, "encode_prompts_uncached", counted)
    return calls


def test_the_store_round_trips_names_none_and_order(tmp_path):
    store = EmbeddingStore(tmp_path, "ns")
    a, b = torch.randn(1, 3, 4), torch.randn(1, 5)
    store.put("abcd", {"b": b, "none": None, "a": a})
    got = store.get("abcd")
    assert list(got) == ["b", "none", "a"] and got["none"] is None
    assert torch.equal(got["a"], a) and torch.equal(got["b"], b)
    assert store.get("missing") is None and len(store) == 1
    store.path("abcd").write_bytes(b"torn")  # a damaged file is recomputed, not an error
    assert store.get("abcd") is None


def test_the_default_root_follows_dd_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("DD_CACHE_DIR", str(tmp_path))
    assert default_cache_root() == tmp_path / "embeddings"
    monkeypatch.delenv("DD_CACHE_DIR")
    monkeypatch.setenv("DD_HOME", str(tmp_path / "home"))
    assert default_cache_root() == tmp_path / "home" / "embeddings"
    monkeypatch.delenv("DD_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_root() == tmp_path / "xdg" / "dd" / "embeddings"


def test_prompts_are_embedded_once_and_reused_by_another_run(tiny_flux, tmp_path, monkeypatch):
    calls = count_encodes(monkeypatch)
    prompts = [f"prompt number {i}" for i in range(10)]
    bb = flux(tiny_flux)
    bb.use_embedding_store(tmp_path)
    assert bb.embed_prompts(prompts, batch_size=4) == 10 and calls == [4, 4, 2]
    direct = flux(tiny_flux).encode_prompts(prompts[:3])  # no store: the encoders

    other = flux(tiny_flux)  # a later run of the same model: everything from disk
    other.use_embedding_store(tmp_path)
    assert other.embed_prompts(prompts) == 0 and len(calls) == 4
    got = other.encode_prompts(prompts[:3])
    assert len(calls) == 4
    for k, v in direct.tensors.items():
        torch.testing.assert_close(got.tensors[k], v, rtol=0, atol=1e-6)

    # another encoder setting is another namespace: nothing is mixed up
    longer = flux(tiny_flux, max_sequence_length=48)
    assert longer.embedding_namespace() != other.embedding_namespace()


def test_memory_holds_a_bounded_number_of_embeddings(tiny_flux, tmp_path, monkeypatch):
    bb = flux(tiny_flux)
    monkeypatch.setattr(type(bb), "prompt_memory", 5)
    bb.use_embedding_store(tmp_path)
    prompts = [f"p{i}" for i in range(23)]
    bb.embed_prompts(prompts)
    out = bb.encode_prompts(prompts)  # more prompts in one call than memory holds
    assert isinstance(out, Conditioning) and out.batch_size == 23
    assert len(bb._prompt_cache) == 5


def test_after_the_encoders_leave_prompts_come_from_the_store(tiny_flux, tmp_path):
    bb = flux(tiny_flux)
    bb.use_embedding_store(tmp_path)
    bb.embed_prompts(["a red cat", "a dog"])
    bb.release_text_encoders(free=True)
    assert bb.pipe.text_encoder is None and bb.pipe.text_encoder_2 is None
    assert bb.encode_prompts(["a dog", "a red cat"]).batch_size == 2
    with pytest.raises(DDError, match="was not embedded before the text encoders left"):
        bb.encode_prompts(["a prompt nobody embedded"])


def _treat_cfg(model, det, prompts, out, **kw):
    values = dict(train_steps=2, eval_every=2, save_every=1, eval_seeds=[0], batch_size=2)
    values.update(kw)
    return base_config(model, det, prompts, out, **values)


def _prompt_files(folder: Path, n: int) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.txt").write_text("".join(f"a photo of thing {i}\n" for i in range(n)))
    (folder / "eval.jsonl").write_text(json.dumps({"prompt": "a dog in the snow"}) + "\n")
    return folder / "train.txt", folder / "eval.jsonl"


def test_treat_memory_stays_flat_as_prompts_grow(tiny_flux, tmp_path, monkeypatch):
    """The embeddings a treat run holds in memory do not grow with the prompt list."""
    from dd.api.backbones import Backbone
    from dd.engines.treat import treat

    det = fit_redness_detector(tmp_path / "det")
    monkeypatch.setattr(Backbone, "prompt_memory", 4)
    real = Backbone._remember
    peak: list[int] = []

    def remember(self, key, cond):
        out = real(self, key, cond)
        held = sum(
            t.numel() * t.element_size()
            for c in self._prompt_cache.values()
            for t in c.tensors.values()
            if t is not None
        )
        peak[-1] = max(peak[-1], held)
        return out

    monkeypatch.setattr(Backbone, "_remember", remember)
    for n in (6, 12):
        peak.append(0)
        files = _prompt_files(tmp_path / f"p{n}", n)
        # 6 steps x 2 prompts draw every prompt: an unbounded cache would hold 7, then 13
        treat(_treat_cfg(tiny_flux, det, files, tmp_path / f"run{n}", train_steps=6))
    assert peak[0] > 0 and peak[0] == peak[1]


def test_a_resumed_treat_run_reuses_the_embeddings(tiny_flux, tmp_path, monkeypatch):
    from dd.engines.treat import treat

    det = fit_redness_detector(tmp_path / "det")
    files = _prompt_files(tmp_path / "prompts", 6)
    cache = tmp_path / "cache"
    calls = count_encodes(monkeypatch)
    run = tmp_path / "run"
    treat(_treat_cfg(tiny_flux, det, files, run, stop_at=1, embedding_cache=str(cache)))
    assert sum(calls) == 7  # 6 training prompts + 1 eval prompt, embedded once
    assert len(list(cache.glob("flux-*/*/*.safetensors"))) == 7
    calls.clear()
    r = treat(_treat_cfg(tiny_flux, det, files, run, resume=True, embedding_cache=str(cache)))
    assert r.step == 2 and calls == []  # nothing re-encoded


def test_vae_tiling_reaches_the_vae(tiny_flux, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    from dd.engines.treat import treat

    det = fit_redness_detector(tmp_path / "det")
    files = _prompt_files(tmp_path / "prompts", 2)
    seen = []
    real = AutoencoderKL.decode

    def decode(self, *a, **kw):
        seen.append(self.use_tiling)
        return real(self, *a, **kw)

    monkeypatch.setattr(AutoencoderKL, "decode", decode)
    treat(_treat_cfg(tiny_flux, det, files, tmp_path / "run", train_steps=1, vae_tiling=True))
    assert seen and all(seen)


@pytest.mark.parametrize("cache, offload", [("none", True), ("store", False)])
def test_embedding_cache_none_and_no_offload(cache, offload, tiny_flux, tmp_path, monkeypatch):
    """`--embedding-cache none` writes nothing to disk and keeps the encoders (the bounded
    memory cache is all there is); `--no-offload-text-encoders` keeps them too."""
    from dd.api.backbones import Backbone
    from dd.engines.treat import treat

    released: list[bool] = []
    monkeypatch.setattr(Backbone, "release_text_encoders", lambda self, **kw: released.append(True))
    monkeypatch.setenv("DD_CACHE_DIR", str(tmp_path / "default-cache"))
    det = fit_redness_detector(tmp_path / "det")
    files = _prompt_files(tmp_path / "prompts", 2)
    store = "none" if cache == "none" else str(tmp_path / "store")
    treat(_treat_cfg(tiny_flux, det, files, tmp_path / "run", train_steps=1,
                     embedding_cache=store, offload_text_encoders=offload))  # fmt: skip
    assert released == []
    assert not (tmp_path / "default-cache").exists()
    assert (tmp_path / "store").is_dir() == (cache == "store")
