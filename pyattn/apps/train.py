"""``pyattn train {seq2seq,transformer,bert}``: tiny models on synthetic tasks, on CPU, in minutes.

Tasks (generated on the fly, so nothing is downloaded):
- seq2seq: reverse a random token sequence (Seq2Seq with Bahdanau attention).
- transformer: the same reversal with the encoder-decoder Transformer (+ embeddings).
- bert: masked-LM + next-sentence prediction on generated "text" (arithmetic token patterns).

Writes to ``--out``: ``losses.csv`` (step, loss, seconds), ``summary.json`` and ``loss.png``.
Runs unchanged under ``torchrun --nproc_per_node=N`` (DistributedDataParallel, gloo on CPU):
each rank draws its own batches, DDP averages the gradients, rank 0 writes the logs. With
``--context-parallel`` (bert) the ranks instead share every batch: each sequence is sharded over
them and attention runs as ``pyattn.distributed.ring_attention`` (docs/design.md, "Context
parallelism"); each rank's loss is its share and the gradients are summed over the ranks.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyattn.nn.multihead_attention import ATTN_BACKENDS

PAD, BOS, EOS, MASK, CLS, SEP = 0, 1, 2, 3, 4, 5
FIRST = 6  # first ordinary token id


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", choices=["seq2seq", "transformer", "bert"], help="which model to train")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps (default: 300 seq2seq, 600 transformer, 1000 bert)",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="sentences per step and rank")
    parser.add_argument(
        "--lr", type=float, default=None, help="Adam learning rate (default: 3e-3, BERT 1e-3)"
    )
    parser.add_argument("--out", default=None, help="output folder (default runs/train-MODEL)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (model init and data)")
    parser.add_argument("--attn-backend", choices=ATTN_BACKENDS, default="fused")
    parser.add_argument("--vocab", type=int, default=24, help="ordinary tokens in the synthetic vocabulary")
    parser.add_argument("--max-len", type=int, default=10, help="longest synthetic sequence")
    parser.add_argument("--log-every", type=int, default=10, help="print/log every N steps")
    parser.add_argument("--no-plot", action="store_true", help="skip the loss-curve PNG")
    parser.add_argument(
        "--dump-params", action="store_true", help="save every rank's final parameters (params_rankR.pt)"
    )
    parser.add_argument(
        "--context-parallel",
        action="store_true",
        help="under torchrun: shard each sequence over the ranks (ring attention) instead of "
        "data parallelism (bert only)",
    )


# -- synthetic data --------------------------------------------------------------------------------


def _random_lengths(g: torch.Generator, B: int, lo: int, hi: int) -> Tensor:
    return torch.randint(lo, hi + 1, (B,), generator=g)


def reversal_batch(g: torch.Generator, B: int, vocab: int, max_len: int) -> tuple[Tensor, Tensor]:
    """src (B, S) random tokens padded with PAD; tgt (B, T) = BOS + reversed(src) + EOS."""
    lengths = _random_lengths(g, B, 2, max_len)
    src = torch.full((B, max_len), PAD, dtype=torch.long)
    tgt = torch.full((B, max_len + 2), PAD, dtype=torch.long)
    tgt[:, 0] = BOS
    for b, n in enumerate(lengths.tolist()):
        tokens = torch.randint(FIRST, FIRST + vocab, (n,), generator=g)
        src[b, :n] = tokens
        tgt[b, 1 : n + 1] = tokens.flip(0)
        tgt[b, n + 1] = EOS
    return src, tgt


def mlm_batch(g: torch.Generator, B: int, vocab: int, max_len: int):
    """[CLS] A [SEP] B [SEP] where each segment is an arithmetic pattern (start + i*step mod
    vocab); B continues A's pattern half the time (NSP label 0) or is a fresh one (label 1).
    15% of the pattern tokens are masked (MLM labels there, -100 elsewhere)."""
    n = max(2, (max_len - 3) // 2)
    L = 2 * n + 3
    ids = torch.full((B, L), PAD, dtype=torch.long)
    types = torch.zeros(B, L, dtype=torch.long)
    nsp = torch.randint(0, 2, (B,), generator=g)
    for b in range(B):
        start, step = torch.randint(0, vocab, (2,), generator=g).tolist()
        step = step % 5 + 1
        a = [(start + i * step) % vocab for i in range(n)]
        if nsp[b] == 0:
            s2 = [(start + (n + i) * step) % vocab for i in range(n)]
        else:
            s2_start, s2_step = torch.randint(0, vocab, (2,), generator=g).tolist()
            s2 = [(s2_start + i * (s2_step % 5 + 1)) % vocab for i in range(n)]
        ids[b] = torch.tensor([CLS] + [FIRST + t for t in a] + [SEP] + [FIRST + t for t in s2] + [SEP])
        types[b, n + 2 :] = 1
    special = (ids == CLS) | (ids == SEP)
    masked = (torch.rand(B, L, generator=g) < 0.15) & ~special
    masked[:, 1] |= ~masked.any(1)  # at least one MLM target per sentence
    labels = torch.where(masked, ids, torch.full_like(ids, -100))
    inputs = torch.where(masked, torch.full_like(ids, MASK), ids)
    return inputs, types, labels, nsp


# -- models and their losses -----------------------------------------------------------------------


class TransformerSeq2Seq(nn.Module):
    """Token embeddings + sinusoidal positions + pyattn's Transformer + an output layer."""

    def __init__(
        self, vocab: int, d_model: int = 32, nhead: int = 4, layers: int = 2, attn_backend: str = "fused"
    ):
        super().__init__()
        from pyattn.models.transformer import Transformer

        self.d_model = d_model
        self.embed = nn.Embedding(vocab, d_model, padding_idx=PAD)
        self.transformer = Transformer(
            d_model=d_model, nhead=nhead, num_encoder_layers=layers, num_decoder_layers=layers,
            dim_feedforward=2 * d_model, dropout=0.1, batch_first=True, attn_backend=attn_backend,
        )  # fmt: skip
        self.generator = nn.Linear(d_model, vocab)
        pos = torch.arange(64)[:, None] * torch.exp(
            torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model)
        )
        pe = torch.zeros(64, d_model)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos), torch.cos(pos)
        self.register_buffer("pe", pe, persistent=False)

    def _embed(self, ids: Tensor) -> Tensor:
        return self.embed(ids) * math.sqrt(self.d_model) + self.pe[: ids.shape[1]]  # (B, T, d)

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        T = tgt_in.shape[1]
        causal = self.transformer.generate_square_subsequent_mask(T, device=src.device)
        src_pad = src == PAD
        h = self.transformer(
            self._embed(src), self._embed(tgt_in), tgt_mask=causal, tgt_is_causal=True,
            src_key_padding_mask=src_pad, memory_key_padding_mask=src_pad,
            tgt_key_padding_mask=tgt_in == PAD,
        )  # fmt: skip
        return self.generator(h)  # (B, T, V)


class Task(nn.Module):
    """One model and its synthetic task; ``forward(batch)`` returns (loss, accuracy) so that
    DistributedDataParallel wraps a plain tensor-returning module."""

    def __init__(self, name: str, args) -> None:
        super().__init__()
        self.name = name
        V = FIRST + args.vocab
        if name == "seq2seq":
            from pyattn.models.seq2seq import Seq2Seq, Seq2SeqConfig

            self.model = Seq2Seq(
                Seq2SeqConfig(V, V, embed_dim=32, hidden_dim=64, attn_dim=32, dropout=0.1,
                              pad_id=PAD, bos_id=BOS, eos_id=EOS, attn_backend=args.attn_backend)
            )  # fmt: skip
        elif name == "transformer":
            self.model = TransformerSeq2Seq(V, attn_backend=args.attn_backend)
        else:
            from pyattn.models.bert import BertConfig, BertForPreTraining

            cp = getattr(args, "context_parallel", False)
            self.model = BertForPreTraining(
                BertConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=64, pad_token_id=PAD,
                           attn_backend=args.attn_backend,
                           # ring attention runs without attention dropout
                           attention_probs_dropout_prob=0.0 if cp else 0.1)
            )  # fmt: skip
        self.cp_layout = None

    def set_context_parallel(self, L: int) -> None:
        """Shard sequences of length L over the world (zigzag where L divides into 2P chunks)."""
        import torch.distributed as dist

        P = dist.get_world_size()
        self.cp_layout = "zigzag" if L % (2 * P) == 0 else "contiguous"
        self.model.set_context_parallel(dist.group.WORLD, self.cp_layout)

    def batch(self, g: torch.Generator, args) -> tuple[Tensor, ...]:
        if self.name == "bert":
            return mlm_batch(g, args.batch_size, args.vocab, args.max_len)
        return reversal_batch(g, args.batch_size, args.vocab, args.max_len)

    def forward(self, *batch: Tensor) -> tuple[Tensor, Tensor]:
        if self.name == "seq2seq":
            src, tgt = batch
            logits = self.model(src, tgt).logits  # (B, T-1, V)
            target = tgt[:, 1:]
        elif self.name == "transformer":
            src, tgt = batch
            logits = self.model(src, tgt[:, :-1])  # (B, T-1, V)
            target = tgt[:, 1:]
        else:
            ids, types, labels, nsp = batch
            if self.cp_layout is not None:
                from pyattn.distributed import shard_sequence

                ids, types, labels = (
                    shard_sequence(t, 1, layout=self.cp_layout) for t in (ids, types, labels)
                )
                out = self.model(ids, token_type_ids=types, labels=labels, next_sentence_label=nsp)
                hit = out.prediction_logits.argmax(-1) == labels
                return out.loss, hit[labels != -100].float().mean().nan_to_num(0.0)
            out = self.model(
                ids, attention_mask=ids != PAD, token_type_ids=types, labels=labels, next_sentence_label=nsp
            )
            hit = out.prediction_logits.argmax(-1) == labels
            return out.loss, hit[labels != -100].float().mean()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=PAD)
        real = target != PAD
        return loss, (logits.argmax(-1) == target)[real].float().mean()


# -- the loop ------------------------------------------------------------------------------------


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="train", unit="step")


def _plot(rows: list[dict], path: str, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# Per-model defaults that reach a clearly trained state on CPU in a few minutes.
DEFAULT_STEPS = {"seq2seq": 300, "transformer": 600, "bert": 1000}
DEFAULT_LR = {"seq2seq": 3e-3, "transformer": 3e-3, "bert": 1e-3}


def run(args) -> int:
    if args.steps is None:
        args.steps = DEFAULT_STEPS[args.model]
    if args.lr is None:
        args.lr = DEFAULT_LR[args.model]
    if args.steps < 1 or args.batch_size < 1:
        raise ValueError(f"--steps and --batch-size must be >= 1, got {args.steps} and {args.batch_size}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = world > 1
    rank = 0
    if distributed:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank = dist.get_rank()
    out = args.out or os.path.join("runs", f"train-{args.model}")
    if rank == 0:
        os.makedirs(out, exist_ok=True)

    cp = getattr(args, "context_parallel", False)
    if cp and args.model != "bert":
        raise ValueError(f"--context-parallel runs the bert model, got {args.model}")
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    task = Task(args.model, args)
    n_params = sum(p.numel() for p in task.parameters())
    model: nn.Module = task
    if distributed and cp:
        task.set_context_parallel(task.batch(torch.Generator().manual_seed(0), args)[0].shape[1])
    elif distributed:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(task)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    # each rank its own batches; under context parallelism every rank the same batch
    g = torch.Generator().manual_seed(args.seed * 1000 + 1 + (0 if cp else rank))
    torch.manual_seed(args.seed * 1000 + 7 + rank)  # dropout

    bar = _progress(args.steps, rank == 0)
    rows: list[dict] = []
    t0 = time.perf_counter()
    model.train()
    for step in range(1, args.steps + 1):
        loss, acc = model(*task.batch(g, args))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if distributed and cp:
            import torch.distributed as dist

            # each rank's loss is its share of the batch's: the gradient is the sum (the pooler's
            # only on rank 0, which holds the first token)
            for p in model.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        stats = torch.stack([loss.detach(), acc.detach()])
        if distributed:
            import torch.distributed as dist

            dist.all_reduce(stats)
            stats /= torch.tensor([1.0 if cp else world, world])
        if step % args.log_every == 0 or step == 1 or step == args.steps:
            row = {
                "step": step,
                "loss": stats[0].item(),
                "accuracy": stats[1].item(),
                "seconds": time.perf_counter() - t0,
            }
            rows.append(row)
            if bar is None and rank == 0:
                print(
                    f"step {step:5d}  loss {row['loss']:.4f}  acc {row['accuracy']:.3f}  {row['seconds']:.1f}s",
                    flush=True,
                )
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{stats[0].item():.4f}", acc=f"{stats[1].item():.3f}")
    if bar is not None:
        bar.close()

    if args.dump_params:
        os.makedirs(out, exist_ok=True)
        torch.save(
            {k: v.detach().clone() for k, v in task.state_dict().items()},
            os.path.join(out, f"params_rank{rank}.pt"),
        )
    if rank == 0:
        with open(os.path.join(out, "losses.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["step", "loss", "accuracy", "seconds"])
            w.writeheader()
            w.writerows(rows)
        plotted = (
            False
            if args.no_plot
            else _plot(rows, os.path.join(out, "loss.png"), f"pyattn train {args.model}")
        )
        summary = {
            "model": args.model,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "world_size": world,
            "context_parallel": bool(cp and distributed),
            "attn_backend": args.attn_backend,
            "seed": args.seed,
            "parameters": n_params,
            "first_loss": rows[0]["loss"],
            "final_loss": rows[-1]["loss"],
            "final_accuracy": rows[-1]["accuracy"],
            "seconds": rows[-1]["seconds"],
            "loss_png": plotted,
        }
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(f"{args.model}: loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}, "
              f"accuracy {summary['final_accuracy']:.3f}, {summary['seconds']:.1f}s; logs in {out}")  # fmt: skip
    if distributed:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return 0
