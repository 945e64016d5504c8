"""Lab tools: measurements for the papers normfx reproduces, as data (and plots on request).

``matplotlib`` is needed only for plots (``pip install normfx[lab]``).
"""
from __future__ import annotations

from normfx.lab.activations import InactiveUnits, ReluSite, inactive_units
from normfx.lab.features import DisabledFeatures, LayerGammas, disabled_features
from normfx.lab.grokking import (ModularData, NeuronStats, ipr, modular_arithmetic, neuron_ipr, neuron_stats,
                                 plot_ipr, prune_by_ipr)

__all__ = ["disabled_features", "DisabledFeatures", "LayerGammas", "inactive_units", "InactiveUnits", "ReluSite",
           "modular_arithmetic", "ModularData", "ipr", "neuron_ipr", "prune_by_ipr", "neuron_stats", "NeuronStats",
           "plot_ipr"]
