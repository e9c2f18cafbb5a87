"""Launch parameters of the Triton Newton–Schulz kernels: a bucket's path (one program per
matrix, or tiled) and tiles, the policy's default or, with the policy's ``autotune``, the
fastest candidate timed once per bucket shape and device."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch

from ..tables import next_power_of_2
from . import Policy, TritonBackend, interpreting

__all__ = ["TUNED", "NSBucket", "autotuning", "config", "default_config", "tuned"]

#: The configuration chosen per (kernel, m, k or n, batch, dtype, device name).
TUNED: dict[tuple, dict] = {}


class NSBucket:
    """Static launch parameters for one bucket: shape, dtype, path, and the policy."""

    def __init__(
        self,
        batch: int,
        m: int,
        n: int,
        dtype: torch.dtype,
        device: torch.device,
        policy: Policy | None = None,
    ) -> None:
        if m > n:
            raise ValueError(f"a bucket is oriented wide (m ≤ n); got {m}×{n}")
        self.batch, self.m, self.n, self.dtype, self.device = batch, m, n, dtype, device
        self.policy = TritonBackend().policy(device) if policy is None else policy
        self.interpret = interpreting()
        # tl.dot needs every dimension to be at least 16.
        self.pad_m = max(16, next_power_of_2(m))
        self.pad_n = max(16, next_power_of_2(n))
        limit, rows = self.policy.small_limit, self.policy.small_rows
        self.small = self.pad_m <= rows and self.pad_m * self.pad_n <= limit
        self.warps = 4 if self.pad_m * self.pad_n <= 4096 else 8  # the small kernel's
        self.prologue_tile = self.policy.prologue_tile

    def flags(self) -> dict:
        return dict(CAST_F32=self.interpret, EMULATE_RNE=self.interpret)


def _candidates(configs: list[dict], rows: int, block: str) -> list[dict]:
    """The configurations worth timing for ``rows`` output rows: no tile taller than twice the
    padded rows (more would compute padding only)."""
    fit = [c for c in configs if c[block] <= 2 * max(16, next_power_of_2(rows))]
    return fit or configs[-1:]


def _bucket_candidates(bucket: NSBucket, kernel: str) -> list[dict]:
    syrk = kernel == "syrk"
    configs = list(bucket.policy.syrk if syrk else bucket.policy.apply)
    return _candidates(configs, bucket.m, "BLOCK" if syrk else "BLOCK_M")


def default_config(bucket: NSBucket, kernel: str) -> dict:
    """The tile configuration of ``kernel`` (``"syrk"`` or ``"apply"``) a step uses for this
    bucket when not autotuning."""
    return _bucket_candidates(bucket, kernel)[0]


def config(bucket: NSBucket, kernel: str, inner: int, launch: Callable[[dict], None]) -> dict:
    """The tile configuration of ``kernel`` (``"syrk"`` or ``"apply"``) for this bucket: the
    default, or with the policy's ``autotune`` the fastest candidate, timed once per shape by
    running ``launch(config)`` (which must write scratch buffers only)."""
    candidates = _bucket_candidates(bucket, kernel)
    if not autotuning(bucket) or len(candidates) == 1:
        return candidates[0]
    key = _tuning_key(bucket, kernel, inner)
    if key not in TUNED:
        TUNED[key] = _fastest(candidates, launch)
    return TUNED[key]


def autotuning(bucket: NSBucket) -> bool:
    """Whether this bucket's tiles are timed: the policy's ``autotune``, or where it is
    ``None``, ``SCION_KERNELS_AUTOTUNE=1`` in the environment now."""
    if bucket.policy.autotune is not None:
        return bucket.policy.autotune
    return os.environ.get("SCION_KERNELS_AUTOTUNE") == "1"


def tuned(bucket: NSBucket, kernel: str, inner: int) -> bool:
    """Whether ``kernel``'s tile for this bucket shape was timed already."""
    return _tuning_key(bucket, kernel, inner) in TUNED


def _tuning_key(bucket: NSBucket, kernel: str, inner: int) -> tuple:
    dev = bucket.device
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    return (kernel, bucket.m, inner, bucket.batch, bucket.dtype, where)


def time_launch(fn: Callable[[], None]) -> float:
    """Median milliseconds of ``fn`` (a few warm-up runs first)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")


def _fastest(candidates: list[dict], launch: Callable[[dict], None]) -> dict:
    """The candidate with the lowest median time; one that cannot run here (too much shared
    memory, say) is passed over, and one that fails otherwise (a compiler error) too, with a
    warning naming it: a candidate must never end a training step. The timing launches write
    scratch buffers only, so a failed one leaves nothing behind."""
    from triton.runtime.errors import OutOfResources

    best, best_ms = None, float("inf")
    for config in candidates:
        try:
            ms = time_launch(lambda config=config: launch(config))
        except OutOfResources:
            continue
        except Exception as err:  # noqa: BLE001 - see the docstring
            first = (str(err).splitlines() or [""])[0]
            warnings.warn(
                f"scion_kernels: tile candidate {config} failed and is passed over "
                f"({type(err).__name__}: {first})",
                RuntimeWarning,
                stacklevel=2,
            )
            continue
        if ms < best_ms:
            best, best_ms = config, ms
    if best is None:
        raise RuntimeError(f"no tile configuration of {candidates} can run on this device")
    return best
