"""The benchmark cases of the models (groups "bert", "transformer", "seq2seq"): a forward and a
training step through pyattn against the reference path and the real libraries (transformers,
torch.nn.Transformer), and BERT on a padded batch, padding-free."""

from __future__ import annotations

import itertools

import torch
from pyattn.bench._case import (
    DTYPES,
    Case,
    importable,
    set_attn_backend,
    train_step,
)

_DEFAULT_BERT = (("layers", 4), ("hidden", 768), ("heads", 12))


def build_bert(case: Case):
    from pyattn.models.bert import BertConfig, BertModel

    d = case.dims
    B, L, layers, hidden, heads = d["B"], d["L"], d["layers"], d["hidden"], d["heads"]
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=max(512, L),
    )
    model = BertModel(config).to(device=case.device, dtype=DTYPES[case.dtype])
    set_attn_backend(model, case.provider)
    ids = torch.randint(0, config.vocab_size, (B, L), device=case.device)
    mask = torch.ones(B, L, dtype=torch.long, device=case.device)
    if case.mode == "fwd":
        model.eval()

        def step():
            with torch.no_grad():
                return model(ids, attention_mask=mask).last_hidden_state

        return step
    return train_step(
        model, lambda: model(ids, attention_mask=mask).last_hidden_state.float().square().mean()
    )


# BERT on padded batches (lengths uniform in [L/4, L], drawn from a fixed generator seed): pyattn's
# padding-free path against transformers' BertModel on torch's SDPA with the same weights, and
# against pyattn's own padded path. A user with a padded batch would otherwise pick HF + sdpa.
_PADDED_BERT_PROVIDERS = ("transformers-sdpa", "pyattn-padded", "pyattn-padding-free")


def _padded_bert_lengths(B: int, L: int) -> torch.Tensor:
    return torch.randint(L // 4, L + 1, (B,), generator=torch.Generator().manual_seed(0))


def build_bert_padded_batch(case: Case):
    from pyattn.models.bert import BertConfig, BertModel

    d = case.dims
    B, L, layers, hidden, heads = d["B"], d["L"], d["layers"], d["hidden"], d["heads"]
    dtype = DTYPES[case.dtype]
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=max(512, L),
        padding_free=case.provider == "pyattn-padding-free",
    )
    model = BertModel(config)
    if case.provider == "transformers-sdpa":
        import transformers

        hf_config = transformers.BertConfig(
            **{k: v for k, v in config.to_dict().items() if k not in ("attn_backend", "padding_free")},
            attn_implementation="sdpa",
        )
        hf = transformers.BertModel(hf_config)
        missing = hf.load_state_dict(model.state_dict(), strict=False).missing_keys
        if [k for k in missing if not k.endswith("_ids")]:
            raise RuntimeError(f"transformers' BertModel did not take pyattn's weights: {missing[:4]}")
        model = hf
    model = model.to(device=case.device, dtype=dtype)
    ids = torch.randint(1, config.vocab_size, (B, L), device=case.device)
    keep = torch.arange(L)[None] < _padded_bert_lengths(B, L)[:, None]  # (B, L)
    mask = keep.long().to(case.device)
    weight = keep.to(case.device, dtype)[..., None] / keep.sum()  # the loss reads real tokens only

    def forward():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state

    if case.mode == "fwd":
        model.eval()

        def step():
            with torch.no_grad():
                return forward()

        return step
    return train_step(model, lambda: (forward().float().square() * weight).sum())


def padded_bert_cases(device: str, suite: str, dtypes: list[str]) -> list[Case]:
    dt = (dtypes or ["fp32" if device == "cpu" else "bf16"])[0]
    base = (("layers", 12), ("hidden", 768), ("heads", 12))
    if suite == "quick":
        grid = [(2, 32, (("layers", 2), ("hidden", 64), ("heads", 2)))]
    elif suite == "default":
        grid = [(8, 128, _DEFAULT_BERT)]
    else:  # BERT-base B=32 L=512 takes many seconds a step on a 2-core CPU
        grid = [(B, L, base) for B in (8, 32) for L in (128, 512)]
    have_hf = importable("transformers")
    if not have_hf:
        print("note: transformers is not installed here; padded BERT is compared with pyattn's padded path")
    providers = [p for p in _PADDED_BERT_PROVIDERS if have_hf or p != "transformers-sdpa"]
    cases = []
    for (B, L, model_shape), mode in itertools.product(grid, ("fwd", "train")):
        shape = (("B", B), ("L", L), ("lengths", "U[L/4,L]"), *model_shape)
        for prov in providers:
            cases.append(
                Case(
                    group="bert",
                    provider=prov,
                    baseline=providers[0],
                    mode=mode,
                    shape=shape,
                    dtype=dt,
                    device=device,
                    seq_len=L,
                    builder=build_bert_padded_batch,
                )  # fmt: skip
            )
    return cases


def build_transformer(case: Case):
    from pyattn.models.transformer import Transformer

    d = case.dims
    B, L, E, heads = d["B"], d["L"], d["d_model"], d["nhead"]
    dtype = DTYPES[case.dtype]
    torch.manual_seed(0)
    layers = d.get("layers", 6)
    kw = {
        "d_model": E,
        "nhead": heads,
        "num_encoder_layers": layers,
        "num_decoder_layers": layers,
        "dim_feedforward": 4 * E,
        "dropout": 0.0,
        "batch_first": True,
    }
    if case.provider == "torch.nn.Transformer":
        model = torch.nn.Transformer(**kw)
    else:
        model = Transformer(**kw)
    model = model.to(device=case.device, dtype=dtype).eval()
    if case.provider != "torch.nn.Transformer":
        set_attn_backend(model, case.provider)
    src = torch.randn(B, L, E, device=case.device, dtype=dtype)
    tgt = torch.randn(B, L, E, device=case.device, dtype=dtype)
    tgt_mask = torch.nn.Transformer.generate_square_subsequent_mask(L, device=case.device, dtype=dtype)

    def step():
        with torch.no_grad():
            return model(src, tgt, tgt_mask=tgt_mask, tgt_is_causal=True)

    return step


def build_transformer_decode(case: Case):
    """Greedy Transformer.generate of ``new`` tokens (no eos) from a (B, S) source, with the KV
    cache ("kv-cache") or rerunning the decoder over the prefix each step ("no-cache")."""
    from pyattn.models.transformer import Transformer

    d = case.dims
    B, S, E, new, vocab = d["B"], d["S"], d["d_model"], d["new"], d["vocab"]
    dtype = DTYPES[case.dtype]
    torch.manual_seed(0)
    f = {"device": case.device, "dtype": dtype}
    model = Transformer(E, d["nhead"], d["layers"], d["layers"], 4 * E, 0.0, batch_first=True, **f).eval()
    tok = torch.nn.Embedding(vocab, E, **f)
    pos = torch.randn(new + 1, E, **f) * 0.1
    head = torch.nn.Linear(E, vocab, **f)
    src = torch.randn(B, S, E, **f)

    def embed(tokens, start):
        return tok(tokens) + pos[start : start + tokens.shape[1]]

    def step():
        # one thread (the shape says so): a step of this small model is hundreds of tiny ops,
        # and on the shared 2-core VM each parallel region that waits on a descheduled thread
        # costs a scheduler quantum (13 s instead of 0.3 s a call was seen); pyattn translate
        # decodes on one thread for the same reason
        threads = torch.get_num_threads()
        torch.set_num_threads(d["threads"])
        try:
            with torch.no_grad():
                return model.generate(src, embed, head, bos_id=1, eos_id=-1, max_new_tokens=new,
                                      use_cache=case.provider == "kv-cache")  # fmt: skip
        finally:
            torch.set_num_threads(threads)

    return step


def build_seq2seq(case: Case):
    from pyattn.models.seq2seq import Seq2Seq, Seq2SeqConfig

    d = case.dims
    B, T = d["B"], d["T"]
    torch.manual_seed(0)
    vocab = d["vocab"]
    config = Seq2SeqConfig(src_vocab_size=vocab, tgt_vocab_size=vocab)
    model = Seq2Seq(config).to(device=case.device, dtype=DTYPES[case.dtype]).eval()
    set_attn_backend(model, case.provider)
    # ids from 4 up keep clear of the special tokens (pad/bos/eos, and one spare)
    src = torch.randint(4, vocab, (B, T), device=case.device)

    def step():
        with torch.no_grad():
            return model.greedy_decode(src, max_len=T)

    return step


def model_cases(device: str, suite: str, dtypes: list[str], ops: list[str]) -> list[Case]:
    specs = {
        "bert": ("pyattn.models.bert", build_bert),
        "transformer": ("pyattn.models.transformer", build_transformer),
        "seq2seq": ("pyattn.models.seq2seq", build_seq2seq),
    }
    dt = (dtypes or ["fp32" if device == "cpu" else "bf16"])[0]
    cases = []
    for op in ops:
        if op not in specs:
            continue
        module, builder = specs[op]
        if not importable(module):
            print(f"note: {module} is not installed here; the {op} benchmark is skipped")
            continue
        providers = ["reference", "pyattn-fused"]
        rows: list[tuple[str, tuple, int]] = []
        if op == "bert":
            base = (("layers", 12), ("hidden", 768), ("heads", 12))
            if suite == "quick":
                rows = [
                    (m, (("B", 2), ("L", 32), ("layers", 2), ("hidden", 64), ("heads", 2)), 32)
                    for m in ("fwd", "train")
                ]
            elif suite == "default":
                rows = [(m, (("B", 8), ("L", 128)) + _DEFAULT_BERT, 128) for m in ("fwd", "train")]
            else:
                rows = [(m, (("B", 8), ("L", L)) + base, L) for L in (128, 512) for m in ("fwd", "train")]
        elif op == "transformer":
            providers.append("torch.nn.Transformer")
            # layers: encoder and decoder layers each (6 in Transformer-base; the default suite
            # runs 2 of each: identical layers, as for BERT)
            if suite == "quick":
                rows = [("fwd", (("B", 2), ("L", 16), ("d_model", 32), ("nhead", 2), ("layers", 1)), 16)]
            elif suite == "default":
                rows = [("fwd", (("B", 8), ("L", 128), ("d_model", 512), ("nhead", 8), ("layers", 2)), 128)]
            else:
                rows = [
                    ("fwd", (("B", 8), ("L", L), ("d_model", 512), ("nhead", 8), ("layers", 6)), L)
                    for L in (128, 512)
                ]
        else:
            # a subword-sized vocabulary: the output layer, not attention, dominates a decode step
            if suite == "quick":
                rows = [("decode", (("B", 4), ("T", 8), ("vocab", 64)), 8)]
            else:
                rows = [("decode", (("B", 64), ("T", 50), ("vocab", 8000)), 50)]
        for (mode, shape, seq_len), prov in itertools.product(rows, providers):
            cases.append(
                Case(
                    group=op,
                    provider=prov,
                    baseline="reference",
                    mode=mode,
                    shape=shape,
                    dtype=dt,
                    device=device,
                    seq_len=seq_len,
                    builder=builder,
                )
            )
        if op == "transformer" and suite in ("default", "full"):
            # Transformer.generate with the KV cache against cache-free decoding (a few seconds)
            shape = (("B", 4), ("S", 32), ("new", 32), ("d_model", 256), ("nhead", 8), ("layers", 2),
                     ("vocab", 1000), ("threads", 1))  # fmt: skip
            for prov in ("no-cache", "kv-cache"):
                cases.append(Case(group=op, provider=prov, baseline="no-cache", mode="decode", shape=shape,
                                  dtype=dt, device=device, seq_len=32, builder=build_transformer_decode))  # fmt: skip
    return cases


def all_model_cases(device: str, suite: str, dtypes: list[str]) -> list[Case]:
    """Every model's cases, the padded BERT batch included."""
    out = model_cases(device, suite, dtypes, ["bert", "transformer", "seq2seq"])
    if importable("pyattn.models.bert"):
        out += padded_bert_cases(device, suite, dtypes)
    return out


# -- the pytest-benchmark entry: `pytest bench/` (bench/conftest.py parametrises `case` from
# each test's `cases`: the case functions of this file)


def test_models(benchmark, case):
    from pyattn.bench._pytest_bench import run_case

    run_case(benchmark, case)


test_models.cases = (all_model_cases,)
