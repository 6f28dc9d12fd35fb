// expert_dispatch_down_sum — routed experts, step 2 of 2 for decode (few tokens, pairs unsorted):
// out[t] = Σ_j w[t, j] · W_down,e h[t·K + j] with e = indices[t, j] — the down projection, the
// router weights and the sum over the token's K experts in one launch.
//
// grid (32, H rounded up to ROWS, T_tokens), threadgroup (32, ROWS, 1), ROWS = 4.
// One SIMD group owns output feature `row` of one token and walks its K experts; one lane owns the
// 32-value blocks lane, lane + 32, … of each expert's down row and keeps a weighted partial sum over
// all K experts, so a single simd_sum finishes the token's feature.
// @inputs  h down_w down_s down_b indices weights
// @outputs out
// @include expert_dispatch_quant
// @template T (x: weights and out), S (scales and biases), H, I, K, BITS, GROUP_SIZE.
// Inputs: h [T_tokens·K, I] float32 (pair t·K + j); down_w [E, H, I·BITS/32] uint32;
// down_{s,b} [E, H, I/GROUP_SIZE]; indices [T_tokens·K] int32; weights [T_tokens·K] T.
// Output: out [T_tokens, H] T.

// @header

// @body
const uint lane = thread_position_in_grid.x;
const uint row = thread_position_in_grid.y;
const uint token = thread_position_in_grid.z;
if (row >= H) {
  return;  // uniform over the SIMD group
}
constexpr uint WORDS = I * BITS / 32, GROUPS = I / GROUP_SIZE;
float acc = 0.0f;
for (uint j = 0; j < K; ++j) {
  const uint pair = token * K + j;
  const uint expert = indices[pair];
  const device uint32_t* dw = down_w + (expert * H + row) * WORDS;
  const device S* ds = down_s + (expert * H + row) * GROUPS;
  const device S* db = down_b + (expert * H + row) * GROUPS;
  float part = 0.0f;
  for (uint block = lane; block < I / BLOCK; block += 32) {
    float q[BLOCK];
    unpack_block<BITS>(dw + block * BITS, q);
    const uint group = block * BLOCK / GROUP_SIZE;
    part += block_dot(q, static_cast<float>(ds[group]), static_cast<float>(db[group]), h + pair * I + block * BLOCK);
  }
  acc += static_cast<float>(weights[pair]) * part;
}
acc = simd_sum(acc);
if (lane == 0) {
  out[token * H + row] = static_cast<T>(acc);
}
