"""Check a model against the layers the curvature engine supports, and prepare it for BackPACK.

The engine backpropagates the GGN factor with BackPACK's ``SqrtGGNExact`` and ``SqrtGGNMC``, which
have a rule for a fixed set of module types and none for functions called in ``forward``.
``prepare_model`` runs before training, so that an unsupported layer stops the run at once with
its name, instead of failing at the first checkpoint.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import torch
from backpack import extend
from backpack.extensions import SqrtGGNExact
from torch import nn
from torch.fx import GraphModule

log = logging.getLogger(__name__)

# Containers that only call their children. BackPACK registers no hooks on them.
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict, GraphModule)

ACTIVATION_ALTERNATIVES = "ReLU, LeakyReLU, ELU, SELU, Tanh, Sigmoid or LogSigmoid"
NORM_ALTERNATIVES = "BatchNorm1d/2d/3d (its GGN is computed in eval mode) or no normalization"
ALTERNATIVES = {
    "AdaptiveAvgPool1d": "AvgPool1d with a fixed kernel",
    "AdaptiveAvgPool2d": "AvgPool2d with a fixed kernel (done automatically where the input size is a multiple of the output size)",
    "AdaptiveAvgPool3d": "AvgPool3d with a fixed kernel",
    "AdaptiveMaxPool2d": "MaxPool2d with a fixed kernel",
    "ReLU6": ACTIVATION_ALTERNATIVES,
    "GELU": ACTIVATION_ALTERNATIVES,
    "SiLU": ACTIVATION_ALTERNATIVES,
    "Hardswish": ACTIVATION_ALTERNATIVES,
    "Hardsigmoid": ACTIVATION_ALTERNATIVES,
    "Softplus": ACTIVATION_ALTERNATIVES,
    "Mish": ACTIVATION_ALTERNATIVES,
    "PReLU": ACTIVATION_ALTERNATIVES,
    "LayerNorm": NORM_ALTERNATIVES,
    "GroupNorm": NORM_ALTERNATIVES,
    "InstanceNorm2d": NORM_ALTERNATIVES,
    "Softmax": "no module: CrossEntropyLoss takes the raw scores (logits)",
    "LogSoftmax": "no module: CrossEntropyLoss takes the raw scores (logits)",
}


class UnsupportedModelError(ValueError):
    """Raised when a model has a layer or operation that BackPACK's GGN factor does not support."""


def supported_layers() -> frozenset[type[nn.Module]]:
    """Return the module types for which BackPACK's ``SqrtGGNExact`` has a rule, losses included.

    ``SqrtGGNMC`` registers the same types. BackPACK matches the exact class, not subclasses.
    """
    # NOTE: BackPACK 1.7.1 keeps this registry in a private, name-mangled attribute and has no
    # public accessor. tests/test_support.py fails if a BackPACK release moves it.
    registry = SqrtGGNExact()._BackpropExtension__module_extensions
    return frozenset(registry)


def prepare_model(model: nn.Module, input_shape: Sequence[int], num_outputs: int) -> nn.Module:
    """Check ``model`` for the curvature engine, extend it with BackPACK and return the model to use.

    Steps, each logged where it changes something:
    1. A forward pass on zeros checks that inputs of ``input_shape`` give outputs ``[N, num_outputs]``.
    2. In-place operations (``ReLU(inplace=True)``) are made out-of-place, because in-place
       outputs break the full backward hooks that BackPACK registers.
    3. ``AdaptiveAvgPool2d`` whose input size is a multiple of its output size becomes the
       equal ``AvgPool2d``, because BackPACK has no GGN factor rule for adaptive pooling.
    4. A model whose ``forward`` is more than a chain of modules (a residual sum, a function
       call) is converted with ``extend(model, use_converter=True)``, which returns a new
       ``torch.fx.GraphModule``: callers must use the returned model.
    5. Every layer, and for converted models every operation of the graph, must be supported.

    Raises:
        UnsupportedModelError: Naming each unsupported layer (qualified name and type) with the
            supported alternatives, or the shape mismatch of step 1.
    """
    pool_inputs = _check_forward(model, input_shape, num_outputs)
    _make_out_of_place(model)
    _replace_adaptive_avg_pools(model, pool_inputs)

    if _needs_converter(model):
        model = _convert(model)
        layers, operations = _graph_layers(model)
    else:
        layers = {name: module for name, module in model.named_modules() if not isinstance(module, CONTAINERS)}
        operations = []
    _raise_if_unsupported(layers, operations)

    batchnorms = [name for name, module in layers.items() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    if batchnorms:
        log.info(
            "%d BatchNorm layers (%s) normalize with batch statistics in training and with their "
            "running statistics for the GGN, which is computed in eval mode",
            len(batchnorms),
            _preview(batchnorms),
        )
    return extend(model)


def _preview(names: list[str], limit: int = 4) -> str:
    """Return the first ``limit`` names joined by commas, with the number of the others."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def _check_forward(model: nn.Module, input_shape: Sequence[int], num_outputs: int) -> dict[str, tuple[int, ...]]:
    """Run the model on zeros, check its output shape and return the input size of each ``AdaptiveAvgPool2d``."""
    pool_inputs: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.AdaptiveAvgPool2d):
            def record(module: nn.Module, args: tuple, name: str = name) -> None:
                pool_inputs[name] = tuple(args[0].shape[-2:])

            handles.append(module.register_forward_pre_hook(record))

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outputs = model(torch.zeros(2, *input_shape))
    except RuntimeError as error:
        raise UnsupportedModelError(
            f"The model does not accept inputs of shape {tuple(input_shape)} from the data set: "
            f"{error}. Choose a model built for this input size (deepobs_2c2d takes 28×28 images, "
            "deepobs_3c3d and deepobs_allcnnc 32×32) or another data set."
        ) from error
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()

    if tuple(outputs.shape) != (2, num_outputs):
        raise UnsupportedModelError(
            f"The model maps a batch of 2 inputs to outputs of shape {tuple(outputs.shape)}, but the "
            f"loss needs shape (2, {num_outputs}): the last layer must have {num_outputs} outputs."
        )
    return pool_inputs


def _make_out_of_place(model: nn.Module) -> None:
    """Set ``inplace=False`` on every module that has it set."""
    changed = [name for name, module in model.named_modules() if getattr(module, "inplace", False) is True]
    for name in changed:
        model.get_submodule(name).inplace = False
    if changed:
        log.info("Made %d in-place modules out-of-place for BackPACK's backward hooks: %s", len(changed), _preview(changed))


def _replace_adaptive_avg_pools(model: nn.Module, pool_inputs: dict[str, tuple[int, ...]]) -> None:
    """Replace each ``AdaptiveAvgPool2d`` by the ``AvgPool2d`` that computes the same on its input size."""
    for name, (height, width) in pool_inputs.items():
        pool = model.get_submodule(name)
        size = pool.output_size if isinstance(pool.output_size, tuple) else (pool.output_size,) * 2
        out_height = height if size[0] is None else size[0]
        out_width = width if size[1] is None else size[1]
        if height % out_height or width % out_width:
            continue
        kernel = (height // out_height, width // out_width)
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, nn.AvgPool2d(kernel, stride=kernel))
        log.info(
            "Replaced AdaptiveAvgPool2d %s (input %d×%d, output %d×%d) by AvgPool2d(kernel_size=%s)",
            name, height, width, out_height, out_width, kernel,
        )


def _needs_converter(model: nn.Module) -> bool:
    """Return whether a module other than a container has children, so its ``forward`` may do more than chain them."""
    return any(
        not isinstance(module, CONTAINERS) and next(module.children(), None) is not None
        for module in model.modules()
    )


def _convert(model: nn.Module) -> GraphModule:
    """Convert with BackPACK's converter, whose compatibility warnings the caller's check replaces."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Encountered node that may break")
            converted = extend(model, use_converter=True)
    except (RuntimeError, TypeError, ValueError, AttributeError, NotImplementedError) as error:
        raise UnsupportedModelError(
            f"BackPACK's converter (extend(model, use_converter=True)) cannot convert "
            f"{type(model).__name__}: {str(error).rstrip('.')}. Its forward must be traceable by "
            "torch.fx and use only modules, sums of tensors, products with a number, flatten, "
            "permute, transpose and indexing of tuples."
        ) from error
    log.info("Converted %s to a torch.fx GraphModule with BackPACK's converter", type(model).__name__)
    return converted


def _graph_layers(model: GraphModule) -> tuple[dict[str, nn.Module], list[str]]:
    """Return the modules the graph calls by qualified name, and each operation that is not a module call."""
    layers: dict[str, nn.Module] = {}
    operations = []
    for node in model.graph.nodes:
        if node.op == "call_module":
            layers[str(node.target)] = model.get_submodule(str(node.target))
        elif node.op not in ("placeholder", "output"):
            target = getattr(node.target, "__name__", str(node.target))
            operations.append(f"{node.name} ({node.op} {target})")
    return layers, operations


def _raise_if_unsupported(layers: dict[str, nn.Module], operations: list[str]) -> None:
    """Raise ``UnsupportedModelError`` listing every unsupported layer and operation."""
    supported = supported_layers()
    problems = []
    for name, module in layers.items():
        kind = type(module).__name__
        if type(module) not in supported:
            alternative = ALTERNATIVES.get(kind, "a network of the supported layers")
            problems.append(f"layer {name!r} of type {kind}: use {alternative}")
    for operation in operations:
        problems.append(f"operation {operation} in forward: express it with modules")
    if not problems:
        return

    names = sorted(
        layer.__name__ for layer in supported if not issubclass(layer, nn.modules.loss._Loss)
    )
    raise UnsupportedModelError(
        "The model has parts that BackPACK's GGN factor (SqrtGGNExact) does not support:\n  - "
        + "\n  - ".join(problems)
        + f"\nSupported layers: {', '.join(names)}."
    )
