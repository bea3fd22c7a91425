"""Training data where it lies (sources.py, data.py): each schema from datasets saved to disk,
parquet and arrow files with images stored as bytes, mixtures drawn at their weights, unusable
rows skipped and counted, DDP/worker shards covering every record once, streaming resumed at the
right record, and the data-throughput measurement. CPU, no network."""
import io
import itertools
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

import data as D
import sources
from checkpoint import UserError
from conftest import ENV, HERE
from processor import Processor

COLOURS = ["red", "green", "blue", "yellow", "white", "black"]


def image_bytes(colour, size=(40, 30), fmt="PNG"):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, fmt)
    return buf.getvalue()


def cauldron(n, tag="c"):
    """the_cauldron's rows: images + texts [{user, assistant, source}]; answer i is f"{tag}{i}"."""
    import datasets
    features = datasets.Features({"images": datasets.List(datasets.Image()), "texts": datasets.List(
        {"user": datasets.Value("string"), "assistant": datasets.Value("string"), "source": datasets.Value("string")})})
    return datasets.Dataset.from_dict({
        "images": [[{"bytes": image_bytes(COLOURS[i % 6]), "path": None}] for i in range(n)],
        "texts": [[{"user": "What colour is it?", "assistant": f"{tag}{i}", "source": "test"}] for i in range(n)]},
        features=features)


@pytest.fixture(autouse=True)
def datasets_config(tmp_path, monkeypatch):
    """datasets writes its Arrow cache of parquet files here, not in the home directory, and does
    not wait 5 s at the end of each pass over shuffled parquet files (for an Arrow bug with threads)."""
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


@pytest.fixture(scope="module")
def proc(tokenizer):
    return Processor(tokenizer, 32, 4)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """One small dataset per schema and storage: name -> --data_dir spec."""
    import datasets
    d = tmp_path_factory.mktemp("sets")
    cauldron(12).save_to_disk(str(d / "cauldron"))
    llava = datasets.Dataset.from_dict({
        "image": [{"bytes": image_bytes(c, fmt="JPEG"), "path": None} for c in COLOURS],
        "conversations": [[{"from": "human", "value": "<image>\nWhich colour?"}, {"from": "gpt", "value": c}] for c in COLOURS]},
        features=datasets.Features({"image": datasets.Image(), "conversations": datasets.List(
            {"from": datasets.Value("string"), "value": datasets.Value("string")})}))
    llava.to_parquet(str(d / "llava.parquet"))
    chat = datasets.Dataset.from_dict({
        "images": [[{"bytes": image_bytes(c), "path": None}] for c in COLOURS],
        "messages": [[{"role": "user", "content": "Colour?"}, {"role": "assistant", "content": c}] for c in COLOURS]},
        features=datasets.Features({"images": datasets.List(datasets.Image()), "messages": datasets.List(
            {"role": datasets.Value("string"), "content": datasets.Value("string")})}))
    chat.save_to_disk(str(d / "chat-saved"))
    (d / "chat-arrow").mkdir()  # the Arrow file alone: a folder of .arrow files
    shutil.copy(next((d / "chat-saved").glob("*.arrow")), d / "chat-arrow" / "part-0.arrow")
    captions = datasets.Dataset.from_dict({"img": [{"bytes": image_bytes(c), "path": None} for c in COLOURS],
                                           "caption": [f"a {c} square" for c in COLOURS]},
                                          features=datasets.Features({"img": datasets.Image(), "caption": datasets.Value("string")}))
    captions.to_parquet(str(d / "captions.parquet"))
    named = captions.rename_columns({"img": "picture", "caption": "label_text"})
    (d / "named").mkdir()
    named.select(range(3)).to_parquet(str(d / "named" / "train-00000.parquet"))  # a folder with train/validation files
    named.select(range(3, 6)).to_parquet(str(d / "named" / "validation-00000.parquet"))
    return {"cauldron": str(d / "cauldron"), "llava": str(d / "llava.parquet"), "chat-saved": str(d / "chat-saved"),
            "chat-arrow": str(d / "chat-arrow"), "captions": str(d / "captions.parquet"), "named": str(d / "named"),
            "root": str(d)}


# ----------------------------------------------------------------------------- schemas

def test_each_schema_reads_as_chat_records(sets, proc, data):
    """Every schema and storage gives chat records whose images are the stored bytes, and trains."""
    expect = {"cauldron": ("What colour is it?", "c0"), "llava": ("Which colour?", "red"), "chat-saved": ("Colour?", "red"),
              "chat-arrow": ("Colour?", "red"), "captions": (sources.DESCRIBE, "a red square")}
    for name, (question, answer) in expect.items():
        train, val, (test, split) = D.load_data(sets[name], held_out=2)
        r = train[0]
        assert isinstance(train, sources.Table) and r["type"] == sources.source_name(sets[name])
        assert [m["content"] for m in r["messages"]] == [question, answer], name
        assert isinstance(r["images"][0], bytes) and Image.open(io.BytesIO(r["images"][0])).getpixel((0, 0))[0] >= 250
        assert len(val) == min(2, (len(train) + len(val)) // 10) and split == "val" and test is val  # held out from train
        ids, labels, pixels, kind = D.ChatDataset(train, proc, 512)[0]
        assert pixels[0].shape == (3, 32, 32) and (labels != -100).any() and kind == r["type"]
    # plain columns with other names: named by flags; a folder's validation file is the val split
    with pytest.raises(UserError, match="unknown schema"):
        D.load_data(sets["named"])
    train, val, _ = D.load_data(sets["named"], held_out=5, image_column="picture", text_column="label_text")
    assert len(train) == 3 and [r["messages"][1]["content"] for r in val] == [f"a {c} square" for c in COLOURS[3:]]
    with pytest.raises(UserError, match="no image column 'photo'"):
        D.load_data(sets["captions"], image_column="photo")
    # a JSONL folder is read as before: a list of records with absolute image paths, val and test splits
    train, val, (test, split) = D.load_data(data)
    assert isinstance(train, list) and len(train) == 96 and len(val) == 14 and split == "test" and len(test) == 14
    assert train == sources.load_split(data, "train") and os.path.isabs(train[0]["images"][0])


def test_bad_data_dirs_are_one_line(sets, tmp_path):
    """Neither a dataset nor a hub id, a file of another kind, bad weights: a one-line UserError;
    a parquet file is a dataset (not a NotADirectoryError); an unreachable hub id is one line."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    for spec in (str(tmp_path / "empty"), str(tmp_path / "missing"), str(tmp_path / "notes.txt"), "./rel/none"):
        with pytest.raises(UserError, match="no train.jsonl") as e:
            D.load_data(spec)
        assert "\n" not in str(e.value)
    for spec in (f"{sets['llava']}=0", f"{sets['llava']}=x", f"{sets['llava']}=-1,{sets['cauldron']}", ","):
        with pytest.raises(UserError, match="WEIGHT"):
            D.load_data(spec)
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match="cannot load"):
        D.load_data(str(tmp_path / "broken.parquet"))
    code = "import sys, cli, data; sys.exit(cli.main(lambda: data.load_data(sys.argv[1]), 't'))"
    r = subprocess.run([sys.executable, "-c", code, "no-such-org/no-such-set:sub"], capture_output=True, text=True,
                       cwd=HERE, env=dict(ENV, HF_HUB_OFFLINE="1"), timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: no-such-org/no-such-set:sub: cannot load it"), r.stderr
    assert r.stderr.strip().count("\n") == 0
    assert sources.wants_synthetic("data/synthetic-tiny") and not sources.wants_synthetic(str(tmp_path / "empty"))


def test_unusable_rows_are_skipped_and_counted(tmp_path, proc):
    """No image, an image that does not decode, no assistant turn, longer than seq_len: each row
    is a None sample, which collate counts; the usable ones train."""
    import datasets
    good = image_bytes("red")
    rows = [("Q?", "fine", good), ("Q?", "no image", None), ("Q?", "bad image", good[:40]), ("Q?", None, good),
            ("Q?", "long " * 200, good), ("Q?", "also fine", good)]
    conversations = [[{"from": "human", "value": q}] + ([{"from": "gpt", "value": a}] if a else []) for q, a, _ in rows]
    ds = datasets.Dataset.from_dict({"image": [b and {"bytes": b, "path": None} for _, _, b in rows], "conversations": conversations},
                                    features=datasets.Features({"image": datasets.Image(), "conversations": datasets.List(
                                        {"from": datasets.Value("string"), "value": datasets.Value("string")})}))
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    train = D.load_data(str(tmp_path / "rows.parquet"))[0]
    dataset = D.ChatDataset(train, proc, seq_len=128)
    batch = D.collate([dataset[i] for i in range(len(dataset))])
    assert batch["skipped"] == 4 and batch["input_ids"].shape[0] == 2
    assert [r["messages"][-1]["content"] for r in train] == ["fine", "bad image", ("long " * 200).strip(), "also fine"]  # iteration: usable rows


# ----------------------------------------------------------------------------- mixtures and sharding

def test_mixture_draws_each_source_at_its_weight(sets, tmp_path, proc):
    """"a=1,b=3": 3/4 of the draws from b whatever the sizes (11 vs 18 records); within sampling
    error (4000 draws: +-3 sigma = +-0.021), indexed and streamed alike; type weights still act
    within a source; a resumed draw continues the same order."""
    cauldron(20, tag="b").save_to_disk(str(tmp_path / "big"))
    spec = f"{sets['cauldron']}=1,{tmp_path / 'big'}=3"
    train, val, _ = D.load_data(spec, held_out=4)
    assert isinstance(train, sources.Mixture) and len(train) == 11 + 18  # each source holds out up to a tenth
    assert [r["messages"][1]["content"] for r in val] == ["c11", "b18", "b19"]  # interleaved: every source in val[:2]
    weights = D.sample_weights(train, "")
    draws = iter(D.MicroBatches(len(train), 400, 1, 0, 1, seed=0, weights=weights))
    picks = [i for _ in range(10) for i, _ in next(draws)]
    share = sum(i >= 11 for i in picks) / len(picks)
    assert abs(share - 0.75) <= 0.021, share
    # type weights act on the records' types (here: the source names), then the mixture shares hold
    assert D.sample_weights(train, "cauldron=0")[:11].sum() == 0 and D.sample_weights(train, "cauldron=0")[11:].sum() > 0
    resumed = iter(D.MicroBatches(len(train), 4, 1, 0, 1, seed=0, start=8, weights=weights))
    fresh = iter(D.MicroBatches(len(train), 4, 1, 0, 1, seed=0, weights=weights))
    next(fresh), next(fresh)
    assert [next(resumed) for _ in range(3)] == [next(fresh) for _ in range(3)]
    stream = D.ChatStream(D.load_data(spec, streaming=True)[0], proc, 512)
    kinds = [r["type"] for r in itertools.islice(stream.draws(0, 1, {}), 4000)]
    assert abs(kinds.count("big") / 4000 - 0.75) <= 0.021


def test_shards_cover_every_record_once():
    """Indexed: one epoch's draws of all processes cover each record once. Streamed: the slots
    (process x worker) of one pass over a parquet stream cover each row once, whole files per
    slot (2 slots, 3 files) or every n-th row (5 slots)."""
    for world, batch in ((1, 4), (2, 3), (3, 2)):
        per_rank = [iter(D.MicroBatches(12, batch, 1, rank, world, seed=0)) for rank in range(world)]
        seen = [i for _ in range(12 // (batch * world)) for it in per_rank for i, _ in next(it)]
        assert sorted(seen) == list(range(12)), (world, batch)


def test_streamed_slots_cover_every_row_once(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    for k in range(3):
        cauldron(5, tag=f"f{k}-").to_parquet(str(d / f"train-0000{k}-of-00003.parquet"))
    train = D.load_data(str(d), streaming=True)[0][0][0]
    for slots in (1, 2, 5):
        rows = [r["messages"][1]["content"] for slot in range(slots) for r in train.rows(epoch=0, slot=slot, slots=slots)]
        assert sorted(rows) == sorted(f"f{k}-{i}" for k in range(3) for i in range(5)), slots
    # a list or Table streamed: each slot takes every slots-th record of one seeded permutation
    stream = D.ChatStream([(list(range(10)), 1.0)], None, 0)
    firsts = [x for slot in range(2) for x in itertools.islice(stream.records(0, slot, 2), 5)]
    assert sorted(firsts) == list(range(10))


def test_streaming_resumes_at_the_right_record(sets, tmp_path, proc):
    """--streaming --resume: the micro-batches after data position `start` are exactly those an
    uninterrupted run drew next, with 2 DataLoader workers (each serving its own slot) and with 2
    processes; a worker's error reaches the main process as one UserError line."""
    d = tmp_path / "shards"
    d.mkdir()
    for k in range(2):
        cauldron(7, tag=f"s{k}-").to_parquet(str(d / f"train-0000{k}-of-00002.parquet"))
    parts = D.load_data(f"{d}=2,{sets['captions']}=1", streaming=True)[0]
    stream = D.ChatStream(parts, proc, 512, shift=2, seed=3)

    def run(start, n, rank=0, world=1, workers=2):
        it = iter(D.batches(stream, 2, 1, rank, world, 3, start, "", workers))
        return [next(it) for _ in range(n)]
    fresh = run(0, 7)
    resumed = run(3 * 2, 4)  # 3 micro-batches of 2 samples used
    for a, b in zip(fresh[3:], resumed):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    assert len({tuple(b["input_ids"][0].tolist()) for b in fresh}) > 3  # not one record over and over
    for rank in range(2):  # 2 processes: each continues its own slots
        fresh, resumed = run(0, 5, rank, 2), run(2 * 2 * 2, 3, rank, 2)
        assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(fresh[2:], resumed))
    empty = D.ChatStream([([], 1.0)], proc, 512)
    with pytest.raises(UserError, match="no records for data slot 0 of 1"):
        next(iter(D.batches(empty, 2, 1, 0, 1, 0, 0, "", 0)))


# ----------------------------------------------------------------------------- throughput

def test_images_from_bytes_decode_as_from_files(tmp_path, proc):
    """Bytes inside a dataset take processor.load_image's own path (PIL's JPEG draft for big
    photos included): the same pixels as the file."""
    big = Image.radial_gradient("L").resize((2048, 1536)).convert("RGB")
    big.save(tmp_path / "photo.jpg", quality=90)
    raw = (tmp_path / "photo.jpg").read_bytes()
    from_file, from_bytes = proc.prepare_images([str(tmp_path / "photo.jpg")]), proc.prepare_images([sources.image_input(raw)])
    assert from_file[0] == from_bytes[0] and torch.equal(from_file[1][0], from_bytes[1][0])


def test_throughput_measures_the_real_pipeline(tmp_path, tokenizer):
    path = D.photo_parquet(str(tmp_path / "photos.parquet"), n=4)
    record = D.load_data(path)[0][0]
    assert Image.open(io.BytesIO(record["images"][0])).size == (640, 480) and record["images"][0][:2] == b"\xff\xd8"  # JPEG
    assert D.throughput(Processor(tokenizer, 224, 49), path, batch_size=2, rounds=1) > 0
