"""Parameter groups: named lists of parameters, each with its own GGN block."""

from __future__ import annotations

from torch.nn import Module, Parameter

GROUPINGS = ("all", "per_layer", "per_param", "weights_biases")


def build_param_groups(model: Module, grouping: str) -> dict[str, list[Parameter]]:
    """Split the trainable parameters of ``model`` into named groups.

    - ``all``: one group ``all``.
    - ``per_layer``: one group per module with parameters, named by the module (``fc1``).
    - ``per_param``: one group per parameter, named by the parameter (``fc1.weight``).
    - ``weights_biases``: ``weights`` (every parameter with 2 or more dimensions) and
      ``biases`` (the others).

    Names come from ``model.named_modules()`` and are stable across runs; groups are in the
    model's parameter order.

    Raises:
        ValueError: If the grouping is unknown or the model has no trainable parameters.
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("The model has no trainable parameters, so it has no GGN to compute.")

    if grouping == "all":
        return {"all": [p for _, p in named]}
    if grouping == "per_param":
        return {name: [p] for name, p in named}
    if grouping == "per_layer":
        groups: dict[str, list[Parameter]] = {}
        for module_name, module in model.named_modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if own:
                groups[module_name or "model"] = own
        return groups
    if grouping == "weights_biases":
        weights = [p for _, p in named if p.dim() >= 2]
        biases = [p for _, p in named if p.dim() < 2]
        return {name: params for name, params in (("weights", weights), ("biases", biases)) if params}
    raise ValueError(f"Invalid grouping {grouping!r}: use one of {GROUPINGS}.")
