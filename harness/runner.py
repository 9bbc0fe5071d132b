"""The runner: build data, model and groups; train; at each checkpoint compute, validate, log."""

from __future__ import annotations

import logging
import random
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from backpack import disable, extend
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from tqdm.auto import tqdm

from harness import data as datasets
from harness import models
from harness.groups import build_param_groups
from harness.schedule import checkpoint_steps
from harness.spectrum import Spectrum, SpectrumProbe
from harness.tracking import Tracker, flatten, git_commit, resolve_tracking_uri, tensor_bytes, ui_command

log = logging.getLogger(__name__)

# BackPACK's full backward hook on the first layer warns that its input needs no gradient.
# That is expected for input data and does not affect the results.
warnings.filterwarnings("ignore", message=".*Full backward hook.*", category=UserWarning)


class ValidationFailedError(RuntimeError):
    """Raised with ``curvature.validate.strict=true`` when Gram and exact eigenvalues disagree."""


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's random number generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """Return the torch device for ``device`` in the config (``cpu``, ``cuda``, ``cuda:1``, ``auto``).

    Raises:
        ValueError: If CUDA is requested but not available, or the name is invalid.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"Invalid device={name!r}: use cpu, cuda, cuda:<index> or auto.") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} requested, but CUDA is not available here: use device=cpu.")
    return device


def build_data(cfg: DictConfig) -> datasets.Data:
    """Load the configured data set."""
    return datasets.load_digits(cfg.dataset.val_fraction, cfg.dataset.standardize, cfg.seed)


def build_model(cfg: DictConfig, data: datasets.Data) -> nn.Module:
    """Build the configured model for ``data``'s input shape and class count."""
    in_features = int(np.prod(data.input_shape))
    return models.mlp(in_features, list(cfg.model.hidden), data.num_classes, cfg.model.activation.value)


def build_loss(cfg: DictConfig) -> nn.Module:
    """Build the configured loss."""
    reduction = cfg.loss.reduction.value
    if cfg.loss.name.value == "mse":
        return nn.MSELoss(reduction=reduction)
    return nn.CrossEntropyLoss(reduction=reduction)


def targets_for(loss_name: str, labels: Tensor, num_classes: int) -> Tensor:
    """Return the loss's targets for class ``labels``: one-hot floats for MSE, the labels for CE."""
    if loss_name == "mse":
        return nn.functional.one_hot(labels, num_classes).to(torch.float32)
    return labels


def build_optimizer(cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Build the configured optimizer over all parameters of ``model``."""
    opt = cfg.optimizer
    if opt.lr <= 0:
        raise ValueError(f"Invalid optimizer.lr={opt.lr}: it must be positive, e.g. 0.1.")
    if opt.name.value == "sgd":
        return torch.optim.SGD(model.parameters(), lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=opt.lr, weight_decay=opt.weight_decay)


def evaluate(model: nn.Module, loss_func: nn.Module, inputs: Tensor, labels: Tensor, loss_name: str, num_classes: int) -> dict[str, float]:
    """Return loss and accuracy of ``model`` on a whole split."""
    with torch.no_grad(), disable():
        outputs = model(inputs)
        loss = loss_func(outputs, targets_for(loss_name, labels, num_classes)).item()
        accuracy = (outputs.argmax(dim=1) == labels).float().mean().item()
    return {"loss": loss, "accuracy": accuracy}


def check_sizes(cfg: DictConfig) -> None:
    """Reject sizes that cannot work before anything is built.

    Raises:
        ValueError: Naming the key, its value and a valid range.
    """
    positive = {
        "train.steps": cfg.train.steps,
        "train.batch_size": cfg.train.batch_size,
        "train.eval_every": cfg.train.eval_every,
        "train.log_every": cfg.train.log_every,
        "curvature.batch_size": cfg.curvature.batch_size,
        "curvature.mc_samples": cfg.curvature.mc_samples,
        "curvature.top_k": cfg.curvature.top_k,
    }
    for key, value in positive.items():
        if value < 1:
            raise ValueError(f"Invalid {key}={value}: it must be at least 1.")
    if any(size < 1 for size in cfg.model.hidden):
        raise ValueError(f"Invalid model.hidden={list(cfg.model.hidden)}: every size must be at least 1.")


def run(cfg: DictConfig, launch_dir: Path, overrides: list[str], extra_tags: Mapping[str, str] | None = None) -> str:
    """Train the configured model and log its GGN spectra to MLflow; return the run id.

    ``extra_tags`` are added to the run's tags (a sweep passes ``mlflow.parentRunId`` and the run
    name). The run ends FINISHED on success, KILLED on Ctrl-C and FAILED on any error, which is
    re-raised after the status is recorded.
    """
    check_sizes(cfg)
    steps = checkpoint_steps(
        cfg.train.steps,
        cfg.curvature.schedule.kind.value,
        cfg.curvature.schedule.every,
        list(cfg.curvature.schedule.steps),
        cfg.curvature.schedule.num,
    )
    device = resolve_device(cfg.device)
    uri = resolve_tracking_uri(cfg.tracking.uri, launch_dir)
    tracker = Tracker(uri, cfg.tracking.experiment)

    seed_everything(cfg.seed)
    data = build_data(cfg)
    model = extend(build_model(cfg, data).to(device))
    loss_func = extend(build_loss(cfg))
    param_groups = build_param_groups(model, cfg.grouping.name.value)
    optimizer = build_optimizer(cfg, model)
    loss_name = cfg.loss.name.value
    num_classes = data.num_classes

    curvature_idx = datasets.curvature_indices(len(data.train_inputs), cfg.curvature.batch_size, cfg.seed)
    curvature_inputs = data.train_inputs[curvature_idx].to(device)
    curvature_targets = targets_for(loss_name, data.train_labels[curvature_idx], num_classes).to(device)
    exact = cfg.curvature.approximation.value == "exact"
    validate = cfg.curvature.validate
    probe = SpectrumProbe(
        param_groups,
        loss_func,
        curvature_inputs,
        curvature_targets,
        approximation=cfg.curvature.approximation.value,
        mc_samples=cfg.curvature.mc_samples,
        dtype=getattr(torch, cfg.curvature.dtype.value),
        validate_max_params=validate.max_params if validate.enabled and exact else 0,
        rtol=validate.rtol,
        atol=validate.atol,
    )

    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    resolved["tracking"]["uri"] = uri
    tags = {"harness.overrides": " ".join(overrides) or "(none)", "mlflow.source.name": "python -m harness", **(extra_tags or {})}
    commit = git_commit(Path(__file__).resolve().parent)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    run_id = tracker.start(cfg.tracking.run_name, tags)
    log.info("Started MLflow run %s in experiment %r at %s", run_id, cfg.tracking.experiment, uri)

    status = "FAILED"
    try:
        tracker.log_text(OmegaConf.to_yaml(resolved), "config.yaml")
        tracker.log_params(flatten(resolved))
        tracker.log_params({"param_groups": ",".join(param_groups), "num_params": sum(p.numel() for p in model.parameters())})
        spectra = _train(cfg, model, loss_func, optimizer, data, device, steps, probe, tracker, loss_name)
        # NOTE: a run that fails or is killed gets no plots, only its spectra/*.npz.
        if cfg.tracking.log_plots:
            _log_plots(tracker, spectra, cfg.curvature.top_k)
        if cfg.tracking.log_model:
            tracker.log_bytes(tensor_bytes(torch.save, model.state_dict()), "model/state_dict.pt")
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.end(status)
        log.info("Run %s ended %s", run_id, status)

    print(f"Results: MLflow run {run_id} (experiment {cfg.tracking.experiment!r}) in {uri}")
    print(f"Browse them: {ui_command(uri)}  then open {tracker.run_url()}")
    return run_id


def _train(
    cfg: DictConfig,
    model: nn.Module,
    loss_func: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: datasets.Data,
    device: torch.device,
    checkpoints: list[int],
    probe: SpectrumProbe,
    tracker: Tracker,
    loss_name: str,
) -> list[Spectrum]:
    """Run ``cfg.train.steps`` optimizer updates with a checkpoint before each listed step.

    Returns the spectra of the checkpoints, in order.
    """
    total = cfg.train.steps
    batch_size = min(cfg.train.batch_size, len(data.train_inputs))
    generator = torch.Generator().manual_seed(cfg.seed + 2)
    order = torch.randperm(len(data.train_inputs), generator=generator)
    position = 0
    pending = set(checkpoints)
    num_classes = data.num_classes
    val_inputs, val_labels = data.val_inputs.to(device), data.val_labels.to(device)
    spectra = []

    for step in tqdm(range(total + 1), desc="train", unit="step", disable=None, file=sys.stderr):
        if step in pending:
            spectra.append(_checkpoint(cfg, model, probe, tracker, step))
        if step % cfg.train.eval_every == 0 or step == total:
            if len(val_labels) > 0:
                metrics = evaluate(model, loss_func, val_inputs, val_labels, loss_name, num_classes)
                tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step)
        if step == total:
            break

        if position + batch_size > len(order):
            order = torch.randperm(len(data.train_inputs), generator=generator)
            position = 0
        index = order[position : position + batch_size]
        position += batch_size
        inputs = data.train_inputs[index].to(device)
        labels = data.train_labels[index].to(device)

        model.train()
        optimizer.zero_grad(set_to_none=True)
        with disable():
            outputs = model(inputs)
            loss = loss_func(outputs, targets_for(loss_name, labels, num_classes))
            loss.backward()
        optimizer.step()

        if step % cfg.train.log_every == 0:
            accuracy = (outputs.argmax(dim=1) == labels).float().mean().item()
            tracker.log_metrics({"train/loss": loss.item(), "train/accuracy": accuracy}, step)
    return spectra


def _log_plots(tracker: Tracker, spectra: list[Spectrum], top_k: int) -> None:
    """Log the figures of :func:`harness.plots.run_figures` as PNG artifacts under ``plots/``."""
    from harness import plots

    for path, figure in plots.run_figures(spectra, top_k).items():
        tracker.log_figure(figure, path)
        plots.close(figure)
    log.info("Logged spectrum plots of %d checkpoints", len(spectra))


def _checkpoint(cfg: DictConfig, model: nn.Module, probe: SpectrumProbe, tracker: Tracker, step: int) -> Spectrum:
    """Compute, validate and log the GGN spectrum at ``step``."""
    model.eval()
    spectrum = probe.compute(model, step)
    tracker.log_metrics(spectrum.metrics(cfg.curvature.top_k, cfg.curvature.threshold), step)
    tracker.log_bytes(spectrum.to_npz(), f"spectra/step_{step:07d}.npz")
    tracker.flush()

    top = ", ".join(f"{name}={values[0].item():.4g}" for name, values in spectrum.eigvals.items())
    log.info("Checkpoint step %d: eigval_max %s (%.2f s)", step, top, spectrum.seconds)
    failed = [name for name, result in spectrum.validation.items() if not result.passed]
    for name, result in spectrum.validation.items():
        log.info(
            "Validation step %d group %s: %s, max abs err %.3g, max rel err %.3g over %d eigenvalues",
            step, name, "passed" if result.passed else "FAILED", result.max_abs_err, result.max_rel_err, result.num_compared,
        )
    if failed and cfg.curvature.validate.strict:
        raise ValidationFailedError(
            f"Gram eigenvalues of groups {failed} at step {step} differ from the exact GGN beyond "
            f"rtol={probe.rtol}, atol={probe.atol}. Check the model and loss, or set "
            "curvature.validate.strict=false to only record the errors."
        )
    return spectrum
