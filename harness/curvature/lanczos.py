"""Matrix-free GGN spectra: Lanczos on GGN-vector products.

This is the fallback when the Gram matrix does not fit the memory budget. ``lanczos_eigenpairs``
computes the top-k eigenpairs with scipy's ``eigsh``; ``lanczos_density`` estimates the whole
spectral density by stochastic Lanczos quadrature. Both store a few vectors of the group's size
and nothing of size N·C. Each Lanczos iteration costs two Jacobian products and one loss-Hessian
product.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import Tensor
from torch.func import functional_call, grad, jvp, vjp
from torch.nn import Module, Parameter

from harness.curvature.exact import _names_of, _without_hooks, quiet_forward_ad


def ggn_matvec(
    model: Module, loss_func: Module, inputs: Tensor, targets: Tensor, params: Sequence[Parameter]
):
    """Return the GGN-vector product v ↦ Jᵀ H J v of ``params`` on one batch, for flat float64 vectors.

    J is the Jacobian of the model outputs with respect to ``params`` and H the Hessian of the
    batch loss with respect to the outputs, both evaluated once here (torch.func on hook-free
    copies, in the model's dtype).
    """
    names = _names_of(model, params)
    model, loss_func = _without_hooks(model), _without_hooks(loss_func)
    frozen = {name: p.detach() for name, p in model.named_parameters()}
    group = {name: frozen[name] for name in names}
    shapes = [group[name].shape for name in names]
    sizes = [shape.numel() for shape in shapes]
    dtype, device = group[names[0]].dtype, group[names[0]].device

    def outputs_of(group_params: dict[str, Tensor]) -> Tensor:
        return functional_call(model, {**frozen, **group_params}, (inputs,))

    outputs, pullback = vjp(outputs_of, group)
    # H u is the pullback of the loss gradient, because H is symmetric. Forward mode over the
    # gradient of MSELoss fails in torch 2.14 on an immutable zero tensor, but reverse mode works.
    _, hessian_pullback = vjp(grad(lambda out: loss_func(out, targets)), outputs)

    def matvec(vector: np.ndarray) -> np.ndarray:
        pieces = torch.from_numpy(np.asarray(vector).ravel()).to(device=device, dtype=dtype).split(sizes)
        tangent = {name: piece.reshape(shape) for name, piece, shape in zip(names, pieces, shapes)}
        with quiet_forward_ad():
            _, output_tangent = jvp(outputs_of, (group,), (tangent,))
        (hessian_tangent,) = hessian_pullback(output_tangent)
        (product,) = pullback(hessian_tangent)
        flat = torch.cat([product[name].flatten() for name in names])
        return flat.detach().double().cpu().numpy()

    return matvec, sum(sizes)


def lanczos_eigenpairs(
    model: Module,
    loss_func: Module,
    inputs: Tensor,
    targets: Tensor,
    params: Sequence[Parameter],
    top_k: int,
    tol: float = 1e-6,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Compute the ``top_k`` largest GGN eigenvalues and eigenvectors of ``params`` with ``eigsh``.

    Returns:
        Eigenvalues [top_k], descending, and eigenvectors [top_k, D] (float64 on the CPU, unit
        norm).

    Raises:
        ValueError: If ``top_k`` is not in [1, D - 1], the range ARPACK supports.
    """
    matvec, dim = ggn_matvec(model, loss_func, inputs, targets, params)
    if not 1 <= top_k < dim:
        raise ValueError(f"Invalid top_k={top_k} for Lanczos on {dim} parameters: use 1 ≤ top_k < {dim}.")
    operator = LinearOperator((dim, dim), matvec=matvec, dtype=np.float64)
    start = np.random.default_rng(seed).standard_normal(dim)
    eigvals, eigvecs = eigsh(operator, k=top_k, which="LA", tol=tol, v0=start)
    order = np.argsort(eigvals)[::-1]
    return torch.from_numpy(eigvals[order].copy()), torch.from_numpy(eigvecs[:, order].T.copy())


def lanczos_density(matvec, dim: int, probes: int, steps: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Estimate the spectral density of a symmetric operator by stochastic Lanczos quadrature.

    For each of ``probes`` random unit vectors v (Rademacher entries), ``steps`` Lanczos steps
    with full reorthogonalization give a tridiagonal T = Σ_i θ_i q_i q_iᵀ. The nodes θ_i with
    weights q_i[0]² / probes form a discrete measure whose moments Σ w θᵏ match vᵀ Aᵏ v averaged
    over the probes, exactly for k < 2·steps; their expectation is tr(Aᵏ) / dim. So the weights
    sum to 1 and a histogram or a smoothed sum of the nodes approximates the eigenvalue density.

    Args:
        matvec: Product with the operator, on flat float64 numpy vectors.
        dim: Size of the operator.
        probes: Number of random start vectors.
        steps: Lanczos steps per probe (at most ``dim``; stops early on an invariant subspace).
        seed: Seed of the probes.

    Returns:
        Nodes and weights, float64 tensors of equal length, sorted by node.
    """
    rng = np.random.default_rng(seed)
    steps = min(steps, dim)
    nodes, weights = [], []
    for _ in range(probes):
        start = rng.choice([-1.0, 1.0], size=dim) / np.sqrt(dim)
        alphas, betas = _lanczos_tridiagonal(matvec, start, steps)
        ritz_values, ritz_vectors = np.linalg.eigh(np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1))
        nodes.append(ritz_values)
        weights.append(ritz_vectors[0] ** 2 / probes)
    nodes_all, weights_all = np.concatenate(nodes), np.concatenate(weights)
    order = np.argsort(nodes_all)
    return torch.from_numpy(nodes_all[order].copy()), torch.from_numpy(weights_all[order].copy())


def _lanczos_tridiagonal(matvec, start: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Run Lanczos with full reorthogonalization from the unit vector ``start``; return T's diagonals."""
    basis = [start]
    alphas: list[float] = []
    betas: list[float] = []
    for step in range(steps):
        product = np.asarray(matvec(basis[-1]), dtype=np.float64).ravel()
        alphas.append(float(basis[-1] @ product))
        for vector in basis:
            product -= (vector @ product) * vector
        beta = float(np.linalg.norm(product))
        scale = max(max(abs(alpha) for alpha in alphas), max(betas, default=0.0))
        # A vanishing beta means an invariant subspace: T's eigenvalues are then exact.
        if step == steps - 1 or beta <= 1e-10 * scale:
            break
        betas.append(beta)
        basis.append(product / beta)
    return np.array(alphas), np.array(betas)
