"""The store: on-disk layout, top-k codec, shard writer, reader and validation.

Needs numpy, h5py, hdf5plugin and blosc2 (the default writer) only, never torch.
``format`` names what is in a shard, ``codec`` encodes top-k rows, ``writer`` writes
shards (``chunks`` compresses them outside HDF5), ``reader`` reads a gathered store
(``partial`` also an unfinished run; ``views`` its splits and selections), ``validate``
checks a shard (feeding ``stats``), ``prepared`` is prepare's token file, and
``isolated`` runs checks in crash-proof workers.
"""

from .reader import LogitStore
from .views import StoreView

__all__ = ["LogitStore", "StoreView"]
