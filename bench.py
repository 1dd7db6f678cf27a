"""
Speed and memory, measured here and never asserted in tests. Random models built from configs (nothing downloads):

    python bench.py                       # the shapes world's tiny models, every projector
    python bench.py --config realistic    # a 1024-wide tower with 576 patches into a small LLM

For each projector: trainable parameters, visual tokens M, the median time of a stage-2 training step (forward,
backward, AdamW) after warm-up, samples/s, peak memory (CUDA), the same step with gradient checkpointing in the LLM,
greedy generation of 64 new tokens with and without the KV cache, and R-GAE's full maps for a 16-token answer (one
backward per answer token, and all 16 in one batched backward) against one forward+backward of the same sample.
Beside the linear row, transformers' LlavaForConditionalGeneration built from the same configs, made trainable the
same way and fed the same batch: its step time, ours over theirs, and its cached generation.
On the shapes world (data/shapes when built by this code, else a small one in a temporary folder): DataLoader
throughput with 0 and 2 workers, and the modality-grouped sampler against plain shuffling.
Prints tables and writes bench.json.
"""
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig,
                          LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration)

import rgae
from config import parse_args
from data import IGNORE_INDEX, LlavaDataset, collate, read_records, tokenize_conversation
from model import IMAGE_TOKEN_INDEX, build_model
from shapes import RECIPE, STAND_INS, TINY_LLM, TINY_VISION, WORLD_VERSION, build_shapes_world
from train import full_micro_batches, micro_batches

CONFIGS = {  # (vision tower, LLM, M for the compressing projectors)
    "tiny": (TINY_VISION, TINY_LLM, 36),
    "realistic": (dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=2,
                       num_attention_heads=16),
                  dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                       num_key_value_heads=16, max_position_embeddings=2048), 144),
}
SMALL_QFORMER = dict(hidden_size=128, num_heads=4, intermediate_size=512)  # the shapes world's, for "tiny"
HF_IMAGE_TOKEN = 0  # transformers' LLaVA needs its image token inside the vocab; the text ids are drawn from 1 up
LLAVA_TEXT_ONLY = 40688 / 665298  # the text-only share of LLaVA-1.5's mix665k (ShareGPT)


@dataclass
class BenchConfig:
    config: str = "tiny"  # tiny | realistic
    projectors: str = "linear,avgpool,maxpool,qformer,cabstractor,dabstractor"
    batch_size: int = 8
    text_tokens: int = 64  # per sample, besides the M visual tokens
    steps: int = 10  # timed, after `warmup` untimed ones
    warmup: int = 3
    new_tokens: int = 64  # generation
    answer_tokens: int = 16  # R-GAE
    lora_r: int = 16
    gradient_checkpointing: bool = True  # each row's step again with the LLM's activations recomputed in backward
    hf_llava: bool = True  # transformers' LLaVA beside the linear row
    data: bool = True  # DataLoader workers and the modality-grouped sampler on the shapes world
    shapes_root: str = "data/shapes"
    loader_samples: int = 200  # finetune samples read per DataLoader setting
    num_workers: int = 2  # against 0
    sampler_samples: int = 2000  # image and text-only records, text-only in LLaVA-665k's share
    device: str = ""  # default: cuda if available
    out: str = "bench.json"


def save_models(cfg, root):
    vision, llm, _ = CONFIGS[cfg.config]
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**vision)).save_pretrained(os.path.join(root, "vision"))
    side = vision["image_size"]
    clip_processor(side).save_pretrained(os.path.join(root, "vision"))
    LlamaForCausalLM(LlamaConfig(**llm, vocab_size=32000)).save_pretrained(os.path.join(root, "llm"))
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                  unk_token="<unk>", pad_token="<unk>")
    tok.save_pretrained(os.path.join(root, "llm"))


def clip_processor(side):
    return CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


def timed(fn, steps, warmup, device):
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def step_time(loss_fn, params, cfg, device):
    """Median time of a training step (forward, backward, AdamW) and its peak memory in GiB (None off CUDA)."""
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step():
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(step, cfg.steps, cfg.warmup, device)
    return seconds, torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None


def random_inputs(cfg, side):
    """The batch of every row: ids [B, T] with IMAGE_TOKEN_INDEX at column 1, pixel_values [B, 3, side, side]."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 32000, (cfg.batch_size, cfg.text_tokens), generator=g)
    ids[:, 1] = IMAGE_TOKEN_INDEX
    return ids, torch.randn(cfg.batch_size, 3, side, side, generator=g)


def bench_projector(cfg, root, name, device):
    _, _, M = CONFIGS[cfg.config]
    options = SMALL_QFORMER if name == "qformer" and cfg.config == "tiny" else {}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, _, _ = build_model(os.path.join(root, "vision"), os.path.join(root, "llm"), name,
                              0 if name == "linear" else M, cfg.lora_r, 2 * cfg.lora_r, 0.0, dtype=dtype,
                              attn_implementation="eager", **options)
    model.to(device)
    ids, pixels = random_inputs(cfg, model.vision_tower.config.image_size)
    B = len(ids)
    batch = dict(input_ids=ids.to(device), attention_mask=torch.ones_like(ids, device=device),
                 labels=ids.clamp(min=0).to(device), pixel_values=pixels.to(device))
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    step_s, peak = step_time(lambda: model(**batch)[0], trainable, cfg, device)
    checkpointing = {}
    if cfg.gradient_checkpointing:
        model.llm.activation_checkpointing_enable()  # non-reentrant by default
        ckpt_s, ckpt_peak = step_time(lambda: model(**batch)[0], trainable, cfg, device)
        model.llm.gradient_checkpointing_disable()
        checkpointing = dict(ckpt_step_s=ckpt_s, ckpt_over_step=ckpt_s / step_s, ckpt_peak_gib=ckpt_peak)

    model.eval()
    prompts = [ids[b, :16].tolist() for b in range(B)]
    pixels = batch["pixel_values"]
    gen = {}
    for cache in (True, False):
        gen[cache] = timed(lambda: model.generate(prompts, pixels, cfg.new_tokens, eos_token_id=-1, pad_token_id=0,
                                                  use_cache=cache), 1, 1, device)

    # R-GAE on one sample against one forward+backward of the same sample
    prompt, answer = ids[0, :16].tolist(), ids[0, 16:16 + cfg.answer_tokens].tolist()
    one = {k: v[:1, :16 + cfg.answer_tokens] for k, v in batch.items() if k != "pixel_values"}

    def forward_backward():
        loss, _ = model(**one, pixel_values=pixels[:1])
        loss.backward()
        model.zero_grad(set_to_none=True)
    fb = timed(forward_backward, 3, 1, device)
    maps = timed(lambda: rgae.relevance(model, pixels[0], prompt, answer), 3, 1, device)
    batched = timed(lambda: rgae.relevance(model, pixels[0], prompt, answer,
                                           targets_per_backward=cfg.answer_tokens), 3, 1, device)
    return dict(projector=name, visual_tokens=model.num_visual_tokens,
                trainable_params=sum(p.numel() for p in trainable),
                projector_params=sum(p.numel() for p in model.projector.parameters()),
                step_s=step_s, samples_per_s=B / step_s, peak_gib=peak, **checkpointing,
                generate_tokens_per_s_cache=B * cfg.new_tokens / gen[True],
                generate_tokens_per_s_no_cache=B * cfg.new_tokens / gen[False], cache_speedup=gen[False] / gen[True],
                forward_backward_s=fb, rgae_s=maps, rgae_over_fb=maps / fb, rgae_batched_s=batched,
                rgae_batched_over_fb=batched / fb)


# -----------------------------------------------------------------------------
# transformers' LLaVA beside the linear row


def expand_image(ids, n, fill):
    """[B, T] with IMAGE_TOKEN_INDEX in one column -> [B, T - 1 + n], that column repeated n times as `fill`:
    transformers' LLaVA takes one image token per visual token where ours splices them in for one placeholder."""
    p = int((ids[0] == IMAGE_TOKEN_INDEX).nonzero()[0])
    return torch.cat([ids[:, :p], ids.new_full((len(ids), n), fill), ids[:, p + 1:]], 1)


def build_hf_llava(cfg, root, dtype):
    """LlavaForConditionalGeneration from the saved configs, trainable like build_model's: frozen tower, projector
    in fp32, LoRA through peft on every Linear of the LLM (so not lm_head, the tower's or the projector's)."""
    from peft import LoraConfig, get_peft_model
    config = LlavaConfig(vision_config=CLIPVisionConfig.from_pretrained(os.path.join(root, "vision")),
                         text_config=LlamaConfig.from_pretrained(os.path.join(root, "llm")),
                         image_token_index=HF_IMAGE_TOKEN, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         attn_implementation="eager")
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(config).to(dtype)
    projector = llava.model.multi_modal_projector.float()
    targets = [n for n, m in llava.named_modules()
               if isinstance(m, nn.Linear) and n.startswith("model.language_model.")]
    llava = get_peft_model(llava, LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, lora_dropout=0.0,
                                             target_modules=targets))
    projector.requires_grad_(True)
    return llava


def bench_hf_llava(cfg, root, device, ours):
    """transformers' step and cached generation on the linear row's batch; `ours` is that row."""
    llava = build_hf_llava(cfg, root, torch.bfloat16 if device.type == "cuda" else torch.float32).to(device)
    trainable = [p for p in llava.parameters() if p.requires_grad]
    if sum(p.numel() for p in trainable) != ours["trainable_params"]:
        raise RuntimeError(f"transformers' LLaVA trains {sum(p.numel() for p in trainable):,} parameters, "
                           f"ours {ours['trainable_params']:,}: the step times would not compare")
    vision = llava.config.vision_config
    ids, pixels = random_inputs(cfg, vision.image_size)
    N = (vision.image_size // vision.patch_size) ** 2
    input_ids = expand_image(ids, N, HF_IMAGE_TOKEN).to(device)
    batch = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                 labels=expand_image(ids, N, IGNORE_INDEX).to(device), pixel_values=pixels.to(device))
    if input_ids.shape[1] != ids.shape[1] - 1 + ours["visual_tokens"]:
        raise RuntimeError(f"transformers' LLaVA reads {input_ids.shape[1]} tokens a sample, ours "
                           f"{ids.shape[1] - 1 + ours['visual_tokens']}")
    llava.train()
    step_s, peak = step_time(lambda: llava(**batch).loss, trainable, cfg, device)

    llava.eval()
    prompt = input_ids[:, :16 - 1 + N]  # the 16 prompt ids of ours, the image expanded
    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):  # bf16 features, fp32 projector
        gen = timed(lambda: llava.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                           pixel_values=batch["pixel_values"], max_new_tokens=cfg.new_tokens,
                                           min_new_tokens=cfg.new_tokens, do_sample=False,
                                           pad_token_id=HF_IMAGE_TOKEN), 1, 1, device)
    return dict(hf_llava_step_s=step_s, ours_over_hf=ours["step_s"] / step_s, hf_llava_peak_gib=peak,
                hf_llava_generate_tokens_per_s_cache=len(ids) * cfg.new_tokens / gen)


# -----------------------------------------------------------------------------
# data loading on the shapes world


def shapes_world(root, tmp):
    """The world at root when this code's version built it (reused as is, never rebuilt), else a small one in tmp."""
    settings = os.path.join(root, "settings.json")
    if os.path.isfile(settings):
        with open(settings) as f:
            saved = json.load(f)
        if saved.pop("version", None) == WORLD_VERSION:
            return build_shapes_world(root, **saved)
    return build_shapes_world(os.path.join(tmp, "shapes"), n_train=2000, n_eval=1)


def bench_loader(world, cfg, device):
    """Samples/s of LlavaDataset + collate read through a DataLoader as train.py does, per number of workers."""
    side, micro = TINY_VISION["image_size"], RECIPE["micro_batch_size"]
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(STAND_INS, "llm"))
    dataset = LlavaDataset(world["finetune"], world["image_folder"], tokenizer, clip_processor(side), "vicuna_v1",
                           "pad", RECIPE["num_tokens"], RECIPE["max_length"])
    index_lists = [list(range(k, min(k + micro, cfg.loader_samples))) for k in range(0, cfg.loader_samples, micro)]
    rows = []
    for workers in (0, cfg.num_workers):
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=index_lists, num_workers=workers,
                                             pin_memory=device.type == "cuda",
                                             collate_fn=lambda b: collate(b, tokenizer.pad_token_id, side))
        # worker start-up included (train.py starts a DataLoader each epoch); an untimed pass warms the file cache
        seconds = timed(lambda: list(loader), 1, 1, torch.device("cpu"))
        rows.append(dict(num_workers=workers, pin_memory=device.type == "cuda", samples=cfg.loader_samples,
                         seconds=seconds, samples_per_s=cfg.loader_samples / seconds))
    return rows


def sampler_records(world, n):
    """has_image and the token count (the image placeholder counted once) of n records: the world's finetune
    records with text-only ones mixed in at LLaVA-665k's share."""
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(STAND_INS, "llm"))
    n_text = round(n * LLAVA_TEXT_ONLY)
    records = read_records(world["finetune"])[:n - n_text] + read_records(world["text"])[:n_text]
    counts = [len(tokenize_conversation(tokenizer, r["conversations"], "vicuna_v1")[0]) for r in records]
    return ["image" in r for r in records], counts


def pad_fraction(index_lists, lengths):
    # the share of the spliced micro-batches that is padding: MLLM.splice pads every sample to the longest
    padded = sum(len(b) * max(lengths[i] for i in b) for b in index_lists)
    return 1 - sum(lengths[i] for b in index_lists for i in b) / padded


def bench_sampler(world, cfg):
    """Plain shuffling against train.py's modality grouping (LLaVA's group_by_modality_length without its grouping
    by length): micro-batches mixing the modalities, padding after the splice (and the truncation to max_length)
    with the shapes world's M and with all N patches (linear), the share of samples an epoch uses, and the time to
    draw an epoch's index lists at LLaVA-665k's size."""
    micro = RECIPE["micro_batch_size"]
    has_image, counts = sampler_records(world, cfg.sampler_samples)
    spliced = {M: [min(c + (M - 1 if image else 0), RECIPE["max_length"]) for c, image in zip(counts, has_image)]
               for M in (RECIPE["num_tokens"], (TINY_VISION["image_size"] // TINY_VISION["patch_size"]) ** 2)}
    large = (torch.rand(665298, generator=torch.Generator().manual_seed(0)) >= LLAVA_TEXT_ONLY).tolist()
    rows = []
    for name, grouped in (("shuffle", False), ("grouped", True)):
        used = full_micro_batches(has_image, micro) if grouped else len(has_image) // micro * micro
        lists = micro_batches(len(has_image), 0, 0, micro, 1, 0, used // micro, 0, has_image if grouped else None)
        large_batches = (full_micro_batches(large, micro) if grouped else len(large)) // micro
        seconds = timed(lambda: micro_batches(len(large), 0, 0, micro, 1, 0, large_batches, 0,
                                              large if grouped else None), 3, 1, torch.device("cpu"))
        rows.append(dict(sampler=name, micro_batches=len(lists),
                         mixed_fraction=sum(len({has_image[i] for i in b}) > 1 for b in lists) / len(lists),
                         **{f"pad_fraction_M{M}": pad_fraction(lists, lengths) for M, lengths in spliced.items()},
                         samples_used=used / len(has_image), epoch_665k_s=seconds))
    return rows


# -----------------------------------------------------------------------------


def table(rows, cols):
    """Markdown table of the columns each given as (key, format); a missing or None value prints as -."""
    lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + " --- |" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("-" if r.get(c) is None else f.format(r[c]) for c, f in cols) + " |")
    return "\n".join(lines)


PROJECTOR_COLS = [("projector", "{}"), ("visual_tokens", "{}"), ("trainable_params", "{:,}"), ("step_s", "{:.3f}"),
                  ("samples_per_s", "{:.1f}"), ("ckpt_over_step", "{:.2f}x"), ("generate_tokens_per_s_cache", "{:.0f}"),
                  ("cache_speedup", "{:.1f}x"), ("forward_backward_s", "{:.3f}"), ("rgae_s", "{:.3f}"),
                  ("rgae_over_fb", "{:.1f}x"), ("rgae_batched_s", "{:.3f}"), ("rgae_batched_over_fb", "{:.1f}x"),
                  ("hf_llava_step_s", "{:.3f}"), ("ours_over_hf", "{:.2f}x"),
                  ("hf_llava_generate_tokens_per_s_cache", "{:.0f}")]
LOADER_COLS = [("num_workers", "{}"), ("pin_memory", "{}"), ("samples", "{}"), ("seconds", "{:.2f}"),
               ("samples_per_s", "{:.0f}")]


def main(argv):
    cfg, _ = parse_args(BenchConfig, argv)
    print(json.dumps(dataclasses.asdict(cfg), indent=2))
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows, loader, sampler = [], None, None
    with tempfile.TemporaryDirectory() as root:
        save_models(cfg, root)
        for name in cfg.projectors.split(","):
            rows.append(bench_projector(cfg, root, name, device))
            if name == "linear" and cfg.hf_llava:
                rows[-1].update(bench_hf_llava(cfg, root, device, rows[-1]))
            print(json.dumps(rows[-1]))
        if cfg.data:
            world = shapes_world(cfg.shapes_root, root)
            loader, sampler = bench_loader(world, cfg, device), bench_sampler(world, cfg)
            print(json.dumps(dict(loader=loader, sampler=sampler, shapes=world["root"])))
    print(table(rows, PROJECTOR_COLS))
    if cfg.data:
        print(table(loader, LOADER_COLS))
        print(table(sampler, [(k, "{}" if k == "sampler" else "{:.3g}") for k in sampler[0]]))
    with open(cfg.out, "w") as f:
        json.dump(dict(config=dataclasses.asdict(cfg), device=str(device), torch=torch.__version__,
                       threads=torch.get_num_threads(), rows=rows, loader=loader, sampler=sampler), f, indent=2)
    print(f"wrote {cfg.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
