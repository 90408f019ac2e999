"""idjax: Influence Distillation in JAX.

Choose, and weight, the training samples of a large instruction pool that most help a model
on a target task (Nikdan et al., arXiv 2505.19051). See README.md and docs/method.md.

The functional core is re-exported here, the way optax exports its transforms: pure functions
of arrays and pytrees with keyword options, usable inside a caller's jit / vmap / shard_map
(`per_example_gradients`, `jvp_embeddings`, `hvp`, `influence_scores`, `krr_fit`, `propagate`,
`second_order_weights`, `round_robin_indices`, ...), next to the shells that run them at scale
(`PerExampleGradients`, `Propagator`, `select_samples`, ...). Names load on first use, so
`import idjax` (and `idjax --help`) imports no JAX.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# module -> the names it exports, in the order data flows through the method
_EXPORTS = {
    "configs": ("EmbedConfig", "SelectConfig", "TrainRecipe", "WarmupRecipe"),
    "data": ("read_records", "tokenize", "Example", "DataError"),
    "batching": ("make_batches", "sorted_batches", "Batch"),
    "models": ("load",),
    "sketch": ("Projector", "project_tree", "global_norm_sq"),
    "subsets": ("param_filter", "split_params", "restrict", "layer_mask", "CoordinateMask"),
    "losses": ("token_losses", "response_loss_sums", "mean_response_loss", "hidden_loss_sums", "sample_losses"),
    "grads": ("per_example_gradients", "GradientConfig", "PerExampleGradients"),
    "hessian": ("TargetArrays", "as_targets", "target_arrays", "mean_target_loss", "target_gradient", "hvp",
                "gauss_newton_vp", "hessian_products", "landmark_curvature", "target_direction",
                "ProjectedCurvature"),
    "embed": ("jvp_embeddings", "pooled_features", "random_tangents", "JVPEmbedder"),
    "optim": ("OptimizerSpec", "UpdateModel", "update_model"),
    "scores": ("InfluenceScores", "influence_scores", "cosine_scores", "curvature_matrix"),
    "landmarks": ("choose_landmarks",),
    "propagation": ("KRRState", "RidgeState", "krr_fit", "ridge_fit", "propagate", "propagate_transpose",
                    "coefficient_matrix", "low_rank_product", "streamed_low_rank_product", "median_bandwidth"),
    "propagator": ("Propagator",),
    "curvature": ("low_rank_matvec", "dense_matvec", "lanczos_spectrum", "estimate_spectrum"),
    "weights": ("project_simplex", "first_order_weights", "lam_for_budget", "convexity_lam", "second_order_lam",
                "fista_weights", "second_order_weights", "SolverResult", "default_lam", "solve_weights",
                "WeightSolution"),
    "select": ("top_k_indices", "round_robin_order", "round_robin_indices", "per_task_indices", "task_groups",
               "top_k", "top_k_lexicographic", "round_robin", "per_task", "task_budgets", "token_budget_cap",
               "within_token_budget"),
    "passes": ("embed_pool",),
    "pipeline": ("Selection", "select_samples"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'idjax' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"idjax.{module}"), name)
    globals()[name] = value  # the next access skips this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
