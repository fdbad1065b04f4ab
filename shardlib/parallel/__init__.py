"""The parallel strategies: ring collectives, accumulation, compression, attention over ``seq``, experts, pipelines.

Each takes arrays, functions and small typed settings and returns values or
transformed loss and gradient functions; none imports the training layer.
``compat`` is the table of which of them compose.
"""
