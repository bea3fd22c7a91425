"""What every script shares: one flag style, one-line errors, device and precision, GPU peaks.

Flags are spelled with underscores (`--max_steps`), as transformers' HfArgumentParser and nanoGPT
spell them, since train.py's flags are its config fields; the hyphen spelling (`--max-steps`) is
accepted too. Prefixes of flags are not (`--max_step` is an error, not a guess).
"""
import argparse
import os
import sys
import time

from checkpoint import UserError


class ArgumentParser(argparse.ArgumentParser):
    def __init__(self, **kw):
        kw.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(allow_abbrev=False, **kw)

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        end = args.index("--") if "--" in args else len(args)
        return super().parse_known_args([underscored(a) for a in args[:end]] + args[end:], namespace)

    def error(self, message):  # argparse would print the whole usage: we promise one line
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def underscored(arg):
    """--max-new-tokens=5 -> --max_new_tokens=5 (values and single-dash arguments untouched)."""
    if not arg.startswith("--"):
        return arg
    name, eq, value = arg.partition("=")
    return "--" + name[2:].replace("-", "_") + eq + value


def parse_bool(text):
    values = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}
    if text.lower() not in values:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return values[text.lower()]


def main(run, prog):
    """Run a script's body: a UserError or an OSError is one `error:` line and exit status 2,
    Ctrl-C exit 130."""
    try:
        return run()
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk, a path that is a file, no permission: the environment, said in one line
        print(f"error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 2


# ----------------------------------------------------------------------------- device and precision

def pick_device(name="auto", local_rank=0):
    """auto: cuda > mps > cpu; cuda means this process's GPU (LOCAL_RANK under torchrun)."""
    import torch
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device (auto, cpu, cuda, cuda:N, mps)") from None
    if (device.type == "cuda" and not torch.cuda.is_available()) or (
            device.type == "mps" and not torch.backends.mps.is_available()):
        raise UserError(f"--device {name}: not available on this machine")
    return torch.device("cuda", local_rank) if device.type == "cuda" and device.index is None else device


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def pick_dtype(name, device):
    """auto: bf16 on GPUs that have it (else fp16); on a CPU bf16 only where it is faster than
    fp32 (AVX512-BF16/AMX), fp32 elsewhere."""
    import torch
    if name != "auto":
        return getattr(torch, DTYPES[name])
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_bf16_is_faster() else torch.float32


def cpu_bf16_is_faster():
    """CPUs without bf16 instructions (AVX2 only) run bf16 matmuls ~10x slower than fp32, ones with
    AVX512-BF16 or AMX faster: time one of each and pick."""
    import torch
    a, b = torch.randn(256, 512), torch.randn(512, 512)

    def timed(x, y):
        x @ y
        t = time.perf_counter()
        for _ in range(3):
            x @ y
        return time.perf_counter() - t
    return timed(a.bfloat16(), b.bfloat16()) < timed(a, b)


# dense bf16 peak FLOP/s by GPU name; the first name found in torch.cuda.get_device_name() wins,
# so longer names come before their prefixes ("H100 PCIe" before "H100", "A100" before "A10")
PEAK_BF16_FLOPS = [("H100 PCIe", 756e12), ("GH200", 989e12), ("H100", 989e12), ("H200", 989e12), ("B200", 2250e12),
                   ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12), ("4090", 165e12)]


def peak_flops(device):
    """bf16 peak of a CUDA device (for MFU; train.py's log and bench.py alike), or None when unknown."""
    import torch
    return gpu_peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def gpu_peak_flops(name):
    return next((v for k, v in PEAK_BF16_FLOPS if k in name), None)


def openmp_wait(decoding=False):
    """How idle OpenMP threads wait (unless the user set OMP_WAIT_POLICY or GOMP_SPINCOUNT); must run
    before torch loads. Threads that busy-wait for work steal the CPU from data workers and anything
    else on a small shared machine (docs/experiments.md: 3-60x slower steps), so they sleep at once;
    when decoding they first spin 10000 rounds (~0.2 ms): a decode step's ~100 parallel regions a
    token ran 2.6x slower when each woke sleeping threads."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ.update({"GOMP_SPINCOUNT": "10000"} if decoding else {"OMP_WAIT_POLICY": "PASSIVE"})
