"""The design lab (docs/ablations.md): each variant of the demo's model trained at one fixed budget
on the synthetic set, then its held-out accuracy per question type, step time, image tokens and
training FLOPs in one table, and accuracy against FLOPs in a plot.

    python lab.py                       # every row not yet run (a row is done when its final_eval.json exists)
    python lab.py --rows default,mlp    # these rows only
    python lab.py --report              # no training: the table (stdout) and docs/ablations.png from lab/

Each row is `train.py` with the BUDGET flags and its own; rows marked equal-FLOPs get their stage-1
steps scaled so that the ViT's training FLOPs equal the default's (a bigger ViT sees fewer images).
FLOPs: 3 x the forward FLOPs of one sample (torch.utils.flop_counter on the meta device: nothing
is computed) x the samples each stage saw; the LM's share is the same for rows with the same
number of image tokens.
"""
import json
import os
import subprocess
import sys

import cli

cli.openmp_wait()
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import model as M  # noqa: E402
from checkpoint import UserError, atomic_write, read_config  # noqa: E402

# the demo's recipe at about a quarter of its stage-1 steps and a third of its VLM steps: ~5 minutes a row on 2 cores
BUDGET = ["--pretrain_steps", "700", "--max_steps", "50", "--final_eval_samples", "210", "--eval_samples", "70"]
DEMO_VIT = dict(vit_image_size=64, vit_patch_size=16, vit_depth=4, vit_width=128, vit_heads=2, vit_mlp_dim=512)
# name -> (flags, equal_flops): the default three times (seeds) measures the run-to-run noise
ROWS = {
    "default": ([], False),
    "default-seed2": (["--seed", "2"], False),
    "default-seed3": (["--seed", "3"], False),
    "mlp": (["--mp_type", "mlp"], False),
    "patch_merger": (["--mp_type", "patch_merger"], False),
    "avg_pool": (["--mp_type", "avg_pool"], False),
    "attention_pool": (["--mp_type", "attention_pool"], False),
    "shuffle1": (["--mp_pixel_shuffle", "1"], False),   # 16 image tokens instead of 4
    "shuffle4": (["--mp_pixel_shuffle", "4"], False),   # 1 image token
    "bidirectional": (["--lm_image_attention", "bidirectional"], False),
    "hmlp": (["--vit_stem", "hmlp"], False),
    "hmlp-seed2": (["--vit_stem", "hmlp", "--seed", "2"], False),  # the best first run, repeated
    "hmlp-seed3": (["--vit_stem", "hmlp", "--seed", "3"], False),
    "parallel": (["--vit_parallel_blocks"], False),
    "deep-narrow": (["--vit_depth", "8", "--vit_width", "96", "--vit_mlp_dim", "384"], True),
    "patch8": (["--vit_patch_size", "8", "--mp_pixel_shuffle", "4"], True),  # 64 patches, still 4 LM tokens
}
TEXT_TOKENS = 30  # a training sample's text tokens besides the image's (the default row's log: ~30)
TYPES = ("caption", "color", "count", "position", "shape", "size", "text")


def flag_values(flags):
    """--name value pairs (a bare flag is true) -> {name: value}"""
    out, i = {}, 0
    while i < len(flags):
        bare = i + 1 == len(flags) or flags[i + 1].startswith("--")
        out[flags[i][2:]] = True if bare else flags[i + 1]
        i += 1 if bare else 2
    return out


def vision_config(flags):
    given = flag_values(flags)
    vit = {k: (v if isinstance(v, bool) else type(getattr(M.VisionConfig(), k))(v))
           for k, v in given.items() if k in M.VisionConfig.__dataclass_fields__}
    return M.VisionConfig(**{**DEMO_VIT, "vit_pos_embed": "sincos2d", **vit})


def forward_flops(flags, text_tokens=0):
    """Forward FLOPs of the ViT + projector for one image, or (text_tokens > 0) of the LM
    (SmolLM2-135M's shape) on one sample of that many text tokens plus the image's; counted on
    the meta device: nothing is computed."""
    given = flag_values(flags)
    cfg = M.VLMConfig(vision=vision_config(flags), lm=M.LM_PRESETS["smollm2-135m"],
                      mp_pixel_shuffle=int(given.get("mp_pixel_shuffle", 2)),
                      mp_type=given.get("mp_type", "pixel_shuffle"))
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        if text_tokens:
            M.LanguageModel(cfg.lm)(torch.zeros(1, text_tokens + cfg.image_tokens, dtype=torch.long))
        else:
            M.VLM(cfg, lm=torch.nn.Identity()).image_embeds(torch.empty(1, 3, 64, 64))
    return counter.get_total_flops()


def command(name, out_root):
    flags, equal = ROWS[name]
    budget = list(BUDGET)
    if equal:  # stage 1 trains the ViT: give it the default's FLOPs
        i = budget.index("--pretrain_steps") + 1
        budget[i] = str(round(int(budget[i]) * forward_flops([]) / forward_flops(flags)))
    if "--vit_stem" not in flags:  # the lab compared against the plain patch stem, the default until it
        budget += ["--vit_stem", "patch"]  # found the hMLP stem better
    return [sys.executable, "train.py", "--out_dir", os.path.join(out_root, name), *budget, *flags]


def result(name, out_root):
    """The row's numbers from its out_dir: accuracy per type, seconds per step, FLOPs."""
    out = os.path.join(out_root, name)
    with open(os.path.join(out, "final_eval.json")) as f:
        final = json.load(f)
    with open(os.path.join(out, "log.jsonl")) as f:
        log = [json.loads(line) for line in f if line.strip()]
    cfg = M.VLMConfig.from_dict(read_config(os.path.join(out, "config.json")))
    stages, last = {}, 0.0
    for r in log:  # time_s counts from the run's start: a step's time is the difference
        dt, last = r["time_s"] - last, r["time_s"]
        stages.setdefault(r["stage"], []).append(dt)
    flags = ROWS[name][0]
    cmd = command(name, out_root)
    pre_steps, vlm_steps = int(cmd[cmd.index("--pretrain_steps") + 1]), int(cmd[cmd.index("--max_steps") + 1])
    # training ~ 3 x forward: stage 1 the ViT on 64 images a step (its proxy decoder is ~100x
    # smaller: left out), stage 2 the ViT's forward (frozen in the demo) on 16 images a step and
    # the LM on TEXT_TOKENS + the image's tokens
    vit = forward_flops(flags)
    flops = 3 * vit * 64 * pre_steps + (vit + 3 * forward_flops(flags, TEXT_TOKENS)) * 16 * vlm_steps
    median = {k: sorted(t)[len(t) // 2] for k, t in stages.items()}
    return {"row": name, "accuracy": final["accuracy"], "per_type": final["per_type"],
            "image_tokens": cfg.image_tokens, "flops": flops, "pretrain_step_s": median.get("pretrain"),
            "vlm_step_s": median.get("vlm"), "command": " ".join(["python"] + cmd[1:])}


def report(rows, out_root, plot):
    results = [result(r, out_root) for r in rows if os.path.exists(os.path.join(out_root, r, "final_eval.json"))]
    print("| row | accuracy | " + " | ".join(TYPES) + " | image tokens | train TFLOP | s/step (1 / 2) |")
    print("|---" * (len(TYPES) + 5) + "|")
    for r in results:
        per = " | ".join(f"{100 * r['per_type'].get(t, 0):.0f}" for t in TYPES)
        steps = " / ".join(f"{t:.2f}" if t else "-" for t in (r["pretrain_step_s"], r["vlm_step_s"]))
        print(f"| {r['row']} | **{100 * r['accuracy']:.1f}** | {per} | {r['image_tokens']} | "
              f"{r['flops'] / 1e12:.1f} | {steps} |")
    print()
    for r in results:
        print(f"- {r['row']}: `{r['command']}`")
    atomic_write(os.path.join(out_root, "results.json"), json.dumps(results, indent=1))
    if plot and results:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in results:
            default = r["row"].startswith("default")
            ax.scatter(r["flops"] / 1e12, 100 * r["accuracy"], c="k" if default else "C0", s=20)
            if not default or r["row"] == "default":
                ax.annotate(r["row"], (r["flops"] / 1e12, 100 * r["accuracy"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("training FLOPs (TFLOP, 3 x forward)")
        ax.set_ylabel("held-out accuracy (%, mean over types)")
        ax.set_title("picoVLM design lab at a fixed budget (black: the default, 3 seeds)", fontsize=10)
        fig.tight_layout()
        os.makedirs(os.path.dirname(plot) or ".", exist_ok=True)
        fig.savefig(plot, dpi=120)


def run(args):
    rows = args.rows.split(",") if args.rows else list(ROWS)
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise UserError(f"--rows: unknown row {unknown[0]!r} (rows: {', '.join(ROWS)})")
    if not args.report:
        for name in rows:
            if os.path.exists(os.path.join(args.out_root, name, "final_eval.json")):
                continue
            cmd = command(name, args.out_root)
            print("+", " ".join(cmd[1:]), flush=True)
            if subprocess.run(cmd).returncode:
                raise UserError(f"row {name} failed (its command is above)")
    report(rows, args.out_root, args.plot)


def main():
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--rows", default="", help="comma-separated row names (default: all)")
    p.add_argument("--out_root", default="lab", help="one out_dir per row under this folder")
    p.add_argument("--report", action="store_true", help="only tabulate and plot the finished rows")
    p.add_argument("--plot", default="docs/ablations.png", help="where the plot goes")
    return cli.main(lambda: run(p.parse_args()), "lab.py")


if __name__ == "__main__":
    sys.exit(main())
