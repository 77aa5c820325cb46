"""GNN + RL channel pruning of CIFAR-10 CNNs under a FLOPs budget, exported to ONNX (issue 4).

Importing this package or `compress.cli` needs only click; torch and friends are imported by the
verbs that use them (install the `compress` extra).
"""
