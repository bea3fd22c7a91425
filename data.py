"""Training data: the records of a --data_dir (sources.py reads them where they lie), the chat
dataset, collation (padding or packing) and the sharded, resumable order in which samples are
drawn, from an index (ChatDataset) or, with --streaming, in the order a source reads (ChatStream).

A JSONL dataset directory holds {train,val,test}.jsonl (prepare_data.py writes them) and the
images they name. Each line is

    {"images": ["images/x.png"], "messages": [{"role": "user", "content": "..."},
     {"role": "assistant", "content": "..."}], "type": "color"}

with image paths relative to the jsonl's directory; the images belong to the first user turn.
Other sources (datasets saved to disk, parquet/arrow files, hub datasets, mixtures): sources.py.
"""
import itertools
import os
import random

import torch
import torch.nn.functional as F

import sources
from checkpoint import UserError
from sources import chat_record, image_input, load_records, load_split, wants_synthetic  # noqa: F401 (data.* API)

MAX_UNUSABLE = 10_000  # a stream that yields this many unusable samples in a row holds nothing to learn


# ----------------------------------------------------------------------------- splits of a --data_dir

def load_data(spec, streaming=False, held_out=0, image_column="", text_column="", seed=0):
    """--data_dir -> (train, val, (test, its split name)). train: a list of records (a JSONL
    folder), a sources.Table or a sources.Mixture; with streaming [(source, weight)] for
    ChatStream. val and test are lists: val interleaves the sources' (so that every source is in
    val[:n]); test splits come from JSONL folders, else the final evaluation reads val."""
    items = sources.parse_mixture(spec)
    splits = [source_splits(name, streaming, -(-held_out // len(items)), image_column, text_column, seed)
              for name, _ in items]
    val = [r for group in itertools.zip_longest(*(v for _, v, _ in splits)) for r in group if r is not None]
    test = [r for _, _, t in splits for r in t]
    parts = [(train, weight) for (train, _, _), (_, weight) in zip(splits, items)]
    if streaming:
        train = parts
    elif len(parts) == 1:
        train = parts[0][0]
    else:
        train = sources.Mixture([p for p, _ in parts], [w for _, w in parts])
    return train, val, (test, "test") if test else (val, "val")


def source_splits(name, streaming, held_out, image_column, text_column, seed):
    """One source -> (train, val, test). A source without a validation split sets aside up to
    held_out of its last training records (a tenth at most) for one; streamed, it has none."""
    if os.path.exists(os.path.join(name, "train.jsonl")):
        train = load_split(name, "train")
        if not train:
            raise UserError(f"{name}/train.jsonl: no samples")
        return train, load_split(name, "val") or [], load_split(name, "test") or []
    splits, root = sources.open_splits(name, streaming)
    if "train" not in splits:
        raise UserError(f"{name}: no train split (it has {', '.join(splits) or 'none'})")
    label, val_split = sources.source_name(name), next((splits[s] for s in sources.VAL_SPLITS if s in splits), None)
    if streaming:
        train = sources.Stream(splits["train"], label, image_column, text_column, seed)
        val = sources.Stream(val_split, label, image_column, text_column, seed).rows(0, 0, 1) if val_split else []
        return train, usable(val, held_out), []
    train = sources.Table(splits["train"], label, image_column, text_column, root)
    if val_split is not None:
        val = usable(sources.Table(val_split, label, image_column, text_column, root), held_out)
    else:
        k = min(held_out, len(train) // 10)
        train, val = train.part(0, len(train) - k), usable(train.part(len(train) - k, len(train)), k)
    if not len(train):
        raise UserError(f"{name}: no training samples")
    return train, val, []


def usable(records, n):
    """The first n records that can be trained on (rows that are not chats are left out)."""
    return list(itertools.islice((r for r in records if r is not None), n))


def safe(records, i):
    """records[i], or None for a row that is not a usable chat (sources.row_record)."""
    try:
        return records[i]
    except ValueError:
        return None


# ----------------------------------------------------------------------------- samples

def encode(record, processor, seq_len):
    """A record -> (input_ids, labels, pixel tiles, type), or None when it cannot be learnt from:
    an image that does not decode, no answer to learn, or longer than seq_len."""
    try:
        ids, labels, pixels = processor.encode_chat(record["messages"], [image_input(x) for x in record["images"]])
    except UserError:  # unreadable or missing image, image tokens in the text
        return None
    if len(ids) > seq_len or (labels == -100).all():
        return None
    return ids, labels, pixels, record.get("type", "")


def augmented(sample, shift, seed, position):
    """The sample with each tile shifted by up to `shift` pixels, seeded by its stream position,
    so that a resumed run sees exactly the same pixels."""
    if sample is None or not shift or position is None:
        return sample
    ids, labels, pixels, kind = sample
    g = torch.Generator().manual_seed(hash((seed, position)) & 0x7FFFFFFF)
    return ids, labels, [shifted(p, shift, g) for p in pixels], kind


class ChatDataset(torch.utils.data.Dataset):
    """Records -> (input_ids, labels, pixel tiles, type); None for a sample that cannot be used
    (encode(); a row that is not a chat): the collate skips and counts it. A key (index,
    position) marks a training draw, whose image shift is seeded by the position in the sample
    stream. With cache, each decoded sample is kept (for small sets whose PNG decoding would
    dominate a step)."""

    def __init__(self, records, processor, seq_len, shift=0, seed=0, cache=False):
        self.records, self.processor, self.seq_len, self.shift, self.seed = records, processor, seq_len, shift, seed
        self.cache = {} if cache else None

    def __len__(self):
        return len(self.records)

    def encoded(self, i):
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        r = safe(self.records, i)
        sample = None if r is None else encode(r, self.processor, self.seq_len)
        if self.cache is not None:
            self.cache[i] = sample
        return sample

    def __getitem__(self, key):
        i, position = key if isinstance(key, tuple) else (key, None)
        return augmented(self.encoded(i), self.shift, self.seed, position)


def shifted(tile, k, g):
    """The tile moved by up to k pixels in x and y, the edge pixels repeated into the gap."""
    S = tile.shape[-1]
    dy, dx = torch.randint(0, 2 * k + 1, (2,), generator=g).tolist()
    return F.pad(tile[None], (k, k, k, k), mode="replicate")[0, :, dy:dy + S, dx:dx + S]


# ----------------------------------------------------------------------------- batches

def collate(samples, pack_len=0):
    """Right-padded rows (labels -100 on padding; attention is causal, so real tokens never see the
    padding after them and no mask is needed), or with pack_len several samples per row and
    segment ids 1, 2, .. as attention_mask: the LM then keeps attention within each sample and
    restarts its positions. The batch's tensors are the model's inputs; the rest is bookkeeping."""
    good = [s for s in samples if s is not None]
    rows = []
    for s in good:
        if pack_len and rows and sum(len(x[0]) for x in rows[-1]) + len(s[0]) <= pack_len:
            rows[-1].append(s)
        else:
            rows.append([s])
    T = max((sum(len(x[0]) for x in row) for row in rows), default=0)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    segments = torch.zeros(len(rows), T, dtype=torch.long)
    for r, row in enumerate(rows):
        t = 0
        for k, (i, lab, _, _) in enumerate(row):
            ids[r, t:t + len(i)], labels[r, t:t + len(i)], segments[r, t:t + len(i)] = i, lab, k + 1
            t += len(i)
    pixels = [p for s in good for p in s[2]]  # every tile, in the order of the <image> tokens
    batch = {"input_ids": ids, "labels": labels, "types": [s[3] for s in good], "skipped": len(samples) - len(good),
             "tokens": int(sum(len(s[0]) for s in good)), "supervised": int((labels[:, 1:] != -100).sum())}
    if pack_len:
        batch["attention_mask"] = segments
    if pixels:
        batch["pixel_values"] = torch.stack(pixels)
    return batch


def parse_type_weights(text):
    """"color=0.3,size=0.5" -> {"color": 0.3, "size": 0.5}; ValueError when malformed."""
    weights = {name.strip(): float(w) for name, w in (item.split("=") for item in text.split(",") if item.strip())}
    if any(not w >= 0 for w in weights.values()):
        raise ValueError(text)
    return weights


def sample_weights(records, text):
    """Each record's sampling weight, None: all equal. A type weighs as --type_weights says
    (others 1); in a mixture each source's records share its part of the draws in those
    proportions, so that the source is drawn at its weight whatever its size."""
    weights = parse_type_weights(text)
    parts, shares = (records.parts, records.weights) if isinstance(records, sources.Mixture) else ([records], [1.0])
    if not weights and len(parts) == 1:
        return None
    w = []
    for part, share in zip(parts, shares):
        p = torch.tensor([weights.get(t, 1.0) for t in sources.record_types(part)], dtype=torch.float64)
        w.append(p * (share / sum(shares) / p.sum()) if len(parts) > 1 and p.sum() > 0 else p)
    w = torch.cat(w)
    if not w.sum() > 0:
        raise UserError(f"type weights {text!r} give every training sample weight 0")
    if len(w) > 2 ** 24:  # torch.multinomial's limit
        raise UserError(f"{len(w)} weighted training samples: more than 2^24 can only be drawn with --streaming")
    return w


class MicroBatches:
    """This process's micro-batches as (index, position) keys, from data position `start` (samples
    used by earlier steps) on; one seeded permutation of the data per epoch (with `weights`, n
    seeded draws with replacement instead). Global step g takes stream positions [g*G, (g+1)*G),
    G = batch * accum * world, and its micro-batch (k, rank) is chunk k*world + rank: so 1 process
    x accum 2 and 2 processes x accum 1 see the same batches."""

    def __init__(self, n, batch, accum, rank, world, seed, start=0, weights=None):
        self.n, self.batch, self.accum, self.rank, self.world, self.seed = n, batch, accum, rank, world, seed
        self.start, self.weights = start, weights

    def epoch_order(self, epoch):
        g = torch.Generator().manual_seed(self.seed + epoch)
        if self.weights is None:
            return torch.randperm(self.n, generator=g)
        return torch.multinomial(self.weights, self.n, replacement=True, generator=g)

    def __iter__(self):
        G = self.batch * self.accum * self.world
        step, epoch, order = self.start // G, None, None
        while True:
            for k in range(self.accum):
                lo = step * G + (k * self.world + self.rank) * self.batch
                keys = []
                for position in range(lo, lo + self.batch):
                    if position // self.n != epoch:
                        epoch = position // self.n
                        order = self.epoch_order(epoch)
                    keys.append((int(order[position % self.n]), position))
                yield keys
            step += 1


class ChatStream:
    """--streaming: each source read in its own order (a sources.Stream as the files go, through
    a shuffle buffer; a list or Table in a seeded permutation per epoch), the sources mixed by
    weight. Each (process, DataLoader worker) slot reads its own part of every source: whole
    files where there are enough, else every n-th row. Nothing is indexed, so a hub dataset
    larger than the disk trains as it downloads."""

    def __init__(self, parts, processor, seq_len, shift=0, seed=0):
        self.parts, self.weights = [p for p, _ in parts], [w for _, w in parts]
        self.processor, self.seq_len, self.shift, self.seed = processor, seq_len, shift, seed

    def records(self, k, slot, slots):
        """Source k's records for this slot, epoch after epoch (None: a row that is not a chat)."""
        part = self.parts[k]
        for epoch in itertools.count():
            if isinstance(part, sources.Stream):
                rows = part.rows(epoch, slot, slots)
            else:
                order = torch.randperm(len(part), generator=torch.Generator().manual_seed(self.seed + epoch))
                rows = (safe(part, i) for i in order[slot::slots].tolist())
            n = 0
            for n, r in enumerate(rows, 1):
                yield r
            if not n:
                raise UserError(f"{getattr(part, 'name', 'a source')}: no records for data slot {slot} of {slots} "
                                f"(fewer than processes x workers?)")

    def draws(self, slot, slots, type_weights):
        """This slot's records in order: each draw picks a source by weight (and, with type
        weights, keeps a record with probability weight / the largest weight)."""
        rng = random.Random(self.seed * 1_000_003 + slot)
        streams = [self.records(k, slot, slots) for k in range(len(self.parts))]
        top = max([1.0, *type_weights.values()])
        while True:
            r = next(streams[rng.choices(range(len(streams)), self.weights)[0]])
            if r is None or not type_weights or rng.random() * top < type_weights.get(r.get("type", ""), 1.0):
                yield r


class StreamBatches(torch.utils.data.IterableDataset):
    """A ChatStream's micro-batches for one process, from data position `start` (samples all
    processes used before) on. The DataLoader takes micro-batch m from worker m % W, so after M
    micro-batches worker w goes on with slot (M + w) % W, past the records that slot has used:
    a resumed run continues each slot exactly (with the same processes and workers)."""

    def __init__(self, stream, batch, rank, world, start, type_weights, collate_fn):
        self.stream, self.batch, self.rank, self.world, self.start = stream, batch, rank, world, start
        self.type_weights, self.collate_fn = parse_type_weights(type_weights), collate_fn

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        W, w = (info.num_workers, info.id) if info else (1, 0)
        done = self.start // (self.batch * self.world)  # micro-batches this process used
        local = (done + w) % W
        slot, slots = self.rank * W + local, self.world * W
        s, bad = self.stream, 0
        draws = s.draws(slot, slots, self.type_weights)
        used = self.batch * len(range(local, done, W))
        try:
            for _ in range(used):
                next(draws)
            for n in itertools.count(used, self.batch):
                samples = []
                for p in range(n, n + self.batch):
                    r = next(draws)
                    sample = None if r is None else encode(r, s.processor, s.seq_len)
                    samples.append(augmented(sample, s.shift, s.seed, p * slots + slot))
                    bad = 0 if sample else bad + 1
                if bad >= MAX_UNUSABLE:
                    raise UserError(f"{MAX_UNUSABLE} samples drawn in a row and none usable (unreadable images, "
                                    f"no answer, or longer than --seq_len {s.seq_len})")
                yield self.collate_fn(samples)
        except UserError as e:  # said by the main process (an exception from a worker carries its traceback)
            yield {"error": str(e)}


def loader(dataset, batches, num_workers, collate_fn=collate):
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator())  # its own: creating a loader must not draw from the global RNG


def batches(dataset, batch, accum, rank, world, seed, start, type_weights, num_workers, collate_fn=collate):
    """This process's micro-batches, from data position `start` (samples all processes used
    before) on: MicroBatches over a ChatDataset, or a ChatStream's StreamBatches."""
    if not isinstance(dataset, ChatStream):
        keys = MicroBatches(len(dataset), batch, accum, rank, world, seed, start, sample_weights(dataset.records, type_weights))
        return loader(dataset, keys, num_workers, collate_fn)
    stream = torch.utils.data.DataLoader(StreamBatches(dataset, batch, rank, world, start, type_weights, collate_fn),
                                         batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available())
    return checked(stream)


def checked(stream):
    """A stream's batches; a worker's error (a batch {"error": ...}) is raised here, as one line."""
    for b in stream:
        if "error" in b:
            raise UserError(b["error"])
        yield b


# ----------------------------------------------------------------------------- throughput (bench.py --data)

def photo_parquet(path, n=64, size=(640, 480), seed=0):
    """n photo-like JPEGs (smooth colour fields with sensor-like grain, quality 90: ~70 KB at
    640x480, as COCO's photos) with a question and answer each, in the_cauldron's schema, as a parquet file."""
    import io

    import datasets
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    rows = {"images": [], "texts": []}
    for i in range(n):
        field = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8)).resize(size, Image.BICUBIC)
        pixels = np.asarray(field, np.float32) + rng.normal(0, 6, (size[1], size[0], 3))
        buf = io.BytesIO()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        rows["images"].append([{"bytes": buf.getvalue(), "path": None}])
        rows["texts"].append([{"user": f"What is the colour of region {i}? Answer briefly.", "assistant": f"colour {i}"}])
    features = datasets.Features({"images": datasets.List(datasets.Image()),
                                  "texts": datasets.List({"user": datasets.Value("string"), "assistant": datasets.Value("string")})})
    datasets.Dataset.from_dict(rows, features=features).to_parquet(path)
    return path


def throughput(processor, path, batch_size=16, rounds=4):
    """Samples/s of one DataLoader worker on a parquet file of images (photo_parquet): rows read
    as records, each image decoded, resized and tiled by `processor`, the chat tokenised, the
    batch collated. A DataLoader worker is one process doing exactly this."""
    import time
    ds = ChatDataset(load_data(path)[0], processor, seq_len=1 << 20)
    collate([ds[0]])  # warm-up: the first image decode, the tokenizer
    t = time.perf_counter()
    for b in range(rounds):
        collate([ds[i % len(ds)] for i in range(b * batch_size, (b + 1) * batch_size)])
    return rounds * batch_size / (time.perf_counter() - t)
