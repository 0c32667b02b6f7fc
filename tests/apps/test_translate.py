"""The translation demo: the Sino-Korean numeral generator, the gettext reader, and a short
training run of pyattn's seq2seq (seconds)."""

import gettext
import os
import struct

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from helpers import need

from pyattn.apps import translate as tr


def _need_language_pack():
    need("jupyterlab_language_pack_ko_KR", "jupyterlab-language-pack-ko-kr")


KNOWN = {
    0: "영",
    1: "일",
    7: "칠",
    10: "십",
    11: "십일",
    20: "이십",
    100: "백",
    110: "백십",
    345: "삼백사십오",
    1000: "천",
    1111: "천백십일",
    2024: "이천이십사",
    3006: "삼천육",
    10000: "만",
    10005: "만오",
    12000: "만이천",
    20000: "이만",
    99999: "구만구천구백구십구",
    110000: "십일만",
    1234567: "백이십삼만사천오백육십칠",
    100000000: "일억",
    300000000000: "삼천억",
    10**12: "일조",
}


@pytest.mark.parametrize("n", sorted(KNOWN))
def test_sino_korean_known_values(n):
    assert tr.sino_korean(n) == KNOWN[n]


def test_sino_korean_is_injective_and_rejects_bad_input():
    seen = {tr.sino_korean(n) for n in range(0, 100_000, 7)}
    assert len(seen) == len(range(0, 100_000, 7))
    with pytest.raises(ValueError, match="n must be"):
        tr.sino_korean(-1)
    with pytest.raises(TypeError, match="int"):
        tr.sino_korean(3.0)


def test_numerals_task_holds_numbers_out():
    task = tr.numerals_task(n_train=500, n_test=100, seed=int(torch.randint(0, 1000, ())))
    train = {"".join(s) for s, _ in task.train}
    test = {"".join(s) for s, _ in task.test}
    assert len(train) == 500 and len(test) == 100 and not train & test
    for s, t in task.test:
        assert "".join(t) == tr.sino_korean(int("".join(s)))


def _write_mo(path, entries, big_endian=False):
    """A minimal .mo writer (GNU format: header, two string tables, strings)."""
    entries = sorted(entries.items())
    n = len(entries)
    e = ">" if big_endian else "<"
    ids = [k.encode() for k, _ in entries]
    strs = [v.encode() for _, v in entries]
    orig_off, trans_off = 28, 28 + 8 * n
    pos = trans_off + 8 * n
    table_o, table_t, blob = b"", b"", b""
    for s in ids:
        table_o += struct.pack(e + "2I", len(s), pos + len(blob))
        blob += s + b"\0"
    for s in strs:
        table_t += struct.pack(e + "2I", len(s), pos + len(blob))
        blob += s + b"\0"
    head = struct.pack(e + "7I", 0x950412DE, 0, n, orig_off, trans_off, 0, 0)
    path.write_bytes(head + table_o + table_t + blob)


@pytest.mark.parametrize("big_endian", [False, True])
def test_read_mo_synthetic(tmp_path, big_endian):
    entries = {
        "": "Content-Type: text/plain; charset=UTF-8\n",
        "Open": "열기",
        "menu\x04Close": "닫기",
        "File\x00Files": "파일\x00파일들",
        "Untranslated": "",
    }
    path = tmp_path / "x.mo"
    _write_mo(path, entries, big_endian)
    assert tr.read_mo(path) == {"Open": "열기", "Close": "닫기", "File": "파일"}
    (tmp_path / "bad.mo").write_bytes(b"\0" * 40)
    with pytest.raises(ValueError, match="magic"):
        tr.read_mo(tmp_path / "bad.mo")


def test_read_mo_agrees_with_gettext():
    _need_language_pack()
    path = tr.ui_catalogue_dir() / "jupyterlab.mo"
    ours = tr.read_mo(path)
    with open(path, "rb") as f:
        theirs = gettext.GNUTranslations(f)._catalog
    plain = {k: v for k, v in theirs.items() if isinstance(k, str) and k and "\x04" not in k and v}
    assert len(plain) > 1000
    assert all(ours[k] == v for k, v in plain.items())


def test_ui_pairs():
    _need_language_pack()
    pairs = tr.ui_pairs()
    assert len(pairs) > 1000
    assert len({en for en, _ in pairs}) == len(pairs)
    assert all(any("\uac00" <= c <= "\ud7a3" for c in ko) for _, ko in pairs)
    assert ("Cancel", "취소") in pairs
    task = tr.ui_task(seed=int(torch.randint(0, 1000, ())))
    train_src = {" ".join(s) for s, _ in task.train}
    assert sum(" ".join(s) in train_src for s, _ in task.test) < len(task.test)  # mostly unseen sources
    assert len(task.test) >= 100 and task.src_vocab.stoi["<pad>"] == 0


def test_romanize():
    assert tr.romanize("한국") == "hanguk"
    assert tr.romanize("삼백사십오") == "sambaeksasipo"
    assert tr.romanize("A1") == "A1"


def test_training_smoke_loss_decreases():
    need("sacrebleu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        task = tr.numerals_task(n_train=400, n_test=20, seed=1)
        model = tr.build_model(task, embed_dim=16, hidden_dim=32, attn_dim=16, dropout=0.0)
        losses = tr.train(model, task, steps=40, batch_size=32, lr=1e-2)
        assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
        hyps, maps = tr.translate(model, task, [s for s, _ in task.test])
        assert len(hyps) == len(maps) == 20
        for (src, _), hyp, attn in zip(task.test, hyps, maps, strict=True):
            assert attn.shape == (len(hyp) + 1, len(src) + 1)
            # rows of attention are distributions over the source (+ eos); padding gets none
            assert torch.allclose(attn.sum(-1)[: len(hyp)], torch.ones(len(hyp)), atol=1e-4)
        res = tr.evaluate(model, task)
        assert 0.0 <= res["exact_match"] <= 1.0 and 0.0 <= res["chrf"] <= 100.0
    finally:
        torch.set_num_threads(threads)


def test_transformer_translator_trains_and_decodes_with_the_cache():
    need("sacrebleu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        task = tr.numerals_task(n_train=400, n_test=12, seed=1)
        model = tr.build_model(task, hidden_dim=32, dropout=0.0, model="transformer")
        losses = tr.train(model, task, steps=40, batch_size=32, lr=3e-3)
        assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
        hyps, maps = tr.translate(model, task, [s for s, _ in task.test])
        assert len(hyps) == len(maps) == 12
        for (src, _), hyp, attn in zip(task.test, hyps, maps, strict=True):
            # + eos, unless 40 steps of training left a sentence without one in translate's 60
            rows = min(len(hyp) + 1, 60)
            assert attn.shape == (rows, len(src) + 1)
            assert torch.allclose(attn.sum(-1), torch.ones(rows), atol=1e-4)
        # the cached decode gives the tokens of cache-free decoding (float64: no near-tie flips)
        model.double()
        src, _ = tr.batchify(task.test, task.src_vocab, task.tgt_vocab)
        cached, _ = model.greedy_decode(src, 20)
        c = model.config
        with torch.no_grad():
            free = model.transformer.generate(
                model.src_embed(src), model.tgt_embed, model.out, bos_id=c.bos_id, eos_id=c.eos_id,
                max_new_tokens=20, src_key_padding_mask=src == c.pad_id, use_cache=False,
            )  # fmt: skip
        assert torch.equal(cached, free)
        with pytest.raises(ValueError, match="model"):
            tr.build_model(task, model="rnn")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("model", ["seq2seq", "transformer"])
def test_translate_cli_writes_heatmaps(tmp_path, capsys, model):
    need("sacrebleu")
    need("matplotlib")
    from pyattn.cli import main

    threads = torch.get_num_threads()
    try:
        assert (
            main(
                ["translate", "--task", "numerals", "--steps", "5", "--samples", "2", "--out", str(tmp_path)]
                + (["--model", model] if model != "seq2seq" else [])
            )
            == 0
        )
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "held-out: exact match" in out and "chrF" in out
    pngs = sorted(tmp_path.glob("numerals-*.png"))
    assert len(pngs) == 2 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
