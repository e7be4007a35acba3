// CPU implementation of the fused artifact-confidence op, and the op schemas.
//
// Layout of the work: the output columns of each image are cut into blocks of kBlock columns,
// and each (image, column block) pair is one task of an OpenMP loop (at::parallel_for, so
// torch.set_num_threads applies). A task first interpolates its columns horizontally for all
// h source rows (an h x kBlock strip), then walks the H output rows: each output row is a lerp
// of two strip rows, followed by the sigmoid and the reduction, in loops the compiler
// vectorises (`omp simd`). Partial results are combined in a fixed order, so results do not
// depend on the number of threads. The backward pass recomputes the same values and
// accumulates the gradient into an h x W buffer (the vertical half of the transposed
// interpolation), then scatters each of its rows onto the w source columns.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "artifact_confidence.h"

// The build passes -DDD_NATIVE_SOURCE_HASH=<hex digest of csrc/> (dd/ops/build.py).
#define DD_STRINGIFY_(x) #x
#define DD_STRINGIFY(x) DD_STRINGIFY_(x)
#ifdef DD_NATIVE_SOURCE_HASH
#define DD_NATIVE_BUILD_INFO DD_STRINGIFY(DD_NATIVE_SOURCE_HASH)
#else
#define DD_NATIVE_BUILD_INFO "unknown"
#endif

namespace dd_native {

Reduction parse_reduction(c10::string_view reduction) {
  if (reduction == "mean") return kMean;
  if (reduction == "max") return kMax;
  if (reduction == "sum") return kSum;
  if (reduction == "weighted") return kWeighted;
  TORCH_CHECK(false, "unknown reduction '", std::string(reduction), "'");
}

void check_inputs(
    const at::Tensor& logits,
    int64_t out_h,
    int64_t out_w,
    const std::optional<at::Tensor>& target,
    const std::optional<at::Tensor>& weight) {
  TORCH_CHECK(logits.dim() == 4 && logits.size(1) == 1, "logits must be B x 1 x h x w");
  TORCH_CHECK(logits.size(2) > 0 && logits.size(3) > 0, "logits must not be empty");
  TORCH_CHECK(out_h > 0 && out_w > 0, "out_size must be positive");
  TORCH_CHECK(logits.is_contiguous(), "logits must be contiguous");
  for (const auto* opt : {&target, &weight}) {
    if (opt->has_value()) {
      const at::Tensor& m = opt->value();
      TORCH_CHECK(
          m.dim() == 4 && m.size(0) == logits.size(0) && m.size(1) == 1 && m.size(2) == out_h &&
              m.size(3) == out_w,
          "target and weight must be B x 1 x H x W");
      TORCH_CHECK(m.scalar_type() == logits.scalar_type(), "target and weight need the logits dtype");
      TORCH_CHECK(m.device() == logits.device(), "target and weight must be on the logits device");
      TORCH_CHECK(m.is_contiguous(), "target and weight must be contiguous");
    }
  }
}

namespace {

constexpr int64_t kBlock = 64;  // output columns per task

// The per-block loops are compiled twice on x86-64 with GCC: for AVX2/FMA (x86-64-v3) and for
// the baseline; the loader picks the clone the CPU supports.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DD_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define DD_MULTIVERSION
#endif

// Source taps of every output index along one axis.
template <typename acc_t>
struct Axis {
  std::vector<int64_t> i0, i1;
  std::vector<acc_t> l0, l1;
  Axis(int64_t in_size, int64_t out_size) : i0(out_size), i1(out_size), l0(out_size), l1(out_size) {
    const acc_t scale = source_scale<acc_t>(in_size, out_size);
    for (int64_t o = 0; o < out_size; ++o) {
      source_taps<acc_t>(o, in_size, out_size, scale, i0[o], i1[o], l0[o], l1[o]);
    }
  }
};

// expf without a libm call, so that loops using it vectorise: Cephes' polynomial after a
// reduction to |r| <= ln2/2, about 1 ulp. The clamp keeps 2^n a normal float; sigmoid only
// needs exp(x) to saturate beyond that range.
inline float exp_vec(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to integer
  const float n = (x * 1.44269504088896341f + magic) - magic;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return y * two_n;
}

inline double exp_vec(double x) {
  return std::exp(x);
}

template <typename acc_t>
inline acc_t sigmoid(acc_t v) {
  return static_cast<acc_t>(1) / (static_cast<acc_t>(1) + exp_vec(-v));
}

struct Geometry {
  int64_t h, w, H, W;
};

// Horizontal interpolation of output columns [j0, j1) for every source row of one image.
template <typename scalar_t, typename acc_t>
void interp_columns(
    const scalar_t* x,
    const Geometry& g,
    const Axis<acc_t>& cx,
    int64_t j0,
    int64_t j1,
    acc_t* strip) {
  for (int64_t r = 0; r < g.h; ++r) {
    const scalar_t* xr = x + r * g.w;
    acc_t* out = strip + r * g.W;
    for (int64_t j = j0; j < j1; ++j) {
      out[j] = cx.l0[j] * static_cast<acc_t>(xr[cx.i0[j]]) +
          cx.l1[j] * static_cast<acc_t>(xr[cx.i1[j]]);
    }
  }
}

// p and f = w * p (or w * (p - t)^2) for n consecutive pixels of one output row.
template <typename scalar_t, typename acc_t, bool HAS_T, bool HAS_W>
inline void row_values(
    const acc_t* a,
    const acc_t* c,
    acc_t la,
    acc_t lc,
    const scalar_t* t,
    const scalar_t* wt,
    int64_t n,
    acc_t* p_out,
    acc_t* f_out) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    const acc_t p = sigmoid(la * a[k] + lc * c[k]);
    acc_t f = p;
    if constexpr (HAS_T) {
      const acc_t d = p - static_cast<acc_t>(t[k]);
      f = d * d;
    }
    if constexpr (HAS_W) {
      f = f * static_cast<acc_t>(wt[k]);
    }
    p_out[k] = p;
    f_out[k] = f;
  }
}

template <typename acc_t>
struct Partial {
  double sum = 0.0;
  int64_t count = 0;
  acc_t max = -std::numeric_limits<acc_t>::infinity();
  int64_t arg = -1;
};

template <typename scalar_t, typename acc_t, bool HAS_T, bool HAS_W>
DD_MULTIVERSION void forward_block(
    const scalar_t* x,
    const scalar_t* t,
    const scalar_t* wt,
    const Geometry& g,
    const Axis<acc_t>& ry,
    const Axis<acc_t>& cx,
    Reduction red,
    acc_t thr,
    int64_t j0,
    int64_t j1,
    acc_t* strip,
    Partial<acc_t>& out) {
  interp_columns<scalar_t, acc_t>(x, g, cx, j0, j1, strip);
  const int64_t n = j1 - j0;
  acc_t pbuf[kBlock];
  acc_t fbuf[kBlock];
  for (int64_t i = 0; i < g.H; ++i) {
    const int64_t off = i * g.W + j0;
    row_values<scalar_t, acc_t, HAS_T, HAS_W>(
        strip + ry.i0[i] * g.W + j0,
        strip + ry.i1[i] * g.W + j0,
        ry.l0[i],
        ry.l1[i],
        HAS_T ? t + off : nullptr,
        HAS_W ? wt + off : nullptr,
        n,
        pbuf,
        fbuf);
    if (red == kMax) {
      acc_t m = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : m)
      for (int64_t k = 0; k < n; ++k) {
        m = std::max(m, fbuf[k]);
      }
      if (m > out.max) {  // strict: the first maximal pixel in row-major order wins
        int64_t k = 0;
        while (fbuf[k] != m) {
          ++k;
        }
        out.max = m;
        out.arg = off + k;
      }
    } else if (red == kWeighted) {
      acc_t s = 0;
      int64_t cnt = 0;
#pragma omp simd reduction(+ : s, cnt)
      for (int64_t k = 0; k < n; ++k) {
        const bool m = pbuf[k] > thr;
        s += m ? fbuf[k] : static_cast<acc_t>(0);
        cnt += m ? 1 : 0;
      }
      out.sum += static_cast<double>(s);
      out.count += cnt;
    } else {
      acc_t s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < n; ++k) {
        s += fbuf[k];
      }
      out.sum += static_cast<double>(s);
    }
  }
}

// dL/dlogit for n pixels of one output row, given dL/df = scale (mask applied for weighted).
template <typename scalar_t, typename acc_t, bool HAS_T, bool HAS_W>
inline void row_grads(
    const acc_t* a,
    const acc_t* c,
    acc_t la,
    acc_t lc,
    const scalar_t* t,
    const scalar_t* wt,
    int64_t n,
    acc_t scale,
    bool masked,
    acc_t thr,
    acc_t* gp) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    const acc_t p = sigmoid(la * a[k] + lc * c[k]);
    acc_t d = scale;
    if constexpr (HAS_W) {
      d = d * static_cast<acc_t>(wt[k]);
    }
    if constexpr (HAS_T) {
      d = d * (static_cast<acc_t>(2) * (p - static_cast<acc_t>(t[k])));
    }
    if (masked) {
      d = p > thr ? d : static_cast<acc_t>(0);
    }
    gp[k] = d * (static_cast<acc_t>(1) - p) * p;
  }
}

template <typename scalar_t, typename acc_t, bool HAS_T, bool HAS_W>
DD_MULTIVERSION void backward_block(
    const scalar_t* x,
    const scalar_t* t,
    const scalar_t* wt,
    const Geometry& g,
    const Axis<acc_t>& ry,
    const Axis<acc_t>& cx,
    bool masked,
    acc_t thr,
    acc_t scale,
    int64_t j0,
    int64_t j1,
    acc_t* strip,
    acc_t* grad_strip) {
  interp_columns<scalar_t, acc_t>(x, g, cx, j0, j1, strip);
  const int64_t n = j1 - j0;
  for (int64_t r = 0; r < g.h; ++r) {
    std::fill(grad_strip + r * g.W + j0, grad_strip + r * g.W + j1, static_cast<acc_t>(0));
  }
  acc_t gp[kBlock];
  for (int64_t i = 0; i < g.H; ++i) {
    const int64_t off = i * g.W + j0;
    row_grads<scalar_t, acc_t, HAS_T, HAS_W>(
        strip + ry.i0[i] * g.W + j0,
        strip + ry.i1[i] * g.W + j0,
        ry.l0[i],
        ry.l1[i],
        HAS_T ? t + off : nullptr,
        HAS_W ? wt + off : nullptr,
        n,
        scale,
        masked,
        thr,
        gp);
    acc_t* g0 = grad_strip + ry.i0[i] * g.W + j0;
    const acc_t l0 = ry.l0[i];
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      g0[k] += l0 * gp[k];
    }
    acc_t* g1 = grad_strip + ry.i1[i] * g.W + j0;
    const acc_t l1 = ry.l1[i];
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      g1[k] += l1 * gp[k];
    }
  }
}

// Calls fn with std::true_type / std::false_type tags for (has target, has weight).
template <typename Fn>
void with_flags(bool has_t, bool has_w, Fn&& fn) {
  if (has_t && has_w) {
    fn(std::true_type{}, std::true_type{});
  } else if (has_t) {
    fn(std::true_type{}, std::false_type{});
  } else if (has_w) {
    fn(std::false_type{}, std::true_type{});
  } else {
    fn(std::false_type{}, std::false_type{});
  }
}

// Deliberate copy: the CUDA file (artifact_confidence_cuda.cu) implements the same per-pixel math per thread.
int64_t num_blocks(int64_t W) {
  return (W + kBlock - 1) / kBlock;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> acl_forward_cpu(
    const at::Tensor& logits,
    int64_t out_h,
    int64_t out_w,
    c10::string_view reduction,
    const std::optional<at::Tensor>& target,
    const std::optional<at::Tensor>& weight,
    double threshold) {
  check_inputs(logits, out_h, out_w, target, weight);
  const Reduction red = parse_reduction(reduction);
  const int64_t B = logits.size(0);
  const Geometry g{logits.size(2), logits.size(3), out_h, out_w};
  const int64_t nblk = num_blocks(g.W);
  at::Tensor loss = at::empty({B}, logits.options());
  at::Tensor aux = at::zeros({B}, logits.options().dtype(at::kLong));
  const bool has_t = target.has_value();
  const bool has_w = weight.has_value();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "acl_forward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const Axis<acc_t> ry(g.h, g.H);
        const Axis<acc_t> cx(g.w, g.W);
        at::Tensor strips = at::empty({B, g.h, g.W}, logits.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
        acc_t* strip_ptr = strips.data_ptr<acc_t>();
        const scalar_t* x = logits.const_data_ptr<scalar_t>();
        const scalar_t* t = has_t ? target->const_data_ptr<scalar_t>() : nullptr;
        const scalar_t* wt = has_w ? weight->const_data_ptr<scalar_t>() : nullptr;
        const int64_t npix = g.H * g.W;
        const acc_t thr = static_cast<acc_t>(threshold);
        std::vector<Partial<acc_t>> parts(B * nblk);
        // Deliberate copy: one loop per reduction (this: mean/sum/weighted forward), the reference's formula specialised at compile time; the max loops below repeat the shape.
        with_flags(has_t, has_w, [&](auto ht, auto hw) {
          constexpr bool HT = decltype(ht)::value;
          constexpr bool HW = decltype(hw)::value;
          at::parallel_for(0, B * nblk, 1, [&](int64_t begin, int64_t end) {
            for (int64_t task = begin; task < end; ++task) {
              const int64_t b = task / nblk;
              const int64_t j0 = (task % nblk) * kBlock;
              const int64_t j1 = std::min(j0 + kBlock, g.W);
              forward_block<scalar_t, acc_t, HT, HW>(
                  x + b * g.h * g.w,
                  HT ? t + b * npix : nullptr,
                  HW ? wt + b * npix : nullptr,
                  g,
                  ry,
                  cx,
                  red,
                  thr,
                  j0,
                  j1,
                  strip_ptr + b * g.h * g.W,
                  parts[task]);
            }
          });
        });
        scalar_t* out = loss.data_ptr<scalar_t>();
        int64_t* aux_ptr = aux.data_ptr<int64_t>();
        for (int64_t b = 0; b < B; ++b) {
          Partial<acc_t> total;
          for (int64_t k = 0; k < nblk; ++k) {
            const Partial<acc_t>& p = parts[b * nblk + k];
            total.sum += p.sum;
            total.count += p.count;
            // blocks cover increasing columns, so on a tie the smaller flat index wins
            if (p.arg >= 0 &&
                (total.arg < 0 || p.max > total.max || (p.max == total.max && p.arg < total.arg))) {
              total.max = p.max;
              total.arg = p.arg;
            }
          }
          double value;
          switch (red) {
            case kMean:
              value = total.sum / static_cast<double>(npix);
              break;
            case kSum:
              value = total.sum;
              break;
            case kWeighted:
              value = total.count > 0 ? total.sum / static_cast<double>(total.count) : 0.0;
              aux_ptr[b] = total.count;
              break;
            default:  // kMax; no maximum only when every value is NaN
              value = total.arg >= 0 ? static_cast<double>(total.max)
                                     : std::numeric_limits<double>::quiet_NaN();
              aux_ptr[b] = std::max<int64_t>(total.arg, 0);
          }
          out[b] = static_cast<scalar_t>(static_cast<acc_t>(value));
        }
      });
  return {loss, aux};
}

at::Tensor acl_backward_cpu(
    const at::Tensor& grad,
    const at::Tensor& logits,
    const at::Tensor& aux,
    int64_t out_h,
    int64_t out_w,
    c10::string_view reduction,
    const std::optional<at::Tensor>& target,
    const std::optional<at::Tensor>& weight,
    double threshold) {
  check_inputs(logits, out_h, out_w, target, weight);
  const Reduction red = parse_reduction(reduction);
  const int64_t B = logits.size(0);
  TORCH_CHECK(grad.numel() == B && aux.numel() == B, "grad and aux must have B elements");
  const Geometry g{logits.size(2), logits.size(3), out_h, out_w};
  const int64_t nblk = num_blocks(g.W);
  const bool has_t = target.has_value();
  const bool has_w = weight.has_value();
  at::Tensor grad_c = grad.to(logits.scalar_type()).contiguous();
  at::Tensor aux_c = aux.to(at::kLong).contiguous();
  at::Tensor result = at::empty_like(logits);

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "acl_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const Axis<acc_t> ry(g.h, g.H);
        const Axis<acc_t> cx(g.w, g.W);
        const scalar_t* x = logits.const_data_ptr<scalar_t>();
        const scalar_t* t = has_t ? target->const_data_ptr<scalar_t>() : nullptr;
        const scalar_t* wt = has_w ? weight->const_data_ptr<scalar_t>() : nullptr;
        const scalar_t* gout = grad_c.const_data_ptr<scalar_t>();
        const int64_t* aux_ptr = aux_c.const_data_ptr<int64_t>();
        scalar_t* gx = result.data_ptr<scalar_t>();
        const int64_t npix = g.H * g.W;
        const acc_t thr = static_cast<acc_t>(threshold);

        if (red == kMax) {
          // Only the argmax pixel carries gradient: four taps, computed directly.
          std::fill(gx, gx + result.numel(), static_cast<scalar_t>(0));
          for (int64_t b = 0; b < B; ++b) {
            const int64_t idx = aux_ptr[b];
            const int64_t i = idx / g.W;
            const int64_t j = idx % g.W;
            const scalar_t* xb = x + b * g.h * g.w;
            const acc_t la = ry.l0[i], lc = ry.l1[i], l0 = cx.l0[j], l1 = cx.l1[j];
            const int64_t r0 = ry.i0[i], r1 = ry.i1[i], c0 = cx.i0[j], c1 = cx.i1[j];
            const acc_t v = la * (l0 * static_cast<acc_t>(xb[r0 * g.w + c0]) +
                                  l1 * static_cast<acc_t>(xb[r0 * g.w + c1])) +
                lc * (l0 * static_cast<acc_t>(xb[r1 * g.w + c0]) +
                      l1 * static_cast<acc_t>(xb[r1 * g.w + c1]));
            const acc_t p = sigmoid(v);
            acc_t d = static_cast<acc_t>(gout[b]);
            if (has_w) {
              d = d * static_cast<acc_t>(wt[b * npix + idx]);
            }
            if (has_t) {
              d = d * (static_cast<acc_t>(2) * (p - static_cast<acc_t>(t[b * npix + idx])));
            }
            const acc_t gp = d * (static_cast<acc_t>(1) - p) * p;
            acc_t four[4] = {la * l0 * gp, la * l1 * gp, lc * l0 * gp, lc * l1 * gp};
            const int64_t where[4] = {r0 * g.w + c0, r0 * g.w + c1, r1 * g.w + c0, r1 * g.w + c1};
            scalar_t* gb = gx + b * g.h * g.w;
            for (int k = 0; k < 4; ++k) {
              gb[where[k]] = static_cast<scalar_t>(static_cast<acc_t>(gb[where[k]]) + four[k]);
            }
          }
          return;
        }

        std::vector<acc_t> scales(B);
        for (int64_t b = 0; b < B; ++b) {
          const acc_t gb = static_cast<acc_t>(gout[b]);
          if (red == kMean) {
            scales[b] = gb / static_cast<acc_t>(npix);
          } else if (red == kWeighted) {
            scales[b] = gb / static_cast<acc_t>(std::max<int64_t>(aux_ptr[b], 1));
          } else {
            scales[b] = gb;
          }
        }
        const auto acc_opts = logits.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
        at::Tensor strips = at::empty({B, g.h, g.W}, acc_opts);
        at::Tensor grad_strips = at::empty({B, g.h, g.W}, acc_opts);
        acc_t* strip_ptr = strips.data_ptr<acc_t>();
        acc_t* gstrip_ptr = grad_strips.data_ptr<acc_t>();
        // Deliberate copy: the max reduction's loop, kept apart from the mean/sum/weighted loop above so neither branches per pixel.
        with_flags(has_t, has_w, [&](auto ht, auto hw) {
          constexpr bool HT = decltype(ht)::value;
          constexpr bool HW = decltype(hw)::value;
          at::parallel_for(0, B * nblk, 1, [&](int64_t begin, int64_t end) {
            for (int64_t task = begin; task < end; ++task) {
              const int64_t b = task / nblk;
              const int64_t j0 = (task % nblk) * kBlock;
              const int64_t j1 = std::min(j0 + kBlock, g.W);
              backward_block<scalar_t, acc_t, HT, HW>(
                  x + b * g.h * g.w,
                  HT ? t + b * npix : nullptr,
                  HW ? wt + b * npix : nullptr,
                  g,
                  ry,
                  cx,
                  red == kWeighted,
                  thr,
                  scales[b],
                  j0,
                  j1,
                  strip_ptr + b * g.h * g.W,
                  gstrip_ptr + b * g.h * g.W);
            }
          });
        });
        // Horizontal half of the transposed interpolation: one source row per iteration.
        at::parallel_for(0, B * g.h, 16, [&](int64_t begin, int64_t end) {
          std::vector<acc_t> row(g.w);
          for (int64_t br = begin; br < end; ++br) {
            std::fill(row.begin(), row.end(), static_cast<acc_t>(0));
            const acc_t* src = gstrip_ptr + br * g.W;
            for (int64_t j = 0; j < g.W; ++j) {
              row[cx.i0[j]] += cx.l0[j] * src[j];
              row[cx.i1[j]] += cx.l1[j] * src[j];
            }
            scalar_t* dst = gx + br * g.w;
            for (int64_t c = 0; c < g.w; ++c) {
              dst[c] = static_cast<scalar_t>(row[c]);
            }
          }
        });
      });
  return result;
}

std::string build_info() {
  return DD_NATIVE_BUILD_INFO;
}

}  // namespace dd_native

TORCH_LIBRARY(dd_native, m) {
  m.def(
      "acl_forward(Tensor logits, int out_h, int out_w, str reduction, Tensor? target, "
      "Tensor? weight, float threshold) -> (Tensor, Tensor)");
  m.def(
      "acl_backward(Tensor grad, Tensor logits, Tensor aux, int out_h, int out_w, "
      "str reduction, Tensor? target, Tensor? weight, float threshold) -> Tensor");
  m.def("build_info() -> str", &dd_native::build_info);
}

TORCH_LIBRARY_IMPL(dd_native, CPU, m) {
  m.impl("acl_forward", &dd_native::acl_forward_cpu);
  m.impl("acl_backward", &dd_native::acl_backward_cpu);
}
