"""
Tests on tiny synthetic models, CPU only, nothing downloaded. Each checks behaviour against something independent:
a formula, transformers' own implementation, or a case worked out by hand.
"""
import filecmp
import json
import os
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
import train
from data import IGNORE_INDEX as X, IMAGE_TOKEN_INDEX as IMG
from projectors import build_projector

HERE = os.path.dirname(os.path.abspath(__file__))

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


# -----------------------------------------------------------------------------
# projectors


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
    """SPEC section 3's numbers, from the layouts written out here, against modules built on the meta device."""
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
    """SPEC section 3's block, written with functional ops: 1x1 conv, LN over channels, SiLU; depthwise 3x3, LN,
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


# -----------------------------------------------------------------------------
# the MLLM


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


def test_text_only_and_image_samples_share_a_batch(parts):
    vision, llm = parts
    model, _, _ = M.build_model(vision, llm, "avgpool", 4)
    ids = torch.tensor([[1, 4, M.IMAGE_TOKEN_INDEX, 5, 6], [1, 7, 8, 9, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    labels = torch.tensor([[-100, -100, -100, 5, 6], [-100, -100, 8, 9, -100]])
    loss, logits = model(ids, mask, labels, torch.randn(2, 3, 32, 32))
    assert logits.shape[:2] == (2, 5 - 1 + 4)
    loss.backward()  # every projector parameter is in the graph, even for the text-only sample
    assert all(p.grad is not None for p in model.projector.parameters())


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
    """CLIP: hidden_states[-2] minus its CLS row; SigLIP (no CLS): hidden_states[-2] as it is (SPEC section 2)."""
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
            model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model(ids, torch.ones_like(ids), labels, torch.ones(1, 3, 32, 32))[0].backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n])


def test_placeholder_ids_agree():
    assert data.IMAGE_TOKEN_INDEX == M.IMAGE_TOKEN_INDEX and data.IGNORE_INDEX == M.IGNORE_INDEX

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


# -----------------------------------------------------------------------------
# the shapes world


SMALL = dict(n_train=20, n_eval=5)


def files_of(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_world_is_deterministic_and_well_formed(tmp_path):
    a = data.build_shapes_world(tmp_path / "a", seed=1, **SMALL)
    b = data.build_shapes_world(tmp_path / "b", seed=1, **SMALL)
    names = files_of(a["root"])
    assert names == files_of(b["root"]) and len([n for n in names if n.endswith(".png")]) == 25
    _, mismatch, errors = filecmp.cmpfiles(a["root"], b["root"], names, shallow=False)
    assert mismatch == [] and errors == []

    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(a["tokenizer"])
    for text in ["[0.12, 0.34, 0.56, 0.78]", data.SYSTEM + " USER: What colour is the circle? ASSISTANT: red"]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.convert_ids_to_tokens([tok.pad_token_id, tok.bos_token_id, tok.eos_token_id]) == ["<pad>", "<s>",
                                                                                                  "</s>"]
    for key, template in [("pretrain", "plain"), ("finetune", "vicuna_v1"), ("text", "vicuna_v1")]:
        records = json.load(open(a[key]))
        assert len(records) == 20
        for r in records:
            data.check_record(r, key)
            ids, labels = data.tokenize_conversation(tok, r["conversations"], template)
            assert tok.unk_token_id not in ids and any(label != X for label in labels)
    ids = []
    for task in data.TASKS:
        for r in map(json.loads, open(os.path.join(a["eval_dir"], f"{task}.jsonl"))):
            assert r["category"] == task and "<image>" not in r["text"]
            assert os.path.exists(os.path.join(a["image_folder"], r["image"]))
            if task == "grounding":
                assert r["answer"] == "[" + ", ".join(f"{v:.2f}" for v in r["bbox"]) + "]"
            ids.append(r["question_id"])
    assert len(ids) == len(set(ids))


def test_world_balance_and_answers(tmp_path):
    w = data.build_shapes_world(tmp_path, seed=0, n_train=0, n_eval=60)
    answers = {t: [json.loads(line)["answer"] for line in open(os.path.join(w["eval_dir"], f"{t}.jsonl"))]
               for t in data.TASKS}
    for t in ("existence", "relpos"):
        assert abs(answers[t].count("Yes") - answers[t].count("No")) <= 1
        assert set(answers[t]) == {"Yes", "No"}
    assert set(answers["count"]) <= {"1", "2", "3"} and set(answers["mc"]) <= set("ABCD")
    assert set(answers["colour"]) <= set(data.COLOURS) and set(answers["shape"]) <= set(data.SHAPES)


def test_world_cache(tmp_path, monkeypatch):
    data.build_shapes_world(tmp_path, **SMALL)
    with monkeypatch.context() as m:
        m.setattr(data, "draw_scene", lambda *a: pytest.fail("cached world was regenerated"))
        data.build_shapes_world(tmp_path, **SMALL)
    w = data.build_shapes_world(tmp_path, n_train=21, n_eval=4)
    assert len(json.load(open(w["pretrain"]))) == 21
    assert sorted(os.listdir(w["image_folder"]))[-1] == "train_00020.png"
    assert "eval_00004.png" not in os.listdir(w["image_folder"])  # the old world's files are gone
    assert json.load(open(os.path.join(tmp_path, "settings.json")))["n_train"] == 21


def test_world_feeds_the_dataset(tmp_path, processor):
    from transformers import AutoTokenizer
    w = data.build_shapes_world(tmp_path, **SMALL)
    tok = AutoTokenizer.from_pretrained(w["tokenizer"])
    ds = data.LlavaDataset(w["finetune"], w["image_folder"], tok, processor, "vicuna_v1", "pad", 9, 256)
    batch = data.collate([ds[i] for i in range(4)], pad_id=tok.pad_token_id, image_size=32)
    assert batch["has_image"].all() and (batch["input_ids"] == IMG).sum(1).tolist() == [1] * 4

# =============================================================================
# eval.py: scorers (SPEC section 6) and the generation driver

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


# ---- command line

def test_parse_args():
    cfg, _ = ev.parse_args(ev.EvalConfig, ["--ckpt", "out/avgpool", "--batch_size=8", "--max-new-tokens", "5"])
    assert (cfg.ckpt, cfg.batch_size, cfg.max_new_tokens, cfg.limit) == ("out/avgpool", 8, 5, 0)

    from dataclasses import dataclass

    @dataclass
    class C:
        flag: bool = False
        lr: float = 1.0
    assert ev.parse_args(C, ["--flag=true", "--lr", "3e-4"])[0] == C(True, 3e-4)
    assert ev.parse_args(C, ["--flag", "0"])[0] == C(False, 1.0)
    assert ev.parse_args(C, ["--flag", "--lr", "2"])[0] == C(True, 2.0)  # a bare bool flag
    for bad in (["--flag=maybe"], ["--nope=1"], ["--lr"], ["--lr=abc"], ["lr=1"]):
        with pytest.raises(SystemExit):
            ev.parse_args(C, bad)


# =============================================================================
# train.py: a tiny world, tiny models, real loops


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small shapes world, a 4x4-patch CLIP tower and a random Llama over the world's tokenizer."""
    root = tmp_path_factory.mktemp("world")
    w = data.build_shapes_world(str(root / "shapes"), seed=0, n_train=64, n_eval=4)
    tokenizer = AutoTokenizer.from_pretrained(w["tokenizer"])
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


def test_training_loss_falls(world, tmp_path):
    train.main(train_args(world, tmp_path, "--stage=finetune", "--epochs=10", "--lora_dropout=0"))
    losses = [r["loss"] for r in read_log(tmp_path / "log.jsonl")]
    assert len(losses) == 10 * 64 // 16
    # a random LLM starts near ln(vocab size) = 6.4; LoRA alone (embeddings and lm_head frozen) moves it slowly
    assert losses[0] > 6 and sum(losses[-4:]) / 4 < losses[0] - 0.5


def test_resume_equals_uninterrupted(world, tmp_path, monkeypatch):
    """Both stages; a crash in stage 2 as step 6 is being saved (the last checkpoint is step 4), then --resume:
    the same final weights, and the log holds each step once."""
    extra = ("--epochs=2", "--save_every=2", "--lora_dropout=0.1")  # dropout: the RNG state must come back too
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


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(world, tmp_path, monkeypatch):
    forward, calls = M.MLLM.forward, []

    def nan_on_step_3(self, *args):  # micro-batch 5 = the first of step 3 (2 micro-batches per step)
        loss, logits = forward(self, *args)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 5 else loss), logits
    monkeypatch.setattr(M.MLLM, "forward", nan_on_step_3)
    with pytest.raises(RuntimeError, match="loss is nan at step 3"):
        train.main(train_args(world, tmp_path, "--stage=pretrain", "--epochs=2", "--save_every=2"))
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
