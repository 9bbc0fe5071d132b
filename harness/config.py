"""The structured-config schema: dataclasses registered in Hydra's ConfigStore.

Hydra merges the YAML files of ``conf/`` into these dataclasses, so an unknown key, a value of the
wrong type or an option outside an enum is rejected when the config is composed, before anything
runs. Each config group mirrors a module: ``dataset`` ↔ ``harness.data``, ``model`` ↔
``harness.models``, ``grouping`` ↔ ``harness.groups``, ``curvature`` ↔ ``harness.curvature``,
``tracking`` ↔ ``harness.tracking``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore


class DatasetName(str, Enum):
    """Data sets. ``digits`` (8×8 images, 10 classes) and ``diabetes`` (regression, 1 target) are
    bundled with scikit-learn, ``random`` is Gaussian noise with random labels for benchmarking a
    net of a given input shape, and the others are loaded by ``torchvision.datasets`` from ``root``."""

    digits = "digits"
    diabetes = "diabetes"
    random = "random"
    mnist = "mnist"
    fashion_mnist = "fashion_mnist"
    cifar10 = "cifar10"
    cifar100 = "cifar100"


class ModelName(str, Enum):
    """Network architectures of ``harness.models``. ``torchvision`` builds ``model.arch``."""

    mlp = "mlp"
    digits_cnn = "digits_cnn"
    deepobs_2c2d = "deepobs_2c2d"
    deepobs_3c3d = "deepobs_3c3d"
    deepobs_allcnnc = "deepobs_allcnnc"
    resnet = "resnet"
    torchvision = "torchvision"


class TorchvisionArch(str, Enum):
    """torchvision models whose layers BackPACK supports once adaptive pooling is replaced."""

    resnet18 = "resnet18"
    resnet34 = "resnet34"
    resnet50 = "resnet50"


class Activation(str, Enum):
    """Elementwise activations of the MLP."""

    relu = "relu"
    tanh = "tanh"
    sigmoid = "sigmoid"


class LossName(str, Enum):
    """Loss functions: ``mse`` on one-hot targets, ``cross_entropy`` on class indices."""

    mse = "mse"
    cross_entropy = "cross_entropy"


class Reduction(str, Enum):
    """Reduction of the per-sample losses. The GGN scaling follows it."""

    mean = "mean"
    sum = "sum"


class Grouping(str, Enum):
    """Split of the parameters into groups, each with its own GGN block."""

    all = "all"
    per_layer = "per_layer"
    per_param = "per_param"
    weights_biases = "weights_biases"
    regex = "regex"


class Unmatched(str, Enum):
    """Treatment of parameters that no pattern of ``grouping=regex`` matches."""

    rest = "rest"
    ignore = "ignore"


class OptimizerName(str, Enum):
    """Optimizers from ``torch.optim``."""

    sgd = "sgd"
    adam = "adam"


class Approximation(str, Enum):
    """GGN approximation: the exact GGN or its Monte-Carlo estimate."""

    exact = "exact"
    mc = "mc"


class Precision(str, Enum):
    """Floating point precision of the Gram matrix and its eigensolve."""

    float32 = "float32"
    float64 = "float64"


class ResumeMode(str, Enum):
    """Whether a run recorded in Hydra's output folder is resumed when it is unfinished."""

    auto = "auto"
    never = "never"


class GramPath(str, Enum):
    """Gram path of Linear and convolution weights: the cheaper of structured and chunked per
    layer, the contraction of layer input and backpropagated factor, V's slice built a few output
    features at a time, or BackPACK's whole slice of V."""

    auto = "auto"
    structured = "structured"
    chunked = "chunked"
    materialized = "materialized"


class BudgetAction(str, Enum):
    """Action when the estimated memory exceeds ``curvature.memory_budget_gb``."""

    error = "error"
    chunked = "chunked"
    mc = "mc"
    lanczos = "lanczos"


class ScheduleKind(str, Enum):
    """Rule for the checkpoint steps: listed, every k steps, or log-spaced."""

    steps = "steps"
    every = "every"
    log = "log"


@dataclass
class DatasetConfig:
    """Data set and its split into training, held-out and curvature data.

    ``subset`` keeps a seeded sample of that many examples before the held-out split. ``images``
    gives digits as ``[1, 8, 8]`` images instead of vectors. ``root`` (relative to the folder the
    command was started from) and ``download`` apply to the torchvision data sets. ``shape``,
    ``num_classes`` and ``num_samples`` set the ``random`` data set.
    """

    name: DatasetName = DatasetName.digits
    val_fraction: float = 0.2
    standardize: bool = True
    images: bool = False
    subset: Optional[int] = None
    root: str = "data"
    download: bool = False
    shape: list[int] = field(default_factory=lambda: [3, 32, 32])
    num_classes: int = 10
    num_samples: int = 512


@dataclass
class ModelConfig:
    """Network architecture. ``hidden`` and ``activation`` set the ``mlp``, ``widths``, ``blocks``
    and ``batchnorm`` the ``resnet``, and ``arch`` the ``torchvision`` model."""

    name: ModelName = ModelName.mlp
    hidden: list[int] = field(default_factory=lambda: [32])
    activation: Activation = Activation.relu
    widths: list[int] = field(default_factory=lambda: [16, 32, 64])
    blocks: int = 3
    batchnorm: bool = True
    arch: TorchvisionArch = TorchvisionArch.resnet18


@dataclass
class LossConfig:
    """Training loss, also the loss whose GGN is computed."""

    name: LossName = LossName.mse
    reduction: Reduction = Reduction.mean


@dataclass
class GroupingConfig:
    """Parameter grouping. ``patterns`` (group name to a regular expression that must match
    whole parameter names such as ``fc1.weight``) and ``unmatched`` apply to ``regex`` only."""

    name: Grouping = Grouping.all
    patterns: dict[str, str] = field(default_factory=dict)
    unmatched: Unmatched = Unmatched.rest


@dataclass
class OptimizerConfig:
    """Optimizer and its hyperparameters."""

    name: OptimizerName = OptimizerName.sgd
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0


@dataclass
class TrainConfig:
    """Length of training, mini-batch size and evaluation period, in optimizer steps."""

    steps: int = 300
    batch_size: int = 64
    eval_every: int = 50
    log_every: int = 10


@dataclass
class ScheduleConfig:
    """Checkpoint steps at which the GGN spectrum is computed. Steps 0 and ``train.steps``
    are always included."""

    kind: ScheduleKind = ScheduleKind.log
    every: int = 50
    steps: list[int] = field(default_factory=list)
    num: int = 8


@dataclass
class ValidationConfig:
    """Check of the Gram eigenvalues against the exact GGN of small groups.

    A group with at most ``max_params`` parameters is validated at every checkpoint: the
    eigenvalues a (Gram) and b (exact) pass if |a - b| <= atol + rtol·|b| for every pair.
    """

    enabled: bool = True
    max_params: int = 4000
    rtol: float = 1e-3
    atol: float = 1e-6
    strict: bool = False


@dataclass
class CurvatureConfig:
    """GGN spectrum computation at checkpoints.

    ``subsampling`` (null: all) takes the GGN from the first that many samples of the curvature
    batch, as the GGN of their mean loss. ``top_k`` leading eigenpairs above ``min_eigval`` are
    selected for ``eigvecs`` and ``directional_derivatives``. ``memory_budget_gb`` (null: no
    check) bounds the estimated peak memory of the backward pass; ``on_budget_exceeded`` sets
    what happens above it. ``density_probes`` random probes of ``density_steps`` Lanczos steps
    each estimate the spectral density after a Lanczos fallback (0 probes: none).
    """

    approximation: Approximation = Approximation.exact
    mc_samples: int = 1
    batch_size: int = 32
    subsampling: Optional[int] = None
    dtype: Precision = Precision.float64
    top_k: int = 10
    threshold: float = 1e-3
    min_eigval: float = 0.0
    eigvecs: bool = False
    directional_derivatives: bool = False
    gram_path: GramPath = GramPath.auto
    memory_budget_gb: Optional[float] = None
    on_budget_exceeded: BudgetAction = BudgetAction.error
    density_probes: int = 2
    density_steps: int = 20
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    validate: ValidationConfig = field(default_factory=ValidationConfig)


@dataclass
class TrackingConfig:
    """MLflow tracking. ``uri`` null means ``MLFLOW_TRACKING_URI`` if set, otherwise
    ``sqlite:///mlflow.db`` in the directory the command was started from."""

    uri: Optional[str] = None
    experiment: str = "harness"
    run_name: Optional[str] = None
    log_model: bool = True
    resume: ResumeMode = ResumeMode.auto
    resume_run_id: Optional[str] = None
    log_plots: bool = True


@dataclass
class Config:
    """Top-level config of one run."""

    defaults: list[Any] = field(default_factory=list)
    seed: int = 0
    device: str = "cpu"
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    grouping: GroupingConfig = field(default_factory=GroupingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    curvature: CurvatureConfig = field(default_factory=CurvatureConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def check_known_keys(cfg: Any) -> None:
    """Reject keys that the schema does not declare.

    Hydra's ``+key=value`` adds a key even where the schema rejects ``key=value``, so a misspelled
    ``+optimzer.lr=0.1`` would otherwise run with the value silently unused. Free-form mappings
    such as ``grouping.patterns`` still take any key.

    Raises:
        ValueError: Naming the first unknown key.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError

    try:
        OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.to_container(cfg))
    except ConfigKeyError as error:
        raise ValueError(
            f"Unknown config key {error.full_key!r}: the harness does not read it, so its value "
            "would have no effect. Check the spelling against 'python -m harness --cfg job'; a "
            "leading '+' adds keys only to free-form mappings such as grouping.patterns."
        ) from error


def register_configs() -> None:
    """Register the schema as ``config_schema`` for ``conf/config.yaml``'s defaults list."""
    ConfigStore.instance().store(name="config_schema", node=Config)


def config_dir() -> Path:
    """Return the folder of the YAML configs.

    In an installed wheel the configs are package data in ``harness/conf``. In a source checkout
    or an editable install they are in ``conf/`` beside the package.
    """
    package = Path(__file__).resolve().parent
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"No config.yaml in {package / 'conf'} or {package.parent / 'conf'}: "
        "reinstall the package with 'pip install .' from the repository root."
    )
