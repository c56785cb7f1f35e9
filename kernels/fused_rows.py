"""Fused CPU row pass of one cell: exact softmax, ``P @ V`` and the row/column reductions.

``cell_rows(q, k, v)`` computes, for ``q`` (already scaled), ``k``, ``v`` of shape ``[H, n, D]``
(fp32, contiguous, CPU), with ``s = q k^T`` and ``p = softmax(s)`` over the last axis::

    out      = p @ v                               [H, n, D]
    lse_i    = max_j s_ij + log z_i                [H, n]
    entropy_i = log z_i - sum_j p_ij (s_ij - max_i) [H, n]
    row_max_i = 1 / z_i  (= max_j p_ij)            [H, n]
    colsum_j = sum_i p_ij                          [H, n]

exactly like the eager row-block loop in :func:`attnprof.kernels.blocked._cell_stats`, but in one
compiled pass: each task (a head and a fixed range of row blocks) computes a block of scores with a
single-threaded SGEMM, then per row (while it is in L1) the max, ``exp(s - max)`` in place with
``z`` and ``sum e (s - max)`` in the same loop, and the column sums; then ``E @ V`` scaled by
``1 / z``. Tasks run under ``at::parallel_for``; each task writes its own column-sum partial, and
the partials are added in a fixed order, so results do not depend on the thread count.

The extension is built on first use with ``torch.utils.cpp_extension.load_inline`` (cached in the
default torch_extensions directory, so later processes only load it). :func:`available` says whether
it could be built; on failure it warns once and callers fall back to eager code. ``ATTNPROF_FUSED=0``
disables it.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import warnings

import torch

#: Scores per row block (rows x keys fp32): 2**18 = 1 MiB, about one core's L2; rows in [32, 128].
BLOCK_ELEMS = 2**18

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

// Fortran SGEMM (MKL/OpenBLAS in libtorch_cpu). Weak: if the torch build does not export it,
// fall back to at::mm_out on views (slower per call, same results up to rounding).
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc) __attribute__((weak));

using Vec = at::vec::Vectorized<float>;

static bool g_force_mm = false;  // tests: exercise the at::mm fallback

// Column-major C[m x n] = op(A) op(B) (beta = 0), BLAS conventions.
static void gemm_cm(bool ta, bool tb, int m, int n, int k, const float* a, int lda,
                    const float* b, int ldb, float* c, int ldc) {
  if (sgemm_ != nullptr && !g_force_mm) {
    const char cta = ta ? 'T' : 'N', ctb = tb ? 'T' : 'N';
    const float one = 1.f, zero = 0.f;
    sgemm_(&cta, &ctb, &m, &n, &k, &one, a, &lda, b, &ldb, &zero, c, &ldc);
    return;
  }
  // Row-major views: C^T [n x m] = op(B)^T [n x k] @ op(A)^T [k x m].
  auto opt = at::TensorOptions().dtype(at::kFloat);
  float* pa = const_cast<float*>(a);
  float* pb = const_cast<float*>(b);
  at::Tensor opAT = ta ? at::from_blob(pa, {m, k}, {lda, 1}, opt).t() : at::from_blob(pa, {k, m}, {lda, 1}, opt);
  at::Tensor opBT = tb ? at::from_blob(pb, {k, n}, {ldb, 1}, opt).t() : at::from_blob(pb, {n, k}, {ldb, 1}, opt);
  at::Tensor Ct = at::from_blob(c, {n, m}, {ldc, 1}, opt);
  at::mm_out(Ct, opBT, opAT);
}

template <bool FAST>
static inline Vec vexp(const Vec& x) {
  if constexpr (FAST) return x.exp_u20(); else return x.exp();
}

// One row of exp(s - max) in place: returns (max, z, sum e (s - max)).
template <bool FAST>
static inline void softmax_row(float* s, int64_t n, float& m, float& z, float& w) {
  const int64_t L = Vec::size();
  int64_t j = 0;
  m = -std::numeric_limits<float>::infinity();
  if (n >= L) {
    Vec vm = Vec::loadu(s);
    for (j = L; j + L <= n; j += L) vm = at::vec::maximum(vm, Vec::loadu(s + j));
    m = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, vm);
  }
  for (; j < n; ++j) m = std::max(m, s[j]);
  const Vec vmx(m);
  Vec vz(0.f), vw(0.f);
  for (j = 0; j + L <= n; j += L) {
    Vec d = Vec::loadu(s + j) - vmx;
    Vec e = vexp<FAST>(d);
    e.store(s + j);
    vz = vz + e;
    vw = at::vec::fmadd(e, d, vw);
  }
  z = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, vz);
  w = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, vw);
  if (j < n) {
    const int64_t cnt = n - j;
    Vec d = Vec::loadu(s + j, cnt) - vmx;
    Vec e = vexp<FAST>(d);
    alignas(64) float eb[Vec::size()], db[Vec::size()];
    e.store(eb);
    d.store(db);
    for (int64_t u = 0; u < cnt; ++u) {
      s[j + u] = eb[u];
      z += eb[u];
      w += eb[u] * db[u];
    }
  }
}

template <bool FAST>
static void rows_impl(const float* q, const float* k, const float* v, float* out, float* lse,
                      float* ent, float* rmax, float* part, int64_t H, int64_t n, int64_t D,
                      int64_t rows, int64_t chunks) {
  const int64_t nblocks = (n + rows - 1) / rows;
  const int64_t per_chunk = (nblocks + chunks - 1) / chunks;  // row blocks per task
  const int64_t L = Vec::size();
  at::parallel_for(0, H * chunks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> sbuf(rows * n);
    std::vector<float> zinv(rows);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t h = t / chunks, c = t % chunks;
      const float* qh = q + h * n * D;
      const float* kh = k + h * n * D;
      const float* vh = v + h * n * D;
      float* oh = out + h * n * D;
      float* cs = part + t * n;  // this task's column sums
      std::fill(cs, cs + n, 0.f);
      const int64_t b0 = c * per_chunk, b1 = std::min(nblocks, b0 + per_chunk);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r0 = b * rows, r = std::min(rows, n - r0);
        float* S = sbuf.data();
        // S[r x n] row-major == col-major [n x r]: S^T = K Q^T, K row-major [n x D] = col-major D x n.
        gemm_cm(true, false, (int)n, (int)r, (int)D, kh, (int)D, qh + r0 * D, (int)D, S, (int)n);
        for (int64_t i = 0; i < r; ++i) {
          float* s = S + i * n;
          float m, z, w;  // e = exp(s - m) in place; z = sum e; w = sum e (s - m)
          softmax_row<FAST>(s, n, m, z, w);
          int64_t j;
          const float iz = 1.f / z;
          const float lz = std::log(z);
          const int64_t row = r0 + i;
          lse[h * n + row] = m + lz;
          ent[h * n + row] = lz - w * iz;
          rmax[h * n + row] = iz;
          zinv[i] = iz;
          // column sums: cs += e / z, while the row is in L1
          const Vec viz(iz);
          for (j = 0; j + L <= n; j += L)
            at::vec::fmadd(Vec::loadu(s + j), viz, Vec::loadu(cs + j)).store(cs + j);
          for (; j < n; ++j) cs[j] += s[j] * iz;
        }
        // O[r x D] row-major == col-major [D x r] = V^T E^T: V row-major [n x D] = col-major D x n,
        // E row-major [r x n] = col-major n x r.
        float* O = oh + r0 * D;
        gemm_cm(false, false, (int)D, (int)r, (int)n, vh, (int)D, S, (int)n, O, (int)D);
        for (int64_t i = 0; i < r; ++i) {
          const Vec viz(zinv[i]);
          float* o = O + i * D;
          int64_t j = 0;
          for (; j + L <= D; j += L) (Vec::loadu(o + j) * viz).store(o + j);
          for (; j < D; ++j) o[j] *= zinv[i];
        }
      }
    }
  });
}

std::vector<at::Tensor> cell_rows(at::Tensor q, at::Tensor k, at::Tensor v, int64_t rows,
                                  int64_t chunks, bool fast_exp) {
  TORCH_CHECK(q.dim() == 3 && k.sizes() == q.sizes() && v.sizes() == q.sizes(),
              "q, k, v must be [H, n, D] of one shape");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat &&
              v.scalar_type() == at::kFloat, "fp32 only");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "CPU only");
  q = q.contiguous(); k = k.contiguous(); v = v.contiguous();
  const int64_t H = q.size(0), n = q.size(1), D = q.size(2);
  TORCH_CHECK(rows >= 1 && chunks >= 1, "rows and chunks must be >= 1");
  auto out = at::empty_like(q);
  auto lse = at::empty({H, n}, q.options());
  auto ent = at::empty({H, n}, q.options());
  auto rmax = at::empty({H, n}, q.options());
  auto part = at::empty({H, chunks, n}, q.options());
  if (H == 0 || n == 0) return {out, lse, ent, rmax, at::zeros({H, n}, q.options())};
  if (fast_exp)
    rows_impl<true>(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
                    out.data_ptr<float>(), lse.data_ptr<float>(), ent.data_ptr<float>(),
                    rmax.data_ptr<float>(), part.data_ptr<float>(), H, n, D, rows, chunks);
  else
    rows_impl<false>(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
                     out.data_ptr<float>(), lse.data_ptr<float>(), ent.data_ptr<float>(),
                     rmax.data_ptr<float>(), part.data_ptr<float>(), H, n, D, rows, chunks);
  // fixed-order reduction of the per-task partials (chunk 0, 1, ... in order)
  at::Tensor colsum = part.select(1, 0).clone();
  for (int64_t c = 1; c < chunks; ++c) colsum.add_(part.select(1, c));
  return {out, lse, ent, rmax, colsum};
}

// A whole batch in one call: task (cell b, head h) owns every output it writes (no partials).
// q, k, v, out are [rows, H, D] (a row of every head together, as projections give them).
// Queries of cell b: rows cu_q[b] .. cu_q[b+1] of q, its n real rows first (in key order), then
// output-only rows (padded positions); keys: rows cu_k[b] .. cu_k[b+1] of k and v (n real tokens).
template <bool FAST>
static void batch_impl(const float* q, const float* k, const float* v, const int64_t* cu_q,
                       const int64_t* cu_k, const int64_t* slot, const int64_t* nctx,
                       const int64_t* nwin, const int64_t* pslot, const int64_t* pat, float* out,
                       float* lse, float* rstat, float* colsum, float* win, float* pair, float* check,
                       int64_t B, int64_t H, int64_t Tq, int64_t Tk, int64_t D, int64_t W, int64_t M) {
  at::parallel_for(0, B * H, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> sbuf, zinv;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / H, h = t % H;
      const int64_t q0 = cu_q[b], mq = cu_q[b + 1] - q0, k0 = cu_k[b], n = cu_k[b + 1] - k0;
      const int64_t c = slot[b], nc = nctx[b], nw = nwin[b];
      const int64_t HD = H * D;  // row stride
      const float* qh = q + q0 * HD + h * D;
      const float* kh = k + k0 * HD + h * D;
      const float* vh = v + k0 * HD + h * D;
      float* oh = out + q0 * HD + h * D;
      float* cs = colsum + h * Tk + k0;
      std::fill(cs, cs + n, 0.f);
      const int64_t rows = std::max<int64_t>(32, std::min<int64_t>(128, (1 << 18) / std::max<int64_t>(n, 1)));
      sbuf.resize(rows * n);
      zinv.resize(rows);
      double osum = 0.0;
      for (int64_t r0 = 0; r0 < mq; r0 += rows) {
        const int64_t r = std::min(rows, mq - r0);
        float* S = sbuf.data();
        gemm_cm(true, false, (int)n, (int)r, (int)D, kh, (int)HD, qh + r0 * HD, (int)HD, S, (int)n);
        for (int64_t i = 0; i < r; ++i) {
          float* s = S + i * n;
          float m, z, w;
          softmax_row<FAST>(s, n, m, z, w);
          const float iz = 1.f / z;
          const int64_t row = r0 + i;
          lse[h * Tq + q0 + row] = m + std::log(z);
          zinv[i] = iz;
          if (row >= n) continue;  // an output-only row
          float* st = rstat + ((h * Tk) + k0 + row) * 4;
          float ctx = 0.f;
          for (int64_t j = 0; j < nc; ++j) ctx += s[j];
          st[0] = std::log(z) - w * iz;  // entropy
          st[1] = ctx * iz;              // context mass
          st[2] = s[row] * iz;           // self mass (key `row` is the row's own token)
          st[3] = iz;                    // row max
          const Vec viz(iz);
          const int64_t L = Vec::size();
          int64_t j = 0;
          for (; j + L <= n; j += L) at::vec::fmadd(Vec::loadu(s + j), viz, Vec::loadu(cs + j)).store(cs + j);
          for (; j < n; ++j) cs[j] += s[j] * iz;
          if (c < 0) continue;  // not counted: no window or panel entries
          if (row < nw) {
            float* wr = win + ((c * H + h) * W + row) * W;
            for (int64_t u = 0; u < nw; ++u) wr[u] = s[u] * iz;
          }
          const int64_t ps = pslot[k0 + row];
          if (ps >= 0) {
            const int64_t* at_c = pat + c * M;
            float* pr = pair + ((c * H + h) * M + ps) * M;
            for (int64_t u = 0; u < M && at_c[u] >= 0; ++u) pr[u] = s[at_c[u]] * iz;
          }
        }
        float* O = oh + r0 * HD;
        gemm_cm(false, false, (int)D, (int)r, (int)n, vh, (int)HD, S, (int)n, O, (int)HD);
        for (int64_t i = 0; i < r; ++i) {
          const Vec viz(zinv[i]);
          float* o = O + i * HD;
          Vec acc(0.f);
          int64_t j = 0;
          for (; j + Vec::size() <= D; j += Vec::size()) {
            Vec x = Vec::loadu(o + j) * viz;
            x.store(o + j);
            acc = acc + x;
          }
          float tail = 0.f;
          for (; j < D; ++j) { o[j] *= zinv[i]; tail += o[j]; }
          osum += at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc) + tail;
        }
      }
      check[t] = (float)osum;  // NaN or Inf when any output of the task is not finite
    }
  });
}

std::vector<at::Tensor> batch_rows(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor cu_q,
                                   at::Tensor cu_k, at::Tensor slot, at::Tensor nctx, at::Tensor nwin,
                                   at::Tensor pslot, at::Tensor pat, int64_t C, int64_t W,
                                   bool fast_exp) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes() && q.size(1) == k.size(1) &&
              q.size(2) == k.size(2), "q [Tq, H, D], k and v [Tk, H, D]");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat &&
              v.scalar_type() == at::kFloat, "fp32 only");
  q = q.contiguous(); k = k.contiguous(); v = v.contiguous();
  const int64_t H = q.size(1), Tq = q.size(0), Tk = k.size(0), D = q.size(2);
  const int64_t B = cu_q.numel() - 1, M = pat.size(1);
  auto out = at::empty_like(q);
  auto lse = at::empty({H, Tq}, q.options());
  auto rstat = at::zeros({H, Tk, 4}, q.options());
  auto colsum = at::empty({H, Tk}, q.options());
  auto win = at::zeros({C, H, W, W}, q.options());
  auto pair = at::zeros({C, H, M, M}, q.options());
  auto check = at::zeros({B * H}, q.options());
  auto i64 = [](at::Tensor x) { return x.to(at::kLong).contiguous(); };
  cu_q = i64(cu_q); cu_k = i64(cu_k); slot = i64(slot); nctx = i64(nctx); nwin = i64(nwin);
  pslot = i64(pslot); pat = i64(pat);
  if (fast_exp)
    batch_impl<true>(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), cu_q.data_ptr<int64_t>(),
                     cu_k.data_ptr<int64_t>(), slot.data_ptr<int64_t>(), nctx.data_ptr<int64_t>(),
                     nwin.data_ptr<int64_t>(), pslot.data_ptr<int64_t>(), pat.data_ptr<int64_t>(),
                     out.data_ptr<float>(), lse.data_ptr<float>(), rstat.data_ptr<float>(),
                     colsum.data_ptr<float>(), win.data_ptr<float>(), pair.data_ptr<float>(),
                     check.data_ptr<float>(), B, H, Tq, Tk, D, W, M);
  else
    batch_impl<false>(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), cu_q.data_ptr<int64_t>(),
                      cu_k.data_ptr<int64_t>(), slot.data_ptr<int64_t>(), nctx.data_ptr<int64_t>(),
                      nwin.data_ptr<int64_t>(), pslot.data_ptr<int64_t>(), pat.data_ptr<int64_t>(),
                      out.data_ptr<float>(), lse.data_ptr<float>(), rstat.data_ptr<float>(),
                      colsum.data_ptr<float>(), win.data_ptr<float>(), pair.data_ptr<float>(),
                      check.data_ptr<float>(), B, H, Tq, Tk, D, W, M);
  return {out, lse, rstat, colsum, win, pair, check};
}

bool has_sgemm() { return sgemm_ != nullptr; }
void set_force_mm(bool f) { g_force_mm = f; }

// tests: the vectorized exp used by the kernel, elementwise
at::Tensor exp_check(at::Tensor x, bool fast) {
  x = x.contiguous();
  auto y = at::empty_like(x);
  const float* px = x.data_ptr<float>();
  float* py = y.data_ptr<float>();
  const int64_t N = x.numel(), L = Vec::size();
  for (int64_t j = 0; j < N; j += L) {
    const int64_t c = std::min(L, N - j);
    Vec e = fast ? vexp<true>(Vec::loadu(px + j, c)) : vexp<false>(Vec::loadu(px + j, c));
    e.store(py + j, c);
  }
  return y;
}
"""

_lock = threading.Lock()
_module = None
_failed: str | None = None


def _enabled() -> bool:
    return os.environ.get("ATTNPROF_FUSED", "1").strip().lower() not in ("0", "false", "no", "off")


def _flags() -> tuple[str, list[str]]:
    cap = "DEFAULT"
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        pass
    # -fopenmp: at::parallel_for is a header template that is only parallel when compiled with
    # OpenMP (ATen's default backend); the process already has torch's libgomp loaded.
    flags = ["-O3", "-fopenmp"]
    if cap in ("AVX2", "AVX512"):  # the ATen vec headers pick AVX2 code from these macros
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
        cap = "AVX2"
    else:
        cap = "DEFAULT"
    return cap, flags


def _load():
    global _module, _failed
    with _lock:
        if _module is not None or _failed is not None:
            return _module
        try:
            from torch.utils.cpp_extension import load_inline

            cap, flags = _flags()
            # the source's hash in the name: another version (another checkout) builds its own
            name = f"attnprof_fused_rows_{cap.lower()}_{hashlib.sha1(_SOURCE.encode()).hexdigest()[:10]}"
            _announce_build(name)  # the name load_inline builds under
            _module = load_inline(
                name=name,
                cpp_sources=[_SOURCE],
                functions=["cell_rows", "batch_rows", "has_sgemm", "set_force_mm", "exp_check"],
                extra_cflags=flags,
                extra_ldflags=["-fopenmp"],
                with_cuda=False,
                verbose=False,
            )
        except Exception as e:  # build tools missing, compiler error, load error...
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            errs = [ln for ln in lines if "error" in ln.lower()]
            _failed = f"{type(e).__name__}: {(errs or lines or [''])[0][:300]}"
            warnings.warn(
                f"attnprof: the fused CPU row kernel could not be built ({_failed}); "
                f"using the eager path (set ATTNPROF_FUSED=0 to silence this)",
                RuntimeWarning,
                stacklevel=3,
            )
        return _module


def _announce_build(name: str) -> None:
    """One line on stderr before the first build (later processes load the cached library)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        folder = _get_build_directory(name, verbose=False)
        built = any(f.startswith(name) and f.endswith(".so") for f in os.listdir(folder))
    except Exception:  # a private torch helper: when it moves, announce rather than stay silent
        built = False
    if not built:
        print("attnprof: building the fused CPU kernel once, about 30 s", file=sys.stderr, flush=True)


def available() -> bool:
    """True when the fused kernel is enabled (``ATTNPROF_FUSED`` is not 0) and built; builds it once."""
    return _enabled() and _load() is not None


def _chunks(H: int, n: int, rows: int) -> int:
    """Row-block ranges per head: a function of the shape only, so results do not depend on threads."""
    nblocks = -(-n // rows)
    return max(1, min(nblocks, -(-16 // max(H, 1))))


def block_rows(n: int) -> int:
    return max(32, min(128, BLOCK_ELEMS // max(n, 1)))


def cell_rows(q, k, v, rows: int | None = None, fast_exp: bool = True):
    """``(out, lse, entropy, row_max, colsum)`` of one cell; q is already scaled; see the module doc.

    q, k, v: fp32 CPU ``[H, n, D]``. ``fast_exp`` uses ATen's ``exp_u20`` (the exp of SDPA's flash
    kernel: relative error < 4e-7 down to exp(-86), flushes to 0 below ~exp(-87.3)); False uses the
    1-ulp Sleef exp (about 20% slower). Call only when :func:`available` is True.
    """
    mod = _load()
    if mod is None:
        raise RuntimeError(f"the fused CPU row kernel is not available: {_failed}")
    H, n, _ = q.shape
    rows = block_rows(n) if rows is None else int(rows)
    out, lse, ent, rmax, colsum = mod.cell_rows(
        q.contiguous(), k.contiguous(), v.contiguous(), rows, _chunks(H, n, rows), fast_exp
    )
    return out, lse, ent, rmax, colsum


def batch_rows(q, k, v, cu_q, cu_k, slot, n_context, n_window, panel_slot, panel_at, n_counted: int, W: int,
               fast_exp: bool = True):
    """Every cell of a batch in one call (the per-cell loop runs in the compiled kernel).

    q: ``[Tq, H, D]`` fp32, already scaled, cells packed by ``cu_q [B + 1]``: each cell's n real rows
    first (in the order of its keys), then output-only rows. k, v: ``[Tk, H, D]`` the real tokens,
    packed by ``cu_k``. Per cell: ``slot`` (its counted-cell index, -1 if not counted), ``n_context``
    and ``n_window`` (leading real tokens in the context and the window). Per real token:
    ``panel_slot`` (its index among the cell's panel tokens, or -1); ``panel_at [C, M]`` the panel
    tokens' indices among the cell's real tokens (-1 past the count).

    Returns ``out [Tq, H, D]``, ``lse [H, Tq]``, ``row_stats [H, Tk, 4]`` (entropy, context mass, self
    mass, row max per real row), ``colsum [H, Tk]``, ``window [C, H, W, W]`` (P among each counted
    cell's first ``n_window`` real tokens), ``pair [C, H, M, M]`` (P among its panel tokens) and
    ``check [B * H]`` (the sum of each task's outputs: NaN or Inf where an output is not finite).
    """
    mod = _load()
    if mod is None:
        raise RuntimeError(f"the fused CPU row kernel is not available: {_failed}")
    return mod.batch_rows(q, k, v, cu_q, cu_k, slot, n_context, n_window, panel_slot, panel_at,
                          int(n_counted), int(W), fast_exp)  # fmt: skip
