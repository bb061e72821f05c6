"""The public API takes no caller's name: no public function or method has a `where` or `call`
parameter, and each public function's errors name the function itself (internal callers use
private twins that name THEIR public call, e.g. `ti.influence:`)."""

import inspect
import types

import pytest
import torch

import tinfluence as ti
from tinfluence.core import collectives

ROOTS = {"tinfluence": ti, "tinfluence.io": ti.io, "tinfluence.distributed": ti.distributed,
         "tinfluence.validate": ti.validate}
FORBIDDEN = ("where", "call")


def _public(module):
    return getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]


def _members(cls):
    """The public methods of a class (and `__init__`, `__call__`) as plain functions, with their names."""
    for name, value in vars(cls).items():
        if name.startswith("_") and name not in ("__init__", "__call__"):
            continue
        fn = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
        if callable(fn):
            yield name, fn


def public_callables():
    """`{dotted name: callable}` of every public callable reachable from the four public modules: their
    exports, the exports of the tinfluence namespaces they export (`ti.data`, `ti.tree`, ...), and the
    public methods of every exported class."""
    found, seen, todo = {}, set(), list(ROOTS.items())
    while todo:
        prefix, module = todo.pop()
        if module.__name__ in seen:
            continue
        seen.add(module.__name__)
        for name in _public(module):
            obj, dotted = getattr(module, name), f"{prefix}.{name}"
            if isinstance(obj, types.ModuleType):
                if obj.__name__.startswith("tinfluence"):
                    todo.append((dotted, obj))
            elif inspect.isclass(obj):
                if obj.__module__.startswith("tinfluence"):
                    found[dotted] = obj
                    found.update({f"{dotted}.{m}": fn for m, fn in _members(obj)})
            elif callable(obj):
                found[dotted] = obj
    return found


def _parameters(fn):
    try:
        return inspect.signature(fn).parameters
    except (TypeError, ValueError):   # builtins without a signature
        return {}


def test_no_public_callable_takes_the_callers_name():
    found = public_callables()
    # the walk reaches what it must (so an empty result below means something)
    for name in ("tinfluence.cg", "tinfluence.influence", "tinfluence.LinearOperator.is_stack", "tinfluence.chunks",
                 "tinfluence.io.ScoreWriter", "tinfluence.io.ScoreWriter.write", "tinfluence.io.create_store",
                 "tinfluence.distributed.all_reduce", "tinfluence.distributed.gather_rows",
                 "tinfluence.distributed.check_replicated", "tinfluence.validate.lds", "tinfluence.data.chunk_cat"):
        assert any(key == name or key.endswith(name.removeprefix("tinfluence")) for key in found), name
    assert len(found) > 150
    offenders = sorted(f"{name}({', '.join(p for p in _parameters(fn) if p in FORBIDDEN)})"
                       for name, fn in found.items() if any(p in FORBIDDEN for p in _parameters(fn)))
    assert offenders == []


# ---------------------------------------------------------------- errors name the public call

def test_operator_errors_name_the_call_the_user_made():
    x = {"w": torch.zeros(2, 3)}
    op = ti.LinearOperator(lambda v: v, like=x)
    bad = {"w": torch.zeros(4, 4)}
    with pytest.raises(ValueError, match=r"^ti.LinearOperator.is_stack: `v` leaves must have the parameter shapes"):
        op.is_stack(bad)
    with pytest.raises(ValueError, match=r"^ti.LinearOperator: `v` leaves must have the parameter shapes"):
        op(bad)
    with pytest.raises(TypeError, match=r"^ti.LinearOperator.is_stack: a plain operator acts on tensors"):
        ti.LinearOperator(lambda v: v).is_stack(torch.zeros(2, 2, 2))
    # an internal caller still names its own public call
    with pytest.raises(ValueError, match=r"^ti.cg_solve: `v` leaves must have the parameter shapes"):
        ti.cg_solve(op, bad)
    with pytest.raises(ValueError, match=r"^ti.direct: `v` must have the structure of the parameters"):
        ti.direct(ti.LinearOperator.from_matrix(torch.eye(6), like=x))({"v": torch.zeros(2, 3)})


def test_score_writer_errors_name_it(tmp_path):
    writer = ti.io.ScoreWriter(tmp_path, run="a" * 16, n_train=3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^ti.io.ScoreWriter: scores of test id 0 must be \[3\] float64"):
        writer.write(0, torch.zeros(4, dtype=torch.float64))
    writer.write(0, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"^ti.io.ScoreWriter: folder '.*' holds another run's results"):
        ti.io.ScoreWriter(tmp_path, run="b" * 16, n_train=3, dtype=torch.float64)


def test_create_store_errors_name_it_and_write_store_names_itself(tmp_path):
    params = {"w": torch.zeros(4, 3)}
    proj = ti.projector(params, k_in=2, k_out=2, generator=torch.Generator().manual_seed(0))
    for bad, message in [({"n": 0}, r"`n` must be an int >= 1; got 0"), ({"dtype": "int8"}, r"`dtype` must be one of"),
                         ({"chunk_rows": 0}, r"`chunk_rows`"), ({"projector": None}, r"`projector` must be a ti.Projector")]:
        kw = {"projector": proj, "params": params, "n": 5} | bad
        with pytest.raises((TypeError, ValueError), match=rf"^ti.io.create_store: {message}"):
            ti.io.create_store(tmp_path / "s", **kw)
    store = ti.io.create_store(tmp_path / "s", projector=proj, params=params, n=5, chunk_rows=2)
    with pytest.raises(ValueError, match=r"^ti.io.create_store: .* holds a store written with other settings"):
        ti.io.create_store(tmp_path / "s", projector=proj, params=params, n=6, chunk_rows=2)
    with pytest.raises(ValueError, match=r"^ti.io.GradientStore.write_chunk: chunk 0 must be \[2, "):
        store.write_chunk(0, torch.zeros(3, proj.dim))
    with pytest.raises(ValueError, match=r"^ti.io.GradientStore.write_chunk: chunk 1 \(examples 2..3\) has non-finite"):
        store.write_chunk(1, torch.full((2, proj.dim), float("nan")))


def test_shard_bounds_names_itself_and_shard_names_shard():
    with pytest.raises(ValueError, match=r"^ti.distributed.shard_bounds: `rank` must be an int in \[0, 2\); got 2"):
        ti.distributed.shard_bounds(5, 2, 2)
    with pytest.raises(ValueError, match=r"^ti.distributed.shard: `world` must be an int >= 1; got 0"):
        ti.distributed.shard(torch.zeros(5), 0, 0)


def test_data_helpers_name_themselves():
    data = (torch.zeros(5, 2), torch.zeros(5))
    with pytest.raises(ValueError, match=r"^ti.data.chunks: `size` must be None or an int >= 1; got 0"):
        list(ti.chunks(data, 0))
    with pytest.raises(ValueError, match=r"^ti.data.chunk_sum: `chunk_size` must be None or an int >= 1; got 0"):
        ti.data.chunk_sum(lambda c: c[0].sum(), data, 0)
    with pytest.raises(ValueError, match=r"^ti.data.chunk_cat: `chunk_size` must be None or an int >= 1; got 0"):
        ti.data.chunk_cat(lambda c: c[0], data, 0)
    with pytest.raises(ValueError, match=r"^ti.num_examples: `data` leaves must share one leading"):
        ti.num_examples((torch.zeros(5), torch.zeros(4)))
    # an internal caller still names its own public call and argument
    with pytest.raises(ValueError, match=r"^ti.per_example_grads: `chunk_size` must be None or an int >= 1; got 0"):
        ti.per_example_grads(lambda p, b: (b[0] @ p["w"]).sum(-1), {"w": torch.zeros(2)}, data, chunk_size=0)


def test_collectives_without_a_group_are_the_identity():
    tree = {"a": torch.arange(3.0), "b": torch.ones(2, 2)}
    assert collectives.all_reduce is ti.distributed.all_reduce
    assert ti.distributed.all_reduce(tree, None) is tree
    assert ti.distributed.gather_rows(tree, torch.tensor([3]), None) is tree
    assert ti.distributed.check_replicated(None, params=tree) is None


def test_inverse_operator_repr_names_its_solver():
    ihvp = ti.cg(ti.LinearOperator.from_matrix(torch.eye(3, dtype=torch.float64)), tol=1e-8)
    assert repr(ihvp) == "InverseOperator(ti.cg, on_failure='raise')"
