"""Training side of Portable Reward Tuning: the only package that imports torch.

Datasets, the teacher pass, the reward network, PRT and pair losses, and the
export to the ONNX contract in docs/reward-onnx-contract.md arrive with the
"Local preference tuning" issue.
"""
