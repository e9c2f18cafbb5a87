"""Recipes on stock models: Scion with ``param_groups`` (no hand fixes) against AdamW.

``python -m bench.recipes [--models gpt2,llama,vit,resnet,mobilenet,convnext] [--steps 60]``
trains small stock models built from their libraries' classes (random weights: HF
transformers' GPT-2 and Llama, timm's ViT, ResNet-18 and ConvNeXt-atto layouts at 1/4 of their
widths, MobileNetV3-small at width 0.5: depthwise and squeeze-excite convs) on synthetic
data that can be learned, for a fixed number of steps, and reports the mean training loss of
the last 10 steps, averaged over ``--seeds`` runs (model init and data differ per seed):

- language models: token sequences from a fixed random bigram table in which every token has 4
  likely successors (loss floor about ln 4 ≈ 1.4 nats);
- image models: 10 classes, each a fixed random 32×32 template plus Gaussian noise (σ = 4).

More families by name (``--models``), from tiny configs: ``FAMILIES_II`` (CLIP on image–caption
pairs, Mamba, Gemma 2, T5 copying its input, Whisper from sounds to captions, Swin,
ConvNeXtV2) and ``FAMILIES_III`` (Phi, Falcon, DeepseekV3 and Gemma 3 as causal LMs;
ModernBERT and DistilBERT restoring sequences with a quarter of the tokens masked).

Each model runs AdamW at several learning rates and Scion at each point of a grid of learning
rates and radii (``--grid``), with and without ``init()``. Results go to
``bench/results/<device>/recipes.{json,md}``. Needs transformers and timm (timm needs
torchvision); models whose library is missing are skipped with the reason.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scion_kernels import RECIPES, Scion, param_groups

from .common import RESULTS, device_name, device_slug, environment

VOCAB, SEQ, CLASSES, IMAGE = 96, 32, 10, 32


@dataclass
class Task:
    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], tuple[Any, torch.Tensor]]
    loss: Callable[[nn.Module, Any, torch.Tensor], torch.Tensor]
    recipe: str


def _bigram_table() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    table = torch.full((VOCAB, VOCAB), -4.0)
    for t in range(VOCAB):
        table[t, torch.randperm(VOCAB, generator=gen)[:4]] = 2.0
    return table.softmax(-1)


_TABLE = _bigram_table()


def _tokens(gen: torch.Generator, batch: int = 16) -> tuple[Any, torch.Tensor]:
    ids = torch.empty(batch, SEQ, dtype=torch.long)
    ids[:, 0] = torch.randint(0, VOCAB, (batch,), generator=gen)
    for i in range(1, SEQ):
        ids[:, i] = torch.multinomial(_TABLE[ids[:, i - 1]], 1, generator=gen).squeeze(1)
    return ids, ids


_TEMPLATES = torch.randn(CLASSES, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(99))


def _images(gen: torch.Generator, batch: int = 32) -> tuple[Any, torch.Tensor]:
    labels = torch.randint(0, CLASSES, (batch,), generator=gen)
    x = _TEMPLATES[labels] + 4.0 * torch.randn(batch, 3, IMAGE, IMAGE, generator=gen)
    return x, labels


def _lm_loss(model: nn.Module, ids: Any, _: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def _ce_loss(model: nn.Module, x: Any, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


def tasks() -> dict[str, Task | str]:
    """The tasks, or the reason a task cannot run here."""
    out: dict[str, Task | str] = {}
    try:
        import transformers as hf
    except ImportError as e:
        out["gpt2"] = out["llama"] = f"transformers not importable: {e}"
    else:
        hf.logging.set_verbosity_error()
        out["gpt2"] = Task(
            "gpt2",
            lambda: hf.GPT2LMHeadModel(
                hf.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=64, n_layer=2, n_head=4)
            ),
            _tokens,
            _lm_loss,
            "stock",
        )
        out["llama"] = Task(
            "llama",
            lambda: hf.LlamaForCausalLM(
                hf.LlamaConfig(
                    vocab_size=VOCAB,
                    hidden_size=64,
                    intermediate_size=128,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    num_key_value_heads=2,
                    max_position_embeddings=SEQ,
                )
            ),
            _tokens,
            _lm_loss,
            "stock",
        )
    try:
        import transformers as hf
    except ImportError as e:
        for k in FAMILIES_II + FAMILIES_III:
            out[k] = f"transformers not importable: {e}"
    else:
        out.update(_families_ii(hf))
        out.update(_families_iii(hf))
    try:
        import timm
    except Exception as e:  # noqa: BLE001 - timm fails in several ways without torchvision
        for k in ("vit", "resnet", "mobilenet", "convnext"):
            out[k] = f"timm not importable: {type(e).__name__}: {e}"
    else:
        out["vit"] = Task(
            "vit",
            lambda: timm.models.vision_transformer.VisionTransformer(
                img_size=IMAGE,
                patch_size=8,
                embed_dim=64,
                depth=2,
                num_heads=4,
                num_classes=CLASSES,
            ),  # fmt: skip
            _images,
            _ce_loss,
            "stock-vit",
        )
        out["resnet"] = Task(
            "resnet",
            lambda: timm.models.resnet.ResNet(
                timm.models.resnet.BasicBlock,
                [2, 2, 2, 2],
                num_classes=CLASSES,
                channels=(16, 32, 64, 128),
            ),  # fmt: skip
            _images,
            _ce_loss,
            "stock-cnn",
        )
        out["mobilenet"] = Task(
            "mobilenet",
            lambda: timm.create_model("mobilenetv3_small_050", num_classes=CLASSES),
            _images,
            _ce_loss,
            "stock-cnn",
        )
        out["convnext"] = Task(
            "convnext",
            lambda: timm.models.convnext.ConvNeXt(
                num_classes=CLASSES,
                depths=(2, 2, 2, 2),
                dims=(16, 32, 64, 128),
            ),  # fmt: skip
            _images,
            _ce_loss,
            "stock-cnn",
        )
    return out


#: Real models II (bench/NOTES.md): families whose parameters are not all weight matrices.
FAMILIES_II = ("clip", "mamba", "gemma", "t5", "whisper", "swin", "convnextv2")
#: The held-out families of the first real-models check, rerun on the same tasks.
FAMILIES_III = ("phi", "falcon", "deepseekv3", "gemma3", "modernbert", "distilbert")
#: CLIP and Whisper: the token sequence each class is described by (fixed, random).
_CAPTIONS = torch.randint(1, VOCAB, (CLASSES, 8), generator=torch.Generator().manual_seed(7))
MELS, FRAMES = 16, 32
_SOUNDS = torch.randn(CLASSES, MELS, FRAMES, generator=torch.Generator().manual_seed(11))


def _pairs(gen: torch.Generator, batch: int = 32) -> tuple[Any, torch.Tensor]:
    """CLIP: images of the ``_images`` task with their class's caption (one class each)."""
    labels = torch.randperm(CLASSES, generator=gen)[: min(batch, CLASSES)]
    x = _TEMPLATES[labels] + 4.0 * torch.randn(len(labels), 3, IMAGE, IMAGE, generator=gen)
    return {"pixel_values": x, "input_ids": _CAPTIONS[labels]}, labels


def _clip_loss(model: nn.Module, x: Any, _: torch.Tensor) -> torch.Tensor:
    return model(**x, return_loss=True).loss


def _copy_loss(model: nn.Module, ids: Any, _: torch.Tensor) -> torch.Tensor:
    """T5: read a bigram sequence, write it back."""
    return model(input_ids=ids, labels=ids).loss


def _sounds(gen: torch.Generator, batch: int = 16) -> tuple[Any, torch.Tensor]:
    """Whisper: a class's sound (a fixed random spectrogram) plus noise → its caption."""
    labels = torch.randint(0, CLASSES, (batch,), generator=gen)
    x = _SOUNDS[labels] + 1.0 * torch.randn(batch, MELS, FRAMES, generator=gen)
    return x, _CAPTIONS[labels]


def _whisper_loss(model: nn.Module, x: Any, y: torch.Tensor) -> torch.Tensor:
    return model(input_features=x, labels=y).loss


def _hf_ce_loss(model: nn.Module, x: Any, y: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=x, labels=y).loss


def _masked(gen: torch.Generator, batch: int = 16) -> tuple[Any, torch.Tensor]:
    """Masked LM as denoising: bigram sequences with a quarter of the tokens replaced by a
    mask token (``VOCAB``, one past the sequences' tokens); every position is labelled with its
    token. (Labelling only the masked ones, neither optimizer learns anything in a few hundred
    steps at this size: each masked token needs attention to a neighbour before any signal.)"""
    ids, _ = _tokens(gen, batch)
    hidden = torch.rand(ids.shape, generator=gen) < 0.25
    return ids.masked_fill(hidden, VOCAB), ids


def _masked_loss(model: nn.Module, ids: Any, labels: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=labels).loss


def _families_iii(hf: Any) -> dict[str, Task]:
    small = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=SEQ)  # fmt: skip
    phi = hf.PhiConfig(**small)
    falcon = hf.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                             num_attention_heads=4)  # fmt: skip
    deepseek = hf.DeepseekV3Config(**small, moe_intermediate_size=32, n_routed_experts=4,
                                   num_experts_per_tok=2, n_shared_experts=1, n_group=1,
                                   topk_group=1, first_k_dense_replace=1, kv_lora_rank=16,
                                   q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                   v_head_dim=16, num_key_value_heads=4)  # fmt: skip
    gemma3 = hf.Gemma3TextConfig(**small, num_key_value_heads=2, head_dim=16)
    modernbert = hf.ModernBertConfig(vocab_size=VOCAB + 1, hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     max_position_embeddings=SEQ, pad_token_id=0,
                                     mask_token_id=VOCAB)  # fmt: skip
    distilbert = hf.DistilBertConfig(vocab_size=VOCAB + 1, dim=64, hidden_dim=128, n_layers=2,
                                     n_heads=4, max_position_embeddings=SEQ)  # fmt: skip
    lm = lambda name, cls, cfg: Task(name, lambda: cls(cfg), _tokens, _lm_loss, "stock")  # noqa: E731
    mlm = lambda name, cls, cfg: Task(name, lambda: cls(cfg), _masked, _masked_loss, "stock")  # noqa: E731
    return {
        "phi": lm("phi", hf.PhiForCausalLM, phi),
        "falcon": lm("falcon", hf.FalconForCausalLM, falcon),
        "deepseekv3": lm("deepseekv3", hf.DeepseekV3ForCausalLM, deepseek),
        "gemma3": lm("gemma3", hf.Gemma3ForCausalLM, gemma3),
        "modernbert": mlm("modernbert", hf.ModernBertForMaskedLM, modernbert),
        "distilbert": mlm("distilbert", hf.DistilBertForMaskedLM, distilbert),
    }


def _families_ii(hf: Any) -> dict[str, Task]:
    small = dict(num_hidden_layers=2, num_attention_heads=4)
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                max_position_embeddings=SEQ, **small)  # fmt: skip
    vision = dict(hidden_size=64, intermediate_size=128, image_size=IMAGE, patch_size=8, **small)
    clip = hf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    mamba = hf.MambaConfig(vocab_size=VOCAB, hidden_size=64, state_size=8, num_hidden_layers=2)
    gemma = hf.Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                            num_key_value_heads=2, head_dim=16, max_position_embeddings=SEQ,
                            **small)  # fmt: skip
    t5 = hf.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                     num_heads=4, decoder_start_token_id=0)  # fmt: skip
    whisper = hf.WhisperConfig(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
                               encoder_attention_heads=4, decoder_attention_heads=4,
                               encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=MELS,
                               max_source_positions=FRAMES // 2, max_target_positions=SEQ,
                               decoder_start_token_id=0, pad_token_id=0)  # fmt: skip
    swin = hf.SwinConfig(image_size=IMAGE, patch_size=4, embed_dim=32, depths=[2, 2],
                         num_heads=[2, 4], window_size=4, num_labels=CLASSES)  # fmt: skip
    convnext = hf.ConvNextV2Config(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1],
                                   num_labels=CLASSES)  # fmt: skip
    return {
        "clip": Task("clip", lambda: hf.CLIPModel(clip), _pairs, _clip_loss, "stock"),
        "mamba": Task("mamba", lambda: hf.MambaForCausalLM(mamba), _tokens, _lm_loss, "stock"),
        "gemma": Task("gemma", lambda: hf.Gemma2ForCausalLM(gemma), _tokens, _lm_loss, "stock"),
        "t5": Task("t5", lambda: hf.T5ForConditionalGeneration(t5), _tokens, _copy_loss, "stock"),
        "whisper": Task(
            "whisper",
            lambda: hf.WhisperForConditionalGeneration(whisper),
            _sounds,
            _whisper_loss,
            "stock",
        ),
        "swin": Task(
            "swin", lambda: hf.SwinForImageClassification(swin), _images, _hf_ce_loss, "stock-vit"
        ),
        "convnextv2": Task(
            "convnextv2",
            lambda: hf.ConvNextV2ForImageClassification(convnext),
            _images,
            _hf_ce_loss,
            "stock-cnn",
        ),
    }


def train_seeds(
    task: Task, make_opt: Callable[[nn.Module], Any], steps: int, seeds: int
) -> dict[str, Any]:
    """:func:`train` for seeds ``0 … seeds−1``: the mean final loss and each seed's."""
    runs = [train(task, make_opt, steps, seed) for seed in range(seeds)]
    finals = [r["final"] for r in runs]
    return {
        "final": sum(finals) / len(finals),
        "finals": finals,
        "seconds": sum(r["seconds"] for r in runs),
        "diverged": any(r["diverged"] for r in runs),
    }


def train(task: Task, make_opt: Callable[[nn.Module], Any], steps: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = task.build()
    opt, after = make_opt(model)
    gen = torch.Generator().manual_seed(seed + 1)
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        x, y = task.batch(gen)
        loss = task.loss(model, x, y)
        if not torch.isfinite(loss):
            losses.append(math.inf)
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        after()
        losses.append(float(loss.detach()))
    tail = losses[-10:]
    return {
        "final": sum(tail) / len(tail),
        "first": losses[0],
        "seconds": time.perf_counter() - start,
        "diverged": not math.isfinite(losses[-1]) or len(losses) < steps,
    }


def adamw(lr: float) -> Callable[[nn.Module], Any]:
    def make(model: nn.Module) -> Any:
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0), lambda: None

    return make


def scion(
    recipe: str, lr: float, init: bool | str, conv: float | None = None, **radii: float
) -> Callable[[nn.Module], Any]:
    """Scion on ``param_groups(model, recipe)`` with each role's radius ``radii[role]`` and,
    for the input and hidden roles, conv weights at ``conv`` (``None``: the recipe's);
    ``init``: no ``init()`` (``False``), the default one (``True``) or ``"shared"`` draws."""

    def make(model: nn.Module) -> Any:
        overrides: dict[str, dict[str, float]] = {role: {"scale": r} for role, r in radii.items()}
        if conv is not None:
            for role in ("input", "hidden"):
                overrides.setdefault(role, {})["conv_scale"] = conv
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            groups = param_groups(model, recipe, overrides=overrides)
        opt = Scion(groups, lr=lr, momentum=RECIPES[recipe].momentum)
        if init:
            opt.init(draws="shared" if init == "shared" else "independent")
        return opt, lambda: None

    return make


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.recipes", description=__doc__)
    p.add_argument("--models", default="gpt2,llama,vit,resnet,mobilenet,convnext")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--recipe", default=None, help="the Scion recipe (default: the task's)")
    p.add_argument(
        "--lrs", default="", help="Scion learning rates (default: the recipe's ×2, ×1, ×½)"
    )
    p.add_argument("--hidden", default="", help="hidden radii (default: the recipe's)")
    p.add_argument("--input", default="", help="input radii (default: the recipe's)")
    p.add_argument("--vector", default="", help="vector radii (default: the recipe's)")
    p.add_argument("--head", default="", help="head radii (default: the recipe's)")
    p.add_argument("--conv", default="", help="conv radii (default: the recipe's)")
    p.add_argument("--free", default="", help="free-role radii (default: the recipe's)")
    p.add_argument("--seeds", type=int, default=3, help="runs per point, averaged")
    p.add_argument("--adamw", default="0.003,0.001,0.0003", help="AdamW learning rates")
    p.add_argument(
        "--init",
        default="0,1",
        help='run Scion with init() (1), without (0), with init(draws="shared") (shared)',
    )
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    floats = lambda s: [float(v) for v in s.split(",") if v]  # noqa: E731

    rows = []
    available = tasks()
    for name in args.models.split(","):
        task = available.get(name, f"unknown model {name!r}")
        if isinstance(task, str):
            print(f"{name}: skipped ({task})", file=sys.stderr)
            rows.append({"model": name, "skipped": task})
            continue
        recipe = args.recipe or task.recipe
        for lr in floats(args.adamw):
            r = train_seeds(task, adamw(lr), args.steps, args.seeds)
            rows.append({"model": name, "optimizer": "AdamW", "lr": lr, **r})
            print(f"{name:9s} AdamW lr={lr:<8g} {r['final']:.3f}", file=sys.stderr, flush=True)
        r = RECIPES[recipe]
        grid = itertools.product(
            floats(args.lrs) or [2 * r.lr, r.lr, r.lr / 2],
            floats(args.hidden) or [r.hidden.scale],
            floats(args.vector) or [r.vector.scale],
            floats(args.head) or [r.head.scale],
            [v if v == "shared" else bool(int(v)) for v in args.init.split(",")],
            floats(args.input) or [r.input.scale],
            floats(args.conv) or [r.hidden.conv_scale],
            floats(args.free) or [r.free.scale],
        )
        for lr, hidden, vector, head, init, input_, conv, free in grid:
            radii = {
                "input": input_,
                "hidden": hidden,
                "vector": vector,
                "head": head,
                "free": free,
            }
            r = train_seeds(task, scion(recipe, lr, init, conv, **radii), args.steps, args.seeds)
            rows.append(
                {
                    "model": name,
                    "optimizer": f"Scion {recipe}",
                    "lr": lr,
                    "init": init,
                    "conv": conv,
                    **radii,
                    **r,
                }
            )
            print(
                f"{name:9s} Scion lr={lr:<8g} ρ={radii['input']:g}/{hidden:g}/{vector:g}/{head:g}"
                f"{f' conv {conv:g}' if conv else ''} free {free:g} "
                f"init={init if init == 'shared' else int(init)} "
                f"{r['final']:.3f}{' diverged' if r['diverged'] else ''}",
                file=sys.stderr,
                flush=True,
            )
    out = Path(args.out) if args.out else RESULTS / device_slug(device_name(torch.device("cpu")))
    out.mkdir(parents=True, exist_ok=True)
    env = environment(torch.device("cpu"))
    for lib in ("transformers", "timm", "torchvision"):
        try:
            env[lib] = __import__(lib).__version__
        except Exception:  # noqa: BLE001 - absent, or timm without torchvision
            env[lib] = None
    record = {
        "environment": env,
        "command": "python -m bench.recipes " + " ".join(argv or sys.argv[1:]),
        "rows": rows,
    }
    (out / "recipes.json").write_text(json.dumps(record, indent=1))
    (out / "recipes.md").write_text(_markdown(record))
    return 0


def _markdown(record: dict) -> str:
    env = record["environment"]
    lines = [
        "# Stock models: Scion (param_groups, no overrides) against AdamW",
        "",
        f"`{record['command']}` — commit {env.get('commit', '?')}, {env.get('date', '?')}, "
        f"{env.get('device', '?')}, torch {env.get('torch', '?')}, transformers "
        f"{env.get('transformers')}, timm {env.get('timm')}, torchvision {env.get('torchvision')}",
        "",
        "Training loss: the mean of the last 10 steps, averaged over the seeds (each seed's in",
        "brackets). Radii: input/hidden/vector/head; conv weights and the free role where they",
        "differ.",
        "",
        "| model | optimizer | lr | radii | init() | loss |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in record["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['model']} | skipped: {r['skipped']} | | | | |")
            continue
        radii = (
            f"{r['input']:g}/{r['hidden']:g}/{r['vector']:g}/{r['head']:g}" if "hidden" in r else ""
        )
        if r.get("conv"):
            radii += f", conv {r['conv']:g}"
        if "free" in r and r["free"] != RECIPES["stock"].free.scale:
            radii += f", free {r['free']:g}"
        init = {True: "yes", False: "no", "shared": "shared"}[r["init"]] if "init" in r else ""
        loss = "diverged" if r["diverged"] else f"{r['final']:.3f}"
        if len(r.get("finals", [])) > 1 and not r["diverged"]:
            loss += " (" + ", ".join(f"{f:.3f}" for f in r["finals"]) + ")"
        lines.append(
            f"| {r['model']} | {r['optimizer']} | {r['lr']:g} | {radii} | {init} | {loss} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
