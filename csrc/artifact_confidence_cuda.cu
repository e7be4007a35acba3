// CUDA implementation of the fused artifact-confidence op: one thread per output pixel.
//
// Forward: each thread samples its pixel from the four source logits, applies the sigmoid and
// computes its value; a block reduction (sum, count, max with the smallest flat index on a
// tie) writes one partial per block, and a second kernel combines the partials of each image
// in a fixed order (deterministic). Backward: each thread recomputes its pixel and scatters
// its gradient to the four source logits with atomicAdd (max: only the argmax pixel).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "artifact_confidence.h"

namespace dd_native {
namespace {

constexpr int kThreads = 256;

// -inf and NaN as constants usable in device code (std::numeric_limits is host-only).
template <typename acc_t>
__host__ __device__ __forceinline__ acc_t negative_infinity() {
  return -static_cast<acc_t>(INFINITY);
}

template <typename acc_t>
struct Part {
  double sum;
  long long count;
  acc_t max;
  long long arg;  // -1: no value yet
};

template <typename acc_t>
__device__ __forceinline__ void combine(Part<acc_t>& a, const Part<acc_t>& b) {
  a.sum += b.sum;
  a.count += b.count;
  if (b.arg >= 0 && (a.arg < 0 || b.max > a.max || (b.max == a.max && b.arg < a.arg))) {
    a.max = b.max;
    a.arg = b.arg;
  }
}

// Tree reduction over the block in a fixed order; the result is valid in thread 0.
template <typename acc_t>
__device__ Part<acc_t> block_reduce(Part<acc_t> v) {
  __shared__ Part<acc_t> shared[kThreads];
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) {
      combine(shared[threadIdx.x], shared[threadIdx.x + stride]);
    }
    __syncthreads();
  }
  return shared[0];
}

__device__ __forceinline__ float exp_acc(float x) {
  return expf(x);
}
__device__ __forceinline__ double exp_acc(double x) {
  return exp(x);
}

template <typename acc_t>
struct Sample {
  acc_t p;
  int64_t r0, r1, c0, c1;
  acc_t la, lc, l0, l1;
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void sample_pixel(
    const scalar_t* __restrict__ x,
    int64_t h,
    int64_t w,
    int64_t H,
    int64_t W,
    acc_t scale_h,
    acc_t scale_w,
    int64_t i,
    int64_t j,
    Sample<acc_t>& s) {
  source_taps<acc_t>(i, h, H, scale_h, s.r0, s.r1, s.la, s.lc);
  source_taps<acc_t>(j, w, W, scale_w, s.c0, s.c1, s.l0, s.l1);
  const acc_t top = s.l0 * static_cast<acc_t>(x[s.r0 * w + s.c0]) +
      s.l1 * static_cast<acc_t>(x[s.r0 * w + s.c1]);
  const acc_t bottom = s.l0 * static_cast<acc_t>(x[s.r1 * w + s.c0]) +
      s.l1 * static_cast<acc_t>(x[s.r1 * w + s.c1]);
  const acc_t v = s.la * top + s.lc * bottom;
  s.p = static_cast<acc_t>(1) / (static_cast<acc_t>(1) + exp_acc(-v));
}

template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(
    const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ t,
    const scalar_t* __restrict__ wt,
    int64_t h,
    int64_t w,
    int64_t H,
    int64_t W,
    acc_t scale_h,
    acc_t scale_w,
    int red,
    acc_t thr,
    Part<acc_t>* __restrict__ parts) {
  const int64_t b = blockIdx.y;
  const int64_t npix = H * W;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  Part<acc_t> mine{0.0, 0, negative_infinity<acc_t>(), -1};
  if (idx < npix) {
    Sample<acc_t> s;
    sample_pixel<scalar_t, acc_t>(x + b * h * w, h, w, H, W, scale_h, scale_w, idx / W, idx % W, s);
    acc_t f = s.p;
    if (t != nullptr) {
      const acc_t d = s.p - static_cast<acc_t>(t[b * npix + idx]);
      f = d * d;
    }
    if (wt != nullptr) {
      f = f * static_cast<acc_t>(wt[b * npix + idx]);
    }
    if (red == kWeighted) {
      if (s.p > thr) {
        mine.sum = static_cast<double>(f);
        mine.count = 1;
      }
    } else {
      mine.sum = static_cast<double>(f);
    }
    mine.max = f;
    mine.arg = idx;
  }
  const Part<acc_t> total = block_reduce(mine);
  if (threadIdx.x == 0) {
    parts[b * gridDim.x + blockIdx.x] = total;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void finalize_kernel(
    const Part<acc_t>* __restrict__ parts,
    int64_t nparts,
    int64_t npix,
    int red,
    scalar_t* __restrict__ loss,
    int64_t* __restrict__ aux) {
  const int64_t b = blockIdx.x;
  Part<acc_t> mine{0.0, 0, negative_infinity<acc_t>(), -1};
  for (int64_t k = threadIdx.x; k < nparts; k += kThreads) {
    combine(mine, parts[b * nparts + k]);
  }
  const Part<acc_t> total = block_reduce(mine);
  if (threadIdx.x == 0) {
    double value;
    int64_t extra = 0;
    if (red == kMean) {
      value = total.sum / static_cast<double>(npix);
    } else if (red == kSum) {
      value = total.sum;
    } else if (red == kWeighted) {
      value = total.count > 0 ? total.sum / static_cast<double>(total.count) : 0.0;
      extra = total.count;
    } else {  // kMax; no maximum only when every value is NaN
      value = total.arg >= 0 ? static_cast<double>(total.max) : static_cast<double>(NAN);
      extra = total.arg >= 0 ? total.arg : 0;
    }
    loss[b] = static_cast<scalar_t>(static_cast<acc_t>(value));
    aux[b] = extra;
  }
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t pixel_grad(
    const Sample<acc_t>& s,
    acc_t d,
    const scalar_t* __restrict__ t,
    const scalar_t* __restrict__ wt,
    int64_t at) {
  if (wt != nullptr) {
    d = d * static_cast<acc_t>(wt[at]);
  }
  if (t != nullptr) {
    d = d * (static_cast<acc_t>(2) * (s.p - static_cast<acc_t>(t[at])));
  }
  return d * (static_cast<acc_t>(1) - s.p) * s.p;
}

template <typename acc_t>
__device__ __forceinline__ void scatter(acc_t* g, int64_t w, const Sample<acc_t>& s, acc_t gp) {
  atomicAdd(g + s.r0 * w + s.c0, s.la * s.l0 * gp);
  atomicAdd(g + s.r0 * w + s.c1, s.la * s.l1 * gp);
  atomicAdd(g + s.r1 * w + s.c0, s.lc * s.l0 * gp);
  atomicAdd(g + s.r1 * w + s.c1, s.lc * s.l1 * gp);
}

// Deliberate copy: one backward kernel per reduction (this: mean/sum/weighted), specialised so no thread branches on the reduction.
template <typename scalar_t, typename acc_t>
__global__ void backward_kernel(
    const scalar_t* __restrict__ grad,
    const scalar_t* __restrict__ x,
    const int64_t* __restrict__ aux,
    const scalar_t* __restrict__ t,
    const scalar_t* __restrict__ wt,
    int64_t h,
    int64_t w,
    int64_t H,
    int64_t W,
    acc_t scale_h,
    acc_t scale_w,
    int red,
    acc_t thr,
    acc_t* __restrict__ gx) {
  const int64_t b = blockIdx.y;
  const int64_t npix = H * W;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (idx >= npix) {
    return;
  }
  Sample<acc_t> s;
  sample_pixel<scalar_t, acc_t>(x + b * h * w, h, w, H, W, scale_h, scale_w, idx / W, idx % W, s);
  acc_t d = static_cast<acc_t>(grad[b]);
  if (red == kMean) {
    d = d / static_cast<acc_t>(npix);
  } else if (red == kWeighted) {
    if (!(s.p > thr)) {
      return;
    }
    d = d / static_cast<acc_t>(aux[b] > 1 ? aux[b] : 1);
  }
  scatter(gx + b * h * w, w, s, pixel_grad<scalar_t, acc_t>(s, d, t, wt, b * npix + idx));
}

// Deliberate copy: the max reduction's backward kernel (one sample per image), a sibling of the one above.
template <typename scalar_t, typename acc_t>
__global__ void max_backward_kernel(
    const scalar_t* __restrict__ grad,
    const scalar_t* __restrict__ x,
    const int64_t* __restrict__ aux,
    const scalar_t* __restrict__ t,
    const scalar_t* __restrict__ wt,
    int64_t B,
    int64_t h,
    int64_t w,
    int64_t H,
    int64_t W,
    acc_t scale_h,
    acc_t scale_w,
    acc_t* __restrict__ gx) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) {
    return;
  }
  const int64_t idx = aux[b];
  Sample<acc_t> s;
  sample_pixel<scalar_t, acc_t>(x + b * h * w, h, w, H, W, scale_h, scale_w, idx / W, idx % W, s);
  const acc_t d = static_cast<acc_t>(grad[b]);
  scatter(gx + b * h * w, w, s, pixel_grad<scalar_t, acc_t>(s, d, t, wt, b * H * W + idx));
}

// Deliberate copy: the same per-pixel math as the CPU loops in artifact_confidence.cpp.
int64_t blocks_for(int64_t n) {
  return (n + kThreads - 1) / kThreads;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> acl_forward_cuda(
    const at::Tensor& logits,
    int64_t out_h,
    int64_t out_w,
    c10::string_view reduction,
    const std::optional<at::Tensor>& target,
    const std::optional<at::Tensor>& weight,
    double threshold) {
  check_inputs(logits, out_h, out_w, target, weight);
  const Reduction red = parse_reduction(reduction);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t B = logits.size(0);
  const int64_t h = logits.size(2), w = logits.size(3);
  const int64_t npix = out_h * out_w;
  at::Tensor loss = at::empty({B}, logits.options());
  at::Tensor aux = at::empty({B}, logits.options().dtype(at::kLong));
  if (B == 0) {
    return {loss, aux};
  }
  const int64_t nparts = blocks_for(npix);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "acl_forward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        at::Tensor parts = at::empty(
            {static_cast<int64_t>(B * nparts * sizeof(Part<acc_t>))},
            logits.options().dtype(at::kByte));
        auto* parts_ptr = reinterpret_cast<Part<acc_t>*>(parts.data_ptr<uint8_t>());
        const dim3 grid(static_cast<unsigned>(nparts), static_cast<unsigned>(B));
        forward_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
            logits.const_data_ptr<scalar_t>(),
            target ? target->const_data_ptr<scalar_t>() : nullptr,
            weight ? weight->const_data_ptr<scalar_t>() : nullptr,
            h,
            w,
            out_h,
            out_w,
            source_scale<acc_t>(h, out_h),
            source_scale<acc_t>(w, out_w),
            static_cast<int>(red),
            static_cast<acc_t>(threshold),
            parts_ptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        finalize_kernel<scalar_t, acc_t><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
            parts_ptr,
            nparts,
            npix,
            static_cast<int>(red),
            loss.data_ptr<scalar_t>(),
            aux.data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {loss, aux};
}

at::Tensor acl_backward_cuda(
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
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t B = logits.size(0);
  TORCH_CHECK(grad.numel() == B && aux.numel() == B, "grad and aux must have B elements");
  const int64_t h = logits.size(2), w = logits.size(3);
  at::Tensor grad_c = grad.to(logits.scalar_type()).contiguous();
  at::Tensor aux_c = aux.to(at::kLong).contiguous();
  at::Tensor result;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "acl_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        at::Tensor gx = at::zeros(
            logits.sizes(), logits.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
        if (B > 0) {
          const scalar_t* t = target ? target->const_data_ptr<scalar_t>() : nullptr;
          const scalar_t* wt = weight ? weight->const_data_ptr<scalar_t>() : nullptr;
          const acc_t scale_h = source_scale<acc_t>(h, out_h);
          const acc_t scale_w = source_scale<acc_t>(w, out_w);
          if (red == kMax) {
            max_backward_kernel<scalar_t, acc_t><<<blocks_for(B), kThreads, 0, stream>>>(
                grad_c.const_data_ptr<scalar_t>(),
                logits.const_data_ptr<scalar_t>(),
                aux_c.const_data_ptr<int64_t>(),
                t,
                wt,
                B,
                h,
                w,
                out_h,
                out_w,
                scale_h,
                scale_w,
                gx.data_ptr<acc_t>());
          } else {
            const dim3 grid(
                static_cast<unsigned>(blocks_for(out_h * out_w)), static_cast<unsigned>(B));
            backward_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
                grad_c.const_data_ptr<scalar_t>(),
                logits.const_data_ptr<scalar_t>(),
                aux_c.const_data_ptr<int64_t>(),
                t,
                wt,
                h,
                w,
                out_h,
                out_w,
                scale_h,
                scale_w,
                static_cast<int>(red),
                static_cast<acc_t>(threshold),
                gx.data_ptr<acc_t>());
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        result = gx.scalar_type() == logits.scalar_type() ? gx : gx.to(logits.scalar_type());
      });
  return result;
}

}  // namespace dd_native

TORCH_LIBRARY_IMPL(dd_native, CUDA, m) {
  m.impl("acl_forward", &dd_native::acl_forward_cuda);
  m.impl("acl_backward", &dd_native::acl_backward_cuda);
}
