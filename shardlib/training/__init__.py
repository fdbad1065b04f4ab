"""Training: config, the parallel plan, state, steps, the loop, checkpoints, metrics, faults and the CLI.

The one layer that reads the training config; it composes the strategies of
``shardlib.parallel`` through ``parallel_plan.build_plan``.
"""
