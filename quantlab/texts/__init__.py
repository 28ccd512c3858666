"""Where text comes from: the bundled corpus, WikiText-2, a user's file.

corpus   the Python standard library split by path hash into training and held-out text
sources  named text sources for evaluation and calibration (offline first, clear DataError otherwise)

May import: quantlab.errors and tokenizers. Below evaluation, calibration and training, which all read text.
"""
