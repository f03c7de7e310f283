"""Image decoding (modes, EXIF, broken files), DetectionDataset, TiledDataset, collate."""

import importlib.util
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from densedet.data import (DatasetError, DetectionData, DetectionDataset, ImageRecord,
                           RandomHorizontalFlip, ResizeShortestEdge, Compose, TiledDataset,
                           collate, image_size, load_image, load_voc)
from densedet.data.transforms import crop_target, tile_starts

DEEPFOREST_DATA = os.path.join(os.path.dirname(importlib.util.find_spec("deepforest").origin),
                               "data")


# ---- load_image -----------------------------------------------------------------------------

def save(tmp_path, image, name, **kwargs):
    path = str(tmp_path / name)
    image.save(path, **kwargs)
    return path


def test_grayscale_becomes_three_equal_channels(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = load_image(save(tmp_path, Image.fromarray(gray), "g.png"))
    assert out.dtype == torch.uint8 and tuple(out.shape) == (3, 3, 4)
    for channel in out:
        assert channel.numpy().tolist() == gray.tolist()


def test_rgba_alpha_is_dropped(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 10, 20, 30, 0
    out = load_image(save(tmp_path, Image.fromarray(rgba), "a.png"))
    assert tuple(out.shape) == (3, 2, 2) and out[:, 0, 0].tolist() == [10, 20, 30]


def test_palette_images_with_and_without_transparency(tmp_path):
    palette = Image.new("P", (3, 2))
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette.putpixel((1, 0), 1)
    out = load_image(save(tmp_path, palette, "p.png"))
    assert out[:, 0, 1].tolist() == [200, 100, 50] and out[:, 0, 0].tolist() == [0, 0, 0]
    out = load_image(save(tmp_path, palette, "pt.png", transparency=0))
    assert out[:, 0, 1].tolist() == [200, 100, 50] and tuple(out.shape) == (3, 2, 3)


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100, 32768, 65535]], dtype=np.uint16)
    path = save(tmp_path, Image.fromarray(values), "16.png")
    assert Image.open(path).mode.startswith("I")
    out = load_image(path)
    assert out[0].tolist() == [[0, 100, 128, 255]]  # 32768 * 255 / 65535 = 127.5019
    assert torch.equal(out[0], out[2])


def test_exif_rotation_is_applied(tmp_path):
    # 40 wide, 20 high, left half red. Orientation 6 = display rotated 90 degrees clockwise,
    # which brings the left half to the top.
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save(tmp_path, Image.fromarray(pixels), "rot.png", exif=exif)
    out = load_image(path)
    assert tuple(out.shape) == (3, 40, 20)
    assert (out[0, :20] == 255).all() and (out[0, 20:] == 0).all()
    assert image_size(path) == (40, 20)


def test_missing_truncated_and_non_image_files(tmp_path):
    with pytest.raises(DatasetError, match=r"nope\.png: image file not found"):
        load_image(str(tmp_path / "nope.png"))
    good = save(tmp_path, Image.fromarray(np.random.default_rng(0).integers(
        0, 255, (64, 64, 3), dtype=np.uint8)), "good.png")
    data = open(good, "rb").read()
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"cut\.png: cannot decode image"):
        load_image(str(truncated))
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(DatasetError, match=r"notes\.png: cannot decode image"):
        load_image(str(text))
    assert image_size(str(text)) is None and image_size(str(tmp_path / "nope.png")) is None


# ---- DetectionDataset -----------------------------------------------------------------------

def test_dataset_item_on_a_real_photo():
    data = load_voc(os.path.join(DEEPFOREST_DATA, "SOAP_061.xml"))
    dataset = DetectionDataset(data)
    image, target = dataset[0]
    assert image.dtype == torch.float32 and tuple(image.shape) == (3, 400, 400)
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert torch.equal(image, load_image(data.records[0].file_name).float() / 255)
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    assert target["iscrowd"].dtype == torch.bool and target["difficult"].dtype == torch.bool
    assert torch.equal(target["boxes"], torch.from_numpy(data.records[0].boxes))
    assert target["image_id"] == 1 and target["orig_size"] == (400, 400)


def test_dataset_transforms_and_cache():
    data = load_voc(os.path.join(DEEPFOREST_DATA, "OSBS_029.xml"))
    plain = DetectionDataset(data)
    dataset = DetectionDataset(data, Compose([ResizeShortestEdge((200,), 1000),
                                              RandomHorizontalFlip(1.0)]), cache_images=True)
    image, target = dataset[0]
    assert tuple(image.shape) == (3, 200, 200)
    boxes = plain[0][1]["boxes"] / 2
    assert torch.allclose(target["boxes"], torch.stack(
        [200 - boxes[:, 2], boxes[:, 1], 200 - boxes[:, 0], boxes[:, 3]], 1))
    cached = dataset._cache[0]
    assert cached.dtype == torch.uint8 and dataset.load_uint8(0) is cached
    assert not plain._cache
    plain.preload()
    assert set(plain._cache) == {0}


def test_size_mismatch_is_an_error_and_unknown_size_is_clipped(tmp_path):
    path = save(tmp_path, Image.new("RGB", (50, 30)), "s.png")
    wrong = ImageRecord(path, 5, 40, 50, boxes=[[0, 0, 10, 10]], labels=[0])
    with pytest.raises(DatasetError, match=r"s\.png: image id 5: annotation says 50x40 .* "
                                           r"decodes to 50x30"):
        DetectionDataset(DetectionData([wrong], ["a"], None, "t"))[0]
    unknown = ImageRecord(path, 6, None, None, boxes=[[-5, 2, 60, 20], [55, 0, 70, 10]],
                          labels=[0, 1])
    _, target = DetectionDataset(DetectionData([unknown], ["a", "b"], None, "t"))[0]
    assert target["boxes"].tolist() == [[0, 2, 50, 20]] and target["labels"].tolist() == [0]
    assert target["orig_size"] == (30, 50)


def test_missing_image_raises_when_loaded(tmp_path):
    record = ImageRecord(str(tmp_path / "gone.jpg"), 1, 10, 10, boxes=[], labels=[])
    dataset = DetectionDataset(DetectionData([record], ["a"], None, "t"))
    with pytest.raises(DatasetError, match=r"gone\.jpg: image file not found"):
        dataset[0]


def test_collate_and_dataloader():
    data = load_voc(DEEPFOREST_DATA)
    data.records = [r for r in data.records if r.width == 400]
    loader = DataLoader(DetectionDataset(data), batch_size=2, collate_fn=collate)
    images, targets = next(iter(loader))
    assert isinstance(images, list) and len(images) == 2 and len(targets) == 2
    assert [len(t["boxes"]) for t in targets] == [61, 37]


# ---- TiledDataset ---------------------------------------------------------------------------

def test_tiled_dataset_on_a_large_photo():
    data = load_voc(os.path.join(DEEPFOREST_DATA, "2019_YELL_2_541000_4977000_image_crop.xml"))
    record = data.records[0]
    assert (record.height, record.width) == (1035, 1249)
    tiles = TiledDataset(data, tile_size=400, overlap=50, cache_images=True)
    assert len(tiles) == len(tile_starts(1035, 400, 50)) * len(tile_starts(1249, 400, 50)) == 12
    full_image, full_target = DetectionDataset(data)[0]
    seen = 0
    for index in range(len(tiles)):
        image, target = tiles[index]
        x0, y0 = target["tile_origin"]
        h, w = image.shape[-2:]
        assert (h, w) == (400, 400) and target["orig_size"] == (400, 400)
        assert torch.equal(image, full_image[:, y0:y0 + h, x0:x0 + w])
        expected = crop_target(full_target, x0, y0, x0 + w, y0 + h)
        assert torch.equal(target["boxes"], expected["boxes"])
        assert (target["boxes"] >= 0).all() and (target["boxes"] <= 400).all()
        seen += len(target["boxes"])
    assert seen >= len(record)  # overlapping tiles see border trees twice
    nonempty = TiledDataset(data, 400, 50, skip_empty=True)
    assert 0 < len(nonempty) <= len(tiles)
    assert all(len(nonempty[i][1]["boxes"]) > 0 for i in range(len(nonempty)))
