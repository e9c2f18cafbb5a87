"""The native backend's own tests (csrc/newton_schulz.cu, csrc/grouped.cu): its tiles, workspace
and argument checks, and the errors of the C++ side.

Its parity with the reference (and with the Triton backend) is in ``test_backends.py``. These run
on the CPU through the host emulation of the native module (``emulated_native``), and on a GPU
with the compiled module too (the ``native`` fixture).

Tolerance rule (``tolerance.check_polar``, tests/conftest.py): against the float64 SVD polar
factor, the kernel's error may be at most twice the PyTorch reference's (same compute dtype)
plus a small absolute term.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from scion_kernels import backends
from scion_kernels.backends.cuda import NativeBackend, Policy
from scion_kernels.backends.cuda.native import grouped_step_, native_available, ns_step_
from scion_kernels.backends.tables import flatten
from scion_kernels.newton_schulz import (
    gram_restart_every,
    newton_schulz,
    resolve_coefficients,
    uses_gram,
)


@pytest.fixture(params=["emulated", pytest.param("gpu", marks=pytest.mark.gpu)])
def native(request):
    """(module, device): the emulated module on the CPU, or the built module on a GPU."""
    if request.param == "emulated":
        return request.getfixturevalue("emulated_native"), torch.device("cpu")
    if not (torch.cuda.is_available() and native_available()):
        pytest.skip("needs a CUDA GPU and the built native module")
    return backends.get("cuda").module, torch.device("cuda")


def _polar(G: torch.Tensor, coefficients: str, dtype: torch.dtype, tile: int = 0) -> torch.Tensor:
    """The registered native backend's polar with product tile ``tile`` (0: chosen)."""
    backend = NativeBackend(backends.get("cuda").module, {(8, 0): Policy(tile=tile)})
    return backend.polar_(G, flatten(resolve_coefficients(coefficients)), dtype)


def test_one_block_path_limits(native, tolerance):
    """The one-block path at its largest (64×512) and a transposed 500×3."""
    _, device = native
    for shape in ((64, 512), (500, 3)):
        G = torch.randn(2, *shape, device=device)
        got = _polar(G, "polar_express", torch.bfloat16, 1)
        tolerance.check_polar(got, G, "polar_express", torch.bfloat16)


@pytest.mark.parametrize("shape", [(33, 130), (130, 33)], ids=str)
def test_polar_large_tile_and_polar_express(native, tolerance, shape):
    _, device = native
    G = torch.randn(3, *shape, device=device)
    got = _polar(G, "polar_express", torch.bfloat16, tile=128)
    tolerance.check_polar(got, G, "polar_express", torch.bfloat16)
    # The two tilings differ only in summation grouping: same answer to bf16 rounding.
    other = _polar(G, "polar_express", torch.bfloat16, tile=64)
    assert (got - other).abs().max().item() <= 0.02


def test_polar_fuzz(native, tolerance):
    """Random shapes (both orientations, 1 to 140 a side), batches, dtypes, coefficient sets
    and paths: always within the tolerance rule."""
    _, device = native
    gen = torch.Generator().manual_seed(7)

    def draw(n: int) -> int:
        return int(torch.randint(n, (1,), generator=gen))

    for _ in range(12):
        shape = (1 + draw(3), 1 + draw(140), 1 + draw(140))
        dtype = (torch.bfloat16, torch.float16)[draw(2)]
        coefficients = ("classic", "polar_express")[draw(2)]
        tile = 64 if max(shape[1:]) > 512 or min(shape[1:]) > 64 else (0, 64)[draw(2)]
        G = torch.randn(shape, generator=gen).to(device) * 10.0 ** (draw(9) - 4)
        tolerance.check_polar(_polar(G, coefficients, dtype, tile), G, coefficients, dtype)


def test_workspace_and_tile_queries(native):
    module, _ = native
    assert module.ns_tile(768, 768) == 128
    assert module.ns_tile(65, 129) == 64
    assert module.ns_tile(33, 129) == module.ns_tile(129, 33) == module.ns_tile(64, 512) == 1
    assert module.ns_tile(33, 129, 128) == 128
    assert module.ns_workspace_bytes(2, 33, 129) == 0  # the one-block path keeps all on chip
    tiled = module.ns_workspace_bytes(2, 33, 129, 64)
    # X, Y (64×192 each) and A, B (64×64 each) per matrix in 2 bytes, plus the chunk sums.
    assert tiled >= 2 * (2 * 64 * 192 + 2 * 64 * 64) * 2
    # The Gram form never takes the one-block path, and holds two more 64×64 matrices (Q, T).
    assert module.ns_tile(33, 129, 0, 2) == 64
    gram = module.ns_workspace_bytes(2, 33, 129, 0, 2)
    assert gram - tiled >= 2 * 2 * 64 * 64 * 2
    with pytest.raises(ValueError, match="tile"):
        module.ns_tile(8, 8, 96)
    with pytest.raises(ValueError, match="one-block"):
        module.ns_tile(65, 100, 1)
    with pytest.raises(ValueError, match="gram_restart"):
        module.ns_tile(33, 129, 1, 2)
    with pytest.raises(ValueError, match="gram_restart"):
        module.ns_tile(33, 129, 0, -1)


def test_wgmma_queries(native):
    """``wgmma`` runs the 128 tile: the automatic choice never takes 64 with it, small
    matrices still take the one-block path, and a forced 64 tile is refused."""
    module, device = native
    assert module.ns_tile(65, 129) == 64
    assert module.ns_tile(65, 129, 0, 0, True) == 128
    assert module.ns_tile(33, 129, 0, 2, True) == 128  # the Gram form
    assert module.ns_tile(33, 129, 0, 0, True) == 1
    assert module.ns_tile(65, 129, 0, 0, 2) == 128
    assert module.ns_tile(65, 129, 0, 0, 3) == 128
    assert module.ns_tile(65, 129, 0, 0, 4) == 128
    # 128×256 tiles overhang the padded columns instead of padding them more.
    for wgmma in (3, 4):
        assert module.ns_workspace_bytes(2, 65, 129, 0, 0, wgmma) == module.ns_workspace_bytes(
            2, 65, 129, 128
        )
    assert module.ns_workspace_bytes(2, 65, 129, 128) == module.ns_workspace_bytes(
        2, 65, 129, 0, 0, True
    )
    with pytest.raises(ValueError, match="wgmma"):
        module.ns_tile(65, 129, 64, 0, True)
    with pytest.raises(ValueError, match="wgmma"):
        module.ns_tile(65, 129, 0, 0, 5)
    # Persistence is a launch of the wgmma products: refused without them.
    G = torch.randn(1, 65, 129, device=device)
    with pytest.raises(ValueError, match="persistent"):
        NativeBackend(module, {(8, 0): Policy(persistent=True)}).polar_(
            G, flatten(resolve_coefficients("classic")), torch.bfloat16
        )


#: (stack, Gram form, dtype): wide and tall, one and more tiles per side, both dtypes; X's
#: padded width 128, 256 and 384 (the 128×256 tiles overhang it by 128, by none, by 128).
WGMMA_CASES = [
    ((2, 7, 33), False, torch.bfloat16),
    ((1, 130, 33), False, torch.float16),
    ((1, 129, 260), True, torch.bfloat16),
    ((2, 20, 70), True, torch.float16),
]


@pytest.mark.wgmma
@pytest.mark.parametrize("shape, gram, dtype", WGMMA_CASES, ids=str)
def test_wgmma_equals_mma_sync_emulated(emulated_native, monkeypatch, shape, gram, dtype):
    """In the host emulation both product kernels accumulate every output element in the same
    order (k16 slices in turn, each an fma chain over k), so the wgmma kernels (TMA boxes and
    their swizzle, descriptors, fragment maps, the transposed a·X + B·X, its 128×256 tiles, the
    barriers and async waits) must give the mma.sync kernels' bits exactly, for the polar factor
    and for the fused update of strided parameters. The TMA copies run both late (at the first
    wait that needs them: a stage read before its barrier) and eagerly (when issued: a stage
    refilled while still read). The Gram cases take the classic coefficients, which the Gram
    form runs in bf16 too (``you``'s it refuses there, falling back to the plain iteration)."""
    module = emulated_native
    G = torch.randn(shape)
    steps = resolve_coefficients("classic" if gram else "you")
    assert not gram or uses_gram(*sorted(shape[1:]), steps, dtype)
    table = flatten(steps)

    def polar(wgmma: int, persistent: bool = False) -> torch.Tensor:
        policy = Policy(tile=128, wgmma=wgmma, persistent=persistent)
        return NativeBackend(module, {(8, 0): policy}).polar_(G, table, dtype, gram)

    expected = polar(0)
    # a·X + B·X: Xᵀ from registers, X from shared memory, the same on 128×256 tiles, and the
    # symmetric products too on 128×256 tiles (so 4 runs every kernel 3 does, and more)
    for wgmma in (1, 2, 3, 4):
        assert torch.equal(polar(wgmma), expected), wgmma
        if wgmma != 3:
            monkeypatch.setenv("SCION_EMULATION_TMA", "eager")
            assert torch.equal(polar(wgmma), expected), wgmma
            monkeypatch.delenv("SCION_EMULATION_TMA")
    # Persistent: two emulated multiprocessors, so blocks walk several tiles (and matrices),
    # their K stages running on through the buffers from one tile into the next.
    monkeypatch.setenv("SCION_EMULATION_SMS", "2")
    for wgmma in (1, 2, 4):
        assert torch.equal(polar(wgmma, persistent=True), expected), wgmma
    monkeypatch.setenv("SCION_EMULATION_TMA", "eager")
    assert torch.equal(polar(4, persistent=True), expected)
    monkeypatch.delenv("SCION_EMULATION_TMA")

    # The whole step: a parameter seen through a transposed view, a float32 buffer, lr on the
    # device.
    m, n = min(shape[1:]), max(shape[1:])
    tall = shape[1] > shape[2]
    base = torch.randn(shape[0], shape[2], shape[1])
    grads = torch.randn(shape)
    lr = torch.tensor([0.5])
    results = []
    for wgmma, persistent in ((0, False), (2, False), (4, True)):
        p, d = base.clone().mT, torch.randn(shape, generator=torch.Generator().manual_seed(1))
        ns_step_(module, 128, [p], [grads], [d], [tall], [1.5], m, n, dtype, table, gram, 0.3,
                 None, lr, -0.05, 0.01, wgmma=wgmma, persistent=persistent)  # fmt: skip
        results.append((p, d))
    for p, d in results[1:]:
        assert torch.equal(results[0][0], p) and torch.equal(results[0][1], d)
    assert not torch.equal(results[0][0], base.mT)  # the step did update


@pytest.mark.wgmma
def test_wide_triangle_tiles_equal_mma_sync_emulated(emulated_native, monkeypatch):
    """The symmetric products on 128×256 tiles (``wgmma=4``) where the padded size is three
    128-row blocks: tiles straddling the diagonal, one whose left half lies below it (skipped:
    its mirror's tile stores it), and one overhanging the matrix; a block per tile and
    persistent, bitwise against mma.sync."""
    module = emulated_native
    G = torch.randn(1, 300, 260)
    table = flatten(resolve_coefficients("you"))

    def polar(wgmma: int, persistent: bool = False) -> torch.Tensor:
        policy = Policy(tile=128, wgmma=wgmma, persistent=persistent)
        return NativeBackend(module, {(8, 0): policy}).polar_(G, table, torch.bfloat16)

    expected = polar(0)
    assert torch.equal(polar(4), expected)
    monkeypatch.setenv("SCION_EMULATION_SMS", "2")
    assert torch.equal(polar(4, persistent=True), expected)


@pytest.mark.wgmma
def test_wgmma_on_device(native, tolerance):
    """The wgmma products where they run (the emulation, or a compute capability 9.0 GPU):
    two tiles a side, plain and in the Gram form, on 128×128 and 128×256 tiles, in a block per
    tile and persistent, and a whole step of a tall parameter, against
    the tolerance rule and the mma.sync products (the same to bf16 rounding: only the
    summation order of the tensor cores differs)."""
    module, device = native
    if device.type == "cuda" and torch.cuda.get_device_capability(device) != (9, 0):
        pytest.skip("the wgmma products need a compute capability 9.0 GPU")
    G = torch.randn(1, 130, 260, device=device)
    table = resolve_coefficients("classic")
    cases = ((False, 1, False), (True, 1, False), (False, 2, False), (True, 3, False),
             (False, 3, True), (True, 4, False))  # fmt: skip
    for gram, wgmma, persistent in cases:
        policy = Policy(wgmma=wgmma, persistent=persistent)
        got = NativeBackend(module, {(8, 0): policy}).polar_(
            G, flatten(table), torch.bfloat16, gram
        )
        tolerance.check_polar(got, G, "classic", torch.bfloat16, gram=gram)
        other = NativeBackend(module, {(8, 0): Policy(tile=128)}).polar_(
            G, flatten(table), torch.bfloat16, gram
        )
        assert (got.float() - other.float()).abs().max().item() <= 0.02
    grad = torch.randn(300, 140, device=device)
    expected = -0.1 * newton_schulz(grad, "classic", dtype=torch.bfloat16).float()
    for wgmma, persistent in ((2, False), (3, False), (3, True)):
        p = torch.zeros(300, 140, device=device)
        ns_step_(module, 0, [p], [grad], [], [True], [1.0], 140, 300, torch.bfloat16,
                 flatten(table), False, 1.0, None, None, -0.1, 1.0, wgmma=wgmma,
                 persistent=persistent)  # fmt: skip
        assert (p - expected).abs().max().item() <= 0.01, wgmma


@pytest.mark.wgmma
def test_wgmma_persistent_walks_tiles_on_device(native, tolerance, monkeypatch):
    """Persistent blocks that each walk several tiles and matrices: on a GPU a stack of 48
    (144 tiles of X·Xᵀ and 192 of a·X + B·X, more than an H100's or H200's multiprocessors),
    in the emulation 2 matrices on one emulated multiprocessor; against the tolerance rule and
    the same products one block per tile."""
    module, device = native
    if device.type == "cuda" and torch.cuda.get_device_capability(device) != (9, 0):
        pytest.skip("the wgmma products need a compute capability 9.0 GPU")
    monkeypatch.setenv("SCION_EMULATION_SMS", "1")
    G = torch.randn(48 if device.type == "cuda" else 2, 130, 260, device=device)
    table = flatten(resolve_coefficients("classic"))
    for gram in (False, True):
        got, once = (
            NativeBackend(module, {(8, 0): Policy(wgmma=4, persistent=persistent)}).polar_(
                G, table, torch.bfloat16, gram
            )
            for persistent in (True, False)
        )
        tolerance.check_polar(got, G, "classic", torch.bfloat16, gram=gram)
        assert (got.float() - once.float()).abs().max().item() <= 0.02


def test_invalid_arguments(native):
    module, device = native
    p = torch.zeros(1, 4, 8, device=device)
    with pytest.raises(ValueError, match="compute dtype"):
        ns_step_(module, 0, [p], [p.clone()], [], [False], [1.0], 4, 8, torch.float32,
                 [1.0, 0.0, 0.0], False, 1.0, None, None, 1.0, 1.0)  # fmt: skip
    with pytest.raises(ValueError, match="triples"):
        module.ns_step(4, 8, 0, 0, -1, 1, [1.0, 2.0], 1.0, 1.0, 1.0, 0, 0, 0, [p.data_ptr()],
                       [p.data_ptr()], [], [8, 1, 8, 1, 8, 1], [1.0], 0, 0, 0, 0)  # fmt: skip
    with pytest.raises(ValueError, match="workspace"):  # the tiled path (64) needs one
        module.ns_step(4, 8, 0, 0, -1, 1, [1.0, 0.0, 0.0], 1.0, 1.0, 1.0, 0, 0, 64, [p.data_ptr()],
                       [p.data_ptr()], [], [8, 1, 8, 1, 8, 1], [1.0], 256, 16, 0, 0)  # fmt: skip


def test_mixed_dtypes_and_shapes_rejected(native):
    """One call runs one dtype combination: a mixed list is an error, never a misread."""
    module, device = native
    p = [torch.zeros(4, 8, device=device), torch.zeros(4, 8, device=device, dtype=torch.bfloat16)]
    g = [torch.zeros(4, 8, device=device) for _ in p]
    with pytest.raises(TypeError, match="param 1 is torch.bfloat16"):
        ns_step_(module, 0, p, g, [], [False, False], [1.0, 1.0], 4, 8, torch.bfloat16,
                 [1.0, 0.0, 0.0], False, 1.0, None, None, 1.0, 1.0)  # fmt: skip
    with pytest.raises(ValueError, match="grad 0 has shape"):
        ns_step_(module, 0, p[:1], [torch.zeros(8, 4, device=device)], [], [False], [1.0], 4, 8,
                 torch.bfloat16, [1.0, 0.0, 0.0], False, 1.0, None, None, 1.0, 1.0)  # fmt: skip
    with pytest.raises(TypeError, match="grad 1"):
        grouped_step_(module, p[:1] * 2, [g[0], g[1].half()], [], [4, 8, 4, 8], [False] * 2,
                      [1.0] * 2, [0.0] * 2, True, False, 1.0, None, None, 1.0, 1.0)  # fmt: skip


def test_cpu_tensors_rejected_without_emulation():
    """The real module never takes CPU tensors: a clear error, before any address is used."""

    class Module:  # stands in for a built module: no EMULATED flag
        pass

    p = torch.zeros(1, 4, 8)
    with pytest.raises(ValueError, match="CUDA tensors only"):
        ns_step_(Module(), 0, [p], [p.clone()], [], [False], [1.0], 4, 8, torch.bfloat16,
                 [1.0, 0.0, 0.0], False, 1.0, None, None, 1.0, 1.0)  # fmt: skip


def test_optimizer_backend_cuda_rejects_cpu_without_emulation():
    import scion_kernels

    p = torch.nn.Parameter(torch.randn(8, 8))
    with pytest.raises(ValueError, match="backend 'cuda'"):
        scion_kernels.Scion([p], backend="cuda")


def _host_calls(module) -> dict[str, int]:
    """The emulated runtime's counts of launches and of the host-side set-up calls."""
    lib = ctypes.CDLL(module.__file__)
    lib.scion_emu_call_count.restype = ctypes.c_longlong
    lib.scion_emu_call_count.argtypes = [ctypes.c_char_p]
    names = ("launch", "cudaFuncSetAttribute", "cudaFuncGetAttributes", "cuTensorMapEncodeTiled")
    return {name: lib.scion_emu_call_count(name.encode()) for name in names}


@pytest.mark.parametrize("tile, wgmma, persistent, gram", [(1, 0, False, False),
                         (128, 0, False, False), (128, 2, False, False), (128, 4, True, False),
                         (128, 3, False, True)], ids=str)  # fmt: skip
def test_host_calls_per_call_emulated(emulated_native, tile, wgmma, persistent, gram):
    """What a call costs the host beside its launches. The kernels' set-up (the shared-memory
    limit, the wgmma image check) is made on a kernel's first call on a device only, so a repeated
    call makes none; and a call encodes each distinct TMA map once: X and Y each as a left operand
    and as a·X + B·X's right one, and each m×m buffer once (two maps a launch before: 30 for
    five plain steps). The one-block path (tile 1) is one launch."""
    module = emulated_native
    G = torch.randn(2, 20, 70)
    steps = resolve_coefficients("classic")
    assert not gram or uses_gram(20, 70, steps, torch.bfloat16)
    policy = Policy(tile=tile, wgmma=wgmma, persistent=persistent)
    backend = NativeBackend(module, {(8, 0): policy})
    backend.polar_(G, flatten(steps), torch.bfloat16, gram)  # the first call readies the kernels
    before = _host_calls(module)
    backend.polar_(G, flatten(steps), torch.bfloat16, gram)
    calls = {name: n - before[name] for name, n in _host_calls(module).items()}
    # Two preparing launches, then three products a plain step. The Gram form: R ← X·Xᵀ; per step
    # P (and Q ← Q·P but after a restart); between steps R ← P·(R·P), or at a restart X ← Q·X
    # and R ← X·Xᵀ; at the end X ← Q·X.
    n = len(steps)
    restarts = (n - 1) // gram_restart_every(torch.bfloat16) if gram else 0
    products = 4 * n - 1 - restarts if gram else 3 * n
    # X and Y two each; A and B, or R, P, Q and T, one each.
    maps = 0 if wgmma == 0 else 4 + (4 if gram else 2)
    launches = 1 if tile == 1 else 2 + products
    assert calls == {"launch": launches, "cudaFuncSetAttribute": 0,
                     "cudaFuncGetAttributes": 0, "cuTensorMapEncodeTiled": maps}  # fmt: skip


def test_one_block_limit_follows_the_width_emulated(emulated_native, tolerance):
    """The one-block kernel's shared memory grows with the width (about 35 KiB at 70 columns,
    83 KiB at 500): a wider call than any before raises the kernel's limit once, and repeats
    make no set-up call. The emulation refuses a launch above 48 KiB beyond the limit set, as a
    device does, so a limit left too low fails here."""
    module = emulated_native
    backend = NativeBackend(module, {(8, 0): Policy(tile=1)})
    table = flatten(resolve_coefficients("classic"))
    raised = []
    for width in (70, 500, 70, 500):
        G = torch.randn(2, 20, width)
        before = _host_calls(module)["cudaFuncSetAttribute"]
        got = backend.polar_(G, table, torch.bfloat16)
        raised.append(_host_calls(module)["cudaFuncSetAttribute"] - before)
        tolerance.check_polar(got, G, "classic", torch.bfloat16)
    assert raised[0] <= 1 and raised[1] <= 1 and raised[2:] == [0, 0]
