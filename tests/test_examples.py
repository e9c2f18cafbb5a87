"""The examples run as documented (each skips, saying why, when its library is missing)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def _needs(*modules: str) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - timm fails to import without torchvision
            pytest.skip(f"{name} does not import here: {type(e).__name__}: {e}")


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_hf_trainer_example_learns(model, tmp_path):
    _needs("transformers", "accelerate")
    example = importlib.import_module("hf_causal_lm")
    loss = example.main(["--model", model, "--steps", "20", "--out", str(tmp_path)])
    assert loss < 3.6  # from ln 64 ≈ 4.16 at the start


def test_hf_trainer_weight_decay_groups(tmp_path):
    """HF Trainer's own groups (``optimizer_cls_and_kwargs``) carry ``weight_decay``: with its
    default 0.0 they train (as ``Scion(model.parameters())`` would, norms by shape); with a
    weight decay they are refused, pointing at ``param_groups`` and ``optimizers=``."""
    _needs("transformers", "accelerate")
    import transformers as hf

    from scion_kernels import Scion

    example = importlib.import_module("hf_causal_lm")
    for weight_decay in (0.0, 0.01):
        args = hf.TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[],
                                    use_cpu=True, weight_decay=weight_decay)  # fmt: skip
        trainer = hf.Trainer(
            model=example.build("gpt2"), args=args, train_dataset=example.Tokens(8),
            optimizer_cls_and_kwargs=(Scion, {"lr": 0.01}),
        )  # fmt: skip
        if weight_decay:
            with pytest.raises(ValueError, match=r"Trainer\(optimizers=\(optimizer, None\)\)"):
                trainer.train()
        else:
            assert trainer.train().global_step == 1


def test_image_example_learns():
    _needs("timm")
    example = importlib.import_module("image_classifier")
    assert example.main(["--model", "convnext", "--steps", "30"]) < 2.0  # chance: ln 10 ≈ 2.3


def test_lightning_example_learns():
    _needs("lightning", "transformers")
    example = importlib.import_module("lightning_module")
    assert example.main(["--steps", "20"]) < 3.6


def test_cuda_graph_example(capsys):
    """``examples/cuda_graph.py``: on a GPU it trains by replaying one captured graph; without
    one it says why and returns nothing."""
    import torch

    example = importlib.import_module("cuda_graph")
    loss = example.main(["--steps", "50"])
    if torch.cuda.is_available():
        assert loss is not None and loss < 2.3  # ln 10 ≈ 2.30 at the start
    else:
        assert loss is None
        assert "needs a CUDA GPU" in capsys.readouterr().err
