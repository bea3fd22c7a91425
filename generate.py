"""Caption images (or answer a question about them) with a picoVLM, SmolVLM or Idefics3 checkpoint.

  python generate.py --image cat.jpg                          # streams the answer
  python generate.py --image a.png --image b.png --greedy     # one batch, each answer after its file name
  python generate.py --image photos/ --output results.jsonl   # a directory or a glob: batches, progress bar

Bad input (a missing or corrupt image, a prompt longer than the context, a directory that is not
a checkpoint) is one line on stderr and exit status 2. In a batch the bad images are reported and
skipped, the others still captioned (exit status 2 all the same). --output gets each image's line
as soon as it is answered, so a run stopped by Ctrl-C (exit status 130) leaves whole lines.
"""
import glob
import json
import os
import resource
import sys
import time

import cli

cli.openmp_wait(decoding=True)
import torch  # noqa: E402

import checkpoint  # noqa: E402
import model as M  # noqa: E402
from checkpoint import UserError  # noqa: E402
from inference import (compile_generation, decode_layout, huge_pages, kernel_attention, matvec_linears,  # noqa: E402
                       quantize_int4, quantize_int8)


def parse_args(argv=None):
    p = cli.ArgumentParser(prog="generate.py", description=__doc__)
    p.add_argument("--image", action="append", required=True, metavar="PATH",
                   help="an image file, a directory or a glob; repeat for several")
    p.add_argument("--prompt", default="Describe the image.")
    p.add_argument("--model", default="out", help="picoVLM dir (train.py's out/), SmolVLM/Idefics3 dir or hub id")
    p.add_argument("--adapter", metavar="DIR", help="LoRA adapter merged into --model first: train.py's out/adapter "
                                                    "(with --model out/base), or PEFT's for --model's SmolVLM twin")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="always the most likely token (= --temperature 0)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--num_samples", type=int, default=1, help="answers per image")
    p.add_argument("--batch_size", type=int, default=8, help="images per batch")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", choices=["auto", *cli.DTYPES],
                   help="auto: bf16 on GPUs that support it, on CPUs where it is faster, else fp32 (on CPU with "
                        "--compile only the LM's weights take it: the arithmetic stays fp32)")
    p.add_argument("--weights", choices=["fp32", "bf16", "int8", "int4"], default=None,
                   help="the language model's weights (default: --dtype): int8 one scale per output channel, int4 "
                        "groups of 32 as llama.cpp's Q4_1 with the head in int8 (on CPUs with AVX512-VNNI its "
                        "product is kernels.cpp, built on first use: ~40 s); activations stay --dtype")
    p.add_argument("--int8", action="store_true", help="= --weights int8")
    p.add_argument("--compile", action="store_true", help="compile the decode step (ahead of time on CPU, CUDA graphs "
                                                          "on GPU) and the prefill; the first batch pays for it (minutes)")
    p.add_argument("--no_stream", action="store_true", help="print a single answer when done, not token by token")
    p.add_argument("--output", metavar="FILE", help="also write one JSON line per image")
    p.add_argument("--verbose", action="store_true", help="last line: prefill time, decode tokens/s, peak memory")
    args = p.parse_args(argv)
    for flag, ok in (("max_new_tokens", args.max_new_tokens >= 1), ("num_samples", args.num_samples >= 1),
                     ("batch_size", args.batch_size >= 1), ("temperature", args.temperature >= 0),
                     ("top_k", args.top_k is None or args.top_k >= 1),
                     ("top_p", args.top_p is None or 0 < args.top_p <= 1)):
        if not ok:
            p.error(f"--{flag} {getattr(args, flag)} is out of range")
    if args.greedy:
        args.temperature = 0.0
    if args.int8:
        if args.weights not in (None, "int8"):
            p.error(f"--int8 and --weights {args.weights} contradict each other")
        args.weights = "int8"
    return args


def expand_images(specs):
    """--image values -> (paths, many): a directory gives its image files, a glob its matches.
    many: the user asked for a folder's worth, so show a progress bar."""
    from PIL import Image
    extensions = set(Image.registered_extensions())
    paths, many = [], False
    for spec in specs:
        if os.path.isdir(spec):
            found = sorted(os.path.join(spec, f) for f in os.listdir(spec) if os.path.splitext(f)[1].lower() in extensions)
        elif glob.has_magic(spec) and not os.path.exists(spec):
            found = sorted(f for f in glob.glob(spec) if os.path.isfile(f))
        else:
            paths.append(spec)  # a missing file is reported (and skipped) when it is loaded
            continue
        if not found:
            raise UserError(f"{spec}: no images found")
        paths += found
        many = True
    return paths, many


def load_model(args, device, dtype):
    try:
        vlm, proc = M.VLM.from_pretrained(args.model), M.Processor.from_pretrained(args.model)
        proc.check_model(vlm.cfg)
    except (OSError, ValueError, KeyError, TypeError) as e:  # UserError is a ValueError
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(msg if msg.startswith(args.model) else f"{args.model}: cannot load ({msg})") from None
    if args.adapter:  # folded into the weights: decoding costs nothing extra
        vlm.load_lora(args.adapter).merge_lora()
    vlm = vlm.to(device)
    if args.weights in ("int8", "int4"):  # from the fp32 weights, before any cast; int4 is packed for this device
        (quantize_int8 if args.weights == "int8" else quantize_int4)(vlm.lm)
    matvec = device.type == "cpu" and args.compile  # see MatvecLinear: dtype is then the LM weights' format only
    vlm = vlm.to(dtype=None if matvec else dtype).eval()
    lm_dtype = getattr(torch, cli.DTYPES[args.weights]) if args.weights in ("fp32", "bf16") else dtype
    if matvec:
        matvec_linears(vlm.lm, lm_dtype)
    else:
        vlm.lm.to(lm_dtype)
        if device.type == "cpu":
            decode_layout(vlm.lm)  # fp32 matrix-vector products stream faster transposed
    if device.type == "cpu":  # last: the weights stay where huge_pages puts them
        huge_pages(kernel_attention(vlm) if args.compile else vlm)
    return vlm, proc


def unfinished_training(model_dir):
    """A warning line if model_dir holds a train.py run that stopped before its VLM stage ended
    (Ctrl-C, SIGTERM, a crash): such weights answer badly, and `--resume` would finish them. Else None."""
    try:
        meta, _ = checkpoint.read_state(model_dir, tensors=False) or (None, None)
        if meta is None:  # no state: not a train.py run, or (with a log) one killed before its first checkpoint
            if not os.path.exists(os.path.join(model_dir, "log.jsonl")):
                return None
            return (f"warning: {model_dir} is from a training run that stopped before its first checkpoint; "
                    "its answers may be poor")
        stage, step, total = meta["state"]["stage"], meta["state"]["step"], meta["config"]["max_steps"]
    except (UserError, KeyError, TypeError):  # an unreadable training state: nothing to go by
        return None
    if stage in ("vlm", "done") and step >= total:
        return None
    where = "before its VLM stage" if stage == "pretrain" else f"at VLM step {step} of {total}"
    return (f"warning: {model_dir} is from a training run that stopped {where}; its answers may be poor "
            f"(finish it: python train.py --out_dir {model_dir} --resume)")


def load_images(proc, paths, report):
    """-> (good paths, RGB images at the processor's first size); each bad image is reported (one
    line) and skipped."""
    from PIL import Image
    good, images = [], []
    for path in paths:
        try:
            images.append(proc.load_image(path))
            good.append(path)
        except (UserError, ValueError, Image.DecompressionBombError) as e:  # ValueError: a mode PIL cannot convert
            report(path, str(e) if isinstance(e, UserError) else f"{path}: unusable image ({e})")
    return good, images


class JsonLines:
    """--output: one JSON line per image, each written through at once (the file has no buffer), so
    that an interrupted run leaves whole lines and a full disk fails at the line that did not fit."""

    def __init__(self, path):
        self.path = path
        try:
            self.file = open(path, "wb", buffering=0)
        except OSError as e:
            raise UserError(f"--output {path}: cannot write ({e.strerror})") from None

    def write(self, record):
        line = (json.dumps(record) + "\n").encode()
        try:
            while line:  # an unbuffered write may take only part of it
                line = line[self.file.write(line):]
        except OSError as e:
            raise UserError(f"--output {self.path}: cannot write ({e.strerror})") from None

    def close(self):
        self.file.close()


class Streamer:
    """Prints one sequence as its tokens arrive. The whole text is re-decoded each time, since a
    character can span several tokens and a token's leading space depends on the one before."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], 0

    def __call__(self, token):
        self.ids.append(int(token[0]))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        if not text.endswith("\ufffd"):  # else half a UTF-8 character: wait for the rest
            print(text[self.shown:], end="", flush=True)
            self.shown = len(text)


class Clock:
    """on_token hook that times the tokens: prefill = until the first one, then the decode rate."""

    def __init__(self, device, rows, then=None):
        self.device, self.rows, self.then = device, rows, then
        self.start, self.first, self.last, self.tokens = time.perf_counter(), None, None, 0

    def __call__(self, token):
        if self.then:
            self.then(token)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.last, self.tokens = time.perf_counter(), self.tokens + 1
        self.first = self.first or self.last

    def report(self, dtype):
        rate = (self.tokens - 1) / (self.last - self.first) if self.tokens > 1 else float("nan")
        if self.device.type == "cuda":
            memory = f"{torch.cuda.max_memory_allocated(self.device) / 2**30:.2f} GiB on the GPU"
        else:
            memory = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"  # ru_maxrss: KiB
        return (f"[{self.device.type} {dtype}, last batch of {self.rows}] prefill {(self.first - self.start) * 1e3:.0f} ms, "
                f"decode {rate:.1f} tokens/s per sequence, peak memory {memory}")


def answer(vlm, proc, text, images, args, *, name, generator, fns, clock, compile_now):
    """One batch, the same prompt for every image -> the answers in order. name: the batch's first
    file (for errors); fns: compiled (prefill, step) or Nones; clock: the on_token hook."""
    device, dtype, tok = vlm.lm.tok_embed.weight.device, vlm.lm.tok_embed.weight.dtype, proc.tokenizer
    enc = proc([text] * len(images), [[image] for image in images])
    length, context = int(enc["attention_mask"].sum(1).max()), vlm.cfg.lm.lm_max_positions
    if length + args.max_new_tokens > context:  # split (tiled) images can make long prompts
        raise UserError(f"{name}: a prompt of {length} tokens + --max_new_tokens "
                                f"{args.max_new_tokens} exceeds the model's context of {context}")
    inputs = (enc["input_ids"].to(device), enc["pixel_values"].to(device, dtype), enc["attention_mask"].to(device))
    options = dict(generator=generator, prefill=fns[0], step=fns[1], top_k=args.top_k, top_p=args.top_p,
                   eos_token_id=proc.stop_ids,  # SmolVLM ends its turns with <end_of_utterance>
                   # one cache size for all batches: allocated once, and static shapes when compiled
                   cache_len=min(context, -(-(length + args.max_new_tokens) // 256) * 256))
    if compile_now:  # compile now, not in the middle of the first answer; greedy keeps the seed's draws
        start = time.perf_counter()
        print("--compile: compiling the prefill and the decode step (minutes, once) ...", file=sys.stderr, flush=True)
        vlm.generate(*inputs, max_new_tokens=2, temperature=0.0, **options)
        print(f"--compile: compiled in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    clock.start = time.perf_counter()
    new = vlm.generate(*inputs, max_new_tokens=args.max_new_tokens, temperature=args.temperature, on_token=clock, **options)
    return [a.strip() for a in tok.batch_decode(new, skip_special_tokens=True)]


def run(args):
    device = cli.pick_device(args.device)
    dtype = cli.pick_dtype(args.dtype, device)
    paths, many = expand_images(args.image)
    vlm, proc = load_model(args, device, dtype)
    if os.path.isdir(args.model) and (warning := unfinished_training(args.model)):
        print(warning, file=sys.stderr)
    tok, n, context = proc.tokenizer, args.num_samples, vlm.cfg.lm.lm_max_positions
    try:
        text = proc.chat_prompt(args.prompt, 1)
    except UserError as e:  # image tokens, or bytes that were not UTF-8
        raise UserError(f"--prompt: {e}") from None
    if len(tok.encode(text, add_special_tokens=False)) + proc.tokens_per_image + args.max_new_tokens > context:
        raise UserError(f"--prompt is too long: with an image and --max_new_tokens {args.max_new_tokens} "
                                f"it exceeds the model's context of {context} tokens")
    torch.manual_seed(args.seed)
    generator = torch.Generator(device).manual_seed(args.seed)
    fns = compile_generation(device) if args.compile else (None, None)
    stream = len(paths) == 1 and n == 1 and not many and not args.no_stream
    from tqdm import tqdm
    output = JsonLines(args.output) if args.output else None
    failed = []

    def report(path, message):
        failed.append(path)
        print(message, file=sys.stderr)
        if output:
            output.write({"image": path, "error": message})

    clock = None
    # a progress bar for a folder's worth; `with` closes it before an interruption is reported
    with tqdm(total=len(paths), unit="image", file=sys.stderr, disable=not many) as bar:
        for start in range(0, len(paths), args.batch_size):
            batch, images = load_images(proc, paths[start:start + args.batch_size], report)
            if batch:
                compile_now = args.compile and clock is None
                clock = Clock(device, len(batch) * n, Streamer(tok) if stream else None)
                answers = answer(vlm, proc, text, [image for image in images for _ in range(n)], args, name=batch[0],
                                 generator=generator, fns=fns, clock=clock, compile_now=compile_now)
                for i, path in enumerate(batch):
                    mine = answers[i * n:(i + 1) * n]
                    if stream:
                        print()
                    else:
                        tqdm.write("\n".join(f"{path}{f' #{k + 1}' if n > 1 else ''}: {a}" for k, a in enumerate(mine)))
                    if output:
                        output.write({"image": path, "answer": mine[0] if n == 1 else mine})
            bar.update(len(paths[start:start + args.batch_size]))
    if output:
        output.close()
    if args.verbose and clock:
        print(clock.report(str(dtype)[6:] + (f", {args.weights} weights" if args.weights else "")))
    return 2 if failed else 0


def main(argv=None):
    args = parse_args(argv)
    return cli.main(lambda: run(args), "generate.py")


if __name__ == "__main__":
    sys.exit(main())
