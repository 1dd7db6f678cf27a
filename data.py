"""
Data the LLaVA-1.5 way: JSON datasets, the two conversation templates (plain for stage 1, vicuna_v1 for stage 2 and
evaluation) with their label masks, image preprocessing, collation. The shapes world (shapes.py) writes its files in
these same formats.
"""
import json
import os

import torch
from PIL import Image

# -----------------------------------------------------------------------------
# constants

IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200  # placeholder id in input_ids; model.py replaces it by the M visual tokens
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
MC_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
GROUNDING_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: {ref}"
TEMPLATES = ("plain", "vicuna_v1")

# -----------------------------------------------------------------------------
# conversations -> token ids and labels (LLaVA-1.5's plain and vicuna_v1 templates)


def check_conversation(conversations, where):
    """Turns alternate human, gpt, ..., gpt with string values."""
    if not isinstance(conversations, list) or not conversations:
        raise ValueError(f"{where}: field 'conversations' must be a non-empty list of turns")
    for k, turn in enumerate(conversations):
        expected = "human" if k % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != expected:
            got = turn.get("from") if isinstance(turn, dict) else turn
            raise ValueError(f"{where}: field 'conversations[{k}].from' must be {expected!r}, got {got!r}")
        if not isinstance(turn.get("value"), str):
            raise ValueError(f"{where}: field 'conversations[{k}].value' must be a string")
        if expected == "gpt" and IMAGE_TOKEN in turn["value"]:
            raise ValueError(f"{where}: field 'conversations[{k}].value' has {IMAGE_TOKEN} in an assistant turn")
    if len(conversations) < 2:
        raise ValueError(f"{where}: conversation has no assistant turn")
    if len(conversations) % 2:
        raise ValueError(f"{where}: field 'conversations' ends with a human turn that has no assistant reply")
    if sum(t["value"].count(IMAGE_TOKEN) for t in conversations) > 1:
        raise ValueError(f"{where}: field 'conversations' has more than one {IMAGE_TOKEN}")


def encode(tokenizer, text):
    """Text -> ids, with each <image> becoming the single id IMAGE_TOKEN_INDEX at its spot."""
    ids = []
    for k, part in enumerate(text.split(IMAGE_TOKEN)):
        if k > 0:
            ids.append(IMAGE_TOKEN_INDEX)
        if part:
            ids += tokenizer.encode(part, add_special_tokens=False)
    return ids


def head_ids(tokenizer, template):
    """What every sequence starts with: bos, then the system prompt for vicuna_v1."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
    ids = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    return ids + (encode(tokenizer, SYSTEM) if template == "vicuna_v1" else [])


def user_ids(tokenizer, human, template):
    """The unsupervised piece before each reply; plain keeps only the image of the human text."""
    if template == "plain":
        return [IMAGE_TOKEN_INDEX] if IMAGE_TOKEN in human else []
    return encode(tokenizer, " USER: " + human + " ASSISTANT:")


def tokenize_conversation(tokenizer, conversations, template, where=""):
    """-> (input_ids, labels); labels are IGNORE_INDEX except on the assistant replies (and their eos / newline)."""
    check_conversation(conversations, where)
    ids = head_ids(tokenizer, template)
    labels = [IGNORE_INDEX] * len(ids)
    turns = conversations[:2] if template == "plain" else conversations
    for human, gpt in zip(turns[0::2], turns[1::2]):
        prompt = user_ids(tokenizer, human["value"], template)
        if template == "plain":  # stage 1: <image> caption "\n"
            reply = tokenizer.encode(gpt["value"] + "\n", add_special_tokens=False)
        else:
            reply = tokenizer.encode(" " + gpt["value"], add_special_tokens=False) + [tokenizer.eos_token_id]
        ids += prompt + reply
        labels += [IGNORE_INDEX] * len(prompt) + reply
    return ids, labels


def prompt_ids(tokenizer, question, template="vicuna_v1"):
    """Generation prompt for one question: the unsupervised prefix of the one-turn conversation."""
    return head_ids(tokenizer, template) + user_ids(tokenizer, question, template)


# -----------------------------------------------------------------------------
# images


def expand2square(img, background):
    """Pad to a square, image centred (LLaVA-1.5's `pad` aspect mode)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), background)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def load_image(path, image_processor, mode):
    """-> FloatTensor [3, H, W]; `pad` for stage 2 and evaluation, `crop` for stage 1, as LLaVA-1.5."""
    if mode not in ("pad", "crop"):
        raise ValueError(f"unknown image mode {mode!r}; choose 'pad' or 'crop'")
    try:
        with Image.open(path) as f:
            img = f.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:  # missing, truncated or not an image
        raise ValueError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
    if mode == "pad":
        img = expand2square(img, tuple(int(m * 255) for m in image_processor.image_mean))
    return image_processor(images=img, return_tensors="pt")["pixel_values"][0]


# -----------------------------------------------------------------------------
# the dataset and its collation


def read_records(json_path):
    """Load a LLaVA JSON list; malformed JSON or records name the file, the record and the field."""
    try:
        with open(json_path) as f:
            records = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(records, list):
        raise ValueError(f"{json_path}: expected a JSON list of records, got {type(records).__name__}")
    return records


def where_of(json_path, i, record):
    rid = record.get("id") if isinstance(record, dict) else None
    return f"{json_path}: record {i} (id {rid})"


def check_record(record, where):
    if not isinstance(record, dict):
        raise ValueError(f"{where}: record must be a JSON object")
    if "conversations" not in record:
        raise ValueError(f"{where}: field 'conversations' is missing")
    check_conversation(record["conversations"], where)
    n_image_tokens = sum(t["value"].count(IMAGE_TOKEN) for t in record["conversations"])
    if "image" in record:
        if not isinstance(record["image"], str):
            raise ValueError(f"{where}: field 'image' must be a string path")
        if n_image_tokens != 1:
            raise ValueError(f"{where}: field 'conversations' needs one {IMAGE_TOKEN} since the record has an image")
    elif n_image_tokens:
        raise ValueError(f"{where}: field 'image' is missing but the conversation has {IMAGE_TOKEN}")


class LlavaDataset(torch.utils.data.Dataset):
    """LLaVA-format samples. With skip_bad=True a bad record is counted in num_skipped (per worker process) and
    comes out as None, which collate drops; otherwise it raises."""

    def __init__(self, json_path, image_folder, tokenizer, image_processor, template, image_mode,
                 num_visual_tokens, max_length, skip_bad=False):
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
        self.json_path, self.image_folder = str(json_path), image_folder
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.template, self.image_mode = template, image_mode
        self.num_visual_tokens, self.max_length = num_visual_tokens, max_length
        self.skip_bad, self.num_skipped = skip_bad, 0
        self.records = read_records(self.json_path)
        for i, record in enumerate(self.records):
            try:
                check_record(record, where_of(self.json_path, i, record))
            except ValueError as e:
                self.skip_or_raise(e)
                self.records[i] = None

    def skip_or_raise(self, error):
        if not self.skip_bad:
            raise error
        self.num_skipped += 1
        print(f"skipped: {error}")

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        if self.records[i] is None:  # counted when loading
            return None
        try:
            return self.sample(i, self.records[i])
        except ValueError as e:
            self.skip_or_raise(e)
            return None

    def sample(self, i, record):
        where = where_of(self.json_path, i, record)
        ids, labels = tokenize_conversation(self.tokenizer, record["conversations"], self.template, where)
        has_image = "image" in record
        # budget counts the M visual tokens that replace the single placeholder id
        budget = self.max_length - (self.num_visual_tokens - 1 if has_image else 0)
        ids, labels = ids[:budget], labels[:budget]
        if has_image and IMAGE_TOKEN_INDEX not in ids:
            raise ValueError(f"{where}: field 'conversations' loses its {IMAGE_TOKEN} to truncation "
                             f"(max_length {self.max_length}, {self.num_visual_tokens} visual tokens)")
        if all(label == IGNORE_INDEX for label in labels):
            raise ValueError(f"{where}: field 'conversations' has no supervised token left after truncation "
                             f"to max_length {self.max_length}")
        pixel_values = None
        if has_image:
            path = os.path.join(self.image_folder, record["image"])
            try:
                pixel_values = load_image(path, self.image_processor, self.image_mode)
            except ValueError as e:
                raise ValueError(f"{where}: field 'image': {e}") from None
        return dict(input_ids=torch.tensor(ids), labels=torch.tensor(labels), pixel_values=pixel_values)


def collate(batch, pad_id, image_size):
    """Right-pad a list of samples; None samples (skipped) are dropped, and an all-None batch gives None."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    B, T = len(batch), max(len(b["input_ids"]) for b in batch)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    pixel_values = torch.zeros(B, 3, image_size, image_size)
    has_image = torch.zeros(B, dtype=torch.bool)
    for k, b in enumerate(batch):
        n = len(b["input_ids"])
        input_ids[k, :n], labels[k, :n], attention_mask[k, :n] = b["input_ids"], b["labels"], 1
        if b["pixel_values"] is not None:
            if tuple(b["pixel_values"].shape) != (3, image_size, image_size):
                raise ValueError(f"pixel_values of shape {tuple(b['pixel_values'].shape)}, "
                                 f"expected (3, {image_size}, {image_size}) from the image processor")
            pixel_values[k], has_image[k] = b["pixel_values"], True
    return dict(input_ids=input_ids, labels=labels, attention_mask=attention_mask,
                pixel_values=pixel_values, has_image=has_image)
