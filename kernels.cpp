// Four ops for decoding on CPUs with AVX512-VNNI (inference.py builds this file on first use).
// int4_matvec, Int4Linear's product: decoding reads every weight once a token, so the product must
// keep up with memory; the nibbles are multiplied as integers, 64 a VNNI instruction, instead of
// being converted to floats first as ATen's int4 kernel does (2.4x its speed: docs/experiments.md).
// bf16_matvec and int8_matvec, MatvecLinear's product for bf16 weights and Int8Linear's: the same
// streaming with fewer instructions than inductor's loops.
// one_query_attention, a compiled decode step's attention: one call a layer over the tokens so far.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>
#include <immintrin.h>
#include <vector>

#if !defined(__AVX512VNNI__) || !defined(__AVX512VL__)
#error "kernels.cpp needs AVX512-VNNI"
#endif

// The ops compute in fp32: their output for x [..., K] is [..., N], handed back in x's dtype.
static torch::Tensor rows_out(const torch::Tensor& x, int64_t N) {
  auto shape = x.sizes().vec(); shape.back() = N;
  return torch::empty(shape, torch::kFloat);
}
static torch::Tensor in_dtype_of(const torch::Tensor& y, const torch::Tensor& x) {
  return x.scalar_type() == torch::kFloat ? y : y.to(x.scalar_type());
}

// x [..., K] times int4 weights in llama.cpp's Q4_1 scheme: w = scale * q + offset, q in 0..15, one
// scale and offset (fp16) per group of 32 inputs. weight: uint8 [N, K/2], in each group's 16 bytes
// byte j holds input j (low nibble) and input j+16 (high nibble). The activations are integers too,
// so 64 products are one instruction (VNNI): per group of 32, x = step * (a + b / 128) with int8 a
// and b. llama.cpp's Q4_1 x Q8_1 keeps only a, which moved SmolLM2's logits 5x more than bf16
// activations; b makes the rounding ~1/32000 of the group's largest activation. The offsets take
// the exact float sums of the activations.
torch::Tensor int4_matvec(torch::Tensor x, torch::Tensor weight, torch::Tensor scale, torch::Tensor offset) {
  const int64_t K = x.size(-1), N = weight.size(0), G = K / 32, R = x.numel() / K;
  TORCH_CHECK(K % 64 == 0 && weight.size(1) == K / 2 && scale.size(1) == G && offset.size(1) == G);
  auto xt = x.to(torch::kFloat).contiguous();  // the same tensor for contiguous fp32
  const float* xf = xt.data_ptr<float>();
  std::vector<float> xstep(R * G), xsum(R * G);
  // a and b ordered as the nibbles are read: per 128 inputs (4 groups; 64 at the end of a row of
  // 64 * odd inputs) the low halves of the groups, then their high halves
  std::vector<int8_t> xa(R * K), xb(R * K);
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
      for (int64_t g = 0; g < G; g++) {
        const float* v = xf + r * K + g * 32;
        float amax = 0, sum = 0;
        for (int j = 0; j < 32; j++) { amax = std::max(amax, std::abs(v[j])); sum += v[j]; }
        const float inv = amax > 0 ? 127 / amax : 0;
        xstep[r * G + g] = amax / 127 / 128; xsum[r * G + g] = sum;
        const int64_t first = g / 4 * 4, groups = std::min<int64_t>(4, G - first), i = g - first;
        for (int j = 0; j < 32; j++) {
          const int64_t at = r * K + first * 32 + (j < 16 ? i : groups + i) * 16 + j % 16;
          const float t = v[j] * inv;
          xa[at] = (int8_t)std::nearbyint(t);
          xb[at] = (int8_t)std::nearbyint((t - xa[at]) * 128);
        }
      }
    }
  });
  auto y = rows_out(x, N);
  float* out = y.data_ptr<float>();
  const uint8_t* w = weight.data_ptr<uint8_t>();
  const uint16_t* d = (const uint16_t*)scale.data_ptr<at::Half>();
  const uint16_t* m = (const uint16_t*)offset.data_ptr<at::Half>();
  const __m512i lanes = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);  // 4 int32 sums a group
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t r = 0; r < R; r++) {
      const int8_t *a = xa.data() + r * K, *b = xb.data() + r * K;
      const float *xs = xstep.data() + r * G, *xt = xsum.data() + r * G;
      for (int64_t n = n0; n < n1; n++) {
        const uint8_t* row = w + n * K / 2;
        const uint16_t *dn = d + n * G, *mn = m + n * G;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t g = 0; g < G; g += 16) {  // the offsets: sum over groups of m * (sum of x)
          const __mmask16 k = G - g >= 16 ? 0xFFFF : (__mmask16)((1u << (G - g)) - 1);
          acc = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, mn + g)), _mm512_maskz_loadu_ps(k, xt + g), acc);
        }
        int64_t g = 0;
        for (; g + 4 <= G; g += 4) {  // 4 groups: 64 bytes of weights
          const __m512i v = _mm512_loadu_si512(row + g * 16);
          const __m512i low = _mm512_and_si512(v, nibble), high = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
          __m512i sa = _mm512_dpbusd_epi32(_mm512_setzero_si512(), low, _mm512_loadu_si512(a + g * 32));
          sa = _mm512_dpbusd_epi32(sa, high, _mm512_loadu_si512(a + g * 32 + 64));
          __m512i sb = _mm512_dpbusd_epi32(_mm512_setzero_si512(), low, _mm512_loadu_si512(b + g * 32));
          sb = _mm512_dpbusd_epi32(sb, high, _mm512_loadu_si512(b + g * 32 + 64));
          const __m512i s = _mm512_add_epi32(_mm512_slli_epi32(sa, 7), sb);  // 128 a + b
          const __m128 ds = _mm_mul_ps(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)(dn + g))), _mm_loadu_ps(xs + g));
          acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(ds)), acc);
        }
        float rest = 0;
        if (g < G) {  // 2 groups left: the same in 256-bit registers
          const __m256i v = _mm256_loadu_si256((const __m256i*)(row + g * 16)), nib = _mm256_set1_epi8(0x0F);
          const __m256i low = _mm256_and_si256(v, nib), high = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
          __m256i sa = _mm256_dpbusd_epi32(_mm256_setzero_si256(), low, _mm256_loadu_si256((const __m256i*)(a + g * 32)));
          sa = _mm256_dpbusd_epi32(sa, high, _mm256_loadu_si256((const __m256i*)(a + g * 32 + 32)));
          __m256i sb = _mm256_dpbusd_epi32(_mm256_setzero_si256(), low, _mm256_loadu_si256((const __m256i*)(b + g * 32)));
          sb = _mm256_dpbusd_epi32(sb, high, _mm256_loadu_si256((const __m256i*)(b + g * 32 + 32)));
          alignas(32) int32_t sums[8];
          _mm256_store_si256((__m256i*)sums, _mm256_add_epi32(_mm256_slli_epi32(sa, 7), sb));
          for (int i = 0; i < 2; i++)
            rest += _cvtsh_ss(dn[g + i]) * xs[g + i] * (sums[4 * i] + sums[4 * i + 1] + sums[4 * i + 2] + sums[4 * i + 3]);
        }
        out[r * N + n] = _mm512_reduce_add_ps(acc) + rest;
      }
    }
  });
  return in_dtype_of(y, x);
}

// MatvecLinear's and Int8Linear's products in a compiled decode step: x [R, K] (fp32) times a
// weight matrix streamed 64 bytes at a time, each line turned into L vectors of 16 fp32 weights by
// `line`; up to 4 rows of x share each read of the weights. For one row 5 (bf16) and 12 (int8)
// instructions a line where inductor's loops took ~11 and ~16, which kept fewer lines in flight and
// streamed ~1.3x slower (docs/experiments.md). out[r, n] = sum * scale[n].
template <int R, int L, typename Line>
static void rows(const float* x, const char* w, const float* scale, float* out, int64_t N, int64_t K, Line line) {
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++) {
      const char* row = w + n * K / (16 * L) * 64;
      __m512 acc[R][L];
      for (int r = 0; r < R; r++) for (int l = 0; l < L; l++) acc[r][l] = _mm512_setzero_ps();
      for (int64_t k = 0; k < K; k += 16 * L) {
        __m512 v[L];
        line(row + k / (16 * L) * 64, v);
        for (int r = 0; r < R; r++)
          for (int l = 0; l < L; l++) acc[r][l] = _mm512_fmadd_ps(v[l], _mm512_loadu_ps(x + r * K + k + 16 * l), acc[r][l]);
      }
      for (int r = 0; r < R; r++) {
        for (int l = 1; l < L; l++) acc[r][0] = _mm512_add_ps(acc[r][0], acc[r][l]);
        out[r * N + n] = _mm512_reduce_add_ps(acc[r][0]) * (scale ? scale[n] : 1.f);
      }
    }
  });
}

template <int L, typename Line>
static torch::Tensor matvec(const float* x, const torch::Tensor& like, const torch::Tensor& weight, const float* scale, Line line) {
  const int64_t N = weight.size(0), K = like.size(-1), R = like.numel() / K;
  TORCH_CHECK(K % (16 * L) == 0 && weight.size(1) == K && weight.is_contiguous());
  auto y = rows_out(like, N);
  const char* w = (const char*)weight.data_ptr();
  for (int64_t r = 0; r < R; r += 4) {
    const float* xr = x + r * K;
    float* out = y.data_ptr<float>() + r * N;
    switch (std::min<int64_t>(4, R - r)) {
      case 1: rows<1, L>(xr, w, scale, out, N, K, line); break;
      case 2: rows<2, L>(xr, w, scale, out, N, K, line); break;
      case 3: rows<3, L>(xr, w, scale, out, N, K, line); break;
      default: rows<4, L>(xr, w, scale, out, N, K, line);
    }
  }
  return in_dtype_of(y, like);
}

// x [..., K] times bf16 weights [N, K]: a line (32 inputs) becomes fp32 with one shift (its even
// inputs) and one mask (its odd ones), which meet the activations, reordered to match once a call.
torch::Tensor bf16_matvec(torch::Tensor x, torch::Tensor weight) {
  TORCH_CHECK(weight.scalar_type() == torch::kBFloat16);
  auto xt = x.to(torch::kFloat).contiguous();
  const float* xf = xt.data_ptr<float>();
  // per 32 inputs the 16 even ones, then the 16 odd ones; a buffer kept between calls, since the
  // step makes ~150 of them a token
  thread_local std::vector<float> xs;
  xs.resize(x.numel());
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  for (int64_t i = 0; i + 32 <= x.numel(); i += 32) {
    const __m512 a = _mm512_loadu_ps(xf + i), b = _mm512_loadu_ps(xf + i + 16);
    _mm512_storeu_ps(xs.data() + i, _mm512_permutex2var_ps(a, even, b));
    _mm512_storeu_ps(xs.data() + i + 16, _mm512_permutex2var_ps(a, odd, b));
  }
  const __m512i high = _mm512_set1_epi32(0xFFFF0000);
  return matvec<2>(xs.data(), x, weight, nullptr, [&](const char* p, __m512* v) {
    const __m512i line = _mm512_loadu_si512(p);
    v[0] = _mm512_castsi512_ps(_mm512_slli_epi32(line, 16));
    v[1] = _mm512_castsi512_ps(_mm512_and_si512(line, high));
  });
}

// x [..., K] times int8 weights [N, K] with one fp32 scale per output (Int8Linear's absmax scheme):
// a line is 64 inputs, 16 at a time sign-extended and converted.
torch::Tensor int8_matvec(torch::Tensor x, torch::Tensor weight, torch::Tensor scale) {
  TORCH_CHECK(weight.scalar_type() == torch::kChar && scale.scalar_type() == torch::kFloat && scale.numel() == weight.size(0));
  auto xt = x.to(torch::kFloat).contiguous();
  return matvec<4>(xt.data_ptr<float>(), x, weight, scale.contiguous().data_ptr<float>(), [](const char* p, __m512* v) {
    for (int l = 0; l < 4; l++) v[l] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(p + 16 * l))));
  });
}

// softmax(q k^T / sqrt(D)) v for one query a head, a decode step's attention: q [B, H, 1, D], the
// caches k, v [B, KV, L, D] (H / KV query heads share a cache head), mask [B, 1, 1, L] (true:
// attend). Positions the mask hides are skipped, so the cost follows the tokens so far, not the
// cache's length; one call a layer instead of two small matrix products (~37 us each in MKL).
static __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
static __m512 load16(const at::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

template <typename T>
static void attend(const float* q, const T* k, const T* v, const bool* mask, float* out,
                   int64_t B, int64_t H, int64_t KV, int64_t L, int64_t D) {
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> p(L);
    for (int64_t i = i0; i < i1; i++) {
      const int64_t b = i / H, head = (b * KV + i % H / (H / KV)) * L * D;
      const float* qi = q + i * D;
      const bool* m = mask + b * L;
      float top = -INFINITY, sum = 0, scale = 1 / std::sqrt((float)D);
      for (int64_t l = 0; l < L; l++) {
        if (!m[l]) continue;
        __m512 s = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) s = _mm512_fmadd_ps(_mm512_loadu_ps(qi + d), load16(k + head + l * D + d), s);
        p[l] = _mm512_reduce_add_ps(s) * scale;
        top = std::max(top, p[l]);
      }
      float* o = out + i * D;
      std::fill(o, o + D, 0.f);
      for (int64_t l = 0; l < L; l++) {
        if (!m[l]) continue;
        const float e = std::exp(p[l] - top);
        sum += e;
        for (int64_t d = 0; d < D; d += 16)
          _mm512_storeu_ps(o + d, _mm512_fmadd_ps(_mm512_set1_ps(e), load16(v + head + l * D + d), _mm512_loadu_ps(o + d)));
      }
      for (int64_t d = 0; d < D; d++) o[d] /= sum;
    }
  });
}

torch::Tensor one_query_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor mask) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), KV = k.size(1), L = k.size(2);
  TORCH_CHECK(q.size(2) == 1 && H % KV == 0 && D % 16 == 0 && k.is_contiguous() && v.is_contiguous() && k.scalar_type() == v.scalar_type()
              && mask.numel() == B * L && mask.scalar_type() == torch::kBool);
  auto qf = q.to(torch::kFloat).contiguous();
  auto m = mask.contiguous();
  auto out = torch::empty({B, H, 1, D}, torch::kFloat);
  if (k.scalar_type() == torch::kFloat)
    attend(qf.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), m.data_ptr<bool>(), out.data_ptr<float>(), B, H, KV, L, D);
  else
    attend(qf.data_ptr<float>(), k.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>(), m.data_ptr<bool>(), out.data_ptr<float>(), B, H, KV, L, D);
  return in_dtype_of(out, q);
}

// The same ops as C functions for AOTInductor (inference.py's ExportedStep), which calls these
// directly; without them each call goes through its proxy executor, which rebuilds the arguments
// for the dispatcher (~1 us a call, 181 calls a SmolLM2 token: docs/experiments.md).
static torch::Tensor& T(AtenTensorHandle h) { return *torch::aot_inductor::tensor_handle_to_tensor_pointer(h); }
extern "C" {
AOTITorchError aoti_torch_cpu_int4_matvec(AtenTensorHandle x, AtenTensorHandle w, AtenTensorHandle s, AtenTensorHandle o, AtenTensorHandle* ret) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({ *ret = torch::aot_inductor::new_tensor_handle(int4_matvec(T(x), T(w), T(s), T(o))); });
}
AOTITorchError aoti_torch_cpu_bf16_matvec(AtenTensorHandle x, AtenTensorHandle w, AtenTensorHandle* ret) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({ *ret = torch::aot_inductor::new_tensor_handle(bf16_matvec(T(x), T(w))); });
}
AOTITorchError aoti_torch_cpu_int8_matvec(AtenTensorHandle x, AtenTensorHandle w, AtenTensorHandle s, AtenTensorHandle* ret) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({ *ret = torch::aot_inductor::new_tensor_handle(int8_matvec(T(x), T(w), T(s))); });
}
AOTITorchError aoti_torch_cpu_one_query_attention(AtenTensorHandle q, AtenTensorHandle k, AtenTensorHandle v, AtenTensorHandle m, AtenTensorHandle* ret) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({ *ret = torch::aot_inductor::new_tensor_handle(one_query_attention(T(q), T(k), T(v), T(m))); });
}
}

TORCH_LIBRARY(picovlm, lib) {
  lib.def("int4_matvec(Tensor x, Tensor weight, Tensor scale, Tensor offset) -> Tensor");
  lib.def("one_query_attention(Tensor q, Tensor k, Tensor v, Tensor mask) -> Tensor");
  lib.def("bf16_matvec(Tensor x, Tensor weight) -> Tensor");
  lib.def("int8_matvec(Tensor x, Tensor weight, Tensor scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(picovlm, CPU, lib) {
  lib.impl("int4_matvec", &int4_matvec);
  lib.impl("one_query_attention", &one_query_attention);
  lib.impl("bf16_matvec", &bf16_matvec);
  lib.impl("int8_matvec", &int8_matvec);
}
