"""picoVLM: the model, top to bottom.

  1. configs       - VisionConfig, LanguageConfig, VLMConfig and presets of real (and tiny) shapes
  2. vision        - a SigLIP ViT (patches -> transformer -> post-LayerNorm)
  3. projector     - pixel shuffle (fewer, wider tokens) + one linear layer
  4. language      - a Llama/SmolLM2 decoder with RoPE, GQA and a static KV cache
  5. VLM           - image embeddings written into the text at <image> token positions
  6. generation    - greedy / sampling with per-sequence stop and left padding
  7. loading       - explicit key maps for SigLIP, Llama/SmolLM2, GGUF, SmolVLM/Idefics3; export
  8. LoRA          - low-rank adapters on frozen linears, saved and loaded in PEFT's format; merging

Images and prompts are made into tensors by processor.py (Processor is re-exported here); file
formats are read and written by checkpoint.py.
"""
import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from checkpoint import (UserError, atomic_save_safetensors, atomic_write, read_config, read_gguf, read_safetensors,
                        resolve_checkpoint)
from processor import Processor  # noqa: F401  (re-exported: `from model import Processor` keeps working)


# ----------------------------------------------------------------------------- 1. configs

@dataclass(frozen=True)
class VisionConfig:
    vit_image_size: int = 224      # input resolution (square)
    vit_patch_size: int = 16       # each patch becomes one token: (224/16)^2 = 196 tokens
    vit_depth: int = 12            # transformer blocks
    vit_width: int = 768           # hidden size of every token
    vit_heads: int = 12
    vit_mlp_dim: int = 3072        # hidden size of each block's MLP
    vit_ln_eps: float = 1e-6
    vit_pos_embed: str = "learned"  # "learned" (SigLIP) or "sincos2d" (fixed, ViT BKMs)
    vit_stem: str = "patch"        # "patch" (SigLIP's strided conv) or "hmlp" (hierarchical MLP, Touvron et al. 2022)
    vit_parallel_blocks: bool = False  # pairs of attention / MLP branches side by side at half the depth (ibid.)

    def __post_init__(self):
        validate(self, [("vit_patch_size", self.vit_patch_size >= 1), ("vit_heads", self.vit_heads >= 1)])
        validate(self, [("vit_image_size", self.vit_image_size >= self.vit_patch_size),
                        ("vit_stem", self.vit_stem == "patch" or self.vit_stem == "hmlp" and self.vit_patch_size % 4 == 0
                         and self.vit_width % 4 == 0),
                        ("vit_parallel_blocks", self.vit_parallel_blocks in (False, True)
                         and not (self.vit_parallel_blocks and self.vit_depth % 2)),
                        ("vit_depth", self.vit_depth >= 0), ("vit_width", self.vit_width % self.vit_heads == 0),
                        ("vit_mlp_dim", self.vit_mlp_dim >= 1), ("vit_ln_eps", self.vit_ln_eps > 0),
                        ("vit_pos_embed", self.vit_pos_embed in ("learned", "sincos2d")),
                        ("vit_width", self.vit_pos_embed == "learned" or self.vit_width % 4 == 0),
                        ("vit_width", self.vit_depth * (4 * self.vit_width ** 2 + 2 * self.vit_width * self.vit_mlp_dim)
                         + self.num_patches * self.vit_width <= MAX_PARAMETERS)])

    @property
    def num_patches(self):
        return (self.vit_image_size // self.vit_patch_size) ** 2


@dataclass(frozen=True)
class LanguageConfig:
    lm_hidden: int = 576
    lm_layers: int = 30
    lm_heads: int = 9
    lm_kv_heads: int = 3           # grouped-query attention: 3 k/v heads shared by 9 query heads
    lm_intermediate: int = 1536    # SwiGLU hidden size
    lm_vocab: int = 49152
    lm_rope_theta: float = 100000.0
    lm_rms_eps: float = 1e-5
    lm_max_positions: int = 8192
    lm_tie_embeddings: bool = True

    def __post_init__(self):
        validate(self, [("lm_heads", self.lm_heads >= 1), ("lm_kv_heads", self.lm_kv_heads >= 1)])
        validate(self, [("lm_kv_heads", self.lm_heads % self.lm_kv_heads == 0), ("lm_layers", self.lm_layers >= 0),
                        ("lm_hidden", self.lm_hidden % self.lm_heads == 0 and self.head_dim % 2 == 0),
                        ("lm_intermediate", self.lm_intermediate >= 1), ("lm_vocab", self.lm_vocab >= 1),
                        ("lm_rope_theta", self.lm_rope_theta > 0), ("lm_rms_eps", self.lm_rms_eps > 0),
                        ("lm_max_positions", self.lm_max_positions >= 1),
                        ("lm_hidden", self.lm_layers * self.lm_hidden * (4 * self.lm_hidden + 3 * self.lm_intermediate)
                         + 2 * self.lm_vocab * self.lm_hidden <= MAX_PARAMETERS)])

    @property
    def head_dim(self):
        return self.lm_hidden // self.lm_heads


@dataclass(frozen=True)
class VLMConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    lm: LanguageConfig = field(default_factory=LanguageConfig)
    mp_pixel_shuffle: int = 2      # s: s*s neighbouring patches -> one LM token (4x fewer tokens)
    mp_type: str = "pixel_shuffle"  # how each s x s block becomes a token: a PROJECTORS name (section 3)
    lm_image_attention: str = "causal"  # or "bidirectional" (IMAGE_ATTENTION): an image's tokens see each other
    image_token_id: int = -1       # set from the tokenizer when the image tokens are added (-1: none yet)

    def __post_init__(self):
        grid = self.vision.vit_image_size // self.vision.vit_patch_size
        validate(self, [("mp_pixel_shuffle", self.mp_pixel_shuffle >= 1 and grid % self.mp_pixel_shuffle == 0),
                        ("mp_type", self.mp_type in PROJECTORS),
                        ("lm_image_attention", self.lm_image_attention in IMAGE_ATTENTION),
                        ("image_token_id", -1 <= self.image_token_id < self.lm.lm_vocab)])

    @property
    def image_tokens(self):
        """LM tokens per image (per tile): 196 patches / 2^2 = 49 for SigLIP-B/16-224; every
        projector type makes one token of each s x s block (Gemma 3's pooled grid: 64 / 4 = 16)."""
        return self.vision.num_patches // self.mp_pixel_shuffle ** 2

    def to_dict(self):
        return {"model_type": "picovlm", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d):
        d = {k: v for k, v in d.items() if k != "model_type"}
        return cls(vision=VisionConfig(**d.pop("vision")), lm=LanguageConfig(**d.pop("lm")), **d)


IMAGE_ATTENTION = ("causal", "bidirectional")
MAX_PARAMETERS = 10 ** 11  # 400 GB in fp32: any config beyond it is a typo, not a model to allocate


def validate(cfg, rules):
    """rules: (field, ok) pairs -> one UserError naming the first field out of range. A comparison
    with a value of the wrong type (a string, a list) is reported the same way."""
    for name, ok in rules:
        if not ok:
            raise UserError(f"{type(cfg).__name__}: {name}={getattr(cfg, name)!r} is out of range or inconsistent")


def parse_config(path, make):
    """make() builds a config from a checkpoint's config.json; any malformed value -> one line."""
    try:
        return make()
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise UserError(f"{path}: bad config.json ({type(e).__name__}: {e})") from None


# the seed's ViT hyperparameters (image size, patch size, depth, width, MLP dim) of real encoders;
# "tiny" (and LM_PRESETS' "tiny") are the shapes of tests and smoke runs
VISION_PRESETS = {
    "tiny": VisionConfig(vit_image_size=32, vit_patch_size=8, vit_depth=2, vit_width=32, vit_heads=2, vit_mlp_dim=64),
    "siglip-b16-224": VisionConfig(),
    "siglip2-b16-512": VisionConfig(vit_image_size=512),
    # the shape-optimised ViTs of Alabdulmohsin et al. 2023 (arXiv:2305.13035)
    "sovit-150m16-224": VisionConfig(vit_image_size=224, vit_patch_size=16, vit_depth=18, vit_width=880, vit_heads=16,
                                     vit_mlp_dim=2320),
    "siglip-so400m14-384": VisionConfig(vit_image_size=384, vit_patch_size=14, vit_depth=27,
                                        vit_width=1152, vit_heads=16, vit_mlp_dim=4304),
}
LM_PRESETS = {
    "tiny": LanguageConfig(lm_hidden=64, lm_layers=2, lm_heads=4, lm_kv_heads=2, lm_intermediate=128,
                           lm_max_positions=2048),
    "smollm2-135m": LanguageConfig(),
    "smollm2-360m": LanguageConfig(lm_hidden=960, lm_layers=32, lm_heads=15, lm_kv_heads=5,
                                   lm_intermediate=2560),
    "smollm2-1.7b": LanguageConfig(lm_hidden=2048, lm_layers=24, lm_heads=32, lm_kv_heads=32,
                                   lm_intermediate=8192, lm_rope_theta=130000.0),
}


# ----------------------------------------------------------------------------- 2. vision

def sincos_2d(grid_h, grid_w, dim):
    """Fixed 2-D sin-cos position embedding (ViT BKMs): half the channels encode y, half x."""
    y, x = torch.meshgrid(torch.arange(grid_h, dtype=torch.float32),
                          torch.arange(grid_w, dtype=torch.float32), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    y, x = y.flatten()[:, None] * omega, x.flatten()[:, None] * omega
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)


class VisionAttention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)   # q, k, v fused into one matmul
        self.qkv_sizes = [width] * 3             # its output slices (LoRA gives each its own adapter)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # every patch sees every patch: no mask
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class VisionBlock(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(c.vit_width, eps=c.vit_ln_eps)
        self.attn = VisionAttention(c.vit_width, c.vit_heads)
        self.ln2 = nn.LayerNorm(c.vit_width, eps=c.vit_ln_eps)
        self.fc1 = nn.Linear(c.vit_width, c.vit_mlp_dim)
        self.fc2 = nn.Linear(c.vit_mlp_dim, c.vit_width)

    def mlp(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ParallelVisionBlock(nn.Module):
    """Two attention branches, then two MLP branches, each pair reading the same input (Touvron et
    al. 2022, arXiv:2203.09795): half the sequential depth, the same parameters and FLOPs."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.branches = nn.ModuleList(VisionBlock(c) for _ in range(2))

    def forward(self, x):
        x = x + sum(b.attn(b.ln1(x)) for b in self.branches)
        return x + sum(b.mlp(b.ln2(x)) for b in self.branches)


class HMLPStem(nn.Module):
    """Hierarchical MLP patch stem (ibid.): p/4 x p/4 pixel cells -> 2x2 cells -> 2x2 cells, each
    step a linear map (a convolution whose stride is its kernel) + LayerNorm (+ GELU). It gives the
    same patch grid as the plain stem and never mixes pixels of two patches (the paper's BatchNorm
    would mix images of a batch: LayerNorm over channels here)."""

    def __init__(self, patch, width):
        super().__init__()
        dims, kernels = (3, width // 4, width // 4, width), (patch // 4, 2, 2)
        self.convs = nn.ModuleList(nn.Conv2d(dims[i], dims[i + 1], k, stride=k) for i, k in enumerate(kernels))
        self.norms = nn.ModuleList(nn.LayerNorm(d) for d in dims[1:])

    def forward(self, x):
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = norm(conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            x = F.gelu(x) if i < 2 else x
        return x


def run_block(model, block, *args):
    """block(*args); with model.grad_checkpointing on (training only) its activations are not kept
    but recomputed in the backward (torch.utils.checkpoint, non-reentrant): memory for compute."""
    if model.grad_checkpointing and model.training and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
    return block(*args)


class VisionTransformer(nn.Module):
    """SigLIP image encoder: [N,3,H,W] -> [N, (H/p)*(W/p), D], the post-LayerNorm hidden states."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.vit_stem == "hmlp":
            self.patch_embed = HMLPStem(cfg.vit_patch_size, cfg.vit_width)
        else:
            self.patch_embed = nn.Conv2d(3, cfg.vit_width, cfg.vit_patch_size, stride=cfg.vit_patch_size)
        if cfg.vit_pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.randn(cfg.num_patches, cfg.vit_width) * 0.02)
        else:
            g = cfg.vit_image_size // cfg.vit_patch_size
            self.register_buffer("pos_embed", sincos_2d(g, g, cfg.vit_width), persistent=False)
        if cfg.vit_parallel_blocks:
            self.blocks = nn.ModuleList(ParallelVisionBlock(cfg) for _ in range(cfg.vit_depth // 2))
        else:
            self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.vit_depth))
        self.post_ln = nn.LayerNorm(cfg.vit_width, eps=cfg.vit_ln_eps)
        self.grad_checkpointing = False
        # from scratch, initialise as ViT's reference code does (xavier-uniform matrices, zero
        # biases, LeCun-normal patches): PyTorch's defaults learned to read words ~2x slower (README)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.Conv2d):
                nn.init.trunc_normal_(m.weight, std=m.weight[0].numel() ** -0.5)
                nn.init.zeros_(m.bias)

    def position_embedding(self, grid_h, grid_w):
        g = self.cfg.vit_image_size // self.cfg.vit_patch_size
        if (grid_h, grid_w) == (g, g):
            return self.pos_embed
        if self.cfg.vit_pos_embed != "learned":
            return sincos_2d(grid_h, grid_w, self.cfg.vit_width).to(self.pos_embed)
        # another resolution: resize the learned g x g table bicubically (as transformers'
        # interpolate_pos_encoding=True does, without antialiasing)
        table = self.pos_embed.view(1, g, g, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        return table.permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1)

    def forward(self, pixel_values):
        x = self.patch_embed(pixel_values.to(self.post_ln.weight.dtype))  # [N, D, H/p, W/p]
        x = x.flatten(2).transpose(1, 2) + self.position_embedding(*x.shape[2:])
        for block in self.blocks:
            x = run_block(self, block, x)
        return self.post_ln(x)

    @classmethod
    def from_pretrained(cls, path, **overrides):
        """A SigLIP checkpoint (SiglipModel or SiglipVisionModel): directory or hub id."""
        path = resolve_checkpoint(path)
        config = read_config(os.path.join(path, "config.json"))
        cfg = parse_config(path, lambda: vision_config_from_hf(config.get("vision_config", config), **overrides))
        if cfg.vit_stem != "patch" or cfg.vit_parallel_blocks:
            raise UserError(f"{path}: SigLIP weights load into a patch stem and sequential blocks only")
        model = cls(cfg)
        state = read_safetensors(path)
        prefix = "vision_model." if any(k.startswith("vision_model.") for k in state) else ""
        # SiglipModel also holds the text tower and logit scale/bias; the attention-pool head
        # is for contrastive training. A VLM uses neither, so they are skipped on purpose.
        ignore = ("text_model.", "logit_scale", "logit_bias", prefix + "head.")
        load_mapped(model, siglip_key_map(cfg, prefix), state, ignore, source=path)
        return model


# ----------------------------------------------------------------------------- 3. projector

def pixel_shuffle(x, s):
    """[N, h*w, D] -> [N, h*w/s^2, D*s^2]: each s x s block of patches becomes one token whose
    channels are ordered (row in block, column in block, D), the order SmolVLM/Idefics3 use."""
    N, L, D = x.shape
    g = math.isqrt(L)
    x = x.view(N, g // s, s, g // s, s, D).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(N, L // (s * s), s * s * D)


class Projector(nn.Module):
    """SmolVLM/Idefics3 (mp_type "pixel_shuffle"): pixel shuffle + one linear layer."""

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.s = cfg.mp_pixel_shuffle
        self.proj = nn.Linear(cfg.vision.vit_width * self.s ** 2, cfg.lm.lm_hidden, bias=False)

    def forward(self, x):
        return self.proj(pixel_shuffle(x, self.s))


class MLPProjector(nn.Module):
    """LLaVA-1.5 (transformers' LlavaMultiModalProjector): Linear, GELU, Linear; with s > 1 after a
    pixel shuffle (s = 1: LLaVA's one token per patch)."""

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.s = cfg.mp_pixel_shuffle
        self.fc1 = nn.Linear(cfg.vision.vit_width * self.s ** 2, cfg.lm.lm_hidden)
        self.proj = nn.Linear(cfg.lm.lm_hidden, cfg.lm.lm_hidden)

    def forward(self, x):
        return self.proj(F.gelu(self.fc1(pixel_shuffle(x, self.s))))


class PatchMerger(nn.Module):
    """Qwen2.5-VL (Qwen2_5_VLPatchMerger): RMSNorm per patch, each s x s block concatenated (our pixel
    shuffle's order = the 2x2-grouped order of Qwen's processor), Linear, GELU, Linear."""

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.s, width = cfg.mp_pixel_shuffle, cfg.vision.vit_width * cfg.mp_pixel_shuffle ** 2
        self.norm = RMSNorm(cfg.vision.vit_width, 1e-6)
        self.fc1 = nn.Linear(width, width)
        self.proj = nn.Linear(width, cfg.lm.lm_hidden)

    def forward(self, x):
        return self.proj(F.gelu(self.fc1(pixel_shuffle(self.norm(x), self.s))))


class AvgPoolProjector(nn.Module):
    """Gemma 3 (Gemma3MultiModalProjector): s x s average pooling of the patch grid (Gemma 3: 64 x 64
    -> 16 x 16), an RMSNorm that scales by (1 + w), one bias-free matrix."""

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.s = cfg.mp_pixel_shuffle
        self.norm_weight = nn.Parameter(torch.zeros(cfg.vision.vit_width))  # 0: the norm starts as x / rms(x)
        self.eps = cfg.vision.vit_ln_eps
        self.proj = nn.Linear(cfg.vision.vit_width, cfg.lm.lm_hidden, bias=False)

    def forward(self, x):
        N, L, D = x.shape
        g = math.isqrt(L)
        x = F.avg_pool2d(x.transpose(1, 2).reshape(N, D, g, g), self.s).flatten(2).transpose(1, 2)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.norm_weight.float())
        return self.proj(h.to(x.dtype))


class AttentionPoolProjector(nn.Module):
    """Molmo2 (Molmo2Adapter): each s x s block is pooled by one attention whose query is the block's
    mean and whose keys/values are its patches, then a SwiGLU MLP as wide as the LM's."""

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.s, self.heads, d = cfg.mp_pixel_shuffle, cfg.vision.vit_heads, cfg.vision.vit_width
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.gate = nn.Linear(d, cfg.lm.lm_intermediate, bias=False)
        self.up = nn.Linear(d, cfg.lm.lm_intermediate, bias=False)
        self.proj = nn.Linear(cfg.lm.lm_intermediate, cfg.lm.lm_hidden, bias=False)

    def forward(self, x):
        N, L, D = x.shape
        patches = pixel_shuffle(x, self.s).view(-1, self.s ** 2, D)  # [N * tokens, s*s, D]

        def split(t):  # [n, len, D] -> [n, heads, len, hd]
            return t.view(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)
        q, k, v = split(self.q(patches.mean(1, keepdim=True))), split(self.k(patches)), split(self.v(patches))
        y = self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(N, -1, D))
        return self.proj(F.silu(self.gate(y)) * self.up(y))


# mp_type -> class; each makes one LM token of every s x s block of patches (s = mp_pixel_shuffle)
PROJECTORS = {"pixel_shuffle": Projector, "mlp": MLPProjector, "patch_merger": PatchMerger,
              "avg_pool": AvgPoolProjector, "attention_pool": AttentionPoolProjector}


# ----------------------------------------------------------------------------- 4. language model

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32, cast back, THEN scale: the order transformers' Llama uses
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(position_ids, head_dim, theta, dtype):
    """cos/sin [B,1,T,hd] for rotate-half RoPE, computed in fp32 then cast to the activations."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device,
                                            dtype=torch.float32) / head_dim)
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache(nn.Module):
    """Static, pre-allocated keys/values [B, kv_heads, max_len, hd] (gpt-fast style): a fixed
    shape lets the decode step be compiled once and replayed as a CUDA graph."""

    def __init__(self, batch, kv_heads, max_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots, k, v):
        self.k.index_copy_(2, slots, k.to(self.k.dtype))  # under autocast k/v may be bf16
        self.v.index_copy_(2, slots, v.to(self.v.dtype))
        return self.k, self.v


class LMAttention(nn.Module):
    def __init__(self, c: LanguageConfig):
        super().__init__()
        self.heads, self.kv_heads, self.hd = c.lm_heads, c.lm_kv_heads, c.head_dim
        self.qkv = nn.Linear(c.lm_hidden, (c.lm_heads + 2 * c.lm_kv_heads) * c.head_dim, bias=False)
        self.qkv_sizes = [c.lm_heads * c.head_dim] + [c.lm_kv_heads * c.head_dim] * 2  # q, k, v (GQA)
        self.proj = nn.Linear(c.lm_heads * c.head_dim, c.lm_hidden, bias=False)
        self.cache = None
        self.one_query = one_query_attention  # a compiled CPU decode step's (inference.py may swap in its kernel)

    def forward(self, x, cos, sin, mask, slots):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(self.qkv_sizes, dim=-1)
        q = apply_rope(q.view(B, T, self.heads, self.hd).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(B, T, self.kv_heads, self.hd).transpose(1, 2), cos, sin)
        v = v.view(B, T, self.kv_heads, self.hd).transpose(1, 2)
        if slots is not None:
            k, v = self.cache.update(slots, k, v)
        if T == 1 and mask is not None and x.device.type == "cpu" and torch.compiler.is_compiling():
            y = self.one_query(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=self.kv_heads != self.heads)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


def one_query_attention(q, k, v, mask):
    """SDPA for a decode step (q [B,H,1,D] over the cache k, v [B,KV,L,D]; grouped heads as
    enable_gqa) written as two matmuls: compiled for a CPU, inductor fuses the mask and softmax
    between them, and it ran a SmolLM2 decode step 4-10% faster than SDPA's kernel (docs/experiments.md)."""
    B, H, T, D = q.shape
    KV = k.shape[1]
    s = (q.reshape(B, KV, H // KV * T, D) * D ** -0.5) @ k.transpose(-1, -2)
    s = s.view(B, KV, H // KV, T, -1).masked_fill(~mask[:, :, None], float("-inf")).softmax(-1)
    return (s.view(B, KV, H // KV * T, -1) @ v).view(B, H, T, D)


class LMBlock(nn.Module):
    def __init__(self, c: LanguageConfig):
        super().__init__()
        self.ln1 = RMSNorm(c.lm_hidden, c.lm_rms_eps)
        self.attn = LMAttention(c)
        self.ln2 = RMSNorm(c.lm_hidden, c.lm_rms_eps)
        # SwiGLU; gate and up stay two matmuls: oneDNN ran one fused [2 x 1536, 576] product 7-18%
        # slower for 256-528 rows (a prefill) on 2 AVX2 cores, and no faster for 1 row
        self.gate = nn.Linear(c.lm_hidden, c.lm_intermediate, bias=False)
        self.up = nn.Linear(c.lm_hidden, c.lm_intermediate, bias=False)
        self.down = nn.Linear(c.lm_intermediate, c.lm_hidden, bias=False)

    def forward(self, x, cos, sin, mask, slots):
        x = x + self.attn(self.ln1(x), cos, sin, mask, slots)
        h = self.ln2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def attention_mask_4d(q_seg, k_seg, q_slot, k_slot, q_block=None, k_block=None):
    """Boolean [B,1,Tq,Tk]: a query sees earlier keys of its own segment.
    Segment ids: 0 = padding, 1.. = samples (a plain 0/1 attention mask is one segment), so
    packed samples never attend to each other. Each query also sees itself, so a padding row
    is never all-masked (which would give NaN). With image block ids (image_blocks), a query
    also sees the later keys of its own image block."""
    causal = k_slot[None, None, :] <= q_slot[None, :, None]
    if q_block is not None:
        causal = causal | ((q_block[:, :, None] == k_block[:, None, :]) & (q_block[:, :, None] > 0))
    same = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] > 0)
    return ((same & causal) | (k_slot[None, None, :] == q_slot[None, :, None]))[:, None]


def image_blocks(is_image):
    """[B,T] bool -> ids 1, 2, .. of each contiguous run of image tokens, 0 for text: Gemma 3's rule
    lets the tokens of one run (an image, or a tile of a split image) see each other."""
    starts = is_image.clone()
    starts[:, 1:] &= ~is_image[:, :-1]
    return torch.where(is_image, starts.long().cumsum(1), 0)


def positions_from_segments(seg):
    """Position ids that restart at 0 at every segment start (left padding, packed samples)."""
    idx = torch.arange(seg.shape[1], device=seg.device).expand_as(seg)
    starts = torch.ones_like(seg, dtype=torch.bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    return idx - torch.cummax(torch.where(starts, idx, 0), dim=1).values


class LanguageModel(nn.Module):
    """Llama/SmolLM2 decoder: [B,T] token ids (or embeddings) -> [B,T,V] logits."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embed = nn.Embedding(cfg.lm_vocab, cfg.lm_hidden)
        self.blocks = nn.ModuleList(LMBlock(cfg) for _ in range(cfg.lm_layers))
        self.norm = RMSNorm(cfg.lm_hidden, cfg.lm_rms_eps)
        self.lm_head = nn.Linear(cfg.lm_hidden, cfg.lm_vocab, bias=False)
        self.grad_checkpointing = False
        nn.init.normal_(self.tok_embed.weight, std=0.02)  # N(0, 1) would give huge tied logits
        if cfg.lm_tie_embeddings:
            self.lm_head.weight = self.tok_embed.weight

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
                slots=None, hidden_only=False, image_blocks=None):
        """attention_mask: [B,T] segment ids (0/1 padding mask, or 1,2,.. for packed samples);
        with a KV cache (`slots` = the cache rows these T tokens fill) it covers the whole cache,
        as image_blocks ([B,T] image_blocks() ids: bidirectional attention within each) does.
        hidden_only: return the final normed hidden states instead of logits."""
        x = self.tok_embed(input_ids) if inputs_embeds is None else inputs_embeds
        T = x.shape[1]
        if image_blocks is not None and attention_mask is None:
            attention_mask = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
        mask = None  # plain causal attention: SDPA's fastest path
        if slots is not None:
            k_slot = torch.arange(attention_mask.shape[1], device=x.device)
            q_seg = attention_mask[:, slots]
            q_block = None if image_blocks is None else image_blocks[:, slots]
            mask = attention_mask_4d(q_seg, attention_mask, slots, k_slot, q_block, image_blocks)
        elif attention_mask is not None:
            q_seg = attention_mask
            idx = torch.arange(T, device=x.device)
            mask = attention_mask_4d(q_seg, q_seg, idx, idx, image_blocks, image_blocks)
        if position_ids is None:
            position_ids = (positions_from_segments(q_seg) if mask is not None else
                            torch.arange(T, device=x.device)[None])
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.lm_rope_theta, x.dtype)
        for block in self.blocks:
            x = run_block(self, block, x, cos, sin, mask, slots)
        x = self.norm(x)
        return x if hidden_only else self.lm_head(x)

    def setup_cache(self, batch, max_len, dtype=None, device=None):
        p = self.tok_embed.weight
        for block in self.blocks:
            a = block.attn
            a.cache = KVCache(batch, a.kv_heads, max_len, a.hd, dtype or p.dtype, device or p.device)

    def resize_vocab(self, n):
        """Grow the embedding (and head) to n rows; new rows start at the mean embedding, so new
        tokens begin as an 'average' token instead of random noise."""
        def grown(w):
            return nn.Parameter(torch.cat([w, w.mean(0, keepdim=True).expand(n - w.shape[0], -1)]))
        self.tok_embed = nn.Embedding(n, self.cfg.lm_hidden, _weight=grown(self.tok_embed.weight.data))
        head = self.tok_embed.weight if self.cfg.lm_tie_embeddings else grown(self.lm_head.weight.data)
        self.lm_head = nn.Linear(self.cfg.lm_hidden, n, bias=False, device="meta")  # its weight is replaced
        self.lm_head.weight = head
        self.cfg = dataclasses.replace(self.cfg, lm_vocab=n)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, **kw):
        return generate(self, self.tok_embed(input_ids), attention_mask, **kw)

    @classmethod
    def from_pretrained(cls, path):
        """A Llama-family checkpoint: a .gguf file, a transformers directory, or a hub id."""
        if str(path).endswith(".gguf"):
            return load_gguf(path)
        path = resolve_checkpoint(path)
        config = read_config(os.path.join(path, "config.json"))
        if config.get("model_type") not in ("llama", "mistral", "smollm3", None):
            raise UserError(f"{path}: model_type {config.get('model_type')!r} is not a Llama-family LM")
        cfg = parse_config(path, lambda: lm_config_from_hf(config))
        model = cls(cfg)
        load_mapped(model, llama_key_map(cfg, "model.", "lm_head."), read_safetensors(path),
                    ignore=("model.rotary_emb.",), source=path)
        return model


# ----------------------------------------------------------------------------- 5. VLM

class VLM(nn.Module):
    """image -> ViT -> projector -> LM tokens, written into the text at <image> positions."""

    def __init__(self, cfg: VLMConfig, vision=None, lm=None, projector=None):
        super().__init__()
        self.cfg = cfg
        self.vision = vision or VisionTransformer(cfg.vision)
        self.projector = projector or PROJECTORS[cfg.mp_type](cfg)
        self.lm = lm or LanguageModel(cfg.lm)
        self.lora = None  # add_lora's settings while the model has adapters

    def image_embeds(self, pixel_values):
        """[n_img, 3, S, S] (any leading dims) -> [n_img, tokens, LM width]"""
        return self.projector(self.vision(pixel_values.flatten(0, -4)))

    def image_blocks(self, input_ids):
        """lm_image_attention "bidirectional": image_blocks() ids for the LM's mask; else None."""
        if self.cfg.lm_image_attention == "causal":
            return None
        return image_blocks(input_ids == self.cfg.image_token_id)

    def embed(self, input_ids, pixel_values=None):
        x = self.lm.tok_embed(input_ids)
        is_image = input_ids == self.cfg.image_token_id
        if pixel_values is None:
            if not torch.compiler.is_compiling() and is_image.any():
                raise ValueError("the prompt has <image> tokens but no pixel_values were given")
            return x
        images = self.image_embeds(pixel_values)
        if not torch.compiler.is_compiling() and int(is_image.sum()) != images.shape[0] * images.shape[1]:
            raise ValueError(f"the prompt has {int(is_image.sum())} image tokens but {images.shape[0]} "
                             f"image(s) give {images.shape[0] * images.shape[1]}: build prompts with Processor")
        # fills the image positions in reading order: image 1's tokens first, then image 2's, ...
        return x.masked_scatter(is_image[..., None], images.to(x.dtype))

    def forward(self, input_ids, pixel_values=None, attention_mask=None, labels=None):
        """Returns (logits, loss). With labels (input_ids with -100 where not supervised; shifted
        here), the LM head runs only at supervised positions and logits is [n_supervised, V]:
        answer-only training skips most of the head's cost."""
        x, blocks = self.embed(input_ids, pixel_values), self.image_blocks(input_ids)
        if labels is None:
            return self.lm(inputs_embeds=x, attention_mask=attention_mask, image_blocks=blocks), None
        h = self.lm(inputs_embeds=x, attention_mask=attention_mask, hidden_only=True, image_blocks=blocks)
        targets = labels[:, 1:]
        keep = targets != -100
        logits = self.lm.lm_head(h[:, :-1][keep])
        return logits, F.cross_entropy(logits.float(), targets[keep])

    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, attention_mask=None, **kw):
        return generate(self.lm, self.embed(input_ids, pixel_values), attention_mask,
                        image_blocks=self.image_blocks(input_ids), **kw)

    def set_grad_checkpointing(self, on=True):
        """Recompute the ViT's and the LM's blocks in the backward instead of keeping their activations."""
        self.vision.grad_checkpointing = self.lm.grad_checkpointing = on

    # LoRA (section 8): adapters on frozen weights, saved in PEFT's format
    def add_lora(self, rank=8, alpha=16, dropout=0.0, targets=("lm",), trainable=()):
        return add_lora(self, rank, alpha, dropout, targets, trainable)

    def save_lora(self, path, base_model=""):
        return save_lora(self, path, base_model)

    def load_lora(self, path):
        return load_lora(self, path)

    def merge_lora(self):
        return merge_lora(self)

    def save_pretrained(self, path, processor=None, format="picovlm", gguf_type="f32"):
        """Our format (config.json + model.safetensors), or format="smolvlm": what transformers
        loads as SmolVLMForConditionalGeneration, or format="gguf": llama.cpp's two files, the
        language model (gguf_type f32, f16, bf16, q8_0 or q4_1) and the vision tower + projector
        (gguf_export.py; -> their paths). With a processor, its files too (gguf: required)."""
        if format == "smolvlm":
            return export_smolvlm(self, path, processor)
        if format == "gguf":
            from gguf_export import export_gguf  # the GGUF writer lives beside the model, not in it
            return export_gguf(self, path, processor, gguf_type)
        if format != "picovlm":
            raise UserError(f"save_pretrained: unknown format {format!r} (picovlm, smolvlm, gguf)")
        os.makedirs(path, exist_ok=True)
        state = {k: v for k, v in merged_state_dict(self).items()
                 if not (self.cfg.lm.lm_tie_embeddings and k == "lm.lm_head.weight")}
        atomic_save_safetensors(state, os.path.join(path, "model.safetensors"))
        atomic_write(os.path.join(path, "config.json"), json.dumps(self.cfg.to_dict(), indent=2))
        if processor is not None:
            processor.save_pretrained(path)

    @classmethod
    def from_pretrained(cls, path):
        """A picoVLM directory (ours), or a SmolVLM/Idefics3 directory or hub id."""
        path = resolve_checkpoint(path)
        config = read_config(os.path.join(path, "config.json"))
        kind = config.get("model_type")
        if kind in ("smolvlm", "idefics3"):
            cfg = parse_config(path, lambda: smolvlm_config(config))
            model = cls(cfg)
            load_mapped(model, smolvlm_key_map(cfg), read_safetensors(path), source=path)
            return model
        if kind != "picovlm":
            raise UserError(f"{path}: model_type {kind!r} is not a picoVLM, SmolVLM or Idefics3 checkpoint")
        cfg = parse_config(path, lambda: VLMConfig.from_dict(config))  # checked before anything is built
        model = cls(cfg)
        plan = {k: [k] for k in model.state_dict()
                if not (cfg.lm.lm_tie_embeddings and k == "lm.lm_head.weight")}
        load_mapped(model, plan, read_safetensors(path), source=path)
        return model


# ----------------------------------------------------------------------------- 6. generation

def sample(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """[B,V] -> [B]: greedy when temperature is 0, else softmax sampling with top-k / top-p."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def decode_step(lm, token, attention_mask, position, slot):
    """One token per sequence through the cached LM: the part worth compiling."""
    return lm(token, attention_mask=attention_mask, position_ids=position, slots=slot)[:, -1]


def prefill_step(lm, inputs_embeds, attention_mask, position_ids, slots, image_blocks=None):
    """The prompts into the cache; the head runs at the last position only (compiled apart)."""
    h = lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
           slots=slots, hidden_only=True, image_blocks=image_blocks)
    return lm.lm_head(h[:, -1])


@torch.no_grad()
def generate(lm, inputs_embeds, attention_mask=None, max_new_tokens=64, temperature=0.0, top_k=None,
             top_p=None, eos_token_id=2, pad_token_id=None, generator=None, on_token=None, step=None,
             cache_len=None, prefill=None, image_blocks=None):
    """Prefill the (left-padded) prompts once, then decode one token per step from the static KV
    cache. A sequence that produced EOS gets padding afterwards; the loop stops when all have.
    Returns [B, n] new token ids (n <= max_new_tokens). on_token(tokens [B]) is called each step
    (streaming); step / prefill replace decode_step / prefill_step (e.g. torch.compile'd ones).
    image_blocks: [B,T] ids of the prompts' image blocks (bidirectional image attention); the new
    tokens are text, so decoding needs none."""
    B, T, _ = inputs_embeds.shape
    device = inputs_embeds.device
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.long, device=device)
    total = T + max_new_tokens
    if total > lm.cfg.lm_max_positions:
        raise ValueError(f"prompt of {T} tokens + {max_new_tokens} new tokens exceeds the context "
                         f"of {lm.cfg.lm_max_positions}")
    cache_len = cache_len or total
    cache = lm.blocks[0].attn.cache
    if cache is None or cache.k.shape[0] != B or cache.k.shape[2] < cache_len or cache.k.dtype != inputs_embeds.dtype:
        lm.setup_cache(B, cache_len, inputs_embeds.dtype, device)
    segments = torch.zeros(B, lm.blocks[0].attn.cache.k.shape[2], dtype=torch.long, device=device)
    segments[:, :T] = attention_mask
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens from 0
    blocks = None
    if image_blocks is not None:  # over the cache, as segments
        blocks = torch.zeros_like(segments)
        blocks[:, :T] = image_blocks
    logits = (prefill or prefill_step)(lm, inputs_embeds, segments, positions, torch.arange(T, device=device), blocks)
    position = positions[:, -1:]
    step = step or decode_step
    eos = torch.tensor(eos_token_id, device=device).flatten()  # one id or several (e.g. SmolVLM's)
    pad = int(eos[0]) if pad_token_id is None else pad_token_id
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out = []
    for i in range(max_new_tokens):
        token = sample(logits, temperature, top_k, top_p, generator)
        token = torch.where(done, pad, token)
        out.append(token)
        if on_token is not None:
            on_token(token)
        done |= torch.isin(token, eos)
        if bool(done.all()) or i == max_new_tokens - 1:
            break
        segments[:, T + i] = 1
        position = position + 1
        logits = step(lm, token[:, None], segments, position, torch.tensor([T + i], device=device)).clone()
    return torch.stack(out, 1)


# ----------------------------------------------------------------------------- 7. loading and saving

def load_mapped(model, plan, state, ignore=(), source="checkpoint"):
    """Load `state` (checkpoint names) into `model` through `plan`: our key -> the checkpoint
    keys that make it (several are concatenated along dim 0, e.g. q,k,v -> our fused qkv).
    Missing, unexpected (unless under an `ignore` prefix) or mis-shaped keys fail loudly."""
    missing = sorted(k for src in plan.values() for k in src if k not in state)
    used = {k for src in plan.values() for k in src}
    unexpected = sorted(k for k in state if k not in used and not k.startswith(tuple(ignore)))
    if missing or unexpected:
        raise UserError(f"{source}: " + "; ".join(
            f"{what} keys ({len(keys)}): {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys))
    ours = model.state_dict()
    new = {}
    for key, src in plan.items():
        tensor = torch.cat([state[k] for k in src]) if len(src) > 1 else state[src[0]]
        if tensor.shape != ours[key].shape:
            raise UserError(f"{source}: {'+'.join(src)} has shape {tuple(tensor.shape)}, "
                                  f"the model expects {tuple(ours[key].shape)} for {key}")
        new[key] = tensor.to(ours[key].dtype)
    model.load_state_dict(new, strict=False)  # plan covers every key but tied copies (checked in tests)


def siglip_key_map(cfg: VisionConfig, prefix=""):
    plan = {"patch_embed.weight": [prefix + "embeddings.patch_embedding.weight"],
            "patch_embed.bias": [prefix + "embeddings.patch_embedding.bias"],
            "post_ln.weight": [prefix + "post_layernorm.weight"],
            "post_ln.bias": [prefix + "post_layernorm.bias"]}
    if cfg.vit_pos_embed == "learned":
        plan["pos_embed"] = [prefix + "embeddings.position_embedding.weight"]
    for i in range(cfg.vit_depth):
        src, dst = f"{prefix}encoder.layers.{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            plan[dst + f"attn.qkv.{p}"] = [src + f"self_attn.{n}_proj.{p}" for n in "qkv"]
            for ours, theirs in (("ln1", "layer_norm1"), ("ln2", "layer_norm2"), ("attn.proj", "self_attn.out_proj"),
                                 ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")):
                plan[dst + f"{ours}.{p}"] = [src + f"{theirs}.{p}"]
    return plan


def llama_key_map(cfg: LanguageConfig, prefix="model.", head="lm_head."):
    plan = {"tok_embed.weight": [prefix + "embed_tokens.weight"], "norm.weight": [prefix + "norm.weight"]}
    if not cfg.lm_tie_embeddings:
        plan["lm_head.weight"] = [head + "weight"]
    for i in range(cfg.lm_layers):
        src, dst = f"{prefix}layers.{i}.", f"blocks.{i}."
        plan.update({dst + "ln1.weight": [src + "input_layernorm.weight"],
                     dst + "attn.qkv.weight": [src + f"self_attn.{n}_proj.weight" for n in "qkv"],
                     dst + "attn.proj.weight": [src + "self_attn.o_proj.weight"],
                     dst + "ln2.weight": [src + "post_attention_layernorm.weight"],
                     dst + "gate.weight": [src + "mlp.gate_proj.weight"],
                     dst + "up.weight": [src + "mlp.up_proj.weight"],
                     dst + "down.weight": [src + "mlp.down_proj.weight"]})
    return plan


def unmapped(ours, plan, lm: LanguageConfig, lm_prefix=""):
    """load_mapped's inverse: our tensors under the checkpoint's names, fused ones split back
    (the LM's q, k, v have GQA's sizes; the ViT's q, k, v are equal thirds)."""
    qkv = [lm.lm_heads * lm.head_dim] + [lm.lm_kv_heads * lm.head_dim] * 2
    state = {}
    for key, src in plan.items():
        is_lm_qkv = key.startswith(lm_prefix + "blocks.") and key.endswith("attn.qkv.weight")
        parts = ours[key].split(qkv if is_lm_qkv else ours[key].shape[0] // len(src))
        state.update((name, part.contiguous()) for name, part in zip(src, parts))
    return state


def prefixed(plan, prefix):
    return {prefix + k: v for k, v in plan.items()}


def vision_config_from_hf(v, **overrides):
    return VisionConfig(**{"vit_image_size": v.get("image_size", 224), "vit_patch_size": v.get("patch_size", 16),
                           "vit_depth": v["num_hidden_layers"], "vit_width": v["hidden_size"],
                           "vit_heads": v["num_attention_heads"], "vit_mlp_dim": v["intermediate_size"],
                           "vit_ln_eps": v.get("layer_norm_eps", 1e-6), **overrides})


def lm_config_from_hf(t, tie=None):
    rope = t.get("rope_parameters") or {}  # transformers 5 nests rope_theta here
    return LanguageConfig(
        lm_hidden=t["hidden_size"], lm_layers=t["num_hidden_layers"], lm_heads=t["num_attention_heads"],
        lm_kv_heads=t.get("num_key_value_heads") or t["num_attention_heads"],
        lm_intermediate=t["intermediate_size"], lm_vocab=t["vocab_size"],
        lm_rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 10000.0))),
        lm_rms_eps=t.get("rms_norm_eps", 1e-6), lm_max_positions=t.get("max_position_embeddings", 8192),
        lm_tie_embeddings=bool(t.get("tie_word_embeddings", False) if tie is None else tie))


def lm_config_to_hf(c: LanguageConfig):
    return {"model_type": "llama", "hidden_size": c.lm_hidden, "num_hidden_layers": c.lm_layers,
            "num_attention_heads": c.lm_heads, "num_key_value_heads": c.lm_kv_heads,
            "intermediate_size": c.lm_intermediate, "vocab_size": c.lm_vocab, "rms_norm_eps": c.lm_rms_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": c.lm_rope_theta},
            "rope_theta": c.lm_rope_theta, "max_position_embeddings": c.lm_max_positions,
            "tie_word_embeddings": c.lm_tie_embeddings, "hidden_act": "silu", "head_dim": c.head_dim}


# -- GGUF (llama.cpp files): dequantized with the `gguf` package

GGUF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def gguf_hf_name(name):
    """llama.cpp tensor name -> transformers Llama name."""
    if m := re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name):
        return f"model.layers.{m[1]}.{GGUF_NAMES.get(m[2], m[2])}.weight"
    return {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}.get(name, name)


def load_gguf(path):
    meta, tensors, vocab = read_gguf(path)
    if meta.get("general.architecture") != "llama":
        raise UserError(f"{path}: architecture {meta.get('general.architecture')!r} is not llama")
    cfg = parse_config(path, lambda: LanguageConfig(
        lm_hidden=meta["llama.embedding_length"], lm_layers=meta["llama.block_count"],
        lm_heads=meta["llama.attention.head_count"], lm_kv_heads=meta["llama.attention.head_count_kv"],
        lm_intermediate=meta["llama.feed_forward_length"], lm_vocab=vocab,
        lm_rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        lm_rms_eps=float(meta["llama.attention.layer_norm_rms_epsilon"]),
        lm_max_positions=meta.get("llama.context_length", 8192),
        lm_tie_embeddings="output.weight" not in tensors))
    state = {}
    for name, w in tensors.items():
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            # llama.cpp stores q/k rows interleaved (pairs) for its RoPE; transformers' rotate-half
            # RoPE wants each head's first halves, then second halves: undo the permutation.
            heads = cfg.lm_heads if "attn_q" in name else cfg.lm_kv_heads
            w = w.view(heads, cfg.head_dim // 2, 2, -1).transpose(1, 2).reshape(w.shape)
        state[gguf_hf_name(name)] = w
    model = LanguageModel(cfg)
    load_mapped(model, llama_key_map(cfg), state, source=path)
    return model


# -- SmolVLM / Idefics3 (transformers) checkpoints

def smolvlm_key_map(cfg: VLMConfig):
    """Our VLM keys -> SmolVLM/Idefics3 keys (same layout for both)."""
    return {**prefixed(siglip_key_map(cfg.vision, "model.vision_model."), "vision."),
            "projector.proj.weight": ["model.connector.modality_projection.proj.weight"],
            **prefixed(llama_key_map(cfg.lm, "model.text_model.", "lm_head."), "lm.")}


def smolvlm_config(config):
    v, t = config["vision_config"], config["text_config"]
    tie = config.get("tie_word_embeddings", t.get("tie_word_embeddings", False))
    return VLMConfig(vision=vision_config_from_hf(v), lm=lm_config_from_hf(t, tie),
                     mp_pixel_shuffle=config.get("scale_factor", 2), image_token_id=config["image_token_id"])


def smolvlm_unlike(cfg: VLMConfig, parts=("vision", "projector", "lm")):
    """The settings of these parts that SmolVLM/Idefics3 (transformers', llama.cpp's) does not have:
    "" when it computes the same model."""
    odd = [("vision", "vit_stem", cfg.vision.vit_stem, "patch"),
           ("vision", "vit_parallel_blocks", cfg.vision.vit_parallel_blocks, False),
           ("projector", "mp_type", cfg.mp_type, "pixel_shuffle"),
           ("lm", "lm_image_attention", cfg.lm_image_attention, "causal")]
    return ", ".join(f"{name}={value!r}" for part, name, value, usual in odd if part in parts and value != usual)


def export_smolvlm(vlm, path, processor=None):
    """Write a directory that transformers loads as SmolVLMForConditionalGeneration (and, when
    the processor is given, as its SmolVLMProcessor)."""
    cfg, v = vlm.cfg, vlm.cfg.vision
    if unlike := smolvlm_unlike(cfg):
        raise UserError(f"format smolvlm: SmolVLM has no {unlike} (a SigLIP ViT, pixel shuffle, causal "
                        f"attention); keep this model in the picovlm format")
    os.makedirs(path, exist_ok=True)
    state = unmapped(merged_state_dict(vlm), smolvlm_key_map(cfg), cfg.lm, "lm.")
    config = {
        "model_type": "smolvlm", "architectures": ["SmolVLMForConditionalGeneration"],
        "image_token_id": cfg.image_token_id, "scale_factor": cfg.mp_pixel_shuffle,
        "tie_word_embeddings": cfg.lm.lm_tie_embeddings, "text_config": lm_config_to_hf(cfg.lm),
        "vision_config": {"model_type": "smolvlm_vision", "hidden_size": v.vit_width,
                          "intermediate_size": v.vit_mlp_dim, "num_hidden_layers": v.vit_depth,
                          "num_attention_heads": v.vit_heads, "image_size": v.vit_image_size,
                          "patch_size": v.vit_patch_size, "layer_norm_eps": v.vit_ln_eps}}
    if v.vit_pos_embed != "learned":  # transformers only knows a learned table: store ours as one
        g = v.vit_image_size // v.vit_patch_size
        state["model.vision_model.embeddings.position_embedding.weight"] = sincos_2d(g, g, v.vit_width)
    atomic_save_safetensors(state, os.path.join(path, "model.safetensors"))
    atomic_write(os.path.join(path, "config.json"), json.dumps(config, indent=2))
    if processor is not None:
        processor.save_pretrained(path, format="smolvlm")


# ----------------------------------------------------------------------------- 8. LoRA

class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update: y = base(x) + B A dropout(x) * alpha/r
    (LoRA; PEFT's names and initialisation: A Kaiming-uniform, B zero, so a new adapter changes
    nothing). A fused layer (our q,k,v) gets one (A, B) pair per output slice, as PEFT gives
    transformers' separate q_proj, k_proj, v_proj. The adapters are fp32 whatever the base's dtype."""

    def __init__(self, base, rank, alpha, dropout=0.0, sizes=None):
        super().__init__()
        out_features, in_features = base.weight.shape
        self.base, self.scaling = base, alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        kw = dict(device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.ParameterList(nn.Parameter(torch.empty(rank, in_features, **kw))
                                       for _ in sizes or [out_features])
        self.lora_B = nn.ParameterList(nn.Parameter(torch.zeros(n, rank, **kw)) for n in sizes or [out_features])
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def forward(self, x):
        h = self.dropout(x)
        parts = [F.linear(F.linear(h, a), b) for a, b in zip(self.lora_A, self.lora_B)]
        return self.base(x) + (parts[0] if len(parts) == 1 else torch.cat(parts, -1)) * self.scaling

    @torch.no_grad()
    def merged_weight(self):
        w = self.base.weight
        delta = torch.cat([b @ a for a, b in zip(self.lora_A, self.lora_B)]) * self.scaling
        return (w.float() + delta).to(w.dtype)


LORA_PARTS = ("lm", "vision", "projector")
# the same linears in transformers' SmolVLM/Idefics3 (PEFT's target_modules: a regex on the full
# name, since the vision tower has q/k/v_proj too), and the modules that hold a fully trainable part
PEFT_TARGETS = {"lm": r"model\.text_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)",
                "vision": r"model\.vision_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])",
                "projector": r"model\.connector\.modality_projection\.proj"}
PEFT_MODULES = {"lm": "text_model", "vision": "vision_model", "projector": "connector"}


def lora_modules(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def set_module(model, name, module):
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


def add_lora(vlm, rank=8, alpha=16, dropout=0.0, targets=("lm",), trainable=()):
    """Freeze vlm and wrap each linear layer of the `targets` parts in a LoRALinear: "lm" (every
    linear of its attention and MLP; not the head, tied to the embedding), "vision" (likewise),
    "projector". The `trainable` parts (vision, projector) stay fully trainable in fp32, as
    SmolVLM's recipe trains the connector."""
    targets, trainable = tuple(targets), tuple(trainable)
    if vlm.lora is not None:
        raise UserError("add_lora: the model has adapters already (merge_lora() first)")
    if not (targets and set(targets) <= set(LORA_PARTS) and set(trainable) <= {"vision", "projector"}
            and not set(targets) & set(trainable) and rank >= 1 and alpha > 0 and 0 <= dropout < 1):
        raise UserError(f"add_lora: rank {rank}, alpha {alpha}, dropout {dropout}, targets {targets} (of "
                        f"{LORA_PARTS}), trainable {trainable} (vision, projector; not targets): out of range")
    # (image attention changes no weight names: an LM adapter of a bidirectional model is fine)
    if unlike := smolvlm_unlike(vlm.cfg, [p for p in (*targets, *trainable) if p != "lm"]):
        raise UserError(f"add_lora: adapters are saved under SmolVLM's module names (PEFT's format) and "
                        f"SmolVLM has no {unlike}: adapt the LM only, with the other parts frozen")
    vlm.requires_grad_(False)
    for part in trainable:
        getattr(vlm, part).float().requires_grad_(True)
    for name, m in list(vlm.named_modules()):
        if isinstance(m, nn.Linear) and name.split(".")[0] in targets and name != "lm.lm_head":
            parent = vlm.get_submodule(name.rpartition(".")[0])
            sizes = parent.qkv_sizes if name.endswith(".qkv") else None  # a fused q,k,v: one adapter each
            set_module(vlm, name, LoRALinear(m, rank, alpha, dropout, sizes))
    vlm.lora = dict(rank=rank, alpha=alpha, dropout=dropout, targets=targets, trainable=trainable)
    return vlm


def peft_plan(vlm):
    """Our adapter (and fully trainable) parameters -> PEFT's keys for vlm's transformers twin (the
    SmolVLM names of smolvlm_key_map), in load_mapped's plan format."""
    names, plan = smolvlm_key_map(vlm.cfg), {}
    for name, _ in lora_modules(vlm):
        for i, src in enumerate(names[name + ".weight"]):  # q, k, v for a fused qkv
            for ab in ("lora_A", "lora_B"):
                plan[f"{name}.{ab}.{i}"] = [f"base_model.model.{src.removesuffix('.weight')}.{ab}.weight"]
    for key, src in names.items():  # PEFT's modules_to_save keep their own names
        if key.split(".")[0] in vlm.lora["trainable"]:
            plan[key] = ["base_model.model." + k for k in src]
    return plan


def save_lora(vlm, path, base_model=""):
    """adapter_config.json + adapter_model.safetensors in PEFT's format for the transformers model
    that vlm exports to (save_pretrained(format="smolvlm")): PeftModel.from_pretrained(that model,
    path) computes our logits."""
    if vlm.lora is None:
        raise UserError("save_lora: the model has no adapters (add_lora first)")
    s = vlm.lora
    config = {"peft_type": "LORA", "r": s["rank"], "lora_alpha": s["alpha"], "lora_dropout": s["dropout"],
              "target_modules": "|".join(f"({PEFT_TARGETS[p]})" for p in s["targets"]),
              "modules_to_save": [PEFT_MODULES[p] for p in s["trainable"]] or None, "bias": "none",
              "task_type": None, "base_model_name_or_path": base_model}
    os.makedirs(path, exist_ok=True)
    state = unmapped(vlm.state_dict(), peft_plan(vlm), vlm.cfg.lm, "lm.")
    atomic_save_safetensors(state, os.path.join(path, "adapter_model.safetensors"))
    atomic_write(os.path.join(path, "adapter_config.json"), json.dumps(config, indent=2))


def load_lora(vlm, path):
    """Adapters from save_lora or from PEFT (trained on vlm's transformers twin) onto vlm, which
    must have none: rank, alpha and the adapted and trainable parts are read from the files. A
    linear of an adapted part that the file leaves out (PEFT's target_modules=["q_proj", "v_proj"])
    keeps a zero update."""
    config = read_config(os.path.join(path, "adapter_config.json"))
    state = read_safetensors(path)
    unsupported = [k for k in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern") if config.get(k)]
    if config.get("peft_type") != "LORA" or unsupported:
        raise UserError(f"{path}: only plain LoRA adapters load (peft_type {config.get('peft_type')!r}"
                        f"{', ' + ', '.join(unsupported) if unsupported else ''})")

    def parts(lora):
        return [p for p in LORA_PARTS if any(k.startswith(f"base_model.model.model.{PEFT_MODULES[p]}.")
                                             and (".lora_" in k) == lora for k in state)]
    settings = parse_config(path, lambda: dict(rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                                               dropout=float(config.get("lora_dropout") or 0.0)))
    if not parts(True):
        raise UserError(f"{path}: no LoRA weights for a SmolVLM/Idefics3 model")
    add_lora(vlm, **settings, targets=parts(True), trainable=parts(False))
    plan = {k: src for k, src in peft_plan(vlm).items() if ".lora_" not in k or src[0] in state}
    load_mapped(vlm, plan, state, source=path)
    return vlm


def merge_lora(vlm):
    """Fold each adapter into its base weight and drop it: a plain model again (generation costs
    nothing extra), bit-identical to the saved merged model. Other weights are untouched."""
    for name, m in lora_modules(vlm):
        m.base.weight.data = m.merged_weight()
        set_module(vlm, name, m.base)
    vlm.lora = None
    return vlm


def merged_state_dict(model):
    """model.state_dict() with each adapter folded into its weight, under the plain model's names:
    what save_pretrained writes, so a checkpoint never depends on LoRA."""
    state = model.state_dict()
    for name, m in lora_modules(model):
        for key in [k for k in state if k.startswith(name + ".")]:
            del state[key]
        state.update({f"{name}.{k}": v for k, v in m.base.state_dict().items()})  # its bias, if any
        state[f"{name}.weight"] = m.merged_weight()
    return state
