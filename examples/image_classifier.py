"""Scion on a stock timm or torchvision image model, from its constructor with random weights.

``param_groups`` reads the layer types (convs, depthwise convs, BatchNorm/LayerNorm gains,
several heads) with no overrides; the ``stock-cnn`` recipe is for conv nets, ``stock-vit`` for
vision transformers. The data: 10 classes, each a fixed random 32×32 template plus noise.
Seconds on a CPU::

    python examples/image_classifier.py [--model resnet|convnext|vit] [--steps 60]

Needs timm (which needs torchvision) or torchvision. PyPI's torchvision does not import beside
the CPU build of torch 2.13; ``pip install torch==2.14.1 torchvision==0.29.1`` gives a pair
that does.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from scion_kernels import RECIPES, Scion, format_groups, param_groups

CLASSES, SIZE = 10, 32


def build(name: str) -> tuple[nn.Module, str]:
    """The model (small widths, stock layers) and its recipe."""
    try:
        import timm
    except Exception as e:  # noqa: BLE001 - timm fails to import without torchvision
        msg = f"this example needs timm (and torchvision): {type(e).__name__}: {e}"
        raise SystemExit(msg) from e
    if name == "resnet":
        resnet = timm.models.resnet
        model = resnet.ResNet(
            resnet.BasicBlock, [2, 2, 2, 2], num_classes=CLASSES, channels=(16, 32, 64, 128)
        )
        return model, "stock-cnn"
    if name == "convnext":
        model = timm.models.convnext.ConvNeXt(
            num_classes=CLASSES, depths=(2, 2, 2, 2), dims=(16, 32, 64, 128)
        )
        return model, "stock-cnn"
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=SIZE, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=CLASSES
    )
    return model, "stock-vit"


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", choices=["resnet", "convnext", "vit"], default="convnext")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--init", action="store_true", help="start from Scion's init()")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, recipe = build(args.model)
    # timm models say what they take, so param_groups runs the model once to find its heads.
    groups = param_groups(model, recipe, example_inputs=torch.zeros(2, 3, SIZE, SIZE))
    print(format_groups(groups))
    optimizer = Scion(groups, lr=RECIPES[recipe].lr, momentum=RECIPES[recipe].momentum)
    if args.init:
        optimizer.init()

    gen = torch.Generator().manual_seed(1)
    templates = torch.randn(CLASSES, 3, SIZE, SIZE, generator=gen)
    losses = []
    for step in range(args.steps):
        labels = torch.randint(0, CLASSES, (32,), generator=gen)
        x = templates[labels] + 4.0 * torch.randn(32, 3, SIZE, SIZE, generator=gen)
        loss = nn.functional.cross_entropy(model(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 10 == 9:
            print(f"step {step + 1}: loss {sum(losses[-10:]) / 10:.3f}")
    return sum(losses[-10:]) / 10


if __name__ == "__main__":
    main()
