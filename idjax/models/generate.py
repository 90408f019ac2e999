"""Greedy decoding with a KV cache: enough for evaluation (exact match) and for the demo.

Prompts are left-padded to a multiple of 64 tokens and the whole decode loop runs inside one
jit-compiled `lax.while_loop`, so a batch costs one compilation per (prompt bucket, length).
Prompt plus answer never exceed the model's context (max_position_embeddings): longer requests are
cut with a warning, and the KV cache is never sized past it.
"""

from __future__ import annotations

import logging
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from idjax.models.modeling import CausalLM, KVCache

_PROMPT_MULTIPLE = 64
log = logging.getLogger(__name__)


@partial(jax.jit, static_argnums=(0, 4))
def _greedy(graphdef, state, ids, mask, max_new_tokens: int, eos_ids, pad_id):
    model = nnx.merge(graphdef, state)
    b, p = ids.shape
    cache = KVCache.empty(model.config, b, p + max_new_tokens, model.dtype)
    logits, cache = model(ids, mask, cache=cache)
    token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
    done = jnp.zeros((b,), bool)

    def cond(carry):
        i, _, _, done, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, token, cache, done, out = carry
        out = out.at[:, i].set(jnp.where(done, pad_id, token))
        done = done | jnp.isin(token, eos_ids)
        logits, cache = model(token[:, None], jnp.ones((b, 1), jnp.int32), cache=cache)
        token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        return i + 1, token, cache, done, out

    _, _, _, _, out = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), token, cache, done, out))
    return out


def generate(model: CausalLM, prompts: list[list[int]], *, max_new_tokens: int = 64,
             eos_ids=None, pad_id: int = 0) -> list[list[int]]:
    """Greedy continuations of token-id prompts; each stops after its first EOS (kept)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one non-empty prompt")
    eos = tuple(model.config.eos_token_ids if eos_ids is None else eos_ids) or (-1,)
    context = model.config.max_position_embeddings
    longest = max(len(p) for p in prompts)
    if longest >= context:
        log.warning("a prompt of %d tokens is longer than the model's context of %d; keeping the last %d tokens "
                    "of each such prompt", longest, context, context - 1)
        prompts = [p[-(context - 1):] for p in prompts]
        longest = context - 1
    if longest + max_new_tokens > context:
        log.warning("max_new_tokens %d capped at %d: the model's context is %d tokens and the longest prompt has %d",
                    max_new_tokens, context - longest, context, longest)
        max_new_tokens = context - longest
    # The cache holds the padded prompt and the answer: at most `context` slots.
    width = min(-(-longest // _PROMPT_MULTIPLE) * _PROMPT_MULTIPLE, context - max_new_tokens)
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = p
        mask[row, width - len(p):] = 1
    graphdef, state = nnx.split(model)
    out = np.asarray(_greedy(graphdef, state, ids, mask, int(max_new_tokens),
                             jnp.asarray(eos, jnp.int32), jnp.int32(pad_id)))
    results = []
    for row in out:
        tokens = []
        for t in row.tolist():
            tokens.append(t)
            if t in eos:
                break
        results.append(tokens)
    return results


def stop_ids(model: CausalLM, tokenizer) -> list[int]:
    """Token ids that end an answer: the config's EOS ids plus the tokenizer's (e.g. <|im_end|>)."""
    eos = set(model.config.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    return sorted(eos)


def chat(model: CausalLM, tokenizer, conversations, *, max_new_tokens: int = 64) -> list[str]:
    """Answer chat conversations (a string is one user turn) with the tokenizer's chat template."""
    prompts = []
    for conv in conversations:
        messages = [{"role": "user", "content": conv}] if isinstance(conv, str) else conv
        prompts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    out = generate(model, ids, max_new_tokens=max_new_tokens, eos_ids=stop_ids(model, tokenizer),
                   pad_id=tokenizer.pad_token_id or 0)
    return [tokenizer.decode(t, skip_special_tokens=True) for t in out]
