"""evaluation.py: each metric against hand-computed cases (the VQA answer normalisation and its
10-subset accuracy, ANLS around its threshold, ChartQA's 5%, multiple-choice letters read from
free text, OCRBench, COCO's CIDEr-D and BLEU-4 against coco-caption's own tokenizer), and the CLI
end to end on a tiny checkpoint and a local MMStar-schema parquet file. CPU, no network."""
import io
import json
import shutil

import pytest
import torch
from PIL import Image

import evaluation as E
import model as M
from conftest import ENV, script
from conftest import COLOURS

OPTIONS = "\nOptions: A: red, B: green, C: blue, D: yellow"


# ----------------------------------------------------------------------------- metrics

def test_vqa_normalisation():
    """The official answer processor: articles dropped, punctuation removed (or a space where it
    joins words), number words as digits, contractions restored, decimals kept."""
    for raw, expected in [("The dog.", "dog"), ("an apple", "apple"), ("Two", "2"), ("none", "0"), ("ten apples", "10 apples"),
                          ("dont", "don't"), ("isnt it", "isn't it"), ("Yes!", "yes"), ("red-ish", "red ish"),
                          ("- red", "red"), ("3.5", "3.5"), ("a man's hat", "man 's hat"), ("yes, sir?", "yes sir"),
                          ("  A\tcat ", "cat")]:
        assert E.vqa_normalize(raw) == expected, raw


def test_vqa_accuracy_over_the_ten_leave_one_out_sets():
    """min(matches / 3, 1) averaged over the 10 sets of 9 answers: 1 match -> 0.3, 2 -> 0.6,
    3 -> 0.9, 4 or more -> 1; the prediction and the answers are both normalised."""
    for matches, expected in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
        answers = ["2"] * matches + ["3"] * (10 - matches)
        assert E.vqa_accuracy("Two", answers) == pytest.approx(expected)
    assert E.vqa_accuracy("the cat.", ["Cat"] * 2 + ["dog"] * 8) == pytest.approx(0.6)


def test_anls_around_its_threshold():
    """1 - edit distance / longer length, 0 once that distance ratio reaches 0.5; the best answer counts."""
    assert E.anls("Hello  World", ["hello world"]) == 1.0
    assert E.anls("abcdefxyij", ["abcdefghij"]) == pytest.approx(0.8)  # 2 of 10
    assert E.anls("abcdwxyzij", ["abcdefghij"]) == pytest.approx(0.6)  # 4 of 10: just under the threshold
    assert E.anls("abcdvwxyzj", ["abcdefghij"]) == 0.0  # 5 of 10: at the threshold
    assert E.anls("abcdvwxyzj", ["zzz", "abcdefghij", "abcdvwxyzk"]) == pytest.approx(0.9)
    assert E.anls("", ["abc"]) == 0.0


def test_relaxed_accuracy_five_percent():
    for prediction, answer, ok in [("105", "100", 1), ("95", "100", 1), ("105.1", "100", 0), ("94.9", "100", 0),
                                   ("5%", "0.05", 1), ("0", "0", 1), ("0.01", "0", 0), ("Yes", "yes", 1), ("yes.", "yes", 0)]:
        assert E.relaxed_accuracy(prediction, answer) == ok, (prediction, answer)


def test_multiple_choice_read_from_free_text():
    options = ["red", "green", "light blue", "yellow"]
    for text, letter in [("B", "B"), ("(B)", "B"), ("B.", "B"), ("C) light blue", "C"), ("The answer is D.", "D"),
                         ("Answer: (A)", "A"), ("option c", None), ("green", "B"), ("It is light blue.", "C"),
                         ("I pick (D) here", "D"), ("A cat", None), ("E", None), ("red or green", None), ("", None)]:
        assert E.choice(text, options) == letter, text
    assert E.parse_options("Which?" + OPTIONS) == ["red", "green", "blue", "yellow"]


def test_ocrbench_answer_in_prediction():
    assert E.ocrbench_accuracy("The word is HELLO.", ["hello"]) == 1.0
    assert E.ocrbench_accuracy("helo", ["hello", "world"]) == 0.0
    assert E.ocrbench_accuracy("x ^ { 2 } + 1", ["x^{2}+1"], handwritten_math=True) == 1.0


def test_captions_against_coco_caption():
    """CIDEr-D and BLEU-4 from pycocoevalcap's scorers; our tokenizer gives what coco-caption's
    PTBTokenizer (Java) gives, so the scores equal the reference pipeline's where Java exists."""
    refs = [["A man riding a horse on a beach.", "A person rides a brown horse near the ocean."],
            ["Two dogs playing with a red ball.", "Dogs chase a ball (red) in the park's grass."],
            ["A plate of food with broccoli.", "Broccoli and rice on a white plate."]]
    preds = ["a man rides a horse on the beach", "two dogs play with a ball", "a cat sleeping on a couch"]
    samples = [{"answers": r} for r in refs]
    scores, extra = E.caption_scores(preds, samples)
    assert len(scores) == 3 and scores[0] > scores[2] >= 0 and 0 < extra["bleu4"] < 1
    same, extra_same = E.caption_scores([r[0] for r in refs], samples)
    assert extra_same["bleu4"] > 0.99 and min(same) > max(scores)
    if shutil.which("java"):
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
        ptb = PTBTokenizer()
        gts = ptb.tokenize({i: [{"caption": c} for c in r] for i, r in enumerate(refs)})
        res = ptb.tokenize({i: [{"caption": p}] for i, p in enumerate(preds)})
        assert Cider().compute_score(gts, res)[0] == pytest.approx(sum(scores) / 3, abs=1e-12)
        assert Bleu(4).compute_score(gts, res, verbose=0)[0][3] == pytest.approx(extra["bleu4"], abs=1e-12)


# ----------------------------------------------------------------------------- the CLI

# MMStar's schema: index, question (options inside), image, answer letter, category, l2_category
MMSTAR = [  # (answer, category, l2 category, a prediction, is it right)
    ("A", "coarse perception", "image scene", "A", 1), ("B", "coarse perception", "image scene", "(B)", 1),
    ("D", "coarse perception", "image style", "The answer is C.", 0), ("B", "math", "geometry", "green", 1),
    ("C", "math", "geometry", "", 0), ("D", "math", "geometry", "D. yellow", 1)]


def png(colour):
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def mmstar(tmp_path_factory):
    import datasets
    d = tmp_path_factory.mktemp("mmstar")
    rows = {"index": list(range(100, 106)), "question": ["What colour is the image?" + OPTIONS] * 6,
            "image": [{"bytes": png(COLOURS[i % 3]), "path": None} for i in range(6)],
            "answer": [a for a, *_ in MMSTAR], "category": [c for _, c, *_ in MMSTAR], "l2_category": [l2 for _, _, l2, *_ in MMSTAR]}
    ds = datasets.Dataset.from_dict(rows, features=datasets.Features(
        {**{k: datasets.Value("string") for k in ("question", "answer", "category", "l2_category")},
         "index": datasets.Value("int64"), "image": datasets.Image()}))
    ds.to_parquet(str(d / "mmstar.parquet"))
    ds.remove_columns("l2_category").to_parquet(str(d / "no_l2.parquet"))
    (d / "broken.parquet").write_bytes(b"PAR1 but not really")
    (d / "predictions.jsonl").write_text("".join(json.dumps({"id": 100 + i, "prediction": p}) + "\n"
                                                 for i, (*_, p, _) in enumerate(MMSTAR)))
    return d


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def evaluate(capsys, *args):
    code = E.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_predictions_give_the_hand_computed_score(mmstar, tmp_path, capsys):
    """MMStar is the mean over its l2 categories: (2/2 + 0/1 + 2/3) / 3; per category 2/3 each."""
    code, out, err = evaluate(capsys, "--benchmark", "mmstar", "--data_files", mmstar / "mmstar.parquet",
                              "--predictions", mmstar / "predictions.jsonl", "--samples", tmp_path / "s.jsonl")
    assert code == 0, err
    results = json.loads(out)
    assert results["score"] == pytest.approx((1 + 0 + 2 / 3) / 3) and results["metric"] == "accuracy"
    assert results["per_category"] == pytest.approx({"coarse perception": 2 / 3, "math": 2 / 3}) and results["n"] == 6
    assert results["model"] is None and results["revision"] is None
    lines = [json.loads(x) for x in open(tmp_path / "s.jsonl")]
    assert [x["score"] for x in lines] == [ok for *_, ok in MMSTAR] and lines[3] == {
        "id": 103, "prediction": "green", "answers": ["B"], "score": 1.0, "category": "math"}
    # --limit 3 takes rows 0, 2, 4 (spread over the benchmark): one per l2 category, right, wrong, wrong
    code, out, _ = evaluate(capsys, "--benchmark", "mmstar", "--data-files", mmstar / "mmstar.parquet",
                            "--predictions", mmstar / "predictions.jsonl", "--limit", "3")
    assert code == 0 and json.loads(out)["n"] == 3 and json.loads(out)["score"] == pytest.approx(1 / 3)


def test_bad_inputs_are_one_line(mmstar, tmp_path, capsys):
    cases = [(["--benchmark", "nope"], "invalid choice"),
             (["--benchmark", "mmstar", "--data_files", mmstar / "no_l2.parquet", "--predictions", mmstar / "predictions.jsonl"],
              "no column 'l2_category' for mmstar"),
             (["--benchmark", "mmstar", "--data_files", mmstar / "broken.parquet"], "cannot load it"),
             (["--benchmark", "mmstar", "--data_files", tmp_path / "none.parquet"], "no .parquet or .arrow files"),
             (["--benchmark", "mmstar", "--data_files", mmstar / "mmstar.parquet", "--predictions", mmstar / "mmstar.parquet"],
              "not a JSONL of predictions"),
             (["--benchmark", "mmstar", "--data_files", mmstar / "mmstar.parquet", "--model", tmp_path], "config.json: missing"),
             (["--benchmark", "jsonl"], "needs --data_files"), (["--benchmark", "mmstar", "--limit", "-1"], "--limit")]
    (tmp_path / "partial.jsonl").write_text(json.dumps({"id": 100, "prediction": "A"}) + "\n")
    cases.append((["--benchmark", "mmstar", "--data_files", mmstar / "mmstar.parquet", "--predictions",
                   tmp_path / "partial.jsonl"], "no prediction for 5 of 6 questions"))
    for args, message in cases:
        try:
            code, out, err = evaluate(capsys, *args)
        except SystemExit as e:  # argparse: its one line, exit 2
            code, err = e.code, capsys.readouterr().err
        assert code == 2 and message in err and err.strip().count("\n") == 0, (args, err)


def test_end_to_end_on_a_tiny_checkpoint(ckpt, mmstar, tmp_path):
    """The script, a model and a local MMStar-schema file: the results JSON and its samples agree."""
    r = script("evaluation.py", "--model", ckpt, "--benchmark", "mmstar", "--data_files", mmstar / "mmstar.parquet",
               "--batch_size", "4", "--output", tmp_path / "r.json", "--samples", tmp_path / "s.jsonl",
               env=dict(ENV, HF_DATASETS_CACHE=str(tmp_path / "hf-cache"), HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.load(open(tmp_path / "r.json"))
    assert results == json.loads(r.stdout) and results["n"] == 6 and results["model"] == ckpt
    assert set(results) >= {"score", "metric", "per_category", "n", "revision", "benchmark"}
    lines = [json.loads(x) for x in open(tmp_path / "s.jsonl")]
    by_l2 = {}
    for x, (_, _, l2, *_) in zip(lines, MMSTAR):
        by_l2.setdefault(l2, []).append(x["score"])
    assert results["score"] == pytest.approx(sum(sum(v) / len(v) for v in by_l2.values()) / len(by_l2))


def test_jsonl_split_equals_final_evaluation(ckpt, tmp_path, capsys):
    """--benchmark jsonl scores a split as train.py's final evaluation does; an unreadable image
    is left out and counted in both."""
    (tmp_path / "images").mkdir()
    records = []
    for i in range(9):
        Image.new("RGB", (40, 30), COLOURS[i % 3]).save(tmp_path / "images" / f"{i}.png")
        answer = COLOURS[i % 3] if i % 4 else "purple"  # some answers the model cannot give
        records.append({"images": [f"images/{i}.png"], "messages": [{"role": "user", "content": "Describe the image."},
                                                                      {"role": "assistant", "content": answer}],
                        "type": ["colour", "other"][i % 2]})
    (tmp_path / "images" / "8.png").write_bytes(b"broken")
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    code, out, err = evaluate(capsys, "--model", ckpt, "--benchmark", "jsonl", "--data_files", tmp_path / "test.jsonl",
                              "--device", "cpu")
    assert code == 0, err
    results = json.loads(out)
    vlm, proc = M.VLM.from_pretrained(ckpt), M.Processor.from_pretrained(ckpt)
    final = E.final_evaluation(vlm, proc, E.sources.load_split(str(tmp_path), "test"), torch.device("cpu"))
    assert final["accuracy"] == results["score"] and final["per_type"] == results["per_category"]
    assert final["n"] == results["n"] == 8 and final["unreadable_images"] == results["unreadable_images"] == 1
    assert 0 < final["accuracy"] < 1


def test_in_loop_benchmarks(ckpt, mmstar, monkeypatch):
    """train.py --eval_benchmarks: loaded once, a score per benchmark, the model left in training mode."""
    load = E.load_benchmark
    monkeypatch.setattr(E, "load_benchmark", lambda name, limit: load(name, [str(mmstar / "mmstar.parquet")], limit))
    benchmarks = E.Benchmarks("mmstar:4")
    vlm, proc = M.VLM.from_pretrained(ckpt), M.Processor.from_pretrained(ckpt)
    vlm.train()
    scores = benchmarks(vlm, proc, torch.device("cpu"))
    assert list(scores) == ["mmstar"] and 0 <= scores["mmstar"] <= 1 and vlm.training
    with pytest.raises(E.UserError, match="NAME"):
        E.Benchmarks("mmstar:x")
