"""
The shapes world: the embedded default that runs the whole pipeline on a laptop CPU with nothing to download.

- scenes of one to three coloured shapes in the cells of a 3x3 layout, drawn as PNGs, with captions (stage 1) and
  questions of eight kinds (stage 2 and evaluation), written in LLaVA-1.5's own formats, so that data.py, train.py,
  eval.py and rgae.py run on them unchanged;
- the stand-ins for CLIP ViT-L/14-336 and Vicuna-7B: a tiny CLIP tower and a tiny Llama with its tokenizer, shipped
  in stand_ins/ as Hugging Face folders and loaded through from_pretrained like the real checkpoints, beside
  provenance.json (the command, commit and seed that built them, their language_check scores, each file's sha256).
  A run refuses a folder that does not match it. Their pretraining is here: the tower learns what is where, the LLM
  the world's language from text alone;
- the default run's recipe and its report (scores beside targets and chance levels).

  python shapes.py --stand_ins stand_ins   # rebuild the stand-ins from scratch (~16 min, 2 cores)
"""
import dataclasses
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import (AutoConfig, AutoTokenizer, CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel,
                          LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast)

from config import lr_factor, parse_args
from data import GROUNDING_PROMPT, IGNORE_INDEX, IMAGE_TOKEN, MC_SUFFIX, SHORT_ANSWER, SYSTEM, collate
from eval import HEADLINE, box_iou, parse_box, score_shapes, vqa_accuracy

HERE = os.path.dirname(os.path.abspath(__file__))
STAND_INS = os.path.join(HERE, "stand_ins")  # the shipped tiny CLIP and Vicuna

# -----------------------------------------------------------------------------
# the world: scenes, their texts and questions, the files

WORLD_VERSION = 6  # bump whenever the generation below changes, so cached worlds are rebuilt
BACKGROUND = (235, 235, 235)
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30),
           "purple": (150, 60, 190)}
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
TASKS = ("colour", "shape", "count", "existence", "position", "relpos", "mc", "grounding")
RESERVED_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
# one word per cell of the 3x3 layout, the scene written the way the 9 visual tokens show it (row-major, one token
# each): the text stand-in for an image in the tiny LLM's language pretraining (pretrain_language). Each word says
# what is in its cell and which cell it is ("<top_left:red_circle>"), as each visual token does: the tower's features
# carry the patch's row and column. A 3-layer Llama whose words named only the content did not learn from RoPE alone
# which cell a word stood in (position 52% from text at seed 0, EXPERIMENTS.md)
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


# each ask_* -> (question with LLaVA-1.5's evaluation suffix, answer[, box]); `yes` picks the answer of the yes/no tasks


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
    turns with the scene in cell notation where the image was. The turns ask the colour of every object, the lookup by
    shape that the MLLM learns last from images, and fill the rest with the other tasks, one turn each."""
    rid = name[: -len(".png")]
    cap = caption(objects)
    others = [t for t in TASKS if t != "colour" and (t != "relpos" or len(objects) > 1)]
    asks = [(ask_colour, [o]) for o in objects]
    asks += [(ASK[t], objects) for t in rng.sample(others, qa_turns - len(objects))]
    rng.shuffle(asks)
    conversations = []
    for k, (ask, about) in enumerate(asks):
        q, a = ask(rng, about, rng.random() < 0.5)[:2]
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
    """One document of the tiny LLM's language pretraining (pretrain_language): a new scene in cell notation where the
    image will be, then its caption or its description (task "caption" or "description": stage 1's `plain` layout) or
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



def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def build_shapes_world(root, seed=0, n_train=5000, n_eval=300, image_size=96, max_objects=3, qa_turns=6):
    """Write the shapes world under root, deterministically from the seed; reuse it when root/settings.json (written
    last) matches these settings. -> dict of paths, and the settings."""
    root = os.path.abspath(root)
    paths = dict(root=root, image_folder=os.path.join(root, "images"), pretrain=os.path.join(root, "pretrain.json"),
                 finetune=os.path.join(root, "finetune.json"), text=os.path.join(root, "text.json"),
                 eval_dir=os.path.join(root, "eval"))
    settings = dict(version=WORLD_VERSION, seed=seed, n_train=n_train, n_eval=n_eval, image_size=image_size,
                    max_objects=max_objects, qa_turns=qa_turns)
    settings_path = os.path.join(root, "settings.json")
    if os.path.exists(settings_path):
        with open(settings_path) as f:
            if json.load(f) == settings:
                return dict(paths, settings=settings)
        os.remove(settings_path)
    if not 1 <= max_objects <= len(SHAPES) or not max_objects <= qa_turns <= len(TASKS) - 1:
        raise ValueError(f"max_objects must be in 1..{len(SHAPES)} and qa_turns in max_objects..{len(TASKS) - 1}")
    t0 = time.time()
    for folder in ("images", "eval"):  # only our own subfolders, never root itself
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

    write_json(settings_path, settings)
    print(f"shapes world: {n_train} train + {n_eval} eval images written to {root} in {time.time() - t0:.1f}s")
    return dict(paths, settings=settings)


# -----------------------------------------------------------------------------
# the stand-ins: a tiny CLIP and a tiny Vicuna, pretrained on the world, shipped in stand_ins/

# the tiny stand-ins for CLIP ViT-L/14-336 and Vicuna-7B. Three vision blocks: hidden_states[-2] is
# the second block's output, the features the tower's pretraining shapes (after one block a linear probe read a cell's
# shape from avgpool's cells 88% of the time, after two 96%). initializer_range 0.1, not 0.02: the frozen lm_head of a
# 128-wide model initialised at 0.02 cannot move its logits by more than a few units, and stage 2 stalls on one answer
# per kind
TINY_VISION = dict(image_size=96, patch_size=8, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                   num_attention_heads=4)
# CLIP's patches say what is where; a random tower's do not (after avgpool, a linear probe reads a cell's shape 40% of
# the time). The tiny tower learns it from the world's generator: what covers each patch, and where the patch is
TINY_VISION_PRETRAIN = dict(images=6000, steps=2000, batch_size=32, lr=3e-3)
TINY_LLM = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=512, initializer_range=0.1)
# Vicuna can say which colour goes with which shape, and where a thing is, when the scene is given as text. A tiny
# LLM trained on captions learned shape-from-colour but never colour-from-shape ("a red circle": the colour sits
# before the shape it must be found by); on the scene written one word per cell (cell_notation), each word
# carrying its content and its cell, with the loss on the answers only (document_sample), the words kept sums of a
# colour, a shape and a place (cell_word_factors), it reads what it reads from text one lookup after another, each
# learned suddenly and at a step that varies with the seed: after 4,000 steps at seed 0 colour and existence 99.5%,
# position 92.0%, relative position 85.5%; after 6,000, 100 / 100 / 97.5 / 91.5%, and in seeds 1 and 2 position
# 94-100%, relative position 97.5-100% (EXPERIMENTS.md). What it has not learned from text, stage 2 has to learn
# from images
TINY_LLM_PRETRAIN = dict(steps=6000, batch_size=32, lr=1e-3)
# the documents' kinds, by weight. Every caption asks shape-from-colour ("a red" -> circle) and the place of each
# object, and every description colour-from-shape ("the circle is" -> red: description), as English says things
# both ways round; colour and existence questions, the lookups the LLM learned last, get twice a question's share.
# Without descriptions, at 3,000 steps, the LLM read colour / existence from text 100 / 100% at seed 0 but 83.0 /
# 91.0% at seed 1; with them, at 6,000 steps, 100 / 100, 99.5 / 100 and 100 / 100% in seeds 0, 1, 2
# (EXPERIMENTS.md)
TINY_LLM_MIX = dict(caption=1, description=1, colour=2, shape=1, count=1, existence=2, position=1, relpos=1, mc=1,
                    grounding=1)
VOCAB_SIZE = 1024  # the BPE's merges over the world's text; the 189 cell words come on top
PROVENANCE = "provenance.json"


def pretrain_vision(tower, processor, seed, max_objects, images, steps, batch_size, lr):
    """Each patch's shape, colour, row and column, classified from the features the MLLM reads (hidden_states[-2]), on
    scenes of the world's generator from a seed of their own (no held-out image is seen). -> the loss of each step."""
    config = tower.config
    rng = random.Random(f"shapes-{seed}-tower")
    scenes = [random_scene(rng, config.image_size, max_objects) for _ in range(images)]
    pixels = processor(images=[draw_scene(s, config.image_size) for s in scenes], return_tensors="pt")["pixel_values"]
    labels = [patch_labels(s, config.image_size, config.patch_size) for s in scenes]
    shape, colour = (torch.tensor(t) for t in zip(*labels))  # [images, G*G] each
    grid = config.image_size // config.patch_size
    row, column = torch.arange(grid * grid) // grid, torch.arange(grid * grid) % grid
    sizes = (1 + len(SHAPES), 1 + len(COLOURS), grid, grid)
    head = torch.nn.Linear(config.hidden_size, sum(sizes))
    g = torch.Generator().manual_seed(seed)

    def batch_loss():
        idx = torch.randint(images, (batch_size,), generator=g)
        h = tower(pixel_values=pixels[idx], output_hidden_states=True).hidden_states[-2][:, 1:]  # [B, G*G, d_v]
        targets = (shape[idx], colour[idx], row.expand(batch_size, -1), column.expand(batch_size, -1))
        return sum(F.cross_entropy(logits.flatten(0, 1), y.flatten())
                   for logits, y in zip(head(h).split(sizes, dim=-1), targets))

    params = list(tower.parameters()) + list(head.parameters())
    return short_pretraining(tower, params, steps, lr, "tiny CLIP, what is where", batch_loss)


def cell_word_factors(tokenizer):
    """The 189 cell words as sums of 19 shared factors, one per colour, shape and place and one for an empty cell:
    embedding = C @ factors, (E_colour + E_shape + E_place) / sqrt(3), or (sqrt(2) E_empty + E_place) / sqrt(3). A
    pretrained LLM's "red", "circle" and "top left" mean the same wherever they occur, and the tower's features carry
    the same three factors. -> (token ids [189], C [189, 19])."""
    names = ["empty", *COLOURS, *SHAPES, *PLACES]
    C = torch.zeros(len(CELL_WORDS), len(names))
    for k, word in enumerate(CELL_WORDS):
        place, _, content = word[1:-1].partition(":")
        colour, _, shape = content.partition("_")
        C[k, names.index(place)] = 1
        if content == "empty":
            C[k, 0] = 2 ** 0.5
        else:
            C[k, names.index(colour)] = C[k, names.index(shape)] = 1
    return torch.tensor(tokenizer.convert_tokens_to_ids(CELL_WORDS)), C / 3 ** 0.5


def pretrain_language(llm, tokenizer, seed, image_size, max_objects, steps, batch_size, lr):
    """Next-token prediction on the answers of documents of the world's language (text_document), from a seed of
    their own: a new scene in cell notation, then its caption, its description or a vicuna_v1 question and answer,
    of kinds drawn by TINY_LLM_MIX. The cell words stay sums of their factors throughout (cell_word_factors), written
    into the embedding table at the end: trained as 189 free words from the same start, the LLM read colour from text
    67.5% of the time after 2,000 steps at seed 0, tied 90.0% (EXPERIMENTS.md). -> the loss of each step."""
    rng = random.Random(f"shapes-{seed}-text")
    ids, C = cell_word_factors(tokenizer)
    factors = torch.nn.Parameter(torch.randn(C.shape[1], llm.config.hidden_size) * llm.config.initializer_range)
    word = torch.full((len(tokenizer),), -1)
    word[ids] = torch.arange(len(ids))
    embed = llm.get_input_embeddings()
    mix = {kind: w for kind, w in TINY_LLM_MIX.items() if kind != "relpos" or max_objects > 1}  # relpos needs two

    def batch_loss():
        kinds = rng.choices(list(mix), weights=list(mix.values()), k=batch_size)
        samples = [document_sample(tokenizer, *text_document(rng, image_size, max_objects, kind)) for kind in kinds]
        batch = collate(samples, tokenizer.pad_token_id, 1)
        k = word[batch["input_ids"]]  # [B, T]: which cell word, -1 for any other token
        x = torch.where(k[..., None] >= 0, (C @ factors)[k.clamp(min=0)], embed(batch["input_ids"]))  # [B, T, d]
        return llm(inputs_embeds=x, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    losses = short_pretraining(llm, [*llm.parameters(), factors], steps, lr, "tiny LLM, language only", batch_loss)
    with torch.no_grad():
        embed.weight[ids] = C @ factors
    return losses


def document_sample(tokenizer, prompt, answer):
    """bos and the prompt unsupervised, then the answer and eos supervised: the token layout and the labels stage 2
    gives the same turn. On whole documents (the scene's nine random words and the question in the loss too) the
    LLM learned no colour lookup and no existence at seed 0 within 2,000 steps (EXPERIMENTS.md)."""
    context = [tokenizer.bos_token_id] + tokenizer.encode(prompt, add_special_tokens=False)
    reply = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
    return dict(input_ids=torch.tensor(context + reply), labels=torch.tensor([IGNORE_INDEX] * len(context) + reply),
                pixel_values=None)


def short_pretraining(model, params, steps, lr, desc, batch_loss):
    """The tiny models' own pretraining: AdamW, 3% warmup then cosine, one batch_loss() a step; leaves the model in
    eval mode. -> the loss of each step."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, 0.03))
    model.train()
    losses = []
    for _ in (bar := tqdm(range(steps), desc=desc)):
        loss = batch_loss()
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


@torch.no_grad()
def language_check(llm, tokenizer, seed, image_size, max_objects, n=200):
    """Can the LLM answer from the cell notation? -> per question kind, on n new documents (a seed of their own), how
    often its first answer token is right, or where an answer is several tokens (position, grounding) how often its
    greedy answer is, as eval.py scores it."""
    rng = random.Random(f"shapes-{seed}-text-check")
    out = {}
    for task in (t for t in TASKS if t != "relpos" or max_objects > 1):
        right = 0
        for _ in range(n):
            prompt, answer = text_document(rng, image_size, max_objects, task)
            ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer.encode(prompt, add_special_tokens=False)])
            if task in ("position", "grounding"):
                new = llm.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:]
                text = tokenizer.decode(new, skip_special_tokens=True)
                if task == "position":
                    right += vqa_accuracy(text, [answer.strip()])
                else:
                    box = parse_box(text)
                    right += box is not None and box_iou(box, parse_box(answer)) >= 0.5
            else:
                logits = llm(input_ids=ids, logits_to_keep=1).logits[0, -1]
                right += int(logits.argmax()) == tokenizer.encode(answer, add_special_tokens=False)[0]
        out[task] = right / n
    return out


def tokenizer_texts(world):
    """The world's stage-1 and stage-2 texts, in the pieces data.tokenize_conversation cuts them into, so the BPE
    merges fit " USER: ..." and " red"; the caption stands where the image is (the cell words are added whole)."""
    with open(world["pretrain"]) as f:
        pretrain = json.load(f)
    with open(world["finetune"]) as f:
        finetune = json.load(f)
    texts = [SYSTEM, "0123456789"] + [r["conversations"][1]["value"] + "\n" for r in pretrain]
    for p, r in zip(pretrain, finetune):
        for t in r["conversations"]:
            value = t["value"].replace(IMAGE_TOKEN, p["conversations"][1]["value"])
            texts.append(" USER: " + value + " ASSISTANT:" if t["from"] == "human" else " " + value)
    return texts


def train_tokenizer(texts, vocab_size, path):
    """Byte-level BPE over the world's text, wrapped as a PreTrainedTokenizerFast and saved with save_pretrained."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=RESERVED_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens(CELL_WORDS)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                      pad_token="<pad>", unk_token="<unk>")
    wrapped.save_pretrained(path)


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def git_commit():
    """HEAD, with "-dirty" where tracked files differ from it; "unknown" outside a git checkout."""
    try:
        run = lambda *args: subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True, check=True).stdout
        return run("rev-parse", "HEAD").strip() + ("-dirty" if run("status", "--porcelain", "-uno").strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def build_stand_ins(out, seed=0, world_root="data/shapes", vision_steps=TINY_VISION_PRETRAIN["steps"],
                    language_steps=TINY_LLM_PRETRAIN["steps"], check_n=200, command=""):
    """The tokenizer (BPE over the world's texts, plus the cell words), the tower (pretrain_vision) and the LLM
    (pretrain_language) from scratch, into out/vision and out/llm with out/provenance.json. Built beside out and
    swapped in at the end, so a build cut short leaves the old folder as it was."""
    commit = git_commit()  # now: the code that runs, whatever is edited while it runs
    world = build_shapes_world(world_root, seed=seed)
    image_size, max_objects = world["settings"]["image_size"], world["settings"]["max_objects"]
    if image_size != TINY_VISION["image_size"]:
        raise SystemExit(f"{world_root}: image_size {image_size}, but the stand-in tower takes "
                         f"{TINY_VISION['image_size']}")
    tmp = out.rstrip("/") + ".building"
    shutil.rmtree(tmp, ignore_errors=True)
    vision_dir, llm_dir = os.path.join(tmp, "vision"), os.path.join(tmp, "llm")
    print(f"== tokenizer: byte-level BPE over the texts of {world['root']}")
    train_tokenizer(tokenizer_texts(world), VOCAB_SIZE, llm_dir)
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)

    print(f"== tiny CLIP: what is where, {vision_steps} steps")
    torch.manual_seed(seed)
    tower = CLIPVisionModel(CLIPVisionConfig(**TINY_VISION))
    processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                      crop_size={"height": image_size, "width": image_size})
    pretrain_vision(tower, processor, seed, max_objects, **dict(TINY_VISION_PRETRAIN, steps=vision_steps))
    tower.save_pretrained(vision_dir)
    processor.save_pretrained(vision_dir)

    print(f"== tiny Vicuna: the world's language from text alone, {language_steps} steps")
    torch.manual_seed(seed)
    llm = LlamaForCausalLM(LlamaConfig(**TINY_LLM, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    pretrain_language(llm, tokenizer, seed, image_size, max_objects, **dict(TINY_LLM_PRETRAIN, steps=language_steps))
    llm.save_pretrained(llm_dir)
    check = language_check(llm, tokenizer, seed, image_size, max_objects, n=check_n)
    print("tiny Vicuna answering from the scene as cell words (language_check):",
          ", ".join(f"{task} {100 * acc:.1f}%" for task, acc in check.items()))

    files = sorted(os.path.relpath(os.path.join(d, f), tmp) for d, _, fs in os.walk(tmp) for f in fs)
    provenance = dict(
        command=command or f"python shapes.py --stand_ins {out} --seed {seed}", commit=commit,
        date=time.strftime("%Y-%m-%d"), seed=seed, torch=torch.__version__, transformers=transformers.__version__,
        settings=dict(vision=TINY_VISION, vision_pretrain=dict(TINY_VISION_PRETRAIN, steps=vision_steps),
                      llm=TINY_LLM, llm_pretrain=dict(TINY_LLM_PRETRAIN, steps=language_steps), mix=TINY_LLM_MIX,
                      vocab_size=VOCAB_SIZE, world=world["settings"]),
        language_check=dict(check, n=check_n), sha256={f: sha256(os.path.join(tmp, f)) for f in files})
    with open(os.path.join(tmp, PROVENANCE), "w") as f:
        json.dump(provenance, f, indent=2)
    old = out.rstrip("/") + ".old"
    if os.path.isdir(out):
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    print(f"wrote {out}")
    return provenance


def check_stand_ins(folder, image_size):
    """The stand-ins' files against provenance.json, their configs against the world; a mismatch stops the run with
    one line naming the folder, the field and the command that rebuilds it. Nothing is rebuilt here. -> the
    provenance."""
    shown = os.path.relpath(folder) if not os.path.relpath(folder).startswith("..") else folder
    rebuild = f"rebuild with `python shapes.py --stand_ins {shown}` (~16 min on 2 cores)"
    path = os.path.join(folder, PROVENANCE)
    if not os.path.isfile(path):
        raise SystemExit(f"{folder}: {PROVENANCE} is missing; {rebuild}")
    with open(path) as f:
        provenance = json.load(f)
    for name in provenance["sha256"]:
        if not os.path.isfile(os.path.join(folder, name)):
            raise SystemExit(f"{folder}: {name} is missing; {rebuild}")
    vision = AutoConfig.from_pretrained(os.path.join(folder, "vision"))
    if vision.image_size != image_size:
        raise SystemExit(f"{folder}: vision/config.json image_size is {vision.image_size}, but the world's images are "
                         f"{image_size} px; {rebuild}")
    if image_size % vision.patch_size or (image_size // vision.patch_size) % 3:
        raise SystemExit(f"{folder}: vision/config.json patch_size {vision.patch_size} does not cut the "
                         f"{image_size}-px images into a grid of the world's 3x3 cells; {rebuild}")
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(folder, "llm"))
    missing = [w for w in RESERVED_TOKENS + CELL_WORDS if w not in tokenizer.get_vocab()]
    if missing:
        raise SystemExit(f"{folder}: llm/'s tokenizer lacks the world's word {missing[0]!r}; {rebuild}")
    llm = AutoConfig.from_pretrained(os.path.join(folder, "llm"))
    if llm.vocab_size != len(tokenizer):
        raise SystemExit(f"{folder}: llm/config.json vocab_size is {llm.vocab_size}, but its tokenizer has "
                         f"{len(tokenizer)} tokens; {rebuild}")
    for name, digest in provenance["sha256"].items():
        if sha256(os.path.join(folder, name)) != digest:
            raise SystemExit(f"{folder}: {name} does not match its sha256 in {PROVENANCE}; {rebuild}")
    return provenance


# -----------------------------------------------------------------------------
# the default run: its recipe, its stand-ins, its report

# the shapes world trains tiny models on a CPU: its own recipe where the command line names none. 9 visual tokens:
# the 12x12 patch grid pooled to one token per cell of the world's 3x3 layout. Stage 1 for 2 epochs of the captions,
# stage 2 for 1 epoch of the 10,000 conversations, image and text (EXPERIMENTS.md has what more of either gave)
RECIPE = dict(num_tokens=9, max_length=256, pretrain_batch_size=16, pretrain_lr=1e-3, finetune_batch_size=16,
              finetune_lr=1e-3, finetune_projector_lr=1e-3, micro_batch_size=16, epochs=2, finetune_epochs=1,
              lora_r=128, lora_alpha=256, lora_dropout=0.0, save_every=100, num_workers=0)
# the Q-Former at the tiny LLM's width (the paper's is 768 wide for a 4096-wide LLM); the others are as wide as d_v
PROJECTOR_OPTIONS = dict(qformer="hidden_size=128,num_heads=4,intermediate_size=512")
TARGETS = dict(colour=0.9, shape=0.9, existence=0.9, grounding=0.6)  # what a working default run must reach
ASKS = dict(colour="What colour is the circle?", shape="What shape is the red object?",
            count="How many shapes are there?", existence="Is there a red circle? (POPE-like)",
            position="Where is the red circle? (one of 9 cells)", relpos="Is the red circle above the blue cross?",
            mc="Which of four listed colours or shapes? A letter (SEED-like)",
            grounding="The box of the red circle (RefCOCO-like)")


def apply_recipe(cfg, given):
    """The world's recipe on every field the command line left alone; linear keeps all N patches."""
    for k, v in RECIPE.items():
        if k not in given and not (k == "num_tokens" and cfg.projector == "linear"):
            setattr(cfg, k, v)
    if "projector_options" not in given:
        cfg.projector_options = PROJECTOR_OPTIONS.get(cfg.projector, "")


def use_world(cfg, rank, barrier):
    """Write the world (rank 0; the others wait), check the stand-ins, and point the config at both (absolute paths,
    so a checkpoint is found from any working directory). -> the world's paths, the stand-ins' provenance (None
    where --vision_tower and --llm name other models)."""
    root = cfg.shapes_root = os.path.abspath(cfg.shapes_root)
    if rank == 0:
        print(f"== world: {root}")
        build_shapes_world(root, seed=cfg.seed)
    barrier()
    world = build_shapes_world(root, seed=cfg.seed)  # cached: returns the paths
    provenance = None
    if not (cfg.vision_tower and cfg.llm):
        folder = cfg.stand_ins or STAND_INS
        provenance = check_stand_ins(folder, world["settings"]["image_size"])
        if rank == 0:
            print(f"== stand-ins: {folder} (tiny CLIP and Vicuna, built by `{provenance['command']}` at "
                  f"{provenance['commit'][:7]}; files match provenance.json)")
        cfg.vision_tower = cfg.vision_tower or os.path.join(folder, "vision")
        cfg.llm = cfg.llm or os.path.join(folder, "llm")
    cfg.data_path, cfg.finetune_data_path = world["pretrain"], world["finetune"]
    cfg.image_folder = world["image_folder"]
    return world, provenance


def best_constant(task, records):
    """Chance, as the best score of one answer given to every question (among the right answers that occur)."""
    candidates = sorted({r["answer"] for r in records})
    return max(score_shapes(task, records, [a] * len(records))[HEADLINE[task]] for a in candidates)


def report(results, eval_dir, from_text):
    """The default run's table: each task's score beside its target, its chance level and what the stand-in LLM
    scores given the scene as cell words instead of the image (its language_check)."""
    lines = [f"{'task':<10} {'metric':<10} {'score':>7} {'target':>7} {'chance':>7} {'text':>7}  asks",
             "-" * 104]
    for task, metrics in results.items():
        key = HEADLINE[task]
        with open(os.path.join(eval_dir, f"{task}.jsonl")) as f:
            chance = best_constant(task, [json.loads(line) for line in f])
        target = f">={100 * TARGETS[task]:.0f}%" if task in TARGETS else "-"
        text = f"{100 * from_text[task]:.1f}%" if task in from_text else "-"
        mark = " " if task not in TARGETS else ("*" if metrics[key] >= TARGETS[task] else "!")
        lines.append(f"{task:<10} {key:<10} {100 * metrics[key]:>6.1f}%{mark}{target:>7} {100 * chance:>6.1f}% "
                     f"{text:>7}  {ASKS[task]}")
    return "\n".join(lines + [
        "score: the held-out questions (* target met, ! missed); chance: one answer given to every question;",
        "text: the stand-in LLM given the scene as nine cell words instead of the image (its language_check)"])


# -----------------------------------------------------------------------------


@dataclass
class ShapesConfig:
    stand_ins: str = ""  # rebuild the stand-ins from scratch into this folder (the shipped ones: stand_ins)
    seed: int = 0  # of the world whose texts train the tokenizer, and of the pretraining
    world: str = "data/shapes"  # where that world is written
    vision_steps: int = TINY_VISION_PRETRAIN["steps"]
    language_steps: int = TINY_LLM_PRETRAIN["steps"]
    check_n: int = 200  # documents per kind in the language_check


def main(argv):
    cfg, _ = parse_args(ShapesConfig, argv)
    print(json.dumps(dataclasses.asdict(cfg), indent=2))
    if cfg.stand_ins:
        build_stand_ins(cfg.stand_ins, cfg.seed, cfg.world, cfg.vision_steps, cfg.language_steps, cfg.check_n,
                        command="python shapes.py " + " ".join(argv))
    else:
        raise SystemExit("nothing to do: pass --stand_ins FOLDER")


if __name__ == "__main__":
    main(sys.argv[1:])
