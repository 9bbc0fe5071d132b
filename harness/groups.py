"""Parameter groups: named lists of parameters, each with its own GGN block."""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch.nn import Module, Parameter

GROUPINGS = ("all", "per_layer", "per_param", "weights_biases", "regex")
UNMATCHED_GROUP = "rest"


def build_param_groups(
    model: Module, grouping: str, patterns: Mapping[str, str] | None = None, unmatched: str = "rest"
) -> dict[str, list[Parameter]]:
    """Split the trainable parameters of ``model`` into named groups.

    - ``all``: one group ``all``.
    - ``per_layer``: one group per module with parameters, named by the module (``fc1``).
    - ``per_param``: one group per parameter, named by the parameter (``fc1.weight``).
    - ``weights_biases``: ``weights`` (every parameter with 2 or more dimensions) and
      ``biases`` (the others).
    - ``regex``: one group per entry of ``patterns``, see :func:`regex_groups`.

    Names come from ``model.named_modules()`` and are stable across runs; groups are in the
    model's parameter order.

    Raises:
        ValueError: If the grouping is unknown, the model has no trainable parameters, or
            ``patterns`` is given for a grouping other than ``regex``.
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("The model has no trainable parameters, so it has no GGN to compute.")
    if patterns and grouping != "regex":
        raise ValueError(
            f"grouping.patterns={dict(patterns)} is set, but grouping={grouping} ignores it: "
            "use grouping=regex, or drop grouping.patterns."
        )

    if grouping == "regex":
        return regex_groups(named, patterns or {}, unmatched)

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


def regex_groups(
    named_params: list[tuple[str, Parameter]], patterns: Mapping[str, str], unmatched: str = "rest"
) -> dict[str, list[Parameter]]:
    """Group parameters by regular expressions that must match their whole names.

    Groups are in the order of ``patterns`` and hold parameters in the model's order. With
    ``unmatched="rest"`` the parameters that no pattern matches form a last group ``rest``; with
    ``"ignore"`` they are left out, so their curvature is not computed.

    Raises:
        ValueError: If ``patterns`` is empty, a pattern is not a valid regular expression,
            matches no parameter or matches a parameter that another pattern matches too, or
            a pattern is named ``rest`` while ``unmatched="rest"``.
    """
    if not patterns:
        raise ValueError(
            "grouping=regex needs grouping.patterns, a mapping of group name to regular "
            "expression, e.g. grouping=regex '+grouping.patterns={first:\"fc1\\..*\"}'."
        )
    if unmatched not in ("rest", "ignore"):
        raise ValueError(f"Invalid grouping.unmatched={unmatched!r}: use rest or ignore.")
    if unmatched == "rest" and UNMATCHED_GROUP in patterns:
        raise ValueError(
            f"grouping.patterns has a group named {UNMATCHED_GROUP!r}, the name of the group of "
            "unmatched parameters: rename it, or set grouping.unmatched=ignore."
        )

    names = [name for name, _ in named_params]
    groups: dict[str, list[Parameter]] = {}
    owner: dict[str, str] = {}
    for group, pattern in patterns.items():
        try:
            compiled = re.compile(pattern)
        except re.error as error:
            raise ValueError(
                f"Invalid regular expression {pattern!r} for group {group!r} in grouping.patterns: {error}."
            ) from error
        matched = [(name, param) for name, param in named_params if compiled.fullmatch(name)]
        if not matched:
            raise ValueError(
                f"The pattern {pattern!r} of group {group!r} matches no trainable parameter, so the "
                f"group would be empty. It must match whole names, which are: {', '.join(names)}."
            )
        for name, _ in matched:
            if name in owner:
                raise ValueError(
                    f"Parameter {name!r} matches the patterns of groups {owner[name]!r} and "
                    f"{group!r}: make the patterns exclusive, since each parameter belongs to one group."
                )
            owner[name] = group
        groups[group] = [param for _, param in matched]

    rest = [param for name, param in named_params if name not in owner]
    if rest and unmatched == "rest":
        groups[UNMATCHED_GROUP] = rest
    return groups
