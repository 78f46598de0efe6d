"""Evaluation: the attribute oracle, FID in its feature space, instruction adherence.

Public names are imported lazily (`from hybrid.eval import compute_fid` loads `hybrid.eval.fid`
on first use), so `import hybrid.eval.oracle` stays light.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Oracle": "oracle", "load_oracle": "oracle", "ensure_oracle": "oracle", "train_oracle": "oracle",
    "evaluate_oracle": "oracle", "oracle_path": "oracle",
    "compute_fid": "fid", "frechet_distance": "fid", "bootstrap_fid": "fid", "OracleFeatures": "fid",
    "oracle_fid_metric": "fid", "inception_fid": "fid", "InceptionJudge": "fid",
    "adherence": "adherence", "adherence_from_logits": "adherence", "glyph_accuracy": "adherence",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"hybrid.eval.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'hybrid.eval' has no attribute '{name}'")
