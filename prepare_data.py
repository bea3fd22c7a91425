"""
Build picoVLM datasets: one on-disk format for every source.

A dataset directory holds {train,val,test}.jsonl plus an images/ folder. Each line is

    {"images": ["images/x.png"], "messages": [{"role": "user", "content": "..."},
     {"role": "assistant", "content": "..."}], "type": "color"}

Image paths are relative to the jsonl's directory and belong to the first user turn.

    python prepare_data.py                   # synthetic shapes/text VQA -> data/synthetic
    python prepare_data.py coco --captions captions_train2017.json --images train2017 --out data/coco
    python prepare_data.py llava --json chat.json --images DIR --out data/llava
    python prepare_data.py folder --images DIR --out data/folder
    python prepare_data.py hf --dataset HuggingFaceM4/the_cauldron --subset vqav2 --out data/vqav2

Training code only needs load_records(jsonl_path).
"""

import argparse
import functools
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import random
import re
import sys
from collections import Counter
from contextlib import contextmanager, nullcontext
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

DESCRIBE = "Describe the image."


# ----------------------------------------------------------------------------- I/O helpers

@contextmanager
def atomic_open(path, mode="w"):
    """Write to <path>.tmp and rename over <path> only on success, so a crash or error
    never leaves a half-written file and never clobbers the previous version."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_records(jsonl_path):
    """Read a dataset jsonl; image paths come back absolute so callers can open them from any cwd."""
    root = Path(jsonl_path).resolve().parent
    records = []
    with open(jsonl_path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                record["images"] = [str(root / p) for p in record["images"]]
                records.append(record)
    return records


# ----------------------------------------------------------------------------- synthetic data

COLORS = {  # hues far apart so that 64px images and small models can tell them apart
    "red": (215, 35, 35), "green": (30, 160, 60), "blue": (35, 75, 215),
    "yellow": (240, 200, 20), "purple": (135, 55, 185), "orange": (245, 125, 15),
}
SHAPES = ["circle", "square", "triangle", "cross"]
BACKGROUNDS = {"white": 250, "light gray": 212}  # grey levels, jittered a little per image
TEXT_COLORS = [(25, 25, 25)] + [COLORS[c] for c in ("red", "green", "blue", "purple")]  # yellow is too faint for text
WORDS = ["CAT", "DOG", "SUN", "CAR", "BUS", "HAT", "PEN", "CUP", "BOX", "KEY", "MAP", "EGG", "BED",
         "FISH", "BIRD", "TREE", "BOOK", "STAR", "MOON", "CAKE", "BALL", "DOOR", "SHIP", "LAMP", "FROG"]
TYPES = ["color", "shape", "count", "position", "size", "text", "caption"]
SUPERSAMPLE = 4  # draw 4x larger, then box-downsample: cheap anti-aliasing
MARGIN = 0.03  # keep shapes this far (fraction of the image) from the border
SPLIT_OFFSETS = {"train": 0, "val": 10**8, "test": 2 * 10**8}  # disjoint sample-index ranges, far beyond any size


@functools.lru_cache(maxsize=None)
def _font():
    try:
        return ImageFont.load_default(size=80)  # scalable font, Pillow >= 10.1 with FreeType
    except TypeError:
        return ImageFont.load_default()  # old Pillow: small bitmap font, still fine once scaled up


@functools.lru_cache(maxsize=None)
def _word_mask(word):
    """Tight grayscale mask of the word; rescaled per sample, so every font gives the same layout."""
    x0, y0, x1, y1 = _font().getbbox(word)
    mask = Image.new("L", (x1 - x0, y1 - y0))
    ImageDraw.Draw(mask).text((-x0, -y0), word, fill=255, font=_font())
    return mask


def _article(word):
    return "an" if word[0] in "aeiou" else "a"


class _Canvas:
    """Draws in normalised [0, 1] coordinates so layouts don't depend on image_size."""

    def __init__(self, size, rng):
        self.bg_name = rng.choice(list(BACKGROUNDS))
        bg = tuple(BACKGROUNDS[self.bg_name] + rng.randint(-5, 5) for _ in range(3))
        self.px = size * SUPERSAMPLE
        self.img = Image.new("RGB", (self.px, self.px), bg)
        self.draw = ImageDraw.Draw(self.img)

    def shape(self, kind, color, cx, cy, r):
        """Every shape fits inside the circle (cx, cy, r), which is what placement reasons about."""
        x, y, r, fill = cx * self.px, cy * self.px, r * self.px, COLORS[color]
        if kind == "circle":
            self.draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif kind == "square":
            h = 0.85 * r
            self.draw.rectangle((x - h, y - h, x + h, y + h), fill=fill)
        elif kind == "triangle":
            angles = (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
            self.draw.polygon([(x + r * math.cos(a), y + r * math.sin(a)) for a in angles], fill=fill)
        elif kind == "cross":
            w = 0.32 * r
            self.draw.rectangle((x - r, y - w, x + r, y + w), fill=fill)
            self.draw.rectangle((x - w, y - r, x + w, y + r), fill=fill)

    def text(self, word, fill, rng):
        mask = _word_mask(word)
        w = rng.uniform(0.6, 0.85) * self.px
        h = min(w * mask.height / mask.width, 0.45 * self.px)
        w = h * mask.width / mask.height
        x = rng.uniform(0.05 * self.px, 0.95 * self.px - w)
        y = rng.uniform(0.05 * self.px, 0.95 * self.px - h)
        self.draw.bitmap((round(x), round(y)), mask.resize((round(w), round(h)), Image.Resampling.BILINEAR), fill=fill)

    def finish(self):
        return self.img.reduce(SUPERSAMPLE)


def _place_one(rng, r):
    return rng.uniform(r + MARGIN, 1 - r - MARGIN), rng.uniform(r + MARGIN, 1 - r - MARGIN), r


def _place_two(rng, r_low, r_high, vertical):
    """Centres for two shapes, the first in the left (top) half and the second in the other
    half: each stays inside its own half, so they never overlap and left/right is unambiguous."""
    def place(r, low):
        along = rng.uniform(r + MARGIN, 0.5 - r - MARGIN) if low else rng.uniform(0.5 + r + MARGIN, 1 - r - MARGIN)
        across = rng.uniform(r + MARGIN, 1 - r - MARGIN)
        return (across, along) if vertical else (along, across)
    return place(r_low, True), place(r_high, False)


def _q_color(rng, canvas):
    color = rng.choice(list(COLORS))
    canvas.shape(rng.choice(SHAPES), color, *_place_one(rng, rng.uniform(0.18, 0.3)))
    return "What color is the shape?", color


def _q_shape(rng, canvas):
    kind = rng.choice(SHAPES)
    canvas.shape(kind, rng.choice(list(COLORS)), *_place_one(rng, rng.uniform(0.18, 0.3)))
    return "What shape is this?", kind


def _q_count(rng, canvas):
    # one shape per cell of a 3x3 grid (jittered inside its cell) guarantees no overlap
    n, kind = rng.randint(1, 5), rng.choice(SHAPES)
    for cell in rng.sample(range(9), n):
        r = rng.uniform(0.08, 0.12)
        jitter = 1 / 6 - r - 0.01
        cx = (cell % 3 + 0.5) / 3 + rng.uniform(-jitter, jitter)
        cy = (cell // 3 + 0.5) / 3 + rng.uniform(-jitter, jitter)
        canvas.shape(kind, rng.choice(list(COLORS)), cx, cy, r)
    return "How many shapes are there?", str(n)


def _q_position(rng, canvas):
    a, b = rng.sample(list(COLORS), 2)
    vertical, a_first = rng.random() < 0.5, rng.random() < 0.5
    low, high = (a, b) if a_first else (b, a)  # low: the left (top) shape
    r = {a: rng.uniform(0.1, 0.18), b: rng.uniform(0.1, 0.18)}
    for color, (cx, cy) in zip((low, high), _place_two(rng, r[low], r[high], vertical)):
        canvas.shape(rng.choice(SHAPES), color, cx, cy, r[color])
    if vertical:
        return f"Is the {a} shape above or below the {b} shape?", "above" if a_first else "below"
    return f"Is the {a} shape left or right of the {b} shape?", "left" if a_first else "right"


def _q_size(rng, canvas):
    a, b = rng.sample(list(COLORS), 2)  # a is the bigger one
    big = rng.uniform(0.16, 0.22)
    r = {a: big, b: big * rng.uniform(0.4, 0.6)}  # at most 60% of the radius: clearly smaller
    kind = rng.choice(SHAPES)
    low, high = (a, b) if rng.random() < 0.5 else (b, a)
    for color, (cx, cy) in zip((low, high), _place_two(rng, r[low], r[high], rng.random() < 0.5)):
        canvas.shape(kind, color, cx, cy, r[color])
    first, second = (a, b) if rng.random() < 0.5 else (b, a)  # the answer must not always be the first name
    return f"Which is bigger, the {first} or the {second} shape?", a


def _q_text(rng, canvas):
    word = rng.choice(WORDS)
    canvas.text(word, rng.choice(TEXT_COLORS), rng)
    return "What word is written in the image?", word.lower()


def _q_caption(rng, canvas):
    if rng.random() < 0.5:
        kind, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        canvas.shape(kind, color, *_place_one(rng, rng.uniform(0.18, 0.3)))
        things = f"{_article(color)} {color} {kind}"
    else:  # two shapes side by side, described left to right
        shapes = [(rng.choice(SHAPES), c, rng.uniform(0.1, 0.2)) for c in rng.sample(list(COLORS), 2)]
        for (kind, color, r), (cx, cy) in zip(shapes, _place_two(rng, shapes[0][2], shapes[1][2], False)):
            canvas.shape(kind, color, cx, cy, r)
        things = " and ".join(f"{_article(color)} {color} {kind}" for kind, color, _ in shapes)
    background = f"{_article(canvas.bg_name)} {canvas.bg_name} background"
    return DESCRIBE, f"{things[0].upper()}{things[1:]} on {background}."


GENERATORS = {"color": _q_color, "shape": _q_shape, "count": _q_count, "position": _q_position,
              "size": _q_size, "text": _q_text, "caption": _q_caption}


def make_sample(index, seed=0, image_size=64):
    """Sample number `index` -> (PIL image, question, answer, type). Depends only on (index, seed),
    so the same sample comes out whatever the split sizes or the number of workers."""
    # a str seed is hashed the same way on every run and keeps (seed, index) pairs apart, which seed + index wouldn't
    rng = random.Random(f"{seed}:{index}")
    qtype = TYPES[index % len(TYPES)]  # round-robin: exactly uniform mix, every type in tiny builds
    canvas = _Canvas(image_size, rng)
    question, answer = GENERATORS[qtype](rng, canvas)
    return canvas.finish(), question, answer, qtype


def _synthetic_job(job):
    out_dir, split, i, seed, image_size = job
    img, question, answer, qtype = make_sample(SPLIT_OFFSETS[split] + i, seed, image_size)
    name = f"images/{split}_{i:06d}.png"
    with atomic_open(out_dir / name, "wb") as f:
        img.save(f, format="PNG")
    return {"images": [name], "messages": _qa(question, answer), "type": qtype}


def build_synthetic(out_dir="data/synthetic", n_train=20000, n_val=500, n_test=500, seed=0, image_size=64,
                    workers=None):
    """Generate the synthetic VQA dataset; returns {split: jsonl path}. Splits with 0 samples are not written."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    workers = workers or os.cpu_count() or 1
    paths = {}
    with mp.Pool(workers) if workers > 1 else nullcontext() as pool:
        for split, n in sizes.items():
            if n <= 0:
                continue
            jobs = [(out_dir, split, i, seed, image_size) for i in range(n)]
            results = pool.imap(_synthetic_job, jobs, chunksize=64) if pool else map(_synthetic_job, jobs)
            paths[split] = out_dir / f"{split}.jsonl"
            with atomic_open(paths[split]) as f:
                for record in tqdm(results, total=n, desc=f"synthetic {split}", unit="img"):
                    f.write(json.dumps(record) + "\n")
            print(f"wrote {n} records to {paths[split]}")
    return paths


# ----------------------------------------------------------------------------- converters

class UsageError(Exception):
    """Bad arguments or unusable input: reported as one `error:` line, exit status 2."""


class Skip(Exception):
    """One record is unusable; the converter counts it under `reason` and carries on."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


SCHEMA_ERRORS = (Skip, KeyError, IndexError, TypeError, ValueError, AttributeError)  # malformed entry -> skip it
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}
HF_IMAGE_COLUMNS = ["image", "images", "img", "jpg", "png"]
HF_TEXT_COLUMNS = ["text", "caption", "captions", "sentences", "answer"]


def _qa(question, answer):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def check_messages(messages):
    """Return the turns stripped of surrounding whitespace; Skip unless they alternate
    user/assistant, start with the user, end with the assistant and no answer is empty."""
    if not isinstance(messages, list) or not messages or len(messages) % 2:
        raise Skip("bad schema")
    out = []
    for i, m in enumerate(messages):
        role = ("user", "assistant")[i % 2]
        if not isinstance(m, dict) or m.get("role") != role or not isinstance(m.get("content"), str):
            raise Skip("bad schema")
        out.append({"role": role, "content": m["content"].strip()})
    if not all(m["content"] for m in out[1::2]):
        raise Skip("empty answer")
    return out


def _image_bytes(ref):
    """Encoded bytes and file extension of an image given as a path or an in-memory PIL image."""
    if isinstance(ref, Image.Image):  # decoded by datasets: re-encode, keeping JPEG as JPEG
        jpeg = ref.format == "JPEG" and ref.mode in ("RGB", "L")
        img = ref if jpeg or ref.mode in ("RGB", "RGBA", "L", "LA", "P") else ref.convert("RGB")
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=95) if jpeg else img.save(buf, format="PNG")
        return buf.getvalue(), ".jpg" if jpeg else ".png"
    if ref is None or not Path(ref).is_file():
        raise Skip("missing image")
    return Path(ref).read_bytes(), Path(ref).suffix.lower()


def store_image(ref, out_dir):
    """Check that the image decodes and copy it to <out_dir>/images/<content hash><ext>;
    returns the relative path. Hash names are unique, dedupe shared images and make re-runs
    into the same directory (e.g. another split) safe."""
    data, ext = _image_bytes(ref)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (64, 64))  # JPEG only: decode at 1/8 scale, still reads (and checks) the whole stream
            im.load()  # unlike verify(), this also catches truncated JPEGs
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise Skip("bad image") from None
    name = f"images/{hashlib.sha1(data).hexdigest()[:20]}{ext}"
    if not (out_dir / name).exists():
        with atomic_open(out_dir / name, "wb") as f:
            f.write(data)
    return name


class Summary:
    def __init__(self, path):
        self.path, self.written, self.skipped = path, 0, Counter()

    def __str__(self):
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
        skipped = f"skipped {sum(self.skipped.values())}" + (f" ({reasons})" if reasons else "")
        return f"wrote {self.written} records to {self.path}; {skipped}"


def _parsed(entries, parse, skipped):
    """Flatten parse(entry) over all entries; an entry that fails to parse is counted and dropped."""
    for entry in entries:
        try:
            records = parse(entry)
        except SCHEMA_ERRORS as e:
            skipped[getattr(e, "reason", "bad schema")] += 1
            continue
        yield from records


def write_records(out_dir, split, entries, parse, source, total=None, limit=None):
    """Shared converter loop: parse(entry) -> [(image refs, messages), ...]; writes
    <out_dir>/<split>.jsonl atomically, skipping (and counting) bad records."""
    if not re.fullmatch(r"[\w-]+", split):
        raise UsageError(f"split must be a plain name like 'train', got {split!r} (use --limit to subsample)")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    summary = Summary(out_dir / f"{split}.jsonl")
    stored = {}  # source path -> stored name: COCO has ~5 captions per image, read each file once

    def store(ref):
        if not isinstance(ref, Path):  # in-memory image: nothing to cache it by
            return store_image(ref, out_dir)
        if ref not in stored:
            stored[ref] = store_image(ref, out_dir)
        return stored[ref]

    entries = tqdm(entries, total=total, desc=f"{source} -> {summary.path.name}", unit="entry")
    with atomic_open(summary.path) as f:
        for refs, messages in _parsed(entries, parse, summary.skipped):
            try:
                messages = check_messages(messages)
                images = [store(ref) for ref in refs]
            except SCHEMA_ERRORS as e:
                summary.skipped[getattr(e, "reason", "bad schema")] += 1
                continue
            f.write(json.dumps({"images": images, "messages": messages, "type": source}, ensure_ascii=False) + "\n")
            summary.written += 1
            if limit and summary.written >= limit:
                break
    print(summary)
    return summary


def _require(path, what, is_dir=False):
    path = Path(path)
    if not (path.is_dir() if is_dir else path.is_file()):
        raise UsageError(f"{what} not found: {path}")
    return path


def _load_json(path, what):
    try:
        with open(_require(path, what), encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UsageError(f"cannot read {what} {path}: {e}") from None


def convert_coco(captions, images_dir, out_dir, split="train", limit=None):
    """COCO captions_*.json -> one "Describe the image." record per caption."""
    data = _load_json(captions, "captions file")
    images_dir = _require(images_dir, "images directory", is_dir=True)
    if not (isinstance(data, dict) and all(isinstance(data.get(k), list) for k in ("images", "annotations"))):
        raise UsageError(f"{captions} is not a COCO captions file (needs 'images' and 'annotations' lists)")
    files = {im["id"]: im["file_name"] for im in data["images"]
             if isinstance(im, dict) and {"id", "file_name"} <= im.keys()}

    def parse(ann):
        if ann["image_id"] not in files:
            raise Skip("missing image")
        return [([images_dir / files[ann["image_id"]]], _qa(DESCRIBE, ann["caption"]))]

    annotations = data["annotations"]
    return write_records(out_dir, split, annotations, parse, "coco", total=len(annotations), limit=limit)


LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def convert_llava(json_path, images_dir, out_dir, split="train", limit=None):
    """LLaVA conversation JSON -> multi-turn records; entries without "image" become text-only."""
    data = _load_json(json_path, "LLaVA json")
    images_dir = _require(images_dir, "images directory", is_dir=True)
    if not isinstance(data, list):
        raise UsageError(f"{json_path} is not a LLaVA file (expected a JSON list of conversations)")

    def parse(entry):
        image = entry.get("image")
        refs = [images_dir / p for p in (image if isinstance(image, list) else [image] if image else [])]
        # the <image> marker is dropped: images always go before the first user text
        messages = [{"role": LLAVA_ROLES[t["from"]], "content": t["value"].replace("<image>", "").strip()}
                    for t in entry["conversations"]]
        return [(refs, messages)]

    return write_records(out_dir, split, data, parse, "llava", total=len(data), limit=limit)


def convert_folder(images_dir, out_dir, split="train", prompt=DESCRIBE, limit=None):
    """Images with same-name .txt captions (a.jpg + a.txt), searched recursively."""
    images_dir = _require(images_dir, "images directory", is_dir=True)
    out_images = (Path(out_dir) / "images").resolve()
    files = sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTS
                   and out_images not in p.resolve().parents)  # don't re-import our own output

    def parse(path):
        caption = path.with_suffix(".txt")
        if not caption.is_file():
            raise Skip("missing caption")
        return [([path], _qa(prompt, caption.read_text(encoding="utf-8")))]

    return write_records(out_dir, split, files, parse, "folder", total=len(files), limit=limit)


def convert_hf_rows(rows, out_dir, split="train", image_column=None, text_column=None, prompt=DESCRIBE,
                    total=None, limit=None):
    """Convert an iterable of dict rows (a datasets.Dataset or plain dicts) offline. Two layouts:
    the_cauldron's images (list) + texts (list of {user, assistant}) as one multi-turn record, or an
    image column + a text column (one record per caption when the text is a list)."""
    def parse(row):
        if text_column is None and "texts" in row:
            messages = []
            for turn in row["texts"]:
                messages += _qa(turn["user"], turn["assistant"])
            return [(list(row[image_column or "images"] or []), messages)]
        image = row[image_column or next((c for c in HF_IMAGE_COLUMNS if c in row), None)]  # KeyError: bad schema
        text = row[text_column or next((c for c in HF_TEXT_COLUMNS if c in row), None)]
        refs = list(image) if isinstance(image, (list, tuple)) else [image]
        return [(refs, _qa(prompt, t)) for t in (text if isinstance(text, list) else [text])]

    return write_records(out_dir, split, rows, parse, "hf", total=total, limit=limit)


def convert_hf(dataset, out_dir, subset=None, split="train", image_column=None, text_column=None,
               prompt=DESCRIBE, streaming=False, limit=None):
    """Load a Hugging Face dataset with `datasets` and convert it with convert_hf_rows."""
    try:
        import datasets
    except ImportError:
        raise UsageError("the hf source needs the datasets package: pip install datasets") from None
    try:
        ds = datasets.load_dataset(dataset, subset, split=split, streaming=streaming)
    except Exception as e:  # datasets raises many types (not found, network, bad config): all are input errors here
        raise UsageError(f"cannot load {dataset}: {e}") from None
    for col in (image_column, text_column):
        if col and ds.column_names and col not in ds.column_names:
            raise UsageError(f"no column {col!r} in {dataset}; columns: {', '.join(ds.column_names)}")
    return convert_hf_rows(ds, out_dir, split, image_column, text_column, prompt,
                           total=None if streaming else len(ds), limit=limit)


# ----------------------------------------------------------------------------- CLI

def _parser():
    defaults = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(metavar="{synthetic,coco,llava,folder,hf}", help="data source (default: synthetic)")

    s = sub.add_parser("synthetic", formatter_class=defaults, help="procedural shapes/text VQA (the default)",
                       description="Synthetic VQA + captions: color, shape, count, position, size, text, caption.")
    s.add_argument("--out", default="data/synthetic", help="output directory")
    s.add_argument("--train", type=int, default=20000, help="number of train samples")
    s.add_argument("--val", type=int, default=500, help="number of val samples")
    s.add_argument("--test", type=int, default=500, help="number of test samples")
    s.add_argument("--seed", type=int, default=0, help="same seed -> identical dataset")
    s.add_argument("--image_size", type=int, default=64, help="image side in pixels")
    s.add_argument("--workers", type=int, help="worker processes (default: all CPU cores)")
    s.set_defaults(run=lambda a: build_synthetic(a.out, a.train, a.val, a.test, a.seed, a.image_size, a.workers))

    def converter(name, summary, description):
        c = sub.add_parser(name, formatter_class=defaults, help=summary, description=description)
        c.add_argument("--out", required=True, help="output directory (images are copied to OUT/images)")
        c.add_argument("--split", default="train", help="output file name: OUT/SPLIT.jsonl")
        c.add_argument("--limit", type=int, help="stop after this many records")
        return c

    c = converter("coco", "COCO captions", "One 'Describe the image.' record per COCO caption.")
    c.add_argument("--captions", required=True, help="captions_*.json file")
    c.add_argument("--images", required=True, help="directory holding the images it names")
    c.set_defaults(run=lambda a: convert_coco(a.captions, a.images, a.out, a.split, a.limit))

    c = converter("llava", "LLaVA conversation json", "LLaVA json (id, image, conversations) -> chat records.")
    c.add_argument("--json", required=True, help="LLaVA json file")
    c.add_argument("--images", required=True, help="directory the 'image' paths are relative to")
    c.set_defaults(run=lambda a: convert_llava(a.json, a.images, a.out, a.split, a.limit))

    c = converter("folder", "images with same-name .txt captions", "Convert a folder of x.jpg + x.txt pairs.")
    c.add_argument("--images", required=True, help="directory to search (recursively)")
    c.add_argument("--prompt", default=DESCRIBE, help="user turn for each caption")
    c.set_defaults(run=lambda a: convert_folder(a.images, a.out, a.split, a.prompt, a.limit))

    c = converter("hf", "a Hugging Face dataset (needs `pip install datasets`)",
                  "Convert a Hugging Face dataset: the_cauldron layout (images + texts) or an image and a text "
                  "column. --split is both the dataset split and the output name.")
    c.add_argument("--dataset", required=True, help="dataset name, e.g. HuggingFaceM4/the_cauldron")
    c.add_argument("--subset", help="dataset config, e.g. vqav2")
    c.add_argument("--image_column", help="default: first of " + ", ".join(HF_IMAGE_COLUMNS))
    c.add_argument("--text_column", help="default: the_cauldron 'texts', else first of " + ", ".join(HF_TEXT_COLUMNS))
    c.add_argument("--prompt", default=DESCRIBE, help="user turn for image + text rows")
    c.add_argument("--streaming", action="store_true", help="stream rather than download it all (use with --limit)")
    c.set_defaults(run=lambda a: convert_hf(a.dataset, a.out, a.subset, a.split, a.image_column, a.text_column,
                                            a.prompt, a.streaming, a.limit))
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in ("synthetic", "coco", "llava", "folder", "hf", "-h", "--help"):
        argv = ["synthetic", *argv]  # bare `python prepare_data.py [--train N ...]` builds the synthetic set
    args = _parser().parse_args(argv)
    try:
        args.run(args)
    except UsageError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. unwritable --out or a full disk: say so without a traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
