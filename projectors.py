"""
The visual projectors compared in the DeCo paper, each mapping ViT patch features to LLM input embeddings:
[B, N, d_v] -> [B, M, d_llm]. SPEC section 3 gives the exact layouts and parameter counts.

  linear   LLaVA-1.5's 2-layer MLP ("mlp2x_gelu"), M = N
  avgpool  DeCo: 2D adaptive average pooling of the patch grid, then the same MLP (paper Sec. 4)
  maxpool  the paper's ablation (Fig. 7): adaptive max pooling instead of average
"""
import math

import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# building blocks


def grid_side(n, what):
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{what} must be a perfect square (tokens on a side x side grid), got {n}")
    return side


class MLPProjector(nn.Sequential):
    """[Linear, GELU, Linear] exactly as LLaVA-1.5's mm_projector, so `mm_projector.0/.2` weights load into any of
    linear / avgpool / maxpool; the pooling variants pool the patch grid BEFORE the MLP (SPEC section 3)."""

    def __init__(self, vision_dim, llm_dim, num_patches, num_tokens, pool=None):
        super().__init__(nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))
        self.pool = pool  # None, "avg" or "max"
        self.in_side = grid_side(num_patches, "the number of patches N")
        self.out_side = grid_side(num_tokens, "the number of visual tokens M")

    def forward(self, x):
        expected = (self.in_side ** 2, self[0].in_features)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"projector expects features [B, N, d_v] = [B, {expected[0]}, {expected[1]}], "
                             f"got {list(x.shape)}")
        if self.pool is not None:
            B, N, C = x.shape
            x = x.transpose(1, 2).reshape(B, C, self.in_side, self.in_side)  # [B, N, d_v] -> [B, d_v, n, n]
            # windows [floor(i*n/m), ceil((i+1)*n/m)): exact 2x2 windows for 24 -> 12
            pool2d = F.adaptive_avg_pool2d if self.pool == "avg" else F.adaptive_max_pool2d
            x = pool2d(x, self.out_side)  # -> [B, d_v, m, m]
            x = x.flatten(2).transpose(1, 2)  # -> [B, M, d_v], row-major like the patches
        return super().forward(x)  # [B, M, d_v] -> [B, M, d_llm]


# -----------------------------------------------------------------------------
# the one entry point

PROJECTORS = {
    "linear": lambda d_v, d_llm, N, M: MLPProjector(d_v, d_llm, N, M),
    "avgpool": lambda d_v, d_llm, N, M: MLPProjector(d_v, d_llm, N, M, pool="avg"),
    "maxpool": lambda d_v, d_llm, N, M: MLPProjector(d_v, d_llm, N, M, pool="max"),
}


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
    if options:
        raise ValueError(f"{name} takes no options, got {sorted(options)}")
    return PROJECTORS[name](vision_dim, llm_dim, num_patches, M)
