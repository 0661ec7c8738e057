#include <torch/extension.h>
#include <ATen/Parallel.h>

typedef float v16 __attribute__((vector_size(64)));

static inline float hsum(v16 v) {
  float s = 0;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}
static inline v16 load16(const float* p) { v16 v; __builtin_memcpy(&v, p, 64); return v; }
static inline void store16(float* p, v16 v) { __builtin_memcpy(p, &v, 64); }

// out[r, j] = dot(w[j, :], x[r, :]) for r < R, j in [j0, j1); K % 16 == 0
template <int R>
static void dot_rows(const float* x, const float* w, int64_t j0, int64_t j1, int64_t K, float* out, int64_t M) {
  for (int64_t j = j0; j < j1; j += 2) {
    const float* w0 = w + j * K;
    const float* w1 = w + (j + 1) * K;
    v16 a0[R], a1[R];
    for (int r = 0; r < R; ++r) { a0[r] = v16{}; a1[r] = v16{}; }
    for (int64_t k = 0; k < K; k += 16) {
      v16 b0 = load16(w0 + k), b1 = load16(w1 + k);
      for (int r = 0; r < R; ++r) {
        v16 xv = load16(x + r * K + k);
        a0[r] += b0 * xv;
        a1[r] += b1 * xv;
      }
    }
    for (int r = 0; r < R; ++r) { out[r * M + j] = hsum(a0[r]); out[r * M + j + 1] = hsum(a1[r]); }
  }
}

// out[r, c0:c0+32] = sum_k h[r, k] * w[k, c0:c0+32] for r < R
template <int R>
static void axpy_rows(const float* h, const float* w, int64_t K, int64_t M, int64_t c0, float* out) {
  v16 a0[R], a1[R];
  for (int r = 0; r < R; ++r) { a0[r] = v16{}; a1[r] = v16{}; }
  for (int64_t k = 0; k < K; ++k) {
    v16 b0 = load16(w + k * M + c0), b1 = load16(w + k * M + c0 + 16);
    for (int r = 0; r < R; ++r) {
      float hv = h[r * K + k];
      a0[r] += hv * b0;
      a1[r] += hv * b1;
    }
  }
  for (int r = 0; r < R; ++r) { store16(out + r * M + c0, a0[r]); store16(out + r * M + c0 + 16, a1[r]); }
}

#define DISPATCH(n, F, ...) switch (n) { \
  case 8: F<8>(__VA_ARGS__); break; case 7: F<7>(__VA_ARGS__); break; case 6: F<6>(__VA_ARGS__); break; \
  case 5: F<5>(__VA_ARGS__); break; case 4: F<4>(__VA_ARGS__); break; case 3: F<3>(__VA_ARGS__); break; \
  case 2: F<2>(__VA_ARGS__); break; default: F<1>(__VA_ARGS__); }

torch::Tensor rows_dot(torch::Tensor x, torch::Tensor w, torch::Tensor offs) {
  x = x.contiguous(); w = w.contiguous();
  int64_t P = x.size(0), K = x.size(1), N = w.size(0), M = w.size(1);
  TORCH_CHECK(K % 16 == 0 && M % 2 == 0);
  auto out = torch::empty({P, M}, x.options());
  auto offs_c = offs.to(torch::kLong).contiguous();
  const int64_t* o = offs_c.data_ptr<int64_t>();
  constexpr int64_t JB = 32;
  int64_t jblocks = (M + JB - 1) / JB;
  const float* xp = x.data_ptr<float>(); const float* wp = w.data_ptr<float>(); float* op = out.data_ptr<float>();
  at::parallel_for(0, N * jblocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int64_t e = t / jblocks, jb = t % jblocks;
      int64_t s = e ? o[e - 1] : 0, end = o[e];
      int64_t j0 = jb * JB, j1 = std::min(M, j0 + JB);
      for (int64_t r = s; r < end; r += 8) {
        int64_t n = std::min<int64_t>(8, end - r);
        DISPATCH(n, dot_rows, xp + r * K, wp + e * M * K, j0, j1, K, op + r * M, M)
      }
    }
  });
  return out;
}

torch::Tensor rows_axpy(torch::Tensor h, torch::Tensor w, torch::Tensor offs) {
  h = h.contiguous(); w = w.contiguous();
  int64_t P = h.size(0), K = h.size(1), N = w.size(0), M = w.size(2);
  TORCH_CHECK(M % 32 == 0, "M must be a multiple of 32");
  auto out = torch::empty({P, M}, h.options());
  auto offs_c = offs.to(torch::kLong).contiguous();
  const int64_t* o = offs_c.data_ptr<int64_t>();
  constexpr int64_t C = 32;
  int64_t cblocks = M / C;
  const float* hp = h.data_ptr<float>(); const float* wp = w.data_ptr<float>(); float* op = out.data_ptr<float>();
  at::parallel_for(0, N * (cblocks / 4), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int64_t e = t / (cblocks / 4), cb4 = t % (cblocks / 4);
      int64_t s = e ? o[e - 1] : 0, end = o[e];
      for (int64_t cb = cb4 * 4; cb < cb4 * 4 + 4; ++cb)
        for (int64_t r = s; r < end; r += 8) {
          int64_t n = std::min<int64_t>(8, end - r);
          DISPATCH(n, axpy_rows, hp + r * K, wp + e * K * M, K, M, cb * C, op + r * M)
        }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rows_dot", &rows_dot);
  m.def("rows_axpy", &rows_axpy);
}
