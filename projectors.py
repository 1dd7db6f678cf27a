"""
The visual projectors compared in the DeCo paper, each mapping ViT patch features to LLM input embeddings:
[B, N, d_v] -> [B, M, d_llm]. test_deco.py checks each parameter count at the paper's configuration.

  linear       LLaVA-1.5's 2-layer MLP ("mlp2x_gelu"), M = N
  avgpool      DeCo: 2D adaptive average pooling of the patch grid, then the same MLP (paper Sec. 4)
  maxpool      the paper's ablation (Fig. 7): adaptive max pooling instead of average
  qformer      BLIP-2's Q-Former: M learned queries cross-attend to the patches; loads BLIP-2 weights
  cabstractor  Honeybee's C-Abstractor: RegNet blocks, adaptive average pooling, RegNet blocks, MLP readout
  dabstractor  Honeybee's D-Abstractor: deformable attention around M learned reference points

For R-GAE, `with record_attention(projector) as attn:` collects the post-softmax probabilities of every attention
the projector computes, kept in the autograd graph; linear, avgpool, maxpool and cabstractor have none.
"""
import inspect
import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# building blocks


def grid_side(n, what):
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{what} must be a perfect square (tokens on a side x side grid), got {n}")
    return side


def check_features(x, num_patches, vision_dim):
    if tuple(x.shape[1:]) != (num_patches, vision_dim):
        raise ValueError(f"projector expects features [B, N, d_v] = [B, {num_patches}, {vision_dim}], "
                         f"got {list(x.shape)}")


def to_grid(x):
    B, N, C = x.shape
    side = math.isqrt(N)
    return x.transpose(1, 2).reshape(B, C, side, side)  # [B, N, C] -> [B, C, n, n]


def from_grid(x):
    return x.flatten(2).transpose(1, 2)  # [B, C, m, m] -> [B, M, C], row-major like the patches


def attention(q, k, v, num_heads, record=None, name=""):
    """Softmax attention written out so that its probabilities can be recorded. q [B, Lq, D], k, v [B, Lk, D]."""
    B, Lq, D = q.shape
    q, k, v = (t.unflatten(-1, (num_heads, -1)).transpose(1, 2) for t in (q, k, v))  # -> [B, heads, L, D/heads]
    A = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)  # [B, heads, Lq, Lk]
    if record is not None:
        record.append((name, A))
    return (A @ v).transpose(1, 2).reshape(B, Lq, D)


@contextmanager
def record_attention(projector):
    """Inside the block, each forward of `projector` appends (name, A) to the yielded list for every attention it
    computes: A [B, heads, M, K] post-softmax, in the autograd graph (R-GAE, the paper's Sec. 3.1). Off by default."""
    projector.attentions = []
    try:
        yield projector.attentions
    finally:
        projector.attentions = None


def init_normal_(module, std=0.02):
    # Honeybee's and BERT's init: Linear and conv weights N(0, std), zero biases (LayerNorms keep 1 and 0)
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

# -----------------------------------------------------------------------------
# linear, avgpool, maxpool


class MLPProjector(nn.Sequential):
    """[Linear, GELU, Linear] exactly as LLaVA-1.5's mm_projector, so `mm_projector.0/.2` weights load into any of
    linear / avgpool / maxpool; the pooling variants pool the patch grid BEFORE the MLP."""
    attentions = None

    def __init__(self, vision_dim, llm_dim, num_patches, num_tokens, pool=None):
        super().__init__(nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))
        self.pool = pool  # None, "avg" or "max"
        self.num_patches, self.out_side = num_patches, grid_side(num_tokens, "the number of visual tokens M")

    def forward(self, x):
        check_features(x, self.num_patches, self[0].in_features)
        if self.pool is not None:
            # windows [floor(i*n/m), ceil((i+1)*n/m)): exact 2x2 windows for 24 -> 12
            pool2d = F.adaptive_avg_pool2d if self.pool == "avg" else F.adaptive_max_pool2d
            x = from_grid(pool2d(to_grid(x), self.out_side))  # [B, N, d_v] -> [B, M, d_v]
        return super().forward(x)  # [B, M, d_v] -> [B, M, d_llm]

# -----------------------------------------------------------------------------
# qformer: BLIP-2's Q-Former. Attribute names are those of transformers' Blip2QFormerModel, so its state dict maps
# one to one.


class QFormerAttention(nn.Module):
    """BERT attention, post-LN: LayerNorm(h + dense(attention(h -> context)))."""

    def __init__(self, hidden, num_heads, context_dim, eps):
        super().__init__()
        self.num_heads = num_heads
        self.attention = nn.ModuleDict(dict(query=nn.Linear(hidden, hidden), key=nn.Linear(context_dim, hidden),
                                            value=nn.Linear(context_dim, hidden)))
        self.output = nn.ModuleDict(dict(dense=nn.Linear(hidden, hidden), LayerNorm=nn.LayerNorm(hidden, eps=eps)))

    def forward(self, h, context, record, name):
        a, o = self.attention, self.output
        out = attention(a["query"](h), a["key"](context), a["value"](context), self.num_heads, record, name)
        return o["LayerNorm"](h + o["dense"](out))


class QFormerLayer(nn.Module):
    def __init__(self, hidden, num_heads, intermediate, encoder_dim, cross, eps):
        super().__init__()
        self.attention = QFormerAttention(hidden, num_heads, hidden, eps)
        self.crossattention = QFormerAttention(hidden, num_heads, encoder_dim, eps) if cross else None
        self.intermediate_query = nn.ModuleDict(dict(dense=nn.Linear(hidden, intermediate)))
        self.output_query = nn.ModuleDict(dict(dense=nn.Linear(intermediate, hidden),
                                               LayerNorm=nn.LayerNorm(hidden, eps=eps)))

    def forward(self, h, x, record, i):
        h = self.attention(h, h, record, f"layer{i}.self")  # [B, M, hidden]
        if self.crossattention is not None:
            h = self.crossattention(h, x, record, f"layer{i}.cross")  # queries read the N patches
        out = self.output_query
        return out["LayerNorm"](h + out["dense"](F.gelu(self.intermediate_query["dense"](h))))


class QFormer(nn.Module):
    """M learned queries, LayerNorm'd; each layer self-attends, cross-attends to the (ln_vision'd) patch features
    when i % cross_attention_frequency == 0, and runs its FFN; a Linear reads out to the LLM width."""
    attentions = None

    def __init__(self, vision_dim, llm_dim, num_patches, num_tokens, hidden_size=768, num_heads=12,
                 intermediate_size=3072, num_layers=2, cross_attention_frequency=2, encoder_dim=0):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"qformer: hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
        self.num_patches, self.vision_dim = num_patches, vision_dim
        encoder_dim = encoder_dim or vision_dim
        # encoder_dim 1408: BLIP-2's released QFormers cross-attend to EVA features; this adapter feeds them ours
        self.adapter = nn.Linear(vision_dim, encoder_dim) if encoder_dim != vision_dim else None
        self.ln_vision = nn.LayerNorm(encoder_dim)
        self.query_tokens = nn.Parameter(torch.zeros(1, num_tokens, hidden_size))
        self.layernorm = nn.LayerNorm(hidden_size, eps=1e-12)
        self.encoder = nn.ModuleDict(dict(layer=nn.ModuleList(
            QFormerLayer(hidden_size, num_heads, intermediate_size, encoder_dim, i % cross_attention_frequency == 0,
                         1e-12) for i in range(num_layers))))
        self.language_projection = nn.Linear(hidden_size, llm_dim)
        for name, p in self.named_parameters():
            bert_init_(name, p)

    def forward(self, x):
        check_features(x, self.num_patches, self.vision_dim)
        x = self.ln_vision(x if self.adapter is None else self.adapter(x))  # [B, N, d_v] -> [B, N, d_enc]
        h = self.layernorm(self.query_tokens).expand(x.shape[0], -1, -1)  # [B, M, hidden]
        for i, layer in enumerate(self.encoder["layer"]):
            h = layer(h, x, self.attentions, i)
        return self.language_projection(h)  # [B, M, hidden] -> [B, M, d_llm]

    def load_blip2(self, state_dict, verbose=True):
        """Load a BLIP-2 checkpoint's tensors (transformers Blip2Model / Blip2ForConditionalGeneration keys, or
        LAVIS keys) wherever the shape fits; re-initialise the rest. Prints and returns (loaded, reinitialised)."""
        ours = dict(self.named_parameters())
        loaded = set()
        for key, value in state_dict.items():
            name = blip2_name(key)
            if name in ours and ours[name].shape == value.shape:
                with torch.no_grad():
                    ours[name].copy_(value)
                loaded.add(name)
        reinitialised = [n for n in ours if n not in loaded]
        for name in reinitialised:
            bert_init_(name, ours[name])
        loaded = [n for n in ours if n in loaded]
        if verbose:
            print(f"load_blip2: loaded {len(loaded)} tensors: {', '.join(loaded) or '-'}")
            print(f"load_blip2: re-initialised {len(reinitialised)} tensors: {', '.join(reinitialised) or '-'}")
        return loaded, reinitialised


def bert_init_(name, p):
    # BLIP-2's init (BERT's): weights and query tokens N(0, 0.02), biases 0, LayerNorm scales 1
    with torch.no_grad():
        if name.endswith("bias"):
            p.zero_()
        elif p.dim() == 1:
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02)


# (checkpoint prefix, ours): transformers first, then LAVIS; ln_vision is transformers' vision post_layernorm
BLIP2_PREFIXES = [("qformer.", ""), ("vision_model.post_layernorm.", "ln_vision."),
                  ("Qformer.bert.embeddings.LayerNorm.", "layernorm."), ("Qformer.bert.", ""),
                  ("opt_proj.", "language_projection."), ("t5_proj.", "language_projection."),
                  ("llm_proj.", "language_projection.")]


def blip2_name(key):
    for old, new in BLIP2_PREFIXES:
        if key.startswith(old):
            key = new + key[len(old):]
            break
    return key.replace("attention.self.", "attention.attention.")  # LAVIS -> transformers

# -----------------------------------------------------------------------------
# cabstractor: Honeybee's C-Abstractor


class LayerNorm2d(nn.LayerNorm):
    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # over the channels of [B, C, H, W]


class RegNetBlock(nn.Module):
    """timm's RegNet bottleneck as Honeybee configures it: bottleneck ratio 1, depthwise 3x3, squeeze-excite 0.25,
    LayerNorm over channels, SiLU."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(c, c, 1, bias=False), LayerNorm2d(c)
        self.conv2, self.norm2 = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), LayerNorm2d(c)
        self.se_reduce, self.se_expand = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)
        self.conv3, self.norm3 = nn.Conv2d(c, c, 1, bias=False), LayerNorm2d(c)

    def forward(self, x):
        h = F.silu(self.norm1(self.conv1(x)))
        h = F.silu(self.norm2(self.conv2(h)))
        h = h * torch.sigmoid(self.se_expand(F.silu(self.se_reduce(h.mean((2, 3), keepdim=True)))))
        return F.silu(x + self.norm3(self.conv3(h)))


class CAbstractor(nn.Module):
    attentions = None

    def __init__(self, vision_dim, llm_dim, num_patches, num_tokens, depth=3):
        super().__init__()
        self.num_patches, self.vision_dim = num_patches, vision_dim
        self.pos_emb = nn.Parameter(torch.zeros(1, num_patches, vision_dim))
        self.net = nn.Sequential(*[RegNetBlock(vision_dim) for _ in range(depth)],
                                 nn.AdaptiveAvgPool2d(grid_side(num_tokens, "the number of visual tokens M")),
                                 *[RegNetBlock(vision_dim) for _ in range(depth)])
        self.readout = nn.Sequential(nn.Linear(vision_dim, llm_dim), nn.SiLU(), nn.Linear(llm_dim, llm_dim))
        init_normal_(self)
        nn.init.trunc_normal_(self.pos_emb, std=0.02)

    def forward(self, x):
        check_features(x, self.num_patches, self.vision_dim)
        x = self.net(to_grid(x + self.pos_emb))  # [B, N, d_v] -> [B, d_v, n, n] -> [B, d_v, m, m]
        return self.readout(from_grid(x))  # -> [B, M, d_v] -> [B, M, d_llm]

# -----------------------------------------------------------------------------
# dabstractor: Honeybee's D-Abstractor. Layer attribute names are those of transformers' DeformableDetrDecoderLayer.


def sampling_map(locations, weights, side):
    """Deformable attention as a dense map: each point's weight times its bilinear kernel weights, scattered onto
    the side x side patches. Equals grid_sample(bilinear, zero padding, align_corners=False).
    locations [B, M, heads, P, 2] in [0, 1] (x, y); weights [B, M, heads, P] -> A [B, heads, M, N]."""
    px, py = locations[..., 0] * side - 0.5, locations[..., 1] * side - 0.5  # patch-centre coordinates
    x0, y0 = px.floor().detach(), py.floor().detach()
    A = weights.new_zeros(*weights.shape[:3], side * side)
    for x in (x0, x0 + 1):
        for y in (y0, y0 + 1):
            inside = (x >= 0) & (x < side) & (y >= 0) & (y < side)
            kernel = (1 - (px - x).abs()) * (1 - (py - y).abs()) * inside
            index = (y.clamp(0, side - 1) * side + x.clamp(0, side - 1)).long()
            A = A.scatter_add(-1, index, weights * kernel)  # [B, M, heads, P] onto [B, M, heads, N]
    return A.transpose(1, 2)  # -> [B, heads, M, N]


class DeformableAttention(nn.Module):
    """Deformable DETR's attention on one feature level: each head samples P points around the query's reference
    point, at offsets and with weights predicted from the query."""

    def __init__(self, dim, num_heads, num_points):
        super().__init__()
        self.num_heads, self.num_points = num_heads, num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)

    def reset_parameters(self):
        # Deformable DETR: offsets start on a ring of directions per head, point k at distance k; uniform weights
        thetas = torch.arange(self.num_heads) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]  # onto the unit square
        grid = grid[:, None, :] * torch.arange(1, self.num_points + 1)[None, :, None]  # [heads, P, 2]
        with torch.no_grad():
            self.sampling_offsets.weight.zero_()
            self.sampling_offsets.bias.copy_(grid.flatten())
            self.attention_weights.weight.zero_()
            self.attention_weights.bias.zero_()
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, q, x, reference_points, side, record, name):
        B, M, _ = q.shape
        H, P = self.num_heads, self.num_points
        offsets = self.sampling_offsets(q).view(B, M, H, P, 2)
        weights = self.attention_weights(q).view(B, M, H, P).softmax(-1)
        locations = reference_points[:, :, None, None, :] + offsets / side  # offsets in patches, divided by (W, H)
        A = sampling_map(locations, weights, side)  # [B, heads, M, N]
        if record is not None:
            record.append((name, A))
        v = self.value_proj(x).unflatten(-1, (H, -1)).transpose(1, 2)  # [B, N, d] -> [B, heads, N, d/heads]
        return self.output_proj((A @ v).transpose(1, 2).flatten(2))  # -> [B, M, d]


class DeformableLayer(nn.Module):
    """A Deformable-DETR decoder layer, post-LN: self-attention (q = k = h + pos, v = h), deformable cross-attention
    from h + pos, ReLU FFN."""

    def __init__(self, dim, num_heads, num_points):
        super().__init__()
        self.num_heads = num_heads
        self.self_attn = nn.ModuleDict({k: nn.Linear(dim, dim) for k in ("q_proj", "k_proj", "v_proj", "o_proj")})
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.encoder_attn = DeformableAttention(dim, num_heads, num_points)
        self.encoder_attn_layer_norm = nn.LayerNorm(dim)
        self.mlp = nn.ModuleDict(dict(fc1=nn.Linear(dim, dim), fc2=nn.Linear(dim, dim)))
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, h, pos, x, reference_points, side, record, i):
        a = self.self_attn
        qk = h + pos
        out = attention(a["q_proj"](qk), a["k_proj"](qk), a["v_proj"](h), self.num_heads, record, f"layer{i}.self")
        h = self.self_attn_layer_norm(h + a["o_proj"](out))
        out = self.encoder_attn(h + pos, x, reference_points, side, record, f"layer{i}.deformable")
        h = self.encoder_attn_layer_norm(h + out)
        return self.final_layer_norm(h + self.mlp["fc2"](F.relu(self.mlp["fc1"](h))))


class DAbstractor(nn.Module):
    attentions = None

    def __init__(self, vision_dim, llm_dim, num_patches, num_tokens, num_layers=2, num_heads=8, num_points=4):
        super().__init__()
        if vision_dim % num_heads:
            raise ValueError(f"dabstractor: d_v {vision_dim} is not a multiple of num_heads {num_heads}")
        self.num_patches, self.vision_dim = num_patches, vision_dim
        n, m = grid_side(num_patches, "the number of patches N"), grid_side(num_tokens, "the number of visual tokens M")
        self.pos_emb = nn.Parameter(torch.zeros(1, num_patches, vision_dim))
        self.query_embed = nn.Embedding(num_tokens, vision_dim)
        # evenly spaced from the first patch centre to the last, as Honeybee does: linspace(0.5, 23.5, 12) / 24
        r = torch.linspace(0.5, n - 0.5, m) / n
        ys, xs = torch.meshgrid(r, r, indexing="ij")
        self.reference_points = nn.Parameter(torch.stack([xs, ys], -1).reshape(1, num_tokens, 2))  # (x, y)
        self.layers = nn.ModuleList(DeformableLayer(vision_dim, num_heads, num_points) for _ in range(num_layers))
        self.readout = nn.Linear(vision_dim, llm_dim)
        init_normal_(self)
        nn.init.normal_(self.query_embed.weight, std=0.02)
        nn.init.trunc_normal_(self.pos_emb, std=0.02)
        for layer in self.layers:
            layer.encoder_attn.reset_parameters()

    def forward(self, x):
        check_features(x, self.num_patches, self.vision_dim)
        B, N, _ = x.shape
        x = x + self.pos_emb
        pos = from_grid(F.adaptive_avg_pool2d(to_grid(x), math.isqrt(self.query_embed.num_embeddings)))  # [B, M, d_v]
        h = self.query_embed.weight.expand(B, -1, -1)  # [B, M, d_v]
        ref = self.reference_points.expand(B, -1, -1)
        for i, layer in enumerate(self.layers):
            h = layer(h, pos, x, ref, math.isqrt(N), self.attentions, i)
        return self.readout(h)  # [B, M, d_v] -> [B, M, d_llm]

# -----------------------------------------------------------------------------
# the one entry point

PROJECTORS = {
    "linear": lambda vision_dim, llm_dim, num_patches, num_tokens: MLPProjector(
        vision_dim, llm_dim, num_patches, num_tokens),
    "avgpool": lambda vision_dim, llm_dim, num_patches, num_tokens: MLPProjector(
        vision_dim, llm_dim, num_patches, num_tokens, pool="avg"),
    "maxpool": lambda vision_dim, llm_dim, num_patches, num_tokens: MLPProjector(
        vision_dim, llm_dim, num_patches, num_tokens, pool="max"),
    "qformer": QFormer,
    "cabstractor": CAbstractor,
    "dabstractor": DAbstractor,
}


def projector_options(name):
    """The keyword options a projector takes beyond (vision_dim, llm_dim, num_patches, num_tokens)."""
    return list(inspect.signature(PROJECTORS[name]).parameters)[4:]


def build_projector(name, vision_dim, llm_dim, num_patches, num_tokens=None, **options):
    """num_tokens=None keeps all N tokens (the only choice for `linear`)."""
    if name not in PROJECTORS:
        raise ValueError(f"unknown projector {name!r}; choose one of {', '.join(PROJECTORS)}")
    M = num_patches if num_tokens is None else num_tokens
    grid_side(num_patches, "the number of patches N")
    grid_side(M, "the number of visual tokens M")
    if M > num_patches:
        raise ValueError(f"{name}: M={M} visual tokens is more than the N={num_patches} patches it compresses")
    if name == "linear" and M != num_patches:
        raise ValueError(f"linear keeps every patch (M = N = {num_patches}); got num_tokens={M}")
    unknown = sorted(set(options) - set(projector_options(name)))
    if unknown:
        raise ValueError(f"{name} takes the options {projector_options(name) or 'none'}, got {unknown}")
    return PROJECTORS[name](vision_dim, llm_dim, num_patches, M, **options)
