"""Finding a font with Hangul glyphs among those matplotlib knows."""

from __future__ import annotations

import re


def hangul_font():
    """A font with Hangul glyphs known to matplotlib (Nanum, Noto CJK, Un, Baekmuk), or None."""
    from matplotlib import font_manager

    for f in font_manager.fontManager.ttflist:
        if re.search(
            r"nanum|noto sans cjk|noto serif cjk|undotum|unbatang|baekmuk|malgun|applegothic", f.name, re.I
        ):
            return f.name
    return None
