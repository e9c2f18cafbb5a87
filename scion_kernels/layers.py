"""What each parameter of a model is, read from its module's type: its kind, and how it is stored.

:func:`describe` returns one :class:`Layout` per parameter. The rules, by module type:

=========================================  ====================================================
module                                     parameter → kind (layout options of its norm)
=========================================  ====================================================
``nn.Linear`` (and subclasses)             ``weight`` → matrix ``(d_out, d_in)``
HF ``Conv1D`` (GPT-2, GPT-J style)         ``weight`` → matrix stored ``(d_in, d_out)``
                                           (``transpose=True``)
``nn.Conv{1,2,3}d``                        ``weight`` → conv (``groups``: one LMO per group;
                                           :attr:`Layout.overlaps` if stride < kernel)
``nn.ConvTranspose{1,2,3}d``               ``weight`` → conv (``groups``, ``transpose=True``;
                                           ``overlaps`` likewise)
``nn.Bilinear``                            ``weight`` ``(d_out, d_in1, d_in2)`` → conv (the
                                           second input as its kernel)
``nn.Embedding``, ``nn.EmbeddingBag``      ``weight`` → embedding ``(vocab, dim)``, a map from
                                           one-hot tokens stored ``(d_in, d_out)``
                                           (``transpose=True``)
``nn.MultiheadAttention``                  ``in_proj_weight`` → matrix (``split`` into Q, K,
                                           V with ``split_fused=True``), ``{q,k,v}_proj_weight``
                                           → matrices; ``bias_k``/``bias_v`` → vector
``nn.LSTM``/``nn.GRU``/``nn.RNN``          ``weight_ih_l*``, ``weight_hh_l*`` → matrices
                                           (``split`` per gate with ``split_fused=True``),
                                           ``weight_hr_l*`` → matrix
experts with ``is_transposed`` (HF MoE)    3-D weights → stacked matrices ``(E, d_out, d_in)``
                                           (``batch_dims=1``, ``transpose`` as the module says)
a module with ``num_experts`` (MoE router)  ``weight`` ``(num_experts, d_in)`` → matrix
normalization layers                       ``weight`` → gain, ``bias`` → bias (BatchNorm,
                                           LayerNorm, GroupNorm, RMSNorm, InstanceNorm, and any
                                           module whose class name contains ``Norm`` and whose
                                           parameters are all 1-D)
a parameter with a meaning of its own      → free: attention bias tables (``relative_position_
                                           bias_table``, ``relative_attention_bias``,
                                           ``rel_pos*``), state-space ``A_log``, ``D``,
                                           ``dt_bias``, ``dt_proj.bias``, temperatures
                                           (``logit_scale``, ``logit_bias``), any scalar
any module                                 a parameter named ``bias`` → bias; other 1-D
                                           parameters (layer scales) → vector; a parameter with
                                           leading dim 1 (a ViT's position embedding or class
                                           token ``(1, N, D)``) → vector
another module's 2-D ``weight``            matrix ``(d_out, d_in)`` as ``F.linear`` reads it
                                           (MoE routers ``(E, d)``), with a warning naming it
anything else of 2+ dims                   matrix ``(d_out, d_in)`` (2-D) or stacked matrices
                                           (more dims), with a warning naming it
=========================================  ====================================================

:func:`output_layers` finds the layers whose outputs are the model's outputs (every head,
tied or not) by running the model once on example inputs and walking its autograd graph back
from the outputs to the first layer on each path.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

__all__ = [
    "KINDS",
    "Layout",
    "describe",
    "example_inputs_for",
    "layer_modules",
    "LayerRun",
    "output_layers",
    "run_layers",
    "weight_layout",
]

#: The kinds of parameter :func:`describe` tells apart.
KINDS = ("matrix", "conv", "embedding", "gain", "bias", "vector", "free")

#: Parameters with a meaning of their own, by attribute name: what the model reads from them is
#: their value itself, not a map. Attention bias tables (added to attention logits: Swin and
#: BEiT's ``relative_position_bias_table``, T5's ``relative_attention_bias`` embedding, SAM's
#: ``rel_pos_h``/``rel_pos_w``), state-space parameters (Mamba's ``A_log`` with
#: ``A = −exp(A_log)``, its skip ``D``, the time-step bias ``dt_bias`` or ``dt_proj.bias``), and
#: temperatures (CLIP's ``logit_scale``, SigLIP's ``logit_bias``). Scalar parameters are free
#: whatever their name.
_FREE_NAMES = {
    "relative_position_bias_table": "attention bias table",
    "relative_attention_bias": "attention bias table",
    "rel_pos_h": "attention bias table",
    "rel_pos_w": "attention bias table",
    "rel_pos": "attention bias table",
    "A_log": "state-space A = −exp(A_log)",
    "dt_bias": "state-space time-step bias",
    "logit_scale": "temperature",
    "logit_bias": "logit offset",
    "temperature": "temperature",
}

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORM_LAYERS = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,
)
_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


@dataclass(frozen=True)
class Layout:
    """One parameter: its kind (see :data:`KINDS`), the layout options its norm needs
    (``transpose``, ``batch_dims``, ``split``, ``groups``), and the rule that decided it."""

    kind: str
    module: str
    rule: str
    options: Mapping[str, Any] = field(default_factory=dict)
    guessed: bool = False
    #: A conv whose windows overlap (a stride smaller than its kernel in some dimension), as
    #: opposed to a patchify conv (stride = kernel), which is a matrix on flattened patches.
    overlaps: bool = False


def _is_hf_conv1d(m: nn.Module) -> bool:
    """HF's ``Conv1D`` (``transformers.pytorch_utils``): a linear layer whose weight is
    stored ``(nx, nf)`` = ``(d_in, d_out)``."""
    w = getattr(m, "weight", None)
    return (
        type(m).__name__ == "Conv1D"
        and isinstance(w, Tensor)
        and w.ndim == 2
        and tuple(w.shape) == (getattr(m, "nx", None), getattr(m, "nf", None))
    )


def _overlaps(m: nn.Module) -> bool:
    """Whether a conv's windows overlap: a stride smaller than its kernel in some dimension."""
    return any(s < k for s, k in zip(m.stride, m.kernel_size, strict=True))


def _is_norm_layer(m: nn.Module) -> bool:
    if isinstance(m, _NORM_LAYERS):
        return True
    own = list(m.parameters(recurse=False))
    return "Norm" in type(m).__name__ and bool(own) and all(p.ndim <= 1 for p in own)


def _module_rules(m: nn.Module, fused: bool) -> dict[str, Layout] | None:
    """Layouts of ``m``'s own parameters (by attribute name) when a rule knows ``m``'s type."""
    kind_name = type(m).__name__
    if isinstance(m, nn.Linear):
        return {
            "weight": Layout(
                "matrix",
                "",
                f"nn.{kind_name}" if kind_name == "Linear" else f"{kind_name} (nn.Linear)",
            )
        }
    if _is_hf_conv1d(m):
        return {
            "weight": Layout("matrix", "", "HF Conv1D, stored (d_in, d_out)", {"transpose": True})
        }
    if isinstance(m, _CONV):
        opts = {"groups": m.groups} if m.groups > 1 else {}
        return {"weight": Layout("conv", "", f"nn.{kind_name}", opts, overlaps=_overlaps(m))}
    if isinstance(m, _CONV_T):
        opts = {"transpose": True, **({"groups": m.groups} if m.groups > 1 else {})}
        rule = f"nn.{kind_name}, stored (d_in, d_out/groups, k…)"
        return {"weight": Layout("conv", "", rule, opts, overlaps=_overlaps(m))}
    if isinstance(m, nn.Bilinear):
        return {"weight": Layout("conv", "", "nn.Bilinear, (d_out, d_in1, d_in2) as a conv")}
    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
        return {
            "weight": Layout(
                "embedding",
                "",
                f"nn.{kind_name}, (vocab, dim) = (d_in, d_out)",
                {"transpose": True},
            )
        }
    if isinstance(m, nn.MultiheadAttention):
        e = m.embed_dim
        qkv = {"split": (e, e, e)} if fused else {}
        out = {
            "in_proj_weight": Layout("matrix", "", "nn.MultiheadAttention, fused Q, K, V", qkv),
            "bias_k": Layout("vector", "", "nn.MultiheadAttention key bias token"),
            "bias_v": Layout("vector", "", "nn.MultiheadAttention value bias token"),
        }
        for p in ("q", "k", "v"):
            out[f"{p}_proj_weight"] = Layout("matrix", "", f"nn.MultiheadAttention {p}_proj")
        return out
    if isinstance(m, nn.RNNBase):
        gates = _GATES.get(m.mode, 1)
        out = {}
        for name, _ in m.named_parameters(recurse=False):
            if name.startswith(("weight_ih", "weight_hh")):
                split = {"split": (m.hidden_size,) * gates} if fused and gates > 1 else {}
                out[name] = Layout("matrix", "", f"nn.{kind_name}, {gates} gate(s) stacked", split)
            elif name.startswith("weight_hr"):
                out[name] = Layout("matrix", "", f"nn.{kind_name} projection")
        return out
    if isinstance(getattr(m, "is_transposed", None), bool):
        out = {}
        for name, p in m.named_parameters(recurse=False):
            if p.ndim == 3:
                opts = {"batch_dims": 1, **({"transpose": True} if m.is_transposed else {})}
                out[name] = Layout("matrix", "", f"{kind_name}: stacked experts", opts)
        return out
    if _is_norm_layer(m):
        return {"weight": Layout("gain", "", f"{kind_name} gain")}
    w, experts = getattr(m, "weight", None), getattr(m, "num_experts", None)
    if isinstance(w, Tensor) and w.ndim == 2 and isinstance(experts, int) and len(w) == experts:
        return {"weight": Layout("matrix", "", f"{kind_name}: MoE router (num_experts, d_in)")}
    return None


def _is_ssm(m: nn.Module) -> bool:
    """A state-space mixer (Mamba's): it holds ``A_log``."""
    return isinstance(getattr(m, "A_log", None), Tensor)


def free_layout(model_names: tuple[str, str], m: nn.Module, p: Tensor) -> Layout | None:
    """The layout of a parameter with a meaning of its own (see ``_FREE_NAMES``), or ``None``.
    ``model_names`` is ``(module name, attribute name)``."""
    mname, pname = model_names
    tail = mname.rsplit(".", 1)[-1]
    why = _FREE_NAMES.get(pname) or _FREE_NAMES.get(tail)
    if why is None and _is_ssm(m) and pname == "D":
        why = "state-space skip D"
    if why is None and pname == "bias" and tail == "dt_proj":
        why = "state-space time-step bias (dt_proj.bias)"
    if why is None and p.ndim == 0:
        why = "a scalar parameter"
    if why is None:
        return None
    return Layout("free", mname, f"{why}: {type(m).__name__}.{pname}")


def weight_layout(m: nn.Module) -> Layout | None:
    """The layout of ``m.weight`` by ``m``'s type, or ``None`` when no rule knows it."""
    return (_module_rules(m, False) or {}).get("weight")


def describe(model: nn.Module, split_fused: bool = False) -> dict[str, Layout]:
    """Every parameter of ``model`` (by its ``named_parameters`` name, tied ones once) and its
    :class:`Layout`. ``split_fused``: give fused projections (``nn.MultiheadAttention``'s
    ``in_proj_weight``, RNN gates) a ``split`` so each block is orthogonalized on its own.

    A parameter no rule knows, of 2+ dims, is described as a matrix with ``guessed=True``;
    :func:`scion_kernels.param_groups` warns about it by name."""
    owner: dict[int, tuple[str, str, nn.Module]] = {}
    for mname, m in model.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            owner.setdefault(id(p), (mname, pname, m))
    out: dict[str, Layout] = {}
    for name, p in model.named_parameters():
        mname, pname, m = owner[id(p)]
        free = free_layout((mname, pname), m, p)
        if free is not None:
            out[name] = free
            continue
        known = (_module_rules(m, split_fused) or {}).get(pname)
        if known is not None:
            out[name] = replace(known, module=mname)
            continue
        if pname == "bias" or pname.startswith("bias_") or pname.endswith("_bias"):
            out[name] = Layout("bias", mname, f"{type(m).__name__} bias")
        elif _is_norm_layer(m):
            out[name] = Layout("gain", mname, f"{type(m).__name__} parameter")
        elif p.ndim <= 1:
            out[name] = Layout("vector", mname, f"1-D parameter of {type(m).__name__}")
        elif p.shape[0] == 1:
            out[name] = Layout("vector", mname, "broadcast parameter (leading dim 1)")
        elif p.ndim == 2:
            rule = f"2-D {pname!r} of {type(m).__name__}, read as F.linear does: (d_out, d_in)"
            out[name] = Layout("matrix", mname, rule, {}, guessed=True)
        else:
            rule = f"{p.ndim}-D {pname!r} of {type(m).__name__}, read as stacked (d_out, d_in)"
            opts = {"batch_dims": p.ndim - 2}
            out[name] = Layout("matrix", mname, rule, opts, guessed=True)
    return out


def layer_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module whose ``weight`` is a matrix, conv or embedding by the rules of
    :func:`describe` (tied weights included: each module that holds one), by name."""
    out = {}
    for name, m in model.named_modules():
        rule = weight_layout(m)
        if rule is not None and rule.kind in ("matrix", "conv", "embedding"):
            if free_layout((name, "weight"), m, m.weight) is None:  # not a bias table
                out[name] = m
    return out


def warn_guessed(layouts: Mapping[str, Layout]) -> None:
    """One warning naming every parameter whose layout no rule knew."""
    guessed = [f"{n} ({lay.rule})" for n, lay in layouts.items() if lay.guessed]
    if guessed:
        warnings.warn(
            "no rule knows the layout of " + "; ".join(guessed) + ". Check it; name a "
            "parameter's role with param_groups(..., roles={name: role}) if it is wrong",
            UserWarning,
            stacklevel=3,
        )


# ------------------------------------------------------------------------------- output layers
def _config_int(config: Any, name: str, subconfigs: tuple[str, ...] = ()) -> int | None:
    """``config.name``, else the first ``config.<sub>.name`` (composite models keep their
    towers' sizes in ``text_config``, ``vision_config``, ``decoder``...)."""
    for holder in (config, *(getattr(config, sub, None) for sub in subconfigs)):
        value = getattr(holder, name, None) if holder is not None else None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def example_inputs_for(model: nn.Module) -> Any | None:
    """Inputs to run ``model`` once, for models that say what they take: HF transformers
    (every input their ``forward`` takes among token ids, images and audio features, sized from
    the config or its ``text_config``/``vision_config``/``audio_config``; decoder token ids for
    encoder–decoder models) and timm (the ``pretrained_cfg`` input size). ``None`` for others."""
    try:
        param = next(model.parameters())
    except StopIteration:
        return None
    device, dtype = param.device, param.dtype if param.is_floating_point() else torch.float32
    main = getattr(model, "main_input_name", None)
    config = getattr(model, "config", None)
    if main is not None and config is not None:
        try:
            accepted = set(inspect.signature(model.forward).parameters)
        except (TypeError, ValueError):
            accepted = {main}
        gen = torch.Generator().manual_seed(0)
        inputs: dict[str, Tensor] = {}
        vocab = _config_int(config, "vocab_size", ("text_config", "decoder"))
        if "input_ids" in accepted and vocab is not None and vocab > 1:
            inputs["input_ids"] = torch.randint(0, vocab, (2, 8), generator=gen).to(device)
        size = _config_int(config, "image_size", ("vision_config",))
        if "pixel_values" in accepted and size is not None:
            channels = _config_int(config, "num_channels", ("vision_config",)) or 3
            images = torch.randn(2, channels, size, size, generator=gen)
            inputs["pixel_values"] = images.to(device, dtype)
        mels = _config_int(config, "num_mel_bins", ("audio_config",))
        frames = _config_int(config, "max_source_positions", ("audio_config",))
        if "input_features" in accepted and mels is not None and frames is not None:
            features = torch.randn(2, mels, 2 * frames, generator=gen)  # two frames a position
            inputs["input_features"] = features.to(device, dtype)
        decoder_vocab = _config_int(config, "vocab_size", ("decoder", "text_config"))
        if (
            getattr(config, "is_encoder_decoder", False)
            and "decoder_input_ids" in accepted
            and decoder_vocab is not None
        ):
            ids = torch.randint(0, decoder_vocab, (2, 4), generator=gen)
            inputs["decoder_input_ids"] = ids.to(device)
        if main in inputs:
            return inputs
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, Mapping) and isinstance(cfg.get("input_size"), (tuple, list)):
        return torch.zeros(2, *cfg["input_size"], device=device, dtype=dtype)
    return None


def _tensors(x: Any) -> Iterable[Tensor]:
    if isinstance(x, Tensor):
        yield x
    elif isinstance(x, Mapping):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (tuple, list)):
        for v in x:
            yield from _tensors(v)


def _outputs(out: Any) -> list[Tensor]:
    """The tensors of a model's output that are its predictions: the ``*logits*`` entries of
    a mapping (HF's outputs also carry caches and hidden states) when there are any, else all."""
    if isinstance(out, Mapping):
        logits = {k: v for k, v in out.items() if "logits" in str(k)}
        out = logits or out
    return [t for t in _tensors(out) if t.grad_fn is not None]


class LayerRun(NamedTuple):
    """What one run of a model says about its layers (:func:`run_layers`)."""

    #: The layers whose outputs are the model's outputs, met first walking back from them.
    heads: list[str]
    #: Every layer, in the order they ran.
    order: list[str]
    #: The layers that took a model input itself (the token ids, the images) as an argument.
    fed: list[str]
    #: Layers met walking back from the outputs whose output is divided by its own vector
    #: norm on the way (CLIP's projections: ``x / ‖x‖``): not heads, since nothing of their
    #: scale reaches the outputs.
    normalized: list[str]
    #: The RMS of each layer's first input on its first call (what it read: T5's tied head
    #: reads its final norm's output times ``d_model^-½``).
    input_rms: dict[str, float]


#: Autograd nodes of a vector norm (``x.norm()``, ``F.normalize``, ``torch.linalg.vector_norm``).
_NORM_NODES = ("LinalgVectorNormBackward", "NormBackward")
#: Nodes that only reshape, copy or broadcast their input (walked through to find what a norm
#: was taken of).
_SHAPE_NODES = ("View", "Reshape", "Unsqueeze", "Squeeze", "Expand", "Clone", "ToCopy",
                "Permute", "Transpose", "T", "Select", "Slice", "Index", "Clamp")  # fmt: skip


def output_layers(
    model: nn.Module, layers: Mapping[str, nn.Module], example_inputs: Any
) -> tuple[list[str], list[str]]:
    """``(heads, order)`` of :func:`run_layers`: the output layers and every layer's name in the
    order they ran."""
    run = run_layers(model, layers, example_inputs)
    return run.heads, run.order


def run_layers(model: nn.Module, layers: Mapping[str, nn.Module], example_inputs: Any) -> LayerRun:
    """Run ``model`` once on ``example_inputs`` (a tensor, a tuple of positional inputs, or a
    mapping of keyword inputs) and read its layers off the run (:class:`LayerRun`): the heads
    are the ``layers`` first met walking back from each output (through any op, but not through
    a normalization layer: a backbone's output has no head; and not one whose output the walk
    sees divided by its own vector norm), the order they ran, and the ones that took a model
    input itself. A weight used directly by an output (``x @ wte.weightᵀ``) counts for its
    layer.

    The model runs in eval mode with gradients on; its training flags are restored. Nothing
    is written to its parameters or buffers."""
    stops: dict[Any, str | None] = {}
    order: list[str] = []
    fed: list[str] = []
    squares: dict[str, Tensor] = {}  # each layer's first input's mean square, on its device
    names_by_module = {id(m): n for n, m in layers.items()}
    weights = {id(getattr(m, "weight", None)): n for n, m in layers.items()}
    given = {id(t) for t in _tensors(example_inputs)}

    def before(module: nn.Module, args: Any, kwargs: Any) -> None:
        name = names_by_module.get(id(module))
        if name is not None and name not in squares:
            first = next(iter(_tensors((args, kwargs))), None)
            if (
                type(first) is Tensor  # not a DTensor or other subclass
                and first.is_floating_point()
                and first.numel()
                and not first.is_meta
            ):
                # No copy of the input, no wait for the device: read once the run is over.
                norm = torch.linalg.vector_norm(first.detach(), dtype=torch.float32)
                squares[name] = norm.square() / first.numel()
        if (
            name is not None
            and name not in fed
            and any(id(t) in given for t in _tensors((args, kwargs)))
        ):
            fed.append(name)

    def hook(module: nn.Module, _args: Any, out: Any) -> None:
        name = names_by_module.get(id(module))
        if name is not None and name not in order:
            order.append(name)
        for t in _tensors(out):
            if t.grad_fn is not None:
                stops.setdefault(t.grad_fn, name)

    ends = [m for m in model.modules() if id(m) in names_by_module or _is_norm_layer(m)]
    handles = [m.register_forward_hook(hook) for m in ends]
    handles += [
        m.register_forward_pre_hook(before, with_kwargs=True)
        for m in model.modules()
        if id(m) in names_by_module
    ]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.enable_grad():
            if isinstance(example_inputs, Mapping):
                out = model(**example_inputs)
            elif isinstance(example_inputs, tuple):
                out = model(*example_inputs)
            else:
                out = model(example_inputs)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode

    heads: list[str] = []
    normalized: list[str] = []
    seen: set[Any] = set()
    todo = [t.grad_fn for t in _outputs(out)]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in stops:
            name = stops[node]
            if name is not None and name not in heads:
                heads.append(name)
            continue
        for name in _normalized_by(node, stops):
            if name not in normalized:
                normalized.append(name)
        variable = getattr(node, "variable", None)
        if variable is not None:
            name = weights.get(id(variable))
            if name is not None and name not in heads:
                heads.append(name)
            continue
        todo.extend(nxt for nxt, _ in node.next_functions)
    heads = [h for h in heads if h not in normalized]
    input_rms = {name: math.sqrt(sq.item()) for name, sq in squares.items()}
    return LayerRun(heads, order, fed, normalized, input_rms)


def _normalized_by(node: Any, stops: Mapping[Any, str | None]) -> list[str]:
    """The layers whose output ``node`` normalizes: the argument of a vector norm, or ``x`` in
    ``x / f(x)`` (a division whose denominator is computed from its numerator's layer, as
    ``x / x.pow(2).sum(-1).sqrt()``)."""
    kind = type(node).__name__
    if kind.startswith(_NORM_NODES):
        return _reached(node.next_functions, stops, _SHAPE_NODES)
    if kind.startswith("DivBackward") and len(node.next_functions) == 2:
        (num, _), (den, _) = node.next_functions
        mine = set(_reached([(num, 0)], stops, _SHAPE_NODES))
        return [n for n in _reached([(den, 0)], stops, None, depth=12) if n in mine]
    return []


def _reached(
    start: Iterable[tuple[Any, int]],
    stops: Mapping[Any, str | None],
    through: tuple[str, ...] | None,
    depth: int = 64,
) -> list[str]:
    """The layers (``stops``) met walking back from ``start`` through nodes whose type names
    start with one of ``through`` (``None``: any node), at most ``depth`` nodes deep."""
    found, seen = [], set()
    todo = [(nxt, 0) for nxt, _ in start]
    while todo:
        nxt, level = todo.pop()
        if nxt is None or nxt in seen or level > depth:
            continue
        seen.add(nxt)
        if nxt in stops:
            if stops[nxt] is not None:
                found.append(stops[nxt])
        elif through is None or type(nxt).__name__.startswith(through):
            todo.extend((n, level + 1) for n, _ in nxt.next_functions)
    return found
