// expert_dispatch_gate_up — routed experts, step 1 of 2: h = silu(W_gate,e x) ⊙ (W_up,e x) for every token–expert pair,
// with the gate and up rows of an expert read once per pass of PAIRS_PER_PASS of its pairs.
//
// Pairs are grouped into segments that share an expert: segment s covers pairs
// [seg_start[s], seg_start[s+1]) of expert seg_expert[s]; pair p is token pair_token[p]. Decode:
// one segment per pair (no sort). Prefill: one segment per expert, pairs sorted by expert; an
// expert no token chose has an empty segment and its SIMD groups return at once.
//
// grid (32, I rounded up to ROWS, S), threadgroup (32, ROWS, 1), ROWS = 4.
// One SIMD group owns intermediate row `row` of one segment (gate row and up row of its expert);
// one lane owns the 32-value blocks lane, lane + 32, … of those rows, dequantises each once and
// dots it with every pair of the pass; simd_sum then gives the pair's gate and up values.
// @inputs  x gate_w gate_s gate_b up_w up_s up_b seg_expert seg_start pair_token
// @outputs h
// @include expert_dispatch_quant
// @template T (x), S (scales and biases), H, I, BITS, GROUP_SIZE.
// Inputs: x [T_tokens, H]; {gate,up}_w [E, I, H·BITS/32] uint32; {gate,up}_{s,b} [E, I, H/GROUP_SIZE];
// seg_expert [S], seg_start [S + 1], pair_token [P] (int32). Output: h [P, I] float32.

// @header
constant constexpr int PAIRS_PER_PASS = 8;  // pairs sharing one dequantised block (registers per lane)

// @body
const uint lane = thread_position_in_grid.x;
const uint row = thread_position_in_grid.y;
const uint seg = thread_position_in_grid.z;
const int begin = seg_start[seg], end = seg_start[seg + 1];
if (row >= I || begin == end) {
  return;  // uniform over the SIMD group: no simd_sum is left waiting
}
constexpr uint WORDS = H * BITS / 32, GROUPS = H / GROUP_SIZE;
const uint expert = seg_expert[seg];
const device uint32_t* gw = gate_w + (expert * I + row) * WORDS;
const device uint32_t* uw = up_w + (expert * I + row) * WORDS;
const device S* gs = gate_s + (expert * I + row) * GROUPS;
const device S* gb = gate_b + (expert * I + row) * GROUPS;
const device S* us = up_s + (expert * I + row) * GROUPS;
const device S* ub = up_b + (expert * I + row) * GROUPS;

for (int first = begin; first < end; first += PAIRS_PER_PASS) {
  const int n = metal::min(PAIRS_PER_PASS, end - first);
  float g[PAIRS_PER_PASS] = {}, u[PAIRS_PER_PASS] = {};
  for (uint block = lane; block < H / BLOCK; block += 32) {
    float qg[BLOCK], qu[BLOCK];
    unpack_block<BITS>(gw + block * BITS, qg);
    unpack_block<BITS>(uw + block * BITS, qu);
    const uint group = block * BLOCK / GROUP_SIZE;
    const float sg = static_cast<float>(gs[group]), bg = static_cast<float>(gb[group]), su = static_cast<float>(us[group]), bu = static_cast<float>(ub[group]);
    for (int i = 0; i < n; ++i) {
      const device T* xb = x + pair_token[first + i] * H + block * BLOCK;
      g[i] += block_dot(qg, sg, bg, xb);
      u[i] += block_dot(qu, su, bu, xb);
    }
  }
  for (int i = 0; i < n; ++i) {
    const float gate = simd_sum(g[i]), up = simd_sum(u[i]);
    if (lane == 0) {
      h[(first + i) * I + row] = gate / (1.0f + metal::exp(-gate)) * up;
    }
  }
}
