"""
Build picoVLM datasets: one on-disk format for every source.

A dataset directory holds {train,val,test}.jsonl plus an images/ folder. Each line is

    {"images": ["images/x.png"], "messages": [{"role": "user", "content": "..."},
     {"role": "assistant", "content": "..."}], "type": "color"}

Image paths are relative to the jsonl's directory and belong to the first user turn.

    python prepare_data.py                   # synthetic shapes/text VQA -> data/synthetic
    python prepare_data.py coco --captions captions_train2017.json --images train2017 --out_dir data/coco
    python prepare_data.py llava --json chat.json --images DIR --out_dir data/llava
    python prepare_data.py folder --images DIR --out_dir data/folder
    python prepare_data.py hf --dataset HuggingFaceM4/the_cauldron --subset vqav2 --out_dir data/vqav2

train.py reads them with data.load_records(jsonl_path).
"""

import argparse
import hashlib
import io
import json
import os
import re
import sys
from collections import Counter
from pathlib import Path

from PIL import Image
from tqdm import tqdm

import cli
from checkpoint import UserError, atomic_open, atomic_write, claim_dir
from synthetic import DESCRIBE, build_synthetic, qa


# ----------------------------------------------------------------------------- converters

class Skip(Exception):
    """One record is unusable; the converter counts it under `reason` and carries on."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


SCHEMA_ERRORS = (Skip, KeyError, IndexError, TypeError, ValueError, AttributeError)  # malformed entry -> skip it
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}
HF_IMAGE_COLUMNS = ["image", "images", "img", "jpg", "png"]
HF_TEXT_COLUMNS = ["text", "caption", "captions", "sentences", "answer"]


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
    """Encoded bytes and file extension of an image given as a path, an undecoded `datasets` image
    ({"bytes", "path"}) or an in-memory PIL image."""
    if isinstance(ref, dict):
        if ref.get("bytes") is not None:
            return ref["bytes"], Path(ref.get("path") or "").suffix.lower()
        ref = ref.get("path")
    if isinstance(ref, Image.Image):  # decoded by datasets: re-encode, keeping JPEG as JPEG
        jpeg = ref.format == "JPEG" and ref.mode in ("RGB", "L")
        img = ref if jpeg or ref.mode in ("RGB", "RGBA", "L", "LA", "P") else ref.convert("RGB")
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=95) if jpeg else img.save(buf, format="PNG")
        return buf.getvalue(), ".jpg" if jpeg else ".png"
    if isinstance(ref, str) and "://" in ref:  # a streamed dataset's remote file (hf://...)
        import fsspec
        try:
            with fsspec.open(ref, "rb") as f:
                return f.read(), Path(ref).suffix.lower()
        except (OSError, ValueError):
            raise Skip("missing image") from None
    if ref is None or not Path(ref).is_file():
        raise Skip("missing image")
    return Path(ref).read_bytes(), Path(ref).suffix.lower()


def read_image(ref):
    """-> (encoded bytes, relative path images/<content hash><ext>) of an image that decodes; Skip
    otherwise. Hash names are unique, dedupe shared images and make re-runs into the same
    directory (e.g. another split) safe."""
    data, ext = _image_bytes(ref)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (64, 64))  # JPEG only: decode at 1/8 scale, still reads (and checks) the whole stream
            im.load()  # unlike verify(), this also catches truncated JPEGs
            if ext not in IMAGE_EXTS:  # bytes without a usable file name: named by their format
                ext = ".jpg" if im.format in ("JPEG", "MPO") else f".{im.format.lower()}"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise Skip("bad image") from None
    return data, f"images/{hashlib.sha1(data).hexdigest()[:20]}{ext}"


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


def check_output(split, limit):
    """Refuse bad output settings before anything is loaded or written."""
    if not re.fullmatch(r"[\w-]+", split):
        raise UserError(f"split must be a plain name like 'train', got {split!r} (use --limit to subsample)")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")


def write_records(out_dir, split, entries, parse, source, total=None, limit=None):
    """Shared converter loop: parse(entry) -> [(image refs, messages), ...]; writes
    <out_dir>/<split>.jsonl atomically, skipping (and counting) bad records."""
    check_output(split, limit)
    out_dir = Path(out_dir)
    lock = claim_dir(out_dir)  # one conversion at a time in out_dir; a killed one's temporary files go
    try:
        return _write_records(out_dir, split, entries, parse, source, total, limit)
    finally:
        os.unlink(lock)


def _write_records(out_dir, split, entries, parse, source, total, limit):
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    summary = Summary(out_dir / f"{split}.jsonl")
    stored = {}  # source path -> stored name: COCO has ~5 captions per image, read each file once

    def store(refs):
        """A record's image names; all its images decode before any is written: a skipped record leaves no orphan."""
        new = {i: read_image(ref) for i, ref in enumerate(refs) if not (isinstance(ref, Path) and ref in stored)}
        for i, (data, name) in new.items():
            if not (out_dir / name).exists():
                atomic_write(out_dir / name, data)
            if isinstance(refs[i], Path):
                stored[refs[i]] = name
        return [new[i][1] if i in new else stored[ref] for i, ref in enumerate(refs)]

    entries = tqdm(entries, total=total, desc=f"{source} -> {summary.path.name}", unit="entry")
    with atomic_open(summary.path) as f:
        for refs, messages in _parsed(entries, parse, summary.skipped):
            try:
                messages = check_messages(messages)
                images = store(refs)
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
        raise UserError(f"{what} not found: {path}")
    return path


def _load_json(path, what):
    try:
        with open(_require(path, what), encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"cannot read {what} {path}: {e}") from None


def convert_coco(captions, images_dir, out_dir, split="train", limit=None):
    """COCO captions_*.json -> one "Describe the image." record per caption."""
    data = _load_json(captions, "captions file")
    images_dir = _require(images_dir, "images directory", is_dir=True)
    if not (isinstance(data, dict) and all(isinstance(data.get(k), list) for k in ("images", "annotations"))):
        raise UserError(f"{captions} is not a COCO captions file (needs 'images' and 'annotations' lists)")
    # an entry with a bad id (a list is unhashable) is dropped: captions of that image then count as missing
    files = {im["id"]: im["file_name"] for im in data["images"]
             if isinstance(im, dict) and isinstance(im.get("id"), (int, str)) and "file_name" in im}

    def parse(ann):
        if ann["image_id"] not in files:
            raise Skip("missing image")
        return [([images_dir / files[ann["image_id"]]], qa(DESCRIBE, ann["caption"]))]

    annotations = data["annotations"]
    return write_records(out_dir, split, annotations, parse, "coco", total=len(annotations), limit=limit)


LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def convert_llava(json_path, images_dir, out_dir, split="train", limit=None):
    """LLaVA conversation JSON -> multi-turn records; entries without "image" become text-only."""
    data = _load_json(json_path, "LLaVA json")
    images_dir = _require(images_dir, "images directory", is_dir=True)
    if not isinstance(data, list):
        raise UserError(f"{json_path} is not a LLaVA file (expected a JSON list of conversations)")

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
        return [([path], qa(prompt, caption.read_text(encoding="utf-8")))]

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
                messages += qa(turn["user"], turn["assistant"])
            return [(list(row[image_column or "images"] or []), messages)]
        image = row[image_column or next((c for c in HF_IMAGE_COLUMNS if c in row), None)]  # KeyError: bad schema
        text = row[text_column or next((c for c in HF_TEXT_COLUMNS if c in row), None)]
        refs = list(image) if isinstance(image, (list, tuple)) else [image]
        return [(refs, qa(prompt, t)) for t in (text if isinstance(text, list) else [text])]

    return write_records(out_dir, split, rows, parse, "hf", total=total, limit=limit)


def convert_hf(dataset, out_dir, subset=None, split="train", image_column=None, text_column=None,
               prompt=DESCRIBE, streaming=False, limit=None):
    """Load a Hugging Face dataset (a hub id, or a local folder of data files) with `datasets` and
    convert it with convert_hf_rows."""
    check_output(split, limit)
    try:
        import datasets
    except ImportError:
        raise UserError("the hf source needs the datasets package: pip install datasets") from None
    try:
        ds = datasets.load_dataset(dataset, subset, split=split, streaming=streaming)
    except Exception as e:  # datasets raises many types (not found, network, bad config): all are input errors here
        raise UserError(f"cannot load {dataset}: {e}") from None
    for col in (image_column, text_column):
        if col and ds.column_names and col not in ds.column_names:
            raise UserError(f"no column {col!r} in {dataset}; columns: {', '.join(ds.column_names)}")
    total = None if streaming else len(ds)
    if ds.features:  # images stay bytes or paths: read_image decodes them, where a bad one is skipped and counted
        ds = (ds if streaming else ds.to_iterable_dataset()).decode(False)
    return convert_hf_rows(ds, out_dir, split, image_column, text_column, prompt, total=total, limit=limit)


# ----------------------------------------------------------------------------- CLI

def _parser():
    defaults = argparse.ArgumentDefaultsHelpFormatter
    p = cli.ArgumentParser(prog="prepare_data.py", description=__doc__)
    sub = p.add_subparsers(metavar="{synthetic,coco,llava,folder,hf}", help="data source (default: synthetic)")

    s = sub.add_parser("synthetic", formatter_class=defaults, help="procedural shapes/text VQA (the default)",
                       description="Synthetic VQA + captions: color, shape, count, position, size, text, caption.")
    s.add_argument("--out_dir", "--out", default="data/synthetic", help="output directory")
    s.add_argument("--train", type=int, default=20000, help="number of train samples")
    s.add_argument("--val", type=int, default=500, help="number of val samples")
    s.add_argument("--test", type=int, default=500, help="number of test samples")
    s.add_argument("--seed", type=int, default=0, help="same seed -> identical dataset")
    s.add_argument("--image_size", type=int, default=64, help="image side in pixels")
    s.add_argument("--workers", type=int, help="worker processes (default: all CPU cores)")
    s.set_defaults(run=lambda a: build_synthetic(a.out_dir, a.train, a.val, a.test, a.seed, a.image_size, a.workers))

    def converter(name, summary, description):
        c = sub.add_parser(name, formatter_class=defaults, help=summary, description=description)
        c.add_argument("--out_dir", "--out", required=True, help="output directory (images are copied to OUT_DIR/images)")
        c.add_argument("--split", default="train", help="output file name: OUT_DIR/SPLIT.jsonl")
        c.add_argument("--limit", type=int, help="stop after this many records")
        return c

    c = converter("coco", "COCO captions", "One 'Describe the image.' record per COCO caption.")
    c.add_argument("--captions", required=True, help="captions_*.json file")
    c.add_argument("--images", required=True, help="directory holding the images it names")
    c.set_defaults(run=lambda a: convert_coco(a.captions, a.images, a.out_dir, a.split, a.limit))

    c = converter("llava", "LLaVA conversation json", "LLaVA json (id, image, conversations) -> chat records.")
    c.add_argument("--json", required=True, help="LLaVA json file")
    c.add_argument("--images", required=True, help="directory the 'image' paths are relative to")
    c.set_defaults(run=lambda a: convert_llava(a.json, a.images, a.out_dir, a.split, a.limit))

    c = converter("folder", "images with same-name .txt captions", "Convert a folder of x.jpg + x.txt pairs.")
    c.add_argument("--images", required=True, help="directory to search (recursively)")
    c.add_argument("--prompt", default=DESCRIBE, help="user turn for each caption")
    c.set_defaults(run=lambda a: convert_folder(a.images, a.out_dir, a.split, a.prompt, a.limit))

    c = converter("hf", "a Hugging Face dataset (needs `pip install datasets`)",
                  "Convert a Hugging Face dataset: the_cauldron layout (images + texts) or an image and a text "
                  "column. --split is both the dataset split and the output name.")
    c.add_argument("--dataset", required=True, help="HuggingFaceM4/the_cauldron, say, or a local data folder")
    c.add_argument("--subset", help="dataset config, e.g. vqav2")
    c.add_argument("--image_column", help="default: first of " + ", ".join(HF_IMAGE_COLUMNS))
    c.add_argument("--text_column", help="default: the_cauldron 'texts', else first of " + ", ".join(HF_TEXT_COLUMNS))
    c.add_argument("--prompt", default=DESCRIBE, help="user turn for image + text rows")
    c.add_argument("--streaming", action="store_true", help="stream rather than download it all (use with --limit)")
    c.set_defaults(run=lambda a: convert_hf(a.dataset, a.out_dir, a.subset, a.split, a.image_column, a.text_column,
                                            a.prompt, a.streaming, a.limit))
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in ("synthetic", "coco", "llava", "folder", "hf", "-h", "--help"):
        argv = ["synthetic", *argv]  # bare `python prepare_data.py [--train N ...]` builds the synthetic set
    args = _parser().parse_args(argv)

    def run():
        try:
            args.run(args)
        except OSError as e:  # e.g. an unwritable --out_dir or a full disk: say so without a traceback
            raise UserError(str(e)) from None
        return 0
    return cli.main(run, "prepare_data.py")


if __name__ == "__main__":
    sys.exit(main())
