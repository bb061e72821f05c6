"""Task files shipped with the package, run by `tinfluence run NAME` (e.g. `tinfluence run digits`).

A task file is plain Python read by `tinfluence.pipeline.load_task`; these double as examples
of the contract (`tinfluence.pipeline.Task`).
"""
