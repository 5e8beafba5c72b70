"""A pure-torch Vision Transformer: patch embedding, learned position embedding, pre-norm blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shardstore.errors import ConfigError

POOLS = ("cls", "mean")


class Attention(nn.Module):
    """Multi-head self-attention over tokens [B, N, dim] through `F.scaled_dot_product_attention`."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Attend every token to every token; returns [B, N, dim]."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        """Both residual sub-layers; shape is kept."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Patches -> tokens (+ a CLS token) -> blocks -> final norm -> CLS or mean token -> linear head."""

    def __init__(
        self,
        num_classes: int,
        *,
        image_size: int,
        patch_size: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        in_chans: int,
        pool: str,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.in_chans = in_chans
        self.pool = pool
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.num_features: int = dim
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """Truncated-normal (std 0.02) embeddings and linear weights, zero biases, as in timm and DeiT."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """The embedding after the final norm: the CLS token, or the mean of the patch tokens; [B, num_features]."""
        if x.shape[1:] != (self.in_chans, self.image_size, self.image_size):
            raise ConfigError(
                f"vit expects [B, {self.in_chans}, {self.image_size}, {self.image_size}] inputs, got {list(x.shape)}; "
                "set the model's image_size or wrap it in an InputAdapter that resizes"
            )
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos_embed
        tokens = self.norm(self.blocks(tokens))
        return tokens[:, 0] if self.pool == "cls" else tokens[:, 1:].mean(dim=1)

    def forward_head(self, features: Tensor) -> Tensor:
        """Logits from the pooled embedding."""
        return self.head(features)

    def forward(self, x: Tensor) -> Tensor:
        """Logits [B, num_classes] from a normalised batch [B, C, image_size, image_size]."""
        return self.forward_head(self.forward_features(x))


def vit(
    num_classes: int,
    *,
    image_size: int,
    patch_size: int,
    dim: int,
    depth: int,
    heads: int,
    mlp_ratio: float = 4.0,
    in_chans: int = 3,
    pool: str = "cls",
) -> VisionTransformer:
    """Build a Vision Transformer for square `image_size` inputs cut into `patch_size` patches."""
    if image_size < 1 or patch_size < 1 or image_size % patch_size:
        raise ConfigError(
            f"vit: image_size {image_size} is not a multiple of patch_size {patch_size}; "
            "choose a patch_size that divides image_size"
        )
    if heads < 1 or dim % heads:
        raise ConfigError(f"vit: dim {dim} is not divisible by heads {heads}; choose heads that divide dim")
    if pool not in POOLS:
        raise ConfigError(f"vit: pool {pool!r} is not known; use one of {', '.join(POOLS)}")
    if num_classes < 1 or depth < 1 or in_chans < 1 or mlp_ratio <= 0:
        raise ConfigError(
            f"vit: num_classes={num_classes}, depth={depth}, in_chans={in_chans}, mlp_ratio={mlp_ratio}; "
            "all must be positive"
        )
    return VisionTransformer(
        num_classes, image_size=image_size, patch_size=patch_size, dim=dim, depth=depth, heads=heads,
        mlp_ratio=mlp_ratio, in_chans=in_chans, pool=pool,
    )
