"""The functional core: pytrees, models as pure functions, data sets, objectives, kernels.

Layer by layer (imports point upward only): `tree` → `model`, `data` → `objective` →
`transforms`, `factored` → `scoring`; `checks` (argument checks) and `errors` are shared by all.
"""
