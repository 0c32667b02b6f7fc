"""The UI task: English -> Korean UI strings from the jupyterlab-language-pack-ko-kr catalogues."""

from __future__ import annotations

import random
import re
from pathlib import Path

from .mo import read_mo
from .vocab import Task, Vocab


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
