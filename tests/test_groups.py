"""param_groups: roles, the authors' recipes, tied weights, the summary."""

from __future__ import annotations

import importlib
import re

import pytest
import torch
from torch import nn

from scion_kernels import RECIPES, Scion, ScionLight, format_groups, param_groups


class TinyGPT(nn.Module):
    def __init__(self, vocab=31, dim=16, tied=True):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(8, dim)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "ln": nn.LayerNorm(dim),
                    "fc": nn.Linear(dim, 4 * dim),
                    "proj": nn.Linear(4 * dim, dim, bias=False),
                }
            )
            for _ in range(2)
        )
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for b in self.blocks:
            x = x + b["proj"](torch.relu(b["fc"](b["ln"](x))))
        return self.lm_head(x)


class TinyViT(nn.Module):
    def __init__(self, dim=12):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mlp = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 5)


def _roles(groups):
    return {n: (g["role"], g["norm"], g["scale"]) for g in groups for n in g["param_names"]}


def test_gpt_recipe_with_tied_head():
    model = TinyGPT(tied=True)
    roles = _roles(param_groups(model, "gpt"))
    # The tied embedding/head tensor is counted once, as the head.
    assert roles["wte.weight"] == ("head", "Sign", 3000.0)
    assert "lm_head.weight" not in roles
    assert roles["wpe.weight"] == ("input", "Sign", 1.0)
    assert roles["blocks.0.fc.weight"] == ("hidden", "Spectral", 50.0)
    assert roles["blocks.1.proj.weight"] == ("hidden", "Spectral", 50.0)
    assert roles["blocks.0.fc.bias"] == ("vector", "BiasRMS", 50.0)
    assert roles["blocks.0.ln.weight"][1] == "BiasRMS"
    n_params = sum(1 for _ in model.parameters())
    assert len(roles) == n_params


def test_gpt_recipe_untied():
    groups = param_groups(TinyGPT(tied=False), "gpt")
    roles = _roles(groups)
    assert roles["wte.weight"] == ("input", "Sign", 1.0)
    assert roles["lm_head.weight"] == ("head", "Sign", 3000.0)
    input_group = next(g for g in groups if g["role"] == "input")
    assert input_group["norm_kwargs"] == {"normalized": False, "transpose": True}


def _lr_scales(groups):
    return {n: g.get("lr_scale", 1.0) for g in groups for n in g["param_names"]}


def test_stock_recipe_scales_role_lrs_only_with_a_tied_head():
    """With a head tied to the embedding the stock recipe steps hidden matrices at 2γ and the
    shared matrix, vectors and free parameters at γ/2; untied, or with the authors' recipes,
    every group steps at γ; a user's override wins."""
    ex = torch.randint(0, 31, (2, 8))
    tied = _lr_scales(param_groups(TinyGPT(tied=True), "stock", example_inputs=ex))
    assert tied["blocks.0.fc.weight"] == tied["blocks.1.proj.weight"] == 2.0
    assert tied["wte.weight"] == tied["wpe.weight"] == 0.5
    assert tied["blocks.0.fc.bias"] == tied["blocks.0.ln.weight"] == 0.5
    assert set(_lr_scales(param_groups(TinyGPT(tied=False), "stock", example_inputs=ex))
               .values()) == {1.0}  # fmt: skip
    assert set(_lr_scales(param_groups(TinyGPT(tied=True), "gpt")).values()) == {1.0}
    mine = param_groups(
        TinyGPT(tied=True), "stock", example_inputs=ex, overrides={"hidden": {"lr_scale": 3.0}}
    )
    assert _lr_scales(mine)["blocks.0.fc.weight"] == 3.0 and _lr_scales(mine)["wte.weight"] == 0.5
    assert RECIPES["stock"].hidden.lr_scale == 1.0  # the scaling is the recipe's tied_lr_scale


def test_embeddings_sharing_a_table_without_a_tied_head_are_not_tied():
    """Two embeddings holding one table (T5's encoder and decoder) with a head of its own: the
    table is an input layer that ``init()`` draws, and no role's lr is scaled."""

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc, self.dec = nn.Embedding(20, 8), nn.Embedding(20, 8)
            self.dec.weight = self.enc.weight
            self.mix = nn.Linear(8, 8)
            self.head = nn.Linear(8, 20, bias=False)

        def forward(self, a, b):
            return self.head(self.mix(self.enc(a) + self.dec(b)))

    ids = torch.randint(0, 20, (2, 5))
    groups = param_groups(Shared(), "stock", example_inputs=(ids, ids))
    table = next(g for g in groups if "enc.weight" in g["param_names"])
    assert table["role"] == "input" and table.get("init", True)
    assert set(_lr_scales(groups).values()) == {1.0}


def test_mlp_recipe_first_layer_is_input():
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    groups = param_groups(model, "mlp")
    roles = _roles(groups)
    assert roles["0.weight"] == ("input", "Spectral", 1.0)
    assert next(g for g in groups if g["role"] == "input")["norm_kwargs"] == {"max": True}
    assert roles["2.weight"] == ("hidden", "Spectral", 1.0)
    assert roles["4.weight"] == ("head", "Sign", 1024.0)


def test_cnn_recipe_and_spectral_on_convs():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv1d(8, 8, 3), nn.Flatten(), nn.Linear(8, 4)
    )
    roles = _roles(param_groups(model, "cnn"))
    # Auto is resolved per parameter, from the layer type.
    assert roles["0.weight"] == ("input", "SpectralConv", 8.0)
    assert roles["2.weight"] == ("hidden", "SpectralConv", 8.0)
    assert roles["0.bias"] == ("vector", "BiasRMS", 8.0)
    assert roles["4.weight"] == ("head", "Sign", 128.0)
    # A Spectral role becomes SpectralConv on conv weights, dropping matrix-only options.
    groups = param_groups(model, "mlp")
    conv = next(g for g in groups if "2.weight" in g["param_names"])
    assert conv["norm"] == "SpectralConv" and conv["norm_kwargs"] == {}
    first = next(g for g in groups if "0.weight" in g["param_names"])
    assert first["norm"] == "SpectralConv"


def test_vit_recipe_free_tensors_get_biasrms():
    roles = _roles(param_groups(TinyViT(), "vit"))
    assert roles["pos_embed"] == ("vector", "BiasRMS", 25.0)
    assert roles["cls_token"] == ("vector", "BiasRMS", 25.0)
    assert roles["patch.weight"] == ("input", "SpectralConv", 25.0)
    assert roles["head.weight"] == ("head", "Sign", 500.0)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("cls", [Scion, ScionLight], ids=lambda c: c.__name__)
def test_every_recipe_builds_an_optimizer_that_steps(recipe, cls):
    model = TinyGPT(tied=False)
    r = RECIPES[recipe]
    opt = cls(param_groups(model, recipe), lr=min(r.lr, 0.01), momentum=r.momentum)
    opt.init()
    idx = torch.randint(0, 31, (4, 8))
    loss = nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
    loss.backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_explicit_head_and_overrides():
    model = TinyViT()
    groups = param_groups(model, "vit", head="mlp", overrides={"head": {"scale": 7.0}})
    roles = _roles(groups)
    assert roles["mlp.weight"] == ("head", "Sign", 7.0)
    assert roles["head.weight"][0] == "hidden"


def test_frozen_parameters_left_out():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    names = {n for g in param_groups(model, "mlp") for n in g["param_names"]}
    assert "0.weight" not in names and "0.bias" in names


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"recipe": "bert"}, "unknown recipe"),
        ({"head": "decoder"}, "no module named"),
        ({"overrides": {"output": {"scale": 1.0}}}, "unknown role"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        param_groups(TinyGPT(), **kwargs)


def test_format_groups_lists_every_parameter():
    model = TinyGPT(tied=False)
    text = format_groups(param_groups(model, "gpt"))
    lines = text.splitlines()
    head = ["parameter", "shape", "role", "norm", "radius", "lr", "init", "Newton–Schulz",
            "backend"]  # fmt: skip
    assert lines[0].split() == head
    assert len(lines) == 2 + sum(1 for _ in model.parameters())
    assert any("lm_head.weight" in ln and "31×16" in ln and "3000.0  ×1" in ln for ln in lines)
    assert "Sign(normalized=False, transpose=True)" in text
    rows = {ln.split()[0]: ln.split() for ln in lines[2:]}
    assert rows["blocks.0.ln.weight"][6] == "kept" and rows["blocks.0.ln.bias"][6] == "norm"


@pytest.mark.parametrize(
    "bf16_units, want", [(True, "bfloat16 (auto)"), (False, "float32 (auto)")], ids=["bf16", "avx2"]
)
def test_newton_schulz_dtype_is_shown(bf16_units, want, monkeypatch):
    """format_groups and the optimizer's repr say which dtype each Spectral parameter's
    Newton–Schulz computes in on this machine: chosen by the hardware unless given."""
    monkeypatch.setattr(
        importlib.import_module("scion_kernels.newton_schulz"), "_CPU_BF16_MATMUL", bf16_units
    )
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4))
    groups = param_groups(
        model, "mlp", overrides={"hidden": {"norm_kwargs": {"ns_dtype": torch.float16}}}
    )
    rows = {line.split()[0]: line for line in format_groups(groups).splitlines()[2:]}
    assert re.search(rf"{re.escape(want)}\s+torch$", rows["0.weight"])
    assert re.search(r"  float16\s+torch$", rows["1.weight"])
    assert re.search(r"1024.0  ×1  norm\s+torch$", rows["2.weight"])  # Sign: no Newton–Schulz
    text = repr(Scion(groups, lr=0.1))
    assert f"newton_schulz: {want}" in text and "newton_schulz: float16" in text
    assert text.count("newton_schulz:") == 2


@pytest.mark.parametrize("norm", ["Spectral", "Auto"])
def test_an_unknown_role_option_raises(norm):
    """A misspelt option is an error, not dropped (Auto: one no norm it picks accepts)."""
    bad = {"hidden": {"norm": norm, "norm_kwargs": {"coeficients": "classic"}}}
    with pytest.raises(ValueError, match="coeficients"):
        param_groups(TinyGPT(tied=False), "stock", overrides=bad)
