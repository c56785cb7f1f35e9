// attnprof's fused CPU row kernels (see attnprof/kernels/fused_rows.py for the Python side).
//
// cell_rows: one cell, [H, n, D]; batch_rows: a batch, [rows, H, D]. Per task (a head and a
// range of row blocks, or a cell and a head) a block of scores S = Q K^T by a single-threaded matrix
// product, then per row (while it is in L1) the max, exp(s - max) in place with z and sum e (s - max)
// in the same loop, the column sums; then E V scaled by 1 / z. Tasks run under at::parallel_for.
//
// Matrix products go through ATen (at::cpu::mm_out on strided views of the buffers: libtorch's own BLAS
// call, with its own integer width), never through a hand-declared BLAS symbol.
#include <torch/extension.h>
#include <ATen/CPUFunctions.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

using Vec = at::vec::Vectorized<float>;

static bool g_force_mm = false;  // tests: the dispatcher's at::mm_out instead of at::cpu::mm_out

// A [rows x cols] float view of a raw buffer with the given strides (no dispatcher call, no copy).
static inline at::Tensor view2d(const float* p, int64_t rows, int64_t cols, int64_t row_stride,
                                int64_t col_stride) {
  return at::from_blob(const_cast<float*>(p), {rows, cols}, {row_stride, col_stride},
                       at::TensorOptions().dtype(at::kFloat));
}

// out = a @ b through ATen's CPU mm (libtorch's BLAS call on these strided views, beta = 0).
// A task makes its per-head views (K^T, V) once and only the per-block ones (Q, S, O) per block.
static inline void mm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (g_force_mm)
    at::mm_out(out, a, b);
  else
    at::cpu::mm_out(out, a, b);
}

template <bool FAST>
static inline Vec vexp(const Vec& x) {
  if constexpr (FAST) return x.exp_u20(); else return x.exp();
}

// sum of x[0 .. n) (a map bin's run of keys), vectorized.
static inline float run_sum(const float* x, int64_t n) {
  const int64_t L = Vec::size();
  int64_t j = 0;
  float tail = 0.f;
  if (n >= L) {
    Vec acc = Vec::loadu(x);
    for (j = L; j + L <= n; j += L) acc = acc + Vec::loadu(x + j);
    tail = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
  }
  for (; j < n; ++j) tail += x[j];
  return tail;
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
      if (b0 >= b1) continue;
      const at::Tensor KT = view2d(kh, D, n, 1, D);  // K^T [D x n]
      const at::Tensor Vh = view2d(vh, n, D, D, 1);  // V [n x D]
      at::Tensor Sfull = view2d(sbuf.data(), rows, n, n, 1);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r0 = b * rows, r = std::min(rows, n - r0);
        float* S = sbuf.data();
        at::Tensor Sv = r == rows ? Sfull : view2d(S, r, n, n, 1);
        // S [r x n] = Q[r0 : r0 + r] K^T
        mm(Sv, view2d(qh + r0 * D, r, D, D, 1), KT);
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
        // O [r x D] = E V (E = exp(S - max) in place of S)
        float* O = oh + r0 * D;
        at::Tensor Ov = view2d(O, r, D, D, 1);
        mm(Ov, Sv, Vh);
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
// q, k, v, out are [rows, H, D] (a row of every head together, as projections give them; q, k, v with any
// row and head strides). Queries of cell b: packed rows cu_q[b] .. cu_q[b+1], its n real rows first (in key
// order), then output-only rows (padded positions); keys: packed rows cu_k[b] .. cu_k[b+1] (n real tokens).
// A packed row is a row of q (of k, v) through q_map (k_map), or itself. A task gathers its head's keys and
// values into contiguous [n x D] buffers (contiguous operands: MKL packs them faster than rows H D apart)
// and each block's queries (times the scale), and writes its output rows scaled by 1 / z through q_map.
// Whole-context maps (NB > 0): map bin c holds the cell's keys medges[b][c] .. medges[b][c+1] (a run: bins
// are runs of positions and keys are in position order), and its real rows likewise. The rows of one query
// bin are added up while in L1 (one vectorized pass per row, as the column sums), and when the query bin
// ends that sum is reduced over the key bins' runs into the bin's row of maps[c, h], in float64 (the task
// owns it): NB short sums per query bin, not per row.

// q, k or v: packed row r of head h at p + map(r) * row_stride + h * head_stride (map: identity if null).
struct Rows {
  const float* p;
  int64_t row_stride, head_stride;
  const int64_t* rows;
  inline int64_t map(int64_t r) const { return rows ? rows[r] : r; }
  inline const float* row(int64_t r, int64_t h) const { return p + map(r) * row_stride + h * head_stride; }
};

// The summed rows of query bin a (qsum, n keys) into maps row a: one run sum per key bin; qsum is zeroed.
static inline void flush_query_bin(float* qsum, int64_t n, const int64_t* edge, int64_t NB, double* row) {
  for (int64_t u = 0; u < NB; ++u) row[u] += (double)run_sum(qsum + edge[u], edge[u + 1] - edge[u]);
  std::fill(qsum, qsum + n, 0.f);
}
template <bool FAST>
static void batch_impl(const Rows& q, const Rows& k, const Rows& v, float scale, const int64_t* cu_q,
                       const int64_t* cu_k, const int64_t* slot, const int64_t* nctx,
                       const int64_t* nwin, const int64_t* pslot, const int64_t* pat, float* out,
                       float* lse, float* rstat, float* colsum, float* win, float* pair, float* check,
                       const int64_t* medges, double* maps, int64_t B, int64_t H, int64_t Tq, int64_t Tk,
                       int64_t D, int64_t W, int64_t M, int64_t NB) {
  at::parallel_for(0, B * H, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> sbuf, zinv, qsum, kbuf, vbuf, qbuf, obuf;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / H, h = t % H;
      const int64_t q0 = cu_q[b], mq = cu_q[b + 1] - q0, k0 = cu_k[b], n = cu_k[b + 1] - k0;
      const int64_t c = slot[b], nc = nctx[b], nw = nwin[b];
      const int64_t HD = H * D;  // row stride of out
      float* cs = colsum + h * Tk + k0;
      std::fill(cs, cs + n, 0.f);
      const int64_t rows = std::max<int64_t>(32, std::min<int64_t>(128, (1 << 18) / std::max<int64_t>(n, 1)));
      sbuf.resize(rows * n); zinv.resize(rows); qbuf.resize(rows * D); obuf.resize(rows * D);
      kbuf.resize(n * D); vbuf.resize(n * D);
      if (mq == 0) { check[t] = 0.f; continue; }
      for (int64_t u = 0; u < n; ++u) {  // this head's keys and values, gathered in key order
        std::copy_n(k.row(k0 + u, h), D, kbuf.data() + u * D);
        std::copy_n(v.row(k0 + u, h), D, vbuf.data() + u * D);
      }
      const bool binned = NB > 0 && c >= 0;
      const int64_t* edge = binned ? medges + b * (NB + 1) : nullptr;
      double* map_rows = binned ? maps + (c * H + h) * NB * NB : nullptr;
      int64_t qbin = 0;  // the query bin of the rows summed in qsum (rows ascend)
      if (binned) qsum.assign(n, 0.f);
      const at::Tensor KT = view2d(kbuf.data(), D, n, 1, D);  // K^T [D x n] of head h
      const at::Tensor Vh = view2d(vbuf.data(), n, D, D, 1);  // V [n x D] of head h
      at::Tensor Sfull = view2d(sbuf.data(), rows, n, n, 1);
      at::Tensor Qfull = view2d(qbuf.data(), rows, D, D, 1), Ofull = view2d(obuf.data(), rows, D, D, 1);
      double osum = 0.0;
      const Vec vscale(scale);
      for (int64_t r0 = 0; r0 < mq; r0 += rows) {
        const int64_t r = std::min(rows, mq - r0);
        float* S = sbuf.data();
        at::Tensor Sv = r == rows ? Sfull : view2d(S, r, n, n, 1);
        for (int64_t i = 0; i < r; ++i) {  // the block's queries, gathered and scaled (q * scale in fp32)
          const float* src = q.row(q0 + r0 + i, h);
          float* dst = qbuf.data() + i * D;
          int64_t j = 0;
          for (; j + Vec::size() <= D; j += Vec::size()) (Vec::loadu(src + j) * vscale).store(dst + j);
          for (; j < D; ++j) dst[j] = src[j] * scale;
        }
        mm(Sv, r == rows ? Qfull : view2d(qbuf.data(), r, D, D, 1), KT);  // S [r x n] = Q[r0 : r0 + r] K^T
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
          if (binned) {
            if (row >= edge[qbin + 1]) {  // a new query bin (bins without real tokens skipped)
              if (row > edge[qbin]) flush_query_bin(qsum.data(), n, edge, NB, map_rows + qbin * NB);
              while (row >= edge[qbin + 1]) ++qbin;
            }
            float* qs = qsum.data();
            for (j = 0; j + L <= n; j += L) at::vec::fmadd(Vec::loadu(s + j), viz, Vec::loadu(qs + j)).store(qs + j);
            for (; j < n; ++j) qs[j] += s[j] * iz;
          }
        }
        at::Tensor Ov = r == rows ? Ofull : view2d(obuf.data(), r, D, D, 1);
        mm(Ov, Sv, Vh);  // O [r x D] = E V
        for (int64_t i = 0; i < r; ++i) {  // scaled by 1 / z into the query's row of out
          const Vec viz(zinv[i]);
          const float* ob = obuf.data() + i * D;
          float* o = out + q.map(q0 + r0 + i) * HD + h * D;
          Vec acc(0.f);
          int64_t j = 0;
          for (; j + Vec::size() <= D; j += Vec::size()) {
            Vec x = Vec::loadu(ob + j) * viz;
            x.store(o + j);
            acc = acc + x;
          }
          float tail = 0.f;
          for (; j < D; ++j) { o[j] = ob[j] * zinv[i]; tail += o[j]; }
          osum += at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc) + tail;
        }
      }
      if (binned) flush_query_bin(qsum.data(), n, edge, NB, map_rows + qbin * NB);  // the last query bin
      check[t] = (float)osum;  // NaN or Inf when any output of the task is not finite
    }
  });
}

std::vector<at::Tensor> batch_rows(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor cu_q,
                                   at::Tensor cu_k, at::Tensor slot, at::Tensor nctx, at::Tensor nwin,
                                   at::Tensor pslot, at::Tensor pat, int64_t C, int64_t W,
                                   bool fast_exp, at::Tensor medges, std::optional<at::Tensor> q_map,
                                   std::optional<at::Tensor> k_map, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes() && q.size(1) == k.size(1) &&
              q.size(2) == k.size(2), "q [Tq, H, D], k and v [Tk, H, D]");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat &&
              v.scalar_type() == at::kFloat, "fp32 only");
  auto rowwise = [](at::Tensor x) { return x.stride(2) == 1 ? x : x.contiguous(); };  // any row, head strides
  q = rowwise(q); k = rowwise(k); v = rowwise(v);
  auto i64 = [](at::Tensor x) { return x.to(at::kLong).contiguous(); };
  // q_map, k_map: the row of q (of k and v) of each packed row; none: the rows are packed already
  const bool qmap = q_map.has_value(), kmap = k_map.has_value();
  const at::Tensor q_rows = qmap ? i64(*q_map) : at::Tensor(), k_rows = kmap ? i64(*k_map) : at::Tensor();
  const int64_t H = q.size(1), Tq = qmap ? q_rows.numel() : q.size(0), Tk = kmap ? k_rows.numel() : k.size(0);
  const int64_t D = q.size(2), B = cu_q.numel() - 1, M = pat.size(1);
  // out: q's row space ([rows of q, H, D], contiguous); each packed query row writes its own row
  auto out = at::empty({q.size(0), H, D}, q.options());
  auto lse = at::empty({H, Tq}, q.options());
  auto rstat = at::zeros({H, Tk, 4}, q.options());
  auto colsum = at::empty({H, Tk}, q.options());
  auto win = at::zeros({C, H, W, W}, q.options());
  auto pair = at::zeros({C, H, M, M}, q.options());
  auto check = at::zeros({B * H}, q.options());
  const int64_t NB = medges.dim() == 2 ? medges.size(1) - 1 : 0;
  TORCH_CHECK(NB == 0 || medges.size(0) == B, "map edges must be [B, NB + 1]");
  auto maps = at::zeros({C, H, NB, NB}, q.options().dtype(at::kDouble));
  cu_q = i64(cu_q); cu_k = i64(cu_k); slot = i64(slot); nctx = i64(nctx); nwin = i64(nwin);
  pslot = i64(pslot); pat = i64(pat); medges = i64(medges);
  auto impl = fast_exp ? batch_impl<true> : batch_impl<false>;  // one signature, two exponentials
  auto rows = [](const at::Tensor& x, bool mapped, const at::Tensor& map) {
    return Rows{x.data_ptr<float>(), x.stride(0), x.stride(1), mapped ? map.data_ptr<int64_t>() : nullptr};
  };
  impl(rows(q, qmap, q_rows), rows(k, kmap, k_rows), rows(v, kmap, k_rows), (float)scale, cu_q.data_ptr<int64_t>(),
       cu_k.data_ptr<int64_t>(), slot.data_ptr<int64_t>(), nctx.data_ptr<int64_t>(), nwin.data_ptr<int64_t>(),
       pslot.data_ptr<int64_t>(), pat.data_ptr<int64_t>(), out.data_ptr<float>(), lse.data_ptr<float>(),
       rstat.data_ptr<float>(), colsum.data_ptr<float>(), win.data_ptr<float>(), pair.data_ptr<float>(),
       check.data_ptr<float>(), NB ? medges.data_ptr<int64_t>() : nullptr, maps.data_ptr<double>(), B, H, Tq, Tk,
       D, W, M, NB);
  return {out, lse, rstat, colsum, win, pair, check, maps};
}

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

void scatter_rows_add(at::Tensor t, const at::Tensor& rows, const at::Tensor& slots, const at::Tensor& value);  // scatter_rows.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cell_rows", &cell_rows, "one cell's fused row pass");
  m.def("batch_rows", &batch_rows, "a packed batch's fused row pass");
  m.def("scatter_rows_add", &scatter_rows_add, "t[rows, m, slots] += value, a task per (row, m)");
  m.def("set_force_mm", &set_force_mm, "tests: products through the dispatcher's at::mm_out");
  m.def("exp_check", &exp_check, "tests: the kernel's vectorized exp, elementwise");
}
