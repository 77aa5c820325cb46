"""The performance model (`pipeinfer-cpu plan`): the head's own scheduling loops driven against a
simulated pipeline, draft and clock, to predict decode speed and the bottleneck before running."""
