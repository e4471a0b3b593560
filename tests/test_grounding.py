"""Boxes and points in answers: each model's frame, conversion to the original image's pixels, drawing."""

import pytest
from PIL import Image

from polymodal.processing.grounding import RELATIVE_1000, Frame, Region, draw, parse_regions


def test_qwen2_vl_tagged_boxes_are_relative_to_1000():
    text = ("<|object_ref_start|>the cat<|object_ref_end|><|box_start|>(100,250),(500,750)<|box_end|> and "
            "<|object_ref_start|>two cups<|object_ref_end|><|box_start|>(0,0),(10,20),(990,980),(1000,1000)"
            "<|box_end|>")
    regions = parse_regions(text)
    assert [(r.kind, r.label, r.coords) for r in regions] == [
        ("box", "the cat", (100, 250, 500, 750)), ("box", "two cups", (0, 0, 10, 20)),
        ("box", "two cups", (990, 980, 1000, 1000))]
    assert all(r.frame == RELATIVE_1000 for r in regions)
    # on a 640 x 480 photo: x scales by 0.64, y by 0.48
    assert regions[0].to_image((640, 480)).coords == pytest.approx((64, 120, 320, 360))
    assert regions[0].to_image((640, 480)).frame == Frame("image", (640, 480))


def test_markers_dropped_by_decoding_and_qwen_vl_tags_still_parse():
    assert parse_regions("the cat(100,250),(500,750)")[0].coords == (100, 250, 500, 750)
    assert parse_regions("the cat(100,250),(500,750)")[0].label == "the cat"
    tagged = parse_regions("<ref>a dog</ref><box>(1,2),(3,4)</box>")
    assert [(r.label, r.coords) for r in tagged] == [("a dog", (1, 2, 3, 4))]


def test_qwen2_5_vl_json_is_in_the_resized_images_pixels():
    # Qwen2.5-VL saw the 1024 x 768 photo resized to 1036 x 784 (multiples of 28): its coordinates are those pixels
    frame = Frame("resized", (1036, 784))
    text = ('Here you go:\n```json\n[{"bbox_2d": [518, 392, 1036, 784], "label": "rocket"},'
            ' {"point_2d": [259, 196], "label": "tip"}, {"bbox_2d": [1, 2]}, "junk"]\n```')
    regions = parse_regions(text, frame)
    assert [(r.kind, r.label) for r in regions] == [("box", "rocket"), ("point", "tip")]
    box = regions[0].to_image((1024, 768))
    assert box.coords == pytest.approx((512, 384, 1024, 768))
    assert regions[1].to_image((1024, 768)).coords == pytest.approx((256, 192))
    # out-of-image coordinates are clamped to the image
    wild = Region("box", (-50, 10, 2000, 900), None, frame).to_image((1024, 768))
    assert wild.coords[0] == 0 and wild.coords[2] == 1024 and wild.coords[3] == 768


def test_malformed_answers_give_no_regions_and_never_raise():
    for text in ("", "no boxes here", "```json\n[{\"bbox_2d\": [1, 2, \"x\", 4]}\n```", "(1,2)", "{not json",
                 '[{"bbox_2d": [true, 1, 2, 3]}]', "<|box_start|>(1,2)<|box_end|>"):
        assert parse_regions(text) == [], text
    with pytest.raises(TypeError):
        parse_regions(None)
    with pytest.raises(ValueError, match="width, height"):
        Frame("resized", (0, 10))


def test_draw_marks_the_converted_boxes_on_a_copy():
    image = Image.new("RGB", (200, 100), "white")
    regions = parse_regions("<|box_start|>(250,500),(750,900)<|box_end|>")  # -> (50, 50)-(150, 90) in pixels
    out = draw(image, regions)
    assert out is not image and image.getpixel((50, 70)) == (255, 255, 255)
    assert out.getpixel((50, 70)) != (255, 255, 255)  # the left edge of the box
    assert out.getpixel((100, 70)) == (255, 255, 255)  # its inside is left as it was
    assert out.getpixel((20, 20)) == (255, 255, 255)
