"""Scion in PyTorch Lightning: ``configure_optimizers`` builds it from ``param_groups``.

A stock HF Llama from its config on synthetic tokens (the data of ``hf_causal_lm.py``).
Lightning steps the optimizer itself; Scion needs nothing more. Seconds on a CPU::

    python examples/lightning_module.py [--steps 40]
"""

from __future__ import annotations

import argparse

import lightning as L
import torch

from scion_kernels import RECIPES, Scion, param_groups

try:  # run as a script (python examples/lightning_module.py) or imported from the tests
    from hf_causal_lm import Tokens, build
except ImportError:
    from examples.hf_causal_lm import Tokens, build


class CausalLM(L.LightningModule):
    def __init__(self, model: str = "llama", init: bool = False) -> None:
        super().__init__()
        self.model = build(model)
        self.init = init
        self.losses: list[float] = []

    def training_step(self, batch: dict[str, torch.Tensor], _: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> Scion:
        recipe = RECIPES["stock"]
        optimizer = Scion(param_groups(self.model, "stock"), lr=recipe.lr, momentum=recipe.momentum)
        if self.init:
            optimizer.init()
        return optimizer


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--model", choices=["gpt2", "llama"], default="llama")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    module = CausalLM(args.model)
    loader = torch.utils.data.DataLoader(Tokens(), batch_size=16, shuffle=True)
    trainer = L.Trainer(
        max_steps=args.steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, loader)
    tail = sum(module.losses[-10:]) / 10
    print(f"first loss {module.losses[0]:.3f}, mean of the last 10 {tail:.3f}")
    return tail


if __name__ == "__main__":
    main()
