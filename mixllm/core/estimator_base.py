"""The estimators' parameter protocol, without importing scikit-learn.

Every estimator of the router follows scikit-learn's conventions: its parameters are its `__init__`
arguments, stored unchanged under their own names, `fit` resets the fitted state (attributes ending
in `_`) and returns self. `get_params` and `set_params` are all that routing, saving and
`sklearn.base.clone` need of a base class. scikit-learn's own `BaseEstimator` would import
scikit-learn, and with it scipy.stats: 1.2-1.8 s of a served model's start on two cores, for a
protocol of thirty lines. scikit-learn is still imported where it fits something (the domain
classifier, TF-IDF, the baselines).
"""

from __future__ import annotations

import inspect
from typing import Any


class BaseEstimator:
    """get_params / set_params as scikit-learn defines them (`deep` includes the parameters of
    parameters that are estimators themselves, as `name__parameter`)."""

    @classmethod
    def _param_names(cls) -> list[str]:
        signature = inspect.signature(cls.__init__)
        return sorted(name for name, p in signature.parameters.items()
                      if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        params = {}
        for name in self._param_names():
            value = getattr(self, name)
            if deep and hasattr(value, "get_params") and not isinstance(value, type):
                params.update({f"{name}__{key}": inner for key, inner in value.get_params().items()})
            params[name] = value
        return params

    def set_params(self, **params: Any) -> BaseEstimator:
        names = self._param_names()
        nested: dict[str, dict[str, Any]] = {}
        for key, value in params.items():
            name, _, inner = key.partition("__")
            if name not in names:
                raise ValueError(f"{type(self).__name__} has no parameter '{name}'; its parameters: {', '.join(names)}")
            if inner:
                nested.setdefault(name, {})[inner] = value
            else:
                setattr(self, name, value)
        for name, inner_params in nested.items():
            getattr(self, name).set_params(**inner_params)
        return self

    def __repr__(self) -> str:
        """The parameters that differ from the defaults, as scikit-learn shows them."""
        defaults = {name: p.default for name, p in inspect.signature(type(self).__init__).parameters.items()}
        changed = []
        for name, value in self.get_params(deep=False).items():
            default = defaults.get(name, inspect.Parameter.empty)
            try:
                same = default is not inspect.Parameter.empty and bool(default == value)
            except (TypeError, ValueError):  # arrays and other values without a plain ==
                same = False
            if not same:
                text = repr(value)
                changed.append(f"{name}={text if len(text) <= 60 else text[:57] + '...'}")
        return f"{type(self).__name__}({', '.join(changed)})"
