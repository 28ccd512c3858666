"""The bundled model: how pystdlib-llama-4m was trained and how its model card is measured.

training         seeded, resumable training on the Python standard library corpus
training_report  measures every figure of the model card

May import: quantlab.texts, quantlab.models, quantlab.evaluation, quantlab.runs. Nothing imports it.
"""
