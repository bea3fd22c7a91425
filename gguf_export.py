"""A picoVLM as llama.cpp files (GGUF, written with the `gguf` package), so that

  llama-mtmd-cli -m DIR/picovlm-F32.gguf --mmproj DIR/mmproj-picovlm-F32.gguf --image photo.jpg

captions with a model trained by train.py. Two files, as llama.cpp's convert_hf_to_gguf.py makes
them for SmolVLM/Idefics3: the language model as a llama-architecture GGUF (q/k rows in llama.cpp's
RoPE layout, the tokenizer and chat template in the metadata), and the vision tower + projector
as an mmproj GGUF of projector type `idefics3` (the names and keys of llama.cpp's tools/mtmd/clip.cpp).
Reading GGUF files back is checkpoint.read_gguf's and model.load_gguf's job.
"""
import os
import tempfile

import gguf

import model as M
from checkpoint import UserError, atomic_open

Q = gguf.GGMLQuantizationType
# gguf_type -> (type of the 2-D weights, the file type llama.cpp reports); 1-D tensors stay F32
GGUF_TYPES = {"f32": (Q.F32, gguf.LlamaFileType.ALL_F32), "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
              "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16), "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
              "q4_1": (Q.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1)}
# llama.cpp picks its pre-tokenizer (how text is split before BPE) by this name: SmolLM2's splits
# digits one by one. picoVLM's tokenizers are SmolLM2's (the default LM and SmolVLM's alike).
TOKENIZER_PRE = "smollm"


def export_gguf(vlm, path, processor, gguf_type="f32", name="picovlm"):
    """Write path/{name}-{TYPE}.gguf (the language model) and path/mmproj-{name}-{TYPE}.gguf (vision
    tower + projector) -> their paths. gguf_type: f32, f16, bf16, q8_0 or q4_1 for the matrices."""
    if processor is None:
        raise UserError("save_pretrained(format='gguf') needs the processor: its tokenizer goes into the GGUF")
    check_type(gguf_type)
    if unlike := M.smolvlm_unlike(vlm.cfg):
        raise UserError(f"format gguf: llama.cpp's idefics3 projector type has no {unlike}")
    os.makedirs(path, exist_ok=True)
    state = M.merged_state_dict(vlm)  # LoRA adapters folded in
    lm = {k.removeprefix("lm."): v for k, v in state.items() if k.startswith("lm.")}
    text = os.path.join(path, f"{name}-{gguf_type.upper()}.gguf")
    mmproj = os.path.join(path, f"mmproj-{name}-{gguf_type.upper()}.gguf")
    write_text_gguf(lm, vlm.cfg.lm, processor.tokenizer, text, gguf_type, name)
    write_mmproj_gguf(state, vlm.cfg, processor, mmproj, gguf_type, name)
    return text, mmproj


def check_type(gguf_type):
    if gguf_type not in GGUF_TYPES:
        raise UserError(f"gguf_type {gguf_type!r}: expected one of {', '.join(GGUF_TYPES)}")


# ----------------------------------------------------------------------------- the language model

def write_text_gguf(state, cfg, tokenizer, path, gguf_type="f32", name="picovlm"):
    """A LanguageModel's state dict (config cfg) + its tokenizer -> a llama-architecture GGUF at path."""
    check_type(gguf_type)
    w = gguf.GGUFWriter(None, "llama")
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_block_count(cfg.lm_layers)
    w.add_context_length(cfg.lm_max_positions)
    w.add_embedding_length(cfg.lm_hidden)
    w.add_feed_forward_length(cfg.lm_intermediate)
    w.add_head_count(cfg.lm_heads)
    w.add_head_count_kv(cfg.lm_kv_heads)
    w.add_rope_freq_base(cfg.lm_rope_theta)
    w.add_layer_norm_rms_eps(cfg.lm_rms_eps)
    w.add_vocab_size(cfg.lm_vocab)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_file_type(GGUF_TYPES[gguf_type][1])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(w, tokenizer, cfg.lm_vocab)
    # our names -> transformers' (q, k, v split) -> llama.cpp's: the inverse of model.load_gguf
    names = ["token_embd.weight", "output_norm.weight"] + ["output.weight"] * (not cfg.lm_tie_embeddings) + [
        f"blk.{i}.{k}.weight" for i in range(cfg.lm_layers) for k in M.GGUF_NAMES]
    hf = M.unmapped(state, M.llama_key_map(cfg), cfg)
    for g in names:
        t = hf[M.gguf_hf_name(g)].float()
        if g.endswith(("attn_q.weight", "attn_k.weight")):
            # rotate-half RoPE (each head's first halves, then second halves) -> llama.cpp's pairs
            heads = cfg.lm_heads if "attn_q" in g else cfg.lm_kv_heads
            t = t.view(heads, 2, cfg.head_dim // 2, -1).transpose(1, 2).reshape(t.shape)
        # a quantized table stays at Q8_0, as llama.cpp's own Q4_1 SmolLM2 keeps it (it is also the tied head)
        add_tensor(w, g, t, "q8_0" if g == "token_embd.weight" and gguf_type == "q4_1" else gguf_type)
    write(w, path)


def add_tokenizer(w, tokenizer, vocab_size):
    """The BPE vocabulary as llama.cpp's converter writes a gpt2-style tokenizer: every id's token
    (ids the model has beyond the tokenizer's become unused [PADn] slots), token types (the
    tokenizer's special tokens are CONTROL, other added ones USER_DEFINED), and from the saved
    tokenizer files the merges, the bos/eos/unk/pad ids and the chat template (gguf.SpecialVocab)."""
    T = gguf.TokenType
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    if len(by_id) > vocab_size:
        raise UserError(f"the tokenizer has {len(by_id)} tokens, the model's vocabulary {vocab_size}")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [T.UNUSED if i not in by_id else (T.CONTROL if added[i].special else T.USER_DEFINED) if i in added
             else T.NORMAL for i in range(vocab_size)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(TOKENIZER_PRE)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_add_space_prefix(False)
    w.add_add_bos_token(tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id])
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size).add_to_gguf(w, quiet=True)


# ----------------------------------------------------------------------------- vision tower + projector

def write_mmproj_gguf(state, cfg, processor, path, gguf_type="f32", name="picovlm"):
    """The VLM's vision tower and projector (state: its state dict) as an mmproj GGUF of llama.cpp's
    `idefics3` projector type: SigLIP blocks, pixel shuffle with factor scale_factor, one linear layer."""
    check_type(gguf_type)
    v = cfg.vision
    w = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ])
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_name(name)
    w.add_file_type(GGUF_TYPES[gguf_type][1])
    w.add_clip_projector_type(gguf.VisionProjectorType.IDEFICS3)
    w.add_clip_has_vision_encoder(True)
    w.add_vision_use_gelu(True)  # ggml's gelu is the tanh approximation SigLIP uses
    w.add_vision_projection_dim(cfg.lm.lm_hidden)
    w.add_vision_image_size(v.vit_image_size)
    w.add_vision_patch_size(v.vit_patch_size)
    w.add_vision_embedding_length(v.vit_width)
    w.add_vision_feed_forward_length(v.vit_mlp_dim)
    w.add_vision_block_count(v.vit_depth)
    w.add_vision_head_count(v.vit_heads)
    w.add_vision_attention_layernorm_eps(v.vit_ln_eps)
    w.add_vision_image_mean(processor.mean)
    w.add_vision_image_std(processor.std)
    w.add_vision_projector_scale_factor(cfg.mp_pixel_shuffle)
    # llama.cpp first resizes the longest edge to this, then cuts image_size tiles and adds the whole
    # image, even when there is one tile (transformers then sends the whole image only): a model that
    # does not split sees its image twice in llama.cpp (docs/experiments.md)
    split = processor.splitting and processor.longest_edge
    w.add_vision_preproc_image_size(processor.longest_edge if split else v.vit_image_size)
    plan = M.smolvlm_key_map(cfg)  # ours -> SmolVLM's names, which llama.cpp's tensor map knows
    hf = M.unmapped(state, {k: s for k, s in plan.items() if not k.startswith("lm.")}, cfg.lm, "lm.")
    if v.vit_pos_embed != "learned":  # llama.cpp only knows a learned table: store ours as one
        g = v.vit_image_size // v.vit_patch_size
        hf["model.vision_model.embeddings.position_embedding.weight"] = M.sincos_2d(g, g, v.vit_width)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, v.vit_depth)
    for key, t in hf.items():
        g = names.get_name(key, try_suffixes=(".weight", ".bias"))
        # the patch and position embeddings stay F32 (convert_hf_to_gguf.py keeps ".embeddings." so);
        # 4-bit is too coarse for a small ViT: Q8_0 instead
        kind = "f32" if ".embeddings." in key else "q8_0" if gguf_type == "q4_1" else gguf_type
        add_tensor(w, g, t.float(), kind)
    write(w, path)


# ----------------------------------------------------------------------------- tensors and files

def add_tensor(w, name, t, gguf_type):
    """One tensor: 1-D ones (norms, biases) in F32, matrices in gguf_type; a matrix whose rows do
    not split into whole blocks of that type falls back to F16, as in llama.cpp's converter."""
    a = t.detach().cpu().numpy()
    qtype = GGUF_TYPES[gguf_type][0] if a.ndim > 1 else Q.F32
    try:
        data = gguf.quants.quantize(a, qtype) if qtype != Q.F32 else a
    except gguf.QuantError:
        qtype, data = Q.F16, gguf.quants.quantize(a, Q.F16)
    w.add_tensor(name, data, raw_dtype=qtype)


def write(w, path):
    """The writer's header, metadata and tensors into `path`, atomically (checkpoint.atomic_open):
    the writer is handed atomic_open's temporary file instead of opening one itself."""
    with atomic_open(path, "wb") as f:
        w.fout, w.state = [f], gguf.gguf_writer.WriterState.EMPTY
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.fout = None  # atomic_open closes it
