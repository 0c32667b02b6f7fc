"""``pyattn translate``: train the seq2seq (or Transformer) demo on one task, score it, print samples,
save heatmaps."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from pyattn.apps import require
from pyattn.nn.multihead_attention import ATTN_BACKENDS

from .fonts import hangul_font
from .heatmap import save_heatmap
from .numerals import numerals_task
from .training import build_model, evaluate, train, translate
from .ui import ui_task

DEFAULTS = {"numerals": {"steps": 1500}, "ui": {"steps": 2000}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=("numerals", "ui"), default="numerals")
    parser.add_argument(
        "--model",
        choices=("seq2seq", "transformer"),
        default="seq2seq",
        help="Bahdanau GRU seq2seq, or the Transformer (decodes with its KV cache)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps (default: numerals 1500, ui 2000)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=None, help="default: seq2seq 3e-3, transformer 1e-3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attn-backend", choices=ATTN_BACKENDS, default="fused")
    parser.add_argument("--out", type=Path, default=Path("translate-out"), help="folder for the heatmap PNGs")
    parser.add_argument("--samples", type=int, default=8, help="sample translations to print and plot")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: this small model only loses to thread overhead)",
    )


def run(args: argparse.Namespace) -> int:
    # chrF/BLEU and the heatmaps always; the UI task reads the language pack's catalogues
    require(
        "translate",
        "sacrebleu",
        "matplotlib",
        *(["jupyterlab_language_pack_ko_KR"] if args.task == "ui" else []),
    )
    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(args.seed)
    task = numerals_task(seed=args.seed) if args.task == "numerals" else ui_task(seed=args.seed)
    print(
        f"task {task.name}: {len(task.train)} train / {len(task.test)} held-out pairs, "
        f"vocab {len(task.src_vocab)} -> {len(task.tgt_vocab)}"
    )
    model = build_model(task, attn_backend=args.attn_backend, model=args.model)
    steps = args.steps or DEFAULTS[args.task]["steps"]
    lr = args.lr if args.lr is not None else (3e-3 if args.model == "seq2seq" else 1e-3)
    t0 = time.perf_counter()
    losses = train(model, task, steps, args.batch_size, lr, args.seed, log=print)
    print(
        f"trained {steps} steps in {time.perf_counter() - t0:.0f} s, final loss {sum(losses[-50:]) / len(losses[-50:]):.4f}"
    )
    res = evaluate(model, task)
    print(
        f"held-out: exact match {100 * res['exact_match']:.1f}%  chrF {res['chrf']:.1f}  BLEU(char) {res['bleu_char']:.1f}"
    )
    font = hangul_font()
    if font is None:
        print("note: no Hangul font found by matplotlib (install fonts-nanum); heatmap labels are romanised")
    args.out.mkdir(parents=True, exist_ok=True)
    stride = max(1, len(task.test) // max(1, args.samples))
    picks = task.test[::stride][: args.samples]  # spread over the (sorted) held-out set
    hyps, maps = translate(model, task, [s for s, _ in picks])
    sep = "" if task.name == "numerals" else " "
    for k, ((src, ref), hyp, attn) in enumerate(zip(picks, hyps, maps, strict=True)):
        mark = "ok " if hyp == ref else "   "
        print(f"{mark}{sep.join(src):>40}  ->  {task.joiner.join(hyp)}    (ref {task.joiner.join(ref)})")
        save_heatmap(attn, src, hyp, args.out / f"{task.name}-{k}.png", font)
    print(f"attention heatmaps: {args.out}/{task.name}-*.png")
    return 0
