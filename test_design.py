"""Tests of the design options of model.py: the projector types (mp_type) against the transformers
modules they re-implement, bidirectional image attention (lm_image_attention) against Gemma 3's
mask and through the cache / padding / packing paths, the hMLP stem and parallel ViT blocks
(vit_stem, vit_parallel_blocks), and what saving, exporting and LoRA do with them.

CPU, no network, random weights, fixed seeds, tiny shapes. Tolerances are max abs differences,
stated at each assert."""
import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

import model as M
from checkpoint import UserError
from conftest import max_diff, tiny_vlm

D, HIDDEN = 32, 64  # the tiny presets' ViT width (2 heads) and LM width (intermediate 128)


def projector(mp_type, s=2, grid=8):
    """Our projector of this type over a grid x grid patch grid (4 px patches), weights ~N(0, 0.2^2)
    (random, so that zero-initialised weights like avg_pool's norm are tested too)."""
    vision = dataclasses.replace(M.VISION_PRESETS["tiny"], vit_image_size=4 * grid, vit_patch_size=4)
    cfg = M.VLMConfig(vision=vision, lm=M.LM_PRESETS["tiny"], mp_pixel_shuffle=s, mp_type=mp_type)
    torch.manual_seed(0)
    ours = M.PROJECTORS[mp_type](cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return ours


def copy_weights(ours, theirs, names, transposed=()):
    """Copy ours -> theirs through an explicit name map; every tensor of both sides must be named."""
    assert set(names) == set(ours.state_dict()) and set(names.values()) == set(theirs.state_dict())
    mine, target = ours.state_dict(), theirs.state_dict()
    with torch.no_grad():
        for a, b in names.items():
            target[b].copy_(mine[a].t() if a in transposed else mine[a])


def grouped_order(g, s):
    """Row-major patch indices of a g x g grid regrouped block by block: blocks row-major, the s x s
    patches of each block row-major (Qwen2-VL's processor order). Written as plain loops, apart from
    M.pixel_shuffle, so that a wrong channel order in pixel_shuffle makes the parity tests fail."""
    return [(by * s + r) * g + bx * s + c for by in range(g // s) for bx in range(g // s)
            for r in range(s) for c in range(s)]


def report(name, diff):
    print(f"\n  {name}: max abs diff {diff:.3g}")
    return diff


# ----------------------------------------------------------------------------- 1. projector parity

@pytest.mark.parametrize("s", [1, 2])
def test_mlp_projector_equals_llava(s):
    """mp_type "mlp" = LlavaMultiModalProjector (s = 1: LLaVA-1.5 itself; s = 2: LLaVA's MLP on our
    pixel-shuffled tokens). <= 1e-5."""
    from transformers import LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector
    ours = projector("mlp", s)
    config = LlavaConfig(vision_config=dict(model_type="clip_vision_model", hidden_size=D * s * s,
                                            num_attention_heads=2),
                         text_config=dict(model_type="llama", hidden_size=HIDDEN, num_attention_heads=4),
                         projector_hidden_act="gelu", multimodal_projector_bias=True)
    theirs = LlavaMultiModalProjector(config).eval()
    copy_weights(ours, theirs, {"fc1.weight": "linear_1.weight", "fc1.bias": "linear_1.bias",
                                "proj.weight": "linear_2.weight", "proj.bias": "linear_2.bias"})
    x = torch.randn(2, 64, D)
    with torch.no_grad():
        got, want = ours(x), theirs(M.pixel_shuffle(x, s) if s > 1 else x)
    assert got.shape == (2, 64 // s ** 2, HIDDEN)
    assert report(f"mlp s={s} vs LlavaMultiModalProjector", max_diff(got, want)) <= 1e-5


def test_patch_merger_equals_qwen2_5_vl():
    """mp_type "patch_merger" = Qwen2_5_VLPatchMerger fed with the patches in Qwen's 2x2-grouped
    order (built by grouped_order, not by pixel_shuffle). <= 1e-5."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPatchMerger
    g = 8
    ours = projector("patch_merger", 2, g)
    theirs = Qwen2_5_VLPatchMerger(dim=HIDDEN, context_dim=D, spatial_merge_size=2).eval()
    copy_weights(ours, theirs, {"norm.weight": "ln_q.weight", "fc1.weight": "mlp.0.weight", "fc1.bias": "mlp.0.bias",
                                "proj.weight": "mlp.2.weight", "proj.bias": "mlp.2.bias"})
    x = torch.randn(2, g * g, D)  # row-major patches of 2 images
    qwen_input = x[:, grouped_order(g, 2)].reshape(-1, D)  # [2 * 64 patches, D], images one after the other
    with torch.no_grad():
        got, want = ours(x), theirs(qwen_input)
    assert want.shape == (2 * 16, HIDDEN)
    assert report("patch_merger vs Qwen2_5_VLPatchMerger", max_diff(got.reshape(-1, HIDDEN), want)) <= 1e-5
    # the reorder matters: on the row-major patches Qwen's merger would give other tokens
    with torch.no_grad():
        assert max_diff(got.reshape(-1, HIDDEN), theirs(x.reshape(-1, D))) > 1e-2


@pytest.mark.parametrize("s", [2, 4])
def test_avg_pool_projector_equals_gemma3(s):
    """mp_type "avg_pool" = Gemma3MultiModalProjector (our proj.weight is the transpose of Gemma's
    mm_input_projection_weight; the norm weight random, not its zero init). <= 1e-5."""
    from transformers import Gemma3Config
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector
    g = 8
    ours = projector("avg_pool", s, g)
    assert ours.norm_weight.abs().min() > 0
    config = Gemma3Config(vision_config=dict(model_type="siglip_vision_model", image_size=4 * g, patch_size=4,
                                             hidden_size=D, num_attention_heads=2, layer_norm_eps=1e-6),
                          text_config=dict(hidden_size=HIDDEN, num_attention_heads=4, num_key_value_heads=2),
                          mm_tokens_per_image=(g // s) ** 2)
    theirs = Gemma3MultiModalProjector(config).eval()
    copy_weights(ours, theirs, {"norm_weight": "mm_soft_emb_norm.weight", "proj.weight": "mm_input_projection_weight"},
                 transposed={"proj.weight"})
    x = torch.randn(2, g * g, D)
    with torch.no_grad():
        got, want = ours(x), theirs(x)
    assert got.shape == want.shape == (2, (g // s) ** 2, HIDDEN)
    assert report(f"avg_pool s={s} vs Gemma3MultiModalProjector", max_diff(got, want)) <= 1e-5


def test_attention_pool_projector_equals_molmo2():
    """mp_type "attention_pool" = Molmo2Adapter with 2x2 pooling windows (pooled_patches_idx built
    row-major over the flattened [images * patches] features). <= 1e-5."""
    from transformers.models.molmo2.configuration_molmo2 import Molmo2AdapterConfig
    from transformers.models.molmo2.modeling_molmo2 import Molmo2Adapter
    g, heads, n = 8, M.VISION_PRESETS["tiny"].vit_heads, 2
    ours = projector("attention_pool", 2, g)
    config = Molmo2AdapterConfig(hidden_size=D, num_attention_heads=heads, num_key_value_heads=heads,
                                 head_dim=D // heads, intermediate_size=M.LM_PRESETS["tiny"].lm_intermediate,
                                 text_hidden_size=HIDDEN, vision_feature_layer=[-1])
    config._attn_implementation = "eager"
    theirs = Molmo2Adapter(config).eval()
    names = {f"{a}.{t}": f"image_pooling_2d.{a}_proj.{t}" for a in "qkvo" for t in ("weight", "bias")}
    names.update({f"{a}.weight": f"image_projector.{b}_proj.weight"
                  for a, b in (("gate", "gate"), ("up", "up"), ("proj", "down"))})
    copy_weights(ours, theirs, names)
    x = torch.randn(n, g * g, D)
    window = torch.tensor(grouped_order(g, 2)).view(-1, 4)  # [16 tokens, 4 patches] of one image
    idx = torch.cat([window + i * g * g for i in range(n)])  # [32, 4] into the flattened features
    with torch.no_grad():
        got, want = ours(x), theirs(x, idx).last_hidden_state
    assert want.shape == (n * 16, HIDDEN)
    assert report("attention_pool vs Molmo2Adapter", max_diff(got.reshape(-1, HIDDEN), want)) <= 1e-5


# ----------------------------------------------------------------------------- 2. Gemma 3's mask

def test_bidirectional_mask_equals_gemma3():
    """attention_mask_4d with image_blocks = transformers' create_causal_mask with Gemma 3's
    block_sequence_ids, on a left-padded batch: row 0 two images separated by text, row 1 one image
    after 4 padding tokens. Exact (boolean masks)."""
    from transformers import LlamaConfig
    from transformers.masking_utils import create_causal_mask
    from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask
    # 0 text, 1 image, -1 padding
    rows = [[0, 0, 1, 1, 1, 0, 1, 1, 1, 0, 0, 0],
            [-1, -1, -1, -1, 0, 0, 1, 1, 1, 1, 0, 0]]
    kinds = torch.tensor(rows)
    pad = (kinds >= 0).long()  # the 2-D padding mask = our segment ids (one sample per row)
    is_image = kinds == 1
    B, T = kinds.shape
    config = LlamaConfig(hidden_size=8, num_attention_heads=1, num_key_value_heads=1)
    config._attn_implementation = "sdpa"
    want = create_causal_mask(config=config, inputs_embeds=torch.zeros(B, T, 8), attention_mask=pad, cache=None,
                              position_ids=torch.arange(T).expand(B, T),
                              block_sequence_ids=get_block_sequence_ids_for_mask(is_image.long()))
    assert want.dtype == torch.bool and want.shape == (B, 1, T, T)
    idx = torch.arange(T)
    blocks = M.image_blocks(is_image)
    assert blocks.tolist() == [[0, 0, 1, 1, 1, 0, 2, 2, 2, 0, 0, 0], [0] * 6 + [1] * 4 + [0, 0]]
    ours = M.attention_mask_4d(pad, pad, idx, idx, blocks, blocks)
    # compared on the real query rows: our padding rows see only themselves (never all-masked),
    # what transformers does with a fully masked padding row is its own business
    real = pad.bool()
    assert torch.equal(ours[:, 0][real], want[:, 0][real])
    # and the mask is not the causal one: an image's first token sees its last
    causal = M.attention_mask_4d(pad, pad, idx, idx)
    assert not torch.equal(causal[:, 0][real], want[:, 0][real])
    assert ours[0, 0, 2, 4] and not causal[0, 0, 2, 4] and not ours[0, 0, 4, 6]  # no peeking at the next image


# ----------------------------------------------------------------------------- 3. bidirectional, end to end

IMG = 299  # tiny_vlm's image token id; 4 LM tokens per 32 px image (4 x 4 patches, s = 2)


def bidirectional_vlm(seed=0):
    torch.manual_seed(seed)
    cfg = dataclasses.replace(tiny_vlm().cfg, lm_image_attention="bidirectional")
    return M.VLM(cfg).eval()


@torch.no_grad()
def test_bidirectional_image_tokens_see_their_whole_image_only():
    """Perturb one token / one image and see which outputs move: unchanged means <= 1e-6 (a masked
    key contributes exactly 0), changed means > 1e-4."""
    vlm = bidirectional_vlm()
    causal = M.VLM(dataclasses.replace(vlm.cfg, lm_image_attention="causal"))
    causal.load_state_dict(vlm.state_dict())
    causal.eval()
    ids = torch.tensor([[5, 6] + [IMG] * 4 + [7] + [IMG] * 4 + [8]])  # image 1 at 2..5, image 2 at 7..10
    pix = torch.randn(2, 3, 32, 32)
    x = vlm.embed(ids, pix)
    x2 = x.clone()
    x2[0, 5] += torch.randn(HIDDEN)  # the LAST token of image 1

    def moved(model, a, b):  # per position: how far the logits moved
        blocks = model.image_blocks(ids)
        return (model.lm(inputs_embeds=a, image_blocks=blocks) - model.lm(inputs_embeds=b, image_blocks=blocks)
                ).abs().amax(-1)[0]
    d = moved(vlm, x, x2)
    assert d[:2].max() <= 1e-6  # text before the image does not see it
    assert d[2:5].min() > 1e-4  # earlier tokens of the same image do
    d = moved(causal, x, x2)  # ...which causal attention forbids (so the check above can fail)
    assert d[:5].max() <= 1e-6
    # image 1 (and the text before it) does not see image 2; the text after image 2 does
    pix2 = pix.clone()
    pix2[1] += torch.randn(3, 32, 32)
    d = (vlm(ids, pix)[0] - vlm(ids, pix2)[0]).abs().amax(-1)[0]
    assert d[:7].max() <= 1e-6 and d[7:].min() > 1e-4


@torch.no_grad()
def test_bidirectional_generate_equals_uncached_forward():
    """Left-padded batch of 2 prompts (1 and 2 images): the greedy tokens of vlm.generate equal
    those of each prompt alone and of an uncached greedy loop over the full forward (exact); the
    prefill's logits equal the full forward's last position (<= 1e-4, fp32)."""
    vlm = bidirectional_vlm(1)
    prompts = [[5, 6] + [IMG] * 4 + [7, 8], [9] + [IMG] * 4 + [10, 11] + [IMG] * 4 + [12, 13]]
    images = [torch.randn(1, 3, 32, 32), torch.randn(2, 3, 32, 32)]
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    pix = torch.cat(images)  # in reading order over the batch
    seen = []

    def prefill(*args):  # generate's own prefill, recorded
        seen.append(M.prefill_step(*args))
        return seen[-1]
    n = 6
    out = vlm.generate(ids, pix, attention_mask=mask, max_new_tokens=n, eos_token_id=-1, prefill=prefill)
    assert out.shape == (2, n)
    full = vlm(ids, pix, attention_mask=mask)[0][:, -1]
    assert max_diff(seen[0], full) <= 1e-4
    # with the image blocks dropped (causal prefill) the logits would differ: the check has teeth
    causal = vlm.lm(inputs_embeds=vlm.embed(ids, pix), attention_mask=mask)[:, -1]
    assert max_diff(causal, full) > 1e-3
    for p, img, row in zip(prompts, images, out):
        assert vlm.generate(torch.tensor([p]), img, max_new_tokens=n, eos_token_id=-1)[0].tolist() == row.tolist()
    # uncached: the full forward over the prompt + the tokens so far, greedy at the last position
    seq, m = ids, mask
    for _ in range(n):
        nxt = vlm(seq, pix, attention_mask=m)[0][:, -1].argmax(-1, keepdim=True)
        seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    assert torch.equal(seq[:, T:], out)


@pytest.mark.parametrize("a,b", [
    ([5] + [IMG] * 4 + [6, 7], [8, 9] + [IMG] * 4 + [10]),
    ([5, 6] + [IMG] * 4, [IMG] * 4 + [7, 8]),  # image runs touch across the boundary: one image_blocks run
])
@torch.no_grad()
def test_bidirectional_packing_equals_samples_alone(a, b):
    """Two samples packed in one row (segment ids 1, 2) give each sample's logits alone. <= 1e-4."""
    vlm = bidirectional_vlm(2)
    pa, pb = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)
    segments = torch.tensor([[1] * len(a) + [2] * len(b)])
    packed = vlm(torch.tensor([a + b]), torch.cat([pa, pb]), attention_mask=segments)[0]
    assert max_diff(packed[:, :len(a)], vlm(torch.tensor([a]), pa)[0]) <= 1e-4
    assert max_diff(packed[:, len(a):], vlm(torch.tensor([b]), pb)[0]) <= 1e-4


# ----------------------------------------------------------------------------- 4. hMLP stem

@torch.no_grad()
def test_hmlp_stem_keeps_patches_apart():
    """Perturbing the pixels of one patch moves that patch's stem output only (others: exactly 0,
    since the stem's convolutions have stride = kernel and LayerNorm is per position); the ViT
    gives as many tokens as the plain stem, at the native and another resolution."""
    cfg = dataclasses.replace(M.VISION_PRESETS["tiny"], vit_stem="hmlp")  # 8 px patches: cells 2, 4, 8 px
    torch.manual_seed(0)
    vit = M.VisionTransformer(cfg).eval()
    assert isinstance(vit.patch_embed, M.HMLPStem)
    assert [c.kernel_size for c in vit.patch_embed.convs] == [(2, 2), (2, 2), (2, 2)]
    x = torch.randn(2, 3, 32, 32)
    x2 = x.clone()
    x2[1, :, 8:16, 16:24] += torch.randn(3, 8, 8)  # image 1, patch row 1, column 2
    out = vit.patch_embed(x)
    assert out.shape == (2, 32, 4, 4)
    moved = (vit.patch_embed(x2) - out).abs().amax(1)  # [2, 4, 4]
    assert moved[1, 1, 2] > 1e-3
    moved[1, 1, 2] = 0
    assert moved.max() == 0.0
    plain = M.VisionTransformer(M.VISION_PRESETS["tiny"]).eval()
    for size in (32, 48):
        x = torch.randn(1, 3, size, size)
        assert vit(x).shape == plain(x).shape == (1, (size // 8) ** 2, 32)


def test_hmlp_stem_needs_patches_divisible_by_4():
    with pytest.raises(UserError, match="vit_stem"):
        M.VisionConfig(vit_image_size=36, vit_patch_size=6, vit_depth=1, vit_width=32, vit_heads=2, vit_stem="hmlp")
    with pytest.raises(UserError, match="vit_stem"):
        M.VisionConfig(vit_image_size=32, vit_patch_size=8, vit_depth=1, vit_width=30, vit_heads=2, vit_stem="hmlp")
    with pytest.raises(UserError, match="vit_stem"):
        M.VisionConfig(vit_stem="conv")
    M.VisionConfig(vit_image_size=32, vit_patch_size=4, vit_depth=1, vit_width=32, vit_heads=2, vit_stem="hmlp")


# ----------------------------------------------------------------------------- 5. parallel blocks

@torch.no_grad()
def test_parallel_blocks():
    """Depth 4 parallel = 2 blocks of 2 branches, as many parameters as 4 sequential blocks; one
    block computes x + a1(ln1(x)) + a2(ln1'(x)), then the same with the MLPs (<= 1e-5, and differs
    from running the branches one after the other by > 1e-3); odd depth is refused."""
    cfg = dataclasses.replace(M.VISION_PRESETS["tiny"], vit_depth=4)
    torch.manual_seed(0)
    vit = M.VisionTransformer(dataclasses.replace(cfg, vit_parallel_blocks=True)).eval()
    seq = M.VisionTransformer(cfg)
    assert len(vit.blocks) == 2 and all(isinstance(b, M.ParallelVisionBlock) and len(b.branches) == 2
                                        for b in vit.blocks)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(vit) == count(seq)
    block, x = vit.blocks[0], torch.randn(2, 16, 32)
    b1, b2 = block.branches

    def mlp(b, h):
        return b.fc2(F.gelu(b.fc1(h), approximate="tanh"))
    y = x + b1.attn(b1.ln1(x)) + b2.attn(b2.ln1(x))
    want = y + mlp(b1, b1.ln2(y)) + mlp(b2, b2.ln2(y))
    assert max_diff(block(x), want) <= 1e-5
    assert max_diff(block(x), b2(b1(x))) > 1e-3
    with pytest.raises(UserError, match="vit_parallel_blocks"):
        dataclasses.replace(cfg, vit_depth=3, vit_parallel_blocks=True)


# ----------------------------------------------------------------------------- 6. saving, exports, LoRA

OPTIONS = [dict(mp_type=t) for t in M.PROJECTORS] + [
    dict(mp_type="mlp", mp_pixel_shuffle=1), dict(lm_image_attention="bidirectional"),
    dict(vision=dict(vit_stem="hmlp")), dict(vision=dict(vit_parallel_blocks=True))]


def vlm_with(seed=0, vision=(), **options):
    base = tiny_vlm().cfg
    cfg = dataclasses.replace(base, vision=dataclasses.replace(base.vision, **dict(vision)), **options)
    torch.manual_seed(seed)
    return M.VLM(cfg).eval()


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: str(o).translate(str.maketrans("", "", "{}' ")))
@torch.no_grad()
def test_save_load_roundtrip_per_option(tmp_path, options):
    """Our format keeps every option: the same config and logits (0 difference). Every weight is
    first moved off its init (e.g. avg_pool's zero norm), so a weight left out would show."""
    vlm = vlm_with(**options)
    for p in vlm.parameters():
        p.add_(torch.randn_like(p) * 0.02)
    vlm.save_pretrained(tmp_path)
    again = M.VLM.from_pretrained(tmp_path).eval()
    assert again.cfg == vlm.cfg and type(again.projector) is type(vlm.projector)
    ids, pix = torch.tensor([[1] + [IMG] * 4 + [2] + [IMG] * 4 + [3]]), torch.randn(2, 3, 32, 32)
    if options.get("mp_pixel_shuffle") == 1:  # 16 tokens per image
        ids = torch.tensor([[1] + [IMG] * 16 + [2] + [IMG] * 16 + [3]])
    assert max_diff(again(ids, pix)[0], vlm(ids, pix)[0]) == 0.0


@pytest.mark.parametrize("options,name", [
    (dict(mp_type="mlp"), "mp_type='mlp'"), (dict(lm_image_attention="bidirectional"), "lm_image_attention"),
    (dict(vision=dict(vit_stem="hmlp")), "vit_stem='hmlp'"), (dict(vision=dict(vit_parallel_blocks=True)),
                                                              "vit_parallel_blocks=True")])
def test_smolvlm_and_gguf_exports_refuse_what_smolvlm_lacks(tmp_path, options, name):
    """A model SmolVLM / llama.cpp cannot compute is refused with the option named, before any file
    is written; the default model is not (smolvlm_unlike is "")."""
    vlm = vlm_with(**options)
    with pytest.raises(UserError, match=f"format smolvlm.*{name}"):
        vlm.save_pretrained(tmp_path / "smolvlm", format="smolvlm")
    # export_gguf checks the processor is there, then the model: any non-None stand-in passes the first
    with pytest.raises(UserError, match=f"format gguf.*{name}"):
        vlm.save_pretrained(tmp_path / "gguf", processor=object(), format="gguf")
    assert not os.path.exists(tmp_path / "smolvlm") and not os.path.exists(tmp_path / "gguf")
    assert M.smolvlm_unlike(tiny_vlm().cfg) == ""


def test_lora_refuses_trainable_parts_smolvlm_lacks():
    vlm = vlm_with(mp_type="mlp")
    with pytest.raises(UserError, match="add_lora.*mp_type='mlp'"):
        vlm.add_lora(targets=("lm",), trainable=("projector",))
    assert vlm.lora is None
    vlm.add_lora(targets=("lm",))  # the projector frozen: the adapters are plain SmolVLM LM adapters
    assert vlm.lora is not None
    assert not any(p.requires_grad for p in vlm.projector.parameters())
    with pytest.raises(UserError, match="add_lora.*vit_stem"):
        vlm_with(vision=dict(vit_stem="hmlp")).add_lora(targets=("vision",))
    # the image attention changes no weight: LM adapters of a bidirectional model keep SmolVLM's names
    vlm_with(lm_image_attention="bidirectional").add_lora(targets=("lm",), trainable=("projector",))


def test_siglip_weights_load_into_the_plain_vit_only(tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel
    SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=32, patch_size=8)).save_pretrained(tmp_path)
    assert M.VisionTransformer.from_pretrained(str(tmp_path)).cfg.vit_depth == 2
    for option in (dict(vit_stem="hmlp"), dict(vit_parallel_blocks=True)):
        with pytest.raises(UserError, match="patch stem and sequential blocks"):
            M.VisionTransformer.from_pretrained(str(tmp_path), **option)


def test_sovit_preset():
    """SoViT-150m/16 (width, depth, MLP, heads) = (880, 18, 2320, 16); its parameter count, built
    on the meta device (nothing allocated), matches the SigLIP-block formula."""
    c = M.VISION_PRESETS["sovit-150m16-224"]
    assert (c.vit_width, c.vit_depth, c.vit_mlp_dim, c.vit_heads) == (880, 18, 2320, 16)
    assert (c.vit_image_size, c.vit_patch_size, c.num_patches) == (224, 16, 196)
    w, m = c.vit_width, c.vit_mlp_dim
    block = 2 * 2 * w + 4 * (w * w + w) + (w * m + m) + (m * w + w)  # 2 LayerNorms, q k v o, fc1, fc2
    formula = (3 * 16 * 16 * w + w) + 196 * w + c.vit_depth * block + 2 * w
    with torch.device("meta"):
        vit = M.VisionTransformer(c)
    n = sum(p.numel() for p in vit.parameters())
    print(f"\n  sovit-150m16-224: {n / 1e6:.1f}M parameters")
    assert n == formula


# ----------------------------------------------------------------------------- 7. each projector trains

@pytest.mark.parametrize("mp_type", list(M.PROJECTORS))
def test_every_projector_parameter_gets_a_gradient(mp_type):
    """One training step: the loss's gradient reaches every projector parameter (finite, max > 1e-4),
    and an optimizer step moves them. The one exception is attention_pool's key bias (Molmo2's
    k_proj.bias, kept for weight parity): it adds the same q.b_k to every score of a window, which
    softmax ignores, so its gradient is 0 up to rounding (measured ~2e-9; <= 1e-6)."""
    vlm = vlm_with(mp_type=mp_type).train()
    ids = torch.tensor([[1] + [IMG] * 4 + [5, 6, 7, 8]])
    labels = torch.full_like(ids, -100)
    labels[0, 6:] = ids[0, 6:]
    loss = vlm(ids, torch.randn(1, 3, 32, 32), labels=labels)[1]
    loss.backward()
    inert = {"k.bias"} if mp_type == "attention_pool" else set()
    params = {k: p for k, p in vlm.projector.named_parameters() if k not in inert}
    before = {k: p.detach().clone() for k, p in params.items()}
    for name, p in vlm.projector.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() <= 1e-6 if name in inert else p.grad.abs().max() > 1e-4, name
    torch.optim.SGD(params.values(), lr=0.1).step()
    for name, p in params.items():
        assert not torch.equal(p, before[name]), name


@pytest.mark.parametrize("mp_type", ["avg_pool", "attention_pool"])
@torch.no_grad()
def test_split_images_one_block_per_tile(tokenizer, mp_type):
    """SmolVLM's image splitting with another projector and bidirectional attention: each tile's
    tokens are one block (Gemma 3's rule on contiguous runs), and the cached prefill equals the
    full forward (1e-4)."""
    from conftest import random_image
    proc = M.Processor(tokenizer, 64, 4, splitting=True, longest_edge=128)
    cfg = M.VLMConfig(vision=M.VisionConfig(vit_image_size=64, vit_patch_size=16, vit_depth=1, vit_width=32,
                                            vit_heads=2, vit_mlp_dim=64, vit_pos_embed="sincos2d"),
                      lm=dataclasses.replace(M.LM_PRESETS["tiny"], lm_vocab=len(tokenizer)), mp_type=mp_type,
                      lm_image_attention="bidirectional", image_token_id=proc.image_token_id)
    torch.manual_seed(0)
    vlm = M.VLM(cfg).eval()
    batch = proc([proc.chat_prompt("Describe.", 1)], [[random_image(150, 90)]])
    tiles = batch["pixel_values"].flatten(0, -4).shape[0]
    assert tiles > 1 and int(vlm.image_blocks(batch["input_ids"]).max()) == tiles
    full = vlm(batch["input_ids"], batch["pixel_values"])[0][0, -1]
    logits = []
    vlm.generate(batch["input_ids"], batch["pixel_values"], max_new_tokens=1,
                 prefill=lambda *a: logits.append(M.prefill_step(*a)) or logits[-1])
    assert max_diff(logits[0][0], full) <= 1e-4


@torch.no_grad()
def test_options_compile():
    """torch.compile'd image encoder and generation (inference.compile_generation: the prefill gets
    the image blocks) equal eager with every option on (1e-5; tokens exact). A second caption
    compiles nothing: building the step must not drop the compiled prefill (a strict torch.export
    resets TorchDynamo's caches)."""
    import inference
    vlm = vlm_with(vision=dict(vit_stem="hmlp", vit_parallel_blocks=True), mp_type="attention_pool",
                   lm_image_attention="bidirectional")
    ids = torch.tensor([[1, 2] + [vlm.cfg.image_token_id] * vlm.cfg.image_tokens + [3, 4, 5]])
    px = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert max_diff(torch.compile(vlm.image_embeds)(px), vlm.image_embeds(px)) <= 1e-5
    prefill, step = inference.compile_generation(torch.device("cpu"))
    want = vlm.generate(ids, px, max_new_tokens=6, eos_token_id=-1)
    assert vlm.generate(ids, px, max_new_tokens=6, eos_token_id=-1, prefill=prefill, step=step).tolist() == want.tolist()
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    assert vlm.generate(ids, px, max_new_tokens=6, eos_token_id=-1, prefill=prefill, step=step).tolist() == want.tolist()
    assert torch._dynamo.utils.counters["frames"]["ok"] == frames
