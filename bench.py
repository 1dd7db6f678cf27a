"""
Speed and memory, measured here and never asserted in tests. Random models built from configs (nothing downloads):

    python bench.py                       # the shapes world's tiny models, every projector
    python bench.py --config realistic    # a 1024-wide tower with 576 patches into a small LLM
    python bench.py --plan                # LLaVA-1.5-7B's stage 2 on paper: counts, FLOPs, memory, hours
    python bench.py --suite cuda          # everything a lent GPU should measure, in one call

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
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model
from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig,
                          LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration)

import rgae
from config import parse_args
from data import IGNORE_INDEX, LlavaDataset, collate, read_records, tokenize_conversation
from model import IMAGE_TOKEN_INDEX, MLLM, add_lora, build_model, default_num_tokens
from projectors import build_projector
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
    plan: bool = False  # LLaVA-1.5-7B's stage 2 on paper (nothing is timed): counts, FLOPs, memory, hours
    plan_text_tokens: int = 700  # text tokens of a LLaVA-665K sample, besides the visual ones
    plan_lora_r: int = 128
    plan_gpu: str = "A100"  # a key of PEAK_BF16_TFLOPS
    plan_gpu_gb: float = 80
    plan_mfu: float = 0.4
    plan_micro_batch_size: int = 0  # check one micro-batch against the GPU's memory; 0 = the table alone
    suite: str = ""  # "cuda": everything a lent GPU should measure, in one call (see suite)
    suite_dir: str = "suite"
    suite_model: str = "7b"  # 7b | tiny: the shapes of large_step's model
    suite_micro_batch_size: int = 4
    suite_train_args: str = ""  # added to the shapes run's command
    suite_bench_args: str = "--config realistic"  # bench.py's rows of the suite


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
    flops, peak_flops = step_flops(model, batch, cfg.lora_r), peak_tflops(device)
    counted = dict(step_tflop=flops / 1e12, achieved_tflops=flops / step_s / 1e12,
                   mfu=flops / step_s / (peak_flops * 1e12) if peak_flops else None) if flops else {}
    checkpointing = {}
    if cfg.gradient_checkpointing:
        model.llm.activation_checkpointing_enable()  # non-reentrant by default
        ckpt_s, ckpt_peak = step_time(lambda: model(**batch)[0], trainable, cfg, device)
        model.llm.activation_checkpointing_disable()
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
                step_s=step_s, samples_per_s=B / step_s, peak_gib=peak, **counted, **checkpointing,
                generate_tokens_per_s_cache=B * cfg.new_tokens / gen[True],
                generate_tokens_per_s_no_cache=B * cfg.new_tokens / gen[False], cache_speedup=gen[False] / gen[True],
                forward_backward_s=fb, rgae_s=maps, rgae_over_fb=maps / fb, rgae_batched_s=batched,
                rgae_batched_over_fb=batched / fb)


# -----------------------------------------------------------------------------
# FLOPs of one training step, counted from the configs (multiply-adds x 2; only matrix products, as
# torch.utils.flop_counter counts them: norms, activations, softmax and RoPE are left out)

PEAK_BF16_TFLOPS = {"A100": 312, "H100 SXM": 989, "H100 PCIe": 756, "H200": 989}  # dense, no sparsity


def linear_flops(tokens, fan_in, fan_out):
    return 2 * tokens * fan_in * fan_out


def train_step_flops(vision, llm, M, B, T, K, lora_r=0, projector="avgpool"):
    """FLOPs of one step of B samples of T tokens after the splice (M of them visual) through a CLIP tower and a
    Llama, `vision` and `llm` their configs; K positions of each sample go through the LM head (MLLM.forward keeps
    the supervised ones). lora_r 0 is stage 1 (the projector alone trains), else stage 2 with LoRA on every Linear of
    the LLM. The projector is LLaVA's MLP after pooling (linear, avgpool, maxpool). -> dict of the parts and `total`.

      tower, forward only (frozen):   B [2 N (3 p^2) d_v  +  L_v (2 S (4 d_v^2 + 2 d_v f_v)  +  4 S^2 d_v)],  S = N + 1
      projector:                      forward 2 B M (d_v d + d^2); backward dW of both Linears + dX of the second
      LLM forward, per layer:         2 B T (2 d^2 + 2 d d_kv + 3 d f)  +  4 B T^2 d    (attention over all T x T)
      LLM backward:                   the frozen Linears' dX (= their forward), attention's 2x forward
      LoRA on each Linear (in, out):  forward 2 B T r (in + out); backward dX and dW of A and B, 2x forward
      LM head:                        2 B K d V forward, the same again for dX
    """
    d_v, f_v, L_v = vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers
    N, p = (vision.image_size // vision.patch_size) ** 2, vision.patch_size
    d, f, L, V = llm.hidden_size, llm.intermediate_size, llm.num_hidden_layers, llm.vocab_size
    d_kv = d // llm.num_attention_heads * llm.num_key_value_heads
    if projector not in ("linear", "avgpool", "maxpool"):
        raise ValueError(f"FLOPs are counted for the MLP projectors (linear, avgpool, maxpool), not {projector}")
    S = N + 1
    tower = B * (linear_flops(N, 3 * p * p, d_v) + L_v * (linear_flops(S, d_v, 4 * d_v + 2 * f_v) + 4 * S * S * d_v))
    proj_fwd = linear_flops(B * M, d_v, d) + linear_flops(B * M, d, d)
    proj_bwd = proj_fwd + linear_flops(B * M, d, d)
    shapes = [(d, d), (d, d_kv), (d, d_kv), (d, d), (d, f), (d, f), (f, d)]  # q k v o gate up down
    linears = L * sum(linear_flops(B * T, i, o) for i, o in shapes)
    attention = L * 4 * B * T * T * d
    lora = L * sum(linear_flops(B * T, i, lora_r) + linear_flops(B * T, lora_r, o) for i, o in shapes)
    head = linear_flops(B * K, d, V)
    parts = dict(tower=tower, projector=proj_fwd + proj_bwd, llm_forward=linears + attention + lora + head,
                 llm_backward=linears + 2 * attention + 2 * lora + head)
    return dict(parts, total=sum(parts.values()))


def peak_tflops(device):
    """The bf16 dense peak of a CUDA device from its name ("NVIDIA H100 80GB HBM3" is the SXM part); None off CUDA
    or for a GPU not in the table."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, gpu in (("H100 PCIe", "H100 PCIe"), ("H100", "H100 SXM"), ("H200", "H200"), ("A100", "A100")):
        if key.replace(" ", "").lower() in name.replace(" ", "").lower():
            return PEAK_BF16_TFLOPS[gpu]
    return None


def step_flops(model, batch, lora_r):
    """train_step_flops for this model and batch: T and the LM head's K read off the spliced batch as
    MLLM.forward makes it. None for the projectors it does not count."""
    if model.projector_name not in ("linear", "avgpool", "maxpool"):
        return None
    with torch.no_grad():
        labels = model.splice(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["pixel_values"])[2]
    B, T = labels.shape
    K = int((labels[:, 1:] != IGNORE_INDEX).any(0).sum())
    return train_step_flops(model.vision_tower.config, model.llm.config, model.num_visual_tokens, B, T, K, lora_r,
                            model.projector_name)["total"]


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
# LLaVA-1.5-7B on paper (--plan): its shapes built on the meta device (no download, no memory), the FLOPs of
# train_step_flops, and the activation bytes measured on one and two layers at Vicuna-7B's width

VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
CLIP_L_336 = dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16)
PUBLISHED_PARAMS = dict(llm=6.74e9, tower=304e6)  # Llama-2-7B's card (Vicuna-7B v1.5 is its fine-tune); CLIP-L/14
LLAVA_665K = dict(image=665298 - 40688, text=40688)  # llava_v1_5_mix665k.json: ShareGPT's 40,688 have no image
LLAVA_STAGE2_HOURS = 10  # LLaVA's README: visual instruction tuning of LLaVA-v1.5-7B, 8x A100, full fine-tuning
PAPER_M = dict(linear=576, avgpool=144, maxpool=144, qformer=144, cabstractor=144, dabstractor=144)


def meta_counts(vision=CLIP_L_336, llm=VICUNA_7B, lora_r=128):
    """Parameter counts of the tower, the LLM and LoRA on every Linear of the LLM, every tensor on the meta device:
    shapes alone, no memory."""
    with torch.device("meta"):
        tower = CLIPVisionModel(CLIPVisionConfig(**vision))
        lm = LlamaForCausalLM(LlamaConfig(**llm))
    counts = dict(tower=sum(p.numel() for p in tower.parameters()), llm=sum(p.numel() for p in lm.parameters()))
    lm = get_peft_model(lm.requires_grad_(False), LoraConfig(r=lora_r, lora_alpha=2 * lora_r,
                                                             target_modules="all-linear"))
    counts["lora"] = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    return counts


def saved_bytes(llm, lora_r, layers, lengths, batch=1):
    """Bytes autograd keeps for backward in a stage-2 forward of `batch` samples of T tokens, for each T of
    `lengths`, through a Llama of `layers` layers at `llm`'s width: bf16 under autocast, LoRA on every Linear, the LM
    head on one position. Counted with saved_tensors_hooks, each storage once, the frozen weights left out (they are
    held anyway). The weights are left uninitialised: what is kept depends on the shapes alone."""
    with torch.device("meta"):  # the vocabulary cut to 8: embeddings are not read, the head sees one position
        lm = LlamaForCausalLM(LlamaConfig(**dict(llm, num_hidden_layers=layers, vocab_size=8)))
    lm = lm.to(torch.bfloat16).to_empty(device="cpu").requires_grad_(False)
    lm = get_peft_model(lm, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules="all-linear"))
    frozen = {p.untyped_storage().data_ptr() for p in lm.parameters() if not p.requires_grad}
    out = []
    for T in lengths:
        kept = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in frozen:
                kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        x = torch.zeros(batch, T, llm["hidden_size"], dtype=torch.bfloat16, requires_grad=True)  # visual tokens
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
            lm(inputs_embeds=x, logits_to_keep=1)
        out.append(sum(kept.values()))
    return out


def activation_bytes(llm, lora_r, T1=32, T2=64):
    """(per token and layer, per token outside the layers): the slopes in T of saved_bytes, at 1 and 2 layers."""
    slope = {}
    for n in (1, 2):
        a, b = saved_bytes(llm, lora_r, n, (T1, T2))
        slope[n] = (b - a) / (T2 - T1)
    return slope[2] - slope[1], 2 * slope[1] - slope[2]


def stage2_memory(counts, trainable, llm, per_layer, outside, b, T, K, checkpointing):
    """GB a GPU holds in stage 2 under plain DDP (every GPU a whole replica), by part:
      weights      bf16 tower and LLM, 2 bytes a parameter
      optimizer    what trains, in fp32: weight, gradient, AdamW's two moments, DDP's gradient bucket; and the
                   bf16 copy autocast makes of it for the forward and keeps for backward: 22 bytes a parameter
      activations  b T (L per_layer + outside) bytes; with gradient checkpointing b T (L 2 d + per_layer + outside):
                   each layer's bf16 input, and one layer's activations recomputed at a time
      head         the LM head on K positions: bf16 logits, their fp32 copy and the log-softmax cross-entropy keeps
                   (2 + 4 + 4 bytes a logit)"""
    L, d, V = llm["num_hidden_layers"], llm["hidden_size"], llm["vocab_size"]
    layers = L * 2 * d + per_layer if checkpointing else L * per_layer
    parts = dict(weights=2 * (counts["tower"] + counts["llm"]), optimizer=22 * trainable,
                 activations=b * T * (layers + outside), head=10 * b * K * V)
    return {k: v / 1e9 for k, v in parts.items()} | dict(total=sum(parts.values()) / 1e9)


def plan(cfg):
    """LLaVA-1.5-7B's stage 2 on paper, for linear (576 visual tokens) and avgpool (144). -> dict, printed."""
    counts = meta_counts(lora_r=cfg.plan_lora_r)
    vision, llm = CLIPVisionConfig(**CLIP_L_336), LlamaConfig(**VICUNA_7B)
    N, d_v, d = (336 // 14) ** 2, CLIP_L_336["hidden_size"], VICUNA_7B["hidden_size"]
    with torch.device("meta"):
        projector = {name: sum(p.numel() for p in build_projector(name, d_v, d, N, M).parameters())
                     for name, M in PAPER_M.items()}
    text = cfg.plan_text_tokens
    per_layer, outside = activation_bytes(VICUNA_7B, cfg.plan_lora_r)
    rows, memory = [], []
    for name in ("linear", "avgpool"):
        M = PAPER_M[name]
        image = train_step_flops(vision, llm, M, 1, text + M, text, cfg.plan_lora_r, name)
        text_only = train_step_flops(vision, llm, M, 1, text, text, cfg.plan_lora_r, name)
        text_only = text_only["llm_forward"] + text_only["llm_backward"]
        total = LLAVA_665K["image"] * image["total"] + LLAVA_665K["text"] * text_only
        hours = total / (8 * PEAK_BF16_TFLOPS[cfg.plan_gpu] * 1e12 * cfg.plan_mfu) / 3600
        rows.append(dict(projector=name, M=M, sample_tflop=image["total"] / 1e12, epoch_pflop=total / 1e15,
                         hours=hours))
        trainable = projector[name] + counts["lora"]
        for b in (1, 2, 4, 8, 16, 32):
            for ckpt in (False, True):
                gb = stage2_memory(counts, trainable, VICUNA_7B, per_layer, outside, b, text + M, text, ckpt)
                memory.append(dict(projector=name, micro_batch=b, checkpointing=ckpt, **gb,
                                   fits=gb["total"] <= cfg.plan_gpu_gb))
    rows.append(dict(projector="avgpool / linear", sample_tflop=rows[1]["sample_tflop"] / rows[0]["sample_tflop"],
                     epoch_pflop=rows[1]["epoch_pflop"] / rows[0]["epoch_pflop"],
                     hours=rows[1]["hours"] / rows[0]["hours"]))
    return dict(counts=counts, projector=projector, per_layer_bytes_per_token=per_layer,
                outside_bytes_per_token=outside, flops=rows, memory=memory)


def check_micro_batch(result, b, gpu_gb):
    """A micro-batch that fits no way (linear, with gradient checkpointing) stops with the largest that does."""
    need = {r["micro_batch"]: r["total"] for r in result["memory"] if r["projector"] == "linear" and r["checkpointing"]}
    if b not in need:
        raise SystemExit(f"--plan_micro_batch_size {b}: the plan has micro-batches {', '.join(map(str, need))}")
    if need[b] > gpu_gb:
        fits = [k for k, v in need.items() if v <= gpu_gb]
        raise SystemExit(f"--plan_micro_batch_size {b}: linear's stage 2 needs {need[b]:.0f} GB a GPU even with "
                         f"gradient checkpointing, over {gpu_gb} GB; use {max(fits) if fits else 'a larger GPU'}")


# -----------------------------------------------------------------------------
# --suite cuda: what a lent GPU should measure, in one call (CI runs the same code on the CPU at tiny sizes)


def large_step(cfg, projector, device, checkpointing):
    """One stage-2 step (LoRA, bf16 on CUDA) of LLaVA-1.5-7B's shapes (--suite_model 7b) or the tiny stand-ins'
    ("tiny"), random weights built on the device: step time, tokens/s, peak memory, MFU."""
    vision, llm = (CLIP_L_336, VICUNA_7B) if cfg.suite_model == "7b" else (TINY_VISION, dict(TINY_LLM, vocab_size=1024))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):  # initialised where they run: a 7B never passes through host memory
        tower, lm = CLIPVisionModel(CLIPVisionConfig(**vision)), LlamaForCausalLM(LlamaConfig(**llm))
    tower, lm = (m.to(dtype).requires_grad_(False) for m in (tower, lm))
    N = (vision["image_size"] // vision["patch_size"]) ** 2
    M = default_num_tokens(projector, N)
    proj = build_projector(projector, vision["hidden_size"], llm["hidden_size"], N, M).to(device)
    model = MLLM(tower, proj, add_lora(lm, cfg.plan_lora_r, 2 * cfg.plan_lora_r, 0.0), M, True, projector).train()
    if checkpointing:
        model.llm.activation_checkpointing_enable()
    b, text = cfg.suite_micro_batch_size, cfg.plan_text_tokens if cfg.suite_model == "7b" else cfg.text_tokens
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, llm["vocab_size"], (b, text), generator=g)
    ids[:, 1] = IMAGE_TOKEN_INDEX
    batch = dict(input_ids=ids.to(device), attention_mask=torch.ones_like(ids, device=device),
                 labels=ids.clamp(min=0).to(device),
                 pixel_values=torch.randn(b, 3, vision["image_size"], vision["image_size"], generator=g).to(device))
    trainable = [p for p in model.parameters() if p.requires_grad]
    seconds, peak = step_time(lambda: model(**batch)[0], trainable, cfg, device)
    flops, peak_flops = step_flops(model, batch, cfg.plan_lora_r), peak_tflops(device)
    return dict(model=cfg.suite_model, projector=projector, micro_batch=b, tokens=b * (text - 1 + M),
                checkpointing=checkpointing, step_s=seconds, tokens_per_s=b * (text - 1 + M) / seconds,
                peak_gib=peak, tflop=flops / 1e12, mfu=flops / seconds / (peak_flops * 1e12) if peak_flops else None)


def suite(cfg, device):
    """The default shapes run under torchrun (bf16), bench.py's rows at --suite_bench_args, and large_step for linear
    and avgpool with and without gradient checkpointing; a JSON file and a log in --suite_dir."""
    os.makedirs(cfg.suite_dir, exist_ok=True)
    out = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", torch=torch.__version__)
    t = time.time()
    run_dir = os.path.join(cfg.suite_dir, "shapes")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py",
               "--projector", "avgpool", "--dtype", "bfloat16", "--out_dir", run_dir, *shlex.split(cfg.suite_train_args)]
    with open(os.path.join(cfg.suite_dir, "shapes.log"), "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    stages = {}
    for name, path in (("pretrain", os.path.join(run_dir, "pretrain", "log.jsonl")),
                       ("finetune", os.path.join(run_dir, "log.jsonl"))):
        if os.path.isfile(path):
            with open(path) as f:
                stages[name + "_s"] = [json.loads(line) for line in f][-1]["time"]
    scores = os.path.join(run_dir, "eval.json")
    out["shapes"] = dict(wall_s=time.time() - t, **stages,
                         eval=json.load(open(scores)) if os.path.isfile(scores) else None)
    bench_json = os.path.join(cfg.suite_dir, "bench.json")
    main([*shlex.split(cfg.suite_bench_args), "--out", bench_json])
    out["bench"] = json.load(open(bench_json))["rows"]
    out["large"] = [large_step(cfg, p, device, c) for p in ("linear", "avgpool") for c in (False, True)]
    print(table(out["large"], [("model", "{}"), ("projector", "{}"), ("micro_batch", "{}"), ("checkpointing", "{}"),
                               ("step_s", "{:.3f}"), ("tokens_per_s", "{:,.0f}"), ("peak_gib", "{:.1f}"),
                               ("tflop", "{:.2f}"), ("mfu", "{:.1%}")]))
    with open(os.path.join(cfg.suite_dir, "suite.json"), "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {os.path.join(cfg.suite_dir, 'suite.json')}")
    return out


# -----------------------------------------------------------------------------


def table(rows, cols):
    """Markdown table of the columns each given as (key, format); a missing or None value prints as -."""
    lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + " --- |" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("-" if r.get(c) is None else f.format(r[c]) for c, f in cols) + " |")
    return "\n".join(lines)


PROJECTOR_COLS = [("projector", "{}"), ("visual_tokens", "{}"), ("trainable_params", "{:,}"), ("step_s", "{:.3f}"),
                  ("samples_per_s", "{:.1f}"), ("achieved_tflops", "{:.3f}"), ("mfu", "{:.1%}"),
                  ("ckpt_over_step", "{:.2f}x"), ("generate_tokens_per_s_cache", "{:.0f}"),
                  ("cache_speedup", "{:.1f}x"), ("forward_backward_s", "{:.3f}"), ("rgae_s", "{:.3f}"),
                  ("rgae_over_fb", "{:.1f}x"), ("rgae_batched_s", "{:.3f}"), ("rgae_batched_over_fb", "{:.1f}x"),
                  ("hf_llava_step_s", "{:.3f}"), ("ours_over_hf", "{:.2f}x"),
                  ("hf_llava_generate_tokens_per_s_cache", "{:.0f}")]
LOADER_COLS = [("num_workers", "{}"), ("pin_memory", "{}"), ("samples", "{}"), ("seconds", "{:.2f}"),
               ("samples_per_s", "{:.0f}")]


def print_plan(result, cfg):
    c = result["counts"]
    print(f"LLM {c['llm']:,} parameters (published {PUBLISHED_PARAMS['llm'] / 1e9:.2f}B), tower {c['tower']:,} "
          f"(published {PUBLISHED_PARAMS['tower'] / 1e6:.0f}M), LoRA r {cfg.plan_lora_r} {c['lora']:,}")
    print(table([dict(projector=k, stage1=v, stage2=v + c["lora"]) for k, v in result["projector"].items()],
                [("projector", "{}"), ("stage1", "{:,}"), ("stage2", "{:,}")]))
    print(f"activations kept for backward: {result['per_layer_bytes_per_token'] / 1e3:.1f} kB a token and layer, "
          f"{result['outside_bytes_per_token'] / 1e3:.1f} kB a token outside the layers (bf16, measured)")
    print(table(result["flops"], [("projector", "{}"), ("M", "{}"), ("sample_tflop", "{:.2f}"),
                                  ("epoch_pflop", "{:,.2f}"), ("hours", "{:.2f}")]))
    print(f"hours: stage 2 over LLaVA-665K on 8 {cfg.plan_gpu} at {cfg.plan_mfu:.0%} MFU "
          f"(LLaVA's README: about {LLAVA_STAGE2_HOURS} hours for LLaVA-v1.5-7B, full fine-tuning, 8 A100)")
    rows = {}
    for r in result["memory"]:
        row = rows.setdefault((r["projector"], r["micro_batch"]), dict(projector=r["projector"],
                                                                        micro_batch=r["micro_batch"],
                                                                        weights=r["weights"],
                                                                        optimizer=r["optimizer"], head=r["head"]))
        key = "checkpointing" if r["checkpointing"] else "plain"
        row[key + "_activations"], row[key] = r["activations"], f"{r['total']:.1f}" + ("" if r["fits"] else " (no)")
    print(table(rows.values(), [("projector", "{}"), ("micro_batch", "{}"), ("weights", "{:.1f}"),
                                ("optimizer", "{:.1f}"), ("head", "{:.1f}"), ("plain_activations", "{:.1f}"),
                                ("plain", "{}"), ("checkpointing_activations", "{:.1f}"),
                                ("checkpointing", "{}")]))
    print(f"GB a GPU in stage 2, plain DDP; (no): over {cfg.plan_gpu_gb:g} GB")


def main(argv):
    cfg, _ = parse_args(BenchConfig, argv)
    print(json.dumps(dataclasses.asdict(cfg), indent=2))
    if cfg.suite:
        if cfg.suite != "cuda" or cfg.suite_model not in ("7b", "tiny"):
            raise SystemExit(f"--suite takes cuda and --suite_model 7b or tiny, got {cfg.suite!r} and "
                             f"{cfg.suite_model!r}")
        suite(cfg, torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")))
        return
    if cfg.plan:
        if cfg.plan_gpu not in PEAK_BF16_TFLOPS:
            raise SystemExit(f"--plan_gpu must be one of {', '.join(PEAK_BF16_TFLOPS)}, got {cfg.plan_gpu!r}")
        result = plan(cfg)
        print_plan(result, cfg)
        if cfg.plan_micro_batch_size:
            check_micro_batch(result, cfg.plan_micro_batch_size, cfg.plan_gpu_gb)
        with open(cfg.out, "w") as f:
            json.dump(dict(config=dataclasses.asdict(cfg), **result), f, indent=2)
        print(f"wrote {cfg.out}")
        return
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
