"""Export to ONNX, verified: ``export`` (the driver), ``verify`` (ONNX Runtime parity), ``diagnose``
(why an exporter failed), ``fixed_point`` (QuantizeLinear/DequantizeLinear and the HLS sidecar)."""
from __future__ import annotations

from normfx.errors import ExportError
from normfx.onnx.export import Exporter, ExportReport, OutputCheck, export

__all__ = ["export", "ExportReport", "OutputCheck", "ExportError", "Exporter"]
