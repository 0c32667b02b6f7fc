"""``pyattn train``: every model trains a few steps and writes its logs; a two-process DDP run
(gloo on CPU, torchrun) ends with identical parameters on both ranks."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import need

from pyattn.apps import train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository


def _args(model, out, **kw):
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    argv = [model, "--steps", "3", "--batch-size", "4", "--out", str(out), "--log-every", "1"]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return parser.parse_args(argv)


@pytest.mark.parametrize("model", ["seq2seq", "transformer", "bert"])
def test_train_writes_logs(model, tmp_path):
    plot = model == "transformer"  # one PNG is enough to prove the plot works
    if plot:
        need("matplotlib")
    args = _args(model, tmp_path, **({} if plot else {"no_plot": True}))
    assert train.run(args) == 0
    with open(tmp_path / "losses.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(math.isfinite(float(r["loss"])) and float(r["loss"]) > 0 for r in rows)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["model"] == model and summary["world_size"] == 1 and summary["loss_png"] == plot
    assert (tmp_path / "loss.png").exists() == plot


def test_train_rejects_bad_steps(tmp_path):
    with pytest.raises(ValueError, match="--steps"):
        train.run(_args("bert", tmp_path, steps=0))


def test_synthetic_batches_are_well_formed():
    g = torch.Generator().manual_seed(0)
    src, tgt = train.reversal_batch(g, 5, vocab=10, max_len=6)
    for b in range(5):
        n = int((src[b] != train.PAD).sum())
        assert tgt[b, 0] == train.BOS and tgt[b, n + 1] == train.EOS
        assert torch.equal(tgt[b, 1 : n + 1], src[b, :n].flip(0))
    ids, types, labels, nsp = train.mlm_batch(g, 4, vocab=10, max_len=11)
    assert ((labels != -100).sum(1) >= 1).all() and (ids[labels != -100] == train.MASK).all()
    assert set(nsp.tolist()) <= {0, 1} and types.max() == 1


def test_ddp_two_processes_end_with_identical_parameters(tmp_path):
    env = dict(
        os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1"
    )
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "pyattn", "train", "transformer", "--steps", "3", "--batch-size", "4",
        "--out", str(tmp_path), "--no-plot", "--dump-params",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    p0 = torch.load(tmp_path / "params_rank0.pt")
    p1 = torch.load(tmp_path / "params_rank1.pt")
    assert p0.keys() == p1.keys() and len(p0) > 0
    for k in p0:
        assert torch.equal(p0[k], p1[k]), f"{k} differs between ranks"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2
    # The ranks trained (the weights moved from the seed's initialisation).
    torch.manual_seed(0)
    init = train.Task("transformer", _args("transformer", tmp_path)).state_dict()
    assert any(not torch.equal(init[k], p0[k]) for k in p0)


def test_context_parallel_four_processes(tmp_path):
    """``pyattn train bert --context-parallel`` under torchrun with 4 CPU ranks: every sequence
    sharded over the ranks, gradients summed; the ranks end with identical parameters that moved
    from the initialisation (numerics against one process: tests/test_distributed.py)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
        "-m", "pyattn", "train", "bert", "--context-parallel", "--steps", "2", "--batch-size", "4",
        "--out", str(tmp_path), "--no-plot", "--dump-params",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    params = [torch.load(tmp_path / f"params_rank{r}.pt") for r in range(4)]
    for r in range(1, 4):
        assert params[r].keys() == params[0].keys()
        for k in params[0]:
            assert torch.equal(params[r][k], params[0][k]), f"{k} differs between ranks 0 and {r}"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 4 and summary["context_parallel"] is True
    assert math.isfinite(summary["final_loss"])
    torch.manual_seed(0)
    args = _args("bert", tmp_path)
    args.context_parallel = True
    init = train.Task("bert", args).state_dict()
    assert any(not torch.equal(init[k], params[0][k]) for k in params[0])
