"""pyattn's benchmark suite, installed as ``pyattn.bench`` (``pyattn bench`` runs it)."""
