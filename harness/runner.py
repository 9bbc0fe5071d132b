"""The runner: build data, model and groups; train; at each checkpoint compute, validate, log."""

from __future__ import annotations

import logging
import random
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from backpack import disable, extend
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from tqdm.auto import tqdm

from harness import data as datasets
from harness import models
from harness.checkpointing import CHECKPOINT_ARTIFACT, DataOrder, TrainingState, checkpoint_bytes, rng_states
from harness.config import check_known_keys
from harness.faults import DivergenceError, RunInterrupted, SignalGuard
from harness.groups import build_param_groups
from harness.resume import RUN_ID_FILE, find_resumable_run, restore_training_state
from harness.schedule import checkpoint_steps
from harness.spectrum import Spectrum, SpectrumProbe, curvature_options
from harness.support import prepare_model
from harness.tracking import (
    Tracker,
    TrackingError,
    check_tracking_uri,
    flatten,
    git_commit,
    resolve_tracking_uri,
    tensor_bytes,
    ui_command,
)

if TYPE_CHECKING:
    from mlflow.entities import Run

log = logging.getLogger(__name__)

# BackPACK's full backward hook on the first layer warns that its input needs no gradient.
# That is expected for input data and does not affect the results.
warnings.filterwarnings("ignore", message=".*Full backward hook.*", category=UserWarning)

# Samples per forward pass when evaluating a whole split.
EVAL_CHUNK = 1000


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


def build_data(cfg: DictConfig, launch_dir: Path) -> datasets.Data:
    """Load the configured data set. A relative ``dataset.root`` is relative to ``launch_dir``.

    Raises:
        ValueError: If the loss does not fit the data set's task.
    """
    name = cfg.dataset.name.value
    if datasets.task_of(name) == datasets.REGRESSION and cfg.loss.name.value != "mse":
        raise ValueError(
            f"Invalid loss={cfg.loss.name.value} for dataset={name}: it is a regression set with "
            "real-valued targets, so use loss=mse."
        )
    return datasets.load_dataset(
        name,
        val_fraction=cfg.dataset.val_fraction,
        standardize=cfg.dataset.standardize,
        seed=cfg.seed,
        images=cfg.dataset.images,
        subset=cfg.dataset.subset,
        root=launch_dir / Path(cfg.dataset.root).expanduser(),
        download=cfg.dataset.download,
        shape=tuple(cfg.dataset.shape),
        num_classes=cfg.dataset.num_classes,
        num_samples=cfg.dataset.num_samples,
    )


def build_model(cfg: DictConfig, data: datasets.Data) -> nn.Module:
    """Build the configured model for ``data``, checked and extended for BackPACK.

    The returned model may be a new ``torch.fx.GraphModule`` (see ``harness.support``), so
    parameter groups and the optimizer must be built from it.
    """
    model = models.build_model(
        cfg.model.name.value,
        data.input_shape,
        data.num_outputs,
        hidden=list(cfg.model.hidden),
        activation=cfg.model.activation.value,
        widths=list(cfg.model.widths),
        blocks=cfg.model.blocks,
        batchnorm=cfg.model.batchnorm,
        arch=cfg.model.arch.value,
    )
    model = prepare_model(model, data.input_shape, data.num_outputs)
    num_params = sum(p.numel() for p in model.parameters())
    log.info("Built model %s with %d parameters for inputs of shape %s", cfg.model.name.value, num_params, data.input_shape)
    return model


def build_loss(cfg: DictConfig) -> nn.Module:
    """Build the configured loss."""
    reduction = cfg.loss.reduction.value
    if cfg.loss.name.value == "mse":
        return nn.MSELoss(reduction=reduction)
    return nn.CrossEntropyLoss(reduction=reduction)


def targets_for(loss_name: str, targets: Tensor, num_outputs: int) -> Tensor:
    """Return the loss's targets. Class indices become one-hot floats for MSE, and real-valued
    regression targets and class indices for cross-entropy are returned as they are."""
    if loss_name == "mse" and not targets.is_floating_point():
        return nn.functional.one_hot(targets, num_outputs).to(torch.float32)
    return targets


def accuracy_of(outputs: Tensor, targets: Tensor) -> dict[str, float]:
    """Return ``{"accuracy": ...}`` for class indices, or an empty dict for regression targets."""
    if targets.is_floating_point():
        return {}
    return {"accuracy": (outputs.argmax(dim=1) == targets).float().mean().item()}


def build_optimizer(cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Build the configured optimizer over all parameters of ``model``."""
    opt = cfg.optimizer
    if opt.lr <= 0:
        raise ValueError(f"Invalid optimizer.lr={opt.lr}: it must be positive, e.g. 0.1.")
    if opt.name.value == "sgd":
        return torch.optim.SGD(model.parameters(), lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=opt.lr, weight_decay=opt.weight_decay)


def evaluate(model: nn.Module, loss_func: nn.Module, inputs: Tensor, targets: Tensor, loss_name: str, num_outputs: int) -> dict[str, float]:
    """Return the loss, and for classification the accuracy, of ``model`` on a whole split.

    The split goes through the model in chunks of ``EVAL_CHUNK`` samples, so that a large
    held-out split (10,000 CIFAR images) fits in memory. The loss equals one pass over the
    whole split with ``loss_func``'s reduction.
    """
    summed_loss = type(loss_func)(reduction="sum")
    total, count, correct = 0.0, 0, 0
    with torch.no_grad(), disable():
        for start in range(0, len(inputs), EVAL_CHUNK):
            outputs = model(inputs[start : start + EVAL_CHUNK])
            chunk = targets[start : start + EVAL_CHUNK]
            loss_targets = targets_for(loss_name, chunk, num_outputs)
            total += summed_loss(outputs, loss_targets).item()
            # MSELoss averages over every output entry, CrossEntropyLoss over samples.
            count += loss_targets.numel() if loss_name == "mse" else len(chunk)
            if not chunk.is_floating_point():
                correct += (outputs.argmax(dim=1) == chunk).sum().item()

    metrics = {"loss": total / count if loss_func.reduction == "mean" else total}
    if not targets.is_floating_point():
        metrics["accuracy"] = correct / len(inputs)
    return metrics


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
    subsampling = cfg.curvature.subsampling
    if subsampling is not None and not 2 <= subsampling <= cfg.curvature.batch_size:
        raise ValueError(
            f"Invalid curvature.subsampling={subsampling}: use null or a number of samples in "
            f"[2, curvature.batch_size={cfg.curvature.batch_size}]."
        )
    per_sample = subsampling is not None or cfg.curvature.directional_derivatives
    if per_sample and cfg.loss.reduction.value != "mean":
        raise ValueError(
            f"Invalid loss.reduction={cfg.loss.reduction.value} with curvature.subsampling or "
            "curvature.directional_derivatives: both need loss.reduction=mean."
        )
    curvature = cfg.curvature
    if curvature.memory_budget_gb is not None and curvature.memory_budget_gb <= 0:
        raise ValueError(
            f"Invalid curvature.memory_budget_gb={curvature.memory_budget_gb}: use null for no budget or a "
            "positive number of GB."
        )
    if curvature.density_probes < 0:
        raise ValueError(f"Invalid curvature.density_probes={curvature.density_probes}: use 0 (no density) or more.")
    if curvature.density_steps < 1:
        raise ValueError(f"Invalid curvature.density_steps={curvature.density_steps}: it must be at least 1.")
    action = curvature.on_budget_exceeded.value
    if action == "chunked" and curvature.approximation.value == "mc":
        raise ValueError(
            "Invalid curvature.on_budget_exceeded=chunked with curvature.approximation=mc: the chunked "
            "fallback needs the same Monte-Carlo draws in every pass. Use on_budget_exceeded=mc or error."
        )
    if action == "lanczos" and curvature.directional_derivatives:
        raise ValueError(
            "Invalid curvature.on_budget_exceeded=lanczos with curvature.directional_derivatives=true: "
            "the Lanczos fallback has no per-sample derivatives. Use on_budget_exceeded=chunked, mc or error."
        )
    if curvature.memory_budget_gb is None and action != "error":
        log.warning(
            "curvature.on_budget_exceeded=%s has no effect without curvature.memory_budget_gb: set a budget in GB.",
            action,
        )
    if any(size < 1 for size in cfg.model.hidden):
        raise ValueError(f"Invalid model.hidden={list(cfg.model.hidden)}: every size must be at least 1.")


def run(
    cfg: DictConfig,
    launch_dir: Path,
    overrides: list[str],
    output_dir: Path | None = None,
    extra_tags: Mapping[str, str] | None = None,
) -> str:
    """Train the configured model and log its GGN spectra to MLflow; return the run id.

    The run ends FINISHED on success, KILLED on SIGINT or SIGTERM (after saving the checkpoint
    ``checkpoints/last.pt``) and FAILED on divergence or any other error, which is re-raised
    after the status is recorded. ``output_dir`` (Hydra's output folder) records the run id, so
    that rerunning into the same folder resumes an unfinished run (``tracking.resume=auto``).
    ``extra_tags`` are added to a new run's tags (a sweep passes ``mlflow.parentRunId`` and the
    run name).
    """
    check_known_keys(cfg)
    check_sizes(cfg)
    steps = checkpoint_steps(
        cfg.train.steps,
        cfg.curvature.schedule.kind.value,
        cfg.curvature.schedule.every,
        list(cfg.curvature.schedule.steps),
        cfg.curvature.schedule.num,
    )
    device = resolve_device(cfg.device)

    seed_everything(cfg.seed)
    data = build_data(cfg, launch_dir)
    model = build_model(cfg, data).to(device)
    loss_func = extend(build_loss(cfg))
    param_groups = build_param_groups(
        model, cfg.grouping.name.value, dict(cfg.grouping.patterns), cfg.grouping.unmatched.value
    )
    optimizer = build_optimizer(cfg, model)
    loss_name = cfg.loss.name.value
    num_outputs = data.num_outputs

    curvature_idx = datasets.curvature_indices(len(data.train_inputs), cfg.curvature.batch_size, cfg.seed)
    curvature_inputs = data.train_inputs[curvature_idx].to(device)
    curvature_targets = targets_for(loss_name, data.train_targets[curvature_idx], num_outputs).to(device)
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
        options=curvature_options(cfg),
    )
    probe.check_budget(model)

    uri = resolve_tracking_uri(cfg.tracking.uri, launch_dir)
    check_tracking_uri(uri)
    tracker = Tracker(uri, cfg.tracking.experiment)
    tracker.check_artifact_location()

    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    resolved["tracking"]["uri"] = uri
    params = _run_params(resolved, param_groups, model)
    batch_size = min(cfg.train.batch_size, len(data.train_inputs))
    state = TrainingState(0, False, DataOrder.start(len(data.train_inputs), batch_size, cfg.seed + 2))
    previous = find_resumable_run(tracker, cfg.tracking.resume_run_id, cfg.tracking.resume.value, output_dir)
    if previous is None:
        run_id = tracker.start(cfg.tracking.run_name, {**_start_tags(overrides), **(extra_tags or {})})
        log.info("Started MLflow run %s in experiment %r at %s", run_id, cfg.tracking.experiment, uri)
    else:
        run_id = previous.info.run_id
        _check_unchanged(tracker, previous, params)
        state = restore_training_state(tracker, run_id, model, optimizer, state.data_order)
        tracker.resume(previous)
        tracker.set_tags({"harness.resumed_at_step": str(state.step)})
        log.info("Resumed MLflow run %s at step %d in experiment %r at %s", run_id, state.step, cfg.tracking.experiment, uri)
    if output_dir is not None:
        (output_dir / RUN_ID_FILE).write_text(run_id + "\n")

    def save_checkpoint() -> None:
        tracker.log_bytes(checkpoint_bytes(state, model, optimizer, state.rng), CHECKPOINT_ARTIFACT)

    status = "FAILED"
    end_tags = {}
    with SignalGuard() as guard:
        try:
            if previous is None:
                tracker.log_text(OmegaConf.to_yaml(resolved), "config.yaml")
            tracker.log_params(params)
            spectra = _train(cfg, model, loss_func, optimizer, data, device, steps, probe, tracker, loss_name, state, guard, save_checkpoint)
            # NOTE: plots come from the spectra of this process: a run that fails or is killed
            # gets none, and a resumed run plots only the checkpoints after the resume.
            if cfg.tracking.log_plots:
                _log_plots(tracker, spectra, cfg.curvature.top_k)
            if cfg.tracking.log_model:
                tracker.log_bytes(tensor_bytes(torch.save, model.state_dict()), "model/state_dict.pt")
            status = "FINISHED"
            end_tags = {"harness.end_step": str(state.step), "harness.end_reason": "finished"}
        except RunInterrupted as interrupt:
            status = "KILLED"
            reason = f"Interrupted by {interrupt.signal_name} at step {state.step}"
            end_tags = {"harness.end_step": str(state.step), "harness.end_reason": reason}
            save_checkpoint()
            log.warning("%s: saved %s; resume with tracking.resume_run_id=%s", reason, CHECKPOINT_ARTIFACT, run_id)
            raise
        except Exception as error:
            step = error.step if isinstance(error, DivergenceError) else state.step
            end_tags = {"harness.end_step": str(step), "harness.end_reason": f"{type(error).__name__}: {error}"}
            log.error("Run %s failed at step %d: %s", run_id, step, error)
            raise
        finally:
            try:
                tracker.set_tags(end_tags)
            finally:
                tracker.end(status)
                log.info("Run %s ended %s", run_id, status)

    print(f"Results: MLflow run {run_id} (experiment {cfg.tracking.experiment!r}) in {uri}")
    print(f"Browse them: {ui_command(uri)}  then open {tracker.run_url()}")
    return run_id


def _run_params(resolved: dict[str, Any], param_groups: dict[str, list], model: nn.Module) -> dict[str, Any]:
    """Return the run's params: the flattened config, the group names and the parameter count."""
    params = flatten(resolved)
    # How a run was started is not part of its config: a resumed run keeps the params it has.
    for key in ("tracking.resume", "tracking.resume_run_id"):
        params.pop(key, None)
    params["param_groups"] = ",".join(param_groups)
    params["num_params"] = sum(p.numel() for p in model.parameters())
    return params


def _start_tags(overrides: list[str]) -> dict[str, str]:
    """Return the tags of a new run: its overrides, its source and, in a git checkout, the commit."""
    tags = {"harness.overrides": " ".join(overrides) or "(none)", "mlflow.source.name": "python -m harness"}
    commit = git_commit(Path(__file__).resolve().parent)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def _check_unchanged(tracker: Tracker, previous: "Run", params: dict[str, Any]) -> None:
    """Raise TrackingError if ``params`` differ from those stored in the run to resume."""
    changed = tracker.changed_params(previous, params)
    if changed:
        listing = ", ".join(f"{key}: {stored!r} -> {value!r}" for key, (stored, value) in changed.items())
        raise TrackingError(
            f"Cannot resume run {previous.info.run_id}: its config differs in {listing}. Rerun "
            "with the original values, or start a new run (without tracking.resume_run_id, "
            "or with tracking.resume=never)."
        )


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
    state: TrainingState,
    guard: SignalGuard,
    save_checkpoint: Any,
) -> list[Spectrum]:
    """Run optimizer updates from ``state.step`` to ``cfg.train.steps``, with a checkpoint before each listed step.

    A signal takes effect at the top of the loop, between two updates, or during a GGN
    computation. The checkpoint ``checkpoints/last.pt`` is saved after each spectrum is logged.

    Returns the spectra computed in this process, in order.

    Raises:
        DivergenceError: If the training loss is NaN or infinite.
        RunInterrupted: If SIGINT or SIGTERM arrived.
    """
    total = cfg.train.steps
    pending = set(checkpoints)
    num_outputs = data.num_outputs
    val_inputs, val_targets = data.val_inputs.to(device), data.val_targets.to(device)
    spectra = []
    progress = tqdm(total=total, initial=state.step, desc="train", unit="step", disable=None, file=sys.stderr)

    while True:
        guard.check()
        step = state.step
        if step in pending and not state.checkpoint_done:
            _check_finite_params(model, step)
            state.rng = rng_states()
            spectra.append(_checkpoint(cfg, model, probe, tracker, step, guard))
            state.checkpoint_done, state.rng = True, None
            save_checkpoint()
        if step % cfg.train.eval_every == 0 or step == total:
            if len(val_targets) > 0:
                metrics = evaluate(model, loss_func, val_inputs, val_targets, loss_name, num_outputs)
                tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step)
        if step == total:
            break

        index = state.data_order.next_batch()
        inputs = data.train_inputs[index].to(device)
        targets = data.train_targets[index].to(device)

        model.train()
        optimizer.zero_grad(set_to_none=True)
        with disable():
            outputs = model(inputs)
            loss = loss_func(outputs, targets_for(loss_name, targets, num_outputs))
            loss.backward()
        loss_value = loss.item()
        if not np.isfinite(loss_value):
            tracker.log_metrics({"train/loss": loss_value}, step)
            raise DivergenceError(step, f"the training loss is {loss_value}")
        optimizer.step()

        if step % cfg.train.log_every == 0:
            metrics = {"loss": loss_value, **accuracy_of(outputs, targets)}
            tracker.log_metrics({f"train/{k}": v for k, v in metrics.items()}, step)
        state.step, state.checkpoint_done = step + 1, False
        progress.update()
    progress.close()
    return spectra


def _log_plots(tracker: Tracker, spectra: list[Spectrum], top_k: int) -> None:
    """Log the figures of :func:`harness.plots.run_figures` as PNG artifacts under ``plots/``."""
    from harness import plots

    for path, figure in plots.run_figures(spectra, top_k).items():
        tracker.log_figure(figure, path)
        plots.close(figure)
    log.info("Logged spectrum plots of %d checkpoints", len(spectra))


def _check_finite_params(model: nn.Module, step: int) -> None:
    """Raise DivergenceError if a parameter has a NaN or infinite entry, which the GGN cannot use."""
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise DivergenceError(step, f"parameter {name} has NaN or infinite entries")


def _checkpoint(cfg: DictConfig, model: nn.Module, probe: SpectrumProbe, tracker: Tracker, step: int, guard: SignalGuard) -> Spectrum:
    """Compute, validate and log the GGN spectrum at ``step``; a signal interrupts the computation."""
    model.eval()
    log.info("Computing the GGN spectrum at step %d", step)
    with guard.interruptible():
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
