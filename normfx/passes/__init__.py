"""One file per pass: ``fn(gm, *, options) -> PassResult``; each mutates ``gm`` in place."""
from normfx.passes.fold_convbn import fold_convbn

__all__ = ["fold_convbn"]
