"""Images and text into model inputs: image loading, SmolVLM/Idefics3 tiling, image tokens,
chat prompts and training labels. The model (model.py) only ever sees the tensors made here.

Our own VLMs and SmolVLM use the same scheme: each image is `image_size` square (or split into
such tiles plus a downscaled global view) and appears in the text as image_prompt(...), whose
<image> tokens the VLM replaces by projected vision features.
"""
import functools
import json
import math
import os
import re

import torch

from checkpoint import UserError, atomic_write, read_config, resolve_checkpoint

FAKE_TOKEN, GLOBAL_TOKEN, IMAGE_TOKEN = "<fake_token_around_image>", "<global-img>", "<image>"
MAX_TILES = 6  # rows/cols of image tiles the tokenizer knows: <row_1_col_1> .. <row_6_col_6>
IMAGE_SPECIAL_TOKENS = [FAKE_TOKEN, GLOBAL_TOKEN, IMAGE_TOKEN] + [
    f"<row_{r}_col_{c}>" for r in range(1, MAX_TILES + 1) for c in range(1, MAX_TILES + 1)]
IMAGE_TOKENS_RE = re.compile("|".join(map(re.escape, IMAGE_SPECIAL_TOKENS)))
RESAMPLE = {"lanczos": 1, "bilinear": 2, "bicubic": 3}  # PIL's filter numbers, which transformers' configs use too


def image_prompt(rows, cols, tokens_per_tile):
    """The text that stands for one image (SmolVLM/Idefics3 layout): for a split image every tile
    is tagged with its row/column, then the downscaled global image follows."""
    tile = IMAGE_TOKEN * tokens_per_tile
    text = "".join(f"{FAKE_TOKEN}<row_{r + 1}_col_{c + 1}>{tile}" + ("\n" if c == cols - 1 else "")
                   for r in range(rows) for c in range(cols))
    return text + ("\n" if rows else "") + f"{FAKE_TOKEN}{GLOBAL_TOKEN}{tile}{FAKE_TOKEN}"


def load_image(image, fit=None, resample="bicubic"):
    """A path or PIL image -> upright RGB PIL image, with a one-line error for anything unusable.
    EXIF orientation is applied (phone photos are stored sideways), as transformers' load_image does.
    fit(w, h) -> (w, h): resize to that size. A source at least 4x larger each way first shrinks
    to no less than twice the target: a JPEG decodes at 1/2, 1/4 or 1/8 scale (PIL's draft, only
    where the sides divide, so the aspect ratio stays exact), other images reduce by a whole factor
    (resize's reducing_gap). Huge photos then cost a fraction of the time and memory."""
    from PIL import Image, ImageOps
    if isinstance(image, Image.Image):
        img = image
    else:
        try:
            img = Image.open(image)
            if fit:
                least = 2 * max(fit(*img.size))  # max(fit) does not depend on the orientation
                k = next((k for k in (8, 4, 2) if img.width % k == img.height % k == 0 and min(img.size) >= k * least), 1)
                img.draft(None, (img.width // k, img.height // k))  # a no-op for other formats
            img.load()
        except FileNotFoundError:
            raise UserError(f"{image}: no such file") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise UserError(f"{image}: not a readable image ({e})") from None
    if img.width == 0 or img.height == 0:
        raise UserError(f"{getattr(img, 'filename', image)}: image has 0 pixels")
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I"):  # 16-bit greyscale ("I": PIL's mode for 16-bit PGM): 65535 is white in every image
        import numpy as np
        a = np.clip(np.asarray(img, dtype=np.float64), 0, 65535)
        img = Image.fromarray((a / 257).round().astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")  # composite transparency onto white rather than black
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    img = img.convert("RGB")
    if fit:  # (fit gives the same size for an exact 1/k draft: the aspect ratio is unchanged)
        img = img.resize(fit(*img.size), RESAMPLE[resample], reducing_gap=2.0)
    return img


def check_text(text):
    """Text of a chat turn: it must encode as UTF-8 (a command-line argument of undecodable bytes
    does not), and hold no image tokens, which would be taken for an image's place."""
    if (found := IMAGE_TOKENS_RE.search(text)):
        raise UserError(f"the text contains {found.group()}: image tokens are placed by the processor, one set per image")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError("the text is not valid UTF-8 (it holds bytes that did not decode)") from None


def smolvlm_settings(path):
    """Processor settings from a SmolVLM/Idefics3 directory's preprocessor_config.json and config.json."""
    pre = read_config(os.path.join(path, "preprocessor_config.json"))
    config = read_config(os.path.join(path, "config.json"))
    v = config["vision_config"]
    size, resample = pre.get("max_image_size", {}).get("longest_edge", v["image_size"]), pre.get("resample", 1)
    return {"image_size": size, "tokens_per_image": (size // v["patch_size"]) ** 2 // config.get("scale_factor", 2) ** 2,
            "splitting": pre.get("do_image_splitting", True),
            "longest_edge": pre.get("size", {}).get("longest_edge") if pre.get("do_resize", True) else None,
            "resample": next((name for name, n in RESAMPLE.items() if n == resample), resample),
            "mean": pre.get("image_mean", [0.5] * 3), "std": pre.get("image_std", [0.5] * 3)}


class Processor:
    """Turns images + chat messages into model inputs; knows the tokenizer and image geometry."""

    def __init__(self, tokenizer, image_size, tokens_per_image, splitting=False, longest_edge=None,
                 resample="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), system_prompt=None):
        def positive(x):
            return isinstance(x, int) and not isinstance(x, bool) and x >= 1

        def three(x, least=float("-inf")):
            return isinstance(x, (list, tuple)) and len(x) == 3 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v > least for v in x)
        for name, value, ok, wanted in (  # checked before anything is built from them
                ("image_size", image_size, positive(image_size), "a positive integer"),
                ("tokens_per_image", tokens_per_image, positive(tokens_per_image), "a positive integer"),
                ("splitting", splitting, isinstance(splitting, bool), "true or false"),
                ("longest_edge", longest_edge, longest_edge is None or positive(longest_edge), "null or a positive int"),
                ("resample", resample, isinstance(resample, str) and resample in RESAMPLE, f"one of {', '.join(RESAMPLE)}"),
                ("mean", mean, three(mean), "3 numbers"), ("std", std, three(std, 0), "3 positive numbers"),
                ("system_prompt", system_prompt, system_prompt is None or isinstance(system_prompt, str), "null or text")):
            if not ok:
                raise UserError(f"processor {name} is {value!r}: expected {wanted}")
        vocab = tokenizer.get_vocab()  # (a new dict each call)
        missing = [t for t in IMAGE_SPECIAL_TOKENS if t not in vocab]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing},
                                         replace_extra_special_tokens=False)
        # a checkpoint's auto_map names code of its own, never run here: saving it would make the
        # directories we write (train.py --init_from's out_dir, exports) point at that code
        tokenizer.init_kwargs.pop("auto_map", None)
        self.tokenizer = tokenizer
        self.image_size, self.tokens_per_image = image_size, tokens_per_image
        self.splitting, self.longest_edge = splitting, longest_edge
        self.resample, self.mean, self.std = resample, list(mean), list(std)
        self.system_prompt = system_prompt  # None: the chat template's own default (if any)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    def settings(self):
        return {"image_size": self.image_size, "tokens_per_image": self.tokens_per_image,
                "splitting": self.splitting, "longest_edge": self.longest_edge,
                "resample": self.resample, "mean": self.mean, "std": self.std, "system_prompt": self.system_prompt}

    @property
    def stop_ids(self):
        """Tokens that end an answer: the tokenizer's EOS and, for SmolVLM, <end_of_utterance>."""
        vocab = self.tokenizer.get_vocab()
        return [self.tokenizer.eos_token_id] + [vocab[t] for t in ("<end_of_utterance>",) if t in vocab]

    def save_pretrained(self, path, format="picovlm"):
        """Tokenizer + processor.json (ours), or format="smolvlm": the files transformers'
        SmolVLMProcessor / AutoImageProcessor read."""
        os.makedirs(path, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        if format == "picovlm":
            return atomic_write(os.path.join(path, "processor.json"), json.dumps(self.settings(), indent=2))
        atomic_write(os.path.join(path, "preprocessor_config.json"), json.dumps({
            "image_processor_type": "SmolVLMImageProcessor", "processor_class": "SmolVLMProcessor",
            "do_convert_rgb": True, "do_resize": bool(self.longest_edge), "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "do_pad": True, "image_mean": self.mean, "image_std": self.std,
            "do_image_splitting": self.splitting, "size": {"longest_edge": self.longest_edge or 4 * self.image_size},
            "max_image_size": {"longest_edge": self.image_size},
            "resample": RESAMPLE[self.resample]}, indent=2))
        atomic_write(os.path.join(path, "processor_config.json"), json.dumps({
            "processor_class": "SmolVLMProcessor", "image_seq_len": self.tokens_per_image}, indent=2))

    @classmethod
    def from_pretrained(cls, path):
        """Our directory (processor.json + tokenizer) or a SmolVLM/Idefics3 one. A checkpoint's
        own Python code (an auto_map in tokenizer_config.json) is never run: transformers then
        loads the tokenizer class it names if it has one, else it refuses (one line here)."""
        from transformers import AutoTokenizer, PreTrainedConfig
        path = resolve_checkpoint(path)
        ours = os.path.exists(os.path.join(path, "processor.json"))
        settings = read_config(os.path.join(path, "processor.json")) if ours else smolvlm_settings(path)
        # our config.json is not a transformers config: an empty one keeps AutoTokenizer from reading it
        config = {"config": PreTrainedConfig()} if ours else {}
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, **config)
        except (OSError, ValueError, KeyError, TypeError) as e:
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"{path}: no usable tokenizer ({first_line})") from None
        for name in ("chat_template.jinja", "chat_template.json"):  # SmolVLM keeps it beside the tokenizer
            if os.path.exists(os.path.join(path, name)) and not tokenizer.chat_template:
                text = open(os.path.join(path, name)).read()
                tokenizer.chat_template = json.loads(text)["chat_template"] if name.endswith("json") else text
        try:
            return cls(tokenizer, **settings)
        except (TypeError, UserError) as e:  # TypeError: a setting missing or unknown
            raise UserError(f"{path}: bad processor settings ({e})") from None

    def check_model(self, cfg):
        """A one-line UserError unless this processor makes the inputs a VLM of config `cfg`
        (model.VLMConfig) takes; else the mismatch surfaces mid-run, or not at all."""
        for name, ours, model in (("tokens_per_image", self.tokens_per_image, cfg.image_tokens),
                                  ("image_token_id", self.image_token_id, cfg.image_token_id),
                                  ("image_size", self.image_size, cfg.vision.vit_image_size)):
            if ours != model:
                raise UserError(f"the processor's {name} is {ours} but the model's is {model}")
        if len(self.tokenizer) > cfg.lm.lm_vocab:
            raise UserError(f"the tokenizer has {len(self.tokenizer)} tokens, the model's vocabulary {cfg.lm.lm_vocab}")

    # -- images
    def _resize(self, img, w, h):
        return img.resize((w, h), RESAMPLE[self.resample])

    def _to_tensor(self, img):
        import numpy as np
        x = (np.asarray(img, dtype=np.float32) / 255.0 - np.float32(self.mean)) / np.float32(self.std)
        return torch.from_numpy(x).permute(2, 0, 1)

    def _fit(self, w, h):
        """The size tiles() first resizes a w x h image to. SmolVLM caps the longest edge
        (`longest_edge`, aspect ratio kept, even sides); SigLIP (longest_edge None) resizes
        straight to the square; splitting without a cap starts from the image as it is."""
        if self.longest_edge:
            if w >= h:
                w, h = self.longest_edge, int(self.longest_edge / (w / h))
                h += h % 2
            else:
                w, h = int(self.longest_edge * (w / h)), self.longest_edge
                w += w % 2
            return max(w, 1), max(h, 1)
        return (w, h) if self.splitting else (self.image_size, self.image_size)

    def load_image(self, image):
        """load_image() at the size tiles() starts from: a huge photo is decoded smaller."""
        return load_image(image, self._fit, self.resample)

    def tiles(self, image):
        """-> (list of square PIL tiles, rows, cols); (0, 0) when the image is not split. The image
        is first resized by _fit(); splitting then rounds both sides up to whole tiles, cuts them
        row by row and appends the downscaled global image."""
        img, s = self.load_image(image), self.image_size
        if not self.splitting:
            return [self._resize(img, s, s)], 0, 0
        w, h = img.size
        if w >= h:
            w2 = math.ceil(w / s) * s
            h2 = math.ceil(int(w2 / (w / h)) / s) * s
        else:
            h2 = math.ceil(h / s) * s
            w2 = math.ceil(int(h2 * (w / h)) / s) * s
        img = self._resize(img, w2, h2)
        if w2 <= s and h2 <= s:
            return [img], 0, 0
        rows, cols = h2 // s, w2 // s
        crops = [img.crop((c * s, r * s, (c + 1) * s, (r + 1) * s)) for r in range(rows) for c in range(cols)]
        return crops + [self._resize(img, s, s)], rows, cols

    # -- text
    def chat_prompt(self, messages, n_images=0, add_generation_prompt=True):
        """Chat-template text with one <image> placeholder per image at the start of the first
        user turn. `messages` may be a plain question string; their text goes through check_text()."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if self.system_prompt is not None and messages[0]["role"] != "system":  # train and answer alike
            messages = [{"role": "system", "content": self.system_prompt}] + list(messages)
        messages = [dict(m) for m in messages]
        for m in messages:
            check_text(m["content"])
        first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[first_user]["content"] = IMAGE_TOKEN * n_images + messages[first_user]["content"]
        if "['type']" in (self.tokenizer.chat_template or ""):  # SmolVLM's template wants content parts
            messages = [{"role": m["role"], "content": [{"type": "image"}] * m["content"].count(IMAGE_TOKEN) +
                         [{"type": "text", "text": m["content"].replace(IMAGE_TOKEN, "")}]} for m in messages]
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def expand(self, ids, grids, labels=None):
        """Replace each <image> placeholder id by the tokens of its image's prompt (labels -100
        there); grids: (rows, cols) of each image's tiles, from prepare_images(). -> (ids, labels)."""
        if ids.count(self.image_token_id) != len(grids):
            raise ValueError(f"the text has {ids.count(self.image_token_id)} <image> placeholders "
                             f"but {len(grids)} images were given")
        prompts = iter(self.tokenizer.encode(image_prompt(rows, cols, self.tokens_per_image),
                                             add_special_tokens=False) for rows, cols in grids)
        out_ids, out_labels = [], []
        for t, label in zip(ids, labels or ids):
            seq = next(prompts) if t == self.image_token_id else [t]
            out_ids += seq
            out_labels += [-100] * len(seq) if t == self.image_token_id else [label]
        return out_ids, out_labels

    def prepare_images(self, images):
        """-> (grids: (rows, cols) of each image's tiles, for expand(); pixels: every tile as a
        normalised tensor, in reading order)."""
        tiled = [self.tiles(image) for image in images]
        return tuple(t[1:] for t in tiled), [self._to_tensor(tile) for tiles, _, _ in tiled for tile in tiles]

    def __call__(self, texts, images=None):
        """texts: a string or a list; images: per text a list of images (paths or PIL).
        -> input_ids / attention_mask [B,T] (left padded, for generation) and pixel_values
        [n_tiles, 3, S, S], every tile of every image in reading order."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        images = images or [[] for _ in texts]
        if len(images) and not isinstance(images[0], (list, tuple)):
            images = [images] if len(texts) == 1 else [[i] for i in images]
        ids, pixels = [], []
        for text, imgs in zip(texts, images):
            grids, tiles = self.prepare_images(imgs)
            ids.append(self.expand(self.tokenizer.encode(text, add_special_tokens=False), grids)[0])
            pixels += tiles
        T = max(map(len, ids))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out = {"input_ids": torch.tensor([[pad] * (T - len(i)) + i for i in ids]),
               "attention_mask": torch.tensor([[0] * (T - len(i)) + [1] * len(i) for i in ids])}
        out["pixel_values"] = torch.stack(pixels) if pixels else None
        return out

    def encode_chat(self, messages, images=()):
        """Training sample -> (input_ids, labels, pixel tiles). Labels are -100 except on the
        assistant answers (and their end-of-turn token): the model learns to answer, not to
        predict the question."""
        grids, pixels = self.prepare_images(images)
        ids, labels = self._chat_ids(json.dumps(messages), grids, self.system_prompt)
        return torch.tensor(ids), torch.tensor(labels), pixels

    @functools.lru_cache(maxsize=1 << 16)  # VQA data asks the same questions again and again: tokenize each chat once
    def _chat_ids(self, messages_json, grids, system_prompt):
        """Each turn is tokenized separately, so the question/answer boundary is exact.
        (system_prompt, which chat_prompt reads from self, is here to be part of the cache key.)"""
        messages = json.loads(messages_json)
        ids, labels, shown = [], [], ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self.chat_prompt(messages[:i], len(grids))
            full = self.chat_prompt(messages[:i + 1], len(grids), add_generation_prompt=False)
            if not full.startswith(prompt):
                raise ValueError("the chat template does not render turns as prefixes of each other")
            q = self.tokenizer.encode(prompt[len(shown):], add_special_tokens=False)
            a = self.tokenizer.encode(full[len(prompt):], add_special_tokens=False)
            ids += q + a
            labels += [-100] * len(q) + a
            shown = full
        return self.expand(ids, grids, labels)
