"""Processor: candidate grid, best resolution, token counts, tiling pixels, chat template ids, labels, batching, errors."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from backbone.processor import (
    DeepseekVL2Processor,
    ImageLoadError,
    ProcessorConfig,
    ProcessorError,
    PromptTooLongError,
    image_token_count,
    make_candidate_resolutions,
    select_best_resolution,
    tokens_for_grid,
)
from backbone.tokenizer import build_bpe_tokenizer, load_tokenizer

PUBLISHED_384 = [
    (384, 384), (384, 768), (768, 384), (384, 1152), (1152, 384), (384, 1536), (1536, 384), (768, 768),
    (384, 1920), (1920, 384), (384, 2304), (2304, 384), (768, 1152), (1152, 768), (384, 2688), (2688, 384),
    (384, 3072), (3072, 384), (768, 1536), (1536, 768), (384, 3456), (3456, 384), (1152, 1152),
]  # fmt: skip
PUBLISHED_COUNTS = {421, 617, 631, 813, 841, 1009, 1023, 1051, 1205, 1261, 1401, 1415, 1429, 1471, 1597, 1681,
                    1793, 1807, 1835, 1891, 1989, 2017, 2101}  # fmt: skip
TINY = ProcessorConfig.preset("tiny")


def rand_image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tok():
    return build_bpe_tokenizer()


@pytest.fixture(scope="module")
def proc(tok):
    return DeepseekVL2Processor(tok, TINY)


# ---------------------------------------------------------------------------------------------------- tiling arithmetic
def test_candidates_match_published_list():
    assert list(ProcessorConfig().candidate_resolutions) == PUBLISHED_384
    assert list(make_candidate_resolutions(64, 9)) == [(w // 6, h // 6) for w, h in PUBLISHED_384]
    assert len(make_candidate_resolutions(384, 4)) == 8


@pytest.mark.parametrize(
    "size, best",
    [((640, 480), (768, 768)), ((1920, 1080), (1536, 768)), ((1000, 1000), (1152, 1152)), ((50, 30), (384, 384)),
     ((384, 384), (384, 384)), ((3000, 400), (3072, 384)), ((400, 3000), (384, 3072))],
)  # fmt: skip
def test_select_best_resolution(size, best):
    assert select_best_resolution(*size) == best


def test_select_best_resolution_full_tie_takes_first():
    # a 1x1 image fits every candidate fully (effective 1): least waste is 384x384, the first entry
    assert select_best_resolution(1, 1) == (384, 384)
    cfg = ProcessorConfig(candidate_resolutions=[(768, 384), (384, 768)])
    assert select_best_resolution(100, 100, cfg) == (768, 384)  # same effective, same waste: first wins
    cfg = ProcessorConfig(candidate_resolutions=[(384, 768), (768, 384)])
    assert select_best_resolution(100, 100, cfg) == (384, 768)


def test_token_counts_of_all_candidates():
    cfg = ProcessorConfig()
    counts = [tokens_for_grid(w // 384, h // 384) for w, h in cfg.candidate_resolutions]
    assert set(counts) == PUBLISHED_COUNTS and len(counts) == 23
    assert image_token_count(384, 384) == 421
    assert image_token_count(384, 3456) == 2101 == max(counts)
    assert image_token_count(3456, 384) == 1989
    assert image_token_count(1000, 1000) == 2017
    assert image_token_count(1000, 1000, num_images=2) == 2017
    assert image_token_count(1000, 1000, num_images=3) == 421  # no tiling with 3+ images
    assert (cfg.patches_per_side, cfg.tokens_per_side, cfg.pad_color) == (27, 14, (127, 127, 127))


def test_tiny_config_geometry():
    assert (TINY.patches_per_side, TINY.tokens_per_side) == (8, 4)
    assert image_token_count(64, 64, config=TINY) == 4 * 5 + 1 + 4 * 5
    assert select_best_resolution(640 // 6, 480 // 6, TINY) == (128, 128)


# ---------------------------------------------------------------------------------------------------- pixels
def official_tiles(image: Image.Image, best, cfg: ProcessorConfig) -> torch.Tensor:
    """The official transform written out plainly: ImageOps.pad, crop row-major, ToTensor, Normalize."""

    def to_tensor(img):
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255)
        return (x - torch.tensor(cfg.image_mean)[:, None, None]) / torch.tensor(cfg.image_std)[:, None, None]

    t = cfg.tile_size
    views = [to_tensor(ImageOps.pad(image, (t, t), color=cfg.pad_color))]
    local = ImageOps.pad(image, best, color=cfg.pad_color)
    for y in range(0, best[1], t):
        for x in range(0, best[0], t):
            views.append(to_tensor(local.crop((x, y, x + t, y + t))))
    return torch.stack(views)


@pytest.mark.parametrize("size", [(64, 64), (150, 90), (300, 40), (33, 200)])
def test_tiles_equal_official_transform(proc, size):
    image = rand_image(*size)
    tiles, (nw, nh) = proc.preprocess_image(image)
    best = select_best_resolution(*size, TINY)
    assert (nw, nh) == (best[0] // 64, best[1] // 64)
    assert tiles.shape == (1 + nw * nh, 3, 64, 64) and tiles.dtype == torch.float32
    assert torch.equal(tiles, official_tiles(image, best, TINY))
    assert tiles.min() >= -1 and tiles.max() <= 1


def test_grey_padding_and_tile_order(proc):
    # a 128x64 image: 2 tiles side by side; left half black, right half white -> tile 1 black, tile 2 white
    pixels = np.zeros((64, 128, 3), np.uint8)
    pixels[:, 64:] = 255
    tiles, crop = proc.preprocess_image(Image.fromarray(pixels))
    assert crop == (2, 1)
    assert torch.all(tiles[1] == -1) and torch.all(tiles[2] == 1)
    grey = 127 / 255 * 2 - 1
    assert torch.allclose(tiles[0, :, :16], torch.full((3, 16, 64), grey))  # global view: pad rows on top


def test_matches_torchvision():
    tv = pytest.importorskip("torchvision.transforms")
    proc = DeepseekVL2Processor(build_bpe_tokenizer(), ProcessorConfig())
    image = rand_image(500, 300, seed=3)
    tiles, (nw, nh) = proc.preprocess_image(image)
    transform = tv.Compose([tv.ToTensor(), tv.Normalize([0.5] * 3, [0.5] * 3)])
    local = ImageOps.pad(image, (nw * 384, nh * 384), color=(127, 127, 127))
    expected = [transform(ImageOps.pad(image, (384, 384), color=(127, 127, 127)))]
    expected += [transform(local.crop((x, y, x + 384, y + 384))) for y in range(0, nh * 384, 384) for x in range(0, nw * 384, 384)]  # fmt: skip
    assert torch.equal(tiles, torch.stack(expected))


# ---------------------------------------------------------------------------------------------------- ids and labels
def test_single_turn_ids(proc, tok):
    image = rand_image(150, 90)
    out = proc.process([{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": " A cube. "}], [image])  # fmt: skip
    n = image_token_count(150, 90, config=TINY)
    expected = [tok.bos_id] + tok.encode("<|User|>: ") + [tok.image_id] * n + tok.encode("\nWhat is it?\n\n<|Assistant|>:")  # fmt: skip
    expected += tok.encode("A cube.") + [tok.eos_id]
    assert out["input_ids"].tolist() == expected
    assert out["images_seq_mask"].sum() == n == out["num_image_tokens"][0]
    assert torch.equal(out["images_seq_mask"], out["input_ids"] == tok.image_id)
    assert torch.all(out["labels"][out["images_seq_mask"]] == -100)
    assert torch.equal(out["labels"][~out["images_seq_mask"]], out["input_ids"][~out["images_seq_mask"]])  # mask_prompt off
    assert out["images"].shape[0] == 1 + int(out["images_spatial_crop"].prod())
    assert out["images_spatial_crop"].tolist() == [[3, 2]]
    assert out["images_spatial_crop"].dtype == torch.long


def test_mask_prompt_supervises_answers_only(tok):
    proc = DeepseekVL2Processor(tok, ProcessorConfig.preset("tiny", mask_prompt=True))
    conv = [
        {"role": "user", "content": "<image> first?"},
        {"role": "assistant", "content": "one"},
        {"role": "user", "content": "second?"},
        {"role": "assistant", "content": "two"},
    ]
    out = proc.process(conv, [rand_image(64, 64)], system="You are a robot.")
    supervised = out["labels"][out["labels"] != -100].tolist()
    assert supervised == [tok.bos_id] + tok.encode("one") + [tok.eos_id] + tok.encode("two") + [tok.eos_id]
    ids = out["input_ids"].tolist()
    assert ids[: 1 + len(tok.encode("You are a robot."))] == [tok.bos_id] + tok.encode("You are a robot.")
    assert ids.count(tok.eos_id) == 2 and ids[-1] == tok.eos_id


def test_inference_mode_ends_with_assistant_colon(proc, tok):
    out = proc.process("Hello <image>", [rand_image(64, 64)], inference=True)
    ids = out["input_ids"].tolist()
    assert ids[-len(tok.encode("\n\n<|Assistant|>:")) :] == tok.encode("\n\n<|Assistant|>:")
    assert tok.eos_id not in ids
    assert len(out["labels"]) == len(out["images_seq_mask"]) == len(ids)
    same = proc.process([{"role": "user", "content": "Hello <image>"}, {"role": "assistant", "content": ""}], [rand_image(64, 64)], inference=True)  # fmt: skip
    assert torch.equal(same["input_ids"], out["input_ids"])


def test_image_counts_per_tag_and_no_tiling_with_three(proc):
    sizes = [(150, 90), (64, 200), (64, 64)]
    images = [rand_image(*s, seed=i) for i, s in enumerate(sizes)]
    conv = [{"role": "user", "content": "<image> and <image>"}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "then <image>?", "images": []}]  # fmt: skip
    out = proc.process(conv, images)
    assert out["num_image_tokens"] == [41, 41, 41]  # 3 images: 1 global + 1 local each
    assert out["images_spatial_crop"].tolist() == [[1, 1]] * 3
    assert out["images"].shape[0] == 6
    two = proc.process("<image><image>", images[:2])
    assert two["num_image_tokens"] == [image_token_count(*s, num_images=2, config=TINY) for s in sizes[:2]]
    assert two["images_seq_mask"].sum() == sum(two["num_image_tokens"])


def test_images_gathered_from_messages(proc):
    image = rand_image(100, 60)
    a = proc.process([{"role": "user", "content": "<image> hi", "images": [image]}])
    b = proc.process([{"role": "user", "content": "<image> hi"}], [image])
    for key in ("input_ids", "labels", "images", "images_spatial_crop"):
        assert torch.equal(a[key], b[key])


def test_text_only_sample(proc, tok):
    out = proc.process("just text")
    assert out["images"].shape == (1, 3, 64, 64) and not out["images"].any()
    assert out["images_spatial_crop"].tolist() == [[0, 0]]
    assert not out["images_seq_mask"].any()


def test_processor_accepts_paths_and_arrays(proc, tmp_path):
    image = rand_image(90, 70)
    image.save(tmp_path / "a.png")
    by_path = proc.process("<image>", [tmp_path / "a.png"])
    by_str = proc.process("<image>", [str(tmp_path / "a.png")])
    by_array = proc.process("<image>", [np.array(image)])
    by_rgba = proc.process("<image>", [image.convert("RGBA")])
    ref = proc.process("<image>", [image])
    for out in (by_path, by_str, by_array, by_rgba):
        assert torch.equal(out["images"], ref["images"])


# ---------------------------------------------------------------------------------------------------- batching
def test_collate_left_padding(proc, tok):
    samples = [
        proc.process("<image> a long question about the picture", [rand_image(150, 90)]),
        proc.process("short"),
        proc.process("<image><image>", [rand_image(64, 64), rand_image(64, 120)]),
    ]
    batch = proc.collate(samples)
    lens = [len(s["input_ids"]) for s in samples]
    T = max(lens)
    assert batch["input_ids"].shape == (3, T) and batch["seq_lens"] == lens
    for b, s in enumerate(samples):
        pad = T - lens[b]
        assert torch.all(batch["input_ids"][b, :pad] == tok.pad_id)
        assert torch.equal(batch["input_ids"][b, pad:], s["input_ids"])
        assert torch.equal(batch["attention_mask"][b], torch.arange(T) >= pad)
        assert torch.all(batch["labels"][b, :pad] == -100) and not batch["images_seq_mask"][b, :pad].any()
        assert torch.equal(batch["images_seq_mask"][b, pad:], s["images_seq_mask"])
    max_tiles = max(s["images"].shape[0] for s in samples)
    assert batch["images"].shape == (3, max_tiles, 3, 64, 64)
    assert torch.equal(batch["images"][0, : samples[0]["images"].shape[0]], samples[0]["images"])
    assert not batch["images"][1].any()
    assert batch["images_spatial_crop"].tolist() == [[[3, 2], [0, 0]], [[0, 0], [0, 0]], [[1, 1], [1, 2]]]
    right = proc.collate(samples, padding="right")
    assert torch.equal(right["input_ids"][1, : lens[1]], samples[1]["input_ids"])


def test_call_is_a_batch_of_one(proc):
    batch = proc("<image> what?", [rand_image(64, 64)])
    assert batch["input_ids"].shape[0] == 1 and batch["attention_mask"].all()
    assert batch["images"].shape == (1, 2, 3, 64, 64)


# ---------------------------------------------------------------------------------------------------- errors
def test_tag_count_mismatch(proc):
    with pytest.raises(ProcessorError, match="2 <image> tag"):
        proc.process("<image><image>", [rand_image(64, 64)])
    with pytest.raises(ProcessorError, match="0 <image> tag"):
        proc.process("no tags", [rand_image(64, 64)])
    with pytest.raises(ProcessorError, match="only user turns"):
        proc.process([{"role": "user", "content": "x"}, {"role": "assistant", "content": "<image>"}], [rand_image(64, 64)])  # fmt: skip
    with pytest.raises(ProcessorError, match="unknown role"):
        proc.process([{"role": "robot", "content": "x"}])
    with pytest.raises(ProcessorError, match="system message may only come first"):
        proc.process([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}])


def test_bad_images(proc, tmp_path):
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(ImageLoadError, match="cannot read image"):
        proc.process("<image>", [tmp_path / "junk.png"])
    with pytest.raises(ImageLoadError, match="cannot read image"):
        proc.process("<image>", [tmp_path / "missing.png"])
    rand_image(200, 200).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="truncated|cannot read"):
        proc.process("<image>", [tmp_path / "cut.jpg"])
    with pytest.raises(ImageLoadError, match="no pixels"):
        proc.process("<image>", [Image.new("RGB", (0, 10))])
    with pytest.raises(ImageLoadError, match="uint8"):
        proc.process("<image>", [np.zeros((4, 4), np.float32)])
    with pytest.raises(ImageLoadError, match="not an image"):
        proc.process("<image>", [42])
    with pytest.raises(ImageLoadError, match="cannot be fitted"):
        proc.process("<image>", [Image.new("RGB", (3000, 1))])  # resizes to zero rows


def test_prompt_too_long(tok):
    proc = DeepseekVL2Processor(tok, ProcessorConfig.preset("tiny", max_length=60))
    proc.process("<image>", [rand_image(64, 64)])  # 41 image positions + a few: fits
    with pytest.raises(PromptTooLongError, match="longer than the context of 60"):
        proc.process("<image>", [rand_image(150, 90)])


# ---------------------------------------------------------------------------------------------------- tokenizer kinds
def test_built_and_reloaded_tokenizers_give_identical_inputs(tok, tmp_path):
    tok.save(tmp_path)
    reloaded = load_tokenizer(tmp_path)
    conv = [{"role": "user", "content": "<image>\nLocate <|ref|>the cube<|/ref|>."},
            {"role": "assistant", "content": "<|ref|>the cube<|/ref|><|det|>[[1, 2, 300, 400]]<|/det|>"}]  # fmt: skip
    image = rand_image(120, 70)
    a = DeepseekVL2Processor(tok, TINY).process(conv, [image], system="sys")
    b = DeepseekVL2Processor(reloaded, TINY).process(conv, [image], system="sys")
    for key in ("input_ids", "labels", "images_seq_mask", "images", "images_spatial_crop"):
        assert torch.equal(a[key], b[key]), key
