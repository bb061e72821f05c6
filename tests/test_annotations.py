"""Every public function and method is annotated, each argument and (but `__init__`) its return
type, so that mypy checks the public API as users call it (pyproject.toml, [tool.mypy])."""

import inspect

from test_public_signatures import public_callables


def _unannotated(name, fn):
    """`name(arg)` for each unannotated argument (self/cls aside) and `name -> ?` for a missing return type."""
    params = list(inspect.signature(fn).parameters.values())
    if params and params[0].name in ("self", "cls"):
        params = params[1:]
    out = [f"{name}({p.name})" for p in params if p.annotation is inspect.Parameter.empty]
    if fn.__name__ != "__init__" and inspect.signature(fn).return_annotation is inspect.Signature.empty:
        out.append(f"{name} -> ?")
    return out


def test_every_public_signature_is_annotated():
    checked, missing = [], []
    for name, obj in sorted(public_callables().items()):
        fn = inspect.unwrap(obj)
        if inspect.isclass(fn) or not inspect.isfunction(fn) or not fn.__module__.startswith("tinfluence"):
            continue   # classes are checked through their methods; builtins have no Python signature
        checked.append(name)
        missing += _unannotated(name, fn)
    # the walk reaches the estimators, the solvers, the namespaces and methods (so an empty `missing` means something)
    for reached in ("tinfluence.tracin", "tinfluence.lissa", "tinfluence.tree.scale", "tinfluence.io.read_scores",
                    "tinfluence.LinearOperator.__call__", "tinfluence.distributed.all_reduce", "tinfluence.lds"):
        assert any(name.endswith(reached.removeprefix("tinfluence")) for name in checked), reached
    assert len(checked) > 100
    assert missing == []
