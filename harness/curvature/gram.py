"""Gram matrices of the GGN's symmetric factor, accumulated during one BackPACK backward pass.

The generalized Gauss-Newton matrix of a loss averaged or summed over N samples with C model
outputs factorizes as G = V Vᵀ with V of shape [D, N·C]. Its nonzero eigenvalues are those of the
Gram matrix Vᵀ V of shape [N·C, N·C], which is small when D is large. BackPACK's ``SqrtGGNExact``
and ``SqrtGGNMC`` extensions backpropagate the factor S of V to each module's output. For Linear
and convolution layers, the module extensions here take the cheaper of two paths (see
``harness.curvature.structured``): they contract S with the layer input into the Gram matrix
without building the layer's slice of V, or they build that slice a few output features at a
time. For every other layer, BackPACK builds the parameter's slice of V and the extension hook
contracts it and deletes it at once, so V of the whole net never exists in memory.

For cross-entropy, the Hessian of the loss with respect to the C logits of a sample,
diag(p) − p pᵀ, has rank C − 1. BackPACK's factor of it has C columns; by default the loss rule
here replaces it by an exact factor with C − 1 columns, which shrinks every later step (the
backpropagation and the Gram contractions) by a factor (C − 1)/C or its square. The Gram matrix
then has N rows fewer; the eigenvalues it lacks are exactly zero.

Optionally the factor carries one extra column per sample, the gradient of the loss with respect
to the model output. BackPACK backpropagates it like the other columns, so the Gram matrix then
also contains the products of per-sample gradients with V and with each other.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
from backpack import backpack, extend
from backpack.extensions import SqrtGGNExact, SqrtGGNMC
from backpack.extensions.secondorder.sqrt_ggn.convnd import SqrtGGNConv1d, SqrtGGNConv2d, SqrtGGNConv3d
from backpack.extensions.secondorder.sqrt_ggn.linear import SqrtGGNLinear
from backpack.extensions.secondorder.sqrt_ggn.losses import SqrtGGNCrossEntropyLoss, SqrtGGNMSELoss
from torch import Tensor
from torch.nn import Conv1d, Conv2d, Conv3d, CrossEntropyLoss, Linear, Module, MSELoss, Parameter

from harness.curvature import structured
from harness.curvature.structured import PATHS

APPROXIMATIONS = ("exact", "mc")


class GramAccumulator:
    """Per-group Gram matrices Vᵀ V of the GGN factor, filled during one BackPACK backward pass.

    Use ``extension`` and ``hook`` in one ``backpack(...)`` context around ``loss.backward()``.
    Rows and columns of a group's matrix are ordered (r, n), r the factor column of a sample
    (class or Monte-Carlo sample, then the gradient column if ``with_gradient``), n the sample.
    No scale correction is applied here: with ``subsampling``, BackPACK keeps the loss's
    1/N of the full batch.

    With ``coefficients`` set (group name to U of shape [rows, K]), the same pass computes
    Vᵀ U per parameter into ``projections`` instead of Gram matrices.

    Args:
        param_groups: Group name to the parameters of that group. A parameter may be in one
            group at most.
        approximation: ``"exact"`` (``SqrtGGNExact``) or ``"mc"`` (``SqrtGGNMC``).
        mc_samples: Number of Monte-Carlo samples per datum when ``approximation="mc"``.
        dtype: Precision of the Gram matrices. The factor is cast to it before contraction.
        subsampling: Indices of the samples whose factor is computed; ``None`` for all.
        with_gradient: Append the per-sample gradient column to the factor.
        path: For Linear and convolution weights: ``"auto"`` (per layer, the cheaper of
            structured and chunked), ``"structured"``, ``"chunked"`` (wherever they apply), or
            ``"materialized"`` (BackPACK's whole slice of V, the reference).
        reduced_factor: For the exact GGN of a cross-entropy loss, factor each sample's loss
            Hessian with C − 1 columns instead of BackPACK's C (see the module docstring).
            ``dropped_columns`` then says how many factor columns per sample were left out.

    Raises:
        ValueError: If the approximation or path is unknown, ``mc_samples < 1``, a group is
            empty, or a parameter is in two groups.
    """

    def __init__(
        self,
        param_groups: Mapping[str, Sequence[Parameter]],
        approximation: str = "exact",
        mc_samples: int = 1,
        dtype: torch.dtype = torch.float64,
        subsampling: Sequence[int] | None = None,
        with_gradient: bool = False,
        path: str = "auto",
        reduced_factor: bool = True,
    ) -> None:
        if approximation not in APPROXIMATIONS:
            raise ValueError(
                f"Invalid approximation {approximation!r}: use one of {APPROXIMATIONS}."
            )
        if mc_samples < 1:
            raise ValueError(f"Invalid mc_samples={mc_samples}: it must be at least 1.")
        if path not in PATHS:
            raise ValueError(f"Invalid Gram path {path!r}: use one of {PATHS}.")

        self._group_of: dict[int, str] = {}
        for name, params in param_groups.items():
            if len(params) == 0:
                raise ValueError(f"Parameter group {name!r} is empty: remove it or add parameters.")
            for param in params:
                if id(param) in self._group_of:
                    raise ValueError(
                        f"A parameter of shape {tuple(param.shape)} is in groups "
                        f"{self._group_of[id(param)]!r} and {name!r}: put it in one group only."
                    )
                self._group_of[id(param)] = name

        self.group_names = list(param_groups)
        self.approximation = approximation
        self.mc_samples = mc_samples
        self.dtype = dtype
        self.subsampling = None if subsampling is None else list(subsampling)
        self.with_gradient = with_gradient
        self.path = path
        self.reduced_factor = reduced_factor
        self.dropped_columns = 0
        self.grams: dict[str, Tensor] = {}
        self.coefficients: dict[str, Tensor] | None = None
        self.projections: dict[int, Tensor] = {}
        self.paths: dict[int, str] = {}

    @property
    def savefield(self) -> str:
        """Name of the parameter attribute where BackPACK stores the factor."""
        return "sqrt_ggn_exact" if self.approximation == "exact" else "sqrt_ggn_mc"

    def extension(self) -> SqrtGGNExact | SqrtGGNMC:
        """Return the BackPACK extension, with this accumulator's Linear, convolution and loss rules."""
        if self.approximation == "exact":
            extension = SqrtGGNExact(subsampling=self.subsampling)
        else:
            extension = SqrtGGNMC(mc_samples=self.mc_samples, subsampling=self.subsampling)

        layer_rules = {
            Linear: SqrtGGNLinear,
            Conv1d: SqrtGGNConv1d,
            Conv2d: SqrtGGNConv2d,
            Conv3d: SqrtGGNConv3d,
        }
        for module_type, base in layer_rules.items():
            extension.set_module_extension(module_type, _gram_layer_rule(base, self), overwrite=True)
        loss_rules = {}
        if self.with_gradient:
            loss_rules = {MSELoss: SqrtGGNMSELoss, CrossEntropyLoss: SqrtGGNCrossEntropyLoss}
        if self.reduced_factor and self.approximation == "exact":
            loss_rules[CrossEntropyLoss] = _reduced_cross_entropy_rule(self)
        for module_type, base in loss_rules.items():
            rule = _gradient_loss_rule(base) if self.with_gradient else base()
            extension.set_module_extension(module_type, rule, overwrite=True)
        return extension

    def hook(self, module: Module) -> None:
        """Contract the materialized factors of ``module``'s own parameters, then free them."""
        for param in module.parameters(recurse=False):
            if not hasattr(param, self.savefield):
                continue
            # The Linear and convolution rules store None: their contribution is already added.
            factor = getattr(param, self.savefield)
            delattr(param, self.savefield)
            if factor is not None:
                self.add_factor(param, factor.flatten(start_dim=2).flatten(end_dim=1))

    def group_of(self, param: Parameter) -> str | None:
        """Return the group of ``param``, or None if it is in no group."""
        return self._group_of.get(id(param))

    def add_factor(self, param: Parameter, factor: Tensor) -> None:
        """Add the Gram matrix of a parameter's factor slice [rows, D_p], or its projection."""
        group = self.group_of(param)
        if group is None:
            return
        factor = factor.to(self.dtype)
        if self.coefficients is not None:
            self.add_projection(param, factor.T @ self.coefficients[group])
        else:
            self.add_gram(group, factor @ factor.T)

    def add_gram(self, group: str, gram: Tensor) -> None:
        """Add a parameter's contribution to its group's Gram matrix."""
        if group in self.grams:
            self.grams[group] += gram
        else:
            self.grams[group] = gram

    def add_projection(self, param: Parameter, projection: Tensor) -> None:
        """Store V_pᵀ U of shape [D_p, K] for ``param``."""
        self.projections[id(param)] = projection

    def reset(self) -> None:
        """Drop the Gram matrices and projections of the previous backward pass."""
        self.grams = {}
        self.projections = {}
        self.dropped_columns = 0


def _gram_layer_rule(base: type, accumulator: GramAccumulator):
    """Build a BackPACK module extension for a Linear or convolution layer from its ``base``.

    It backpropagates like ``base``, but for the layer's parameters it adds their Gram
    contribution (or V-projection) to ``accumulator`` and stores nothing on the parameter.
    """

    class GramLayerRule(base):
        def weight(self, ext, module, g_inp, g_out, backproped):
            self._contract(ext, module, g_inp, g_out, backproped, "weight")

        def bias(self, ext, module, g_inp, g_out, backproped):
            self._contract(ext, module, g_inp, g_out, backproped, "bias")

        def _contract(self, ext, module, g_inp, g_out, backproped, name):
            param = getattr(module, name)
            group = accumulator.group_of(param)
            if group is None:
                return
            path = _weight_path(module, backproped, accumulator.path) if name == "weight" else "structured"
            accumulator.paths[id(param)] = path

            if path == "materialized":
                factor = self.derivatives.param_mjp(
                    name, module, g_inp, g_out, backproped, sum_batch=False, subsampling=ext.get_subsampling()
                )
                accumulator.add_factor(param, factor.flatten(start_dim=2).flatten(end_dim=1))
                return

            if name == "bias":
                factor = structured.layer_factor(module, backproped).to(accumulator.dtype)
                accumulator.add_factor(param, structured.structured_bias_factor(factor))
                return
            inputs, factor = structured.layer_input_and_factor(module, backproped)
            inputs = _subsample(inputs, ext.get_subsampling()).to(accumulator.dtype)
            factor = factor.to(accumulator.dtype)
            if accumulator.coefficients is not None:
                projection = structured.structured_weight_vjp(inputs, factor, accumulator.coefficients[group])
                accumulator.add_projection(param, projection.flatten(start_dim=1).T)
            elif path == "chunked":
                accumulator.add_gram(group, structured.chunked_weight_gram(inputs, factor))
            else:
                accumulator.add_gram(group, structured.structured_weight_gram(inputs, factor))

    return GramLayerRule()


def _weight_path(module: Module, backproped: Tensor, requested: str) -> str:
    """Choose the structured or materialized path for ``module``'s weight."""
    if not structured.supports_structured(module) or requested == "materialized":
        return "materialized"
    if requested == "structured":
        return "structured"
    positions, out_features, in_features = structured.layer_dims(module)
    rows, num_samples = backproped.shape[0] * backproped.shape[1], backproped.shape[1]
    if requested == "chunked":
        return "chunked"
    return structured.choose_path(
        structured.structured_cost(rows, num_samples, positions, out_features, in_features),
        structured.chunked_cost(rows, positions, out_features, in_features),
    )


def _subsample(tensor: Tensor, subsampling: list[int] | None) -> Tensor:
    return tensor if subsampling is None else tensor[subsampling]


def factor_columns(loss_func: Module, num_outputs: int, approximation: str = "exact", mc_samples: int = 1) -> int:
    """Return the factor columns per sample of ``GramAccumulator`` with the default ``reduced_factor``.

    ``mc_samples`` for the MC GGN, C − 1 for the exact GGN of cross-entropy with C ≥ 2 outputs, else C.
    """
    if approximation == "mc":
        return mc_samples
    if isinstance(loss_func, CrossEntropyLoss) and num_outputs >= 2:
        return num_outputs - 1
    return num_outputs


def reduced_cross_entropy_factor(logits: Tensor, reduction: str, batch_size: int) -> Tensor:
    """Return a factor S of shape [C − 1, N, C] with Σ_r S[r, n] S[r, n]ᵀ = the CE Hessian of sample n.

    With τ = sqrt(p) (p the softmax of the logits, ‖τ‖ = 1), the Hessian is
    diag(τ) (I − τ τᵀ) diag(τ). The Householder reflection Q = I − 2 w wᵀ / ‖w‖² with
    w = τ + e_C maps τ to −e_C, so its first C − 1 columns are an orthonormal basis of τ's
    complement and diag(τ) Q[:, :C−1] is the factor. ‖w‖² = 2 + 2 τ_C ≥ 2 keeps it stable.

    Args:
        logits: Model outputs [N, C] of the samples whose factor is computed.
        reduction: The loss's reduction; ``"mean"`` scales by 1/sqrt(batch_size) as BackPACK.
        batch_size: Number of samples of the whole batch (before subsampling).
    """
    tau = torch.softmax(logits, dim=1).sqrt()
    num_classes = tau.shape[1]
    reflector = tau.clone()
    reflector[:, -1] += 1
    weights = tau[:, :-1] / (1 + tau[:, -1:])
    basis = torch.eye(num_classes, num_classes - 1, dtype=tau.dtype, device=tau.device)
    basis = basis - reflector.unsqueeze(2) * weights.unsqueeze(1)
    factor = tau.unsqueeze(2) * basis
    if reduction == "mean":
        factor = factor / batch_size**0.5
    return factor.permute(2, 0, 1)


def _reduced_cross_entropy_rule(accumulator: GramAccumulator) -> type:
    """Build a cross-entropy rule that starts the exact factor with C − 1 columns per sample."""

    class ReducedCrossEntropyRule(SqrtGGNCrossEntropyLoss):
        def backpropagate(self, ext, module, grad_inp, grad_out, backproped):
            logits = module.input0
            # The same condition as in factor_columns: only C ≥ 2 outputs of shape [N, C] are reduced.
            if logits.dim() != 2 or logits.shape[1] < 2:
                return super().backpropagate(ext, module, grad_inp, grad_out, backproped)
            self.derivatives._check_2nd_order_parameters(module)
            accumulator.dropped_columns = 1
            logits = _subsample(logits, ext.get_subsampling())
            return reduced_cross_entropy_factor(logits.detach(), module.reduction, module.input0.shape[0])

    return ReducedCrossEntropyRule


def _gradient_loss_rule(base: type):
    """Build a loss module extension that appends the output gradient as one factor column.

    ``grad_inp[0]`` is the gradient of the batch loss with respect to the model output, so its
    row n is the gradient of sample n's share of the loss (1/N ∇ℓ_n for mean reduction).
    """

    class GradientLossRule(base):
        def backpropagate(self, ext, module, grad_inp, grad_out, backproped):
            factor = super().backpropagate(ext, module, grad_inp, grad_out, backproped)
            gradient = _subsample(grad_inp[0], ext.get_subsampling())
            return torch.cat([factor, gradient.unsqueeze(0).to(factor.dtype)])

    return GradientLossRule()


def run_backward(
    model: Module,
    loss_func: Module,
    inputs: Tensor,
    targets: Tensor,
    accumulator: GramAccumulator,
) -> Tensor:
    """Run one forward and one BackPACK backward pass that fills ``accumulator``; return the loss.

    ``model`` and ``loss_func`` are extended with BackPACK in place if they are not yet. The
    parameters' ``.grad`` fields are overwritten with the gradient of this batch.
    """
    extend(model)
    extend(loss_func)
    accumulator.reset()

    model.zero_grad(set_to_none=True)
    outputs = model(inputs)
    if outputs.dim() != 2 or outputs.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"Invalid model output shape {tuple(outputs.shape)} for inputs of shape {tuple(inputs.shape)}: "
            "the Gram method needs outputs [N, C] with the batch axis first, as the inputs."
        )
    loss = loss_func(outputs, targets)
    with backpack(accumulator.extension(), extension_hook=accumulator.hook), warnings.catch_warnings():
        # PyTorch warns when a full backward hook fires on a layer whose input needs no gradient.
        # BackPACK's hooks do that on the first layer, as expected here.
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients", category=UserWarning)
        loss.backward()
    return loss.detach()


def compute_grams(
    model: Module,
    loss_func: Module,
    inputs: Tensor,
    targets: Tensor,
    param_groups: Mapping[str, Sequence[Parameter]],
    approximation: str = "exact",
    mc_samples: int = 1,
    dtype: torch.dtype = torch.float64,
    path: str = "auto",
    reduced_factor: bool = True,
) -> dict[str, Tensor]:
    """Compute each group's GGN Gram matrix Vᵀ V in one forward and one BackPACK backward pass.

    ``model`` and ``loss_func`` are extended with BackPACK in place if they are not yet. The
    parameters' ``.grad`` fields are overwritten with the gradient of this batch.

    Returns:
        Group name to its Gram matrix of shape ``[C·N, C·N]`` (``M·N`` for ``mc_samples=M``;
        ``(C − 1)·N`` for the exact GGN of cross-entropy with ``reduced_factor``), in the order
        of ``param_groups``.
    """
    accumulator = GramAccumulator(param_groups, approximation, mc_samples, dtype, path=path, reduced_factor=reduced_factor)
    run_backward(model, loss_func, inputs, targets, accumulator)
    check_all_groups_computed(accumulator)
    return {name: accumulator.grams[name] for name in accumulator.group_names}


def check_all_groups_computed(accumulator: GramAccumulator) -> None:
    """Raise if a group received no contribution in the last backward pass."""
    missing = [name for name in accumulator.group_names if name not in accumulator.grams]
    if missing:
        raise RuntimeError(
            f"BackPACK computed no GGN factor for groups {missing}: their parameters are not "
            "used in the forward pass or belong to modules that were not extended."
        )


def gram_eigvals(gram: Tensor) -> Tensor:
    """Return the eigenvalues of a symmetric PSD Gram matrix, descending, with noise set to zero.

    Eigenvalues with magnitude at most ``n · eps · λ_max`` (n the matrix size, eps the machine
    precision of its dtype) are rounding noise of a rank-deficient matrix: they are returned as
    exactly zero, so that noise never shows up as negative curvature. The GGN is positive
    semi-definite, so any remaining negative value is noise too and is clipped to zero.
    """
    eigvals = torch.linalg.eigvalsh(gram).flip(0)
    return zero_noise(eigvals, gram.shape[0], gram.dtype)


def zero_noise(eigvals: Tensor, size: int, dtype: torch.dtype) -> Tensor:
    """Set eigenvalues at most ``size · eps · λ_max`` (and negative ones) to exactly zero."""
    scale = eigvals.abs().max() if eigvals.numel() > 0 else torch.zeros((), dtype=dtype)
    tolerance = size * torch.finfo(dtype).eps * scale
    return torch.where(eigvals > tolerance, eigvals, torch.zeros_like(eigvals))
