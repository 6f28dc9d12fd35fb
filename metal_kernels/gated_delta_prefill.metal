// gated_delta_prefill — T tokens of the Gated DeltaNet recurrence, all heads, state carried in registers.
// Decode is this kernel at T = 1 (one source for the per-token update; the wrapper passes a cached mask).
//
// grid        (32, Dv, B·Hv)    threadgroup (32, 4, 1)    [4 SIMD groups = 4 value rows of one head]
// one SIMD group owns value row dv of head n = b·Hv + h for the whole sequence: it loads
// state_in[b, h, dv, :] (Dk fp32 floats) once, runs t = 0 … T−1 with the row in registers, and writes
// the row of the final state once; one thread (lane) owns key columns lane, lane+32, … (Dk/32 floats)
// of that row and the same columns of q and k. Columns are strided by 32 so a SIMD group's loads coalesce.
// Per token, fused: q̂ = q/‖q‖·Dk^-½, k̂ = k/‖k‖ (eps 1e-6 inside the sqrt), β = sigmoid(b),
// α = exp(−exp(A_log)·softplus(a + dt_bias)); S ← αS; u = β(v − S·k̂); S ← S + u k̂ᵀ; o = S·q̂;
// 4 simd_sum (‖q‖², ‖k‖², S·k̂, S·q̂). Value head h reads q/k head h / (Hv/Hk).
// mask[b, t] false: the token leaves the state untouched and its output is 0 (left-padded batches).
// Why sequential in T rather than chunked: value rows are independent, so B·Hv·Dv SIMD groups
// (8192 at the 397B layer shape, B = 1) keep the GPU full without splitting T; the state never
// leaves registers, and per token a row reads q, k (shared by the 4·Hv/Hk rows, L1-resident) and
// one v element. This is the structure of mlx-lm's kernel and of MLX's sequential
// gated_delta_update kernel, fused with the norms and gates.
//
// @inputs  q k v a b A_log dt_bias state_in mask T
// @outputs o state_out
// @template InT (q, k, v, o dtype), Dk, Dv, Hk, Hv
//   q, k [B, T, Hk, Dk] InT;  v [B, T, Hv, Dv] InT;  a, b [B, T, Hv] float;  A_log, dt_bias [Hv] float
//   state_in, state_out [B, Hv, Dv, Dk] float;  mask [B, T] bool;  T int;  o [B, T, Hv, Dv] InT

// @header
inline float gdn_softplus(float x) {
  return metal::max(x, 0.0f) + metal::log(1.0f + metal::exp(-metal::abs(x)));
}

// @body
constexpr int per_lane = Dk / 32;
const uint lane = thread_index_in_simdgroup;
const uint dv = thread_position_in_grid.y;
const uint n = thread_position_in_grid.z;  // b * Hv + h
const uint b_idx = n / Hv;
const uint h = n % Hv;
const uint hk = h / (Hv / Hk);
const float decay_rate = metal::exp(A_log[h]);
const float q_norm_scale = metal::rsqrt(static_cast<float>(Dk));

const device float* s_in = state_in + (n * Dv + dv) * Dk;
float state[per_lane];
for (int i = 0; i < per_lane; ++i) {
  state[i] = s_in[i * 32 + lane];
}

for (int t = 0; t < T; ++t) {
  const uint bt = b_idx * T + t;
  device InT* o_t = o + (bt * Hv + h) * Dv + dv;
  if (!mask[bt]) {
    if (lane == 0) {
      *o_t = static_cast<InT>(0.0f);
    }
    continue;  // uniform across the SIMD group: every lane skips the same token
  }
  const device InT* q_ = q + (bt * Hk + hk) * Dk;
  const device InT* k_ = k + (bt * Hk + hk) * Dk;
  float qv[per_lane], kv[per_lane];
  float q_sq = 0.0f, k_sq = 0.0f;
  for (int i = 0; i < per_lane; ++i) {
    qv[i] = static_cast<float>(q_[i * 32 + lane]);
    kv[i] = static_cast<float>(k_[i * 32 + lane]);
    q_sq += qv[i] * qv[i];
    k_sq += kv[i] * kv[i];
  }
  q_sq = simd_sum(q_sq);
  k_sq = simd_sum(k_sq);
  const float q_scale = metal::rsqrt(q_sq + 1e-6f) * q_norm_scale;
  const float k_scale = metal::rsqrt(k_sq + 1e-6f);

  const uint gate = bt * Hv + h;
  const float beta = 1.0f / (1.0f + metal::exp(-b[gate]));
  const float alpha = metal::exp(-decay_rate * gdn_softplus(a[gate] + dt_bias[h]));

  float predicted = 0.0f;
  for (int i = 0; i < per_lane; ++i) {
    kv[i] *= k_scale;
    state[i] *= alpha;
    predicted += state[i] * kv[i];
  }
  predicted = simd_sum(predicted);
  const float u = beta * (static_cast<float>(v[gate * Dv + dv]) - predicted);

  float out = 0.0f;
  for (int i = 0; i < per_lane; ++i) {
    state[i] += u * kv[i];
    out += state[i] * (qv[i] * q_scale);
  }
  out = simd_sum(out);
  if (lane == 0) {
    *o_t = static_cast<InT>(out);
  }
}

device float* s_out = state_out + (n * Dv + dv) * Dk;
for (int i = 0; i < per_lane; ++i) {
  s_out[i * 32 + lane] = state[i];
}
