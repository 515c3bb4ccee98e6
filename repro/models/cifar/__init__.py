"""The CIFAR model zoo under RepDistiller's names, with RepDistiller's state-dict keys and shapes.

Importing this package registers every family in ``repro.models.MODELS``; build models with
``repro.models.create_model(name, num_classes=...)``. All models subclass ``CifarNet`` and speak the feature
contract of ``repro.models`` (``is_feat`` / ``preact``), expose ``get_classifier()`` and ``feature_dims()``.
"""
from repro.models.cifar import mobilenetv2, resnet, resnetv2, shufflenetv1, shufflenetv2, vgg, wrn
from repro.models.cifar.resnet import CifarNet

__all__ = ["CifarNet", "mobilenetv2", "resnet", "resnetv2", "shufflenetv1", "shufflenetv2", "vgg", "wrn"]
