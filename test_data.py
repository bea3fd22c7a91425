"""Tests for prepare_data.py: synthetic generation, converters, CLI errors, atomic writes."""

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data as D
import prepare_data as pd
import synthetic as S

SCRIPT = Path(__file__).with_name("prepare_data.py")


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def digest(path):
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def save_png(path, color=(200, 30, 30), size=(16, 12)):
    Image.new("RGB", size, color).save(path)
    return path


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=cwd)


def main(capsys, *args):
    """prepare_data.py's main in this process (no interpreter start) -> CompletedProcess."""
    returncode = pd.main(list(map(str, args)))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, returncode, out, err)


def start(*args):
    """prepare_data.py in its own process group, as a shell runs it: a Ctrl-C reaches all its processes."""
    return subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(condition, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None and time.monotonic() < deadline, "the process ended (or hung) before it was stopped"
        time.sleep(0.01)


def assert_interrupted(proc):
    """Exit status 130 and, besides the progress bars, one line that says so: no traceback from any process."""
    _, err = proc.communicate(timeout=60)
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip() and not re.search(r"\d+%\|", line)]
    assert proc.returncode == 130 and lines == ["prepare_data.py: interrupted"], err


def pngs_since(root, t):
    return sum(p.stat().st_mtime > t for p in Path(root).rglob("*.png"))


def tree_digest(root):
    return {str(p.relative_to(root)): digest(p) for p in sorted(Path(root).rglob("*")) if p.is_file()}


def assert_error_line(result, text):
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and text in lines[0], result.stderr


def assert_valid_dataset(jsonl):
    records = D.load_records(jsonl)
    for r in records:
        assert set(r) == {"images", "messages", "type"}
        assert all(Path(p).is_absolute() and Path(p).is_file() for p in r["images"])
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"] * (len(r["messages"]) // 2)
        assert all(m["content"] for m in r["messages"][1::2])
    assert not list(Path(jsonl).parent.rglob("*tmp*"))
    return records


# ----------------------------------------------------------------------------- synthetic

def test_make_sample_deterministic_and_seeded():
    for i in range(14):
        a, b = S.make_sample(i, seed=3), S.make_sample(i, seed=3)
        assert a[0].tobytes() == b[0].tobytes() and a[1:] == b[1:]
    assert any(S.make_sample(i, seed=3)[0].tobytes() != S.make_sample(i, seed=4)[0].tobytes() for i in range(7))


def test_make_sample_answers():
    allowed = {"color": set(S.COLORS), "shape": set(S.SHAPES), "count": {"1", "2", "3", "4", "5"},
               "position": {"left", "right", "above", "below"}, "text": {w.lower() for w in S.WORDS}}
    seen = set()
    for i in range(140):
        img, question, answer, qtype = S.make_sample(i, seed=0, image_size=48)
        seen.add(qtype)
        assert img.size == (48, 48) and img.mode == "RGB"
        assert question and answer and answer == answer.strip()
        if qtype == "caption":
            assert answer[0].isupper() and answer.endswith(" background.")
        else:
            assert answer == answer.lower() and not answer.endswith(".")
        if qtype == "size":  # the answer is one of the two colours named in the question
            assert answer in S.COLORS and f"the {answer} " in question
        else:
            assert qtype == "caption" or answer in allowed[qtype]
    assert seen == set(S.TYPES)


def named_colors(text):
    return re.findall(rf"\b({'|'.join(S.COLORS)})\b", text)


def span(shape, vertical):
    c = shape.cy if vertical else shape.cx
    return c - shape.r, c + shape.r


def test_answers_agree_with_the_drawn_scene():
    """Every question type's answer, checked against what the canvas says it drew."""
    article = {w: "an" if w[0] in "aeiou" else "a" for w in [*S.COLORS, *S.BACKGROUNDS]}
    for i in range(7 * 60):
        canvas, question, answer, qtype = S.make_scene(i, seed=2)
        shapes, by_color = canvas.shapes, {s.color: s for s in canvas.shapes}
        assert all(s.r <= c <= 1 - s.r for s in shapes for c in (s.cx, s.cy))
        assert bool(canvas.words) == (qtype == "text")
        if qtype in ("color", "shape"):
            (shape,) = shapes
            assert answer == (shape.color if qtype == "color" else shape.kind)
        elif qtype == "count":
            assert len(shapes) == int(answer) and len({s.kind for s in shapes}) == 1
        elif qtype == "position":
            a, b = (by_color[c] for c in named_colors(question))  # the first-named shape, then the other
            vertical = "above or below" in question
            assert len(shapes) == 2 and answer in (("above", "below") if vertical else ("left", "right"))
            first, second = (a, b) if answer in ("left", "above") else (b, a)  # first: the left (top) one
            assert span(first, vertical)[1] < span(second, vertical)[0]
        elif qtype == "size":
            a, b = (by_color[c] for c in named_colors(question))
            big, small = (a, b) if answer == a.color else (b, a)
            assert len(shapes) == 2 and answer in (a.color, b.color)
            assert big.kind == small.kind and big.r > 1.5 * small.r
        elif qtype == "text":
            ((word, _, (x0, y0, x1, y1)),) = canvas.words
            assert answer == word.lower() and not shapes and 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
        else:
            ordered = sorted(shapes, key=lambda s: s.cx)
            assert all(span(p, False)[1] < span(q, False)[0] for p, q in zip(ordered, ordered[1:]))  # side by side
            things = " and ".join(f"{article[s.color]} {s.color} {s.kind}" for s in ordered)  # left to right
            background = f"{article[canvas.bg_name]} {canvas.bg_name} background"
            assert answer == f"{things[0].upper()}{things[1:]} on {background}."


def test_rendered_pixels_agree_with_the_scene_and_the_answers():
    """On rendered 64 px images: each shape's pixels are centred where the scene says, and the answer
    agrees with the pixels (dominant colour, which colour is left/above, which has more pixels)."""
    for i in range(7 * 10):
        canvas, question, answer, qtype = S.make_scene(i, seed=3)
        px = np.asarray(canvas.finish(), dtype=float)
        n = len(px)
        assert np.abs(px[0, 0] - S.BACKGROUNDS[canvas.bg_name]).max() <= 5  # a corner shows the background
        mask = {c: np.linalg.norm(px - rgb, axis=-1) < 40 for c, rgb in S.COLORS.items()}
        centre = {c: np.argwhere(m)[:, ::-1].mean(0) + 0.5 for c, m in mask.items() if m.any()}  # (x, y) in pixels
        if qtype != "count":  # where a colour can be drawn more than once
            for s in canvas.shapes:
                assert np.allclose(centre[s.color], (s.cx * n, s.cy * n), atol=1), (i, s)
        if qtype == "color":
            assert max(mask, key=lambda c: mask[c].sum()) == answer
        elif qtype == "position":
            a, b = named_colors(question)
            axis = 1 if answer in ("above", "below") else 0
            assert (centre[a][axis] < centre[b][axis]) == (answer in ("left", "above"))
        elif qtype == "size":
            (other,) = set(named_colors(question)) - {answer}
            assert mask[answer].sum() > 2 * mask[other].sum()
        elif qtype == "text":
            ((_, fill, box),) = canvas.words
            ink = np.argwhere(np.linalg.norm(px - fill, axis=-1) < 40)[:, ::-1]  # (x, y) of the word's pixels
            assert len(ink) > 20 and (ink >= np.array(box[:2]) * n).all() and (ink + 1 <= np.array(box[2:]) * n).all()
        elif qtype == "caption":
            assert sorted(named_colors(answer), key=lambda c: centre[c][0]) == named_colors(answer)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    S.build_synthetic(out, n_train=60, n_val=14, n_test=14, seed=1, image_size=32, workers=1)
    return out


def test_build_synthetic(synth):
    splits = {s: assert_valid_dataset(synth / f"{s}.jsonl") for s in ("train", "val", "test")}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [60, 14, 14]
    assert {r["type"] for r in splits["train"]} == set(S.TYPES)
    for r in splits["train"]:
        assert len(r["images"]) == 1 and len(r["messages"]) == 2
        assert Image.open(r["images"][0]).size == (32, 32)
    # disjoint: no shared files and no identical images across splits
    hashes = {s: {digest(r["images"][0]) for r in recs} for s, recs in splits.items()}
    assert not (hashes["train"] & hashes["val"] or hashes["train"] & hashes["test"] or hashes["val"] & hashes["test"])
    paths = [r["images"][0] for recs in splits.values() for r in recs]
    assert len(set(paths)) == len(paths)


def test_build_synthetic_reproducible_across_workers_and_sizes(synth, tmp_path):
    # other worker count and other train size: the same seed must give the same val set and train prefix
    S.build_synthetic(tmp_path, n_train=20, n_val=14, n_test=0, seed=1, image_size=32, workers=2)
    assert (tmp_path / "val.jsonl").read_bytes() == (synth / "val.jsonl").read_bytes()
    assert read_jsonl(tmp_path / "train.jsonl") == read_jsonl(synth / "train.jsonl")[:20]
    for new, old in zip(D.load_records(tmp_path / "val.jsonl"), D.load_records(synth / "val.jsonl")):
        assert digest(new["images"][0]) == digest(old["images"][0])
    assert not (tmp_path / "test.jsonl").exists()


def test_synthetic_failure_keeps_old_file(tmp_path, monkeypatch):
    (tmp_path / "train.jsonl").write_text("old\n")
    real = S.make_sample

    def flaky(index, *args):
        if index == 5:
            raise RuntimeError("boom")
        return real(index, *args)

    monkeypatch.setattr(S, "make_sample", flaky)
    with pytest.raises(RuntimeError):
        S.build_synthetic(tmp_path, n_train=10, n_val=0, n_test=0, workers=1)
    assert (tmp_path / "train.jsonl").read_text() == "old\n"
    assert not list(tmp_path.rglob("*tmp*"))


def rebuild(out, workers):
    """A seed-1 rebuild over `out` that runs for seconds, in a subprocess stopped once it has drawn 50 images."""
    t = time.time()
    proc = start("synthetic", "--out_dir", out, "--seed", 1, "--train", 20000, "--val", 0, "--test", 0,
                 "--image_size", 32, "--workers", workers)
    wait_for(lambda: pngs_since(out.parent, t) > 50, proc)
    return proc


def test_killed_rebuild_keeps_the_old_set_whole(tmp_path):
    """kill -9 in the middle of a rebuild: no old record points at a new image, and the next build
    removes what the killed one left."""
    out = tmp_path / "s"
    S.build_synthetic(out, n_train=200, n_val=0, n_test=0, seed=0, image_size=32, workers=1)
    before = tree_digest(out)
    proc = rebuild(out, workers=1)
    proc.kill()
    proc.communicate()
    assert tree_digest(out) == before
    for i, r in enumerate(D.load_records(out / "train.jsonl")):
        image, _, answer, _ = S.make_sample(i, seed=0, image_size=32)
        assert r["messages"][1]["content"] == answer and Image.open(r["images"][0]).tobytes() == image.tobytes()
    assert (tmp_path / ".s-tmp").is_dir()
    (out / ".tmp-x1y2").write_text("half a file")  # as a killed atomic write leaves it
    S.build_synthetic(out, n_train=3, n_val=0, n_test=0, seed=1, image_size=32, workers=1)
    assert os.listdir(tmp_path) == ["s"] and not list(out.rglob("*tmp*"))


def test_ctrl_c_during_a_synthetic_build(tmp_path):
    out = tmp_path / "s"
    S.build_synthetic(out, n_train=20, n_val=0, n_test=0, seed=0, image_size=32, workers=1)
    before = tree_digest(out)
    proc = rebuild(out, workers=2)
    os.killpg(proc.pid, signal.SIGINT)  # the whole process group, as a terminal's Ctrl-C: the workers too
    assert_interrupted(proc)
    assert tree_digest(out) == before and os.listdir(tmp_path) == ["s"]


# ----------------------------------------------------------------------------- converters

@pytest.fixture
def images(tmp_path):
    """A source image folder with good, shared, corrupt and truncated files."""
    src = tmp_path / "src"
    src.mkdir()
    save_png(src / "a.png", (255, 0, 0))
    save_png(src / "b.png", (0, 0, 255))
    Image.new("RGB", (64, 64), (0, 200, 0)).save(src / "c.jpg", quality=90)
    (src / "corrupt.png").write_bytes(b"definitely not an image")
    jpeg = (src / "c.jpg").read_bytes()
    (src / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    return src


def test_coco(images, tmp_path, capsys):
    names = ["a.png", "b.png", "c.jpg", "gone.png", "corrupt.png"]
    coco = {"images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
            "annotations": [
                {"image_id": 0, "caption": " A red image.\n"},
                {"image_id": 0, "caption": "Red again."},  # same image: stored once
                {"image_id": 1, "caption": "Blue."},
                {"image_id": 2, "caption": "Green jpeg."},
                {"image_id": 3, "caption": "The file is missing."},
                {"image_id": 99, "caption": "Unknown image id."},
                {"image_id": 4, "caption": "Corrupt file."},
                {"image_id": 1, "caption": "   "},
                {"image_id": 1},
                {"image_id": 1, "caption": 7},
            ]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    out = tmp_path / "out"
    summary = pd.convert_coco(tmp_path / "captions.json", images, out)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == (f"wrote 4 records to {out / 'train.jsonl'}; "
                    "skipped 6 (bad image: 1, bad schema: 2, empty answer: 1, missing image: 2)")
    assert summary.written == 4
    records = assert_valid_dataset(out / "train.jsonl")
    assert [r["messages"][1]["content"] for r in records] == ["A red image.", "Red again.", "Blue.", "Green jpeg."]
    assert all(r["type"] == "coco" and r["messages"][0]["content"] == "Describe the image." for r in records)
    assert records[0]["images"] == records[1]["images"]
    assert records[3]["images"][0].endswith(".jpg")
    assert len(list((out / "images").iterdir())) == 3
    assert digest(records[2]["images"][0]) == digest(images / "b.png")


def test_coco_unhashable_image_id(images, tmp_path, capsys):
    coco = {"images": [{"id": [0], "file_name": "a.png"}, {"id": 1, "file_name": "b.png"},
                       {"id": {}, "file_name": "c.jpg"}],
            "annotations": [{"image_id": [0], "caption": "A list id."},
                            {"image_id": 0, "caption": "Its entry was bad."}, {"image_id": 1, "caption": "Blue."}]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    pd.convert_coco(tmp_path / "captions.json", images, tmp_path / "out")
    assert capsys.readouterr().out.strip().endswith("wrote 1 records to " + str(tmp_path / "out" / "train.jsonl") +
                                                    "; skipped 2 (bad schema: 1, missing image: 1)")


def test_llava(images, tmp_path, capsys):
    def turn(who, text):
        return {"from": who, "value": text}
    data = [
        {"id": "1", "image": "a.png", "conversations": [turn("human", "<image>\nWhat colour?"), turn("gpt", "Red.")]},
        {"id": "2", "image": "b.png", "conversations": [
            turn("human", "What is this?\n<image>"), turn("gpt", "A square."),
            turn("human", "Sure?"), turn("gpt", "Yes.")]},
        {"id": "3", "conversations": [turn("human", "Hi"), turn("gpt", "Hello")]},  # text-only
        {"id": "4", "image": "gone.png", "conversations": [turn("human", "<image>\nQ"), turn("gpt", "A")]},
        {"id": "5", "image": "a.png", "conversations": [turn("human", "<image>\nQ"), turn("gpt", "")]},
        {"id": "6", "image": "a.png", "conversations": [turn("human", "<image>\nQ"), turn("bot", "A")]},
        {"id": "7", "image": "a.png", "conversations": "nope"},
        "not even a dict",
    ]
    (tmp_path / "llava.json").write_text(json.dumps(data))
    pd.convert_llava(tmp_path / "llava.json", images, tmp_path / "out", split="val")
    assert capsys.readouterr().out.strip().endswith("skipped 5 (bad schema: 3, empty answer: 1, missing image: 1)")
    records = assert_valid_dataset(tmp_path / "out" / "val.jsonl")
    assert [m["content"] for m in records[0]["messages"]] == ["What colour?", "Red."]
    assert [m["content"] for m in records[1]["messages"]] == ["What is this?", "A square.", "Sure?", "Yes."]
    assert records[2]["images"] == [] and records[2]["messages"][0] == {"role": "user", "content": "Hi"}
    assert {r["type"] for r in records} == {"llava"}


def test_folder(images, tmp_path, capsys):
    for name, text in [("a", "a red picture\n"), ("c", "a green picture"), ("corrupt", "x"),
                       ("truncated", "half a jpeg"), ("b", "")]:
        (images / f"{name}.txt").write_text(text)
    sub = images / "nested"
    sub.mkdir()
    save_png(sub / "d.png")
    (sub / "d.txt").write_text("nested")
    save_png(images / "nocaption.png")
    out = tmp_path / "out"
    pd.convert_folder(images, out)
    summary = capsys.readouterr().out.strip()
    assert summary.endswith("skipped 4 (bad image: 2, empty answer: 1, missing caption: 1)")
    records = assert_valid_dataset(out / "train.jsonl")
    assert [r["messages"][1]["content"] for r in records] == ["a red picture", "a green picture", "nested"]
    assert {r["type"] for r in records} == {"folder"}


def test_hf_rows_offline(tmp_path, capsys):
    red, blue = Image.new("RGB", (8, 8), "red"), Image.new("RGBA", (8, 8), "blue")
    cauldron = [
        {"images": [red, blue], "texts": [{"user": "Q1", "assistant": "A1", "source": "x"},
                                          {"user": "Q2", "assistant": "A2", "source": "x"}]},
        {"images": [red], "texts": [{"user": "Q", "assistant": " "}]},
        {"images": [None], "texts": [{"user": "Q", "assistant": "A"}]},
    ]
    pd.convert_hf_rows(cauldron, tmp_path / "c")
    assert capsys.readouterr().out.strip().endswith("skipped 2 (empty answer: 1, missing image: 1)")
    (record,) = assert_valid_dataset(tmp_path / "c" / "train.jsonl")
    assert len(record["images"]) == 2 and len(record["messages"]) == 4 and record["type"] == "hf"
    assert Image.open(record["images"][1]).getpixel((0, 0)) == (0, 0, 255, 255)

    captioned = [{"image": red, "caption": "a red square"}, {"image": blue, "caption": ["one", "two"]},
                 {"image": red}, {"image": None, "caption": "no image"}]
    pd.convert_hf_rows(captioned, tmp_path / "t", prompt="What is it?", limit=10)
    assert capsys.readouterr().out.strip().endswith("skipped 2 (bad schema: 1, missing image: 1)")
    records = assert_valid_dataset(tmp_path / "t" / "train.jsonl")
    assert [[m["content"] for m in r["messages"]] for r in records] == [
        ["What is it?", "a red square"], ["What is it?", "one"], ["What is it?", "two"]]


def test_hf_datasets_object(tmp_path):
    import datasets
    ds = datasets.Dataset.from_dict({"img": [Image.new("RGB", (8, 8), c) for c in ("red", "green")],
                                     "label": ["red", "green"]})
    pd.convert_hf_rows(ds, tmp_path, image_column="img", text_column="label", total=len(ds))
    records = assert_valid_dataset(tmp_path / "train.jsonl")
    assert [r["messages"][1]["content"] for r in records] == ["red", "green"]


def png_bytes(color):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def test_hf_corrupt_image_is_one_skipped_record(tmp_path, monkeypatch, capsys):
    """A dataset image that does not decode skips its record, in both layouts, through datasets.load_dataset
    on local parquet; a record skipped for its second image leaves no copy of its first."""
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    red, green, blue = ({"bytes": png_bytes(c), "path": None} for c in ("red", "green", "blue"))
    bad = {"bytes": b"not an image", "path": None}
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"),
                                  "images": datasets.List(datasets.Image()),
                                  "texts": datasets.List({"user": datasets.Value("string"),
                                                          "assistant": datasets.Value("string")})})
    texts = [[{"user": "Colour?", "assistant": c}] for c in ("red", "green", "blue")]
    ds = datasets.Dataset.from_dict({"image": [red, bad, blue], "caption": ["red", "bad", "blue"],
                                     "images": [[red], [green, bad], [blue]], "texts": texts}, features=features)
    (tmp_path / "src").mkdir()
    ds.to_parquet(tmp_path / "src" / "train.parquet")
    for out, columns in [(tmp_path / "plain", {"image_column": "image", "text_column": "caption"}),
                         (tmp_path / "cauldron", {})]:
        pd.convert_hf(str(tmp_path / "src"), out, **columns)
        assert capsys.readouterr().out.strip().endswith("wrote 2 records to " + str(out / "train.jsonl") +
                                                        "; skipped 1 (bad image: 1)")
        records = assert_valid_dataset(out / "train.jsonl")
        assert [r["messages"][1]["content"] for r in records] == ["red", "blue"]
        assert [Image.open(r["images"][0]).getpixel((0, 0)) for r in records] == [(255, 0, 0), (0, 0, 255)]
        assert sorted(os.listdir(out / "images")) == sorted(Path(r["images"][0]).name for r in records)  # no orphan
        assert all(r["images"][0].endswith(".png") for r in records)


def test_hf_image_paths(tmp_path, capsys):
    """Undecoded dataset images given by path: a local file, or a remote one (as streamed) read with fsspec."""
    import fsspec
    memory = fsspec.filesystem("memory")
    memory.pipe("/picovlm-test/red.png", png_bytes("red"))
    rows = [{"image": {"bytes": None, "path": "memory://picovlm-test/red.png"}, "caption": "remote"},
            {"image": {"bytes": None, "path": str(save_png(tmp_path / "blue.png", (0, 0, 255)))}, "caption": "local"},
            {"image": {"bytes": None, "path": "memory://picovlm-test/gone.png"}, "caption": "missing"}]
    try:
        pd.convert_hf_rows(rows, tmp_path / "out")
    finally:
        memory.rm("/picovlm-test", recursive=True)
    assert capsys.readouterr().out.strip().endswith("skipped 1 (missing image: 1)")
    records = assert_valid_dataset(tmp_path / "out" / "train.jsonl")
    assert [Image.open(r["images"][0]).getpixel((0, 0)) for r in records] == [(255, 0, 0), (0, 0, 255)]


def test_converter_failure_keeps_old_file(images, tmp_path, monkeypatch):
    coco = {"images": [{"id": 0, "file_name": "a.png"}, {"id": 1, "file_name": "b.png"}],
            "annotations": [{"image_id": 0, "caption": "x"}, {"image_id": 1, "caption": "y"}]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.jsonl").write_text("precious\n")
    real, calls = pd.read_image, []

    def fail_second(ref):
        calls.append(ref)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return real(ref)

    monkeypatch.setattr(pd, "read_image", fail_second)
    with pytest.raises(RuntimeError):
        pd.convert_coco(tmp_path / "captions.json", images, out)
    assert (out / "train.jsonl").read_text() == "precious\n"
    assert not list(out.rglob("*tmp*"))


def test_ctrl_c_during_a_conversion(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    (out / "train.jsonl").write_text("precious\n")
    noise = np.random.default_rng(0).integers(0, 256, (600, 600, 3), dtype=np.uint8)
    Image.fromarray(noise).save(src / "0.png")  # slow to decode: the conversion is still running when stopped
    for i in range(300):
        if i:
            os.link(src / "0.png", src / f"{i}.png")
        (src / f"{i}.txt").write_text("noise")
    proc = start("folder", "--images", src, "--out_dir", out)
    wait_for(lambda: pngs_since(out, 0), proc)
    os.killpg(proc.pid, signal.SIGINT)
    assert_interrupted(proc)
    assert (out / "train.jsonl").read_text() == "precious\n" and not list(out.rglob(".tmp-*"))


def test_load_records_resolves_paths(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.jsonl").write_text(
        json.dumps({"images": ["images/x.png"], "messages": [], "type": "t"}) + "\n\n")
    monkeypatch.chdir(tmp_path)
    (record,) = D.load_records("d/train.jsonl")
    assert record["images"] == [str(tmp_path / "d" / "images" / "x.png")] and record["type"] == "t"


# ----------------------------------------------------------------------------- CLI

def test_cli_help():
    for args in ([], ["coco"], ["hf"]):
        result = cli(*args, "--help")
        assert result.returncode == 0 and "usage:" in result.stdout


def test_cli_bad_inputs(tmp_path):
    assert_error_line(cli("coco", "--captions", tmp_path / "nope.json", "--images", tmp_path, "--out", tmp_path / "o"),
                      "not found")
    (tmp_path / "bad.json").write_text("{not json")
    assert_error_line(cli("llava", "--json", tmp_path / "bad.json", "--images", tmp_path, "--out", tmp_path / "o"),
                      "cannot read")
    assert_error_line(cli("folder", "--images", tmp_path / "missing", "--out", tmp_path / "o"), "not found")
    assert cli("coco", "--out", tmp_path).returncode == 2  # argparse: missing required arguments
    assert not (tmp_path / "o" / "train.jsonl").exists()


def test_cli_bad_numbers(images, tmp_path, capsys):
    small = ["--train", 3, "--val", 0, "--test", 0, "--workers", 1]  # what a bad flag after them would build
    for bad in (["--image_size", 0], ["--image_size", 15], ["--train", -5], ["--val", -1], ["--test", -1],
                ["--workers", 0], ["--workers", -2]):
        assert_error_line(main(capsys, "synthetic", "--out_dir", tmp_path / "s", *small, *bad), bad[0])
    (images / "a.txt").write_text("red")
    (images / "b.txt").write_text("blue")
    for limit in (0, -1):
        assert_error_line(main(capsys, "folder", "--images", images, "--out_dir", tmp_path / "o", "--limit", limit),
                          "--limit must be at least 1")
    assert not (tmp_path / "s").exists() and not (tmp_path / "o").exists()
    assert main(capsys, "folder", "--images", images, "--out_dir", tmp_path / "o", "--limit", 1).returncode == 0
    assert len(assert_valid_dataset(tmp_path / "o" / "train.jsonl")) == 1


def test_cli_hf_without_datasets(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` then fails as where it is not installed
    assert_error_line(main(capsys, "hf", "--dataset", "x/y", "--out_dir", tmp_path / "o"), "pip install datasets")
    assert not (tmp_path / "o").exists()


def test_cli_synthetic_default_subcommand(tmp_path):
    result = cli("--out", tmp_path, "--train", 7, "--val", 2, "--test", 0, "--workers", 1)
    assert result.returncode == 0, result.stderr
    assert f"wrote 7 records to {tmp_path / 'train.jsonl'}" in result.stdout
    assert len(assert_valid_dataset(tmp_path / "train.jsonl")) == 7


def test_converter_cleans_what_a_killed_conversion_left_and_refuses_a_busy_dir(images, tmp_path):
    """A conversion killed mid-write leaves .tmp-* files (jsonl and images): the next one removes them.
    While a conversion holds out_dir (its lock names a live process) another is refused in one line."""
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    (out / ".tmp-killed").write_text("half a jsonl")
    (out / "images" / ".tmp-half").write_bytes(b"half a png")
    pd.convert_folder(images, out)
    assert not list(out.rglob(".tmp-*")) and not (out / ".lock").exists()
    (out / ".lock").write_text(f"{os.getpid()} {__import__('socket').gethostname()}")  # a live run holds it
    with pytest.raises(pd.UserError, match="in use by another run"):
        pd.convert_folder(images, out)
