// expert_dispatch_down_sorted — routed experts, step 2 of 2 for prefill (pairs sorted by expert):
// y[slot] = w[slot] · W_down,e h[p] for sorted pair p of original slot pair_slot[p] (= t·K + j),
// with an expert's down rows read once per pass of PAIRS_PER_PASS of its pairs. The wrapper sums
// y [T_tokens, K, H] over K (fixed order j = 0..K-1, so the result does not depend on the sort).
//
// grid (32, H rounded up to ROWS, S), threadgroup (32, ROWS, 1), ROWS = 4.
// One SIMD group owns output feature `row` of one segment (one expert's pairs); one lane owns the
// 32-value blocks lane, lane + 32, … of the expert's down row, dequantises each once and dots it
// with the h rows of every pair of the pass; simd_sum then gives the pair's value.
// @inputs  h down_w down_s down_b seg_expert seg_start pair_slot weights
// @outputs y
// @include expert_dispatch_quant
// @template T (weights), S (scales and biases), H, I, BITS, GROUP_SIZE.
// Inputs: h [P, I] float32 (sorted pairs); down_w [E, H, I·BITS/32] uint32; down_{s,b} [E, H, I/GROUP_SIZE];
// seg_expert [S], seg_start [S + 1], pair_slot [P] (int32); weights [P] T (by slot).
// Output: y [P, H] float32 (by slot).

// @header
constant constexpr int PAIRS_PER_PASS = 8;  // pairs sharing one dequantised block (registers per lane)

// @body
const uint lane = thread_position_in_grid.x;
const uint row = thread_position_in_grid.y;
const uint seg = thread_position_in_grid.z;
const int begin = seg_start[seg], end = seg_start[seg + 1];
if (row >= H || begin == end) {
  return;  // uniform over the SIMD group: no simd_sum is left waiting
}
constexpr uint WORDS = I * BITS / 32, GROUPS = I / GROUP_SIZE;
const uint expert = seg_expert[seg];
const device uint32_t* dw = down_w + (expert * H + row) * WORDS;
const device S* ds = down_s + (expert * H + row) * GROUPS;
const device S* db = down_b + (expert * H + row) * GROUPS;

for (int first = begin; first < end; first += PAIRS_PER_PASS) {
  const int n = metal::min(PAIRS_PER_PASS, end - first);
  float acc[PAIRS_PER_PASS] = {};
  for (uint block = lane; block < I / BLOCK; block += 32) {
    float q[BLOCK];
    unpack_block<BITS>(dw + block * BITS, q);
    const uint group = block * BLOCK / GROUP_SIZE;
    const float scale = static_cast<float>(ds[group]), bias = static_cast<float>(db[group]);
    for (int i = 0; i < n; ++i) {
      acc[i] += block_dot(q, scale, bias, h + (first + i) * I + block * BLOCK);
    }
  }
  for (int i = 0; i < n; ++i) {
    const float value = simd_sum(acc[i]);
    if (lane == 0) {
      const uint slot = pair_slot[first + i];
      y[slot * H + row] = static_cast<float>(weights[slot]) * value;
    }
  }
}
