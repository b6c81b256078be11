"""The planning floor: importance criteria, plan options and the plan itself (pure data, JSON),
which says for every group the units kept and for every frozen group why."""
