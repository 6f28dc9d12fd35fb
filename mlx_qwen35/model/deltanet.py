"""Gated DeltaNet: the linear-attention mixer of three layers in four (docs/architecture.md §4)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import TextConfig
from ..kernels.gated_delta import gated_delta_prefill, gated_delta_step
from .norms import GatedRMSNorm
from .parallel import RankShare, sum_partials


class GatedDeltaNet(nn.Module):
    """in_proj → causal depthwise conv (carried state) → delta-rule recurrence (fp32 state) → gated norm → out_proj.

    Cache (an mlx-lm ``ArraysCache`` of two slots): [0] the last K−1 pre-conv inputs [B, K−1, C],
    [1] the recurrent state [B, Hv, Dv, Dk] in float32.
    """

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.num_k_heads = cfg.linear_num_key_heads  # Hk
        self.num_v_heads = cfg.linear_num_value_heads  # Hv
        self.head_k_dim = cfg.linear_key_head_dim  # Dk
        self.head_v_dim = cfg.linear_value_head_dim  # Dv
        self.key_dim = cfg.linear_key_dim
        self.conv_kernel_size = cfg.linear_conv_kernel_dim  # K
        conv_dim = cfg.linear_conv_dim  # C = 2·Hk·Dk + Hv·Dv

        self.in_proj_qkv = nn.Linear(cfg.hidden_size, conv_dim, bias=False)
        self.in_proj_z = nn.Linear(cfg.hidden_size, cfg.linear_value_dim, bias=False)
        self.in_proj_b = nn.Linear(cfg.hidden_size, self.num_v_heads, bias=False)
        self.in_proj_a = nn.Linear(cfg.hidden_size, self.num_v_heads, bias=False)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, self.conv_kernel_size, groups=conv_dim, bias=False)
        self.dt_bias = mx.ones((self.num_v_heads,))
        self.A_log = mx.zeros((self.num_v_heads,))
        self.norm = GatedRMSNorm(self.head_v_dim, eps=cfg.rms_norm_eps)
        self.out_proj = nn.Linear(cfg.linear_value_dim, cfg.hidden_size, bias=False)
        # Tensor-parallel runs: this rank holds a slice of the heads; the ranks' outputs add up (§21).
        self.share: RankShare | None = None

    def _causal_conv(self, qkv: mx.array, cache) -> mx.array:
        """SiLU(depthwise conv over the last K inputs); positions before the sequence are zeros."""
        B, T, C = qkv.shape
        history = (
            cache[0]
            if cache is not None and cache[0] is not None
            else mx.zeros((B, self.conv_kernel_size - 1, C), qkv.dtype)
        )
        window = mx.concatenate([history, qkv], axis=1)  # [B, K−1+T, C]
        if cache is not None:
            cache[0] = window[:, -(self.conv_kernel_size - 1) :]
        if (
            T == 1
        ):  # decode: the conv is one weighted sum over the window, 2.5× (C = 768) to 14× (C = 12288) faster on the CPU
            return nn.silu((window * self.conv1d.weight[:, :, 0].T).sum(axis=1, keepdims=True))
        return nn.silu(self.conv1d(window))  # [B, T, C]

    def _heads(self, conv_out: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """The conv output split into q, k [B, T, Hk, Dk] and v [B, T, Hv, Dv]."""
        B, T, _ = conv_out.shape
        q, k, v = mx.split(conv_out, [self.key_dim, 2 * self.key_dim], axis=-1)
        q = q.reshape(B, T, self.num_k_heads, self.head_k_dim)
        k = k.reshape(B, T, self.num_k_heads, self.head_k_dim)
        return q, k, v.reshape(B, T, self.num_v_heads, self.head_v_dim)

    def _output(self, o: mx.array, x: mx.array) -> mx.array:
        """Gated norm with z, then out_proj: o [B, T, Hv, Dv] → [B, T, H]."""
        B, T, _ = x.shape
        z = self.in_proj_z(x).reshape(B, T, self.num_v_heads, self.head_v_dim)
        return sum_partials(self.share, self.out_proj(self.norm(o, z).reshape(B, T, -1)))

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        T = x.shape[1]
        q, k, v = self._heads(self._causal_conv(self.in_proj_qkv(x), cache))
        b, a = self.in_proj_b(x), self.in_proj_a(x)  # [B, T, Hv] each

        state = cache[1] if cache is not None else None
        if T == 1 and state is not None:
            o, state = gated_delta_step(q, k, v, a, b, self.A_log, self.dt_bias, state)
        else:
            o, state = gated_delta_prefill(q, k, v, a, b, self.A_log, self.dt_bias, state)
        if cache is not None:
            cache[1] = state
        return self._output(o, x)

    def verify(self, x: mx.array, cache, states: list) -> mx.array:
        """T draft positions after a decode state, each run as a decode step (docs/architecture.md §20.2).

        The projections read all T rows at once (one pass over the weights); the conv and the recurrence go
        position by position through the decode step's own code, so every output and state is the one T decode
        steps would give, bit for bit. ``states`` receives [conv window, state] after each position.
        """
        T = x.shape[1]
        qkv = self.in_proj_qkv(x)  # [B, T, C]
        b, a = self.in_proj_b(x), self.in_proj_a(x)
        outs = []
        for t in range(T):
            q, k, v = self._heads(self._causal_conv(qkv[:, t : t + 1], cache))
            o, cache[1] = gated_delta_step(
                q, k, v, a[:, t : t + 1], b[:, t : t + 1], self.A_log, self.dt_bias, cache[1]
            )
            outs.append(o)
            states.append([cache[0], cache[1]])
        return self._output(mx.concatenate(outs, axis=1), x)
