"""
Speed and memory, measured here and never asserted in tests. Random models built from configs (nothing downloads):

    python bench.py                       # the shapes world's tiny models, every projector
    python bench.py --config realistic    # a 1024-wide tower with 576 patches into a small LLM

For each projector: trainable parameters, visual tokens M, the median time of a stage-2 training step (forward,
backward, AdamW) after warm-up, samples/s, peak memory (CUDA), greedy generation of 64 new tokens with and without
the KV cache, and R-GAE's full maps for a 16-token answer (one backward per answer token, and all 16 in one batched
backward) against one forward+backward of the same sample.
Prints a table and writes bench.json.
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
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

import rgae
from model import IMAGE_TOKEN_INDEX, build_model
from train import TINY_LLM, TINY_VISION, parse_args

CONFIGS = {  # (vision tower, LLM, M for the compressing projectors)
    "tiny": (TINY_VISION, TINY_LLM, 36),
    "realistic": (dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=2,
                       num_attention_heads=16),
                  dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                       num_key_value_heads=16, max_position_embeddings=2048), 144),
}
SMALL_QFORMER = dict(hidden_size=128, num_heads=4, intermediate_size=512)  # the shapes world's, for "tiny"


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
    device: str = ""  # default: cuda if available
    out: str = "bench.json"


def save_models(cfg, root):
    vision, llm, _ = CONFIGS[cfg.config]
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**vision)).save_pretrained(os.path.join(root, "vision"))
    side = vision["image_size"]
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(
        os.path.join(root, "vision"))
    LlamaForCausalLM(LlamaConfig(**llm, vocab_size=32000)).save_pretrained(os.path.join(root, "llm"))
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                  unk_token="<unk>", pad_token="<unk>")
    tok.save_pretrained(os.path.join(root, "llm"))


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


def bench_projector(cfg, root, name, device):
    _, _, M = CONFIGS[cfg.config]
    options = SMALL_QFORMER if name == "qformer" and cfg.config == "tiny" else {}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, _, _ = build_model(os.path.join(root, "vision"), os.path.join(root, "llm"), name,
                              0 if name == "linear" else M, cfg.lora_r, 2 * cfg.lora_r, 0.0, dtype=dtype,
                              attn_implementation="eager", **options)
    model.to(device)
    side = model.vision_tower.config.image_size
    B, T = cfg.batch_size, cfg.text_tokens
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 32000, (B, T), generator=g)
    ids[:, 1] = IMAGE_TOKEN_INDEX
    batch = dict(input_ids=ids.to(device), attention_mask=torch.ones(B, T, dtype=torch.long, device=device),
                 labels=ids.clamp(min=0).to(device), pixel_values=torch.randn(B, 3, side, side, generator=g).to(device))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    model.train()

    def step():
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            loss, _ = model(**batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_time = timed(step, cfg.steps, cfg.warmup, device)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None

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
                step_s=step_time, samples_per_s=B / step_time, peak_gib=peak,
                generate_tokens_per_s_cache=B * cfg.new_tokens / gen[True],
                generate_tokens_per_s_no_cache=B * cfg.new_tokens / gen[False], cache_speedup=gen[False] / gen[True],
                forward_backward_s=fb, rgae_s=maps, rgae_over_fb=maps / fb, rgae_batched_s=batched,
                rgae_batched_over_fb=batched / fb)


def table(rows):
    cols = [("projector", "{}"), ("visual_tokens", "{}"), ("trainable_params", "{:,}"), ("step_s", "{:.3f}"),
            ("samples_per_s", "{:.1f}"), ("generate_tokens_per_s_cache", "{:.0f}"), ("cache_speedup", "{:.1f}x"),
            ("forward_backward_s", "{:.3f}"), ("rgae_s", "{:.3f}"), ("rgae_over_fb", "{:.1f}x"),
            ("rgae_batched_s", "{:.3f}"), ("rgae_batched_over_fb", "{:.1f}x")]
    lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + " --- |" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f.format(r[c]) for c, f in cols) + " |")
    return "\n".join(lines)


def main(argv):
    cfg, _ = parse_args(BenchConfig, argv)
    print(json.dumps(dataclasses.asdict(cfg), indent=2))
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    with tempfile.TemporaryDirectory() as root:
        save_models(cfg, root)
        for name in cfg.projectors.split(","):
            rows.append(bench_projector(cfg, root, name, device))
            print(json.dumps(rows[-1]))
    print(table(rows))
    with open(cfg.out, "w") as f:
        json.dump(dict(config=dataclasses.asdict(cfg), device=str(device), torch=torch.__version__,
                       threads=torch.get_num_threads(), rows=rows), f, indent=2)
    print(f"wrote {cfg.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
