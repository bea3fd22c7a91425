"""Where training records come from: a --data_dir names one source or a weighted mixture, and
each source's rows become chat records as they are read. data.py turns records into batches.

    data/synthetic                        a folder of {train,val,test}.jsonl (prepare_data.py's format)
    data/saved                            a dataset saved with `datasets` (save_to_disk)
    data/parquet_dir, a.parquet, 'd/*.arrow'   parquet or arrow files, or a folder of them
    HuggingFaceM4/the_cauldron:vqav2      a hub dataset and its subset (datasets downloads it)
    "the_cauldron:vqav2=1,data/mine=2"    a mixture: a source's share of the draws is weight / sum

A record is {"images": [path or encoded bytes], "messages": [{"role", "content"}], "type": str}.
Rows are told apart by their columns: ours (images + messages), the_cauldron (images + texts of
{user, assistant}), LLaVA (image + conversations of {from, value}), or an image column and a
caption column (named with --image_column / --text_column where not guessed), answered to
"Describe the image.". Images stay as the dataset stores them (bytes inside Arrow/parquet, or
paths) until a DataLoader worker decodes them; a row without an image is unusable, like one
whose image does not decode.
"""
import copy
import glob
import io
import itertools
import json
import os
import sys
from bisect import bisect_right
from pathlib import Path

from checkpoint import UserError

DESCRIBE = "Describe the image."  # the user turn of a caption (synthetic.DESCRIBE, prepare_data's default)
IMAGE_COLUMNS = ("images", "image", "img", "jpg", "png")
TEXT_COLUMNS = ("text", "caption", "captions", "sentences", "answer")
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
VAL_SPLITS = ("validation", "val")


# ----------------------------------------------------------------------------- JSONL folders

def load_records(jsonl_path):
    """Read a dataset jsonl; image paths come back absolute so callers can open them from any cwd."""
    root = Path(jsonl_path).resolve().parent
    records = []
    with open(jsonl_path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                if isinstance(record, dict) and isinstance(record.get("images"), list):
                    record["images"] = [str(root / p) if isinstance(p, str) else p for p in record["images"]]
                records.append(record)
    return records


def load_split(data_dir, split):
    """The usable records of data_dir/split.jsonl (None when there is no such file); malformed ones
    are skipped and counted in one line on stderr, so that none can stop a run midway."""
    path = os.path.join(data_dir, f"{split}.jsonl")
    if not os.path.exists(path):
        return None
    try:
        records = load_records(path)
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        raise UserError(f"{path}: unreadable dataset ({e})") from None
    usable, bad = [], []
    for n, r in enumerate(records, 1):
        try:
            usable.append(chat_record(r))
        except ValueError as e:
            bad.append(f"record {n}: {e}")
    if bad:
        print(f"{path}: skipped {len(bad)} malformed records ({bad[0]}{', ...' if len(bad) > 1 else ''})", file=sys.stderr)
    return usable


def chat_record(r):
    """A record as training reads it: every message's content as text (the content-parts form
    [{"type": "text", "text": ...}, {"type": "image"}] of chat templates is joined; the images go
    before the first user turn in any case). ValueError when it cannot be trained on."""
    if not isinstance(r, dict):
        raise ValueError("not a JSON object")
    if not isinstance(r.get("images", []), list) or not all(isinstance(p, (str, bytes)) for p in r.get("images", [])):
        raise ValueError("images is not a list of paths")
    messages = r.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("no messages")
    out = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ValueError("a message without a system/user/assistant role")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and (p.get("type") == "image" or isinstance(p.get("text"), str)) for p in content):
                raise ValueError("content parts other than text and image")
            content = "".join(p["text"] for p in content if p.get("type") != "image")
        if not isinstance(content, str):
            raise ValueError("content is not text")
        out.append({"role": m["role"], "content": content})
    roles = [m["role"] for m in out if m["role"] != "system"]
    if not roles or roles[0] != "user" or roles[-1] != "assistant":
        raise ValueError("the chat must start with a user turn and end with an assistant turn")
    return {**r, "images": r.get("images", []), "messages": out}


def image_input(ref):
    """What processor.load_image opens: a path as is, encoded bytes as a file in memory (PIL
    reads it like a file, so a JPEG still decodes at reduced size where that suffices)."""
    return io.BytesIO(ref) if isinstance(ref, bytes) else ref


# ----------------------------------------------------------------------------- rows of datasets

def row_reader(columns, image_column="", text_column="", where="the dataset"):
    """-> (the columns to read, row -> (images, messages)) for a table with these columns."""
    def need(name, what):
        if name not in columns:
            raise UserError(f"{where}: no {what} column {name!r} (columns: {', '.join(columns)}; "
                            f"name it with --image_column / --text_column)")
        return name

    def guess(given, candidates, what):
        return need(given, what) if given else next((c for c in candidates if c in columns), None)

    image = guess(image_column, IMAGE_COLUMNS, "image")
    if image and "messages" in columns:  # ours
        return [image, "messages"], lambda r: (r[image], r["messages"])
    if image and "texts" in columns:  # the_cauldron
        return [image, "texts"], lambda r: (r[image], [{"role": role, "content": t[role]} for t in r["texts"]
                                                     for role in ("user", "assistant")])
    if image and "conversations" in columns:  # LLaVA: the <image> marker goes, images lead the first user turn
        return [image, "conversations"], lambda r: (r[image], [
            {"role": LLAVA_ROLES.get(t["from"], t["from"]), "content": t["value"].replace("<image>", "").strip()}
            for t in r["conversations"]])
    text = guess(text_column, TEXT_COLUMNS, "text")
    if not image or not text:
        raise UserError(f"{where}: unknown schema (columns: {', '.join(columns)}); expected images + messages, "
                        f"images + texts, image + conversations, or an image and a text column (--image_column, "
                        f"--text_column)")

    def caption(r):
        t = r[text]
        return r[image], [{"role": "user", "content": DESCRIBE},
                          {"role": "assistant", "content": t[0] if isinstance(t, list) and t else t}]
    return [image, text], caption


def image_refs(value, root):
    """A row's image cell(s) -> [path or bytes]: `datasets` stores an image as {"bytes", "path"}."""
    refs = []
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(v, dict):
            v = v.get("bytes") or v.get("path")
        if isinstance(v, str) and root and not os.path.isabs(v):
            v = os.path.join(root, v)
        if not isinstance(v, (str, bytes)) or not v:
            raise ValueError("no image")
        refs.append(v)
    if not refs:
        raise ValueError("no image")
    return refs


def row_record(row, read, name, root=None):
    """One row -> a chat record; ValueError when it cannot be trained on (skipped and counted)."""
    try:
        images, messages = read(row)
    except (KeyError, TypeError, AttributeError, IndexError):
        raise ValueError("bad schema") from None
    return chat_record({"images": image_refs(images, root), "messages": messages, "type": name})


class Table:
    """Rows [start, stop) of a datasets.Dataset (memory-mapped Arrow) read one at a time as chat
    records; images come back undecoded (the Arrow format gives the stored bytes)."""

    def __init__(self, ds, name, image_column="", text_column="", root=None):
        columns, self.read = row_reader(ds.column_names, image_column, text_column, name)
        self.arrow = ds.select_columns(columns).with_format("arrow")
        self.name, self.root, self.start, self.stop = name, root, 0, len(ds)

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        return row_record(self.arrow[self.start + i].to_pylist()[0], self.read, self.name, self.root)

    def __iter__(self):  # the usable records (pretrain.proxy_vocab reads every record's text)
        for i in range(len(self)):
            try:
                yield self[i]
            except ValueError:
                continue

    def part(self, start, stop):
        """Rows [start, stop) of this table."""
        t = copy.copy(self)
        t.start, t.stop = self.start + start, self.start + stop
        return t

    @property
    def types(self):
        return [self.name] * len(self)


class Stream:
    """A streamed source (datasets.IterableDataset): rows are read in order, never indexed."""

    def __init__(self, ds, name, image_column="", text_column="", seed=0):
        columns, self.read = row_reader(ds.column_names or [], image_column, text_column, name)
        # a shuffle buffer (of undecoded rows) mixes neighbouring rows; the shard order is shuffled too
        self.ds = ds.decode(False).select_columns(columns).shuffle(seed=seed, buffer_size=512)
        self.name = name

    def rows(self, epoch, slot, slots):
        """This slot's records (None for an unusable row) of one pass over the data: whole files
        where there are at least as many as slots, else every slots-th row."""
        import fsspec.asyn
        import torch.utils.data
        from datasets.distributed import split_dataset_by_node
        if torch.utils.data.get_worker_info():  # as datasets does for its own workers: a forked fsspec lock can hang
            fsspec.asyn.reset_lock()
        ds = split_dataset_by_node(self.ds, rank=slot, world_size=slots)
        ds.set_epoch(epoch)
        for batch in ds.iter(batch_size=64):  # (iter(), unlike a for loop, does not re-split by DataLoader worker)
            for values in zip(*batch.values()):
                try:
                    yield row_record(dict(zip(batch, values)), self.read, self.name)
                except ValueError:
                    yield None


class Mixture:
    """Several sources' records as one sequence (source after source); `weights`: each source's
    share of the draws (data.sample_weights spreads it over the source's records)."""

    def __init__(self, parts, weights):
        self.parts, self.weights = parts, weights
        self.ends = [sum(len(p) for p in parts[:k + 1]) for k in range(len(parts))]

    def __len__(self):
        return self.ends[-1]

    def __getitem__(self, i):
        k = bisect_right(self.ends, i)
        return self.parts[k][i - (self.ends[k - 1] if k else 0)]

    def __iter__(self):
        return itertools.chain.from_iterable(self.parts)


def record_types(records):
    return records.types if isinstance(records, Table) else [r.get("type", "") for r in records]


# ----------------------------------------------------------------------------- opening sources

def parse_mixture(text):
    """"a:x=1,b=0.5,c" -> [("a:x", 1.0), ("b", 0.5), ("c", 1.0)]."""
    items = []
    for item in (x.strip() for x in text.split(",")):
        name, eq, weight = item.rpartition("=")
        if not eq:
            name, weight = item, "1"
        try:
            w = float(weight)
        except ValueError:
            w = -1.0
        if not name or not w > 0 or w == float("inf"):
            raise UserError(f"--data_dir {text!r}: expected SOURCE or SOURCE=WEIGHT,... with weights > 0")
        items.append((name, w))
    return items


def is_hub_id(spec):
    return not os.path.exists(spec) and not spec.startswith((".", "/", "~")) and spec.split(":")[0].count("/") == 1


def data_files(spec):
    """The parquet (else arrow) files a path names: a file, a glob or a folder (searched
    recursively); [] when it names none."""
    if os.path.isdir(spec):
        found = [sorted(glob.glob(os.path.join(spec, "**", f"*.{ext}"), recursive=True)) for ext in ("parquet", "arrow")]
    else:
        paths = sorted(glob.glob(spec)) if any(c in spec for c in "*?[") else [spec] if os.path.isfile(spec) else []
        found = [[p for p in paths if p.endswith(f".{ext}")] for ext in ("parquet", "arrow")]
    return found[0] or found[1]


def load_hf(what, call, progress=True):
    """call(datasets) with the `datasets` module: anything it raises (no network, not found, bad
    files) is one line. progress=False: without datasets' progress bars."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"{what}: reading it needs the datasets package: pip install datasets") from None
    level, bars = datasets.logging.get_verbosity(), datasets.is_progress_bar_enabled()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its log of the failure would be a second line
    if not progress:
        datasets.disable_progress_bars()
    try:
        return call(datasets)
    except Exception as e:  # datasets raises many types (not found, offline, bad config, bad files): all are input errors
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{what}: cannot load it ({type(e).__name__}: {first})") from None
    finally:
        datasets.logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def open_splits(spec, streaming=False):
    """A source that is not a JSONL folder -> ({split: datasets.Dataset or IterableDataset}, root
    for relative image paths). UserError when spec names no dataset."""
    if os.path.isdir(spec) and any(os.path.exists(os.path.join(spec, f)) for f in ("state.json", "dataset_dict.json")):
        ds = load_hf(spec, lambda datasets: datasets.load_from_disk(spec))
        splits = dict(ds) if isinstance(ds, dict) else {"train": ds}  # a DatasetDict is a dict of splits
        if streaming:  # saved Arrow files are memory-mapped: streaming them is reading them in order
            splits = {k: v.to_iterable_dataset(num_shards=max(1, len(v.cache_files))) for k, v in splits.items()}
        return splits, spec
    files = data_files(spec)
    if files:
        fmt = "parquet" if files[0].endswith(".parquet") else "arrow"
        kw = {"data_dir": spec} if os.path.isdir(spec) else {"data_files": {"train": files}}
        return load_hf(spec, lambda datasets: dict(datasets.load_dataset(fmt, streaming=streaming, **kw))), (
            spec if os.path.isdir(spec) else os.path.dirname(files[0]))
    if is_hub_id(spec):
        name, _, subset = spec.partition(":")

        def hub(datasets):
            names = datasets.get_dataset_split_names(name, subset or None)
            return {s: datasets.load_dataset(name, subset or None, split=s, streaming=streaming)
                    for s in names if s in ("train", *VAL_SPLITS)}
        return load_hf(spec, hub), None
    raise UserError(f"{spec}: no train.jsonl, no dataset saved by datasets' save_to_disk, no .parquet/.arrow "
                    f"files{'' if os.path.exists(spec) else ' (no such path)'}, and not a hub id like org/name[:subset]")


def source_name(spec):
    """A short name for messages and as the type of its records: the hub subset, or the last path part."""
    if is_hub_id(spec):
        name, _, subset = spec.partition(":")
        return subset or name.split("/")[-1]
    name = os.path.basename(os.path.normpath(spec.split("*")[0]))
    return name.removesuffix(".parquet").removesuffix(".arrow") or spec


def wants_synthetic(data_dir):
    """True for a folder named synthetic* that has no train.jsonl yet: train.py builds the
    synthetic set only there (its own default locations, or where it is asked for by name)."""
    return (os.path.basename(os.path.normpath(data_dir)).startswith("synthetic")
            and not os.path.exists(os.path.join(data_dir, "train.jsonl")))
