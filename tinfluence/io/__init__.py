"""Result files: scores written per test point (`influence_to_files`, `read_scores`, and
`ScoreWriter` for scores computed elsewhere), training checkpoints read back as `(params, lr)`
pairs (`load_checkpoints`), and the on-disk store of compressed training gradients
(`write_store`, `open_store`, `create_store`, `GradientStore`). Every write is atomic and
verified, and every writer resumes a run that was killed.
"""

from .checkpoints import load_checkpoints
from .scores import ScoreWriter, influence_to_files, read_scores, run_identity
from .store import GradientStore, create_store, open_store, write_store

__all__ = ["ScoreWriter", "influence_to_files", "read_scores", "run_identity", "load_checkpoints", "GradientStore",
           "create_store", "open_store", "write_store"]
