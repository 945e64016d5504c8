"""Where a transform applies: the caller's ``filter_fn`` and ``leaf_modules``, and whether it only plans.

Every pass asks its ``Scope`` about each site just before it would change anything:
``scope.skip(site, (name, module), ...)`` names every module the change would touch (relative to
the region the pass runs on, ``""`` for the region's own module) and returns the ``Skip`` to report
when one of them is excluded, ``None`` when the site may change. A site belongs to the modules it
changes: a Conv+BN fold to the conv and the BatchNorm, a weight cast to its layer, an activation cast
to the module that produces the activation, a cast on an input, a function's output or a residual
add to the module whose forward holds it.

``plan=True`` is a dry run (``normfx.inspect``'s): a pass finds and checks every site and reports what
it would do, and changes nothing.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Sequence

import torch.nn as nn

from normfx.report import Skip, SkipReason

__all__ = ["FilterFn", "LeafModules", "Scope", "EVERYWHERE", "make_scope"]

FilterFn = Callable[[nn.Module, str], bool]
"""``filter_fn(module, fqn) -> bool``: ``False`` keeps the module (and every site it owns) as it is."""

LeafModules = Sequence["str | type[nn.Module]"]
"""Modules to keep opaque and unchanged: qualified names (``"roi_heads"``) or module types."""


@dataclass(frozen=True)
class Scope:
    """The sites a pass may change (see the module docstring)."""

    filter_fn: FilterFn | None = None
    leaves: frozenset[str] = frozenset()
    """Qualified names of the modules kept as they are, everything inside them included."""
    prefix: str = ""
    """The qualified name of the region a pass runs on: a site's name is relative to it."""
    region: nn.Module | None = None
    """The module whose forward the region is (the model for the passes outside every region)."""
    plan: bool = False
    """Match and plan only: report what would change, change nothing."""

    def at(self, prefix: str, region: nn.Module | None) -> Scope:
        """This scope for the region at ``prefix``."""
        return replace(self, prefix=prefix, region=region)

    def qualify(self, name: str) -> str:
        """The qualified name of ``name``, relative to this region (``""`` is the region itself)."""
        return f"{self.prefix}.{name}" if self.prefix and name else (name or self.prefix)

    @property
    def everywhere(self) -> bool:
        """No site is excluded (no ``filter_fn``, no ``leaf_modules``)."""
        return self.filter_fn is None and not self.leaves

    def skip(self, site: str, *owners: tuple[str, nn.Module | None]) -> Skip | None:
        """The skip to report for ``site`` if a module it would change is excluded, else ``None``.

        ``owners``: ``(name relative to the region, module)`` for every module the change touches;
        ``("", None)`` stands for the region's own module."""
        if self.everywhere:
            return None
        for name, module in owners:
            fqn = self.qualify(name)
            leaf = next((q for q in self.leaves if fqn == q or fqn.startswith(q + ".") or q == ""), None)
            if leaf is not None:
                return Skip(site, SkipReason.LEAF, f"'{fqn or '<root>'}' is inside leaf module '{leaf or '<root>'}'")
            m = self.region if module is None and not name else module
            if self.filter_fn is not None and m is not None and not self.filter_fn(m, fqn):
                return Skip(site, SkipReason.FILTERED, f"filter_fn rejected '{fqn or '<root>'}'")
        return None


    def split(self, named: list[tuple[str, nn.Module]], is_site: Callable[[nn.Module], bool] = lambda m: True
              ) -> tuple[list[tuple[str, nn.Module]], tuple[Skip, ...]]:
        """``named`` without the modules this scope excludes, and a skip for each excluded one that
        ``is_site`` (for the passes whose sites are modules of one kind, each changed alone)."""
        if self.everywhere:
            return named, ()
        kept, skips = [], []
        for name, m in named:
            sk = self.skip(name, (name, m)) if is_site(m) else None
            if sk is None:
                kept.append((name, m))
            else:
                skips.append(sk)
        return kept, tuple(skips)


EVERYWHERE = Scope()
"""The scope of a pass called on its own: every site, applied."""


def make_scope(model: nn.Module, filter_fn: FilterFn | None, leaf_modules: LeafModules | None,
               *, plan: bool = False) -> Scope:
    """The scope of one call on ``model``, the caller's arguments checked.

    Raises:
        TypeError: ``filter_fn`` is not callable; an entry of ``leaf_modules`` is neither a name nor
            a module type.
        ValueError: ``leaf_modules`` names a module ``model`` does not have (the message suggests the
            closest names).
    """
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be a callable (module, fqn) -> bool, got {type(filter_fn).__name__}")
    return Scope(filter_fn, _leaf_names(model, leaf_modules or ()), region=model, plan=plan)


def _leaf_names(model: nn.Module, leaf_modules: Iterable[str | type]) -> frozenset[str]:
    if isinstance(leaf_modules, (str, type)):
        leaf_modules = (leaf_modules,)
    names = dict(model.named_modules(remove_duplicate=False))
    out: set[str] = set()
    for entry in leaf_modules:
        if isinstance(entry, str):
            if entry not in names:
                close = difflib.get_close_matches(entry, [n for n in names if n], n=3)
                raise ValueError(f"leaf_modules names {entry!r}, which {type(model).__name__} does not have"
                                 + (f"; did you mean {', '.join(map(repr, close))}?" if close
                                    else "; use qualified names as model.named_modules() lists them"))
            out.add(entry)
        elif isinstance(entry, type) and issubclass(entry, nn.Module):
            out.update(n for n, m in names.items() if isinstance(m, entry))
        else:
            raise TypeError(f"leaf_modules takes qualified names or nn.Module types, got {entry!r}")
    return frozenset(out)
