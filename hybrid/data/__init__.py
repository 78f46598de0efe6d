"""Data: the procedural shapes dataset, WebDataset shards, and the Lightning data module.

- `hybrid.data.attributes`: the discrete vocabulary (shapes, colors, positions, ...).
- `hybrid.data.procedural`: `ProceduralDataset`, `sample_attributes`, `render`, `caption`.
- `hybrid.data.shards`: shard writer CLI (`python -m hybrid.data.shards write ...`) and readers
  (`TrainShards`: resampled, fixed length per rank; `EvalShards`: exactly once), `SkipCounter`.
- `hybrid.data.module`: `HybridDataModule` (the only Lightning user here).

Nothing is imported here, so `import hybrid.data.attributes` stays cheap (no Lightning, no webdataset).
"""
