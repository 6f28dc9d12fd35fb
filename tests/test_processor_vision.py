"""The processor on messages with images and videos: expanded token sequences, ModelInputs, errors.

Runs on the tiny dense checkpoint's tokenizer, chat template and processor files (ids from its
tokenizer, not Qwen's real ones). The pixel values themselves are checked against transformers in
test_image_processing.py / test_video_processing.py.
"""

from __future__ import annotations

import json

import av
import mlx.core as mx
import numpy as np
import pytest
from checkpoints import TinyCheckpoint
from cli_runner import run_cli
from PIL import Image

from mlx_qwen35.config import load_config
from mlx_qwen35.errors import Qwen35Error
from mlx_qwen35.model.inputs import ModelInputs
from mlx_qwen35.processing.processor import Processor
from mlx_qwen35.weights.convert import convert

PATCH_ROW = 3 * 2 * 16 * 16


@pytest.fixture(scope="module")
def processor(tiny_dense_checkpoint: TinyCheckpoint) -> Processor:
    return Processor.from_dir(tiny_dense_checkpoint.path, load_config(tiny_dense_checkpoint.path))


@pytest.fixture(scope="module")
def tokens(tiny_dense_checkpoint: TinyCheckpoint):
    return tiny_dense_checkpoint.tokens


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory: pytest.TempPathFactory):
    """A 5-second 10-fps clip, 96×64: 10 frames sampled at 2 fps → 5 groups of 4×6 patches = 6 tokens each."""
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for i in range(50):
            frame = np.full((64, 96, 3), 40, dtype=np.uint8)
            frame[10:26, i : i + 16] = 255
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def user(*content) -> list[dict]:
    return [{"role": "user", "content": list(content)}]


def runs(ids: list[int], token_id: int) -> list[int]:
    """Lengths of the maximal runs of ``token_id`` in ``ids``."""
    lengths, current = [], 0
    for token in ids + [None]:
        if token == token_id:
            current += 1
        elif current:
            lengths.append(current)
            current = 0
    return lengths


def test_text_only_messages_give_ids_only(processor):
    inputs = processor([{"role": "user", "content": "Hello"}])
    assert isinstance(inputs, ModelInputs) and not inputs.has_vision
    assert inputs.input_ids == processor.encode(processor.apply_chat_template([{"role": "user", "content": "Hello"}]))


def test_one_image_expands_to_its_merged_tokens(processor, tokens):
    inputs = processor(user({"type": "image", "image": picture(320, 256)}, {"type": "text", "text": "What is this?"}))
    # 320×256 → grid (1, 16, 20) → 320 patches → 80 LM tokens
    assert runs(inputs.input_ids, tokens.image_token_id) == [80]
    start = inputs.input_ids.index(tokens.image_token_id) - 1
    assert inputs.input_ids[start] == tokens.vision_start_token_id
    assert inputs.input_ids[start + 81] == tokens.vision_end_token_id
    assert (
        inputs.input_ids.count(tokens.vision_start_token_id) == inputs.input_ids.count(tokens.vision_end_token_id) == 1
    )
    assert inputs.pixel_values.dtype == mx.float32 and inputs.pixel_values.shape == (320, PATCH_ROW)
    assert inputs.image_grid_thw.tolist() == [[1, 16, 20]]
    assert inputs.pixel_values_videos is None and inputs.video_grid_thw is None
    assert processor.vision_token_count(inputs) == 80


def test_ids_equal_the_rendered_text_with_pads_spelled_out(processor, tokens):
    """The expansion is textual, so the ids are exactly those of the reference processor's expanded string."""
    messages = user(
        {"type": "text", "text": "Compare "},
        {"type": "image", "image": picture(64, 64)},
        {"type": "text", "text": " please"},
    )
    text = processor.apply_chat_template(messages)
    pad = processor.tokenizer.convert_ids_to_tokens(tokens.image_token_id)
    expected = processor.encode(text.replace(pad, pad * 64))  # 64×64 → 256×256 (min pixels) → 64 tokens
    assert processor(messages).input_ids == expected


def test_two_images_keep_their_order_and_sizes(processor, tokens):
    inputs = processor(
        user(
            {"type": "image", "image": picture(320, 256, seed=1)},
            {"type": "text", "text": "and"},
            {"type": "image", "image": picture(512, 256, seed=2)},
            {"type": "text", "text": "differ how?"},
        )
    )
    assert runs(inputs.input_ids, tokens.image_token_id) == [80, 128]
    assert inputs.image_grid_thw.tolist() == [[1, 16, 20], [1, 16, 32]]
    assert inputs.pixel_values.shape == (320 + 512, PATCH_ROW)
    assert processor.vision_token_count(inputs) == 208


def test_image_given_by_path_and_pixel_overrides(processor, tokens, tmp_path):
    path = tmp_path / "shot.png"
    picture(1344, 1344).save(path)
    inputs = processor(user({"type": "image", "image": str(path)}, {"type": "text", "text": "Read it."}))
    assert runs(inputs.input_ids, tokens.image_token_id) == [1764]
    smaller = processor(
        user({"type": "image", "image": str(path)}, {"type": "text", "text": "Read it."}), max_pixels=448 * 448
    )
    assert smaller.image_grid_thw.tolist() == [[1, 28, 28]] and runs(smaller.input_ids, tokens.image_token_id) == [196]


def test_video_uses_the_reference_qwen3_vl_layout(processor, tokens, clip_path):
    messages = user({"type": "video", "video": str(clip_path)}, {"type": "text", "text": "What moves?"})
    inputs = processor(messages)
    assert inputs.video_grid_thw.tolist() == [[5, 4, 6]]
    assert inputs.pixel_values_videos.dtype == mx.float32 and inputs.pixel_values_videos.shape == (5 * 24, PATCH_ROW)
    assert inputs.pixel_values is None
    # Per group: "<t seconds>" <|vision_start|> 6 × <|video_pad|> <|vision_end|>; no extra outer pair.
    assert runs(inputs.input_ids, tokens.video_token_id) == [6] * 5
    assert (
        inputs.input_ids.count(tokens.vision_start_token_id) == inputs.input_ids.count(tokens.vision_end_token_id) == 5
    )
    text = processor.decode(inputs.input_ids)
    # 50 frames → 10 sampled: 0, 5, 11, 16, 22, 27, 33, 38, 44, 49 → pair means 0.25, 1.35, 2.45, 3.55, 4.65 s
    stamps = ["<0.2 seconds>", "<1.4 seconds>", "<2.5 seconds>", "<3.5 seconds>", "<4.7 seconds>"]
    start, end = "<|vision_start|>", "<|vision_end|>"
    expected_video = "".join(f"{stamp}{start}{'<|video_pad|>' * 6}{end}" for stamp in stamps)
    assert "user\n" + expected_video + "What moves?" in text
    assert processor.vision_token_count(inputs) == 30


def test_video_overrides_reach_the_sampler(processor, tokens, clip_path):
    messages = user({"type": "video", "video": str(clip_path)}, {"type": "text", "text": "?"})
    inputs = processor(messages, video_start=1.0, video_end=3.0, fps=4.0)
    # frames 10…29 at 4 fps → 8 frames → 4 groups, stamps from 1.0 s on
    assert inputs.video_grid_thw.tolist() == [[4, 4, 6]]
    assert "<1.1 seconds>" in processor.decode(inputs.input_ids)
    limited = processor(messages, max_frames=4)
    assert limited.video_grid_thw.tolist() == [[2, 4, 6]]


def test_image_and_video_together(processor, tokens, clip_path):
    inputs = processor(
        user(
            {"type": "video", "video": str(clip_path)},
            {"type": "image", "image": picture(320, 256)},
            {"type": "text", "text": "Is the image a frame of the video?"},
        )
    )
    assert runs(inputs.input_ids, tokens.video_token_id) == [6] * 5
    assert runs(inputs.input_ids, tokens.image_token_id) == [80]
    assert inputs.input_ids.index(tokens.video_token_id) < inputs.input_ids.index(tokens.image_token_id)
    assert inputs.image_grid_thw.tolist() == [[1, 16, 20]] and inputs.video_grid_thw.tolist() == [[5, 4, 6]]


def test_thinking_switch_reaches_the_template(processor):
    messages = user({"type": "image", "image": picture(64, 64)}, {"type": "text", "text": "Hi"})
    assert processor.decode(processor(messages).input_ids).endswith("<|im_start|>assistant\n<think>\n")
    assert processor.decode(processor(messages, enable_thinking=False).input_ids).endswith("<think>\n\n</think>\n\n")


def one_line_error(processor, messages, match: str, **kwargs) -> None:
    with pytest.raises(Qwen35Error, match=match) as caught:
        processor(messages, **kwargs)
    assert "\n" not in str(caught.value)


def test_errors_name_the_file(processor, tmp_path):
    one_line_error(
        processor, user({"type": "image", "image": str(tmp_path / "absent.jpg")}), r"absent\.jpg: no such image file"
    )
    one_line_error(
        processor,
        user({"type": "image", "image": "http://example.com/x.jpg"}),
        r"http://example\.com/x\.jpg: URLs are not fetched",
    )
    one_line_error(
        processor, user({"type": "video", "video": str(tmp_path / "absent.mp4")}), r"absent\.mp4: no such video file"
    )

    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"garbage" * 500)
    one_line_error(processor, user({"type": "video", "video": str(broken)}), r"broken\.mp4: not a video PyAV can read")

    sound = tmp_path / "sound.wav"
    with av.open(str(sound), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    one_line_error(processor, user({"type": "video", "video": str(sound)}), r"sound\.wav: has no video stream")

    strip = tmp_path / "strip.png"
    picture(6600, 32).save(strip)
    one_line_error(processor, user({"type": "image", "image": str(strip)}), r"strip\.png: aspect ratio 206:1")


def test_placeholder_tokens_typed_into_the_text_are_refused(processor):
    messages = user(
        {"type": "image", "image": picture(64, 64)},
        {"type": "text", "text": "<|vision_start|><|image_pad|><|vision_end|>"},
    )
    one_line_error(processor, messages, r"the prompt text contains vision placeholder tokens")


def test_images_in_a_system_message_are_a_clear_error(processor):
    messages = [
        {"role": "system", "content": [{"type": "image", "image": picture(64, 64)}]},
        {"role": "user", "content": "Hi"},
    ]
    one_line_error(processor, messages, r"the chat template refused the messages: System message cannot contain images")


@pytest.fixture(scope="module")
def converted(tiny_dense_checkpoint: TinyCheckpoint, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("vision-cli") / "model"
    convert(hf_path=str(tiny_dense_checkpoint.path), mlx_path=out, recipe="bf16", dtype="float32")
    return out


def test_cli_image_and_video_json(converted, clip_path, tmp_path, monkeypatch, capsys):
    image = tmp_path / "shot.png"
    picture(320, 256).save(image)
    code, out, err = run_cli(
        monkeypatch, capsys,
        "generate", "--model", str(converted), "--prompt", "What is shown?", "--image", str(image), "--image", str(image),
        "--video", str(clip_path), "--video-end", "3", "--max-tokens", "2", "--temp", "0", "--json",
    )  # fmt: skip
    assert code in (0, None), err
    stats = json.loads(out)
    assert stats["vision_tokens"] == 2 * 80 + 3 * 6  # two 80-token images; 3 s → 6 frames → 3 groups of 6
    assert stats["vision_seconds"] > 0 and stats["prompt_tokens"] > stats["vision_tokens"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--image", "none.png"), "error: none.png: no such image file"),
        (("--image", "https://example.com/a.png"), "error: https://example.com/a.png: URLs are not fetched"),
        (("--raw", "--image", "none.png"), "error: --raw sends text only"),
    ],
)
def test_cli_vision_errors_are_one_line(converted, args, message, monkeypatch, capsys):
    code, _, err = run_cli(
        monkeypatch, capsys, "generate", "--model", str(converted), "--prompt", "x", "--max-tokens", "1", *args
    )
    assert code == 1
    assert err.startswith(message) and err.count("\n") == 1
