// What the kernel files take from torch: tensors, at::parallel_for and new CPU tensors. Not
// torch/library.h or at::empty's header: those parse in ~5.6 s of a file's ~7.5 s compile,
// these in ~1.8 s, and every kernel build (the first use on a machine, each instruction set's
// build in the tests) compiled them once per file. The operators are registered in one file,
// cpu_kernels.cpp.
#pragma once

#include <ATen/core/Tensor.h>  // not ATen/ATen.h
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>

// A new contiguous CPU tensor (every operator here takes and makes CPU tensors).
static inline at::Tensor new_tensor(at::IntArrayRef size, at::ScalarType dtype) {
  return at::Tensor(at::detail::empty_cpu(size, dtype));
}
