"""Canonizers of vision transformers (timm ``VisionTransformer``, torchvision ``vit_b_16`` & co).

Architecture-specific like :mod:`medaudit.models.xai.canonizers` (which registers
:func:`canonize_vit` as the ``"vit"`` family), kept apart for its size. The canonized copy
computes the same function, but every operation an LRP rule must see is a module:

* attention is written out, ``softmax(scale · q kᵀ) v`` in an
  :class:`~medaudit.models.xai.layers.AttentionCore` (AttnLRP or CP-LRP, see
  :mod:`medaudit.models.xai.attention_rules`), never the fused kernel
  (``F.scaled_dot_product_attention``, timm's ``fused_attn``), which keeps neither the attention
  matrix nor its logits; the q/k/v and output projections stay ``nn.Linear`` (ε);
* both residual additions and "tokens + position embedding" are
  :class:`~medaudit.models.xai.layers.ResidualSum` (Norm; the position embedding's share is
  dropped, as a bias's is);
* average pooling over tokens is a :class:`~medaudit.models.xai.layers.TokenMean` (Norm); class-token
  pooling is an index, whose gradient hands the class token all the relevance;
* timm's LayerScale is a :class:`~medaudit.models.xai.layers.Scale` (uniform rule: all to x);
  ``DropPath`` is the identity at inference. LayerNorm and GELU stay themselves (AttnLRP's
  identity rules, the composite's business).
"""

from __future__ import annotations

import timm.layers as timm_layers
import timm.models.vision_transformer as timm_vit
import torch
import torchvision.models.vision_transformer as tv_vit
from torch import nn

from medaudit.models.errors import CanonizerError
from medaudit.models.xai.layers import AttentionCore, ResidualSum, Scale, TokenMean


def _heads(
    x: torch.Tensor, qkv: nn.Module, heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B, N, C)`` -> q, k, v of shape ``(B, heads, N, head_dim)`` from one packed projection."""
    b, n, _ = x.shape
    q, k, v = qkv(x).reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


# --------------------------------------------------------------------------- timm


class _TimmAttention(timm_vit.Attention):
    """timm ``Attention`` with the attention product written out in ``core``."""

    core: AttentionCore

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise CanonizerError("the canonized ViT attention does not support attention masks")
        b, n, _ = x.shape
        q, k, v = _heads(x, self.qkv, self.num_heads, self.head_dim)
        out = self.core(self.q_norm(q), self.k_norm(k), v)
        out = self.norm(out.transpose(1, 2).reshape(b, n, self.attn_dim))
        return self.proj_drop(self.proj(out))


class _TimmViTBlock(timm_vit.Block):
    """timm ViT block with both residual additions as modules."""

    residual_sum1: ResidualSum
    residual_sum2: ResidualSum

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise CanonizerError("the canonized ViT block does not support attention masks")
        x = self.residual_sum1(x, self.drop_path1(self.ls1(self.attn(self.norm1(x)))))
        return self.residual_sum2(x, self.drop_path2(self.ls2(self.mlp(self.norm2(x)))))


class _TimmVisionTransformer(timm_vit.VisionTransformer):
    """timm ViT with "tokens + position embedding" and average pooling as modules."""

    pos_sum: ResidualSum
    token_pool: TokenMean | None

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        to_cat = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        x = x.view(x.shape[0], -1, x.shape[-1])
        if to_cat:
            x = torch.cat([*to_cat, x], dim=1)
        x = self.pos_sum(x, self.pos_embed.expand_as(x))  # type: ignore[union-attr]  # checked in canonize
        return self.pos_drop(x)

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        if self.token_pool is not None:
            return self.token_pool(x)
        return x[:, 0]  # class token (canonize refuses every other pooling)


def _canonize_timm(model: timm_vit.VisionTransformer) -> None:
    if model.pos_embed is None or model.no_embed_class or model.dynamic_img_size:
        raise CanonizerError(
            "canonizer 'vit' supports learned position embeddings that include the class token "
            "(no_embed_class=False, dynamic_img_size=False)"
        )
    if model.attn_pool is not None or model.global_pool not in ("token", "avg"):
        raise CanonizerError(
            f"canonizer 'vit' supports class-token ('token') and average ('avg') pooling; "
            f"this model pools by {model.global_pool!r}"
        )
    for block in model.blocks:
        if type(block) is not timm_vit.Block or type(block.attn) is not timm_vit.Attention:
            raise CanonizerError(
                f"canonizer 'vit' supports timm Block with Attention, got {type(block).__name__}"
            )
        if block.attn.gate is not None:
            raise CanonizerError("canonizer 'vit' does not support gated attention (Attention(gated=True))")
        block.__class__ = _TimmViTBlock
        block.attn.__class__ = _TimmAttention
        block.attn.add_module("core", AttentionCore(block.attn.scale))
        for name in ("ls1", "ls2"):
            ls = getattr(block, name)
            if isinstance(ls, timm_vit.LayerScale):
                setattr(block, name, Scale(ls.gamma))
        block.add_module("residual_sum1", ResidualSum())
        block.add_module("residual_sum2", ResidualSum())
    pool = None
    if model.global_pool == "avg":
        pool = TokenMean(0 if model.pool_include_prefix else model.num_prefix_tokens)
    model.__class__ = _TimmVisionTransformer
    model.add_module("pos_sum", ResidualSum())
    model.add_module("token_pool", pool)


# --------------------------------------------------------------------------- torchvision


class _TvSelfAttention(nn.Module):
    """torchvision's ``nn.MultiheadAttention`` used as self-attention, as two ``nn.Linear`` (the
    packed in-projection and the out-projection, sharing its weights' values) around a core."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        if not mha._qkv_same_embed_dim or not mha.batch_first:
            raise CanonizerError(
                "canonizer 'vit' needs batch-first self-attention with one packed in-projection"
            )
        if mha.bias_k is not None or mha.bias_v is not None or mha.add_zero_attn:
            raise CanonizerError("canonizer 'vit' does not support bias_k/bias_v or add_zero_attn")
        dim, like = mha.embed_dim, {"device": mha.in_proj_weight.device, "dtype": mha.in_proj_weight.dtype}
        self.num_heads, self.head_dim = mha.num_heads, mha.head_dim
        self.qkv = nn.Linear(dim, 3 * dim, bias=mha.in_proj_bias is not None, **like)
        self.proj = nn.Linear(dim, dim, bias=mha.out_proj.bias is not None, **like)
        with torch.no_grad():
            self.qkv.weight.copy_(mha.in_proj_weight)
            self.proj.weight.copy_(mha.out_proj.weight)
            if mha.in_proj_bias is not None:
                self.qkv.bias.copy_(mha.in_proj_bias)
            if mha.out_proj.bias is not None:
                self.proj.bias.copy_(mha.out_proj.bias)
        self.core = AttentionCore(self.head_dim**-0.5)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, dim = x.shape
        out = self.core(*_heads(x, self.qkv, self.num_heads, self.head_dim))
        return self.proj(out.transpose(1, 2).reshape(b, n, dim))


class _TvEncoderBlock(tv_vit.EncoderBlock):
    """torchvision encoder block with its residual additions as modules."""

    residual_sum1: ResidualSum
    residual_sum2: ResidualSum

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = self.residual_sum1(self.dropout(self.self_attention(self.ln_1(input))), input)
        return self.residual_sum2(x, self.mlp(self.ln_2(x)))


class _TvEncoder(tv_vit.Encoder):
    """torchvision encoder with "tokens + position embedding" as a module."""

    pos_sum: ResidualSum

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        input = self.pos_sum(input, self.pos_embedding.expand_as(input))
        return self.ln(self.layers(self.dropout(input)))


def _canonize_torchvision(model: tv_vit.VisionTransformer) -> None:
    encoder = model.encoder
    if type(encoder) is not tv_vit.Encoder:
        raise CanonizerError(f"canonizer 'vit' expects torchvision's Encoder, got {type(encoder).__name__}")
    for block in encoder.layers:
        if type(block) is not tv_vit.EncoderBlock:
            raise CanonizerError(
                f"canonizer 'vit' expects torchvision EncoderBlock layers, got {type(block).__name__}"
            )
        block.__class__ = _TvEncoderBlock
        block.self_attention = _TvSelfAttention(block.self_attention)
        block.add_module("residual_sum1", ResidualSum())
        block.add_module("residual_sum2", ResidualSum())
    encoder.__class__ = _TvEncoder
    encoder.add_module("pos_sum", ResidualSum())


# --------------------------------------------------------------------------- entry point

#: The model classes :func:`canonize_vit` rewrites.
VIT_CLASSES: tuple[type[nn.Module], ...] = (timm_vit.VisionTransformer, tv_vit.VisionTransformer)


def canonize_vit(model: nn.Module) -> None:
    """timm and torchvision ViTs for AttnLRP / CP-LRP (see the module docstring), in place.

    Raises:
        CanonizerError: another class, or a variant without rules here (attention masks, gated
            attention, attention/max pooling, position embeddings without the class token, ...).
    """
    for path, module in list(model.named_modules()):
        if isinstance(module, timm_layers.DropPath):
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, name, nn.Identity())
    if isinstance(model, timm_vit.VisionTransformer):
        _canonize_timm(model)
    elif isinstance(model, tv_vit.VisionTransformer):
        _canonize_torchvision(model)
    else:
        raise CanonizerError(
            f"canonizer 'vit' expects a timm or torchvision VisionTransformer, got {type(model).__name__}"
        )
