"""The benchmark models: parameter sets of real architectures, built with random weights (no
forward pass is needed to time an optimizer step). GPT-2 small, ViT-S/16 and ResNet-18 at full
size, and smaller GPTs through :class:`GPT2`'s arguments (``GPT2(n_layer=4, dim=256)``: the
3M-parameter model of the CPU comparison with the simplest peers)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["GPT2", "GPT2Block", "BasicBlock", "ResNet18", "ViT", "ViTBlock"]


class GPT2Block(nn.Module):
    """A GPT-2 transformer block's parameters (pre-norm attention and MLP, all with bias)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = nn.Module()
        self.attn.c_attn = nn.Linear(dim, 3 * dim)
        self.attn.c_proj = nn.Linear(dim, dim)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(dim, 4 * dim)
        self.mlp.c_proj = nn.Linear(4 * dim, dim)


class GPT2(nn.Module):
    """GPT-2's parameter set: token and position embeddings, blocks, final norm, and an output
    head tied to the token embedding (GPT-2 small: 124M parameters)."""

    def __init__(
        self, n_layer: int = 12, dim: int = 768, vocab: int = 50257, context: int = 1024
    ) -> None:
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(vocab, dim)
        self.transformer.wpe = nn.Embedding(context, dim)
        self.transformer.h = nn.ModuleList(GPT2Block(dim) for _ in range(n_layer))
        self.transformer.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.transformer.wte.weight


class ViTBlock(nn.Module):
    """A ViT block's parameters: norm, attention (qkv, proj), norm, MLP (fc1, fc2)."""

    def __init__(self, dim: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.mlp.fc2 = nn.Linear(mlp_ratio * dim, dim)


class ViT(nn.Module):
    """ViT's parameter set (ViT-S/16 by default: 224² images, 384 wide, 12 blocks, 22M)."""

    def __init__(
        self,
        dim: int = 384,
        depth: int = 12,
        patch: int = 16,
        image: int = 224,
        classes: int = 1000,
    ) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(ViTBlock(dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3×3 convs with BatchNorm, a 1×1 downsample when needed."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )


class ResNet18(nn.Module):
    """ResNet-18's parameter set (11.7M): stem conv, four stages of two blocks, fc head."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        widths, c_in = (64, 128, 256, 512), 64
        for i, c_out in enumerate(widths):
            stride = 1 if i == 0 else 2
            stage = nn.Sequential(BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1))
            self.add_module(f"layer{i + 1}", stage)
            c_in = c_out
        self.fc = nn.Linear(512, classes)
