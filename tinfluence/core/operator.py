"""One linear-operator type: `v ↦ C v` on parameter pytrees (or tensors), with its structure and tags.

A `LinearOperator` stays a function (it composes with `torch.func.vmap` and
`torch.compile`), and it carries what solvers need to know about it:

- `like`: the pytree of tensors it acts on (the parameters, or a tensor `[P]`), or None
  for a plain function on tensors, where a 1-D tensor is one vector and a 2-D tensor a
  stack of vectors;
- tags: `symmetric`, `psd` (True where known, else None) and `kind` ("hessian", "ggn",
  "dense", "preconditioner", "custom"), which fit the advice in solver messages.

`is_stack(v)` is the one place where "one vector or a stack of k vectors?" is decided.
"""

from __future__ import annotations

from typing import Callable

import optree
import torch
from torch.func import vmap

from . import tree as tr
from .tree import PyTree

__all__ = ["LinearOperator", "as_operator"]

KINDS = ("hessian", "ggn", "dense", "preconditioner", "custom")


class LinearOperator:
    """A linear map `v ↦ C v` that knows its input structure and whether `v` is one vector or a stack.

    Args:
      fn: `v -> C v` on ONE vector shaped like `like` (for `like=None`: on tensors `[P]`
        and `[k, P]` alike).
      like: the pytree of tensors the operator acts on (the parameters, or a tensor `[P]`);
        only shapes, dtypes and devices are read. None: `fn` acts on tensors, a 1-D `v` is
        one vector and a 2-D `v` a stack.
      many: `V -> C V` on a stack (leaves `[k, ...]`); default `vmap(fn)` (or `fn` itself
        when `like` is None).
      symmetric: C = Cᵀ (every curvature here is).
      psd: True when C is known to be positive semi-definite, False when known not to be,
        None when unknown.
      kind: "hessian", "ggn", "dense", "preconditioner" or "custom"; solvers fit their
        advice to it (they do not suggest the Gauss-Newton matrix for a "ggn" operator).

    Operators compose: `A + B`, `c * A`, `A.damped(λ)` (= A + λI). Calling one on `v`
    returns C v with the structure of `v` (for a stack, the k products).

    Raises:
      TypeError: `fn` is not callable; `like` is not a pytree of tensors.
      ValueError: an unknown `kind`; called on a `v` that is neither one vector nor a stack.

    Cost: calling it on one vector costs one `fn`; on a stack, one `many` (one vmapped
    call, not k). Building it costs nothing.

    Examples:
      >>> A = torch.tensor([[4., 1.], [1., 3.]], dtype=torch.float64)
      >>> op = ti.LinearOperator(lambda u: A @ u, like=torch.zeros(2, dtype=torch.float64), psd=True)
      >>> V = torch.randn(5, 2, dtype=torch.float64)
      >>> op.is_stack(V), torch.allclose(op(V), V @ A.T), torch.allclose(op.damped(0.5)(V[0]), A @ V[0] + 0.5 * V[0])
      (True, True, True)
    """

    matrix: torch.Tensor | None = None   # the `[P, P]` tensor of a `from_matrix` operator (`ti.direct` factorizes it)

    def __init__(self, fn: Callable, like: PyTree | None = None, *, many: Callable | None = None, symmetric: bool = True,
                 psd: bool | None = None, kind: str = "custom"):
        if not callable(fn):
            raise TypeError(f"ti.LinearOperator: `fn` must be a function v -> C v; got {type(fn).__name__}.")
        if kind not in KINDS:
            raise ValueError(f"ti.LinearOperator: `kind` must be one of {KINDS}; got {kind!r}.")
        if like is not None:
            leaves = optree.tree_leaves(like, namespace="")
            if not leaves or not all(isinstance(leaf, torch.Tensor) for leaf in leaves):
                raise TypeError("ti.LinearOperator: `like` must be a pytree of tensors (the parameters the operator "
                                f"acts on) or a tensor [P]; got {type(like).__name__}.")
        self.fn = fn
        self.many = many if many is not None else (fn if like is None else vmap(fn))
        self.like = like
        self.symmetric = bool(symmetric)
        self.psd = psd
        self.kind = kind

    # ------------------------------------------------------------ structure

    @property
    def size(self) -> int | None:
        """P, the number of entries of one vector (None for a structure-less tensor operator)."""
        return None if self.like is None else tr.size(self.like)

    @property
    def dtype(self) -> torch.dtype | None:
        """The dtype of the vectors it acts on (None when `like` is None)."""
        return None if self.like is None else optree.tree_leaves(self.like, namespace="")[0].dtype

    def is_stack(self, v: PyTree) -> bool:
        """Whether `v` is a stack of k vectors (one extra leading axis on every leaf) or one vector.

        Dict keys are matched by name (optree sorts them), never by insertion order.

        Args:
          v: a pytree shaped like `like` (one vector) or with a common extra leading axis k
            on every leaf (a stack); with `like=None`, a tensor `[P]` or `[k, P]`.

        Returns:
          True for a stack, False for one vector.

        Raises:
          ValueError: `v` is neither: another tree structure (dict keys, list order, nesting),
            other leaf shapes, or leaves without a common leading axis.
          TypeError: `like` is None and `v` is not a 1-D or 2-D tensor.

        Cost:
          O(number of leaves), metadata only.

        Examples:
          >>> op = ti.LinearOperator(lambda u: 2 * u, like={"w": torch.zeros(2, 3)})
          >>> op.is_stack({"w": torch.zeros(5, 2, 3)}), op.is_stack({"w": torch.zeros(2, 3)})
          (True, False)
        """
        return self._is_stack(v, "ti.LinearOperator.is_stack")

    def _is_stack(self, v, where: str) -> bool:
        """`is_stack` for the public call `where` (the name its errors give)."""
        if self.like is None:
            if isinstance(v, torch.Tensor) and v.dim() in (1, 2):
                return v.dim() == 2
            got = f"a {v.dim()}-d tensor" if isinstance(v, torch.Tensor) else f"a {type(v).__name__}"
            raise TypeError(
                f"{where}: a plain operator acts on tensors, `v` [P] (one vector) or [k, P] (a stack); got {got}. "
                "For an operator on parameter pytrees, wrap it: ti.LinearOperator(fn, like=params).")
        v_leaves, v_spec = optree.tree_flatten(v, namespace="")
        like_leaves, like_spec = optree.tree_flatten(self.like, namespace="")
        if v_spec != like_spec:
            raise ValueError(f"{where}: `v` must have the structure of the parameters {like_spec}; got {v_spec}.")
        if all(tuple(a.shape) == tuple(b.shape) for a, b in zip(v_leaves, like_leaves)):
            return False
        if all(tuple(a.shape[1:]) == tuple(b.shape) and a.dim() == b.dim() + 1 for a, b in zip(v_leaves, like_leaves)) \
                and len({a.shape[0] for a in v_leaves}) == 1:
            return True
        shapes = [tuple(a.shape) for a in v_leaves]
        want = [tuple(b.shape) for b in like_leaves]
        raise ValueError(f"{where}: `v` leaves must have the parameter shapes {want} or a common leading axis on top "
                         f"of them; got {shapes}.")

    def on_stacks(self, stacked: bool) -> Callable:
        """The operator as a function on stacks: `many`, or `fn` on the one vector of a stack of one."""
        if stacked or self.like is None:
            return self.many if stacked else (lambda V: self.fn(V[0]).unsqueeze(0))
        return lambda V: tr.map(lambda leaf: leaf.unsqueeze(0), self.fn(tr.map(lambda leaf: leaf[0], V)))

    def __call__(self, v: PyTree) -> PyTree:
        """C v for one vector, or the k products of a stack in one call."""
        return self.many(v) if self._is_stack(v, "ti.LinearOperator") else self.fn(v)

    # ------------------------------------------------------------ composition

    def _with(self, fn: Callable, many: Callable, *, psd, kind) -> LinearOperator:
        return LinearOperator(fn, self.like, many=many, symmetric=self.symmetric, psd=psd, kind=kind)

    def __add__(self, other: LinearOperator) -> LinearOperator:
        """A + B, for operators on the same structure."""
        if not isinstance(other, LinearOperator):
            return NotImplemented
        psd = True if (self.psd and other.psd) else None
        kind = self.kind if self.kind == other.kind else "custom"
        return LinearOperator(lambda v: tr.add(self.fn(v), other.fn(v)), self.like,
                              many=lambda V: tr.add(self.many(V), other.many(V)),
                              symmetric=self.symmetric and other.symmetric, psd=psd, kind=kind)

    def __mul__(self, c: float) -> LinearOperator:
        """C · A for a Python number c."""
        if not isinstance(c, (int, float)) or isinstance(c, bool):
            return NotImplemented
        psd = self.psd if c >= 0 else (False if self.psd else None)
        return self._with(lambda v: tr.scale(c, self.fn(v)), lambda V: tr.scale(c, self.many(V)), psd=psd,
                          kind=self.kind)

    __rmul__ = __mul__

    def damped(self, damping: float) -> LinearOperator:
        """A + λI: the same kind and tags (positive semi-definite stays so for λ ≥ 0)."""
        if not damping:
            return self
        psd = self.psd if damping >= 0 else None
        return self._with(lambda v: tr.add_scaled(self.fn(v), damping, v),
                          lambda V: tr.add_scaled(self.many(V), damping, V), psd=psd, kind=self.kind)

    @classmethod
    def from_matrix(cls, matrix: torch.Tensor, like: PyTree | None = None, *, psd: bool | None = None) -> LinearOperator:
        """The operator `v ↦ M v` of a dense symmetric `[P, P]` matrix over `ti.tree.ravel(like)` (kind "dense").

        Args:
          matrix: a square tensor `[P, P]`, kept as `.matrix` (`ti.direct` factorizes it).
          like: the pytree the operator acts on (P numbers in all, e.g. the parameters);
            default a tensor `[P]` of the matrix's dtype and device, so it acts on `[P]` and `[k, P]`.
          psd: as for `LinearOperator`.

        Returns:
          A `LinearOperator` of kind "dense", symmetric.

        Raises:
          ValueError: `matrix` is not square 2-D, or `like` holds other than P numbers.

        Cost: one `[P, P]` matrix-vector product per vector (one matrix product for a stack).

        Examples:
          >>> op = ti.LinearOperator.from_matrix(2 * torch.eye(3), psd=True)
          >>> op(torch.ones(4, 3)).tolist() == [[2.0, 2.0, 2.0]] * 4
          True
        """
        if not (isinstance(matrix, torch.Tensor) and matrix.dim() == 2 and matrix.shape[0] == matrix.shape[1]):
            got = tuple(matrix.shape) if isinstance(matrix, torch.Tensor) else type(matrix).__name__
            raise ValueError(f"ti.LinearOperator.from_matrix: `matrix` must be a square [P, P] tensor; got {got}.")
        like = torch.zeros(matrix.shape[0], dtype=matrix.dtype, device=matrix.device) if like is None else like
        if tr.size(like) != matrix.shape[0]:
            raise ValueError(f"ti.LinearOperator.from_matrix: `like` holds {tr.size(like)} numbers; the matrix is "
                             f"{tuple(matrix.shape)}.")

        def many(V):
            return tr.unravel(tr.ravel(V, batch_ndim=1) @ matrix.T, like)

        op = cls(lambda v: tr.unravel(matrix @ tr.ravel(v), like), like, many=many, symmetric=True, psd=psd,
                 kind="dense")
        op.matrix = matrix
        return op

    def __repr__(self) -> str:
        structure = "tensors [P] / [k, P]" if self.like is None else f"P={self.size}"
        return f"LinearOperator(kind={self.kind!r}, {structure}, symmetric={self.symmetric}, psd={self.psd})"


def as_operator(operator, *, where: str, name: str = "operator") -> LinearOperator:
    """`operator` itself, or a plain function `v -> C v` on tensors wrapped with the 1-D / 2-D rule."""
    if isinstance(operator, LinearOperator):
        return operator
    if not callable(operator):
        raise TypeError(f"{where}: `{name}` must be a function v -> C v or a ti.LinearOperator (ti.hvp, ti.ggn_vp); "
                        f"got {type(operator).__name__}.")
    return LinearOperator(operator, None, many=operator)
