"""Using a trained model: sampling and beam search over a model-agnostic callback (`decode`), and
text in, text out for each model (`gpt.generate`, `gpt.reply` for a chat run,
`encoder_decoder.translate` and `bleu`).

    from transformer import load_run
    from transformer.inference import generate, translate
"""

from transformer.inference.encoder_decoder import bleu, translate
from transformer.inference.gpt import generate, generate_ids, reply

__all__ = ["bleu", "generate", "generate_ids", "reply", "translate"]
