"""The importable rules core: meshes with five named axes, the ordered rule table, and applying it to pytrees.

What other JAX projects import (re-exported by ``shardlib``). Nothing here
knows about training, models or parallel schedules.
"""
