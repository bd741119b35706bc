"""AI models as handlers: model cards, ONNX Runtime inference and the training pipeline.

``card`` (schema), ``inference`` (the generic pipeline), ``handler`` + ``registry`` (``model:<name>``
handlers), ``train_config`` and ``data`` need only onnxruntime; ``train`` and ``unet`` need torch
(extra ``train``).
"""
