"""param_groups on real layer types: each parameter's kind, storage, role, norm and init.

Stock models from HF transformers and timm run when those libraries import (timm needs
torchvision, which fails to import beside the CPU build of torch 2.13: those tests skip with
the reason); the torch.nn layer types run everywhere.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

from scion_kernels import RECIPES, Scion, format_groups, param_groups
from scion_kernels.layers import describe, output_layers
from scion_kernels.norms import Spectral, SpectralConv, make_norm


def by_name(groups):
    """``{parameter name: (role, norm, norm_kwargs, scale, init)}``."""
    return {
        n: (g["role"], g["norm"], g["norm_kwargs"], g["scale"], g.get("init", True))
        for g in groups
        for n in g["param_names"]
    }


def no_warnings(fn, *args, **kwargs):
    """``fn(...)``, asserting that param_groups warned about nothing (the model's own forward
    may warn about its kernels)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    ours = [
        str(w.message)
        for w in caught
        if re.match("no rule|could not run|the model was not run", str(w.message))
    ]
    assert not ours, ours
    return out


def assert_table(groups, table):
    """Every parameter matches exactly one ``(pattern, role, norm, options, init)`` row, and
    has exactly those options (a subset check would let an extra layout option slip by)."""
    got = by_name(groups)
    for name, (role, norm, kwargs, _, init) in got.items():
        rows = [r for r in table if re.fullmatch(r[0], name)]
        assert len(rows) == 1, (name, [r[0] for r in rows])
        _, want_role, want_norm, want_kwargs, want_init = rows[0]
        assert (role, norm, kwargs, init) == (want_role, want_norm, want_kwargs, want_init), name


# ------------------------------------------------------------------------------- torch.nn layers
class Layers(nn.Module):
    """One of each layer type, used in a forward that ends in two heads."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.bag = nn.EmbeddingBag(20, 12)
        self.attn = nn.MultiheadAttention(12, 3)
        self.cross = nn.MultiheadAttention(12, 3, kdim=6, vdim=6, add_bias_kv=True)
        self.lstm = nn.LSTM(12, 8, proj_size=4)
        self.gru = nn.GRU(4, 8, bidirectional=True)
        self.bilinear = nn.Bilinear(16, 16, 12)
        self.conv = nn.Conv1d(12, 12, 3, padding=1)
        self.depthwise = nn.Conv1d(12, 12, 3, padding=1, groups=12)
        self.grouped = nn.Conv1d(12, 8, 1, groups=4)
        self.up = nn.ConvTranspose1d(8, 6, 2, stride=2, groups=2)
        self.bn = nn.BatchNorm1d(6)
        self.ln = nn.LayerNorm(12)
        self.rms = nn.RMSNorm(12)
        self.gn = nn.GroupNorm(2, 6)
        self.pos = nn.Parameter(torch.zeros(1, 5, 12))
        self.scale = nn.Parameter(torch.ones(12))
        self.fc = nn.Linear(12, 12)
        self.out_a = nn.Linear(12, 7)
        self.out_b = nn.Linear(6, 3)

    def forward(self, ids):  # ids: (5, B)
        x = self.emb(ids) + self.pos.transpose(0, 1) + self.bag(ids.T)[None]
        x = x + self.attn(x, x, x)[0]
        kv = torch.zeros(3, ids.shape[1], 6)
        x = x + self.cross(x, kv, kv)[0]
        y, _ = self.gru(self.lstm(x)[0])  # (5, B, 16)
        x = x + self.bilinear(y, y)
        x = self.rms(self.ln(x)) * self.scale
        c = self.depthwise(self.conv(x.permute(1, 2, 0)))  # (B, 12, 5)
        c = self.gn(self.bn(self.up(self.grouped(c))))  # (B, 6, 10)
        return self.out_a(self.fc(x)), self.out_b(c.mean(-1))


LAYER_TABLE = [
    # name pattern, role, norm, norm_kwargs, init() touches it
    (r"emb\.weight", "input", "Spectral", {"max": True, "transpose": True}, True),
    (r"bag\.weight", "input", "Spectral", {"max": True, "transpose": True}, True),
    (r"attn\.in_proj_weight", "hidden", "Spectral", {}, True),
    (r"cross\.[qkv]_proj_weight", "hidden", "Spectral", {}, True),
    (r"(cross|attn)\.out_proj\.weight", "hidden", "Spectral", {}, True),
    (r"cross\.bias_[kv]", "vector", "BiasRMS", {}, False),  # learned key/value tokens
    (r"lstm\.weight_(ih|hh|hr)_l0", "hidden", "Spectral", {}, True),
    (r"gru\.weight_(ih|hh)_l0(_reverse)?", "hidden", "Spectral", {}, True),
    (r"bilinear\.weight", "hidden", "SpectralConv", {}, True),
    (r"conv\.weight", "hidden", "SpectralConv", {}, True),
    (r"depthwise\.weight", "hidden", "SpectralConv", {"groups": 12}, True),
    (r"grouped\.weight", "hidden", "SpectralConv", {"groups": 4}, True),
    (r"up\.weight", "hidden", "SpectralConv", {"groups": 2, "transpose": True}, True),
    (r"fc\.weight", "hidden", "Spectral", {}, True),
    (r"out_[ab]\.weight", "head", "Sign", {"zero_init": True}, True),
    (r"(bn|ln|rms|gn)\.weight", "vector", "BiasRMS", {}, False),
    (r"pos|scale", "vector", "BiasRMS", {}, False),
    (
        r"\w+\.(bias|in_proj_bias|out_proj\.bias|bias_(ih|hh)_l0(_reverse)?)",
        "vector",
        "BiasRMS",
        {},
        True,
    ),  # fmt: skip
]


def layers_model():
    torch.manual_seed(0)
    return Layers()


def ids():
    return torch.randint(0, 20, (5, 2), generator=torch.Generator().manual_seed(0))


def test_every_torch_layer_type_grouped_by_its_type():
    model = layers_model()
    groups = no_warnings(param_groups, model, "mlp", example_inputs=ids())
    assert_table(groups, LAYER_TABLE)
    opt = Scion(groups, lr=0.01)
    model(ids())[0].sum().backward()
    opt.step()


def test_stock_recipes_orthogonalize_overlapping_convs_per_tap():
    """Convs whose windows overlap (stride < kernel) get ``per_tap``; 1×1 convs and a
    ConvTranspose with stride = kernel stay one matrix. Conv weights take the role's
    ``conv_scale``, matrices its ``scale``; the authors' recipes never set ``per_tap``."""
    overlaps = {n: lay.overlaps for n, lay in describe(layers_model()).items()}
    assert overlaps["conv.weight"] and overlaps["depthwise.weight"]
    assert not (overlaps["grouped.weight"] or overlaps["up.weight"] or overlaps["fc.weight"])
    got = by_name(no_warnings(param_groups, layers_model(), "stock-cnn", example_inputs=ids()))
    assert got["conv.weight"][1:4] == ("SpectralConv", {"per_tap": True}, 128.0)
    assert got["depthwise.weight"][1:4] == ("SpectralConv", {"groups": 12, "per_tap": True}, 128.0)
    assert got["grouped.weight"][1:4] == ("SpectralConv", {"groups": 4}, 2.0)  # 1×1: a matrix
    assert got["up.weight"][2] == {"groups": 2, "transpose": True}
    assert got["fc.weight"][1:4] == ("Spectral", {}, 2.0)
    got = by_name(
        param_groups(
            layers_model(),
            "stock-cnn",
            example_inputs=ids(),
            overrides={"hidden": {"scale": 4.0, "conv_scale": 8.0}},
        )
    )
    assert (got["conv.weight"][3], got["fc.weight"][3]) == (8.0, 4.0)
    got = by_name(param_groups(layers_model(), "cnn", example_inputs=ids()))
    assert got["conv.weight"][1:3] == ("SpectralConv", {})
    # A role that sets per_tap itself is not overridden.
    got = by_name(
        param_groups(
            layers_model(),
            "stock-cnn",
            example_inputs=ids(),
            overrides={"hidden": {"norm_kwargs": {"per_tap": False}}},
        )
    )
    assert got["conv.weight"][2] == {"per_tap": False}


def test_split_fused_orthogonalizes_each_block():
    groups = no_warnings(
        param_groups, layers_model(), "mlp", example_inputs=ids(), split_fused=True
    )
    got = by_name(groups)
    assert got["attn.in_proj_weight"][2] == {"split": (12, 12, 12)}
    assert got["lstm.weight_ih_l0"][2] == {"split": (8, 8, 8, 8)}
    assert got["gru.weight_hh_l0_reverse"][2] == {"split": (8, 8, 8)}
    assert got["lstm.weight_hr_l0"][2] == {}


def test_heads_found_by_running_the_model():
    model = layers_model()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d))}
    heads, order = output_layers(model, layers, ids())
    assert sorted(heads) == ["out_a", "out_b"]
    assert order.index("conv") < order.index("depthwise") < order.index("out_b")
    assert model.training  # flags restored


def test_without_inputs_the_head_is_the_last_layer():
    groups = param_groups(layers_model(), "mlp")
    heads = [n for n, v in by_name(groups).items() if v[0] == "head"]
    assert heads == ["out_b.weight"]


def test_a_model_that_fails_to_run_warns_and_falls_back():
    with pytest.warns(UserWarning, match="could not run the model"):
        groups = param_groups(layers_model(), "mlp", example_inputs=torch.zeros(3))
    assert [n for n, v in by_name(groups).items() if v[0] == "head"] == ["out_b.weight"]


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.norm = nn.Linear(4, 8), nn.Linear(8, 4), nn.LayerNorm(4)

    def forward(self, x):
        return self.norm(x + self.b(torch.relu(self.a(x))))


class DirectTie(nn.Module):
    """Logits as ``h @ wte.weightᵀ``: the embedding is the head, with no head module."""

    def __init__(self):
        super().__init__()
        self.wte, self.fc, self.norm = nn.Embedding(10, 6), nn.Linear(6, 6), nn.LayerNorm(6)

    def forward(self, idx):
        return self.norm(self.fc(self.wte(idx))) @ self.wte.weight.T


def test_backbone_has_no_traced_head_and_direct_tie_is_found():
    layers = {"a": (m := Backbone()).a, "b": m.b}
    assert output_layers(m, layers, torch.randn(2, 4))[0] == []
    d = DirectTie()
    heads, _ = output_layers(d, {"wte": d.wte, "fc": d.fc}, torch.zeros(2, 3, dtype=torch.long))
    assert heads == ["wte"]


class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = nn.Parameter(torch.randn(6, 4))
        self.cube = nn.Parameter(torch.randn(2, 3, 4))
        self.fc = nn.Linear(4, 4)


def test_unknown_parameters_warn_by_name_and_roles_override():
    with pytest.warns(UserWarning, match=r"no rule knows the layout of mix .*; cube "):
        groups = param_groups(Odd(), "mlp")
    got = by_name(groups)
    assert got["mix"][:3] == ("hidden", "Spectral", {})
    assert got["cube"][:3] == ("hidden", "Spectral", {"batch_dims": 1})
    groups = no_warnings(param_groups, Odd(), "mlp", roles={"mix": "vector", "cube": "vector"})
    assert by_name(groups)["mix"][:2] == ("vector", "BiasRMS")


class Experts(nn.Module):
    """transformers-5 style experts: ``is_transposed`` says how the 3-D weights are stored."""

    def __init__(self, transposed):
        super().__init__()
        self.is_transposed = transposed
        shape = (4, 6, 10) if transposed else (4, 10, 6)
        self.up = nn.Parameter(torch.randn(shape))


class Router(nn.Module):
    def __init__(self):
        super().__init__()
        self.num_experts = 4
        self.weight = nn.Parameter(torch.randn(4, 6))


@pytest.mark.parametrize("transposed", [False, True])
def test_experts_and_router(transposed):
    model = nn.ModuleDict({"experts": Experts(transposed), "router": Router()})
    got = by_name(no_warnings(param_groups, model, "gpt", head=[], input=[]))
    want = {"batch_dims": 1, **({"transpose": True} if transposed else {})}
    assert got["experts.up"][:3] == ("hidden", "Spectral", want)
    assert got["router.weight"][:3] == ("hidden", "Spectral", {})
    norm = make_norm("Spectral", want)
    assert norm.dims(model["experts"].up.shape) == (10, 6)


def test_norm_layouts_match_the_layers_true_map():
    """The LMO each layout option gives equals the plain norm's on the true matrices."""
    g = torch.randn(10, 6, dtype=torch.float64)
    svd = {"polar": "svd"}
    torch.testing.assert_close(
        Spectral(transpose=True, **svd).lmo(g.T.contiguous()), Spectral(**svd).lmo(g).T
    )
    split = Spectral(split=(4, 6), **svd).lmo(g)
    torch.testing.assert_close(
        split, torch.cat([Spectral(**svd).lmo(g[:4]), Spectral(**svd).lmo(g[4:])])
    )
    conv = torch.randn(6, 2, 3, dtype=torch.float64)  # Conv1d(6, 6, 3, groups=3)
    got = SpectralConv(groups=3, **svd).lmo(conv)
    want = torch.cat([SpectralConv(**svd).lmo(c) for c in conv.split(2)])
    torch.testing.assert_close(got, want)
    # ConvTranspose1d(4, 6, 3, groups=2): weight (4, 3, 3); per group the (3, 2·3) matrix of
    # output channel × (input channel, tap).
    w = torch.randn(4, 3, 3, dtype=torch.float64)
    got = SpectralConv(groups=2, transpose=True, **svd).lmo(w)
    for k in range(2):
        block = w[2 * k : 2 * k + 2]  # (in 2, out 3, tap 3)
        m = block.transpose(0, 1).reshape(3, 6)
        want = Spectral(**svd).lmo(m) * math.sqrt(6 / 3) * math.sqrt(3 / 2) / 3
        torch.testing.assert_close(got[2 * k : 2 * k + 2], want.reshape(3, 2, 3).transpose(0, 1))


@pytest.mark.parametrize(
    "shape, groups, transpose",
    [
        ((8, 4, 3, 3), 1, False),
        ((8, 2, 3, 3), 4, False),
        ((6, 1, 5), 6, False),  # depthwise: each tap a 1×1 matrix, the LMO a sign
        ((5, 7, 2, 3, 3), 1, False),
        ((16, 3, 7, 7), 1, False),  # a stem: tall taps
        ((4, 6, 3, 3), 1, True),
        ((6, 2, 3), 3, True),
    ],
)
def test_per_tap_orthogonalizes_each_kernel_tap(shape, groups, transpose):
    """``SpectralConv(per_tap=True)``: per group and tap, ``polar(W[:, :, t])·√(d_out/d_in)/K``
    (float64 SVD); the init is a fixed point of the LMO (it lies on the norm's unit sphere)."""
    g = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    norm = SpectralConv(groups=groups, transpose=transpose, per_tap=True, polar="svd")
    by_tap = (  # (groups, taps, d_out, d_in)
        g.reshape(groups, shape[0] // groups, shape[1], -1).permute(0, 3, 2, 1)
        if transpose
        else g.reshape(groups, shape[0] // groups, shape[1], -1).permute(0, 3, 1, 2)
    )
    u, _, vh = torch.linalg.svd(by_tap, full_matrices=False)
    d_out, d_in, taps = by_tap.shape[2], by_tap.shape[3], by_tap.shape[1]
    want = (u @ vh) * math.sqrt(d_out / d_in) / taps
    want = want.permute(0, 3, 2, 1) if transpose else want.permute(0, 2, 3, 1)
    torch.testing.assert_close(norm.lmo(g), want.reshape(shape), rtol=1e-12, atol=1e-12)
    assert norm.dims(shape) == (d_out, d_in) and not norm.plain_reshape()
    w = norm.init(torch.empty(shape, dtype=torch.float64))
    torch.testing.assert_close(norm.lmo(w), w, rtol=1e-9, atol=1e-9)
    torch.manual_seed(0)
    a = SpectralConv(groups=groups, transpose=transpose).init(torch.empty(shape))
    torch.manual_seed(0)
    b = norm.init(torch.empty(shape))
    assert torch.equal(a, b)  # the same init: orthogonal per tap


def test_init_keeps_gains_and_zeroes_untied_heads():
    model = layers_model()
    opt = Scion(param_groups(model, "mlp", example_inputs=ids()), lr=0.1)
    opt.init()
    for norm in (model.ln, model.rms, model.bn, model.gn):
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    assert torch.equal(model.scale, torch.ones(12))
    assert torch.equal(model.out_a.weight, torch.zeros(7, 12))
    assert torch.equal(model.fc.bias, torch.zeros(12))
    sv = torch.linalg.svdvals(model.fc.weight.double())
    torch.testing.assert_close(sv, torch.ones_like(sv), rtol=0, atol=1e-6)  # float32 QR


def test_format_groups_says_what_init_does():
    text = format_groups(param_groups(layers_model(), "mlp", example_inputs=ids()))
    rows = {line.split()[0]: line.split() for line in text.splitlines()[2:]}
    # After the lr multiple (×1 for every role: no tied head), what init() does.
    after = {name: r[r.index("×1") + 1] for name, r in rows.items()}
    assert after["ln.weight"] == "kept" and after["ln.bias"] == "norm"


# --------------------------------------------------------------------------- schedulers
def test_momentum_cycling_scheduler_is_refused_and_the_fix_works():
    w = nn.Parameter(torch.randn(4, 4))
    opt = Scion([w], lr=0.01, momentum=0.1)
    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=10)
    w.grad = torch.randn(4, 4)
    before = w.detach().clone()
    with pytest.raises(ValueError, match="cycle_momentum=False"):
        opt.step()
    assert torch.equal(w, before)
    opt = Scion([w], lr=0.01, momentum=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=0.01, total_steps=10, cycle_momentum=False
    )
    opt.step()
    sched.step()
    assert opt.param_groups[0]["momentum"] == 0.1


# ----------------------------------------------------------------------- HF transformers
def _hf():
    return pytest.importorskip("transformers", reason="transformers is not installed")


def _quiet(hf):
    hf.logging.set_verbosity_error()
    return hf


GPT2_TABLE = [
    (r"transformer\.wte\.weight", "head", "Sign", {}, False),  # tied with lm_head, kept
    (r"transformer\.wpe\.weight", "input", "Sign", {"normalized": False, "transpose": True}, False),
    (r".*\.(c_attn|c_proj|c_fc)\.weight", "hidden", "Spectral", {"transpose": True}, True),
    (r".*ln_.*\.weight", "vector", "BiasRMS", {}, False),
    (r".*\.bias", "vector", "BiasRMS", {}, True),
]


def test_hf_gpt2_conv1d_is_transposed_and_the_tied_head_kept():
    hf = _quiet(_hf())
    cfg = hf.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    model = hf.GPT2LMHeadModel(cfg)
    groups = no_warnings(param_groups, model, "gpt")
    assert_table(groups, GPT2_TABLE)
    for g in groups:
        norm = make_norm(g["norm"], g["norm_kwargs"])
        for name, p in zip(g["param_names"], g["params"], strict=True):
            if name.endswith("c_fc.weight"):  # stored (16, 64): Linear 16 → 64
                assert p.shape == (16, 64) and norm.dims(p.shape) == (64, 16)
                assert norm.scale_for(p.shape) == pytest.approx(2.0)


def test_hf_double_heads_bert_and_moe():
    hf = _quiet(_hf())
    gpt = hf.GPT2DoubleHeadsModel(
        hf.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    )
    got = by_name(no_warnings(param_groups, gpt, "gpt"))
    assert got["transformer.wte.weight"][0] == "head"
    assert got["multiple_choice_head.summary.weight"][:3] == ("head", "Sign", {"zero_init": True})

    bert = hf.BertForPreTraining(
        hf.BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        )  # fmt: skip
    )
    got = by_name(no_warnings(param_groups, bert, "gpt"))
    heads = sorted(n for n, v in got.items() if v[0] == "head")
    assert heads == ["bert.embeddings.word_embeddings.weight", "cls.seq_relationship.weight"]
    assert got["bert.pooler.dense.weight"][0] == "hidden"

    mix = hf.MixtralForCausalLM(hf.MixtralConfig(**SMALL_DECODER, num_local_experts=4))
    groups = no_warnings(param_groups, mix, "gpt")
    assert_table(
        groups,
        [
            (
                r"model\.embed_tokens\.weight",
                "input",
                "Sign",
                {"normalized": False, "transpose": True},
                True,
            ),
            (r"lm_head\.weight", "head", "Sign", {"zero_init": True}, True),
            (r".*experts\.(gate_up_proj|down_proj)", "hidden", "Spectral", {"batch_dims": 1}, True),
            (r".*(q|k|v|o)_proj\.weight|.*mlp\.gate\.weight", "hidden", "Spectral", {}, True),
            (r".*norm\.weight", "vector", "BiasRMS", {}, False),
        ],  # fmt: skip
    )


def test_hf_qwen2_moe_shared_expert_and_router():
    hf = _quiet(_hf())
    cfg = hf.Qwen2MoeConfig(
        **SMALL_DECODER, moe_intermediate_size=8, shared_expert_intermediate_size=16, num_experts=4
    )
    got = by_name(no_warnings(param_groups, hf.Qwen2MoeForCausalLM(cfg)))
    experts = {n: v for n, v in got.items() if ".experts." in n}
    assert experts and all(
        v[:3] == ("hidden", "Spectral", {"batch_dims": 1}) for v in experts.values()
    )
    assert got["model.layers.0.mlp.gate.weight"][:3] == ("hidden", "Spectral", {})
    assert got["model.layers.0.mlp.shared_expert_gate.weight"][:2] == ("hidden", "Spectral")
    assert got["model.embed_tokens.weight"][:3] == ("input", "ColNorm", {"transpose": True})
    assert got["lm_head.weight"][:3] == ("head", "Sign", {"zero_init": True})


#: A one-layer decoder (Llama, Mixtral) with grouped-query attention.
SMALL_DECODER = dict(
    vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=1,
)  # fmt: skip


def _train(model, loss_fn, steps, init, recipe, lr):
    groups = param_groups(model, recipe)
    opt = Scion(groups, lr=lr, momentum=0.1)
    if init:
        opt.init()
    losses = []
    for _ in range(steps):
        loss = loss_fn(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("init", [False, True], ids=["model-init", "scion-init"])
def test_hf_llama_trains_with_and_without_init(init):
    hf = _quiet(_hf())
    torch.manual_seed(0)
    model = hf.LlamaForCausalLM(hf.LlamaConfig(**SMALL_DECODER))
    ids = torch.arange(32).repeat(2, 1)[:, :16]  # a sequence to memorize: t → t + 1

    losses = _train(model, lambda m: m(input_ids=ids, labels=ids).loss, 30, init, "stock", 2**-5)
    assert losses[-1] < 0.5 * losses[0]


def test_stock_recipe_gives_a_tied_head_the_embeddings_norm():
    hf = _quiet(_hf())
    cfg = hf.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    got = by_name(no_warnings(param_groups, hf.GPT2LMHeadModel(cfg)))
    colnorm = ("input", "ColNorm", {"transpose": True}, 1.0, False)
    assert got["transformer.wte.weight"] == colnorm  # tied to lm_head: kept by init()
    assert got["transformer.wpe.weight"] == colnorm
    assert not any(v[0] == "head" for v in got.values())


# ------------------------------------------------------------------------------------ timm
def _timm():
    try:
        import timm
    except Exception as e:  # noqa: BLE001 - without torchvision timm fails to import
        pytest.skip(f"timm does not import here: {type(e).__name__}: {e}")
    return timm


@pytest.mark.parametrize(
    "name, heads, grouped",
    [
        ("resnet18", ["fc.weight"], 0),
        ("convnext_atto", ["head.fc.weight"], 12),
        ("deit_tiny_distilled_patch16_224", ["head.weight", "head_dist.weight"], 0),
    ],
)
def test_timm_models(name, heads, grouped):
    timm = _timm()
    model = timm.create_model(name, num_classes=5)
    got = by_name(no_warnings(param_groups, model, "vit"))
    assert sorted(n for n, v in got.items() if v[0] == "head") == heads
    assert sum(1 for v in got.values() if "groups" in v[2]) == grouped
    for n, p in model.named_parameters():
        lay = describe(model)[n]
        if p.ndim >= 2 and lay.kind in ("matrix", "conv"):
            assert got[n][0] in ("input", "hidden", "head"), n
        if lay.kind == "gain":
            assert got[n][4] is False, n


# ----------------------------------------------------------------------------- torchvision
def _torchvision():
    try:
        import torchvision
    except Exception as e:  # noqa: BLE001 - PyPI's build fails beside torch 2.13's CPU build
        pytest.skip(f"torchvision does not import here: {type(e).__name__}: {e}")
    return torchvision


def _tv_resnet(tv):
    return tv.models.resnet18(num_classes=5), "stock-cnn"


def _tv_vit(tv):
    vit = tv.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=5,
    )  # fmt: skip
    return vit, "stock-vit"


def _tv_mobilenet(tv):
    return tv.models.mobilenet_v3_small(num_classes=5), "stock-cnn"


TV_ATTN = "encoder.layers.encoder_layer_0.self_attention"
DW_16 = {"groups": 16, "per_tap": True}  # a depthwise 3×3 conv of 16 channels


@pytest.mark.parametrize(
    "build, expect",
    [
        # parameter → (role, norm, options, radius, init touches it)
        (
            _tv_resnet,
            {
                "conv1.weight": ("input", "SpectralConv", {"per_tap": True}, 128.0, True),
                "layer1.0.conv1.weight": ("hidden", "SpectralConv", {"per_tap": True}, 128.0, True),
                "layer2.0.downsample.0.weight": ("hidden", "SpectralConv", {}, 2.0, True),
                "layer1.0.bn1.weight": ("vector", "BiasRMS", {}, 0.3, False),
                "fc.weight": ("head", "Sign", {"zero_init": True}, 32.0, True),
            },
        ),
        (
            _tv_vit,
            {
                "conv_proj.weight": ("input", "SpectralConv", {}, 2.0, True),  # patchify
                f"{TV_ATTN}.in_proj_weight": ("hidden", "Spectral", {}, 2.0, True),
                "class_token": ("vector", "BiasRMS", {}, 0.1, False),
                "encoder.pos_embedding": ("vector", "BiasRMS", {}, 0.1, False),
                "heads.head.weight": ("head", "Sign", {"zero_init": True}, 32.0, True),
            },
        ),
        (
            _tv_mobilenet,
            {
                "features.1.block.0.0.weight": ("hidden", "SpectralConv", DW_16, 128.0, True),
                "features.1.block.1.fc1.weight": ("hidden", "SpectralConv", {}, 2.0, True),
                "classifier.0.weight": ("hidden", "Spectral", {}, 2.0, True),
                "classifier.3.weight": ("head", "Sign", {"zero_init": True}, 32.0, True),
            },
        ),
    ],
    ids=["resnet18", "vit", "mobilenet_v3_small"],
)
def test_torchvision_models(build, expect):
    """Stock torchvision models: the groups of named parameters, every weight in a layer role
    with no warning, and one step after ``init()`` stays finite."""
    model, recipe = build(_torchvision())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    groups = no_warnings(param_groups, model, recipe, example_inputs=x)
    got = by_name(groups)
    for name, want in expect.items():
        assert got[name] == want, name
    for n, p in model.named_parameters():
        assert p.ndim < 2 or got[n][0] in ("input", "hidden", "head", "vector"), n
        if describe(model)[n].kind in ("matrix", "conv"):
            assert got[n][0] != "vector", n
    opt = Scion(groups, lr=RECIPES[recipe].lr, momentum=RECIPES[recipe].momentum)
    opt.init()
    model.train()
    nn.functional.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Spectral(split=()), "split"),
        (lambda: Spectral(split=(0, 2)), "split size"),
        (lambda: Spectral(split=(True,)), "split size"),
        (lambda: Spectral(split=3), "split"),
        (lambda: SpectralConv(groups=0), "groups"),
    ],
)
def test_layout_options_are_checked(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_layout_options_that_do_not_fit_the_shape():
    assert "does not sum to d_out" in Spectral(split=(2, 2)).fits((5, 3))
    assert "does not divide" in SpectralConv(groups=3).fits((8, 2, 3))


# ------------------------------------------------ real models II: what a parameter does
def _tiny(name: str) -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    """A tiny random model of the family ``name`` and its loss on synthetic data."""
    hf = _quiet(_hf())
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 99, (2, 8), generator=gen)
    if name == "clip":
        text = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                    num_attention_heads=4, max_position_embeddings=16)  # fmt: skip
        vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                      num_attention_heads=4, image_size=16, patch_size=8)  # fmt: skip
        cfg = hf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
        images = torch.randn(2, 3, 16, 16, generator=gen)
        return hf.CLIPModel(
            cfg
        ), lambda m: m(input_ids=ids, pixel_values=images, return_loss=True).loss
    if name == "mamba":
        cfg = hf.MambaConfig(vocab_size=99, hidden_size=32, state_size=8, num_hidden_layers=2)
        return hf.MambaForCausalLM(cfg), lambda m: m(input_ids=ids, labels=ids).loss
    if name == "swin":
        cfg = hf.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                            num_heads=[2, 2], window_size=4, num_labels=5)  # fmt: skip
        images, labels = torch.randn(2, 3, 32, 32, generator=gen), torch.tensor([1, 3])
        return hf.SwinForImageClassification(
            cfg
        ), lambda m: m(pixel_values=images, labels=labels).loss
    if name == "t5":
        cfg = hf.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=1,
                          num_heads=4, decoder_start_token_id=0)  # fmt: skip
        return hf.T5ForConditionalGeneration(cfg), lambda m: m(input_ids=ids, labels=ids).loss
    if name == "whisper":
        cfg = hf.WhisperConfig(vocab_size=99, d_model=32, encoder_layers=1, decoder_layers=1,
                               encoder_attention_heads=4, decoder_attention_heads=4,
                               encoder_ffn_dim=37, decoder_ffn_dim=37, num_mel_bins=8,
                               max_source_positions=16, max_target_positions=16,
                               decoder_start_token_id=0, pad_token_id=0)  # fmt: skip
        features = torch.randn(2, 8, 32, generator=gen)
        return hf.WhisperForConditionalGeneration(
            cfg
        ), lambda m: m(input_features=features, labels=ids).loss
    raise ValueError(name)


#: Per family: ``(parameter-name pattern, role, norm)`` rows that must hold (``norm`` None:
#: any), and the roles no parameter may have.
FAMILIES = {
    "clip": (
        [
            (r"(visual|text)_projection\.weight", "hidden", "Spectral"),
            (r"logit_scale", "free", "BiasRMS"),
            (r"vision_model\.embeddings\.patch_embedding\.weight", "input", "SpectralConv"),
            (r"text_model\.embeddings\.token_embedding\.weight", "input", "ColNorm"),
        ],
        {"head"},  # both outputs are L2-normalized: nothing of a head's scale reaches them
    ),
    "mamba": (
        [
            (r".*mixer\.(A_log|D|dt_proj\.bias)", "free", "BiasRMS"),
            (r".*mixer\.(in_proj|x_proj|dt_proj|out_proj)\.weight", "hidden", "Spectral"),
            (r".*mixer\.conv1d\.weight", "hidden", "SpectralConv"),
        ],
        set(),
    ),
    "swin": (
        [
            (r".*relative_position_bias_table", "free", "BiasRMS"),
            (r".*patch_embeddings\.projection\.weight", "input", "SpectralConv"),
            (r"classifier\.weight", "head", "Sign"),
        ],
        set(),
    ),
    "t5": (
        [
            (r".*relative_attention_bias\.weight", "free", "BiasRMS"),
            (r"shared\.weight", "input", "ColNorm"),
            (r".*(q|k|v|o|wi|wo)\.weight", "hidden", "Spectral"),
        ],
        set(),
    ),
    "whisper": (
        [
            (r"model\.encoder\.conv1\.weight", "input", "SpectralConv"),
            (r"model\.encoder\.conv2\.weight", "hidden", "SpectralConv"),
            (r"model\.decoder\.embed_tokens\.weight", "input", "ColNorm"),
        ],
        set(),
    ),
}


#: Per family, parameters whose radius is the stock one times a factor (see
#: ``test_a_tied_head_that_reads_a_rescaled_input``).
READ_SCALED = {"t5": {"shared.weight": 32**0.5}}

#: The families whose head is tied to their token embedding: their roles step at the stock
#: recipe's ``tied_lr_scale``; the others at the optimizer's lr.
TIED = {"mamba", "t5", "whisper"}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_real_models_roles_init_and_a_step(family):
    """Each family from a tiny random config: the named parameters get the role and norm of
    what they do (no warning, no override), ``init()`` keeps every ``free`` parameter (bias
    tables, state-space parameters, temperatures) and every kept group as the model made
    them, and steps after ``init()`` are finite and move the free parameters."""
    torch.manual_seed(0)
    model, loss_fn = _tiny(family)
    groups = no_warnings(param_groups, model)
    got = by_name(groups)
    rows, banned = FAMILIES[family]
    for pattern, role, norm in rows:
        matched = {n: v for n, v in got.items() if re.fullmatch(pattern, n)}
        assert matched, (family, pattern)
        for name, (r, nm, _, _, _) in matched.items():
            assert (r, nm) == (role, norm), (name, r, nm)
    assert not banned & {v[0] for v in got.values()}, family
    stock = RECIPES["stock"]
    for g in groups:
        want = getattr(stock, g["role"]).scale_of(g["norm"], g["params"][0].shape)
        # T5's tied head reads its input times d_model^-½ (32 here): the shared matrix's
        # radius makes up for it.
        want *= READ_SCALED.get(family, {}).get(g["param_names"][0], 1.0)
        assert g["scale"] == pytest.approx(want, rel=1e-3), (g["role"], g["param_names"])
        if g["role"] == "free":
            assert g.get("init") is False and g.get("unconstrained") is True, g["param_names"]
        lr_scale = stock.tied_lr_scale.get(g["role"], 1.0) if family in TIED else 1.0
        assert g.get("lr_scale", 1.0) == lr_scale, (family, g["role"], g.get("lr_scale"))
    params = dict(model.named_parameters())
    kept = {n: params[n].detach().clone() for g in groups if g.get("init") is False
            for n in g["param_names"]}  # fmt: skip
    opt = Scion(groups, lr=2**-6, momentum=0.1)
    opt.init()
    for name, before in kept.items():
        assert torch.equal(params[name], before), f"init() overwrote {name}"
    for _ in range(2):  # a zeroed head passes no gradient down on the first step
        loss = loss_fn(model)
        assert torch.isfinite(loss), (family, loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert all(torch.isfinite(p).all() for p in model.parameters()), family
    free = [n for g in groups if g["role"] == "free" for n in g["param_names"]]
    moved = [n for n in free if not torch.equal(params[n], kept[n]) or params[n].grad is None]
    assert moved == free, set(free) - set(moved)
    assert torch.isfinite(loss_fn(model)), family


class _TiedLM(nn.Module):
    """Token embedding, one hidden layer and a norm, then a head tied to the embedding (or
    not) that reads the norm's output times ``read``, as T5 does with ``d_model^-½``."""

    def __init__(self, read: float, tied: bool = True, vocab: int = 11, d: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight
        self.read = read

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.mix(self.embed(ids))) * self.read)


@pytest.mark.parametrize("read", [0.0, 1e-4])
def test_a_tied_head_that_reads_next_to_nothing_keeps_its_radius(read):
    """A tied head whose input is (nearly) zero in the run is no rescaled norm output: its
    radius stays the recipe's, with a warning naming it, never divided by zero."""
    ids = torch.randint(0, 11, (2, 5))
    with pytest.warns(UserWarning, match=r"tied head 'head' read an input of RMS"):
        groups = param_groups(_TiedLM(read), example_inputs=ids)
    (tied,) = [g for g in groups if "embed.weight" in g["param_names"]]
    assert tied["scale"] == RECIPES["stock"].input.scale


@pytest.mark.parametrize("read", [1.0, 0.8, 1.3, 0.125, 1 / 6, 4.0])
def test_a_tied_head_that_reads_a_rescaled_input(read):
    """A head tied to the embedding that reads its input rescaled by a constant ``c`` (T5:
    ``d_model^-½``) gets the shared matrix's radius divided by ``c``, as measured in the run,
    so the logits have the scale the radius means; within √2 of 1 (what a norm's output
    reads) nothing changes, and an untied head keeps its radius whatever it reads."""
    ids = torch.randint(0, 11, (2, 5))
    stock = RECIPES["stock"]
    groups = param_groups(_TiedLM(read), example_inputs=ids)
    (tied,) = [g for g in groups if "embed.weight" in g["param_names"]]
    assert tied["role"] == "input" and tied.get("init") is False
    want = stock.input.scale / read if abs(math.log2(read)) > 0.5 else stock.input.scale
    assert tied["scale"] == pytest.approx(want, rel=2e-3), (read, tied["scale"])
    untied = param_groups(_TiedLM(read, tied=False), example_inputs=ids)
    scales = {g["role"]: g["scale"] for g in untied}
    assert scales["input"] == stock.input.scale and scales["head"] == stock.head.scale


def test_init_refuses_meta_parameters_at_once():
    """``init()`` on ``meta`` parameters (a model built for its shapes only) raises before
    writing anything, naming them."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = Scion(param_groups(model, "mlp", example_inputs=False), lr=0.1)
    with pytest.raises(ValueError, match=r"0\.weight.*meta device.*to_empty"):
        opt.init()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (3, 5, 4), (1, 7)], ids=str)
def test_random_orthogonal_and_init_precision(dtype, shape):
    """``random_orthogonal`` gives orthonormal rows (wide) or columns (tall) per matrix, in
    float64 for float64 and float32 otherwise; ``init`` rounds it once to the parameter's
    dtype."""
    from scion_kernels.norms import Spectral, init_dtype, random_orthogonal

    w = torch.empty(shape, dtype=dtype)
    q = random_orthogonal(shape, w.device, init_dtype(w))
    assert q.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    gram = q @ q.mT if shape[-2] <= shape[-1] else q.mT @ q
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(gram, torch.eye(gram.shape[-1], dtype=q.dtype).expand_as(gram),
                               rtol=0, atol=tol)  # fmt: skip
    if len(shape) == 2:
        Spectral().init(w)
        sv = torch.linalg.svdvals(w.double())
        s = (shape[0] / shape[1]) ** 0.5
        bound = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
        torch.testing.assert_close(sv, torch.full_like(sv, s), rtol=bound, atol=0)


def test_normalized_outputs_have_no_head_and_raw_input_layers_are_inputs():
    """Run once: a layer whose output reaches the outputs only divided by its own norm is not
    a head (``F.normalize``, or ``x / x.pow(2).sum().sqrt()``); a layer that reads a model
    input itself is an input layer beside the embeddings."""
    from scion_kernels.layers import layer_modules, run_layers

    class TwoTowers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(20, 8)
            self.img = nn.Conv2d(3, 8, 4, stride=4)
            self.proj_a, self.proj_b = nn.Linear(8, 6), nn.Linear(8, 6)
            self.scale = nn.Parameter(torch.tensor(2.0))

        def forward(self, ids, images):
            a = self.proj_a(self.tok(ids).mean(1))
            b = self.proj_b(self.img(images).mean((2, 3)))
            a = nn.functional.normalize(a, dim=-1)
            b = b / b.pow(2).sum(-1, keepdim=True).sqrt()
            return a @ b.T * self.scale.exp()

    model = TwoTowers()
    inputs = (torch.randint(0, 20, (2, 5)), torch.randn(2, 3, 8, 8))
    run = run_layers(model, layer_modules(model), inputs)
    assert run.heads == [] and set(run.normalized) == {"proj_a", "proj_b"}
    assert set(run.fed) == {"tok", "img"}
    got = by_name(no_warnings(param_groups, model, example_inputs=inputs))
    assert {n: v[0] for n, v in got.items() if v[0] != "vector"} == {
        "tok.weight": "input", "img.weight": "input", "proj_a.weight": "hidden",
        "proj_b.weight": "hidden", "scale": "free",
    }  # fmt: skip


def test_example_inputs_for_composite_configs():
    """Inputs derived from ``text_config``/``vision_config`` (CLIP: both towers),
    encoder–decoder configs (T5: decoder ids) and audio configs (Whisper: features)."""
    hf_models = {f: _tiny(f)[0] for f in ("clip", "t5", "whisper")}
    from scion_kernels.layers import example_inputs_for

    keys = {f: sorted(example_inputs_for(m)) for f, m in hf_models.items()}
    assert keys == {
        "clip": ["input_ids", "pixel_values"],
        "t5": ["decoder_input_ids", "input_ids"],
        "whisper": ["decoder_input_ids", "input_features"],
    }
