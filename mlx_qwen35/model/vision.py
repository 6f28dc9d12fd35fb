"""The vision tower: a ViT over 16×16×2 patches and a 2×2 merger into the LM width (docs/architecture.md §10).

Input rows arrive in merge-block order (§12.3): every 4 consecutive rows are one 2×2 block, so the
merger only has to concatenate neighbours. Attention is block-diagonal: each image, and each
temporal group of a video, attends only to itself. Module names are the checkpoint's (``visual.*``,
HF names), so weights load without renaming.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import VisionConfig
from ..errors import Qwen35Error

ACTIVATIONS = {"gelu_pytorch_tanh": nn.gelu_approx, "gelu": nn.gelu}
# The reference hard-codes the LayerNorm epsilon (vision_config has no field for it).
LAYER_NORM_EPS = 1e-6
FUSED_HEAD_DIMS = (64, 80, 128)  # head sizes MLX's fused full-attention Metal kernel takes
# Attention scores one block may hold (64 MB in float32): memory O(block · L), not O(L²), on every backend.
MAX_ATTENTION_SCORES = 2**24
# MLX's CPU matmul multiplies a matrix's two sides in 32 bits (mlx 0.32 matmul_dispatch: a.shape(-2) · a.shape(-1)).
MAX_MATRIX_ELEMENTS = 2**31 - 1


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = (T, P, P) over pre-cut patches ≡ a linear on the flat (c, t, y, x) vector.

    The kernel stays in the checkpoint's Conv3d layout [O, C, T, P, P]; flattening it gives the
    [O, C·T·P·P] matrix whose columns line up with the patch vector.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Module()  # holds the Conv3d's weight and bias under the checkpoint's names
        self.proj.weight = mx.zeros(
            (cfg.hidden_size, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        )
        self.proj.bias = mx.zeros((cfg.hidden_size,))

    def __call__(self, patches: mx.array) -> mx.array:
        """patches [N, C·T·P·P] → [N, hidden]."""
        weight = self.proj.weight.reshape(self.proj.weight.shape[0], -1)  # [O, C·T·P·P]
        return mx.addmm(self.proj.bias, patches.astype(weight.dtype), weight.T)


class VisionAttention(nn.Module):
    """Non-causal multi-head attention with 2-D rotary q/k, computed separately within each segment."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, segments: list[tuple[int, int]]) -> mx.array:
        """x [N, W]; cos/sin [N, 1, head_dim] fp32; segments: (count, length) runs of equal-length segments."""
        N = x.shape[0]
        qkv = self.qkv(x).reshape(N, 3, self.num_heads, self.head_dim)
        q, k, v = rotate(qkv[:, 0], cos, sin), rotate(qkv[:, 1], cos, sin), qkv[:, 2]  # [N, heads, D]
        out, start = [], 0
        for count, length in segments:
            # One image, or a video's `count` temporal groups as one batch: no padding, no mask.
            end = start + count * length
            q_s, k_s, v_s = (
                a[start:end].reshape(count, length, self.num_heads, -1).transpose(0, 2, 1, 3) for a in (q, k, v)
            )
            o = segment_attention(q_s, k_s, v_s, self.head_dim**-0.5)  # [count, heads, L, D]
            out.append(o.transpose(0, 2, 1, 3).reshape(count * length, -1))
            start = end
        return self.proj(mx.concatenate(out) if len(out) > 1 else out[0])


def segment_attention(
    q: mx.array, k: mx.array, v: mx.array, scale: float, pad: bool | None = None, max_scores: int | None = None
) -> mx.array:
    """softmax(q·kᵀ·scale)·v over [B, heads, L, D] (B segments of L patches), holding at most ``max_scores`` scores.

    Query rows go in blocks: whole segments while their [heads, L, L] scores fit, else slices of one
    segment's queries against all its keys (each row's softmax sees every key, so the result is the
    same). Without blocks a 65,536-patch image makes MLX's CPU matmul compute the [L, L] matrix's
    size in 32 bits: 2³² wraps to 0 and the process dies of SIGFPE; below that it still needs
    heads·L² floats (275 GB for a 4096² image on the real tower).

    D is zero-padded to a head size of MLX's fused Metal kernel (64, 80 or 128): the ViT's 72 would fall
    back to the unfused path. Padding is exact: zero features add nothing to q·k, and v's padded
    outputs are cut off. Off Metal there is no fused kernel, so nothing is padded.
    """
    batch, heads, length, d = q.shape
    pad = mx.metal.is_available() if pad is None else pad
    width = next((w for w in FUSED_HEAD_DIMS if w >= d), d) if pad else d
    if width != d:
        q, k, v = (mx.pad(a, [(0, 0)] * 3 + [(0, width - d)]) for a in (q, k, v))
    if max_scores is None:
        # Metal's fused kernel never holds the scores, so one block serves (and saves a sync per block).
        fused = mx.metal.is_available() and width in FUSED_HEAD_DIMS
        max_scores = batch * heads * length * length if fused else MAX_ATTENTION_SCORES
    segments, rows = attention_block(heads, length, max_scores)
    out = []
    for s in range(0, batch, segments):
        k_s, v_s = k[s : s + segments], v[s : s + segments]
        blocks = []
        for r in range(0, length, rows):
            blocks.append(
                mx.fast.scaled_dot_product_attention(q[s : s + segments, :, r : r + rows], k_s, v_s, scale=scale)
            )
            # MLX runs independent branches breadth-first: left lazy, every block's scores would be alive at
            # once (measured for one 1344² image's 48 blocks: 1.4 GB instead of 0.1 GB).
            mx.eval(blocks[-1])
        out.append(mx.concatenate(blocks, axis=2) if len(blocks) > 1 else blocks[0])
    return (mx.concatenate(out) if len(out) > 1 else out[0])[..., :d]


def attention_block(heads: int, length: int, max_scores: int) -> tuple[int, int]:
    """(segments, query rows) per attention block: as many whole segments as fit ``max_scores``, else row slices."""
    per_segment = heads * length * length
    if per_segment <= max_scores:
        return max_scores // per_segment, length
    return 1, max(1, max_scores // (heads * length))


def rotate(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate-half RoPE over the whole head, in fp32 as the reference does; x [N, heads, D]."""
    half = x.shape[-1] // 2
    xf = x.astype(mx.float32)
    rotated_half = mx.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + rotated_half * sin).astype(x.dtype)


class VisionMLP(nn.Module):
    """fc2(act(fc1(x))); the activation is tanh-approximate GELU in Qwen3.5."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.hidden_act not in ACTIVATIONS:
            raise Qwen35Error(
                f"config.json: vision_config.hidden_act '{cfg.hidden_act}' is not supported; use one of {list(ACTIVATIONS)}"
            )
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    """x += Attn(LN1(x)); x += MLP(LN2(x))."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, segments: list[tuple[int, int]]) -> mx.array:
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """LN per patch → concatenate each 2×2 block's 4 rows → fc1 → GELU (exact) → fc2 into the LM width."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        merged = cfg.hidden_size * cfg.spatial_merge_size**2
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)
        self.linear_fc1 = nn.Linear(merged, merged)
        self.linear_fc2 = nn.Linear(merged, cfg.out_hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        """x [N, W] in merge-block order → [N / merge², out_hidden_size]."""
        x = self.norm(x).reshape(-1, self.linear_fc1.weight.shape[1])  # [N/4, 4W]
        return self.linear_fc2(nn.gelu(self.linear_fc1(x)))


def max_patches(cfg: VisionConfig, memory_bytes: int) -> int:
    """The most patch rows one tower call can take: its working set within ``memory_bytes``, each matrix within 2³¹.

    Working set measured on the CPU backend (width-1152 tower, 1024 and 4096 patches; 2 and 4 blocks
    alike, it does not grow with depth): 110 kB per patch row plus 85 MB; the estimate below, 128 kB per
    row plus three 64-MB score blocks, keeps a margin over that.
    """
    patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
    widest = max(patch_dim, 3 * cfg.hidden_size, cfg.intermediate_size)  # columns of the tower's largest matrix
    per_patch = 4 * (2 * patch_dim + 4 * cfg.intermediate_size + 12 * cfg.hidden_size)  # float32 activations
    in_memory = (memory_bytes - 3 * 4 * MAX_ATTENTION_SCORES) // per_patch
    return max(0, min(MAX_MATRIX_ELEMENTS // widest, in_memory))


def merge_block_order(grid: np.ndarray, merge: int) -> np.ndarray:
    """A [gh, gw, ...] grid → [gh·gw, ...] rows in merge-block order (block_row, block_col, in_row, in_col)."""
    gh, gw = grid.shape[:2]
    blocks = grid.reshape(gh // merge, merge, gw // merge, merge, *grid.shape[2:])
    return blocks.swapaxes(1, 2).reshape(gh * gw, *grid.shape[2:])


def interpolation_matrix(n_out: int, n_in: int) -> np.ndarray:
    """[n_out, n_in] weights of 1-D linear resampling with align_corners: row r reads src = r·(n_in−1)/(n_out−1)."""
    src = np.arange(n_out, dtype=np.float32) * np.float32(n_in - 1) / np.float32(max(n_out - 1, 1))
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    m = np.zeros((n_out, n_in), dtype=np.float32)
    np.add.at(m, (np.arange(n_out), lo), 1 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return m


class VisionModel(nn.Module):
    """pixel patches [N, C·T·P·P] + grid_thw [items, 3] → merged features [N / merge², out_hidden_size]."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        side = int(round(cfg.num_position_embeddings**0.5))
        if side * side != cfg.num_position_embeddings:
            raise Qwen35Error(
                f"config.json: vision_config.num_position_embeddings ({cfg.num_position_embeddings}) is not a square; "
                "the learned position table is side × side"
            )
        self.table_side = side
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = [VisionBlock(cfg) for _ in range(cfg.depth)]
        self.merger = PatchMerger(cfg)
        head_dim = cfg.hidden_size // cfg.num_heads
        # Axial rotary: head_dim/4 frequencies, used once for the row and once for the column.
        self._inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, head_dim // 2, 2, dtype=np.float32) / (head_dim // 2))

    def position_embedding(self, gh: int, gw: int) -> mx.array:
        """The learned side×side table resampled bilinearly (align_corners) to gh×gw: [gh·gw, W] in merge-block order."""
        side, merge = self.table_side, self.config.spatial_merge_size
        table = self.pos_embed.weight.reshape(side, side, -1)  # [side, side, W]
        rows = mx.array(interpolation_matrix(gh, side))  # [gh, side]
        cols = mx.array(interpolation_matrix(gw, side))  # [gw, side]
        # Bilinear = linear along rows, then along columns (separable).
        grid = mx.einsum("rs,stw,ct->rcw", rows, table.astype(mx.float32), cols)  # [gh, gw, W]
        order = merge_block_order(np.arange(gh * gw).reshape(gh, gw), merge)
        return grid.reshape(gh * gw, -1)[mx.array(order)]

    def rotary(self, gh: int, gw: int) -> tuple[mx.array, mx.array]:
        """cos, sin [gh·gw, head_dim] fp32 for patches at (row, col) in merge-block order."""
        rc = merge_block_order(
            np.stack(np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij"), -1), self.config.spatial_merge_size
        )
        angles = (rc[:, :, None] * self._inv_freq).reshape(
            gh * gw, -1
        )  # [gh·gw, head_dim/2]: row freqs, then col freqs
        angles = mx.array(np.concatenate([angles, angles], axis=-1), dtype=mx.float32)
        return mx.cos(angles), mx.sin(angles)

    def __call__(self, pixel_values: mx.array, grid_thw: mx.array | list) -> mx.array:
        """Encode images or videos (each its own grid); output rows in merge-block order, items in sequence."""
        grids = [tuple(int(v) for v in g) for g in np.array(grid_thw).reshape(-1, 3)]
        n_patches = sum(t * h * w for t, h, w in grids)
        if pixel_values.shape[0] != n_patches:
            raise Qwen35Error(
                f"pixel values have {pixel_values.shape[0]} patch rows but the grids {grids} describe {n_patches}; "
                "pass the pixel values and grid_thw produced together by the processor"
            )
        x = self.patch_embed(pixel_values)  # [N, W]
        pos, cos, sin = [], [], []
        for t, h, w in grids:  # the same spatial tables repeat for every temporal group
            p, (c, s) = self.position_embedding(h, w), self.rotary(h, w)
            pos.append(mx.tile(p, (t, 1)))
            cos.append(mx.tile(c, (t, 1)))
            sin.append(mx.tile(s, (t, 1)))
        x = x + mx.concatenate(pos).astype(x.dtype)
        cos, sin = mx.concatenate(cos)[:, None], mx.concatenate(sin)[:, None]  # [N, 1, head_dim]
        segments = [(t, h * w) for t, h, w in grids]
        for block in self.blocks:
            x = block(x, cos, sin, segments)
        return self.merger(x)
