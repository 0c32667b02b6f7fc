"""Reference models on pyattn's fused ops: seq2seq with Bahdanau attention, the encoder-decoder
Transformer (torch.nn.Transformer drop-in) and BERT (Hugging Face names)."""

from .bert import BertConfig, BertForPreTraining, BertModel
from .seq2seq import Seq2Seq, Seq2SeqConfig, Seq2SeqOutput
from .transformer import Transformer, TransformerConfig

__all__ = [
    "BertConfig",
    "BertForPreTraining",
    "BertModel",
    "Seq2Seq",
    "Seq2SeqConfig",
    "Seq2SeqOutput",
    "Transformer",
    "TransformerConfig",
]
