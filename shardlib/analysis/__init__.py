"""Analysis: ``describe`` (where every parameter lives), the compiled-step ``report``, the mesh ``planner``, HLO views."""
