"""Train picoVLM.

    python train.py                                   # the demo: synthetic data -> out/
    python train.py --config tiny --max_steps 20      # smoke test: tiny random model, < 1 minute
    python train.py --config nanovlm-222m --data_dir data/coco --vision scratch
    python train.py --init_from out --data_dir data/mine --max_steps 200    # fine-tune a checkpoint
    python train.py --resume                          # continue out/ exactly where it stopped
    torchrun --nproc_per_node=2 train.py --config tiny                      # DDP: NCCL on GPUs, gloo on CPU

Training runs in up to two stages:
  1. vision pre-training (--pretrain_steps > 0): the ViT and the projector learn without the LM,
     from a word head scored against the LM's own embeddings and a tiny proxy decoder; a step
     costs next to nothing, so the ViT looks at far more images than the VLM could show it;
  2. the VLM: ViT -> projector -> language model, loss on the assistant's answers only.
Every setting is a field of TrainConfig; `--config NAME` picks a preset and `--field value`
overrides one field (booleans: --name, --name true, --name false). Bad input is one `error:` line
and exit status 2. Writes to --out_dir: the VLM (generate.py --model out), best/, the training
state, log.jsonl, loss.png and final_eval.json.
"""
import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

# OpenMP threads that busy-wait for work steal the CPU from the data workers and from anything
# else on a small machine: on 2 shared cores a ViT step ran 3-5x slower with the default policy.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402  (after the OpenMP setting, which is read when torch loads)
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import model as M  # noqa: E402


# ----------------------------------------------------------------------------- configuration

@dataclass
class TrainConfig:
    # -- data: a directory of {train,val,test}.jsonl (prepare_data.py's format)
    data_dir: str = "data/synthetic"
    synthetic: int = 20000          # no train.jsonl in data_dir: build this many synthetic training samples there first (0: error)
    system_prompt: str = ""         # system turn of every chat, saved with the processor so answering uses it too ("": an empty turn; SmolLM2's default costs ~20 tokens a sample)
    seq_len: int = 2048             # longest sample in tokens (longer ones are skipped and counted); the row length when packing
    packing: bool = False           # several samples per row; attention stays within a sample and positions restart per sample
    augment_shift: int = 0          # shift each training image by up to this many pixels (edges repeated): more distinct images
    num_workers: int = 1            # DataLoader worker processes
    type_weights: str = ""          # VLM stage: each question type's (records' "type") sampling weight, e.g. "color=0.3,text=2"; others 1
    cache_data: bool = False        # keep each decoded training sample in memory after its first use: for small
                                    # sets (the synthetic one: 49 KB a 64 px image, ~1 GB; in each worker)
    # -- model
    init_from: str = ""             # fine-tune this picoVLM or SmolVLM/Idefics3 checkpoint (directory or hub id) instead of --vision/--lm
    vision: str = "scratch"         # "scratch": a new SigLIP-architecture ViT shaped by the vit_* fields; or a SigLIP directory / hub id
    vit_image_size: int = 224
    vit_patch_size: int = 16
    vit_depth: int = 12
    vit_width: int = 768
    vit_heads: int = 12
    vit_mlp_dim: int = 3072
    vit_pos_embed: str = "sincos2d"  # "sincos2d" (fixed 2-D sin-cos, ViT BKMs) or "learned" (SigLIP's table)
    mp_pixel_shuffle: int = 2       # s: each s x s block of patches becomes one LM token
    lm: str = ""                    # "": the offline SmolLM2-135M-Instruct GGUF; a .gguf, directory or hub id; or a shape to initialise randomly: tiny, smollm2-135m, smollm2-360m, smollm2-1.7b
    tokenizer: str = ""             # "": the LM's own (the offline GGUF's for a random shape); or a directory / hub id
    # -- stage 1: vision pre-training through a tiny proxy decoder (0 steps: no stage 1)
    pretrain_steps: int = 0
    pretrain_batch_size: int = 64
    pretrain_lr: float = 1e-3       # the ViT, the projector, the word head and the proxy decoder alike
    pretrain_type_weights: str = "" # stage 1's type_weights
    proxy_width: int = 128
    proxy_layers: int = 2
    # -- stage 2: the VLM
    max_steps: int = 1000           # optimizer steps
    lr_decay_steps: int = 0         # length of the cosine schedule (0: max_steps); a run can stop before it ends
    batch_size: int = 16            # samples per micro-batch and process
    grad_accum: int = 1             # micro-batches per optimizer step
    lr_vision: float = 1e-4         # 0 freezes the ViT
    lr_projector: float = 1e-3      # 0 freezes the projector
    lr_lm: float = 1e-4             # 0 freezes the language model
    lm_train_layers: int = 0        # N > 0: train only the LM's top N blocks and final norm (the gradient then stops there)
    warmup_steps: int = 50          # linear warmup, then cosine decay (both stages)
    min_lr_ratio: float = 0.1       # the cosine ends at this fraction of each learning rate
    weight_decay: float = 0.0       # AdamW, matrices only
    grad_clip: float = 1.0          # max global gradient norm (0: off)
    max_bad_steps: int = 10         # stop after this many NaN/inf losses in a row (each such step is skipped)
    # -- evaluation
    eval_interval: int = 200        # steps between evaluations and checkpoints (0: at the end of each stage only)
    eval_samples: int = 350         # validation samples per evaluation
    final_eval: bool = True         # greedy-decode the test split at the end -> final_eval.json
    final_eval_samples: int = 0     # 0: the whole test split
    # -- system
    out_dir: str = "out"
    resume: bool = False            # continue the run in out_dir, with its settings (flags given now override them)
    device: str = "auto"            # auto (cuda > mps > cpu), cpu, cuda, mps
    dtype: str = "auto"             # auto: bf16 on GPUs that have it, else fp16 (+ GradScaler); on CPU bf16 only where it is faster than fp32
    compile: bool = True            # torch.compile the ViT and LM blocks (on CUDA; on CPU compiling costs more than it saves)
    seed: int = 1337
    wandb: bool = False
    wandb_project: str = "picovlm"


PRESETS = {
    # the demo (make demo): SmolLM2-135M-Instruct + a 0.8M-parameter ViT on the 64 px synthetic set;
    # patch 16 and pixel shuffle 2 (4 LM tokens an image) keep both stages cheap on a small CPU
    "default": dict(
        vit_image_size=64, vit_patch_size=16, vit_depth=4, vit_width=128, vit_heads=2, vit_mlp_dim=512,
        mp_pixel_shuffle=2, augment_shift=4, cache_data=True, pretrain_steps=2600, pretrain_batch_size=64, pretrain_lr=1e-3,
        # the ViT learns colour and size first and reading words last: stage 1 shows it more words
        pretrain_type_weights="color=0.25,size=0.25,text=2", type_weights="text=2",
        proxy_width=64, proxy_layers=1, max_steps=150, batch_size=16, lr_vision=0.0, lr_projector=1e-3, lr_lm=3e-4, lm_train_layers=4,
        warmup_steps=20, eval_interval=0, eval_samples=140),
    # tests and smoke runs: a tiny ViT and a tiny random LM with the real tokenizer
    "tiny": dict(
        data_dir="data/synthetic-tiny", synthetic=700, vit_image_size=32, vit_patch_size=8, vit_depth=2,
        vit_width=32, vit_heads=2, vit_mlp_dim=64, lm="tiny", pretrain_steps=5, pretrain_batch_size=16,
        proxy_width=32, proxy_layers=1, max_steps=20, batch_size=8, lr_vision=1e-3, lr_lm=1e-3,
        warmup_steps=2, eval_interval=10, eval_samples=28, final_eval_samples=28, num_workers=0),
    # nanoVLM-222M: SigLIP-B/16-224 (pretrained; --vision scratch trains one) + SmolLM2-135M
    "nanovlm-222m": dict(vision="google/siglip-base-patch16-224", vit_pos_embed="learned", mp_pixel_shuffle=2,
                         max_steps=5000, batch_size=16, grad_accum=4, lr_vision=5e-5, lr_projector=1e-3,
                         lr_lm=1e-4, warmup_steps=200, eval_interval=500),
    # SmolVLM-256M's shape: a SigLIP-B/16 ViT at 512 px, pixel shuffle 4 (64 tokens an image) + SmolLM2-135M
    "smolvlm-256m": dict(vit_image_size=512, vit_pos_embed="learned", mp_pixel_shuffle=4,
                         max_steps=5000, batch_size=8, grad_accum=8, lr_vision=5e-5, lr_projector=1e-3,
                         lr_lm=1e-4, warmup_steps=200, eval_interval=500),
}

# the demo sized for one GPU, where small steps are bound by kernel launches, not FLOPs: a 5M ViT
# that sees 4x more images a step on 5x more data, and twice the VLM batch. Measured on one H200
# (README): stage 1 val 94% (the default preset: 64%) in ~100 s; compiling did not repay itself.
# No sample cache: each of the 8 workers would end up holding all 100k samples (~5 GB)
PRESETS["demo-gpu"] = {**PRESETS["default"], "data_dir": "data/synthetic-100k", "synthetic": 100000,
                       "vit_depth": 6, "vit_width": 256, "vit_heads": 4, "vit_mlp_dim": 1024, "pretrain_steps": 3000,
                       "pretrain_batch_size": 256, "proxy_width": 128, "max_steps": 500, "batch_size": 32,
                       "warmup_steps": 50, "num_workers": 8, "cache_data": False, "compile": False}

# --lm NAME: a randomly initialised LM of this shape (the real ones, and a tiny one for tests)
LM_SHAPES = {**M.LM_PRESETS, "tiny": M.LanguageConfig(lm_hidden=64, lm_layers=2, lm_heads=4, lm_kv_heads=2,
                                                      lm_intermediate=128, lm_max_positions=2048)}


class UsageError(Exception):
    """Bad settings or data: one `error:` line, exit status 2."""


class TrainingError(Exception):
    """Training cannot go on (the loss keeps being NaN/inf): one `error:` line, exit status 1."""


class Interrupted(Exception):
    """Ctrl-C: a checkpoint was saved; exit status 130."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the whole usage: we promise one line
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_bool(text):
    values = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}
    if text.lower() not in values:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return values[text.lower()]


def parse_args(argv):
    """-> (preset name, {field: value} of the flags actually given). Defaults stay out, so that
    --resume can tell the saved settings from the ones overridden on this command line."""
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       argument_default=argparse.SUPPRESS)
    p.add_argument("--config", choices=sorted(PRESETS), help="preset of settings (default: default)")
    for f in dataclasses.fields(TrainConfig):
        default = PRESETS["default"].get(f.name, f.default)
        if f.type is bool:  # --name, --name true, --name false (argparse's type=bool reads "false" as True)
            p.add_argument(f"--{f.name}", type=parse_bool, nargs="?", const=True, metavar="true|false",
                           help=f"(default: {default})")
        else:
            p.add_argument(f"--{f.name}", type=f.type, metavar=f.type.__name__.upper(), help=f"(default: {default!r})")
    args = vars(p.parse_args(argv))
    return args.pop("config", "default"), args


def make_config(preset, overrides):
    cfg = TrainConfig(**{**PRESETS[preset], **overrides})
    checks = [("max_steps", cfg.max_steps >= 0), ("pretrain_steps", cfg.pretrain_steps >= 0),
              ("batch_size", cfg.batch_size >= 1), ("pretrain_batch_size", cfg.pretrain_batch_size >= 1),
              ("grad_accum", cfg.grad_accum >= 1), ("lm_train_layers", cfg.lm_train_layers >= 0),
              ("lr_vision", cfg.lr_vision >= 0), ("lr_projector", cfg.lr_projector >= 0), ("lr_lm", cfg.lr_lm >= 0),
              ("pretrain_lr", cfg.pretrain_lr >= 0), ("warmup_steps", cfg.warmup_steps >= 0),
              ("lr_decay_steps", cfg.lr_decay_steps >= 0), ("min_lr_ratio", 0 <= cfg.min_lr_ratio <= 1),
              ("weight_decay", cfg.weight_decay >= 0), ("grad_clip", cfg.grad_clip >= 0),
              ("max_bad_steps", cfg.max_bad_steps >= 1), ("eval_interval", cfg.eval_interval >= 0),
              ("eval_samples", cfg.eval_samples >= 0), ("final_eval_samples", cfg.final_eval_samples >= 0),
              ("num_workers", cfg.num_workers >= 0), ("augment_shift", cfg.augment_shift >= 0),
              ("seq_len", cfg.seq_len >= 16), ("synthetic", cfg.synthetic >= 0),
              ("proxy_layers", cfg.proxy_layers >= 1), ("proxy_width", cfg.proxy_width >= 1),
              ("mp_pixel_shuffle", cfg.mp_pixel_shuffle >= 1),
              ("vit_pos_embed", cfg.vit_pos_embed in ("sincos2d", "learned")),
              ("device", cfg.device in ("auto", "cpu", "cuda", "mps")),
              ("dtype", cfg.dtype in ("auto", "fp32", "bf16", "fp16"))]
    for name in ("type_weights", "pretrain_type_weights"):
        try:
            parse_type_weights(getattr(cfg, name))
        except ValueError:
            raise UsageError(f"--{name} {getattr(cfg, name)!r}: expected TYPE=WEIGHT,... with weights >= 0") from None
    for name, ok in checks:
        if not ok:
            raise UsageError(f"--{name} {getattr(cfg, name)!r} is out of range")
    return cfg


# ----------------------------------------------------------------------------- data

class ChatDataset(torch.utils.data.Dataset):
    """Records -> (input_ids, labels, pixel tiles, type). A sample whose image cannot be read, with
    no answer to learn or longer than seq_len is None: the collate skips and counts it.
    A key (index, position) marks a training draw: its image shift is seeded by the position in
    the sample stream, so a resumed run sees exactly the same pixels. With cache, each decoded
    sample is kept (decoding the PNGs again took a quarter of the demo's stage-1 time)."""

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
        except M.CheckpointError:  # unreadable or missing image
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


def collate(samples, pack_len=0, remap=None):
    """Right-padded rows (labels -100 on padding; attention is causal, so real tokens never see the
    padding after them and no mask is needed), or with pack_len several samples per row and
    segment ids 1, 2, .. as attention_mask: the LM then keeps attention within each sample and
    restarts its positions. remap: a token-id table (stage 1's compact vocabulary)."""
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
    words = None
    if remap is not None:
        ids, labels = remap[ids], torch.where(labels == -100, -100, remap[labels.clamp(min=0)])
        # stage 1's second target: for each image, the words of its sample's answers, sharing a
        # weight equal to the number of answer tokens (Proxy.forward: so it weighs like them)
        words = torch.zeros(len(pixels), int(remap.max()) + 1)
        tile = 0
        for _, lab, tiles, _ in good:
            answer = remap[lab[lab != -100]]
            kinds = answer[answer > 0].unique()
            words[tile:tile + len(tiles), kinds] = len(answer) / max(1, len(kinds))
            tile += len(tiles)
    return {"input_ids": ids, "labels": labels, "attention_mask": segments if pack_len else None,
            "pixel_values": torch.stack(pixels) if pixels else None, "image_words": words, "types": [s[3] for s in good],
            "skipped": len(samples) - len(good), "tokens": int(sum(len(s[0]) for s in good)),
            "supervised": int((labels[:, 1:] != -100).sum())}


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
        raise UsageError(f"type weights {text!r} give every training sample weight 0")
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


def loader(dataset, batches, num_workers, pack_len=0, remap=None):
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=lambda s: collate(s, pack_len, remap),
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator())  # its own: creating a loader must not draw from the global RNG


def load_split(data_dir, split):
    from prepare_data import load_records
    path = os.path.join(data_dir, f"{split}.jsonl")
    if not os.path.exists(path):
        return None
    try:
        records = load_records(path)
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise UsageError(f"{path}: unreadable dataset ({e})") from None
    for n, r in enumerate(records, 1):
        if not (isinstance(r.get("messages"), list) and r["messages"] and isinstance(r["messages"][-1], dict)
                and r["messages"][-1].get("role") == "assistant"):
            raise UsageError(f"{path}: record {n} does not end with an assistant message")
    return records


def load_data(cfg, is_main):
    """train/val/test records, building the synthetic set first when data_dir has none."""
    if not os.path.exists(os.path.join(cfg.data_dir, "train.jsonl")):
        if not cfg.synthetic:
            raise UsageError(f"{cfg.data_dir}: no train.jsonl (run prepare_data.py, or pass --synthetic N)")
        if is_main:
            from prepare_data import build_synthetic
            held_out = max(70, min(500, cfg.synthetic // 10))
            print(f"building {cfg.synthetic} synthetic training samples in {cfg.data_dir}")
            build_synthetic(cfg.data_dir, cfg.synthetic, held_out, held_out, seed=0, image_size=64)
        if dist.is_initialized():
            dist.barrier()  # the other processes wait for rank 0's files
    train = load_split(cfg.data_dir, "train")
    if not train:
        raise UsageError(f"{cfg.data_dir}/train.jsonl: no samples")
    val = load_split(cfg.data_dir, "val") or []
    test = load_split(cfg.data_dir, "test")
    return train, val, (test, "test") if test else (val, "val")


# ----------------------------------------------------------------------------- model

def build_model(cfg):
    """-> (vlm, processor) from --init_from, or from --vision and --lm."""
    if cfg.init_from:
        vlm, processor = M.VLM.from_pretrained(cfg.init_from), M.Processor.from_pretrained(cfg.init_from)
        processor.system_prompt = cfg.system_prompt
        return vlm, processor
    if cfg.lm in LM_SHAPES:
        tokenizer = M.load_tokenizer(cfg.tokenizer or M.default_lm_path())
        lm = M.LanguageModel(dataclasses.replace(LM_SHAPES[cfg.lm], lm_vocab=len(tokenizer)))
    else:
        path = cfg.lm or M.default_lm_path()
        tokenizer = M.load_tokenizer(cfg.tokenizer or path)
        lm = M.LanguageModel.from_pretrained(path)
    if cfg.vision == "scratch":
        vision = M.VisionTransformer(M.VisionConfig(
            vit_image_size=cfg.vit_image_size, vit_patch_size=cfg.vit_patch_size, vit_depth=cfg.vit_depth,
            vit_width=cfg.vit_width, vit_heads=cfg.vit_heads, vit_mlp_dim=cfg.vit_mlp_dim,
            vit_pos_embed=cfg.vit_pos_embed))
    else:
        vision = M.VisionTransformer.from_pretrained(cfg.vision)
    v = vision.cfg
    grid = v.vit_image_size // v.vit_patch_size
    if v.vit_image_size % v.vit_patch_size or grid % cfg.mp_pixel_shuffle or v.vit_width % v.vit_heads:
        raise UsageError(f"ViT {v.vit_image_size} px / patch {v.vit_patch_size}, width {v.vit_width} / "
                         f"{v.vit_heads} heads, pixel shuffle {cfg.mp_pixel_shuffle}: sizes do not divide")
    processor = M.Processor(tokenizer, v.vit_image_size, (grid // cfg.mp_pixel_shuffle) ** 2,
                            system_prompt=cfg.system_prompt)  # adds the image tokens to the tokenizer
    if lm.cfg.lm_vocab < len(tokenizer):
        lm.resize_vocab(len(tokenizer))
    vlm = M.VLM(M.VLMConfig(vision=v, lm=lm.cfg, mp_pixel_shuffle=cfg.mp_pixel_shuffle,
                            image_token_id=processor.image_token_id), vision=vision, lm=lm)
    # a new projector starts at the scale of the LM's word embeddings: at first the image tokens
    # look to a pretrained LM like some words, not like outliers 4x larger than any word
    w = vlm.projector.proj.weight
    with torch.no_grad():
        w.mul_(lm.tok_embed.weight.std() / (w.std() * math.sqrt(w.shape[1])))
    return vlm, processor


class Proxy(M.VLM):
    """Stage 1's model. It shares the VLM's ViT and projector (training it trains them) and puts
    two cheap losses on them in place of the 135M-parameter LM:
    - a word head: each image token is compared (cosine, learned scale) with the LM's own, frozen
      input embeddings of the training vocabulary, and an image's tokens must name the words of
      its answers (a multi-label target, as CatLIP pre-trains a ViT on the words of captions).
      The projector so learns to write image tokens that look to the LM like the words it will
      have to say, and the VLM stage starts from an aligned projector instead of a random one;
    - a tiny decoder that answers the questions from the image tokens (through a linear adapter
      to its width): questions about relations (left of, bigger than) need more than words."""

    def __init__(self, cfg, vlm, words):
        super().__init__(cfg, vision=vlm.vision, projector=vlm.projector)
        self.adapter = nn.Linear(vlm.cfg.lm.lm_hidden, cfg.lm.lm_hidden, bias=False)
        self.register_buffer("words", F.normalize(words.float(), dim=-1), persistent=False)
        self.word_scale = nn.Parameter(torch.tensor(math.log(10.0)))  # a learned temperature, as in CLIP
        self.word_logits = None

    def image_embeds(self, pixel_values):
        tokens = super().image_embeds(pixel_values)  # [images, k, LM width]
        # "some token of the image is this word": a soft maximum over the image's k tokens
        cosine = F.normalize(tokens.float(), dim=-1) @ self.words.T
        self.word_logits = torch.logsumexp(self.word_scale.exp() * cosine, dim=1)
        return self.adapter(tokens)

    def forward(self, input_ids, pixel_values=None, attention_mask=None, labels=None, image_words=None):
        logits, loss = super().forward(input_ids, pixel_values, attention_mask, labels)
        if image_words is not None and len(image_words):
            # soft-target cross-entropy, normalised like the decoder's loss (by the answer tokens),
            # so that accumulation and DDP still give exactly the gradient of one large batch
            words = F.cross_entropy(self.word_logits, image_words, reduction="sum")
            loss = loss + words / (labels[:, 1:] != -100).sum()
        return logits, loss


def build_proxy(vlm, cfg, vocab):
    """Stage 1's model (Proxy) around the VLM's ViT and projector. Its decoder knows only `vocab`,
    the token ids of the training texts (compact ids 1..n; 0 = any other token): a 49k-word output
    layer would cost more than the ViT. -> (proxy, remap), remap[token id] = compact id."""
    remap = torch.zeros(vlm.cfg.lm.lm_vocab, dtype=torch.long)
    remap[torch.tensor(vocab)] = torch.arange(1, len(vocab) + 1)
    heads = max(1, cfg.proxy_width // 64)
    lm_cfg = M.LanguageConfig(lm_hidden=cfg.proxy_width, lm_layers=cfg.proxy_layers, lm_heads=heads, lm_kv_heads=heads,
                              lm_intermediate=4 * cfg.proxy_width, lm_vocab=len(vocab) + 1, lm_max_positions=cfg.seq_len)
    embeddings = vlm.lm.tok_embed.weight.detach()
    words = torch.cat([torch.zeros_like(embeddings[:1]), embeddings[torch.tensor(vocab)]])  # compact id 0: no word
    proxy = Proxy(dataclasses.replace(vlm.cfg, lm=lm_cfg, image_token_id=int(remap[vlm.cfg.image_token_id])),
                  vlm, words)
    return proxy, remap


def proxy_vocab(dataset):
    """Token ids of the training texts: every message (batch-tokenized: fast) plus one encoded
    sample for the tokens of the chat template and the image prompt."""
    tokenizer = dataset.processor.tokenizer
    texts = [m["content"] for r in dataset.records for m in r["messages"] if isinstance(m.get("content"), str)]
    ids = {t for seq in tokenizer(texts, add_special_tokens=False)["input_ids"] for t in seq}
    sample = next((s for s in map(dataset.__getitem__, range(min(len(dataset), 16))) if s is not None), None)
    if sample is not None:
        ids |= set(sample[0].tolist())
    return sorted(ids | {dataset.processor.image_token_id})


def param_groups(parts):
    """AdamW groups: per part (name, lr, params) one for matrices (weight-decayed) and one for
    vectors (norms, biases). A part with lr 0 is frozen: no gradients, no optimizer state."""
    groups = []
    for name, lr, params in parts:
        params = list(dict.fromkeys(params))  # a tied weight once
        for p in params:
            p.requires_grad_(lr > 0)
        if lr > 0:
            groups += [{"name": f"{name}/decay", "params": [p for p in params if p.dim() >= 2], "base_lr": lr},
                       {"name": f"{name}/no_decay", "params": [p for p in params if p.dim() < 2], "base_lr": lr,
                        "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def vlm_parts(vlm, cfg):
    lm = list(vlm.lm.parameters())
    if cfg.lm_train_layers:  # the top N blocks and the final norm; the embedding (= the tied head) stays
        for p in lm:
            p.requires_grad_(False)
        lm = [p for b in vlm.lm.blocks[-cfg.lm_train_layers:] for p in b.parameters()] + list(vlm.lm.norm.parameters())
    return [("vision", cfg.lr_vision, list(vlm.vision.parameters())),
            ("projector", cfg.lr_projector, list(vlm.projector.parameters())), ("lm", cfg.lr_lm, lm)]


def lr_factor(step, warmup, total, min_ratio):
    """Linear warmup, then a cosine from 1 down to min_ratio at step `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------- checkpoints
# out_dir holds the last VLM (model.safetensors, config.json and the processor: what generate.py and
# VLM.from_pretrained read), best/ (the best evaluated VLM) and train_state.safetensors: one file,
# written atomically (temp + rename), with the trainable weights, the optimizer moments and the RNG
# states as tensors and everything else (step, data position, settings) as JSON in its header.
# Frozen weights never change within a stage, so any version of model.safetensors plus
# train_state.safetensors is exactly the saved state: a kill at any moment leaves a whole
# checkpoint. Resuming reads safetensors and JSON only; nothing is unpickled.

STATE_FILE = "train_state.safetensors"


def save_state(out_dir, model, opt, scaler, state, cfg):
    from safetensors.torch import save
    tensors = {f"param/{n}": p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    opt_state = opt.state_dict()
    for i, s in opt_state["state"].items():
        tensors.update({f"optim/{i}/{k}": v.detach().cpu() for k, v in s.items()})
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    meta = {"state": state, "config": dataclasses.asdict(cfg), "python_rng": random.getstate(),
            "param_groups": opt_state["param_groups"], "scaler": scaler.state_dict() if scaler.is_enabled() else None}
    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata={"picovlm": json.dumps(meta)})
    M.atomic_write(os.path.join(out_dir, STATE_FILE), data)


def read_state(out_dir, tensors=True):
    """-> (metadata, tensors); tensors=False reads the metadata only ({} for the tensors)."""
    from safetensors import SafetensorError, safe_open
    path = os.path.join(out_dir, STATE_FILE)
    if not os.path.exists(path):
        raise UsageError(f"--resume: no {STATE_FILE} in {out_dir} (nothing to resume)")
    try:
        with safe_open(path, "pt") as f:
            meta = json.loads(f.metadata()["picovlm"])
            tensors = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as e:
        raise UsageError(f"{path}: unreadable training state ({e})") from None
    return meta, tensors


def restore_state(meta, tensors, model, opt, scaler):
    params = dict(model.named_parameters())
    optim = {}
    for k, v in tensors.items():
        kind, _, rest = k.partition("/")
        if kind == "param":
            params[rest].data.copy_(v)
        elif kind == "optim":
            i, _, name = rest.partition("/")
            optim.setdefault(int(i), {})[name] = v
    groups = meta["param_groups"]
    for g, saved in zip(opt.param_groups, groups):
        saved["base_lr"] = g["base_lr"]  # a learning rate given on the resuming command line wins
    opt.load_state_dict({"state": optim, "param_groups": groups})
    if meta["scaler"]:
        scaler.load_state_dict(meta["scaler"])
    torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    version, internal, gauss = meta["python_rng"]
    random.setstate((version, tuple(internal), gauss))


def save_best(out_dir, vlm, processor):
    """out_dir/best, replaced as a whole: written beside it, then swapped in by two renames."""
    best, tmp, old = (os.path.join(out_dir, n) for n in ("best", ".best-tmp", ".best-old"))
    for d in (tmp, old):
        shutil.rmtree(d, ignore_errors=True)
    vlm.save_pretrained(tmp, processor=processor)
    if os.path.exists(best):
        os.rename(best, old)
    os.rename(tmp, best)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- evaluation

def normalize(text):
    """Exact match up to case, whitespace and a final period."""
    return " ".join(text.lower().split()).rstrip(".")


@torch.no_grad()
def evaluate(model, batches, device, autocast):
    """Validation loss and exact-match accuracy per type from one teacher-forced pass. Greedy
    decoding reproduces an answer iff the argmax is right at each of its tokens given the right
    ones before, so this is greedy exact match over the answer tokens, without the decoding."""
    model.eval()
    loss_sum, n_tokens, right = 0.0, 0, {}
    for b in batches:
        labels = b["labels"].to(device)
        with autocast:
            logits, loss = model(b["input_ids"].to(device), to(b["pixel_values"], device), None, labels)
        targets = labels[:, 1:]
        keep = targets != -100
        wrong = torch.zeros(len(labels), device=device).index_add_(
            0, keep.nonzero()[:, 0], (logits.argmax(-1) != targets[keep]).float())
        loss_sum, n_tokens = loss_sum + loss.item() * int(keep.sum()), n_tokens + int(keep.sum())
        for t, w in zip(b["types"], wrong.tolist()):
            right.setdefault(t, []).append(w == 0)
    model.train()
    per_type = {t: sum(v) / len(v) for t, v in sorted(right.items())}
    return {"val_loss": loss_sum / max(1, n_tokens), "accuracy": mean(per_type.values()), "per_type": per_type}


@torch.no_grad()
def final_evaluation(vlm, processor, records, device, autocast, batch_size=64):
    """Greedy-decode the answer to each record's last question and compare it with the reference
    (normalize()). -> accuracy (the mean over types, each type counting the same), per type."""
    vlm.eval()
    tok, stop = processor.tokenizer, processor.stop_ids
    # the same questions in one batch: a batch decodes until its longest answer is done, so long
    # answers (captions) are best kept together (the demo's test split: 35 s instead of 63 s)
    records = sorted(records, key=lambda r: str(r["messages"][:-1]))
    max_new = max(len(tok.encode(r["messages"][-1]["content"], add_special_tokens=False)) for r in records) + 2
    right, unreadable = {}, 0
    for i in range(0, len(records), batch_size):
        prompts, images, kept = [], [], []
        for r in records[i:i + batch_size]:
            try:
                imgs = [M.load_image(p) for p in r["images"]]
            except M.CheckpointError:
                unreadable += 1
                continue
            prompts.append(processor.chat_prompt(r["messages"][:-1], len(imgs)))
            images.append(imgs)
            kept.append(r)
        if not kept:
            continue
        batch = processor(prompts, images)
        # compiled blocks run eagerly here: compiling the cached decoding path (new shapes for the
        # prefill and the one-token steps) costs more than it saves in one pass over the test split
        with autocast, torch.compiler.set_stance("force_eager"):
            out = vlm.generate(batch["input_ids"].to(device), to(batch["pixel_values"], device),
                               batch["attention_mask"].to(device), max_new_tokens=max_new, eos_token_id=stop)
        for r, ids in zip(kept, out.tolist()):
            answer = tok.decode([t for t in ids if t not in stop], skip_special_tokens=True)
            right.setdefault(r.get("type", ""), []).append(normalize(answer) == normalize(r["messages"][-1]["content"]))
    per_type = {t: sum(v) / len(v) for t, v in sorted(right.items())}
    return {"accuracy": mean(per_type.values()), "per_type": per_type, "n": sum(map(len, right.values())),
            "unreadable_images": unreadable}


def mean(values):
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def to(x, device):
    return None if x is None else x.to(device, non_blocking=True)


def plot(log_path, png_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in open(log_path)]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    # stage, colour, labels of its training loss, validation loss and accuracy curves
    for stage, color, train_label, val_label, acc_label in (
            ("pretrain", "tab:gray", "pretrain: train (decoder + word head)", "pretrain: val (decoder)", "proxy decoder"),
            ("vlm", "tab:blue", "vlm: train", "vlm: val", "VLM")):
        r = [x for x in rows if x["stage"] == stage and "loss" in x]
        e = [x for x in r if "val_loss" in x]
        if not r:
            continue
        a.plot([x["step"] for x in r], [x["loss"] for x in r], color=color, lw=0.8, label=train_label)
        a.plot([x["step"] for x in e], [x["val_loss"] for x in e], "o-", color=color, ms=3, label=val_label)
        b.plot([x["step"] for x in e], [x["accuracy"] for x in e], "o-", color=color, ms=3, label=acc_label)
    a.set(xlabel="step", ylabel="loss on answer tokens", yscale="log")
    b.set(xlabel="step", ylabel="held-out exact match (mean over types)", ylim=(0, 1.02))
    a.legend(fontsize=8)
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path + ".tmp.png", dpi=110)
    plt.close(fig)
    os.replace(png_path + ".tmp.png", png_path)


# ----------------------------------------------------------------------------- the loop

def pick_device(name, local_rank):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU here")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: MPS is not available here")
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)


def pick_dtype(name, device):
    if name != "auto":
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_bf16_is_faster() else torch.float32


def cpu_bf16_is_faster():
    """CPUs without bf16 instructions (AVX2 only) run bf16 matmuls ~10x slower than fp32, ones with
    AVX512-BF16 or AMX faster: time one of each and pick."""
    a, b = torch.randn(256, 512), torch.randn(512, 512)

    def timed(x, y):
        x @ y
        t = time.perf_counter()
        for _ in range(3):
            x @ y
        return time.perf_counter() - t
    return timed(a.bfloat16(), b.bfloat16()) < timed(a, b)


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "B200": 2250e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
                   "A10": 125e12, "4090": 165e12}


class Run:
    """What every stage needs: settings, processes, device, precision, logging, Ctrl-C."""

    def __init__(self, cfg):
        self.cfg, self.t0 = cfg, time.time()
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        self.main = self.rank == 0
        self.device = pick_device(cfg.device, local_rank)
        if self.world > 1:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            if self.device.type == "cpu":  # the processes share the cores
                per_node = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_node))
        self.dtype = pick_dtype(cfg.dtype, self.device)
        self.autocast = (torch.autocast(self.device.type, dtype=self.dtype) if self.dtype != torch.float32
                         else nullcontext())
        self.log_path = os.path.join(cfg.out_dir, "log.jsonl")
        self.stop_requested, self.wandb, self.resume = False, None, None
        peak = self.device.type == "cuda" and next(
            (v for k, v in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name(self.device)), None)
        self.peak_flops = peak or None

    def log(self, record):
        if self.main:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.wandb:
                self.wandb.log(record, step=record["step"])

    def on_sigint(self, *_):
        """Ctrl-C: finish the step, save a checkpoint, exit. A second Ctrl-C stops at once."""
        self.stop_requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def any(self, *flags):
        """Each flag ORed over all processes, so that all skip or stop at the same step."""
        t = torch.tensor([float(f) for f in flags], device=self.device)
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(x) for x in t.tolist()]


def train_stage(run, stage, model, groups, dataset, steps, batch_size, accum, state, remap, evaluate_fn, save):
    """One stage: `steps` optimizer steps of `accum` micro-batches each, from state["step"] and
    data position state["samples"] on. The loss is each micro-batch's mean over its answer tokens
    weighted by its share of the whole step's answer tokens on all processes, so accumulation and
    DDP give exactly the gradient of one big batch."""
    cfg, device = run.cfg, run.device
    opt = torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.95), weight_decay=cfg.weight_decay,
                            fused=device.type in ("cuda", "cpu"))
    scaler = torch.amp.GradScaler(device.type, enabled=run.dtype == torch.float16)  # fp16 needs loss scaling
    if run.resume and run.resume[0]["state"]["stage"] == stage:
        restore_state(*run.resume, model, opt, scaler)
        run.resume = None
    ddp = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
           if run.world > 1 else model)
    params = [p for g in groups for p in g["params"]]
    decay_steps = (cfg.lr_decay_steps or steps) if stage == "vlm" else steps
    weights = sample_weights(dataset.records, cfg.type_weights if stage == "vlm" else cfg.pretrain_type_weights)
    batches = MicroBatches(len(dataset), batch_size, accum, run.rank, run.world, cfg.seed, state["samples"], weights)
    data = iter(loader(dataset, batches, cfg.num_workers, cfg.seq_len if cfg.packing else 0, remap))
    flops_per_token = 6 * sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)
    bar = None
    if run.main:
        from tqdm import tqdm
        bar = tqdm(total=steps, initial=state["step"], desc=stage, unit="step", dynamic_ncols=True)
    bad_in_a_row = 0
    while state["step"] < steps:
        t = time.time()
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(state["step"], cfg.warmup_steps, decay_steps, cfg.min_lr_ratio)
        micro = [next(data) for _ in range(accum)]
        counts = torch.tensor([[float(b["supervised"]), float(b["tokens"]), float(b["skipped"])] for b in micro])
        total = counts.sum(0).to(device)
        if run.world > 1:
            dist.all_reduce(total)
        n_supervised, tokens, skipped = total.tolist()
        loss_sum, bad = torch.zeros((), device=device), False
        for k, b in enumerate(micro):
            sync = ddp.no_sync() if run.world > 1 and k < accum - 1 else nullcontext()  # all-reduce once a step
            with sync:
                if b["supervised"]:
                    with run.autocast:
                        extra = {"image_words": b["image_words"].to(device)} if b["image_words"] is not None else {}
                        _, loss = ddp(b["input_ids"].to(device, non_blocking=True), to(b["pixel_values"], device),
                                      to(b["attention_mask"], device), b["labels"].to(device, non_blocking=True), **extra)
                    loss = loss * (b["supervised"] / n_supervised)
                else:  # nothing usable in this micro-batch: a zero loss keeps DDP's all-reduce in step
                    loss = sum(p.sum() for p in params) * 0.0
                bad |= not torch.isfinite(loss).item()
                scaler.scale(loss * run.world).backward()  # DDP averages the processes' gradients: undo that
            loss_sum += loss.detach()
        if run.world > 1:
            dist.all_reduce(loss_sum)
        bad, stop = run.any(bad, run.stop_requested)
        record = {"step": state["offset"] + state["step"] + 1, "stage": stage, "loss": loss_sum.item(),
                  "lr": opt.param_groups[0]["lr"]}
        if bad:  # NaN/inf somewhere: every process drops this step's update
            opt.zero_grad(set_to_none=True)
            state["bad_steps"] += 1
            bad_in_a_row += 1
            record["skipped_step"] = True
            if bad_in_a_row >= cfg.max_bad_steps:
                raise TrainingError(f"the loss was NaN/inf {bad_in_a_row} steps in a row ({stage} step "
                                    f"{state['step'] + 1}); lower the learning rates or check the data "
                                    f"(the last checkpoint is in {cfg.out_dir})")
        else:
            bad_in_a_row = 0
            scaler.unscale_(opt)
            record["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf")).item()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
        state["step"] += 1
        state["samples"] += batch_size * accum * run.world
        state["skipped"] += int(skipped)
        dt = time.time() - t
        record.update(tokens_per_s=round(tokens / dt), time_s=round(time.time() - run.t0, 2))
        postfix = {"loss": f"{record['loss']:.3f}", "tok/s": f"{tokens / dt:.0f}"}
        if run.peak_flops:
            record["mfu"] = flops_per_token * tokens / run.world / dt / run.peak_flops
            postfix["mfu"] = f"{record['mfu']:.1%}"
        if (cfg.eval_interval and state["step"] % cfg.eval_interval == 0) or state["step"] == steps or stop:
            if run.main and (not stop or state["step"] == steps):
                record.update(evaluate_fn())
                postfix["val"] = f"{record['accuracy']:.0%}"
            save(model, opt, scaler, record)
        run.log(record)
        if bar:
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
        if stop:
            if bar:
                bar.close()
            raise Interrupted(f"interrupted: checkpoint saved at {stage} step {state['step']} in {cfg.out_dir}/ "
                              f"(continue with --resume)")
    if bar:
        bar.close()


def main(argv=None):
    sigint = signal.getsignal(signal.SIGINT)
    try:
        preset, explicit = parse_args(sys.argv[1:] if argv is None else argv)
        return train(make_config(preset, explicit), explicit)
    except (UsageError, M.CheckpointError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"\n{e}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, sigint)
        if dist.is_initialized():
            dist.destroy_process_group()


def train(cfg, explicit):
    resume = None
    if cfg.resume:  # the saved run's settings, except for the flags given now
        resume = read_state(cfg.out_dir)
        cfg = make_config("default", {**resume[0]["config"], **explicit, "resume": True})
    run = Run(cfg)
    run.resume = resume
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    state = {"stage": "pretrain" if cfg.pretrain_steps else "vlm", "step": 0, "samples": 0, "offset": 0,
             "skipped": 0, "bad_steps": 0, "best": -1.0, "wall_s": 0.0}
    if run.main:
        os.makedirs(cfg.out_dir, exist_ok=True)
        if resume:  # the steps after the checkpoint will be done again: forget their log lines
            state = resume[0]["state"]
            done = state["offset"] + state["step"]
            lines = open(run.log_path).readlines() if os.path.exists(run.log_path) else []
            M.atomic_write(run.log_path, "".join(x for x in lines if json.loads(x)["step"] <= done))
        else:  # a new run here: the files of an older one must not be mistaken for this one's
            for name in (STATE_FILE, "log.jsonl", "final_eval.json", "loss.png"):
                if os.path.exists(os.path.join(cfg.out_dir, name)):
                    os.remove(os.path.join(cfg.out_dir, name))
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise UsageError("--wandb needs the wandb package: pip install wandb") from None
            run.wandb = wandb.init(project=cfg.wandb_project, config=dataclasses.asdict(cfg))
    elif resume:
        state = resume[0]["state"]
    signal.signal(signal.SIGINT, run.on_sigint)

    train_records, val_records, (test_records, test_split) = load_data(cfg, run.main)
    if resume and state["stage"] in ("vlm", "done") and os.path.exists(os.path.join(cfg.out_dir, "config.json")):
        vlm, processor = M.VLM.from_pretrained(cfg.out_dir), M.Processor.from_pretrained(cfg.out_dir)
    else:  # (a run that resumes inside stage 1 rebuilds the VLM it started from: same seed, same weights)
        vlm, processor = build_model(cfg)
    vlm.to(run.device)
    train_set = ChatDataset(train_records, processor, cfg.seq_len, cfg.augment_shift, cfg.seed, cfg.cache_data)
    val_set = ChatDataset(val_records[:cfg.eval_samples], processor, cfg.seq_len)
    val_chunks = [list(range(i, min(i + 32, len(val_set)))) for i in range(0, len(val_set), 32)]
    if run.main:
        size = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
        print(f"picoVLM: ViT {size(vlm.vision):.2f}M + projector {size(vlm.projector):.2f}M + LM {size(vlm.lm):.1f}M "
              f"parameters, {vlm.cfg.image_tokens} LM tokens an image; {len(train_set)} training samples; "
              f"{run.device} {str(run.dtype).replace('torch.', '')}, {run.world} process(es)")
    compile_blocks = cfg.compile and run.device.type == "cuda"
    if compile_blocks:  # block by block: the VLM's gather of the answer positions has data-dependent shapes
        for block in [*vlm.vision.blocks, *vlm.lm.blocks]:
            block.compile(dynamic=True)

    def save(model, opt, scaler, record):
        if run.main:
            saved = {**state, "wall_s": state["wall_s"] + time.time() - run.t0}
            save_state(cfg.out_dir, model, opt, scaler, saved, cfg)

    if state["stage"] == "pretrain":
        proxy, remap = build_proxy(vlm, cfg, proxy_vocab(train_set))
        proxy.to(run.device)
        if compile_blocks:
            for block in proxy.lm.blocks:
                block.compile(dynamic=True)
        val_batches = list(loader(val_set, val_chunks, 0, 0, remap))
        train_stage(run, "pretrain", proxy, param_groups([("proxy", cfg.pretrain_lr, list(proxy.parameters()))]),
                    train_set, cfg.pretrain_steps, cfg.pretrain_batch_size, 1, state, remap,
                    lambda: evaluate(proxy, val_batches, run.device, run.autocast), save)
        state.update(stage="vlm", step=0, samples=0, offset=cfg.pretrain_steps)
        del proxy
    if state["stage"] == "vlm":
        if state["step"] == 0 and run.main:  # this stage's frozen weights, and the processor
            vlm.save_pretrained(cfg.out_dir, processor=processor)
        val_batches = list(loader(val_set, val_chunks, 0))

        def save_vlm(model, opt, scaler, record):
            if run.main:
                model.save_pretrained(cfg.out_dir)
                if record.get("accuracy", -1) > state["best"]:
                    state["best"] = record["accuracy"]
                    save_best(cfg.out_dir, model, processor)
            save(model, opt, scaler, record)
        groups = param_groups(vlm_parts(vlm, cfg))
        if not groups and cfg.max_steps:
            raise UsageError("the learning rates of the VLM stage are all 0: nothing to train")
        train_stage(run, "vlm", vlm, groups, train_set, cfg.max_steps, cfg.batch_size, cfg.grad_accum, state, None,
                    lambda: evaluate(vlm, val_batches, run.device, run.autocast), save_vlm)
        state["stage"] = "done"

    if not run.main:
        return 0
    if os.path.exists(run.log_path) and os.path.getsize(run.log_path):
        plot(run.log_path, os.path.join(cfg.out_dir, "loss.png"))
    summary = (f"skipped {state['skipped']} unusable samples and {state['bad_steps']} NaN/inf steps; "
               f"the model is in {cfg.out_dir}/")
    if cfg.final_eval and test_records:
        result = final_evaluation(vlm, processor, test_records[:cfg.final_eval_samples or None], run.device,
                                  run.autocast)
        result.update(split=test_split, skipped_samples=state["skipped"], skipped_steps=state["bad_steps"],
                      wall_s=round(state["wall_s"] + time.time() - run.t0, 1))
        M.atomic_write(os.path.join(cfg.out_dir, "final_eval.json"), json.dumps(result, indent=2))
        print(f"held-out exact match {result['accuracy']:.1%} ({result['n']} {test_split} samples): "
              + ", ".join(f"{t} {a:.0%}" for t, a in result["per_type"].items()))
    print(f"done in {state['wall_s'] + time.time() - run.t0:.0f} s; {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
