"""idjax: Influence Distillation in JAX.

Choose, and weight, the training samples of a large instruction pool that most help a model
on a target task (Nikdan et al., arXiv 2505.19051). See README.md and docs/method.md.
"""

__version__ = "0.1.0"
