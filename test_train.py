"""train.py tests on CPU: exact resume, DDP = one process, packing = padding, bad input. Tiny shapes."""
import json
import os
import subprocess
import sys

import pytest
import torch

import model as M
import train

HERE = os.path.dirname(os.path.abspath(__file__))
FAST = ["--config", "tiny", "--eval_every", "0", "--eval_samples", "4", "--dtype", "fp32", "--workers", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from prepare_data import build_synthetic
    path = tmp_path_factory.mktemp("data")
    build_synthetic(path, n_train=48, n_val=8, n_test=8, workers=1)
    return str(path)


def run(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *args], capture_output=True, text=True,
                          cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=300)


def losses(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_train_resume_is_exact(data, tmp_path):
    a, b = str(tmp_path / "straight"), str(tmp_path / "resumed")
    r = run(*FAST, "--data", data, "--out_dir", a, "--max_steps", "6")
    assert r.returncode == 0, r.stderr
    final = json.load(open(os.path.join(a, "final_eval.json")))
    assert {"accuracy", "per_type", "wall_s"} <= final.keys() and 0 <= final["accuracy"] <= 1
    assert M.VLM.from_pretrained(a) is not None and os.path.exists(os.path.join(a, "curves.png"))
    assert run(*FAST, "--data", data, "--out_dir", b, "--max_steps", "3").returncode == 0
    r = run(*FAST, "--data", data, "--out_dir", b, "--max_steps", "6", "--resume")
    assert r.returncode == 0, r.stderr
    assert len(losses(a)) == 6 and losses(a) == losses(b)  # bit-identical continuation


def test_ddp_two_processes_equal_one(data, tmp_path):
    """Global batch 4: one process x 4 vs two gloo processes x 2; losses agree to 1e-4 (only the
    order of float reductions differs)."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert run(*FAST, "--data", data, "--out_dir", one, "--max_steps", "4", "--batch_size", "4").returncode == 0
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29577",
                        os.path.join(HERE, "train.py"), *FAST, "--data", data, "--out_dir", two, "--max_steps", "4",
                        "--batch_size", "2"], capture_output=True, text=True, cwd=HERE, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert max(abs(x - y) for x, y in zip(losses(one), losses(two))) <= 1e-4


def test_packed_batch_equals_padded(data):
    cfg = train.parse_args(["--config", "tiny"])
    torch.manual_seed(0)
    vlm, processor = train.build(cfg)
    ds = train.ChatDataset(train.read_split(os.path.join(data, "train.jsonl")), processor)
    samples = [ds[i] for i in range(4)]
    padded, packed = train.collate(samples), train.collate(samples, pack=True, max_len=10_000)
    assert packed["input_ids"].shape[0] == 1 and padded["input_ids"].shape[0] == 4
    with torch.no_grad():
        _, loss_padded = vlm(**train.to(padded, "cpu"))
        _, loss_packed = vlm(**train.to(packed, "cpu"))
    assert abs(loss_padded.item() - loss_packed.item()) <= 1e-5


def test_booleans_and_presets():
    assert train.parse_args(["--pack"]).pack is True
    assert train.parse_args(["--pack", "false"]).pack is False
    assert train.parse_args(["--resume", "true", "--config", "tiny"]).resume is True
    assert train.parse_args(["--config", "tiny", "--batch_size", "3"]).batch_size == 3
    with pytest.raises(train.UsageError, match="unknown preset"):
        train.parse_args(["--config", "huge"])


def test_bad_input_is_one_line(tmp_path):
    r = run("--config", "tiny", "--data", str(tmp_path / "nowhere"), "--out_dir", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    r = run("--config", "tiny", "--data", str(tmp_path), "--out_dir", str(tmp_path / "o2"), "--resume")
    assert r.returncode == 2 and "no checkpoint to resume" in r.stderr
    assert run("--help").returncode == 0
