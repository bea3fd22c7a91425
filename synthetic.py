"""The synthetic VQA set of the demo: 64 px images of coloured shapes and written words, with
questions about colour, shape, count, position, size and text, and captions.

Every sample depends only on (index, seed), so builds are reproducible whatever the split sizes
or the number of workers. `python prepare_data.py synthetic` writes it; train.py builds it on
first use at its default location.
"""
import functools
import io
import json
import math
import multiprocessing as mp
import os
import random
import signal
from collections import namedtuple
from contextlib import nullcontext
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from checkpoint import UserError, atomic_write, replace_dir

DESCRIBE = "Describe the image."


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
MIN_IMAGE_SIZE = 16  # below this the smallest shapes (count questions: radius 8% of the side) are under 2.5 px wide
Shape = namedtuple("Shape", "kind color cx cy r")  # what a canvas drew, in normalised coordinates
Word = namedtuple("Word", "word fill box")  # box: (x0, y0, x1, y1) of the word's bitmap, normalised


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
    """Draws in normalised [0, 1] coordinates so layouts don't depend on image_size, and lists what
    it drew (shapes, words, bg_name) so that tests can check every answer against the scene."""

    def __init__(self, size, rng):
        self.bg_name = rng.choice(list(BACKGROUNDS))
        bg = tuple(BACKGROUNDS[self.bg_name] + rng.randint(-5, 5) for _ in range(3))
        self.px = size * SUPERSAMPLE
        self.img = Image.new("RGB", (self.px, self.px), bg)
        self.draw = ImageDraw.Draw(self.img)
        self.shapes, self.words = [], []

    def shape(self, kind, color, cx, cy, r):
        """Every shape fits inside the square cx +- r, cy +- r, which is what placement reasons about."""
        self.shapes.append(Shape(kind, color, cx, cy, r))
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
        x, y, w, h = round(x), round(y), round(w), round(h)
        self.words.append(Word(word, fill, (x / self.px, y / self.px, (x + w) / self.px, (y + h) / self.px)))
        self.draw.bitmap((x, y), mask.resize((w, h), Image.Resampling.BILINEAR), fill=fill)

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


def make_scene(index, seed=0, image_size=64):
    """Sample number `index` -> (canvas, question, answer, type); the canvas lists what it drew.
    Depends only on (index, seed), so the same sample comes out whatever the split sizes or the
    number of workers."""
    # a str seed is hashed the same way on every run and keeps (seed, index) pairs apart, which seed + index wouldn't
    rng = random.Random(f"{seed}:{index}")
    qtype = TYPES[index % len(TYPES)]  # round-robin: exactly uniform mix, every type in tiny builds
    canvas = _Canvas(image_size, rng)
    question, answer = GENERATORS[qtype](rng, canvas)
    return canvas, question, answer, qtype


def make_sample(index, seed=0, image_size=64):
    """Sample number `index` -> (PIL image, question, answer, type)."""
    canvas, question, answer, qtype = make_scene(index, seed, image_size)
    return canvas.finish(), question, answer, qtype


def qa(question, answer):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _synthetic_job(job):
    out_dir, split, i, seed, image_size = job
    img, question, answer, qtype = make_sample(SPLIT_OFFSETS[split] + i, seed, image_size)
    name = f"images/{split}_{i:06d}.png"
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    (Path(out_dir) / name).write_bytes(buf.getvalue())  # a new directory: swapped in whole at the end
    return {"images": [name], "messages": qa(question, answer), "type": qtype}


DATASET_FILES = {"train.jsonl", "val.jsonl", "test.jsonl", "images"}


def build_synthetic(out_dir="data/synthetic", n_train=20000, n_val=500, n_test=500, seed=0, image_size=64,
                    workers=None):
    """Generate the synthetic VQA dataset; returns {split: jsonl path}. Splits with 0 samples are not
    written. The build fills a new directory that replaces out_dir only when complete, so an
    interrupted rebuild leaves the old set whole (never old records pointing at new images)."""
    out_dir = Path(out_dir)
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    if min(sizes.values()) < 0:
        raise UserError(f"--train, --val and --test must be >= 0, got {n_train}, {n_val} and {n_test}")
    if image_size < MIN_IMAGE_SIZE:
        raise UserError(f"--image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}")
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    # .tmp-* files are what a killed atomic write leaves: they go with the directory being replaced
    if out_dir.exists() and (not out_dir.is_dir() or
                             {n for n in os.listdir(out_dir) if not n.startswith(".tmp-")} - DATASET_FILES):
        raise UserError(f"{out_dir}: exists and is not a dataset directory (only {', '.join(sorted(DATASET_FILES))} "
                        f"may be in it); choose another --out")
    workers = workers or os.cpu_count() or 1
    paths = {split: out_dir / f"{split}.jsonl" for split, n in sizes.items() if n > 0}

    def write(tmp):
        os.makedirs(os.path.join(tmp, "images"))
        # workers ignore Ctrl-C (a terminal sends it to them too): the main process stops them, without tracebacks
        with mp.Pool(workers, signal.signal, (signal.SIGINT, signal.SIG_IGN)) if workers > 1 else nullcontext() as pool:
            for split in paths:
                jobs = [(tmp, split, i, seed, image_size) for i in range(sizes[split])]
                results = pool.imap(_synthetic_job, jobs, chunksize=64) if pool else map(_synthetic_job, jobs)
                lines = [json.dumps(r) + "\n" for r in tqdm(results, total=len(jobs), desc=f"synthetic {split}",
                                                             unit="img")]
                atomic_write(os.path.join(tmp, f"{split}.jsonl"), "".join(lines))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    replace_dir(out_dir, write)
    for split, path in paths.items():
        print(f"wrote {sizes[split]} records to {path}")
    return paths
