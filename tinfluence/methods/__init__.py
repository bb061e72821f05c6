"""Influence estimators built from the kernels and solvers: each returns a score matrix
`[n_test, n_train]` with one sign, score ≈ L_test(θ̂ without z) − L_test(θ̂), positive = helpful.
"""
