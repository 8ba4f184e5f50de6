import warnings

from llama.chat_format import Dialog, Message
from llama.generation import ChatPrediction, CompletionPrediction, Llama, TextStream
from llama.model import ModelArgs, Transformer
from llama.tokenizer import Tokenizer
from llama.tokenizer3 import Llama3Tokenizer
from llama.tokenizers import load_tokenizer

__all__ = ["Llama", "Dialog", "Message", "ChatPrediction", "CompletionPrediction",
           "TextStream", "ModelArgs", "Transformer", "Tokenizer", "Llama3Tokenizer",
           "load_tokenizer"]

# `python -m llama.quantize` runs llama/quantize/formats.py as a script although this package has
# imported it already (the model uses its formats); runpy warns about that, and here it is
# harmless: the script part only calls llama.quantize.cli.main. The filter matches that one
# message only.
warnings.filterwarnings("ignore", message="'llama.quantize' found in sys.modules",
                        category=RuntimeWarning)
