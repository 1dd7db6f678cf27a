"""
Train an MLLM the LLaVA-1.5 way (SPEC section 5), one plain loop under torchrun:

  torchrun --standalone --nproc_per_node=1 train.py --projector avgpool          # the shapes world, CPU, minutes
  torchrun --nproc_per_node=8 train.py --projector avgpool \\
      --vision_tower openai/clip-vit-large-patch14-336 --llm lmsys/vicuna-7b-v1.5 \\
      --data_path blip_laion_cc_sbu_558k.json --finetune_data_path llava_v1_5_mix665k.json --image_folder DIR

Stage `pretrain` trains the projector on captions, stage `finetune` the projector and LoRA on conversations, `both`
runs one then the other, `onestage` is the PRISM-style ablation (finetune only). With no data named, the embedded
shapes world (SPEC section 8) is generated, its tiny models are built, both stages train, and the held-out
questions are scored. Checkpoints hold what trains plus everything needed to resume exactly.
"""
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm
from transformers import (AutoTokenizer, CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel, LlamaConfig,
                          LlamaForCausalLM)

from data import (CELL_WORDS, COLOURS, IGNORE_INDEX, PLACES, SHAPES, TASKS, LlavaDataset, build_shapes_world,
                  collate, draw_scene, patch_labels, random_scene, text_document)
from model import (CONFIG, WEIGHTS, build_model, load_trainable, parse_projector_options, read_blip2,
                   save_trainable)

# -----------------------------------------------------------------------------
# config


@dataclass
class TrainConfig:
    # model; empty names mean the tiny models of the shapes world
    projector: str = "avgpool"  # linear | avgpool | maxpool | qformer | cabstractor | dabstractor
    num_tokens: int = 0  # M; 0 = the paper's compression (grid halved per side, 576 -> 144), N for linear
    projector_options: str = ""  # build_projector's options, e.g. "num_layers=4,hidden_size=512" for qformer
    qformer_init: str = ""  # BLIP-2 checkpoint (transformers folder, .safetensors or LAVIS .pth) to start qformer from
    vision_tower: str = ""
    llm: str = ""
    # data (LLaVA JSON); none named = the shapes world
    data_path: str = ""  # stage 1 captions, template plain
    finetune_data_path: str = ""  # stage 2 conversations, template vicuna_v1
    image_folder: str = ""
    shapes_root: str = "data/shapes"
    max_length: int = 2048  # after the visual tokens are inserted
    skip_bad_samples: bool = False
    # stages and recipe (SPEC section 5)
    stage: str = "both"  # pretrain | finetune | both | onestage
    pretrained_projector: str = ""  # stage-1 checkpoint to start stage 2 from ("both" sets it)
    pretrain_batch_size: int = 256  # global batch
    pretrain_lr: float = 1e-3
    finetune_batch_size: int = 128
    finetune_lr: float = 2e-4  # LoRA
    finetune_projector_lr: float = 2e-5
    micro_batch_size: int = 16  # per device; accumulation = global batch / (micro batch x world size)
    epochs: int = 1
    finetune_epochs: int = 0  # stage 2's (and onestage's), when it differs from stage 1's; 0 = epochs
    weight_decay: float = 0.0  # 0.1 with --stage onestage, unless given
    warmup_ratio: float = 0.03
    grad_clip: float = 1.0
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    group_by_modality: bool = False  # LLaVA's group_by_modality_length: each micro-batch all-image or all-text
    gradient_checkpointing: bool = False  # recompute the LLM's activations in backward: less memory for 7B
    # run
    out_dir: str = ""  # "" = out/<projector>
    save_every: int = 500  # optimizer steps between checkpoints
    resume: bool = False
    seed: int = 0
    num_workers: int = 2
    evaluate: bool = True  # shapes world: score the held-out questions at the end


# the shapes world trains tiny models on a CPU: its own recipe where the command line names none. 9 visual tokens:
# the 12x12 patch grid pooled to one token per cell of the world's 3x3 layout
SHAPES_RECIPE = dict(num_tokens=9, max_length=256, pretrain_batch_size=16, pretrain_lr=1e-3, finetune_batch_size=16,
                     finetune_lr=1e-3, finetune_projector_lr=1e-3, micro_batch_size=16, epochs=2, finetune_epochs=1,
                     lora_r=128, lora_alpha=256, lora_dropout=0.0, save_every=100, num_workers=0)
# the Q-Former at the tiny LLM's width (the paper's is 768 wide for a 4096-wide LLM); the others are as wide as d_v
SHAPES_PROJECTOR_OPTIONS = dict(qformer="hidden_size=128,num_heads=4,intermediate_size=512")
# the tiny stand-ins for CLIP ViT-L/14-336 and Vicuna-7B (SPEC section 8). Three vision blocks: hidden_states[-2] is
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
# before the shape it must be found by); on the scene written one word per cell (data.cell_notation), each word
# carrying its content and its cell, with the loss on the answers only (document_sample), the words kept sums of a
# colour, a shape and a place (cell_word_factors), it reads what it reads from text one lookup after another, each
# learned suddenly and at a step that varies with the seed: after 4,000 steps at seed 0 colour and existence 99.5%,
# position 92.0%, relative position 85.5%; after 6,000, 100 / 100 / 97.5 / 91.5%, and in seeds 1 and 2 position
# 94-100%, relative position 97.5-100% (README). What it has not learned from text, stage 2 has to learn from images
TINY_LLM_PRETRAIN = dict(steps=6000, batch_size=32, lr=1e-3)
# the documents' kinds, by weight. Every caption asks shape-from-colour ("a red" -> circle) and the place of each
# object, and every description colour-from-shape ("the circle is" -> red: data.description), as English says things
# both ways round; colour and existence questions, the lookups the LLM learned last, get twice a question's share.
# Without descriptions, at 3,000 steps, the LLM read colour / existence from text 100 / 100% at seed 0 but 83.0 /
# 91.0% at seed 1; with them, at 6,000 steps, 100 / 100, 99.5 / 100 and 100 / 100% in seeds 0, 1, 2 (README)
TINY_LLM_MIX = dict(caption=1, description=1, colour=2, shape=1, count=1, existence=2, position=1, relpos=1, mc=1,
                    grounding=1)
TINY_LLM_VERSION = 5  # bump whenever pretrain_language changes, so cached LLMs are rebuilt


def parse_args(cls, argv):
    """`--key value` or `--key=value` for each field of the dataclass; a bare `--flag` sets a bool.
    Returns the config and the set of names given."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values, i = {}, 0
    while i < len(argv):
        key, eq, val = argv[i].partition("=")
        name = key[2:].replace("-", "_")
        if not key.startswith("--") or name not in fields:
            raise SystemExit(f"unknown argument {argv[i]!r}; options: {' '.join('--' + n for n in fields)}")
        kind = type(fields[name].default)
        if not eq:
            bare = i + 1 == len(argv) or argv[i + 1].startswith("--")
            if bare and kind is not bool:
                raise SystemExit(f"--{name} needs a value")
            val, i = ("true", i) if bare else (argv[i + 1], i + 1)
        if kind is bool:
            if val.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise SystemExit(f"--{name} takes true or false, got {val!r}")
            values[name] = val.lower() in ("true", "1", "yes")
        else:
            try:
                values[name] = kind(val)
            except ValueError:
                raise SystemExit(f"--{name} takes a {kind.__name__}, got {val!r}")
        i += 1
    return cls(**values), set(values)


# -----------------------------------------------------------------------------
# distributed setup


def setup_distributed():
    """(rank, world_size, device). Under torchrun: NCCL on CUDA, gloo on CPU; plain `python train.py` runs alone."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        return rank, world, torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return rank, world, torch.device("cpu")


def barrier():
    if dist.is_initialized():
        dist.barrier()


# -----------------------------------------------------------------------------
# the shapes world: data and tiny models


def prepare_shapes(cfg, rank):
    """Generate the world and its tiny models (rank 0; the others wait), and point the config at them (absolute
    paths, so a checkpoint is found from any working directory)."""
    root = cfg.shapes_root = os.path.abspath(cfg.shapes_root)
    vision, llm = os.path.join(root, "models", "vision"), os.path.join(root, "models", "llm")
    if rank == 0:
        world = build_shapes_world(root, seed=cfg.seed)
        build_tiny_models(world, vision, llm, cfg.seed)
    barrier()
    world = build_shapes_world(root, seed=cfg.seed)  # cached: returns the paths
    cfg.vision_tower = cfg.vision_tower or vision
    cfg.llm = cfg.llm or llm
    cfg.data_path, cfg.finetune_data_path = world["pretrain"], world["finetune"]
    cfg.image_folder = world["image_folder"]
    return world


def build_tiny_models(world, vision_dir, llm_dir, seed):
    """A tiny CLIP tower that first learns what is where (the stand-in for CLIP's pretraining; frozen from
    then on) and a tiny Llama that first learns the world's language from text alone (the stand-in for Vicuna's
    pretraining; it never sees an image). Each cached on its own, rebuilt when its settings change."""
    with open(os.path.join(world["root"], "settings.json")) as f:
        world_settings = json.load(f)
    side = TINY_VISION["image_size"]
    settings = dict(vision=TINY_VISION, pretrain=TINY_VISION_PRETRAIN, seed=seed, world=world_settings)
    if not cached(vision_dir, settings):
        torch.manual_seed(seed)
        tower = CLIPVisionModel(CLIPVisionConfig(**TINY_VISION))
        processor = CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
        pretrain_vision(tower, processor, seed, world_settings["max_objects"], **TINY_VISION_PRETRAIN)
        tower.save_pretrained(vision_dir)
        processor.save_pretrained(vision_dir)
        mark_cached(vision_dir, settings)
    settings = dict(llm=TINY_LLM, pretrain=TINY_LLM_PRETRAIN, mix=TINY_LLM_MIX, version=TINY_LLM_VERSION, seed=seed,
                    world=world_settings)
    if not cached(llm_dir, settings):
        tokenizer = AutoTokenizer.from_pretrained(world["tokenizer"])
        torch.manual_seed(seed)  # the same start whether the tower was built in this call or cached
        llm = LlamaForCausalLM(LlamaConfig(**TINY_LLM, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
        pretrain_language(llm, tokenizer, seed, side, world_settings["max_objects"], **TINY_LLM_PRETRAIN)
        check = language_check(llm, tokenizer, seed, side, world_settings["max_objects"])
        print("tiny LLM answering from the scene as cell words (language_check):",
              ", ".join(f"{task} {100 * acc:.1f}%" for task, acc in check.items()))
        llm.save_pretrained(llm_dir)
        tokenizer.save_pretrained(llm_dir)
        with open(os.path.join(llm_dir, "language_check.json"), "w") as f:
            json.dump(check, f)
        mark_cached(llm_dir, settings)


def cached(folder, settings):
    marker = os.path.join(folder, "tiny_settings.json")  # written last: a build cut short is rebuilt
    if os.path.isfile(marker):
        with open(marker) as f:
            return json.load(f) == settings
    return False


def mark_cached(folder, settings):
    with open(os.path.join(folder, "tiny_settings.json"), "w") as f:
        json.dump(settings, f)


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
    """Next-token prediction on the answers of documents of the world's language (data.text_document), from a seed of
    their own: a new scene in cell notation, then its caption, its description or a vicuna_v1 question and answer,
    of kinds drawn by TINY_LLM_MIX. The cell words stay sums of their factors throughout (cell_word_factors), written
    into the embedding table at the end: trained as 189 free words from the same start, the LLM read colour from text
    67.5% of the time after 2,000 steps at seed 0, tied 90.0% (README). -> the loss of each step."""
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
    LLM learned no colour lookup and no existence at seed 0 within 2,000 steps (README)."""
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
    from eval import box_iou, parse_box, vqa_accuracy  # here: eval.py imports this file for parse_args
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


# -----------------------------------------------------------------------------
# optimisation


def lr_factor(step, total, warmup_ratio):
    # linear warmup over the first 3% of the steps, then cosine decay to 0 (SPEC section 5)
    warmup = max(1, math.ceil(total * warmup_ratio))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def stage_recipe(cfg, stage):
    """(data path, template, image mode, global batch, epochs) of a stage (SPEC sections 4 and 5)."""
    if stage == "pretrain":
        return cfg.data_path, "plain", "crop", cfg.pretrain_batch_size, cfg.epochs
    return cfg.finetune_data_path, "vicuna_v1", "pad", cfg.finetune_batch_size, cfg.finetune_epochs or cfg.epochs


def param_groups(model, cfg, stage):
    if stage == "pretrain":
        return [dict(params=list(model.projector.parameters()), lr=cfg.pretrain_lr)]
    lora = [p for n, p in model.llm.named_parameters() if p.requires_grad]
    return [dict(params=list(model.projector.parameters()), lr=cfg.finetune_projector_lr),
            dict(params=lora, lr=cfg.finetune_lr)]


def micro_batches(n, epoch, start, micro, world, rank, micro_per_epoch, seed, has_image=None):
    """The index lists this rank reads in an epoch, from micro-batch `start` on: a seeded permutation cut into
    micro-batches of the global batch, rank r taking every world-th one. Resuming only needs (epoch, start).
    With has_image (one bool per sample), LLaVA's modality grouping: every micro-batch is all-image or all-text, in
    a seeded order; what is left of a modality short of a full micro-batch waits for another epoch."""
    g = torch.Generator().manual_seed(seed + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    if has_image is not None:
        chunks = []
        for group in ([i for i in perm if has_image[i]], [i for i in perm if not has_image[i]]):
            chunks += [group[k:k + micro] for k in range(0, len(group) - micro + 1, micro)]
        perm = [i for c in torch.randperm(len(chunks), generator=g).tolist() for i in chunks[c]]
    return [perm[(k * world + rank) * micro:(k * world + rank + 1) * micro] for k in range(start, micro_per_epoch)]


def full_micro_batches(has_image, micro):
    """How many samples modality grouping can use per epoch: whole micro-batches of each modality."""
    images = sum(has_image)
    return micro * (images // micro + (len(has_image) - images) // micro)


# -----------------------------------------------------------------------------
# checkpoints: written to ckpt.tmp, then swapped in by renames, so a crash never leaves a half-written one


def save_checkpoint(run_dir, model, optimizer, scheduler, step, cfg, stage):
    tmp, final, old = (os.path.join(run_dir, n) for n in ("ckpt.tmp", "ckpt", "ckpt.old"))
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_trainable(model, os.path.join(tmp, WEIGHTS), metadata={"step": str(step)})
    rng = dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
    torch.save(dict(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), step=step, rng=rng),
               os.path.join(tmp, "state.pt"))
    with open(os.path.join(tmp, CONFIG), "w") as f:
        json.dump(dict(dataclasses.asdict(cfg), stage=stage), f, indent=2)
    if os.path.isdir(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(run_dir):
    """The last complete checkpoint of a run, or None. `ckpt.old` is complete when a crash hit between the renames."""
    for name in ("ckpt", "ckpt.old"):
        path = os.path.join(run_dir, name)
        if os.path.isfile(os.path.join(path, "state.pt")):
            return path
    return None


def trim_log(path, stage, step):
    """Drop the log records of `stage` past the checkpoint's step: they will be trained and logged again."""
    if os.path.isfile(path):
        with open(path) as f:
            records = [json.loads(line) for line in f]
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records if r["stage"] != stage or r["step"] <= step)


def load_state(path, model, optimizer, scheduler, device):
    load_trainable(model, os.path.join(path, WEIGHTS))
    state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["cpu"])
    if device.type == "cuda" and state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"]


# -----------------------------------------------------------------------------
# one stage


def train_stage(cfg, stage, run_dir, rank, world, device):
    """Train one stage into run_dir; returns the (unwrapped) model."""
    torch.manual_seed(cfg.seed)
    lora_r = 0 if stage == "pretrain" else cfg.lora_r
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tokenizer, processor = build_model(cfg.vision_tower, cfg.llm, cfg.projector, cfg.num_tokens, lora_r,
                                              cfg.lora_alpha, cfg.lora_dropout, dtype=dtype,
                                              **parse_projector_options(cfg.projector_options))
    cfg.num_tokens = model.num_visual_tokens
    if cfg.qformer_init and not (stage == "finetune" and cfg.pretrained_projector):
        if cfg.projector != "qformer":
            raise ValueError(f"--qformer_init is for --projector qformer, not {cfg.projector}")
        model.projector.load_blip2(read_blip2(cfg.qformer_init), verbose=rank == 0)
    if cfg.gradient_checkpointing:
        model.llm.activation_checkpointing_enable()  # non-reentrant by default
    if stage == "finetune" and cfg.pretrained_projector:
        load_trainable(model, os.path.join(cfg.pretrained_projector, WEIGHTS), prefix="projector.")
    model.to(device)

    data_path, template, image_mode, global_batch, epochs = stage_recipe(cfg, stage)
    dataset = LlavaDataset(data_path, cfg.image_folder, tokenizer, processor, template, image_mode,
                           model.num_visual_tokens, cfg.max_length, skip_bad=cfg.skip_bad_samples)
    if global_batch % (cfg.micro_batch_size * world):
        raise ValueError(f"global batch {global_batch} is not a multiple of micro batch {cfg.micro_batch_size} x "
                         f"{world} processes")
    accum = global_batch // (cfg.micro_batch_size * world)
    image_size = model.vision_tower.config.image_size
    has_image = [bool(r and "image" in r) for r in dataset.records] if cfg.group_by_modality else None
    usable = full_micro_batches(has_image, cfg.micro_batch_size) if has_image else len(dataset)
    steps_per_epoch = usable // global_batch
    total_steps = steps_per_epoch * epochs
    if total_steps == 0:
        raise ValueError(f"{data_path}: {len(dataset)} samples make no full global batch of {global_batch}")

    optimizer = torch.optim.AdamW(param_groups(model, cfg, stage), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, cfg.warmup_ratio))
    step = 0
    ckpt = find_checkpoint(run_dir) if cfg.resume else None
    if ckpt:
        step = load_state(ckpt, model, optimizer, scheduler, device)
        if rank == 0:
            trim_log(os.path.join(run_dir, "log.jsonl"), stage, step)
            print(f"{stage}: resumed from {ckpt} at step {step}/{total_steps}")
    ddp_model = DDP(model) if dist.is_initialized() else model

    def batches(step):  # micro-batches from optimizer step `step` to the end
        for epoch in range(step // steps_per_epoch, epochs):
            start = (step % steps_per_epoch) * accum if epoch == step // steps_per_epoch else 0
            index_lists = micro_batches(len(dataset), epoch, start, cfg.micro_batch_size, world, rank,
                                        steps_per_epoch * accum, cfg.seed, has_image)
            yield from torch.utils.data.DataLoader(
                dataset, batch_sampler=index_lists, num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                collate_fn=lambda b: collate(b, tokenizer.pad_token_id, image_size),
                generator=torch.Generator())  # its own generator: the global RNG stays as resume left it

    log = open(os.path.join(run_dir, "log.jsonl"), "a" if ckpt else "w") if rank == 0 else None
    bar = tqdm(total=total_steps, initial=step, desc=f"{cfg.projector} {stage}", disable=rank != 0)
    it, t0 = batches(step), time.time()
    model.train()
    last_good = None
    while step < total_steps:
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            batch, weight = next(it), 1.0
            if batch is None:  # every sample of this micro-batch was bad and skipped (--skip_bad_samples)
                if not dist.is_initialized():
                    continue
                if last_good is None:
                    raise RuntimeError(f"rank {rank}: no usable sample in its first micro-batch of {stage}")
                batch, weight = last_good, 0.0  # a pass that adds nothing but keeps DDP's all-reduce in step
            last_good = batch
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            if dist.is_initialized():
                ddp_model.require_backward_grad_sync = micro == accum - 1  # all-reduce once per step
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                loss = ddp_model(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                 batch["pixel_values"])[0]
            (loss * weight / accum).backward()
            loss_sum += loss.detach() * weight / accum
        if dist.is_initialized():
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        if not torch.isfinite(loss_sum):
            raise RuntimeError(f"{stage}: loss is {loss_sum.item()} at step {step + 1}; the last good checkpoint "
                               f"is {find_checkpoint(run_dir)}")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if rank == 0:
            record = dict(stage=stage, step=step, loss=round(loss_sum.item(), 5), lr=scheduler.get_last_lr()[-1],
                          grad_norm=round(grad_norm.item(), 4), time=round(time.time() - t0, 2))
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.update()
            bar.set_postfix(loss=f"{record['loss']:.3f}")
        if step % cfg.save_every == 0 or step == total_steps:
            if rank == 0:
                save_checkpoint(run_dir, model, optimizer, scheduler, step, cfg, stage)
            barrier()
    bar.close()
    if log:
        log.close()
    return model.eval(), tokenizer, processor


# -----------------------------------------------------------------------------


def main(argv):
    cfg, given = parse_args(TrainConfig, argv)
    if cfg.stage == "onestage" and "weight_decay" not in given:
        cfg.weight_decay = 0.1  # PRISM's recipe for one stage (paper Table 3); in the config, so it is saved
    rank, world, device = setup_distributed()
    shapes = not cfg.data_path and not cfg.finetune_data_path
    if shapes:
        for k, v in SHAPES_RECIPE.items():
            if k not in given and not (k == "num_tokens" and cfg.projector == "linear"):  # linear keeps all N
                setattr(cfg, k, v)
        if "projector_options" not in given:
            cfg.projector_options = SHAPES_PROJECTOR_OPTIONS.get(cfg.projector, "")
        world_paths = prepare_shapes(cfg, rank)
    cfg.out_dir = cfg.out_dir or os.path.join("out", cfg.projector)
    if rank == 0:
        print(json.dumps(dataclasses.asdict(cfg), indent=2))
    stages = {"both": ["pretrain", "finetune"], "pretrain": ["pretrain"], "finetune": ["finetune"],
              "onestage": ["finetune"]}
    if cfg.stage not in stages:
        raise SystemExit(f"--stage must be one of {', '.join(stages)}, got {cfg.stage!r}")
    for stage in stages[cfg.stage]:
        # stage 1 of a two-stage run lives in out/<projector>/pretrain; the final model in out/<projector>
        run_dir = os.path.join(cfg.out_dir, "pretrain") if stage == "pretrain" and cfg.stage == "both" else cfg.out_dir
        os.makedirs(run_dir, exist_ok=True)
        model, tokenizer, processor = train_stage(cfg, stage, run_dir, rank, world, device)
        if stage == "pretrain":
            cfg.pretrained_projector = os.path.join(run_dir, "ckpt")
    if shapes and cfg.evaluate and rank == 0:
        from eval import evaluate_shapes, format_table  # here: eval.py imports this file for parse_args
        results = evaluate_shapes(model, tokenizer, processor, world_paths["eval_dir"], world_paths["image_folder"],
                                  out_path=os.path.join(cfg.out_dir, "eval.json"))
        print(format_table(results))
    barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
