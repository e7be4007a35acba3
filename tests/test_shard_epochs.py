"""Training over shards split across processes and loader workers (issue 34): an epoch reads
every sample exactly once across 2 processes x 2 workers, through train-detector's dataset,
sampler and loader (``dd.data.sampler.epoch_loader``) prepared by accelerate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from tests.helpers import free_port
from tests.test_shards import make_shards

SCRIPT = r"""
import json, sys
import torch
from accelerate import Accelerator
from dd.data.augment import AugmentConfig
from dd.data.datasets import read_dataset
from dd.data.sampler import EpochSampler, epoch_loader
from dd.engines.train_detector import _TrainSet

spec, out, batch, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
acc = Accelerator(cpu=True)
samples = read_dataset(spec)


class Probe(_TrainSet):  # the real item (image read from its shard, augmented) + who read it
    def __getitem__(self, key):
        item = super().__getitem__(key)
        assert not item["error"], item["error"]
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else -1
        return {"index": item["index"], "worker": worker, "shape": list(item["image"].shape)}


def collate(items):
    return items


data = Probe(samples, AugmentConfig(size=(16, 16)), strong_pseudo=False)
sampler = EpochSampler(len(samples), seed=3, multiple=batch * acc.num_processes)
loader = acc.prepare(epoch_loader(data, sampler, batch_size=batch, workers=workers, seed=3,
                                  collate_fn=collate))
seen = []
for epoch in range(2):
    sampler.epoch, sampler.start = epoch, 0
    for items in loader:
        seen += [{"epoch": epoch, "rank": acc.process_index, **it} for it in items]
with open(f"{out}/seen-{acc.process_index}.json", "w") as f:
    json.dump({"seen": seen, "paths": [str(s.image) for s in samples]}, f)
"""


def test_every_sample_once_per_epoch_across_two_processes_and_two_workers(tmp_path):
    folder = make_shards(tmp_path / "shards", n_shards=3, per=8)  # 24 samples
    spec = str(folder / "{000000..000002}.tar")
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    port = free_port()
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc-per-node", "2", "--master-port", str(port), str(script)]
    cmd += [spec, str(tmp_path), "2", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = [json.loads((tmp_path / f"seen-{r}.json").read_text()) for r in (0, 1)]
    n = len(runs[0]["paths"])
    assert n == 24 and runs[0]["paths"] == runs[1]["paths"]
    seen = runs[0]["seen"] + runs[1]["seen"]
    for epoch in (0, 1):
        got = Counter(x["index"] for x in seen if x["epoch"] == epoch)
        assert sorted(got) == list(range(n)), "a sample was missed"
        assert set(got.values()) == {1}, "a sample was read twice"
        readers = {(x["rank"], x["worker"]) for x in seen if x["epoch"] == epoch}
        assert readers == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert all(x["shape"] == [3, 16, 16] for x in seen)
    # epochs are shuffled: a process reads other samples in epoch 1
    by = {e: {x["index"] for x in runs[0]["seen"] if x["epoch"] == e} for e in (0, 1)}
    assert by[0] != by[1]
