"""Scion in HF Trainer: a stock GPT-2 (or Llama) from its config, trained on synthetic tokens.

The supported route keeps the recipe: build the optimizer from ``param_groups`` and hand it to
the Trainer with ``optimizers=(optimizer, None)`` (the Trainer then adds its own learning-rate
schedule on top of Scion's ``lr``). ``optimizer_cls_and_kwargs=(Scion, ...)`` is refused: the
Trainer would pass its own weight-decay groups, with no norms or radii. Seconds on a CPU::

    python examples/hf_causal_lm.py [--model gpt2|llama] [--steps 40] [--optimizer adamw]
"""

from __future__ import annotations

import argparse

import torch
import transformers as hf

from scion_kernels import RECIPES, Scion, format_groups, param_groups

VOCAB, SEQ = 64, 32


class Tokens(torch.utils.data.Dataset):
    """Sequences where every token has 4 likely successors (a fixed random bigram table)."""

    def __init__(self, n: int = 512) -> None:
        gen = torch.Generator().manual_seed(0)
        table = torch.full((VOCAB, VOCAB), -4.0)
        for t in range(VOCAB):
            table[t, torch.randperm(VOCAB, generator=gen)[:4]] = 2.0
        ids = torch.empty(n, SEQ, dtype=torch.long)
        ids[:, 0] = torch.randint(0, VOCAB, (n,), generator=gen)
        for i in range(1, SEQ):
            ids[:, i] = torch.multinomial(table.softmax(-1)[ids[:, i - 1]], 1, generator=gen)[:, 0]
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def build(name: str) -> torch.nn.Module:
    if name == "gpt2":
        config = hf.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=64, n_layer=2, n_head=4)
        return hf.GPT2LMHeadModel(config)
    config = hf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
    )  # fmt: skip
    return hf.LlamaForCausalLM(config)


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", choices=["gpt2", "llama"], default="gpt2")
    p.add_argument("--optimizer", choices=["scion", "adamw"], default="scion")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--init", action="store_true", help="start from Scion's init()")
    p.add_argument("--out", default="/tmp/scion-hf-example")
    args = p.parse_args(argv)
    hf.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = build(args.model)

    if args.optimizer == "scion":
        groups = param_groups(model, "stock")  # roles from the layer types; see the table
        print(format_groups(groups))
        recipe = RECIPES["stock"]
        optimizer = Scion(groups, lr=recipe.lr, momentum=recipe.momentum)
        if args.init:
            optimizer.init()
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)

    training = hf.TrainingArguments(
        output_dir=args.out, per_device_train_batch_size=16, max_steps=args.steps,
        logging_steps=10, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
        lr_scheduler_type="constant",
    )  # fmt: skip
    trainer = hf.Trainer(
        model=model, args=training, train_dataset=Tokens(), optimizers=(optimizer, None)
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"{args.model} with {args.optimizer}: loss every 10 steps {losses}")
    return float(losses[-1])


if __name__ == "__main__":
    main()
