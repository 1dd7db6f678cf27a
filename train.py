"""
Train an MLLM the LLaVA-1.5 way (the paper's section 4.1), one plain loop under torchrun:

  torchrun --standalone --nproc_per_node=1 train.py --projector avgpool          # the shapes world, CPU, minutes
  torchrun --nproc_per_node=8 train.py --projector avgpool \\
      --vision_tower openai/clip-vit-large-patch14-336 --llm lmsys/vicuna-7b-v1.5 \\
      --data_path blip_laion_cc_sbu_558k.json --finetune_data_path llava_v1_5_mix665k.json --image_folder DIR

Stage `pretrain` trains the projector on captions, stage `finetune` the projector and LoRA on conversations, `both`
runs one then the other, `onestage` is the PRISM-style ablation (finetune only). With no data named, the embedded
shapes world (shapes.py) is written, its shipped stand-ins for CLIP and Vicuna are checked and loaded, both stages
train, and the held-out questions are scored. Checkpoints hold what trains plus everything needed to resume exactly.
"""
import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import shapes
from config import lr_factor, parse_args
from data import LlavaDataset, collate
from eval import evaluate_shapes, read_jsonl
from model import (CONFIG, WEIGHTS, build_model, load_trainable, parse_projector_options, read_blip2,
                   save_trainable)

# -----------------------------------------------------------------------------
# config


@dataclass
class TrainConfig:
    # model; empty names mean the shapes world's stand-ins
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
    shapes_root: str = "data/shapes"  # where the shapes world is written
    stand_ins: str = ""  # its tiny CLIP and Vicuna (vision/, llm/, provenance.json); "" = the shipped stand_ins/
    max_length: int = 2048  # after the visual tokens are inserted
    skip_bad_samples: bool = False
    # stages and recipe (the paper's section 4.1, LLaVA-1.5's hyper-parameters)
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
    dtype: str = "auto"  # of the frozen tower and LLM, and of autocast: bfloat16 | float32 | auto (bf16 on CUDA)
    # run
    out_dir: str = ""  # "" = out/<projector>
    save_every: int = 500  # optimizer steps between checkpoints
    resume: bool = False
    seed: int = 0
    num_workers: int = 2
    evaluate: bool = True  # shapes world: score the held-out questions at the end


def resolve_dtype(name, device):
    """--dtype -> "bfloat16" or "float32". Under bf16 the frozen halves are stored in bf16 and the forward runs under
    autocast, while what trains (projector, LoRA) and its optimizer state stay fp32, the master weights."""
    if name == "auto":
        name = "bfloat16" if device.type == "cuda" else "float32"
    if name == "float16":
        raise SystemExit("--dtype float16 needs a loss scaler, which this loop does not have; use --dtype bfloat16")
    if name not in ("bfloat16", "float32"):
        raise SystemExit(f"--dtype must be bfloat16, float32 or auto, got {name!r}")
    if name == "bfloat16" and not (torch.cuda.is_bf16_supported() if device.type == "cuda"
                                   else torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        raise SystemExit(f"--dtype bfloat16: this {device.type.upper()} has no bf16 support; use --dtype float32")
    return name


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
# optimisation


def stage_recipe(cfg, stage):
    """(data path, template, image mode, global batch, epochs) of a stage."""
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
    dtype = getattr(torch, cfg.dtype)
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
            with torch.autocast(device.type, torch.bfloat16, enabled=dtype == torch.bfloat16):
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


STAGES = dict(both=["pretrain", "finetune"], pretrain=["pretrain"], finetune=["finetune"], onestage=["finetune"])
PHASES = dict(pretrain="stage 1, pretrain: the projector alone, on captions (template plain)",
              finetune="stage 2, finetune: the projector and LoRA, on conversations (template vicuna_v1)")


# -----------------------------------------------------------------------------
# the loss curve each run draws (loss.png)

PLOT_COLOURS = ["#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]  # one per curve or bar


def moving_average(values, n):
    return [sum(values[max(0, i - n + 1):i + 1]) / len(values[max(0, i - n + 1):i + 1]) for i in range(len(values))]


def plot_curves(logs, names, path, size=(640, 360), smooth=20):
    """The loss of each log.jsonl against its step, a moving average over `smooth` steps, drawn with pillow."""
    curves = [moving_average([r["loss"] for r in read_jsonl(log, ("loss",))], smooth) for log in logs]
    lo, hi = min(min(c) for c in curves), max(max(c) for c in curves)
    steps = max(len(c) for c in curves)
    W, H, pad = size[0], size[1], 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([pad, 10, W - 10, H - pad], outline="black")
    xy = lambda i, v: (pad + (W - 10 - pad) * i / max(1, steps - 1), H - pad - (H - pad - 10) * (v - lo) / (hi - lo))
    for k, (curve, name) in enumerate(zip(curves, names)):
        colour = PLOT_COLOURS[k % len(PLOT_COLOURS)]
        draw.line([xy(i, v) for i, v in enumerate(curve)], fill=colour, width=2)
        draw.text((W - 250, 16 + 14 * k), f"{name}: {curve[-1]:.3f}", fill=colour)
    draw.text((pad, H - pad + 6), f"step 1 .. {steps}", fill="black")
    draw.text((4, 10), f"{hi:.2f}", fill="black")
    draw.text((4, H - pad - 10), f"{lo:.2f}", fill="black")
    draw.text((pad + 4, H - 16), f"loss, moving average over {smooth} steps", fill="black")
    image.save(path)
    return [c[-1] for c in curves]

# -----------------------------------------------------------------------------
# the command line


def main(argv):
    cfg, given = parse_args(TrainConfig, argv)
    if cfg.stage not in STAGES:
        raise SystemExit(f"--stage must be one of {', '.join(STAGES)}, got {cfg.stage!r}")
    if cfg.stage == "onestage" and "weight_decay" not in given:
        cfg.weight_decay = 0.1  # PRISM's recipe for one stage (paper Table 3); in the config, so it is saved
    rank, world, device = setup_distributed()
    cfg.dtype = resolve_dtype(cfg.dtype, device)
    on_shapes = not cfg.data_path and not cfg.finetune_data_path
    if on_shapes:
        shapes.apply_recipe(cfg, given)
        world_paths, provenance = shapes.use_world(cfg, rank, barrier)
    cfg.out_dir = cfg.out_dir or os.path.join("out", cfg.projector)
    if rank == 0:
        print(json.dumps(dataclasses.asdict(cfg), indent=2))
    run_dirs = []
    for stage in STAGES[cfg.stage]:
        # stage 1 of a two-stage run lives in out/<projector>/pretrain; the final model in out/<projector>
        run_dir = os.path.join(cfg.out_dir, "pretrain") if stage == "pretrain" and cfg.stage == "both" else cfg.out_dir
        os.makedirs(run_dir, exist_ok=True)
        if rank == 0:
            print(f"== {PHASES[stage]}")
        model, tokenizer, processor = train_stage(cfg, stage, run_dir, rank, world, device)
        run_dirs.append(run_dir)
        if stage == "pretrain":
            cfg.pretrained_projector = os.path.join(run_dir, "ckpt")
    if on_shapes and cfg.evaluate and rank == 0:
        print(f"== evaluation: the held-out questions of {world_paths['eval_dir']}")
        results = evaluate_shapes(model, tokenizer, processor, world_paths["eval_dir"], world_paths["image_folder"],
                                  out_path=os.path.join(cfg.out_dir, "eval.json"))
        from_text = provenance["language_check"] if provenance else {}
        print(shapes.report(results, world_paths["eval_dir"], from_text))
    if rank == 0:
        logs = [os.path.join(d, "log.jsonl") for d in run_dirs]
        plot_curves(logs, STAGES[cfg.stage], os.path.join(cfg.out_dir, "loss.png"))
        print("wrote:\n" + "\n".join(f"  {path:<40} {what}" for path, what in written(cfg, run_dirs)))
    barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


def written(cfg, run_dirs):
    """(path, what) of everything a run leaves."""
    out = [(os.path.join(d, "ckpt"), "checkpoint: trained weights, config, optimizer and RNG state") for d in run_dirs]
    out += [(os.path.join(d, "log.jsonl"), "training log, one JSON line a step") for d in run_dirs]
    out.append((os.path.join(cfg.out_dir, "loss.png"), "the loss of each stage"))
    if os.path.isfile(os.path.join(cfg.out_dir, "eval.json")):
        out += [(os.path.join(cfg.out_dir, "eval.json"), "scores of the held-out questions"),
                (os.path.join(cfg.out_dir, "answers_*.jsonl"), "every answer, beside its question id")]
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
