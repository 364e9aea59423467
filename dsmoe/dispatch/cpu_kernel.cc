// The routed experts' SwiGLU, forward and backward, as two XLA:CPU FFI calls
// (float32). Built and loaded by cpu_kernel.py; the maths is expert_loop.py's.
//
// Inputs are a blocked layout (layout.py): expert e owns buffer rows
// start_e[e] .. start_e[e] + rows_e[e] - 1; row p holds token token_p[p] with
// gate gate_p[p] (0 for padding rows). The experts are split into contiguous
// ranges of about equal rows, one per thread; each thread runs its experts
// in chunks of up to `chunk` rows:
//
//   forward:  gather x rows -> g = x W_gate, u = x W_up (written straight into
//             the saved [P, 2F] activations) -> a = gate * silu(g) * u ->
//             y_rows = a W_down -> scatter-add into the thread's y [T, D];
//   backward: gather x and dy rows -> da = dy W_down^T -> dgate, dg, du ->
//             dx_rows = dg W_gate^T + du W_up^T (scatter-added into the
//             thread's dx) and the expert's weight gradients x^T dg, x^T du,
//             (gate * a)^T dy, summed over its chunks.
//
// Threads other than the first accumulate y / dx in private zeroed [T, D]
// buffers (threads - 1 of them, allocated per call) that are summed into the
// output at the end (by row ranges, in parallel). Each
// expert's weight gradients and each row's gate gradient are written by one
// thread only. The matmuls are single-threaded OpenBLAS sgemm calls.
#ifdef __linux__
#include <sched.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "cblas.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Layout {
  int64_t tokens, d, f, experts, rows;
  const float* gate_p;
  const int32_t* token_p;
  const int32_t* start_e;
  const int32_t* rows_e;
};

void sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
           const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  scipy_cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
                    trans_b ? CblasTrans : CblasNoTrans, m, n, k, 1.0f, a, lda, b, ldb, beta, c, ldc);
}

// exp(v) in a form the compiler vectorises (std::exp is a libm call per
// element unless -ffast-math, which we avoid: in a shared library it may set
// flush-to-zero for the whole process). Range reduction v = n ln2 + r with ln2
// in two parts, then the degree-7 minimax polynomial of the Cephes library's
// expf for e^r on |r| <= ln2 / 2, times 2^n built in
// the exponent bits. Inputs are clamped to [-87, 88], where 2^n is a normal
// float; NaN stays NaN.
float exp_approx(float v) {
  v = std::min(std::max(v, -87.0f), 88.0f);
  const float n = std::floor(v * 1.44269504088896341f + 0.5f);
  const float r = v - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

float sigmoid(float v) { return 1.0f / (1.0f + exp_approx(-v)); }

// a = gate * silu(g) * u for one row of F.
void swiglu_row(const float* __restrict g, const float* __restrict u, float gate, int64_t f,
                float* __restrict a) {
#pragma omp simd
  for (int64_t j = 0; j < f; ++j) a[j] = g[j] * sigmoid(g[j]) * u[j] * gate;
}

void gather_rows(const float* src, const int32_t* token, int64_t n, int64_t d, float* dst) {
  for (int64_t r = 0; r < n; ++r) std::memcpy(dst + r * d, src + int64_t{token[r]} * d, d * sizeof(float));
}

void scatter_add_rows(const float* src, const int32_t* token, int64_t n, int64_t d, float* dst) {
  for (int64_t r = 0; r < n; ++r) {
    float* out = dst + int64_t{token[r]} * d;
    const float* in = src + r * d;
    for (int64_t j = 0; j < d; ++j) out[j] += in[j];
  }
}

// Thread count: `requested`, or (0) the CPUs this process may run on; at most
// one per expert.
int64_t thread_count(int64_t requested, int64_t experts) {
  int64_t n = requested;
  if (n <= 0) {
#ifdef __linux__
    cpu_set_t set;
    n = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 1;
#else
    n = std::max<int64_t>(1, std::thread::hardware_concurrency());
#endif
  }
  return std::max<int64_t>(1, std::min(n, experts));
}

// first[i] .. first[i + 1] - 1: the experts of thread i (about equal rows each).
std::vector<int64_t> split_experts(const Layout& lay, int64_t threads) {
  int64_t total = 0;
  for (int64_t e = 0; e < lay.experts; ++e) total += lay.rows_e[e];
  std::vector<int64_t> first(threads + 1, lay.experts);
  first[0] = 0;
  int64_t acc = 0, i = 1;
  for (int64_t e = 0; e < lay.experts && i < threads; ++e) {
    acc += lay.rows_e[e];
    while (i < threads && acc * threads >= total * i) first[i++] = e + 1;
  }
  return first;
}

// Runs body(i, acc_i) on `threads` threads, acc_0 = out and the others private
// zeroed [T, D] buffers, then adds the private buffers into out.
template <typename Body>
void run_threads(int64_t threads, int64_t tokens, int64_t d, float* out, Body body) {
  const int64_t size = tokens * d;
  std::fill(out, out + size, 0.0f);
  std::vector<std::vector<float>> acc(threads - 1, std::vector<float>(size, 0.0f));
  std::vector<std::thread> pool;
  for (int64_t i = 1; i < threads; ++i) pool.emplace_back(body, i, acc[i - 1].data());
  body(0, out);
  for (auto& t : pool) t.join();
  if (threads == 1) return;
  pool.clear();
  auto reduce = [&](int64_t i) {
    const int64_t lo = size * i / threads, hi = size * (i + 1) / threads;
    for (const auto& a : acc)
      for (int64_t j = lo; j < hi; ++j) out[j] += a[j];
  };
  for (int64_t i = 1; i < threads; ++i) pool.emplace_back(reduce, i);
  reduce(0);
  for (auto& t : pool) t.join();
}

// Checks the call's shapes and indices, then splits the experts over the
// threads (*first: see split_experts).
ffi::Error plan(const Layout& lay, int64_t saved_cols, int64_t chunk, int64_t threads,
                std::vector<int64_t>* first) {
  if (lay.f * 2 != saved_cols) return ffi::Error::InvalidArgument("saved activations are not [P, 2F]");
  if (chunk <= 0) return ffi::Error::InvalidArgument("chunk must be positive");
  for (int64_t e = 0; e < lay.experts; ++e) {
    if (lay.start_e[e] < 0 || lay.rows_e[e] < 0 || lay.start_e[e] + lay.rows_e[e] > lay.rows)
      return ffi::Error::InvalidArgument("an expert's rows lie outside the row buffer");
    for (int64_t p = lay.start_e[e]; p < lay.start_e[e] + lay.rows_e[e]; ++p)
      if (lay.token_p[p] < 0 || lay.token_p[p] >= lay.tokens)
        return ffi::Error::InvalidArgument("a row's token index is out of range");
  }
  static const bool once = (scipy_openblas_set_num_threads(1), true);  // we thread over experts
  (void)once;
  *first = split_experts(lay, thread_count(threads, lay.experts));
  return ffi::Error::Success();
}

void forward_experts(const Layout& lay, int64_t chunk, int64_t e0, int64_t e1, const float* x,
                     const float* w_gate, const float* w_up, const float* w_down, float* y,
                     float* saved) {
  const int64_t d = lay.d, f = lay.f;
  std::vector<float> x_rows(chunk * d), a_rows(chunk * f), y_rows(chunk * d);
  for (int64_t e = e0; e < e1; ++e) {
    const float* wg = w_gate + e * d * f;
    const float* wu = w_up + e * d * f;
    const float* wd = w_down + e * f * d;
    for (int64_t p0 = lay.start_e[e], end = p0 + lay.rows_e[e]; p0 < end; p0 += chunk) {
      const int64_t n = std::min(chunk, end - p0);
      gather_rows(x, lay.token_p + p0, n, d, x_rows.data());
      float* gu = saved + p0 * 2 * f;  // [n, 2F]: g | u
      sgemm(false, false, n, f, d, x_rows.data(), d, wg, f, 0.0f, gu, 2 * f);
      sgemm(false, false, n, f, d, x_rows.data(), d, wu, f, 0.0f, gu + f, 2 * f);
      for (int64_t r = 0; r < n; ++r) {
        const float* g = gu + r * 2 * f;
        swiglu_row(g, g + f, lay.gate_p[p0 + r], f, a_rows.data() + r * f);
      }
      sgemm(false, false, n, d, f, a_rows.data(), f, wd, d, 0.0f, y_rows.data(), d);
      scatter_add_rows(y_rows.data(), lay.token_p + p0, n, d, y);
    }
  }
}

void backward_experts(const Layout& lay, int64_t chunk, int64_t e0, int64_t e1, const float* x,
                      const float* dy, const float* saved, const float* w_gate, const float* w_up,
                      const float* w_down, float* dx, float* dgate_p, float* dw_gate, float* dw_up,
                      float* dw_down) {
  const int64_t d = lay.d, f = lay.f;
  std::vector<float> x_rows(chunk * d), dy_rows(chunk * d), da(chunk * f), dgu(chunk * 2 * f),
      ga(chunk * f), dx_rows(chunk * d);
  for (int64_t e = e0; e < e1; ++e) {
    const float* wg = w_gate + e * d * f;
    const float* wu = w_up + e * d * f;
    const float* wd = w_down + e * f * d;
    float* dwg = dw_gate + e * d * f;
    float* dwu = dw_up + e * d * f;
    float* dwd = dw_down + e * f * d;
    if (lay.rows_e[e] == 0) {
      std::fill(dwg, dwg + d * f, 0.0f);
      std::fill(dwu, dwu + d * f, 0.0f);
      std::fill(dwd, dwd + f * d, 0.0f);
    }
    for (int64_t p0 = lay.start_e[e], end = p0 + lay.rows_e[e]; p0 < end; p0 += chunk) {
      const int64_t n = std::min(chunk, end - p0);
      const float beta = p0 == lay.start_e[e] ? 0.0f : 1.0f;  // weight gradients: sum over chunks
      gather_rows(x, lay.token_p + p0, n, d, x_rows.data());
      gather_rows(dy, lay.token_p + p0, n, d, dy_rows.data());
      sgemm(false, true, n, f, d, dy_rows.data(), d, wd, d, 0.0f, da.data(), f);  // dy W_down^T
      for (int64_t r = 0; r < n; ++r) {
        const float* g = saved + (p0 + r) * 2 * f;
        const float* u = g + f;
        const float gate = lay.gate_p[p0 + r];
        const float* da_r = da.data() + r * f;
        float* dg = dgu.data() + r * 2 * f;
        float* du = dg + f;
        float* ga_r = ga.data() + r * f;
        float dgate = 0.0f;
#pragma omp simd reduction(+ : dgate)
        for (int64_t j = 0; j < f; ++j) {
          const float sig = sigmoid(g[j]), silu = g[j] * sig, a = silu * u[j];
          dgate += a * da_r[j];
          const float dag = da_r[j] * gate;
          dg[j] = dag * u[j] * sig * (1.0f + g[j] * (1.0f - sig));
          du[j] = dag * silu;
          ga_r[j] = a * gate;
        }
        dgate_p[p0 + r] = dgate;
      }
      sgemm(false, true, n, d, f, dgu.data(), 2 * f, wg, f, 0.0f, dx_rows.data(), d);
      sgemm(false, true, n, d, f, dgu.data() + f, 2 * f, wu, f, 1.0f, dx_rows.data(), d);
      scatter_add_rows(dx_rows.data(), lay.token_p + p0, n, d, dx);
      sgemm(true, false, d, f, n, x_rows.data(), d, dgu.data(), 2 * f, beta, dwg, f);
      sgemm(true, false, d, f, n, x_rows.data(), d, dgu.data() + f, 2 * f, beta, dwu, f);
      sgemm(true, false, f, d, n, ga.data(), f, dy_rows.data(), d, beta, dwd, d);
    }
  }
}

Layout make_layout(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& gate_p,
                   ffi::Buffer<ffi::S32>& token_p, ffi::Buffer<ffi::S32>& start_e,
                   ffi::Buffer<ffi::S32>& rows_e, ffi::Buffer<ffi::F32>& w_gate) {
  const auto xd = x.dimensions();
  const auto wd = w_gate.dimensions();
  return Layout{xd[0], xd[1], wd[2], wd[0], token_p.dimensions()[0], gate_p.typed_data(),
                token_p.typed_data(), start_e.typed_data(), rows_e.typed_data()};
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> gate_p, ffi::Buffer<ffi::S32> token_p,
                   ffi::Buffer<ffi::S32> start_e, ffi::Buffer<ffi::S32> rows_e,
                   ffi::Buffer<ffi::F32> w_gate, ffi::Buffer<ffi::F32> w_up,
                   ffi::Buffer<ffi::F32> w_down, int64_t chunk, int64_t threads,
                   ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> saved) {
  const Layout lay = make_layout(x, gate_p, token_p, start_e, rows_e, w_gate);
  std::vector<int64_t> first;
  if (ffi::Error err = plan(lay, saved->dimensions()[1], chunk, threads, &first); !err.success())
    return err;
  run_threads(first.size() - 1, lay.tokens, lay.d, y->typed_data(), [&](int64_t i, float* acc) {
    forward_experts(lay, chunk, first[i], first[i + 1], x.typed_data(), w_gate.typed_data(),
                    w_up.typed_data(), w_down.typed_data(), acc, saved->typed_data());
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> gate_p,
                    ffi::Buffer<ffi::S32> token_p, ffi::Buffer<ffi::S32> start_e,
                    ffi::Buffer<ffi::S32> rows_e, ffi::Buffer<ffi::F32> saved,
                    ffi::Buffer<ffi::F32> w_gate, ffi::Buffer<ffi::F32> w_up,
                    ffi::Buffer<ffi::F32> w_down, int64_t chunk, int64_t threads,
                    ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dgate_p,
                    ffi::ResultBuffer<ffi::F32> dw_gate, ffi::ResultBuffer<ffi::F32> dw_up,
                    ffi::ResultBuffer<ffi::F32> dw_down) {
  const Layout lay = make_layout(x, gate_p, token_p, start_e, rows_e, w_gate);
  std::vector<int64_t> first;
  if (ffi::Error err = plan(lay, saved.dimensions()[1], chunk, threads, &first); !err.success())
    return err;
  std::fill(dgate_p->typed_data(), dgate_p->typed_data() + lay.rows, 0.0f);  // rows of no expert
  run_threads(first.size() - 1, lay.tokens, lay.d, dx->typed_data(), [&](int64_t i, float* acc) {
    backward_experts(lay, chunk, first[i], first[i + 1], x.typed_data(), dy.typed_data(),
                     saved.typed_data(), w_gate.typed_data(), w_up.typed_data(),
                     w_down.typed_data(), acc, dgate_p->typed_data(), dw_gate->typed_data(),
                     dw_up->typed_data(), dw_down->typed_data());
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DsmoeExpertFfnForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [T, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // gate_p [P]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // token_p [P]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // start_e [E]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // rows_e [E]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_gate [E, D, F]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_up [E, D, F]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_down [E, F, D]
                                  .Attr<int64_t>("chunk")
                                  .Attr<int64_t>("threads")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // y [T, D]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // saved g | u [P, 2F]

XLA_FFI_DEFINE_HANDLER_SYMBOL(DsmoeExpertFfnBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [T, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy [T, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // gate_p [P]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // token_p [P]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // start_e [E]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // rows_e [E]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // saved [P, 2F]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_gate [E, D, F]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_up [E, D, F]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_down [E, F, D]
                                  .Attr<int64_t>("chunk")
                                  .Attr<int64_t>("threads")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dx [T, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dgate_p [P]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dw_gate [E, D, F]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dw_up [E, D, F]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dw_down [E, F, D]
