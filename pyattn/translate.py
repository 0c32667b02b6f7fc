"""``pyattn translate``: the Bahdanau seq2seq (pyattn.models.seq2seq) on two small tasks.

- ``--task numerals``: digits -> Sino-Korean numerals (345 -> 삼백사십오), generated in code,
  character level, exact match on held-out numbers (never seen in training).
- ``--task ui``: English -> Korean UI strings from the jupyterlab-language-pack-ko-kr gettext
  catalogues (human translations), English words -> Korean characters, chrF/BLEU (sacrebleu) on
  a held-out split.

Both print sample translations and save attention heatmaps (PNG) that show the alignment.
"""

from __future__ import annotations

import argparse
import math
import random
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import torch

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3: the Seq2SeqConfig defaults pad 0, bos 1, eos 2

# ----------------------------------------------------------------------------- numerals

DIGITS = "영일이삼사오육칠팔구"
SMALL_UNITS = ("", "십", "백", "천")  # within a group of four digits
BIG_UNITS = ("", "만", "억", "조")  # groups of four digits (Korean counts in 10^4)


def _group(n: int, omit_leading_one: bool) -> str:
    """0 < n < 10000 in Sino-Korean. 일 is never read before 십/백/천 (천백십일 = 1110+1)."""
    out = []
    for power in (3, 2, 1, 0):
        d = n // 10**power % 10
        if d == 0:
            continue
        if power == 0:
            out.append("" if (d == 1 and omit_leading_one and n == 1) else DIGITS[d])
        else:
            out.append(("" if d == 1 else DIGITS[d]) + SMALL_UNITS[power])
    return "".join(out)


def sino_korean(n: int) -> str:
    """The Sino-Korean reading of ``n`` in Hangul, without spaces.

    Rules: digits 일..구, units 십/백/천 inside each group of four digits and 만/억/조 between
    groups; 일 is dropped before 십, 백 and 천 (십 = 10, 백십 = 110) and before 만 when the
    ten-thousands group is exactly one (만 = 10,000, 만 이천 = 12,000) but kept before 억 and 조
    (일억); zero groups are silent (10,005 = 만오); 0 = 영.

    Arguments:
        n: 0 <= n < 10**16.
    Returns:
        The numeral, e.g. 345 -> 삼백사십오.
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if not 0 <= n < 10**16:
        raise ValueError(f"n must be in [0, 10**16), got {n}")
    if n == 0:
        return DIGITS[0]
    parts = []
    for g in range(3, -1, -1):
        group = n // 10 ** (4 * g) % 10**4
        if group == 0:
            continue
        parts.append(_group(group, omit_leading_one=(g == 1)) + BIG_UNITS[g])
    return "".join(parts)


def numeral_pairs(
    count: int, max_value: int, rng: random.Random, exclude: set[int] = frozenset()
) -> list[int]:
    """``count`` distinct numbers in [1, max_value], none in ``exclude``."""
    if count > max_value - len(exclude):
        raise ValueError(
            f"count={count} distinct numbers do not fit in [1, {max_value}] minus {len(exclude)}"
        )
    out: set[int] = set()
    while len(out) < count:
        n = rng.randint(1, max_value)
        if n not in exclude:
            out.add(n)
    return sorted(out)


# ----------------------------------------------------------------------------- gettext catalogues


def read_mo(path: str | Path) -> dict[str, str]:
    """Parse a GNU gettext .mo file (the standard library's format description; no polib).

    Arguments:
        path: the .mo file.
    Returns:
        msgid -> msgstr for the singular, translated, non-header entries; an entry with a
        context (``ctx\\x04msgid``) is keyed by its msgid alone, plural forms by the singular
        msgid with the first translation.
    """
    data = Path(path).read_bytes()
    if len(data) < 28:
        raise ValueError(f"{path}: too short for a .mo file ({len(data)} bytes)")
    magic = struct.unpack_from("<I", data)[0]
    if magic == 0x950412DE:
        end = "<"
    elif magic == 0xDE120495:
        end = ">"
    else:
        raise ValueError(f"{path}: bad .mo magic {magic:#x} (expected 0x950412de)")
    _rev, n, orig_off, trans_off = struct.unpack_from(end + "4I", data, 4)
    catalog = {}
    for i in range(n):
        olen, opos = struct.unpack_from(end + "2I", data, orig_off + 8 * i)
        tlen, tpos = struct.unpack_from(end + "2I", data, trans_off + 8 * i)
        msgid = data[opos : opos + olen].decode("utf-8")
        msgstr = data[tpos : tpos + tlen].decode("utf-8")
        if not msgid or not msgstr:  # the header (empty msgid) or untranslated
            continue
        has_context = "\x04" in msgid
        msgid = msgid.split("\x04", 1)[-1].split("\x00", 1)[0]  # drop context, keep singular
        msgstr = msgstr.split("\x00", 1)[0]
        if has_context:  # an entry without context wins over the same msgid with one
            catalog.setdefault(msgid, msgstr)
        else:
            catalog[msgid] = msgstr
    return catalog


def ui_catalogue_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("jupyterlab_language_pack_ko_KR")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "jupyterlab-language-pack-ko-kr is not installed (pip install jupyterlab-language-pack-ko-kr)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "locale" / "ko_KR" / "LC_MESSAGES"


_PLACEHOLDER = re.compile(r"%\d|%[sd]|\{[^}]*\}|<[^>]*>|&\w+;")


def ui_pairs(max_chars: int = 40) -> list[tuple[str, str]]:
    """English -> Korean UI strings from every catalogue: deduplicated, one line, without
    placeholders or markup, short (<= max_chars each side), Korean side containing Hangul."""
    pairs = {}
    for mo in sorted(ui_catalogue_dir().glob("*.mo")):
        for en, ko in read_mo(mo).items():
            en, ko = en.strip(), ko.strip()
            if "\n" in en or "\n" in ko or _PLACEHOLDER.search(en) or _PLACEHOLDER.search(ko):
                continue
            if not (0 < len(en) <= max_chars and 0 < len(ko) <= max_chars):
                continue
            if not any("\uac00" <= c <= "\ud7a3" for c in ko):
                continue
            pairs.setdefault(en, ko)
    return sorted(pairs.items())


def english_tokens(text: str) -> list[str]:
    """Lower-cased words and punctuation."""
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


# ----------------------------------------------------------------------------- data plumbing


class Vocab:
    """Token <-> id, specials first (pad 0, bos 1, eos 2, unk 3)."""

    def __init__(self, tokens):
        self.itos = list(SPECIALS) + sorted(set(tokens) - set(SPECIALS))
        self.stoi = {t: i for i, t in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, tokens: list[str]) -> list[int]:
        return [self.stoi.get(t, 3) for t in tokens]

    def decode(self, ids: list[int]) -> list[str]:
        out = []
        for i in ids:
            if i == 2:  # eos
                break
            if i >= 4:
                out.append(self.itos[i])
        return out


@dataclass
class Task:
    name: str
    src_vocab: Vocab
    tgt_vocab: Vocab
    train: list[tuple[list[str], list[str]]]
    test: list[tuple[list[str], list[str]]]
    joiner: str  # how target tokens join back into text


def numerals_task(n_train: int = 6000, n_test: int = 500, max_value: int = 99_999, seed: int = 0) -> Task:
    """Digits -> Sino-Korean numerals, train and test numbers disjoint."""
    rng = random.Random(seed)
    test_n = numeral_pairs(n_test, max_value, rng)
    train_n = numeral_pairs(n_train, max_value, rng, exclude=set(test_n))
    train = [(list(str(n)), list(sino_korean(n))) for n in train_n]
    test = [(list(str(n)), list(sino_korean(n))) for n in test_n]
    return Task("numerals", Vocab("0123456789"), Vocab([c for _, t in train for c in t]), train, test, "")


def ui_task(test_fraction: float = 0.1, seed: int = 0) -> Task:
    """English words -> Korean characters, a seeded held-out split."""
    pairs = ui_pairs()
    random.Random(seed).shuffle(pairs)
    n_test = max(1, int(len(pairs) * test_fraction))
    data = [(english_tokens(en), list(ko)) for en, ko in pairs]
    train, test = data[n_test:], data[:n_test]
    src = Vocab([w for s, _ in train for w in s])
    tgt = Vocab([c for _, t in train for c in t])
    return Task("ui", src, tgt, train, test, "")


def batchify(pairs, src_vocab: Vocab, tgt_vocab: Vocab) -> tuple[torch.Tensor, torch.Tensor]:
    """(src (B, S) padded with 0, tgt (B, T) = bos + ids + eos, padded with 0)."""
    srcs = [src_vocab.encode(s) + [2] for s, _ in pairs]
    tgts = [[1] + tgt_vocab.encode(t) + [2] for _, t in pairs]
    src = torch.zeros(len(pairs), max(map(len, srcs)), dtype=torch.long)
    tgt = torch.zeros(len(pairs), max(map(len, tgts)), dtype=torch.long)
    for i, (s, t) in enumerate(zip(srcs, tgts, strict=True)):
        src[i, : len(s)] = torch.tensor(s)
        tgt[i, : len(t)] = torch.tensor(t)
    return src, tgt


# ----------------------------------------------------------------------------- train / evaluate


def build_model(task: Task, embed_dim=64, hidden_dim=128, attn_dim=64, dropout=0.1, attn_backend="fused"):
    from pyattn.models.seq2seq import Seq2Seq, Seq2SeqConfig

    cfg = Seq2SeqConfig(
        src_vocab_size=len(task.src_vocab),
        tgt_vocab_size=len(task.tgt_vocab),
        embed_dim=embed_dim,
        hidden_dim=hidden_dim,
        attn_dim=attn_dim,
        dropout=dropout,
        attn_backend=attn_backend,
    )
    return Seq2Seq(cfg)


def train(
    model, task: Task, steps: int, batch_size: int = 64, lr: float = 3e-3, seed: int = 0, log=None
) -> list[float]:
    """Adam with gradient clipping and cosine decay; teacher forcing. Returns the losses."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    rng = random.Random(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    pad = model.config.pad_id
    losses = []
    model.train()
    for step in range(steps):
        src, tgt = batchify(
            rng.sample(task.train, min(batch_size, len(task.train))), task.src_vocab, task.tgt_vocab
        )
        out = model(src, tgt)
        loss = torch.nn.functional.cross_entropy(
            out.logits.reshape(-1, out.logits.shape[-1]), tgt[:, 1:].reshape(-1), ignore_index=pad
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log is not None and (step + 1) % max(1, steps // 10) == 0:
            log(f"step {step + 1:5d}/{steps}  loss {sum(losses[-50:]) / len(losses[-50:]):.4f}")
    model.eval()
    return losses


@torch.no_grad()
def translate(model, task: Task, sources: list[list[str]], max_len: int = 60, batch_size: int = 256):
    """Greedy translations (token lists) and attention maps (L, S) per sentence."""
    model.eval()
    outs, maps = [], []
    for a in range(0, len(sources), batch_size):
        chunk = [(s, []) for s in sources[a : a + batch_size]]
        src, _ = batchify(chunk, task.src_vocab, task.tgt_vocab)
        tokens, attn = model.greedy_decode(src, max_len)
        for i, (s, _) in enumerate(chunk):
            words = task.tgt_vocab.decode(tokens[i].tolist())
            outs.append(words)
            maps.append(attn[i, : len(words) + 1, : len(s) + 1].clone())  # + eos on both sides
    return outs, maps


def evaluate(model, task: Task) -> dict:
    """Exact match, and chrF / BLEU (sacrebleu) on the held-out pairs."""
    import sacrebleu

    hyps, _ = translate(model, task, [s for s, _ in task.test])
    hyp_text = [task.joiner.join(h) for h in hyps]
    ref_text = [task.joiner.join(t) for _, t in task.test]
    exact = sum(h == r for h, r in zip(hyp_text, ref_text, strict=True)) / len(ref_text)
    chrf = sacrebleu.corpus_chrf(hyp_text, [ref_text]).score
    # BLEU over characters (tokenize="char"): Korean words are long and few, word BLEU on a
    # few hundred short strings is mostly zero.
    bleu = sacrebleu.corpus_bleu(hyp_text, [ref_text], tokenize="char").score
    return {"exact_match": exact, "chrf": chrf, "bleu_char": bleu, "hyps": hyp_text, "refs": ref_text}


# ----------------------------------------------------------------------------- heatmaps

_INITIALS = [
    "g",
    "kk",
    "n",
    "d",
    "tt",
    "r",
    "m",
    "b",
    "pp",
    "s",
    "ss",
    "",
    "j",
    "jj",
    "ch",
    "k",
    "t",
    "p",
    "h",
]
_MEDIALS = [
    "a",
    "ae",
    "ya",
    "yae",
    "eo",
    "e",
    "yeo",
    "ye",
    "o",
    "wa",
    "wae",
    "oe",
    "yo",
    "u",
    "wo",
    "we",
    "wi",
    "yu",
    "eu",
    "ui",
    "i",
]
_FINALS = [
    "",
    "k",
    "k",
    "ks",
    "n",
    "nj",
    "nh",
    "t",
    "l",
    "lk",
    "lm",
    "lb",
    "ls",
    "lt",
    "lp",
    "lh",
    "m",
    "p",
    "ps",
    "t",
    "t",
    "ng",
    "t",
    "t",
    "k",
    "t",
    "p",
    "t",
]


def romanize(text: str) -> str:
    """Revised-Romanisation-like transliteration, syllable by syllable (for plot labels when no
    Hangul font is installed)."""
    out = []
    for ch in text:
        code = ord(ch) - 0xAC00
        if 0 <= code < 11172:
            out.append(_INITIALS[code // 588] + _MEDIALS[code % 588 // 28] + _FINALS[code % 28])
        else:
            out.append(ch)
    return "".join(out)


def hangul_font():
    """A font with Hangul glyphs known to matplotlib (Nanum, Noto CJK, Un, Baekmuk), or None."""
    from matplotlib import font_manager

    for f in font_manager.fontManager.ttflist:
        if re.search(
            r"nanum|noto sans cjk|noto serif cjk|undotum|unbatang|baekmuk|malgun|applegothic", f.name, re.I
        ):
            return f.name
    return None


def save_heatmap(attn: torch.Tensor, src: list[str], tgt: list[str], path: Path, font: str | None) -> None:
    """One attention map: rows = output tokens (+ eos), columns = source tokens (+ eos)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [*src, "</s>"]
    ys = [t if t != " " else "␣" for t in tgt] + ["</s>"]  # show spaces as ␣
    if font is None:
        ys = [romanize(t) for t in ys]
        xs = [romanize(t) for t in xs]
    fig, ax = plt.subplots(figsize=(1 + 0.45 * len(xs), 1 + 0.4 * len(ys)))
    ax.imshow(attn[: len(ys), : len(xs)].float().numpy(), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    kw = {"fontfamily": font} if font else {}
    ax.set_xticks(range(len(xs)), xs, rotation=60, **kw)
    ax.set_yticks(range(len(ys)), ys, **kw)
    ax.set_xlabel("source")
    ax.set_ylabel("output" + ("" if font else " (romanised: no Hangul font)"))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- CLI

DEFAULTS = {"numerals": {"steps": 1500}, "ui": {"steps": 2000}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=("numerals", "ui"), default="numerals")
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps (default: numerals 1500, ui 2000)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attn-backend", choices=("fused", "reference"), default="fused")
    parser.add_argument("--out", type=Path, default=Path("translate-out"), help="folder for the heatmap PNGs")
    parser.add_argument("--samples", type=int, default=8, help="sample translations to print and plot")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: this small model only loses to thread overhead)",
    )


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(args.seed)
    task = numerals_task(seed=args.seed) if args.task == "numerals" else ui_task(seed=args.seed)
    print(
        f"task {task.name}: {len(task.train)} train / {len(task.test)} held-out pairs, "
        f"vocab {len(task.src_vocab)} -> {len(task.tgt_vocab)}"
    )
    model = build_model(task, attn_backend=args.attn_backend)
    steps = args.steps or DEFAULTS[args.task]["steps"]
    t0 = time.perf_counter()
    losses = train(model, task, steps, args.batch_size, args.lr, args.seed, log=print)
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
