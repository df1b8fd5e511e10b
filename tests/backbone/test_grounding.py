"""Grounding: parse well-formed and malformed model text, rescale, IoU, draw."""

import numpy as np
import pytest
from PIL import Image

from backbone.grounding import box_iou, draw_grounding, iou, paired_box_iou, parse_grounding, scale_boxes


def kinds(result):
    return [p.kind for p in result.problems]


def test_readme_example():
    result = parse_grounding("<|ref|>The giraffe at the back.<|/ref|><|det|>[[580, 270, 999, 900]]<|/det|>")
    assert result.ok
    assert result.objects == [("The giraffe at the back.", [(580, 270, 999, 900)])]
    assert [(label, boxes) for label, boxes in result] == result.objects and len(result) == 1


def test_several_objects_and_boxes_in_running_text():
    text = ("There are <|ref|>two cats<|/ref|><|det|>[[10,20,30,40],[50, 60, 70, 80]]<|/det|> on "
            "<|ref|>the sofa<|/ref|><|det|>[[0,0,999,999]]<|/det|>.<｜end▁of▁sentence｜>")  # fmt: skip
    result = parse_grounding(text)
    assert result.ok
    assert result.objects == [("two cats", [(10, 20, 30, 40), (50, 60, 70, 80)]), ("the sofa", [(0, 0, 999, 999)])]
    assert result.boxes == [(10, 20, 30, 40), (50, 60, 70, 80), (0, 0, 999, 999)]


def test_plain_text_has_nothing():
    result = parse_grounding("A cat sits on a sofa.")
    assert result.objects == [] and result.ok


@pytest.mark.parametrize(
    "text, kind, boxes",
    [
        ("<|ref|>a<|/ref|><|det|>[[1,2,3]]<|/det|>", "coordinate_count", []),
        ("<|ref|>a<|/ref|><|det|>[[1,2,3,4,5]]<|/det|>", "coordinate_count", []),
        ("<|ref|>a<|/ref|><|det|>[[1,2,3,9999]]<|/det|>", "out_of_range", []),
        ("<|ref|>a<|/ref|><|det|>[[-1,2,3,4]]<|/det|>", "out_of_range", []),
        ("<|ref|>a<|/ref|><|det|>[[1,2,x,4]]<|/det|>", "unparsable", []),
        ("<|ref|>a<|/ref|><|det|>nothing here<|/det|>", "unparsable", []),
        ("<|ref|>a<|/ref|><|det|><|/det|>", "empty_det", []),
        ("<|ref|>a<|/ref|><|det|>[[1,2,3,4]", "unclosed_tag", []),
        ("<|ref|>a<|det|>[[1,2,3,4]]<|/det|>", "unclosed_tag", [("", [(1, 2, 3, 4)])]),
        ("<|ref|>a<|/ref|> and no boxes", "ref_without_det", []),
        ("<|det|>[[1,2,3,4]]<|/det|>", "det_without_ref", [("", [(1, 2, 3, 4)])]),
        ("text <|/det|> more", "unmatched_close", []),
        ("<|ref|>a<|/ref|><|det|>[[30,40,10,20]]<|/det|>", "inverted", [("a", [(10, 20, 30, 40)])]),
    ],
)
def test_malformed_is_reported_not_raised(text, kind, boxes):
    result = parse_grounding(text)
    assert kind in kinds(result), kinds(result)
    assert result.objects == boxes
    assert not result.ok


def test_good_boxes_survive_next_to_bad_ones():
    text = "<|ref|>cup<|/ref|><|det|>[[1,2,3,4],[5,6,7],[10,20,30,40], [1,2,3,2000]]<|/det|>"
    result = parse_grounding(text)
    assert result.objects == [("cup", [(1, 2, 3, 4), (10, 20, 30, 40)])]
    assert kinds(result) == ["coordinate_count", "out_of_range"]
    assert result.problems[0].fragment == "[5,6,7]"


def test_fuzz_never_raises():
    rng = np.random.default_rng(0)
    alphabet = list("[],0123456789 -.x") + ["<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "a"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet, size=rng.integers(0, 40)))
        result = parse_grounding(text)
        for _, boxes in result:
            assert all(0 <= v <= 999 for box in boxes for v in box)


def test_scale_boxes():
    assert scale_boxes([(0, 0, 999, 999)], 640, 480) == [(0.0, 0.0, 640.0, 480.0)]
    assert scale_boxes([(580, 270, 999, 900)], 1000, 500, as_int=True) == [(580, 135, 1000, 450)]
    x1, y1, x2, y2 = scale_boxes([(500, 500, 600, 700)], 999 * 2, 999)[0]
    assert (x1, y1, x2, y2) == pytest.approx((1000.0, 500.0, 1200.0, 700.0))


def test_iou():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0
    matrix = box_iou([(0, 0, 10, 10), (0, 0, 5, 5)], [(0, 0, 10, 10), (0, 0, 5, 5), (100, 100, 101, 101)])
    assert matrix.shape == (2, 3)
    assert matrix[0, 1] == pytest.approx(0.25) and matrix[1, 1] == 1.0 and matrix[1, 2] == 0.0


def test_paired_iou_is_the_diagonal_of_the_pairwise_one():
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 10, size=(2, 50, 2, 2))
    a, b = (np.concatenate([c.min(1), c.max(1)], axis=-1) for c in corners)  # (50, 4) valid boxes
    a[0] = b[0] = 0  # zero-area pair
    assert np.allclose(paired_box_iou(a, b), np.diag(box_iou(a, b))) and paired_box_iou(a, b)[0] == 0.0


def test_draw(tmp_path):
    image = Image.new("RGB", (200, 100), (255, 255, 255))
    out = draw_grounding(image, "<|ref|>box<|/ref|><|det|>[[0,0,499,999]]<|/det|> <|ref|>bad<|/ref|><|det|>[[1]]<|/det|>", tmp_path / "o.png")  # fmt: skip
    assert (tmp_path / "o.png").is_file()
    pixels = np.asarray(out)
    assert (pixels != 255).any(axis=2)[50, 0]  # left edge of the box is drawn
    assert (pixels != 255).any(axis=2)[60, 99]  # right edge at x = int(499/999*200) = 99
    assert not (pixels != 255).any(axis=2)[60, 150]  # outside the box
    assert np.asarray(image).min() == 255  # the input is untouched
    reloaded = draw_grounding(tmp_path / "o.png", parse_grounding(""))
    assert np.array_equal(np.asarray(reloaded), pixels)
