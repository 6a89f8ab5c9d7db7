"""CIFAR-10/100 training with any wagrad algorithm (Flax ResNet / VGG, tfds data source).

Modules, in reading order: ``input_pipeline`` (data, augmentation, per-worker batches),
``models`` (ResNet-20 family, VGG-16), ``algorithms`` (the registry of wagrad
algorithms and how each one's evaluated model is formed), ``train`` (the training
loop), ``main`` (command line). Run ``python -m examples.cifar.main --help`` from the
repository root.
"""
