"""GGN eigenpairs per parameter group and per-sample directional derivatives along them.

With G = V Vᵀ and the Gram matrix K = Vᵀ V = U diag(λ) Uᵀ, the eigenvectors of G with nonzero
eigenvalue are e_k = V u_k / sqrt(λ_k). Mapping u_k to parameter space needs V-vector products,
computed in a second backward pass (``GramAccumulator.coefficients``) without keeping V.

For mean reduction the GGN is the mean of per-sample GGNs G_n, and Vᵀ e_k = sqrt(λ_k) u_k, so
the second directional derivatives λ_nk = e_kᵀ G_n e_k = N λ_k Σ_r u_k[r, n]² need no extra pass.
The first directional derivatives γ_nk = g_nᵀ e_k, g_n = ∇ℓ_n, come from the Gram block of V
with the per-sample gradient column that the loss appends to the factor.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import Module, Parameter

from harness.curvature.gram import GramAccumulator, check_all_groups_computed, factor_columns, run_backward, zero_noise
from harness.curvature.lanczos import ggn_matvec, lanczos_density, lanczos_eigenpairs
from harness.curvature.memory import (
    BUDGET_ACTIONS,
    MemoryBudgetError,
    budget_error,
    check_budget,
    estimate_memory,
    module_sizes,
)

log = logging.getLogger(__name__)


@dataclass
class GroupCurvature:
    """GGN spectrum of one parameter group and, optionally, what goes with its leading eigenpairs.

    Attributes:
        eigvals: All Gram eigenvalues, descending, numerically zero ones as exactly 0 (only the
            top-k ones with ``method="lanczos"``).
        selected: The selected eigenvalues λ_k, descending, all nonzero.
        gram_eigvecs: The Gram eigenvectors u_k of the selected eigenvalues, [rows, K]; None
            unless eigenvectors or directional derivatives were requested, and with
            ``method="lanczos"``.
        eigvecs: Eigenvectors e_k in parameter space, one [K, *p.shape] tensor per parameter
            of the group, jointly of unit norm per k; None unless requested.
        first_derivatives: γ_nk = g_nᵀ e_k as [N, K], g_n the gradient of sample n's loss.
        second_derivatives: λ_nk = e_kᵀ G_n e_k as [N, K], G_n the GGN of sample n's loss.
        gradient: Gradient g = mean_n g_n of the samples in the GGN, projected: gᵀ e_k as [K].
        gradient_norm: ‖g‖.
        method: ``"gram"``, or the fallback for the memory budget: ``"chunked"`` (the same
            Gram matrix, from chunks), ``"mc"`` (Monte-Carlo GGN) or ``"lanczos"``.
        detail: The number of chunks after ``"chunked"``, of Monte-Carlo samples after ``"mc"``.
        density_nodes: After ``"lanczos"``: nodes of the spectral density estimate, ascending.
        density_weights: Their weights, summing to 1 (see ``lanczos_density``).
    """

    eigvals: Tensor
    selected: Tensor
    gram_eigvecs: Tensor | None
    eigvecs: list[Tensor] | None = None
    first_derivatives: Tensor | None = None
    second_derivatives: Tensor | None = None
    gradient: Tensor | None = None
    gradient_norm: Tensor | None = None
    method: str = "gram"
    detail: int = 0
    density_nodes: Tensor | None = None
    density_weights: Tensor | None = None

    @property
    def grad_overlap(self) -> float:
        """Fraction Σ_k (gᵀ e_k)² / ‖g‖² of the gradient's squared norm in the selected eigenspace."""
        if self.gradient is None or self.gradient_norm is None:
            raise ValueError("No gradient projections: compute with directional_derivatives=True.")
        if self.gradient_norm == 0:
            return 0.0
        return (self.gradient.square().sum() / self.gradient_norm.square()).item()

    def snr(self) -> Tensor:
        """Signal-to-noise ratio of the curvature along each e_k, mean_n(λ_nk)² / var_n(λ_nk).

        The variance is the unbiased sample variance over the N samples (N ≥ 2 required).
        """
        if self.second_derivatives is None:
            raise ValueError("No second derivatives: compute with directional_derivatives=True.")
        mean = self.second_derivatives.mean(dim=0)
        return mean.square() / self.second_derivatives.var(dim=0)


def compute_curvature(
    model: Module,
    loss_func: Module,
    inputs: Tensor,
    targets: Tensor,
    param_groups: Mapping[str, Sequence[Parameter]],
    approximation: str = "exact",
    mc_samples: int = 1,
    dtype: torch.dtype = torch.float64,
    subsampling: Sequence[int] | None = None,
    top_k: int | None = None,
    min_eigval: float = 0.0,
    eigvecs: bool = False,
    directional_derivatives: bool = False,
    path: str = "auto",
    memory_budget_gb: float | None = None,
    on_budget_exceeded: str = "error",
    density_probes: int = 2,
    density_steps: int = 20,
) -> dict[str, GroupCurvature]:
    """Compute each group's GGN eigenvalues and, on request, eigenvectors and directional derivatives.

    Args:
        model: The network; extended with BackPACK in place.
        loss_func: ``MSELoss`` or ``CrossEntropyLoss``; extended in place.
        inputs: Batch inputs, batch axis first.
        targets: Batch targets, batch axis first.
        param_groups: Group name to parameters.
        approximation: ``"exact"`` or ``"mc"``.
        mc_samples: Monte-Carlo samples per datum for ``"mc"``.
        dtype: Precision of the Gram matrices and eigensolves.
        subsampling: Indices of the samples whose GGN is computed. The result is the GGN of the
            mean loss over these samples (BackPACK keeps the full batch's 1/N, corrected here).
        top_k: Select at most this many leading eigenpairs; None selects all.
        min_eigval: Select only eigenvalues above this value. Zero eigenvalues are never selected.
        eigvecs: Map the selected eigenvectors to parameter space (a second backward pass).
        directional_derivatives: Compute γ_nk, λ_nk and the gradient projections.
        path: Gram path of Linear and convolution weights, see ``GramAccumulator``.
        memory_budget_gb: Budget for the estimated peak memory of the backward pass; None for
            no check.
        on_budget_exceeded: What happens when the estimate exceeds the budget. ``"error"``
            raises ``MemoryBudgetError``. ``"chunked"`` (exact GGN only) assembles the same Gram
            matrix from passes over pairs of sample chunks, as large as fit. ``"mc"`` uses the
            largest number of Monte-Carlo samples that fits. ``"lanczos"`` computes the
            ``top_k`` eigenpairs and a spectral density of each group matrix-free (no
            directional derivatives). ``GroupCurvature.method`` names the one that ran.
        density_probes: Random probes of the spectral density after a Lanczos fallback; 0: none.
        density_steps: Lanczos steps per probe of the spectral density.

    Raises:
        ValueError: If the loss, the batch shapes or the subsampling indices break the
            constraints of the method (see ``check_constraints``).
        MemoryBudgetError: If the estimate exceeds the budget and ``on_budget_exceeded="error"``.
    """
    num_samples = inputs.shape[0]
    check_constraints(loss_func, inputs, targets, subsampling, directional_derivatives)
    if on_budget_exceeded not in BUDGET_ACTIONS:
        raise ValueError(f"Invalid on_budget_exceeded={on_budget_exceeded!r}: use one of {BUDGET_ACTIONS}.")
    if on_budget_exceeded == "chunked" and approximation != "exact":
        raise ValueError(
            f"Invalid on_budget_exceeded='chunked' with approximation={approximation!r}: chunks need the "
            "same Monte-Carlo draws in every pass, so use on_budget_exceeded=mc or error."
        )
    subset = list(range(num_samples)) if subsampling is None else list(subsampling)
    subset_size = len(subset)
    scale = num_samples / subset_size

    method, detail, chunk_size = "gram", 0, subset_size
    if memory_budget_gb is not None:
        fallback = plan_for_budget(
            model, loss_func, inputs, param_groups, memory_budget_gb, on_budget_exceeded, approximation,
            mc_samples, dtype, subsampling, top_k, directional_derivatives, path, density_probes, density_steps,
        )
        if fallback == "lanczos":
            return _lanczos_fallback(
                model, loss_func, inputs, targets, param_groups, subsampling, top_k, min_eigval, eigvecs,
                directional_derivatives, density_probes, density_steps,
            )
        if fallback is not None:
            method, detail = fallback
            if method == "mc":
                approximation, mc_samples = "mc", detail
            else:
                chunk_size = _ceil_div(subset_size, detail)

    rng_before = _rng_state(inputs.device)
    if chunk_size < subset_size:
        grams, dropped_columns = _chunked_grams(
            model, loss_func, inputs, targets, param_groups, dtype, subset, chunk_size, directional_derivatives, path
        )
    else:
        accumulator = GramAccumulator(
            param_groups, approximation, mc_samples, dtype, subsampling, with_gradient=directional_derivatives,
            path=path,
        )
        run_backward(model, loss_func, inputs, targets, accumulator)
        check_all_groups_computed(accumulator)
        grams, dropped_columns = accumulator.grams, accumulator.dropped_columns
    rng_after = _rng_state(inputs.device)
    model_eps = torch.finfo(next(iter(param_groups.values()))[0].dtype).eps

    results: dict[str, GroupCurvature] = {}
    for name in param_groups:
        extended = grams[name]
        rows = extended.shape[0] - (subset_size if directional_derivatives else 0)
        gram = scale * extended[:rows, :rows]
        if eigvecs or directional_derivatives:
            eigvals, vectors = torch.linalg.eigh(gram)
            vectors = vectors.flip(1)
        else:
            eigvals, vectors = torch.linalg.eigvalsh(gram), None
        eigvals = zero_noise(eigvals.flip(0), rows, dtype)
        if dropped_columns:
            # The reduced cross-entropy factor leaves out N columns whose eigenvalues are exactly 0.
            eigvals = torch.cat([eigvals, eigvals.new_zeros(dropped_columns * subset_size)])
        chosen = select_eigvals(eigvals, top_k, min_eigval, model_eps, name, warn=eigvecs or directional_derivatives)
        result = GroupCurvature(
            eigvals, eigvals[chosen], None if vectors is None else vectors[:, chosen], method=method, detail=detail
        )
        if directional_derivatives:
            _add_directional_derivatives(result, extended, rows, num_samples, subset_size, scale)
        results[name] = result

    if eigvecs:
        _set_rng_state(inputs.device, rng_before)
        chunks = [subset[first : first + chunk_size] for first in range(0, subset_size, chunk_size)]
        _map_eigvecs(
            model, loss_func, inputs, targets, param_groups, approximation, mc_samples, dtype, path, chunks, results,
            scale,
        )
        _set_rng_state(inputs.device, rng_after)
    model.zero_grad(set_to_none=True)
    return results


def plan_for_budget(
    model: Module,
    loss_func: Module,
    inputs: Tensor,
    param_groups: Mapping[str, Sequence[Parameter]],
    budget_gb: float,
    action: str,
    approximation: str = "exact",
    mc_samples: int = 1,
    dtype: torch.dtype = torch.float64,
    subsampling: Sequence[int] | None = None,
    top_k: int | None = None,
    directional_derivatives: bool = False,
    path: str = "auto",
    density_probes: int = 2,
    density_steps: int = 20,
    announce: bool = True,
) -> str | tuple[str, int] | None:
    """Check the memory estimate against the budget and choose the fallback if it does not fit.

    The arguments are those of ``compute_curvature``. The estimate depends on shapes only, so a
    check before training gives the plan of every checkpoint. ``announce`` logs a warning with
    the estimate when a fallback is chosen.

    Returns:
        None if the plain Gram computation fits, else the fallback. That is ``"lanczos"``,
        ``("mc", M)`` with the largest number of Monte-Carlo samples M that fits, or
        ``("chunked", P)`` with the fewest sample chunks P (at least 3) whose pairs fit.

    Raises:
        MemoryBudgetError: If the action is ``"error"``, or no setting of the fallback fits.
    """
    with torch.no_grad():
        num_outputs = model(inputs[:2]).shape[1:].numel()
    columns = factor_columns(loss_func, num_outputs, approximation, mc_samples)
    extra = int(directional_derivatives)
    subset_size = len(inputs) if subsampling is None else len(subsampling)
    sizes = module_sizes(model, inputs)

    def estimate(columns_per_sample: int, pass_samples: int):
        return estimate_memory(
            model, inputs, param_groups, columns_per_sample + extra, pass_samples, dtype, path,
            total_samples=subset_size, sizes=sizes,
        )

    plain = estimate(columns, subset_size)
    if check_budget(plain, budget_gb):
        return None
    if action == "error":
        raise budget_error(plain, budget_gb)

    prefix = f"Gram computation needs an estimated {plain.describe()}, above the memory budget of {budget_gb} GB"
    if action == "lanczos":
        # scipy's eigsh keeps max(2k + 1, 20) float64 vectors of the group's size, and the density
        # one more per Lanczos step. The GGN-vector products keep the activations.
        largest = max(sum(p.numel() for p in params) for params in param_groups.values())
        vectors = min(largest, max(2 * (top_k or 1) + 1, 20)) + (density_steps if density_probes > 0 else 0)
        needed = plain.activations + 8 * vectors * largest
        if needed > budget_gb * 1e9:
            raise MemoryBudgetError(
                f"The Lanczos fallback needs an estimated {needed / 1e9:.3g} GB ({vectors} vectors of "
                f"{largest} parameters and the activations), above the memory budget of {budget_gb} GB. "
                "Lower curvature.batch_size, top_k or density_steps, or raise curvature.memory_budget_gb."
            )
        if announce:
            log.warning("%s: using Lanczos", prefix)
        return "lanczos"

    if action == "mc":
        fitting = [m for m in range(columns - 1, 0, -1) if check_budget(estimate(m, subset_size), budget_gb)]
        if not fitting:
            raise MemoryBudgetError(
                f"The MC fallback needs an estimated {estimate(1, subset_size).describe()} even with one "
                f"Monte-Carlo sample per datum, above the memory budget of {budget_gb} GB. Lower "
                "curvature.batch_size or curvature.subsampling, raise curvature.memory_budget_gb, or set "
                "curvature.on_budget_exceeded=lanczos."
            )
        if announce:
            log.warning("%s: using the MC GGN with %d samples", prefix, fitting[0])
        return "mc", fitting[0]

    # Chunks of at most a third of the samples, so that a pass over two of them saves memory.
    for chunk_size in range(_ceil_div(subset_size, 3), 0, -1):
        if check_budget(estimate(columns, 2 * chunk_size), budget_gb):
            chunks = _ceil_div(subset_size, chunk_size)
            if announce:
                log.warning("%s: assembling it from %d chunks of at most %d samples", prefix, chunks, chunk_size)
            return "chunked", chunks
    raise MemoryBudgetError(
        f"The chunked fallback needs an estimated {estimate(columns, 2).describe()} even with chunks of "
        f"one sample, above the memory budget of {budget_gb} GB: the whole Gram matrix "
        f"({(columns + extra) * subset_size}² entries per group) must still fit. Lower curvature.batch_size "
        "or curvature.subsampling, raise curvature.memory_budget_gb, or set curvature.on_budget_exceeded "
        "to mc or lanczos."
    )


def _factor_rows(columns: int, num_samples: int, positions: Sequence[int], device: torch.device) -> Tensor:
    """Return the rows r·N + n of a Gram matrix ordered (r, n) for the samples n at ``positions``."""
    index = torch.tensor(list(positions))
    return (torch.arange(columns).unsqueeze(1) * num_samples + index).flatten().to(device)


def _ceil_div(numerator: int, denominator: int) -> int:
    """Return ⌈numerator / denominator⌉ for positive integers."""
    return -(-numerator // denominator)


def _chunked_grams(
    model: Module,
    loss_func: Module,
    inputs: Tensor,
    targets: Tensor,
    param_groups: Mapping[str, Sequence[Parameter]],
    dtype: torch.dtype,
    subset: list[int],
    chunk_size: int,
    with_gradient: bool,
    path: str,
) -> tuple[dict[str, Tensor], int]:
    """Assemble each group's (extended) Gram matrix over ``subset`` from passes over pairs of chunks.

    The pass over chunks a and b gives the blocks (a, a), (a, b), (b, a) and (b, b). BackPACK
    keeps the whole batch's 1/N under subsampling, so the blocks are those of one pass over
    ``subset``. Rows are ordered (r, position in ``subset``), as in one pass.
    """
    num_samples = len(subset)
    chunks = [list(range(first, min(num_samples, first + chunk_size))) for first in range(0, num_samples, chunk_size)]
    grams: dict[str, Tensor] = {}
    dropped_columns = 0
    for first in range(len(chunks)):
        for second in range(first + 1, len(chunks)):
            positions = chunks[first] + chunks[second]
            accumulator = GramAccumulator(
                param_groups, "exact", 1, dtype, [subset[p] for p in positions], with_gradient=with_gradient, path=path
            )
            run_backward(model, loss_func, inputs, targets, accumulator)
            check_all_groups_computed(accumulator)
            dropped_columns = accumulator.dropped_columns
            for name, part in accumulator.grams.items():
                columns = part.shape[0] // len(positions)
                rows = _factor_rows(columns, num_samples, positions, part.device)
                if name not in grams:
                    grams[name] = part.new_zeros(columns * num_samples, columns * num_samples)
                grams[name][rows.unsqueeze(1), rows] = part
    return grams, dropped_columns


def _lanczos_fallback(
    model: Module,
    loss_func: Module,
    inputs: Tensor,
    targets: Tensor,
    param_groups: Mapping[str, Sequence[Parameter]],
    subsampling: Sequence[int] | None,
    top_k: int | None,
    min_eigval: float,
    eigvecs: bool,
    directional_derivatives: bool,
    density_probes: int,
    density_steps: int,
) -> dict[str, GroupCurvature]:
    """Compute each group's ``top_k`` eigenpairs and spectral density with Lanczos on GGN-vector products."""
    if top_k is None or directional_derivatives:
        raise ValueError(
            "The Lanczos fallback computes top_k eigenpairs only: set top_k and turn off "
            "directional derivatives, or set on_budget_exceeded=error."
        )
    if subsampling is not None:
        inputs, targets = inputs[list(subsampling)], targets[list(subsampling)]

    results: dict[str, GroupCurvature] = {}
    for name, params in param_groups.items():
        eigvals, vectors = lanczos_eigenpairs(model, loss_func, inputs, targets, params, top_k)
        eigvals = eigvals.clamp(min=0)
        chosen = torch.nonzero((eigvals > 0) & (eigvals > min_eigval)).flatten()
        result = GroupCurvature(eigvals, eigvals[chosen], None, method="lanczos")
        if eigvecs:
            pieces = vectors[chosen].split([p.numel() for p in params], dim=1)
            result.eigvecs = [piece.reshape(-1, *p.shape) for piece, p in zip(pieces, params)]
        if density_probes > 0:
            matvec, dim = ggn_matvec(model, loss_func, inputs, targets, params)
            nodes, weights = lanczos_density(matvec, dim, density_probes, density_steps)
            result.density_nodes, result.density_weights = nodes.clamp(min=0), weights
        results[name] = result
    return results


def check_constraints(
    loss_func: Module,
    inputs: Tensor,
    targets: Tensor,
    subsampling: Sequence[int] | None,
    directional_derivatives: bool,
) -> None:
    """Check the assumptions of the Gram method before any backward pass.

    The batch axis is the first axis of inputs and targets. Subsampling and per-sample
    directional derivatives need ``reduction="mean"``, because both rely on the loss being the
    mean of per-sample losses with the 1/N that BackPACK applies. Subsampling indices must be
    distinct and in range.
    """
    num_samples = inputs.shape[0]
    if targets.shape[0] != num_samples:
        raise ValueError(
            f"Inputs have {num_samples} samples but targets have {targets.shape[0]} along the first "
            "axis: the batch axis must come first in both."
        )
    needs_mean = subsampling is not None or directional_derivatives
    reduction = getattr(loss_func, "reduction", None)
    if needs_mean and reduction != "mean":
        raise ValueError(
            f"Invalid loss reduction {reduction!r} for subsampling or directional derivatives: "
            "use reduction='mean'."
        )
    if subsampling is None:
        return
    indices = list(subsampling)
    if len(indices) == 0 or len(set(indices)) != len(indices):
        raise ValueError(f"Invalid subsampling {indices}: give distinct sample indices, at least one.")
    if min(indices) < 0 or max(indices) >= num_samples:
        raise ValueError(f"Invalid subsampling {indices}: indices must be in [0, {num_samples}).")
    if directional_derivatives and len(indices) < 2:
        raise ValueError(
            f"Invalid subsampling {indices} with directional derivatives: use at least 2 samples, "
            "the variance of λ_nk needs them."
        )


def select_eigvals(
    eigvals: Tensor, top_k: int | None, min_eigval: float, model_eps: float, group: str, warn: bool = True
) -> Tensor:
    """Return the indices of the selected eigenvalues: nonzero, above ``min_eigval``, at most ``top_k``.

    With ``warn`` (eigenvectors or directional derivatives requested), warns if a selected λ is
    below sqrt(eps)·λ_max, eps the precision of the model's dtype in which BackPACK computes V.
    There the error of e_k = V u_k / sqrt(λ) (about eps·sqrt(λ_max / λ) relative) and the mixing
    of u_k with close eigenvectors are large.
    """
    if top_k is not None and top_k < 1:
        raise ValueError(f"Invalid top_k={top_k}: it must be at least 1, or None for all.")
    chosen = torch.nonzero((eigvals > 0) & (eigvals > min_eigval)).flatten()
    if top_k is not None:
        chosen = chosen[:top_k]

    if warn and chosen.numel() > 0:
        stable = model_eps**0.5 * eigvals[0]
        unstable = int((eigvals[chosen] < stable).sum())
        if unstable:
            warnings.warn(
                f"Group {group!r}: {unstable} selected eigenvalues are below {stable.item():.3g} "
                f"(sqrt(eps)·λ_max), so their eigenvectors are unreliable: raise min_eigval or lower top_k.",
                stacklevel=3,
            )
    return chosen


def _add_directional_derivatives(
    result: GroupCurvature, extended: Tensor, rows: int, num_samples: int, subset_size: int, scale: float
) -> None:
    """Fill γ_nk, λ_nk and the gradient projections from the extended Gram matrix.

    The gradient rows of the factor are 1/N ∇ℓ_n (N the full batch, BackPACK's scale), and the
    factor rows V_raw = V / sqrt(scale).
    """
    vectors, eigvals = result.gram_eigvecs, result.selected
    gradient_by_factor = extended[rows:, :rows]
    gradient_gram = extended[rows:, rows:]

    first = num_samples * (gradient_by_factor @ vectors) * (scale / eigvals).sqrt()
    squared = vectors.square().reshape(-1, subset_size, vectors.shape[1]).sum(dim=0)
    result.first_derivatives = first
    result.second_derivatives = subset_size * eigvals * squared
    result.gradient = first.mean(dim=0)
    result.gradient_norm = (num_samples / subset_size) * gradient_gram.sum().clamp(min=0).sqrt()


def _map_eigvecs(
    model: Module,
    loss_func: Module,
    inputs: Tensor,
    targets: Tensor,
    param_groups: Mapping[str, Sequence[Parameter]],
    approximation: str,
    mc_samples: int,
    dtype: torch.dtype,
    path: str,
    chunks: list[list[int]],
    results: dict[str, GroupCurvature],
    scale: float,
) -> None:
    """Map each group's u_k to e_k = V u_k / sqrt(λ_k) in one more backward pass per sample chunk.

    V u is the sum over chunks of V_chunk u_chunk, where u_chunk has the rows (r, n) of u with n
    in the chunk. Without the chunked fallback there is one chunk, so one pass.
    """
    num_samples = sum(len(chunk) for chunk in chunks)
    # V_raw u / sqrt(λ_raw) with λ_raw = λ / scale.
    coefficients = {name: result.gram_eigvecs * (scale / result.selected).sqrt() for name, result in results.items()}
    totals: dict[int, Tensor] = {}
    offset = 0
    for chunk in chunks:
        # One chunk of the whole batch in order is the plain pass, without subsampling.
        whole_batch = chunk == list(range(len(inputs)))
        accumulator = GramAccumulator(
            param_groups, approximation, mc_samples, dtype, None if whole_batch else chunk, path=path
        )
        positions = list(range(offset, offset + len(chunk)))
        offset += len(chunk)
        accumulator.coefficients = {}
        for name, values in coefficients.items():
            columns = values.shape[0] // num_samples
            rows = _factor_rows(columns, num_samples, positions, values.device)
            accumulator.coefficients[name] = values[rows]
        run_backward(model, loss_func, inputs, targets, accumulator)
        for key, projection in accumulator.projections.items():
            totals[key] = projection if key not in totals else totals[key] + projection

    for name, params in param_groups.items():
        pieces = [totals[id(p)].T.reshape(-1, *p.shape) for p in params]
        norm = torch.sqrt(sum(piece.flatten(start_dim=1).square().sum(dim=1) for piece in pieces))
        results[name].eigvecs = [piece / norm.reshape(-1, *([1] * (piece.dim() - 1))) for piece in pieces]


def _rng_state(device: torch.device) -> tuple[Tensor, list[Tensor] | None]:
    """Return the CPU and, for a CUDA batch, the CUDA random states (MC samples, dropout)."""
    cuda = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state: tuple[Tensor, list[Tensor] | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])
