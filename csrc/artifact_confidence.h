// Shared pieces of the fused artifact-confidence op (CPU and CUDA).
//
// The op: bilinear upsample (F.interpolate, align_corners=False) of B x 1 x h x w logits to
// H x W, sigmoid, and a per-image reduction of f = w * p (or w * (p - t)^2 with a target).
// The full-resolution map is never stored: forward and backward recompute each output pixel
// from its four source logits. The PyTorch reference in dd/ops/reference.py is the spec.
#pragma once

#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#ifdef __CUDACC__
#define DD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DD_HOST_DEVICE inline
#endif

namespace dd_native {

enum Reduction : int { kMean = 0, kMax = 1, kSum = 2, kWeighted = 3 };

// Scale from output to input coordinates, as ATen's area_pixel_compute_scale computes it
// (opmath type, no explicit scale factor).
template <typename acc_t>
DD_HOST_DEVICE acc_t source_scale(int64_t in_size, int64_t out_size) {
  return static_cast<acc_t>(in_size) / static_cast<acc_t>(out_size);
}

// The two source taps of output index `out_index` along one axis and their weights, exactly
// as ATen's compute_source_index_and_lambda: a negative source coordinate clamps to 0 (edge
// clamping), the upper tap clamps to the last input index, and equal sizes copy.
template <typename acc_t>
DD_HOST_DEVICE void source_taps(
    int64_t out_index,
    int64_t in_size,
    int64_t out_size,
    acc_t scale,
    int64_t& i0,
    int64_t& i1,
    acc_t& l0,
    acc_t& l1) {
  if (in_size == out_size) {
    i0 = out_index;
    i1 = out_index;
    l0 = static_cast<acc_t>(1);
    l1 = static_cast<acc_t>(0);
    return;
  }
  acc_t src = scale * (static_cast<acc_t>(out_index) + static_cast<acc_t>(0.5)) -
      static_cast<acc_t>(0.5);
  if (src < static_cast<acc_t>(0)) {
    src = static_cast<acc_t>(0);
  }
  int64_t f = static_cast<int64_t>(src);  // src >= 0, so truncation is floor
  if (f > in_size - 1) {
    f = in_size - 1;
  }
  acc_t lam = src - static_cast<acc_t>(f);
  lam = lam < static_cast<acc_t>(0) ? static_cast<acc_t>(0)
                                    : (lam > static_cast<acc_t>(1) ? static_cast<acc_t>(1) : lam);
  i0 = f;
  i1 = f + (f < in_size - 1 ? 1 : 0);
  l1 = lam;
  l0 = static_cast<acc_t>(1) - lam;
}

// Shared by the CPU and CUDA entry points (defined in artifact_confidence.cpp).
Reduction parse_reduction(c10::string_view reduction);
void check_inputs(
    const at::Tensor& logits,
    int64_t out_h,
    int64_t out_w,
    const std::optional<at::Tensor>& target,
    const std::optional<at::Tensor>& weight);

}  // namespace dd_native
