"""Editing: edit records -> guide picks at 256 -> KV-cached SGA sampling -> VQGAN decode + blend.

edits     edit records, edit shards (read/write), checks     build     edit sets from files / datasets
classes   class names -> label ids (COCO-Stuff table)          guides    guide sampling + block picks (.npz)
sampler   cached / block re-run / uncached samplers            decode    token-granular SGA decode steps
blend     Laplacian blend + hard composite                     runner    distributed, resumable edit runs
commands  `asset-dist precompute-guides | edit-batch | edit`
"""
