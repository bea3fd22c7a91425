"""Evaluation: a VLM's greedy answers to a benchmark, scored as the benchmark's reference
evaluation scores them.

    python evaluation.py --model out --benchmark mmstar [--limit N] [--batch_size B] [--output results.json]
    python evaluation.py --model out --benchmark jsonl --data_files data/synthetic/test.jsonl
    python evaluation.py --benchmark textvqa --predictions answers.jsonl     # score answers, no model
    python evaluation.py --model out --benchmark docvqa --data_files 'docvqa/*.parquet'   # offline copy

BENCHMARKS holds one entry per benchmark: the hub dataset lmms-eval reads, its split and columns,
the prompt, the metric. --data_files reads the same columns from local parquet/arrow files.
Metrics: multiple choice (the letter read from free text: "B", "(B)", "The answer is B.", the
option's text), VQA accuracy (the official answer normalisation, mean over the 10 leave-one-out
sets of min(matches / 3, 1)), ANLS (threshold 0.5), relaxed accuracy (5% for numbers), OCRBench's
answer-in-prediction, COCO's CIDEr-D and BLEU-4 (pycocoevalcap's scorers), and exact match per
type on our JSONL splits. --limit N takes N questions spread evenly over the benchmark (they are
often sorted by category). Results: score (0-1; CIDEr-D is 0-10), metric, per_category, n.

train.py uses final_evaluation (its test split, at the end) and Benchmarks (--eval_benchmarks
mmstar:200,textvqa:200, at each evaluation).
"""
import json
import os
import re
import string
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import cli

cli.openmp_wait(decoding=True)
import torch  # noqa: E402

import sources  # noqa: E402
from checkpoint import UserError, atomic_write  # noqa: E402

LETTERS = "ABCDEFGHIJ"
CHOOSE = "\nAnswer with the option's letter from the given choices directly."
SHORT = "\nAnswer the question using a single word or phrase."


@dataclass(frozen=True)
class Spec:
    """One benchmark: where its questions are, how they are asked, how answers are scored."""
    hub: str                # the dataset lmms-eval reads: hub id, subset, split
    subset: str | None
    split: str
    prompt: str             # the user turn: str.format of the row's columns, {options} and {context}
    answer: str             # column of the reference answer(s); for multiple choice the letter or option index
    metric: str             # a key of METRICS
    id: str | None = None   # question id column (None: the row number)
    category: str | None = None   # per_category groups
    average: str | None = None    # the score is the mean over this column's groups (else over questions)
    options: str | None = None    # multiple choice: the options (a list, or text "A: x, B: y" as MMStar's question)
    context: str | None = None    # a column shown first as "Context: ..." where not empty (ScienceQA's hint)
    image: str = "image"
    max_new_tokens: int = 16


BENCHMARKS = {
    "mmstar": Spec("Lin-Chen/MMStar", None, "val", "{question}" + CHOOSE[:-1], "answer", "accuracy", id="index",
                   category="category", average="l2_category", options="question"),
    "scienceqa_img": Spec("lmms-lab/ScienceQA", "ScienceQA-IMG", "test", "{context}{question}\n{options}" + CHOOSE,
                          "answer", "accuracy", category="subject", options="choices", context="hint"),
    "ai2d": Spec("lmms-lab/ai2d", None, "test", "{question}\n{options}" + CHOOSE, "answer", "accuracy", options="options"),
    "textvqa": Spec("lmms-lab/textvqa", None, "validation", "{question}" + SHORT, "answers", "vqa_accuracy",
                    id="question_id"),
    "vqav2": Spec("lmms-lab/VQAv2", None, "validation", "{question}" + SHORT, "answers", "vqa_accuracy",
                  id="question_id", category="answer_type"),
    "docvqa": Spec("lmms-lab/DocVQA", "DocVQA", "validation", "{question}" + SHORT, "answers", "anls", id="questionId",
                   max_new_tokens=32),
    "infovqa": Spec("lmms-lab/DocVQA", "InfographicVQA", "validation", "{question}" + SHORT, "answers", "anls",
                    id="questionId", max_new_tokens=32),
    "chartqa": Spec("lmms-lab/ChartQA", None, "test", "{question}" + SHORT, "answer", "relaxed_accuracy",
                    category="type"),
    "ocrbench": Spec("echo840/OCRBench", None, "test", "{question}", "answer", "ocrbench_accuracy",
                     category="question_type", max_new_tokens=64),
    "coco_captions": Spec("lmms-lab/COCO-Caption2017", None, "val", "Provide a one-sentence caption for the provided image.",
                          "answer", "cider", id="question_id", max_new_tokens=64),
    # our own splits (prepare_data.py's JSONL): the record's chat, exact match, the mean over question types
    "jsonl": Spec("", None, "", "", "", "exact_match", category="type", average="type"),
}


# ----------------------------------------------------------------------------- answers read from free text

def normalize(text):
    """Exact match up to case, whitespace and a final period."""
    return " ".join(text.lower().split()).rstrip(".")


def choice(prediction, options):
    """The letter a free-form answer picks among len(options) choices, or None: "B", "(B)",
    "B. text", "The answer is B", an option's text, or one parenthesised letter anywhere."""
    letters, text = LETTERS[:len(options)], prediction.strip()
    found = (re.match(r"\(?([A-Z])(?:$|[).:,]|\s+(?![a-z]))", text)  # a leading letter, not the article "A cat"
             or re.search(r"(?i:answer|option)(?:\s+is)?[\s:]*\(?([A-Z])(?![A-Za-z])", text))
    if found and found.group(1) in letters:
        return found.group(1)
    words = [normalize(re.sub(r"[^\w\s]", " ", o)) for o in options]
    said = normalize(re.sub(r"[^\w\s]", " ", text))
    hits = [k for k, w in enumerate(words) if w and (w == said or re.search(rf"\b{re.escape(w)}\b", said))]
    exact = [k for k in hits if words[k] == said]
    if exact or len(hits) == 1:
        return letters[(exact or hits)[0]]
    marked = set(re.findall(r"\(([A-Z])\)", text)) & set(letters)
    return marked.pop() if len(marked) == 1 else None


def parse_options(text):
    """MMStar keeps the options in the question: "...\\nOptions: A: 10, B: 20, C: 30" -> ["10", "20", "30"]."""
    m = re.search(r"Options:\s*(.*)$", text, re.S)
    parts = re.split(r"(?:^|,\s*)([A-J]):\s*", m.group(1).strip()) if m else []
    return [p.strip() for p in parts[2::2]]


# ----------------------------------------------------------------------------- metrics

# The VQA answer processor of the official evaluation (EvalAI's, which lmms-eval copies): number
# words to digits, articles dropped, contractions restored, punctuation removed or made a space.
CONTRACTIONS = dict(pair.split("=") for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've couldnt've=couldn't've
didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've hadn'tve=hadn't've hasnt=hasn't
havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd howll=how'll hows=how's Id've=I'd've
I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am
mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at
shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't
shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've
somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd someoned've=someone'd've
someone'dve=someone'd've someonell=someone'll someones=someone's somethingd=something'd somethingd've=something'd've
something'dve=something'd've somethingll=something'll thats=that's thered=there'd thered've=there'd've
there'dve=there'd've therere=there're theres=there's theyd=they'd theyd've=they'd've they'dve=they'd've
theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've
werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's whered=where'd wheres=where's
whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's whove=who've whyll=why'll
whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've wouldn'tve=wouldn't've
yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've
youd=you'd youd've=you'd've you'dve=you'd've youll=you'll youre=you're youve=you've""".split())
NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())} | {"none": "0"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
COMMA_STRIP = re.compile(r"(?<=\d)(,)+(?=\d)")
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # (sic: the reference's lookbehind is a lookahead; kept for equal scores)


def vqa_normalize(text):
    text = " ".join(text.lower().replace(",", "").replace("?", "").replace("'s", " 's").split())
    grouped, out = COMMA_STRIP.search(text) is not None, text
    for p in PUNCTUATION:  # (as the reference: a mark next to a space, or any with comma-grouped digits, goes)
        out = out.replace(p, "" if grouped or p + " " in text or " " + p in text else " ")
    words = [NUMBERS.get(w, w) for w in PERIOD_STRIP.sub("", out).split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def vqa_accuracy(prediction, answers):
    """The mean over the leave-one-out subsets of the answers of min(#matches / 3, 1)."""
    p, refs = vqa_normalize(prediction), [vqa_normalize(a) for a in answers]
    return mean(min(1.0, sum(r == p for r in refs[:i] + refs[i + 1:]) / 3) for i in range(len(refs)))


def levenshtein(a, b):
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def anls(prediction, answers, threshold=0.5):
    """Average normalised Levenshtein similarity (DocVQA): the best over the answers of 1 - NL,
    NL = edit distance / the longer length, and 0 where NL >= threshold."""
    p = " ".join(prediction.lower().split())
    nls = [levenshtein(a, p) / max(len(a), len(p), 1) for a in (" ".join(a.lower().split()) for a in answers)]
    return max((1 - nl for nl in nls if nl < threshold), default=0.0)


def relaxed_accuracy(prediction, answer, tolerance=0.05):
    """ChartQA: a number within 5% of a numeric answer (50% = 0.5), else exact match up to case."""
    def number(text):
        try:
            return float(text.rstrip("%")) / 100 if text.endswith("%") else float(text)
        except ValueError:
            return None
    p, a = number(prediction), number(answer)
    if p is not None and a:
        return float(abs(p - a) / abs(a) <= tolerance)
    return float(prediction.lower() == answer.lower())


def ocrbench_accuracy(prediction, answers, handwritten_math=False):
    """OCRBench: an answer found in the prediction (lower-cased; spaces ignored for its handwritten maths)."""
    def clean(t):
        t = t.strip().replace("\n", " ")
        return t.replace(" ", "") if handwritten_math else t.lower()
    return float(any(clean(a) in clean(prediction.lower()) for a in answers))


PTB_PUNCTUATION = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"'}
PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}


def caption_tokens(text):
    """What coco-caption's PTBTokenizer (Stanford CoreNLP, in Java) makes of a caption, without
    Java: lower case, clitics split off ("dog's" -> "dog 's", "don't" -> "do n't"), abbreviations
    kept ("p.m."), punctuation dropped; brackets stay as -lrb- and the like, as they do there."""
    text = re.sub(r"(\w)(n't)\b", r"\1 \2", text.lower())
    text = re.sub(r"(\w)('s|'re|'ve|'ll|'d|'m)\b", r"\1 \2", text)
    tokens = re.findall(r"n't|'\w+|\w+(?:\.\w+)+\.|\w+(?:[-./,':]\w+)*|\.\.\.|--|\S", text)
    return " ".join(PTB_BRACKETS.get(t, t) for t in tokens if t not in PTB_PUNCTUATION)


def caption_scores(predictions, samples):
    """CIDEr-D (per image and the corpus mean) and corpus BLEU-4 from pycocoevalcap's scorers."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        raise UserError("caption metrics need pycocoevalcap: pip install pycocoevalcap") from None
    refs = {i: [caption_tokens(a) for a in s["answers"]] for i, s in enumerate(samples)}
    hyps = {i: [caption_tokens(p)] for i, p in enumerate(predictions)}
    if not refs:
        return [], {}
    _, cider = Cider().compute_score(refs, hyps)
    bleu, _ = Bleu(4).compute_score(refs, hyps, verbose=0)
    return [float(c) for c in cider], {"bleu4": bleu[3]}


def per_question(score):
    return lambda predictions, samples: ([float(score(p, s)) for p, s in zip(predictions, samples)], {})


# name -> (predictions, samples) -> (a score per question, corpus-level extras)
METRICS = {
    "accuracy": per_question(lambda p, s: choice(p, s["options"]) == s["answers"][0]),
    "vqa_accuracy": per_question(lambda p, s: vqa_accuracy(p, s["answers"])),
    "anls": per_question(lambda p, s: anls(p, s["answers"])),
    "relaxed_accuracy": per_question(lambda p, s: relaxed_accuracy(p, s["answers"][0])),
    "ocrbench_accuracy": per_question(lambda p, s: ocrbench_accuracy(p, s["answers"], s["fields"].get("dataset") == "HME100k")),
    "cider": caption_scores,
    "exact_match": per_question(lambda p, s: normalize(p) == normalize(s["answers"][0])),
}


def mean(values):
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def score(spec, samples, predictions):
    """-> (results, the score of each question; None where it was not answered: an unreadable image)."""
    answered = [(s, p.strip()) for s, p in zip(samples, predictions) if p is not None]
    scores, extra = METRICS[spec.metric]([p for _, p in answered], [s for s, _ in answered])

    def by(key):
        groups = {}
        for (s, _), x in zip(answered, scores):
            groups.setdefault(s[key], []).append(x)
        return {k: mean(v) for k, v in sorted(groups.items(), key=lambda kv: str(kv[0]))}
    results = {"metric": spec.metric, "score": mean(by("group").values()) if spec.average else mean(scores),
               "per_category": by("category") if spec.category else None, "n": len(answered),
               "unreadable_images": len(samples) - len(answered), **extra}
    it = iter(scores)
    return results, [None if p is None else next(it) for p in predictions]


# ----------------------------------------------------------------------------- benchmark questions

class RowImages:
    """A question's images, read from the dataset when it is answered: a benchmark's images need
    not fit in memory, and scoring given predictions reads none."""

    def __init__(self, table, row):
        self.table, self.row = table, row

    def __iter__(self):
        value = self.table[self.row].column(0)[0].as_py()
        return iter([] if value is None else sources.image_refs(value, None))


def samples_of(spec, ds, rows):
    """Rows of a benchmark -> questions: {"id", "messages", "images", "answers", "options",
    "category", "group", "fields" (the row's other columns)}."""
    images = ds.select_columns([spec.image]).with_format("arrow")
    out = []
    for n, row in zip(rows, ds.remove_columns(spec.image).select(rows).with_format("arrow")[:].to_pylist()):
        fields = dict(row)
        options = None
        if spec.options:
            given = row[spec.options]
            options = parse_options(given) if isinstance(given, str) else [str(o) for o in given]
            fields["options"] = "\n".join(f"{LETTERS[k]}. {o}" for k, o in enumerate(options))
        if spec.context:
            fields["context"] = f"Context: {row[spec.context]}\n" if row[spec.context] else ""
        answer = row[spec.answer]
        answers = [a["answer"] if isinstance(a, dict) else str(a) for a in (answer if isinstance(answer, list) else [answer])]
        if options is not None and answers[0].isdigit():  # an option's index (ScienceQA, AI2D) -> its letter
            answers = [LETTERS[int(answers[0])]]
        out.append({"id": row[spec.id] if spec.id else n, "images": RowImages(images, n),
                    "messages": [{"role": "user", "content": spec.prompt.format(**fields)}], "answers": answers,
                    "options": options, "category": row.get(spec.category), "group": row.get(spec.average), "fields": fields})
    return out


def jsonl_samples(records):
    """Records of a JSONL split -> questions: the chat up to its last answer, which is the reference."""
    return [{"id": n, "images": r["images"], "messages": r["messages"][:-1], "answers": [r["messages"][-1]["content"]],
             "options": None, "category": r.get("type", ""), "group": r.get("type", ""), "fields": {}}
            for n, r in enumerate(records)]


def spread(n, limit):
    """limit row numbers spread evenly over n rows (all of them without a limit)."""
    return list(range(n)) if not limit or limit >= n else [k * n // limit for k in range(limit)]


def load_benchmark(name, data_files=(), limit=0):
    """-> (spec, questions, where they came from, the dataset's hub revision or None)."""
    if name not in BENCHMARKS:
        raise UserError(f"unknown benchmark {name!r} (one of {', '.join(BENCHMARKS)})")
    spec = BENCHMARKS[name]
    if name == "jsonl":
        if not data_files:
            raise UserError("--benchmark jsonl needs --data_files SPLIT.jsonl")
        records = []
        for f in data_files:
            if not f.endswith(".jsonl") or not os.path.isfile(f):
                raise UserError(f"{f}: not a .jsonl file")
            records += sources.load_split(os.path.dirname(f) or ".", os.path.basename(f)[:-len(".jsonl")])
        samples = jsonl_samples(records)
        return spec, [samples[i] for i in spread(len(samples), limit)], list(data_files), None
    if data_files:
        files = [f for spec_ in data_files for f in sources.data_files(spec_)]
        if not files:
            raise UserError(f"{' '.join(data_files)}: no .parquet or .arrow files")
        fmt = "parquet" if files[0].endswith(".parquet") else "arrow"
        ds = sources.load_hf(files[0], lambda datasets: datasets.load_dataset(fmt, data_files=files, split="train"),
                             progress=False)
        where, revision = files, None
    else:
        ds = sources.load_hf(spec.hub, lambda datasets: datasets.load_dataset(spec.hub, spec.subset, split=spec.split),
                             progress=False)
        where, revision = spec.hub, hub_revision(spec.hub)
    needed = [c for c in (spec.image, spec.answer, spec.id, spec.category, spec.average, spec.options, spec.context) if c]
    needed += [f for _, f, _, _ in string.Formatter().parse(spec.prompt) if f and f not in ("options", "context")]
    missing = [c for c in dict.fromkeys(needed) if c not in ds.column_names]
    if missing:
        raise UserError(f"{where if isinstance(where, str) else where[0]}: no column {', '.join(map(repr, missing))} "
                        f"for {name} (columns: {', '.join(ds.column_names)})")
    return spec, samples_of(spec, ds, spread(len(ds), limit)), where, revision


def hub_revision(hub_id):
    try:
        from huggingface_hub import HfApi
        return HfApi().dataset_info(hub_id, timeout=10).sha
    except Exception:  # offline, or the hub's answer changed shape: the revision is unknown, not an error
        return None


# ----------------------------------------------------------------------------- answering

@torch.no_grad()
def answer(vlm, processor, samples, device, autocast=nullcontext(), batch_size=64, max_new_tokens=16, progress=True):
    """Greedy answers to the questions, in their order; None where an image does not load.
    progress: a progress bar on a terminal."""
    from tqdm import tqdm
    was_training = vlm.training
    vlm.eval()
    tok, stop = processor.tokenizer, processor.stop_ids
    # the same questions in one batch: a batch decodes until its longest answer is done, so long
    # answers (captions) are best kept together (docs/experiments.md: about half the time)
    order = sorted(range(len(samples)), key=lambda i: str(samples[i]["messages"]))
    answers = [None] * len(samples)
    with tqdm(total=len(samples), desc="evaluating", unit="question", disable=None if progress else True, dynamic_ncols=True) as bar:
        for start in range(0, len(order), batch_size):
            prompts, images, kept = [], [], []
            for i in order[start:start + batch_size]:
                try:
                    imgs = [processor.load_image(sources.image_input(x)) for x in samples[i]["images"]]
                    prompts.append(processor.chat_prompt(samples[i]["messages"], len(imgs)))
                except UserError:  # an unreadable image (or image tokens in the text): not scored, counted
                    continue
                images.append(imgs)
                kept.append(i)
            if kept:
                batch = {k: v.to(device) for k, v in processor(prompts, images).items() if v is not None}
                # compiled blocks run eagerly here: compiling the cached decoding path (new shapes for the
                # prefill and the one-token steps) costs more than it saves in one pass over a split
                with autocast, torch.compiler.set_stance("force_eager"):
                    out = vlm.generate(**batch, max_new_tokens=max_new_tokens, eos_token_id=stop)
                for i, ids in zip(kept, out.tolist()):
                    answers[i] = tok.decode([t for t in ids if t not in stop], skip_special_tokens=True)
            bar.update(len(order[start:start + batch_size]))
    vlm.train(was_training)
    return answers


def answer_room(processor, samples):
    """New tokens enough for the longest reference answer (our JSONL splits: exact match)."""
    return max((len(processor.tokenizer.encode(s["answers"][0], add_special_tokens=False)) for s in samples), default=0) + 2


def final_evaluation(vlm, processor, records, device, autocast=nullcontext(), batch_size=64):
    """Greedy-decode the answer to each record's last question and compare it with the reference
    (normalize()). -> accuracy (the mean over types, each type counting the same), per type."""
    samples = jsonl_samples(records)
    results, _ = score(BENCHMARKS["jsonl"], samples, answer(vlm, processor, samples, device, autocast, batch_size,
                                                            answer_room(processor, samples), progress=False))
    return {"accuracy": results["score"], "per_type": results["per_category"], "n": results["n"],
            "unreadable_images": results["unreadable_images"]}


class Benchmarks:
    """train.py --eval_benchmarks "mmstar:200,textvqa:200": N questions of each (spread evenly),
    loaded once at the start; calling it scores a model on each -> {name: score}."""

    def __init__(self, text):
        self.sets = []
        for item in (x.strip() for x in text.split(",") if x.strip()):
            name, _, n = item.partition(":")
            if n and not (n.isdigit() and int(n) > 0):
                raise UserError(f"--eval_benchmarks {text!r}: expected NAME[:N],... with N > 0")
            spec, samples, _, _ = load_benchmark(name, limit=int(n or 0))
            self.sets.append((name, spec, samples))

    def __call__(self, vlm, processor, device, autocast=nullcontext()):
        return {name: score(spec, samples, answer(vlm, processor, samples, device, autocast,
                                                  max_new_tokens=spec.max_new_tokens, progress=False))[0]["score"]
                for name, spec, samples in self.sets}


# ----------------------------------------------------------------------------- CLI

def read_predictions(path, samples):
    """A JSONL of {"id", "prediction"} -> the prediction for each question (ids compared as text)."""
    given = {}
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict) or "id" not in row or not isinstance(row.get("prediction"), str):
                        raise ValueError(f"line {n} is not {{\"id\": ..., \"prediction\": \"...\"}}")
                    given[str(row["id"])] = row["prediction"]
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a JSONL of predictions ({e})") from None
    missing = [s["id"] for s in samples if str(s["id"]) not in given]
    if missing:
        raise UserError(f"{path}: no prediction for {len(missing)} of {len(samples)} questions (id {missing[0]!r}, ...)")
    return [given[str(s["id"])] for s in samples]


def parse_args(argv=None):
    p = cli.ArgumentParser(prog="evaluation.py", description=__doc__)
    p.add_argument("--benchmark", required=True, choices=sorted(BENCHMARKS))
    p.add_argument("--model", default="out", help="picoVLM dir (train.py's out/), SmolVLM/Idefics3 dir or hub id")
    p.add_argument("--data_files", nargs="+", metavar="FILE", help="the benchmark from local parquet/arrow files (globs, "
                   "folders) in its hub schema instead of the hub; for jsonl: the split's .jsonl file(s)")
    p.add_argument("--limit", type=int, default=0, help="N questions spread evenly over the benchmark (0: all)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--predictions", metavar="FILE", help='score a JSONL of {"id", "prediction"} lines; no model is loaded')
    p.add_argument("--output", metavar="FILE", help="write the results JSON here too")
    p.add_argument("--samples", metavar="FILE", help="write one JSON line per question: id, prediction, answers, score")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", choices=["auto", *cli.DTYPES], help="autocast precision (auto: as train.py)")
    args = p.parse_args(argv)
    if args.limit < 0:
        p.error("--limit must be >= 0")
    if args.batch_size < 1:
        p.error("--batch_size must be >= 1")
    return args


def run(args):
    spec, samples, where, revision = load_benchmark(args.benchmark, args.data_files or (), args.limit)
    if args.predictions:
        predictions, model = read_predictions(args.predictions, samples), None
    else:
        import model as M
        device = cli.pick_device(args.device)
        dtype = cli.pick_dtype(args.dtype, device)
        try:
            vlm, processor = M.VLM.from_pretrained(args.model), M.Processor.from_pretrained(args.model)
            processor.check_model(vlm.cfg)
        except (OSError, ValueError, KeyError, TypeError) as e:  # CheckpointError is a ValueError
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(msg if msg.startswith(str(args.model)) else f"{args.model}: cannot load ({msg})") from None
        autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
        max_new = answer_room(processor, samples) if args.benchmark == "jsonl" else spec.max_new_tokens
        predictions = answer(vlm.to(device), processor, samples, device, autocast, args.batch_size, max_new)
        model = args.model
    results, scores = score(spec, samples, predictions)
    results = {"benchmark": args.benchmark, **results, "model": model, "dataset": where, "revision": revision,
               "limit": args.limit or None}
    if not results["n"]:  # nothing answered (every image unreadable): JSON has no NaN
        results["score"] = None
    text = json.dumps(results, indent=2, default=str)
    if args.samples:
        atomic_write(args.samples, "".join(json.dumps({"id": s["id"], "prediction": p, "answers": s["answers"], "score": x,
                                                       "category": s["category"]}, default=str) + "\n"
                                           for s, p, x in zip(samples, predictions, scores)))
    if args.output:
        atomic_write(args.output, text + "\n")
    print(text)
    return 0


def main(argv=None):
    args = parse_args(argv)
    return cli.main(lambda: run(args), "evaluation.py")


if __name__ == "__main__":
    sys.exit(main())
