"""The built-in model's build runs its matrix products through OpenBLAS.

Why: the build must give the same bits on any x86-64 CPU with AVX2 (irpo.builtin_build).
torch's own products go to oneMKL, whose only vendor-independent mode (``MKL_CBWR=COMPATIBLE``)
takes about four times as long as its AVX2 kernels (benchmarks/m0_gemm.py), which made the
first-use build of M0 twice as slow. OpenBLAS (numpy's) picks its kernels by the name in
``OPENBLAS_CORETYPE`` rather than by the CPU's vendor, so with ``Haswell`` named the same AVX2
kernels run on Intel and AMD alike, as fast as oneMKL's AVX2 branch, and with a fixed thread
count (``OPENBLAS_NUM_THREADS``) they split the work the same way everywhere
(irpo.builtin_record.REPRODUCIBLE_ENV sets both, and ``OMP_WAIT_POLICY=PASSIVE``, without which
torch's idle OpenMP threads spin on the cores OpenBLAS's threads need).

Only the build uses this, and only while it pre-trains: :func:`openblas_products` swaps
``torch.nn.Linear.forward`` and the model's attention function (registered with transformers
as :data:`ATTENTION`: transformers' eager attention with its two products in OpenBLAS) inside
a ``with`` block of the build's own process. What is left in torch (element-wise kernels,
softmax, the optimizer) runs on ATen's pinned AVX2 kernels; oneMKL's COMPATIBLE branch stays
set for anything else that reaches it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch


class _OpenBLASLinear(torch.autograd.Function):
    """y = x Wᵀ for a bias-free layer, and its two gradients, each one float32 sgemm in numpy."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        rows = x.detach().reshape(-1, x.shape[-1]).contiguous()
        ctx.save_for_backward(rows, weight)
        y = rows.numpy() @ weight.detach().numpy().T  # a transposed view: sgemm's trans flag, no copy
        return torch.from_numpy(y).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).contiguous().numpy()
        grad_x = torch.from_numpy(g @ weight.detach().numpy()).reshape(*grad.shape[:-1], weight.shape[1])
        grad_w = torch.from_numpy(g.T @ rows.numpy())
        return grad_x, grad_w


class _OpenBLASMatmul(torch.autograd.Function):
    """a @ b over leading batch dimensions (numpy calls sgemm per matrix), and its gradients."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = a.detach().contiguous(), b.detach().contiguous()
        ctx.save_for_backward(a, b)
        return torch.from_numpy(np.matmul(a.numpy(), b.numpy()))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = ctx.saved_tensors
        g = grad.contiguous().numpy()
        grad_a = np.matmul(g, np.swapaxes(b.numpy(), -1, -2))
        grad_b = np.matmul(np.swapaxes(a.numpy(), -1, -2), g)
        return torch.from_numpy(grad_a), torch.from_numpy(grad_b)


ATTENTION = "irpo_openblas"


def _attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
               **_: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention (its additive float mask, softmax in float32), products in OpenBLAS."""
    if key.shape[1] != query.shape[1] or dropout:
        raise ValueError("the built-in model's build expects no grouped KV heads and no attention dropout")
    weights = _OpenBLASMatmul.apply(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.nn.functional.softmax(weights, dim=-1, dtype=torch.float32)
    out = _OpenBLASMatmul.apply(weights, value)
    return out.transpose(1, 2).contiguous(), weights


def _linear_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if self.bias is not None or x.dtype != torch.float32 or self.weight.dtype != torch.float32:
        raise TypeError("the built-in model's build expects bias-free float32 linear layers")
    return _OpenBLASLinear.apply(x, self.weight)


@contextmanager
def openblas_products(model: Any, threads: int) -> Iterator[None]:
    """Inside the block, every ``torch.nn.Linear`` and ``model``'s attention multiply through
    numpy's OpenBLAS on ``threads`` threads; afterwards the model attends as before (its saved
    config is unchanged)."""
    from threadpoolctl import threadpool_info, threadpool_limits
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    # Set, not only read from OPENBLAS_NUM_THREADS: OpenBLAS caps that at the CPUs the
    # process may run on, so a job given one CPU would split the products otherwise
    # (measured: a reduced build under `taskset -c 0` gave other weights).
    limits = threadpool_limits(limits=threads, user_api="blas")
    counts = [lib["num_threads"] for lib in threadpool_info() if lib["internal_api"] == "openblas"]
    if not counts or set(counts) != {threads}:  # numpy's, and scipy's if it is loaded
        limits.restore_original_limits()
        raise RuntimeError(f"numpy's OpenBLAS runs {counts} threads, not {threads}: the build "
                           "needs numpy built on OpenBLAS (the PyPI wheels are)")
    AttentionInterface.register(ATTENTION, _attention)
    AttentionMaskInterface.register(ATTENTION, eager_mask)
    original_forward, original_attention = torch.nn.Linear.forward, model.config._attn_implementation
    torch.nn.Linear.forward = _linear_forward  # type: ignore[method-assign]
    model.config._attn_implementation = ATTENTION
    try:
        yield
    finally:
        torch.nn.Linear.forward = original_forward  # type: ignore[method-assign]
        model.config._attn_implementation = original_attention
        limits.restore_original_limits()


def blas_description() -> str:
    """numpy's BLAS library and version, recorded with the build (another version may round
    differently, which then shows as another checksum)."""
    try:
        config = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{config.get('name')} {config.get('version')} (numpy {np.__version__})"
    except Exception:  # noqa: BLE001 - older numpy: the version alone still helps
        return f"numpy {np.__version__}"
