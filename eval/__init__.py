"""Evaluation of exported backbones: k-NN and linear probes with medical metrics."""
