from llama.chat_format import Dialog, Message
from llama.generation import ChatPrediction, CompletionPrediction, Llama, TextStream
from llama.model import ModelArgs, Transformer
from llama.tokenizer import Tokenizer

__all__ = ["Llama", "Dialog", "Message", "ChatPrediction", "CompletionPrediction",
           "TextStream", "ModelArgs", "Transformer", "Tokenizer"]
