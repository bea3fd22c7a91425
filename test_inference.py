"""Fast decoding (inference.py) and GGUF export (gguf_export.py). CPU, no network.

Weight formats against fp32 on the real SmolLM2-135M-Instruct; the GGUF files read back by our
loader, by transformers' and by gguf.GGUFReader, and checked against llama.cpp's names and keys."""
import copy
import math
import os

import gguf
import pytest
import torch
import torch.nn.functional as F

import gguf_export
import inference
import model as M
from checkpoint import UserError
from conftest import max_diff, tiny_vlm
from test_generate import chat_ids, uncached_greedy

FORMATS = {"bf16": lambda lm: inference.matvec_linears(lm, torch.bfloat16),  # bf16 weights, fp32 arithmetic
           "int8": inference.quantize_int8, "int4": inference.quantize_int4}
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Who wrote Hamlet?",
             "List three colours of the rainbow."]
TEXT = ("The river rose slowly through the night, and by morning the low fields were under water. "
        "Farmers moved their animals to the hill behind the village, where the old church stood. "
        "Children watched from the bridge as branches and barrels drifted past. In the afternoon the rain "
        "stopped, the clouds broke, and the sun shone on a wide brown lake that had not been there the day before.")


@pytest.fixture(scope="module")
def formats(smollm):
    return {name: make(copy.deepcopy(smollm)) for name, make in FORMATS.items()}


# ----------------------------------------------------------------------------- quantized linears

@pytest.mark.parametrize("inputs", [96, 320])
def test_int4_linear_is_llama_cpp_q4_1(inputs):
    """Int4Linear rounds as llama.cpp's Q4_1 (gguf's reference quantizer): the same weights up to
    its scales and offsets, and the product of them with the activations, plus the bias. 320
    inputs (whole 64s: 2 chunks of 128 and one of 64) take kernels.cpp's product on CPUs with
    AVX512-VNNI (int8 activations per group, fp16 scales as Q4_1's), 96 ATen's (bf16 activations,
    bf16 scales). Measured error against the Q4_1 product: 0.3-0.5 of the bound below."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(inputs, 48)
    layer = inference.Int4Linear(linear)
    assert layer.own_kernel == (inputs == 320 and inference.cpu_kernels())
    q4_1 = gguf.quants.dequantize(gguf.quants.quantize(linear.weight.detach().numpy(), gguf.GGMLQuantizationType.Q4_1),
                                  gguf.GGMLQuantizationType.Q4_1)
    x = torch.randn(3, inputs)
    want = x @ torch.from_numpy(q4_1).t() + linear.bias
    scale = (linear.weight.abs().max() / 8).item()  # about one step of 4 bits
    assert max_diff(layer(x), want) <= 0.02 * scale * x.abs().sum(-1).max()
    assert max_diff(layer(x), linear(x)) <= 0.3 * scale * x.abs().sum(-1).max()
    assert layer(x[:1, None]).shape == (1, 1, 48)  # any leading dims
    assert max_diff(layer(x[1:2]), layer(x)[1:2]) == 0  # a row alone as in a batch
    assert max_diff(layer(x.bfloat16()).float(), want) <= 0.03 * scale * x.abs().sum(-1).max()


def test_quantize_int4_keeps_the_head_at_8_bits_and_what_does_not_fit(monkeypatch):
    lm = tiny_vlm().lm
    lm.blocks[0].down = torch.nn.Linear(100, 64, bias=False)  # 100 inputs: no whole groups of 32
    lm.blocks[0].up = torch.nn.Linear(64, 120, bias=False)  # 120 outputs: no whole blocks of 16
    inference.quantize_int4(lm)
    assert isinstance(lm.blocks[0].gate, inference.Int4Linear) and isinstance(lm.lm_head, inference.Int8Linear)
    assert type(lm.blocks[0].down) is type(lm.blocks[0].up) is torch.nn.Linear
    assert lm.tok_embed.weight.dtype == torch.float32
    layer = lm.blocks[1].gate
    layer.float()  # a model cast to fp32 keeps the kernel's scales
    scales = [layer.scale, layer.offset] if layer.own_kernel else [layer.scales_and_zeros]
    assert {t.dtype for t in scales} == {torch.float16 if layer.own_kernel else torch.bfloat16}
    assert layer.weight.dtype == torch.uint8
    with pytest.raises(RuntimeError, match="quantize on the device"):
        layer.to("meta")  # its packed layout is the CPU's
    monkeypatch.setattr(inference, "cpu_kernels", lambda: False)  # a CPU without AVX512-VNNI: ATen's layout
    assert not inference.Int4Linear(torch.nn.Linear(64, 32)).own_kernel


def test_huge_pages_moves_the_weights_into_one_block():
    """huge_pages copies the parameters and buffers into one 2 MiB-aligned block (what Linux backs
    with huge pages): the same tensors (tied ones stay tied), the same values and logits, KV caches
    left out."""
    torch.manual_seed(0)
    lm = tiny_vlm().lm
    inference.quantize_int4(lm.blocks)  # the head stays tied to the embedding table
    lm.setup_cache(1, 16)
    ids = torch.randint(0, 300, (1, 9))
    want, params = lm(ids), dict(lm.named_parameters(remove_duplicate=False))
    before = {name: t.clone() for name, t in params.items()}
    inference.huge_pages(lm)
    assert max_diff(lm(ids), want) == 0
    assert all(t is params[name] and torch.equal(t, before[name]) for name, t in lm.named_parameters(remove_duplicate=False))
    assert lm.lm_head.weight is lm.tok_embed.weight
    tensors = [*lm.parameters(), *(b for n, b in lm.named_buffers() if ".cache." not in n)]
    block = {t.untyped_storage().data_ptr() for t in tensors}
    assert len(block) == 1 and min(t.data_ptr() for t in tensors) % (1 << 21) == 0
    assert lm.blocks[0].attn.cache.k.untyped_storage().data_ptr() not in block


# ----------------------------------------------------------------------------- quality on SmolLM2-135M

@torch.no_grad()
def test_formats_close_to_fp32(smollm, tokenizer, formats):
    """Each format against fp32, fed fp32's greedy answers to 4 questions (12 tokens each) and a
    76-token text. Measured (2026-12-01): max |logit diff| / mean / top-1 agreement / perplexity
    (fp32 34.79): bf16 weights 0.29 / 0.037 / 100% / 34.72, int8 2.1 / 0.29 / 97% / 34.12, int4
    with ATen's kernel (bf16 activations) 1.3 / 0.12 / 99% / 34.79, with kernels.cpp's (2026-12-02,
    activations as int8 + int8 / 128) 0.71 / 0.061 / 100% / 34.72. int4 looks better than int8
    here because this GGUF's block weights are Q4_1 already, which int4's groups of 32 reproduce
    almost exactly (only its int8 head and its activations err); its 4-bit head alone gave 4.7 /
    0.42 / 86% / 37.6. Tolerances: twice those means (ATen's for int4), max <= 1 (bf16) or 3, top-1
    >= 98% / 90% / 95%, perplexity within 5%; greedy answers may part from fp32's only where fp32
    was nearly undecided (margin < 1)."""
    tol = {"bf16": (1.0, 0.08, 0.98), "int8": (3.0, 0.6, 0.9), "int4": (3.0, 0.25, 0.95)}
    text = torch.tensor([tokenizer.encode(TEXT)])
    ppl = {k: math.exp(F.cross_entropy(m(text)[0, :-1].float(), text[0, 1:]))
           for k, m in {"fp32": smollm, **formats}.items()}
    for question in QUESTIONS:
        ids = chat_ids(tokenizer, question)
        want = smollm.generate(ids, max_new_tokens=12, eos_token_id=-1)
        full = torch.cat([ids, want], 1)
        a = smollm(full)
        for name, lm in formats.items():
            b = lm(full).float()
            diff, (top, mean, top1) = (a - b).abs(), tol[name]
            assert diff.max() <= top and diff.mean() <= mean, (name, question, diff.max(), diff.mean())
            assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= top1, (name, question)
            got = lm.generate(ids, max_new_tokens=12, eos_token_id=-1)[0].tolist()
            split = next((i for i, (x, y) in enumerate(zip(want[0].tolist(), got)) if x != y), None)
            if split is not None:
                logits = a[0, ids.shape[1] + split - 1]
                assert logits[want[0, split]] - logits[got[split]] < 1.0, (name, question, split)
    for name in formats:
        assert abs(ppl[name] / ppl["fp32"] - 1) <= 0.05, ppl


@pytest.mark.parametrize("name", FORMATS)
@torch.no_grad()
def test_cached_decoding_equals_uncached_and_batch_equals_single(name, formats, tokenizer):
    """Per format: the cached greedy tokens equal the whole sequence run again for every token,
    and a left-padded batch of prompts of different lengths decodes each row as it does alone."""
    lm = formats[name]
    prompts = [chat_ids(tokenizer, q) for q in ("Who wrote Hamlet?", "Name a colour of the sky on a clear day, please.")]
    singles = [lm.generate(ids, max_new_tokens=8, eos_token_id=-1) for ids in prompts]
    assert singles[0][0].tolist() == uncached_greedy(lm, prompts[0], 8)
    T = max(ids.shape[1] for ids in prompts)
    batch = torch.cat([F.pad(ids, (T - ids.shape[1], 0), value=2) for ids in prompts])
    mask = torch.cat([F.pad(torch.ones_like(ids), (T - ids.shape[1], 0)) for ids in prompts])
    out = lm.generate(batch, attention_mask=mask, max_new_tokens=8, eos_token_id=-1)
    for single, row in zip(singles, out):
        assert row.tolist() == single[0].tolist()


def greedy_up_to_ties(lm, ids, new, tol=0.01):
    """Whether each new token is the argmax of the uncached logits up to a near tie (tiny random
    models have some; their eager and compiled products differ by ~1e-3)."""
    logits = lm(torch.cat([ids, new], 1))[:, ids.shape[1] - 1:-1]
    return (logits.max(-1).values - logits.gather(-1, new[..., None])[..., 0]).max() < tol


@torch.no_grad()
def test_compiled_int4_decoding_equals_eager():
    """The CPU decode step compiled ahead of time (ExportedStep; inductor keeps the int4 kernel,
    kernels.cpp's or ATen's, and kernels.cpp's attention in its graph) gives the eager tokens, which are uncached decoding's,
    on a tiny random LM. It reads the model's own tensors: a new KV cache and a weight changed in
    place after it was built are the ones it uses."""
    torch.manual_seed(0)
    lm = inference.kernel_attention(inference.quantize_int4(tiny_vlm().lm))  # eager decoding keeps SDPA
    ids = torch.randint(0, 300, (2, 7))
    want = lm.generate(ids, max_new_tokens=6, eos_token_id=-1, cache_len=16)
    _, step = inference.compile_generation(torch.device("cpu"))  # the step only: compiling takes long enough
    got = lm.generate(ids, max_new_tokens=6, eos_token_id=-1, cache_len=16, step=step)
    assert got.tolist() == want.tolist() and greedy_up_to_ties(lm, ids, got)
    lm.setup_cache(2, 16)
    lm.norm.weight.mul_(-3)
    new = lm.generate(ids, max_new_tokens=6, eos_token_id=-1, cache_len=16, step=step)
    assert greedy_up_to_ties(lm, ids, new) and new.tolist() != got.tolist() and len(step.built) == 1


def test_int8_loop_equals_dequantized_linear(monkeypatch):
    """Int8Linear's compiled product for 1-4 rows, kernels.cpp's where it is built and inductor's
    loop (taken on AVX512 CPUs; forced here so that any CPU checks it), against F.linear with the
    dequantized weight: the same sums in another order, max |diff| <= 1e-5 (outputs ~0.5). The op
    alone for 6 rows (a group of 4, then of 2); a layer whose inputs are not whole 64s keeps the loop."""
    monkeypatch.setattr(inference, "AVX512", True)
    torch.manual_seed(0)
    layer = inference.Int8Linear(torch.nn.Linear(128, 48))
    assert layer.own_kernel == inference.cpu_kernels() and not inference.Int8Linear(torch.nn.Linear(96, 8)).own_kernel
    x = torch.randn(6, 1, 128)
    want = F.linear(x, layer.weight.float() * layer.scale[:, None], layer.bias)
    with torch.no_grad():
        for own_kernel in {False, layer.own_kernel}:
            layer.own_kernel = own_kernel
            torch._dynamo.reset()
            compiled = torch.compile(layer, fullgraph=True, dynamic=False)
            for n in (1, 3):
                assert (compiled(x[:n]) - want[:n]).abs().max() <= 1e-5
        if inference.cpu_kernels():
            got = torch.ops.picovlm.int8_matvec(x, layer.weight, layer.scale) + layer.bias
            assert (got - want).abs().max() <= 1e-5


def test_one_query_attention_equals_sdpa():
    """The compiled CPU decode step's attention, two matmuls (model.py) and kernels.cpp's where it is
    built, against SDPA with enable_gqa, batched, with masked cache rows: max |diff| <= 1e-6 (outputs
    ~1); the kernel with bf16 caches <= 0.02 (SDPA on the same bf16 numbers, in fp32)."""
    torch.manual_seed(0)
    for B, H, KV in ((1, 9, 3), (2, 4, 4), (3, 8, 2)):
        q, k, v = torch.randn(B, 1, H, 16).transpose(1, 2), torch.randn(B, KV, 40, 16), torch.randn(B, KV, 40, 16)
        mask = torch.rand(B, 1, 1, 40) > 0.3
        mask[..., 0] = True
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=H != KV)
        assert (M.one_query_attention(q, k, v, mask) - want).abs().max() <= 1e-6
        if inference.cpu_kernels():
            assert (torch.ops.picovlm.one_query_attention(q, k, v, mask) - want).abs().max() <= 1e-6
            q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
            want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=H != KV)
            got = torch.ops.picovlm.one_query_attention(q, k, v, mask)
            assert got.dtype == torch.bfloat16 and (got.float() - want).abs().max() <= 0.02


# ----------------------------------------------------------------------------- GGUF export

def small_tokenizer(tokenizer, n=1024):
    """SmolLM2's tokenizer cut to its first n ids and the merges among them: a GGUF with a 49k-token
    vocabulary takes seconds to parse, this one a blink."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["model"]["vocab"] = vocab = {t: i for t, i in spec["model"]["vocab"].items() if i < n}
    spec["model"]["merges"] = [m for m in spec["model"]["merges"] if "".join(m) in vocab]
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < n]
    small = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<|im_start|>",
                                    eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<|endoftext|>")
    small.chat_template = tokenizer.chat_template
    return small


def vlm_for(tokenizer):
    """A tiny random VLM for this tokenizer (+ the image tokens, added by its processor)."""
    proc = M.Processor(tokenizer, 32, 4)
    torch.manual_seed(0)
    return tiny_vlm(vocab=len(proc.tokenizer), image_token_id=proc.image_token_id), proc


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return vlm_for(small_tokenizer(tokenizer))


# mean |logit diff| of our tiny LM (logits ~0.1-0.5) read back from each file type
ROUND_TRIP = {"f32": 1e-4, "f16": 1e-3, "bf16": 5e-3, "q8_0": 5e-3, "q4_1": 5e-2}


@pytest.mark.parametrize("gguf_type", ROUND_TRIP)
@torch.no_grad()
def test_text_gguf_reads_back(tiny, tmp_path, gguf_type):
    """save_pretrained(format="gguf") writes two files; from the text one our loader and
    transformers' GGUF loader both give our logits: to 1e-4 in F32 (max), the other types within
    the rounding of their weights (mean |diff| <= ROUND_TRIP), and the two loaders agree to 1e-4."""
    from transformers import AutoModelForCausalLM
    vlm, proc = tiny
    text, mmproj = vlm.save_pretrained(tmp_path, proc, format="gguf", gguf_type=gguf_type)
    kind = gguf_type.upper()
    assert sorted(os.listdir(tmp_path)) == [f"mmproj-picovlm-{kind}.gguf", f"picovlm-{kind}.gguf"]  # no temp files
    ids = torch.randint(0, vlm.cfg.lm.lm_vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    ours = M.LanguageModel.from_pretrained(text)(ids)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=os.path.basename(text), dtype=torch.float32)
    theirs = ref(ids).logits
    diff = (ours - vlm.lm(ids)).abs()
    assert (diff.max() if gguf_type == "f32" else diff.mean()) <= ROUND_TRIP[gguf_type], diff.mean()
    assert max_diff(ours, theirs) <= 1e-4
    Q = gguf.GGMLQuantizationType
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(text).tensors}
    matrix = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_1": Q.Q4_1}[gguf_type]
    assert types["blk.0.ffn_down.weight"] == types["blk.1.attn_q.weight"] == matrix
    assert types["token_embd.weight"] == (Q.Q8_0 if gguf_type == "q4_1" else matrix)
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == Q.F32


@torch.no_grad()
def test_text_gguf_names_metadata_and_transformers(tokenizer, tmp_path, gguf_path):
    """The F32 text GGUF of a tiny VLM with SmolLM2's whole tokenizer: llama.cpp's tensor names
    (gguf's own map from transformers' names), llama.* metadata, SmolLM2's vocabulary, token types
    and merges exactly as in llama.cpp's own SmolLM2 GGUF, our image tokens as CONTROL tokens;
    transformers' GGUF loader gives our logits (<= 1e-4) and its GGUF tokenizer our token ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    vlm, proc = vlm_for(tokenizer)
    cfg = vlm.cfg.lm
    text, _ = gguf_export.export_gguf(vlm, tmp_path, proc)
    r = gguf.GGUFReader(text)
    meta = {k: f.contents() for k, f in r.fields.items()}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.lm_layers)
    hf = M.unmapped(vlm.lm.state_dict(), M.llama_key_map(cfg), cfg)
    assert sorted(t.name for t in r.tensors) == sorted(names.get_name(k, try_suffixes=(".weight",)) for k in hf)
    assert {k: meta[k] for k in ("general.architecture", "general.type", "general.file_type", "llama.block_count",
                                 "llama.embedding_length", "llama.feed_forward_length", "llama.attention.head_count",
                                 "llama.attention.head_count_kv", "llama.vocab_size", "llama.rope.dimension_count",
                                 "llama.context_length", "tokenizer.ggml.model", "tokenizer.ggml.pre",
                                 "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                                 "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token")} == {
        "general.architecture": "llama", "general.type": "model", "general.file_type": 0, "llama.block_count": 2,
        "llama.embedding_length": 64, "llama.feed_forward_length": 128, "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2, "llama.vocab_size": 49191, "llama.rope.dimension_count": 16,
        "llama.context_length": 256, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.padding_token_id": 2,
        "tokenizer.ggml.add_bos_token": False}
    assert meta["llama.rope.freq_base"] == cfg.lm_rope_theta
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template
    theirs = {k: f.contents() for k, f in gguf.GGUFReader(gguf_path).fields.items() if k.startswith("tokenizer.ggml.")}
    n = len(theirs["tokenizer.ggml.tokens"])
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
        assert meta[key][:n] == theirs[key]
    assert meta["tokenizer.ggml.merges"] == theirs["tokenizer.ggml.merges"]
    assert set(meta["tokenizer.ggml.token_type"][n:]) == {gguf.TokenType.CONTROL}  # <image>, <row_1_col_1>, ...
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=os.path.basename(text), dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.lm_vocab, (1, 24), generator=torch.Generator().manual_seed(1))
    assert max_diff(ref(ids).logits, vlm.lm(ids)) <= 1e-4
    prompt = proc.chat_prompt("Describe the image.", 1)
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=os.path.basename(text))
    sample = prompt.replace("<image>", "<fake_token_around_image><global-img><image><image><fake_token_around_image>")
    assert back.encode(sample, add_special_tokens=False) == tokenizer.encode(sample, add_special_tokens=False)


# llama.cpp's tools/mtmd/clip.cpp reads these for projector type idefics3 (clip-impl.h's KEY_* / TN_*)
MMPROJ_KEYS = {"general.architecture": "clip", "general.type": "mmproj", "clip.projector_type": "idefics3",
               "clip.has_vision_encoder": True, "clip.use_gelu": True, "clip.vision.image_size": 32,
               "clip.vision.patch_size": 8, "clip.vision.embedding_length": 32, "clip.vision.feed_forward_length": 64,
               "clip.vision.block_count": 2, "clip.vision.attention.head_count": 2, "clip.vision.projection_dim": 64,
               "clip.vision.projector.scale_factor": 2, "clip.vision.preproc_image_size": 32,
               "clip.vision.image_mean": [0.5] * 3, "clip.vision.image_std": [0.5] * 3}


@torch.no_grad()
def test_mmproj_gguf_is_llama_cpp_idefics3(tiny, tmp_path):
    """The mmproj file holds what clip.cpp's idefics3 graph reads, under its names and in ggml's
    shapes ([in, out] for a Linear, [p, p, 3, D] for the patch convolution), and our image
    embeddings come back from its tensors (mapped to SmolVLM's names and loaded by smolvlm_key_map)."""
    vlm, proc = tiny
    _, mmproj = gguf_export.export_gguf(vlm, tmp_path, proc, "f16")
    r = gguf.GGUFReader(mmproj)
    meta = {k: f.contents() for k, f in r.fields.items()}
    assert {k: meta[k] for k in MMPROJ_KEYS} == MMPROJ_KEYS
    assert meta["clip.vision.attention.layer_norm_epsilon"] == pytest.approx(1e-6)
    shapes = {t.name: [int(n) for n in t.shape] for t in r.tensors}
    block = {"attn_q": [32, 32], "attn_k": [32, 32], "attn_v": [32, 32], "attn_out": [32, 32], "ffn_up": [32, 64],
             "ffn_down": [64, 32], "ln1": None, "ln2": None}
    want = {"v.patch_embd.weight": [8, 8, 3, 32], "v.patch_embd.bias": [32], "v.position_embd.weight": [32, 16],
            "v.post_ln.weight": [32], "v.post_ln.bias": [32], "mm.model.fc.weight": [128, 64]}
    for i in range(2):
        for name, shape in block.items():
            want[f"v.blk.{i}.{name}.weight"] = shape or [32]
            want[f"v.blk.{i}.{name}.bias"] = [shape[1] if shape else 32]
    assert shapes == want
    Q = gguf.GGMLQuantizationType
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["v.patch_embd.weight"] == types["v.position_embd.weight"] == types["v.blk.0.ln1.bias"] == Q.F32
    assert types["v.blk.0.attn_q.weight"] == types["mm.model.fc.weight"] == Q.F16
    # back into a VLM: llama.cpp's names -> SmolVLM's (gguf's tensor map) -> ours
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, 2)
    plan = {k: s for k, s in M.smolvlm_key_map(vlm.cfg).items() if not k.startswith("lm.")}
    hf = {s: s for src in plan.values() for s in src}
    by_gguf = {names.get_name(s, try_suffixes=(".weight", ".bias")): s for s in hf}
    state = {by_gguf[t.name]: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()) for t in r.tensors}
    again = copy.deepcopy(vlm)
    M.load_mapped(again, plan, state)
    pixels = torch.randn(2, 3, 32, 32)
    assert max_diff(again.image_embeds(pixels), vlm.image_embeds(pixels)) <= 1e-2  # F16 weights


def test_gguf_export_errors(tiny, tmp_path):
    vlm, proc = tiny
    with pytest.raises(UserError, match="gguf_type 'q3_k'"):
        gguf_export.export_gguf(vlm, tmp_path, proc, "q3_k")
    with pytest.raises(UserError, match="needs the processor"):
        vlm.save_pretrained(tmp_path, format="gguf")
    with pytest.raises(UserError, match="unknown format 'ggml'"):
        vlm.save_pretrained(tmp_path, proc, format="ggml")
    assert os.listdir(tmp_path) == []


@torch.no_grad()
def test_smollm2_gguf_round_trip(smollm, tokenizer, tmp_path):
    """The real SmolLM2-135M written as Q8_0 and read back by our loader: the same greedy answer,
    logits within Q8_0's rounding (measured: max 1.3, mean 0.21 for logits up to ~30; as F16 0.04
    and 0.006; as F32 exact). The cut tokenizer leaves most ids [PAD] slots: only weights matter here."""
    path = str(tmp_path / "smollm2.gguf")
    gguf_export.write_text_gguf(smollm.state_dict(), smollm.cfg, small_tokenizer(tokenizer), path, "q8_0")
    again = M.LanguageModel.from_pretrained(path)
    ids = chat_ids(tokenizer, "What is the capital of France?")
    want = smollm.generate(ids, max_new_tokens=8, eos_token_id=-1)
    assert again.generate(ids, max_new_tokens=8, eos_token_id=-1).tolist() == want.tolist()
    diff = (again(ids) - smollm(ids)).abs()
    assert diff.max() <= 3.0 and diff.mean() <= 0.4, (diff.max(), diff.mean())
