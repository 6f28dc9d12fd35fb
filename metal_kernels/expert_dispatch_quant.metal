// expert_dispatch_quant — not a kernel: the helpers the expert_dispatch_* kernels share for reading
// MLX's affine-quantised rows. A kernel that says `// @include expert_dispatch_quant` gets everything
// after `// @header` here in front of its own header.
//
// Layout (mx.quantize, mode "affine"): a row of N values is a little-endian bit stream of N·BITS bits
// in uint32 words, value j at stream bits [j·BITS, (j+1)·BITS); w_j = scale·q_j + bias with one
// scale and bias per GROUP_SIZE consecutive values. A block of 32 values is exactly BITS words,
// so blocks start on word boundaries for every BITS (3-bit values do straddle words inside a block)
// and lie inside one group (GROUP_SIZE is a multiple of 32).

// @header
constant constexpr int BLOCK = 32;  // values per block; one lane reads one block at a time

// The 32 quantised integers q_j of the block starting at `words`, as floats.
template <int BITS>
inline void unpack_block(const device uint32_t* words, thread float* q) {
  uint32_t w[BITS];
  for (int i = 0; i < BITS; ++i) {
    w[i] = words[i];
  }
  for (int j = 0; j < BLOCK; ++j) {
    const int bit = j * BITS, word = bit / 32, shift = bit % 32;
    uint32_t v = w[word] >> shift;
    if (shift + BITS > 32) {
      v |= w[word + 1] << (32 - shift);  // the value continues in the next word
    }
    q[j] = static_cast<float>(v & ((1u << BITS) - 1u));
  }
}

// Σ_j (scale·q_j + bias)·a_j over one block, as scale·Σ q_j a_j + bias·Σ a_j (MLX's own factoring).
template <typename A>
inline float block_dot(thread const float* q, float scale, float bias, const device A* a) {
  float qa = 0.0f, sa = 0.0f;
  for (int j = 0; j < BLOCK; ++j) {
    const float v = static_cast<float>(a[j]);
    qa += q[j] * v;
    sa += v;
  }
  return scale * qa + bias * sa;
}
