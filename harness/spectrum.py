"""The GGN spectrum at one checkpoint: Gram eigenvalues per group, validated where feasible."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from backpack import disable
from torch import Tensor
from torch.nn import Module, Parameter
from tqdm.auto import tqdm

from harness.curvature import GroupCurvature, ValidationResult, compare_eigvals, compute_curvature, exact_ggn
from harness.curvature.eigen import plan_for_budget
from harness.tracking import metric_key

log = logging.getLogger(__name__)


@dataclass
class Spectrum:
    """Eigenvalues of each group's GGN block at one training step.

    Attributes:
        step: Number of optimizer updates before this checkpoint.
        eigvals: Group name to its Gram eigenvalues, descending, numerically zero ones as 0.
        validation: Group name to its comparison with the exact GGN, for validated groups.
        seconds: Wall-clock time of the Gram computation and eigensolves.
        gradient_seconds: Wall-clock time of one gradient of the loss on the curvature batch,
            measured just before, the unit in which the cost of the spectrum is reported.
        validation_seconds: Wall-clock time of the exact reference.
        curvature: Group name to its selected eigenpairs and directional derivatives.
    """

    step: int
    eigvals: dict[str, Tensor]
    validation: dict[str, ValidationResult] = field(default_factory=dict)
    curvature: dict[str, GroupCurvature] = field(default_factory=dict)
    seconds: float = 0.0
    gradient_seconds: float = 0.0
    validation_seconds: float = 0.0

    def metrics(self, top_k: int, threshold: float) -> dict[str, float]:
        """Return the checkpoint's metrics under the documented keys ``ggn/...``, ``validation/...``."""
        metrics = {"ggn/compute_seconds": self.seconds}
        if self.gradient_seconds > 0:
            metrics["ggn/gradient_seconds"] = self.gradient_seconds
            metrics["ggn/cost_in_gradients"] = self.seconds / self.gradient_seconds
        for group, eigvals in self.eigvals.items():
            curvature = self.curvature.get(group)
            # The Lanczos fallback has only the top-k eigenvalues: no count, no trace.
            whole = curvature is None or curvature.method != "lanczos"
            metrics[metric_key("ggn", group, "eigval_max")] = eigvals[0].item()
            if whole:
                metrics[metric_key("ggn", group, "num_eigvals_above")] = int((eigvals > threshold).sum())
            for rank, value in enumerate(eigvals[:top_k].tolist(), start=1):
                metrics[metric_key("ggn", group, f"eigval_{rank}")] = value
            if whole:
                metrics[metric_key("ggn", group, "trace")] = eigvals.sum().item()
            if curvature is not None and curvature.method != "gram":
                value = 1 if curvature.method == "lanczos" else curvature.detail
                metrics[metric_key("ggn", group, f"fallback_{curvature.method}")] = value
            if curvature is not None and curvature.second_derivatives is not None:
                metrics[metric_key("ggn", group, "grad_overlap")] = curvature.grad_overlap
                for rank, value in enumerate(curvature.snr().tolist(), start=1):
                    metrics[metric_key("ggn", group, f"snr_{rank}")] = value
        for group, result in self.validation.items():
            metrics[metric_key("validation", group, "max_abs_err")] = result.max_abs_err
            metrics[metric_key("validation", group, "max_rel_err")] = result.max_rel_err
            metrics[metric_key("validation", group, "passed")] = float(result.passed)
        if self.validation:
            metrics["validation/seconds"] = self.validation_seconds
        return metrics

    def to_npz(self) -> bytes:
        """Serialize the eigenvalues as an ``.npz`` archive: one float64 array per group, plus ``step``.

        Computed eigenvectors are added as ``eigvecs/<group>``, float32 arrays [K, D] in the
        order of the group's parameters. After a Lanczos fallback, the spectral density estimate
        is added as ``density_nodes/<group>`` and ``density_weights/<group>``.
        """
        import io

        buffer = io.BytesIO()
        arrays = {name: values.double().cpu().numpy() for name, values in self.eigvals.items()}
        for name, curvature in self.curvature.items():
            if curvature.eigvecs is not None:
                flat = torch.cat([piece.flatten(start_dim=1) for piece in curvature.eigvecs], dim=1)
                arrays[f"eigvecs/{name}"] = flat.float().cpu().numpy()
            if curvature.density_nodes is not None:
                arrays[f"density_nodes/{name}"] = curvature.density_nodes.double().cpu().numpy()
                arrays[f"density_weights/{name}"] = curvature.density_weights.double().cpu().numpy()
        np.savez(buffer, step=np.array(self.step), **arrays)
        return buffer.getvalue()


class SpectrumProbe:
    """Compute and validate the GGN spectrum of fixed parameter groups on a fixed batch.

    Args:
        param_groups: Group name to parameters.
        loss_func: The (BackPACK-extended) training loss.
        inputs: The curvature batch's inputs, fixed for the run.
        targets: The curvature batch's targets.
        approximation: ``"exact"`` or ``"mc"``.
        mc_samples: Monte-Carlo samples per datum for ``"mc"``.
        dtype: Precision of the Gram matrices and eigensolves.
        validate_max_params: Groups with at most this many parameters are validated; 0 disables.
        rtol: Relative tolerance of the validation.
        atol: Absolute tolerance of the validation.
        options: Further keyword arguments of ``compute_curvature`` (``subsampling``, ``top_k``,
            ``min_eigval``, ``eigvecs``, ``directional_derivatives``, ``path``,
            ``memory_budget_gb``, ``on_budget_exceeded``, ``density_probes``, ``density_steps``).
    """

    def __init__(
        self,
        param_groups: Mapping[str, Sequence[Parameter]],
        loss_func: Module,
        inputs: Tensor,
        targets: Tensor,
        approximation: str = "exact",
        mc_samples: int = 1,
        dtype: torch.dtype = torch.float64,
        validate_max_params: int = 0,
        rtol: float = 1e-3,
        atol: float = 1e-6,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        self.options = dict(options or {})
        self.param_groups = param_groups
        self.loss_func = loss_func
        self.inputs = inputs
        self.targets = targets
        self.approximation = approximation
        self.mc_samples = mc_samples
        self.dtype = dtype
        self.rtol = rtol
        self.atol = atol
        self.validated_groups = [
            name
            for name, params in param_groups.items()
            if 0 < sum(p.numel() for p in params) <= validate_max_params
        ]

    def compute(self, model: Module, step: int) -> Spectrum:
        """Return the spectrum of ``model`` at ``step``; the parameters' ``.grad`` is cleared after."""
        gradient_seconds = self._time_gradient(model)
        start = time.perf_counter()
        curvature = compute_curvature(
            model,
            self.loss_func,
            self.inputs,
            self.targets,
            self.param_groups,
            self.approximation,
            self.mc_samples,
            self.dtype,
            **self.options,
        )
        eigvals = {name: result.eigvals for name, result in curvature.items()}
        spectrum = Spectrum(
            step, eigvals, seconds=time.perf_counter() - start, gradient_seconds=gradient_seconds, curvature=curvature
        )

        start = time.perf_counter()
        subset = self.options.get("subsampling")
        inputs = self.inputs if subset is None else self.inputs[list(subset)]
        targets = self.targets if subset is None else self.targets[list(subset)]
        # A bar on a terminal only (disable=None), because the exact GGN of many groups takes a while.
        # The MC fallback's spectrum is not the exact GGN's, so it is not compared with it.
        groups = [name for name in self.validated_groups if curvature[name].method != "mc"]
        if len(groups) < len(self.validated_groups):
            log.info("Validation skipped at step %d: the MC fallback's spectrum is not the exact GGN's", step)
        for name in tqdm(groups, desc=f"validate step {step}", unit="group", leave=False, disable=None, file=sys.stderr):
            ggn = exact_ggn(model, self.loss_func, inputs, targets, self.param_groups[name])
            spectrum.validation[name] = compare_eigvals(eigvals[name], ggn, self.rtol, self.atol)
        spectrum.validation_seconds = time.perf_counter() - start
        return spectrum

    def check_budget(self, model: Module) -> None:
        """Check the memory budget before training: raise if the computation cannot fit, else log the plan.

        Raises:
            MemoryBudgetError: If the estimate exceeds ``memory_budget_gb`` and neither the
                configured action nor any setting of its fallback fits.
        """
        options = {key: value for key, value in self.options.items() if key not in ("min_eigval", "eigvecs")}
        budget = options.pop("memory_budget_gb", None)
        if budget is None:
            return
        training = model.training
        model.eval()
        try:
            plan = plan_for_budget(
                model, self.loss_func, self.inputs, self.param_groups, budget, options.pop("on_budget_exceeded", "error"),
                self.approximation, self.mc_samples, self.dtype, announce=False, **options,
            )
        finally:
            model.train(training)
        if plan == "lanczos":
            log.info("The Gram computation exceeds the memory budget of %s GB: it will use the Lanczos fallback", budget)
        elif plan is not None:
            unit = "chunks of the curvature batch" if plan[0] == "chunked" else "Monte-Carlo samples per datum"
            log.info(
                "The Gram computation exceeds the memory budget of %s GB: it will use the %s fallback with %d %s",
                budget, plan[0], plan[1], unit,
            )

    def _time_gradient(self, model: Module) -> float:
        """Return the seconds of one forward and backward pass of the loss on the curvature batch."""
        params = [p for group in self.param_groups.values() for p in group]
        start = time.perf_counter()
        with disable():
            loss = self.loss_func(model(self.inputs), self.targets)
            torch.autograd.grad(loss, params)
        return time.perf_counter() - start


def curvature_options(cfg: Any) -> dict[str, Any]:
    """Return the ``compute_curvature`` options of a ``curvature`` config as keyword arguments."""
    curvature = cfg.curvature
    return {
        "subsampling": None if curvature.subsampling is None else range(curvature.subsampling),
        "top_k": curvature.top_k,
        "min_eigval": curvature.min_eigval,
        "eigvecs": curvature.eigvecs,
        "directional_derivatives": curvature.directional_derivatives,
        "path": curvature.gram_path.value,
        "memory_budget_gb": curvature.memory_budget_gb,
        "on_budget_exceeded": curvature.on_budget_exceeded.value,
        "density_probes": curvature.density_probes,
        "density_steps": curvature.density_steps,
    }
