"""``pyattn translate``: the Bahdanau seq2seq (pyattn.models.seq2seq) on two small tasks.

- ``--task numerals``: digits -> Sino-Korean numerals (345 -> 삼백사십오), generated in code,
  character level, exact match on held-out numbers (never seen in training).
- ``--task ui``: English -> Korean UI strings from the jupyterlab-language-pack-ko-kr gettext
  catalogues (human translations), English words -> Korean characters, chrF/BLEU (sacrebleu) on
  a held-out split.

Both print sample translations and save attention heatmaps (PNG) that show the alignment.

One module per job: numerals.py (the generated task), mo.py (the .mo reader), ui.py (the UI task
from the catalogues), vocab.py (vocabularies and batches), training.py (train, translate,
evaluate), romanize.py and fonts.py (plot labels), heatmap.py (the PNGs), cli.py (the subcommand).
"""

from __future__ import annotations

from .cli import add_arguments, run
from .fonts import hangul_font
from .heatmap import save_heatmap
from .mo import read_mo
from .numerals import numeral_pairs, numerals_task, sino_korean
from .romanize import romanize
from .training import build_model, evaluate, train, translate
from .ui import english_tokens, ui_catalogue_dir, ui_pairs, ui_task
from .vocab import BOS, EOS, PAD, SPECIALS, UNK, Task, Vocab, batchify

__all__ = [
    "BOS",
    "EOS",
    "PAD",
    "SPECIALS",
    "UNK",
    "Task",
    "Vocab",
    "add_arguments",
    "batchify",
    "build_model",
    "english_tokens",
    "evaluate",
    "hangul_font",
    "numeral_pairs",
    "numerals_task",
    "read_mo",
    "romanize",
    "run",
    "save_heatmap",
    "sino_korean",
    "train",
    "translate",
    "ui_catalogue_dir",
    "ui_pairs",
    "ui_task",
]
