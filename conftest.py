"""Doctests: the ``>>>`` examples in normfx's docstrings run with these names in scope."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.nn as nn


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace: dict) -> None:
    import torchvision

    import normfx

    doctest_namespace.update(normfx=normfx, torch=torch, nn=nn, torchvision=torchvision, os=os, tempfile=tempfile)
    torch.manual_seed(0)
