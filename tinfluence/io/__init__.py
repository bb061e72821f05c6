"""Result files: scores written per test point (`influence_to_files`, `read_scores`) and
training checkpoints read back as `(params, lr)` pairs (`load_checkpoints`)."""

from .checkpoints import load_checkpoints
from .scores import ScoreWriter, influence_to_files, read_scores, run_identity

__all__ = ["ScoreWriter", "influence_to_files", "read_scores", "run_identity", "load_checkpoints"]
