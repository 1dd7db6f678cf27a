"""
Data for the DeCo rebuild: LLaVA-1.5 JSON datasets, the two conversation templates with their label masks, image
preprocessing, collation (SPEC section 4), and the built-in synthetic "shapes" world written in those same formats
(SPEC section 8).
"""
import json
import os
import random
import shutil
import time

import torch
from PIL import Image, ImageDraw

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
# conversations -> token ids and labels (SPEC section 4)


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
    """-> FloatTensor [3, H, W]; `pad` for stage 2 and evaluation, `crop` for stage 1 (SPEC section 4)."""
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
        # budget counts the M visual tokens that replace the single placeholder id (SPEC section 2)
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


# -----------------------------------------------------------------------------
# the shapes world (SPEC section 8)

WORLD_VERSION = 5  # bump whenever the generation below changes, so cached worlds are rebuilt
BACKGROUND = (235, 235, 235)
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30),
           "purple": (150, 60, 190)}
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
TASKS = ("colour", "shape", "count", "existence", "position", "relpos", "mc", "grounding")
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
# one word per cell of the 3x3 layout, the scene written the way the 9 visual tokens show it (row-major, one token
# each): the text stand-in for an image in the tiny LLM's language pretraining (train.py). Each word says what is in
# its cell and which cell it is ("<top_left:red_circle>"), as each visual token does: the tower's features carry the
# patch's row and column. A 3-layer Llama whose words named only the content did not learn from RoPE alone which
# cell a word stood in (position 52% from text at seed 0, README)
PLACES = [p.replace(" ", "_") for p in POSITIONS]
CONTENTS = ["empty"] + [f"{c}_{s}" for c in sorted(COLOURS) for s in SHAPES]
CELL_WORDS = [f"<{place}:{content}>" for place in PLACES for content in CONTENTS]


def random_scene(rng, image_size, max_objects):
    """1..max_objects objects in distinct cells of a 3x3 grid, all shapes and all colours distinct, so that "the
    circle" and "the red object" always name one object. Sorted in row-major cell order."""
    n = rng.randint(1, max_objects)
    cells = sorted(rng.sample(range(9), n))
    shapes, colours = rng.sample(SHAPES, n), rng.sample(sorted(COLOURS), n)
    cell = image_size // 3
    objects = []
    for c, shape, colour in zip(cells, shapes, colours):
        size = rng.randint(cell * 9 // 16, cell * 7 // 8)  # 18..28 px at 96 px
        x0 = (c % 3) * cell + rng.randint(0, cell - size)
        y0 = (c // 3) * cell + rng.randint(0, cell - size)
        box = [round(v / image_size, 2) for v in (x0, y0, x0 + size, y0 + size)]
        objects.append(dict(shape=shape, colour=colour, cell=c, xy=(x0, y0), size=size, box=box))
    return objects


def draw_scene(objects, image_size):
    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in objects:
        (x0, y0), s, fill = o["xy"], o["size"], COLOURS[o["colour"]]
        x1, y1 = x0 + s - 1, y0 + s - 1
        if o["shape"] == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif o["shape"] == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        elif o["shape"] == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        else:  # cross: two bars a third of the size thick
            t = s // 3
            draw.rectangle([x0 + t, y0, x1 - t, y1], fill=fill)
            draw.rectangle([x0, y0 + t, x1, y1 - t], fill=fill)
    return img


def patch_labels(objects, image_size, patch_size):
    """What covers each patch centre: 1 + the index of the object's shape in SHAPES and of its colour in sorted
    COLOURS, 0 for the background. The targets of the tiny tower's pretraining. -> two [G*G] lists, row-major."""
    grid = image_size // patch_size
    shape, colour = [0] * grid * grid, [0] * grid * grid
    for o in objects:
        (x0, y0), s = o["xy"], o["size"]
        for i in range(grid * grid):
            cx, cy = (i % grid + 0.5) * patch_size, (i // grid + 0.5) * patch_size
            if x0 <= cx < x0 + s and y0 <= cy < y0 + s:
                shape[i], colour[i] = 1 + SHAPES.index(o["shape"]), 1 + sorted(COLOURS).index(o["colour"])
    return shape, colour


def listed(parts):
    return (parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]) + "."


def caption(objects):
    return listed([f"a {o['colour']} {o['shape']} at the {POSITIONS[o['cell']]}" for o in objects])


def description(objects):
    """The scene said the other way round, each colour after its shape: "the circle is red and the square is blue."
    Only the tiny LLM's language pretraining reads it (text_document): a caption teaches which shape follows a colour,
    a description which colour follows a shape, the lookup a colour question asks."""
    return listed([f"the {o['shape']} is {o['colour']}" for o in objects])


def cell_notation(objects):
    contents = ["empty"] * 9
    for o in objects:
        contents[o["cell"]] = f"{o['colour']}_{o['shape']}"
    return "".join(f"<{place}:{content}>" for place, content in zip(PLACES, contents))


def box_text(box):
    return "[" + ", ".join(f"{v:.2f}" for v in box) + "]"


# each ask_* -> (question with its SPEC 6 suffix, answer[, box]); `yes` picks the answer of the yes/no tasks


def ask_colour(rng, objects, yes):
    o = rng.choice(objects)
    return f"What colour is the {o['shape']}?" + SHORT_ANSWER, o["colour"]


def ask_shape(rng, objects, yes):
    o = rng.choice(objects)
    return f"What shape is the {o['colour']} object?" + SHORT_ANSWER, o["shape"]


def ask_count(rng, objects, yes):
    return "How many shapes are there?" + SHORT_ANSWER, str(len(objects))


def ask_existence(rng, objects, yes):
    """POPE-like: half the negatives adversarial (a present shape in an absent colour or the reverse), half any
    pair not in the image (which may swap the colours of two present objects)."""
    present = {(o["colour"], o["shape"]) for o in objects}
    if yes:
        colour, shape = rng.choice(sorted(present))
    elif rng.random() < 0.5:
        absent_colours = sorted(set(COLOURS) - {c for c, _ in present})
        absent_shapes = sorted(set(SHAPES) - {s for _, s in present})
        o = rng.choice(objects)
        if rng.random() < 0.5:
            colour, shape = rng.choice(absent_colours), o["shape"]
        else:
            colour, shape = o["colour"], rng.choice(absent_shapes)
    else:
        colour, shape = rng.choice([(c, s) for c in sorted(COLOURS) for s in SHAPES if (c, s) not in present])
    return f"Is there a {colour} {shape} in the image?" + SHORT_ANSWER, "Yes" if yes else "No"


def ask_position(rng, objects, yes):
    """The analogue of MME position and SEED instance location (the paper's Table 2): which cell of the 3x3 layout."""
    o = rng.choice(objects)
    return f"Where is the {o['colour']} {o['shape']}?" + SHORT_ANSWER, POSITIONS[o["cell"]]


def ask_relpos(rng, objects, yes):
    """Only pairs in different columns (left) or rows (above); needs two objects."""
    a, b = rng.sample(objects, 2)
    relation = rng.choice(["left", "above"])
    if a["cell"] % 3 == b["cell"] % 3:
        relation = "above"
    elif a["cell"] // 3 == b["cell"] // 3:
        relation = "left"
    key = (lambda o: o["cell"] % 3) if relation == "left" else (lambda o: o["cell"] // 3)
    first, second = (a, b) if key(a) < key(b) else (b, a)
    if not yes:
        first, second = second, first
    words = "to the left of" if relation == "left" else "above"
    q = f"Is the {first['colour']} {first['shape']} {words} the {second['colour']} {second['shape']}?"
    return q + SHORT_ANSWER, "Yes" if yes else "No"


def ask_mc(rng, objects, yes):
    o = rng.choice(objects)
    if rng.random() < 0.5:
        q, right, others = f"What colour is the {o['shape']}?", o["colour"], sorted(COLOURS)
    else:
        q, right, others = f"What shape is the {o['colour']} object?", o["shape"], list(SHAPES)
    options = [right] + rng.sample([x for x in others if x != right], 3)
    rng.shuffle(options)
    q += "".join(f"\n{letter}. {opt}" for letter, opt in zip("ABCD", options))
    return q + MC_SUFFIX, "ABCD"[options.index(right)]


def ask_grounding(rng, objects, yes):
    o = rng.choice(objects)
    return GROUNDING_PROMPT.format(ref=f"the {o['colour']} {o['shape']}"), box_text(o["box"]), o["box"]


ASK = dict(colour=ask_colour, shape=ask_shape, count=ask_count, existence=ask_existence, position=ask_position,
           relpos=ask_relpos, mc=ask_mc, grounding=ask_grounding)


def train_records(rng, objects, name, qa_turns):
    """One pretrain (plain caption), one finetune (vicuna QA turns) and one text-only record for an image: the same
    turns with the scene in cell notation where the image was."""
    rid = name[: -len(".png")]
    cap = caption(objects)
    tasks = [t for t in TASKS if t != "relpos" or len(objects) > 1]
    conversations = []
    for k, task in enumerate(rng.sample(tasks, qa_turns)):
        q, a = ASK[task](rng, objects, rng.random() < 0.5)[:2]
        if k == 0:
            q = q + "\n" + IMAGE_TOKEN if rng.random() < 0.1 else IMAGE_TOKEN + "\n" + q
        conversations += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    pretrain = {"id": rid, "image": name,
                "conversations": [{"from": "human", "value": IMAGE_TOKEN}, {"from": "gpt", "value": cap}]}
    finetune = {"id": rid, "image": name, "conversations": conversations}
    scene = cell_notation(objects)
    text_turns = [dict(t, value=t["value"].replace(IMAGE_TOKEN, scene)) for t in conversations]
    return pretrain, finetune, {"id": "text_" + rid, "conversations": text_turns}


def text_document(rng, image_size, max_objects, task):
    """One document of the tiny LLM's language pretraining (train.py): a new scene in cell notation where the image
    will be, then its caption or its description (task "caption" or "description": stage 1's `plain` layout) or
    one `vicuna_v1` turn with a question of `task` and its answer (stage 2's layout). -> (prompt, answer); the
    document is prompt + answer, and only the answer is supervised, as in stages 1 and 2."""
    objects = random_scene(rng, image_size, max_objects)
    while task == "relpos" and len(objects) < 2:
        objects = random_scene(rng, image_size, max_objects)
    if task in ("caption", "description"):
        return cell_notation(objects), (caption if task == "caption" else description)(objects) + "\n"
    q, a = ASK[task](rng, objects, rng.random() < 0.5)[:2]
    return SYSTEM + " USER: " + cell_notation(objects) + "\n" + q + " ASSISTANT:", " " + a


def eval_records(rng, scenes):
    """One question per image per task; yes/no answers alternate so each file is exactly balanced."""
    out = {task: [] for task in TASKS}
    for name, objects in scenes:
        for task in TASKS:
            if task == "relpos" and len(objects) < 2:
                continue
            q, a, *box = ASK[task](rng, objects, len(out[task]) % 2 == 0)
            record = {"question_id": sum(map(len, out.values())), "image": name, "text": q, "answer": a,
                      "category": task}
            if box:
                record["bbox"] = box[0]
            out[task].append(record)
    return out


def train_tokenizer(texts, vocab_size, path):
    """Byte-level BPE over the world's text, wrapped as a PreTrainedTokenizerFast and saved with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens(CELL_WORDS)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                      pad_token="<pad>", unk_token="<unk>")
    wrapped.save_pretrained(path)


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def build_shapes_world(root, seed=0, n_train=5000, n_eval=300, image_size=96, max_objects=3, qa_turns=6,
                       vocab_size=1024):
    """Write the shapes world under root, deterministically from the seed; reuse it when root/settings.json (written
    last) matches these settings. -> dict of paths."""
    root = os.path.abspath(root)
    paths = dict(root=root, image_folder=os.path.join(root, "images"), pretrain=os.path.join(root, "pretrain.json"),
                 finetune=os.path.join(root, "finetune.json"), text=os.path.join(root, "text.json"),
                 eval_dir=os.path.join(root, "eval"), tokenizer=os.path.join(root, "tokenizer"))
    settings = dict(version=WORLD_VERSION, seed=seed, n_train=n_train, n_eval=n_eval, image_size=image_size,
                    max_objects=max_objects, qa_turns=qa_turns, vocab_size=vocab_size)
    settings_path = os.path.join(root, "settings.json")
    if os.path.exists(settings_path):
        with open(settings_path) as f:
            if json.load(f) == settings:
                return paths
        os.remove(settings_path)
    if not 1 <= max_objects <= len(SHAPES) or not 1 <= qa_turns <= len(TASKS) - 1:
        raise ValueError(f"max_objects must be in 1..{len(SHAPES)} and qa_turns in 1..{len(TASKS) - 1}")
    t0 = time.time()
    for folder in ("images", "eval", "tokenizer"):  # only our own subfolders, never root itself
        shutil.rmtree(os.path.join(root, folder), ignore_errors=True)
        os.makedirs(os.path.join(root, folder))

    rng = random.Random(f"shapes-{seed}-train")  # str seeds are hashed deterministically (sha512)
    pretrain, finetune, text = [], [], []
    for i in range(n_train):
        name = f"train_{i:05d}.png"
        objects = random_scene(rng, image_size, max_objects)
        draw_scene(objects, image_size).save(os.path.join(paths["image_folder"], name))
        for records, record in zip((pretrain, finetune, text), train_records(rng, objects, name, qa_turns)):
            records.append(record)

    rng = random.Random(f"shapes-{seed}-eval")
    scenes = []
    for i in range(n_eval):
        name = f"eval_{i:05d}.png"
        objects = random_scene(rng, image_size, max_objects)
        draw_scene(objects, image_size).save(os.path.join(paths["image_folder"], name))
        scenes.append((name, objects))
    evals = eval_records(rng, scenes)

    write_json(paths["pretrain"], pretrain)
    write_json(paths["finetune"], finetune + text)  # stage 2 mixes in text-only conversations, as LLaVA-1.5 does
    write_json(paths["text"], text)
    for task, records in evals.items():
        with open(os.path.join(paths["eval_dir"], f"{task}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)

    # the pieces exactly as tokenize_conversation cuts them, so the merges fit " USER: ..." and " red"
    texts = [SYSTEM, "0123456789"] + [r["conversations"][1]["value"] + "\n" for r in pretrain]
    # the caption where the image is (the cell words are added whole afterwards, not merged)
    for p, r in zip(pretrain, finetune):
        for t in r["conversations"]:
            value = t["value"].replace(IMAGE_TOKEN, p["conversations"][1]["value"])
            texts.append(" USER: " + value + " ASSISTANT:" if t["from"] == "human" else " " + value)
    train_tokenizer(texts, vocab_size, paths["tokenizer"])

    write_json(settings_path, settings)
    print(f"shapes world: {n_train} train + {n_eval} eval images written to {root} in {time.time() - t0:.1f}s")
    return paths
