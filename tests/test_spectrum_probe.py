"""SpectrumProbe with the engine's options: metrics of directional derivatives and of the fallback."""

import pytest
import torch
from backpack import extend
from torch import nn

from harness.spectrum import SpectrumProbe


def probe_problem(**options):
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double())
    loss_func = extend(nn.CrossEntropyLoss())
    inputs = torch.randn(8, 5, dtype=torch.float64)
    labels = torch.randint(0, 3, (8,))
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
    model, probe = probe_problem(top_k=2, memory_budget_gb=1e-9, on_budget_exceeded="lanczos")

    spectrum = probe.compute(model, step=0)
    metrics = spectrum.metrics(top_k=2, threshold=1e-3)

    assert spectrum.curvature["all"].method == "lanczos"
    assert spectrum.eigvals["all"].numel() == 2
    assert "ggn/all/trace" not in metrics
    assert metrics["validation/all/passed"] == 1.0
