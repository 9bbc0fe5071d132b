"""SpectrumProbe with the engine's options: metrics of directional derivatives and of the fallback."""

import io

import numpy as np
import pytest
import torch
from backpack import extend
from torch import nn

from harness.curvature.memory import estimate_memory
from harness.spectrum import SpectrumProbe


def probe_problem(num_samples: int = 8, **options):
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double())
    loss_func = extend(nn.CrossEntropyLoss())
    inputs = torch.randn(num_samples, 5, dtype=torch.float64)
    labels = torch.randint(0, 3, (num_samples,))
    groups = {"all": list(model.parameters())}
    probe = SpectrumProbe(groups, loss_func, inputs, labels, validate_max_params=1000, options=options)
    return model, probe


def test_probe_logs_overlap_and_snr():
    model, probe = probe_problem(top_k=3, directional_derivatives=True, subsampling=range(6))

    spectrum = probe.compute(model, step=4)
    metrics = spectrum.metrics(top_k=3, threshold=1e-3)

    assert 0.0 <= metrics["ggn/all/grad_overlap"] <= 1.0
    assert [key for key in metrics if "/snr_" in key] == ["ggn/all/snr_1", "ggn/all/snr_2", "ggn/all/snr_3"]
    assert metrics["ggn/all/trace"] == pytest.approx(spectrum.eigvals["all"].sum().item())
    # Validation uses the same 6 samples as the subsampled GGN.
    assert metrics["validation/all/passed"] == 1.0


def test_probe_lanczos_fallback_has_no_trace():
    model, probe = probe_problem(num_samples=40, top_k=2)
    # Half the Gram computation's estimate: the Lanczos vectors of 57 parameters fit in it.
    whole = estimate_memory(model, probe.inputs, probe.param_groups, factor_columns=2, subset_size=40).total
    probe.options.update(memory_budget_gb=whole / 2 / 1e9, on_budget_exceeded="lanczos")

    spectrum = probe.compute(model, step=0)
    metrics = spectrum.metrics(top_k=2, threshold=1e-3)

    assert spectrum.curvature["all"].method == "lanczos"
    assert spectrum.eigvals["all"].numel() == 2
    assert "ggn/all/trace" not in metrics
    assert "ggn/all/num_eigvals_above" not in metrics
    assert metrics["ggn/all/fallback_lanczos"] == 1
    assert metrics["validation/all/passed"] == 1.0
    # The spectral density (2 probes of 20 steps by default) goes into the spectra archive.
    arrays = np.load(io.BytesIO(spectrum.to_npz()))
    assert arrays["density_nodes/all"].shape == arrays["density_weights/all"].shape
    assert arrays["density_weights/all"].sum() == pytest.approx(1.0)


def test_probe_chunked_fallback_metrics():
    model, probe = probe_problem(top_k=2)
    groups = probe.param_groups
    # Passes over 4 of the 8 samples (2 columns each, C - 1) fit, one pass over all 8 does not.
    fits = estimate_memory(model, probe.inputs, groups, factor_columns=2, subset_size=4, total_samples=8).total
    assert estimate_memory(model, probe.inputs, groups, factor_columns=2, subset_size=8).total > fits + 1
    probe.options.update(memory_budget_gb=(fits + 1) / 1e9, on_budget_exceeded="chunked")

    spectrum = probe.compute(model, step=0)
    metrics = spectrum.metrics(top_k=2, threshold=1e-3)

    assert spectrum.curvature["all"].method == "chunked"
    assert spectrum.curvature["all"].detail == 4
    assert metrics["ggn/all/fallback_chunked"] == 4
    assert metrics["ggn/all/trace"] == pytest.approx(spectrum.eigvals["all"].sum().item())
    assert metrics["validation/all/passed"] == 1.0


def test_probe_mc_fallback_skips_validation():
    model, probe = probe_problem(top_k=2)
    groups = probe.param_groups
    # One Monte-Carlo sample per datum fits, the exact factor's 2 columns do not.
    fits = estimate_memory(model, probe.inputs, groups, factor_columns=1, subset_size=8).total
    probe.options.update(memory_budget_gb=(fits + 1) / 1e9, on_budget_exceeded="mc")

    spectrum = probe.compute(model, step=0)
    metrics = spectrum.metrics(top_k=2, threshold=1e-3)

    assert metrics["ggn/all/fallback_mc"] == 1
    assert spectrum.validation == {}
    assert not [key for key in metrics if key.startswith("validation/")]
