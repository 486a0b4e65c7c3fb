"""`cicada.cloud.loading`: where a cold start's stage bytes come from, and the load strategies.

* Stage sources (base.py): one per device kind, `cpu` (cpu.py: mmap, reader threads) and
  `cuda` (cuda.py: pinned ring, copy stream); sources.py picks one by device and refuses any
  other kind by name. The pipeline (cloud/pipeline.py) drives a source without device branches.
* Strategies (loader.py): `cicada`, `meta`, `naive`, `pisel` and the `peer-*` loaders, one file
  each, by name in registry.py.

Torch-free to import: `cicada run` opens a strategy before `import torch`. This file imports
nothing, so that the pipeline and the sources load without the strategies.
"""
