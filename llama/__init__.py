from llama.chat_format import Dialog, Message
from llama.generation import ChatPrediction, CompletionPrediction, Llama, TextStream
from llama.model import ModelArgs, Transformer
from llama.tokenizer import Tokenizer
from llama.tokenizer3 import Llama3Tokenizer
from llama.tokenizers import load_tokenizer

__all__ = ["Llama", "Dialog", "Message", "ChatPrediction", "CompletionPrediction",
           "TextStream", "ModelArgs", "Transformer", "Tokenizer", "Llama3Tokenizer",
           "load_tokenizer"]
