"""Train picoVLM.

    python train.py                                   # the demo: synthetic data -> out/
    python train.py --config tiny --max_steps 20      # smoke test: tiny random model, < 1 minute
    python train.py --config nanovlm-222m --data_dir data/coco --vision scratch
    python train.py --init_from out --data_dir data/mine --max_steps 200    # fine-tune a checkpoint
    python train.py --init_from out --pretrain_steps 0 --lora_rank 8 --grad_checkpointing --out_dir out-lora  # LoRA
    python train.py --resume                          # continue out/ exactly where it stopped
    torchrun --nproc_per_node=2 train.py --config tiny                      # DDP: NCCL on GPUs, gloo on CPU

Read top to bottom: configuration -> data -> model -> checkpoints -> evaluation -> the loop.
Training runs in up to two stages: (1) the demo's vision pre-training (--pretrain_steps > 0, see
pretrain.py), then (2) the VLM: ViT -> projector -> language model, loss on the answers only.
Every setting is a field of TrainConfig (the ViT's are VisionConfig's vit_* fields); `--config
NAME` picks a preset and `--field value` overrides one field (booleans: --name, --name true,
--name false). Bad input is one `error:` line and exit status 2. Writes to --out_dir: the VLM
(generate.py --model out), best/, the training state, log.jsonl, loss.png and final_eval.json;
with --lora_rank the VLM has the adapters merged in, adapter/ holds them (PEFT's format) and
base/ the model they apply to.
"""
import argparse
import dataclasses
import functools
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

import cli

cli.openmp_wait()
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import checkpoint  # noqa: E402
import data  # noqa: E402
import model as M  # noqa: E402
import pretrain  # noqa: E402
from evaluation import Benchmarks, final_evaluation, mean  # noqa: E402
from checkpoint import UserError  # noqa: E402


# ----------------------------------------------------------------------------- configuration

VIT_FIELDS = {f.name: f for f in dataclasses.fields(M.VisionConfig)}


@dataclass(frozen=True)
class TrainConfig:
    # -- data: a folder of {train,val,test}.jsonl (prepare_data.py's format), a dataset saved with `datasets`,
    #    parquet/arrow files, a hub id[:subset], or a mixture "SOURCE=WEIGHT,..." (sources.py)
    data_dir: str = "data/synthetic"
    synthetic: int = 20000          # a data_dir named synthetic* without train.jsonl: build this many synthetic training samples there first (0: error)
    streaming: bool = False         # read the sources in order as they come (hub datasets larger than the disk); --resume continues where it stopped
    image_column: str = ""          # image + caption datasets: the image column, where not images, image, img, jpg or png
    text_column: str = ""           # image + caption datasets: the caption column, where not text, caption, captions, sentences or answer
    system_prompt: str = ""         # system turn of every chat, saved with the processor so answering uses it too ("": an empty turn; SmolLM2's default costs ~20 tokens a sample)
    seq_len: int = 2048             # longest sample in tokens (longer ones are skipped and counted); the row length when packing
    packing: bool = False           # several samples per row; attention stays within a sample and positions restart per sample
    augment_shift: int = 0          # shift each training image by up to this many pixels (edges repeated): more distinct images
    num_workers: int = 1            # DataLoader worker processes
    type_weights: str = ""          # VLM stage: each question type's (records' "type") sampling weight, e.g. "color=0.3,text=2"; others 1
    cache_data: bool = False        # keep each decoded training sample in memory after its first use (small sets; in each worker)
    # -- model
    init_from: str = ""             # fine-tune this picoVLM or SmolVLM/Idefics3 checkpoint (directory or hub id) instead of --vision/--lm
    model_class: str = ""           # FILE.py:ClassName, a model.VLM subclass (your own loss, say; docs/hacking.md) to build and train instead of model.VLM
    vision: str = "scratch"         # a new ViT: "scratch" (shaped by the vit_* flags) or a preset (tiny, siglip-b16-224, ...); or a SigLIP directory / hub id
    vit: M.VisionConfig = M.VisionConfig()  # the --vit_* flags: the shape of a ViT trained from scratch
    mp_pixel_shuffle: int = 2       # s: each s x s block of patches becomes one LM token
    mp_type: str = "pixel_shuffle"  # the projector: pixel_shuffle (SmolVLM), mlp (LLaVA), patch_merger (Qwen2.5-VL), avg_pool (Gemma 3), attention_pool (Molmo2)
    lm_image_attention: str = "causal"  # or bidirectional: the tokens of one image see each other (Gemma 3)
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
    # -- LoRA and memory (the VLM stage)
    lora_rank: int = 0              # > 0: the --lora_targets parts train rank-r adapters at their lr, not their weights (a preset's lm_train_layers goes)
    lora_alpha: float = 16.0        # the adapters' output is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0       # dropout on the adapters' input
    lora_targets: str = "lm"        # comma-separated parts with adapters: lm (its attention and MLP), vision, projector; the others train whole at their lr, or not at 0
    grad_checkpointing: bool = False  # recompute the ViT and LM blocks in the backward instead of keeping their activations (less memory, ~1/3 more compute)
    # -- evaluation
    eval_interval: int = 200        # steps between evaluations and checkpoints (0: at the end of each stage only)
    eval_samples: int = 350         # validation samples per evaluation
    final_eval: bool = True         # greedy-decode the test split at the end -> final_eval.json
    final_eval_samples: int = 0     # 0: the whole test split
    eval_benchmarks: str = ""       # at each VLM evaluation also N questions of these benchmarks (evaluation.py), e.g. "mmstar:200,textvqa:200"
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
    # patch 16 and pixel shuffle 2 (4 LM tokens an image) keep both stages cheap on a small CPU;
    # the hMLP stem beat the plain patch stem by 3.4 points over 3 seeds each (docs/ablations.md)
    "default": dict(
        vit_image_size=64, vit_patch_size=16, vit_depth=4, vit_width=128, vit_heads=2, vit_mlp_dim=512,
        vit_pos_embed="sincos2d", vit_stem="hmlp", mp_pixel_shuffle=2, augment_shift=4, cache_data=True, pretrain_steps=2600,
        pretrain_batch_size=64, pretrain_lr=1e-3,
        # the ViT learns colour and size first and reading words last: stage 1 shows it more words
        pretrain_type_weights="color=0.25,size=0.25,text=2", type_weights="text=2",
        proxy_width=64, proxy_layers=1, max_steps=150, batch_size=16, lr_vision=0.0, lr_projector=1e-3, lr_lm=3e-4, lm_train_layers=4,
        warmup_steps=20, eval_interval=0, eval_samples=140),
    # tests and smoke runs: a tiny ViT and a tiny random LM with the real tokenizer
    "tiny": dict(
        data_dir="data/synthetic-tiny", synthetic=700, vision="tiny", lm="tiny", pretrain_steps=5, pretrain_batch_size=16,
        proxy_width=32, proxy_layers=1, max_steps=20, batch_size=8, lr_vision=1e-3, lr_lm=1e-3,
        warmup_steps=2, eval_interval=10, eval_samples=28, final_eval_samples=28, num_workers=0),
    # nanoVLM-222M: SigLIP-B/16-224 (pretrained; --vision scratch trains one) + SmolLM2-135M
    "nanovlm-222m": dict(vision="google/siglip-base-patch16-224", mp_pixel_shuffle=2,
                         max_steps=5000, batch_size=16, grad_accum=4, lr_vision=5e-5, lr_projector=1e-3,
                         lr_lm=1e-4, warmup_steps=200, eval_interval=500),
    # SmolVLM-256M's shape: a SigLIP-B/16 ViT at 512 px, pixel shuffle 4 (64 tokens an image) + SmolLM2-135M
    "smolvlm-256m": dict(vision="siglip2-b16-512", mp_pixel_shuffle=4,
                         max_steps=5000, batch_size=8, grad_accum=8, lr_vision=5e-5, lr_projector=1e-3,
                         lr_lm=1e-4, warmup_steps=200, eval_interval=500),
}

# the demo sized for one GPU, where small steps are bound by kernel launches, not FLOPs: a 5M ViT
# that sees 4x more images a step on 5x more data, and twice the VLM batch (docs/experiments.md:
# stage 1 reached a far higher accuracy on one H200; compiling did not repay itself). No sample
# cache: each of the 8 workers would end up holding all 100k samples.
PRESETS["demo-gpu"] = {**PRESETS["default"], "data_dir": "data/synthetic-100k", "synthetic": 100000,
                       "vit_depth": 6, "vit_width": 256, "vit_heads": 4, "vit_mlp_dim": 1024, "pretrain_steps": 3000,
                       "pretrain_batch_size": 256, "proxy_width": 128, "max_steps": 500, "batch_size": 32,
                       "warmup_steps": 50, "num_workers": 8, "cache_data": False, "compile": False}


class TrainingError(Exception):
    """Training cannot go on (the loss keeps being NaN/inf): one `error:` line, exit status 1."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: a checkpoint was saved; exit status 130."""


def parse_args(argv):
    """-> (preset name, {field: value} of the flags actually given). Defaults stay out, so that
    --resume can tell the saved settings from the ones overridden on this command line."""
    p = cli.ArgumentParser(prog="train.py", description=__doc__, argument_default=argparse.SUPPRESS)
    p.add_argument("--config", choices=sorted(PRESETS), help="preset of settings (default: default)")
    flags = [f for f in dataclasses.fields(TrainConfig) if f.name != "vit"] + list(VIT_FIELDS.values())
    for f in flags:
        default = PRESETS["default"].get(f.name, f.default)
        if f.type is bool:  # --name, --name true, --name false (argparse's type=bool reads "false" as True)
            p.add_argument(f"--{f.name}", type=cli.parse_bool, nargs="?", const=True, metavar="true|false",
                           help=f"(default: {default})")
        else:
            p.add_argument(f"--{f.name}", type=f.type, metavar=f.type.__name__.upper(), help=f"(default: {default!r})")
    args = vars(p.parse_args(argv))
    return args.pop("config", "default"), args


FIXED_ON_RESUME = {"init_from", "vision", "mp_pixel_shuffle", "mp_type", "lm_image_attention", "lm", "tokenizer", "system_prompt", "proxy_width",
                   "proxy_layers", "lm_train_layers", "seq_len", "lora_rank", "lora_alpha", "lora_targets"}


def make_config(preset, explicit, saved=None):
    """The settings of a run: a preset (or, with --resume, the saved run's settings) and the flags
    given. A preset's vit_* settings go with its own --vision: another --vision starts from that
    one's shape (a VISION_PRESETS name, or SigLIP-B/16's for "scratch")."""
    base = dict(saved) if saved else dict(PRESETS[preset])
    vit = dict(base.pop("vit", {}))  # a saved config holds the ViT's fields as a dict
    vit.update({k: base.pop(k) for k in list(base) if k in VIT_FIELDS})
    if saved:  # what the saved weights and optimizer state were made with cannot change
        old = {**base, **vit}
        changed = sorted(k for k, v in explicit.items() if (k in FIXED_ON_RESUME or k in VIT_FIELDS) and old.get(k) != v)
        if changed:
            raise UserError(f"--{changed[0]} cannot change on --resume (the saved run has {old.get(changed[0])!r}); "
                            f"start a new run instead (--init_from {base.get('out_dir')} fine-tunes its model)")
    values = {**base, **{k: v for k, v in explicit.items() if k not in VIT_FIELDS}}
    if values.get("lora_rank") and "lm_train_layers" not in explicit:  # a preset's: adapters go on every LM block
        values["lm_train_layers"] = 0
    if values.get("vision", "scratch") != base.get("vision", "scratch"):
        vit = {}
    given = {k for k in explicit if k in VIT_FIELDS or k in ("vision", "lm", "tokenizer", "mp_pixel_shuffle", "mp_type",
                                                              "lm_image_attention")}
    if values.get("init_from") and given:
        raise UserError(f"--{sorted(given)[0]} is ignored with --init_from (the checkpoint decides the model)")
    vision = values.get("vision", "scratch")
    if not (vision == "scratch" or vision in M.VISION_PRESETS) and given & set(VIT_FIELDS):
        raise UserError(f"--{sorted(given & set(VIT_FIELDS))[0]} is ignored with a pretrained --vision {vision}")
    vit.update({k: v for k, v in explicit.items() if k in VIT_FIELDS})
    try:
        cfg = TrainConfig(**values, vit=dataclasses.replace(M.VISION_PRESETS.get(vision, M.VisionConfig()), **vit))
    except TypeError as e:
        raise UserError(f"bad settings ({e})") from None
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
              ("mp_pixel_shuffle", cfg.mp_pixel_shuffle >= 1), ("mp_type", cfg.mp_type in M.PROJECTORS),
              ("lm_image_attention", cfg.lm_image_attention in M.IMAGE_ATTENTION),
              ("device", cfg.device in ("auto", "cpu", "cuda", "mps")),
              ("dtype", cfg.dtype in ("auto", *cli.DTYPES)), ("lora_rank", cfg.lora_rank >= 0),
              ("lora_alpha", cfg.lora_alpha > 0), ("lora_dropout", 0 <= cfg.lora_dropout < 1),
              ("lora_targets", cfg.lora_targets and set(cfg.lora_targets.split(",")) <= set(M.LORA_PARTS))]
    for name in ("type_weights", "pretrain_type_weights"):
        try:
            data.parse_type_weights(getattr(cfg, name))
        except ValueError:
            raise UserError(f"--{name} {getattr(cfg, name)!r}: expected TYPE=WEIGHT,... with weights >= 0") from None
    for name, ok in checks:
        if not ok:
            raise UserError(f"--{name} {getattr(cfg, name)!r} is out of range")
    if cfg.streaming and cfg.pretrain_steps:
        raise UserError("--pretrain_steps needs the whole training vocabulary first: not with --streaming (add --pretrain_steps 0)")
    check_lora(cfg, explicit)
    return cfg


def check_lora(cfg, explicit):
    """LoRA settings that would be ignored or cannot work together: one line each."""
    if not cfg.lora_rank:
        ignored = sorted(k for k in ("lora_alpha", "lora_dropout", "lora_targets") if k in explicit)
        if ignored:
            raise UserError(f"--{ignored[0]} is ignored without --lora_rank")
        return
    targets = cfg.lora_targets.split(",")
    lrs = {"vision": cfg.lr_vision, "projector": cfg.lr_projector, "lm": cfg.lr_lm}
    if cfg.lm_train_layers:
        raise UserError("--lm_train_layers and --lora_rank: choose one (adapters go on every LM block)")
    for part in targets:
        if not lrs[part]:
            raise UserError(f"--lora_targets {part} with --lr_{part} 0: its adapters would not train")
    if "lm" not in targets and cfg.lr_lm:
        raise UserError("with --lora_rank the LM trains through adapters (--lora_targets lm) or not at all (--lr_lm 0)")


# ----------------------------------------------------------------------------- data

def load_data(cfg, is_main):
    """train/val/test records (data.load_data), building the synthetic set first where it is asked
    for: a folder named synthetic* (the presets' data/synthetic, -tiny, -100k) without train.jsonl."""
    if data.wants_synthetic(cfg.data_dir):
        if not cfg.synthetic:
            raise UserError(f"{cfg.data_dir}: no train.jsonl (run prepare_data.py, or pass --synthetic N)")
        if is_main:
            from synthetic import build_synthetic
            held_out = max(70, min(500, cfg.synthetic // 10))
            print(f"building {cfg.synthetic} synthetic training samples in {cfg.data_dir}")
            build_synthetic(cfg.data_dir, cfg.synthetic, held_out, held_out, seed=0, image_size=64)
        if dist.is_initialized():
            dist.barrier()  # the other processes wait for rank 0's files
    return data.load_data(cfg.data_dir, cfg.streaming, cfg.eval_samples, cfg.image_column, cfg.text_column, cfg.seed)


# ----------------------------------------------------------------------------- model

def model_class(spec):
    """--model_class FILE.py:ClassName -> that class, a subclass of model.VLM ("": model.VLM itself)."""
    if not spec:
        return M.VLM
    path, _, name = spec.rpartition(":")
    if not path.endswith(".py") or not os.path.isfile(path) or not name.isidentifier():
        raise UserError(f"--model_class {spec!r}: expected FILE.py:ClassName with an existing FILE.py")
    import importlib.util
    module_spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)  # an error in the file itself keeps its traceback
    cls = getattr(module, name, None)
    if not (isinstance(cls, type) and issubclass(cls, M.VLM)):
        raise UserError(f"--model_class {spec!r}: {path} has no subclass of model.VLM named {name}")
    return cls


def build_model(cfg):
    """-> (vlm, processor) from --init_from, or from --vision and --lm."""
    Model = model_class(cfg.model_class)  # model.VLM, or the --model_class subclass
    if cfg.init_from:
        vlm, processor = Model.from_pretrained(cfg.init_from), M.Processor.from_pretrained(cfg.init_from)
        processor.system_prompt = cfg.system_prompt
        return vlm, processor
    if cfg.lm in M.LM_PRESETS:
        tokenizer = checkpoint.load_tokenizer(cfg.tokenizer or checkpoint.default_lm_path())
        lm = M.LanguageModel(dataclasses.replace(M.LM_PRESETS[cfg.lm], lm_vocab=len(tokenizer)))
    else:
        path = cfg.lm or checkpoint.default_lm_path()
        tokenizer = checkpoint.load_tokenizer(cfg.tokenizer or path)
        lm = M.LanguageModel.from_pretrained(path)
    if cfg.vision == "scratch" or cfg.vision in M.VISION_PRESETS:
        vision = M.VisionTransformer(cfg.vit)
    else:
        vision = M.VisionTransformer.from_pretrained(cfg.vision)
    v = vision.cfg
    grid = v.vit_image_size // v.vit_patch_size
    if v.vit_image_size % v.vit_patch_size or grid % cfg.mp_pixel_shuffle or v.vit_width % v.vit_heads:
        raise UserError(f"ViT {v.vit_image_size} px / patch {v.vit_patch_size}, width {v.vit_width} / "
                        f"{v.vit_heads} heads, pixel shuffle {cfg.mp_pixel_shuffle}: sizes do not divide")
    processor = M.Processor(tokenizer, v.vit_image_size, (grid // cfg.mp_pixel_shuffle) ** 2,
                            system_prompt=cfg.system_prompt)  # adds the image tokens to the tokenizer
    if lm.cfg.lm_vocab < len(tokenizer):
        lm.resize_vocab(len(tokenizer))
    vlm = Model(M.VLMConfig(vision=v, lm=lm.cfg, mp_pixel_shuffle=cfg.mp_pixel_shuffle, mp_type=cfg.mp_type,
                            lm_image_attention=cfg.lm_image_attention,
                            image_token_id=processor.image_token_id), vision=vision, lm=lm)
    # a new projector starts at the scale of the LM's word embeddings: at first the image tokens
    # look to a pretrained LM like some words, not like outliers 4x larger than any word
    w = vlm.projector.proj.weight
    with torch.no_grad():
        w.mul_(lm.tok_embed.weight.std() / (w.std() * math.sqrt(w.shape[1])))
    return vlm, processor


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
    """(name, lr, params) of the VLM's parts; a part with LoRA adapters trains those only."""
    lm = list(vlm.lm.parameters())
    if cfg.lm_train_layers:  # the top N blocks and the final norm; the embedding (= the tied head) stays
        for p in lm:
            p.requires_grad_(False)
        lm = [p for b in vlm.lm.blocks[-cfg.lm_train_layers:] for p in b.parameters()] + list(vlm.lm.norm.parameters())
    parts = [("vision", cfg.lr_vision, list(vlm.vision.parameters())),
             ("projector", cfg.lr_projector, list(vlm.projector.parameters())), ("lm", cfg.lr_lm, lm)]
    targets = vlm.lora["targets"] if vlm.lora else ()
    return [(name, lr, [p for n, p in getattr(vlm, name).named_parameters() if ".lora_" in n] if name in targets
             else params) for name, lr, params in parts]


def lr_factor(step, warmup, total, min_ratio):
    """Linear warmup, then a cosine from 1 down to min_ratio at step `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------- checkpoints

@dataclass
class State:
    """Where a run stands; saved with each checkpoint, so that --resume continues exactly here."""
    stage: str = "vlm"      # "pretrain", "vlm", then "done"
    step: int = 0           # optimizer steps done in this stage
    samples: int = 0        # data position: samples drawn in this stage (all processes)
    offset: int = 0         # steps of the stages before (log.jsonl numbers steps across stages)
    skipped: int = 0        # unusable samples skipped
    bad_steps: int = 0      # NaN/inf steps skipped
    best: float = -1.0      # best validation accuracy of the VLM stage (best/ holds that model)
    wall_s: float = 0.0     # training time before this process started


def save_checkpoint(run, state, model, opt, scaler, record):
    """The trainable weights, optimizer moments, RNG states and State (checkpoint.py's training
    state); in the VLM stage also the VLM itself, and best/ when it is the best so far."""
    if not run.main:
        return
    cfg = run.cfg
    if state.stage == "vlm":
        model.save_pretrained(cfg.out_dir)  # with LoRA: the adapters merged in
        if model.lora:
            base = "" if cfg.pretrain_steps else cfg.init_from  # the transformers model PEFT would load it onto
            model.save_lora(os.path.join(cfg.out_dir, "adapter"), base_model=base)
        if record.get("accuracy", -1) > state.best:
            state.best = record["accuracy"]
            checkpoint.replace_dir(os.path.join(cfg.out_dir, "best"),
                                   lambda path: model.save_pretrained(path, processor=run.processor))
    saved = dataclasses.replace(state, wall_s=state.wall_s + time.time() - run.t0)
    checkpoint.save_state(cfg.out_dir, model, opt, scaler, {"state": dataclasses.asdict(saved),
                                                            "config": dataclasses.asdict(cfg)})


# ----------------------------------------------------------------------------- evaluation

def inputs(batch, device):
    """The model's inputs: a collated batch's tensors (the rest is bookkeeping), on the device."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}


@torch.no_grad()
def evaluate(model, batches, run):
    """Validation loss and exact-match accuracy per type from one teacher-forced pass. Greedy
    decoding reproduces an answer iff the argmax is right at each of its tokens given the right
    ones before, so this is greedy exact match over the answer tokens, without the decoding."""
    model.eval()
    loss_sum, n_tokens, right = 0.0, 0, {}
    for b in batches:
        with run.autocast:
            logits, loss = model(**inputs(b, run.device))
        targets = b["labels"][:, 1:].to(run.device)
        keep = targets != -100
        wrong = torch.zeros(len(targets), device=run.device).index_add_(
            0, keep.nonzero()[:, 0], (logits.argmax(-1) != targets[keep]).float())
        loss_sum, n_tokens = loss_sum + loss.item() * int(keep.sum()), n_tokens + int(keep.sum())
        for t, w in zip(b["types"], wrong.tolist()):
            right.setdefault(t, []).append(w == 0)
    model.train()
    per_type = {t: sum(v) / len(v) for t, v in sorted(right.items())}
    return {"val_loss": loss_sum / max(1, n_tokens), "accuracy": mean(per_type.values()), "per_type": per_type}


def finite(x):
    """NaN and infinity (a NaN loss, no validation samples) as null: JSON has no NaN."""
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    return None if isinstance(x, float) and not math.isfinite(x) else x


def read_log(path):
    """log.jsonl's records. The log is a record, not the state: a line torn by a crash (or any
    line that is not a step's record) is left out rather than stopping a resume."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
    return rows


def plot(log_path, png_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_log(log_path)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for stage, color, what in (("pretrain", "tab:gray", "pretrain (proxy decoder)"), ("vlm", "tab:blue", "vlm")):
        r = [x for x in rows if x.get("stage") == stage and x.get("loss") is not None]  # null: a NaN step
        e = [x for x in r if x.get("val_loss") is not None]
        if r:
            a.plot([x["step"] for x in r], [x["loss"] for x in r], color=color, lw=0.8, label=f"{what}: train")
            a.plot([x["step"] for x in e], [x["val_loss"] for x in e], "o-", color=color, ms=3, label=f"{what}: val")
            b.plot([x["step"] for x in e], [x["accuracy"] for x in e], "o-", color=color, ms=3, label=what)
    a.set(xlabel="step", ylabel="loss on answer tokens", yscale="log")
    b.set(xlabel="step", ylabel="held-out exact match (mean over types)", ylim=(0, 1.02))
    a.legend(fontsize=8)
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path + ".tmp.png", dpi=110)
    plt.close(fig)
    os.replace(png_path + ".tmp.png", png_path)


# ----------------------------------------------------------------------------- the loop

class Run:
    """What every stage needs: settings, processes, device, precision, logging, stop signals."""

    def __init__(self, cfg, resume):
        self.cfg, self.resume, self.t0 = cfg, resume, time.time()
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        self.main = self.rank == 0
        self.device = cli.pick_device(cfg.device, local_rank)
        if self.world > 1:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            if self.device.type == "cpu":  # the processes share the cores
                per_node = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_node))
        self.dtype = cli.pick_dtype(cfg.dtype, self.device)
        self.autocast = (torch.autocast(self.device.type, dtype=self.dtype) if self.dtype != torch.float32
                         else nullcontext())
        self.peak_flops = cli.peak_flops(self.device)
        self.log_path = os.path.join(cfg.out_dir, "log.jsonl")
        self.stop_requested, self.wandb, self.processor = False, None, None
        self.benchmarks = Benchmarks(cfg.eval_benchmarks) if cfg.eval_benchmarks and self.main else None  # loaded up front

    def log(self, record):
        if self.main:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(finite(record)) + "\n")
            if self.wandb:
                self.wandb.log(record, step=record["step"])

    def on_stop(self, signum, _):
        """Ctrl-C or SIGTERM (schedulers, `timeout`): finish the step, save a checkpoint, exit.
        A second signal stops at once."""
        self.stop_requested = True
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    def any(self, *flags):
        """Each flag ORed over all processes, so that all skip or stop at the same step."""
        t = torch.tensor([float(f) for f in flags], device=self.device)
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(x) for x in t.tolist()]


def train_stage(run, state, model, groups, dataset, val_batches, collate_fn):
    """The optimizer steps of state.stage from state.step and data position state.samples on. The
    loss is each micro-batch's mean over its answer tokens weighted by its share of the whole
    step's answer tokens on all processes, so accumulation and DDP give exactly the gradient of
    one big batch."""
    cfg, device, pre = run.cfg, run.device, state.stage == "pretrain"
    steps, batch_size, accum = (cfg.pretrain_steps, cfg.pretrain_batch_size, 1) if pre else (
        cfg.max_steps, cfg.batch_size, cfg.grad_accum)
    decay_steps = steps if pre else cfg.lr_decay_steps or steps
    opt = torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.95), weight_decay=cfg.weight_decay,
                            fused=device.type in ("cuda", "cpu"))
    scaler = torch.amp.GradScaler(device.type, enabled=run.dtype == torch.float16)  # fp16 needs loss scaling
    if run.resume and run.resume[0]["state"]["stage"] == state.stage:
        checkpoint.restore_state(*run.resume, model, opt, scaler)
        run.resume = None
    elif state.step == 0:  # from its first moment out_dir says where the run stands (generate.py reads it)
        save_checkpoint(run, state, model, opt, scaler, {})
    ddp = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
           if run.world > 1 else model)
    params = [p for g in groups for p in g["params"]]
    stream = iter(data.batches(dataset, batch_size, accum, run.rank, run.world, cfg.seed, state.samples,
                               cfg.pretrain_type_weights if pre else cfg.type_weights, cfg.num_workers, collate_fn))
    flops_per_token = 6 * sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)
    from tqdm import tqdm
    bar = tqdm(total=steps, initial=state.step, desc=state.stage, unit="step", dynamic_ncols=True, disable=not run.main)
    bad_in_a_row, unusable = 0, 0
    with bar:  # closed however the loop ends, so that an error line is not glued to the bar
        while state.step < steps:
            t = time.time()
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_factor(state.step, cfg.warmup_steps, decay_steps, cfg.min_lr_ratio)
            micro = [next(stream) for _ in range(accum)]
            total = torch.tensor([[float(b["supervised"]), float(b["tokens"]), float(b["skipped"])] for b in micro]).sum(0)
            total = total.to(device)
            if run.world > 1:
                dist.all_reduce(total)
            n_supervised, tokens, skipped = total.tolist()
            state.samples, state.skipped = state.samples + batch_size * accum * run.world, state.skipped + int(skipped)
            if not n_supervised:  # nothing usable in the whole step: not a step; a dataset of such samples is an error
                unusable += batch_size * accum * run.world
                if not cfg.streaming and unusable >= len(dataset):  # (a stream's workers check this themselves)
                    raise UserError(f"{cfg.data_dir}: {unusable} samples drawn in a row and none usable (unreadable "
                                    f"images, no answer, or longer than --seq_len {cfg.seq_len})")
                continue
            unusable = 0
            loss_sum, bad = torch.zeros((), device=device), False
            for k, b in enumerate(micro):
                with ddp.no_sync() if run.world > 1 and k < accum - 1 else nullcontext():  # all-reduce once a step
                    if b["supervised"]:
                        with run.autocast:
                            loss = ddp(**inputs(b, device))[1] * (b["supervised"] / n_supervised)
                    else:  # nothing usable in this micro-batch: a zero loss keeps DDP's all-reduce in step
                        loss = sum(p.sum() for p in params) * 0.0
                    bad |= not torch.isfinite(loss).item()
                    scaler.scale(loss * run.world).backward()  # DDP averages the processes' gradients: undo that
                loss_sum += loss.detach()
            if run.world > 1:
                dist.all_reduce(loss_sum)
            bad, stop = run.any(bad, run.stop_requested)
            record = {"step": state.offset + state.step + 1, "stage": state.stage, "loss": loss_sum.item(),
                      "lr": opt.param_groups[0]["lr"]}
            if bad:  # NaN/inf somewhere: every process drops this step's update
                opt.zero_grad(set_to_none=True)
                state.bad_steps, bad_in_a_row, record["skipped_step"] = state.bad_steps + 1, bad_in_a_row + 1, True
                if bad_in_a_row >= cfg.max_bad_steps:
                    raise TrainingError(f"the loss was NaN/inf {bad_in_a_row} steps in a row ({state.stage} step "
                                        f"{state.step + 1}); lower the learning rates or check the data "
                                        f"(the last checkpoint is in {cfg.out_dir})")
            else:
                bad_in_a_row = 0
                scaler.unscale_(opt)
                record["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf")).item()
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
            state.step += 1
            dt = time.time() - t
            record.update(tokens_per_s=round(tokens / dt), time_s=round(time.time() - run.t0, 2))
            postfix = {"loss": f"{record['loss']:.3f}", "tok/s": f"{tokens / dt:.0f}"}
            if run.peak_flops:
                record["mfu"] = flops_per_token * tokens / run.world / dt / run.peak_flops
                postfix["mfu"] = f"{record['mfu']:.1%}"
            if (cfg.eval_interval and state.step % cfg.eval_interval == 0) or state.step == steps or stop:
                if run.main and (not stop or state.step == steps):
                    record.update(evaluate(model, val_batches, run))
                    if run.benchmarks and not pre:
                        record.update(run.benchmarks(model, run.processor, device, run.autocast))
                    postfix["val"] = f"{record['accuracy']:.0%}"
                save_checkpoint(run, state, model, opt, scaler, record)
            run.log(record)
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
            if stop:
                raise Interrupted(f"interrupted: checkpoint saved at {state.stage} step {state.step} in {cfg.out_dir}/ "
                                  f"(continue with --resume)")


def train(cfg, resume):
    run = Run(cfg, resume)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    state = State(**resume[0]["state"]) if resume else State(stage="pretrain" if cfg.pretrain_steps else "vlm")
    if run.main:
        if resume:  # the steps after the checkpoint will be done again: forget their log lines
            rows = [r for r in read_log(run.log_path) if r["step"] <= state.offset + state.step]
            checkpoint.atomic_write(run.log_path, "".join(json.dumps(r) + "\n" for r in rows))
        else:  # a new run here: the files of an older one must not be mistaken for this one's
            for name in (checkpoint.STATE_FILE, "log.jsonl", "final_eval.json", "loss.png"):
                if os.path.exists(os.path.join(cfg.out_dir, name)):
                    os.remove(os.path.join(cfg.out_dir, name))
            for name in ("adapter", "base"):
                shutil.rmtree(os.path.join(cfg.out_dir, name), ignore_errors=True)
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise UserError("--wandb needs the wandb package: pip install wandb") from None
            run.wandb = wandb.init(project=cfg.wandb_project, config=dataclasses.asdict(cfg))
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, run.on_stop)

    train_records, val_records, (test_records, test_split) = load_data(cfg, run.main)
    if resume and state.stage in ("vlm", "done") and os.path.exists(os.path.join(cfg.out_dir, "config.json")):
        # with LoRA out_dir holds the merged model; the adapters (in the training state) go on base/
        vlm = model_class(cfg.model_class).from_pretrained(os.path.join(cfg.out_dir, "base") if cfg.lora_rank else cfg.out_dir)
        processor = M.Processor.from_pretrained(cfg.out_dir)
    else:  # (a run that resumes inside stage 1 rebuilds the VLM it started from: same seed, same weights)
        vlm, processor = build_model(cfg)
    vlm.to(run.device)
    vlm.set_grad_checkpointing(cfg.grad_checkpointing)
    processor.check_model(vlm.cfg)  # a checkpoint's processor that does not fit its model: one line, now
    run.processor = processor
    if cfg.streaming:
        train_set = data.ChatStream(train_records, processor, cfg.seq_len, cfg.augment_shift, cfg.seed)
    else:
        train_set = data.ChatDataset(train_records, processor, cfg.seq_len, cfg.augment_shift, cfg.seed, cfg.cache_data)
    val_set = data.ChatDataset(val_records[:cfg.eval_samples], processor, cfg.seq_len)
    val_chunks = [list(range(i, min(i + 32, len(val_set)))) for i in range(0, len(val_set), 32)]
    if run.main:
        size = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
        print(f"picoVLM: ViT {size(vlm.vision):.2f}M + projector {size(vlm.projector):.2f}M + LM {size(vlm.lm):.1f}M "
              f"parameters, {vlm.cfg.image_tokens} LM tokens an image; {'streamed' if cfg.streaming else len(train_set)} training samples; "
              f"{run.device} {str(run.dtype).replace('torch.', '')}, {run.world} process(es)")
    compile_blocks = cfg.compile and run.device.type == "cuda"  # on a CPU compiling costs more than it saves
    if compile_blocks:  # block by block: the VLM's gather of the answer positions has data-dependent shapes
        for block in [*vlm.vision.blocks, *vlm.lm.blocks]:
            block.compile(dynamic=True)
    pack_len = cfg.seq_len if cfg.packing else 0

    if state.stage == "pretrain":
        proxy, remap = pretrain.build_proxy(vlm, cfg, pretrain.proxy_vocab(train_set))
        proxy.to(run.device)
        if compile_blocks:
            for block in proxy.lm.blocks:
                block.compile(dynamic=True)
        collate = functools.partial(pretrain.collate, remap=remap, pack_len=pack_len)
        val_batches = list(data.loader(val_set, val_chunks, 0, functools.partial(pretrain.collate, remap=remap, words=False)))
        train_stage(run, state, proxy, param_groups([("proxy", cfg.pretrain_lr, list(proxy.parameters()))]),
                    train_set, val_batches, collate)
        state.stage, state.step, state.samples, state.offset = "vlm", 0, 0, cfg.pretrain_steps
        del proxy
    if state.stage == "vlm":
        if state.step == 0 and run.main:  # this stage's frozen weights, and the processor
            vlm.save_pretrained(cfg.out_dir, processor=processor)
            if cfg.lora_rank:  # what the adapters apply to, kept for --resume (out_dir's model gets them merged)
                vlm.save_pretrained(os.path.join(cfg.out_dir, "base"), processor=processor)
        if cfg.lora_rank:
            targets = cfg.lora_targets.split(",")
            lrs = {"vision": cfg.lr_vision, "projector": cfg.lr_projector}
            trainable = [p for p, lr in lrs.items() if lr and p not in targets]  # what PEFT calls modules_to_save
            vlm.add_lora(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, targets, trainable)
            if run.main:
                n = sum(p.numel() for p in vlm.parameters() if p.requires_grad)
                print(f"LoRA rank {cfg.lora_rank} on {cfg.lora_targets}: {n / 1e6:.2f}M trainable parameters "
                      f"({n / sum(p.numel() for p in vlm.parameters()):.1%})")
        groups = param_groups(vlm_parts(vlm, cfg))
        if not groups and cfg.max_steps:
            raise UserError("the learning rates of the VLM stage are all 0: nothing to train")
        val_batches = list(data.loader(val_set, val_chunks, 0))
        train_stage(run, state, vlm, groups, train_set, val_batches, functools.partial(data.collate, pack_len=pack_len))
        state.stage = "done"

    if not run.main:
        return 0
    if os.path.exists(run.log_path) and os.path.getsize(run.log_path):
        plot(run.log_path, os.path.join(cfg.out_dir, "loss.png"))
    wall = state.wall_s + time.time() - run.t0
    if vlm.lora:  # answering costs nothing extra with the adapters folded in
        vlm.merge_lora()
    if cfg.final_eval and test_records:
        result = final_evaluation(vlm, processor, test_records[:cfg.final_eval_samples or None], run.device,
                                  run.autocast)
        result.update(split=test_split, skipped_samples=state.skipped, skipped_steps=state.bad_steps, wall_s=round(wall, 1))
        if not result["n"]:
            result["note"] = f"no {test_split} sample could be evaluated (unreadable images): accuracy is null"
        checkpoint.atomic_write(os.path.join(cfg.out_dir, "final_eval.json"), json.dumps(finite(result), indent=2))
        print(f"held-out exact match {result['accuracy']:.1%} ({result['n']} {test_split} samples): "
              + ", ".join(f"{t} {a:.0%}" for t, a in result["per_type"].items()))
    print(f"done in {wall:.0f} s; skipped {state.skipped} unusable samples and {state.bad_steps} NaN/inf steps; "
          f"the model is in {cfg.out_dir}/")
    return 0


def main(argv=None):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def run():
        preset, explicit = parse_args(sys.argv[1:] if argv is None else argv)
        resume = None
        if explicit.get("resume"):  # the saved run's settings, except for the flags given now
            out_dir = explicit.get("out_dir", PRESETS[preset].get("out_dir", TrainConfig.out_dir))
            resume = checkpoint.read_state(out_dir)
            if resume is None:
                raise UserError(f"--resume: no {checkpoint.STATE_FILE} in {out_dir} (nothing to resume)")
        cfg = make_config(preset, explicit, saved=resume[0]["config"] if resume else None)
        lock = checkpoint.claim_dir(cfg.out_dir) if int(os.environ.get("RANK", "0")) == 0 else None
        try:
            return train(cfg, resume)
        finally:
            if lock and os.path.exists(lock):
                os.unlink(lock)
    try:
        return cli.main(run, "train.py")
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"\n{e}", file=sys.stderr)
        return 130
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
