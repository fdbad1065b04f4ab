"""Several processes: joining JAX's distributed runtime, watching for lost peers, launching local runs."""
