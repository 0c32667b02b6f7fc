"""Elementwise math shared by the Triton kernels (GPU and interpreter run the same code)."""

import triton
import triton.language as tl

_LOG2E = tl.constexpr(1.4426950408889634)
# Below this |x| the exp-based tanh loses bits to the cancellation in 1 - exp(-2|x|); an odd
# Taylor polynomial up to x^11 is accurate to 2e-9 relative there.
TANH_SERIES_MAX = tl.constexpr(0.3)


@triton.jit
def tanh(x):
    """tanh in float32 to a few ulp relative over the whole line. Not every Triton has tl.tanh,
    and libdevice's does not run in the interpreter. A softcap c tanh(s / c) with a large c needs
    the relative accuracy at small |s / c|: 1 - 2 / (exp(2x) + 1) is off by ulp(1) there, which
    c turns into c * 1.2e-7 of absolute score error. exp2 of a non-positive argument cannot
    overflow, so large |x| saturates to +-1 exactly."""
    ax = tl.abs(x)
    e = tl.math.exp2(ax * (-2.0 * _LOG2E))
    t_big = (1.0 - e) / (1.0 + e)
    x2 = x * x
    poly = -1.0 / 3.0 + x2 * (
        2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0 + x2 * (-1382.0 / 155925.0)))
    )
    t_small = x + x * x2 * poly
    return tl.where(ax < TANH_SERIES_MAX, t_small, tl.where(x < 0, -t_big, t_big))
