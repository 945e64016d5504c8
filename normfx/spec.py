"""Model SPECs: the names the ``normfx`` command (and ``load_spec``) turn into a model —
``torchvision:NAME``, ``timm:NAME``, ``package.module:factory``, or a file saved by ``torch.save``.
Every way a SPEC can fail is a one-line ``SpecError`` that says what to write instead."""
from __future__ import annotations

import difflib
import importlib
import logging
import zipfile
from pathlib import Path

import torch
import torch.nn as nn

from normfx.errors import NormfxError

__all__ = ["SPEC_HELP", "SpecError", "load_spec", "default_input_shape", "first_line"]

logger = logging.getLogger("normfx")

SPEC_HELP = """\
SPEC names the model:
  torchvision:NAME        a torchvision architecture (random weights), e.g. torchvision:resnet50
  timm:NAME               a timm architecture (random weights), e.g. timm:efficientnet_b0
  package.module:factory  a callable returning an nn.Module, e.g. mypkg.models:build
  PATH.pt                 a saved model; a whole pickled module needs --trust-pickle

Pretrained weights need a network, which normfx does not use: torchvision:/timm: give the
architecture with random weights. For a trained model, save it with torch.save and pass the file,
or pass a factory that loads your weights.
"""



class SpecError(NormfxError, ValueError):
    """A model SPEC that cannot be loaded; the message says what to write instead."""


def load_spec(spec: str, *, trust_pickle: bool = False) -> nn.Module:
    """Load the model a SPEC names (see ``normfx --help``).

    Example:
        >>> model = load_spec("torchvision:resnet18")
    """
    if spec.startswith("torchvision:"):
        return _torchvision(spec.split(":", 1)[1])
    if spec.startswith("timm:"):
        return _timm(spec.split(":", 1)[1])
    if spec.endswith((".pt", ".pth")) or Path(spec).is_file():
        return _load_file(Path(spec), trust_pickle)
    if ":" in spec:
        return _factory(spec)
    raise SpecError(
        f"cannot understand model SPEC '{spec}': use torchvision:NAME, timm:NAME, package.module:factory "
        "or a .pt file"
    )


def _torchvision(name: str) -> nn.Module:
    import torchvision

    available = torchvision.models.list_models()
    if name not in available:
        close = difflib.get_close_matches(name, available, n=3)
        raise SpecError(f"torchvision has no model '{name}'" + (f"; did you mean {', '.join(close)}?" if close else ""))
    logger.info("torchvision:%s with random weights (pretrained weights need a network)", name)
    return torchvision.models.get_model(name, weights=None)


def _timm(name: str) -> nn.Module:
    try:
        import timm
    except ImportError as e:
        raise SpecError("timm:NAME needs timm: pip install timm") from e
    if not timm.list_models(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise SpecError(f"timm has no model '{name}'" + (f"; did you mean {', '.join(close)}?" if close else ""))
    logger.info("timm:%s with random weights (pretrained weights need a network)", name)
    return timm.create_model(name, pretrained=False)


def _load_file(path: Path, trust_pickle: bool) -> nn.Module:
    if not path.is_file():
        raise SpecError(f"no such file: '{path}'")
    with path.open("rb") as f:
        magic = f.read(2)
    if not zipfile.is_zipfile(path) and magic[:1] != b"\x80":  # torch.save's zip, or a legacy pickle
        raise SpecError(f"cannot read '{path}' as a file saved by torch.save: not a zip archive or a pickle")
    if trust_pickle:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - a corrupt or foreign file
            raise SpecError(f"cannot read '{path}' as a file saved by torch.save: {first_line(e)}") from e
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - weights_only refuses pickled classes
            if "weights_only" not in str(e).lower().replace(" ", "_"):
                raise SpecError(f"cannot read '{path}' as a file saved by torch.save: {first_line(e)}") from e
            raise SpecError(
                f"'{path}' holds a pickled object, and loading a pickle runs code from the file. If you "
                "trust it, pass --trust-pickle; otherwise save a state_dict and use a package.module:factory "
                "SPEC that builds the model and loads it"
            ) from e
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict):
        raise SpecError(
            f"'{path}' holds a state_dict (weights without an architecture); use a package.module:factory "
            "SPEC that builds the model and loads these weights"
        )
    raise SpecError(f"'{path}' holds a {type(obj).__name__}, not an nn.Module")


def _factory(spec: str) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise SpecError(f"cannot import '{module_name}' for SPEC '{spec}': {e}") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise SpecError(f"'{module_name}' has no callable '{attr}'")
    try:
        model = fn()
    except Exception as e:  # noqa: BLE001 - the user's factory failed: say so in one line
        raise SpecError(f"'{spec}' raised {type(e).__name__}: {first_line(e)}") from e
    if not isinstance(model, nn.Module):
        raise SpecError(f"'{spec}' returned a {type(model).__name__}, not an nn.Module")
    return model


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def default_input_shape(model: nn.Module) -> tuple[int, ...]:
    """(1, C, H, W) from a timm model's pretrained config when it has one, else (1, 3, 224, 224)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return (1, *size) if size else (1, 3, 224, 224)
