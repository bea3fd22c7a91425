"""processor.py: image loading (orientation, bit depth, huge photos), the processor's settings and
their fit to a model, chat text, and a checkpoint's own code (never run, never copied). CPU, no network."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import model as M
import processor as P
from checkpoint import UserError
from conftest import max_diff, random_image, reference_processor
from processor import Processor

EVIL = """import pathlib
pathlib.Path(__file__).with_name("RAN").write_text("the checkpoint's code ran")
from transformers import PreTrainedTokenizerFast
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def add_remote_code(path, tokenizer_class):
    """Give a checkpoint directory a tokenizer that wants its own code (evil.py writes RAN on import)."""
    (path / "evil.py").write_text(EVIL)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.update(auto_map={"AutoTokenizer": [None, "evil.EvilTokenizer"]}, tokenizer_class=tokenizer_class)
    (path / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture
def proc_dir(tmp_path, tokenizer):
    path = tmp_path / "proc"
    P.Processor(tokenizer, 32, 4).save_pretrained(path)
    return path


# ----------------------------------------------------------------------------- a checkpoint's own code

def test_checkpoint_code_is_never_run_nor_copied(proc_dir, tmp_path):
    """A tokenizer class transformers knows is loaded as that class; the auto_map and evil.py are
    not carried into the directories we write (train.py --init_from saves the processor)."""
    add_remote_code(proc_dir, "PreTrainedTokenizerFast")
    proc = P.Processor.from_pretrained(proc_dir)
    assert type(proc.tokenizer).__module__.startswith("transformers.")
    for fmt in ("picovlm", "smolvlm"):
        proc.save_pretrained(tmp_path / fmt, format=fmt)
        assert "auto_map" not in json.loads((tmp_path / fmt / "tokenizer_config.json").read_text())
        assert not any(f.endswith(".py") for f in os.listdir(tmp_path / fmt))
    add_remote_code(proc_dir, "EvilTokenizer")  # a class only its code defines: refused in one line
    with pytest.raises(UserError, match="no usable tokenizer.*custom code"):
        P.Processor.from_pretrained(proc_dir)
    assert not (proc_dir / "RAN").exists()


# ----------------------------------------------------------------------------- images

def test_load_image_applies_exif_orientation(tmp_path, tokenizer):
    """A phone photo stored sideways (EXIF orientation 6) comes out upright, as transformers'
    load_image gives it, and the processor's pixels are those of that upright image."""
    from transformers.image_utils import load_image as hf_load_image
    img = Image.new("RGB", (40, 20), "red")
    img.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    img.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    got, want = P.load_image(str(tmp_path / "phone.jpg")), hf_load_image(str(tmp_path / "phone.jpg"))
    assert got.size == want.size == (20, 40) and np.array_equal(np.asarray(got), np.asarray(want))
    assert got.getpixel((10, 5))[0] > 200 and got.getpixel((10, 35))[2] > 200  # red on top, blue below
    proc = P.Processor(tokenizer, 32, 4)
    assert torch.equal(proc.prepare_images([str(tmp_path / "phone.jpg")])[1][0], proc.prepare_images([want])[1][0])


def test_16bit_greyscale_has_a_fixed_scale(tmp_path):
    """16-bit greyscale is scaled by 65535 (and PIL's 32-bit "I", which holds 16-bit PGM data, the
    same way), not stretched by each image's own maximum: a dark image stays dark."""
    for mode, value, ext in (("I;16", 1000, "png"), ("I;16", 40000, "tiff"), ("I;16", 65535, "png"), ("I", 40000, "pgm")):
        Image.fromarray(np.full((8, 10), value, dtype=np.uint16)).save(tmp_path / f"g.{ext}")
        img = Image.open(tmp_path / f"g.{ext}")
        assert img.mode == mode
        assert P.load_image(str(tmp_path / f"g.{ext}")).getpixel((0, 0)) == (round(value / 257),) * 3, (mode, value)


def smooth_photo(w, h):
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    rgb = [128 + 100 * np.sin(6 * x + 2 * y), 128 + 100 * np.cos(5 * y - 3 * x), 128 + 90 * np.sin(4 * (x + y))]
    return Image.fromarray(np.stack(rgb, -1).astype(np.uint8))


def test_huge_jpeg_is_decoded_smaller(tmp_path, tokenizer, monkeypatch):
    """A JPEG at least 4x the processor's size each way is decoded at 1/2-1/8 scale (still at least
    twice the target), with the same tiles and nearly the same pixels as a full decode; one less
    than 4x larger decodes in full, with pixels equal to resizing the full image directly."""
    decoded = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or load(self))
    smooth_photo(2048, 1536).save(tmp_path / "huge.jpg", quality=95)
    smooth_photo(160, 120).save(tmp_path / "small.jpg", quality=95)
    for proc, size in ((P.Processor(tokenizer, 64, 4), (256, 192)),  # SigLIP: 64 x 64 -> 1/8
                       (P.Processor(tokenizer, 64, 4, splitting=True, longest_edge=128, resample="lanczos"), (512, 384))):
        decoded.clear()
        grids, pixels = proc.prepare_images([str(tmp_path / "huge.jpg")])
        assert decoded[0] == size
        full = Image.open(tmp_path / "huge.jpg").convert("RGB")
        want_grids, want = proc.prepare_images([full.resize(proc._fit(*full.size), P.RESAMPLE[proc.resample])])
        assert grids == want_grids and len(pixels) == len(want)
        diff = (torch.stack(pixels) - torch.stack(want)).abs()  # a grey level is 2/255; measured: 0.003 mean, 0.016 max
        assert diff.mean() <= 0.01 and diff.max() <= 0.05, (diff.mean(), diff.max())
    decoded.clear()
    proc = P.Processor(tokenizer, 64, 4)
    got = proc.prepare_images([str(tmp_path / "small.jpg")])[1][0]
    assert decoded[0] == (160, 120)
    full = Image.open(tmp_path / "small.jpg").convert("RGB").resize((64, 64), Image.BICUBIC)
    assert torch.equal(got, proc._to_tensor(full))


# ----------------------------------------------------------------------------- settings

@pytest.mark.parametrize("case", ["list", "resample", "image_size", "unknown", "std"])
def test_bad_processor_json_is_one_line(proc_dir, case):
    settings = json.loads((proc_dir / "processor.json").read_text())
    settings = {"list": [settings], "resample": {**settings, "resample": "nearest"},
                "image_size": {**settings, "image_size": 0}, "unknown": {**settings, "tile": 3},
                "std": {**settings, "std": [0.5, 0, 0.5]}}[case]
    (proc_dir / "processor.json").write_text(json.dumps(settings))
    with pytest.raises(UserError) as e:
        P.Processor.from_pretrained(proc_dir)
    message = str(e.value)
    assert "\n" not in message and str(proc_dir) in message
    assert {"list": "expected a JSON object", "resample": "resample is 'nearest': expected one of lanczos",
            "image_size": "image_size is 0", "unknown": "'tile'", "std": "std is [0.5, 0, 0.5]"}[case] in message


def test_check_model(tokenizer):
    """check_model() names what does not fit: tokens per image, the image token, the image size,
    a tokenizer larger than the LM's vocabulary."""
    proc = P.Processor(tokenizer, 32, 4)
    lm = dataclasses.replace(M.LM_PRESETS["tiny"], lm_vocab=len(tokenizer))
    good = M.VLMConfig(vision=M.VISION_PRESETS["tiny"], lm=lm, image_token_id=proc.image_token_id)
    proc.check_model(good)
    for change, name in (({"tokens_per_image": 9}, "tokens_per_image"), ({"image_token_id": 5}, "image_token_id"),
                         ({"image_size": 64}, "image_size")):
        bad = P.Processor(tokenizer, 32, 4)
        bad.__dict__.update(change)
        with pytest.raises(UserError, match=name):
            bad.check_model(good)
    with pytest.raises(UserError, match="vocabulary"):
        proc.check_model(dataclasses.replace(good, lm=dataclasses.replace(lm, lm_vocab=len(tokenizer) - 1)))


@pytest.mark.parametrize("text", ["Is this <image> red?", "<row_1_col_1>", "<global-img>", "caf\udce9"])
def test_chat_text_without_image_tokens_and_valid_utf8(tokenizer, text):
    """Image tokens in the text would be counted as images; undecodable bytes (an argv decoded with
    surrogateescape) would fail deep in the tokenizer. Both are one line at the chat prompt."""
    proc = P.Processor(tokenizer, 32, 4)
    with pytest.raises(UserError, match="image tokens" if "<" in text else "UTF-8"):
        proc.chat_prompt(text, 1)
    with pytest.raises(UserError):
        proc.encode_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": text}])


# ----------------------------------------------------------------------------- moved from test_model.py: SigLIP/SmolVLM parity, prompts, image modes

def test_image_preprocessing_matches_siglip(tokenizer):
    from transformers import SiglipImageProcessor
    ref = SiglipImageProcessor(size={"height": 224, "width": 224})
    proc = Processor(tokenizer, 224, 49)
    g = torch.Generator().manual_seed(0)
    for w, h in ((300, 200), (64, 97), (224, 224)):
        img = Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
        want = ref(img, return_tensors="pt").pixel_values[0]
        tiles, rows, cols = proc.tiles(img)
        assert (rows, cols) == (0, 0) and max_diff(proc._to_tensor(tiles[0]), want) <= 1e-6


def test_processor_prompt_and_labels(tokenizer):
    proc = Processor(tokenizer, 32, 4)
    assert len(tokenizer) == 49152 + len(P.IMAGE_SPECIAL_TOKENS)  # generated, not hand-written
    img = Image.new("RGB", (40, 30), "red")
    batch = proc([proc.chat_prompt("What colour?", 1), proc.chat_prompt("Hi", 0)], [[img], []])
    ids = batch["input_ids"]
    assert (ids[0] == proc.image_token_id).sum() == 4 and (ids[1] == proc.image_token_id).sum() == 0
    assert batch["attention_mask"][1, 0] == 0 and batch["pixel_values"].shape == (1, 3, 32, 32)
    text = tokenizer.decode(ids[0])
    assert "<fake_token_around_image><global-img><image><image><image><image><fake_token_around_image>What colour?" in text
    messages = [{"role": "user", "content": "What colour?"}, {"role": "assistant", "content": "red"}]
    ids, labels, pixels = proc.encode_chat(messages, [img])
    answer = tokenizer.decode(ids[labels != -100])
    assert answer.startswith("red<|im_end|>") and len(pixels) == 1
    assert (ids == proc.image_token_id).sum() == 4 and (labels[ids == proc.image_token_id] == -100).all()


@pytest.mark.parametrize("mode", ["RGBA", "P", "CMYK", "I;16", "L"])
def test_load_image_converts_modes(tmp_path, mode):
    img = Image.new("RGB", (10, 8), "blue").convert(mode)
    f = tmp_path / ("x.tiff" if mode in ("CMYK", "I;16") else "x.png")
    img.save(f)
    assert P.load_image(str(f)).mode == "RGB"


def test_load_image_errors(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="not a readable image"):
        P.load_image(str(tmp_path / "bad.png"))
    with pytest.raises(UserError, match="no such file"):
        P.load_image(str(tmp_path / "missing.png"))
    Image.new("RGB", (64, 64), "red").save(tmp_path / "ok.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:60])
    with pytest.raises(UserError):
        P.load_image(str(tmp_path / "cut.png"))


IMAGE_SETS = [[(700, 300)], [(300, 700)], [(20, 30)], [(64, 64)], [(130, 64), (50, 400)]]


@pytest.mark.parametrize("kind", ["smolvlm", "idefics3"])
@pytest.mark.parametrize("splitting", [True, False])
def test_processor_matches_transformers(tokenizer, kind, splitting):
    ours = Processor(tokenizer, 64, 4, splitting=splitting, longest_edge=256, resample="lanczos")
    ref, _ = reference_processor(kind, tokenizer, 64, splitting)
    for sizes in IMAGE_SETS:  # wide, tall, smaller than a tile, exactly a tile, two images
        images = [random_image(w, h, i) for i, (w, h) in enumerate(sizes)]
        text = "User:" + "<image>" * len(images) + "What is this?<end_of_utterance>\nAssistant:"
        want = ref(text=[text], images=[images], return_tensors="pt")
        got = ours([text], [images])
        assert got["input_ids"].tolist() == want["input_ids"].tolist()
        assert max_diff(got["pixel_values"], want["pixel_values"][0]) <= 1e-6
