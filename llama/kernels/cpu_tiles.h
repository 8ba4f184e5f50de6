// How a weight product's work is split, shared by the float32, bfloat16 and int8 kernels
// (cpu_dense.cpp, cpu_kernels.cpp): output rows in tiles of NO weight rows, threads splitting
// the tiles (each core streams its own slab of the weight), activation rows in groups of NR
// against each tile, and a long product's rows taken a block at a time, so the block stays in
// the core's L2 while the slab passes by. No output's operations depend on the split: a tile
// function computes each of its outputs alone, in a fixed order.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

// Output-row tiles per parallel chunk: at least ~64 KB of weights, so tiny products stay on
// one thread.
static int64_t grain(int64_t bytes_per_tile) {
  return std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(bytes_per_tile, 1));
}

template <int N>
using Int = std::integral_constant<int, N>;

// tile(Int<NO>, Int<NR'>, r, o) for rows r0..r0+R in groups of NR (then one group of the
// NR - 1 or fewer left), each against weight rows o..o+NO: read from memory once.
template <int NO, int NR, typename Tile>
static void rows_in_groups(int64_t r0, int64_t R, int64_t o, const Tile& tile) {
  int64_t r = 0;
  for (; r + NR <= R; r += NR) tile(Int<NO>{}, Int<NR>{}, r0 + r, o);
  if constexpr (NR > 1)
    if (r < R) rows_in_groups<NO, NR - 1>(r0 + r, R - r, o, tile);
}

// All R x N outputs through tile(): tiles of NO weight rows (the last N % NO rows one at a
// time), the threads splitting the tiles, each thread taking about `budget` activation rows
// at a time past its slab (rounded to a multiple of NR, at least NR). bytes_per_tile: a
// tile's weight bytes, for the grain.
template <int NO, int NR, typename Tile>
static void tiled_product(int64_t R, int64_t N, int64_t bytes_per_tile, int64_t budget,
                          const Tile& tile) {
  const int64_t tiles = N / NO, rest = N % NO;
  const int64_t block = std::max<int64_t>(NR, budget / NR * NR);
  at::parallel_for(0, tiles + (rest > 0), grain(bytes_per_tile), [&](int64_t begin,
                                                                     int64_t end) {
    for (int64_t r0 = 0; r0 < R; r0 += block) {
      const int64_t rows = std::min(block, R - r0);
      for (int64_t t = begin; t < std::min(end, tiles); ++t)
        rows_in_groups<NO, NR>(r0, rows, t * NO, tile);
      if (end > tiles)
        for (int64_t o = tiles * NO; o < N; ++o) rows_in_groups<1, NR>(r0, rows, o, tile);
    }
  });
}
