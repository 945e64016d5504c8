"""Lab tools: measurements for the papers normfx reproduces, as data (and plots on request).

``matplotlib`` is needed only for plots (``pip install normfx[lab]``).
"""
from __future__ import annotations

from normfx.lab.activations import InactiveUnits, ReluSite, inactive_units
from normfx.lab.features import DisabledFeatures, LayerGammas, disabled_features

__all__ = ["disabled_features", "DisabledFeatures", "LayerGammas", "inactive_units", "InactiveUnits", "ReluSite"]
