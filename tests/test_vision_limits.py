"""One image must not kill the process: resize caps, bounded attention blocks, refusals that name the size.

The 4096² PNG that killed the server with SIGFPE reached MLX's CPU matmul as a [heads, 65,536, 65,536]
score matrix, whose size MLX computes in 32 bits (2³² → 0, a division by zero); a 12-MP photo went to
18 GB before it was stopped. Here: images and video frames are resized to the card's 1344² by default,
the vision attention never holds more than a bounded block of scores, and what still does not fit is
a one-line Qwen35Error.
"""

from __future__ import annotations

import base64
import struct
import zlib

import av
import mlx.core as mx
import numpy as np
import pytest
from checkpoints import TinyCheckpoint
from cli_runner import run_cli
from PIL import Image

import mlx_qwen35.model.vision as vision
from mlx_qwen35 import load
from mlx_qwen35.config import VisionConfig, load_config
from mlx_qwen35.errors import Qwen35Error
from mlx_qwen35.model.vision import VisionModel, attention_block, max_patches, segment_attention
from mlx_qwen35.processing.image import CARD_MAX_PIXELS, VisionBudget
from mlx_qwen35.processing.processor import Processor
from mlx_qwen35.runtime.conversation import Conversation, ConversationSettings
from mlx_qwen35.weights.convert import convert

# Chunked vs one-block attention on random inputs: measured max |Δ| 0 (the CPU computes each query row
# the same way in a block of any height); 1e-6 leaves room for a backend whose matmul tiles by block height.
BLOCK_TOLERANCE = 1e-6
FOUR_K = 4096 * 4096  # the checkpoint's own longest_edge (16,384 LM tokens)


def user(*content) -> list[dict]:
    return [{"role": "user", "content": list(content)}]


def image_item(width: int, height: int) -> dict:
    return {"type": "image", "image": Image.new("RGB", (width, height), (90, 140, 200))}


def one_line_error(call, match: str) -> str:
    with pytest.raises(Qwen35Error, match=match) as caught:
        call()
    assert "\n" not in str(caught.value)
    return str(caught.value)


@pytest.fixture(scope="module")
def processor(tiny_dense_checkpoint: TinyCheckpoint) -> Processor:
    return Processor.from_dir(tiny_dense_checkpoint.path, load_config(tiny_dense_checkpoint.path))


# -- the attention never holds more than a bounded block of scores ------------------------------------


@pytest.mark.parametrize(
    ("max_scores", "expected"),
    [
        (2 * 37 * 37 * 2, (2, 37)),  # two whole segments per block, the last block one segment
        (2 * 37 * 10, (1, 10)),  # query slices of 10 rows: 10, 10, 10, 7 (a partial last block)
        (5, (1, 1)),  # never below one row
    ],
)
def test_attention_block_sizes(max_scores, expected):
    assert attention_block(heads=2, length=37, max_scores=max_scores) == expected


@pytest.mark.parametrize("max_scores", [2 * 37 * 37 * 2, 2 * 37 * 10, 5])
def test_chunked_attention_equals_one_block(max_scores):
    """3 segments of 37 patches: whole-segment blocks, row slices with a partial last block, one row at a time."""
    q, k, v = (mx.random.normal((3, 2, 37, 72), key=mx.random.key(i)) for i in range(3))
    whole = segment_attention(q, k, v, 72**-0.5, pad=False, max_scores=10**9)
    chunked = segment_attention(q, k, v, 72**-0.5, pad=False, max_scores=max_scores)
    assert chunked.shape == whole.shape == (3, 2, 37, 72)
    assert mx.abs(chunked - whole).max().item() <= BLOCK_TOLERANCE


def test_tower_output_is_the_same_with_small_blocks(monkeypatch):
    """An image, then a video of 3 temporal groups: segments stay separate whatever the block size."""
    cfg = VisionConfig(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=48)
    tower = VisionModel(cfg)
    tower.update({"pos_embed": {"weight": mx.random.normal((cfg.num_position_embeddings, 32), key=mx.random.key(5))}})
    grids = [[1, 6, 4], [3, 4, 6]]  # 24-patch image, 3 × 24-patch groups
    pixels = mx.random.uniform(-1, 1, (24 + 72, 1536), key=mx.random.key(6))
    whole = tower(pixels, grids)
    monkeypatch.setattr(vision, "MAX_ATTENTION_SCORES", 2 * 24 * 5)  # 5-row slices: 5, 5, 5, 5, 4
    chunked = tower(pixels, grids)
    assert chunked.shape == (96 // 4, 48)
    assert mx.abs(chunked - whole).max().item() <= BLOCK_TOLERANCE


def test_a_65536_patch_segment_never_reaches_mlx_as_one_matrix(monkeypatch):
    """The SIGFPE input (a 4096² image: 256×256 patches): every block MLX sees stays within the budget."""
    blocks = []

    def recording_attention(q, k, v, scale):
        blocks.append((q.shape, k.shape))
        return mx.zeros(q.shape, dtype=q.dtype)

    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", recording_attention)
    q = mx.zeros((1, 2, 65536, 8))
    out = segment_attention(q, q, q, 8**-0.5, pad=False)
    assert out.shape == (1, 2, 65536, 8)
    scores = [qs[0] * qs[1] * qs[2] * ks[2] for qs, ks in blocks]
    assert max(scores) <= vision.MAX_ATTENTION_SCORES < 2**31
    assert sum(qs[2] for qs, _ in blocks) == 65536 and {ks[2] for _, ks in blocks} == {65536}


def test_max_patches_keeps_every_matrix_within_32_bits():
    real = VisionConfig()  # the 397B tower: fc1's 4304 columns are the widest
    assert max_patches(real, memory_bytes=10**15) == (2**31 - 1) // 4304
    # 24 GB left: 128 kB per patch row (measured 110 kB) after three 64-MB score blocks
    assert max_patches(real, memory_bytes=24 * 10**9) == (24 * 10**9 - 3 * 4 * 2**24) // (4 * (3072 + 17216 + 13824))
    assert max_patches(real, memory_bytes=10**6) == 0


# -- images above 1344×1344 are resized to fit by default ---------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "grid"),
    [
        (4096, 4096, (1, 84, 84)),  # the SIGFPE PNG: 1344×1344, 1764 tokens (was 256×256 patches)
        (4032, 3024, (1, 72, 96)),  # a 12-MP photo: 1536×1152, 4:3 kept (was 190×252 patches)
        (3024, 4032, (1, 96, 72)),  # the same photo upright
        (1344, 1344, (1, 84, 84)),  # at the cap: unchanged
        (1000, 700, (1, 44, 62)),  # below it: as the reference (992×704)
    ],
)
def test_images_above_the_card_size_are_resized_to_fit(processor, width, height, grid):
    inputs = processor(user(image_item(width, height), {"type": "text", "text": "What is it?"}))
    assert tuple(inputs.image_grid_thw.tolist()[0]) == grid
    assert grid[1] * grid[2] * 16 * 16 <= CARD_MAX_PIXELS
    assert processor.vision_token_count(inputs) == grid[1] * grid[2] // 4


def test_max_pixels_raises_the_cap(processor):
    inputs = processor(user(image_item(4032, 3024), {"type": "text", "text": "x"}), max_pixels=2048 * 2048)
    assert inputs.image_grid_thw.tolist() == [[1, 110, 146]]  # 1760×2336 (≤ 2048²), 4015 tokens: fits 4096


def test_bad_pixel_bounds_are_refused(processor):
    photo = user(image_item(64, 64))
    one_line_error(lambda: processor(photo, max_pixels=500), r"--max-pixels 500 is below one 32×32 block")
    one_line_error(lambda: processor(photo, min_pixels=-5), r"--min-pixels -5 is negative")


def test_an_empty_image_is_refused(processor):
    one_line_error(lambda: processor(user(image_item(0, 0))), r"the image is empty \(0×0\)")


# -- what does not fit is refused, naming the size and the fix ----------------------------------------


def test_vision_tokens_beyond_the_context_are_refused(processor):
    """The tiny checkpoint's context is 4096 tokens; 4096² at its own budget is 16,384 vision tokens."""
    message = one_line_error(
        lambda: processor(user(image_item(4096, 4096), {"type": "text", "text": "x"}), max_pixels=FOUR_K),
        r"\(4096×4096, resized to 4096×4096\) is 16,384 vision tokens, more than the 4,096 left of the "
        r"4,096-token context; lower --max-pixels \(now 16777216\) or send fewer images",
    )
    assert message.startswith("<PIL image 4096×4096>")


def test_the_image_that_overflows_the_context_is_named(processor):
    three = user(image_item(1344, 1344), image_item(1344, 1344), image_item(1344, 1000), {"type": "text", "text": "x"})
    one_line_error(
        lambda: processor(three),
        r"^<PIL image 1344×1000> \(1344×1000, resized to 1344×992\) is 1,302 vision tokens, more than the 568 left",
    )


def test_patches_beyond_the_memory_left_are_refused(processor, monkeypatch):
    monkeypatch.setattr(mx, "get_memory_limit", lambda: mx.get_active_memory() + 300 * 10**6)
    room = processor.vision_budget().patches
    assert 0 < room < 7056
    one_line_error(
        lambda: processor(user(image_item(1344, 1344))),
        rf"is 7,056 patches, more than the {room:,} the vision tower can still take in the memory left; "
        r"lower --max-pixels",
    )


def test_budget_is_spent_item_by_item():
    budget = VisionBudget(tokens=100, patches=1000, context=100)
    budget.reserve((1, 16, 16), 2, "a", "fix")  # 256 patches, 64 tokens
    assert (budget.tokens, budget.patches) == (36, 744)
    with pytest.raises(
        Qwen35Error, match="^b is 64 vision tokens, more than the 36 left of the 100-token context; fix$"
    ):
        budget.reserve((1, 16, 16), 2, "b", "fix")


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header for a ``width``×``height`` RGB image (the pixels are never reached)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_decompression_bomb_is_a_qwen35_error(processor, tmp_path):
    url = "data:image/png;base64," + base64.b64encode(png_claiming(20000, 20000)).decode()
    one_line_error(lambda: processor(user({"type": "image", "image": url})), r"too large to decode safely")
    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming(20000, 20000))
    one_line_error(lambda: processor(user({"type": "image", "image": str(path)})), r"bomb\.png: too large to decode")


# -- video frames: bounded per frame as well as per clip ---------------------------------------------


@pytest.fixture(scope="module")
def hd_clip(tmp_path_factory: pytest.TempPathFactory):
    """2 s of 1920×1080 at 4 fps: 4 frames sampled, so the clip budget alone would allow 6 MP per frame."""
    path = tmp_path_factory.mktemp("hd") / "hd.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=4)
        stream.width, stream.height, stream.pix_fmt = 1920, 1080, "yuv420p"
        for i in range(8):
            frame = np.full((1080, 1920, 3), 30 * i, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def test_video_frames_above_the_card_size_are_resized(processor, hd_clip):
    inputs = processor(user({"type": "video", "video": str(hd_clip)}))
    # 1920×1080 → 1792×992 (1,777,664 ≤ 1344²) rather than the reference's 1920×1088
    assert inputs.video_grid_thw.tolist() == [[2, 62, 112]]
    smaller = processor(user({"type": "video", "video": str(hd_clip)}), max_pixels=640 * 360)
    assert smaller.video_grid_thw.tolist() == [[2, 22, 40]]  # 640×352


def test_a_video_beyond_the_memory_left_is_refused(processor, hd_clip, monkeypatch):
    monkeypatch.setattr(mx, "get_memory_limit", lambda: mx.get_active_memory() + 300 * 10**6)
    one_line_error(
        lambda: processor(user({"type": "video", "video": str(hd_clip)})),
        r"hd\.mp4 \(4 frames of 1920×1080, resized to 1792×992\) is 13,888 patches, .* lower --max-pixels "
        r"\(now 1806336\), --fps or --max-frames",
    )


# -- the CLI and the chat settings --------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tiny_dense_checkpoint: TinyCheckpoint, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("limits-cli") / "model"
    convert(hf_path=str(tiny_dense_checkpoint.path), mlx_path=out, recipe="bf16", dtype="float32")
    return out


def test_cli_max_pixels_reaches_the_processor_and_the_refusal_is_one_line(converted, tmp_path, monkeypatch, capsys):
    png = tmp_path / "big.png"
    Image.new("RGB", (4096, 4096), (10, 200, 30)).save(png)
    code, _, err = run_cli(
        monkeypatch, capsys,
        "generate", "--model", str(converted), "--prompt", "What?", "--image", str(png), "--max-pixels", str(FOUR_K),
    )  # fmt: skip
    assert code == 1 and err.count("\n") == 1
    assert err.startswith(
        f"error: {png} (4096×4096, resized to 4096×4096) is 16,384 vision tokens, more than the 4,096"
    )


def test_chat_settings_carry_max_pixels_to_the_processor(converted):
    model, processor = load(str(converted))
    conversation = Conversation(model, processor, ConversationSettings(max_pixels=448 * 448))
    conversation.messages = user(image_item(1344, 1344), {"type": "text", "text": "x"})
    assert conversation.prompt_inputs().image_grid_thw.tolist() == [[1, 28, 28]]


def test_chat_has_a_max_pixels_option(monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "chat", "--help")
    assert code in (0, None) and "--max-pixels" in out
