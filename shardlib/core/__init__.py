"""The importable rules core: meshes, the ordered rule table, and applying it to pytrees.

What other JAX projects import (re-exported by ``shardlib``): ``mesh`` (the
five parallel axes and ``data_replica``, Auto or Explicit), ``rules`` (the table, presets, mesh-axis
renaming), ``aliases`` (a project's logical names), ``flax_axes`` (Flax's own
annotations), ``patterns`` (axes by path, with diagnostics), ``sharding``
(trees of specs and shardings, activations), ``state_sharding`` (optimizer and
train states following the parameters), ``paths`` (key paths, axes trees).
Nothing here knows about training, models or parallel schedules.
"""
