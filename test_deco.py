"""
Tests on tiny synthetic models, CPU only, nothing downloaded. Each checks behaviour against something independent:
a formula, transformers' own implementation, or a case worked out by hand. In the reading order of the project:
the shared tiny parts, then data.py, model.py, projectors.py, train.py, eval.py, shapes.py, rgae.py, bench.py,
experiments.py, and last the imports between them.
"""
import filecmp
import hashlib
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig,
                          LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration, PreTrainedTokenizerFast)

import data
import eval as ev
import model as M
import shapes
import experiments as ex
import train
from config import parse_args
from data import IGNORE_INDEX as X, IMAGE_TOKEN_INDEX as IMG
from projectors import build_projector

HERE = os.path.dirname(os.path.abspath(__file__))
STAND_IN_LLM = os.path.join(shapes.STAND_INS, "llm")  # the shipped stand-in Vicuna's tokenizer: the world's

# -----------------------------------------------------------------------------
# tiny parts, saved with save_pretrained and loaded back through from_pretrained like real ones

LLM_WORDS = ["<pad>", "<s>", "</s>", "<unk>", "a", "red", "circle", "what", "colour", "is", "the", "?", "USER", ":",
         "ASSISTANT", "chat"]


def word_tokenizer(words=None):
    words = words or LLM_WORDS
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def tiny_vision_config(image_size=32, patch_size=8):
    return CLIPVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4)


def tiny_llama_config(vocab_size=len(LLM_WORDS)):
    return LlamaConfig(vocab_size=vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def clip_processor(size):
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A tiny CLIP tower (32 px, 4x4 patches) and a tiny Llama, in folders like hub checkpoints."""
    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    CLIPVisionModel(tiny_vision_config()).save_pretrained(root / "vision")
    clip_processor(32).save_pretrained(root / "vision")
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(root / "llm")
    word_tokenizer().save_pretrained(root / "llm")
    return str(root / "vision"), str(root / "llm")


# ---- a small shapes world, tiny models over its tokenizer, and train.py's arguments for them


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small shapes world, a 4x4-patch CLIP tower and a random Llama over the world's tokenizer."""
    root = tmp_path_factory.mktemp("world")
    w = shapes.build_shapes_world(str(root / "shapes"), seed=0, n_train=64, n_eval=4)
    tokenizer = AutoTokenizer.from_pretrained(STAND_IN_LLM)
    torch.manual_seed(0)
    CLIPVisionModel(tiny_vision_config(image_size=96, patch_size=24)).save_pretrained(root / "vision")
    clip_processor(96).save_pretrained(root / "vision")
    LlamaForCausalLM(tiny_llama_config(len(tokenizer))).save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    mixed = json.load(open(w["finetune"]))[:48] + json.load(open(w["text"]))[:16]  # image and text-only samples
    with open(root / "mixed.json", "w") as f:
        json.dump(mixed, f)
    return dict(w, vision=str(root / "vision"), llm=str(root / "llm"), mixed=str(root / "mixed.json"))


def train_args(world, out_dir, *extra):
    args = dict(vision_tower=world["vision"], llm=world["llm"], data_path=world["pretrain"],
                finetune_data_path=world["mixed"], image_folder=world["image_folder"], out_dir=str(out_dir),
                num_tokens=4, pretrain_batch_size=16, finetune_batch_size=16, micro_batch_size=8, max_length=256,
                lora_r=4, lora_alpha=8, num_workers=0, pretrain_lr=1e-2, finetune_lr=1e-2,
                finetune_projector_lr=1e-2)
    return [f"--{k}={v}" for k, v in args.items()] + list(extra)


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


# =============================================================================
# data.py

# -----------------------------------------------------------------------------
# a word-level tokenizer whose ids can be written by hand: spaces separate words, "\n" is a word of its own,
# and every word of SYSTEM is <unk>

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "USER:", "ASSISTANT:", "\n", "what", "colour?", "shape?", "red", "circle"]
PAD, BOS, EOS, UNK, USER, ASSISTANT, NL, WHAT, COLOUR, SHAPE, RED, CIRCLE = range(len(WORDS))
SYS = [UNK] * len(data.SYSTEM.split())


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(" ", "removed"),
                                               pre_tokenizers.Split(Regex("\n"), "isolated")])
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def processor():
    from transformers import CLIPImageProcessor
    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def conv(*values):
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(values)]


TWO_TURNS = conv("<image>\nwhat colour?", "red", "what shape?", "circle")

# -----------------------------------------------------------------------------
# templates


def test_vicuna_two_turns_by_hand(tok):
    ids, labels = data.tokenize_conversation(tok, TWO_TURNS, "vicuna_v1")
    expected_ids = ([BOS] + SYS + [USER, IMG, NL, WHAT, COLOUR, ASSISTANT, RED, EOS]
                    + [USER, WHAT, SHAPE, ASSISTANT, CIRCLE, EOS])
    expected_labels = [X] * (1 + len(SYS)) + [X] * 6 + [RED, EOS] + [X] * 4 + [CIRCLE, EOS]
    assert ids == expected_ids
    assert labels == expected_labels


def test_plain_by_hand(tok):
    ids, labels = data.tokenize_conversation(tok, conv("<image>\nwhat colour?", "red circle"), "plain")
    assert ids == [BOS, IMG, RED, CIRCLE, NL]  # human text dropped
    assert labels == [X, X, RED, CIRCLE, NL]


def test_image_after_text(tok):
    ids, labels = data.tokenize_conversation(tok, conv("what colour?\n<image>", "red"), "vicuna_v1")
    assert ids == [BOS] + SYS + [USER, WHAT, COLOUR, NL, IMG, ASSISTANT, RED, EOS]
    assert labels == [X] * (1 + len(SYS)) + [X] * 6 + [RED, EOS]


@pytest.mark.parametrize("template", ["vicuna_v1", "plain"])
@pytest.mark.parametrize("question", ["<image>\nwhat colour?", "what shape?\n<image>", "what colour?"])
def test_prompt_ids_is_the_unsupervised_prefix(tok, template, question):
    ids, labels = data.tokenize_conversation(tok, conv(question, "red"), template)
    first_label = next(k for k, label in enumerate(labels) if label != X)
    assert data.prompt_ids(tok, question, template) == ids[:first_label]


def test_prompt_ids_vicuna_by_hand(tok):
    assert data.prompt_ids(tok, "<image>\nwhat colour?") == [BOS] + SYS + [USER, IMG, NL, WHAT, COLOUR, ASSISTANT]


@pytest.mark.parametrize("conversations, message", [
    (conv("<image>\nwhat colour?"), "no assistant turn"),
    (conv("what colour?", "red", "what shape?"), "no assistant reply"),
    ([{"from": "gpt", "value": "red"}, {"from": "human", "value": "what?"}], "conversations[0].from"),
    ([{"from": "human", "value": "what?"}, {"from": "gpt", "value": 3}], "conversations[1].value"),
    (conv("<image> what", "red <image>"), "assistant turn"),
])
def test_bad_conversations(tok, conversations, message):
    with pytest.raises(ValueError, match=r"^f\.json: record 7") as e:
        data.tokenize_conversation(tok, conversations, "vicuna_v1", where="f.json: record 7")
    assert message in str(e.value)


# -----------------------------------------------------------------------------
# images


def test_expand2square_centres_and_pads_with_background():
    img = data.expand2square(Image.new("RGB", (40, 20), (255, 0, 0)), (1, 2, 3))
    assert img.size == (40, 40)
    assert img.getpixel((20, 2)) == (1, 2, 3) and img.getpixel((20, 37)) == (1, 2, 3)
    assert img.getpixel((0, 10)) == (255, 0, 0) and img.getpixel((39, 29)) == (255, 0, 0)


def test_load_image_pad_uses_the_processor_mean(tmp_path, processor):
    path = tmp_path / "wide.png"
    Image.new("RGB", (64, 16), (255, 0, 0)).save(path)
    x = data.load_image(path, processor, "pad")  # 64x64 square, resized to 32x32
    assert x.shape == (3, 32, 32)
    # the mean colour normalises to ~0 (int() truncation costs at most 1/255 before dividing by std)
    assert x[:, :4].abs().max() < 0.02 and x[:, -4:].abs().max() < 0.02
    assert x[0, 16, 16] > 1.5  # red stays red in the middle band
    crop = data.load_image(path, processor, "crop")  # short side to 32, centre crop: red everywhere
    assert crop.shape == (3, 32, 32) and crop[0].min() > 1.5


# -----------------------------------------------------------------------------
# the dataset: truncation, bad inputs, skipping, collation


def write_dataset(tmp_path, records, image=True):
    if image:
        Image.new("RGB", (20, 30), (0, 0, 255)).save(tmp_path / "a.png")
    path = tmp_path / "d.json"
    path.write_text(json.dumps(records))
    return str(path)


def dataset(path, tmp_path, tok, processor, M=4, max_length=64, template="vicuna_v1", **kw):
    return data.LlavaDataset(path, str(tmp_path), tok, processor, template, "pad", M, max_length, **kw)


def test_sample_and_truncation_budget(tmp_path, tok, processor):
    path = write_dataset(tmp_path, [{"id": "s0", "image": "a.png", "conversations": TWO_TURNS},
                                    {"id": "s1", "conversations": conv("what colour?", "red")}])
    full = len(SYS) + 15
    s = dataset(path, tmp_path, tok, processor)[0]
    assert len(s["input_ids"]) == full and s["pixel_values"].shape == (3, 32, 32)
    # with an image the M visual tokens replace one id: T - 1 + M <= max_length
    s = dataset(path, tmp_path, tok, processor, M=5, max_length=full - 2)[0]
    assert len(s["input_ids"]) == full - 6
    assert s["labels"].tolist()[-2:] == [RED, EOS]
    s = dataset(path, tmp_path, tok, processor, M=5, max_length=len(SYS) + 6)[1]  # text-only: T <= max_length
    assert len(s["input_ids"]) == len(SYS) + 6 and s["pixel_values"] is None


def test_truncation_to_nothing_raises(tmp_path, tok, processor):
    path = write_dataset(tmp_path, [{"id": "s0", "image": "a.png", "conversations": TWO_TURNS}])
    ds = dataset(path, tmp_path, tok, processor, M=4, max_length=len(SYS) + 8)
    with pytest.raises(ValueError, match=r"d\.json: record 0 \(id s0\): field 'conversations' has no supervised"):
        ds[0]


def test_missing_and_corrupt_images(tmp_path, tok, processor):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    path = write_dataset(tmp_path, [{"id": "a", "image": "nope.png", "conversations": TWO_TURNS},
                                    {"id": "b", "image": "bad.png", "conversations": TWO_TURNS}])
    ds = dataset(path, tmp_path, tok, processor)
    with pytest.raises(ValueError, match=r"d\.json: record 0 \(id a\): field 'image': .*nope\.png: cannot read"):
        ds[0]
    with pytest.raises(ValueError, match=r"d\.json: record 1 \(id b\): field 'image': .*bad\.png: cannot read"):
        ds[1]


def test_malformed_json(tmp_path, tok, processor):
    path = tmp_path / "d.json"
    path.write_text('[{"id": "a", "conversations": []},\n {"id": }]')
    with pytest.raises(ValueError, match=r"d\.json: malformed JSON at line 2 column"):
        dataset(str(path), tmp_path, tok, processor)


@pytest.mark.parametrize("record, message", [
    ({"id": "a", "image": "a.png", "conversations": conv("<image>\nwhat colour?")},
     r"record 0 \(id a\): conversation has no assistant turn"),
    ({"id": "a", "image": "a.png"}, r"record 0 \(id a\): field 'conversations' is missing"),
    ({"id": "a", "image": "a.png", "conversations": conv("what colour?", "red")},
     r"record 0 \(id a\): field 'conversations' needs one <image>"),
    ({"id": "a", "conversations": conv("<image>\nwhat colour?", "red")}, r"record 0 \(id a\): field 'image'"),
])
def test_bad_records_fail_on_load(tmp_path, tok, processor, record, message):
    path = write_dataset(tmp_path, [record])
    with pytest.raises(ValueError, match=r"d\.json: " + message):
        dataset(path, tmp_path, tok, processor)


def test_skip_bad_counts_and_collate_drops(tmp_path, tok, processor):
    path = write_dataset(tmp_path, [{"id": "ok", "image": "a.png", "conversations": TWO_TURNS},
                                    {"id": "gone", "image": "nope.png", "conversations": TWO_TURNS},
                                    {"id": "text", "conversations": conv("what colour?", "red")},
                                    {"id": "broken", "conversations": conv("what colour?")}])
    ds = dataset(path, tmp_path, tok, processor, skip_bad=True)
    assert ds.num_skipped == 1  # "broken", on load
    batch = data.collate([ds[i] for i in range(len(ds))], pad_id=PAD, image_size=32)
    assert ds.num_skipped == 2
    T = len(SYS) + 15
    assert batch["input_ids"].shape == (2, T) and batch["labels"].shape == (2, T)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["has_image"].tolist() == [True, False]
    n_text = len(SYS) + 7
    assert batch["attention_mask"].sum(1).tolist() == [T, n_text]
    assert (batch["input_ids"][1, n_text:] == PAD).all() and (batch["labels"][1, n_text:] == X).all()
    assert (batch["pixel_values"][1] == 0).all()
    assert data.collate([None], pad_id=PAD, image_size=32) is None


# =============================================================================
# model.py: the MLLM


def test_llava_import_matches_transformers(tmp_path):
    """Our model built from a Hugging Face LLaVA checkpoint gives transformers' logits for the same image and prompt."""
    torch.manual_seed(0)
    vocab = LLM_WORDS + ["<image>"]
    cfg = LlavaConfig(vision_config=tiny_vision_config(), text_config=tiny_llama_config(len(vocab)),
                      image_token_index=len(vocab) - 1)
    llava = LlavaForConditionalGeneration(cfg).eval()
    llava.save_pretrained(tmp_path)
    word_tokenizer(vocab).save_pretrained(tmp_path)
    clip_processor(32).save_pretrained(tmp_path)

    ours, _, _, _ = M.load_model(str(tmp_path))
    pixel_values = torch.randn(1, 3, 32, 32)
    text_before, text_after = [1, 7, 8], [9, 10, 6, 11]
    n = 16  # 4x4 patches, CLS dropped
    theirs = llava(input_ids=torch.tensor([text_before + [cfg.image_token_index] * n + text_after]),
                   pixel_values=pixel_values).logits
    ids = torch.tensor([text_before + [M.IMAGE_TOKEN_INDEX] + text_after])
    mine = ours(ids, torch.ones_like(ids), torch.full_like(ids, M.IGNORE_INDEX), pixel_values)[1]
    assert mine.shape == theirs.shape
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-4)
    import rgae  # R-GAE runs on the imported model too (it switches the LLM to eager attention itself)
    maps = rgae.relevance(ours, pixel_values[0], text_before + [M.IMAGE_TOKEN_INDEX], text_after)
    assert maps["text_to_patch"].shape == (n,) and maps["text_to_query"].sum() > 0
    torch.testing.assert_close(maps["query_to_patch"], torch.eye(n))


def test_text_only_and_image_samples_share_a_batch(parts):
    vision, llm = parts
    model, _, _ = M.build_model(vision, llm, "avgpool", 4)
    ids = torch.tensor([[1, 4, M.IMAGE_TOKEN_INDEX, 5, 6], [1, 7, 8, 9, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    labels = torch.tensor([[-100, -100, -100, 5, 6], [-100, -100, 8, 9, -100]])
    pixel_values = torch.randn(2, 3, 32, 32)
    loss, logits = model(ids, mask, labels, pixel_values)
    # spliced: [1, 4, v, v, v, v, 5, 6] and [1, 7, 8, 9, pad...]; the positions predicting a label: 1, 2, 5, 6
    assert logits.shape[:2] == (2, 4)
    loss.backward()  # every projector parameter is in the graph, even for the text-only sample
    assert all(p.grad is not None for p in model.projector.parameters())
    with torch.no_grad():  # the same loss from the logits of every position
        embeds, attention, spliced, positions = model.splice(ids, mask, labels, pixel_values)
        full = model.llm(inputs_embeds=embeds, attention_mask=attention, position_ids=positions).logits
        torch.testing.assert_close(full[:, [1, 2, 5, 6]], logits)
        torch.testing.assert_close(loss, F.cross_entropy(full[:, :-1].flatten(0, 1), spliced[:, 1:].flatten()))


def test_batched_generation_equals_one_by_one(parts):
    """Left padding and the KV cache change nothing: batched greedy = each prompt alone without a cache."""
    vision, llm = parts
    torch.manual_seed(0)
    model, _, _ = M.build_model(vision, llm, "avgpool", 4)
    model.eval()
    prompts = [[1, 4, M.IMAGE_TOKEN_INDEX, 5], [1, M.IMAGE_TOKEN_INDEX, 7, 8, 9, 10]]
    images = torch.randn(2, 3, 32, 32)
    batched = model.generate(prompts, images, max_new_tokens=6, eos_token_id=-1)
    alone = [model.generate([p], images[i:i + 1], max_new_tokens=6, eos_token_id=-1, use_cache=False)[0]
             for i, p in enumerate(prompts)]
    assert batched == alone and all(len(a) == 6 for a in alone)


def test_save_load_round_trip(parts, tmp_path):
    vision, llm = parts
    torch.manual_seed(0)
    model, _, _ = M.build_model(vision, llm, "avgpool", 4, lora_r=4, lora_alpha=8)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    M.save_trainable(model, tmp_path / "w.safetensors")
    torch.manual_seed(1)
    other, _, _ = M.build_model(vision, llm, "avgpool", 4, lora_r=4, lora_alpha=8)
    M.load_trainable(other, tmp_path / "w.safetensors")
    a, b = M.trainable_state_dict(model), M.trainable_state_dict(other)
    assert a.keys() == b.keys() and any("lora_A" in k for k in a) and any(k.startswith("projector.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    wrong, _, _ = M.build_model(vision, llm, "avgpool", 9, lora_r=4, lora_alpha=8)  # another M: nothing loads silently
    with pytest.raises(ValueError):
        M.load_trainable(wrong, tmp_path / "w.safetensors")


def test_lora_on_every_linear_but_lm_head(parts):
    vision, llm = parts
    model, _, _ = M.build_model(vision, llm, "linear", lora_r=4, lora_alpha=8)
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in model.llm.named_parameters() if ".lora_A." in n}
    linears = {n for n, m in model.llm.named_modules() if type(m) is torch.nn.Linear and "lora_" not in n
               and not n.endswith("lm_head")}
    assert {n.rsplit(".base_layer", 1)[0] for n in linears} == wrapped
    assert not any("lm_head" in n for n in wrapped)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_vision_features_are_the_penultimate_layer_without_cls(parts, tmp_path, kind):
    """CLIP: hidden_states[-2] minus its CLS row; SigLIP (no CLS): hidden_states[-2] as it is."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel
    vision, llm = parts
    if kind == "siglip":
        vision = str(tmp_path / "siglip")
        SiglipVisionModel(SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4)).save_pretrained(vision)
        SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(vision)
    model, _, processor = M.build_model(vision, llm, "linear")
    x = torch.randn(2, 3, 32, 32)
    hidden = model.vision_tower(x, output_hidden_states=True).hidden_states[-2]
    assert hidden.shape[1] == (17 if kind == "clip" else 16)
    expected = model.projector(hidden[:, 1:] if kind == "clip" else hidden)
    torch.testing.assert_close(model.encode_images(x), expected)
    assert model.num_visual_tokens == 16


def test_gradient_checkpointing_changes_no_gradient(parts):
    vision, llm = parts
    ids = torch.tensor([[1, 4, M.IMAGE_TOKEN_INDEX, 5, 6, 7]])
    labels = torch.tensor([[-100, -100, -100, 5, 6, 7]])
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model, _, _ = M.build_model(vision, llm, "avgpool", 4, lora_r=4, lora_alpha=8)
        if checkpointing:
            model.llm.activation_checkpointing_enable()  # non-reentrant by default
        model.train()
        model(ids, torch.ones_like(ids), labels, torch.ones(1, 3, 32, 32))[0].backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n])


def test_placeholder_ids_agree():
    assert data.IMAGE_TOKEN_INDEX == M.IMAGE_TOKEN_INDEX and data.IGNORE_INDEX == M.IGNORE_INDEX

# =============================================================================
# projectors.py


@pytest.mark.parametrize("name,M", [("linear", 16), ("avgpool", 4), ("maxpool", 4), ("avgpool", 9), ("qformer", 4),
                                    ("cabstractor", 4), ("cabstractor", 9), ("dabstractor", 4), ("dabstractor", 9)])
def test_projector_shapes(name, M):
    proj = build_projector(name, 32, 48, 16, M)
    assert proj(torch.randn(2, 16, 32)).shape == (2, M, 48)


def test_avgpool_is_mean_over_2x2_windows():
    torch.manual_seed(0)
    proj = build_projector("avgpool", 8, 12, 16, 4)
    x = torch.randn(2, 16, 8)  # a 4x4 grid, row-major
    grid = x.view(2, 4, 4, 8)
    windows = [grid[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2] for i in range(2) for j in range(2)]  # row-major
    pooled = torch.stack([w.mean((1, 2)) for w in windows], 1)
    torch.testing.assert_close(proj(x), proj[2](F.gelu(proj[0](pooled))))


def test_maxpool_is_max_over_2x2_windows():
    proj = build_projector("maxpool", 8, 12, 16, 4)
    x = torch.randn(1, 16, 8)
    grid = x.view(1, 4, 4, 8)
    windows = [grid[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2] for i in range(2) for j in range(2)]
    pooled = torch.stack([w.amax((1, 2)) for w in windows], 1)
    torch.testing.assert_close(proj(x), proj[2](F.gelu(proj[0](pooled))))


@pytest.mark.parametrize("args,match", [
    (("avgpool", 8, 8, 15, 4), "perfect square"),  # N not a grid
    (("avgpool", 8, 8, 16, 5), "perfect square"),  # M not a grid
    (("avgpool", 8, 8, 16, 25), "more than"),  # M > N
    (("linear", 8, 8, 16, 4), "keeps every patch"),
    (("pixelshuffle", 8, 8, 16, 4), "unknown projector"),
    (("qformer", 8, 8, 16, 25), "more than"),
    (("cabstractor", 8, 8, 16, 5), "perfect square"),
])
def test_projector_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        build_projector(*args)


def test_projector_refuses_features_of_another_shape():
    proj = build_projector("avgpool", 8, 12, 16, 4)
    for x in (torch.randn(1, 25, 8), torch.randn(1, 16, 10)):
        with pytest.raises(ValueError, match=r"expects features \[B, N, d_v\] = \[B, 16, 8\]"):
            proj(x)


def test_unknown_projector_option_is_refused():
    with pytest.raises(ValueError, match="avgpool takes the options none, got \\['num_layers'\\]"):
        build_projector("avgpool", 8, 12, 16, 4, num_layers=2)
    with pytest.raises(ValueError, match="qformer takes the options .*hidden_size.*, got \\['depth'\\]"):
        build_projector("qformer", 8, 12, 16, 4, depth=2)


def linear_params(i, o):
    return i * o + o


def test_parameter_counts_at_paper_configuration():
    """The parameter counts at the paper's configuration, from the layouts written out here, against modules built
    on the meta device."""
    d_v, d, N, M = 1024, 4096, 576, 144
    mlp = linear_params(d_v, d) + linear_params(d, d)
    q, f = 768, 3072  # qformer: 2 layers, cross-attention in layer 0 only (frequency 2)
    self_attn = 4 * linear_params(q, q) + 2 * q
    cross_attn = 2 * linear_params(q, q) + 2 * linear_params(d_v, q) + 2 * q
    ffn = linear_params(q, f) + linear_params(f, q) + 2 * q
    qformer = M * q + 2 * q + 2 * (self_attn + ffn) + cross_attn + linear_params(q, d)
    block = 2 * d_v * d_v + 9 * d_v + 3 * 2 * d_v + linear_params(d_v, d_v // 4) + linear_params(d_v // 4, d_v)
    cabstractor = N * d_v + 6 * block + linear_params(d_v, d) + linear_params(d, d)
    deform = linear_params(d_v, 8 * 4 * 2) + linear_params(d_v, 8 * 4) + 2 * linear_params(d_v, d_v)
    layer = 4 * linear_params(d_v, d_v) + deform + 2 * linear_params(d_v, d_v) + 3 * 2 * d_v
    dabstractor = N * d_v + M * d_v + M * 2 + 2 * layer + linear_params(d_v, d)
    assert (mlp, qformer, block, cabstractor, dabstractor) == (20_979_712, 20_194_816, 2_638_080, 37_398_016,
                                                               21_938_656)
    expected = dict(linear=mlp, avgpool=mlp, maxpool=mlp, qformer=qformer + 2 * d_v,  # + BLIP-2's ln_vision
                    cabstractor=cabstractor, dabstractor=dabstractor)
    with torch.device("meta"):
        for name, count in expected.items():
            proj = build_projector(name, d_v, d, N, N if name == "linear" else M)
            assert sum(p.numel() for p in proj.parameters()) == count, name


def tiny_blip2(frequency):
    from transformers import Blip2Config, Blip2Model
    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=16, patch_size=8, layer_norm_eps=1e-5),
        qformer_config=dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                            cross_attention_frequency=frequency, encoder_hidden_size=32),
        text_config=dict(model_type="opt", hidden_size=48, num_hidden_layers=1, ffn_dim=64, num_attention_heads=4,
                         vocab_size=64, word_embed_proj_dim=48, max_position_embeddings=64), num_query_tokens=4)
    torch.manual_seed(0)
    blip2 = Blip2Model(config).eval()
    with torch.no_grad():
        for p in blip2.parameters():  # far from the 0.02 init, so that a wrong wiring shows
            p.normal_(0.0, 0.5)
    return blip2


def blip2_reference(blip2, x):
    """transformers: language_projection(Blip2QFormerModel(query_embeds=query_tokens, encoder_hidden_states=x))
    with x the vision features after BLIP-2's ln_vision (transformers' post_layernorm)."""
    with torch.no_grad():
        hidden = blip2.qformer(query_embeds=blip2.query_tokens.expand(x.shape[0], -1, -1),
                               encoder_hidden_states=blip2.vision_model.post_layernorm(x)).last_hidden_state
        return blip2.language_projection(hidden)


def qformer_like(frequency, M=4):
    return build_projector("qformer", 32, 48, 16, M, hidden_size=24, num_heads=4, intermediate_size=40,
                           num_layers=2, cross_attention_frequency=frequency)


@pytest.mark.parametrize("frequency", [1, 2])
def test_qformer_equals_transformers_blip2(frequency, tmp_path):
    blip2 = tiny_blip2(frequency)
    blip2.save_pretrained(tmp_path)
    proj = qformer_like(frequency)
    loaded, reinitialised = proj.load_blip2(M.read_blip2(str(tmp_path)))
    assert reinitialised == [] and len(loaded) == len(list(proj.parameters()))
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(proj(x), blip2_reference(blip2, x), rtol=1e-4, atol=1e-4)


def test_qformer_loads_lavis_names_and_reinitialises_what_does_not_fit(tmp_path):
    blip2 = tiny_blip2(2)
    lavis = {}
    for k, v in blip2.state_dict().items():  # LAVIS's names for the same tensors
        k = k.replace("qformer.layernorm.", "Qformer.bert.embeddings.LayerNorm.").replace("qformer.", "Qformer.bert.")
        k = k.replace("vision_model.post_layernorm.", "ln_vision.").replace("language_projection.", "opt_proj.")
        lavis[k.replace("attention.attention.", "attention.self.")] = v
    torch.save({"model": lavis}, tmp_path / "blip2_pretrain.pth")
    proj = qformer_like(2)
    proj.load_blip2(M.read_blip2(str(tmp_path / "blip2_pretrain.pth")))
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(proj(x), blip2_reference(blip2, x), rtol=1e-4, atol=1e-4)
    # 9 queries instead of BLIP-2's 4 and a 64-wide LLM: those two tensors (+ bias) start afresh, the rest loads
    other = build_projector("qformer", 32, 64, 16, 9, hidden_size=24, num_heads=4, intermediate_size=40)
    before = other.query_tokens.detach().clone()
    loaded, reinitialised = other.load_blip2(M.read_blip2(str(tmp_path / "blip2_pretrain.pth")))
    assert reinitialised == ["query_tokens", "language_projection.weight", "language_projection.bias"]
    assert "encoder.layer.0.crossattention.attention.key.weight" in loaded and len(loaded) == 46
    assert not torch.equal(other.query_tokens, before) and abs(other.query_tokens.std().item() - 0.02) < 0.01


def regnet_block_by_hand(block, x):
    """Honeybee's RegNet block, written with functional ops: 1x1 conv, LN over channels, SiLU; depthwise 3x3, LN,
    SiLU; squeeze-excite; 1x1 conv, LN; + identity; SiLU."""
    def ln(h, norm):
        return F.layer_norm(h.permute(0, 2, 3, 1), h.shape[1:2], norm.weight, norm.bias, 1e-5).permute(0, 3, 1, 2)
    c = x.shape[1]
    h = F.silu(ln(F.conv2d(x, block.conv1.weight), block.norm1))
    h = F.silu(ln(F.conv2d(h, block.conv2.weight, padding=1, groups=c), block.norm2))
    s = h.mean((2, 3), keepdim=True)
    s = torch.sigmoid(F.conv2d(F.silu(F.conv2d(s, block.se_reduce.weight, block.se_reduce.bias)),
                               block.se_expand.weight, block.se_expand.bias))
    return F.silu(x + ln(F.conv2d(h * s, block.conv3.weight), block.norm3))


def test_cabstractor_by_hand():
    torch.manual_seed(0)
    proj = build_projector("cabstractor", 8, 12, 16, 4)
    with torch.no_grad():
        for p in proj.parameters():
            p.normal_(0.0, 0.3)
    x = torch.randn(2, 16, 8)
    h = (x + proj.pos_emb).transpose(1, 2).reshape(2, 8, 4, 4)  # row-major 4x4 grid, channels first
    for block in proj.net[:3]:
        h = regnet_block_by_hand(block, h)
    h = torch.stack([h[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean((2, 3)) for i in range(2) for j in range(2)], 1)
    h = h.transpose(1, 2).reshape(2, 8, 2, 2)
    for block in proj.net[4:]:
        h = regnet_block_by_hand(block, h)
    h = h.flatten(2).transpose(1, 2)
    torch.testing.assert_close(proj(x), proj.readout[2](F.silu(proj.readout[0](h))))


def deformable_by_grid_sample(value, locations, weights, side):
    """Deformable DETR's sampling with F.grid_sample (its pure-PyTorch reference): value [B, N, heads, dh],
    locations [B, M, heads, P, 2] in [0, 1], weights [B, M, heads, P] -> [B, M, heads * dh]."""
    B, N, H, dh = value.shape
    grid = 2 * locations - 1
    v = value.permute(0, 2, 3, 1).reshape(B * H, dh, side, side)
    sampled = F.grid_sample(v, grid.transpose(1, 2).flatten(0, 1), mode="bilinear", padding_mode="zeros",
                            align_corners=False)  # [B*H, dh, M, P]
    out = (sampled * weights.transpose(1, 2).flatten(0, 1)[:, None]).sum(-1)  # [B*H, dh, M]
    return out.view(B, H * dh, -1).transpose(1, 2)


def test_deformable_sampling_map_equals_grid_sample():
    from projectors import sampling_map
    torch.manual_seed(0)
    B, Mq, H, P, side, dh = 2, 5, 3, 4, 6, 4
    locations = torch.rand(B, Mq, H, P, 2) * 1.4 - 0.2  # some points fall off the map: zero padding
    locations.requires_grad_(True)
    weights = torch.rand(B, Mq, H, P).softmax(-1)
    value = torch.randn(B, side * side, H, dh)
    A = sampling_map(locations, weights, side)  # [B, H, M, N]
    ours = (A @ value.transpose(1, 2)).transpose(1, 2).flatten(2)
    reference = deformable_by_grid_sample(value, locations, weights, side)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    g_ours, = torch.autograd.grad(ours.square().sum(), locations)
    g_ref, = torch.autograd.grad(reference.square().sum(), locations)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-4)
    assert torch.all(A.sum(-1) <= 1 + 1e-6)  # a point's kernel weights sum to 1 on the map, less where it falls off


def test_dabstractor_equals_transformers_deformable_detr_layers():
    """The whole D-Abstractor by hand: features + pos-emb; query position = their 2x2 means; query content = the
    learned embedding; transformers' DeformableDetrDecoderLayer with our weights for each layer; the readout."""
    from transformers import DeformableDetrConfig
    from transformers.models.deformable_detr.modeling_deformable_detr import DeformableDetrDecoderLayer
    torch.manual_seed(0)
    proj = build_projector("dabstractor", 32, 48, 36, 9)
    with torch.no_grad():
        for p in proj.parameters():
            p.normal_(0.0, 0.3)
        for layer in proj.layers:  # a few patches away, some off the map
            layer.encoder_attn.sampling_offsets.bias.normal_(0.0, 2.0)
        proj.reference_points.uniform_(0.0, 1.0)
    config = DeformableDetrConfig(d_model=32, decoder_attention_heads=8, decoder_n_points=4, num_feature_levels=1,
                                  decoder_ffn_dim=32, activation_function="relu", dropout=0.0, attention_dropout=0.0,
                                  activation_dropout=0.0, use_timm_backbone=False, use_pretrained_backbone=False)
    x = torch.randn(2, 36, 32)
    with torch.no_grad():
        features = x + proj.pos_emb
        grid = features.view(2, 6, 6, 32)
        pos = torch.stack([grid[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean((1, 2)) for i in range(3) for j in range(3)], 1)
        h = proj.query_embed.weight.expand(2, -1, -1)
        for layer in proj.layers:
            theirs = DeformableDetrDecoderLayer(config).eval()
            theirs.load_state_dict(layer.state_dict())
            h = theirs(h, object_queries_position_embeddings=pos,
                       reference_points=proj.reference_points.expand(2, -1, -1)[:, :, None],
                       spatial_shapes=torch.tensor([[6, 6]]), spatial_shapes_list=[(6, 6)],
                       level_start_index=torch.tensor([0]), encoder_hidden_states=features)
        torch.testing.assert_close(proj(x), proj.readout(h), rtol=1e-4, atol=1e-4)


def test_dabstractor_initialisation():
    proj = build_projector("dabstractor", 1024, 64, 576, 144, num_layers=1)
    ref = proj.reference_points[0]  # (x, y), row-major over the 12x12 queries
    torch.testing.assert_close(ref[0], torch.tensor([0.5, 0.5]) / 24)
    torch.testing.assert_close(ref[13], torch.tensor([0.5 + 23 / 11, 0.5 + 23 / 11]) / 24)
    torch.testing.assert_close(ref[-1], torch.tensor([23.5, 23.5]) / 24)
    attn = proj.layers[0].encoder_attn
    offsets = attn.sampling_offsets.bias.view(8, 4, 2)  # head 0 looks right, head 2 down, point k at k patches
    torch.testing.assert_close(offsets[0], torch.tensor([[1.0, 0], [2, 0], [3, 0], [4, 0]]))
    torch.testing.assert_close(offsets[2, :, 1], torch.tensor([1.0, 2, 3, 4]), atol=1e-6, rtol=0)
    torch.testing.assert_close(offsets[1], torch.tensor([[1.0, 1], [2, 2], [3, 3], [4, 4]]))
    assert attn.sampling_offsets.weight.abs().sum() == 0 and attn.attention_weights.weight.abs().sum() == 0


@pytest.mark.parametrize("name,expected", [
    ("linear", []), ("avgpool", []), ("cabstractor", []),
    ("qformer", [("layer0.self", 4), ("layer0.cross", 16), ("layer1.self", 4)]),
    ("dabstractor", [("layer0.self", 4), ("layer0.deformable", 16), ("layer1.self", 4), ("layer1.deformable", 16)]),
])
def test_attention_recording(name, expected):
    from projectors import record_attention
    proj = build_projector(name, 32, 48, 16, 16 if name == "linear" else 4)
    x = torch.randn(2, 16, 32)
    with record_attention(proj) as attentions:
        y = proj(x)
    assert [(n, A.shape[-1]) for n, A in attentions] == expected
    for n, A in attentions:
        assert A.shape[:3] == (2, A.shape[1], 4) and A.min() >= 0
        if n.endswith("deformable"):  # points off the map (zero padding) carry weight nowhere
            assert torch.all(A.sum(-1) <= 1 + 1e-6)
        else:
            torch.testing.assert_close(A.sum(-1), torch.ones(A.shape[:3]))
    if attentions:  # in the graph: the output depends on every recorded map
        grads = torch.autograd.grad(y.sum(), [A for _, A in attentions])
        assert all(g.abs().sum() > 0 for g in grads)
    assert proj.attentions is None
    proj(x)  # off again: nothing more is kept
    assert len(attentions) == len(expected)


# =============================================================================
# train.py: a tiny world, tiny models, real loops


def test_training_loss_falls(world, tmp_path):
    train.main(train_args(world, tmp_path, "--stage=finetune", "--epochs=10", "--lora_dropout=0"))
    losses = [r["loss"] for r in read_log(tmp_path / "log.jsonl")]
    assert len(losses) == 10 * 64 // 16
    # a random LLM starts near ln(vocab size) = 6.4; LoRA alone (embeddings and lm_head frozen) moves it slowly, by
    # several times the step-to-step noise (about 0.05)
    assert losses[0] > 6 and sum(losses[-4:]) / 4 < losses[0] - 0.3


def test_onestage_uses_and_saves_prism_weight_decay(world, tmp_path):
    """--stage onestage is stage 2 alone with weight decay 0.1 (paper Table 3), unless --weight_decay is given; the
    optimizer that ran and the saved config agree."""
    for out, extra, wd in (("default", (), 0.1), ("given", ("--weight_decay=0.05",), 0.05)):
        train.main(train_args(world, tmp_path / out, "--stage=onestage", "--epochs=1", *extra))
        ckpt = tmp_path / out / "ckpt"
        groups = torch.load(ckpt / "state.pt", weights_only=True)["optimizer"]["param_groups"]
        assert [g["weight_decay"] for g in groups] == [wd, wd]
        saved = json.load(open(ckpt / "config.json"))
        assert saved["weight_decay"] == wd and saved["stage"] == "finetune"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_resume_equals_uninterrupted(world, tmp_path, monkeypatch, dtype):
    """Both stages; a crash in stage 2 as step 6 is being saved (the last checkpoint is step 4), then --resume:
    the same final weights, and the log holds each step once. Under bf16 too: the fp32 master weights and optimizer
    state come back, and the bf16 frozen halves are rebuilt the same."""
    extra = ("--epochs=2", "--save_every=2", "--lora_dropout=0.1", f"--dtype={dtype}")  # dropout: RNG state too
    train.main(train_args(world, tmp_path / "straight", *extra))

    save = train.save_checkpoint

    def crash_at_step_6(run_dir, model, optimizer, scheduler, step, cfg, stage):
        if stage == "finetune" and step == 6:
            raise KeyboardInterrupt
        save(run_dir, model, optimizer, scheduler, step, cfg, stage)
    monkeypatch.setattr(train, "save_checkpoint", crash_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train.main(train_args(world, tmp_path / "resumed", *extra))
    monkeypatch.setattr(train, "save_checkpoint", save)
    train.main(train_args(world, tmp_path / "resumed", *extra, "--resume"))

    a = M.load_file(str(tmp_path / "straight" / "ckpt" / M.WEIGHTS))
    b = M.load_file(str(tmp_path / "resumed" / "ckpt" / M.WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in read_log(tmp_path / "resumed" / "log.jsonl") if r["stage"] == "finetune"]
    assert steps == list(range(1, 9))  # steps 5 and 6 were logged before the crash, and once more after it


def test_bf16_keeps_what_trains_in_fp32(world):
    """--dtype bfloat16: the frozen tower and LLM are stored in bf16; the projector and LoRA's A and B, which the
    optimizer updates, stay fp32 (the master weights), for every projector."""
    for name in ("avgpool", "qformer", "cabstractor", "dabstractor"):
        model, _, _ = M.build_model(world["vision"], world["llm"], name, 4, lora_r=4, dtype=torch.bfloat16)
        params = dict(model.named_parameters())
        trainable = {k for k, p in params.items() if p.requires_grad}
        assert trainable == {k for k in params if k.startswith("projector.") or ".lora_" in k}
        assert any(".lora_A." in k for k in trainable)
        assert all(params[k].dtype == (torch.float32 if k in trainable else torch.bfloat16) for k in params)


def test_bf16_training_follows_fp32(world, tmp_path):
    """Both stages a few steps under bf16 on the CPU (bf16 frozen halves, autocast) and under fp32, from the same
    seed: finite losses within 1% of each other (bf16 keeps 8 bits of mantissa, rounding each product by up to 0.4%;
    the fp32 master weights keep the rounding from adding up over the steps), and an optimizer state kept in fp32."""
    losses = {}
    for dtype in ("float32", "bfloat16"):
        train.main(train_args(world, tmp_path / dtype, "--lora_dropout=0", f"--dtype={dtype}"))
        logs = read_log(tmp_path / dtype / "pretrain" / "log.jsonl") + read_log(tmp_path / dtype / "log.jsonl")
        losses[dtype] = [r["loss"] for r in logs]
        assert json.load(open(tmp_path / dtype / "ckpt" / "config.json"))["dtype"] == dtype
    assert len(losses["bfloat16"]) == len(losses["float32"]) == 8 and all(map(math.isfinite, losses["bfloat16"]))
    for a, b in zip(losses["float32"], losses["bfloat16"]):
        assert abs(a - b) < 0.01 * a
    assert losses["float32"] != losses["bfloat16"]  # bf16 did run: its rounding shows
    state = torch.load(tmp_path / "bfloat16" / "ckpt" / "state.pt", weights_only=True)["optimizer"]["state"]
    assert {v.dtype for s in state.values() for k, v in s.items() if k != "step"} == {torch.float32}


@pytest.mark.parametrize("dtype,message", [
    ("float16", "--dtype float16 needs a loss scaler, which this loop does not have; use --dtype bfloat16"),
    ("fp8", "--dtype must be bfloat16, float32 or auto, got 'fp8'"),
])
def test_dtype_refused(world, tmp_path, dtype, message):
    with pytest.raises(SystemExit, match="^" + re.escape(message) + "$"):
        train.main(train_args(world, tmp_path, f"--dtype={dtype}"))


def test_bf16_refused_where_unsupported(world, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with pytest.raises(SystemExit, match="^--dtype bfloat16: this CPU has no bf16 support; use --dtype float32$"):
        train.main(train_args(world, tmp_path, "--dtype=bfloat16"))


def test_ddp_two_processes_equal_one_with_accumulation(world, tmp_path):
    """2 processes x micro-batch 8 read the same samples per step as 1 process accumulating 2 micro-batches, so
    DDP's averaged gradients give the same weights. Batches mix image and text-only samples."""
    extra = ["--stage=finetune", "--lora_dropout=0"]
    for n in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               os.path.join(HERE, "train.py")] + train_args(world, tmp_path / f"n{n}", *extra)
        run = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert run.returncode == 0, run.stderr[-3000:]
    a = M.load_file(str(tmp_path / "n1" / "ckpt" / M.WEIGHTS))
    b = M.load_file(str(tmp_path / "n2" / "ckpt" / M.WEIGHTS))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_checkpoint_of_another_projector_is_refused(world, tmp_path):
    train.main(train_args(world, tmp_path, "--stage=pretrain", "--projector=avgpool"))
    with pytest.raises(ValueError, match="projector avgpool"):
        train.main(train_args(world, tmp_path / "other", "--stage=finetune", "--projector=maxpool",
                              f"--pretrained_projector={tmp_path / 'ckpt'}"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(world, tmp_path, monkeypatch, dtype):
    forward, calls = M.MLLM.forward, []

    def nan_on_step_3(self, *args):  # micro-batch 5 = the first of step 3 (2 micro-batches per step)
        loss, logits = forward(self, *args)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 5 else loss), logits
    monkeypatch.setattr(M.MLLM, "forward", nan_on_step_3)
    with pytest.raises(RuntimeError, match="loss is nan at step 3"):
        train.main(train_args(world, tmp_path, "--stage=pretrain", "--epochs=2", "--save_every=2", f"--dtype={dtype}"))
    assert train.find_checkpoint(str(tmp_path)) == str(tmp_path / "ckpt")
    state = torch.load(tmp_path / "ckpt" / "state.pt", weights_only=True)
    assert state["step"] == 2


@pytest.mark.parametrize("projector", ["qformer", "cabstractor", "dabstractor"])
def test_attention_projectors_train_and_reload(world, tmp_path, projector):
    options = "hidden_size=24,num_heads=4,intermediate_size=40" if projector == "qformer" else "num_layers=1" \
        if projector == "dabstractor" else "depth=1"
    train.main(train_args(world, tmp_path, "--stage=pretrain", f"--projector={projector}",
                          f"--projector_options={options}"))
    losses = [r["loss"] for r in read_log(tmp_path / "log.jsonl")]
    assert len(losses) == 4 and losses[-1] < losses[0]
    model, _, _, cfg = M.load_model(str(tmp_path))  # rebuilt from the saved options, else the shapes differ
    assert cfg["projector_options"] == options and model.projector_name == projector


def test_qformer_init_from_a_blip2_checkpoint(world, tmp_path, capsys):
    blip2 = tiny_blip2(2)  # 32-wide patch features, 4 queries, a 48-wide LLM: the world's tiny models
    blip2.save_pretrained(tmp_path / "blip2")
    train.main(train_args(world, tmp_path / "run", "--stage=pretrain", "--projector=qformer", "--pretrain_lr=0",
                          "--projector_options=hidden_size=24,num_heads=4,intermediate_size=40",
                          f"--qformer_init={tmp_path / 'blip2'}"))
    assert "load_blip2: loaded 49 tensors" in capsys.readouterr().out
    saved = M.load_file(str(tmp_path / "run" / "ckpt" / M.WEIGHTS))  # lr 0: BLIP-2's tensors, trained not at all
    assert torch.equal(saved["projector.query_tokens"], blip2.query_tokens.detach())
    assert torch.equal(saved["projector.encoder.layer.0.crossattention.attention.key.weight"],
                       blip2.qformer.encoder.layer[0].crossattention.attention.key.weight.detach())
    with pytest.raises(ValueError, match="--qformer_init is for --projector qformer, not avgpool"):
        train.main(train_args(world, tmp_path / "bad", "--stage=pretrain", f"--qformer_init={tmp_path / 'blip2'}"))

# -----------------------------------------------------------------------------
# faults a long training run must survive


def test_sigkill_mid_run_then_resume_equals_uninterrupted(world, tmp_path):
    """A training process killed with SIGKILL, which gives it no chance to clean up, restarted with --resume: the
    final weights equal an uninterrupted run's."""
    import signal
    import time
    extra = ("--stage=pretrain", "--epochs=4", "--save_every=2")  # 16 steps, a checkpoint every 2
    train.main(train_args(world, tmp_path / "straight", *extra))
    killed = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), *train_args(world, killed, *extra)],
                             cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log, deadline = killed / "log.jsonl", time.time() + 120
    while time.time() < deadline and child.poll() is None:  # kill it once it is past its second checkpoint
        if log.exists() and any(json.loads(line)["step"] >= 5 for line in log.read_text().splitlines()[:-1]):
            break
        time.sleep(0.02)
    assert child.poll() is None, "the run ended before it could be killed"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    step = torch.load(killed / "ckpt" / "state.pt", weights_only=True)["step"]
    assert 4 <= step < 16
    train.main(train_args(world, killed, *extra, "--resume"))
    a = M.load_file(str(tmp_path / "straight" / "ckpt" / M.WEIGHTS))
    b = M.load_file(str(killed / "ckpt" / M.WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_cut_short_is_never_taken(world, tmp_path):
    train.main(train_args(world, tmp_path, "--stage=pretrain", "--epochs=2", "--save_every=2"))
    good = train.find_checkpoint(str(tmp_path))
    assert good == str(tmp_path / "ckpt")
    # died while writing: ckpt.tmp holds half a weights file and no state
    (tmp_path / "ckpt.tmp").mkdir()
    (tmp_path / "ckpt.tmp" / M.WEIGHTS).write_bytes(b"\x00" * 10)
    assert train.find_checkpoint(str(tmp_path)) == good
    # died between the two renames: ckpt moved to ckpt.old, ckpt.tmp not yet renamed: ckpt.old is complete
    os.replace(tmp_path / "ckpt", tmp_path / "ckpt.old")
    assert train.find_checkpoint(str(tmp_path)) == str(tmp_path / "ckpt.old")
    # resume from it (with a longer schedule, so that there is something left to train and save)
    train.main(train_args(world, tmp_path, "--stage=pretrain", "--epochs=3", "--save_every=2", "--resume"))
    assert torch.load(tmp_path / "ckpt" / "state.pt", weights_only=True)["step"] == 12
    assert not (tmp_path / "ckpt.tmp").exists() and not (tmp_path / "ckpt.old").exists()


class CodeInAPickle:
    def __reduce__(self):
        return (os.system, (f"touch {os.path.join(os.getcwd(), 'pwned')}",))


def test_a_pickle_carrying_code_is_refused(world, tmp_path, monkeypatch):
    import pickle
    monkeypatch.chdir(tmp_path)
    train.main(train_args(world, tmp_path, "--stage=pretrain", "--epochs=1", "--save_every=2"))
    torch.save(dict(step=2, payload=CodeInAPickle()), tmp_path / "ckpt" / "state.pt")
    with pytest.raises(pickle.UnpicklingError):
        train.main(train_args(world, tmp_path, "--stage=pretrain", "--epochs=1", "--resume"))
    assert not (tmp_path / "pwned").exists()


def test_a_corrupt_image_mid_epoch(world, tmp_path, capsys):
    records = json.load(open(world["pretrain"]))[:32]
    folder = tmp_path / "images"
    folder.mkdir()
    for r in records:
        (folder / r["image"]).write_bytes(open(os.path.join(world["image_folder"], r["image"]), "rb").read())
    (folder / records[20]["image"]).write_bytes(b"not a png")  # in the second half of the epoch
    with open(tmp_path / "data.json", "w") as f:
        json.dump(records, f)
    args = train_args(world, tmp_path / "run", "--stage=pretrain", f"--data_path={tmp_path / 'data.json'}",
                      f"--image_folder={folder}")
    with pytest.raises(ValueError, match=rf"{records[20]['image']}.*|record 20"):
        train.main(args)
    train.main(args + ["--skip_bad_samples", "--out_dir=" + str(tmp_path / "skip")])
    assert capsys.readouterr().out.count("skipped:") == 1
    assert len(read_log(tmp_path / "skip" / "log.jsonl")) == 2  # both steps of the epoch trained


def test_a_micro_batch_all_bad_on_one_ddp_rank_does_not_hang(world, tmp_path):
    """Rank 1's third micro-batch holds only a corrupt image; rank 0's does not. Rank 1 must still take part in the
    gradient all-reduce, or rank 0 waits for it forever."""
    records = json.load(open(world["pretrain"]))[:16]
    bad = train.micro_batches(16, 0, 0, 1, 2, 1, 8, 0)[2][0]  # n, epoch, start, micro, world, rank, per epoch, seed
    folder = tmp_path / "images"
    folder.mkdir()
    for r in records:
        (folder / r["image"]).write_bytes(open(os.path.join(world["image_folder"], r["image"]), "rb").read())
    (folder / records[bad]["image"]).write_bytes(b"not a png")
    with open(tmp_path / "data.json", "w") as f:
        json.dump(records, f)
    args = train_args(world, tmp_path / "run", "--stage=pretrain", f"--data_path={tmp_path / 'data.json'}",
                      f"--image_folder={folder}", "--pretrain_batch_size=2", "--micro_batch_size=1",
                      "--skip_bad_samples")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "train.py")] + args
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert (run.stdout + run.stderr).count("skipped:") == 1
    assert len(read_log(tmp_path / "run" / "log.jsonl")) == 8


def test_modality_grouping_gives_single_modality_micro_batches():
    has_image = [i % 3 != 0 for i in range(50)]  # 33 image samples, 17 text-only
    micro, world = 4, 2
    usable = train.full_micro_batches(has_image, micro)
    assert usable == 4 * (33 // 4 + 17 // 4) == 48
    per_epoch = usable // micro  # micro-batches per epoch, over both ranks
    lists = [train.micro_batches(50, 1, 0, micro, world, rank, per_epoch // world, 0, has_image) for rank in (0, 1)]
    batches = lists[0] + lists[1]
    assert len(batches) == 12 and all(len(b) == micro for b in batches)
    assert all(len({has_image[i] for i in b}) == 1 for b in batches)  # one modality each
    seen = [i for b in batches for i in b]
    assert len(set(seen)) == 48  # no sample twice
    assert sum(all(has_image[i] for i in b) for b in batches) == 8  # 33 // 4 image micro-batches, 17 // 4 text
    # resuming at micro-batch 3 of rank 0 reads what an uninterrupted epoch reads from there
    assert train.micro_batches(50, 1, 3, micro, world, 0, per_epoch // world, 0, has_image) == lists[0][3:]


def test_training_with_modality_grouping(world, tmp_path):
    train.main(train_args(world, tmp_path, "--stage=finetune", "--group_by_modality", "--micro_batch_size=4"))
    assert len(read_log(tmp_path / "log.jsonl")) == (4 * (48 // 4 + 16 // 4)) // 16  # 4 steps, as without grouping


# ---- command line

def test_parse_args():
    cfg, _ = parse_args(ev.EvalConfig, ["--ckpt", "out/avgpool", "--batch_size=8", "--max-new-tokens", "5"])
    assert (cfg.ckpt, cfg.batch_size, cfg.max_new_tokens, cfg.limit) == ("out/avgpool", 8, 5, 0)

    from dataclasses import dataclass

    @dataclass
    class C:
        flag: bool = False
        lr: float = 1.0
    assert parse_args(C, ["--flag=true", "--lr", "3e-4"])[0] == C(True, 3e-4)
    assert parse_args(C, ["--flag", "0"])[0] == C(False, 1.0)
    assert parse_args(C, ["--flag", "--lr", "2"])[0] == C(True, 2.0)  # a bare bool flag
    for bad in (["--flag=maybe"], ["--nope=1"], ["--lr"], ["--lr=abc"], ["lr=1"]):
        with pytest.raises(SystemExit):
            parse_args(C, bad)


# =============================================================================
# eval.py: scorers and the generation driver

# ---- VQA normalisation and accuracy

@pytest.mark.parametrize("raw, expected", [
    ("Two dogs!", "2 dogs"),         # "!" touches no space -> replaced by a space; lower-case; two -> 2
    ("It's red.", "it's red"),       # apostrophe kept; final period dropped (no digit after it)
    ("dont", "don't"),               # contraction missing its apostrophe -> proper spelling
    ("isnt", "isn't"),
    ("3.5", "3.5"),                  # period followed by a digit stays
    ("1,000", "1000"),               # a digit comma -> every punctuation mark is deleted, not spaced
    ("yes, it is", "yes it is"),     # ", " touches a space -> deleted
    ("The cat", "cat"),              # article dropped
    ("none", "0"),
])
def test_normalize_answer(raw, expected):
    assert ev.normalize_answer(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    ("It's red.", "it 's red"),      # EvalAIAnswerProcessor splits a possessive off
    ("red,white", "redwhite"),       # and drops every comma and "?" before vqaEval's rules
    ("What?", "what"),
    ("1,000", "1000"),
])
def test_evalai_answer(raw, expected):
    assert ev.evalai_answer(raw) == expected


def test_vqa_accuracy_leave_one_out():
    # k of 10 humans agree: leaving out one of the k leaves k-1 matches, leaving out one of the other 10-k leaves k.
    # k=2: (2 * 1/3 + 8 * 2/3) / 10 = 0.6 (not min(2/3, 1) = 0.67)
    assert ev.vqa_accuracy("red", ["red"] * 2 + ["blue"] * 8) == pytest.approx(0.6)
    # k=3: (3 * 2/3 + 7 * 1) / 10 = 0.9
    assert ev.vqa_accuracy("red", ["red"] * 3 + ["blue"] * 7) == pytest.approx(0.9)
    # k=4: (4 * 1 + 6 * 1) / 10 = 1.0 ; k=1: (1 * 0 + 9 * 1/3) / 10 = 0.3 ; k=0: 0
    assert ev.vqa_accuracy("red", ["red"] * 4 + ["blue"] * 6) == pytest.approx(1.0)
    assert ev.vqa_accuracy("red", ["red"] + ["blue"] * 9) == pytest.approx(0.3)
    assert ev.vqa_accuracy("green", ["red"] * 10) == 0.0
    # normalisation applies on both sides
    assert ev.vqa_accuracy("Two.", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)


def test_vqa_accuracy_single_answer_is_exact_match():
    assert ev.vqa_accuracy("The Circle.", ["circle"]) == 1.0
    assert ev.vqa_accuracy("circles", ["circle"]) == 0.0


# ---- POPE

@pytest.mark.parametrize("text, expected", [
    ("No, there is not.", "no"),
    ("Yes.", "yes"),
    ("There is not a cat", "no"),
    ("Yes. But not a dog.", "yes"),  # only the first sentence counts
    ("no", "no"),
    ("Nothing", "yes"),              # "No" must be a word of its own
    ("no\nthere is a dog", "yes"),   # eval_pope splits at single spaces: "no\nthere" is one word
    ("There is\tno dog", "yes"),
])
def test_parse_yes_no(text, expected):
    assert ev.parse_yes_no(text) == expected


def test_pope_metrics_by_hand_and_by_id():
    labels = {1: "yes", 2: "yes", 3: "yes", 4: "no", 5: "no"}
    # predictions given in another order: 5 no, 3 yes, 1 yes, 4 yes, 2 no
    preds = {5: "There is not a cat.", 3: "Yes, there is.", 1: "Yes", 4: "Yes", 2: "No, there is not."}
    # TP = {1, 3}, FN = {2}, FP = {4}, TN = {5}
    m = ev.pope_metrics(preds, labels)
    assert m["accuracy"] == pytest.approx(3 / 5)   # (2 + 1) / 5
    assert m["precision"] == pytest.approx(2 / 3)  # 2 / (2 + 1)
    assert m["recall"] == pytest.approx(2 / 3)     # 2 / (2 + 1)
    assert m["f1"] == pytest.approx(2 / 3)         # 2pr / (p + r) with p = r = 2/3
    assert m["yes_ratio"] == pytest.approx(3 / 5)  # {1, 3, 4} said yes


def test_pope_metrics_mismatched_ids():
    with pytest.raises(ValueError, match="ids do not match"):
        ev.pope_metrics({1: "yes", 2: "no"}, {1: "yes", 3: "no"})


# ---- letters, boxes

def test_parse_letter():
    assert ev.parse_letter("B") == "B"
    assert ev.parse_letter(" C. ") == "C"
    assert ev.parse_letter("B. circle") is None                   # strict: the letter alone
    assert ev.parse_letter("B. circle", strict=False) == "B"
    assert ev.parse_letter("(D) square", strict=False) == "D"
    assert ev.parse_letter("Blue", strict=False) is None           # a word starting with B is not an option
    assert ev.parse_letter("E") is None                            # not one of ABCD
    assert ev.parse_letter("E", letters="ABCDE") == "E"


def test_parse_box_and_iou():
    assert ev.parse_box("It is at [0.1, 0.2,0.3 , 0.4] and [0, 0, 1, 1]") == [0.1, 0.2, 0.3, 0.4]
    assert ev.parse_box("[1, 2, 3]") is None
    assert ev.parse_box("no box") is None
    # [0,0,2,2] and [1,1,3,3]: intersection 1x1 = 1, union 4 + 4 - 1 = 7
    assert ev.box_iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
    assert ev.box_iou([0, 0, 1, 1], [0, 0, 1, 1]) == pytest.approx(1.0)
    assert ev.box_iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0


# ---- score_shapes

def test_score_shapes():
    recs = [{"question_id": i, "answer": a} for i, a in enumerate(["red", "2", "blue"])]
    # "Red." == red, "Two" == 2, "green" != blue -> 2/3
    assert ev.score_shapes("colour", recs, ["Red.", "Two", "green"])["accuracy"] == pytest.approx(2 / 3)
    recs = [{"question_id": i, "answer": a} for i, a in enumerate(["top left", "top", "center"])]
    # "Top left." == top left; "top left" != top: a position is the whole phrase -> 2/3
    assert ev.score_shapes("position", recs, ["Top left.", "top left", "center"])["accuracy"] == pytest.approx(2 / 3)

    recs = [{"question_id": i, "answer": a} for i, a in enumerate(["yes", "no", "yes", "no"])]
    # preds yes, yes, no, no: TP 1, FP 1, FN 1, TN 1 -> accuracy 0.5, p = r = f1 = 0.5, yes_ratio 0.5
    m = ev.score_shapes("existence", recs, ["Yes", "Yes", "No", "No"])
    assert (m["accuracy"], m["f1"], m["yes_ratio"]) == pytest.approx((0.5, 0.5, 0.5))

    recs = [{"question_id": i, "answer": a} for i, a in enumerate(["A", "C", "B"])]
    m = ev.score_shapes("mc", recs, ["A", "C.", "B. circle"])
    assert m["accuracy"] == pytest.approx(2 / 3)          # "B. circle" fails the strict parse
    assert m["accuracy_lenient"] == pytest.approx(1.0)

    recs = [{"question_id": i, "answer": "", "bbox": [0.1, 0.1, 0.5, 0.5]} for i in range(3)]
    # 1: intersection 0.4 x 0.3 = 0.12, union 0.16 + 0.12 - 0.12 = 0.16 -> IoU 0.75, a hit
    # 2: intersection 0.2 x 0.2 = 0.04, union 0.16 + 0.16 - 0.04 = 0.28 -> IoU 0.14, a miss
    # 3: no box -> wrong, unparseable
    m = ev.score_shapes("grounding", recs, ["[0.1, 0.1, 0.5, 0.4]", "[0.3, 0.3, 0.7, 0.7]", "a box"])
    assert m["acc_iou50"] == pytest.approx(1 / 3)
    assert m["unparseable"] == pytest.approx(1 / 3)


# ---- the driver, with a fake tokenizer (ids are character codes) and a fake model

FAKE_PAD, FAKE_EOS = 0, 1


class FakeTokenizer:
    pad_token_id, eos_token_id = FAKE_PAD, FAKE_EOS

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i in (FAKE_PAD, FAKE_EOS)))


class FakeModel(torch.nn.Module):
    """Answers each question with answers[question], padded with a special token and spaces."""
    def __init__(self, answers):
        super().__init__()
        self.answers, self.batches = answers, []

    def generate(self, prompts, pixel_values, max_new_tokens, eos_token_id, pad_token_id):
        assert pixel_values.shape == (len(prompts), 3, 4, 4) and eos_token_id == FAKE_EOS and pad_token_id == FAKE_PAD
        self.batches.append([len(p) for p in prompts])
        questions = ["".join(map(chr, p)).removeprefix("<image>\n") for p in prompts]
        return [[FAKE_PAD] + [ord(c) for c in " " + self.answers[q] + " "] for q in questions]


@pytest.fixture
def fake_data(monkeypatch):
    loaded = []
    monkeypatch.setattr(ev.data, "prompt_ids", lambda tokenizer, question: [ord(c) for c in question])

    def load_image(path, image_processor, mode):
        assert mode == "pad"
        loaded.append(path)
        return torch.zeros(3, 4, 4)
    monkeypatch.setattr(ev.data, "load_image", load_image)
    return loaded



def test_generate_answers_restores_order(fake_data):
    questions = ["a much longer question here?", "q1?", "medium one?", "q22?", "another long question!"]
    records = [{"question_id": i, "image": f"{i}.png", "text": q} for i, q in enumerate(questions)]
    model = FakeModel({q: f"answer {i}" for i, q in enumerate(questions)})
    answers = ev.generate_answers(model, FakeTokenizer(), None, records, "imgs", batch_size=2)
    assert answers == [f"answer {i}" for i in range(5)]  # original order, specials skipped, stripped
    lengths = [n for batch in model.batches for n in batch]
    assert lengths == sorted(lengths) and [len(b) for b in model.batches] == [2, 2, 1]
    assert sorted(fake_data) == sorted(os.path.join("imgs", f"{i}.png") for i in range(5))


def test_evaluate_shapes_writes_answers_and_metrics(fake_data, tmp_path):
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    colour = [{"question_id": "c0", "image": "0.png", "text": "colour of the circle?", "answer": "red"},
              {"question_id": "c1", "image": "1.png", "text": "colour of the square?", "answer": "blue"}]
    existence = [{"question_id": "e0", "image": "0.png", "text": "is there a star?", "answer": "no"}]
    for name, recs in [("colour", colour), ("existence", existence)]:
        (eval_dir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    model = FakeModel({"colour of the circle?": "Red", "colour of the square?": "green", "is there a star?": "No."})
    out = tmp_path / "run" / "eval.json"
    out.parent.mkdir()
    results = ev.evaluate_shapes(model, FakeTokenizer(), None, str(eval_dir), "imgs", str(out), batch_size=4)
    assert list(results) == ["colour", "existence"]           # only the files present
    assert results["colour"]["accuracy"] == pytest.approx(0.5)  # Red == red, green != blue
    assert results["existence"]["accuracy"] == 1.0
    assert json.loads(out.read_text()) == results
    rows = [json.loads(l) for l in (out.parent / "answers_colour.jsonl").read_text().splitlines()]
    assert rows == [{"question_id": "c0", "text": "Red", "answer": "red"},
                    {"question_id": "c1", "text": "green", "answer": "blue"}]
    table = ev.format_table(results)
    assert "colour" in table and "50.0%" in table and "f1" in table


# =============================================================================
# benchmarks (LLaVA-1.5's evaluation)
#
# Each test writes a few records in LLaVA-1.5's eval layout under tmp_path, gives hand-written answers (in reverse
# order, so that only ids and prompts can pair them with their questions) and checks scores worked out by hand.

S = data.SHORT_ANSWER


def bench_put(path, rows=None, text=None):
    """Write JSON lines (rows), JSON (text: an object) or nothing (an image file that only has to exist)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if rows is not None:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(text) if text is not None else "")


def bench_load(root, name, **options):
    cfg = ev.EvalConfig(bench=name, data_root=str(root), **options)
    return ev.load_benchmark(cfg), cfg


def bench_score(bench, cfg, answer):
    """answer: question -> answer text."""
    rows = [dict(question_id=q["question_id"], prompt=q["prompt"], text=answer(q)) for q in bench["questions"]]
    return ev.BENCHMARKS[bench["name"]]["score"](bench["questions"], rows[::-1], bench["ann"], cfg)


POPE_QUESTIONS = [  # LLaVA's own ids; POPE's files number the same questions 1, 2, ... per split, in another order
    dict(question_id=101, image="a.jpg", text="Is there a dog in the image?" + S, category="adversarial"),
    dict(question_id=102, image="a.jpg", text="Is there a cat in the image?" + S, category="adversarial"),
    dict(question_id=103, image="b.jpg", text="Is there a dog in the image?" + S, category="adversarial"),
    dict(question_id=104, image="b.jpg", text="Is there a car in the image?" + S, category="adversarial"),
    dict(question_id=201, image="a.jpg", text="Is there a dog in the image?" + S, category="random"),
    dict(question_id=202, image="a.jpg", text="Is there a bus in the image?" + S, category="random"),
]
# one answer per question text, as FakeModel gives them (it sees no image)
POPE_ANSWERS = {101: "Yes, there is a dog.", 102: "No.", 103: "Yes, there is a dog.", 104: "There is no car.",
                201: "Yes, there is a dog.", 202: "No"}


def bench_pope_layout(root):
    bench_put(root / "pope" / "llava_pope_test.jsonl", POPE_QUESTIONS)
    label = lambda i, image, thing, yes: dict(question_id=i, image=image, text=f"Is there a {thing} in the image?",
                                              label="yes" if yes else "no")
    bench_put(root / "pope" / "coco" / "coco_pope_adversarial.json",
              [label(1, "b.jpg", "car", 0), label(2, "a.jpg", "dog", 1), label(3, "b.jpg", "dog", 0),
               label(4, "a.jpg", "cat", 1)])
    bench_put(root / "pope" / "coco" / "coco_pope_popular.json", [])
    bench_put(root / "pope" / "coco" / "coco_pope_random.json",
              [label(1, "a.jpg", "bus", 0), label(2, "a.jpg", "dog", 1)])
    for image in ("a.jpg", "b.jpg"):
        bench_put(root / "pope" / "val2014" / image)


def test_bench_pope(tmp_path):
    bench_pope_layout(tmp_path)
    b, cfg = bench_load(tmp_path, "pope")
    assert b["questions"][0]["prompt"] == "Is there a dog in the image?" + S  # the suffix is not added twice
    m = bench_score(b, cfg, lambda q: POPE_ANSWERS[q["question_id"]])
    # adversarial: 101 yes/label yes TP, 102 no/yes FN, 103 yes/no FP, 104 "no car"/no TN
    #   accuracy (1 + 1) / 4 = 0.5, precision 1 / (1 + 1) = 0.5, recall 1 / (1 + 1) = 0.5, f1 0.5, yes ratio 2/4
    #   (paired with the label file by position, as LLaVA's eval_pope does, all four would be wrong)
    assert [m["adversarial"][k] for k in ("n", "accuracy", "precision", "recall", "f1", "yes_ratio")] == \
        pytest.approx([4, 0.5, 0.5, 0.5, 0.5, 0.5])
    # random: 201 yes/yes TP, 202 no/no TN: accuracy, precision, recall, f1 all 1, yes ratio 1/2
    assert [m["random"][k] for k in ("n", "accuracy", "precision", "recall", "f1", "yes_ratio")] == \
        pytest.approx([2, 1.0, 1.0, 1.0, 1.0, 0.5])
    assert "popular" not in m
    assert (m["mean_f1"], m["mean_accuracy"]) == pytest.approx(((0.5 + 1) / 2, (0.5 + 1) / 2))


def test_bench_vqav2_server_and_local(tmp_path):
    root = tmp_path
    bench_put(root / "vqav2" / "llava_vqav2_mscoco_test-dev2015.jsonl",
              [dict(question_id=1, image="t1.jpg", text="How many dogs?" + S),
               dict(question_id=2, image="t1.jpg", text="Is it sunny?" + S)])
    bench_put(root / "vqav2" / "llava_vqav2_mscoco_test2015.jsonl",
              [dict(question_id=i, image="t1.jpg", text="q" + S) for i in (1, 2, 3)])
    bench_put(root / "vqav2" / "test2015" / "t1.jpg")
    b, cfg = bench_load(root, "vqav2")
    answers = {1: "Two dogs!", 2: "Yes."}
    assert bench_score(b, cfg, lambda q: answers[q["question_id"]]) == {"n": 2}  # test-dev: only the server scores
    rows = [dict(question_id=q["question_id"], prompt=q["prompt"], text=answers[q["question_id"]])
            for q in b["questions"]]
    # every test2015 question, normalised; question 3 was not asked (test-dev is a part of test2015)
    assert ev.submit_vqav2(b["questions"], rows, str(root)) == [dict(question_id=1, answer="2 dogs"),
                                                                 dict(question_id=2, answer="yes"),
                                                                 dict(question_id=3, answer="")]

    humans = {10: ["red"] * 2 + ["blue"] * 8, 11: ["2"] * 3 + ["3"] * 7, 12: ["yes"] * 10}
    bench_put(root / "vqav2" / "v2_mscoco_val2014_annotations.json",
              text=dict(annotations=[dict(question_id=i, answers=[dict(answer=a, answer_id=k + 1)
                                                                 for k, a in enumerate(h)])
                                     for i, h in humans.items()]))
    b, cfg = bench_load(root, "vqav2")
    assert bench_score(b, cfg, lambda q: answers[q["question_id"]]) == {"n": 2}  # val annotations, test questions
    bench_put(root / "vqav2" / "llava_vqav2_mscoco_val2014.jsonl",
              [dict(question_id=i, image="v.jpg", text="q?" + S) for i in humans])
    bench_put(root / "val2014" / "v.jpg")
    b, cfg = bench_load(root, "vqav2", question_file=str(root / "vqav2" / "llava_vqav2_mscoco_val2014.jsonl"),
                        image_folder=str(root / "val2014"))
    m = bench_score(b, cfg, lambda q: {10: "Red", 11: "two", 12: "no"}[q["question_id"]])
    # 10: 2 of 10 humans said red: leaving out one of those 2 leaves 1 match (1/3), one of the other 8 leaves 2 (2/3)
    #     -> (2 * 1/3 + 8 * 2/3) / 10 = 0.6, not min(2/3, 1) = 0.67
    # 11: "two" -> "2", 3 of 10: (3 * 2/3 + 7 * 1) / 10 = 0.9 ; 12: 0
    assert m["n"] == 3 and m["accuracy"] == pytest.approx((0.6 + 0.9 + 0.0) / 3)


def test_bench_vizwiz(tmp_path):
    asked = "What colour is the shirt?" + ev.UNANSWERABLE + S
    questions = [dict(question_id=0, image="VizWiz_val_0.jpg", text="What is this?"),
                 dict(question_id=1, image="VizWiz_val_1.jpg", text=asked)]
    bench_put(tmp_path / "vizwiz" / "llava_val.jsonl", questions)
    humans = lambda answers: [dict(answer=a, answer_confidence="yes") for a in answers]
    bench_put(tmp_path / "vizwiz" / "val.json",
              text=[dict(image="VizWiz_val_1.jpg", question="What colour is the shirt?",
                         answers=humans(["white"] + ["grey"] * 9)),
                    dict(image="VizWiz_val_0.jpg", question="What is this?",
                         answers=humans(["unanswerable"] * 5 + ["book"] * 5))])
    for q in questions:
        bench_put(tmp_path / "vizwiz" / "val" / q["image"])
    b, cfg = bench_load(tmp_path, "vizwiz", question_file=str(tmp_path / "vizwiz" / "llava_val.jsonl"),
                        image_folder=str(tmp_path / "vizwiz" / "val"))
    # LLaVA-1.5's VizWiz prompt: the unanswerable sentence, then the short-answer suffix; a text that has them keeps
    # them once
    assert [q["prompt"] for q in b["questions"]] == ["What is this?" + ev.UNANSWERABLE + S, asked]
    answers = {0: "Unanswerable", 1: "White."}
    m = bench_score(b, cfg, lambda q: answers[q["question_id"]])
    # 0: 5 of 10 say unanswerable: every leave-one-out subset keeps >= 4 matches -> 1.0
    # 1: 1 of 10 said white: (1 * 0/3 + 9 * 1/3) / 10 = 0.3
    assert m["accuracy"] == pytest.approx((1.0 + 0.3) / 2)
    rows = [dict(question_id=q["question_id"], prompt=q["prompt"], text=answers[q["question_id"]])
            for q in b["questions"]]
    assert ev.submit_vizwiz(b["questions"], rows, str(tmp_path)) == [
        dict(image="VizWiz_val_0.jpg", answer="unanswerable"), dict(image="VizWiz_val_1.jpg", answer="white")]


def test_bench_textvqa_two_questions_share_an_id(tmp_path):
    # LLaVA's TextVQA question ids are image ids: both questions on image f00d carry question_id "f00d"
    ocr = "\nReference OCR token: Nikon, 35mm"
    bench_put(tmp_path / "textvqa" / "llava_textvqa_val_v051_ocr.jsonl", [
        dict(question_id="f00d", image="f00d.jpg", text="what brand is the camera?" + ocr + S),
        dict(question_id="f00d", image="f00d.jpg", text="what is the focal length?" + ocr + S)])
    bench_put(tmp_path / "textvqa" / "TextVQA_0.5.1_val.json", text=dict(data=[
        dict(image_id="f00d", question="What is the focal length?", answers=["35mm"] * 10),
        dict(image_id="f00d", question="What brand is the camera?", answers=["nikon"] * 3 + ["canon"] * 7)]))
    bench_put(tmp_path / "textvqa" / "train_images" / "f00d.jpg")
    b, cfg = bench_load(tmp_path, "textvqa")
    m = bench_score(b, cfg, lambda q: "Nikon" if "brand" in q["text"] else "35 mm")
    # brand: 3 of 10 said nikon: (3 * 2/3 + 7 * 1) / 10 = 0.9 ; focal length: "35 mm" is not "35mm": 0
    assert m["n"] == 2 and m["accuracy"] == pytest.approx((0.9 + 0.0) / 2)


def test_bench_gqa(tmp_path):
    bench_put(tmp_path / "gqa" / "llava_gqa_testdev_balanced.jsonl",
              [dict(question_id=i, image="n1.jpg", text=f"question {i}?" + S) for i in ("201", "202", "203")])
    bench_put(tmp_path / "gqa" / "data" / "testdev_balanced_questions.json",
              text={"201": dict(answer="yes", imageId="n1"), "202": dict(answer="table", imageId="n1"),
                    "203": dict(answer="table", imageId="n1")})
    bench_put(tmp_path / "gqa" / "data" / "images" / "n1.jpg")
    b, cfg = bench_load(tmp_path, "gqa")
    m = bench_score(b, cfg, lambda q: {"201": "Yes.", "202": "Table", "203": "the table"}[q["question_id"]])
    # "Yes." -> "yes" right; "Table" -> "table" right; "the table": exact match keeps the article, wrong -> 2/3
    assert m == dict(n=3, accuracy=pytest.approx(2 / 3))


def test_bench_mme(tmp_path):
    release = tmp_path / "MME" / "MME_Benchmark_release_version"
    yn = " Please answer yes or no."
    # position and code_reasoning keep <image>.txt beside the image; artwork has images/ and questions_answers_YN/
    (release / "position").mkdir(parents=True)
    (release / "position" / "1.txt").write_text(f"Is the cat left of the dog?{yn}\tYes\n"
                                                f"Is the cat right of the dog?{yn}\tNo\n")
    (release / "position" / "2.txt").write_text(f"Is the cup above the plate? {yn}\tYes\n"  # MME's two spaces
                                                f"Is the cup below the plate?{yn}\tNo\n")
    (release / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (release / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
        f"Is this artwork created by Monet?{yn}\tYes\nIs this artwork created by Manet?{yn}\tNo\n")
    (release / "code_reasoning").mkdir(parents=True)
    (release / "code_reasoning" / "7.txt").write_text(f"Is the output 3?{yn}\tYes\nIs the output 4?{yn}\tNo\n")
    asked = [("position/1.jpg", "Is the cat left of the dog?", "Yes"),
             ("position/1.jpg", "Is the cat right of the dog?", "No, it is not."),
             ("position/2.jpg", "Is the cup above the plate?", "yes"),
             ("position/2.jpg", "Is the cup below the plate?", "Yes"),
             ("artwork/images/10002.jpg", "Is this artwork created by Monet?", "I think yes"),  # "i th": neither
             ("artwork/images/10002.jpg", "Is this artwork created by Manet?", "Not by Manet"),  # "not ": no
             ("code_reasoning/7.png", "Is the output 3?", "Yes"),
             ("code_reasoning/7.png", "Is the output 4?", "No")]
    bench_put(tmp_path / "MME" / "llava_mme.jsonl",  # LLaVA's file: the question id is the image; no "Please answer"
              [dict(question_id=image, image=image, text=question + S, category=image.split("/")[0])
               for image, question, _ in asked])
    for image, _, _ in asked:
        bench_put(release / image)
    b, cfg = bench_load(tmp_path, "mme")
    m = bench_score(b, cfg, lambda q: {(i, t + S): a for i, t, a in asked}[q["question_id"], q["text"]])
    # position: 3 of 4 questions right -> accuracy 75; image 1 has both right, image 2 not -> accuracy+ 1/2 = 50
    assert (m["position"]["accuracy"], m["position"]["accuracy_plus"], m["position"]["score"]) == \
        pytest.approx((75, 50, 125))
    # artwork: one image, one of its two questions right -> accuracy 50, accuracy+ 0, score 50
    assert (m["artwork"]["accuracy"], m["artwork"]["accuracy_plus"], m["artwork"]["score"]) == \
        pytest.approx((50, 0, 50))
    assert m["code_reasoning"]["score"] == pytest.approx(200)     # 100 + 100
    assert m["perception"] == pytest.approx(125 + 50)            # position + artwork
    assert m["cognition"] == pytest.approx(200)
    assert m["spatial"] == {"position": pytest.approx(125)}


def test_bench_seed(tmp_path):
    options = "\nA. left\nB. right\nC. top\nD. bottom"
    bench_put(tmp_path / "seed_bench" / "llava-seed-bench.jsonl", [
        dict(question_id="101", image="SEED-Bench-image/1.jpg", text="Where is the cat?" + options + data.MC_SUFFIX),
        dict(question_id="102", image="SEED-Bench-image/1.jpg", text="Where is the dog?" + options),
        dict(question_id="103", image="SEED-Bench-image/2.jpg", text="Where is the cup?" + options + data.MC_SUFFIX),
        dict(question_id="104", image="SEED-Bench-image/2.jpg", text="What is the scene?" + options + data.MC_SUFFIX)])
    seed = lambda i, answer, t: dict(question_id=i, answer=answer, question_type_id=t, data_type="image",
                                     data_id="x.jpg", question="...", choice_a="left", choice_b="right",
                                     choice_c="top", choice_d="bottom")
    bench_put(tmp_path / "seed_bench" / "SEED-Bench.json", text=dict(
        question_type={"Scene Understanding": 1, "Instance Location": 4, "Spatial Relation": 6},
        questions=[seed("104", "D", 1), seed("103", "C", 6), seed("102", "B", 4), seed("101", "A", 4)]))
    for image in ("1.jpg", "2.jpg"):
        bench_put(tmp_path / "seed_bench" / "SEED-Bench-image" / image)
    b, cfg = bench_load(tmp_path, "seed")
    assert b["questions"][1]["prompt"] == "Where is the dog?" + options + data.MC_SUFFIX
    m = bench_score(b, cfg, lambda q: {"101": "A", "102": "B. right", "103": "C.", "104": "Bottom"}[q["question_id"]])
    # strict: 101 A right, 102 "B. right" wrong, 103 "C." right, 104 "Bottom" wrong -> 2/4
    # lenient: 102 starts with B -> right; "Bottom" starts with a word, not a letter -> 3/4
    assert (m["n"], m["accuracy"], m["accuracy_lenient"], m["accuracy_image"]) == pytest.approx((4, 0.5, 0.75, 0.5))
    # instance location (type 4): 101 right, 102 wrong -> 1/2 ; spatial relation (type 6): 103 right -> 1
    assert m["spatial"] == {"instance location": pytest.approx(0.5), "spatial relation": pytest.approx(1.0)}
    assert m["types"]["Scene Understanding"] == 0.0


def bench_mmbench_tsv(path):
    buf = __import__("io").BytesIO()
    Image.new("RGB", (3, 2), (255, 0, 0)).save(buf, "PNG")
    png = __import__("base64").b64encode(buf.getvalue()).decode()
    columns = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "source", "l2-category",
               "comment", "split", "image"]
    rows = [["0", "Where is the ball?", "A boy plays.", "left", "right", "top", "", "B", "object_localization",
             "s", "l2", "nan", "dev", png],
            ["1", "What colour is it?", "nan", "red", "green", "blue", "yellow", "C", "attribute_recognition",
             "s", "l2", "nan", "dev", png],
            ["1000000", "Where is the ball?", "A boy plays.", "right", "top", "left", "", "A", "object_localization",
             "s", "l2", "nan", "dev", png]]  # MMBench's own circular copy of question 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join("\t".join(r) for r in [columns] + rows) + "\n")


def test_bench_mmbench_and_circular_eval(tmp_path):
    bench_mmbench_tsv(tmp_path / "mmbench" / "mmbench_dev_20230712.tsv")
    b, cfg = bench_load(tmp_path, "mmbench")
    q0, q1 = b["questions"]  # the copy with index 1000000 is skipped
    # as LLaVA's model_vqa_mmbench: hint, question, the options present, the MC suffix; "nan" is no hint
    assert q0["prompt"] == "A boy plays.\nWhere is the ball?\nA. left\nB. right\nC. top" + data.MC_SUFFIX
    assert q1["prompt"] == "What colour is it?\nA. red\nB. green\nC. blue\nD. yellow" + data.MC_SUFFIX
    assert Image.open(__import__("io").BytesIO(q0["image"])).size == (3, 2)  # decoded in memory
    m = bench_score(b, cfg, lambda q: {0: "B", 1: "C. blue"}[q["question_id"]])
    # strict: 0 right, 1 wrong ("C. blue" is not a bare letter) -> 1/2; lenient: both right -> 1
    assert (m["n"], m["accuracy"], m["accuracy_lenient"]) == pytest.approx((2, 0.5, 1.0))
    assert m["spatial"] == {"object_localization": 1.0}

    b, cfg = bench_load(tmp_path, "mmbench", circular=True)
    assert [(q["question_id"], q["round"], q["answer"]) for q in b["questions"]] == [
        (0, 0, "B"), (0, 1, "A"), (0, 2, "C"),             # right: B, in [right, top, left] A, in [top, left, right] C
        (1, 0, "C"), (1, 1, "B"), (1, 2, "A"), (1, 3, "D")]  # blue: C, then B, A, D as the options shift by one
    assert b["questions"][1]["prompt"] == "A boy plays.\nWhere is the ball?\nA. right\nB. top\nC. left" + data.MC_SUFFIX
    given = {(0, 0): "B", (0, 1): "A", (0, 2): "C", (1, 0): "C", (1, 1): "B", (1, 2): "A", (1, 3): "A"}
    m = bench_score(b, cfg, lambda q: given[q["question_id"], q["round"]])
    # question 0 right in all 3 shifts; question 1 wrong in its last shift (A, not D) -> circular 1/2; first pass 2/2
    assert (m["accuracy"], m["accuracy_circular"]) == pytest.approx((1.0, 0.5))
    assert m["spatial"] == {"object_localization": 1.0}


def test_bench_refcoco_box_spaces(tmp_path):
    bench_put(tmp_path / "refcoco" / "llava_refcoco_val.jsonl", [
        dict(question_id=1, image="wide.jpg", text="the red car", bbox=[0, 0, 100, 40], width=200, height=100),
        dict(question_id=2, image="wide.jpg", text="the dog", bbox=[0, 0, 100, 40], width=200, height=100),
        dict(question_id=3, image="square.jpg", text="the cup", bbox=[10, 10, 60, 60], width=100, height=100)])
    for image in ("wide.jpg", "square.jpg"):
        bench_put(tmp_path / "refcoco" / "train2014" / image)
    answers = {1: "[0, 0.25, 0.5, 0.45]", 2: "There is a dog.", 3: "It is at [0.1, 0.1, 0.6, 0.6] or [0, 0, 1, 1]"}
    b, cfg = bench_load(tmp_path, "refcoco")
    assert b["questions"][0]["prompt"] == data.GROUNDING_PROMPT.format(ref="the red car")
    m = bench_score(b, cfg, lambda q: answers[q["question_id"]])
    # 1, square space: W = 200, H = 100, S = 200, offsets (S - W) / 2 = 0 and (S - H) / 2 = 50:
    #   x1 = 0 * 200 - 0 = 0, y1 = 0.25 * 200 - 50 = 0, x2 = 0.5 * 200 = 100, y2 = 0.45 * 200 - 50 = 40: IoU 1, a hit
    # 2: no box -> wrong ; 3: square image, [10, 10, 60, 60] exactly (the first box counts): a hit
    assert (m["n"], m["acc_iou50"], m["unparseable"], m["box_space"]) == pytest.approx((3, 2 / 3, 1 / 3, "square"))
    m = bench_score(b, ev.EvalConfig(box_space="orig"), lambda q: answers[q["question_id"]])
    # 1, orig space: [0, 0.25 * 100, 100, 0.45 * 100] = [0, 25, 100, 45] against [0, 0, 100, 40]:
    #   intersection 100 x 15 = 1500, union 4000 + 2000 - 1500 = 4500, IoU 1/3: a miss ; 3 still a hit
    assert (m["acc_iou50"], m["box_space"]) == pytest.approx((1 / 3, "orig"))

    bench_put(tmp_path / "refcoco" / "llava_refcocog_val.jsonl",
              [dict(question_id=7, image="wide.jpg", text="a car", bbox=[0, 0, 1, 1], width=200, height=100)])
    assert [q["question_id"] for q in bench_load(tmp_path, "refcocog")[0]["questions"]] == [7]
    bench_put(tmp_path / "refcoco" / "llava_refcoco+_val.jsonl",
              [dict(question_id=8, image="wide.jpg", text="a car", bbox=[0, 0, 1], width=200, height=100)])
    with pytest.raises(ValueError, match=r"llava_refcoco\+_val.jsonl: question 8: field 'bbox' must be"):
        bench_load(tmp_path, "refcoco+")


def test_bench_command_writes_answers_resumes_and_scores(fake_data, tmp_path, monkeypatch):
    root, run = tmp_path / "eval", tmp_path / "run"
    bench_pope_layout(root)
    model = FakeModel({q["text"]: POPE_ANSWERS[q["question_id"]] for q in POPE_QUESTIONS})
    monkeypatch.setattr(ev, "load_model", lambda ckpt, device: (model, FakeTokenizer(), None, {}))
    argv = ["--ckpt", str(run), "--bench", "pope", f"--data_root={root}", "--batch_size", "4"]
    ev.main(argv)
    asked = lambda: sum(map(len, model.batches))
    assert asked() == 6 and len(model.batches) == 2          # 6 questions in batches of 4 and 2
    assert sorted(fake_data) == sorted(str(root / "pope" / "val2014" / q["image"]) for q in POPE_QUESTIONS)
    path = run / "pope" / "answers.jsonl"
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    assert sorted((r["question_id"], r["prompt"], r["text"]) for r in rows) == \
        sorted((q["question_id"], q["text"], POPE_ANSWERS[q["question_id"]]) for q in POPE_QUESTIONS)
    scores = json.loads((run / "pope" / "scores.json").read_text())
    assert (scores["adversarial"]["accuracy"], scores["random"]["f1"]) == pytest.approx((0.5, 1.0))  # test_bench_pope

    ev.main(argv)
    assert asked() == 6                                      # everything answered: nothing asked again
    # a run killed mid-write: two answers lost, the last line cut short
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:4]) + lines[4][:10])
    ev.main(argv)
    assert asked() == 6 + 2                                  # only the two unanswered questions
    assert len(path.read_text().splitlines()) == 6
    assert json.loads((run / "pope" / "scores.json").read_text()) == scores
    first = path.read_text().splitlines(keepends=True)[0]
    path.write_text(path.read_text() + first)  # an answer twice: refused, not silently averaged
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: question_id \d+ is answered twice$"):
        ev.main(argv)


def test_check_answers_names_the_file_and_first_bad_id():
    questions = [dict(question_id=i, prompt=f"q{i}") for i in (1, 2, 3)]
    answer = lambda i, prompt=None: dict(question_id=i, prompt=prompt or f"q{i}", text="yes")
    ev.check_answers("a.jsonl", questions, [answer(3), answer(1), answer(2)])
    a1, a2, a3 = answer(1), answer(2), answer(3)
    for answers, message in [([a1, a2], "no answer for question_id 3 (1 of 3 questions unanswered)"),
                             ([a1, a2, a2, a3], "question_id 2 is answered twice"),
                             ([a1, a2, a3, answer(9)], "question_id 9 is not in the question file"),
                             ([a1, a2, answer(3, "other")], "question_id 3 is not in the question file")]:
        with pytest.raises(ValueError, match="^a.jsonl: " + re.escape(message) + "$"):
            ev.check_answers("a.jsonl", questions, answers)
    ev.check_answers("a.jsonl", questions[:2], [answer(1), answer(2), answer(3)], extra_ok=True)  # a --limit run


def test_bench_missing_files_and_bad_records(tmp_path):
    with pytest.raises(SystemExit, match=r"pope: missing \S*pope/llava_pope_test.jsonl \(expected as pope in "
                                         r"LLaVA-1.5's layout under "):
        bench_load(tmp_path, "pope")
    bench_put(tmp_path / "pope" / "llava_pope_test.jsonl", POPE_QUESTIONS)
    with pytest.raises(SystemExit, match=r"pope: missing \S*pope/coco/coco_pope_adversarial.json"):
        bench_load(tmp_path, "pope")
    bench_pope_layout(tmp_path)
    (tmp_path / "pope" / "val2014" / "b.jpg").unlink()
    with pytest.raises(SystemExit, match=r"pope: 1 of 2 images missing, e.g. \S*pope/val2014/b.jpg"):
        bench_load(tmp_path, "pope")
    bench_put(tmp_path / "pope" / "llava_pope_test.jsonl", [POPE_QUESTIONS[0], dict(question_id=102, image="a.jpg")])
    with pytest.raises(ValueError, match=r"llava_pope_test.jsonl: line 2: field 'text' is missing"):
        bench_load(tmp_path, "pope")
    (tmp_path / "pope" / "llava_pope_test.jsonl").write_text(json.dumps(POPE_QUESTIONS[0]) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"llava_pope_test.jsonl: line 2: not valid JSON"):
        bench_load(tmp_path, "pope")
    with pytest.raises(SystemExit, match="unknown --bench 'nope'"):
        bench_load(tmp_path, "nope")


# ---- the official scorers, transcribed, against ours on generated messy answers

# GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py (VQAEval), the code the VQAv2 and VizWiz servers
# score with; haotian-liu/LLaVA llava/eval/m4c_evaluator.py (EvalAIAnswerProcessor) holds the same tables
VQAEVAL_CONTRACTIONS = dict(pair.split("=") for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've couldnt've=couldn't've
didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've hadn'tve=hadn't've hasnt=hasn't
havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd howll=how'll hows=how's Id've=I'd've
I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am
mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at
shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't
shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've
somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd someoned've=someone'd've
someone'dve=someone'd've someonell=someone'll someones=someone's somethingd=something'd
somethingd've=something'd've something'dve=something'd've somethingll=something'll thats=that's thered=there'd
thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd theyd've=they'd've
they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've
we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's
whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll
whos=who's whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've
y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've youll=you'll youre=you're
youve=you've""".split())
VQAEVAL_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                   "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
VQAEVAL_ARTICLES = ["a", "an", "the"]
VQAEVAL_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                 "?", "!"]
VQAEVAL_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
VQAEVAL_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")


def vqaeval_punctuation(in_text, comma_strip=VQAEVAL_COMMA_STRIP):  # VQAEval.processPunctuation
    out_text = in_text
    for p in VQAEVAL_PUNCT:
        if (p + " " in in_text or " " + p in in_text) or re.search(comma_strip, in_text) is not None:
            out_text = out_text.replace(p, "")
        else:
            out_text = out_text.replace(p, " ")
    return VQAEVAL_PERIOD_STRIP.sub("", out_text, re.UNICODE)  # as there: re.UNICODE lands on sub's count


def vqaeval_digit_article(in_text):  # VQAEval.processDigitArticle
    out_text = []
    for word in in_text.lower().split():
        word = VQAEVAL_NUMBERS.get(word, word)
        if word not in VQAEVAL_ARTICLES:
            out_text.append(word)
    return " ".join(VQAEVAL_CONTRACTIONS.get(word, word) for word in out_text)


def vqaeval_accuracy(res_ans, answers):
    """VQAEval.evaluate for one question whose human answers carry distinct answer_ids, as VQAv2's do."""
    clean = lambda s: s.replace("\n", " ").replace("\t", " ").strip()
    gts = [dict(answer=clean(a), answer_id=i + 1) for i, a in enumerate(answers)]
    res_ans = clean(res_ans)
    if len(set(g["answer"] for g in gts)) > 1:
        for g in gts:
            g["answer"] = vqaeval_digit_article(vqaeval_punctuation(g["answer"]))
        res_ans = vqaeval_digit_article(vqaeval_punctuation(res_ans))
    gt_acc = []
    for gt in gts:
        other = [g for g in gts if g != gt]
        gt_acc.append(min(1, float(len([g for g in other if g["answer"] == res_ans])) / 3))
    return float(sum(gt_acc)) / len(gt_acc)


# haotian-liu/LLaVA llava/eval/m4c_evaluator.py: EvalAIAnswerProcessor (which eval_textvqa.py applies to both sides
# and scripts/convert_{vqav2,vizwiz}_for_submission.py to the answers they submit) and TextVQAAccuracyEvaluator
EVALAI_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")


def evalai_processor(item):  # EvalAIAnswerProcessor.__call__
    item = item.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()  # word_tokenize
    item = item.replace("\n", " ").replace("\t", " ").strip()
    return vqaeval_digit_article(vqaeval_punctuation(item, EVALAI_COMMA_STRIP))


def textvqa_evaluator(pred_answer, gt_answers):  # TextVQAAccuracyEvaluator, one question
    answers = [evalai_processor(a) for a in gt_answers]
    assert len(answers) == 10
    gt = list(enumerate(answers))
    scores = {}
    for unique in set(answers):
        accs = [min(1, float(len([o for o in gt if o != g and o[1] == unique])) / 3) for g in gt]
        scores[unique] = sum(accs) / len(accs)
    return scores.get(evalai_processor(pred_answer), 0.0)


# haotian-liu/LLaVA llava/eval/eval_pope.py: eval_pope
def pope_parse(text):
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if "No" in words or "not" in words or "no" in words else "yes"


def pope_official(texts, labels):
    """eval_pope's metrics over answers and labels in the same order; ZeroDivisionError where it has one."""
    preds = [0 if pope_parse(t) == "no" else 1 for t in texts]
    labels = [0 if l == "no" else 1 for l in labels]
    tp = sum(p == 1 and l == 1 for p, l in zip(preds, labels))
    fp = sum(p == 1 and l == 0 for p, l in zip(preds, labels))
    tn = sum(p == 0 and l == 0 for p, l in zip(preds, labels))
    fn = sum(p == 0 and l == 1 for p, l in zip(preds, labels))
    yes_ratio = preds.count(1) / len(preds)
    precision = float(tp) / float(tp + fp)
    recall = float(tp) / float(tp + fn)
    f1 = 2 * precision * recall / (precision + recall)
    return dict(accuracy=(tp + tn) / (tp + tn + fp + fn), precision=precision, recall=recall, f1=f1,
                yes_ratio=yes_ratio)


# ---- the generator: a few hundred messy answers per scorer, seeded

MESSY_CORES = ["two", "2", "Two dogs", "one", "none", "ten", "10", "1,000", "1000", "1,2", "3.5", "3. 5", "$5.00",
               "50%", "10:30", "it's", "its", "man's", "the man's hat", "dont", "don't", "isnt", "Let's go", "she's",
               "somebody'd", "oclock", "y'all", "youre", "a dog", "an apple", "the red car", "red", "yes", "no",
               "red, white and blue", "left-side", "t-shirt", "n/a", "e.g. a cat", "u.s.a.", '"stop"', "what?",
               "x/-y-z", "a/b -c", "(A)", "A.", "B. circle", "#1", "well...", "tom's 2nd", "3 . 14"]
PREFIXES = ["", "", "", "", "A. ", "(A) ", "The answer is ", "Answer: ", "It is ", "Yes, ", "No. "]
SUFFIXES = ["", "", "", ".", "!", "?", "...", ",", " .", " !", ")", "\n", "\t", ". It is.", " (B)", "-"]


def messy_variant(rng, core):
    text = rng.choice(PREFIXES) + core + rng.choice(SUFFIXES)
    case = rng.random()
    text = text.upper() if case < 0.1 else text.title() if case < 0.2 else text.lower() if case < 0.3 else text
    return rng.choice(["", "", " ", "\n", "\t"]) + text + rng.choice(["", "", " ", "\n"])


def messy_answer(rng):
    if rng.random() < 0.05:
        return rng.choice(["", " ", "\n", "." * 40, "no " + "." * 35 + " 3.5"])
    words = rng.sample(MESSY_CORES, rng.choice([1, 1, 1, 2]))
    return messy_variant(rng, rng.choice([" ", "  ", "\n", "\t", " - ", ", "]).join(words))


SPELLINGS = [  # spellings of one answer that one normalisation or another makes equal
    ["red,white", "red white", "redwhite", "red, white"], ["man's hat", "man 's hat", "mans hat", "man s hat"],
    ["what?the", "what the", "whatthe", "what? the"], ["1,000", "1000", "1 000", "1.000"], ["3.5", "3. 5", "35"],
    ["two", "2", "Two.", "the two"], ["it's", "its", "it 's", "it is"], ["x/-y-z", "x y z", "x yz", "x-y-z"],
    ["dont", "don't", "do not"], ["somebody'd", "somebodyd", "somebody d"], ["t-shirt", "t shirt", "tshirt"],
    ["a/b -c", "a b c", "ab c", "a/b c"], ["10:30", "1030", "10 30"], ["u.s.a.", "usa", "u s a"]]


def messy_questions(seed, n=400):
    """(prediction, ten human answers) drawn from a few spellings of one answer, some dressed up, and a messy one."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        cores = rng.choice(SPELLINGS) + [messy_answer(rng)]
        pool = [rng.choice(cores) if rng.random() < 0.6 else messy_variant(rng, rng.choice(cores))
                for _ in range(rng.choice([1, 2, 4]))]
        humans = [rng.choice(pool) for _ in range(10)]
        out.append((rng.choice(pool + [messy_variant(rng, rng.choice(cores)), messy_answer(rng)]), humans))
    return out


def mismatches(pairs):
    bad = [(i, ours, official) for i, (ours, official) in enumerate(pairs) if ours != official]
    return f"{len(bad)} of {len(pairs)} differ, e.g. {bad[:3]}" if bad else ""


def test_official_vqa_normalisation():
    answers = [a for q in messy_questions(0) for a in [q[0]] + q[1]][:1000]
    clean = lambda s: s.replace("\n", " ").replace("\t", " ").strip()
    assert not mismatches([(ev.evalai_answer(a), evalai_processor(a)) for a in answers])
    assert not mismatches([(ev.normalize_answer(a), vqaeval_digit_article(vqaeval_punctuation(clean(a))))
                           for a in answers])
    table = list(VQAEVAL_CONTRACTIONS) + list(VQAEVAL_CONTRACTIONS.values())
    assert not mismatches([(ev.normalize_answer(w), vqaeval_digit_article(w)) for w in table])


def bench_rows(qs):
    questions = [dict(question_id=i, image=f"img{i}.jpg", text=f"question {i}?", prompt=f"question {i}?")
                 for i in range(len(qs))]
    answers = [dict(question_id=q["question_id"], prompt=q["prompt"], text=p) for q, (p, _) in zip(questions, qs)]
    return questions, answers


def test_official_textvqa_accuracy():
    qs = messy_questions(1)
    official = [textvqa_evaluator(p, h) for p, h in qs]
    assert not mismatches([(ev.textvqa_accuracy(p, h), o) for (p, h), o in zip(qs, official)])
    questions, answers = bench_rows(qs)
    humans = {(f"img{i}", f"question {i}?"): h for i, (_, h) in enumerate(qs)}
    assert ev.score_textvqa(questions, answers, humans)["accuracy"] == pytest.approx(sum(official) / len(qs))


def test_official_vqav2_vizwiz_accuracy_and_submission():
    # LLaVA submits EvalAIAnswerProcessor's answers; the server scores them with vqaEval
    qs = messy_questions(2)
    official = [vqaeval_accuracy(evalai_processor(p), h) for p, h in qs]
    assert not mismatches([(ev.vqa_accuracy(p, h), o) for (p, h), o in zip(qs, official)])
    questions, answers = bench_rows(qs)
    expected = pytest.approx(sum(official) / len(qs))
    assert ev.score_vqav2(questions, answers, {i: h for i, (_, h) in enumerate(qs)})["accuracy"] == expected
    assert ev.score_vizwiz(questions, answers, {f"img{i}.jpg": h for i, (_, h) in enumerate(qs)})["accuracy"] == \
        expected
    submitted = [evalai_processor(p) for p, _ in qs]
    assert not mismatches(list(zip([r["answer"] for r in ev.submit_vqav2(questions, answers, "/nonexistent")],
                                   submitted)))
    assert not mismatches(list(zip([r["answer"] for r in ev.submit_vizwiz(questions, answers, "")], submitted)))


POPE_PIECES = ["Yes", "yes", "No", "no", "NO", "not", "Not", "Nope", "there is a dog", "there is not a dog",
               "There is no dog", "I don't know", "1.5", "maybe", "no\n", "\nno", "no\tdog", "not\n", "Yes,no"]


def pope_answers(seed, n=400):
    rng = random.Random(seed)
    join = lambda: rng.choice([" ", " ", ", ", ",", ". ", ".", "\n", "\t", " \n", "  "])
    out = []
    for _ in range(n):
        pieces = [rng.choice(POPE_PIECES) for _ in range(rng.choice([1, 1, 2, 3]))]
        text = pieces[0] + "".join(join() + p for p in pieces[1:])
        out.append(text + rng.choice(["", "", ".", ",", "\n", " ", "!"]) if rng.random() > 0.03 else "")
    return out


def test_official_pope_parsing_and_metrics():
    texts = pope_answers(3)
    assert not mismatches([(ev.parse_yes_no(t), pope_parse(t)) for t in texts])
    rng = random.Random(4)
    for start in range(0, len(texts), 20):  # 20 splits of 20 answers, the first with no yes at all
        group = texts[start:start + 20] if start else ["No."] * 20
        labels = [rng.choice(["yes", "no"]) for _ in group]
        ours = ev.pope_metrics(dict(enumerate(group)), dict(enumerate(labels)))
        try:
            official = pope_official(group, labels)
        except ZeroDivisionError:  # nothing said yes: eval_pope divides by zero where pope_metrics gives 0
            assert start == 0
            official = dict(accuracy=labels.count("no") / len(labels), precision=0.0, recall=0.0, f1=0.0,
                            yes_ratio=0.0)
        assert ours == official


# =============================================================================
# shapes.py: the world, its stand-ins, the default run's report


SMALL = dict(n_train=20, n_eval=5)


def files_of(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_world_is_deterministic_and_well_formed(tmp_path):
    a = shapes.build_shapes_world(tmp_path / "a", seed=1, **SMALL)
    b = shapes.build_shapes_world(tmp_path / "b", seed=1, **SMALL)
    names = files_of(a["root"])
    assert names == files_of(b["root"]) and len([n for n in names if n.endswith(".png")]) == 25
    _, mismatch, errors = filecmp.cmpfiles(a["root"], b["root"], names, shallow=False)
    assert mismatch == [] and errors == []

    tok = AutoTokenizer.from_pretrained(STAND_IN_LLM)
    for text in ["[0.12, 0.34, 0.56, 0.78]", data.SYSTEM + " USER: What colour is the circle? ASSISTANT: red"]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.convert_ids_to_tokens([tok.pad_token_id, tok.bos_token_id, tok.eos_token_id]) == ["<pad>", "<s>",
                                                                                                  "</s>"]
    for key, template in [("pretrain", "plain"), ("finetune", "vicuna_v1"), ("text", "vicuna_v1")]:
        records = json.load(open(a[key]))
        assert len(records) == (40 if key == "finetune" else 20)  # stage 2: the image conversations, then as text
        for r in records:
            data.check_record(r, key)
            ids, labels = data.tokenize_conversation(tok, r["conversations"], template)
            assert tok.unk_token_id not in ids and any(label != X for label in labels)
    finetune, text = json.load(open(a["finetune"])), json.load(open(a["text"]))
    assert finetune[20:] == text and all("image" not in r and "image" in f for r, f in zip(text, finetune))
    ids = []
    for task in shapes.TASKS:
        for r in map(json.loads, open(os.path.join(a["eval_dir"], f"{task}.jsonl"))):
            assert r["category"] == task and "<image>" not in r["text"]
            assert os.path.exists(os.path.join(a["image_folder"], r["image"]))
            if task == "grounding":
                assert r["answer"] == "[" + ", ".join(f"{v:.2f}" for v in r["bbox"]) + "]"
            ids.append(r["question_id"])
    assert len(ids) == len(set(ids))


def test_world_asks_every_objects_colour(tmp_path):
    w = shapes.build_shapes_world(tmp_path, seed=2, n_train=60, n_eval=1)
    for r in json.load(open(w["text"])):
        turns = r["conversations"]
        scene = re.findall(r"<\w+:(\w+)_(\w+)>", turns[0]["value"])  # the cell words of the non-empty cells
        colour_of = {shape: colour for colour, shape in scene}
        asked = [(re.search(r"What colour is the (\w+)\?", q["value"]), a["value"])
                 for q, a in zip(turns[::2], turns[1::2]) if "\nA. " not in q["value"]]  # not mc's colour question
        asked = [(m.group(1), a) for m, a in asked if m]
        assert len(turns) == 12 and sorted(asked) == sorted(colour_of.items())


def test_world_balance_and_answers(tmp_path):
    w = shapes.build_shapes_world(tmp_path, seed=0, n_train=0, n_eval=60)
    answers = {t: [json.loads(line)["answer"] for line in open(os.path.join(w["eval_dir"], f"{t}.jsonl"))]
               for t in shapes.TASKS}
    for t in ("existence", "relpos"):
        assert abs(answers[t].count("Yes") - answers[t].count("No")) <= 1
        assert set(answers[t]) == {"Yes", "No"}
    assert set(answers["count"]) <= {"1", "2", "3"} and set(answers["mc"]) <= set("ABCD")
    assert set(answers["colour"]) <= set(shapes.COLOURS) and set(answers["shape"]) <= set(shapes.SHAPES)
    assert set(answers["position"]) <= set(shapes.POSITIONS)


def test_world_cache(tmp_path, monkeypatch):
    shapes.build_shapes_world(tmp_path, **SMALL)
    with monkeypatch.context() as m:
        m.setattr(shapes, "draw_scene", lambda *a: pytest.fail("cached world was regenerated"))
        shapes.build_shapes_world(tmp_path, **SMALL)
    w = shapes.build_shapes_world(tmp_path, n_train=21, n_eval=4)
    assert len(json.load(open(w["pretrain"]))) == 21
    assert sorted(os.listdir(w["image_folder"]))[-1] == "train_00020.png"
    assert "eval_00004.png" not in os.listdir(w["image_folder"])  # the old world's files are gone
    assert json.load(open(os.path.join(tmp_path, "settings.json")))["n_train"] == 21


def test_patch_labels_by_hand():
    square = dict(shape="square", colour="red", xy=(8, 0), size=16)
    shape, colour = shapes.patch_labels([square], image_size=32, patch_size=8)
    # 4x4 patches, centres at 4, 12, 20, 28 px: the square's [8, 24) x [0, 16) covers columns 1-2 of rows 0-1
    covered = {1, 2, 5, 6}
    assert shape == [2 if i in covered else 0 for i in range(16)]  # 1 + SHAPES.index("square")
    assert colour == [4 if i in covered else 0 for i in range(16)]  # blue, green, purple, red: 1 + 3


def test_tower_pretraining_teaches_the_tower():
    """The per-patch loss must fall below the entropy of the labels (the best an input-blind guess can do), and far
    below what the same head reaches on the random tower left frozen: the tower itself learned what is where."""
    side, patch = 48, 8
    rng = random.Random("another seed")
    labels = [shapes.patch_labels(shapes.random_scene(rng, side, 3), side, patch) for _ in range(500)]
    entropy = 2 * math.log(side // patch)  # row and column: uniform
    for column in zip(*labels):  # shape, colour
        p = torch.bincount(torch.tensor(column).flatten()).float()
        p = p[p > 0] / p.sum()
        entropy += -(p * p.log()).sum().item()
    final = {}
    for trained in (True, False):
        torch.manual_seed(0)
        tower = CLIPVisionModel(tiny_vision_config(image_size=side, patch_size=patch)).requires_grad_(trained)
        losses = shapes.pretrain_vision(tower, clip_processor(side), seed=0, max_objects=3, images=256, steps=300,
                                       batch_size=16, lr=3e-3)
        final[trained] = sum(losses[-10:]) / 10
        assert losses[0] > entropy and not tower.training
    assert final[True] < 0.3 * final[False] and final[False] < entropy


def test_text_documents_answer_from_their_notation():
    """The language pretraining's documents: nine cell words where the image will be, then the caption or the
    description of those cells (read back from the words, not from the generator's scene), or a vicuna_v1 turn whose
    colour, shape, existence, position and grounding answers are the ones the cell words give."""
    rng = random.Random("docs")
    seen = set()
    for _ in range(300):
        prompt, answer = shapes.text_document(rng, 96, 3, rng.choice(["caption", "description", *shapes.TASKS]))
        doc = prompt + answer
        words = re.findall(r"<([a-z_]+):(empty|(\w+)_(\w+))>", doc)
        assert [w[0] for w in words] == [p.replace(" ", "_") for p in shapes.POSITIONS]  # each word names its cell
        cells = [w[1:] for w in words]
        pairs = [(c, s) for word, c, s in cells if word != "empty"]  # (colour, shape), row-major
        where = [shapes.POSITIONS[i] for i, (word, _, _) in enumerate(cells) if word != "empty"]
        assert 1 <= len(pairs) <= 3
        if not doc.startswith(data.SYSTEM):
            assert prompt == shapes.cell_notation([dict(cell=k, colour=c, shape=sh)
                                                 for k, (w, c, sh) in enumerate(cells) if w != "empty"])
            assert doc.endswith(".\n")
            if answer.startswith("a "):
                assert re.findall(r"a (\w+) (\w+) at the ([a-z ]+?)(?:,| and|\.)", answer) == [
                    (c, s, w) for (c, s), w in zip(pairs, where)]
                seen.add("caption")
            else:  # "the circle is red, the square is blue and ..."
                assert re.fullmatch(r"the \w+ is \w+((, | and )the \w+ is \w+)*\.\n", answer)
                assert re.findall(r"the (\w+) is (\w+)", answer) == [(s, c) for c, s in pairs]
                seen.add("description")
            continue
        question, answer = doc.split(">\n", 1)[1].split(" ASSISTANT: ")
        question = question.removesuffix(data.SHORT_ANSWER)
        if m := re.fullmatch(r"What colour is the (\w+)\?", question):
            assert answer == dict((s, c) for c, s in pairs)[m[1]]
        elif m := re.fullmatch(r"What shape is the (\w+) object\?", question):
            assert answer == dict(pairs)[m[1]]
        elif m := re.fullmatch(r"Is there a (\w+) (\w+) in the image\?", question):
            assert answer == ("Yes" if (m[1], m[2]) in pairs else "No")
        elif m := re.fullmatch(r"Where is the (\w+) (\w+)\?", question):
            assert answer == where[pairs.index((m[1], m[2]))]
        elif question.startswith(data.GROUNDING_PROMPT.format(ref="")):
            colour, shape = question.split()[-2:]
            x1, y1, x2, y2 = map(float, answer.strip("[]").split(", "))
            row, column = int(3 * (y1 + y2) / 2), int(3 * (x1 + x2) / 2)  # the box's centre lies in its cell
            assert where[pairs.index((colour, shape))] == shapes.POSITIONS[3 * row + column]
        else:
            continue
        seen.add(question.split()[0] + question.split()[1])
    assert len(seen) == 7


def test_language_pretraining_supervises_what_stage_2_does():
    """A vicuna_v1 document becomes the ids and labels data.tokenize_conversation gives the same turn in stage 2
    (with the cell words where the image would be): only the answer and eos are supervised."""
    tok = AutoTokenizer.from_pretrained(STAND_IN_LLM)
    rng = random.Random(1)
    checked = 0
    for _ in range(40):
        prompt, answer = shapes.text_document(rng, 96, 3, rng.choice(["caption", "description", *shapes.TASKS]))
        sample = shapes.document_sample(tok, prompt, answer)
        supervised = sample["labels"] != data.IGNORE_INDEX
        assert tok.decode(sample["input_ids"][supervised]) == answer + tok.eos_token
        if prompt.startswith(data.SYSTEM):
            human = prompt.removeprefix(data.SYSTEM + " USER: ").removesuffix(" ASSISTANT:")
            ids, labels = data.tokenize_conversation(tok, [{"from": "human", "value": human},
                                                           {"from": "gpt", "value": answer.removeprefix(" ")}],
                                                     "vicuna_v1")
            assert sample["input_ids"].tolist() == ids and sample["labels"].tolist() == labels
            checked += 1
    assert checked > 20


def test_cell_words_are_single_tokens():
    """Each of the 189 cell words (9 cells x 21 contents) is one token of the stand-in's tokenizer, so the notation is
    9 tokens like the 9 visual tokens."""
    tok = AutoTokenizer.from_pretrained(STAND_IN_LLM)
    rng = random.Random(0)
    for _ in range(20):
        ids = tok.encode(shapes.cell_notation(shapes.random_scene(rng, 96, 3)), add_special_tokens=False)
        assert len(ids) == 9 and set(tok.convert_ids_to_tokens(ids)) <= set(shapes.CELL_WORDS)
    assert len(set(tok.convert_tokens_to_ids(shapes.CELL_WORDS))) == 9 * (1 + 4 * 5)


def test_cell_words_stay_factorised():
    """pretrain_language trains the cell words as sums of shared factors: after training, moving a word to another
    cell changes its embedding by the same vector whatever is in the cell, and recolouring an object by the same
    vector whatever its shape and cell; the factors were trained (the words differ from an untrained run's)."""
    tok = AutoTokenizer.from_pretrained(STAND_IN_LLM)

    def cell_embeddings(steps):
        torch.manual_seed(0)
        llm = LlamaForCausalLM(LlamaConfig(**shapes.TINY_LLM, vocab_size=len(tok), pad_token_id=tok.pad_token_id))
        shapes.pretrain_language(llm, tok, 0, 96, 3, steps=steps, batch_size=2, lr=1e-2)
        return llm.get_input_embeddings().weight.detach()

    E = cell_embeddings(3)

    def e(place, content):
        return E[tok.convert_tokens_to_ids(f"<{place}:{content}>")]
    for content in ("empty", "red_circle", "blue_cross"):
        torch.testing.assert_close(e("top_left", content) - e("center", content), e("top_left", "green_square") -
                                   e("center", "green_square"))
    for place, shape in (("top", "circle"), ("bottom_right", "triangle")):
        torch.testing.assert_close(e(place, f"red_{shape}") - e(place, f"yellow_{shape}"),
                                   e("left", "red_cross") - e("left", "yellow_cross"))
    assert not torch.allclose(e("top", "red_circle"), e("top", "red_square"))
    cells = tok.convert_tokens_to_ids(shapes.CELL_WORDS)
    assert not torch.allclose(E[cells], cell_embeddings(0)[cells])


def test_finetune_epochs_from_the_command_line():
    """--finetune_epochs gives stage 2 (and onestage) its own epochs; 0 leaves it at --epochs."""
    cfg, _ = parse_args(train.TrainConfig, ["--epochs", "2", "--finetune_epochs=1"])
    assert [train.stage_recipe(cfg, s)[-1] for s in ("pretrain", "finetune", "onestage")] == [2, 1, 1]
    cfg, _ = parse_args(train.TrainConfig, ["--epochs=3"])
    assert [train.stage_recipe(cfg, s)[-1] for s in ("pretrain", "finetune")] == [3, 3]


# ---- the stand-ins: shipped, checked, rebuilt by the same code


def test_stand_ins_build_from_scratch(tmp_path, monkeypatch):
    """`python shapes.py --stand_ins DIR` through the same code as the shipped build, a few steps: folders that load
    through from_pretrained, a provenance whose sha256 are the files', a check that passes; a build cut short leaves
    the folder it would replace as it was."""
    shapes.build_shapes_world(tmp_path / "w", **SMALL)
    out = str(tmp_path / "stand_ins")
    shapes.main(["--stand_ins", out, "--world", str(tmp_path / "w"), "--vision_steps=2", "--language_steps=2",
                 "--check_n=2"])
    provenance = shapes.check_stand_ins(out, 96)
    assert set(provenance["language_check"]) == set(shapes.TASKS) | {"n"}
    assert provenance["settings"]["llm_pretrain"]["steps"] == 2 and provenance["command"].startswith("python shapes.py")
    files = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
    assert sorted(provenance["sha256"]) == [f for f in files if f != "provenance.json"]
    for name, digest in provenance["sha256"].items():
        assert hashlib.sha256(open(os.path.join(out, name), "rb").read()).hexdigest() == digest
    tok = AutoTokenizer.from_pretrained(os.path.join(out, "llm"))
    llm = LlamaForCausalLM.from_pretrained(os.path.join(out, "llm"))
    tower = CLIPVisionModel.from_pretrained(os.path.join(out, "vision"))
    assert llm.config.vocab_size == len(tok) and tower.config.image_size == 96
    before = {f: open(os.path.join(out, f), "rb").read() for f in files}
    def cut_short(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(shapes, "pretrain_language", cut_short)
    with pytest.raises(KeyboardInterrupt):
        shapes.build_stand_ins(out, 0, str(tmp_path / "w"), vision_steps=1, language_steps=1, check_n=1)
    assert {f: open(os.path.join(out, f), "rb").read() for f in files} == before


def test_shipped_stand_ins_match_their_provenance_and_this_code():
    """stand_ins/ as shipped: every file's sha256 as recorded, configs the world's, and built with the settings this
    code would build them with (a change to the pretraining without a rebuild fails here)."""
    provenance = shapes.check_stand_ins(shapes.STAND_INS, shapes.TINY_VISION["image_size"])
    settings = provenance["settings"]
    assert settings["vision"] == shapes.TINY_VISION and settings["llm"] == shapes.TINY_LLM
    assert settings["vision_pretrain"] == shapes.TINY_VISION_PRETRAIN
    assert settings["llm_pretrain"] == shapes.TINY_LLM_PRETRAIN and settings["mix"] == shapes.TINY_LLM_MIX
    assert settings["vocab_size"] == shapes.VOCAB_SIZE
    assert CLIPVisionConfig.from_pretrained(os.path.join(shapes.STAND_INS, "vision")).patch_size == 8
    assert re.fullmatch(r"[0-9a-f]{40}", provenance["commit"])  # built from a committed tree


def test_shipped_stand_in_llm_scores_its_recorded_language_check():
    """The shipped LLM, loaded through from_pretrained, answers the scene-as-text documents as recorded: the same
    documents (the check's own seed), so only floating-point noise may move a score."""
    provenance = json.load(open(os.path.join(shapes.STAND_INS, "provenance.json")))
    recorded = dict(provenance["language_check"])
    n = recorded.pop("n")
    tok = AutoTokenizer.from_pretrained(STAND_IN_LLM)
    llm = LlamaForCausalLM.from_pretrained(STAND_IN_LLM).eval()
    world = provenance["settings"]["world"]
    got = shapes.language_check(llm, tok, provenance["seed"], world["image_size"], world["max_objects"], n=n)
    for task, acc in recorded.items():
        assert abs(got[task] - acc) <= 0.02, (task, got[task], acc)
    assert recorded["colour"] >= 0.95 and recorded["existence"] >= 0.95  # what the default run's targets rest on


def broken_copy(tmp_path, edit):
    folder = tmp_path / "stand_ins"
    shutil.copytree(shapes.STAND_INS, folder)
    edit(folder)
    return str(folder), {f: open(os.path.join(d, f), "rb").read() for d, _, fs in os.walk(folder) for f in fs}


def edit_json(path, **changes):
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


def flip_a_byte(path):
    body = bytearray(open(path, "rb").read())
    body[-1] ^= 1
    open(path, "wb").write(bytes(body))


@pytest.mark.parametrize("edit, message", [
    (lambda f: os.remove(f / "llm" / "model.safetensors"), "llm/model.safetensors is missing"),
    (lambda f: os.remove(f / "provenance.json"), "provenance.json is missing"),
    (lambda f: flip_a_byte(f / "vision" / "model.safetensors"), "vision/model.safetensors does not match its sha256"),
    (lambda f: edit_json(f / "vision" / "config.json", image_size=64), "vision/config.json image_size is 64"),
    (lambda f: edit_json(f / "vision" / "config.json", patch_size=12), "vision/config.json patch_size 12"),
    (lambda f: edit_json(f / "llm" / "config.json", vocab_size=900), "llm/config.json vocab_size is 900"),
])
def test_bad_stand_ins_stop_the_run_before_training(tmp_path, edit, message):
    """One line naming the folder, the field and the command that rebuilds it, before any training; the folder is
    left exactly as it was (nothing is rebuilt over a user's files)."""
    folder, files = broken_copy(tmp_path, edit)
    with pytest.raises(SystemExit) as stop:
        train.main(["--stand_ins", folder, "--shapes_root", str(tmp_path / "w"), "--out_dir", str(tmp_path / "out")])
    text = str(stop.value)
    assert "\n" not in text and text.startswith(folder) and message in text
    assert f"python shapes.py --stand_ins {folder}" in text
    assert not os.path.exists(tmp_path / "out")
    assert {f: open(os.path.join(d, f), "rb").read() for d, _, fs in os.walk(folder) for f in fs} == files


def test_report_puts_scores_beside_targets_and_chance(tmp_path):
    """Chance is the best single answer given to every question, scored by the task's own scorer: by hand, colour
    2 of 3 (always "red"), existence F1 2/3 (always "Yes" on balanced questions)."""
    rows = dict(colour=[("red", None), ("red", None), ("blue", None)],
                existence=[("Yes", None), ("No", None)])
    for task, answers in rows.items():
        ev.write_jsonl(tmp_path / f"{task}.jsonl", [dict(question_id=i, text="q", answer=a, image="x.png")
                                                     for i, (a, _) in enumerate(answers)])
    assert shapes.best_constant("colour", ev.read_jsonl(tmp_path / "colour.jsonl")) == pytest.approx(2 / 3)
    assert shapes.best_constant("existence", ev.read_jsonl(tmp_path / "existence.jsonl")) == pytest.approx(2 / 3)
    results = dict(colour=dict(n=3, accuracy=1.0), existence=dict(n=2, f1=0.5))
    table = shapes.report(results, str(tmp_path), dict(colour=0.98))
    colour, existence = (next(line for line in table.splitlines() if line.startswith(t)) for t in rows)
    assert "100.0%*" in colour and ">=90%" in colour and "66.7%" in colour and "98.0%" in colour
    assert "50.0%!" in existence and "66.7%" in existence


def test_world_feeds_the_dataset(tmp_path, processor):
    from transformers import AutoTokenizer
    w = shapes.build_shapes_world(tmp_path, **SMALL)
    tok = AutoTokenizer.from_pretrained(STAND_IN_LLM)
    ds = data.LlavaDataset(w["finetune"], w["image_folder"], tok, processor, "vicuna_v1", "pad", 9, 256)
    batch = data.collate([ds[i] for i in range(4)], pad_id=tok.pad_token_id, image_size=32)
    assert batch["has_image"].all() and (batch["input_ids"] == IMG).sum(1).tolist() == [1] * 4

# =============================================================================
# rgae.py: R-GAE (the paper's Sec. 3.1, Eqs. 2-5)


def test_text_to_query_row_is_a_row_of_the_full_product():
    import rgae
    torch.manual_seed(0)
    S, p = 7, 5
    A_bars = [torch.rand(S, S).tril() / S for _ in range(3)]  # first layer first
    R = torch.eye(S)
    for A_bar in A_bars:  # Eq. 3 as written: R <- R + A_bar R, layer by layer
        R = R + A_bar @ R
    torch.testing.assert_close(rgae.text_to_query_row(A_bars, p), R[p])


@pytest.mark.parametrize("N,M", [(36, 9), (36, 16), (16, 4)])
def test_avgpool_query_to_patch_is_the_pooling_jacobian(N, M):
    import rgae
    n, m = int(N ** 0.5), int(M ** 0.5)
    pool = lambda v: F.adaptive_avg_pool2d(v.view(1, 1, n, n), m).flatten()
    jacobian = torch.autograd.functional.jacobian(pool, torch.randn(N))  # [M, N]
    torch.testing.assert_close(rgae.pooling_map(N, M), jacobian)



def test_maxpool_query_to_patch_counts_channel_maxima():
    import rgae
    torch.manual_seed(0)
    x = torch.randn(36, 5)  # a 6x6 grid, 5 channels, pooled to 3x3: 2x2 windows
    R = rgae.maxpool_map(x, 9)
    for j in range(9):
        r, c = divmod(j, 3)
        window = [(2 * r + dr) * 6 + 2 * c + dc for dr in (0, 1) for dc in (0, 1)]
        shares = torch.zeros(36)
        for channel in range(5):  # each channel's maximum in the window gives its patch 1/5
            shares[window[int(x[window, channel].argmax())]] += 1 / 5
        torch.testing.assert_close(R[j], shares)

def test_qformer_gae_rules_by_hand():
    """2 queries, 3 patches; layer 0 self- then cross-attention, layer 1 self-attention only."""
    import rgae
    self0 = torch.tensor([[0.5, 0.1], [0.2, 0.3]])
    cross0 = torch.tensor([[0.4, 0.0, 0.2], [0.1, 0.3, 0.0]])
    self1 = torch.tensor([[0.1, 0.0], [0.0, 0.2]])
    # layer 0 self: R_qq = I + self0 = [[1.5, .1], [.2, 1.3]], R_qi stays 0
    # normalise(R_qq): R_qq - I has row sums .6 and .5 -> [[5/6, 1/6], [.4, .6]] + I = [[11/6, 1/6], [.4, 1.6]]
    # cross: R_qi = normalise(R_qq)^T cross0 = [[11/6 * .4 + .4 * .1, .4 * .3, 11/6 * .2], [1/6 * .4 + 1.6 * .1, 1.6 * .3, 1/6 * .2]]
    # layer 1 self: R_qi += self1 R_qi, i.e. rows times 1.1 and 1.2
    expected = torch.tensor([[1.1 * (11 / 6 * 0.4 + 0.04), 1.1 * 0.12, 1.1 * 11 / 6 * 0.2],
                             [1.2 * (0.4 / 6 + 0.16), 1.2 * 0.48, 1.2 * 0.2 / 6]])
    got = rgae.decoder_relevance([("self", self0), ("cross", cross0), ("self", self1)], 3)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(rgae.normalise(torch.eye(3)), torch.eye(3))  # no 0/0
    # no self-attention before the cross-attention: R_qq = I, so R_qi = cross0 itself
    torch.testing.assert_close(rgae.decoder_relevance([("cross", cross0)], 3), cross0)


def rgae_sample(parts, projector, M, **options):
    import rgae
    torch.manual_seed(0)
    model, tok, proc = M_build(parts, projector, M, **options)
    prompt = [tok.bos_token_id, IMG] + tok("what colour is the circle ?", add_special_tokens=False)["input_ids"]
    answer = tok("a red circle", add_special_tokens=False)["input_ids"]
    pixels = torch.randn(3, 32, 32)
    return model, prompt, answer, pixels, rgae.relevance(model, pixels, prompt, answer, per_token=True)


def M_build(parts, projector, num_tokens, **options):
    return M.build_model(*parts, projector, num_tokens, attn_implementation="eager", **options)


def test_rgae_targets_the_predicting_position(parts):
    """Text-to-Query of token t, recomputed here with the full (I + A_bar) product over the LLM's attention maps,
    from the gradient of the logit of y_t at the position BEFORE y_t; y_t's own position gives another answer."""
    model, prompt, answer, pixels, maps = rgae_sample(parts, "avgpool", 4)
    ids = torch.tensor([prompt + answer])
    embeds, mask, _, positions = model.splice(ids, torch.ones_like(ids), None, pixels[None])
    out = model.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, output_attentions=True)
    p, Mv = prompt.index(IMG), 4
    rows = {}
    for t, y in enumerate(answer):
        y_pos = len(prompt) - 1 + Mv + t
        for name, pos in (("predicting", y_pos - 1), ("own", y_pos)):
            grads = torch.autograd.grad(out.logits[0, pos, y], out.attentions, retain_graph=True)
            R = torch.eye(embeds.shape[1])
            for g, A in zip(grads, out.attentions):
                R = R + (g * A).clamp(min=0).mean(1)[0] @ R
            rows.setdefault(name, []).append(R[pos, p:p + Mv])
    torch.testing.assert_close(maps["text_to_query_t"], torch.stack(rows["predicting"]))
    assert not torch.allclose(maps["text_to_query_t"], torch.stack(rows["own"]))


@pytest.mark.parametrize("projector,M,options", [
    ("linear", 16, {}), ("avgpool", 4, {}), ("maxpool", 4, {}), ("cabstractor", 4, dict(depth=1)),
    ("qformer", 4, dict(hidden_size=16, num_heads=2, intermediate_size=32)), ("dabstractor", 4, dict(num_layers=1))])
def test_rgae_maps_for_every_projector(parts, projector, M, options):
    model, prompt, answer, pixels, maps = rgae_sample(parts, projector, M, **options)
    L, N = len(answer), 16
    assert maps["text_to_query_t"].shape == (L, M) and maps["query_to_patch_t"].shape == (L, M, N)
    for k in ("text_to_query", "query_to_patch", "text_to_patch"):  # Eq. 5: the mean over t of the per-t maps
        torch.testing.assert_close(maps[k], maps[k + "_t"].mean(0))
        assert torch.isfinite(maps[k]).all() and (maps[k] >= 0).all()
    products = torch.einsum("lm,lmn->ln", maps["text_to_query_t"], maps["query_to_patch_t"])  # Eq. 4 per t
    torch.testing.assert_close(maps["text_to_patch_t"], products)
    assert maps["text_to_query"].sum() > 0
    import rgae
    batched = rgae.relevance(model, pixels, prompt, answer, per_token=True, targets_per_backward=2)
    for k in maps:  # two targets per backward pass, then one: the same maps as one autograd.grad call per target
        torch.testing.assert_close(batched[k], maps[k], rtol=1e-5, atol=1e-6)
    if projector == "linear":
        torch.testing.assert_close(maps["query_to_patch"], torch.eye(N))
    if projector == "maxpool":  # each visual token's channels take their maxima from its own 2x2 window
        torch.testing.assert_close(maps["query_to_patch"].sum(-1), torch.ones(M))
        assert set(maps["query_to_patch"][0].nonzero().flatten().tolist()) <= {0, 1, 4, 5}


def test_cabstractor_gradient_times_input_against_the_jacobian():
    import rgae
    torch.manual_seed(0)
    proj = build_projector("cabstractor", 8, 12, 16, 4, depth=1)
    x = torch.randn(1, 16, 8, requires_grad=True)
    grad_visual = torch.randn(1, 4, 12)
    got = rgae.gradient_times_input(x, proj(x), grad_visual)
    J = torch.autograd.functional.jacobian(proj, x)[0, :, :, 0]  # [M, d_llm, N, C]
    through_j = torch.einsum("md,mdnc->mnc", grad_visual[0], J)  # dz/dx along visual token j alone
    R = (through_j * x[0].detach()).sum(-1).clamp(min=0)
    torch.testing.assert_close(got, R / R.sum(-1, keepdim=True))

def test_patches_in_box_by_hand():
    import rgae
    # a 4x4 grid: patch centres at 0.125, 0.375, 0.625, 0.875 on each axis
    assert rgae.patches_in_box([0.0, 0.0, 0.5, 0.5], 4).nonzero().flatten().tolist() == [0, 1, 4, 5]
    assert rgae.patches_in_box([0.3, 0.3, 0.7, 0.7], 4).nonzero().flatten().tolist() == [5, 6, 9, 10]
    assert rgae.patches_in_box([0.6, 0.0, 1.0, 0.3], 4).nonzero().flatten().tolist() == [2, 3]


def test_rgae_command_writes_figure_and_maps(world, tmp_path):
    import rgae
    train.main(train_args(world, tmp_path, "--stage=pretrain", "--epochs=1"))
    image = os.path.join(world["image_folder"], "eval_00000.png")
    rgae.main([f"--ckpt={tmp_path}", f"--image={image}", "--text=a red circle", "--raw_attention",
               f"--out={tmp_path / 'fig.png'}"])
    maps = __import__("numpy").load(tmp_path / "fig.npz")
    assert maps["text_to_patch"].shape == (16,) and maps["query_to_patch_t"].shape[1:] == (4, 16)
    assert maps["raw_attention"].shape == (16,)
    assert Image.open(tmp_path / "fig.png").size[0] > 6 * 160

# =============================================================================
# bench.py


def test_bench_feeds_transformers_llava_our_batch(tmp_path):
    """bench.py's transformers side trains the same parameters, and with our weights copied in (LoRA included) gives
    our loss on its batch: the image token repeated N times, its labels ignored."""
    import bench
    cfg = bench.BenchConfig(batch_size=2, text_tokens=12)
    bench.save_models(cfg, tmp_path)
    ours = M.build_model(str(tmp_path / "vision"), str(tmp_path / "llm"), "linear", 0, cfg.lora_r, 2 * cfg.lora_r,
                         attn_implementation="eager")[0]
    theirs = bench.build_hf_llava(cfg, str(tmp_path), torch.float32)
    trainable = [p for p in ours.parameters() if p.requires_grad]
    assert sum(p.numel() for p in theirs.parameters() if p.requires_grad) == sum(p.numel() for p in trainable)
    with torch.no_grad():
        for p in trainable:  # LoRA's B starts at zero: make every adapter count
            p.normal_(0, 0.05)
    llava, llm = theirs.base_model.model, ours.llm.base_model.model
    llava.model.vision_tower.load_state_dict(ours.vision_tower.state_dict())
    llava.model.language_model.load_state_dict(llm.model.state_dict())
    llava.lm_head.load_state_dict(llm.lm_head.state_dict())
    llava.model.multi_modal_projector.linear_1.load_state_dict(ours.projector[0].state_dict())
    llava.model.multi_modal_projector.linear_2.load_state_dict(ours.projector[2].state_dict())
    ids, pixels = bench.random_inputs(cfg, ours.vision_tower.config.image_size)
    N = ours.num_visual_tokens
    expanded = bench.expand_image(ids, N, bench.HF_IMAGE_TOKEN)
    assert expanded.shape == (2, 12 - 1 + N)
    mine = ours(ids, torch.ones_like(ids), ids.clamp(min=0), pixels)[0]
    loss = theirs(input_ids=expanded, attention_mask=torch.ones_like(expanded), labels=bench.expand_image(ids, N, X),
                  pixel_values=pixels).loss
    torch.testing.assert_close(mine, loss)


@pytest.mark.parametrize("projector,lora_r", [("avgpool", 0), ("avgpool", 4), ("linear", 4)])
def test_train_step_flops_match_torch_flop_counter(tmp_path, projector, lora_r):
    """bench.train_step_flops, written from the configs, against torch.utils.flop_counter counting what one training
    step (forward and backward) of the built model actually runs: stage 1 (no LoRA) and stage 2, pooled and not.
    Eager attention: the counter sees its two products, where the CPU's fused SDPA kernel has no FLOP formula."""
    import bench
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    vision, llm = tiny_vision_config(image_size=32, patch_size=4), tiny_llama_config(vocab_size=300)
    CLIPVisionModel(vision).save_pretrained(tmp_path / "vision")
    LlamaForCausalLM(llm).save_pretrained(tmp_path / "llm")
    word_tokenizer().save_pretrained(tmp_path / "llm")
    clip_processor(32).save_pretrained(tmp_path / "vision")
    model = M.build_model(str(tmp_path / "vision"), str(tmp_path / "llm"), projector, 0, lora_r, 2 * lora_r,
                          attn_implementation="eager")[0]
    model.vision_tower.set_attn_implementation("eager")
    model.train()
    B, text = 3, 20
    ids = torch.randint(1, 300, (B, text))
    ids[:, 1] = M.IMAGE_TOKEN_INDEX
    labels = ids.clone()
    labels[:, :6] = X  # the prompt; the answer is the last 14 tokens
    M_tokens = model.num_visual_tokens
    with FlopCounterMode(display=False) as counter:
        loss = model(ids, torch.ones_like(ids), labels, torch.randn(B, 3, 32, 32))[0]
        loss.backward()
    T = text - 1 + M_tokens
    K = text - 6  # positions whose next token is supervised: the last prompt token's and the answer's but the last
    counted = bench.train_step_flops(vision, llm, M_tokens, B, T, K, lora_r, projector)
    assert counted["total"] == counter.get_total_flops()  # to the FLOP: the formula leaves no product out


def test_activation_bytes_extrapolate_in_layers_tokens_and_batch():
    """stage2_memory's activations, b T (L per_layer + outside) plus autocast's bf16 copy of the LoRA weights, from
    the slopes measured at 1 and 2 layers and 1 sample, against the bytes autograd keeps in a 4-layer forward of 3
    samples of another length."""
    import bench
    llm = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=8, max_position_embeddings=256)
    per_layer, outside = bench.activation_bytes(llm, lora_r=4)
    measured = bench.saved_bytes(llm, 4, 4, [48], batch=3)[0]
    lora = 4 * 4 * (64 + 64 + 64 + 32 + 64 + 32 + 64 + 64 + 3 * (64 + 160))  # L r (in + out) over q k v o gate up down
    assert measured == pytest.approx(3 * 48 * (4 * per_layer + outside) + 2 * lora, rel=0.01)


def test_plan_7b_counts_and_memory(tmp_path):
    """bench.py --plan: LLaVA-1.5-7B's published sizes from shapes on the meta device, LoRA r 128 counted by hand,
    every memory row the sum of its parts, and a micro-batch that cannot fit refused with the one that does."""
    import bench
    bench.main(["--plan", "--out", str(tmp_path / "plan.json")])
    result = json.load(open(tmp_path / "plan.json"))
    c = result["counts"]
    assert c["llm"] == pytest.approx(6.74e9, rel=1e-3) and c["tower"] == pytest.approx(304e6, rel=2e-3)
    assert c["lora"] == 32 * 128 * (4 * (4096 + 4096) + 3 * (4096 + 11008))
    for r in result["memory"]:
        assert r["total"] == pytest.approx(r["weights"] + r["optimizer"] + r["activations"] + r["head"])
        assert r["fits"] == (r["total"] <= 80)
    plain = {(r["projector"], r["micro_batch"]): r["total"] for r in result["memory"] if not r["checkpointing"]}
    ckpt = {(r["projector"], r["micro_batch"]): r["total"] for r in result["memory"] if r["checkpointing"]}
    assert all(ckpt[k] < plain[k] for k in plain) and all(plain["avgpool", b] < plain["linear", b] for b in (1, 8))
    linear, avgpool, ratio = result["flops"]
    assert ratio["sample_tflop"] == pytest.approx(avgpool["sample_tflop"] / linear["sample_tflop"])
    with pytest.raises(SystemExit, match=r"^--plan_micro_batch_size 32: linear's stage 2 needs 4\d GB a GPU even with "
                                         r"gradient checkpointing, over 40 GB; use 16$"):
        bench.main(["--plan", "--plan_gpu_gb", "40", "--plan_micro_batch_size", "32", "--out", str(tmp_path / "p")])


def test_cuda_suite_dry_run_on_cpu(world, tmp_path):
    """bench.py --suite cuda on the CPU at tiny sizes, as CI runs it: the shapes run under torchrun in bf16 (on the
    tiny world's files), bench's rows, and the large step for linear and avgpool with and without checkpointing,
    all written to one JSON. Every path the GPU call takes runs here but the CUDA calls themselves."""
    import bench
    tiny_world = " ".join(a for a in train_args(world, tmp_path / "unused") if not a.startswith("--out_dir"))
    bench.main(["--suite", "cuda", "--suite_model", "tiny", "--suite_dir", str(tmp_path / "suite"), "--device", "cpu",
                "--steps", "1", "--warmup", "0", "--suite_train_args=" + tiny_world + " --epochs 1",
                "--text_tokens", "16", "--suite_micro_batch_size", "2",
                "--suite_bench_args=--config tiny --steps 1 --warmup 0 --data false --projectors linear "
                "--batch_size 2 --text_tokens 20 --new_tokens 4 --answer_tokens 2"])  # prompts of 16, answers of 2
    out = json.load(open(tmp_path / "suite" / "suite.json"))
    assert out["shapes"]["pretrain_s"] > 0 and out["shapes"]["finetune_s"] > 0
    assert json.load(open(tmp_path / "suite" / "shapes" / "ckpt" / "config.json"))["dtype"] == "bfloat16"
    assert [r["projector"] for r in out["bench"]] == ["linear"] and "hf_llava_step_s" in out["bench"][0]
    assert [(r["projector"], r["checkpointing"]) for r in out["large"]] == [
        ("linear", False), ("linear", True), ("avgpool", False), ("avgpool", True)]
    assert all(r["step_s"] > 0 and r["tflop"] > 0 and r["mfu"] is None for r in out["large"])  # no peak off CUDA


# =============================================================================
# experiments.py: the paper's tables and figures over run folders


def fake_run(path, projector, scores, box=None, m=9):
    """A run folder as train.py leaves it: ckpt/config.json, ckpt/model.safetensors (16 projector weights and a
    LoRA tensor, which is not the projector's), eval.json; rgae_box.json where box is given."""
    from safetensors.torch import save_file
    (path / "ckpt").mkdir(parents=True)
    (path / "ckpt" / "config.json").write_text(json.dumps(dict(projector=projector, num_tokens=m)))
    save_file({"projector.0.weight": torch.zeros(4, 3), "projector.0.bias": torch.zeros(4),
               "llm.lora_A": torch.zeros(5, 5)}, str(path / "ckpt" / "model.safetensors"))
    (path / "eval.json").write_text(json.dumps({t: {ev.HEADLINE[t]: v, "n": 1} for t, v in scores.items()}))
    if box is not None:
        (path / "rgae_box.json").write_text(json.dumps(dict(n=1, share_in_box=box)))
    return str(path)


def test_plot_curves_smooths_each_log(tmp_path):
    for name, losses in (("a", range(1, 41)), ("b", [5.0] * 10)):
        ev.write_jsonl(tmp_path / f"{name}.jsonl", [dict(step=i, loss=float(v)) for i, v in enumerate(losses)])
    final = train.plot_curves([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], ["a", "b"], tmp_path / "c.png", smooth=20)
    assert final == [sum(range(21, 41)) / 20, 5.0]  # the mean of the last 20 losses, or of all there are
    assert Image.open(tmp_path / "c.png").size == (640, 360)


def test_threshold_step_by_hand():
    # moving averages over 2: 1.0, 0.75, 0.25, 0.0 -> first below 0.4 at step 3
    assert ex.threshold_step([1.0, 0.5, 0.0, 0.0], below=0.4, smooth=2) == (3, 0.0)
    assert ex.threshold_step([1.0, 1.0], below=0.4, smooth=2) == (None, 1.0)


def test_plot_bars_draws_each_runs_headline_metric(tmp_path):
    runs = [fake_run(tmp_path / "full", "avgpool", dict(colour=1.0, grounding=1.0)),
            fake_run(tmp_path / "empty", "avgpool", dict(colour=0.0, grounding=0.0))]
    scores = ex.plot_bars(runs, ["full", "empty"], tmp_path / "bars.png")
    assert scores == dict(full=dict(colour=100.0, grounding=100.0), empty=dict(colour=0.0, grounding=0.0))
    image = Image.open(tmp_path / "bars.png").convert("RGB")
    # two task groups over the 670-px axis from x=40: in the first, the first run's bar spans x 74..205, the
    # second's 208..339
    first = tuple(int(train.PLOT_COLOURS[0][i:i + 2], 16) for i in (1, 3, 5))
    assert image.getpixel((150, 60)) == first and image.getpixel((150, 200)) == first  # 100%: to the top
    assert image.getpixel((300, 200)) == (255, 255, 255)  # the second run's bar: 0%, nothing drawn


def test_mean_table_averages_a_run_over_seeds(tmp_path):
    runs = {"avgpool": [fake_run(tmp_path / f"s{s}", "avgpool", dict(colour=c, existence=c / 2), box)
                        for s, c, box in ((0, 0.9, 0.2), (1, 0.6, None), (2, 0.75, 0.1))],
            "linear": [fake_run(tmp_path / "lin", "linear", dict(colour=0.9, existence=0.45), 0.2, m=144)]}
    table = ex.mean_table(runs, ["colour", "existence", "in box", "grounding"]).splitlines()
    assert table[0] == "| run | M | projector params | seeds | colour | existence F1 | in box | grounding |"
    # colour 90, 60, 75 -> mean 75; F1 half of it; relevance in box in two of the three seeds: 20 and 10
    assert table[2] == "| avgpool | 9 | 16 | 3 | 75.0 (60.0-90.0) | 37.5 (30.0-45.0) | 15.0 (10.0-20.0) | - |"
    assert table[3] == "| linear | 144 | 16 | 1 | 90.0 | 45.0 | 20.0 | - |"


def test_seed_table_differences_by_hand(tmp_path):
    every = lambda v: {t: v for t in ev.HEADLINE}
    pairs = [(fake_run(tmp_path / "a0", "avgpool", every(0.9)), fake_run(tmp_path / "b0", "maxpool", every(0.8))),
             (fake_run(tmp_path / "a1", "avgpool", every(0.5)), fake_run(tmp_path / "b1", "maxpool", every(0.75)))]
    rows = ex.seed_table(pairs, [0, 1], ("average", "max")).splitlines()
    assert rows[2].startswith("| average | 0 | 90.0 | 90.0 |") and rows[5].startswith("| max | 1 | 75.0 |")
    assert rows[6] == "| average - max | 0 / 1 | " + " | ".join(["+10.0 / -25.0"] * len(ev.HEADLINE)) + " |"


def test_position_by_objects_by_hand(tmp_path):
    (tmp_path / "world" / "eval").mkdir(parents=True)
    ev.write_jsonl(tmp_path / "world" / "eval" / "count.jsonl", [dict(image="a.png", answer="1"),
                                                                  dict(image="b.png", answer="3")])
    ev.write_jsonl(tmp_path / "world" / "eval" / "position.jsonl", [
        dict(question_id=0, image="a.png", answer="top left"), dict(question_id=1, image="b.png", answer="center"),
        dict(question_id=2, image="b.png", answer="right")])
    (tmp_path / "run").mkdir()
    ev.write_jsonl(tmp_path / "run" / "answers_position.jsonl", [
        dict(question_id=0, text="Top left."), dict(question_id=1, text="center"), dict(question_id=2, text="left")])
    assert ex.position_by_objects(tmp_path / "world", tmp_path / "run") == {1: (1, 1), 3: (1, 2)}


def test_an_experiment_trains_only_the_runs_not_done(tmp_path, monkeypatch):
    calls = []

    def run(command, check):  # what train.py does: a scored run in --out_dir
        calls.append(command)
        fake_run(tmp_path / os.path.relpath(command[command.index("--out_dir") + 1], tmp_path), "avgpool",
                 {t: 0.5 for t in ev.HEADLINE})
    monkeypatch.setattr(ex.subprocess, "run", run)
    cfg = ex.ExperimentsConfig(out_dir=str(tmp_path / "paper"), figures=str(tmp_path / "fig"),
                               train_args="--epochs 1")
    fake_run(tmp_path / "paper" / "seed0" / "maxpool", "maxpool", {t: 0.25 for t in ev.HEADLINE})  # done already
    os.makedirs(cfg.figures)
    table = ex.fig7(cfg, [0]).splitlines()
    assert len(calls) == 1 and calls[0][1:] == [
        "train.py", "--projector", "avgpool", "--seed", "0", "--shapes_root", "data/shapes",
        "--out_dir", str(tmp_path / "paper" / "seed0" / "avgpool"), "--resume", "--epochs", "1"]
    assert table[-1].startswith("| average - max | 0 | +25.0 |")
    assert os.path.isfile(tmp_path / "fig" / "fig7_avg_max.png")
    ex.fig7(cfg, [0])  # everything is done now: nothing trains
    assert len(calls) == 1


def test_linear_probe_reads_what_the_features_hold():
    torch.manual_seed(0)
    blank = lambda images, return_tensors: {"pixel_values": torch.zeros(1, 3, 2, 2)}
    _, labels = ex.probe_scenes(blank, 500, seed=0)
    occupied = labels["shape"] < len(shapes.SHAPES)
    assert occupied.sum(1).min() >= 1 and occupied.sum(1).max() <= 3
    assert (labels["shape"] < len(shapes.SHAPES)).eq(labels["colour"] < len(shapes.COLOURS)).all()
    assert ((labels["colour_of_shape"] < len(shapes.COLOURS)).sum(1) == occupied.sum(1)).all()
    # features that spell out each cell's shape and colour: a linear probe reads both
    exact = torch.cat([F.one_hot(labels["shape"], len(shapes.SHAPES) + 1),
                       F.one_hot(labels["colour"], len(shapes.COLOURS) + 1)], -1).float()  # [n, 9, 11]
    r = ex.linear_probe(exact + 0.01 * torch.randn(exact.shape), labels)
    assert r["shape"] == r["colour"] == 1.0 and r["n_cells"] == int(occupied[400:].sum())
    # "the colour of the circle" is not linear in the cells' one-hots (an AND of shape and colour per cell)...
    assert r["colour_of_shape"] < 0.7
    # ...but it is in their products, one per cell, shape and colour
    bound = (exact[..., :len(shapes.SHAPES) + 1, None] * exact[..., None, len(shapes.SHAPES) + 1:]).flatten(2)
    assert ex.linear_probe(bound, labels)["colour_of_shape"] > 0.95  # a triple or two unseen in 400 scenes
    # features that hold only the colours: the shape probe falls to about chance, colour stays
    colour_only = exact[..., len(shapes.SHAPES) + 1:]
    r = ex.linear_probe(colour_only + 0.01 * torch.randn(colour_only.shape), labels)
    assert r["colour"] == 1.0 and r["shape"] < 0.5


def test_cell_box_baseline_by_hand():
    n = 5  # 4 scenes fit the mean boxes, the fifth is held out
    labels = dict(shape=torch.full((n, 9), len(shapes.SHAPES)), box=torch.zeros(n, 9, 4))
    labels["shape"][:, 0] = 0
    labels["box"][:, 0] = torch.tensor([[0, 0, .2, .2], [0, 0, .2, .2], [.1, .1, .3, .3], [.1, .1, .3, .3],
                                        [.05, .05, .25, .25]])
    labels["shape"][4, 4] = 1  # a cell never occupied in the first four: its mean box is empty, IoU 0
    labels["box"][4, 4] = torch.tensor([.4, .4, .6, .6])
    assert ex.cell_box_baseline(labels) == 0.5  # cell 0's mean [.05, .05, .25, .25] hits exactly; cell 4 misses


# ---- the house: imports run one way


def project_imports():
    """{module: the project's modules it imports}, imports inside functions included, from each file's syntax tree."""
    import ast
    import glob
    modules = {os.path.basename(f)[:-3] for f in glob.glob(os.path.join(HERE, "*.py")) if "test" not in f}
    graph = {}
    for m in modules:
        names = set()
        for node in ast.walk(ast.parse(open(os.path.join(HERE, m + ".py")).read())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        graph[m] = names & modules - {m}
    return graph


def test_imports_run_one_way():
    """No cycle among the project's modules, and the model, its projectors and the LLaVA data path import nothing
    of the shapes world, the training loop or the evaluation."""
    graph = project_imports()
    assert {"config", "data", "eval", "model", "projectors", "shapes", "train"} <= set(graph)
    done = set()

    def visit(m, path):
        assert m not in path, f"import cycle: {' -> '.join(path + [m])}"
        if m not in done:
            for d in sorted(graph[m]):
                visit(d, path + [m])
            done.add(m)
    for m in sorted(graph):
        visit(m, [])
    for low in ("config", "projectors", "model", "data"):
        assert not graph[low] & {"shapes", "train", "eval", "rgae", "bench"}, (low, graph[low])
    assert graph["config"] == set() and "shapes" not in graph["eval"]
