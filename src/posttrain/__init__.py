"""posttrain: post-training for large language models.

Layers (see docs/DESIGN.md): ``posttrain.ops`` holds pure tensor math and imports torch only;
``posttrain.data`` formats, chat templates, tokenization and packing; ``posttrain.train``
the training engine; ``posttrain.algorithms`` one small module per method;
``posttrain.world`` the built-in tiny world.
"""

__version__ = "0.1.0"
