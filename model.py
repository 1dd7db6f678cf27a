"""
The multimodal LLM of LLaVA-1.5 (Liu et al., 2023, "Improved Baselines with Visual Instruction Tuning"), with any
projector of projectors.py between its two halves:

  image -> frozen vision tower (hidden_states[-2], CLS dropped) -> projector -> M visual tokens
  prompt ids with one IMAGE_TOKEN_INDEX placeholder -> the placeholder replaced by the M visual tokens -> causal LLM

Any Hugging Face CLIP or SigLIP vision model and any AutoModelForCausalLM, by hub name or local folder. LoRA
through peft. Only what trains (projector, LoRA) is saved, as safetensors. A Hugging Face LLaVA-1.5 checkpoint
(LlavaForConditionalGeneration) imports into the same model with the linear projector.
"""
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel,
                          LlavaForConditionalGeneration, SiglipVisionModel)

from projectors import BLIP2_PREFIXES, build_projector

IGNORE_INDEX = -100  # label of every position without a loss
IMAGE_TOKEN_INDEX = -200  # the id data.py puts where `<image>` stood; replaced by the M visual tokens here

VISION_TOWERS = {  # config.model_type -> class; a full CLIP/SigLIP checkpoint loads its vision half
    "clip": CLIPVisionModel, "clip_vision_model": CLIPVisionModel,
    "siglip": SiglipVisionModel, "siglip_vision_model": SiglipVisionModel,
}
WEIGHTS = "model.safetensors"  # trainable weights of a checkpoint folder
CONFIG = "config.json"  # the training config saved beside them

# -----------------------------------------------------------------------------
# the model


class MLLM(nn.Module):

    def __init__(self, vision_tower, projector, llm, num_visual_tokens, drop_cls, projector_name):
        super().__init__()
        self.projector_name = projector_name
        self.vision_tower = vision_tower.requires_grad_(False).eval()
        self.projector = projector
        self.llm = llm
        self.num_visual_tokens = num_visual_tokens
        self.drop_cls = drop_cls

    def train(self, mode=True):
        super().train(mode)
        self.vision_tower.eval()  # frozen: no dropout, whatever the mode
        return self

    @torch.no_grad()
    def patch_features(self, pixel_values):
        """The frozen tower's patch features, in the projector's dtype: [B, 3, H, W] -> [B, N, d_v]."""
        hidden = self.vision_tower(pixel_values.to(self.vision_tower.dtype), output_hidden_states=True)
        x = hidden.hidden_states[-2]  # [B, 1 + N, d_v]: second-to-last block, no post-LayerNorm
        if self.drop_cls:
            x = x[:, 1:]  # -> [B, N, d_v]
        return x.to(self.projector_dtype)

    def encode_images(self, pixel_values):
        return self.projector(self.patch_features(pixel_values))  # [B, 3, H, W] -> [B, M, d_llm]

    @property
    def projector_dtype(self):
        return next(self.projector.parameters()).dtype

    def splice(self, input_ids, attention_mask, labels, pixel_values, left_pad=False):
        """Replace each sample's IMAGE_TOKEN_INDEX by its M visual tokens and re-pad the batch.
        Returns inputs_embeds [B, T', d_llm], attention_mask [B, T'], labels [B, T'] (or None), position_ids [B, T']."""
        has_image = (input_ids == IMAGE_TOKEN_INDEX).any(1)
        # a batch without images still runs the projector once: its zero-length slice keeps the projector in the
        # graph, so DDP sees every trainable parameter used
        images = pixel_values[has_image] if has_image.any() else pixel_values[:1]
        image_embeds = self.encode_images(images)  # [B_img, M, d_llm]
        embed_tokens = self.llm.get_input_embeddings()
        token_embeds = embed_tokens(input_ids.clamp(min=0))  # [B, T, d_llm], placeholder rows overwritten below
        seqs, seq_labels, k = [], [], 0
        for b in range(input_ids.shape[0]):
            keep = attention_mask[b].bool()
            ids, emb = input_ids[b][keep], token_embeds[b][keep]
            lab = labels[b][keep] if labels is not None else torch.full_like(ids, IGNORE_INDEX)
            if has_image[b]:
                p = int((ids == IMAGE_TOKEN_INDEX).nonzero()[0])
                img, k = image_embeds[k], k + 1
                emb = torch.cat([emb[:p], img.to(emb.dtype), emb[p + 1:]])
                lab = torch.cat([lab[:p], lab.new_full((len(img),), IGNORE_INDEX), lab[p + 1:]])
            else:
                emb = torch.cat([emb, image_embeds[0, :0].to(emb.dtype)])
            seqs.append(emb)
            seq_labels.append(lab)
        return pad_sequences(seqs, seq_labels if labels is not None else None, left_pad)

    def forward(self, input_ids, attention_mask, labels, pixel_values):
        """(loss, logits [B, K, V]) at the K positions whose next token some sample supervises (every position when
        none is): the LM head never runs on the visual tokens, most of a LLaVA sequence."""
        inputs_embeds, attention_mask, labels, position_ids = self.splice(input_ids, attention_mask, labels,
                                                                          pixel_values)
        # position t predicts token t + 1: shift the labels, not the logits, whose slice would copy [B, T', V]
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # [B, T']
        keep = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(1)
        if len(keep) == 0:
            keep = torch.arange(targets.shape[1], device=targets.device)
        logits = self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                          logits_to_keep=keep).logits  # [B, K, V]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets[:, keep].flatten(), ignore_index=IGNORE_INDEX)
        return loss, logits

    @torch.no_grad()
    def generate(self, prompts, pixel_values=None, max_new_tokens=128, eos_token_id=None, pad_token_id=0,
                 use_cache=True):
        """Batched greedy decoding with left padding. prompts: list of id lists, each with at most one
        IMAGE_TOKEN_INDEX; pixel_values [B, 3, H, W]. Returns the new ids of each prompt, eos stripped."""
        B, T = len(prompts), max(len(p) for p in prompts)
        input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(B, T, dtype=torch.long)
        for b, p in enumerate(prompts):
            input_ids[b, T - len(p):] = torch.tensor(p)
            attention_mask[b, T - len(p):] = 1
        device = self.llm.get_input_embeddings().weight.device
        if pixel_values is None:
            pixel_values = torch.zeros(1, 3, 1, 1)  # never encoded: no prompt has an image
            if (input_ids == IMAGE_TOKEN_INDEX).any():
                raise ValueError("a prompt has an <image> placeholder but no pixel_values were given")
        x, attention_mask, _, position_ids = self.splice(input_ids.to(device), attention_mask.to(device), None,
                                                         pixel_values.to(device), left_pad=True)
        embed_tokens = self.llm.get_input_embeddings()
        new_ids = torch.zeros(B, 0, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        cache = None
        for _ in range(max_new_tokens):
            out = self.llm(inputs_embeds=x, attention_mask=attention_mask, position_ids=position_ids,
                           cache=cache, use_cache=use_cache, logits_to_keep=1)
            next_id = out.logits[:, -1].argmax(-1)  # [B]
            next_id = next_id.masked_fill(done, pad_token_id)
            new_ids = torch.cat([new_ids, next_id[:, None]], 1)
            done |= next_id == eos_token_id
            if done.all():
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], 1)
            next_embed, next_pos = embed_tokens(next_id)[:, None], position_ids[:, -1:] + 1
            if use_cache:  # feed only the new token; the cache holds the keys and values of the rest
                x, position_ids, cache = next_embed, next_pos, out.cache
            else:
                x, position_ids = torch.cat([x, next_embed], 1), torch.cat([position_ids, next_pos], 1)
        return [strip_eos(row.tolist(), eos_token_id) for row in new_ids]


def pad_sequences(seqs, seq_labels, left_pad):
    # list of [T_b, d] -> [B, T, d], attention_mask [B, T], labels [B, T] or None, position_ids [B, T]
    B, T, d = len(seqs), max(len(s) for s in seqs), seqs[0].shape[-1]
    embeds = seqs[0].new_zeros(B, T, d)
    attention_mask = torch.zeros(B, T, dtype=torch.long, device=embeds.device)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long, device=embeds.device)
    for b, s in enumerate(seqs):
        span = slice(T - len(s), T) if left_pad else slice(0, len(s))
        embeds[b, span] = s
        attention_mask[b, span] = 1
        if seq_labels is not None:
            labels[b, span] = seq_labels[b]
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # positions count real tokens only
    return embeds, attention_mask, labels if seq_labels is not None else None, position_ids


def strip_eos(ids, eos_token_id):
    return ids[:ids.index(eos_token_id)] if eos_token_id in ids else ids


# -----------------------------------------------------------------------------
# building from Hugging Face parts


def load_vision_tower(name, dtype=torch.float32):
    """A CLIP or SigLIP vision model by hub name or folder -> (tower, image_processor, drop_cls)."""
    model_type = AutoConfig.from_pretrained(name).model_type
    if model_type not in VISION_TOWERS:
        raise ValueError(f"{name}: vision tower of type {model_type!r} is not supported; "
                         f"use one of {', '.join(VISION_TOWERS)}")
    tower = VISION_TOWERS[model_type].from_pretrained(name, dtype=dtype)
    processor = AutoImageProcessor.from_pretrained(name)
    return tower, processor, model_type.startswith("clip")  # CLIP has a CLS token in front, SigLIP none


def load_llm(name, dtype=torch.float32, attn_implementation=None):
    llm = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation=attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:  # Vicuna/Llama have none; LLaVA pads with unk
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return llm, tokenizer


def tower_geometry(tower):
    """(N, d_v): the patches on the tower's grid (CLS excluded) and their width."""
    c = tower.config
    return (c.image_size // c.patch_size) ** 2, c.hidden_size


def default_num_tokens(projector, N):
    # the paper's compression: the patch grid halved per side (24x24 -> 12x12, 576 -> 144); linear keeps all N
    return N if projector == "linear" else (math.isqrt(N) // 2) ** 2


def add_lora(llm, r, alpha, dropout):
    # LLaVA-1.5's LoRA: every Linear of the LLM except lm_head ("all-linear" leaves the output layer out)
    from peft import LoraConfig, get_peft_model
    return get_peft_model(llm, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear"))


def build_model(vision_tower, llm, projector, num_tokens=None, lora_r=0, lora_alpha=16, lora_dropout=0.0,
                dtype=torch.float32, attn_implementation=None, **projector_options):
    """Returns (model, tokenizer, image_processor). Frozen halves in `dtype`; the projector (and LoRA) in fp32."""
    tower, processor, drop_cls = load_vision_tower(vision_tower, dtype)
    lm, tokenizer = load_llm(llm, dtype, attn_implementation)
    lm.requires_grad_(False)
    N, d_v = tower_geometry(tower)
    M = num_tokens or default_num_tokens(projector, N)
    proj = build_projector(projector, d_v, lm.config.hidden_size, N, M, **projector_options)
    if lora_r > 0:
        lm = add_lora(lm, lora_r, lora_alpha, lora_dropout)
    model = MLLM(tower, proj, lm, M, drop_cls, projector)
    return model, tokenizer, processor


def import_llava(path, dtype=torch.float32, attn_implementation=None):
    """A Hugging Face LLaVA-1.5 checkpoint (e.g. llava-hf/llava-1.5-7b-hf) as our MLLM with the linear projector."""
    llava = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    c = llava.config
    if c.vision_feature_layer != -2 or c.vision_feature_select_strategy != "default":
        raise ValueError(f"{path}: only vision_feature_layer -2 with strategy 'default' (LLaVA-1.5) is supported, "
                         f"got {c.vision_feature_layer} / {c.vision_feature_select_strategy}")
    tower = llava.model.vision_tower
    lm = AutoModelForCausalLM.from_config(c.text_config, dtype=dtype, attn_implementation=attn_implementation)
    lm.model, lm.lm_head = llava.model.language_model, llava.lm_head
    N, d_v = tower_geometry(tower)
    proj = build_projector("linear", d_v, lm.config.hidden_size, N).to(dtype)
    src = llava.model.multi_modal_projector
    proj[0].load_state_dict(src.linear_1.state_dict())
    proj[2].load_state_dict(src.linear_2.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    model = MLLM(tower.requires_grad_(False), proj, lm.requires_grad_(False), N, True, "linear")
    return model, tokenizer, AutoImageProcessor.from_pretrained(path)


# -----------------------------------------------------------------------------
# saving and loading what trains


def trainable_state_dict(model):
    return {k: v.detach().contiguous().cpu() for k, v in model.named_parameters() if v.requires_grad}


def save_trainable(model, path, metadata=None):
    # linear, avgpool and maxpool have the same tensors: the metadata tells them (and their M) apart
    identity = dict(projector=model.projector_name, num_tokens=str(model.num_visual_tokens))
    save_file(trainable_state_dict(model), path, metadata={**identity, **(metadata or {})})


def load_trainable(model, path, prefix=""):
    """Load saved trainable weights whose names start with `prefix`; every such trainable parameter of the model
    must be in the file with the same shape (a checkpoint of another projector or size fails here)."""
    with safe_open(path, "pt") as f:
        saved = f.metadata() or {}
    for key, ours in (("projector", model.projector_name), ("num_tokens", str(model.num_visual_tokens))):
        if key in saved and saved[key] != ours:
            raise ValueError(f"{path}: checkpoint of {key} {saved[key]}, this model has {ours}")
    state = {k: v for k, v in load_file(path).items() if k.startswith(prefix)}
    params = {k: p for k, p in model.named_parameters() if k.startswith(prefix) and p.requires_grad}
    missing, unexpected = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
    if missing or unexpected:
        raise ValueError(f"{path}: does not fit this model: missing {missing[:3]}{'...' if len(missing) > 3 else ''}"
                         f" unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
    for k, v in state.items():
        if v.shape != params[k].shape:
            raise ValueError(f"{path}: tensor {k} has shape {tuple(v.shape)}, the model has {tuple(params[k].shape)}")
        with torch.no_grad():
            params[k].copy_(v)


def load_model(path, device="cpu", dtype=torch.float32, attn_implementation=None):
    """A checkpoint folder written by train.py (config.json + model.safetensors, or a run folder holding `ckpt/`),
    or a Hugging Face LLaVA checkpoint. Returns (model, tokenizer, image_processor, cfg)."""
    if os.path.isfile(os.path.join(path, "ckpt", WEIGHTS)):
        path = os.path.join(path, "ckpt")
    cfg = {}
    if os.path.isfile(os.path.join(path, CONFIG)):
        with open(os.path.join(path, CONFIG)) as f:
            cfg = json.load(f)
    if cfg.get("model_type") == "llava" or not os.path.isfile(os.path.join(path, CONFIG)):
        model, tokenizer, processor = import_llava(path, dtype, attn_implementation)
        return model.to(device).eval(), tokenizer, processor, {"llava": path}
    if "projector" not in cfg or not os.path.isfile(os.path.join(path, WEIGHTS)):
        raise ValueError(f"{path}: not a checkpoint of train.py ({CONFIG} with a projector + {WEIGHTS}) "
                         "nor a LLaVA checkpoint")
    model, tokenizer, processor = build_model(**model_args(cfg), dtype=dtype, attn_implementation=attn_implementation)
    load_trainable(model, os.path.join(path, WEIGHTS))
    return model.to(device).eval(), tokenizer, processor, cfg


def model_args(cfg):
    """The build_model arguments of a training config (train.py's TrainConfig as a dict)."""
    lora = cfg["lora_r"] if cfg["stage"] != "pretrain" else 0
    return dict(vision_tower=cfg["vision_tower"], llm=cfg["llm"], projector=cfg["projector"],
                num_tokens=cfg["num_tokens"], lora_r=lora, lora_alpha=cfg["lora_alpha"],
                lora_dropout=cfg["lora_dropout"], **parse_projector_options(cfg.get("projector_options", "")))


def parse_projector_options(text):
    """"num_layers=4,hidden_size=512" -> {"num_layers": 4, "hidden_size": 512} (every option is an integer)."""
    options = {}
    for item in filter(None, text.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"projector_options: {item!r} is not key=integer (e.g. num_layers=4,hidden_size=512)")
        options[key.strip()] = int(value)
    return options


def read_blip2(path):
    """The Q-Former tensors of a BLIP-2 checkpoint, for QFormer.load_blip2: a transformers folder (safetensors,
    sharded or not), a .safetensors file, or a LAVIS .pth (read with weights_only=True)."""
    wanted = tuple(p for p, _ in BLIP2_PREFIXES) + ("query_tokens", "language_projection.", "ln_vision.")
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    elif path.endswith(".safetensors"):
        files = [path]
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state)
        return {k: v for k, v in state.items() if k.startswith(wanted)}
    if not files:
        raise ValueError(f"{path}: no .safetensors file in this folder (a BLIP-2 checkpoint was expected)")
    state = {}
    for file in files:
        with safe_open(file, "pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys() if k.startswith(wanted)})
    return state
