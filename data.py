"""Training data: dataset records, the chat dataset, collation (padding or packing) and the
sharded, resumable order in which samples are drawn.

A dataset directory holds {train,val,test}.jsonl (prepare_data.py writes them) and the images
they name. Each line is

    {"images": ["images/x.png"], "messages": [{"role": "user", "content": "..."},
     {"role": "assistant", "content": "..."}], "type": "color"}

with image paths relative to the jsonl's directory; the images belong to the first user turn.
"""
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from checkpoint import UserError


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
    if not isinstance(r.get("images", []), list) or not all(isinstance(p, str) for p in r.get("images", [])):
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


class ChatDataset(torch.utils.data.Dataset):
    """Records -> (input_ids, labels, pixel tiles, type). A sample whose image cannot be read, with
    no answer to learn or longer than seq_len is None: the collate skips and counts it.
    A key (index, position) marks a training draw: its image shift is seeded by the position in
    the sample stream, so a resumed run sees exactly the same pixels. With cache, each decoded
    sample is kept (for small sets whose PNG decoding would dominate a step)."""

    def __init__(self, records, processor, seq_len, shift=0, seed=0, cache=False):
        self.records, self.processor, self.seq_len, self.shift, self.seed = records, processor, seq_len, shift, seed
        self.cache = {} if cache else None

    def __len__(self):
        return len(self.records)

    def encoded(self, i):
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        r = self.records[i]
        try:
            ids, labels, pixels = self.processor.encode_chat(r["messages"], r["images"])
            sample = None if len(ids) > self.seq_len or (labels == -100).all() else (ids, labels, pixels)
        except UserError:  # unreadable or missing image
            sample = None
        if self.cache is not None:
            self.cache[i] = sample
        return sample

    def __getitem__(self, key):
        i, position = key if isinstance(key, tuple) else (key, None)
        sample = self.encoded(i)
        if sample is None:
            return None
        ids, labels, pixels = sample
        if self.shift and position is not None:
            g = torch.Generator().manual_seed(hash((self.seed, position)) & 0x7FFFFFFF)
            pixels = [shifted(p, self.shift, g) for p in pixels]
        return ids, labels, pixels, self.records[i].get("type", "")


def shifted(tile, k, g):
    """The tile moved by up to k pixels in x and y, the edge pixels repeated into the gap."""
    S = tile.shape[-1]
    dy, dx = torch.randint(0, 2 * k + 1, (2,), generator=g).tolist()
    return F.pad(tile[None], (k, k, k, k), mode="replicate")[0, :, dy:dy + S, dx:dx + S]


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
    """Each record's sampling weight (its type's in --type_weights, else 1); None: all equal."""
    weights = parse_type_weights(text)
    if not weights:
        return None
    w = torch.tensor([weights.get(r.get("type", ""), 1.0) for r in records], dtype=torch.float64)
    if not w.sum() > 0:
        raise UserError(f"type weights {text!r} give every training sample weight 0")
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


def loader(dataset, batches, num_workers, collate_fn=collate):
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator())  # its own: creating a loader must not draw from the global RNG
