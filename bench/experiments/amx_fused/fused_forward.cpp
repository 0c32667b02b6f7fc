// A measurement, not part of pyattn: can a hand-fused AMX forward (bf16, D = Dv = 64, no mask)
// beat the package's forward, which multiplies its blocks through oneDNN's brgemm with the scores
// and weights passing through L2? Three kernels keep every block in L1 and call no library:
//
//   0 "fused":      32 query rows, 64-key chunks; S = Q K^T on 2x2 tiles into an L1 buffer, the
//                   row pass (lazy max, exp2 by polynomial, bf16 weights), O += P V on 2x2 tiles
//                   with O (32 x 64 float32) in L1
//   1 "pipelined":  as 0, with the next chunk's Q K^T and each half's P V interleaved with the row
//                   pass in 8-row pieces, so that the AMX unit and the vector units can overlap
//   2 "o_in_tiles": 16 query rows, O held in four tile registers for the whole key loop
//   3 "products":   kernel 0's two products alone (no row pass)
//   4 "row_pass":   kernel 0's row pass alone (over the first chunk's scores)
//
// and overlap() times tdpbf16ps alone, AVX-512 FMAs alone and both interleaved, all in registers.
// K and V are packed once, untimed (the package's times include its packing, a few percent).
// Built and driven by run_ab.py in this folder; docs/design.md ("Half precision on CPU") has the
// figures and what they say.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <ctime>
#include <vector>

namespace {

using bf16 = uint16_t;
constexpr int D = 64, DV = 64, KT = D / 32, CT = DV / 16;

struct alignas(64) TileConfig {
  uint8_t palette, start;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

void configure_tiles() {  // eight 16 x 64-byte tiles
  TileConfig c{};
  c.palette = 1;
  for (int i = 0; i < 8; ++i) c.colsb[i] = 64, c.rows[i] = 16;
  _tile_loadconfig(&c);
}

// 2^t as the package's exp2_poly<3>: vreduceps, a degree-3 polynomial, vscalefps
inline __m512 exp2_deg3(__m512 t) {
  const __m512 f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.07802452892065048f), f, _mm512_set1_ps(0.22606714069843292f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6958335638046265f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.9999251961708069f));
  const __mmask16 zero = _mm512_cmp_ps_mask(t, _mm512_set1_ps(-126.0f), _CMP_LT_OQ);
  return _mm512_maskz_scalef_ps(static_cast<__mmask16>(~zero), p, t);
}

// K (L x D) as B tiles: for 16 keys and 32 dims, 16 rows of (key, dim pair)
void pack_keys(const bf16* K, int L, bf16* Kp) {
  for (int j = 0; j < L / 16; ++j)
    for (int t = 0; t < KT; ++t)
      for (int r = 0; r < 16; ++r)
        for (int n = 0; n < 16; ++n)
          for (int e = 0; e < 2; ++e) Kp[((j * KT + t) * 16 + r) * 32 + n * 2 + e] = K[(j * 16 + n) * D + t * 32 + 2 * r + e];
}

// V (L x DV) as B tiles: for 32 keys and 16 columns, 16 rows of (column, key pair)
void pack_values(const bf16* V, int L, bf16* Vp) {
  for (int s = 0; s < L / 32; ++s)
    for (int c = 0; c < CT; ++c)
      for (int r = 0; r < 16; ++r)
        for (int n = 0; n < 16; ++n)
          for (int e = 0; e < 2; ++e) Vp[((s * CT + c) * 16 + r) * 32 + n * 2 + e] = V[(s * 32 + 2 * r + e) * DV + c * 16 + n];
}

// Per-row softmax state: running max (raw scores), the lazy threshold (rescale only when a score
// passes max + 8 / a in log2 units), the sum as 16 lanes.
template <int R>
struct Rows {
  alignas(64) float lsum[R][16];
  float m[R], thr[R], alpha[R];
  Rows() {
    for (int r = 0; r < R; ++r) {
      m[r] = thr[r] = -INFINITY;
      for (int i = 0; i < 16; ++i) lsum[r][i] = 0.0f;
    }
  }
};

// The row pass over rows [r0, r1) of an R x NK score block: weights as bf16 into P, sums into st;
// returns whether a row's max moved (its alpha then rescales O's row).
template <int R, int NK>
inline bool row_pass(const float* S, bf16* P, Rows<R>& st, float a, int r0, int r1) {
  const __m512 va = _mm512_set1_ps(a);
  bool moved = false;
  for (int r = r0; r < r1; ++r) {
    const float* s = S + r * NK;
    __m512 x[NK / 16];
    __m512 mx = x[0] = _mm512_loadu_ps(s);
    for (int i = 1; i < NK / 16; ++i) mx = _mm512_max_ps(mx, x[i] = _mm512_loadu_ps(s + 16 * i));
    st.alpha[r] = 1.0f;
    if (__builtin_expect(_mm512_cmp_ps_mask(mx, _mm512_set1_ps(st.thr[r]), _CMP_GT_OQ) != 0, 0)) {
      const float mn = _mm512_reduce_max_ps(mx);
      const float al = st.m[r] == -INFINITY ? 0.0f : exp2f((st.m[r] - mn) * a);
      st.m[r] = mn, st.thr[r] = mn + 8.0f / a, st.alpha[r] = al, moved = true;
      _mm512_store_ps(st.lsum[r], _mm512_mul_ps(_mm512_load_ps(st.lsum[r]), _mm512_set1_ps(al)));
    }
    const __m512 vb = _mm512_set1_ps(st.m[r] * a);
    __m512 acc = _mm512_load_ps(st.lsum[r]);
    for (int i = 0; i < NK / 16; i += 2) {
      const __m512 e0 = exp2_deg3(_mm512_fmsub_ps(x[i], va, vb));
      const __m512 e1 = exp2_deg3(_mm512_fmsub_ps(x[i + 1], va, vb));
      acc = _mm512_add_ps(acc, _mm512_add_ps(e0, e1));
      const __m512bh pb = _mm512_cvtne2ps_pbh(e1, e0);
      _mm512_storeu_si512(P + r * NK + i * 16, reinterpret_cast<const __m512i&>(pb));
    }
    _mm512_store_ps(st.lsum[r], acc);
  }
  return moved;
}

template <int R>
void rescale_rows(float* O, const Rows<R>& st, int r0, int r1) {
  for (int r = r0; r < r1; ++r)
    if (st.alpha[r] != 1.0f)
      for (int c = 0; c < DV; c += 16)
        _mm512_storeu_ps(O + r * DV + c, _mm512_mul_ps(_mm512_loadu_ps(O + r * DV + c), _mm512_set1_ps(st.alpha[r])));
}

template <int R>
void finish(const float* O, const Rows<R>& st, float* out) {
  for (int r = 0; r < R; ++r) {
    const float l = _mm512_reduce_add_ps(_mm512_load_ps(st.lsum[r]));
    for (int c = 0; c < DV; ++c) out[r * DV + c] = O[r * DV + c] / l;
  }
}

constexpr int NK = 64;  // keys per chunk

// S (32 x NK) for keys [j0, j0 + NK), columns [32 jp, 32 jp + 32), on tiles 0-3
inline void scores_2x2(const bf16* Q, const bf16* Kp, int j0, int jp, float* S) {
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  const int jt = j0 / 16 + 2 * jp;
  for (int t = 0; t < KT; ++t) {
    _tile_loadd(4, Q + t * 32, D * 2);
    _tile_loadd(5, Q + 16 * D + t * 32, D * 2);
    _tile_loadd(6, Kp + (jt * KT + t) * 512, 64);
    _tile_loadd(7, Kp + ((jt + 1) * KT + t) * 512, 64);
    _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, S + jp * 32, NK * 4); _tile_stored(1, S + jp * 32 + 16, NK * 4);
  _tile_stored(2, S + 16 * NK + jp * 32, NK * 4); _tile_stored(3, S + 16 * NK + jp * 32 + 16, NK * 4);
}

// O (32 x 64, L1) += P (32 x NK) V, columns [32 cp, 32 cp + 32), on tiles 0-3
inline void values_2x2(const bf16* P, const bf16* Vp, int j0, int cp, float* O) {
  float* o = O + cp * 32;
  _tile_loadd(0, o, DV * 4); _tile_loadd(1, o + 16, DV * 4);
  _tile_loadd(2, o + 16 * DV, DV * 4); _tile_loadd(3, o + 16 * DV + 16, DV * 4);
  for (int s = 0; s < NK / 32; ++s) {
    _tile_loadd(4, P + s * 32, NK * 2);
    _tile_loadd(5, P + 16 * NK + s * 32, NK * 2);
    const bf16* v = Vp + ((j0 / 32 + s) * CT + 2 * cp) * 512;
    _tile_loadd(6, v, 64); _tile_loadd(7, v + 512, 64);
    _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, o, DV * 4); _tile_stored(1, o + 16, DV * 4);
  _tile_stored(2, o + 16 * DV, DV * 4); _tile_stored(3, o + 16 * DV + 16, DV * 4);
}

// O's 16 rows [16 h, 16 h + 16) += P's rows V (kernel 1: one row half at a time)
inline void values_half(const bf16* P, const bf16* Vp, int j0, int h, float* O) {
  float* o = O + h * 16 * DV;
  const bf16* p = P + h * 16 * NK;
  _tile_loadd(0, o, DV * 4); _tile_loadd(1, o + 16, DV * 4); _tile_loadd(2, o + 32, DV * 4); _tile_loadd(3, o + 48, DV * 4);
  for (int s = 0; s < NK / 32; ++s) {
    _tile_loadd(4, p + s * 32, NK * 2);
    const bf16* v = Vp + (j0 / 32 + s) * CT * 512;
    _tile_loadd(6, v, 64); _tile_loadd(7, v + 512, 64);
    _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(6, v + 1024, 64); _tile_loadd(7, v + 1536, 64);
    _tile_dpbf16ps(2, 4, 6); _tile_dpbf16ps(3, 4, 7);
  }
  _tile_stored(0, o, DV * 4); _tile_stored(1, o + 16, DV * 4); _tile_stored(2, o + 32, DV * 4); _tile_stored(3, o + 48, DV * 4);
}

struct Scratch {
  alignas(64) float S[2][32 * NK];
  alignas(64) bf16 P[32 * NK];
  alignas(64) float O[32 * DV];
};

// kernels 0, 3, 4 (kind: 0 all, 3 products alone, 4 row pass alone)
template <int kind>
void group_fused(const bf16* Q, const bf16* Kp, const bf16* Vp, int L, float a, float* out, Scratch& w) {
  Rows<32> st;
  std::memset(w.O, 0, sizeof w.O);
  for (int j0 = 0; j0 < L; j0 += NK) {
    if (kind != 4 || j0 == 0)
      for (int jp = 0; jp < NK / 32; ++jp) scores_2x2(Q, Kp, j0, jp, w.S[0]);
    if (kind != 3 && row_pass<32, NK>(w.S[0], w.P, st, a, 0, 32)) rescale_rows(w.O, st, 0, 32);
    if (kind != 4)
      for (int cp = 0; cp < CT / 2; ++cp) values_2x2(w.P, Vp, j0, cp, w.O);
  }
  finish(w.O, st, out);
}

void group_pipelined(const bf16* Q, const bf16* Kp, const bf16* Vp, int L, float a, float* out, Scratch& w) {
  Rows<32> st;
  std::memset(w.O, 0, sizeof w.O);
  for (int jp = 0; jp < NK / 32; ++jp) scores_2x2(Q, Kp, 0, jp, w.S[0]);
  for (int j0 = 0, c = 0; j0 < L; j0 += NK, ++c) {
    const float* S = w.S[c & 1];
    float* next = w.S[(c + 1) & 1];
    const bool more = j0 + NK < L;
    if (more) scores_2x2(Q, Kp, j0 + NK, 0, next);
    if (row_pass<32, NK>(S, w.P, st, a, 0, 8)) rescale_rows(w.O, st, 0, 8);
    if (more) scores_2x2(Q, Kp, j0 + NK, 1, next);
    if (row_pass<32, NK>(S, w.P, st, a, 8, 16)) rescale_rows(w.O, st, 8, 16);
    values_half(w.P, Vp, j0, 0, w.O);
    if (row_pass<32, NK>(S, w.P, st, a, 16, 32)) rescale_rows(w.O, st, 16, 32);
    values_half(w.P, Vp, j0, 1, w.O);
  }
  finish(w.O, st, out);
}

// kernel 2: 16 rows; tiles 0-1 S, 2 A, 3 B, 4-7 O
void group_o_in_tiles(const bf16* Q, const bf16* Kp, const bf16* Vp, int L, float a, float* out, Scratch& w) {
  Rows<16> st;
  float* S = w.S[0];
  _tile_zero(4); _tile_zero(5); _tile_zero(6); _tile_zero(7);
  for (int j0 = 0; j0 < L; j0 += NK) {
    for (int s = 0; s < NK / 32; ++s) {
      _tile_zero(0); _tile_zero(1);
      const int jt = j0 / 16 + 2 * s;
      for (int t = 0; t < KT; ++t) {
        _tile_loadd(2, Q + t * 32, D * 2);
        _tile_loadd(3, Kp + (jt * KT + t) * 512, 64);
        _tile_dpbf16ps(0, 2, 3);
        _tile_loadd(3, Kp + ((jt + 1) * KT + t) * 512, 64);
        _tile_dpbf16ps(1, 2, 3);
      }
      _tile_stored(0, S + s * 32, NK * 4); _tile_stored(1, S + s * 32 + 16, NK * 4);
    }
    if (row_pass<16, NK>(S, w.P, st, a, 0, 16)) {  // O leaves the tiles only when a max moved
      _tile_stored(4, w.O, DV * 4); _tile_stored(5, w.O + 16, DV * 4); _tile_stored(6, w.O + 32, DV * 4); _tile_stored(7, w.O + 48, DV * 4);
      rescale_rows(w.O, st, 0, 16);
      _tile_loadd(4, w.O, DV * 4); _tile_loadd(5, w.O + 16, DV * 4); _tile_loadd(6, w.O + 32, DV * 4); _tile_loadd(7, w.O + 48, DV * 4);
    }
    for (int s = 0; s < NK / 32; ++s) {
      _tile_loadd(2, w.P + s * 32, NK * 2);
      const bf16* v = Vp + (j0 / 32 + s) * CT * 512;
      _tile_loadd(3, v, 64); _tile_dpbf16ps(4, 2, 3);
      _tile_loadd(3, v + 512, 64); _tile_dpbf16ps(5, 2, 3);
      _tile_loadd(3, v + 1024, 64); _tile_dpbf16ps(6, 2, 3);
      _tile_loadd(3, v + 1536, 64); _tile_dpbf16ps(7, 2, 3);
    }
  }
  _tile_stored(4, w.O, DV * 4); _tile_stored(5, w.O + 16, DV * 4); _tile_stored(6, w.O + 32, DV * 4); _tile_stored(7, w.O + 48, DV * 4);
  finish(w.O, st, out);
}

bool amx_permitted() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
}

}  // namespace

// Q, K, V: (heads, L, 64) bf16, contiguous; out: (heads, L, 64) float32. L a multiple of 64.
// Returns the seconds of process CPU time the kernel took (packing excluded), or -1.
extern "C" double fused_forward(const bf16* Q, const bf16* K, const bf16* V, float* out, int heads, int L, int kernel) {
  if (!amx_permitted() || L % NK != 0 || kernel < 0 || kernel > 4) return -1.0;
  std::vector<bf16> Kp(static_cast<size_t>(heads) * L * D), Vp(static_cast<size_t>(heads) * L * DV);
  for (int h = 0; h < heads; ++h) {
    pack_keys(K + static_cast<size_t>(h) * L * D, L, Kp.data() + static_cast<size_t>(h) * L * D);
    pack_values(V + static_cast<size_t>(h) * L * DV, L, Vp.data() + static_cast<size_t>(h) * L * DV);
  }
  auto* w = static_cast<Scratch*>(std::aligned_alloc(64, sizeof(Scratch)));
  const float a = 1.4426950408889634f / std::sqrt(static_cast<float>(D));
  const int rows = kernel == 2 ? 16 : 32;
  configure_tiles();
  const clock_t t0 = clock();
  for (int h = 0; h < heads; ++h) {
    const size_t base = static_cast<size_t>(h) * L;
    const bf16* kp = Kp.data() + base * D;
    const bf16* vp = Vp.data() + base * DV;
    for (int g = 0; g < L; g += rows) {
      const bf16* q = Q + (base + g) * D;
      float* o = out + (base + g) * DV;
      switch (kernel) {
        case 0: group_fused<0>(q, kp, vp, L, a, o, *w); break;
        case 1: group_pipelined(q, kp, vp, L, a, o, *w); break;
        case 2: group_o_in_tiles(q, kp, vp, L, a, o, *w); break;
        case 3: group_fused<3>(q, kp, vp, L, a, o, *w); break;
        default: group_fused<4>(q, kp, vp, L, a, o, *w); break;
      }
    }
  }
  const double sec = static_cast<double>(clock() - t0) / CLOCKS_PER_SEC;
  _tile_release();
  std::free(w);
  return sec;
}

// Seconds for n rounds of: 4 tdpbf16ps (mode 1), 64 register FMAs in 8 chains (mode 2), or both.
extern "C" double overlap(long n, int mode) {
  if (!amx_permitted()) return -1.0;
  configure_tiles();
  alignas(64) static uint16_t zeros[16 * 32];
  _tile_loadd(4, zeros, 64); _tile_loadd(5, zeros, 64); _tile_loadd(6, zeros, 64); _tile_loadd(7, zeros, 64);
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  __m512 x0 = _mm512_set1_ps(1.0001f), x1 = x0, x2 = x0, x3 = x0, x4 = x0, x5 = x0, x6 = x0, x7 = x0;
  const __m512 m = _mm512_set1_ps(0.99999f), c = _mm512_set1_ps(1e-7f);
  const clock_t t0 = clock();
  for (long i = 0; i < n; ++i) {
    if (mode & 1) {
      _tile_dpbf16ps(0, 4, 5); _tile_dpbf16ps(1, 4, 6); _tile_dpbf16ps(2, 4, 7); _tile_dpbf16ps(3, 4, 5);
    }
    if (mode & 2) {
      for (int k = 0; k < 8; ++k) {
        x0 = _mm512_fmadd_ps(x0, m, c), x1 = _mm512_fmadd_ps(x1, m, c), x2 = _mm512_fmadd_ps(x2, m, c), x3 = _mm512_fmadd_ps(x3, m, c);
        x4 = _mm512_fmadd_ps(x4, m, c), x5 = _mm512_fmadd_ps(x5, m, c), x6 = _mm512_fmadd_ps(x6, m, c), x7 = _mm512_fmadd_ps(x7, m, c);
      }
      asm volatile("" : "+v"(x0), "+v"(x1), "+v"(x2), "+v"(x3), "+v"(x4), "+v"(x5), "+v"(x6), "+v"(x7));
    }
  }
  const double sec = static_cast<double>(clock() - t0) / CLOCKS_PER_SEC;
  _tile_release();
  return sec;
}
