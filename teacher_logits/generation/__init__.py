"""Generation: a shard's samples -> the teacher's top-k rows -> the shard file.

``shard_job`` runs one shard: it claims a GPU group, loads the teacher
(``teacher``), computes windows of batches (``batching``, ``compute``), writes
parts and the shard in a writer thread (``writing``, ``parts``) and records
provenance. Modules that run the teacher import torch; this package's
``__init__`` does not.
"""
