"""Issue 22 (typing): a user's mypy finds normfx from the project's editable install and keeps the
user's model type through the one-liners (``net = normfx.convbn(net)``)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

USER_SCRIPT = '''
import torch
import torch.nn as nn

import normfx


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))

    def features(self) -> int:
        return 4


net = Net()
net = normfx.convbn(net, mode="tune")
net = normfx.fixed_point(net, bits=8)
net = normfx.calibrate(net, [torch.randn(2, 3, 8, 8)])
net = normfx.recalibrate_bn(net, [torch.randn(2, 3, 8, 8)])
net = normfx.deploy(net.eval())
reveal_type(net)
print(net.features())
'''


@pytest.mark.slow
def test_user_mypy_keeps_the_model_type(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    script = tmp_path / "user.py"
    script.write_text(USER_SCRIPT)
    # Run from outside the repository, as a user's project would: normfx must come from the install.
    out = subprocess.run([sys.executable, "-m", "mypy", "--no-error-summary", "--cache-dir", str(tmp_path / "cache"),
                          str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert 'Revealed type is "user.Net"' in out.stdout, out.stdout + out.stderr
    assert "error" not in out.stdout, out.stdout
