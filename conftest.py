"""Shared test fixtures: the offline SmolLM2-135M-Instruct (GGUF) and its tokenizer, transformers'
reference model, a tiny synthetic dataset and tiny random VLMs. CPU only, no network."""
import dataclasses
import os
import sys

import pytest
import torch
from PIL import Image

import checkpoint
import model as M

HERE = os.path.dirname(os.path.abspath(__file__))
# On a busy 2-core machine OpenMP threads that spin-wait for each other make tiny models much
# slower; waiting passively costs little when the machine is idle. For the scripts run as subprocesses.
ENV = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def script(name, *args, timeout=300, **kw):
    """Run one of the repository's scripts in a subprocess: -> CompletedProcess (text output)."""
    import subprocess
    return subprocess.run([sys.executable, os.path.join(HERE, name), *map(str, args)], capture_output=True, text=True,
                          cwd=kw.pop("cwd", HERE), env=kw.pop("env", ENV), timeout=timeout, **kw)


def tiny_vlm(vocab=300, image_token_id=299, pos="learned"):
    """A random VLM of the tiny preset shapes (model.VISION_PRESETS / LM_PRESETS["tiny"])."""
    cfg = M.VLMConfig(vision=dataclasses.replace(M.VISION_PRESETS["tiny"], vit_pos_embed=pos),
                      lm=dataclasses.replace(M.LM_PRESETS["tiny"], lm_vocab=vocab, lm_max_positions=256),
                      mp_pixel_shuffle=2, image_token_id=image_token_id)
    return M.VLM(cfg).eval()


@pytest.fixture(scope="session")
def gguf_path():
    return checkpoint.default_lm_path()


@pytest.fixture(scope="session")
def smollm(gguf_path):
    return M.LanguageModel.from_pretrained(gguf_path).eval()


@pytest.fixture(scope="session")
def tokenizer(gguf_path):
    return checkpoint.load_tokenizer(gguf_path)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, tokenizer):
    """The offline GGUF's tokenizer saved as files: reading it from the GGUF is slow in every process."""
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def hf_smollm(gguf_path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path),
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """A small synthetic dataset (32 px images): 96 train, 14 val, 14 test samples."""
    from synthetic import build_synthetic
    path = tmp_path_factory.mktemp("data")
    build_synthetic(path, n_train=96, n_val=14, n_test=14, workers=1, image_size=32)
    return str(path)


def reference_processor(kind, tokenizer, tile, splitting):
    """transformers' SmolVLM/Idefics3 processor (PIL image backend) on the offline tokenizer.
    Its constructor insists on a video processor class, which needs torchvision (not installable
    beside CPU torch here); images never touch it, so the class check is skipped."""
    from transformers.processing_utils import ProcessorMixin
    if kind == "smolvlm":
        from transformers import SmolVLMProcessor as P
        from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil as IP
    else:
        from transformers import Idefics3Processor as P
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil as IP
    ip = IP(do_image_splitting=splitting, max_image_size={"longest_edge": tile}, size={"longest_edge": 4 * tile})
    check = ProcessorMixin.check_argument_for_proper_class
    ProcessorMixin.check_argument_for_proper_class = lambda *a: None
    try:
        extra = {"video_processor": None} if kind == "smolvlm" else {}
        return P(image_processor=ip, tokenizer=tokenizer, image_seq_len=4, **extra), ip
    finally:
        ProcessorMixin.check_argument_for_proper_class = check


def random_image(w, h, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


COLOURS = ["red", "green", "blue"]


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory, tokenizer):
    """A picoVLM checkpoint (with processor) that names the colour of the image."""
    proc = M.Processor(tokenizer, 32, 4)
    lm = dataclasses.replace(M.LM_PRESETS["tiny"], lm_vocab=len(tokenizer), lm_max_positions=128)
    cfg = M.VLMConfig(vision=M.VISION_PRESETS["tiny"], lm=lm, image_token_id=proc.image_token_id)
    torch.manual_seed(0)
    vlm = M.VLM(cfg)
    samples = [proc.encode_chat([{"role": "user", "content": "Describe the image."}, {"role": "assistant", "content": c}],
                                [Image.new("RGB", (40, 30), c)]) for c in COLOURS]
    T = max(len(ids) for ids, _, _ in samples)
    ids = torch.stack([torch.cat([i, torch.full((T - len(i),), 2)]) for i, _, _ in samples])
    labels = torch.stack([torch.cat([lab, torch.full((T - len(lab),), -100)]) for _, lab, _ in samples])
    pixels = torch.stack([p[0] for _, _, p in samples])
    opt = torch.optim.AdamW(vlm.parameters(), lr=3e-3)
    for _ in range(60):
        loss = vlm(ids, pixels, labels=labels)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("ckpt")
    vlm.save_pretrained(path, processor=proc)
    return str(path)
