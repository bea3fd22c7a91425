"""What makes decoding fast, kept apart from what the model computes (model.py stays the
reference): weight-only int8 and int4 linears (through kernels.cpp on CPUs with AVX512-VNNI:
int4 always, int8 in a compiled step), a matrix-vector linear for compiled CPU decoding (bf16
weights through kernels.cpp), CPU memory layouts (transposed weights, huge pages), kernels.cpp's
attention, and the compiled prefill / decode step (static KV cache; the step compiled ahead of
time on CPUs, a CUDA graph on GPUs).
"""
import ctypes
import functools
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import KVCache, LanguageModel, LMAttention, decode_step, prefill_step

AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"  # ATen's and inductor's CPU kernels


@functools.cache
def cpu_kernels():
    """Whether kernels.cpp's ops (torch.ops.picovlm: the int4, int8 and bf16 products, the decode
    step's attention) are loaded: on CPUs with AVX512-VNNI, built by torch's C++ extension loader
    on first use (~40 s, then cached)."""
    try:
        with open("/proc/cpuinfo") as f:
            if "avx512_vnni" not in f.read():
                return False
        from torch.utils.cpp_extension import load
        path = load("picovlm_kernels", [os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels.cpp")],
                    extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], is_python_module=False)
        # its C functions visible to the decode steps AOTInductor compiles and loads (ExportedStep)
        ctypes.CDLL(path, mode=os.RTLD_GLOBAL | os.RTLD_NOLOAD)
    except (OSError, RuntimeError) as e:  # no /proc (not Linux), or no C++ compiler / ninja
        if not isinstance(e, FileNotFoundError):
            warnings.warn(f"kernels.cpp did not build (ATen's int4 kernel, inductor's bf16 and int8 loops, model.py's "
                          f"attention instead): {str(e).splitlines()[0]}")
        return False
    # the outputs' shapes, for torch.compile and torch.export
    for op in ("int4_matvec", "bf16_matvec", "int8_matvec"):
        torch.library.register_fake(f"picovlm::{op}", lambda x, weight, *_: x.new_empty(*x.shape[:-1], weight.shape[0]))
    torch.library.register_fake("picovlm::one_query_attention", lambda q, *_: torch.empty_like(q, memory_format=torch.contiguous_format))
    return True


class Int8Linear(nn.Module):
    """Weight-only int8 Linear for inference: int8 weights with one scale per output channel
    (absmax / 127); activations stay floating point. Decoding reads every weight once per token,
    so a quarter of fp32's bytes is up to 4x faster wherever memory bandwidth is the limit."""

    def __init__(self, linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(1).clamp(min=1e-12) / 127
        self.register_buffer("weight", torch.round(w / scale[:, None]).to(torch.int8).contiguous())
        self.register_buffer("scale", scale)
        self.scale_bf16 = scale.to(torch.bfloat16)
        self.bias = linear.bias
        self.own_kernel = w.shape[1] % 64 == 0 and cpu_kernels()  # kernels.cpp's product takes its weights

    def _apply(self, fn, recurse=True):
        # the CPU kernel's scales, converted once: torch.compile cannot lower the kernel on a copy
        # converted in the graph. Not a buffer, since model.to(torch.float32) must leave it bf16,
        # so it is redone here whenever the module moves (.to(device), .cuda(), .cpu())
        super()._apply(fn, recurse)
        self.scale_bf16 = self.scale.to(torch.bfloat16)
        return self

    def forward(self, x):
        if x.device.type == "cpu" and compiled_few_rows(x) and self.own_kernel:
            # kernels.cpp streamed SmolLM2's int8 weights 1.3x faster than the loop below
            y = torch.ops.picovlm.int8_matvec(x, self.weight, self.scale)
        elif x.device.type == "cpu" and AVX512 and compiled_few_rows(x):
            # MatvecLinear's loop converts 16 int8 at a time in registers: it ran ATen's kernel's 151
            # SmolLM2 products 2.5x faster on AVX512 (8 lanes on AVX2: 2x slower)
            y = (matvec(x, self.weight) * self.scale).to(x.dtype)
        elif x.device.type == "cpu" and self.weight.shape[1] % 8 == 0 and not x.requires_grad:  # other K crash the kernel; it has no backward
            # ATen's CPU kernel converts int8 in registers and never writes a float copy of the
            # weight. Its fast path takes bf16 activations (fp32 ones ran many times slower: docs/experiments.md).
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).to(torch.bfloat16),
                                                   self.weight, self.scale_bf16).view(*x.shape[:-1], -1).to(x.dtype)
        else:  # a float copy of the weight per call (right, but slower than bf16 weights unless
            # torch.compile fuses the cast into the matmul)
            y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class Int4Linear(nn.Module):
    """Weight-only int4 Linear for inference, in llama.cpp's Q4_1 scheme: each group of 32
    inputs of an output row has a scale d and an offset m, w = d*q + m with q in 0..15 (rounded to
    nearest). On CPUs with AVX512-VNNI, kernels.cpp multiplies the nibbles as integers with the
    activations as integers too, two int8 numbers each per group (llama.cpp's Q4_1 x Q8_1 keeps
    one; fp16 d and m as Q4_1 keeps them). Elsewhere ATen's kernels read the packed nibbles and
    convert them in registers; they take bf16 activations (fp32 ones run ~20x slower on CPU:
    docs/experiments.md). Either way an eighth of fp32's bytes. The packed layout is the device's
    own (ATen's CPU one even depends on the instruction set), so quantize a model on the device it
    will run on; moving it is an error."""

    def __init__(self, linear, group_size=32):
        super().__init__()
        w = linear.weight.detach().float()
        N, K = w.shape
        g = w.view(N, K // group_size, group_size)
        low, high = g.amin(-1), g.amax(-1)
        scale = ((high - low) / 15).clamp(min=1e-12)
        q = ((g - low[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32)
        self.group_size, self.bias = group_size, linear.bias
        self.own_kernel = not w.is_cuda and group_size == 32 and K % 64 == 0 and cpu_kernels()
        if self.own_kernel:  # byte j of a group holds its inputs j (low nibble) and j + 16 (high)
            self.register_buffer("weight", (q[..., :16] | q[..., 16:] << 4).to(torch.uint8).view(N, K // 2))
            self.register_buffer("scale", scale.half())
            self.register_buffer("offset", low.half())
            return
        q = q.view(N, K)
        if w.is_cuda:  # two nibbles a byte, then the tensor-core tiles of the CUDA kernel
            tiles = next(t for t in (8, 4, 2) if K % (16 * t) == 0)
            packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), tiles)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        self.register_buffer("weight", packed)
        # ATen computes (q - 8) * scale + zero, so zero = m + 8d: [K / group, N, 2] in bf16
        self.register_buffer("scales_and_zeros", torch.stack([scale, low + 8 * scale], -1)
                             .transpose(0, 1).contiguous().to(torch.bfloat16))

    def _apply(self, fn, recurse=True):
        device = self.weight.device
        super()._apply(fn, recurse)
        if self.weight.device != device:
            raise RuntimeError(f"Int4Linear: packed for {device}: quantize on the device the model runs on")
        # model.float() must leave the kernels' scales as they are
        if self.own_kernel:
            self.scale, self.offset = self.scale.half(), self.offset.half()
        else:
            self.scales_and_zeros = self.scales_and_zeros.to(torch.bfloat16)
        return self

    def forward(self, x):
        if self.own_kernel:
            y = torch.ops.picovlm.int4_matvec(x, self.weight, self.scale, self.offset)
        else:
            mm = torch.ops.aten._weight_int4pack_mm if x.is_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
            y = mm(x.reshape(-1, x.shape[-1]).to(torch.bfloat16), self.weight, self.group_size, self.scales_and_zeros)
            y = y.view(*x.shape[:-1], -1).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def int4_fits(linear, group_size=32):
    """Whether ATen's int4 kernels take this layer: whole groups of inputs, and whole blocks of
    outputs (16 on CPU, 8 on CUDA)."""
    N, K = linear.weight.shape
    return K % group_size == 0 and N % (8 if linear.weight.is_cuda else 16) == 0


def swap_linears(module, make):
    """Replace every nn.Linear inside `module` by make(linear), in place."""
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, make(child))
        else:
            swap_linears(child, make)
    return module


def quantize_int8(module):
    """Every nn.Linear inside `module` becomes an Int8Linear (a tied LM head gets its own int8
    copy; the embedding table it shares stays float: it is only gathered, one row a token)."""
    return swap_linears(module, Int8Linear)


def quantize_int4(module, group_size=32):
    """Every nn.Linear inside `module` whose inputs split into whole groups becomes an Int4Linear
    (others stay as they are), but a language model's head becomes an Int8Linear: in 4 bits it
    moved SmolLM2-135M's logits 3.5x more and changed most greedy answers (docs/experiments.md),
    and llama.cpp's Q4 files keep it at 8 bits too. The embedding table stays float."""
    for lm in [m for m in module.modules() if isinstance(m, LanguageModel)]:
        lm.lm_head = Int8Linear(lm.lm_head)
    return swap_linears(module, lambda lin: Int4Linear(lin, group_size) if int4_fits(lin, group_size) else lin)


def compiled_few_rows(x):
    """Under torch.compile with up to 4 input rows: where matvec's loop beats a matmul (MatvecLinear)."""
    return torch.compiler.is_compiling() and x.shape[:-1].numel() <= 4


def matvec(x, weight):
    """x @ weight.T in fp32 as a broadcast product summed over the inputs, which inductor compiles
    into one loop that streams the weight and converts it in registers."""
    return (x.unsqueeze(-2).float() * weight.float()).sum(-1)


class MatvecLinear(nn.Module):
    """nn.Linear for compiled decoding on CPU. A few input rows (a decode step of up to 4
    sequences) are multiplied as a broadcast product summed over the inputs, which inductor
    compiles into one loop that streams the weight and converts it to fp32 in registers: for one
    row about 2x the bandwidth of oneDNN's matrix-vector product on AVX2 CPUs (docs/experiments.md); the
    loop reads the weight once per row, so beyond ~4 rows the matmul wins. weight_dtype=
    torch.bfloat16 stores the weight in bf16, half the bytes, while the arithmetic stays fp32:
    CPUs without native bf16 would emulate bf16 matmuls slowly; where kernels.cpp is built its
    product takes bf16 weights instead of inductor's loop. More rows (a prefill, a large batch),
    and eager mode, where the product would be materialised, go through F.linear."""

    def __init__(self, linear, weight_dtype=None):
        super().__init__()
        w = linear.weight
        # a tied LM head gets its own bf16 copy; the embedding table stays as it is
        self.weight = w if weight_dtype in (None, w.dtype) else nn.Parameter(w.detach().to(weight_dtype), False)
        self.bias = linear.bias
        # kernels.cpp streamed SmolLM2's bf16 weights 1.3x faster than inductor's loop (docs/experiments.md)
        self.own_kernel = self.weight.dtype == torch.bfloat16 and self.weight.shape[1] % 32 == 0 and cpu_kernels()

    def forward(self, x):
        if compiled_few_rows(x) and self.own_kernel:
            y = torch.ops.picovlm.bf16_matvec(x, self.weight)
        elif compiled_few_rows(x):
            y = matvec(x, self.weight).to(x.dtype)
        else:
            y = F.linear(x, self.weight.to(x.dtype))
        return y if self.bias is None else y + self.bias


def matvec_linears(module, weight_dtype=None):
    """Every nn.Linear inside `module` becomes a MatvecLinear (after any .to(dtype), which would
    convert bf16 weights back)."""
    return swap_linears(module, lambda linear: MatvecLinear(linear, weight_dtype))


def compile_generation(device):
    """(prefill, step) for generate(prefill=, step=). The decode step is compiled for static shapes
    (same batch and cache_len each call): on CUDA captured as a CUDA graph ("reduce-overhead"), a
    batch-1 token is then one graph launch instead of ~1000 kernel launches; on a CPU compiled ahead
    of time (ExportedStep). The prefill is compiled apart with dynamic shapes, since prompt lengths vary."""
    prefill = torch.compile(prefill_step, dynamic=True)
    if device.type == "cpu":
        return prefill, ExportedStep()
    # mode="reduce-overhead" is triton.cudagraphs; the size asserts are ~430 Python checks a token
    # of what TorchDynamo's guards already checked
    options = {"size_asserts": False, "triton.cudagraphs": True}
    return prefill, torch.compile(decode_step, fullgraph=True, dynamic=False, options=options)


class StepModule(nn.Module):
    """decode_step as a module, the form torch.export takes."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, token, attention_mask, position, slot):
        return decode_step(self.lm, token, attention_mask, position, slot)


class ExportedStep:
    """decode_step for CPUs compiled ahead of time: torch.export, then AOTInductor, which calls
    inductor's kernels (the same as torch.compile's) from generated C++. TorchDynamo's guards and
    the Python between the kernels are gone: they were ~3 of the 13 ms of a SmolLM2-135M int8 token
    on 2 cores, and this step decodes int8 1.3x faster (docs/experiments.md). Built on the first call for
    each model and input shapes (batch, cache length), which takes about a minute. The compiled
    step reads the model's own weights and KV cache where they are (user-managed constants,
    nothing copied) and is pointed at the new cache when generate() has made one."""

    def __init__(self):
        self.built = {}  # (model, shapes) -> (runner, the tensors it reads by name)

    def __call__(self, lm, token, attention_mask, position, slot):
        key = (lm, tuple(token.shape), tuple(attention_mask.shape))
        if key not in self.built:
            self.built[key] = self.build(lm, token, attention_mask, position, slot)
        runner, tensors = self.built[key]
        if lm.blocks[0].attn.cache.k is not tensors["lm.blocks.0.attn.cache.k"]:  # setup_cache made new caches
            caches = {f"lm.blocks.{i}.attn.cache.{n}": getattr(b.attn.cache, n)
                      for i, b in enumerate(lm.blocks) for n in "kv"}
            runner.load_constants(caches, check_full_update=False, user_managed=True)
            tensors.update(caches)  # kept alive while the runner points at them
        return runner(token, attention_mask, position, slot)

    @staticmethod
    def build(lm, *args):
        module = StepModule(lm)
        options = {"size_asserts": False, "aot_inductor.package_constants_in_so": False}
        if cpu_kernels():  # kernels.cpp's ops called as C functions (aoti_torch_cpu_<op>), not through the dispatcher
            ops = [torch.ops.picovlm.int4_matvec, torch.ops.picovlm.bf16_matvec, torch.ops.picovlm.int8_matvec,
                   torch.ops.picovlm.one_query_attention]
            options["aot_inductor.custom_ops_to_c_shims"] = {op.default: [
                f"AOTITorchError aoti_torch_cpu_{op.__name__}("
                + "".join(f"AtenTensorHandle {a.name}, " for a in op.default._schema.arguments) + "AtenTensorHandle* ret)"]
                for op in ops}
        with warnings.catch_warnings():  # torch's own use of a deprecated pytree class
            warnings.simplefilter("ignore", FutureWarning)
            # non-strict: a strict export resets TorchDynamo, dropping the compiled prefill (which the
            # next caption then compiled again, ~20 s on 2 cores)
            program = torch.export.export(module, args, strict=False)
            path = torch._inductor.aoti_compile_and_package(program, inductor_configs=options)
        runner = torch._inductor.aoti_load_package(path)
        tensors = dict(module.named_parameters(remove_duplicate=False)) | dict(module.named_buffers())
        tensors |= program.constants
        # the one kind of constant inductor adds: its int4 lowering's group size, one per product
        groups = {m.group_size for m in lm.modules() if isinstance(m, Int4Linear)}
        names = runner.get_constant_fqns()
        missing = [name for name in names if name not in tensors]
        if missing and len(groups) != 1:
            raise RuntimeError(f"ExportedStep: no tensor for the compiled step's constants {missing[:3]}")
        tensors = {name: tensors[name] if name in tensors else torch.tensor(next(iter(groups))) for name in names}
        runner.load_constants(tensors, check_full_update=True, user_managed=True)
        return runner, tensors


def kernel_attention(module):
    """The attention of a compiled CPU decode step, in every LMAttention inside `module`, through
    kernels.cpp where it is built: one call a layer over the tokens so far, instead of two small
    matrix products over the whole cache (docs/experiments.md)."""
    if cpu_kernels():
        for m in module.modules():
            if isinstance(m, LMAttention):
                m.one_query = torch.ops.picovlm.one_query_attention
    return module


def huge_pages(module):
    """Copy the module's parameters and buffers (not KV caches) into one block of memory that Linux
    backs with 2 MiB pages (transparent huge pages). Decoding streams every weight once a token;
    with 4 KiB pages the TLB misses cost ~20% of the bandwidth on CPUs (docs/experiments.md). The
    tensors keep their identity (`.data` is replaced), so call it before a step is compiled, which
    reads the tensors where they are. Elsewhere (no madvise) the module is left as it is."""
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return module
    tensors = {id(t): t for m in module.modules() if not isinstance(m, KVCache)
               for t in [*m._parameters.values(), *m._buffers.values()] if t is not None and t.device.type == "cpu"}
    places, total = [], 0  # (tensor, byte offset, bytes its strides reach), 64-byte aligned
    for t in tensors.values():
        nbytes = (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))) * t.element_size() if t.numel() else 0
        places.append((t, total, nbytes))
        total += -(-nbytes // 64) * 64
    page = 1 << 21
    size = -(-total // page) * page
    block = torch.empty(size + page, dtype=torch.uint8)
    start = -block.data_ptr() % page
    # before the first write, so the kernel faults the block in as huge pages
    madvise(ctypes.c_void_p(block.data_ptr() + start), ctypes.c_size_t(size), 14)  # MADV_HUGEPAGE
    for t, offset, nbytes in places:
        t.data = block[start + offset:start + offset + nbytes].view(t.dtype).as_strided(t.shape, t.stride()).copy_(t)
    return module


def decode_layout(module):
    """Store each fp32 nn.Linear weight transposed in memory (same values and shape, strides
    (1, out)), for batch-1 decoding on CPU: MKL's matrix-vector product streams an [in, out]
    matrix faster than an [out, in] one (docs/experiments.md). bf16 is left alone:
    its kernel ran much slower that way. Already transposed weights (a tied head) are skipped."""
    for m in module.modules():
        if isinstance(m, nn.Linear) and m.weight.dtype == torch.float32 and m.weight.is_contiguous():
            m.weight.data = m.weight.data.t().contiguous().t()
    return module
