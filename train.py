"""Train a picoVLM: a plain PyTorch loop, read top to bottom.

  python train.py                                  # the offline demo: synthetic data, SmolLM2-135M + a ViT
  python train.py --config tiny --max_steps 20     # a seconds-long smoke run
  python train.py --data data/coco --lm HuggingFaceTB/SmolLM2-135M-Instruct --vision google/siglip-base-patch16-224
  torchrun --nproc_per_node=8 train.py --config nanovlm-222m --data data/cauldron   # DDP, one process per GPU

Every TrainConfig field is a flag (--field value; booleans also --field / --field false).
Writes <out_dir>/: the model (config.json, model.safetensors, tokenizer, processor.json) loadable by
generate.py, last/ (model + optimizer state for --resume), best/, log.jsonl, final_eval.json, curves.png.
"""
import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from collections import Counter, defaultdict
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import model as M


@dataclass
class TrainConfig:
    config: str = "demo"          # a preset below; explicit flags override it
    data: str = "data/synthetic"  # a prepare_data.py directory (train.jsonl, val.jsonl, test.jsonl)
    out_dir: str = "out"
    vision: str = ""              # SigLIP dir or hub id; empty: a ViT from scratch
    lm: str = ""                  # LM dir, hub id or .gguf; empty: the offline SmolLM2-135M-Instruct
    init_from: str = ""           # a picoVLM / SmolVLM checkpoint to fine-tune (replaces vision/lm)
    # model shape when built from scratch
    image_size: int = 64
    patch_size: int = 8
    vit_depth: int = 6
    vit_width: int = 256
    vit_heads: int = 4
    vit_mlp_dim: int = 1024
    vit_pos_embed: str = "sincos2d"
    pixel_shuffle: int = 2
    tiny_lm: bool = False         # a 2-layer random LM (tests) instead of a pretrained one
    # optimisation
    max_steps: int = 400
    batch_size: int = 32          # per process and micro-step
    grad_accum: int = 1
    lr_vision: float = 2e-3
    lr_projector: float = 2e-3
    lr_lm: float = 0.0            # 0 freezes the part (no gradients, no optimizer state)
    warmup_steps: int = 40
    min_lr_ratio: float = 0.1     # cosine decays to this fraction of each learning rate
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    system_prompt: str = ""       # "" keeps prompts short (SmolLM2's default one is ~20 tokens); kept in processor.json
    pack: bool = False            # pack samples into rows of max_len tokens (attention kept per sample)
    max_len: int = 256
    # runtime
    device: str = "auto"          # auto: cuda > mps > cpu
    dtype: str = "auto"           # auto: bf16 where supported (GPU, AMX CPU), else fp16 on GPU / fp32
    compile: str = "auto"         # auto: on for CUDA
    workers: int = 2
    seed: int = 0
    eval_every: int = 200
    eval_samples: int = 350       # held-out samples for the exact-match accuracy
    save_every: int = 200
    max_bad_steps: int = 5        # stop after this many non-finite losses in a row
    resume: bool = False
    wandb: bool = False


PRESETS = {
    "demo": {},
    "tiny": dict(image_size=32, patch_size=8, vit_depth=2, vit_width=32, vit_heads=2, vit_mlp_dim=64, tiny_lm=True,
                 batch_size=4, max_steps=20, warmup_steps=2, eval_every=10, eval_samples=8, save_every=10, workers=0,
                 lr_lm=1e-3),
    "nanovlm-222m": dict(image_size=224, patch_size=16, vit_depth=12, vit_width=768, vit_heads=12, vit_mlp_dim=3072,
                         vit_pos_embed="learned", lr_vision=5e-5, lr_projector=1e-3, lr_lm=5e-5, batch_size=16,
                         max_steps=5000, warmup_steps=200, eval_every=500, save_every=500, max_len=512),
    "smolvlm-256m": dict(image_size=512, patch_size=16, vit_depth=12, vit_width=768, vit_heads=12, vit_mlp_dim=3072,
                         vit_pos_embed="learned", pixel_shuffle=4, lr_vision=5e-5, lr_projector=1e-3, lr_lm=5e-5,
                         batch_size=8, max_steps=5000, warmup_steps=200, eval_every=500, save_every=500, max_len=1024),
}


class UsageError(Exception):
    """Bad input: one line on stderr, exit status 2."""


def parse_args(argv):
    """TrainConfig from --config PRESET plus --field value flags (explicit flags win)."""
    def boolean(s):
        if s.lower() in ("1", "true", "yes", "on"):
            return True
        if s.lower() in ("0", "false", "no", "off"):
            return False
        raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        if f.type is bool or f.type == "bool":
            p.add_argument(f"--{f.name}", type=boolean, nargs="?", const=True, default=None)
        else:
            p.add_argument(f"--{f.name}", type=type(f.default), default=None, help=f"default {f.default!r}")
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    preset = args.get("config", "demo")
    if preset not in PRESETS:
        raise UsageError(f"--config {preset}: unknown preset (choose from {', '.join(PRESETS)})")
    return TrainConfig(**{**PRESETS[preset], **args})


# ----------------------------------------------------------------------------- data

class ChatDataset(torch.utils.data.Dataset):
    """prepare_data.py records -> (input_ids, labels, pixel tiles); None for an unreadable image."""

    def __init__(self, records, processor):
        self.records, self.processor = records, processor

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        r = self.records[i]
        try:
            ids, labels, pixels = self.processor.encode_chat(r["messages"], r["images"])
        except M.CheckpointError:  # a corrupt or missing image: skipped and counted by the loop
            return None
        return ids, labels, pixels


def read_split(path):
    from prepare_data import load_records
    if not os.path.exists(path):
        raise UsageError(f"{path}: missing (run python prepare_data.py, or pass --data DIR)")
    try:
        records = load_records(path)
    except (json.JSONDecodeError, KeyError) as e:
        raise UsageError(f"{path}: not a prepare_data.py jsonl ({e})") from None
    if not records:
        raise UsageError(f"{path}: no records")
    return records


def collate(samples, pack=False, max_len=256):
    """Right-padded rows (attention_mask 1/0), or packed rows where attention_mask holds the sample
    number (1, 2, ...) so samples never attend to each other and positions restart per sample."""
    good = [s for s in samples if s is not None]
    rows = [[]]
    for s in good:
        if pack and rows[-1] and sum(len(x[0]) for x in rows[-1]) + len(s[0]) > max_len:
            rows.append([])
        rows[-1].append(s)
        if not pack:
            rows.append([])
    rows = [r for r in rows if r]
    T = max(sum(len(x[0]) for x in r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    labels = torch.full((len(rows), T), -100)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, row in enumerate(rows):
        t = 0
        for k, (i, l, _) in enumerate(row):
            ids[b, t:t + len(i)], labels[b, t:t + len(i)], mask[b, t:t + len(i)] = i, l, k + 1
            t += len(i)
    pixels = [p for s in good for p in s[2]]
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "pixel_values": torch.stack(pixels) if pixels else None, "skipped": len(samples) - len(good)}


class StepSampler(torch.utils.data.Sampler):
    """Batches of sample indices from a seeded permutation per epoch, starting at any global step:
    the data position is just the step number, so --resume continues with the exact next batch.
    Each DDP rank takes its own slice of every global batch."""

    def __init__(self, n, batch, rank, world, seed, start_step, steps):
        self.n, self.batch, self.rank, self.world, self.seed = n, batch, rank, world, seed
        self.start, self.steps = start_step, steps

    def __iter__(self):
        per_epoch = self.n // (self.batch * self.world)
        if per_epoch == 0:
            raise UsageError(f"the dataset has {self.n} samples, fewer than one global batch")
        for step in range(self.start, self.steps):
            epoch, k = divmod(step, per_epoch)
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
            start = (k * self.world + self.rank) * self.batch
            yield order[start:start + self.batch].tolist()

    def __len__(self):
        return self.steps - self.start


# ----------------------------------------------------------------------------- model

def build(cfg: TrainConfig):
    """-> (vlm, processor): a checkpoint to fine-tune, or a ViT (SigLIP or from scratch) + an LM."""
    if cfg.init_from:
        return M.VLM.from_pretrained(cfg.init_from), M.Processor.from_pretrained(cfg.init_from)
    lm_path = cfg.lm or M.default_lm_path()
    tokenizer = M.load_tokenizer(lm_path)
    if cfg.tiny_lm:
        lm = M.LanguageModel(M.LanguageConfig(lm_hidden=64, lm_layers=2, lm_heads=4, lm_kv_heads=2,
                                              lm_intermediate=128, lm_vocab=len(tokenizer), lm_max_positions=1024))
    else:
        lm = M.LanguageModel.from_pretrained(lm_path)
    if cfg.vision:
        vision = M.VisionTransformer.from_pretrained(cfg.vision)
    else:
        vision = M.VisionTransformer(M.VisionConfig(
            vit_image_size=cfg.image_size, vit_patch_size=cfg.patch_size, vit_depth=cfg.vit_depth,
            vit_width=cfg.vit_width, vit_heads=cfg.vit_heads, vit_mlp_dim=cfg.vit_mlp_dim,
            vit_pos_embed=cfg.vit_pos_embed))
    v = vision.cfg
    tokens = (v.vit_image_size // v.vit_patch_size) ** 2 // cfg.pixel_shuffle ** 2
    processor = M.Processor(tokenizer, v.vit_image_size, tokens, system_prompt=cfg.system_prompt)  # + image tokens
    lm.resize_vocab(len(tokenizer))
    vlm_cfg = M.VLMConfig(vision=v, lm=lm.cfg, mp_pixel_shuffle=cfg.pixel_shuffle,
                          image_token_id=processor.image_token_id)
    return M.VLM(vlm_cfg, vision=vision, lm=lm), processor


def optimizer_for(vlm, cfg, device):
    """AdamW with one learning rate per part; a part with lr 0 is frozen. No weight decay on
    norms, biases and position tables (1-D or table-like parameters that should not shrink)."""
    groups = []
    for part, lr in (("vision", cfg.lr_vision), ("projector", cfg.lr_projector), ("lm", cfg.lr_lm)):
        params = list(getattr(vlm, part).parameters())
        for p in params:
            p.requires_grad_(lr > 0)
        if lr > 0:
            decay = [p for p in params if p.dim() >= 2]
            groups += [{"params": decay, "lr": lr, "base_lr": lr, "weight_decay": cfg.weight_decay, "part": part},
                       {"params": [p for p in params if p.dim() < 2], "lr": lr, "base_lr": lr, "weight_decay": 0.0,
                        "part": part}]
    if not groups:
        raise UsageError("all learning rates are 0: nothing to train")
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), fused=device.type == "cuda")


def lr_factor(step, cfg):
    """Linear warmup, then cosine decay to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(vlm, processor, records, cfg, device, amp):
    """Validation loss and greedy exact-match accuracy per question type."""
    vlm.eval()
    data = ChatDataset(records, processor)
    losses, hits, counts = [], Counter(), Counter()
    for i in range(0, len(records), cfg.batch_size):
        chunk = records[i:i + cfg.batch_size]
        batch = collate([data[j] for j in range(i, i + len(chunk))])
        with amp:
            _, loss = vlm(**to(batch, device))
        losses.append(loss.item())
        prompts = [processor.chat_prompt(r["messages"][:1], len(r["images"])) for r in chunk]
        try:
            inputs = to(processor(prompts, [r["images"] for r in chunk]), device)
        except M.CheckpointError:
            continue
        with amp:
            out = vlm.generate(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"],
                               max_new_tokens=24, eos_token_id=processor.stop_ids)
        for r, ids in zip(chunk, out):
            answer = processor.tokenizer.decode(ids, skip_special_tokens=True).strip()
            counts[r.get("type", "all")] += 1
            hits[r.get("type", "all")] += answer == r["messages"][1]["content"].strip()
    vlm.train()
    per_type = {t: hits[t] / counts[t] for t in sorted(counts)}
    return {"val_loss": sum(losses) / max(len(losses), 1),
            "accuracy": sum(hits.values()) / max(sum(counts.values()), 1), "per_type": per_type}


def to(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, vlm, processor, optimizer, step, extra):
    """Model + optimizer + step + RNG states into `path`, atomically: written to a temporary folder,
    then swapped in, so a kill at any moment leaves the previous checkpoint whole."""
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    vlm.save_pretrained(tmp, processor=processor)
    if optimizer is not None:
        state = {"optimizer": optimizer.state_dict(), "step": step, "torch_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [], **extra}
        torch.save(state, os.path.join(tmp, "train_state.pt"))
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path):
    if not os.path.isdir(path) and os.path.isdir(path + ".old"):  # killed between the two renames
        path = path + ".old"
    if not os.path.exists(os.path.join(path, "train_state.pt")):
        raise UsageError(f"{path}: no checkpoint to resume from (train without --resume first)")
    # weights_only: plain tensors and containers, never arbitrary pickled objects
    return M.VLM.from_pretrained(path), torch.load(os.path.join(path, "train_state.pt"), weights_only=True)


# ----------------------------------------------------------------------------- the loop

def pick_device(name):
    if name != "auto":
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA GPU here")
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps" if torch.backends.mps.is_available() else "cpu")


def pick_dtype(name, device):
    if name != "auto":
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # on CPUs bf16 pays off only with AMX matrix units (Sapphire Rapids and later)
    amx = device.type == "cpu" and getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return torch.bfloat16 if amx else torch.float32


def main(argv=None):
    t_start = time.time()
    cfg = parse_args(argv)
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = pick_device(cfg.device)
    if ddp:  # torchrun: one process per GPU (NCCL), or per CPU worker (gloo)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
    else:
        rank, world = 0, 1
    master = rank == 0
    dtype = pick_dtype(cfg.dtype, device)
    use_compile = device.type == "cuda" if cfg.compile == "auto" else cfg.compile.lower() in ("1", "true", "on", "yes")
    torch.manual_seed(cfg.seed)  # every rank builds the same initial model

    train_path, val_path, test_path = (os.path.join(cfg.data, f"{s}.jsonl") for s in ("train", "val", "test"))
    if not os.path.exists(train_path) and cfg.data == TrainConfig.data:  # the embedded default
        if master:
            from prepare_data import build_synthetic
            build_synthetic(cfg.data)
        if ddp:
            dist.barrier()

    vlm, processor = build(cfg)
    last, start_step, state = os.path.join(cfg.out_dir, "last"), 0, None
    if cfg.resume:
        vlm, state = load_checkpoint(last)
        processor = M.Processor.from_pretrained(last if os.path.isdir(last) else last + ".old")
        start_step = state["step"]
    vlm.to(device).train()
    optimizer = optimizer_for(vlm, cfg, device)
    if state:
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 needs loss scaling
    amp = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    model = DDP(vlm, device_ids=[device.index] if device.type == "cuda" else None) if ddp else vlm
    if use_compile:
        model = torch.compile(model)  # after DDP, so DDP's bucketing sees the compiled graph's gradients

    train_set = ChatDataset(read_split(train_path), processor)
    sampler = StepSampler(len(train_set), cfg.batch_size, rank, world, cfg.seed,
                          start_step * cfg.grad_accum, cfg.max_steps * cfg.grad_accum)
    loader = torch.utils.data.DataLoader(
        train_set, batch_sampler=sampler, num_workers=cfg.workers, pin_memory=device.type == "cuda",
        collate_fn=lambda s: collate(s, cfg.pack, cfg.max_len))
    val_records = read_split(val_path)[:cfg.eval_samples] if os.path.exists(val_path) else []

    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        n_params = sum(p.numel() for p in vlm.parameters())
        n_train = sum(p.numel() for p in vlm.parameters() if p.requires_grad)
        print(f"picoVLM {n_params / 1e6:.1f}M parameters ({n_train / 1e6:.1f}M trained) on {device} {dtype}, "
              f"{world} process(es), compile={use_compile}, {len(train_set)} training samples")
        if cfg.wandb:
            import wandb
            wandb.init(project="picovlm", config=dataclasses.asdict(cfg))
    log = open(os.path.join(cfg.out_dir, "log.jsonl"), "a" if cfg.resume else "w") if master else None
    best = state.get("best_accuracy", -1.0) if state else -1.0
    bad_in_row, skipped_images, history = 0, 0, []
    batches = iter(loader)
    bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps, disable=not master,
               desc="train")
    step = start_step
    try:
        for step in bar:
            t0 = time.time()
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_factor(step, cfg)
            micro = [next(batches) for _ in range(cfg.grad_accum)]
            skipped_images += sum(b["skipped"] for b in micro)
            # normalise by the supervised tokens of the whole optimizer step on all ranks: then
            # accumulation and DDP give exactly the gradient of one big batch
            counts = torch.tensor([float((b["labels"][:, 1:] != -100).sum()) for b in micro], device=device)
            total = counts.sum()
            if ddp:
                dist.all_reduce(total)
            loss_sum = torch.zeros((), device=device)
            for i, batch in enumerate(micro):
                if counts[i] == 0:
                    continue
                sync = model.no_sync() if ddp and i < len(micro) - 1 else nullcontext()  # sync once per step
                with sync:
                    with amp:
                        _, loss = model(**to(batch, device))
                    weighted = loss.float() * counts[i] / total
                    scaler.scale(weighted * world).backward()  # DDP averages over ranks: undo that
                loss_sum += weighted.detach()
            if ddp:
                dist.all_reduce(loss_sum)
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(vlm.parameters(), cfg.grad_clip)
            # a non-finite loss, or (without fp16's GradScaler, which skips those itself) non-finite gradients
            if not torch.isfinite(loss_sum) or (not scaler.is_enabled() and not torch.isfinite(grad_norm)):
                optimizer.zero_grad(set_to_none=True)
                scaler.update()  # fp16: closes this step's unscale_ and lowers the loss scale
                bad_in_row += 1
                if master:
                    tqdm.write(f"step {step}: non-finite loss or gradients, step skipped ({bad_in_row} in a row)")
                if bad_in_row >= cfg.max_bad_steps:
                    raise UsageError(f"{bad_in_row} non-finite losses in a row at step {step}: "
                                     "lower the learning rates or use --dtype fp32")
                continue
            bad_in_row = 0
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

            dt = time.time() - t0
            tokens = sum(int(b["attention_mask"].ne(0).sum()) for b in micro) * world
            record = {"step": step + 1, "loss": round(loss_sum.item(), 5), "lr": optimizer.param_groups[0]["lr"],
                      "grad_norm": round(float(grad_norm), 4), "tokens_per_s": round(tokens / dt, 1),
                      "skipped_images": skipped_images}
            if device.type == "cuda":  # 6 FLOPs per parameter and token (forward + backward)
                peak = 989e12 if "H100" in torch.cuda.get_device_name() or "H200" in torch.cuda.get_device_name() else 312e12
                record["mfu"] = round(6 * n_params * tokens / world / dt / peak, 4)
            if master:
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                **({"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {}))
                if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and val_records:
                    record.update(evaluate(vlm, processor, val_records, cfg, device, amp))
                    tqdm.write(f"step {step + 1}: val loss {record['val_loss']:.4f}, accuracy {record['accuracy']:.3f} "
                               + " ".join(f"{t}={a:.2f}" for t, a in record["per_type"].items()))
                    if record["accuracy"] > best:
                        best = record["accuracy"]
                        save_checkpoint(os.path.join(cfg.out_dir, "best"), vlm, processor, None, step + 1, {})
                if (step + 1) % cfg.save_every == 0:
                    save_checkpoint(last, vlm, processor, optimizer, step + 1, {"best_accuracy": best})
                log.write(json.dumps(record) + "\n")
                log.flush()
                history.append(record)
                if cfg.wandb:
                    wandb.log(record, step=step + 1)
        step = cfg.max_steps
    except KeyboardInterrupt:
        if master:
            save_checkpoint(last, vlm, processor, optimizer, step, {"best_accuracy": best})
            vlm.save_pretrained(cfg.out_dir, processor=processor)
            print(f"\ninterrupted at step {step}: checkpoint saved to {last} (continue with --resume)")
        sys.exit(130)

    if master:
        save_checkpoint(last, vlm, processor, optimizer, step, {"best_accuracy": best})
        vlm.save_pretrained(cfg.out_dir, processor=processor)  # what generate.py --model out loads
        eval_records = read_split(test_path)[:cfg.eval_samples] if os.path.exists(test_path) else val_records
        if eval_records:
            final = evaluate(vlm, processor, eval_records, cfg, device, amp)
            final.update(wall_s=round(time.time() - t_start, 1), steps=step, skipped_images=skipped_images,
                         samples=len(eval_records))
            M.atomic_write(os.path.join(cfg.out_dir, "final_eval.json"), json.dumps(final, indent=2))
            print(f"held-out accuracy {final['accuracy']:.3f} ("
                  + ", ".join(f"{t} {a:.2f}" for t, a in final["per_type"].items()) + f") in {final['wall_s']:.0f} s")
        plot(history, os.path.join(cfg.out_dir, "curves.png"))
        print(f"model saved to {cfg.out_dir}/ (python generate.py --model {cfg.out_dir} --image IMAGE)")
    if ddp:
        dist.destroy_process_group()


def plot(history, path):
    if not history:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot([r["step"] for r in history], [r["loss"] for r in history])
    ax[0].set(xlabel="step", ylabel="train loss", yscale="log")
    evals = [r for r in history if "accuracy" in r]
    ax[1].plot([r["step"] for r in evals], [r["accuracy"] for r in evals], marker="o")
    ax[1].set(xlabel="step", ylabel="held-out exact match", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)


if __name__ == "__main__":
    try:
        main()
    except (UsageError, M.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
