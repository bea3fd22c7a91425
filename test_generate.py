"""generate.py / bench.py end to end and cached decoding (the weight formats' quality: test_inference.py). CPU, no network.

The CLI runs on a tiny VLM trained here for a few seconds to answer an image's colour ("red",
"green", "blue"), so a printed answer can be checked against its file."""
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import checkpoint
import cli as cli_lib
import generate
import inference
from conftest import COLOURS, ENV, HERE, script
from test_processor import add_remote_code



@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Good images in awkward modes, and bad files: name -> path."""
    d = tmp_path_factory.mktemp("images")
    Image.new("RGB", (40, 30), "red").save(d / "red.png")
    Image.new("RGB", (50, 20), "green").convert("P").save(d / "green_palette.png")
    Image.new("RGB", (20, 40), "blue").convert("CMYK").save(d / "blue_cmyk.tiff")
    Image.new("RGBA", (30, 30), (255, 0, 0, 255)).save(d / "red_rgba.png")
    Image.new("I;16", (30, 30), 40000).save(d / "grey16.png")
    (d / "not_image.png").write_bytes(b"this is text, not an image")
    (d / "truncated.png").write_bytes((d / "red.png").read_bytes()[:50])
    (d / "empty.jpg").write_bytes(b"")  # no pixels at all (PIL cannot even write a 0x0 image)
    return {f.stem: str(f) for f in d.iterdir()} | {"missing": str(d / "missing.png"), "dir": str(d)}


def cli(*args, **kw):
    return script("generate.py", *args, **kw)


# ----------------------------------------------------------------------------- generate.py

def test_cli_streams_the_answer(ckpt, images):
    r = cli("--model", ckpt, "--image", images["red"], "--greedy", "--verbose")
    assert r.returncode == 0, r.stderr
    answer, stats = r.stdout.strip().splitlines()
    assert answer == "red"
    assert "prefill" in stats and "tokens/s" in stats and "peak memory" in stats
    assert "Traceback" not in r.stderr


def test_batch_reports_bad_images_and_captions_the_rest(ckpt, images, tmp_path, capsys):
    good = ["red", "green_palette", "blue_cmyk", "red_rgba", "grey16"]
    bad = ["not_image", "truncated", "empty", "missing"]
    order = ["red", "not_image", "green_palette", "truncated", "blue_cmyk", "empty", "red_rgba", "missing", "grey16"]
    argv = ["--model", ckpt, "--greedy", "--batch-size", "3", "--output", str(tmp_path / "out.jsonl")]
    for name in order:
        argv += ["--image", images[name]]
    assert generate.main(argv) == 2
    out, err = capsys.readouterr()
    answers = dict(line.split(": ", 1) for line in out.splitlines())
    assert list(answers) == [images[n] for n in order if n in good]  # each answer after its file, in order
    assert [answers[images[n]] for n in ("red", "green_palette", "blue_cmyk", "red_rgba")] == ["red", "green", "blue", "red"]
    err_lines = err.strip().splitlines()
    assert len(err_lines) == len(bad) and all(images[n] in line for n, line in zip(bad, err_lines))
    assert "no such file" in err_lines[-1] and "Traceback" not in err
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert {x["image"] for x in lines} == {images[n] for n in order}
    assert sum("error" in x for x in lines) == len(bad)


def test_directory_glob_and_samples(ckpt, images, tmp_path, capsys):
    out_file = tmp_path / "dir.jsonl"
    assert generate.main(["--model", ckpt, "--image", images["dir"], "--output", str(out_file), "--greedy"]) == 2
    out, err = capsys.readouterr()
    assert "image/s" in err or "it/s" in err  # the progress bar
    assert len(out_file.read_text().splitlines()) == 8  # every file of the folder (missing.png is not one)
    assert generate.main(["--model", ckpt, "--image", os.path.join(images["dir"], "red*.png"),
                          "--num-samples", "2", "--temperature", "0.5", "--seed", "1"]) == 0
    out, _ = capsys.readouterr()
    assert sorted(line.split(": ")[0] for line in out.strip().splitlines()) == sorted(
        f"{images[n]} #{k}" for n in ("red", "red_rgba") for k in (1, 2))


@pytest.mark.parametrize("weights, compiled", [("--int8", False), ("--int8", True), ("--weights=int4", False),
                                               ("--weights=bf16", False)])
def test_quantized_model_gives_the_same_answers(ckpt, images, capsys, weights, compiled):
    """--int8 (= --weights int8), eager and with --compile (on CPU inductor must keep ATen's int8
    kernel in its graph), --weights int4 and bf16 (the language model in bf16, the ViT in fp32)."""
    argv = ["--model", ckpt, "--greedy", weights, "--no-stream"] + ["--compile"] * compiled
    assert generate.main(argv + ["--image", images["blue_cmyk"], "--image", images["red"]]) == 0
    assert capsys.readouterr().out.strip().splitlines() == [f"{images['blue_cmyk']}: blue", f"{images['red']}: red"]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_compiled_cpu_decoding_gives_the_same_answers(ckpt, images, capsys, dtype):
    """--compile on CPU: the LM's linears become MatvecLinear (bf16: weights only, fp32 arithmetic);
    the wait for the compiler is announced on stderr."""
    argv = ["--model", ckpt, "--greedy", "--no-stream", "--compile", "--dtype", dtype]
    assert generate.main(argv + ["--image", images["blue_cmyk"], "--image", images["red"]]) == 0
    out, err = capsys.readouterr()
    assert out.strip().splitlines() == [f"{images['blue_cmyk']}: blue", f"{images['red']}: red"]
    assert "--compile: compiling" in err and "--compile: compiled in" in err


def test_matvec_linear_equals_linear():
    """MatvecLinear's compiled product for 1-4 rows against F.linear, fp32 and bf16 weights (bf16:
    inductor's loop, and kernels.cpp's product where it is built, also alone for 6 rows, which
    read the weights in a group of 4 and of 2): the same sums in another order, max |diff| <= 1e-5
    (outputs ~1). More rows (a prefill) and eager calls go through F.linear itself: equal."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    x, rows = torch.randn(3, 1, 64), torch.randn(2, 5, 64)
    for weight_dtype, own_kernel in ((None, False), (torch.bfloat16, False), (torch.bfloat16, True)):
        layer = inference.MatvecLinear(linear, weight_dtype)
        assert layer.own_kernel == (weight_dtype is not None and inference.cpu_kernels())
        if own_kernel and not layer.own_kernel:
            continue
        layer.own_kernel = own_kernel
        weight = linear.weight if weight_dtype is None else linear.weight.to(weight_dtype).float()
        compiled = torch.compile(layer, fullgraph=True, dynamic=False)
        with torch.no_grad():
            want = torch.nn.functional.linear(x, weight, linear.bias)
            for n in (1, 3):
                assert (compiled(x[:n]) - want[:n]).abs().max() <= 1e-5
            assert torch.equal(layer(x), want)
            assert torch.equal(layer(rows), torch.nn.functional.linear(rows, weight, linear.bias))
        if own_kernel:
            six = torch.randn(6, 64)
            assert (torch.ops.picovlm.bf16_matvec(six, layer.weight) - six @ weight.T).abs().max() <= 1e-5
    assert layer.weight.dtype == torch.bfloat16 and inference.MatvecLinear(linear).weight is linear.weight
    assert not inference.MatvecLinear(torch.nn.Linear(48, 8), torch.bfloat16).own_kernel  # 48 inputs: not whole lines


def test_int8_scales_follow_the_module():
    """The CPU kernel's bf16 copy of the scales moves with the module and stays bf16 when the
    model's float dtype changes (it is not a buffer, so nn.Module would leave it behind)."""
    layer = inference.Int8Linear(torch.nn.Linear(16, 8))
    layer.to(torch.float64)
    assert layer.scale.dtype == torch.float64 and layer.scale_bf16.dtype == torch.bfloat16
    layer.to("meta")
    assert layer.scale_bf16.device.type == "meta" and layer.weight.dtype == torch.int8


@pytest.mark.parametrize("case", ["not_a_checkpoint", "no_dir", "prompt_too_long", "no_glob_match", "bad_flag"])
def test_bad_input_is_one_line_and_exit_2(ckpt, images, tmp_path, capsys, case):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    argv = {"not_a_checkpoint": ["--model", str(tmp_path)], "no_dir": ["--model", str(tmp_path / "nowhere")],
            "prompt_too_long": ["--model", ckpt, "--prompt", "word " * 200],
            "no_glob_match": ["--model", ckpt, "--image", str(tmp_path / "*.png")],
            "bad_flag": ["--model", ckpt, "--top-p", "2"]}[case]
    argv = ["--image", images["red"], *argv]
    try:
        code = generate.main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert {"not_a_checkpoint": "not a picoVLM", "no_dir": "nowhere", "prompt_too_long": "--prompt is too long",
            "no_glob_match": "no images found", "bad_flag": "--top_p"}[case] in err[0]


def test_checkpoint_code_never_runs(ckpt, images, tmp_path):
    """The issue's repro: a tokenizer_config.json whose auto_map points at evil.py beside it, and
    'y' on stdin. transformers (trust_remote_code=False) does not ask, and without the code the
    class does not exist: one error line, and evil.py never ran."""
    evil = tmp_path / "evil"
    shutil.copytree(ckpt, evil)
    add_remote_code(evil, "EvilTokenizer")
    r = cli("--model", evil, "--image", images["red"], input="y\n")
    assert r.returncode == 2 and not (evil / "RAN").exists()
    assert r.stdout == "" and r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1, r.stderr


@pytest.mark.parametrize("prompt", ["<image>What colour?", "Row <row_1_col_2>?", "caf\udce9"])
def test_prompt_with_image_tokens_or_bad_bytes_is_one_line(ckpt, images, capsys, prompt):
    """The last prompt holds the byte 0xE9, not UTF-8, as Python hands it over from argv (surrogateescape)."""
    assert generate.main(["--model", ckpt, "--image", images["red"], "--prompt", prompt]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --prompt:"), err


def test_processor_that_does_not_fit_the_model_is_one_line(ckpt, images, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    settings = json.loads((bad / "processor.json").read_text())
    (bad / "processor.json").write_text(json.dumps({**settings, "tokens_per_image": 5}))
    assert generate.main(["--model", str(bad), "--image", images["red"]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tokens_per_image is 5 but the model's is 4" in err[0], err


def test_output_that_cannot_be_written_is_one_line(ckpt, images, capsys):
    assert generate.main(["--model", ckpt, "--image", images["red"], "--output", "/dev/full"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --output /dev/full: cannot write (No space left on device)"]


def test_ctrl_c_exits_130_and_leaves_whole_lines(ckpt, tmp_path):
    """SIGINT once the first answer is in --output: exit status 130, no traceback, the message last,
    and --output holds whole JSON lines, during the run (each written through) and after."""
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(300):
        Image.new("RGB", (40, 30), COLOURS[i % 3]).save(folder / f"{i:03d}.png")
    out, err = tmp_path / "out.jsonl", tmp_path / "stderr"
    with open(err, "w") as stderr:
        p = subprocess.Popen([sys.executable, os.path.join(HERE, "generate.py"), "--model", ckpt, "--image", folder,
                              "--batch_size", "1", "--greedy", "--output", out], stdout=subprocess.DEVNULL,
                             stderr=stderr, env=ENV, cwd=HERE)
        deadline, seen = time.time() + 120, b""
        while p.poll() is None and time.time() < deadline and b"\n" not in seen:
            time.sleep(0.01)
            seen = out.read_bytes() if out.exists() else b""
        p.send_signal(signal.SIGINT)
        p.wait(60)
    # what a reader saw during the run: whole lines, as each was written (a buffer held ~80 of them)
    assert seen.endswith(b"\n") and seen.count(b"\n") < 30, seen[-200:]
    assert p.returncode == 130 and "Traceback" not in err.read_text(), err.read_text()[-3000:]
    assert err.read_text().rstrip().endswith("generate.py: interrupted")
    lines = out.read_text().splitlines()
    assert 1 <= len(lines) < 300 and all(json.loads(line)["answer"] in COLOURS for line in lines)


def write_state(out_dir, stage, step, max_steps=10):
    from safetensors.torch import save_file
    meta = {"state": {"stage": stage, "step": step}, "config": {"max_steps": max_steps}}
    save_file({"x": torch.zeros(1)}, str(out_dir / checkpoint.STATE_FILE), metadata={"picovlm": json.dumps(meta)})


@pytest.mark.parametrize("case", ["stage_1", "vlm_step_3", "no_state_but_a_log", "finished", "not_from_train_py"])
def test_unfinished_training_is_flagged(ckpt, tmp_path, case):
    """A train.py out_dir that never finished its VLM stage: stopped in stage 1 (SIGTERM saves a
    stage-1 state), midway, or killed before its first checkpoint (a log, no state)."""
    out = tmp_path / "out"
    shutil.copytree(ckpt, out)
    if case in ("stage_1", "vlm_step_3", "finished"):
        write_state(out, *{"stage_1": ("pretrain", 4), "vlm_step_3": ("vlm", 3), "finished": ("vlm", 10)}[case])
    if case != "not_from_train_py":
        (out / "log.jsonl").write_text(json.dumps({"step": 1, "stage": "pretrain", "loss": 3.0}) + "\n")
    warning = generate.unfinished_training(str(out))
    if case in ("finished", "not_from_train_py"):
        assert warning is None
    else:
        assert warning.startswith(f"warning: {out} is from a training run that stopped "
                                  + {"stage_1": "before its VLM stage", "vlm_step_3": "at VLM step 3 of 10",
                                     "no_state_but_a_log": "before its first checkpoint"}[case])


# ----------------------------------------------------------------------------- decoding

def chat_ids(tokenizer, question):
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    return torch.tensor([tokenizer.encode(text)])


def uncached_greedy(lm, ids, n):
    """The reference: the whole sequence through the model again for every new token."""
    for _ in range(n):
        ids = torch.cat([ids, lm(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[0, -n:].tolist()


@torch.no_grad()
def test_cached_decode_equals_uncached_greedy(smollm, tokenizer):
    ids = chat_ids(tokenizer, "Write a haiku about the sea.")
    want = uncached_greedy(smollm, ids, 10)
    assert smollm.generate(ids, max_new_tokens=10, eos_token_id=-1)[0].tolist() == want
    transposed = inference.decode_layout(copy.deepcopy(smollm))  # generate.py's CPU weight layout: same numbers
    assert transposed.blocks[0].gate.weight.stride() == (1, 1536)  # [1536, 576] stored as [576, 1536]
    assert transposed.generate(ids, max_new_tokens=10, eos_token_id=-1)[0].tolist() == want


# ----------------------------------------------------------------------------- bench.py

def test_bench_smoke_prints_json_last():
    r = script("bench.py", "--quick", "--smoke")
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("train_fp32_speedup", "train_bf16_speedup", "prefill_speedup", "decode_fp32_speedup",
                "decode_bf16_speedup", "decode_int8_speedup", "decode_int4_speedup", "decode_tokens_per_s",
                "bandwidth_limit_tokens_per_s", "decode_best_tokens_per_s", "decode_best_mode", "device"):
        assert key in result
    assert result["greedy_tokens_match"] and result["train_loss_diff"] <= 1e-3


def test_adapter_answers_like_the_merged_model(tmp_path, tokenizer, capsys):
    """--adapter DIR: the adapter folded into --model answers exactly as the saved merged model."""
    import model as M
    from conftest import tiny_vlm
    proc = M.Processor(tokenizer, 32, 4)
    vlm = tiny_vlm(vocab=len(proc.tokenizer), image_token_id=proc.image_token_id)
    vlm.save_pretrained(tmp_path / "base", proc)
    vlm.add_lora(rank=2)
    with torch.no_grad():
        for _, m in M.lora_modules(vlm):
            for b in m.lora_B:
                b.normal_()
    vlm.save_lora(tmp_path / "adapter")
    vlm.save_pretrained(tmp_path / "merged", proc)
    Image.new("RGB", (32, 32), "red").save(tmp_path / "red.png")
    common = ["--image", str(tmp_path / "red.png"), "--greedy", "--max_new_tokens", "6", "--device", "cpu"]
    assert generate.main(["--model", str(tmp_path / "merged"), *common]) == 0
    merged = capsys.readouterr().out
    assert generate.main(["--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), *common]) == 0
    assert capsys.readouterr().out == merged and merged.strip()
    assert generate.main(["--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "base"), *common]) == 2


def test_openmp_wait(monkeypatch):
    """Decoding scripts spin briefly (GOMP_SPINCOUNT), the others wait passively; a user's own
    OMP_WAIT_POLICY or GOMP_SPINCOUNT is left as it is."""
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(name, raising=False)
    cli_lib.openmp_wait(decoding=True)
    assert os.environ["GOMP_SPINCOUNT"] == "10000" and "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.delenv("GOMP_SPINCOUNT")
    cli_lib.openmp_wait()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and "GOMP_SPINCOUNT" not in os.environ
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    cli_lib.openmp_wait(decoding=True)
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE" and "GOMP_SPINCOUNT" not in os.environ
