// gated_delta_decode — one decode token of the Gated DeltaNet recurrence, all heads (ARCHITECTURE.md §4.3–4.6).
//
// grid        (32, Dv, B·Hv)    threadgroup (32, 4, 1)    [4 SIMD groups = 4 value rows of one head]
// one SIMD group owns value row dv of head n = b·Hv + h: state_in[b, h, dv, :] (Dk fp32 floats);
// one thread (lane) owns the Dk/32 key columns lane, lane+32, … of that row, in registers, and the
// same columns of q and k. Reductions over Dk are simd_sum; 4 per token (‖q‖², ‖k‖², S·k̂, S·q̂).
// Fused: q̂ = q/‖q‖·Dk^-½, k̂ = k/‖k‖ (eps 1e-6 inside the sqrt), β = sigmoid(b),
// α = exp(−exp(A_log)·softplus(a + dt_bias)); S ← αS; u = β(v − S·k̂); S ← S + u k̂ᵀ; o = S·q̂.
// Value head h reads q/k head h / (Hv/Hk). Columns are strided by 32 so a SIMD group's loads coalesce.
//
// @inputs  q k v a b A_log dt_bias state_in
// @outputs o state_out
// @template InT (q, k, v, o dtype), Dk, Dv, Hk, Hv
//   q, k [B, 1, Hk, Dk] InT;  v [B, 1, Hv, Dv] InT;  a, b [B, 1, Hv] float;  A_log, dt_bias [Hv] float
//   state_in, state_out [B, Hv, Dv, Dk] float;  o [B, 1, Hv, Dv] InT

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

const device InT* q_ = q + (b_idx * Hk + hk) * Dk;
const device InT* k_ = k + (b_idx * Hk + hk) * Dk;
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
const float q_scale = metal::rsqrt(q_sq + 1e-6f) * metal::rsqrt(static_cast<float>(Dk));
const float k_scale = metal::rsqrt(k_sq + 1e-6f);

const float beta = 1.0f / (1.0f + metal::exp(-b[n]));
const float alpha = metal::exp(-metal::exp(A_log[h]) * gdn_softplus(a[n] + dt_bias[h]));

const device float* s_in = state_in + (n * Dv + dv) * Dk;
device float* s_out = state_out + (n * Dv + dv) * Dk;
float state[per_lane];
float predicted = 0.0f;  // (S k̂)[dv] after the decay
for (int i = 0; i < per_lane; ++i) {
  kv[i] *= k_scale;
  state[i] = s_in[i * 32 + lane] * alpha;
  predicted += state[i] * kv[i];
}
predicted = simd_sum(predicted);
const float u = beta * (static_cast<float>(v[n * Dv + dv]) - predicted);

float out = 0.0f;
for (int i = 0; i < per_lane; ++i) {
  state[i] += u * kv[i];
  out += state[i] * (qv[i] * q_scale);
  s_out[i * 32 + lane] = state[i];
}
out = simd_sum(out);
if (lane == 0) {
  o[n * Dv + dv] = static_cast<InT>(out);
}
