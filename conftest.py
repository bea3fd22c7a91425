"""Shared test fixtures: the offline SmolLM2-135M-Instruct (GGUF) and its tokenizer, transformers'
reference model, a tiny synthetic dataset and tiny random VLMs. CPU only, no network."""
import os
import sys

import pytest
import torch

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
    import dataclasses
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
