"""picoVLM against Hugging Face transformers: the same weights and inputs, in one process.

  python bench.py                  # full run
  python bench.py --quick          # fewer repeats and tokens (a few minutes on 2 CPU cores)
  python bench.py --quick --smoke  # tiny random models: checks the script, measures nothing
  python bench.py --device cuda    # adds training MFU and --compile decoding (CUDA graphs)
  python bench.py --memory --quick # peak memory of a training step per fine-tuning setup (< 10 minutes on 2 cores)

Measured:
  train    forward + backward of the VLM at the nanoVLM-222M shape (SigLIP-B/16-224, pixel
           shuffle 2, SmolLM2-135M), batch 4 x 128 tokens, loss on the last 32 tokens of each
           row (both models get the same labels), against SmolVLMForConditionalGeneration
           holding the same weights (model.export_smolvlm). fp32 vs fp32, and (where bf16
           matmuls are native) bf16 autocast vs bf16 autocast, as train.py trains, plus our
           model cast to bf16 (no autocast: what pure-bf16 training would cost).
  prefill  logits of 1 x 256 tokens, SmolLM2-135M from the offline GGUF.
  decode   batch-1 greedy tokens/s after a 32-token prompt (prefill excluded: time(n+1 tokens)
           - time(1 token)), against LlamaForCausalLM.generate with the same weights; and the
           step under torch.compile (generate.py --compile): on CUDA bf16 and int4 as CUDA graphs, on a
           CPU (not --quick: compiling takes minutes on 2 cores) fp32, bf16 weights (fp32
           arithmetic, inference.MatvecLinear), int8 and int4 (groups of 32, the head int8).
  llama.cpp (--vs_llama_cpp, with llama-cpp-python installed) decoding the same LM written by
           gguf_export as F32, BF16, Q8_0 and Q4_1 files (picoVLM's fp32, bf16, int8 and int4
           formats), in the same alternating runs.
  memory   (--memory, instead of the above) peak memory of one training step (AdamW, moments
           already allocated as in any step after the first) at SmolVLM-256M's and -500M's
           shapes (random weights; rows of 512 tokens: one 512 px image = 64 tokens, then text,
           loss on the last 128; --quick: 256M only; on CUDA also SmolVLM-2.2B's, 13 image tiles
           a row), batch 1 and 4, for: full fine-tune, frozen ViT, LoRA (r=8 on the LM's
           linears, projector trained), + gradient checkpointing, + the frozen base in bf16 or
           int8. Each in its own process, so that peaks do not mix: on CUDA
           torch.cuda.max_memory_allocated, on a CPU the process's peak RSS (getrusage; it
           includes ~0.25 GiB of Python and torch), its high-water mark reset once the model is
           built. bf16 autocast where bf16 is native.
Runs of the contestants alternate (A B, B A, ...) and medians are reported, so a machine that
slows down mid-run slows both. speedup = picoVLM speed / transformers speed (> 1: faster).
The memory bandwidth is measured (sum of a large tensor, once a round among the decode runs), and
the decode limit is that bandwidth / bytes of weights read per token; a run's share of it and its
ratio to llama.cpp are medians over the rounds of the round's own (torch's sum can read slower than
the compiled decode loops, so a share above 100% happens). The last line is one JSON object.

On a CPU shared with other busy processes, OpenMP threads that spin-wait for each other slow
everything down many times over, while threads that sleep at once slow decoding 2.6x
(docs/experiments.md), so this script, as generate.py, lets them spin briefly (GOMP_SPINCOUNT=10000)
unless OMP_WAIT_POLICY or GOMP_SPINCOUNT is set; the load average is printed.
"""
import argparse
import contextlib
import copy
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import cli

cli.openmp_wait(decoding=True)  # as generate.py
import torch  # noqa: E402

import model as M  # noqa: E402
from checkpoint import UserError, default_lm_path, load_tokenizer  # noqa: E402
from inference import (Int8Linear, compile_generation, decode_layout, huge_pages, kernel_attention,  # noqa: E402
                       matvec_linears, quantize_int4, quantize_int8)


def parse_args(argv=None):
    p = cli.ArgumentParser(prog="bench.py", description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer repeats and new tokens")
    p.add_argument("--smoke", action="store_true", help="tiny random models (a test of this script)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if available")
    p.add_argument("--reps", type=int, default=None, help="A/B repeats per comparison (default 3 quick, 5 full)")
    p.add_argument("--skip_train", action="store_true", help="only the language-model benchmarks")
    p.add_argument("--random_weights", action="store_true",
                   help="SmolLM2-135M shapes with random weights, where the offline GGUF is not installed (speed does not "
                        "depend on the values; both sides still get the same weights)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir for the training benchmark (default: the offline GGUF's)")
    p.add_argument("--train_batch", type=int, default=64, help="CUDA MFU run: rows of 512 tokens (one image each)")
    p.add_argument("--peak_tflops", type=float, default=None, help="GPU bf16 peak for MFU (default: from the GPU name)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's, one per core)")
    p.add_argument("--memory", action="store_true", help="peak memory of a training step per fine-tuning setup instead")
    p.add_argument("--vs_llama_cpp", action="store_true", help="also decode with llama-cpp-python (GGUF files of our LM)")
    p.add_argument("--data", action="store_true", help="data loading instead: samples/s of one DataLoader worker on "
                   "photos in a parquet file, and the workers one GPU needs (its training step on CUDA)")
    p.add_argument("--gpu_samples_per_s", type=float, default=None,
                   help="--data without CUDA: the GPU training rate to count workers for")
    p.add_argument("--memory_child", help=argparse.SUPPRESS)  # one --memory configuration (JSON), run in a subprocess
    args = p.parse_args(argv)
    for flag in ("reps", "train_batch", "threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1")
    args.reps = args.reps or (1 if args.smoke else 3 if args.quick else 5)
    return args


# ----------------------------------------------------------------------------- timing

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def alternate(runs, reps, device, warmup=1):
    """runs: {name: fn() -> seconds}. Warm each up, then run them in turn `reps` times, the order
    rotated every round, so that no contestant always runs right after the same other one (whose
    leftovers in caches and allocator could slow it). -> {name: [seconds, one a round]}."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in runs}
    names = list(runs)
    for r in range(reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(runs[name]())
    return times


def medians(times):
    return {name: statistics.median(t) for name, t in times.items()}


def memory_read(device):
    """(fn() -> seconds, bytes it reads): summing a tensor far larger than the caches, the read
    bandwidth, timed among the decode runs so that it meets the same load on a shared host."""
    x = torch.ones(2 ** (28 if device.type == "cuda" else 26), device=device)  # 1 GiB / 256 MiB
    return lambda: timed(x.sum, device), x.numel() * x.element_size()


def bytes_per_token(lm):
    """Bytes of weights one decode step reads: every matrix once. The embedding table counts only
    when it is also the (tied, unquantised) head; otherwise one row of it is gathered."""
    tensors = dict(lm.named_parameters()) | dict(lm.named_buffers())
    if lm.lm_head.weight is not lm.tok_embed.weight:
        tensors.pop("tok_embed.weight")
    return sum(t.numel() * t.element_size() for name, t in tensors.items() if ".cache." not in name)


def bf16_is_native(device):
    """bf16 matmuls at full speed? On CPUs without AVX512-BF16/AMX, oneDNN emulates them ~10-50x
    slower than fp32, which would make a bf16 training step take minutes."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


# ----------------------------------------------------------------------------- language model

def load_lms(args):
    """(ours, transformers' LlamaForCausalLM holding the same weights): SmolLM2-135M from the
    offline GGUF through our loader (test_model.py checks it against transformers' own GGUF
    loader, which parses the file twice and is much slower), or random weights with --random_weights
    (or --smoke: tiny shapes)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    if args.smoke or args.random_weights:
        torch.manual_seed(0)
        ours = M.LanguageModel(M.LM_PRESETS["tiny" if args.smoke else "smollm2-135m"])
    else:
        ours = M.LanguageModel.from_pretrained(default_lm_path())
    ref = LlamaForCausalLM(LlamaConfig(**M.lm_config_to_hf(ours.cfg)))
    missing, unexpected = ref.load_state_dict(M.unmapped(ours.state_dict(), M.llama_key_map(ours.cfg), ours.cfg), strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if ours.cfg.lm_tie_embeddings else set()):
        raise RuntimeError(f"transformers' Llama did not take our weights: missing {missing}, unexpected {unexpected}")
    return ours, ref


def bench_lm(args, device, results, rows):
    ours, ref = load_lms(args)
    ours, ref = ours.to(device).eval(), ref.to(device).eval()
    vocab, n_new = ours.cfg.lm_vocab, (16 if args.smoke else 32 if args.quick else 128)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, 32), generator=g).to(device)
    prefill_ids = torch.randint(0, vocab, (1, 256), generator=g).to(device)
    cache_len = 256  # one cache size for every call: compiled steps keep static shapes

    variants = {"fp32": ours, "bf16": copy.deepcopy(ours).to(torch.bfloat16),
                "int8": quantize_int8(copy.deepcopy(ours)), "int4": quantize_int4(copy.deepcopy(ours))}
    # --compile: on CUDA the bf16 and int4 steps as CUDA graphs (vs transformers bf16); on CPU (not
    # --quick: inductor takes minutes on 2 cores) the step with MatvecLinear's fp32 and bf16 weights, int8, int4
    compiled = {"bf16": variants["bf16"], "int4": variants["int4"]} if device.type == "cuda" else {} if args.quick else {
        "fp32": matvec_linears(copy.deepcopy(ours)), "bf16": matvec_linears(copy.deepcopy(ours), torch.bfloat16),
        "int8": variants["int8"], "int4": variants["int4"]}
    if device.type == "cpu":  # as generate.py does (fp32 only; after the copies, which keep strides)
        decode_layout(ours)
        for lm in {id(lm): lm for lm in [*variants.values(), *compiled.values()]}.values():
            huge_pages(kernel_attention(lm))

    def ours_gen(lm, n, fns=(None, None)):
        prefill, step = fns
        return lm.generate(prompt, max_new_tokens=n, eos_token_id=-1, cache_len=cache_len, prefill=prefill, step=step)

    def ref_gen(model, n):
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, eos_token_id=None, pad_token_id=0)[:, prompt.shape[1]:]

    def decode_seconds(gen):  # n tokens minus 1 token: the prefill cancels out
        return lambda: timed(lambda: gen(n_new + 1), device) - timed(lambda: gen(1), device)

    with torch.no_grad(), contextlib.ExitStack() as stack:  # the stack: llama.cpp's models and files
        same = ours_gen(ours, 16).tolist() == ref_gen(ref, 16).tolist()
        print(f"greedy tokens identical to transformers (fp32, 16 tokens): {'yes' if same else 'NO'}")
        results["greedy_tokens_match"] = same

        runs = {"transformers fp32": decode_seconds(lambda n: ref_gen(ref, n))}
        runs |= {f"picoVLM {k}": decode_seconds(lambda n, k=k: ours_gen(variants[k], n)) for k in variants}
        if device.type == "cuda":
            ref_bf16 = copy.deepcopy(ref).to(torch.bfloat16)
            runs["transformers bf16"] = decode_seconds(lambda n: ref_gen(ref_bf16, n))
        if args.vs_llama_cpp:
            llama = llama_cpp_runs(ours, prompt[0].tolist(), stack)
            same = llama["F32"](16) == ours_gen(ours, 16)[0].tolist()
            print(f"llama.cpp greedy tokens identical to picoVLM (F32 file, 16 tokens): {'yes' if same else 'NO'}")
            results["llama_cpp_greedy_tokens_match"] = same
            runs |= {f"llama.cpp {k}": decode_seconds(gen) for k, gen in llama.items()}
        for kind, lm in compiled.items():
            fns = compile_generation(device)
            t0 = time.perf_counter()
            try:
                ours_gen(lm, 2, fns)
                runs[f"picoVLM {kind} --compile"] = decode_seconds(lambda n, m=lm, f=fns: ours_gen(m, n, f))
                print(f"{kind} decode step compiled in {time.perf_counter() - t0:.0f} s")
            except Exception as e:  # a compiler failure must not cost the other numbers
                print(f"--compile {kind} decode skipped: {type(e).__name__}: {str(e)[:300]}")
        runs["memory read"], read_bytes = memory_read(device)
        t0 = time.perf_counter()
        rounds = alternate(runs, args.reps, device)
        bandwidth = [read_bytes / t for t in rounds.pop("memory read")]  # bytes/s, one a round
        rate = {k: n_new / v for k, v in medians(rounds).items()}
        print(f"decode: {n_new} tokens, {args.reps} alternating runs ({time.perf_counter() - t0:.0f} s)")

        bw = statistics.median(bandwidth)
        weight_bytes = {k: bytes_per_token(v) for k, v in variants.items()}
        limits = {k: bw / weight_bytes[k] for k in variants}
        # each run's share of its round's bandwidth limit, the median over the rounds
        share = {k: statistics.median(n_new * weight_bytes[k.split()[1]] / t / b for t, b in zip(v, bandwidth))
                 for k, v in rounds.items() if k.startswith("picoVLM")}
        # picoVLM's fastest run of each format against llama.cpp's type of the same bytes: the median
        # of the rounds' ratios, since both sides of a round met the same load on a shared host
        versus_llama = {}
        for kind in (k.split()[1] for k in rate if k.startswith("llama.cpp")):
            mine = max((m for m in rate if m.startswith(f"picoVLM {LLAMA_CPP_TYPES[kind]}")), key=rate.get)
            versus_llama[kind] = statistics.median(t / o for t, o in zip(rounds[f"llama.cpp {kind}"], rounds[mine]))
        for k, v in rate.items():
            kind = k.split()[1]
            if k.startswith("llama.cpp"):  # next to the picoVLM format of (about) the same bytes per weight
                note = f"picoVLM {LLAMA_CPP_TYPES[kind]}'s best: {versus_llama[kind]:.2f}x this"
            else:
                note = f"{share[k]:.0%} of {limits[kind]:.0f}" if k.startswith("picoVLM") else ""
            rows.append(("decode tokens/s", k, f"{v:.1f}", f"{v / rate['transformers fp32']:.2f}x", note))
        best = max((k for k in rate if k.startswith("picoVLM")), key=rate.get)
        results.update(memory_bandwidth_gb_s=bw / 1e9, bandwidth_limit_tokens_per_s=limits["fp32"],
                       **{f"bandwidth_limit_{k}_tokens_per_s": limits[k] for k in ("bf16", "int8", "int4")},
                       decode_tokens_per_s=rate["picoVLM fp32"], decode_transformers_tokens_per_s=rate["transformers fp32"],
                       **{f"decode_{k}_tokens_per_s": rate[f"picoVLM {k}"] for k in ("bf16", "int8", "int4")},
                       **{f"decode_{k}_speedup": rate[f"picoVLM {k}"] / rate["transformers fp32"] for k in variants},
                       decode_best_tokens_per_s=rate[best], decode_best_mode=best.removeprefix("picoVLM "))
        if args.vs_llama_cpp:
            results["llama_cpp_tokens_per_s"] = {k.split()[1]: v for k, v in rate.items() if k.startswith("llama.cpp")}
            results["decode_vs_llama_cpp"] = versus_llama
        for kind in compiled:  # vs transformers fp32 (on CUDA bf16 vs transformers bf16)
            if f"picoVLM {kind} --compile" in rate:
                ref_kind = "transformers bf16" if device.type == "cuda" else "transformers fp32"
                results[f"decode_{kind}_compiled_tokens_per_s"] = rate[f"picoVLM {kind} --compile"]
                results[f"decode_{kind}_compiled_speedup"] = rate[f"picoVLM {kind} --compile"] / rate[ref_kind]

        # prefill: logits of all 256 positions from both; bf16/int8/int4 only where bf16 matmuls are native
        runs = {"transformers fp32": lambda: timed(lambda: ref(prefill_ids), device),
                "picoVLM fp32": lambda: timed(lambda: ours(prefill_ids), device)}
        for k in ("bf16", "int8", "int4") if bf16_is_native(device) or args.smoke else ():
            runs[f"picoVLM {k}"] = lambda m=variants[k]: timed(lambda: m(prefill_ids), device)
        prefill = medians(alternate(runs, args.reps, device))
        for k, v in prefill.items():
            rows.append(("prefill 1x256 ms", k, f"{v * 1e3:.0f}", f"{prefill['transformers fp32'] / v:.2f}x", ""))
        results["prefill_speedup"] = prefill["transformers fp32"] / prefill["picoVLM fp32"]


# picoVLM's format -> llama.cpp's file type of about the same bytes per weight, and back (Q4_1's
# table is Q8_0 as in llama.cpp's own SmolLM2 Q4_1 file, like int4's int8 head)
LLAMA_CPP_TYPES = {"fp32": "F32", "bf16": "BF16", "int8": "Q8_0", "int4": "Q4_1"}
LLAMA_CPP_TYPES |= {v: k for k, v in LLAMA_CPP_TYPES.items()}


def llama_cpp_runs(lm, prompt, stack):
    """llama-cpp-python decoding `lm` from GGUF files that gguf_export writes in llama.cpp's types
    nearest picoVLM's formats -> {type: gen(n) -> n greedy token ids after prompt}. The models and
    files live until `stack` (a contextlib.ExitStack) closes."""
    from llama_cpp import Llama

    import gguf_export
    tokenizer = load_tokenizer(default_lm_path())  # SmolLM2's (random weights too: only ids are decoded)
    tmp = stack.enter_context(tempfile.TemporaryDirectory())
    runs = {}
    for kind in ("F32", "BF16", "Q8_0", "Q4_1"):
        path = os.path.join(tmp, f"lm-{kind}.gguf")
        gguf_export.write_text_gguf(lm.state_dict(), lm.cfg, tokenizer, path, kind.lower())
        llm = stack.enter_context(contextlib.closing(Llama(path, n_ctx=256, n_threads=torch.get_num_threads(),
                                                           verbose=False)))

        def gen(n, llm=llm):
            return [t for t, _ in zip(llm.generate(prompt, top_k=1, temp=0.0, reset=True), range(n))]
        runs[kind] = gen
    return runs


# ----------------------------------------------------------------------------- training step

def vlm_config(smoke, tokenizer, image_token_id):
    vision, lm = ("tiny", "tiny") if smoke else ("siglip-b16-224", "smollm2-135m")  # smoke or nanoVLM-222M
    return M.VLMConfig(vision=M.VISION_PRESETS[vision], lm=dataclasses.replace(M.LM_PRESETS[lm], lm_vocab=len(tokenizer)),
                       mp_pixel_shuffle=2, image_token_id=image_token_id)


def train_batch(cfg, rows, length, supervised, device, generator, images=1):
    """rows x length tokens, `images` images' tokens after the first, loss on the last `supervised`."""
    ids = torch.randint(0, 49152, (rows, length), generator=generator)
    ids[:, 1:1 + images * cfg.image_tokens] = cfg.image_token_id
    labels = torch.full_like(ids, -100)
    labels[:, -supervised:] = ids[:, -supervised:]
    s = cfg.vision.vit_image_size
    pixels = torch.randn(rows * images, 3, s, s, generator=generator)  # the images in reading order
    return ids.to(device), pixels.to(device), labels.to(device)


def train_flops(cfg, rows, length, supervised):
    """Forward + backward FLOPs: 6 x params x tokens for every matmul, plus attention
    (QK^T and AV: 12 x layers x width x tokens^2 per sequence, the PaLM/nanoGPT convention)."""
    v, lm = cfg.vision, cfg.lm
    n_vit = v.vit_depth * (4 * v.vit_width ** 2 + 2 * v.vit_width * v.vit_mlp_dim)
    n_lm = lm.lm_layers * (lm.lm_hidden * (lm.lm_heads + 2 * lm.lm_kv_heads) * lm.head_dim
                           + lm.lm_heads * lm.head_dim * lm.lm_hidden + 3 * lm.lm_hidden * lm.lm_intermediate)
    p = v.num_patches
    return rows * (6 * n_vit * p + 12 * v.vit_depth * v.vit_width * p ** 2
                   + 6 * v.vit_width * cfg.mp_pixel_shuffle ** 2 * lm.lm_hidden * cfg.image_tokens
                   + 6 * n_lm * length + 12 * lm.lm_layers * lm.lm_hidden * length ** 2
                   + 6 * lm.lm_hidden * lm.lm_vocab * supervised)


def vlm_setup(args):
    """The VLM config and processor: the nanoVLM-222M shape (tiny with --smoke) and SmolLM2's tokenizer."""
    tokenizer = load_tokenizer(args.tokenizer or default_lm_path())
    size = 32 if args.smoke else 224
    proc = M.Processor(tokenizer, size, (size // (8 if args.smoke else 16)) ** 2 // 4)
    return vlm_config(args.smoke, tokenizer, proc.image_token_id), proc


def bench_train(args, device, results, rows):
    from transformers import SmolVLMForConditionalGeneration
    cfg, proc = vlm_setup(args)
    torch.manual_seed(0)
    ours = M.VLM(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp, proc, format="smolvlm")
        ref = SmolVLMForConditionalGeneration.from_pretrained(tmp, dtype=torch.float32)
    ours, ref = ours.to(device).train(), ref.to(device).train()
    shape = (2, 32, 8) if args.smoke else (4, 128, 32)  # rows, tokens, supervised tokens
    ids, pixels, labels = train_batch(cfg, *shape, device, torch.Generator().manual_seed(0))

    def our_step(model, autocast=False):
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            loss = model(ids, pixels.to(next(model.parameters()).dtype), labels=labels)[1]
        loss.backward()
        return loss.item()

    def ref_step(autocast=False):
        ref.zero_grad(set_to_none=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            loss = ref(input_ids=ids, pixel_values=pixels[:, None], labels=labels).loss
        loss.backward()
        return loss.item()

    a, b = our_step(ours), ref_step()
    print(f"training loss (fp32): picoVLM {a:.6f}, transformers {b:.6f}")
    results["train_loss_diff"] = abs(a - b)
    runs = {"transformers fp32": lambda: timed(ref_step, device), "picoVLM fp32": lambda: timed(lambda: our_step(ours), device)}
    if bf16_is_native(device) or args.smoke:
        ours_bf16 = copy.deepcopy(ours).to(torch.bfloat16)
        runs |= {"transformers bf16 autocast": lambda: timed(lambda: ref_step(autocast=True), device),
                 "picoVLM bf16 autocast": lambda: timed(lambda: our_step(ours, autocast=True), device),
                 "picoVLM bf16 weights": lambda: timed(lambda: our_step(ours_bf16), device)}
        our_step(ours, autocast=True), our_step(ours_bf16)  # warm-ups, as the loss check was for fp32
        try:
            ref_step(autocast=True)
        except RuntimeError as e:  # seen: transformers 5.17's SmolVLM mixing dtypes under autocast
            print(f"transformers bf16 autocast step failed ({str(e).splitlines()[0]}): no bf16 ratio")
            del runs["transformers bf16 autocast"]
    else:
        print("bf16 training step skipped: this CPU has no native bf16 matmul (no AVX512-BF16/AMX)")
    t0 = time.perf_counter()
    train = medians(alternate(runs, args.reps, device, warmup=0))  # all warmed up already
    print(f"training: {args.reps} alternating runs ({time.perf_counter() - t0:.0f} s)")
    for k, v in train.items():
        base = train.get("transformers bf16 autocast" if "bf16" in k else "transformers fp32")
        rows.append((f"train step {shape[0]}x{shape[1]} s", k, f"{v:.3f}", f"{base / v:.2f}x" if base else "-", ""))
    results["train_fp32_speedup"] = train["transformers fp32"] / train["picoVLM fp32"]
    bf16 = "transformers bf16 autocast" in train
    results["train_bf16_speedup"] = train["transformers bf16 autocast"] / train["picoVLM bf16 autocast"] if bf16 else None
    results["train_bf16_weights_speedup"] = train["transformers bf16 autocast"] / train["picoVLM bf16 weights"] if bf16 else None


def bench_mfu(args, device, results, rows):
    """Our training step as train.py runs it on a GPU (fp32 weights, bf16 autocast, torch.compile),
    at a batch that fills the GPU."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else cli.peak_flops(device)  # train.py's MFU uses the same
    cfg, _ = vlm_setup(args)
    torch.manual_seed(0)
    model = torch.compile(M.VLM(cfg).to(device).train())
    rows_, length, supervised = args.train_batch, 512, 128
    ids, pixels, labels = train_batch(cfg, rows_, length, supervised, device, torch.Generator().manual_seed(1))

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, torch.bfloat16):
            loss = model(ids, pixels, labels=labels)[1]
        loss.backward()

    t0 = time.perf_counter()
    step()
    print(f"compiled training step: first call {time.perf_counter() - t0:.0f} s")
    seconds = statistics.median(alternate({"step": lambda: timed(step, device)}, args.reps, device, warmup=2)["step"])
    flops = train_flops(cfg, rows_, length, supervised) / seconds
    mfu = flops / peak if peak else None
    rows.append((f"train {rows_}x{length} compiled", "picoVLM bf16 autocast", f"{seconds:.3f}", f"{flops / 1e12:.1f} TFLOP/s",
                 f"MFU {mfu:.1%} of {peak / 1e12:.0f} TFLOP/s" if mfu else f"({name}: peak unknown, see --peak_tflops)"))
    results.update(train_mfu=mfu, train_tflops=flops / 1e12, gpu=name, train_samples_per_s=rows_ / seconds)


def bench_data(args, device, results, rows):
    """Data loading as one DataLoader worker does it (one process, one thread): photo-like 640x480
    JPEGs stored as bytes in a parquet file -> records -> decode, resize and tile -> tokens -> a
    collated batch (data.throughput). Shapes: the 222M's (224 px, one tile) and SmolVLM's
    processor (512 px tiles after the longest edge is resized to 2048: 13 tiles a photo). Workers
    one GPU needs at the 222M shape = its training samples/s (bench_mfu's step, one image a row,
    or --gpu_samples_per_s) / one worker's."""
    import data
    tokenizer = load_tokenizer(args.tokenizer or default_lm_path())
    gpu = results.get("train_samples_per_s") or args.gpu_samples_per_s
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what the DataLoader gives each worker
    try:
        with tempfile.TemporaryDirectory() as d:
            path = data.photo_parquet(os.path.join(d, "photos.parquet"), 16 if args.smoke else 64)
            for key, name, proc in (("222m", "222M: 224 px", M.Processor(tokenizer, 224, 49)),
                                    ("smolvlm_tiles", "SmolVLM: 512 px tiles", M.Processor(
                                        tokenizer, 512, 64, splitting=True, longest_edge=2048))):
                rate = statistics.median(data.throughput(proc, path, rounds=1 if args.smoke else 4)
                                         for _ in range(args.reps))
                results[f"data_{key}_samples_per_s"] = rate
                note = "13 tiles a photo" if key != "222m" else (
                    f"{gpu / rate:.1f} workers for the GPU's {gpu:.0f} samples/s" if gpu else "workers: see --device cuda")
                rows.append(("data samples/s a worker", name, f"{rate:.1f}", "-", note))
                if key == "222m" and gpu:
                    results["data_workers_per_gpu"] = gpu / rate
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- memory of a training step

# name: (ViT preset, pixel shuffle, LM preset, images a row, tokens a row, supervised tokens a row)
MEMORY_SHAPES = {"tiny": ("tiny", 2, "tiny", 1, 64, 16),
                 "smolvlm-256m": ("siglip2-b16-512", 4, "smollm2-135m", 1, 512, 128),
                 "smolvlm-500m": ("siglip2-b16-512", 4, "smollm2-360m", 1, 512, 128),
                 # SmolVLM-Instruct's shape with image splitting: 4 x 3 tiles + the whole image, 81 tokens each
                 "smolvlm-2.2b": ("siglip-so400m14-384", 3, "smollm2-1.7b", 13, 1280, 128)}
MEMORY_SETUPS = ["full", "frozen_vision", "lora", "lora_ckpt", "lora_ckpt_bf16", "lora_ckpt_int8"]


def int8_trains(device):
    """Whether inference.Int8Linear has a backward here (ATen's CPU int8 kernel has none)."""
    x = torch.randn(2, 16, device=device, requires_grad=True)
    try:
        Int8Linear(torch.nn.Linear(16, 8).to(device))(x).sum().backward()
        return True
    except RuntimeError:
        return False


def memory_step(spec):
    """One --memory configuration, in a process of its own: build the model, then time one training
    step and measure its peak memory -> {peak_gib, step_s, trainable_m}."""
    vit, shuffle, lm, images, length, supervised = MEMORY_SHAPES[spec["shape"]]
    device, setup = torch.device(spec["device"]), spec["setup"]
    cfg = M.VLMConfig(vision=M.VISION_PRESETS[vit], lm=dataclasses.replace(M.LM_PRESETS[lm], lm_vocab=49280),
                      mp_pixel_shuffle=shuffle, image_token_id=49190)  # SmolVLM's vocabulary and <image> id
    amp = torch.bfloat16 if bf16_is_native(device) else torch.float32
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16 if setup.endswith(("bf16", "int8")) else torch.float32)  # the frozen base
    with torch.device(device):
        vlm = M.VLM(cfg).train()
    torch.set_default_dtype(torch.float32)
    if setup == "frozen_vision":
        vlm.vision.requires_grad_(False)
    elif setup.startswith("lora"):  # the SmolVLM fine-tuning recipe: adapters on the LM, the connector trained
        vlm.add_lora(rank=8, alpha=16, targets=("lm",), trainable=("projector",))
        vlm.set_grad_checkpointing("ckpt" in setup)
        if setup.endswith("int8"):
            for _, m in M.lora_modules(vlm):
                m.base = Int8Linear(m.base)
    params = [p for p in vlm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    for p in params:  # a step of zero gradients: the moments exist from now on, as in any step after the first
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    ids, pixels, labels = train_batch(cfg, spec["batch"], length, supervised, device, torch.Generator().manual_seed(0),
                                      images)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:  # reset the process's RSS high-water mark: building the model must not count (Linux only)
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    t = time.perf_counter()
    with torch.autocast(device.type, amp, enabled=amp != torch.float32):
        loss = vlm(ids, pixels, labels=labels)[1]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync(device)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # kilobytes on Linux
    return {"peak_gib": peak / 2 ** 30, "step_s": time.perf_counter() - t, "loss": loss.item(),
            "trainable_m": sum(p.numel() for p in params) / 1e6}


def bench_memory(args, device, results, rows):
    shapes = (["tiny"] if args.smoke else ["smolvlm-256m"] if args.quick else
              ["smolvlm-256m", "smolvlm-500m"] + (["smolvlm-2.2b"] if device.type == "cuda" else []))
    amp = bf16_is_native(device)
    skipped = {"lora_ckpt_bf16": None if amp else "no native bf16 here",
               "lora_ckpt_int8": None if int8_trains(device) else "inference.Int8Linear has no backward here"}
    for setup, why in skipped.items():
        if why:
            print(f"{setup} skipped: {why}")
    setups = [s for s in MEMORY_SETUPS if not skipped.get(s)]
    print(f"memory: one training step, {'bf16 autocast' if amp else 'fp32'}, each setup in its own process")
    # glibc then hands each freed block of 64 KiB or more back at once, so that the RSS peak follows the
    # tensors (as max_memory_allocated does on CUDA), not the allocator's reuse of freed memory, which
    # moved repeated runs by 0.2 GiB (steps run slower that way)
    env = {"MALLOC_MMAP_THRESHOLD_": "65536", **os.environ} if device.type == "cpu" else None
    table, errors = {}, []
    for shape in shapes:
        for batch in (1,) if shape == "smolvlm-2.2b" else (4,) if args.smoke else (1, 4):
            for setup in setups:
                spec = json.dumps({"shape": shape, "batch": batch, "setup": setup, "device": str(device)})
                r = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory_child", spec,
                                    *(["--threads", str(args.threads)] if args.threads else [])],
                                   capture_output=True, text=True, env=env)
                if r.returncode:
                    errors.append(f"{shape} batch {batch} {setup}: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
                    print(errors[-1])
                    continue
                m = table[shape, batch, setup] = json.loads(r.stdout.strip().splitlines()[-1])
                full = table.get((shape, batch, "full"))
                rows.append((f"{shape} batch {batch}", setup, f"{m['peak_gib']:.2f}",
                             f"{m['peak_gib'] / full['peak_gib']:.0%}" if full else "-",
                             f"step {m['step_s']:.1f} s, {m['trainable_m']:.1f}M trained"))
                print(" ".join(rows[-1][:4]) + f" ({rows[-1][4]})", flush=True)
    main_shape = shapes[0]
    results["memory_dtype"] = "bf16 autocast" if amp else "fp32"
    results.update({f"peak_{s}_gib": table[main_shape, 4, s]["peak_gib"] if (main_shape, 4, s) in table else None
                    for s in MEMORY_SETUPS})
    if results["peak_full_gib"] and results["peak_lora_ckpt_gib"]:
        results["lora_ckpt_vs_full"] = results["peak_lora_ckpt_gib"] / results["peak_full_gib"]
    results["memory_gib"] = {f"{shape} batch {batch}": {s: round(m["peak_gib"], 3) for (sh, b, s), m in table.items()
                                                       if (sh, b) == (shape, batch)}
                             for shape, batch, _ in table}
    if errors:
        raise RuntimeError("; ".join(errors))


# ----------------------------------------------------------------------------- main

def print_table(rows, versus="vs transformers"):
    print(f"\n{'what':<26} {'who':<28} {'value':>10} {versus:>16}  note")
    for what, who, value, speedup, note in rows:
        print(f"{what:<26} {who:<28} {value:>10} {speedup:>16}  {note}")


def rounded(v):
    """Floats to 4 decimals, in nested dicts too (the JSON line)."""
    return round(v, 4) if isinstance(v, float) else {k: rounded(x) for k, x in v.items()} if isinstance(v, dict) else v


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench.py: error: --device cuda: CUDA is not available", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_step(json.loads(args.memory_child))))
        return 0
    print(f"device {device}{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads "
          f"({', '.join(f'{k} {os.environ[k]}' for k in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT') if k in os.environ)}), load average {os.getloadavg()[0]:.1f}"
          f"{', smoke shapes' if args.smoke else ', random weights' if args.random_weights else ''}")
    results, rows, failed = {"device": str(device)}, [], []
    t0 = time.perf_counter()
    if args.memory:
        sections = [bench_memory]
    elif args.data:  # the GPU's training step first: it says how many workers keep up with it
        sections = ([bench_mfu] if device.type == "cuda" else []) + [bench_data]
    else:
        sections = [bench_lm] + ([] if args.skip_train else [bench_train] + ([bench_mfu] if device.type == "cuda" else []))
    versus = "vs full" if args.memory else "vs transformers"
    for section in sections:
        done = len(rows)
        try:
            section(args, device, results, rows)
        except UserError as e:
            print(f"bench.py: error: {e}", file=sys.stderr)
            return 2
        except Exception:  # report it and go on: one broken section must not cost the other numbers
            traceback.print_exc()
            failed.append(section.__name__)
        print_table(rows[done:], versus)  # now: a run cut off later (a timeout) keeps what it measured
    if len(sections) > 1:
        print("\nall sections:")
        print_table(rows, versus)
    results.update(seconds=time.perf_counter() - t0, load_average=os.getloadavg()[0], failed=failed)
    print(json.dumps(rounded(results)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
