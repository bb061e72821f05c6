"""`ti.influence` and `ti.self_influence` refuse an `ihvp` whose output is not a finite stack shaped like its input."""

import pytest
import torch

import tinfluence as ti


def _wrong(kind):
    """Wraps a correct solver into one that breaks its output in one way."""
    def make(correct):
        def ihvp(V):
            U = correct(V)
            if kind == "fewer":
                return ti.tree.map(lambda leaf: leaf[:-1], U)
            if kind == "more":
                return ti.tree.map(lambda leaf: torch.cat([leaf, leaf[:1]]), U)
            if kind == "structure":
                return list(U.values())
            if kind == "shape":
                return {**U, "weight": U["weight"].reshape(U["weight"].shape[0], -1)}
            if kind == "dtype":
                return ti.tree.map(lambda leaf: leaf.float(), U)
            if kind == "nan":
                return {**U, "weight": U["weight"] * float("nan")}
            if kind == "not_tensor":
                return {**U, "bias": U["bias"].numpy()}
            raise AssertionError(kind)
        return ihvp
    return make


CASES = {
    "fewer": r"`ihvp` returned leaf 'bias' of shape \[4, 10\] for an input of shape \[5, 10\] \(4 vectors for k=5 "
             r"right-hand sides\)",
    "more": r"`ihvp` returned leaf 'bias' of shape \[6, 10\] for an input of shape \[5, 10\] \(6 vectors for k=5",
    "structure": r"`ihvp` returned structure PyTreeSpec\(\[\*, \*\]\) for an input of structure",
    "shape": r"`ihvp` returned leaf 'weight' of shape \[5, 640\] for an input of shape \[5, 10, 64\];",
    "dtype": r"`ihvp` returned leaf 'bias' as torch.float32 on cpu for an input torch.float64 on cpu",
    "nan": r"`ihvp` returned NaN or inf in leaf 'weight': the solve failed",
    "not_tensor": r"`ihvp` returned a ndarray for leaf 'bias'",
}


@pytest.fixture(scope="module")
def solver(digits_lr):
    return ti.direct(ti.hessian(digits_lr.objective(digits_lr.train), digits_lr.params), damping=1e-3)


@pytest.mark.parametrize("kind", list(CASES))
def test_influence_refuses_a_bad_ihvp_output(digits_lr, solver, kind):
    test = ti.take(digits_lr.test, slice(0, 5))
    with pytest.raises(TypeError if kind == "not_tensor" else ValueError, match="^ti.influence: " + CASES[kind]):
        ti.influence(digits_lr.loss, digits_lr.params, digits_lr.train, test, ihvp=_wrong(kind)(solver))


@pytest.mark.parametrize("kind", list(CASES))
def test_self_influence_refuses_a_bad_ihvp_output(digits_lr, solver, kind):
    train = ti.take(digits_lr.train, slice(0, 12))
    with pytest.raises(TypeError if kind == "not_tensor" else ValueError, match="^ti.self_influence: " + CASES[kind].replace("k=5", "k=12")
                       .replace(r"\[5,", r"\[12,").replace(r"\[4,", r"\[11,").replace(r"\[6,", r"\[13,")
                       .replace("(4 vectors", "(11 vectors").replace("(6 vectors", "(13 vectors")):
        ti.self_influence(digits_lr.loss, digits_lr.params, train, ihvp=_wrong(kind)(solver))


def test_a_correct_ihvp_still_gives_the_dense_scores(digits_lr, solver):
    """The check passes a right solver through unchanged: the scores equal the dense formula."""
    test = ti.take(digits_lr.test, slice(0, 3))
    params = digits_lr.params
    H = ti.hessian(digits_lr.objective(digits_lr.train), params) + 1e-3 * torch.eye(650)
    G_test = ti.ravel(ti.per_example_grads(digits_lr.loss, params, test), batch_ndim=1)
    G_train = ti.ravel(ti.per_example_grads(digits_lr.loss, params, digits_lr.train), batch_ndim=1)
    expected = torch.linalg.solve(H, G_test.T).T @ G_train.T / 1000
    got = ti.influence(digits_lr.loss, params, digits_lr.train, test, ihvp=solver)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
