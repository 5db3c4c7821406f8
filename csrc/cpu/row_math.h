// Helpers shared by the row-wise CPU kernels: how rows are split into parallel tasks, and how a
// row is read in the opmath type (fp32 for fp16 / bf16).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace adasmooth {

// Rows per parallel task: enough work per task to amortise scheduling.
inline int64_t grain_rows(int64_t C) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
}

// fp32 / fp64 rows are read in place; fp16 / bf16 rows are first widened into dst.
template <typename scalar_t, typename T>
const T* src_as_opmath(const scalar_t* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, T>) {
    return src;
  } else {
    at::vec::convert(src, dst, n);
    return dst;
  }
}

}  // namespace adasmooth
