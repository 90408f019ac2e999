"""The tokenizer a GGUF file describes, built with `tokenizers` alone.

transformers' own GGUF tokenizer loader reads the file through a torch-based reader, so a machine
without PyTorch cannot use it. Here the metadata comes from the `gguf` package and the vocabulary,
merges, special tokens and chat template go straight into a `tokenizers.Tokenizer` wrapped as a
`PreTrainedTokenizerFast`. tests/test_tokenizer.py checks ids, special tokens and chat-template
output against transformers' loader on the bundled pool.

Byte-level BPE vocabularies (`tokenizer.ggml.model = gpt2`: SmolLM2, Llama 3, Qwen2/2.5/3) are
supported; for another kind, convert the checkpoint to an HF directory with its tokenizer files.
"""

from __future__ import annotations

from pathlib import Path

from idjax.models.config import CheckpointError
from idjax.models.params import gguf_value, open_gguf

# How each vocabulary splits text before BPE (`tokenizer.ggml.pre`): the regex its merges were
# learned with. A name not listed uses GPT-2's own split (ByteLevel's built-in regex).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = {
    "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of each byte (the alphabet byte-level BPE vocabularies are written in)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    spelling, extra = {}, 0
    for b in range(256):
        if b in printable:
            spelling[b] = chr(b)
        else:
            spelling[b] = chr(256 + extra)
            extra += 1
    return spelling


def gguf_tokenizer(path: str | Path):
    """A `PreTrainedTokenizerFast` from the tokenizer metadata of a GGUF file (no PyTorch needed)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    reader = open_gguf(path)
    kind = gguf_value(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(
            f"{path}: tokenizer.ggml.model is {kind!r}; idjax builds byte-level BPE ('gpt2') tokenizers from "
            "GGUF files; use an HF checkpoint directory with its tokenizer files for this model")
    tokens = gguf_value(reader, "tokenizer.ggml.tokens")
    merges = gguf_value(reader, "tokenizer.ggml.merges")
    if not tokens or not merges:
        raise CheckpointError(f"{path}: no tokenizer.ggml.tokens / tokenizer.ggml.merges in the file")
    types = gguf_value(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)

    alphabet = _byte_alphabet()
    letters = set(alphabet.values())
    # A token written in plain text rather than the byte alphabet is re-spelled byte by byte.
    vocab = {t if set(t) <= letters else "".join(alphabet[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    tk = Tokenizer(BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False))
    split = SPLITS.get(gguf_value(reader, "tokenizer.ggml.pre"))
    if split is None:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                             use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    # Control tokens (<|im_end|>, ...) stay whole and special; one spelled outside the byte alphabet is
    # a mislabel whose addition would grow the vocabulary past the model's, so it is left out.
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True)
                           for t, ty in zip(tokens, types) if ty == _CONTROL and set(t) <= letters])
    tk.add_tokens([AddedToken(t, normalized=False, special=False)
                   for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab])

    def token(key):
        i = gguf_value(reader, f"tokenizer.ggml.{key}")
        return None if i is None else tokens[int(i)]

    bos, eos = token("bos_token_id"), token("eos_token_id")
    # What encode(add_special_tokens=True) wraps around a sequence, as llama.cpp's flags say.
    ends = [(bos, gguf_value(reader, "tokenizer.ggml.add_bos_token", False)),
            (eos, gguf_value(reader, "tokenizer.ggml.add_eos_token", False))]
    before, after = ([t] if t is not None and on else [] for t, on in ends)

    def template(seq, type_id=""):
        return " ".join([*(t + type_id for t in before), seq, *(t + type_id for t in after)])

    tk.post_processor = processors.TemplateProcessing(
        single=template("$A"), pair=f"{template('$A')} {template('$B:1', ':1')}",
        special_tokens=[(t, tokens.index(t)) for t in {*before, *after}])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=bos, eos_token=eos, unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id"), chat_template=gguf_value(reader, "tokenizer.chat_template"))
