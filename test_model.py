"""picoVLM tests: parity with transformers, KV cache, processor, loaders. CPU, no network.

Tolerances are max abs differences, stated at each assert."""
import json
import os

import pytest
import torch

import checkpoint
import model as M
from checkpoint import UserError
from conftest import max_diff, random_image, reference_processor, tiny_vlm
from model import LanguageConfig, LanguageModel, Processor, VisionConfig, VisionTransformer, VLM, VLMConfig

torch.manual_seed(0)


def tiny_siglip_config(**kw):
    from transformers import SiglipVisionConfig
    return SiglipVisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, **kw)


# ----------------------------------------------------------------------------- vision

@pytest.mark.parametrize("full_model", [False, True])  # SiglipModel keys carry `vision_model.`
def test_siglip_parity(tmp_path, full_model):
    from transformers import SiglipConfig, SiglipModel, SiglipVisionModel
    vcfg = tiny_siglip_config()
    if full_model:
        ref = SiglipModel(SiglipConfig(vision_config=vcfg.to_dict(), text_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100)))
    else:
        ref = SiglipVisionModel(vcfg)
    ref.eval().save_pretrained(tmp_path)
    keys = checkpoint.read_safetensors(str(tmp_path)).keys()
    assert any(k.startswith("vision_model.") for k in keys) == full_model
    vit = VisionTransformer.from_pretrained(tmp_path).eval()
    ref_vision = ref.vision_model if full_model else ref
    for size in (32, 48):  # native, then another resolution (bicubic position interpolation)
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            want = ref_vision(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
            got = vit(x)
        assert got.shape == (2, (size // 8) ** 2, 64)
        assert max_diff(got, want) <= 1e-4


def test_siglip_bad_checkpoint(tmp_path):
    from transformers import SiglipVisionModel
    SiglipVisionModel(tiny_siglip_config()).save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file
    f = tmp_path / "model.safetensors"
    state = load_file(f)
    del state["encoder.layers.1.mlp.fc2.weight"]
    state["extra.weight"] = torch.zeros(1)
    save_file(state, f)
    with pytest.raises(UserError, match="missing keys.*fc2.weight.*unexpected keys.*extra.weight"):
        VisionTransformer.from_pretrained(tmp_path)
    f.write_bytes(f.read_bytes()[:1000])  # truncated download
    with pytest.raises(UserError, match="unreadable or truncated"):
        VisionTransformer.from_pretrained(tmp_path)


def test_sincos_position_embedding():
    vit = VisionTransformer(VisionConfig(vit_image_size=32, vit_patch_size=8, vit_depth=1, vit_width=32,
                                         vit_heads=2, vit_mlp_dim=64, vit_pos_embed="sincos2d"))
    assert "pos_embed" not in vit.state_dict()  # fixed, not learned
    assert vit(torch.randn(1, 3, 32, 32)).shape == (1, 16, 32)
    assert vit(torch.randn(1, 3, 48, 48)).shape == (1, 36, 32)
    # the values, computed one by one from the formula (MAE / big_vision's 2-D sin-cos, frequencies
    # 10000^(-k/(D/4))): channels [sin x, cos x, sin y, cos y], patches row by row (y, then x)
    import math
    D, H, W = 32, 3, 5
    want = torch.tensor([[f(c * 10000 ** (-k / (D // 4))) for f, c in ((math.sin, x), (math.cos, x), (math.sin, y),
                                                                     (math.cos, y)) for k in range(D // 4)]
                         for y in range(H) for x in range(W)])
    assert max_diff(M.sincos_2d(H, W, D), want) <= 1e-6


def test_pixel_shuffle_matches_smolvlm_connector():
    from transformers import SmolVLMConfig
    from transformers.models.smolvlm.modeling_smolvlm import SmolVLMConnector
    cfg = SmolVLMConfig(vision_config=dict(hidden_size=16, num_attention_heads=2),
                         text_config=dict(hidden_size=24, num_attention_heads=2, num_key_value_heads=2), scale_factor=2)
    ref = SmolVLMConnector(cfg).eval()
    proj = M.Projector(VLMConfig(vision=VisionConfig(vit_width=16, vit_heads=2), lm=LanguageConfig(lm_hidden=24, lm_heads=2, lm_kv_heads=2)))
    proj.proj.weight.data.copy_(ref.modality_projection.proj.weight)
    x = torch.randn(3, 64, 16)
    assert max_diff(proj(x), ref(x)) == 0.0  # a permutation + the same matmul: exact
    assert M.pixel_shuffle(x, 2).shape == (3, 16, 64)


# ----------------------------------------------------------------------------- language model

@pytest.mark.parametrize("tie,kv_heads,theta", [(True, 2, 10000.0), (False, 4, 500000.0), (False, 1, 123.0)])
def test_llama_parity(tmp_path, tie, kv_heads, theta):
    from transformers import LlamaConfig, LlamaForCausalLM
    hf_cfg = LlamaConfig(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=kv_heads, vocab_size=128, tie_word_embeddings=tie,
                         rope_theta=theta, rope_parameters={"rope_type": "default", "rope_theta": theta},
                         max_position_embeddings=256, rms_norm_eps=1e-5)
    ref = LlamaForCausalLM(hf_cfg).eval()
    ref.save_pretrained(tmp_path)
    lm = LanguageModel.from_pretrained(tmp_path).eval()
    assert lm.cfg.lm_rope_theta == theta and lm.cfg.lm_tie_embeddings == tie
    ids = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        assert max_diff(lm(ids), ref(ids).logits) <= 1e-4


def test_llama_sharded_checkpoint(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    ref = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=128)).eval()
    ref.save_pretrained(tmp_path, max_shard_size="50KB")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        assert max_diff(LanguageModel.from_pretrained(tmp_path)(ids), ref(ids).logits) <= 1e-4


def test_gguf_tensor_types_and_unpermute(tmp_path):
    """A tiny Llama written as GGUF with F32/F16/BF16/Q8_0/Q4_0/Q4_1 tensors and q/k in llama.cpp's
    RoPE layout loads back to the same model (reference: transformers on the same rounded weights)."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM
    Q = gguf.GGMLQuantizationType
    ref = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                       tie_word_embeddings=False, rms_norm_eps=1e-5)).eval()
    w = gguf.GGUFWriter(str(tmp_path / "tiny.gguf"), "llama")
    for add, value in ((w.add_block_count, 2), (w.add_embedding_length, 64), (w.add_feed_forward_length, 96),
                       (w.add_head_count, 4), (w.add_head_count_kv, 2), (w.add_rope_freq_base, 10000.0),
                       (w.add_layer_norm_rms_eps, 1e-5), (w.add_context_length, 128)):
        add(value)
    w.add_token_list([f"t{i}" for i in range(64)])
    types = {"attn_q": Q.F16, "attn_k": Q.BF16, "attn_v": Q.Q4_0, "attn_output": Q.Q8_0, "ffn_gate": Q.Q4_1,
             "ffn_up": Q.Q8_0, "ffn_down": Q.F32, "token_embd": Q.Q8_0, "output": Q.Q4_0}  # norms: F32
    rounded = {}
    state = ref.state_dict()
    gguf_names = ["token_embd.weight", "output_norm.weight", "output.weight"] + [
        f"blk.{i}.{k}.weight" for i in range(2) for k in M.GGUF_NAMES]
    for g in gguf_names:
        name = M.gguf_hf_name(g)  # every HF tensor must be produced exactly once (checked below)
        t, kind = state[name], g.split(".")[-2]
        a = t.numpy()
        qtype = Q.F32 if a.ndim == 1 else types[kind]
        heads = {"attn_q": 4, "attn_k": 2}.get(kind)
        if heads:  # into llama.cpp's layout: rotary pairs interleaved per head
            a = a.reshape(heads, 2, 8, 64).swapaxes(1, 2).reshape(a.shape)
        data = gguf.quants.quantize(a, qtype) if qtype != Q.F32 else a
        w.add_tensor(g, data, raw_dtype=qtype)
        back = torch.from_numpy(gguf.quants.dequantize(data, qtype).copy()).reshape(t.shape)
        rounded[name] = back.view(heads, 8, 2, 64).transpose(1, 2).reshape(t.shape) if heads else back
    assert rounded.keys() == state.keys()
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ref.load_state_dict(rounded)
    lm = LanguageModel.from_pretrained(str(tmp_path / "tiny.gguf"))
    assert not lm.cfg.lm_tie_embeddings
    ids = torch.randint(0, 64, (1, 20))
    with torch.no_grad():
        assert max_diff(lm(ids), ref(ids).logits) <= 1e-4


def test_gguf_matches_transformers(smollm, hf_smollm, tokenizer):
    ids = torch.tensor([tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 4)])
    with torch.no_grad():
        diff = max_diff(smollm(ids), hf_smollm(ids).logits)
    print(f"GGUF SmolLM2-135M logits max abs diff vs transformers: {diff:.2e}")
    assert diff <= 1e-3


def test_gguf_answers_capital_of_france(smollm, tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer.encode(text)])
    out = smollm.generate(ids, max_new_tokens=24, eos_token_id=tokenizer.eos_token_id)
    answer = tokenizer.decode(out[0], skip_special_tokens=True)
    print("answer:", answer)
    assert "Paris" in answer


def test_kv_cache_equals_full_forward(smollm):
    """In float64 the cached and uncached paths agree to rounding (<= 1e-4; a cache bug, a wrong
    slot or position, moves the logits by > 0.1). In fp32 they run different kernels (masked vs
    causal attention, other matmul shapes): over 8 seeds the logits (up to ~37) differed by 5e-5 to
    6e-4, so 1e-3 there."""
    import copy
    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    for lm, tolerance in ((copy.deepcopy(smollm).double(), 1e-4), (smollm, 1e-3)):
        with torch.no_grad():
            full = lm(ids)
            lm.setup_cache(1, 32)
            mask = torch.zeros(1, 32, dtype=torch.long)
            mask[:, :24] = 1
            step_logits = [lm(ids[:, :10], attention_mask=mask, slots=torch.arange(10))]
            for t in range(10, 24):  # then one token at a time from the cache
                step_logits.append(lm(ids[:, t:t + 1], attention_mask=mask, position_ids=torch.tensor([[t]]),
                                      slots=torch.tensor([t])))
        assert max_diff(torch.cat(step_logits, 1), full) <= tolerance


def test_left_padded_batch_generates_like_single(smollm, tokenizer):
    prompts = ["What is 2+2?", "Name a colour of the sky on a clear summer day, please."]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    singles = [smollm.generate(torch.tensor([tokenizer.encode(t)]), max_new_tokens=12)[0] for t in texts]
    ids = [tokenizer.encode(t) for t in texts]
    T = max(map(len, ids))
    batch = torch.tensor([[2] * (T - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (T - len(i)) + [1] * len(i) for i in ids])
    out = smollm.generate(batch, attention_mask=mask, max_new_tokens=12)
    for single, row in zip(singles, out):
        assert row[:len(single)].tolist() == single.tolist()


def test_generation_stops_per_sequence():
    lm = tiny_vlm().lm
    script = iter([[5, 5], [7, 6], [9, 6], [9, 7]])  # sequence 0 ends at step 2, sequence 1 at step 4
    lm.lm_head.forward = lambda h: torch.nn.functional.one_hot(torch.tensor(next(script)), 300).float().view(*h.shape[:-1], 300)
    calls = []
    out = M.generate(lm, lm.tok_embed(torch.randint(0, 300, (2, 5))), max_new_tokens=20, eos_token_id=7,
                     pad_token_id=0, step=lambda *a: calls.append(1) or M.decode_step(*a))
    assert out.tolist() == [[5, 7, 0, 0], [5, 6, 6, 7]]  # padding after EOS, no step after the last EOS
    assert len(calls) == 3


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(M.sample(logits, 1.0, top_k=2, generator=g)) for _ in range(200)}
    assert draws == {2, 3}
    draws = {int(M.sample(logits, 1.0, top_p=0.5, generator=g)) for _ in range(200)}
    assert draws == {3}  # p(3) = 0.64 alone reaches 0.5
    assert int(M.sample(logits)) == 3
    for temperature in (0.5, 2.0):  # draws follow softmax(logits / T): 4000 draws, within 0.03 of each p
        draws = torch.stack([M.sample(logits.expand(4000, 4), temperature, generator=g)])
        freq = torch.bincount(draws.flatten(), minlength=4).float() / 4000
        assert (freq - (logits[0] / temperature).softmax(-1)).abs().max() <= 0.03, (temperature, freq)


def test_packed_segments_do_not_attend_across():
    lm = tiny_vlm().lm
    a, b = torch.randint(0, 300, (1, 7)), torch.randint(0, 300, (1, 5))
    packed = lm(torch.cat([a, b], 1), attention_mask=torch.tensor([[1] * 7 + [2] * 5]))
    assert max_diff(packed[:, :7], lm(a)) <= 1e-5
    assert max_diff(packed[:, 7:], lm(b)) <= 1e-5


def test_resize_vocab_keeps_old_tokens():
    lm = tiny_vlm(vocab=300).lm
    ids = torch.randint(0, 300, (1, 9))
    before = lm(ids)
    lm.resize_vocab(310)
    after = lm(ids)
    assert after.shape[-1] == 310 and lm.lm_head.weight is lm.tok_embed.weight  # still tied
    assert max_diff(after[..., :300], before) == 0.0
    assert torch.allclose(lm.tok_embed.weight[305], lm.tok_embed.weight[:300].mean(0))  # new rows: the mean


# ----------------------------------------------------------------------------- VLM

def test_vlm_image_embeddings_land_at_image_tokens():
    vlm = tiny_vlm()
    ids = torch.tensor([[1, 2] + [299] * 4 + [3] + [299] * 4 + [4]])
    pix = torch.randn(2, 3, 32, 32)
    x = vlm.embed(ids, pix)
    img = vlm.projector(vlm.vision(pix))
    assert torch.equal(x[0, 2:6], img[0]) and torch.equal(x[0, 7:11], img[1])
    assert torch.equal(x[0, [0, 1, 6, 11]], vlm.lm.tok_embed(ids[0, [0, 1, 6, 11]]))
    with pytest.raises(ValueError, match="9 image tokens but 2 image"):
        vlm.embed(torch.cat([ids, torch.tensor([[299]])], 1), pix)


def test_vlm_loss_ignores_unsupervised_positions():
    vlm = tiny_vlm()
    ids = torch.tensor([[1, 2] + [299] * 4 + [3, 4, 5, 6]])
    pix = torch.randn(1, 3, 32, 32)
    labels = torch.full_like(ids, -100)
    labels[0, 8:] = ids[0, 8:]
    full, _ = vlm(ids, pix)
    logits, loss = vlm(ids, pix, labels=labels)
    want = torch.nn.functional.cross_entropy(full[0, 7:9], ids[0, 8:10])
    assert logits.shape == (2, 300) and abs(loss.item() - want.item()) <= 1e-5


def test_save_load_roundtrip_and_errors(tmp_path):
    vlm = tiny_vlm(pos="sincos2d")
    vlm.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]  # no temp files left
    again = VLM.from_pretrained(tmp_path).eval()
    assert again.cfg == vlm.cfg
    ids, pix = torch.tensor([[1] + [299] * 4 + [2]]), torch.randn(1, 3, 32, 32)
    assert torch.equal(again(ids, pix)[0], vlm(ids, pix)[0])
    # a checkpoint of a different shape names the offending tensor
    other = tiny_vlm(vocab=301, pos="sincos2d")
    other.save_pretrained(tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text((tmp_path / "config.json").read_text())
    with pytest.raises(UserError, match="lm.tok_embed.weight has shape"):
        VLM.from_pretrained(tmp_path / "other")
    (tmp_path / "model.safetensors").write_bytes((tmp_path / "model.safetensors").read_bytes()[:500])
    with pytest.raises(UserError, match="truncated"):
        VLM.from_pretrained(tmp_path)
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match="'llama' is not a picoVLM"):
        VLM.from_pretrained(tmp_path / "llama")
    with pytest.raises(UserError, match="not a checkpoint directory"):
        VLM.from_pretrained(tmp_path / "nowhere")


def test_hub_id_without_network_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="could not download.*no network"):
        VisionTransformer.from_pretrained("google/siglip-base-patch16-224-picovlm-test")


# ----------------------------------------------------------------------------- SmolVLM / Idefics3

def tiny_hf_vlm(kind, tie, image_token_id, vocab):
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, SmolVLMConfig,
                              SmolVLMForConditionalGeneration)
    C, Model = ((SmolVLMConfig, SmolVLMForConditionalGeneration) if kind == "smolvlm" else
                (Idefics3Config, Idefics3ForConditionalGeneration))
    torch.manual_seed(0)
    cfg = C(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               image_size=64, patch_size=16),
            text_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=tie),
            scale_factor=2, image_token_id=image_token_id, tie_word_embeddings=tie)
    return Model(cfg).eval()


@pytest.mark.parametrize("kind,tie", [("smolvlm", False), ("smolvlm", True), ("idefics3", False)])
def test_smolvlm_import_parity(tmp_path, tokenizer, kind, tie):
    ours_proc = Processor(tokenizer, 64, 4, splitting=True, longest_edge=128, resample="lanczos")
    ref = tiny_hf_vlm(kind, tie, ours_proc.image_token_id, len(tokenizer))
    ref.save_pretrained(tmp_path)
    vlm = VLM.from_pretrained(tmp_path).eval()
    assert vlm.cfg.image_token_id == ours_proc.image_token_id and vlm.cfg.mp_pixel_shuffle == 2
    for splitting in (True, False):
        ours_proc.splitting = splitting
        for n_images in (1, 2):
            images = [random_image(100, 70, 1), random_image(60, 130, 2)][:n_images]
            batch = ours_proc([ours_proc.chat_prompt("Describe.", n_images)], [images])
            with torch.no_grad():
                want = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           pixel_values=batch["pixel_values"][None]).logits
                got, _ = vlm(batch["input_ids"], batch["pixel_values"])
            assert max_diff(got, want) <= 1e-4
    with torch.no_grad():  # greedy generation: the same tokens
        want = ref.generate(**{k: v for k, v in batch.items() if k != "pixel_values"},
                            pixel_values=batch["pixel_values"][None], max_new_tokens=8, do_sample=False,
                            eos_token_id=None, min_new_tokens=8)[0, batch["input_ids"].shape[1]:]
        got = vlm.generate(batch["input_ids"], batch["pixel_values"], max_new_tokens=8, eos_token_id=-1)[0]
    assert got.tolist() == want.tolist()


def test_export_smolvlm_roundtrip(tmp_path, tokenizer):
    from transformers import AutoImageProcessor, AutoTokenizer, SmolVLMForConditionalGeneration
    proc = Processor(tokenizer, 64, 4, splitting=True, longest_edge=128)
    cfg = VLMConfig(vision=VisionConfig(vit_image_size=64, vit_patch_size=16, vit_depth=2, vit_width=32, vit_heads=2,
                                        vit_mlp_dim=64, vit_pos_embed="sincos2d"),
                    lm=LanguageConfig(lm_hidden=48, lm_layers=2, lm_heads=4, lm_kv_heads=2, lm_intermediate=96,
                                      lm_vocab=len(tokenizer)), image_token_id=proc.image_token_id)
    ours = VLM(cfg).eval()
    ours.save_pretrained(tmp_path / "hf", proc, format="smolvlm")
    ref = SmolVLMForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    # the exported processor files rebuild the same inputs in transformers
    hf_proc, _ = reference_processor("smolvlm", AutoTokenizer.from_pretrained(tmp_path / "hf"), 64, True)
    hf_proc.image_processor = AutoImageProcessor.from_pretrained(tmp_path / "hf")
    images = [random_image(150, 90)]
    text = proc.chat_prompt("Describe.", 1)
    batch = proc([text], [images])
    want_inputs = hf_proc(text=[text], images=[images], return_tensors="pt")
    assert want_inputs["input_ids"].tolist() == batch["input_ids"].tolist()
    assert max_diff(want_inputs["pixel_values"][0], batch["pixel_values"]) <= 1e-6
    with torch.no_grad():
        want = ref(**{k: v for k, v in want_inputs.items() if k != "pixel_attention_mask"}).logits
        assert max_diff(ours(batch["input_ids"], batch["pixel_values"])[0], want) <= 1e-4
    # without a processor: the model alone (config + weights), as transformers' own model export does
    ours.save_pretrained(tmp_path / "bare", format="smolvlm")
    assert sorted(os.listdir(tmp_path / "bare")) == ["config.json", "model.safetensors"]
    with torch.no_grad():
        bare = SmolVLMForConditionalGeneration.from_pretrained(tmp_path / "bare").eval()
        assert max_diff(bare(**{k: v for k, v in want_inputs.items() if k != "pixel_attention_mask"}).logits, want) == 0
    with pytest.raises(UserError, match="unknown format 'onnx'"):
        ours.save_pretrained(tmp_path / "x", format="onnx")
    # transformers -> picoVLM -> export -> the same tensors and config
    again = VLM.from_pretrained(tmp_path / "hf")
    again.save_pretrained(tmp_path / "hf2", Processor.from_pretrained(tmp_path / "hf"), format="smolvlm")
    a, b = checkpoint.read_safetensors(str(tmp_path / "hf")), checkpoint.read_safetensors(str(tmp_path / "hf2"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == json.loads((tmp_path / "hf2" / "config.json").read_text())


def test_non_vlm_checkpoint_is_rejected(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=2, vocab_size=64)).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="model_type 'llama' is not a picoVLM, SmolVLM or Idefics3"):
        VLM.from_pretrained(tmp_path)


def test_bad_config_values_are_one_line_before_anything_is_built(tmp_path):
    """config.json that is a list, a zero patch size, absurd sizes (10^7-wide LM: a multi-PB
    allocation), a value of the wrong type, a SmolVLM config without its parts: a UserError naming
    the field, raised before any tensor is allocated (well under a second)."""
    import time
    tiny_vlm().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for bad, match in (([], "expected a JSON object"),
                       ({**cfg, "vision": {**cfg["vision"], "vit_patch_size": 0}}, "vit_patch_size=0"),
                       ({**cfg, "lm": {**cfg["lm"], "lm_hidden": 10 ** 7}}, "lm_hidden=10000000"),
                       ({**cfg, "vision": {**cfg["vision"], "vit_width": "wide"}}, "bad config.json"),
                       ({**cfg, "image_token_id": 10 ** 6}, "image_token_id"),
                       ({"model_type": "smolvlm"}, "bad config.json .KeyError: 'vision_config'")):
        (tmp_path / "config.json").write_text(json.dumps(bad))
        start = time.perf_counter()
        with pytest.raises(UserError, match=match):
            VLM.from_pretrained(tmp_path)
        assert time.perf_counter() - start < 1.0
